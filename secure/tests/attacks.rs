//! What an attacker who can write the shared memory, or who plays the peer, can try, and the
//! typed error each attempt meets. Nothing of a refused packet is delivered.
#![cfg(feature = "std")]

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use vmlink_channel::{
    AuthFailure, Channel, ChannelError, ChannelState, Config, FailureCause, InProcessDoorbell,
    PacketRx, PacketTx, RingRx, RingTx, Wait, in_process_pair,
};
use vmlink_ring::protocol::PacketType;
use vmlink_ring::{ControlWord, HeapMem, OutgoingPacket, PacketMeta, Payload, RingMem};
use vmlink_secure::{
    AuthorizedKeys, Cipher, Credentials, HandshakeRole, KeyState, Keypair, Pattern, RekeyLimits,
    SecureConfig, SecureEndpoint, SecureError, SecureRx, SecureTx, Zeroizing, establish,
    restore_layer,
};

type Ring = Arc<HeapMem>;
type Plain = Channel<Ring, InProcessDoorbell>;
type Secure = SecureEndpoint<RingTx<Ring>, RingRx<Ring>, InProcessDoorbell>;

const RING: usize = 16 * 4096;

/// Two plain channels over two heap rings, and the rings (guest→host, host→guest).
fn plain_pair() -> (Plain, Plain, Ring, Ring) {
    let g2h = Arc::new(HeapMem::new(RING).unwrap());
    let h2g = Arc::new(HeapMem::new(RING).unwrap());
    let (dg, dh) = in_process_pair();
    let guest = Channel::new(g2h.clone(), h2g.clone(), dg, Config::default()).unwrap();
    let host = Channel::new(h2g.clone(), g2h.clone(), dh, Config::default()).unwrap();
    (guest, host, g2h, h2g)
}

fn static_creds(local: &Keypair, peer: &Keypair) -> Credentials {
    Credentials::Static {
        local: local.clone(),
        authorized: AuthorizedKeys::new([peer.public()]),
    }
}

/// A guest (initiator) and host (responder) handshake on their own threads.
fn handshake(
    guest: Plain,
    host: Plain,
    guest_creds: Credentials,
    host_creds: Credentials,
    guest_config: SecureConfig,
    host_config: SecureConfig,
) -> (Result<Secure, SecureError>, Result<Secure, SecureError>) {
    let g = thread::spawn(move || {
        establish(guest, HandshakeRole::Initiator, &guest_creds, &guest_config).map(|e| e.endpoint)
    });
    let h =
        establish(host, HandshakeRole::Responder, &host_creds, &host_config).map(|e| e.endpoint);
    (g.join().unwrap(), h)
}

fn secure_pair() -> (Secure, Secure, Ring, Ring) {
    let (guest, host, g2h, h2g) = plain_pair();
    let (gk, hk) = (Keypair::generate(), Keypair::generate());
    let (g, h) = handshake(
        guest,
        host,
        static_creds(&gk, &hk),
        static_creds(&hk, &gk),
        SecureConfig::default(),
        SecureConfig::default(),
    );
    (g.unwrap(), h.unwrap(), g2h, h2g)
}

fn authentication(e: &ChannelError) -> Option<AuthFailure> {
    match e {
        ChannelError::Failed(FailureCause::Authentication(a)) => Some(*a),
        _ => None,
    }
}

/// Asserts that `host`'s next receive fails with `expected`, that the channel stays failed
/// with it, and that nothing was delivered.
fn refused(host: &Secure, expected: AuthFailure, received_before: u64) {
    let mut buf = [0u8; 256];
    let e = host.recv(&mut buf, Wait::Now).unwrap_err();
    assert_eq!(authentication(&e), Some(expected), "{e}");
    assert_eq!(
        host.state(),
        ChannelState::Failed(FailureCause::Authentication(expected))
    );
    assert_eq!(
        host.counters().packets_received,
        received_before,
        "nothing delivered"
    );
    let again = host.recv(&mut buf, Wait::Now).unwrap_err();
    assert_eq!(
        authentication(&again),
        Some(expected),
        "the failure is final"
    );
}

