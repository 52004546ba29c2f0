//! Who may connect: peer credentials and the per-service policy that judges them.

use std::fmt;

/// The credentials of the process at the other end of a Unix socket (`SO_PEERCRED`), as
/// they were when it connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PeerCredentials {
    /// Its process id (as seen from our pid namespace; 0 if unknown).
    pub pid: i32,
    /// Its effective user id.
    pub uid: u32,
    /// Its effective (primary) group id.
    pub gid: u32,
}

impl fmt::Display for PeerCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} (uid {}, gid {})", self.pid, self.uid, self.gid)
    }
}

/// Which peers a service accepts.
///
/// Either credential rules — a peer is allowed when its uid is in the allowed uids or its
/// primary gid is in the allowed gids (supplementary groups are not consulted) — or a
/// role-based access policy ([`Policy::roles`]): the peer is identified through
/// `SO_PEERCRED` and `SO_PEERPIDFD` (uid, every group, executable) and allowed when a role
/// of a principal it matches opens the service. The credential rules are the simple case
/// of the same question.
///
/// The default allows only this process's own effective uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    same_uid: bool,
    uids: Vec<u32>,
    gids: Vec<u32>,
    roles: Option<std::sync::Arc<vmlink_policy::Policy>>,
    identify: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self::same_uid()
    }
}

impl Policy {
    /// Only peers running as this process's effective uid.
    pub fn same_uid() -> Self {
        Self {
            same_uid: true,
            uids: Vec::new(),
            gids: Vec::new(),
            roles: None,
            identify: false,
        }
    }

    /// Nobody, until uids or gids are added.
    pub fn nobody() -> Self {
        Self {
            same_uid: false,
            uids: Vec::new(),
            gids: Vec::new(),
            roles: None,
            identify: false,
        }
    }

    /// Everyone who reaches the socket (whose directory is private to its user), identified
    /// — uid, every group, executable, as [`Endpoint::identity`](crate::Endpoint::identity)
    /// then says — for a decision the application makes itself later: after a secure
    /// handshake, say, once the peer's key is known too.
    pub fn identify() -> Self {
        Self {
            identify: true,
            ..Self::nobody()
        }
    }

    /// Whoever the role-based access policy `policy` lets open the service (and nobody
    /// else: the credential rules do not apply).
    pub fn roles(policy: vmlink_policy::Policy) -> Self {
        Self {
            roles: Some(std::sync::Arc::new(policy)),
            ..Self::nobody()
        }
    }

    /// Also allows `uid`.
    pub fn allow_uid(mut self, uid: u32) -> Self {
        self.uids.push(uid);
        self
    }

    /// Also allows peers whose primary gid is `gid`.
    pub fn allow_gid(mut self, gid: u32) -> Self {
        self.gids.push(gid);
        self
    }

    /// Whether the peer on `sock`, with credentials `peer`, may open `service`: under a
    /// role-based policy, [`ShmError::Denied`] with the audit line when not, and who the
    /// peer is when it may.
    pub(crate) fn check(
        &self,
        sock: std::os::fd::BorrowedFd<'_>,
        peer: &PeerCredentials,
        service: &str,
    ) -> Result<Option<vmlink_policy::Peer>, crate::ShmError> {
        if self.roles.is_none() && self.identify {
            return vmlink_policy::Peer::of_socket(sock)
                .map(Some)
                .map_err(crate::ShmError::io(
                    "identify the peer (SO_PEERPIDFD, /proc)",
                ));
        }
        let Some(roles) = &self.roles else {
            return if self.allows(peer) {
                Ok(None)
            } else {
                Err(crate::ShmError::NotAllowed {
                    peer: *peer,
                    service: service.to_owned(),
                })
            };
        };
        let who = vmlink_policy::Peer::of_socket(sock).map_err(crate::ShmError::io(
            "identify the peer (SO_PEERPIDFD, /proc)",
        ))?;
        let decision = roles.decide(&who, service, None);
        if decision.allowed() {
            Ok(Some(who))
        } else {
            Err(crate::ShmError::Denied {
                service: service.to_owned(),
                audit: decision.audit_line(),
            })
        }
    }

    /// The role-based policy, if this is one.
    pub fn access(&self) -> Option<&vmlink_policy::Policy> {
        self.roles.as_deref()
    }

    /// Does the policy allow this peer? (The credential rules; a role-based or identifying
    /// policy needs the peer's socket, and says no here.)
    pub fn allows(&self, peer: &PeerCredentials) -> bool {
        if self.roles.is_some() || self.identify {
            return false;
        }
        let own = crate::sys::geteuid();
        (self.same_uid && peer.uid == own)
            || self.uids.contains(&peer.uid)
            || self.gids.contains(&peer.gid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_rules() {
        let me = crate::sys::geteuid();
        let peer = |uid, gid| PeerCredentials { pid: 1, uid, gid };
        assert!(Policy::default().allows(&peer(me, 12345)));
        assert!(!Policy::default().allows(&peer(me.wrapping_add(1), 0)));
        assert!(!Policy::nobody().allows(&peer(me, 0)));
        let p = Policy::nobody().allow_uid(7).allow_gid(9);
        assert!(p.allows(&peer(7, 1)));
        assert!(p.allows(&peer(8, 9)));
        assert!(!p.allows(&peer(8, 8)));
    }
}
