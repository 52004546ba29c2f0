//! Randomized cross-thread stress of a channel pair over tiny rings (4096 and 8192 data
//! bytes), with every side blocking for real (no `try_` loops).
//!
//! Side A runs two callers (`call`), one streamer (a random mix of `send`, `send_in_place`
//! and batches of `push_in_band` / `push_in_place`) and one receiver (a random mix of
//! `recv`, `recv_with` and `recv_batch`). Side B runs one server thread that receives
//! everything with the same random mix of receive calls, completes every request with a
//! payload derived from it (`complete`, blocking), and streams packets back with the same
//! random mix of sends. Both directions are busy at once; the rings are so small that
//! senders keep finding them full, callers keep queueing B's stream packets while they wait
//! for completions, and readers keep sleeping.
//!
//! What it proves:
//! - every byte of every packet, of random size from 0 to the largest payload the ring
//!   carries, arrives intact, in order, exactly once; padding is zero. The expected bytes
//!   come from a sequence number (carried in the first 8 bytes of each payload) through a
//!   small xorshift PRNG, and the length from the sequence number through a hash, so the
//!   receiver checks the length too.
//! - every `call` gets its own completion (the response is a transform of the request,
//!   which carries the caller's id and sequence number), none is late or lost.
//! - nothing hangs: a watchdog aborts the process (printing both channels' counters) if a
//!   run does not finish within [`WATCHDOG`], so a lost wake-up fails CI instead of
//!   stalling it.
//! - the counters add up: what one side sent, the other received, packets and bytes.
//!
//! Each run stops after [`PACKET_LIMIT`] packets or [`TIME_BUDGET`], whichever comes first,
//! and asserts at least [`MIN_PACKETS`] so a slow build still proves something. The same
//! scenario runs in event mode (`Config::default()`) and in polling mode
//! (`Config::polling(..)`).
//!
//! [`polling_receiver_does_not_strand_a_sleeping_caller`] pins one interleaving the random
//! runs rarely hit: a receiver spinning in polling mode (interrupts masked) while a caller on
//! the same end sleeps in the doorbell; the caller must still be woken by its completion.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use vmlink_channel::{
    ChannelError, Config, Counters, InProcessChannel, PacketMeta, Received, in_process_channel_pair,
};

/// A run stops after this many packets (both directions, requests and completions
/// included)... Under Miri (its data-race detector over every thread of the run) a few
/// hundred.
const PACKET_LIMIT: u64 = if cfg!(miri) { 200 } else { 3_000_000 };
/// ...or after this long, whichever comes first (Miri's clock is virtual: the packet limit
/// ends its runs).
const TIME_BUDGET: Duration = Duration::from_millis(if cfg!(miri) { 3_600_000 } else { 900 });
/// A run must move at least this many packets, however slow the build.
const MIN_PACKETS: u64 = if cfg!(miri) { PACKET_LIMIT } else { 20_000 };
/// A run that has not finished by then is hung: print the counters and abort.
const WATCHDOG: Duration = Duration::from_secs(if cfg!(miri) { 24 * 3600 } else { 60 });
/// After a worker panicked, how long to wait for the others before aborting (they may be
/// blocked forever on a peer that is gone).
const PANIC_GRACE: Duration = Duration::from_secs(5);

