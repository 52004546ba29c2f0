//! The NBD wire constants this client speaks, with the values of the protocol document
//! (`doc/proto.md` of the reference implementation). Every number on the wire is
//! big-endian.
//!
//! Only what fixed newstyle negotiation with `NBD_OPT_GO` and simple replies need is here,
//! plus the names of the error numbers a server can send, for messages.

/// `NBDMAGIC`: the first 8 bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the second 8 bytes of a newstyle greeting, and the first 8 of every option
/// the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The second 8 bytes of an oldstyle greeting (`cliserv_magic`), which this client refuses.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// The magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of a transmission request (`NBD_REQUEST_MAGIC`).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply (`NBD_SIMPLE_REPLY_MAGIC`).
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk: never valid here, since this client does not
/// negotiate structured replies.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server may omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the server is to omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// `NBD_OPT_EXPORT_NAME`: the old way into transmission, used only when a server refuses
/// `NBD_OPT_GO` as unsupported.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`: end the negotiation cleanly.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_GO`: choose an export and enter transmission.
pub const OPT_GO: u32 = 7;

/// `NBD_REP_ACK`: the option succeeded (for `NBD_OPT_GO`: transmission starts).
pub const REP_ACK: u32 = 1;
/// `NBD_REP_INFO`: one piece of information about the export.
pub const REP_INFO: u32 = 3;
/// Bit 31 of a reply type marks an error reply.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`: the server does not know the option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// `NBD_REP_ERR_POLICY`: the server's policy forbids the option.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// `NBD_REP_ERR_INVALID`: the option was malformed.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// `NBD_REP_ERR_PLATFORM`: not supported on the server's platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// `NBD_REP_ERR_TLS_REQD`: the server wants TLS first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// `NBD_REP_ERR_UNKNOWN`: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// `NBD_REP_ERR_BLOCK_SIZE_REQD`: the client must first agree to block size constraints.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// `NBD_REP_ERR_TOO_BIG`: the request or the reply is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// `NBD_REP_ERR_EXT_HEADER_REQD`: the server insists on extended headers.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

/// `NBD_INFO_EXPORT`: the export's size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the flags field is valid (always set by a conforming server).
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server accepts `NBD_CMD_FLUSH`.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the server accepts the FUA command flag.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the export is rotational media.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: the server accepts `NBD_CMD_TRIM`.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: the server accepts `NBD_CMD_WRITE_ZEROES`.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: replies are consistent across several connections to this export.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`: disconnect.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;

/// NBD error `EPERM`: operation not permitted (e.g. a write to a read-only export).
pub const EPERM: u32 = 1;
/// NBD error `EIO`.
pub const EIO: u32 = 5;
/// NBD error `ENOMEM`.
pub const ENOMEM: u32 = 12;
/// NBD error `EINVAL` (e.g. a read past the end of the export).
pub const EINVAL: u32 = 22;
/// NBD error `ENOSPC` (e.g. a write past the end of the export).
pub const ENOSPC: u32 = 28;
/// NBD error `EOVERFLOW`.
pub const EOVERFLOW: u32 = 75;
/// NBD error `ENOTSUP`.
pub const ENOTSUP: u32 = 95;
/// NBD error `ESHUTDOWN`: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// The protocol's longest string (export names, error messages): 4,096 bytes.
pub const MAX_STRING_LEN: usize = 4096;

/// The name of an NBD error number (`"EINVAL"`), or `"unknown error"`.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        0 => "no error",
        EPERM => "EPERM",
        EIO => "EIO",
        ENOMEM => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// The name and meaning of an option reply type, for messages
/// (`"NBD_REP_ERR_UNKNOWN (the export is not available)"`).
pub fn rep_name(reply_type: u32) -> &'static str {
    match reply_type {
        REP_ACK => "NBD_REP_ACK",
        REP_INFO => "NBD_REP_INFO",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP (the server does not know the option)",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY (forbidden by the server's policy)",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID (the option was invalid)",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM (not supported on the server's platform)",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD (the server requires TLS)",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN (the export is not available)",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN (the server is shutting down)",
        REP_ERR_BLOCK_SIZE_REQD => {
            "NBD_REP_ERR_BLOCK_SIZE_REQD (the server requires block size negotiation)"
        }
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG (the request or reply is too large)",
        REP_ERR_EXT_HEADER_REQD => {
            "NBD_REP_ERR_EXT_HEADER_REQD (the server requires extended headers)"
        }
        t if t & REP_FLAG_ERROR != 0 => "an unknown NBD_REP_ERR_* error",
        _ => "an unknown reply type",
    }
}
