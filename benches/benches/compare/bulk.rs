//! `bulk`: 4 KiB and 64 KiB packets streamed one way. Every variant writes every byte once
//! on the producing core and reads every byte once on the consuming core; the producer
//! stamps one word per 512 bytes with the packet number and the consumer checks them.
//!
//! The floor is a cross-core handoff through one plain shared buffer and one flag (strictly
//! one packet in flight); single-core memcpy is the reference for a copy that crosses no
//! core.

use std::hint::black_box;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, Throughput};
use vmlink_channel::packet::GpaRange;
use vmlink_channel::{ChannelError, Config, in_process_channel_pair};
use vmlink_ring::{HeapMem, OutgoingPacket, PacketMeta, Reader, WriteError, Writer};

use crate::harness::{
    BULK_STRIDE, Backoff, Check, Group, Peer, Round, bench_pair, handoff, stamp, verify,
};

/// Packet sizes.
const SIZES: [usize; 2] = [4096, 64 * 1024];
/// Data bytes of each vmlink ring and each rtrb ring (eight 64 KiB packets).
const RING: usize = 512 * 1024;
/// The piece the in-place variant writes and reads at a time.
const PIECE: usize = 4096;
/// Descriptor (16 bytes) and trailer (8 bytes) around each vmlink packet.
const OVERHEAD: usize = 24;

/// Registers the group.
pub fn bulk(c: &mut Criterion) {
    let mut g = c.benchmark_group("bulk");
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        floor_handoff(&mut g, size);
        memcpy_single_core(&mut g, size);
        vmlink_copy(&mut g, size);
        vmlink_in_place(&mut g, size);
        vmlink_gpa_direct(&mut g, size);
        // The channel API plain and secure (`send` / `recv`, polling).
        let (a, b) = in_process_channel_pair(RING, Config::polling(1_000)).expect("channel pair");
        crate::secure::stream(&mut g, id("vmlink/channel_send_recv", size), size, a, b);
        for (cipher, name) in crate::secure::CIPHERS {
            let (a, b) = crate::secure::pair(RING, Config::polling(1_000), cipher);
            let row = id(&format!("vmlink/secure_{name}_send_recv"), size);
            crate::secure::stream(&mut g, row, size, a, b);
        }
        rtrb_chunks(&mut g, size);
        #[cfg(feature = "iceoryx2")]
        crate::iceoryx::publish_subscribe(&mut g, id("iceoryx2/publish_subscribe", size), size);
        unix_socket(&mut g, size);
    }
    g.finish();
}

/// `name/<size>KiB`.
fn id(name: &str, size: usize) -> String {
    format!("{name}/{}KiB", size / 1024)
}

/// The consumer checked the stamps of every packet of the round.
fn consumer_saw_all(name: &'static str, size: usize) -> impl Fn(u64, u64, Round) {
    move |first, n, r| verify(name, r.theirs, first, n, size / BULK_STRIDE)
}

/// The producer's source buffer, stamped for packet `seq`.
fn source(src: &mut [u8], seq: u64) -> &[u8] {
    stamp(src, seq, BULK_STRIDE, 0);
    src
}

/// Floor: a shared buffer and one flag; copy in, raise, copy out, lower.
fn floor_handoff(g: &mut Group<'_>, size: usize) {
    let (mut tx, mut rx) = handoff(size);
    let peer = {
        let mut check = Check::new(BULK_STRIDE);
        let mut dst = vec![0u8; size];
        Peer::spawn("handoff-consumer", move |n| {
            for _ in 0..n {
                rx.take(&mut dst);
                check.packet(&dst);
            }
            check.round()
        })
    };
    let mut src = vec![0xa5u8; size];
    let mut seq = 0u64;
    bench_pair(
        g,
        id("floor/cross_core_handoff", size),
        peer,
        move |n| {
            for _ in 0..n {
                tx.put(source(&mut src, seq));
                seq += 1;
            }
            0
        },
        consumer_saw_all("floor/cross_core_handoff", size),
    );
}

/// Reference: stamp, copy and check on one core.
fn memcpy_single_core(g: &mut Group<'_>, size: usize) {
    let mut src = vec![0xa5u8; size];
    let mut dst = vec![0u8; size];
    let mut check = Check::new(BULK_STRIDE);
    let mut seq = 0u64;
    g.bench_function(id("floor/memcpy_single_core", size), |b| {
        b.iter_custom(|n| {
            let first = seq;
            let start = Instant::now();
            for _ in 0..n {
                dst.copy_from_slice(source(&mut src, seq));
                check.packet(black_box(&dst));
                seq += 1;
            }
            let elapsed = start.elapsed();
            verify("memcpy", check.round(), first, n, size / BULK_STRIDE);
            elapsed
        })
    });
}

