//! vmlink's process shared-memory transport.
//!
//! Two processes share one channel's memory — a memfd sealed so it can neither shrink nor
//! grow — laid out as `[header page][guest→host ring][host→guest ring][buffer area]`, each
//! ring a 4096-byte control page plus its data. The header page is vmlink's memory header
//! ([`vmlink_ring::area`]): it lists the rings and the buffer area, so the memory describes
//! itself to tools such as `vmlink inspect`. One eventfd per direction is the doorbell. The
//! host allocates all of it and hands the fds to the guest over a Unix stream socket
//! (`SCM_RIGHTS`) after a small versioned handshake and a check of the guest's credentials
//! (`SO_PEERCRED`) against the service's [`Policy`]. The socket then stays open for the
//! channel's life: each side's doorbell watches it, so a side blocked in a wait learns at
//! once that its peer is gone.
//!
//! - Host: a [`Service`] (name, [`Layout`], [`Policy`], channel [`Config`]) served by a
//!   [`Listener`] on a socket path, by [`Service::spawn`] for a child process, or by
//!   [`Service::serve_stream`] on any connected socket.
//! - Guest: [`Guest::connect`], [`Guest::from_env`] (in a spawned child),
//!   [`Guest::connect_stream`].
//! - Either side ends up with an [`Endpoint`]: a [`ShmChannel`] plus the [`BufferArea`],
//!   whose 4 KiB pages are what GPA-direct page numbers index on this transport.
//! - A device serving GPA-direct requests moves data between a file and the area in
//!   place: one transfer at a time with [`BufferArea::read_file`] /
//!   [`write_file`](BufferArea::write_file), or many in flight through a [`FileRing`]
//!   (io_uring).
//!
//! The guest treats the host as hostile too: it checks the seals, the size and the layout
//! before it maps anything, then that the memory header is sound and says exactly what the
//! offer says before it uses anything; every fd that arrives is close-on-exec and closed
//! again if the message is wrong.
//!
//! # Examples
//!
//! A host listening on a path and a guest connecting, one request and its completion:
//!
//! ```
//! use std::thread;
//! use vmlink_shm::{Guest, Layout, Listener, Service};
//!
//! let dir = std::env::temp_dir().join(format!("vmlink-shm-doc-{}", std::process::id()));
//! let path = dir.join("echo.sock");
//! let service = Service::new("echo").with_layout(Layout::symmetric(16 * 4096, 64 * 4096));
//! let listener = Listener::bind(&path, service)?;
//!
//! let guest = thread::spawn(move || -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//!     let guest = Guest::new("echo").connect(&path)?;
//!     let mut reply = [0u8; 64];
//!     let len = guest.channel().call(b"ping", &mut reply, None)?;
//!     assert_eq!(&reply[..4], b"PING");
//!     assert_eq!(len, 8, "payloads are padded to 8 bytes");
//!     Ok(())
//! });
//!
//! let host = listener.accept()?;
//! let mut buf = [0u8; 64];
//! let request = host.channel().recv(&mut buf, None)?;
//! let answer: Vec<u8> = request.payload(&buf).iter().map(u8::to_ascii_uppercase).collect();
//! host.channel().complete(request.transaction_id, &answer, None)?;
//! guest.join().unwrap().unwrap();
//! drop(listener);
//! std::fs::remove_dir(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg(target_os = "linux")]

#[cfg(not(target_endian = "little"))]
compile_error!("vmlink-shm supports little-endian targets only: VMBus rings are little-endian");

mod endpoint;
mod error;
mod guest;
mod handover;
mod host;
mod memory;
pub mod monitor;
mod policy;
mod protocol;
mod sys;
mod uring;

pub use endpoint::{Detached, Endpoint, Role, ShmChannel};
pub use error::{RefusalCode, ShmError};
pub use guest::Guest;
pub use handover::{
    DEFAULT_HANDOVER_TIMEOUT, HandOverFailed, HandOverListener, Incoming, Successor, TakeOver,
};
pub use host::{DEFAULT_HANDSHAKE_TIMEOUT, Listener, MAX_PENDING_HANDSHAKES, Service};
pub use memory::{
    BufferArea, HEADER_PAGE_LEN, Layout, LayoutError, MAX_MEMORY_LEN, MAX_SUB_CHANNELS, Mapping,
    OutOfBounds, SharedMemory, ShmRing,
};
pub use policy::{PeerCredentials, Policy};
pub use uring::{FileDirection, FileRing};
pub use vmlink_channel::{Config, Wait};

/// The environment variable through which [`Service::spawn`] tells the child which fd is
/// its end of the socket.
pub const SOCKET_FD_ENV: &str = "VMLINK_SHM_FD";

/// The handshake protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = protocol::VERSION;

/// Every Rust block of the repository's README, compiled and run exactly as it stands (each
/// is a whole program), so what a new user pastes works.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
