//! In one process: the channel conformance suite over shm pairs, and a listener facing
//! clients that misbehave during the handshake while it keeps serving good ones.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use common::{remove_dir, socket_path, soon, watchdog};
use vmlink_channel::conformance::{End, RingEnd, Threads, run_all};
use vmlink_channel::{ChannelError, Config, EventFdDoorbell};
use vmlink_ring::{ControlWord, RingMem};
use vmlink_shm::{Guest, Layout, Listener, Policy, RefusalCode, Role, Service, ShmError, ShmRing};

/// Host (side A) and guest (side B) ends in this process, over a socket pair.
fn shm_pair(
    len: usize,
    config_a: Config,
    config_b: Config,
) -> (
    RingEnd<ShmRing, EventFdDoorbell>,
    RingEnd<ShmRing, EventFdDoorbell>,
) {
    let (h, g) = UnixStream::pair().expect("socket pair");
    let service = Service::new("conformance")
        .with_layout(Layout::symmetric(len as u64, 64 * 4096))
        .with_config(config_a);
    let host = thread::spawn(move || service.serve_stream(h));
    let guest = Guest::new("conformance")
        .with_config(config_b)
        .connect_stream(g)
        .expect("guest");
    let host = host.join().unwrap().expect("host");
    assert_eq!((host.role(), guest.role()), (Role::Host, Role::Guest));
    let (a, host_memory) = host.into_parts();
    let (b, guest_memory) = guest.into_parts();
    let (h2g, g2h) = (host_memory.host_to_guest(), guest_memory.guest_to_host());
    (
        End::ring(
            a,
            Box::new(move || h2g.store_control(ControlWord::WriteIndex, 13)),
        ),
        End::ring(
            b,
            Box::new(move || g2h.store_control(ControlWord::WriteIndex, 13)),
        ),
    )
}

#[test]
fn shm_pair_conforms() {
    let _w = watchdog("conformance", Duration::from_secs(60));
    run_all(&Threads::new(shm_pair));
}

fn service(timeout_ms: u64) -> Service {
    Service::new("svc")
        .with_layout(Layout::symmetric(4 * 4096, 4 * 4096))
        .with_handshake_timeout(Duration::from_millis(timeout_ms))
}

/// A good client: connects, exchanges one request and its completion.
fn good_client(listener: &Listener, n: u8) {
    let path = listener.path().to_path_buf();
    let guest = thread::spawn(move || {
        let g = Guest::new("svc")
            .connect(&path)
            .expect("good client connects");
        let mut reply = [0u8; 16];
        g.channel()
            .call(&[n; 8], &mut reply, soon(10))
            .expect("call");
        assert_eq!(reply[..8], [n + 1; 8]);
    });
    let host = listener
        .accept_timeout(Duration::from_secs(10))
        .expect("good client accepted");
    let mut buf = [0u8; 16];
    let r = host.channel().recv(&mut buf, soon(10)).expect("request");
    assert_eq!(r.payload(&buf), &[n; 8]);
    host.channel()
        .complete(r.transaction_id, &[n + 1; 8], soon(10))
        .expect("complete");
    guest.join().unwrap();
}

fn header(version: u16, kind: u16, body_len: u32) -> Vec<u8> {
    let mut h = b"VMLNKSHM".to_vec();
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&kind.to_le_bytes());
    h.extend_from_slice(&body_len.to_le_bytes());
    h
}

/// Reads what the host answers a bad client: an error message (kind 3) with its text.
fn read_reply(mut s: &UnixStream) -> (u16, u32, String) {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    assert!(all.len() >= 24, "a reply of {} bytes", all.len());
    let kind = u16::from_le_bytes([all[10], all[11]]);
    let code = u32::from_le_bytes(all[16..20].try_into().unwrap());
    (kind, code, String::from_utf8_lossy(&all[24..]).into_owned())
}

