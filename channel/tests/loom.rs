//! Exhaustive model check of the wake-up hub and the polling spinner under loom.
//!
//! Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p vmlink-channel --test loom --release
//! ```
//!
//! Under `--cfg loom` every atomic, mutex and condition variable of the channel (the hub's
//! generation, count, lock and condition variable, the channel's state and ring locks, the
//! in-process doorbell's bells; see `src/sync.rs`) and the ring's control words and fences
//! are loom's, so loom explores every interleaving of the real `Hub` (through
//! [`LoomHub`], a thin public face it has only under loom) and the real
//! [`Channel`](vmlink_channel::Channel) over [`HeapMem`](vmlink_ring::HeapMem) rings and an
//! [`InProcessDoorbell`], and every value a load may legally return. If an interleaving
//! loses a wake-up, a thread blocks for ever after the others have finished and loom fails
//! the test with `deadlock`; a packet lost, duplicated or garbled fails an assertion.
//! Statistics counters stay plain atomics (they order nothing).
//!
//! Time: loom has no clock. Its `Condvar::wait_timeout` waits until notified, and
//! `InProcessDoorbell::wait` ignores its timeout under loom, so in a model a timed wait
//! never times out and no timeout can paper over a lost wake-up. (The models wait without
//! deadlines anyway.)
//!
//! `SeqCst`: loom treats `SeqCst` loads and stores as `AcqRel` (its README: "false
//! alarms") but models `fence(SeqCst)` fully. The hub relies on the single total order of
//! its `SeqCst` accesses (a waiter raises `waiting` then reads the generation; an announcer
//! bumps the generation then reads `waiting`), so under loom only a `fence(SeqCst)` stands
//! between each such store and load (`seq_cst_order` in `src/sync.rs`; nothing in a
//! normal build). Without it loom reports a deadlock in (a), (b), (c) and (f) at once.
//!
//! What passing proves (interleavings and times measured in release on a quiet 2-core
//! machine; `LOOM_MAX_PREEMPTIONS` overrides every model's bound):
//!
//! | model                          | bound      | interleavings | time   |
//! |--------------------------------|------------|---------------|--------|
//! | (a) `hub_notify`               | none       | 534           | 0.03 s |
//! | (b) `hub_announce`             | none       | 1,110         | 0.05 s |
//! | (c) `hub_two_waiters_notify`   | 4          | 66,206        | 4.2 s  |
//! | (d) `hub_two_waiters_doorbell` | none       | 49,060        | 3.1 s  |
//! | (e) `spinner_recv`             | none       | 1,291         | 0.1 s  |
//! | (f) `spinner_two_receivers`    | 2          | 23,986        | 2.8 s  |
//!
//! - the hub (`Hub::generation`, `Hub::wait`, `Hub::notify`, `Hub::announce`): a waiter
//!   that read the generation, found nothing and waits always returns once the event is
//!   notified (a), announced and then notified if `announce` says anyone waits (b), or
//!   rung through the doorbell (d); with two waiters, whichever becomes the doorbell
//!   sleeper and whichever waits on the condition variable, both return (c, d);
//! - the polling spinner (`spin_for_data`, `arm_reader`, `wait_ready` under
//!   `Config::polling(2)`): a receiver blocked in `Channel::recv` always gets the packet
//!   its peer sends with `Channel::send` (e); with two receivers on one channel and
//!   two packets sent one by one, each receiver gets one: the spinner unmasks (and
//!   notifies) on its way out when the other receiver sleeps (f).
//!
//! # The model can fail
//!
//! Checked by hand in a scratch copy of the workspace (never committed), one break at a
//! time, with the bounds above. Each break makes loom report
//! `deadlock; threads = [...]` with the waiting model thread (and, in c, d and f, maybe
//! another waiter) `Blocked` and the rest `Terminated`, within 1.5 s, in the models listed:
//!
//! | break                                                                  | deadlock in |
//! |------------------------------------------------------------------------|-------------|
//! | `Hub::wait`: no generation re-check after the sleeper raises `waiting` | a, b, c, f  |
//! | `Hub::notify`: no generation bump before it reads `waiting`            | a, c        |
//! | `Hub::announce`: reads `waiting` before it bumps the generation        | b, f        |
//! | `Hub::notify`: does not wake the doorbell sleeper (`wake_local`)       | a, b, c, f  |
//! | `Hub::wait`: the sleeper does not bump (broadcast) when its bell rings | d, f        |
//! | `spin_for_data`: found data, ignores `announce` and stays masked       | f           |
//! | `spin_for_data`: no `notify` when `arm_reader` finds data              | f           |
//! | `arm_reader`'s `Reader::prepare_wait` without its `fence(SeqCst)`      | e, f        |
//! | `arm_reader`'s `Reader::prepare_wait` without its re-check (`Sleep`)   | e, f        |
//! | `commit_rx`: no notify when a receive leaves known packets behind      | g           |
//!
//! (a: `hub_notify`, b: `hub_announce`, c: `hub_two_waiters_notify`,
//! d: `hub_two_waiters_doorbell`, e: `spinner_recv`, f: `spinner_two_receivers`,
//! g: `two_receivers_batch`.)
//!
//! Tried too, and not caught, because each is redundant for threads:
//!
//! - no generation re-check on `Hub::wait`'s condition-variable path: a waiter takes that
//!   path only while a sleeper is counted, and that sleeper made its own re-check under
//!   the same lock, so a notifier either finds `waiting` raised or its bump was seen;
//! - `Hub::notify` without `wake_all`: it still wakes the doorbell sleeper, whose bump
//!   wakes the condition-variable waiters one hop later. `wake_all` is what wakes async
//!   tasks (which wait without a sleeper); these models have none.
//!
//! # A lost wake-up this model found
//!
//! (g) `two_receivers_batch`: as (f), but the sender commits both packets in one batch.
//! Before the receive path announced packets it leaves behind, loom reported `deadlock`
//! (in 0.1 s, with or without polling): receiver 1 arms and sleeps in the doorbell; the
//! sender stores its write index; receiver 2 takes the first packet and publishes its read
//! index; the sender's `Writer::commit` then finds the read index moved ("the reader is
//! awake") and does not signal; receiver 2 returns with the second packet still in the
//! ring, and receiver 1 sleeps until the peer's next signal, which may never come. Now a
//! receive that consumed packets and knows of more notifies the hub after its commit
//! (`commit_rx`); removing that notification makes (g) deadlock again.

