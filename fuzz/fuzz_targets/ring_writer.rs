//! Our `Writer` against a hostile reader.
//!
//! The input is the reader-side state (read index, interrupt mask, pending send size, feature
//! bits; raw or nudged valid), garbage in the data area, and a sequence of our writes,
//! pushes, in-place reservations, commits, reverts and waits, interleaved with a peer that
//! consumes packets the way a reader should — or moves its index anywhere, rewrites words it
//! does not own, and scribbles on data.
//!
//! Asserted, beyond "no panic" (a write outside the data area panics in `HeapMem`):
//! - the published write index is always 8-aligned, below the data length and equal to a
//!   model of what we committed; after a commit the control page holds it;
//! - every data byte a writer call changes lies in the region that call claimed at the old
//!   tail, and the writer never stores the words the reader owns;
//! - while the peer behaves: each call succeeds or fails exactly as the model of free space
//!   says (`Full` with the right numbers), commits signal exactly when the ring was empty and
//!   unmasked, `free_space` is exact, the writer never touches unread bytes, and a fresh
//!   `Reader` over a copy of the ring reads back exactly the packets we sent, with zero
//!   padding and Linux trailers;
//! - no library call allocates.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::collections::VecDeque;
use vmlink_fuzz::{
    ControlPage, IndexValue, NoAlloc, Scribble, data_len_for, data_snapshot, distance,
    image_with_control, index_ok, no_alloc, set_image_control, wrapped,
};
use vmlink_ring::protocol::{
    CONTROL_PAGE_SIZE, DESCRIPTOR_SIZE, PacketType, TRAILER_SIZE, max_packet_len,
};
use vmlink_ring::{
    ControlWord, HeapMem, Index, OutgoingPacket, PacketMeta, Reader, RingError, RingMem, Signal,
    WaitDecision, WriteError, Writer,
};

