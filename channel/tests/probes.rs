//! Operations that cannot wait ask the doorbell whether the peer left (for the shm
//! transport a `poll` system call) only on the first empty or full look after progress and
//! every 64th after that, and still report `Closed` within 64 looks of a departure.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use vmlink_channel::{
    Channel, ChannelError, Config, Doorbell, DoorbellError, InProcessDoorbell, Wait, Wake,
    in_process_pair,
};
use vmlink_ring::HeapMem;

/// An in-process doorbell that counts the questions about the peer.
struct Counting {
    inner: InProcessDoorbell,
    asked: Arc<AtomicU64>,
}

impl Doorbell for Counting {
    fn signal(&self) -> Result<(), DoorbellError> {
        self.inner.signal()
    }
    fn wait(&self, timeout: Option<Duration>) -> Result<Wake, DoorbellError> {
        self.inner.wait(timeout)
    }
    fn wake_local(&self) -> Result<(), DoorbellError> {
        self.inner.wake_local()
    }
    fn peer_closed(&self) -> bool {
        self.asked.fetch_add(1, Ordering::Relaxed);
        self.inner.peer_closed()
    }
}

type Counted = Channel<Arc<HeapMem>, Counting>;

/// A pair over 4 KiB rings; the counter of `a`'s questions.
fn pair() -> (Counted, Counted, Arc<AtomicU64>) {
    let a_to_b = Arc::new(HeapMem::new(4096).expect("ring"));
    let b_to_a = Arc::new(HeapMem::new(4096).expect("ring"));
    let (da, db) = in_process_pair();
    let asked = Arc::new(AtomicU64::new(0));
    let wrap = |inner, asked: &Arc<AtomicU64>| Counting {
        inner,
        asked: Arc::clone(asked),
    };
    let config = Config::default().sleep_at_once();
    let a = Channel::new(
        Arc::clone(&a_to_b),
        Arc::clone(&b_to_a),
        wrap(da, &asked),
        config,
    )
    .expect("channel");
    let b = Channel::new(
        b_to_a,
        a_to_b,
        wrap(db, &Arc::new(AtomicU64::new(0))),
        config,
    )
    .expect("channel");
    (a, b, asked)
}

#[test]
fn a_polling_receiver_asks_the_doorbell_rarely() {
    let (a, b, asked) = pair();
    let mut buf = [0u8; 64];
    for _ in 0..640 {
        assert_eq!(a.recv(&mut buf, Wait::Now), Err(ChannelError::Empty));
    }
    assert_eq!(
        asked.load(Ordering::Relaxed),
        10,
        "the first look, then every 64th"
    );
    // A packet resets the count: the next empty look asks at once.
    b.send(b"data", Wait::Now).expect("send");
    a.recv(&mut buf, Wait::Now).expect("the packet");
    assert_eq!(a.recv(&mut buf, Wait::Now), Err(ChannelError::Empty));
    assert_eq!(asked.load(Ordering::Relaxed), 11);
    // The peer leaves: within 64 empty looks the receiver says so.
    drop(b);
    let looks = (1..=64)
        .find(|_| a.recv(&mut buf, Wait::Now) == Err(ChannelError::Closed))
        .expect("Closed within 64 looks");
    assert!(looks <= 64);
    // The same for batch receives.
    let (a, b, asked) = pair();
    for _ in 0..128 {
        assert_eq!(a.recv_batch(8, Wait::Now, |_| ()), Ok(0));
    }
    assert_eq!(asked.load(Ordering::Relaxed), 2);
    drop(b);
    assert!(
        (1..=64).any(|_| a.recv_batch(8, Wait::Now, |_| ()) == Err(ChannelError::Closed)),
        "Closed within 64 looks"
    );
}

#[test]
fn a_sender_that_finds_the_ring_full_asks_the_doorbell_rarely() {
    let (a, b, asked) = pair();
    let payload = [1u8; 1000];
    while a.send(&payload, Wait::Now).is_ok() {}
    assert_eq!(
        asked.load(Ordering::Relaxed),
        1,
        "the first full look asked"
    );
    for _ in 0..127 {
        assert_eq!(a.send(&payload, Wait::Now), Err(ChannelError::Full));
    }
    assert_eq!(asked.load(Ordering::Relaxed), 2, "and the 64th");
    // Room again: the next full look after a send asks at once.
    let mut buf = [0u8; 1000];
    b.recv(&mut buf, Wait::Now).expect("a packet");
    a.send(&payload, Wait::Now).expect("room for one");
    assert_eq!(a.send(&payload, Wait::Now), Err(ChannelError::Full));
    assert_eq!(asked.load(Ordering::Relaxed), 3);
    drop(b);
    assert!(
        (1..=64).any(|_| a.send(&payload, Wait::Now) == Err(ChannelError::Closed)),
        "Closed within 64 looks"
    );
}
