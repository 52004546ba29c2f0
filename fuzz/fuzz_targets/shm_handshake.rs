//! The shm rendezvous handshake against a hostile peer that talks back.
//!
//! One end of a `UnixStream::pair()` goes to the library — the host side
//! (`Service::serve_stream`, under a `Policy` the input builds) or the guest side
//! (`Guest::connect_stream`), chosen by the input — and a peer thread plays the other end
//! from a script, interleaved with the handshake: it writes raw bytes or framed messages
//! (right magic, any version / kind / body / declared length, cut short, or split in two
//! writes with a pause between), hellos, readies, offers built from a layout with a memfd of
//! the right or wrong size and seals (carrying the layout's memory header), set hellos that
//! ask for sub-channels and set offers of up to three sub-channels with any fds for their
//! bells and sockets, each write with fds attached via `SCM_RIGHTS` (memfds, eventfds,
//! /dev/null, socket ends); the service offers, or the guest asks for, up to four
//! sub-channels. It
//! reads what our side sent (waiting for it, closing any fds that come along), so it can
//! answer after our hello or offer or write after our ready; it pauses, and shuts down its
//! write half. After the script its end is closed or left open (the handshake timeout is
//! 20 ms, so a silent peer costs one timeout).
//!
//! The socket pair always carries our own credentials; the input varies the `Policy`
//! instead (same uid, nobody, lists of uids and gids that contain ours or not), so the same
//! peer is accepted or refused.
//!
//! Asserted: no panic; every call returns (the handshake timeout, and libFuzzer
//! `-timeout`); a failure is a `ShmError` whose `Display` is non-empty; a success hands out
//! an endpoint for the service asked for, whose peer credentials are ours (pid, uid, gid),
//! with no more sub-channels than the guest asked for and the service offers;
//! the host succeeds only if the policy allows us, and fails with `NotAllowed` exactly
//! naming us and the service, and only when the policy refuses us; a refused peer receives
//! no offer and no fds; and the process has exactly the fds it had before once the input's
//! sockets and endpoint are dropped (`/proc/self/fd` counted around each input).
#![no_main]

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmlink_shm::{Guest, Layout, PeerCredentials, Policy, Service, ShmError};

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
    /// A set offer (kind 10): an offer whose flags are `subs % 4` sub-channels, its memfd
    /// sized and headed for that many (plus `delta` pages), then the fds in `extra` (the
    /// channels' bells and socket ends, or anything else), up to 15.
    OfferSet {
        pages: u8,
        subs: u8,
        name: Option<Vec<u8>>,
        memfd: Option<(i8, bool)>,
        extra: Vec<FdKind>,
    },
    /// A hello (kind 1) or ready (kind 4) with the right framing.
    Hello(Option<Vec<u8>>),
    /// A set hello (kind 9): a sub-channel count, reserved words, a name.
    HelloSet {
        count: u16,
        reserved: u16,
        name: Option<Vec<u8>>,
    },
    Ready,
}

#[derive(Arbitrary, Debug)]
struct Send {
    chunk: Chunk,
    fds: Vec<FdKind>,
    /// Write only this many bytes first (with the fds), then the rest after a pause.
    split: Option<u16>,
}

#[derive(Arbitrary, Debug)]
enum Action {
    Send(Send),
    /// Waits up to `wait_ms % 30` ms for our side to send something, then reads all that
    /// is there (closing any fds that come along).
    Read {
        wait_ms: u8,
    },
    /// Does nothing for up to 3 ms.
    Pause {
        us: u16,
    },
    /// Shuts down the write half: our side sees the end of the stream.
    ShutdownWrite,
}

/// A uid or gid for the policy.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Id {
    /// Ours.
    Own,
    /// Ours plus 1 + n: somebody else.
    Other(u8),
    Raw(u32),
}

/// The host's policy.
#[derive(Arbitrary, Debug)]
enum PolicySel {
    /// `Policy::default()` (same uid).
    Default,
    /// `Policy::same_uid()` plus more ids.
    SameUidAnd { uids: Vec<Id>, gids: Vec<Id> },
    /// `Policy::nobody()` plus these ids.
    Only { uids: Vec<Id>, gids: Vec<Id> },
}

