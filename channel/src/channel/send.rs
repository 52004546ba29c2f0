//! Sending: single packets, in place, GPA-direct, batches.

use super::*;

impl<'a, T: PacketTx, D: Doorbell, TC: Half<Item = T>, RC> Ops<'a, D, TC, RC> {
    // ---- sending -----------------------------------------------------------------------

    /// Runs `write` on the sending half and publishes; `Full` if it does not fit now,
    /// `Closed` instead when the doorbell says the peer has left. The doorbell (maybe a
    /// system call) is asked on the first full look after a send went out and on every
    /// 64th after that.
    pub(crate) fn try_send_with(
        &self,
        write: &mut dyn FnMut(&mut T) -> Result<usize, ChannelError>,
    ) -> Result<(), ChannelError> {
        let looks = &self.live.counters.tx.full_looks;
        match self.send_once(write) {
            Ok(()) => {
                progressed(looks);
                Ok(())
            }
            Err(ChannelError::Full) if probe_due(looks) && self.peer_gone() => {
                Err(ChannelError::Closed)
            }
            other => other,
        }
    }

    /// [`try_send_with`](Self::try_send_with) without asking the doorbell (maybe a system
    /// call) when the ring is full.
    pub(crate) fn send_once(
        &self,
        write: &mut dyn FnMut(&mut T) -> Result<usize, ChannelError>,
    ) -> Result<(), ChannelError> {
        self.check_send()?;
        let signal = {
            let mut tx = self.tx.lock();
            let len = write(&mut tx).map_err(|e| self.link_error(e))?;
            bump_held(&self.live.counters.tx.packets_sent, 1);
            bump_held(&self.live.counters.tx.bytes_sent, len as u64);
            tx.commit()
        };
        self.signal(signal)
    }

    /// Sends with or without waiting for space.
    pub(crate) fn send_until(
        &self,
        header_len: usize,
        payload_len: usize,
        wait: Wait,
        write: &mut dyn FnMut(&mut T) -> Result<usize, ChannelError>,
    ) -> Result<(), ChannelError> {
        #[cfg(feature = "std")]
        if let Ok(deadline) = wait.deadline() {
            return self.send_with(header_len, payload_len, deadline, write);
        }
        let _ = (header_len, payload_len, wait);
        self.try_send_with(write)
    }

    pub(crate) fn send_gpa_direct_until(
        &self,
        ranges: &[GpaRange<'_>],
        payload: &[u8],
        meta: PacketMeta,
        wait: Wait,
    ) -> Result<(), ChannelError> {
        let limit = self.config.gpa_page_limit;
        // The header's length, for a wait for space; a malformed list is refused here.
        let header_len =
            crate::packet::gpa_header_len(ranges, limit).map_err(ChannelError::InvalidPacket)?;
        self.send_until(header_len, payload.len(), wait, &mut |w| {
            w.push_gpa_direct(ranges, payload, meta, limit)
        })
    }

    /// See the public method of the same name.
    pub(crate) fn batch(&self) -> Result<SendBatch<'a, T, D, TC::Guard<'a>>, ChannelError> {
        self.check_send()?;
        Ok(SendBatch {
            channel: self.core,
            tx: self.tx.lock(),
            packets: 0,
            bytes: 0,
        })
    }

    /// See the public method of the same name.
    pub(crate) fn prepare_send_wait(
        &self,
        header_len: usize,
        payload_len: usize,
    ) -> Result<WaitDecision, ChannelError> {
        bump(&self.live.counters.tx.send_waits, 1);
        let (decision, signal) = {
            let mut tx = self.tx.lock();
            tx.prepare_wait(header_len, payload_len)
                .map_err(|e| self.link_error(e))?
        };
        self.signal(signal)?;
        Ok(decision)
    }
}

impl<'a, R: PacketRx, D: Doorbell, TC, RC: Half<Item = RxState<R>>> Ops<'a, D, TC, RC> {
    /// Arms the reader for sleeping: unmask interrupts, fence, look again. Returns true
    /// when it is safe to sleep.
    pub(crate) fn arm_reader(&self, rx: &mut RxState<R>) -> Result<bool, ChannelError> {
        rx.spin_masked = false;
        let (decision, signal) = rx.link.prepare_wait().map_err(|e| self.link_error(e))?;
        self.signal(signal)?;
        Ok(decision == WaitDecision::Sleep)
    }

    /// See the public method of the same name.
    pub(crate) fn mask_interrupts(&self) {
        self.rx.lock().link.mask_interrupts();
    }

    /// See the public method of the same name.
    pub(crate) fn prepare_recv_wait(&self) -> Result<WaitDecision, ChannelError> {
        self.external_waits.store(true, Ordering::SeqCst);
        self.prepare_wait_for(true)
    }

