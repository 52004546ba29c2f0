//! Exhaustive model check of the signalling handshakes under loom.
//!
//! Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p vmlink-ring --test loom --release
//! ```
//!
//! Under `--cfg loom` the ring's control-word atomics and its `fence(SeqCst)`s are loom's
//! (see `src/sync.rs`), so loom explores every interleaving of the two halves' control-page
//! accesses, and every value a load may legally return under the C++ memory model, around
//! the real [`Writer`] and [`Reader`] over a [`HeapMem`]. Doorbells are
//! [`loom::sync::Notify`]: a side that gets [`WaitDecision::Sleep`] blocks on its doorbell,
//! and the peer rings it exactly when a commit (or `prepare_wait`) returns
//! [`Signal::is_needed`](vmlink_ring::Signal::is_needed). A doorbell keeps one pending
//! notification, like an eventfd, and loom may also wake a waiter spuriously, so every
//! wait is followed by a re-check. If any interleaving loses a wake-up, the sleeper blocks
//! for ever after its peer has finished and loom fails the test with "deadlock". What
//! passing proves, for every interleaving with at most `PREEMPTION_BOUND` (4)
//! preemptions of these small scenarios (unbounded runs take many minutes; see there):
//!
//! - the reader's interrupt-mask handshake (`Writer::commit` signals only on empty →
//!   non-empty while unmasked; `Reader::prepare_wait` unmasks, fences and re-checks)
//!   never loses a wake-up, with one commit per packet and with batched commits and a
//!   masked, polling reader (`reader_wakeup`, `reader_wakeup_batched_masked`);
//! - the writer's pending-send-size handshake (`Writer::prepare_wait` arms the threshold,
//!   fences and re-checks; `Reader::commit` signals on crossing it) never loses a
//!   wake-up (`writer_wakeup`);
//! - both at once, with the signal that `Writer::prepare_wait` owes for the packets it
//!   commits (`both_directions`);
//! - and every packet arrives once, in order, with its bytes intact.
//!
//! Data words are plain `core` atomics even under loom, so payload ordering is checked
//! here only sequentially; `tests/stress.rs` under Miri covers the data path.
//!
//! # The model can fail
//!
//! Checked by hand in a scratch copy of the crate (never committed), one break at a time,
//! with `LOOM_MAX_PREEMPTIONS=2`. Each break below makes loom report
//! `deadlock; threads = [...]` in well under a second, in the models listed:
//!
//! | break                                                        | models that deadlock |
//! |--------------------------------------------------------------|----------------------|
//! | remove the `fence(SeqCst)` in `Writer::commit`               | a, b, d              |
//! | remove the `fence(SeqCst)` in `Writer::prepare_wait`         | c, d                 |
//! | remove the `fence(SeqCst)` in `Reader::commit`               | c, d                 |
//! | remove the `fence(SeqCst)` in `Reader::prepare_wait`         | b, d                 |
//! | masked reader sleeps even when `prepare_wait` says `Ready`   | b, d                 |
//! | reader's `peek` path never rings the writer's doorbell       | c                    |
//!
//! (a: `reader_wakeup`, b: `reader_wakeup_batched_masked`, c: `writer_wakeup`,
//! d: `both_directions`.) A missing fence shows up as the store-buffering outcome: each
//! side's load after its store reads the peer's stale value, so each decides the other
//! will act. The `Reader::prepare_wait` fence is redundant in (a) and (c) only because
//! the reader there commits, with `Reader::commit`'s fence, before it prepares to wait.

#![cfg(loom)]

use loom::sync::Notify;
use loom::thread;
use std::sync::Arc;
use vmlink_ring::{
    HeapMem, OutgoingPacket, PacketMeta, Payload, Reader, WaitDecision, WriteError, Writer,
};

/// One 4096-byte data page: small enough that big packets fill it.
const DATA_LEN: usize = 4096;

