//! Boots vmlink's bare-metal test guest in a KVM VM (the no_std ring and channel code at
//! CPL3, on scattered pages of its own memory) and runs traffic both ways with a host
//! channel from `vmlink-kvm`, then prints what moved, the doorbells, the exits to userspace
//! and the throughput.
//!
//! `cargo run --release -p vmlink-examples --example kvm_demo` (needs a usable `/dev/kvm`).

use std::process::ExitCode;
use std::time::Instant;

use vmlink_kvm::test_vm::{TestVm, build_guest, probe, run_traffic};

fn main() -> ExitCode {
    let (kvm, vm) = match probe() {
        Ok(k) => k,
        Err(reason) => {
            eprintln!("kvm_demo: KVM is unusable here: {reason}");
            return ExitCode::FAILURE;
        }
    };
    let t = Instant::now();
    let elf = std::fs::read(build_guest()).expect("the guest ELF");
    println!(
        "guest built in {:?} ({} bytes of ELF)",
        t.elapsed(),
        elf.len()
    );
    let mut tvm = TestVm::new(kvm, vm, &elf, 0);
    let run = run_traffic(&mut tvm);
    let (s, g) = (&run.stats, &run.stats.summary);
    if g.len() != 12 || g[6] != 0 {
        eprintln!("kvm_demo: the guest reported errors: {g:?}");
        return ExitCode::FAILURE;
    }
    let secs = run.elapsed.as_secs_f64();
    let packets = g[9] + g[10];
    let bytes = s.ring_bytes_sent + s.ring_bytes_received;
    println!(
        "moved: guest->host {} packets ({} requests, 1 GPA-direct of {} bytes read from guest memory), host->guest {} packets ({} completions)",
        g[9],
        g[2],
        vmlink_kvm::test_vm::GPA_LEN,
        g[10],
        s.requests_completed
    );
    println!(
        "ring bytes: {} guest->host, {} host->guest",
        s.ring_bytes_received, s.ring_bytes_sent
    );
    println!(
        "doorbells: {} guest->host MMIO ({:.4}/packet; host eventfd wakes {}), {} host->guest irqfd",
        g[8],
        g[8] as f64 / packets as f64,
        s.eventfd_wakes,
        s.irqfd_signals
    );
    println!(
        "exits to userspace: {} ({:.6}/packet)",
        run.exits,
        run.exits as f64 / packets as f64
    );
    println!(
        "throughput: {packets} packets in {:?}: {:.0} packets/s, {:.1} MB/s of ring traffic",
        run.elapsed,
        packets as f64 / secs,
        bytes as f64 / secs / 1e6
    );
    ExitCode::SUCCESS
}
