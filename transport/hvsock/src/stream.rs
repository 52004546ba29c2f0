//! [`HvStream`]: a byte stream over a vmlink channel, speaking hv_sock's data path.

use std::io;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vmlink_channel::{
    ChannelError, Doorbell, Endpoint, OutgoingPacket, Packet, PacketRx, PacketTx, PacketType,
    Receiver, Sender, Wait,
};
use zerocopy::{FromZeros, IntoBytes};

use crate::HvSockError;
use crate::wire::{HVS_MTU_SIZE, HVS_SEND_BUF_SIZE, PIPE_HEADER_LEN, PipeHeader, check_header};

/// The failure a stream's halves share: the first bad packet, kept for every later call.
pub(crate) type Failure = Arc<OnceLock<HvSockError>>;

/// A byte stream over a vmlink channel endpoint, packets framed as Linux's hv_sock
/// transport frames them (see [`wire`](crate::wire)).
///
/// - [`Read`](io::Read) returns data across packet boundaries; what a packet holds beyond
///   the caller's buffer waits in a buffer of [`HVS_MTU_SIZE`] bytes allocated once, when
///   the stream is made. After the peer's FIN every read returns `Ok(0)`.
/// - [`Write`](io::Write) sends packets of at most [`HVS_SEND_BUF_SIZE`] data bytes: it
///   waits (through the channel's [`Wait`]) until the first fits, then sends more while they
///   fit, and returns what it sent, as Linux's `hvs_stream_enqueue` does; `write_all` sends
///   everything.
/// - [`shutdown_write`](Self::shutdown_write) sends the FIN once; reading goes on until the
///   peer's FIN. Dropping the stream (or its writing half) sends the FIN if it was not sent
///   and fits without waiting, as Linux does when a socket closes; a peer whose channel
///   closes before any FIN reads [`ConnectionReset`](io::ErrorKind::ConnectionReset).
/// - The peer is hostile: a packet that is not in-band, has an extra header, or whose pipe
///   header is malformed ([`HvSockError`]) is an error of kind
///   [`InvalidData`](io::ErrorKind::InvalidData) wrapping the [`HvSockError`]; nothing of
///   that packet is delivered, and the stream is failed: every later read and write returns
///   the same error. A channel that fails (a corrupt ring) is `InvalidData` too, wrapping the
///   [`ChannelError`].
///
/// Reads and writes wait as long as it takes unless a timeout is set
/// ([`set_read_timeout`](Self::set_read_timeout),
/// [`set_write_timeout`](Self::set_write_timeout)); then they fail with
/// [`TimedOut`](io::ErrorKind::TimedOut). [`split`](Self::split) makes a reading and a
/// writing half for two threads.
///
/// # Flow control
///
/// Linux sets its outgoing ring's `pending_send_size` to 4,120 bytes
/// ([`HVS_PENDING_SEND_SIZE`](crate::wire::HVS_PENDING_SEND_SIZE), a full packet) once, when
/// the channel opens, and leaves it there, so the host signals whenever a read makes that
/// much room. A vmlink channel owns its ring writer's `pending_send_size` and arms it only
/// while a send waits for room: to the waiting packet's length (4,120 bytes for a full data
/// packet, 32 for a FIN) or a quarter of the ring if that is more, cleared as soon as the
/// packet fits. A waiting writer is therefore woken under the same rule as Linux's (the
/// reader crossed the threshold), and a writer that is not waiting costs the reader no
/// signals. The stream does not override the channel; the ring format is unchanged for a
/// Linux or Hyper-V reader, which reads `pending_send_size` whatever its value.
///
/// # Examples
///
/// ```
/// use std::io::{Read, Write};
/// use vmlink_channel::{Config, in_process_channel_pair};
/// use vmlink_hvsock::HvStream;
///
/// let (host, guest) = in_process_channel_pair(4 * 4096, Config::default())?;
/// let (mut host, mut guest) = (HvStream::new(host), HvStream::new(guest));
/// guest.write_all(b"hello, host")?;
/// guest.shutdown_write()?; // FIN
///
/// let mut got = String::new();
/// host.read_to_string(&mut got)?;
/// assert_eq!(got, "hello, host");
/// assert!(guest.write(b"more").is_err(), "the sending side is shut down");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct HvStream<T: PacketTx, R: PacketRx, D: Doorbell> {
    /// Always there but after `split`, which takes it (the stream is then dropped).
    endpoint: Option<Endpoint<T, R, D>>,
    rx: ReadState,
    tx: WriteState,
    failure: Failure,
}

