//! Live migration of the real KVM test guest between processes. This test is its own
//! program (no test harness). Run without arguments it is the source: it boots the guest,
//! starts the traffic, and migrates the guest mid-stream into a chain of twenty processes
//! (this program again, each run with `--destination SOCKET`, all but the last with
//! `--then NEXT --at PACKETS`), each taking the guest over the migration stream (pre-copy
//! with dirty logging, the vCPU kicked out of `KVM_RUN`, the host's channel saved, `READY`,
//! `GO`) into everything of its own — its `/dev/kvm` handle, VM, memory, vCPU, ioeventfd and
//! irqfd — running it on until its own migration; the last runs it to the end and prints
//! what the host saw. Then once more with a 64 MiB guest and one destination. The source
//! checks the traffic's every check on the last process's result: every packet once and
//! in order both ways, every request completed once, across every migration.
//!
//! Prints `SKIPPED: <reason>` where `/dev/kvm` is unusable, unless `VMLINK_REQUIRE_KVM=1`,
//! which turns that into a failure.

use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use vm_memory::bitmap::AtomicBitmap;
use vmlink_kvm::test_vm::moving::{Move, Ran, migrate_in, migrate_out};
use vmlink_kvm::test_vm::stream::{self, Tag};
use vmlink_kvm::test_vm::{PACKETS, TestVm, build_guest, kvm_or_skip, watchdog};

/// Processes the guest passes through in the chain.
const HOPS: usize = 20;
/// RAM of the guest of the single migration.
const BIG: usize = 64 << 20;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .map(|i| args[i + 1].clone())
    };
    match (value("--destination"), value("--refuse")) {
        (Some(socket), _) => destination(&socket, value("--then"), value("--at")),
        (None, Some(socket)) => refuse(&socket),
        (None, None) => source(),
    }
}

/// One line for a move: `MOVE pid=.. at=.. passes=a,b final=.. downtime_us=.. total_us=..`.
fn move_line(m: &Move) -> String {
    let passes: Vec<String> = m.passes.iter().map(|p| p.pages.to_string()).collect();
    format!(
        "MOVE pid={} at={} passes={} final={} downtime_us={} total_us={}",
        std::process::id(),
        m.at_packet,
        passes.join(","),
        m.final_pages,
        m.downtime.as_micros(),
        m.total.as_micros()
    )
}

