//! The shm rendezvous handshake fed by a hostile peer.
//!
//! One end of a `UnixStream::pair()` goes to the library — the host side
//! (`Service::serve_stream`) or the guest side (`Guest::connect_stream`), chosen by the
//! input — and the fuzzer writes into the other end: raw bytes, or framed messages (right
//! magic, any version / kind / body / declared length), an offer built from a layout with a
//! memfd of the right or wrong size and seals, each chunk with zero to five fds attached via
//! `SCM_RIGHTS` (memfds, eventfds, /dev/null, socket ends). Everything is written before the
//! library runs; the fuzzer's end is then closed or left open (the handshake timeout is
//! 20 ms, so a silent peer costs one timeout).
//!
//! Asserted: no panic; every call returns (the handshake timeout, and libFuzzer
//! `-timeout`); a failure is a `ShmError` whose `Display` is non-empty; a success hands out
//! an endpoint for the service asked for; and the process has exactly the fds it had before
//! once the input's sockets and endpoint are dropped (`/proc/self/fd` counted around each
//! input).
#![no_main]

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmlink_shm::{Guest, Layout, Service};

const SERVICE: &str = "svc";
const MAGIC: &[u8; 8] = b"VMLNKSHM";
const TIMEOUT: Duration = Duration::from_millis(20);

#[derive(Arbitrary, Debug)]
enum Role {
    Host,
    Guest,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum FdKind {
    /// A memfd of `pages` * 4096 bytes with the required seals (or not).
    Memfd {
        pages: u8,
        sealed: bool,
    },
    EventFd,
    DevNull,
    SocketEnd,
}

#[derive(Arbitrary, Debug)]
enum Chunk {
    Raw(Vec<u8>),
    Message {
        version: Option<u16>,
        kind: u16,
        body: Vec<u8>,
        declared_len: Option<u32>,
        /// Send only this many bytes of the message.
        cut: Option<u16>,
    },
    /// An offer (kind 2) for a layout of ring (control page included) and buffer page counts.
    Offer {
        g2h_pages: u8,
        h2g_pages: u8,
        buffer_pages: u8,
        flags: u32,
        name: Option<Vec<u8>>,
        /// Attach a memfd of the layout's size plus this many pages, sealed or not.
        memfd: Option<(i8, bool)>,
        bells: u8,
    },
    /// A hello (kind 1) or ready (kind 4) with the right framing.
    Hello(Option<Vec<u8>>),
    Ready,
}

#[derive(Arbitrary, Debug)]
struct Send {
    chunk: Chunk,
    fds: Vec<FdKind>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    role: Role,
    sends: Vec<Send>,
    keep_open: bool,
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn owned(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: `fd` was just returned by a successful syscall that creates a new fd, which
    // nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn memfd(len: usize, sealed: bool) -> Option<OwnedFd> {
    // SAFETY: a C string literal and flags; creates a new fd.
    let fd = owned(unsafe {
        libc::memfd_create(
            c"fuzz".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    })?;
    // SAFETY: `fd` is an open memfd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
        return None;
    }
    if sealed {
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: `fd` is an open memfd created with MFD_ALLOW_SEALING.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    }
    Some(fd)
}

fn make_fd(kind: FdKind) -> Option<OwnedFd> {
    match kind {
        FdKind::Memfd { pages, sealed } => memfd((pages as usize % 64) * 4096, sealed),
        // SAFETY: creates a new fd.
        FdKind::EventFd => owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) }),
        // SAFETY: a C string literal; creates a new fd.
        FdKind::DevNull => {
            owned(unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })
        }
        FdKind::SocketEnd => UnixStream::pair().ok().map(|(a, _b)| OwnedFd::from(a)),
    }
}

