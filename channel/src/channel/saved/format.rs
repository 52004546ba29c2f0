//! The byte form of a [`SavedEndpoint`]: what one process writes for its successor, and
//! the only form that crosses a process boundary. Documented in `docs/SAVED-STATE.md`.
//!
//! Layout: the 8-byte magic [`SAVED_STATE_MAGIC`], the version as a little-endian `u16`,
//! then the version's body in postcard's wire format (postcard 1.x: a stable, documented,
//! `no_std` format; unsigned integers as LEB128 varints, `bool` and tags as one byte,
//! byte strings as a varint length and the bytes). Version 1's body, in order:
//!
//! 1. the configuration: `spin_iterations` u32; `spin_before_sleep` and `space_recheck`
//!    each as seconds u64 then nanoseconds u32; `queue_depth` u64; `queue_bytes` u64;
//!    `gpa_page_limit` as an option of u64;
//! 2. [`MAX_TRANSACTIONS`] transaction slots, each its generation u32 and its state u8
//!    (0 free, 1 polled, 2 abandoned);
//! 3. the nine counters as u64, in [`Counters`]' field order;
//! 4. the state as an enum: 0 open, 1 peer closed, 2 failed followed by the kind u8
//!    (0 ring, 1 protocol, 2 doorbell, 3 frame, 4 I/O);
//! 5. the number of queued packets u32, then each packet: its type u16, transaction id
//!    u64, completion requested bool, extra header length u32, and its bytes (extra header,
//!    then payload) as a byte string.
//!
//! Nothing may follow. A decoder reads every version up to its own and refuses a newer
//! one with [`SavedStateError::NewerVersion`]; a version it reads it checks whole before
//! anything is built, and no allocation is sized by a count in the input before the
//! bytes it counts have been read.

use alloc::vec::Vec;
use core::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Config, Counters, FailureCause, MAX_TRANSACTIONS, Received, SavedEndpoint, SavedSlot};
use crate::FailureKind;
use vmlink_ring::protocol::PacketType;

/// The first bytes of every saved endpoint's byte form.
pub const SAVED_STATE_MAGIC: [u8; 8] = *b"VMLKSAVE";

/// The version [`SavedEndpoint::to_bytes`] writes, and the newest
/// [`SavedEndpoint::from_bytes`] reads.
pub const SAVED_STATE_VERSION: u16 = 1;

/// The largest queue a decoded configuration may ask for, in bytes: the queue's buffer is
/// allocated at this size, so a hostile state must not choose it freely.
const MAX_QUEUE_BYTES: u64 = 64 << 20;
/// The deepest queue a decoded configuration may ask for.
const MAX_QUEUE_DEPTH: u64 = 1 << 16;

/// Why a saved endpoint's byte form was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SavedStateError {
    /// The bytes do not start with [`SAVED_STATE_MAGIC`].
    #[error("not a saved vmlink endpoint (no magic)")]
    NotSavedState,
    /// Written by newer code, in a version this code does not read.
    #[error("saved state version {found} is newer than {supported}, the newest this code reads")]
    NewerVersion {
        /// The version in the bytes.
        found: u16,
        /// The newest version this code reads.
        supported: u16,
    },
    /// A version no vmlink ever wrote (0).
    #[error("saved state version {0} does not exist")]
    UnknownVersion(u16),
    /// The bytes end before the state does.
    #[error("the saved state is truncated")]
    Truncated,
    /// Bytes follow the state.
    #[error("{0} bytes follow the saved state")]
    TrailingBytes(usize),
    /// A value does not decode, or decodes to something no endpoint could have saved.
    #[error("the saved state is malformed: {0}")]
    Malformed(&'static str),
}

#[derive(Serialize, Deserialize)]
struct ConfigV1 {
    spin_iterations: u32,
    spin_before_sleep: (u64, u32),
    space_recheck: (u64, u32),
    queue_depth: u64,
    queue_bytes: u64,
    gpa_page_limit: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct SlotV1 {
    generation: u32,
    state: u8,
}

#[derive(Serialize, Deserialize)]
struct CountersV1 {
    packets_sent: u64,
    bytes_sent: u64,
    packets_received: u64,
    bytes_received: u64,
    signals_sent: u64,
    signals_received: u64,
    send_waits: u64,
    receive_sleeps: u64,
    late_completions: u64,
}

/// The nine counters in both directions, field by field.
macro_rules! counters_v1 {
    ($($field:ident),*) => {
        impl From<Counters> for CountersV1 {
            fn from(c: Counters) -> Self {
                Self { $($field: c.$field),* }
            }
        }

        impl From<CountersV1> for Counters {
            fn from(c: CountersV1) -> Self {
                Self { $($field: c.$field),* }
            }
        }
    };
}

counters_v1!(
    packets_sent,
    bytes_sent,
    packets_received,
    bytes_received,
    signals_sent,
    signals_received,
    send_waits,
    receive_sleeps,
    late_completions
);

#[derive(Serialize, Deserialize)]
enum StateV1 {
    Open,
    PeerClosed,
    Failed(u8),
}

#[derive(Serialize, Deserialize)]
struct QueuedV1<'a> {
    packet_type: u16,
    transaction_id: u64,
    completion_requested: bool,
    header_len: u32,
    #[serde(borrow, with = "serde_bytes_borrowed")]
    bytes: &'a [u8],
}

