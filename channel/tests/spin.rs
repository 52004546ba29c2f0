//! The spin before sleeping: a saturated blocking stream rings almost no doorbells, an idle
//! channel still sleeps after the bound, and `sleep_at_once` spins not at all.
//!
//! These tests set the spin in their configurations themselves, so `VMLINK_SPIN=off` (which
//! only changes the default) leaves them testing it.

use std::thread;
use std::time::{Duration, Instant};

use vmlink_channel::{
    ChannelError, Config, DEFAULT_SPIN_BEFORE_SLEEP, Wait, in_process_channel_pair,
};

/// CPU time this thread has used (Linux's schedstat), for telling a spin from a sleep.
fn thread_cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    let ns: u64 = stat
        .split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .expect("on-CPU nanoseconds");
    Duration::from_nanos(ns)
}

const PACKETS: u64 = 200_000;

/// Streams `PACKETS` 64-byte packets with blocking sends and blocking batch receives on
/// two threads; returns doorbells rung per packet (both directions) and the receiver's
/// sleeps.
fn stream(config: Config) -> (f64, u64) {
    let (a, b) = in_process_channel_pair(16 * 4096, config).expect("pair");
    let receiver = thread::spawn(move || {
        let mut next = 0u64;
        while next < PACKETS {
            b.recv_batch(64, Wait::Forever, |p| {
                let mut buf = [0u8; 8];
                p.read_payload(0, &mut buf).expect("payload");
                assert_eq!(u64::from_le_bytes(buf), next, "in order, none lost");
                next += 1;
            })
            .expect("receive");
        }
        b
    });
    let mut msg = [0u8; 64];
    for seq in 0..PACKETS {
        msg[..8].copy_from_slice(&seq.to_le_bytes());
        a.send(&msg, Wait::Forever).expect("send");
    }
    let b = receiver.join().expect("receiver");
    let (ca, cb) = (a.counters(), b.counters());
    assert_eq!(ca.packets_sent, PACKETS);
    assert_eq!(cb.packets_received, PACKETS);
    let doorbells = ca.signals_sent + cb.signals_sent;
    (doorbells as f64 / PACKETS as f64, cb.receive_sleeps)
}

/// Serializes the tests that keep two threads busy on the CPUs, so that they do not
/// preempt each other's spins.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static BOTH_CPUS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    BOTH_CPUS.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn a_saturated_blocking_stream_rings_almost_no_doorbells() {
    let _both_cpus = serial();
    let spinning = Config::default().with_spin_before_sleep(DEFAULT_SPIN_BEFORE_SLEEP);
    let (per_packet, sleeps) = stream(spinning);
    let (at_once, at_once_sleeps) = stream(Config::default().sleep_at_once());
    println!(
        "doorbells per packet: {per_packet:.5} spinning ({sleeps} receiver sleeps), \
         {at_once:.5} sleeping at once ({at_once_sleeps} sleeps)"
    );
    // The goal is under 0.01; a loaded test machine can deschedule either thread for
    // longer than any spin, so the test allows some slack.
    assert!(
        per_packet < 0.02,
        "{per_packet} doorbells per packet with the default spin"
    );
}

#[test]
fn an_idle_channel_still_sleeps_after_the_bound() {
    let bound = Duration::from_micros(200);
    let (a, _b) = in_process_channel_pair(4096, Config::default().with_spin_before_sleep(bound))
        .expect("pair");
    let cpu = thread_cpu_time();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    for _ in 0..10 {
        let r = a.recv(&mut buf, Instant::now() + Duration::from_millis(20));
        assert_eq!(r, Err(ChannelError::TimedOut));
    }
    let (wall, used) = (start.elapsed(), thread_cpu_time() - cpu);
    assert!(wall >= Duration::from_millis(200));
    assert!(a.counters().receive_sleeps >= 10, "every wait slept");
    // Ten waits, each spinning at most the bound: far below the 200 ms they waited.
    assert!(
        used < Duration::from_millis(40),
        "{used:?} on the CPU in {wall:?} of idle waiting"
    );
}

