//! The writing half of a ring.

use crate::error::{Index, RingError, WriteError};
use crate::mem::{ControlWord, RingMem};
use crate::protocol::{
    DESCRIPTOR_SIZE, KNOWN_FLAGS, PacketDescriptor, PacketType, TRAILER_SIZE, max_packet_len,
    packet_len, trailer_for,
};
use crate::ring::{Geometry, Signal, WaitDecision, in_bounds, write_wrapped};
use crate::sync::{Ordering, fence};
use zerocopy::IntoBytes;

/// The descriptor fields of a packet, apart from its lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketMeta {
    /// The packet type.
    pub packet_type: PacketType,
    /// Packet flags ([`FLAG_COMPLETION_REQUESTED`](crate::protocol::FLAG_COMPLETION_REQUESTED)).
    pub flags: u16,
    /// Transaction id; readers may ignore it on in-band packets that ask for no completion.
    pub transaction_id: u64,
}

impl PacketMeta {
    /// An in-band packet that asks for no completion.
    pub const fn in_band() -> Self {
        Self {
            packet_type: PacketType::InBand,
            flags: 0,
            transaction_id: 0,
        }
    }
}

/// A packet to copy into the ring: descriptor fields, an optional extra header (GPA ranges,
/// transfer-page ranges; a multiple of 8 bytes) and a payload gathered from slices.
#[derive(Debug, Clone, Copy)]
pub struct OutgoingPacket<'a> {
    /// Descriptor fields.
    pub meta: PacketMeta,
    /// Bytes between the descriptor and the payload; `data_offset` points past them.
    pub header: &'a [u8],
    /// The payload, gathered from these slices in order and padded with zeros to 8 bytes.
    pub payload: &'a [&'a [u8]],
}

impl<'a> OutgoingPacket<'a> {
    /// An in-band packet carrying `payload`.
    pub const fn in_band(payload: &'a [&'a [u8]]) -> Self {
        Self {
            meta: PacketMeta::in_band(),
            header: &[],
            payload,
        }
    }

    fn payload_len(&self) -> usize {
        self.payload.iter().map(|p| p.len()).sum()
    }
}

/// The writing half of a ring: puts packets in, publishes them, and says when to signal.
///
/// Packets are appended with [`push`](Self::push) or written in place with
/// [`reserve`](Self::reserve); nothing is visible to the reader until
/// [`commit`](Self::commit) publishes all of them with one index store, and tells whether
/// the reader must be signalled. [`write`](Self::write) does both for a single packet.
///
/// The writer keeps its own indices: it never trusts the `write_index` it could read back,
/// caches the reader's index and re-reads it only when the cached value shows too little
/// space. The struct is aligned to 128 bytes so its state never shares a cache line with
/// the reader's.
#[repr(align(128))]
#[derive(Debug)]
pub struct Writer<M: RingMem> {
    mem: M,
    geo: Geometry,
    /// The write index last stored to the control page.
    published: u32,
    /// Where the next packet goes; ahead of `published` while packets await a commit.
    tail: u32,
    /// The reader's index as last read and validated.
    cached_read: u32,
    /// We stored a non-zero `pending_send_size` that is still in force.
    pending_armed: bool,
}

impl<M: RingMem> Writer<M> {
    /// Attaches a writer to a ring whose control page is initialised (see
    /// [`init_control`](crate::init_control)). Both indices are read once and validated.
    pub fn new(mem: M) -> Result<Self, RingError> {
        let geo = Geometry::new(mem.data_len())?;
        let write = geo.check_index(mem.load_control(ControlWord::WriteIndex), Index::Write)?;
        let read = geo.check_index(mem.load_control(ControlWord::ReadIndex), Index::Read)?;
        Ok(Self {
            mem,
            geo,
            published: write,
            tail: write,
            cached_read: read,
            pending_armed: false,
        })
    }

    /// The ring memory.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// Length of the data area in bytes.
    pub fn data_len(&self) -> usize {
        self.geo.len()
    }

    /// The largest packet (descriptor, header, padded payload) this ring carries.
    pub fn max_packet_len(&self) -> usize {
        max_packet_len(self.geo.len())
    }

    /// The write index as published to the reader.
    pub fn published_index(&self) -> u32 {
        self.published
    }

    /// True when packets have been added but not yet committed.
    pub fn has_uncommitted(&self) -> bool {
        self.tail != self.published
    }

    /// Free bytes after the packets added so far, re-reading the reader's index.
    pub fn free_space(&mut self) -> Result<usize, RingError> {
        self.refresh_read()?;
        Ok(self.free())
    }

    fn free(&self) -> usize {
        self.geo.free(self.tail, self.cached_read)
    }