#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::thread;
use std::sync::Arc;
use vmlink_channel::Wait;
use vmlink_channel::{
    Config, Doorbell, InProcessChannel, InProcessDoorbell, LoomHub, in_process_channel_pair,
    in_process_pair,
};

/// Stack for every thread of a model: a channel's calls need more than the 32 KiB loom
/// gives a thread by default.
const STACK: usize = 1 << 20;

fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
    thread::Builder::new().stack_size(STACK).spawn(f).unwrap()
}

/// Runs `f` on a thread of its own for every interleaving, with at most `bound`
/// preemptions (`None`: every interleaving) unless `LOOM_MAX_PREEMPTIONS` says otherwise.
/// Prints how many interleavings it ran (shown with `--nocapture`).
fn check(bound: Option<usize>, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
        builder.preemption_bound = bound;
    }
    let f = Arc::new(f);
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = runs.clone();
    builder.check(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let f = f.clone();
        spawn(move || f()).join().unwrap();
    });
    eprintln!(
        "{} interleavings",
        runs.load(std::sync::atomic::Ordering::Relaxed)
    );
}

// ---- the hub ---------------------------------------------------------------------------

/// A hub, the doorbell its waiters sleep in, the peer's end of that doorbell, and the
/// condition the waiters wait for.
struct HubModel {
    hub: LoomHub,
    mine: InProcessDoorbell,
    peer: InProcessDoorbell,
    event: AtomicBool,
}

impl HubModel {
    fn new() -> Arc<Self> {
        let (mine, peer) = in_process_pair();
        Arc::new(Self {
            hub: LoomHub::default(),
            mine,
            peer,
            event: AtomicBool::new(false),
        })
    }

    /// What every waiting loop of the channel does: read the generation, look at the
    /// condition, wait for the generation to move.
    fn wait_for_event(&self) {
        loop {
            let seen = self.hub.generation();
            if self.event.load(Ordering::SeqCst) {
                return;
            }
            self.hub.wait(&self.mine, seen, None).unwrap();
        }
    }
}

/// How the event reaches the waiters.
#[derive(Clone, Copy)]
enum Event {
    /// `Hub::notify`, as when the channel fails, learns its peer left, or a spinner took
    /// something a sleeper waits for.
    Notify,
    /// `Hub::announce`, then `Hub::notify` if it says anyone waits.
    Announce,
    /// The peer rings the doorbell, as after a commit that asks for a signal.
    Doorbell,
}

