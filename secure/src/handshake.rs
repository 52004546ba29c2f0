//! The Noise handshake over a plain endpoint, then the secure layer over its links.

use alloc::format;
use alloc::string::String;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;
use core::time::Duration;
#[cfg(feature = "std")]
use std::time::Instant;

use snow::params::NoiseParams;
#[cfg(feature = "std")]
use vmlink_channel::Wait;
use vmlink_channel::{AsyncDoorbell, ChannelError, Doorbell, Endpoint, PacketRx, PacketTx};
use zeroize::{Zeroize, Zeroizing};

use crate::cipher::{Cipher, KEY_LEN, KeyState, RekeyLimits};
use crate::keys::{AuthorizedKeys, Keypair, PublicKey};
use crate::link::{SecureRx, SecureTx};

/// The largest handshake message Noise allows.
const MAX_NOISE_MESSAGE: usize = 65_535;

/// What a handshake message travels as: a `u32` length (little-endian), then the message
/// (payloads are padded to 8 bytes on a ring, so the length says where it ends).
const LENGTH_LEN: usize = 4;

/// What every handshake's prologue starts with; the protocol name follows.
const PROLOGUE: &str = "vmlink-secure v1 ";

/// The handshake patterns vmlink offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Pattern {
    /// `XX`: both sides have static keys and learn each other's during the handshake,
    /// each checking the other's against its authorized keys. Three messages; neither
    /// side needs the other's key in advance, and both identities are hidden from anyone
    /// watching the memory.
    #[default]
    XX,
    /// `IK`: the initiator (the guest, usually) knows the responder's (host's) static key
    /// in advance and sends its own in the first message. Two messages, so one round trip
    /// less than `XX`; the initiator's identity is hidden, and it authenticates the
    /// responder from the first reply.
    IK,
    /// `NNpsk0`: no static keys, a 32-byte pre-shared key mixed in from the first message.
    /// For a guest and host provisioned with one shared secret rather than key pairs.
    NNpsk0,
}

impl Pattern {
    fn noise_name(self) -> &'static str {
        match self {
            Pattern::XX => "XX",
            Pattern::IK => "IK",
            Pattern::NNpsk0 => "NNpsk0",
        }
    }
}

/// The Noise parameters of `pattern` with `cipher`: Curve25519, SHA-256.
pub(crate) fn params(pattern: Pattern, cipher: Cipher) -> NoiseParams {
    protocol_name(pattern, cipher)
        .parse()
        .expect("the patterns and ciphers offered are Noise protocol names snow knows")
}

/// The Noise protocol name, e.g. `Noise_XX_25519_ChaChaPoly_SHA256`.
pub fn protocol_name(pattern: Pattern, cipher: Cipher) -> String {
    format!(
        "Noise_{}_25519_{}_SHA256",
        pattern.noise_name(),
        cipher.noise_name()
    )
}

/// Which side of the handshake this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeRole {
    /// Sends the first message (the guest, usually).
    Initiator,
    /// Answers it (the host, usually).
    Responder,
}

/// What a side proves and accepts.
#[derive(Clone)]
pub enum Credentials {
    /// A static key pair, and the peer keys accepted (`XX` both sides; `IK`: for the
    /// initiator exactly the responder's key, for the responder the initiators').
    Static {
        /// This side's key pair.
        local: Keypair,
        /// The peer keys accepted.
        authorized: AuthorizedKeys,
    },
    /// A pre-shared key (`NNpsk0`).
    Psk(Zeroizing<[u8; KEY_LEN]>),
}

impl core::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Credentials::Static { local, authorized } => f
                .debug_struct("Static")
                .field("local", local)
                .field("authorized", &authorized.len())
                .finish(),
            Credentials::Psk(_) => f.write_str("Psk(..)"),
        }
    }
}

/// How the secure channel is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecureConfig {
    /// The handshake pattern (both sides must agree).
    pub pattern: Pattern,
    /// The transport cipher (both sides must agree).
    pub cipher: Cipher,
    /// When both sides rekey.
    pub rekey: RekeyLimits,
    /// How long the whole handshake may take.
    pub handshake_timeout: Duration,
}

