//! Split halves beside the shared endpoint: 64-byte packets streamed one way through an
//! in-process channel pair, in alternating rounds over the shared `Endpoint` (each half
//! behind its lock) and over `Endpoint::split` (a `Sender` and a `Receiver`, no lock), the
//! producer pinned to CPU 0 and the consumer to CPU 1. Every packet is checked. Prints each
//! round's nanoseconds per packet and the median of the per-round ratios.
//!
//! `cargo run --release -p vmlink-examples --example split_vs_shared [ROUNDS]`

use std::hint::spin_loop;
use std::thread;
use std::time::Instant;

use nix::sched::{CpuSet, sched_setaffinity};
use nix::unistd::Pid;
use vmlink_channel::{ChannelError, Config, Wait, in_process_channel_pair};

const PACKETS: u64 = 300_000;
const RING: usize = 16 * 4096;

fn pin(cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu).expect("a CPU number");
    sched_setaffinity(Pid::from_raw(0), &set).expect("sched_setaffinity");
}

fn payload(seq: u64) -> [u8; 64] {
    let mut p = [0u8; 64];
    p[..8].copy_from_slice(&seq.to_le_bytes());
    p
}

/// Receives `PACKETS` packets with `recv_batch`, checking their sequence numbers.
fn consume(mut recv: impl FnMut(&mut dyn FnMut(&[u8; 64])) -> usize) {
    let mut next = 0u64;
    let mut got = 0u64;
    while got < PACKETS {
        let n = recv(&mut |p| {
            assert_eq!(p[..8], next.to_le_bytes(), "packet {next}");
            next += 1;
        });
        if n == 0 {
            spin_loop();
        }
        got += n as u64;
    }
}

/// Sends `PACKETS` packets with `send`, spinning while the ring is full; ns per packet.
fn produce(mut send: impl FnMut(&[u8]) -> Result<(), ChannelError>) -> f64 {
    let start = Instant::now();
    let mut seq = 0;
    while seq < PACKETS {
        match send(&payload(seq)) {
            Ok(()) => seq += 1,
            Err(ChannelError::Full) => spin_loop(),
            Err(e) => panic!("send: {e}"),
        }
    }
    start.elapsed().as_nanos() as f64 / PACKETS as f64
}

fn shared_round() -> f64 {
    let (a, b) = in_process_channel_pair(RING, Config::default()).expect("pair");
    b.mask_interrupts();
    let consumer = thread::spawn(move || {
        pin(1);
        let mut buf = [0u8; 64];
        consume(|each| {
            b.recv_batch(64, Wait::Now, |p| {
                p.read_payload(0, &mut buf).expect("payload");
                each(&buf);
            })
            .expect("receive")
        });
    });
    pin(0);
    let ns = produce(|p| a.send(p, Wait::Now));
    consumer.join().expect("consumer");
    ns
}

fn split_round() -> f64 {
    let (a, b) = in_process_channel_pair(RING, Config::default()).expect("pair");
    let (mut tx, _a_rx) = a.split();
    let (_b_tx, mut rx) = b.split();
    rx.mask_interrupts();
    let consumer = thread::spawn(move || {
        pin(1);
        let mut buf = [0u8; 64];
        consume(|each| {
            rx.recv_batch(64, Wait::Now, |p| {
                p.read_payload(0, &mut buf).expect("payload");
                each(&buf);
            })
            .expect("receive")
        });
    });
    pin(0);
    let ns = produce(|p| tx.send(p, Wait::Now));
    consumer.join().expect("consumer");
    ns
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map_or(15, |a| a.parse().expect("ROUNDS: a number"));
    let (mut shared, mut split, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which goes first, so drift does not favour one.
        let (s, p) = if round % 2 == 0 {
            let s = shared_round();
            (s, split_round())
        } else {
            let p = split_round();
            (shared_round(), p)
        };
        println!(
            "round {round:2}: shared {s:6.1} ns/packet, split {p:6.1} ns/packet, split/shared {:.2}",
            p / s
        );
        shared.push(s);
        split.push(p);
        ratio.push(p / s);
    }
    println!(
        "median: shared {:.1} ns/packet, split {:.1} ns/packet, split/shared {:.2} (median of per-round ratios)",
        median(&mut shared),
        median(&mut split),
        median(&mut ratio)
    );
}
