//! Clocks for time sync: the agent's wall clock (which tests skew on purpose), the
//! monotonic reference both sides of a vmlink host share, and the offset estimate.
//!
//! Times are Hyper-V's: 100 ns units since 1601-01-01 ([`UNIX_EPOCH_DELTA`] before the
//! Unix epoch). A vmlink host fills version 4's `vmreferencetime` with its
//! `CLOCK_MONOTONIC` in 100 ns units. An agent on the same machine (another process, or a
//! KVM guest whose monotonic clock is the host's) reads the same clock when the sample
//! arrives, so it sees how long the sample was in transit and estimates the host's wall
//! clock at that moment as `parenttime + transit`. Against a version 3 host, which sends no
//! reference, the estimate is `parenttime` and the transit is counted as zero.

use std::io;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::timesync::UNIX_EPOCH_DELTA;

/// 100 ns units per second.
const UNITS_PER_SEC: u64 = 10_000_000;

/// A wall clock in Hyper-V's units.
pub trait Clock: Send + Sync {
    /// Now, in 100 ns units since 1601-01-01.
    fn now(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        to_hv(SystemTime::now())
    }
}

/// The system's wall clock moved by a fixed offset: an agent whose clock is wrong, for
/// tests and demonstrations of time sync.
#[derive(Debug, Default)]
pub struct SkewedClock {
    skew_100ns: AtomicI64,
}

impl SkewedClock {
    /// The system clock moved by `skew_100ns` (positive: ahead).
    pub fn new(skew_100ns: i64) -> Self {
        Self {
            skew_100ns: AtomicI64::new(skew_100ns),
        }
    }

    /// The skew, in 100 ns units.
    pub fn skew(&self) -> i64 {
        self.skew_100ns.load(Ordering::Relaxed)
    }
}

impl Clock for SkewedClock {
    fn now(&self) -> u64 {
        SystemClock.now().saturating_add_signed(self.skew())
    }
}

/// A `SystemTime` in 100 ns units since 1601 (0 before that, saturating far ahead).
pub fn to_hv(t: SystemTime) -> u64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => UNIX_EPOCH_DELTA.saturating_add(
            d.as_secs()
                .saturating_mul(UNITS_PER_SEC)
                .saturating_add(u64::from(d.subsec_nanos() / 100)),
        ),
        Err(e) => {
            let d = e.duration();
            UNIX_EPOCH_DELTA.saturating_sub(
                d.as_secs()
                    .saturating_mul(UNITS_PER_SEC)
                    .saturating_add(u64::from(d.subsec_nanos().div_ceil(100))),
            )
        }
    }
}

/// `CLOCK_MONOTONIC` in 100 ns units: what a vmlink host puts in `vmreferencetime`.
pub fn monotonic_reference() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    (t.tv_sec() as u64)
        .saturating_mul(UNITS_PER_SEC)
        .saturating_add(t.tv_nsec() as u64 / 100)
}

/// One time sample as the agent saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// The host's wall clock when it sent the sample (`parenttime`).
    pub host_time: u64,
    /// How long the sample took to arrive, in 100 ns units (0 without a reference).
    pub transit: u64,
    /// The agent's clock when it arrived.
    pub agent_time: u64,
}

impl Sample {
    /// A sample that arrived now: `reference` is the host's `vmreferencetime` when there
    /// is one (version 4). A reference ahead of ours (another machine's clock, or a
    /// hostile host) is not a transit: it counts as zero.
    pub fn arrived(clock: &dyn Clock, host_time: u64, reference: Option<u64>) -> Self {
        let transit = reference.map_or(0, |r| monotonic_reference().saturating_sub(r));
        Self {
            host_time,
            transit,
            agent_time: clock.now(),
        }
    }