#[test]
fn sleep_at_once_does_not_spin() {
    let config = Config::default().sleep_at_once();
    assert_eq!(config.spin_before_sleep, Duration::ZERO);
    assert_eq!(config.spin_iterations, 0);
    let (a, _b) = in_process_channel_pair(4096, config).expect("pair");
    let cpu = thread_cpu_time();
    let mut buf = [0u8; 64];
    for _ in 0..200 {
        let r = a.recv(&mut buf, Instant::now() + Duration::from_micros(500));
        assert_eq!(r, Err(ChannelError::TimedOut));
    }
    let used = thread_cpu_time() - cpu;
    // 200 waits of 0.5 ms, 100 ms in all; each costs a few system calls, not a spin.
    assert!(used < Duration::from_millis(30), "{used:?} on the CPU");
    assert!(a.counters().receive_sleeps >= 200);
}

#[test]
fn a_sender_spins_for_space_before_it_sleeps() {
    // A 4 KiB ring holds three 1000-byte packets; the receiver frees room after a pause
    // shorter than the spin, so the blocked sender takes it without sleeping.
    let config = Config::default().with_spin_before_sleep(Duration::from_millis(50));
    let (a, b) = in_process_channel_pair(4096, config).expect("pair");
    let payload = [5u8; 1000];
    while a.send(&payload, Wait::Now).is_ok() {}
    let receiver = thread::spawn(move || {
        thread::sleep(Duration::from_micros(200));
        let mut buf = [0u8; 1000];
        b.recv(&mut buf, Wait::Now).expect("a queued packet");
        b
    });
    a.send(&payload, Instant::now() + Duration::from_secs(5))
        .expect("room appears");
    let b = receiver.join().expect("receiver");
    assert_eq!(a.counters().send_waits, 0, "the sender never armed a sleep");
    assert_eq!(b.counters().signals_sent, 0, "so nobody had to wake it");
}

#[test]
fn a_spin_never_outlasts_the_wait_deadline() {
    // The first spins last a quarter of the bound: 100 ms here, far past the deadline.
    let config = Config::default().with_spin_before_sleep(Duration::from_millis(400));
    let (a, b) = in_process_channel_pair(4096, config).expect("pair");
    let mut buf = [0u8; 64];
    let start = Instant::now();
    let r = a.recv(&mut buf, start + Duration::from_millis(1));
    assert_eq!(r, Err(ChannelError::TimedOut));
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(50),
        "the receive took {took:?}"
    );
    // The same for a sender waiting for space.
    while b.send(&[0; 1000], Wait::Now).is_ok() {}
    let start = Instant::now();
    let r = b.send(&[0; 1000], start + Duration::from_millis(1));
    assert_eq!(r, Err(ChannelError::TimedOut));
    let took = start.elapsed();
    assert!(took < Duration::from_millis(50), "the send took {took:?}");
}

/// Requests answered after a steady service time (`SERVICE`, slept, so that only the
/// guest's spin needs a CPU): returns the doorbells rung per request, both ways, after a
/// warm-up.
fn steady_service(config: Config) -> f64 {
    const SERVICE: Duration = Duration::from_micros(300);
    const WARM: u32 = 100;
    const MEASURED: u32 = 200;
    let (guest, host) = in_process_channel_pair(16 * 4096, config).expect("pair");
    let server = thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut before = 0;
        for i in 0..WARM + MEASURED {
            if i == WARM {
                before = host.counters().signals_sent;
            }
            host.recv(&mut buf, Wait::Forever).expect("a request");
            thread::sleep(SERVICE);
            host.send(&buf[..8], Wait::Forever).expect("the answer");
        }
        host.counters().signals_sent - before
    });
    let mut buf = [0u8; 64];
    let mut before = 0;
    for i in 0..WARM + MEASURED {
        if i == WARM {
            before = guest.counters().signals_sent;
        }
        guest
            .send(&u64::from(i).to_le_bytes(), Wait::Forever)
            .expect("a request");
        guest.recv(&mut buf, Wait::Forever).expect("its answer");
        assert_eq!(buf[..8], u64::from(i).to_le_bytes(), "answers in order");
    }
    let host_bells = server.join().expect("the host");
    let bells = guest.counters().signals_sent - before + host_bells;
    bells as f64 / f64::from(MEASURED)
}

