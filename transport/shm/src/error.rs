//! Errors of the shared-memory transport.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use vmlink_channel::{ChannelError, SavedStateError};
use vmlink_ring::area::AreaError;

use crate::memory::LayoutError;
use crate::policy::PeerCredentials;

/// Why one side refused the handshake, as carried in an error message to the other side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalCode {
    /// The host's policy does not allow the peer's credentials for this service.
    NotAllowed,
    /// The peer speaks a protocol version this side does not.
    UnsupportedVersion,
    /// The host serves no service of the requested name.
    UnknownService,
    /// A message was malformed (bad magic, bad length, unexpected kind or fds).
    Malformed,
    /// The host has too many handshakes in progress.
    Busy,
    /// The guest found the offer unusable (seals, size, layout, fds).
    BadOffer,
    /// Something failed on the refusing side itself.
    Internal,
    /// A code this side does not know (a newer peer).
    Other(u32),
}

impl fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefusalCode::NotAllowed => f.write_str("not allowed"),
            RefusalCode::UnsupportedVersion => f.write_str("unsupported version"),
            RefusalCode::UnknownService => f.write_str("unknown service"),
            RefusalCode::Malformed => f.write_str("malformed message"),
            RefusalCode::Busy => f.write_str("busy"),
            RefusalCode::BadOffer => f.write_str("unusable offer"),
            RefusalCode::Internal => f.write_str("internal error"),
            RefusalCode::Other(c) => write!(f, "reason code {c}"),
        }
    }
}

impl RefusalCode {
    pub(crate) fn to_wire(self) -> u32 {
        match self {
            RefusalCode::NotAllowed => 1,
            RefusalCode::UnsupportedVersion => 2,
            RefusalCode::UnknownService => 3,
            RefusalCode::Malformed => 4,
            RefusalCode::Busy => 5,
            RefusalCode::BadOffer => 6,
            RefusalCode::Internal => 7,
            RefusalCode::Other(c) => c,
        }
    }

    pub(crate) fn from_wire(code: u32) -> Self {
        match code {
            1 => RefusalCode::NotAllowed,
            2 => RefusalCode::UnsupportedVersion,
            3 => RefusalCode::UnknownService,
            4 => RefusalCode::Malformed,
            5 => RefusalCode::Busy,
            6 => RefusalCode::BadOffer,
            7 => RefusalCode::Internal,
            c => RefusalCode::Other(c),
        }
    }
}

