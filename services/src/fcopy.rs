//! Host-to-guest file copy (message version 1.1, framework 3.0 only).
//!
//! Every body starts with [`FcopyHeader`] (operation and two GUIDs Linux does not use).
//! START_FILE_COPY carries [`StartFcopy`], WRITE_TO_FILE [`DoFcopy`], COMPLETE_FCOPY and
//! CANCEL_FCOPY the header alone. Linux's daemon checks only that the header is present;
//! this codec also requires the whole start body, and a write's data within both the
//! 6144-byte fragment and the body.
//!
//! # Examples
//!
//! ```
//! use vmlink_ic::fcopy::{self, CREATE_PATH, Fcopy, StartFcopy};
//! use vmlink_ic::{Header, Message, MessageType, Version};
//!
//! let header = Header::request(MessageType::FileCopy, Version::new(3, 0), Version::new(1, 1), 6);
//! let start = StartFcopy::new([[0; 16]; 2], "notes.txt", "/tmp/in", CREATE_PATH, 5)?;
//! let mut out = [0u8; 6300];
//! let len = vmlink_ic::encode_body(&mut out, &header, &start)?;
//! let Fcopy::Start(start) = fcopy::parse(&Message::parse(&out[..len])?)? else { panic!() };
//! let mut name = [0u8; 64];
//! assert_eq!(start.file_name(&mut name)?, "notes.txt");
//!
//! let len = fcopy::encode_write(&mut out, &header, [[0; 16]; 2], 0, b"hello")?;
//! let Fcopy::Write { offset, data, .. } = fcopy::parse(&Message::parse(&out[..len])?)? else {
//!     panic!()
//! };
//! assert_eq!((offset, data), (0, &b"hello"[..]));
//! # Ok::<(), vmlink_ic::IcError>(())
//! ```

use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::message::{Body, encode_body, encode_in_place, view_at};
use crate::{Header, IcError, Message, MessageType, utf16};

/// Units of a file or path name (`W_MAX_PATH`).
pub const W_MAX_PATH: usize = 260;
/// The most data one write carries (`DATA_FRAGMENT`).
pub const DATA_FRAGMENT: usize = 6 * 1024;
/// Copy flag: overwrite an existing file.
pub const OVER_WRITE: u32 = 0x1;
/// Copy flag: create missing directories.
pub const CREATE_PATH: u32 = 0x2;

/// Where a write's data starts in [`DoFcopy`].
const DATA_OFFSET: usize = 52;

wire_enum! {
    /// The operations (`enum hv_fcopy_op`).
    pub enum FcopyOperation: u32, IcError::FcopyOperation {
        /// Create the file.
        Start = 0,
        /// Write a fragment.
        Write = 1,
        /// The copy is complete.
        Complete = 2,
        /// The copy is abandoned.
        Cancel = 3,
    }
}

/// `struct hv_fcopy_hdr` (36 bytes).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct FcopyHeader {
    /// The operation ([`FcopyOperation`]).
    pub operation: U32,
    /// A GUID, unused by Linux.
    pub service_id0: [u8; 16],
    /// A GUID, unused by Linux.
    pub service_id1: [u8; 16],
}

/// The header's two GUIDs, `service_id0` then `service_id1`, as raw bytes.
pub type ServiceIds = [[u8; 16]; 2];

impl FcopyHeader {
    /// A header for `operation` with these GUIDs.
    pub fn new(operation: FcopyOperation, service_ids: ServiceIds) -> Self {
        Self {
            operation: U32::new(operation as u32),
            service_id0: service_ids[0],
            service_id1: service_ids[1],
        }
    }

    /// The two GUIDs.
    pub fn service_ids(&self) -> ServiceIds {
        [self.service_id0, self.service_id1]
    }
}

/// `struct hv_start_fcopy` (1088 bytes).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct StartFcopy {
    /// The header (operation START_FILE_COPY).
    pub hdr: FcopyHeader,
    /// The file's name, NUL-terminated UTF-16LE.
    pub file_name: [u8; W_MAX_PATH * 2],
    /// The directory, NUL-terminated UTF-16LE.
    pub path_name: [u8; W_MAX_PATH * 2],
    /// `OVER_WRITE`, `CREATE_PATH`.
    pub copy_flags: U32,
    /// The file's size.
    pub file_size: U64,
}

impl Body for StartFcopy {
    const MESSAGE_TYPE: MessageType = MessageType::FileCopy;
}

impl Body for FcopyHeader {
    const MESSAGE_TYPE: MessageType = MessageType::FileCopy;
}

