//! Heartbeat: the host sends a sequence number every few seconds, the guest answers with the
//! number plus one.
//!
//! # Examples
//!
//! ```
//! use vmlink_ic::{Header, Message, MessageType, Version, heartbeat};
//!
//! let header = Header::request(MessageType::Heartbeat, Version::new(3, 0), Version::new(3, 0), 1);
//! let mut request = [0u8; 68];
//! let len = heartbeat::encode(&mut request, &header, 41)?;
//!
//! let mut answer = [0u8; 68];
//! let answer_len = heartbeat::answer(&Message::parse(&request[..len])?, &mut answer)?;
//! let reply = Message::parse(&answer[..answer_len])?;
//! assert_eq!(heartbeat::parse(&reply)?, 42);
//! assert_eq!(reply.header, header.response(vmlink_ic::status::HV_S_OK));
//! # Ok::<(), vmlink_ic::IcError>(())
//! ```

use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::message::{Body, encode_body, view};
use crate::status::HV_S_OK;
use crate::{Header, IcError, Message, MessageType};

/// `struct heartbeat_msg_data`: the heartbeat body (40 bytes).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct HeartbeatMsg {
    /// The sequence number.
    pub seq_num: U64,
    /// Reserved.
    pub reserved: [U32; 8],
}

impl Body for HeartbeatMsg {
    const MESSAGE_TYPE: MessageType = MessageType::Heartbeat;
}

/// The sequence number of a heartbeat message (request or answer).
///
/// Only the first 8 bytes of the body are required: Linux reads no more, since hosts may
/// leave out the reserved words.
pub fn parse(message: &Message<'_>) -> Result<u64, IcError> {
    message.expect_type(MessageType::Heartbeat)?;
    view::<U64>(message.body, MessageType::Heartbeat).map(|seq| seq.get())
}

/// Writes a heartbeat message carrying `seq_num` (the whole 40-byte body).
pub fn encode(out: &mut [u8], header: &Header, seq_num: u64) -> Result<usize, IcError> {
    let body = HeartbeatMsg {
        seq_num: U64::new(seq_num),
        reserved: [U32::ZERO; 8],
    };
    encode_body(out, header, &body)
}

/// Writes the guest's answer to a heartbeat request: the response header (status
/// `HV_S_OK`) and the sequence number plus one (wrapping).
pub fn answer(request: &Message<'_>, out: &mut [u8]) -> Result<usize, IcError> {
    let seq = parse(request)?;
    encode(out, &request.header.response(HV_S_OK), seq.wrapping_add(1))
}
