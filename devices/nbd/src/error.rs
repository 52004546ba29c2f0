//! [`NbdError`]: everything that can go wrong, from the socket, the server or the caller.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use crate::proto;

/// Everything the client, the `qemu-nbd` runner and the `qemu-img bench` runner can fail
/// with.
///
/// Errors fall in three groups, and [`NbdError::is_fatal`] tells which leave a
/// connection usable:
///
/// - the server broke the protocol, closed the socket, or the socket failed or timed out
///   part way through a message: the stream is out of step, the connection is marked
///   broken and every later call returns [`NbdError::Broken`];
/// - the server refused one request ([`NbdError::Server`]), the caller misused the client
///   ([`NbdError::QueueFull`], [`NbdError::HandleInUse`], ...), or a wait timed out before
///   any byte of a message moved: the connection stays usable;
/// - starting `qemu-nbd` or running `qemu-img bench` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    /// `connect(2)` to the server's Unix socket failed.
    #[error("cannot connect to the NBD socket {path}: {source}")]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// The error from the socket.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the socket failed (other than end of file or a timeout).
    #[error("NBD socket error while {context}: {source}")]
    Io {
        /// What the client was doing.
        context: &'static str,
        /// The error from the socket.
        #[source]
        source: io::Error,
    },
    /// The server closed the connection (end of file) while the client waited for a
    /// message or part of one.
    #[error("the NBD server closed the connection while the client was {context}")]
    Eof {
        /// What the client was doing.
        context: &'static str,
    },
    /// The socket's read or write timeout expired. Fatal unless no byte of the message
    /// had moved (see [`NbdError::is_fatal`]).
    #[error("NBD socket timed out (after {timeout:?}) while {context}")]
    Timeout {
        /// What the client was doing.
        context: &'static str,
        /// The timeout in force.
        timeout: Duration,
        /// Whether part of a message had already moved, which leaves the stream out of
        /// step and the connection broken.
        mid_message: bool,
    },
    /// A magic number was wrong.
    #[error("bad NBD magic in the {context}: expected {expected:#x}, got {found:#x}")]
    BadMagic {
        /// Which message.
        context: &'static str,
        /// The magic the protocol requires.
        expected: u64,
        /// What the server sent.
        found: u64,
    },
    /// The server speaks the oldstyle negotiation, which this client does not.
    #[error("the NBD server uses the oldstyle handshake; only fixed newstyle is supported")]
    OldstyleServer,
    /// The server does not set `NBD_FLAG_FIXED_NEWSTYLE`, so `NBD_OPT_GO` cannot be used.
    #[error(
        "the NBD server does not speak fixed newstyle (handshake flags {flags:#06x}); \
         only fixed newstyle is supported"
    )]
    NotFixedNewstyle {
        /// The server's handshake flags.
        flags: u16,
    },
    /// The export name cannot be sent: longer than 4,096 bytes or containing NUL.
    #[error("invalid NBD export name ({len} bytes): {reason}")]
    InvalidExportName {
        /// The name's length in bytes.
        len: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An option reply announced more data than the client accepts
    /// ([`crate::MAX_OPTION_REPLY_LEN`]); nothing is allocated for it.
    #[error("NBD option reply of {len} bytes is longer than the limit of {limit} bytes")]
    OptionReplyTooLong {
        /// The announced length.
        len: u32,
        /// The client's limit.
        limit: u32,
    },
    /// The server sent more informational option replies than the client accepts
    /// ([`crate::MAX_OPTION_REPLIES`]) before ending them.
    #[error("the NBD server sent more than {limit} replies to one option")]
    TooManyOptionReplies {
        /// The client's limit.
        limit: usize,
    },
    /// An option reply answered another option, or had a type that does not belong
    /// there.
    #[error(
        "unexpected NBD option reply: {} ({reply_type:#x}) to option {option} \
         while negotiating option {expected}", proto::rep_name(*.reply_type)
    )]
    UnexpectedOptionReply {
        /// The option the client had sent.
        expected: u32,
        /// The option the reply names.
        option: u32,
        /// The reply type.
        reply_type: u32,
    },
    /// An `NBD_REP_INFO` reply whose length does not fit its information type.
    #[error("malformed NBD_REP_INFO of type {info_type} and length {len}")]
    BadInfo {
        /// The information type (0 if the reply was too short to hold one).
        info_type: u16,
        /// The reply's length.
        len: u32,
    },
    /// The server acknowledged `NBD_OPT_GO` without sending `NBD_INFO_EXPORT`.
    #[error("the NBD server ended NBD_OPT_GO without sending the export's size (NBD_INFO_EXPORT)")]
    MissingExportInfo,
    /// The server refused an option with an `NBD_REP_ERR_*` reply.
    #[error(
        "the NBD server refused {option} for export {export:?}: {} ({code:#x}){}{message}",
        proto::rep_name(*.code), if .message.is_empty() { "" } else { ": " }
    )]
    OptionRefused {
        /// The option (`"NBD_OPT_GO"`).
        option: &'static str,
        /// The export asked for.
        export: String,
        /// The `NBD_REP_ERR_*` reply type.
        code: u32,
        /// The server's message, if it sent one (lossy UTF-8, control characters
        /// escaped, at most 4,096 bytes).
        message: String,
    },
    /// The export's size cannot be used: larger than `i64::MAX`, where offsets stop being
    /// representable as file offsets.
    #[error("unusable NBD export size {size} (larger than i64::MAX)")]
    BadExportSize {
        /// The size the server sent.
        size: u64,
    },
    /// The transmission flags lack `NBD_FLAG_HAS_FLAGS`, which a server must always set.
    #[error("invalid NBD transmission flags {flags:#06x} (NBD_FLAG_HAS_FLAGS is clear)")]
    BadTransmissionFlags {
        /// The flags the server sent.
        flags: u16,
    },
    /// A reply named a handle that is not in flight and was never answered recently.
    #[error("NBD reply for unknown handle {handle:#x}")]
    UnknownHandle {
        /// The handle in the reply.
        handle: u64,
    },
    /// A second reply for a handle that was just answered and is not in flight again.
    #[error("duplicate NBD reply for handle {handle:#x}, which was already answered")]
    DuplicateReply {
        /// The handle in the reply.
        handle: u64,
    },
    /// A request was refused by the server with an error reply. The connection stays
    /// usable.
    #[error(
        "the NBD server failed {command} of {len} bytes at offset {offset}: {} ({errno})",
        proto::errno_name(*.errno)
    )]
    Server {
        /// The command (`"read"`, `"write"`, `"flush"`, `"trim"`).
        command: &'static str,
        /// The request's offset.
        offset: u64,
        /// The request's length.
        len: u64,
        /// The NBD error number (`EINVAL` = 22, `EPERM` = 1, ...; see [`crate::proto`]).
        errno: u32,
    },
    /// Already as many requests in flight as the client was sized for. Reap first.
    #[error("NBD queue full: {capacity} requests already in flight")]
    QueueFull {
        /// The client's capacity.
        capacity: usize,
    },
    /// The handle is already in flight.
    #[error("NBD handle {handle:#x} is already in flight")]
    HandleInUse {
        /// The handle.
        handle: u64,
    },
    /// `reap` with nothing in flight (it would wait forever).
    #[error("nothing in flight to reap")]
    NothingInFlight,
    /// A blocking call (`read_at`, ...) while pipelined requests are in flight: their
    /// replies would be lost. Reap them first.
    #[error("{in_flight} pipelined NBD requests are in flight; reap them before a blocking call")]
    Busy {
        /// How many requests are in flight.
        in_flight: usize,
    },
    /// The server did not advertise the command (flush or trim), so the protocol forbids
    /// sending it.
    #[error("the NBD export does not support {command}")]
    Unsupported {
        /// The command.
        command: &'static str,
    },
    /// A request whose offset plus length overflows 64 bits, or whose length does not
    /// fit the protocol's 32-bit length field.
    #[error("NBD request out of range: offset {offset}, length {len}")]
    OutOfRange {
        /// The offset.
        offset: u64,
        /// The length.
        len: u64,
    },
    /// The buffer given for a read reply was shorter than the read. The data was read and
    /// dropped and the request is complete; the connection stays usable.
    #[error(
        "buffer of {buffer} bytes for NBD read handle {handle:#x} is shorter than the \
         read's {len} bytes; the data was discarded"
    )]
    BufferTooSmall {
        /// The handle of the read.
        handle: u64,
        /// The read's length.
        len: u32,
        /// The buffer's length.
        buffer: usize,
    },
    /// An option given to the client or a runner is out of range.
    #[error("invalid option: {0}")]
    InvalidOption(&'static str),
    /// An earlier fatal error left the connection out of step with the server.
    #[error("the NBD connection is unusable after an earlier protocol or socket error")]
    Broken,
    /// The `qemu-nbd` program is not installed.
    #[error(
        "{program} not found: install qemu-nbd (Debian / Ubuntu package `qemu-utils`: \
         apt-get install qemu-utils)"
    )]
    QemuNbdMissing {
        /// The program that was looked for.
        program: PathBuf,
    },
    /// The `qemu-img` program is not installed.
    #[error(
        "{program} not found: install qemu-img (Debian / Ubuntu package `qemu-utils`: \
         apt-get install qemu-utils)"
    )]
    QemuImgMissing {
        /// The program that was looked for.
        program: PathBuf,
    },
    /// A program could not be started, or its output not collected.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The private directory for `qemu-nbd`'s socket could not be made.
    #[error("cannot create a private directory under {parent}: {source}")]
    TempDir {
        /// Where it was to be made.
        parent: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `qemu-nbd` exited before its socket accepted connections.
    #[error("qemu-nbd exited ({status}) before serving; command: {command}; stderr: {stderr}")]
    QemuNbdExited {
        /// Its exit status.
        status: ExitStatus,
        /// The command line.
        command: String,
        /// What it wrote to stderr (the last 16 KiB).
        stderr: String,
    },
    /// `qemu-nbd`'s socket did not accept an NBD handshake in time.
    #[error(
        "qemu-nbd did not serve on its socket within {waited:?} ({last_error}); \
         command: {command}; stderr: {stderr}"
    )]
    QemuNbdStartTimeout {
        /// How long the runner waited.
        waited: Duration,
        /// The last error from trying the socket.
        last_error: String,
        /// The command line.
        command: String,
        /// What it wrote to stderr so far (the last 16 KiB).
        stderr: String,
    },
    /// `qemu-img bench` failed, timed out, or printed no run time.
    #[error("qemu-img bench failed ({reason}); command: {command}; output: {output}")]
    Bench {
        /// What went wrong.
        reason: String,
        /// The command line.
        command: String,
        /// What it wrote to stdout and stderr (the last 16 KiB of each).
        output: String,
    },
}

impl NbdError {
    /// Whether this error leaves the connection unusable (every later call then returns
    /// [`NbdError::Broken`]). `false` for errors of the runners, which have no connection.
    pub fn is_fatal(&self) -> bool {
        match self {
            NbdError::Io { .. }
            | NbdError::Eof { .. }
            | NbdError::BadMagic { .. }
            | NbdError::UnknownHandle { .. }
            | NbdError::DuplicateReply { .. }
            | NbdError::Broken => true,
            NbdError::Timeout { mid_message, .. } => *mid_message,
            _ => false,
        }
    }

    /// Whether this is a timeout (fatal or not).
    pub fn is_timeout(&self) -> bool {
        matches!(self, NbdError::Timeout { .. })
    }
}
