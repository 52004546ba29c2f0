//! `vmlink ic` against `vmlink agent`, two processes over vmlink-shm: the commands README.md
//! shows, every service, and a host that lies or vanishes.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const VMLINK: &str = env!("CARGO_BIN_EXE_vmlink");

/// A private directory for one test, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("vmlink-ic-cli-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .expect("test dir");
        Self(fs::canonicalize(path).expect("canonical"))
    }

    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A running agent, killed at the end (also when a test fails).
struct Agent {
    child: Option<Child>,
    socket: PathBuf,
}

impl Agent {
    fn start(dir: &Dir, extra: &[&str]) -> Self {
        let socket = dir.join("ic.sock");
        // A killed agent leaves its socket file: wait for this one's.
        let _ = fs::remove_file(&socket);
        let child = Command::new(VMLINK)
            .arg("agent")
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agent");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the agent did not listen");
            thread::sleep(Duration::from_millis(10));
        }
        Self {
            child: Some(child),
            socket,
        }
    }

    /// Runs `vmlink ic --socket S ARGS...`.
    fn ic(&self, args: &[&str]) -> Output {
        Command::new(VMLINK)
            .arg("ic")
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run vmlink ic")
    }

    /// Runs a request that must succeed; returns its standard output.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.ic(args);
        assert!(
            out.status.success(),
            "vmlink ic {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// Stops the agent; returns its log.
    fn stop(mut self) -> String {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let out = child.wait_with_output().expect("agent output");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The number after `"key":` in a flat JSON object.
fn json_number(json: &str, key: &str) -> f64 {
    let at = json
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("{key} in {json}"));
    let rest = &json[at + key.len() + 3..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '-' || c == '.'))
        .unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|_| panic!("{key} in {json}"))
}

/// 64-bit FNV-1a of a file.
fn hash(path: &Path) -> u64 {
    fs::read(path)
        .expect("read")
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        })
}

#[test]
fn heartbeats_time_sync_and_kvp_in_every_pool() {
    let dir = Dir::new("services");
    let kvp = dir.join("kvp");
    let agent = Agent::start(
        &dir,
        &[
            "--kvp-file",
            kvp.to_str().expect("utf-8"),
            "--clock-skew-ms",
            "250",
        ],
    );

    let out = agent.ok(&["--json", "heartbeat", "--count", "1000"]);
    assert_eq!(json_number(&out, "heartbeats"), 1000.0);
    let p50 = json_number(&out, "p50");
    assert!(p50 > 0.0, "{out}");
    println!(
        "heartbeat round trip over vmlink-shm: p50 {:.1} µs ({out})",
        p50 / 1e3
    );

    // The agent measures its own skew: within 1 ms of the 250 ms injected.
    let out = agent.ok(&["--json", "time", "--samples", "20", "--sync"]);
    let offset_ms = json_number(&out, "offset_ns") / 1e6;
    assert!(
        (offset_ms - 250.0).abs() < 1.0,
        "measured {offset_ms} ms: {out}"
    );
    println!("time sync: the agent measured {offset_ms:.4} ms for a 250 ms skew");

    for pool in ["external", "guest", "auto-external", "auto-internal"] {
        let key = format!("k-{pool}");
        assert_eq!(
            agent.ok(&["kvp", "set", "--pool", pool, &key, "v 1\tx"]),
            format!("{key} set\n")
        );
        assert_eq!(agent.ok(&["kvp", "get", "--pool", pool, &key]), "v 1\tx\n");
        let list = agent.ok(&["--json", "kvp", "list", "--pool", pool]);
        assert_eq!(
            list,
            format!("{{\"entries\":[{{\"key\":\"{key}\",\"value\":\"v 1\\u0009x\"}}]}}\n")
        );
        assert_eq!(
            agent.ok(&["kvp", "delete", "--pool", pool, &key]),
            format!("{key} deleted\n")
        );
        let gone = agent.ic(&["kvp", "get", "--pool", pool, &key]);
        assert_eq!(gone.status.code(), Some(1), "a missing key is a refusal");
    }
    agent.ok(&["kvp", "set", "--pool", "guest", "kept", "yes"]);
    // The auto pool: the agent's own values, read-only to the host.
    let auto = agent.ok(&["kvp", "list", "--pool", "auto"]);
    assert!(auto.starts_with("FullyQualifiedDomainName\t"), "{auto}");
    assert!(auto.contains("VmlinkTimeOffsetNs\t"), "{auto}");
    assert_eq!(
        agent
            .ic(&["kvp", "set", "--pool", "auto", "OSName", "x"])
            .status
            .code(),
        Some(1)
    );
    let log = agent.stop();
    assert!(log.contains("the auto pool is read-only"), "{log}");
    assert!(
        log.contains("ic-timesync: the agent's clock is +250.0"),
        "{log}"
    );

    // The store persisted what was set, and a new agent serves it.
    let agent = Agent::start(&dir, &["--kvp-file", kvp.to_str().expect("utf-8")]);
    assert_eq!(
        agent.ok(&["kvp", "get", "--pool", "guest", "kept"]),
        "yes\n"
    );
    agent.stop();
}