    /// Arms the reader; with `queued`, packets waiting in the channel's queue count as
    /// something to receive (for receivers; callers wait only for the ring).
    pub(crate) fn prepare_wait_for(&self, queued: bool) -> Result<WaitDecision, ChannelError> {
        let mut rx = self.rx.lock();
        #[cfg(feature = "alloc")]
        if queued && !rx.queue.is_empty() {
            return Ok(WaitDecision::Ready);
        }
        #[cfg(not(feature = "alloc"))]
        let _ = queued;
        Ok(if self.arm_reader(&mut rx)? {
            WaitDecision::Sleep
        } else {
            WaitDecision::Ready
        })
    }
}

impl<'a, M: RingMem, D: Doorbell, TC: Half<Item = RingTx<M>>, RC> Ops<'a, D, TC, RC> {
    pub(crate) fn send_in_place_until<X>(
        &self,
        meta: PacketMeta,
        header_len: usize,
        payload_len: usize,
        wait: Wait,
        fill: impl FnOnce(&mut WriteSlot<'_, M>) -> X,
    ) -> Result<X, ChannelError> {
        let mut fill = Some(fill);
        let mut out = None;
        self.send_until(header_len, payload_len, wait, &mut |w| {
            // `fill` is taken only once the reservation succeeded: a full ring keeps it for
            // the next try.
            let (r, len) = w.push_in_place(meta, header_len, payload_len, |slot| {
                fill.take().map(|f| f(slot))
            })?;
            out = r;
            Ok(len)
        })?;
        // `fill` ran: the reservation succeeded before it was called.
        out.ok_or(ChannelError::Full)
    }
}

/// An in-band request asking for a completion.
pub(crate) fn request_packet<'a>(tid: u64, payload: &'a [&'a [u8]]) -> OutgoingPacket<'a> {
    OutgoingPacket {
        meta: PacketMeta {
            packet_type: PacketType::InBand,
            flags: FLAG_COMPLETION_REQUESTED,
            transaction_id: tid,
        },
        header: &[],
        payload: payload_of(payload),
    }
}

/// The descriptor fields of a GPA-direct request with id `tid` (the link sets the type).
pub(crate) fn gpa_request_meta(tid: u64) -> PacketMeta {
    PacketMeta {
        packet_type: PacketType::GpaDirect,
        flags: FLAG_COMPLETION_REQUESTED,
        transaction_id: tid,
    }
}

/// The payload of `parts`: one slice as it is (the ring's shortest path), several gathered.
#[inline]
fn payload_of<'a>(parts: &'a [&'a [u8]]) -> vmlink_ring::Payload<'a> {
    match parts {
        [one] => vmlink_ring::Payload::Bytes(one),
        parts => vmlink_ring::Payload::Gather(parts),
    }
}

/// A completion for `tid`.
pub(crate) fn completion<'a>(tid: u64, payload: &'a [&'a [u8]]) -> OutgoingPacket<'a> {
    OutgoingPacket {
        meta: PacketMeta {
            packet_type: PacketType::Completion,
            flags: 0,
            transaction_id: tid,
        },
        header: &[],
        payload: payload_of(payload),
    }
}

/// Packets pushed together and published by one commit.
pub struct SendBatch<
    'c,
    T: PacketTx,
    D: Doorbell,
    G: core::ops::DerefMut<Target = T> = Guard<'c, T>,
> {
    channel: &'c Core<D>,
    tx: G,
    packets: u64,
    bytes: u64,
}

impl<T: PacketTx, D: Doorbell, G: core::ops::DerefMut<Target = T>> core::fmt::Debug
    for SendBatch<'_, T, D, G>
{
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SendBatch")
            .field("packets", &self.packets)
            .finish_non_exhaustive()
    }
}

impl<T: PacketTx, D: Doorbell, G: core::ops::DerefMut<Target = T>> SendBatch<'_, T, D, G> {
    /// Adds a packet; `Full` when it does not fit (the packets added so far stay).
    pub fn push(&mut self, packet: &OutgoingPacket<'_>) -> Result<(), ChannelError> {
        let len = self
            .tx
            .push(packet)
            .map_err(|e| self.channel.link_error(e))?;
        self.packets += 1;
        self.bytes += len as u64;
        Ok(())
    }

    /// Adds an in-band packet that asks for no completion.
    pub fn push_in_band(&mut self, payload: &[u8]) -> Result<(), ChannelError> {
        self.push(&OutgoingPacket::in_band_slice(payload))
    }

    /// Packets added so far.
    pub fn len(&self) -> usize {
        self.packets as usize
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.packets == 0
    }

    /// Publishes every packet added, with one index store and at most one signal.
    pub fn commit(mut self) -> Result<(), ChannelError> {
        let signal = self.tx.commit();
        let c = self.channel;
        bump_held(&c.live.counters.tx.packets_sent, self.packets);
        bump_held(&c.live.counters.tx.bytes_sent, self.bytes);
        self.packets = 0;
        drop(self);
        c.signal(signal)
    }
}

impl<T: PacketTx, D: Doorbell, G: core::ops::DerefMut<Target = T>> Drop for SendBatch<'_, T, D, G> {
    fn drop(&mut self) {
        // Uncommitted packets are discarded.
        self.tx.rollback();
    }
}

impl<M: RingMem, D: Doorbell, G: core::ops::DerefMut<Target = RingTx<M>>>
    SendBatch<'_, RingTx<M>, D, G>
{
    /// Adds a packet written in place by `fill`.
    pub fn push_in_place<X>(
        &mut self,
        meta: PacketMeta,
        header_len: usize,
        payload_len: usize,
        fill: impl FnOnce(&mut WriteSlot<'_, M>) -> X,
    ) -> Result<X, ChannelError> {
        let (r, len) = self
            .tx
            .push_in_place(meta, header_len, payload_len, fill)
            .map_err(|e| self.channel.link_error(e))?;
        self.packets += 1;
        self.bytes += len as u64;
        Ok(r)
    }
}
