//! The conformance suite on the in-process pair: heap rings, the in-process doorbell, side
//! B of every check on its own thread.

use std::sync::Arc;

use vmlink_channel::Polled;
use vmlink_channel::Wait;
use vmlink_channel::conformance::{End, RingEnd, Threads, run_all};
use vmlink_channel::{Channel, Config, InProcessDoorbell, in_process_pair};
use vmlink_ring::{ControlWord, HeapMem, RingMem};

fn pair(
    len: usize,
    ca: Config,
    cb: Config,
) -> (
    RingEnd<Arc<HeapMem>, InProcessDoorbell>,
    RingEnd<Arc<HeapMem>, InProcessDoorbell>,
) {
    let a_to_b = Arc::new(HeapMem::new(len).expect("ring"));
    let b_to_a = Arc::new(HeapMem::new(len).expect("ring"));
    let (da, db) = in_process_pair();
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

#[test]
fn in_process_pair_conforms() {
    run_all(&Threads::new(pair));
}

/// A failed channel reports its cause first, even with every transaction id in use.
#[test]
fn a_failed_channel_reports_its_cause_before_running_out_of_ids() {
    use vmlink_channel::{ChannelError, MAX_TRANSACTIONS, in_process_channel_pair};
    let (a, b) = in_process_channel_pair(16 * 4096, Config::default()).expect("pair");
    for _ in 0..MAX_TRANSACTIONS {
        a.start_request(b"r", Wait::Now).expect("start");
    }
    b.complete(0xdead, b"", Wait::Now)
        .expect("a completion for an id never issued");
    let mut buf = [0u8; 64];
    let e = a
        .recv(&mut buf, Wait::Now)
        .polled()
        .expect_err("the bogus completion fails the channel");
    assert!(matches!(e, ChannelError::Failed(_)), "{e:?}");
    assert_eq!(a.start_request(b"r", Wait::Now), Err(e));
    assert_eq!(a.call(b"r", &mut buf, None), Err(e));
}
