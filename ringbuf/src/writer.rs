//! The writing half of a ring.

use crate::error::{Index, RingError, WriteError};
use crate::header::{GpaHeader, PacketError, TransferPagesHeader};
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

/// The payload of an [`OutgoingPacket`]: one slice, or several gathered in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload<'a> {
    /// One contiguous slice.
    Bytes(&'a [u8]),
    /// Slices gathered in order, as if they were one.
    Gather(&'a [&'a [u8]]),
}

impl Payload<'_> {
    /// No payload.
    pub const EMPTY: Payload<'static> = Payload::Bytes(&[]);

    /// Length in bytes (before padding); `usize::MAX` if the gathered lengths overflow,
    /// which no ring carries.
    #[inline]
    pub fn len(&self) -> usize {
        match self {
            Payload::Bytes(bytes) => bytes.len(),
            Payload::Gather(parts) => parts.iter().fold(0, |n, p| n.saturating_add(p.len())),
        }
    }

    /// True when there are no bytes.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for Payload<'_> {
    fn default() -> Self {
        Payload::EMPTY
    }
}

impl<'a> From<&'a [u8]> for Payload<'a> {
    fn from(bytes: &'a [u8]) -> Self {
        Payload::Bytes(bytes)
    }
}

impl<'a, const N: usize> From<&'a [u8; N]> for Payload<'a> {
    fn from(bytes: &'a [u8; N]) -> Self {
        Payload::Bytes(bytes)
    }
}

impl<'a> From<&'a [&'a [u8]]> for Payload<'a> {
    fn from(parts: &'a [&'a [u8]]) -> Self {
        Payload::Gather(parts)
    }
}

/// A packet to copy into the ring: descriptor fields, an optional extra header (GPA ranges,
/// transfer-page ranges; a multiple of 8 bytes) and a payload.
///
/// ```
/// use vmlink_ring::header::{GpaHeader, GpaRange};
/// use vmlink_ring::{HeapMem, OutgoingPacket, Reader, Writer};
/// use vmlink_ring::protocol::PacketType;
///
/// let ring = HeapMem::new(4 * 4096)?;
/// let (mut writer, mut reader) = (Writer::new(&ring)?, Reader::new(&ring)?);
/// writer.push(&OutgoingPacket::in_band_slice(b"one slice"))?;
///
/// let ranges = [GpaRange { byte_offset: 0, byte_count: 4096, pages: &[9] }];
/// let mut scratch = [0u8; 32];
/// let packet = OutgoingPacket::gpa_direct(&GpaHeader::new(&ranges, None)?, &mut scratch, b"tag")?;
/// let _signal = writer.write(&packet)?;
///
/// assert_eq!(reader.peek()?.expect("in-band").info().payload_len(), 16);
/// reader.peek()?.expect("in-band").consume();
/// let gpa = reader.peek()?.expect("GPA direct");
/// assert_eq!(gpa.info().packet_type(), PacketType::GpaDirect);
/// assert_eq!(gpa.info().header_len(), 24);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct OutgoingPacket<'a> {
    /// Descriptor fields.
    pub meta: PacketMeta,
    /// Bytes between the descriptor and the payload; `data_offset` points past them.
    pub header: &'a [u8],
    /// The payload, padded with zeros to 8 bytes.
    pub payload: Payload<'a>,
}

impl<'a> OutgoingPacket<'a> {
    /// An in-band packet carrying the concatenation of `payload`'s slices.
    pub const fn in_band(payload: &'a [&'a [u8]]) -> Self {
        Self {
            meta: PacketMeta::in_band(),
            header: &[],
            payload: Payload::Gather(payload),
        }
    }

    /// An in-band packet carrying `payload`.
    pub const fn in_band_slice(payload: &'a [u8]) -> Self {
        Self {
            meta: PacketMeta::in_band(),
            header: &[],
            payload: Payload::Bytes(payload),
        }
    }

    /// A completion of the request with transaction id `tid`, carrying `payload`.
    pub const fn completion_slice(tid: u64, payload: &'a [u8]) -> Self {
        Self {
            meta: PacketMeta {
                packet_type: PacketType::Completion,
                flags: 0,
                transaction_id: tid,
            },
            header: &[],
            payload: Payload::Bytes(payload),
        }
    }

    /// A GPA-direct packet: `header`'s bytes, written into the front of `scratch`, then
    /// `payload`. It asks for no completion; set [`meta`](Self::meta)'s flags and
    /// transaction id for a request.
    pub fn gpa_direct(
        header: &GpaHeader<'_>,
        scratch: &'a mut [u8],
        payload: &'a [u8],
    ) -> Result<Self, PacketError> {
        Ok(Self {
            meta: PacketMeta {
                packet_type: PacketType::GpaDirect,
                ..PacketMeta::in_band()
            },
            header: header.write_to(scratch)?,
            payload: Payload::Bytes(payload),
        })
    }

    /// A transfer-page packet: `header`'s bytes, written into the front of `scratch`, then
    /// `payload`. It asks for no completion; set [`meta`](Self::meta)'s flags and
    /// transaction id for a request.
    pub fn transfer_pages(
        header: &TransferPagesHeader<'_>,
        scratch: &'a mut [u8],
        payload: &'a [u8],
    ) -> Result<Self, PacketError> {
        Ok(Self {
            meta: PacketMeta {
                packet_type: PacketType::TransferPages,
                ..PacketMeta::in_band()
            },
            header: header.write_to(scratch)?,
            payload: Payload::Bytes(payload),
        })
    }

    /// The packet's length in the ring (descriptor, header and padded payload; trailer
    /// excluded); `None` on overflow.
    #[inline]
    pub fn packet_len(&self) -> Option<usize> {
        packet_len(self.header.len(), self.payload.len())
    }
}

