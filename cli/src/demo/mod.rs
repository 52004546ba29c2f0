//! `vmlink demo`: a host process and a guest process (this binary again, run as
//! `vmlink demo-guest`) exchange real data over vmlink-shm channels and, between the same
//! two processes in the same run, over a Unix socket, and the host reports both.
//!
//! The guest is spawned with [`vmlink_shm::Service::spawn`]: that channel (blocking
//! waits, 1 MiB rings, a 4 MiB buffer area) is the control channel and carries the
//! blocking round trips, the streams and the file. The guest then connects to a second
//! service on a socket in a private temporary directory for a polling channel
//! ([`Config::polling`](vmlink_channel::Config::polling)), and to a plain Unix socket
//! there for the baseline.

mod guest;
mod host;
mod wire;

use std::time::Duration;

use crate::pattern::Tally;

pub use guest::run as run_guest;
pub use host::run;

/// Payload bytes of a latency request and of its response.
pub const PING_BYTES: usize = 64;
/// Payload sizes streamed from the guest to the host.
pub const STREAM_SIZES: [usize; 2] = [64, 64 * 1024];
/// A streaming sender commits (and a socket sender writes) after this many packets, or
/// after [`BATCH_BYTES`], whichever comes first.
pub const BATCH_PACKETS: usize = 1024;
/// Payload bytes after which a streaming batch is committed.
pub const BATCH_BYTES: usize = 64 * 1024;
/// Data area of each ring of the control channel.
pub const CONTROL_RING_BYTES: u64 = 1 << 20;
/// The control channel's buffer area; the guest owns the second half.
pub const BUFFER_BYTES: u64 = 4 << 20;
/// Data area of each ring of the polling channel.
pub const POLLING_RING_BYTES: u64 = 64 * 1024;
/// Spins of a polling receiver before it sleeps.
pub const POLLING_SPINS: u32 = 5000;
/// Bytes of the file per GPA-direct packet (one slot of the guest's half of the buffer
/// area).
pub const FILE_CHUNK: usize = 256 * 1024;
/// Round trips a latency measurement always takes before it may stop on its time budget.
const MIN_SAMPLES: usize = 100;

/// The service name of the control channel.
const CONTROL_SERVICE: &str = "vmlink-demo";
/// The service name of the polling channel.
const POLLING_SERVICE: &str = "vmlink-demo-polling";
/// The polling channel's socket, in the demo's directory.
const POLLING_SOCKET: &str = "polling.sock";
/// The baseline's socket, in the demo's directory.
const BASELINE_SOCKET: &str = "baseline.sock";
/// The file the guest generates, in the demo's directory.
const SOURCE_FILE: &str = "source.bin";
/// The file the host writes, in the demo's directory.
const RECEIVED_FILE: &str = "received.bin";
/// How long any single wait may take before the demo gives up on the other process.
const WAIT: Duration = Duration::from_secs(20);

/// Which mechanism goes first in round `round` of a comparison (`false`: vmlink, `true`:
/// the socket): they alternate, so drift in the machine's speed favours neither.
fn order(round: usize) -> [bool; 2] {
    if round.is_multiple_of(2) {
        [false, true]
    } else {
        [true, false]
    }
}

/// A deadline [`WAIT`] from now.
fn soon() -> Option<std::time::Instant> {
    Some(std::time::Instant::now() + WAIT)
}

/// How long each measurement runs.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Unmeasured round trips before a polling latency measurement.
    pub warmup_polling: u64,
    /// Unmeasured round trips before a blocking (or socket) latency measurement.
    pub warmup_blocking: u64,
    /// Time for each latency measurement (after [`MIN_SAMPLES`] round trips).
    pub latency_budget: Duration,
    /// Most round trips a latency measurement records.
    pub max_samples: usize,
    /// Time for each streaming measurement.
    pub stream_budget: Duration,
    /// Bytes of the file copied.
    pub file_bytes: u64,
    /// Measured copies of the file each way (after one unmeasured copy each way).
    pub file_rounds: usize,
}

impl Plan {
    /// The full demo: a few seconds in all.
    pub fn full() -> Self {
        Self {
            warmup_polling: 2000,
            warmup_blocking: 200,
            latency_budget: Duration::from_millis(400),
            max_samples: 500_000,
            stream_budget: Duration::from_millis(300),
            file_bytes: 64 << 20,
            file_rounds: 3,
        }
    }

    /// The CI run: well under two seconds.
    pub fn quick() -> Self {
        Self {
            warmup_polling: 200,
            warmup_blocking: 20,
            latency_budget: Duration::from_millis(60),
            max_samples: 50_000,
            stream_budget: Duration::from_millis(50),
            file_bytes: 8 << 20,
            file_rounds: 1,
        }
    }
}

/// How a receiver waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Sleeps on the doorbell at once.
    Blocking,
    /// Spins (interrupts masked) before it sleeps.
    Polling,
}

impl Mode {
    /// The modes in the order the demo measures them.
    pub const ALL: [Mode; 2] = [Mode::Blocking, Mode::Polling];

    /// The mode's name in the table and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Blocking => "blocking",
            Mode::Polling => "polling",
        }
    }
}

/// Round-trip latency of one mechanism.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Round trips measured (after the warm-up).
    pub samples: usize,
    /// Median round trip, in nanoseconds.
    pub p50_ns: u64,
    /// 99th-percentile round trip, in nanoseconds.
    pub p99_ns: u64,
    /// Doorbell signals per round trip, both processes together; `None` for sockets.
    pub signals_per_round_trip: Option<f64>,
}

