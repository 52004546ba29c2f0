//! The hv_sock packet format: what one in-band VMBus packet of the stream carries.
//!
//! ```text
//! descriptor (16 bytes: type 6, data_offset8 2, length8, flags 0, transaction id 0)
//! vmpipe_proto_header { pkt_type: u32 = 1, data_size: u32 }   little-endian
//! data_size bytes of data, zero padding to 8 bytes
//! trailer (8 bytes: the packet's start offset in the high 32 bits)
//! ```
//!
//! A packet with `data_size` 0 ends the sender's direction of the stream (FIN). The layout
//! and the limits are those of Linux's `net/vmw_vsock/hyperv_transport.c`; this module
//! parses and writes the payload (everything after the descriptor, before the padding),
//! allocates nothing and has no `unsafe`.

use zerocopy::byteorder::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::HvSockError;

/// Bytes of a VMBus packet descriptor.
pub const DESCRIPTOR_LEN: usize = 16;
/// Bytes of the trailer after every VMBus packet (Linux `VMBUS_PKT_TRAILER_SIZE`).
pub const TRAILER_LEN: usize = 8;
/// Bytes of [`PipeHeader`].
pub const PIPE_HEADER_LEN: usize = 8;
/// Descriptor and pipe header: the bytes before the data (Linux `HVS_HEADER_LEN`).
pub const HVS_HEADER_LEN: usize = DESCRIPTOR_LEN + PIPE_HEADER_LEN;
/// `pkt_type` of a data packet, the only type there is.
pub const PKT_TYPE_DATA: u32 = 1;
/// The most data one packet may carry (Linux `HVS_MTU_SIZE`, 16 KiB); a packet announcing
/// more is refused.
pub const HVS_MTU_SIZE: usize = 16 * 1024;
/// The most data Linux puts in one packet it sends (`HVS_SEND_BUF_SIZE`: a 4 KiB page less
/// the pipe header), and what [`HvStream`](crate::HvStream) sends at most.
pub const HVS_SEND_BUF_SIZE: usize = 4096 - PIPE_HEADER_LEN;
/// The ring length of a packet carrying [`HVS_SEND_BUF_SIZE`] bytes, 4,120: the
/// `pending_send_size` Linux sets on its outgoing ring when the channel opens.
pub const HVS_PENDING_SEND_SIZE: usize = hvs_pkt_len(HVS_SEND_BUF_SIZE);

/// Bytes a packet carrying `data_len` bytes of data takes in the ring: descriptor, pipe
/// header, data padded to 8 bytes, trailer (Linux `HVS_PKT_LEN`). Saturates at
/// `usize::MAX` for lengths no ring holds.
///
/// ```
/// use vmlink_hvsock::wire::{HVS_SEND_BUF_SIZE, hvs_pkt_len};
///
/// assert_eq!(hvs_pkt_len(0), 32); // a FIN
/// assert_eq!(hvs_pkt_len(5), 40);
/// assert_eq!(hvs_pkt_len(HVS_SEND_BUF_SIZE), 4120);
/// ```
pub const fn hvs_pkt_len(data_len: usize) -> usize {
    let padded = data_len.saturating_add(7) & !7;
    HVS_HEADER_LEN
        .saturating_add(padded)
        .saturating_add(TRAILER_LEN)
}

/// `struct vmpipe_proto_header`: the first 8 bytes of every packet's payload.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct PipeHeader {
    /// Packet type: [`PKT_TYPE_DATA`].
    pub pkt_type: U32,
    /// Bytes of data after the header; 0 is FIN.
    pub data_size: U32,
}

impl PipeHeader {
    /// The header of a data packet carrying `data_size` bytes (0: FIN).
    pub fn data(data_size: u32) -> Self {
        Self {
            pkt_type: U32::new(PKT_TYPE_DATA),
            data_size: U32::new(data_size),
        }
    }
}

/// What one packet carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment<'a> {
    /// Bytes of the stream (never empty).
    Data(&'a [u8]),
    /// The end of the sender's direction of the stream.
    Fin,
}

