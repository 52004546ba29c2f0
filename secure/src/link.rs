//! The secure layer: a [`PacketTx`] / [`PacketRx`] pair over another one that seals every
//! packet on the way out and opens it on the way in.
//!
//! # Frames
//!
//! Every packet the layer writes to the link below is an in-band packet with no extra
//! header. Its descriptor is the ring format and stays plaintext; its transaction id says
//! what the frame is: `0` a sealed packet, `1` a new key epoch. Nothing else in the
//! descriptor varies.
//!
//! A sealed packet's payload is `ciphertext || tag` (16 bytes), the ciphertext sealed
//! under the direction's key and the next counter nonce. Its plaintext is the packet as
//! the endpoint above sent it: a 24-byte inner header — packet type (`u16`), flags
//! (`u16`), extra header length (`u32`), payload length (`u32`), zero (`u32`),
//! transaction id (`u64`), all little-endian — then the extra header, the payload, and
//! zeros up to a multiple of 8 bytes (so the frame is exactly the ring's padded length).
//!
//! A new epoch's payload is a 32-byte random salt and a tag: the new key is
//! `HKDF-SHA-256(salt, current key, "vmlink epoch")`, its counter starts at 0, and the tag
//! seals nothing under it with the salt authenticated. The sender starts one before its
//! next packet after anything sealed was thrown away unsent (a rollback) and after it was
//! restored in another process, so no nonce is ever used twice under one key.
//!
//! # Receiving
//!
//! The receiving half copies a frame out of the link into private memory, verifies its
//! tag, and only then decrypts and parses it there: nothing is read twice from memory the
//! peer can write, and nothing of a frame that fails is delivered. Each direction accepts
//! exactly the next counter, so a replayed, reordered, dropped or altered packet fails the
//! tag check, and the channel fails with [`FailureCause::Authentication`]; the failure is
//! final.

use alloc::vec;
use alloc::vec::Vec;

use vmlink_channel::{AuthFailure, ChannelError, FailureCause, PacketRx, PacketTx, Received};
use vmlink_ring::protocol::{FLAG_COMPLETION_REQUESTED, PacketType};
use vmlink_ring::{OutgoingPacket, PacketMeta, Payload, Signal, WaitDecision};
use zeroize::Zeroizing;

use crate::cipher::{KeyState, SALT_LEN, TAG_LEN, fresh_salt};

/// Bytes of the inner header.
pub const INNER_HEADER_LEN: usize = 24;

/// The outer transaction id of a sealed packet.
const FRAME_SEALED: u64 = 0;
/// The outer transaction id of a new key epoch.
const FRAME_EPOCH: u64 = 1;

/// Bytes of a ring descriptor (what a packet costs on a ring besides its payload).
const DESCRIPTOR_LEN: usize = 16;

fn auth(f: AuthFailure) -> ChannelError {
    ChannelError::Failed(FailureCause::Authentication(f))
}

const fn round8(n: usize) -> usize {
    (n + 7) & !7
}

/// The sending half of the secure layer over `L`.
pub struct SecureTx<L> {
    inner: L,
    /// The key and counter the receiver expects next: where the last commit left them.
    committed: KeyState,
    /// The key and counter after the packets pushed since.
    pending: KeyState,
    /// Seals the next push after an epoch frame (after a rollback, or a restore).
    needs_epoch: bool,
    /// Where a packet is sealed before it is handed to `inner`; sized once from `inner`'s
    /// largest packet.
    scratch: Zeroizing<Vec<u8>>,
}

impl<L: PacketTx> SecureTx<L> {
    /// The sending half over `inner`, sealing under `key` (from the handshake, or a saved
    /// state: then with `new_epoch` set, so the first thing sent is a new key epoch).
    pub fn new(inner: L, key: KeyState, new_epoch: bool) -> Self {
        let max = inner.max_packet_len().saturating_sub(DESCRIPTOR_LEN);
        Self {
            inner,
            committed: key.clone(),
            pending: key,
            needs_epoch: new_epoch,
            scratch: Zeroizing::new(vec![0; max]),
        }
    }

    /// The key and counter the receiver expects next (what a saved state keeps).
    pub fn key_state(&self) -> &KeyState {
        &self.committed
    }

