//! Scaling: how the figures move with the ring's size, the payload's size and the number
//! of channel pairs.
//!
//! - `scaling_ring`: 1 KiB packets streamed through rings of 16 KiB to 4 MiB (vmlink's
//!   ring, rtrb's byte ring of the same capacity).
//! - `rtt_payload`: a round trip carrying the same payload both ways, from 0 bytes to the
//!   largest packet a 256 KiB ring carries: the floor (a shared buffer and a flag each way,
//!   copied in and out), vmlink's ring and channel (polling), a Unix socketpair.
//! - `scaling_pairs`: N independent channel pairs, each on its own producer and consumer
//!   thread, blocking waits, 64-byte packets; aggregate packets per second. On a 2-core
//!   machine N = 1 fills the cores and N = 2 oversubscribes them (4 threads).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use vmlink_channel::{Config, in_process_channel_pair};
use vmlink_ring::{HeapMem, OutgoingPacket, Reader, Writer};

use crate::harness::{
    BULK_STRIDE, Backoff, Check, Group, MSG, Peer, Round, bench_pair, handoff, msg, stamp, verify,
};
use crate::rtt::take;

/// Ring sizes (data bytes) of `scaling_ring`.
const RING_SIZES: [usize; 5] = [16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20];
/// The packet streamed in `scaling_ring`.
const PACKET: usize = 1024;
/// Data bytes of each ring in `rtt_payload`.
const RTT_RING: usize = 256 << 10;
/// In-band descriptor bytes in front of a payload.
const DESCRIPTOR: usize = 16;
/// Packets per producer commit (and at most per consumer commit) in `scaling_ring`.
const BATCH: u64 = 32;

/// Registers the three groups.
pub fn scaling(c: &mut Criterion) {
    ring_sizes(c);
    payloads(c);
    pairs(c);
}

/// Bytes between stamped words for a payload of `len` bytes: every word of small ones.
fn stride(len: usize) -> usize {
    if len <= MSG { 8 } else { BULK_STRIDE }
}

/// Stamped words in a payload of `len` bytes.
fn samples(len: usize) -> usize {
    len.div_ceil(stride(len))
}

// ---- ring sizes -------------------------------------------------------------------------

fn ring_sizes(c: &mut Criterion) {
    let mut g = c.benchmark_group("scaling_ring");
    g.throughput(Throughput::Bytes(PACKET as u64));
    for ring in RING_SIZES {
        vmlink_ring_stream(&mut g, ring);
        rtrb_stream(&mut g, ring);
    }
    g.finish();
}

fn ring_label(ring: usize) -> String {
    if ring >= 1 << 20 {
        format!("{}MiB", ring >> 20)
    } else {
        format!("{}KiB", ring >> 10)
    }
}

/// vmlink's ring, copy API: the producer commits every [`BATCH`] packets or when full; the
/// consumer polls with interrupts masked and commits after at most [`BATCH`].
fn vmlink_ring_stream(g: &mut Group<'_>, ring: usize) {
    crate::stream::ring_stream(
        g,
        format!("vmlink/ring_copy/{}", ring_label(ring)),
        ring,
        PACKET,
        BATCH,
    );
}

/// rtrb's byte ring of the same capacity, whole packets as chunks.
fn rtrb_stream(g: &mut Group<'_>, ring: usize) {
    let (mut tx, mut rx) = rtrb::RingBuffer::<u8>::new(ring);
    let peer = {
        let mut check = Check::new(BULK_STRIDE);
        let mut dst = [0u8; PACKET];
        Peer::spawn("rtrb-consumer", move |n| {
            let mut b = Backoff::default();
            for _ in 0..n {
                while rx.pop_entire_slice(&mut dst).is_err() {
                    b.snooze();
                }
                check.packet(&dst);
            }
            check.round()
        })
    };
    let mut src = [0u8; PACKET];
    let mut seq = 0u64;
    bench_pair(
        g,
        format!("rtrb/chunks/{}", ring_label(ring)),
        peer,
        move |n| {
            let mut b = Backoff::default();
            for _ in 0..n {
                stamp(&mut src, seq, BULK_STRIDE, 0);
                while tx.push_entire_slice(&src).is_err() {
                    b.snooze();
                }
                seq += 1;
            }
            0
        },
        move |first, n, r: Round| verify("rtrb", r.theirs, first, n, samples(PACKET)),
    );
}

// ---- payload sizes ----------------------------------------------------------------------

/// Payload sizes of `rtt_payload`: 0 bytes up to the largest a [`RTT_RING`] ring carries.
fn payload_sizes() -> Vec<usize> {
    let max = vmlink_ring::protocol::max_packet_len(RTT_RING) - DESCRIPTOR;
    vec![0, 64, 256, 1024, 4096, 16 << 10, 64 << 10, max]
}

