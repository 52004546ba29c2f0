//! A live in-process channel pair, driven single-threaded by a hostile script.
//!
//! Two `Channel`s share two `HeapMem` rings (A writes ring `ab`, B reads it; B writes `ba`,
//! A reads it) and an in-process doorbell pair. The script interleaves, on either side,
//! `send` (`Wait::Now`) / `send_packet` (`Wait::Now`) (any type, flags, transaction id, header) / packets larger
//! than the ring / `start_request` / `complete` (`Wait::Now`) (in-flight, stale, duplicate or raw
//! ids) / `recv` (`Wait::Now`) / `recv_with` (`Wait::Now`) and `recv_batch` (`Wait::Now`) (with payload reads and
//! whole-header reads: `header` or `gpa_ranges` into a scratch of any length), and the
//! peer's own moves on the shared memory: hand-built packets published past the write index,
//! byte scribbles over the data area, and arbitrary control words.
//!
//! Asserted after every step:
//! - no panic, and every call returns (libFuzzer `-timeout`);
//! - each call returns only the errors its documentation names;
//! - an `Err(Failed(c))` leaves the channel in `Failed(c)`, and the channel never fails
//!   without the call that failed it (a receive, a send, a whole-header read) saying so; once
//!   failed, it stays failed with the same cause, and every later call on it returns
//!   `Failed(c)`;
//! - a completion handed to the caller carries an id that side started and has not yet seen
//!   completed; a channel failing with `UnknownTransaction { id }` really had no such id in
//!   flight; `transactions_in_flight()` equals the model's count and never exceeds
//!   `MAX_TRANSACTIONS`;
//! - payload reads from a received packet succeed exactly when in bounds; a whole-header read
//!   returns exactly the `header_len` bytes when the scratch holds them and `BufferTooSmall`
//!   (with those numbers) exactly when it does not, `NotGpaDirect` exactly for GPA ranges of
//!   another type, and `Failed` only for a GPA-direct or transfer-page header: the header's
//!   own `Protocol(Packet(_))` on a channel that had not failed (which fails from then on,
//!   even though the receive itself succeeded), the old cause on one that had; what it hands
//!   out is valid (it parses; GPA ranges are well formed and fill the header), and repeated
//!   reads of one packet agree; a GPA-direct or transfer-page header copied by `recv` (`Wait::Now`) is
//!   valid too;
//! - receive calls allocate nothing (so nothing sized by the peer).
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmlink_channel::Polled;
use vmlink_channel::Wait;
use vmlink_channel::packet::{parse_gpa_header, parse_transfer_page_header};
use vmlink_channel::{
    Channel, ChannelError, ChannelState, Config, FailureCause, InProcessDoorbell, MAX_TRANSACTIONS,
    OutgoingPacket, PacketMeta, PacketType, ProtocolError, in_process_pair,
};
use vmlink_fuzz::{
    FlagSel, HeaderCall, HeaderMemo, HeaderVerdict, IndexValue, NoAlloc, PeerPacket, Scribble,
    TypeSel, read_whole_header, write_wrapped_peer,
};
use vmlink_ring::protocol::PAGE_SIZE;
use vmlink_ring::{ControlWord, HeapMem, RingMem};

type Chan = Channel<Arc<HeapMem>, InProcessDoorbell>;

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    A,
    B,
}

#[derive(Arbitrary, Debug)]
enum Tid {
    Raw(u64),
    /// One of the peer's (the other side's) ids, in flight or already completed.
    Issued(u8),
    /// The id of the last request this side received.
    LastReceived,
}

