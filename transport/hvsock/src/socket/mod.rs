//! Connected byte streams between a host and a guest, over sockets of every family: the
//! streams a later layer carries vmlink packets over.
//!
//! Each family listens, accepts and connects in the same shape and hands out a connected
//! stream with `std::io::Read` and `Write`:
//!
//! | family | address (text) | stream | where |
//! | --- | --- | --- | --- |
//! | [`vsock`]: AF_VSOCK (virtio-vsock, and hv_sock as Linux presents it) | [`VsockAddr`] `CID:PORT` | [`SocketStream`] | Linux |
//! | [`hybrid`]: Firecracker / Cloud Hypervisor's vsock over Unix sockets | [`HybridAddr`] `PATH:PORT` | `UnixStream` | Unix |
//! | [`hyperv`]: AF_HYPERV, Windows' Hyper-V sockets | [`HvSocketAddr`] `VMID:SERVICE` | [`SocketStream`] | Windows |
//! | [`unix`]: Unix stream sockets on a path | a path | `UnixStream` | Unix |
//!
//! [`StreamAddr`] names any of them in one piece of text, for a command line's one flag:
//!
//! - `vsock:CID:PORT`: `vsock:3:5000`, `vsock:host:5000`, `vsock:any:any` to listen;
//! - `hybrid:PATH:PORT`: `hybrid:/run/fc.sock:5000` connects to guest port 5000 through
//!   the VMM socket `/run/fc.sock`, and listens for the guest's connections to host port
//!   5000 on `/run/fc.sock_5000`;
//! - `unix:PATH`: `unix:/tmp/s`;
//! - `hyperv:VMID:SERVICE`: `hyperv:parent:5000`, `hyperv:wildcard:<service GUID>`.
//!
//! [`StreamAddr::connect`] gives a [`Stream`] and [`StreamAddr::listen`] a [`Listener`]
//! whose [`accept`](Listener::accept) gives one; every family's address parses and prints
//! on every platform, and a family this platform has no sockets for is
//! [`StreamError::Unsupported`]. Failures are typed: [`SocketError`] names the step
//! ([`SocketOp`]) and the address, [`HybridError`] the handshake's refusals,
//! [`AddrParseError`] the text's.
//!
//! ```
//! use std::io::{Read, Write};
//! use vmlink_hvsock::socket::StreamAddr;
//!
//! let dir = std::env::temp_dir().join(format!("vmlink-socket-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let addr: StreamAddr = format!("unix:{}", dir.join("s").display()).parse()?;
//! let listener = addr.listen()?;
//! let mut client = addr.connect()?;
//! let mut server = listener.accept()?;
//! client.write_all(b"ping")?;
//! let mut buf = [0u8; 4];
//! server.read_exact(&mut buf)?;
//! assert_eq!(&buf, b"ping");
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Not here yet: vmlink packets carried over these streams, and tokio twins of the streams.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

mod error;
pub mod hybrid;
pub mod hyperv;
#[cfg(any(target_os = "linux", windows))]
mod sock;
#[cfg(unix)]
pub mod unix;
pub mod vsock;

pub use error::{AddrParseError, HybridError, SocketError, SocketOp, StreamError};
pub use hybrid::HybridAddr;
pub use hyperv::HvSocketAddr;
#[cfg(windows)]
pub use hyperv::HvSocketListener;
#[cfg(any(target_os = "linux", windows))]
pub use sock::SocketStream;
pub use vsock::VsockAddr;
#[cfg(target_os = "linux")]
pub use vsock::VsockListener;

/// The address of a stream socket of any family. Text forms: `vsock:CID:PORT`,
/// `hybrid:PATH:PORT`, `unix:PATH`, `hyperv:VMID:SERVICE` (the [module](self) says more).
///
/// ```
/// use vmlink_hvsock::socket::{StreamAddr, VsockAddr};
///
/// let addr: StreamAddr = "vsock:host:5000".parse()?;
/// assert_eq!(addr, StreamAddr::Vsock(VsockAddr::new(2, 5000)));
/// assert_eq!(addr.to_string(), "vsock:2:5000");
/// assert!("tcp:127.0.0.1:80".parse::<StreamAddr>().is_err());
/// # Ok::<(), vmlink_hvsock::socket::AddrParseError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StreamAddr {
    /// AF_VSOCK (Linux).
    Vsock(VsockAddr),
    /// Hybrid vsock through a VMM's Unix socket (Unix).
    Hybrid(HybridAddr),
    /// A Unix socket path (Unix).
    Unix(PathBuf),
    /// AF_HYPERV (Windows).
    HyperV(HvSocketAddr),
}