#[derive(Arbitrary, Debug)]
struct Input {
    role: Role,
    policy: PolicySel,
    actions: Vec<Action>,
    keep_open: bool,
    /// As host: how many sub-channels the service offers (`% 5`); as guest: how many it
    /// asks for (`% 5`), or a plain hello.
    subs: Option<u8>,
}

/// At most this many script actions per input.
const MAX_ACTIONS: usize = 12;
/// A script's reads wait at most this long in all.
const READ_BUDGET: Duration = Duration::from_millis(40);

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

/// One `sendmsg` of `data` with `fds` attached (any number, up to 16) as `SCM_RIGHTS`.
fn send_with_fds(sock: &UnixStream, data: &[u8], fds: &[OwnedFd]) -> bool {
    let fds = &fds[..fds.len().min(16)];
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
                let fd = memfd(len as usize, *sealed);
                // The memory header a host writes, where the page fits: without it the guest
                // uses nothing, so its success path would never be reached.
                if let (Some(fd), Ok(area)) = (&fd, layout.area())
                    && len >= 4096
                {
                    let page = area.encode();
                    // SAFETY: `fd` is an open memfd; `page` is a live buffer of its length.
                    unsafe { libc::pwrite(fd.as_raw_fd(), page.as_ptr().cast(), page.len(), 0) };
                }
                fds.extend(fd);
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
        Chunk::OfferSet {
            pages,
            subs,
            name,
            memfd: mfd,
            extra,
        } => {
            let subs = u32::from(*subs % 4);
            let layout = Layout::symmetric(u64::from(*pages % 3) * 4096, u64::from(*pages / 3 % 3) * 4096);
            let name = name.clone().unwrap_or_else(|| SERVICE.as_bytes().to_vec());
            let name = &name[..name.len().min(300)];
            let mut body = Vec::new();
            body.extend_from_slice(&layout.guest_to_host.to_le_bytes());
            body.extend_from_slice(&layout.host_to_guest.to_le_bytes());
            body.extend_from_slice(&layout.buffer.to_le_bytes());
            body.extend_from_slice(&subs.to_le_bytes());
            body.extend_from_slice(&(name.len() as u32).to_le_bytes());
            body.extend_from_slice(name);
            if let (Some((delta, sealed)), Ok(len)) = (mfd, layout.validate_set(subs)) {
                let len = (len as i64 + *delta as i64 * 4096).clamp(0, 1 << 20);
                let fd = memfd(len as usize, *sealed);
                if let (Some(fd), Ok(area)) = (&fd, layout.area_for(subs))
                    && len >= 4096
                {
                    let page = area.encode();
                    // SAFETY: `fd` is an open memfd; `page` is a live buffer of its length.
                    unsafe { libc::pwrite(fd.as_raw_fd(), page.as_ptr().cast(), page.len(), 0) };
                }
                fds.extend(fd);
            }
            fds.extend(extra.iter().take(15).filter_map(|k| make_fd(*k)));
            frame(1, 10, body.len() as u32, &body)
        }
        Chunk::HelloSet {
            count,
            reserved,
            name,
        } => {
            let name = name.clone().unwrap_or_else(|| SERVICE.as_bytes().to_vec());
            let mut body = count.to_le_bytes().to_vec();
            body.extend_from_slice(&reserved.to_le_bytes());
            body.extend_from_slice(&[0; 4]);
            body.extend_from_slice(&name[..name.len().min(4096)]);
            frame(1, 9, body.len() as u32, &body)
        }
        Chunk::Ready => frame(1, 4, 0, &[]),
    }
}

/// Our own credentials, as `SO_PEERCRED` reports them over a socket pair.
fn own_credentials() -> PeerCredentials {
    // SAFETY: these calls take no arguments and cannot fail.
    let (pid, uid, gid) = unsafe { (libc::getpid(), libc::geteuid(), libc::getegid()) };
    PeerCredentials { pid, uid, gid }
}

fn resolve(id: Id, own: u32) -> u32 {
    match id {
        Id::Own => own,
        Id::Other(n) => own.wrapping_add(1 + u32::from(n)),
        Id::Raw(v) => v,
    }
}

