//! The wire format of vmlink's disk, and the decoder the host runs on every request.
//!
//! A request is a packet that asks for a completion. Reads and writes are GPA-direct
//! packets: their ranges name the guest's buffers in the buffer area, and their in-band
//! payload is a [`RequestHeader`]. Flush, discard and info are in-band packets whose
//! payload is a [`RequestHeader`]. Every completion's payload starts with a status word
//! and a detail word ([`Completion`]); info's goes on with the disk's geometry
//! ([`DiskInfo`]). All fields are little-endian.
//!
//! | offset | request header field | rule |
//! | --- | --- | --- |
//! | 0 | op u8 | [`Op`]: 1 read, 2 write, 3 flush, 4 discard, 5 info |
//! | 1 | flags u8 | bit 0 ([`FLAG_FUA`]): a write reaches stable storage before it completes; other bits zero |
//! | 2 | reserved u16 | zero |
//! | 4 | sectors u32 | 512-byte sectors: 1 ..= [`MAX_TRANSFER`] / 512 for read, write and discard; 0 otherwise |
//! | 8 | sector u64 | the first sector; the request must end inside the disk; 0 for flush and info |
//!
//! The decoder ([`decode`]) turns a request's descriptor, ranges and payload into a
//! [`Plan`] or a [`Status`], checking everything: the header's length and reserved bits,
//! the op and its packet type, the sector range against the disk, the ranges against the
//! buffer area, 512-byte alignment of every range's offset and length, and that the ranges
//! hold exactly the request's bytes. A plan's segments are byte ranges of the buffer area
//! in disk order, adjacent pages merged, held in a fixed array: nothing is allocated, and
//! nothing the peer sends sizes anything.

use core::ops::Range;

use vmlink_channel::PacketType;
use vmlink_channel::packet::GpaRanges;

/// The size of a sector: requests count in these.
pub const SECTOR_SIZE: u32 = 512;
/// The most bytes one read or write moves (and one discard covers): 1 MiB.
pub const MAX_TRANSFER: u32 = 1 << 20;
/// The most buffer-area segments one request may name after adjacent pages are merged:
/// enough for [`MAX_TRANSFER`] bytes in 512-byte pieces, each on its own page.
pub const MAX_SEGMENTS: usize = (MAX_TRANSFER / SECTOR_SIZE) as usize;
/// The GPA page limit a disk channel needs for the largest request: its pages plus one
/// for a range that starts part-way into a page.
pub const MAX_REQUEST_PAGES: u64 = (MAX_TRANSFER / 4096) as u64 + 1;
/// A request header's length.
pub const REQUEST_LEN: usize = 16;
/// A completion's length (info's carries [`DiskInfo`] after it).
pub const COMPLETION_LEN: usize = 8;
/// An info completion's length.
pub const INFO_LEN: usize = COMPLETION_LEN + 24;
/// Request flag: force unit access (the write is durable when it completes).
pub const FLAG_FUA: u8 = 1;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Read sectors into the ranges' buffers (a GPA-direct packet).
    Read = 1,
    /// Write the ranges' buffers to sectors (a GPA-direct packet).
    Write = 2,
    /// Make every completed write durable (in-band).
    Flush = 3,
    /// Forget sectors' contents; later reads return zeros (in-band).
    Discard = 4,
    /// Ask for the disk's geometry (in-band).
    Info = 5,
}

impl Op {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Read,
            2 => Self::Write,
            3 => Self::Flush,
            4 => Self::Discard,
            5 => Self::Info,
            _ => return None,
        })
    }
}

