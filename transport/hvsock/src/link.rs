//! vmlink packets over a connected stream socket: a packet link, so the whole channel API
//! (requests and completions, `call` with many in flight, batches, flow control, blocking
//! and polling waits, states, counters) runs where no memory can be shared.
//!
//! [`stream_endpoint`] turns a connected socket (a Unix stream socket, an AF_VSOCK or hybrid
//! vsock connection from [`socket`](crate::socket), a TCP connection) into an
//! [`Endpoint`] over three parts that share the socket:
//!
//! - [`StreamTx`] frames each packet ([`frame`](crate::frame)) into a send buffer of
//!   [`StreamConfig::send_buffer`] bytes; `commit` writes what the socket takes without
//!   blocking. Committed bytes the socket did not take stay in the buffer and go out as
//!   the socket takes them: written by this side's next operation or wait, and by a
//!   flusher thread the link starts (it sleeps until a commit leaves bytes behind), so what
//!   was committed reaches the peer even if this side never comes back. A full socket is
//!   back-pressure, never an unbounded queue: a send finds [`ChannelError::Full`] once the
//!   buffer holds no room for its frame, and a blocking send waits for the socket to drain.
//! - [`StreamRx`] reads the socket into a [`FrameReader`] of
//!   [`StreamConfig::max_frame`] bytes and hands out whole frames only. Garbage, a length
//!   past the largest frame, a packet type a stream does not carry (GPA-direct) or a stream
//!   that ends inside a frame fails the channel with [`FailureCause::Frame`]; nothing of
//!   such a frame is delivered.
//! - [`StreamBell`], the doorbell: data on a socket wakes its reader by itself, so
//!   `signal` has nothing to ring; `wait` writes what is pending, reads what arrived, and
//!   sleeps in `poll` on the socket (readable while the receive buffer lacks a whole frame,
//!   writable while committed bytes wait) and on an eventfd that `wake_local` rings.
//!
//! The peer closing the socket (end of stream between frames, a reset, a broken pipe) is
//! the channel's `PeerClosed`: what it sent is still received, then every call says
//! `Closed`. Dropping an endpoint writes the committed bytes still held (waiting up to
//! [`StreamConfig::linger`]) and shuts the socket down for writing, so the peer sees the
//! end of the stream even if another process holds a copy of the socket.
//!
//! GPA-direct packets name guest pages, which mean nothing on a socket: sending one is
//! [`ChannelError::Unsupported`]. The counters count each packet's VMBus length
//! (descriptor, extra header, padded payload), as over a ring, not the frame's.
//!
//! All socket I/O is `send` / `recv` with `MSG_DONTWAIT` (and `MSG_NOSIGNAL`), so the socket
//! need not be set non-blocking and a peer that left raises no `SIGPIPE`. Linux only.
//!
//! # Examples
//!
//! ```
//! use std::os::unix::net::UnixStream;
//! use vmlink_channel::{Config, Wait};
//! use vmlink_hvsock::link::{StreamConfig, stream_endpoint};
//!
//! let (a, b) = UnixStream::pair()?;
//! let host = stream_endpoint(a, StreamConfig::default(), Config::default())?;
//! let guest = stream_endpoint(b, StreamConfig::default(), Config::default())?;
//! let server = std::thread::spawn(move || {
//!     let mut buf = [0u8; 64];
//!     let request = guest.recv(&mut buf, Wait::Forever)?;
//!     guest.complete(request.transaction_id, b"pong", Wait::Forever)
//! });
//! let mut response = [0u8; 8];
//! host.call(b"ping", &mut response, Wait::Forever)?;
//! assert_eq!(&response[..4], b"pong");
//! server.join().unwrap()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags};
use nix::sys::socket::{MsgFlags, Shutdown};
use vmlink_channel::fd::{EventFd, poll_until};
use vmlink_channel::{
    ChannelError, Config, Doorbell, DoorbellError, Endpoint, FailureCause, OutgoingPacket,
    PacketRx, PacketTx, PacketType, Payload, Received, Wake,
};
use vmlink_ring::protocol::{FLAG_COMPLETION_REQUESTED, packet_len};
use vmlink_ring::{Signal, WaitDecision, WriteError};
use zerocopy::IntoBytes;
use zerocopy::byteorder::little_endian::{U16, U32, U64};

