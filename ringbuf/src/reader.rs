//! The reading half of a ring.

use crate::error::{Index, ReadError, RingError};
use crate::mem::{ControlWord, RingMem};
use crate::protocol::{
    DESCRIPTOR_SIZE, FEATURE_PENDING_SEND_SIZE, KNOWN_FLAGS, PacketDescriptor, PacketType,
    TRAILER_SIZE,
};
use crate::ring::{Geometry, Signal, WaitDecision, in_bounds, read_words_wrapped, read_wrapped};
use crate::sync::{Ordering, fence};

/// A validated packet descriptor, copied out of the ring.
///
/// Only the reader creates these, from a descriptor it read once and validated; the
/// lengths here are what every later access to the packet is bounded by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    offset: u32,
    packet_type: PacketType,
    flags: u16,
    transaction_id: u64,
    header_len: usize,
    payload_len: usize,
    /// The reader's epoch when the packet was peeked (see [`Reader::packet`]).
    epoch: u64,
}

impl PacketInfo {
    /// Where the packet starts in the data area.
    pub fn offset(&self) -> u32 {
        self.offset
    }

    /// The packet type.
    pub fn packet_type(&self) -> PacketType {
        self.packet_type
    }

    /// Packet flags.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// Transaction id.
    pub fn transaction_id(&self) -> u64 {
        self.transaction_id
    }

    /// Bytes of extra header between the descriptor and the payload.
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// Bytes of payload, padding included (VMBus lengths are in 8-byte units; protocols
    /// carry exact lengths in their own headers).
    pub fn payload_len(&self) -> usize {
        self.payload_len
    }

    /// True when the sender asked for a completion.
    pub fn completion_requested(&self) -> bool {
        self.flags & crate::protocol::FLAG_COMPLETION_REQUESTED != 0
    }

    /// The packet's length in the ring: descriptor, header and payload (trailer excluded).
    pub fn packet_len(&self) -> usize {
        DESCRIPTOR_SIZE + self.header_len + self.payload_len
    }
}

/// The reading half of a ring: validates packets, hands them out in place, and says when
/// to signal the writer.
///
/// [`peek`](Self::peek) returns the next packet without consuming it; consuming moves a
/// private cursor, and [`commit`](Self::commit) publishes the new read index for all
/// consumed packets at once and tells whether the writer must be signalled.
/// [`read_into`](Self::read_into) does it all for one packet.
///
/// Every value the peer controls is read once into a local, validated, and only the local
/// is used. A packet that breaks a rule yields a [`RingError`] and leaves the reader's
/// state as it was. The struct is aligned to 128 bytes so its state never shares a cache
/// line with the writer's.
#[repr(align(128))]
#[derive(Debug)]
pub struct Reader<M: RingMem> {
    mem: M,
    geo: Geometry,
    /// The read index last stored to the control page.
    published: u32,
    /// Where the next packet starts; ahead of `published` while consumed packets await a
    /// commit.
    head: u32,
    /// The writer's index as last read and validated.
    cached_write: u32,
    /// Bumped whenever `head` moves, so a [`PacketInfo`] from before is recognised as stale.
    epoch: u64,
}

