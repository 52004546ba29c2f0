//! Sending: single packets, in place, GPA-direct, batches.

use super::*;

impl<T: PacketTx, R: PacketRx, D: Doorbell> Endpoint<T, R, D> {
    // ---- sending -----------------------------------------------------------------------

    /// Runs `write` on the sending half and publishes; `Full` if it does not fit now.
    pub(super) fn try_send_with(
        &self,
        write: &mut dyn FnMut(&mut T) -> Result<usize, ChannelError>,
    ) -> Result<(), ChannelError> {
        self.check_send()?;
        let signal = {
            let mut tx = self.tx.lock();
            let len = match write(&mut tx) {
                Ok(len) => len,
                Err(ChannelError::Full) if self.peer_gone() => {
                    return Err(ChannelError::Closed);
                }
                Err(e) => return Err(self.link_error(e)),
            };
            bump(&self.counters.packets_sent, 1);
            bump(&self.counters.bytes_sent, len as u64);
            tx.commit()
        };
        self.signal(signal)
    }

    /// Sends an in-band packet that asks for no completion; never waits.
    ///
    /// Sends do not ask the doorbell whether the peer is still there (that may be a system
    /// call): until the channel has learnt of a departure, a packet may land in a ring
    /// nobody reads, as it would had the peer left just after it. A send that finds the
    /// ring full asks, and says [`ChannelError::Closed`] rather than `Full` once the peer
    /// has gone.
    ///
    /// ```
    /// use vmlink_channel::{ChannelError, Config, in_process_channel_pair};
    ///
    /// let (a, b) = in_process_channel_pair(4096, Config::default())?;
    /// a.try_send(b"hello")?;
    /// let mut buf = [0u8; 16];
    /// let got = b.try_recv(&mut buf)?.expect("a packet");
    /// assert_eq!(&got.payload(&buf)[..5], b"hello");
    /// assert_eq!(b.try_recv(&mut buf)?, None);
    /// // A full ring is an error for `try_` sends, never a wait.
    /// while a.try_send(&[0; 1000]).is_ok() {}
    /// assert_eq!(a.try_send(&[0; 1000]), Err(ChannelError::Full));
    /// # Ok::<(), ChannelError>(())
    /// ```
    pub fn try_send(&self, payload: &[u8]) -> Result<(), ChannelError> {
        self.try_send_packet(&OutgoingPacket::in_band_slice(payload))
    }

    /// Sends any packet; never waits.
    pub fn try_send_packet(&self, packet: &OutgoingPacket<'_>) -> Result<(), ChannelError> {
        self.try_send_with(&mut |w| w.push(packet))
    }

    /// Sends a completion for `transaction_id`; never waits.
    pub fn try_complete(&self, transaction_id: u64, payload: &[u8]) -> Result<(), ChannelError> {
        self.try_send_packet(&completion(transaction_id, &[payload]))
    }

    /// Sends with or without waiting for space.
    pub(super) fn send_until(
        &self,
        header_len: usize,
        payload_len: usize,
        until: Until,
        write: &mut dyn FnMut(&mut T) -> Result<usize, ChannelError>,
    ) -> Result<(), ChannelError> {
        match until {
            Until::Never => {
                let _ = (header_len, payload_len);
                self.try_send_with(write)
            }
            #[cfg(feature = "std")]
            Until::Deadline(deadline) => self.send_with(header_len, payload_len, deadline, write),
        }
    }

