//! GPA-direct and transfer-page headers: building what we send, validating what we receive.
//!
//! A GPA-direct packet names the guest pages its bulk data lives in; a transfer-page packet
//! names ranges of a transfer page set. Both carry their ranges in an extra header between
//! the packet descriptor and the payload (the layouts are in [`protocol`](crate::protocol)).
//!
//! Sending: [`GpaHeader`] and [`TransferPagesHeader`] check ranges once and write the exact
//! header bytes into a caller's buffer ([`GpaHeader::write_to`]) or through a callback
//! ([`GpaHeader::encode`], which fills a reserved packet in place); nothing is allocated.
//! [`OutgoingPacket::gpa_direct`](crate::OutgoingPacket::gpa_direct) and
//! [`OutgoingPacket::transfer_pages`](crate::OutgoingPacket::transfer_pages) build whole
//! packets with them.
//!
//! Receiving: parsing works on bytes already copied out of the ring, so each value is read
//! once; every count, offset and page number is checked with checked arithmetic against the
//! header's length before it is used, and nothing is allocated. [`parse_gpa_header`] and
//! [`parse_transfer_page_header`] hand out iterators over ranges that were validated whole
//! first; [`validate_gpa_header`] and [`validate_transfer_page_header`] check a header read
//! a word at a time from anywhere.
//!
//! # Examples
//!
//! ```
//! use vmlink_ring::header::{GpaHeader, GpaRange, parse_gpa_header};
//!
//! // 6000 bytes starting 512 bytes into page 7: they spill into page 8.
//! let pages = [7, 8];
//! let ranges = [GpaRange { byte_offset: 512, byte_count: 6000, pages: &pages }];
//! let header = GpaHeader::new(&ranges, Some(64))?;
//! let mut buf = [0u8; 64];
//! let bytes = header.write_to(&mut buf)?;
//! assert_eq!(bytes.len(), 8 + 8 + 2 * 8);
//!
//! let range = parse_gpa_header(bytes, Some(64))?.next().expect("one range");
//! assert_eq!((range.byte_offset, range.byte_count), (512, 6000));
//! assert!(range.pages().eq([7, 8]));
//! # Ok::<(), vmlink_ring::header::PacketError>(())
//! ```

use crate::protocol::{
    DESCRIPTOR_SIZE, GpaDirectHeader, GpaRangeHeader, MAX_DESCRIBABLE_PACKET_LEN, PAGE_SIZE,
    TransferPageHeader, TransferPageRange,
};
use zerocopy::{FromBytes, IntoBytes};

/// The longest extra header a packet can carry: the largest packet `length8` describes,
/// less its descriptor.
pub const MAX_HEADER_LEN: usize = MAX_DESCRIBABLE_PACKET_LEN - DESCRIPTOR_SIZE;

