//! The conformance suite every transport runs on its own connected pair.
//!
//! A transport implements [`PairFactory`]: make two connected channel ends, say how to
//! corrupt the ring from one end to the other, and how to make one end's peer go away.
//! [`run_all`] then checks the whole channel behaviour: packets of every size both ways,
//! requests and completions with many calls in flight, unsolicited packets kept while a
//! call waits, late and unknown completions, GPA-direct and transfer-page packets,
//! zero-copy sends and receives, batches that signal at most once, flow control, deadlines,
//! polling mode, a peer that closes, and a corrupt ring. Each check panics with a message
//! naming what broke.

use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};
use std::vec::Vec;

use vmlink_ring::protocol::{FLAG_COMPLETION_REQUESTED, TransferPageHeader, TransferPageRange};
use vmlink_ring::{OutgoingPacket, PacketMeta, RingMem};
use zerocopy::IntoBytes;

use crate::channel::{Channel, ChannelState, Config};
use crate::doorbell::Doorbell;
use crate::error::{ChannelError, FailureCause, ProtocolError};
use crate::packet::{GpaRange, PacketError, parse_transfer_page_header};
use crate::{MAX_TRANSACTIONS, PacketType};

/// Makes connected channel pairs for the suite.
pub trait PairFactory {
    /// The ring memory of one end.
    type Mem: RingMem + Send + Sync + 'static;
    /// The doorbell of one end.
    type Bell: Doorbell + Send + Sync + 'static;

    /// Two connected ends, each ring with `ring_data_len` bytes of data; `a` configured
    /// with `config_a`, `b` with `config_b`.
    fn pair_with(
        &self,
        ring_data_len: usize,
        config_a: Config,
        config_b: Config,
    ) -> Pair<Self::Mem, Self::Bell>;

    /// Two connected ends with the same configuration.
    fn pair(&self, ring_data_len: usize, config: Config) -> Pair<Self::Mem, Self::Bell> {
        self.pair_with(ring_data_len, config, config)
    }
}

/// Two connected channel ends, and ways to misbehave on the second one's behalf.
pub struct Pair<M: RingMem, D: Doorbell> {
    /// The first end.
    pub a: Channel<M, D>,
    /// The second end.
    pub b: Channel<M, D>,
    /// Writes an invalid write index into the ring `b` sends on (so `a` reads a corrupt
    /// ring), as a hostile `b` would.
    pub corrupt_b_to_a: Box<dyn Fn() + Send>,
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn soon() -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(10))
}

/// Runs every check.
pub fn run_all<F: PairFactory + Sync>(f: &F) {
    in_band_both_ways(f);
    every_payload_size(f);
    calls_in_flight(f);
    unsolicited_packets_survive_a_call(f);
    late_completion_is_discarded_and_counted(f);
    unknown_completion_fails_the_channel(f);
    transactions_exhaust_cleanly(f);
    gpa_direct_packets(f);
    transfer_page_packets(f);
    zero_copy_send_and_receive(f);
    batches_signal_at_most_once(f);
    flow_control_and_deadlines(f);
    polling_mode(f);
    peer_close_drains_then_closes(f);
    corrupt_ring_fails_fast(f);
    counters_add_up(f);
}

/// In-band packets both ways, blocking receive.
pub fn in_band_both_ways<F: PairFactory>(f: &F) {
    let p = f.pair(4 * 4096, Config::default());
    p.a.send(b"from a", soon()).expect("a sends");
    p.b.send(b"from b", soon()).expect("b sends");
    let mut buf = [0u8; 64];
    let r = p.b.recv(&mut buf, soon()).expect("b receives");
    assert_eq!(r.packet_type, PacketType::InBand);
    assert!(!r.completion_requested);
    assert_eq!(&r.payload(&buf)[..6], b"from a");
    assert_eq!(r.payload_len, 8, "payloads are padded to 8 bytes");
    let r = p.a.recv(&mut buf, soon()).expect("a receives");
    assert_eq!(&r.payload(&buf)[..6], b"from b");
    assert_eq!(p.a.try_recv(&mut buf).expect("nothing more"), None);
}

