//! Headers, the parsed view of a message, and the encoders every service builds on.

use core::fmt;
use core::ops::BitOr;

use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::IcError;
use crate::status::{HV_E_FAIL, HV_S_OK};
use crate::wire::{
    IC_HEADER_LEN, ICMSG_HDR, IcMsgHeader, IcVersion, PIPE_FLAG_DATA, PIPE_HEADER_LEN, PipeHeader,
};

/// A framework or message version: `major.minor`, ordered by major then minor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Major number.
    pub major: u16,
    /// Minor number.
    pub minor: u16,
}

impl Version {
    /// `major.minor`.
    pub const fn new(major: u16, minor: u16) -> Self {
        Self { major, minor }
    }

    /// The version as it lies on the wire.
    pub const fn to_wire(self) -> IcVersion {
        IcVersion {
            major: U16::new(self.major),
            minor: U16::new(self.minor),
        }
    }

    /// The version a wire version holds.
    pub const fn from_wire(wire: IcVersion) -> Self {
        Self::new(wire.major.get(), wire.minor.get())
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

wire_enum! {
    /// The message types (`icmsgtype`, Linux `ICMSGTYPE_*`).
    pub enum MessageType: u16, IcError::UnknownMessageType {
        /// Version negotiation, the first exchange on every service's channel.
        Negotiate = 0,
        /// Heartbeat.
        Heartbeat = 1,
        /// Key-value pair exchange.
        Kvp = 2,
        /// Shutdown, reboot or hibernate request.
        Shutdown = 3,
        /// Time synchronisation.
        TimeSync = 4,
        /// Volume shadow copy (backup); the codec validates its header only.
        Vss = 5,
        /// Host-to-guest file copy.
        FileCopy = 7,
    }
}

impl MessageType {
    /// The shortest body a message of this type may have, in bytes.
    ///
    /// Negotiate: the 8-byte negotiate header. Heartbeat: the 8-byte sequence number (Linux
    /// reads only that much: the host may leave out the reserved words). KVP: the 4-byte
    /// header (each operation then needs more). Shutdown: the whole 2060-byte body. Time sync:
    /// the smaller of its two layouts, 22 bytes (the 25-byte layout is checked once the
    /// negotiated version says which applies). VSS: the 8-byte VSS header. File copy: the
    /// 36-byte file-copy header (each operation then needs more).
    pub const fn min_body_len(self) -> usize {
        match self {
            Self::Negotiate | Self::Heartbeat | Self::Vss => 8,
            Self::Kvp => 4,
            Self::Shutdown => 2060,
            Self::TimeSync => 22,
            Self::FileCopy => 36,
        }
    }
}

/// The header's `icflags` bits (Linux `ICMSGHDRFLAG_*`); unknown bits are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IcFlags(pub u8);

impl IcFlags {
    /// Part of a transaction (set on requests and responses).
    pub const TRANSACTION: Self = Self(1);
    /// A request.
    pub const REQUEST: Self = Self(2);
    /// A response.
    pub const RESPONSE: Self = Self(4);

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl BitOr for IcFlags {
    type Output = Self;

    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// The fields of a message header a caller sets or reads; the sizes are the codec's business.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    /// Framework version (`icverframe`).
    pub framework_version: Version,
    /// Message type (`icmsgtype`).
    pub message_type: MessageType,
    /// Message version (`icvermsg`).
    pub message_version: Version,
    /// Status (an HRESULT, [`status`](crate::status)).
    pub status: u32,
    /// Transaction id (`ictransaction_id`).
    pub transaction_id: u8,
    /// Flags (`icflags`).
    pub flags: IcFlags,
}

impl Header {
    /// A request's header: flags TRANSACTION | REQUEST, status `HV_S_OK`.
    pub const fn request(
        message_type: MessageType,
        framework_version: Version,
        message_version: Version,
        transaction_id: u8,
    ) -> Self {
        Self {
            framework_version,
            message_type,
            message_version,
            status: HV_S_OK,
            transaction_id,
            flags: IcFlags(IcFlags::TRANSACTION.0 | IcFlags::REQUEST.0),
        }
    }

    /// The header answering this one: the same versions, type and transaction id, flags
    /// TRANSACTION | RESPONSE, and `status`.
    pub const fn response(&self, status: u32) -> Self {
        Self {
            status,
            flags: IcFlags(IcFlags::TRANSACTION.0 | IcFlags::RESPONSE.0),
            ..*self
        }
    }

    fn to_wire(self, body_len: u16) -> IcMsgHeader {
        IcMsgHeader {
            icverframe: self.framework_version.to_wire(),
            icmsgtype: U16::new(self.message_type as u16),
            icvermsg: self.message_version.to_wire(),
            icmsgsize: U16::new(body_len),
            status: U32::new(self.status),
            ictransaction_id: self.transaction_id,
            icflags: self.flags.0,
            reserved: [0; 2],
        }
    }
}

/// A parsed message: the header's values, copied out, and the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    /// The pipe header's flags ([`PIPE_FLAG_DATA`] from a host).
    pub pipe_flags: u32,
    /// The message header.
    pub header: Header,
    /// The body: exactly `icmsgsize` bytes after the headers.
    pub body: &'a [u8],
}

impl<'a> Message<'a> {
    /// Parses a VMBus in-band packet's payload.
    ///
    /// The sizes must nest inside the payload: the pipe header's `msgsize` must not run past
    /// the payload's end, and `icmsgsize` plus the 20-byte message header must not run past
    /// `msgsize`. Both may fall short of the payload's end: VMBus pads payloads to 8 bytes and
    /// Linux answers by sending back the whole buffer it received, only `icmsgsize` rewritten
    /// (to 16 for a negotiate answer). The body is then exactly `icmsgsize` bytes (Linux
    /// itself ignores both sizes and reads up to the packet's length; Microsoft's own
    /// implementation reads `icmsgsize` bytes, which is what a well-formed message of either
    /// holds). The type must be known and the body at least
    /// [`MessageType::min_body_len`] bytes.
    ///
    /// # Examples
    ///
    /// ```
    /// use vmlink_ic::{Message, MessageType};
    ///
    /// let payload = [
    ///     1, 0, 0, 0, 28, 0, 0, 0, // pipe: data, 28 bytes follow
    ///     3, 0, 0, 0, 1, 0, 3, 0, 0, 0, 8, 0, // framework 3.0, heartbeat, 3.0, 8-byte body
    ///     0, 0, 0, 0, 9, 2, 0, 0, // status 0, transaction 9, TRANSACTION | REQUEST
    ///     7, 0, 0, 0, 0, 0, 0, 0, // the sequence number
    /// ];
    /// let message = Message::parse(&payload)?;
    /// assert_eq!(message.header.message_type, MessageType::Heartbeat);
    /// assert_eq!(message.header.transaction_id, 9);
    /// assert_eq!(vmlink_ic::heartbeat::parse(&message)?, 7);
    /// # Ok::<(), vmlink_ic::IcError>(())
    /// ```
    pub fn parse(payload: &'a [u8]) -> Result<Self, IcError> {
        let too_short = IcError::PayloadTooShort { len: payload.len() };
        let (pipe, rest) = PipeHeader::read_from_prefix(payload).map_err(|_| too_short)?;
        let (ic, _) = IcMsgHeader::read_from_prefix(rest).map_err(|_| too_short)?;
        let msgsize = pipe.msgsize.get();
        if usize::try_from(msgsize).map_or(true, |size| size > rest.len()) {
            return Err(IcError::PipeSizePastPacket {
                msgsize,
                available: rest.len(),
            });
        }
        let icmsgsize = ic.icmsgsize.get();
        let end = ICMSG_HDR + usize::from(icmsgsize);
        if end > PIPE_HEADER_LEN + msgsize as usize {
            return Err(IcError::IcSizePastPipe { icmsgsize, msgsize });
        }
        let message_type = MessageType::try_from(ic.icmsgtype.get())?;
        let body = payload
            .get(ICMSG_HDR..end)
            .ok_or(IcError::IcSizePastPipe { icmsgsize, msgsize })?;
        if body.len() < message_type.min_body_len() {
            return Err(IcError::BodyTooShort {
                message_type,
                needed: message_type.min_body_len(),
                len: body.len(),
            });
        }
        Ok(Self {
            pipe_flags: pipe.flags.get(),
            header: Header {
                framework_version: Version::from_wire(ic.icverframe),
                message_type,
                message_version: Version::from_wire(ic.icvermsg),
                status: ic.status.get(),
                transaction_id: ic.ictransaction_id,
                flags: IcFlags(ic.icflags),
            },
            body,
        })
    }

    /// Fails unless the message has type `expected`.
    pub fn expect_type(&self, expected: MessageType) -> Result<(), IcError> {
        check_type(expected, self.header.message_type)
    }

    /// A view of the body's first `size_of::<T>()` bytes, after checking the message's type.
    pub(crate) fn body_view<T>(&self, expected: MessageType) -> Result<&'a T, IcError>
    where
        T: FromBytes + KnownLayout + Immutable + Unaligned,
    {
        self.expect_type(expected)?;
        view(self.body, expected)
    }
}

/// Parses a VMBus in-band packet's payload: [`Message::parse`].
pub fn parse(payload: &[u8]) -> Result<Message<'_>, IcError> {
    Message::parse(payload)
}

/// A view of the first `size_of::<T>()` bytes of a body of type `message_type`.
pub(crate) fn view<T>(body: &[u8], message_type: MessageType) -> Result<&T, IcError>
where
    T: FromBytes + KnownLayout + Immutable + Unaligned,
{
    view_at(body, 0, message_type)
}

/// A view of the `size_of::<T>()` bytes at `offset` of a body of type `message_type`.
pub(crate) fn view_at<T>(
    body: &[u8],
    offset: usize,
    message_type: MessageType,
) -> Result<&T, IcError>
where
    T: FromBytes + KnownLayout + Immutable + Unaligned,
{
    body.get(offset..)
        .and_then(|rest| T::ref_from_prefix(rest).ok())
        .map(|(view, _)| view)
        .ok_or(IcError::BodyTooShort {
            message_type,
            needed: offset + size_of::<T>(),
            len: body.len(),
        })
}

fn check_type(expected: MessageType, found: MessageType) -> Result<(), IcError> {
    if expected == found {
        Ok(())
    } else {
        Err(IcError::WrongMessageType { expected, found })
    }
}

/// A fixed-layout message body: a wire struct that is a whole body of one message type.
pub trait Body: IntoBytes + Immutable {
    /// The message type this body belongs to.
    const MESSAGE_TYPE: MessageType;
}

/// Writes a whole message (pipe header, message header, `body`) to the start of `out` and
/// returns its length, `28 + body.len()`.
///
/// The pipe header gets flags [`PIPE_FLAG_DATA`] and `msgsize` `20 + body.len()`; the message
/// header gets `icmsgsize` `body.len()` and the rest from `header`.
///
/// # Examples
///
/// ```
/// use vmlink_ic::{Header, MessageType, Version, encode, parse};
///
/// let header = Header::request(MessageType::Vss, Version::new(3, 0), Version::new(5, 0), 1);
/// let mut out = [0u8; 64];
/// let len = encode(&mut out, &header, &[0; 12])?;
/// assert_eq!(len, 40);
/// assert_eq!(parse(&out[..len])?.header, header);
/// # Ok::<(), vmlink_ic::IcError>(())
/// ```
pub fn encode(out: &mut [u8], header: &Header, body: &[u8]) -> Result<usize, IcError> {
    encode_with(out, header, body.len(), |dst| {
        dst.copy_from_slice(body);
        Ok(())
    })
}

/// Writes a message whose body is `body`, after checking that `header` has the body's type.
pub fn encode_body<B: Body>(out: &mut [u8], header: &Header, body: &B) -> Result<usize, IcError> {
    check_type(B::MESSAGE_TYPE, header.message_type)?;
    encode(out, header, body.as_bytes())
}

/// Writes the headers for a `body_len`-byte body, zeroes the body and lets `fill` write it.
pub(crate) fn encode_with(
    out: &mut [u8],
    header: &Header,
    body_len: usize,
    fill: impl FnOnce(&mut [u8]) -> Result<(), IcError>,
) -> Result<usize, IcError> {
    let icmsgsize = u16::try_from(body_len).map_err(|_| IcError::BodyTooLarge { len: body_len })?;
    let total = ICMSG_HDR + body_len;
    let capacity = out.len();
    let out = out.get_mut(..total).ok_or(IcError::OutputTooSmall {
        needed: total,
        capacity,
    })?;
    let (pipe, rest) = out.split_at_mut(PIPE_HEADER_LEN);
    let (ic, body) = rest.split_at_mut(IC_HEADER_LEN);
    let pipe_header = PipeHeader {
        flags: U32::new(PIPE_FLAG_DATA),
        msgsize: U32::new(u32::from(icmsgsize) + IC_HEADER_LEN as u32),
    };
    pipe.copy_from_slice(pipe_header.as_bytes());
    ic.copy_from_slice(header.to_wire(icmsgsize).as_bytes());
    body.fill(0);
    fill(body)?;
    Ok(total)
}

/// Writes a message whose body is a `T` filled in place by `fill` (from zeroes), after
/// checking that `header` has type `expected`. For bodies too large to build on the stack.
pub(crate) fn encode_in_place<T>(
    out: &mut [u8],
    header: &Header,
    expected: MessageType,
    fill: impl FnOnce(&mut T) -> Result<(), IcError>,
) -> Result<usize, IcError>
where
    T: FromBytes + IntoBytes + KnownLayout + Unaligned,
{
    check_type(expected, header.message_type)?;
    encode_with(out, header, size_of::<T>(), |body| {
        // The body is exactly size_of::<T>() bytes and T has alignment 1: this cannot fail.
        let len = body.len();
        let view = T::mut_from_bytes(body).map_err(|_| IcError::BodyTooLarge { len })?;
        fill(view)
    })
}

/// The failure answer to a payload whose sizes or type do not parse but whose two headers
/// are there: the payload echoed with status `HV_E_FAIL`, flags TRANSACTION | RESPONSE,
/// and sizes that say what was echoed (as much of the body as fits in `out`, at most
/// 65,535 bytes). Returns its length: 0 when even the headers are missing or `out` cannot
/// hold them. What Linux's services do with a message they cannot use, without trusting
/// its sizes.
///
/// # Examples
///
/// ```
/// use vmlink_ic::{Message, refuse_raw, status::HV_E_FAIL};
///
/// // A heartbeat whose icmsgsize (500) runs past its packet.
/// let mut request = [0u8; 36];
/// request[..8].copy_from_slice(&[1, 0, 0, 0, 28, 0, 0, 0]);
/// request[8..28].copy_from_slice(&[3, 0, 0, 0, 1, 0, 3, 0, 0, 0, 244, 1, 0, 0, 0, 0, 9, 2, 0, 0]);
/// assert!(Message::parse(&request).is_err());
/// let mut out = [0u8; 64];
/// let len = refuse_raw(&request, &mut out);
/// let answer = Message::parse(&out[..len])?;
/// assert_eq!((answer.header.status, answer.header.transaction_id), (HV_E_FAIL, 9));
/// # Ok::<(), vmlink_ic::IcError>(())
/// ```
pub fn refuse_raw(payload: &[u8], out: &mut [u8]) -> usize {
    let (Some(headers), Some(room)) = (payload.get(..ICMSG_HDR), out.len().checked_sub(ICMSG_HDR))
    else {
        return 0;
    };
    let Ok(mut ic) = IcMsgHeader::read_from_bytes(&headers[PIPE_HEADER_LEN..]) else {
        return 0;
    };
    let body = &payload[ICMSG_HDR..];
    let body = &body[..body.len().min(room).min(usize::from(u16::MAX))];
    ic.icmsgsize = U16::new(body.len() as u16);
    ic.status = U32::new(HV_E_FAIL);
    ic.icflags = (IcFlags::TRANSACTION | IcFlags::RESPONSE).0;
    let pipe = PipeHeader {
        flags: U32::new(PIPE_FLAG_DATA),
        msgsize: U32::new((IC_HEADER_LEN + body.len()) as u32),
    };
    out[..PIPE_HEADER_LEN].copy_from_slice(pipe.as_bytes());
    out[PIPE_HEADER_LEN..ICMSG_HDR].copy_from_slice(ic.as_bytes());
    out[ICMSG_HDR..ICMSG_HDR + body.len()].copy_from_slice(body);
    ICMSG_HDR + body.len()
}
