//! `vmlink serve` and `vmlink connect` as two processes: a few megabytes piped each way at
//! once arrive byte for byte, over shared memory (`--socket`), a Unix stream socket
//! (`--unix-stream`) and a hybrid vsock (`--hybrid-vsock`, through a stand-in for the VMM's
//! Unix socket that behaves as Firecracker's vsock muxer does).

mod common;

use common::{data, private_dir};

use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

fn start(args: &[&str], socket: &Path) -> Child {
    start_at(args, "--socket", socket.as_os_str())
}

/// `vmlink ARGS FLAG VALUE` with piped stdio.
fn start_at(args: &[&str], flag: &str, value: &std::ffi::OsStr) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vmlink"))
        .args(args)
        .arg(flag)
        .arg(value)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmlink")
}

/// Feeds `input` to the child's stdin (then closes it) while collecting its stdout;
/// returns stdout and stderr once it exits successfully.
fn run(mut child: Child, input: Vec<u8>) -> thread::JoinHandle<(Vec<u8>, String)> {
    thread::spawn(move || {
        let mut stdin = child.stdin.take().unwrap();
        let writer = thread::spawn(move || stdin.write_all(&input));
        let mut out = Vec::new();
        child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        writer.join().unwrap().expect("write stdin");
        let status = child.wait().unwrap();
        assert!(status.success(), "vmlink failed ({status}): {err}");
        (out, err)
    })
}

