//! Eventfd doorbells: the doorbell itself, the conformance suite over eventfd-signalled
//! channels (a `UnixStream` pair as the hang-up fds), and the tokio adapter carrying calls
//! and streams.
#![cfg(target_os = "linux")]

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tokio::time::{sleep, timeout};
use vmlink_channel::Polled;
use vmlink_channel::Wait;
use vmlink_channel::conformance::{End, RingEnd, Threads, run_all};
use vmlink_channel::{
    Channel, ChannelError, ChannelState, Config, Doorbell, DoorbellError, EventFdDoorbell,
    TokioDoorbell, Wake,
};
use vmlink_ring::{ControlWord, HeapMem, RingMem};

/// Two connected ends, each also watching one end of a Unix socket pair: dropping an end
/// closes its socket, which the other end sees as a hang-up.
fn bell_pair() -> (EventFdDoorbell, EventFdDoorbell) {
    let (a, b) = EventFdDoorbell::pair().expect("eventfds");
    let (sa, sb) = UnixStream::pair().expect("socket pair");
    (
        a.with_hangup(OwnedFd::from(sa)),
        b.with_hangup(OwnedFd::from(sb)),
    )
}

const SHORT: Option<Duration> = Some(Duration::from_millis(5));

#[test]
fn rings_are_sticky_consumed_and_one_way() {
    let (a, b) = bell_pair();
    a.signal().expect("signal");
    a.signal().expect("signal");
    assert_eq!(b.wait(Some(Duration::ZERO)), Ok(Wake::Signalled));
    assert_eq!(b.wait(SHORT), Ok(Wake::TimedOut), "one wait consumes all");
    assert_eq!(a.wait(SHORT), Ok(Wake::TimedOut), "rings go one way");
    assert!(!a.peer_closed() && !b.peer_closed());
}

#[test]
fn a_wait_times_out_no_earlier_than_asked() {
    let (_a, b) = bell_pair();
    let t0 = Instant::now();
    assert_eq!(b.wait(Some(Duration::from_millis(30))), Ok(Wake::TimedOut));
    assert!(t0.elapsed() >= Duration::from_millis(30));
}

#[test]
fn a_saturated_counter_still_signals() {
    let (a, b) = bell_pair();
    // Push the peer's counter to its maximum, so a further add would block (EAGAIN).
    let mut peer_bell = File::from(a.signal_fd().try_clone_to_owned().expect("dup"));
    peer_bell
        .write_all(&(u64::MAX - 1).to_ne_bytes())
        .expect("saturate");
    assert_eq!(a.signal(), Ok(()), "a saturated counter is rung already");
    assert_eq!(b.wait(None), Ok(Wake::Signalled));
    assert_eq!(b.wait(Some(Duration::ZERO)), Ok(Wake::TimedOut));
}

#[test]
fn a_ring_before_the_hang_up_comes_first() {
    let (a, b) = bell_pair();
    a.signal().expect("signal");
    drop(a);
    assert!(b.peer_closed());
    assert_eq!(b.wait(None), Ok(Wake::Signalled));
    assert_eq!(b.wait(None), Err(DoorbellError::PeerClosed));
    assert_eq!(b.wait(Some(Duration::ZERO)), Err(DoorbellError::PeerClosed));
}

#[test]
fn a_blocked_wait_sees_the_hang_up() {
    let (a, b) = bell_pair();
    let t = thread::spawn(move || (b.wait(None), b.wait(None)));
    thread::sleep(Duration::from_millis(20));
    a.signal().expect("signal");
    thread::sleep(Duration::from_millis(20));
    drop(a);
    let (first, second) = t.join().expect("waiter");
    assert_eq!(first, Ok(Wake::Signalled));
    assert_eq!(second, Err(DoorbellError::PeerClosed));
}

#[test]
fn data_on_the_hang_up_socket_is_not_a_hang_up() {
    let (a, b) = bell_pair();
    let mut to_a = UnixStream::from(
        b.hangup_fd()
            .expect("hang-up fd")
            .try_clone_to_owned()
            .expect("dup"),
    );
    to_a.write_all(b"not a hang-up").expect("write");
    drop(to_a);
    assert!(!a.peer_closed());
    assert_eq!(a.wait(SHORT), Ok(Wake::TimedOut));
    drop(b);
    assert!(a.peer_closed());
}

#[test]
fn ends_built_from_received_fds() {
    let (a, b) = EventFdDoorbell::pair().expect("eventfds");
    // As if `b`'s fds had come over a socket: a new end from copies, the old one gone.
    let c = EventFdDoorbell::from_fds(
        b.wait_fd().try_clone_to_owned().expect("dup"),
        b.signal_fd().try_clone_to_owned().expect("dup"),
    );
    drop(b);
    a.signal().expect("signal");
    assert_eq!(c.wait(SHORT), Ok(Wake::Signalled));
    c.signal().expect("signal");
    assert_eq!(a.wait(SHORT), Ok(Wake::Signalled));
    assert!(
        !a.peer_closed(),
        "without a hang-up fd the peer is never seen gone"
    );
}

