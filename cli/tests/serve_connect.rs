//! `vmlink serve` and `vmlink connect` as two processes: a few megabytes piped each way at
//! once arrive byte for byte.

use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// `len` bytes that differ from `seed` to `seed` and do not repeat with a short period.
fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn start(args: &[&str], socket: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vmlink"))
        .args(args)
        .arg("--socket")
        .arg(socket)
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
