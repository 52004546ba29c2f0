//! Sub-channel negotiation over the primary channel: the guest asks, the host offers,
//! either side may close one.
//!
//! The messages are in-band packets on the primary channel, beside its own traffic; each
//! starts with a `u32` kind no other message of the channel may use. Little-endian:
//!
//! | message | sent as | bytes |
//! | --- | --- | --- |
//! | request | guest → host, in-band, completion requested | kind [`REQUEST`] u32; count u32 (1 ..= [`MAX_SUB_CHANNELS`]); pages per channel u32; guest→host ring pages u32; then count × pages-per-channel u64 page numbers |
//! | offer | host → guest, the request's completion | kind [`OFFER`] u32; count u32 (the request's); offered u32; reserved u32 (0); then per asked sub-channel {status u32, GSI u32, doorbell MMIO address u64} |
//! | close | either way, in-band, completion optional | kind [`CLOSE`] u32; channel u32 (1 ..= 63) |
//!
//! - **The guest asks** for `count` sub-channels and allocates their rings, as it allocated
//!   the primary's: each sub-channel's pages are its own page list (its outgoing ring
//!   first, a control page first in each ring, the shape the same for every sub-channel),
//!   sub-channel `i` taking the `i`-th list. The guest initialises every control page
//!   before it sends the request.
//! - **The host offers** what it allows, in the request's completion: one entry per asked
//!   sub-channel, in order, with its [`Status`] and, when offered, where its doorbell is
//!   (the MMIO address the guest writes, the GSI the host raises). It validates each page
//!   list ([`RingPages::new`](crate::RingPages::new)) and checks it and the doorbell
//!   against the primary and the sub-channels offered before it
//!   ([`check_setups`](crate::check_setups)); a sub-channel that fails a check is refused
//!   with a status and takes no other down. The host registers the doorbells of the
//!   offered sub-channels before it sends the offer, so the guest may ring them once it
//!   has read it. Both sides then attach: sub-channel `i` is position `i` of each side's
//!   [`ChannelSet`](vmlink_channel::ChannelSet).
//! - **Either side closes** a sub-channel with a close message on the primary. The closer
//!   stops using the sub-channel when it sends it; the other side receives what was
//!   committed before the close and then sees the sub-channel closed (on the host,
//!   [`KvmDoorbell::close`](crate::KvmDoorbell::close) on its doorbell makes the endpoint
//!   report `PeerClosed`). A close that asks for a completion is answered (a close message
//!   naming the same channel, as the completion's payload) once the receiver no longer
//!   touches the sub-channel's rings: only then may the guest reuse the pages of a
//!   sub-channel it closed. Closing a sub-channel leaves the primary and the other
//!   sub-channels open; the primary is never closed this way.
//!
//! Every rule is checked when a message is parsed ([`parse`]); a broken one is a typed
//! [`WireError`]. A payload may carry up to 7 bytes of padding after the message.

use crate::set::MAX_CHANNELS;

/// Kind of the guest's request for sub-channels.
pub const REQUEST: u32 = 0x7362_0001;
/// Kind of the host's offer (the request's completion).
pub const OFFER: u32 = 0x7362_0002;
/// Kind of a close message (and of its completion).
pub const CLOSE: u32 = 0x7362_0003;
/// The most sub-channels a request may ask for (a set holds the primary and these).
pub const MAX_SUB_CHANNELS: usize = MAX_CHANNELS - 1;

const REQUEST_HEADER: usize = 16;
const OFFER_HEADER: usize = 16;
const OFFER_ENTRY: usize = 16;
const CLOSE_LEN: usize = 8;

