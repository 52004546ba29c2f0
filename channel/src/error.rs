//! Channel errors.

use vmlink_ring::RingError;

use crate::doorbell::DoorbellError;
use crate::packet::PacketError;

/// The peer broke the packet protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A completion arrived for a transaction id that is not in flight.
    #[error("completion for transaction id {transaction_id:#x}, which is not in flight")]
    UnknownTransaction {
        /// The completion's transaction id.
        transaction_id: u64,
    },
    /// A packet's extra header is malformed.
    #[error("malformed packet header: {0}")]
    Packet(#[from] PacketError),
}

/// Why a channel failed. Once failed, every call on the channel returns this cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FailureCause {
    /// A ring is corrupt.
    #[error("corrupt ring: {0}")]
    Ring(#[from] RingError),
    /// The peer broke the packet protocol.
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    /// The doorbell failed.
    #[error("doorbell failure: {0}")]
    Doorbell(DoorbellError),
    /// A stream link received a frame it refuses (garbage, a length past the largest, a
    /// stream that ended inside a frame).
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// A stream link's socket failed (an `errno`; 0 when the system gave none).
    #[error("link I/O failed (os error {0})")]
    Io(i32),
    /// The endpoint had failed before it was saved in its byte form and restored; the
    /// byte form keeps what kind of failure it was, not its details.
    #[error("failed before it was restored ({0})")]
    Inherited(FailureKind),
    /// A secure layer refused what arrived: a packet that failed authentication (altered,
    /// replayed, reordered, dropped, or sealed with another key) or a frame no secure
    /// peer writes. Nothing of it was delivered.
    #[error("authentication failed: {0}")]
    Authentication(#[from] AuthFailure),
}

/// Why a secure layer refused a packet (see [`FailureCause::Authentication`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum AuthFailure {
    /// The authentication tag did not verify: the packet was altered, replayed,
    /// reordered or dropped before it (each direction accepts exactly the next counter),
    /// or sealed with a key this side does not hold (a peer that skipped a rekey).
    #[error("a packet's authentication tag did not verify")]
    Tag,
    /// A frame of a kind, type or length no secure peer writes.
    #[error("a frame no secure peer writes ({0})")]
    Frame(&'static str),
    /// A frame longer than this side's bound for one.
    #[error("a frame of {len} bytes, more than the {max} this side takes")]
    TooLarge {
        /// The frame's length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The authenticated contents are malformed (lengths that do not add up, padding
    /// that is not zero, a packet type a secure channel does not carry).
    #[error("a packet's authenticated contents are malformed ({0})")]
    Contents(&'static str),
    /// A direction used up its nonces (2^64 - 1 packets under one key epoch).
    #[error("the nonces of a direction are used up")]
    Exhausted,
}

impl FailureCause {
    /// What kind of failure this is.
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::Ring(_) => FailureKind::Ring,
            Self::Protocol(_) => FailureKind::Protocol,
            Self::Doorbell(_) => FailureKind::Doorbell,
            Self::Frame(_) => FailureKind::Frame,
            Self::Io(_) => FailureKind::Io,
            Self::Inherited(k) => *k,
            Self::Authentication(_) => FailureKind::Authentication,
        }
    }
}

/// The kinds of [`FailureCause`], without their details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum FailureKind {
    /// [`FailureCause::Ring`].
    #[error("corrupt ring")]
    Ring,
    /// [`FailureCause::Protocol`].
    #[error("protocol violation")]
    Protocol,
    /// [`FailureCause::Doorbell`].
    #[error("doorbell failure")]
    Doorbell,
    /// [`FailureCause::Frame`].
    #[error("bad frame")]
    Frame,
    /// [`FailureCause::Io`].
    #[error("link I/O failed")]
    Io,
    /// [`FailureCause::Authentication`].
    #[error("authentication failed")]
    Authentication,
}

/// Why a frame of a stream link was refused (the framing: `vmlink-hvsock`'s `frame`
/// module). Every one is final for the stream it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The reserved word is not zero.
    #[error("a frame's reserved word is {0:#x}, not 0")]
    Reserved(u32),
    /// A packet type a stream does not carry.
    #[error("a frame of packet type {0}, which a stream does not carry")]
    PacketType(u16),
    /// A length that is not a multiple of 8.
    #[error("a frame's {what} length {len} is not a multiple of 8")]
    Unaligned {
        /// Which length.
        what: &'static str,
        /// Its value.
        len: u32,
    },
    /// A frame longer than the reader takes.
    #[error("a frame of {len} bytes is past the largest of {max}")]
    TooLong {
        /// The frame's length (header, extra header, payload), as announced.
        len: u64,
        /// The largest this reader takes.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("the stream ended {have} bytes into a {want}-byte frame")]
    Truncated {
        /// Bytes of the frame that arrived.
        have: usize,
        /// Bytes the frame needed (at least the header's).
        want: usize,
    },
    /// A packet to encode that the format cannot carry (its type, or lengths past u32).
    #[error("a packet of type {packet_type} with {len} bytes cannot be framed")]
    Unframeable {
        /// The packet type.
        packet_type: u16,
        /// Its extra header and payload bytes.
        len: usize,
    },
    /// The output buffer is too small for the frame.
    #[error("a {needed}-byte frame does not fit in {capacity} bytes")]
    OutputTooSmall {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes there are.
        capacity: usize,
    },
}

