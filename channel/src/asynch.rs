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

use vmlink_ring::{OutgoingPacket, WaitDecision};

use crate::channel::{Core, Half, Ops, RxState, request_packet};
use crate::doorbell::AsyncDoorbell;
use crate::error::ChannelError;
use crate::link::{PacketRx, PacketTx, Received};

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
        loop {
            let seen = self.generation();
            if let Some(r) = self.try_recv(buf)? {
                return Ok(r);
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
    /// See the public method of the same name.
    pub(crate) async fn send_packet_async(
        &self,
        packet: &OutgoingPacket<'_>,
    ) -> Result<(), ChannelError> {
        let payload = packet.payload.len();
        loop {
            let seen = self.generation();
            match self.try_send_packet(packet) {
                Err(ChannelError::Full) => {}
                other => return other,
            }
            if self.prepare_send_wait(packet.header.len(), payload)? == WaitDecision::Sleep {
                self.event(seen).await?;
            }
        }
    }

    /// See the public method of the same name.
    pub(crate) async fn send_async(&self, payload: &[u8]) -> Result<(), ChannelError> {
        self.send_packet_async(&OutgoingPacket::in_band_slice(payload))
            .await
    }

    /// See the public method of the same name.
    pub(crate) async fn complete_async(
        &self,
        transaction_id: u64,
        payload: &[u8],
    ) -> Result<(), ChannelError> {
        self.send_packet_async(&crate::channel::completion(transaction_id, &[payload]))
            .await
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