/// The policy, and whether it allows `me` (worked out here, not by the library).
fn build_policy(sel: &PolicySel, me: &PeerCredentials) -> (Policy, bool) {
    let (mut policy, mut allowed, uids, gids) = match sel {
        PolicySel::Default => return (Policy::default(), true),
        PolicySel::SameUidAnd { uids, gids } => (Policy::same_uid(), true, uids, gids),
        PolicySel::Only { uids, gids } => (Policy::nobody(), false, uids, gids),
    };
    for &id in uids.iter().take(4) {
        let uid = resolve(id, me.uid);
        allowed |= uid == me.uid;
        policy = policy.allow_uid(uid);
    }
    for &id in gids.iter().take(4) {
        let gid = resolve(id, me.gid);
        allowed |= gid == me.gid;
        policy = policy.allow_gid(gid);
    }
    (policy, allowed)
}

/// What the peer read from our side.
#[derive(Default)]
struct Heard {
    bytes: Vec<u8>,
    fds: usize,
}

impl Heard {
    /// True when one of the messages our side sent (framed: magic, version, kind, body
    /// length, body) is an offer.
    fn saw_offer(&self) -> bool {
        let mut rest = &self.bytes[..];
        while rest.len() >= 16 && &rest[..8] == MAGIC {
            if rest[10..12] == 2u16.to_le_bytes() || rest[10..12] == 10u16.to_le_bytes() {
                return true;
            }
            let len = u32::from_le_bytes(rest[12..16].try_into().unwrap()) as usize;
            rest = &rest[(16 + len).min(rest.len())..];
        }
        false
    }
}

/// Reads whatever is queued on `sock` (non-blocking), closing received fds.
fn read_available(sock: &UnixStream, heard: &mut Heard) {
    loop {
        let mut data = [0u8; 4096];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        #[repr(C, align(8))]
        struct Buf([u8; 256]);
        let mut cbuf = Buf([0; 256]);
        // SAFETY: `msghdr` is plain old data, valid when zeroed.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = cbuf.0.len() as _;
        // SAFETY: `msg` points at live buffers of the sizes it states.
        let n = unsafe {
            libc::recvmsg(
                sock.as_raw_fd(),
                &raw mut msg,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n <= 0 {
            return;
        }
        heard.bytes.extend_from_slice(&data[..n as usize]);
        // SAFETY: `msg` was filled by the kernel; CMSG_FIRSTHDR / CMSG_NXTHDR stay inside
        // its control buffer and return null past the end.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
        while !cmsg.is_null() {
            // SAFETY: `cmsg` is a header inside the control buffer.
            let (level, kind, len) =
                unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
            if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
                // SAFETY: as above; CMSG_LEN(0) is the header's size.
                let header = unsafe { libc::CMSG_LEN(0) } as usize;
                let count = (len as usize).saturating_sub(header) / size_of::<RawFd>();
                // SAFETY: the kernel wrote `count` fds after the header.
                let p = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
                for i in 0..count {
                    // SAFETY: the fds are new in this process, owned by nobody else; the
                    // `OwnedFd` closes each at once.
                    drop(unsafe { OwnedFd::from_raw_fd(p.add(i).read_unaligned()) });
                    heard.fds += 1;
                }
            }
            // SAFETY: as for CMSG_FIRSTHDR.
            cmsg = unsafe { libc::CMSG_NXTHDR(&raw const msg, cmsg) };
        }
    }
}

/// Waits up to `wait` for `sock` to be readable (or hung up).
fn wait_readable(sock: &UnixStream, wait: Duration) {
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live `pollfd`.
    unsafe { libc::poll(&raw mut p, 1, wait.as_millis() as libc::c_int) };
}

/// The peer's side of one input, on the peer thread.
fn play(
    ours: UnixStream,
    actions: Vec<Action>,
    keep_open: bool,
    done: mpsc::Receiver<()>,
) -> Heard {
    // A peer that writes more than the socket buffer holds would block us: never wait.
    ours.set_nonblocking(true).unwrap();
    let mut heard = Heard::default();
    let mut total = 0;
    let mut read_budget = READ_BUDGET;
    for action in actions.iter().take(MAX_ACTIONS) {
        match action {
            Action::Send(s) => {
                let mut fds: Vec<OwnedFd> = Vec::new();
                let data = encode(&s.chunk, &mut fds);
                fds.extend(s.fds.iter().take(5).filter_map(|k| make_fd(*k)));
                total += data.len();
                if total > 64 * 1024 {
                    break;
                }
                let at = s
                    .split
                    .map_or(data.len(), |at| (at as usize).min(data.len()));
                if !send_with_fds(&ours, &data[..at], &fds) {
                    break;
                }
                if at < data.len() {
                    std::thread::sleep(Duration::from_micros(200));
                    if !send_with_fds(&ours, &data[at..], &[]) {
                        break;
                    }
                }
                // Our copies of the fds close here; the kernel holds the in-flight ones.
            }
            Action::Read { wait_ms } => {
                let wait = Duration::from_millis(u64::from(*wait_ms % 30)).min(read_budget);
                let start = Instant::now();
                wait_readable(&ours, wait);
                read_budget = read_budget.saturating_sub(start.elapsed());
                read_available(&ours, &mut heard);
            }
            Action::Pause { us } => {
                std::thread::sleep(Duration::from_micros(u64::from(*us) % 3000));
            }
            Action::ShutdownWrite => {
                let _ = ours.shutdown(std::net::Shutdown::Write);
            }
        }
    }
    if !keep_open {
        let _ = ours.shutdown(std::net::Shutdown::Write);
    }
    // Keep our end until our side is done, then take what it said last (a refusal).
    let _ = done.recv_timeout(Duration::from_secs(5));
    read_available(&ours, &mut heard);
    heard
}

type Job = Box<dyn FnOnce() + std::marker::Send>;

/// The peer thread, started once for all inputs (a thread per input would cost more than
/// the input).
fn peer_thread() -> &'static Mutex<mpsc::Sender<Job>> {
    static PEER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    PEER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("peer".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .unwrap();
        Mutex::new(tx)
    })
}

