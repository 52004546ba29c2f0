//! Async waits on the in-process pair: under tokio (many callers, streams through a tiny
//! ring, cancellation, late completions, a departing peer), and on a minimal executor
//! written here, to show the futures need no runtime.

use std::future::Future;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tokio::time::{sleep, timeout};
use vmlink_channel::Polled;
use vmlink_channel::Wait;
use vmlink_channel::{
    ChannelError, ChannelState, Config, InProcessChannel, in_process_channel_pair,
};

/// The smallest ring: one page of data, so a few packets fill it and senders wait.
const TINY: usize = 4096;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Length of stream packet `i`: 0 to 899 bytes, so padding and wrap-around both happen.
fn stream_len(i: u64) -> usize {
    (i * 37 % 900) as usize
}

/// Checks stream packet `i` in `buf` (`payload` as received): bytes, then zero padding.
fn check_stream_packet(i: u64, payload: &[u8]) {
    let len = stream_len(i);
    assert_eq!(payload.len(), len.div_ceil(8) * 8, "packet {i} length");
    assert_eq!(payload[..len], pattern(i, len)[..], "packet {i} bytes");
    assert!(payload[len..].iter().all(|b| *b == 0), "packet {i} padding");
}

/// Every tokio test's body runs under this: a hang is a failure, not a stuck CI job.
async fn bounded<F: Future>(body: F) -> F::Output {
    // A timer alone cannot catch tasks that spin without yielding (the runtime's workers
    // never get back to the timer), so a plain thread stands guard too.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let guard = done.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(90));
        if !guard.load(std::sync::atomic::Ordering::Acquire) {
            eprintln!("watchdog: an async test ran for over 90 s; aborting");
            std::process::abort();
        }
    });
    let out = timeout(Duration::from_secs(60), body)
        .await
        .expect("watchdog: the test ran for over 60 s");
    done.store(true, std::sync::atomic::Ordering::Release);
    out
}

fn tiny_pair() -> (Arc<InProcessChannel>, Arc<InProcessChannel>) {
    let (a, b) = in_process_channel_pair(TINY, Config::default()).expect("pair");
    (Arc::new(a), Arc::new(b))
}

// ---- tokio ---------------------------------------------------------------------------

const CALLERS: u64 = 8;
const CALLS: u64 = 100;
const STREAM: u64 = 1500;

