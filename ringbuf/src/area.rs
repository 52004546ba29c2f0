//! The memory header: one page at the start of a shared memory area that says what the
//! area holds, so a reader needs nothing else to find its rings.
//!
//! A transport that shares one memory area between two sides (vmlink-shm's memfd, or any
//! other) puts a [`HEADER_LEN`]-byte header page at offset 0: a magic, a version, the area's
//! length, a table of channels (each the offset and length of its guest→host and its
//! host→guest ring, control page included) and the buffer area. The side that allocates the
//! area writes it ([`AreaLayout::encode`]); every reader treats it as hostile input:
//! [`AreaLayout::parse`] takes a private copy of the page (the caller copies it out of
//! shared memory once, word by word or with a system call, never through a reference into
//! memory the peer can write), reads each field once, and either returns a validated
//! [`AreaLayout`] or the [`AreaError`] that names the rule the header broke.
//!
//! # Format (little-endian)
//!
//! | offset | size | field | rule |
//! | --- | --- | --- | --- |
//! | 0x00 | 8 | `magic` | `b"VMLINKMA"` ([`HEADER_MAGIC`]) |
//! | 0x08 | 2 | `version_major` | 1: any other major version is refused |
//! | 0x0A | 2 | `version_minor` | any: a newer minor only adds fields after the known ones |
//! | 0x0C | 4 | `header_len` | bytes of fixed fields: a multiple of 8, 64 ..= 4096 (1.0 writes 64) |
//! | 0x10 | 8 | `area_len` | the whole area, header page included: whole pages, and exactly the memory's length |
//! | 0x18 | 4 | `channel_count` | 0 ..= [`MAX_CHANNELS`] |
//! | 0x1C | 4 | `channel_entry_len` | bytes per table entry: a multiple of 8, 32 ..= 4096 (1.0 writes 32) |
//! | 0x20 | 8 | `buffer_offset` | page-aligned, inside the area |
//! | 0x28 | 8 | `buffer_len` | whole pages; 0 for no buffer area |
//! | 0x30 | 16 | reserved | zero |
//!
//! The channel table starts at `header_len` and holds `channel_count` entries of
//! `channel_entry_len` bytes, all inside the header page. Entry `i` describes channel `i`:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0x00 | 8 | guest→host ring offset |
//! | 0x08 | 8 | guest→host ring length, control page included |
//! | 0x10 | 8 | host→guest ring offset |
//! | 0x18 | 8 | host→guest ring length, control page included |
//!
//! Every ring starts on a page boundary and is a 4096-byte control page plus 1 to 524,288
//! data pages (at most [`MAX_DATA_LEN`] data bytes). No two regions
//! (the header page, every ring, a non-empty buffer area) overlap, and each lies inside the
//! area. Regions need not be in order or cover the whole area.
//!
//! Forward compatibility: a reader of version 1.x reads the fixed fields and entry fields it
//! knows and ignores the rest of a longer header or entry and the bytes after the table,
//! where a newer minor version adds its fields. Reserved bytes inside the known fields must
//! be zero in every 1.x (they are refused otherwise, so a writer cannot smuggle meaning into
//! them); a change older readers must not ignore takes a new major version.
//!
//! The magic can never be mistaken for a ring's control page: read as `write_index`, its
//! first four bytes are not a multiple of 8.
//!
//! # Examples
//!
//! ```
//! use vmlink_ring::area::{AreaLayout, HEADER_LEN, VERSION};
//!
//! // One channel whose rings each have 16 KiB of data, then 8 pages of buffer area.
//! let ring = 4096 + 16 * 1024;
//! let layout = AreaLayout::packed(&[(ring, ring)], 8 * 4096)?;
//! assert_eq!(layout.len(), HEADER_LEN as u64 + 2 * ring + 8 * 4096);
//! assert_eq!(layout.channels()[0].guest_to_host.offset, 4096);
//!
//! // The allocating side writes the page; a reader validates its own copy of it.
//! let page = layout.encode();
//! let parsed = AreaLayout::parse(&page, layout.len())?;
//! assert_eq!(parsed.version, VERSION);
//! assert_eq!(parsed.layout, layout);
//!
//! // Any rule broken is named.
//! let mut bad = page;
//! bad[0x20] = 1; // the buffer area's offset, off a page boundary
//! let e = AreaLayout::parse(&bad, layout.len()).unwrap_err();
//! assert_eq!(e.to_string(), "the buffer area at offset 0xb001 is not 4096-byte aligned");
//! # Ok::<(), vmlink_ring::area::AreaError>(())
//! ```