/// A completion's status: why a request was refused or failed. Anything but
/// [`Status::Ok`] changed nothing on the disk, except [`Status::Io`], which says the host's
/// own I/O failed part-way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum Status {
    /// Done.
    #[error("done")]
    Ok,
    /// The op byte names no operation.
    #[error("an unknown operation")]
    UnknownOp,
    /// The header is the wrong length, has reserved bits set, or the packet's type does not
    /// fit the op (a read without ranges, a flush with them).
    #[error("a malformed request")]
    Malformed,
    /// The sectors do not lie inside the disk.
    #[error("sectors past the end of the disk")]
    OutOfRange,
    /// A range's offset or length is not a whole number of sectors.
    #[error("a buffer not aligned to 512-byte sectors")]
    Misaligned,
    /// The ranges name pages outside the buffer area, or do not hold exactly the request's
    /// bytes, or need more than [`MAX_SEGMENTS`] segments.
    #[error("buffers outside the buffer area or of the wrong size")]
    BadBuffer,
    /// A write or discard to a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// More than [`MAX_TRANSFER`] bytes, or no sectors at all where some are needed.
    #[error("a transfer of the wrong size")]
    BadLength,
    /// The disk cannot do this (discard on a file system without hole punching).
    #[error("not supported by this disk")]
    Unsupported,
    /// The host's I/O failed; the detail word is its errno.
    #[error("an I/O error on the host")]
    Io,
    /// A status this version does not know.
    #[error("status {0} (unknown)")]
    Other(u32),
}

impl Status {
    /// The wire value.
    pub fn code(self) -> u32 {
        match self {
            Self::Ok => 0,
            Self::UnknownOp => 1,
            Self::Malformed => 2,
            Self::OutOfRange => 3,
            Self::Misaligned => 4,
            Self::BadBuffer => 5,
            Self::ReadOnly => 6,
            Self::BadLength => 7,
            Self::Unsupported => 8,
            Self::Io => 9,
            Self::Other(code) => code,
        }
    }

    /// The status of a wire value.
    pub fn from_code(code: u32) -> Self {
        match code {
            0 => Self::Ok,
            1 => Self::UnknownOp,
            2 => Self::Malformed,
            3 => Self::OutOfRange,
            4 => Self::Misaligned,
            5 => Self::BadBuffer,
            6 => Self::ReadOnly,
            7 => Self::BadLength,
            8 => Self::Unsupported,
            9 => Self::Io,
            other => Self::Other(other),
        }
    }
}

/// A request's fixed header, as the guest sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestHeader {
    /// The op byte (see [`Op`]).
    pub op: u8,
    /// Flags ([`FLAG_FUA`]).
    pub flags: u8,
    /// 512-byte sectors.
    pub sectors: u32,
    /// The first sector.
    pub sector: u64,
}

impl RequestHeader {
    /// A header for `op`.
    pub fn new(op: Op, sector: u64, sectors: u32) -> Self {
        Self {
            op: op as u8,
            flags: 0,
            sectors,
            sector,
        }
    }

    /// Its bytes.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0] = self.op;
        b[1] = self.flags;
        b[4..8].copy_from_slice(&self.sectors.to_le_bytes());
        b[8..16].copy_from_slice(&self.sector.to_le_bytes());
        b
    }

    /// Parses a payload: exactly [`REQUEST_LEN`] bytes (the ring pads payloads to 8, which
    /// this length already is), reserved bytes zero, only known flags.
    pub fn decode(payload: &[u8]) -> Result<Self, Status> {
        let b: &[u8; REQUEST_LEN] = payload.try_into().map_err(|_| Status::Malformed)?;
        if b[2] != 0 || b[3] != 0 || b[1] & !FLAG_FUA != 0 {
            return Err(Status::Malformed);
        }
        Ok(Self {
            op: b[0],
            flags: b[1],
            sectors: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            sector: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        })
    }
}

/// A completion's fixed part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Completion {
    /// What happened.
    pub status: Status,
    /// For [`Status::Io`], the host's errno; otherwise 0.
    pub detail: u32,
}

impl Completion {
    /// Success.
    pub const OK: Self = Self {
        status: Status::Ok,
        detail: 0,
    };