    /// Re-reads the reader's index once and validates it: in range, aligned, and moved
    /// only forward, never past what we published.
    fn refresh_read(&mut self) -> Result<(), RingError> {
        let raw = self.mem.load_control(ControlWord::ReadIndex);
        let new = self.geo.check_index(raw, Index::Read)?;
        let old_used = self.geo.used(self.published, self.cached_read);
        let new_used = self.geo.used(self.published, new);
        if new_used > old_used {
            return Err(RingError::IndexMovedBackwards {
                index: Index::Read,
                old: self.cached_read,
                new,
            });
        }
        self.cached_read = new;
        Ok(())
    }

    /// Checks a packet's shape and returns its length (trailer excluded).
    fn packet_len_for(
        &self,
        meta: &PacketMeta,
        header_len: usize,
        payload_len: usize,
    ) -> Result<usize, WriteError> {
        if !header_len.is_multiple_of(8) {
            return Err(WriteError::HeaderMisaligned { len: header_len });
        }
        if meta.flags & !KNOWN_FLAGS != 0 {
            return Err(WriteError::UnknownFlags { flags: meta.flags });
        }
        let max = self.max_packet_len();
        match packet_len(header_len, payload_len) {
            Some(len) if len <= max => Ok(len),
            len => Err(WriteError::TooLarge {
                len: len.unwrap_or(usize::MAX),
                max,
            }),
        }
    }

    /// Finds room for a packet of `len` bytes plus its trailer at the tail.
    fn claim(&mut self, len: usize) -> Result<(), WriteError> {
        let needed = len + TRAILER_SIZE;
        // Free space must exceed the packet so that full and empty never look alike.
        if self.free() <= needed {
            self.refresh_read()?;
            if self.free() <= needed {
                return Err(WriteError::Full {
                    needed,
                    free: self.free(),
                });
            }
        }
        if self.pending_armed {
            self.mem.store_control(ControlWord::PendingSendSize, 0);
            self.pending_armed = false;
        }
        Ok(())
    }

    /// Reserves a packet at the tail to be filled in place: `header_len` bytes of extra
    /// header (a multiple of 8) and `payload_len` bytes of payload.
    ///
    /// The descriptor and the zero padding are written now; fill the header and payload
    /// through the returned slot, then [`finish`](WriteSlot::finish) it (or
    /// [`commit`](WriteSlot::commit) it to publish at once). A slot dropped unfinished
    /// leaves the ring as it was.
    pub fn reserve(
        &mut self,
        meta: PacketMeta,
        header_len: usize,
        payload_len: usize,
    ) -> Result<WriteSlot<'_, M>, WriteError> {
        let len = self.packet_len_for(&meta, header_len, payload_len)?;
        self.claim(len)?;
        let start = self.tail;
        let descriptor = PacketDescriptor {
            packet_type: meta.packet_type.raw(),
            // Both fit: `len <= 524_280` bytes, i.e. at most u16::MAX 8-byte units.
            data_offset8: ((DESCRIPTOR_SIZE + header_len) / 8) as u16,
            length8: (len / 8) as u16,
            flags: meta.flags,
            transaction_id: meta.transaction_id,
        };
        write_wrapped(&self.mem, self.geo, start, descriptor.as_bytes());
        let body_len = header_len + payload_len;
        if !body_len.is_multiple_of(8) {
            // Zero the last word so the padding is zero whatever the ring held before.
            let last = self.geo.advance(start, len - 8);
            write_wrapped(&self.mem, self.geo, last, &[0; 8]);
        }
        Ok(WriteSlot {
            writer: self,
            start,
            len,
            header_len,
            payload_len,
        })
    }

    /// Appends a packet without publishing it; [`commit`](Self::commit) publishes.
    pub fn push(&mut self, packet: &OutgoingPacket<'_>) -> Result<(), WriteError> {
        let mut slot = self.reserve(packet.meta, packet.header.len(), packet.payload_len())?;
        slot.write_header(0, packet.header)?;
        let mut at = 0;
        for part in packet.payload {
            slot.write_payload(at, part)?;
            at += part.len();
        }
        slot.finish();
        Ok(())
    }

    /// Writes one packet and publishes it (with any packets pushed before it).
    pub fn write(&mut self, packet: &OutgoingPacket<'_>) -> Result<Signal, WriteError> {
        self.push(packet)?;
        Ok(self.commit())
    }

    /// Publishes every packet added since the last commit with one index store, and says
    /// whether the reader must be signalled: only when the ring was empty before (the reader
    /// had consumed everything published) and the reader has not masked interrupts.
    pub fn commit(&mut self) -> Signal {
        if self.tail == self.published {
            return Signal::NONE;
        }
        let old = self.published;
        self.mem.store_control(ControlWord::WriteIndex, self.tail);
        self.published = self.tail;
        // Pairs with the reader's fence in `Reader::prepare_wait`: either we see its unmask
        // and its read index, or it sees our new write index (hv_need_to_signal in Linux).
        fence(Ordering::SeqCst);
        if self.mem.load_control(ControlWord::InterruptMask) != 0 {
            return Signal::NONE;
        }
        let read = self.mem.load_control(ControlWord::ReadIndex);
        if read == old {
            Signal::NEEDED
        } else {
            Signal::NONE
        }
    }

    /// Drops every packet added since the last commit.
    pub fn revert(&mut self) {
        self.tail = self.published;
    }

    /// Prepares to sleep until a packet with `header_len` bytes of extra header and
    /// `payload_len` bytes of payload fits (the sizes [`reserve`](Self::reserve) takes).
    ///
    /// Publishes any uncommitted packets first (their signal is returned), then sets
    /// `pending_send_size` (with hysteresis: at least a quarter of the ring), issues a full
    /// fence and looks at the reader's index once more. On [`WaitDecision::Sleep`] the
    /// reader is obliged to signal once enough space is free; sleep with a bounded timeout
    /// all the same, as peers that ignore `pending_send_size` exist. The next successful
    /// reservation clears `pending_send_size`.
    pub fn prepare_wait(
        &mut self,
        header_len: usize,
        payload_len: usize,
    ) -> Result<(WaitDecision, Signal), WriteError> {
        let len = self.packet_len_for(&PacketMeta::in_band(), header_len, payload_len)?;
        let signal = self.commit();
        let needed = len + TRAILER_SIZE;
        self.refresh_read()?;
        if self.free() > needed {
            return Ok((WaitDecision::Ready, signal));
        }
        let pending = needed.max(self.geo.len() / 4);
        // `needed <= data_len - 8` and the data length fits in u32.
        self.mem
            .store_control(ControlWord::PendingSendSize, pending as u32);
        self.pending_armed = true;
        // Pairs with the reader's fence in `Reader::commit`: either it sees the pending size
        // or we see the space it freed.
        fence(Ordering::SeqCst);
        self.refresh_read()?;
        if self.free() > needed {
            self.mem.store_control(ControlWord::PendingSendSize, 0);
            self.pending_armed = false;
            return Ok((WaitDecision::Ready, signal));
        }
        Ok((WaitDecision::Sleep, signal))
    }
}

