//! Waiting with `std`: deadlines, polling spins, and the blocking form of every operation.

use super::*;
use config::saturating_nanos;

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

/// The least an adaptive spin lasts: below this a spin saves nothing a sleep costs.
#[cfg(feature = "std")]
const MIN_SPIN: Duration = Duration::from_micros(1);

/// Between two looks of a spin: every `every`th look (see [`Endpoint::set_spin_yield`];
/// 0 never) gives the CPU to another thread that is ready to run on it, a system call that
/// returns at once when there is none.
#[cfg(feature = "std")]
#[inline]
fn spin_pause(every: u32, looks: u32) {
    if every != 0 && looks.is_multiple_of(every) {
        std::thread::yield_now();
    }
}

/// How long a wait may spin before it sleeps.
#[cfg(feature = "std")]
#[derive(Debug, Clone, Copy)]
pub(crate) enum SpinBudget {
    /// Polling mode: this many looks.
    Looks(u32),
    /// Adaptive: until `until`; `now` is the clock's last reading (at first, the spin's
    /// start).
    Until {
        /// When the spin ends.
        until: Instant,
        /// The clock's last reading.
        now: Instant,
    },
}

#[cfg(feature = "std")]
impl SpinBudget {
    /// True when the spin has used its budget after `looks` looks. The clock is read
    /// every 32 looks: a read costs about as much as a look.
    #[inline]
    fn spent(&mut self, looks: u32) -> bool {
        match self {
            SpinBudget::Looks(n) => looks >= *n,
            SpinBudget::Until { until, now } => {
                if looks % 32 != 31 {
                    return false;
                }
                *now = Instant::now();
                *now >= *until
            }
        }
    }

    /// The clock's last reading during an adaptive spin: when it ended, to within 32 looks
    /// (a few microseconds at most), without reading the clock again.
    fn last_reading(&self) -> Option<Instant> {
        match self {
            SpinBudget::Looks(_) => None,
            SpinBudget::Until { now, .. } => Some(*now),
        }
    }
}

/// How a receive wait's spin ended.
#[cfg(feature = "std")]
pub(crate) struct Spun {
    /// Something arrived (or the channel's state changed).
    found: bool,
    /// An adaptive spin's start and the clock's last reading in it.
    clock: Option<(Instant, Instant)>,
}

#[cfg(feature = "std")]
impl<D: Doorbell> Core<D> {
    /// The spin a wait may make before it sleeps: `spin_iterations` looks in polling
    /// mode, else about a wake-up's measured cost, at most `spin_before_sleep` and never
    /// past the wait's `deadline`; `None` to sleep at once. A receive wait (`receive`)
    /// spins longer when receive waits have lately ended within the bound: half as long
    /// again as they lasted on average (see [`Config::spin_before_sleep`]).
    pub(crate) fn spin_budget(
        &self,
        deadline: Option<Instant>,
        receive: bool,
    ) -> Option<SpinBudget> {
        if self.config.spin_iterations > 0 {
            return Some(SpinBudget::Looks(self.config.spin_iterations));
        }
        if !self.adaptive_spin() {
            return None;
        }
        let bound = saturating_nanos(self.config.spin_before_sleep);
        let mut spin = self.wake_cost_ns.load(Ordering::Relaxed);
        if receive {
            let wait = self.wait_ns.load(Ordering::Relaxed);
            if wait <= bound {
                spin = spin.max(wait.saturating_add(wait / 2));
            }
        }
        let now = Instant::now();
        let until = now + Duration::from_nanos(spin.min(bound));
        Some(SpinBudget::Until {
            until: deadline.map_or(until, |d| d.min(until)),
            now,
        })
    }

    /// True when waits spin for about a wake-up's measured cost (not polling mode, and a
    /// spin before sleeping configured).
    fn adaptive_spin(&self) -> bool {
        self.config.spin_iterations == 0 && !self.config.spin_before_sleep.is_zero()
    }

