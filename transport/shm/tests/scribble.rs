//! A guest that scribbles random bytes over both shared rings (control words and data)
//! while traffic flows both ways. The host must answer every call within its deadline
//! (plus a small margin) with a packet, a timeout, a full ring, `Closed`, or `Failed` with
//! the corruption it found — never a panic or a hang — and once failed or closed it must
//! stay so.

mod common;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{ChildProcess, child_command, mix, role, watchdog};
use vmlink_channel::Polled;
use vmlink_channel::Wait;
use vmlink_channel::{ChannelError, ChannelState, FailureCause};
use vmlink_ring::{ControlWord, RingMem};
use vmlink_shm::{Guest, Layout, Service};

const CHILD_TEST: &str = "child_role";
const SCRIBBLE_FOR: Duration = Duration::from_millis(1500);
const CALL_DEADLINE: Duration = Duration::from_millis(200);
/// How late past its deadline a call may return on a loaded 2-core machine.
const MARGIN: Duration = Duration::from_millis(500);

/// The child's side: runs only when spawned with a role.
#[test]
fn child_role() {
    let Some(role) = role() else { return };
    let _w = watchdog("scribbling child", Duration::from_secs(30));
    let seed: u64 = role
        .strip_prefix("scribble:")
        .and_then(|s| s.parse().ok())
        .expect("seed");
    let g = Guest::new("scribble").from_env().expect("guest handshake");
    let (channel, memory) = g.into_parts();
    let stop = std::sync::atomic::AtomicBool::new(false);
    thread::scope(|s| {
        // Traffic from the guest, errors ignored: the guest corrupts its own rings too.
        s.spawn(|| {
            let mut n = 0u64;
            let mut buf = vec![0u8; 1 << 16];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let len = 8 + (mix(seed ^ n) % 3000) as usize;
                let _ = channel.send(&vec![n as u8; len], Wait::Now);
                let _ = channel.recv(&mut buf, Wait::Now).polled();
                n += 1;
            }
        });
        // Let traffic flow cleanly first, so the scribbling hits live rings.
        thread::sleep(Duration::from_millis(100));
        let rings = [memory.guest_to_host(), memory.host_to_guest()];
        let words = ControlWord::ALL;
        let start = Instant::now();
        let mut x = seed;
        while start.elapsed() < SCRIBBLE_FOR {
            x = mix(x);
            let ring = &rings[(x & 1) as usize];
            let data_len = ring.data_len();
            match (x >> 1) % 4 {
                // A control word: any value, sometimes a plausible one.
                0 => {
                    let w = words[((x >> 8) % words.len() as u64) as usize];
                    let v = if x & (1 << 20) != 0 {
                        (x >> 32) as u32
                    } else {
                        ((x >> 32) as u32 % data_len as u32) & !7
                    };
                    ring.store_control(w, v);
                }
                // A burst of random data bytes anywhere in the data area.
                _ => {
                    let at = ((x >> 16) as usize) % data_len;
                    let len = (((x >> 40) as usize) % 64).min(data_len - at);
                    let bytes: Vec<u8> = (0..len).map(|i| mix(x ^ i as u64) as u8).collect();
                    ring.write_data(at, &bytes);
                }
            }
            if x.is_multiple_of(16) {
                thread::sleep(Duration::from_micros(200));
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}

/// Calls `op` and checks it returned in time.
fn timed<T>(what: &str, op: impl FnOnce() -> T) -> T {
    let t0 = Instant::now();
    let r = op();
    assert!(
        t0.elapsed() <= CALL_DEADLINE + MARGIN,
        "{what} took {:?}, past its {CALL_DEADLINE:?} deadline",
        t0.elapsed()
    );
    r
}

fn allowed(e: &ChannelError) -> bool {
    matches!(
        e,
        ChannelError::TimedOut
            | ChannelError::Full
            | ChannelError::Closed
            | ChannelError::Failed(FailureCause::Ring(_) | FailureCause::Protocol(_))
    )
}

#[test]
fn a_scribbling_guest_never_crashes_or_hangs_the_host() {
    if role().is_some() {
        return;
    }
    let _w = watchdog("scribble host", Duration::from_secs(60));
    let mut failed = 0;
    for seed in 1..=3u64 {
        let mut cmd: Command = child_command(CHILD_TEST, &format!("scribble:{seed}"));
        let service = Service::new("scribble").with_layout(Layout::symmetric(4 * 4096, 4 * 4096));
        let (host, child) = service.spawn(&mut cmd).expect("spawn the guest");
        let mut child = ChildProcess::new(child);
        let ch = host.channel();
        let mut buf = vec![0u8; 1 << 16];
        let (mut packets, mut errors) = (0u64, 0u64);
        let mut terminal: Option<ChannelError> = None;
        let start = Instant::now();
        let mut after_terminal = 0;
        while start.elapsed() < SCRIBBLE_FOR + Duration::from_secs(1) && after_terminal < 100 {
            if terminal.is_some() {
                after_terminal += 1;
            }
            let deadline = Some(Instant::now() + CALL_DEADLINE);
            let got = timed("recv", || ch.recv(&mut buf, deadline));
            let sent = timed("send", || {
                ch.send(&[7u8; 300], Some(Instant::now() + CALL_DEADLINE))
            });
            for r in [got.map(|_| ()), sent] {
                match r {
                    Ok(()) => {
                        assert!(terminal.is_none(), "a call succeeded after {terminal:?}");
                        packets += 1;
                    }
                    Err(e) => {
                        assert!(allowed(&e), "unexpected error {e:?}");
                        errors += 1;
                        if let Some(t) = terminal {
                            // Failed is sticky; a closed channel stays closed or fails.
                            if matches!(t, ChannelError::Failed(_)) {
                                assert_eq!(e, t, "failure is sticky");
                            }
                        }
                        if matches!(e, ChannelError::Failed(_) | ChannelError::Closed)
                            && terminal.is_none()
                        {
                            terminal = Some(e);
                        }
                    }
                }
            }
        }
        let state = ch.state();
        eprintln!("seed {seed}: {packets} calls succeeded, {errors} failed; final state {state:?}");
        if matches!(state, ChannelState::Failed(_)) {
            failed += 1;
        }
        drop(host);
        child.wait(Duration::from_secs(10));
    }
    assert!(
        failed > 0,
        "random bytes over live rings were detected as corruption at least once"
    );
}