/// The read index of `ring`: where its next unread packet starts.
fn read_index(ring: &Ring) -> usize {
    ring.load_control(ControlWord::ReadIndex) as usize
}

/// Seals `payloads` as a sender under `key` would, on a scratch ring, and returns each
/// frame's bytes as the ring carries them.
fn frames(key: &KeyState, payloads: &[&[u8]]) -> Vec<Vec<u8>> {
    let scratch = Arc::new(HeapMem::new(RING).unwrap());
    let mut tx = SecureTx::new(RingTx::new(scratch.clone()).unwrap(), key.clone(), false);
    for p in payloads {
        tx.push(&OutgoingPacket::in_band_slice(p)).unwrap();
    }
    let _ = tx.commit();
    let mut rx = RingRx::new(scratch).unwrap();
    let mut out = Vec::new();
    while let Some(r) = rx.peek().unwrap() {
        let mut f = vec![0u8; r.payload_len];
        rx.read_payload(0, &mut f).unwrap();
        out.push(f);
        rx.consume();
    }
    out
}

/// Writes raw frames into `ring` as a writer that ignores the layer would.
fn inject(ring: &Ring, frames: &[&[u8]]) {
    let mut raw = RingTx::new(ring.clone()).unwrap();
    for f in frames {
        raw.push(&OutgoingPacket {
            meta: PacketMeta {
                packet_type: PacketType::InBand,
                flags: 0,
                transaction_id: 0,
            },
            header: &[],
            payload: Payload::Bytes(f),
        })
        .unwrap();
    }
    let _ = raw.commit();
}

/// A receiving layer with fixed keys over a fresh ring, and the ring.
fn fixed_receiver(key: &KeyState) -> (Ring, SecureRx<RingRx<Ring>>) {
    let ring = Arc::new(HeapMem::new(RING).unwrap());
    let rx = SecureRx::new(RingRx::new(ring.clone()).unwrap(), key.clone(), RING);
    (ring, rx)
}

fn key() -> KeyState {
    KeyState::new([0x42; 32], Cipher::ChaChaPoly, RekeyLimits::default())
}

fn next_payload(rx: &mut SecureRx<RingRx<Ring>>) -> Result<Vec<u8>, ChannelError> {
    let r = rx.peek()?.ok_or(ChannelError::Empty)?;
    let mut p = vec![0u8; r.payload_len];
    rx.read_payload(0, &mut p)?;
    rx.consume();
    Ok(p)
}

#[test]
fn a_sealed_channel_carries_calls_and_the_ring_holds_no_plaintext() {
    let (guest, host, g2h, _) = secure_pair();
    let secret = b"tenant data that must not show in the ring";
    let server = thread::spawn(move || {
        let mut buf = [0u8; 256];
        for _ in 0..100 {
            let req = host.recv(&mut buf, None).unwrap();
            let answer: Vec<u8> = req.payload(&buf).iter().rev().copied().collect();
            host.complete(req.transaction_id, &answer, None).unwrap();
        }
        host
    });
    let mut reply = [0u8; 256];
    for i in 0..100u8 {
        let mut request = secret.to_vec();
        request.push(i);
        let n = guest.call(&request, &mut reply, None).unwrap();
        let padded_len = request.len().next_multiple_of(8);
        assert_eq!(n, padded_len);
        let want: Vec<u8> = {
            let mut p = request.clone();
            p.resize(padded_len, 0);
            p.into_iter().rev().collect()
        };
        assert_eq!(&reply[..n], &want[..]);
    }
    let _host = server.join().unwrap();
    // The guest→host ring's whole data area: no run of the secret anywhere.
    let mut data = vec![0u8; RING];
    g2h.read_data(0, &mut data);
    assert!(
        !data.windows(16).any(|w| secret.windows(16).any(|s| s == w)),
        "plaintext in the ring"
    );
}