    pub(super) fn send_gpa_direct_until(
        &self,
        ranges: &[GpaRange<'_>],
        payload: &[u8],
        meta: PacketMeta,
        until: Until,
    ) -> Result<(), ChannelError> {
        let limit = self.config.gpa_page_limit;
        // The header's length, for a wait for space; a malformed list is refused here.
        let header_len =
            crate::packet::gpa_header_len(ranges, limit).map_err(ChannelError::InvalidPacket)?;
        self.send_until(header_len, payload.len(), until, &mut |w| {
            w.push_gpa_direct(ranges, payload, meta, limit)
        })
    }

    /// Sends a GPA-direct packet: `ranges` describe where the bulk data is, `payload`
    /// travels in-band after them. Never waits.
    pub fn try_send_gpa_direct(
        &self,
        ranges: &[GpaRange<'_>],
        payload: &[u8],
        meta: PacketMeta,
    ) -> Result<(), ChannelError> {
        self.send_gpa_direct_until(ranges, payload, meta, Until::Never)
    }

    /// Starts a batch: packets pushed to it are published together by one commit, which
    /// signals the peer at most once. The outgoing ring stays locked while the batch
    /// lives; a batch dropped without [`SendBatch::commit`] is discarded.
    ///
    /// ```
    /// use vmlink_channel::{Config, in_process_channel_pair};
    ///
    /// let (a, b) = in_process_channel_pair(4 * 4096, Config::default())?;
    /// let mut batch = a.batch()?;
    /// for i in 0..10u8 {
    ///     batch.push_in_band(&[i; 32])?;
    /// }
    /// batch.commit()?; // one index store, at most one doorbell signal
    /// assert_eq!(a.counters().signals_sent, 1);
    ///
    /// let mut sum = 0u32;
    /// let n = b.try_recv_batch(64, |packet| {
    ///     let mut first = [0u8; 1];
    ///     packet.read_payload(0, &mut first).unwrap();
    ///     sum += u32::from(first[0]);
    /// })?;
    /// assert_eq!((n, sum), (10, 45));
    /// # Ok::<(), vmlink_channel::ChannelError>(())
    /// ```
    pub fn batch(&self) -> Result<SendBatch<'_, T, R, D>, ChannelError> {
        self.check_send()?;
        Ok(SendBatch {
            channel: self,
            tx: self.tx.lock(),
            packets: 0,
            bytes: 0,
        })
    }

    /// Arms the reader for sleeping: unmask interrupts, fence, look again. Returns true
    /// when it is safe to sleep.
    pub(super) fn arm_reader(&self, rx: &mut RxState<R>) -> Result<bool, ChannelError> {
        rx.spin_masked = false;
        let (decision, signal) = rx.link.prepare_wait().map_err(|e| self.link_error(e))?;
        self.signal(signal)?;
        Ok(decision == WaitDecision::Sleep)
    }

    /// Asks the peer not to signal for new data: for a receiver that polls with the
    /// `try_` calls. [`prepare_recv_wait`](Self::prepare_recv_wait) (and every blocking
    /// or async receive that goes to sleep) unmasks again, with the fence and re-check that
    /// keep a wake-up from being lost.
    ///
    /// ```
    /// use vmlink_channel::{Config, in_process_channel_pair};
    ///
    /// let (a, b) = in_process_channel_pair(4096, Config::default())?;
    /// b.mask_interrupts();
    /// a.try_send(b"x")?;
    /// assert_eq!(a.counters().signals_sent, 0, "a masked receiver is not signalled");
    /// # Ok::<(), vmlink_channel::ChannelError>(())
    /// ```
    pub fn mask_interrupts(&self) {
        self.rx.lock().link.mask_interrupts();
    }

    /// Prepares to sleep until a packet arrives, for callers that wait on the doorbell
    /// themselves (`no_std` code with its own idle loop): commits consumed packets,
    /// unmasks interrupts, fences and looks again. On [`WaitDecision::Sleep`] the peer
    /// will signal when it sends; wait with `self.doorbell().wait(..)`.
    pub fn prepare_recv_wait(&self) -> Result<WaitDecision, ChannelError> {
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

    /// Prepares to sleep until a packet with these sizes fits in the outgoing ring (sets
    /// the pending send size, fences, looks again); see
    /// [`prepare_recv_wait`](Self::prepare_recv_wait).
    pub fn prepare_send_wait(
        &self,
        header_len: usize,
        payload_len: usize,
    ) -> Result<WaitDecision, ChannelError> {
        bump(&self.counters.send_waits, 1);
        let (decision, signal) = {
            let mut tx = self.tx.lock();
            tx.prepare_wait(header_len, payload_len)
                .map_err(|e| self.link_error(e))?
        };
        self.signal(signal)?;
        Ok(decision)
    }
}

impl<M: RingMem, D: Doorbell> Channel<M, D> {
    /// Writes a packet in place: reserves `header_len` bytes of extra header and
    /// `payload_len` bytes of payload, lets `fill` write them, and publishes. Never waits.
    pub fn try_send_in_place<X>(
        &self,
        meta: PacketMeta,
        header_len: usize,
        payload_len: usize,
        fill: impl FnOnce(&mut WriteSlot<'_, M>) -> X,
    ) -> Result<X, ChannelError> {
        self.send_in_place_until(meta, header_len, payload_len, Until::Never, fill)
    }

    pub(super) fn send_in_place_until<X>(
        &self,
        meta: PacketMeta,
        header_len: usize,
        payload_len: usize,
        until: Until,
        fill: impl FnOnce(&mut WriteSlot<'_, M>) -> X,
    ) -> Result<X, ChannelError> {
        let mut fill = Some(fill);
        let mut out = None;
        self.send_until(header_len, payload_len, until, &mut |w| {
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
        payload: vmlink_ring::Payload::Gather(payload),
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
        payload: vmlink_ring::Payload::Gather(payload),
    }
}

/// Packets pushed together and published by one commit.
pub struct SendBatch<'c, T: PacketTx, R: PacketRx, D: Doorbell> {
    channel: &'c Endpoint<T, R, D>,
    tx: Guard<'c, T>,
    packets: u64,
    bytes: u64,
}

impl<T: PacketTx, R: PacketRx, D: Doorbell> core::fmt::Debug for SendBatch<'_, T, R, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SendBatch")
            .field("packets", &self.packets)
            .finish_non_exhaustive()
    }
}

impl<T: PacketTx, R: PacketRx, D: Doorbell> SendBatch<'_, T, R, D> {
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
        bump(&c.counters.packets_sent, self.packets);
        bump(&c.counters.bytes_sent, self.bytes);
        self.packets = 0;
        drop(self);
        c.signal(signal)
    }
}

impl<T: PacketTx, R: PacketRx, D: Doorbell> Drop for SendBatch<'_, T, R, D> {
    fn drop(&mut self) {
        // Uncommitted packets are discarded.
        self.tx.rollback();
    }
}

impl<M: RingMem, D: Doorbell> SendBatch<'_, RingTx<M>, RingRx<M>, D> {
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