use crate::frame::{FRAME_HEADER_LEN, FrameHeader, FrameReader, frame_len};

/// Bytes a VMBus descriptor takes: the counters and `max_packet_len` speak in VMBus
/// lengths, a frame's header is 8 bytes longer.
const DESCRIPTOR_LEN: usize = 16;

/// How a stream link is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamConfig {
    /// The largest frame (24-byte frame header, extra header, padded payload) this side
    /// sends and takes. Both sides must agree: a frame past the receiver's largest fails its
    /// channel. The receive buffer is this long.
    pub max_frame: usize,
    /// Bytes of frames this side holds while the socket takes no more: the most a peer that
    /// stops reading costs us. At least `max_frame`.
    pub send_buffer: usize,
    /// How long dropping the link waits for the socket to take committed frames still held.
    pub linger: Duration,
}

impl Default for StreamConfig {
    /// Frames up to 256 KiB, a 256 KiB send buffer, a one-second linger.
    fn default() -> Self {
        Self {
            max_frame: 256 * 1024,
            send_buffer: 256 * 1024,
            linger: Duration::from_secs(1),
        }
    }
}

impl StreamConfig {
    /// A configuration for frames up to `max_frame` bytes, with a send buffer of the same
    /// size.
    pub fn with_max_frame(self, max_frame: usize) -> Self {
        Self {
            max_frame,
            send_buffer: max_frame,
            ..self
        }
    }

    /// The same with a send buffer of `bytes`.
    pub fn with_send_buffer(self, bytes: usize) -> Self {
        Self {
            send_buffer: bytes,
            ..self
        }
    }

    /// The same with a linger of `linger`.
    pub fn with_linger(self, linger: Duration) -> Self {
        Self { linger, ..self }
    }
}

/// An endpoint over a stream socket.
pub type StreamEndpoint = Endpoint<StreamTx, StreamRx, StreamBell>;

/// An endpoint over the connected stream socket `socket` (see the [module docs](self)).
///
/// Errors: a configuration whose largest frame is below 32 bytes (a frame header and one
/// 8-byte payload) or whose send buffer is smaller than the largest frame
/// (`InvalidInput`), or the eventfd could not be made.
pub fn stream_endpoint(
    socket: impl Into<OwnedFd>,
    link: StreamConfig,
    config: Config,
) -> io::Result<StreamEndpoint> {
    let (tx, rx, bell) = stream_link(socket, link)?;
    Ok(Endpoint::over(tx, rx, bell, config))
}

/// The three parts of a stream link over `socket`, for [`Endpoint::over`] (see
/// [`stream_endpoint`]).
pub fn stream_link(
    socket: impl Into<OwnedFd>,
    link: StreamConfig,
) -> io::Result<(StreamTx, StreamRx, StreamBell)> {
    if link.max_frame < FRAME_HEADER_LEN + 8 || link.send_buffer < link.max_frame {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a stream link needs frames of at least 32 bytes and a send buffer at least \
                 that long: max_frame {}, send_buffer {}",
                link.max_frame, link.send_buffer
            ),
        ));
    }
    let shared = Arc::new(Shared {
        socket: socket.into(),
        tx: Mutex::new(TxBuf {
            buf: vec![0; link.send_buffer].into_boxed_slice(),
            sent: 0,
            committed: 0,
            end: 0,
            error: None,
            flush_asked: false,
        }),
        rx: Mutex::new(FrameReader::new(link.max_frame)),
        wake: EventFd::new()?,
        gone: AtomicBool::new(false),
        progress: AtomicU64::new(0),
        armed: AtomicU64::new(0),
        sleeping: AtomicBool::new(false),
        flush_bell: EventFd::new()?,
        linger: link.linger,
    });
    spawn_flusher(&shared)?;
    Ok((
        StreamTx {
            shared: shared.clone(),
            max_frame: link.max_frame,
        },
        StreamRx {
            shared: shared.clone(),
            head: None,
            consumed: false,
        },
        StreamBell {
            shared,
            #[cfg(feature = "tokio")]
            reactor: std::sync::OnceLock::new(),
        },
    ))
}