/// `&[u8]` as postcard's byte string (serde's `serialize_bytes` / borrowed bytes), not as
/// a sequence of `u8`.
mod serde_bytes_borrowed {
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(b: &&[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<&'de [u8], D::Error> {
        <&[u8] as serde::Deserialize>::deserialize(d)
    }
}

fn duration(d: Duration) -> (u64, u32) {
    (d.as_secs(), d.subsec_nanos())
}

fn from_duration((secs, nanos): (u64, u32)) -> Result<Duration, SavedStateError> {
    if nanos >= 1_000_000_000 {
        return Err(SavedStateError::Malformed(
            "a duration's nanoseconds are past a second",
        ));
    }
    Ok(Duration::new(secs, nanos))
}

fn kind_code(k: FailureKind) -> u8 {
    match k {
        FailureKind::Ring => 0,
        FailureKind::Protocol => 1,
        FailureKind::Doorbell => 2,
        FailureKind::Frame => 3,
        FailureKind::Io => 4,
        FailureKind::Authentication => 5,
    }
}

fn kind_from(code: u8) -> Result<FailureKind, SavedStateError> {
    Ok(match code {
        0 => FailureKind::Ring,
        1 => FailureKind::Protocol,
        2 => FailureKind::Doorbell,
        3 => FailureKind::Frame,
        4 => FailureKind::Io,
        5 => FailureKind::Authentication,
        _ => return Err(SavedStateError::Malformed("an unknown failure kind")),
    })
}

fn postcard_error(e: postcard::Error) -> SavedStateError {
    match e {
        postcard::Error::DeserializeUnexpectedEnd => SavedStateError::Truncated,
        postcard::Error::DeserializeBadBool => SavedStateError::Malformed("a bool not 0 or 1"),
        postcard::Error::DeserializeBadVarint => {
            SavedStateError::Malformed("an integer does not fit its type")
        }
        postcard::Error::DeserializeBadEnum => SavedStateError::Malformed("an unknown enum tag"),
        postcard::Error::DeserializeBadOption => {
            SavedStateError::Malformed("an option tag not 0 or 1")
        }
        _ => SavedStateError::Malformed("a value does not decode"),
    }
}

/// Reads one `T` from the front of `input`, moving `input` past it.
fn take<'a, T: Deserialize<'a>>(input: &mut &'a [u8]) -> Result<T, SavedStateError> {
    let (value, rest) = postcard::take_from_bytes(input).map_err(postcard_error)?;
    *input = rest;
    Ok(value)
}

/// Appends `value` to `out` in postcard's form.
fn put<T: Serialize>(out: &mut Vec<u8>, value: &T) {
    // Writing to a growable vector fails only when the allocator does, which aborts
    // first; every type here serializes.
    if let Ok(grown) = postcard::to_extend(value, core::mem::take(out)) {
        *out = grown;
    }
}

impl SavedEndpoint {
    /// The byte form of this state, in the newest version ([`SAVED_STATE_VERSION`]): what
    /// a process hands its successor. Documented in the crate's `docs/SAVED-STATE.md`.
    ///
    /// ```
    /// use vmlink_channel::{Config, Endpoint, SavedEndpoint, Wait, in_process_channel_pair};
    ///
    /// let (a, b) = in_process_channel_pair(4096, Config::default())?;
    /// b.send(b"for a's successor", Wait::Now)?;
    /// let mut buf = [0u8; 64];
    /// let (saved, tx, rx, doorbell) = a.save();
    /// let bytes = saved.to_bytes();
    /// // ... the bytes and the links travel to a successor ...
    /// let saved = SavedEndpoint::from_bytes(&bytes).expect("a state this code wrote");
    /// let a = Endpoint::restore(tx, rx, doorbell, saved.config(), &saved)?;
    /// a.recv(&mut buf, Wait::Now)?;
    /// assert_eq!(&buf[..17], b"for a's successor");
    /// # Ok::<(), vmlink_channel::ChannelError>(())
    /// ```
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(256 + self.queued.iter().map(|(_, b)| b.len() + 32).sum::<usize>());
        out.extend_from_slice(&SAVED_STATE_MAGIC);
        out.extend_from_slice(&SAVED_STATE_VERSION.to_le_bytes());
        let c = &self.config;
        put(
            &mut out,
            &ConfigV1 {
                spin_iterations: c.spin_iterations,
                spin_before_sleep: duration(c.spin_before_sleep),
                space_recheck: duration(c.space_recheck),
                queue_depth: c.queue_depth as u64,
                queue_bytes: c.queue_bytes as u64,
                gpa_page_limit: c.gpa_page_limit,
            },
        );
        for &(generation, slot) in &self.transactions {
            let state = match slot {
                SavedSlot::Free => 0,
                SavedSlot::Polled => 1,
                SavedSlot::Abandoned => 2,
            };
            put(&mut out, &SlotV1 { generation, state });
        }
        put(&mut out, &CountersV1::from(self.counters));
        let state = match (self.failure, self.peer_closed) {
            (Some(cause), _) => StateV1::Failed(kind_code(cause.kind())),
            (None, true) => StateV1::PeerClosed,
            (None, false) => StateV1::Open,
        };
        put(&mut out, &state);
        // A queue holds at most `queue_depth` packets, far below u32::MAX; the byte form
        // keeps the count a u32 so that a reader's bound is fixed.
        put(&mut out, &(self.queued.len() as u32));
        for (meta, bytes) in &self.queued {
            put(
                &mut out,
                &QueuedV1 {
                    packet_type: meta.packet_type.raw(),
                    transaction_id: meta.transaction_id,
                    completion_requested: meta.completion_requested,
                    header_len: meta.header_len as u32,
                    bytes,
                },
            );
        }
        out
    }

