//! vmlink over QEMU's ivshmem device.
//!
//! QEMU's `ivshmem-doorbell` device maps a shared memory into its guest as PCI BAR2 and
//! gives it doorbell registers in BAR0; the memory and the interrupt eventfds come from an
//! *ivshmem server* on a Unix socket, whose protocol QEMU's `docs/specs/ivshmem-spec.rst`
//! defines. This crate is both ends:
//!
//! - Host: [`Server`] speaks that protocol, shares a memory in vmlink-shm's layout (a
//!   sealed memfd whose size is a power of two, described by vmlink's memory header; see
//!   [`memory`]) and takes part as a peer itself ([`LOCAL_PEER`]), so a guest rings this
//!   process through its Doorbell register and this process rings a guest through the
//!   guest's eventfds, which QEMU turns into interrupts. Every QEMU instance is a peer of
//!   its own; a client that misbehaves or vanishes ends its own connection only.
//! - Guest: [`guest`] finds the PCI device in sysfs and maps its BARs from Linux userspace;
//!   [`vfio`] wires its MSI-X vectors to eventfds through `vfio-pci`; the
//!   `vmlink-ivshmem-guest` binary is a static init for a test guest.
//! - [`channel`]: vmlink's `Channel` over that memory, on the host
//!   ([`Server::channel`]: the peer leaving closes it) and in the guest
//!   ([`channel::guest_channel`]: MSI-X interrupts through VFIO, or polling).
//! - `conformance` (feature `conformance`): vmlink-channel's conformance suite with side B
//!   in a guest; [`exchange`]: the protocol the tests run over a channel.
//! - [`client`]: a client of the protocol (what QEMU's device is), for tests and tools.
//! - [`boot`] and [`initramfs`]: booting a Linux guest under QEMU (TCG) with a generated
//!   initramfs, for the tests.
//!
//! # Example
//!
//! A server and a protocol client (as QEMU would be) exchanging a doorbell:
//!
//! ```
//! use std::time::Duration;
//! use vmlink_ivshmem::client::Client;
//! use vmlink_ivshmem::{LOCAL_PEER, Server, ServerConfig};
//!
//! let dir = std::env::temp_dir().join(format!("vmlink-ivshmem-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let server = Server::bind(dir.join("ivshmem.sock"), ServerConfig::default())?;
//! let client = Client::connect(server.path(), 2, Duration::from_secs(5))?;
//! assert_eq!(client.id(), 1);
//!
//! client.ring(LOCAL_PEER, 1)?; // what a guest's Doorbell write makes QEMU do
//! assert!(server.local_vector(1)?.drain()?);
//! drop(server);
//! std::fs::remove_dir(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg(target_os = "linux")]
#![deny(missing_docs)]

#[cfg(not(target_endian = "little"))]
compile_error!("vmlink-ivshmem supports little-endian targets only");

pub mod boot;
pub mod channel;
pub mod client;
#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
pub mod exchange;
pub mod guest;
pub mod initramfs;
pub mod memory;
mod server;
pub mod vfio;
pub mod wire;

pub use error::IvshmemError;
pub use server::{
    LOCAL_PEER, MAX_QUEUED_EVENTS, MAX_VECTORS, PeerId, Server, ServerConfig, ServerEvent,
};