/// Starts the thread that writes committed bytes the socket did not take at once, so that
/// what was committed reaches the peer even when no thread of this side touches the link
/// again (a sender that returns to other work, a process about to idle). It sleeps on an
/// eventfd until a commit leaves bytes behind, then on the socket's room until they are out;
/// it holds the link only while it writes, and leaves when the link is dropped.
fn spawn_flusher(shared: &Arc<Shared>) -> io::Result<()> {
    let link = Arc::downgrade(shared);
    let bell = shared.flush_bell.try_clone()?;
    let socket = shared.socket.try_clone()?;
    std::thread::Builder::new()
        .name("vmlink-stream-flush".into())
        .spawn(move || flusher(&link, &bell, &socket))?;
    Ok(())
}

fn flusher(link: &Weak<Shared>, bell: &EventFd, socket: &OwnedFd) {
    let mut pending = false;
    loop {
        let mut fds = [
            PollFd::new(bell.as_fd(), PollFlags::POLLIN),
            PollFd::new(socket.as_fd(), PollFlags::POLLOUT),
        ];
        let n = if pending { 2 } else { 1 };
        if poll_until(&mut fds[..n], None).is_err() || bell.drain().is_err() {
            return;
        }
        // The link was dropped (its drop rings the bell on its way out): leave.
        let Some(shared) = link.upgrade() else { return };
        let mut tx = lock(&shared.tx);
        shared.flush(&mut tx, false);
        pending = tx.sent < tx.committed && tx.error.is_none();
        if !pending {
            tx.flush_asked = false;
        }
    }
}

/// What the three parts share: the socket and both buffers.
#[derive(Debug)]
struct Shared {
    socket: OwnedFd,
    tx: Mutex<TxBuf>,
    rx: Mutex<FrameReader>,
    /// Rung by `wake_local`.
    wake: EventFd,
    /// The peer left: the stream ended, or the connection was reset.
    gone: AtomicBool,
    /// Bumped whenever bytes move either way, by any thread: the doorbell's "ring". Data a
    /// receiving thread reads, or room a sending thread makes, is an event a thread asleep
    /// in the doorbell may wait for, and its socket no longer shows it.
    progress: AtomicU64,
    /// The progress count when a waiter last armed (`prepare_wait`).
    armed: AtomicU64,
    /// A thread is in the doorbell's wait: movers ring the eventfd to wake it.
    sleeping: AtomicBool,
    /// Rung when committed bytes wait for the socket: wakes the flusher thread.
    flush_bell: EventFd,
    linger: Duration,
}

/// Frames to send: `[0, sent)` written, `[sent, committed)` committed and waiting for the
/// socket, `[committed, end)` pushed and not yet committed.
#[derive(Debug)]
struct TxBuf {
    buf: Box<[u8]>,
    sent: usize,
    committed: usize,
    end: usize,
    /// Why the socket takes nothing more (`Closed`, or a failure), returned by every push.
    error: Option<ChannelError>,
    /// The flusher thread was asked to write what waits (and has not found it all out).
    flush_asked: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection reset or a broken pipe: the peer left.
fn peer_left(e: Errno) -> bool {
    matches!(e, Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN)
}

impl Shared {
    fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    fn mark_gone(&self, bell: bool) {
        self.gone.store(true, Ordering::Release);
        self.moved(bell);
    }

