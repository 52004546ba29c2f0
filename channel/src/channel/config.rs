//! Configuration, life-cycle states and counters.

use super::*;

/// How a channel behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Polling mode: how many times a receiver that found nothing looks again (one CPU
    /// spin hint between looks, interrupts masked) before it unmasks and sleeps. A look
    /// costs tens of nanoseconds. 0 (the default) leaves the choice to
    /// [`spin_before_sleep`](Self::spin_before_sleep).
    pub spin_iterations: u32,
    /// With `std`, when `spin_iterations` is 0: the most a blocking send or receive spins
    /// (looking at the ring, a receiver with interrupts masked) before it sleeps on the
    /// doorbell. Within that bound the spin lasts about as long as a wake-up costs: the
    /// channel times its sleeps that end in a signal and follows their low envelope (it
    /// moves down at once and up slowly). Spinning that long at most costs at most as much
    /// again as sleeping would have (the classic spin-then-block bound), and a peer that
    /// answers within the spin is never signalled: a saturated stream rings no doorbells.
    /// A receive also spins for half as long again as receive waits have lasted on
    /// average (a moving average of each wait, from its spin's start to the data or the
    /// end of its sleep), when that average is within the bound: a peer that answers
    /// every request after the same service time (a disk serving large requests, say) is
    /// then caught by the spin rather than signalled, on both sides. An idle channel still
    /// sleeps after the bound, and once its waits average more than the bound, after
    /// about a wake-up's cost.
    ///
    /// Default: 100 µs, except under Miri and loom, and when the environment variable
    /// `VMLINK_SPIN` is `off` when the configuration is made (for test suites on few
    /// CPUs): then zero. [`Config::sleep_at_once`] sets zero, which sleeps at once.
    pub spin_before_sleep: Duration,
    /// How long a sender waiting for space sleeps before it looks again even without a
    /// signal, for peers that do not honour `pending_send_size`.
    pub space_recheck: Duration,
    /// With `alloc`: how many unsolicited packets may wait in the channel while callers
    /// wait for completions. When it is full, callers stop reading the ring until a
    /// receiver takes packets.
    pub queue_depth: usize,
    /// With `alloc`: how many bytes (headers and payloads) those packets may hold in all.
    /// The queue's one buffer of exactly this size is allocated when the first packet is
    /// queued; a peer that sends only maximum-size packets meets the same back-pressure
    /// as a full queue, never more memory. A packet larger than this is never queued: it
    /// stays in the ring until a receiver takes it. The default, 1 MiB, holds two of the
    /// largest packets VMBus can describe (524,280 bytes).
    pub queue_bytes: usize,
    /// GPA-direct page numbers must be below this (the shm transport's buffer area);
    /// `None` checks only the structure.
    pub gpa_page_limit: Option<u64>,
}

/// The default [`Config::spin_before_sleep`].
pub const DEFAULT_SPIN_BEFORE_SLEEP: Duration = Duration::from_micros(100);

/// [`DEFAULT_SPIN_BEFORE_SLEEP`], or zero where spinning only costs: under Miri and loom
/// (which would explore or interpret every spin), and when `VMLINK_SPIN=off`.
fn default_spin_before_sleep() -> Duration {
    if cfg!(any(miri, loom)) {
        return Duration::ZERO;
    }
    #[cfg(feature = "std")]
    if std::env::var_os("VMLINK_SPIN").is_some_and(|v| v == "off") {
        return Duration::ZERO;
    }
    DEFAULT_SPIN_BEFORE_SLEEP
}

impl Default for Config {
    fn default() -> Self {
        Self {
            spin_iterations: 0,
            spin_before_sleep: default_spin_before_sleep(),
            space_recheck: Duration::from_millis(10),
            queue_depth: 64,
            queue_bytes: 1 << 20,
            gpa_page_limit: None,
        }
    }
}

impl Config {
    /// Polling mode with `spin_iterations` looks before sleeping.
    pub fn polling(spin_iterations: u32) -> Self {
        Self {
            spin_iterations,
            ..Self::default()
        }
    }

    /// The same configuration, sleeping at once when a blocking wait finds nothing: no
    /// spin before sleeping, no polling.
    pub fn sleep_at_once(mut self) -> Self {
        self.spin_iterations = 0;
        self.spin_before_sleep = Duration::ZERO;
        self
    }

    /// The same configuration with another bound on the spin before sleeping (see
    /// [`spin_before_sleep`](Self::spin_before_sleep)).
    pub fn with_spin_before_sleep(mut self, bound: Duration) -> Self {
        self.spin_before_sleep = bound;
        self
    }

    /// The same configuration with a GPA page-number limit.
    pub fn with_gpa_page_limit(mut self, limit: u64) -> Self {
        self.gpa_page_limit = Some(limit);
        self
    }

    /// The same configuration with another unsolicited-packet queue depth.
    pub fn with_queue_depth(mut self, depth: usize) -> Self {
        self.queue_depth = depth;
        self
    }

    /// The same configuration with another bound on the queue's bytes.
    pub fn with_queue_bytes(mut self, bytes: usize) -> Self {
        self.queue_bytes = bytes;
        self
    }
}

/// A duration in nanoseconds, `u64::MAX` past 584 years.
pub(super) fn saturating_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The wake-up cost an adaptive spin lasts at first: a quarter of its bound.
pub(super) fn initial_wake_cost(config: &Config) -> u64 {
    saturating_nanos(config.spin_before_sleep / 4)
}

