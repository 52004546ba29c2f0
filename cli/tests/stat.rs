//! `vmlink stat` and `vmlink top` against live channels: this test process hosts and
//! connects channels through the library (so it knows every packet it sent), and the
//! commands, run as other processes, must report exactly that traffic.

mod common;

use std::os::unix::net::UnixListener;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmlink_channel::{ChannelError, Wait};
use vmlink_shm::{Guest, Layout, Listener, Service, monitor};

fn vmlink(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmlink"))
        .args(args)
        .output()
        .unwrap()
}

/// `vmlink stat --json --dir DIR`, parsed.
fn stat(dir: &str) -> Value {
    let out = vmlink(&["stat", "--json", "--dir", dir]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stat --json prints one JSON object")
}

/// This process's entry in a `stat` answer.
fn me(stat: &Value) -> &Value {
    stat["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["pid"] == std::process::id())
        .expect("this process is listed")
}

/// This process's channel of `service` on side `role`.
fn channel<'a>(stat: &'a Value, service: &str, role: &str) -> &'a Value {
    me(stat)["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["service"] == service && c["role"] == role)
        .unwrap_or_else(|| panic!("no {role} channel of {service} in {stat}"))
}

fn counter(c: &Value, name: &str) -> u64 {
    c["counters"][name].as_u64().unwrap()
}

/// Bytes a packet of `payload` bytes takes in the ring as the counters count it: the
/// 16-byte descriptor and the payload padded to 8 bytes.
fn counted(payload: u64) -> u64 {
    16 + payload.next_multiple_of(8)
}

#[test]
fn stat_and_top_report_the_traffic_sent_and_ignore_dead_processes() {
    let dir = common::private_dir("stat");
    let runtime = dir.join("runtime");
    let runtime_s = runtime.to_str().unwrap().to_owned();
    monitor::set_runtime_dir(&runtime);

    // Nothing is published yet: an empty (missing) directory is no error.
    let empty = stat(&runtime_s);
    assert_eq!(empty["hosts"], serde_json::json!([]));

    let path = dir.join("stat.sock");
    let service = Service::new("counted").with_layout(Layout::symmetric(64 * 4096, 0));
    let listener = Listener::bind(&path, service).unwrap();
    let connecting = {
        let path = path.clone();
        thread::spawn(move || Guest::new("counted").connect(&path))
    };
    let host = listener.accept().unwrap();
    let guest = connecting.join().unwrap().unwrap();

    // Processes that died leave their sockets: a socket nobody answers on, named after a
    // pid that no longer exists; and files that are no report at all.
    let dead_pid = {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    };
    drop(UnixListener::bind(runtime.join(format!("{dead_pid}.sock"))).unwrap());
    std::fs::write(runtime.join("12.sock"), b"a regular file").unwrap();
    std::fs::write(runtime.join("notes.txt"), b"not a socket").unwrap();

    // The listener is listed with its service.
    let s = stat(&runtime_s);
    assert_eq!(s["stale"].as_array().unwrap().len(), 1, "{s}");
    assert!(
        s["stale"][0]
            .as_str()
            .unwrap()
            .ends_with(&format!("/{dead_pid}.sock"))
    );
    assert_eq!(me(&s)["listeners"][0]["path"], path.to_str().unwrap());
    assert_eq!(
        me(&s)["listeners"][0]["services"],
        serde_json::json!(["counted"])
    );

    // 1,000 packets of 100 bytes guest → host, all received.
    const N: u64 = 1000;
    let payload = [7u8; 100];
    let mut buf = [0u8; 256];
    for _ in 0..N {
        guest.channel().send(&payload, None).unwrap();
        host.channel().recv(&mut buf, None).unwrap();
    }
    // Five more the host does not read, and three calls from the host the guest leaves
    // unanswered.
    for _ in 0..5 {
        guest.channel().send(&payload, None).unwrap();
    }
    for i in 0..3u8 {
        host.channel().start_request(&[i; 24], Wait::Now).unwrap();
    }

    let s = stat(&runtime_s);
    let h = channel(&s, "counted", "host");
    let g = channel(&s, "counted", "guest");
    assert_eq!(counter(h, "packets_received"), N);
    assert_eq!(counter(h, "bytes_received"), N * counted(100));
    assert_eq!(counter(g, "packets_sent"), N + 5);
    assert_eq!(counter(g, "bytes_sent"), (N + 5) * counted(100));
    assert_eq!(counter(h, "packets_sent"), 3);
    assert_eq!(counter(h, "bytes_sent"), 3 * counted(24));
    assert_eq!(h["calls_in_flight"], 3);
    assert_eq!(g["calls_in_flight"], 0);
    // The five unread packets wait in the host's incoming ring, each with the 8 bytes
    // VMBus puts after a packet; the three requests in its outgoing one.
    assert_eq!(h["incoming"]["used"], 5 * (counted(100) + 8));
    assert_eq!(h["outgoing"]["used"], 3 * (counted(24) + 8));
    assert_eq!(
        h["incoming"]["size"],
        64 * 4096,
        "the data area the layout asked for"
    );
    assert_eq!(h["state"], "open");
    assert_eq!(h["peer"]["pid"], std::process::id());

    // The text form says the same.
    let text = vmlink(&["stat", "--dir", &runtime_s]);
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("1 stale registration of dead processes ignored"),
        "{text}"
    );
    assert!(text.contains(&format!("received {N} packets")), "{text}");
    assert!(text.contains("calls in flight 3"), "{text}");

    // Live traffic: a stream of at most 20,000 packets/s (200, then at least 10 ms of
    // sleep) while `vmlink top` samples it twice.
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let streaming = thread::spawn(move || {
        let mut sent = 0u64;
        let mut buf = [0u8; 256];
        // Drain the five waiting packets first.
        for _ in 0..5 {
            host.channel().recv(&mut buf, None).unwrap();
        }
        while stop_rx.try_recv().is_err() {
            for _ in 0..200 {
                guest.channel().send(&payload, None).unwrap();
                host.channel().recv(&mut buf, None).unwrap();
            }
            sent += 200;
            thread::sleep(Duration::from_millis(10));
        }
        (host, guest, sent)
    });
    thread::sleep(Duration::from_millis(200));
    let top = vmlink(&[
        "top",
        "--json",
        "--dir",
        &runtime_s,
        "--interval",
        "0.3",
        "--count",
        "2",
    ]);
    assert!(
        top.status.success(),
        "{}",
        String::from_utf8_lossy(&top.stderr)
    );
    stop_tx.send(()).unwrap();
    let (host, guest, sent) = streaming.join().unwrap();
    let frames: Vec<Value> = String::from_utf8(top.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(frames.len(), 2);
    let row = |f: &Value| -> Value {
        f["channels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| {
                r["pid"] == std::process::id()
                    && r["channel"]["service"] == "counted"
                    && r["channel"]["role"] == "host"
            })
            .cloned()
            .expect("the host channel")
    };
    let (a, b) = (row(&frames[0]), row(&frames[1]));
    let rate = b["per_second"]["packets_received"].as_f64().unwrap();
    // The rate is the counters' difference over the time between the two answers.
    let dt = (b["sampled_ns"].as_u64().unwrap() - a["sampled_ns"].as_u64().unwrap()) as f64 / 1e9;
    assert!(rate > 0.0, "the stream was running: {b}");
    // A window of dt seconds holds at most dt / 10 ms + 1 batches of 200.
    let most = (dt / 0.01 + 1.0) * 200.0 / dt;
    assert!(rate <= most, "no more than was sent: {rate} > {most}");
    let delta =
        counter(&b["channel"], "packets_received") - counter(&a["channel"], "packets_received");
    assert!(
        (rate * dt - delta as f64).abs() < 1.0,
        "rate {rate} over {dt} s vs {delta}"
    );
    let bytes_rate = b["per_second"]["bytes_received"].as_f64().unwrap();
    assert!((bytes_rate - rate * counted(100) as f64).abs() < 1.0);

    // After the stream: every packet counted once, nothing left in the rings but the
    // three unanswered requests.
    let s = stat(&runtime_s);
    let h = channel(&s, "counted", "host");
    assert_eq!(counter(h, "packets_received"), N + 5 + sent);
    assert_eq!(
        counter(channel(&s, "counted", "guest"), "packets_sent"),
        N + 5 + sent
    );
    assert_eq!(h["incoming"]["used"], 0);

    // A guest that leaves: once the host's channel has seen it go, stat says so; dropped
    // channels and listeners disappear.
    drop(guest);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 256];
    while host.channel().recv(&mut buf, Wait::Now) != Err(ChannelError::Closed) {
        assert!(
            Instant::now() < deadline,
            "the host never saw the guest leave"
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        channel(&stat(&runtime_s), "counted", "host")["state"],
        "peer_closed"
    );
    drop(host);
    drop(listener);
    let s = stat(&runtime_s);
    assert_eq!(me(&s)["channels"], serde_json::json!([]));
    assert_eq!(me(&s)["listeners"], serde_json::json!([]));

    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn top_and_stat_refuse_wrong_flags() {
    for (args, needle) in [
        (
            &["top", "--interval", "0"][..],
            "--interval 0 is out of range",
        ),
        (&["top", "--interval", "NaN"][..], "out of range"),
        (&["top", "--count", "0"][..], "--count 0"),
        (&["stat", "--dir", "/etc/passwd"][..], "Not a directory"),
    ] {
        let out = vmlink(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // The default directory must be private: sockets another user put in a shared one
    // could answer with made-up reports.
    let dir = common::private_dir("stat-open-dir");
    let open = dir.join("vmlink");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmlink"))
        .arg("stat")
        .env("XDG_RUNTIME_DIR", &dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("must be a directory owned by this user with mode 0700"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);

    let out = Command::new(env!("CARGO_BIN_EXE_vmlink"))
        .args(["stat", "--bogus"])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_process_that_answers_garbage_or_nothing_is_reported_not_trusted() {
    let dir = common::private_dir("stat-garbage");
    let dir_s = dir.to_str().unwrap().to_owned();
    // Same user, so it may publish; but what it says is no report, or it says nothing.
    let garbage = UnixListener::bind(dir.join("1.sock")).unwrap();
    let silent = UnixListener::bind(dir.join("2.sock")).unwrap();
    let newer = UnixListener::bind(dir.join("3.sock")).unwrap();
    let answering = thread::spawn(move || {
        use std::io::Write;
        let (mut s, _) = garbage.accept().unwrap();
        s.write_all(b"hello, I am not a report").unwrap();
        drop(s);
        let (mut s, _) = newer.accept().unwrap();
        s.write_all(b"VMLKSTAT\x07\x00whatever comes in version 7")
            .unwrap();
    });
    let started = Instant::now();
    let out = vmlink(&["stat", "--json", "--dir", &dir_s]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a silent process is not waited for long"
    );
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["hosts"], serde_json::json!([]));
    let failed = s["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 3, "{s}");
    let error = |name: &str| -> String {
        failed
            .iter()
            .find(|f| f["path"].as_str().unwrap().ends_with(name))
            .unwrap()["error"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(error("/1.sock"), "the answer is not a vmlink report");
    assert_eq!(error("/2.sock"), "no answer within 2s");
    assert_eq!(
        error("/3.sock"),
        "the report is format version 7; this code reads up to 1"
    );
    answering.join().unwrap();
    // Nobody ever accepted on the silent socket: its connection waited in the backlog.
    drop(silent);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stream_link_channels_of_vmlink_serve_and_connect_are_listed_too() {
    let dir = common::private_dir("stat-stream");
    let runtime = dir.join("runtime");
    let sock = dir.join("pipe.sock");
    let spawn = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vmlink"))
            .args(args)
            .env("XDG_RUNTIME_DIR", &runtime)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    std::fs::create_dir(&runtime).unwrap();
    let mut server = spawn(&["serve", "--unix-stream", sock.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "serve never listened");
        thread::sleep(Duration::from_millis(10));
    }
    let mut client = spawn(&["connect", "--unix-stream", sock.to_str().unwrap()]);
    let published = runtime.join("vmlink");
    let published_s = published.to_str().unwrap().to_owned();
    let channels = loop {
        let s = stat(&published_s);
        let channels: Vec<Value> = s["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|h| h["channels"].as_array().unwrap().clone())
            .collect();
        if channels.len() == 2 {
            break channels;
        }
        assert!(Instant::now() < deadline, "both ends never published: {s}");
        thread::sleep(Duration::from_millis(20));
    };
    let mut roles: Vec<&str> = channels
        .iter()
        .map(|c| c["role"].as_str().unwrap())
        .collect();
    roles.sort();
    assert_eq!(roles, ["guest", "host"]);
    for c in &channels {
        assert_eq!(c["service"], "vmlink-pipe");
        assert_eq!(c["peer"], Value::Null, "a stream link cannot tell its peer");
        assert_eq!(c["outgoing"], Value::Null, "and has no rings");
        assert_eq!(c["state"], "open");
    }
    let _ = server.kill();
    let _ = client.kill();
    let _ = server.wait();
    let _ = client.wait();
    // Both died without a word: their sockets are stale now, and ignored.
    let s = stat(&published_s);
    assert_eq!(s["hosts"], serde_json::json!([]));
    assert_eq!(s["stale"].as_array().unwrap().len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}