/// A packet reserved in the ring, filled in place before it is finished.
///
/// Offsets are relative to the extra header ([`write_header`](Self::write_header)) or to
/// the payload ([`write_payload`](Self::write_payload)); writes wrap around the end of the
/// ring transparently.
#[derive(Debug)]
pub struct WriteSlot<'w, M: RingMem> {
    writer: &'w mut Writer<M>,
    start: u32,
    len: usize,
    header_len: usize,
    payload_len: usize,
}

impl<'w, M: RingMem> WriteSlot<'w, M> {
    /// Length of the extra header.
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// Length of the payload (before padding).
    pub fn payload_len(&self) -> usize {
        self.payload_len
    }

    /// Where the packet starts in the data area.
    pub fn offset(&self) -> u32 {
        self.start
    }

    fn write_body(&mut self, body_offset: usize, data: &[u8]) {
        let at = self
            .writer
            .geo
            .advance(self.start, DESCRIPTOR_SIZE + body_offset);
        write_wrapped(&self.writer.mem, self.writer.geo, at, data);
    }

    /// Writes `data` into the extra header at `offset`.
    pub fn write_header(&mut self, offset: usize, data: &[u8]) -> Result<(), WriteError> {
        if !in_bounds(offset, data.len(), self.header_len) {
            return Err(WriteError::OutOfBounds {
                offset,
                len: data.len(),
                size: self.header_len,
            });
        }
        self.write_body(offset, data);
        Ok(())
    }

    /// Writes `data` into the payload at `offset`.
    pub fn write_payload(&mut self, offset: usize, data: &[u8]) -> Result<(), WriteError> {
        if !in_bounds(offset, data.len(), self.payload_len) {
            return Err(WriteError::OutOfBounds {
                offset,
                len: data.len(),
                size: self.payload_len,
            });
        }
        self.write_body(self.header_len + offset, data);
        Ok(())
    }

    /// Ends the packet: writes its trailer and moves the tail past it. The packet is
    /// published by the writer's next commit.
    pub fn finish(self) {
        self.seal();
    }

    /// Ends the packet and publishes it with everything pushed before it.
    pub fn commit(self) -> Signal {
        self.seal().commit()
    }

    fn seal(self) -> &'w mut Writer<M> {
        let WriteSlot {
            writer, start, len, ..
        } = self;
        let trailer_at = writer.geo.advance(start, len);
        write_wrapped(
            &writer.mem,
            writer.geo,
            trailer_at,
            &trailer_for(start).to_le_bytes(),
        );
        writer.tail = writer.geo.advance(trailer_at, TRAILER_SIZE);
        writer
    }
}
