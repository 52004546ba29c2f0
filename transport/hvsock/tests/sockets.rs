//! Hybrid vsock both ways against a stand-in for the VMM that follows Firecracker's muxer
//! (`src/vmm/src/devices/virtio/vsock/unix/muxer.rs`): it reads the request as
//! `read_local_stream_port` does (10 bytes, then one at a time to a newline or 32 bytes;
//! whitespace-split, `connect` in any case, a decimal `u32`), answers `OK <port>` and
//! echoes for a port it serves, and closes without a word otherwise; for a guest's
//! connection it connects to `<uds_path>_<port>`. Then hostile VMMs, and Unix sockets
//! through `StreamAddr`.
#![cfg(unix)]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmlink_hvsock::socket::hybrid::{self, MAX_LINE};
use vmlink_hvsock::socket::{HybridAddr, HybridError, SocketOp, StreamAddr, StreamError};

/// The port the stand-in's guest listens on; any other is refused.
const SERVED: u32 = 5000;
/// The first host-side port Firecracker assigns (`1 << 30`).
const ASSIGNED: u32 = 1 << 30;

/// A fresh directory for one test's sockets.
fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmlink-sockets-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The request's port, read as Firecracker reads it, or `None` where it would close.
fn read_connect_line(stream: &mut UnixStream) -> Option<u32> {
    let mut buf = [0u8; 32];
    stream.read_exact(&mut buf[..10]).ok()?;
    let mut len = 10;
    while buf[len - 1] != b'\n' && len < buf.len() {
        stream.read_exact(&mut buf[len..=len]).ok()?;
        len += 1;
    }
    let text = std::str::from_utf8(&buf[..len]).ok()?;
    let mut words = text.split_whitespace();
    if words.next()?.to_lowercase() != "connect" {
        return None;
    }
    words.next()?.parse().ok()
}

/// A VMM that serves `connections` host-initiated connections: the reply and an echo for
/// port [`SERVED`], a silent close for anything else. Gives the ports it was asked for.
fn vmm(path: &Path, connections: usize) -> JoinHandle<Vec<Option<u32>>> {
    let listener = UnixListener::bind(path).unwrap();
    thread::spawn(move || {
        let mut asked = Vec::new();
        for i in 0..connections {
            let (mut stream, _) = listener.accept().unwrap();
            let port = read_connect_line(&mut stream);
            asked.push(port);
            if port != Some(SERVED) {
                continue; // dropped: closed without a word
            }
            let assigned = ASSIGNED + i as u32;
            stream
                .write_all(format!("OK {assigned}\n").as_bytes())
                .unwrap();
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => stream.write_all(&buf[..n]).unwrap(),
                }
            }
        }
        asked
    })
}

/// A VMM that accepts one connection and hands it to `serve` on its own thread.
fn one_connection<T: Send + 'static>(
    path: &Path,
    serve: impl FnOnce(UnixStream) -> T + Send + 'static,
) -> JoinHandle<T> {
    let listener = UnixListener::bind(path).unwrap();
    thread::spawn(move || serve(listener.accept().unwrap().0))
}

/// A VMM that answers one connection with `reply` (after reading the request) and then
/// holds it open until the client goes.
fn hostile_vmm(path: &Path, reply: Vec<u8>) -> JoinHandle<()> {
    one_connection(path, move |mut stream| {
        let _ = read_connect_line(&mut stream);
        let _ = stream.write_all(&reply);
        let _ = stream.read(&mut [0u8; 1]);
    })
}

#[test]
fn host_connects_through_the_vmm_and_the_stream_starts_after_ok() {
    let dir = dir("connect");
    let path = dir.join("fc.sock");
    let vmm = vmm(&path, 2);
    let addr = HybridAddr::new(&path, SERVED);

    let (mut stream, assigned) = hybrid::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    assert_eq!(assigned, ASSIGNED);
    let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        let data = data.clone();
        thread::spawn(move || stream.write_all(&data).unwrap())
    };
    let mut echoed = vec![0u8; data.len()];
    stream.read_exact(&mut echoed).unwrap();
    assert!(echoed == data, "the echo differs");
    writer.join().unwrap();
    drop(stream);

    // The same through StreamAddr.
    let mut stream = format!("hybrid:{}:{SERVED}", path.display())
        .parse::<StreamAddr>()
        .unwrap()
        .connect()
        .unwrap();
    stream.write_all(b"again").unwrap();
    let mut buf = [0u8; 5];
    stream.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"again");
    drop(stream);
    assert_eq!(vmm.join().unwrap(), [Some(SERVED), Some(SERVED)]);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Firecracker's reply and the guest's first bytes can come in one read: none of them is
