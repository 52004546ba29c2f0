//! Receiving: the copying, in-place and batch paths, and the one packet view.

use super::*;

impl<'a, R: PacketRx, D: Doorbell, TC, RC: Half<Item = RxState<R>>> Ops<'a, D, TC, RC> {
    // ---- receiving ---------------------------------------------------------------------

    /// Takes the next packet meant for a receiver off the incoming ring, dealing with
    /// completions for waiting callers on the way. Consumed packets are not yet committed.
    #[inline(always)]
    pub(crate) fn next_for_receiver(
        &self,
        rx: &mut RxState<R>,
    ) -> Result<Option<Received>, ChannelError> {
        loop {
            let info = match rx.link.peek() {
                Ok(Some(info)) => info,
                Ok(None) => return Ok(None),
                Err(e) => return Err(self.link_error(e)),
            };
            // Extra headers are validated where they are copied out, never in the ring.
            if info.packet_type != PacketType::Completion || self.route_completion(rx, &info)? {
                return Ok(Some(info));
            }
        }
    }

    /// Routes the completion at the head: true when it is for the receiver (a polled
    /// call's), false when it was taken here (a late one, or a waiting caller's).
    #[inline(never)]
    fn route_completion(&self, rx: &mut RxState<R>, info: &Received) -> Result<bool, ChannelError> {
        match self.live.txns.route(info.transaction_id) {
            Route::Polled => Ok(true),
            Route::Unknown => Err(self.fail(ProtocolError::UnknownTransaction {
                transaction_id: info.transaction_id,
            })),
            Route::Late(index) => {
                self.live.txns.free_late(index);
                bump(&self.live.counters.rx.late_completions, 1);
                self.consume(&mut rx.link, info);
                Ok(false)
            }
            #[cfg(feature = "alloc")]
            Route::Waiting(index) => {
                // Stored only when it fits the caller's buffer: a peer cannot make the
                // channel hold more than its callers asked to receive.
                let needed = info.payload_len;
                let stored = &mut rx.stored[index];
                stored.clear();
                if needed <= self.call_capacity[index].load(Ordering::Acquire) {
                    stored.resize(needed, 0);
                    rx.link
                        .read_payload(0, stored)
                        .map_err(|e| self.link_error(e))?;
                }
                rx.stored_len[index] = needed;
                self.consume(&mut rx.link, info);
                if !self.live.txns.mark_done(index) {
                    bump(&self.live.counters.rx.late_completions, 1);
                }
                self.hub.notify(&self.doorbell);
                Ok(false)
            }
            #[cfg(not(feature = "alloc"))]
            Route::Waiting(_) => Ok(true),
        }
    }

    /// Consumes the packet at the head (not yet committed) and counts it.
    #[inline]
    pub(crate) fn consume(&self, link: &mut R, info: &Received) {
        link.consume();
        bump_held(&self.live.counters.rx.packets_received, 1);
        bump_held(
            &self.live.counters.rx.bytes_received,
            vmlink_ring::protocol::packet_len(info.header_len, info.payload_len).unwrap_or(0)
                as u64,
        );
    }

