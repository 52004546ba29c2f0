//! `Watch`: another thread reads an endpoint's state, counters and calls in flight while it
//! runs, and learns when it is gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use vmlink_channel::{ChannelError, ChannelState, Config, Wait, in_process_channel_pair};

#[test]
fn a_watch_sees_calls_in_flight_and_the_peer_leaving() {
    let (a, b) = in_process_channel_pair(4096, Config::default()).unwrap();
    let watch = a.watch();
    let before = watch.sample().unwrap();
    assert_eq!(before.transactions_in_flight, 0);
    assert_eq!(before.counters.packets_sent, 0);

    let tids: Vec<u64> = (0..3)
        .map(|i| a.start_request(&[i; 8], Wait::Now).unwrap())
        .collect();
    let s = watch.sample().unwrap();
    assert_eq!(s.transactions_in_flight, 3);
    assert_eq!(s.counters.packets_sent, 3);

    let mut buf = [0u8; 64];
    let request = b.recv(&mut buf, Wait::Now).unwrap();
    b.complete(request.transaction_id, b"done", Wait::Now)
        .unwrap();
    let got = a.recv(&mut buf, Wait::Now).unwrap();
    assert_eq!(got.transaction_id, tids[0]);
    let s = watch.sample().unwrap();
    assert_eq!(s.transactions_in_flight, 2, "one call completed");
    assert_eq!(s.counters.packets_received, 1);

    drop(b);
    assert_eq!(a.recv(&mut buf, Wait::Now), Err(ChannelError::Closed));
    assert_eq!(watch.sample().unwrap().state, ChannelState::PeerClosed);
    drop(a);
    assert!(!watch.is_alive());
    assert_eq!(watch.sample(), None);
}

#[test]
fn a_watch_follows_split_halves_until_both_are_gone() {
    let (a, b) = in_process_channel_pair(4096, Config::default()).unwrap();
    let watch = a.watch();
    let (mut tx, rx) = a.split();
    assert_eq!(tx.watch().sample(), watch.sample());
    tx.send(b"x", Wait::Now).unwrap();
    assert_eq!(watch.sample().unwrap().counters.packets_sent, 1);
    drop(tx);
    assert!(watch.is_alive(), "the receiver still holds the endpoint");
    drop(rx);
    assert_eq!(watch.sample(), None);
    drop(b);
}

#[test]
fn sampling_from_another_thread_during_a_stream_sees_counts_only_grow_to_the_total() {
    const N: u64 = 20_000;
    let (a, b) = in_process_channel_pair(16 * 4096, Config::default()).unwrap();
    let watch = a.watch();
    let done = Arc::new(AtomicBool::new(false));
    let monitor = {
        let done = Arc::clone(&done);
        thread::spawn(move || {
            let mut last = 0;
            let mut samples = 0u64;
            while !done.load(Ordering::Acquire) {
                let s = watch.sample().unwrap();
                assert!(s.counters.packets_sent >= last, "counts never go back");
                assert!(s.counters.packets_sent <= N);
                last = s.counters.packets_sent;
                samples += 1;
            }
            (watch, samples)
        })
    };
    let (mut tx, _) = a.split();
    let receiver = thread::spawn(move || {
        let mut buf = [0u8; 16];
        for i in 0..N {
            let got = b.recv(&mut buf, None).unwrap();
            assert_eq!(got.payload(&buf)[..8], i.to_le_bytes());
        }
    });
    for i in 0..N {
        tx.send(&i.to_le_bytes(), None).unwrap();
    }
    receiver.join().unwrap();
    done.store(true, Ordering::Release);
    let (watch, samples) = monitor.join().unwrap();
    assert!(samples > 0);
    let s = watch.sample().unwrap();
    assert_eq!(s.counters.packets_sent, N);
    // Each packet: a 16-byte descriptor and 8 payload bytes.
    assert_eq!(s.counters.bytes_sent, N * 24);
}