/// A packet header is malformed, or cannot be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PacketError {
    /// The header is shorter than its fixed part.
    #[error("a {len}-byte header is too short")]
    HeaderTooShort {
        /// The header's length.
        len: usize,
    },
    /// A GPA-direct or transfer-page packet names no ranges.
    #[error("the packet names no ranges")]
    NoRanges,
    /// The ranges do not fill the header exactly.
    #[error("{}", describe_mismatch(*count, *needed, *len))]
    RangesMismatchHeader {
        /// The range count from the header.
        count: u32,
        /// Bytes the ranges need (`None` when that overflows).
        needed: Option<usize>,
        /// The header's length.
        len: usize,
    },
    /// A range's offset into its first page is not below 4096.
    #[error("range {index}: byte offset {byte_offset} is not below 4096")]
    OffsetPastPage {
        /// Which range.
        index: u32,
        /// The offset.
        byte_offset: u32,
    },
    /// A range is empty.
    #[error("range {index} is empty")]
    EmptyRange {
        /// Which range.
        index: u32,
    },
    /// A range's page list does not match its offset and length.
    #[error("range {index}: {given} page numbers given, {needed} needed")]
    PageCountMismatch {
        /// Which range.
        index: u32,
        /// Pages the range spans.
        needed: usize,
        /// Page numbers supplied.
        given: usize,
    },
    /// A page number is outside what the channel allows.
    #[error("range {index}: page number {page:#x} is not below the limit {limit:#x}")]
    PageOutOfRange {
        /// Which range.
        index: u32,
        /// The page number.
        page: u64,
        /// The first page number not allowed.
        limit: u64,
    },
    /// A transfer-page range's end overflows.
    #[error("range {index}: offset {byte_offset} + count {byte_count} overflows")]
    RangeOverflow {
        /// Which range.
        index: u32,
        /// The offset.
        byte_offset: u32,
        /// The count.
        byte_count: u32,
    },
    /// Ranges to send need a longer header than any packet carries.
    #[error("the ranges need a header longer than the {max} bytes a packet can carry")]
    HeaderTooLong {
        /// The longest header a packet carries ([`MAX_HEADER_LEN`]).
        max: usize,
    },
    /// The buffer given for a header to send is too short for it.
    #[error("a {needed}-byte header does not fit in a {capacity}-byte buffer")]
    BufferTooSmall {
        /// The header's length.
        needed: usize,
        /// The buffer's length.
        capacity: usize,
    },
}

/// `RangesMismatchHeader` in plain words.
struct Mismatch {
    count: u32,
    needed: Option<usize>,
    len: usize,
}

impl core::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let Mismatch { count, needed, len } = self;
        match needed {
            Some(needed) => write!(
                f,
                "the header's {count} ranges need {needed} bytes, but the header has {len}"
            ),
            None => write!(
                f,
                "the header names {count} ranges, more than its {len} bytes can hold"
            ),
        }
    }
}

fn describe_mismatch(count: u32, needed: Option<usize>, len: usize) -> Mismatch {
    Mismatch { count, needed, len }
}

/// Pages spanned by `byte_count` bytes starting `byte_offset` into the first page.
pub fn pages_spanned(byte_offset: u32, byte_count: u32) -> usize {
    // In u64 the sum cannot overflow; the quotient fits in usize on every supported target.
    (u64::from(byte_offset) + u64::from(byte_count)).div_ceil(PAGE_SIZE as u64) as usize
}

/// One GPA range to send: `byte_count` bytes starting `byte_offset` into the first of
/// `pages` (4 KiB page numbers; on the shm transport, page indices into the buffer area).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpaRange<'a> {
    /// Offset of the first byte in the first page; below 4096.
    pub byte_offset: u32,
    /// Bytes in the range; not zero.
    pub byte_count: u32,
    /// One page number per 4 KiB page the range spans.
    pub pages: &'a [u64],
}

impl GpaRange<'_> {
    fn check(&self, index: u32, page_limit: Option<u64>) -> Result<(), PacketError> {
        if self.byte_offset as usize >= PAGE_SIZE {
            return Err(PacketError::OffsetPastPage {
                index,
                byte_offset: self.byte_offset,
            });
        }
        if self.byte_count == 0 {
            return Err(PacketError::EmptyRange { index });
        }
        let needed = pages_spanned(self.byte_offset, self.byte_count);
        if needed != self.pages.len() {
            return Err(PacketError::PageCountMismatch {
                index,
                needed,
                given: self.pages.len(),
            });
        }
        if let Some(limit) = page_limit
            && let Some(&page) = self.pages.iter().find(|&&p| p >= limit)
        {
            return Err(PacketError::PageOutOfRange { index, page, limit });
        }
        Ok(())
    }
}

