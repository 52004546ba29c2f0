//! Packet links: what an [`Endpoint`](crate::Endpoint) needs of a transport.
//!
//! A link is a pair of halves. [`PacketTx`] pushes packets and commits them; [`PacketRx`]
//! peeks at the next packet, reads it, consumes it and commits. Both arm waits the way a
//! VMBus ring does (pending send size, interrupt mask, a fence and a second look) and say
//! when the peer needs a [`Signal`]; the endpoint rings its [`Doorbell`](crate::Doorbell)
//! and sleeps on it. Everything above the link — transactions and [`call`], the queue of
//! packets kept while calls wait, failure states, counters, waiting — is written once in
//! the endpoint, generic over these two traits.
//!
//! Implementations:
//! - [`RingTx`] / [`RingRx`]: a VMBus ring pair (the [`Channel`](crate::Channel)).
//! - a stream transport frames packets on a byte stream and implements the same pair;
//! - a layer implements them over another link (a secure layer rewriting payloads).
//!
//! GPA-direct packets name guest pages, which only a link over shared memory can honour:
//! [`PacketTx::push_gpa_direct`] defaults to [`ChannelError::Unsupported`].
//!
//! [`call`]: crate::Endpoint::call

use vmlink_ring::{
    OutgoingPacket, PacketInfo, PacketMeta, ReadError, Reader, RingMem, Signal, WaitDecision,
    WriteError, WriteSlot, Writer,
    protocol::{PacketType, packet_len},
};

use crate::error::{ChannelError, FailureCause};
use crate::packet::{GpaRange, encode_gpa_header, gpa_header_len};

/// A received packet's type, transaction id and lengths: what a link says of the packet
/// at its head, and what a copying receive returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The packet type.
    pub packet_type: PacketType,
    /// The transaction id.
    pub transaction_id: u64,
    /// The sender asked for a completion.
    pub completion_requested: bool,
    /// Bytes of extra header (GPA ranges, transfer pages); in a copying receive's buffer,
    /// they come first.
    pub header_len: usize,
    /// Bytes of payload after the header, padding to 8 bytes included.
    pub payload_len: usize,
}

impl Received {
    /// What a ring's validated descriptor says.
    pub fn from_info(info: &PacketInfo) -> Self {
        Self {
            packet_type: info.packet_type(),
            transaction_id: info.transaction_id(),
            completion_requested: info.completion_requested(),
            header_len: info.header_len(),
            payload_len: info.payload_len(),
        }
    }

    /// Header and payload bytes.
    pub fn len(&self) -> usize {
        self.header_len + self.payload_len
    }

    /// True when the packet carries neither header nor payload.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The header within the buffer the packet was received into.
    pub fn header<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[..self.header_len]
    }

    /// The payload within the buffer the packet was received into.
    pub fn payload<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.header_len..self.len()]
    }
}

/// The sending half of a packet link.
///
/// Pushed packets are invisible to the peer until [`commit`](Self::commit), which says
/// whether the peer must be signalled. Errors: [`ChannelError::Full`] (no room now),
/// [`ChannelError::TooLarge`] (never fits), [`ChannelError::InvalidRequest`] (the caller's
/// packet is malformed), [`ChannelError::Failed`] (the link is broken; the endpoint fails).
pub trait PacketTx {
    /// The largest packet the link carries (descriptor, header, padded payload).
    fn max_packet_len(&self) -> usize;

