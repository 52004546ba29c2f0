//! `--secure` for `vmlink serve` / `vmlink connect`, and `vmlink keygen`: a Noise handshake
//! over the channel just made, then every packet sealed (vmlink-secure).

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use vmlink_channel::{Doorbell, Endpoint, PacketRx, PacketTx};
use vmlink_secure::{
    AuthorizedKeys, Cipher, Credentials, HandshakeRole, Keypair, Pattern, PublicKey, SecureConfig,
    SecureEndpoint, SecureError, establish,
};

use crate::error::{Context, Result, fail};

/// A secure channel over vmlink-shm rings.
pub type SecureShm = vmlink_secure::SecureEndpoint<
    vmlink_channel::RingTx<vmlink_shm::ShmRing>,
    vmlink_channel::RingRx<vmlink_shm::ShmRing>,
    vmlink_channel::EventFdDoorbell,
>;

/// The transport cipher, on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CipherArg {
    /// ChaCha20-Poly1305.
    Chacha,
    /// AES-256-GCM.
    Aes,
}

impl From<CipherArg> for Cipher {
    fn from(arg: CipherArg) -> Self {
        match arg {
            CipherArg::Chacha => Cipher::ChaChaPoly,
            CipherArg::Aes => Cipher::AesGcm,
        }
    }
}

/// The handshake pattern, on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PatternArg {
    /// Both sides prove static keys and learn each other's (three messages).
    Xx,
    /// The client knows the server's key in advance (`--peer-keys` holds exactly it; two
    /// messages).
    Ik,
}

/// The secure channel's options.
#[derive(Debug, Args)]
pub struct SecureArgs {
    /// Encrypt and authenticate every packet: a Noise handshake with static keys
    /// (`--key`, `--peer-keys`) before any data, both sides with `--secure`.
    #[arg(long, requires_all = ["key", "peer_keys"])]
    pub secure: bool,
    /// This side's private key file (made by `vmlink keygen`; must be mode 0600).
    #[arg(long, value_name = "FILE", requires = "secure")]
    pub key: Option<PathBuf>,
    /// The peer public keys accepted, one `vmlink-secure-public-key-v1` line each (a
    /// `.pub` file from `vmlink keygen`, or several).
    #[arg(long, value_name = "FILE", requires = "secure")]
    pub peer_keys: Option<PathBuf>,
    /// The transport cipher (both sides must agree).
    #[arg(long, value_enum, default_value = "chacha", requires = "secure")]
    pub cipher: CipherArg,
    /// The handshake pattern (both sides must agree).
    #[arg(long, value_enum, default_value = "xx", requires = "secure")]
    pub pattern: PatternArg,
}

/// What a side needs for the handshake, loaded and checked before anything is listened
/// on or connected to.
pub struct Prepared {
    credentials: Credentials,
    config: SecureConfig,
}

impl SecureArgs {
    /// The keys and configuration, when `--secure` is given; clear errors for missing or
    /// unusable key files.
    pub fn prepare(&self) -> Result<Option<Prepared>> {
        if !self.secure {
            return Ok(None);
        }
        let (Some(key), Some(peers)) = (&self.key, &self.peer_keys) else {
            return fail("--secure needs --key and --peer-keys");
        };
        let local = Keypair::load(key).context("--key")?;
        let authorized = AuthorizedKeys::load(peers).context("--peer-keys")?;
        if authorized.is_empty() {
            return fail(format!(
                "--peer-keys {} lists no key: nobody could connect",
                peers.display()
            ));
        }
        let config = SecureConfig {
            cipher: self.cipher.into(),
            pattern: match self.pattern {
                PatternArg::Xx => Pattern::XX,
                PatternArg::Ik => Pattern::IK,
            },
            ..SecureConfig::default()
        };
        Ok(Some(Prepared {
            credentials: Credentials::Static { local, authorized },
            config,
        }))
    }
}

/// A secure channel and the key its peer proved.
pub type Secured<T, R, D> = (SecureEndpoint<T, R, D>, Option<PublicKey>);

impl Prepared {
    /// Runs the handshake over `end` as `role`; says on stderr who the peer is.
    pub fn establish<T, R, D>(
        &self,
        end: Endpoint<T, R, D>,
        role: HandshakeRole,
        command: &str,
    ) -> std::result::Result<Secured<T, R, D>, SecureError>
    where
        T: PacketTx,
        R: PacketRx,
        D: Doorbell,
    {
        let done = establish(end, role, &self.credentials, &self.config)?;
        if let Some(peer) = done.peer_key {
            eprintln!("vmlink {command}: secure channel with peer key {peer}");
        }
        Ok((done.endpoint, done.peer_key))
    }
}

/// Runs `vmlink keygen FILE`: a new key pair in FILE (mode 0600) and FILE.pub.
pub fn keygen(path: &Path, comment: &str) -> Result<()> {
    let kp = Keypair::generate();
    kp.save(path, comment).context("write the key")?;
    println!(
        "wrote {} (private, mode 0600) and {}.pub; fingerprint {}",
        path.display(),
        path.display(),
        kp.public()
    );
    Ok(())
}
