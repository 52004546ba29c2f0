//! The two headers every integration-service message starts with, as they lie on the wire.
//!
//! All fields are little-endian and every struct has alignment 1, so a view can be taken at
//! any offset of a byte buffer. Sizes and offsets are those of Linux's `include/linux/hyperv.h`
//! (`struct vmbuspipe_hdr`, `struct ic_version`, `struct icmsg_hdr`, `struct icmsg_negotiate`);
//! the crate's tests pin each one.

use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Bytes of [`PipeHeader`].
pub const PIPE_HEADER_LEN: usize = 8;
/// Bytes of [`IcMsgHeader`].
pub const IC_HEADER_LEN: usize = 20;
/// Bytes of both headers: where the body starts in a payload (Linux `ICMSG_HDR`).
pub const ICMSG_HDR: usize = PIPE_HEADER_LEN + IC_HEADER_LEN;
/// The pipe header's `flags` for a data message (the value hosts write).
pub const PIPE_FLAG_DATA: u32 = 1;

/// `struct vmbuspipe_hdr`: the pipe framing before the message header.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct PipeHeader {
    /// Pipe message kind ([`PIPE_FLAG_DATA`]).
    pub flags: U32,
    /// Bytes after this header that belong to the message (message header included).
    pub msgsize: U32,
}

/// `struct ic_version`: a version as it lies on the wire.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct IcVersion {
    /// Major number.
    pub major: U16,
    /// Minor number.
    pub minor: U16,
}

/// `struct icmsg_hdr`: the integration-service message header.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct IcMsgHeader {
    /// Framework version.
    pub icverframe: IcVersion,
    /// Message type ([`MessageType`](crate::MessageType)).
    pub icmsgtype: U16,
    /// Message (service) version.
    pub icvermsg: IcVersion,
    /// Bytes of the body that follows this header.
    pub icmsgsize: U16,
    /// Status: an HRESULT ([`status`](crate::status)).
    pub status: U32,
    /// Transaction id, echoed by the response.
    pub ictransaction_id: u8,
    /// Flags ([`IcFlags`](crate::IcFlags)).
    pub icflags: u8,
    /// Reserved.
    pub reserved: [u8; 2],
}

/// `struct icmsg_negotiate` without its flexible version array: the negotiate body's start.
///
/// The versions follow it: `icframe_vercnt` framework versions, then `icmsg_vercnt` message
/// versions, each an [`IcVersion`].
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct NegotiateHeader {
    /// Number of framework versions.
    pub icframe_vercnt: U16,
    /// Number of message versions.
    pub icmsg_vercnt: U16,
    /// Reserved.
    pub reserved: U32,
}