    /// Commits consumed packets and signals the writer if it waits for the space. A writer
    /// that has left needs no signal: that is not an error here, as the packets just
    /// consumed must still reach the receiver (the channel notes the departure).
    ///
    /// Packets left behind are announced to the channel's other waiters: a writer that
    /// saw this receive move the read index while it published took the reader for awake
    /// and did not signal, so a thread asleep in the doorbell would not learn of them.
    pub(crate) fn commit_rx(&self, rx: &mut RxState<R>) -> Result<(), ChannelError> {
        let consumed = rx.link.has_uncommitted();
        let signal = rx.link.commit();
        if consumed && rx.link.known_available() {
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
    pub(crate) fn take_into(
        &self,
        link: &mut R,
        info: &Received,
        buf: &mut [u8],
    ) -> Result<Received, ChannelError> {
        let meta = *info;
        if meta.len() > buf.len() {
            return Err(ChannelError::BufferTooSmall {
                needed: meta.len(),
                capacity: buf.len(),
            });
        }
        let (h, rest) = buf.split_at_mut(meta.header_len);
        if !h.is_empty() {
            link.read_header(0, h).map_err(|e| self.link_error(e))?;
        }
        check_header(&meta, h, self.config.gpa_page_limit)
            .map_err(|e| self.fail(ProtocolError::Packet(e)))?;
        link.read_payload(0, &mut rest[..meta.payload_len])
            .map_err(|e| self.link_error(e))?;
        self.consume(link, info);
        if meta.packet_type == PacketType::Completion {
            self.live.txns.release_polled(meta.transaction_id);
        }
        Ok(meta)
    }

    #[cfg(feature = "alloc")]
    pub(crate) fn take_queued(
        &self,
        rx: &mut RxState<R>,
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

    /// See the public method of the same name.
    pub(crate) fn try_recv(&self, buf: &mut [u8]) -> Result<Option<Received>, ChannelError> {
        self.try_recv_as(buf, Probe::Doorbell)
    }

    pub(crate) fn try_recv_as(
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
                .map(|info| self.take_into(&mut rx.link, &info, buf));
            self.commit_rx(&mut rx)?;
            drop(rx);
            return match got {
                Some(r) => {
                    self.received();
                    r.map(Some)
                }
                None if gone => Err(ChannelError::Closed),
                None if self.newly_gone(probe) => continue,
                None => Ok(None),
            };
        }
    }

    /// See the public method of the same name.
    pub(crate) fn try_recv_with<X>(
        &self,
        f: impl FnOnce(&mut Packet<'_>) -> X,
    ) -> Result<Option<X>, ChannelError> {
        self.try_recv_with_as(Probe::Doorbell, f)
    }

    pub(crate) fn try_recv_with_as<X>(
        &self,
        probe: Probe,
        f: impl FnOnce(&mut Packet<'_>) -> X,
    ) -> Result<Option<X>, ChannelError> {
        let mut f = Some(f);
        let mut out = None;
        loop {
            let (n, gone) = self.recv_batch_once(1, &mut |p| {
                if let Some(f) = f.take() {
                    out = Some(f(p));
                }
            })?;
            if n > 0 {
                return Ok(out);
            }
            if gone || !self.newly_gone(probe) {
                return Ok(None);
            }
        }
    }

    /// See the public method of the same name.
    pub(crate) fn try_recv_batch(
        &self,
        max: usize,
        mut each: impl FnMut(&mut Packet<'_>),
    ) -> Result<usize, ChannelError> {
        loop {
            match self.recv_batch_once(max, &mut each)? {
                (0, false) if self.newly_gone(Probe::Doorbell) => {}
                (n, _) => return Ok(n),
            }
        }
    }

    /// One batch: how many packets were handled, and whether the peer was known to be
    /// gone before the link was read (`Closed` when that found nothing).
    pub(crate) fn recv_batch_once(
        &self,
        max: usize,
        each: &mut impl FnMut(&mut Packet<'_>),
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
                each(&mut Packet {
                    meta,
                    source: Source::Queued(data),
                    endpoint: self.core,
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
            each(&mut Packet {
                meta: info,
                source: Source::Link(&mut rx.link),
                endpoint: self.core,
            });
            self.consume(&mut rx.link, &info);
            if info.packet_type == PacketType::Completion {
                self.live.txns.release_polled(info.transaction_id);
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
        if n > 0 {
            self.received();
        }
        Ok((n, gone))
    }
}

/// Copies `buf.len()` bytes at `offset` of the `size`-byte region starting at `start` of
/// `data` (a packet copied out of the ring).
#[cfg(feature = "alloc")]
pub(crate) fn copy_region(
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
pub(crate) fn check_header(
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

/// What a packet read in place needs of its endpoint: the GPA page limit to validate a
/// header against, and a way to fail the endpoint when it finds a violation.
pub(super) trait PacketSource {
    fn gpa_page_limit(&self) -> Option<u64>;
    fn link_error(&self, e: ChannelError) -> ChannelError;
    fn fail_protocol(&self, e: crate::packet::PacketError) -> ChannelError;
}

impl<D: Doorbell> PacketSource for Core<D> {
    fn gpa_page_limit(&self) -> Option<u64> {
        self.config.gpa_page_limit
    }

    /// A caller's mistake is its error; a broken link fails the endpoint.
    fn link_error(&self, e: ChannelError) -> ChannelError {
        Core::link_error(self, e)
    }

    fn fail_protocol(&self, e: crate::packet::PacketError) -> ChannelError {
        self.fail(ProtocolError::Packet(e))
    }
}

/// Copies a packet's whole extra header into `scratch` with `read` (one read of the link).
fn copy_header<'s>(
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

enum Source<'a> {
    /// The packet at the head of the receiving half.
    Link(&'a mut dyn PacketRx),
    /// The front of the endpoint's queue.
    #[cfg(feature = "alloc")]
    Queued(&'a [u8]),
}

/// A received packet, read in place: the one view every in-place receive hands out
/// ([`Endpoint::recv_with`], [`Endpoint::recv_batch`], their async twins and the same on a
/// [`Receiver`](crate::Receiver)).
///
/// Reads go straight to the link (ring memory, for a [`Channel`]) or to the endpoint's
/// queue. Extra headers are copied out once into the caller's scratch buffer and validated
/// there: [`header`](Self::header), [`gpa_ranges`](Self::gpa_ranges) and
/// [`transfer_pages`](Self::transfer_pages) hand out exactly the bytes that were checked,
/// whatever the peer writes meanwhile; a malformed header fails the endpoint.
pub struct Packet<'a> {
    meta: Received,
    source: Source<'a>,
    endpoint: &'a dyn PacketSource,
}

impl core::fmt::Debug for Packet<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Packet")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

impl Packet<'_> {
    /// The packet's type, transaction id and lengths.
    pub fn meta(&self) -> Received {
        self.meta
    }

    /// Copies `buf.len()` bytes of the header (`header`) or payload at `offset` into `buf`.
    #[inline]
    fn read(&mut self, header: bool, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError> {
        match &mut self.source {
            Source::Link(link) => if header {
                link.read_header(offset, buf)
            } else {
                link.read_payload(offset, buf)
            }
            .map_err(|e| self.endpoint.link_error(e)),
            #[cfg(feature = "alloc")]
            Source::Queued(data) => {
                let (start, size) = if header {
                    (0, self.meta.header_len)
                } else {
                    (self.meta.header_len, self.meta.payload_len)
                };
                copy_region(data, start, size, offset, buf)
            }
        }
    }

    /// Copies `buf.len()` bytes of the payload, starting at `offset`, into `buf`.
    #[inline]
    pub fn read_payload(&mut self, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError> {
        self.read(false, offset, buf)
    }

    /// Copies the whole extra header (GPA ranges, transfer pages) into `scratch` once,
    /// validates that copy and returns it. A `scratch` shorter than the header is
    /// [`ChannelError::BufferTooSmall`].
    pub fn header<'s>(&mut self, scratch: &'s mut [u8]) -> Result<&'s [u8], ChannelError> {
        let (endpoint, meta) = (self.endpoint, self.meta);
        let header = copy_header(&meta, scratch, |h| self.read(true, 0, h))?;
        check_header(&meta, header, endpoint.gpa_page_limit())
            .map_err(|e| endpoint.fail_protocol(e))?;
        Ok(header)
    }

    /// A GPA-direct packet's ranges, validated in a copy of its header in `scratch`.
    /// [`ChannelError::NotGpaDirect`] for other packets.
    pub fn gpa_ranges<'s>(
        &mut self,
        scratch: &'s mut [u8],
    ) -> Result<crate::packet::GpaRanges<'s>, ChannelError> {
        let (endpoint, meta) = (self.endpoint, self.meta);
        if meta.packet_type != PacketType::GpaDirect {
            return Err(ChannelError::NotGpaDirect {
                packet_type: meta.packet_type,
            });
        }
        let header = copy_header(&meta, scratch, |h| self.read(true, 0, h))?;
        parse_gpa_header(header, endpoint.gpa_page_limit()).map_err(|e| endpoint.fail_protocol(e))
    }

    /// A transfer-page packet's page set and ranges, validated in a copy of its header in
    /// `scratch`. [`ChannelError::NotTransferPages`] for other packets.
    pub fn transfer_pages<'s>(
        &mut self,
        scratch: &'s mut [u8],
    ) -> Result<crate::packet::TransferPages<'s>, ChannelError> {
        let (endpoint, meta) = (self.endpoint, self.meta);
        if meta.packet_type != PacketType::TransferPages {
            return Err(ChannelError::NotTransferPages {
                packet_type: meta.packet_type,
            });
        }
        let header = copy_header(&meta, scratch, |h| self.read(true, 0, h))?;
        parse_transfer_page_header(header).map_err(|e| endpoint.fail_protocol(e))
    }
}
