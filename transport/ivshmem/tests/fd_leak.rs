//! No fd outlives its use: a server with clients coming and going, misbehaving and being
//! refused, then dropped, leaves this process with exactly the fds it had before. In its
//! own test binary, because it counts `/proc/self/fd` for the whole process.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vmlink_ivshmem::client::Client;
use vmlink_ivshmem::{LOCAL_PEER, Server, ServerConfig, ServerEvent};

const T: Duration = Duration::from_secs(5);

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn nothing_leaks() {
    let dir = std::env::temp_dir().join(format!("vmlink-ivshmem-fds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ivshmem.sock");
    let before = open_fds();
    for _round in 0..3 {
        let server = Server::bind(
            &path,
            ServerConfig {
                vectors: 4,
                memory_len: 1 << 20,
                ring_data: 16 * 1024,
                max_peers: 4,
                ..ServerConfig::default()
            },
        )
        .unwrap();
        let mut clients: Vec<Client> = (0..3)
            .map(|_| Client::connect(&path, 4, T).unwrap())
            .collect();
        // A stranger sending garbage (with an fd riding along), one vanishing, one refused.
        let mut garbage = UnixStream::connect(&path).unwrap();
        garbage.write_all(b"garbage").unwrap();
        drop(UnixStream::connect(&path).unwrap());
        let refused = Client::connect(&path, 4, T);
        clients[0].ring(LOCAL_PEER, 3).unwrap();
        server.ring(clients[1].id(), 2).unwrap();
        clients.remove(2);
        // Let every client follow the comings and goings (it holds fds for each peer).
        for c in &mut clients {
            while c
                .next_notification(Duration::from_millis(100))
                .unwrap()
                .is_some()
            {}
        }
        drop(refused);
        drop(garbage);
        let mut events = 0;
        while let Some(e) = server.next_event(Duration::from_millis(300)) {
            assert!(
                !matches!(
                    e,
                    ServerEvent::Refused {
                        error: vmlink_ivshmem::IvshmemError::Io { .. }
                    }
                ),
                "{e:?}"
            );
            events += 1;
        }
        assert!(events >= 5, "{events} events");
        drop(clients);
        drop(server);
    }
    let after = open_fds();
    assert_eq!(before, after, "fds open before and after");
    std::fs::remove_dir(&dir).unwrap();
}