/// Answers every request with its payload reversed and checks the peer's stream, until
/// both are complete. Pauses now and then so the peer's sends find the ring full.
async fn serve_and_check(ch: Arc<InProcessChannel>, requests: u64, stream: u64) {
    let mut buf = vec![0u8; 4096];
    let (mut answered, mut next) = (0, 0);
    while answered < requests || next < stream {
        let r = ch.recv_async(&mut buf).await.expect("server receives");
        if r.completion_requested {
            let mut answer = r.payload(&buf).to_vec();
            answer.reverse();
            ch.complete_async(r.transaction_id, &answer)
                .await
                .expect("server completes");
            answered += 1;
        } else {
            check_stream_packet(next, r.payload(&buf));
            next += 1;
            if next % 100 == 0 {
                sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

async fn send_stream(ch: Arc<InProcessChannel>, count: u64) {
    for i in 0..count {
        ch.send_async(&pattern(i, stream_len(i)))
            .await
            .expect("stream send");
    }
}

async fn receive_stream(ch: Arc<InProcessChannel>, count: u64) {
    let mut buf = vec![0u8; 4096];
    for i in 0..count {
        let r = ch.recv_async(&mut buf).await.expect("stream receive");
        assert!(!r.completion_requested);
        check_stream_packet(i, r.payload(&buf));
        if i % 100 == 99 {
            sleep(Duration::from_millis(1)).await;
        }
    }
}

async fn caller(ch: Arc<InProcessChannel>, t: u64) {
    let mut response = vec![0u8; 1024];
    for i in 0..CALLS {
        let request = pattern(1_000_000 + t * 1000 + i, 8 + (i as usize % 50) * 8);
        let len = ch.call_async(&request, &mut response).await.expect("call");
        let mut expect = request.clone();
        expect.reverse();
        assert_eq!(response[..len], expect[..], "caller {t} call {i}");
    }
}

/// Eight callers and a stream from the host, a server and a stream back from the guest,
/// all through 4096-byte rings: completions, requests and stream packets compete for
/// space both ways, and unsolicited packets queue up while calls wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_callers_and_streams_through_a_tiny_ring() {
    bounded(async {
        let (host, guest) = tiny_pair();
        let mut tasks = vec![
            tokio::spawn(serve_and_check(guest.clone(), CALLERS * CALLS, STREAM)),
            tokio::spawn(send_stream(host.clone(), STREAM)),
            tokio::spawn(send_stream(guest.clone(), STREAM)),
            tokio::spawn(receive_stream(host.clone(), STREAM)),
        ];
        tasks.extend((0..CALLERS).map(|t| tokio::spawn(caller(host.clone(), t))));
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(host.transactions_in_flight(), 0, "every id was freed");
        let (h, g) = (host.counters(), guest.counters());
        assert_eq!(h.packets_sent, CALLERS * CALLS + STREAM);
        assert_eq!(g.packets_received, h.packets_sent);
        assert_eq!(h.packets_received, g.packets_sent);
        assert_eq!(h.late_completions, 0);
        assert!(h.send_waits > 0, "the host's senders waited for space");
        assert!(g.send_waits > 0, "the guest's senders waited for space");
        assert_eq!(host.state(), ChannelState::Open);
    })
    .await;
}

/// A `recv_async` cancelled by a timeout takes nothing with it: a later receive gets the
/// packet, and another task that was waiting meanwhile is still woken. A cancelled
/// `send_async` leaves no half-written packet behind.
#[tokio::test]
async fn cancelled_waits_lose_nothing() {
    bounded(async {
        let (host, guest) = tiny_pair();
        let mut buf = [0u8; 64];
        assert!(
            timeout(Duration::from_millis(30), host.recv_async(&mut buf))
                .await
                .is_err(),
            "nothing to receive yet"
        );
        guest.send_async(b"first").await.expect("send");
        let r = host.recv_async(&mut buf).await.expect("a later receive");
        assert_eq!(&r.payload(&buf)[..5], b"first");

        // A waiter in another task, then a second waiter that is cancelled: the second
        // took over the doorbell's waker, and dropping it must hand the bell back.
        let waiter = tokio::spawn({
            let host = host.clone();
            async move {
                let mut buf = [0u8; 64];
                let r = host.recv_async(&mut buf).await.expect("waiter receives");
                buf[..r.len()].to_vec()
            }
        });
        sleep(Duration::from_millis(20)).await;
        let mut other = [0u8; 64];
        assert!(
            timeout(Duration::from_millis(20), host.recv_async(&mut other))
                .await
                .is_err()
        );
        guest.send_async(b"second").await.expect("send");
        let got = timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the remaining waiter is woken")
            .expect("waiter task");
        assert_eq!(&got[..6], b"second");

        // A send cancelled while it waits for space.
        let chunk = vec![7u8; 1000];
        let marker = vec![9u8; 1000];
        let mut queued = 0;
        while host.send(&chunk, Wait::Now).is_ok() {
            queued += 1;
        }
        assert!(
            timeout(Duration::from_millis(30), host.send_async(&marker))
                .await
                .is_err(),
            "the ring is full"
        );
        let mut big = vec![0u8; 2048];
        for _ in 0..queued {
            let r = guest.recv_async(&mut big).await.expect("drain");
            assert_eq!(r.payload(&big), &chunk[..]);
        }
        assert_eq!(
            guest.recv(&mut big, Wait::Now).polled().expect("recv"),
            None,
            "the cancelled send left nothing in the ring"
        );
        host.send_async(&marker).await.expect("send again");
        let r = guest.recv_async(&mut big).await.expect("recv");
        assert_eq!(r.payload(&big), &marker[..]);
    })
    .await;
}

/// A `call_async` dropped while it waits keeps its id reserved; the late completion is
/// discarded and counted when it arrives, the id freed, and the channel stays open.
#[tokio::test]
async fn a_dropped_call_discards_its_late_completion() {
    bounded(async {
        let (host, guest) = tiny_pair();
        let mut response = [0u8; 64];
        assert!(
            timeout(
                Duration::from_millis(30),
                host.call_async(b"slow", &mut response)
            )
            .await
            .is_err(),
            "nobody answers yet"
        );
        assert_eq!(host.transactions_in_flight(), 1, "the id stays reserved");

        let mut buf = [0u8; 64];
        let request = guest.recv_async(&mut buf).await.expect("request");
        assert!(request.completion_requested);
        assert_eq!(&request.payload(&buf)[..4], b"slow");
        guest
            .complete_async(request.transaction_id, b"too late")
            .await
            .expect("late completion");
        guest.send_async(b"after").await.expect("send");

        // The host's next receive passes the late completion on its way to "after".
        let r = host.recv_async(&mut buf).await.expect("recv");
        assert_eq!(&r.payload(&buf)[..5], b"after");
        assert_eq!(host.counters().late_completions, 1);
        assert_eq!(host.transactions_in_flight(), 0, "the id is free again");
        assert_eq!(host.state(), ChannelState::Open);

        // And calls work as before.
        let server = tokio::spawn({
            let guest = guest.clone();
            async move {
                let mut buf = [0u8; 64];
                let r = guest.recv_async(&mut buf).await.expect("request");
                guest
                    .complete_async(r.transaction_id, b"on time")
                    .await
                    .expect("complete");
            }
        });
        let len = host.call_async(b"fast", &mut response).await.expect("call");
        assert_eq!(&response[..len][..7], b"on time");
        server.await.expect("server");
    })
    .await;
}

/// A peer that leaves wakes a waiting `recv_async`, `call_async` and `send_async` with
/// `Closed`, promptly.
#[tokio::test]
async fn a_departing_peer_ends_every_wait() {
    bounded(async {
        let drop_later = |peer: Arc<InProcessChannel>| {
            tokio::spawn(async move {
                sleep(Duration::from_millis(30)).await;
                drop(peer);
            })
        };

        let (host, guest) = tiny_pair();
        let t0 = Instant::now();
        let dropper = drop_later(guest);
        let mut buf = [0u8; 64];
        assert_eq!(host.recv_async(&mut buf).await, Err(ChannelError::Closed));
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_eq!(host.state(), ChannelState::PeerClosed);
        dropper.await.expect("dropper");

        let (host, guest) = tiny_pair();
        let dropper = drop_later(guest);
        assert_eq!(
            host.call_async(b"anyone?", &mut buf).await,
            Err(ChannelError::Closed)
        );
        dropper.await.expect("dropper");

        let (host, guest) = tiny_pair();
        while host.send(&[1u8; 1000], Wait::Now).is_ok() {}
        let dropper = drop_later(guest);
        assert_eq!(
            host.send_async(&[2u8; 1000]).await,
            Err(ChannelError::Closed)
        );
        dropper.await.expect("dropper");
    })
    .await;
}

// ---- no runtime ----------------------------------------------------------------------

/// A complete executor: poll, park the thread until a waker unparks it, poll again.
mod mini {
    use std::future::Future;
    use std::pin::pin;
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};
    use std::thread::{self, Thread};

    struct Unpark(Thread);

    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }

    /// Runs `fut` to completion on this thread.
    pub fn block_on<F: Future>(fut: F) -> F::Output {
        let mut fut = pin!(fut);
        let waker = Waker::from(Arc::new(Unpark(thread::current())));
        let mut cx = Context::from_waker(&waker);
        loop {
            if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
                return out;
            }
            // Spurious unparks only cause an extra poll.
            thread::park();
        }
    }
}

