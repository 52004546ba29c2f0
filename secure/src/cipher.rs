//! One direction's cipher: a key, a counter nonce, and the rekeying both sides do at the
//! same counter.

use hkdf::Hkdf;
use ring::aead::{AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, Tag, UnboundKey};
use sha2::Sha256;
use vmlink_channel::AuthFailure;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::wiped::Wiped;

/// Bytes of an authentication tag.
pub const TAG_LEN: usize = 16;

/// Bytes of a key.
pub const KEY_LEN: usize = 32;

/// Bytes of a new epoch's salt.
pub const SALT_LEN: usize = 32;

/// Bytes of a [`KeyState`] in its saved form ([`KeyState::to_bytes`]).
pub const KEY_STATE_LEN: usize = KEY_LEN + 6 * 8 + 8;

/// What every sealed frame authenticates besides its own bytes: the layer and its version.
const AD: &[u8] = b"vmlink-secure v1";

/// The transport cipher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Cipher {
    /// ChaCha20-Poly1305 (the default: fast without special instructions, constant time
    /// everywhere).
    #[default]
    ChaChaPoly,
    /// AES-256-GCM (faster where the CPU has AES and carry-less multiply instructions).
    AesGcm,
}

impl Cipher {
    /// The name Noise gives it in a protocol name.
    pub fn noise_name(self) -> &'static str {
        match self {
            Cipher::ChaChaPoly => "ChaChaPoly",
            Cipher::AesGcm => "AESGCM",
        }
    }

    /// The 12-byte nonce for `counter`, as Noise builds it: four zero bytes, then the
    /// counter little-endian (ChaChaPoly) or big-endian (AESGCM).
    fn nonce(self, counter: u64) -> Nonce {
        let mut n = [0u8; 12];
        match self {
            Cipher::ChaChaPoly => n[4..].copy_from_slice(&counter.to_le_bytes()),
            Cipher::AesGcm => n[4..].copy_from_slice(&counter.to_be_bytes()),
        }
        Nonce::assume_unique_for_key(n)
    }

    /// The cipher keyed with `key`.
    fn keyed(self, key: &[u8; KEY_LEN]) -> LessSafeKey {
        let algorithm = match self {
            Cipher::ChaChaPoly => &CHACHA20_POLY1305,
            Cipher::AesGcm => &AES_256_GCM,
        };
        // Both algorithms take exactly 32-byte keys.
        LessSafeKey::new(UnboundKey::new(algorithm, key).expect("a 32-byte key"))
    }
}

/// When both sides replace a direction's key with `REKEY(key)` (Noise's rekey function):
/// after this many packets or bytes sealed under it, whichever comes first. Both sides
/// count the same packets and bytes, so they rekey at the same counter without a message.
///
/// The defaults stay far inside the ciphers' limits in the style of RFC 8446 §5.5: AES-GCM's
/// confidentiality bound (2^24.5 records of 2^14 bytes per key) is about 2^38.5 bytes, and
/// each key here seals at most 2^20 packets and 2^32 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RekeyLimits {
    /// Packets per key.
    pub packets: u64,
    /// Bytes (of ciphertext) per key.
    pub bytes: u64,
}

impl Default for RekeyLimits {
    fn default() -> Self {
        Self {
            packets: 1 << 20,
            bytes: 1 << 32,
        }
    }
}

/// Where a direction is: its counter and rekey progress, without key material.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    counter: u64,
    packets_since_rekey: u64,
    bytes_since_rekey: u64,
    generation: u64,
}

/// A direction's key and where it is: the counter of the next nonce, and how much was
/// sealed under this key since the last rekey.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct KeyState {
    key: [u8; KEY_LEN],
    /// The cipher keyed with `key`, made at its first use (a copy starts without one),
    /// zeroed when it is replaced or dropped.
    #[zeroize(skip)]
    keyed: Wiped<LessSafeKey>,
    counter: u64,
    #[zeroize(skip)]
    cipher: Cipher,
    #[zeroize(skip)]
    limits: RekeyLimits,
    packets_since_rekey: u64,
    bytes_since_rekey: u64,
    /// Rekeys and epochs so far (for tests and statistics).
    generation: u64,
}

