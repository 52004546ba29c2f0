//! The host side: it allocates the memory and the doorbells, judges who connects, and hands
//! both over.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use vmlink_channel::{Channel, Config, EventFdDoorbell};
use vmlink_ring::init_control;
use zerocopy::{FromBytes, IntoBytes};

use crate::endpoint::{Endpoint, Role, effective_config};
use crate::error::{RefusalCode, ShmError};
use crate::memory::{Layout, Mapping, SharedMemory};
use crate::policy::{PeerCredentials, Policy};
use crate::protocol::{self, Deadline, OfferBody, SetHelloBody};
use crate::{SOCKET_FD_ENV, sys};

/// How long a handshake may take by default before the host gives up on the peer.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Handshakes a [`Listener`] runs at once; connections beyond are refused as busy.
pub const MAX_PENDING_HANDSHAKES: usize = 64;

/// A service the host offers: its name, the memory each channel gets, who may connect,
/// and how its channels behave.
#[derive(Debug, Clone)]
pub struct Service {
    name: String,
    layout: Layout,
    policy: Policy,
    config: Config,
    handshake_timeout: Duration,
    max_sub_channels: u32,
}

impl Service {
    /// A service named `name` (1 to 255 bytes of UTF-8) with the default layout
    /// ([`Layout::default`]), policy (same uid only), channel configuration and handshake
    /// timeout ([`DEFAULT_HANDSHAKE_TIMEOUT`]).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            layout: Layout::default(),
            policy: Policy::default(),
            config: Config::default(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_sub_channels: 0,
        }
    }

    /// The same service offering up to `max` sub-channels (at most
    /// [`MAX_SUB_CHANNELS`](crate::MAX_SUB_CHANNELS)) to a guest that asks for them
    /// ([`Guest::with_sub_channels`](crate::Guest::with_sub_channels)): each with the
    /// layout's two rings and its own doorbells, in the same memory, sharing its buffer
    /// area. A guest asking for more gets `max`; by default a service offers none.
    pub fn with_sub_channels(mut self, max: u32) -> Self {
        self.max_sub_channels = max;
        self
    }

    /// The same service with another memory layout.
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// The same service with another access policy.
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// The same service with another channel configuration for the host's ends. The GPA
    /// page limit is lowered to the buffer area's page count if it is above it (or unset).
    pub fn with_config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// The same service with another handshake timeout.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The memory layout each channel gets.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    fn check(&self) -> Result<(), ShmError> {
        protocol::check_service_name(self.name.as_bytes())?;
        self.layout.validate_set(self.max_sub_channels)?;
        Ok(())
    }

    /// Runs the host side of the handshake on an already-connected socket (e.g. one end of
    /// a `UnixStream::pair()`), blocking until it finishes or times out.
    pub fn serve_stream(&self, stream: UnixStream) -> Result<Endpoint, ShmError> {
        self.check()?;
        host_handshake(
            stream,
            std::slice::from_ref(self),
            hello_deadline(std::slice::from_ref(self)),
        )
    }

    /// Spawns `command` as the guest: it inherits one end of a socket pair, its number in
    /// the environment variable [`SOCKET_FD_ENV`] (see
    /// [`Guest::from_env`](crate::Guest::from_env)), and the host side of the handshake runs
    /// on the other end. On failure the child is killed and reaped.
    pub fn spawn(&self, command: &mut Command) -> Result<(Endpoint, Child), ShmError> {
        self.check()?;
        let (ours, theirs) = UnixStream::pair().map_err(ShmError::io("socketpair"))?;
        let raw = std::os::fd::AsRawFd::as_raw_fd(&theirs);
        command.env(SOCKET_FD_ENV, raw.to_string());
        // SAFETY: the closure runs in the child between fork and exec; it only makes one
        // fcntl call (async-signal-safe) and allocates nothing. Clearing close-on-exec on
        // this one fd in the child lets exactly the child inherit it.
        unsafe {
            command.pre_exec(move || sys::set_cloexec_raw(raw, false));
        }
        let mut child = command.spawn().map_err(ShmError::io("spawn the guest"))?;
        drop(theirs);
        let services = std::slice::from_ref(self);
        match host_handshake(ours, services, hello_deadline(services)) {
            Ok(endpoint) => Ok((endpoint, child)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }
}

/// Sends the refusal for `error` (best effort) and returns the error.
pub(crate) fn refuse(sock: &UnixStream, error: ShmError, deadline: Deadline) -> ShmError {
    if !matches!(
        error,
        ShmError::PeerClosed { .. } | ShmError::TimedOut(..) | ShmError::Refused { .. }
    ) {
        // A peer the access policy denies hears only that: the reason is the operator's.
        let message = match &error {
            ShmError::Denied { .. } => "not allowed".to_owned(),
            e => e.to_string(),
        };
        protocol::send_error(sock.as_fd(), error.refusal_code(), &message, deadline);
    }
    error
}

/// The deadline for a guest's hello: the shortest handshake timeout of the services.
fn hello_deadline(services: &[Service]) -> Deadline {
    let first = services
        .iter()
        .map(|s| s.handshake_timeout)
        .min()
        .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT);
    Deadline::after(first)
}