/// Where a channel is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelState {
    /// Both sides are there.
    Open,
    /// The peer left; what it committed can still be received.
    PeerClosed,
    /// A ring or the protocol was violated; every call fails with the cause.
    Failed(FailureCause),
}

/// Counters a tool can read, all since the channel was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counters {
    /// Packets committed to the outgoing ring.
    pub packets_sent: u64,
    /// Bytes of those packets in the ring (descriptor, header, padded payload).
    pub bytes_sent: u64,
    /// Packets taken from the incoming ring (completions for waiting calls included).
    pub packets_received: u64,
    /// Bytes of those packets in the ring.
    pub bytes_received: u64,
    /// Doorbell signals sent to the peer.
    pub signals_sent: u64,
    /// Wake-ups by the peer's doorbell.
    pub signals_received: u64,
    /// Times a send found the ring full and waited for space.
    pub send_waits: u64,
    /// Times a receive went to sleep.
    pub receive_sleeps: u64,
    /// Completions that arrived after their caller gave up, discarded.
    pub late_completions: u64,
}

/// The counters, kept where they are bumped: the sending half's and the receiving half's
/// on cache lines of their own (128 bytes: adjacent-line prefetch pairs lines), so two
/// threads that send and receive never write one line.
#[derive(Debug, Default)]
pub(super) struct AtomicCounters {
    pub(super) tx: TxCounters,
    pub(super) rx: RxCounters,
}

/// Bumped by senders.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(super) struct TxCounters {
    /// Bumped with [`bump_held`] while the sending half is held.
    pub(super) packets_sent: AtomicU64,
    /// Bumped with [`bump_held`] while the sending half is held.
    pub(super) bytes_sent: AtomicU64,
    pub(super) signals_sent: AtomicU64,
    pub(super) send_waits: AtomicU64,
    /// Sends that found the ring full since one went out (see [`probe_due`]); not reported.
    pub(super) full_looks: AtomicU32,
}

/// Bumped by receivers and waiters.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(super) struct RxCounters {
    /// Bumped with [`bump_held`] while the receiving half is held.
    pub(super) packets_received: AtomicU64,
    /// Bumped with [`bump_held`] while the receiving half is held.
    pub(super) bytes_received: AtomicU64,
    pub(super) signals_received: AtomicU64,
    pub(super) receive_sleeps: AtomicU64,
    pub(super) late_completions: AtomicU64,
    /// Receives that found nothing since one found something (see [`probe_due`]); not
    /// reported.
    pub(super) empty_looks: AtomicU32,
}

/// Adds `n` to a counter any thread may bump.
pub(super) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Adds `n` to a counter that only the holder of one half bumps (its lock, or the
/// `RefCell` of the handle that owns it): a plain load and store, no locked instruction.
/// Holding the half orders every bump after the one before, so none is lost; readers see
/// some recent value, as with any statistic.
#[inline]
pub(super) fn bump_held(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// How often an operation that cannot wait and finds nothing to do asks the doorbell
/// whether the peer left: the first time after progress, then every this many times.
pub(super) const PROBE_EVERY: u32 = 64;

/// Counts a look that found the ring empty (receivers) or full (senders) and says whether
/// this one should ask the doorbell about the peer, which may be a system call (a `poll`
/// of a socket costs a few hundred nanoseconds, more than a look): the first look after
/// progress, then every [`PROBE_EVERY`]th. A plain load and store: concurrent callers may
/// lose a count, which only moves a probe.
#[inline]
pub(super) fn probe_due(looks: &AtomicU32) -> bool {
    let n = looks.load(Ordering::Relaxed);
    looks.store(n.wrapping_add(1), Ordering::Relaxed);
    n.is_multiple_of(PROBE_EVERY)
}

/// Progress (a packet received, or sent): the next empty or full look asks the doorbell.
#[inline]
pub(super) fn progressed(looks: &AtomicU32) {
    if looks.load(Ordering::Relaxed) != 0 {
        looks.store(0, Ordering::Relaxed);
    }
}

impl AtomicCounters {
    #[cfg(feature = "alloc")]
    pub(super) fn from_snapshot(c: &Counters) -> Self {
        Self {
            tx: TxCounters {
                packets_sent: AtomicU64::new(c.packets_sent),
                bytes_sent: AtomicU64::new(c.bytes_sent),
                signals_sent: AtomicU64::new(c.signals_sent),
                send_waits: AtomicU64::new(c.send_waits),
                full_looks: AtomicU32::new(0),
            },
            rx: RxCounters {
                packets_received: AtomicU64::new(c.packets_received),
                bytes_received: AtomicU64::new(c.bytes_received),
                signals_received: AtomicU64::new(c.signals_received),
                receive_sleeps: AtomicU64::new(c.receive_sleeps),
                late_completions: AtomicU64::new(c.late_completions),
                empty_looks: AtomicU32::new(0),
            },
        }
    }

    pub(super) fn snapshot(&self) -> Counters {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (tx, rx) = (&self.tx, &self.rx);
        Counters {
            packets_sent: l(&tx.packets_sent),
            bytes_sent: l(&tx.bytes_sent),
            packets_received: l(&rx.packets_received),
            bytes_received: l(&rx.bytes_received),
            signals_sent: l(&tx.signals_sent),
            signals_received: l(&rx.signals_received),
            send_waits: l(&tx.send_waits),
            receive_sleeps: l(&rx.receive_sleeps),
            late_completions: l(&rx.late_completions),
        }
    }
}
