//! `vmlink serve --take-over`: a new `vmlink serve` takes the channel from the running one
//! while `vmlink connect` pipes a file to it; the file arrives intact, split between the
//! two servers' stdouts at the hand-over, and the client notices nothing. A successor that
//! comes too early is turned away, one with nothing to take over or wrong flags is an
//! error. The same with a secure channel: its keys go with it, the successor needs none.

mod common;

use common::{data, private_dir};

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// A running `vmlink` whose stdout and stderr are collected by threads.
struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    out: JoinHandle<Vec<u8>>,
    err: JoinHandle<String>,
}

fn vmlink(args: &[&str], socket: &Path, stdin: bool) -> Running {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmlink"))
        .args(args)
        .arg("--socket")
        .arg(socket)
        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmlink");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    Running {
        stdin: child.stdin.take(),
        child,
        out: thread::spawn(move || {
            let mut v = Vec::new();
            out.read_to_end(&mut v).unwrap();
            v
        }),
        err: thread::spawn(move || {
            let mut s = String::new();
            err.read_to_string(&mut s).unwrap();
            s
        }),
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Waits for the exit (killing after 60 s); returns status code, stdout, stderr.
    fn finish(mut self) -> (Option<i32>, Vec<u8>, String) {
        drop(self.stdin.take());
        let (out, err) = (
            std::mem::replace(&mut self.out, thread::spawn(Vec::new)),
            std::mem::replace(&mut self.err, thread::spawn(String::new)),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            thread::sleep(Duration::from_millis(5));
        };
        (status.code(), out.join().unwrap(), err.join().unwrap())
    }
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        thread::sleep(Duration::from_millis(5));
    }
}

fn takeover_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".takeover");
    PathBuf::from(p)
}

fn run_to_end(args: &[&str], socket: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmlink"))
        .args(args)
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .output()
        .expect("run vmlink")
}

#[test]
fn a_successor_takes_over_mid_file_and_the_file_arrives_intact() {
    let dir = private_dir("takeover");
    take_over_mid_file(&dir, &["serve"], &["connect"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Makes a key pair with `vmlink keygen` at `path` (and `path.pub`).
fn keygen(path: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmlink"))
        .arg("keygen")
        .arg(path)
        .output()
        .expect("run vmlink keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_secure_channel_is_taken_over_with_its_keys() {
    let dir = private_dir("takeover-secure");
    let (host, guest) = (dir.join("host.key"), dir.join("guest.key"));
    keygen(&host);
    keygen(&guest);
    let (host, guest) = (host.to_str().unwrap(), guest.to_str().unwrap());
    let (host_pub, guest_pub) = (format!("{host}.pub"), format!("{guest}.pub"));
    let new_err = take_over_mid_file(
        &dir,
        &[
            "serve",
            "--secure",
            "--key",
            host,
            "--peer-keys",
            &guest_pub,
        ],
        &[
            "connect",
            "--secure",
            "--key",
            guest,
            "--peer-keys",
            &host_pub,
        ],
    );
    assert!(new_err.contains("took over a secure channel"), "{new_err}");

    // The successor takes the keys with the channel; key flags beside --take-over are
    // refused.
    let out = run_to_end(
        &[
            "serve",
            "--take-over",
            "--secure",
            "--key",
            host,
            "--peer-keys",
            &guest_pub,
        ],
        &dir.join("pipe.sock"),
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("--take-over") && said.contains("--secure"),
        "{said}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server run with `server`, a client with `client` piping a 24 MiB file; a successor
/// takes over mid-file. Checks every byte both ways; returns the successor's stderr.
fn take_over_mid_file(dir: &Path, server: &[&str], client: &[&str]) -> String {
    let socket = dir.join("pipe.sock");
    let file = data(11, 24 << 20);
    let to_client = data(12, (1 << 20) + 333);

    let mut old = vmlink(server, &socket, true);
    wait_for(&socket);
    let mut client = vmlink(client, &socket, true);
    // Once serving, the server waits for a successor beside its socket.
    wait_for(&takeover_path(&socket));
    let mut client_in = client.stdin.take().unwrap();
    client_in.write_all(&file[..8 << 20]).unwrap();

    // Too early: the old server is still sending its stdin.
    let early = run_to_end(&["serve", "--take-over"], &socket);
    let said = String::from_utf8_lossy(&early.stderr);
    assert_eq!(early.status.code(), Some(2), "{said}");
    assert!(said.contains("still sending its stdin"), "{said}");
    assert!(early.stdout.is_empty());

    let mut old_in = old.stdin.take().unwrap();
    old_in.write_all(&to_client).unwrap();
    drop(old_in);
    client_in.write_all(&file[8 << 20..16 << 20]).unwrap();

    // Now it hands over, mid-file.
    let new = vmlink(&["serve", "--take-over"], &socket, false);
    let (code, old_out, old_err) = old.finish();
    assert_eq!(code, Some(0), "{old_err}");
    assert!(old_err.contains("handed the channel over"), "{old_err}");
    assert!(old_err.contains("turned away a successor"), "{old_err}");
    client_in.write_all(&file[16 << 20..]).unwrap();
    drop(client_in);

    let (code, client_out, client_err) = client.finish();
    assert_eq!(code, Some(0), "{client_err}");
    let (code, new_out, new_err) = new.finish();
    assert_eq!(code, Some(0), "{new_err}");
    assert!(client_out == to_client, "server -> client bytes differ");
    assert!(
        old_out.len() >= 8 << 20 && old_out.len() < file.len(),
        "the hand-over was not mid-file: the old server wrote {} bytes",
        old_out.len()
    );
    let mut arrived = old_out;
    arrived.extend_from_slice(&new_out);
    assert_eq!(arrived.len(), file.len());
    assert!(arrived == file, "client -> server bytes differ");
    new_err
}

#[test]
fn nothing_to_take_over_and_wrong_flags_are_errors() {
    let dir = private_dir("takeover-nothing");
    let socket = dir.join("pipe.sock");
    let out = run_to_end(&["serve", "--take-over"], &socket);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("no vmlink serve to take over"), "{said}");

    // --take-over needs --socket: the stream transports have no hand-over.
    let out = Command::new(env!("CARGO_BIN_EXE_vmlink"))
        .args(["serve", "--unix-stream"])
        .arg(dir.join("s"))
        .arg("--take-over")
        .output()
        .expect("run vmlink");
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("--socket"), "{said}");
    // `connect` has no such flag.
    let out = run_to_end(&["connect", "--take-over"], &socket);
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}
