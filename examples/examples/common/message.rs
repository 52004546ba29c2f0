//! The 64-byte test messages of the `floors` and `instr` examples, which include this file
//! with `#[path = "common/message.rs"] mod message;`. Every word of every message differs,
//! so loss, reordering and tearing show when a message is checked.

const K: u64 = 0x9e37_79b9_7f4a_7c15;

/// Word `j` of message `seq`: every word differs, so loss, reordering and tearing show.
#[inline]
fn word(seq: u64, j: usize) -> u64 {
    seq.wrapping_mul(K).wrapping_add(j as u64)
}

/// Message number `seq` as words.
#[inline]
pub fn msg_words(seq: u64) -> [u64; 8] {
    std::array::from_fn(|j| word(seq, j))
}

/// Message number `seq` as bytes.
#[inline]
pub fn msg(seq: u64) -> [u8; 64] {
    let mut m = [0u8; 64];
    for (j, chunk) in m.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&word(seq, j).to_le_bytes());
    }
    m
}

/// Panics unless `got` is message `seq`.
#[inline]
pub fn check(seq: u64, got: &[u8]) {
    assert!(got == msg(seq), "message {seq} wrong, torn or lost");
}

/// Panics unless `got` is message `seq`.
#[inline]
pub fn check_words(seq: u64, got: &[u64; 8]) {
    assert!(*got == msg_words(seq), "message {seq} wrong, torn or lost");
}
