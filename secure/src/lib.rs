//! vmlink's secure channel: encrypted and authenticated packets over any vmlink link.
//!
//! Shared memory between a guest and its host is plaintext to anyone who can map it: a
//! second process holding the memfd, a host component that should not see tenant data.
//! This crate puts a layer between a channel's transaction machinery and its link (a ring
//! pair, a stream socket, any [`PacketTx`](vmlink_channel::PacketTx) /
//! [`PacketRx`](vmlink_channel::PacketRx)) that seals every packet on the way out and
//! opens it on the way in. The endpoint above is the same [`Endpoint`] with the same API:
//! sends, receives, calls and completions.
//!
//! # Handshake
//!
//! [`establish`] runs a [Noise](https://noiseprotocol.org/) handshake through the plain
//! channel (with `snow`), then wraps its links. Offered patterns ([`Pattern`]), all over
//! Curve25519 and SHA-256:
//!
//! - `XX` (the default): both sides hold static key pairs and check each other's against
//!   their authorized keys; nobody needs the other's key in advance.
//! - `IK`: the guest knows the host's key in advance; one round trip less, and the guest's
//!   identity travels encrypted from the first message.
//! - `NNpsk0`: no key pairs; both hold one 32-byte pre-shared key.
//!
//! # Transport
//!
//! Noise's own transport messages stop at 65,535 bytes, and a vmlink packet may be as long
//! as its ring allows. Rather than fragment, the layer takes the handshake's two keys
//! (snow's raw split) and runs the AEAD itself with Noise's nonce discipline: one seal per
//! packet whatever its size, a 64-bit counter nonce per direction that must be exactly the
//! next one, Noise's `REKEY` at the same counter on both sides ([`RekeyLimits`]), and the
//! largest nonce never used. ChaCha20-Poly1305 by default, AES-256-GCM selectable
//! ([`Cipher`]).
//!
//! Frames, what a receiver checks, and new key epochs (after a rollback or a restore, so
//! no nonce is ever used twice under one key) are described in the [`link`] module.
//! GPA-direct packets are refused with `ChannelError::Unsupported`: the pages they name
//! are plaintext shared memory.
//!
//! # Builds
//!
//! With the default feature `std`: blocking handshakes with deadlines ([`establish`]),
//! [`establish_pair`] (a thread), key files ([`Keypair::load`], [`AuthorizedKeys::load`]),
//! and keys and salts from the system's random source.
//!
//! Without it (`default-features = false`) the crate is `no_std` and needs an allocator and
//! a random source: keys, ephemeral keys and epoch salts come from `getrandom`, which is
//! the platform's where there is one, and on a bare target the embedder's own function
//! (`--cfg getrandom_backend="custom"`, see getrandom's documentation). Handshakes run with
//! [`establish_async`] over an endpoint whose doorbell is an `AsyncDoorbell`; keys come from
//! the embedder's storage ([`Keypair::parse`], [`AuthorizedKeys::parse`]). The test command
//! type-checks this build for `x86_64-unknown-none` (with SSE2, which ring needs) and runs
//! the crate's tests in it. The bare-metal KVM test guest is out of scope: it has neither
//! an allocator nor a random source, and its channels stay plain.
//!
//! # Example
//!
//! ```
//! use std::thread;
//! use vmlink_channel::{Config, Wait, in_process_channel_pair};
//! use vmlink_secure::{
//!     AuthorizedKeys, Credentials, HandshakeRole, Keypair, SecureConfig, establish,
//! };
//!
//! let (host_keys, guest_keys) = (Keypair::generate(), Keypair::generate());
//! let host_creds = Credentials::Static {
//!     local: host_keys.clone(),
//!     authorized: AuthorizedKeys::new([guest_keys.public()]),
//! };
//! let guest_creds = Credentials::Static {
//!     local: guest_keys,
//!     authorized: AuthorizedKeys::new([host_keys.public()]),
//! };
//! let (host, guest) = in_process_channel_pair(16 * 4096, Config::default())?;
//! let config = SecureConfig::default();
//! let guest = thread::spawn(move || {
//!     establish(guest, HandshakeRole::Initiator, &guest_creds, &config)
//! });
//! let host = establish(host, HandshakeRole::Responder, &host_creds, &config)?;
//! let guest = guest.join().unwrap()?;
//! assert_eq!(guest.peer_key, Some(host_keys.public()));
//! assert_eq!(host.handshake_hash, guest.handshake_hash);
//!
//! guest.endpoint.send(b"sealed on the way", Wait::Now)?;
//! let mut buf = [0u8; 64];
//! let got = host.endpoint.recv(&mut buf, Wait::Now)?;
//! assert_eq!(&got.payload(&buf)[..17], b"sealed on the way");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;
// The unit tests use std's threads and collections in both builds.
#[cfg(all(test, not(feature = "std")))]
extern crate std;

mod cipher;
mod handshake;
mod keys;
pub mod link;
pub mod servicing;
mod wiped;

pub use cipher::{Cipher, KEY_LEN, KEY_STATE_LEN, KeyState, RekeyLimits, SALT_LEN, TAG_LEN};
pub use handshake::{
    Credentials, Established, HandshakeRole, Pattern, SecureConfig, SecureEndpoint, SecureError,
    establish_async, protocol_name, restore_layer,
};
#[cfg(feature = "std")]
pub use handshake::{EstablishedPair, establish, establish_pair};
#[cfg(feature = "std")]
pub use keys::KeyFileError;
pub use keys::{AuthorizedKeys, Keypair, PublicKey};
pub use link::{SecureRx, SecureTx};
pub use vmlink_channel::Endpoint;
pub use zeroize::Zeroizing;
