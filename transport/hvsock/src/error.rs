//! The crate's error type.

/// Why a packet was refused, or why the stream cannot do what was asked.
///
/// Every rejection of what the peer sent has its own variant; [`HvStream`](crate::HvStream)
/// reports them as an [`std::io::Error`] of kind
/// [`InvalidData`](std::io::ErrorKind::InvalidData) that wraps this type (get it back with
/// [`std::io::Error::get_ref`] and `downcast_ref`), a write after the sending side was shut
/// down as [`BrokenPipe`](std::io::ErrorKind::BrokenPipe), and the caller's own mistakes as
/// [`InvalidInput`](std::io::ErrorKind::InvalidInput). No function of the crate panics on
/// any input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HvSockError {
    /// The payload is shorter than the 8-byte `vmpipe_proto_header`.
    #[error("payload of {len} bytes is shorter than the 8-byte pipe header")]
    PayloadTooShort {
        /// The payload's length.
        len: usize,
    },
    /// The header's `pkt_type` is not 1 (data).
    #[error("pipe packet type {pkt_type} is not 1 (data)")]
    UnknownPacketType {
        /// The type the header carries.
        pkt_type: u32,
    },
    /// The header announces more data than the 16 KiB a packet may carry (`HVS_MTU_SIZE`).
    #[error("pipe header announces {data_size} bytes, more than the 16384 a packet may carry")]
    DataTooLarge {
        /// The announced size.
        data_size: u32,
    },
    /// The header announces more data than the payload holds after it.
    #[error("pipe header announces {data_size} bytes but only {available} follow it")]
    DataPastPayload {
        /// The announced size.
        data_size: u32,
        /// Bytes of the payload after the header.
        available: usize,
    },
    /// The stream received a packet that is not in-band data (raw VMBus packet type).
    #[error("VMBus packet of type {packet_type:#x} where in-band data (6) belongs")]
    NotInBand {
        /// The packet's type.
        packet_type: u16,
    },
    /// The stream received an in-band packet with an extra header between its descriptor
    /// and its payload (`data_offset8` other than 2).
    #[error("in-band packet with a {len}-byte extra header before its payload")]
    ExtraHeader {
        /// Bytes of extra header.
        len: usize,
    },
    /// A write after [`shutdown_write`](crate::HvStream::shutdown_write).
    #[error("the stream's sending side is shut down")]
    WriteAfterShutdown,
    /// Data to encode is larger than a packet may carry (16 KiB).
    #[error("{len} bytes of data do not fit one packet (16384 at most)")]
    EncodeTooLarge {
        /// The data's length.
        len: usize,
    },
    /// The output buffer is too small for the packet.
    #[error("the packet needs {needed} bytes but the buffer holds {capacity}")]
    OutputTooSmall {
        /// Bytes needed.
        needed: usize,
        /// The buffer's length.
        capacity: usize,
    },
}

/// The error as an I/O error of the kind the type's documentation names, wrapping it.
impl From<HvSockError> for std::io::Error {
    fn from(e: HvSockError) -> Self {
        let kind = match e {
            HvSockError::WriteAfterShutdown => std::io::ErrorKind::BrokenPipe,
            HvSockError::EncodeTooLarge { .. } | HvSockError::OutputTooSmall { .. } => {
                std::io::ErrorKind::InvalidInput
            }
            _ => std::io::ErrorKind::InvalidData,
        };
        std::io::Error::new(kind, e)
    }
}
