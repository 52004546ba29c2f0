//! The host's channel over the server's memory, against a client of the protocol playing
//! the guest's QEMU (no QEMU here: `tests/qemu_boot.rs` has the real guest): its doorbell
//! rings the peer's eventfd and wakes on ours, and the peer leaving (or the server
//! stopping) closes the channel instead of leaving it waiting.

use std::time::{Duration, Instant};

use vmlink_channel::{ChannelError, Config, Wait};
use vmlink_ivshmem::client::Client;
use vmlink_ivshmem::{IvshmemError, LOCAL_PEER, Server, ServerConfig, ServerEvent};

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vmlink-ivshmem-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn within(ms: u64) -> Wait {
    Wait::Until(Instant::now() + Duration::from_millis(ms))
}

#[test]
fn the_host_channel_rings_the_peer_and_wakes_on_its_doorbell() {
    let d = dir("bells");
    let server = Server::bind(d.join("s.sock"), ServerConfig::default()).unwrap();
    let client = Client::connect(server.path(), 2, Duration::from_secs(5)).unwrap();
    assert!(matches!(
        server.next_event(Duration::from_secs(5)),
        Some(ServerEvent::Connected { id: 1 })
    ));
    let ch = server.channel(1, 0, Config::default()).unwrap();
    // A send into an empty ring rings the peer on vector 0, and not on vector 1.
    ch.send(b"12345678", Wait::Now).unwrap();
    assert!(client.own_vectors()[0].drain().unwrap());
    assert!(!client.own_vectors()[1].drain().unwrap());
    assert_eq!(ch.counters().signals_sent, 1);
    // The peer's ring on our vector 0 ends a receive's sleep (at its deadline, for
    // nothing arrived: the wake is counted, the receive still times out).
    client.ring(LOCAL_PEER, 0).unwrap();
    assert_eq!(
        ch.recv(&mut [0u8; 64], within(200)),
        Err(ChannelError::TimedOut)
    );
    assert!(ch.counters().signals_received >= 1);
    // No channel with a peer that is not there, or on a vector it does not have.
    assert!(matches!(
        server.channel(7, 0, Config::default()),
        Err(IvshmemError::UnknownPeer { id: 7 })
    ));
    assert!(matches!(
        server.channel(1, 2, Config::default()),
        Err(IvshmemError::NoSuchVector { .. })
    ));
    drop((ch, client, server));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn the_peer_leaving_closes_a_waiting_host_channel() {
    let d = dir("gone");
    let server = Server::bind(d.join("s.sock"), ServerConfig::default()).unwrap();
    let client = Client::connect(server.path(), 2, Duration::from_secs(5)).unwrap();
    let other = Client::connect(server.path(), 2, Duration::from_secs(5)).unwrap();
    let ch = server.channel(client.id(), 0, Config::default()).unwrap();
    let t = Instant::now();
    std::thread::scope(|s| {
        let waiter = s.spawn(|| ch.recv(&mut [0u8; 64], within(20_000)));
        std::thread::sleep(Duration::from_millis(100));
        drop(client);
        assert_eq!(waiter.join().unwrap(), Err(ChannelError::Closed));
    });
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // A channel with the other peer still works, until the server stops.
    let ch2 = server.channel(other.id(), 0, Config::default()).unwrap();
    assert_eq!(
        ch2.recv(&mut [0u8; 64], Wait::Now),
        Err(ChannelError::Empty)
    );
    drop(server);
    assert_eq!(
        ch2.recv(&mut [0u8; 64], within(20_000)),
        Err(ChannelError::Closed)
    );
    drop(other);
    std::fs::remove_dir_all(&d).unwrap();
}
