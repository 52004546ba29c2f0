//! Live migration inside one process, with a real KVM guest (stop-and-copy): mid-stream the
//! test guest's vCPU is kicked out of `KVM_RUN` by a signal and the host's side stops and
//! saves its channel; guest memory is copied into a fresh VM's memory, the vCPU's whole
//! state and the VM's are written there, and the host's channel is restored over the rings
//! in the new memory. Five moves in one run; the guest is not told. The traffic's own
//! checks prove nothing was lost or repeated: every packet in order both ways, every
//! request completed once (calls in flight across the moves), the guest's SSE-using code
//! unharmed.
//!
//! Prints `SKIPPED: <reason>` where `/dev/kvm` is unusable, unless `VMLINK_REQUIRE_KVM=1`,
//! which turns that into a failure.

use std::time::Duration;

use vm_memory::bitmap::AtomicBitmap;
use vmlink_kvm::test_vm::moving::run_traffic_moving;
use vmlink_kvm::test_vm::{PACKETS, TestVm, build_guest, kvm_or_skip, watchdog};

const MOVES: usize = 5;

#[test]
fn a_running_guest_moves_into_fresh_vms_and_memory_mid_stream() {
    let Some((kvm, vm)) = kvm_or_skip() else {
        return;
    };
    let dog = watchdog(Duration::from_secs(120));
    let elf = std::fs::read(build_guest()).expect("the guest ELF");
    let tvm = TestVm::<AtomicBitmap>::with_bitmap(kvm, vm, &elf, 0);
    let run = run_traffic_moving(tvm, MOVES).expect("the moving run");
    let _ = dog.send(());
    let stats = &run.stats;

    println!(
        "{} moves in {:?} ({} exits to userspace):",
        run.moves.len(),
        run.elapsed,
        run.exits
    );
    for (i, m) in run.moves.iter().enumerate() {
        println!(
            "  move {i}: at guest packet {:>6}; pre-copy pages {:?} (guest, host {:?}); stopped: {} \
             pages (guest {}, host {}), stop {:>8.1?}, copy {:>8.1?}, state {:>8.1?}, downtime {:>8.1?}",
            m.at_packet,
            m.passes.iter().map(|p| p.pages).collect::<Vec<_>>(),
            m.passes[1..]
                .iter()
                .map(|p| (p.guest, p.host))
                .collect::<Vec<_>>(),
            m.final_pages,
            m.final_split.0,
            m.final_split.1,
            m.stop,
            m.copy,
            m.state,
            m.downtime
        );
    }

    // Mid-stream: each move found the traffic further on and not yet over.
    assert_eq!(
        run.moves.len(),
        MOVES,
        "every move happened before the guest finished"
    );
    for w in run.moves.windows(2) {
        assert!(w[0].at_packet < w[1].at_packet, "{:?}", run.moves);
    }
    let last = run.moves.last().unwrap().at_packet;
    assert!(
        run.moves[0].at_packet > 0 && last < u64::from(PACKETS),
        "{:?}",
        run.moves
    );

    // Pre-copy: the first pass copies all of memory, and the pages left for the stop are
    // few: the guest's and the host's writes were both tracked (a host write the bitmap
    // missed would have been lost, and the traffic checks below would fail).
    for m in &run.moves {
        assert_eq!(m.passes[0].pages, 1024, "the first pass copies all 4 MiB");
        assert!(m.final_pages < 1024, "{m:?}");
    }

    // The traffic's checks, as in the run that does not move.
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
    assert_eq!(
        stats.data_ok,
        u64::from(PACKETS),
        "guest packets the host checked"
    );
    assert_eq!(stats.requests_completed, u64::from(PACKETS / 8));
    assert_eq!(stats.sent, u64::from(PACKETS));
    assert!(stats.gpa_ok, "the GPA-direct packet was read and checked");
    assert!(
        stats.irq_raised,
        "the irqfd raised the GSI in the VM the guest ended in"
    );
}
