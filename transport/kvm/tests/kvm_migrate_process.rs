//! Live migration of the real KVM test guest into another process. This test is its own
//! program (no test harness): run without arguments it is the source, which boots the
//! guest (64 MiB of RAM), starts the traffic, spawns itself again with `--destination SOCKET` and migrates
//! the guest there mid-stream over the migration stream (pre-copy with dirty logging, the
//! vCPU kicked out of `KVM_RUN`, the host's channel saved, `READY`, `GO`). The destination
//! makes everything anew — its own `/dev/kvm` handle, VM, memory, vCPU, ioeventfd and
//! irqfd — restores the vCPU, VM and host endpoint state, runs the guest to the end and
//! prints what the host saw. The source checks the traffic's every check on that: every
//! packet once and in order both ways, every request completed once.
//!
//! Prints `SKIPPED: <reason>` where `/dev/kvm` is unusable, unless `VMLINK_REQUIRE_KVM=1`,
//! which turns that into a failure.

use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use vm_memory::bitmap::AtomicBitmap;
use vmlink_kvm::test_vm::moving::{migrate_in, migrate_out};
use vmlink_kvm::test_vm::{PACKETS, TestVm, build_guest, kvm_or_skip, watchdog};

/// The guest's RAM.
const MEMORY: usize = 64 << 20;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--destination") {
        Some(i) => destination(args.get(i + 1).expect("--destination SOCKET")),
        None => source(),
    }
}

/// The destination: takes the guest, runs it, prints one `RESULT` line.
fn destination(socket: &str) -> ExitCode {
    let _dog = watchdog(Duration::from_secs(60));
    let mut conn = UnixStream::connect(socket).expect("connect to the source");
    match migrate_in(&mut conn) {
        Ok(got) => {
            let s = &got.stats;
            let summary: Vec<String> = s.summary.iter().map(u64::to_string).collect();
            println!(
                "RESULT pid={} data_ok={} requests={} sent={} gpa_ok={} irq={} pages={} \
                 ran_us={} host_us={} exits={} summary={}",
                std::process::id(),
                s.data_ok,
                s.requests_completed,
                s.sent,
                s.gpa_ok,
                s.irq_raised,
                got.pages,
                got.ran.as_micros(),
                got.host_done.as_micros(),
                got.exits,
                summary.join(",")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("destination: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The value of `key=` in `line`.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("{key} in {line}"))
}

fn source() -> ExitCode {
    let Some((kvm, vm)) = kvm_or_skip() else {
        return ExitCode::SUCCESS;
    };
    let dog = watchdog(Duration::from_secs(120));
    let elf = std::fs::read(build_guest()).expect("the guest ELF");
    // 64 MiB of guest RAM: the first pass moves it all while the guest runs; the downtime
    // holds only what was written since.
    let tvm = TestVm::<AtomicBitmap>::with_memory(kvm, vm, &elf, 0, MEMORY);

    let dir = std::env::temp_dir().join(format!("vmlink-migrate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .expect("a private directory");
    let socket = dir.join("migrate.sock");
    let listener = UnixListener::bind(&socket).expect("listen");
    let mut child = Command::new(std::env::current_exe().expect("this test's program"))
        .arg("--destination")
        .arg(&socket)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the destination process");
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("the destination never connected: {e}"),
        }
    };
    conn.set_nonblocking(false).unwrap();

    let out = migrate_out(tvm, u64::from(PACKETS) / 2, &mut conn).expect("migrate out");
    let m = &out.step;
    println!(
        "migrated at guest packet {}: passes {:?} pages; stopped: {} pages (guest {}, host \
         {}); stop {:.1?}, last pages {:.1?}, state and answer {:.1?}; downtime {:.1?}, \
         total {:.1?}",
        m.at_packet,
        m.passes.iter().map(|p| p.pages).collect::<Vec<_>>(),
        m.final_pages,
        m.final_split.0,
        m.final_split.1,
        m.stop,
        m.copy,
        m.state,
        m.downtime,
        m.total
    );

    let mut said = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut said)
        .unwrap();
    let status = child.wait().expect("the destination's exit");
    let _ = dog.send(());
    let _ = std::fs::remove_dir_all(&dir);
    assert!(status.success(), "the destination failed: {status}");
    let line = said
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT from the destination: {said}"));
    println!("destination: {line}");

    let num = |k: &str| field(line, k).parse::<u64>().unwrap();
    assert_ne!(num("pid"), u64::from(std::process::id()), "another process");
    assert!(
        m.at_packet > 0 && m.at_packet < u64::from(PACKETS),
        "mid-stream"
    );
    assert_eq!(
        m.passes[0].pages,
        MEMORY as u64 / 4096,
        "the first pass sends all of RAM"
    );
    println!(
        "downtime {:.1?} for a {} MiB guest (goal under 10 ms)",
        m.downtime,
        MEMORY >> 20
    );
    let g: Vec<u64> = field(line, "summary")
        .split(',')
        .map(|w| w.parse().unwrap())
        .collect();
    assert_eq!(g.len(), 12, "guest summary");
    assert_eq!((g[6], g[7]), (0, 0), "guest errors (count, first code)");
    assert_eq!(g[1], u64::from(PACKETS), "guest sent");
    assert_eq!(g[2], u64::from(PACKETS / 8), "guest requests");
    assert_eq!(
        g[3], g[2],
        "every request completed and checked by the guest"
    );
    assert_eq!(g[4], u64::from(PACKETS), "host packets the guest checked");
    assert_eq!(g[5], 1, "guest saw the end marker");
    assert_eq!(
        num("data_ok"),
        u64::from(PACKETS),
        "guest packets the host checked"
    );
    assert_eq!(num("requests"), u64::from(PACKETS / 8));
    assert_eq!(num("sent"), u64::from(PACKETS));
    assert_eq!(field(line, "gpa_ok"), "true");
    assert_eq!(field(line, "irq"), "true", "the destination's own irqfd");
    let sent_pages: u64 = m.passes.iter().map(|p| p.pages).sum::<u64>() + m.final_pages;
    assert_eq!(num("pages"), sent_pages, "every page sent arrived");
    println!("ok: the guest finished in another process with every check holding");
    ExitCode::SUCCESS
}