/// The host side of one handshake; the guest's hello must come by `deadline`.
fn host_handshake(
    stream: UnixStream,
    services: &[Service],
    deadline: Deadline,
) -> Result<Endpoint, ShmError> {
    let peer: PeerCredentials =
        sys::peer_credentials(stream.as_fd()).map_err(ShmError::io("SO_PEERCRED"))?;

    // 1. The guest's hello names the service (and, in a set hello, asks for sub-channels).
    let hello = protocol::recv(&stream, deadline, "waiting for the guest's hello")
        .map_err(|e| refuse(&stream, e, deadline))?;
    let (name, asked) = parse_hello(&hello).map_err(|e| refuse(&stream, e, deadline))?;
    let Some(service) = services.iter().find(|s| s.name == name) else {
        return Err(refuse(&stream, ShmError::UnknownService(name), deadline));
    };
    let deadline = Deadline::after(service.handshake_timeout);
    let subs = asked.map_or(0, |n| n.min(service.max_sub_channels));

    // 2. Credentials, before anything is sent.
    let identity = match service.policy.check(stream.as_fd(), &peer, &name) {
        Ok(identity) => identity,
        Err(e) => return Err(refuse(&stream, e, deadline)),
    };

    // 3. Memory and doorbells.
    let (memory, memfd) = create_memory(service.layout, subs).inspect_err(|_| {
        protocol::send_error(
            stream.as_fd(),
            RefusalCode::Internal,
            "the host could not allocate the channel",
            deadline,
        );
    })?;

    // 4. Our end of every channel, attached before the guest sees the memory (so nothing
    // the guest does later can race our first look at the rings). The primary's hang-up
    // fd is a duplicate of the socket (the original carries the rest of the handshake);
    // each sub-channel's is our end of a socket pair of its own, whose other end goes to
    // the guest, so closing one sub-channel hangs up that one alone.
    let layout = service.layout;
    let config = effective_config(service.config, layout);
    let mut channels = Vec::with_capacity(1 + subs as usize);
    // memfd, then per channel: guest→host bell (the host waits on it), host→guest bell (the
    // guest waits on it), and for a sub-channel the guest's end of its socket pair.
    let mut fds = vec![memfd];
    for index in 0..=subs {
        let view = memory.for_channel(index);
        let guest_bell = sys::eventfd().map_err(ShmError::io("eventfd"))?;
        let host_bell = sys::eventfd().map_err(ShmError::io("eventfd"))?;
        let (hangup, theirs) = if index == 0 {
            let dup = stream.try_clone().map_err(ShmError::io("dup the socket"))?;
            (OwnedFd::from(dup), None)
        } else {
            let (ours, theirs) = UnixStream::pair().map_err(ShmError::io("socketpair"))?;
            (OwnedFd::from(ours), Some(OwnedFd::from(theirs)))
        };
        let doorbell = EventFdDoorbell::from_fds(
            host_bell.try_clone().map_err(ShmError::io("dup"))?,
            guest_bell.try_clone().map_err(ShmError::io("dup"))?,
        )
        .with_hangup(hangup);
        let channel = Channel::new(view.host_to_guest(), view.guest_to_host(), doorbell, config)?;
        channels.push((channel, view));
        fds.extend([host_bell, guest_bell].into_iter().chain(theirs));
    }

    // 5. The offer, with the fds.
    let offer = OfferBody {
        guest_to_host: layout.guest_to_host.into(),
        host_to_guest: layout.host_to_guest.into(),
        buffer: layout.buffer.into(),
        flags: subs.into(),
        service_len: (name.len() as u32).into(),
    };
    let mut body = offer.as_bytes().to_vec();
    body.extend_from_slice(name.as_bytes());
    let kind = if asked.is_some() {
        protocol::OFFER_SET
    } else {
        protocol::OFFER
    };
    let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
    protocol::send(stream.as_fd(), kind, &body, &borrowed, deadline)?;
    drop(borrowed);
    drop(fds);

    // 6. The guest's verdict.
    let reply = protocol::recv(
        &stream,
        deadline,
        "waiting for the guest to accept the offer",
    )
    .map_err(|e| refuse(&stream, e, deadline))?;
    match reply.kind {
        protocol::READY if reply.body.is_empty() => {}
        protocol::ERROR => return Err(protocol::parse_error(&reply.body)),
        kind => {
            let e = ShmError::UnexpectedMessage {
                kind,
                expected: "ready",
            };
            return Err(refuse(&stream, e, deadline));
        }
    }
    let mut endpoints = channels.into_iter().map(|(channel, view)| {
        Endpoint::new(channel, view, peer, name.clone(), Role::Host).with_identity(identity.clone())
    });
    let primary = endpoints.next().expect("the primary channel");
    Ok(primary.with_sub_channels(endpoints.collect()))
}