impl StartFcopy {
    /// A start of a copy of `file_name` into directory `path_name`.
    pub fn new(
        service_ids: ServiceIds,
        file_name: &str,
        path_name: &str,
        copy_flags: u32,
        file_size: u64,
    ) -> Result<Self, IcError> {
        let mut start = Self::new_zeroed();
        start.hdr = FcopyHeader::new(FcopyOperation::Start, service_ids);
        utf16::encode(file_name, &mut start.file_name)?;
        utf16::encode(path_name, &mut start.path_name)?;
        start.copy_flags = U32::new(copy_flags);
        start.file_size = U64::new(file_size);
        Ok(start)
    }

    /// The file's name, decoded into `out`.
    pub fn file_name<'o>(&self, out: &'o mut [u8]) -> Result<&'o str, IcError> {
        utf16::decode_terminated(&self.file_name, out)
    }

    /// The directory, decoded into `out`.
    pub fn path_name<'o>(&self, out: &'o mut [u8]) -> Result<&'o str, IcError> {
        utf16::decode_terminated(&self.path_name, out)
    }
}

/// `struct hv_do_fcopy` (6196 bytes).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct DoFcopy {
    /// The header (operation WRITE_TO_FILE).
    pub hdr: FcopyHeader,
    /// Padding.
    pub pad: U32,
    /// Where in the file the data goes.
    pub offset: U64,
    /// Bytes of data.
    pub size: U32,
    /// The data.
    pub data: [u8; DATA_FRAGMENT],
}

impl Body for DoFcopy {
    const MESSAGE_TYPE: MessageType = MessageType::FileCopy;
}

/// A file-copy message, by operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fcopy<'a> {
    /// START_FILE_COPY.
    Start(&'a StartFcopy),
    /// WRITE_TO_FILE.
    Write {
        /// The header.
        hdr: &'a FcopyHeader,
        /// Where in the file the data goes.
        offset: u64,
        /// The data (`size` bytes).
        data: &'a [u8],
    },
    /// COMPLETE_FCOPY.
    Complete(&'a FcopyHeader),
    /// CANCEL_FCOPY.
    Cancel(&'a FcopyHeader),
}

/// The body of a file-copy message.
pub fn parse<'a>(message: &Message<'a>) -> Result<Fcopy<'a>, IcError> {
    message.expect_type(MessageType::FileCopy)?;
    let body = message.body;
    let t = MessageType::FileCopy;
    let hdr: &FcopyHeader = view_at(body, 0, t)?;
    Ok(match FcopyOperation::try_from(hdr.operation.get())? {
        FcopyOperation::Start => Fcopy::Start(view_at(body, 0, t)?),
        FcopyOperation::Write => {
            let offset: &U64 = view_at(body, 40, t)?;
            let size: &U32 = view_at(body, 48, t)?;
            let size = size.get();
            let len = usize::try_from(size)
                .ok()
                .filter(|&len| len <= DATA_FRAGMENT)
                .ok_or(IcError::FcopyDataTooLong(size))?;
            let data = body
                .get(DATA_OFFSET..DATA_OFFSET + len)
                .ok_or(IcError::BodyTooShort {
                    message_type: t,
                    needed: DATA_OFFSET + len,
                    len: body.len(),
                })?;
            Fcopy::Write {
                hdr,
                offset: offset.get(),
                data,
            }
        }
        FcopyOperation::Complete => Fcopy::Complete(hdr),
        FcopyOperation::Cancel => Fcopy::Cancel(hdr),
    })
}

/// Writes a WRITE_TO_FILE message: the whole 6196-byte body, `data` at its start.
pub fn encode_write(
    out: &mut [u8],
    header: &Header,
    service_ids: ServiceIds,
    offset: u64,
    data: &[u8],
) -> Result<usize, IcError> {
    let size = u32::try_from(data.len())
        .ok()
        .filter(|_| data.len() <= DATA_FRAGMENT)
        .ok_or(IcError::FcopyDataTooLong(
            u32::try_from(data.len()).unwrap_or(u32::MAX),
        ))?;
    encode_in_place(out, header, MessageType::FileCopy, |body: &mut DoFcopy| {
        body.hdr = FcopyHeader::new(FcopyOperation::Write, service_ids);
        body.offset = U64::new(offset);
        body.size = U32::new(size);
        body.data[..data.len()].copy_from_slice(data);
        Ok(())
    })
}

/// Writes a COMPLETE_FCOPY or CANCEL_FCOPY message (the 36-byte header alone); the other
/// operations, which need a body, are refused with [`IcError::FcopyOperation`].
pub fn encode_control(
    out: &mut [u8],
    header: &Header,
    operation: FcopyOperation,
    service_ids: ServiceIds,
) -> Result<usize, IcError> {
    if matches!(operation, FcopyOperation::Start | FcopyOperation::Write) {
        return Err(IcError::FcopyOperation(operation as u32));
    }
    encode_body(out, header, &FcopyHeader::new(operation, service_ids))
}