#[test]
fn bad_clients_get_clear_errors_and_the_listener_keeps_serving() {
    let _w = watchdog("bad clients", Duration::from_secs(30));
    let path = socket_path("bad");
    let listener = Listener::bind(&path, service(800)).unwrap();

    // Garbage.
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let e = listener.accept_timeout(Duration::from_secs(5)).unwrap_err();
    assert!(matches!(e, ShmError::BadMagic(_)), "{e}");
    let (kind, code, text) = read_reply(&s);
    assert_eq!((kind, code), (3, 4), "malformed: {text}");
    assert!(text.contains("bad magic"), "{text}");
    good_client(&listener, 1);

    // A wrong version.
    let mut s = UnixStream::connect(&path).unwrap();
    let mut hello = header(7, 1, 3);
    hello.extend_from_slice(b"svc");
    s.write_all(&hello).unwrap();
    let e = listener.accept_timeout(Duration::from_secs(5)).unwrap_err();
    assert!(
        matches!(e, ShmError::UnsupportedVersion { peer: 7, ours: 1 }),
        "{e}"
    );
    let (kind, code, text) = read_reply(&s);
    assert_eq!((kind, code), (3, 2), "{text}");
    assert!(text.contains("version 7"), "{text}");
    good_client(&listener, 2);

    // A body longer than any message.
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(&header(1, 1, 1 << 30)).unwrap();
    let e = listener.accept_timeout(Duration::from_secs(5)).unwrap_err();
    assert!(matches!(e, ShmError::Malformed(_)), "{e}");
    drop(s);

    // Closing mid-handshake: half a header, then gone.
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(&header(1, 1, 3)[..7]).unwrap();
    drop(s);
    let e = listener.accept_timeout(Duration::from_secs(5)).unwrap_err();
    assert!(matches!(e, ShmError::PeerClosed { .. }), "{e}");
    good_client(&listener, 3);

    // A silent client does not hold up the next one, and times out on its own.
    let silent = UnixStream::connect(&path).unwrap();
    let t0 = Instant::now();
    good_client(&listener, 4);
    assert!(
        t0.elapsed() < Duration::from_millis(800),
        "served while the silent one waits"
    );
    let e = listener.accept_timeout(Duration::from_secs(5)).unwrap_err();
    assert!(matches!(e, ShmError::TimedOut(..)), "{e}");
    assert!(t0.elapsed() >= Duration::from_millis(800));
    drop(silent);

    // An unknown service and an unexpected first message.
    let r = Guest::new("nope").connect(&path);
    assert!(
        matches!(&r, Err(ShmError::Refused { code: RefusalCode::UnknownService, message }) if message.contains("nope")),
        "{r:?}"
    );
    let e = listener.accept_timeout(Duration::from_secs(5)).unwrap_err();
    assert!(
        matches!(e, ShmError::UnknownService(ref n) if n == "nope"),
        "{e}"
    );
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(&header(1, 4, 0)).unwrap();
    let e = listener.accept_timeout(Duration::from_secs(5)).unwrap_err();
    assert!(
        matches!(e, ShmError::UnexpectedMessage { kind: 4, .. }),
        "{e}"
    );
    good_client(&listener, 5);

    drop(listener);
    assert!(!path.exists(), "the socket file is removed");
    remove_dir(&path);
}

#[test]
fn a_refused_peer_gets_a_refusal_and_no_channel() {
    let _w = watchdog("refusal", Duration::from_secs(20));
    let path = socket_path("policy");
    let listener = Listener::bind(&path, service(2000).with_policy(Policy::nobody())).unwrap();
    let r = Guest::new("svc").connect(&path);
    match r {
        Err(ShmError::Refused {
            code: RefusalCode::NotAllowed,
            message,
        }) => assert!(message.contains("not allowed"), "{message}"),
        other => panic!("{other:?}"),
    }
    let e = listener.accept_timeout(Duration::from_secs(5)).unwrap_err();
    match e {
        ShmError::NotAllowed { peer, service } => {
            assert_eq!(peer.pid, std::process::id() as i32);
            assert_eq!(service, "svc");
        }
        other => panic!("{other}"),
    }
    drop(listener);
    remove_dir(&path);
}