use core::fmt;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::MAX_DATA_LEN;
use crate::protocol::{CONTROL_PAGE_SIZE, PAGE_SIZE};

/// The first 8 bytes of a memory header.
pub const HEADER_MAGIC: [u8; 8] = *b"VMLINKMA";

/// The header page's length: the first region of every area, so the rings after it stay
/// page-aligned.
pub const HEADER_LEN: usize = PAGE_SIZE;

/// The most channels one header describes (the table must fit the header page).
pub const MAX_CHANNELS: usize = 64;

/// The version this crate writes, and the major version it reads.
pub const VERSION: Version = Version { major: 1, minor: 0 };

/// Length of the fixed fields of version 1.0 ([`HeaderFixed`]).
pub const FIXED_LEN: usize = 64;

/// Length of a channel table entry of version 1.0 ([`ChannelEntry`]).
pub const ENTRY_LEN: usize = 32;

/// Byte offset of the reserved bytes in the header.
const RESERVED_OFFSET: usize = 0x30;

/// The fixed fields at the start of the header page, as laid out in memory.
///
/// A plain copy: it is read out of a private copy of the page with `zerocopy`, never formed
/// over shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct HeaderFixed {
    /// [`HEADER_MAGIC`].
    pub magic: [u8; 8],
    /// The major version; readers refuse any but their own.
    pub version_major: u16,
    /// The minor version; a newer one only adds fields after the known ones.
    pub version_minor: u16,
    /// Bytes of fixed fields; the channel table starts here.
    pub header_len: u32,
    /// The whole area's length in bytes, header page included.
    pub area_len: u64,
    /// Entries in the channel table.
    pub channel_count: u32,
    /// Bytes per channel table entry.
    pub channel_entry_len: u32,
    /// The buffer area's offset in the area.
    pub buffer_offset: u64,
    /// The buffer area's length; 0 when there is none.
    pub buffer_len: u64,
    /// Reserved, zero.
    pub reserved: [u8; 16],
}

/// One channel table entry, as laid out in memory.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct ChannelEntry {
    /// The guest→host ring's offset in the area.
    pub guest_to_host_offset: u64,
    /// The guest→host ring's length, control page included.
    pub guest_to_host_len: u64,
    /// The host→guest ring's offset in the area.
    pub host_to_guest_offset: u64,
    /// The host→guest ring's length, control page included.
    pub host_to_guest_len: u64,
}

/// A header version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version {
    /// Changes when older readers must refuse the header.
    pub major: u16,
    /// Changes when fields are added that older readers may ignore.
    pub minor: u16,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// A range of the area: `len` bytes from `offset`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Span {
    /// Byte offset from the start of the area.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Span {
    /// `len` bytes from `offset`.
    pub const fn new(offset: u64, len: u64) -> Self {
        Self { offset, len }
    }

    /// The offset just past the span; `None` when that overflows.
    pub const fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.len)
    }
}

/// One channel's two rings, each counted with its control page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ChannelRings {
    /// The ring the guest writes and the host reads.
    pub guest_to_host: Span,
    /// The ring the host writes and the guest reads.
    pub host_to_guest: Span,
}