/// Checks ranges we are about to send and returns the header length they need: at least
/// one range, each well formed (offset below 4096, not empty, one page number per page
/// spanned, each below `page_limit` when one is given), and the whole at most
/// [`MAX_HEADER_LEN`].
pub fn gpa_header_len(
    ranges: &[GpaRange<'_>],
    page_limit: Option<u64>,
) -> Result<usize, PacketError> {
    if ranges.is_empty() {
        return Err(PacketError::NoRanges);
    }
    let too_long = PacketError::HeaderTooLong {
        max: MAX_HEADER_LEN,
    };
    let mut len = size_of::<GpaDirectHeader>();
    for (i, r) in ranges.iter().enumerate() {
        // A range takes at least 16 bytes, so past `MAX_HEADER_LEN / 16` ranges the header
        // is too long before the index could stop fitting in u32.
        let index = u32::try_from(i).map_err(|_| too_long)?;
        r.check(index, page_limit)?;
        len = r
            .pages
            .len()
            .checked_mul(8)
            .and_then(|n| n.checked_add(size_of::<GpaRangeHeader>()))
            .and_then(|n| n.checked_add(len))
            .filter(|n| *n <= MAX_HEADER_LEN)
            .ok_or(too_long)?;
    }
    Ok(len)
}

/// Writes the GPA-direct header for `ranges` through `write(offset, bytes)`.
///
/// The ranges must have passed [`gpa_header_len`], which gives the header's length (and
/// so bounds the offsets `write` sees); [`GpaHeader`] does both.
pub fn encode_gpa_header(ranges: &[GpaRange<'_>], mut write: impl FnMut(usize, &[u8])) {
    let head = GpaDirectHeader {
        reserved: 0,
        // `gpa_header_len` bounds the count far below u32::MAX.
        range_count: ranges.len() as u32,
    };
    write(0, head.as_bytes());
    let mut at = size_of::<GpaDirectHeader>();
    for r in ranges {
        let rh = GpaRangeHeader {
            byte_count: r.byte_count,
            byte_offset: r.byte_offset,
        };
        write(at, rh.as_bytes());
        at += size_of::<GpaRangeHeader>();
        write(at, r.pages.as_bytes());
        at += 8 * r.pages.len();
    }
}

/// Copies a header into the front of `out` through `encode`; the buffer must hold `len`
/// bytes.
fn write_into(
    len: usize,
    out: &mut [u8],
    encode: impl FnOnce(&mut dyn FnMut(usize, &[u8])),
) -> Result<&[u8], PacketError> {
    let capacity = out.len();
    let Some(dest) = out.get_mut(..len) else {
        return Err(PacketError::BufferTooSmall {
            needed: len,
            capacity,
        });
    };
    // The encoders write exactly `len` bytes at offsets below it.
    encode(&mut |at, bytes| dest[at..at + bytes.len()].copy_from_slice(bytes));
    Ok(dest)
}

/// A GPA-direct header to send: ranges checked once, length known, bytes written on
/// demand into a caller's buffer or a reserved packet. Nothing is allocated.
///
/// ```
/// use vmlink_ring::header::{GpaHeader, GpaRange, PacketError};
///
/// let ranges = [GpaRange { byte_offset: 0, byte_count: 4096, pages: &[3] }];
/// let header = GpaHeader::new(&ranges, None)?;
/// assert_eq!(header.encoded_len(), 24);
/// let mut small = [0u8; 16];
/// assert_eq!(
///     header.write_to(&mut small).unwrap_err(),
///     PacketError::BufferTooSmall { needed: 24, capacity: 16 }
/// );
/// # Ok::<(), PacketError>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct GpaHeader<'r> {
    ranges: &'r [GpaRange<'r>],
    len: usize,
}

