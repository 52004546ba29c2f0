//! The data path allocates nothing: once a channel is warmed up (its unsolicited-packet
//! queue has its one buffer and the per-transaction completion buffers have reached their
//! steady capacity), sending, receiving, batching and calls make zero heap
//! allocations.
//!
//! A counting `#[global_allocator]` wraps `std::alloc::System` and counts allocations
//! (`alloc`, `alloc_zeroed`, `realloc`) per thread, only while that thread has switched
//! measuring on. Each scenario warms up unmeasured, then measures every thread that touches
//! the channel (sender, receiver, caller, server) for many iterations and asserts that each
//! counted zero:
//! - `send` (`Wait::Now`) + `recv` (`Wait::Now`);
//! - `send` + `recv`, blocking with deadlines, on two threads over a tiny ring (so senders
//!   wait for space and receivers sleep);
//! - `send_in_place` + `recv_with`, the same way;
//! - batches of 16 (`push_in_band` / `push_in_place`, one commit) + `recv_batch` (`Wait::Now`);
//! - `call` with a server thread receiving and completing;
//! - `call` while the server also sends unsolicited packets, which the caller queues (the
//!   queue's buffer) and a receiver thread takes.
//!
//! Why per-thread counting is sound: the channel starts no threads of its own and the
//! in-process doorbell has none either, so every allocation the channel makes on behalf of
//! an operation happens on the thread that called it. Counting exactly the threads that
//! call the channel therefore sees all of them, and nothing else: allocations by the test
//! harness or by tests running in parallel in this binary happen on unmeasured threads.
//! (This binary holds only these tests, as the design asks for tests that count
//! process-wide things.)
//!
//! Set `VMLINK_ALLOC_BACKTRACE=1` to print a backtrace for every counted allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::Backtrace;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use vmlink_channel::Polled;
use vmlink_channel::Wait;
use vmlink_channel::{Config, InProcessChannel, PacketMeta, in_process_channel_pair};

struct Counting;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

