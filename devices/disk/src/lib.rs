//! A virtual disk over vmlink.
//!
//! A host serves a disk image (a file or a block device) to a guest over a vmlink-shm
//! channel. Requests are packets: reads and writes are GPA-direct packets whose ranges name
//! the guest's buffers in the channel's buffer area, and the host moves the data between
//! the image and those buffers in place with positional I/O, or many at once through an
//! io_uring ([`ServeOptions::io_uring`]) (no copy through the ring or through private
//! memory); flush, discard and the geometry query are in-band. Up
//! to 64 requests are in flight per channel, completed in any order, and the host
//! publishes a batch of completions with one commit, so a busy guest is rarely signalled.
//! The wire format and the checks the host makes are in [`proto`].
//!
//! - Host: [`Disk::open`], then [`serve`] on each channel ([`service`] gives the vmlink-shm
//!   service with a fitting layout).
//! - Guest: [`DiskClient`] over a connected channel: queued requests without copies
//!   ([`DiskClient::submit_read`], then [`DiskClient::reap`], or [`DiskClient::reap_into`]
//!   for every completion waiting at once) or blocking calls through a bounce buffer
//!   ([`DiskClient::read`], [`DiskClient::write`]).
//!
//! The guest is hostile: every request is validated before anything is done
//! ([`proto::decode`]); a bad one gets an error completion ([`Status`]) and changes
//! nothing; a guest that leaves mid-request still has every write it saw completed in the
//! image.
//!
//! # Examples
//!
//! ```
//! use std::thread;
//! use vmlink_disk::{Disk, DiskClient, DiskOptions, serve, service};
//! use vmlink_shm::{Guest, Listener};
//!
//! let dir = std::env::temp_dir().join(format!("vmlink-disk-doc-{}", std::process::id()));
//! let listener = Listener::bind(dir.join("disk.sock"), service("disk"))?; // makes `dir`, 0700
//! let image = dir.join("disk.img");
//! std::fs::File::create(&image)?.set_len(1 << 20)?;
//!
//! let host = thread::spawn(move || -> Result<(), vmlink_disk::DiskError> {
//!     let disk = Disk::open(&image, DiskOptions::default())?;
//!     let endpoint = listener.accept()?;
//!     serve(&disk, endpoint.channel(), endpoint.buffer())?;
//!     Ok(())
//! });
//!
//! let endpoint = Guest::new("disk").connect(dir.join("disk.sock"))?;
//! let (channel, memory) = endpoint.into_parts();
//! let mut disk = DiskClient::new(channel, memory.buffer())?;
//! assert_eq!(disk.info().sectors, 2048);
//! disk.write(8, &[0x5a; 4096])?;
//! disk.flush()?;
//! let mut back = [0u8; 4096];
//! disk.read(8, &mut back)?;
//! assert_eq!(back, [0x5a; 4096]);
//! drop(disk); // the host's serve returns when the guest has gone
//! host.join().unwrap()?;
//! std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg(target_os = "linux")]

mod guest;
mod host;
pub mod proto;

use std::io;

pub use guest::{DiskClient, Done};
pub use host::{
    DEEP_QUEUE, Disk, DiskOptions, HAND_OVER_BYTES, ServeOptions, ServeStats, WORKER_MIN_BYTES,
    serve, serve_with,
};
pub use proto::{DiskInfo, Status};
use vmlink_channel::{ChannelError, Config};
pub use vmlink_shm::Layout;
use vmlink_shm::{Service, ShmError};

/// The layout [`service`] uses: rings of 256 KiB (room for 64 requests of the largest
/// kind and their completions) and a 66 MiB buffer area, whose guest half holds 32
/// buffers of 1 MiB and a client's 1 MiB bounce buffer (the host's half is unused: the
/// host moves data in place).
pub const DEFAULT_LAYOUT: Layout = Layout::symmetric(256 * 1024, 66 << 20);

/// A vmlink-shm service named `name` for a disk: [`DEFAULT_LAYOUT`], no sub-channels, and
/// the channel configuration a disk needs (GPA-direct requests up to 1 MiB).
pub fn service(name: &str) -> Service {
    service_with(name, DEFAULT_LAYOUT, 0)
}

