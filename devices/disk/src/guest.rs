//! The guest side: a disk client over one channel, with many requests in flight.

use core::ops::Range;

use vmlink_channel::packet::GpaRange;
use vmlink_channel::{Packet, PacketType, Wait};
use vmlink_shm::{BufferArea, ShmChannel};

use crate::DiskError;
use crate::proto::{
    COMPLETION_LEN, Completion, DiskInfo, FLAG_FUA, INFO_LEN, MAX_REQUEST_PAGES, Op, RequestHeader,
    SECTOR_SIZE, Status,
};

const PAGE: usize = 4096;

/// A finished request, as [`DiskClient::reap`] hands it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// The id [`DiskClient`]'s submit call returned.
    pub id: u64,
    /// What the host said.
    pub completion: Completion,
}

impl Done {
    /// `Ok` when the host did it, else the refusal as an error.
    pub fn result(&self) -> Result<(), DiskError> {
        match self.completion.status {
            Status::Ok => Ok(()),
            status => Err(DiskError::Refused {
                status,
                detail: self.completion.detail,
            }),
        }
    }
}

/// The guest's side of a disk: one channel and the buffer area it shares with the host.
///
/// Two ways to use it:
/// - Queued, without copies: put data in the guest's half of the buffer area
///   ([`buffers`](Self::buffers), [`area`](Self::area)), [`submit_read`](Self::submit_read)
///   / [`submit_write`](Self::submit_write) naming it (and
///   [`submit_flush`](Self::submit_flush), [`submit_discard`](Self::submit_discard)), up to
///   64 at once, and [`reap`](Self::reap) their completions in any order (or
///   [`reap_into`](Self::reap_into) all that wait at once). The host reads and writes
///   those bytes in place.
/// - Blocking, through a bounce buffer at the end of the guest's half:
///   [`read`](Self::read), [`write`](Self::write), [`flush`](Self::flush),
///   [`discard`](Self::discard), one request at a time (only with nothing queued).
///
/// Arguments are checked before anything is sent ([`DiskError::Invalid`]); what the host
/// refuses comes back as [`DiskError::Refused`] with its [`Status`].
#[derive(Debug)]
pub struct DiskClient {
    channel: ShmChannel,
    area: BufferArea,
    info: DiskInfo,
    buffers: Range<usize>,
    in_flight: usize,
    pages: Box<[u64]>,
    /// What [`reap_into`](Self::reap_into) found after the completions it returned: the
    /// next reap's error.
    failed: Option<DiskError>,
}

impl DiskClient {
    /// Asks the host for the disk's geometry over `channel` and returns a client whose
    /// buffers are the guest's half of `area`.
    pub fn new(channel: ShmChannel, area: BufferArea) -> Result<Self, DiskError> {
        let guest = area.guest_pages();
        let half = guest.start as usize * PAGE..guest.end as usize * PAGE;
        Self::with_buffers(channel, area, half)
    }

    /// A client whose buffers are `buffers`, a page-aligned part of the guest's half of
    /// `area`: how the clients of a channel set (one per sub-channel, all sharing one
    /// buffer area) keep out of each other's buffers.
    pub fn with_buffers(
        channel: ShmChannel,
        area: BufferArea,
        buffers: Range<usize>,
    ) -> Result<Self, DiskError> {
        let guest = area.guest_pages();
        let half = guest.start as usize * PAGE..guest.end as usize * PAGE;
        if buffers.start < half.start
            || buffers.end > half.end
            || !buffers.start.is_multiple_of(PAGE)
            || !buffers.end.is_multiple_of(PAGE)
        {
            return Err(DiskError::Invalid(
                "the buffers are not whole pages of the guest's half of the area",
            ));
        }
        let request = RequestHeader::new(Op::Info, 0, 0).encode();
        let mut reply = [0u8; INFO_LEN + 8];
        let len = channel.call(&request, &mut reply, Wait::Forever)?;
        let info = DiskInfo::decode(&reply[..len.min(reply.len())]).ok_or(DiskError::BadReply)?;
        if buffers.len() < 2 * info.max_transfer as usize {
            return Err(DiskError::BuffersTooSmall {
                len: buffers.len(),
                needed: 2 * info.max_transfer as usize,
            });
        }
        Ok(Self {
            channel,
            area,
            info,
            buffers,
            in_flight: 0,
            pages: vec![0; MAX_REQUEST_PAGES as usize].into_boxed_slice(),
            failed: None,
        })
    }

