//! Shared machinery: long-lived peer threads driven once per criterion iteration batch,
//! message patterns and checksums, and a spin-wait that notices a dead peer.

use std::cell::UnsafeCell;
use std::hint::spin_loop;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use criterion::BenchmarkGroup;
use criterion::measurement::WallTime;
use crossbeam_utils::CachePadded;

/// Bytes in a small message (request, response, streamed packet).
pub const MSG: usize = 64;
/// A small message.
pub type Msg = [u8; MSG];
/// Stride between checked words in a bulk packet: one stamped word per 512 bytes.
pub const BULK_STRIDE: usize = 512;
/// A benchmark group measured in wall time.
pub type Group<'a> = BenchmarkGroup<'a, WallTime>;

const K_SEQ: u64 = 0x9e37_79b9_7f4a_7c15;
const K_POS: u64 = 0xc2b2_ae3d_27d4_eb4f;
/// Folded into a checksum once per packet that arrived out of order or stale.
const K_BAD: u64 = 0x1656_67b1_9e37_79f9;

/// Set when a peer thread panicked, so the measuring thread stops waiting for it.
static PEER_FAILED: AtomicBool = AtomicBool::new(false);

/// The stamped word number `index` of packet number `seq`.
pub fn word(seq: u64, index: usize) -> u64 {
    seq.wrapping_mul(K_SEQ)
        .wrapping_add((index as u64).wrapping_mul(K_POS))
}

/// Stamps packet `seq` into `buf`: word `first_index + j` at byte `j * stride`.
/// Small messages use stride 8 (every word); bulk packets [`BULK_STRIDE`].
pub fn stamp(buf: &mut [u8], seq: u64, stride: usize, first_index: usize) {
    for (j, off) in (0..buf.len()).step_by(stride).enumerate() {
        buf[off..off + 8].copy_from_slice(&word(seq, first_index + j).to_le_bytes());
    }
}

/// Small message number `seq`, every word stamped.
pub fn msg(seq: u64) -> Msg {
    let mut m = [0u8; MSG];
    stamp(&mut m, seq, 8, 0);
    m
}

fn read_word(buf: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&buf[off..off + 8]);
    u64::from_le_bytes(w)
}

/// `first + (first + 1) + ... + (first + n - 1)`, wrapping.
pub fn tri(first: u64, n: u64) -> u64 {
    let pairs = (u128::from(n) * u128::from(n.saturating_sub(1)) / 2) as u64;
    n.wrapping_mul(first).wrapping_add(pairs)
}

/// The checksum a [`Check`] reports for packets `first..first + n` with `samples` stamped
/// words each (closed form, so verifying costs nothing even for millions of packets).
pub fn expected(first: u64, n: u64, samples: usize) -> u64 {
    let m = samples as u64;
    K_SEQ
        .wrapping_mul(m)
        .wrapping_mul(tri(first, n))
        .wrapping_add(n.wrapping_mul(K_POS).wrapping_mul(tri(0, m)))
}

/// The receiving side's checksum: sums the stamped words of every packet it takes and checks
/// that each packet's first word belongs to the packet expected next (catches loss,
/// duplication, reordering and stale data).
#[derive(Debug)]
pub struct Check {
    stride: usize,
    next: u64,
    sum: u64,
    bad: u64,
}

impl Check {
    /// A checker for packets stamped every `stride` bytes, expecting packet 0 first.
    pub fn new(stride: usize) -> Self {
        Self {
            stride,
            next: 0,
            sum: 0,
            bad: 0,
        }
    }

    /// Takes part of a packet whose first stamped word is number `first_index`.
    #[inline]
    pub fn part(&mut self, buf: &[u8], first_index: usize) {
        for (j, off) in (0..buf.len()).step_by(self.stride).enumerate() {
            let w = read_word(buf, off);
            if first_index + j == 0 {
                self.bad += u64::from(w != word(self.next, 0));
            }
            self.sum = self.sum.wrapping_add(w);
        }
    }

    /// Ends the current packet.
    #[inline]
    pub fn end_packet(&mut self) {
        self.next += 1;
    }

    /// Takes a whole packet.
    #[inline]
    pub fn packet(&mut self, buf: &[u8]) {
        self.part(buf, 0);
        self.end_packet();
    }

    /// This round's checksum (any bad packet poisons it), and a fresh start for the next
    /// round; the packet numbering carries on.
    pub fn round(&mut self) -> u64 {
        let r = self.sum.wrapping_add(self.bad.wrapping_mul(K_BAD));
        self.sum = 0;
        self.bad = 0;
        r
    }
}

