//! `rtt_64`: the round trip of a 64-byte request and its 64-byte response between two
//! threads. The measuring thread sends and waits; the peer thread echoes. The floor is a
//! raw two-cache-line atomic ping-pong.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, Throughput};
use crossbeam_utils::CachePadded;
use vmlink_channel::fd::EventFd;
use vmlink_channel::{
    Channel, Config, DEFAULT_SPIN_BEFORE_SLEEP, Doorbell, Endpoint, EventFdDoorbell, PacketRx,
    PacketTx, in_process_channel_pair,
};
use vmlink_ring::{HeapMem, OutgoingPacket, Reader, Writer};
use vmlink_secure::Cipher;

use vmlink_hvsock::link::{StreamConfig, stream_endpoint};

use crate::cross_process;
use crate::harness::{
    Backoff, Check, Group, MSG, Msg, Peer, bench_pair, msg, spin_until, tri, verify,
};

/// Data bytes of each ring (both directions).
pub const RING: usize = 16 * 4096;
/// Polling mode's spin budget: long enough that an echoing peer always answers inside it.
pub const SPIN: u32 = 10_000;

/// Registers the group.
pub fn rtt_64(c: &mut Criterion) {
    let mut g = c.benchmark_group("rtt_64");
    // One element is one round trip.
    g.throughput(Throughput::Elements(1));
    floor_atomic(&mut g, "floor/atomic_pingpong");
    vmlink_ring_polling(&mut g);
    let (a, b) = in_process_channel_pair(RING, Config::polling(SPIN)).expect("channel pair");
    vmlink_channel(&mut g, "vmlink/channel_polling_call", a, b, true);
    let (a, b) = in_process_channel_pair(RING, Config::polling(SPIN)).expect("channel pair");
    vmlink_channel(&mut g, "vmlink/channel_polling_send_recv", a, b, false);
    // Blocking calls that sleep at once: the wake-up path itself, against the raw eventfd
    // ping-pong below. With the default spin before sleeping, an answer that comes within
    // the spin never sleeps (the `_spin` case).
    let sleeping = Config::default().sleep_at_once();
    let (a, b) = in_process_channel_pair(RING, sleeping).expect("channel pair");
    vmlink_channel(&mut g, "vmlink/channel_blocking_call", a, b, true);
    let (a, b) = eventfd_channel_pair(sleeping);
    vmlink_channel(&mut g, "vmlink/channel_blocking_eventfd_call", a, b, true);
    let spinning = Config::default().with_spin_before_sleep(DEFAULT_SPIN_BEFORE_SLEEP);
    let (a, b) = eventfd_channel_pair(spinning);
    vmlink_channel(
        &mut g,
        "vmlink/channel_blocking_eventfd_call_spin",
        a,
        b,
        true,
    );
    // The secure channel over the same in-process rings (the plain row is
    // `vmlink/channel_polling_call` above).
    for (cipher, name) in [
        (Cipher::ChaChaPoly, "vmlink/secure_chacha_polling_call"),
        (Cipher::AesGcm, "vmlink/secure_aes_polling_call"),
    ] {
        let (a, b) = crate::secure::pair(RING, Config::polling(SPIN), cipher);
        vmlink_channel(&mut g, name, a, b, true);
    }
    rtrb_pair(&mut g);
    #[cfg(feature = "iceoryx2")]
    crate::iceoryx::request_response(&mut g);
    eventfd_pingpong(&mut g);
    socketpair(&mut g);
    // The stream link on the same kind of socketpair: a blocking call that sleeps at once
    // (against `unix/socketpair`, which blocks in `read`) and one with the default spin.
    for (name, config) in [
        ("vmlink/stream_link_blocking_call", sleeping),
        ("vmlink/stream_link_blocking_call_spin", spinning),
    ] {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let link = StreamConfig::default();
        let a = stream_endpoint(a, link, config).expect("stream link");
        let b = stream_endpoint(b, link, config).expect("stream link");
        vmlink_channel(&mut g, name, a, b, true);
    }
    pipe_pair(&mut g);
    // The ivshmem transport's host channel against a peer playing QEMU and its guest.
    crate::ivshmem::call(&mut g, "vmlink/ivshmem_blocking_call", sleeping);
    // The same round trips between two processes.
    cross_process::shm_call(&mut g, "vmlink/shm_polling_call", true);
    cross_process::shm_call(&mut g, "vmlink/shm_blocking_call", false);
    cross_process::stream_rtt(&mut g, "unix/socketpair_two_processes", true);
    cross_process::stream_rtt(&mut g, "unix/pipe_pair_two_processes", false);
    // The floor again at the end: on a virtual machine the two vCPUs may move between
    // host cores during the group, which moves every figure; a second floor shows it.
    floor_atomic(&mut g, "floor/atomic_pingpong_at_end");
    g.finish();
}

/// Checks that both sides saw every message of the round, in order.
fn both(name: &'static str) -> impl Fn(u64, u64, crate::harness::Round) {
    move |first, n, r| {
        verify(name, r.mine, first, n, MSG / 8);
        verify(name, r.theirs, first, n, MSG / 8);
    }
}