#[test]
fn a_tampered_ciphertext_fails_the_channel_and_delivers_nothing() {
    let (guest, host, g2h, _) = secure_pair();
    guest.send(b"first, intact", Wait::Now).unwrap();
    let mut buf = [0u8; 64];
    host.recv(&mut buf, Wait::Now).unwrap();
    guest.send(b"second, to be altered", Wait::Now).unwrap();
    // Flip one ciphertext bit of the unread packet (past its 16-byte descriptor).
    let at = (read_index(&g2h) + 16 + 5) % RING;
    let mut b = [0u8; 8];
    let word = at & !7;
    g2h.read_data(word, &mut b);
    b[at - word] ^= 0x01;
    g2h.write_data(word, &b);
    refused(&host, AuthFailure::Tag, 1);
}

#[test]
fn a_tampered_tag_or_frame_kind_fails_too() {
    let (guest, host, g2h, _) = secure_pair();
    guest.send(&[7u8; 40], Wait::Now).unwrap();
    // The frame: 24-byte inner header + 40 bytes, then the 16-byte tag; flip the tag's last byte.
    let at = (read_index(&g2h) + 16 + 64 + 15) % RING;
    let word = at & !7;
    let mut b = [0u8; 8];
    g2h.read_data(word, &mut b);
    b[at - word] ^= 0x80;
    g2h.write_data(word, &b);
    refused(&host, AuthFailure::Tag, 0);

    let (guest, host, g2h, _) = secure_pair();
    guest.send(b"x", Wait::Now).unwrap();
    // The descriptor's transaction id (offset 8): a frame kind nobody writes.
    let at = (read_index(&g2h) + 8) % RING;
    g2h.write_data(at, &7u64.to_le_bytes());
    refused(&host, AuthFailure::Frame("an unknown frame kind"), 0);
}

#[test]
fn replayed_reordered_and_dropped_packets_are_refused() {
    let k = key();
    let f = frames(&k, &[b"packet A", b"packet B", b"packet C"]);

    // In order: all three.
    let (ring, mut rx) = fixed_receiver(&k);
    inject(&ring, &[&f[0], &f[1], &f[2]]);
    for want in [b"packet A", b"packet B", b"packet C"] {
        assert_eq!(&next_payload(&mut rx).unwrap()[..8], want);
    }

    // Replayed: A twice.
    let (ring, mut rx) = fixed_receiver(&k);
    inject(&ring, &[&f[0], &f[0]]);
    assert_eq!(&next_payload(&mut rx).unwrap()[..8], b"packet A");
    assert_eq!(
        authentication(&next_payload(&mut rx).unwrap_err()),
        Some(AuthFailure::Tag)
    );

    // Reordered: B before A.
    let (ring, mut rx) = fixed_receiver(&k);
    inject(&ring, &[&f[1], &f[0]]);
    assert_eq!(
        authentication(&next_payload(&mut rx).unwrap_err()),
        Some(AuthFailure::Tag)
    );
    assert_eq!(
        authentication(&next_payload(&mut rx).unwrap_err()),
        Some(AuthFailure::Tag),
        "and nothing after it either"
    );

    // Dropped: A never arrives.
    let (ring, mut rx) = fixed_receiver(&k);
    inject(&ring, &[&f[1], &f[2]]);
    assert_eq!(
        authentication(&next_payload(&mut rx).unwrap_err()),
        Some(AuthFailure::Tag)
    );

    // Sealed under another key.
    let other = KeyState::new([0x43; 32], Cipher::ChaChaPoly, RekeyLimits::default());
    let (ring, mut rx) = fixed_receiver(&k);
    inject(&ring, &[&frames(&other, &[b"packet A"])[0]]);
    assert_eq!(
        authentication(&next_payload(&mut rx).unwrap_err()),
        Some(AuthFailure::Tag)
    );

    // Not a frame at all: shorter than a header and a tag, and longer than the bound.
    let (ring, mut rx) = fixed_receiver(&k);
    inject(&ring, &[&[0u8; 16]]);
    assert!(matches!(
        authentication(&next_payload(&mut rx).unwrap_err()),
        Some(AuthFailure::Frame(_))
    ));
    let small = Arc::new(HeapMem::new(RING).unwrap());
    let mut rx = SecureRx::new(RingRx::new(small.clone()).unwrap(), k.clone(), 64);
    inject(&small, &[&[0u8; 128]]);
    assert_eq!(
        authentication(&next_payload(&mut rx).unwrap_err()),
        Some(AuthFailure::TooLarge { len: 128, max: 64 })
    );
}

