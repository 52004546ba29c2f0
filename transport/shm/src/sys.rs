//! The system calls the transport makes, each wrapped in a small safe function.
//!
//! Nearly all of the crate's `unsafe` is here and in [`crate::memory`] (the mapping); the
//! only other blocks are `Service::spawn`'s `pre_exec` hook and `Guest::from_env` taking
//! ownership of the inherited fd. Each block makes one call (or takes ownership of one
//! fresh fd) and says why that is sound above it.

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

/// The seals a channel's memfd carries: it can neither shrink nor grow, and no seal can be
/// added or removed any more.
pub(crate) const REQUIRED_SEALS: libc::c_int =
    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Most fds one handshake message may carry (the offer carries 3). A control buffer with
/// room for exactly this many makes the kernel set `MSG_CTRUNC` when a peer sends more.
pub(crate) const MAX_FDS: usize = 3;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Takes ownership of an fd a system call just returned.
fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = check(fd)?;
    // SAFETY: `fd` was just returned open by the kernel and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// This process's effective uid.
pub(crate) fn geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A new memfd, close-on-exec, with sealing allowed.
pub(crate) fn memfd_create(name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    owned(fd)
}

/// `ftruncate(2)`.
pub(crate) fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain integer arguments; the fd is open for the call.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }).map(drop)
}

/// Adds seals to a memfd.
pub(crate) fn add_seals(fd: BorrowedFd<'_>, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an int argument and touches no memory of ours.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) }).map(drop)
}

/// The seals on a memfd (`EINVAL` for a file that does not support sealing).
pub(crate) fn get_seals(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: F_GET_SEALS takes no argument and touches no memory of ours.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })
}

/// The size of the file behind `fd` and whether it is a regular file.
pub(crate) fn file_size(fd: BorrowedFd<'_>) -> io::Result<(u64, bool)> {
    // SAFETY: `stat` is plain old data, valid when zeroed.
    let mut st: libc::stat = unsafe { zeroed() };
    // SAFETY: `st` is a live, writable `stat` for the kernel to fill.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &raw mut st) })?;
    let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
    Ok((u64::try_from(st.st_size).unwrap_or(0), regular))
}

/// A new eventfd, counter 0, close-on-exec and non-blocking.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: `eventfd` takes no pointers; it returns a new fd or -1.
    owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
}

/// Makes a received fd non-blocking, as the eventfd doorbell expects.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: F_SETFL takes an int argument.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(drop)
}

/// Sets or clears close-on-exec on a raw fd. Async-signal-safe, for use between `fork` and
/// `exec`.
pub(crate) fn set_cloexec_raw(fd: RawFd, on: bool) -> io::Result<()> {
    let flag = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD takes an int argument; an fd that is not open gives EBADF.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, flag) }).map(drop)
}

/// The type of a socket (`SOCK_STREAM`, ...), or an error when `fd` is not a socket.
pub(crate) fn socket_type(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    let mut ty: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `ty` and `len` are live and writable; `len` holds the size of `ty`.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&raw mut ty).cast(),
            &raw mut len,
        )
    })?;
    Ok(ty)
}

/// The credentials of the process at the other end of a Unix socket, as of `connect` /
/// `socketpair`.
pub(crate) fn peer_credentials(fd: BorrowedFd<'_>) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are live and writable; `len` holds the size of `cred`.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    })?;
    Ok(cred)
}

/// `poll(2)` one fd for `events` until `deadline`, retrying on `EINTR`. True when ready.
pub(crate) fn poll_one(
    fd: BorrowedFd<'_>,
    events: libc::c_short,
    deadline: Instant,
) -> io::Result<bool> {
    let mut fds = [libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    }];
    poll(&mut fds, Some(deadline)).map(|n| n > 0)
}

/// `poll(2)` until something is ready or `deadline` passes (`None`: no deadline), retrying
/// on `EINTR`. Returns how many entries have events.
pub(crate) fn poll(fds: &mut [libc::pollfd], deadline: Option<Instant>) -> io::Result<usize> {
    loop {
        let timeout_ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                left.as_nanos()
                    .div_ceil(1_000_000)
                    .min(libc::c_int::MAX as u128) as libc::c_int
            }
        };
        // SAFETY: `fds` is a live, writable slice of `pollfd`s and the count is its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits until `deadline` for the peer of a stream socket to send something or hang up,
