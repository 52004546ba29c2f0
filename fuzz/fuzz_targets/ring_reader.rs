//! Our `Reader` against a hostile writer.
//!
//! The input is a control page (raw or nudged-valid words), a data area of 1 to 4 pages
//! (hand-built packets over a fill pattern, then raw scribbles), and a sequence of actions:
//! our reader's calls interleaved with the peer rewriting indices, control words and data
//! bytes between our steps — also while we hold a packet open.
//!
//! Asserted, beyond "no panic" (every call returning is enforced by libFuzzer's -timeout):
//! - every packet the reader hands out starts where the reader's cursor is, matches the
//!   descriptor in memory, and satisfies header + payload + 16 + 8 <= data length;
//! - no packet ends past the furthest write index a rule-following reader can have accepted
//!   (the peer's valid stores that moved forward), so bytes consumed between commits never
//!   exceed data length - 8; `published_index()` always equals a model of our cursor;
//! - a rejected packet (Err) leaves `published_index()` and `has_uncommitted()` unchanged,
//!   and `peek()` keeps returning the same result until the peer writes or we move;
//! - reads from an open packet succeed exactly when in bounds and return exactly the ring
//!   bytes; `packet(&info)` reopens exactly when the cursor has not moved since;
//! - the reader never writes a word it does not own (write index, pending send size,
//!   feature bits) nor any data byte;
//! - no library call allocates (so nothing is sized by the peer).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmlink_fuzz::{
    ControlPage, IndexValue, NoAlloc, PeerPacket, Scribble, data_len_for, data_snapshot, distance,
    image_with_control, index_ok, no_alloc, wrapped, write_wrapped_peer,
};
use vmlink_ring::protocol::{CONTROL_PAGE_SIZE, DESCRIPTOR_SIZE, TRAILER_SIZE};
use vmlink_ring::{
    ControlWord, HeapMem, Index, PacketInfo, ReadError, Reader, RingError, RingMem, Signal,
    WaitDecision,
};

#[derive(Arbitrary, Debug)]
struct Input {
    pages: u8,
    control: ControlPage,
    ring: RingContents,
    actions: Vec<Action>,
}

/// What the data area holds when we attach.
#[derive(Arbitrary, Debug)]
struct RingContents {
    /// Every data byte starts as this.
    fill: u8,
    /// Packets written back to back from the read index.
    packets: Vec<PeerPacket>,
    /// Set the write index to the end of `packets` (a writer that behaved so far).
    publish_packets: bool,
    /// Raw bytes written last.
    scribbles: Vec<Scribble>,
}

#[derive(Arbitrary, Debug)]
enum PeerAction {
    SetWriteIndex(IndexValue),
    SetReadIndex(IndexValue),
    SetInterruptMask(u32),
    SetPendingSendSize(u32),
    SetFeatureBits(u32),
    Scribble(Scribble),
    /// Writes a packet at the current write index (nudged valid) and maybe publishes it.
    AppendPacket {
        packet: PeerPacket,
        publish: bool,
    },
}

#[derive(Arbitrary, Debug)]
enum Source {
    Peek,
    Saved(u8),
}

#[derive(Arbitrary, Debug)]
enum PacketOp {
    ReadPayload { offset: u32, len: u16 },
    ReadHeader { offset: u32, len: u16 },
    Peer(PeerAction),
}

#[derive(Arbitrary, Debug)]
enum Action {
    Peek,
    PeekInfo,
    Open {
        source: Source,
        ops: Vec<PacketOp>,
        consume: bool,
    },
    Commit,
    Revert,
    PrepareWait,
    MaskInterrupts,
    Available,
    ReadInto {
        capacity: u16,
    },
    Peer(PeerAction),
}

/// What we know the reader's private state must be.
struct Model {
    len: usize,
    /// Read index as published.
    published: u32,
    /// Where the next packet starts.
    head: u32,
    /// Bumped on every consume and revert, like the reader's epoch.
    epoch: u64,
    /// Bytes consumed since the last commit.
    consumed: usize,
    /// The last `peek` result, while neither the peer nor we changed anything it depends on.
    last_peek: Option<Result<Option<PacketInfo>, RingError>>,
    /// Infos from `peek_info`, with the model epoch they were taken at.
    saved: Vec<(PacketInfo, u64)>,
    /// The furthest write index a reader following the rules can have accepted: each valid
    /// value the write index held while a reader call could read it, taken only if it is
    /// forward of this one as seen from our published index at that moment. Whenever the
    /// reader re-reads the index it can only end up at or behind this, so no packet it hands
    /// out may end past it.
    extent: u32,
}