    /// How often a spin that starts now yields its CPU (see [`spin_pause`]), read once
    /// per spin rather than at every look.
    fn spin_yield_every(&self) -> u32 {
        self.spin_yield.load(Ordering::Relaxed)
    }

    /// Folds a sleep that a signal ended into the wake-up cost: the low envelope of such
    /// sleeps, halfway down to a shorter one at once, a sixteenth of the way up to a
    /// longer one but never more than an eighth up per sleep, within [`MIN_SPIN`] and the
    /// bound. A sleep's length is at least what waking costs, and nearly that when the
    /// peer was about to signal anyway, which is when spinning instead would have paid
    /// off; one long idle sleep barely moves it.
    fn note_sleep(&self, slept: Duration) {
        let bound = saturating_nanos(self.config.spin_before_sleep);
        let slept = saturating_nanos(slept);
        let cost = self.wake_cost_ns.load(Ordering::Relaxed);
        let next = if slept < cost {
            cost - (cost - slept) / 2
        } else {
            cost + ((slept - cost) / 16).min(cost / 8 + 1)
        };
        let floor = saturating_nanos(MIN_SPIN).min(bound);
        self.wake_cost_ns
            .store(next.clamp(floor, bound), Ordering::Relaxed);
    }

    /// Folds a receive wait's length (from its spin's start until data came or the sleep
    /// ended) into the average [`spin_budget`](Self::spin_budget) spins for: an eighth of
    /// the way to it, a wait counted as at most four times the bound, so that one idle
    /// hour moves the average no further than half the bound.
    fn note_wait(&self, waited: Duration) {
        let cap = saturating_nanos(self.config.spin_before_sleep).saturating_mul(4);
        let waited = saturating_nanos(waited).min(cap);
        let wait = self.wait_ns.load(Ordering::Relaxed);
        let next = if waited >= wait {
            wait + (waited - wait) / 8
        } else {
            wait - (wait - waited) / 8
        };
        self.wait_ns.store(next, Ordering::Relaxed);
    }

