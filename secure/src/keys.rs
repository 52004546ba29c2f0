//! Static keys and the files that hold them: a private key file (owner-only), public key
//! lines, and an authorized-keys file listing the peers' public keys.
//!
//! Formats (text, one key per line, hex):
//!
//! ```text
//! vmlink-secure-private-key-v1 <64 hex digits>
//! vmlink-secure-public-key-v1 <64 hex digits> [comment]
//! ```
//!
//! An authorized-keys file holds public key lines; blank lines and lines starting with `#`
//! are ignored.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
#[cfg(feature = "std")]
use std::fs;
#[cfg(feature = "std")]
use std::io::Write;
#[cfg(feature = "std")]
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
#[cfg(feature = "std")]
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::cipher::KEY_LEN;

const PRIVATE_TAG: &str = "vmlink-secure-private-key-v1";
const PUBLIC_TAG: &str = "vmlink-secure-public-key-v1";

/// Why a key file could not be used.
#[cfg(feature = "std")]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// The file could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// A private key file others may read, or that another user owns.
    #[error(
        "{}: a private key file must be owned by this user and readable by nobody else \
         (found owner uid {uid}, mode {mode:o}); chmod 600 it",
        .path.display()
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its permission bits.
        mode: u32,
    },
    /// A line that is not a key of the expected kind.
    #[error("{}:{line}: {reason}", .path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// The line (from 1).
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A Curve25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl PublicKey {
    /// The key's fingerprint: `SHA256:` and the first 16 bytes of its SHA-256 in hex.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.0);
        format!("SHA256:{}", hex(&digest[..16]))
    }

    /// The key as a public key line, with a comment.
    pub fn to_line(&self, comment: &str) -> String {
        if comment.is_empty() {
            format!("{PUBLIC_TAG} {}", hex(&self.0))
        } else {
            format!("{PUBLIC_TAG} {} {comment}", hex(&self.0))
        }
    }

    /// Parses a public key line (the comment is ignored).
    pub fn from_line(line: &str) -> Result<Self, &'static str> {
        let mut words = line.split_whitespace();
        if words.next() != Some(PUBLIC_TAG) {
            return Err("not a vmlink-secure public key line");
        }
        let key = words.next().ok_or("no key after the tag")?;
        Ok(Self(unhex(key)?))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

/// A Curve25519 key pair; the private half is zeroed when dropped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Keypair {
    private: [u8; KEY_LEN],
    #[zeroize(skip)]
    public: PublicKey,
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keypair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl Keypair {
    /// A new random key pair.
    pub fn generate() -> Self {
        let builder = snow::Builder::new(crate::handshake::params(
            crate::Pattern::XX,
            crate::Cipher::ChaChaPoly,
        ));
        // Key generation only fails without a random source, which nothing here can do
        // without.
        let kp = builder
            .generate_keypair()
            .expect("the system's random source");
        let mut private = [0u8; KEY_LEN];
        private.copy_from_slice(&kp.private);
        let mut public = [0u8; KEY_LEN];
        public.copy_from_slice(&kp.public);
        Self {
            private,
            public: PublicKey(public),
        }
    }

    /// The key pair of a private key (its public half computed from it).
    pub fn from_private(private: [u8; KEY_LEN]) -> Self {
        Self {
            public: PublicKey(x25519_public(&private)),
            private,
        }
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// The private half.
    pub(crate) fn private(&self) -> &[u8; KEY_LEN] {
        &self.private
    }

    #[cfg(feature = "std")]
    /// Reads a private key file: it must be owned by this user and readable by nobody
    /// else.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let io = |source| KeyFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = fs::metadata(path).map_err(io)?;
        let mode = meta.mode() & 0o7777;
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me || mode & 0o077 != 0 {
            return Err(KeyFileError::Permissions {
                path: path.to_path_buf(),
                uid: meta.uid(),
                mode,
            });
        }
        let mut text = fs::read_to_string(path).map_err(io)?;
        let parsed = Self::parse(&text).map_err(|(line, reason)| KeyFileError::Format {
            path: path.to_path_buf(),
            line,
            reason,
        });
        text.zeroize();
        parsed
    }

    /// Parses a private key file's text (what [`save`](Self::save) writes, or the same
    /// line from anywhere else: a `no_std` embedder's own storage); an error names the
    /// line (from 1).
    pub fn parse(text: &str) -> Result<Self, (usize, &'static str)> {
        parse_private(text).map(Self::from_private)
    }

    /// Writes the private key to `path` (created owner-only, never replacing a file) and
    /// the public key line to `path.pub`.
    #[cfg(feature = "std")]
    pub fn save(&self, path: &Path, comment: &str) -> Result<(), KeyFileError> {
        let mut public_path = path.as_os_str().to_owned();
        public_path.push(".pub");
        let public_path = PathBuf::from(public_path);
        for (p, text, mode) in [
            (
                path,
                zeroize::Zeroizing::new(format!("{PRIVATE_TAG} {}\n", hex(&self.private))),
                0o600,
            ),
            (
                public_path.as_path(),
                zeroize::Zeroizing::new(format!("{}\n", self.public.to_line(comment))),
                0o644,
            ),
        ] {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(p)
                .map_err(|source| KeyFileError::Io {
                    path: p.to_path_buf(),
                    source,
                })?;
            f.write_all(text.as_bytes())
                .map_err(|source| KeyFileError::Io {
                    path: p.to_path_buf(),
                    source,
                })?;
        }
        Ok(())
    }
}