/// A packet written exactly as given, descriptor included, for tests, fuzzers and probes
/// that play a peer breaking the rules (see [`Writer::push_raw`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct RawPacket<'a> {
    /// Written as is: any type, flags, data offset and length, valid or not.
    pub descriptor: PacketDescriptor,
    /// Everything after the descriptor (extra header and payload), padded with zeros to 8
    /// bytes. Its length, not the descriptor's, is what the packet takes in the ring.
    pub body: &'a [u8],
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
        let descriptor = descriptor_for(&meta, header_len, len);
        Ok(self.start_packet(&descriptor, len, header_len, payload_len))
    }

    /// Writes the descriptor and the zero padding of a `len`-byte packet whose room was
    /// claimed at the tail.
    #[inline]
    fn start_packet(
        &mut self,
        descriptor: &PacketDescriptor,
        len: usize,
        header_len: usize,
        payload_len: usize,
    ) -> WriteSlot<'_, M> {
        let start = self.tail;
        write_wrapped(&self.mem, self.geo, start, descriptor.as_bytes());
        let body_len = header_len + payload_len;
        if !body_len.is_multiple_of(8) {
            // Zero the last word so the padding is zero whatever the ring held before.
            let last = self.geo.advance(start, len - 8);
            write_wrapped(&self.mem, self.geo, last, &[0; 8]);
        }
        WriteSlot {
            writer: self,
            start,
            len,
            header_len,
            payload_len,
        }
    }

    /// Appends a packet without publishing it; [`commit`](Self::commit) publishes.
    ///
    /// A packet that does not wrap around the end of the ring (all but about one per lap)
    /// is written straight into place, piece by piece, as words where it can; one that wraps
    /// goes through a reserved slot, which splits each piece at the end of the ring.
    #[inline]
    pub fn push(&mut self, packet: &OutgoingPacket<'_>) -> Result<(), WriteError> {
        let (header_len, payload_len) = (packet.header.len(), packet.payload.len());
        let len = self.packet_len_for(&packet.meta, header_len, payload_len)?;
        self.claim(len)?;
        let descriptor = descriptor_for(&packet.meta, header_len, len);
        let start = self.tail;
        let at = start as usize;
        if at + len + TRAILER_SIZE > self.geo.len() {
            return self.push_wrapped(packet, &descriptor, len);
        }
        let mem = &self.mem;
        let words: [u64; DESCRIPTOR_SIZE / 8] = zerocopy::transmute!(descriptor);
        mem.write_data_words(at, &words);
        if !(header_len + payload_len).is_multiple_of(8) {
            // Zero the last word first, so the padding is zero whatever was there.
            mem.write_data_words(at + len - 8, &[0]);
        }
        let mut body = at + DESCRIPTOR_SIZE;
        if header_len != 0 {
            mem.write_data(body, packet.header);
            body += header_len;
        }
        match packet.payload {
            Payload::Bytes(bytes) => mem.write_data(body, bytes),
            Payload::Gather(parts) => {
                for part in parts {
                    mem.write_data(body, part);
                    body += part.len();
                }
            }
        }
        mem.write_data_words(at + len, &[trailer_for(start)]);
        self.tail = self.geo.advance(start, len + TRAILER_SIZE);
        Ok(())
    }

    /// [`push`](Self::push) for a packet that wraps around the end of the ring, its room
    /// claimed: through a slot, whose writes split at the end.
    #[inline(never)]
    fn push_wrapped(
        &mut self,
        packet: &OutgoingPacket<'_>,
        descriptor: &PacketDescriptor,
        len: usize,
    ) -> Result<(), WriteError> {
        let (header_len, payload_len) = (packet.header.len(), packet.payload.len());
        let mut slot = self.start_packet(descriptor, len, header_len, payload_len);
        slot.write_header(0, packet.header)?;
        match packet.payload {
            Payload::Bytes(bytes) => slot.write_payload(0, bytes)?,
            Payload::Gather(parts) => {
                let mut at = 0;
                for part in parts {
                    slot.write_payload(at, part)?;
                    at += part.len();
                }
            }
        }
        slot.finish();
        Ok(())
    }

    /// Appends a packet whose descriptor is written exactly as given, without publishing
    /// it; [`commit`](Self::commit) publishes.
    ///
    /// For tests, fuzzers and probes that play a peer breaking the rules: the descriptor
    /// may name any type, flags, data offset and length, valid or not, and nothing is
    /// checked but the room the packet takes. That room is the descriptor, the body
    /// padded to 8 bytes and the trailer (which holds the packet's start, as always),
    /// whatever the descriptor claims, so the writer's own state stays sound and the
    /// packets pushed after this one land where a reader that skipped this one by its real
    /// size would find them. A reader that believes the descriptor may be misled: that is
    /// the point.
    ///
    /// ```
    /// use vmlink_ring::protocol::PacketDescriptor;
    /// use vmlink_ring::{HeapMem, RawPacket, Reader, RingError, Writer};
    ///
    /// let ring = HeapMem::new(4096)?;
    /// let (mut writer, mut reader) = (Writer::new(&ring)?, Reader::new(&ring)?);
    /// let lie = PacketDescriptor { packet_type: 6, data_offset8: 2, length8: 200, ..Default::default() };
    /// writer.push_raw(&RawPacket { descriptor: lie, body: b"short" })?;
    /// let _ = writer.commit();
    /// assert!(matches!(reader.peek(), Err(RingError::LengthPastAvailable { length: 1600, .. })));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn push_raw(&mut self, packet: &RawPacket<'_>) -> Result<(), WriteError> {
        let max = self.max_packet_len();
        let len = match packet_len(0, packet.body.len()) {
            Some(len) if len <= max => len,
            len => {
                return Err(WriteError::TooLarge {
                    len: len.unwrap_or(usize::MAX),
                    max,
                });
            }
        };
        self.claim(len)?;
        let mut slot = self.start_packet(&packet.descriptor, len, 0, packet.body.len());
        slot.write_payload(0, packet.body)?;
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

    /// Sets `pending_send_size` to exactly `bytes`: the reader then signals when one of
    /// its commits makes the free space go from `bytes` or less to more than `bytes`
    /// (and not otherwise), provided the ring's `feature_bits` bit 0 is set.
    ///
    /// For a writer that chooses its own threshold; [`prepare_wait`](Self::prepare_wait)
    /// picks one with hysteresis instead. Issues a full fence after the store, so a
    /// [`free_space`](Self::free_space) check made next either sees the room the reader
    /// frees or the reader sees this value and signals: re-check before sleeping. The next
    /// successful reservation clears it, as does
    /// [`clear_pending_send_size`](Self::clear_pending_send_size); 0 clears it at once.
    /// `bytes` must be below the data length (more is never free), else
    /// [`WriteError::PendingSendSizeTooLarge`] and nothing is stored.
    ///
    /// ```
    /// use vmlink_ring::{HeapMem, OutgoingPacket, Reader, Writer};
    ///
    /// let ring = HeapMem::new(4096)?;
    /// let (mut writer, mut reader) = (Writer::new(&ring)?, Reader::new(&ring)?);
    /// for _ in 0..3 {
    ///     writer.push(&OutgoingPacket::in_band_slice(&[7; 1000]))?; // 1024 bytes each
    /// }
    /// let _ = writer.commit();
    /// writer.set_pending_send_size(2048)?; // 4096 - 3 * 1024 = 1024 bytes free now
    ///
    /// let mut buf = [0u8; 1000];
    /// let (_, signal) = reader.read_into(&mut buf)?.expect("a packet");
    /// assert!(!signal.is_needed(), "2048 bytes free: not more than 2048 yet");
    /// let (_, signal) = reader.read_into(&mut buf)?.expect("a packet");
    /// assert!(signal.is_needed(), "3072 bytes free: past 2048");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_pending_send_size(&mut self, bytes: usize) -> Result<(), WriteError> {
        if bytes == 0 {
            self.clear_pending_send_size();
            return Ok(());
        }
        let data_len = self.geo.len();
        if bytes >= data_len {
            return Err(WriteError::PendingSendSizeTooLarge { bytes, data_len });
        }
        // Below the data length, which fits in u32.
        self.mem
            .store_control(ControlWord::PendingSendSize, bytes as u32);
        self.pending_armed = true;
        // Pairs with the reader's fence in `Reader::commit`, as in `prepare_wait`.
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Clears `pending_send_size`: the reader no longer signals for free space.
    pub fn clear_pending_send_size(&mut self) {
        self.mem.store_control(ControlWord::PendingSendSize, 0);
        self.pending_armed = false;
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

/// The descriptor of a `len`-byte packet (trailer excluded) with `header_len` bytes of
/// extra header; both lengths already checked by `packet_len_for`.
#[inline]
fn descriptor_for(meta: &PacketMeta, header_len: usize, len: usize) -> PacketDescriptor {
    PacketDescriptor {
        packet_type: meta.packet_type.raw(),
        // Both fit: `len <= 524_280` bytes, i.e. at most u16::MAX 8-byte units.
        data_offset8: ((DESCRIPTOR_SIZE + header_len) / 8) as u16,
        length8: (len / 8) as u16,
        flags: meta.flags,
        transaction_id: meta.transaction_id,
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

#[cfg(all(test, not(loom)))]
mod tests;