#[test]
fn both_sides_rekey_together_and_a_peer_that_skips_the_rekey_is_refused() {
    let low = RekeyLimits {
        packets: 4,
        bytes: u64::MAX,
    };
    let config = SecureConfig {
        rekey: low,
        ..SecureConfig::default()
    };
    let (guest, host, _, _) = plain_pair();
    let (gk, hk) = (Keypair::generate(), Keypair::generate());
    let (g, h) = handshake(
        guest,
        host,
        static_creds(&gk, &hk),
        static_creds(&hk, &gk),
        config,
        config,
    );
    let (guest, host) = (g.unwrap(), h.unwrap());
    let mut buf = [0u8; 64];
    for i in 0..50u32 {
        guest.send(&i.to_le_bytes(), Wait::Now).unwrap();
        let got = host.recv(&mut buf, Wait::Now).unwrap();
        assert_eq!(got.payload(&buf)[..4], i.to_le_bytes());
    }

    // A sender that rekeys every 4 packets, a receiver that expects the default.
    let sender = KeyState::new([9; 32], Cipher::AesGcm, low);
    let receiver = KeyState::new([9; 32], Cipher::AesGcm, RekeyLimits::default());
    let payloads: Vec<[u8; 8]> = (0..6u64).map(|i| i.to_le_bytes()).collect();
    let refs: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
    let f = frames(&sender, &refs);
    let (ring, mut rx) = fixed_receiver(&receiver);
    let all: Vec<&[u8]> = f.iter().map(Vec::as_slice).collect();
    inject(&ring, &all);
    for i in 0..4u64 {
        assert_eq!(next_payload(&mut rx).unwrap(), i.to_le_bytes());
    }
    assert_eq!(
        authentication(&next_payload(&mut rx).unwrap_err()),
        Some(AuthFailure::Tag)
    );
}

#[test]
fn wrong_and_unknown_static_keys_are_refused_by_name() {
    // The guest expects another host key: it refuses as soon as the host's key arrives.
    let (guest, host, _, _) = plain_pair();
    let (gk, hk, stranger) = (
        Keypair::generate(),
        Keypair::generate(),
        Keypair::generate(),
    );
    let short = SecureConfig {
        handshake_timeout: Duration::from_secs(2),
        ..SecureConfig::default()
    };
    let (g, h) = handshake(
        guest,
        host,
        static_creds(&gk, &stranger),
        static_creds(&hk, &gk),
        short,
        short,
    );
    match g {
        Err(SecureError::UnknownKey { fingerprint }) => {
            assert_eq!(fingerprint, hk.public().fingerprint())
        }
        other => panic!("{other:?}"),
    }
    // The host never got the last message: the guest's channel was dropped.
    assert!(matches!(h, Err(SecureError::PeerClosed)), "{h:?}");

    // The host does not know the guest.
    let (guest, host, _, _) = plain_pair();
    let (g, h) = handshake(
        guest,
        host,
        static_creds(&gk, &hk),
        static_creds(&hk, &stranger),
        short,
        short,
    );
    match h {
        Err(SecureError::UnknownKey { fingerprint }) => {
            assert_eq!(fingerprint, gk.public().fingerprint())
        }
        other => panic!("{other:?}"),
    }
    // The guest hears it from its own handshake: the host closed before it was ready.
    assert!(matches!(g, Err(SecureError::PeerClosed)), "{g:?}");
}