impl Segment<'_> {
    /// The data bytes (none for [`Segment::Fin`]).
    pub fn data(&self) -> &[u8] {
        match self {
            Segment::Data(d) => d,
            Segment::Fin => &[],
        }
    }
}

/// Checks a pipe header against the payload length it arrived with and returns the data
/// size it announces (0: FIN). The checks, in order: the payload holds the header,
/// `pkt_type` is 1, `data_size` is at most [`HVS_MTU_SIZE`] and fits in the payload after
/// the header.
pub fn check_header(header: &PipeHeader, payload_len: usize) -> Result<usize, HvSockError> {
    let Some(available) = payload_len.checked_sub(PIPE_HEADER_LEN) else {
        return Err(HvSockError::PayloadTooShort { len: payload_len });
    };
    let pkt_type = header.pkt_type.get();
    if pkt_type != PKT_TYPE_DATA {
        return Err(HvSockError::UnknownPacketType { pkt_type });
    }
    let data_size = header.data_size.get();
    // A u32 always fits a usize on the 32- and 64-bit targets vmlink builds for.
    let len = data_size as usize;
    if len > HVS_MTU_SIZE {
        return Err(HvSockError::DataTooLarge { data_size });
    }
    if len > available {
        return Err(HvSockError::DataPastPayload {
            data_size,
            available,
        });
    }
    Ok(len)
}

/// Parses a received packet's payload (everything after the descriptor; padding may
/// follow the data and is ignored) into data or FIN.
///
/// ```
/// use vmlink_hvsock::HvSockError;
/// use vmlink_hvsock::wire::{Segment, parse};
///
/// let payload = [1, 0, 0, 0, 5, 0, 0, 0, b'h', b'e', b'l', b'l', b'o', 0, 0, 0];
/// assert_eq!(parse(&payload), Ok(Segment::Data(b"hello")));
/// assert_eq!(parse(&[1, 0, 0, 0, 0, 0, 0, 0]), Ok(Segment::Fin));
/// assert_eq!(
///     parse(&[1, 0, 0, 0, 9, 0, 0, 0, 0]),
///     Err(HvSockError::DataPastPayload { data_size: 9, available: 1 })
/// );
/// ```
pub fn parse(payload: &[u8]) -> Result<Segment<'_>, HvSockError> {
    let Ok((header, rest)) = PipeHeader::ref_from_prefix(payload) else {
        return Err(HvSockError::PayloadTooShort { len: payload.len() });
    };
    let len = check_header(header, payload.len())?;
    Ok(match rest.get(..len) {
        Some([]) => Segment::Fin,
        Some(data) => Segment::Data(data),
        // `check_header` made sure the data is there.
        None => {
            return Err(HvSockError::DataPastPayload {
                data_size: header.data_size.get(),
                available: rest.len(),
            });
        }
    })
}