/// Payloads from 0 bytes to the largest the ring carries arrive intact, with a receiver
/// blocking on the other thread.
pub fn every_payload_size<F: PairFactory>(f: &F) {
    let p = f.pair(4096, Config::default());
    let max_payload = p.a.max_packet_len() - 16;
    let sizes: Vec<usize> = (0..=40)
        .chain([63, 64, 65, 1000, 2048, max_payload - 1, max_payload])
        .collect();
    let n = sizes.len();
    let Pair { a, b, .. } = p;
    thread::scope(|s| {
        s.spawn(|| {
            for (i, &len) in sizes.iter().enumerate() {
                a.send(&pattern(i as u64, len), soon()).expect("send");
            }
        });
        let mut buf = vec![0u8; 4096];
        for (i, &len) in sizes.iter().enumerate().take(n) {
            let r = b.recv(&mut buf, soon()).expect("recv");
            assert_eq!(r.payload_len, len.div_ceil(8) * 8, "packet {i}");
            assert_eq!(
                &r.payload(&buf)[..len],
                &pattern(i as u64, len)[..],
                "packet {i} bytes"
            );
            assert!(
                r.payload(&buf)[len..].iter().all(|b| *b == 0),
                "packet {i} padding"
            );
        }
    });
    let too_big = vec![0u8; max_payload + 1];
    assert!(
        matches!(a.try_send(&too_big), Err(ChannelError::TooLarge { .. })),
        "a packet larger than the ring can hold is rejected at once"
    );
    assert!(matches!(
        a.send(&too_big, None),
        Err(ChannelError::TooLarge { .. })
    ));
}

/// Serves requests on `server` until it closes: completes each with its payload reversed.
fn serve<M: RingMem, D: Doorbell>(server: &Channel<M, D>, stop: &AtomicBool) {
    let mut buf = vec![0u8; 4096];
    while !stop.load(Ordering::Acquire) {
        match server.recv(&mut buf, Some(Instant::now() + Duration::from_millis(50))) {
            Ok(r) if r.completion_requested => {
                let mut answer = r.payload(&buf).to_vec();
                answer.reverse();
                server
                    .complete(r.transaction_id, &answer, soon())
                    .expect("complete");
            }
            Ok(_) => {}
            Err(ChannelError::TimedOut) => {}
            Err(ChannelError::Closed) => return,
            Err(e) => panic!("server: {e}"),
        }
    }
}