fn hub_model(waiters: usize, how: Event, bound: Option<usize>) {
    check(bound, move || {
        let m = HubModel::new();
        let others: Vec<_> = (1..waiters)
            .map(|_| {
                let m = m.clone();
                spawn(move || m.wait_for_event())
            })
            .collect();
        let notifier = {
            let m = m.clone();
            spawn(move || {
                m.event.store(true, Ordering::SeqCst);
                match how {
                    Event::Notify => m.hub.notify(&m.mine),
                    Event::Announce => {
                        if m.hub.announce() {
                            m.hub.notify(&m.mine);
                        }
                    }
                    Event::Doorbell => m.peer.signal().unwrap(),
                }
            })
        };
        m.wait_for_event();
        for t in others {
            t.join().unwrap();
        }
        notifier.join().unwrap();
    });
}

/// (a) One waiter, one `notify`. Every interleaving.
#[test]
fn hub_notify() {
    hub_model(1, Event::Notify, None);
}

/// (b) One waiter, one `announce` (and `notify` when it says someone waits). Every
/// interleaving.
#[test]
fn hub_announce() {
    hub_model(1, Event::Announce, None);
}

/// (c) Two waiters (one sleeps in the doorbell, the other on the condition variable, or
/// either looks again), one `notify`. At most 4 preemptions (5 take 20 s; unbounded, more
/// than minutes).
#[test]
fn hub_two_waiters_notify() {
    hub_model(2, Event::Notify, Some(4));
}

/// (d) Two waiters, one ring of the doorbell: the sleeper must pass it on. Every
/// interleaving.
#[test]
fn hub_two_waiters_doorbell() {
    hub_model(2, Event::Doorbell, None);
}

// ---- the polling spinner ---------------------------------------------------------------

/// Spins before sleeping: two looks, so a look may find the packet or miss it.
const SPIN: u32 = 2;

fn payload(i: u8) -> [u8; 8] {
    [i; 8]
}

/// An in-process pair over 4096-byte rings; both ends polling.
fn pair() -> (Arc<InProcessChannel>, Arc<InProcessChannel>) {
    let (a, b) = in_process_channel_pair(4096, Config::polling(SPIN)).unwrap();
    (Arc::new(a), Arc::new(b))
}

/// Receives one packet (blocking, polling mode) and returns its payload's first byte.
fn recv_one(b: &InProcessChannel) -> u8 {
    let mut buf = [0u8; 64];
    let got = b.recv(&mut buf, None).unwrap();
    let data = got.payload(&buf);
    assert_eq!(data.len(), 8, "payload length");
    assert!(data.iter().all(|&x| x == data[0]), "payload bytes");
    data[0]
}

/// (e) A polling receiver blocked in `recv`, a sender's `send` (`Wait::Now`). Every interleaving.
#[test]
fn spinner_recv() {
    check(None, || {
        let (a, b) = pair();
        let sender = {
            let a = a.clone();
            spawn(move || a.send(&payload(7), Wait::Now).unwrap())
        };
        assert_eq!(recv_one(&b), 7);
        sender.join().unwrap();
        // Both ends live until here: a departing peer wakes its waiter too, which would
        // hide a lost wake-up.
        drop((a, b));
    });
}

/// How the sender of `two_receivers` publishes its two packets.
#[derive(Clone, Copy)]
enum Sends {
    /// `send` (`Wait::Now`) each: two commits.
    OneByOne,
    /// One batch: one commit, at most one signal.
    Batch,
}

/// Two polling receivers blocked in `recv` on one channel, one sender of two packets: each
/// receiver gets one, whichever of them sleeps while the other spins with interrupts masked.
fn two_receivers(sends: Sends, bound: Option<usize>) {
    check(bound, move || {
        let (a, b) = pair();
        let sender = {
            let a = a.clone();
            spawn(move || match sends {
                Sends::OneByOne => {
                    a.send(&payload(1), Wait::Now).unwrap();
                    a.send(&payload(2), Wait::Now).unwrap();
                }
                Sends::Batch => {
                    let mut batch = a.batch().unwrap();
                    batch.push_in_band(&payload(1)).unwrap();
                    batch.push_in_band(&payload(2)).unwrap();
                    batch.commit().unwrap();
                }
            })
        };
        let other = {
            let b = b.clone();
            spawn(move || recv_one(&b))
        };
        let mine = recv_one(&b);
        let theirs = other.join().unwrap();
        sender.join().unwrap();
        let mut got = [mine, theirs];
        got.sort_unstable();
        assert_eq!(got, [1, 2], "each packet received once");
        drop((a, b));
    });
}

/// (f) Two polling receivers, two packets sent one by one. At most 2 preemptions (3 take
/// over a minute).
#[test]
fn spinner_two_receivers() {
    two_receivers(Sends::OneByOne, Some(2));
}

/// (g) Two receivers, two packets in one batch (see "A lost wake-up this model found").
#[test]
fn two_receivers_batch() {
    two_receivers(Sends::Batch, Some(2));
}