impl Model {
    fn forget_peek(&mut self) {
        self.last_peek = None;
    }

    /// A reader call may read the write index as it is now.
    fn observe_write_index(&mut self, mem: &HeapMem) {
        let w = mem.load_control(ControlWord::WriteIndex);
        let p = self.published;
        if index_ok(self.len, w) && distance(self.len, p, w) >= distance(self.len, p, self.extent) {
            self.extent = w;
        }
    }

    /// Bytes from our published index to the furthest write index we may know.
    fn known(&self) -> usize {
        distance(self.len, self.published, self.extent)
    }

    fn consume(&mut self, info: &PacketInfo) {
        let n = info.packet_len() + TRAILER_SIZE;
        self.head = ((self.head as usize + n) % self.len) as u32;
        self.consumed += n;
        assert!(
            self.consumed <= self.known() && self.known() <= self.len - 8,
            "consumed {} bytes since the last commit of a {}-byte ring ({} known published)",
            self.consumed,
            self.len,
            self.known()
        );
        self.epoch += 1;
        self.forget_peek();
    }

    fn committed(&mut self) {
        self.published = self.head;
        self.consumed = 0;
        self.forget_peek();
    }
}

/// Owned control words the reader must never store to.
fn writer_owned(mem: &HeapMem) -> [u32; 3] {
    [
        mem.load_control(ControlWord::WriteIndex),
        mem.load_control(ControlWord::PendingSendSize),
        mem.load_control(ControlWord::FeatureBits),
    ]
}

fn peer_act(mem: &HeapMem, model: &mut Model, action: &PeerAction) {
    let len = model.len;
    match action {
        PeerAction::SetWriteIndex(v) => {
            let w = v.resolve(len);
            mem.store_control(ControlWord::WriteIndex, w);
        }
        PeerAction::SetReadIndex(v) => mem.store_control(ControlWord::ReadIndex, v.resolve(len)),
        PeerAction::SetInterruptMask(v) => mem.store_control(ControlWord::InterruptMask, *v),
        PeerAction::SetPendingSendSize(v) => mem.store_control(ControlWord::PendingSendSize, *v),
        PeerAction::SetFeatureBits(v) => mem.store_control(ControlWord::FeatureBits, *v),
        PeerAction::Scribble(s) => s.apply(mem),
        PeerAction::AppendPacket { packet, publish } => {
            let at = (mem.load_control(ControlWord::WriteIndex) as usize % len) & !7;
            let bytes = packet.encode(len, at as u32);
            write_wrapped_peer(mem, at, &bytes);
            if *publish {
                let end = ((at + bytes.len().div_ceil(8) * 8) % len) as u32;
                mem.store_control(ControlWord::WriteIndex, end);
            }
        }
    }
    model.forget_peek();
}

/// Checks a packet the reader handed out against the model and the ring's bytes.
fn check_info(mem: &HeapMem, model: &Model, info: &PacketInfo) {
    let len = model.len;
    assert_eq!(
        info.offset(),
        model.head,
        "packet not at the reader's cursor"
    );
    assert!(
        info.header_len() + info.payload_len() + DESCRIPTOR_SIZE + TRAILER_SIZE <= len,
        "packet {info:?} larger than the {len}-byte data area"
    );
    assert_eq!(
        info.packet_len(),
        DESCRIPTOR_SIZE + info.header_len() + info.payload_len()
    );
    assert_eq!(info.header_len() % 8, 0);
    assert_eq!(info.payload_len() % 8, 0);
    assert!(
        model.consumed + info.packet_len() + TRAILER_SIZE <= model.known(),
        "packet {info:?} runs past the furthest write index the reader may accept \
         ({} consumed, {} known)",
        model.consumed,
        model.known()
    );
    assert_eq!(info.flags() & !1, 0, "unknown flags accepted");
    assert_eq!(info.completion_requested(), info.flags() & 1 != 0);
    // The descriptor, as it is in memory now (nobody wrote since the reader read it).
    let data = data_snapshot(mem);
    let d = wrapped(&data, info.offset() as usize, DESCRIPTOR_SIZE);
    let u16_at = |i: usize| u16::from_le_bytes([d[i], d[i + 1]]);
    assert_eq!(u16_at(0), info.packet_type().raw());
    assert_eq!(u16_at(2) as usize * 8, DESCRIPTOR_SIZE + info.header_len());
    assert_eq!(u16_at(4) as usize * 8, info.packet_len());
    assert_eq!(u16_at(6), info.flags());
    assert_eq!(
        u64::from_le_bytes(d[8..16].try_into().unwrap()),
        info.transaction_id()
    );
}