impl fmt::Display for StreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamAddr::Vsock(addr) => write!(f, "vsock:{addr}"),
            StreamAddr::Hybrid(addr) => write!(f, "hybrid:{addr}"),
            StreamAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            StreamAddr::HyperV(addr) => write!(f, "hyperv:{addr}"),
        }
    }
}

impl FromStr for StreamAddr {
    type Err = AddrParseError;

    fn from_str(text: &str) -> Result<Self, AddrParseError> {
        let unknown = || AddrParseError::UnknownFamily {
            text: text.to_owned(),
        };
        let (family, rest) = text.split_once(':').ok_or_else(unknown)?;
        Ok(match family {
            "vsock" => StreamAddr::Vsock(rest.parse()?),
            "hybrid" => StreamAddr::Hybrid(rest.parse()?),
            "hyperv" => StreamAddr::HyperV(rest.parse()?),
            "unix" if rest.is_empty() => {
                return Err(AddrParseError::EmptyPath {
                    text: text.to_owned(),
                });
            }
            "unix" => StreamAddr::Unix(rest.into()),
            _ => return Err(unknown()),
        })
    }
}

impl StreamAddr {
    /// The family's name, as its text form starts.
    pub fn family(&self) -> &'static str {
        match self {
            StreamAddr::Vsock(_) => "vsock",
            StreamAddr::Hybrid(_) => "hybrid",
            StreamAddr::Unix(_) => "unix",
            StreamAddr::HyperV(_) => "hyperv",
        }
    }

    /// Connects: [`vsock::connect`], [`hybrid::connect`] (with its handshake),
    /// [`unix::connect`] or `hyperv::connect` (Windows).
    pub fn connect(&self) -> Result<Stream, StreamError> {
        match self {
            #[cfg(target_os = "linux")]
            StreamAddr::Vsock(addr) => Ok(Stream::Socket(vsock::connect(addr)?)),
            #[cfg(unix)]
            StreamAddr::Hybrid(addr) => Ok(Stream::Unix(hybrid::connect(addr)?)),
            #[cfg(unix)]
            StreamAddr::Unix(path) => Ok(Stream::Unix(unix::connect(path)?)),
            #[cfg(windows)]
            StreamAddr::HyperV(addr) => Ok(Stream::Socket(hyperv::connect(addr)?)),
            #[allow(unreachable_patterns)]
            _ => Err(self.unsupported()),
        }
    }

    /// Listens: [`vsock::listen`], [`hybrid::listen`] (on `<path>_<port>`),
    /// [`unix::listen`] or `hyperv::listen` (Windows).
    pub fn listen(&self) -> Result<Listener, StreamError> {
        match self {
            #[cfg(target_os = "linux")]
            StreamAddr::Vsock(addr) => Ok(Listener::Vsock(vsock::listen(addr)?)),
            #[cfg(unix)]
            StreamAddr::Hybrid(addr) => Ok(Listener::Unix {
                listener: hybrid::listen(addr)?,
                path: addr.listen_path(),
            }),
            #[cfg(unix)]
            StreamAddr::Unix(path) => Ok(Listener::Unix {
                listener: unix::listen(path)?,
                path: path.clone(),
            }),
            #[cfg(windows)]
            StreamAddr::HyperV(addr) => Ok(Listener::HyperV(hyperv::listen(addr)?)),
            #[allow(unreachable_patterns)]
            _ => Err(self.unsupported()),
        }
    }

    #[allow(dead_code)]
    fn unsupported(&self) -> StreamError {
        StreamError::Unsupported {
            family: self.family(),
        }
    }
}