/// A negotiation message could not be parsed or encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The payload is shorter than its message.
    #[error("the message needs {need} bytes, the payload has {len}")]
    Short {
        /// Bytes the message needs.
        need: usize,
        /// Bytes in the payload.
        len: usize,
    },
    /// More than 7 bytes follow the message.
    #[error("the payload has {len} bytes, {need} of message and more than padding")]
    TrailingBytes {
        /// Bytes the message takes.
        need: usize,
        /// Bytes in the payload.
        len: usize,
    },
    /// The kind is none of the negotiation's.
    #[error("unknown message kind {0:#x}")]
    UnknownKind(u32),
    /// A count of sub-channels out of 1 ..= [`MAX_SUB_CHANNELS`].
    #[error("{0} sub-channels (1..={MAX_SUB_CHANNELS})")]
    BadCount(u32),
    /// A request's ring shape cannot hold two rings (each a control page and a data page).
    #[error(
        "{pages_per_channel} pages per channel cannot hold an outgoing ring of {guest_to_host} pages and an incoming ring"
    )]
    BadShape {
        /// Pages per sub-channel.
        pages_per_channel: u32,
        /// Pages of the guest's outgoing ring.
        guest_to_host: u32,
    },
    /// An offer's `offered` does not match its entries, or a reserved word is not zero.
    #[error("the offer says {offered} offered, its entries {entries}")]
    BadOffer {
        /// The offer's own count.
        offered: u32,
        /// Entries with status [`Status::Offered`].
        entries: u32,
    },
    /// A status value no version defines.
    #[error("unknown offer status {0}")]
    UnknownStatus(u32),
    /// A close names channel 0 (the primary) or one past the set.
    #[error("a close names channel {0} (sub-channels are 1..={MAX_SUB_CHANNELS})")]
    BadChannel(u32),
    /// The output buffer is too small for the message.
    #[error("the message takes {need} bytes, the buffer has {len}")]
    BufferTooSmall {
        /// Bytes the message takes.
        need: usize,
        /// Bytes in the buffer.
        len: usize,
    },
}

/// What the host says of one asked sub-channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// Offered: attach it.
    Offered,
    /// Not offered: past what the host allows.
    NotOffered,
    /// Refused: its page list failed [`RingPages::new`](crate::RingPages::new)'s checks.
    BadPages,
    /// Refused: its pages are another channel's.
    SharedPages,
    /// Refused: the host could not make or register its doorbell.
    NoDoorbell,
    /// Refused: its control pages are not initialised as a new ring's.
    BadRings,
}

impl Status {
    /// The value on the wire.
    pub fn to_wire(self) -> u32 {
        match self {
            Self::Offered => 0,
            Self::NotOffered => 1,
            Self::BadPages => 2,
            Self::SharedPages => 3,
            Self::NoDoorbell => 4,
            Self::BadRings => 5,
        }
    }

    /// The status a wire value names.
    pub fn from_wire(value: u32) -> Result<Self, WireError> {
        Ok(match value {
            0 => Self::Offered,
            1 => Self::NotOffered,
            2 => Self::BadPages,
            3 => Self::SharedPages,
            4 => Self::NoDoorbell,
            5 => Self::BadRings,
            other => return Err(WireError::UnknownStatus(other)),
        })
    }
}

/// One entry of an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfferEntry {
    /// Offered or why not.
    pub status: Status,
    /// The GSI the host raises for it (0 unless offered).
    pub gsi: u32,
    /// The MMIO address the guest writes to ring its doorbell (0 unless offered).
    pub doorbell: u64,
}

impl OfferEntry {
    /// An entry for a sub-channel not offered, with why.
    pub fn refused(status: Status) -> Self {
        Self {
            status,
            gsi: 0,
            doorbell: 0,
        }
    }
}

/// A parsed request: `count` sub-channels, each over a page list of the same shape.
/// Borrows the payload (a private copy: see the ring's read-once rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    count: u32,
    pages_per_channel: u32,
    guest_to_host: u32,
    pages: &'a [u8],
}

impl Request<'_> {
    /// Sub-channels asked for.
    pub fn count(&self) -> usize {
        self.count as usize
    }

    /// Pages of each sub-channel's outgoing (guest→host) ring, control page included: the
    /// `guest_to_host` argument of [`RingPages::new`](crate::RingPages::new).
    pub fn guest_to_host(&self) -> usize {
        self.guest_to_host as usize
    }

    /// The page list of sub-channel `channel` (1 ..= [`count`](Self::count)), or `None`.
    pub fn pages(&self, channel: usize) -> Option<Vec<u64>> {
        if channel == 0 || channel > self.count() {
            return None;
        }
        let per = self.pages_per_channel as usize;
        let start = (channel - 1) * per * 8;
        Some(
            self.pages[start..start + per * 8]
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect(),
        )
    }
}