impl Default for SecureConfig {
    fn default() -> Self {
        Self {
            pattern: Pattern::XX,
            cipher: Cipher::ChaChaPoly,
            rekey: RekeyLimits::default(),
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a secure channel could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecureError {
    /// The channel under the handshake failed or timed out.
    #[error("the channel failed during the handshake: {0}")]
    Channel(ChannelError),
    /// The peer closed the channel before the handshake was complete: it refused this side
    /// (a key it does not accept, another pattern or cipher) or went away. A peer says no
    /// more than that, on purpose.
    #[error(
        "the peer closed the channel during the handshake: it refused this side (a key, \
         pattern or cipher it does not accept) or left"
    )]
    PeerClosed,
    /// A handshake message did not verify or parse (garbage, a truncated message, another
    /// key or pre-shared key than the pattern expects).
    #[error("the handshake failed: {0}")]
    Handshake(String),
    /// The peer asked for another protocol (pattern or cipher) than this side's.
    #[error("the peer speaks {theirs}, this side {ours}")]
    Mismatch {
        /// This side's protocol.
        ours: String,
        /// What the peer sent (cut to 80 bytes).
        theirs: String,
    },
    /// The peer's static key is not among the authorized ones.
    #[error("the peer's key {fingerprint} is not authorized")]
    UnknownKey {
        /// The key's fingerprint.
        fingerprint: String,
    },
    /// The credentials do not fit the pattern.
    #[error("credentials: {0}")]
    Credentials(&'static str),
}

/// A secure channel over links `T` / `R`.
pub type SecureEndpoint<T, R, D> = Endpoint<SecureTx<T>, SecureRx<R>, D>;

/// A secure channel just set up, with what the handshake established.
pub struct Established<T, R, D> {
    /// The channel: every packet sealed and opened by the layer.
    pub endpoint: SecureEndpoint<T, R, D>,
    /// The peer's static key (`None` for `NNpsk0`).
    pub peer_key: Option<PublicKey>,
    /// The handshake hash, the same on both sides (for channel binding).
    pub handshake_hash: Vec<u8>,
}

impl<T, R, D> core::fmt::Debug for Established<T, R, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Established")
            .field("peer_key", &self.peer_key)
            .finish_non_exhaustive()
    }
}

impl From<ChannelError> for SecureError {
    fn from(e: ChannelError) -> Self {
        match e {
            ChannelError::Closed => SecureError::PeerClosed,
            e => SecureError::Channel(e),
        }
    }
}

/// What the responder sends first over the secure layer once it has accepted the
/// initiator: until it arrives, the initiator's handshake is not over (so an initiator
/// the responder turns away hears of it from `establish`, not from its first receive).
const READY: &[u8] = b"vmlink-secure ready";

fn noise(e: snow::Error) -> SecureError {
    SecureError::Handshake(e.to_string())
}

/// Runs the handshake over `endpoint` (fresh: nothing queued, no call in flight) as
/// `role`, then puts the secure layer over its links: what comes back seals and opens
/// every packet. The peer must run the same pattern and cipher as the other role.
#[cfg(feature = "std")]
pub fn establish<T, R, D>(
    endpoint: Endpoint<T, R, D>,
    role: HandshakeRole,
    credentials: &Credentials,
    config: &SecureConfig,
) -> Result<Established<T, R, D>, SecureError>
where
    T: PacketTx,
    R: PacketRx,
    D: Doorbell,
{
    establish_with(endpoint, role, credentials, config, None)
}