/// Many calls from many threads at once, each getting its own completion.
pub fn calls_in_flight<F: PairFactory>(f: &F) {
    let p = f.pair(8 * 4096, Config::default());
    let stop = AtomicBool::new(false);
    let (a, b) = (&p.a, &p.b);
    thread::scope(|s| {
        s.spawn(|| serve(b, &stop));
        let callers: Vec<_> = (0..8u64)
            .map(|t| {
                s.spawn(move || {
                    for i in 0..200u64 {
                        let request = pattern(t * 1000 + i, 8 + (i as usize % 100) * 8);
                        let mut response = vec![0u8; 1024];
                        let len = a.call(&request, &mut response, soon()).expect("call");
                        let mut expect = request.clone();
                        expect.reverse();
                        assert_eq!(&response[..len], &expect[..], "caller {t} call {i}");
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().expect("caller");
        }
        stop.store(true, Ordering::Release);
    });
    assert_eq!(a.transactions_in_flight(), 0, "every id was freed");
}

/// Packets the peer sends while a call waits reach the receiver afterwards, in order.
pub fn unsolicited_packets_survive_a_call<F: PairFactory>(f: &F) {
    let p = f.pair(8 * 4096, Config::default());
    let (a, b) = (&p.a, &p.b);
    thread::scope(|s| {
        s.spawn(|| {
            let mut buf = [0u8; 64];
            let r = b.recv(&mut buf, soon()).expect("request");
            for i in 0..10u8 {
                b.send(&[i; 8], soon()).expect("unsolicited");
            }
            b.complete(r.transaction_id, b"done", soon())
                .expect("complete");
        });
        let mut response = [0u8; 8];
        assert_eq!(a.call(b"work", &mut response, soon()).expect("call"), 8);
        assert_eq!(&response[..4], b"done");
    });
    let mut buf = [0u8; 64];
    for i in 0..10u8 {
        let r = a.recv(&mut buf, soon()).expect("queued packet");
        assert_eq!(
            r.payload(&buf),
            &[i; 8],
            "unsolicited packet {i} kept in order"
        );
    }
    assert_eq!(a.try_recv(&mut buf).expect("empty"), None);
}

/// A call that times out keeps its id until the late completion arrives, which is
/// discarded and counted, not an error.
pub fn late_completion_is_discarded_and_counted<F: PairFactory>(f: &F) {
    let p = f.pair(4 * 4096, Config::default());
    let mut response = [0u8; 64];
    let t0 = Instant::now();
    let r = p.a.call(
        b"slow",
        &mut response,
        Some(Instant::now() + Duration::from_millis(50)),
    );
    assert_eq!(r, Err(ChannelError::TimedOut));
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the deadline is honoured"
    );
    assert_eq!(p.a.transactions_in_flight(), 1, "the id stays reserved");
    let mut buf = [0u8; 64];
    let req = p.b.recv(&mut buf, soon()).expect("the request arrived");
    p.b.complete(req.transaction_id, b"too late", soon())
        .expect("complete");
    p.b.send(b"after", soon()).expect("send");
    let r =
        p.a.recv(&mut buf, soon())
            .expect("the next packet, not the late completion");
    assert_eq!(&r.payload(&buf)[..5], b"after");
    assert_eq!(p.a.counters().late_completions, 1);
    assert_eq!(
        p.a.transactions_in_flight(),
        0,
        "freed by the late completion"
    );
    assert_eq!(p.a.state(), ChannelState::Open);
}

/// A completion for an id not in flight is a protocol error: the channel fails with the
/// cause and every later call fails fast with it.
pub fn unknown_completion_fails_the_channel<F: PairFactory>(f: &F) {
    let p = f.pair(4 * 4096, Config::default());
    p.b.complete(0x1234_5678, b"who?", soon())
        .expect("peer sends a bogus completion");
    let mut buf = [0u8; 64];
    let expected =
        ChannelError::Failed(FailureCause::Protocol(ProtocolError::UnknownTransaction {
            transaction_id: 0x1234_5678,
        }));
    assert_eq!(p.a.recv(&mut buf, soon()), Err(expected));
    assert_eq!(p.a.try_recv(&mut buf), Err(expected), "sticky");
    assert_eq!(p.a.try_send(b"x"), Err(expected), "sends fail fast too");
    assert_eq!(p.a.call(b"x", &mut buf, soon()), Err(expected));
    assert!(matches!(p.a.state(), ChannelState::Failed(_)));
}

/// Transaction ids run out with a clear error and come back when completions arrive.
pub fn transactions_exhaust_cleanly<F: PairFactory>(f: &F) {
    let p = f.pair(16 * 4096, Config::default());
    let ids: Vec<u64> = (0..MAX_TRANSACTIONS)
        .map(|_| p.a.try_start_request(b"r").expect("start"))
        .collect();
    assert_eq!(
        p.a.try_start_request(b"r"),
        Err(ChannelError::TransactionsExhausted {
            capacity: MAX_TRANSACTIONS
        })
    );
    let mut buf = [0u8; 64];
    let mut seen = Vec::new();
    while let Some(r) = p.b.try_recv(&mut buf).expect("recv") {
        assert!(r.completion_requested);
        seen.push(r.transaction_id);
    }
    assert_eq!(seen, ids);
    // Complete them out of order; they come back as completion packets.
    for id in ids.iter().rev() {
        p.b.try_complete(*id, b"ok").expect("complete");
    }
    for id in ids.iter().rev() {
        let r = p.a.try_recv(&mut buf).expect("recv").expect("a completion");
        assert_eq!(
            (r.packet_type, r.transaction_id),
            (PacketType::Completion, *id)
        );
    }
    assert_eq!(p.a.transactions_in_flight(), 0);
    p.a.try_start_request(b"again").expect("ids are free again");
}

/// GPA-direct packets: ranges validated on both sides, parsed on receive.
pub fn gpa_direct_packets<F: PairFactory>(f: &F) {
    let p = f.pair(4 * 4096, Config::default().with_gpa_page_limit(64));
    let pages = [3u64, 9];
    let ranges = [GpaRange {
        byte_offset: 100,
        byte_count: 5000,
        pages: &pages,
    }];
    let meta = PacketMeta {
        packet_type: PacketType::GpaDirect,
        flags: FLAG_COMPLETION_REQUESTED,
        transaction_id: 77,
    };
    p.a.send_gpa_direct(&ranges, b"bulk", meta, soon())
        .expect("send");
    let mut guard = p.b.recv_in_place(soon()).expect("recv");
    let m = guard.meta();
    assert_eq!(
        (m.packet_type, m.transaction_id, m.header_len),
        (PacketType::GpaDirect, 77, 32)
    );
    let mut scratch = [0u8; 64];
    let got: Vec<_> = guard
        .gpa_ranges(&mut scratch)
        .expect("valid ranges")
        .collect();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].byte_offset, got[0].byte_count), (100, 5000));
    assert_eq!(got[0].pages().collect::<Vec<_>>(), pages);
    let mut body = [0u8; 4];
    guard.read_payload(0, &mut body).expect("payload");
    assert_eq!(&body, b"bulk");
    drop(guard);
    // The sender refuses pages past its limit.
    let far = [64u64];
    let bad = [GpaRange {
        byte_offset: 0,
        byte_count: 1,
        pages: &far,
    }];
    assert_eq!(
        p.a.try_send_gpa_direct(&bad, b"", meta),
        Err(ChannelError::InvalidPacket(PacketError::PageOutOfRange {
            index: 0,
            page: 64,
            limit: 64
        }))
    );
    // A receiver with a tighter limit than the sender treats such a packet as a protocol
    // violation.
    let q = f.pair_with(
        4 * 4096,
        Config::default(),
        Config::default().with_gpa_page_limit(4),
    );
    q.a.send_gpa_direct(&ranges, b"bulk", meta, soon())
        .expect("send");
    let mut buf = [0u8; 128];
    assert_eq!(
        q.b.recv(&mut buf, soon()),
        Err(ChannelError::Failed(FailureCause::Protocol(
            ProtocolError::Packet(PacketError::PageOutOfRange {
                index: 0,
                page: 9,
                limit: 4
            })
        )))
    );
}