    /// Waits for the hub to move past `seen`, up to the deadline (and at most `cap`). A
    /// receive wait passes when it started (`since`), and its whole length is noted for
    /// the next spins ([`note_wait`](Self::note_wait)).
    pub(crate) fn wait_event(
        &self,
        seen: u64,
        deadline: Option<Instant>,
        cap: Option<Duration>,
        since: Option<Instant>,
    ) -> Result<(), ChannelError> {
        let left = remaining(deadline)?;
        let timeout = match (left, cap) {
            (l, Some(c)) => Some(min_timeout(l, c)),
            (l, None) => l,
        };
        let start = self.adaptive_spin().then(Instant::now);
        let woken = self.hub.wait(&self.doorbell, seen, timeout);
        if let Some(start) = start {
            let now = Instant::now();
            if woken == Ok(true) {
                self.note_sleep(now - start);
            }
            if let Some(since) = since {
                self.note_wait(now - since);
            }
        }
        match woken {
            Ok(true) => {
                bump(&self.live.counters.rx.signals_received, 1);
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
            if self.spin_for_space(deadline, write)? {
                return Ok(());
            }
            if self.prepare_send_wait(header_len, payload_len)? == WaitDecision::Ready {
                continue;
            }
            self.wait_event(seen, deadline, Some(self.config.space_recheck), None)?;
        }
    }

    /// Before a full ring's sender sleeps: tries the send again within the spin budget.
    /// True when it went out. The doorbell is asked whether the peer left only every 64
    /// tries (it may be a system call).
    fn spin_for_space(
        &self,
        deadline: Option<Instant>,
        write: &mut dyn FnMut(&mut T) -> Result<usize, ChannelError>,
    ) -> Result<bool, ChannelError> {
        let Some(mut budget) = self.spin_budget(deadline, false) else {
            return Ok(false);
        };
        let every = self.spin_yield_every();
        let mut tries = 0;
        while !budget.spent(tries) {
            core::hint::spin_loop();
            spin_pause(every, tries + 1);
            match self.send_once(write) {
                Ok(()) => return Ok(true),
                Err(ChannelError::Full) => {}
                Err(e) => return Err(e),
            }
            tries += 1;
            if tries % 64 == 0 && self.peer_gone() {
                return Err(ChannelError::Closed);
            }
        }
        Ok(false)
    }
}

#[cfg(feature = "std")]
impl<'a, R: PacketRx, D: Doorbell, TC, RC: Half<Item = RxState<R>>> Ops<'a, D, TC, RC> {
    /// Looks at the ring within the spin budget (see [`Core::spin_budget`]) with
    /// interrupts masked, so the peer need not signal while we spin. Returns true when
    /// something arrived. If another thread of this channel waits (or may wait, see
    /// `external_waits`), interrupts are unmasked again before it returns (with a fence
    /// and a last look), so that thread is never left without signals, and anything that
    /// arrived unsignalled is announced; with nobody waiting they stay masked for the next
    /// spin.
    pub(crate) fn spin_for_data(
        &self,
        queued: bool,
        deadline: Option<Instant>,
    ) -> Result<Spun, ChannelError> {
        let Some(mut budget) = self.spin_budget(deadline, true) else {
            return Ok(Spun {
                found: false,
                clock: None,
            });
        };
        let start = budget.last_reading();
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
        let every = self.spin_yield_every();
        let mut i = 0;
        while !budget.spent(i) {
            i += 1;
            core::hint::spin_loop();
            spin_pause(every, i);
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
            if self.live.state.load(Ordering::Acquire) != OPEN || (i % 64 == 0 && self.peer_gone())
            {
                found = true;
                break;
            }
        }
        // Found something and nobody waits for a signal: leave the interrupts masked, so
        // the peer keeps not signalling while this channel polls. The generation moves
        // first, so a waiter that armed before we masked and registers after this looks
        // again and re-arms (`Hub::announce` explains the order).
        let clock = start.zip(budget.last_reading());
        if found && !self.external_waits.load(Ordering::SeqCst) && !self.hub.announce() {
            return Ok(Spun { found, clock });
        }
        let ready = {
            let mut rx = self.rx.lock();
            !self.arm_reader(&mut rx)?
        };
        if ready {
            // Other threads asleep in this channel may wait for what arrived unsignalled.
            self.hub.notify(&self.doorbell);
        }
        Ok(Spun {
            found: found || ready,
            clock,
        })
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
        // The wait's length is noted for the next waits' spins (`Core::note_wait`), from
        // the clock readings the spin and the sleep make anyway.
        let spun = self.spin_for_data(queued, deadline)?;
        let spun_for = || {
            if let Some((start, last)) = spun.clock {
                self.note_wait(last - start);
            }
        };
        // A departure the channel does not know of yet ends the doorbell wait below
        // (`Doorbell::wait` returns on a hang-up), so no doorbell question here.
        if spun.found || self.known_gone() {
            spun_for();
            return Ok(());
        }
        if self.prepare_wait_for(queued)? == WaitDecision::Ready {
            spun_for();
            return Ok(());
        }
        bump(&self.live.counters.rx.receive_sleeps, 1);
        let since = spun.clock.map(|(start, _)| start);
        self.wait_event(seen, deadline, None, since)
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
                    self.wait_event(seen, deadline, Some(self.config.space_recheck), None)?
                }
                CallStep::Idle => self.wait_ready(seen, deadline, false)?,
            }
        }
    }
}