#[cfg(feature = "std")]
impl From<FrameError> for std::io::Error {
    fn from(e: FrameError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

/// A channel operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The peer closed the channel and everything it committed has been received.
    #[error("the peer closed the channel")]
    Closed,
    /// The channel failed; every later call fails with the same cause.
    #[error("the channel failed: {0}")]
    Failed(FailureCause),
    /// A send that may not wait ([`Wait::Now`](crate::Wait::Now)) found the outgoing ring full.
    #[error("the outgoing ring is full")]
    Full,
    /// Nothing to receive now (a receive with [`Wait::Now`](crate::Wait::Now)).
    #[error("nothing to receive now")]
    Empty,
    /// The deadline passed before the operation could complete.
    #[error("the deadline passed")]
    TimedOut,
    /// The packet can never fit in the outgoing ring.
    #[error("a packet of {len} bytes can never fit in the outgoing ring (largest {max})")]
    TooLarge {
        /// The packet's length in the ring (descriptor, header, padded payload).
        len: usize,
        /// The largest packet the ring carries.
        max: usize,
    },
    /// The receive buffer is smaller than the packet. A receive leaves the packet queued;
    /// a call's completion that does not fit its response buffer is consumed (the
    /// transaction is over) and only its length is reported.
    #[error("a {needed}-byte packet does not fit in a {capacity}-byte buffer")]
    BufferTooSmall {
        /// Bytes the packet needs (header and payload).
        needed: usize,
        /// The buffer's length.
        capacity: usize,
    },
    /// Every transaction id is in flight.
    #[error("all {capacity} transaction ids are in flight")]
    TransactionsExhausted {
        /// How many transactions may be in flight at once.
        capacity: usize,
    },
    /// A packet this side tried to send is malformed (e.g. a bad GPA range).
    #[error("invalid packet: {0}")]
    InvalidPacket(PacketError),
    /// A read from a received packet fell outside it.
    #[error("{len} bytes at offset {offset} do not fit in a region of {size} bytes")]
    OutOfBounds {
        /// Offset of the read.
        offset: usize,
        /// Length of the read.
        len: usize,
        /// Size of the region.
        size: usize,
    },
    /// A caller asked for something the channel cannot do (flags, header alignment).
    #[error("invalid request: {0}")]
    InvalidRequest(vmlink_ring::WriteError),
    /// GPA ranges were asked of a packet that is not a GPA-direct packet.
    #[error(
        "GPA ranges were asked of a packet of type {}, not a GPA-direct packet (type 9)",
        packet_type.raw()
    )]
    NotGpaDirect {
        /// The packet's type.
        packet_type: vmlink_ring::protocol::PacketType,
    },
    /// Transfer-page ranges were asked of a packet that is not a transfer-page packet.
    #[error(
        "transfer pages were asked of a packet of type {}, not a transfer-page packet (type 7)",
        packet_type.raw()
    )]
    NotTransferPages {
        /// The packet's type.
        packet_type: vmlink_ring::protocol::PacketType,
    },
    /// A saved endpoint does not fit the endpoint it is restored into.
    #[error("the saved endpoint cannot be restored: {reason}")]
    BadSavedState {
        /// What does not fit.
        reason: &'static str,
    },
    /// The link cannot do this at all (GPA-direct packets on a socket or a secure layer).
    #[error("this link does not support {what}")]
    Unsupported {
        /// What was asked.
        what: &'static str,
    },
}

impl From<FailureCause> for ChannelError {
    fn from(cause: FailureCause) -> Self {
        ChannelError::Failed(cause)
    }
}

/// A poll's result: `Ok(None)` when the operation would have had to wait
/// ([`ChannelError::Empty`] or [`ChannelError::Full`] from a [`Wait::Now`](crate::Wait::Now)
/// call), its value or its other error otherwise.
///
/// ```
/// use vmlink_channel::{Config, Polled, Wait, in_process_channel_pair};
///
/// let (a, b) = in_process_channel_pair(4096, Config::default())?;
/// let mut buf = [0u8; 16];
/// assert_eq!(b.recv(&mut buf, Wait::Now).polled()?, None);
/// a.send(b"x", Wait::Now)?;
/// while let Some(r) = b.recv(&mut buf, Wait::Now).polled()? {
///     assert_eq!(&r.payload(&buf)[..1], b"x");
/// }
/// # Ok::<(), vmlink_channel::ChannelError>(())
/// ```
pub trait Polled<T> {
    /// `Ok(None)` for `Empty` and `Full`.
    fn polled(self) -> Result<Option<T>, ChannelError>;
}

impl<T> Polled<T> for Result<T, ChannelError> {
    fn polled(self) -> Result<Option<T>, ChannelError> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(ChannelError::Empty | ChannelError::Full) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