/// [`establish`], with a fixed ephemeral key for the known-answer tests.
#[cfg(feature = "std")]
fn establish_with<T, R, D>(
    endpoint: Endpoint<T, R, D>,
    role: HandshakeRole,
    credentials: &Credentials,
    config: &SecureConfig,
    fixed_ephemeral: Option<&[u8; KEY_LEN]>,
) -> Result<Established<T, R, D>, SecureError>
where
    T: PacketTx,
    R: PacketRx,
    D: Doorbell,
{
    let deadline = Wait::Until(Instant::now() + config.handshake_timeout);
    let mut hs = Noise::start(role, credentials, config, fixed_ephemeral)?;
    let mut buf = Zeroizing::new(vec![0u8; LENGTH_LEN + MAX_NOISE_MESSAGE + 8]);
    let mut payload = Zeroizing::new(vec![0u8; MAX_NOISE_MESSAGE]);
    while !hs.is_finished() {
        if let Some(n) = hs.write(&mut payload)? {
            send_message(&endpoint, &payload[..n], deadline)?;
        } else {
            let got = endpoint.recv(&mut buf, deadline)?;
            hs.read(got.payload(&buf), &mut payload)?;
        }
    }
    let (endpoint, peer_key, handshake_hash) = hs.wrap(endpoint, config)?;
    match role {
        HandshakeRole::Responder => endpoint.send(READY, deadline)?,
        HandshakeRole::Initiator => {
            let mut ready = [0u8; 32];
            let got = endpoint.recv(&mut ready, deadline)?;
            check_ready(got.payload(&ready))?;
        }
    }
    Ok(Established {
        endpoint,
        peer_key,
        handshake_hash,
    })
}

/// [`establish`] with asynchronous waits, for an endpoint whose doorbell is an
/// [`AsyncDoorbell`] (tokio's, or an embedder's without `std`): the same handshake and
/// the same secure layer. It has no deadline of its own: a caller that must not wait
/// forever for a silent peer races it against a timer (`tokio::time::timeout`, or the
/// embedder's), and dropping the future abandons the handshake.
pub async fn establish_async<T, R, D>(
    endpoint: Endpoint<T, R, D>,
    role: HandshakeRole,
    credentials: &Credentials,
    config: &SecureConfig,
) -> Result<Established<T, R, D>, SecureError>
where
    T: PacketTx,
    R: PacketRx,
    D: AsyncDoorbell,
{
    let mut hs = Noise::start(role, credentials, config, None)?;
    let mut buf = Zeroizing::new(vec![0u8; LENGTH_LEN + MAX_NOISE_MESSAGE + 8]);
    let mut payload = Zeroizing::new(vec![0u8; MAX_NOISE_MESSAGE]);
    while !hs.is_finished() {
        if let Some(n) = hs.write(&mut payload)? {
            let len = (n as u32).to_le_bytes();
            endpoint
                .send_packet_async(&vmlink_ring::OutgoingPacket::in_band(&[
                    &len,
                    &payload[..n],
                ]))
                .await?;
        } else {
            let got = endpoint.recv_async(&mut buf).await?;
            hs.read(got.payload(&buf), &mut payload)?;
        }
    }
    let (endpoint, peer_key, handshake_hash) = hs.wrap(endpoint, config)?;
    match role {
        HandshakeRole::Responder => endpoint.send_async(READY).await?,
        HandshakeRole::Initiator => {
            let mut ready = [0u8; 32];
            let got = endpoint.recv_async(&mut ready).await?;
            check_ready(got.payload(&ready))?;
        }
    }
    Ok(Established {
        endpoint,
        peer_key,
        handshake_hash,
    })
}

/// Whether the responder's first sealed packet is its ready message.
fn check_ready(got: &[u8]) -> Result<(), SecureError> {
    if got.starts_with(READY) {
        Ok(())
    } else {
        Err(SecureError::Handshake(
            "the responder's first sealed packet is not its ready message".into(),
        ))
    }
}

/// One side's handshake, whatever carries its messages: the protocol name first (the
/// initiator sends it in the clear, so a mismatch is named rather than a decryption
/// failure; the prologue binds it, so changing it fails the handshake), then Noise's
/// messages in turn.
struct Noise<'a> {
    hs: snow::HandshakeState,
    role: HandshakeRole,
    name: String,
    /// Whether the protocol name has been sent or received.
    named: bool,
    authorized: Option<&'a AuthorizedKeys>,
}

