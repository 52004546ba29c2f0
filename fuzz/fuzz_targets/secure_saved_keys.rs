//! A secure channel's saved keys (`SavedKeys::from_bytes`) from hostile bytes: what a
//! successor reads from the hand-over socket.
//!
//! Asserted: nothing panics; whatever is accepted writes back to exactly the same bytes
//! (the form is canonical, so nothing in it is ignored); a refusal is one of the typed
//! errors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmlink_secure::servicing::{SAVED_KEYS_LEN, SavedKeys};

fuzz_target!(|data: &[u8]| {
    // Mostly well-sized inputs, so the fields themselves are explored.
    let mut sized = [0u8; SAVED_KEYS_LEN];
    let n = data.len().min(SAVED_KEYS_LEN);
    sized[..n].copy_from_slice(&data[..n]);
    sized[..8].copy_from_slice(b"VMLKSKEY");
    for bytes in [data, &sized[..]] {
        if let Ok(keys) = SavedKeys::from_bytes(bytes) {
            assert_eq!(&keys.to_bytes()[..], bytes, "accepted bytes write back unchanged");
        }
    }
});
