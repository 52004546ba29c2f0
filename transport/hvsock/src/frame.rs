//! vmlink packets framed on a byte stream: the format, an encoder, and a reader that takes
//! the stream in whatever pieces it arrives.
//!
//! A socket has no descriptors and no rings, so each packet travels as a frame: a 24-byte
//! header carrying what a VMBus descriptor carries, then the packet's extra header and its
//! payload, each padded with zeros to 8 bytes as on a ring. All fields are little-endian.
//!
//! ```text
//! offset  size  field
//!      0     2  packet_type     the VMBus packet type (6 in-band, 7 transfer pages, 11 completion)
//!      2     2  flags           the VMBus packet flags (1: completion requested)
//!      4     4  header_len      bytes of extra header after the frame header, a multiple of 8
//!      8     4  payload_len     bytes of payload after the extra header, a multiple of 8
//!     12     4  reserved        0
//!     16     8  transaction_id
//!     24        extra header, then payload
//! ```
//!
//! The peer is hostile: [`FrameReader`] refuses a frame whose reserved word is not zero,
//! whose type is not one a stream carries (GPA-direct packets name guest pages and have no
//! meaning on a socket), whose lengths are not multiples of 8, or whose length is past the
//! reader's maximum, each with its [`FrameError`]; it never delivers part of a frame, takes
//! its memory once (the maximum frame), and reports a stream that ends inside a frame. An
//! error is final: the stream cannot be resynchronised, so every later call returns it.
//!
//! This is the framing the stream link ([`link`](crate::link), Linux) puts vmlink packets
//! in on the socket streams of [`socket`](crate::socket).

use std::io::{self, Read};

use vmlink_channel::PacketType;
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Bytes of [`FrameHeader`].
pub const FRAME_HEADER_LEN: usize = 24;

/// The frame header (see the [module docs](self)).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct FrameHeader {
    /// The VMBus packet type.
    pub packet_type: U16,
    /// The VMBus packet flags.
    pub flags: U16,
    /// Bytes of extra header, a multiple of 8.
    pub header_len: U32,
    /// Bytes of payload, a multiple of 8.
    pub payload_len: U32,
    /// Zero.
    pub reserved: U32,
    /// The transaction id.
    pub transaction_id: U64,
}

pub use vmlink_channel::FrameError;

/// True for the packet types a stream carries: in-band, transfer pages and completions.
pub fn carried(packet_type: u16) -> bool {
    [
        PacketType::InBand,
        PacketType::TransferPages,
        PacketType::Completion,
    ]
    .iter()
    .any(|t| t.raw() == packet_type)
}

/// `n` rounded up to 8 (saturating).
const fn pad8(n: usize) -> usize {
    n.saturating_add(7) & !7
}

/// The bytes a frame of this extra header and payload takes on the stream.
pub const fn frame_len(header_len: usize, payload_len: usize) -> usize {
    FRAME_HEADER_LEN
        .saturating_add(pad8(header_len))
        .saturating_add(pad8(payload_len))
}

/// Writes the frame of a packet into `out` (extra header and payload each padded with
/// zeros to 8 bytes); returns its length.
pub fn encode(
    out: &mut [u8],
    packet_type: u16,
    flags: u16,
    transaction_id: u64,
    header: &[u8],
    payload: &[u8],
) -> Result<usize, FrameError> {
    let (h, p) = (pad8(header.len()), pad8(payload.len()));
    let unframeable = FrameError::Unframeable {
        packet_type,
        len: header.len().saturating_add(payload.len()),
    };
    if !carried(packet_type) {
        return Err(unframeable);
    }
    let (Ok(h32), Ok(p32)) = (u32::try_from(h), u32::try_from(p)) else {
        return Err(unframeable);
    };
    let len = frame_len(header.len(), payload.len());
    let capacity = out.len();
    let out = out.get_mut(..len).ok_or(FrameError::OutputTooSmall {
        needed: len,
        capacity,
    })?;
    let head = FrameHeader {
        packet_type: U16::new(packet_type),
        flags: U16::new(flags),
        header_len: U32::new(h32),
        payload_len: U32::new(p32),
        reserved: U32::new(0),
        transaction_id: U64::new(transaction_id),
    };
    let (fh, rest) = out.split_at_mut(FRAME_HEADER_LEN);
    fh.copy_from_slice(head.as_bytes());
    rest.fill(0);
    rest[..header.len()].copy_from_slice(header);
    rest[h..h + payload.len()].copy_from_slice(payload);
    Ok(len)
}

