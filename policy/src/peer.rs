//! Who is at the other end of a Unix socket.

use std::fmt;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;

use nix::sys::socket::{getsockopt, sockopt};

/// What a policy judges: the peer process's uid, all its groups, its executable, and the
/// fingerprint of the key it proved on a secure channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// The effective uid.
    pub uid: u32,
    /// Every group: the effective gid first, then the supplementary ones.
    pub gids: Vec<u32>,
    /// The executable, when known.
    pub exe: Option<PathBuf>,
    /// The secure channel key's fingerprint (`SHA256:...`), when one was proven.
    pub key: Option<String>,
    /// The process id, when known (for the audit line only: never judged).
    pub pid: Option<i32>,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid={} gids=", self.uid)?;
        let gids: Vec<String> = self.gids.iter().map(u32::to_string).collect();
        write!(
            f,
            "{}",
            if gids.is_empty() {
                "-".into()
            } else {
                gids.join(",")
            }
        )?;
        match &self.exe {
            Some(e) => write!(f, " exe={}", e.display())?,
            None => f.write_str(" exe=-")?,
        }
        write!(f, " key={}", self.key.as_deref().unwrap_or("-"))?;
        match self.pid {
            Some(p) => write!(f, " pid={p}"),
            None => f.write_str(" pid=-"),
        }
    }
}

impl Peer {
    /// The process at the other end of the Unix socket `sock`: uid and gid from
    /// `SO_PEERCRED`; then, through the pidfd `SO_PEERPIDFD` gives, its supplementary
    /// groups and its executable from `/proc`, read only while the pidfd says its pid is
    /// still that process (checked before and after the reads, so a process that exits
    /// and whose pid is reused meanwhile is not mistaken for it).
    pub fn of_socket(sock: BorrowedFd<'_>) -> io::Result<Self> {
        let cred = getsockopt(&sock, sockopt::PeerCredentials)?;
        let (uid, gid) = (cred.uid(), cred.gid());
        let pidfd = getsockopt(&sock, sockopt::PeerPidfd)?;
        let pid = pidfd_pid(pidfd.as_raw_fd())?;
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
        if pidfd_pid(pidfd.as_raw_fd())? != pid {
            return Err(io::Error::other("the peer exited while it was identified"));
        }
        let mut gids = vec![gid];
        for g in supplementary_groups(&status) {
            if !gids.contains(&g) {
                gids.push(g);
            }
        }
        Ok(Self {
            uid,
            gids,
            exe,
            key: None,
            pid: Some(pid),
        })
    }

    /// The same peer, having proven the key with fingerprint `key`.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
}

/// The pid a pidfd refers to, from `/proc/self/fdinfo`: an error once the process has
/// exited (the kernel then says -1).
fn pidfd_pid(fd: i32) -> io::Result<i32> {
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    let pid = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse::<i32>().ok())
        .ok_or_else(|| io::Error::other("the pidfd's fdinfo has no Pid line"))?;
    if pid <= 0 {
        return Err(io::Error::other("the peer has exited"));
    }
    Ok(pid)
}

/// The `Groups:` line of a `/proc/PID/status`.
fn supplementary_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn a_socket_pair_peer_is_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = Peer::of_socket(a.as_fd()).unwrap();
        assert_eq!(peer.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(peer.gids[0], nix::unistd::getegid().as_raw());
        assert_eq!(peer.pid, Some(std::process::id() as i32));
        assert_eq!(peer.exe, Some(std::env::current_exe().unwrap()));
    }

    #[test]
    fn groups_are_read_from_the_status_line() {
        let status = "Name:\tx\nGroups:\t4 24 27 \nNgid:\t0\n";
        assert_eq!(supplementary_groups(status), [4, 24, 27]);
        assert_eq!(supplementary_groups("Groups:\n"), Vec::<u32>::new());
    }
}
