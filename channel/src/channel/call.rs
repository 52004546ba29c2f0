//! Transactions: requests, completions and the calls that wait for them.

use super::*;

impl<'a, T: PacketTx, D: Doorbell, TC: Half<Item = T>, RC> Ops<'a, D, TC, RC> {
    // ---- transactions ------------------------------------------------------------------

    /// See the public method of the same name.
    pub(crate) fn start_request(&self, request: &[u8], wait: Wait) -> Result<u64, ChannelError> {
        let tid = self.alloc_polled()?;
        let parts = [request];
        let packet = request_packet(tid, &parts);
        self.sent_or_freed(
            tid,
            self.send_until(0, request.len(), wait, &mut |w| w.push(&packet)),
        )
    }

    /// See the public method of the same name.
    pub(crate) fn start_gpa_request(
        &self,
        ranges: &[GpaRange<'_>],
        payload: &[u8],
        wait: Wait,
    ) -> Result<u64, ChannelError> {
        let tid = self.alloc_polled()?;
        let sent = self.send_gpa_direct_until(ranges, payload, gpa_request_meta(tid), wait);
        self.sent_or_freed(tid, sent)
    }

    /// Reserves an id for a polled request. A failed or closed channel says so first.
    pub(crate) fn alloc_polled(&self) -> Result<u64, ChannelError> {
        self.check_send()?;
        self.live
            .txns
            .alloc(Mode::Polled)
            .ok_or(ChannelError::TransactionsExhausted {
                capacity: MAX_TRANSACTIONS,
            })
    }

    /// The id of a request that went out, or its send's error with the id freed (never
    /// sent: nothing will complete it).
    pub(crate) fn sent_or_freed(
        &self,
        tid: u64,
        sent: Result<(), ChannelError>,
    ) -> Result<u64, ChannelError> {
        match sent {
            Ok(()) => Ok(tid),
            Err(e) => {
                self.live.txns.free(tid);
                Err(e)
            }
        }
    }
}

/// What [`Ops::take_own_completion`] found at the head.
#[cfg(feature = "alloc")]
enum Own {
    /// The call's own completion, copied into the response: its length.
    Taken(usize),
    /// Another packet.
    Other,
    /// Nothing.
    Empty,
}

/// What one round of a call found.
#[cfg(feature = "alloc")]
pub(crate) enum CallStep {
    /// The completion arrived: its payload length.
    Done(usize),
    /// The unsolicited-packet queue is full: wait for a receiver to take packets.
    QueueFull,
    /// The ring holds nothing more for now: wait for data.
    Idle,
}

/// A call in flight: frees or abandons its transaction id if the call ends without its
/// completion (an error, a timeout, a dropped future).
#[cfg(feature = "alloc")]
pub(crate) struct PendingCall<'c, D: Doorbell> {
    channel: &'c Core<D>,
    tid: u64,
    /// The id still needs freeing or abandoning.
    armed: bool,
    /// The request went out, so a completion may still come.
    sent: bool,
}

#[cfg(feature = "alloc")]
impl<D: Doorbell> PendingCall<'_, D> {
    pub(crate) fn tid(&self) -> u64 {
        self.tid
    }

    /// The request went out: from now on a completion may come.
    pub(crate) fn sent(&mut self) {
        self.sent = true;
    }
}

#[cfg(feature = "alloc")]
impl<D: Doorbell> Drop for PendingCall<'_, D> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if self.sent {
            // Keep the id until the late completion arrives.
            self.channel.live.txns.abandon(self.tid);
        } else {
            // Dropped before the request went out (e.g. a future cancelled while it waited
            // for space): nothing will complete it.
            self.channel.live.txns.free(self.tid);
        }
    }
}