/// Writes the payload of a packet carrying `data` (FIN when empty) into `out`: the pipe
/// header, then the data. Returns the bytes written, `8 + data.len()` (the ring writer adds
/// the padding).
///
/// ```
/// use vmlink_hvsock::wire::{Segment, encode, parse};
///
/// let mut out = [0u8; 32];
/// let len = encode(b"hello", &mut out)?;
/// assert_eq!(&out[..len], b"\x01\0\0\0\x05\0\0\0hello");
/// assert_eq!(parse(&out[..len])?, Segment::Data(b"hello"));
/// # Ok::<(), vmlink_hvsock::HvSockError>(())
/// ```
pub fn encode(data: &[u8], out: &mut [u8]) -> Result<usize, HvSockError> {
    if data.len() > HVS_MTU_SIZE {
        return Err(HvSockError::EncodeTooLarge { len: data.len() });
    }
    let needed = PIPE_HEADER_LEN + data.len();
    let Some(out) = out.get_mut(..needed) else {
        return Err(HvSockError::OutputTooSmall {
            needed,
            capacity: out.len(),
        });
    };
    let (head, body) = out.split_at_mut(PIPE_HEADER_LEN);
    // At most HVS_MTU_SIZE: fits a u32.
    head.copy_from_slice(PipeHeader::data(data.len() as u32).as_bytes());
    body.copy_from_slice(data);
    Ok(needed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layout_is_linuxs() {
        assert_eq!(size_of::<PipeHeader>(), PIPE_HEADER_LEN);
        assert_eq!(offset_of!(PipeHeader, pkt_type), 0);
        assert_eq!(offset_of!(PipeHeader, data_size), 4);
        assert_eq!(core::mem::align_of::<PipeHeader>(), 1);
        assert_eq!(HVS_HEADER_LEN, 24);
        assert_eq!(HVS_SEND_BUF_SIZE, 4088);
        assert_eq!(HVS_MTU_SIZE, 16384);
        assert_eq!(HVS_PENDING_SEND_SIZE, 4120);
    }

    #[test]
    fn packet_lengths() {
        assert_eq!(hvs_pkt_len(0), 32);
        assert_eq!(hvs_pkt_len(1), 40);
        assert_eq!(hvs_pkt_len(8), 40);
        assert_eq!(hvs_pkt_len(9), 48);
        assert_eq!(hvs_pkt_len(HVS_MTU_SIZE), 16416);
        assert_eq!(hvs_pkt_len(usize::MAX), usize::MAX);
    }

    #[test]
    fn header_bytes_are_little_endian() {
        assert_eq!(
            PipeHeader::data(0x0102_0304).as_bytes(),
            &[1, 0, 0, 0, 0x04, 0x03, 0x02, 0x01]
        );
    }

    #[test]
    fn every_rejection() {
        assert_eq!(parse(&[]), Err(HvSockError::PayloadTooShort { len: 0 }));
        assert_eq!(
            parse(&[1, 0, 0, 0, 0, 0, 0]),
            Err(HvSockError::PayloadTooShort { len: 7 })
        );
        assert_eq!(
            parse(&[2, 0, 0, 0, 0, 0, 0, 0]),
            Err(HvSockError::UnknownPacketType { pkt_type: 2 })
        );
        assert_eq!(
            parse(&[0, 0, 0, 0, 0, 0, 0, 0]),
            Err(HvSockError::UnknownPacketType { pkt_type: 0 })
        );
        // 16 KiB + 1, announced in a payload far too short: the size limit is named.
        assert_eq!(
            parse(&[1, 0, 0, 0, 0x01, 0x40, 0, 0]),
            Err(HvSockError::DataTooLarge { data_size: 16385 })
        );
        assert_eq!(
            parse(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            Err(HvSockError::DataTooLarge {
                data_size: u32::MAX
            })
        );
        assert_eq!(
            parse(&[1, 0, 0, 0, 3, 0, 0, 0, b'a', b'b']),
            Err(HvSockError::DataPastPayload {
                data_size: 3,
                available: 2
            })
        );
    }

    #[test]
    fn accepts_the_limits() {
        let mut payload = vec![0u8; PIPE_HEADER_LEN + HVS_MTU_SIZE];
        payload[..8].copy_from_slice(&[1, 0, 0, 0, 0x00, 0x40, 0, 0]);
        assert_eq!(parse(&payload).map(|s| s.data().len()), Ok(HVS_MTU_SIZE));
        // Padding after the data is ignored, whatever it holds.
        assert_eq!(
            parse(&[1, 0, 0, 0, 1, 0, 0, 0, b'x', 0xAA, 0xBB]),
            Ok(Segment::Data(b"x"))
        );
    }

    #[test]
    fn encode_refuses() {
        let mut out = [0u8; 8];
        assert_eq!(
            encode(b"a", &mut out),
            Err(HvSockError::OutputTooSmall {
                needed: 9,
                capacity: 8
            })
        );
        assert_eq!(encode(b"", &mut out), Ok(8));
        assert_eq!(out, [1, 0, 0, 0, 0, 0, 0, 0]);
        let big = vec![0u8; HVS_MTU_SIZE + 1];
        let mut out = vec![0u8; HVS_MTU_SIZE + 16];
        assert_eq!(
            encode(&big, &mut out),
            Err(HvSockError::EncodeTooLarge {
                len: HVS_MTU_SIZE + 1
            })
        );
    }
}
