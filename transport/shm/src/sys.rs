//! The system calls the transport makes, each wrapped in a small safe function over `nix`.
//!
//! Eventfds and the poll loop are vmlink-channel's ([`EventFd`], [`poll_until`]); memfds,
//! seals, `fstat`, `fcntl`, socket options and `SCM_RIGHTS` messages are `nix` calls. The
//! crate's `unsafe` is the mapping ([`crate::memory`]), `Service::spawn`'s `pre_exec` hook,
//! `Guest::from_env` taking ownership of the inherited fd, and here two blocks: borrowing a
//! raw fd for one `fcntl` (`set_cloexec_raw`) and owning the fds `SCM_RIGHTS` installed.
//! Each says why it is sound above it.

use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use nix::fcntl::{FcntlArg, FdFlag, OFlag, SealFlag, fcntl};
use nix::sys::memfd::MFdFlags;
pub(crate) use nix::sys::socket::SockType;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr, getsockopt, recvmsg, sendmsg, sockopt,
};
use nix::sys::stat::SFlag;
pub(crate) use vmlink_channel::fd::{Errno, EventFd, PollFd, PollFlags, poll_until, revents};

use crate::policy::PeerCredentials;

/// The seals a channel's memfd carries: it can neither shrink nor grow, and no seal can be
/// added or removed any more.
pub(crate) const REQUIRED_SEALS: i32 = SealFlag::F_SEAL_SHRINK
    .union(SealFlag::F_SEAL_GROW)
    .union(SealFlag::F_SEAL_SEAL)
    .bits();

/// Most fds one handshake message may carry (an offer carries 3, a hand-over 4, an offer
/// of a channel set 3 and 3 per sub-channel); a message with more is reported as truncated.
pub(crate) const MAX_FDS: usize = 3 + 3 * crate::memory::MAX_SUB_CHANNELS as usize;

/// This process's effective uid.
pub(crate) fn geteuid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// A new memfd, close-on-exec, with sealing allowed.
pub(crate) fn memfd_create(name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    Ok(nix::sys::memfd::memfd_create(
        name,
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?)
}

/// `ftruncate(2)`.
pub(crate) fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = len.try_into().map_err(|_| Errno::EFBIG)?;
    Ok(nix::unistd::ftruncate(fd, len)?)
}

/// Adds seals to a memfd.
pub(crate) fn add_seals(fd: BorrowedFd<'_>, seals: i32) -> io::Result<()> {
    fcntl(fd, FcntlArg::F_ADD_SEALS(SealFlag::from_bits_retain(seals)))?;
    Ok(())
}

/// The seals on a memfd (`EINVAL` for a file that does not support sealing).
pub(crate) fn get_seals(fd: BorrowedFd<'_>) -> io::Result<i32> {
    Ok(fcntl(fd, FcntlArg::F_GET_SEALS)?)
}

/// The size of the file behind `fd` and whether it is a regular file.
pub(crate) fn file_size(fd: BorrowedFd<'_>) -> io::Result<(u64, bool)> {
    let st = nix::sys::stat::fstat(fd)?;
    let regular = st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFREG.bits();
    Ok((u64::try_from(st.st_size).unwrap_or(0), regular))
}

/// A new eventfd (vmlink-channel's [`EventFd`]) as an fd to send or to build a doorbell
/// from.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    EventFd::new().map(OwnedFd::from)
}

/// Makes a received fd non-blocking, as the eventfd doorbell expects.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Sets or clears close-on-exec on a raw fd. Async-signal-safe (one `fcntl`, no
/// allocation), for use between `fork` and `exec`. An fd that is not open gives `EBADF`.
pub(crate) fn set_cloexec_raw(fd: RawFd, on: bool) -> io::Result<()> {
    let flag = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    // SAFETY: the borrow is used for this one `fcntl` and ends with it; nothing is read,
    // written or closed through it. Callers pass an fd that is open (the socket the parent
    // keeps open across `fork`) or one they were told is open (`Guest::from_env`), where a
    // number that is not open only makes `fcntl` fail with `EBADF`.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    fcntl(fd, FcntlArg::F_SETFD(flag))?;
    Ok(())
}

/// The type of a socket (`Stream`, ...), or an error when `fd` is not a socket.
pub(crate) fn socket_type(fd: BorrowedFd<'_>) -> io::Result<SockType> {
    Ok(getsockopt(&fd, sockopt::SockType)?)
}

