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
//!
//! With `--secure` the host then writes a key pair for each side into that directory, and
//! the guest connects two more channels alike in every way but one: the second runs the
//! secure layer (`vmlink-secure`: a Noise `XX` handshake with those keys, then every packet
//! sealed). Round trips and 64 KiB streams go over both in interleaved rounds, so the table
//! shows what the encryption costs.

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
/// A streaming sender commits after this many packets, or after [`BATCH_BYTES`],
/// whichever comes first: small commits keep the receiver busy on packets committed
/// moments ago, inside its spin, rather than asleep between large batches.
pub const BATCH_PACKETS: usize = 32;
/// Payload bytes after which a streaming batch is committed.
pub const BATCH_BYTES: usize = 64 * 1024;

/// Packets of `size` bytes a streaming sender commits at once.
pub fn packets_per_commit(size: usize) -> usize {
    BATCH_PACKETS.min(BATCH_BYTES.div_ceil(size.max(1)))
}

/// File chunks in flight at once: slots in the guest's half of the buffer area.
pub const FILE_SLOTS: usize = BUFFER_BYTES as usize / 2 / FILE_CHUNK;
/// The most packets a streaming receiver takes per receive (one commit of the read index).
pub const RECV_BATCH: usize = 256;
/// Bytes a socket streaming sender buffers per write.
pub const SOCKET_BUFFER: usize = 64 * 1024;
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
/// Data area of each ring of the two channels of the secure comparison (room for 64 KiB
/// packets in batches).
pub const SECURE_RING_BYTES: u64 = 1 << 20;
/// Payload bytes of the secure comparison's stream packets.
pub const SECURE_STREAM_BYTES: usize = 64 * 1024;
/// The guest's channel numbers in commands: the control channel, the polling channel, and
/// the secure comparison's plain and secure channels.
pub mod channel_no {
    /// The control channel.
    pub const CONTROL: u64 = 0;
    /// The polling channel.
    pub const POLLING: u64 = 1;
    /// The secure comparison's plain channel.
    pub const PLAIN: u64 = 2;
    /// The secure comparison's secure channel.
    pub const SECURE: u64 = 3;
}

/// The secure channel over vmlink-shm rings, as both processes hold it.
use crate::secure::SecureShm;

/// A cipher as a command word.
fn cipher_to_wire(cipher: vmlink_secure::Cipher) -> u64 {
    match cipher {
        vmlink_secure::Cipher::ChaChaPoly => 0,
        vmlink_secure::Cipher::AesGcm => 1,
    }
}

/// A cipher from a command word.
fn cipher_from_wire(word: u64) -> crate::error::Result<vmlink_secure::Cipher> {
    match word {
        0 => Ok(vmlink_secure::Cipher::ChaChaPoly),
        1 => Ok(vmlink_secure::Cipher::AesGcm),
        other => crate::error::fail(format!("no cipher {other}")),
    }
}

/// Round trips a latency measurement always takes before it may stop on its time budget.
const MIN_SAMPLES: usize = 100;

/// The service name of the control channel.
const CONTROL_SERVICE: &str = "vmlink-demo";
/// The service name of the polling channel.
const POLLING_SERVICE: &str = "vmlink-demo-polling";
/// The polling channel's socket, in the demo's directory.
const POLLING_SOCKET: &str = "polling.sock";
/// The service name of the secure comparison's plain channel.
const PLAIN_TWIN_SERVICE: &str = "vmlink-demo-plain";
/// The service name of the secure comparison's secure channel.
const SECURE_SERVICE: &str = "vmlink-demo-secure";
/// The plain channel's socket, in the demo's directory.
const PLAIN_TWIN_SOCKET: &str = "plain.sock";
/// The secure channel's socket, in the demo's directory.
const SECURE_SOCKET: &str = "secure.sock";
/// The host's private key file, in the demo's directory (its public key: `host.key.pub`).
const HOST_KEY: &str = "host.key";
/// The guest's private key file, in the demo's directory (its public key: `guest.key.pub`).
const GUEST_KEY: &str = "guest.key";
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
    /// Time for each round of a streaming measurement.
    pub stream_budget: Duration,
    /// Rounds of each streaming measurement, vmlink and the socket alternating.
    pub stream_rounds: usize,
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
            stream_budget: Duration::from_millis(100),
            stream_rounds: 3,
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
            stream_rounds: 1,
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