#[derive(Arbitrary, Debug)]
struct Input {
    pages: u8,
    control: ControlPage,
    garbage: u8,
    actions: Vec<Action>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum TypeSel {
    InBand,
    TransferPages,
    GpaDirect,
    Completion,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Flags {
    None,
    CompletionRequested,
    Raw(u16),
}

#[derive(Arbitrary, Debug)]
struct PacketArgs {
    packet_type: TypeSel,
    flags: Flags,
    transaction_id: u64,
    /// Extra header length: `Units` of 8 bytes, or raw (maybe misaligned).
    header: HeaderLen,
    /// Payload parts: (length, byte pattern).
    parts: Vec<(u16, u8)>,
    seed: u8,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum HeaderLen {
    Units(u8),
    Raw(u16),
}

#[derive(Arbitrary, Debug)]
enum Region {
    Header,
    Payload,
}

#[derive(Arbitrary, Debug)]
struct Fill {
    region: Region,
    offset: u16,
    len: u16,
    seed: u8,
}

#[derive(Arbitrary, Debug)]
enum SlotEnd {
    Finish,
    Commit,
    Drop,
}

#[derive(Arbitrary, Debug)]
enum PeerAction {
    /// A reader that follows the rules consumes this many of our committed packets.
    Consume(u8),
    ConsumeAll,
    /// The read index set to anything (legitimate only if it lands on a packet boundary
    /// between the current read index and our published index).
    SetReadIndex(IndexValue),
    SetInterruptMask(u32),
    /// Words the writer owns: a hostile reader writes them anyway.
    SetPendingSendSize(u32),
    SetWriteIndex(IndexValue),
    SetFeatureBits(u32),
    Scribble(Scribble),
}

#[derive(Arbitrary, Debug)]
enum Action {
    Write(PacketArgs),
    Push(PacketArgs),
    Reserve {
        args: PacketArgs,
        fills: Vec<Fill>,
        end: SlotEnd,
    },
    Commit,
    Revert,
    PrepareWait {
        header: HeaderLen,
        payload_len: u16,
    },
    FreeSpace,
    Peer(PeerAction),
}

/// A packet we sent, as a reader must see it.
#[derive(Debug, Clone)]
struct Sent {
    start: u32,
    packet_type: PacketType,
    flags: u16,
    transaction_id: u64,
    header: Vec<u8>,
    payload: Vec<u8>,
    /// Packet length, trailer excluded.
    len: usize,
}

impl Sent {
    fn footprint(&self) -> usize {
        self.len + TRAILER_SIZE
    }
}

/// What sits between the reader's index and our published index.
#[derive(Debug, Clone)]
enum Entry {
    /// Bytes that were there before we attached.
    Unknown {
        len: usize,
    },
    Packet(Sent),
}

impl Entry {
    fn footprint(&self) -> usize {
        match self {
            Entry::Unknown { len } => *len,
            Entry::Packet(p) => p.footprint(),
        }
    }
}

struct Model {
    len: usize,
    published: u32,
    tail: u32,
    /// Pushed, not committed.
    pending: Vec<Sent>,
    /// Committed, not consumed by the peer.
    queue: VecDeque<Entry>,
    /// The peer's read index while it behaves.
    read: u32,
    /// The peer has only ever moved its read index forward onto packet boundaries and has
    /// not scribbled on unread data.
    behaved: bool,
    /// We stored a pending send size that a successful reservation must clear.
    armed: bool,
    /// The reader's index as the writer last accepted it. The writer documents that it
    /// re-reads the index only when its cached value shows too little space (and always in
    /// `free_space` and `prepare_wait`), and accepts only values in range, aligned, and moved
    /// forward no further than its published index; this follows the same rules.
    cached_read: u32,
}

impl Model {
    /// Free space by the peer's real read index (meaningful while it behaves).
    fn free(&self) -> usize {
        self.len - distance(self.len, self.read, self.tail)
    }

    /// Free space by the read index the writer has accepted.
    fn free_cached(&self) -> usize {
        self.len - distance(self.len, self.cached_read, self.tail)
    }

    /// The writer re-reads the reader's index.
    fn refresh(&mut self, mem: &HeapMem) -> Result<(), RingError> {
        let raw = mem.load_control(ControlWord::ReadIndex);
        if raw as usize >= self.len {
            return Err(RingError::IndexOutOfRange {
                index: Index::Read,
                value: raw,
                data_len: self.len as u32,
            });
        }
        if raw % 8 != 0 {
            return Err(RingError::IndexMisaligned {
                index: Index::Read,
                value: raw,
            });
        }
        let old_used = distance(self.len, self.cached_read, self.published);
        let new_used = distance(self.len, raw, self.published);
        if new_used > old_used {
            return Err(RingError::IndexMovedBackwards {
                index: Index::Read,
                old: self.cached_read,
                new: raw,
            });
        }
        self.cached_read = raw;
        Ok(())
    }

    /// What claiming room for a `plen`-byte packet must answer.
    fn claim(&mut self, mem: &HeapMem, plen: usize) -> Result<(), WriteError> {
        let needed = plen + TRAILER_SIZE;
        if self.free_cached() <= needed {
            self.refresh(mem)?;
            if self.free_cached() <= needed {
                return Err(WriteError::Full {
                    needed,
                    free: self.free_cached(),
                });
            }
        }
        Ok(())
    }

    /// While the peer behaves, the writer's view of the read index is never ahead of the
    /// real one, so free space by it never exceeds the real free space.
    fn check_views(&self) {
        if self.behaved {
            assert!(
                distance(self.len, self.cached_read, self.published)
                    >= distance(self.len, self.read, self.published),
                "the writer's read index is ahead of the reader's"
            );
        }
    }

    fn advance(&self, at: u32, n: usize) -> u32 {
        ((at as usize + n) % self.len) as u32
    }

    fn commit(&mut self) {
        for p in self.pending.drain(..) {
            self.queue.push_back(Entry::Packet(p));
        }
        self.published = self.tail;
    }

    /// The peer consumes `n` entries (all with `None`).
    fn consume(&mut self, n: Option<usize>) -> u32 {
        let n = n.unwrap_or(self.queue.len()).min(self.queue.len());
        for _ in 0..n {
            let e = self.queue.pop_front().unwrap();
            self.read = self.advance(self.read, e.footprint());
        }
        self.read
    }

    /// Offsets (relative to the read index) where entries start, up to the published index.
    fn boundaries(&self) -> Vec<usize> {
        let mut at = 0;
        let mut out = vec![0];
        for e in &self.queue {
            at += e.footprint();
            out.push(at);
        }
        out
    }

    /// Data offsets holding committed or pushed bytes the reader has not consumed.
    fn is_unread(&self, offset: usize) -> bool {
        let rel = distance(self.len, self.read, offset as u32);
        rel < distance(self.len, self.read, self.tail)
    }
}

impl PacketArgs {
    fn meta(&self) -> PacketMeta {
        PacketMeta {
            packet_type: match self.packet_type {
                TypeSel::InBand => PacketType::InBand,
                TypeSel::TransferPages => PacketType::TransferPages,
                TypeSel::GpaDirect => PacketType::GpaDirect,
                TypeSel::Completion => PacketType::Completion,
            },
            flags: match self.flags {
                Flags::None => 0,
                Flags::CompletionRequested => 1,
                Flags::Raw(f) => f,
            },
            transaction_id: self.transaction_id,
        }
    }

    fn header(&self, data_len: usize) -> Vec<u8> {
        let n = header_len(self.header, data_len);
        (0..n)
            .map(|i| self.seed.wrapping_mul(31).wrapping_add(i as u8))
            .collect()
    }

    /// Payload parts, their total capped a little past the data length so that `TooLarge`
    /// is reachable but nothing big is allocated.
    fn parts(&self, data_len: usize) -> Vec<Vec<u8>> {
        let mut left = data_len + 64;
        let mut out = Vec::new();
        for &(len, pattern) in self.parts.iter().take(8) {
            let n = (len as usize).min(left);
            left -= n;
            out.push((0..n).map(|i| pattern ^ (i as u8)).collect());
        }
        out
    }
}

fn header_len(h: HeaderLen, data_len: usize) -> usize {
    match h {
        HeaderLen::Units(u) => (u as usize % 16) * 8,
        HeaderLen::Raw(r) => (r as usize).min(data_len + 64),
    }
}

/// What the writer should answer for a packet of this shape: `Err` for shape errors, else
/// the packet length.
fn expected_shape(
    meta: &PacketMeta,
    header_len: usize,
    payload_len: usize,
    data_len: usize,
) -> Result<usize, WriteError> {
    if header_len % 8 != 0 {
        return Err(WriteError::HeaderMisaligned { len: header_len });
    }
    if meta.flags & !1 != 0 {
        return Err(WriteError::UnknownFlags { flags: meta.flags });
    }
    let len = (DESCRIPTOR_SIZE + header_len + payload_len).div_ceil(8) * 8;
    let max = max_packet_len(data_len);
    if len > max {
        return Err(WriteError::TooLarge { len, max });
    }
    Ok(len)
}

/// Control words the writer must never store to.
fn reader_owned(mem: &HeapMem) -> [u32; 3] {
    [
        mem.load_control(ControlWord::ReadIndex),
        mem.load_control(ControlWord::InterruptMask),
        mem.load_control(ControlWord::FeatureBits),
    ]
}

/// Asserts that every changed data byte lies within `claimed` bytes from `from`. (`claim_ok`
/// has shown that region to be free, so no unread byte changed.)
fn check_changes(model: &Model, before: &[u8], after: &[u8], from: u32, claimed: usize) {
    for (i, (a, b)) in before.iter().zip(after).enumerate() {
        if a != b {
            let rel = distance(model.len, from, i as u32);
            assert!(
                rel < claimed,
                "writer changed data byte {i}, outside the {claimed} bytes it claimed at {from}"
            );
        }
    }
}

/// Re-reads everything the peer has not consumed with a fresh reader over a copy of the ring,
/// and compares it with what we sent.
fn read_back(mem: &HeapMem, model: &Model) {
    if !model.behaved
        || model
            .queue
            .iter()
            .any(|e| matches!(e, Entry::Unknown { .. }))
    {
        return;
    }
    let mut image = mem.to_image();
    set_image_control(&mut image, ControlWord::WriteIndex, model.published);
    set_image_control(&mut image, ControlWord::ReadIndex, model.read);
    let data = image[CONTROL_PAGE_SIZE..].to_vec();
    let copy = HeapMem::from_image(&image).unwrap();
    let mut reader = Reader::new(&copy).expect("a ring we wrote is valid");
    let mut buf = vec![0u8; model.len];
    for e in &model.queue {
        let Entry::Packet(sent) = e else {
            unreachable!()
        };
        let packet = reader
            .peek()
            .unwrap_or_else(|err| panic!("our packet {sent:?} rejected: {err}"))
            .expect("our packet is there");
        let info = *packet.info();
        assert_eq!(info.offset(), sent.start);
        assert_eq!(info.packet_type(), sent.packet_type);
        assert_eq!(info.flags(), sent.flags);
        assert_eq!(info.transaction_id(), sent.transaction_id);
        assert_eq!(info.header_len(), sent.header.len());
        assert_eq!(info.packet_len(), sent.len);
        assert_eq!(
            info.payload_len(),
            sent.len - DESCRIPTOR_SIZE - sent.header.len()
        );
        let h = &mut buf[..sent.header.len()];
        packet.read_header(0, h).unwrap();
        assert_eq!(h, &sent.header[..], "header bytes differ");
        let p = &mut buf[..info.payload_len()];
        packet.read_payload(0, p).unwrap();
        assert_eq!(
            &p[..sent.payload.len()],
            &sent.payload[..],
            "payload bytes differ"
        );
        assert!(
            p[sent.payload.len()..].iter().all(|&b| b == 0),
            "padding not zero"
        );
        packet.consume();
        // Linux writes the packet's start offset in the trailer's high 32 bits.
        let t = wrapped(&data, sent.start as usize + sent.len, TRAILER_SIZE);
        assert_eq!(
            u64::from_le_bytes(t.try_into().unwrap()),
            (sent.start as u64) << 32
        );
    }
    assert!(
        reader.peek().unwrap().is_none(),
        "reader found more than we sent"
    );
}

fn run(input: &Input) {
    let len = data_len_for(input.pages);
    let mut image = image_with_control(len, &input.control);
    image[CONTROL_PAGE_SIZE..].fill(input.garbage);
    let mem = HeapMem::from_image(&image).expect("a well-sized image");
    let raw_write = mem.load_control(ControlWord::WriteIndex);
    let raw_read = mem.load_control(ControlWord::ReadIndex);
    let writer = no_alloc("Writer::new", || Writer::new(&mem));
    let mut writer = match writer {
        Ok(w) => {
            assert!(index_ok(len, raw_write) && index_ok(len, raw_read));
            w
        }
        Err(_) => {
            assert!(!index_ok(len, raw_write) || !index_ok(len, raw_read));
            return;
        }
    };
    assert_eq!(writer.max_packet_len(), max_packet_len(len));
    assert_eq!(writer.data_len(), len);
    let mut model = Model {
        len,
        published: raw_write,
        tail: raw_write,
        pending: Vec::new(),
        queue: VecDeque::new(),
        read: raw_read,
        behaved: true,
        armed: false,
        cached_read: raw_read,
    };
    let unknown = distance(len, raw_read, raw_write);
    if unknown > 0 {
        model.queue.push_back(Entry::Unknown { len: unknown });
    }

    for action in input.actions.iter().take(256) {
        let before = data_snapshot(&mem);
        let owned_before = reader_owned(&mem);
        let tail_before = model.tail;
        // Bytes from `tail_before` the call may change.
        let mut claimed = 0usize;
        let mut peer = false;
        // For commit signals: the ring looked empty to the writer and the reader is unmasked.
        let was_empty = mem.load_control(ControlWord::ReadIndex) == model.published;
        let mask = mem.load_control(ControlWord::InterruptMask);
        match action {
            Action::Peer(p) => {
                peer = true;
                peer_act(&mem, &mut model, p);
            }
            Action::Write(args) | Action::Push(args) => {
                let meta = args.meta();
                let header = args.header(len);
                let parts = args.parts(len);
                let slices: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
                let packet = OutgoingPacket {
                    meta,
                    header: &header,
                    payload: vmlink_ring::Payload::Gather(&slices),
                };
                let is_write = matches!(action, Action::Write(_));
                let payload: Vec<u8> = parts.concat();
                let expect = expect_claim(&mem, &mut model, &meta, header.len(), payload.len());
                let r = if is_write {
                    no_alloc("Writer::write", || writer.write(&packet))
                } else {
                    no_alloc("Writer::push", || {
                        writer.push(&packet).map(|()| Signal::NONE)
                    })
                };
                assert_eq!(r.map(|_| ()), expect.map(|_| ()), "write/push answer");
                if let Ok(plen) = expect {
                    claimed = claim_ok(&mem, &mut model, plen);
                    model.pending.push(Sent {
                        start: model.tail,
                        packet_type: meta.packet_type,
                        flags: meta.flags,
                        transaction_id: meta.transaction_id,
                        header: header.clone(),
                        payload,
                        len: plen,
                    });
                    model.tail = model.advance(model.tail, claimed);
                    if is_write {
                        check_commit(&mem, &mut model, r.unwrap(), was_empty, mask);
                    }
                }
            }
            Action::Reserve { args, fills, end } => {
                let meta = args.meta();
                let hlen = header_len(args.header, len);
                let plen: usize = args.parts(len).iter().map(Vec::len).sum();
                let expect = expect_claim(&mem, &mut model, &meta, hlen, plen);
                let g = NoAlloc::start("Writer::reserve");
                let r = writer.reserve(meta, hlen, plen);
                g.finish();
                let mut slot = match (r, expect) {
                    (Ok(slot), Ok(_)) => slot,
                    (Err(e), expect) => {
                        assert_eq!(Err(e), expect, "reserve answer");
                        finish_action(
                            &mem,
                            &writer,
                            &model,
                            &before,
                            owned_before,
                            tail_before,
                            0,
                            false,
                        );
                        continue;
                    }
                    (Ok(_), Err(e)) => panic!("reserve succeeded; expected {e:?}"),
                };
                let packet_len = expect.unwrap();
                assert_eq!(slot.offset(), model.tail);
                assert_eq!((slot.header_len(), slot.payload_len()), (hlen, plen));
                claimed = claim_ok(&mem, &mut model, packet_len);
                // What the body holds right after the reservation (the writer zeroed the
                // last word if there is padding); fills then overwrite parts of it.
                let body_at = model.tail as usize + DESCRIPTOR_SIZE;
                let mut body = wrapped(&data_snapshot(&mem), body_at, hlen + plen);
                let mut scratch = vec![0u8; len + 64];
                for f in fills.iter().take(16) {
                    let (region_len, base) = match f.region {
                        Region::Header => (hlen, 0),
                        Region::Payload => (plen, hlen),
                    };
                    let offset = f.offset as usize;
                    let n = (f.len as usize).min(len + 64);
                    for (i, b) in scratch[..n].iter_mut().enumerate() {
                        *b = f.seed.wrapping_add(i as u8);
                    }
                    let g = NoAlloc::start("WriteSlot::write_*");
                    let r = match f.region {
                        Region::Header => slot.write_header(offset, &scratch[..n]),
                        Region::Payload => slot.write_payload(offset, &scratch[..n]),
                    };
                    g.finish();
                    let fits = offset + n <= region_len;
                    match r {
                        Ok(()) => {
                            assert!(fits);
                            body[base + offset..base + offset + n].copy_from_slice(&scratch[..n]);
                        }
                        Err(WriteError::OutOfBounds {
                            offset: o,
                            len: l,
                            size,
                        }) => {
                            assert!(!fits);
                            assert_eq!((o, l, size), (offset, n, region_len));
                        }
                        Err(e) => panic!("unexpected slot error {e:?}"),
                    }
                }
                let sent = Sent {
                    start: model.tail,
                    packet_type: meta.packet_type,
                    flags: meta.flags,
                    transaction_id: meta.transaction_id,
                    header: body[..hlen].to_vec(),
                    payload: body[hlen..].to_vec(),
                    len: packet_len,
                };
                match end {
                    // An unfinished slot leaves the ring as it was: the tail stays put.
                    SlotEnd::Drop => {
                        let _ = slot;
                    }
                    SlotEnd::Finish => {
                        no_alloc("WriteSlot::finish", || slot.finish());
                        model.pending.push(sent);
                        model.tail = model.advance(model.tail, claimed);
                    }
                    SlotEnd::Commit => {
                        let s = no_alloc("WriteSlot::commit", || slot.commit());
                        model.pending.push(sent);
                        model.tail = model.advance(model.tail, claimed);
                        check_commit(&mem, &mut model, s, was_empty, mask);
                    }
                }
            }
            Action::Commit => {
                let s = no_alloc("Writer::commit", || writer.commit());
                check_commit(&mem, &mut model, s, was_empty, mask);
            }
            Action::Revert => {
                no_alloc("Writer::revert", || writer.revert());
                model.pending.clear();
                model.tail = model.published;
            }
            Action::PrepareWait {
                header,
                payload_len,
            } => {
                let hlen = header_len(*header, len);
                let plen = *payload_len as usize;
                let shape = expected_shape(&PacketMeta::in_band(), hlen, plen, len);
                let r = no_alloc("Writer::prepare_wait", || writer.prepare_wait(hlen, plen));
                let plen = match shape {
                    Err(e) => {
                        assert_eq!(r, Err(e), "prepare_wait on a bad shape");
                        finish_action(
                            &mem,
                            &writer,
                            &model,
                            &before,
                            owned_before,
                            tail_before,
                            0,
                            false,
                        );
                        continue;
                    }
                    Ok(plen) => plen,
                };
                // It commits first; on a corrupt ring the commit's signal is lost with the
                // error (the channel fails anyway), so check only the index then.
                match r {
                    Ok((_, signal)) => check_commit(&mem, &mut model, signal, was_empty, mask),
                    Err(_) => {
                        let had = !model.pending.is_empty();
                        model.commit();
                        if had {
                            assert_eq!(mem.load_control(ControlWord::WriteIndex), model.published);
                        }
                    }
                }
                let needed = plen + TRAILER_SIZE;
                let mut stored = false;
                let expect = (|| -> Result<WaitDecision, WriteError> {
                    model.refresh(&mem)?;
                    if model.free_cached() > needed {
                        return Ok(WaitDecision::Ready);
                    }
                    model.armed = true;
                    stored = true;
                    model.refresh(&mem)?;
                    if model.free_cached() > needed {
                        model.armed = false;
                        return Ok(WaitDecision::Ready);
                    }
                    Ok(WaitDecision::Sleep)
                })();
                assert_eq!(r.map(|(d, _)| d), expect, "prepare_wait answer");
                if stored && model.armed {
                    assert_eq!(
                        mem.load_control(ControlWord::PendingSendSize),
                        needed.max(len / 4) as u32,
                        "pending send size (with hysteresis)"
                    );
                }
                if model.behaved {
                    assert!(expect.is_ok(), "prepare_wait failed on a sane ring");
                    assert_eq!(expect == Ok(WaitDecision::Ready), model.free() > needed);
                }
            }
            Action::FreeSpace => {
                let r = no_alloc("Writer::free_space", || writer.free_space());
                let expect = model.refresh(&mem).map(|()| model.free_cached());
                assert_eq!(r, expect, "free_space answer");
                if model.behaved {
                    assert_eq!(r, Ok(model.free()));
                }
            }
        }
        finish_action(
            &mem,
            &writer,
            &model,
            &before,
            owned_before,
            tail_before,
            claimed,
            peer,
        );
    }
    // Publish what is pending and read it all back.
    let was_empty = mem.load_control(ControlWord::ReadIndex) == model.published;
    let mask = mem.load_control(ControlWord::InterruptMask);
    let s = no_alloc("Writer::commit", || writer.commit());
    check_commit(&mem, &mut model, s, was_empty, mask);
    read_back(&mem, &model);
}

/// Checks after every action.
#[allow(clippy::too_many_arguments)]
fn finish_action(
    mem: &HeapMem,
    writer: &Writer<&HeapMem>,
    model: &Model,
    before: &[u8],
    owned_before: [u32; 3],
    tail_before: u32,
    claimed: usize,
    peer: bool,
) {
    let published = writer.published_index();
    assert!(
        index_ok(model.len, published),
        "published write index {published:#x}"
    );
    assert_eq!(published, model.published);
    assert_eq!(writer.has_uncommitted(), !model.pending.is_empty());
    let pending: usize = model.pending.iter().map(Sent::footprint).sum();
    assert_eq!(model.tail, model.advance(model.published, pending));
    model.check_views();
    if !peer {
        assert_eq!(
            reader_owned(mem),
            owned_before,
            "writer stored a reader-owned word"
        );
        check_changes(model, before, &data_snapshot(mem), tail_before, claimed);
    }
}

/// What a write, push or reserve must answer: a shape error, a claim error, or the packet
/// length. Updates the model's view of the read index as the writer's does.
fn expect_claim(
    mem: &HeapMem,
    model: &mut Model,
    meta: &PacketMeta,
    header_len: usize,
    payload_len: usize,
) -> Result<usize, WriteError> {
    let plen = expected_shape(meta, header_len, payload_len, model.len)?;
    model.claim(mem, plen)?;
    Ok(plen)
}

/// A claim succeeded: checks it against free space and the pending send size, and returns
/// the bytes claimed.
fn claim_ok(mem: &HeapMem, model: &mut Model, plen: usize) -> usize {
    let claimed = plen + TRAILER_SIZE;
    // Strictly less than free, so full and empty never look alike and the writer never
    // reaches the read index it knows (nor, while the peer behaves, the real one).
    assert!(claimed < model.free_cached());
    if model.behaved {
        assert!(
            claimed < model.free(),
            "wrote {plen} bytes into {} free",
            model.free()
        );
    }
    // A successful reservation clears a pending send size we had armed.
    if model.armed {
        assert_eq!(mem.load_control(ControlWord::PendingSendSize), 0);
        model.armed = false;
    }
    claimed
}

fn check_commit(mem: &HeapMem, model: &mut Model, s: Signal, was_empty: bool, mask: u32) {
    let had = !model.pending.is_empty();
    model.commit();
    if had {
        assert_eq!(mem.load_control(ControlWord::WriteIndex), model.published);
        assert_eq!(s.is_needed(), was_empty && mask == 0, "commit signal");
    } else {
        assert_eq!(s, Signal::NONE);
    }
}

fn peer_act(mem: &HeapMem, model: &mut Model, action: &PeerAction) {
    let len = model.len;
    match action {
        PeerAction::Consume(n) => {
            if model.behaved {
                let r = model.consume(Some(*n as usize));
                mem.store_control(ControlWord::ReadIndex, r);
            }
        }
        PeerAction::ConsumeAll => {
            if model.behaved {
                let r = model.consume(None);
                mem.store_control(ControlWord::ReadIndex, r);
            }
        }
        PeerAction::SetReadIndex(v) => {
            let v = v.resolve(len);
            mem.store_control(ControlWord::ReadIndex, v);
            if model.behaved {
                let rel = distance(len, model.read, v);
                match model
                    .boundaries()
                    .iter()
                    .position(|&b| b == rel && index_ok(len, v))
                {
                    Some(k) => {
                        model.consume(Some(k));
                    }
                    None => model.behaved = false,
                }
            }
        }
        PeerAction::SetInterruptMask(v) => mem.store_control(ControlWord::InterruptMask, *v),
        PeerAction::SetPendingSendSize(v) => {
            mem.store_control(ControlWord::PendingSendSize, *v);
            // The writer cannot tell; stop checking that it cleared its own value.
            model.armed = false;
        }
        PeerAction::SetWriteIndex(v) => mem.store_control(ControlWord::WriteIndex, v.resolve(len)),
        PeerAction::SetFeatureBits(v) => mem.store_control(ControlWord::FeatureBits, *v),
        PeerAction::Scribble(s) => {
            if s.touches(len).any(|i| model.is_unread(i)) {
                model.behaved = false;
            }
            s.apply(mem);
        }
    }
}

fuzz_target!(|input: Input| run(&input));
