//! The checks themselves: side A and side B of each, run by [`super::run_all`].

use super::*;

// ---- the checks -----------------------------------------------------------------------

pub(super) fn in_band_a<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    ch.send(b"from a", soon()).expect("a sends");
    let mut buf = [0u8; 64];
    let r = ch.recv(&mut buf, soon()).expect("a receives");
    assert_eq!(r.packet_type, PacketType::InBand);
    assert!(!r.completion_requested);
    assert_eq!(r.payload_len, 8, "payloads are padded to 8 bytes");
    assert_eq!(&r.payload(&buf)[..6], b"from b");
    assert_eq!(
        ch.recv(&mut buf, Wait::Now).polled().expect("nothing more"),
        None
    );
}

pub(super) fn in_band_b<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let mut buf = [0u8; 64];
    let r = ch.recv(&mut buf, soon()).expect("b receives");
    assert_eq!(&r.payload(&buf)[..6], b"from a");
    assert!(r.payload(&buf)[6..].iter().all(|b| *b == 0), "zero padding");
    ch.send(b"from b", soon()).expect("b sends");
    until_closed(&ch);
}

pub(super) fn payload_sizes(max_payload: usize) -> Vec<usize> {
    (0..=40)
        .chain([63, 64, 65, 1000, 2048, max_payload - 1, max_payload])
        .collect()
}

/// Payloads from 0 bytes to the largest the ring carries arrive intact; a larger one is
/// refused at once.
pub(super) fn sizes_a<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let max_payload = ch.max_packet_len() - 16;
    for (i, len) in payload_sizes(max_payload).into_iter().enumerate() {
        ch.send(&pattern(i as u64, len), soon()).expect("send");
    }
    let too_big = std::vec![0u8; max_payload + 1];
    assert!(
        matches!(
            ch.send(&too_big, Wait::Now),
            Err(ChannelError::TooLarge { .. })
        ),
        "a packet larger than the ring can hold is rejected at once"
    );
    assert!(matches!(
        ch.send(&too_big, None),
        Err(ChannelError::TooLarge { .. })
    ));
    // Wait for B's word that everything arrived.
    let mut buf = [0u8; 8];
    ch.recv(&mut buf, soon()).expect("b's acknowledgement");
}

pub(super) fn sizes_b<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let max_payload = ch.max_packet_len() - 16;
    let mut buf = std::vec![0u8; PAGE];
    for (i, len) in payload_sizes(max_payload).into_iter().enumerate() {
        let r = ch.recv(&mut buf, soon()).expect("recv");
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
    ch.send(b"all in", soon()).expect("acknowledge");
    until_closed(&ch);
}

/// Many calls from many threads at once, each getting its own completion.
pub(super) fn calls_a<T: PacketTx + Send, R: PacketRx + Send, D: Doorbell + Send + Sync>(
    e: End<T, R, D>,
) {
    let ch = &e.channel;
    let (threads, calls) = if cfg!(miri) { (4, 3) } else { (8, 200) };
    thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for i in 0..calls {
                    let request = pattern(t * 1000 + i, 8 + (i as usize % 100) * 8);
                    let mut response = std::vec![0u8; 1024];
                    let len = ch.call(&request, &mut response, soon()).expect("call");
                    let mut expect = request.clone();
                    expect.reverse();
                    assert_eq!(&response[..len], &expect[..], "caller {t} call {i}");
                }
            });
        }
    });
    assert_eq!(ch.transactions_in_flight(), 0, "every id was freed");
}

/// Serves requests until side A closes: completes each with its payload reversed.
pub(super) fn serve_b<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let mut buf = std::vec![0u8; PAGE];
    loop {
        match ch.recv(&mut buf, soon()) {
            Ok(r) if r.completion_requested => {
                let mut answer = r.payload(&buf).to_vec();
                answer.reverse();
                ch.complete(r.transaction_id, &answer, soon())
                    .expect("complete");
            }
            Ok(r) => panic!("unexpected packet {r:?}"),
            Err(ChannelError::Closed) => return,
            Err(e) => panic!("server: {e}"),
        }
    }
}