/// A region of the area, as named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Region {
    /// The header page itself, `0..HEADER_LEN`.
    HeaderPage,
    /// A channel's guest→host ring.
    GuestToHost {
        /// The channel's index in the table.
        channel: u16,
    },
    /// A channel's host→guest ring.
    HostToGuest {
        /// The channel's index in the table.
        channel: u16,
    },
    /// The buffer area.
    Buffer,
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Region::HeaderPage => f.write_str("the header page"),
            Region::GuestToHost { channel } => {
                write!(f, "channel {channel}'s guest-to-host ring")
            }
            Region::HostToGuest { channel } => {
                write!(f, "channel {channel}'s host-to-guest ring")
            }
            Region::Buffer => f.write_str("the buffer area"),
        }
    }
}

/// The rule a memory header (or a layout given to the writer) breaks.
///
/// [`AreaLayout::parse`] checks the rules in the order of these variants (the rules about
/// regions channel by channel, each ring's alignment, length and bounds before the next,
/// then the buffer area, then overlaps), and reports the first one broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AreaError {
    /// Fewer bytes than a header page were given.
    #[error("{len} bytes cannot hold the {HEADER_LEN}-byte memory header")]
    Truncated {
        /// The bytes given.
        len: usize,
    },
    /// The memory does not start with [`HEADER_MAGIC`].
    #[error("no memory header: the first 8 bytes are {} rather than \"VMLINKMA\"", Hex(.found))]
    BadMagic {
        /// The first 8 bytes.
        found: [u8; 8],
    },
    /// The header's major version is not the one this crate reads.
    #[error(
        "the memory header is version {found}; this reader reads version {}.x",
        .supported.major
    )]
    UnsupportedVersion {
        /// The header's version.
        found: Version,
        /// The version this crate writes (any minor of its major is read).
        supported: Version,
    },
    /// `header_len` is not a multiple of 8 from 64 to 4096.
    #[error(
        "the header length {len} is not a multiple of 8 from {FIXED_LEN} to {HEADER_LEN} bytes"
    )]
    BadHeaderLen {
        /// The header's `header_len`.
        len: u32,
    },
    /// `channel_entry_len` is not a multiple of 8 from 32 to 4096.
    #[error(
        "the channel entry length {len} is not a multiple of 8 from {ENTRY_LEN} to \
         {HEADER_LEN} bytes"
    )]
    BadEntryLen {
        /// The header's `channel_entry_len`.
        len: u32,
    },
    /// A reserved byte is not zero.
    #[error("the reserved header byte at offset {offset:#x} is {value:#x}, not zero")]
    ReservedNotZero {
        /// Its offset in the header.
        offset: usize,
        /// Its value.
        value: u8,
    },
    /// `area_len` is not whole pages, or leaves no room past the header page.
    #[error(
        "an area of {len} bytes is not a whole number of {PAGE_SIZE}-byte pages past the \
         header page"
    )]
    BadAreaLen {
        /// The area length given.
        len: u64,
    },
    /// `area_len` differs from the length of the memory the header was read from.
    #[error("the header describes {header} bytes of memory but the memory is {actual} bytes")]
    LengthMismatch {
        /// The header's `area_len`.
        header: u64,
        /// The memory's length.
        actual: u64,
    },
    /// More channels than [`MAX_CHANNELS`].
    #[error("{count} channels are listed; at most {max} are allowed")]
    TooManyChannels {
        /// The count given.
        count: u32,
        /// [`MAX_CHANNELS`].
        max: usize,
    },
    /// The channel table runs past the header page.
    #[error("the channel table ends at byte {end}, past the {HEADER_LEN}-byte header page")]
    TablePastPage {
        /// Where the table ends.
        end: u64,
    },
    /// A region does not start on a page boundary.
    #[error("{region} at offset {offset:#x} is not {PAGE_SIZE}-byte aligned")]
    Misaligned {
        /// Which region.
        region: Region,
        /// Its offset.
        offset: u64,
    },
    /// A ring is not a control page plus 1 to 524,288 whole data pages.
    #[error(
        "{region} of {len} bytes is not a {CONTROL_PAGE_SIZE}-byte control page plus 1 to \
         524288 data pages"
    )]
    BadRingLen {
        /// Which ring.
        region: Region,
        /// Its length, control page included.
        len: u64,
    },
    /// The buffer area is not whole pages.
    #[error("the buffer area's {len} bytes are not a whole number of {PAGE_SIZE}-byte pages")]
    BadBufferLen {
        /// Its length.
        len: u64,
    },
    /// A region ends past the area.
    #[error("{region} ({len} bytes at offset {offset:#x}) ends past the {area_len}-byte area")]
    OutsideArea {
        /// Which region.
        region: Region,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The area's length.
        area_len: u64,
    },
    /// Two regions share bytes.
    #[error("{first} and {second} overlap")]
    Overlap {
        /// The region listed first (the header page, then by channel, then the buffer).
        first: Region,
        /// The other region.
        second: Region,
    },
}