/// Floor: two cache-padded `AtomicU64`s, each side spinning on the other's.
fn floor_atomic(g: &mut Group<'_>, name: &str) {
    let ping = Arc::new(CachePadded::new(AtomicU64::new(0)));
    let pong = Arc::new(CachePadded::new(AtomicU64::new(0)));
    let peer = {
        let (ping, pong) = (Arc::clone(&ping), Arc::clone(&pong));
        let mut seq = 0u64;
        Peer::spawn("floor-echo", move |n| {
            let mut sum = 0u64;
            for _ in 0..n {
                seq += 1;
                spin_until(|| ping.load(Ordering::Acquire) == seq);
                sum = sum.wrapping_add(seq);
                pong.store(seq, Ordering::Release);
            }
            sum
        })
    };
    let mut seq = 0u64;
    bench_pair(
        g,
        name,
        peer,
        move |n| {
            let mut sum = 0u64;
            for _ in 0..n {
                seq += 1;
                ping.store(seq, Ordering::Release);
                spin_until(|| pong.load(Ordering::Acquire) == seq);
                sum = sum.wrapping_add(seq);
            }
            sum
        },
        |first, n, r| {
            // Values first + 1 ..= first + n.
            assert_eq!(r.mine, tri(first + 1, n), "floor: lost a pong");
            assert_eq!(r.theirs, tri(first + 1, n), "floor: lost a ping");
        },
    );
}

/// Spins until `reader` has a packet, copies its payload into `buf`, consumes and commits.
pub fn take(reader: &mut Reader<Arc<HeapMem>>, buf: &mut [u8]) {
    let mut b = Backoff::default();
    loop {
        if let Some(p) = reader.peek().expect("ring intact") {
            p.read_payload(0, buf).expect("payload");
            p.consume();
            break;
        }
        b.snooze();
    }
    // A masked-interrupt reader's commit never asks for a signal the writer awaits here.
    let _ = reader.commit();
}