impl Latency {
    /// Summarises round-trip times in nanoseconds; `None` without samples.
    fn from_samples(mut samples: Vec<u64>, signals_per_round_trip: Option<f64>) -> Option<Self> {
        samples.sort_unstable();
        let n = samples.len();
        let at = |pct: usize| samples.get((n.saturating_sub(1)) * pct / 100).copied();
        Some(Self {
            samples: n,
            p50_ns: at(50)?,
            p99_ns: at(99)?,
            signals_per_round_trip,
        })
    }
}

/// Latency of vmlink in one mode beside the socket baseline.
#[derive(Debug, Clone, Copy)]
pub struct LatencyRow {
    /// How vmlink's receivers waited.
    pub mode: Mode,
    /// vmlink's round trips.
    pub vmlink: Latency,
    /// The socket's round trips (blocking reads; the same baseline for every mode).
    pub socket: Latency,
}

/// One-way streaming throughput of one mechanism.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    /// Packets delivered and checked.
    pub packets: u64,
    /// Time from the host's command until it had the last packet.
    pub elapsed: Duration,
    /// Doorbell signals, both processes together; `None` for sockets.
    pub signals: Option<u64>,
}

impl Throughput {
    /// Packets per second.
    pub fn packets_per_s(&self) -> f64 {
        self.packets as f64 / self.elapsed.as_secs_f64()
    }

    /// Payload gigabytes (10^9 bytes) per second for packets of `packet_bytes`.
    pub fn gb_per_s(&self, packet_bytes: usize) -> f64 {
        self.packets_per_s() * packet_bytes as f64 / 1e9
    }

    /// Doorbell signals per packet, if counted.
    pub fn signals_per_packet(&self) -> Option<f64> {
        self.signals.map(|s| s as f64 / self.packets.max(1) as f64)
    }
}

/// Streaming throughput for one packet size, vmlink beside the socket baseline.
#[derive(Debug, Clone, Copy)]
pub struct ThroughputRow {
    /// Payload bytes per packet.
    pub packet_bytes: usize,
    /// vmlink's run.
    pub vmlink: Throughput,
    /// The socket's run.
    pub socket: Throughput,
}

/// The copies of the demo file from the guest to the host by one mechanism.
#[derive(Debug, Clone)]
pub struct FileCopy {
    /// Each measured copy's time, from the host's command until the host had written the
    /// last byte, in the order they ran.
    pub times: Vec<Duration>,
    /// The hash of the file as the host wrote it the last time (see [`crate::hash`]).
    pub hash: u64,
    /// Whether every copy matched the guest's hash, on both sides.
    pub verified: bool,
}

impl FileCopy {
    /// The median measured copy (the slower middle one of an even count); zero without any.
    pub fn elapsed(&self) -> Duration {
        let mut times = self.times.clone();
        times.sort_unstable();
        times.get(times.len() / 2).copied().unwrap_or_default()
    }

    /// Gigabytes (10^9 bytes) per second of the median copy of a file of `bytes`.
    pub fn gb_per_s(&self, bytes: u64) -> f64 {
        bytes as f64 / self.elapsed().as_secs_f64() / 1e9
    }
}

/// The file copied both ways.
#[derive(Debug, Clone)]
pub struct FileRow {
    /// The file's size.
    pub bytes: u64,
    /// Through the buffer area, GPA-direct packets naming its pages.
    pub vmlink: FileCopy,
    /// Through the baseline socket.
    pub socket: FileCopy,
}

/// The machine the demo ran on, as far as it matters for reading the numbers.
#[derive(Debug, Clone, Copy)]
pub struct Machine {
    /// CPUs this process may use.
    pub cpus: usize,
    /// The 1-minute load average before the run (Linux), if known.
    pub load_average: Option<f64>,
}

impl Machine {
    /// Looks at the machine now.
    fn now() -> Self {
        let load_average = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok());
        Self {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            load_average,
        }
    }

    /// Whether other work was competing for the CPUs.
    pub fn busy(&self) -> bool {
        self.load_average
            .is_some_and(|l| l >= 0.5 * self.cpus as f64)
    }
}

/// Everything one demo run measured and checked.
#[derive(Debug, Clone)]
pub struct Results {
    /// Where it ran.
    pub machine: Machine,
    /// How long it measured.
    pub plan: Plan,
    /// Round-trip latency, one row per mode.
    pub latency: Vec<LatencyRow>,
    /// Streaming throughput, one row per packet size.
    pub throughput: Vec<ThroughputRow>,
    /// The file copy.
    pub file: FileRow,
    /// The data check of everything that crossed vmlink channels (both processes).
    pub vmlink_check: Tally,
    /// The data check of everything that crossed the baseline socket (both processes).
    pub socket_check: Tally,
}

impl Results {
    /// Mismatches found anywhere.
    pub fn mismatches(&self) -> u64 {
        self.vmlink_check.mismatches + self.socket_check.mismatches
    }

    /// The first mismatch found, if any.
    pub fn first_mismatch(&self) -> Option<&str> {
        self.vmlink_check
            .first_mismatch
            .as_deref()
            .or(self.socket_check.first_mismatch.as_deref())
    }
}

/// A duration in whole nanoseconds, saturating.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