/// vmlink's copy API: `Writer::write` of the whole payload, `Reader::read_into` a buffer.
fn vmlink_copy(g: &mut Group<'_>, size: usize) {
    let mem = Arc::new(HeapMem::new(RING).expect("ring"));
    let peer = {
        let mut reader = Reader::new(Arc::clone(&mem)).expect("reader");
        reader.mask_interrupts();
        let mut check = Check::new(BULK_STRIDE);
        let mut dst = vec![0u8; size];
        Peer::spawn("ring-copy-consumer", move |n| {
            let mut b = Backoff::default();
            let mut got = 0;
            while got < n {
                match reader.read_into(&mut dst).expect("ring intact") {
                    Some(_) => {
                        check.packet(&dst);
                        got += 1;
                    }
                    None => b.snooze(),
                }
            }
            check.round()
        })
    };
    let mut writer = Writer::new(mem).expect("writer");
    let mut src = vec![0xa5u8; size];
    let mut seq = 0u64;
    bench_pair(
        g,
        id("vmlink/ring_copy", size),
        peer,
        move |n| {
            let mut b = Backoff::default();
            for _ in 0..n {
                let data = source(&mut src, seq);
                loop {
                    match writer.write(&OutgoingPacket::in_band_slice(data)) {
                        Ok(_) => break,
                        Err(WriteError::Full { .. }) => b.snooze(),
                        Err(e) => panic!("ring write failed: {e}"),
                    }
                }
                seq += 1;
            }
            0
        },
        consumer_saw_all("vmlink/ring_copy", size),
    );
}

/// vmlink's in-place API: the producer reserves the packet and writes it 4 KiB at a time
/// from a small (cache-resident) scratch buffer, as code generating data in place would;
/// the consumer peeks and reads it 4 KiB at a time with `read_payload` into its own
/// scratch, never materialising the whole packet.
fn vmlink_in_place(g: &mut Group<'_>, size: usize) {
    let mem = Arc::new(HeapMem::new(RING).expect("ring"));
    let per_piece = PIECE / BULK_STRIDE;
    let peer = {
        let mut reader = Reader::new(Arc::clone(&mem)).expect("reader");
        reader.mask_interrupts();
        let mut check = Check::new(BULK_STRIDE);
        let mut scratch = [0u8; PIECE];
        Peer::spawn("ring-in-place-consumer", move |n| {
            let mut b = Backoff::default();
            let mut got = 0;
            while got < n {
                let Some(p) = reader.peek().expect("ring intact") else {
                    b.snooze();
                    continue;
                };
                for (i, at) in (0..size).step_by(PIECE).enumerate() {
                    p.read_payload(at, &mut scratch).expect("in bounds");
                    check.part(&scratch, i * per_piece);
                }
                p.consume();
                check.end_packet();
                let _ = reader.commit();
                got += 1;
            }
            check.round()
        })
    };
    let mut writer = Writer::new(mem).expect("writer");
    let mut scratch = [0xa5u8; PIECE];
    let mut seq = 0u64;
    bench_pair(
        g,
        id("vmlink/ring_in_place", size),
        peer,
        move |n| {
            let mut b = Backoff::default();
            for _ in 0..n {
                while writer.free_space().expect("ring intact") <= size + OVERHEAD {
                    b.snooze();
                }
                let mut slot = writer
                    .reserve(PacketMeta::in_band(), 0, size)
                    .expect("room was checked");
                for (i, at) in (0..size).step_by(PIECE).enumerate() {
                    stamp(&mut scratch, seq, BULK_STRIDE, i * per_piece);
                    slot.write_payload(at, &scratch).expect("in bounds");
                }
                let _ = slot.commit();
                seq += 1;
            }
            0
        },
        consumer_saw_all("vmlink/ring_in_place", size),
    );
}