    /// Bytes moved (or the stream ended): counts the event and, unless the doorbell's own
    /// wait moved them (`bell`), wakes a thread asleep there. The count and the sleeper's
    /// flag are sequentially consistent on both sides (the doorbell raises the flag, then
    /// compares the count with the one its waiter armed at), so either the sleeper sees the
    /// count move or this sees the flag and rings.
    fn moved(&self, bell: bool) {
        self.progress.fetch_add(1, Ordering::SeqCst);
        if !bell && self.sleeping.load(Ordering::SeqCst) {
            let _ = self.wake.signal();
        }
    }

    /// A waiter armed: progress from here on is an event for it.
    fn arm(&self) {
        self.armed
            .store(self.progress.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Writes committed bytes until the socket takes no more; returns how many went.
    fn flush(&self, tx: &mut TxBuf, bell: bool) -> usize {
        let mut moved = 0;
        while tx.sent < tx.committed && tx.error.is_none() {
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            match nix::sys::socket::send(
                self.socket.as_raw_fd(),
                &tx.buf[tx.sent..tx.committed],
                flags,
            ) {
                Ok(n) => {
                    tx.sent += n;
                    moved += n;
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => break,
                Err(e) if peer_left(e) => {
                    self.mark_gone(bell);
                    tx.error = Some(ChannelError::Closed);
                }
                Err(e) => tx.error = Some(ChannelError::Failed(FailureCause::Io(e as i32))),
            }
        }
        if tx.sent == tx.end {
            (tx.sent, tx.committed, tx.end) = (0, 0, 0);
        }
        if moved > 0 {
            self.moved(bell);
        }
        moved
    }

    /// Reads what the socket has into the receive buffer, unless a whole frame is already
    /// there; returns true when something arrived or the stream ended.
    fn fill(&self, rx: &mut FrameReader, bell: bool) -> Result<bool, ChannelError> {
        if rx.at_eof() || whole_frame(rx)? {
            return Ok(false);
        }
        let mut socket = SocketRead(self.fd());
        loop {
            return match rx.fill(&mut socket) {
                Ok(0) if rx.at_eof() => {
                    self.mark_gone(bell);
                    Ok(true)
                }
                Ok(n) => {
                    if n > 0 {
                        self.moved(bell);
                    }
                    Ok(n > 0)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
                Err(e) => match e.raw_os_error().map(Errno::from_raw) {
                    Some(errno) if peer_left(errno) => {
                        rx.finish();
                        self.mark_gone(bell);
                        Ok(true)
                    }
                    errno => Err(ChannelError::Failed(FailureCause::Io(
                        errno.map_or(0, |e| e as i32),
                    ))),
                },
            };
        }
    }
}

/// True when a whole, valid frame waits in `rx`; a refused one is the channel's failure.
fn whole_frame(rx: &mut FrameReader) -> Result<bool, ChannelError> {
    rx.next_frame()
        .map(|f| f.is_some())
        .map_err(|e| ChannelError::Failed(FailureCause::Frame(e)))
}

impl Drop for Shared {
    fn drop(&mut self) {
        let deadline = Instant::now() + self.linger;
        let mut tx = lock(&self.tx);
        // Pushed and never committed: not the peer's.
        tx.end = tx.committed;
        loop {
            self.flush(&mut tx, true);
            if tx.sent >= tx.committed || tx.error.is_some() {
                break;
            }
            let mut fds = [PollFd::new(self.fd(), PollFlags::POLLOUT)];
            if !matches!(poll_until(&mut fds, Some(deadline)), Ok(n) if n > 0) {
                break;
            }
        }
        // The end of the stream, even where another process holds a copy of the socket.
        let _ = nix::sys::socket::shutdown(self.socket.as_raw_fd(), Shutdown::Write);
        // The flusher finds the link gone and leaves.
        let _ = self.flush_bell.signal();
    }
}

/// `recv` without blocking, as `std::io::Read` for [`FrameReader::fill`].
struct SocketRead<'a>(BorrowedFd<'a>);

impl io::Read for SocketRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        nix::sys::socket::recv(self.0.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT)
            .map_err(io::Error::from)
    }
}

/// The sending half of a stream link: frames in a bounded send buffer.
#[derive(Debug)]
pub struct StreamTx {
    shared: Arc<Shared>,
    max_frame: usize,
}

impl StreamTx {
    /// True when `len` more bytes fit behind what the buffer holds (moving the unsent
    /// bytes to the front if that makes the room).
    fn make_room(tx: &mut TxBuf, len: usize) -> bool {
        if tx.buf.len() - tx.end >= len {
            return true;
        }
        if tx.buf.len() - (tx.end - tx.sent) < len {
            return false;
        }
        tx.buf.copy_within(tx.sent..tx.end, 0);
        tx.end -= tx.sent;
        tx.committed -= tx.sent;
        tx.sent = 0;
        true
    }
}

impl PacketTx for StreamTx {
    fn max_packet_len(&self) -> usize {
        self.max_frame - FRAME_HEADER_LEN + DESCRIPTOR_LEN
    }

