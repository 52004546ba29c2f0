//! Cross-thread stress: one writer thread and one reader thread on a small ring, millions
//! of packets, every byte checked, and both sides really blocking.
//!
//! The writer sends packets whose payload length (0 up to the ring's largest packet) and
//! bytes come from a small xorshift generator seeded from a constant and the packet
//! number, so the reader regenerates what it should receive and compares every payload
//! byte and every padding byte (zero up to the next multiple of 8), plus the type, flags
//! and transaction id. Each side picks its way of working at random from its own
//! generator:
//!
//! - the writer copies (`push`, `write`, payload gathered from two slices) or writes in
//!   place (`reserve`, `write_payload` in pieces out of order, `finish` or the slot's
//!   `commit`), commits in batches of 1 to 4, and now and then drops a reserved slot
//!   unfinished to check that it leaves no trace;
//! - the reader uses `read_into`, or `peek` + `read_payload` in pieces + `consume` with
//!   batched `commit`s, and now and then peeks and drops a packet without consuming it.
//!
//! Neither side spins for space or data: a side that cannot proceed calls its
//! `prepare_wait` and on `Sleep` blocks on a doorbell (`Mutex<bool>` + `Condvar`, which,
//! like an eventfd, keeps one pending ring) that the peer rings exactly when a commit says
//! [`Signal::is_needed`]. Waits have a timeout only so that a bug shows up as a failure
//! instead of a hang: a wait that times out and then finds its condition already true (data
//! queued, or space free) is a lost wake-up, and any lost wake-up fails the test. A
//! watchdog fails the test if it does not finish within 60 seconds.
//!
//! `stress_polling_reader` runs the same traffic with a reader that masks interrupts and
//! polls (`spin_loop`, then `yield_now`) before it unmasks through `prepare_wait` and
//! sleeps. Each run reports packets, bytes and signals per packet on stderr
//! (`cargo test --test stress -- --nocapture`).
//!
//! The runs stop after a packet count or a time budget, whichever comes first. Under Miri
//! they carry a few hundred packets, which still exercises wrap-around, full rings and both
//! wake-ups, and lets Miri's data-race detector check the word-wise copies against the
//! index stores: `cargo +nightly miri test -p vmlink-ring --test stress`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};
use vmlink_ring::protocol::{
    DESCRIPTOR_SIZE, FLAG_COMPLETION_REQUESTED, PacketType, max_packet_len, packet_len,
};
use vmlink_ring::{
    HeapMem, OutgoingPacket, PacketInfo, PacketMeta, Payload, Reader, Signal, WaitDecision,
    WriteError, Writer,
};

/// The data area: two pages, so the largest packets fill the ring on their own.
const DATA_LEN: usize = 8192;

/// The largest payload a packet without an extra header can carry in this ring.
const MAX_PAYLOAD: usize = max_packet_len(DATA_LEN) - DESCRIPTOR_SIZE;

/// Transaction id of the empty packet that ends a run.
const END: u64 = u64::MAX;

/// Seeds: packet contents, the writer's choices, the reader's choices.
const PACKET_SEED: u64 = 0x766d_6c69_6e6b_0001;
const WRITER_SEED: u64 = 0x766d_6c69_6e6b_0002;
const READER_SEED: u64 = 0x766d_6c69_6e6b_0003;

/// Packets per run, and the time after which the writer ends a run early.
const PACKETS: u64 = if cfg!(miri) { 300 } else { 5_000_000 };
const TIME_BUDGET: Duration = Duration::from_secs(if cfg!(miri) { 3600 } else { 3 });

/// A wait that lasts this long without a signal is over-long by orders of magnitude; if the
/// condition it waited for then holds, a wake-up was lost. (Miri's clock is virtual and
/// advances with every basic block the interpreter runs, so it gets more slack.)
const WAIT_TIMEOUT: Duration = Duration::from_secs(if cfg!(miri) { 600 } else { 2 });

/// The whole test fails if it has not finished by then.
const WATCHDOG: Duration = Duration::from_secs(if cfg!(miri) { 24 * 3600 } else { 60 });

/// How long the polling reader spins, then yields, on an empty ring before it sleeps.
const SPINS: u32 = if cfg!(miri) { 4 } else { 200 };
const YIELDS: u32 = if cfg!(miri) { 2 } else { 20 };

/// The orders in which three pieces of a payload can be written.
const ORDERS: [[usize; 3]; 6] = [
    [0, 1, 2],
    [0, 2, 1],
    [1, 0, 2],
    [1, 2, 0],
    [2, 0, 1],
    [2, 1, 0],
];

/// xorshift64, seeded through splitmix64 so that nearby seeds give unrelated streams.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Self((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True once in `n` times.
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

