//! Receiving: the copying, in-place and batch paths, and the validated packet views.

use super::*;

/// A received packet, copied into the caller's buffer: its extra header first, then its
/// payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The packet type.
    pub packet_type: PacketType,
    /// The transaction id.
    pub transaction_id: u64,
    /// The sender asked for a completion.
    pub completion_requested: bool,
    /// Bytes of extra header at the start of the buffer (GPA ranges, transfer pages).
    pub header_len: usize,
    /// Bytes of payload after the header, padding to 8 bytes included.
    pub payload_len: usize,
}

impl Received {
    pub(super) fn from_info(info: &PacketInfo) -> Self {
        Self {
            packet_type: info.packet_type(),
            transaction_id: info.transaction_id(),
            completion_requested: info.completion_requested(),
            header_len: info.header_len(),
            payload_len: info.payload_len(),
        }
    }

    /// Header and payload bytes in the buffer.
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

impl<M: RingMem, D: Doorbell> Channel<M, D> {
    // ---- receiving ---------------------------------------------------------------------

    /// Takes the next packet meant for a receiver off the incoming ring, dealing with
    /// completions for waiting callers on the way. Consumed packets are not yet committed.
    pub(super) fn next_for_receiver(
        &self,
        rx: &mut RxState<M>,
    ) -> Result<Option<PacketInfo>, ChannelError> {
        loop {
            let info = match rx.reader.peek_info() {
                Ok(Some(info)) => info,
                Ok(None) => return Ok(None),
                Err(e) => return Err(self.fail(e)),
            };
            if info.packet_type() != PacketType::Completion {
                // Extra headers are validated where they are copied out, never in the ring.
                return Ok(Some(info));
            }
            match self.txns.route(info.transaction_id()) {
                Route::Polled => return Ok(Some(info)),
                Route::Unknown => {
                    return Err(self.fail(ProtocolError::UnknownTransaction {
                        transaction_id: info.transaction_id(),
                    }));
                }
                Route::Late(index) => {
                    self.txns.free_late(index);
                    bump(&self.counters.late_completions, 1);
                    self.consume(&mut rx.reader, &info);
                }
                #[cfg(feature = "alloc")]
                Route::Waiting(index) => {
                    // Stored only when it fits the caller's buffer: a peer cannot make the
                    // channel hold more than its callers asked to receive.
                    let needed = info.payload_len();
                    let stored = &mut rx.stored[index];
                    stored.clear();
                    if needed <= self.call_capacity[index].load(Ordering::Acquire) {
                        stored.resize(needed, 0);
                        if let Some(p) = rx.reader.packet(&info) {
                            p.read_payload(0, stored).map_err(|e| self.read_error(e))?;
                        }
                    }
                    rx.stored_len[index] = needed;
                    self.consume(&mut rx.reader, &info);
                    if !self.txns.mark_done(index) {
                        bump(&self.counters.late_completions, 1);
                    }
                    self.hub.notify(&self.doorbell);
                }
                #[cfg(not(feature = "alloc"))]
                Route::Waiting(_) => return Ok(Some(info)),
            }
        }
    }

    /// Consumes the packet at the head (not yet committed) and counts it.
    pub(super) fn consume(&self, reader: &mut Reader<M>, info: &PacketInfo) {
        if let Some(p) = reader.packet(info) {
            p.consume();
            bump(&self.counters.packets_received, 1);
            bump(&self.counters.bytes_received, info.packet_len() as u64);
        }
    }

    /// Commits consumed packets and signals the writer if it waits for the space. A writer
    /// that has left needs no signal: that is not an error here, as the packets just
    /// consumed must still reach the receiver (the channel notes the departure).
    ///
    /// Packets left behind are announced to the channel's other waiters: a writer that
    /// saw this receive move the read index while it published took the reader for awake
    /// and did not signal, so a thread asleep in the doorbell would not learn of them.
    pub(super) fn commit_rx(&self, rx: &mut RxState<M>) -> Result<(), ChannelError> {
        let consumed = rx.reader.has_uncommitted();
        let signal = rx.reader.commit();
        if consumed && rx.reader.known_available() > 0 {
            self.hub.notify(&self.doorbell);
        }
        match self.signal(signal) {
            Err(ChannelError::Closed) => Ok(()),
            other => other,
        }
    }