    /// Its bytes.
    pub fn encode(&self) -> [u8; COMPLETION_LEN] {
        let mut b = [0u8; COMPLETION_LEN];
        b[..4].copy_from_slice(&self.status.code().to_le_bytes());
        b[4..].copy_from_slice(&self.detail.to_le_bytes());
        b
    }

    /// Parses the front of a completion's payload; `None` when it is too short.
    pub fn decode(payload: &[u8]) -> Option<Self> {
        let b = payload.get(..COMPLETION_LEN)?;
        Some(Self {
            status: Status::from_code(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            detail: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        })
    }
}

/// What the host tells the guest about the disk (the info completion, after its status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DiskInfo {
    /// The disk's size in 512-byte sectors.
    pub sectors: u64,
    /// Writes and discards are refused.
    pub read_only: bool,
    /// Discard frees space (otherwise it is refused as [`Status::Unsupported`]).
    pub discard: bool,
    /// The most bytes one request moves ([`MAX_TRANSFER`] from this version's hosts).
    pub max_transfer: u32,
}

const INFO_READ_ONLY: u32 = 1;
const INFO_DISCARD: u32 = 2;

impl DiskInfo {
    /// The disk's size in bytes.
    pub fn len(&self) -> u64 {
        self.sectors * u64::from(SECTOR_SIZE)
    }

    /// True for a disk of no sectors.
    pub fn is_empty(&self) -> bool {
        self.sectors == 0
    }

    /// The info completion's bytes: status OK, then the geometry.
    pub fn encode(&self) -> [u8; INFO_LEN] {
        let mut b = [0u8; INFO_LEN];
        b[..COMPLETION_LEN].copy_from_slice(&Completion::OK.encode());
        let flags = if self.read_only { INFO_READ_ONLY } else { 0 }
            | if self.discard { INFO_DISCARD } else { 0 };
        b[8..16].copy_from_slice(&self.sectors.to_le_bytes());
        b[16..20].copy_from_slice(&SECTOR_SIZE.to_le_bytes());
        b[20..24].copy_from_slice(&flags.to_le_bytes());
        b[24..28].copy_from_slice(&self.max_transfer.to_le_bytes());
        b
    }

    /// Parses an info completion; `None` unless it is long enough, says OK, and describes
    /// a disk of 512-byte sectors with a transfer limit of at least one sector.
    pub fn decode(payload: &[u8]) -> Option<Self> {
        let b: &[u8; INFO_LEN] = payload.get(..INFO_LEN)?.try_into().ok()?;
        if Completion::decode(b)? != Completion::OK {
            return None;
        }
        let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let sectors = u64::from(word(8)) | u64::from(word(12)) << 32;
        let (sector_size, flags, max_transfer) = (word(16), word(20), word(24));
        if sector_size != SECTOR_SIZE || max_transfer < SECTOR_SIZE {
            return None;
        }
        sectors.checked_mul(u64::from(SECTOR_SIZE))?;
        Some(Self {
            sectors,
            read_only: flags & INFO_READ_ONLY != 0,
            discard: flags & INFO_DISCARD != 0,
            max_transfer: max_transfer.min(MAX_TRANSFER),
        })
    }
}

/// What the host knows when it decodes a request: the disk and the buffer area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The disk's size in sectors.
    pub sectors: u64,
    /// Writes and discards are refused.
    pub read_only: bool,
    /// Where in the buffer area request buffers may lie, in bytes: the guest's half. (A
    /// page number past the whole area never gets here: the transport fails the channel.)
    pub buffers: Range<usize>,
}

/// A decoded, validated request: what the host does. One plan is reused for every
/// request ([`decode`] fills it), so its fixed segment table is never moved.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The operation.
    pub op: Op,
    /// [`FLAG_FUA`] was set on a write.
    pub fua: bool,
    /// The first byte on the disk.
    pub offset: u64,
    /// Bytes on the disk (0 for flush and info).
    pub len: u64,
    segments: [Range<usize>; MAX_SEGMENTS],
    count: usize,
}