#[test]
fn ik_with_the_wrong_host_key_and_psk_mismatches_fail_the_handshake() {
    let ik = SecureConfig {
        pattern: Pattern::IK,
        handshake_timeout: Duration::from_secs(2),
        ..SecureConfig::default()
    };
    let (gk, hk, stranger) = (
        Keypair::generate(),
        Keypair::generate(),
        Keypair::generate(),
    );
    // Works with the right key.
    let (guest, host, _, _) = plain_pair();
    let (g, h) = handshake(
        guest,
        host,
        static_creds(&gk, &hk),
        static_creds(&hk, &gk),
        ik,
        ik,
    );
    let (g, h) = (g.unwrap(), h.unwrap());
    g.send(b"ik", Wait::Now).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        &h.recv(&mut buf, Wait::Now).unwrap().payload(&buf)[..2],
        b"ik"
    );
    // The guest encrypts to a key the host does not hold.
    let (guest, host, _, _) = plain_pair();
    let (_, h) = handshake(
        guest,
        host,
        static_creds(&gk, &stranger),
        static_creds(&hk, &gk),
        ik,
        ik,
    );
    assert!(matches!(h, Err(SecureError::Handshake(_))), "{h:?}");

    let psk = SecureConfig {
        pattern: Pattern::NNpsk0,
        handshake_timeout: Duration::from_secs(2),
        ..SecureConfig::default()
    };
    let (guest, host, _, _) = plain_pair();
    let (g, h) = handshake(
        guest,
        host,
        Credentials::Psk(Zeroizing::new([1; 32])),
        Credentials::Psk(Zeroizing::new([1; 32])),
        psk,
        psk,
    );
    assert!(g.is_ok() && h.is_ok());
    let (guest, host, _, _) = plain_pair();
    let (_, h) = handshake(
        guest,
        host,
        Credentials::Psk(Zeroizing::new([1; 32])),
        Credentials::Psk(Zeroizing::new([2; 32])),
        psk,
        psk,
    );
    assert!(matches!(h, Err(SecureError::Handshake(_))), "{h:?}");
    // Credentials that do not fit the pattern.
    let (_, host, _, _) = plain_pair();
    let e = establish(
        host,
        HandshakeRole::Responder,
        &Credentials::Psk(Zeroizing::new([1; 32])),
        &SecureConfig::default(),
    );
    assert!(matches!(e, Err(SecureError::Credentials(_))));
}

#[test]
fn another_cipher_truncated_and_garbage_handshakes_are_typed_errors() {
    let (gk, hk) = (Keypair::generate(), Keypair::generate());
    let short = SecureConfig {
        handshake_timeout: Duration::from_secs(1),
        ..SecureConfig::default()
    };
    // The guest asks for AES-GCM, the host runs ChaCha20-Poly1305.
    let (guest, host, _, _) = plain_pair();
    let aes = SecureConfig {
        cipher: Cipher::AesGcm,
        ..short
    };
    let (_, h) = handshake(
        guest,
        host,
        static_creds(&gk, &hk),
        static_creds(&hk, &gk),
        aes,
        short,
    );
    match h {
        Err(SecureError::Mismatch { ours, theirs }) => {
            assert_eq!(ours, "Noise_XX_25519_ChaChaPoly_SHA256");
            assert_eq!(theirs, "Noise_XX_25519_AESGCM_SHA256");
        }
        other => panic!("{other:?}"),
    }

    let name = b"Noise_XX_25519_ChaChaPoly_SHA256";
    let framed = |bytes: &[u8], claimed: u32| {
        let mut m = claimed.to_le_bytes().to_vec();
        m.extend_from_slice(bytes);
        m
    };
    let creds = static_creds(&hk, &gk);
    let cases: [(&str, Vec<Vec<u8>>); 4] = [
        (
            "garbage instead of the protocol name",
            vec![b"\x01\x02garbage".to_vec()],
        ),
        (
            "a length past what arrived",
            vec![framed(name, 32), framed(&[0; 10], 100)],
        ),
        (
            "a Noise message cut short",
            vec![framed(name, 32), framed(&[0x5a; 20], 20)],
        ),
        (
            // Any 32 bytes pass as XX's first message (an ephemeral key): the third, sealed
            // under keys this garbage cannot have, is where it fails.
            "garbage as the third Noise message",
            vec![
                framed(name, 32),
                framed(&[0xa5; 32], 32),
                framed(&[0x3c; 64], 64),
            ],
        ),
    ];
    for (what, messages) in cases {
        let (guest, host, _, _) = plain_pair();
        for m in &messages {
            guest.send(m, Wait::Now).unwrap();
        }
        let r = establish(host, HandshakeRole::Responder, &creds, &short);
        assert!(
            matches!(
                r,
                Err(SecureError::Handshake(_) | SecureError::Mismatch { .. })
            ),
            "{what}: {r:?}"
        );
        drop(guest);
    }
    // A peer that stops half way: the handshake times out, or sees the close.
    let (guest, host, _, _) = plain_pair();
    guest.send(&framed(name, 32), Wait::Now).unwrap();
    let r = establish(host, HandshakeRole::Responder, &creds, &short);
    assert!(
        matches!(r, Err(SecureError::Channel(ChannelError::TimedOut))),
        "{r:?}"
    );
    drop(guest);
}