    /// Copies the packet `info` into `buf` (header, then payload) and consumes it. The
    /// header is read out of the ring once and validated in `buf`: the caller gets exactly
    /// the bytes that were checked.
    pub(super) fn take_into(
        &self,
        reader: &mut Reader<M>,
        info: &PacketInfo,
        buf: &mut [u8],
    ) -> Result<Received, ChannelError> {
        let meta = Received::from_info(info);
        if meta.len() > buf.len() {
            return Err(ChannelError::BufferTooSmall {
                needed: meta.len(),
                capacity: buf.len(),
            });
        }
        if let Some(p) = reader.packet(info) {
            let (h, rest) = buf.split_at_mut(meta.header_len);
            p.read_header(0, h).map_err(|e| self.read_error(e))?;
            check_header(&meta, h, self.config.gpa_page_limit)
                .map_err(|e| self.fail(ProtocolError::Packet(e)))?;
            p.read_payload(0, &mut rest[..meta.payload_len])
                .map_err(|e| self.read_error(e))?;
        }
        self.consume(reader, info);
        if meta.packet_type == PacketType::Completion {
            self.txns.release_polled(meta.transaction_id);
        }
        Ok(meta)
    }

    #[cfg(feature = "alloc")]
    pub(super) fn take_queued(
        &self,
        rx: &mut RxState<M>,
        buf: &mut [u8],
    ) -> Result<Option<Received>, ChannelError> {
        let Some((meta, data)) = rx.queue.front() else {
            return Ok(None);
        };
        if data.len() > buf.len() {
            return Err(ChannelError::BufferTooSmall {
                needed: data.len(),
                capacity: buf.len(),
            });
        }
        buf[..data.len()].copy_from_slice(data);
        rx.queue.pop();
        // Queue space freed: callers blocked on a full queue may go on.
        self.hub.notify(&self.doorbell);
        Ok(Some(meta))
    }

    /// Receives one packet into `buf` if one is there; never waits.
    ///
    /// `Ok(None)` when nothing is queued; [`ChannelError::Closed`] once the peer is gone
    /// and everything it committed has been received.
    pub fn try_recv(&self, buf: &mut [u8]) -> Result<Option<Received>, ChannelError> {
        self.try_recv_as(buf, Probe::Doorbell)
    }

    pub(super) fn try_recv_as(
        &self,
        buf: &mut [u8],
        probe: Probe,
    ) -> Result<Option<Received>, ChannelError> {
        loop {
            if let Some(e) = self.failed() {
                return Err(e);
            }
            let gone = self.known_gone();
            let mut rx = self.rx.lock();
            #[cfg(feature = "alloc")]
            if let Some(r) = self.take_queued(&mut rx, buf)? {
                return Ok(Some(r));
            }
            let got = self
                .next_for_receiver(&mut rx)?
                .map(|info| self.take_into(&mut rx.reader, &info, buf));
            self.commit_rx(&mut rx)?;
            drop(rx);
            return match got {
                Some(r) => r.map(Some),
                None if gone => Err(ChannelError::Closed),
                None if self.newly_gone(probe) => continue,
                None => Ok(None),
            };
        }
    }