impl Plan {
    /// The buffer-area byte ranges a read fills or a write takes, in disk order (empty for
    /// the in-band ops). Together they hold exactly [`len`](Self::len) bytes.
    pub fn segments(&self) -> &[Range<usize>] {
        &self.segments[..self.count]
    }

    /// An empty plan for [`decode`] to fill.
    pub fn new() -> Self {
        Self {
            op: Op::Info,
            fua: false,
            offset: 0,
            len: 0,
            segments: [const { 0..0 }; MAX_SEGMENTS],
            count: 0,
        }
    }

    fn set(&mut self, op: Op, fua: bool, offset: u64, len: u64) {
        (self.op, self.fua, self.offset, self.len, self.count) = (op, fua, offset, len, 0);
    }

    /// Appends a segment, merging it into the last one when they touch.
    fn push(&mut self, seg: Range<usize>) -> Result<(), Status> {
        if let Some(last) = self.count.checked_sub(1).map(|i| &mut self.segments[i])
            && last.end == seg.start
        {
            last.end = seg.end;
            return Ok(());
        }
        let slot = self.segments.get_mut(self.count).ok_or(Status::BadBuffer)?;
        *slot = seg;
        self.count += 1;
        Ok(())
    }
}

impl Default for Plan {
    fn default() -> Self {
        Self::new()
    }
}

