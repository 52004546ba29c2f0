//! Instr: the single-threaded workloads whose instructions per message `scripts/instr`
//! counts with callgrind. Each case moves N messages of 64 bytes through one ring or one
//! channel pair in this thread, writer and reader taking turns, and checks every message
//! (so the optimiser cannot drop the work). Receivers poll with interrupts masked, as in the
//! `floors` example, so no doorbell rings.
//!
//! - `floor`: the VMBus-layout floor (`common/floor.rs`): push, publish, pop, release.
//! - `ring`: vmlink-ring, one message at a time: `Writer::write`, then `Reader::peek`,
//!   `read_payload`, `consume` and `commit`, over a `HeapMem` of 64 KiB.
//! - `ring_batch`: `Writer::push` ×32 and one `commit`, then `peek`, `read_payload` and
//!   `consume` ×32 and one `commit`.
//! - `channel`: an in-process channel pair; one side `send(.., Wait::Now)`, the other
//!   `recv(.., Wait::Now)`.
//! - `channel_batch`: a `batch()` of 32 and its `commit`, then `recv_batch(32, Wait::Now)`.
//!
//! `cargo run --release -p vmlink-examples --example instr -- CASE N`

#[path = "common/floor.rs"]
mod floor;
#[path = "common/message.rs"]
mod message;

use std::process::ExitCode;

use floor::{FloorReader, FloorRing, FloorWriter};
use message::{check, check_words, msg, msg_words};
use vmlink_channel::{Config, Wait, in_process_channel_pair};
use vmlink_ring::{HeapMem, OutgoingPacket, Reader, Writer};

/// Data bytes of each vmlink ring.
const RING: usize = 16 * 4096;
/// Messages per commit in the batched cases.
const BATCH: u64 = 32;

/// The VMBus-layout floor, one message at a time.
fn floor(n: u64) {
    let ring = FloorRing::new();
    let (mut tx, mut rx) = (FloorWriter::new(&ring), FloorReader::new(&ring));
    let mut m = [0u64; 8];
    for seq in 0..n {
        assert!(tx.push(&msg_words(seq)), "room for message {seq}");
        tx.publish();
        assert!(rx.pop(&mut m), "message {seq} arrived");
        rx.release();
        check_words(seq, &m);
    }
}

/// vmlink-ring, one message per write and per commit.
fn ring(n: u64) {
    let mem = HeapMem::new(RING).expect("ring");
    let mut writer = Writer::new(&mem).expect("writer");
    let mut reader = Reader::new(&mem).expect("reader");
    reader.mask_interrupts();
    let mut buf = [0u8; 64];
    for seq in 0..n {
        let _ = writer
            .write(&OutgoingPacket::in_band_slice(&msg(seq)))
            .expect("room for the message");
        let p = reader.peek().expect("ring intact").expect("a packet");
        p.read_payload(0, &mut buf).expect("64-byte payload");
        p.consume();
        let _ = reader.commit();
        check(seq, &buf);
    }
}

/// vmlink-ring, [`BATCH`] messages per commit on each side.
fn ring_batch(n: u64) {
    let mem = HeapMem::new(RING).expect("ring");
    let mut writer = Writer::new(&mem).expect("writer");
    let mut reader = Reader::new(&mem).expect("reader");
    reader.mask_interrupts();
    let mut buf = [0u8; 64];
    let mut seq = 0;
    while seq < n {
        let end = n.min(seq + BATCH);
        for s in seq..end {
            writer
                .push(&OutgoingPacket::in_band_slice(&msg(s)))
                .expect("room for the batch");
        }
        let _ = writer.commit();
        for s in seq..end {
            let p = reader.peek().expect("ring intact").expect("a packet");
            p.read_payload(0, &mut buf).expect("64-byte payload");
            p.consume();
            check(s, &buf);
        }
        let _ = reader.commit();
        seq = end;
    }
}

/// vmlink-channel, one `send` and one `recv` per message.
fn channel(n: u64) {
    let (a, b) = in_process_channel_pair(RING, Config::default()).expect("channel pair");
    b.mask_interrupts();
    let mut buf = [0u8; 64];
    for seq in 0..n {
        a.send(&msg(seq), Wait::Now).expect("send");
        let got = b.recv(&mut buf, Wait::Now).expect("recv");
        check(seq, got.payload(&buf));
    }
}

/// vmlink-channel, a batch of [`BATCH`] sent and received at once.
fn channel_batch(n: u64) {
    let (a, b) = in_process_channel_pair(RING, Config::default()).expect("channel pair");
    b.mask_interrupts();
    let mut buf = [0u8; 64];
    let mut seq = 0;
    while seq < n {
        let end = n.min(seq + BATCH);
        let mut batch = a.batch().expect("batch");
        for s in seq..end {
            batch.push_in_band(&msg(s)).expect("room for the batch");
        }
        batch.commit().expect("commit");
        let got = b
            .recv_batch(BATCH as usize, Wait::Now, |p| {
                p.read_payload(0, &mut buf).expect("64-byte payload");
                check(seq, &buf);
                seq += 1;
            })
            .expect("receive");
        assert_eq!(seq, end, "{got} packets received, the whole batch");
    }
}

/// A case: its name and its workload, which moves N messages.
type Case = (&'static str, fn(u64));

/// The cases by name.
const CASES: [Case; 5] = [
    ("floor", floor),
    ("ring", ring),
    ("ring_batch", ring_batch),
    ("channel", channel),
    ("channel_batch", channel_batch),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let names = CASES.map(|(name, _)| name).join(" | ");
    let usage = || {
        eprintln!("usage: instr CASE N\n  CASE: {names}\n  N: how many 64-byte messages");
        ExitCode::from(2)
    };
    let [case, n] = args.as_slice() else {
        return usage();
    };
    let (Some((name, run)), Ok(n)) = (CASES.iter().find(|(c, _)| c == case), n.parse::<u64>())
    else {
        return usage();
    };
    run(n);
    println!("{name}: {n} messages moved and checked");
    ExitCode::SUCCESS
}
