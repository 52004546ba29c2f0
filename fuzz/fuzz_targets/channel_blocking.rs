//! The channel's blocking paths against a scripted peer, with our side on several threads.
//!
//! Side A (ours) is shared by three worker threads, each running the blocking calls the
//! script hands it, every one with a deadline of 0–4 ms: `call` (completions stored for
//! the caller while other packets wait in the unsolicited-packet queue, bounded to 1–4
//! packets and to 1 MiB, 4 KiB, 256 or 24 bytes), `send` (waiting for space in a 1–2 page
//! ring), `recv` / `recv_with` / `recv_batch` (with payload reads and whole-header reads:
//! `header` or `gpa_ranges` into a scratch of any length), and `start_request` (a
//! polled transaction whose completion a receiver gets). The main
//! thread plays the peer between pauses: through side B it receives A's requests and
//! completes them (pending, already completed, or raw ids; payloads of any length), sends
//! packets (asking for completions or not) and may leave (dropping B and its doorbell);
//! or it attacks A's incoming ring directly: hand-built packets, scribbles, any control
//! word of either ring.
//!
//! Every request carries a token naming its caller; the peer's completion for a transaction
//! id carries the token of the request that had that id (or a token nobody owns). Asserted:
//! - every blocking call returns within its deadline plus [`SLACK`], every `try_` call
//!   within [`SLACK`] (unless the whole process was stopped meanwhile: a monitor thread
//!   that wakes every few milliseconds notices such stalls, e.g. `SIGSTOP` or a suspended
//!   machine, and excuses calls that overlapped one);
//! - each call returns only the errors its documentation names; `Closed` only once the
//!   peer left;
//! - an `Err(Failed(c))` means `state() == Failed(c)`; every failure any thread sees has the
//!   same cause, and a call started on a failed channel returns exactly that cause;
//! - while the peer only writes through B (no forged ring contents), a call's response
//!   carries that caller's own token and the length of the first completion the peer sent
//!   for its id; a call's `BufferTooSmall` names the caller's capacity and that completion's
//!   length (or the length of a completion the peer sent for an id it had not received);
//! - payload reads from a packet received in place succeed exactly when in bounds; a
//!   whole-header read returns exactly the `header_len` bytes when the scratch holds them
//!   and `BufferTooSmall` exactly when it does not, `NotGpaDirect` exactly for GPA ranges of
//!   another type, `Failed(c)` only for a GPA-direct or transfer-page header, with `c` the
//!   channel's one cause from then on; what it hands out is valid (it parses; GPA ranges are
//!   well formed and fill the header), and so is such a header copied by `recv`;
//! - a completion handed to a receiver is for an id A started with `start_request`
//!   and not yet completed; a channel failing with `UnknownTransaction { id }` (peer writing
//!   through B only) had no such request outstanding: the peer never received a request
//!   with that id, or had completed it before;
//! - `transactions_in_flight()` never exceeds `MAX_TRANSACTIONS`, and when the peer behaves
//!   and stays, it returns to 0 once the peer has answered everything and A has drained its
//!   ring (every abandoned call's late completion discarded);
//! - no allocation any of A's calls makes is larger than twice A's incoming data area (so
//!   none is sized by the peer beyond one ring), but for the unsolicited-packet queue's one
//!   buffer of exactly `queue_bytes`, which only a call allocates.
#![no_main]

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmlink_channel::Polled;
use vmlink_channel::Wait;
use vmlink_channel::packet::{parse_gpa_header, parse_transfer_page_header};
use vmlink_channel::{
    Channel, ChannelError, ChannelState, Config, Doorbell, FailureCause, InProcessDoorbell,
    MAX_TRANSACTIONS, OutgoingPacket, PacketMeta, PacketType, ProtocolError, Received,
    in_process_pair,
};
use vmlink_fuzz::{
    HeaderCall, HeaderVerdict, IndexValue, PeerPacket, Scribble, WholeHeader, largest_alloc,
    read_whole_header, write_wrapped_peer,
};
use vmlink_ring::protocol::PAGE_SIZE;
use vmlink_ring::{ControlWord, HeapMem, RingMem};

type Chan = Channel<Arc<HeapMem>, InProcessDoorbell>;

