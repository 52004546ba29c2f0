//! Errors of the shared-memory transport.

use std::io;
use std::time::Duration;

use vmlink_channel::ChannelError;

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
    #[error("the handshake timed out after {0:?} ({1})")]
    TimedOut(Duration, &'static str),
    /// Not a vmlink handshake at all.
    #[error("not a vmlink-shm handshake: bad magic {0:02x?}")]
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
    #[error("peer {peer} is not allowed to use service {service:?}")]
    NotAllowed {
        /// Who connected.
        peer: PeerCredentials,
        /// The service it asked for.
        service: String,
    },
    /// The host serves no such service (host side).
    #[error("the peer asked for unknown service {0:?}")]
    UnknownService(String),
    /// Too many handshakes are in progress; the connection was refused (host side).
    #[error("too many handshakes in progress ({0}); connection refused")]
    Busy(usize),
    /// The other side refused the handshake and said why.
    #[error("the peer refused the handshake ({code:?}): {message}")]
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
    /// The offered memory is not a memfd (guest side).
    #[error("the offered memory fd is not a regular file")]
    NotAMemfd,
    /// The offer is for another service than the one asked for (guest side).
    #[error("asked for service {asked:?} but the host offered {offered:?}")]
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
    #[error("no connection was accepted within {0:?}")]
    AcceptTimedOut(Duration),
    /// The listener stopped.
    #[error("the listener has stopped")]
    ListenerStopped,
}

impl ShmError {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> ShmError {
        move |source| ShmError::Io { what, source }
    }

    /// The code to tell the peer when this error makes us refuse it.
    pub(crate) fn refusal_code(&self) -> RefusalCode {
        match self {
            ShmError::NotAllowed { .. } => RefusalCode::NotAllowed,
            ShmError::UnsupportedVersion { .. } => RefusalCode::UnsupportedVersion,
            ShmError::UnknownService(_) => RefusalCode::UnknownService,
            ShmError::Busy(_) => RefusalCode::Busy,
            ShmError::BadMagic(_)
            | ShmError::UnexpectedMessage { .. }
            | ShmError::Malformed(_)
            | ShmError::ControlTruncated
            | ShmError::UnexpectedFds { .. }
            | ShmError::BadServiceName(_) => RefusalCode::Malformed,
            ShmError::NotSealed { .. }
            | ShmError::SizeMismatch { .. }
            | ShmError::NotAMemfd
            | ShmError::ServiceMismatch { .. }
            | ShmError::Layout(_) => RefusalCode::BadOffer,
            _ => RefusalCode::Internal,
        }
    }
}