/// Packets the peer sends while a call waits reach the receiver afterwards, in order.
pub(super) fn unsolicited_a<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let mut response = [0u8; 8];
    assert_eq!(ch.call(b"work", &mut response, soon()).expect("call"), 8);
    assert_eq!(&response[..4], b"done");
    let mut buf = [0u8; 64];
    for i in 0..10u8 {
        let r = ch.recv(&mut buf, soon()).expect("queued packet");
        assert_eq!(
            r.payload(&buf),
            &[i; 8],
            "unsolicited packet {i} kept in order"
        );
    }
    assert_eq!(ch.recv(&mut buf, Wait::Now).polled().expect("empty"), None);
}

pub(super) fn unsolicited_b<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let mut buf = [0u8; 64];
    let r = ch.recv(&mut buf, soon()).expect("request");
    for i in 0..10u8 {
        ch.send(&[i; 8], soon()).expect("unsolicited");
    }
    ch.complete(r.transaction_id, b"done", soon())
        .expect("complete");
    until_closed(&ch);
}

/// A call that times out keeps its id until the late completion arrives, which is
/// discarded and counted, not an error.
pub(super) fn late_a<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let mut response = [0u8; 64];
    let t0 = Instant::now();
    assert_eq!(
        ch.call(b"slow", &mut response, after(50)),
        Err(ChannelError::TimedOut)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the deadline is honoured"
    );
    assert_eq!(ch.transactions_in_flight(), 1, "the id stays reserved");
    let mut buf = [0u8; 64];
    let r = ch
        .recv(&mut buf, soon())
        .expect("the next packet, not the late completion");
    assert_eq!(&r.payload(&buf)[..5], b"after");
    assert_eq!(ch.counters().late_completions, 1);
    assert_eq!(
        ch.transactions_in_flight(),
        0,
        "freed by the late completion"
    );
    assert_eq!(ch.state(), ChannelState::Open);
}

pub(super) fn late_b<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let mut buf = [0u8; 64];
    let req = ch.recv(&mut buf, soon()).expect("the request arrived");
    // Well past the caller's 50 ms deadline.
    thread::sleep(Duration::from_millis(300));
    ch.complete(req.transaction_id, b"too late", soon())
        .expect("complete");
    ch.send(b"after", soon()).expect("send");
    until_closed(&ch);
}

/// A completion for an id not in flight is a protocol error: the channel fails with the
/// cause and every later call fails fast with it.
pub(super) fn unknown_a<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let mut buf = [0u8; 64];
    let expected =
        ChannelError::Failed(FailureCause::Protocol(ProtocolError::UnknownTransaction {
            transaction_id: 0x1234_5678,
        }));
    assert_eq!(ch.recv(&mut buf, soon()), Err(expected));
    assert_eq!(
        ch.recv(&mut buf, Wait::Now).polled(),
        Err(expected),
        "sticky"
    );
    assert_eq!(
        ch.send(b"x", Wait::Now),
        Err(expected),
        "sends fail fast too"
    );
    assert_eq!(ch.call(b"x", &mut buf, soon()), Err(expected));
    assert!(matches!(ch.state(), ChannelState::Failed(_)));
}

pub(super) fn unknown_b<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    ch.complete(0x1234_5678, b"who?", soon())
        .expect("a bogus completion");
    until_closed(&ch);
}

/// Transaction ids run out with a clear error and come back when completions arrive.
pub(super) fn exhaust_a<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let ids: Vec<u64> = (0..MAX_TRANSACTIONS)
        .map(|_| ch.start_request(b"r", Wait::Now).expect("start"))
        .collect();
    assert_eq!(
        ch.start_request(b"r", Wait::Now),
        Err(ChannelError::TransactionsExhausted {
            capacity: MAX_TRANSACTIONS
        })
    );
    // B completes them in reverse order; they come back as completion packets.
    let mut buf = [0u8; 64];
    for id in ids.iter().rev() {
        let r = ch.recv(&mut buf, soon()).expect("a completion");
        assert_eq!(
            (r.packet_type, r.transaction_id),
            (PacketType::Completion, *id)
        );
    }
    assert_eq!(ch.transactions_in_flight(), 0);
    ch.start_request(b"again", Wait::Now)
        .expect("ids are free again");
}

