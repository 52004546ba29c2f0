//! The ivshmem server against clients of our own (`vmlink_ivshmem::client` and raw sockets
//! speaking the wire format): the setup sequence message by message, peers seeing each
//! other's eventfds and ringing each other, peer-gone notifications, and clients that
//! misbehave (bytes on the one-way protocol, never reading, vanishing, one too many) each
//! ending their own connection only. Also the client against hostile servers.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vmlink_ivshmem::client::{Client, Notification};
use vmlink_ivshmem::wire::{self, PROTOCOL_VERSION, SHM_MESSAGE};
use vmlink_ivshmem::{IvshmemError, LOCAL_PEER, PeerId, Server, ServerConfig, ServerEvent};

const T: Duration = Duration::from_secs(5);

/// A fresh private directory for one test's socket.
fn sock_path() -> (PathBuf, PathBuf) {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vmlink-ivshmem-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    (dir.join("ivshmem.sock"), dir)
}

fn config(vectors: u16) -> ServerConfig {
    ServerConfig {
        vectors,
        memory_len: 1 << 20,
        ring_data: 16 * 1024,
        ..ServerConfig::default()
    }
}

/// The next server event other than `Connected` of ids in `skip`.
fn event(server: &Server) -> ServerEvent {
    server.next_event(T).expect("a server event in time")
}

fn expect_connected(server: &Server, id: PeerId) {
    match event(server) {
        ServerEvent::Connected { id: got } => assert_eq!(got, id),
        e => panic!("expected Connected({id}), got {e:?}"),
    }
}

/// The 8 bytes at `offset` of an fd (the memfd).
fn pread8(fd: std::os::fd::BorrowedFd<'_>, offset: i64) -> [u8; 8] {
    let mut b = [0u8; 8];
    assert_eq!(nix::sys::uio::pread(fd, &mut b, offset).unwrap(), 8);
    b
}

#[test]
fn the_setup_arrives_in_the_specified_order() {
    let (path, dir) = sock_path();
    let server = Server::bind(&path, config(3)).unwrap();
    let sock = UnixStream::connect(&path).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();

    let m = wire::recv(&sock).unwrap();
    assert_eq!(
        (m.value, m.fd.is_none()),
        (PROTOCOL_VERSION, true),
        "1. version 0, no fd"
    );
    let m = wire::recv(&sock).unwrap();
    assert_eq!(
        (m.value, m.fd.is_none()),
        (1, true),
        "2. our id (the first client is 1)"
    );
    let m = wire::recv(&sock).unwrap();
    assert_eq!(m.value, SHM_MESSAGE, "3. -1 with the memory");
    let shm = m.fd.expect("the memory's fd");
    let st = nix::sys::stat::fstat(shm.as_fd()).unwrap();
    assert_eq!(
        st.st_size,
        1 << 20,
        "the memory is the configured power of two"
    );
    assert_eq!(
        &pread8(shm.as_fd(), 0),
        b"VMLINKMA",
        "it starts with vmlink's memory header"
    );
    for vector in 0..3 {
        let m = wire::recv(&sock).unwrap();
        assert_eq!(
            m.value,
            i64::from(LOCAL_PEER),
            "4. the server's own peer, vector {vector}"
        );
        assert!(m.fd.is_some());
    }
    for vector in 0..3 {
        let m = wire::recv(&sock).unwrap();
        assert_eq!(
            m.value, 1,
            "5. interrupt setup: our own id, vector {vector}"
        );
        assert!(m.fd.is_some());
    }
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(
        matches!(wire::recv(&sock), Err(IvshmemError::Timeout { .. })),
        "nothing more"
    );
    expect_connected(&server, 1);
    assert_eq!(server.peers(), vec![1]);
    drop(server);
    assert!(!path.exists(), "dropping the server removes its socket");
    std::fs::remove_dir(dir).unwrap();
}