    /// The link below, and the key state a successor restores (see
    /// [`crate::servicing`]); packets pushed and not committed are dropped with the
    /// layer.
    pub fn into_parts(self) -> (L, KeyState) {
        (self.inner, self.committed.clone())
    }

    /// The link below.
    pub fn inner(&self) -> &L {
        &self.inner
    }

    /// Pushes an epoch frame and switches `pending` to the new key.
    fn push_epoch(&mut self) -> Result<(), ChannelError> {
        let salt = fresh_salt();
        let mut next = self.pending.epoch(&salt);
        let tag = next.seal_epoch(&salt).map_err(auth)?;
        next.drop_schedule();
        let mut frame = [0u8; SALT_LEN + TAG_LEN];
        frame[..SALT_LEN].copy_from_slice(&salt);
        frame[SALT_LEN..].copy_from_slice(&tag);
        self.inner.push(&OutgoingPacket {
            meta: PacketMeta {
                packet_type: PacketType::InBand,
                flags: 0,
                transaction_id: FRAME_EPOCH,
            },
            header: &[],
            payload: Payload::Bytes(&frame),
        })?;
        self.pending = next;
        self.needs_epoch = false;
        Ok(())
    }
}

impl<L: PacketTx> PacketTx for SecureTx<L> {
    fn max_packet_len(&self) -> usize {
        // The endpoint's packet (descriptor, header, padded payload) travels with an inner
        // header and a tag instead of its descriptor.
        self.inner
            .max_packet_len()
            .saturating_sub(INNER_HEADER_LEN + TAG_LEN)
    }

