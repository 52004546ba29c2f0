//! vmlink's KVM transport: a channel whose rings live in a guest's memory.
//!
//! This is the adapter a VMM embeds. The guest describes a channel by a list of its 4 KiB
//! page numbers (the guest's outgoing ring first, each ring a control page followed by its
//! data pages, as in a VMBus GPADL); the host validates the list against the guest memory
//! map and builds the two rings over those pages ([`GuestRing`]: the ring core's
//! [`PageListMem`](vmlink_ring::PageListMem) backend with dirty tracking). Doorbells go
//! through KVM without a trip to userspace: guest→host by an ioeventfd on an MMIO (or PIO)
//! address, host→guest by an irqfd on a GSI ([`KvmDoorbell`]).
//!
//! Guest memory is rust-vmm `vm-memory` **0.17** (its `GuestMemory` trait, the name most
//! VMMs use; 0.17.2 is 0.18's code under the old names, where the trait is called
//! `GuestMemoryBackend`).
//!
//! Ring pages are guest memory the VMM also reaches through `vm-memory`, so
//! [`RingPages::new`] is `unsafe`: its contract says what the VMM owes those pages while
//! they are rings (kept mapped; no references to them; written only through the rings).
//! Every store the host's rings make is marked dirty in the bitmap of the region holding
//! the page (vm-memory's `backend-bitmap`), as vm-memory's own writes are, so a VMM that
//! tracks dirty pages for live migration sees ring updates.
//!
//! With the `tokio` feature, [`KvmDoorbell`] is also an
//! [`AsyncDoorbell`](vmlink_channel::AsyncDoorbell): async waits register the ioeventfd
//! with the reactor of the tokio runtime they run in. The `test-utils` feature exposes
//! `test_vm`, the test guest's VM setup shared by this crate's tests and the `kvm_demo`
//! example; it is not part of the API.
//!
//! Devices that carry much traffic open sub-channels beside their primary channel, one per
//! vCPU, each with its own rings and doorbell. A [`ChannelSetup`] describes one channel
//! (its [`RingPages`] and its [`KvmDoorbell`], on its own MMIO address and GSI);
//! [`host_channel_set`] builds the host's endpoints of a whole set as a
//! [`ChannelSet`](vmlink_channel::ChannelSet), and [`host_sub_channels`] adds sub-channels
//! to a primary already open, refusing channels that would share a page, a doorbell
//! address or a GSI ([`SetupError`]). [`sub_channel`] is the negotiation over the primary
//! channel: the guest asks, the host offers, either side may close one.
//!
//! The guest side is the `no_std` ring and channel code itself, running on the guest's own
//! physical memory; `transport/kvm/guest/` is a bare-metal test guest that does exactly
//! that inside a real KVM VM (see `tests/kvm_guest.rs`).
//!
//! # Example (host side)
//!
//! ```
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmlink_channel::{ChannelError, Config, Wait};
//! use vmlink_kvm::{KvmDoorbell, RingPages, host_channel};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)])?;
//! // Page numbers the guest sent: a 3-page outgoing ring, then a 3-page incoming ring.
//! let pages = [0x200, 0x207, 0x203, 0x210, 0x211, 0x215];
//! // SAFETY: `mem` stays mapped until the rings are dropped (it is only dropped at the end
//! // of `main`), and this VMM touches ring pages only through the rings.
//! let rings = unsafe { RingPages::new(&mem, &pages, 3) }?;
//! let doorbell = KvmDoorbell::new(0x3000_0000, 5)?;
//! let channel = host_channel(&rings, doorbell, Config::default())?;
//! // The guest has sent nothing yet.
//! assert_eq!(channel.recv(&mut [0u8; 64], Wait::Now), Err(ChannelError::Empty));
//! # Ok(())
//! # }
//! ```
#![deny(unsafe_code)]

#[cfg(not(target_os = "linux"))]
compile_error!("vmlink-kvm needs Linux (KVM)");

mod doorbell;
mod memory;
mod set;
pub mod sub_channel;
#[cfg(feature = "test-utils")]
#[doc(hidden)]
pub mod test_vm;

pub use doorbell::{DoorbellRegistration, KvmDoorbell, RegisterError};
pub use memory::{
    GpaReadError, GuestRing, HostChannel, PageError, RingPages, host_channel, read_gpa_range,
};
pub use set::{
    ChannelSetup, MAX_CHANNELS, SetupError, check_setups, host_channel_set, host_sub_channels,
};