/// A parsed offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer<'a> {
    offered: u32,
    entries: &'a [u8],
}

impl Offer<'_> {
    /// Sub-channels offered.
    pub fn offered(&self) -> usize {
        self.offered as usize
    }

    /// The entries, one per asked sub-channel, in order (sub-channel 1 first).
    pub fn entries(&self) -> impl Iterator<Item = OfferEntry> + '_ {
        self.entries.chunks_exact(OFFER_ENTRY).map(|e| OfferEntry {
            // Validated when parsed.
            status: Status::from_wire(word(e, 0)).unwrap_or(Status::NotOffered),
            gsi: word(e, 4),
            doorbell: u64::from_le_bytes(e[8..16].try_into().unwrap_or_default()),
        })
    }
}

/// A negotiation message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// The guest asks for sub-channels.
    Request(Request<'a>),
    /// The host's offer.
    Offer(Offer<'a>),
    /// A close of sub-channel `channel` (or, as a completion, its answer).
    Close {
        /// The sub-channel (1 ..= [`MAX_SUB_CHANNELS`]).
        channel: u32,
    },
}

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

/// The message's length checked against the payload's: at least, and at most 7 more.
fn sized(payload: &[u8], need: usize) -> Result<(), WireError> {
    let len = payload.len();
    if len < need {
        return Err(WireError::Short { need, len });
    }
    if len - need >= 8 {
        return Err(WireError::TrailingBytes { need, len });
    }
    Ok(())
}

/// The kind of the payload's first word, if it is one of the negotiation's: a primary
/// channel's other traffic never starts with these.
pub fn is_negotiation(payload: &[u8]) -> bool {
    payload.len() >= 4 && matches!(word(payload, 0), REQUEST | OFFER | CLOSE)
}

/// Parses a negotiation message, checking every rule.
pub fn parse(payload: &[u8]) -> Result<Message<'_>, WireError> {
    sized_at_least(payload, 8)?;
    match word(payload, 0) {
        REQUEST => {
            sized_at_least(payload, REQUEST_HEADER)?;
            let count = word(payload, 4);
            let (pages_per_channel, guest_to_host) = (word(payload, 8), word(payload, 12));
            if count == 0 || count as usize > MAX_SUB_CHANNELS {
                return Err(WireError::BadCount(count));
            }
            if guest_to_host < 2 || pages_per_channel < guest_to_host.saturating_add(2) {
                return Err(WireError::BadShape {
                    pages_per_channel,
                    guest_to_host,
                });
            }
            let bytes = (count as usize)
                .checked_mul(pages_per_channel as usize)
                .and_then(|n| n.checked_mul(8))
                .and_then(|n| n.checked_add(REQUEST_HEADER))
                .ok_or(WireError::Short {
                    need: usize::MAX,
                    len: payload.len(),
                })?;
            sized(payload, bytes)?;
            Ok(Message::Request(Request {
                count,
                pages_per_channel,
                guest_to_host,
                pages: &payload[REQUEST_HEADER..bytes],
            }))
        }
        OFFER => {
            sized_at_least(payload, OFFER_HEADER)?;
            let count = word(payload, 4);
            if count == 0 || count as usize > MAX_SUB_CHANNELS {
                return Err(WireError::BadCount(count));
            }
            let offered = word(payload, 8);
            let bytes = OFFER_HEADER + count as usize * OFFER_ENTRY;
            sized(payload, bytes)?;
            let entries = &payload[OFFER_HEADER..bytes];
            let mut n = 0u32;
            for e in entries.chunks_exact(OFFER_ENTRY) {
                if Status::from_wire(word(e, 0))? == Status::Offered {
                    n += 1;
                }
            }
            if n != offered || word(payload, 12) != 0 {
                return Err(WireError::BadOffer {
                    offered,
                    entries: n,
                });
            }
            Ok(Message::Offer(Offer { offered, entries }))
        }
        CLOSE => {
            sized(payload, CLOSE_LEN)?;
            let channel = word(payload, 4);
            if channel == 0 || channel as usize > MAX_SUB_CHANNELS {
                return Err(WireError::BadChannel(channel));
            }
            Ok(Message::Close { channel })
        }
        other => Err(WireError::UnknownKind(other)),
    }
}