/// How long past its deadline (or, for a `try_` call, at all) a call may take: generous,
/// for a loaded machine; a call that hangs is still caught.
const SLACK: Duration = Duration::from_secs(1);
const WORKERS: usize = 3;
/// Tokens: this in the high 32 bits, worker and sequence number below.
const TOKEN_MAGIC: u64 = 0xC0DE_5EED_0000_0000;
/// The token of a completion for an id no request of ours had.
const NOBODY: u64 = 0xC0DE_5EED_FFFF_FFFF;
const MAX_STEPS: usize = 64;
const MAX_WORK: usize = 24;
/// Pauses per input add up to at most this.
const MAX_PAUSE_US: u64 = 10_000;

#[derive(Arbitrary, Debug, Clone)]
enum Work {
    Call {
        request_len: u16,
        response_cap: u16,
        ms: u8,
    },
    Send {
        len: u16,
        ms: u8,
    },
    Recv {
        buf_len: u16,
        ms: u8,
    },
    /// `reads`: `(header, offset, len)`. A payload read (`!header`) copies `len` bytes at
    /// `offset`; a header read copies the whole header into a `len`-byte scratch with
    /// `header` (even `offset`) or `gpa_ranges` (odd).
    RecvInPlace {
        ms: u8,
        reads: Vec<(bool, u16, u16)>,
    },
    RecvBatch {
        max: u8,
        ms: u8,
        reads: Vec<(bool, u16, u16)>,
    },
    StartRequest {
        len: u16,
    },
}

/// Which transaction id the peer completes.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Pick {
    /// A request it received and has not completed yet (the oldest if `n` is out of range).
    Pending(u8),
    /// Any request it received, maybe completed already (a duplicate).
    Received(u8),
    /// Any id.
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum RingSel {
    /// A's outgoing ring (B reads it).
    Outgoing,
    /// A's incoming ring (B writes it).
    Incoming,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Word {
    WriteIndex,
    ReadIndex,
    InterruptMask,
    PendingSendSize,
    FeatureBits,
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// Hands `work` to a worker (it queues behind the worker's earlier work).
    Work { worker: u8, work: Work },
    /// The peer does nothing for up to 3 ms.
    Pause { us: u16 },
    /// Waits until a worker has finished everything handed to it.
    WaitIdle { worker: u8 },
    /// B receives up to `max % 8 + 1` packets, remembering requests.
    PeerRecv { max: u8 },
    /// B completes a transaction id with a payload of 8 + `extra` bytes.
    PeerComplete { pick: Pick, extra: u16 },
    /// B sends an in-band packet, asking for a completion or not.
    PeerSend {
        len: u16,
        completion_requested: bool,
    },
    /// B sends until its ring is full (A's callers queue, receivers find plenty).
    PeerFlood { len: u8 },
    /// The peer leaves: B and its doorbell are dropped.
    PeerLeave,
    /// A hand-built packet published in A's incoming ring, bypassing B.
    PeerPacket(PeerPacket),
    /// Bytes written anywhere in A's incoming ring.
    Scribble(Scribble),
    /// Any control word of either ring.
    Control {
        ring: RingSel,
        word: Word,
        value: IndexValue,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// `% 2 + 1` pages; `/ 2 % 4` picks A's GPA page limit ([`gpa_limit`]).
    pages_ab: u8,
    pages_ba: u8,
    /// The queue's bounds: `% 4 + 1` packets; `/ 4 % 4` picks the bytes ([`queue_bytes`]).
    queue_depth: u8,
    spin: bool,
    steps: Vec<Step>,
}

/// What the threads share.
struct Shared {
    a: Chan,
    /// A's incoming data-area length.
    incoming_len: usize,
    /// A's `Config::queue_bytes`.
    queue_bytes: usize,
    /// A's `Config::gpa_page_limit`.
    gpa_limit: Option<u64>,
    /// The first failure cause anyone saw.
    cause: Mutex<Option<FailureCause>>,
    /// The peer has left.
    peer_left: AtomicBool,
    /// The peer has written A's rings other than through B: contents are not the peer's
    /// protocol-level choices any more.
    forged: AtomicBool,
    /// Ids A started with `start_request` whose completion no receiver got yet.
    polled: Mutex<HashSet<u64>>,
    /// The length of the first completion the peer sent for each token.
    first_completion: Mutex<HashMap<u64, usize>>,
    /// Payload lengths (padded) of completions the peer sent with the token [`NOBODY`] (for
    /// ids it had received no request for), with how many went out.
    nobody_lengths: Mutex<HashMap<usize, usize>>,
}

/// Work handed to each worker and not finished (0 between inputs).
static PENDING: [AtomicUsize; WORKERS] = [const { AtomicUsize::new(0) }; WORKERS];

type Job = Box<dyn FnOnce() + Send>;

/// When the monitor last woke up much later than it asked to (the process did not run):
/// nanoseconds since [`epoch`], 0 if never.
static LAST_STALL: AtomicU64 = AtomicU64::new(0);
/// A wake-up this much later than asked for is a stall of the whole process.
const STALL: Duration = Duration::from_millis(250);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Starts the stall monitor once.
fn start_monitor() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        epoch();
        thread::Builder::new()
            .name("stall monitor".into())
            .spawn(|| {
                loop {
                    let before = Instant::now();
                    thread::sleep(Duration::from_millis(5));
                    let now = Instant::now();
                    if now - before > STALL {
                        LAST_STALL.store((now - epoch()).as_nanos() as u64, Ordering::SeqCst);
                    }
                }
            })
            .unwrap();
    });
}

