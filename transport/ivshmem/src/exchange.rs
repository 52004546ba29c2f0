//! The exchange the tests run between the host and the test guest over a channel: what
//! each packet asks for, the data both sides generate, and the digest both sides compute.
//!
//! Every packet's payload starts with an 8-byte word whose first byte is the operation
//! ([`op`]); the rest follows in 8-byte little-endian words, so payloads are whole words
//! (a ring pads payloads to 8 bytes). The host drives; the guest serves:
//!
//! - [`op::READY`] (guest → host, once): the guest's channel is up.
//! - [`op::ECHO`] (a call): the guest completes it with the same payload.
//! - [`op::DATA`] (either way, no completion): a chunk of a transfer, after the op word.
//! - [`op::END`] (a call, host → guest): the host's transfer is over; the guest completes
//!   it with `[digest, bytes]` of what it received since the last `END`.
//! - [`op::SEND`] (a call, `[op, bytes, seed]`): the guest acknowledges it, then sends
//!   `bytes` of [`Pattern`] `seed` as `DATA` chunks and one [`op::END`] packet
//!   `[op, digest, bytes]` (no completion).
//! - [`op::WAIT`] (a call): the guest acknowledges it, then waits for a packet with a
//!   deadline and reports what the wait gave on its console.

/// Operations (the first byte of a payload's first word).
pub mod op {
    /// The guest's channel is up.
    pub const READY: u8 = b'R';
    /// Echo this call's payload.
    pub const ECHO: u8 = b'C';
    /// A chunk of a transfer.
    pub const DATA: u8 = b'D';
    /// The end of a transfer.
    pub const END: u8 = b'E';
    /// Send me a transfer.
    pub const SEND: u8 = b'G';
    /// Wait for a packet and report how the wait ended.
    pub const WAIT: u8 = b'W';
}

/// The data bytes of one `DATA` chunk (after its op word).
pub const CHUNK: usize = 16 * 1024;

/// The op word of `op`.
pub fn op_word(op: u8) -> [u8; 8] {
    [op, 0, 0, 0, 0, 0, 0, 0]
}

/// A digest of a byte stream fed in whole 8-byte words: FNV-1a's step over little-endian
/// words, then the byte count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    state: u64,
    bytes: u64,
}

impl Default for Digest {
    fn default() -> Self {
        Self {
            state: 0xcbf2_9ce4_8422_2325,
            bytes: 0,
        }
    }
}

impl Digest {
    /// Feeds `data`; a tail shorter than a word is fed zero-padded.
    pub fn update(&mut self, data: &[u8]) {
        let mut words = data.chunks(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b[..w.len()].copy_from_slice(w);
            self.state = (self.state ^ u64::from_le_bytes(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.bytes += data.len() as u64;
    }

    /// The digest so far.
    pub fn value(&self) -> u64 {
        self.state
    }

    /// Bytes fed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// A stream of pseudo-random bytes (xorshift64), the same on both sides for a seed.
#[derive(Debug, Clone)]
pub struct Pattern(u64);

impl Pattern {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Fills `buf` (a whole number of words; a tail is filled too) with the next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for w in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
        }
    }
}

/// The little-endian word `i` of `payload` (0 when it is short).
pub fn word(payload: &[u8], i: usize) -> u64 {
    payload
        .get(i * 8..i * 8 + 8)
        .map_or(0, |w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_see_every_word_and_patterns_repeat_per_seed() {
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
        Pattern::new(7).fill(&mut a);
        Pattern::new(7).fill(&mut b);
        assert_eq!(a, b);
        let mut d1 = Digest::default();
        d1.update(&a);
        b[4095] ^= 1;
        let mut d2 = Digest::default();
        d2.update(&b);
        assert_ne!(d1.value(), d2.value());
        assert_eq!(d1.bytes(), 4096);
        Pattern::new(8).fill(&mut b);
        assert_ne!(a, b);
    }
}
