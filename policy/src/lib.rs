//! vmlink's role-based access: which principals may open which services, and which
//! operations they may ask for in them.
//!
//! A policy is a TOML file of roles and principals:
//!
//! ```toml
//! # What each role may do: the services it may open ("*": any) and the operations it may
//! # ask for in them ("*": any).
//! [roles.reader]
//! services = ["vmlink-ic"]
//! operations = ["heartbeat", "time", "kvp.read"]
//!
//! [roles.admin]
//! services = ["*"]
//! operations = ["*"]
//!
//! # Who has which roles. A principal names one or more of uid, gid (any of the peer's
//! # groups, the primary one or a supplementary one), exe (the peer's executable) and key
//! # (its secure-channel key's fingerprint); it matches a peer when every one it names does.
//! [[principals]]
//! uid = 1000
//! roles = ["admin"]
//!
//! [[principals]]
//! gid = 27
//! exe = "/usr/local/bin/vmlink"
//! roles = ["reader"]
//! ```
//!
//! Everything not granted is denied. [`Policy::decide`] says yes or no and why; the
//! [`Decision`] gives the operator an audit line (who, what, why) while the peer is told
//! only that it was refused. [`Peer::of_socket`] identifies the process at the other end
//! of a Unix socket: uid and gid from `SO_PEERCRED`, then, through the pidfd
//! `SO_PEERPIDFD` gives, its supplementary groups and executable, checked to belong to
//! that same process (not to one that reused its pid).
//!
//! ```
//! use vmlink_policy::{Peer, Policy};
//!
//! let policy = Policy::parse(r#"
//!     [roles.reader]
//!     services = ["vmlink-ic"]
//!     operations = ["kvp.read"]
//!
//!     [[principals]]
//!     gid = 27
//!     roles = ["reader"]
//! "#)?;
//! let peer = Peer { uid: 1000, gids: vec![100, 27], ..Peer::default() };
//! assert!(policy.decide(&peer, "vmlink-ic", Some("kvp.read")).allowed());
//! let no = policy.decide(&peer, "vmlink-ic", Some("kvp.write"));
//! assert!(!no.allowed());
//! assert!(no.audit_line().contains("kvp.write"));
//! # Ok::<(), vmlink_policy::PolicyError>(())
//! ```

mod peer;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use peer::Peer;

/// The operations of Hyper-V's integration services that a role may be granted (other
/// services name their own: any name of lowercase letters, digits, `.`, `-`, `_`).
pub const IC_OPERATIONS: &[&str] = &[
    "heartbeat",
    "time",
    "shutdown",
    "kvp.read",
    "kvp.write",
    "kvp.delete",
    "fcopy",
];

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not a policy; `line` is where (from 1; 0 when unknown).
    #[error("{}{line}: {message}", .file.as_ref().map_or_else(|| "line ".to_owned(), |f| format!("{}:", f.display())))]
    Invalid {
        /// The file, when the policy came from one.
        file: Option<PathBuf>,
        /// The line.
        line: usize,
        /// What is wrong there.
        message: String,
    },
}

impl PolicyError {
    /// The same error naming the file it came from.
    fn in_file(self, path: &Path) -> Self {
        match self {
            PolicyError::Invalid { line, message, .. } => PolicyError::Invalid {
                file: Some(path.to_path_buf()),
                line,
                message,
            },
            e => e,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    roles: BTreeMap<String, toml::Spanned<RoleFile>>,
    #[serde(default)]
    principals: Vec<toml::Spanned<PrincipalFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleFile {
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    operations: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalFile {
    uid: Option<u32>,
    gid: Option<u32>,
    exe: Option<String>,
    key: Option<String>,
    roles: Vec<String>,
}

/// What a role may do.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Role {
    services: Vec<String>,
    operations: Vec<String>,
}

impl Role {
    fn opens(&self, service: &str) -> bool {
        self.services.iter().any(|s| s == "*" || s == service)
    }

    fn may(&self, operation: &str) -> bool {
        self.operations.iter().any(|o| o == "*" || o == operation)
    }
}

/// Who has which roles: a peer matches when every field given matches.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Principal {
    uid: Option<u32>,
    gid: Option<u32>,
    exe: Option<PathBuf>,
    key: Option<String>,
    roles: Vec<String>,
    line: usize,
}

impl Principal {
    fn matches(&self, peer: &Peer) -> bool {
        self.uid.is_none_or(|u| u == peer.uid)
            && self.gid.is_none_or(|g| peer.gids.contains(&g))
            && self
                .exe
                .as_ref()
                .is_none_or(|e| peer.exe.as_deref() == Some(e.as_path()))
            && self
                .key
                .as_ref()
                .is_none_or(|k| peer.key.as_deref() == Some(k.as_str()))
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(u) = self.uid {
            parts.push(format!("uid {u}"));
        }
        if let Some(g) = self.gid {
            parts.push(format!("gid {g}"));
        }
        if let Some(e) = &self.exe {
            parts.push(format!("exe {}", e.display()));
        }
        if let Some(k) = &self.key {
            parts.push(format!("key {k}"));
        }
        format!("the principal on line {} ({})", self.line, parts.join(", "))
    }
}

/// A loaded policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    roles: BTreeMap<String, Role>,
    principals: Vec<Principal>,
}

/// The line (from 1) of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

impl Policy {
    /// Reads a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| e.in_file(path))
    }

