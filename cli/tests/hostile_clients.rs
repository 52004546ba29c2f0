//! `vmlink serve` facing clients that fail the handshake: each is refused and logged, and
//! the server keeps listening until a good client comes, which then moves real bytes both
//! ways. Also a second `vmlink serve` on a live socket, which must fail and leave the live
//! one alone.

mod common;

use common::data;

use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The handshake timeout `vmlink serve` gives its clients.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A private directory for one test's socket, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vmlink-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        Self(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("s")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads a pipe to the end on a thread of its own.
fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut out = Vec::new();
        let _ = pipe.read_to_end(&mut out);
        out
    })
}

/// A running `vmlink` process: stdin fed from a thread, stdout and stderr collected.
struct Running {
    child: Child,
    stdin: Option<JoinHandle<()>>,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl Running {
    fn start(args: &[&str], socket: &Path, input: Vec<u8>) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vmlink"))
            .args(args)
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vmlink");
        let mut stdin = child.stdin.take().unwrap();
        let stdin = thread::spawn(move || {
            // The process may exit without reading (a refused client): that is its business.
            let _ = stdin.write_all(&input);
        });
        let stdout = drain(child.stdout.take().unwrap());
        let stderr = drain(child.stderr.take().unwrap());
        Self {
            child,
            stdin: Some(stdin),
            stdout: Some(stdout),
            stderr: Some(stderr),
        }
    }

    fn still_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits at most `limit` for the exit; returns the status, stdout and stderr.
    fn finish(mut self, limit: Duration) -> (ExitStatus, Vec<u8>, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let err = self.stderr.take().unwrap().join().unwrap();
                panic!(
                    "vmlink did not exit within {limit:?}; killed it. stderr:\n{}",
                    String::from_utf8_lossy(&err)
                );
            }
            thread::sleep(Duration::from_millis(5));
        };
        self.stdin.take().unwrap().join().unwrap();
        let out = self.stdout.take().unwrap().join().unwrap();
        let err = self.stderr.take().unwrap().join().unwrap();
        (status, out, String::from_utf8_lossy(&err).into_owned())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.stdout.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `vmlink serve` at `socket` and waits until it accepts connections. (Probing with
/// a connection that closes without a byte is no handshake, so the server ignores it.)
fn serve(socket: &Path, input: Vec<u8>) -> Running {
    let mut server = Running::start(&["serve"], socket, input);
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(socket).is_err() {
        assert!(server.still_running(), "the server exited before listening");
        assert!(Instant::now() < deadline, "the server never listened");
        thread::sleep(Duration::from_millis(5));
    }
    server
}

/// A good client: `vmlink connect` moves `n`'s bytes both ways with the server, which then
/// exits successfully. Returns the server's stderr.
fn good_client(server: Running, socket: &Path, to_client: &[u8], n: u64) -> String {
    let to_server = data(1000 + n, 100_000 + n as usize);
    let t0 = Instant::now();
    let client = Running::start(&["connect"], socket, to_server.clone());
    let (status, client_out, client_err) = client.finish(Duration::from_secs(20));
    assert!(
        status.success(),
        "the good client failed ({status}): {client_err}"
    );
    assert!(client_out == to_client, "server -> client bytes differ");
    let (status, server_out, server_err) = server.finish(Duration::from_secs(20));
    assert!(
        status.success(),
        "the server failed ({status}): {server_err}"
    );
    assert!(server_out == to_server, "client -> server bytes differ");
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "the good client waited {:?}",
        t0.elapsed()
    );
    server_err
}

/// Every line the server wrote is one plain refusal line.
fn refusal_lines(stderr: &str) -> Vec<&str> {
    let lines: Vec<&str> = stderr.lines().collect();
    for line in &lines {
        assert!(
            line.starts_with("vmlink serve: refused a client (")
                && line.ends_with("); still listening"),
            "not a refusal line: {line:?}\nin:\n{stderr}"
        );
        for debug in ["Some(", "None", "Err(", "Ok(", "{ "] {
            assert!(!line.contains(debug), "Rust internals in {line:?}");
        }
    }
    lines
}

