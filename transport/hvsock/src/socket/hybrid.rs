//! Hybrid vsock: the guest's virtio-vsock device as Firecracker and Cloud Hypervisor give
//! it to the host, through Unix sockets.
//!
//! The VMM listens on one Unix socket, its `uds_path`. The host connects to a guest port
//! by connecting to that socket and writing `CONNECT <port>\n`; once a program in the guest
//! accepts, the VMM answers `OK <assigned port>\n` (the host-side port it chose, from
//! 2^30 upwards) and the connection carries the stream from the next byte on. A guest
//! connecting to host port `P` reaches whatever listens on the Unix socket
//! `<uds_path>_<P>`.
//!
//! What Firecracker does with the request (`src/vmm/src/devices/virtio/vsock/unix/muxer.rs`,
//! `read_local_stream_port`): it reads at least 10 bytes (`connect 0\n`), then one byte at
//! a time until a newline or 32 bytes; splits the text at whitespace; the first word must
//! be `connect` in any case, the second a decimal `u32`, and anything after is ignored. A
//! line it cannot read or parse, a port nobody in the guest listens on (the guest answers
//! with a reset) and a guest that does not answer within 2 s (`CONN_REQUEST_TIMEOUT_MS`,
//! `src/vmm/src/devices/virtio/vsock/csm/`) all end the same way: the VMM closes the
//! connection without a word. [`connect`] sends exactly `CONNECT <port>\n`, reads the reply
//! one byte at a time (so not one byte of the stream after it is taken), at most
//! [`MAX_LINE`] bytes and within a time limit, and accepts only `OK <decimal port>`; the
//! rest is a typed [`HybridError`](super::HybridError).

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::error::AddrParseError;
use super::vsock::parse_decimal;

/// The longest reply line read, newline included: Firecracker's own limit for the request
/// line; its reply `OK <port>\n` takes at most 14 bytes.
pub const MAX_LINE: usize = 32;

/// How long [`connect`] waits for the reply: Firecracker gives the guest 2 s to accept.
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A port behind a hybrid vsock VMM socket. Text form `PATH:PORT`, split at the last `:`
/// (so the path may hold colons).
///
/// ```
/// use vmlink_hvsock::socket::HybridAddr;
///
/// let addr: HybridAddr = "/run/vm:1/fc.sock:5000".parse()?;
/// assert_eq!(addr.path.to_str(), Some("/run/vm:1/fc.sock"));
/// assert_eq!(addr.port, 5000);
/// assert_eq!(addr.listen_path().to_str(), Some("/run/vm:1/fc.sock_5000"));
/// assert_eq!(addr.to_string(), "/run/vm:1/fc.sock:5000");
/// # Ok::<(), vmlink_hvsock::socket::AddrParseError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HybridAddr {
    /// The VMM's Unix socket (`uds_path`).
    pub path: PathBuf,
    /// The vsock port: the guest's port to connect to, or the host's port to listen on.
    pub port: u32,
}

impl HybridAddr {
    /// Port `port` behind the VMM socket `path`.
    pub fn new(path: impl Into<PathBuf>, port: u32) -> Self {
        Self {
            path: path.into(),
            port,
        }
    }

    /// `<path>_<port>`: where the host listens for the guest's connections to `port`.
    pub fn listen_path(&self) -> PathBuf {
        let mut path = OsString::from(self.path.as_os_str());
        path.push(format!("_{}", self.port));
        path.into()
    }
}

impl fmt::Display for HybridAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.port)
    }
}

impl FromStr for HybridAddr {
    type Err = AddrParseError;

    fn from_str(text: &str) -> Result<Self, AddrParseError> {
        let (path, port) =
            text.rsplit_once(':')
                .ok_or_else(|| AddrParseError::MissingSeparator {
                    text: text.to_owned(),
                    expected: "PATH:PORT",
                })?;
        if path.is_empty() {
            return Err(AddrParseError::EmptyPath {
                text: text.to_owned(),
            });
        }
        let port = parse_decimal(port).ok_or_else(|| AddrParseError::BadPort {
            text: port.to_owned(),
            any: "",
        })?;
        Ok(Self::new(path, port))
    }
}

#[cfg(unix)]
pub use self::unix::{connect, connect_timeout, listen};

