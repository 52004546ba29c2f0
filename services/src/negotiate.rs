//! Version negotiation: the host lists the framework and message versions it speaks, the
//! guest answers with one of each, or with none.
//!
//! The guest side mirrors Linux's `vmbus_prep_negotiate_resp` (drivers/hv/channel_mgmt.c):
//! more than [`MAX_VERSION_COUNT`] versions of either kind, or counts whose table runs past the
//! body, fail the negotiation; a version matches only if both numbers are equal; the answer's
//! body is 16 bytes (counts, then two version slots) with counts 1/1 on success and 0/0 on
//! failure.
//!
//! # Examples
//!
//! ```
//! use vmlink_ic::negotiate::{self, HEARTBEAT_VERSIONS, UTIL_FRAMEWORK_VERSIONS};
//! use vmlink_ic::{Message, Version};
//!
//! // The host offers framework 3.0 and heartbeat 3.0 and 1.0.
//! let mut request = [0u8; 64];
//! let len = negotiate::encode_request(
//!     &mut request, 5, &[Version::new(3, 0)], &[Version::new(3, 0), Version::new(1, 0)])?;
//!
//! // The guest answers.
//! let mut answer = [0u8; 64];
//! let reply = negotiate::respond(
//!     &Message::parse(&request[..len])?,
//!     UTIL_FRAMEWORK_VERSIONS,
//!     HEARTBEAT_VERSIONS,
//!     &mut answer,
//! )?;
//! let chosen = reply.outcome?;
//! assert_eq!(chosen.message, Version::new(3, 0));
//!
//! // The host reads the answer.
//! let parsed = negotiate::parse_response(&Message::parse(&answer[..reply.len])?)?;
//! assert_eq!(parsed, chosen);
//! # Ok::<(), vmlink_ic::IcError>(())
//! ```

use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromBytes, IntoBytes};

use crate::message::{encode_with, view};
use crate::status::{HV_E_FAIL, HV_S_OK};
use crate::wire::{IcVersion, NegotiateHeader};
use crate::{Header, IcError, IcFlags, Message, MessageType, Version};

/// The most versions of each kind a negotiate message may list (Linux
/// `IC_VERSION_NEGOTIATION_MAX_VER_COUNT`).
pub const MAX_VERSION_COUNT: u16 = 100;
/// Bytes of an answer's body: the negotiate header and two version slots.
pub const RESPONSE_BODY_LEN: usize = 16;

/// Framework 1.0 (Windows Server 2008).
pub const FRAMEWORK_1_0: Version = Version::new(1, 0);
/// Framework 3.0.
pub const FRAMEWORK_3_0: Version = Version::new(3, 0);

/// The framework versions Linux's heartbeat, shutdown, time sync and KVP drivers offer.
pub const UTIL_FRAMEWORK_VERSIONS: &[Version] = &[FRAMEWORK_3_0, FRAMEWORK_1_0];
/// The framework versions Linux's file-copy daemon offers.
pub const FCOPY_FRAMEWORK_VERSIONS: &[Version] = &[FRAMEWORK_3_0];
/// Heartbeat message versions.
pub const HEARTBEAT_VERSIONS: &[Version] = &[Version::new(3, 0), Version::new(1, 0)];
/// Shutdown message versions (3.1 adds reboot, 3.2 hibernate).
pub const SHUTDOWN_VERSIONS: &[Version] = &[
    Version::new(3, 2),
    Version::new(3, 1),
    Version::new(3, 0),
    Version::new(1, 0),
];
/// Time-sync message versions (4.0 brings the reference-time layout).
pub const TIMESYNC_VERSIONS: &[Version] =
    &[Version::new(4, 0), Version::new(3, 0), Version::new(1, 0)];
/// KVP message versions.
pub const KVP_VERSIONS: &[Version] = &[Version::new(4, 0), Version::new(3, 0), Version::new(1, 0)];
/// File-copy message versions.
pub const FCOPY_VERSIONS: &[Version] = &[Version::new(1, 1)];

