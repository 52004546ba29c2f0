//! [`AsyncHvStream`]: the stream as tokio's `AsyncRead` and `AsyncWrite` (feature `tokio`).

use std::future::Future;
use std::io;
use std::mem;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use vmlink_channel::{AsyncDoorbell, ChannelError, Doorbell, Endpoint, PacketRx, PacketTx, Wait};
use zerocopy::IntoBytes;

use crate::HvSockError;
use crate::stream::{Failure, ReadState, Refused, channel_error, check_packet, read_data};
use crate::wire::{HVS_SEND_BUF_SIZE, PIPE_HEADER_LEN, PipeHeader};

type BoxFuture<X> = Pin<Box<dyn Future<Output = X> + Send>>;

/// What a receive brings back: the stream's buffer, and the data size of the packet read
/// into it (0: FIN).
type Received = (Box<[u8]>, Result<Result<usize, Refused>, ChannelError>);

/// A send in flight: the data bytes it carries, and the future giving back the packet
/// buffer.
type Sending = (usize, BoxFuture<(Box<[u8]>, Result<(), ChannelError>)>);

/// [`HvStream`](crate::HvStream)'s data path as tokio's [`AsyncRead`] and [`AsyncWrite`],
/// over an endpoint whose doorbell is an [`AsyncDoorbell`], shared through an `Arc`.
///
/// The same rules as `HvStream`: packets of at most 4,088 data bytes (one per
/// `poll_write`), reads across packet boundaries from a 16 KiB buffer allocated once, the
/// FIN sent once by `poll_shutdown` (`AsyncWriteExt::shutdown`), `Ok(0)` reads after the
/// peer's FIN, and a bad packet an [`InvalidData`](io::ErrorKind::InvalidData) error
/// wrapping the [`HvSockError`] that fails the stream. Waits are the channel's async
/// twins (`recv_with_async`, `send_async`); each pending operation is one boxed future.
///
/// ```
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// use vmlink_channel::{Config, in_process_channel_pair};
/// use vmlink_hvsock::AsyncHvStream;
///
/// # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
/// let (a, b) = in_process_channel_pair(4 * 4096, Config::default())?;
/// let (mut a, mut b) = (AsyncHvStream::new(a.into()), AsyncHvStream::new(b.into()));
/// a.write_all(b"over tokio").await?;
/// a.shutdown().await?; // FIN
/// let mut got = String::new();
/// b.read_to_string(&mut got).await?;
/// assert_eq!(got, "over tokio");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct AsyncHvStream<T: PacketTx, R: PacketRx, D: Doorbell> {
    endpoint: Arc<Endpoint<T, R, D>>,
    rx: ReadState,
    receiving: Option<BoxFuture<Received>>,
    /// The packet buffer sends are copied into; allocated once, lent to each send.
    packet: Box<[u8]>,
    sending: Option<Sending>,
    shut: bool,
    fin_sent: bool,
    failure: Failure,
}

impl<T, R, D> AsyncHvStream<T, R, D>
where
    T: PacketTx + Send + 'static,
    R: PacketRx + Send + 'static,
    D: AsyncDoorbell + Send + Sync + 'static,
{
    /// A stream over `endpoint`, whose connection is already set up. Allocates the 16 KiB
    /// receive buffer and a 4 KiB packet buffer.
    pub fn new(endpoint: Arc<Endpoint<T, R, D>>) -> Self {
        Self {
            endpoint,
            rx: ReadState::new(),
            receiving: None,
            packet: vec![0; PIPE_HEADER_LEN + HVS_SEND_BUF_SIZE].into_boxed_slice(),
            sending: None,
            shut: false,
            fin_sent: false,
            failure: Failure::default(),
        }
    }

    /// The endpoint the stream runs over.
    pub fn endpoint(&self) -> &Arc<Endpoint<T, R, D>> {
        &self.endpoint
    }

    /// True once the peer's FIN has been received.
    pub fn peer_finished(&self) -> bool {
        self.rx.fin
    }

    /// The bad packet that failed the stream, if one did.
    pub fn failure(&self) -> Option<HvSockError> {
        self.failure.get().copied()
    }

    /// Drives the send in flight, or starts one of `data` (at most a packet's worth; an
    /// empty `data` is the FIN). Returns the data bytes sent.
    fn poll_send(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let (len, future) = self.sending.get_or_insert_with(|| {
            let len = data.len().min(HVS_SEND_BUF_SIZE);
            let mut packet = mem::take(&mut self.packet);
            let end = PIPE_HEADER_LEN + len;
            // At most HVS_SEND_BUF_SIZE: fits a u32.
            packet[..PIPE_HEADER_LEN].copy_from_slice(PipeHeader::data(len as u32).as_bytes());
            packet[PIPE_HEADER_LEN..end].copy_from_slice(&data[..len]);
            let endpoint = Arc::clone(&self.endpoint);
            let future = async move {
                let sent = endpoint.send_async(&packet[..end]).await;
                (packet, sent)
            };
            (len, Box::pin(future))
        });
        let len = *len;
        let (packet, sent) = ready!(future.as_mut().poll(cx));
        (self.packet, self.sending) = (packet, None);
        Poll::Ready(
            sent.map(|()| len)
                .map_err(|e| channel_error(e, io::ErrorKind::BrokenPipe)),
        )
    }
}