    /// Receives the next packet in place, if one is there; never waits. The returned
    /// guard reads straight out of ring memory; the packet is consumed when the guard is
    /// dropped or committed. The incoming ring stays locked meanwhile.
    ///
    /// ```
    /// use vmlink_channel::{Config, PacketMeta, in_process_channel_pair};
    ///
    /// let (a, b) = in_process_channel_pair(4 * 4096, Config::default())?;
    /// // Fill a packet in place: no intermediate buffer.
    /// a.try_send_in_place(PacketMeta::in_band(), 0, 8192, |slot| {
    ///     for chunk in 0..8 {
    ///         slot.write_payload(chunk * 1024, &[chunk as u8; 1024]).unwrap();
    ///     }
    /// })?;
    /// // Read just the part needed, straight out of the ring.
    /// let mut guard = b.try_recv_in_place()?.expect("a packet");
    /// let mut last = [0u8; 4];
    /// guard.read_payload(8188, &mut last)?;
    /// assert_eq!(last, [7; 4]);
    /// drop(guard); // consumed here
    /// # Ok::<(), vmlink_channel::ChannelError>(())
    /// ```
    pub fn try_recv_in_place(&self) -> Result<Option<RecvGuard<'_, M, D>>, ChannelError> {
        self.try_recv_in_place_as(Probe::Doorbell)
    }

    pub(super) fn try_recv_in_place_as(
        &self,
        probe: Probe,
    ) -> Result<Option<RecvGuard<'_, M, D>>, ChannelError> {
        loop {
            if let Some(e) = self.failed() {
                return Err(e);
            }
            let gone = self.known_gone();
            let mut rx = self.rx.lock();
            #[cfg(feature = "alloc")]
            if let Some((meta, _)) = rx.queue.front() {
                return Ok(Some(RecvGuard {
                    channel: self,
                    rx,
                    source: Some(Source::Queued(meta)),
                }));
            }
            if let Some(info) = self.next_for_receiver(&mut rx)? {
                return Ok(Some(RecvGuard {
                    channel: self,
                    rx,
                    source: Some(Source::Ring(info)),
                }));
            }
            self.commit_rx(&mut rx)?;
            drop(rx);
            if gone {
                return Err(ChannelError::Closed);
            }
            if !self.newly_gone(probe) {
                return Ok(None);
            }
        }
    }

    /// Receives up to `max` packets in place under one lock and one commit (so the peer is
    /// signalled at most once), handing each to `each`. Returns how many were handled;
    /// never waits.
    pub fn try_recv_batch(
        &self,
        max: usize,
        mut each: impl FnMut(&BatchPacket<'_, '_, M>),
    ) -> Result<usize, ChannelError> {
        loop {
            match self.recv_batch_once(max, &mut each)? {
                (0, false) if self.newly_gone(Probe::Doorbell) => {}
                (n, _) => return Ok(n),
            }
        }
    }

    /// One batch: how many packets were handled, and whether the peer was known to be
    /// gone before the ring was read (`Closed` when that found nothing).
    pub(super) fn recv_batch_once(
        &self,
        max: usize,
        each: &mut impl FnMut(&BatchPacket<'_, '_, M>),
    ) -> Result<(usize, bool), ChannelError> {
        if let Some(e) = self.failed() {
            return Err(e);
        }
        let gone = self.known_gone();
        let mut rx = self.rx.lock();
        let mut n = 0;
        let mut result = Ok(());
        #[cfg(feature = "alloc")]
        let mut took_queued = false;
        while n < max {
            #[cfg(feature = "alloc")]
            if let Some((meta, data)) = rx.queue.front() {
                each(&BatchPacket {
                    meta,
                    source: BatchSource::Queued(data),
                    channel: self,
                });
                rx.queue.pop();
                took_queued = true;
                n += 1;
                // A header read in `each` may have failed the channel: stop there.
                if let Some(e) = self.failed() {
                    result = Err(e);
                    break;
                }
                continue;
            }
            let info = match self.next_for_receiver(&mut rx) {
                Ok(Some(info)) => info,
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let meta = Received::from_info(&info);
            if let Some(p) = rx.reader.packet(&info) {
                each(&BatchPacket {
                    meta,
                    source: BatchSource::Ring(&p),
                    channel: self,
                });
            }
            self.consume(&mut rx.reader, &info);
            if meta.packet_type == PacketType::Completion {
                self.txns.release_polled(meta.transaction_id);
            }
            n += 1;
            // A header read in `each` may have failed the channel: no packet after it.
            if let Some(e) = self.failed() {
                result = Err(e);
                break;
            }
        }
        #[cfg(feature = "alloc")]
        if took_queued {
            // Queue space freed: callers blocked on a full queue may go on.
            self.hub.notify(&self.doorbell);
        }
        self.commit_rx(&mut rx)?;
        result?;
        if n == 0 && gone {
            return Err(ChannelError::Closed);
        }
        Ok((n, gone))
    }
}

