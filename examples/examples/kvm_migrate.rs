//! Live migration of vmlink's KVM test guest while its channel is busy: the guest streams
//! packets both ways with calls in flight, and is migrated twenty times in this process
//! (4 MiB of RAM: a fresh VM over fresh memory each time), then once into another process
//! (this program again, with `--destination SOCKET`; 64 MiB of RAM), by pre-copy with
//! KVM's dirty log and vm-memory's bitmap, the vCPU kicked out of `KVM_RUN`, the host's
//! channel saved and restored. Prints each migration's passes, pages, downtime and total
//! time, and whether every packet arrived once and in order.
//!
//! `cargo run --release -p vmlink-examples --example kvm_migrate` (needs a usable
//! `/dev/kvm`).

use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use vm_memory::bitmap::AtomicBitmap;
use vmlink_kvm::test_vm::moving::{
    Destination, Move, Ran, migrate_in, migrate_out, run_traffic_moving,
};
use vmlink_kvm::test_vm::{HostStats, PACKETS, TestVm, build_guest, probe};

/// Migrations within this process.
const MOVES: usize = 20;
/// RAM of the guest migrated into another process.
const MEMORY: usize = 64 << 20;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--destination") {
        return destination(&args[i + 1]);
    }
    let elf = std::fs::read(build_guest()).expect("the guest ELF");
    let ok = in_process(&elf) & into_another_process(&elf);
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A fresh VM with `memory` bytes of RAM, or why not.
fn vm(elf: &[u8], memory: usize) -> Option<TestVm<AtomicBitmap>> {
    match probe() {
        Ok((kvm, vm)) => {
            let tvm = TestVm::with_memory(kvm, vm, elf, 0, memory);
            // The traffic streams until the last migration is done.
            tvm.stream_until_told();
            Some(tvm)
        }
        Err(reason) => {
            eprintln!("kvm_migrate: KVM is unusable here: {reason}");
            None
        }
    }
}

/// Whether the traffic's checks all hold on what the host saw (saying why not).
fn traffic_ok(s: &HostStats) -> bool {
    match s.traffic_problem() {
        None => true,
        Some(problem) => {
            eprintln!("kvm_migrate: {problem}");
            false
        }
    }
}

fn print_move(label: &str, m: &Move) {
    println!(
        "  {label}: at guest packet {:>6}; pre-copy {:?} pages, then {} pages stopped \
         (guest {}, host {}); downtime {:>6.2} ms, total {:>6.1} ms",
        m.at_packet,
        m.passes.iter().map(|p| p.pages).collect::<Vec<_>>(),
        m.final_pages,
        m.final_split.0,
        m.final_split.1,
        m.downtime.as_secs_f64() * 1e3,
        m.total.as_secs_f64() * 1e3,
    );
}

fn in_process(elf: &[u8]) -> bool {
    let Some(tvm) = vm(elf, 4 << 20) else {
        return false;
    };
    let run = match run_traffic_moving(tvm, &[Destination::Honest; MOVES]) {
        Ok(run) => run,
        Err(e) => {
            eprintln!("kvm_migrate: {e}");
            return false;
        }
    };
    println!(
        "{} migrations of a 4 MiB guest within this process, {} packets each way in {:.2} s:",
        run.moves.len(),
        run.stats.limit,
        run.elapsed.as_secs_f64()
    );
    for (i, m) in run.moves.iter().enumerate() {
        print_move(&format!("{i:2}"), m);
    }
    let mut down: Vec<Duration> = run.moves.iter().map(|m| m.downtime).collect();
    down.sort();
    if let (Some(min), Some(max)) = (down.first(), down.last()) {
        println!(
            "  downtime min {:.2} ms, median {:.2} ms, max {:.2} ms",
            min.as_secs_f64() * 1e3,
            down[down.len() / 2].as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        );
    }
    let ok = traffic_ok(&run.stats) && run.moves.len() == MOVES;
    println!(
        "  every packet once and in order both ways, every call completed once: {}",
        if ok { "yes" } else { "NO" }
    );
    ok
}

fn into_another_process(elf: &[u8]) -> bool {
    let Some(tvm) = vm(elf, MEMORY) else {
        return false;
    };
    let dir = std::env::temp_dir().join(format!("vmlink-kvm-migrate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .expect("a private directory");
    let socket = dir.join("migrate.sock");
    let listener = UnixListener::bind(&socket).expect("listen");
    let mut child = Command::new(std::env::current_exe().expect("this program"))
        .arg("--destination")
        .arg(&socket)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the destination");
    let (conn, _) = listener.accept().expect("the destination connects");
    let out = migrate_out(tvm, u64::from(PACKETS) / 2, conn);
    let mut said = String::new();
    let _ = child.stdout.take().unwrap().read_to_string(&mut said);
    let status = child.wait().expect("the destination's exit");
    let _ = std::fs::remove_dir_all(&dir);
    let out = match out {
        Ok(Ran::Out(out)) => out,
        Ok(Ran::Stayed(_, _, why)) => {
            eprintln!("kvm_migrate: the migration failed ({why}); the guest ran on here");
            return false;
        }
        Ok(Ran::Done(..)) => {
            eprintln!("kvm_migrate: the guest finished before the migration");
            return false;
        }
        Err(e) => {
            eprintln!("kvm_migrate: migrating out: {e}");
            return false;
        }
    };
    println!(
        "one migration of a {} MiB guest into another process:",
        MEMORY >> 20
    );
    print_move("out", &out.step);
    let ok = status.success() && said.contains("checks=ok");
    println!(
        "  the destination ({}) ran the guest to the end, every check holding: {}",
        said.trim(),
        if ok { "yes" } else { "NO" }
    );
    ok
}

fn destination(socket: &str) -> ExitCode {
    let mut conn = UnixStream::connect(socket).expect("connect to the source");
    match migrate_in(&mut conn, None) {
        Ok(got) => {
            let ok = match &got.then {
                Ran::Done(stats, _) => traffic_ok(stats),
                Ran::Out(_) | Ran::Stayed(..) => false,
            };
            println!(
                "pid {}, {} pages received, guest ran {:.2} s after GO, checks={}",
                std::process::id(),
                got.pages,
                got.ran.as_secs_f64(),
                if ok { "ok" } else { "FAILED" }
            );
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("kvm_migrate destination: {e}");
            ExitCode::FAILURE
        }
    }
}
