//! Waiting with `std`: deadlines, polling spins, and the blocking form of every operation.

use super::*;

// ---- waiting (std) ---------------------------------------------------------------------

#[cfg(feature = "std")]
pub(crate) fn remaining(deadline: Option<Instant>) -> Result<Option<Duration>, ChannelError> {
    match deadline {
        None => Ok(None),
        Some(d) => {
            let now = Instant::now();
            if now >= d {
                Err(ChannelError::TimedOut)
            } else {
                Ok(Some(d - now))
            }
        }
    }
}

#[cfg(feature = "std")]
pub(crate) fn min_timeout(a: Option<Duration>, b: Duration) -> Duration {
    a.map_or(b, |a| a.min(b))
}

#[cfg(feature = "std")]
impl<D: Doorbell> Core<D> {
    /// Waits for the hub to move past `seen`, up to the deadline (and at most `cap`).
    pub(crate) fn wait_event(
        &self,
        seen: u64,
        deadline: Option<Instant>,
        cap: Option<Duration>,
    ) -> Result<(), ChannelError> {
        let left = remaining(deadline)?;
        let timeout = match (left, cap) {
            (l, Some(c)) => Some(min_timeout(l, c)),
            (l, None) => l,
        };
        match self.hub.wait(&self.doorbell, seen, timeout) {
            Ok(true) => {
                bump(&self.counters.signals_received, 1);
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(DoorbellError::PeerClosed) => {
                self.mark_peer_closed();
                Ok(())
            }
            Err(e) => Err(self.fail(FailureCause::Doorbell(e))),
        }
    }
}

#[cfg(feature = "std")]
impl<'a, T: PacketTx, D: Doorbell, TC: Half<Item = T>, RC> Ops<'a, D, TC, RC> {
    /// Sends with flow control: when the ring is full, waits (pending send size and the
    /// doorbell, re-checking every `space_recheck`) until `deadline`.
    pub(crate) fn send_with(
        &self,
        header_len: usize,
        payload_len: usize,
        deadline: Option<Instant>,
        write: &mut dyn FnMut(&mut T) -> Result<usize, ChannelError>,
    ) -> Result<(), ChannelError> {
        loop {
            let seen = self.hub.generation();
            match self.try_send_with(write) {
                Err(ChannelError::Full) => {}
                other => return other,
            }
            if self.prepare_send_wait(header_len, payload_len)? == WaitDecision::Ready {
                continue;
            }
            self.wait_event(seen, deadline, Some(self.config.space_recheck))?;
        }
    }
}

#[cfg(feature = "std")]
impl<'a, R: PacketRx, D: Doorbell, TC, RC: Half<Item = RxState<R>>> Ops<'a, D, TC, RC> {
    /// Polling mode: looks at the ring up to `spin_iterations` times with interrupts
    /// masked, so the peer need not signal while we spin. Returns true when something
    /// arrived. If another thread of this channel waits (or may wait, see
    /// `external_waits`), interrupts are unmasked again before it returns (with a fence
    /// and a last look), so that thread is never left without signals, and anything that
    /// arrived unsignalled is announced; with nobody waiting they stay masked for the next
    /// spin.
    pub(crate) fn spin_for_data(&self, queued: bool) -> Result<bool, ChannelError> {
        if self.config.spin_iterations == 0 {
            return Ok(false);
        }
        {
            let mut rx = self.rx.lock();
            if !rx.spin_masked {
                rx.link.mask_interrupts();
                rx.spin_masked = true;
            }
        }
        let mut found = false;
        // No backoff: a look reads the peer's write index, a cache line that stays shared
        // (costing no traffic) until the peer writes it, and a backoff of even 64 pause
        // instructions would add a microsecond to every wake-up.
        for i in 0..self.config.spin_iterations {
            core::hint::spin_loop();
            if let Some(mut rx) = self.rx.try_lock() {
                #[cfg(feature = "alloc")]
                if queued && !rx.queue.is_empty() {
                    found = true;
                    break;
                }
                if rx.link.poll_available() {
                    found = true;
                    break;
                }
            }
            // The state is an atomic; the doorbell's own check may be a system call, so
            // it is consulted only now and then.
            if self.state.load(Ordering::Acquire) != OPEN || (i % 64 == 63 && self.peer_gone()) {
                found = true;
                break;
            }
        }
        // Found something and nobody waits for a signal: leave the interrupts masked, so
        // the peer keeps not signalling while this channel polls. The generation moves
        // first, so a waiter that armed before we masked and registers after this looks
        // again and re-arms (`Hub::announce` explains the order).
        if found && !self.external_waits.load(Ordering::SeqCst) && !self.hub.announce() {
            return Ok(true);
        }
        let ready = {
            let mut rx = self.rx.lock();
            !self.arm_reader(&mut rx)?
        };
        if ready {
            // Other threads asleep in this channel may wait for what arrived unsignalled.
            self.hub.notify(&self.doorbell);
        }
        Ok(found || ready)
    }