/// The versions a negotiation settled on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Negotiated {
    /// The framework version.
    pub framework: Version,
    /// The message (service) version.
    pub message: Version,
}

/// A negotiate message's version lists, checked against its body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VersionLists<'a> {
    framework: &'a [IcVersion],
    message: &'a [IcVersion],
}

impl<'a> VersionLists<'a> {
    /// The lists of a negotiate message: at most [`MAX_VERSION_COUNT`] of each kind, the
    /// table within the body.
    pub fn parse(message: &Message<'a>) -> Result<Self, IcError> {
        message.expect_type(MessageType::Negotiate)?;
        let body = message.body;
        let header: &NegotiateHeader = view(body, MessageType::Negotiate)?;
        let (framework, count) = (header.icframe_vercnt.get(), header.icmsg_vercnt.get());
        if framework > MAX_VERSION_COUNT || count > MAX_VERSION_COUNT {
            return Err(IcError::TooManyVersions {
                framework,
                message: count,
            });
        }
        let table = &body[size_of::<NegotiateHeader>()..];
        let total = usize::from(framework) + usize::from(count);
        let (versions, _) =
            <[IcVersion]>::ref_from_prefix_with_elems(table, total).map_err(|_| {
                IcError::VersionsPastPacket {
                    needed: size_of::<NegotiateHeader>() + total * size_of::<IcVersion>(),
                    len: body.len(),
                }
            })?;
        let (framework, message) = versions.split_at(usize::from(framework));
        Ok(Self { framework, message })
    }

    /// The framework versions, in the order listed.
    pub fn framework(&self) -> impl Iterator<Item = Version> + 'a {
        self.framework.iter().copied().map(Version::from_wire)
    }

    /// The message versions, in the order listed.
    pub fn message(&self) -> impl Iterator<Item = Version> + 'a {
        self.message.iter().copied().map(Version::from_wire)
    }
}

/// The highest of `ours` that `theirs` lists (exact match of both numbers).
///
/// Linux takes the first of its own list that the host lists; its lists are in decreasing
/// order, so that is the highest common version, which this returns whatever the order.
fn highest_common(ours: &[Version], theirs: &[IcVersion]) -> Option<Version> {
    ours.iter()
        .copied()
        .filter(|v| theirs.contains(&v.to_wire()))
        .max()
}

/// Writes a negotiate body: the counts, then `versions` in the table after them.
fn write_body(
    body: &mut [u8],
    framework_count: u16,
    message_count: u16,
    versions: impl Iterator<Item = Version>,
) -> Result<(), IcError> {
    let (head, table) = body.split_at_mut(size_of::<NegotiateHeader>());
    let counts = NegotiateHeader {
        icframe_vercnt: U16::new(framework_count),
        icmsg_vercnt: U16::new(message_count),
        reserved: U32::new(0),
    };
    head.copy_from_slice(counts.as_bytes());
    for (version, slot) in versions.zip(table.chunks_exact_mut(size_of::<IcVersion>())) {
        slot.copy_from_slice(version.to_wire().as_bytes());
    }
    Ok(())
}

/// Writes a host's negotiate request listing `framework` then `message` versions.
///
/// The header's own versions are 0.0 (the guest reads only the lists) and its flags
/// TRANSACTION | REQUEST.
pub fn encode_request(
    out: &mut [u8],
    transaction_id: u8,
    framework: &[Version],
    message: &[Version],
) -> Result<usize, IcError> {
    let too_many = || IcError::TooManyVersions {
        framework: u16::try_from(framework.len()).unwrap_or(u16::MAX),
        message: u16::try_from(message.len()).unwrap_or(u16::MAX),
    };
    let (Ok(framework_count), Ok(message_count)) =
        (u16::try_from(framework.len()), u16::try_from(message.len()))
    else {
        return Err(too_many());
    };
    if framework_count > MAX_VERSION_COUNT || message_count > MAX_VERSION_COUNT {
        return Err(too_many());
    }
    let header = Header::request(
        MessageType::Negotiate,
        Version::default(),
        Version::default(),
        transaction_id,
    );
    let body_len =
        size_of::<NegotiateHeader>() + (framework.len() + message.len()) * size_of::<IcVersion>();
    let versions = framework.iter().chain(message).copied();
    encode_with(out, &header, body_len, |body| {
        write_body(body, framework_count, message_count, versions)
    })
}