impl<'r> GpaHeader<'r> {
    /// Checks `ranges` (see [`gpa_header_len`]; page numbers below `page_limit` when one is
    /// given).
    pub fn new(ranges: &'r [GpaRange<'r>], page_limit: Option<u64>) -> Result<Self, PacketError> {
        let len = gpa_header_len(ranges, page_limit)?;
        Ok(Self { ranges, len })
    }

    /// The header's length in bytes (a multiple of 8).
    pub fn encoded_len(&self) -> usize {
        self.len
    }

    /// The ranges.
    pub fn ranges(&self) -> &'r [GpaRange<'r>] {
        self.ranges
    }

    /// Writes the header through `write(offset, bytes)`, for instance into a packet
    /// reserved with [`Writer::reserve`](crate::Writer::reserve); offsets stay below
    /// [`encoded_len`](Self::encoded_len).
    pub fn encode(&self, write: impl FnMut(usize, &[u8])) {
        encode_gpa_header(self.ranges, write)
    }

    /// Writes the header's exact bytes into the front of `out` and returns them.
    pub fn write_to<'b>(&self, out: &'b mut [u8]) -> Result<&'b [u8], PacketError> {
        write_into(self.len, out, |w| self.encode(w))
    }
}

/// Checks transfer-page ranges we are about to send and returns the header length they
/// need: at least one range, no range whose end overflows, and the whole at most
/// [`MAX_HEADER_LEN`].
pub fn transfer_page_header_len(ranges: &[TransferPageRange]) -> Result<usize, PacketError> {
    if ranges.is_empty() {
        return Err(PacketError::NoRanges);
    }
    let max = (MAX_HEADER_LEN - size_of::<TransferPageHeader>()) / size_of::<TransferPageRange>();
    if ranges.len() > max {
        return Err(PacketError::HeaderTooLong {
            max: MAX_HEADER_LEN,
        });
    }
    for (index, r) in (0u32..).zip(ranges) {
        if r.byte_offset.checked_add(r.byte_count).is_none() {
            return Err(PacketError::RangeOverflow {
                index,
                byte_offset: r.byte_offset,
                byte_count: r.byte_count,
            });
        }
    }
    Ok(size_of::<TransferPageHeader>() + size_of_val(ranges))
}

/// A transfer-page header to send: ranges of transfer page set `pageset_id`, checked once
/// ([`transfer_page_header_len`]). Nothing is allocated.
///
/// ```
/// use vmlink_ring::header::{TransferPagesHeader, parse_transfer_page_header};
/// use vmlink_ring::protocol::TransferPageRange;
///
/// let ranges = [TransferPageRange { byte_count: 100, byte_offset: 8192 }];
/// let header = TransferPagesHeader::new(2, false, &ranges)?;
/// let mut buf = [0u8; 16];
/// let parsed = parse_transfer_page_header(header.write_to(&mut buf)?)?;
/// assert_eq!(parsed.pageset_id, 2);
/// assert!(parsed.ranges().eq(ranges));
/// # Ok::<(), vmlink_ring::header::PacketError>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct TransferPagesHeader<'r> {
    pageset_id: u16,
    sender_owns_set: bool,
    ranges: &'r [TransferPageRange],
    len: usize,
}

impl<'r> TransferPagesHeader<'r> {
    /// Checks `ranges` of page set `pageset_id`.
    pub fn new(
        pageset_id: u16,
        sender_owns_set: bool,
        ranges: &'r [TransferPageRange],
    ) -> Result<Self, PacketError> {
        let len = transfer_page_header_len(ranges)?;
        Ok(Self {
            pageset_id,
            sender_owns_set,
            ranges,
            len,
        })
    }

    /// The header's length in bytes (a multiple of 8).
    pub fn encoded_len(&self) -> usize {
        self.len
    }

    /// The ranges.
    pub fn ranges(&self) -> &'r [TransferPageRange] {
        self.ranges
    }

    /// Writes the header through `write(offset, bytes)`; offsets stay below
    /// [`encoded_len`](Self::encoded_len).
    pub fn encode(&self, mut write: impl FnMut(usize, &[u8])) {
        let head = TransferPageHeader {
            pageset_id: self.pageset_id,
            sender_owns_set: u8::from(self.sender_owns_set),
            reserved: 0,
            // `new` bounds the count far below u32::MAX.
            range_count: self.ranges.len() as u32,
        };
        write(0, head.as_bytes());
        write(size_of::<TransferPageHeader>(), self.ranges.as_bytes());
    }

    /// Writes the header's exact bytes into the front of `out` and returns them.
    pub fn write_to<'b>(&self, out: &'b mut [u8]) -> Result<&'b [u8], PacketError> {
        write_into(self.len, out, |w| self.encode(w))
    }
}