/// Aborts the process if the test is still running after 60 s (a lost wake-up would
/// otherwise park forever); dropping it stops the watch.
struct Watchdog(#[allow(dead_code)] mpsc::Sender<()>);

fn watchdog(test: &'static str) -> Watchdog {
    let (tx, rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(60)) == Err(mpsc::RecvTimeoutError::Timeout) {
            eprintln!("watchdog: {test} ran for over 60 s");
            std::process::abort();
        }
    });
    Watchdog(tx)
}

/// Calls and a stream between two threads, each running its own `block_on`.
#[test]
fn calls_and_a_stream_on_a_minimal_executor() {
    let _watchdog = watchdog("calls_and_a_stream_on_a_minimal_executor");
    let (host, guest) = tiny_pair();
    const MINI_CALLS: u64 = 200;
    const MINI_STREAM: u64 = 2000;
    let server = thread::spawn({
        let guest = guest.clone();
        move || {
            mini::block_on(async {
                let mut buf = vec![0u8; 4096];
                let (mut answered, mut next) = (0, 0);
                while answered < MINI_CALLS || next < MINI_STREAM {
                    let r = guest.recv_async(&mut buf).await.expect("server receives");
                    if r.completion_requested {
                        let mut answer = r.payload(&buf).to_vec();
                        answer.reverse();
                        guest
                            .complete_async(r.transaction_id, &answer)
                            .await
                            .expect("complete");
                        answered += 1;
                    } else {
                        check_stream_packet(next, r.payload(&buf));
                        next += 1;
                        if next % 100 == 0 {
                            // Fall behind so the sender finds the ring full.
                            thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
            })
        }
    });
    mini::block_on(async {
        let mut response = vec![0u8; 1024];
        for i in 0..MINI_CALLS {
            let request = pattern(i, 8 + (i as usize % 100) * 8);
            let len = host
                .call_async(&request, &mut response)
                .await
                .expect("call");
            let mut expect = request.clone();
            expect.reverse();
            assert_eq!(response[..len], expect[..], "call {i}");
        }
        for i in 0..MINI_STREAM {
            host.send_async(&pattern(i, stream_len(i)))
                .await
                .expect("stream send");
        }
    });
    server.join().expect("server thread");
    assert_eq!(host.transactions_in_flight(), 0);
    assert!(
        host.counters().send_waits > 0,
        "the sender waited for space"
    );
}

/// On the minimal executor too, a peer that leaves ends a waiting receive with `Closed`.
#[test]
fn a_departing_peer_on_a_minimal_executor() {
    let _watchdog = watchdog("a_departing_peer_on_a_minimal_executor");
    let (host, guest) = in_process_channel_pair(TINY, Config::default()).expect("pair");
    let t0 = Instant::now();
    let dropper = thread::spawn(move || {
        thread::sleep(Duration::from_millis(30));
        drop(guest);
    });
    let mut buf = [0u8; 64];
    assert_eq!(
        mini::block_on(host.recv_async(&mut buf)),
        Err(ChannelError::Closed)
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    dropper.join().expect("dropper");
}

/// A `call_async` dropped while its request still waits for ring space never sent the
/// request, so nothing will ever complete it: its id must be freed, not kept for a late
/// completion. (Were it kept, 64 such drops would exhaust the channel's ids for good.)
#[tokio::test]
async fn a_call_dropped_before_its_request_went_out_frees_its_id() {
    bounded(async {
        let (host, guest) = tiny_pair();
        let chunk = vec![7u8; 1000];
        let mut queued = 0;
        while host.send(&chunk, Wait::Now).is_ok() {
            queued += 1;
        }
        let mut response = [0u8; 64];
        assert!(
            timeout(
                Duration::from_millis(30),
                host.call_async(&chunk, &mut response)
            )
            .await
            .is_err(),
            "the ring is full: the request cannot go out"
        );
        let mut buf = vec![0u8; 2048];
        for _ in 0..queued {
            let r = guest.recv_async(&mut buf).await.expect("drain");
            assert!(!r.completion_requested);
        }
        assert_eq!(
            guest.recv(&mut buf, Wait::Now).polled().expect("recv"),
            None,
            "no request was sent"
        );
        assert_eq!(
            host.transactions_in_flight(),
            0,
            "an id whose request never went out is free again"
        );
    })
    .await;
}