fn payloads(c: &mut Criterion) {
    let mut g = c.benchmark_group("rtt_payload");
    g.throughput(Throughput::Elements(1));
    for len in payload_sizes() {
        floor_handoff(&mut g, len);
        ring_polling(&mut g, len);
        channel_polling_call(&mut g, len);
        socketpair(&mut g, len);
    }
    g.finish();
}

/// Both sides' checksums cover every payload of the round.
fn both(name: &'static str, len: usize) -> impl Fn(u64, u64, Round) {
    move |first, n, r| {
        verify(name, r.mine, first, n, samples(len));
        verify(name, r.theirs, first, n, samples(len));
    }
}

/// Floor: one shared buffer and flag each way; each side copies the payload in, raises
/// the flag, and the other copies it out.
fn floor_handoff(g: &mut Group<'_>, len: usize) {
    let (mut req_tx, mut req_rx) = handoff(len.max(8));
    let (mut resp_tx, mut resp_rx) = handoff(len.max(8));
    let peer = {
        let mut check = Check::new(stride(len));
        let mut buf = vec![0u8; len];
        Peer::spawn("handoff-echo", move |n| {
            for _ in 0..n {
                req_rx.take(&mut buf);
                check.packet(&buf);
                resp_tx.put(&buf);
            }
            check.round()
        })
    };
    let mut check = Check::new(stride(len));
    let mut src = vec![0u8; len];
    let mut buf = vec![0u8; len];
    let mut seq = 0u64;
    bench_pair(
        g,
        format!("floor/handoff/{}", len),
        peer,
        move |n| {
            for _ in 0..n {
                stamp(&mut src, seq, stride(len), 0);
                seq += 1;
                req_tx.put(&src);
                resp_rx.take(&mut buf);
                check.packet(&buf);
            }
            check.round()
        },
        both("floor/handoff", len),
    );
}

/// vmlink's ring layer, both readers polling with interrupts masked.
fn ring_polling(g: &mut Group<'_>, len: usize) {
    let req = Arc::new(HeapMem::new(RTT_RING).expect("ring"));
    let resp = Arc::new(HeapMem::new(RTT_RING).expect("ring"));
    let peer = {
        let mut reader = Reader::new(Arc::clone(&req)).expect("reader");
        let mut writer = Writer::new(Arc::clone(&resp)).expect("writer");
        reader.mask_interrupts();
        let mut check = Check::new(stride(len));
        let mut buf = vec![0u8; len];
        Peer::spawn("ring-echo", move |n| {
            for _ in 0..n {
                take(&mut reader, &mut buf);
                check.packet(&buf);
                let _ = writer
                    .write(&OutgoingPacket::in_band_slice(&buf))
                    .expect("room for the response");
            }
            check.round()
        })
    };
    let mut writer = Writer::new(req).expect("writer");
    let mut reader = Reader::new(resp).expect("reader");
    reader.mask_interrupts();
    let mut check = Check::new(stride(len));
    let mut src = vec![0u8; len];
    let mut buf = vec![0u8; len];
    let mut seq = 0u64;
    bench_pair(
        g,
        format!("vmlink/ring_polling/{}", len),
        peer,
        move |n| {
            for _ in 0..n {
                stamp(&mut src, seq, stride(len), 0);
                seq += 1;
                let _ = writer
                    .write(&OutgoingPacket::in_band_slice(&src))
                    .expect("room for the request");
                take(&mut reader, &mut buf);
                check.packet(&buf);
            }
            check.round()
        },
        both("vmlink/ring_polling", len),
    );
}

/// vmlink's channel: `call` and `complete`, polling mode.
fn channel_polling_call(g: &mut Group<'_>, len: usize) {
    let (host, guest) =
        in_process_channel_pair(RTT_RING, Config::polling(crate::rtt::SPIN)).expect("pair");
    let peer = {
        let mut check = Check::new(stride(len));
        let mut buf = vec![0u8; len.max(8)];
        Peer::spawn("channel-echo", move |n| {
            for _ in 0..n {
                let r = guest.recv(&mut buf, None).expect("request");
                check.packet(r.payload(&buf));
                guest
                    .complete(r.transaction_id, &buf[..len], None)
                    .expect("response");
            }
            check.round()
        })
    };
    let mut check = Check::new(stride(len));
    let mut src = vec![0u8; len];
    let mut buf = vec![0u8; len.max(8)];
    let mut seq = 0u64;
    bench_pair(
        g,
        format!("vmlink/channel_polling_call/{}", len),
        peer,
        move |n| {
            for _ in 0..n {
                stamp(&mut src, seq, stride(len), 0);
                seq += 1;
                let got = host.call(&src, &mut buf, None).expect("call");
                assert_eq!(got, len, "payloads are multiples of 8 bytes");
                check.packet(&buf[..got]);
            }
            check.round()
        },
        both("vmlink/channel_polling_call", len),
    );
}