/// The two doorbells of one ring.
#[derive(Default)]
struct Bells {
    /// Rung by the writer when its commit says the reader needs a signal.
    to_reader: Notify,
    /// Rung by the reader when its commit says the writer needs a signal.
    to_writer: Notify,
}

/// The payload byte `j` of packet `i`.
fn byte(i: usize, j: usize) -> u8 {
    (i * 37 + j * 11 + 1) as u8
}

fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| byte(i, j)).collect()
}

/// Checks packet `i`'s payload as read (padding included).
fn check_payload(i: usize, len: usize, got: &[u8]) {
    assert_eq!(
        got.len(),
        len.next_multiple_of(8),
        "packet {i}: padded length"
    );
    for (j, b) in got.iter().enumerate() {
        let expect = if j < len { byte(i, j) } else { 0 };
        assert_eq!(*b, expect, "packet {i}: byte {j}");
    }
}

fn meta(i: usize) -> PacketMeta {
    PacketMeta {
        transaction_id: i as u64,
        ..PacketMeta::in_band()
    }
}

/// How the reader takes packets out.
#[derive(Clone, Copy)]
struct ReaderStyle {
    /// Mask interrupts while polling; only `prepare_wait` unmasks.
    mask: bool,
    /// `read_into` (consume + commit) instead of `peek` / `read_payload` / `consume` /
    /// `commit`.
    read_into: bool,
}

/// Receives packets of the given payload lengths, in order, sleeping on its doorbell
/// whenever `prepare_wait` says so, and ringing the writer's when a commit asks.
fn run_reader(ring: Arc<HeapMem>, bells: &Bells, lens: &[usize], style: ReaderStyle) {
    let mut reader = Reader::new(ring).unwrap();
    let mut buf = vec![0u8; DATA_LEN];
    let mut next = 0;
    if style.mask {
        reader.mask_interrupts();
    }
    while next < lens.len() {
        let got = if style.read_into {
            reader.read_into(&mut buf).unwrap().map(|(info, signal)| {
                if signal.is_needed() {
                    bells.to_writer.notify();
                }
                info
            })
        } else {
            match reader.peek().unwrap() {
                Some(packet) => {
                    let info = *packet.info();
                    packet
                        .read_payload(0, &mut buf[..info.payload_len()])
                        .unwrap();
                    packet.consume();
                    if reader.commit().is_needed() {
                        bells.to_writer.notify();
                    }
                    Some(info)
                }
                None => None,
            }
        };
        match got {
            Some(info) => {
                assert_eq!(info.transaction_id(), next as u64, "packets out of order");
                assert_eq!(info.header_len(), 0);
                check_payload(next, lens[next], &buf[..info.payload_len()]);
                next += 1;
            }
            None => {
                let (decision, signal) = reader.prepare_wait().unwrap();
                if signal.is_needed() {
                    bells.to_writer.notify();
                }
                if decision == WaitDecision::Sleep {
                    bells.to_reader.wait();
                }
                if style.mask {
                    reader.mask_interrupts();
                }
            }
        }
    }
}

/// How the writer puts packets in.
#[derive(Clone, Copy)]
enum WriterStyle {
    /// `write` (push + commit) each packet.
    EachCommitted,
    /// Commit after every `n` pushes (and at the end).
    Batches(usize),
    /// Push until the ring is full; `prepare_wait` commits; commit at the end.
    UntilFull,
}