impl<T, R, D> AsyncRead for AsyncHvStream<T, R, D>
where
    T: PacketTx + Send + 'static,
    R: PacketRx + Send + 'static,
    D: AsyncDoorbell + Send + Sync + 'static,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.failure.get() {
            return Poll::Ready(Err((*e).into()));
        }
        if this.rx.start == this.rx.end && !this.rx.fin && out.remaining() > 0 {
            let future = this.receiving.get_or_insert_with(|| {
                let endpoint = Arc::clone(&this.endpoint);
                let mut buf = mem::take(&mut this.rx.buf);
                Box::pin(async move {
                    let got = endpoint
                        .recv_with_async(|packet| {
                            let len = check_packet(packet)?;
                            read_data(packet, len, &mut buf)?;
                            Ok(len)
                        })
                        .await;
                    (buf, got)
                })
            });
            let (buf, got) = ready!(future.as_mut().poll(cx));
            (this.rx.buf, this.receiving) = (buf, None);
            match got {
                Ok(Ok(0)) => this.rx.fin = true,
                Ok(Ok(len)) => (this.rx.start, this.rx.end) = (0, len),
                Ok(Err(Refused::Peer(e))) => {
                    let _ = this.failure.set(e);
                    return Poll::Ready(Err(e.into()));
                }
                Ok(Err(Refused::Channel(e))) | Err(e) => {
                    return Poll::Ready(Err(channel_error(e, io::ErrorKind::ConnectionReset)));
                }
            }
        }
        let n = this.rx.drain(out.initialize_unfilled());
        out.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T, R, D> AsyncWrite for AsyncHvStream<T, R, D>
where
    T: PacketTx + Send + 'static,
    R: PacketRx + Send + 'static,
    D: AsyncDoorbell + Send + Sync + 'static,
{
    /// Sends one packet of up to 4,088 bytes of `data`.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.failure.get() {
            return Poll::Ready(Err((*e).into()));
        }
        if this.shut {
            return Poll::Ready(Err(HvSockError::WriteAfterShutdown.into()));
        }
        if data.is_empty() && this.sending.is_none() {
            return Poll::Ready(Ok(0));
        }
        this.poll_send(cx, data)
    }

    /// Nothing to do: a write is over once its packet is published.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Sends the FIN once; later writes fail with `BrokenPipe`.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.shut = true;
        if this.fin_sent {
            return Poll::Ready(Ok(()));
        }
        // A data packet still in flight goes first.
        if matches!(this.sending, Some((len, _)) if len > 0) {
            ready!(this.poll_send(cx, &[]))?;
        }
        ready!(this.poll_send(cx, &[]))?;
        this.fin_sent = true;
        Poll::Ready(Ok(()))
    }
}

impl<T: PacketTx, R: PacketRx, D: Doorbell> Drop for AsyncHvStream<T, R, D> {
    /// Sends the FIN if it was not sent and fits without waiting, as Linux does when a
    /// socket closes (a send still in flight is abandoned first); a failed stream sends
    /// nothing.
    fn drop(&mut self) {
        self.sending = None;
        if self.fin_sent || self.failure.get().is_some() {
            return;
        }
        let fin = PipeHeader::data(0);
        let _ = self.endpoint.send(fin.as_bytes(), Wait::Now);
    }
}

impl<T: PacketTx, R: PacketRx, D: AsyncDoorbell> core::fmt::Debug for AsyncHvStream<T, R, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("AsyncHvStream")
            .field("endpoint", &self.endpoint)
            .field("rx", &self.rx)
            .field("shut", &self.shut)
            .field("fin_sent", &self.fin_sent)
            .field("failure", &self.failure.get())
            .finish_non_exhaustive()
    }
}