/// A Unix stream socketpair, blocking: write the whole payload, read it back. A stream has
/// no empty messages, so the 0-byte case carries a 1-byte token (else nothing would move).
fn socketpair(g: &mut Group<'_>, len: usize) {
    let wire = len.max(1);
    let (mut mine, theirs) = UnixStream::pair().expect("socketpair");
    let peer = {
        let mut check = Check::new(stride(len));
        let mut buf = vec![0u8; wire];
        let mut theirs = theirs;
        Peer::spawn("socket-echo", move |n| {
            for _ in 0..n {
                theirs.read_exact(&mut buf).expect("request");
                check.packet(&buf[..len]);
                theirs.write_all(&buf).expect("response");
            }
            check.round()
        })
    };
    let mut check = Check::new(stride(len));
    let mut src = vec![0u8; wire];
    let mut buf = vec![0u8; wire];
    let mut seq = 0u64;
    bench_pair(
        g,
        format!("unix/socketpair/{}", len),
        peer,
        move |n| {
            for _ in 0..n {
                stamp(&mut src[..len], seq, stride(len), 0);
                seq += 1;
                mine.write_all(&src).expect("request");
                mine.read_exact(&mut buf).expect("response");
                check.packet(&buf[..len]);
            }
            check.round()
        },
        both("unix/socketpair", len),
    );
}

// ---- channel pairs ----------------------------------------------------------------------

/// Channel pairs measured: N = 1 uses both of a 2-core machine's cores, N = 2 four threads.
const PAIRS: [usize; 2] = [1, 2];
/// Data bytes of each ring in `scaling_pairs`.
const PAIR_RING: usize = 64 << 10;

fn pairs(c: &mut Criterion) {
    let mut g = c.benchmark_group("scaling_pairs");
    for n in PAIRS {
        // One element is one packet on each pair: throughput is the aggregate.
        g.throughput(Throughput::Elements(n as u64));
        channel_pairs(&mut g, n);
    }
    g.finish();
}

/// `n` channel pairs in blocking mode: producers `send` 64-byte packets (waiting when the
/// ring is full), consumers `recv_batch` up to 64 at a time. Pair 0's producer is the
/// measuring thread; every other producer and consumer is a [`Peer`].
fn channel_pairs(g: &mut Group<'_>, n: usize) {
    let mut producers = Vec::new();
    let mut consumers = Vec::new();
    for _ in 0..n {
        let (tx, rx) = in_process_channel_pair(PAIR_RING, Config::default()).expect("pair");
        producers.push(tx);
        let mut check = Check::new(8);
        let mut buf = [0u8; MSG];
        consumers.push(Peer::spawn("pair-consumer", move |iters| {
            let mut got = 0;
            while got < iters {
                got += rx
                    .recv_batch(64, None, |p| {
                        p.read_payload(0, &mut buf).expect("64-byte payload");
                        check.packet(&buf);
                    })
                    .expect("receive") as u64;
            }
            check.round()
        }));
    }
    let mut producers = producers.into_iter();
    let mine = producers.next().expect("at least one pair");
    let mut others: Vec<Peer> = producers
        .map(|tx| {
            let mut seq = 0u64;
            Peer::spawn("pair-producer", move |iters| {
                for _ in 0..iters {
                    tx.send(&msg(seq), None).expect("send");
                    seq += 1;
                }
                0
            })
        })
        .collect();
    others.extend(consumers);
    let mut seq = 0u64;
    let mut results = Vec::with_capacity(others.len());
    g.bench_function(format!("vmlink/channel_blocking_pairs/{}", n), |b| {
        b.iter_custom(|iters| {
            let first = seq;
            for p in &mut others {
                p.start(iters);
            }
            for p in &others {
                p.wait_started();
            }
            let start = Instant::now();
            for _ in 0..iters {
                mine.send(&msg(seq), None).expect("send");
                seq += 1;
            }
            results.clear();
            results.extend(others.iter().map(Peer::wait_finished));
            let took = start.elapsed();
            // The consumers come last; each saw its pair's packets `first..first + iters`.
            for r in &results[n - 1..] {
                verify("channel_blocking_pairs", *r, first, iters, MSG / 8);
            }
            took.max(Duration::from_nanos(1))
        })
    });
}
