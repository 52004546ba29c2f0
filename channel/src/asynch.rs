//! Async waits: futures woken by the doorbell, on any executor.
//!
//! Nothing here needs a runtime: a future that cannot proceed arms its condition in the
//! ring, then registers its waker with the channel's hub and with the doorbell
//! ([`AsyncDoorbell::poll_wait`]). Dropping a future at any await point is safe: no packet
//! is half-taken, and a dropped call keeps its transaction id reserved for the late
//! completion. Deadlines come from the executor (e.g. `tokio::time::timeout`).
//!
//! A sender waiting for space relies on the peer honouring `pending_send_size`; against a
//! peer that may not, put a timeout around the send and retry.

use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll};

use vmlink_ring::{OutgoingPacket, PacketMeta, WaitDecision};

use crate::channel::{Core, Half, Ops, Packet, Probe, RxState, gpa_request_meta, request_packet};
use crate::doorbell::AsyncDoorbell;
use crate::error::ChannelError;
use crate::link::{PacketRx, PacketTx, Received};
use crate::packet::GpaRange;

/// Resolves when the channel's hub moves past a generation.
struct Event<'c, D: AsyncDoorbell> {
    channel: &'c Core<D>,
    seen: u64,
    registered: bool,
}

impl<D: AsyncDoorbell> Future for Event<'_, D> {
    type Output = Result<(), ChannelError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.channel.poll_event(self.seen, cx) {
            Poll::Ready(r) => {
                self.registered = false;
                Poll::Ready(r)
            }
            Poll::Pending => {
                self.registered = true;
                Poll::Pending
            }
        }
    }
}

impl<D: AsyncDoorbell> Drop for Event<'_, D> {
    fn drop(&mut self) {
        if self.registered {
            self.channel.forget_waiter();
        }
    }
}

impl<D: AsyncDoorbell> Core<D> {
    fn event(&self, seen: u64) -> Event<'_, D> {
        Event {
            channel: self,
            seen,
            registered: false,
        }
    }
}

impl<'a, R: PacketRx, D: AsyncDoorbell, TC, RC: Half<Item = RxState<R>>> Ops<'a, D, TC, RC> {
    /// See the public method of the same name.
    pub(crate) async fn recv_async(&self, buf: &mut [u8]) -> Result<Received, ChannelError> {
        self.recv_op_async(|ops| ops.try_recv_as(buf, Probe::State))
            .await
    }

    /// See the public method of the same name.
    pub(crate) async fn recv_with_async<X>(
        &self,
        f: impl FnOnce(&mut Packet<'_>) -> X,
    ) -> Result<X, ChannelError> {
        let mut f = Some(f);
        self.recv_op_async(|ops| {
            let mut out = None;
            ops.recv_batch_once(1, &mut |p| {
                if let Some(f) = f.take() {
                    out = Some(f(p));
                }
            })?;
            Ok(out)
        })
        .await
    }

    /// See the public method of the same name.
    pub(crate) async fn recv_batch_async(
        &self,
        max: usize,
        mut each: impl FnMut(&mut Packet<'_>),
    ) -> Result<usize, ChannelError> {
        self.recv_op_async(|ops| {
            let (n, _) = ops.recv_batch_once(max, &mut each)?;
            Ok((n > 0).then_some(n))
        })
        .await
    }

    /// Runs a receive until it finds something, sleeping asynchronously between tries.
    async fn recv_op_async<X>(
        &self,
        mut op: impl FnMut(&Self) -> Result<Option<X>, ChannelError>,
    ) -> Result<X, ChannelError> {
        loop {
            let seen = self.generation();
            if let Some(x) = op(self)? {
                return Ok(x);
            }
            // Not `prepare_recv_wait`: this wait goes through the hub.
            if self.prepare_wait_for(true)? == WaitDecision::Sleep {
                self.count_receive_sleep();
                self.event(seen).await?;
            }
        }
    }
}

impl<'a, T: PacketTx, D: AsyncDoorbell, TC: Half<Item = T>, RC> Ops<'a, D, TC, RC> {
    /// Sends with flow control, waiting asynchronously for space.
    async fn send_with_async(
        &self,
        header_len: usize,
        payload_len: usize,
        write: &mut (dyn FnMut(&mut T) -> Result<usize, ChannelError> + Send),
    ) -> Result<(), ChannelError> {
        loop {
            let seen = self.generation();
            match self.try_send_with(write) {
                Err(ChannelError::Full) => {}
                other => return other,
            }
            if self.prepare_send_wait(header_len, payload_len)? == WaitDecision::Sleep {
                self.event(seen).await?;
            }
        }
    }

    /// See the public method of the same name.
    pub(crate) async fn send_packet_async(
        &self,
        packet: &OutgoingPacket<'_>,
    ) -> Result<(), ChannelError> {
        let (h, p) = (packet.header.len(), packet.payload.len());
        self.send_with_async(h, p, &mut |w| w.push(packet)).await
    }

    /// See the public method of the same name.
    pub(crate) async fn send_gpa_direct_async(
        &self,
        ranges: &[GpaRange<'_>],
        payload: &[u8],
        meta: PacketMeta,
    ) -> Result<(), ChannelError> {
        let limit = self.gpa_page_limit();
        let header_len =
            crate::packet::gpa_header_len(ranges, limit).map_err(ChannelError::InvalidPacket)?;
        self.send_with_async(header_len, payload.len(), &mut |w| {
            w.push_gpa_direct(ranges, payload, meta, limit)
        })
        .await
    }

    /// See the public method of the same name.
    pub(crate) async fn start_request_async(&self, request: &[u8]) -> Result<u64, ChannelError> {
        let tid = self.alloc_polled()?;
        let parts = [request];
        let packet = request_packet(tid, &parts);
        let sent = self
            .send_with_async(0, request.len(), &mut |w| w.push(&packet))
            .await;
        self.sent_or_freed(tid, sent)
    }

    /// See the public method of the same name.
    pub(crate) async fn start_gpa_request_async(
        &self,
        ranges: &[GpaRange<'_>],
        payload: &[u8],
    ) -> Result<u64, ChannelError> {
        let tid = self.alloc_polled()?;
        let sent = self
            .send_gpa_direct_async(ranges, payload, gpa_request_meta(tid))
            .await;
        self.sent_or_freed(tid, sent)
    }
}

impl<
    'a,
    T: PacketTx,
    R: PacketRx,
    D: AsyncDoorbell,
    TC: Half<Item = T>,
    RC: Half<Item = RxState<R>>,
> Ops<'a, D, TC, RC>
{
    /// See the public method of the same name.
    pub(crate) async fn call_async(
        &self,
        request: &[u8],
        response: &mut [u8],
    ) -> Result<usize, ChannelError> {
        let mut txn = self.begin_call(response.len())?;
        // On error or cancellation, dropping `txn` frees the id: the request never went out.
        self.send_packet_async(&request_packet(txn.tid(), &[request]))
            .await?;
        txn.sent();
        loop {
            let seen = self.generation();
            match self.call_step(&mut txn, response)? {
                crate::channel::CallStep::Done(len) => return Ok(len),
                crate::channel::CallStep::QueueFull => self.event(seen).await?,
                crate::channel::CallStep::Idle => {
                    // Only the ring matters to a caller: queued packets are for receivers.
                    if self.prepare_wait_for(false)? == WaitDecision::Sleep {
                        self.count_receive_sleep();
                        self.event(seen).await?;
                    }
                }
            }
        }
    }
}
