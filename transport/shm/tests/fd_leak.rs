//! Many clients connecting and disconnecting against one listener leak no fds. Alone in
//! its binary, so no other test's fds disturb the count.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{open_fds, remove_dir, socket_path, soon, watchdog};
use vmlink_shm::{Guest, Layout, Listener, Service, ShmError};

const ROUNDS: usize = 60;

#[test]
fn clients_in_a_loop_leak_no_fds() {
    let _w = watchdog("fd leak", Duration::from_secs(60));
    let path = socket_path("leak");
    let service = Service::new("svc")
        .with_layout(Layout::symmetric(4096, 4 * 4096))
        .with_sub_channels(4)
        .with_handshake_timeout(Duration::from_millis(200));
    let listener = Listener::bind(&path, service).unwrap();
    let accept = || listener.accept_timeout(Duration::from_secs(10));

    // One round first, so lazily created process-wide fds exist before counting.
    let warm = Guest::new("svc").connect(&path).unwrap();
    drop((accept().unwrap(), warm));
    let before = open_fds();

    for round in 0..ROUNDS {
        // A full channel, one packet each way, then both gone (host first or guest first).
        let guest = Guest::new("svc").connect(&path).unwrap();
        let host = accept().unwrap();
        guest.channel().send(&[round as u8; 8], soon(5)).unwrap();
        let mut buf = [0u8; 8];
        host.channel().recv(&mut buf, soon(5)).unwrap();
        if round % 2 == 0 {
            drop((host, guest));
        } else {
            drop((guest, host));
        }
        // A channel set of the primary and four sub-channels (eight eventfds and four socket
        // pairs more), each used once; sub-channels closed one at a time, the rest with
        // their primaries.
        let mut guest = Guest::new("svc")
            .with_sub_channels(5)
            .connect(&path)
            .unwrap();
        let mut host = accept().unwrap();
        let (mut hs, mut gs) = (host.take_sub_channels(), guest.take_sub_channels());
        assert_eq!((hs.len(), gs.len()), (4, 4));
        for (h, g) in hs.iter().zip(&gs) {
            g.channel().send(&[round as u8; 8], soon(5)).unwrap();
            h.channel().recv(&mut buf, soon(5)).unwrap();
        }
        drop((gs.remove(round % 4), hs.remove(3 - round % 4)));
        drop((host, gs, guest, hs));
        // Connect and hang up at once: no handshake, nothing reported.
        drop(UnixStream::connect(&path).unwrap());
        assert!(matches!(
            listener.accept_timeout(Duration::from_millis(20)),
            Err(ShmError::AcceptTimedOut(_))
        ));
        // Garbage.
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"garbage garbage!").unwrap();
        assert!(accept().is_err());
        drop(s);
        // A refused service name.
        assert!(Guest::new("other").connect(&path).is_err());
        assert!(accept().is_err());
        // A silent client, every tenth round (each costs the handshake timeout).
        if round % 10 == 0 {
            let silent = UnixStream::connect(&path).unwrap();
            assert!(accept().is_err());
            drop(silent);
        }
    }
    let after = open_fds();
    assert_eq!(
        after, before,
        "fds before and after {ROUNDS} rounds of clients"
    );
    drop(listener);
    remove_dir(&path);
}