/// rtrb's chunk API on a byte ring: `push_entire_slice` / `pop_entire_slice` (one
/// contiguous-or-two-part memcpy each).
fn rtrb_chunks(g: &mut Group<'_>, size: usize) {
    let (mut tx, mut rx) = rtrb::RingBuffer::<u8>::new(RING);
    let peer = {
        let mut check = Check::new(BULK_STRIDE);
        let mut dst = vec![0u8; size];
        Peer::spawn("rtrb-bulk-consumer", move |n| {
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
    let mut src = vec![0xa5u8; size];
    let mut seq = 0u64;
    bench_pair(
        g,
        id("rtrb/chunks", size),
        peer,
        move |n| {
            let mut b = Backoff::default();
            for _ in 0..n {
                let data = source(&mut src, seq);
                while tx.push_entire_slice(data).is_err() {
                    b.snooze();
                }
                seq += 1;
            }
            0
        },
        consumer_saw_all("rtrb/chunks", size),
    );
}

/// A Unix stream socket: `write_all` of each packet, `read_exact` of each packet.
fn unix_socket(g: &mut Group<'_>, size: usize) {
    let (mut tx, mut rx) = UnixStream::pair().expect("socketpair");
    let peer = {
        let mut check = Check::new(BULK_STRIDE);
        let mut dst = vec![0u8; size];
        Peer::spawn("socket-bulk-consumer", move |n| {
            for _ in 0..n {
                rx.read_exact(&mut dst).expect("packet");
                check.packet(&dst);
            }
            check.round()
        })
    };
    let mut src = vec![0xa5u8; size];
    let mut seq = 0u64;
    bench_pair(
        g,
        id("unix/socket", size),
        peer,
        move |n| {
            for _ in 0..n {
                tx.write_all(source(&mut src, seq)).expect("consumer alive");
                seq += 1;
            }
            0
        },
        consumer_saw_all("unix/socket", size),
    );
}

/// Buffers of the GPA-direct case: packets in flight at most.
const GPA_SLOTS: usize = 8;
/// Bytes in a page of the buffer area.
const PAGE: usize = 4096;

/// vmlink's GPA-direct path, as a block device would use it: the producer writes each
/// packet into one of [`GPA_SLOTS`] buffers of a shared buffer area (word stores, as into
/// memory the peer maps) and sends a GPA-direct descriptor naming its pages through the
/// channel; the consumer parses the ranges, reads the pages straight out of the buffer
/// area and hands the buffer back with an in-band message carrying its number.
fn vmlink_gpa_direct(g: &mut Group<'_>, size: usize) {
    let pages_per_slot = size / PAGE;
    let area: Arc<[AtomicU64]> = (0..GPA_SLOTS * size / 8)
        .map(|_| AtomicU64::new(0))
        .collect();
    let config =
        Config::polling(crate::rtt::SPIN).with_gpa_page_limit((GPA_SLOTS * pages_per_slot) as u64);
    let (tx, rx) = in_process_channel_pair(64 * 1024, config).expect("channel pair");
    let per_page = PAGE / BULK_STRIDE;
    let peer = {
        let area = Arc::clone(&area);
        let mut check = Check::new(BULK_STRIDE);
        let mut page = vec![0u8; PAGE];
        let mut scratch = [0u8; 256];
        Peer::spawn("gpa-consumer", move |n| {
            for _ in 0..n {
                let first_page = rx
                    .recv_with(None, |guard| {
                        let range = guard
                            .gpa_ranges(&mut scratch)
                            .expect("valid ranges")
                            .next()
                            .expect("one range");
                        assert_eq!(range.byte_count as usize, size, "whole packet in one range");
                        let mut first_page = None;
                        for (i, p) in range.pages().enumerate() {
                            first_page.get_or_insert(p);
                            let words =
                                &area[p as usize * (PAGE / 8)..(p as usize + 1) * (PAGE / 8)];
                            for (w, out) in words.iter().zip(page.as_chunks_mut::<8>().0) {
                                *out = w.load(Ordering::Relaxed).to_le_bytes();
                            }
                            check.part(&page, i * per_page);
                        }
                        check.end_packet();
                        first_page
                    })
                    .expect("a GPA-direct packet");
                let slot = first_page.expect("pages") / pages_per_slot as u64;
                rx.send(&slot.to_le_bytes(), None)
                    .expect("hand the buffer back");
            }
            check.round()
        })
    };
    let mut free: Vec<u64> = (0..GPA_SLOTS as u64).collect();
    let mut pages = vec![0u64; pages_per_slot];
    let mut src = vec![0xa5u8; size];
    let mut back = [0u8; 8];
    let mut seq = 0u64;
    bench_pair(
        g,
        id("vmlink/gpa_direct", size),
        peer,
        move |n| {
            for _ in 0..n {
                let slot = loop {
                    if let Some(s) = free.pop() {
                        break s;
                    }
                    let r = tx.recv(&mut back, None).expect("a buffer handed back");
                    assert_eq!(r.payload_len, 8);
                    free.push(u64::from_le_bytes(back));
                };
                let first = slot as usize * pages_per_slot;
                let data = source(&mut src, seq);
                let words = &area[first * (PAGE / 8)..(first + pages_per_slot) * (PAGE / 8)];
                for (w, b) in words.iter().zip(data.as_chunks::<8>().0) {
                    w.store(u64::from_le_bytes(*b), Ordering::Relaxed);
                }
                for (i, p) in pages.iter_mut().enumerate() {
                    *p = (first + i) as u64;
                }
                let ranges = [GpaRange {
                    byte_offset: 0,
                    byte_count: size as u32,
                    pages: &pages,
                }];
                // The channel's release store of the write index publishes the stores above.
                match tx.send_gpa_direct(&ranges, &[], PacketMeta::in_band(), None) {
                    Ok(()) => {}
                    Err(ChannelError::Closed) => panic!("consumer gone"),
                    Err(e) => panic!("GPA-direct send failed: {e}"),
                }
                seq += 1;
            }
            // Every buffer of the round comes back before the round ends, so the next
            // round starts with all of them free.
            while free.len() < GPA_SLOTS {
                tx.recv(&mut back, None).expect("a buffer handed back");
                free.push(u64::from_le_bytes(back));
            }
            0
        },
        consumer_saw_all("vmlink/gpa_direct", size),
    );
}
