//! A saved endpoint's byte form from a hostile predecessor (or a corrupted hand-over): the
//! input is the bytes as they are, decoded by `SavedEndpoint::from_bytes`.
//!
//! Asserted:
//! - the decoder never panics, and allocates no more than a small multiple of the input
//!   (no allocation sized by a count the input claims but does not carry);
//! - a refused input is a typed error with a message;
//! - an accepted state encodes to bytes that decode to the same state and encode again to
//!   the same bytes (the encoder's form is canonical); for input in the newest version
//!   those bytes are never longer than the input (postcard's decoder also takes integers
//!   in more bytes than they need, which changes nothing it decodes);
//! - restoring an accepted state into a fresh in-process endpoint either fits (then its
//!   queued packets come out of `recv` first, in order and intact, a failed state fails
//!   every call with the inherited kind, and the transactions in flight are the saved
//!   ones) or is refused with `BadSavedState`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmlink_channel::{
    ChannelError, Config, Endpoint, FailureCause, SAVED_STATE_VERSION, SavedEndpoint, SavedSlot,
    Wait, in_process_channel_pair,
};
use vmlink_fuzz::largest_alloc;

fuzz_target!(|data: &[u8]| {
    let (decoded, largest) = largest_alloc(|| SavedEndpoint::from_bytes(data));
    assert!(
        largest <= 64 * data.len() + 4096,
        "a {}-byte input made a {largest}-byte allocation",
        data.len()
    );
    let saved = match decoded {
        Ok(s) => s,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let again = saved.to_bytes();
    let back = SavedEndpoint::from_bytes(&again).expect("the encoder's own bytes");
    assert_eq!(back, saved);
    assert_eq!(back.to_bytes(), again, "the encoder's form is not canonical");
    if data[8..10] == SAVED_STATE_VERSION.to_le_bytes() {
        assert!(again.len() <= data.len(), "the encoder wrote more than it read");
    }

    let (fresh, peer) = in_process_channel_pair(4096, Config::default()).expect("pair");
    let (_, tx, rx, doorbell) = fresh.save();
    let ep = match Endpoint::restore(tx, rx, doorbell, Config::default(), &saved) {
        Ok(ep) => ep,
        Err(ChannelError::BadSavedState { .. }) => return,
        Err(e) => panic!("restore: {e}"),
    };
    let in_flight = saved
        .transactions()
        .iter()
        .filter(|(_, s)| *s != SavedSlot::Free)
        .count();
    assert_eq!(ep.transactions_in_flight(), in_flight);
    let mut buf = vec![0u8; 1 << 20];
    match saved.failure() {
        Some(cause) => {
            assert!(matches!(cause, FailureCause::Inherited(_)));
            assert_eq!(ep.recv(&mut buf, Wait::Now), Err(ChannelError::Failed(cause)));
        }
        None => {
            for (meta, bytes) in saved.queued() {
                let got = ep.recv(&mut buf, Wait::Now).expect("a queued packet");
                assert_eq!(got, *meta);
                assert_eq!(&buf[..got.len()], &bytes[..]);
            }
            let next = ep.recv(&mut buf, Wait::Now);
            let want = if saved.peer_closed() {
                ChannelError::Closed
            } else {
                ChannelError::Empty
            };
            assert_eq!(next.map(|_| ()), Err(want));
        }
    }
    drop(peer);
});
