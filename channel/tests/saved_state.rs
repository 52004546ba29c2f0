//! The byte form of a saved endpoint (`docs/SAVED-STATE.md`): every version ever written
//! stays readable (a committed golden file per version), this code writes the newest
//! version exactly, and hostile or truncated bytes are typed errors.

use std::time::{Duration, Instant};

use vmlink_channel::{
    ChannelError, ChannelState, Config, Endpoint, FailureCause, FailureKind, PacketType,
    SAVED_STATE_MAGIC, SAVED_STATE_VERSION, SavedEndpoint, SavedSlot, SavedStateError, Wait,
    in_process_channel_pair,
};

/// Version 1, written once by the scenario in [`scenario`] and committed; never rewritten.
const V1: &[u8] = include_bytes!("saved-state/v1.bin");

fn soon() -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(10))
}

/// The configuration the golden files were written with.
fn golden_config() -> Config {
    let mut config = Config::default();
    config.spin_iterations = 7;
    config.spin_before_sleep = Duration::from_micros(25);
    config.space_recheck = Duration::from_millis(3);
    config.queue_depth = 16;
    config.queue_bytes = 8192;
    config.gpa_page_limit = Some(4096);
    config
}

/// An endpoint with a polled request in flight, a call that gave up, and two packets
/// queued for receivers (one of them the polled request's answer), saved.
fn scenario() -> SavedEndpoint {
    let (a, b) = in_process_channel_pair(4 * 4096, golden_config()).expect("pair");
    let first = a.start_request(b"first?", Wait::Now).expect("request");
    let second = a.start_request(b"second?", Wait::Now).expect("request");
    let mut buf = [0u8; 64];
    for want in [first, second] {
        assert_eq!(
            b.recv(&mut buf, Wait::Now).expect("request").transaction_id,
            want
        );
    }
    b.send(b"unsolicited", Wait::Now).expect("send");
    b.complete(second, b"two", Wait::Now).expect("complete");
    let mut response = [0u8; 64];
    assert_eq!(
        a.call(
            b"third?",
            &mut response,
            Some(Instant::now() + Duration::from_millis(20))
        ),
        Err(ChannelError::TimedOut)
    );
    a.save().0
}

#[test]
fn version_1_reads_as_it_was_written() {
    let saved = SavedEndpoint::from_bytes(V1).expect("version 1");
    assert_eq!(saved.config(), golden_config());
    let in_flight: Vec<(usize, u32, SavedSlot)> = saved
        .transactions()
        .iter()
        .enumerate()
        .filter(|(_, (_, s))| *s != SavedSlot::Free)
        .map(|(i, &(g, s))| (i, g, s))
        .collect();
    assert_eq!(
        in_flight,
        [(0, 1, SavedSlot::Polled), (2, 1, SavedSlot::Abandoned)]
    );
    let queued: Vec<(PacketType, u64, bool, usize, &[u8])> = saved
        .queued()
        .iter()
        .map(|(m, b)| {
            (
                m.packet_type,
                m.transaction_id,
                m.completion_requested,
                m.header_len,
                &b[..],
            )
        })
        .collect();
    assert_eq!(
        queued,
        [
            (
                PacketType::InBand,
                0,
                false,
                0,
                &b"unsolicited\0\0\0\0\0"[..]
            ),
            (
                PacketType::Completion,
                0x1_0000_0001,
                false,
                0,
                &b"two\0\0\0\0\0"[..]
            ),
        ]
    );
    let c = saved.counters();
    assert_eq!(
        (c.packets_sent, c.packets_received, c.late_completions),
        (3, 2, 0)
    );
    assert_eq!((saved.failure(), saved.peer_closed()), (None, false));
}

#[test]
fn a_version_1_state_restores_and_goes_on() {
    let saved = SavedEndpoint::from_bytes(V1).expect("version 1");
    // Fresh rings stand in for the shared memory the state was saved beside.
    let (fresh, b) = in_process_channel_pair(4 * 4096, golden_config()).expect("pair");
    let (_, tx, rx, doorbell) = fresh.save();
    let a = Endpoint::restore(tx, rx, doorbell, saved.config(), &saved).expect("restore");
    assert_eq!(a.transactions_in_flight(), 2);
    let mut buf = [0u8; 64];
    // The queued packets first, in order.
    let p = a.recv(&mut buf, Wait::Now).expect("queued");
    assert_eq!(
        (p.packet_type, &buf[..11]),
        (PacketType::InBand, &b"unsolicited"[..])
    );
    let p = a.recv(&mut buf, Wait::Now).expect("queued completion");
    assert_eq!(
        (p.packet_type, p.transaction_id),
        (PacketType::Completion, 0x1_0000_0001)
    );
    // The polled request (slot 0) is still in flight: its completion is delivered; the
    // abandoned call's (slot 2) is counted as late, not a protocol violation.
    b.complete(0x1_0000_0000, b"one", soon()).expect("complete");
    b.complete(0x1_0000_0002, b"late", soon())
        .expect("complete");
    let p = a.recv(&mut buf, soon()).expect("completion");
    assert_eq!(
        (p.packet_type, p.transaction_id, &buf[..3]),
        (PacketType::Completion, 0x1_0000_0000, &b"one"[..])
    );
    assert_eq!(a.recv(&mut buf, Wait::Now), Err(ChannelError::Empty));
    assert_eq!(a.counters().late_completions, 1);
    assert_eq!(a.state(), ChannelState::Open);
}