#[test]
fn a_100_mb_copy_arrives_whole_and_a_vanished_copy_leaves_nothing() {
    let dir = Dir::new("copy");
    let root = dir.join("root");
    fs::create_dir(&root).expect("root");
    let agent = Agent::start(&dir, &["--files-root", root.to_str().expect("utf-8")]);

    let src = dir.join("src.bin");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..100_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    fs::write(&src, &data).expect("source");
    drop(data);
    let dest = format!("{}/in/big.bin", root.display());
    let out = agent.ok(&[
        "--json",
        "copy",
        src.to_str().expect("utf-8"),
        &dest,
        "--create-path",
    ]);
    assert_eq!(json_number(&out, "bytes"), 100_000_000.0);
    assert_eq!(hash(&src), hash(Path::new(&dest)), "the copy's hash");
    println!("file copy, 100 MB: {out}");

    // Not again without --overwrite; outside the root never.
    let again = agent.ic(&["copy", src.to_str().expect("utf-8"), &dest]);
    assert_eq!(again.status.code(), Some(1));
    let outside = agent.ic(&["copy", src.to_str().expect("utf-8"), "/tmp/escape.bin"]);
    assert_eq!(outside.status.code(), Some(1));
    assert!(!Path::new("/tmp/escape.bin").exists());
    let dots = format!("{}/in/../../escape.bin", root.display());
    assert_eq!(
        agent
            .ic(&["copy", src.to_str().expect("utf-8"), &dots])
            .status
            .code(),
        Some(1)
    );

    // A host killed mid-copy: the agent removes the partial file.
    let mut host = Command::new(VMLINK)
        .args(["ic", "--socket"])
        .arg(&agent.socket)
        .args(["copy", src.to_str().expect("utf-8")])
        .arg(format!("{}/in/vanished.bin", root.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a copy");
    let partial = |root: &Path| {
        fs::read_dir(root.join("in"))
            .expect("dir")
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains("vanished"))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !partial(&root) {
        assert!(Instant::now() < deadline, "the copy never started");
        thread::sleep(Duration::from_millis(1));
    }
    host.kill().expect("kill the host");
    host.wait().expect("reap");
    let deadline = Instant::now() + Duration::from_secs(10);
    while partial(&root) {
        assert!(Instant::now() < deadline, "the partial copy stayed");
        thread::sleep(Duration::from_millis(10));
    }
    let names: Vec<String> = fs::read_dir(root.join("in"))
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["big.bin"]);
    let log = agent.stop();
    assert!(log.contains("the channel closed during a copy"), "{log}");
}

#[test]
fn shutdown_runs_the_configured_command_and_nothing_else() {
    let dir = Dir::new("shutdown");
    let marker = dir.join("shutdown.txt");
    let command = format!(
        "echo \"$VMLINK_SHUTDOWN_ACTION $VMLINK_SHUTDOWN_FORCE $VMLINK_SHUTDOWN_REASON $VMLINK_SHUTDOWN_MESSAGE\" > {}",
        marker.display()
    );
    let agent = Agent::start(&dir, &["--shutdown-command", &command]);
    let out = agent.ok(&[
        "shutdown",
        "--reboot",
        "--force",
        "--code",
        "5",
        "--reason",
        "kernel update",
    ]);
    assert_eq!(out, "the guest accepted: Reboot\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the command did not run");
        thread::sleep(Duration::from_millis(10));
    }
    thread::sleep(Duration::from_millis(50));
    assert_eq!(
        fs::read_to_string(&marker).expect("marker"),
        "reboot 1 5 kernel update\n"
    );
    agent.stop();

    // Without a command: refused, and nothing runs.
    let agent = Agent::start(&dir, &[]);
    let out = agent.ic(&["--json", "shutdown", "--reason", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "{\"refused\":true,\"status\":2147500037}\n"
    );
    agent.stop();
}

#[test]
fn wrong_flags_a_missing_agent_and_a_second_agent_are_errors() {
    let dir = Dir::new("errors");
    let socket = dir.join("ic.sock");
    let run = |args: &[&str]| Command::new(VMLINK).args(args).output().expect("run");
    // No agent there.
    let out = run(&[
        "ic",
        "--socket",
        socket.to_str().expect("utf-8"),
        "heartbeat",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("connect to the agent"));
    // Usage errors.
    assert_eq!(
        run(&["ic", "--socket", "x", "kvp", "get"]).status.code(),
        Some(2)
    );
    assert_eq!(
        run(&["ic", "--socket", "x", "kvp", "list", "--pool", "nine"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(run(&["ic", "heartbeat"]).status.code(), Some(2));
    assert_eq!(run(&["agent"]).status.code(), Some(2));
    let agent = Agent::start(&dir, &[]);
    assert_eq!(
        agent.ic(&["heartbeat", "--count", "0"]).status.code(),
        Some(2)
    );
    // A second agent on the same socket fails and leaves the first serving.
    let second = run(&["agent", "--socket", socket.to_str().expect("utf-8")]);
    assert_eq!(second.status.code(), Some(2));
    agent.ok(&["heartbeat", "--count", "10"]);
    // A copy from a missing host file.
    let out = agent.ic(&["copy", "/nonexistent/file", "/x/y"]);
    assert_eq!(out.status.code(), Some(2));
    agent.stop();
}

/// The `vmlink agent` / `vmlink ic` block of README.md, run as it is written, with its
/// directory moved into the test's own and `vmlink` this build's binary.
#[test]
fn the_readme_block_runs_as_written() {
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let start = readme
        .find("  ```sh\n  mkdir -p -m 700 /tmp/ic")
        .expect("the block in README.md");
    let body = &readme[start + "  ```sh\n".len()..];
    let block: String = body[..body.find("  ```\n").expect("the block's end")]
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let dir = Dir::new("readme");
    let base = dir.join("ic");
    // `vmlink` on the PATH is this build's binary (a shell function would put the agent
    // in a subshell that `kill $!` does not reach).
    let bin = dir.join("bin");
    fs::create_dir(&bin).expect("bin dir");
    std::os::unix::fs::symlink(VMLINK, bin.join("vmlink")).expect("link the binary");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = format!(
        "set -e\n{}\n",
        block.replace("/tmp/ic", base.to_str().expect("utf-8"))
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("PATH", path)
        .output()
        .expect("run the block");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    for expected in [
        "1000 heartbeats answered",
        "the agent's clock is",
        "Role set",
        "FullyQualifiedDomainName\t",
        "copied 104857600 bytes",
        "the guest accepted: Reboot",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from:\n{stdout}"
        );
    }
    assert_eq!(
        hash(&base.join("big.bin")),
        hash(&base.join("inbox/big.bin"))
    );
    let log = fs::read_to_string(base.join("shutdown.log")).expect("the command ran");
    assert_eq!(log, "asked to reboot\n");
    println!("README block:\n{stdout}");
}

/// `--slew-clock` needs CAP_SYS_TIME: refused without it; with it, the agent slews by the
/// (microsecond-sized) offset it measures between two processes on one machine.
#[test]
fn slewing_the_clock_needs_the_privilege() {
    let dir = Dir::new("slew");
    let socket = dir.join("ic.sock");
    let out = Command::new("setpriv")
        .args([
            "--bounding-set",
            "-sys_time",
            "--inh-caps",
            "-sys_time",
            VMLINK,
            "agent",
        ])
        .arg("--socket")
        .arg(&socket)
        .arg("--slew-clock")
        .output()
        .expect("setpriv (util-linux) runs the agent without CAP_SYS_TIME");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs CAP_SYS_TIME"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!socket.exists(), "a refused agent does not listen");

    let privileged = fs::read_to_string("/proc/self/status")
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 25) != 0);
    if privileged {
        let agent = Agent::start(&dir, &["--slew-clock"]);
        agent.ok(&["time", "--samples", "3"]);
        let log = agent.stop();
        assert!(log.contains("slewing the clock by"), "{log}");
    } else {
        let out = Command::new(VMLINK)
            .args(["agent", "--slew-clock", "--socket"])
            .arg(&socket)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "unprivileged here: refused");
    }
}

/// A host that holds channels open cannot make the agent serve more than `--max-channels`:
/// the one past it is closed at once, and a channel is served again once one is free.
#[test]
fn channels_past_the_limit_are_closed() {
    let dir = Dir::new("limit");
    let agent = Agent::start(&dir, &["--max-channels", "1"]);
    // A host that opens the heartbeat channel and says nothing: `vmlink connect` asks for
    // the service by name and waits on its stdin.
    let mut holder = Command::new(VMLINK)
        .args(["connect", "--service", "ic-heartbeat", "--socket"])
        .arg(&agent.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("a host holding a channel");
    // Wait until the holder's channel is served.
    thread::sleep(Duration::from_millis(300));
    let refused = agent.ic(&["--timeout-ms", "2000", "heartbeat", "--count", "1"]);
    assert_eq!(refused.status.code(), Some(2), "past the limit: closed");
    holder.kill().expect("kill the holder");
    holder.wait().expect("reap");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if agent.ic(&["heartbeat", "--count", "1"]).status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the freed channel is never served again"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let log = agent.stop();
    assert!(log.contains("1 channels are served already"), "{log}");
}

#[test]
fn a_role_based_policy_grants_each_service_and_operation_as_written() {
    let dir = Dir::new("policy");
    // This user's uid: the owner of the directory it just made.
    let uid = std::os::unix::fs::MetadataExt::uid(&fs::metadata(&dir.0).unwrap());
    let policy = dir.join("policy.toml");
    fs::write(
        &policy,
        format!(
            "[roles.reader]\n\
             services = [\"ic-heartbeat\", \"ic-kvp\"]\n\
             operations = [\"heartbeat\", \"kvp.read\"]\n\n\
             [[principals]]\nuid = {uid}\nroles = [\"reader\"]\n"
        ),
    )
    .unwrap();
    let kvp = dir.join("kvp");
    let agent = Agent::start(
        &dir,
        &[
            "--policy",
            policy.to_str().unwrap(),
            "--kvp-file",
            kvp.to_str().unwrap(),
        ],
    );
    // Granted: a heartbeat, and reading the KVP pools.
    agent.ok(&["heartbeat", "--count", "3"]);
    agent.ok(&["kvp", "list", "--pool", "auto"]);
    // An operation the role lacks: refused, and nothing changed.
    let set = agent.ic(&["kvp", "set", "--pool", "guest", "Role", "web"]);
    assert_eq!(
        set.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let gone = agent.ic(&["kvp", "get", "--pool", "guest", "Role"]);
    assert_eq!(gone.status.code(), Some(1));
    // A service the role does not open: refused at the handshake with no detail.
    let shutdown = agent.ic(&["shutdown", "--reason", "test"]);
    assert_eq!(shutdown.status.code(), Some(2));
    let err = String::from_utf8_lossy(&shutdown.stderr);
    assert!(err.contains("not allowed"), "{err}");
    assert!(
        !err.contains("role"),
        "the client learns nothing of the policy: {err}"
    );
    // The agent logs a refused connection from its accept loop, which takes connections
    // in order: once a later one is served, the refusal is in the log.
    agent.ok(&["heartbeat", "--count", "1"]);
    let log = agent.stop();
    assert!(
        log.contains(&format!("vmlink-policy: deny uid={uid} gids=")),
        "{log}"
    );
    assert!(
        log.contains("ic-kvp kvp.write: no role of the peer (reader) grants kvp.write in ic-kvp"),
        "{log}"
    );
    assert!(
        log.contains("ic-shutdown open: no role of the peer (reader) opens ic-shutdown"),
        "{log}"
    );
}

#[test]
fn vmlink_policy_check_validates_and_explains() {
    let dir = Dir::new("policy-check");
    let good = dir.join("good.toml");
    fs::write(
        &good,
        "[roles.reader]\nservices = [\"ic-kvp\"]\noperations = [\"kvp.read\"]\n\n[[principals]]\ngid = 27\nroles = [\"reader\"]\n",
    )
    .unwrap();
    let run = |args: &[&str]| Command::new(VMLINK).args(args).output().unwrap();
    let g = good.to_str().unwrap();
    let out = run(&["policy", "check", g]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid: 1 roles, 1 principals"));
    let out = run(&[
        "policy",
        "check",
        g,
        "--uid",
        "1000",
        "--gid",
        "1000",
        "--gid",
        "27",
        "--service",
        "ic-kvp",
        "--operation",
        "kvp.read",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("matches the principal on line 5 (gid 27)"),
        "{text}"
    );
    assert!(
        text.contains("vmlink-policy: allow uid=1000 gids=1000,27"),
        "{text}"
    );
    let out = run(&[
        "policy",
        "check",
        g,
        "--uid",
        "1000",
        "--gid",
        "27",
        "--service",
        "ic-kvp",
        "--operation",
        "kvp.write",
    ]);
    assert_eq!(out.status.code(), Some(1), "denied");
    let bad = dir.join("bad.toml");
    fs::write(
        &bad,
        "[roles.r]\n[[principals]]\nuid = 1\nroles = [\"x\"]\n",
    )
    .unwrap();
    let out = run(&["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:2: role \"x\" is not defined"),
        "{err}"
    );
    let out = run(&[
        "policy",
        "check",
        dir.join("missing.toml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
}
