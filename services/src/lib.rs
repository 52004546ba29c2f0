//! The message codec of Hyper-V's integration services: heartbeat, shutdown, time sync,
//! key-value pairs (KVP) and file copy, over VMBus-compatible channels.
//!
//! `vmlink-ic` is `#![no_std]`, needs no allocator and has no `unsafe`. It turns the payload
//! of an in-band VMBus packet into typed values and back; the channel and the service logic
//! (answering a heartbeat, running a shutdown) are the caller's. The layouts and rules are
//! Linux's (`include/linux/hyperv.h`, `include/uapi/linux/hyperv.h`, `drivers/hv/`,
//! `tools/hv/`), and every field is little-endian on the wire.
//!
//! A message is a payload of three parts:
//!
//! ```text
//! [ vmbuspipe_hdr: flags u32, msgsize u32 ][ icmsg_hdr: 20 bytes ][ body: icmsgsize bytes ]
//! ```
//!
//! - [`Message::parse`] checks the headers and sizes and hands back the header's values and
//!   the body; [`encode`] and [`encode_body`] write a whole message into a caller's buffer.
//! - [`negotiate`] runs the version handshake every channel opens with; [`heartbeat`],
//!   [`shutdown`], [`timesync`], [`kvp`] and [`fcopy`] hold each service's bodies.
//! - [`utf16`] decodes and encodes the fixed UTF-16LE fields KVP and file copy carry.
//! - The peer is treated as hostile: every rejection is an [`IcError`] naming what was
//!   wrong, and no function panics on any input.
//!
//! # Examples
//!
//! A guest answering a host's heartbeat:
//!
//! ```
//! use vmlink_ic::{Header, Message, MessageType, Version, heartbeat};
//!
//! // What the host sent (built here with the codec).
//! let header = Header::request(MessageType::Heartbeat, Version::new(3, 0), Version::new(3, 0), 7);
//! let mut packet = [0u8; 72];
//! let len = heartbeat::encode(&mut packet, &header, 100)?;
//!
//! // The guest's side.
//! let request = Message::parse(&packet[..len])?;
//! let mut answer = [0u8; 72];
//! let answer_len = match request.header.message_type {
//!     MessageType::Heartbeat => heartbeat::answer(&request, &mut answer)?,
//!     _ => unreachable!(),
//! };
//! assert_eq!(heartbeat::parse(&Message::parse(&answer[..answer_len])?)?, 101);
//! # Ok::<(), vmlink_ic::IcError>(())
//! ```
#![cfg_attr(not(feature = "std"), no_std)]
// The codec has no `unsafe`; the agent's one call that slews the clock allows it.
#![deny(unsafe_code)]
#![warn(
    clippy::std_instead_of_core,
    clippy::std_instead_of_alloc,
    clippy::alloc_instead_of_core
)]

/// An enum of the values a wire field may hold, with a checked conversion from the field's
/// integer type that fails with the given [`IcError`] variant.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident: $repr:ident, $error:path {
            $($(#[$variant_meta:meta])* $variant:ident = $value:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr($repr)]
        $vis enum $name {
            $($(#[$variant_meta])* $variant = $value,)+
        }

        impl TryFrom<$repr> for $name {
            type Error = $crate::IcError;

            fn try_from(value: $repr) -> Result<Self, $crate::IcError> {
                match value {
                    $($value => Ok(Self::$variant),)+
                    other => Err($error(other)),
                }
            }
        }
    };
}

mod error;
mod message;

pub mod fcopy;
pub mod heartbeat;
pub mod kvp;
pub mod negotiate;
pub mod service;
pub mod shutdown;
pub mod status;
pub mod timesync;
pub mod utf16;
pub mod wire;

#[cfg(feature = "std")]
#[allow(clippy::std_instead_of_core, clippy::std_instead_of_alloc)]
pub mod agent;
#[cfg(feature = "std")]
#[allow(clippy::std_instead_of_core, clippy::std_instead_of_alloc)]
pub mod host;
#[cfg(feature = "std")]
pub mod link;

pub use error::IcError;
pub use message::{
    Body, Header, IcFlags, Message, MessageType, Version, encode, encode_body, parse, refuse_raw,
};
pub use service::Service;