/// What went wrong setting up or serving a shared-memory channel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShmError {
    /// The operation does not apply to this endpoint (a channel set cannot be handed over).
    #[error("not supported: {0}")]
    Unsupported(&'static str),
    /// The host offered more sub-channels than the guest asked for.
    #[error("the host offered {offered} sub-channels where {asked} were asked for")]
    TooManySubChannels {
        /// Sub-channels asked for.
        asked: u32,
        /// Sub-channels offered.
        offered: u32,
    },
    /// A guest could not connect to the socket at `path` (`NotFound`: no socket file
    /// there; `ConnectionRefused`: a socket file nobody listens on any more).
    #[error("connect to {}: {source}", .path.display())]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// Another listener is serving the socket path a listener was asked to bind.
    #[error("another listener is serving {}", .0.display())]
    SocketInUse(PathBuf),
    /// The path a listener was asked to bind exists and is not a socket; it was left alone.
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// The socket's directory is not private to its owner.
    #[error(
        "socket directory {path} must be a directory owned by this user with mode 0700 \
         (found owner uid {uid}, mode {mode:o})"
    )]
    InsecureDirectory {
        /// The directory.
        path: std::path::PathBuf,
        /// Its owner.
        uid: u32,
        /// Its permission bits.
        mode: u32,
    },
    /// The peer closed the connection before the handshake finished.
    #[error("the peer closed the connection during the handshake ({during})")]
    PeerClosed {
        /// Which step was under way.
        during: &'static str,
    },
    /// The peer sent nothing for too long.
    #[error("the handshake timed out after {} ({})", Seconds(*.0), .1)]
    TimedOut(Duration, &'static str),
    /// Not a vmlink handshake at all.
    #[error("not a vmlink-shm handshake: bad magic bytes {}", Hex(.0))]
    BadMagic([u8; 8]),
    /// The peer speaks another protocol version.
    #[error("the peer speaks handshake version {peer}; this side speaks {ours}")]
    UnsupportedVersion {
        /// The peer's version.
        peer: u16,
        /// Ours.
        ours: u16,
    },
    /// A message of a kind not expected at this point.
    #[error("unexpected handshake message kind {kind} (expected {expected})")]
    UnexpectedMessage {
        /// The kind received.
        kind: u16,
        /// What was expected.
        expected: &'static str,
    },
    /// A message is malformed.
    #[error("malformed handshake message: {0}")]
    Malformed(&'static str),
    /// The kernel truncated the ancillary data (more fds than allowed); every received fd
    /// was closed.
    #[error("the control message was truncated (too many fds); all received fds were closed")]
    ControlTruncated,
    /// The wrong number of fds came with a message; they were closed.
    #[error("expected {expected} fds with the message, received {received}; they were closed")]
    UnexpectedFds {
        /// How many the message kind carries.
        expected: usize,
        /// How many arrived.
        received: usize,
    },
    /// The host's policy refuses this peer (host side).
    #[error("peer {peer} is not allowed to use service {}", Quoted(.service))]
    NotAllowed {
        /// Who connected.
        peer: PeerCredentials,
        /// The service it asked for.
        service: String,
    },
    /// The host's role-based access policy denies this peer the service (host side). The
    /// peer is told only "not allowed"; `audit` is the operator's line: who, what, why.
    #[error("{audit}")]
    Denied {
        /// The service it asked for.
        service: String,
        /// The policy's audit line.
        audit: String,
    },
    /// The host serves no such service (host side).
    #[error("the peer asked for unknown service {}", Quoted(.0))]
    UnknownService(String),
    /// Too many handshakes are in progress; the connection was refused (host side).
    #[error("too many handshakes in progress ({0}); connection refused")]
    Busy(usize),
    /// The other side refused the handshake and said why.
    #[error("the peer refused the handshake ({code}): {}", Escaped(.message))]
    Refused {
        /// The reason's code.
        code: RefusalCode,
        /// The peer's explanation.
        message: String,
    },
    /// The offered memory is not sealed as required (guest side).
    #[error(
        "the shared memory is not sealed against shrinking, growing and resealing \
         (seals {found:#x}, need {required:#x})"
    )]
    NotSealed {
        /// The seals found.
        found: i32,
        /// The seals required.
        required: i32,
    },
    /// The offered memory's size differs from its layout (guest side).
    #[error("the shared memory is {actual} bytes but the offer describes {expected}")]
    SizeMismatch {
        /// The file's size.
        actual: u64,
        /// The layout's total.
        expected: u64,
    },
    /// The offered memory's header page breaks a rule of the memory header (guest side);
    /// the memory was unmapped again unused.
    #[error("the shared memory's header is invalid: {0}")]
    BadHeader(AreaError),
    /// The offered memory's header is sound but describes other memory than the offer
    /// (guest side); the memory was unmapped again unused.
    #[error(
        "the shared memory's header disagrees with the offer: {what} is {header} in the \
         header and {offer} in the offer"
    )]
    HeaderMismatch {
        /// What differs, in words ("the buffer area's length").
        what: &'static str,
        /// The header's value.
        header: u64,
        /// The value the offer implies.
        offer: u64,
    },
    /// The offered memory is not a memfd that can carry seals (guest side).
    #[error("the offered memory fd is not a memfd (it cannot carry seals)")]
    NotAMemfd,
    /// The offer is for another service than the one asked for (guest side).
    #[error("asked for service {} but the host offered {}", Quoted(.asked), Quoted(.offered))]
    ServiceMismatch {
        /// What we asked for.
        asked: String,
        /// What the host offered.
        offered: String,
    },
    /// A service name is empty, too long or not UTF-8.
    #[error("invalid service name: {0}")]
    BadServiceName(&'static str),
    /// The layout is unusable.
    #[error("invalid memory layout: {0}")]
    Layout(#[from] LayoutError),
    /// The channel could not be built over the memory.
    #[error("channel setup failed: {0}")]
    Channel(#[from] ChannelError),
    /// The inherited socket fd of a spawned guest is missing or unusable.
    #[error("no usable inherited socket: {0}")]
    NoInheritedSocket(String),
    /// [`Listener::accept_timeout`](crate::Listener::accept_timeout) waited in vain.
    #[error("no connection was accepted within {}", Seconds(*.0))]
    AcceptTimedOut(Duration),
    /// The listener stopped.
    #[error("the listener has stopped")]
    ListenerStopped,
    /// The other side of a hand-over runs as another user.
    #[error("the hand-over peer, {peer}, is not this user")]
    NotSameUser {
        /// Who it is.
        peer: PeerCredentials,
    },
    /// A handed-over endpoint's saved state was refused.
    #[error("the saved state is refused: {0}")]
    SavedState(#[from] SavedStateError),
}

impl ShmError {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> ShmError {
        move |source| ShmError::Io { what, source }
    }

    /// The code to tell the peer when this error makes us refuse it.
    pub(crate) fn refusal_code(&self) -> RefusalCode {
        match self {
            ShmError::NotAllowed { .. }
            | ShmError::NotSameUser { .. }
            | ShmError::Denied { .. } => RefusalCode::NotAllowed,
            ShmError::UnsupportedVersion { .. } => RefusalCode::UnsupportedVersion,
            ShmError::UnknownService(_) => RefusalCode::UnknownService,
            ShmError::Busy(_) => RefusalCode::Busy,
            ShmError::BadMagic(_)
            | ShmError::UnexpectedMessage { .. }
            | ShmError::Malformed(_)
            | ShmError::ControlTruncated
            | ShmError::UnexpectedFds { .. }
            | ShmError::BadServiceName(_)
            | ShmError::SavedState(_) => RefusalCode::Malformed,
            ShmError::NotSealed { .. }
            | ShmError::SizeMismatch { .. }
            | ShmError::NotAMemfd
            | ShmError::BadHeader(_)
            | ShmError::HeaderMismatch { .. }
            | ShmError::ServiceMismatch { .. }
            | ShmError::TooManySubChannels { .. }
            | ShmError::Layout(_) => RefusalCode::BadOffer,
            _ => RefusalCode::Internal,
        }
    }
}

/// A duration in plain words ("5 seconds", "0.25 seconds").
struct Seconds(Duration);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs_f64();
        if secs == 1.0 {
            f.write_str("1 second")
        } else {
            write!(f, "{secs} seconds")
        }
    }
}

/// Bytes as space-separated hex pairs ("47 45 54 20").
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Text that came from the peer (or the environment), with control characters escaped so
/// it stays on one line and cannot drive a terminal.
pub(crate) struct Escaped<'a>(pub(crate) &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

/// A name in double quotes, escaped like [`Escaped`] (quotes and backslashes too).
pub(crate) struct Quoted<'a>(pub(crate) &'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for c in self.0.chars() {
            if c.is_control() || c == '"' || c == '\\' {
                write!(f, "{}", c.escape_default())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        f.write_str("\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every message is plain words: no Rust `Debug` output (`Some(`, `None`, `[..]`,
    /// variant names, `5s`), one line even when the peer's text has control characters.
    #[test]
    fn messages_are_plain_words() {
        let cases = [
            (
                ShmError::TimedOut(Duration::from_secs(5), "waiting for the guest's hello"),
                "the handshake timed out after 5 seconds (waiting for the guest's hello)",
            ),
            (
                ShmError::AcceptTimedOut(Duration::from_millis(250)),
                "no connection was accepted within 0.25 seconds",
            ),
            (
                ShmError::AcceptTimedOut(Duration::from_secs(1)),
                "no connection was accepted within 1 second",
            ),
            (
                ShmError::BadMagic(*b"GET / HT"),
                "not a vmlink-shm handshake: bad magic bytes 47 45 54 20 2f 20 48 54",
            ),
            (
                ShmError::UnknownService("no\"pe\n".into()),
                "the peer asked for unknown service \"no\\\"pe\\n\"",
            ),
            (
                ShmError::Refused {
                    code: RefusalCode::UnknownService,
                    message: "line one\nline two\u{1b}[2J".into(),
                },
                "the peer refused the handshake (unknown service): line one\\nline two\\u{1b}[2J",
            ),
            (
                ShmError::Refused {
                    code: RefusalCode::Other(99),
                    message: "why".into(),
                },
                "the peer refused the handshake (reason code 99): why",
            ),
            (
                ShmError::ServiceMismatch {
                    asked: "a".into(),
                    offered: "b".into(),
                },
                "asked for service \"a\" but the host offered \"b\"",
            ),
            (
                ShmError::SocketInUse("/run/x/s".into()),
                "another listener is serving /run/x/s",
            ),
            (
                ShmError::HeaderMismatch {
                    what: "the buffer area's length",
                    header: 0,
                    offer: 8192,
                },
                "the shared memory's header disagrees with the offer: the buffer area's \
                 length is 0 in the header and 8192 in the offer",
            ),
            (
                ShmError::BadHeader(AreaError::BadMagic { found: [0; 8] }),
                "the shared memory's header is invalid: no memory header: the first 8 bytes \
                 are 00 00 00 00 00 00 00 00 rather than \"VMLINKMA\"",
            ),
        ];
        for (error, text) in cases {
            assert_eq!(error.to_string(), text);
        }
    }
}
