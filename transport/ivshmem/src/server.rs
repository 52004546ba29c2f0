//! The ivshmem server: QEMU's client-server protocol (`docs/specs/ivshmem-spec.rst` in
//! QEMU) on a Unix socket, with this process as one peer.
//!
//! Each client that connects (a QEMU `ivshmem-doorbell` device, or any other client of the
//! protocol) gets, as 8-byte little-endian messages: the protocol version (0); its peer
//! id; `-1` with the shared memory's fd; for every other peer (this process's own peer
//! first), that peer's id once per vector, each with the eventfd that interrupts it on that
//! vector; then its own id once per vector with its own eventfds (the ones it is
//! interrupted through). Every other client gets the new peer's id with its eventfds, and
//! when a client leaves, every remaining client gets its id alone (peer gone).
//!
//! Ids: this process's peer is [`LOCAL_PEER`] (0); clients get ids from 1 up, the next
//! free one after the last given (so an id is not reused at once), and a guest that reads a
//! positive `IVPosition` knows its device is wired to a server.
//! The protocol is one-way: a client that sends anything is dropped with
//! [`IvshmemError::UnexpectedData`], one that does not take its messages within the send
//! timeout with [`IvshmemError::PeerStalled`]. Either way only that connection ends; the
//! server and the other peers go on. Every event is reported through
//! [`Server::next_event`].

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags};
use nix::sys::socket::MsgFlags;
use vmlink_channel::fd::{EventFd, poll_until, revents};
use vmlink_shm::SharedMemory;

use crate::IvshmemError;
use crate::memory::{self, DEFAULT_MEMORY_LEN, DEFAULT_RING_DATA};
use crate::wire::{self, PROTOCOL_VERSION, SHM_MESSAGE};

/// A peer's id: 0 ..= 65535 (the Doorbell register has 16 bits for it).
pub type PeerId = u16;

/// This process's own peer id.
pub const LOCAL_PEER: PeerId = 0;

/// The most events [`Server::next_event`] holds unread; later ones are counted in
/// [`Server::events_dropped`] and lost, so a user that never reads them, or a stream of
/// strangers, cannot grow the queue without bound.
pub const MAX_QUEUED_EVENTS: usize = 1024;

/// The most interrupt vectors per peer the server hands out.
pub const MAX_VECTORS: u32 = 64;

/// How the server is set up.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Interrupt vectors per peer (each an eventfd), 1 ..= [`MAX_VECTORS`]. QEMU's device
    /// should be given the same number (`vectors=N`).
    pub vectors: u16,
    /// The shared memory's size: a power of two (the BAR's size).
    pub memory_len: u64,
    /// Data bytes in each of the channel's two rings (whole 4 KiB pages).
    pub ring_data: u64,
    /// The most clients connected at once.
    pub max_peers: usize,
    /// How long a send to one client may block before that client is dropped as stalled.
    pub send_timeout: Duration,
}

impl Default for ServerConfig {
    /// Two vectors, 4 MiB of memory with 64 KiB rings, 64 peers, a 1 s send timeout.
    fn default() -> Self {
        Self {
            vectors: 2,
            memory_len: DEFAULT_MEMORY_LEN,
            ring_data: DEFAULT_RING_DATA,
            max_peers: 64,
            send_timeout: Duration::from_secs(1),
        }
    }
}

/// Something that happened to a connection.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServerEvent {
    /// A client connected, got its setup, and was announced to the other peers.
    Connected {
        /// Its id.
        id: PeerId,
    },
    /// A client closed its connection; the others were told.
    Disconnected {
        /// Its id.
        id: PeerId,
    },
    /// A client's connection ended on an error; the others were told (if it had been
    /// announced).
    Dropped {
        /// Its id.
        id: PeerId,
        /// Why.
        error: IvshmemError,
    },
    /// A connection was refused before it got an id (the server is full, or setting the
    /// socket up failed).
    Refused {
        /// Why.
        error: IvshmemError,
    },
}

