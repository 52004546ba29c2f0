//! Saving an endpoint and restoring it in a successor: transactions, queued packets,
//! counters and state go on as if nothing had happened.

use std::time::{Duration, Instant};

use std::sync::Arc;
use vmlink_channel::{
    ChannelError, ChannelState, Config, Endpoint, FailureCause, PacketType, ProtocolError,
    SavedSlot, in_process_channel_pair,
};

use vmlink_channel::{Polled, RingRx, RingTx, Wait};
use vmlink_ring::{ControlWord, HeapMem, RingMem};

fn soon() -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(10))
}

fn later(ms: u64) -> Option<Instant> {
    Some(Instant::now() + Duration::from_millis(ms))
}

#[test]
fn a_restored_endpoint_goes_on_where_the_saved_one_stopped() {
    let (a, b) = in_process_channel_pair(4 * 4096, Config::default()).unwrap();
    // A polled request in flight, and a call that gives up while three packets for
    // receivers arrive and are queued.
    let polled = a.start_request(b"polled", Wait::Now).unwrap();
    for i in 0..3u8 {
        b.send(&[i; 8], Wait::Now).unwrap();
    }
    let mut response = [0u8; 64];
    assert_eq!(
        a.call(b"abandoned", &mut response, later(50)),
        Err(ChannelError::TimedOut)
    );
    let before = a.counters();

    let (saved, tx, rx, doorbell) = a.save();
    assert_eq!(saved.queued().len(), 3, "{saved:?}");
    let kinds = |want: SavedSlot| {
        saved
            .transactions()
            .iter()
            .filter(|(_, s)| *s == want)
            .count()
    };
    assert_eq!(
        (kinds(SavedSlot::Polled), kinds(SavedSlot::Abandoned)),
        (1, 1)
    );
    assert_eq!(saved.counters(), before);

    let a = Endpoint::restore(tx, rx, doorbell, Config::default(), &saved).unwrap();
    assert_eq!(a.transactions_in_flight(), 2);
    // The peer answers both requests.
    let mut buf = [0u8; 64];
    for _ in 0..2 {
        let r = b.recv(&mut buf, soon()).unwrap();
        b.complete(r.transaction_id, b"answer", soon()).unwrap();
    }
    // The queued packets first, in order; then the polled completion. The completion of
    // the abandoned call is discarded and counted, not an unknown transaction.
    for i in 0..3u8 {
        let r = a.recv(&mut buf, soon()).unwrap();
        assert_eq!(r.payload(&buf), &[i; 8]);
    }
    let c = a.recv(&mut buf, soon()).unwrap();
    assert_eq!(
        (c.packet_type, c.transaction_id),
        (PacketType::Completion, polled)
    );
    assert_eq!(a.recv(&mut buf, Wait::Now).polled().unwrap(), None);
    assert_eq!(a.counters().late_completions, before.late_completions + 1);
    assert_eq!(a.transactions_in_flight(), 0);
    assert_eq!(a.state(), ChannelState::Open);
    // New ids never repeat the old ones: a late completion for one of them stays late.
    let fresh = a.start_request(b"new", Wait::Now).unwrap();
    assert_ne!(fresh, polled);
    assert!(a.counters().packets_received >= before.packets_received + 2);
}

/// Saves a's end of a fresh pair after `before` ran, lets `edit` change a's rings as the
/// peer would have, restores, and returns how many signals the restore sent.
fn restore_signals(
    before: impl FnOnce(&vmlink_channel::InProcessChannel),
    edit: impl FnOnce(&mut RingTx<Arc<HeapMem>>, &mut RingRx<Arc<HeapMem>>),
) -> u64 {
    let (a, _b) = in_process_channel_pair(4096, Config::default()).unwrap();
    before(&a);
    let sent = a.counters().signals_sent;
    let (saved, mut tx, mut rx, doorbell) = a.save();
    edit(&mut tx, &mut rx);
    let a = Endpoint::restore(tx, rx, doorbell, Config::default(), &saved).unwrap();
    a.counters().signals_sent - sent
}

#[test]
fn restoring_signals_the_peer_only_where_the_rings_say_it_is_owed_one() {
    let unread = |a: &vmlink_channel::InProcessChannel| a.send(b"unread", Wait::Now).unwrap();
    // Nothing queued, nothing asked for: no signal.
    assert_eq!(restore_signals(|_| {}, |_, _| {}), 0);
    // Data the peer has not read, its interrupts unmasked: one.
    assert_eq!(restore_signals(unread, |_, _| {}), 1);
    // The same data with the peer polling (interrupts masked): none.
    let masked = |tx: &mut RingTx<Arc<HeapMem>>, _: &mut RingRx<Arc<HeapMem>>| {
        tx.writer()
            .mem()
            .store_control(ControlWord::InterruptMask, 1);
    };
    assert_eq!(restore_signals(unread, masked), 0);
    // The peer waits for 64 bytes of space and more is free: one.
    let asks = |bytes: u32| {
        move |_: &mut RingTx<Arc<HeapMem>>, rx: &mut RingRx<Arc<HeapMem>>| {
            rx.reader()
                .mem()
                .store_control(ControlWord::PendingSendSize, bytes);
        }
    };
    assert_eq!(restore_signals(|_| {}, asks(64)), 1);
    // It waits for more than the ring holds: none (it will be signalled when that is
    // free, or never, as without the restore).
    assert_eq!(restore_signals(|_| {}, asks(8192)), 0);
}

#[test]
fn a_failed_endpoint_stays_failed_across_a_restore() {
    let (a, b) = in_process_channel_pair(4096, Config::default()).unwrap();
    // A completion for an id nobody started fails the receiver.
    b.complete(0xdead, b"?", Wait::Now).unwrap();
    let mut buf = [0u8; 64];
    let err = a.recv(&mut buf, Wait::Now).polled().unwrap_err();
    let cause = FailureCause::Protocol(ProtocolError::UnknownTransaction {
        transaction_id: 0xdead,
    });
    assert_eq!(err, ChannelError::Failed(cause));
    let (saved, tx, rx, doorbell) = a.save();
    assert_eq!(saved.failure(), Some(cause));
    let a = Endpoint::restore(tx, rx, doorbell, Config::default(), &saved).unwrap();
    assert_eq!(a.state(), ChannelState::Failed(cause));
    assert_eq!(a.send(b"x", Wait::Now), Err(ChannelError::Failed(cause)));
}

#[test]
fn a_successor_with_a_smaller_queue_refuses_the_state() {
    let (a, b) = in_process_channel_pair(4 * 4096, Config::default()).unwrap();
    for i in 0..3u8 {
        b.send(&[i; 8], Wait::Now).unwrap();
    }
    let mut response = [0u8; 8];
    let _ = a.call(b"wait", &mut response, later(20));
    let (saved, tx, rx, doorbell) = a.save();
    assert_eq!(saved.queued().len(), 3);
    let small = Config::default().with_queue_depth(2);
    assert_eq!(
        Endpoint::restore(tx, rx, doorbell, small, &saved).err(),
        Some(ChannelError::BadSavedState {
            reason: "more queued packets than this endpoint's queue holds"
        })
    );
}