pub(super) fn exhaust_b<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let mut buf = [0u8; 64];
    let mut ids = Vec::new();
    for _ in 0..MAX_TRANSACTIONS {
        let r = ch.recv(&mut buf, soon()).expect("request");
        assert!(r.completion_requested);
        ids.push(r.transaction_id);
    }
    for id in ids.iter().rev() {
        ch.complete(*id, b"ok", soon()).expect("complete");
    }
    until_closed(&ch);
}

pub(super) const GPA_PAGES: [u64; 2] = [3, 9];

pub(super) fn gpa_meta() -> PacketMeta {
    PacketMeta {
        packet_type: PacketType::GpaDirect,
        flags: FLAG_COMPLETION_REQUESTED,
        transaction_id: 77,
    }
}

pub(super) fn gpa_ranges() -> [GpaRange<'static>; 1] {
    [GpaRange {
        byte_offset: 100,
        byte_count: 5000,
        pages: &GPA_PAGES,
    }]
}

/// GPA-direct packets: ranges validated on both sides, parsed on receive.
/// On a stream link: a GPA-direct send is refused with `Unsupported` and changes nothing.
fn gpa_refused<T: PacketTx, R: PacketRx, D: Doorbell>(ch: &Endpoint<T, R, D>) {
    assert!(matches!(
        ch.send_gpa_direct(&gpa_ranges(), b"bulk", gpa_meta(), soon()),
        Err(ChannelError::Unsupported { .. })
    ));
    assert_eq!(ch.state(), ChannelState::Open, "a refusal fails nothing");
    assert_eq!(ch.counters().packets_sent, 0, "nothing went out");
}

pub(super) fn gpa_a<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    if e.kind == LinkKind::Stream {
        return gpa_refused(&e.channel);
    }
    let ch = e.channel;
    ch.send_gpa_direct(&gpa_ranges(), b"bulk", gpa_meta(), soon())
        .expect("send");
    // The sender refuses pages past its limit.
    let far = [64u64];
    let bad = [GpaRange {
        byte_offset: 0,
        byte_count: 1,
        pages: &far,
    }];
    assert_eq!(
        ch.send_gpa_direct(&bad, b"", gpa_meta(), Wait::Now),
        Err(ChannelError::InvalidPacket(PacketError::PageOutOfRange {
            index: 0,
            page: 64,
            limit: 64
        }))
    );
    let mut buf = [0u8; 8];
    ch.recv(&mut buf, soon()).expect("b's acknowledgement");
}

pub(super) fn gpa_b<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    if e.kind == LinkKind::Stream {
        return until_closed(&e.channel);
    }
    let ch = e.channel;
    ch.recv_with(soon(), |guard| {
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
        assert_eq!(got[0].pages().collect::<Vec<_>>(), GPA_PAGES);
        let mut body = [0u8; 4];
        guard.read_payload(0, &mut body).expect("payload");
        assert_eq!(&body, b"bulk");
    })
    .expect("recv");
    ch.send(b"got it", soon()).expect("acknowledge");
    until_closed(&ch);
}

/// A receiver with a tighter page limit than the sender treats such a packet as a
/// protocol violation.
pub(super) fn gpa_limit_a<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    if e.kind == LinkKind::Stream {
        return gpa_refused(&e.channel);
    }
    let ch = e.channel;
    ch.send_gpa_direct(&gpa_ranges(), b"bulk", gpa_meta(), soon())
        .expect("send");
    let mut buf = [0u8; 8];
    // B fails and leaves; we see it go.
    assert_eq!(ch.recv(&mut buf, soon()), Err(ChannelError::Closed));
}