#[derive(Arbitrary, Debug)]
enum Word {
    WriteIndex,
    ReadIndex,
    InterruptMask,
    PendingSendSize,
    FeatureBits,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Send {
        side: Side,
        len: u16,
        fill: u8,
    },
    SendPacket {
        side: Side,
        packet_type: TypeSel,
        flags: FlagSel,
        transaction_id: u64,
        header: Vec<u8>,
        len: u16,
    },
    /// A payload `extra` bytes longer than the largest packet the ring carries.
    TooLarge {
        side: Side,
        extra: u8,
    },
    StartRequest {
        side: Side,
        len: u16,
    },
    Complete {
        side: Side,
        tid: Tid,
        len: u16,
    },
    Recv {
        side: Side,
        buf_len: u16,
    },
    /// `reads`: `(header, offset, len)`. A payload read (`!header`) copies `len` bytes at
    /// `offset`; a header read copies the whole header into a `len`-byte scratch with
    /// `header` (even `offset`) or `gpa_ranges` (odd).
    RecvInPlace {
        side: Side,
        reads: Vec<(bool, u16, u16)>,
    },
    RecvBatch {
        side: Side,
        max: u8,
        reads: Vec<(bool, u16, u16)>,
    },
    /// The writer of the ring read by `reader` publishes a hand-built packet.
    PeerPacket {
        reader: Side,
        packet: PeerPacket,
    },
    Scribble {
        reader: Side,
        scribble: Scribble,
    },
    Control {
        reader: Side,
        word: Word,
        value: IndexValue,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    pages_ab: u8,
    pages_ba: u8,
    gpa_limit: Option<u16>,
    ops: Vec<Op>,
}

struct End {
    chan: Chan,
    /// The ring this end reads.
    incoming: Arc<HeapMem>,
    /// Ids this end started that it has not yet received a completion for.
    in_flight: Vec<u64>,
    /// Every id this end was handed by `start_request`.
    issued: Vec<u64>,
    last_received: u64,
    /// Failure cause once failed.
    failed: Option<FailureCause>,
}

impl End {
    fn check_state(&mut self) {
        let st = self.chan.state();
        match (self.failed, st) {
            (Some(c), ChannelState::Failed(d)) => assert_eq!(c, d, "failure cause changed"),
            (Some(c), other) => panic!("channel failed with {c:?} but is now {other:?}"),
            // Every failure is reported by the call that caused it (a receive, a send, a
            // whole-header read): a malformed header received in place or in a batch and
            // never read whole fails nothing.
            (None, ChannelState::Failed(d)) => panic!("the channel failed silently with {d:?}"),
            (None, _) => {}
        }
        let n = self.chan.transactions_in_flight();
        assert!(n <= MAX_TRANSACTIONS);
        assert_eq!(
            n,
            self.in_flight.len(),
            "transactions_in_flight vs model {:?}",
            self.in_flight
        );
    }

    /// Checks an error against the allowed set and the failure rules.
    fn check_err(&mut self, what: &str, e: ChannelError, allowed: &[fn(&ChannelError) -> bool]) {
        if let Some(c) = self.failed {
            assert_eq!(e, ChannelError::Failed(c), "{what} on a failed channel");
            return;
        }
        if let ChannelError::Failed(c) = e {
            assert_eq!(
                self.chan.state(),
                ChannelState::Failed(c),
                "{what}: Failed but state differs"
            );
            if let FailureCause::Protocol(ProtocolError::UnknownTransaction { transaction_id }) = c
            {
                assert!(
                    !self.in_flight.contains(&transaction_id),
                    "{what}: failed with UnknownTransaction for in-flight id {transaction_id:#x}"
                );
            }
            self.failed = Some(c);
            return;
        }
        assert!(
            matches!(e, ChannelError::Closed) || allowed.iter().any(|f| f(&e)),
            "{what}: undocumented error {e:?}"
        );
    }

    /// Checks the cause a whole-header read failed with, given the channel's cause before
    /// the read (`known`), and returns the channel's cause from then on.
    fn header_failed(
        &self,
        what: &str,
        known: Option<FailureCause>,
        c: FailureCause,
    ) -> FailureCause {
        match known {
            Some(k) => assert_eq!(c, k, "{what}: a header read on a failed channel"),
            None => assert!(
                matches!(c, FailureCause::Protocol(ProtocolError::Packet(_))),
                "{what}: a header read failed the channel with {c:?}"
            ),
        }
        assert_eq!(
            self.chan.state(),
            ChannelState::Failed(c),
            "{what}: Failed but state differs"
        );
        c
    }

    /// The channel failed while a packet was read (a header read): from now on it is failed.
    fn record_failure(&mut self, c: FailureCause) {
        if let Some(f) = self.failed {
            assert_eq!(f, c, "failure cause changed");
        }
        self.failed = Some(c);
    }

    fn check_ok_while_failed(&self, what: &str) {
        assert!(
            self.failed.is_none(),
            "{what} succeeded on a failed channel"
        );
    }