impl<M: RingMem> Reader<M> {
    /// Attaches a reader to a ring whose control page is initialised (see
    /// [`init_control`](crate::init_control)). Both indices are read once and validated.
    pub fn new(mem: M) -> Result<Self, RingError> {
        let geo = Geometry::new(mem.data_len())?;
        let read = geo.check_index(mem.load_control(ControlWord::ReadIndex), Index::Read)?;
        let write = geo.check_index(mem.load_control(ControlWord::WriteIndex), Index::Write)?;
        Ok(Self {
            mem,
            geo,
            published: read,
            head: read,
            cached_write: write,
            epoch: 0,
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

    /// The read index as published to the writer.
    pub fn published_index(&self) -> u32 {
        self.published
    }

    /// True when packets have been consumed but not yet committed.
    pub fn has_uncommitted(&self) -> bool {
        self.head != self.published
    }

    /// Bytes queued after the consumed packets, re-reading the writer's index.
    pub fn available(&mut self) -> Result<usize, RingError> {
        self.refresh_write()?;
        Ok(self.queued())
    }

    /// Bytes queued after the consumed packets as far as this reader already knows: from
    /// the writer's index as last read, without reading shared memory. At most what is
    /// really there; the writer may have published more since.
    #[inline]
    pub fn known_available(&self) -> usize {
        self.queued()
    }

    fn queued(&self) -> usize {
        self.geo.used(self.cached_write, self.head)
    }

    /// Re-reads the writer's index once and validates it: in range, aligned, and moved
    /// only forward (the writer cannot pass our published read index, so the bytes queued
    /// after it can only grow until we commit).
    #[inline]
    fn refresh_write(&mut self) -> Result<(), RingError> {
        let raw = self.mem.load_control(ControlWord::WriteIndex);
        let new = self.geo.check_index(raw, Index::Write)?;
        let old_queued = self.geo.used(self.cached_write, self.published);
        let new_queued = self.geo.used(new, self.published);
        if new_queued < old_queued {
            return Err(RingError::IndexMovedBackwards {
                index: Index::Write,
                old: self.cached_write,
                new,
            });
        }
        self.cached_write = new;
        Ok(())
    }

    /// Reads and validates the descriptor at the head, without moving anything.
    #[inline]
    fn next_packet(&mut self) -> Result<Option<PacketInfo>, RingError> {
        const MIN_PACKET: usize = DESCRIPTOR_SIZE + TRAILER_SIZE;
        if self.queued() < MIN_PACKET {
            self.refresh_write()?;
        }
        let available = self.queued();
        let offset = self.head;
        if available == 0 {
            return Ok(None);
        }
        // Indices are below 2^31, so `available` fits in u32.
        let available32 = available as u32;
        if available < MIN_PACKET {
            return Err(RingError::TruncatedPacket {
                offset,
                available: available32,
            });
        }
        let mut raw = [0u64; DESCRIPTOR_SIZE / 8];
        read_words_wrapped(&self.mem, self.geo, offset, &mut raw);
        let d: PacketDescriptor = zerocopy::transmute!(raw);
        let packet_type =
            PacketType::from_raw(d.packet_type).ok_or(RingError::UnknownPacketType {
                offset,
                packet_type: d.packet_type,
            })?;
        if d.flags & !KNOWN_FLAGS != 0 {
            return Err(RingError::UnknownFlags {
                offset,
                flags: d.flags,
            });
        }
        let data_offset = u32::from(d.data_offset8) * 8;
        let length = u32::from(d.length8) * 8;
        if (data_offset as usize) < DESCRIPTOR_SIZE {
            return Err(RingError::DataOffsetTooSmall {
                offset,
                data_offset,
            });
        }
        if data_offset > length {
            return Err(RingError::DataOffsetPastLength {
                offset,
                data_offset,
                length,
            });
        }
        if length as usize + TRAILER_SIZE > available {
            return Err(RingError::LengthPastAvailable {
                offset,
                length,
                available: available32,
            });
        }
        // The trailer (start offset << 32 in Linux) is not checked: readers in the wild
        // ignore it, and a packet is fully described by its descriptor.
        Ok(Some(PacketInfo {
            offset,
            packet_type,
            flags: d.flags,
            transaction_id: d.transaction_id,
            header_len: data_offset as usize - DESCRIPTOR_SIZE,
            payload_len: (length - data_offset) as usize,
            epoch: self.epoch,
        }))
    }

    /// The next packet, validated but not consumed; `Ok(None)` when the ring is empty.
    #[inline]
    pub fn peek(&mut self) -> Result<Option<IncomingPacket<'_, M>>, RingError> {
        Ok(self
            .next_packet()?
            .map(|info| IncomingPacket { reader: self, info }))
    }

    /// The next packet's validated descriptor, without borrowing the reader; reopen the
    /// packet with [`packet`](Self::packet). `Ok(None)` when the ring is empty.
    #[inline]
    pub fn peek_info(&mut self) -> Result<Option<PacketInfo>, RingError> {
        self.next_packet()
    }

    /// Reopens the packet `info` describes, without reading its descriptor again; `None`
    /// when the reader has moved since (a consume or revert), so `info` is stale.
    pub fn packet(&mut self, info: &PacketInfo) -> Option<IncomingPacket<'_, M>> {
        (info.epoch == self.epoch).then_some(IncomingPacket {
            reader: self,
            info: *info,
        })
    }

    /// Copies the next packet's payload into `buf`, consumes the packet and commits.
    ///
    /// Returns the packet's descriptor and the commit's signal; `Ok(None)` when the ring is
    /// empty. A payload larger than `buf` is an error and leaves the packet queued.
    pub fn read_into(&mut self, buf: &mut [u8]) -> Result<Option<(PacketInfo, Signal)>, ReadError> {
        let Some(packet) = self.peek()? else {
            return Ok(None);
        };
        let info = packet.info;
        if info.payload_len > buf.len() {
            return Err(ReadError::BufferTooSmall {
                needed: info.payload_len,
                capacity: buf.len(),
            });
        }
        packet.read_payload(0, &mut buf[..info.payload_len])?;
        packet.consume();
        Ok(Some((info, self.commit())))
    }

    /// Publishes the read index for every packet consumed since the last commit, and says
    /// whether the writer must be signalled: only when the ring's `feature_bits` bit 0
    /// (pending send size supported) is set, the writer asked for space with
    /// `pending_send_size`, and this commit made the free space cross that amount.
    pub fn commit(&mut self) -> Signal {
        if self.head == self.published {
            return Signal::NONE;
        }
        let old = self.published;
        self.mem.store_control(ControlWord::ReadIndex, self.head);
        self.published = self.head;
        // hv_pkt_iter_close in Linux (and DPDK) return here when the ring's feature bit 0 is
        // clear: the writer did not say it honours `pending_send_size`, so it is not read.
        if self.mem.load_control(ControlWord::FeatureBits) & FEATURE_PENDING_SEND_SIZE == 0 {
            return Signal::NONE;
        }
        // Pairs with the writer's fence in `Writer::prepare_wait`: either we see its pending
        // size or it sees the space we freed.
        fence(Ordering::SeqCst);
        let pending = self.mem.load_control(ControlWord::PendingSendSize) as usize;
        if pending == 0 {
            return Signal::NONE;
        }
        // The writer stored `pending` after publishing its last packet, so the write index
        // read now is at least that; our cached one may be older.
        let raw = self.mem.load_control(ControlWord::WriteIndex);
        let Ok(write) = self.geo.check_index(raw, Index::Write) else {
            // A corrupt index: signal, which is harmless; the next peek reports it.
            return Signal::NEEDED;
        };
        let free_before = self.geo.free(write, old);
        let free_after = self.geo.free(write, self.head);
        // hv_pkt_iter_close in Linux: signal only on crossing the threshold.
        if free_before <= pending && pending < free_after {
            Signal::NEEDED
        } else {
            Signal::NONE
        }
    }

    /// Forgets the packets consumed since the last commit; they will be read again.
    pub fn revert(&mut self) {
        self.head = self.published;
        self.epoch += 1;
    }

    /// Sets the interrupt mask: the writer will not signal for new data. For a reader that
    /// polls; call [`prepare_wait`](Self::prepare_wait) before sleeping.
    pub fn mask_interrupts(&mut self) {
        self.mem.store_control(ControlWord::InterruptMask, 1);
    }

    /// Prepares to sleep until data arrives.
    ///
    /// Commits consumed packets (their signal is returned), clears the interrupt mask,
    /// issues a full fence and looks at the writer's index once more. On
    /// [`WaitDecision::Sleep`] the writer is obliged to signal when it publishes data; on
    /// [`WaitDecision::Ready`] data is already there.
    pub fn prepare_wait(&mut self) -> Result<(WaitDecision, Signal), RingError> {
        let signal = self.commit();
        self.mem.store_control(ControlWord::InterruptMask, 0);
        // Pairs with the writer's fence in `Writer::commit`.
        fence(Ordering::SeqCst);
        self.refresh_write()?;
        let decision = if self.queued() == 0 {
            WaitDecision::Sleep
        } else {
            WaitDecision::Ready
        };
        Ok((decision, signal))
    }
}

/// A validated packet in the ring, read in place.
///
/// Reads copy out of ring memory straight into the caller's buffers. Dropping the packet
/// leaves it queued; [`consume`](Self::consume) moves past it (published by the reader's
/// next commit).
#[derive(Debug)]
pub struct IncomingPacket<'r, M: RingMem> {
    reader: &'r mut Reader<M>,
    info: PacketInfo,
}