/// Transfer-page packets are parsed on receive.
pub fn transfer_page_packets<F: PairFactory>(f: &F) {
    let p = f.pair(4 * 4096, Config::default());
    let mut header = Vec::new();
    header.extend_from_slice(
        TransferPageHeader {
            pageset_id: 2,
            sender_owns_set: 1,
            reserved: 0,
            range_count: 2,
        }
        .as_bytes(),
    );
    header.extend_from_slice(
        TransferPageRange {
            byte_count: 1500,
            byte_offset: 0,
        }
        .as_bytes(),
    );
    header.extend_from_slice(
        TransferPageRange {
            byte_count: 60,
            byte_offset: 2048,
        }
        .as_bytes(),
    );
    let packet = OutgoingPacket {
        meta: PacketMeta {
            packet_type: PacketType::TransferPages,
            flags: 0,
            transaction_id: 5,
        },
        header: &header,
        payload: &[],
    };
    p.a.send_packet(&packet, soon()).expect("send");
    let mut buf = [0u8; 64];
    let r = p.b.recv(&mut buf, soon()).expect("recv");
    assert_eq!(r.packet_type, PacketType::TransferPages);
    let t = parse_transfer_page_header(r.header(&buf)).expect("valid");
    assert_eq!(t.pageset_id, 2);
    let ranges: Vec<_> = t.ranges().map(|r| (r.byte_offset, r.byte_count)).collect();
    assert_eq!(ranges, [(0, 1500), (2048, 60)]);
    // A malformed one (range count past the header) fails the receiver.
    let mut bad = header.clone();
    bad[4..8].copy_from_slice(&9u32.to_le_bytes());
    p.a.send_packet(&packet_with(&packet, &bad), soon())
        .expect("send");
    assert!(matches!(
        p.b.recv(&mut buf, soon()),
        Err(ChannelError::Failed(FailureCause::Protocol(
            ProtocolError::Packet(PacketError::RangesMismatchHeader { .. })
        )))
    ));
}

fn packet_with<'a>(p: &OutgoingPacket<'a>, header: &'a [u8]) -> OutgoingPacket<'a> {
    OutgoingPacket { header, ..*p }
}