/// The reading half of a split [`HvStream`]: [`Read`](io::Read) only.
pub struct HvReader<R, D> {
    receiver: Receiver<R, D>,
    rx: ReadState,
    failure: Failure,
}

/// The writing half of a split [`HvStream`]: [`Write`](io::Write) and
/// [`shutdown_write`](Self::shutdown_write).
pub struct HvWriter<T: PacketTx, D: Doorbell> {
    sender: Sender<T, D>,
    tx: WriteState,
    failure: Failure,
}

impl<T: PacketTx, R: PacketRx, D: Doorbell> HvStream<T, R, D> {
    /// A stream over `endpoint` (a [`Channel`](vmlink_channel::Channel) or any other
    /// endpoint whose link carries in-band packets), whose connection is already set up.
    /// Allocates the 16 KiB receive buffer.
    pub fn new(endpoint: Endpoint<T, R, D>) -> Self {
        Self {
            endpoint: Some(endpoint),
            rx: ReadState::new(),
            tx: WriteState::default(),
            failure: Failure::default(),
        }
    }

    /// The endpoint the stream runs over.
    pub fn endpoint(&self) -> &Endpoint<T, R, D> {
        held(&self.endpoint)
    }

    /// Sends the FIN (a packet with no data), once: later calls do nothing; every write
    /// after the first call fails with [`BrokenPipe`](io::ErrorKind::BrokenPipe) wrapping
    /// [`HvSockError::WriteAfterShutdown`]. Waits for room as writes do.
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        let endpoint = held(&self.endpoint);
        self.tx.shutdown(&mut &*endpoint)
    }

    /// How long reads wait for data (`None`, the default: as long as it takes).
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        self.rx.timeout = timeout;
    }

    /// How long writes wait for room (`None`, the default: as long as it takes).
    pub fn set_write_timeout(&mut self, timeout: Option<Duration>) {
        self.tx.timeout = timeout;
    }

    /// True once the peer's FIN has been received.
    pub fn peer_finished(&self) -> bool {
        self.rx.fin
    }

    /// Bytes of a received packet waiting for a read.
    pub fn buffered(&self) -> usize {
        self.rx.end - self.rx.start
    }

    /// The bad packet that failed the stream, if one did.
    pub fn failure(&self) -> Option<HvSockError> {
        self.failure.get().copied()
    }

    /// Splits the stream into a reading and a writing half for two threads, with no lock
    /// between them ([`Endpoint::split`]). They share the failure state: a bad packet the
    /// reader meets fails the writer too.
    ///
    /// ```
    /// use std::io::{Read, Write};
    /// use std::thread;
    /// use vmlink_channel::{Config, in_process_channel_pair};
    /// use vmlink_hvsock::HvStream;
    ///
    /// let (a, b) = in_process_channel_pair(4 * 4096, Config::default())?;
    /// let (mut a_read, mut a_write) = HvStream::new(a).split();
    /// let (mut b_read, mut b_write) = HvStream::new(b).split();
    /// // An echo: b copies what it reads back until a's FIN, then sends its own.
    /// let echo = thread::spawn(move || -> std::io::Result<u64> {
    ///     let n = std::io::copy(&mut b_read, &mut b_write)?;
    ///     b_write.shutdown_write()?;
    ///     Ok(n)
    /// });
    /// let data = vec![7u8; 100_000];
    /// let sender = thread::spawn(move || -> std::io::Result<()> {
    ///     a_write.write_all(&data)?;
    ///     a_write.shutdown_write()
    /// });
    /// let mut back = Vec::new();
    /// a_read.read_to_end(&mut back)?;
    /// sender.join().unwrap()?;
    /// assert_eq!(echo.join().unwrap()?, 100_000);
    /// assert_eq!(back, vec![7u8; 100_000]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn split(mut self) -> (HvReader<R, D>, HvWriter<T, D>) {
        let endpoint = self
            .endpoint
            .take()
            .expect("a stream holds its endpoint until split");
        let (sender, receiver) = endpoint.split();
        (
            HvReader {
                receiver,
                rx: core::mem::replace(&mut self.rx, ReadState::empty()),
                failure: Arc::clone(&self.failure),
            },
            HvWriter {
                sender,
                tx: core::mem::take(&mut self.tx),
                failure: Arc::clone(&self.failure),
            },
        )
    }
}

impl<T: PacketTx, R: PacketRx, D: Doorbell> Drop for HvStream<T, R, D> {
    fn drop(&mut self) {
        if let Some(endpoint) = &self.endpoint {
            self.tx.close(&mut &*endpoint, &self.failure);
        }
    }
}