    /// Waits until a receive may find something: spins first in polling mode, then arms
    /// the reader and sleeps until an event or the deadline. With `queued`, packets in the
    /// channel's queue count (receivers); without, only the ring does (callers, whose
    /// completions never wait in the queue).
    pub(crate) fn wait_ready(
        &self,
        seen: u64,
        deadline: Option<Instant>,
        queued: bool,
    ) -> Result<(), ChannelError> {
        remaining(deadline)?;
        // A departure the channel does not know of yet ends the doorbell wait below
        // (`Doorbell::wait` returns on a hang-up), so no doorbell question here.
        if self.spin_for_data(queued)? || self.known_gone() {
            return Ok(());
        }
        if self.prepare_wait_for(queued)? == WaitDecision::Ready {
            return Ok(());
        }
        bump(&self.counters.receive_sleeps, 1);
        self.wait_event(seen, deadline, None)
    }

    /// See the public method of the same name.
    pub(crate) fn recv(
        &self,
        buf: &mut [u8],
        deadline: Option<Instant>,
    ) -> Result<Received, ChannelError> {
        loop {
            let seen = self.hub.generation();
            // The wait asks the doorbell whether the peer left.
            if let Some(r) = self.try_recv_as(buf, Probe::State)? {
                return Ok(r);
            }
            self.wait_ready(seen, deadline, true)?;
        }
    }

    /// See the public method of the same name.
    pub(crate) fn recv_with<X>(
        &self,
        deadline: Option<Instant>,
        f: impl FnOnce(&mut Packet<'_>) -> X,
    ) -> Result<X, ChannelError> {
        let mut f = Some(f);
        let mut out = None;
        loop {
            let seen = self.hub.generation();
            let (n, _) = self.recv_batch_once(1, &mut |p| {
                if let Some(f) = f.take() {
                    out = Some(f(p));
                }
            })?;
            if let Some(x) = out.take().filter(|_| n > 0) {
                return Ok(x);
            }
            self.wait_ready(seen, deadline, true)?;
        }
    }

    /// See the public method of the same name.
    pub(crate) fn recv_batch(
        &self,
        max: usize,
        deadline: Option<Instant>,
        mut each: impl FnMut(&mut Packet<'_>),
    ) -> Result<usize, ChannelError> {
        loop {
            let seen = self.hub.generation();
            let (n, _) = self.recv_batch_once(max, &mut each)?;
            if n > 0 {
                return Ok(n);
            }
            self.wait_ready(seen, deadline, true)?;
        }
    }
}

#[cfg(feature = "std")]
impl<'a, T: PacketTx, R: PacketRx, D: Doorbell, TC: Half<Item = T>, RC: Half<Item = RxState<R>>>
    Ops<'a, D, TC, RC>
{
    /// See the public method of the same name.
    pub(crate) fn call(
        &self,
        request: &[u8],
        response: &mut [u8],
        deadline: Option<Instant>,
    ) -> Result<usize, ChannelError> {
        let mut txn = self.begin_call(response.len())?;
        // On error, dropping `txn` frees the id: the request never went out.
        let parts = [request];
        let packet = request_packet(txn.tid(), &parts);
        let (h, p) = (packet.header.len(), packet.payload.len());
        self.send_with(h, p, deadline, &mut |w| w.push(&packet))?;
        txn.sent();
        loop {
            let seen = self.hub.generation();
            match self.call_step(&mut txn, response)? {
                CallStep::Done(len) => return Ok(len),
                CallStep::QueueFull => {
                    self.wait_event(seen, deadline, Some(self.config.space_recheck))?
                }
                CallStep::Idle => self.wait_ready(seen, deadline, false)?,
            }
        }
    }
}