    /// Adds a packet to the uncommitted ones; returns its length on the link.
    fn push(&mut self, packet: &OutgoingPacket<'_>) -> Result<usize, ChannelError>;

    /// Adds a GPA-direct packet: `ranges` name guest pages holding bulk data, `payload`
    /// travels in-band. Links that cannot honour guest pages (sockets, secure layers)
    /// refuse with [`ChannelError::Unsupported`], the default.
    fn push_gpa_direct(
        &mut self,
        ranges: &[GpaRange<'_>],
        payload: &[u8],
        meta: PacketMeta,
        page_limit: Option<u64>,
    ) -> Result<usize, ChannelError> {
        let _ = (ranges, payload, meta, page_limit);
        Err(ChannelError::Unsupported {
            what: "GPA-direct packets",
        })
    }

    /// Publishes the pushed packets; says whether the peer must be signalled.
    fn commit(&mut self) -> Signal;

    /// Discards pushed packets not yet committed.
    fn rollback(&mut self);

    /// Prepares to sleep until a packet of these lengths fits: commits what was pushed
    /// (its signal returned), arms the peer to signal, fences and looks again.
    fn prepare_wait(
        &mut self,
        header_len: usize,
        payload_len: usize,
    ) -> Result<(WaitDecision, Signal), ChannelError>;

    /// Whether the peer, as the reader of what this half sends, may be sleeping on data
    /// it was never signalled for: what a restored endpoint re-signals (the "unstick").
    /// A ring answers from its control page (data queued, the reader's interrupts not
    /// masked); the default, for links with no such state, says yes: a needless signal
    /// costs the peer one look, a missing one could leave it asleep.
    fn peer_owed_signal(&self) -> bool {
        true
    }
}

/// The receiving half of a packet link.
///
/// [`peek`](Self::peek) reads the next packet's description once and validates it; the
/// reads and [`consume`](Self::consume) that follow refer to that packet, and later
/// peeks return the same description until it is consumed. Consumed packets are handed
/// back to the peer by [`commit`](Self::commit).
pub trait PacketRx {
    /// The packet at the head, if one is there.
    fn peek(&mut self) -> Result<Option<Received>, ChannelError>;

    /// Copies `buf.len()` bytes of the peeked packet's extra header at `offset`.
    fn read_header(&mut self, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError>;

    /// Copies `buf.len()` bytes of the peeked packet's payload at `offset`.
    fn read_payload(&mut self, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError>;

    /// Consumes the peeked packet (nothing when none is peeked).
    fn consume(&mut self);

    /// True when packets were consumed since the last commit.
    fn has_uncommitted(&self) -> bool;

    /// Hands consumed packets back to the peer; says whether it must be signalled.
    fn commit(&mut self) -> Signal;

    /// True when more packets are known to be there without looking at the peer's side.
    fn known_available(&self) -> bool;

    /// Looks at the peer's side: true when a packet is there (or the link is broken, which
    /// the next peek reports).
    fn poll_available(&mut self) -> bool;

    /// Asks the peer not to signal for new packets (a receiver that polls).
    fn mask_interrupts(&mut self);

    /// Prepares to sleep until a packet arrives: commits, asks the peer to signal, fences
    /// and looks again.
    fn prepare_wait(&mut self) -> Result<(WaitDecision, Signal), ChannelError>;

    /// Whether the peer, as the writer of what this half receives, may be sleeping on
    /// space it was never signalled for: what a restored endpoint re-signals. A ring
    /// answers from its control page (the writer asked for space with
    /// `pending_send_size` and more than that is free); the default says yes.
    fn peer_owed_signal(&self) -> bool {
        true
    }
}

/// A corrupt ring fails the channel; the rest is the caller's error.
fn write_error(e: WriteError) -> ChannelError {
    match e {
        WriteError::Full { .. } => ChannelError::Full,
        WriteError::TooLarge { len, max } => ChannelError::TooLarge { len, max },
        WriteError::Corrupt(r) => ChannelError::Failed(FailureCause::Ring(r)),
        other => ChannelError::InvalidRequest(other),
    }
}

fn read_error(e: ReadError) -> ChannelError {
    match e {
        ReadError::BufferTooSmall { needed, capacity } => {
            ChannelError::BufferTooSmall { needed, capacity }
        }
        ReadError::OutOfBounds { offset, len, size } => {
            ChannelError::OutOfBounds { offset, len, size }
        }
        ReadError::Corrupt(r) => ChannelError::Failed(FailureCause::Ring(r)),
    }
}

/// The sending half over a VMBus ring: a [`Writer`].
#[derive(Debug)]
pub struct RingTx<M: RingMem> {
    writer: Writer<M>,
}

impl<M: RingMem> RingTx<M> {
    /// The sending half over `outgoing`, whose control page is initialised (its indices are
    /// read once and validated).
    pub fn new(outgoing: M) -> Result<Self, ChannelError> {
        let writer = Writer::new(outgoing).map_err(|e| ChannelError::Failed(e.into()))?;
        Ok(Self { writer })
    }

    /// The ring writer.
    pub fn writer(&mut self) -> &mut Writer<M> {
        &mut self.writer
    }

    /// Reserves a packet in the ring, lets `fill` write it in place, and adds it to the
    /// uncommitted ones; returns `fill`'s result and the packet's length on the ring.
    pub fn push_in_place<R>(
        &mut self,
        meta: PacketMeta,
        header_len: usize,
        payload_len: usize,
        fill: impl FnOnce(&mut WriteSlot<'_, M>) -> R,
    ) -> Result<(R, usize), ChannelError> {
        let mut slot = self
            .writer
            .reserve(meta, header_len, payload_len)
            .map_err(write_error)?;
        let r = fill(&mut slot);
        slot.finish();
        Ok((r, packet_len(header_len, payload_len).unwrap_or(0)))
    }
}

impl<M: RingMem> PacketTx for RingTx<M> {
    fn max_packet_len(&self) -> usize {
        self.writer.max_packet_len()
    }

    #[inline]
    fn push(&mut self, packet: &OutgoingPacket<'_>) -> Result<usize, ChannelError> {
        self.writer.push(packet).map_err(write_error)?;
        Ok(packet.packet_len().unwrap_or(0))
    }

    fn push_gpa_direct(
        &mut self,
        ranges: &[GpaRange<'_>],
        payload: &[u8],
        meta: PacketMeta,
        page_limit: Option<u64>,
    ) -> Result<usize, ChannelError> {
        let header_len = gpa_header_len(ranges, page_limit).map_err(ChannelError::InvalidPacket)?;
        let meta = PacketMeta {
            packet_type: PacketType::GpaDirect,
            ..meta
        };
        let ((), len) = self.push_in_place(meta, header_len, payload.len(), |slot| {
            encode_gpa_header(ranges, |at, bytes| {
                let _ = slot.write_header(at, bytes);
            });
            let _ = slot.write_payload(0, payload);
        })?;
        Ok(len)
    }

    fn commit(&mut self) -> Signal {
        self.writer.commit()
    }

    fn rollback(&mut self) {
        self.writer.revert();
    }

    fn prepare_wait(
        &mut self,
        header_len: usize,
        payload_len: usize,
    ) -> Result<(WaitDecision, Signal), ChannelError> {
        self.writer
            .prepare_wait(header_len, payload_len)
            .map_err(write_error)
    }

    fn peer_owed_signal(&self) -> bool {
        vmlink_ring::reader_needs_signal(self.writer.mem())
    }
}

/// The receiving half over a VMBus ring: a [`Reader`] and the packet it peeked at.
#[derive(Debug)]
pub struct RingRx<M: RingMem> {
    reader: Reader<M>,
    head: Option<PacketInfo>,
}

impl<M: RingMem> RingRx<M> {
    /// The receiving half over `incoming`, whose control page is initialised (its indices
    /// are read once and validated).
    pub fn new(incoming: M) -> Result<Self, ChannelError> {
        let reader = Reader::new(incoming).map_err(|e| ChannelError::Failed(e.into()))?;
        Ok(Self { reader, head: None })
    }

    /// The ring reader.
    pub fn reader(&mut self) -> &mut Reader<M> {
        &mut self.reader
    }

    #[inline]
    fn read(&mut self, header: bool, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError> {
        let Some(info) = self.head else {
            return Err(ChannelError::OutOfBounds {
                offset,
                len: buf.len(),
                size: 0,
            });
        };
        let Some(p) = self.reader.packet(&info) else {
            // The reader moved on: the packet is no longer there to read.
            return Err(ChannelError::OutOfBounds {
                offset,
                len: buf.len(),
                size: 0,
            });
        };
        if header {
            p.read_header(offset, buf)
        } else {
            p.read_payload(offset, buf)
        }
        .map_err(read_error)
    }
}

impl<M: RingMem> PacketRx for RingRx<M> {
    #[inline(always)]
    fn peek(&mut self) -> Result<Option<Received>, ChannelError> {
        if self.head.is_none() {
            self.head = self
                .reader
                .peek_info()
                .map_err(|e| ChannelError::Failed(e.into()))?;
        }
        Ok(self.head.as_ref().map(Received::from_info))
    }

    fn read_header(&mut self, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError> {
        self.read(true, offset, buf)
    }

    #[inline]
    fn read_payload(&mut self, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError> {
        self.read(false, offset, buf)
    }

    #[inline]
    fn consume(&mut self) {
        if let Some(info) = self.head.take()
            && let Some(p) = self.reader.packet(&info)
        {
            p.consume();
        }
    }

    fn has_uncommitted(&self) -> bool {
        self.reader.has_uncommitted()
    }

    fn commit(&mut self) -> Signal {
        self.reader.commit()
    }

    fn known_available(&self) -> bool {
        self.reader.known_available() > 0
    }

    fn poll_available(&mut self) -> bool {
        self.head.is_some() || self.reader.available().map_or(true, |n| n > 0)
    }

    fn mask_interrupts(&mut self) {
        self.reader.mask_interrupts();
    }

    fn prepare_wait(&mut self) -> Result<(WaitDecision, Signal), ChannelError> {
        self.reader
            .prepare_wait()
            .map_err(|e| ChannelError::Failed(e.into()))
    }

    fn peer_owed_signal(&self) -> bool {
        vmlink_ring::writer_needs_signal(self.reader.mem())
    }
}
