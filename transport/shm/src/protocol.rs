//! The handshake's wire format and message I/O over the Unix stream socket.
//!
//! Every message is a 16-byte [`Header`] then `body_len` bytes, little-endian:
//!
//! | kind | from | body | fds |
//! | --- | --- | --- | --- |
//! | `HELLO` (1) | guest | the service name (UTF-8, 1..=255 bytes) | none |
//! | `OFFER` (2) | host | [`OfferBody`], then the service name | memfd, guest→host eventfd, host→guest eventfd |
//! | `ERROR` (3) | either | [`ErrorBody`], then a UTF-8 explanation (≤ 1024 bytes) | none |
//! | `READY` (4) | guest | empty | none |
//! | `TAKE_OVER` (5) | successor | empty | none |
//! | `HANDOVER` (6) | predecessor | [`HandOverBody`], the service name, the saved endpoint, the application's state | memfd, the bell the side waits on, the bell it signals, the peer's socket |
//! | `CONFIRM` (7) | successor | empty | none |
//! | `DONE` (8) | predecessor | empty | none |
//! | `HELLO_SET` (9) | guest | [`SetHelloBody`], then the service name | none |
//! | `OFFER_SET` (10) | host | [`OfferBody`] with `flags` holding the sub-channel count *k*, then the service name | memfd, the primary's two eventfds, then per sub-channel its guest→host eventfd, its host→guest eventfd and the guest's end of its socket pair |
//!
//! The guest speaks first (`HELLO`); the host answers `OFFER` or `ERROR`; the guest checks
//! the offer and answers `READY` or `ERROR`. A guest that wants sub-channels says
//! `HELLO_SET` with how many; the host answers `OFFER_SET` with at most that many (its
//! service's limit, maybe none) in the same memory, every channel's rings back to back
//! after the memory header and the buffer area after all of them. Each sub-channel has its
//! own eventfds and its own socket pair, whose hang-up tells its peer it was closed, so
//! either side closes one sub-channel alone. Each side reads a bounded number of bytes
//! (bodies ≤ [`MAX_BODY`]) before a deadline; fds come only with `OFFER`.
//!
//! A hand-over (on its own socket, `crate::handover`): the successor sends `TAKE_OVER`; the
//! predecessor sends `HANDOVER` per endpoint and the successor answers each `CONFIRM` or
//! `ERROR`; then `DONE`. A `HANDOVER` body may be up to [`MAX_HANDOVER_BODY`].

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::error::{RefusalCode, ShmError};
use crate::sys;

/// The first 8 bytes of every handshake message.
pub(crate) const MAGIC: [u8; 8] = *b"VMLNKSHM";
/// The handshake version this crate speaks.
pub(crate) const VERSION: u16 = 1;

pub(crate) const HELLO: u16 = 1;
pub(crate) const OFFER: u16 = 2;
pub(crate) const ERROR: u16 = 3;
pub(crate) const READY: u16 = 4;
/// A successor asks a serving process for its endpoints (no body).
pub(crate) const TAKE_OVER: u16 = 5;
/// One endpoint handed over: [`HandOverBody`], the service name, the saved state; with
/// the memfd, the bell the side waits on, the bell it signals and the peer's socket.
pub(crate) const HANDOVER: u16 = 6;
/// The successor took the endpoint (no body).
pub(crate) const CONFIRM: u16 = 7;
/// No more endpoints follow (no body).
pub(crate) const DONE: u16 = 8;
/// A guest asks for a service with sub-channels: [`SetHelloBody`], the service name.
pub(crate) const HELLO_SET: u16 = 9;
/// The host offers a channel set: [`OfferBody`] (`flags`: the sub-channel count), the
/// service name; fds as the module's table says.
pub(crate) const OFFER_SET: u16 = 10;

/// The largest message body either side accepts.
pub(crate) const MAX_BODY: usize = 2048;
/// The longest service name.
pub(crate) const MAX_SERVICE_NAME: usize = 255;
/// The longest explanation in an error message.
pub(crate) const MAX_ERROR_TEXT: usize = 1024;
/// Fds that come with an offer.
pub(crate) const OFFER_FDS: usize = 3;
/// Fds of a [`HANDOVER`] message.
pub(crate) const HANDOVER_FDS: usize = 4;
/// The largest [`HANDOVER`] body: the fixed part, a service name, the largest saved
/// state (a queue of at most 64 MiB and its descriptions) and the application's state.
pub(crate) const MAX_HANDOVER_BODY: usize = (64 << 20) + (1 << 20) + MAX_APP_STATE;
/// The largest application state a hand-over carries.
pub(crate) const MAX_APP_STATE: usize = 1 << 20;

