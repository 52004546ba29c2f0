//! What the interleaved examples (`floors`, `processes`, `blocking`, `split_vs_shared`,
//! `sockets`) share: pinning to a CPU, the rounds argument, a pinned two-thread measurement,
//! medians and the load average. Each includes this file with
//! `#[path = "common/rounds.rs"] mod rounds;`.

use nix::sched::{CpuSet, sched_setaffinity};
use nix::unistd::Pid;

/// Runs `peer` on CPU 1 and `main` on this thread (pinned to CPU 0 by the caller);
/// nanoseconds per message (of `n`) from the start of `main` until both have finished, and
/// `peer`'s result.
// Not every example that includes this file measures two threads.
#[allow(dead_code)]
pub fn measure<T: Send>(n: u64, peer: impl FnOnce() -> T + Send, main: impl FnOnce()) -> (f64, T) {
    std::thread::scope(|s| {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let h = s.spawn(move || {
            pin(1);
            ready_tx.send(()).expect("ready");
            let r = peer();
            (std::time::Instant::now(), r)
        });
        ready_rx.recv().expect("the peer started");
        let start = std::time::Instant::now();
        main();
        let mine = std::time::Instant::now();
        let (theirs, r) = h.join().expect("peer thread");
        ((mine.max(theirs) - start).as_nanos() as f64 / n as f64, r)
    })
}

/// Pins the calling thread to `cpu`.
pub fn pin(cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu).expect("a CPU number");
    sched_setaffinity(Pid::from_raw(0), &set).expect("sched_setaffinity");
}

/// The number of rounds: the first command-line argument, or `default`. Panics with the
/// usage on anything but a positive number, and unless CPUs 0 and 1 exist to pin to.
pub fn rounds_arg(default: usize) -> usize {
    let rounds: usize = std::env::args()
        .nth(1)
        .map_or(default, |a| a.parse().expect("ROUNDS: a number"));
    assert!(rounds > 0, "ROUNDS: at least 1");
    let cpus = cpus();
    assert!(
        cpus >= 2,
        "needs two CPUs (0 and 1) to pin to; found {cpus}"
    );
    rounds
}

/// The CPUs this process may run on.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// The median of `v` (the upper one of an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` gives them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
