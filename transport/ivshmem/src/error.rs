//! The crate's one error type.

use std::io;

/// What went wrong on an ivshmem connection, in the server or in the guest's device code.
///
/// Errors that concern one connection (a client that sends bytes on the one-way protocol,
/// a peer that vanished or stopped reading) end that connection only; the server and its
/// other peers go on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IvshmemError {
    /// An OS call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Making the shared memory failed (vmlink-shm's memfd, layout or header).
    #[error("making the shared memory failed: {0}")]
    Memory(#[from] vmlink_shm::ShmError),
    /// The shared memory's size is not a power of two (the ivshmem BAR must be one) or is
    /// outside the supported range.
    #[error(
        "a shared memory of {len} bytes is unusable: ivshmem needs a power of two from {min} \
         to {max} bytes"
    )]
    BadMemorySize {
        /// The size asked for.
        len: u64,
        /// The smallest size.
        min: u64,
        /// The largest size.
        max: u64,
    },
    /// The number of interrupt vectors per peer is outside 1 ..= [`MAX_VECTORS`](crate::MAX_VECTORS).
    #[error("{vectors} interrupt vectors per peer is outside 1..={max}")]
    BadVectorCount {
        /// The count asked for.
        vectors: u32,
        /// The limit.
        max: u32,
    },
    /// The server speaks a protocol version this side cannot handle.
    #[error("the server speaks ivshmem protocol version {version}; only 0 is supported")]
    UnsupportedVersion {
        /// The version the server sent.
        version: i64,
    },
    /// A message carried a peer id outside 0 ..= 65535 where one was required.
    #[error("message {value} is not a peer id (0..=65535) where one was expected")]
    BadPeerId {
        /// The value received.
        value: i64,
    },
    /// A message that must carry a file descriptor came without one.
    #[error("the {what} message came without its file descriptor")]
    MissingFd {
        /// Which message.
        what: &'static str,
    },
    /// A message that must not carry a file descriptor came with one (closed at once).
    #[error("message {value} came with a file descriptor it must not carry")]
    UnexpectedFd {
        /// The message's value.
        value: i64,
    },
    /// A message came with more than one file descriptor (all closed at once), or the
    /// kernel truncated its ancillary data.
    #[error("a message came with more than one file descriptor")]
    TooManyFds,
    /// The connection ended in the middle of an 8-byte message.
    #[error("the connection ended after {got} bytes of an 8-byte message")]
    ShortMessage {
        /// Bytes of the message that arrived.
        got: usize,
    },
    /// The other side closed the connection (before the setup finished, on the client's
    /// side; at any time, on the server's, which is how a peer leaves).
    #[error("the connection was closed")]
    Closed,
    /// Waiting for the other side took longer than allowed.
    #[error("timed out waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
    },
    /// A client sent bytes to the server: the protocol is one-way (server to client), so
    /// anything a client sends is an error and ends its connection.
    #[error("the client sent {len} bytes on the one-way ivshmem protocol")]
    UnexpectedData {
        /// How many bytes arrived (in the first read).
        len: usize,
    },
    /// The server stopped sending to a peer that did not read its messages in time.
    #[error("peer {id} did not take its messages in time")]
    PeerStalled {
        /// The peer.
        id: u16,
    },
    /// Every peer id is taken, or the server's peer limit is reached.
    #[error("the server is full: {max} peers")]
    ServerFull {
        /// The limit.
        max: usize,
    },
    /// No peer with this id is connected.
    #[error("no peer {id} is connected")]
    UnknownPeer {
        /// The id.
        id: u16,
    },
    /// The peer has no such vector.
    #[error("peer {id} has no vector {vector} (it has {vectors})")]
    NoSuchVector {
        /// The peer.
        id: u16,
        /// The vector asked for.
        vector: u16,
        /// How many vectors the peer has.
        vectors: u16,
    },
    /// A path exists where the server's socket should be and is not a stale socket.
    #[error("{path} is in use: a server answers there, or it is not a socket")]
    PathInUse {
        /// The path.
        path: std::path::PathBuf,
    },
    /// Ringing or reading an eventfd failed.
    #[error("eventfd: {0}")]
    Doorbell(#[from] vmlink_channel::DoorbellError),
    /// No ivshmem PCI device (vendor 0x1af4, device 0x1110) was found.
    #[error("no ivshmem PCI device (1af4:1110) under {sysfs}")]
    NoDevice {
        /// The sysfs directory searched.
        sysfs: std::path::PathBuf,
    },
    /// A BAR's resource file is too small for what it must hold.
    #[error("BAR {bar} is {len} bytes, too small (at least {min})")]
    BarTooSmall {
        /// The BAR number.
        bar: u8,
        /// Its size.
        len: u64,
        /// The size needed.
        min: u64,
    },
    /// An access fell outside a BAR.
    #[error("{len} bytes at offset {offset} fall outside a BAR of {size} bytes")]
    OutOfBounds {
        /// The offset.
        offset: usize,
        /// The length.
        len: usize,
        /// The BAR's size.
        size: usize,
    },
    /// The memory header in BAR2 is unsound, or does not describe one channel.
    #[error("the shared memory's header: {0}")]
    BadHeader(String),
    /// Setting up a channel over the memory failed.
    #[error("channel: {0}")]
    Channel(#[from] vmlink_channel::ChannelError),
}

impl IvshmemError {
    /// A mapper for `map_err` naming the operation that failed.
    pub(crate) fn io<E: Into<io::Error>>(op: &'static str) -> impl FnOnce(E) -> Self {
        move |e| Self::Io {
            op,
            source: e.into(),
        }
    }
}