/// Packet `n`'s payload, into `buf`. Lengths are mostly small, sometimes up to the
/// largest packet, and every 1000th packet is exactly the largest.
fn fill_payload(n: u64, buf: &mut Vec<u8>) {
    let mut rng = Rng::new(PACKET_SEED ^ n);
    let len = if n % 1000 == 999 {
        MAX_PAYLOAD
    } else {
        match rng.below(8) {
            0..=3 => rng.below(65),
            4..=6 => rng.below(1025),
            _ => rng.below(MAX_PAYLOAD + 1),
        }
    };
    buf.clear();
    buf.resize(len, 0);
    for chunk in buf.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes()[..chunk.len()]);
    }
}

/// Packet `n`'s descriptor fields.
fn meta(n: u64) -> PacketMeta {
    PacketMeta {
        packet_type: PacketType::InBand,
        flags: if n.is_multiple_of(3) {
            FLAG_COMPLETION_REQUESTED
        } else {
            0
        },
        transaction_id: n,
    }
}

/// A doorbell: one pending ring, like an eventfd.
#[derive(Default)]
struct Doorbell {
    rung: Mutex<bool>,
    wake: Condvar,
    rings: AtomicU64,
}

impl Doorbell {
    fn ring(&self) {
        self.rings.fetch_add(1, Ordering::Relaxed);
        *self.rung.lock().unwrap() = true;
        self.wake.notify_one();
    }

    fn ring_if(&self, signal: Signal) {
        if signal.is_needed() {
            self.ring();
        }
    }

    /// Waits for a ring and consumes it; false when the timeout passed first.
    fn wait(&self, timeout: Duration) -> bool {
        let rung = self.rung.lock().unwrap();
        let (mut rung, _) = self
            .wake
            .wait_timeout_while(rung, timeout, |rung| !*rung)
            .unwrap();
        std::mem::take(&mut *rung)
    }
}

/// What both threads share besides the ring.
#[derive(Default)]
struct Shared {
    to_reader: Doorbell,
    to_writer: Doorbell,
    /// Set when either thread panics, so the other stops waiting.
    failed: AtomicBool,
}

/// Counts of one side's sleeps.
#[derive(Debug, Default)]
struct Waits {
    /// `prepare_wait` said `Sleep`.
    slept: u64,
    /// ... and the wait ended by timeout.
    timed_out: u64,
    /// ... and the condition waited for held already: a lost wake-up.
    lost: u64,
}

impl Waits {
    /// Sleeps on `bell`; `ready` says whether the condition holds after a timeout.
    /// Returns false when the peer has failed.
    fn sleep(&mut self, bell: &Doorbell, shared: &Shared, ready: impl FnOnce() -> bool) -> bool {
        self.slept += 1;
        if !bell.wait(WAIT_TIMEOUT) {
            self.timed_out += 1;
            if ready() {
                self.lost += 1;
            }
        }
        !shared.failed.load(Ordering::Relaxed)
    }
}

/// Sends `tx` a message when the thread ends, and flags a panic to the peer.
struct Finish<'a> {
    shared: &'a Shared,
    done: mpsc::Sender<()>,
}

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.shared.failed.store(true, Ordering::Relaxed);
        }
        let _ = self.done.send(());
    }
}

#[derive(Debug, Default)]
struct WriterReport {
    packets: u64,
    waits: Waits,
    aborted: bool,
}