    /// A packet was handed to the caller.
    fn received(&mut self, packet_type: PacketType, tid: u64, completion_requested: bool) {
        if packet_type == PacketType::Completion {
            let pos = self.in_flight.iter().position(|&t| t == tid);
            let pos = pos.unwrap_or_else(|| {
                panic!(
                    "completion for {tid:#x} handed out, not in flight {:?}",
                    self.in_flight
                )
            });
            self.in_flight.swap_remove(pos);
        } else if completion_requested {
            self.last_received = tid;
        }
    }
}

fn is_full(e: &ChannelError) -> bool {
    matches!(e, ChannelError::Full)
}
fn is_too_large(e: &ChannelError) -> bool {
    matches!(e, ChannelError::TooLarge { .. })
}
fn is_invalid(e: &ChannelError) -> bool {
    matches!(
        e,
        ChannelError::InvalidRequest(_) | ChannelError::InvalidPacket(_)
    )
}
fn is_exhausted(e: &ChannelError) -> bool {
    matches!(e, ChannelError::TransactionsExhausted { capacity } if *capacity == MAX_TRANSACTIONS)
}
fn is_small(e: &ChannelError) -> bool {
    matches!(e, ChannelError::BufferTooSmall { .. })
}

fn payload(len: u16, fill: u8) -> Vec<u8> {
    (0..len as usize % 20_000)
        .map(|i| fill.wrapping_add(i as u8))
        .collect()
}

/// Checks a payload read of `buf.len()` bytes at `offset` from a packet with a
/// `payload_len`-byte payload: it succeeds exactly when in bounds. Allocates nothing.
fn check_payload_read(
    what: &str,
    payload_len: usize,
    offset: u16,
    buf: &[u8],
    r: Result<(), ChannelError>,
) {
    let (offset, len) = (offset as usize, buf.len());
    if offset + len <= payload_len {
        assert_eq!(r, Ok(()), "{what}: in-bounds read failed");
    } else {
        assert_eq!(
            r,
            Err(ChannelError::OutOfBounds {
                offset,
                len,
                size: payload_len
            }),
            "{what}: out-of-bounds read"
        );
    }
}

/// A GPA-direct or transfer-page header handed out by a copying receive is valid.
fn check_copied_header(what: &str, packet_type: PacketType, header: &[u8], limit: Option<u64>) {
    match packet_type {
        PacketType::GpaDirect => assert!(
            parse_gpa_header(header, limit).is_ok(),
            "{what}: an invalid GPA header handed out"
        ),
        PacketType::TransferPages => assert!(
            parse_transfer_page_header(header).is_ok(),
            "{what}: an invalid transfer-page header handed out"
        ),
        _ => {}
    }
}

fn word_of(w: &Word) -> ControlWord {
    match w {
        Word::WriteIndex => ControlWord::WriteIndex,
        Word::ReadIndex => ControlWord::ReadIndex,
        Word::InterruptMask => ControlWord::InterruptMask,
        Word::PendingSendSize => ControlWord::PendingSendSize,
        Word::FeatureBits => ControlWord::FeatureBits,
    }
}

fuzz_target!(|input: Input| {
    let len_ab = (input.pages_ab as usize % 3 + 1) * PAGE_SIZE;
    let len_ba = (input.pages_ba as usize % 3 + 1) * PAGE_SIZE;
    let ab = Arc::new(HeapMem::new(len_ab).unwrap());
    let ba = Arc::new(HeapMem::new(len_ba).unwrap());
    let mut config = Config::default().with_queue_depth(4);
    let limit = input.gpa_limit.map(u64::from);
    if let Some(l) = limit {
        config = config.with_gpa_page_limit(l);
    }
    // What header reads returned for the packet being read (headers are at most a ring).
    let mut memo = HeaderMemo::with_capacity(len_ab.max(len_ba));
    let (da, db) = in_process_pair();
    let a = Channel::new(ab.clone(), ba.clone(), da, config).unwrap();
    let b = Channel::new(ba.clone(), ab.clone(), db, config).unwrap();
    let mut ends = [
        End {
            chan: a,
            incoming: ba,
            in_flight: vec![],
            issued: vec![],
            last_received: 0,
            failed: None,
        },
        End {
            chan: b,
            incoming: ab,
            in_flight: vec![],
            issued: vec![],
            last_received: 0,
            failed: None,
        },
    ];
    let idx = |s: Side| match s {
        Side::A => 0,
        Side::B => 1,
    };

    for op in input.ops.iter().take(256) {
        match op {
            Op::Send { side, len, fill } => {
                let e = &mut ends[idx(*side)];
                let p = payload(*len, *fill);
                match e.chan.send(&p, Wait::Now) {
                    Ok(()) => e.check_ok_while_failed("send(Now)"),
                    Err(err) => e.check_err("send(Now)", err, &[is_full, is_too_large]),
                }
            }
            Op::SendPacket {
                side,
                packet_type,
                flags,
                transaction_id,
                header,
                len,
            } => {
                let e = &mut ends[idx(*side)];
                let p = payload(*len, 0x5A);
                let header = &header[..header.len().min(512)];
                let packet = OutgoingPacket {
                    meta: PacketMeta {
                        packet_type: PacketType::from_raw(packet_type.raw())
                            .unwrap_or(PacketType::InBand),
                        flags: flags.raw(),
                        transaction_id: *transaction_id,
                    },
                    header,
                    payload: vmlink_ring::Payload::Bytes(&p),
                };
                match e.chan.send_packet(&packet, Wait::Now) {
                    Ok(()) => e.check_ok_while_failed("send_packet(Now)"),
                    Err(err) => e.check_err(
                        "send_packet(Now)",
                        err,
                        &[is_full, is_too_large, is_invalid],
                    ),
                }
            }
            Op::TooLarge { side, extra } => {
                let e = &mut ends[idx(*side)];
                let p = vec![1u8; e.chan.max_packet_len() + *extra as usize];
                match e.chan.send(&p, Wait::Now) {
                    Ok(()) => panic!("a packet larger than the ring was sent"),
                    Err(err) => e.check_err("try_send(too large)", err, &[is_too_large]),
                }
                assert!(
                    e.failed.is_some()
                        || matches!(
                            e.chan.send(&p, Wait::Now),
                            Err(ChannelError::TooLarge { .. } | ChannelError::Closed)
                        )
                );
            }
            Op::StartRequest { side, len } => {
                let e = &mut ends[idx(*side)];
                let p = payload(*len, 0x11);
                match e.chan.start_request(&p, Wait::Now) {
                    Ok(tid) => {
                        e.check_ok_while_failed("start_request(Now)");
                        assert!(!e.in_flight.contains(&tid), "id {tid:#x} handed out twice");
                        assert_ne!(tid, 0);
                        e.in_flight.push(tid);
                        e.issued.push(tid);
                    }
                    Err(err) => {
                        if is_exhausted(&err) {
                            assert_eq!(e.in_flight.len(), MAX_TRANSACTIONS);
                        }
                        e.check_err(
                            "start_request(Now)",
                            err,
                            &[is_full, is_too_large, is_exhausted],
                        )
                    }
                }
            }
            Op::Complete { side, tid, len } => {
                let i = idx(*side);
                let id = match tid {
                    Tid::Raw(v) => *v,
                    Tid::Issued(n) => {
                        let peer = &ends[1 - i];
                        if peer.issued.is_empty() {
                            0
                        } else {
                            peer.issued[*n as usize % peer.issued.len()]
                        }
                    }
                    Tid::LastReceived => ends[i].last_received,
                };
                let e = &mut ends[i];
                let p = payload(*len, 0x22);
                match e.chan.complete(id, &p, Wait::Now) {
                    Ok(()) => e.check_ok_while_failed("complete(Now)"),
                    Err(err) => e.check_err("complete(Now)", err, &[is_full, is_too_large]),
                }
            }
            Op::Recv { side, buf_len } => {
                let e = &mut ends[idx(*side)];
                let mut buf = vec![0u8; *buf_len as usize % 20_000];
                let g = NoAlloc::start("recv(Now)");
                let r = e.chan.recv(&mut buf, Wait::Now).polled();
                g.finish();
                match r {
                    Ok(Some(m)) => {
                        e.check_ok_while_failed("recv(Now)");
                        assert!(m.len() <= buf.len());
                        check_copied_header("recv(Now)", m.packet_type, m.header(&buf), limit);
                        e.received(m.packet_type, m.transaction_id, m.completion_requested);
                    }
                    Ok(None) => e.check_ok_while_failed("recv(Now)"),
                    Err(err) => {
                        if let ChannelError::BufferTooSmall { capacity, .. } = err {
                            assert_eq!(capacity, buf.len());
                        }
                        e.check_err("recv(Now)", err, &[is_small])
                    }
                }
            }
            Op::RecvInPlace { side, reads } => {
                let e = &mut ends[idx(*side)];
                let known = e.failed;
                // The channel's cause once a header read failed it.
                let mut now = known;
                let mut got = None;
                let mut bufs: Vec<Vec<u8>> = reads
                    .iter()
                    .take(8)
                    .map(|r| vec![0u8; r.2 as usize % 9000])
                    .collect();
                let end = &*e;
                let g = NoAlloc::start("recv_with(Now)");
                let r = end
                    .chan
                    .recv_with(Wait::Now, |p| {
                        let m = p.meta();
                        got = Some(m);
                        memo.reset();
                        for (&(header, offset, _), buf) in reads.iter().zip(bufs.iter_mut()) {
                            if header {
                                let call = HeaderCall::from_selector(offset);
                                let v = read_whole_header(p, call, buf, limit, Some(&mut memo));
                                if let HeaderVerdict::Failed(c) = v {
                                    now = Some(end.header_failed("Packet", now, c));
                                }
                            } else {
                                let r = p.read_payload(offset as usize, buf);
                                check_payload_read("Packet", m.payload_len, offset, buf, r);
                            }
                        }
                    })
                    .polled();
                g.finish();
                if let Some(m) = got {
                    assert!(
                        known.is_none(),
                        "recv_with(Now) handed a packet on a failed channel"
                    );
                    e.received(m.packet_type, m.transaction_id, m.completion_requested);
                }
                match r {
                    Ok(Some(())) => {
                        assert_eq!(
                            now, known,
                            "recv_with(Now) succeeded after failing the channel"
                        );
                    }
                    Ok(None) => e.check_ok_while_failed("recv_with(Now)"),
                    Err(err) => {
                        if let Some(c) = now.filter(|_| known.is_none()) {
                            // The header read failed the channel: the receive says so.
                            assert_eq!(err, ChannelError::Failed(c));
                            e.record_failure(c);
                        } else {
                            e.check_err("recv_with(Now)", err, &[]);
                        }
                    }
                }
            }
            Op::RecvBatch { side, max, reads } => {
                let e = &mut ends[idx(*side)];
                let known = e.failed;
                let mut now = known;
                let mut got = Vec::with_capacity(256);
                let mut bufs: Vec<Vec<u8>> = reads
                    .iter()
                    .take(4)
                    .map(|r| vec![0u8; r.2 as usize % 9000])
                    .collect();
                let chan = &e.chan;
                let end = &*e;
                let g = NoAlloc::start("recv_batch(Now)");
                let r = chan.recv_batch(*max as usize % 8, Wait::Now, |p| {
                    // A batch stops at the packet whose header read failed the channel.
                    assert!(
                        now == known,
                        "recv_batch(Now) handed a packet after a header read failed the channel"
                    );
                    let m = p.meta();
                    got.push((m.packet_type, m.transaction_id, m.completion_requested));
                    memo.reset();
                    for (&(header, offset, _), buf) in reads.iter().zip(bufs.iter_mut()) {
                        if header {
                            let call = HeaderCall::from_selector(offset);
                            let v = read_whole_header(p, call, buf, limit, Some(&mut memo));
                            if let HeaderVerdict::Failed(c) = v {
                                now = Some(end.header_failed("Packet", now, c));
                            }
                        } else {
                            let r = p.read_payload(offset as usize, buf);
                            check_payload_read("Packet", m.payload_len, offset, buf, r);
                        }
                    }
                });
                g.finish();
                for (t, id, c) in got.iter().copied() {
                    e.received(t, id, c);
                }
                if let Ok(n) = r {
                    // A header read that failed the channel ends the batch with that error.
                    assert_eq!(
                        now, known,
                        "recv_batch(Now) succeeded after failing the channel"
                    );
                    e.check_ok_while_failed("recv_batch(Now)");
                    assert_eq!(n, got.len());
                    assert!(n <= *max as usize % 8);
                }
                if let Some(c) = now {
                    e.record_failure(c);
                }
                if let Err(err) = r {
                    e.check_err("recv_batch(Now)", err, &[]);
                }
            }
            Op::PeerPacket { reader, packet } => {
                let mem = &ends[idx(*reader)].incoming;
                let len = mem.data_len();
                let w = mem.load_control(ControlWord::WriteIndex);
                let start = if (w as usize) < len { w & !7 } else { 0 };
                let bytes = packet.encode(len, start);
                write_wrapped_peer(mem, start as usize, &bytes);
                let end = ((start as usize + bytes.len()) % len) as u32 & !7;
                mem.store_control(ControlWord::WriteIndex, end);
            }
            Op::Scribble { reader, scribble } => scribble.apply(&ends[idx(*reader)].incoming),
            Op::Control {
                reader,
                word,
                value,
            } => {
                let mem = &ends[idx(*reader)].incoming;
                mem.store_control(word_of(word), value.resolve(mem.data_len()));
            }
        }
        ends[0].check_state();
        ends[1].check_state();
    }
});