/// Every peer's interrupt eventfds, this process's included; shared with the server's
/// thread.
type Vectors = Arc<Mutex<BTreeMap<PeerId, Arc<[EventFd]>>>>;

/// For each client, the server's ends of socket pairs whose other ends watch it (a host
/// channel's hang-up fd): dropped when the client leaves or the server stops, which the
/// watcher sees as a hang-up.
type Watchers = Arc<Mutex<BTreeMap<PeerId, Vec<UnixStream>>>>;

/// An ivshmem server listening on a Unix socket, its shared memory, and this process's own
/// peer. A background thread accepts and serves clients; dropping the server stops it,
/// closes every connection and removes the socket.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    memory: SharedMemory,
    memfd: Arc<OwnedFd>,
    vectors: Vectors,
    watchers: Watchers,
    local: Arc<[EventFd]>,
    events: Mutex<Receiver<ServerEvent>>,
    events_dropped: Arc<AtomicU64>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Makes the shared memory and listens on `path` (a stale socket there is replaced).
    pub fn bind(path: impl AsRef<Path>, config: ServerConfig) -> Result<Self, IvshmemError> {
        let path = path.as_ref().to_path_buf();
        if config.vectors == 0 || u32::from(config.vectors) > MAX_VECTORS {
            return Err(IvshmemError::BadVectorCount {
                vectors: u32::from(config.vectors),
                max: MAX_VECTORS,
            });
        }
        let (memory, memfd) = memory::create(config.memory_len, config.ring_data)?;
        let local: Arc<[EventFd]> = new_vectors(config.vectors)?;
        let listener = bind_socket(&path)?;
        listener
            .set_nonblocking(true)
            .map_err(IvshmemError::io("make the listener non-blocking"))?;
        let memfd = Arc::new(memfd);
        let vectors: Vectors = Arc::new(Mutex::new(BTreeMap::from([(LOCAL_PEER, local.clone())])));
        let stop = EventFd::new().map_err(IvshmemError::io("eventfd"))?;
        let (tx, rx) = mpsc::sync_channel(MAX_QUEUED_EVENTS);
        let events_dropped = Arc::new(AtomicU64::new(0));
        let watchers = Watchers::default();
        let worker = Worker {
            listener,
            config,
            memfd: memfd.clone(),
            vectors: vectors.clone(),
            watchers: watchers.clone(),
            clients: BTreeMap::new(),
            next_id: 1,
            stop: stop.try_clone().map_err(IvshmemError::io("dup"))?,
            events: tx,
            events_dropped: events_dropped.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("vmlink-ivshmem-server".into())
            .spawn(move || worker.run())
            .map_err(IvshmemError::io("spawn the server thread"))?;
        Ok(Self {
            path,
            memory,
            memfd,
            vectors,
            watchers,
            local,
            events: Mutex::new(rx),
            events_dropped,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The shared memory, as the host maps it.
    pub fn memory(&self) -> &SharedMemory {
        &self.memory
    }

    /// The memfd every client maps.
    pub fn memfd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// This process's peer id ([`LOCAL_PEER`]): a guest rings it by writing
    /// `(LOCAL_PEER << 16) | vector` to its Doorbell register.
    pub fn local_id(&self) -> PeerId {
        LOCAL_PEER
    }

    /// This process's eventfd for `vector`: it becomes readable when a peer rings us on
    /// that vector.
    pub fn local_vector(&self, vector: u16) -> Result<&EventFd, IvshmemError> {
        vector_fd(&self.local, LOCAL_PEER, vector)
    }

    /// Rings peer `id` on `vector` (QEMU turns it into an interrupt in its guest).
    pub fn ring(&self, id: PeerId, vector: u16) -> Result<(), IvshmemError> {
        let fds = self
            .lock_vectors()
            .get(&id)
            .cloned()
            .ok_or(IvshmemError::UnknownPeer { id })?;
        ring_vector(&fds, id, vector)
    }

    /// The ids of the clients connected now (this process's peer not included).
    pub fn peers(&self) -> Vec<PeerId> {
        self.lock_vectors()
            .keys()
            .copied()
            .filter(|&id| id != LOCAL_PEER)
            .collect()
    }

    /// The next event, waiting up to `timeout` for one; `None` when none came. At most
    /// [`MAX_QUEUED_EVENTS`] wait unread.
    pub fn next_event(&self, timeout: Duration) -> Option<ServerEvent> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.recv_timeout(timeout).ok()
    }

    /// Events the server could not queue because [`MAX_QUEUED_EVENTS`] were waiting
    /// unread; they are lost, the connections they were about are not affected.
    pub fn events_dropped(&self) -> u64 {
        self.events_dropped.load(Ordering::Relaxed)
    }

    fn lock_vectors(&self) -> MutexGuard<'_, BTreeMap<PeerId, Arc<[EventFd]>>> {
        self.vectors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Peer `id`'s eventfd for `vector` (a duplicate), and a socket that hangs up when the
    /// peer leaves or the server stops; [`UnknownPeer`](IvshmemError::UnknownPeer) when
    /// it is not connected now.
    pub(crate) fn watch_peer(
        &self,
        id: PeerId,
        vector: u16,
    ) -> Result<(EventFd, UnixStream), IvshmemError> {
        // Under the vectors' lock: the server's thread removes a peer's vectors before
        // its watchers, so a peer found here has its watcher dropped when it leaves.
        let vectors = self.lock_vectors();
        let fds = vectors.get(&id).ok_or(IvshmemError::UnknownPeer { id })?;
        if id == LOCAL_PEER {
            return Err(IvshmemError::UnknownPeer { id });
        }
        let fd = vector_fd(fds, id, vector)?
            .try_clone()
            .map_err(IvshmemError::io("dup an eventfd"))?;
        let (ours, theirs) = UnixStream::pair().map_err(IvshmemError::io("socketpair"))?;
        self.watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id)
            .or_default()
            .push(ours);
        Ok((fd, theirs))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.signal();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `n` new eventfds (non-blocking, close-on-exec).
fn new_vectors(n: u16) -> Result<Arc<[EventFd]>, IvshmemError> {
    (0..n)
        .map(|_| EventFd::new().map_err(IvshmemError::io("eventfd")))
        .collect()
}

/// Binds `path`, replacing a socket there that nobody answers on.
fn bind_socket(path: &Path) -> Result<UnixListener, IvshmemError> {
    match UnixListener::bind(path) {
        Ok(l) => return Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
        Err(e) => return Err(IvshmemError::io("bind the server socket")(e)),
    }
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    let stale = is_socket
        && matches!(UnixStream::connect(path), Err(e) if e.kind() == io::ErrorKind::ConnectionRefused);
    if !stale {
        return Err(IvshmemError::PathInUse {
            path: path.to_path_buf(),
        });
    }
    std::fs::remove_file(path).map_err(IvshmemError::io("remove the stale socket"))?;
    UnixListener::bind(path).map_err(IvshmemError::io("bind the server socket"))
}

/// The server's thread: owns the listener and every client's socket.
struct Worker {
    listener: UnixListener,
    config: ServerConfig,
    memfd: Arc<OwnedFd>,
    vectors: Vectors,
    watchers: Watchers,
    clients: BTreeMap<PeerId, UnixStream>,
    /// Where the search for a free id starts.
    next_id: PeerId,
    stop: EventFd,
    events: SyncSender<ServerEvent>,
    events_dropped: Arc<AtomicU64>,
}

/// What a poll found.
enum Ready {
    Stop,
    Accept,
    Client(PeerId, PollFlags),
}

impl Worker {
    fn run(mut self) {
        loop {
            let ready = match self.poll() {
                Ok(ready) => ready,
                Err(e) => {
                    // Only a broken poll set gets here (EINVAL, ENOMEM): stop serving
                    // rather than spin.
                    self.emit(ServerEvent::Refused {
                        error: IvshmemError::io("poll")(e),
                    });
                    return;
                }
            };
            for r in ready {
                match r {
                    Ready::Stop => return,
                    Ready::Accept => self.accept_all(),
                    Ready::Client(id, events) => self.client_ready(id, events),
                }
            }
        }
    }

    fn poll(&self) -> Result<Vec<Ready>, Errno> {
        let ids: Vec<PeerId> = self.clients.keys().copied().collect();
        let mut fds = Vec::with_capacity(2 + ids.len());
        fds.push(PollFd::new(self.stop.as_fd(), PollFlags::POLLIN));
        fds.push(PollFd::new(self.listener.as_fd(), PollFlags::POLLIN));
        for sock in self.clients.values() {
            fds.push(PollFd::new(sock.as_fd(), PollFlags::POLLIN));
        }
        poll_until(&mut fds, None)?;
        let mut ready = Vec::new();
        if !revents(&fds[0]).is_empty() {
            return Ok(vec![Ready::Stop]);
        }
        if !revents(&fds[1]).is_empty() {
            ready.push(Ready::Accept);
        }
        for (id, fd) in ids.iter().zip(&fds[2..]) {
            let events = revents(fd);
            if !events.is_empty() {
                ready.push(Ready::Client(*id, events));
            }
        }
        Ok(ready)
    }

    fn emit(&self, event: ServerEvent) {
        match self.events.try_send(event) {
            // Nobody listening (the server is being dropped) is fine.
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.events_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn lock_vectors(&self) -> MutexGuard<'_, BTreeMap<PeerId, Arc<[EventFd]>>> {
        self.vectors.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((sock, _)) => self.admit(sock),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and the like: report and try again on the next wake-up.
                    self.emit(ServerEvent::Refused {
                        error: IvshmemError::io("accept")(e),
                    });
                    return;
                }
            }
        }
    }

    /// The next free client id after the last one given (wrapping from 65535 to 1), if
    /// the server has room. Ids are not reused at once, so a late doorbell or notification
    /// about a peer that left never reaches a newcomer.
    fn free_id(&mut self) -> Option<PeerId> {
        if self.clients.len() >= self.config.max_peers {
            return None;
        }
        let taken = self.vectors.lock().unwrap_or_else(|e| e.into_inner());
        let start = self.next_id;
        let mut id = start;
        loop {
            let next = if id == PeerId::MAX { 1 } else { id + 1 };
            if !taken.contains_key(&id) {
                self.next_id = next;
                return Some(id);
            }
            id = next;
            if id == start {
                return None;
            }
        }
    }

    /// Sets up a new client: its setup messages first, then (only once it has them all)
    /// it is announced to the others.
    fn admit(&mut self, sock: UnixStream) {
        let setup = sock
            .set_nonblocking(false)
            .and_then(|()| sock.set_write_timeout(Some(self.config.send_timeout)));
        if let Err(e) = setup {
            self.emit(ServerEvent::Refused {
                error: IvshmemError::io("set up the client socket")(e),
            });
            return;
        }
        let Some(id) = self.free_id() else {
            // Closing is the protocol's way to refuse.
            self.emit(ServerEvent::Refused {
                error: IvshmemError::ServerFull {
                    max: self.config.max_peers.min(usize::from(PeerId::MAX)),
                },
            });
            return;
        };
        let own = match new_vectors(self.config.vectors) {
            Ok(v) => v,
            Err(error) => {
                self.emit(ServerEvent::Refused { error });
                return;
            }
        };
        if let Err(error) = self.send_setup(&sock, id, &own) {
            self.emit(ServerEvent::Dropped { id, error });
            return;
        }
        // Announce it to every client already here; one that cannot take it is dropped.
        let mut failed = Vec::new();
        for (&other, other_sock) in &self.clients {
            if let Err(error) = send_peer(other_sock, other, id, &own) {
                failed.push((other, error));
            }
        }
        self.lock_vectors().insert(id, own);
        self.clients.insert(id, sock);
        self.emit(ServerEvent::Connected { id });
        for (other, error) in failed {
            self.remove(other, Some(error));
        }
    }

    /// Version, id, memory, every other peer's vectors, then the client's own.
    fn send_setup(
        &self,
        sock: &UnixStream,
        id: PeerId,
        own: &[EventFd],
    ) -> Result<(), IvshmemError> {
        let fail = |e| send_error(id, e);
        wire::send(sock, PROTOCOL_VERSION, None).map_err(fail)?;
        wire::send(sock, i64::from(id), None).map_err(fail)?;
        wire::send(sock, SHM_MESSAGE, Some(self.memfd.as_fd())).map_err(fail)?;
        let others: Vec<(PeerId, Arc<[EventFd]>)> = self
            .lock_vectors()
            .iter()
            .map(|(&peer, fds)| (peer, fds.clone()))
            .collect();
        for (peer, fds) in others {
            send_peer(sock, id, peer, &fds)?;
        }
        send_peer(sock, id, id, own)
    }

    fn client_ready(&mut self, id: PeerId, events: PollFlags) {
        let Some(sock) = self.clients.get(&id) else {
            return;
        };
        let mut buf = [0u8; 64];
        // The protocol is one-way: any byte from a client is an error, end of stream is
        // its leaving. Fds sent with garbage are closed by the kernel (no control buffer).
        let outcome = match nix::sys::socket::recv(
            std::os::fd::AsRawFd::as_raw_fd(sock),
            &mut buf,
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) => None,
            Ok(len) => Some(IvshmemError::UnexpectedData { len }),
            Err(Errno::EAGAIN | Errno::EINTR) => {
                if events.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                    None
                } else {
                    return;
                }
            }
            Err(Errno::ECONNRESET) => None,
            Err(e) => Some(IvshmemError::io("recv from a client")(e)),
        };
        self.remove(id, outcome);
    }

    /// Removes client `id` and tells every remaining client it is gone; a client that
    /// cannot take that message is removed in turn.
    fn remove(&mut self, id: PeerId, error: Option<IvshmemError>) {
        let mut queue = vec![(id, error)];
        while let Some((id, error)) = queue.pop() {
            if self.clients.remove(&id).is_none() {
                continue;
            }
            self.lock_vectors().remove(&id);
            // Hang up on whoever watches it (host channels with this peer).
            self.watchers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            self.emit(match error {
                None => ServerEvent::Disconnected { id },
                Some(error) => ServerEvent::Dropped { id, error },
            });
            for (&other, sock) in &self.clients {
                if queue.iter().any(|(q, _)| *q == other) {
                    continue;
                }
                if let Err(e) = wire::send(sock, i64::from(id), None) {
                    queue.push((other, Some(send_error(other, e))));
                }
            }
        }
    }
}