/// Writes packets until `PACKETS` or the time budget, then the end packet.
fn run_writer(ring: Arc<HeapMem>, shared: &Shared) -> WriterReport {
    let mut writer = Writer::new(ring).unwrap();
    let mut report = WriterReport::default();
    let mut choice = Rng::new(WRITER_SEED);
    let mut data = Vec::with_capacity(MAX_PAYLOAD);
    let start = Instant::now();
    let mut batch = 1;
    let mut n = 0u64;
    loop {
        let last = n == PACKETS || (n.is_multiple_of(256) && start.elapsed() > TIME_BUDGET);
        let meta = if last {
            data.clear();
            PacketMeta {
                transaction_id: END,
                ..PacketMeta::in_band()
            }
        } else {
            fill_payload(n, &mut data);
            meta(n)
        };
        let len = data.len();
        let method = choice.below(5);
        loop {
            // Ok(true): the packet is in the ring; Ok(false): a slot was abandoned.
            let attempt = match method {
                // Copy, gathered from two slices; published by a later commit.
                0 | 1 => {
                    let (a, b) = data.split_at(choice.below(len + 1));
                    writer
                        .push(&OutgoingPacket {
                            meta,
                            header: &[],
                            payload: Payload::Gather(&[a, b]),
                        })
                        .map(|()| true)
                }
                // Copy and publish at once.
                2 => writer
                    .write(&OutgoingPacket {
                        meta,
                        header: &[],
                        payload: Payload::Bytes(&data),
                    })
                    .map(|signal| {
                        shared.to_reader.ring_if(signal);
                        true
                    }),
                // In place, in three pieces written in a random order.
                _ => writer.reserve(meta, 0, len).map(|mut slot| {
                    if choice.one_in(64) {
                        // Dropped unfinished: must leave nothing the reader can see.
                        slot.write_payload(0, &vec![0xEE; len]).unwrap();
                        return false;
                    }
                    let mut cut = [choice.below(len + 1), choice.below(len + 1)];
                    cut.sort_unstable();
                    let pieces = [(0, cut[0]), (cut[0], cut[1]), (cut[1], len)];
                    for i in ORDERS[choice.below(ORDERS.len())] {
                        let (from, to) = pieces[i];
                        slot.write_payload(from, &data[from..to]).unwrap();
                    }
                    if method == 3 {
                        slot.finish();
                    } else {
                        shared.to_reader.ring_if(slot.commit());
                    }
                    true
                }),
            };
            match attempt {
                Ok(true) => break,
                Ok(false) => {}
                Err(WriteError::Full { .. }) => {
                    let (decision, signal) = writer.prepare_wait(0, len).unwrap();
                    shared.to_reader.ring_if(signal);
                    if decision == WaitDecision::Sleep {
                        let ok = report.waits.sleep(&shared.to_writer, shared, || {
                            writer.free_space().unwrap() > packet_len(0, len).unwrap() + 8
                        });
                        if !ok {
                            report.aborted = true;
                            return report;
                        }
                    }
                }
                Err(e) => panic!("packet {n}: {e}"),
            }
        }
        if last {
            shared.to_reader.ring_if(writer.commit());
            report.packets = n;
            return report;
        }
        batch -= 1;
        if batch == 0 {
            shared.to_reader.ring_if(writer.commit());
            batch = 1 + choice.below(4);
        }
        n += 1;
    }
}

#[derive(Debug, Default)]
struct ReaderReport {
    packets: u64,
    bytes: u64,
    waits: Waits,
    polls: u64,
    aborted: bool,
}

/// Checks one received packet against what packet `n` should be.
fn check_packet(n: u64, info: &PacketInfo, got: &[u8], expected: &mut Vec<u8>) {
    assert_eq!(info.packet_type(), PacketType::InBand, "packet {n}: type");
    assert_eq!(info.header_len(), 0, "packet {n}: header");
    if info.transaction_id() == END {
        assert_eq!((info.flags(), info.payload_len()), (0, 0), "end packet");
        return;
    }
    assert_eq!(
        info.transaction_id(),
        n,
        "packet lost, repeated or reordered"
    );
    assert_eq!(info.flags(), meta(n).flags, "packet {n}: flags");
    fill_payload(n, expected);
    let len = expected.len();
    assert_eq!(
        info.payload_len(),
        len.next_multiple_of(8),
        "packet {n}: length"
    );
    assert_eq!(got.len(), info.payload_len());
    if got[..len] != expected[..] {
        let at = (0..len).find(|&i| got[i] != expected[i]).unwrap();
        panic!(
            "packet {n} ({len} bytes): byte {at} is {:#04x}, expected {:#04x}",
            got[at], expected[at]
        );
    }
    assert!(
        got[len..].iter().all(|&b| b == 0),
        "packet {n}: non-zero padding {:?}",
        &got[len..]
    );
}