#[cfg(unix)]
mod unix {
    use std::io::{ErrorKind, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::{Duration, Instant};

    use super::{HybridAddr, MAX_LINE, parse_decimal};
    use crate::socket::error::{HybridError, SocketError, SocketOp};

    /// Connects to the guest's port `addr.port` through the VMM socket `addr.path`, waiting
    /// [`DEFAULT_TIMEOUT`](super::DEFAULT_TIMEOUT) for the VMM's reply.
    pub fn connect(addr: &HybridAddr) -> Result<UnixStream, HybridError> {
        connect_timeout(addr, super::DEFAULT_TIMEOUT).map(|(stream, _)| stream)
    }

    /// Connects as [`connect`] does, waiting at most `timeout` for the whole handshake;
    /// gives the stream and the host-side port the VMM assigned. The stream has no
    /// timeouts left set.
    pub fn connect_timeout(
        addr: &HybridAddr,
        timeout: Duration,
    ) -> Result<(UnixStream, u32), HybridError> {
        let deadline = Instant::now() + timeout;
        let mut stream = crate::socket::unix::connect(&addr.path)?;
        let failed = |e: std::io::Error, received: usize| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => HybridError::TimedOut { timeout },
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => HybridError::Closed {
                port: addr.port,
                received,
            },
            _ => SocketError::new(SocketOp::Handshake, addr.path.display(), e).into(),
        };
        stream
            .set_write_timeout(Some(timeout))
            .and_then(|()| stream.write_all(format!("CONNECT {}\n", addr.port).as_bytes()))
            .map_err(|e| failed(e, 0))?;

        let mut line = [0u8; MAX_LINE];
        let mut len = 0;
        while len == 0 || line[len - 1] != b'\n' {
            if len == MAX_LINE {
                return Err(HybridError::LineTooLong { limit: MAX_LINE });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HybridError::TimedOut { timeout });
            }
            stream
                .set_read_timeout(Some(left))
                .map_err(|e| failed(e, len))?;
            match stream.read(&mut line[len..=len]) {
                Ok(0) => {
                    return Err(HybridError::Closed {
                        port: addr.port,
                        received: len,
                    });
                }
                Ok(_) => len += 1,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(failed(e, len)),
            }
        }
        let reply = &line[..len - 1];
        let assigned = reply
            .strip_prefix(b"OK ")
            .and_then(|port| std::str::from_utf8(port).ok())
            .and_then(parse_decimal)
            .ok_or_else(|| HybridError::Malformed {
                line: String::from_utf8_lossy(reply).into_owned(),
            })?;
        stream
            .set_read_timeout(None)
            .and_then(|()| stream.set_write_timeout(None))
            .map_err(|e| failed(e, len))?;
        Ok((stream, assigned))
    }

    /// Listens for the guest's connections to host port `addr.port`: a Unix socket at
    /// [`addr.listen_path()`](HybridAddr::listen_path), where the VMM connects for each.
    /// A file already there is an error (`AddrInUse`), never removed.
    pub fn listen(addr: &HybridAddr) -> Result<UnixListener, SocketError> {
        crate::socket::unix::listen(&addr.listen_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_path_colon_port_at_the_last_colon() {
        let addr: HybridAddr = "/run/fc.sock:5000".parse().unwrap();
        assert_eq!(addr, HybridAddr::new("/run/fc.sock", 5000));
        assert_eq!("a:b:0".parse(), Ok(HybridAddr::new("a:b", 0)));
        assert_eq!(
            "rel.sock:4294967295".parse(),
            Ok(HybridAddr::new("rel.sock", u32::MAX))
        );
        assert_eq!(addr.to_string().parse(), Ok(addr));
    }

    #[test]
    fn refuses_a_missing_or_bad_port_and_an_empty_path() {
        let bad = |text: &str| text.parse::<HybridAddr>().unwrap_err();
        assert!(matches!(
            bad("/run/fc.sock"),
            AddrParseError::MissingSeparator { .. }
        ));
        assert!(matches!(bad(":5000"), AddrParseError::EmptyPath { .. }));
        for port in ["", "any", "-1", "+1", "4294967296", "5000 ", "0x10", "5e3"] {
            assert!(
                matches!(bad(&format!("/run/fc.sock:{port}")), AddrParseError::BadPort { text, .. } if text == port),
                "port `{port}`"
            );
        }
    }

    #[test]
    fn listens_beside_the_vmm_socket() {
        assert_eq!(
            HybridAddr::new("/run/fc.sock", 52).listen_path(),
            PathBuf::from("/run/fc.sock_52")
        );
    }
}