// ---- the conformance suite -------------------------------------------------------------

fn rings(len: usize) -> (Arc<HeapMem>, Arc<HeapMem>) {
    (
        Arc::new(HeapMem::new(len).expect("ring")),
        Arc::new(HeapMem::new(len).expect("ring")),
    )
}

type Ends<D> = (RingEnd<Arc<HeapMem>, D>, RingEnd<Arc<HeapMem>, D>);

/// Two connected channel ends over heap rings with the given doorbell ends.
fn ends<D: Doorbell>(len: usize, ca: Config, cb: Config, (da, db): (D, D)) -> Ends<D> {
    let (a_to_b, b_to_a) = rings(len);
    let a = Channel::new(a_to_b.clone(), b_to_a.clone(), da, ca).expect("a");
    let b = Channel::new(b_to_a.clone(), a_to_b.clone(), db, cb).expect("b");
    (
        End::ring(
            a,
            Box::new(move || a_to_b.store_control(ControlWord::WriteIndex, 13)),
        ),
        End::ring(
            b,
            Box::new(move || b_to_a.store_control(ControlWord::WriteIndex, 13)),
        ),
    )
}

/// A peer that left unnoticed: a `recv` (`Wait::Now`) that finds the ring empty asks the doorbell and
/// says `Closed` at once (after what the peer committed); `send` (`Wait::Now`) lands packets in the
/// ring nobody reads until it is full, then says `Closed`, never `Full`.
#[test]
fn try_calls_notice_a_departed_peer() {
    let (a, b) = ends(4096, Config::default(), Config::default(), bell_pair());
    let (a, b) = (a.channel, b.channel);
    b.send(b"last words", Wait::Now)
        .expect("b sends before leaving");
    drop(b);
    let mut buf = [0u8; 64];
    let r = a
        .recv(&mut buf, Wait::Now)
        .polled()
        .expect("committed data first")
        .expect("a packet");
    assert_eq!(&r.payload(&buf)[..10], b"last words");
    assert_eq!(
        a.recv(&mut buf, Wait::Now).polled(),
        Err(ChannelError::Closed)
    );
    assert_eq!(a.state(), ChannelState::PeerClosed);
    assert_eq!(a.send(b"x", Wait::Now), Err(ChannelError::Closed));

    let (a, b) = ends(4096, Config::default(), Config::default(), bell_pair());
    let (a, b) = (a.channel, b.channel);
    drop(b);
    let mut sent = 0;
    let end = loop {
        match a.send(&[7; 256], Wait::Now) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 4096 / 256, "the ring should be full by now");
    };
    assert_eq!(end, ChannelError::Closed);
    assert!(sent > 0, "sends before the ring fills are not refused");
    assert_eq!(a.send(b"x", None), Err(ChannelError::Closed));
}

#[test]
fn eventfd_pair_conforms() {
    run_all(&Threads::new(|len, ca, cb| ends(len, ca, cb, bell_pair())));
}

/// The tokio adapter's blocking half passes the suite too (ends made inside a runtime,
/// used from plain threads).
#[test]
fn tokio_doorbell_blocking_waits_conform() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    run_all(&Threads::new(|len, ca, cb| {
        let _runtime = runtime.enter();
        ends(len, ca, cb, tokio_bells())
    }));
}

// ---- tokio -----------------------------------------------------------------------------

type TokioChannel = Channel<Arc<HeapMem>, TokioDoorbell>;

fn tokio_bells() -> (TokioDoorbell, TokioDoorbell) {
    let (a, b) = bell_pair();
    (
        TokioDoorbell::new(a).expect("register"),
        TokioDoorbell::new(b).expect("register"),
    )
}

/// Two channels signalled through eventfds on tokio's reactor.
fn tokio_pair(len: usize) -> (Arc<TokioChannel>, Arc<TokioChannel>) {
    async_pair(len, tokio_bells())
}

type AsyncChannel<D> = Channel<Arc<HeapMem>, D>;

/// Two channels over heap rings with the given doorbell ends.
fn async_pair<D: Doorbell>(
    len: usize,
    (da, db): (D, D),
) -> (Arc<AsyncChannel<D>>, Arc<AsyncChannel<D>>) {
    let (a_to_b, b_to_a) = rings(len);
    let a = Channel::new(a_to_b.clone(), b_to_a.clone(), da, Config::default()).expect("a");
    let b = Channel::new(b_to_a, a_to_b, db, Config::default()).expect("b");
    (Arc::new(a), Arc::new(b))
}