/// Copies `buf.len()` bytes at `offset` of the `size`-byte region starting at `start` of
/// `data` (a packet copied out of the ring).
#[cfg(feature = "alloc")]
pub(super) fn copy_region(
    data: &[u8],
    start: usize,
    size: usize,
    offset: usize,
    buf: &mut [u8],
) -> Result<(), ChannelError> {
    let out_of_bounds = ChannelError::OutOfBounds {
        offset,
        len: buf.len(),
        size,
    };
    if offset.checked_add(buf.len()).is_none_or(|end| end > size) {
        return Err(out_of_bounds);
    }
    let from = data
        .get(start + offset..start + offset + buf.len())
        .ok_or(out_of_bounds)?;
    buf.copy_from_slice(from);
    Ok(())
}

/// Validates a packet's extra header, copied out of the ring: GPA ranges and transfer
/// pages have a structure; other packets' header bytes are padding.
pub(super) fn check_header(
    meta: &Received,
    header: &[u8],
    gpa_page_limit: Option<u64>,
) -> Result<(), crate::packet::PacketError> {
    match meta.packet_type {
        PacketType::GpaDirect => parse_gpa_header(header, gpa_page_limit).map(drop),
        PacketType::TransferPages => parse_transfer_page_header(header).map(drop),
        _ => Ok(()),
    }
}

/// What a packet read in place needs of its channel: the GPA page limit to validate a
/// header against, and a way to fail the channel when it finds a violation.
pub(super) trait PacketSource {
    fn gpa_page_limit(&self) -> Option<u64>;
    fn read_error(&self, e: ReadError) -> ChannelError;
    fn fail_protocol(&self, e: crate::packet::PacketError) -> ChannelError;
}

impl<M: RingMem, D: Doorbell> PacketSource for Channel<M, D> {
    fn gpa_page_limit(&self) -> Option<u64> {
        self.config.gpa_page_limit
    }

    /// A caller's mistake is its error; a corrupt ring fails the channel.
    fn read_error(&self, e: ReadError) -> ChannelError {
        match e {
            ReadError::BufferTooSmall { needed, capacity } => {
                ChannelError::BufferTooSmall { needed, capacity }
            }
            ReadError::OutOfBounds { offset, len, size } => {
                ChannelError::OutOfBounds { offset, len, size }
            }
            ReadError::Corrupt(r) => self.fail(r),
        }
    }

    fn fail_protocol(&self, e: crate::packet::PacketError) -> ChannelError {
        self.fail(ProtocolError::Packet(e))
    }
}

/// Copies a packet's whole extra header into `scratch` with `read` (one read of the ring).
pub(super) fn copy_header<'s>(
    meta: &Received,
    scratch: &'s mut [u8],
    read: impl FnOnce(&mut [u8]) -> Result<(), ChannelError>,
) -> Result<&'s mut [u8], ChannelError> {
    let (len, capacity) = (meta.header_len, scratch.len());
    let header = scratch.get_mut(..len).ok_or(ChannelError::BufferTooSmall {
        needed: len,
        capacity,
    })?;
    read(header)?;
    Ok(header)
}

/// The whole extra header, copied into `scratch` once and validated there (a violation
/// fails the channel): the caller gets exactly the bytes that were checked.
pub(super) fn validated_header<'s>(
    channel: &dyn PacketSource,
    meta: &Received,
    scratch: &'s mut [u8],
    read: impl FnOnce(&mut [u8]) -> Result<(), ChannelError>,
) -> Result<&'s [u8], ChannelError> {
    let header = copy_header(meta, scratch, read)?;
    check_header(meta, header, channel.gpa_page_limit()).map_err(|e| channel.fail_protocol(e))?;
    Ok(header)
}