fn sized_at_least(payload: &[u8], need: usize) -> Result<(), WireError> {
    if payload.len() < need {
        return Err(WireError::Short {
            need,
            len: payload.len(),
        });
    }
    Ok(())
}

fn room(out: &[u8], need: usize) -> Result<(), WireError> {
    if out.len() < need {
        return Err(WireError::BufferTooSmall {
            need,
            len: out.len(),
        });
    }
    Ok(())
}

/// Encodes a request for `pages.len()` / `pages_per_channel` sub-channels (`pages`: their
/// page lists one after another) into `out`; returns its length.
pub fn encode_request(
    pages: &[u64],
    pages_per_channel: usize,
    guest_to_host: usize,
    out: &mut [u8],
) -> Result<usize, WireError> {
    let shape = WireError::BadShape {
        pages_per_channel: u32::try_from(pages_per_channel).unwrap_or(u32::MAX),
        guest_to_host: u32::try_from(guest_to_host).unwrap_or(u32::MAX),
    };
    if guest_to_host < 2 || pages_per_channel < guest_to_host + 2 {
        return Err(shape);
    }
    let count = pages.len() / pages_per_channel;
    if count == 0 || count > MAX_SUB_CHANNELS || !pages.len().is_multiple_of(pages_per_channel) {
        return Err(WireError::BadCount(
            u32::try_from(count).unwrap_or(u32::MAX),
        ));
    }
    let need = REQUEST_HEADER + pages.len() * 8;
    room(out, need)?;
    let words = [
        REQUEST,
        count as u32,
        pages_per_channel as u32,
        guest_to_host as u32,
    ];
    for (i, w) in words.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
    }
    for (i, p) in pages.iter().enumerate() {
        let at = REQUEST_HEADER + 8 * i;
        out[at..at + 8].copy_from_slice(&p.to_le_bytes());
    }
    Ok(need)
}

/// Encodes an offer (one entry per asked sub-channel, in order) into `out`; returns its
/// length.
pub fn encode_offer(entries: &[OfferEntry], out: &mut [u8]) -> Result<usize, WireError> {
    if entries.is_empty() || entries.len() > MAX_SUB_CHANNELS {
        return Err(WireError::BadCount(
            u32::try_from(entries.len()).unwrap_or(u32::MAX),
        ));
    }
    let need = OFFER_HEADER + entries.len() * OFFER_ENTRY;
    room(out, need)?;
    let offered = entries
        .iter()
        .filter(|e| e.status == Status::Offered)
        .count() as u32;
    for (i, w) in [OFFER, entries.len() as u32, offered, 0].iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
    }
    for (i, e) in entries.iter().enumerate() {
        let at = OFFER_HEADER + OFFER_ENTRY * i;
        out[at..at + 4].copy_from_slice(&e.status.to_wire().to_le_bytes());
        out[at + 4..at + 8].copy_from_slice(&e.gsi.to_le_bytes());
        out[at + 8..at + 16].copy_from_slice(&e.doorbell.to_le_bytes());
    }
    Ok(need)
}