/// The service a hello names, and for a set hello how many sub-channels it asks for.
fn parse_hello(hello: &protocol::Message) -> Result<(String, Option<u32>), ShmError> {
    let (name, asked) = match hello.kind {
        protocol::HELLO => (&hello.body[..], None),
        protocol::HELLO_SET => {
            let (fixed, name) = SetHelloBody::read_from_prefix(&hello.body)
                .map_err(|_| ShmError::Malformed("set hello shorter than its fixed part"))?;
            if fixed.reserved.get() != 0 || fixed.reserved2.get() != 0 {
                return Err(ShmError::Malformed("set hello with reserved bits set"));
            }
            (name, Some(u32::from(fixed.sub_channels.get())))
        }
        kind => {
            return Err(ShmError::UnexpectedMessage {
                kind,
                expected: "hello",
            });
        }
    };
    Ok((protocol::check_service_name(name)?.to_owned(), asked))
}

/// A sealed memfd of `layout`'s size with `sub_channels` sub-channels, mapped, its memory
/// header written and every control page initialised.
fn create_memory(layout: Layout, sub_channels: u32) -> Result<(SharedMemory, OwnedFd), ShmError> {
    let len = layout.validate_set(sub_channels)?;
    let memfd = sys::memfd_create(c"vmlink-shm").map_err(ShmError::io("memfd_create"))?;
    sys::ftruncate(memfd.as_fd(), len).map_err(ShmError::io("size the memfd"))?;
    sys::add_seals(memfd.as_fd(), sys::REQUIRED_SEALS).map_err(ShmError::io("seal the memfd"))?;
    let keep = memfd.try_clone().map_err(ShmError::io("dup"))?;
    let map = Mapping::map(keep, len as usize).map_err(ShmError::io("mmap"))?;
    let memory = SharedMemory::new_set(map, layout, sub_channels);
    memory.write_header();
    for index in 0..=sub_channels {
        let view = memory.for_channel(index);
        init_control(&view.guest_to_host());
        init_control(&view.host_to_guest());
    }
    Ok((memory, memfd))
}