    fn push(&mut self, packet: &OutgoingPacket<'_>) -> Result<usize, ChannelError> {
        if packet.meta.packet_type == PacketType::GpaDirect {
            return Err(ChannelError::Unsupported {
                what: "GPA-direct packets on a secure channel (the buffer area is plaintext)",
            });
        }
        let header_len = packet.header.len();
        if !header_len.is_multiple_of(8) {
            return Err(ChannelError::Unsupported {
                what: "extra headers that are not a multiple of 8 bytes",
            });
        }
        let parts: &[&[u8]] = match &packet.payload {
            Payload::Bytes(b) => core::slice::from_ref(b),
            Payload::Gather(parts) => parts,
        };
        let payload_len: usize = parts.iter().map(|p| p.len()).sum();
        let plain_len = round8(INNER_HEADER_LEN + header_len + payload_len);
        let max = self.scratch.len().saturating_sub(TAG_LEN);
        if plain_len > max {
            return Err(ChannelError::TooLarge {
                len: DESCRIPTOR_LEN + header_len + round8(payload_len),
                max: self.max_packet_len(),
            });
        }
        let (Ok(header_len32), Ok(payload_len32)) =
            (u32::try_from(header_len), u32::try_from(payload_len))
        else {
            return Err(ChannelError::TooLarge {
                len: plain_len,
                max: self.max_packet_len(),
            });
        };
        if self.needs_epoch {
            self.push_epoch()?;
        }
        let buf = &mut self.scratch[..plain_len + TAG_LEN];
        let (plain, tag_out) = buf.split_at_mut(plain_len);
        plain[0..2].copy_from_slice(&packet.meta.packet_type.raw().to_le_bytes());
        plain[2..4].copy_from_slice(&packet.meta.flags.to_le_bytes());
        plain[4..8].copy_from_slice(&header_len32.to_le_bytes());
        plain[8..12].copy_from_slice(&payload_len32.to_le_bytes());
        plain[12..16].fill(0);
        plain[16..24].copy_from_slice(&packet.meta.transaction_id.to_le_bytes());
        let mut at = INNER_HEADER_LEN;
        plain[at..at + header_len].copy_from_slice(packet.header);
        at += header_len;
        for part in parts {
            plain[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        plain[at..].fill(0);
        // Where the key was: the counter moves on only if the link takes the frame.
        // A copy of the key only when this seal rekeys (rare), else just the position.
        let position = self.pending.position();
        let before = self
            .pending
            .rekeys_after(plain_len + TAG_LEN)
            .then(|| self.pending.clone());
        let tag = self.pending.seal(plain).map_err(auth)?;
        tag_out.copy_from_slice(&tag);
        let pushed = self.inner.push(&OutgoingPacket {
            meta: PacketMeta {
                packet_type: PacketType::InBand,
                flags: 0,
                transaction_id: FRAME_SEALED,
            },
            header: &[],
            payload: Payload::Bytes(buf),
        });
        if pushed.is_err() {
            // Nothing of this frame reached the link (a link refuses a packet before it
            // writes any of it), so its nonce sealed bytes nobody else saw: the counter
            // goes back, and the next packet is sealed under it.
            match before {
                Some(key) => self.pending = key,
                None => self.pending.rewind(position),
            }
        }
        pushed
    }

    fn commit(&mut self) -> Signal {
        self.committed.follow(&self.pending);
        self.inner.commit()
    }

    fn rollback(&mut self) {
        self.inner.rollback();
        if self.pending.counter() != self.committed.counter()
            || self.pending.generation() != self.committed.generation()
        {
            // Frames sealed under nonces the receiver will never see were written where
            // the peer can read them: the next frame starts a key epoch instead of
            // sealing other bytes under those nonces.
            self.needs_epoch = true;
        }
        self.pending = self.committed.clone();
    }

    fn prepare_wait(
        &mut self,
        header_len: usize,
        payload_len: usize,
    ) -> Result<(WaitDecision, Signal), ChannelError> {
        let sealed = round8(INNER_HEADER_LEN + header_len + payload_len) + TAG_LEN;
        let epoch = if self.needs_epoch {
            DESCRIPTOR_LEN + SALT_LEN + TAG_LEN + 8
        } else {
            0
        };
        let r = self.inner.prepare_wait(0, sealed + epoch);
        // `prepare_wait` commits what was pushed.
        self.committed.follow(&self.pending);
        r
    }

    fn peer_owed_signal(&self) -> bool {
        self.inner.peer_owed_signal()
    }
}

/// A frame opened and parsed: what `peek` said of it, its plaintext in `plain`.
#[derive(Clone, Copy)]
struct Opened {
    received: Received,
    /// Where the extra header starts in `plain`.
    header_at: usize,
    /// Where the payload starts in `plain`.
    payload_at: usize,
    /// Bytes of payload with its zero padding to 8.
    payload_padded: usize,
}

/// The receiving half of the secure layer over `L`.
pub struct SecureRx<L> {
    inner: L,
    key: KeyState,
    /// The frame at the head, opened, until it is consumed.
    opened: Option<Opened>,
    /// Frames are copied here, verified and decrypted; sized once from the largest frame
    /// this side takes.
    plain: Zeroizing<Vec<u8>>,
    /// The first refusal, final.
    failed: Option<AuthFailure>,
    /// Where `key` was before it opened the frame in `opened`, and the key it had then (a
    /// rekey may have replaced it): what a saved state keeps while that frame is still in
    /// the ring.
    head_from: Option<crate::cipher::Position>,
    head_key: Zeroizing<[u8; crate::cipher::KEY_LEN]>,
}

impl<L: PacketRx> SecureRx<L> {
    /// The receiving half over `inner`, opening under `key`; frames longer than
    /// `max_frame` bytes are refused.
    pub fn new(inner: L, key: KeyState, max_frame: usize) -> Self {
        Self {
            inner,
            key,
            opened: None,
            plain: Zeroizing::new(vec![0; max_frame]),
            failed: None,
            head_from: None,
            head_key: Zeroizing::new([0; crate::cipher::KEY_LEN]),
        }
    }

    /// The key and counter of the first frame not yet consumed: what a successor that
    /// reads the ring from there restores (see [`crate::servicing`]).
    pub fn saved_key(&self) -> KeyState {
        match (self.opened, self.head_from) {
            (Some(_), Some(p)) => self.key.at(&self.head_key, p),
            _ => self.key.clone(),
        }
    }

    /// The link below, and [`saved_key`](Self::saved_key).
    pub fn into_parts(self) -> (L, KeyState) {
        let key = self.saved_key();
        (self.inner, key)
    }

    /// The key and counter of the next frame (what a saved state keeps).
    pub fn key_state(&self) -> &KeyState {
        &self.key
    }

    fn fail(&mut self, f: AuthFailure) -> ChannelError {
        let first = *self.failed.get_or_insert(f);
        auth(first)
    }

    /// Opens the frame at the head of `inner`, which `inner.peek` described; epoch frames
    /// are taken in place and the next frame looked at.
    fn open_next(&mut self) -> Result<Option<Opened>, ChannelError> {
        loop {
            let Some(outer) = self.inner.peek()? else {
                return Ok(None);
            };
            if outer.packet_type != PacketType::InBand || outer.header_len != 0 {
                return Err(self.fail(AuthFailure::Frame("not an in-band packet")));
            }
            let len = outer.payload_len;
            if len > self.plain.len() {
                return Err(self.fail(AuthFailure::TooLarge {
                    len,
                    max: self.plain.len(),
                }));
            }
            match outer.transaction_id {
                FRAME_EPOCH => {
                    if len != round8(SALT_LEN + TAG_LEN) {
                        return Err(self.fail(AuthFailure::Frame("an epoch frame's length")));
                    }
                    let mut frame = [0u8; SALT_LEN + TAG_LEN];
                    self.inner.read_payload(0, &mut frame)?;
                    let (salt, tag) = frame.split_at(SALT_LEN);
                    let (Ok(salt), Ok(tag)) = (
                        <&[u8; SALT_LEN]>::try_from(salt),
                        <&[u8; TAG_LEN]>::try_from(tag),
                    ) else {
                        return Err(self.fail(AuthFailure::Frame("an epoch frame's length")));
                    };
                    let mut next = self.key.epoch(salt);
                    if let Err(e) = next.open_epoch(salt, tag) {
                        return Err(self.fail(e));
                    }
                    next.drop_schedule();
                    self.key = next;
                    self.inner.consume();
                }
                FRAME_SEALED => {
                    if len < round8(INNER_HEADER_LEN) + TAG_LEN {
                        return Err(self.fail(AuthFailure::Frame("shorter than a sealed packet")));
                    }
                    // Copy out, verify, decrypt: all in private memory.
                    let frame = &mut self.plain[..len];
                    self.inner.read_payload(0, frame)?;
                    let (cipher, tag) = frame.split_at_mut(len - TAG_LEN);
                    let tag: [u8; TAG_LEN] = match <[u8; TAG_LEN]>::try_from(&*tag) {
                        Ok(t) => t,
                        Err(_) => return Err(self.fail(AuthFailure::Frame("no tag"))),
                    };
                    let from = self.key.position();
                    self.key.copy_key_to(&mut self.head_key);
                    if let Err(e) = self.key.open(cipher, &tag) {
                        return Err(self.fail(e));
                    }
                    self.head_from = Some(from);
                    let plain_len = len - TAG_LEN;
                    return match parse_inner(&self.plain[..plain_len]) {
                        Ok(o) => Ok(Some(o)),
                        Err(e) => Err(self.fail(e)),
                    };
                }
                _ => return Err(self.fail(AuthFailure::Frame("an unknown frame kind"))),
            }
        }
    }
}

/// Parses an opened frame's plaintext.
fn parse_inner(plain: &[u8]) -> Result<Opened, AuthFailure> {
    let word16 = |at: usize| u16::from_le_bytes([plain[at], plain[at + 1]]);
    let word32 = |at: usize| {
        u32::from_le_bytes([plain[at], plain[at + 1], plain[at + 2], plain[at + 3]]) as usize
    };
    let packet_type = match PacketType::from_raw(word16(0)) {
        Some(t @ (PacketType::InBand | PacketType::Completion | PacketType::TransferPages)) => t,
        _ => {
            return Err(AuthFailure::Contents(
                "a packet type a secure channel does not carry",
            ));
        }
    };
    let flags = word16(2);
    let header_len = word32(4);
    let payload_len = word32(8);
    if word32(12) != 0 {
        return Err(AuthFailure::Contents("a reserved word that is not zero"));
    }
    let mut tid = [0u8; 8];
    tid.copy_from_slice(&plain[16..24]);
    let transaction_id = u64::from_le_bytes(tid);
    if !header_len.is_multiple_of(8) {
        return Err(AuthFailure::Contents(
            "an extra header not a multiple of 8 bytes",
        ));
    }
    let end = INNER_HEADER_LEN
        .checked_add(header_len)
        .and_then(|n| n.checked_add(payload_len))
        .filter(|&n| round8(n) == plain.len())
        .ok_or(AuthFailure::Contents(
            "lengths that do not add up to the frame",
        ))?;
    if plain[end..].iter().any(|&b| b != 0) {
        return Err(AuthFailure::Contents("padding that is not zero"));
    }
    Ok(Opened {
        received: Received {
            packet_type,
            transaction_id,
            completion_requested: flags & FLAG_COMPLETION_REQUESTED != 0,
            header_len,
            payload_len: round8(payload_len),
        },
        header_at: INNER_HEADER_LEN,
        payload_at: INNER_HEADER_LEN + header_len,
        payload_padded: round8(payload_len),
    })
}

fn out_of_bounds(offset: usize, len: usize, size: usize) -> ChannelError {
    ChannelError::OutOfBounds { offset, len, size }
}

impl<L: PacketRx> PacketRx for SecureRx<L> {
    fn peek(&mut self) -> Result<Option<Received>, ChannelError> {
        if let Some(f) = self.failed {
            return Err(auth(f));
        }
        if self.opened.is_none() {
            self.opened = self.open_next()?;
        }
        Ok(self.opened.map(|o| o.received))
    }

    fn read_header(&mut self, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError> {
        let o = self.opened.ok_or(ChannelError::Empty)?;
        let size = o.received.header_len;
        let end = offset
            .checked_add(buf.len())
            .filter(|&e| e <= size)
            .ok_or(out_of_bounds(offset, buf.len(), size))?;
        buf.copy_from_slice(&self.plain[o.header_at + offset..o.header_at + end]);
        Ok(())
    }

    fn read_payload(&mut self, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError> {
        let o = self.opened.ok_or(ChannelError::Empty)?;
        let size = o.payload_padded;
        let end = offset
            .checked_add(buf.len())
            .filter(|&e| e <= size)
            .ok_or(out_of_bounds(offset, buf.len(), size))?;
        buf.copy_from_slice(&self.plain[o.payload_at + offset..o.payload_at + end]);
        Ok(())
    }

    fn consume(&mut self) {
        if self.opened.take().is_some() {
            self.head_from = None;
            self.inner.consume();
        }
    }

    fn has_uncommitted(&self) -> bool {
        self.inner.has_uncommitted()
    }

    fn commit(&mut self) -> Signal {
        self.inner.commit()
    }

    fn known_available(&self) -> bool {
        self.opened.is_some() || self.inner.known_available()
    }

    fn poll_available(&mut self) -> bool {
        self.opened.is_some() || self.failed.is_some() || self.inner.poll_available()
    }

    fn mask_interrupts(&mut self) {
        self.inner.mask_interrupts();
    }

    fn prepare_wait(&mut self) -> Result<(WaitDecision, Signal), ChannelError> {
        if self.opened.is_some() || self.failed.is_some() {
            let signal = self.inner.commit();
            return Ok((WaitDecision::Ready, signal));
        }
        self.inner.prepare_wait()
    }

    fn peer_owed_signal(&self) -> bool {
        self.inner.peer_owed_signal()
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    fn inner(packet_type: u16, header: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&packet_type.to_le_bytes());
        p.extend_from_slice(&0u16.to_le_bytes());
        p.extend_from_slice(&(header.len() as u32).to_le_bytes());
        p.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&42u64.to_le_bytes());
        p.extend_from_slice(header);
        p.extend_from_slice(payload);
        p.resize(round8(p.len()), 0);
        p
    }

    #[test]
    fn inner_headers_parse_only_when_everything_adds_up() {
        let ok = inner(6, &[], b"hello");
        let o = parse_inner(&ok).unwrap();
        assert_eq!(o.received.transaction_id, 42);
        assert_eq!(o.received.payload_len, 8);
        assert_eq!(o.payload_at, 24);
        let mut bad_pad = ok.clone();
        *bad_pad.last_mut().unwrap() = 1;
        assert_eq!(
            parse_inner(&bad_pad).map(|_| ()),
            Err(AuthFailure::Contents("padding that is not zero"))
        );
        let mut long = ok.clone();
        long[8] = 200;
        assert!(parse_inner(&long).is_err());
        let mut reserved = ok.clone();
        reserved[12] = 1;
        assert!(parse_inner(&reserved).is_err());
        assert!(parse_inner(&inner(9, &[0; 8], b"x")).is_err(), "GPA direct");
        assert!(parse_inner(&inner(0x99, &[], b"x")).is_err());
        assert!(
            parse_inner(&inner(7, &[1; 4], b"x")).is_err(),
            "header of 4 bytes"
        );
        let mut extra = ok.clone();
        extra.extend_from_slice(&[0; 8]);
        assert!(
            parse_inner(&extra).is_err(),
            "a frame longer than its contents"
        );
    }
}

#[cfg(all(test, feature = "std"))]
mod known_answer {
    use std::sync::Arc;

    use vmlink_channel::{RingRx, RingTx};
    use vmlink_ring::HeapMem;

    use super::*;
    use crate::cipher::{Cipher, RekeyLimits};

    /// The frames of a request (`call`'s in-band packet, completion requested,
    /// transaction id 7, payload "vmlink") and a new epoch with salt 0x11.., under the key
    /// 0x42.. at counter 0, as hex.
    fn frames(cipher: Cipher) -> (String, String) {
        let ring = Arc::new(HeapMem::new(4096).unwrap());
        let key = KeyState::new([0x42; 32], cipher, RekeyLimits::default());
        let mut tx = SecureTx::new(RingTx::new(ring.clone()).unwrap(), key.clone(), false);
        tx.push(&OutgoingPacket {
            meta: PacketMeta {
                packet_type: PacketType::InBand,
                flags: FLAG_COMPLETION_REQUESTED,
                transaction_id: 7,
            },
            header: &[],
            payload: Payload::Bytes(b"vmlink"),
        })
        .unwrap();
        let _ = tx.commit();
        let mut rx = RingRx::new(ring).unwrap();
        let r = rx.peek().unwrap().unwrap();
        assert_eq!((r.transaction_id, r.header_len), (FRAME_SEALED, 0));
        let mut frame = vec![0u8; r.payload_len];
        rx.read_payload(0, &mut frame).unwrap();
        let salt = [0x11; SALT_LEN];
        let mut next = key.epoch(&salt);
        let tag = next.seal_epoch(&salt).unwrap();
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        (hex(&frame), hex(&tag))
    }

    #[test]
    fn fixed_keys_give_fixed_frames() {
        let (chacha, chacha_epoch) = frames(Cipher::ChaChaPoly);
        let (aes, aes_epoch) = frames(Cipher::AesGcm);
        assert_eq!(
            chacha.len(),
            2 * (32 + TAG_LEN),
            "24 + 6 bytes padded to 32, and a tag"
        );
        assert_eq!(chacha, CHACHA_FRAME);
        assert_eq!(chacha_epoch, CHACHA_EPOCH_TAG);
        assert_eq!(aes, AES_FRAME);
        assert_eq!(aes_epoch, AES_EPOCH_TAG);
    }

    // Checked against an independent implementation of the same constructions (OpenSSL's
    // ChaCha20-Poly1305, AES-256-GCM and HKDF-SHA-256, through Python's `cryptography`).
    const CHACHA_FRAME: &str = "5f66e52b1db433cdeaa15434ff2fa8b8b9a7a4d9aa95a41c89a063bc22db20cf\
                                a1105dcdfb7a864399c3e8a1846315b3";
    const CHACHA_EPOCH_TAG: &str = "396321a1b00c478d44dc0db715a73bb3";
    const AES_FRAME: &str = "f2b2fef95c8c85e79f4f4b0f318bb551d6fee672382aabbbba558294f0651b35\
                             72bdc06183d5836e1c085b6223ae74a7";
    const AES_EPOCH_TAG: &str = "daeb78f89caefbf142a2741d5d751ec2";
}
