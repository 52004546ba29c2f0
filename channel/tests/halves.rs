//! Split endpoints: a sender and a receiver on two threads, no lock between them, sharing
//! one doorbell, one state and one transaction table.

use std::thread;
use std::time::{Duration, Instant};

use vmlink_channel::Polled;
use vmlink_channel::Wait;
use vmlink_channel::{
    ChannelError, ChannelState, Config, InProcessChannel, PacketType, in_process_channel_pair,
};

fn soon() -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(20))
}

fn assert_send<T: Send>() {}

#[test]
fn halves_can_move_to_their_threads() {
    type Halves = (
        vmlink_channel::Sender<
            vmlink_channel::RingTx<std::sync::Arc<vmlink_ring::HeapMem>>,
            vmlink_channel::InProcessDoorbell,
        >,
        vmlink_channel::Receiver<
            vmlink_channel::RingRx<std::sync::Arc<vmlink_ring::HeapMem>>,
            vmlink_channel::InProcessDoorbell,
        >,
    );
    assert_send::<Halves>();
}

/// Both sides split, four threads: each side streams numbered packets to the other while
/// receiving the other's, through small rings, so every half keeps waiting for space or
/// data on the doorbell its other half shares. Every packet arrives, in order.
#[test]
fn four_halves_stream_both_ways_through_small_rings() {
    const N: u32 = 20_000;
    let (a, b) = in_process_channel_pair(4096, Config::default()).unwrap();
    let (mut a_tx, mut a_rx) = a.split();
    let (mut b_tx, mut b_rx) = b.split();
    thread::scope(|s| {
        s.spawn(move || {
            for i in 0..N {
                a_tx.send(&i.to_le_bytes(), soon()).unwrap();
            }
        });
        s.spawn(move || {
            for i in 0..N {
                b_tx.send(&(N + i).to_le_bytes(), soon()).unwrap();
            }
        });
        s.spawn(move || {
            let mut buf = [0u8; 8];
            for i in 0..N {
                let r = a_rx.recv(&mut buf, soon()).unwrap();
                assert_eq!(r.payload(&buf)[..4], (N + i).to_le_bytes());
            }
        });
        let mut buf = [0u8; 8];
        for i in 0..N {
            let r = b_rx.recv(&mut buf, soon()).unwrap();
            assert_eq!(r.payload(&buf)[..4], i.to_le_bytes());
        }
    });
}

/// A request started on a sender is completed through its receiver: the halves share the
/// transaction table.
#[test]
fn a_request_from_the_sender_completes_at_the_receiver() {
    let (a, b) = in_process_channel_pair(4096, Config::default()).unwrap();
    let (mut tx, mut rx) = a.split();
    let tid = tx.start_request(b"status?", Wait::Now).unwrap();
    assert_eq!(tx.transactions_in_flight(), 1);
    let mut buf = [0u8; 64];
    let request = b.recv(&mut buf, soon()).unwrap();
    b.complete(request.transaction_id, b"fine", soon()).unwrap();
    let completion = rx.recv(&mut buf, soon()).unwrap();
    assert_eq!(
        (completion.packet_type, completion.transaction_id),
        (PacketType::Completion, tid)
    );
    assert_eq!(tx.transactions_in_flight(), 0);
}

/// Queued packets and a failure are the endpoint's, whichever handle sees them.
#[test]
fn the_halves_share_the_state() {
    let (a, b): (InProcessChannel, InProcessChannel) =
        in_process_channel_pair(4096, Config::default()).unwrap();
    let (mut tx, mut rx) = a.split();
    drop(b);
    let mut buf = [0u8; 8];
    assert_eq!(
        rx.recv(&mut buf, Wait::Now).polled(),
        Err(ChannelError::Closed)
    );
    assert_eq!(
        tx.state(),
        ChannelState::PeerClosed,
        "the sender sees it too"
    );
    assert_eq!(tx.send(b"x", Wait::Now), Err(ChannelError::Closed));
}

/// A batch on a sender: one commit, one signal.
#[test]
fn a_sender_batches() {
    let (a, b) = in_process_channel_pair(4 * 4096, Config::default()).unwrap();
    let (mut tx, _rx) = a.split();
    let mut batch = tx.batch().unwrap();
    for i in 0..10u8 {
        batch.push_in_band(&[i; 32]).unwrap();
    }
    batch.commit().unwrap();
    assert_eq!(tx.counters().signals_sent, 1);
    let mut n = 0;
    b.recv_batch(64, Wait::Now, |p| {
        let mut first = [0u8; 1];
        p.read_payload(0, &mut first).unwrap();
        assert_eq!(first[0], n);
        n += 1;
    })
    .unwrap();
    assert_eq!(n, 10);
}