    /// The disk's geometry.
    pub fn info(&self) -> DiskInfo {
        self.info
    }

    /// The channel (its counters say how many doorbells rang).
    pub fn channel(&self) -> &ShmChannel {
        &self.channel
    }

    /// The buffer area; request buffers lie in [`buffers`](Self::buffers).
    pub fn area(&self) -> &BufferArea {
        &self.area
    }

    /// The bytes of the buffer area for queued requests' buffers: the guest's half, less
    /// the bounce buffer at its end that the blocking calls overwrite (queued requests may
    /// name any of the guest's half; the host refuses the host's half).
    pub fn buffers(&self) -> Range<usize> {
        self.buffers.start..self.bounce().start
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn bounce(&self) -> Range<usize> {
        self.buffers.end - self.info.max_transfer as usize..self.buffers.end
    }

    /// Queues a read of the sectors from `sector` on into `buffer` (bytes of the buffer
    /// area, a whole number of sectors at a sector-aligned offset). Returns its id.
    pub fn submit_read(
        &mut self,
        sector: u64,
        buffer: Range<usize>,
        wait: impl Into<Wait>,
    ) -> Result<u64, DiskError> {
        self.submit_data(RequestHeader::new(Op::Read, sector, 0), buffer, wait.into())
    }

    /// Queues a write of `buffer` to the sectors from `sector` on; with `fua` it is
    /// durable when it completes. Returns its id.
    pub fn submit_write(
        &mut self,
        sector: u64,
        buffer: Range<usize>,
        fua: bool,
        wait: impl Into<Wait>,
    ) -> Result<u64, DiskError> {
        let mut header = RequestHeader::new(Op::Write, sector, 0);
        if fua {
            header.flags = FLAG_FUA;
        }
        self.submit_data(header, buffer, wait.into())
    }

    /// Queues a flush: every write completed before it is durable when it completes.
    pub fn submit_flush(&mut self, wait: impl Into<Wait>) -> Result<u64, DiskError> {
        self.submit_in_band(RequestHeader::new(Op::Flush, 0, 0), wait.into())
    }

    /// Queues a discard of `sectors` sectors from `sector` on.
    pub fn submit_discard(
        &mut self,
        sector: u64,
        sectors: u32,
        wait: impl Into<Wait>,
    ) -> Result<u64, DiskError> {
        self.check_sectors(sector, sectors)?;
        self.submit_in_band(
            RequestHeader::new(Op::Discard, sector, sectors),
            wait.into(),
        )
    }

    fn submit_in_band(&mut self, header: RequestHeader, wait: Wait) -> Result<u64, DiskError> {
        let id = self.channel.start_request(&header.encode(), wait)?;
        self.in_flight += 1;
        Ok(id)
    }

    fn submit_data(
        &mut self,
        mut header: RequestHeader,
        buffer: Range<usize>,
        wait: Wait,
    ) -> Result<u64, DiskError> {
        let sector_size = SECTOR_SIZE as usize;
        let inside = self.buffers.start <= buffer.start && buffer.end <= self.buffers.end;
        if !inside || buffer.start >= buffer.end || !buffer.start.is_multiple_of(sector_size) {
            return Err(DiskError::Invalid(
                "the buffer is not sectors inside the guest's half",
            ));
        }
        if !buffer.len().is_multiple_of(sector_size)
            || buffer.len() > self.info.max_transfer as usize
        {
            return Err(DiskError::Invalid(
                "the buffer is not 1 to max_transfer whole sectors",
            ));
        }
        header.sectors = (buffer.len() / sector_size) as u32;
        self.check_sectors(header.sector, header.sectors)?;
        let first = buffer.start / PAGE;
        let count = (buffer.end - 1) / PAGE - first + 1;
        for (i, slot) in self.pages[..count].iter_mut().enumerate() {
            *slot = (first + i) as u64;
        }
        let ranges = [GpaRange {
            byte_offset: (buffer.start % PAGE) as u32,
            byte_count: buffer.len() as u32,
            pages: &self.pages[..count],
        }];
        let id = self
            .channel
            .start_gpa_request(&ranges, &header.encode(), wait)?;
        self.in_flight += 1;
        Ok(id)
    }

    fn check_sectors(&self, sector: u64, sectors: u32) -> Result<(), DiskError> {
        match sector.checked_add(u64::from(sectors)) {
            Some(end) if end <= self.info.sectors && sectors > 0 => Ok(()),
            _ => Err(DiskError::OutOfRange {
                sector,
                sectors,
                disk: self.info.sectors,
            }),
        }
    }

    /// Takes the next completion, waiting as `wait` allows. A refused request is a
    /// [`Done`] whose [`result`](Done::result) is the error, not an error of `reap`.
    pub fn reap(&mut self, wait: impl Into<Wait>) -> Result<Done, DiskError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let done = self.channel.recv_with(wait, completion)??;
        self.in_flight = self.in_flight.saturating_sub(1);
        Ok(done)
    }

