//! The measurements: vmlink rings between two threads, and Unix socket baselines run
//! between two threads in the same way, in the same run.

mod ring;
mod socket;

use std::time::Duration;

use crate::error::DemoError;
use crate::pattern::Tally;

pub use ring::Mode;

/// Payload bytes of a latency request and of its response.
pub const PING_BYTES: usize = 64;
/// Payload sizes streamed one way.
pub const STREAM_SIZES: [usize; 3] = [64, 4096, 64 * 1024];
/// Data area of each ring of the latency channel.
pub const LATENCY_RING_BYTES: usize = 64 * 1024;
/// Data area of the streaming ring.
pub const STREAM_RING_BYTES: usize = 1024 * 1024;
/// A streaming writer commits (and a socket writer calls `write`) after this many
/// packets, or after [`BATCH_BYTES`], whichever comes first; the reader publishes its
/// read index by the same rule.
pub const BATCH_PACKETS: usize = 32;
/// Payload bytes after which a batch is committed.
pub const BATCH_BYTES: usize = 64 * 1024;
/// Bytes moved per `write_payload` / `read_payload` call: packets are filled and checked
/// in chunks of this size, so the data stays in cache.
pub const CHUNK: usize = 4096;
/// Round trips a latency measurement always takes before it may stop on its time budget.
const MIN_SAMPLES: usize = 100;

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
}

impl Plan {
    /// The full demo: about 3 seconds in all.
    pub fn full() -> Self {
        Self {
            warmup_polling: 2000,
            warmup_blocking: 200,
            latency_budget: Duration::from_millis(350),
            max_samples: 500_000,
            stream_budget: Duration::from_millis(220),
        }
    }

    /// The CI run: well under a second.
    pub fn quick() -> Self {
        Self {
            warmup_polling: 200,
            warmup_blocking: 20,
            latency_budget: Duration::from_millis(50),
            max_samples: 50_000,
            stream_budget: Duration::from_millis(25),
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
    /// Doorbell signals per round trip, both sides together; `None` for sockets.
    pub signals_per_round_trip: Option<f64>,
}

impl Latency {
    /// Summarises round-trip times in nanoseconds.
    fn from_samples(
        mut samples: Vec<u64>,
        signals_per_round_trip: Option<f64>,
        what: &'static str,
    ) -> Result<Self, DemoError> {
        samples.sort_unstable();
        let n = samples.len();
        let at = |pct: usize| samples.get((n.saturating_sub(1)) * pct / 100).copied();
        match (at(50), at(99)) {
            (Some(p50_ns), Some(p99_ns)) => Ok(Self {
                samples: n,
                p50_ns,
                p99_ns,
                signals_per_round_trip,
            }),
            _ => Err(DemoError::NoSamples(what)),
        }
    }
}

/// Latency of vmlink in one mode beside the socket baseline.
#[derive(Debug, Clone, Copy)]
pub struct LatencyRow {
    /// How the vmlink readers waited.
    pub mode: Mode,
    /// vmlink's round trips.
    pub vmlink: Latency,
    /// The socketpair's round trips.
    pub socket: Latency,
}

/// One-way streaming throughput of one mechanism.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    /// Packets delivered and checked.
    pub packets: u64,
    /// Time from the start signal until the reader had the last packet.
    pub elapsed: Duration,
    /// Doorbell signals, both directions together; `None` for sockets.
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
    /// The socketpair's run.
    pub socket: Throughput,
}

/// The machine the demo ran on, as far as it matters for reading the numbers.
#[derive(Debug, Clone, Copy)]
pub struct Machine {
    /// CPUs this process may use.
    pub cpus: usize,
    /// The 1-minute load average before the run (Linux), if known: other processes
    /// competing for the CPUs make every number noisier.
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
}

/// Everything one demo run measured and checked.
#[derive(Debug, Clone)]
pub struct Results {
    /// Where it ran.
    pub machine: Machine,
    /// Round-trip latency, one row per mode.
    pub latency: Vec<LatencyRow>,
    /// Streaming throughput, one row per packet size.
    pub throughput: Vec<ThroughputRow>,
    /// The data check of everything that crossed vmlink rings.
    pub vmlink_check: Tally,
    /// The data check of everything that crossed the baseline sockets.
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

/// Runs every measurement in turn.
pub fn run(plan: &Plan) -> Result<Results, DemoError> {
    let machine = Machine::now();
    let mut vmlink_check = Tally::default();
    let mut socket_check = Tally::default();

    let (socket_latency, tally) = socket::latency(plan)?;
    socket_check.merge(tally);
    let mut latency = Vec::new();
    for mode in Mode::ALL {
        let (vmlink, tally) = ring::latency(plan, mode)?;
        vmlink_check.merge(tally);
        latency.push(LatencyRow {
            mode,
            vmlink,
            socket: socket_latency,
        });
    }

    let mut throughput = Vec::new();
    for packet_bytes in STREAM_SIZES {
        let (vmlink, tally) = ring::stream(plan, packet_bytes)?;
        vmlink_check.merge(tally);
        let (socket, tally) = socket::stream(plan, packet_bytes)?;
        socket_check.merge(tally);
        throughput.push(ThroughputRow {
            packet_bytes,
            vmlink,
            socket,
        });
    }

    Ok(Results {
        machine,
        latency,
        throughput,
        vmlink_check,
        socket_check,
    })
}

/// A duration in whole nanoseconds, saturating.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