#[test]
fn two_clients_see_and_ring_each_other_and_the_server() {
    let (path, dir) = sock_path();
    let server = Server::bind(&path, config(2)).unwrap();
    let mut a = Client::connect(&path, 2, T).unwrap();
    expect_connected(&server, 1);
    assert_eq!(
        a.peers().keys().copied().collect::<Vec<_>>(),
        vec![LOCAL_PEER]
    );
    let b = Client::connect(&path, 2, T).unwrap();
    expect_connected(&server, 2);
    assert_eq!(b.id(), 2);
    assert_eq!(
        b.peers().keys().copied().collect::<Vec<_>>(),
        vec![LOCAL_PEER, 1]
    );
    // A hears of B: its id once per vector, each with an fd.
    for v in 0..2 {
        match a.next_notification(T).unwrap() {
            Some(Notification::PeerVector { id: 2, vector }) => assert_eq!(vector, v),
            n => panic!("expected B's vector {v}, got {n:?}"),
        }
    }
    assert_eq!(a.peers()[&2].len(), 2);

    // B rings A on vector 1: A's own vector-1 eventfd fires, vector 0 does not.
    b.ring(1, 1).unwrap();
    assert!(a.own_vectors()[1].drain().unwrap());
    assert!(!a.own_vectors()[0].drain().unwrap());
    // A rings B on vector 0, through the fd the server gave A for B.
    a.ring(2, 0).unwrap();
    assert!(b.own_vectors()[0].drain().unwrap());
    // Both ring the server's own peer (what a guest's Doorbell write does via QEMU).
    a.ring(LOCAL_PEER, 0).unwrap();
    b.ring(LOCAL_PEER, 1).unwrap();
    assert!(server.local_vector(0).unwrap().drain().unwrap());
    assert!(server.local_vector(1).unwrap().drain().unwrap());
    // The server rings each client (what becomes an interrupt in a QEMU guest).
    server.ring(1, 1).unwrap();
    server.ring(2, 0).unwrap();
    assert!(a.own_vectors()[1].drain().unwrap());
    assert!(b.own_vectors()[0].drain().unwrap());
    assert!(matches!(
        server.ring(9, 0),
        Err(IvshmemError::UnknownPeer { id: 9 })
    ));
    assert!(matches!(
        server.ring(1, 2),
        Err(IvshmemError::NoSuchVector { .. })
    ));
    assert!(matches!(
        server.local_vector(2),
        Err(IvshmemError::NoSuchVector { .. })
    ));
    drop((a, b, server));
    std::fs::remove_dir(dir).unwrap();
}

#[test]
fn a_client_that_leaves_is_announced_gone_and_its_id_is_not_reused_at_once() {
    let (path, dir) = sock_path();
    let server = Server::bind(&path, config(1)).unwrap();
    let mut a = Client::connect(&path, 1, T).unwrap();
    let b = Client::connect(&path, 1, T).unwrap();
    expect_connected(&server, 1);
    expect_connected(&server, 2);
    assert!(matches!(
        a.next_notification(T).unwrap(),
        Some(Notification::PeerVector { id: 2, .. })
    ));
    drop(b);
    assert!(matches!(
        a.next_notification(T).unwrap(),
        Some(Notification::PeerGone { id: 2 })
    ));
    assert!(!a.peers().contains_key(&2));
    assert!(matches!(
        event(&server),
        ServerEvent::Disconnected { id: 2 }
    ));
    assert_eq!(server.peers(), vec![1]);
    // The newcomer gets the next id, not the one that just left; it is announced to A.
    let c = Client::connect(&path, 1, T).unwrap();
    assert_eq!(c.id(), 3);
    expect_connected(&server, 3);
    assert!(matches!(
        a.next_notification(T).unwrap(),
        Some(Notification::PeerVector { id: 3, .. })
    ));
    drop((a, c, server));
    std::fs::remove_dir(dir).unwrap();
}

