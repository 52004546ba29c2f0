//! The VMBus ring and packet wire format.
//!
//! Everything here follows Linux `include/linux/hyperv.h` (`struct hv_ring_buffer`,
//! `struct vmpacket_descriptor`, `struct vmtransfer_page_packet_header`,
//! `struct vmbus_packet_mpb_array`) and `drivers/hv/ring_buffer.c`. The structs are plain
//! `#[repr(C)]` data that is copied out of ring memory and then parsed with `zerocopy`; no
//! reference into shared memory is ever formed from them. Every offset and size is pinned by
//! the tests at the bottom of this file.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The VMBus page size, whatever the host's page size is.
pub const PAGE_SIZE: usize = 4096;

/// Size of a ring's control page (it precedes the data area).
pub const CONTROL_PAGE_SIZE: usize = PAGE_SIZE;

/// Byte offset of `write_index` in the control page (owned by the writer).
pub const WRITE_INDEX_OFFSET: usize = 0x00;
/// Byte offset of `read_index` in the control page (owned by the reader).
pub const READ_INDEX_OFFSET: usize = 0x04;
/// Byte offset of `interrupt_mask` in the control page (owned by the reader).
pub const INTERRUPT_MASK_OFFSET: usize = 0x08;
/// Byte offset of `pending_send_size` in the control page (owned by the writer).
pub const PENDING_SEND_SIZE_OFFSET: usize = 0x0C;
/// Byte offset of `feature_bits` in the control page (set by the side that allocates the ring).
pub const FEATURE_BITS_OFFSET: usize = 0x40;

/// `feature_bits` bit 0: the ring's users honour `pending_send_size`.
pub const FEATURE_PENDING_SEND_SIZE: u32 = 1;

/// Size of a packet descriptor.
pub const DESCRIPTOR_SIZE: usize = 16;
/// Size of the trailer that follows every packet (its start offset in the high 32 bits).
pub const TRAILER_SIZE: usize = 8;
/// Packets, their lengths and the ring indices are all in units of this many bytes.
pub const ALIGNMENT: usize = 8;
/// The largest packet `length8` (a `u16` in 8-byte units) can describe, trailer excluded.
pub const MAX_DESCRIBABLE_PACKET_LEN: usize = u16::MAX as usize * ALIGNMENT;

/// Packet flag: the sender asks for a completion carrying the same transaction id.
pub const FLAG_COMPLETION_REQUESTED: u16 = 1;
/// Every packet flag this implementation knows; any other bit is rejected.
pub const KNOWN_FLAGS: u16 = FLAG_COMPLETION_REQUESTED;

/// The packet types vmlink sends and accepts (`enum vmbus_packet_type` in Linux).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum PacketType {
    /// `VM_PKT_DATA_INBAND`: the payload follows the descriptor.
    InBand = 6,
    /// `VM_PKT_DATA_USING_XFER_PAGES`: the payload lives in a transfer page set.
    TransferPages = 7,
    /// `VM_PKT_DATA_USING_GPA_DIRECT`: the payload lives in guest pages named by GPA ranges.
    GpaDirect = 9,
    /// `VM_PKT_COMP`: a completion for the request with the same transaction id.
    Completion = 0x0B,
}

impl PacketType {
    /// The type for a raw descriptor value, or `None` for a type vmlink does not speak.
    #[inline]
    pub const fn from_raw(raw: u16) -> Option<Self> {
        match raw {
            6 => Some(Self::InBand),
            7 => Some(Self::TransferPages),
            9 => Some(Self::GpaDirect),
            0x0B => Some(Self::Completion),
            _ => None,
        }
    }

    /// The value stored in a descriptor's `type` field.
    #[inline]
    pub const fn raw(self) -> u16 {
        self as u16
    }
}

/// The control page as laid out in memory (`struct hv_ring_buffer` without its data).
///
/// This type documents and pins the layout; the ring code never reads shared memory through
/// it (control words are accessed as atomics through [`RingMem`](crate::RingMem)).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ControlPageLayout {
    /// Byte offset in the data area where the writer puts the next packet.
    pub write_index: u32,
    /// Byte offset in the data area where the reader takes the next packet.
    pub read_index: u32,
    /// Non-zero while the reader does not want to be signalled for new data.
    pub interrupt_mask: u32,
    /// Free space the blocked writer waits for; 0 when the writer is not waiting.
    pub pending_send_size: u32,
    /// Reserved (`reserved1` in Linux).
    pub reserved1: [u32; 12],
    /// Feature bits; bit 0 is [`FEATURE_PENDING_SEND_SIZE`].
    pub feature_bits: u32,
    /// Reserved up to the end of the page.
    pub reserved2: [u8; CONTROL_PAGE_SIZE - 0x44],
}