#[test]
fn gpa_direct_packets_are_refused_on_a_secure_channel() {
    let (guest, _host, _, _) = secure_pair();
    let pages = [0u64];
    let range = vmlink_channel::packet::GpaRange {
        byte_offset: 0,
        byte_count: 8,
        pages: &pages,
    };
    let e = guest
        .send_gpa_direct(&[range], b"x", PacketMeta::in_band(), Wait::Now)
        .unwrap_err();
    assert!(matches!(e, ChannelError::Unsupported { .. }), "{e}");
}

#[test]
fn a_restored_layer_starts_a_new_epoch_and_never_repeats_a_nonce() {
    let k = key();
    // Two successors restored from the same state (a hand-over that went wrong): each
    // sends its first packet. Under one key and counter their ciphertexts would be two
    // plaintexts under one keystream; with fresh epochs they are not.
    let mut sent = Vec::new();
    for _ in 0..2 {
        let ring = Arc::new(HeapMem::new(RING).unwrap());
        let other = Arc::new(HeapMem::new(RING).unwrap());
        let (mut tx, _rx) = restore_layer(
            RingTx::new(ring.clone()).unwrap(),
            RingRx::new(other).unwrap(),
            k.clone(),
            k.clone(),
        );
        tx.push(&OutgoingPacket::in_band_slice(&[0u8; 32])).unwrap();
        let _ = tx.commit();
        let mut raw = RingRx::new(ring.clone()).unwrap();
        let epoch = raw.peek().unwrap().unwrap();
        assert_eq!(epoch.transaction_id, 1, "an epoch frame first");
        raw.consume();
        let data = raw.peek().unwrap().unwrap();
        let mut frame = vec![0u8; data.payload_len];
        raw.read_payload(0, &mut frame).unwrap();
        sent.push(frame);

        // The peer, still at the old key, follows the epoch and reads the packet.
        let mut peer = SecureRx::new(RingRx::new(ring).unwrap(), k.clone(), RING);
        assert_eq!(next_payload(&mut peer).unwrap(), vec![0u8; 32]);
    }
    assert_ne!(sent[0], sent[1], "two restores seal under two keys");
}

#[test]
fn a_rollback_never_reuses_the_nonces_it_threw_away() {
    let k = key();
    let ring = Arc::new(HeapMem::new(RING).unwrap());
    let mut tx = SecureTx::new(RingTx::new(ring.clone()).unwrap(), k.clone(), false);
    tx.push(&OutgoingPacket::in_band_slice(b"kept")).unwrap();
    let _ = tx.commit();
    // Written to the ring under counter 1, never committed.
    tx.push(&OutgoingPacket::in_band_slice(b"thrown away"))
        .unwrap();
    tx.rollback();
    tx.push(&OutgoingPacket::in_band_slice(b"sent instead"))
        .unwrap();
    let _ = tx.commit();
    let mut raw = RingRx::new(ring.clone()).unwrap();
    let kinds: Vec<u64> = std::iter::from_fn(|| {
        let r = raw.peek().unwrap()?;
        raw.consume();
        Some(r.transaction_id)
    })
    .collect();
    assert_eq!(kinds, [0, 1, 0], "kept, a new epoch, then the next packet");
    let mut rx = SecureRx::new(RingRx::new(ring).unwrap(), k, RING);
    assert_eq!(&next_payload(&mut rx).unwrap()[..4], b"kept");
    assert_eq!(&next_payload(&mut rx).unwrap()[..12], b"sent instead");
}

