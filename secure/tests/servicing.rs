//! Servicing a secure channel: the layer taken off a live endpoint, the keys carried as
//! bytes, the layer put back on (as a successor process does after a hand-over), with
//! packets in both directions, a frame opened but not consumed, a rekey right at the
//! hand-over and a call in flight; and the saved keys' form against hostile bytes.
#![cfg(feature = "std")]

use vmlink_channel::{ChannelError, Config, InProcessChannel, Wait, in_process_channel_pair};
use vmlink_secure::servicing::{
    SAVED_KEYS_LEN, SAVED_KEYS_VERSION, SavedKeys, SavedKeysError, put_on, take_off,
};
use vmlink_secure::{Cipher, KeyState, RekeyLimits, SecureConfig, SecureEndpoint, establish_pair};

type Secure = SecureEndpoint<
    <InProcessChannel as Parts>::T,
    <InProcessChannel as Parts>::R,
    <InProcessChannel as Parts>::D,
>;

/// The link and doorbell types of an in-process channel.
trait Parts {
    type T;
    type R;
    type D;
}
impl<T, R, D> Parts for vmlink_channel::Endpoint<T, R, D> {
    type T = T;
    type R = R;
    type D = D;
}

fn pair(rekey: RekeyLimits) -> (Secure, Secure) {
    let (a, b) = in_process_channel_pair(16 * 4096, Config::default()).unwrap();
    let config = SecureConfig {
        rekey,
        ..SecureConfig::default()
    };
    let (i, r) = establish_pair(a, b, &config).unwrap();
    (i.endpoint, r.endpoint)
}

/// The host's side goes through a hand-over: off, to bytes, from bytes, on.
fn service(host: Secure) -> Secure {
    let (plain, keys) = take_off(host).unwrap();
    let bytes = keys.to_bytes();
    put_on(plain, &SavedKeys::from_bytes(&bytes[..]).unwrap()).unwrap()
}

fn numbered(i: u32) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[..4].copy_from_slice(&i.to_le_bytes());
    p[4..].fill(i as u8);
    p
}

#[test]
fn every_packet_arrives_exactly_once_across_repeated_servicing() {
    let (guest, mut host) = pair(RekeyLimits {
        packets: 5,
        bytes: u64::MAX,
    });
    let mut buf = [0u8; 64];
    let (mut to_host, mut to_guest) = (0u32, 0u32);
    let (mut got_host, mut got_guest) = (0u32, 0u32);
    for round in 0..20 {
        for _ in 0..3 {
            guest.send(&numbered(to_host), Wait::Now).unwrap();
            to_host += 1;
            host.send(&numbered(to_guest), Wait::Now).unwrap();
            to_guest += 1;
        }
        // Some arrive before the hand-over, the rest after it.
        for _ in 0..(round % 3) {
            let r = host.recv(&mut buf, Wait::Now).unwrap();
            assert_eq!(r.payload(&buf)[..16], numbered(got_host), "round {round}");
            got_host += 1;
        }
        if round % 2 == 0 {
            // The next frame opened but not consumed: too small a buffer leaves it queued.
            let mut tiny = [0u8; 4];
            assert!(matches!(
                host.recv(&mut tiny, Wait::Now),
                Err(ChannelError::BufferTooSmall { .. })
            ));
        }
        host = service(host);
        while got_guest < to_guest {
            let r = guest.recv(&mut buf, Wait::Now).unwrap();
            assert_eq!(r.payload(&buf)[..16], numbered(got_guest), "round {round}");
            got_guest += 1;
        }
    }
    while got_host < to_host {
        let r = host.recv(&mut buf, Wait::Now).unwrap();
        assert_eq!(r.payload(&buf)[..16], numbered(got_host));
        got_host += 1;
    }
    assert!(matches!(
        host.recv(&mut buf, Wait::Now),
        Err(ChannelError::Empty)
    ));
    assert!(matches!(
        guest.recv(&mut buf, Wait::Now),
        Err(ChannelError::Empty)
    ));
    assert_eq!((got_host, got_guest), (60, 60));
}

#[test]
fn a_frame_that_rekeyed_on_opening_is_read_again_under_the_old_key() {
    // The third frame is the last under the first key: opening it rekeys the receiver.
    let (guest, host) = pair(RekeyLimits {
        packets: 3,
        bytes: u64::MAX,
    });
    let mut buf = [0u8; 64];
    for i in 0..4 {
        guest.send(&numbered(i), Wait::Now).unwrap();
    }
    for i in 0..2 {
        assert_eq!(
            host.recv(&mut buf, Wait::Now).unwrap().payload(&buf)[..16],
            numbered(i)
        );
    }
    let mut tiny = [0u8; 4];
    assert!(
        host.recv(&mut tiny, Wait::Now).is_err(),
        "frame 2 opened, left queued"
    );
    let host = service(host);
    for i in 2..4 {
        assert_eq!(
            host.recv(&mut buf, Wait::Now).unwrap().payload(&buf)[..16],
            numbered(i)
        );
    }
}