impl<'a> Noise<'a> {
    /// Checks the credentials against the pattern and builds the handshake state.
    fn start(
        role: HandshakeRole,
        credentials: &'a Credentials,
        config: &SecureConfig,
        fixed_ephemeral: Option<&[u8; KEY_LEN]>,
    ) -> Result<Self, SecureError> {
        let name = protocol_name(config.pattern, config.cipher);
        let prologue = format!("{PROLOGUE}{name}");
        let mut builder = snow::Builder::new(params(config.pattern, config.cipher))
            .prologue(prologue.as_bytes())
            .map_err(noise)?;
        let (local, authorized) = match (credentials, config.pattern) {
            (Credentials::Static { local, authorized }, Pattern::XX | Pattern::IK) => {
                (Some(local), Some(authorized))
            }
            (Credentials::Psk(_), Pattern::NNpsk0) => (None, None),
            (Credentials::Psk(_), _) => {
                return Err(SecureError::Credentials("XX and IK need a static key pair"));
            }
            (Credentials::Static { .. }, Pattern::NNpsk0) => {
                return Err(SecureError::Credentials("NNpsk0 needs a pre-shared key"));
            }
        };
        if let Some(local) = local {
            builder = builder.local_private_key(local.private()).map_err(noise)?;
        }
        let responder_key;
        if config.pattern == Pattern::IK && role == HandshakeRole::Initiator {
            let Some(authorized) = authorized.filter(|a| a.len() == 1) else {
                return Err(SecureError::Credentials(
                    "an IK initiator needs exactly one authorized key: the responder's",
                ));
            };
            responder_key = authorized.keys().next().copied();
            if let Some(k) = &responder_key {
                builder = builder.remote_public_key(&k.0).map_err(noise)?;
            }
        }
        if let Credentials::Psk(psk) = credentials {
            builder = builder.psk(0, psk).map_err(noise)?;
        }
        if let Some(e) = fixed_ephemeral {
            builder = builder.fixed_ephemeral_key_for_testing_only(e);
        }
        let hs = match role {
            HandshakeRole::Initiator => builder.build_initiator(),
            HandshakeRole::Responder => builder.build_responder(),
        }
        .map_err(noise)?;
        Ok(Self {
            hs,
            role,
            name,
            named: false,
            authorized,
        })
    }

    /// Whether the handshake's messages are all done.
    fn is_finished(&self) -> bool {
        self.named && self.hs.is_handshake_finished()
    }

    /// This side's next message into `out` (its length), or `None` when it is the peer's
    /// turn.
    fn write(&mut self, out: &mut [u8]) -> Result<Option<usize>, SecureError> {
        if !self.named {
            if self.role == HandshakeRole::Responder {
                return Ok(None);
            }
            self.named = true;
            let name = self.name.as_bytes();
            out[..name.len()].copy_from_slice(name);
            return Ok(Some(name.len()));
        }
        if !self.hs.is_my_turn() {
            return Ok(None);
        }
        self.hs.write_message(&[], out).map(Some).map_err(noise)
    }

    /// Takes the peer's next message as it arrived (its length, then its bytes), with
    /// `scratch` for the payload Noise decrypts.
    fn read(&mut self, arrived: &[u8], scratch: &mut [u8]) -> Result<(), SecureError> {
        let message = unframe(arrived)?;
        if !self.named {
            self.named = true;
            if message != self.name.as_bytes() {
                return Err(SecureError::Mismatch {
                    ours: self.name.clone(),
                    theirs: String::from_utf8_lossy(&message[..message.len().min(80)]).into_owned(),
                });
            }
            return Ok(());
        }
        self.hs.read_message(message, scratch).map_err(noise)?;
        // A peer key is judged as soon as it is known, before anything more is sent.
        check_peer(&self.hs, self.authorized)?;
        Ok(())
    }

