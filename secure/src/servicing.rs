//! Servicing a secure channel: taking the secure layer off a live endpoint so that the
//! plain endpoint below can be saved and handed to a successor (another process, with
//! `vmlink-shm`'s hand-over), and putting it back on there.
//!
//! The keys travel beside the plain endpoint's saved state as [`SavedKeys`]: each
//! direction's key, counter and rekey progress. The successor's sending half starts a new
//! key epoch before its first packet (a fresh random salt, see [`crate::link`]), so nothing
//! the predecessor sealed under these keys — sent, or thrown away unsent — is ever sealed
//! again under the same nonce. Its receiving half goes on from the first frame the
//! predecessor had not consumed.
//!
//! The saved keys are secret: whoever reads them can read and forge the channel's
//! traffic. Hand them only to a successor this process trusts as itself (vmlink-shm's
//! hand-over admits only the same user), and never write them to disk.
//!
//! ```
//! use std::thread;
//! use vmlink_channel::{Config, Wait, in_process_channel_pair};
//! use vmlink_secure::servicing::{SavedKeys, put_on, take_off};
//! use vmlink_secure::{SecureConfig, establish_pair};
//!
//! let (a, b) = in_process_channel_pair(16 * 4096, Config::default())?;
//! let (guest, host) = establish_pair(a, b, &SecureConfig::default())?;
//! guest.endpoint.send(b"before", Wait::Now)?;
//!
//! // The host's predecessor: the layer off, the keys out (a hand-over sends both).
//! let (plain, keys) = take_off(host.endpoint)?;
//! let bytes = keys.to_bytes();
//!
//! // The successor: the layer back on, from the bytes.
//! let host = put_on(plain, &SavedKeys::from_bytes(&bytes[..])?)?;
//! let mut buf = [0u8; 64];
//! assert_eq!(&host.recv(&mut buf, Wait::Now)?.payload(&buf)[..6], b"before");
//! host.send(b"after", Wait::Now)?;
//! assert_eq!(&guest.endpoint.recv(&mut buf, Wait::Now)?.payload(&buf)[..5], b"after");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use vmlink_channel::{ChannelError, Doorbell, Endpoint, PacketRx, PacketTx};
use zeroize::Zeroizing;

use crate::cipher::{KEY_STATE_LEN, KeyState};
use crate::handshake::{SecureEndpoint, restore_layer};

/// What [`SavedKeys::to_bytes`] starts with.
pub const SAVED_KEYS_MAGIC: &[u8; 8] = b"VMLKSKEY";

/// The version of the saved keys' form this code writes (and the newest it reads).
pub const SAVED_KEYS_VERSION: u16 = 1;

/// Bytes of the saved keys' form: the magic, the version (`u16`), six zero bytes, then the
/// sending and the receiving direction ([`KeyState::to_bytes`] each).
pub const SAVED_KEYS_LEN: usize = 16 + 2 * KEY_STATE_LEN;

/// Why saved keys could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SavedKeysError {
    /// Not [`SAVED_KEYS_LEN`] bytes.
    #[error("saved keys are {expected} bytes, not {len}")]
    Length {
        /// The bytes given.
        len: usize,
        /// The bytes expected.
        expected: usize,
    },
    /// Not saved keys at all.
    #[error("not vmlink-secure saved keys (no VMLKSKEY magic)")]
    Magic,
    /// Written by newer code than this.
    #[error("saved keys of version {version}; this code reads up to {SAVED_KEYS_VERSION}")]
    Newer {
        /// The version found.
        version: u16,
    },
    /// A value no live state can have.
    #[error("saved keys: {0}")]
    Invalid(&'static str),
}

/// Both directions' keys and progress, as a successor needs them.
#[derive(Debug, Clone)]
pub struct SavedKeys {
    /// The sending direction: the key and counter the peer expects next.
    pub tx: KeyState,
    /// The receiving direction: the key and counter of the first frame not consumed.
    pub rx: KeyState,
}

impl SavedKeys {
    /// The keys as bytes ([`SAVED_KEYS_LEN`]), in memory zeroed when dropped.
    pub fn to_bytes(&self) -> Zeroizing<[u8; SAVED_KEYS_LEN]> {
        let mut out = Zeroizing::new([0u8; SAVED_KEYS_LEN]);
        out[..8].copy_from_slice(SAVED_KEYS_MAGIC);
        out[8..10].copy_from_slice(&SAVED_KEYS_VERSION.to_le_bytes());
        out[16..16 + KEY_STATE_LEN].copy_from_slice(&self.tx.to_bytes()[..]);
        out[16 + KEY_STATE_LEN..].copy_from_slice(&self.rx.to_bytes()[..]);
        out
    }

    /// Reads [`to_bytes`](Self::to_bytes)'s form; anything else is a typed error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SavedKeysError> {
        let bytes: &[u8; SAVED_KEYS_LEN] =
            bytes.try_into().map_err(|_| SavedKeysError::Length {
                len: bytes.len(),
                expected: SAVED_KEYS_LEN,
            })?;
        if &bytes[..8] != SAVED_KEYS_MAGIC {
            return Err(SavedKeysError::Magic);
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version > SAVED_KEYS_VERSION {
            return Err(SavedKeysError::Newer { version });
        }
        if version == 0 || bytes[10..16].iter().any(|&b| b != 0) {
            return Err(SavedKeysError::Invalid("a malformed header"));
        }
        let direction = |at: usize| {
            let mut d = Zeroizing::new([0u8; KEY_STATE_LEN]);
            d.copy_from_slice(&bytes[at..at + KEY_STATE_LEN]);
            KeyState::from_bytes(&d).map_err(SavedKeysError::Invalid)
        };
        Ok(Self {
            tx: direction(16)?,
            rx: direction(16 + KEY_STATE_LEN)?,
        })
    }
}

/// Takes the secure layer off `endpoint`: the plain endpoint over the same links, with
/// the same transactions, queued packets and counters (ready for a hand-over's save), and
/// the keys a successor puts back on with [`put_on`]. Packets pushed but not committed
/// are dropped, as any save drops them.
#[allow(clippy::type_complexity)]
pub fn take_off<T, R, D>(
    endpoint: SecureEndpoint<T, R, D>,
) -> Result<(Endpoint<T, R, D>, SavedKeys), ChannelError>
where
    T: PacketTx,
    R: PacketRx,
    D: Doorbell,
{
    let (saved, tx, rx, doorbell) = endpoint.save();
    let (tx, tx_key) = tx.into_parts();
    let (rx, rx_key) = rx.into_parts();
    let plain = Endpoint::restore(tx, rx, doorbell, saved.config(), &saved)?;
    Ok((
        plain,
        SavedKeys {
            tx: tx_key,
            rx: rx_key,
        },
    ))
}

/// Puts the secure layer back on a plain endpoint (one [`take_off`] made, or a hand-over
/// delivered) with `keys`: its first packet out is a new key epoch.
pub fn put_on<T, R, D>(
    plain: Endpoint<T, R, D>,
    keys: &SavedKeys,
) -> Result<SecureEndpoint<T, R, D>, ChannelError>
where
    T: PacketTx,
    R: PacketRx,
    D: Doorbell,
{
    let (saved, tx, rx, doorbell) = plain.save();
    let (tx, rx) = restore_layer(tx, rx, keys.tx.clone(), keys.rx.clone());
    Endpoint::restore(tx, rx, doorbell, saved.config(), &saved)
}