/// What the server answers a refused client: the ERROR message's code and text, once it
/// has closed the connection.
fn refusal(mut s: &UnixStream) -> (u32, String) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut all = Vec::new();
    // The server closes with the rest of the garbage unread, which Unix sockets report as a
    // reset after the queued reply.
    match s.read_to_end(&mut all) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the server did not close the connection: {e}"),
    }
    assert!(all.len() >= 24, "a reply of {} bytes", all.len());
    assert_eq!(&all[..8], b"VMLNKSHM");
    assert_eq!(
        u16::from_le_bytes([all[10], all[11]]),
        3,
        "an error message"
    );
    let code = u32::from_le_bytes(all[16..20].try_into().unwrap());
    (code, String::from_utf8_lossy(&all[24..]).into_owned())
}

#[test]
fn a_duplicate_serve_fails_and_leaves_the_live_one_serving() {
    let dir = TempDir::new("dup");
    let socket = dir.socket();
    let to_client = data(1, 200_000);
    let mut server = serve(&socket, to_client.clone());

    let duplicate = Running::start(&["serve"], &socket, b"never sent".to_vec());
    let (status, out, err) = duplicate.finish(Duration::from_secs(10));
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(out.is_empty());
    assert_eq!(
        err.trim_end(),
        format!(
            "vmlink serve: another vmlink serve is listening on {}",
            socket.display()
        )
    );
    assert!(
        server.still_running(),
        "the duplicate stopped the live server"
    );
    assert!(
        socket.exists(),
        "the duplicate removed the live server's socket"
    );

    let server_err = good_client(server, &socket, &to_client, 1);
    assert_eq!(server_err, "", "the duplicate's check disturbed the server");
}

#[test]
fn an_unknown_service_is_refused_and_the_server_keeps_serving() {
    let dir = TempDir::new("unknown");
    let socket = dir.socket();
    let to_client = data(2, 150_000);
    let mut server = serve(&socket, to_client.clone());

    let nope = Running::start(&["connect", "--service", "nope"], &socket, Vec::new());
    let (status, out, err) = nope.finish(Duration::from_secs(10));
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(out.is_empty());
    assert!(
        err.starts_with("vmlink connect: the host offers no service \"nope\""),
        "{err}"
    );
    assert!(
        server.still_running(),
        "an unknown service stopped the server"
    );

    let server_err = good_client(server, &socket, &to_client, 2);
    assert_eq!(
        refusal_lines(&server_err),
        [
            "vmlink serve: refused a client (the peer asked for unknown service \"nope\"); \
          still listening"
        ]
    );
}

#[test]
fn garbage_is_refused_and_the_server_keeps_serving() {
    let dir = TempDir::new("garbage");
    let socket = dir.socket();
    let to_client = data(3, 150_000);
    let mut server = serve(&socket, to_client.clone());

    let mut s = UnixStream::connect(&socket).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (code, text) = refusal(&s);
    assert_eq!(code, 4, "refused as malformed: {text}");
    assert_eq!(
        text,
        "not a vmlink-shm handshake: bad magic bytes 47 45 54 20 2f 20 48 54"
    );
    assert!(server.still_running(), "garbage stopped the server");

    let server_err = good_client(server, &socket, &to_client, 3);
    assert_eq!(refusal_lines(&server_err).len(), 1, "{server_err}");
    assert!(
        server_err.contains("bad magic bytes 47 45 54"),
        "{server_err}"
    );
}

#[test]
fn a_client_that_connects_and_closes_costs_nothing() {
    let dir = TempDir::new("closes");
    let socket = dir.socket();
    let to_client = data(4, 150_000);
    let mut server = serve(&socket, to_client.clone());

    drop(UnixStream::connect(&socket).unwrap());
    // Half a header, then gone: a handshake that failed.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.write_all(b"VMLNK").unwrap();
    drop(s);
    thread::sleep(Duration::from_millis(100));
    assert!(server.still_running(), "a closed client stopped the server");

    let server_err = good_client(server, &socket, &to_client, 4);
    assert_eq!(
        refusal_lines(&server_err),
        [
            "vmlink serve: refused a client (the peer closed the connection during the handshake \
          (waiting for the guest's hello)); still listening"
        ]
    );
}

