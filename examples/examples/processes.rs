//! Processes: vmlink-shm with the peer in another process beside the same peer in a thread
//! of this process, measured in the same interleaved rounds with the measuring thread pinned
//! to CPU 0 and the peer (thread or process) to CPU 1. Every message is checked on the side
//! that receives it.
//!
//! Both peers are guests of the same service, connected through vmlink-shm the same way:
//! the host's handshake on one end of a Unix socket pair, the guest's on the other, a sealed
//! memfd of the same layout mapped by each side. The process peer is this example run again
//! (spawned with [`Service::spawn`], its role in `VMLINK_PROCESSES_ROLE`); the thread peer
//! runs the same code in a thread. So the one difference is process against thread.
//!
//! Cases, all 64-byte messages: a polling round trip (the host's `call` with
//! `Config::polling`, the peer answering with `complete`), and a stream each way (`batch()`
//! of 32 per commit, the receiver spinning on `recv_batch(64, Wait::Now)`). Each round runs
//! every case once with each peer, the thread first in even rounds and the process first in
//! odd ones, so drift favours neither; the report gives each case's median across rounds and
//! the ratio process/thread, computed per round and then medianed.
//!
//! One difference comes with being a process: a receive with `Wait::Now` that finds nothing
//! asks the hang-up socket with `poll()` whether the peer is gone, and a system call on an
//! fd costs tens of nanoseconds more in a multi-threaded process (the kernel takes a
//! reference on the file while the fd table is shared) than in a single-threaded one. The
//! thread peer shares the host's fd table, the process peer has its own, so a spinning
//! process peer looks at the ring a little more often, which shows in the round trip.
//!
//! The peer process never outlives the host for long: it leaves with a message when the
//! channel says the host is gone, and exits non-zero when a message it checks is wrong,
//! which the host reports as a failure. `VMLINK_PROCESSES_MISMATCH=thread` or `=process`
//! tells that peer the host→guest stream starts one message later than it does, to try
//! that path.
//!
//! `cargo run --release -p vmlink-examples --example processes [ROUNDS]`

use std::hint::spin_loop;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmlink_channel::{ChannelError, Doorbell};
use vmlink_shm::{Config, Endpoint, Guest, Layout, Service, ShmChannel, Wait};

#[allow(dead_code)]
#[path = "common/message.rs"]
mod message;
#[path = "common/rounds.rs"]
mod rounds;
use rounds::{cpus, load_average, median, pin, rounds_arg};

use message::{check, msg};

/// Round trips in the warm-up round, per peer.
const RTT_MSGS: u64 = 100_000;
/// Messages per streaming case in the warm-up round, per peer.
const STREAM_MSGS: u64 = 2_000_000;
/// What a case should take per round and peer: its message count for the recorded rounds
/// is set from the faster peer's time in the warm-up round (on this kind of virtual
/// machine the speed of the same code changes severalfold from run to run).
const CASE_NS: f64 = 150e6;
/// Data bytes of each ring (holds 744 packets of 64 bytes), as in `floors`.
const RING: u64 = 16 * 4096;
/// Messages per commit in the streams, and the most a consumer takes per commit.
const BATCH: u64 = 32;
/// The channel's polling budget: an echoing peer always answers inside it.
const SPIN: u32 = 10_000;
/// The service both peers connect to.
const SERVICE: &str = "processes";
/// Set (to `guest`) in the spawned peer process.
const ROLE_ENV: &str = "VMLINK_PROCESSES_ROLE";
/// `thread` or `process`: that peer is told a wrong first message number.
const MISMATCH_ENV: &str = "VMLINK_PROCESSES_MISMATCH";
/// The longest a control message (command, ready, done) may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Pinning, spinning, control messages.
// ---------------------------------------------------------------------------------------

type Res<T> = Result<T, String>;

/// A pure spin wait (each side owns a CPU) that notices a departed peer.
#[derive(Default)]
struct Spin(u32);

impl Spin {
    #[inline]
    fn snooze(&mut self, ch: &ShmChannel) -> Res<()> {
        self.0 = self.0.wrapping_add(1);
        // The hang-up check is a system call: only now and then.
        if self.0.is_multiple_of(4096) && ch.doorbell().peer_closed() {
            return Err("the peer is gone (its end of the socket closed)".into());
        }
        spin_loop();
        Ok(())
    }
}