/// A peek-like call returned `result`; check it against the model, including that the
/// same call without any change in between gives the same answer.
fn check_peek(mem: &HeapMem, model: &mut Model, result: &Result<Option<PacketInfo>, RingError>) {
    if let Some(prev) = &model.last_peek {
        assert_eq!(prev, result, "peek changed its answer with nothing written");
    }
    match result {
        Ok(Some(info)) => check_info(mem, model, info),
        Ok(None) => {}
        Err(e) => check_error(mem, model, e),
    }
    model.last_peek = Some(*result);
}

/// Checks that an error names what is really wrong, as far as memory shows it.
fn check_error(mem: &HeapMem, model: &Model, e: &RingError) {
    let len = model.len;
    let write = mem.load_control(ControlWord::WriteIndex);
    match *e {
        RingError::IndexOutOfRange {
            index,
            value,
            data_len,
        } => {
            assert_eq!(index, Index::Write);
            assert_eq!(value, write);
            assert_eq!(data_len as usize, len);
            assert!(value as usize >= len);
        }
        RingError::IndexMisaligned { index, value } => {
            assert_eq!(index, Index::Write);
            assert_eq!(value, write);
            assert!((value as usize) < len && value % 8 != 0);
        }
        RingError::IndexMovedBackwards { index, new, .. } => {
            assert_eq!(index, Index::Write);
            assert_eq!(new, write);
        }
        RingError::TruncatedPacket { offset, available }
        | RingError::LengthPastAvailable {
            offset, available, ..
        } => {
            assert_eq!(offset, model.head);
            assert!(available as usize + model.consumed <= model.known());
        }
        RingError::UnknownPacketType { offset, .. }
        | RingError::UnknownFlags { offset, .. }
        | RingError::DataOffsetTooSmall { offset, .. }
        | RingError::DataOffsetPastLength { offset, .. } => assert_eq!(offset, model.head),
        _ => panic!("unexpected error from the reader: {e:?}"),
    }
}

fn check_state(reader: &Reader<&HeapMem>, model: &Model) {
    assert_eq!(reader.published_index(), model.published);
    assert_eq!(reader.has_uncommitted(), model.head != model.published);
    assert!(index_ok(model.len, reader.published_index()));
}

/// Length for a read buffer: ours, never the peer's, and bounded.
fn buf_len(model: &Model, len: u16) -> usize {
    (len as usize).min(model.len + 16)
}