impl SharedMemory {
    /// A new channel memory as the host makes it for a guest: a sealed memfd (it can
    /// neither shrink nor grow) of `layout`'s size with `sub_channels` sub-channels, mapped,
    /// its memory header written and every control page initialised. Returns the memory
    /// and the memfd to hand to the peer; for transports whose peer gets the memory some
    /// other way than this crate's handshake (an ivshmem server hands it to QEMU).
    pub fn create(layout: Layout, sub_channels: u32) -> Result<(Self, OwnedFd), ShmError> {
        create_memory(layout, sub_channels)
    }
}

type Outcome = Result<Endpoint, ShmError>;

/// Listens on a Unix socket path and hands each connecting guest a channel.
///
/// The socket lives in a directory only its owner can enter (created with mode 0700 if
/// missing; an existing directory must be owned by this user with no group or other
/// permissions). A background thread accepts connections; each handshake runs on a thread
/// of its own with a deadline, so a slow or silent client never holds up the others.
/// [`accept`](Self::accept) returns the outcome of each connection in the order the
/// handshakes finish: a channel, or the error that ended the handshake.
///
/// A connection that closes before sending a single byte (such as another listener's check
/// whether this socket is still served) is not a handshake: it is closed and not reported.
///
/// Binding fails with [`ShmError::SocketInUse`] when another listener serves the path (the
/// check does not disturb it), and with [`ShmError::NotASocket`] when the path is some
/// other file, which is left alone.
///
/// Dropping the listener stops accepting and removes the socket file; handshakes still in
/// flight finish (or time out) on their own and their channels are dropped.
#[derive(Debug)]
pub struct Listener {
    path: PathBuf,
    outcomes: Mutex<mpsc::Receiver<Outcome>>,
    stop: sys::EventFd,
    acceptor: Option<JoinHandle<()>>,
    _published: crate::monitor::ListenerRegistration,
}

impl Listener {
    /// Listens at `path` for guests of `service`.
    pub fn bind(path: impl AsRef<Path>, service: Service) -> Result<Self, ShmError> {
        Self::bind_services(path, vec![service])
    }