    /// The agent's clock minus the host's at arrival, in 100 ns units: positive when the
    /// agent is ahead.
    pub fn offset(&self) -> i64 {
        let host_now = i128::from(self.host_time) + i128::from(self.transit);
        (i128::from(self.agent_time) - host_now).clamp(i128::from(i64::MIN), i128::from(i64::MAX))
            as i64
    }
}

/// The largest offset the agent slews away, in 100 ns units (0.5 s: the kernel slews at
/// 500 ppm, so this takes about 17 minutes). A larger offset is reported, never slewed:
/// correcting it is a step, which is for the system's time daemon to decide.
pub const MAX_SLEW: i64 = 5_000_000;

/// The adjustment that brings an agent `offset` ahead of the host back (its negation), or
/// `None` when the offset is beyond [`MAX_SLEW`] either way.
pub fn slew_for(offset: i64) -> Option<i64> {
    (offset.unsigned_abs() <= MAX_SLEW.unsigned_abs()).then(|| -offset)
}

/// True when this process may adjust the system clock (`CAP_SYS_TIME` is effective).
pub fn may_set_time() -> bool {
    const CAP_SYS_TIME: u32 = 25;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_TIME) != 0)
}

/// Slews the system clock by `delta` (100 ns units, rounded to microseconds) with
/// `adjtime(3)`: the kernel speeds it up or slows it down until the delta is made up,
/// replacing any adjustment still in progress. Needs `CAP_SYS_TIME`.
#[allow(unsafe_code)]
pub fn slew(delta: i64) -> io::Result<()> {
    let micros = delta / 10;
    let tv = nix::libc::timeval {
        tv_sec: micros.div_euclid(1_000_000),
        tv_usec: micros.rem_euclid(1_000_000),
    };
    // SAFETY: `adjtime` reads the initialised `timeval` on this stack frame, which outlives
    // the call, and writes nothing when its second argument is null.
    let r = unsafe { nix::libc::adjtime(&tv, core::ptr::null_mut()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn hv_time_of_the_unix_epoch_and_after() {
        assert_eq!(to_hv(UNIX_EPOCH), UNIX_EPOCH_DELTA);
        assert_eq!(
            to_hv(UNIX_EPOCH + Duration::new(1, 250)),
            UNIX_EPOCH_DELTA + UNITS_PER_SEC + 2
        );
        assert_eq!(
            to_hv(UNIX_EPOCH - Duration::from_secs(1)),
            UNIX_EPOCH_DELTA - UNITS_PER_SEC
        );
    }

    #[test]
    fn a_skewed_clock_is_off_by_its_skew() {
        let skew = 5 * UNITS_PER_SEC as i64;
        let skewed = SkewedClock::new(skew);
        let before = SystemClock.now();
        let got = skewed.now();
        let after = SystemClock.now();
        assert!(got >= before.saturating_add_signed(skew));
        assert!(got <= after.saturating_add_signed(skew));
    }

    #[test]
    fn the_offset_counts_the_transit() {
        let s = Sample {
            host_time: 1_000,
            transit: 30,
            agent_time: 2_000,
        };
        assert_eq!(s.offset(), 970);
        let behind = Sample {
            host_time: 2_000,
            transit: 0,
            agent_time: 1_000,
        };
        assert_eq!(behind.offset(), -1_000);
    }

    #[test]
    fn only_small_offsets_are_slewed_and_backwards() {
        assert_eq!(slew_for(1_000), Some(-1_000));
        assert_eq!(slew_for(-MAX_SLEW), Some(MAX_SLEW));
        assert_eq!(slew_for(MAX_SLEW + 1), None);
        assert_eq!(slew_for(i64::MIN), None);
    }

    #[test]
    fn a_reference_from_the_future_is_no_transit() {
        let s = Sample::arrived(&SystemClock, 5, Some(u64::MAX));
        assert_eq!(s.transit, 0);
        let r = monotonic_reference();
        let s = Sample::arrived(&SystemClock, 5, Some(r));
        assert!(
            s.transit < UNITS_PER_SEC,
            "a transit measured on one machine"
        );
    }
}