/// What the guest answered: the answer's length in `out` and the negotiation's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Bytes of the answer written to `out`.
    pub len: usize,
    /// The versions chosen, or why none were: [`IcError::NoCommonVersion`],
    /// [`IcError::TooManyVersions`] or [`IcError::VersionsPastPacket`]. The answer is written
    /// either way: the host waits for one.
    pub outcome: Result<Negotiated, IcError>,
}

/// The guest's answer to a negotiate request, offering `framework` and `message` versions.
///
/// On success the answer lists the highest common framework and message versions (counts
/// 1/1) with status `HV_S_OK`; otherwise counts 0/0 with status `HV_E_FAIL`. As in Linux the
/// two version slots are written either way, holding on failure what Linux leaves in them: a
/// slot not yet chosen holds its kind's count as major and 0 as minor; the message slot is not
/// searched once the framework failed. The rest of the header (versions, type, transaction
/// id) is the request's, with flags TRANSACTION | RESPONSE.
///
/// Errors only when the request is not a negotiate message or `out` is too small for the
/// 44-byte answer.
pub fn respond(
    request: &Message<'_>,
    framework: &[Version],
    message: &[Version],
    out: &mut [u8],
) -> Result<Answer, IcError> {
    let counts: &NegotiateHeader = request.body_view(MessageType::Negotiate)?;
    let mut slots = [
        Version::new(counts.icframe_vercnt.get(), 0),
        Version::new(counts.icmsg_vercnt.get(), 0),
    ];
    let outcome = VersionLists::parse(request).and_then(|lists| {
        slots[0] = highest_common(framework, lists.framework).ok_or(IcError::NoCommonVersion)?;
        slots[1] = highest_common(message, lists.message).ok_or(IcError::NoCommonVersion)?;
        Ok(Negotiated {
            framework: slots[0],
            message: slots[1],
        })
    });
    let (count, status) = if outcome.is_ok() {
        (1, HV_S_OK)
    } else {
        (0, HV_E_FAIL)
    };
    let header = request.header.response(status);
    let len = encode_with(out, &header, RESPONSE_BODY_LEN, |body| {
        write_body(body, count, count, slots.into_iter())
    })?;

    Ok(Answer { len, outcome })
}

/// The versions a guest's negotiate answer chose.
///
/// Counts 0/0 are [`IcError::NoCommonVersion`]; counts 1/1 give the two versions; any other
/// counts are [`IcError::UnexpectedVersionCounts`].
pub fn parse_response(message: &Message<'_>) -> Result<Negotiated, IcError> {
    message.expect_type(MessageType::Negotiate)?;
    if !message.header.flags.contains(IcFlags::RESPONSE) {
        return Err(IcError::NotAResponse {
            flags: message.header.flags.0,
        });
    }
    let lists = VersionLists::parse(message)?;
    match (lists.framework, lists.message) {
        ([], []) => Err(IcError::NoCommonVersion),
        ([framework], [chosen]) => Ok(Negotiated {
            framework: Version::from_wire(*framework),
            message: Version::from_wire(*chosen),
        }),
        (framework, chosen) => Err(IcError::UnexpectedVersionCounts {
            framework: u16::try_from(framework.len()).unwrap_or(u16::MAX),
            message: u16::try_from(chosen.len()).unwrap_or(u16::MAX),
        }),
    }
}