/// The validated ranges of a received GPA-direct packet, over the header bytes copied out
/// of the ring.
#[derive(Debug, Clone, Copy)]
pub struct GpaRanges<'a> {
    rest: &'a [u8],
    remaining: u32,
}

/// One received GPA range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceivedGpaRange<'a> {
    /// Offset of the first byte in the first page.
    pub byte_offset: u32,
    /// Bytes in the range.
    pub byte_count: u32,
    pages: &'a [u8],
}

impl<'a> ReceivedGpaRange<'a> {
    /// The page numbers, one per 4 KiB page spanned.
    pub fn pages(&self) -> impl ExactSizeIterator<Item = u64> + 'a {
        self.pages
            .as_chunks::<8>()
            .0
            .iter()
            .map(|b| u64::from_le_bytes(*b))
    }

    /// Number of pages spanned.
    pub fn page_count(&self) -> usize {
        self.pages.len() / 8
    }
}

fn u32_at(b: &[u8; 8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Validates a GPA-direct header of `len` bytes, reading it 8 bytes at a time through
/// `read(offset)` (each word once): `{reserved u32, range_count u32}` then per range
/// `{byte_count u32, byte_offset u32}` and one `u64` page number per page spanned, filling
/// the header exactly. Page numbers must be below `page_limit` when one is given. Every
/// read is in bounds before it is made, and the loop ends after at most `len / 8` reads.
pub fn validate_gpa_header(
    len: usize,
    page_limit: Option<u64>,
    mut read: impl FnMut(usize) -> [u8; 8],
) -> Result<u32, PacketError> {
    if len < size_of::<GpaDirectHeader>() {
        return Err(PacketError::HeaderTooShort { len });
    }
    let count = u32_at(&read(0), 4);
    if count == 0 {
        return Err(PacketError::NoRanges);
    }
    let mut at = size_of::<GpaDirectHeader>();
    for index in 0..count {
        let mismatch = PacketError::RangesMismatchHeader {
            count,
            needed: None,
            len,
        };
        if len - at < size_of::<GpaRangeHeader>() {
            return Err(mismatch);
        }
        let rh = read(at);
        let (byte_count, byte_offset) = (u32_at(&rh, 0), u32_at(&rh, 4));
        at += size_of::<GpaRangeHeader>();
        if byte_offset as usize >= PAGE_SIZE {
            return Err(PacketError::OffsetPastPage { index, byte_offset });
        }
        if byte_count == 0 {
            return Err(PacketError::EmptyRange { index });
        }
        let pages = pages_spanned(byte_offset, byte_count);
        let bytes = pages
            .checked_mul(8)
            .filter(|n| *n <= len - at)
            .ok_or(mismatch)?;
        if let Some(limit) = page_limit {
            for k in 0..pages {
                let page = u64::from_le_bytes(read(at + 8 * k));
                if page >= limit {
                    return Err(PacketError::PageOutOfRange { index, page, limit });
                }
            }
        }
        at += bytes;
    }
    if at != len {
        return Err(PacketError::RangesMismatchHeader {
            count,
            needed: Some(at),
            len,
        });
    }
    Ok(count)
}

/// Validates a transfer-page header of `len` bytes read through `read(offset)`:
/// `{pageset_id u16, sender_owns_set u8, reserved u8, range_count u32}` then exactly
/// `range_count` `{byte_count u32, byte_offset u32}` ranges, none of whose ends overflows.
pub fn validate_transfer_page_header(
    len: usize,
    mut read: impl FnMut(usize) -> [u8; 8],
) -> Result<u32, PacketError> {
    if len < size_of::<TransferPageHeader>() {
        return Err(PacketError::HeaderTooShort { len });
    }
    let count = u32_at(&read(0), 4);
    if count == 0 {
        return Err(PacketError::NoRanges);
    }
    let needed = (count as usize)
        .checked_mul(8)
        .and_then(|n| n.checked_add(size_of::<TransferPageHeader>()));
    if needed != Some(len) {
        return Err(PacketError::RangesMismatchHeader { count, needed, len });
    }
    for index in 0..count {
        let r = read(size_of::<TransferPageHeader>() + 8 * index as usize);
        let (byte_count, byte_offset) = (u32_at(&r, 0), u32_at(&r, 4));
        if byte_offset.checked_add(byte_count).is_none() {
            return Err(PacketError::RangeOverflow {
                index,
                byte_offset,
                byte_count,
            });
        }
    }
    Ok(count)
}

/// Reads the 8 bytes at `at` of `bytes` (zero-filled past the end; the validators never
/// read there).
fn word_at(bytes: &[u8], at: usize) -> [u8; 8] {
    let mut w = [0u8; 8];
    if let Some(src) = bytes.get(at..at.saturating_add(8)) {
        w.copy_from_slice(src);
    }
    w
}

/// Validates a GPA-direct header copied out of the ring (see [`validate_gpa_header`]) and
/// returns its ranges.
pub fn parse_gpa_header(
    header: &[u8],
    page_limit: Option<u64>,
) -> Result<GpaRanges<'_>, PacketError> {
    let count = validate_gpa_header(header.len(), page_limit, |at| word_at(header, at))?;
    Ok(GpaRanges {
        rest: &header[size_of::<GpaDirectHeader>()..],
        remaining: count,
    })
}

impl<'a> Iterator for GpaRanges<'a> {
    type Item = ReceivedGpaRange<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        // The header was validated whole in `parse_gpa_header`; these cannot fail, but an
        // inconsistency ends the iteration rather than panicking.
        let (rh, after) = GpaRangeHeader::read_from_prefix(self.rest).ok()?;
        let n = pages_spanned(rh.byte_offset, rh.byte_count) * 8;
        let pages = after.get(..n)?;
        self.rest = after.get(n..)?;
        self.remaining -= 1;
        Some(ReceivedGpaRange {
            byte_offset: rh.byte_offset,
            byte_count: rh.byte_count,
            pages,
        })
    }
}