#[cfg(all(test, feature = "std", not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn the_wake_up_cost_follows_the_low_envelope_of_signalled_sleeps() {
        let config = Config::default().with_spin_before_sleep(Duration::from_micros(100));
        let (a, _b) = crate::in_process_channel_pair(4096, config).unwrap();
        let core = &a.core;
        let cost = || core.wake_cost_ns.load(Ordering::Relaxed);
        assert_eq!(cost(), 25_000, "a quarter of the bound at first");
        core.note_sleep(Duration::from_micros(5));
        assert_eq!(cost(), 15_000, "halfway down at once");
        for _ in 0..30 {
            core.note_sleep(Duration::from_micros(5));
        }
        assert!((5_000..5_010).contains(&cost()), "{}", cost());
        core.note_sleep(Duration::from_secs(1));
        assert!(
            cost() <= 5_010 * 9 / 8 + 1,
            "one idle sleep barely moves it: {}",
            cost()
        );
        for _ in 0..200 {
            core.note_sleep(Duration::from_secs(1));
        }
        assert_eq!(cost(), 100_000, "never past the bound");
        for _ in 0..40 {
            core.note_sleep(Duration::ZERO);
        }
        assert_eq!(cost(), 1_000, "never below the least spin");
        assert!(matches!(
            core.spin_budget(None, true),
            Some(SpinBudget::Until { .. })
        ));
    }

    /// The length of an adaptive budget, from its start.
    fn spin_of(budget: Option<SpinBudget>) -> Duration {
        match budget {
            Some(SpinBudget::Until { until, now }) => until - now,
            other => panic!("not an adaptive spin: {other:?}"),
        }
    }

    #[test]
    fn a_receive_spins_half_as_long_again_as_its_waits_last_while_they_end_within_the_bound() {
        let config = Config::default().with_spin_before_sleep(Duration::from_micros(500));
        let (a, _b) = crate::in_process_channel_pair(4096, config).unwrap();
        let core = &a.core;
        let wait = || core.wait_ns.load(Ordering::Relaxed);
        assert_eq!(wait(), 125_000, "a quarter of the bound at first");
        // Waits of 300 µs (a peer's steady service time): the average follows them.
        for _ in 0..100 {
            core.note_wait(Duration::from_micros(300));
        }
        assert!((299_000..=300_000).contains(&wait()), "{}", wait());
        // The wake-up cost (a quarter of the bound until a sleep is timed) is shorter, so a
        // receive spins 450 µs; a sender waiting for space only the wake-up cost.
        let receive = spin_of(core.spin_budget(None, true));
        assert!(
            (Duration::from_micros(449)..=Duration::from_micros(450)).contains(&receive),
            "{receive:?}"
        );
        assert_eq!(
            spin_of(core.spin_budget(None, false)),
            Duration::from_micros(125)
        );
        // Never past the bound: waits of 400 µs ask for 600.
        for _ in 0..100 {
            core.note_wait(Duration::from_micros(400));
        }
        assert_eq!(
            spin_of(core.spin_budget(None, true)),
            Duration::from_micros(500)
        );
        // One idle hour counts as four times the bound: the average moves an eighth of the
        // way there, and the receive spins the wake-up cost until it comes back within.
        let before = wait();
        core.note_wait(Duration::from_secs(3600));
        assert_eq!(wait(), before + (2_000_000 - before) / 8);
        assert_eq!(
            spin_of(core.spin_budget(None, true)),
            Duration::from_micros(125)
        );
        for _ in 0..100 {
            core.note_wait(Duration::from_micros(300));
        }
        assert!(spin_of(core.spin_budget(None, true)) > Duration::from_micros(400));
        // A channel whose waits stay long spins only the wake-up cost.
        for _ in 0..100 {
            core.note_wait(Duration::from_secs(1));
        }
        assert!((1_999_000..=2_000_000).contains(&wait()), "{}", wait());
        assert_eq!(
            spin_of(core.spin_budget(None, true)),
            Duration::from_micros(125)
        );
    }

    #[test]
    fn polling_mode_counts_looks_and_sleep_at_once_has_no_spin() {
        let (a, _b) = crate::in_process_channel_pair(4096, Config::polling(7)).unwrap();
        assert!(matches!(
            a.core.spin_budget(None, true),
            Some(SpinBudget::Looks(7))
        ));
        let (c, _d) =
            crate::in_process_channel_pair(4096, Config::polling(7).sleep_at_once()).unwrap();
        assert!(c.core.spin_budget(None, true).is_none());
        let mut budget = SpinBudget::Looks(3);
        assert!(!budget.spent(2) && budget.spent(3));
    }
}