/// The 16-byte descriptor at the start of every packet (`struct vmpacket_descriptor`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct PacketDescriptor {
    /// A [`PacketType`] value.
    pub packet_type: u16,
    /// Offset of the payload from the packet start, in 8-byte units.
    pub data_offset8: u16,
    /// Length of the packet (descriptor included, trailer excluded), in 8-byte units.
    pub length8: u16,
    /// Packet flags ([`FLAG_COMPLETION_REQUESTED`]).
    pub flags: u16,
    /// Transaction id pairing a request with its completion.
    pub transaction_id: u64,
}

/// Header after the descriptor of a GPA-direct packet (the rest of `vmbus_packet_mpb_array`).
///
/// It is followed by `range_count` ranges, each a [`GpaRangeHeader`] and one `u64` page
/// number for every 4 KiB page the range spans.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct GpaDirectHeader {
    /// Reserved, written as zero.
    pub reserved: u32,
    /// Number of ranges that follow.
    pub range_count: u32,
}

/// The fixed part of one GPA range (`struct vmbus_mpb_array` / `hv_mpb_array`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct GpaRangeHeader {
    /// Bytes in the range.
    pub byte_count: u32,
    /// Offset of the first byte in the first page; below 4096.
    pub byte_offset: u32,
}

/// Header after the descriptor of a transfer-page packet
/// (the rest of `struct vmtransfer_page_packet_header`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct TransferPageHeader {
    /// Which transfer page set the ranges refer to.
    pub pageset_id: u16,
    /// Non-zero when the sender owns the page set.
    pub sender_owns_set: u8,
    /// Reserved, written as zero.
    pub reserved: u8,
    /// Number of [`TransferPageRange`]s that follow.
    pub range_count: u32,
}

/// One range of a transfer-page packet (`struct vmtransfer_page_range`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct TransferPageRange {
    /// Bytes in the range.
    pub byte_count: u32,
    /// Offset of the range in the page set.
    pub byte_offset: u32,
}

/// Rounds `len` up to the ring's 8-byte alignment; `None` on overflow.
#[inline]
pub const fn align8(len: usize) -> Option<usize> {
    match len.checked_add(ALIGNMENT - 1) {
        Some(v) => Some(v & !(ALIGNMENT - 1)),
        None => None,
    }
}

/// The largest packet (descriptor and payload, trailer excluded) a ring whose data area is
/// `data_len` bytes can carry: `min(data_len - 16, 524_280)`.
///
/// A write needs free space strictly greater than the packet plus its trailer, so a packet
/// may never fill the data area to the last byte (interop: Linux and DPDK allow
/// `data_len - 8`; vmlink never relies on that).
#[inline]
pub const fn max_packet_len(data_len: usize) -> usize {
    let by_ring = data_len.saturating_sub(DESCRIPTOR_SIZE);
    if by_ring < MAX_DESCRIBABLE_PACKET_LEN {
        by_ring
    } else {
        MAX_DESCRIBABLE_PACKET_LEN
    }
}

/// Length of the packet (trailer excluded) that carries `header_len` bytes of extra header
/// and `payload_len` bytes of payload, padded to 8 bytes; `None` on overflow.
#[inline]
pub const fn packet_len(header_len: usize, payload_len: usize) -> Option<usize> {
    match DESCRIPTOR_SIZE.checked_add(header_len) {
        Some(h) => match h.checked_add(payload_len) {
            Some(l) => align8(l),
            None => None,
        },
        None => None,
    }
}