    /// Parses a policy's text; every mistake names its line.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let file: File = toml::from_str(text).map_err(|e| PolicyError::Invalid {
            file: None,
            line: e.span().map_or(0, |s| line_of(text, s.start)),
            message: e.message().to_owned(),
        })?;
        let mut roles = BTreeMap::new();
        for (name, spanned) in file.roles {
            let line = line_of(text, spanned.span().start);
            let invalid = |message: String| PolicyError::Invalid {
                file: None,
                line,
                message,
            };
            if !valid_name(&name) {
                return Err(invalid(format!(
                    "role name {name:?}: use lowercase letters, digits, '.', '-', '_'"
                )));
            }
            let role = spanned.into_inner();
            for s in &role.services {
                if s != "*" && s.is_empty() {
                    return Err(invalid(format!("role {name}: an empty service name")));
                }
            }
            for o in &role.operations {
                if o != "*" && !valid_name(o) {
                    return Err(invalid(format!(
                        "role {name}: operation {o:?}: use lowercase letters, digits, '.', '-', '_'"
                    )));
                }
            }
            roles.insert(
                name,
                Role {
                    services: role.services,
                    operations: role.operations,
                },
            );
        }
        let mut principals = Vec::new();
        for spanned in file.principals {
            let line = line_of(text, spanned.span().start);
            let invalid = |message: String| PolicyError::Invalid {
                file: None,
                line,
                message,
            };
            let p = spanned.into_inner();
            if p.uid.is_none() && p.gid.is_none() && p.exe.is_none() && p.key.is_none() {
                return Err(invalid(
                    "a principal names none of uid, gid, exe, key: it would match everyone".into(),
                ));
            }
            if p.roles.is_empty() {
                return Err(invalid("a principal with no roles".into()));
            }
            for r in &p.roles {
                if !roles.contains_key(r) {
                    return Err(invalid(format!("role {r:?} is not defined")));
                }
            }
            if let Some(e) = &p.exe
                && !e.starts_with('/')
            {
                return Err(invalid(format!("exe {e:?} is not an absolute path")));
            }
            if let Some(k) = &p.key
                && !(k.starts_with("SHA256:")
                    && k.len() == 39
                    && k[7..].bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(invalid(format!(
                    "key {k:?} is not a key fingerprint (SHA256: and 32 hex digits, as vmlink \
                     keygen prints)"
                )));
            }
            principals.push(Principal {
                uid: p.uid,
                gid: p.gid,
                exe: p.exe.map(PathBuf::from),
                key: p
                    .key
                    .map(|k| k.to_ascii_lowercase().replacen("sha256:", "SHA256:", 1)),
                roles: p.roles,
                line,
            });
        }
        Ok(Self { roles, principals })
    }

    /// How many roles the policy defines.
    pub fn roles(&self) -> usize {
        self.roles.len()
    }

    /// How many principals the policy lists.
    pub fn principals(&self) -> usize {
        self.principals.len()
    }

    /// Whether `peer` may open `service` (`operation` `None`) or ask for `operation` in it.
    pub fn decide(&self, peer: &Peer, service: &str, operation: Option<&str>) -> Decision {
        let matching: Vec<&Principal> =
            self.principals.iter().filter(|p| p.matches(peer)).collect();
        let mut decision = Decision {
            allowed: false,
            peer: peer.to_string(),
            service: service.to_owned(),
            operation: operation.map(str::to_owned),
            reason: String::new(),
        };
        if matching.is_empty() {
            decision.reason = "no principal of the policy matches the peer".into();
            return decision;
        }
        for p in &matching {
            for r in &p.roles {
                let role = &self.roles[r];
                let granted = role.opens(service) && operation.is_none_or(|o| role.may(o));
                if granted {
                    decision.allowed = true;
                    decision.reason = format!("role {r} of {}", p.describe());
                    return decision;
                }
            }
        }
        let roles: Vec<&str> = matching
            .iter()
            .flat_map(|p| p.roles.iter().map(String::as_str))
            .collect();
        decision.reason = match operation {
            None => format!("no role of the peer ({}) opens {service}", roles.join(", ")),
            Some(o) => format!(
                "no role of the peer ({}) grants {o} in {service}",
                roles.join(", ")
            ),
        };
        decision
    }

    /// What `peer` may do, for people: the principals that match it and what their roles
    /// grant.
    pub fn explain(&self, peer: &Peer) -> String {
        let mut out = format!("{peer}\n");
        let matching: Vec<&Principal> =
            self.principals.iter().filter(|p| p.matches(peer)).collect();
        if matching.is_empty() {
            out.push_str("  matches no principal: everything is denied\n");
            return out;
        }
        for p in matching {
            out.push_str(&format!("  matches {}\n", p.describe()));
            for r in &p.roles {
                let role = &self.roles[r];
                out.push_str(&format!(
                    "    role {r}: opens {}; may {}\n",
                    list(&role.services),
                    list(&role.operations)
                ));
            }
        }
        out
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "nothing".into()
    } else if items.iter().any(|i| i == "*") {
        "anything".into()
    } else {
        items.join(", ")
    }
}

/// A policy's answer, with what the operator's audit log needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    allowed: bool,
    peer: String,
    service: String,
    operation: Option<String>,
    reason: String,
}

impl Decision {
    /// Whether it is allowed.
    pub fn allowed(&self) -> bool {
        self.allowed
    }

    /// Why, in words (for the operator, never for the peer).
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// One line for an audit log: the verdict, who, what, why.
    pub fn audit_line(&self) -> String {
        format!(
            "vmlink-policy: {} {} {} {}: {}",
            if self.allowed { "allow" } else { "deny" },
            self.peer,
            self.service,
            self.operation.as_deref().unwrap_or("open"),
            self.reason
        )
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.audit_line())
    }
}
