//! VMBus-style message channels over two vmlink rings.
//!
//! A [`Channel`] is one outgoing ring, one incoming ring and a [`Doorbell`]. It speaks the
//! VMBus packet protocol: in-band packets, requests that ask for a completion, completions
//! carrying the request's transaction id, GPA-direct packets carrying page ranges, and
//! transfer-page packets on the receive side. On top it offers transactions
//! ([`Channel::call`]), batching, zero-copy sends and receives, flow control that waits for
//! space, and blocking, polling and (with `alloc`) async waits.
//!
//! The peer is hostile: a corrupt ring or a protocol violation puts the channel in the
//! [`ChannelState::Failed`] state with its cause, and every later call fails fast with it.
//! A peer that leaves ([`ChannelState::PeerClosed`]) can still be drained of what it
//! committed; after that every call returns [`ChannelError::Closed`].
//!
//! # Examples
//!
//! Two threads, one request and its completion:
//!
//! ```
//! use std::thread;
//! use vmlink_channel::{Config, in_process_channel_pair};
//!
//! let (host, guest) = in_process_channel_pair(16 * 4096, Config::default())?;
//! let server = thread::spawn(move || -> Result<(), vmlink_channel::ChannelError> {
//!     let mut buf = [0u8; 64];
//!     let request = guest.recv(&mut buf, None)?;
//!     assert!(request.completion_requested);
//!     let answer = request.payload(&buf).iter().map(u8::to_ascii_uppercase).collect::<Vec<_>>();
//!     guest.complete(request.transaction_id, &answer, None)
//! });
//! let mut response = [0u8; 64];
//! let len = host.call(b"ping", &mut response, None)?;
//! assert_eq!(&response[..4], b"PING");
//! assert_eq!(len, 8, "payloads are padded to 8 bytes");
//! server.join().unwrap()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg_attr(not(feature = "std"), no_std)]
// Denied, not forbidden: `fd` allows it for tokio's fd registration alone (its system calls
// go through nix).
#![deny(unsafe_code)]
#![warn(clippy::alloc_instead_of_core)]

#[cfg(feature = "alloc")]
extern crate alloc;

#[cfg(feature = "alloc")]
mod asynch;
mod channel;
#[cfg(feature = "test-utils")]
pub mod conformance;
pub mod doorbell;
mod error;
#[cfg(all(feature = "fd", target_os = "linux"))]
pub mod fd;
pub mod link;
pub mod packet;
#[cfg(feature = "alloc")]
mod queue;
mod sync;
mod txn;

#[cfg(feature = "std")]
mod pair;

pub use channel::{Channel, ChannelState, Config, Counters, Endpoint, Packet, SendBatch};
#[cfg(feature = "alloc")]
pub use channel::{Receiver, SavedEndpoint, Sender};
pub use doorbell::{AsyncDoorbell, Doorbell, DoorbellError, Wake};
#[cfg(feature = "std")]
pub use doorbell::{InProcessDoorbell, in_process_pair};
pub use error::{ChannelError, FailureCause, ProtocolError};
#[cfg(all(feature = "fd", target_os = "linux"))]
pub use fd::EventFdDoorbell;
#[cfg(all(feature = "tokio", target_os = "linux"))]
pub use fd::TokioDoorbell;
pub use link::{PacketRx, PacketTx, Received, RingRx, RingTx};
#[cfg(feature = "std")]
pub use pair::{InProcessChannel, in_process_channel_pair};
#[cfg(all(loom, feature = "std"))]
#[doc(hidden)]
pub use sync::LoomHub;
pub use txn::{MAX_TRANSACTIONS, SavedSlot};
pub use vmlink_ring::{
    OutgoingPacket, PacketMeta, Payload, RawPacket, WriteSlot, protocol::PacketType,
};