/// Encodes a close of sub-channel `channel` (or its completion) into `out`; returns its
/// length.
pub fn encode_close(channel: u32, out: &mut [u8]) -> Result<usize, WireError> {
    if channel == 0 || channel as usize > MAX_SUB_CHANNELS {
        return Err(WireError::BadChannel(channel));
    }
    room(out, CLOSE_LEN)?;
    out[0..4].copy_from_slice(&CLOSE.to_le_bytes());
    out[4..8].copy_from_slice(&channel.to_le_bytes());
    Ok(CLOSE_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_checks_its_shape() {
        let pages: Vec<u64> = (0..20).map(|i| 0x300 + i).collect();
        let mut out = [0u8; 512];
        let n = encode_request(&pages, 10, 5, &mut out).unwrap();
        assert_eq!(n, 16 + 160);
        let Ok(Message::Request(r)) = parse(&out[..n]) else {
            panic!("a request")
        };
        assert_eq!((r.count(), r.guest_to_host()), (2, 5));
        assert_eq!(r.pages(1).unwrap(), pages[..10]);
        assert_eq!(r.pages(2).unwrap(), pages[10..]);
        assert_eq!((r.pages(0), r.pages(3)), (None, None));
        // Padding is allowed, more is not; short is refused.
        assert!(parse(&out[..n + 7]).is_ok());
        assert_eq!(
            parse(&out[..n + 8]),
            Err(WireError::TrailingBytes {
                need: n,
                len: n + 8
            })
        );
        assert_eq!(
            parse(&out[..n - 8]),
            Err(WireError::Short {
                need: n,
                len: n - 8
            })
        );
        // A shape that cannot hold two rings, a count of 0 or too many.
        let mut bad = out;
        bad[12..16].copy_from_slice(&9u32.to_le_bytes());
        assert!(matches!(parse(&bad[..n]), Err(WireError::BadShape { .. })));
        for count in [0u32, 64, u32::MAX] {
            bad = out;
            bad[4..8].copy_from_slice(&count.to_le_bytes());
            assert_eq!(parse(&bad[..n]), Err(WireError::BadCount(count)));
        }
        // A huge shape overflows nothing.
        bad = out;
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(parse(&bad[..n]), Err(WireError::Short { .. })));
        assert!(matches!(
            encode_request(&pages, 10, 5, &mut [0u8; 100]),
            Err(WireError::BufferTooSmall { .. })
        ));
        assert!(matches!(
            encode_request(&pages[..15], 10, 5, &mut out),
            Err(WireError::BadCount(_))
        ));
    }

    #[test]
    fn offer_and_close_round_trip() {
        let entries = [
            OfferEntry {
                status: Status::Offered,
                gsi: 6,
                doorbell: 0x3000_2000,
            },
            OfferEntry::refused(Status::SharedPages),
            OfferEntry::refused(Status::NotOffered),
        ];
        let mut out = [0u8; 128];
        let n = encode_offer(&entries, &mut out).unwrap();
        let Ok(Message::Offer(o)) = parse(&out[..n]) else {
            panic!("an offer")
        };
        assert_eq!(o.offered(), 1);
        assert_eq!(o.entries().collect::<Vec<_>>(), entries);
        // The count of offered entries must agree; statuses must be known.
        let mut bad = out;
        bad[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(
            parse(&bad[..n]),
            Err(WireError::BadOffer {
                offered: 2,
                entries: 1
            })
        );
        bad = out;
        bad[16..20].copy_from_slice(&77u32.to_le_bytes());
        assert_eq!(parse(&bad[..n]), Err(WireError::UnknownStatus(77)));

        let n = encode_close(2, &mut out).unwrap();
        assert_eq!(parse(&out[..n]), Ok(Message::Close { channel: 2 }));
        assert!(is_negotiation(&out[..n]));
        assert_eq!(encode_close(0, &mut out), Err(WireError::BadChannel(0)));
        out[4..8].copy_from_slice(&64u32.to_le_bytes());
        assert_eq!(parse(&out[..8]), Err(WireError::BadChannel(64)));
        assert_eq!(
            parse(&[1, 0, 0, 0, 0, 0, 0, 0]),
            Err(WireError::UnknownKind(1))
        );
        assert!(!is_negotiation(&[1, 0, 0, 0]));
        assert!(matches!(parse(&[1, 2]), Err(WireError::Short { .. })));
    }
}