/// lost to the handshake.
#[test]
fn bytes_right_after_the_reply_stay_in_the_stream() {
    let dir = dir("after-ok");
    let path = dir.join("fc.sock");
    let vmm = hostile_vmm(&path, b"OK 1073741824\nhello from the guest".to_vec());
    let (mut stream, assigned) =
        hybrid::connect_timeout(&HybridAddr::new(&path, SERVED), Duration::from_secs(5)).unwrap();
    assert_eq!(assigned, 1 << 30);
    let mut buf = [0u8; 20];
    stream.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello from the guest");
    drop(stream);
    vmm.join().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_port_nobody_serves_is_closed() {
    let dir = dir("refused");
    let path = dir.join("fc.sock");
    let vmm = vmm(&path, 1);
    match hybrid::connect(&HybridAddr::new(&path, 4999)) {
        Err(HybridError::Closed {
            port: 4999,
            received: 0,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(vmm.join().unwrap(), [Some(4999)]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_vmm_closing_without_reading_or_replying_is_closed() {
    let dir = dir("no-reply");
    let path = dir.join("fc.sock");
    let vmm = one_connection(&path, drop);
    match hybrid::connect(&HybridAddr::new(&path, SERVED)) {
        Err(HybridError::Closed { received: 0, .. }) => {}
        other => panic!("{other:?}"),
    }
    vmm.join().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_reply_cut_short_is_closed() {
    let dir = dir("cut");
    let path = dir.join("fc.sock");
    let vmm = one_connection(&path, |mut stream| {
        read_connect_line(&mut stream).unwrap();
        stream.write_all(b"OK 10").unwrap();
    });
    match hybrid::connect(&HybridAddr::new(&path, SERVED)) {
        Err(HybridError::Closed { received: 5, .. }) => {}
        other => panic!("{other:?}"),
    }
    vmm.join().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn garbage_replies_are_malformed() {
    let dir = dir("garbage");
    for (i, reply) in [
        &b"HELLO\n"[..],
        b"ok 5\n",
        b"OK\n",
        b"OK \n",
        b"OK x\n",
        b"OK 4294967296\n",
        b"OK  5\n",
        b"OK 5 \n",
        b"OK -5\n",
        b"\n",
        b"OK \xff\n",
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.join(format!("fc{i}.sock"));
        let vmm = hostile_vmm(&path, reply.to_vec());
        match hybrid::connect(&HybridAddr::new(&path, SERVED)) {
            Err(HybridError::Malformed { line }) => {
                assert_eq!(line, String::from_utf8_lossy(&reply[..reply.len() - 1]));
            }
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(reply)),
        }
        vmm.join().unwrap();
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// An endless line: the read stops at MAX_LINE bytes.
#[test]
fn an_endless_line_is_too_long() {
    let dir = dir("endless");
    let path = dir.join("fc.sock");
    let vmm = one_connection(&path, |mut stream| {
        read_connect_line(&mut stream).unwrap();
        let chunk = [b'A'; 4096];
        let mut sent = 0usize;
        // Until the client closes (EPIPE / ECONNRESET) or 64 MiB, whichever comes first.
        while sent < 64 << 20 && stream.write_all(&chunk).is_ok() {
            sent += chunk.len();
        }
        sent
    });
    match hybrid::connect(&HybridAddr::new(&path, SERVED)) {
        Err(HybridError::LineTooLong { limit }) => assert_eq!(limit, MAX_LINE),
        other => panic!("{other:?}"),
    }
    assert!(vmm.join().unwrap() < 64 << 20, "the client stopped reading");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_silent_vmm_times_out() {
    let dir = dir("silent");
    let path = dir.join("fc.sock");
    let vmm = one_connection(&path, |mut stream| {
        read_connect_line(&mut stream).unwrap();
        let _ = stream.read(&mut [0u8; 1]); // until the client gives up
    });
    let start = Instant::now();
    let timeout = Duration::from_millis(200);
    match hybrid::connect_timeout(&HybridAddr::new(&path, SERVED), timeout) {
        Err(HybridError::TimedOut { timeout: t }) => assert_eq!(t, timeout),
        other => panic!("{other:?}"),
    }
    let took = start.elapsed();
    assert!(took >= timeout && took < Duration::from_secs(5), "{took:?}");
    vmm.join().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn no_vmm_socket_is_a_connect_error() {
    let dir = dir("no-vmm");
    match hybrid::connect(&HybridAddr::new(dir.join("absent.sock"), SERVED)) {
        Err(HybridError::Socket(e)) => {
            assert_eq!(e.op, SocketOp::Connect);
            assert_eq!(e.kind(), ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The request line is exactly `CONNECT <port>\n`, which Firecracker's reader takes.
#[test]
fn the_request_is_firecrackers_line() {
    let dir = dir("request");
    let path = dir.join("fc.sock");
    let vmm = one_connection(&path, |mut stream| {
        let mut line = Vec::new();
        let mut byte = [0u8];
        while stream.read(&mut byte).unwrap() == 1 {
            line.push(byte[0]);
            if byte[0] == b'\n' {
                break;
            }
        }
        line
    });
    assert!(hybrid::connect(&HybridAddr::new(&path, 0)).is_err());
    assert_eq!(vmm.join().unwrap(), b"CONNECT 0\n");
    // And the stand-in's reader (Firecracker's) takes every port's line, the shortest
    // (10 bytes, its minimum read) and the longest alike.
    for port in [0, 7, SERVED, u32::MAX] {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        assert_eq!(read_connect_line(&mut b), Some(port));
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Guest to host: the host listens on `<uds_path>_<port>`, and the VMM connects there for
/// the guest's connection.
#[test]
fn guest_connections_arrive_on_path_underscore_port() {
    let dir = dir("listen");
    let path = dir.join("fc.sock");
    let addr = HybridAddr::new(&path, 52);
    let listener = hybrid::listen(&addr).unwrap();
    assert!(dir.join("fc.sock_52").exists());

    let vmm = thread::spawn(move || {
        // What Firecracker does for a guest's request to host port 52.
        let mut stream = UnixStream::connect(format!("{}_{}", path.display(), 52)).unwrap();
        stream.write_all(b"from the guest").unwrap();
        let mut reply = [0u8; 8];
        stream.read_exact(&mut reply).unwrap();
        reply
    });
    let (mut stream, _) = listener.accept().unwrap();
    let mut buf = [0u8; 14];
    stream.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"from the guest");
    stream.write_all(b"the host").unwrap();
    assert_eq!(&vmm.join().unwrap(), b"the host");

    // A second listener on the same port finds the path taken.
    let e = hybrid::listen(&addr).unwrap_err();
    assert_eq!((e.op, e.kind()), (SocketOp::Bind, ErrorKind::AddrInUse));
    drop(listener);

    // Through StreamAddr: the listener takes the next connection.
    std::fs::remove_file(addr.listen_path()).unwrap();
    let listener = StreamAddr::Hybrid(addr.clone()).listen().unwrap();
    let client = {
        let path = addr.listen_path();
        thread::spawn(move || UnixStream::connect(path).unwrap().write_all(b"x").unwrap())
    };
    let mut stream = listener.accept().unwrap();
    let mut byte = [0u8];
    stream.read_exact(&mut byte).unwrap();
    assert_eq!(&byte, b"x");
    client.join().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unix_streams_through_stream_addr() {
    let dir = dir("unix");
    let addr: StreamAddr = format!("unix:{}", dir.join("s").display()).parse().unwrap();
    assert_eq!(addr.family(), "unix");
    let listener = addr.listen().unwrap();
    let mut client = addr.connect().unwrap();
    let mut server = listener.accept().unwrap();
    client.write_all(b"ping").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    server.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"ping");

    server
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut clone = server.try_clone().unwrap();
    clone.write_all(b"pong").unwrap();
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    assert!(std::os::fd::AsRawFd::as_raw_fd(&server) >= 0);

    // Bound twice, and a path with nobody behind it.
    match addr.listen() {
        Err(StreamError::Socket(e)) => assert_eq!(e.kind(), ErrorKind::AddrInUse),
        other => panic!("{other:?}"),
    }
    let absent: StreamAddr = format!("unix:{}", dir.join("absent").display())
        .parse()
        .unwrap();
    match absent.connect() {
        Err(StreamError::Socket(e)) => {
            assert_eq!((e.op, e.kind()), (SocketOp::Connect, ErrorKind::NotFound));
        }
        other => panic!("{other:?}"),
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn stream_addr_text() {
    let cases = [
        ("vsock:3:5000", "vsock:3:5000"),
        ("vsock:host:5000", "vsock:2:5000"),
        ("vsock:any:any", "vsock:any:any"),
        ("hybrid:/run/fc.sock:5000", "hybrid:/run/fc.sock:5000"),
        ("hybrid:/a:b:1", "hybrid:/a:b:1"),
        ("unix:/tmp/s", "unix:/tmp/s"),
        ("unix:rel:ative", "unix:rel:ative"),
        (
            "hyperv:parent:1",
            "hyperv:parent:00000001-facb-11e6-bd58-64006a7986d3",
        ),
    ];
    for (text, printed) in cases {
        let addr: StreamAddr = text.parse().unwrap();
        assert_eq!(addr.to_string(), printed);
        assert_eq!(printed.parse::<StreamAddr>().unwrap(), addr);
    }
    for text in [
        "",
        "vsock",
        "tcp:1.2.3.4:5",
        "unix:",
        "vsock:3",
        "hybrid:/run/fc.sock",
        "hybrid::1",
        "VSOCK:3:5",
        "hyperv:parent",
    ] {
        assert!(text.parse::<StreamAddr>().is_err(), "`{text}` parsed");
    }
}

/// AF_HYPERV exists only on Windows: elsewhere its address parses and connecting says so.
#[test]
fn hyperv_is_unsupported_here() {
    let addr: StreamAddr = "hyperv:loopback:5000".parse().unwrap();
    assert!(matches!(
        addr.connect(),
        Err(StreamError::Unsupported { family: "hyperv" })
    ));
    assert!(matches!(
        addr.listen(),
        Err(StreamError::Unsupported { family: "hyperv" })
    ));
}