    /// Listens at `path` for guests of any of `services` (each guest names one).
    pub fn bind_services(path: impl AsRef<Path>, services: Vec<Service>) -> Result<Self, ShmError> {
        for s in &services {
            s.check()?;
        }
        let path = path.as_ref().to_path_buf();
        let listener = bind_private(&path)?;
        let stop = sys::EventFd::new().map_err(ShmError::io("eventfd"))?;
        let stop_wait = stop.try_clone().map_err(ShmError::io("dup"))?;
        let (tx, rx) = mpsc::channel();
        let published = crate::monitor::publish_listener(
            &path,
            crate::monitor::ListenerKind::Services,
            services.iter().map(|s| s.name().to_owned()).collect(),
        );
        let services: Arc<[Service]> = services.into();
        let acceptor = thread::Builder::new()
            .name("vmlink-shm-accept".into())
            .spawn(move || accept_loop(listener, stop_wait, services, tx))
            .map_err(ShmError::io("start the accept thread"))?;
        Ok(Self {
            path,
            outcomes: Mutex::new(rx),
            stop,
            acceptor: Some(acceptor),
            _published: published,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next connection's outcome.
    pub fn accept(&self) -> Result<Endpoint, ShmError> {
        let rx = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        rx.recv().map_err(|_| ShmError::ListenerStopped)?
    }

    /// Waits at most `timeout` for the next connection's outcome.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Endpoint, ShmError> {
        let rx = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        match rx.recv_timeout(timeout) {
            Ok(outcome) => outcome,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ShmError::AcceptTimedOut(timeout)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ShmError::ListenerStopped),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Wakes the accept thread's poll.
        let _ = self.stop.signal();
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let _ = fs::remove_file(&self.path);
    }
}

/// A non-blocking listening socket at `path`, in a directory only this user can enter
/// (created so if missing), replacing a stale socket file nobody serves; a served path is
/// [`ShmError::SocketInUse`], any other file [`ShmError::NotASocket`].
pub(crate) fn bind_private(path: &Path) -> Result<UnixListener, ShmError> {
    prepare_directory(path)?;
    remove_stale_socket(path)?;
    let listener = UnixListener::bind(path).map_err(ShmError::io("bind the socket"))?;
    listener
        .set_nonblocking(true)
        .map_err(ShmError::io("make the socket non-blocking"))?;
    Ok(listener)
}

/// Creates the socket's directory owner-only, or checks that an existing one is.
fn prepare_directory(path: &Path) -> Result<(), ShmError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    private_dir(&dir)
}

/// Creates `dir` owner-only (with its parents), or checks that an existing one is a
/// directory of this user's that nobody else may enter:
/// [`ShmError::InsecureDirectory`] if not.
pub(crate) fn private_dir(dir: &Path) -> Result<(), ShmError> {
    if !dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(ShmError::io("create the directory"))?;
    }
    let meta = fs::metadata(dir).map_err(ShmError::io("inspect the directory"))?;
    let me = sys::geteuid();
    let mode = meta.mode() & 0o7777;
    if !meta.is_dir() || meta.uid() != me || mode & 0o077 != 0 {
        return Err(ShmError::InsecureDirectory {
            path: dir.to_path_buf(),
            uid: meta.uid(),
            mode,
        });
    }
    Ok(())
}

/// Removes a socket file nobody listens on any more; refuses to touch anything else.
///
/// Whether someone listens is found out by connecting and closing again at once, without
/// a byte: a live [`Listener`] does not count such a connection as a handshake.
fn remove_stale_socket(path: &Path) -> Result<(), ShmError> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(ShmError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ShmError::SocketInUse(path.to_path_buf())),
        Err(_) => fs::remove_file(path).map_err(ShmError::io("remove a stale socket")),
    }
}

fn accept_loop(
    listener: UnixListener,
    stop: sys::EventFd,
    services: Arc<[Service]>,
    tx: mpsc::Sender<Outcome>,
) {
    let pending = Arc::new(AtomicUsize::new(0));
    loop {
        let mut fds = [
            sys::PollFd::new(listener.as_fd(), sys::PollFlags::POLLIN),
            sys::PollFd::new(stop.as_fd(), sys::PollFlags::POLLIN),
        ];
        if let Err(e) = sys::poll_until(&mut fds, None) {
            let _ = tx.send(Err(ShmError::io("poll the listener")(e.into())));
            return;
        }
        if !sys::revents(&fds[1]).is_empty() {
            return;
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => dispatch(stream, &services, &pending, &tx),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of fds or memory: report it, back off a little, keep serving.
                    let _ = tx.send(Err(ShmError::io("accept")(e)));
                    thread::sleep(Duration::from_millis(10));
                    break;
                }
            }
        }
    }
}