#[test]
fn a_peer_that_answers_after_a_steady_service_time_is_caught_by_the_spin() {
    let _both_cpus = serial();
    // Within a 1 ms bound, the guest's waits (300 µs and the timer's slack, longer than a
    // wake-up's first estimate, a quarter of the bound) set its spin; the host's waits for
    // the next request are short. Nearly nothing is signalled. A spin the scheduler
    // preempts (other tests run beside this one) ends in a sleep, so the best of three
    // runs counts: without the spin that follows the waits, every run signals each answer.
    let mut within = f64::MAX;
    for _ in 0..3 {
        let bound = Duration::from_millis(1);
        within = within.min(steady_service(
            Config::default().with_spin_before_sleep(bound),
        ));
        if within < 0.1 {
            break;
        }
    }
    // With a 100 µs bound the service outlasts every spin: the guest sleeps and is
    // signalled for each answer.
    let beyond =
        steady_service(Config::default().with_spin_before_sleep(Duration::from_micros(100)));
    println!("doorbells per request: {within:.3} within the bound, {beyond:.3} beyond it");
    assert!(
        within < 0.5 * beyond,
        "{within} within the bound against {beyond} beyond it"
    );
    assert!(beyond > 0.5, "{beyond}: a wait past the bound sleeps");
    assert!(
        within < 0.3,
        "{within} doorbells per request although the spin could cover"
    );
}

/// Times the scheduler took the CPU from this thread while it could run (a yield that gave
/// the CPU to another thread counts).
fn involuntary_switches() -> u64 {
    let status = std::fs::read_to_string("/proc/thread-self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("nonvoluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("nonvoluntary_ctxt_switches")
}

#[test]
fn a_spin_told_to_yield_gives_its_cpu_to_a_thread_that_shares_it() {
    use nix::sched::{CpuSet, sched_getcpu, sched_setaffinity};
    use nix::unistd::Pid;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    const LOOKS: u32 = 2_000;
    // This thread and a busy one on one CPU; the busy one hands the CPU back at once.
    let mut one = CpuSet::new();
    one.set(sched_getcpu().expect("this CPU"))
        .expect("a CPU set");
    sched_setaffinity(Pid::from_raw(0), &one).expect("pinning");
    let stop = Arc::new(AtomicBool::new(false));
    let busy = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            sched_setaffinity(Pid::from_raw(0), &one).expect("pinning");
            while !stop.load(Ordering::Relaxed) {
                thread::yield_now();
            }
        })
    };
    // Polling mode: LOOKS looks at an empty ring, then a sleep to the deadline.
    let (a, _b) = in_process_channel_pair(4096, Config::polling(LOOKS)).expect("pair");
    let spin = |every: u32| {
        a.set_spin_yield(every);
        let before = involuntary_switches();
        let r = a.recv(&mut [0u8; 64], Instant::now() + Duration::from_millis(1));
        assert_eq!(r, Err(ChannelError::TimedOut));
        involuntary_switches() - before
    };
    let never = spin(0);
    let every_look = spin(1);
    let every_eighth = spin(8);
    stop.store(true, Ordering::Relaxed);
    busy.join().expect("the busy thread");
    assert!(
        every_look >= u64::from(LOOKS) / 4,
        "a yield every look gave the CPU away {every_look} times in {LOOKS} looks"
    );
    assert!(
        every_eighth >= u64::from(LOOKS / 8) / 4 && every_eighth < every_look,
        "a yield every eighth look gave the CPU away {every_eighth} times"
    );
    assert!(
        never < u64::from(LOOKS) / 40,
        "a spin that does not yield lost its CPU {never} times in {LOOKS} looks"
    );
}