/// Sends 64-byte messages `*seq..end` through `tx` in batches of up to `batch` packets per
/// commit (a batch ends early when the ring is full; the producer then waits a moment).
pub fn send_batches<M: vmlink_ring::RingMem, D: vmlink_channel::Doorbell>(
    tx: &vmlink_channel::Channel<M, D>,
    seq: &mut u64,
    end: u64,
    batch: u64,
) {
    let mut b = Backoff::default();
    while *seq < end {
        let mut pending = tx.batch().expect("batch");
        let stop = end.min(*seq + batch);
        while *seq < stop {
            match pending.push_in_band(&msg(*seq)) {
                Ok(()) => *seq += 1,
                Err(vmlink_channel::ChannelError::Full) => break,
                Err(e) => panic!("batch push failed: {e}"),
            }
        }
        let full = *seq < stop;
        pending.commit().expect("commit");
        if full {
            b.snooze();
        }
    }
}

/// A spin-wait: `spin_loop` hints, a yield every 1024 rounds (two cores, other work), and
/// a panic if a peer thread died meanwhile.
#[derive(Debug, Default)]
pub struct Backoff(u32);

impl Backoff {
    /// Waits a moment.
    #[inline]
    pub fn snooze(&mut self) {
        self.0 = self.0.wrapping_add(1);
        if self.0.is_multiple_of(1024) {
            assert!(
                !PEER_FAILED.load(Ordering::Relaxed),
                "a peer thread panicked"
            );
            thread::yield_now();
        } else {
            spin_loop();
        }
    }
}

/// Spins until `ready()` holds.
pub fn spin_until(mut ready: impl FnMut() -> bool) {
    let mut b = Backoff::default();
    while !ready() {
        b.snooze();
    }
}

/// Spins (the thread's own work stands in for the gap between packets) for `gap`.
pub fn spin_for(gap: Duration) {
    let until = Instant::now() + gap;
    while Instant::now() < until {
        spin_loop();
    }
}

/// What one measured round produced.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    /// From both threads starting until both finished.
    pub elapsed: Duration,
    /// The measuring thread's result (usually a checksum).
    pub mine: u64,
    /// The peer thread's result.
    pub theirs: u64,
}

#[derive(Default)]
struct PeerShared {
    started: CachePadded<AtomicU64>,
    finished: CachePadded<AtomicU64>,
    result: AtomicU64,
}

/// The other thread of a benchmark: spawned once per benchmark, it sleeps between rounds
/// and runs `body(iters)` once per round, so thread spawning is never measured.
pub struct Peer {
    cmd: Option<SyncSender<u64>>,
    shared: Arc<PeerShared>,
    thread: Option<JoinHandle<()>>,
    rounds: u64,
}

impl Peer {
    /// Spawns the peer. `body(iters)` runs one round and returns the peer's result.
    pub fn spawn(name: &str, mut body: impl FnMut(u64) -> u64 + Send + 'static) -> Self {
        let (cmd, rx) = mpsc::sync_channel::<u64>(1);
        let shared = Arc::new(PeerShared::default());
        let s = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let mut round = 0;
                let failure = loop {
                    let Ok(iters) = rx.recv() else { return };
                    round += 1;
                    s.started.store(round, Ordering::Release);
                    match panic::catch_unwind(AssertUnwindSafe(|| body(iters))) {
                        Ok(r) => {
                            s.result.store(r, Ordering::Relaxed);
                            s.finished.store(round, Ordering::Release);
                        }
                        Err(p) => break p,
                    }
                };
                PEER_FAILED.store(true, Ordering::Relaxed);
                // Dropping our ends (sockets, channels) unblocks a measuring thread that
                // waits in a system call.
                drop(body);
                panic::resume_unwind(failure);
            })
            .expect("spawn a peer thread");
        Self {
            cmd: Some(cmd),
            shared,
            thread: Some(thread),
            rounds: 0,
        }
    }

    /// One measured round: wakes the peer, starts the clock once it runs, runs
    /// `mine(iters)` here, and stops the clock when both are done.
    pub fn round(&mut self, iters: u64, mine: impl FnOnce(u64) -> u64) -> Round {
        self.start(iters);
        self.wait_started();
        let start = Instant::now();
        let mine = mine(iters);
        let theirs = self.wait_finished();
        Round {
            elapsed: start.elapsed(),
            mine,
            theirs,
        }
    }

    /// Wakes the peer for a round of `iters`.
    pub fn start(&mut self, iters: u64) {
        self.rounds += 1;
        self.cmd
            .as_ref()
            .expect("peer running")
            .send(iters)
            .expect("peer thread alive");
    }

    /// Waits until the peer runs the round [`start`](Self::start) asked for.
    pub fn wait_started(&self) {
        spin_until(|| self.shared.started.load(Ordering::Acquire) == self.rounds);
    }

    /// Waits until the peer finished the round; returns its result.
    pub fn wait_finished(&self) -> u64 {
        spin_until(|| self.shared.finished.load(Ordering::Acquire) == self.rounds);
        self.shared.result.load(Ordering::Relaxed)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.cmd = None;
        if let Some(t) = self.thread.take()
            && !thread::panicking()
        {
            t.join().expect("peer thread panicked");
        }
    }
}

