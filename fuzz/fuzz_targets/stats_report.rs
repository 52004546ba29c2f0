//! A monitor report from a process that publishes in the runtime directory (same user, but
//! not trusted to be sound): the input is the bytes as they are, decoded by
//! `vmlink_shm::monitor::decode`, as `vmlink stat` reads them.
//!
//! Asserted:
//! - the decoder never panics, and allocates no more than a small multiple of the input
//!   (no allocation sized by a count the input claims but does not carry);
//! - a refused input is a typed error with a message;
//! - an accepted report encodes to bytes that decode to the same report, and encode again
//!   to the same bytes; for input in the current version those bytes are never longer
//!   than the input (postcard's decoder also takes integers in more bytes than they need).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmlink_fuzz::largest_alloc;
use vmlink_shm::monitor::{STATS_VERSION, decode, encode};

fuzz_target!(|data: &[u8]| {
    let (decoded, largest) = largest_alloc(|| decode(data));
    assert!(
        largest <= 64 * data.len() + 4096,
        "a {}-byte input made a {largest}-byte allocation",
        data.len()
    );
    let report = match decoded {
        Ok(r) => r,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let again = encode(&report);
    let back = decode(&again).expect("the encoder's own bytes");
    assert_eq!(back, report);
    assert_eq!(encode(&back), again, "the encoder's form is canonical");
    assert_eq!(data[8..10], STATS_VERSION.to_le_bytes());
    assert!(again.len() <= data.len());
});