impl Clone for KeyState {
    fn clone(&self) -> Self {
        Self {
            key: self.key,
            keyed: Wiped::empty(),
            counter: self.counter,
            cipher: self.cipher,
            limits: self.limits,
            packets_since_rekey: self.packets_since_rekey,
            bytes_since_rekey: self.bytes_since_rekey,
            generation: self.generation,
        }
    }
}

impl core::fmt::Debug for KeyState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("KeyState")
            .field("counter", &self.counter)
            .field("cipher", &self.cipher)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl KeyState {
    /// A direction starting at counter 0 under `key`.
    pub fn new(key: [u8; KEY_LEN], cipher: Cipher, limits: RekeyLimits) -> Self {
        Self {
            key,
            keyed: Wiped::empty(),
            counter: 0,
            cipher,
            limits,
            packets_since_rekey: 0,
            bytes_since_rekey: 0,
            generation: 0,
        }
    }

    /// The counter of the next nonce.
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// Rekeys and epochs so far.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Seals `buf` in place with the next nonce; returns the tag.
    pub fn seal(&mut self, buf: &mut [u8]) -> Result<[u8; TAG_LEN], AuthFailure> {
        self.seal_with(AD, buf)
    }

    pub(crate) fn seal_with(
        &mut self,
        ad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], AuthFailure> {
        // Noise reserves the largest nonce for REKEY.
        if self.counter == u64::MAX {
            return Err(AuthFailure::Exhausted);
        }
        let nonce = self.cipher.nonce(self.counter);
        let (cipher, key) = (self.cipher, &self.key);
        let tag: Tag = self
            .keyed
            .get_or_insert_with(|| cipher.keyed(key))
            .seal_in_place_separate_tag(nonce, Aad::from(ad), buf)
            .map_err(|_| AuthFailure::Contents("too long for the cipher"))?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        self.advance(buf.len() + TAG_LEN);
        Ok(out)
    }

    /// Opens `buf` in place with the next nonce, if `tag` verifies; nothing changes if it
    /// does not.
    pub fn open(&mut self, buf: &mut [u8], tag: &[u8; TAG_LEN]) -> Result<(), AuthFailure> {
        self.open_with(AD, buf, tag)
    }

    pub(crate) fn open_with(
        &mut self,
        ad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), AuthFailure> {
        if self.counter == u64::MAX {
            return Err(AuthFailure::Exhausted);
        }
        let nonce = self.cipher.nonce(self.counter);
        let (cipher, key) = (self.cipher, &self.key);
        self.keyed
            .get_or_insert_with(|| cipher.keyed(key))
            .open_in_place_separate_tag(nonce, Aad::from(ad), Tag::from(*tag), buf, 0..)
            .map_err(|_| AuthFailure::Tag)?;
        self.advance(buf.len() + TAG_LEN);
        Ok(())
    }

    /// Where this direction is, without its key.
    pub(crate) fn position(&self) -> Position {
        Position {
            counter: self.counter,
            packets_since_rekey: self.packets_since_rekey,
            bytes_since_rekey: self.bytes_since_rekey,
            generation: self.generation,
        }
    }

    /// Goes back to `p`, a position under this same key (no rekey or epoch since).
    pub(crate) fn rewind(&mut self, p: Position) {
        debug_assert_eq!(p.generation, self.generation);
        self.counter = p.counter;
        self.packets_since_rekey = p.packets_since_rekey;
        self.bytes_since_rekey = p.bytes_since_rekey;
    }

    /// Drops the keyed cipher made from the key (zeroing it), to be made again at the next
    /// use: before this state is moved, so no live key schedule is left behind by the move.
    pub(crate) fn drop_schedule(&mut self) {
        self.keyed.clear();
    }

    /// Copies the key bytes into `out` (for a receiver that may have to go back to this
    /// key).
    pub(crate) fn copy_key_to(&self, out: &mut [u8; KEY_LEN]) {
        out.copy_from_slice(&self.key);
    }

    /// The state at `p` under `key`: where this direction was before it opened a frame it
    /// has not consumed (`key` the key it had then, which differs after a rekey).
    pub(crate) fn at(&self, key: &[u8; KEY_LEN], p: Position) -> Self {
        let mut state = Self::new(*key, self.cipher, self.limits);
        state.counter = p.counter;
        state.packets_since_rekey = p.packets_since_rekey;
        state.bytes_since_rekey = p.bytes_since_rekey;
        state.generation = p.generation;
        state
    }

    /// The state as bytes ([`KEY_STATE_LEN`]; the key included, so they are secret):
    /// key, counter, packets and bytes since the last rekey, generation, the rekey limits
    /// (packets, bytes), the cipher (0 ChaCha20-Poly1305, 1 AES-256-GCM) and 7 zero bytes;
    /// integers little-endian.
    pub fn to_bytes(&self) -> zeroize::Zeroizing<[u8; KEY_STATE_LEN]> {
        let mut out = zeroize::Zeroizing::new([0u8; KEY_STATE_LEN]);
        out[..KEY_LEN].copy_from_slice(&self.key);
        let words = [
            self.counter,
            self.packets_since_rekey,
            self.bytes_since_rekey,
            self.generation,
            self.limits.packets,
            self.limits.bytes,
        ];
        for (i, w) in words.iter().enumerate() {
            out[KEY_LEN + 8 * i..KEY_LEN + 8 * (i + 1)].copy_from_slice(&w.to_le_bytes());
        }
        out[KEY_LEN + 48] = match self.cipher {
            Cipher::ChaChaPoly => 0,
            Cipher::AesGcm => 1,
        };
        out
    }

    /// A state from [`to_bytes`](Self::to_bytes)'s form; what cannot be a state (an
    /// unknown cipher, zero limits, progress at or past them, the last nonce, non-zero
    /// reserved bytes) is refused with the reason.
    pub fn from_bytes(bytes: &[u8; KEY_STATE_LEN]) -> Result<Self, &'static str> {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[KEY_LEN + 8 * i..KEY_LEN + 8 * (i + 1)]);
            u64::from_le_bytes(w)
        };
        let cipher = match bytes[KEY_LEN + 48] {
            0 => Cipher::ChaChaPoly,
            1 => Cipher::AesGcm,
            _ => return Err("an unknown cipher"),
        };
        if bytes[KEY_LEN + 49..].iter().any(|&b| b != 0) {
            return Err("reserved bytes that are not zero");
        }
        let limits = RekeyLimits {
            packets: word(4),
            bytes: word(5),
        };
        let (counter, packets, sealed, generation) = (word(0), word(1), word(2), word(3));
        if limits.packets == 0 || limits.bytes == 0 {
            return Err("a rekey limit of zero");
        }
        if packets >= limits.packets || sealed >= limits.bytes {
            return Err("progress past the rekey limits");
        }
        if counter == u64::MAX {
            return Err("the counter at the nonce reserved for rekeying");
        }
        let mut key = [0u8; KEY_LEN];
        key.copy_from_slice(&bytes[..KEY_LEN]);
        let mut state = Self::new(key, cipher, limits);
        key.zeroize();
        state.counter = counter;
        state.packets_since_rekey = packets;
        state.bytes_since_rekey = sealed;
        state.generation = generation;
        Ok(state)
    }

    /// Whether sealing `len` more bytes (tag included) rekeys.
    pub(crate) fn rekeys_after(&self, len: usize) -> bool {
        self.packets_since_rekey + 1 >= self.limits.packets
            || self.bytes_since_rekey.saturating_add(len as u64) >= self.limits.bytes
    }

    /// Becomes what `other` is: only its position when it has the same key (it went on
    /// from this one without a rekey or epoch), else a copy of it.
    pub(crate) fn follow(&mut self, other: &KeyState) {
        if other.generation == self.generation {
            self.rewind(other.position());
        } else {
            *self = other.clone();
        }
    }

    /// Counts a packet of `len` sealed bytes and rekeys at the limits.
    fn advance(&mut self, len: usize) {
        self.counter += 1;
        self.packets_since_rekey += 1;
        self.bytes_since_rekey = self.bytes_since_rekey.saturating_add(len as u64);
        if self.packets_since_rekey >= self.limits.packets
            || self.bytes_since_rekey >= self.limits.bytes
        {
            self.rekey();
        }
    }

    /// Noise's `REKEY(k)`: the first 32 bytes of sealing 32 zero bytes under the largest
    /// nonce. The counter goes on.
    fn rekey(&mut self) {
        let mut next = [0u8; KEY_LEN];
        let nonce = self.cipher.nonce(u64::MAX);
        // Sealing 32 bytes cannot exceed either cipher's length bound.
        let (cipher, key) = (self.cipher, &self.key);
        let _ = self
            .keyed
            .get_or_insert_with(|| cipher.keyed(key))
            .seal_in_place_separate_tag(nonce, Aad::empty(), &mut next);
        self.key.zeroize();
        self.key = next;
        self.keyed.clear();
        next.zeroize();
        self.packets_since_rekey = 0;
        self.bytes_since_rekey = 0;
        self.generation += 1;
    }

    /// A new key epoch from this key and `salt`: `HKDF-SHA-256(salt, key, "vmlink epoch")`,
    /// counter 0. A fresh random salt makes a key never used before, so no nonce is ever
    /// repeated under one key, whatever was sealed under this one and thrown away.
    pub fn epoch(&self, salt: &[u8; SALT_LEN]) -> Self {
        let mut key = [0u8; KEY_LEN];
        // 32 bytes is far below HKDF-SHA-256's output bound.
        let _ = Hkdf::<Sha256>::new(Some(salt), &self.key).expand(b"vmlink epoch", &mut key);
        let mut next = Self::new(key, self.cipher, self.limits);
        key.zeroize();
        next.generation = self.generation + 1;
        next
    }

    /// Seals an epoch frame's tag: the salt authenticated under the new key (nonce 0).
    pub fn seal_epoch(&mut self, salt: &[u8; SALT_LEN]) -> Result<[u8; TAG_LEN], AuthFailure> {
        self.seal_with(&epoch_ad(salt), &mut [])
    }

    /// Verifies an epoch frame's tag under this (new) key.
    pub fn open_epoch(
        &mut self,
        salt: &[u8; SALT_LEN],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), AuthFailure> {
        self.open_with(&epoch_ad(salt), &mut [], tag)
    }
}