/// Host to guest: run a workload of `count` messages, the first numbered `first`.
const ECHO: u64 = 1;
const SINK: u64 = 2;
const SOURCE: u64 = 3;
/// Host to guest: leave.
const QUIT: u64 = 4;
/// Guest to host: about to start; finished.
const READY: u64 = 10;
const DONE: u64 = 11;

/// A control message: `[kind, count, first]`.
type Control = [u64; 3];

fn encode(c: Control) -> [u8; 24] {
    let mut b = [0u8; 24];
    for (chunk, w) in b.chunks_exact_mut(8).zip(c) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    b
}

fn decode(payload: &[u8]) -> Res<Control> {
    if payload.len() != 24 {
        return Err(format!(
            "a control message of {} bytes, not 24",
            payload.len()
        ));
    }
    Ok(std::array::from_fn(|i| {
        u64::from_le_bytes(payload[8 * i..8 * i + 8].try_into().expect("8 bytes"))
    }))
}

fn send_control(ch: &ShmChannel, c: Control) -> Res<()> {
    ch.send(&encode(c), Wait::Until(Instant::now() + CONTROL_TIMEOUT))
        .map_err(|e| format!("sending control message {c:?}: {e}"))
}

/// Spins (interrupts masked) until the control message `kind` arrives.
fn spin_for_control(ch: &ShmChannel, kind: u64) -> Res<()> {
    ch.mask_interrupts();
    let deadline = Instant::now() + CONTROL_TIMEOUT;
    let mut buf = [0u8; 64];
    let mut spin = Spin::default();
    loop {
        match ch.recv(&mut buf, Wait::Now) {
            Ok(r) => {
                let c = decode(r.payload(&buf))?;
                return if c[0] == kind {
                    Ok(())
                } else {
                    Err(format!("control message {c:?}, expected kind {kind}"))
                };
            }
            Err(ChannelError::Empty) => {
                spin.snooze(ch)?;
                if spin.0.is_multiple_of(4096) && Instant::now() > deadline {
                    return Err(format!(
                        "no control message {kind} within {CONTROL_TIMEOUT:?}"
                    ));
                }
            }
            Err(e) => return Err(format!("waiting for control message {kind}: {e}")),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The two sides of each workload. The host's side returns nanoseconds per message: from
// the peer's READY (its workload starts at once) until the last message is received.
// ---------------------------------------------------------------------------------------

/// Sends `count` messages numbered from 0 in batches of [`BATCH`] (a batch ends early when
/// the ring is full).
fn produce(ch: &ShmChannel, count: u64) -> Res<()> {
    let mut spin = Spin::default();
    let mut seq = 0;
    while seq < count {
        let mut batch = ch.batch().map_err(|e| format!("batch: {e}"))?;
        let stop = count.min(seq + BATCH);
        while seq < stop {
            match batch.push_in_band(&msg(seq)) {
                Ok(()) => seq += 1,
                Err(ChannelError::Full) => break,
                Err(e) => return Err(format!("batch push {seq}: {e}")),
            }
        }
        let full = seq < stop;
        batch.commit().map_err(|e| format!("commit: {e}"))?;
        if full {
            spin.snooze(ch)?;
        }
    }
    Ok(())
}

/// Receives `count` messages numbered from `first` with `recv_batch(64, Wait::Now)` (fewer
/// at the end), checking each.
fn consume(ch: &ShmChannel, count: u64, first: u64) -> Res<()> {
    ch.mask_interrupts();
    let mut spin = Spin::default();
    let mut buf = [0u8; 64];
    let (mut seq, end) = (first, first + count);
    while seq < end {
        // No further than the stream: the peer's DONE follows it.
        let max = (end - seq).min(64) as usize;
        let n = ch
            .recv_batch(max, Wait::Now, |p| {
                p.read_payload(0, &mut buf).expect("64-byte payload");
                check(seq, &buf);
                seq += 1;
            })
            .map_err(|e| format!("receive at message {seq}: {e}"))?;
        if n == 0 {
            spin.snooze(ch)?;
        }
    }
    Ok(())
}

/// Host side of case 1: `count` polling calls, each response checked.
fn host_rtt(ch: &ShmChannel, count: u64, _first: u64) -> Res<f64> {
    send_control(ch, [ECHO, count, 0])?;
    spin_for_control(ch, READY)?;
    let start = Instant::now();
    let mut resp = [0u8; 64];
    for seq in 0..count {
        let len = ch
            .call(&msg(seq), &mut resp, Wait::Forever)
            .map_err(|e| format!("call {seq}: {e}"))?;
        check(seq, &resp[..len]);
    }
    let ns = start.elapsed().as_nanos() as f64 / count as f64;
    spin_for_control(ch, DONE)?;
    Ok(ns)
}

/// Host side of case 2: the host produces; the time runs until the peer's DONE.
fn host_to_guest(ch: &ShmChannel, count: u64, first: u64) -> Res<f64> {
    send_control(ch, [SINK, count, first])?;
    spin_for_control(ch, READY)?;
    let start = Instant::now();
    produce(ch, count)?;
    spin_for_control(ch, DONE)?;
    Ok(start.elapsed().as_nanos() as f64 / count as f64)
}

/// Host side of case 3: the host consumes.
fn guest_to_host(ch: &ShmChannel, count: u64, _first: u64) -> Res<f64> {
    send_control(ch, [SOURCE, count, 0])?;
    spin_for_control(ch, READY)?;
    let start = Instant::now();
    consume(ch, count, 0)?;
    let ns = start.elapsed().as_nanos() as f64 / count as f64;
    spin_for_control(ch, DONE)?;
    Ok(ns)
}

/// The peer's side of case 1: answers `count` requests with `complete`, each checked.
fn guest_echo(ch: &ShmChannel, count: u64) -> Res<()> {
    ch.mask_interrupts();
    let mut buf = [0u8; 64];
    let mut spin = Spin::default();
    for seq in 0..count {
        let r = loop {
            match ch.recv(&mut buf, Wait::Now) {
                Ok(r) => break r,
                Err(ChannelError::Empty) => spin.snooze(ch)?,
                Err(e) => return Err(format!("receive request {seq}: {e}")),
            }
        };
        let request = r.payload(&buf);
        check(seq, request);
        ch.complete(r.transaction_id, request, Wait::Now)
            .map_err(|e| format!("complete {seq}: {e}"))?;
    }
    Ok(())
}

/// The peer: runs the host's commands until told to quit. An error when the host is gone.
fn guest_serve(ch: &ShmChannel) -> Res<()> {
    let mut buf = [0u8; 64];
    loop {
        let r = match ch.recv(&mut buf, Wait::Forever) {
            Ok(r) => r,
            Err(ChannelError::Closed) => {
                return Err("the host is gone (the channel closed); leaving".into());
            }
            Err(e) => return Err(format!("waiting for a command: {e}")),
        };
        let [kind, count, first] = decode(r.payload(&buf))?;
        if kind == QUIT {
            return Ok(());
        }
        send_control(ch, [READY, 0, 0])?;
        match kind {
            ECHO => guest_echo(ch, count)?,
            SINK => consume(ch, count, first)?,
            SOURCE => produce(ch, count)?,
            other => return Err(format!("unknown command {other}")),
        }
        send_control(ch, [DONE, 0, 0])?;
    }
}

/// Both sides' channel configuration.
fn config() -> Config {
    Config::polling(SPIN)
}

fn service() -> Service {
    Service::new(SERVICE)
        .with_layout(Layout::symmetric(RING, 0))
        .with_config(config())
}

/// The spawned peer process: connects over the inherited socket and serves.
fn guest_process() -> ! {
    pin(1);
    let endpoint = match Guest::new(SERVICE).with_config(config()).from_env() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("processes: peer process: handshake: {e}");
            std::process::exit(1);
        }
    };
    match guest_serve(endpoint.channel()) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("processes: peer process: {e}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The two peers.
// ---------------------------------------------------------------------------------------

enum Kind {
    Thread(Option<JoinHandle<Res<()>>>),
    Process(Child),
}

/// A connected peer and the host's end of its channel.
struct Peer {
    host: Endpoint,
    kind: Kind,
    /// The first message number the peer is told for the host→guest stream (0 unless a
    /// mismatch is asked for).
    first: u64,
}

impl Peer {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Thread(_) => "thread",
            Kind::Process(_) => "process",
        }
    }

    fn thread() -> Self {
        let (h, g) = UnixStream::pair().expect("socketpair");
        let handle = thread::Builder::new()
            .name("guest".into())
            .spawn(move || {
                pin(1);
                let endpoint = Guest::new(SERVICE)
                    .with_config(config())
                    .connect_stream(g)
                    .map_err(|e| format!("handshake: {e}"))?;
                guest_serve(endpoint.channel())
            })
            .expect("spawn the peer thread");
        let host = service()
            .serve_stream(h)
            .expect("handshake with the peer thread");
        Self::new(host, Kind::Thread(Some(handle)))
    }

    fn process() -> Self {
        let exe = std::env::current_exe().expect("this example's path");
        let mut cmd = Command::new(exe);
        cmd.env(ROLE_ENV, "guest");
        let (host, child) = service()
            .spawn(&mut cmd)
            .expect("spawn the peer process and shake hands");
        Self::new(host, Kind::Process(child))
    }

    fn new(host: Endpoint, kind: Kind) -> Self {
        let mut peer = Self {
            host,
            kind,
            first: 0,
        };
        if std::env::var(MISMATCH_ENV).is_ok_and(|v| v == peer.name()) {
            peer.first = 1;
        }
        peer
    }

    /// How the peer ended, after a failure seen by the host (waits a few seconds for it).
    fn fate(&mut self) -> String {
        match &mut self.kind {
            Kind::Thread(handle) => match handle.take().map(JoinHandle::join) {
                Some(Ok(Ok(()))) => "the peer thread finished without error".into(),
                Some(Ok(Err(e))) => format!("the peer thread failed: {e}"),
                Some(Err(p)) => format!(
                    "the peer thread panicked: {}",
                    p.downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| p.downcast_ref::<&str>().copied())
                        .unwrap_or("?")
                ),
                None => "the peer thread was joined already".into(),
            },
            Kind::Process(child) => {
                let give_up = Instant::now() + Duration::from_secs(5);
                loop {
                    match child.try_wait() {
                        Ok(Some(status)) => {
                            return format!("the peer process {} exited: {status}", child.id());
                        }
                        Ok(None) if Instant::now() < give_up => {
                            thread::sleep(Duration::from_millis(10));
                        }
                        Ok(None) => {
                            let _ = child.kill();
                            let _ = child.wait();
                            return format!("the peer process {} hung; killed", child.id());
                        }
                        Err(e) => return format!("waiting for the peer process: {e}"),
                    }
                }
            }
        }
    }

    /// Runs `count` messages of one case with this peer, or reports the failure and exits
    /// non-zero.
    fn run(&mut self, case: &Case, count: u64) -> f64 {
        match (case.run)(self.host.channel(), count, self.first) {
            Ok(ns) => ns,
            Err(e) => {
                eprintln!(
                    "FAILED: {} with the peer as a {}: {e}",
                    case.name,
                    self.name()
                );
                eprintln!("  {}", self.fate());
                std::process::exit(1);
            }
        }
    }

    /// Tells the peer to leave and checks that it did so cleanly.
    fn finish(mut self) {
        if let Err(e) = send_control(self.host.channel(), [QUIT, 0, 0]) {
            eprintln!("FAILED: telling the peer {} to quit: {e}", self.name());
            std::process::exit(1);
        }
        let ok = match &mut self.kind {
            Kind::Thread(handle) => matches!(handle.take().map(JoinHandle::join), Some(Ok(Ok(())))),
            Kind::Process(child) => child.wait().is_ok_and(|s| s.success()),
        };
        if !ok {
            eprintln!("FAILED: the peer {} did not end cleanly", self.name());
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Rounds and the report.
// ---------------------------------------------------------------------------------------

struct Case {
    /// In the per-round lines.
    short: &'static str,
    /// In the report.
    name: &'static str,
    /// Messages in the warm-up round.
    count: u64,
    /// Decimals of its nanoseconds in the report.
    prec: usize,
    run: fn(&ShmChannel, u64, u64) -> Res<f64>,
}

const CASES: [Case; 3] = [
    Case {
        short: "call",
        name: "round trip, polling call/complete",
        count: RTT_MSGS,
        prec: 0,
        run: host_rtt,
    },
    Case {
        short: "h->g",
        name: "stream host->guest, batch 32",
        count: STREAM_MSGS,
        prec: 1,
        run: host_to_guest,
    },
    Case {
        short: "g->h",
        name: "stream guest->host, batch 32",
        count: STREAM_MSGS,
        prec: 1,
        run: guest_to_host,
    },
];

/// Ns per message of one round: `[case][0]` with the thread, `[case][1]` with the process.
type Round = [[f64; 2]; CASES.len()];

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// Runs every case once with each peer (`counts[i]` messages of case `i`), the process
/// first when `process_first`.
fn round(peers: &mut [Peer; 2], counts: &[u64; CASES.len()], process_first: bool) -> Round {
    let mut ns = [[0.0; 2]; CASES.len()];
    let order = if process_first { [1, 0] } else { [0, 1] };
    for (i, case) in CASES.iter().enumerate() {
        for p in order {
            ns[i][p] = peers[p].run(case, counts[i]);
        }
    }
    ns
}

/// The message count that takes about [`CASE_NS`] at `ns` per message, to two significant
/// digits.
fn count_for(ns: f64) -> u64 {
    let n = (CASE_NS / ns).clamp(10_000.0, 50_000_000.0);
    let unit = 10f64.powi(n.log10().floor() as i32 - 1);
    ((n / unit).round() * unit) as u64
}

fn main() {
    if std::env::var(ROLE_ENV).is_ok_and(|r| r == "guest") {
        guest_process();
    }
    let rounds = rounds_arg(9);
    let cpus = cpus();
    println!(
        "{cpus} CPUs; load average {} (1, 5, 15 min) at the start; {rounds} rounds; \
         vmlink-shm rings of {} KiB, 64-byte messages; measuring thread on CPU 0, peer \
         (thread or process) on CPU 1",
        load_average(),
        RING / 1024
    );
    pin(0);
    let mut peers = [Peer::thread(), Peer::process()];
    // One unrecorded round to warm caches, frequency and mappings, and to size the cases.
    let warm = round(&mut peers, &CASES.map(|c| c.count), false);
    let counts: [u64; CASES.len()] = std::array::from_fn(|i| count_for(warm[i][0].min(warm[i][1])));
    println!(
        "messages per case, peer and round (about {:.2} s each at the warm-up's speed): {}",
        CASE_NS / 1e9,
        CASES
            .iter()
            .zip(counts)
            .map(|(c, n)| format!("{} {n}", c.short))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let mut all: Vec<Round> = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let process_first = r % 2 == 1;
        let ns = round(&mut peers, &counts, process_first);
        let cells = CASES
            .iter()
            .zip(&ns)
            .map(|(case, [t, p])| {
                let prec = case.prec;
                format!("{} {t:.prec$} / {p:.prec$}", case.short)
            })
            .collect::<Vec<_>>()
            .join(" | ");
        println!(
            "round {r:2} ({} first): ns thread / process: {cells}",
            if process_first { "process" } else { "thread " }
        );
        all.push(ns);
    }
    for peer in peers {
        peer.finish();
    }

    println!(
        "\nmedian ns per message over {rounds} rounds (min-max); ratio process/thread per \
         round, then the median (min-max):"
    );
    println!(
        "  {:<34} {:>22} {:>22} {:>20}",
        "case", "thread", "process", "process/thread"
    );
    for (i, case) in CASES.iter().enumerate() {
        let col = |p: usize| all.iter().map(|ns| ns[i][p]).collect::<Vec<_>>();
        let cell = |p: usize| {
            let c = col(p);
            let (lo, hi) = min_max(&c);
            let prec = case.prec;
            format!("{:.prec$} ({lo:.prec$}-{hi:.prec$})", median(&c))
        };
        let ratios = all.iter().map(|ns| ns[i][1] / ns[i][0]).collect::<Vec<_>>();
        let (lo, hi) = min_max(&ratios);
        println!(
            "  {:<34} {:>22} {:>22} {:>7.3} ({lo:.2}-{hi:.2})   (goal within 10%: 0.90-1.10)",
            case.name,
            cell(0),
            cell(1),
            median(&ratios)
        );
    }
    println!(
        "\nload average {} (1, 5, 15 min) at the end",
        load_average()
    );
}
