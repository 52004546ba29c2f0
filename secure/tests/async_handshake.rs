//! The handshake with asynchronous waits (`establish_async`), the only one a build without
//! `std` has: these tests run in both builds (`cargo test -p vmlink-secure`, and with
//! `--no-default-features`, where the crate itself is `no_std`).

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use vmlink_channel::{ChannelError, Config, InProcessChannel, in_process_channel_pair};
use vmlink_secure::{
    AuthorizedKeys, Credentials, HandshakeRole, Keypair, SecureConfig, SecureError, establish_async,
};

/// Polls both futures until both are done (each poll looks at the rings again), failing
/// the test after ten seconds.
fn run_both<A: Future, B: Future>(a: A, b: B) -> (A::Output, B::Output) {
    let (mut a, mut b) = (pin!(a), pin!(b));
    let mut cx = Context::from_waker(Waker::noop());
    let (mut ra, mut rb) = (None, None);
    let start = Instant::now();
    while ra.is_none() || rb.is_none() {
        if ra.is_none()
            && let Poll::Ready(x) = a.as_mut().poll(&mut cx)
        {
            ra = Some(x);
        }
        if rb.is_none()
            && let Poll::Ready(x) = b.as_mut().poll(&mut cx)
        {
            rb = Some(x);
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the handshake hung"
        );
    }
    (ra.unwrap(), rb.unwrap())
}

fn pair() -> (InProcessChannel, InProcessChannel) {
    in_process_channel_pair(16 * 4096, Config::default()).unwrap()
}

fn credentials(local: &Keypair, peer: &Keypair) -> Credentials {
    Credentials::Static {
        local: local.clone(),
        authorized: AuthorizedKeys::new([peer.public()]),
    }
}

#[test]
fn an_async_handshake_authenticates_both_sides_and_seals_what_follows() {
    let (guest_keys, host_keys) = (Keypair::generate(), Keypair::generate());
    let (g, h) = pair();
    let config = SecureConfig::default();
    let (cg, ch) = (
        credentials(&guest_keys, &host_keys),
        credentials(&host_keys, &guest_keys),
    );
    let (guest, host) = run_both(
        establish_async(g, HandshakeRole::Initiator, &cg, &config),
        establish_async(h, HandshakeRole::Responder, &ch, &config),
    );
    let (guest, host) = (guest.unwrap(), host.unwrap());
    assert_eq!(guest.peer_key, Some(host_keys.public()));
    assert_eq!(host.peer_key, Some(guest_keys.public()));
    assert_eq!(guest.handshake_hash, host.handshake_hash);

    let mut buf = [0u8; 64];
    let (sent, got) = run_both(
        guest.endpoint.send_async(b"sealed on the way"),
        host.endpoint.recv_async(&mut buf),
    );
    sent.unwrap();
    let got = got.unwrap();
    // A ring pads payloads to 8 bytes.
    assert_eq!(&got.payload(&buf)[..17], b"sealed on the way");
}

#[test]
fn an_unknown_key_is_refused_and_the_initiator_hears_the_channel_close() {
    let (guest_keys, host_keys, stranger) = (
        Keypair::generate(),
        Keypair::generate(),
        Keypair::generate(),
    );
    let (g, h) = pair();
    let config = SecureConfig::default();
    let (cg, ch) = (
        credentials(&guest_keys, &host_keys),
        credentials(&host_keys, &stranger),
    );
    let (guest, host) = run_both(
        establish_async(g, HandshakeRole::Initiator, &cg, &config),
        async {
            let r = establish_async(h, HandshakeRole::Responder, &ch, &config).await;
            // The refused channel goes (as a responder's caller drops it).
            r.map(|_| ())
        },
    );
    match host {
        Err(SecureError::UnknownKey { fingerprint }) => {
            assert_eq!(fingerprint, guest_keys.public().fingerprint());
        }
        other => panic!("expected UnknownKey, got {other:?}"),
    }
    assert!(
        matches!(
            guest,
            Err(SecureError::PeerClosed | SecureError::Channel(ChannelError::Closed))
        ),
        "{guest:?}"
    );
}

#[test]
fn garbage_instead_of_the_protocol_name_is_a_typed_error() {
    let (g, h) = pair();
    let keys = Keypair::generate();
    let config = SecureConfig::default();
    let ch = credentials(&keys, &keys);
    let (sent, host) = run_both(
        async {
            // A length, then bytes that are not this side's protocol name.
            let mut frame = 9u32.to_le_bytes().to_vec();
            frame.extend_from_slice(b"Noise_XY!");
            g.send_async(&frame).await
        },
        establish_async(h, HandshakeRole::Responder, &ch, &config),
    );
    sent.unwrap();
    match host {
        Err(SecureError::Mismatch { theirs, .. }) => assert_eq!(theirs, "Noise_XY!"),
        other => panic!("expected Mismatch, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_private_key_line_parses_without_a_file() {
    let kp = Keypair::generate();
    let private = Keypair::parse("vmlink-secure-private-key-v1 zz").map(|_| ());
    assert_eq!(private.unwrap_err().0, 1, "a bad line is named");
    let public = kp.public().to_line("guest");
    let keys = AuthorizedKeys::parse(&public).unwrap();
    assert_eq!(keys.find(&kp.public()), Some("guest"));
}