    /// Puts the secure layer, keyed with the handshake's split, over `endpoint`'s links.
    #[allow(clippy::type_complexity)]
    fn wrap<T: PacketTx, R: PacketRx, D: Doorbell>(
        mut self,
        endpoint: Endpoint<T, R, D>,
        config: &SecureConfig,
    ) -> Result<(SecureEndpoint<T, R, D>, Option<PublicKey>, Vec<u8>), SecureError> {
        let peer_key = check_peer(&self.hs, self.authorized)?;
        let handshake_hash = self.hs.get_handshake_hash().to_vec();
        let (mut i_to_r, mut r_to_i) = self.hs.dangerously_get_raw_split();
        let (tx_key, rx_key) = match self.role {
            HandshakeRole::Initiator => (i_to_r, r_to_i),
            HandshakeRole::Responder => (r_to_i, i_to_r),
        };
        let tx_state = KeyState::new(tx_key, config.cipher, config.rekey);
        let rx_state = KeyState::new(rx_key, config.cipher, config.rekey);
        i_to_r.zeroize();
        r_to_i.zeroize();
        let (saved, tx, rx, doorbell) = endpoint.save();
        let max_frame = tx.max_packet_len();
        let endpoint = Endpoint::over(
            SecureTx::new(tx, tx_state, false),
            SecureRx::new(rx, rx_state, max_frame),
            doorbell,
            saved.config(),
        );
        Ok((endpoint, peer_key, handshake_hash))
    }
}

/// The peer's static key once the handshake has revealed it, if it is authorized.
fn check_peer(
    hs: &snow::HandshakeState,
    authorized: Option<&AuthorizedKeys>,
) -> Result<Option<PublicKey>, SecureError> {
    let Some(bytes) = hs.get_remote_static() else {
        return Ok(None);
    };
    let key = PublicKey(
        bytes
            .try_into()
            .map_err(|_| SecureError::Handshake("a remote static key of the wrong size".into()))?,
    );
    match authorized {
        Some(a) if a.find(&key).is_none() => Err(SecureError::UnknownKey {
            fingerprint: key.fingerprint(),
        }),
        _ => Ok(Some(key)),
    }
}

/// The initiator's and the responder's side of [`establish_pair`].
#[cfg(feature = "std")]
pub type EstablishedPair<T, R, D> = (Established<T, R, D>, Established<T, R, D>);

/// Both sides of a handshake over a connected pair in this process (a test, a benchmark,
/// two components of one program): `initiator` on a thread of its own, `responder` on this
/// one, each with a fresh static key pair that accepts only the other's.
#[cfg(feature = "std")]
pub fn establish_pair<T, R, D>(
    initiator: Endpoint<T, R, D>,
    responder: Endpoint<T, R, D>,
    config: &SecureConfig,
) -> Result<EstablishedPair<T, R, D>, SecureError>
where
    T: PacketTx + Send,
    R: PacketRx + Send,
    D: Doorbell + Send + Sync,
{
    let (ki, kr) = (Keypair::generate(), Keypair::generate());
    let credentials = |local: &Keypair, peer: &Keypair| Credentials::Static {
        local: local.clone(),
        authorized: AuthorizedKeys::new([peer.public()]),
    };
    let (ci, cr) = (credentials(&ki, &kr), credentials(&kr, &ki));
    std::thread::scope(|s| {
        let other = s.spawn(|| establish(initiator, HandshakeRole::Initiator, &ci, config));
        let r = establish(responder, HandshakeRole::Responder, &cr, config);
        let i = other
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        Ok((i?, r?))
    })
}

#[cfg(feature = "std")]
fn send_message<T: PacketTx, R: PacketRx, D: Doorbell>(
    endpoint: &Endpoint<T, R, D>,
    message: &[u8],
    deadline: Wait,
) -> Result<(), SecureError> {
    let len = (message.len() as u32).to_le_bytes();
    endpoint.send_packet(
        &vmlink_ring::OutgoingPacket::in_band(&[&len, message]),
        deadline,
    )?;
    Ok(())
}

/// A handshake message from what arrived: its length, then its bytes.
fn unframe(bytes: &[u8]) -> Result<&[u8], SecureError> {
    let (len, rest) = bytes
        .split_first_chunk::<LENGTH_LEN>()
        .ok_or_else(|| SecureError::Handshake("a handshake message without its length".into()))?;
    let len = u32::from_le_bytes(*len) as usize;
    if len > rest.len() || len > MAX_NOISE_MESSAGE {
        return Err(SecureError::Handshake(
            "a handshake message longer than what arrived".into(),
        ));
    }
    Ok(&rest[..len])
}