#[test]
fn the_socket_directory_must_be_private() {
    let path = socket_path("dir");
    let listener = Listener::bind(&path, service(1000)).unwrap();
    let dir = path.parent().unwrap();
    let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the listener creates its directory owner-only");
    // Another listener on the same path is refused while the first serves.
    assert!(Listener::bind(&path, service(1000)).is_err());
    drop(listener);
    // A stale socket file is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(stale);
    let listener = Listener::bind(&path, service(1000)).unwrap();
    drop(listener);
    // A directory others can enter is refused.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = Listener::bind(&path, service(1000)).unwrap_err();
    assert!(
        matches!(e, ShmError::InsecureDirectory { mode: 0o755, .. }),
        "{e}"
    );
    remove_dir(&path);
}

#[test]
fn binding_a_served_path_fails_and_leaves_its_listener_alone() {
    let _w = watchdog("served path", Duration::from_secs(30));
    let path = socket_path("twice");
    let listener = Listener::bind(&path, service(1000)).unwrap();
    let e = Listener::bind(&path, service(1000)).unwrap_err();
    assert!(
        matches!(e, ShmError::SocketInUse(ref p) if *p == path),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        format!("another listener is serving {}", path.display())
    );
    // A client that connects and closes without a word is no handshake either.
    drop(UnixStream::connect(&path).unwrap());
    // Neither shows up as an outcome: the next one is a good client's channel.
    let e = listener
        .accept_timeout(Duration::from_millis(300))
        .unwrap_err();
    assert!(matches!(e, ShmError::AcceptTimedOut(_)), "{e}");
    good_client(&listener, 6);
    assert!(path.exists(), "the live listener's socket is still there");
    drop(listener);

    // A path that is some other file is refused and left alone.
    std::fs::write(&path, b"not a socket").unwrap();
    let e = Listener::bind(&path, service(1000)).unwrap_err();
    assert!(
        matches!(e, ShmError::NotASocket(ref p) if *p == path),
        "{e}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    remove_dir(&path);
}

#[test]
fn connecting_where_nobody_listens_names_the_path() {
    let path = socket_path("nobody");
    // No socket file at all.
    let e = Guest::new("svc").connect(&path).unwrap_err();
    match &e {
        ShmError::Connect { path: p, source } => {
            assert_eq!(p, &path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound, "{e}");
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    // A socket file nobody listens on any more.
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let e = Guest::new("svc").connect(&path).unwrap_err();
    assert!(
        matches!(&e, ShmError::Connect { source, .. }
            if source.kind() == std::io::ErrorKind::ConnectionRefused),
        "{e}"
    );
    remove_dir(&path);
}

#[test]
fn a_closed_peer_ends_a_blocked_receive() {
    let _w = watchdog("closed", Duration::from_secs(20));
    let (h, g) = UnixStream::pair().unwrap();
    let svc = service(2000);
    let host = thread::spawn(move || svc.serve_stream(h));
    let guest = Guest::new("svc").connect_stream(g).unwrap();
    let host = host.join().unwrap().unwrap();
    let waiter = thread::spawn(move || {
        let mut buf = [0u8; 64];
        let first = host
            .channel()
            .recv(&mut buf, soon(10))
            .map(|r| r.payload(&buf).to_vec());
        let t = Instant::now();
        let second = host.channel().recv(&mut buf, soon(10)).map(|r| r.len());
        (first, second, t.elapsed())
    });
    guest.channel().send(b"last one", soon(5)).unwrap();
    thread::sleep(Duration::from_millis(50));
    drop(guest);
    let (first, second, took) = waiter.join().unwrap();
    assert_eq!(first.unwrap(), b"last one");
    assert_eq!(second, Err(ChannelError::Closed));
    assert!(took < Duration::from_secs(1), "{took:?}");
}