/// True when the process was stalled at some point after `since`.
fn stalled_since(since: Instant) -> bool {
    let last = LAST_STALL.load(Ordering::SeqCst);
    last != 0 && epoch() + Duration::from_nanos(last) >= since
}

/// The worker threads, started once and kept for every input (threads started and ended per
/// input would cost more than the input, and leave thread-exit records LeakSanitizer
/// reports).
fn workers() -> &'static [Mutex<mpsc::Sender<Job>>; WORKERS] {
    static POOL: OnceLock<[Mutex<mpsc::Sender<Job>>; WORKERS]> = OnceLock::new();
    POOL.get_or_init(|| {
        core::array::from_fn(|w| {
            let (tx, rx) = mpsc::channel::<Job>();
            thread::Builder::new()
                .name(format!("worker {w}"))
                .spawn(move || {
                    for job in rx {
                        job();
                        PENDING[w].fetch_sub(1, Ordering::SeqCst);
                    }
                })
                .unwrap();
            Mutex::new(tx)
        })
    })
}

fn wait_idle(w: usize) {
    let start = Instant::now();
    while PENDING[w].load(Ordering::SeqCst) > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5) || stalled_since(start),
            "worker {w} never finished"
        );
        thread::sleep(Duration::from_micros(50));
    }
}

impl Shared {
    /// Records a failure cause someone saw; all must agree.
    fn saw_failure(&self, what: &str, c: FailureCause) {
        let mut first = self.cause.lock().unwrap();
        match *first {
            Some(f) => assert_eq!(f, c, "{what}: a second failure cause"),
            None => *first = Some(c),
        }
    }

    /// Checks the channel's state against what was seen.
    fn check_state(&self, what: &str) {
        let st = self.a.state();
        if let ChannelState::Failed(c) = st {
            self.saw_failure(what, c);
        } else if let Some(c) = *self.cause.lock().unwrap() {
            panic!("{what}: channel failed with {c:?}, now {st:?}");
        }
        assert!(self.a.transactions_in_flight() <= MAX_TRANSACTIONS);
    }

    /// Checks an error: `Failed` matches the state, `Closed` only after the peer left,
    /// anything else must be one `allowed` names.
    fn check_err(&self, what: &str, e: ChannelError, allowed: fn(&ChannelError) -> bool) {
        match e {
            ChannelError::Failed(c) => {
                assert_eq!(
                    self.a.state(),
                    ChannelState::Failed(c),
                    "{what}: Failed but the state differs"
                );
                self.saw_failure(what, c);
            }
            ChannelError::Closed => assert!(
                self.peer_left.load(Ordering::SeqCst),
                "{what}: Closed while the peer is there"
            ),
            e => assert!(allowed(&e), "{what}: undocumented error {e:?}"),
        }
    }

    /// A packet was handed to a receiver of A.
    fn received(&self, what: &str, r: &Received) {
        if r.packet_type == PacketType::Completion {
            assert!(
                self.polled.lock().unwrap().remove(&r.transaction_id),
                "{what}: completion for {:#x}, not a polled transaction in flight",
                r.transaction_id
            );
        }
    }
}

/// A's GPA page limit for the input's selector: none, nothing allowed, 16 pages, or far.
fn gpa_limit(selector: u8) -> Option<u64> {
    match selector / 2 % 4 {
        0 => None,
        1 => Some(0),
        2 => Some(16),
        _ => Some(1 << 40),
    }
}