pub(super) fn gpa_limit_b<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    if e.kind == LinkKind::Stream {
        return until_closed(&e.channel);
    }
    let ch = e.channel;
    let mut buf = [0u8; 128];
    assert_eq!(
        ch.recv(&mut buf, soon()),
        Err(ChannelError::Failed(FailureCause::Protocol(
            ProtocolError::Packet(PacketError::PageOutOfRange {
                index: 0,
                page: 9,
                limit: 4
            })
        )))
    );
}

pub(super) fn transfer_header(range_count: u32) -> Vec<u8> {
    let mut header = Vec::new();
    header.extend_from_slice(
        TransferPageHeader {
            pageset_id: 2,
            sender_owns_set: 1,
            reserved: 0,
            range_count,
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
    header
}

/// Transfer-page packets are parsed on receive; a malformed one fails the receiver.
pub(super) fn transfer_a<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let meta = PacketMeta {
        packet_type: PacketType::TransferPages,
        flags: 0,
        transaction_id: 5,
    };
    for count in [2, 9] {
        let header = transfer_header(count);
        let packet = OutgoingPacket {
            meta,
            header: &header,
            payload: Payload::EMPTY,
        };
        ch.send_packet(&packet, soon()).expect("send");
    }
    let mut buf = [0u8; 8];
    assert_eq!(
        ch.recv(&mut buf, soon()),
        Err(ChannelError::Closed),
        "B fails and leaves"
    );
}

pub(super) fn transfer_b<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let mut buf = [0u8; 64];
    let r = ch.recv(&mut buf, soon()).expect("recv");
    assert_eq!(r.packet_type, PacketType::TransferPages);
    let t = parse_transfer_page_header(r.header(&buf)).expect("valid");
    assert_eq!(t.pageset_id, 2);
    assert!(t.sender_owns_set);
    let ranges: Vec<_> = t.ranges().map(|r| (r.byte_offset, r.byte_count)).collect();
    assert_eq!(ranges, [(0, 1500), (2048, 60)]);
    assert!(matches!(
        ch.recv(&mut buf, soon()),
        Err(ChannelError::Failed(FailureCause::Protocol(
            ProtocolError::Packet(PacketError::RangesMismatchHeader { .. })
        )))
    ));
}

pub(super) const BIG: usize = 20_000;

/// Zero-copy: a packet written in place (where the link can), read in place, consumed when
/// the reading ends.
pub(super) fn zero_copy_a<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let big = pattern(9, BIG);
    match e.in_place {
        Some(send_in_place) => send_in_place(&ch, &big).expect("send in place"),
        None => ch.send(&big, soon()).expect("send"),
    }
    ch.send(b"next", soon()).expect("send");
    let mut buf = [0u8; 8];
    ch.recv(&mut buf, soon()).expect("b's acknowledgement");
}

pub(super) fn zero_copy_b<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let big = pattern(9, BIG);
    ch.recv_with(soon(), |g| {
        assert_eq!(g.meta().payload_len, BIG);
        let mut tail = [0u8; 100];
        g.read_payload(BIG - 100, &mut tail)
            .expect("read the end in place");
        assert_eq!(&tail[..], &big[BIG - 100..]);
        assert!(matches!(
            g.read_payload(BIG - 50, &mut tail),
            Err(ChannelError::OutOfBounds { .. })
        ));
    })
    .expect("recv in place");
    // Consumed when the closure returned: the next packet is the next one.
    let four = ch
        .recv_with(soon(), |g| {
            let mut four = [0u8; 4];
            g.read_payload(0, &mut four).expect("read");
            four
        })
        .expect("recv");
    assert_eq!(&four, b"next");
    let mut buf = [0u8; 8];
    assert_eq!(ch.recv(&mut buf, Wait::Now).polled().expect("recv"), None);
    ch.send(b"ok", soon()).expect("acknowledge");
    until_closed(&ch);
}