/// Bytes as space-separated hex pairs.
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Whether `bytes` starts with [`HEADER_MAGIC`] (and so should be read as a header, whose
/// other rules [`AreaLayout::parse`] then checks).
pub fn has_magic(bytes: &[u8]) -> bool {
    bytes.get(..HEADER_MAGIC.len()) == Some(&HEADER_MAGIC[..])
}

/// A validated description of an area: its length, its channels' rings and its buffer area.
///
/// Built only by [`AreaLayout::new`], [`AreaLayout::packed`] or [`AreaLayout::parse`], so it
/// always satisfies every rule of the header; two layouts are equal when they describe the
/// same regions.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AreaLayout {
    len: u64,
    count: usize,
    // Entries past `count` are always zero, so the derived equality is the meaningful one.
    channels: [ChannelRings; MAX_CHANNELS],
    buffer: Span,
}

impl fmt::Debug for AreaLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AreaLayout")
            .field("len", &self.len)
            .field("channels", &self.channels())
            .field("buffer", &self.buffer)
            .finish()
    }
}

/// A header read by [`AreaLayout::parse`]: the version it was written with and what it
/// describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedHeader {
    /// The header's version (major [`VERSION`]`.major`, any minor).
    pub version: Version,
    /// The validated layout.
    pub layout: AreaLayout,
}

impl AreaLayout {
    /// A layout of an area of `len` bytes holding `channels` (at most [`MAX_CHANNELS`]) and
    /// `buffer` (length 0 for none), checked against every rule a reader checks.
    pub fn new(len: u64, channels: &[ChannelRings], buffer: Span) -> Result<Self, AreaError> {
        check_area_len(len)?;
        if channels.len() > MAX_CHANNELS {
            return Err(AreaError::TooManyChannels {
                count: u32::try_from(channels.len()).unwrap_or(u32::MAX),
                max: MAX_CHANNELS,
            });
        }
        let mut layout = Self {
            len,
            count: channels.len(),
            channels: [ChannelRings::default(); MAX_CHANNELS],
            buffer,
        };
        layout.channels[..channels.len()].copy_from_slice(channels);
        layout.check_regions()?;
        Ok(layout)
    }

    /// The usual layout: the header page, then each channel's guest→host and host→guest
    /// rings (`(guest_to_host_len, host_to_guest_len)`, control pages included) back to
    /// back, then a buffer area of `buffer_len` bytes; the area is exactly that long.
    pub fn packed(rings: &[(u64, u64)], buffer_len: u64) -> Result<Self, AreaError> {
        if rings.len() > MAX_CHANNELS {
            return Err(AreaError::TooManyChannels {
                count: u32::try_from(rings.len()).unwrap_or(u32::MAX),
                max: MAX_CHANNELS,
            });
        }
        let mut channels = [ChannelRings::default(); MAX_CHANNELS];
        let mut at = HEADER_LEN as u64;
        // Past the end of the address space, lengths are invalid anyway; saturate so the
        // ring's own checks name the culprit.
        for (slot, &(g2h, h2g)) in channels.iter_mut().zip(rings) {
            slot.guest_to_host = Span::new(at, g2h);
            at = at.saturating_add(g2h);
            slot.host_to_guest = Span::new(at, h2g);
            at = at.saturating_add(h2g);
        }
        let buffer = Span::new(at, buffer_len);
        // The regions first, in an area as large as can be, so a bad length is named as
        // the ring's or the buffer's rather than as the sum's.
        let mut layout = Self {
            len: u64::MAX,
            count: rings.len(),
            channels,
            buffer,
        };
        layout.check_regions()?;
        layout.len = at.saturating_add(buffer_len);
        check_area_len(layout.len)?;
        Ok(layout)
    }