/// First word of the last packet of a stream; the second word is the stream's length.
const END_MAGIC: u64 = 0xE4D0_E4D0_5709_5709;
const STREAM_A_SALT: u64 = 0xA11C_E000_0000_0001;
const STREAM_B_SALT: u64 = 0xB0B0_0000_0000_0002;
const REQUEST_SALT: u64 = 0x5E0E_0000_0000_0003;
const CALLERS: u64 = 2;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xorshift64.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(splitmix(seed) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A family of deterministic payloads: the length and bytes of packet `seq` follow from
/// `(salt, seq)` alone.
#[derive(Clone, Copy)]
struct Pattern {
    salt: u64,
    max: usize,
}

impl Pattern {
    /// Mostly small packets (so millions fit in seconds), some medium, a few up to the
    /// largest; exactly 0 and exactly the largest now and then.
    fn len(&self, seq: u64) -> usize {
        let h = splitmix(self.salt ^ seq.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        let r = (h >> 16) as usize;
        match h % 1000 {
            0..=4 => self.max,
            5..=9 => 0,
            10..=849 => r % 41,
            850..=979 => r % 513,
            _ => r % (self.max + 1),
        }
    }

    /// The words of packet `seq`: `seq` itself, then xorshift output.
    fn words(&self, seq: u64) -> Words {
        Words {
            first: Some(seq),
            rng: Rng::new(self.salt ^ seq.rotate_left(29)),
        }
    }

    /// The whole payload of packet `seq`.
    fn payload(&self, seq: u64, out: &mut Vec<u8>) {
        out.clear();
        out.resize(self.len(seq), 0);
        self.words(seq).fill(out);
    }

    /// Checks a received payload (padded to 8 bytes) against packet `seq`.
    fn check(&self, what: &str, seq: u64, got: &[u8]) {
        let len = self.len(seq);
        assert_eq!(
            got.len(),
            len.div_ceil(8) * 8,
            "{what} packet {seq}: padded length (payload {len} bytes)"
        );
        let mut words = self.words(seq);
        for (k, chunk) in got.chunks(8).enumerate() {
            let valid = (len - 8 * k).min(8);
            // Bytes past the payload are padding and must be zero.
            let mask = if valid == 8 {
                u64::MAX
            } else {
                (1u64 << (8 * valid)) - 1
            };
            let want = words.next_word() & mask;
            let have = u64::from_le_bytes(chunk.try_into().expect("padded to 8"));
            if have != want {
                let i = ((have ^ want).trailing_zeros() / 8) as usize;
                panic!(
                    "{what} packet {seq} (len {len}): byte {} is {:#04x}, expected {:#04x}{}",
                    8 * k + i,
                    have.to_le_bytes()[i],
                    want.to_le_bytes()[i],
                    if i < valid { "" } else { " (padding)" }
                );
            }
        }
    }
}

struct Words {
    first: Option<u64>,
    rng: Rng,
}

impl Words {
    fn next_word(&mut self) -> u64 {
        self.first.take().unwrap_or_else(|| self.rng.next())
    }

    /// Fills `out` with the next bytes; every call but the last must be a multiple of 8.
    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let w = self.next_word().to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
    }
}

/// The completion for a request: its padded words in reverse order, each transformed.
fn response_for(request_padded: &[u8], out: &mut Vec<u8>) {
    out.clear();
    for w in request_padded.rchunks(8) {
        let w = u64::from_le_bytes(w.try_into().expect("padded to 8"));
        out.extend_from_slice(&(w.rotate_left(7) ^ 0x5A5A_5A5A_A5A5_A5A5).to_le_bytes());
    }
}

fn end_payload(count: u64) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[..8].copy_from_slice(&END_MAGIC.to_le_bytes());
    p[8..].copy_from_slice(&count.to_le_bytes());
    p
}

/// The stream count if `payload` is the end marker.
fn end_marker(payload: &[u8]) -> Option<u64> {
    (payload.len() == 16 && payload[..8] == END_MAGIC.to_le_bytes())
        .then(|| u64::from_le_bytes(payload[8..].try_into().expect("8 bytes")))
}

/// How often each operation ran.
#[derive(Default)]
struct Ops {
    send: AtomicU64,
    send_in_place: AtomicU64,
    batches: AtomicU64,
    batched_packets: AtomicU64,
    batch_full: AtomicU64,
    calls: AtomicU64,
    completions: AtomicU64,
    recv: AtomicU64,
    recv_with: AtomicU64,
    recv_batch: AtomicU64,
    recv_batch_packets: AtomicU64,
    stream_a: AtomicU64,
    stream_b: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// What every thread of a run shares.
struct Run {
    name: String,
    start: Instant,
    stop: AtomicBool,
    /// Packets sent so far, both ways.
    packets: AtomicU64,
    callers_running: AtomicUsize,
    panicked: AtomicBool,
    ops: Ops,
}

impl Run {
    fn should_stop(&self) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return true;
        }
        if self.packets.load(Ordering::Relaxed) >= PACKET_LIMIT
            || self.start.elapsed() >= TIME_BUDGET
        {
            self.stop.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }

    fn sent(&self, n: u64) {
        self.packets.fetch_add(n, Ordering::Relaxed);
    }
}

/// Sets the run's `panicked` flag if the thread it lives on unwinds.
struct PanicFlag<'r>(&'r Run);