/// A GPA-direct packet's ranges, from its header copied into `scratch` once and validated
/// there (a violation fails the channel).
pub(super) fn validated_gpa_ranges<'s>(
    channel: &dyn PacketSource,
    meta: &Received,
    scratch: &'s mut [u8],
    read: impl FnOnce(&mut [u8]) -> Result<(), ChannelError>,
) -> Result<crate::packet::GpaRanges<'s>, ChannelError> {
    if meta.packet_type != PacketType::GpaDirect {
        return Err(ChannelError::NotGpaDirect {
            packet_type: meta.packet_type,
        });
    }
    let header = copy_header(meta, scratch, read)?;
    parse_gpa_header(header, channel.gpa_page_limit()).map_err(|e| channel.fail_protocol(e))
}

pub(super) enum Source {
    Ring(PacketInfo),
    /// The front of the channel's queue.
    #[cfg(feature = "alloc")]
    Queued(Received),
}

/// A received packet read in place. Consumed when dropped or committed.
pub struct RecvGuard<'c, M: RingMem, D: Doorbell> {
    channel: &'c Channel<M, D>,
    rx: Guard<'c, RxState<M>>,
    /// `None` once consumed.
    source: Option<Source>,
}

impl<M: RingMem, D: Doorbell> core::fmt::Debug for RecvGuard<'_, M, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RecvGuard")
            .field("packet", &self.meta())
            .finish_non_exhaustive()
    }
}

impl<M: RingMem, D: Doorbell> RecvGuard<'_, M, D> {
    /// The packet's type, transaction id and lengths.
    pub fn meta(&self) -> Received {
        match &self.source {
            Some(Source::Ring(info)) => Received::from_info(info),
            #[cfg(feature = "alloc")]
            Some(Source::Queued(meta)) => *meta,
            None => Received {
                packet_type: PacketType::InBand,
                transaction_id: 0,
                completion_requested: false,
                header_len: 0,
                payload_len: 0,
            },
        }
    }

    /// Copies `buf.len()` bytes of the header (`header`) or payload at `offset` into `buf`.
    pub(super) fn read(
        &mut self,
        header: bool,
        offset: usize,
        buf: &mut [u8],
    ) -> Result<(), ChannelError> {
        let out_of_bounds = ChannelError::OutOfBounds {
            offset,
            len: buf.len(),
            size: 0,
        };
        match &self.source {
            Some(Source::Ring(info)) => match self.rx.reader.packet(info) {
                Some(p) if header => p.read_header(offset, buf),
                Some(p) => p.read_payload(offset, buf),
                None => return Err(out_of_bounds),
            }
            .map_err(|e| self.channel.read_error(e)),
            None => Err(out_of_bounds),
            #[cfg(feature = "alloc")]
            Some(Source::Queued(meta)) => {
                let data = self.rx.queue.front().map_or(&[][..], |(_, d)| d);
                let (start, size) = if header {
                    (0, meta.header_len)
                } else {
                    (meta.header_len, meta.payload_len)
                };
                copy_region(data, start, size, offset, buf)
            }
        }
    }

    /// Copies part of the payload into `buf`.
    pub fn read_payload(&mut self, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError> {
        self.read(false, offset, buf)
    }

    /// Copies the whole extra header (GPA ranges, transfer pages) into `scratch` once,
    /// validates that copy and returns it: the bytes returned are exactly the bytes that
    /// were checked, whatever the peer writes to the ring meanwhile. A malformed header
    /// fails the channel; a `scratch` shorter than the header is
    /// [`ChannelError::BufferTooSmall`].
    pub fn header<'s>(&mut self, scratch: &'s mut [u8]) -> Result<&'s [u8], ChannelError> {
        let (channel, meta) = (self.channel, self.meta());
        validated_header(channel, &meta, scratch, |h| self.read(true, 0, h))
    }

    /// Copies a GPA-direct packet's header into `scratch` once and returns its ranges,
    /// validated in that copy (a malformed header fails the channel).
    /// [`ChannelError::NotGpaDirect`] for other packets.
    pub fn gpa_ranges<'s>(
        &mut self,
        scratch: &'s mut [u8],
    ) -> Result<crate::packet::GpaRanges<'s>, ChannelError> {
        let (channel, meta) = (self.channel, self.meta());
        validated_gpa_ranges(channel, &meta, scratch, |h| self.read(true, 0, h))
    }

    /// Consumes the packet and publishes the read index now, returning any doorbell error.
    pub fn commit(mut self) -> Result<(), ChannelError> {
        self.finish()
    }

    pub(super) fn finish(&mut self) -> Result<(), ChannelError> {
        match self.source.take() {
            None => Ok(()),
            Some(Source::Ring(info)) => {
                let meta = Received::from_info(&info);
                if self.rx.reader.packet(&info).is_some() {
                    self.channel.consume(&mut self.rx.reader, &info);
                    if meta.packet_type == PacketType::Completion {
                        self.channel.txns.release_polled(meta.transaction_id);
                    }
                }
                self.channel.commit_rx(&mut self.rx)
            }
            #[cfg(feature = "alloc")]
            Some(Source::Queued(_)) => {
                self.rx.queue.pop();
                // Queue space freed: callers blocked on a full queue may go on.
                self.channel.hub.notify(&self.channel.doorbell);
                Ok(())
            }
        }
    }
}

