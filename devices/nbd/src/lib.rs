//! A small NBD client and a `qemu-nbd` runner: the comparison peer of vmlink's virtual
//! disk (`vmlink-disk`) in its benchmarks.
//!
//! - [`NbdClient`]: a client of the NBD protocol over a Unix stream socket. Fixed newstyle
//!   handshake with `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME` on a server
//!   without it), simple replies only (structured replies are never requested), and
//!   requests pipelined under caller-chosen handles up to a depth fixed at connect, with
//!   a read's data read straight into the caller's buffer and nothing allocated per
//!   request. Blocking [`NbdClient::read_at`] / [`NbdClient::write_at`] /
//!   [`NbdClient::flush`] / [`NbdClient::trim`] run at queue depth 1.
//! - [`QemuNbd`]: `qemu-nbd` serving a raw image on a Unix socket in a private directory,
//!   killed, reaped and cleaned up on drop; [`QemuNbd::pid`] for its CPU time.
//! - [`qemu_img_bench`]: `qemu-img bench` against an NBD export, its run time parsed.
//! - [`proto`]: the wire constants and the names of NBD error numbers.
//!
//! A hostile or broken server cannot make the client panic, allocate by the sizes it
//! sends (option replies are capped at [`MAX_OPTION_REPLY_LEN`]; read data goes only into
//! the caller's buffers or a fixed scratch buffer), or hang it on a dead socket (every
//! wait is bounded by [`ConnectOptions::timeout`], 30 s by default): each violation is its
//! own [`NbdError`] variant, and those that leave the stream out of step mark the
//! connection broken ([`NbdError::is_fatal`]).
//!
//! `qemu-nbd` and `qemu-img` come with Debian's `qemu-utils`. A missing program is an
//! error ([`NbdError::QemuNbdMissing`], [`NbdError::QemuImgMissing`]), never a silent
//! skip.
//!
//! # Examples
//!
//! Serve an image with `qemu-nbd`, read and write it blockingly, then 32 reads in
//! flight:
//!
//! ```no_run
//! use std::path::Path;
//! use vmlink_nbd::{ImgBench, NbdClient, QemuNbd, QemuNbdOptions, qemu_img_bench};
//!
//! let server = QemuNbd::start(Path::new("/dev/shm/disk.img"), "disk", &QemuNbdOptions::default())?;
//! let mut client = NbdClient::connect_unix(server.socket_path(), "disk")?;
//! println!("{} bytes, read-only: {}", client.size(), client.read_only());
//!
//! client.write_at(0, &[0xab; 4096])?;
//! client.flush()?;
//! let mut block = [0u8; 4096];
//! client.read_at(0, &mut block)?;
//!
//! let mut buffers = vec![vec![0u8; 4096]; 32];
//! for handle in 0..32u64 {
//!     client.submit_read(handle, handle * 4096, 4096)?;
//! }
//! while client.in_flight() > 0 {
//!     let reply = client.reap(|handle| Some(&mut buffers[handle as usize][..]))?;
//!     assert!(reply.is_ok(), "error {}", reply.error);
//! }
//! client.disconnect()?;
//!
//! // qemu-img's own NBD client, for comparison: 4 KiB reads, 32 in flight.
//! let bench = ImgBench { count: 100_000, depth: 32, ..ImgBench::default() };
//! let result = qemu_img_bench(server.socket_path(), "disk", &bench)?;
//! println!("{:.0} reads/s", result.ops_per_sec);
//! # Ok::<(), vmlink_nbd::NbdError>(())
//! ```
//!
//! [`NbdClient::connect_stream`] has an example that runs without `qemu-nbd`, against a
//! fake server on a socket pair.

mod client;
mod error;
pub mod proto;
mod qemu;
mod table;

pub use client::{
    BlockSize, ConnectOptions, MAX_IN_FLIGHT, MAX_OPTION_REPLIES, MAX_OPTION_REPLY_LEN,
    MAX_REQUEST_LEN, NbdClient, Reply,
};
pub use error::NbdError;
pub use qemu::{ImgBench, ImgBenchResult, QemuNbd, QemuNbdOptions, qemu_img_bench};