impl Drop for PanicFlag<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.panicked.store(true, Ordering::SeqCst);
        }
    }
}

fn ok<T>(what: &str, r: Result<T, ChannelError>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:?}"))
}

/// One stream of packets, sent with a random mix of `send`, `send_in_place` and batches.
struct Sender {
    pattern: Pattern,
    next: u64,
    scratch: Vec<u8>,
}

impl Sender {
    fn new(pattern: Pattern) -> Self {
        Self {
            pattern,
            next: 0,
            scratch: Vec::new(),
        }
    }

    fn send_one(&mut self, ch: &InProcessChannel, run: &Run, in_place: bool) {
        let seq = self.next;
        self.next += 1;
        if in_place {
            let len = self.pattern.len(seq);
            let mut words = self.pattern.words(seq);
            ok(
                "send_in_place",
                ch.send_in_place(PacketMeta::in_band(), 0, len, None, |slot| {
                    fill_slot(slot, &mut words, len)
                }),
            );
            inc(&run.ops.send_in_place);
        } else {
            self.pattern.payload(seq, &mut self.scratch);
            ok("send", ch.send(&self.scratch, None));
            inc(&run.ops.send);
        }
        run.sent(1);
    }

    /// A batch of `n` packets; when the ring fills up, commits what fits and sends the
    /// packet that did not fit with a blocking send, then starts a new batch.
    fn send_batch(&mut self, ch: &InProcessChannel, run: &Run, rng: &mut Rng, n: u64) {
        let mut left = n;
        while left > 0 {
            let mut batch = ok("batch", ch.batch());
            let mut overflow = None;
            while left > 0 {
                let seq = self.next;
                let in_place = rng.below(2) == 0;
                let pushed = if in_place {
                    let len = self.pattern.len(seq);
                    let mut words = self.pattern.words(seq);
                    batch.push_in_place(PacketMeta::in_band(), 0, len, |slot| {
                        fill_slot(slot, &mut words, len)
                    })
                } else {
                    self.pattern.payload(seq, &mut self.scratch);
                    batch.push_in_band(&self.scratch)
                };
                match pushed {
                    Ok(()) => {
                        self.next += 1;
                        left -= 1;
                    }
                    Err(ChannelError::Full) => {
                        overflow = Some(in_place);
                        break;
                    }
                    Err(e) => panic!("batch push: {e:?}"),
                }
            }
            let count = batch.len() as u64;
            ok("batch commit", batch.commit());
            inc(&run.ops.batches);
            run.ops.batched_packets.fetch_add(count, Ordering::Relaxed);
            run.sent(count);
            if let Some(in_place) = overflow {
                inc(&run.ops.batch_full);
                self.send_one(ch, run, in_place);
                left -= 1;
            }
        }
    }

    /// One random send operation of 1 to 16 packets.
    fn random_send(&mut self, ch: &InProcessChannel, run: &Run, rng: &mut Rng) {
        match rng.below(3) {
            0 => self.send_one(ch, run, false),
            1 => self.send_one(ch, run, true),
            _ => {
                let n = 1 + rng.below(16);
                self.send_batch(ch, run, rng, n);
            }
        }
    }

    fn send_end(&mut self, ch: &InProcessChannel, run: &Run) {
        ok("send end", ch.send(&end_payload(self.next), None));
        run.sent(1);
    }
}

fn fill_slot<M: vmlink_ring::RingMem>(
    slot: &mut vmlink_channel::WriteSlot<'_, M>,
    words: &mut Words,
    len: usize,
) {
    let mut chunk = [0u8; 256];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(chunk.len());
        words.fill(&mut chunk[..n]);
        slot.write_payload(at, &chunk[..n])
            .expect("write inside the slot");
        at += n;
    }
}

/// Checks one stream's packets in order; knows when its end marker arrived.
struct StreamCheck {
    what: &'static str,
    pattern: Pattern,
    next: u64,
    ended: bool,
}

impl StreamCheck {
    fn new(what: &'static str, pattern: Pattern) -> Self {
        Self {
            what,
            pattern,
            next: 0,
            ended: false,
        }
    }

