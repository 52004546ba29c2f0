//! `stream_64`: 64-byte payloads streamed one way as fast as they go. The measuring thread
//! produces; the peer thread consumes and checks every word. Each structure buffers about
//! 64 KiB.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::mpsc;

use criterion::{Criterion, Throughput};
use crossbeam_queue::ArrayQueue;
use vmlink_channel::{ChannelError, Config, in_process_channel_pair};
use vmlink_ring::{HeapMem, OutgoingPacket, Reader, WriteError, Writer};

use crate::harness::{
    BULK_STRIDE, Backoff, Check, Group, MSG, Msg, Peer, Round, bench_pair, msg, send_batches,
    stamp, verify,
};
use vmlink_channel::Wait;

/// Data bytes of each vmlink ring; holds 744 packets of 64 bytes (88 bytes with descriptor
/// and trailer).
const RING: usize = 16 * 4096;
/// Items in the other queues (64 KiB of `[u8; 64]`).
const ITEMS: usize = 1024;
/// Packets per commit in the batched variants, and the most a consumer takes per commit.
const BATCH: u64 = 32;

/// Registers the group.
pub fn stream_64(c: &mut Criterion) {
    let mut g = c.benchmark_group("stream_64");
    // One element is one 64-byte payload.
    g.throughput(Throughput::Elements(1));
    vmlink_ring(&mut g, "vmlink/ring_commit_each", 1);
    vmlink_ring(&mut g, "vmlink/ring_commit_32", BATCH);
    vmlink_channel(&mut g, "vmlink/channel_try_send", false);
    vmlink_channel(&mut g, "vmlink/channel_batch_32", true);
    vmlink_channel_split(&mut g, "vmlink/channel_split");
    rtrb_push_pop(&mut g);
    rtrb_chunks(&mut g);
    crossbeam_array_queue(&mut g);
    std_sync_channel(&mut g);
    unix_socket(&mut g);
    // The batched channel case again, the consumer in another process.
    crate::cross_process::shm_stream(&mut g, "vmlink/shm_batch_32");
    g.finish();
}

/// The consumer checked every payload of the round.
fn consumer_saw_all(name: &'static str) -> impl Fn(u64, u64, Round) {
    move |first, n, r| verify(name, r.theirs, first, n, MSG / 8)
}

/// vmlink's ring layer: the producer commits every `batch` packets (and whenever the ring
/// is full); the consumer polls with interrupts masked and commits after at most `batch`.
fn vmlink_ring(g: &mut Group<'_>, name: &'static str, batch: u64) {
    ring_stream(g, name.to_owned(), RING, MSG, batch);
}

/// Streams `payload`-byte packets through a ring of `ring` data bytes: the producer pushes
/// and commits every `batch` packets (and whenever the ring is full); the consumer polls
/// with interrupts masked, checks every packet's stamps and commits after at most `batch`.
pub fn ring_stream(g: &mut Group<'_>, name: String, ring: usize, payload: usize, batch: u64) {
    // Every word of a small message is stamped, one word per 512 bytes of a larger one.
    let stride = if payload <= MSG { 8 } else { BULK_STRIDE };
    let mem = Arc::new(HeapMem::new(ring).expect("ring"));
    let peer = {
        let mut reader = Reader::new(Arc::clone(&mem)).expect("reader");
        reader.mask_interrupts();
        let mut check = Check::new(stride);
        let mut buf = vec![0u8; payload];
        Peer::spawn("ring-consumer", move |n| {
            let mut got = 0;
            let mut b = Backoff::default();
            while got < n {
                let mut took = 0;
                while took < batch {
                    let Some(p) = reader.peek().expect("ring intact") else {
                        break;
                    };
                    p.read_payload(0, &mut buf).expect("payload");
                    p.consume();
                    check.packet(&buf);
                    took += 1;
                }
                if took == 0 {
                    b.snooze();
                } else {
                    got += took;
                    let _ = reader.commit();
                }
            }
            check.round()
        })
    };
    let mut writer = Writer::new(mem).expect("writer");
    let mut src = vec![0u8; payload];
    let mut seq = 0u64;
    let samples = payload.div_ceil(stride);
    let label = name.clone();
    bench_pair(
        g,
        name,
        peer,
        move |n| {
            let end = seq + n;
            let mut b = Backoff::default();
            while seq < end {
                stamp(&mut src, seq, stride, 0);
                match writer.push(&OutgoingPacket::in_band_slice(&src)) {
                    Ok(()) => {
                        seq += 1;
                        if seq.is_multiple_of(batch) || seq == end {
                            let _ = writer.commit();
                        }
                    }
                    Err(WriteError::Full { .. }) => {
                        // Publish what is pushed so the consumer can make room.
                        let _ = writer.commit();
                        b.snooze();
                    }
                    Err(e) => panic!("ring write failed: {e}"),
                }
            }
            0
        },
        move |first, n, r| verify(&label, r.theirs, first, n, samples),
    );
}