/// [`service`] with another layout, offering up to `sub_channels` sub-channels: each has
/// its own rings and doorbells and is served on a thread of its own, and all share the
/// buffer area (a guest gives each sub-channel's client its own part of it,
/// [`DiskClient::with_buffers`]).
pub fn service_with(name: &str, layout: Layout, sub_channels: u32) -> Service {
    Service::new(name)
        .with_layout(layout)
        .with_config(config())
        .with_sub_channels(sub_channels)
}

/// The most either side of a disk spins before it sleeps ([`Config::spin_before_sleep`];
/// the channel's default is 100 µs). A receive spins half as long again as its waits have
/// lasted, while they average less than this: so a guest with a 1 MiB request in flight
/// (served in about 200-250 µs from a tmpfs image on the machine this was measured on)
/// sees its completion while it spins, and the host sees the next request while it spins,
/// rather than each sleeping and being signalled. Measured there, 1 MiB writes at depth 1
/// went from 2.0 doorbells per request to under 0.02, and from 0.79-0.85x the host's own
/// `pwrite` to 0.87-0.93x (means of four sets of alternated runs), at more CPU per request
/// (the guest spins through the write). A channel that idles spins no longer than before
/// once its waits average more than this.
pub const SPIN_BEFORE_SLEEP: std::time::Duration = std::time::Duration::from_micros(500);

/// The channel configuration both sides of a disk use: GPA-direct page lists as long as
/// the largest request needs (the transport caps page numbers at the buffer area), and a
/// spin before sleeping of at most [`SPIN_BEFORE_SLEEP`]. Where the channel's default is
/// not to spin (under Miri and loom, and with `VMLINK_SPIN=off`, as the test suite runs
/// on two CPUs), neither does a disk.
pub fn config() -> Config {
    let config = Config::default().with_gpa_page_limit(u64::MAX);
    if config.spin_before_sleep.is_zero() {
        config
    } else {
        config.with_spin_before_sleep(SPIN_BEFORE_SLEEP)
    }
}

/// What went wrong on either side of a disk.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiskError {
    /// The image could not be opened or measured.
    #[error("cannot open the disk image {path}: {source}")]
    Open {
        /// The image's path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The image holds no whole sector.
    #[error("a disk image of {len} bytes holds no whole 512-byte sector")]
    TooSmall {
        /// Its length.
        len: u64,
    },
    /// The channel failed, closed or timed out.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The transport could not connect or serve.
    #[error(transparent)]
    Shm(#[from] ShmError),
    /// The host refused or failed the request.
    #[error("the host refused the request: {status} (detail {detail})")]
    Refused {
        /// Why.
        status: Status,
        /// For [`Status::Io`], the host's errno.
        detail: u32,
    },
    /// The host answered with something that is not a completion of this protocol.
    #[error("the host sent a malformed reply")]
    BadReply,
    /// The sectors lie outside the disk (checked before sending).
    #[error("sectors {sector}..+{sectors} are not inside the disk's {disk} sectors")]
    OutOfRange {
        /// The first sector.
        sector: u64,
        /// How many.
        sectors: u32,
        /// The disk's size in sectors.
        disk: u64,
    },
    /// [`ServeOptions::worker_cpu`] names a CPU this process may not use.
    #[error("cannot pin the I/O threads to CPU {cpu}: {source}")]
    Pin {
        /// The CPU.
        cpu: usize,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// [`ServeOptions::io_uring`] could not be set up: the kernel refused an io_uring (too
    /// old, or disabled by `kernel.io_uring_disabled` or a seccomp filter), or the options
    /// ask for it beside I/O threads.
    #[error("cannot serve through io_uring: {0}")]
    IoUring(#[source] io::Error),
    /// An argument cannot make a request (checked before sending).
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// A blocking call while queued requests are in flight.
    #[error("{in_flight} queued requests are in flight: reap them before a blocking call")]
    Busy {
        /// How many.
        in_flight: usize,
    },
    /// The client's buffers cannot hold two of the largest requests (one queued, one
    /// bounce buffer).
    #[error("a disk client's buffers are {len} bytes; it needs {needed}")]
    BuffersTooSmall {
        /// The buffers' length.
        len: usize,
        /// What is needed.
        needed: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_spins_up_to_its_own_bound_unless_the_channel_default_is_not_to_spin() {
        let expected = if Config::default().spin_before_sleep.is_zero() {
            std::time::Duration::ZERO
        } else {
            SPIN_BEFORE_SLEEP
        };
        assert_eq!(config().spin_before_sleep, expected);
        assert_eq!(config().gpa_page_limit, Some(u64::MAX));
    }
}