fn run(input: &Input) {
    let len = data_len_for(input.pages);
    let mut image = image_with_control(len, &input.control);
    {
        let data = &mut image[CONTROL_PAGE_SIZE..];
        data.fill(input.ring.fill);
        let read = input.control.read_index.resolve(len);
        let mut at = (read as usize % len) & !7;
        for p in input.ring.packets.iter().take(64) {
            let bytes = p.encode(len, at as u32);
            for (i, b) in bytes.iter().enumerate() {
                data[(at + i) % len] = *b;
            }
            at = (at + bytes.len().div_ceil(8) * 8) % len;
        }
        if input.ring.publish_packets && !input.ring.packets.is_empty() {
            image[..4].copy_from_slice(&(at as u32).to_le_bytes());
        }
    }
    let mem = HeapMem::from_image(&image).expect("a well-sized image");
    for s in &input.ring.scribbles {
        s.apply(&mem);
    }

    let raw_read = mem.load_control(ControlWord::ReadIndex);
    let raw_write = mem.load_control(ControlWord::WriteIndex);
    let reader = no_alloc("Reader::new", || Reader::new(&mem));
    let mut reader = match reader {
        Ok(r) => {
            assert!(index_ok(len, raw_read) && index_ok(len, raw_write));
            r
        }
        Err(_) => {
            assert!(!index_ok(len, raw_read) || !index_ok(len, raw_write));
            return;
        }
    };
    assert_eq!(reader.data_len(), len);
    let mut model = Model {
        len,
        published: raw_read,
        head: raw_read,
        epoch: 0,
        consumed: 0,
        last_peek: None,
        saved: Vec::new(),
        extent: raw_write,
    };
    // Ours: never sized by the peer.
    let mut scratch = vec![0u8; len + 16];

    for action in input.actions.iter().take(256) {
        model.observe_write_index(&mem);
        let owned_before = writer_owned(&mem);
        let data_before = data_snapshot(&mem);
        let mut peer_wrote = false;
        match action {
            Action::Peer(p) => {
                peer_act(&mem, &mut model, p);
                peer_wrote = true;
            }
            Action::Peek => {
                let g = NoAlloc::start("Reader::peek");
                let r = reader.peek().map(|p| p.map(|p| *p.info()));
                g.finish();
                check_peek(&mem, &mut model, &r);
                if r.is_err() {
                    // The rejection left everything as it was.
                    check_state(&reader, &model);
                    let again = no_alloc("Reader::peek", || {
                        reader.peek().map(|p| p.map(|p| *p.info()))
                    });
                    assert_eq!(again, r, "a rejected packet changed the next peek");
                }
            }
            Action::PeekInfo => {
                let r = no_alloc("Reader::peek_info", || reader.peek_info());
                check_peek(&mem, &mut model, &r);
                if let Ok(Some(info)) = r {
                    if model.saved.len() == 4 {
                        model.saved.remove(0);
                    }
                    model.saved.push((info, model.epoch));
                }
            }
            Action::Open {
                source,
                ops,
                consume,
            } => {
                let info = match source {
                    Source::Peek => {
                        let r = no_alloc("Reader::peek", || {
                            reader.peek().map(|p| p.map(|p| *p.info()))
                        });
                        check_peek(&mem, &mut model, &r);
                        match r {
                            Ok(Some(info)) => info,
                            _ => continue,
                        }
                    }
                    Source::Saved(i) => {
                        if model.saved.is_empty() {
                            continue;
                        }
                        let (info, epoch) = model.saved[*i as usize % model.saved.len()];
                        let g = NoAlloc::start("Reader::packet");
                        let reopened = reader.packet(&info).map(|p| *p.info());
                        g.finish();
                        assert_eq!(
                            reopened.is_some(),
                            epoch == model.epoch,
                            "packet(&info) must reopen exactly while the cursor has not moved"
                        );
                        match reopened {
                            Some(i) => {
                                assert_eq!(i, info);
                                info
                            }
                            None => continue,
                        }
                    }
                };
                for op in ops.iter().take(32) {
                    let (is_header, offset, n) = match op {
                        PacketOp::Peer(p) => {
                            peer_act(&mem, &mut model, p);
                            peer_wrote = true;
                            continue;
                        }
                        PacketOp::ReadPayload { offset, len } => {
                            (false, *offset, buf_len(&model, *len))
                        }
                        PacketOp::ReadHeader { offset, len } => {
                            (true, *offset, buf_len(&model, *len))
                        }
                    };
                    let offset = offset as usize;
                    let buf = &mut scratch[..n];
                    let packet = reader.packet(&info).expect("the cursor has not moved");
                    let g = NoAlloc::start("IncomingPacket::read_*");
                    let r = if is_header {
                        packet.read_header(offset, buf)
                    } else {
                        packet.read_payload(offset, buf)
                    };
                    g.finish();
                    let (region, base) = if is_header {
                        (info.header_len(), DESCRIPTOR_SIZE)
                    } else {
                        (info.payload_len(), DESCRIPTOR_SIZE + info.header_len())
                    };
                    let fits = offset.checked_add(n).is_some_and(|end| end <= region);
                    match r {
                        Ok(()) => {
                            assert!(fits, "read of {n} at {offset} from a {region}-byte region");
                            let data = data_snapshot(&mem);
                            let expect = wrapped(&data, info.offset() as usize + base + offset, n);
                            assert_eq!(
                                &scratch[..n],
                                &expect[..],
                                "read returned other bytes than the ring holds"
                            );
                        }
                        Err(ReadError::OutOfBounds {
                            offset: o,
                            len: l,
                            size,
                        }) => {
                            assert!(!fits);
                            assert_eq!((o, l, size), (offset, n, region));
                        }
                        Err(e) => panic!("unexpected read error {e:?}"),
                    }
                }
                if *consume {
                    let packet = reader.packet(&info).expect("the cursor has not moved");
                    no_alloc("IncomingPacket::consume", || packet.consume());
                    model.consume(&info);
                }
            }
            Action::Commit => {
                let pending = mem.load_control(ControlWord::PendingSendSize);
                let had = model.head != model.published;
                let s = no_alloc("Reader::commit", || reader.commit());
                if pending == 0 || !had {
                    assert_eq!(s, Signal::NONE, "signalled a writer that asked for nothing");
                }
                if had {
                    assert_eq!(mem.load_control(ControlWord::ReadIndex), model.head);
                }
                model.committed();
            }
            Action::Revert => {
                no_alloc("Reader::revert", || reader.revert());
                model.head = model.published;
                model.consumed = 0;
                model.epoch += 1;
                model.forget_peek();
            }
            Action::PrepareWait => {
                let had = model.head != model.published;
                let r = no_alloc("Reader::prepare_wait", || reader.prepare_wait());
                // It commits first, whatever the writer's index says.
                if had {
                    assert_eq!(mem.load_control(ControlWord::ReadIndex), model.head);
                }
                model.committed();
                // It re-reads the write index after that commit.
                model.observe_write_index(&mem);
                assert_eq!(mem.load_control(ControlWord::InterruptMask), 0);
                let write = mem.load_control(ControlWord::WriteIndex);
                match r {
                    Ok((decision, _)) => {
                        assert!(index_ok(len, write));
                        let ready = write != model.head;
                        assert_eq!(decision == WaitDecision::Ready, ready);
                    }
                    Err(e) => check_error(&mem, &model, &e),
                }
            }
            Action::MaskInterrupts => {
                no_alloc("Reader::mask_interrupts", || reader.mask_interrupts());
                assert_ne!(mem.load_control(ControlWord::InterruptMask), 0);
            }
            Action::Available => {
                let r = no_alloc("Reader::available", || reader.available());
                let write = mem.load_control(ControlWord::WriteIndex);
                match r {
                    Ok(n) => {
                        assert!(index_ok(len, write));
                        assert_eq!(n, distance(len, model.head, write));
                        assert!(n + model.consumed <= model.known());
                    }
                    Err(e) => check_error(&mem, &model, &e),
                }
                model.forget_peek();
            }
            Action::ReadInto { capacity } => {
                let cap = buf_len(&model, *capacity);
                let buf = &mut scratch[..cap];
                let r = no_alloc("Reader::read_into", || reader.read_into(buf));
                match r {
                    Ok(Some((info, _signal))) => {
                        check_peek(&mem, &mut model, &Ok(Some(info)));
                        let data = data_snapshot(&mem);
                        let at = info.offset() as usize + DESCRIPTOR_SIZE + info.header_len();
                        let expect = wrapped(&data, at, info.payload_len());
                        assert_eq!(&scratch[..info.payload_len()], &expect[..]);
                        model.consume(&info);
                        assert_eq!(mem.load_control(ControlWord::ReadIndex), model.head);
                        model.committed();
                    }
                    Ok(None) => check_peek(&mem, &mut model, &Ok(None)),
                    Err(ReadError::BufferTooSmall { needed, capacity }) => {
                        assert_eq!(capacity, cap);
                        assert!(needed > cap);
                        let next = no_alloc("Reader::peek_info", || reader.peek_info());
                        match next {
                            Ok(Some(info)) => assert_eq!(info.payload_len(), needed),
                            other => panic!("BufferTooSmall, then peek gave {other:?}"),
                        }
                        check_peek(&mem, &mut model, &next);
                    }
                    Err(ReadError::Corrupt(e)) => {
                        check_peek(&mem, &mut model, &Err(e));
                        check_state(&reader, &model);
                        let again = no_alloc("Reader::peek", || {
                            reader.peek().map(|p| p.map(|p| *p.info()))
                        });
                        assert_eq!(again, Err(e), "a rejected packet changed the next peek");
                    }
                    Err(e) => panic!("unexpected read_into error {e:?}"),
                }
            }
        }
        check_state(&reader, &model);
        if !peer_wrote {
            // The reader stores only the words it owns, and never data bytes.
            assert_eq!(
                writer_owned(&mem),
                owned_before,
                "reader wrote a writer-owned word"
            );
            assert!(
                data_snapshot(&mem) == data_before,
                "reader wrote to the data area"
            );
        }
    }
}

fuzz_target!(|input: Input| run(&input));