impl<T: PacketTx, R: PacketRx, D: Doorbell> io::Read for HvStream<T, R, D> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let endpoint = held(&self.endpoint);
        self.rx.read(&mut &*endpoint, &self.failure, out)
    }
}

impl<T: PacketTx, R: PacketRx, D: Doorbell> io::Write for HvStream<T, R, D> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let endpoint = held(&self.endpoint);
        self.tx.write(&mut &*endpoint, &self.failure, data)
    }

    /// Nothing to do: every write publishes its packets.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<R: PacketRx, D: Doorbell> HvReader<R, D> {
    /// How long reads wait for data (`None`, the default: as long as it takes).
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        self.rx.timeout = timeout;
    }

    /// True once the peer's FIN has been received.
    pub fn peer_finished(&self) -> bool {
        self.rx.fin
    }

    /// The bad packet that failed the stream, if one did.
    pub fn failure(&self) -> Option<HvSockError> {
        self.failure.get().copied()
    }
}

impl<R: PacketRx, D: Doorbell> io::Read for HvReader<R, D> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.rx.read(&mut self.receiver, &self.failure, out)
    }
}

impl<T: PacketTx, D: Doorbell> HvWriter<T, D> {
    /// Sends the FIN once; see [`HvStream::shutdown_write`].
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        self.tx.shutdown(&mut self.sender)
    }

    /// How long writes wait for room (`None`, the default: as long as it takes).
    pub fn set_write_timeout(&mut self, timeout: Option<Duration>) {
        self.tx.timeout = timeout;
    }

    /// The bad packet that failed the stream, if one did.
    pub fn failure(&self) -> Option<HvSockError> {
        self.failure.get().copied()
    }
}

impl<T: PacketTx, D: Doorbell> Drop for HvWriter<T, D> {
    fn drop(&mut self) {
        self.tx.close(&mut self.sender, &self.failure);
    }
}

impl<T: PacketTx, D: Doorbell> io::Write for HvWriter<T, D> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.tx.write(&mut self.sender, &self.failure, data)
    }

    /// Nothing to do: every write publishes its packets.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<T: PacketTx, R: PacketRx, D: Doorbell> core::fmt::Debug for HvStream<T, R, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HvStream")
            .field("endpoint", &self.endpoint)
            .field("rx", &self.rx)
            .field("tx", &self.tx)
            .field("failure", &self.failure.get())
            .finish()
    }
}

impl<R: PacketRx, D: Doorbell> core::fmt::Debug for HvReader<R, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        debug_half(f, "HvReader", ("rx", &self.rx), &self.failure)
    }
}

impl<T: PacketTx, D: Doorbell> core::fmt::Debug for HvWriter<T, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        debug_half(f, "HvWriter", ("tx", &self.tx), &self.failure)
    }
}

/// A half's debug form: its state and the shared failure.
fn debug_half(
    f: &mut core::fmt::Formatter<'_>,
    name: &str,
    (field, state): (&str, &dyn core::fmt::Debug),
    failure: &Failure,
) -> core::fmt::Result {
    f.debug_struct(name)
        .field(field, state)
        .field("failure", &failure.get())
        .finish_non_exhaustive()
}