/// Zero-copy: a packet written in place, read in place, consumed when the guard drops.
pub fn zero_copy_send_and_receive<F: PairFactory>(f: &F) {
    let p = f.pair(16 * 4096, Config::default());
    let big = pattern(9, 20_000);
    p.a.send_in_place(PacketMeta::in_band(), 0, big.len(), soon(), |slot| {
        slot.write_payload(10_000, &big[10_000..])
            .expect("second half");
        slot.write_payload(0, &big[..10_000]).expect("first half");
    })
    .expect("send in place");
    {
        let mut g = p.b.recv_in_place(soon()).expect("recv in place");
        assert_eq!(g.meta().payload_len, 20_000);
        let mut tail = [0u8; 100];
        g.read_payload(19_900, &mut tail)
            .expect("read the end in place");
        assert_eq!(&tail[..], &big[19_900..]);
        assert!(matches!(
            g.read_payload(19_950, &mut tail),
            Err(ChannelError::OutOfBounds { .. })
        ));
    }
    let mut buf = [0u8; 8];
    assert_eq!(p.b.try_recv(&mut buf).expect("consumed on drop"), None);
    // Not consumed until dropped: the writer sees no space freed.
    p.a.try_send(b"x").expect("send");
    let g = p.b.try_recv_in_place().expect("recv").expect("a packet");
    g.commit().expect("commit");
    assert_eq!(p.b.try_recv(&mut buf).expect("recv"), None);
}

/// A batch publishes many packets with one commit and at most one signal; a receive
/// batch takes them under one commit.
pub fn batches_signal_at_most_once<F: PairFactory>(f: &F) {
    let p = f.pair(16 * 4096, Config::default());
    let before = p.a.counters().signals_sent;
    let mut batch = p.a.batch().expect("batch");
    for i in 0..50u8 {
        batch.push_in_band(&[i; 24]).expect("push");
    }
    assert_eq!(batch.len(), 50);
    batch.commit().expect("commit");
    assert!(
        p.a.counters().signals_sent - before <= 1,
        "one batch, at most one signal"
    );
    let mut got = Vec::new();
    let n =
        p.b.recv_batch(100, soon(), |pkt| {
            let mut x = [0u8; 24];
            pkt.read_payload(0, &mut x).expect("read");
            got.push(x[0]);
        })
        .expect("batch receive");
    assert_eq!(n, 50);
    assert_eq!(got, (0..50).collect::<Vec<u8>>());
    // A dropped batch publishes nothing.
    let mut batch = p.a.batch().expect("batch");
    batch.push_in_band(b"discarded").expect("push");
    drop(batch);
    let mut buf = [0u8; 64];
    assert_eq!(p.b.try_recv(&mut buf).expect("recv"), None);
}

/// A full ring: `try_send` says so, `send` waits for space (or its deadline), and a
/// receive on the other side frees it.
pub fn flow_control_and_deadlines<F: PairFactory>(f: &F) {
    let p = f.pair(4096, Config::default());
    let chunk = vec![7u8; 1000];
    let mut sent = 0;
    while p.a.try_send(&chunk).is_ok() {
        sent += 1;
    }
    assert!(sent >= 3);
    assert_eq!(p.a.try_send(&chunk), Err(ChannelError::Full));
    let t0 = Instant::now();
    assert_eq!(
        p.a.send(&chunk, Some(Instant::now() + Duration::from_millis(50))),
        Err(ChannelError::TimedOut)
    );
    assert!(t0.elapsed() >= Duration::from_millis(45));
    let waits_before = p.a.counters().send_waits;
    let (a, b) = (&p.a, &p.b);
    let go = Barrier::new(2);
    thread::scope(|s| {
        s.spawn(|| {
            go.wait();
            thread::sleep(Duration::from_millis(30));
            let mut buf = vec![0u8; 2048];
            for _ in 0..sent {
                b.recv(&mut buf, soon()).expect("drain");
            }
        });
        go.wait();
        a.send(&chunk, soon())
            .expect("a blocked send completes once space is freed");
    });
    assert!(p.a.counters().send_waits > waits_before, "the send waited");
    let mut buf = vec![0u8; 2048];
    assert!(
        p.b.recv(&mut buf, soon()).is_ok(),
        "the waiting packet arrived"
    );
    let t0 = Instant::now();
    assert_eq!(
        p.b.recv(&mut buf, Some(Instant::now() + Duration::from_millis(30))),
        Err(ChannelError::TimedOut)
    );
    assert!(t0.elapsed() >= Duration::from_millis(25));
}