async fn bounded<F: std::future::Future>(body: F) -> F::Output {
    timeout(Duration::from_secs(60), body)
        .await
        .expect("watchdog: the test ran for over 60 s")
}

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

fn stream_len(i: u64) -> usize {
    (i * 37 % 900) as usize
}

const CALLERS: u64 = 4;
const CALLS: u64 = 100;
const STREAM: u64 = 1500;

/// Callers and a stream from the host, a server on the guest, through 4096-byte rings,
/// every wait a future on tokio's reactor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_doorbell_carries_calls_and_a_stream() {
    let (host, guest) = tokio_pair(4096);
    carries_calls_and_a_stream(host, guest).await;
}

/// The same with plain `EventFdDoorbell` ends, which register with the reactor on their
/// first async wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventfd_doorbell_is_async_under_tokio() {
    let (host, guest) = async_pair(4096, bell_pair());
    carries_calls_and_a_stream(host, guest).await;
}

/// An async wait outside any tokio runtime is an error, not a hang or a panic.
#[test]
fn eventfd_async_wait_outside_tokio_is_an_error() {
    use std::task::{Context, Poll, Waker};
    use vmlink_channel::AsyncDoorbell;
    let (a, _b) = bell_pair();
    let mut cx = Context::from_waker(Waker::noop());
    assert_eq!(
        a.poll_wait(&mut cx),
        Poll::Ready(Err(DoorbellError::Os(libc_enotsup())))
    );
}

/// `ENOTSUP` on Linux.
fn libc_enotsup() -> i32 {
    95
}

async fn carries_calls_and_a_stream<D>(host: Arc<AsyncChannel<D>>, guest: Arc<AsyncChannel<D>>)
where
    D: vmlink_channel::AsyncDoorbell + Send + Sync + 'static,
{
    bounded(async {
        let server = tokio::spawn({
            let guest = guest.clone();
            async move {
                let mut buf = vec![0u8; 4096];
                let (mut answered, mut next) = (0, 0);
                while answered < CALLERS * CALLS || next < STREAM {
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
                        let len = stream_len(next);
                        let payload = r.payload(&buf);
                        assert_eq!(payload.len(), len.div_ceil(8) * 8, "packet {next}");
                        assert_eq!(payload[..len], pattern(next, len)[..], "packet {next}");
                        assert!(payload[len..].iter().all(|b| *b == 0), "packet {next}");
                        next += 1;
                        if next % 100 == 0 {
                            sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
            }
        });
        let streamer = tokio::spawn({
            let host = host.clone();
            async move {
                for i in 0..STREAM {
                    host.send_async(&pattern(i, stream_len(i)))
                        .await
                        .expect("send");
                }
            }
        });
        let callers: Vec<_> = (0..CALLERS)
            .map(|t| {
                let host = host.clone();
                tokio::spawn(async move {
                    let mut response = vec![0u8; 1024];
                    for i in 0..CALLS {
                        let request = pattern(1_000_000 + t * 1000 + i, 8 + (i as usize % 50) * 8);
                        let len = host
                            .call_async(&request, &mut response)
                            .await
                            .expect("call");
                        let mut expect = request.clone();
                        expect.reverse();
                        assert_eq!(response[..len], expect[..], "caller {t} call {i}");
                    }
                })
            })
            .collect();
        for c in callers {
            c.await.expect("caller");
        }
        streamer.await.expect("streamer");
        server.await.expect("server");
        assert_eq!(host.transactions_in_flight(), 0);
        assert!(host.counters().send_waits > 0, "the host waited for space");
        assert!(host.counters().signals_received > 0);
    })
    .await;
}

/// A `recv_async` cancelled on the reactor loses nothing, and a peer that leaves (its
/// socket closed with its doorbell) ends a waiting receive with `Closed`.
#[tokio::test]
async fn tokio_doorbell_cancels_and_sees_the_peer_leave() {
    bounded(async {
        let (host, guest) = tokio_pair(4096);
        let mut buf = [0u8; 64];
        assert!(
            timeout(Duration::from_millis(20), host.recv_async(&mut buf))
                .await
                .is_err()
        );
        guest.send_async(b"late").await.expect("send");
        let r = host.recv_async(&mut buf).await.expect("recv");
        assert_eq!(&r.payload(&buf)[..4], b"late");

        let t0 = Instant::now();
        let dropper = tokio::spawn(async move {
            sleep(Duration::from_millis(30)).await;
            guest.send_async(b"bye").await.expect("send");
            drop(guest);
        });
        let r = host
            .recv_async(&mut buf)
            .await
            .expect("sent before leaving");
        assert_eq!(&r.payload(&buf)[..3], b"bye");
        assert_eq!(host.recv_async(&mut buf).await, Err(ChannelError::Closed));
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_eq!(host.state(), ChannelState::PeerClosed);
        dropper.await.expect("dropper");
    })
    .await;
}
