//! The one error type of the codec.

use crate::MessageType;

/// Why a message was rejected or could not be written.
///
/// Every rejection of peer input has its own variant, so a caller can tell exactly what was
/// wrong with a packet; none of the codec's functions panics on any input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IcError {
    /// The payload is shorter than the two headers (28 bytes).
    #[error("payload of {len} bytes is shorter than the 28-byte pipe and message headers")]
    PayloadTooShort {
        /// The payload's length.
        len: usize,
    },
    /// The pipe header's `msgsize` runs past the end of the payload.
    #[error("pipe header announces {msgsize} bytes but only {available} follow it")]
    PipeSizePastPacket {
        /// The announced size.
        msgsize: u32,
        /// Bytes of the payload after the pipe header.
        available: usize,
    },
    /// `icmsgsize` plus the 20-byte message header runs past the pipe header's `msgsize`.
    #[error(
        "message header announces a {icmsgsize}-byte body but the pipe message holds {msgsize} bytes"
    )]
    IcSizePastPipe {
        /// The announced body size.
        icmsgsize: u16,
        /// The pipe header's message size (message header included).
        msgsize: u32,
    },
    /// The message type is none of the known integration-service types.
    #[error("unknown message type {0}")]
    UnknownMessageType(u16),
    /// The body is shorter than its message type (or operation) needs.
    #[error("{message_type:?} body of {len} bytes is shorter than the {needed} bytes it needs")]
    BodyTooShort {
        /// The message's type.
        message_type: MessageType,
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        len: usize,
    },
    /// A body to encode is larger than `icmsgsize` (a `u16`) can describe.
    #[error("a body of {len} bytes does not fit the 16-bit message size")]
    BodyTooLarge {
        /// The body's length.
        len: usize,
    },
    /// The output buffer is too small for the message.
    #[error("the message needs {needed} bytes but the buffer holds {capacity}")]
    OutputTooSmall {
        /// Bytes needed.
        needed: usize,
        /// The buffer's length.
        capacity: usize,
    },
    /// The message (or the header given to an encoder) has another type than the one asked.
    #[error("expected a {expected:?} message, found {found:?}")]
    WrongMessageType {
        /// The type asked for.
        expected: MessageType,
        /// The type found.
        found: MessageType,
    },
    /// A response was expected but the message's flags do not say RESPONSE.
    #[error("the message is not a response (flags {flags:#04x})")]
    NotAResponse {
        /// The message's flags.
        flags: u8,
    },
    /// A negotiate message lists more than 100 framework or message versions.
    #[error(
        "negotiate lists {framework} framework and {message} message versions (at most 100 each)"
    )]
    TooManyVersions {
        /// Framework version count.
        framework: u16,
        /// Message version count.
        message: u16,
    },
    /// A negotiate message's version counts run past the end of its body.
    #[error("negotiate version table needs {needed} bytes but the body holds {len}")]
    VersionsPastPacket {
        /// Bytes the counts need (8-byte negotiate header included).
        needed: usize,
        /// The body's length.
        len: usize,
    },
    /// The two sides share no framework or no message version.
    #[error("no common version")]
    NoCommonVersion,
    /// A negotiate response lists other counts than 0/0 (failure) or 1/1 (the choice).
    #[error("negotiate response lists {framework} framework and {message} message versions")]
    UnexpectedVersionCounts {
        /// Framework version count.
        framework: u16,
        /// Message version count.
        message: u16,
    },
    /// A UTF-16 byte size is odd.
    #[error("UTF-16 size {0} is odd")]
    Utf16OddSize(u32),
    /// A UTF-16 byte size is zero: it must at least hold the terminator.
    #[error("UTF-16 size 0 leaves no room for the terminator")]
    Utf16EmptySize,
    /// A UTF-16 byte size runs past its field.
    #[error("UTF-16 size {size} runs past its {field}-byte field")]
    Utf16SizePastField {
        /// The announced size.
        size: u32,
        /// The field's length.
        field: usize,
    },
    /// The UTF-16 text has no terminator where its size (or its field) says it ends.
    #[error("UTF-16 text has no terminator where it should end")]
    Utf16MissingTerminator,
    /// The UTF-16 text holds a NUL before its announced end.
    #[error("UTF-16 text holds a NUL at unit {at}, before its end")]
    Utf16EmbeddedNul {
        /// Index of the NUL, in 16-bit units.
        at: usize,
    },
    /// The UTF-16 text holds a surrogate without its pair.
    #[error("UTF-16 text holds a lone surrogate at unit {at}")]
    Utf16LoneSurrogate {
        /// Index of the surrogate, in 16-bit units.
        at: usize,
    },
    /// Text to encode (terminator included) does not fit its field or output.
    #[error("text needs {needed} bytes but its field holds {capacity}")]
    TextTooLong {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        capacity: usize,
    },
    /// Text to encode holds a NUL character, which would end it early on the wire.
    #[error("text to encode holds a NUL character")]
    TextHasNul,
    /// The shutdown display message is not UTF-8.
    #[error("the shutdown display message is not UTF-8")]
    DisplayMessageNotUtf8,
    /// Shutdown flags other than 0 to 5 (shut down, reboot, hibernate, each optionally forced).
    #[error("unknown shutdown flags {0:#x}")]
    ShutdownFlags(u32),
    /// A KVP operation outside 0 to 5.
    #[error("unknown KVP operation {0}")]
    KvpOperation(u8),
    /// A KVP pool outside 0 to 4.
    #[error("KVP pool {0} is out of range")]
    KvpPool(u8),
    /// A KVP value type other than REG_SZ (1), REG_U32 (4) or REG_U64 (8).
    #[error("unknown KVP value type {0}")]
    KvpValueType(u32),
    /// A file-copy operation outside 0 to 3.
    #[error("unknown file-copy operation {0}")]
    FcopyOperation(u32),
    /// A file-copy write carries more than 6144 bytes.
    #[error("file-copy write of {0} bytes exceeds the 6144-byte fragment")]
    FcopyDataTooLong(u32),
    /// A time before the Unix epoch cannot become a Unix time.
    #[error("time {0} (100 ns units since 1601) is before the Unix epoch")]
    TimeBeforeUnixEpoch(u64),
    /// A Unix time past what 64-bit 100 ns units since 1601 can hold.
    #[error("time is past what 64-bit 100 ns units since 1601 can hold")]
    TimeOutOfRange,
}