/// A destination: takes the guest on `socket`, then migrates it on to `then` once the host
/// has checked `at` packets, or runs it to the end; prints a `MOVE` or a `RESULT` line.
fn destination(socket: &str, then: Option<String>, at: Option<String>) -> ExitCode {
    let _dog = watchdog(Duration::from_secs(110));
    let listener = UnixListener::bind(socket).expect("listen");
    let (mut conn, _) = listener.accept().expect("the source connects");
    let mut connect = || UnixStream::connect(then.as_deref().unwrap_or_default());
    let onward = match (&then, &at) {
        (Some(_), Some(at)) => Some((at.parse().expect("--at PACKETS"), &mut connect as _)),
        _ => None,
    };
    match migrate_in(&mut conn, onward) {
        Ok(got) => {
            match got.then {
                Ran::Out(out) => println!("{}", move_line(&out.step)),
                Ran::Stayed(_, _, why) => {
                    // A chain's next process failed it: the test fails on the missing move.
                    eprintln!("destination {socket}: could not migrate on: {why}");
                    return ExitCode::FAILURE;
                }
                Ran::Done(s, exits) => {
                    let summary: Vec<String> = s.summary.iter().map(u64::to_string).collect();
                    println!(
                        "RESULT pid={} pages={} exits={} summary={} checks={}",
                        std::process::id(),
                        got.pages,
                        exits,
                        summary.join(","),
                        s.traffic_problem()
                            .map_or_else(|| "ok".to_owned(), |p| p.replace(' ', "_"))
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("destination {socket}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A hostile destination: reads the whole stream, then refuses the guest.
fn refuse(socket: &str) -> ExitCode {
    let _dog = watchdog(Duration::from_secs(60));
    let listener = UnixListener::bind(socket).expect("listen");
    let (mut conn, _) = listener.accept().expect("the source connects");
    stream::read_header(&mut conn).expect("a header");
    let mut buf = Vec::new();
    loop {
        match stream::read_record(&mut conn, &mut buf).expect("a record") {
            (Tag::End, _) => break,
            _ => continue,
        }
    }
    stream::write_record(&mut conn, Tag::Error, &[b"refused (a test)"]).expect("answer");
    ExitCode::SUCCESS
}

/// The value of `key=` in `line`.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("{key} in {line}"))
}

/// Waits up to 20 s for `path` to exist.
fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Migrates a guest of `memory` bytes through `hops` processes; returns every move's line
/// (the source's first) and the last process's `RESULT` line.
fn chain(elf: &[u8], memory: usize, hops: usize) -> Option<(Vec<String>, String)> {
    let (kvm, vm) = kvm_or_skip()?;
    let tvm = TestVm::<AtomicBitmap>::with_memory(kvm, vm, elf, 0, memory);
    // The traffic streams until the last process settles its count, however fast the
    // guest runs meanwhile.
    tvm.stream_until_told();
    let dir = std::env::temp_dir().join(format!("vmlink-migrate-{}-{memory}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .expect("a private directory");
    let sock = |i: usize| dir.join(format!("{i}.sock"));
    let at = |i: usize| u64::from(PACKETS) * i as u64 / (hops as u64 + 1);
    let exe = std::env::current_exe().expect("this test's program");
    let mut children: Vec<Child> = (1..=hops)
        .map(|i| {
            let mut c = Command::new(&exe);
            c.arg("--destination").arg(sock(i)).stdout(Stdio::piped());
            if i < hops {
                c.arg("--then")
                    .arg(sock(i + 1))
                    .arg("--at")
                    .arg(at(i + 1).to_string());
            }
            c.spawn().expect("start a destination process")
        })
        .collect();
    for i in 1..=hops {
        wait_for(&sock(i));
    }
    let conn = UnixStream::connect(sock(1)).expect("connect to the first destination");
    let out = match migrate_out(tvm, at(1), conn).expect("migrate out") {
        Ran::Out(out) => out,
        other => panic!("the first migration did not happen: {other:?}"),
    };
    let mut lines = vec![move_line(&out.step)];
    let mut result = None;
    for (i, child) in children.iter_mut().enumerate() {
        let mut said = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut said)
            .unwrap();
        let status = child.wait().expect("a destination's exit");
        assert!(status.success(), "destination {} failed: {status}", i + 1);
        for line in said.lines() {
            if line.starts_with("MOVE ") {
                lines.push(line.to_owned());
            } else if line.starts_with("RESULT ") {
                result = Some(line.to_owned());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Some((lines, result.expect("a RESULT from the last destination")))
}

/// The traffic's checks, as the last process made them, on its `RESULT` line.
fn check_result(line: &str) {
    assert_eq!(field(line, "checks"), "ok", "{line}");
    assert_eq!(field(line, "summary").split(',').count(), 12, "{line}");
}

/// Prints the moves and their downtimes; checks they went on, mid-stream, each from
/// another process.
fn check_moves(lines: &[String], hops: usize, memory: usize) {
    assert_eq!(
        lines.len(),
        hops,
        "every process but the last moved the guest on"
    );
    let mut pids: Vec<&str> = lines.iter().map(|l| field(l, "pid")).collect();
    let mut downtimes = Vec::new();
    let mut last = 0;
    for l in lines {
        println!("  {l}");
        let at: u64 = field(l, "at").parse().unwrap();
        // The traffic streams until the last process settles it: every move is mid-stream.
        assert!(at >= last && at > 0, "further on each time: {l}");
        last = at;
        let first: u64 = field(l, "passes")
            .split(',')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            first,
            memory as u64 / 4096,
            "the first pass sends all of RAM: {l}"
        );
        downtimes.push(field(l, "downtime_us").parse::<u64>().unwrap());
    }
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), hops, "each move from another process");
    downtimes.sort();
    println!(
        "  downtime: min {} µs, median {} µs, max {} µs (a {} MiB guest; goal under 10 ms)",
        downtimes[0],
        downtimes[downtimes.len() / 2],
        downtimes[downtimes.len() - 1],
        memory >> 20
    );
}

fn source() -> ExitCode {
    let dog = watchdog(Duration::from_secs(170));
    let elf = std::fs::read(build_guest()).expect("the guest ELF");
    let Some((lines, result)) = chain(&elf, 4 << 20, HOPS) else {
        return ExitCode::SUCCESS;
    };
    println!("a 4 MiB guest through {HOPS} processes:");
    check_moves(&lines, HOPS, 4 << 20);
    println!("  the last: {result}");
    check_result(&result);

    let Some((lines, result)) = chain(&elf, BIG, 1) else {
        return ExitCode::SUCCESS;
    };
    println!("a {} MiB guest into another process:", BIG >> 20);
    check_moves(&lines, 1, BIG);
    println!("  the destination: {result}");
    check_result(&result);

    // A destination process that takes the whole stream and then refuses: the source's
    // guest, stopped for the last pages, goes on where it was and runs to its end.
    let (kvm, vm) = kvm_or_skip().expect("KVM, as above");
    let tvm = TestVm::<AtomicBitmap>::with_bitmap(kvm, vm, &elf, 0);
    tvm.stream_until_told();
    let dir = std::env::temp_dir().join(format!("vmlink-migrate-refuse-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .expect("a private directory");
    let socket = dir.join("refuse.sock");
    let mut child = Command::new(std::env::current_exe().expect("this test's program"))
        .arg("--refuse")
        .arg(&socket)
        .spawn()
        .expect("start the hostile destination");
    wait_for(&socket);
    let conn = UnixStream::connect(&socket).expect("connect");
    let ran = migrate_out(tvm, u64::from(PACKETS) / 2, conn).expect("the source's run");
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    match ran {
        Ran::Stayed(stats, _, why) => {
            println!("a destination that refused: {why}; the guest ran to its end in the source");
            assert!(why.contains("refused (a test)"), "{why}");
            assert_eq!(stats.traffic_problem(), None);
        }
        other => panic!("expected the guest to stay: {other:?}"),
    }
    let _ = dog.send(());
    println!("ok: every packet once and in order across every migration");
    ExitCode::SUCCESS
}