/// Reads and checks packets until the end packet.
fn run_reader(ring: Arc<HeapMem>, shared: &Shared, polling: bool) -> ReaderReport {
    let mut reader = Reader::new(ring).unwrap();
    let mut report = ReaderReport::default();
    let mut choice = Rng::new(READER_SEED);
    let mut buf = vec![0u8; MAX_PAYLOAD];
    let mut expected = Vec::with_capacity(MAX_PAYLOAD);
    let mut batch = 1;
    let mut idle = 0u32;
    if polling {
        reader.mask_interrupts();
    }
    loop {
        let info = if choice.one_in(2) {
            reader.read_into(&mut buf).unwrap().map(|(info, signal)| {
                shared.to_writer.ring_if(signal);
                batch = 1 + choice.below(4);
                info
            })
        } else {
            match reader.peek().unwrap() {
                None => None,
                Some(packet) => {
                    let info = *packet.info();
                    let len = info.payload_len();
                    let cut = choice.below(len + 1);
                    packet.read_payload(cut, &mut buf[cut..len]).unwrap();
                    packet.read_payload(0, &mut buf[..cut]).unwrap();
                    if choice.one_in(32) {
                        // Drop it unconsumed: it must come back on the next peek.
                        buf[..len].fill(0xEE);
                        continue;
                    }
                    packet.consume();
                    batch -= 1;
                    if batch == 0 {
                        shared.to_writer.ring_if(reader.commit());
                        batch = 1 + choice.below(4);
                    }
                    Some(info)
                }
            }
        };
        if let Some(info) = info {
            check_packet(
                report.packets,
                &info,
                &buf[..info.payload_len()],
                &mut expected,
            );
            idle = 0;
            if info.transaction_id() == END {
                shared.to_writer.ring_if(reader.commit());
                return report;
            }
            report.packets += 1;
            report.bytes += expected.len() as u64;
            continue;
        }
        // The ring is empty.
        if polling {
            shared.to_writer.ring_if(reader.commit());
            idle += 1;
            report.polls += 1;
            if idle <= SPINS {
                std::hint::spin_loop();
                continue;
            }
            if idle <= SPINS + YIELDS {
                thread::yield_now();
                continue;
            }
        }
        idle = 0;
        let (decision, signal) = reader.prepare_wait().unwrap();
        shared.to_writer.ring_if(signal);
        if decision == WaitDecision::Sleep {
            let ok = report.waits.sleep(&shared.to_reader, shared, || {
                reader.available().unwrap() > 0
            });
            if !ok {
                report.aborted = true;
                return report;
            }
        }
        if polling {
            reader.mask_interrupts();
        }
    }
}

/// Runs a writer thread and a reader thread over a fresh ring, with a watchdog.
fn stress(name: &str, polling: bool) {
    let ring = Arc::new(HeapMem::new(DATA_LEN).unwrap());
    let shared = Arc::new(Shared::default());
    let (done, finished) = mpsc::channel();
    let start = Instant::now();
    let writer = {
        let (ring, shared, done) = (ring.clone(), shared.clone(), done.clone());
        thread::spawn(move || {
            let _finish = Finish {
                shared: &shared,
                done,
            };
            run_writer(ring, &shared)
        })
    };
    let reader = {
        let shared = shared.clone();
        thread::spawn(move || {
            let _finish = Finish {
                shared: &shared,
                done,
            };
            run_reader(ring, &shared, polling)
        })
    };
    for _ in 0..2 {
        let left = WATCHDOG.saturating_sub(start.elapsed());
        if finished.recv_timeout(left).is_err() {
            shared.failed.store(true, Ordering::Relaxed);
            panic!("{name}: watchdog: not finished after {WATCHDOG:?}");
        }
    }
    let elapsed = start.elapsed();
    let (w, r) = (writer.join(), reader.join());
    let w = w.unwrap_or_else(|e| std::panic::resume_unwind(e));
    let r = r.unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert!(!w.aborted && !r.aborted);

    let packets = r.packets.max(1) as f64;
    let reader_signals = shared.to_reader.rings.load(Ordering::Relaxed);
    let writer_signals = shared.to_writer.rings.load(Ordering::Relaxed);
    // Under Miri the clock is virtual: it advances with each basic block interpreted.
    eprintln!(
        "{name}: {} packets, {} payload bytes in {elapsed:.2?}{} ({:.1} MB/s); \
         signals: {reader_signals} to the reader ({:.4} per packet), \
         {writer_signals} to the writer ({:.4} per packet); \
         reader slept {} times ({} timed out) and polled an empty ring {} times; \
         writer slept {} times ({} timed out)",
        r.packets,
        r.bytes,
        if cfg!(miri) { " of Miri time" } else { "" },
        r.bytes as f64 / elapsed.as_secs_f64() / 1e6,
        reader_signals as f64 / packets,
        writer_signals as f64 / packets,
        r.waits.slept,
        r.waits.timed_out,
        r.polls,
        w.waits.slept,
        w.waits.timed_out,
    );
    assert_eq!(r.packets, w.packets, "packets sent and received differ");
    assert_eq!(
        r.waits.lost, 0,
        "{name}: the reader lost a wake-up: {:?}",
        r.waits
    );
    assert_eq!(
        w.waits.lost, 0,
        "{name}: the writer lost a wake-up: {:?}",
        w.waits
    );
    assert!(
        r.packets >= PACKETS.min(if cfg!(miri) { PACKETS } else { 100_000 }),
        "{name}: too few packets to mean anything"
    );
    assert!(
        w.waits.slept > 0,
        "{name}: the writer never waited for space"
    );
}

/// Writer and reader both block for real whenever they cannot proceed.
#[test]
fn stress_blocking() {
    stress("stress_blocking", false);
}

/// The reader masks interrupts and polls; it unmasks only through `prepare_wait`, to sleep.
#[test]
fn stress_polling_reader() {
    stress("stress_polling_reader", true);
}