#[test]
fn a_stranger_that_sends_garbage_is_dropped_and_nobody_else_is() {
    let (path, dir) = sock_path();
    let server = Server::bind(&path, config(1)).unwrap();
    let mut a = Client::connect(&path, 1, T).unwrap();
    expect_connected(&server, 1);
    let mut stranger = UnixStream::connect(&path).unwrap();
    expect_connected(&server, 2);
    assert!(matches!(
        a.next_notification(T).unwrap(),
        Some(Notification::PeerVector { id: 2, .. })
    ));
    stranger.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    match event(&server) {
        ServerEvent::Dropped {
            id: 2,
            error: IvshmemError::UnexpectedData { len },
        } => assert!(len > 0),
        e => panic!("expected the stranger dropped, got {e:?}"),
    }
    assert!(matches!(
        a.next_notification(T).unwrap(),
        Some(Notification::PeerGone { id: 2 })
    ));
    // The stranger's socket was closed: it reads its setup and then end of stream.
    stranger.set_read_timeout(Some(T)).unwrap();
    let mut n = 0;
    let end = loop {
        match wire::recv(&stranger) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(
        n,
        3 + 1 + 1 + 1,
        "version, id, memory, the server's vector, A's, its own"
    );
    assert!(matches!(end, IvshmemError::Closed), "{end:?}");
    // The server goes on: A still rings it, a newcomer gets in.
    a.ring(LOCAL_PEER, 0).unwrap();
    assert!(server.local_vector(0).unwrap().drain().unwrap());
    let b = Client::connect(&path, 1, T).unwrap();
    assert_eq!(b.id(), 3);
    drop((a, b, stranger, server));
    std::fs::remove_dir(dir).unwrap();
}

#[test]
fn a_silent_stranger_is_an_ordinary_peer() {
    // The protocol is one-way, so a client that says nothing is well-behaved: it gets an
    // id and its setup, is announced, and is announced gone when it closes.
    let (path, dir) = sock_path();
    let server = Server::bind(&path, config(1)).unwrap();
    let silent = UnixStream::connect(&path).unwrap();
    expect_connected(&server, 1);
    let mut a = Client::connect(&path, 1, T).unwrap();
    expect_connected(&server, 2);
    assert_eq!(a.peers().keys().copied().collect::<Vec<_>>(), vec![0, 1]);
    drop(silent);
    assert!(matches!(
        event(&server),
        ServerEvent::Disconnected { id: 1 }
    ));
    assert!(matches!(
        a.next_notification(T).unwrap(),
        Some(Notification::PeerGone { id: 1 })
    ));
    drop((a, server));
    std::fs::remove_dir(dir).unwrap();
}

#[test]
fn a_client_that_never_reads_is_dropped_as_stalled_and_the_others_go_on() {
    let (path, dir) = sock_path();
    let server = Server::bind(
        &path,
        ServerConfig {
            vectors: 64,
            send_timeout: Duration::from_millis(100),
            ..config(64)
        },
    )
    .unwrap();
    // Never reads: its socket buffer fills with the announcements of newcomers.
    let _stuck = UnixStream::connect(&path).unwrap();
    expect_connected(&server, 1);
    let mut readers = Vec::new();
    let start = Instant::now();
    let stalled = loop {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the stuck client was never dropped"
        );
        let c = Client::connect(&path, 64, T).unwrap();
        readers.push(c);
        let mut stalled = None;
        // Longer than the send timeout, so a drop in progress is seen in this round.
        while let Some(e) = server.next_event(Duration::from_millis(300)) {
            match e {
                ServerEvent::Connected { .. } => {}
                ServerEvent::Dropped { id, error } => stalled = Some((id, error)),
                e => panic!("unexpected {e:?}"),
            }
        }
        if let Some(s) = stalled {
            break s;
        }
    };
    assert_eq!(stalled.0, 1);
    assert!(
        matches!(stalled.1, IvshmemError::PeerStalled { id: 1 }),
        "{:?}",
        stalled.1
    );
    assert!(!server.peers().contains(&1));
    // Every reader is still served and hears that peer 1 is gone.
    for c in &mut readers {
        let deadline = Instant::now() + T;
        loop {
            assert!(
                Instant::now() < deadline,
                "client {} never heard peer 1 go",
                c.id()
            );
            if let Some(Notification::PeerGone { id: 1 }) = c.next_notification(T).unwrap() {
                break;
            }
        }
        c.ring(LOCAL_PEER, 63).unwrap();
        assert!(server.local_vector(63).unwrap().drain().unwrap());
    }
    println!("stalled client dropped after {} newcomers", readers.len());
    drop((readers, server));
    std::fs::remove_dir(dir).unwrap();
}

#[test]
fn a_full_server_refuses_by_closing() {
    let (path, dir) = sock_path();
    let server = Server::bind(
        &path,
        ServerConfig {
            max_peers: 1,
            ..config(1)
        },
    )
    .unwrap();
    let a = Client::connect(&path, 1, T).unwrap();
    expect_connected(&server, 1);
    let refused = Client::connect(&path, 1, T);
    assert!(matches!(refused, Err(IvshmemError::Closed)), "{refused:?}");
    assert!(matches!(
        event(&server),
        ServerEvent::Refused {
            error: IvshmemError::ServerFull { max: 1 }
        }
    ));
    drop(a);
    assert!(matches!(
        event(&server),
        ServerEvent::Disconnected { id: 1 }
    ));
    let b = Client::connect(&path, 1, T).unwrap();
    assert_eq!(b.id(), 2);
    drop((b, server));
    std::fs::remove_dir(dir).unwrap();
}

