//! Time synchronisation: the host sends its time, in 100 ns units since 1601-01-01 UTC.
//!
//! Two body layouts exist. Which one a message carries depends on the message version the
//! channel negotiated, not on the header: Linux reads [`TimeSyncRefData`] when the negotiated
//! version is above 3.0 and [`TimeSyncData`] otherwise ([`uses_reference_layout`]).
//!
//! # Examples
//!
//! ```
//! use core::time::Duration;
//! use vmlink_ic::timesync::{self, FLAG_SYNC, TimeSyncRefData};
//! use vmlink_ic::{Header, Message, MessageType, Version};
//!
//! let negotiated = Version::new(4, 0);
//! let header = Header::request(MessageType::TimeSync, Version::new(3, 0), negotiated, 3);
//! let now = timesync::from_unix(Duration::from_secs(1_700_000_000))?;
//! let mut out = [0u8; 64];
//! let len = vmlink_ic::encode_body(&mut out, &header,
//!     &TimeSyncRefData::new(now, 12_345, FLAG_SYNC, 0, 2))?;
//!
//! let sample = timesync::parse(&Message::parse(&out[..len])?, negotiated)?;
//! assert!(sample.is_sync());
//! assert_eq!(timesync::to_unix(sample.parent_time())?, Duration::from_secs(1_700_000_000));
//! # Ok::<(), vmlink_ic::IcError>(())
//! ```

use core::time::Duration;

use zerocopy::byteorder::little_endian::U64;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::message::{Body, view};
use crate::{IcError, Message, MessageType, Version};

/// A probe: no flag bit set (Linux `ICTIMESYNCFLAG_PROBE`).
pub const FLAG_PROBE: u8 = 0;
/// Set the clock now, after boot or restore (bit 0, `ICTIMESYNCFLAG_SYNC`).
pub const FLAG_SYNC: u8 = 1;
/// A sample the guest may use to discipline its clock (bit 1, `ICTIMESYNCFLAG_SAMPLE`).
pub const FLAG_SAMPLE: u8 = 2;

/// 100 ns units from 1601-01-01 to 1970-01-01 (Linux `WLTIMEDELTA`).
pub const UNIX_EPOCH_DELTA: u64 = 116_444_736_000_000_000;
const UNITS_PER_SEC: u64 = 10_000_000;

/// `struct ictimesync_data`: the body up to message version 3.0 (25 bytes).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct TimeSyncData {
    /// The host's time.
    pub parenttime: U64,
    /// The guest's time (filled by the guest).
    pub childtime: U64,
    /// Round-trip time.
    pub roundtriptime: U64,
    /// Flags (`FLAG_*`).
    pub flags: u8,
}

impl TimeSyncData {
    /// A body with these values.
    pub fn new(parenttime: u64, childtime: u64, roundtriptime: u64, flags: u8) -> Self {
        Self {
            parenttime: U64::new(parenttime),
            childtime: U64::new(childtime),
            roundtriptime: U64::new(roundtriptime),
            flags,
        }
    }
}

/// `struct ictimesync_ref_data`: the body from message version 4.0 (22 bytes).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct TimeSyncRefData {
    /// The host's time.
    pub parenttime: U64,
    /// The guest's Hyper-V reference counter when the host took the sample.
    pub vmreferencetime: U64,
    /// Flags (`FLAG_*`).
    pub flags: u8,
    /// Leap-second flags.
    pub leapflags: u8,
    /// The host clock's stratum.
    pub stratum: u8,
    /// Reserved.
    pub reserved: [u8; 3],
}

impl TimeSyncRefData {
    /// A body with these values.
    pub fn new(
        parenttime: u64,
        vmreferencetime: u64,
        flags: u8,
        leapflags: u8,
        stratum: u8,
    ) -> Self {
        Self {
            parenttime: U64::new(parenttime),
            vmreferencetime: U64::new(vmreferencetime),
            flags,
            leapflags,
            stratum,
            reserved: [0; 3],
        }
    }
}

impl Body for TimeSyncData {
    const MESSAGE_TYPE: MessageType = MessageType::TimeSync;
}

impl Body for TimeSyncRefData {
    const MESSAGE_TYPE: MessageType = MessageType::TimeSync;
}

/// Whether a channel that negotiated `message_version` carries [`TimeSyncRefData`]
/// (Linux: `ts_srv_version > TS_VERSION_3`).
pub fn uses_reference_layout(message_version: Version) -> bool {
    message_version > Version::new(3, 0)
}

/// A time-sync body in either layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSync<'a> {
    /// Message version 3.0 and before.
    Data(&'a TimeSyncData),
    /// Message versions above 3.0.
    Reference(&'a TimeSyncRefData),
}

impl TimeSync<'_> {
    /// The host's time, 100 ns units since 1601.
    pub fn parent_time(&self) -> u64 {
        match self {
            Self::Data(data) => data.parenttime.get(),
            Self::Reference(data) => data.parenttime.get(),
        }
    }

    /// The flags.
    pub fn flags(&self) -> u8 {
        match self {
            Self::Data(data) => data.flags,
            Self::Reference(data) => data.flags,
        }
    }

    /// Whether the host asks the guest to set its clock now.
    pub fn is_sync(&self) -> bool {
        self.flags() & FLAG_SYNC != 0
    }

    /// Whether this is a sample the guest may use to discipline its clock.
    pub fn is_sample(&self) -> bool {
        self.flags() & FLAG_SAMPLE != 0
    }
}

/// The body of a time-sync message on a channel that negotiated `message_version`.
pub fn parse<'a>(message: &Message<'a>, message_version: Version) -> Result<TimeSync<'a>, IcError> {
    message.expect_type(MessageType::TimeSync)?;
    let body = message.body;
    Ok(if uses_reference_layout(message_version) {
        TimeSync::Reference(view(body, MessageType::TimeSync)?)
    } else {
        TimeSync::Data(view(body, MessageType::TimeSync)?)
    })
}

/// The Unix time (since 1970-01-01 UTC) of a time in 100 ns units since 1601.
pub fn to_unix(time: u64) -> Result<Duration, IcError> {
    let since = time
        .checked_sub(UNIX_EPOCH_DELTA)
        .ok_or(IcError::TimeBeforeUnixEpoch(time))?;
    let nanos = (since % UNITS_PER_SEC) as u32 * 100;
    Ok(Duration::new(since / UNITS_PER_SEC, nanos))
}

/// A Unix time as 100 ns units since 1601, truncated to 100 ns.
pub fn from_unix(unix: Duration) -> Result<u64, IcError> {
    unix.as_secs()
        .checked_mul(UNITS_PER_SEC)
        .and_then(|units| units.checked_add(u64::from(unix.subsec_nanos() / 100)))
        .and_then(|units| units.checked_add(UNIX_EPOCH_DELTA))
        .ok_or(IcError::TimeOutOfRange)
}