impl<M: RingMem, D: Doorbell> Drop for RecvGuard<'_, M, D> {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

pub(super) enum BatchSource<'a, 'r, M: RingMem> {
    Ring(&'a vmlink_ring::IncomingPacket<'r, M>),
    #[cfg(feature = "alloc")]
    Queued(&'a [u8]),
}

/// One packet of a receive batch, read in place.
pub struct BatchPacket<'a, 'r, M: RingMem> {
    meta: Received,
    source: BatchSource<'a, 'r, M>,
    channel: &'a dyn PacketSource,
}

impl<M: RingMem> core::fmt::Debug for BatchPacket<'_, '_, M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BatchPacket")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

impl<M: RingMem> BatchPacket<'_, '_, M> {
    /// The packet's type, transaction id and lengths.
    pub fn meta(&self) -> Received {
        self.meta
    }

    /// Copies part of the payload into `buf`.
    pub fn read_payload(&self, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError> {
        match &self.source {
            BatchSource::Ring(p) => p
                .read_payload(offset, buf)
                .map_err(|e| self.channel.read_error(e)),
            #[cfg(feature = "alloc")]
            BatchSource::Queued(data) => {
                let start = self.meta.header_len;
                let size = self.meta.payload_len;
                copy_region(data, start, size, offset, buf)
            }
        }
    }

    pub(super) fn copy_whole_header(&self, buf: &mut [u8]) -> Result<(), ChannelError> {
        match &self.source {
            BatchSource::Ring(p) => p
                .read_header(0, buf)
                .map_err(|e| self.channel.read_error(e)),
            #[cfg(feature = "alloc")]
            BatchSource::Queued(data) => copy_region(data, 0, self.meta.header_len, 0, buf),
        }
    }

    /// Copies the whole extra header into `scratch` once, validates that copy and returns
    /// it (see [`RecvGuard::header`]).
    pub fn header<'s>(&self, scratch: &'s mut [u8]) -> Result<&'s [u8], ChannelError> {
        validated_header(self.channel, &self.meta, scratch, |h| {
            self.copy_whole_header(h)
        })
    }

    /// A GPA-direct packet's ranges, validated in a copy of its header in `scratch` (see
    /// [`RecvGuard::gpa_ranges`]).
    pub fn gpa_ranges<'s>(
        &self,
        scratch: &'s mut [u8],
    ) -> Result<crate::packet::GpaRanges<'s>, ChannelError> {
        validated_gpa_ranges(self.channel, &self.meta, scratch, |h| {
            self.copy_whole_header(h)
        })
    }
}
