//! Errors of the socket module: a failed system call with what was being done and where,
//! an address text that does not parse, and the hybrid vsock handshake's refusals.

use std::fmt;
use std::io;
use std::time::Duration;

/// What a socket call was doing when it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SocketOp {
    /// Creating the socket (`socket(2)`): on Linux `EAFNOSUPPORT` means no vsock transport.
    Create,
    /// Binding it to its local address.
    Bind,
    /// Marking it as listening.
    Listen,
    /// Accepting a connection.
    Accept,
    /// Connecting to the peer.
    Connect,
    /// Exchanging the hybrid vsock handshake's lines on a connected socket.
    Handshake,
}

impl fmt::Display for SocketOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SocketOp::Create => "creating a socket for",
            SocketOp::Bind => "binding",
            SocketOp::Listen => "listening on",
            SocketOp::Accept => "accepting on",
            SocketOp::Connect => "connecting to",
            SocketOp::Handshake => "handshaking with",
        })
    }
}

/// A socket call that failed: what it was doing, the address in its text form, and the
/// operating system's error (its [`io::ErrorKind`] through [`SocketError::kind`]).
#[derive(Debug, thiserror::Error)]
#[error("{op} {addr}: {source}")]
pub struct SocketError {
    /// What the call was doing.
    pub op: SocketOp,
    /// The address it was doing it with, as text (`vsock:3:5000`, a path, …).
    pub addr: String,
    /// The operating system's error.
    #[source]
    pub source: io::Error,
}

impl SocketError {
    pub(crate) fn new(op: SocketOp, addr: impl fmt::Display, source: io::Error) -> Self {
        Self {
            op,
            addr: addr.to_string(),
            source,
        }
    }

    /// The kind of the operating system's error.
    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }

    /// The operating system's error number, if it came from one.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// Why an address text does not parse. The text is kept for the message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddrParseError {
    /// No `:` separates the two parts the address needs.
    #[error("`{text}`: expected {expected}")]
    MissingSeparator {
        /// The text.
        text: String,
        /// The form the address takes.
        expected: &'static str,
    },
    /// A CID that is neither a decimal number below 2^32 nor a known name.
    #[error("`{text}`: bad CID (a decimal number or host, local, hypervisor, any)")]
    BadCid {
        /// The CID's text.
        text: String,
    },
    /// A port that is neither a decimal number below 2^32 nor `any` where that is allowed.
    #[error("`{text}`: bad port (a decimal number below 2^32{any})")]
    BadPort {
        /// The port's text.
        text: String,
        /// `, or any` where the port may be `any`.
        any: &'static str,
    },
    /// An empty socket path.
    #[error("`{text}`: the socket path is empty")]
    EmptyPath {
        /// The text.
        text: String,
    },
    /// A Hyper-V VM id or service id that is neither a GUID nor a known name.
    #[error("`{text}`: bad {what} (a GUID{names})")]
    BadGuid {
        /// The id's text.
        text: String,
        /// `VM id` or `service id`.
        what: &'static str,
        /// The names accepted beside a GUID.
        names: &'static str,
    },
    /// A stream address whose family prefix is not `vsock:`, `hybrid:`, `unix:` or
    /// `hyperv:`.
    #[error(
        "`{text}`: expected vsock:CID:PORT, hybrid:PATH:PORT, unix:PATH or hyperv:VMID:SERVICE"
    )]
    UnknownFamily {
        /// The text.
        text: String,
    },
}

/// Why a hybrid vsock connection (Firecracker / Cloud Hypervisor) could not be made.
///
/// The VMM answers a `CONNECT <port>` line with `OK <assigned port>` once the guest has
/// accepted; if the line is bad, nobody in the guest listens on the port, or the guest does
/// not answer, it closes the connection without a word ([`HybridError::Closed`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HybridError {
    /// Connecting to the VMM's socket, or writing / reading the handshake, failed.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The VMM closed the connection before a whole reply line: the port is not served in
    /// the guest, the guest refused or did not answer in time, or the request was refused.
    #[error(
        "the VMM closed the connection after {received} bytes of its reply (nobody served port {port}, or the request was refused)"
    )]
    Closed {
        /// The port asked for.
        port: u32,
        /// Bytes of the reply read before the end.
        received: usize,
    },
    /// No whole reply line came within the handshake's time limit.
    #[error("no reply from the VMM within {timeout:?}")]
    TimedOut {
        /// The limit.
        timeout: Duration,
    },
    /// The reply line is not `OK <decimal port>`.
    #[error("the VMM replied `{line}` where `OK <port>` belongs")]
    Malformed {
        /// The line without its newline, with bytes that are not UTF-8 replaced.
        line: String,
    },
    /// The reply ran past the longest line accepted without a newline.
    #[error("the VMM's reply ran past {limit} bytes without a newline")]
    LineTooLong {
        /// The limit ([`MAX_LINE`](crate::socket::hybrid::MAX_LINE)).
        limit: usize,
    },
}

/// Why [`StreamAddr::connect`](crate::socket::StreamAddr::connect) or
/// [`listen`](crate::socket::StreamAddr::listen) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// A socket call failed.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The hybrid vsock handshake failed.
    #[error(transparent)]
    Hybrid(#[from] HybridError),
    /// The address's family has no sockets on this platform (AF_VSOCK outside Linux, Unix
    /// sockets and hybrid vsock outside Unix, AF_HYPERV outside Windows).
    #[error("{family} sockets are not available on this platform")]
    Unsupported {
        /// The family: `vsock`, `hybrid`, `unix` or `hyperv`.
        family: &'static str,
    },
}
