//! Typed errors. None of them allocates; all work without `std`.

use core::fmt;

/// Which of a ring's two indices an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Index {
    /// `write_index`, owned by the writer.
    Write,
    /// `read_index`, owned by the reader.
    Read,
}

impl fmt::Display for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Index::Write => "write",
            Index::Read => "read",
        })
    }
}

/// The memory handed to a ring cannot hold a VMBus ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// The ring has a control page but no data area.
    #[error("the ring has no data pages")]
    NoDataPages,
    /// The data area is not a whole number of 4096-byte pages.
    #[error("a ring data area of {len} bytes is not a multiple of 4096")]
    NotPageMultiple {
        /// The data area's length in bytes.
        len: usize,
    },
    /// The data area is larger than 32-bit indices can address safely.
    #[error("a ring data area of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The data area's length in bytes.
        len: usize,
        /// The largest data area vmlink accepts.
        max: usize,
    },
    /// A mapped region or page does not start on an 8-byte boundary.
    #[error("ring memory at {addr:#x} is not 8-byte aligned")]
    Misaligned {
        /// The offending address.
        addr: usize,
    },
    /// A mapped region is too short for a control page and one data page.
    #[error("a region of {len} bytes cannot hold a control page and a data page")]
    RegionTooShort {
        /// The region's length in bytes.
        len: usize,
    },
    /// A ring image is not a control page followed by whole data pages.
    #[error("a ring image of {len} bytes is not a control page plus whole data pages")]
    BadImageLength {
        /// The image's length in bytes.
        len: usize,
    },
}

/// The peer broke a ring rule: the ring is corrupt.
///
/// Returned by the writer and the reader when a value the peer controls fails validation.
/// The endpoint's own state is unchanged by the failed call, so the error is returned again
/// on the next attempt unless the peer repairs the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// The memory cannot hold a ring.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// An index is at or past the end of the data area.
    #[error("the {index} index {value:#x} is past the end of the {data_len}-byte data area")]
    IndexOutOfRange {
        /// Which index.
        index: Index,
        /// The value read from the control page.
        value: u32,
        /// The data area's length.
        data_len: u32,
    },
    /// An index is not a multiple of 8.
    #[error("the {index} index {value:#x} is not 8-byte aligned")]
    IndexMisaligned {
        /// Which index.
        index: Index,
        /// The value read from the control page.
        value: u32,
    },
    /// The peer moved its index backwards, or past the other side's index.
    #[error("the {index} index moved backwards, from {old:#x} to {new:#x}")]
    IndexMovedBackwards {
        /// Which index.
        index: Index,
        /// The last value validated.
        old: u32,
        /// The value read now.
        new: u32,
    },
    /// Bytes are available but too few for a descriptor and a trailer.
    #[error("packet at {offset:#x}: only {available} bytes available, too few for a packet")]
    TruncatedPacket {
        /// Where the packet starts in the data area.
        offset: u32,
        /// Bytes between the read position and the write index.
        available: u32,
    },
    /// The descriptor names a packet type vmlink does not accept.
    #[error("packet at {offset:#x}: unknown packet type {packet_type:#x}")]
    UnknownPacketType {
        /// Where the packet starts in the data area.
        offset: u32,
        /// The descriptor's type field.
        packet_type: u16,
    },
    /// The descriptor sets flags vmlink does not know.
    #[error("packet at {offset:#x}: unknown flags {flags:#x}")]
    UnknownFlags {
        /// Where the packet starts in the data area.
        offset: u32,
        /// The descriptor's flags field.
        flags: u16,
    },
    /// The data offset points inside the 16-byte descriptor.
    #[error("packet at {offset:#x}: data offset {data_offset} is inside the 16-byte descriptor")]
    DataOffsetTooSmall {
        /// Where the packet starts in the data area.
        offset: u32,
        /// The data offset in bytes.
        data_offset: u32,
    },
    /// The data offset points past the end of the packet.
    #[error("packet at {offset:#x}: data offset {data_offset} is past the packet length {length}")]
    DataOffsetPastLength {
        /// Where the packet starts in the data area.
        offset: u32,
        /// The data offset in bytes.
        data_offset: u32,
        /// The packet length in bytes.
        length: u32,
    },
    /// The packet and its trailer are longer than the data the writer published.
    #[error(
        "packet at {offset:#x}: length {length} plus the 8-byte trailer exceeds the {available} bytes available"
    )]
    LengthPastAvailable {
        /// Where the packet starts in the data area.
        offset: u32,
        /// The packet length in bytes (trailer excluded).
        length: u32,
        /// Bytes between the read position and the write index.
        available: u32,
    },
}

/// A write could not be done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// Not enough free space now; the packet fits once the reader makes room.
    #[error("the ring is full: the packet needs more than {needed} free bytes, {free} are free")]
    Full {
        /// Bytes the packet occupies with its trailer (free space must exceed this).
        needed: usize,
        /// Bytes free now.
        free: usize,
    },
    /// The packet can never fit in this ring.
    #[error("a packet of {len} bytes exceeds the largest this ring carries ({max} bytes)")]
    TooLarge {
        /// The packet's length (descriptor, header and padded payload).
        len: usize,
        /// The largest packet the ring carries.
        max: usize,
    },
    /// The extra header after the descriptor must be a whole number of 8-byte units.
    #[error("an extra header of {len} bytes is not a multiple of 8")]
    HeaderMisaligned {
        /// The header's length.
        len: usize,
    },
    /// The packet carries flags vmlink does not know.
    #[error("unknown packet flags {flags:#x}")]
    UnknownFlags {
        /// The flags given.
        flags: u16,
    },
    /// A write into a reserved packet fell outside the region it addressed.
    #[error("{len} bytes at offset {offset} do not fit in a region of {size} bytes")]
    OutOfBounds {
        /// Offset of the write.
        offset: usize,
        /// Length of the write.
        len: usize,
        /// Size of the region.
        size: usize,
    },
    /// A `pending_send_size` that no amount of free space could exceed.
    #[error("a pending send size of {bytes} bytes is not below the {data_len}-byte data area")]
    PendingSendSizeTooLarge {
        /// The size asked for.
        bytes: usize,
        /// The data area's length.
        data_len: usize,
    },
    /// The peer corrupted the ring.
    #[error("the ring is corrupt: {0}")]
    Corrupt(#[from] RingError),
}

/// A read could not be done.
///
/// Exhaustive: a read fails because the caller's buffer or range is wrong, or because the
/// peer corrupted the ring, and callers match on exactly these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The caller's buffer is smaller than the packet's payload; the packet stays queued.
    #[error("the packet's {needed}-byte payload does not fit in a {capacity}-byte buffer")]
    BufferTooSmall {
        /// The payload's length.
        needed: usize,
        /// The buffer's length.
        capacity: usize,
    },
    /// A read from a packet fell outside the region it addressed.
    #[error("{len} bytes at offset {offset} do not fit in a region of {size} bytes")]
    OutOfBounds {
        /// Offset of the read.
        offset: usize,
        /// Length of the read.
        len: usize,
        /// Size of the region.
        size: usize,
    },
    /// The peer corrupted the ring.
    #[error("the ring is corrupt: {0}")]
    Corrupt(#[from] RingError),
}