/// then tells whether it hung up without sending a byte. The byte, if any, is only peeked
/// at: it stays in the socket for the next read. False when nothing came by the deadline.
pub(crate) fn closed_before_a_byte(sock: BorrowedFd<'_>, deadline: Instant) -> io::Result<bool> {
    if !poll_one(sock, libc::POLLIN, deadline)? {
        return Ok(false);
    }
    let mut byte = 0u8;
    loop {
        // SAFETY: the buffer is one live, writable byte; MSG_PEEK leaves the data queued
        // and no ancillary data is asked for, so no fd is installed.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                (&raw mut byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n == 0);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            // A reset connection is a hang-up too.
            io::ErrorKind::ConnectionReset => return Ok(true),
            _ => return Err(e),
        }
    }
}

/// Control-message buffer with room for `MAX_FDS` fds, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

fn cmsg_len(fds: usize) -> usize {
    // SAFETY: CMSG_LEN only computes a size.
    unsafe { libc::CMSG_LEN((fds * size_of::<RawFd>()) as u32) as usize }
}

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((fds * size_of::<RawFd>()) as u32) as usize }
}

/// Sends `data` and `fds` in one `sendmsg`, never raising `SIGPIPE`, without blocking.
/// Returns the bytes sent (the fds go with the first byte).
pub(crate) fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    assert!(fds.len() <= MAX_FDS, "at most {MAX_FDS} fds per message");
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let mut cbuf = CmsgBuf([0; 64]);
    // SAFETY: `msghdr` is plain old data, valid when zeroed.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let space = cmsg_space(fds.len());
        assert!(space <= cbuf.0.len());
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `msg` points at a control buffer of `space` bytes, enough for one header.
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
        assert!(!cmsg.is_null());
        // SAFETY: `cmsghdr` is plain old data, valid when zeroed.
        let mut hdr: libc::cmsghdr = unsafe { zeroed() };
        hdr.cmsg_level = libc::SOL_SOCKET;
        hdr.cmsg_type = libc::SCM_RIGHTS;
        hdr.cmsg_len = cmsg_len(fds.len()) as _;
        // SAFETY: `cmsg` points at the start of `cbuf`, which has room for the header and
        // `fds.len()` fds (checked against CMSG_SPACE above).
        unsafe { cmsg.write_unaligned(hdr) };
        // SAFETY: CMSG_DATA points inside `cbuf` just past the header.
        let data_ptr = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
        for (i, fd) in fds.iter().enumerate() {
            // SAFETY: slot `i < fds.len()` lies inside the space reserved above;
            // `write_unaligned` needs no alignment.
            unsafe { data_ptr.wrapping_add(i).write_unaligned(fd.as_raw_fd()) };
        }
    }
    loop {
        // SAFETY: `msg` describes live buffers (`data`, `cbuf`) for the duration of the call.
        let n = unsafe {
            libc::sendmsg(
                sock.as_raw_fd(),
                &raw const msg,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
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
    /// The kernel dropped ancillary data that did not fit (`MSG_CTRUNC`).
    pub(crate) truncated: bool,
}

/// One non-blocking `recvmsg` into `buf`, accepting up to `MAX_FDS` fds, which arrive
/// close-on-exec (`MSG_CMSG_CLOEXEC`). Every fd the kernel installed is returned owned,
/// so dropping the result closes them.
pub(crate) fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = CmsgBuf([0; 64]);
    // Exactly room for `MAX_FDS` fds (not the padded CMSG_SPACE, which fits one more on
    // 64-bit targets), so a peer sending more makes the kernel set MSG_CTRUNC.
    let space = cmsg_len(MAX_FDS);
    assert!(space <= cbuf.0.len());
    // SAFETY: `msghdr` is plain old data, valid when zeroed.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: `msg` describes live, writable buffers (`buf`, `cbuf`) for the call.
        let n = unsafe {
            libc::recvmsg(
                sock.as_raw_fd(),
                &raw mut msg,
                libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled by the kernel; CMSG_FIRSTHDR reads its control fields.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR / CMSG_NXTHDR lies inside `cbuf`,
        // which the kernel filled; the header is copied out unaligned.
        let hdr = unsafe { cmsg.read_unaligned() };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            let header_len = cmsg_len(0);
            let count = (hdr.cmsg_len as usize).saturating_sub(header_len) / size_of::<RawFd>();
            // SAFETY: CMSG_DATA points just past the header, inside `cbuf`.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: the kernel wrote `count` fds after the header, within `cbuf`
                // (`cmsg_len` never exceeds the control length it reports).
                let raw = unsafe { data.wrapping_add(i).read_unaligned() };
                // SAFETY: SCM_RIGHTS installed `raw` in this process for us alone.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: `cmsg` is a valid header inside `msg`'s control buffer.
        cmsg = unsafe { libc::CMSG_NXTHDR(&raw const msg, cmsg) };
    }
    Ok(Received {
        len: n,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}