#[test]
fn clients_that_vanish_at_once_leave_the_server_serving() {
    let (path, dir) = sock_path();
    let server = Server::bind(&path, config(2)).unwrap();
    let mut a = Client::connect(&path, 2, T).unwrap();
    expect_connected(&server, 1);
    for _ in 0..20 {
        drop(UnixStream::connect(&path).unwrap());
    }
    // Each either got its setup and left, or vanished during it: never announced then.
    let mut gone = 0;
    while gone < 20 {
        match event(&server) {
            ServerEvent::Connected { .. } => {}
            ServerEvent::Disconnected { .. } | ServerEvent::Dropped { .. } => gone += 1,
            e => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(server.peers(), vec![1]);
    // A saw every announced one come and go; it ends with only the server as its peer.
    while a
        .next_notification(Duration::from_millis(200))
        .unwrap()
        .is_some()
    {}
    assert_eq!(
        a.peers().keys().copied().collect::<Vec<_>>(),
        vec![LOCAL_PEER]
    );
    let b = Client::connect(&path, 2, T).unwrap();
    assert_eq!(b.id(), 22, "ids 2..=21 went to the vanished ones");
    drop((a, b, server));
    std::fs::remove_dir(dir).unwrap();
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_or_a_file_is_not() {
    let (path, dir) = sock_path();
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // stale: nobody listens
    let server = Server::bind(&path, config(1)).unwrap();
    assert!(matches!(
        Server::bind(&path, config(1)),
        Err(IvshmemError::PathInUse { .. })
    ));
    drop(server);
    std::fs::write(&path, b"not a socket").unwrap();
    assert!(matches!(
        Server::bind(&path, config(1)),
        Err(IvshmemError::PathInUse { .. })
    ));
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        Server::bind(
            &path,
            ServerConfig {
                memory_len: 3 << 20,
                ..config(1)
            }
        ),
        Err(IvshmemError::BadMemorySize { .. })
    ));
    assert!(matches!(
        Server::bind(&path, config(0)),
        Err(IvshmemError::BadVectorCount { .. })
    ));
    std::fs::remove_dir(dir).unwrap();
}

/// The client against hostile servers: each broken setup is its own typed error.
#[test]
fn the_client_refuses_broken_setups() {
    let memfd =
        nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    let run = |script: &dyn Fn(&UnixStream)| {
        let (server, client) = UnixStream::pair().unwrap();
        script(&server);
        drop(server);
        Client::from_stream(client, 1, T)
    };
    let r = run(&|s| wire::send(s, 1, None).unwrap());
    assert!(
        matches!(r, Err(IvshmemError::UnsupportedVersion { version: 1 })),
        "{r:?}"
    );
    let r = run(&|s| wire::send(s, 0, Some(memfd.as_fd())).unwrap());
    assert!(
        matches!(r, Err(IvshmemError::UnexpectedFd { value: 0 })),
        "{r:?}"
    );
    let r = run(&|s| {
        wire::send(s, 0, None).unwrap();
        wire::send(s, 70_000, None).unwrap();
    });
    assert!(
        matches!(r, Err(IvshmemError::BadPeerId { value: 70_000 })),
        "{r:?}"
    );
    let r = run(&|s| {
        wire::send(s, 0, None).unwrap();
        wire::send(s, 1, None).unwrap();
        wire::send(s, -1, None).unwrap();
    });
    assert!(
        matches!(
            r,
            Err(IvshmemError::MissingFd {
                what: "shared memory"
            })
        ),
        "{r:?}"
    );
    let r = run(&|s| {
        wire::send(s, 0, None).unwrap();
        wire::send(s, 1, None).unwrap();
    });
    assert!(matches!(r, Err(IvshmemError::Closed)), "{r:?}");
    let r = run(&|s| {
        wire::send(s, 0, None).unwrap();
        (&*s).write_all(&[1, 0, 0]).unwrap();
    });
    assert!(
        matches!(r, Err(IvshmemError::ShortMessage { got: 3 })),
        "{r:?}"
    );
    let r = run(&|s| {
        wire::send(s, 0, None).unwrap();
        wire::send(s, 1, None).unwrap();
        wire::send(s, -1, Some(memfd.as_fd())).unwrap();
        wire::send(s, 1, None).unwrap(); // its own id without an fd
    });
    assert!(
        matches!(
            r,
            Err(IvshmemError::MissingFd {
                what: "interrupt setup"
            })
        ),
        "{r:?}"
    );
    let ok = run(&|s| {
        wire::send(s, 0, None).unwrap();
        wire::send(s, 7, None).unwrap();
        wire::send(s, -1, Some(memfd.as_fd())).unwrap();
        wire::send(s, 7, Some(memfd.as_fd())).unwrap();
    })
    .unwrap();
    assert_eq!(ok.id(), 7);
}

#[test]
fn unread_events_are_bounded_and_counted() {
    let (path, dir) = sock_path();
    let server = Server::bind(&path, config(1)).unwrap();
    // Each connection that comes and goes makes two events; none are read.
    let n = vmlink_ivshmem::MAX_QUEUED_EVENTS / 2 + 10;
    for _ in 0..n {
        let c = Client::connect(&path, 1, T).unwrap();
        drop(c);
    }
    let deadline = Instant::now() + T;
    while server.events_dropped() < 20 {
        assert!(
            Instant::now() < deadline,
            "dropped {}",
            server.events_dropped()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut queued = 0;
    while server.next_event(Duration::from_millis(50)).is_some() {
        queued += 1;
    }
    assert_eq!(queued, vmlink_ivshmem::MAX_QUEUED_EVENTS);
    assert_eq!(server.events_dropped(), 20);
    // The server serves on.
    let c = Client::connect(&path, 1, T).unwrap();
    expect_connected(&server, c.id());
    drop((c, server));
    std::fs::remove_dir(dir).unwrap();
}