    fn push(&mut self, packet: &OutgoingPacket<'_>) -> Result<usize, ChannelError> {
        let meta = packet.meta;
        let (h, p) = (packet.header.len(), packet.payload.len());
        if h % 8 != 0 {
            return Err(ChannelError::InvalidRequest(WriteError::HeaderMisaligned {
                len: h,
            }));
        }
        if meta.flags & !FLAG_COMPLETION_REQUESTED != 0 {
            return Err(ChannelError::InvalidRequest(WriteError::UnknownFlags {
                flags: meta.flags,
            }));
        }
        if meta.packet_type == PacketType::GpaDirect {
            return Err(ChannelError::Unsupported {
                what: "GPA-direct packets",
            });
        }
        let vmbus_len = packet_len(h, p).unwrap_or(usize::MAX);
        let len = frame_len(h, p);
        if len > self.max_frame {
            return Err(ChannelError::TooLarge {
                len: vmbus_len,
                max: self.max_packet_len(),
            });
        }
        let mut tx = lock(&self.shared.tx);
        if let Some(e) = tx.error {
            return Err(e);
        }
        if !Self::make_room(&mut tx, len) {
            // Room may come from what the socket takes now.
            self.shared.flush(&mut tx, false);
            if !Self::make_room(&mut tx, len) {
                return Err(tx.error.unwrap_or(ChannelError::Full));
            }
        }
        let head = FrameHeader {
            packet_type: U16::new(meta.packet_type.raw()),
            flags: U16::new(meta.flags),
            header_len: U32::new(h as u32),
            payload_len: U32::new(p.next_multiple_of(8) as u32),
            reserved: U32::new(0),
            transaction_id: U64::new(meta.transaction_id),
        };
        let start = tx.end;
        let out = &mut tx.buf[start..start + len];
        let (fh, rest) = out.split_at_mut(FRAME_HEADER_LEN);
        fh.copy_from_slice(head.as_bytes());
        let (hdr, body) = rest.split_at_mut(h);
        hdr.copy_from_slice(packet.header);
        let mut at = 0;
        let mut put = |part: &[u8]| {
            body[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        };
        match packet.payload {
            Payload::Bytes(b) => put(b),
            Payload::Gather(parts) => parts.iter().for_each(|b| put(b)),
        }
        body[at..].fill(0);
        tx.end += len;
        Ok(vmbus_len)
    }

    fn commit(&mut self) -> Signal {
        let mut tx = lock(&self.shared.tx);
        if tx.committed == tx.end {
            return Signal::NONE;
        }
        tx.committed = tx.end;
        self.shared.flush(&mut tx, false);
        if tx.sent < tx.committed && tx.error.is_none() && !tx.flush_asked {
            // The rest goes out without waiting for this side to come back.
            tx.flush_asked = true;
            let _ = self.shared.flush_bell.signal();
        }
        // The bytes are the peer's wake-up; the doorbell's `signal` has nothing to add.
        Signal::NEEDED
    }

    fn rollback(&mut self) {
        let mut tx = lock(&self.shared.tx);
        tx.end = tx.committed;
    }

    fn prepare_wait(
        &mut self,
        header_len: usize,
        payload_len: usize,
    ) -> Result<(WaitDecision, Signal), ChannelError> {
        let signal = self.commit();
        self.shared.arm();
        let mut tx = lock(&self.shared.tx);
        self.shared.flush(&mut tx, false);
        if let Some(e) = tx.error {
            return Err(e);
        }
        let room = Self::make_room(&mut tx, frame_len(header_len, payload_len));
        // Sleeping on the doorbell watches the socket for room while bytes wait.
        let decision = if room {
            WaitDecision::Ready
        } else {
            WaitDecision::Sleep
        };
        Ok((decision, signal))
    }
}

/// The receiving half of a stream link: whole frames out of the receive buffer.
#[derive(Debug)]
pub struct StreamRx {
    shared: Arc<Shared>,
    /// The frame last peeked at.
    head: Option<Received>,
    /// Frames were consumed since the last commit.
    consumed: bool,
}

impl StreamRx {
    fn read(&mut self, header: bool, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError> {
        let mut rx = lock(&self.shared.rx);
        let frame = match (self.head, rx.next_frame()) {
            (Some(_), Ok(Some(f))) => f,
            _ => {
                return Err(ChannelError::OutOfBounds {
                    offset,
                    len: buf.len(),
                    size: 0,
                });
            }
        };
        let region = if header { frame.header } else { frame.payload };
        let src = offset
            .checked_add(buf.len())
            .and_then(|end| region.get(offset..end))
            .ok_or(ChannelError::OutOfBounds {
                offset,
                len: buf.len(),
                size: region.len(),
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    /// True when a whole frame is there, after reading what arrived if none was.
    fn has_frame(&self) -> Result<bool, ChannelError> {
        let mut rx = lock(&self.shared.rx);
        self.shared.fill(&mut rx, false)?;
        whole_frame(&mut rx)
    }
}

impl PacketRx for StreamRx {
    fn peek(&mut self) -> Result<Option<Received>, ChannelError> {
        if self.head.is_some() {
            return Ok(self.head);
        }
        let mut rx = lock(&self.shared.rx);
        // Reads only when no whole frame is buffered.
        self.shared.fill(&mut rx, false)?;
        let frame = rx
            .next_frame()
            .map_err(|e| ChannelError::Failed(FailureCause::Frame(e)))?;
        self.head = frame.map(|f| Received {
            // The reader let through only the types a stream carries.
            packet_type: PacketType::from_raw(f.packet_type).unwrap_or(PacketType::InBand),
            transaction_id: f.transaction_id,
            completion_requested: f.flags & FLAG_COMPLETION_REQUESTED != 0,
            header_len: f.header.len(),
            payload_len: f.payload.len(),
        });
        Ok(self.head)
    }

    fn read_header(&mut self, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError> {
        self.read(true, offset, buf)
    }

    fn read_payload(&mut self, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError> {
        self.read(false, offset, buf)
    }

    fn consume(&mut self) {
        if self.head.take().is_some() {
            lock(&self.shared.rx).consume();
            self.consumed = true;
        }
    }

    fn has_uncommitted(&self) -> bool {
        self.consumed
    }

    fn commit(&mut self) -> Signal {
        // Consumed frames free our own buffer; the peer learns of room from the socket.
        self.consumed = false;
        Signal::NONE
    }

    fn known_available(&self) -> bool {
        self.head.is_some() || whole_frame(&mut lock(&self.shared.rx)).unwrap_or(true)
    }

    fn poll_available(&mut self) -> bool {
        self.head.is_some() || self.has_frame().unwrap_or(true)
    }

    fn mask_interrupts(&mut self) {}

    fn prepare_wait(&mut self) -> Result<(WaitDecision, Signal), ChannelError> {
        // No read here: the doorbell's wait reads the socket before it sleeps, and the
        // socket's readiness is level-triggered, so nothing that arrives is missed; what
        // another thread of this side reads from here on is counted as progress.
        self.shared.arm();
        let ready = self.head.is_some() || whole_frame(&mut lock(&self.shared.rx))?;
        let decision = if ready {
            WaitDecision::Ready
        } else {
            WaitDecision::Sleep
        };
        Ok((decision, Signal::NONE))
    }
}

impl Shared {
    fn gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }
}

/// The doorbell of a stream link: the socket itself, and an eventfd for wakes from this
/// side's own threads. With feature `tokio` it is also an
/// [`AsyncDoorbell`](vmlink_channel::AsyncDoorbell): the first async wait registers a
/// copy of the socket and of the eventfd with the reactor of the tokio runtime it runs
/// in, and the link stays bound to that runtime.
#[derive(Debug)]
pub struct StreamBell {
    shared: Arc<Shared>,
    #[cfg(feature = "tokio")]
    reactor: std::sync::OnceLock<asynch::Reactor>,
}

impl StreamBell {
    /// Writes what is pending and, with `read`, reads what arrived (counted as progress);
    /// returns the socket events worth sleeping on.
    fn pump(&self, read: bool) -> PollFlags {
        let mut events = PollFlags::empty();
        {
            let mut tx = lock(&self.shared.tx);
            self.shared.flush(&mut tx, true);
            if tx.sent < tx.committed && tx.error.is_none() {
                events |= PollFlags::POLLOUT;
            }
        }
        let mut rx = lock(&self.shared.rx);
        if read && self.shared.fill(&mut rx, true).is_err() {
            // The receive path reports it; wake it.
            self.shared.moved(true);
        }
        if !rx.at_eof() && !whole_frame(&mut rx).unwrap_or(true) {
            events |= PollFlags::POLLIN;
        }
        events
    }
}

impl StreamBell {
    /// The wait, with `sleeping` raised.
    fn wait_awake(&self, timeout: Option<Duration>) -> Result<Wake, DoorbellError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        // The first look reads nothing: the receive path has just looked (`peek`), and what
        // arrives since keeps the socket readable, which the poll sees (a system call saved
        // per sleep). After a poll, the look reads.
        let mut read = false;
        loop {
            let events = self.pump(read);
            read = true;
            // Bytes moved since a waiter armed, by us just now or by any thread of this
            // side: its socket no longer shows them, so this is the ring.
            let now = self.shared.progress.load(Ordering::SeqCst);
            if self.shared.armed.swap(now, Ordering::SeqCst) != now {
                return Ok(Wake::Signalled);
            }
            if self.shared.gone() {
                return Err(DoorbellError::PeerClosed);
            }
            // A wake since the last wait (from this side's threads, or a mover that saw us
            // here) keeps the eventfd readable, so the poll returns at once for it.
            let wake = PollFd::new(self.shared.wake.as_fd(), PollFlags::POLLIN);
            let mut fds = [wake, PollFd::new(self.shared.fd(), events)];
            // A socket we want nothing of stays out: its hang-up would wake us for nothing.
            let n = if events.is_empty() { 1 } else { 2 };
            match poll_until(&mut fds[..n], deadline) {
                Ok(0) => return Ok(Wake::TimedOut),
                Ok(_) => {}
                Err(e) => return Err(DoorbellError::Os(e as i32)),
            }
            if fds[0].any().unwrap_or(true) && self.shared.wake.drain()? {
                return Ok(Wake::Signalled);
            }
        }
    }
}

impl Doorbell for StreamBell {
    fn signal(&self) -> Result<(), DoorbellError> {
        if self.shared.gone() {
            return Err(DoorbellError::PeerClosed);
        }
        Ok(())
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<Wake, DoorbellError> {
        self.shared.sleeping.store(true, Ordering::SeqCst);
        let woke = self.wait_awake(timeout);
        self.shared.sleeping.store(false, Ordering::SeqCst);
        woke
    }

    fn wake_local(&self) -> Result<(), DoorbellError> {
        self.shared.wake.signal()
    }

    fn peer_closed(&self) -> bool {
        self.shared.gone()
    }
}

#[cfg(feature = "tokio")]
mod asynch {
    use std::io;
    use std::os::fd::OwnedFd;
    use std::sync::atomic::Ordering;
    use std::task::{Context, Poll};

    use nix::errno::Errno;
    use nix::poll::PollFlags;
    use tokio::io::Interest;
    use tokio::io::unix::AsyncFd;
    use vmlink_channel::fd::register_owned;
    use vmlink_channel::{AsyncDoorbell, DoorbellError};

    use super::StreamBell;

    /// Copies of the socket and the eventfd on tokio's reactor.
    #[derive(Debug)]
    pub(super) struct Reactor {
        socket: AsyncFd<OwnedFd>,
        wake: AsyncFd<OwnedFd>,
    }

    fn os(e: &io::Error) -> DoorbellError {
        DoorbellError::Os(e.raw_os_error().unwrap_or(0))
    }

    impl Reactor {
        fn new(bell: &StreamBell) -> io::Result<Self> {
            let both = Interest::READABLE.add(Interest::WRITABLE);
            let wake = OwnedFd::from(bell.shared.wake.try_clone()?);
            Ok(Self {
                socket: register_owned(bell.shared.socket.try_clone()?, both)?,
                wake: register_owned(wake, Interest::READABLE)?,
            })
        }
    }

    impl AsyncDoorbell for StreamBell {
        fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<Result<(), DoorbellError>> {
            let reactor = match self.reactor.get() {
                Some(r) => r,
                None => {
                    if tokio::runtime::Handle::try_current().is_err() {
                        return Poll::Ready(Err(DoorbellError::Os(Errno::ENOTSUP as i32)));
                    }
                    match Reactor::new(self) {
                        // A racing first poll may have registered meanwhile; either works.
                        Ok(r) => self.reactor.get_or_init(|| r),
                        Err(e) => return Poll::Ready(Err(os(&e))),
                    }
                }
            };
            // A task that returns `Pending` is asleep here: movers ring the eventfd.
            self.shared.sleeping.store(true, Ordering::SeqCst);
            let woke = self.poll_awake(reactor, cx);
            if woke.is_ready() {
                self.shared.sleeping.store(false, Ordering::SeqCst);
            }
            woke
        }
    }

    impl StreamBell {
        /// One look, as the blocking wait's loop takes: readiness first (registering the
        /// waker where there is none), then the I/O, then readiness that proved stale is
        /// cleared and looked at again, so no edge falls between the look and the waker.
        fn poll_awake(&self, r: &Reactor, cx: &mut Context<'_>) -> Poll<Result<(), DoorbellError>> {
            loop {
                match r.wake.poll_read_ready(cx) {
                    Poll::Ready(Ok(mut guard)) => {
                        if self.shared.wake.drain()? {
                            return Poll::Ready(Ok(()));
                        }
                        guard.clear_ready();
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(os(&e))),
                    Poll::Pending => {}
                }
                let readable = r.socket.poll_read_ready(cx);
                let writable = r.socket.poll_write_ready(cx);
                let events = self.pump(true);
                let now = self.shared.progress.load(Ordering::SeqCst);
                if self.shared.armed.swap(now, Ordering::SeqCst) != now {
                    return Poll::Ready(Ok(()));
                }
                if self.shared.gone() {
                    return Poll::Ready(Err(DoorbellError::PeerClosed));
                }
                let mut again = false;
                for (ready, wanted) in [
                    (readable, events.contains(PollFlags::POLLIN)),
                    (writable, events.contains(PollFlags::POLLOUT)),
                ] {
                    match ready {
                        // The I/O just found nothing there: stale.
                        Poll::Ready(Ok(mut guard)) if wanted => {
                            guard.clear_ready();
                            again = true;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(os(&e))),
                        _ => {}
                    }
                }
                if !again {
                    return Poll::Pending;
                }
            }
        }
    }
}