#[test]
fn serve_and_connect_pipe_megabytes_both_ways() {
    let dir = std::env::temp_dir().join(format!("vmlink-cli-pipe-{}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
    let socket = dir.join("pipe.sock");
    let to_client = data(1, 3 << 20);
    let to_server = data(2, (2 << 20) + 12_345);

    let server = run(start(&["serve"], &socket), to_client.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the server never listened");
        thread::sleep(Duration::from_millis(5));
    }
    let client = run(start(&["connect"], &socket), to_server.clone());

    let (client_out, _) = client.join().expect("client");
    let (server_out, _) = server.join().expect("server");
    assert_eq!(client_out.len(), to_client.len());
    assert!(client_out == to_client, "server -> client bytes differ");
    assert_eq!(server_out.len(), to_server.len());
    assert!(server_out == to_server, "client -> server bytes differ");
    assert!(!socket.exists(), "the server removed its socket");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Pipes megabytes both ways between `serve FLAG SERVE_AT` and `connect FLAG CONNECT_AT`,
/// once `listening` exists.
fn pipe_both_ways(flag: &str, serve_at: &Path, connect_at: &Path, listening: &Path) {
    let to_client = data(3, 3 << 20);
    let to_server = data(4, (2 << 20) + 777);
    let server = run(
        start_at(&["serve"], flag, serve_at.as_os_str()),
        to_client.clone(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listening.exists() {
        assert!(Instant::now() < deadline, "the server never listened");
        thread::sleep(Duration::from_millis(5));
    }
    let client = run(
        start_at(&["connect"], flag, connect_at.as_os_str()),
        to_server.clone(),
    );
    let (client_out, _) = client.join().expect("client");
    let (server_out, _) = server.join().expect("server");
    assert!(client_out == to_client, "server -> client bytes differ");
    assert!(server_out == to_server, "client -> server bytes differ");
}

#[test]
fn serve_and_connect_pipe_megabytes_over_a_unix_stream() {
    let dir = private_dir("unix-stream");
    let path = dir.join("stream.sock");
    pipe_both_ways("--unix-stream", &path, &path, &path);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A stand-in for a VMM's hybrid vsock socket at `path`: each connection's first line must
/// be `CONNECT <port>\n` (at most 32 bytes, as Firecracker reads it); it is joined to the
/// listener on `<path>_<port>` (where a guest's listener would be reached) and answered
/// `OK <local port>\n`, then bytes are copied both ways. A bad line closes the connection.
fn stand_in_vmm(path: &Path) -> thread::JoinHandle<()> {
    use std::os::unix::net::{UnixListener, UnixStream};
    let listener = UnixListener::bind(path).unwrap();
    let base = path.to_owned();
    thread::spawn(move || {
        let (mut host, _) = listener.accept().unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.len() < 32 && !line.ends_with(b"\n") {
            assert_eq!(host.read(&mut byte).unwrap(), 1, "the host hung up");
            line.push(byte[0]);
        }
        let text = std::str::from_utf8(&line).unwrap();
        let port: u32 = text
            .strip_prefix("CONNECT ")
            .and_then(|p| p.trim_end().parse().ok())
            .expect("CONNECT <port>");
        let mut guest_path = base.into_os_string();
        guest_path.push(format!("_{port}"));
        let guest = UnixStream::connect(&guest_path).unwrap();
        host.write_all(b"OK 1073741824\n").unwrap();
        let (mut h2, mut g2) = (host.try_clone().unwrap(), guest.try_clone().unwrap());
        let up = thread::spawn(move || {
            let mut guest = guest;
            std::io::copy(&mut host, &mut guest).unwrap();
            guest.shutdown(std::net::Shutdown::Write).unwrap();
        });
        std::io::copy(&mut g2, &mut h2).unwrap();
        h2.shutdown(std::net::Shutdown::Write).unwrap();
        up.join().unwrap();
    })
}

#[test]
fn serve_and_connect_pipe_megabytes_over_a_hybrid_vsock() {
    let dir = private_dir("hybrid");
    let vmm = dir.join("vmm.sock");
    let vmm_thread = stand_in_vmm(&vmm);
    // serve listens where the VMM delivers the guest's port 5000; connect asks the VMM.
    let at = std::path::PathBuf::from(format!("{}:5000", vmm.display()));
    pipe_both_ways("--hybrid-vsock", &at, &at, &dir.join("vmm.sock_5000"));
    vmm_thread.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn transports_are_exclusive_and_streams_take_no_service() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vmlink"))
            .args(args)
            .output()
            .unwrap()
    };
    for args in [
        &["serve"][..],
        &["connect", "--socket", "/tmp/x", "--unix-stream", "/tmp/y"],
        &["serve", "--vsock", "3:5000", "--service", "other"],
        &["connect", "--vsock", "3:port"],
        &["connect", "--hybrid-vsock", "/run/fc.sock"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("error: ") && err.contains("try '--help'"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn empty_input_finishes_at_once() {
    let dir = std::env::temp_dir().join(format!("vmlink-cli-empty-{}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
    let socket = dir.join("pipe.sock");
    let server = run(start(&["serve"], &socket), Vec::new());
    while !socket.exists() {
        thread::sleep(Duration::from_millis(5));
    }
    let client = run(start(&["connect"], &socket), b"hello".to_vec());
    assert_eq!(client.join().unwrap().0, b"");
    assert_eq!(server.join().unwrap().0, b"hello");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn help_lists_every_command() {
    let output = Command::new(env!("CARGO_BIN_EXE_vmlink"))
        .arg("--help")
        .output()
        .expect("run vmlink");
    let help = String::from_utf8_lossy(&output.stdout);
    for command in ["demo", "serve", "connect"] {
        assert!(help.contains(command), "{command} missing: {help}");
    }
    assert!(
        !help.contains("demo-guest"),
        "the guest side is hidden: {help}"
    );
}

/// `vmlink connect` at `socket` with nothing on stdin: its exit code and stderr.
fn connect_alone(socket: &Path) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_vmlink"))
        .arg("connect")
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .output()
        .expect("run vmlink");
    assert!(output.stdout.is_empty());
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn connect_says_nobody_listens_at_the_path() {
    let dir = std::env::temp_dir().join(format!("vmlink-cli-nobody-{}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
    let socket = dir.join("pipe.sock");

    // No socket file at all.
    let (code, err) = connect_alone(&socket);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "vmlink connect: no vmlink serve is listening on {} (there is no socket file)",
            socket.display()
        )
    );

    // A socket file left by a listener that has gone (connect is refused).
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let (code, err) = connect_alone(&socket);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "vmlink connect: no vmlink serve is listening on {} (the socket file is left from \
             one that has stopped)",
            socket.display()
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn serve_and_connect_help_say_how_to_send_nothing_and_what_a_bad_client_costs() {
    let help = |command: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_vmlink"))
            .args([command, "--help"])
            .output()
            .expect("run vmlink");
        assert!(output.status.success());
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let serve = help("serve");
    assert!(serve.contains("keeps listening"), "{serve}");
    assert!(serve.contains("another `vmlink serve`"), "{serve}");
    let connect = help("connect");
    assert!(connect.contains("< /dev/null"), "{connect}");
}