#[test]
fn a_full_ring_rewinds_the_counter_even_across_a_rekey() {
    // A rekey every 2 packets, a ring that fills after a few: every refused push leaves
    // the counter (and key) where they were, so the receiver reads every packet in order.
    let limits = RekeyLimits {
        packets: 2,
        bytes: u64::MAX,
    };
    let k = KeyState::new([0x24; 32], Cipher::ChaChaPoly, limits);
    let ring = Arc::new(HeapMem::new(4096).unwrap());
    let mut tx = SecureTx::new(RingTx::new(ring.clone()).unwrap(), k.clone(), false);
    let mut rx = SecureRx::new(RingRx::new(ring).unwrap(), k, 4096);
    let mut sent = 0u32;
    let mut received = 0u32;
    let mut refusals = 0;
    while received < 200 {
        loop {
            let payload = [sent as u8; 600];
            match tx.push(&OutgoingPacket::in_band_slice(&payload)) {
                Ok(_) => sent += 1,
                Err(ChannelError::Full) => {
                    refusals += 1;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        let _ = tx.commit();
        while let Ok(p) = next_payload(&mut rx) {
            assert_eq!(p[..600], [received as u8; 600], "packet {received}");
            received += 1;
        }
        let _ = rx.commit();
    }
    assert!(refusals > 10, "the ring filled again and again: {refusals}");
    assert!(tx.key_state().generation() >= 100, "and rekeyed all along");
}

/// Open fds of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count() - 1
}

/// Shared-memory mappings of this process (vmlink-shm's memfds).
fn memfd_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains("memfd:"))
        .count()
}

#[test]
fn failed_handshakes_over_shared_memory_release_every_fd_and_mapping() {
    use std::os::unix::net::UnixStream;
    use vmlink_shm::{Guest, Layout, Service};
    // The monitor's socket is one per process and stays: not what is counted here.
    vmlink_shm::monitor::disable();
    let (gk, hk, stranger) = (
        Keypair::generate(),
        Keypair::generate(),
        Keypair::generate(),
    );
    let short = SecureConfig {
        handshake_timeout: Duration::from_secs(2),
        ..SecureConfig::default()
    };
    let attempt = |guest_creds: Credentials| {
        let (a, b) = UnixStream::pair().unwrap();
        let host = thread::spawn(move || {
            Service::new("sealed")
                .with_layout(Layout::symmetric(8 * 4096, 0))
                .serve_stream(a)
        });
        let guest = Guest::new("sealed").connect_stream(b).unwrap();
        let host = host.join().unwrap().unwrap();
        let host_creds = static_creds(&hk, &gk);
        let (g, h) = thread::scope(|s| {
            let g = s.spawn(|| {
                establish(
                    guest.into_parts().0,
                    HandshakeRole::Initiator,
                    &guest_creds,
                    &short,
                )
                .map(|e| e.endpoint)
            });
            let h = establish(
                host.into_parts().0,
                HandshakeRole::Responder,
                &host_creds,
                &short,
            )
            .map(|e| e.endpoint);
            (g.join().unwrap(), h)
        });
        (g.is_ok(), h.is_ok())
    };
    // Once, to settle whatever is made on first use.
    assert_eq!(attempt(static_creds(&gk, &hk)), (true, true));
    let (fds, maps) = (open_fds(), memfd_mappings());
    for _ in 0..10 {
        assert_eq!(
            attempt(static_creds(&stranger, &hk)),
            (false, false),
            "a key the host refuses"
        );
        assert_eq!(
            attempt(static_creds(&gk, &stranger)),
            (false, false),
            "a host the guest refuses"
        );
    }
    assert_eq!(open_fds(), fds, "no fd left behind");
    assert_eq!(memfd_mappings(), maps, "no mapping left behind");
}