/// One `sendmsg` of `data` with `fds` attached (any number, up to 8) as `SCM_RIGHTS`.
fn send_with_fds(sock: &UnixStream, data: &[u8], fds: &[OwnedFd]) -> bool {
    let fds = &fds[..fds.len().min(8)];
    if fds.is_empty() || data.is_empty() {
        return (&*sock).write_all(data).is_ok();
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    #[repr(C, align(8))]
    struct Buf([u8; 128]);
    let mut cbuf = Buf([0; 128]);
    // SAFETY: `msghdr` is plain old data, valid when zeroed.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: CMSG_SPACE / CMSG_LEN only compute sizes.
    let space = unsafe { libc::CMSG_SPACE((fds.len() * 4) as u32) } as usize;
    // SAFETY: as above.
    let clen = unsafe { libc::CMSG_LEN((fds.len() * 4) as u32) } as usize;
    assert!(space <= cbuf.0.len());
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` has a control buffer of `space` bytes, room for one header.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    assert!(!cmsg.is_null());
    // SAFETY: `cmsg` points into `cbuf`, aligned and with room for a header and the fds
    // (`space` was reserved for exactly that); CMSG_DATA points just past the header.
    unsafe {
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = clen as _;
        let p = libc::CMSG_DATA(cmsg).cast::<RawFd>();
        for (i, fd) in fds.iter().enumerate() {
            p.add(i).write_unaligned(fd.as_raw_fd());
        }
    }
    // SAFETY: `msg` points at live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return false;
    }
    (n as usize) >= data.len() || (&*sock).write_all(&data[n as usize..]).is_ok()
}

fn frame(version: u16, kind: u16, declared: u32, body: &[u8]) -> Vec<u8> {
    let mut m = MAGIC.to_vec();
    m.extend_from_slice(&version.to_le_bytes());
    m.extend_from_slice(&kind.to_le_bytes());
    m.extend_from_slice(&declared.to_le_bytes());
    m.extend_from_slice(body);
    m
}

fn encode(chunk: &Chunk, fds: &mut Vec<OwnedFd>) -> Vec<u8> {
    match chunk {
        Chunk::Raw(b) => b[..b.len().min(4096)].to_vec(),
        Chunk::Message {
            version,
            kind,
            body,
            declared_len,
            cut,
        } => {
            let body = &body[..body.len().min(4096)];
            let m = frame(
                version.unwrap_or(1),
                *kind,
                declared_len.unwrap_or(body.len() as u32),
                body,
            );
            match cut {
                Some(c) => m[..(*c as usize).min(m.len())].to_vec(),
                None => m,
            }
        }
        Chunk::Offer {
            g2h_pages,
            h2g_pages,
            buffer_pages,
            flags,
            name,
            memfd: mfd,
            bells,
        } => {
            let layout = Layout::new(
                (*g2h_pages as u64 % 8) * 4096,
                (*h2g_pages as u64 % 8) * 4096,
                (*buffer_pages as u64 % 8) * 4096,
            );
            let name = name.clone().unwrap_or_else(|| SERVICE.as_bytes().to_vec());
            let name = &name[..name.len().min(300)];
            let mut body = Vec::new();
            body.extend_from_slice(&layout.guest_to_host.to_le_bytes());
            body.extend_from_slice(&layout.host_to_guest.to_le_bytes());
            body.extend_from_slice(&layout.buffer.to_le_bytes());
            body.extend_from_slice(&flags.to_le_bytes());
            body.extend_from_slice(&(name.len() as u32).to_le_bytes());
            body.extend_from_slice(name);
            if let Some((delta, sealed)) = mfd {
                let len = (layout.total_len() as i64 + *delta as i64 * 4096).clamp(0, 1 << 20);
                fds.extend(memfd(len as usize, *sealed));
            }
            for _ in 0..(*bells % 4) {
                fds.extend(make_fd(FdKind::EventFd));
            }
            frame(1, 2, body.len() as u32, &body)
        }
        Chunk::Hello(name) => {
            let name = name.clone().unwrap_or_else(|| SERVICE.as_bytes().to_vec());
            frame(
                1,
                1,
                name.len().min(4096) as u32,
                &name[..name.len().min(4096)],
            )
        }
        Chunk::Ready => frame(1, 4, 0, &[]),
    }
}

fuzz_target!(|input: Input| {
    let before = fd_count();
    {
        let (ours, theirs) = UnixStream::pair().unwrap();
        // A peer that writes more than the socket buffer holds would block us: never wait.
        ours.set_nonblocking(true).unwrap();
        let mut total = 0;
        for s in input.sends.iter().take(8) {
            let mut fds: Vec<OwnedFd> = Vec::new();
            let data = encode(&s.chunk, &mut fds);
            fds.extend(s.fds.iter().take(5).filter_map(|k| make_fd(*k)));
            total += data.len();
            if total > 64 * 1024 || !send_with_fds(&ours, &data, &fds) {
                break;
            }
            // Our copies of the fds close here; the kernel holds the in-flight ones.
        }
        if !input.keep_open {
            let _ = ours.shutdown(std::net::Shutdown::Write);
        }
        let result = match input.role {
            Role::Host => Service::new(SERVICE)
                .with_layout(Layout::symmetric(4096, 4096))
                .with_handshake_timeout(TIMEOUT)
                .serve_stream(theirs),
            Role::Guest => Guest::new(SERVICE)
                .with_handshake_timeout(TIMEOUT)
                .connect_stream(theirs),
        };
        match result {
            Ok(endpoint) => assert_eq!(endpoint.service(), SERVICE),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        drop(ours);
    }
    let after = fd_count();
    assert_eq!(
        before, after,
        "fd leak: {before} fds before the input, {after} after"
    );
});