/// Decodes and validates one request into `plan`: its packet type, its payload (the whole
/// in-band payload, read once) and, for a GPA-direct packet, its ranges (validated by the
/// channel in a private copy). Every refusal is the [`Status`] its completion carries, and
/// leaves `plan` meaning nothing.
pub fn decode(
    packet_type: PacketType,
    payload: &[u8],
    ranges: Option<GpaRanges<'_>>,
    limits: &Limits,
    plan: &mut Plan,
) -> Result<(), Status> {
    let header = RequestHeader::decode(payload)?;
    let op = Op::from_byte(header.op).ok_or(Status::UnknownOp)?;
    let gpa = packet_type == PacketType::GpaDirect;
    let wants_ranges = matches!(op, Op::Read | Op::Write);
    if gpa != wants_ranges || (!gpa && packet_type != PacketType::InBand) {
        return Err(Status::Malformed);
    }
    if header.flags != 0 && op != Op::Write {
        return Err(Status::Malformed);
    }
    let sector_size = u64::from(SECTOR_SIZE);
    match op {
        Op::Flush | Op::Info => {
            if header.sectors != 0 || header.sector != 0 {
                return Err(Status::Malformed);
            }
            plan.set(op, false, 0, 0);
            return Ok(());
        }
        Op::Read | Op::Write | Op::Discard => {}
    }
    let len = u64::from(header.sectors) * sector_size;
    if header.sectors == 0 || len > u64::from(MAX_TRANSFER) {
        return Err(Status::BadLength);
    }
    match header.sector.checked_add(u64::from(header.sectors)) {
        Some(end) if end <= limits.sectors => {}
        _ => return Err(Status::OutOfRange),
    }
    if limits.read_only && op != Op::Read {
        return Err(Status::ReadOnly);
    }
    // Inside the disk, so inside any file; checked for a `Limits` that claims more.
    let offset = header
        .sector
        .checked_mul(sector_size)
        .ok_or(Status::OutOfRange)?;
    plan.set(op, header.flags & FLAG_FUA != 0, offset, len);
    let Some(ranges) = ranges else {
        return Ok(());
    };
    let page = 4096u64;
    let mut total = 0u64;
    for range in ranges {
        let (offset, count) = (u64::from(range.byte_offset), u64::from(range.byte_count));
        if !offset.is_multiple_of(sector_size) || !count.is_multiple_of(sector_size) {
            return Err(Status::Misaligned);
        }
        total += count;
        if total > len {
            return Err(Status::BadBuffer);
        }
        // The channel checked that the pages are exactly those the range spans.
        let (mut skip, mut left) = (offset, count);
        for pfn in range.pages() {
            let start = pfn
                .checked_mul(page)
                .and_then(|s| s.checked_add(skip))
                .ok_or(Status::BadBuffer)?;
            let take = left.min(page - skip);
            let end = start.checked_add(take).ok_or(Status::BadBuffer)?;
            if start < limits.buffers.start as u64 || end > limits.buffers.end as u64 {
                return Err(Status::BadBuffer);
            }
            // Both fit in the area's usize length.
            plan.push(start as usize..end as usize)?;
            (skip, left) = (0, left - take);
        }
    }
    if total != len {
        return Err(Status::BadBuffer);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmlink_channel::packet::{GpaRange, encode_gpa_header, gpa_header_len, parse_gpa_header};

    /// The first page of the guest's half.
    const G: u64 = 8192;

    const LIMITS: Limits = Limits {
        sectors: 1 << 20,
        read_only: false,
        buffers: 32 << 20..64 << 20,
    };

    /// Runs the decoder on a GPA-direct request over `ranges`.
    fn gpa(
        header: RequestHeader,
        ranges: &[GpaRange<'_>],
        limits: &Limits,
    ) -> Result<Plan, Status> {
        let len = gpa_header_len(ranges, None).unwrap();
        let mut bytes = vec![0u8; len];
        encode_gpa_header(ranges, |at, b| bytes[at..at + b.len()].copy_from_slice(b));
        let parsed = parse_gpa_header(&bytes, None).unwrap();
        let mut plan = Plan::new();
        decode(
            PacketType::GpaDirect,
            &header.encode(),
            Some(parsed),
            limits,
            &mut plan,
        )
        .map(|()| plan)
    }

    fn in_band_with(
        ty: PacketType,
        header: RequestHeader,
        limits: &Limits,
    ) -> Result<Plan, Status> {
        let mut plan = Plan::new();
        decode(ty, &header.encode(), None, limits, &mut plan).map(|()| plan)
    }

    fn in_band(header: RequestHeader) -> Result<Plan, Status> {
        in_band_with(PacketType::InBand, header, &LIMITS)
    }

    #[test]
    fn a_read_over_scattered_pages_becomes_merged_segments_in_order() {
        let pages = [G + 7, G + 8, G + 9, G + 3];
        let ranges = [GpaRange {
            byte_offset: 512,
            byte_count: 4 * 4096 - 1024,
            pages: &pages,
        }];
        let plan = gpa(RequestHeader::new(Op::Read, 10, 30), &ranges, &LIMITS).unwrap();
        assert_eq!((plan.op, plan.offset, plan.len), (Op::Read, 5120, 15360));
        let at = |page: u64| (page * 4096) as usize;
        assert_eq!(
            plan.segments(),
            [at(G + 7) + 512..at(G + 10), at(G + 3)..at(G + 3) + 3584]
        );
        // Two ranges, the second continuing the first: still one segment.
        let (a, b) = ([G + 20], [G + 20]);
        let ranges = [
            GpaRange {
                byte_offset: 0,
                byte_count: 1024,
                pages: &a,
            },
            GpaRange {
                byte_offset: 1024,
                byte_count: 1024,
                pages: &b,
            },
        ];
        let plan = gpa(RequestHeader::new(Op::Write, 0, 4), &ranges, &LIMITS).unwrap();
        assert_eq!(plan.segments().len(), 1);
        assert_eq!(plan.segments()[0], at(G + 20)..at(G + 20) + 2048);
    }

    #[test]
    fn every_bad_request_gets_its_status() {
        let page = [G + 1];
        let one = [GpaRange {
            byte_offset: 0,
            byte_count: 4096,
            pages: &page,
        }];
        let read = |sector, sectors| RequestHeader::new(Op::Read, sector, sectors);
        // Past the end, at the end, overflowing.
        assert_eq!(
            gpa(read((1 << 20) - 7, 8), &one, &LIMITS).unwrap_err(),
            Status::OutOfRange
        );
        assert!(gpa(read((1 << 20) - 8, 8), &one, &LIMITS).is_ok());
        assert_eq!(
            gpa(read(u64::MAX - 2, 8), &one, &LIMITS).unwrap_err(),
            Status::OutOfRange
        );
        // Buffers: too few bytes, too many, outside the area, misaligned.
        assert_eq!(
            gpa(read(0, 9), &one, &LIMITS).unwrap_err(),
            Status::BadBuffer
        );
        assert_eq!(
            gpa(read(0, 7), &one, &LIMITS).unwrap_err(),
            Status::BadBuffer
        );
        for page in [(64 << 20) / 4096, G - 1, 0] {
            let outside = [GpaRange {
                byte_offset: 0,
                byte_count: 4096,
                pages: &[page],
            }];
            assert_eq!(
                gpa(read(0, 8), &outside, &LIMITS).unwrap_err(),
                Status::BadBuffer
            );
        }
        let huge = [u64::MAX / 2];
        let wrap = [GpaRange {
            byte_offset: 0,
            byte_count: 4096,
            pages: &huge,
        }];
        assert_eq!(
            gpa(read(0, 8), &wrap, &LIMITS).unwrap_err(),
            Status::BadBuffer
        );
        let odd = [GpaRange {
            byte_offset: 100,
            byte_count: 512,
            pages: &page,
        }];
        assert_eq!(
            gpa(read(0, 1), &odd, &LIMITS).unwrap_err(),
            Status::Misaligned
        );
        let short = [GpaRange {
            byte_offset: 0,
            byte_count: 500,
            pages: &page,
        }];
        assert_eq!(
            gpa(read(0, 1), &short, &LIMITS).unwrap_err(),
            Status::Misaligned
        );
        // Lengths.
        assert_eq!(
            gpa(read(0, 0), &one, &LIMITS).unwrap_err(),
            Status::BadLength
        );
        assert_eq!(
            gpa(read(0, 2049), &one, &LIMITS).unwrap_err(),
            Status::BadLength
        );
        // Read-only.
        let ro = Limits {
            read_only: true,
            ..LIMITS
        };
        let write = RequestHeader::new(Op::Write, 0, 8);
        assert_eq!(gpa(write, &one, &ro).unwrap_err(), Status::ReadOnly);
        assert!(gpa(read(0, 8), &one, &ro).is_ok());
        let discard = RequestHeader::new(Op::Discard, 0, 8);
        assert_eq!(
            in_band_with(PacketType::InBand, discard, &ro).unwrap_err(),
            Status::ReadOnly
        );
        // Ops and their packet types.
        let unknown = RequestHeader {
            op: 9,
            ..read(0, 8)
        };
        assert_eq!(gpa(unknown, &one, &LIMITS).unwrap_err(), Status::UnknownOp);
        assert_eq!(in_band(read(0, 8)).unwrap_err(), Status::Malformed);
        assert_eq!(
            gpa(RequestHeader::new(Op::Flush, 0, 0), &one, &LIMITS).unwrap_err(),
            Status::Malformed
        );
        assert_eq!(
            in_band(RequestHeader::new(Op::Flush, 0, 1)).unwrap_err(),
            Status::Malformed
        );
        assert_eq!(
            in_band_with(PacketType::TransferPages, discard, &LIMITS).unwrap_err(),
            Status::Malformed
        );
        assert_eq!(
            in_band(RequestHeader::new(Op::Info, 0, 0)).unwrap().op,
            Op::Info
        );
        assert_eq!(in_band(discard).unwrap().len, 4096);
        // Header bytes: length, reserved, flags.
        let mut bytes = read(0, 8).encode();
        bytes[2] = 1;
        assert_eq!(RequestHeader::decode(&bytes), Err(Status::Malformed));
        assert_eq!(RequestHeader::decode(&bytes[..8]), Err(Status::Malformed));
        assert_eq!(RequestHeader::decode(&[0u8; 24]), Err(Status::Malformed));
        let fua_read = RequestHeader {
            flags: FLAG_FUA,
            ..read(0, 8)
        };
        assert_eq!(gpa(fua_read, &one, &LIMITS).unwrap_err(), Status::Malformed);
        let fua_write = RequestHeader {
            flags: FLAG_FUA,
            ..write
        };
        assert!(gpa(fua_write, &one, &LIMITS).unwrap().fua);
        let odd_flag = RequestHeader { flags: 2, ..write };
        assert_eq!(gpa(odd_flag, &one, &LIMITS).unwrap_err(), Status::Malformed);
    }

    #[test]
    fn a_page_at_the_top_of_the_address_space_is_refused_not_overflowed() {
        // With no page limit on the channel, the last page a u64 address can hold: its
        // last sector ends one past u64::MAX.
        let pages = [u64::MAX / 4096];
        let ranges = [GpaRange {
            byte_offset: 3584,
            byte_count: 512,
            pages: &pages,
        }];
        let got = gpa(RequestHeader::new(Op::Read, 0, 1), &ranges, &LIMITS);
        assert_eq!(got.err(), Some(Status::BadBuffer));
    }

    #[test]
    fn the_largest_request_fits_and_the_segment_table_is_bounded() {
        // 2048 sectors, each on a page of its own: MAX_SEGMENTS segments, all kept.
        let pages: Vec<u64> = (0..2048).map(|i| G + 2 * i).collect();
        let ranges: Vec<GpaRange<'_>> = pages
            .chunks(1)
            .map(|p| GpaRange {
                byte_offset: 0,
                byte_count: 512,
                pages: p,
            })
            .collect();
        let plan = gpa(RequestHeader::new(Op::Read, 0, 2048), &ranges, &LIMITS).unwrap();
        assert_eq!(plan.segments().len(), MAX_SEGMENTS);
        assert_eq!(
            plan.segments().iter().map(|s| s.len()).sum::<usize>(),
            1 << 20
        );
        // 1 MiB in one range starting mid-page: MAX_REQUEST_PAGES pages, one segment.
        let pages: Vec<u64> = (G + 100..G + 100 + MAX_REQUEST_PAGES).collect();
        let ranges = [GpaRange {
            byte_offset: 2048,
            byte_count: 1 << 20,
            pages: &pages,
        }];
        let plan = gpa(RequestHeader::new(Op::Write, 8, 2048), &ranges, &LIMITS).unwrap();
        let start = ((G + 100) * 4096) as usize + 2048;
        assert_eq!(plan.segments().len(), 1);
        assert_eq!(plan.segments()[0], start..start + (1 << 20));
    }

    #[test]
    fn completions_and_info_round_trip() {
        for code in 0..12 {
            let c = Completion {
                status: Status::from_code(code),
                detail: code * 3,
            };
            assert_eq!(Completion::decode(&c.encode()), Some(c));
            assert_eq!(c.status.code(), code);
        }
        assert_eq!(Completion::decode(&[0; 7]), None);
        let info = DiskInfo {
            sectors: 12345,
            read_only: true,
            discard: false,
            max_transfer: MAX_TRANSFER,
        };
        assert_eq!(DiskInfo::decode(&info.encode()), Some(info));
        assert_eq!(info.len(), 12345 * 512);
        let mut bad = info.encode();
        bad[17] = 4; // 1024-byte sectors
        assert_eq!(DiskInfo::decode(&bad), None);
        let mut refused = info.encode();
        refused[0] = 5;
        assert_eq!(DiskInfo::decode(&refused), None);
        let mut huge = info.encode();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(DiskInfo::decode(&huge), None);
        assert_eq!(DiskInfo::decode(&info.encode()[..20]), None);
    }
}