/// A connected stream of any family: `Read`, `Write` (on `&Stream` too), half-close,
/// timeouts, and on Unix its descriptor.
#[derive(Debug)]
#[non_exhaustive]
pub enum Stream {
    /// A Unix stream socket: `unix:` and `hybrid:` addresses.
    #[cfg(unix)]
    Unix(std::os::unix::net::UnixStream),
    /// An AF_VSOCK (Linux) or AF_HYPERV (Windows) socket.
    #[cfg(any(target_os = "linux", windows))]
    Socket(SocketStream),
}

/// What every stream does, for the forwarding below.
trait Io: Read + Write {
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

macro_rules! impl_io {
    ($ty:ty) => {
        impl Io for $ty {
            fn shutdown(&self, how: Shutdown) -> io::Result<()> {
                <$ty>::shutdown(self, how)
            }
            fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
                <$ty>::set_read_timeout(self, timeout)
            }
            fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
                <$ty>::set_write_timeout(self, timeout)
            }
        }
    };
}

#[cfg(unix)]
impl_io!(std::os::unix::net::UnixStream);
#[cfg(any(target_os = "linux", windows))]
impl_io!(SocketStream);

impl Stream {
    fn io(&self) -> &dyn Io {
        match self {
            #[cfg(unix)]
            Stream::Unix(s) => s,
            #[cfg(any(target_os = "linux", windows))]
            Stream::Socket(s) => s,
        }
    }

    fn io_mut(&mut self) -> &mut dyn Io {
        match self {
            #[cfg(unix)]
            Stream::Unix(s) => s,
            #[cfg(any(target_os = "linux", windows))]
            Stream::Socket(s) => s,
        }
    }

    /// Shuts down the reading side, the writing side or both.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.io().shutdown(how)
    }

    /// Sets how long a read may wait (`None`: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.io().set_read_timeout(timeout)
    }

    /// Sets how long a write may wait (`None`: forever).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.io().set_write_timeout(timeout)
    }

    /// A second handle to the same connection (one thread reads, another writes).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            #[cfg(unix)]
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            #[cfg(any(target_os = "linux", windows))]
            Stream::Socket(s) => Stream::Socket(s.try_clone()?),
        })
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.io_mut().read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.io_mut().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.io_mut().flush()
    }
}

#[cfg(unix)]
impl std::os::fd::AsRawFd for Stream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            #[cfg(target_os = "linux")]
            Stream::Socket(s) => s.as_raw_fd(),
        }
    }
}

/// The stream's descriptor, for the stream link ([`stream_endpoint`](crate::link::stream_endpoint)).
#[cfg(unix)]
impl From<Stream> for std::os::fd::OwnedFd {
    fn from(s: Stream) -> Self {
        match s {
            Stream::Unix(s) => s.into(),
            #[cfg(target_os = "linux")]
            Stream::Socket(s) => s.into(),
        }
    }
}

#[cfg(windows)]
impl std::os::windows::io::AsRawSocket for Stream {
    fn as_raw_socket(&self) -> std::os::windows::io::RawSocket {
        match self {
            Stream::Socket(s) => s.as_raw_socket(),
        }
    }
}

/// A listening socket of any family.
#[derive(Debug)]
#[non_exhaustive]
pub enum Listener {
    /// A Unix socket: `unix:` addresses, and `hybrid:` ones on `<path>_<port>`.
    #[cfg(unix)]
    Unix {
        /// The socket.
        listener: std::os::unix::net::UnixListener,
        /// Its path, for errors.
        path: PathBuf,
    },
    /// AF_VSOCK.
    #[cfg(target_os = "linux")]
    Vsock(VsockListener),
    /// AF_HYPERV.
    #[cfg(windows)]
    HyperV(HvSocketListener),
}

impl Listener {
    /// Waits for the next connection.
    pub fn accept(&self) -> Result<Stream, SocketError> {
        match self {
            #[cfg(unix)]
            Listener::Unix { listener, path } => unix::accept(listener, path).map(Stream::Unix),
            #[cfg(target_os = "linux")]
            Listener::Vsock(listener) => listener.accept().map(|(s, _)| Stream::Socket(s)),
            #[cfg(windows)]
            Listener::HyperV(listener) => listener.accept().map(Stream::Socket),
        }
    }
}