/// `Config::queue_bytes` for the input's selector: the default, a page, less than most
/// packets, or only the smallest.
fn queue_bytes(selector: u8) -> usize {
    match selector / 4 % 4 {
        0 => Config::default().queue_bytes,
        1 => 4096,
        2 => 256,
        _ => 24,
    }
}

/// A completion payload's length as the receiver sees it: padded to 8 bytes.
fn padded(len: usize) -> usize {
    len.div_ceil(8) * 8
}

/// A GPA-direct or transfer-page header handed out by a copying receive is valid.
fn check_copied_header(what: &str, r: &Received, buf: &[u8], limit: Option<u64>) {
    let header = r.header(buf);
    match r.packet_type {
        PacketType::GpaDirect => assert!(
            parse_gpa_header(header, limit).is_ok(),
            "{what}: an invalid GPA header handed out"
        ),
        PacketType::TransferPages => assert!(
            parse_transfer_page_header(header).is_ok(),
            "{what}: an invalid transfer-page header handed out"
        ),
        _ => {}
    }
}

fn deadline(ms: u8) -> (Instant, Duration) {
    let d = Duration::from_millis(u64::from(ms % 5));
    (Instant::now() + d, d)
}

fn token_payload(token: u64, len: usize) -> Vec<u8> {
    let mut p = token.to_le_bytes().to_vec();
    p.extend((0..len).map(|i| i as u8));
    p
}

/// A payload read of `len` bytes at `offset` from a `size`-byte payload succeeds exactly
/// when in bounds.
fn check_read(what: &str, size: usize, offset: u16, r: Result<(), ChannelError>, len: usize) {
    let offset = offset as usize;
    if offset + len <= size {
        assert_eq!(r, Ok(()), "{what}: in-bounds read failed");
    } else {
        assert_eq!(
            r,
            Err(ChannelError::OutOfBounds { offset, len, size }),
            "{what}: out-of-bounds read"
        );
    }
}

/// A whole-header read of a packet received in place, checked by [`read_whole_header`];
/// a failure it reports must be the channel's one cause (the header's own, or the one the
/// channel already had).
fn header_read(sh: &Shared, what: &str, p: &mut impl WholeHeader, offset: u16, scratch: &mut [u8]) {
    // Other threads and the peer may change the ring meanwhile: no memo.
    let call = HeaderCall::from_selector(offset);
    if let HeaderVerdict::Failed(c) = read_whole_header(p, call, scratch, sh.gpa_limit, None) {
        sh.check_err(what, ChannelError::Failed(c), |_| false);
    }
}