/// What the stream needs of a receiving handle: an endpoint or a split receiver.
trait RecvSide {
    fn recv_packet<X>(
        &mut self,
        wait: Wait,
        f: impl FnOnce(&mut Packet<'_>) -> X,
    ) -> Result<X, ChannelError>;
}

/// Implements [`RecvSide`] for a handle whose `recv_with` it forwards to.
macro_rules! recv_side {
    (impl<$($g:ident: $bound:path),*> for $handle:ty) => {
        impl<$($g: $bound),*> RecvSide for $handle {
            fn recv_packet<X>(
                &mut self,
                wait: Wait,
                f: impl FnOnce(&mut Packet<'_>) -> X,
            ) -> Result<X, ChannelError> {
                self.recv_with(wait, f)
            }
        }
    };
}

recv_side!(impl<T: PacketTx, R: PacketRx, D: Doorbell> for &Endpoint<T, R, D>);
recv_side!(impl<R: PacketRx, D: Doorbell> for Receiver<R, D>);

/// What the stream needs of a sending handle: an endpoint or a split sender.
trait SendSide {
    fn send(&mut self, packet: &OutgoingPacket<'_>, wait: Wait) -> Result<(), ChannelError>;
}

impl<T: PacketTx, R: PacketRx, D: Doorbell> SendSide for &Endpoint<T, R, D> {
    fn send(&mut self, packet: &OutgoingPacket<'_>, wait: Wait) -> Result<(), ChannelError> {
        self.send_packet(packet, wait)
    }
}

impl<T: PacketTx, D: Doorbell> SendSide for Sender<T, D> {
    fn send(&mut self, packet: &OutgoingPacket<'_>, wait: Wait) -> Result<(), ChannelError> {
        self.send_packet(packet, wait)
    }
}

/// A stream's endpoint: there until `split` takes it, after which the stream is only
/// dropped.
fn held<E>(endpoint: &Option<E>) -> &E {
    endpoint
        .as_ref()
        .expect("a stream holds its endpoint until split")
}

/// The wait a call with this timeout makes.
fn wait_for(timeout: Option<Duration>) -> Wait {
    match timeout.and_then(|t| Instant::now().checked_add(t)) {
        Some(deadline) => Wait::Until(deadline),
        None => Wait::Forever,
    }
}

/// A channel error as the stream reports it; `gone` is the kind for a peer that left.
pub(crate) fn channel_error(e: ChannelError, gone: io::ErrorKind) -> io::Error {
    let kind = match e {
        ChannelError::Closed => gone,
        ChannelError::TimedOut => io::ErrorKind::TimedOut,
        ChannelError::Full | ChannelError::Empty => io::ErrorKind::WouldBlock,
        ChannelError::Failed(_) => io::ErrorKind::InvalidData,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

/// The receiving side's state.
#[derive(Debug)]
pub(crate) struct ReadState {
    /// The rest of the packet last received, at `start..end`; allocated once.
    pub(crate) buf: Box<[u8]>,
    pub(crate) start: usize,
    pub(crate) end: usize,
    /// The peer's FIN arrived.
    pub(crate) fin: bool,
    timeout: Option<Duration>,
}

/// What a packet brought.
enum Taken {
    /// This many bytes went straight to the caller.
    Direct(usize),
    /// The data went to the stream's buffer (this many bytes), the first `copied` on to
    /// the caller.
    Buffered {
        len: usize,
        copied: usize,
    },
    Fin,
}

/// Why a packet was not taken.
pub(crate) enum Refused {
    Peer(HvSockError),
    Channel(ChannelError),
}

impl From<ChannelError> for Refused {
    fn from(e: ChannelError) -> Self {
        Refused::Channel(e)
    }
}

impl From<HvSockError> for Refused {
    fn from(e: HvSockError) -> Self {
        Refused::Peer(e)
    }
}

/// Checks a received packet (in-band, no extra header, a sound pipe header) and returns
/// the data size its header announces (0: FIN). Reads nothing but the pipe header.
pub(crate) fn check_packet(packet: &mut Packet<'_>) -> Result<usize, Refused> {
    let meta = packet.meta();
    if meta.packet_type != PacketType::InBand {
        return Err(HvSockError::NotInBand {
            packet_type: meta.packet_type.raw(),
        }
        .into());
    }
    if meta.header_len != 0 {
        return Err(HvSockError::ExtraHeader {
            len: meta.header_len,
        }
        .into());
    }
    let mut header = PipeHeader::new_zeroed();
    if meta.payload_len < PIPE_HEADER_LEN {
        return Err(HvSockError::PayloadTooShort {
            len: meta.payload_len,
        }
        .into());
    }
    packet.read_payload(0, header.as_mut_bytes())?;
    Ok(check_header(&header, meta.payload_len)?)
}

/// Copies a checked packet's `len` data bytes into `buf`, which must hold them.
pub(crate) fn read_data(
    packet: &mut Packet<'_>,
    len: usize,
    buf: &mut [u8],
) -> Result<(), Refused> {
    // `check_header` bounds `len` by HVS_MTU_SIZE, the stream buffer's length.
    let Some(buf) = buf.get_mut(..len) else {
        return Err(HvSockError::DataTooLarge {
            data_size: u32::try_from(len).unwrap_or(u32::MAX),
        }
        .into());
    };
    Ok(packet.read_payload(PIPE_HEADER_LEN, buf)?)
}

/// Checks a received packet and copies its data: to `out` when it all fits there, else to
/// `buf` and then as much as fits to `out`. Nothing is copied before the packet is known
/// to be good.
fn take(packet: &mut Packet<'_>, out: &mut [u8], buf: &mut [u8]) -> Result<Taken, Refused> {
    let len = check_packet(packet)?;
    if len == 0 {
        return Ok(Taken::Fin);
    }
    if out.len() >= len {
        read_data(packet, len, out)?;
        return Ok(Taken::Direct(len));
    }
    read_data(packet, len, buf)?;
    let copied = out.len();
    out.copy_from_slice(&buf[..copied]);
    Ok(Taken::Buffered { len, copied })
}

impl ReadState {
    /// What a split stream leaves behind: no buffer.
    fn empty() -> Self {
        Self {
            buf: Box::default(),
            start: 0,
            end: 0,
            fin: false,
            timeout: None,
        }
    }

    pub(crate) fn new() -> Self {
        Self {
            buf: vec![0; HVS_MTU_SIZE].into_boxed_slice(),
            start: 0,
            end: 0,
            fin: false,
            timeout: None,
        }
    }

    /// Copies buffered bytes to `out`; returns how many.
    pub(crate) fn drain(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        n
    }

    fn read(
        &mut self,
        side: &mut impl RecvSide,
        failure: &OnceLock<HvSockError>,
        out: &mut [u8],
    ) -> io::Result<usize> {
        if let Some(e) = failure.get() {
            return Err((*e).into());
        }
        if self.start < self.end {
            return Ok(self.drain(out));
        }
        if self.fin || out.is_empty() {
            return Ok(0);
        }
        let buf = &mut self.buf;
        let received = side.recv_packet(wait_for(self.timeout), |packet| take(packet, out, buf));
        let taken = match received {
            Ok(Ok(taken)) => taken,
            Ok(Err(Refused::Peer(e))) => {
                let _ = failure.set(e);
                return Err(e.into());
            }
            Ok(Err(Refused::Channel(e))) | Err(e) => {
                return Err(channel_error(e, io::ErrorKind::ConnectionReset));
            }
        };
        match taken {
            Taken::Direct(n) => Ok(n),
            Taken::Buffered { len, copied } => {
                (self.start, self.end) = (copied, len);
                Ok(copied)
            }
            Taken::Fin => {
                self.fin = true;
                Ok(0)
            }
        }
    }
}

/// The sending side's state.
#[derive(Debug, Default)]
struct WriteState {
    /// `shutdown_write` was called: writes are refused.
    shut: bool,
    /// The FIN went out.
    fin_sent: bool,
    timeout: Option<Duration>,
}

impl WriteState {
    fn write(
        &mut self,
        side: &mut impl SendSide,
        failure: &OnceLock<HvSockError>,
        data: &[u8],
    ) -> io::Result<usize> {
        if let Some(e) = failure.get() {
            return Err((*e).into());
        }
        if self.shut {
            return Err(HvSockError::WriteAfterShutdown.into());
        }
        let mut sent = 0;
        for chunk in data.chunks(HVS_SEND_BUF_SIZE) {
            // Wait for the first packet only; then send while there is room.
            let wait = if sent == 0 {
                wait_for(self.timeout)
            } else {
                Wait::Now
            };
            // At most HVS_SEND_BUF_SIZE: fits a u32.
            let header = PipeHeader::data(chunk.len() as u32);
            let parts = [header.as_bytes(), chunk];
            match side.send(&OutgoingPacket::in_band(&parts), wait) {
                Ok(()) => sent += chunk.len(),
                // What went out is reported; the next write meets the error again.
                Err(_) if sent > 0 => break,
                Err(e) => return Err(channel_error(e, io::ErrorKind::BrokenPipe)),
            }
        }
        Ok(sent)
    }

    /// A stream or writer dropped without its FIN sends it now if it fits, without
    /// waiting, as Linux sends one when a socket closes; a failed stream sends nothing.
    fn close(&mut self, side: &mut impl SendSide, failure: &OnceLock<HvSockError>) {
        if self.fin_sent || failure.get().is_some() {
            return;
        }
        let fin = PipeHeader::data(0);
        if side
            .send(&OutgoingPacket::in_band_slice(fin.as_bytes()), Wait::Now)
            .is_ok()
        {
            self.fin_sent = true;
        }
    }

    fn shutdown(&mut self, side: &mut impl SendSide) -> io::Result<()> {
        self.shut = true;
        if self.fin_sent {
            return Ok(());
        }
        let fin = PipeHeader::data(0);
        side.send(
            &OutgoingPacket::in_band_slice(fin.as_bytes()),
            wait_for(self.timeout),
        )
        .map_err(|e| channel_error(e, io::ErrorKind::BrokenPipe))?;
        self.fin_sent = true;
        Ok(())
    }
}