#[test]
fn a_call_in_flight_is_completed_after_servicing() {
    let (guest, host) = pair(RekeyLimits::default());
    let tid = guest.start_request(b"status?", Wait::Now).unwrap();
    let host = service(host);
    let mut buf = [0u8; 64];
    let request = host.recv(&mut buf, Wait::Now).unwrap();
    assert!(request.completion_requested);
    host.complete(request.transaction_id, b"fine", Wait::Now)
        .unwrap();
    let done = guest.recv(&mut buf, Wait::Now).unwrap();
    assert_eq!(done.transaction_id, tid);
    assert_eq!(&done.payload(&buf)[..4], b"fine");
}

#[test]
fn a_successor_never_seals_under_a_nonce_its_predecessor_used() {
    // The predecessor sealed packets it never committed (thrown away by the save); the
    // successor's first packet must not reuse those nonces under the same key: it starts
    // a new epoch, which the peer follows.
    let (guest, host) = pair(RekeyLimits::default());
    {
        let mut batch = host.batch().unwrap();
        batch.push_in_band(b"never committed").unwrap();
        // Dropped uncommitted: rolled back.
    }
    let (plain, keys) = take_off(host).unwrap();
    let before = keys.tx.generation();
    let host = put_on(plain, &keys).unwrap();
    host.send(b"after", Wait::Now).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(
        &guest.recv(&mut buf, Wait::Now).unwrap().payload(&buf)[..5],
        b"after"
    );
    let (_, after) = take_off(host).unwrap();
    assert!(
        after.tx.generation() > before,
        "a new epoch after the restore"
    );
}

fn sample_keys() -> SavedKeys {
    let limits = RekeyLimits {
        packets: 1000,
        bytes: 1 << 30,
    };
    SavedKeys {
        tx: KeyState::new([0x11; 32], Cipher::ChaChaPoly, limits),
        rx: KeyState::new([0x22; 32], Cipher::AesGcm, limits),
    }
}

#[test]
fn the_saved_keys_form_is_pinned() {
    let bytes = sample_keys().to_bytes();
    assert_eq!(bytes.len(), SAVED_KEYS_LEN);
    assert_eq!(&bytes[..10], b"VMLKSKEY\x01\x00");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    // Per direction: key, counter, packets and bytes since the rekey, generation (zero
    // here), the limits (1000 packets, 2^30 bytes), the cipher byte and seven zeros.
    let direction = |key: &str, cipher: &str| {
        [
            key.repeat(32),
            "00".repeat(32),
            "e803000000000000".to_owned(),
            "0000004000000000".to_owned(),
            cipher.to_owned(),
            "00".repeat(7),
        ]
        .concat()
    };
    let expected = [
        "564d4c4b534b4559".to_owned(), // VMLKSKEY
        "0100".to_owned(),             // version 1
        "00".repeat(6),
        direction("11", "00"),
        direction("22", "01"),
    ]
    .concat();
    assert_eq!(hex, expected);
    let back = SavedKeys::from_bytes(&bytes[..]).unwrap();
    assert_eq!(back.to_bytes()[..], bytes[..]);
}

#[test]
fn hostile_saved_keys_are_typed_errors() {
    let good = sample_keys().to_bytes();
    assert!(matches!(
        SavedKeys::from_bytes(&good[..SAVED_KEYS_LEN - 1]),
        Err(SavedKeysError::Length { .. })
    ));
    assert!(matches!(
        SavedKeys::from_bytes(&[]),
        Err(SavedKeysError::Length { .. })
    ));
    let mut bad = *good;
    bad[0] = b'X';
    assert_eq!(
        SavedKeys::from_bytes(&bad).unwrap_err(),
        SavedKeysError::Magic
    );
    let mut newer = *good;
    newer[8..10].copy_from_slice(&(SAVED_KEYS_VERSION + 1).to_le_bytes());
    assert_eq!(
        SavedKeys::from_bytes(&newer).unwrap_err(),
        SavedKeysError::Newer {
            version: SAVED_KEYS_VERSION + 1
        }
    );
    let at = |direction: usize, field: usize| 16 + direction * vmlink_secure::KEY_STATE_LEN + field;
    for (field, value, why) in [(32 + 48, 2u8, "cipher"), (32 + 49, 1, "reserved")] {
        let mut b = *good;
        b[at(1, field)] = value;
        assert!(
            matches!(SavedKeys::from_bytes(&b), Err(SavedKeysError::Invalid(_))),
            "{why}"
        );
    }
    // Progress at the rekey limit, a zero limit, the reserved nonce.
    for (field, word) in [(32 + 8, 1000u64), (32 + 32, 0), (32, u64::MAX)] {
        let mut b = *good;
        b[at(0, field)..at(0, field) + 8].copy_from_slice(&word.to_le_bytes());
        assert!(
            matches!(SavedKeys::from_bytes(&b), Err(SavedKeysError::Invalid(_))),
            "field {field}"
        );
    }
    // Every single-byte change is an error or a state, never a panic.
    for i in 0..SAVED_KEYS_LEN {
        for v in [0u8, 1, 0x7f, 0xff] {
            let mut b = *good;
            b[i] = v;
            let _ = SavedKeys::from_bytes(&b);
        }
    }
}
