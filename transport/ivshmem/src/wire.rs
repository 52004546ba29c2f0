//! The wire format of QEMU's ivshmem client-server protocol (`docs/specs/ivshmem-spec.rst`
//! in QEMU): each message is one 8-byte little-endian signed number, possibly with one file
//! descriptor passed by `SCM_RIGHTS`. The server sends; clients only listen.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr, recvmsg, sendmsg};

use crate::IvshmemError;

/// The protocol version this crate speaks (the first message of every connection).
pub const PROTOCOL_VERSION: i64 = 0;

/// The value of the message that carries the shared memory's fd.
pub const SHM_MESSAGE: i64 = -1;

/// One message as it arrived.
#[derive(Debug)]
pub struct Message {
    /// The number.
    pub value: i64,
    /// The file descriptor that came with it, owned (close-on-exec).
    pub fd: Option<OwnedFd>,
}

/// Sends one message: `value` (little-endian) and, when given, one fd with it. Blocks up
/// to the socket's send timeout; never raises `SIGPIPE`.
pub fn send(sock: &UnixStream, value: i64, fd: Option<BorrowedFd<'_>>) -> Result<(), Errno> {
    let bytes = value.to_le_bytes();
    let raw: [RawFd; 1] = [fd.map_or(-1, |f| f.as_raw_fd())];
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if fd.is_some() { &rights } else { &[] };
    let mut sent = 0;
    while sent < bytes.len() {
        let iov = [IoSlice::new(&bytes[sent..])];
        // The fd goes with the first byte only.
        let cmsgs = if sent == 0 { cmsgs } else { &[] };
        match sendmsg::<UnixAddr>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => sent += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Control-message room for a few fds, aligned for `cmsghdr`: one is allowed, more are
/// received (and closed) so the kernel never has to drop them silently.
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_ROOM]);

/// A `cmsghdr` (16 bytes on 64-bit Linux) and up to 8 fds of 4 bytes.
const CMSG_ROOM: usize = 16 + 4 * 8;

/// Receives one message, blocking up to the socket's receive timeout. An fd is accepted
/// only with the first byte; any other fd, or more than one, is closed and refused.
pub fn recv(sock: &UnixStream) -> Result<Message, IvshmemError> {
    let mut bytes = [0u8; 8];
    let mut got = 0;
    let mut fd: Option<OwnedFd> = None;
    while got < bytes.len() {
        let mut cbuf = CmsgBuf([0; CMSG_ROOM]);
        let mut iov = [IoSliceMut::new(&mut bytes[got..])];
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cbuf.0),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => msg,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {
                return Err(IvshmemError::Timeout {
                    what: "a message from the server",
                });
            }
            Err(e) => return Err(IvshmemError::io("recvmsg")(e)),
        };
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        let mut fds = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for cmsg in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = cmsg {
                    for f in raw {
                        // SAFETY: `SCM_RIGHTS` installed `f` in this process for us alone,
                        // and nothing else has seen it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(f) });
                    }
                }
            }
        }
        let first = got == 0;
        got += msg.bytes;
        if truncated || fds.len() > 1 || (!first && !fds.is_empty()) {
            return Err(IvshmemError::TooManyFds);
        }
        if msg.bytes == 0 {
            return Err(if got == 0 {
                IvshmemError::Closed
            } else {
                IvshmemError::ShortMessage { got }
            });
        }
        if first {
            fd = fds.pop();
        }
    }
    Ok(Message {
        value: i64::from_le_bytes(bytes),
        fd,
    })
}