#[cfg(feature = "alloc")]
impl<'a, T: PacketTx, R: PacketRx, D: Doorbell, TC: Half<Item = T>, RC: Half<Item = RxState<R>>>
    Ops<'a, D, TC, RC>
{
    /// Reserves a transaction id for a call whose response buffer holds `capacity` bytes:
    /// the most of its completion the receive path will store.
    pub(crate) fn begin_call(&self, capacity: usize) -> Result<PendingCall<'_, D>, ChannelError> {
        self.check_send()?;
        let tid =
            self.live
                .txns
                .alloc(Mode::Waiting)
                .ok_or(ChannelError::TransactionsExhausted {
                    capacity: MAX_TRANSACTIONS,
                })?;
        // Published before the request goes out, so before its completion can arrive.
        self.call_capacity[slot_index(tid)].store(capacity, Ordering::Release);
        Ok(PendingCall {
            channel: self.core,
            tid,
            armed: true,
            sent: false,
        })
    }

    /// One round of waiting for a call's completion: read the ring (completions to their
    /// slots, other packets to the queue), then take ours or arm for sleeping.
    pub(crate) fn call_step(
        &self,
        txn: &mut PendingCall<'_, D>,
        response: &mut [u8],
    ) -> Result<CallStep, ChannelError> {
        if let Some(e) = self.failed() {
            return Err(e);
        }
        // Waiting callers learn of a departure from their wait (which asks the doorbell).
        let gone = self.known_gone();
        let mut rx = self.rx.lock();
        if let Some(len) = self.take_completion(&mut rx, txn, response)? {
            return Ok(CallStep::Done(len));
        }
        let mut blocked = false;
        loop {
            // Our own completion at the head is copied straight into the response. Looked
            // for before each packet, and nothing more is read once the head is empty: a
            // packet arriving between two looks is then taken by the next step, never
            // stored for us as another caller's would be.
            match self.take_own_completion(&mut rx, txn, response)? {
                Own::Taken(len) => {
                    self.commit_rx(&mut rx)?;
                    return Ok(CallStep::Done(len));
                }
                Own::Empty => break,
                Own::Other => {}
            }
            let Some(info) = self.next_for_receiver(&mut rx)? else {
                break;
            };
            if !self.queue_packet(&mut rx, &info)? {
                blocked = true;
                break;
            }
        }
        self.commit_rx(&mut rx)?;
        if let Some(len) = self.take_completion(&mut rx, txn, response)? {
            return Ok(CallStep::Done(len));
        }
        if gone {
            return Err(ChannelError::Closed);
        }
        if blocked {
            return Ok(CallStep::QueueFull);
        }
        Ok(CallStep::Idle)
    }

    /// The call's own completion when it is next in the ring and fits `response`: copied
    /// straight there, consumed and its id freed, without storing it for the caller (this
    /// is the caller) or waking anyone ([`Own::Taken`]). Anything else is left to the
    /// general path ([`Own::Other`]); [`Own::Empty`] when nothing is there.
    fn take_own_completion(
        &self,
        rx: &mut RxState<R>,
        txn: &mut PendingCall<'_, D>,
        response: &mut [u8],
    ) -> Result<Own, ChannelError> {
        let info = match rx.link.peek() {
            Ok(Some(info)) => info,
            Ok(None) => return Ok(Own::Empty),
            Err(e) => return Err(self.link_error(e)),
        };
        let len = info.payload_len;
        if info.packet_type != PacketType::Completion
            || info.transaction_id != txn.tid
            || len > response.len()
            || self.live.txns.route(txn.tid) != Route::Waiting(slot_index(txn.tid))
        {
            return Ok(Own::Other);
        }
        rx.link
            .read_payload(0, &mut response[..len])
            .map_err(|e| self.link_error(e))?;
        self.consume(&mut rx.link, &info);
        self.live.txns.free(txn.tid);
        txn.armed = false;
        Ok(Own::Taken(len))
    }

    /// Copies a packet meant for a receiver into the queue (its header validated there).
    /// `Ok(false)` when the queue cannot take it now: it stays in the ring.
    pub(crate) fn queue_packet(
        &self,
        rx: &mut RxState<R>,
        info: &Received,
    ) -> Result<bool, ChannelError> {
        let RxState { link, queue, .. } = rx;
        let queued = queue.push(*info, |slot| self.take_into(link, info, slot).map(drop))?;
        if queued {
            self.hub.notify(&self.doorbell);
        }
        Ok(queued)
    }

    pub(crate) fn take_completion(
        &self,
        rx: &mut RxState<R>,
        txn: &mut PendingCall<'_, D>,
        response: &mut [u8],
    ) -> Result<Option<usize>, ChannelError> {
        if !self.live.txns.is_done(txn.tid) {
            return Ok(None);
        }
        let index = slot_index(txn.tid);
        let len = rx.stored_len[index];
        self.live.txns.free(txn.tid);
        txn.armed = false;
        // A completion longer than the caller's buffer was consumed without being stored.
        let stored = rx.stored[index]
            .get(..len)
            .filter(|_| len <= response.len());
        let Some(stored) = stored else {
            return Err(ChannelError::BufferTooSmall {
                needed: len,
                capacity: response.len(),
            });
        };
        response[..len].copy_from_slice(stored);
        Ok(Some(len))
    }
}

#[cfg(feature = "alloc")]
impl<D: Doorbell> Core<D> {
    pub(crate) fn generation(&self) -> u64 {
        self.hub.generation()
    }

    pub(crate) fn count_receive_sleep(&self) {
        bump(&self.live.counters.rx.receive_sleeps, 1);
    }

    pub(crate) fn forget_waiter(&self) {
        self.hub.forget();
    }
}

#[cfg(feature = "alloc")]
impl<D: crate::doorbell::AsyncDoorbell> Core<D> {
    pub(crate) fn poll_event(
        &self,
        seen: u64,
        cx: &mut core::task::Context<'_>,
    ) -> core::task::Poll<Result<(), ChannelError>> {
        match self.hub.poll_wait(&self.doorbell, seen, cx) {
            core::task::Poll::Pending => core::task::Poll::Pending,
            core::task::Poll::Ready(Ok(signalled)) => {
                if signalled {
                    bump(&self.live.counters.rx.signals_received, 1);
                }
                core::task::Poll::Ready(Ok(()))
            }
            core::task::Poll::Ready(Err(DoorbellError::PeerClosed)) => {
                self.mark_peer_closed();
                core::task::Poll::Ready(Ok(()))
            }
            core::task::Poll::Ready(Err(e)) => {
                core::task::Poll::Ready(Err(self.fail(FailureCause::Doorbell(e))))
            }
        }
    }
}