/// Registers benchmark `id` in `g`: each criterion batch of `n` iterations is one
/// [`Peer::round`], and `check(first, n, round)` verifies what it moved, `first` being
/// the number of the round's first packet.
pub fn bench_pair<I: Into<String>>(
    g: &mut Group<'_>,
    id: I,
    mut peer: Peer,
    mut mine: impl FnMut(u64) -> u64,
    check: impl Fn(u64, u64, Round),
) {
    let mut first = 0u64;
    g.bench_function(id.into(), |b| {
        b.iter_custom(|n| {
            let r = peer.round(n, &mut mine);
            check(first, n, r);
            first += n;
            r.elapsed
        })
    });
}

/// The usual verification: the receiving side(s) report [`expected`] checksums.
pub fn verify(name: &str, got: u64, first: u64, n: u64, samples: usize) {
    let want = expected(first, n, samples);
    assert_eq!(
        got,
        want,
        "{name}: checksum mismatch for packets {first}..{}",
        first + n
    );
}

/// A buffer handed between two threads with one flag, the cross-core bandwidth floor: the
/// sender copies a packet in and raises the flag, the receiver copies it out and lowers it.
/// The halves are separate and take `&mut self`, so exactly one thread writes and one
/// reads, and the flag orders their turns.
pub fn handoff(len: usize) -> (HandoffSender, HandoffReceiver) {
    let inner = Arc::new(Handoff {
        buf: UnsafeCell::new(vec![0u8; len].into_boxed_slice()),
        full: CachePadded::new(AtomicBool::new(false)),
    });
    (HandoffSender(Arc::clone(&inner)), HandoffReceiver(inner))
}

struct Handoff {
    buf: UnsafeCell<Box<[u8]>>,
    full: CachePadded<AtomicBool>,
}

// SAFETY: `buf` is touched only by the sender while `full` is false and by the receiver
// while it is true; each turn ends with a release store the other side acquires.
unsafe impl Sync for Handoff {}

/// The writing half of [`handoff`].
pub struct HandoffSender(Arc<Handoff>);

/// The reading half of [`handoff`].
pub struct HandoffReceiver(Arc<Handoff>);

impl HandoffSender {
    /// Waits for the buffer to be free, copies `data` in and hands it over.
    pub fn put(&mut self, data: &[u8]) {
        let h = &*self.0;
        spin_until(|| !h.full.load(Ordering::Acquire));
        // SAFETY: `full` is false, so the receiver is done with the buffer (its release
        // store was acquired above) and will not touch it until we raise the flag.
        let buf = unsafe { &mut *h.buf.get() };
        buf[..data.len()].copy_from_slice(data);
        h.full.store(true, Ordering::Release);
    }
}

impl HandoffReceiver {
    /// Waits for a packet, copies it into `out` and frees the buffer.
    pub fn take(&mut self, out: &mut [u8]) {
        let h = &*self.0;
        spin_until(|| h.full.load(Ordering::Acquire));
        // SAFETY: `full` is true, so the sender finished writing (its release store was
        // acquired above) and will not touch the buffer until we lower the flag.
        let buf = unsafe { &*h.buf.get() };
        out.copy_from_slice(&buf[..out.len()]);
        h.full.store(false, Ordering::Release);
    }
}

/// Checks the checksum machinery itself (the bench target has no test harness): the
/// closed form matches the checker, and a wrong packet is noticed.
pub fn self_check() {
    let mut c = Check::new(8);
    for seq in 0..10 {
        c.packet(&msg(seq));
    }
    assert_eq!(c.round(), expected(0, 10, 8));
    for seq in 10..15 {
        c.packet(&msg(seq));
    }
    assert_eq!(c.round(), expected(10, 5, 8));
    c.packet(&msg(99));
    assert_ne!(
        c.round(),
        expected(15, 1, 8),
        "a stale packet must be noticed"
    );
    let mut bulk = vec![0u8; 8192];
    stamp(&mut bulk, 3, BULK_STRIDE, 0);
    let mut c = Check::new(BULK_STRIDE);
    c.next = 3;
    c.part(&bulk[..4096], 0);
    c.part(&bulk[4096..], 4096 / BULK_STRIDE);
    c.end_packet();
    assert_eq!(c.round(), expected(3, 1, 8192 / BULK_STRIDE));
}