/// The trailer value Linux writes after a packet: its start offset in the high 32 bits.
#[inline]
pub const fn trailer_for(start: u32) -> u64 {
    (start as u64) << 32
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn control_page_layout_matches_hv_ring_buffer() {
        assert_eq!(size_of::<ControlPageLayout>(), 4096);
        assert_eq!(offset_of!(ControlPageLayout, write_index), 0x00);
        assert_eq!(offset_of!(ControlPageLayout, read_index), 0x04);
        assert_eq!(offset_of!(ControlPageLayout, interrupt_mask), 0x08);
        assert_eq!(offset_of!(ControlPageLayout, pending_send_size), 0x0C);
        assert_eq!(offset_of!(ControlPageLayout, feature_bits), 0x40);
        assert_eq!(
            WRITE_INDEX_OFFSET,
            offset_of!(ControlPageLayout, write_index)
        );
        assert_eq!(READ_INDEX_OFFSET, offset_of!(ControlPageLayout, read_index));
        assert_eq!(
            INTERRUPT_MASK_OFFSET,
            offset_of!(ControlPageLayout, interrupt_mask)
        );
        assert_eq!(
            PENDING_SEND_SIZE_OFFSET,
            offset_of!(ControlPageLayout, pending_send_size)
        );
        assert_eq!(
            FEATURE_BITS_OFFSET,
            offset_of!(ControlPageLayout, feature_bits)
        );
        assert_eq!(FEATURE_PENDING_SEND_SIZE, 1);
        assert_eq!(CONTROL_PAGE_SIZE, PAGE_SIZE);
        assert_eq!(PAGE_SIZE, 4096);
    }

    #[test]
    fn descriptor_layout_matches_vmpacket_descriptor() {
        assert_eq!(size_of::<PacketDescriptor>(), DESCRIPTOR_SIZE);
        assert_eq!(DESCRIPTOR_SIZE, 16);
        assert_eq!(offset_of!(PacketDescriptor, packet_type), 0);
        assert_eq!(offset_of!(PacketDescriptor, data_offset8), 2);
        assert_eq!(offset_of!(PacketDescriptor, length8), 4);
        assert_eq!(offset_of!(PacketDescriptor, flags), 6);
        assert_eq!(offset_of!(PacketDescriptor, transaction_id), 8);
        assert_eq!(TRAILER_SIZE, 8);
        assert_eq!(ALIGNMENT, 8);
    }

    #[test]
    fn descriptor_bytes_are_little_endian() {
        let d = PacketDescriptor {
            packet_type: 6,
            data_offset8: 2,
            length8: 5,
            flags: 1,
            transaction_id: 0x1122_3344_5566_7788,
        };
        assert_eq!(
            d.as_bytes(),
            &[
                6, 0, 2, 0, 5, 0, 1, 0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11
            ]
        );
    }

    #[test]
    fn gpa_direct_layout_matches_mpb_array() {
        assert_eq!(size_of::<GpaDirectHeader>(), 8);
        assert_eq!(offset_of!(GpaDirectHeader, reserved), 0);
        assert_eq!(offset_of!(GpaDirectHeader, range_count), 4);
        assert_eq!(size_of::<GpaRangeHeader>(), 8);
        assert_eq!(offset_of!(GpaRangeHeader, byte_count), 0);
        assert_eq!(offset_of!(GpaRangeHeader, byte_offset), 4);
    }

    #[test]
    fn transfer_page_layout_matches_vmtransfer_page_packet_header() {
        assert_eq!(size_of::<TransferPageHeader>(), 8);
        assert_eq!(offset_of!(TransferPageHeader, pageset_id), 0);
        assert_eq!(offset_of!(TransferPageHeader, sender_owns_set), 2);
        assert_eq!(offset_of!(TransferPageHeader, reserved), 3);
        assert_eq!(offset_of!(TransferPageHeader, range_count), 4);
        assert_eq!(size_of::<TransferPageRange>(), 8);
        assert_eq!(offset_of!(TransferPageRange, byte_count), 0);
        assert_eq!(offset_of!(TransferPageRange, byte_offset), 4);
    }

    #[test]
    fn packet_types_and_flags() {
        assert_eq!(PacketType::InBand.raw(), 6);
        assert_eq!(PacketType::TransferPages.raw(), 7);
        assert_eq!(PacketType::GpaDirect.raw(), 9);
        assert_eq!(PacketType::Completion.raw(), 0x0B);
        // Every value natively; a sample under Miri, which is ~1000x slower.
        let step = if cfg!(miri) { 251 } else { 1 };
        for raw in (0..=u16::MAX).step_by(step).chain(0..=0x10) {
            match PacketType::from_raw(raw) {
                Some(t) => assert_eq!(t.raw(), raw),
                None => assert!(![6, 7, 9, 0x0B].contains(&raw)),
            }
        }
        assert_eq!(FLAG_COMPLETION_REQUESTED, 1);
        assert_eq!(KNOWN_FLAGS, 1);
    }

    #[test]
    fn size_limits() {
        assert_eq!(MAX_DESCRIBABLE_PACKET_LEN, 524_280);
        assert_eq!(max_packet_len(4096), 4080);
        assert_eq!(max_packet_len(1 << 20), 524_280);
        assert_eq!(max_packet_len(524_288 + 8), 524_280);
        assert_eq!(max_packet_len(524_288), 524_272);
        assert_eq!(packet_len(0, 0), Some(16));
        assert_eq!(packet_len(0, 1), Some(24));
        assert_eq!(packet_len(8, 8), Some(32));
        assert_eq!(packet_len(usize::MAX, 1), None);
        assert_eq!(align8(usize::MAX), None);
        assert_eq!(trailer_for(0x1234), 0x1234_0000_0000);
    }
}
