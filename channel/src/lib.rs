//! VMBus-style message channels over packet links.
//!
//! An [`Endpoint`] is one side of a packet link — a sending half ([`PacketTx`]) and a
//! receiving half ([`PacketRx`]) — with a [`Doorbell`], and everything written once above
//! the link: requests and their completions ([`Endpoint::call`], transaction ids, late and
//! unknown completions), the bounded queue of packets kept while calls wait, failure
//! states, counters, and waiting. A [`Channel`] is the endpoint over a VMBus ring pair
//! ([`RingTx`], [`RingRx`]); a stream transport or a layer over another link (a secure
//! layer rewriting payloads) gets the same API from [`Endpoint::over`]. GPA-direct packets
//! are a capability a link may refuse ([`ChannelError::Unsupported`]).
//!
//! Every operation takes one [`Wait`]: [`Wait::Now`] never sleeps, [`Wait::Until`] waits
//! up to a deadline, [`Wait::Forever`] as long as it takes (an `Option<Instant>` converts);
//! each has an `_async` twin. Received packets are read in place through one view,
//! [`Packet`], or copied into a buffer ([`Received`] describes them). An endpoint shared by
//! threads locks each half only for the link operation; two threads that only send and
//! only receive [`split`](Endpoint::split) it into a [`Sender`] and a [`Receiver`] with no
//! lock between them. [`Endpoint::save`] and [`Endpoint::restore`] hand an endpoint's state
//! to a successor.
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
//! use vmlink_channel::{Config, Wait, in_process_channel_pair};
//!
//! let (host, guest) = in_process_channel_pair(16 * 4096, Config::default())?;
//! let server = thread::spawn(move || -> Result<(), vmlink_channel::ChannelError> {
//!     let mut buf = [0u8; 64];
//!     let request = guest.recv(&mut buf, Wait::Forever)?;
//!     assert!(request.completion_requested);
//!     let answer = request.payload(&buf).iter().map(u8::to_ascii_uppercase).collect::<Vec<_>>();
//!     guest.complete(request.transaction_id, &answer, Wait::Forever)
//! });
//! let mut response = [0u8; 64];
//! let len = host.call(b"ping", &mut response, Wait::Forever)?;
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
#[cfg(feature = "alloc")]
mod set;
mod sync;
mod txn;

#[cfg(feature = "std")]
mod pair;

pub use channel::{
    Channel, ChannelState, Config, Counters, DEFAULT_SPIN_BEFORE_SLEEP, Endpoint, Packet,
    SendBatch, Wait,
};
#[cfg(feature = "alloc")]
pub use channel::{Receiver, Sample, SavedEndpoint, Sender, Watch};
#[cfg(feature = "saved-state")]
pub use channel::{SAVED_STATE_MAGIC, SAVED_STATE_VERSION, SavedStateError};
pub use doorbell::{AsyncDoorbell, Doorbell, DoorbellError, Wake};
#[cfg(feature = "std")]
pub use doorbell::{InProcessDoorbell, in_process_pair};
pub use error::{
    AuthFailure, ChannelError, FailureCause, FailureKind, FrameError, Polled, ProtocolError,
};
#[cfg(all(feature = "fd", target_os = "linux"))]
pub use fd::EventFdDoorbell;
#[cfg(all(feature = "tokio", target_os = "linux"))]
pub use fd::TokioDoorbell;
pub use link::{PacketRx, PacketTx, Received, RingRx, RingTx};
#[cfg(feature = "std")]
pub use pair::{InProcessChannel, in_process_channel_pair};
#[cfg(feature = "alloc")]
pub use set::ChannelSet;
#[cfg(all(loom, feature = "std"))]
#[doc(hidden)]
pub use sync::LoomHub;
pub use txn::{MAX_TRANSACTIONS, SavedSlot};
pub use vmlink_ring::{
    OutgoingPacket, PacketMeta, Payload, RawPacket, WriteSlot, protocol::PacketType,
};