/// Every message's header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub(crate) struct Header {
    pub(crate) magic: [u8; 8],
    pub(crate) version: U16,
    pub(crate) kind: U16,
    pub(crate) body_len: U32,
}

/// The fixed part of an offer's body.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub(crate) struct OfferBody {
    /// The guest→host ring's length, control page included.
    pub(crate) guest_to_host: U64,
    /// The host→guest ring's length, control page included.
    pub(crate) host_to_guest: U64,
    /// The buffer area's length.
    pub(crate) buffer: U64,
    /// Reserved, zero.
    pub(crate) flags: U32,
    /// Bytes of service name after this struct.
    pub(crate) service_len: U32,
}

/// The fixed part of a [`HELLO_SET`] body (8 bytes); the service name follows.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub(crate) struct SetHelloBody {
    /// Sub-channels asked for, beside the primary.
    pub(crate) sub_channels: U16,
    /// Reserved, zero.
    pub(crate) reserved: U16,
    /// Reserved, zero.
    pub(crate) reserved2: U32,
}

/// The fixed part of a [`HANDOVER`] body (56 bytes); the service name, the saved
/// endpoint and the application's state follow.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub(crate) struct HandOverBody {
    pub(crate) guest_to_host: U64,
    pub(crate) host_to_guest: U64,
    pub(crate) buffer: U64,
    /// 0 host, 1 guest.
    pub(crate) role: U32,
    pub(crate) peer_pid: U32,
    pub(crate) peer_uid: U32,
    pub(crate) peer_gid: U32,
    pub(crate) service_len: U32,
    pub(crate) state_len: U32,
    /// The application's own state that travels with the endpoint.
    pub(crate) app_len: U32,
    pub(crate) reserved: U32,
}

/// The fixed part of an error message's body.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub(crate) struct ErrorBody {
    pub(crate) code: U32,
    pub(crate) reserved: U32,
}

/// A received message.
#[derive(Debug)]
pub(crate) struct Message {
    pub(crate) kind: u16,
    pub(crate) body: Vec<u8>,
    pub(crate) fds: Vec<OwnedFd>,
}

/// Checks a service name.
pub(crate) fn check_service_name(name: &[u8]) -> Result<&str, ShmError> {
    if name.is_empty() {
        return Err(ShmError::BadServiceName("empty"));
    }
    if name.len() > MAX_SERVICE_NAME {
        return Err(ShmError::BadServiceName("longer than 255 bytes"));
    }
    std::str::from_utf8(name).map_err(|_| ShmError::BadServiceName("not UTF-8"))
}

/// A deadline for one handshake, with the timeout it came from for error messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    pub(crate) at: Instant,
    pub(crate) timeout: Duration,
}

impl Deadline {
    pub(crate) fn after(timeout: Duration) -> Self {
        Self {
            at: Instant::now() + timeout,
            timeout,
        }
    }
}

