//! `vmlink ivshmem-server` from the outside: flags it refuses, a second server on a served
//! socket, and strangers on the socket, with a protocol client (what QEMU's device is)
//! checking that the server still serves. The pipe with a real guest is in
//! `transport/ivshmem/tests/qemu_boot.rs` (the library) and the README's QEMU commands.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vmlink_ivshmem::boot;
use vmlink_ivshmem::client::Client;
use vmlink_ivshmem::exchange::{Digest, Pattern};

fn vmlink() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmlink"))
}

/// Runs `vmlink ivshmem-server ARGS` to completion (10 s at most).
fn run(args: &[&str]) -> (ExitStatus, String) {
    let mut child = vmlink()
        .arg("ivshmem-server")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("vmlink ivshmem-server {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}

/// A running `vmlink ivshmem-server --socket SOCKET`, killed on drop; its stderr is
/// collected by a thread.
struct Served {
    child: Child,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Served {
    fn start(socket: &Path) -> Self {
        let mut child = vmlink()
            .args(["ivshmem-server", "--socket"])
            .arg(socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let served = Self { child, stderr };
        assert!(
            served.wait_for("serving", Duration::from_secs(10)),
            "the server did not start: {}",
            served.stderr()
        );
        served
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for `text` on stderr.
    fn wait_for(&self, text: &str, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if self.stderr().contains(text) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn still_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn socket(tag: &str) -> (PathBuf, PathBuf) {
    let dir = common::private_dir(tag);
    let socket = dir.join("ivshmem.sock");
    (dir, socket)
}

#[test]
fn wrong_flags_are_refused_with_the_reason_and_nothing_is_left_behind() {
    let (dir, sock) = socket("ivs-flags");
    let s = sock.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (
            &["--socket", s, "--vectors", "0"],
            "0 interrupt vectors per peer is outside 1..=64",
        ),
        (
            &["--socket", s, "--vectors", "65"],
            "65 interrupt vectors per peer is outside 1..=64",
        ),
        (&["--socket", s, "--memory", "3000000"], "3000000"),
        (&["--socket", s, "--memory", "1024"], "1024"),
        (
            &["--socket", s, "--ring-data", "1000"],
            "a ring of 5096 bytes is invalid",
        ),
        (&["--vectors", "2"], "--socket"),
    ];
    for (args, says) in cases {
        let (status, err) = run(args);
        assert_eq!(status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!sock.exists(), "{args:?} left a socket");
    }
    // Not a number at all: clap's error.
    let (status, err) = run(&["--socket", s, "--memory", "lots"]);
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("invalid value 'lots'"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_duplicate_server_fails_and_leaves_the_live_one_serving() {
    let (dir, sock) = socket("ivs-dup");
    let mut live = Served::start(&sock);
    let (status, err) = run(&["--socket", sock.to_str().unwrap()]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "vmlink ivshmem-server: serve: {} is in use: a server answers there, or it is not a socket",
            sock.display()
        )
    );
    assert!(
        live.still_running(),
        "the duplicate stopped the live server"
    );
    assert!(
        sock.exists(),
        "the duplicate removed the live server's socket"
    );
    // The live one still serves: a client gets its setup and an id (the duplicate's
    // probe of the socket was a connection too).
    let client = Client::connect(&sock, 2, Duration::from_secs(5)).unwrap();
    let connected = format!("peer {} connected", client.id());
    assert!(
        live.wait_for(&connected, Duration::from_secs(5)),
        "{}",
        live.stderr()
    );
    drop(client);
    drop(live);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn strangers_on_the_socket_are_dropped_and_the_server_keeps_serving() {
    let (dir, sock) = socket("ivs-stranger");
    let mut live = Served::start(&sock);
    // One sends garbage; one connects and leaves at once; one sends a byte mid-setup.
    let mut garbage = UnixStream::connect(&sock).unwrap();
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert!(
        live.wait_for("dropped peer 1: the client sent", Duration::from_secs(5)),
        "{}",
        live.stderr()
    );
    // Closed before or after its setup was sent: dropped, or gone.
    drop(UnixStream::connect(&sock).unwrap());
    let end = Instant::now() + Duration::from_secs(5);
    while !["dropped peer 2", "peer 2 left"]
        .iter()
        .any(|t| live.stderr().contains(t))
    {
        assert!(Instant::now() < end, "{}", live.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut rude = UnixStream::connect(&sock).unwrap();
    let _ = rude.write_all(&[0]);
    assert!(
        live.wait_for("dropped peer 3", Duration::from_secs(5)),
        "{}",
        live.stderr()
    );
    // A real client still gets its setup, the next id, and the strangers' departures do
    // not reach it as peers.
    let client = Client::connect(&sock, 2, Duration::from_secs(5)).unwrap();
    assert_eq!(client.id(), 4);
    assert_eq!(client.peers().keys().copied().collect::<Vec<_>>(), [0]);
    assert!(
        live.wait_for("peer 4 connected", Duration::from_secs(5)),
        "{}",
        live.stderr()
    );
    // None of them said hello, so the pipe has not started: stdin is not read.
    assert!(!live.stderr().contains("piping with"), "{}", live.stderr());
    assert!(live.still_running(), "{}", live.stderr());
    drop((garbage, rude, client));
    drop(live);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// QEMU, a kernel and the musl target, or why not (as `transport/ivshmem/tests/qemu_boot.rs`).
fn qemu_prerequisites() -> Result<(PathBuf, boot::Kernel), String> {
    let qemu = boot::find_qemu()?;
    let kernel = boot::Kernel::find()?;
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("cannot run rustc: {e}"))?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_owned();
    if !Path::new(&sysroot)
        .join("lib/rustlib/x86_64-unknown-linux-musl")
        .is_dir()
    {
        return Err("the x86_64-unknown-linux-musl target is not installed".into());
    }
    Ok((qemu, kernel))
}

/// The user's two commands with a real guest: `vmlink ivshmem-server --socket S < in >
/// out` on the host, and in a Linux guest under QEMU (q35 with an emulated IOMMU, the
/// device on `vfio-pci`) `vmlink-ivshmem-guest connect < in > out`, run by the test
/// guest's init. 8 MiB go to the guest and 4 MiB come back, both compared by digest on
/// the far side, and both commands exit 0. Needs QEMU, a kernel and the musl target: where
/// one is missing it prints `SKIPPED:` and passes, unless `VMLINK_REQUIRE_QEMU=1`.
///
/// It boots a guest (half a minute, and a minute more to build the guest's init the first
/// time), so the workspace's test run leaves it to the test command's `ivshmem` stage,
/// which runs it with `--include-ignored`.
#[test]
#[ignore = "boots QEMU: the test command's ivshmem stage runs it (--include-ignored)"]
fn a_file_moves_both_ways_between_the_host_and_a_qemu_guest() {
    let (qemu, kernel) = match qemu_prerequisites() {
        Ok(p) => p,
        Err(reason) => {
            if std::env::var("VMLINK_REQUIRE_QEMU").as_deref() == Ok("1") {
                panic!("QEMU is required (VMLINK_REQUIRE_QEMU=1) but unusable: {reason}");
            }
            println!("SKIPPED: {reason}");
            return;
        }
    };
    let init = boot::build_guest_init().unwrap_or_else(|e| panic!("{e}"));
    let (archive, _) = boot::initramfs(&std::fs::read(init).unwrap(), &kernel);
    let (dir, sock) = socket("ivs-pipe");
    let initrd = dir.join("pipe.cpio");
    std::fs::write(&initrd, archive).unwrap();
    let to_guest = common::data(7, 8 << 20);
    let input = dir.join("in");
    std::fs::write(&input, &to_guest).unwrap();
    let mut host = vmlink()
        .args(["ivshmem-server", "--socket"])
        .arg(&sock)
        .stdin(std::fs::File::open(&input).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut host_out = host.stdout.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        host_out.read_to_end(&mut v).unwrap();
        v
    });
    let mut host_err = host.stderr.take().unwrap();
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        host_err.read_to_string(&mut s).unwrap();
        s
    });
    let end = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < end, "the server never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let guest = boot::run_qemu(
        &qemu,
        &kernel,
        &initrd,
        &["-machine", "q35", "-device", "intel-iommu"],
        Some(boot::DoorbellDevice {
            socket: &sock,
            vectors: 2,
        }),
        "intel_iommu=on vmlink.mode=pipe",
        Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let console = guest.console();
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = host.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = host.kill();
            let _ = host.wait();
            panic!("vmlink ivshmem-server did not finish\n{console}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (from_guest, host_err) = (out_thread.join().unwrap(), err_thread.join().unwrap());
    assert!(status.success(), "{status:?}: {host_err}\n{console}");
    let (_, pipe) = guest
        .event("pipe")
        .unwrap_or_else(|| panic!("the guest did not report\n{console}\n{host_err}"));
    let field = |k: &str| {
        pipe.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(field("status"), "0", "{console}");
    // What the guest received is our input; what we received is what it sent.
    let mut d = Digest::default();
    d.update(&to_guest);
    assert_eq!(
        field("received_bytes"),
        to_guest.len().to_string(),
        "{console}"
    );
    assert_eq!(field("received_digest"), format!("{:016x}", d.value()));
    let mut d = Digest::default();
    d.update(&from_guest);
    assert_eq!(
        field("sent_bytes"),
        from_guest.len().to_string(),
        "{host_err}"
    );
    assert_eq!(field("sent_digest"), format!("{:016x}", d.value()));
    let mut expected = vec![0u8; from_guest.len()];
    Pattern::new(3).fill(&mut expected);
    assert!(from_guest == expected, "the guest's bytes are its pattern");
    let said: Vec<&str> = guest
        .guest_lines()
        .filter_map(|(_, l)| l.strip_prefix("pipe_said "))
        .collect();
    assert!(
        said.iter().any(|l| l.contains("interrupts: msix")),
        "{said:?}"
    );
    println!(
        "ivshmem pipe: {} bytes to the guest, {} back, guest's command {} ms; guest said {said:?}; host said {host_err:?}",
        to_guest.len(),
        from_guest.len(),
        field("ms")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
