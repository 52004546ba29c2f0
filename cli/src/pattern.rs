//! The data check: every packet carries a pattern derived from its sequence number, and
//! the receiver checks every byte of it.
//!
//! Word 0 (bytes 0..8, little-endian) of a packet is its sequence number; word `k > 0` is
//! `seq * MIX + k * STEP` (wrapping). A lost, repeated, reordered, stale or corrupted
//! packet therefore fails the check, and the check costs about as much as a copy.

/// Multiplier that spreads a sequence number over the pattern.
const MIX: u64 = 0x9E37_79B9_7F4A_7C15;
/// Difference between consecutive pattern words.
const STEP: u64 = 0xD1B5_4A32_D192_ED03;

/// The sequence number of the packet that ends a run.
pub const END: u64 = u64::MAX;
/// Set in the sequence number of a response, to tell it from its request.
pub const RESPONSE: u64 = 1 << 62;

/// The pattern word `word` of packet `seq`, for `word > 0`.
fn word_value(seq: u64, word: usize) -> u64 {
    seq.wrapping_mul(MIX)
        .wrapping_add((word as u64).wrapping_mul(STEP))
}

/// Fills `buf` with packet `seq`'s pattern starting at word `first_word` (so a payload can
/// be filled in chunks that start on 8-byte boundaries).
pub fn fill(seq: u64, first_word: usize, buf: &mut [u8]) {
    let (mut words, rest) = buf.as_chunks_mut::<8>();
    let mut value = word_value(seq, first_word);
    if first_word == 0
        && let Some((head, tail)) = std::mem::take(&mut words).split_first_mut()
    {
        *head = seq.to_le_bytes();
        words = tail;
        value = value.wrapping_add(STEP);
    }
    for word in words {
        *word = value.to_le_bytes();
        value = value.wrapping_add(STEP);
    }
    let n = rest.len();
    rest.copy_from_slice(&value.to_le_bytes()[..n]);
}

/// True when `buf` holds packet `seq`'s pattern starting at word `first_word`.
pub fn check(seq: u64, first_word: usize, buf: &[u8]) -> bool {
    let (mut words, rest) = buf.as_chunks::<8>();
    let mut value = word_value(seq, first_word);
    let mut diff = 0u64;
    if first_word == 0
        && let Some((head, tail)) = words.split_first()
    {
        diff |= u64::from_le_bytes(*head) ^ seq;
        words = tail;
        value = value.wrapping_add(STEP);
    }
    for word in words {
        diff |= u64::from_le_bytes(*word) ^ value;
        value = value.wrapping_add(STEP);
    }
    if !rest.is_empty() {
        let mut last = [0u8; 8];
        last[..rest.len()].copy_from_slice(rest);
        let mask = u64::MAX >> (8 * (8 - rest.len()));
        diff |= (u64::from_le_bytes(last) ^ value) & mask;
    }
    diff == 0
}

/// The sequence number a packet claims: its first word, if it has one.
pub fn claimed_seq(first_chunk: &[u8]) -> Option<u64> {
    first_chunk
        .first_chunk::<8>()
        .map(|b| u64::from_le_bytes(*b))
}

/// Counts of packets checked and of those that failed.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Packets checked.
    pub packets: u64,
    /// Payload bytes checked.
    pub bytes: u64,
    /// Packets (or counts) that did not match.
    pub mismatches: u64,
    /// What the first mismatch was.
    pub first_mismatch: Option<String>,
}

impl Tally {
    /// Records a packet of `bytes` payload bytes that matched.
    pub fn pass(&mut self, bytes: usize) {
        self.packets += 1;
        self.bytes += bytes as u64;
    }

    /// Records a packet of `bytes` payload bytes that did not match; `what` describes it
    /// (called only for the first mismatch).
    pub fn fail(&mut self, bytes: usize, what: impl FnOnce() -> String) {
        self.pass(bytes);
        self.mismatch(what);
    }

    /// Records a mismatch that is not about one packet (e.g. a count that differs).
    pub fn mismatch(&mut self, what: impl FnOnce() -> String) {
        self.mismatches += 1;
        if self.first_mismatch.is_none() {
            self.first_mismatch = Some(what());
        }
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: Tally) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.mismatches += other.mismatches;
        if self.first_mismatch.is_none() {
            self.first_mismatch = other.first_mismatch;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check_in_chunks() {
        let mut whole = vec![0u8; 100];
        fill(7, 0, &mut whole);
        assert!(check(7, 0, &whole));
        assert_eq!(claimed_seq(&whole), Some(7));
        assert!(!check(8, 0, &whole));
        // The same bytes, checked and filled as chunks starting on word boundaries.
        assert!(check(7, 2, &whole[16..]));
        let mut chunked = vec![0u8; 100];
        fill(7, 0, &mut chunked[..40]);
        fill(7, 5, &mut chunked[40..]);
        assert_eq!(chunked, whole);
        for i in 0..whole.len() {
            let mut bad = whole.clone();
            bad[i] ^= 0x10;
            assert!(!check(7, 0, &bad), "flipped byte {i} went unnoticed");
        }
    }

    #[test]
    fn tally_keeps_the_first_mismatch() {
        let mut t = Tally::default();
        t.pass(64);
        t.fail(64, || "first".into());
        t.fail(64, || "second".into());
        let mut total = Tally::default();
        total.merge(t);
        assert_eq!((total.packets, total.bytes, total.mismatches), (3, 192, 2));
        assert_eq!(total.first_mismatch.as_deref(), Some("first"));
    }
}