/// A batch publishes many packets with one commit and at most one signal; a receive
/// batch takes them under one commit; a dropped batch publishes nothing.
pub(super) fn batch_a<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let before = ch.counters().signals_sent;
    let mut batch = ch.batch().expect("batch");
    for i in 0..50u8 {
        batch.push_in_band(&[i; 24]).expect("push");
    }
    assert_eq!(batch.len(), 50);
    batch.commit().expect("commit");
    assert!(
        ch.counters().signals_sent - before <= 1,
        "one batch, at most one signal"
    );
    let mut batch = ch.batch().expect("batch");
    batch.push_in_band(b"dropped").expect("push");
    drop(batch);
    ch.send(b"end", soon()).expect("send");
    let mut buf = [0u8; 8];
    ch.recv(&mut buf, soon()).expect("b's acknowledgement");
}

pub(super) fn batch_b<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let mut got = Vec::new();
    while got.len() < 50 {
        // At most what is left of the batch: the packet after it may already be there.
        ch.recv_batch(50 - got.len(), soon(), |pkt| {
            let mut x = [0u8; 24];
            pkt.read_payload(0, &mut x).expect("read");
            got.push(x[0]);
        })
        .expect("batch receive");
    }
    assert_eq!(got, (0..50).collect::<Vec<u8>>());
    let mut buf = [0u8; 64];
    let r = ch.recv(&mut buf, soon()).expect("recv");
    assert_eq!(
        &r.payload(&buf)[..3],
        b"end",
        "the dropped batch published nothing"
    );
    ch.send(b"ok", soon()).expect("acknowledge");
    until_closed(&ch);
}

pub(super) const CHUNK: usize = 1000;

/// A full ring: `send` (`Wait::Now`) says so, `send` waits for space (or its deadline), and a
/// receive on the other side frees it.
pub(super) fn flow_a<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let chunk = std::vec![7u8; CHUNK];
    let mut sent = 0u32;
    while ch.send(&chunk, Wait::Now).is_ok() {
        sent += 1;
    }
    assert!(sent >= 3, "a 4 KiB ring holds three 1000-byte packets");
    assert_eq!(ch.send(&chunk, Wait::Now), Err(ChannelError::Full));
    let t0 = Instant::now();
    assert_eq!(ch.send(&chunk, after(50)), Err(ChannelError::TimedOut));
    assert!(t0.elapsed() >= Duration::from_millis(45));
    let waits = ch.counters().send_waits;
    // B starts draining after 500 ms; this send waits for it.
    ch.send(&chunk, soon())
        .expect("a blocked send completes once space is freed");
    assert!(ch.counters().send_waits > waits, "the send waited");
    let mut buf = [0u8; 8];
    ch.recv(&mut buf, soon()).expect("b's acknowledgement");
}

pub(super) fn flow_b<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    thread::sleep(Duration::from_millis(500));
    let mut buf = std::vec![0u8; 2 * CHUNK];
    let mut n = 0;
    // Everything A sent, including the packet that waited for space.
    while let Ok(r) = ch.recv(&mut buf, after(300)) {
        assert_eq!(r.payload_len, CHUNK);
        n += 1;
    }
    assert!(n >= 4, "received {n} packets");
    let t0 = Instant::now();
    assert_eq!(ch.recv(&mut buf, after(30)), Err(ChannelError::TimedOut));
    assert!(t0.elapsed() >= Duration::from_millis(25));
    ch.send(b"ok", soon()).expect("acknowledge");
    until_closed(&ch);
}

/// Polling mode receives everything and loses no wake-up when the spin runs out.
pub(super) fn polling_a<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let n = rounds(2000);
    for i in 0..n {
        if i % (n / 4) == 0 {
            // Long pauses make the receiver run out of spins and sleep.
            thread::sleep(Duration::from_millis(5));
        }
        ch.send(&i.to_le_bytes(), soon()).expect("send");
    }
    let mut buf = [0u8; 8];
    ch.recv(&mut buf, soon()).expect("b's acknowledgement");
}

pub(super) fn polling_b<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let mut buf = [0u8; 64];
    for i in 0..rounds(2000) {
        let r = ch.recv(&mut buf, soon()).expect("recv");
        assert_eq!(r.payload(&buf), &i.to_le_bytes());
    }
    ch.send(b"ok", soon()).expect("acknowledge");
    until_closed(&ch);
}