/// Polling mode receives everything and loses no wake-up when the spin runs out.
pub fn polling_mode<F: PairFactory>(f: &F) {
    let p = f.pair(4096, Config::polling(200));
    let (a, b) = (&p.a, &p.b);
    thread::scope(|s| {
        s.spawn(|| {
            for i in 0..2000u64 {
                if i % 500 == 0 {
                    // Long pauses make the receiver run out of spins and sleep.
                    thread::sleep(Duration::from_millis(5));
                }
                a.send(&i.to_le_bytes(), soon()).expect("send");
            }
        });
        let mut buf = [0u8; 64];
        for i in 0..2000u64 {
            let r = b.recv(&mut buf, soon()).expect("recv");
            assert_eq!(r.payload(&buf), &i.to_le_bytes());
        }
    });
}

/// A peer that leaves: what it committed is still received, then every call says
/// `Closed` (including a receive blocked when it left).
pub fn peer_close_drains_then_closes<F: PairFactory>(f: &F) {
    let p = f.pair(4 * 4096, Config::default());
    let Pair { a, b, .. } = p;
    for i in 0..5u8 {
        b.send(&[i; 16], soon()).expect("send");
    }
    drop(b);
    let mut buf = [0u8; 64];
    for i in 0..5u8 {
        let r = a
            .recv(&mut buf, soon())
            .expect("committed packets survive the close");
        assert_eq!(r.payload(&buf), &[i; 16]);
    }
    assert_eq!(a.recv(&mut buf, soon()), Err(ChannelError::Closed));
    assert_eq!(a.try_recv(&mut buf), Err(ChannelError::Closed));
    assert_eq!(a.send(b"x", soon()), Err(ChannelError::Closed));
    assert_eq!(a.state(), ChannelState::PeerClosed);

    // A receive blocked when the peer leaves wakes up with `Closed`.
    let p = f.pair(4 * 4096, Config::default());
    let Pair { a, b, .. } = p;
    let t0 = Instant::now();
    thread::scope(|s| {
        s.spawn(move || {
            thread::sleep(Duration::from_millis(50));
            drop(b);
        });
        let mut buf = [0u8; 64];
        assert_eq!(a.recv(&mut buf, None), Err(ChannelError::Closed));
    });
    assert!(t0.elapsed() < Duration::from_secs(5));
}

/// A corrupt ring fails the channel with the cause; every later call fails fast.
pub fn corrupt_ring_fails_fast<F: PairFactory>(f: &F) {
    let p = f.pair(4 * 4096, Config::default());
    p.b.send(b"fine", soon()).expect("send");
    (p.corrupt_b_to_a)();
    let mut buf = [0u8; 64];
    let e = p.a.recv(&mut buf, soon()).expect_err("a corrupt ring");
    let ChannelError::Failed(FailureCause::Ring(_)) = e else {
        panic!("expected a ring failure, got {e:?}");
    };
    let t0 = Instant::now();
    assert_eq!(p.a.recv(&mut buf, None), Err(e), "fails fast, never blocks");
    assert_eq!(p.a.try_send(b"x"), Err(e));
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert_eq!(
        p.a.state(),
        ChannelState::Failed(match e {
            ChannelError::Failed(c) => c,
            _ => unreachable!(),
        })
    );
}

/// Packets and bytes are counted the same way on both sides.
pub fn counters_add_up<F: PairFactory>(f: &F) {
    let p = f.pair(4 * 4096, Config::default());
    for len in [0usize, 1, 8, 100] {
        p.a.send(&vec![1u8; len], soon()).expect("send");
    }
    let mut buf = [0u8; 128];
    for _ in 0..4 {
        p.b.recv(&mut buf, soon()).expect("recv");
    }
    let (ca, cb) = (p.a.counters(), p.b.counters());
    assert_eq!(ca.packets_sent, 4);
    assert_eq!(cb.packets_received, 4);
    assert_eq!(ca.bytes_sent, cb.bytes_received);
    assert_eq!(ca.bytes_sent, (16 + 16 + 8 + 16 + 8 + 16 + 104) as u64);
    assert!(ca.signals_sent >= 1);
}