/// Runs one piece of work on A and checks what it returned.
fn run_work(sh: &Shared, worker: usize, seq: u64, work: &Work) {
    let a = &sh.a;
    let failed_before = match a.state() {
        ChannelState::Failed(c) => Some(c),
        _ => None,
    };
    let token = TOKEN_MAGIC | ((worker as u64) << 24) | (seq & 0xFF_FFFF);
    let start = Instant::now();
    let mut limit = SLACK;
    let bound = 2 * sh.incoming_len;
    let (what, result): (&str, Result<(), ChannelError>) = match work {
        Work::Call {
            request_len,
            response_cap,
            ms,
        } => {
            let (d, dur) = deadline(*ms);
            limit += dur;
            let request = token_payload(token, *request_len as usize % 9000);
            let cap = *response_cap as usize % 9000;
            let mut response = vec![0u8; cap];
            let (r, largest) = largest_alloc(|| a.call(&request, &mut response, Some(d)));
            // Beyond the bound only the queue's one buffer, when this call queued the first
            // packet.
            assert!(
                largest <= bound || largest == sh.queue_bytes,
                "call allocated {largest} bytes"
            );
            let r = match r {
                Ok(n) => {
                    assert!(n <= cap, "call: {n} bytes into {cap}");
                    if !sh.forged.load(Ordering::SeqCst) {
                        assert!(n >= 8, "call: a {n}-byte response");
                        let got = u64::from_le_bytes(response[..8].try_into().unwrap());
                        // NOBODY: a raw id that happened to be this call's, sent before the
                        // peer saw the request.
                        if got != NOBODY {
                            assert_eq!(got, token, "call: someone else's completion");
                            let sent = sh.first_completion.lock().unwrap().get(&token).copied();
                            let want = sent.map(padded);
                            assert_eq!(Some(n), want, "call: length");
                        }
                    }
                    Ok(())
                }
                Err(ChannelError::BufferTooSmall { needed, capacity }) => {
                    assert_eq!(capacity, cap, "call: BufferTooSmall capacity");
                    assert!(needed > cap, "call: BufferTooSmall for {needed} bytes");
                    if !sh.forged.load(Ordering::SeqCst) {
                        // The completion's real length: the first the peer sent for this
                        // caller's request, or one it sent for an id it had not received
                        // (which may have been this call's).
                        let sent = sh.first_completion.lock().unwrap().get(&token).copied();
                        let nobody = sh.nobody_lengths.lock().unwrap().contains_key(&needed);
                        assert!(
                            sent.map(padded) == Some(needed) || nobody,
                            "call: BufferTooSmall needs {needed} bytes, the peer sent {sent:?}"
                        );
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            };
            ("call", r)
        }
        Work::Send { len, ms } => {
            let (d, dur) = deadline(*ms);
            limit += dur;
            let payload = token_payload(token, *len as usize % 9000);
            let (r, largest) = largest_alloc(|| a.send(&payload, Some(d)));
            assert!(largest <= bound, "send allocated {largest} bytes");
            ("send", r)
        }
        Work::Recv { buf_len, ms } => {
            let (d, dur) = deadline(*ms);
            limit += dur;
            let cap = *buf_len as usize % 9000;
            let mut buf = vec![0u8; cap];
            let (r, largest) = largest_alloc(|| a.recv(&mut buf, Some(d)));
            assert!(largest <= bound, "recv allocated {largest} bytes");
            let r = match r {
                Ok(got) => {
                    assert!(got.len() <= cap);
                    check_copied_header("recv", &got, &buf, sh.gpa_limit);
                    sh.received("recv", &got);
                    Ok(())
                }
                Err(ChannelError::BufferTooSmall { needed, capacity }) => {
                    assert_eq!(capacity, cap);
                    assert!(needed > cap);
                    Ok(())
                }
                Err(e) => Err(e),
            };
            ("recv", r)
        }
        Work::RecvInPlace { ms, reads } => {
            let (d, dur) = deadline(*ms);
            limit += dur;
            let mut got = None;
            let mut bufs: Vec<Vec<u8>> = reads
                .iter()
                .take(3)
                .map(|r| vec![0u8; r.2 as usize % 9000])
                .collect();
            let (r, largest) = largest_alloc(|| {
                a.recv_with(Some(d), |g| {
                    let m = g.meta();
                    got = Some(m);
                    for (&(header, offset, _), buf) in reads.iter().zip(bufs.iter_mut()) {
                        if header {
                            header_read(sh, "Packet", g, offset, buf);
                        } else {
                            let r = g.read_payload(offset as usize, buf);
                            check_read("Packet", m.payload_len, offset, r, buf.len());
                        }
                    }
                })
            });
            assert!(largest <= bound, "recv_with allocated {largest} bytes");
            if let Some(m) = &got {
                sh.received("recv_with", m);
            }
            ("recv_with", r)
        }
        Work::RecvBatch { max, ms, reads } => {
            let (d, dur) = deadline(*ms);
            limit += dur;
            let max = *max as usize % 8;
            let mut bufs: Vec<Vec<u8>> = reads
                .iter()
                .take(3)
                .map(|r| vec![0u8; r.2 as usize % 9000])
                .collect();
            let mut got = Vec::with_capacity(8);
            let (r, largest) = largest_alloc(|| {
                a.recv_batch(max, Some(d), |p| {
                    let m = p.meta();
                    got.push(m);
                    for (&(header, offset, _), buf) in reads.iter().zip(bufs.iter_mut()) {
                        if header {
                            header_read(sh, "Packet", p, offset, buf);
                        } else {
                            let r = p.read_payload(offset as usize, buf);
                            check_read("Packet", m.payload_len, offset, r, buf.len());
                        }
                    }
                })
            });
            assert!(largest <= bound, "recv_batch allocated {largest} bytes");
            for m in &got {
                sh.received("recv_batch", m);
            }
            let r = match r {
                Ok(n) => {
                    assert_eq!(n, got.len());
                    assert!(n <= max);
                    // Waiting for at least one packet with `max == 0` can only time out.
                    assert!(n > 0, "recv_batch returned Ok(0)");
                    Ok(())
                }
                Err(e) => {
                    assert!(got.len() <= max);
                    Err(e)
                }
            };
            ("recv_batch", r)
        }
        Work::StartRequest { len } => {
            let request = token_payload(token, *len as usize % 9000);
            // Held while the request goes out, so a receiver cannot see the completion
            // before the id is recorded.
            let mut polled = sh.polled.lock().unwrap();
            let r = a.start_request(&request, Wait::Now);
            if let Ok(tid) = r {
                assert!(
                    polled.insert(tid),
                    "try_start_request: id {tid:#x} in flight"
                );
            }
            drop(polled);
            ("start_request(Now)", r.map(drop))
        }
    };
    let took = start.elapsed();
    // A stall ends when the monitor runs again, which may be a little after this thread
    // does: give it time to report one before calling the call late.
    if took > limit {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        took <= limit || stalled_since(start),
        "{what} took {took:?} (limit {limit:?})"
    );
    match result {
        Ok(()) => assert!(
            failed_before.is_none(),
            "{what} succeeded on a failed channel"
        ),
        Err(e) => {
            if let Some(c) = failed_before {
                assert_eq!(e, ChannelError::Failed(c), "{what} on a failed channel");
            }
            let allowed: fn(&ChannelError) -> bool = match work {
                Work::Call { .. } => |e| {
                    matches!(
                        e,
                        ChannelError::TimedOut
                            | ChannelError::TooLarge { .. }
                            | ChannelError::TransactionsExhausted { .. }
                    )
                },
                Work::Send { .. } => {
                    |e| matches!(e, ChannelError::TimedOut | ChannelError::TooLarge { .. })
                }
                Work::StartRequest { .. } => |e| {
                    matches!(
                        e,
                        ChannelError::Full
                            | ChannelError::TooLarge { .. }
                            | ChannelError::TransactionsExhausted { .. }
                    )
                },
                _ => |e| matches!(e, ChannelError::TimedOut),
            };
            sh.check_err(what, e, allowed);
        }
    }
    sh.check_state(what);
}

/// The peer: side B (while it stays) and what it knows of A's requests.
struct Peer {
    b: Option<Chan>,
    buf: Vec<u8>,
    /// Requests received, in order: (id, the token in the request).
    requests: Vec<(u64, u64)>,
    /// Ids it received a request for.
    owner: HashMap<u64, u64>,
    /// Completions it sent, per id.
    completions: HashMap<u64, u32>,
    /// B failed (its own protocol checks fired): it cannot be relied on to answer.
    b_failed: bool,
}

impl Peer {
    fn recv(&mut self, max: usize) -> usize {
        let Some(b) = &self.b else { return 0 };
        let mut n = 0;
        while n < max {
            match b.recv(&mut self.buf, Wait::Now).polled() {
                Ok(Some(r)) => {
                    n += 1;
                    if r.completion_requested && r.payload_len >= 8 {
                        let p = r.payload(&self.buf);
                        let token = u64::from_le_bytes(p[..8].try_into().unwrap());
                        self.requests.push((r.transaction_id, token));
                        self.owner.insert(r.transaction_id, token);
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    self.b_failed = matches!(b.state(), ChannelState::Failed(_));
                    break;
                }
            }
        }
        n
    }

    fn pending(&self) -> impl Iterator<Item = u64> + '_ {
        self.requests
            .iter()
            .map(|r| r.0)
            .filter(|t| !self.completions.contains_key(t))
    }

    /// Completes `tid` through B with the owner's token; true when it went out.
    fn complete(&mut self, sh: &Shared, tid: u64, extra: usize) -> bool {
        let Some(b) = &self.b else { return false };
        let token = self.owner.get(&tid).copied().unwrap_or(NOBODY);
        let payload = token_payload(token, extra);
        // Recorded before the completion goes out: the caller may look at once.
        // Only the first: a duplicate must not replace it.
        let fresh = token != NOBODY
            && match sh.first_completion.lock().unwrap().entry(token) {
                Entry::Vacant(v) => {
                    v.insert(payload.len());
                    true
                }
                Entry::Occupied(_) => false,
            };
        if token == NOBODY {
            *sh.nobody_lengths
                .lock()
                .unwrap()
                .entry(padded(payload.len()))
                .or_default() += 1;
        }
        match b.complete(tid, &payload, Wait::Now) {
            Ok(()) => {
                *self.completions.entry(tid).or_default() += 1;
                true
            }
            Err(_) => {
                if fresh {
                    sh.first_completion.lock().unwrap().remove(&token);
                }
                if token == NOBODY {
                    let mut lengths = sh.nobody_lengths.lock().unwrap();
                    let n = lengths.entry(padded(payload.len())).or_default();
                    *n -= 1;
                    if *n == 0 {
                        lengths.remove(&padded(payload.len()));
                    }
                }
                self.b_failed = matches!(b.state(), ChannelState::Failed(_));
                false
            }
        }
    }
}

fn word_of(w: Word) -> ControlWord {
    match w {
        Word::WriteIndex => ControlWord::WriteIndex,
        Word::ReadIndex => ControlWord::ReadIndex,
        Word::InterruptMask => ControlWord::InterruptMask,
        Word::PendingSendSize => ControlWord::PendingSendSize,
        Word::FeatureBits => ControlWord::FeatureBits,
    }
}

/// A drains what it can without waiting; checks every packet.
fn drain_a(sh: &Shared) {
    let mut buf = vec![0u8; sh.incoming_len];
    for _ in 0..1024 {
        match sh.a.recv(&mut buf, Wait::Now).polled() {
            Ok(Some(r)) => {
                check_copied_header("settle: try_recv", &r, &buf, sh.gpa_limit);
                sh.received("settle: try_recv", &r);
            }
            Ok(None) => return,
            Err(e) => {
                sh.check_err("settle: try_recv", e, |_| false);
                return;
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let len_ab = (input.pages_ab as usize % 2 + 1) * PAGE_SIZE;
    let len_ba = (input.pages_ba as usize % 2 + 1) * PAGE_SIZE;
    let ab = Arc::new(HeapMem::new(len_ab).unwrap());
    let ba = Arc::new(HeapMem::new(len_ba).unwrap());
    let mut config = if input.spin {
        Config::polling(50)
    } else {
        Config::default()
    };
    config = config
        .with_queue_depth(input.queue_depth as usize % 4 + 1)
        .with_queue_bytes(queue_bytes(input.queue_depth));
    if let Some(l) = gpa_limit(input.pages_ab) {
        config = config.with_gpa_page_limit(l);
    }
    config.space_recheck = Duration::from_millis(1);
    let (da, db) = in_process_pair();
    let a = Channel::new(ab.clone(), ba.clone(), da, config).unwrap();
    let b = Channel::new(ba.clone(), ab.clone(), db, Config::default()).unwrap();
    let sh = Shared {
        a,
        incoming_len: len_ba,
        queue_bytes: config.queue_bytes,
        gpa_limit: config.gpa_page_limit,
        cause: Mutex::new(None),
        peer_left: AtomicBool::new(false),
        forged: AtomicBool::new(false),
        polled: Mutex::new(HashSet::new()),
        first_completion: Mutex::new(HashMap::new()),
        nobody_lengths: Mutex::new(HashMap::new()),
    };
    let mut peer = Peer {
        b: Some(b),
        buf: vec![0u8; len_ab],
        requests: Vec::new(),
        owner: HashMap::new(),
        completions: HashMap::new(),
        b_failed: false,
    };
    let sh = Arc::new(sh);
    start_monitor();
    let pool = workers();
    let mut seqs = [0u64; WORKERS];

    {
        let mut work_given = 0;
        let mut paused = 0;
        for step in input.steps.iter().take(MAX_STEPS) {
            match step {
                Step::Work { worker, work } => {
                    if work_given >= MAX_WORK {
                        continue;
                    }
                    work_given += 1;
                    let w = *worker as usize % WORKERS;
                    seqs[w] += 1;
                    let (seq, work, job_sh) = (seqs[w], work.clone(), sh.clone());
                    PENDING[w].fetch_add(1, Ordering::SeqCst);
                    let job: Job = Box::new(move || run_work(&job_sh, w, seq, &work));
                    pool[w].lock().unwrap().send(job).unwrap();
                }
                Step::Pause { us } => {
                    let us = u64::from(*us) % 3000;
                    if paused + us <= MAX_PAUSE_US {
                        paused += us;
                        thread::sleep(Duration::from_micros(us));
                    }
                }
                Step::WaitIdle { worker } => wait_idle(*worker as usize % WORKERS),
                Step::PeerRecv { max } => {
                    peer.recv(*max as usize % 8 + 1);
                }
                Step::PeerComplete { pick, extra } => {
                    let tid = match *pick {
                        Pick::Pending(n) => {
                            let pending: Vec<u64> = peer.pending().collect();
                            if pending.is_empty() {
                                continue;
                            }
                            pending.get(n as usize).copied().unwrap_or(pending[0])
                        }
                        Pick::Received(n) => {
                            if peer.requests.is_empty() {
                                continue;
                            }
                            peer.requests[n as usize % peer.requests.len()].0
                        }
                        Pick::Raw(t) => t,
                    };
                    peer.complete(&sh, tid, *extra as usize % 9000);
                }
                Step::PeerSend {
                    len,
                    completion_requested,
                } => {
                    if let Some(b) = &peer.b {
                        let p = token_payload(NOBODY, *len as usize % 9000);
                        let packet = OutgoingPacket {
                            meta: PacketMeta {
                                packet_type: PacketType::InBand,
                                flags: u16::from(*completion_requested),
                                transaction_id: if *completion_requested { 7 } else { 0 },
                            },
                            header: &[],
                            payload: vmlink_ring::Payload::Bytes(&p),
                        };
                        let _ = b.send_packet(&packet, Wait::Now);
                    }
                }
                Step::PeerFlood { len } => {
                    if let Some(b) = &peer.b {
                        let p = vec![0x3C; *len as usize];
                        for _ in 0..64 {
                            if b.send(&p, Wait::Now).is_err() {
                                break;
                            }
                        }
                    }
                }
                Step::PeerLeave => {
                    sh.peer_left.store(true, Ordering::SeqCst);
                    peer.b = None;
                }
                Step::PeerPacket(packet) => {
                    sh.forged.store(true, Ordering::SeqCst);
                    let len = ba.data_len();
                    let w = ba.load_control(ControlWord::WriteIndex);
                    let start = if (w as usize) < len { w & !7 } else { 0 };
                    let bytes = packet.encode(len, start);
                    write_wrapped_peer(&ba, start as usize, &bytes);
                    let end = ((start as usize + bytes.len()) % len) as u32 & !7;
                    ba.store_control(ControlWord::WriteIndex, end);
                    if let Some(b) = &peer.b {
                        let _ = b.doorbell().signal();
                    }
                }
                Step::Scribble(scribble) => {
                    sh.forged.store(true, Ordering::SeqCst);
                    scribble.apply(&ba);
                }
                Step::Control { ring, word, value } => {
                    sh.forged.store(true, Ordering::SeqCst);
                    let mem = match ring {
                        RingSel::Outgoing => &ab,
                        RingSel::Incoming => &ba,
                    };
                    mem.store_control(word_of(*word), value.resolve(mem.data_len()));
                }
            }
            sh.check_state("between steps");
        }
        for w in 0..WORKERS {
            wait_idle(w);
        }
    }
    let sh = &*sh;

    // Everyone is idle. A peer that behaved and stayed now answers every request; A drains
    // its ring; then no transaction may be left in flight.
    sh.check_state("after the script");
    let settle =
        !sh.forged.load(Ordering::SeqCst) && peer.b.is_some() && sh.cause.lock().unwrap().is_none();
    if settle {
        for _ in 0..8 * MAX_TRANSACTIONS {
            peer.recv(usize::MAX);
            if peer.b_failed {
                break;
            }
            let next = peer.pending().next();
            match next {
                Some(tid) => {
                    if !peer.complete(sh, tid, 0) {
                        // Full: let A make room.
                        drain_a(sh);
                    }
                }
                None => {
                    drain_a(sh);
                    if peer.recv(usize::MAX) == 0 && peer.pending().next().is_none() {
                        break;
                    }
                }
            }
            if peer.b_failed || sh.cause.lock().unwrap().is_some() {
                break;
            }
        }
        if !peer.b_failed && sh.cause.lock().unwrap().is_none() {
            assert_eq!(
                peer.pending().count(),
                0,
                "the peer left requests unanswered"
            );
            assert_eq!(
                sh.a.transactions_in_flight(),
                sh.polled.lock().unwrap().len(),
                "transactions in flight once every request was answered"
            );
            assert_eq!(sh.a.transactions_in_flight(), 0);
        }
    }
    if let Some(c) = *sh.cause.lock().unwrap()
        && let FailureCause::Protocol(ProtocolError::UnknownTransaction { transaction_id }) = c
        && !sh.forged.load(Ordering::SeqCst)
    {
        let outstanding = peer.owner.contains_key(&transaction_id)
            && peer.completions.get(&transaction_id).copied().unwrap_or(0) <= 1;
        assert!(
            !outstanding,
            "UnknownTransaction for {transaction_id:#x}, a request the peer completed once"
        );
    }
});