impl<M: RingMem> IncomingPacket<'_, M> {
    /// The packet's validated descriptor.
    pub fn info(&self) -> &PacketInfo {
        &self.info
    }

    #[inline]
    fn read_body(&self, body_offset: usize, buf: &mut [u8]) {
        let r = &*self.reader;
        // The packet starts below the data length and is no longer than it, so this
        // cannot overflow.
        let at = self.info.offset as usize + DESCRIPTOR_SIZE + body_offset;
        if at + buf.len() <= r.geo.len() {
            // The common case: nothing to wrap.
            r.mem.read_data(at, buf);
        } else {
            let at = r
                .geo
                .advance(self.info.offset, DESCRIPTOR_SIZE + body_offset);
            read_wrapped(&r.mem, r.geo, at, buf);
        }
    }

    /// Copies `buf.len()` bytes of the extra header, starting at `offset`, into `buf`.
    pub fn read_header(&self, offset: usize, buf: &mut [u8]) -> Result<(), ReadError> {
        if !in_bounds(offset, buf.len(), self.info.header_len) {
            return Err(ReadError::OutOfBounds {
                offset,
                len: buf.len(),
                size: self.info.header_len,
            });
        }
        self.read_body(offset, buf);
        Ok(())
    }

    /// Copies `buf.len()` bytes of the payload, starting at `offset`, into `buf`.
    #[inline]
    pub fn read_payload(&self, offset: usize, buf: &mut [u8]) -> Result<(), ReadError> {
        if !in_bounds(offset, buf.len(), self.info.payload_len) {
            return Err(ReadError::OutOfBounds {
                offset,
                len: buf.len(),
                size: self.info.payload_len,
            });
        }
        self.read_body(self.info.header_len + offset, buf);
        Ok(())
    }

    /// Consumes the packet; the reader's next commit publishes it as read.
    #[inline]
    pub fn consume(self) {
        let r = self.reader;
        r.head = r
            .geo
            .advance(self.info.offset, self.info.packet_len() + TRAILER_SIZE);
        r.epoch += 1;
    }
}