/// Starts the handshake of one accepted connection on its own thread.
fn dispatch(
    stream: UnixStream,
    services: &Arc<[Service]>,
    pending: &Arc<AtomicUsize>,
    tx: &mpsc::Sender<Outcome>,
) {
    let busy = pending.fetch_add(1, Ordering::AcqRel);
    if busy >= MAX_PENDING_HANDSHAKES {
        pending.fetch_sub(1, Ordering::AcqRel);
        let e = ShmError::Busy(busy);
        protocol::send_error(
            stream.as_fd(),
            RefusalCode::Busy,
            &e.to_string(),
            Deadline::after(Duration::ZERO),
        );
        let _ = tx.send(Err(e));
        return;
    }
    let (services, pending2, tx2) = (services.clone(), pending.clone(), tx.clone());
    let spawned = thread::Builder::new()
        .name("vmlink-shm-handshake".into())
        .spawn(move || {
            let deadline = hello_deadline(&services);
            let outcome = match sys::closed_before_a_byte(stream.as_fd(), deadline.at) {
                // Not a handshake: nothing to report.
                Ok(true) => None,
                // Anything else (data, silence, an error) is the handshake's to judge.
                Ok(false) | Err(_) => Some(host_handshake(stream, &services, deadline)),
            };
            pending2.fetch_sub(1, Ordering::AcqRel);
            // The listener may be gone; then the channel is simply dropped.
            if let Some(outcome) = outcome {
                let _ = tx2.send(outcome);
            }
        });
    if let Err(e) = spawned {
        pending.fetch_sub(1, Ordering::AcqRel);
        let _ = tx.send(Err(ShmError::io("start a handshake thread")(e)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fds_sent_with_a_hello_are_refused_and_closed() {
        let (h, g) = UnixStream::pair().unwrap();
        let svc = Service::new("svc").with_layout(Layout::symmetric(4096, 0));
        let host = thread::spawn(move || svc.serve_stream(h));
        let smuggled = sys::eventfd().unwrap();
        let deadline = Deadline::after(Duration::from_secs(5));
        protocol::send(
            g.as_fd(),
            protocol::HELLO,
            b"svc",
            &[smuggled.as_fd()],
            deadline,
        )
        .unwrap();
        let e = host.join().unwrap().unwrap_err();
        assert!(
            matches!(
                e,
                ShmError::UnexpectedFds {
                    expected: 0,
                    received: 1
                }
            ),
            "{e}"
        );
        let reply = protocol::recv(&g, deadline, "reply").unwrap();
        assert_eq!(reply.kind, protocol::ERROR);
        assert!(matches!(
            protocol::parse_error(&reply.body),
            ShmError::Refused {
                code: RefusalCode::Malformed,
                ..
            }
        ));
    }
    #[test]
    fn the_host_writes_the_memory_header_first() {
        use std::os::unix::fs::FileExt;
        use vmlink_ring::area::{AreaLayout, HEADER_LEN, VERSION};

        let layout = Layout::new(2 * 4096, 3 * 4096, 4 * 4096);
        let (h, g) = UnixStream::pair().unwrap();
        let svc = Service::new("svc").with_layout(layout);
        let host = thread::spawn(move || svc.serve_stream(h));
        let guest = crate::Guest::new("svc").connect_stream(g).unwrap();
        let host = host.join().unwrap().unwrap();

        // The first page of the memfd, read with a system call: exactly the header of the
        // layout, which either side reads back the same.
        let file = std::fs::File::from(
            host.memory()
                .mapping()
                .memfd()
                .try_clone_to_owned()
                .unwrap(),
        );
        let mut page = [0u8; HEADER_LEN];
        file.read_exact_at(&mut page, 0).unwrap();
        let area = layout.area().unwrap();
        assert_eq!(page, area.encode());
        let parsed = AreaLayout::parse(&page, layout.total_len()).unwrap();
        assert_eq!(parsed.version, VERSION);
        assert_eq!(parsed.layout, area);
        assert_eq!(host.memory().header().unwrap(), parsed);
        assert_eq!(guest.memory().header().unwrap(), parsed);
        // The rings follow it: the host's outgoing ring's control page is where the header
        // says, initialised (feature bit 0).
        let ch = area.channels()[0];
        let mut control = [0u8; 0x44];
        file.read_exact_at(&mut control, ch.host_to_guest.offset)
            .unwrap();
        assert_eq!(control[0x40], 1);
        assert_eq!(ch.host_to_guest.offset, 4096 + 2 * 4096);
    }
}