/// The consumer of a channel stream: takes up to 64 per `recv_batch` (`Wait::Now`, one
/// commit each) through `recv_batch` until it has the round's packets, checking each.
fn channel_consumer(
    name: &str,
    mut recv_batch: impl FnMut(&mut dyn FnMut(&mut vmlink_channel::Packet<'_>)) -> usize
    + Send
    + 'static,
) -> Peer {
    let mut check = Check::new(8);
    let mut buf = [0u8; MSG];
    Peer::spawn(name, move |n| {
        let mut got = 0;
        let mut b = Backoff::default();
        while got < n {
            let k = recv_batch(&mut |p| {
                p.read_payload(0, &mut buf).expect("64-byte payload");
                check.packet(&buf);
            });
            if k == 0 {
                b.snooze();
            }
            got += k as u64;
        }
        check.round()
    })
}

/// Sends packets `seq..end` one `send` (`Wait::Now`) each, spinning while the ring is full.
fn send_each(seq: &mut u64, end: u64, mut send: impl FnMut(&[u8]) -> Result<(), ChannelError>) {
    let mut b = Backoff::default();
    while *seq < end {
        match send(&msg(*seq)) {
            Ok(()) => *seq += 1,
            Err(ChannelError::Full) => b.snooze(),
            Err(e) => panic!("send failed: {e}"),
        }
    }
}

/// vmlink channels: `send` (`Wait::Now`) per packet, or `batch()` of 32 per commit; the consumer
/// takes up to 64 per `recv_batch` (`Wait::Now`) (one lock, one commit).
fn vmlink_channel(g: &mut Group<'_>, name: &'static str, batched: bool) {
    let (tx, rx) =
        in_process_channel_pair(RING, Config::polling(crate::rtt::SPIN)).expect("channel pair");
    // The consumer polls with `recv_batch` (`Wait::Now`): it tells the producer not to signal.
    rx.mask_interrupts();
    let peer = channel_consumer("channel-consumer", move |each| {
        rx.recv_batch(64, Wait::Now, |p| each(p)).expect("receive")
    });
    let mut seq = 0u64;
    bench_pair(
        g,
        name,
        peer,
        move |n| {
            let end = seq + n;
            if batched {
                send_batches(&tx, &mut seq, end, BATCH);
            } else {
                send_each(&mut seq, end, |m| tx.send(m, Wait::Now));
            }
            0
        },
        consumer_saw_all(name),
    );
}

/// vmlink channels split into halves: a `Sender` sends per packet, a `Receiver` takes up to
/// 64 per `recv_batch`; neither takes a lock.
fn vmlink_channel_split(g: &mut Group<'_>, name: &'static str) {
    let (a, b) =
        in_process_channel_pair(RING, Config::polling(crate::rtt::SPIN)).expect("channel pair");
    let (mut tx, _a_rx) = a.split();
    let (_b_tx, mut rx) = b.split();
    rx.mask_interrupts();
    let peer = channel_consumer("split-consumer", move |each| {
        rx.recv_batch(64, Wait::Now, |p| each(p)).expect("receive")
    });
    let mut seq = 0u64;
    bench_pair(
        g,
        name,
        peer,
        move |n| {
            let end = seq + n;
            send_each(&mut seq, end, |m| tx.send(m, Wait::Now));
            0
        },
        consumer_saw_all(name),
    );
}

/// rtrb with `[u8; 64]` items, one `push` and one `pop` per payload.
fn rtrb_push_pop(g: &mut Group<'_>) {
    let (mut tx, mut rx) = rtrb::RingBuffer::<Msg>::new(ITEMS);
    let peer = {
        let mut check = Check::new(8);
        Peer::spawn("rtrb-consumer", move |n| {
            let mut b = Backoff::default();
            let mut got = 0;
            while got < n {
                match rx.pop() {
                    Ok(m) => {
                        check.packet(&m);
                        got += 1;
                    }
                    Err(_) => b.snooze(),
                }
            }
            check.round()
        })
    };
    let mut seq = 0u64;
    bench_pair(
        g,
        "rtrb/push_pop",
        peer,
        move |n| {
            let mut b = Backoff::default();
            for _ in 0..n {
                while tx.push(msg(seq)).is_err() {
                    b.snooze();
                }
                seq += 1;
            }
            0
        },
        consumer_saw_all("rtrb/push_pop"),
    );
}

/// rtrb's chunk API: the producer writes up to 32 payloads in place per chunk, the
/// consumer reads up to 32 in place per chunk.
fn rtrb_chunks(g: &mut Group<'_>) {
    let (mut tx, mut rx) = rtrb::RingBuffer::<Msg>::new(ITEMS);
    let peer = {
        let mut check = Check::new(8);
        Peer::spawn("rtrb-chunk-consumer", move |n| {
            let mut b = Backoff::default();
            let mut got = 0;
            while got < n {
                let k = rx.slots().min(BATCH as usize);
                if k == 0 {
                    b.snooze();
                    continue;
                }
                let chunk = rx.read_chunk(k).expect("k slots are there");
                let (first, second) = chunk.as_slices();
                for m in first.iter().chain(second) {
                    check.packet(m);
                }
                chunk.commit_all();
                got += k as u64;
            }
            check.round()
        })
    };
    let mut seq = 0u64;
    bench_pair(
        g,
        "rtrb/chunks_32",
        peer,
        move |n| {
            let end = seq + n;
            let mut b = Backoff::default();
            while seq < end {
                let k = tx.slots().min(BATCH as usize).min((end - seq) as usize);
                if k == 0 {
                    b.snooze();
                    continue;
                }
                let chunk = tx.write_chunk_uninit(k).expect("k slots are free");
                let written = chunk.fill_from_iter((seq..).map(msg));
                seq += written as u64;
            }
            0
        },
        consumer_saw_all("rtrb/chunks_32"),
    );
}

/// crossbeam's bounded `ArrayQueue<[u8; 64]>`, spinning on both sides.
fn crossbeam_array_queue(g: &mut Group<'_>) {
    let q = Arc::new(ArrayQueue::<Msg>::new(ITEMS));
    let peer = {
        let q = Arc::clone(&q);
        let mut check = Check::new(8);
        Peer::spawn("arrayqueue-consumer", move |n| {
            let mut b = Backoff::default();
            let mut got = 0;
            while got < n {
                match q.pop() {
                    Some(m) => {
                        check.packet(&m);
                        got += 1;
                    }
                    None => b.snooze(),
                }
            }
            check.round()
        })
    };
    let mut seq = 0u64;
    bench_pair(
        g,
        "crossbeam/array_queue",
        peer,
        move |n| {
            let mut b = Backoff::default();
            for _ in 0..n {
                while q.push(msg(seq)).is_err() {
                    b.snooze();
                }
                seq += 1;
            }
            0
        },
        consumer_saw_all("crossbeam/array_queue"),
    );
}

/// std's bounded `sync_channel`, blocking on both sides.
fn std_sync_channel(g: &mut Group<'_>) {
    let (tx, rx) = mpsc::sync_channel::<Msg>(ITEMS);
    let peer = {
        let mut check = Check::new(8);
        Peer::spawn("sync-channel-consumer", move |n| {
            for _ in 0..n {
                check.packet(&rx.recv().expect("payload"));
            }
            check.round()
        })
    };
    let mut seq = 0u64;
    bench_pair(
        g,
        "std/sync_channel",
        peer,
        move |n| {
            for _ in 0..n {
                tx.send(msg(seq)).expect("consumer alive");
                seq += 1;
            }
            0
        },
        consumer_saw_all("std/sync_channel"),
    );
}

/// A Unix stream socket: one 64-byte `write` per payload, one 64-byte read per payload.
fn unix_socket(g: &mut Group<'_>) {
    let (mut tx, mut rx) = UnixStream::pair().expect("socketpair");
    let peer = {
        let mut check = Check::new(8);
        let mut buf = [0u8; MSG];
        Peer::spawn("socket-consumer", move |n| {
            for _ in 0..n {
                rx.read_exact(&mut buf).expect("payload");
                check.packet(&buf);
            }
            check.round()
        })
    };
    let mut seq = 0u64;
    bench_pair(
        g,
        "unix/socket",
        peer,
        move |n| {
            for _ in 0..n {
                tx.write_all(&msg(seq)).expect("consumer alive");
                seq += 1;
            }
            0
        },
        consumer_saw_all("unix/socket"),
    );
}
