//! The hv_sock data path over vmlink's VMBus-compatible ring channels.
//!
//! Hyper-V sockets (Linux's `net/vmw_vsock/hyperv_transport.c`, Windows' `AF_HYPERV`)
//! carry a byte stream over a VMBus channel: every in-band packet's payload is an 8-byte
//! `vmpipe_proto_header` (`pkt_type` 1, `data_size`) followed by the data, and a packet
//! with no data ends the sender's direction (FIN). This crate speaks exactly that over any
//! vmlink [`Endpoint`](vmlink_channel::Endpoint), so a vmlink endpoint can be either side of
//! an hv_sock connection's channel:
//!
//! - [`wire`]: the pipe header (pinned to Linux's layout), the limits (`HVS_SEND_BUF_SIZE`
//!   4,088 bytes sent per packet, `HVS_MTU_SIZE` 16 KiB accepted), `HVS_PKT_LEN`
//!   ([`wire::hvs_pkt_len`]), and the parser and encoder of one packet's payload, which
//!   allocate nothing;
//! - [`guid`]: [`Guid`] in Windows / Linux byte order with its text form, and the service
//!   ids `<port>-facb-11e6-bd58-64006a7986d3` that stand for vsock ports
//!   ([`port_to_service_id`], [`service_id_to_port`]);
//! - [`HvStream`]: `std::io::Read` and `Write` over an endpoint, with half-close
//!   ([`HvStream::shutdown_write`]) and a hostile peer's packets refused as typed errors
//!   ([`HvSockError`]); [`HvStream::split`] gives a reading and a writing half for two
//!   threads;
//! - with feature `tokio`, `AsyncHvStream`: the same as tokio's
//!   `AsyncRead` / `AsyncWrite`, waiting through the channel's async twins.
//! - [`frame`]: vmlink packets framed on a byte stream (a 24-byte header carrying what a
//!   VMBus descriptor carries), and [`FrameReader`](frame::FrameReader), which takes the
//!   stream in pieces of any size and refuses a hostile peer's frames with typed errors;
//! - [`socket`]: connected streams over sockets of every family, AF_VSOCK (Linux), hybrid
//!   vsock through a Firecracker / Cloud Hypervisor VMM's Unix socket, AF_HYPERV (Windows)
//!   and Unix sockets, each with listen / accept / connect, and
//!   [`StreamAddr`](socket::StreamAddr) naming any of them in one text
//!   (`vsock:3:5000`, `hybrid:/run/fc.sock:5000`, `unix:/tmp/s`, `hyperv:parent:5000`);
//! - `link` (Linux): vmlink packets over any connected stream socket, so the whole
//!   channel API (`call` with many in flight, batches, flow control, blocking and polling
//!   waits, states, counters) runs over those streams: [`frame`]s in a bounded send
//!   buffer, whole frames only on receipt, a hostile peer's frames failing the channel.
//!
//! Setting a connection up is not this crate's: on Hyper-V the guest asks for one with a
//! `TL_CONNECT_REQUEST` on the VMBus control plane and the host offers a channel for it
//! (or the other way round), which vmlink does not implement. The stream starts from an
//! endpoint whose rings are already shared.
//!
//! # Examples
//!
//! ```
//! use std::io::{Read, Write};
//! use vmlink_channel::{Config, in_process_channel_pair};
//! use vmlink_hvsock::{HvStream, port_to_service_id};
//!
//! // The service a guest would connect to for vsock port 5001.
//! assert_eq!(port_to_service_id(5001).to_string(), "00001389-facb-11e6-bd58-64006a7986d3");
//!
//! let (host, guest) = in_process_channel_pair(4 * 4096, Config::default())?;
//! let (mut host, mut guest) = (HvStream::new(host), HvStream::new(guest));
//! guest.write_all(b"ping")?;
//! let mut buf = [0u8; 4];
//! host.read_exact(&mut buf)?;
//! assert_eq!(&buf, b"ping");
//! host.shutdown_write()?;
//! assert_eq!(guest.read(&mut buf)?, 0, "the host's FIN");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
// The one `unsafe` is Windows': building a `SOCKADDR_HV` for socket2 (`socket::hyperv`).
#![cfg_attr(not(windows), forbid(unsafe_code))]
#![cfg_attr(windows, deny(unsafe_code))]

#[cfg(feature = "tokio")]
mod asynch;
mod error;
pub mod frame;
pub mod guid;
#[cfg(target_os = "linux")]
pub mod link;
#[cfg(any(unix, windows))]
pub mod socket;
mod stream;
pub mod wire;

#[cfg(feature = "tokio")]
pub use asynch::AsyncHvStream;
pub use error::HvSockError;
pub use guid::{Guid, GuidParseError, port_to_service_id, service_id_to_port};
pub use stream::{HvReader, HvStream, HvWriter};
