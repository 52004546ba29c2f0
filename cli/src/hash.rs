//! The file check's hash: a 64-bit FNV-1a variant over 64-bit words.
//!
//! Each 8-byte little-endian word `w` of the data (the tail zero-padded) is folded in as
//! `h = (h ^ w) * FNV_PRIME; h ^= h >> 29`, starting from the FNV offset basis, and the
//! length is folded in last. It catches lost, repeated, reordered and flipped bytes with
//! overwhelming probability, fast enough not to dominate the demo; it is not a
//! cryptographic hash (nothing here defends against a peer forging data on purpose).

/// FNV-1a's 64-bit offset basis.
const BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV's 64-bit prime.
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// An incremental hash of a byte stream.
#[derive(Debug, Clone)]
pub struct Hasher {
    state: u64,
    len: u64,
    /// Bytes of a word not yet complete.
    pending: [u8; 8],
    pending_len: usize,
}

impl Default for Hasher {
    fn default() -> Self {
        Self {
            state: BASIS,
            len: 0,
            pending: [0; 8],
            pending_len: 0,
        }
    }
}

impl Hasher {
    fn word(&mut self, w: u64) {
        self.state = (self.state ^ w).wrapping_mul(PRIME);
        self.state ^= self.state >> 29;
    }

    /// Adds `data` to the stream.
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.pending_len > 0 {
            let n = (8 - self.pending_len).min(data.len());
            self.pending[self.pending_len..self.pending_len + n].copy_from_slice(&data[..n]);
            self.pending_len += n;
            data = &data[n..];
            if self.pending_len < 8 {
                return;
            }
            self.word(u64::from_le_bytes(self.pending));
            self.pending_len = 0;
        }
        let (words, rest) = data.as_chunks::<8>();
        for w in words {
            self.word(u64::from_le_bytes(*w));
        }
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    /// The hash of everything added.
    pub fn finish(mut self) -> u64 {
        if self.pending_len > 0 {
            self.pending[self.pending_len..].fill(0);
            self.word(u64::from_le_bytes(self.pending));
        }
        let len = self.len;
        self.word(len);
        self.state
    }
}

/// The hash of the file at `path`.
pub fn file(path: &std::path::Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Hasher::default();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(data: &[u8]) -> u64 {
        let mut h = Hasher::default();
        h.update(data);
        h.finish()
    }

    #[test]
    fn pieces_hash_like_the_whole() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut h = Hasher::default();
        for piece in data.chunks(13) {
            h.update(piece);
        }
        assert_eq!(h.finish(), whole(&data));
    }

    #[test]
    fn changes_change_the_hash() {
        let data = vec![0u8; 64];
        let base = whole(&data);
        assert_ne!(base, whole(&data[..63]), "a shorter zero tail differs");
        for i in 0..64 {
            let mut d = data.clone();
            d[i] = 1;
            assert_ne!(whole(&d), base, "byte {i}");
        }
    }
}