/// One-way streaming throughput of one mechanism, over all its rounds.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    /// Packets delivered and checked.
    pub packets: u64,
    /// Time from the host's command until it had the last packet, summed over the rounds.
    pub elapsed: Duration,
    /// Doorbell signals, both processes together; `None` for sockets.
    pub signals: Option<u64>,
    /// CPU time the sending thread (the guest's) ran, if the system says.
    pub sender_cpu: Option<Duration>,
    /// CPU time the receiving thread (the host's) ran, if the system says.
    pub receiver_cpu: Option<Duration>,
}

impl Throughput {
    /// Nothing measured yet; `signals` counted (`Some`) or not.
    fn zero(signals: bool) -> Self {
        Self {
            packets: 0,
            elapsed: Duration::ZERO,
            signals: signals.then_some(0),
            sender_cpu: Some(Duration::ZERO),
            receiver_cpu: Some(Duration::ZERO),
        }
    }

    /// Adds a round.
    fn add(&mut self, round: Throughput) {
        fn sum<T: std::ops::Add<Output = T>>(a: Option<T>, b: Option<T>) -> Option<T> {
            a.zip(b).map(|(a, b)| a + b)
        }
        self.packets += round.packets;
        self.elapsed += round.elapsed;
        self.signals = sum(self.signals, round.signals);
        self.sender_cpu = sum(self.sender_cpu, round.sender_cpu);
        self.receiver_cpu = sum(self.receiver_cpu, round.receiver_cpu);
    }

    /// The share of the time the sender was running, if known.
    pub fn sender_busy(&self) -> Option<f64> {
        self.sender_cpu.map(|c| busy(c, self.elapsed))
    }

    /// The share of the time the receiver was running, if known.
    pub fn receiver_busy(&self) -> Option<f64> {
        self.receiver_cpu.map(|c| busy(c, self.elapsed))
    }

    /// The busier side: whether it is the sender, its share of the time on CPU, and its
    /// CPU nanoseconds per packet.
    pub fn busier(&self) -> Option<(bool, f64, f64)> {
        let (s, r) = (self.sender_cpu?, self.receiver_cpu?);
        let sender = s >= r;
        let cpu = if sender { s } else { r };
        let per_packet = cpu.as_nanos() as f64 / self.packets.max(1) as f64;
        Some((sender, busy(cpu, self.elapsed), per_packet))
    }

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

/// The secure comparison (`--secure`): the same polling channel with and without the
/// secure layer, measured in interleaved rounds.
#[derive(Debug, Clone)]
pub struct SecureRow {
    /// The transport cipher.
    pub cipher: vmlink_secure::Cipher,
    /// The host's handshake, from the guest's connection to the channel's being ready.
    pub handshake: Duration,
    /// The fingerprint of the key the guest proved.
    pub guest_key: String,
    /// Whether that is the key the host wrote for the guest (and authorized).
    pub guest_key_expected: bool,
    /// Round trips over the plain channel.
    pub plain_latency: Latency,
    /// Round trips over the secure channel.
    pub secure_latency: Latency,
    /// [`SECURE_STREAM_BYTES`] packets streamed over the plain channel.
    pub plain_stream: Throughput,
    /// The same over the secure channel.
    pub secure_stream: Throughput,
}

impl SecureRow {
    /// The secure median round trip over the plain one.
    pub fn latency_ratio(&self) -> f64 {
        self.secure_latency.p50_ns as f64 / self.plain_latency.p50_ns.max(1) as f64
    }