#[test]
fn this_code_writes_the_newest_version_exactly() {
    assert_eq!(
        SAVED_STATE_VERSION, 1,
        "a new version needs its own golden file"
    );
    assert_eq!(&V1[..8], &SAVED_STATE_MAGIC);
    assert_eq!(
        SavedEndpoint::from_bytes(V1).expect("version 1").to_bytes(),
        V1
    );
    // The scenario the file was written from still saves the same state (all but the
    // counters of waits and signals, which depend on timing).
    let (now, then) = (
        scenario(),
        SavedEndpoint::from_bytes(V1).expect("version 1"),
    );
    assert_eq!(now.config(), then.config());
    assert_eq!(now.transactions(), then.transactions());
    assert_eq!(now.queued(), then.queued());
    let traffic = |s: &SavedEndpoint| {
        let c = s.counters();
        (
            c.packets_sent,
            c.bytes_sent,
            c.packets_received,
            c.bytes_received,
        )
    };
    assert_eq!(traffic(&now), traffic(&then));
}

#[test]
fn failure_and_peer_closed_travel() {
    let (a, b) = in_process_channel_pair(4096, Config::default()).expect("pair");
    drop(b);
    let mut buf = [0u8; 8];
    assert_eq!(a.recv(&mut buf, Wait::Now), Err(ChannelError::Closed));
    let saved = a.save().0;
    assert!(saved.peer_closed());
    let back = SavedEndpoint::from_bytes(&saved.to_bytes()).expect("decode");
    assert_eq!(back, saved);

    // A failed endpoint keeps the kind of its failure.
    let (a, b) = in_process_channel_pair(4096, Config::default()).expect("pair");
    b.complete(0x77, b"never asked", Wait::Now)
        .expect("complete");
    let cause = match a.recv(&mut buf, Wait::Now) {
        Err(ChannelError::Failed(c)) => c,
        other => panic!("{other:?}"),
    };
    let saved = a.save().0;
    let back = SavedEndpoint::from_bytes(&saved.to_bytes()).expect("decode");
    assert_eq!(
        back.failure(),
        Some(FailureCause::Inherited(FailureKind::Protocol))
    );
    assert_eq!(cause.kind(), FailureKind::Protocol);
    let (fresh, _b) = in_process_channel_pair(4096, Config::default()).expect("pair");
    let (_, tx, rx, doorbell) = fresh.save();
    let a = Endpoint::restore(tx, rx, doorbell, back.config(), &back).expect("restore");
    assert_eq!(
        a.send(b"x", Wait::Now),
        Err(ChannelError::Failed(FailureCause::Inherited(
            FailureKind::Protocol
        )))
    );
}

#[test]
fn newer_unknown_and_foreign_states_are_refused() {
    let mut newer = V1.to_vec();
    newer[8..10].copy_from_slice(&2u16.to_le_bytes());
    assert_eq!(
        SavedEndpoint::from_bytes(&newer),
        Err(SavedStateError::NewerVersion {
            found: 2,
            supported: 1
        })
    );
    newer[8..10].copy_from_slice(&u16::MAX.to_le_bytes());
    assert!(matches!(
        SavedEndpoint::from_bytes(&newer),
        Err(SavedStateError::NewerVersion { found: 0xffff, .. })
    ));
    newer[8..10].copy_from_slice(&0u16.to_le_bytes());
    assert_eq!(
        SavedEndpoint::from_bytes(&newer),
        Err(SavedStateError::UnknownVersion(0))
    );
    assert_eq!(
        SavedEndpoint::from_bytes(b"not a state"),
        Err(SavedStateError::NotSavedState)
    );
    assert_eq!(
        SavedEndpoint::from_bytes(b""),
        Err(SavedStateError::NotSavedState)
    );
    let mut trailing = V1.to_vec();
    trailing.push(0);
    assert_eq!(
        SavedEndpoint::from_bytes(&trailing),
        Err(SavedStateError::TrailingBytes(1))
    );
}

#[test]
fn every_truncation_and_every_flipped_byte_is_a_typed_error_or_a_valid_state() {
    for len in 0..V1.len() {
        let r = SavedEndpoint::from_bytes(&V1[..len]);
        assert!(r.is_err(), "{len} bytes decoded: {r:?}");
        if len >= 10 {
            assert_eq!(r, Err(SavedStateError::Truncated), "{len} bytes");
        }
    }
    // Every byte replaced by a few values: refused, or a state that encodes back to
    // itself (the decoder accepts only what it would write).
    for i in 10..V1.len() {
        for v in [0x00, 0x01, 0x7f, 0x80, 0xff] {
            let mut bytes = V1.to_vec();
            bytes[i] = v;
            if let Ok(s) = SavedEndpoint::from_bytes(&bytes) {
                assert_eq!(
                    SavedEndpoint::from_bytes(&s.to_bytes()),
                    Ok(s),
                    "byte {i} = {v:#x}"
                );
            }
        }
    }
}