/// Wraps a restored pair of links: the sending half starts a new key epoch before its
/// first packet, so nothing sealed by a predecessor under these keys is ever repeated.
pub fn restore_layer<T: PacketTx, R: PacketRx>(
    tx: T,
    rx: R,
    tx_key: KeyState,
    rx_key: KeyState,
) -> (SecureTx<T>, SecureRx<R>) {
    let max_frame = tx.max_packet_len();
    (
        SecureTx::new(tx, tx_key, true),
        SecureRx::new(rx, rx_key, max_frame),
    )
}

#[cfg(all(test, feature = "std"))]
mod known_answers {
    //! The handshakes and transport ciphers vmlink uses, against the published Noise test
    //! vectors: the protocol names and snow's handshake with the vectors' fixed keys give
    //! the published bytes, and this crate's own cipher (`KeyState`) sealing with the split
    //! keys gives the published transport messages.

    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn the_noise_test_vectors_come_out_byte_for_byte() {
        let vectors: serde_json::Value =
            serde_json::from_str(include_str!("../tests/vectors/noise.json")).unwrap();
        let mut checked = 0;
        for v in vectors["vectors"].as_array().unwrap() {
            let name = v["protocol_name"].as_str().unwrap();
            let (pattern, cipher) = [Pattern::XX, Pattern::IK, Pattern::NNpsk0]
                .into_iter()
                .flat_map(|p| [(p, Cipher::ChaChaPoly), (p, Cipher::AesGcm)])
                .find(|(p, c)| protocol_name(*p, *c) == name)
                .expect("a protocol vmlink offers");
            let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(unhex);
            let side = |initiator: bool| {
                let pre = if initiator { "init" } else { "resp" };
                let prologue = field(&format!("{pre}_prologue")).unwrap();
                let ephemeral = field(&format!("{pre}_ephemeral")).unwrap();
                let mut b = snow::Builder::new(params(pattern, cipher))
                    .prologue(&prologue)
                    .unwrap()
                    .fixed_ephemeral_key_for_testing_only(&ephemeral);
                let s = field(&format!("{pre}_static"));
                if let Some(s) = &s {
                    b = b.local_private_key(s).unwrap();
                }
                let rs = field(&format!("{pre}_remote_static"));
                if let Some(rs) = &rs {
                    b = b.remote_public_key(rs).unwrap();
                }
                let psks = v[format!("{pre}_psks")]
                    .as_array()
                    .map(|a| unhex(a[0].as_str().unwrap()));
                let psk: Option<[u8; 32]> = psks.map(|p| p.try_into().unwrap());
                if let Some(p) = &psk {
                    b = b.psk(0, p).unwrap();
                }
                if initiator {
                    b.build_initiator()
                } else {
                    b.build_responder()
                }
                .unwrap()
            };
            let (mut init, mut resp) = (side(true), side(false));
            let messages = v["messages"].as_array().unwrap();
            let mut buf = vec![0u8; 65535];
            let mut out = vec![0u8; 65535];
            let mut i = 0;
            while !init.is_handshake_finished() {
                let payload = unhex(messages[i]["payload"].as_str().unwrap());
                let want = unhex(messages[i]["ciphertext"].as_str().unwrap());
                let (tx, rx) = if i % 2 == 0 {
                    (&mut init, &mut resp)
                } else {
                    (&mut resp, &mut init)
                };
                let n = tx.write_message(&payload, &mut buf).unwrap();
                assert_eq!(buf[..n], want[..], "{name} message {i}");
                let m = rx.read_message(&buf[..n], &mut out).unwrap();
                assert_eq!(out[..m], payload[..]);
                i += 1;
            }
            assert_eq!(
                init.get_handshake_hash(),
                &field("handshake_hash").unwrap()[..]
            );
            let (i_to_r, r_to_i) = init.dangerously_get_raw_split();
            let mut keys = [
                KeyState::new(i_to_r, cipher, RekeyLimits::default()),
                KeyState::new(r_to_i, cipher, RekeyLimits::default()),
            ];
            // Transport messages alternate; the first after the handshake comes from
            // whoever would send next.
            for (j, m) in messages.iter().enumerate().skip(i) {
                let payload = unhex(m["payload"].as_str().unwrap());
                let want = unhex(m["ciphertext"].as_str().unwrap());
                let from_initiator = j % 2 == 0;
                let key = &mut keys[usize::from(!from_initiator)];
                let mut sealed = payload.clone();
                let tag = key.seal_with(&[], &mut sealed).unwrap();
                sealed.extend_from_slice(&tag);
                assert_eq!(sealed, want, "{name} transport message {j}");
                checked += 1;
            }
        }
        assert!(checked >= 12, "transport messages checked: {checked}");
    }
}