/// vmlink's ring layer alone: two `HeapMem` rings, both readers polling with interrupts
/// masked, so no doorbell is involved.
fn vmlink_ring_polling(g: &mut Group<'_>) {
    let req = Arc::new(HeapMem::new(RING).expect("ring"));
    let resp = Arc::new(HeapMem::new(RING).expect("ring"));
    let peer = {
        let mut reader = Reader::new(Arc::clone(&req)).expect("reader");
        let mut writer = Writer::new(Arc::clone(&resp)).expect("writer");
        reader.mask_interrupts();
        let mut check = Check::new(8);
        let mut buf = [0u8; MSG];
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
    let mut writer = Writer::new(Arc::clone(&req)).expect("writer");
    let mut reader = Reader::new(resp).expect("reader");
    reader.mask_interrupts();
    let mut check = Check::new(8);
    let mut seq = 0u64;
    let mut buf = [0u8; MSG];
    bench_pair(
        g,
        "vmlink/ring_polling",
        peer,
        move |n| {
            for _ in 0..n {
                let m = msg(seq);
                seq += 1;
                let _ = writer
                    .write(&OutgoingPacket::in_band_slice(&m))
                    .expect("room for the request");
                take(&mut reader, &mut buf);
                check.packet(&buf);
            }
            check.round()
        },
        both("ring_polling"),
    );
}

/// Two channels over heap rings with eventfd doorbells (what two processes would use).
fn eventfd_channel_pair(
    config: Config,
) -> (
    Channel<Arc<HeapMem>, EventFdDoorbell>,
    Channel<Arc<HeapMem>, EventFdDoorbell>,
) {
    let a_to_b = Arc::new(HeapMem::new(RING).expect("ring"));
    let b_to_a = Arc::new(HeapMem::new(RING).expect("ring"));
    let (da, db) = EventFdDoorbell::pair().expect("eventfd pair");
    let a = Channel::new(Arc::clone(&a_to_b), Arc::clone(&b_to_a), da, config).expect("channel");
    let b = Channel::new(b_to_a, a_to_b, db, config).expect("channel");
    (a, b)
}

/// vmlink channels: `call` (request with a transaction id, completion back) or plain
/// `send`/`recv` both ways. The peer answers with `complete` or `send`.
pub fn vmlink_channel<T, R, D>(
    g: &mut Group<'_>,
    name: &'static str,
    host: Endpoint<T, R, D>,
    guest: Endpoint<T, R, D>,
    call: bool,
) where
    T: PacketTx + Send + 'static,
    R: PacketRx + Send + 'static,
    D: Doorbell + Send + Sync + 'static,
{
    let peer = {
        let mut check = Check::new(8);
        let mut buf = [0u8; MSG];
        Peer::spawn("channel-echo", move |n| {
            for _ in 0..n {
                let r = guest.recv(&mut buf, None).expect("request");
                check.packet(r.payload(&buf));
                if call {
                    guest.complete(r.transaction_id, &buf, None)
                } else {
                    guest.send(&buf, None)
                }
                .expect("response");
            }
            check.round()
        })
    };
    let mut check = Check::new(8);
    let mut seq = 0u64;
    let mut buf = [0u8; MSG];
    bench_pair(
        g,
        name,
        peer,
        move |n| {
            for _ in 0..n {
                let m = msg(seq);
                seq += 1;
                if call {
                    let len = host.call(&m, &mut buf, None).expect("call");
                    check.packet(&buf[..len]);
                } else {
                    host.send(&m, None).expect("send");
                    let r = host.recv(&mut buf, None).expect("recv");
                    check.packet(r.payload(&buf));
                }
            }
            check.round()
        },
        both(name),
    );
}

/// rtrb: one `[u8; 64]` ring each way, both sides spinning.
fn rtrb_pair(g: &mut Group<'_>) {
    let (mut req_tx, mut req_rx) = rtrb::RingBuffer::<Msg>::new(16);
    let (mut resp_tx, mut resp_rx) = rtrb::RingBuffer::<Msg>::new(16);
    let peer = {
        let mut check = Check::new(8);
        Peer::spawn("rtrb-echo", move |n| {
            for _ in 0..n {
                let mut b = Backoff::default();
                let m = loop {
                    match req_rx.pop() {
                        Ok(m) => break m,
                        Err(_) => b.snooze(),
                    }
                };
                check.packet(&m);
                resp_tx.push(m).expect("room for the response");
            }
            check.round()
        })
    };
    let mut check = Check::new(8);
    let mut seq = 0u64;
    bench_pair(
        g,
        "rtrb/pair",
        peer,
        move |n| {
            for _ in 0..n {
                req_tx.push(msg(seq)).expect("room for the request");
                seq += 1;
                let mut b = Backoff::default();
                let m = loop {
                    match resp_rx.pop() {
                        Ok(m) => break m,
                        Err(_) => b.snooze(),
                    }
                };
                check.packet(&m);
            }
            check.round()
        },
        both("rtrb"),
    );
}

/// Raw eventfd ping-pong, blocking reads: the floor for a sleeping round trip. Carries no
/// payload; each side counts the rings it read.
fn eventfd_pingpong(g: &mut Group<'_>) {
    let ping = Arc::new(EventFd::blocking().expect("eventfd"));
    let pong = Arc::new(EventFd::blocking().expect("eventfd"));
    let peer = {
        let (ping, pong) = (Arc::clone(&ping), Arc::clone(&pong));
        Peer::spawn("eventfd-echo", move |n| {
            let mut sum = 0u64;
            for _ in 0..n {
                sum += u64::from(ping.drain().expect("eventfd read"));
                pong.signal().expect("eventfd write");
            }
            sum
        })
    };
    bench_pair(
        g,
        "eventfd/pingpong_blocking",
        peer,
        move |n| {
            let mut sum = 0u64;
            for _ in 0..n {
                ping.signal().expect("eventfd write");
                sum += u64::from(pong.drain().expect("eventfd read"));
            }
            sum
        },
        |_, n, r| {
            assert_eq!(r.mine, n, "eventfd: lost a pong");
            assert_eq!(r.theirs, n, "eventfd: lost a ping");
        },
    );
}

/// Echoes 64-byte messages from `rx` to `tx`, checking them.
fn stream_echo<R: Read + Send + 'static, W: Write + Send + 'static>(
    name: &str,
    mut rx: R,
    mut tx: W,
) -> Peer {
    let mut check = Check::new(8);
    let mut buf = [0u8; MSG];
    Peer::spawn(name, move |n| {
        for _ in 0..n {
            rx.read_exact(&mut buf).expect("request");
            check.packet(&buf);
            tx.write_all(&buf).expect("response");
        }
        check.round()
    })
}

/// Sends 64-byte requests on `tx` and reads the responses from `rx`.
fn stream_client<R: Read, W: Write>(mut tx: W, mut rx: R) -> impl FnMut(u64) -> u64 {
    let mut check = Check::new(8);
    let mut seq = 0u64;
    let mut buf = [0u8; MSG];
    move |n| {
        for _ in 0..n {
            tx.write_all(&msg(seq)).expect("request");
            seq += 1;
            rx.read_exact(&mut buf).expect("response");
            check.packet(&buf);
        }
        check.round()
    }
}

/// A Unix stream socketpair, blocking.
fn socketpair(g: &mut Group<'_>) {
    let (mine, theirs) = UnixStream::pair().expect("socketpair");
    let theirs_w = theirs.try_clone().expect("dup");
    let mine_r = mine.try_clone().expect("dup");
    let peer = stream_echo("socket-echo", theirs, theirs_w);
    bench_pair(
        g,
        "unix/socketpair",
        peer,
        stream_client(mine, mine_r),
        both("socketpair"),
    );
}

/// Two pipes, one each way, blocking.
fn pipe_pair(g: &mut Group<'_>) {
    let (req_r, req_w) = std::io::pipe().expect("pipe");
    let (resp_r, resp_w) = std::io::pipe().expect("pipe");
    let peer = stream_echo("pipe-echo", req_r, resp_w);
    bench_pair(
        g,
        "unix/pipe_pair",
        peer,
        stream_client(req_w, resp_r),
        both("pipe"),
    );
}