/// Sends one message, with `fds` attached to its first byte.
pub(crate) fn send(
    sock: BorrowedFd<'_>,
    kind: u16,
    body: &[u8],
    fds: &[BorrowedFd<'_>],
    deadline: Deadline,
) -> Result<(), ShmError> {
    let header = Header {
        magic: MAGIC,
        version: VERSION.into(),
        kind: kind.into(),
        body_len: (body.len() as u32).into(),
    };
    let mut bytes = Vec::with_capacity(size_of::<Header>() + body.len());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(body);
    let mut sent = 0;
    while sent < bytes.len() {
        let attach = if sent == 0 { fds } else { &[] };
        match sys::send_with_fds(sock, &bytes[sent..], attach) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !sys::poll_one(sock, sys::PollFlags::POLLOUT, deadline.at)
                    .map_err(ShmError::io("poll"))?
                {
                    return Err(ShmError::TimedOut(deadline.timeout, "sending"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                return Err(ShmError::PeerClosed { during: "sending" });
            }
            Err(e) => return Err(ShmError::io("sendmsg")(e)),
        }
    }
    Ok(())
}

/// Sends an error message (best effort: the peer may be gone already).
pub(crate) fn send_error(sock: BorrowedFd<'_>, code: RefusalCode, text: &str, deadline: Deadline) {
    let mut cut = text.len().min(MAX_ERROR_TEXT);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let fixed = ErrorBody {
        code: code.to_wire().into(),
        reserved: 0.into(),
    };
    let mut body = fixed.as_bytes().to_vec();
    body.extend_from_slice(&text.as_bytes()[..cut]);
    let _ = send(sock, ERROR, &body, &[], deadline);
}

/// Reads exactly `buf.len()` bytes, collecting any fds that come along.
fn recv_exact(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    truncated: &mut bool,
    deadline: Deadline,
    during: &'static str,
) -> Result<(), ShmError> {
    let mut got = 0;
    while got < buf.len() {
        match sys::recv_with_fds(sock, &mut buf[got..]) {
            Ok(r) => {
                *truncated |= r.truncated;
                // Fds beyond what any message carries are closed here, at once.
                for fd in r.fds {
                    if fds.len() < sys::MAX_FDS + 1 {
                        fds.push(fd);
                    }
                }
                if r.len == 0 {
                    return Err(ShmError::PeerClosed { during });
                }
                got += r.len;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !sys::poll_one(sock, sys::PollFlags::POLLIN, deadline.at)
                    .map_err(ShmError::io("poll"))?
                {
                    return Err(ShmError::TimedOut(deadline.timeout, during));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(ShmError::PeerClosed { during });
            }
            Err(e) => return Err(ShmError::io("recvmsg")(e)),
        }
    }
    Ok(())
}

/// Receives one message. Checks the magic, the version, the body length, that the kernel
/// did not truncate the ancillary data, and that exactly the fds `kind` carries came
/// along; on any failure every received fd is closed (dropped).
pub(crate) fn recv(
    sock: impl AsFd,
    deadline: Deadline,
    during: &'static str,
) -> Result<Message, ShmError> {
    recv_limited(sock, deadline, during, MAX_BODY)
}

/// [`recv`] with another limit on the body's length. The body is read in pieces of at
/// most 64 KiB and grows as bytes arrive, so a length the peer announces but does not
/// send allocates nothing.
pub(crate) fn recv_limited(
    sock: impl AsFd,
    deadline: Deadline,
    during: &'static str,
    max_body: usize,
) -> Result<Message, ShmError> {
    let sock = sock.as_fd();
    let mut fds = Vec::new();
    let mut truncated = false;
    let mut raw = [0u8; size_of::<Header>()];
    recv_exact(sock, &mut raw, &mut fds, &mut truncated, deadline, during)?;
    let header = Header::read_from_bytes(&raw).expect("exact size");
    if header.magic != MAGIC {
        return Err(ShmError::BadMagic(header.magic));
    }
    let version = header.version.get();
    if version != VERSION {
        return Err(ShmError::UnsupportedVersion {
            peer: version,
            ours: VERSION,
        });
    }
    let len = header.body_len.get() as usize;
    if len > max_body {
        return Err(ShmError::Malformed(
            "message body longer than its kind allows",
        ));
    }
    let mut body = Vec::new();
    while body.len() < len {
        let start = body.len();
        body.resize(start + (len - start).min(64 << 10), 0);
        recv_exact(
            sock,
            &mut body[start..],
            &mut fds,
            &mut truncated,
            deadline,
            during,
        )?;
    }
    if truncated {
        return Err(ShmError::ControlTruncated);
    }
    let kind = header.kind.get();
    let expected = match kind {
        OFFER => OFFER_FDS,
        HANDOVER => HANDOVER_FDS,
        // Set by the body: the guest checks the count against the offer it parses.
        OFFER_SET => fds.len(),
        _ => 0,
    };
    if fds.len() != expected {
        return Err(ShmError::UnexpectedFds {
            expected,
            received: fds.len(),
        });
    }
    Ok(Message { kind, body, fds })
}

/// Parses an error message's body into the error it reports.
pub(crate) fn parse_error(body: &[u8]) -> ShmError {
    match ErrorBody::read_from_prefix(body) {
        Ok((fixed, text)) => ShmError::Refused {
            code: RefusalCode::from_wire(fixed.code.get()),
            message: String::from_utf8_lossy(&text[..text.len().min(MAX_ERROR_TEXT)]).into_owned(),
        },
        Err(_) => ShmError::Malformed("error message shorter than its fixed part"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn wire_layout_is_pinned() {
        assert_eq!(size_of::<Header>(), 16);
        assert_eq!(offset_of!(Header, version), 8);
        assert_eq!(offset_of!(Header, kind), 10);
        assert_eq!(offset_of!(Header, body_len), 12);
        assert_eq!(size_of::<OfferBody>(), 32);
        assert_eq!(offset_of!(OfferBody, host_to_guest), 8);
        assert_eq!(offset_of!(OfferBody, buffer), 16);
        assert_eq!(offset_of!(OfferBody, flags), 24);
        assert_eq!(offset_of!(OfferBody, service_len), 28);
        assert_eq!(size_of::<ErrorBody>(), 8);
        assert_eq!(size_of::<SetHelloBody>(), 8);
        assert_eq!(offset_of!(SetHelloBody, reserved2), 4);
    }

    #[test]
    fn service_names() {
        assert!(check_service_name(b"").is_err());
        assert!(check_service_name(&[b'a'; 256]).is_err());
        assert!(check_service_name(&[0xff]).is_err());
        assert_eq!(check_service_name(b"kvp").unwrap(), "kvp");
    }
}
