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

/// Which peers a service accepts: a peer is allowed when its uid is in the allowed uids or
/// its primary gid is in the allowed gids (supplementary groups are not consulted).
///
/// The default allows only this process's own effective uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    same_uid: bool,
    uids: Vec<u32>,
    gids: Vec<u32>,
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
        }
    }

    /// Nobody, until uids or gids are added.
    pub fn nobody() -> Self {
        Self {
            same_uid: false,
            uids: Vec::new(),
            gids: Vec::new(),
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

    /// Does the policy allow this peer?
    pub fn allows(&self, peer: &PeerCredentials) -> bool {
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