fuzz_target!(|input: Input| {
    // The monitor's socket is one per process, opened by the first endpoint and kept: not
    // this input's fd. Counting fds per input needs it off.
    vmlink_shm::monitor::disable();
    let me = own_credentials();
    let (policy, allowed) = build_policy(&input.policy, &me);
    let peer = peer_thread();
    let before = fd_count();
    {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        let (heard_tx, heard_rx) = mpsc::channel();
        let Input {
            role,
            actions,
            keep_open,
            subs,
            ..
        } = input;
        let job: Job = Box::new(move || {
            let heard = play(ours, actions, keep_open, done_rx);
            let _ = heard_tx.send(heard);
        });
        peer.lock().unwrap().send(job).unwrap();
        let subs = subs.map(|n| u32::from(n % 5));
        let result = match role {
            Role::Host => Service::new(SERVICE)
                .with_layout(Layout::symmetric(4096, 4096))
                .with_policy(policy)
                .with_sub_channels(subs.unwrap_or(0))
                .with_handshake_timeout(TIMEOUT)
                .serve_stream(theirs),
            Role::Guest => {
                let guest = Guest::new(SERVICE).with_handshake_timeout(TIMEOUT);
                match subs {
                    Some(n) => guest.with_sub_channels(n),
                    None => guest,
                }
                .connect_stream(theirs)
            }
        };
        let host = matches!(role, Role::Host);
        match &result {
            Ok(endpoint) => {
                assert_eq!(endpoint.service(), SERVICE);
                // Never more sub-channels than the guest asked for or the service offers.
                let most = subs.unwrap_or(0);
                assert!(endpoint.sub_channel_count() <= most as usize);
                assert!(host || subs.is_some() || endpoint.sub_channel_count() == 0);
                assert_eq!(endpoint.peer(), me, "the endpoint's peer credentials");
                assert!(
                    !host || allowed,
                    "the host accepted a peer its policy refuses"
                );
            }
            Err(ShmError::NotAllowed { peer, service }) => {
                assert!(host, "a guest reported NotAllowed");
                assert!(!allowed, "the host refused a peer its policy allows");
                assert_eq!(*peer, me, "NotAllowed names someone else");
                assert_eq!(service, SERVICE);
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        drop(result);
        let _ = done_tx.send(());
        let heard = heard_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the peer thread never finished");
        if host && !allowed {
            assert!(!heard.saw_offer(), "a refused peer received an offer");
            assert_eq!(heard.fds, 0, "a refused peer received fds");
        }
    }
    let after = fd_count();
    assert_eq!(
        before, after,
        "fd leak: {before} fds before the input, {after} after"
    );
});
