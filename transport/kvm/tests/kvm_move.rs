//! Live migration inside one process, with a real KVM guest. Mid-stream, memory goes to a
//! destination over the migration stream (a Unix socket) by pre-copy: all of it while the
//! guest runs, then the pages written since (KVM's dirty log for the guest's writes,
//! vm-memory's bitmap for the host's) until few are; then the test guest's vCPU is kicked
//! out of `KVM_RUN` by a signal and the host's side stops and saves its channel, and the
//! last pages, the vCPU's and VM's state and the host's endpoint (ring layout, the
//! channel's saved state, the host application's state) follow. The destination restores
//! them into a fresh VM over fresh memory, answers `READY`, gets `GO`, and the guest goes
//! on there; the guest is not told.
//!
//! The traffic's own checks prove nothing was lost or repeated across 20 moves: every
//! packet in order both ways, every request completed once (calls in flight across the
//! moves), the guest's SSE-using code unharmed; and after each move the two memories are
//! checked equal byte for byte. Hostile destinations (one that closes, refuses, echoes the
//! wrong total, stays silent, answers garbage) make their moves abort, and the guest goes
//! on in the source as if nothing happened.
//!
//! Prints `SKIPPED: <reason>` where `/dev/kvm` is unusable, unless `VMLINK_REQUIRE_KVM=1`,
//! which turns that into a failure.

use std::time::Duration;

use vm_memory::bitmap::AtomicBitmap;
use vmlink_kvm::test_vm::moving::{Destination, MovingRun, run_traffic_moving};
use vmlink_kvm::test_vm::{TestVm, build_guest, kvm_or_skip, watchdog};

/// Runs the traffic with `plan`'s moves; prints each; checks the traffic.
fn run(plan: &[Destination]) -> Option<MovingRun> {
    let (kvm, vm) = kvm_or_skip()?;
    let dog = watchdog(Duration::from_secs(120));
    let elf = std::fs::read(build_guest()).expect("the guest ELF");
    let tvm = TestVm::<AtomicBitmap>::with_bitmap(kvm, vm, &elf, 0);
    // The traffic streams until the last move is done, however fast the guest runs.
    tvm.stream_until_told();
    let run = run_traffic_moving(tvm, plan).expect("the moving run");
    let _ = dog.send(());

    println!(
        "{} moves, {} aborted, in {:?} ({} exits to userspace):",
        run.moves.len(),
        run.aborted.len(),
        run.elapsed,
        run.exits
    );
    for (i, m) in run.moves.iter().enumerate() {
        println!(
            "  move {i:2}: at guest packet {:>6}; passes {:?} pages; stopped: {} pages (guest \
             {}, host {}); stop {:>7.1?}, last pages {:>7.1?}, state {:>7.1?}; downtime \
             {:>7.1?}, total {:>7.1?}",
            m.at_packet,
            m.passes.iter().map(|p| p.pages).collect::<Vec<_>>(),
            m.final_pages,
            m.final_split.0,
            m.final_split.1,
            m.stop,
            m.copy,
            m.state,
            m.downtime,
            m.total,
        );
    }
    for (k, how, why, stopped) in &run.aborted {
        println!("  attempt {k:2} aborted ({how:?}, guest stopped {stopped:.1?}): {why}");
    }

    assert_eq!(run.stats.traffic_problem(), None);
    Some(run)
}

#[test]
fn a_running_guest_migrates_twenty_times_mid_stream() {
    let Some(run) = run(&[Destination::Honest; 20]) else {
        return;
    };
    assert_eq!(
        run.moves.len(),
        20,
        "every move happened before the guest finished"
    );
    assert!(run.aborted.is_empty(), "{:?}", run.aborted);
    for w in run.moves.windows(2) {
        assert!(
            w[0].at_packet < w[1].at_packet,
            "mid-stream, further on each time"
        );
    }
    for m in &run.moves {
        assert_eq!(m.passes[0].pages, 1024, "the first pass sends all 4 MiB");
        assert!(m.final_pages < 1024, "{m:?}");
    }
    let mut downtimes: Vec<Duration> = run.moves.iter().map(|m| m.downtime).collect();
    downtimes.sort();
    println!(
        "downtime: min {:.1?}, median {:.1?}, max {:.1?} (goal under 10 ms)",
        downtimes[0],
        downtimes[downtimes.len() / 2],
        downtimes[downtimes.len() - 1]
    );
}

#[test]
fn a_hostile_destination_leaves_the_guest_running_in_the_source() {
    use Destination::*;
    let plan = [
        CloseAfterHeader,
        Honest,
        Refuse,
        WrongEcho,
        Honest,
        Silent,
        Garbage,
        Honest,
    ];
    let Some(run) = run(&plan) else {
        return;
    };
    assert_eq!(run.moves.len(), 3, "the honest destinations took the guest");
    let hostile: Vec<Destination> = run.aborted.iter().map(|a| a.1).collect();
    assert_eq!(
        hostile,
        [CloseAfterHeader, Refuse, WrongEcho, Silent, Garbage]
    );
    for (_, how, why, stopped) in &run.aborted {
        // A destination that fails during pre-copy never costs the guest a stop.
        assert_eq!(
            stopped.is_zero(),
            *how == CloseAfterHeader,
            "{how:?} stopped the guest {stopped:?}"
        );
        let expected = match how {
            // The source finds the socket closed while it sends its first pass.
            CloseAfterHeader => "migration stream",
            Refuse => "the other side refused: refused (a test)",
            WrongEcho => "READY with another page total",
            Silent => "no answer from the other side in time",
            Garbage => "an unknown record tag",
            Honest => unreachable!(),
        };
        assert!(why.contains(expected), "{how:?}: {why}");
    }
}