#[test]
fn a_silent_client_times_out_and_holds_up_no_one() {
    let dir = TempDir::new("silent");
    let socket = dir.socket();
    let to_client = data(5, 150_000);
    let mut server = serve(&socket, to_client.clone());

    // A client that says nothing is closed after the handshake timeout.
    let mut silent = UnixStream::connect(&socket).unwrap();
    silent
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT * 3))
        .unwrap();
    let t0 = Instant::now();
    let mut byte = [0u8; 1];
    let n = silent.read(&mut byte).expect("closed, not left hanging");
    let waited = t0.elapsed();
    assert_eq!(n, 0, "the server closes the silent connection");
    assert!(
        waited >= HANDSHAKE_TIMEOUT - Duration::from_millis(500) && waited < HANDSHAKE_TIMEOUT * 2,
        "closed after {waited:?}"
    );
    assert!(server.still_running(), "a silent client stopped the server");

    // While another one stays silent, a good client is served at once.
    let _silent = UnixStream::connect(&socket).unwrap();
    let server_err = good_client(server, &socket, &to_client, 5);
    assert_eq!(
        refusal_lines(&server_err),
        [
            "vmlink serve: refused a client (the handshake timed out after 5 seconds (waiting \
          for the guest's hello)); still listening"
        ]
    );
}

/// One hostile client of kind `i % 5` (none of them silent). Returns false when no server
/// was listening to receive it.
fn hostile(socket: &Path, i: usize) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    match i % 5 {
        // Connects and closes.
        0 => {}
        // Garbage, then waits for the refusal (or the close).
        1 => {
            let _ = s.write_all(&data(i as u64, 24 + i % 40));
            let _ = s.read_to_end(&mut Vec::new());
        }
        // An unknown service.
        2 | 3 => {
            let name = format!("no-such-service-{i}");
            let mut hello = b"VMLNKSHM".to_vec();
            hello.extend_from_slice(&1u16.to_le_bytes());
            // Kind 1 (hello) or 4 (ready, which is not a first message).
            hello.extend_from_slice(&(if i % 5 == 2 { 1u16 } else { 4 }).to_le_bytes());
            hello.extend_from_slice(&(name.len() as u32).to_le_bytes());
            hello.extend_from_slice(name.as_bytes());
            let _ = s.write_all(&hello);
            let _ = s.read_to_end(&mut Vec::new());
        }
        // Half a header, then gone.
        _ => {
            let _ = s.write_all(&b"VMLNKSHM\x01\x00"[..7 + i % 3]);
        }
    }
    true
}

#[test]
fn a_thousand_hostile_clients_in_a_row_while_good_ones_are_served() {
    const HOSTILE: usize = 1000;
    let dir = TempDir::new("flood");
    let socket = dir.socket();
    let t0 = Instant::now();
    let done = AtomicBool::new(false);
    let sent = AtomicUsize::new(0);
    let (rounds, logged) = thread::scope(|s| {
        let flood = s.spawn(|| {
            let mut i = 0;
            while i < HOSTILE {
                assert!(t0.elapsed() < Duration::from_secs(60), "the flood stalled");
                if hostile(&socket, i) {
                    i += 1;
                    sent.store(i, Ordering::Relaxed);
                } else {
                    // Between two servers: nobody listens for a moment.
                    thread::sleep(Duration::from_millis(1));
                }
            }
            done.store(true, Ordering::Release);
        });
        // Servers one after another, each serving one good client amid the flood.
        let mut rounds = 0u64;
        let mut logged = 0;
        while rounds < 3 || !done.load(Ordering::Acquire) {
            assert!(
                !flood.is_finished() || done.load(Ordering::Acquire),
                "the flood failed"
            );
            let to_client = data(100 + rounds, 50_000);
            let server = serve(&socket, to_client.clone());
            // Let some of the flood reach this server before the good client comes.
            let before = sent.load(Ordering::Relaxed);
            let wait = Instant::now();
            while sent.load(Ordering::Relaxed) < before + 50
                && !done.load(Ordering::Acquire)
                && wait.elapsed() < Duration::from_secs(2)
            {
                thread::sleep(Duration::from_millis(1));
            }
            let server_err = good_client(server, &socket, &to_client, 10 + rounds);
            logged += refusal_lines(&server_err).len();
            rounds += 1;
        }
        flood.join().expect("the flood");
        (rounds, logged)
    });
    println!("{HOSTILE} hostile clients, {rounds} good ones, {logged} refusals logged");
    assert_eq!(sent.load(Ordering::Relaxed), HOSTILE);
    assert!(rounds >= 3);
    // Connect-and-close clients are not handshakes; the other 800 fail theirs (some reach
    // a server only as it leaves, when nothing is left to log them).
    assert!(logged > 0 && logged <= HOSTILE, "{logged} refusals logged");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t0.elapsed()
    );
}