/// A peer that leaves: what it committed is still received, then every call says
/// `Closed`.
pub(super) fn close_a<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let mut buf = [0u8; 64];
    for i in 0..5u8 {
        let r = ch
            .recv(&mut buf, soon())
            .expect("committed packets survive the close");
        assert_eq!(r.payload(&buf), &[i; 16]);
    }
    assert_eq!(ch.recv(&mut buf, soon()), Err(ChannelError::Closed));
    assert_eq!(
        ch.recv(&mut buf, Wait::Now).polled(),
        Err(ChannelError::Closed)
    );
    assert_eq!(ch.send(b"x", soon()), Err(ChannelError::Closed));
    assert_eq!(ch.state(), ChannelState::PeerClosed);
}

pub(super) fn close_b<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    for i in 0..5u8 {
        ch.send(&[i; 16], soon()).expect("send");
    }
    // Leave at once.
}

/// A receive blocked (without a deadline) when the peer leaves wakes up with `Closed`.
pub(super) fn blocked_close_a<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let t0 = Instant::now();
    let mut buf = [0u8; 64];
    assert_eq!(ch.recv(&mut buf, None), Err(ChannelError::Closed));
    assert!(t0.elapsed() < Duration::from_secs(10));
}

pub(super) fn blocked_close_b<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    thread::sleep(Duration::from_millis(100));
    drop(e);
}

/// A corrupt ring (or stream) fails the channel with the cause; every later call fails fast.
pub(super) fn corrupt_a<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = &e.channel;
    let mut buf = [0u8; 64];
    let err = loop {
        match ch.recv(&mut buf, soon()) {
            // The packet B sent before corrupting the ring may come first.
            Ok(r) => assert_eq!(&r.payload(&buf)[..4], b"fine"),
            Err(e) => break e,
        }
    };
    let cause = failed_cause(err);
    match e.kind {
        LinkKind::Ring => assert!(
            matches!(cause, FailureCause::Ring(_)),
            "a ring failure, got {cause:?}"
        ),
        LinkKind::Stream => assert!(
            matches!(cause, FailureCause::Frame(_)),
            "a frame failure, got {cause:?}"
        ),
    }
    let t0 = Instant::now();
    assert_eq!(
        ch.recv(&mut buf, None),
        Err(err),
        "fails fast, never blocks"
    );
    assert_eq!(ch.send(b"x", Wait::Now), Err(err));
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert_eq!(ch.state(), ChannelState::Failed(cause));
}

pub(super) fn corrupt_b<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    e.channel.send(b"fine", soon()).expect("send");
    (e.corrupt_outgoing)();
    // Ring the doorbell so a sleeping A looks now.
    e.channel.doorbell().signal().expect("signal");
    until_closed(&e.channel);
}

pub(super) const COUNTED: [usize; 4] = [0, 1, 8, 100];
/// Ring bytes of the packets above: descriptor plus padded payload, each.
pub(super) const COUNTED_BYTES: u64 = (16 + 16 + 8 + 16 + 8 + 16 + 104) as u64;

/// Packets and bytes are counted the same way on both sides.
pub(super) fn counters_a<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    for len in COUNTED {
        ch.send(&std::vec![1u8; len], soon()).expect("send");
    }
    let mut buf = [0u8; 8];
    ch.recv(&mut buf, soon()).expect("b's acknowledgement");
    let c = ch.counters();
    assert_eq!(c.packets_sent, 4);
    assert_eq!(c.bytes_sent, COUNTED_BYTES);
    assert!(c.signals_sent >= 1);
    assert_eq!(c.packets_received, 1);
}

pub(super) fn counters_b<T: PacketTx, R: PacketRx, D: Doorbell>(e: End<T, R, D>) {
    let ch = e.channel;
    let mut buf = [0u8; 128];
    for _ in COUNTED {
        ch.recv(&mut buf, soon()).expect("recv");
    }
    let c = ch.counters();
    assert_eq!(c.packets_received, 4);
    assert_eq!(c.bytes_received, COUNTED_BYTES);
    ch.send(b"ok", soon()).expect("acknowledge");
    until_closed(&ch);
}