/// A whole frame in a [`FrameReader`]'s buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The VMBus packet type.
    pub packet_type: u16,
    /// The VMBus packet flags.
    pub flags: u16,
    /// The transaction id.
    pub transaction_id: u64,
    /// The extra header (a multiple of 8 bytes).
    pub header: &'a [u8],
    /// The payload (a multiple of 8 bytes).
    pub payload: &'a [u8],
}

/// Reads frames from a byte stream that arrives in pieces of any size.
///
/// It holds one buffer of the largest frame it takes, allocated when it is made. Bytes go
/// in with [`fill`](Self::fill) (from a reader, partial reads and `WouldBlock` included) or
/// [`push`](Self::push) (from a slice); [`next_frame`](Self::next_frame) hands out each whole frame,
/// checked, and [`consume`](Self::consume) lets it go.
#[derive(Debug)]
pub struct FrameReader {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The end of stream was seen.
    eof: bool,
    /// The first error, returned ever after.
    failed: Option<FrameError>,
}

impl FrameReader {
    /// A reader of frames up to `max_frame` bytes (at least the 24-byte header).
    pub fn new(max_frame: usize) -> Self {
        Self {
            buf: vec![0; max_frame.max(FRAME_HEADER_LEN)].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            failed: None,
        }
    }

    /// The largest frame this reader takes.
    pub fn max_frame(&self) -> usize {
        self.buf.len()
    }

    /// Bytes received and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// True once the stream ended (what is buffered may still hold whole frames).
    pub fn at_eof(&self) -> bool {
        self.eof
    }

    /// Makes room at the end of the buffer by moving the unconsumed bytes to its start.
    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Takes as many bytes of `data` as there is room for; returns how many.
    pub fn push(&mut self, data: &[u8]) -> usize {
        self.compact();
        let n = data.len().min(self.buf.len() - self.end);
        self.buf[self.end..self.end + n].copy_from_slice(&data[..n]);
        self.end += n;
        n
    }

    /// Says the stream ended: what follows the last whole frame is then an error.
    pub fn finish(&mut self) {
        self.eof = true;
    }

    /// Reads once from `stream` into the free room (`Ok(0)`: the stream ended, or the
    /// buffer is full). `WouldBlock` and `Interrupted` come back as they are.
    pub fn fill(&mut self, stream: &mut impl Read) -> io::Result<usize> {
        self.compact();
        if self.end == self.buf.len() || self.eof {
            return Ok(0);
        }
        let n = stream.read(&mut self.buf[self.end..])?;
        if n == 0 {
            self.eof = true;
        }
        self.end += n;
        Ok(n)
    }

    /// The next whole frame, checked; `Ok(None)` when it has not all arrived (or the
    /// stream ended cleanly between frames). It stays the next until consumed.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, FrameError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        match self.check() {
            Ok(Some(len)) => {
                let bytes = &self.buf[self.start..self.start + len];
                let (head, rest) =
                    FrameHeader::read_from_prefix(bytes).expect("checked: the header is there");
                let (header, payload) = rest.split_at(head.header_len.get() as usize);
                Ok(Some(Frame {
                    packet_type: head.packet_type.get(),
                    flags: head.flags.get(),
                    transaction_id: head.transaction_id.get(),
                    header,
                    payload,
                }))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.failed = Some(e);
                Err(e)
            }
        }
    }

    /// The length of the whole, valid frame at the start, if it has all arrived.
    fn check(&self) -> Result<Option<usize>, FrameError> {
        let have = self.end - self.start;
        let truncated = |want| {
            if self.eof && have > 0 {
                Err(FrameError::Truncated { have, want })
            } else {
                Ok(None)
            }
        };
        let Ok((head, _)) = FrameHeader::read_from_prefix(&self.buf[self.start..self.end]) else {
            return truncated(FRAME_HEADER_LEN);
        };
        if head.reserved.get() != 0 {
            return Err(FrameError::Reserved(head.reserved.get()));
        }
        if !carried(head.packet_type.get()) {
            return Err(FrameError::PacketType(head.packet_type.get()));
        }
        for (what, len) in [
            ("extra header", head.header_len.get()),
            ("payload", head.payload_len.get()),
        ] {
            if len % 8 != 0 {
                return Err(FrameError::Unaligned { what, len });
            }
        }
        let len = FRAME_HEADER_LEN as u64
            + u64::from(head.header_len.get())
            + u64::from(head.payload_len.get());
        if len > self.buf.len() as u64 {
            return Err(FrameError::TooLong {
                len,
                max: self.buf.len(),
            });
        }
        let len = len as usize;
        if have < len {
            return truncated(len);
        }
        Ok(Some(len))
    }

    /// Lets the frame [`next_frame`](Self::next_frame) handed out go; nothing when there is none.
    pub fn consume(&mut self) {
        if let Ok(Some(len)) = self.check() {
            self.start += len;
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            }
        }
    }
}