fn epoch_ad(salt: &[u8; SALT_LEN]) -> [u8; AD.len() + 6 + SALT_LEN] {
    let mut ad = [0u8; AD.len() + 6 + SALT_LEN];
    ad[..AD.len()].copy_from_slice(AD);
    ad[AD.len()..AD.len() + 6].copy_from_slice(b" epoch");
    ad[AD.len() + 6..].copy_from_slice(salt);
    ad
}

/// A fresh random salt for a new epoch.
pub fn fresh_salt() -> [u8; SALT_LEN] {
    let mut salt = [0u8; SALT_LEN];
    // The system's random source failing is not something a channel can go on without.
    getrandom::fill(&mut salt).expect("the system's random source");
    salt
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(cipher: Cipher, limits: RekeyLimits) -> (KeyState, KeyState) {
        let k = KeyState::new([7; KEY_LEN], cipher, limits);
        (k.clone(), k)
    }

    #[test]
    fn sealed_bytes_open_once_and_only_in_order() {
        for cipher in [Cipher::ChaChaPoly, Cipher::AesGcm] {
            let (mut tx, mut rx) = pair(cipher, RekeyLimits::default());
            let mut a = *b"first packet";
            let ta = tx.seal(&mut a).unwrap();
            let mut b = *b"second one!!";
            let tb = tx.seal(&mut b).unwrap();
            // Out of order: the second packet does not open under the first counter.
            let mut b2 = b;
            assert_eq!(rx.open(&mut b2, &tb), Err(AuthFailure::Tag));
            assert_eq!(rx.counter(), 0, "a refused packet changes nothing");
            rx.open(&mut a, &ta).unwrap();
            assert_eq!(&a, b"first packet");
            // Replayed: the first again does not open under the second counter.
            let mut a2 = a;
            tx.counter = 0; // (re-seal the first plaintext to replay its bytes)
            let mut replay = *b"first packet";
            let tr = KeyState::new([7; KEY_LEN], cipher, RekeyLimits::default())
                .seal(&mut replay)
                .unwrap();
            assert_eq!(rx.open(&mut replay, &tr), Err(AuthFailure::Tag));
            let _ = &mut a2;
            rx.open(&mut b, &tb).unwrap();
            assert_eq!(&b, b"second one!!");
        }
    }

    #[test]
    fn both_sides_rekey_at_the_same_counter_and_a_side_that_does_not_is_refused() {
        let limits = RekeyLimits {
            packets: 3,
            bytes: u64::MAX,
        };
        let (mut tx, mut rx) = pair(Cipher::ChaChaPoly, limits);
        let mut lagging = KeyState::new([7; KEY_LEN], Cipher::ChaChaPoly, RekeyLimits::default());
        for i in 0..10u8 {
            let mut m = [i; 40];
            let tag = tx.seal(&mut m).unwrap();
            let mut copy = m;
            rx.open(&mut m, &tag).unwrap();
            assert_eq!(m, [i; 40]);
            // A receiver that never rekeys opens the first three only.
            assert_eq!(lagging.open(&mut copy, &tag).is_ok(), i < 3, "packet {i}");
            if i >= 3 {
                lagging.counter += 1; // as if it had been told to skip on
            }
        }
        assert_eq!(tx.generation(), 3);
        assert_eq!(rx.generation(), 3);
    }

    #[test]
    fn a_byte_limit_rekeys_too() {
        let limits = RekeyLimits {
            packets: u64::MAX,
            bytes: 100,
        };
        let (mut tx, mut rx) = pair(Cipher::AesGcm, limits);
        for _ in 0..5 {
            let mut m = [1u8; 64];
            let tag = tx.seal(&mut m).unwrap();
            rx.open(&mut m, &tag).unwrap();
        }
        // 80 bytes per packet: a rekey after every second packet.
        assert_eq!(tx.generation(), 2);
        assert_eq!(rx.generation(), 2);
    }

    #[test]
    fn epochs_from_fresh_salts_are_fresh_keys() {
        let k = KeyState::new([9; KEY_LEN], Cipher::ChaChaPoly, RekeyLimits::default());
        let (s1, s2) = (fresh_salt(), fresh_salt());
        assert_ne!(s1, s2);
        let (mut a, mut b) = (k.epoch(&s1), k.epoch(&s2));
        let mut m1 = [0u8; 16];
        let mut m2 = [0u8; 16];
        a.seal(&mut m1).unwrap();
        b.seal(&mut m2).unwrap();
        assert_ne!(
            m1, m2,
            "the same counter under two epochs gives two keystreams"
        );
        let mut tx = k.epoch(&s1);
        let tag = tx.seal_epoch(&s1).unwrap();
        let mut rx = k.epoch(&s1);
        rx.open_epoch(&s1, &tag).unwrap();
        let mut wrong = k.epoch(&s2);
        assert_eq!(wrong.open_epoch(&s2, &tag), Err(AuthFailure::Tag));
    }

    #[test]
    fn the_counter_stops_short_of_the_rekey_nonce() {
        let mut k = KeyState::new([1; KEY_LEN], Cipher::ChaChaPoly, RekeyLimits::default());
        k.counter = u64::MAX;
        assert_eq!(k.seal(&mut [0u8; 4]), Err(AuthFailure::Exhausted));
    }
}