/// Sends peer `peer`'s id once per vector, each with its eventfd, to client `to`.
fn send_peer(
    sock: &UnixStream,
    to: PeerId,
    peer: PeerId,
    fds: &[EventFd],
) -> Result<(), IvshmemError> {
    for fd in fds {
        wire::send(sock, i64::from(peer), Some(fd.as_fd())).map_err(|e| send_error(to, e))?;
    }
    Ok(())
}

/// The error for a failed send to client `id`.
fn send_error(id: PeerId, e: Errno) -> IvshmemError {
    match e {
        Errno::EAGAIN => IvshmemError::PeerStalled { id },
        Errno::EPIPE | Errno::ECONNRESET => IvshmemError::Closed,
        e => IvshmemError::io("send to a client")(e),
    }
}

/// Signals `fds[vector]`, one of peer `id`'s eventfds: how this process and a protocol
/// client ring a peer.
pub(crate) fn ring_vector(fds: &[EventFd], id: PeerId, vector: u16) -> Result<(), IvshmemError> {
    Ok(vector_fd(fds, id, vector)?.signal()?)
}

/// `fds[vector]`, one of peer `id`'s eventfds, or
/// [`NoSuchVector`](IvshmemError::NoSuchVector).
fn vector_fd(fds: &[EventFd], id: PeerId, vector: u16) -> Result<&EventFd, IvshmemError> {
    fds.get(usize::from(vector))
        .ok_or(IvshmemError::NoSuchVector {
            id,
            vector,
            vectors: fds.len() as u16,
        })
}