#[cfg(all(test, feature = "std"))]
mod fixed_bytes {
    //! The whole handshake as this crate frames it (protocol name, length-prefixed Noise
    //! messages, the sealed ready message), with fixed static and ephemeral keys: the same
    //! bytes in both rings every time, pinned by their SHA-256.

    use std::sync::Arc;

    use sha2::{Digest, Sha256};
    use vmlink_channel::{Channel, Config, in_process_pair};
    use vmlink_ring::{ControlWord, HeapMem, RingMem};

    use super::*;

    fn written(ring: &HeapMem) -> String {
        let end = ring.load_control(ControlWord::WriteIndex) as usize;
        let mut bytes = vec![0u8; end];
        ring.read_data(0, &mut bytes);
        Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn run(pattern: Pattern, cipher: Cipher) -> (String, String) {
        let i_to_r = Arc::new(HeapMem::new(4 * 4096).unwrap());
        let r_to_i = Arc::new(HeapMem::new(4 * 4096).unwrap());
        let (di, dr) = in_process_pair();
        let a = Channel::new(i_to_r.clone(), r_to_i.clone(), di, Config::default()).unwrap();
        let b = Channel::new(r_to_i.clone(), i_to_r.clone(), dr, Config::default()).unwrap();
        let (ki, kr) = (
            Keypair::from_private([1; KEY_LEN]),
            Keypair::from_private([2; KEY_LEN]),
        );
        let ci = Credentials::Static {
            local: ki.clone(),
            authorized: AuthorizedKeys::new([kr.public()]),
        };
        let cr = Credentials::Static {
            local: kr,
            authorized: AuthorizedKeys::new([ki.public()]),
        };
        let config = SecureConfig {
            pattern,
            cipher,
            ..SecureConfig::default()
        };
        std::thread::scope(|s| {
            let i = s.spawn(|| {
                establish_with(
                    a,
                    HandshakeRole::Initiator,
                    &ci,
                    &config,
                    Some(&[3; KEY_LEN]),
                )
            });
            let r = establish_with(
                b,
                HandshakeRole::Responder,
                &cr,
                &config,
                Some(&[4; KEY_LEN]),
            );
            let (i, r) = (i.join().unwrap().unwrap(), r.unwrap());
            assert_eq!(i.handshake_hash, r.handshake_hash);
        });
        (written(&i_to_r), written(&r_to_i))
    }

    #[test]
    fn fixed_keys_give_fixed_handshake_bytes() {
        let xx = run(Pattern::XX, Cipher::ChaChaPoly);
        assert_eq!(xx, run(Pattern::XX, Cipher::ChaChaPoly), "deterministic");
        let ik = run(Pattern::IK, Cipher::AesGcm);
        assert_eq!(xx, (XX_I_TO_R.to_owned(), XX_R_TO_I.to_owned()));
        assert_eq!(ik, (IK_I_TO_R.to_owned(), IK_R_TO_I.to_owned()));
    }

    const XX_I_TO_R: &str = "eac76fce7ac9d031cba8e11db4faa8c018ebfe0653502be4606b823895a294b6";
    const XX_R_TO_I: &str = "3fdf3dca6366db0ad5ed7130ba6a4e438ea302653ba464cbf8bcab71c8f5b12d";
    const IK_I_TO_R: &str = "eb97571842a6192584dc2ec0c0e40053d712747a4585f81a0d3d271463735bdf";
    const IK_R_TO_I: &str = "22055c5da9cd8f00239296453a08b32b19d6484e089fb2b57d0fc7c466a0f780";
}