    /// Decodes a byte form written by [`to_bytes`](Self::to_bytes) of this version or an
    /// older one. Hostile input is refused with a [`SavedStateError`], never a panic;
    /// whether the state fits the endpoint it is restored into is
    /// [`Endpoint::restore`](super::Endpoint::restore)'s to check.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SavedStateError> {
        let Some(rest) = bytes.strip_prefix(&SAVED_STATE_MAGIC) else {
            return Err(SavedStateError::NotSavedState);
        };
        let Some((version, mut input)) = rest.split_first_chunk::<2>() else {
            return Err(SavedStateError::Truncated);
        };
        match u16::from_le_bytes(*version) {
            0 => Err(SavedStateError::UnknownVersion(0)),
            1 => {
                let saved = decode_v1(&mut input)?;
                if !input.is_empty() {
                    return Err(SavedStateError::TrailingBytes(input.len()));
                }
                Ok(saved)
            }
            found => Err(SavedStateError::NewerVersion {
                found,
                supported: SAVED_STATE_VERSION,
            }),
        }
    }
}

fn decode_v1(input: &mut &[u8]) -> Result<SavedEndpoint, SavedStateError> {
    let c: ConfigV1 = take(input)?;
    if c.queue_bytes > MAX_QUEUE_BYTES {
        return Err(SavedStateError::Malformed(
            "a queue of more bytes than a saved state may ask for",
        ));
    }
    if c.queue_depth > MAX_QUEUE_DEPTH {
        return Err(SavedStateError::Malformed(
            "a queue deeper than a saved state may ask for",
        ));
    }
    // Both queue bounds checked above, far below usize::MAX on every target with an
    // allocator.
    let config = Config {
        spin_iterations: c.spin_iterations,
        spin_before_sleep: from_duration(c.spin_before_sleep)?,
        space_recheck: from_duration(c.space_recheck)?,
        queue_depth: c.queue_depth as usize,
        queue_bytes: c.queue_bytes as usize,
        gpa_page_limit: c.gpa_page_limit,
    };

    let mut transactions = [(0u32, SavedSlot::Free); MAX_TRANSACTIONS];
    for slot in &mut transactions {
        let s: SlotV1 = take(input)?;
        let state = match s.state {
            0 => SavedSlot::Free,
            1 => SavedSlot::Polled,
            2 => SavedSlot::Abandoned,
            _ => return Err(SavedStateError::Malformed("an unknown transaction state")),
        };
        *slot = (s.generation, state);
    }

    let counters = Counters::from(take::<CountersV1>(input)?);

    let (failure, peer_closed) = match take::<StateV1>(input)? {
        StateV1::Open => (None, false),
        StateV1::PeerClosed => (None, true),
        StateV1::Failed(k) => (Some(FailureCause::Inherited(kind_from(k)?)), false),
    };

    let count: u32 = take(input)?;
    if u64::from(count) > c.queue_depth {
        return Err(SavedStateError::Malformed(
            "more queued packets than the saved queue holds",
        ));
    }
    // Grown as packets are read, never reserved from the count.
    let mut queued = Vec::new();
    let mut total = 0u64;
    for _ in 0..count {
        let q: QueuedV1<'_> = take(input)?;
        let packet_type = PacketType::from_raw(q.packet_type).ok_or(SavedStateError::Malformed(
            "a queued packet of an unknown type",
        ))?;
        let header_len = q.header_len as usize;
        if header_len > q.bytes.len() {
            return Err(SavedStateError::Malformed(
                "a queued packet's extra header is longer than its bytes",
            ));
        }
        total += q.bytes.len() as u64;
        if total > c.queue_bytes {
            return Err(SavedStateError::Malformed(
                "more queued bytes than the saved queue holds",
            ));
        }
        let meta = Received {
            packet_type,
            transaction_id: q.transaction_id,
            completion_requested: q.completion_requested,
            header_len,
            payload_len: q.bytes.len() - header_len,
        };
        queued.push((meta, q.bytes.to_vec()));
    }
    Ok(SavedEndpoint {
        transactions,
        queued,
        counters,
        failure,
        peer_closed,
        config,
    })
}