/// The credentials of the process at the other end of a Unix socket, as of `connect` /
/// `socketpair`.
pub(crate) fn peer_credentials(fd: BorrowedFd<'_>) -> io::Result<PeerCredentials> {
    let cred = getsockopt(&fd, sockopt::PeerCredentials)?;
    Ok(PeerCredentials {
        pid: cred.pid(),
        uid: cred.uid(),
        gid: cred.gid(),
    })
}

/// Polls one fd for `events` until `deadline` (vmlink-channel's [`poll_until`]: `EINTR`
/// retried). True when ready.
pub(crate) fn poll_one(
    fd: BorrowedFd<'_>,
    events: PollFlags,
    deadline: Instant,
) -> io::Result<bool> {
    let mut fds = [PollFd::new(fd, events)];
    Ok(poll_until(&mut fds, Some(deadline))? > 0)
}

/// Waits until `deadline` for the peer of a stream socket to send something or hang up,
/// then tells whether it hung up without sending a byte. The byte, if any, is only peeked
/// at: it stays in the socket for the next read. False when nothing came by the deadline.
pub(crate) fn closed_before_a_byte(sock: BorrowedFd<'_>, deadline: Instant) -> io::Result<bool> {
    if !poll_one(sock, PollFlags::POLLIN, deadline)? {
        return Ok(false);
    }
    let mut byte = [0u8; 1];
    loop {
        // MSG_PEEK leaves the data queued; no ancillary data is asked for, so no fd is
        // installed.
        match nix::sys::socket::recv(
            sock.as_raw_fd(),
            &mut byte,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(n) => return Ok(n == 0),
            Err(Errno::EINTR) => {}
            // A reset connection is a hang-up too.
            Err(Errno::ECONNRESET) => return Ok(true),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends `data` and `fds` in one `sendmsg`, never raising `SIGPIPE`, without blocking.
/// Returns the bytes sent (the fds go with the first byte).
pub(crate) fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    assert!(fds.len() <= MAX_FDS, "at most {MAX_FDS} fds per message");
    let mut raw = [0 as RawFd; MAX_FDS];
    for (slot, fd) in raw.iter_mut().zip(fds) {
        *slot = fd.as_raw_fd();
    }
    let rights = [ControlMessage::ScmRights(&raw[..fds.len()])];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    let iov = [IoSlice::new(data)];
    loop {
        match sendmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// What one `recvmsg` brought.
#[derive(Debug)]
pub(crate) struct Received {
    /// Bytes read (0: the peer closed its end).
    pub(crate) len: usize,
    /// Fds that came with them, owned (close-on-exec from the start).
    pub(crate) fds: Vec<OwnedFd>,
    /// The peer sent more than [`MAX_FDS`] fds (they are all in `fds`, to be closed), or
    /// the kernel dropped ancillary data that did not fit (`MSG_CTRUNC`).
    pub(crate) truncated: bool,
}

/// The most fds one `sendmsg` can carry on Linux (`SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;

/// Control-message buffer with room for `SCM_MAX_FD` fds, aligned for `cmsghdr`: the
/// kernel never has to truncate an `SCM_RIGHTS` message, so every fd it installed is
/// handed to us (nix gives no control messages at all once `MSG_CTRUNC` is set): room for
/// `CMSG_SPACE(253 * 4)`, a `cmsghdr` (16 bytes on 64-bit Linux) and the fds rounded up to 8.
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_ROOM]);

const CMSG_ROOM: usize = 16 + (SCM_MAX_FD * size_of::<RawFd>()).next_multiple_of(8);

/// One non-blocking `recvmsg` into `buf`, accepting every fd the message carries, which
/// arrive close-on-exec (`MSG_CMSG_CLOEXEC`). Every fd the kernel installed is returned
/// owned, so dropping the result closes them; more than [`MAX_FDS`] is reported as
/// `truncated`.
pub(crate) fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut cbuf = CmsgBuf([0; CMSG_ROOM]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cbuf.0),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(msg) => break msg,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds = Vec::new();
    let mut truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    // With `MSG_CTRUNC` nix lists no control message; the buffer's size rules that out
    // for `SCM_RIGHTS`, the only kind a Unix socket sends us unasked.
    if let Ok(cmsgs) = msg.cmsgs() {
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                for fd in raw {
                    // SAFETY: `SCM_RIGHTS` installed `fd` in this process for us alone, and
                    // nothing else has seen it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
    }
    truncated |= fds.len() > MAX_FDS;
    Ok(Received {
        len: msg.bytes,
        fds,
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_buffer_holds_the_most_fds_a_message_carries() {
        assert!(nix::cmsg_space!([RawFd; SCM_MAX_FD]).len() <= CMSG_ROOM);
    }
}
