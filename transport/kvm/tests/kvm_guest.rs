//! The real-KVM test: a bare-metal guest built from this repository (`../guest`) runs the
//! no_std ring and channel code at CPL3 on its own scattered ring pages, and exchanges
//! traffic both ways with a host channel built by this crate. The VM setup and the host's
//! side live in `vmlink_kvm::test_vm` (shared with the `kvm_demo` example).
//!
//! Prints `SKIPPED: <reason>` where `/dev/kvm` is unusable, unless `VMLINK_REQUIRE_KVM=1`,
//! which turns that into a failure.

use std::time::{Duration, Instant};

use vmlink_kvm::test_vm::{GSI, PACKETS, TestVm, build_guest, kvm_or_skip, run_traffic, watchdog};

#[test]
fn guest_and_host_exchange_traffic() {
    let Some((kvm, vm)) = kvm_or_skip() else {
        return;
    };
    let dog = watchdog(Duration::from_secs(120));
    let t_build = Instant::now();
    let elf = std::fs::read(build_guest()).expect("the guest ELF");
    let build_time = t_build.elapsed();
    let mut tvm = TestVm::new(kvm, vm, &elf, 0);
    let run = run_traffic(&mut tvm);
    let (stats, exits, elapsed) = (run.stats, run.exits, run.elapsed);
    let _ = dog.send(());

    // Guest summary: [kind, sent, requests, completions ok, host packets ok, end seen,
    // errors, first error, doorbells rung, packets sent, packets received, gpa sent].
    let g = &stats.summary;
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
    assert_eq!(g[11], 1);
    assert_eq!(
        stats.data_ok,
        u64::from(PACKETS),
        "guest packets the host checked"
    );
    assert_eq!(stats.requests_completed, g[2]);
    assert_eq!(stats.sent, u64::from(PACKETS));
    assert!(stats.gpa_ok, "GPA-direct packet read from guest memory");
    assert!(stats.irq_raised, "the irqfd raised GSI {GSI} in the PIC");

    let packets = g[9] + g[10]; // guest's sent + received (completions included)
    println!(
        "kvm guest: {packets} packets ({} guest->host incl. {} requests + 1 GPA-direct, {} host->guest incl. {} completions) in {elapsed:?} (guest build {build_time:?})",
        g[9], g[2], g[10], stats.requests_completed
    );
    println!(
        "doorbells: guest->host MMIO {} ({:.5}/packet), host eventfd wakes {}, host->guest irqfd {} (guest polls, interrupts masked)",
        g[8],
        g[8] as f64 / packets as f64,
        stats.eventfd_wakes,
        stats.irqfd_signals,
    );
    println!(
        "exits to userspace: {exits} ({:.6}/packet)",
        exits as f64 / packets as f64
    );
    assert!(
        elapsed < Duration::from_secs(30),
        "took {elapsed:?}: guest code fell into CPL0 emulation?"
    );
    let _ = stats.rx_signals;
}