    fn packet(&mut self, meta: &Received, payload: &[u8]) {
        assert!(!self.ended, "{}: packet after the end marker", self.what);
        assert_eq!(meta.header_len, 0, "{}: header", self.what);
        assert!(!meta.completion_requested, "{}: flags", self.what);
        if let Some(count) = end_marker(payload) {
            assert_eq!(count, self.next, "{}: stream length", self.what);
            self.ended = true;
            return;
        }
        self.pattern.check(self.what, self.next, payload);
        self.next += 1;
    }
}

/// One random receive operation (`recv`, `recv_with` or `recv_batch`), handing each
/// packet to `each`. Blocks until at least one packet arrives.
fn random_recv(
    ch: &InProcessChannel,
    run: &Run,
    rng: &mut Rng,
    buf: &mut [u8],
    each: &mut dyn FnMut(&Received, &[u8]),
) {
    match rng.below(3) {
        0 => {
            let r = ok("recv", ch.recv(buf, None));
            inc(&run.ops.recv);
            each(&r, r.payload(buf));
        }
        1 => {
            let meta = ok(
                "recv_with",
                ch.recv_with(None, |g| {
                    let meta = g.meta();
                    let len = meta.payload_len;
                    // Two reads, so offsets inside the packet are exercised too.
                    let split = len.min(8);
                    ok("read_payload", g.read_payload(0, &mut buf[..split]));
                    ok("read_payload", g.read_payload(split, &mut buf[split..len]));
                    meta
                }),
            );
            let len = meta.payload_len;
            inc(&run.ops.recv_with);
            each(&meta, &buf[..len]);
        }
        _ => {
            let max = 1 + rng.below(16) as usize;
            let n = ok(
                "recv_batch",
                ch.recv_batch(max, None, |p| {
                    let meta = p.meta();
                    let len = meta.payload_len;
                    ok("batch read_payload", p.read_payload(0, &mut buf[..len]));
                    each(&meta, &buf[..len]);
                }),
            );
            assert!(n >= 1 && n <= max, "recv_batch returned {n} (max {max})");
            inc(&run.ops.recv_batch);
            run.ops
                .recv_batch_packets
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

fn caller(a: &InProcessChannel, run: &Run, id: u64, max: usize) {
    let _flag = PanicFlag(run);
    let requests = Pattern {
        salt: REQUEST_SALT,
        max,
    };
    let mut request = Vec::new();
    let mut expect = Vec::new();
    let mut response = vec![0u8; max + 8];
    let mut n = 0u64;
    while !run.should_stop() {
        let tag = (id << 48) | n;
        requests.payload(tag, &mut request);
        let len = request.len();
        let got = ok("call", a.call(&request, &mut response, None));
        request.resize(len.div_ceil(8) * 8, 0);
        response_for(&request, &mut expect);
        assert_eq!(got, expect.len(), "caller {id} call {n}: response length");
        assert!(
            response[..got] == expect[..],
            "caller {id} call {n}: response does not match its request"
        );
        inc(&run.ops.calls);
        run.sent(1);
        n += 1;
    }
    run.callers_running.fetch_sub(1, Ordering::SeqCst);
}

fn streamer_a(a: &InProcessChannel, run: &Run, max: usize) {
    let _flag = PanicFlag(run);
    let mut rng = Rng::new(0x57EA_A000);
    let mut tx = Sender::new(Pattern {
        salt: STREAM_A_SALT,
        max,
    });
    while !run.should_stop() {
        tx.random_send(a, run, &mut rng);
    }
    // The end marker goes last, after every request: B stops serving when it sees it.
    while run.callers_running.load(Ordering::SeqCst) > 0 {
        thread::sleep(Duration::from_millis(1));
    }
    run.ops.stream_a.store(tx.next, Ordering::Relaxed);
    tx.send_end(a, run);
}

fn receiver_a(a: &InProcessChannel, run: &Run, max: usize) {
    let _flag = PanicFlag(run);
    let mut rng = Rng::new(0x8ECE_A000);
    let mut check = StreamCheck::new(
        "B->A stream",
        Pattern {
            salt: STREAM_B_SALT,
            max,
        },
    );
    let mut buf = vec![0u8; max];
    while !check.ended {
        random_recv(a, run, &mut rng, &mut buf, &mut |meta, payload| {
            check.packet(meta, payload)
        });
    }
}

fn server_b(b: &InProcessChannel, run: &Run, max: usize) {
    let _flag = PanicFlag(run);
    let mut rng = Rng::new(0x5E8B_B000);
    let requests = Pattern {
        salt: REQUEST_SALT,
        max,
    };
    let mut check = StreamCheck::new(
        "A->B stream",
        Pattern {
            salt: STREAM_A_SALT,
            max,
        },
    );
    let mut tx = Sender::new(Pattern {
        salt: STREAM_B_SALT,
        max,
    });
    let mut buf = vec![0u8; max];
    // Completions to send once the receive call returned (a batch callback holds the
    // receive lock; answer after it, as a real server would).
    let mut answers: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut spare: Vec<Vec<u8>> = Vec::new();
    while !check.ended {
        random_recv(b, run, &mut rng, &mut buf, &mut |meta, payload| {
            if meta.completion_requested {
                assert_eq!(meta.header_len, 0, "request header");
                if payload.len() > 8 {
                    // Long enough to carry its whole tag: check every byte.
                    let tag = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
                    assert!(tag >> 48 < CALLERS, "request tag {tag:#x}");
                    requests.check("request", tag, payload);
                }
                let mut answer = spare.pop().unwrap_or_default();
                response_for(payload, &mut answer);
                answers.push((meta.transaction_id, answer));
            } else {
                check.packet(meta, payload);
            }
        });
        for (tid, answer) in answers.drain(..) {
            ok("complete", b.complete(tid, &answer, None));
            inc(&run.ops.completions);
            run.sent(1);
            spare.push(answer);
        }
        if !check.ended && rng.below(2) == 0 {
            tx.random_send(b, run, &mut rng);
        }
    }
    run.ops.stream_b.store(tx.next, Ordering::Relaxed);
    tx.send_end(b, run);
}

fn describe(name: &str, c: &Counters) -> String {
    let per = |n: u64| n as f64 / c.packets_sent.max(1) as f64;
    format!(
        "{name}: sent {} packets / {} bytes, received {} / {}, signals sent {} ({:.4}/packet), \
         signals received {}, send waits {} ({:.4}/packet), receive sleeps {}, late completions {}",
        c.packets_sent,
        c.bytes_sent,
        c.packets_received,
        c.bytes_received,
        c.signals_sent,
        per(c.signals_sent),
        c.signals_received,
        c.send_waits,
        per(c.send_waits),
        c.receive_sleeps,
        c.late_completions,
    )
}

fn ops_line(o: &Ops) -> String {
    format!(
        "ops: send {}, send_in_place {}, batches {} ({} packets, {} hit a full ring), calls {}, \
         completions {}, recv {}, recv_with {}, recv_batch {} ({} packets), \
         stream A->B {}, stream B->A {}",
        get(&o.send),
        get(&o.send_in_place),
        get(&o.batches),
        get(&o.batched_packets),
        get(&o.batch_full),
        get(&o.calls),
        get(&o.completions),
        get(&o.recv),
        get(&o.recv_with),
        get(&o.recv_batch),
        get(&o.recv_batch_packets),
        get(&o.stream_a),
        get(&o.stream_b),
    )
}

/// Aborts the process if the run hangs, or if a worker panicked and the others do not
/// finish soon after (they may wait forever on a peer thread that is gone).
fn watchdog(run: &Run, done: &AtomicBool, a: &InProcessChannel, b: &InProcessChannel) {
    let mut panicked_at = None;
    while !done.load(Ordering::SeqCst) {
        let hung = run.start.elapsed() > WATCHDOG;
        if run.panicked.load(Ordering::SeqCst) && panicked_at.is_none() {
            panicked_at = Some(Instant::now());
        }
        let stuck = panicked_at.is_some_and(|t| t.elapsed() > PANIC_GRACE);
        if hung || stuck {
            eprintln!(
                "[{}] WATCHDOG: {} after {:?}; aborting",
                run.name,
                if hung {
                    "the run hung"
                } else {
                    "a worker panicked and the others are stuck"
                },
                run.start.elapsed()
            );
            eprintln!("[{}] {}", run.name, describe("A", &a.counters()));
            eprintln!("[{}] {}", run.name, describe("B", &b.counters()));
            eprintln!(
                "[{}] states A {:?} B {:?}, transactions in flight A {} B {}, stop {}, \
                 callers running {}",
                run.name,
                a.state(),
                b.state(),
                a.transactions_in_flight(),
                b.transactions_in_flight(),
                run.stop.load(Ordering::SeqCst),
                run.callers_running.load(Ordering::SeqCst),
            );
            eprintln!("[{}] {}", run.name, ops_line(&run.ops));
            std::process::abort();
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The scenarios run one at a time: each has the machine (2 shared cores) to itself, so
/// polling runs do not starve event runs, and the race test is not disturbed.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn stress(name: &str, ring: usize, config: Config) {
    let _serial = serial();
    let (a, b) = in_process_channel_pair(ring, config).expect("pair");
    let max = a.max_packet_len() - 16;
    let run = Run {
        name: name.to_owned(),
        start: Instant::now(),
        stop: AtomicBool::new(false),
        packets: AtomicU64::new(0),
        callers_running: AtomicUsize::new(CALLERS as usize),
        panicked: AtomicBool::new(false),
        ops: Ops::default(),
    };
    let done = AtomicBool::new(false);
    let (a, b, run, done) = (&a, &b, &run, &done);
    thread::scope(|s| {
        s.spawn(|| watchdog(run, done, a, b));
        let workers = vec![
            s.spawn(move || caller(a, run, 0, max)),
            s.spawn(move || caller(a, run, 1, max)),
            s.spawn(move || streamer_a(a, run, max)),
            s.spawn(move || receiver_a(a, run, max)),
            s.spawn(move || server_b(b, run, max)),
        ];
        let results: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        done.store(true, Ordering::SeqCst);
        for r in results {
            if let Err(p) = r {
                std::panic::resume_unwind(p);
            }
        }
    });
    let elapsed = run.start.elapsed();
    let (ca, cb) = (a.counters(), b.counters());
    let total = ca.packets_sent + cb.packets_sent;
    eprintln!(
        "[{name}] {total} packets in {elapsed:.2?} ({:.2} M packets/s), {} MB",
        total as f64 / elapsed.as_secs_f64() / 1e6,
        (ca.bytes_sent + cb.bytes_sent) / 1_000_000
    );
    eprintln!("[{name}] {}", describe("A", &ca));
    eprintln!("[{name}] {}", describe("B", &cb));
    eprintln!("[{name}] {}", ops_line(&run.ops));

    let o = &run.ops;
    assert!(
        total >= MIN_PACKETS,
        "[{name}] only {total} packets (want at least {MIN_PACKETS})"
    );
    assert_eq!(
        total,
        run.packets.load(Ordering::Relaxed),
        "[{name}] packets"
    );
    assert_eq!(
        ca.packets_sent, cb.packets_received,
        "[{name}] A->B packets"
    );
    assert_eq!(ca.bytes_sent, cb.bytes_received, "[{name}] A->B bytes");
    assert_eq!(
        cb.packets_sent, ca.packets_received,
        "[{name}] B->A packets"
    );
    assert_eq!(cb.bytes_sent, ca.bytes_received, "[{name}] B->A bytes");
    assert_eq!(get(&o.calls), get(&o.completions), "[{name}] calls");
    assert_eq!(
        ca.packets_sent,
        get(&o.calls) + get(&o.stream_a) + 1,
        "[{name}] A sent requests, its stream and the end marker"
    );
    assert_eq!(
        cb.packets_sent,
        get(&o.completions) + get(&o.stream_b) + 1,
        "[{name}] B sent completions, its stream and the end marker"
    );
    assert_eq!(
        ca.late_completions + cb.late_completions,
        0,
        "[{name}] late"
    );
    assert_eq!(a.transactions_in_flight(), 0, "[{name}] A transactions");
    assert_eq!(b.transactions_in_flight(), 0, "[{name}] B transactions");
    for (op, n) in [
        ("send", &o.send),
        ("send_in_place", &o.send_in_place),
        ("batch", &o.batches),
        ("call", &o.calls),
        ("recv", &o.recv),
        ("recv_with", &o.recv_with),
        ("recv_batch", &o.recv_batch),
    ] {
        assert!(get(n) > 0, "[{name}] {op} never ran");
    }
    assert!(
        ca.send_waits + cb.send_waits > 0,
        "[{name}] the tiny rings never filled up"
    );
}

#[test]
fn stress_event_mode() {
    stress("event 4096", 4096, Config::default());
    stress("event 8192", 8192, Config::default());
}

#[test]
fn stress_polling_mode() {
    stress("polling 4096", 4096, Config::polling(200));
    stress("polling 8192", 8192, Config::polling(200));
}

/// A lost wake-up in polling mode.
///
/// A caller sleeps in the doorbell waiting for its completion; meanwhile a receiver on the
/// same channel end spins in polling mode, which masks the incoming ring's interrupts. The
/// peer's completion then arrives without a signal (the mask says "I am polling"); the
/// spinning receiver takes it off the ring, stores it for the caller and bumps the hub, but
/// the hub wakes only condition-variable waiters, not the thread blocked in
/// `Doorbell::wait`. The caller sleeps on although its completion is there: until its
/// deadline, or forever with `None`.
///
/// The race is armed on purpose: the peer completes only while the mask is set, and the run
/// counts only if the completion went out without a signal (otherwise it retries).
#[test]
#[cfg_attr(
    miri,
    ignore = "spins 5000 times per poll round for 200 ms of the virtual clock: hours under \
              Miri; the polling-mode stress run covers the same paths"
)]
fn polling_receiver_does_not_strand_a_sleeping_caller() {
    use std::sync::Arc;
    use vmlink_channel::{Channel, in_process_pair};
    use vmlink_ring::{ControlWord, HeapMem, RingMem};

    const CALL_DEADLINE: Duration = Duration::from_secs(2);
    let _serial = serial();
    for attempt in 0..20 {
        let a_to_b = Arc::new(HeapMem::new(4096).expect("ring"));
        let b_to_a = Arc::new(HeapMem::new(4096).expect("ring"));
        let (da, db) = in_process_pair();
        // 200,000 looks at the ring: milliseconds of spinning with the mask set.
        let config = Config::polling(200_000);
        let a = Channel::new(a_to_b.clone(), b_to_a.clone(), da, config).expect("a");
        let b = Channel::new(b_to_a.clone(), a_to_b, db, config).expect("b");
        let caller_sleeps = AtomicBool::new(false);
        let armed = AtomicBool::new(false);
        let call_took = thread::scope(|s| {
            let caller = s.spawn(|| {
                let start = Instant::now();
                let mut response = [0u8; 64];
                let r = a.call(b"ping", &mut response, Some(start + CALL_DEADLINE));
                (r, start.elapsed())
            });
            // The caller sends its request, finds nothing and sleeps in the doorbell.
            let mut request = [0u8; 64];
            let req = b
                .recv(&mut request, Some(Instant::now() + CALL_DEADLINE))
                .expect("request");
            while a.counters().receive_sleeps == 0 {
                thread::yield_now();
            }
            thread::sleep(Duration::from_millis(20));
            caller_sleeps.store(true, Ordering::SeqCst);
            // A receiver on the caller's end polls: it masks the incoming ring's interrupts.
            let receiver = s.spawn(|| {
                while !caller_sleeps.load(Ordering::SeqCst) {
                    thread::yield_now();
                }
                let mut buf = [0u8; 64];
                a.recv(&mut buf, Some(Instant::now() + Duration::from_millis(200)))
            });
            let until = Instant::now() + Duration::from_secs(1);
            while b_to_a.load_control(ControlWord::InterruptMask) == 0 && Instant::now() < until {
                core::hint::spin_loop();
            }
            let signals = b.counters().signals_sent;
            b.complete(req.transaction_id, b"pong", None)
                .expect("complete");
            armed.store(b.counters().signals_sent == signals, Ordering::SeqCst);
            assert_eq!(
                receiver.join().expect("receiver"),
                Err(ChannelError::TimedOut),
                "the completion is not for the receiver"
            );
            let (r, took) = caller.join().expect("caller");
            assert_eq!(r.map(|n| n >= 4), Ok(true), "the call gets its completion");
            took
        });
        if !armed.load(Ordering::SeqCst) {
            eprintln!("attempt {attempt}: the completion was signalled; the race was not armed");
            continue;
        }
        assert!(
            call_took < Duration::from_secs(1),
            "the completion arrived while a polling receiver had the interrupts masked; the \
             caller sleeping in the doorbell was not woken and waited {call_took:?} (its \
             deadline is {CALL_DEADLINE:?}; with no deadline it would wait forever)"
        );
        return;
    }
    panic!("could not arm the race in 20 attempts");
}