    /// The area's length in bytes, header page included.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: an area holds at least its header page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The channels, in table order.
    pub fn channels(&self) -> &[ChannelRings] {
        &self.channels[..self.count]
    }

    /// The buffer area (length 0 when there is none).
    pub fn buffer(&self) -> Span {
        self.buffer
    }

    /// The header page for this layout, version [`VERSION`]: fixed fields, then the
    /// channel table, the rest zero.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut page = [0u8; HEADER_LEN];
        let fixed = HeaderFixed {
            magic: HEADER_MAGIC,
            version_major: VERSION.major,
            version_minor: VERSION.minor,
            header_len: FIXED_LEN as u32,
            area_len: self.len,
            // At most MAX_CHANNELS.
            channel_count: self.count as u32,
            channel_entry_len: ENTRY_LEN as u32,
            buffer_offset: self.buffer.offset,
            buffer_len: self.buffer.len,
            reserved: [0; 16],
        };
        page[..FIXED_LEN].copy_from_slice(fixed.as_bytes());
        for (i, ch) in self.channels().iter().enumerate() {
            let entry = ChannelEntry {
                guest_to_host_offset: ch.guest_to_host.offset,
                guest_to_host_len: ch.guest_to_host.len,
                host_to_guest_offset: ch.host_to_guest.offset,
                host_to_guest_len: ch.host_to_guest.len,
            };
            let at = FIXED_LEN + i * ENTRY_LEN;
            page[at..at + ENTRY_LEN].copy_from_slice(entry.as_bytes());
        }
        page
    }

    /// Reads a header from `header`, a private copy of at least the header page of an area
    /// whose real length is `area_len`, and checks every rule.
    ///
    /// Each field is read once, from `header`; nothing is kept that refers to it. Bytes past
    /// the fields of version [`VERSION`] (a longer header or entry, anything after the
    /// table) are ignored, so newer minor versions are read.
    pub fn parse(header: &[u8], area_len: u64) -> Result<ParsedHeader, AreaError> {
        let Some(page) = header.get(..HEADER_LEN) else {
            return Err(AreaError::Truncated { len: header.len() });
        };
        let (fixed, _) = HeaderFixed::read_from_prefix(page).expect("a page holds the fields");
        if fixed.magic != HEADER_MAGIC {
            return Err(AreaError::BadMagic { found: fixed.magic });
        }
        let version = Version {
            major: fixed.version_major,
            minor: fixed.version_minor,
        };
        if version.major != VERSION.major {
            return Err(AreaError::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        let header_len = fixed.header_len;
        if !fits_page(header_len, FIXED_LEN) {
            return Err(AreaError::BadHeaderLen { len: header_len });
        }
        let entry_len = fixed.channel_entry_len;
        if !fits_page(entry_len, ENTRY_LEN) {
            return Err(AreaError::BadEntryLen { len: entry_len });
        }
        if let Some(i) = fixed.reserved.iter().position(|&b| b != 0) {
            return Err(AreaError::ReservedNotZero {
                offset: RESERVED_OFFSET + i,
                value: fixed.reserved[i],
            });
        }
        check_area_len(fixed.area_len)?;
        if fixed.area_len != area_len {
            return Err(AreaError::LengthMismatch {
                header: fixed.area_len,
                actual: area_len,
            });
        }
        let count = fixed.channel_count;
        if count as usize > MAX_CHANNELS {
            return Err(AreaError::TooManyChannels {
                count,
                max: MAX_CHANNELS,
            });
        }
        // At most 64 entries of at most 4096 bytes after at most 4096: no overflow in u64.
        let table_end = u64::from(header_len) + u64::from(count) * u64::from(entry_len);
        if table_end > HEADER_LEN as u64 {
            return Err(AreaError::TablePastPage { end: table_end });
        }
        let mut layout = Self {
            len: fixed.area_len,
            count: count as usize,
            channels: [ChannelRings::default(); MAX_CHANNELS],
            buffer: Span::new(fixed.buffer_offset, fixed.buffer_len),
        };
        for (i, slot) in layout.channels[..count as usize].iter_mut().enumerate() {
            let at = header_len as usize + i * entry_len as usize;
            let (entry, _) =
                ChannelEntry::read_from_prefix(&page[at..]).expect("the table fits the page");
            *slot = ChannelRings {
                guest_to_host: Span::new(entry.guest_to_host_offset, entry.guest_to_host_len),
                host_to_guest: Span::new(entry.host_to_guest_offset, entry.host_to_guest_len),
            };
        }
        layout.check_regions()?;
        Ok(ParsedHeader { version, layout })
    }

    /// Every rule about regions: alignment, lengths, bounds, then overlaps.
    fn check_regions(&self) -> Result<(), AreaError> {
        // The header page, every ring, and a non-empty buffer area.
        let mut regions = [(Region::HeaderPage, 0u64, 0u64); 2 * MAX_CHANNELS + 2];
        regions[0] = (Region::HeaderPage, 0, HEADER_LEN as u64);
        let mut n = 1;
        for (i, ch) in self.channels().iter().enumerate() {
            // At most MAX_CHANNELS.
            let channel = i as u16;
            for (region, span) in [
                (Region::GuestToHost { channel }, ch.guest_to_host),
                (Region::HostToGuest { channel }, ch.host_to_guest),
            ] {
                let end = self.check_span(region, span)?;
                regions[n] = (region, span.offset, end);
                n += 1;
            }
        }
        let end = self.check_span(Region::Buffer, self.buffer)?;
        if self.buffer.len > 0 {
            regions[n] = (Region::Buffer, self.buffer.offset, end);
            n += 1;
        }
        let regions = &regions[..n];
        for (i, &(second, start, end)) in regions.iter().enumerate() {
            for &(first, other_start, other_end) in &regions[..i] {
                if start < other_end && other_start < end {
                    return Err(AreaError::Overlap { first, second });
                }
            }
        }
        Ok(())
    }

    /// Checks one region's alignment, length and bounds; returns its end.
    fn check_span(&self, region: Region, span: Span) -> Result<u64, AreaError> {
        let page = PAGE_SIZE as u64;
        if !span.offset.is_multiple_of(page) {
            return Err(AreaError::Misaligned {
                region,
                offset: span.offset,
            });
        }
        if region == Region::Buffer {
            if !span.len.is_multiple_of(page) {
                return Err(AreaError::BadBufferLen { len: span.len });
            }
        } else {
            match span.len.checked_sub(CONTROL_PAGE_SIZE as u64) {
                Some(data)
                    if data > 0 && data.is_multiple_of(page) && data <= MAX_DATA_LEN as u64 => {}
                _ => {
                    return Err(AreaError::BadRingLen {
                        region,
                        len: span.len,
                    });
                }
            }
        }
        match span.end() {
            Some(end) if end <= self.len => Ok(end),
            _ => Err(AreaError::OutsideArea {
                region,
                offset: span.offset,
                len: span.len,
                area_len: self.len,
            }),
        }
    }
}

/// Whether a header or entry length is a multiple of 8 from `min` to a page.
fn fits_page(len: u32, min: usize) -> bool {
    let len = len as usize;
    len >= min && len <= HEADER_LEN && len.is_multiple_of(8)
}

/// An area is whole pages, more than the header page.
fn check_area_len(len: u64) -> Result<(), AreaError> {
    if len <= HEADER_LEN as u64 || !len.is_multiple_of(PAGE_SIZE as u64) {
        Err(AreaError::BadAreaLen { len })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