    /// The secure stream's rate over the plain one's.
    pub fn stream_ratio(&self) -> f64 {
        self.secure_stream.packets_per_s() / self.plain_stream.packets_per_s()
    }
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
    /// The most the control channel's blocking waits spin before they sleep.
    pub spin_before_sleep: Duration,
    /// Round-trip latency, one row per mode.
    pub latency: Vec<LatencyRow>,
    /// Streaming throughput, one row per packet size.
    pub throughput: Vec<ThroughputRow>,
    /// The file copy.
    pub file: FileRow,
    /// The secure comparison, with `--secure`.
    pub secure: Option<SecureRow>,
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

/// `cpu` as a share of `elapsed`.
fn busy(cpu: Duration, elapsed: Duration) -> f64 {
    cpu.as_secs_f64() / elapsed.as_secs_f64()
}

/// CPU time the calling thread has run so far, if the system says (Linux's
/// `/proc/thread-self/schedstat`, in nanoseconds).
fn thread_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// The CPU time since `start` as whole nanoseconds for the wire, 0 when unknown.
fn cpu_since(start: Option<Duration>) -> u64 {
    start
        .zip(thread_cpu())
        .map_or(0, |(a, b)| nanos(b.saturating_sub(a)).max(1))
}

/// A CPU time from the wire (0: unknown).
fn cpu_from_wire(ns: u64) -> Option<Duration> {
    (ns > 0).then(|| Duration::from_nanos(ns))
}

/// A duration in whole nanoseconds, saturating.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_alternate_which_goes_first() {
        assert_eq!(order(0), [false, true]);
        assert_eq!(order(1), [true, false]);
        assert_eq!(order(2), order(0));
    }

    #[test]
    fn a_copy_reports_its_median() {
        let ms = Duration::from_millis;
        let copy = |times: &[u64]| FileCopy {
            times: times.iter().map(|&t| ms(t)).collect(),
            hash: 0,
            verified: true,
        };
        assert_eq!(copy(&[30, 10, 20]).elapsed(), ms(20));
        assert_eq!(
            copy(&[40, 10]).elapsed(),
            ms(40),
            "the slower middle of two"
        );
        assert_eq!(copy(&[]).elapsed(), Duration::ZERO);
        assert!((copy(&[500]).gb_per_s(1_000_000_000) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn commits_hold_32_packets_or_64_kib() {
        assert_eq!(packets_per_commit(64), 32);
        assert_eq!(packets_per_commit(4096), 16);
        assert_eq!(packets_per_commit(64 * 1024), 1);
        assert_eq!(packets_per_commit(1 << 20), 1);
        assert_eq!(FILE_SLOTS, 8);
    }

    #[test]
    fn rounds_add_up_and_the_busier_side_is_named() {
        let ms = Duration::from_millis;
        let round = |packets, sender, receiver| Throughput {
            packets,
            elapsed: ms(100),
            signals: Some(1),
            sender_cpu: Some(ms(sender)),
            receiver_cpu: Some(ms(receiver)),
        };
        let mut total = Throughput::zero(true);
        total.add(round(1000, 90, 50));
        total.add(round(1000, 100, 60));
        assert_eq!(
            (total.packets, total.elapsed, total.signals),
            (2000, ms(200), Some(2))
        );
        let near = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
        assert!(near(total.sender_busy(), 0.95));
        assert!(near(total.receiver_busy(), 0.55));
        let (sender, busy, ns) = total.busier().expect("both sides timed");
        assert!(sender);
        assert!(near(Some(busy), 0.95));
        assert!(near(Some(ns), 95_000.0), "190 ms of CPU over 2000 packets");

        // A side without a CPU time makes the sum unknown, not smaller.
        total.add(Throughput {
            receiver_cpu: None,
            ..round(1, 1, 1)
        });
        assert_eq!(total.receiver_busy(), None);
        assert_eq!(total.busier(), None);
        let mut socket = Throughput::zero(false);
        socket.add(Throughput {
            signals: None,
            ..round(5, 1, 1)
        });
        assert_eq!(socket.signals, None);
    }

    #[test]
    fn cpu_times_cross_the_wire_with_zero_for_unknown() {
        assert_eq!(cpu_from_wire(0), None);
        assert_eq!(cpu_from_wire(7), Some(Duration::from_nanos(7)));
        assert_eq!(cpu_since(None), 0);
        if let Some(start) = thread_cpu() {
            assert!(
                cpu_since(Some(start)) >= 1,
                "a known time is never sent as 0"
            );
        }
    }
}
