//! Helpers shared by the integration tests: watchdogs, byte patterns, socket paths and
//! child processes that run this same test binary in another role.
#![allow(dead_code)]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The environment variable that selects a child process's role.
pub const ROLE_ENV: &str = "VMLINK_SHM_TEST_ROLE";

/// Aborts the whole test process if it is still alive after `limit`, so no test can hang.
/// Dropping the guard disarms it.
pub struct Watchdog(Arc<AtomicBool>);

pub fn watchdog(name: &'static str, limit: Duration) -> Watchdog {
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < limit {
            if flag.load(Ordering::Acquire) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("watchdog: {name} did not finish within {limit:?}; aborting");
        std::process::abort();
    });
    Watchdog(done)
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A deadline `secs` seconds from now.
pub fn soon(secs: u64) -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(secs))
}

/// splitmix64's finaliser.
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A payload for packet `n` of stream `seed`: its sequence number (8 bytes), then bytes
/// derived from it, `len` (≥ 8) bytes in all.
pub fn payload(seed: u64, n: u64, len: usize) -> Vec<u8> {
    assert!(len >= 8);
    let mut out = n.to_le_bytes().to_vec();
    let mut x = mix(seed ^ n.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    while out.len() < len {
        x = mix(x);
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Packet `n`'s payload length: 8 to 3000 bytes.
pub fn len_of(seed: u64, n: u64) -> usize {
    8 + (mix(seed.wrapping_add(n)) % 2993) as usize
}

/// Checks a received payload (padded to 8 bytes) against packet `n` of stream `seed`.
pub fn check(seed: u64, n: u64, got: &[u8]) {
    let len = len_of(seed, n);
    assert_eq!(got.len(), len.div_ceil(8) * 8, "packet {n}: length");
    let seq = u64::from_le_bytes(got[..8].try_into().unwrap());
    assert_eq!(seq, n, "packet {seq} arrived where {n} was due");
    assert!(
        got[..len] == payload(seed, n, len)[..],
        "packet {n}: bytes differ"
    );
    assert!(got[len..].iter().all(|b| *b == 0), "packet {n}: padding");
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh socket path in a directory that does not exist yet (the listener creates it).
pub fn socket_path(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir()
        .join(format!("vmlink-shm-test-{}-{tag}-{n}", std::process::id()))
        .join("sock")
}

/// Removes a test socket's directory (after the listener is gone).
pub fn remove_dir(path: &std::path::Path) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Open fds of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count() - 1 // the directory's own fd
}

/// A command that runs this test binary's `test` in `role`.
pub fn child_command(test: &str, role: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE_ENV, role)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// The role this process plays, if it is a child.
pub fn role() -> Option<String> {
    std::env::var(ROLE_ENV).ok()
}

/// A child process whose output is collected; dropping it kills it if it still runs and
/// prints its output, so a failing parent shows the child's side.
pub struct ChildProcess {
    pub child: Child,
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
    reaped: Option<ExitStatus>,
    stdout_seen: String,
}

fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut s = Vec::new();
        let _ = pipe.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    })
}

impl ChildProcess {
    pub fn new(mut child: Child) -> Self {
        let out = child.stdout.take().map(drain);
        let err = child.stderr.take().map(drain);
        Self {
            child,
            out,
            err,
            reaped: None,
            stdout_seen: String::new(),
        }
    }

    /// Waits up to `limit` for the child to exit; kills it after that.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                self.reaped = Some(s);
                return s;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let s = self.child.wait().unwrap();
                self.reaped = Some(s);
                panic!("the child did not exit within {limit:?}; killed it");
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// The child's stdout and stderr (after it exited).
    pub fn output(&mut self) -> (String, String) {
        let o = self
            .out
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default();
        let e = self
            .err
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default();
        (o, e)
    }

    /// Waits for a successful exit, showing the child's output if it failed.
    pub fn expect_success(&mut self, limit: Duration) {
        let status = self.wait(limit);
        let (o, e) = self.output();
        assert!(
            status.success(),
            "child failed ({status}):\n--- stdout\n{o}\n--- stderr\n{e}"
        );
        assert!(
            o.contains("test result: ok. 1 passed"),
            "the child ran no test (wrong filter?):\n{o}"
        );
        self.stdout_seen = o;
    }

    /// The stdout of a child that [`expect_success`](Self::expect_success) checked.
    pub fn stdout(&self) -> &str {
        &self.stdout_seen
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if self.reaped.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            if thread::panicking() {
                let (o, e) = self.output();
                eprintln!("--- child stdout\n{o}\n--- child stderr\n{e}");
            }
        }
    }
}
