//! Frames in the ring under a secure channel's receiving half, from a hostile writer: a
//! script of sealed packets from the real sending half (same key), replays of them, frames
//! with bytes flipped, raw bytes of any frame kind and length, and epoch frames (real,
//! replayed or forged), injected in the script's order; then `SecureRx` (fixed key,
//! ChaCha20-Poly1305 or AES-256-GCM, a low rekey limit) reads until the ring is empty or it
//! refuses.
//!
//! Asserted:
//! - nothing panics; peeking, reading and consuming allocate nothing;
//! - every packet delivered is, in order, exactly the next one the real sender sealed
//!   (type, transaction id, completion flag, payload): nothing forged, altered, replayed,
//!   reordered or skipped is ever delivered;
//! - a refusal is `Failed(Authentication(_))`, and final: every later peek says the same.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmlink_channel::{ChannelError, FailureCause, PacketRx, PacketTx, RingRx, RingTx};
use vmlink_fuzz::no_alloc;
use vmlink_ring::protocol::{FLAG_COMPLETION_REQUESTED, PacketType};
use vmlink_ring::{HeapMem, OutgoingPacket, PacketMeta, Payload};
use vmlink_secure::{Cipher, KeyState, RekeyLimits, SecureRx, SecureTx};

const RING: usize = 16 * 4096;
const MAX_FRAME: usize = 4096;

#[derive(Debug, Arbitrary)]
enum Op {
    /// The real sender seals a packet.
    Seal { completion: bool, tid: u64, payload: Vec<u8> },
    /// A copy of an earlier frame (sealed or epoch) again.
    Replay(u8),
    /// An earlier frame with one byte flipped.
    Flip { frame: u8, at: u16, xor: u8 },
    /// Raw bytes as a frame of any kind.
    Raw { kind: u64, bytes: Vec<u8> },
    /// The real sender throws its uncommitted packets away (its next frame is an epoch).
    Rollback,
}

#[derive(Debug, Arbitrary)]
struct Input {
    aes: bool,
    rekey_every: u8,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let cipher = if input.aes { Cipher::AesGcm } else { Cipher::ChaChaPoly };
    let limits = RekeyLimits {
        packets: u64::from(input.rekey_every.max(1)),
        bytes: u64::MAX,
    };
    let key = KeyState::new([0x5c; 32], cipher, limits);

    // The real sender writes to a scratch ring; each frame it commits is copied out.
    let scratch = Arc::new(HeapMem::new(RING).unwrap());
    let mut sender = SecureTx::new(RingTx::new(scratch.clone()).unwrap(), key.clone(), false);
    let mut scratch_rx = RingRx::new(scratch).unwrap();
    // Every frame the real sender produced, as (kind, bytes).
    let mut produced: Vec<(u64, Vec<u8>)> = Vec::new();
    // What goes into the ring under test, in order, and the packets sealed, in order.
    let mut script: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut sealed: Vec<(bool, u64, Vec<u8>)> = Vec::new();
    for op in input.ops.into_iter().take(64) {
        match op {
            Op::Seal { completion, tid, mut payload } => {
                payload.truncate(512);
                let meta = PacketMeta {
                    packet_type: PacketType::InBand,
                    flags: if completion { FLAG_COMPLETION_REQUESTED } else { 0 },
                    transaction_id: tid,
                };
                sender
                    .push(&OutgoingPacket { meta, header: &[], payload: Payload::Bytes(&payload) })
                    .unwrap();
                let _ = sender.commit();
                while let Some(r) = scratch_rx.peek().unwrap() {
                    let mut f = vec![0u8; r.payload_len];
                    scratch_rx.read_payload(0, &mut f).unwrap();
                    scratch_rx.consume();
                    produced.push((r.transaction_id, f.clone()));
                    script.push((r.transaction_id, f));
                }
                let _ = scratch_rx.commit();
                payload.resize(payload.len().next_multiple_of(8), 0);
                sealed.push((completion, tid, payload));
            }
            Op::Replay(i) => {
                if let Some(f) = produced.get(usize::from(i)).cloned() {
                    script.push(f);
                }
            }
            Op::Flip { frame, at, xor } => {
                if let Some((kind, mut f)) = produced.get(usize::from(frame)).cloned() {
                    if !f.is_empty() && xor != 0 {
                        let i = usize::from(at) % f.len();
                        f[i] ^= xor;
                        script.push((kind, f));
                    }
                }
            }
            Op::Raw { kind, mut bytes } => {
                bytes.truncate(MAX_FRAME + 64);
                script.push((kind, bytes));
            }
            Op::Rollback => {
                sender.push(&OutgoingPacket::in_band_slice(b"never committed")).unwrap();
                sender.rollback();
            }
        }
    }

    // The ring under test, filled by a writer that ignores the layer.
    let ring = Arc::new(HeapMem::new(RING).unwrap());
    let mut raw = RingTx::new(ring.clone()).unwrap();
    for (kind, bytes) in &script {
        let packet = OutgoingPacket {
            meta: PacketMeta { packet_type: PacketType::InBand, flags: 0, transaction_id: *kind },
            header: &[],
            payload: Payload::Bytes(bytes),
        };
        if raw.push(&packet).is_err() {
            break; // the ring is full: the rest is never written
        }
    }
    let _ = raw.commit();

    let mut rx = SecureRx::new(RingRx::new(ring).unwrap(), key, MAX_FRAME);
    let mut delivered = 0usize;
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        match no_alloc("peek", || rx.peek()) {
            Ok(None) => break,
            Ok(Some(r)) => {
                let (completion, tid, payload) =
                    sealed.get(delivered).expect("delivered more packets than were sealed");
                assert_eq!(r.packet_type, PacketType::InBand);
                assert_eq!(r.transaction_id, *tid);
                assert_eq!(r.completion_requested, *completion);
                assert_eq!(r.header_len, 0);
                assert_eq!(r.payload_len, payload.len());
                let got = &mut buf[..r.payload_len];
                no_alloc("read_payload", || rx.read_payload(0, got)).unwrap();
                assert_eq!(&got[..], &payload[..], "packet {delivered}");
                no_alloc("consume", || rx.consume());
                delivered += 1;
            }
            Err(e) => {
                assert!(
                    matches!(e, ChannelError::Failed(FailureCause::Authentication(_))),
                    "{e}"
                );
                assert_eq!(rx.peek().unwrap_err(), e, "a refusal is final");
                break;
            }
        }
    }
});