/// Hand-made version-1 bodies: a header, then postcard values written here byte by byte.
fn v1(body: &[u8]) -> Vec<u8> {
    let mut out = SAVED_STATE_MAGIC.to_vec();
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// A version-1 body up to the queued-packet count: the default-ish configuration given,
/// 64 free slots, zero counters, open.
fn head(queue_depth: &[u8], queue_bytes: &[u8]) -> Vec<u8> {
    // spin_iterations 0; spin_before_sleep 0 s 0 ns; space_recheck 0 s 0 ns.
    let mut b = vec![0, 0, 0, 0, 0];
    b.extend_from_slice(queue_depth);
    b.extend_from_slice(queue_bytes);
    b.push(0); // no gpa limit
    b.extend(std::iter::repeat_n([0u8, 0], 64).flatten());
    b.extend_from_slice(&[0; 9]);
    b.push(0); // open
    b
}

#[test]
fn hostile_values_are_malformed() {
    // A queue past the bounds a saved state may ask for (1 GiB, and 2^20 deep).
    let r = SavedEndpoint::from_bytes(&v1(&head(&[4], &[0x80, 0x80, 0x80, 0x80, 0x04])));
    assert!(matches!(r, Err(SavedStateError::Malformed(_))), "{r:?}");
    let r = SavedEndpoint::from_bytes(&v1(&head(&[0x80, 0x80, 0x40], &[0x80, 0x40])));
    assert!(matches!(r, Err(SavedStateError::Malformed(_))), "{r:?}");
    // A count of 4 billion queued packets in a queue of 4: refused before anything is
    // read or reserved.
    let mut b = head(&[4], &[0x80, 0x40]);
    b.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
    let r = SavedEndpoint::from_bytes(&v1(&b));
    assert!(matches!(r, Err(SavedStateError::Malformed(_))), "{r:?}");
    // A count of 4 with one packet present: truncated.
    let mut b = head(&[4], &[0x80, 0x40]);
    b.push(4);
    b.extend_from_slice(&[6, 0, 0, 0, 1, 0xaa]);
    let r = SavedEndpoint::from_bytes(&v1(&b));
    assert_eq!(r, Err(SavedStateError::Truncated));
    // A packet whose byte string claims 2^62 bytes.
    let mut b = head(&[4], &[0x80, 0x40]);
    b.push(1);
    b.extend_from_slice(&[6, 0, 0, 0]);
    b.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x40]);
    let r = SavedEndpoint::from_bytes(&v1(&b));
    assert!(r.is_err(), "{r:?}");
    // Unknown packet type, a header past the bytes, a bad bool, an unknown slot state.
    for (packet, what) in [
        (&[5u8, 0, 0, 0, 0][..], "type 5"),
        (&[6, 0, 0, 9, 1, 0xaa][..], "header 9 of 1 byte"),
        (&[6, 0, 2, 0, 0][..], "bool 2"),
    ] {
        let mut b = head(&[4], &[0x80, 0x40]);
        b.push(1);
        b.extend_from_slice(packet);
        let r = SavedEndpoint::from_bytes(&v1(&b));
        assert!(
            matches!(r, Err(SavedStateError::Malformed(_))),
            "{what}: {r:?}"
        );
    }
    let mut b = head(&[4], &[0x80, 0x40]);
    b[10] = 3; // the first slot's state (after depth, bytes, limit and its generation)
    b.push(0);
    let r = SavedEndpoint::from_bytes(&v1(&b));
    assert!(matches!(r, Err(SavedStateError::Malformed(_))), "{r:?}");
    // Nanoseconds past a second.
    let mut b = head(&[4], &[0x80, 0x40]);
    b.splice(2..3, [0x80, 0x94, 0xeb, 0xdc, 0x03]); // spin_before_sleep's ns: 10^9
    b.push(0);
    let r = SavedEndpoint::from_bytes(&v1(&b));
    assert!(matches!(r, Err(SavedStateError::Malformed(_))), "{r:?}");
    // A valid hand-made body decodes.
    let mut b = head(&[4], &[0x80, 0x40]);
    b.push(1);
    b.extend_from_slice(&[6, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
    let s = SavedEndpoint::from_bytes(&v1(&b)).expect("valid");
    assert_eq!(s.queued()[0].1, [1, 2, 3, 4, 5, 6, 7, 8]);
}

#[test]
fn a_state_that_does_not_fit_the_endpoint_is_refused_on_restore() {
    let saved = SavedEndpoint::from_bytes(V1).expect("version 1");
    let (fresh, _b) = in_process_channel_pair(4096, Config::default()).expect("pair");
    let (_, tx, rx, doorbell) = fresh.save();
    let mut small = Config::default();
    small.queue_depth = 1;
    assert!(matches!(
        Endpoint::restore(tx, rx, doorbell, small, &saved),
        Err(ChannelError::BadSavedState { .. })
    ));
}