thread_local! {
    /// This thread counts its allocations.
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    /// Allocations counted on this thread.
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

/// Print a backtrace for every counted allocation.
static BACKTRACES: AtomicBool = AtomicBool::new(false);

fn note_allocation(size: usize) {
    // `const` thread-locals of `Cell<bool>` / `Cell<u64>` need no lazy initialisation and
    // no destructor, so touching them here never allocates (or recurses).
    let _ = MEASURING.try_with(|measuring| {
        if !measuring.get() {
            return;
        }
        COUNT.with(|c| c.set(c.get() + 1));
        if BACKTRACES.load(Ordering::Relaxed) {
            // Capturing and printing allocate: stop counting meanwhile.
            measuring.set(false);
            eprintln!(
                "heap allocation of {size} bytes on a measured thread ({:?}):\n{}",
                thread::current().name(),
                Backtrace::force_capture()
            );
            measuring.set(true);
        }
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so
// `System`'s guarantees hold; the counting touches only const thread-locals and an atomic.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation(layout.size());
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation(new_size);
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract (`ptr` came from this
        // allocator, i.e. from `System`, with `layout`), passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn init() {
    if std::env::var_os("VMLINK_ALLOC_BACKTRACE").is_some_and(|v| v != "0") {
        BACKTRACES.store(true, Ordering::Relaxed);
    }
}

/// Runs `f` with this thread's allocations counted; returns its result and the count.
fn measure<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = COUNT.with(Cell::get);
    MEASURING.with(|m| m.set(true));
    let r = f();
    MEASURING.with(|m| m.set(false));
    (r, COUNT.with(Cell::get) - before)
}

fn assert_no_allocations(scenario: &str, counts: &[(&str, u64)]) {
    for &(thread, n) in counts {
        assert_eq!(
            n, 0,
            "{scenario}: the {thread} thread made {n} heap allocations in steady state \
             (VMLINK_ALLOC_BACKTRACE=1 shows where)"
        );
    }
}

fn soon() -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(20))
}

const WARM_UP: usize = 2_000;

/// Deterministic payload bytes: byte `i` of every payload is `pattern()[i]`.
fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The payload length of iteration `i`, 0 to `max` (the largest first, so buffers that
/// grow to fit reach their final size during the warm-up).
fn len_for(i: usize, max: usize) -> usize {
    if i == 0 {
        return max;
    }
    (i.wrapping_mul(2_654_435_761) >> 7) % (max + 1)
}

fn max_payload(ch: &InProcessChannel) -> usize {
    ch.max_packet_len() - 16
}

/// The counter is not vacuous: it sees allocations on a measured thread, and only there.
#[test]
fn the_counter_counts() {
    init();
    let (v, n) = measure(|| std::hint::black_box(Vec::<u8>::with_capacity(100)));
    assert_eq!(n, 1, "one allocation counted");
    drop(v);
    // A spawned thread counts its own allocations while it measures; spawning it is
    // counted on this thread.
    let (inner, spawning) = measure(|| {
        thread::scope(|s| {
            s.spawn(|| measure(|| std::hint::black_box(vec![1u8; 100]).len()).1)
                .join()
                .expect("thread")
        })
    });
    assert_eq!(inner, 1);
    assert!(spawning >= 1);
}

#[test]
fn polling_send_and_recv_allocate_nothing() {
    init();
    const N: usize = 100_000;
    let (a, b) = in_process_channel_pair(16 * 4096, Config::default()).expect("pair");
    let max = max_payload(&a);
    let payload = pattern(max);
    let mut buf = vec![0u8; max];
    let round = |i: usize, buf: &mut [u8]| {
        let len = len_for(i, max);
        a.send(&payload[..len], Wait::Now).expect("send(Now)");
        let r = b
            .recv(buf, Wait::Now)
            .polled()
            .expect("recv(Now)")
            .expect("a packet");
        assert_eq!(r.payload_len, len.div_ceil(8) * 8);
        assert!(buf[..len] == payload[..len]);
    };
    for i in 0..WARM_UP {
        round(i, &mut buf);
    }
    let ((), n) = measure(|| {
        for i in WARM_UP..WARM_UP + N {
            round(i, &mut buf);
        }
    });
    assert_no_allocations("send(Now) + recv(Now)", &[("test", n)]);
}

/// Runs a sender and a receiver on two threads over a tiny ring, each measured after its
/// warm-up; returns their allocation counts and the channel's waits during the run.
fn two_threads(
    scenario: &str,
    send: impl Fn(&InProcessChannel, &[u8]) + Sync,
    recv: impl Fn(&InProcessChannel, &mut [u8]) -> usize + Sync,
) {
    const N: usize = 30_000;
    let (a, b) = in_process_channel_pair(4096, Config::default()).expect("pair");
    let max = max_payload(&a);
    let payload = pattern(max);
    let (a, b, payload, send, recv) = (&a, &b, &payload, &send, &recv);
    let (sender, receiver) = thread::scope(|s| {
        let sender = s.spawn(move || {
            for i in 0..WARM_UP {
                send(a, &payload[..len_for(i, max)]);
            }
            measure(|| {
                for i in WARM_UP..WARM_UP + N {
                    send(a, &payload[..len_for(i, max)]);
                }
            })
            .1
        });
        let receiver = s.spawn(move || {
            let mut buf = vec![0u8; max];
            let check = |i: usize, buf: &mut [u8]| {
                let len = len_for(i, max);
                let got = recv(b, buf);
                assert_eq!(got, len.div_ceil(8) * 8, "packet {i}");
                assert!(buf[..len] == payload[..len], "packet {i}");
            };
            for i in 0..WARM_UP {
                check(i, &mut buf);
            }
            measure(|| {
                for i in WARM_UP..WARM_UP + N {
                    check(i, &mut buf);
                }
            })
            .1
        });
        (
            sender.join().expect("sender"),
            receiver.join().expect("receiver"),
        )
    });
    let (ca, cb) = (a.counters(), b.counters());
    eprintln!(
        "{scenario}: {} packets, send waits {}, receive sleeps {}",
        ca.packets_sent, ca.send_waits, cb.receive_sleeps
    );
    assert!(
        ca.send_waits + cb.receive_sleeps > 0,
        "{scenario}: neither side ever blocked"
    );
    assert_no_allocations(scenario, &[("sender", sender), ("receiver", receiver)]);
}

#[test]
fn blocking_send_and_recv_allocate_nothing() {
    init();
    two_threads(
        "send + recv",
        |a, payload| a.send(payload, soon()).expect("send"),
        |b, buf| b.recv(buf, soon()).expect("recv").payload_len,
    );
}

#[test]
fn in_place_send_and_recv_allocate_nothing() {
    init();
    two_threads(
        "send_in_place + recv_with",
        |a, payload| {
            a.send_in_place(PacketMeta::in_band(), 0, payload.len(), soon(), |slot| {
                slot.write_payload(0, payload).expect("write_payload")
            })
            .expect("send_in_place")
        },
        |b, buf| {
            b.recv_with(soon(), |g| {
                let len = g.meta().payload_len;
                g.read_payload(0, &mut buf[..len]).expect("read_payload");
                len
            })
            .expect("recv_with")
        },
    );
}

#[test]
fn batches_allocate_nothing() {
    init();
    const N: usize = 20_000;
    const BATCH: usize = 16;
    let (a, b) = in_process_channel_pair(16 * 4096, Config::default()).expect("pair");
    let payload = pattern(256);
    let mut buf = vec![0u8; 256];
    let mut round = |i: usize| {
        let mut batch = a.batch().expect("batch");
        for k in 0..BATCH {
            let len = len_for(i * BATCH + k + 1, 256);
            if k % 2 == 0 {
                batch.push_in_band(&payload[..len]).expect("push_in_band");
            } else {
                batch
                    .push_in_place(PacketMeta::in_band(), 0, len, |slot| {
                        slot.write_payload(0, &payload[..len])
                    })
                    .expect("push_in_place")
                    .expect("write_payload");
            }
        }
        batch.commit().expect("commit");
        let mut k = 0;
        let n = b
            .recv_batch(BATCH, Wait::Now, |p| {
                let len = len_for(i * BATCH + k + 1, 256);
                let padded = len.div_ceil(8) * 8;
                assert_eq!(p.meta().payload_len, padded);
                p.read_payload(0, &mut buf[..padded]).expect("read_payload");
                assert!(buf[..len] == payload[..len]);
                k += 1;
            })
            .expect("recv_batch(Now)");
        assert_eq!(n, BATCH);
    };
    for i in 0..WARM_UP {
        round(i);
    }
    let ((), n) = measure(|| {
        for i in WARM_UP..WARM_UP + N {
            round(i);
        }
    });
    assert_no_allocations("batch of 16 + recv_batch(Now)", &[("test", n)]);
}

/// The completion for a request: the request reversed.
fn answer(request: &[u8], out: &mut [u8]) -> usize {
    for (o, r) in out.iter_mut().zip(request.iter().rev()) {
        *o = *r;
    }
    request.len()
}

/// Serves requests on `b` until `requests` have been completed: optionally sends
/// `unsolicited` packets before each completion. Measured after `WARM_UP` requests.
fn server(b: &InProcessChannel, requests: usize, unsolicited: usize) -> u64 {
    let max = max_payload(b);
    let mut buf = vec![0u8; max];
    let mut out = vec![0u8; max];
    let extra = pattern(max);
    let mut serve = |i: usize| {
        let r = b.recv(&mut buf, soon()).expect("server recv");
        assert!(r.completion_requested, "request {i}");
        for k in 0..unsolicited {
            let len = if i == 0 { max } else { len_for(i + k, max) };
            b.send(&extra[..len], soon()).expect("unsolicited send");
        }
        let n = answer(r.payload(&buf), &mut out);
        b.complete(r.transaction_id, &out[..n], soon())
            .expect("complete");
    };
    for i in 0..WARM_UP {
        serve(i);
    }
    measure(|| {
        for i in WARM_UP..requests {
            serve(i);
        }
    })
    .1
}

/// Calls `requests` times on `a`, measured after `WARM_UP` calls.
fn caller(a: &InProcessChannel, requests: usize) -> u64 {
    let max = max_payload(a);
    let payload = pattern(max);
    let mut response = vec![0u8; max];
    let mut expect = vec![0u8; max];
    let call = |i: usize, response: &mut [u8], expect: &mut [u8]| {
        let len = len_for(i, max);
        let padded = len.div_ceil(8) * 8;
        let got = a.call(&payload[..len], response, soon()).expect("call");
        assert_eq!(got, padded, "call {i}");
        // The server reversed the request as received: padded with zeros to 8 bytes.
        for (j, e) in expect[..padded].iter_mut().enumerate() {
            *e = payload
                .get(padded - 1 - j)
                .filter(|_| padded - 1 - j < len)
                .copied()
                .unwrap_or(0);
        }
        assert!(response[..padded] == expect[..padded], "call {i}");
    };
    for i in 0..WARM_UP {
        call(i, &mut response, &mut expect);
    }
    measure(|| {
        for i in WARM_UP..requests {
            call(i, &mut response, &mut expect);
        }
    })
    .1
}

#[test]
fn calls_allocate_nothing() {
    init();
    const REQUESTS: usize = WARM_UP + 20_000;
    let (a, b) = in_process_channel_pair(4096, Config::default()).expect("pair");
    let (a, b) = (&a, &b);
    let (caller, server) = thread::scope(|s| {
        let server = s.spawn(move || server(b, REQUESTS, 0));
        let caller = s.spawn(move || caller(a, REQUESTS));
        (
            caller.join().expect("caller"),
            server.join().expect("server"),
        )
    });
    assert_eq!(a.counters().late_completions, 0);
    assert_no_allocations("call", &[("caller", caller), ("server", server)]);
}

#[test]
fn calls_with_queued_packets_allocate_nothing() {
    init();
    const REQUESTS: usize = WARM_UP + 5_000;
    const UNSOLICITED: usize = 3;
    let config = Config::default();
    let depth = config.queue_depth;
    let (a, b) = in_process_channel_pair(4096, config).expect("pair");
    let max = max_payload(&a);
    let (a, b) = (&a, &b);
    let (caller, server, receiver) = thread::scope(|s| {
        // Warm-up, deterministic: while the caller waits for its completion, it queues
        // `depth` packets of the largest size (the queue is then full), which the test then
        // drains; the queue has allocated its one buffer by then.
        let fill = s.spawn(move || {
            let mut buf = vec![0u8; max];
            let r = b.recv(&mut buf, soon()).expect("request");
            let extra = pattern(max);
            for _ in 0..depth {
                b.send(&extra, soon()).expect("unsolicited");
            }
            b.complete(r.transaction_id, b"", soon()).expect("complete");
        });
        let pending = s.spawn(move || {
            let mut response = [0u8; 8];
            a.call(b"fill", &mut response, soon()).expect("call")
        });
        while a.counters().packets_received < depth as u64 {
            thread::sleep(Duration::from_millis(1));
        }
        let mut buf = vec![0u8; max];
        for _ in 0..depth {
            let r = a.recv(&mut buf, soon()).expect("drain");
            assert_eq!(r.payload_len, max.div_ceil(8) * 8);
        }
        fill.join().expect("fill");
        assert_eq!(pending.join().expect("call"), 0);

        let server = s.spawn(move || server(b, REQUESTS, UNSOLICITED));
        let receiver = s.spawn(move || {
            let mut buf = vec![0u8; max];
            let expect = pattern(max);
            let take = |buf: &mut [u8]| {
                let r = a.recv(buf, soon()).expect("receiver");
                assert!(!r.completion_requested);
                // The last 8 bytes may hold padding.
                let sure = r.payload_len.saturating_sub(8);
                assert!(buf[..sure] == expect[..sure]);
            };
            for _ in 0..WARM_UP * UNSOLICITED {
                take(&mut buf);
            }
            measure(|| {
                for _ in 0..(REQUESTS - WARM_UP) * UNSOLICITED {
                    take(&mut buf);
                }
            })
            .1
        });
        let caller = s.spawn(move || caller(a, REQUESTS));
        (
            caller.join().expect("caller"),
            server.join().expect("server"),
            receiver.join().expect("receiver"),
        )
    });
    eprintln!(
        "call with queued packets: A received {} packets, receive sleeps {}",
        a.counters().packets_received,
        a.counters().receive_sleeps
    );
    assert_no_allocations(
        "call with queued unsolicited packets",
        &[
            ("caller", caller),
            ("server", server),
            ("receiver", receiver),
        ],
    );
}