/// The public keys a side accepts from its peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthorizedKeys {
    keys: Vec<(PublicKey, String)>,
}

impl AuthorizedKeys {
    /// Exactly these keys.
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        Self {
            keys: keys.into_iter().map(|k| (k, String::new())).collect(),
        }
    }

    #[cfg(feature = "std")]
    /// Reads an authorized-keys file.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let text = fs::read_to_string(path).map_err(|source| KeyFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|(line, reason)| KeyFileError::Format {
            path: path.to_path_buf(),
            line,
            reason,
        })
    }

    /// Parses an authorized-keys file's text; an error names the line (from 1).
    pub fn parse(text: &str) -> Result<Self, (usize, &'static str)> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = PublicKey::from_line(line).map_err(|e| (i + 1, e))?;
            let comment = line
                .split_whitespace()
                .skip(2)
                .collect::<Vec<_>>()
                .join(" ");
            keys.push((key, comment));
        }
        Ok(Self { keys })
    }

    /// Whether `key` is listed; its comment if so.
    pub fn find(&self, key: &PublicKey) -> Option<&str> {
        self.keys
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, c)| c.as_str())
    }

    /// The keys listed.
    pub fn keys(&self) -> impl Iterator<Item = &PublicKey> {
        self.keys.iter().map(|(k, _)| k)
    }

    /// How many keys are listed.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is listed (nobody is accepted).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn parse_private(text: &str) -> Result<[u8; KEY_LEN], (usize, &'static str)> {
    let mut found = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if found.is_some() {
            return Err((i + 1, "more than one key in a private key file"));
        }
        let mut words = line.split_whitespace();
        if words.next() != Some(PRIVATE_TAG) {
            return Err((i + 1, "not a vmlink-secure private key line"));
        }
        let key = words.next().ok_or((i + 1, "no key after the tag"))?;
        if words.next().is_some() {
            return Err((i + 1, "words after the key"));
        }
        found = Some(unhex(key).map_err(|e| (i + 1, e))?);
    }
    found.ok_or((1, "no key in the file"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Result<[u8; KEY_LEN], &'static str> {
    let digits = text.as_bytes();
    if digits.len() != 2 * KEY_LEN {
        return Err("a key is 64 hex digits");
    }
    let mut out = [0u8; KEY_LEN];
    for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let hi = (pair[0] as char)
            .to_digit(16)
            .ok_or("a key is 64 hex digits")?;
        let lo = (pair[1] as char)
            .to_digit(16)
            .ok_or("a key is 64 hex digits")?;
        *o = (hi * 16 + lo) as u8;
    }
    Ok(out)
}

/// The X25519 public key of `private`, through snow's own Curve25519.
fn x25519_public(private: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    use snow::resolvers::{CryptoResolver, DefaultResolver};
    let mut dh = DefaultResolver
        .resolve_dh(&snow::params::DHChoice::Curve25519)
        .expect("snow's default resolver has Curve25519");
    dh.set(private);
    let mut public = [0u8; KEY_LEN];
    public.copy_from_slice(dh.pubkey());
    public
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_read_back_and_bad_lines_are_named() {
        let kp = Keypair::generate();
        let line = kp.public().to_line("host");
        assert_eq!(PublicKey::from_line(&line).unwrap(), kp.public());
        assert_eq!(Keypair::from_private(*kp.private()).public(), kp.public());
        let text = format!(
            "# guests\n\n{line}\n{}\n",
            Keypair::generate().public().to_line("")
        );
        let auth = AuthorizedKeys::parse(&text).unwrap();
        assert_eq!(auth.len(), 2);
        assert_eq!(auth.find(&kp.public()), Some("host"));
        assert_eq!(
            AuthorizedKeys::parse("# ok\nssh-ed25519 AAAA"),
            Err((2, "not a vmlink-secure public key line"))
        );
        assert_eq!(
            AuthorizedKeys::parse(&format!("{PUBLIC_TAG} abcd")),
            Err((1, "a key is 64 hex digits"))
        );
        assert_eq!(
            parse_private(&format!(
                "{PRIVATE_TAG} {}\n{PRIVATE_TAG} {}",
                "0".repeat(64),
                "1".repeat(64)
            )),
            Err((2, "more than one key in a private key file"))
        );
        assert_eq!(parse_private(""), Err((1, "no key in the file")));
        assert_eq!(
            parse_private(&format!("{PRIVATE_TAG} {}", "g".repeat(64))),
            Err((1, "a key is 64 hex digits"))
        );
    }

    #[test]
    #[cfg(feature = "std")]
    fn a_private_key_file_must_be_private() {
        let dir = std::env::temp_dir().join(format!("vmlink-keys-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("host.key");
        let kp = Keypair::generate();
        kp.save(&path, "host").unwrap();
        assert_eq!(Keypair::load(&path).unwrap().public(), kp.public());
        let public = fs::read_to_string(dir.join("host.key.pub")).unwrap();
        assert_eq!(PublicKey::from_line(public.trim()).unwrap(), kp.public());
        assert!(
            matches!(kp.save(&path, "again"), Err(KeyFileError::Io { .. })),
            "never replaced"
        );
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        match Keypair::load(&path) {
            Err(KeyFileError::Permissions { mode, .. }) => assert_eq!(mode, 0o644),
            other => panic!("{other:?}"),
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