/// The validated header of a received transfer-page packet.
#[derive(Debug, Clone, Copy)]
pub struct TransferPages<'a> {
    /// The transfer page set the ranges refer to.
    pub pageset_id: u16,
    /// True when the sender owns the page set.
    pub sender_owns_set: bool,
    ranges: &'a [u8],
}

impl TransferPages<'_> {
    /// The ranges: `(byte_offset, byte_count)` in the page set.
    pub fn ranges(&self) -> impl ExactSizeIterator<Item = TransferPageRange> + '_ {
        self.ranges
            .as_chunks::<8>()
            .0
            .iter()
            .map(|b| TransferPageRange::read_from_bytes(b).unwrap_or_default())
    }
}

/// Validates a transfer-page header copied out of the ring (see
/// [`validate_transfer_page_header`]) and returns its contents.
pub fn parse_transfer_page_header(header: &[u8]) -> Result<TransferPages<'_>, PacketError> {
    validate_transfer_page_header(header.len(), |at| word_at(header, at))?;
    let (head, rest) = TransferPageHeader::read_from_prefix(header)
        .map_err(|_| PacketError::HeaderTooShort { len: header.len() })?;
    Ok(TransferPages {
        pageset_id: head.pageset_id,
        sender_owns_set: head.sender_owns_set != 0,
        ranges: rest,
    })
}

#[cfg(test)]
mod tests;