    /// Takes the completions waiting, up to `done.len()`, into `done`, and returns how many:
    /// at least one, waiting for it as `wait` allows (with [`Wait::Now`] it may be 0). They
    /// are taken under one lock and freed with one store of the ring's read index (and at
    /// most one fence), where [`reap`](Self::reap) pays for each: what a guest keeping many
    /// requests in flight reaps with.
    ///
    /// A packet that is not a completion, or one too short, is [`DiskError::BadReply`]: the
    /// completions taken with it (before it or after it) are returned first, and the error
    /// by the next call; no completion the host sent is lost to it.
    ///
    /// ```
    /// use std::thread;
    /// use vmlink_channel::Wait;
    /// use vmlink_disk::proto::Completion;
    /// use vmlink_disk::{Disk, DiskClient, DiskOptions, Done, serve, service};
    /// use vmlink_shm::{Guest, Listener};
    ///
    /// let dir = std::env::temp_dir().join(format!("vmlink-reap-doc-{}", std::process::id()));
    /// let listener = Listener::bind(dir.join("disk.sock"), service("disk"))?;
    /// let image = dir.join("disk.img");
    /// std::fs::File::create(&image)?.set_len(1 << 20)?;
    /// let host = thread::spawn(move || -> Result<(), vmlink_disk::DiskError> {
    ///     let disk = Disk::open(&image, DiskOptions::default())?;
    ///     let endpoint = listener.accept()?;
    ///     serve(&disk, endpoint.channel(), endpoint.buffer())?;
    ///     Ok(())
    /// });
    /// let (channel, memory) = Guest::new("disk").connect(dir.join("disk.sock"))?.into_parts();
    /// let mut client = DiskClient::new(channel, memory.buffer())?;
    ///
    /// // Eight 4 KiB reads in flight, each into a buffer of its own.
    /// let base = client.buffers().start;
    /// for i in 0..8 {
    ///     let buffer = base + i * 4096..base + (i + 1) * 4096;
    ///     client.submit_read(i as u64 * 8, buffer, Wait::Forever)?;
    /// }
    /// let mut done = [Done { id: 0, completion: Completion::OK }; 32];
    /// let mut reaped = 0;
    /// while client.in_flight() > 0 {
    ///     let n = client.reap_into(&mut done, Wait::Forever)?;
    ///     for d in &done[..n] {
    ///         d.result()?;
    ///     }
    ///     reaped += n;
    /// }
    /// assert_eq!(reaped, 8);
    /// drop(client);
    /// host.join().unwrap()?;
    /// std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn reap_into(
        &mut self,
        done: &mut [Done],
        wait: impl Into<Wait>,
    ) -> Result<usize, DiskError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if done.is_empty() {
            return Err(DiskError::Invalid("no room for a completion"));
        }
        let mut n = 0;
        let mut failed = None;
        // Every packet handed here is taken off the ring, so every completion among them
        // is kept, those after a bad packet too; the first error waits its turn.
        self.channel
            .recv_batch(done.len(), wait, |packet| match completion(packet) {
                Ok(d) => {
                    done[n] = d;
                    n += 1;
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            })?;
        self.in_flight = self.in_flight.saturating_sub(n);
        match failed {
            Some(e) if n == 0 => Err(e),
            Some(e) => {
                self.failed = Some(e);
                Ok(n)
            }
            None => Ok(n),
        }
    }

    /// Reads `buf.len()` bytes (whole sectors) from `sector` on, through the bounce buffer.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.chunks(sector, buf.len(), |this, sector, at, bounce| {
            this.blocking(|this| this.submit_read(sector, bounce.clone(), Wait::Forever))?;
            this.area
                .read(bounce.start, &mut buf[at..at + bounce.len()])
                .map_err(|_| DiskError::Invalid("the bounce buffer is outside the area"))
        })
    }

    /// Writes `data` (whole sectors) from `sector` on, through the bounce buffer.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), DiskError> {
        self.chunks(sector, data.len(), |this, sector, at, bounce| {
            this.area
                .write(bounce.start, &data[at..at + bounce.len()])
                .map_err(|_| DiskError::Invalid("the bounce buffer is outside the area"))?;
            this.blocking(|this| this.submit_write(sector, bounce.clone(), false, Wait::Forever))
        })
    }

    /// Makes every completed write durable.
    pub fn flush(&mut self) -> Result<(), DiskError> {
        self.idle()?;
        self.blocking(|this| this.submit_flush(Wait::Forever))
    }

    /// Discards `sectors` sectors from `sector` on.
    pub fn discard(&mut self, sector: u64, sectors: u32) -> Result<(), DiskError> {
        self.idle()?;
        self.blocking(|this| this.submit_discard(sector, sectors, Wait::Forever))
    }

    fn idle(&self) -> Result<(), DiskError> {
        match self.in_flight {
            0 => Ok(()),
            n => Err(DiskError::Busy { in_flight: n }),
        }
    }

    /// Splits `len` bytes from `sector` on into bounce-buffer-sized pieces.
    fn chunks(
        &mut self,
        sector: u64,
        len: usize,
        mut each: impl FnMut(&mut Self, u64, usize, Range<usize>) -> Result<(), DiskError>,
    ) -> Result<(), DiskError> {
        self.idle()?;
        let sector_size = SECTOR_SIZE as usize;
        if !len.is_multiple_of(sector_size) {
            return Err(DiskError::Invalid(
                "the length is not a whole number of sectors",
            ));
        }
        let sectors = u32::try_from(len / sector_size).unwrap_or(u32::MAX);
        self.check_sectors(sector, sectors)?;
        let bounce = self.bounce();
        let mut at = 0;
        while at < len {
            let n = (len - at).min(bounce.len());
            let piece = bounce.start..bounce.start + n;
            each(self, sector + (at / sector_size) as u64, at, piece)?;
            at += n;
        }
        Ok(())
    }

    /// Submits one request and waits for its completion.
    fn blocking(
        &mut self,
        submit: impl FnOnce(&mut Self) -> Result<u64, DiskError>,
    ) -> Result<(), DiskError> {
        let id = submit(self)?;
        let done = self.reap(Wait::Forever)?;
        if done.id != id {
            return Err(DiskError::BadReply);
        }
        done.result()
    }
}

/// A completion packet's request id and what the host said.
fn completion(packet: &mut Packet<'_>) -> Result<Done, DiskError> {
    let meta = packet.meta();
    if meta.packet_type != PacketType::Completion {
        return Err(DiskError::BadReply);
    }
    let mut bytes = [0u8; COMPLETION_LEN];
    let len = meta.payload_len.min(COMPLETION_LEN);
    packet.read_payload(0, &mut bytes[..len])?;
    let completion = Completion::decode(&bytes[..len]).ok_or(DiskError::BadReply)?;
    Ok(Done {
        id: meta.transaction_id,
        completion,
    })
}