/// Sends packets of the given payload lengths, sleeping for space whenever
/// `prepare_wait` says so, and ringing the reader's doorbell when a commit asks.
fn run_writer(ring: Arc<HeapMem>, bells: &Bells, lens: &[usize], style: WriterStyle) {
    let mut writer = Writer::new(ring).unwrap();
    for (i, &len) in lens.iter().enumerate() {
        let data = payload(i, len);
        let parts: [&[u8]; 1] = [&data];
        let packet = OutgoingPacket {
            meta: meta(i),
            header: &[],
            payload: Payload::Gather(&parts),
        };
        loop {
            match writer.push(&packet) {
                Ok(()) => break,
                Err(WriteError::Full { .. }) => {
                    let (decision, signal) = writer.prepare_wait(0, len).unwrap();
                    if signal.is_needed() {
                        bells.to_reader.notify();
                    }
                    if decision == WaitDecision::Sleep {
                        bells.to_writer.wait();
                    }
                }
                Err(e) => panic!("packet {i}: {e}"),
            }
        }
        let commit_now = match style {
            WriterStyle::EachCommitted => true,
            WriterStyle::Batches(n) => (i + 1) % n == 0,
            WriterStyle::UntilFull => false,
        };
        if commit_now && writer.commit().is_needed() {
            bells.to_reader.notify();
        }
    }
    if writer.commit().is_needed() {
        bells.to_reader.notify();
    }
}

/// Preemption bound for every model unless `LOOM_MAX_PREEMPTIONS` overrides it.
///
/// Unbounded exploration does not finish in minutes: loom may wake a `Notify` waiter
/// spuriously and may let a load return any store not yet overwritten in its view, and
/// every such branch sends a side round its loop again. With at most 4 preemptions every
/// model here finishes in a few seconds in release mode (measured: 0.4 to 5 s each), and
/// each deliberate break described at the top of this file is found with a bound of 2.
/// Run deeper with e.g. `LOOM_MAX_PREEMPTIONS=6`.
const PREEMPTION_BOUND: usize = 4;

/// Runs one writer thread and one reader (the model's main thread) over a fresh ring, for
/// every interleaving.
fn check(lens: &'static [usize], writer: WriterStyle, reader: ReaderStyle) {
    let mut builder = loom::model::Builder::new();
    if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
        builder.preemption_bound = Some(PREEMPTION_BOUND);
    }
    builder.check(move || {
        let ring = Arc::new(HeapMem::new(DATA_LEN).unwrap());
        let bells = Arc::new(Bells::default());
        let w = {
            let (ring, bells) = (ring.clone(), bells.clone());
            thread::spawn(move || run_writer(ring, &bells, lens, writer))
        };
        run_reader(ring, &bells, lens, reader);
        w.join().unwrap();
    });
}

/// (a) Three small packets, one commit each; the reader sleeps whenever the ring is empty.
#[test]
fn reader_wakeup() {
    check(
        &[3, 8, 0],
        WriterStyle::EachCommitted,
        ReaderStyle {
            mask: false,
            read_into: false,
        },
    );
}

/// (b) Push, push, commit, then push, commit; the reader polls with interrupts masked and
/// unmasks only through `prepare_wait`.
#[test]
fn reader_wakeup_batched_masked() {
    check(
        &[5, 16, 1],
        WriterStyle::Batches(2),
        ReaderStyle {
            mask: true,
            read_into: false,
        },
    );
}

/// (c) Two packets of about 2048 payload bytes in a 4096-byte ring: the second does not fit
/// until the first is read, so the writer arms `pending_send_size` and sleeps; the reader's
/// commit must signal it. (A third packet makes the model take minutes.)
#[test]
fn writer_wakeup() {
    // 16 + 2048 bytes + 8 trailer = 2072; after one packet 2024 bytes are free, and the
    // second needs 16 + 2040 + 8 = 2064.
    check(
        &[2048, 2040],
        WriterStyle::EachCommitted,
        ReaderStyle {
            mask: false,
            read_into: false,
        },
    );
}

/// (d) Both directions at once: the writer pushes without committing until the ring is
/// full, so its `prepare_wait` publishes the packets and owes the reader a signal while it
/// goes to sleep for space; the reader polls masked with `read_into`, sleeps for data, and
/// owes the writer a signal when it frees space.
#[test]
fn both_directions() {
    // 16 + 1800 + 8 = 1824 bytes a packet: two fit, the third waits.
    check(
        &[1800, 1800, 1800],
        WriterStyle::UntilFull,
        ReaderStyle {
            mask: true,
            read_into: true,
        },
    );
}
