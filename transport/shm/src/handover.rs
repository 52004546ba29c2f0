//! Handing live endpoints to a successor process (servicing), with the peer untouched.
//!
//! A serving process listens on a [`HandOverListener`] beside its service socket. A
//! successor — typically a newer build of the same program — connects with
//! [`TakeOver::connect`]; the serving process stops serving an endpoint and hands it over
//! with [`Successor::hand_over`]: the memfd, both eventfds and the peer's socket go by
//! `SCM_RIGHTS`, then the endpoint's saved state (vmlink-channel's versioned byte form).
//! The successor checks everything as a guest checks an offer (seals, size, the memory
//! header), restores the endpoint over the same memory and answers `CONFIRM`; only then
//! does the predecessor drop its copy. The peer keeps its mapping, its fds and its socket
//! and sees at most a pause.
//!
//! Exactly one process owns an endpoint at every moment:
//!
//! - Until the predecessor reads `CONFIRM` it owns the endpoint; the successor restores
//!   but does not touch the rings before confirming. If the successor refuses, dies or
//!   says nothing by the deadline, [`Successor::hand_over`] gives the endpoint back
//!   ([`HandOverFailed`]) and the predecessor goes on serving it.
//! - From `CONFIRM` on the successor owns it: a predecessor that dies after the successor
//!   confirmed changes nothing, since the successor holds its own copies of every fd.
//! - A predecessor that dies before sending the fds was the only owner: its peer sees the
//!   socket close, as on any exit.
//!
//! What the predecessor's application took from an endpoint is its own to finish before
//! the hand-over (answer the requests it received); what the endpoint itself holds — calls
//! in flight by polled transaction id, completions and packets queued for receivers —
//! travels in the saved state, so completions for the predecessor's polled requests are
//! delivered to the successor's receivers, counted like any other packet.
//!
//! Both sides require the other to run as the same user (`SO_PEERCRED`).
//!
//! ```
//! use std::thread;
//! use vmlink_shm::{HandOverListener, Layout, Service, TakeOver, Wait};
//!
//! let dir = std::env::temp_dir().join(format!("vmlink-handover-doc-{}", std::process::id()));
//! let service = Service::new("echo").with_layout(Layout::symmetric(4 * 4096, 0));
//! let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
//! let guest = thread::spawn(move || vmlink_shm::Guest::new("echo").connect_stream(theirs));
//! let host = service.serve_stream(ours)?;
//! let guest = guest.join().unwrap()?;
//!
//! // The serving process listens for a successor; one connects and takes the endpoint.
//! let listener = HandOverListener::bind(dir.join("echo.handover"))?;
//! let path = listener.path().to_owned();
//! let successor = thread::spawn(move || -> Result<_, vmlink_shm::ShmError> {
//!     let mut take = TakeOver::connect(&path)?;
//!     let endpoint = take.next_endpoint()?.expect("one endpoint").confirm()?;
//!     assert!(take.next_endpoint()?.is_none());
//!     Ok(endpoint)
//! });
//! let mut incoming = listener.accept(None)?;
//! incoming.hand_over(host).map_err(|f| f.error)?;
//! incoming.finish()?;
//! let host = successor.join().unwrap()?;
//!
//! // The guest never noticed.
//! guest.channel().send(b"still there?", Wait::Now)?;
//! let mut buf = [0u8; 16];
//! host.channel().recv(&mut buf, Wait::Now)?;
//! assert_eq!(&buf[..12], b"still there?");
//! # drop(listener);
//! # std::fs::remove_dir(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::socket::SockType;
use vmlink_channel::{Config, EventFdDoorbell, RingRx, RingTx, SavedEndpoint};
use zerocopy::{FromBytes, IntoBytes};

use crate::endpoint::{Endpoint, Role, effective_config};
use crate::error::{RefusalCode, ShmError};
use crate::guest::map_checked;
use crate::host::{bind_private, refuse};
use crate::memory::Layout;
use crate::monitor::ListenerKind;
use crate::policy::PeerCredentials;
use crate::protocol::{self, Deadline, HandOverBody};
use crate::{ShmChannel, sys};

/// How long each step of a hand-over may take by default before the side waiting gives
/// up (the predecessor then keeps its endpoint).
pub const DEFAULT_HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// A socket on which a serving process waits for its successor.
///
/// It lives in a directory only its owner can enter, like a [`Listener`](crate::Listener)'s
/// socket; dropping the listener removes the socket file. Waiting for a successor never
/// blocks on one: a connection is only handed out once its whole request has arrived, so
/// a successor that connects and then says nothing (or is slow to) costs the serving
/// process nothing; it is dropped after the timeout.
#[derive(Debug)]
pub struct HandOverListener {
    listener: UnixListener,
    path: PathBuf,
    timeout: Duration,
    /// Connections whose request has not arrived yet, and when each came.
    pending: Mutex<Vec<(UnixStream, Instant)>>,
    _published: crate::monitor::ListenerRegistration,
}

/// Connections waiting for their request at most (more are refused at once).
const MAX_PENDING: usize = 16;

impl HandOverListener {
    /// Listens at `path` (a stale socket nobody serves is replaced; a live one is
    /// [`ShmError::SocketInUse`]).
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, ShmError> {
        let path = path.as_ref().to_path_buf();
        let listener = bind_private(&path)?;
        let published = crate::monitor::publish_listener(&path, ListenerKind::HandOver, Vec::new());
        Ok(Self {
            listener,
            path,
            timeout: DEFAULT_HANDOVER_TIMEOUT,
            pending: Mutex::new(Vec::new()),
            _published: published,
        })
    }

    /// The same listener with another timeout for each step of its hand-overs.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listening socket, to poll beside other work: readable when a successor may
    /// be connecting.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// Waits until `deadline` (`None`: for ever) for a successor: one that connects as
    /// this user and asks to take over. `accept_until(Some(Instant::now()))` only looks.
    /// Connections that close without a byte are dropped; one from another user, or that
    /// says something else, is refused with an error and dropped too; one that says
    /// nothing within the timeout is dropped. `Ok(None)` when the deadline passed.
    pub fn accept_until(&self, deadline: Option<Instant>) -> Result<Option<Successor>, ShmError> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            self.take_connections(&mut pending)?;
            let now = Instant::now();
            // Drop those that said nothing in time.
            pending.retain(|(_, since)| now.duration_since(*since) < self.timeout);
            // Wait for a request or a connection, until the deadline or the next expiry.
            let expiry = pending.iter().map(|(_, since)| *since + self.timeout).min();
            let until = match (deadline, expiry) {
                (Some(d), Some(e)) => Some(d.min(e)),
                (d, e) => d.or(e),
            };
            let mut fds: Vec<sys::PollFd<'_>> = Vec::with_capacity(pending.len() + 1);
            fds.push(sys::PollFd::new(
                self.listener.as_fd(),
                sys::PollFlags::POLLIN,
            ));
            for (s, _) in pending.iter() {
                fds.push(sys::PollFd::new(s.as_fd(), sys::PollFlags::POLLIN));
            }
            sys::poll_until(&mut fds, until.map(|u| u.max(now)))
                .map_err(|e| ShmError::io("poll the hand-over socket")(e.into()))?;
            let ready: Vec<usize> = fds[1..]
                .iter()
                .enumerate()
                .filter(|(_, f)| !sys::revents(f).is_empty())
                .map(|(i, _)| i)
                .collect();
            drop(fds);
            // Greet those whose request (or hang-up) arrived, newest index first so the
            // others keep their places.
            for i in ready.into_iter().rev() {
                let (stream, _) = pending.swap_remove(i);
                if let Ok(s) = self.greet(stream) {
                    return Ok(Some(s));
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
        }
    }

    /// Moves every connection waiting in the backlog to `pending`, without blocking.
    fn take_connections(&self, pending: &mut Vec<(UnixStream, Instant)>) -> Result<(), ShmError> {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if pending.len() >= MAX_PENDING {
                        let deadline = Deadline::after(Duration::ZERO);
                        refuse(&s, ShmError::Busy(pending.len()), deadline);
                        continue;
                    }
                    s.set_nonblocking(true)
                        .map_err(ShmError::io("make the socket non-blocking"))?;
                    pending.push((s, Instant::now()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ShmError::io("accept a successor")(e)),
            }
        }
    }

    /// [`accept_until`](Self::accept_until) with a timeout instead of a deadline, and an
    /// error instead of `None` when it passes.
    pub fn accept(&self, timeout: Option<Duration>) -> Result<Successor, ShmError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        self.accept_until(deadline)?
            .ok_or(ShmError::AcceptTimedOut(timeout.unwrap_or_default()))
    }

    /// Reads the request of a connection that sent something (or hung up).
    fn greet(&self, stream: UnixStream) -> Result<Successor, ShmError> {
        let deadline = Deadline::after(self.timeout);
        let peer = same_user(&stream, deadline)?;
        let hello = protocol::recv(&stream, deadline, "waiting for a successor's request")
            .map_err(|e| refuse(&stream, e, deadline))?;
        if hello.kind != protocol::TAKE_OVER || !hello.body.is_empty() {
            let e = ShmError::UnexpectedMessage {
                kind: hello.kind,
                expected: "take-over request",
            };
            return Err(refuse(&stream, e, deadline));
        }
        Ok(Successor {
            stream,
            peer,
            timeout: self.timeout,
        })
    }
}

impl Drop for HandOverListener {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Checks that the process at the other end of `stream` runs as this user; refuses it
/// otherwise.
fn same_user(stream: &UnixStream, deadline: Deadline) -> Result<PeerCredentials, ShmError> {
    let peer = sys::peer_credentials(stream.as_fd()).map_err(ShmError::io("SO_PEERCRED"))?;
    if peer.uid != sys::geteuid() {
        return Err(refuse(stream, ShmError::NotSameUser { peer }, deadline));
    }
    Ok(peer)
}

/// A successor that asked to take over: hand it endpoints, then [`finish`](Self::finish).
#[derive(Debug)]
pub struct Successor {
    stream: UnixStream,
    peer: PeerCredentials,
    timeout: Duration,
}

/// What a hand-over that did not happen gives back: the endpoint, which this process still
/// owns and goes on serving, and why.
#[derive(Debug)]
pub struct HandOverFailed {
    /// The endpoint, as it was.
    pub endpoint: Endpoint,
    /// Why the successor did not take it.
    pub error: ShmError,
}

impl Successor {
    /// The successor's credentials.
    pub fn peer(&self) -> PeerCredentials {
        self.peer
    }

    /// Hands `endpoint` over: quiesces it (consumed packets committed, uncommitted sends
    /// discarded), sends its fds and saved state, and waits for the successor's verdict.
    /// On `CONFIRM` the endpoint is the successor's and this process's copy is dropped
    /// (the peer notices nothing: the successor holds its own copies of every fd). On a
    /// refusal, a successor that vanished or stayed silent past the timeout, the endpoint
    /// comes back in [`HandOverFailed`], still working.
    pub fn hand_over(&mut self, endpoint: Endpoint) -> Result<(), Box<HandOverFailed>> {
        self.hand_over_with(endpoint, &[])
    }

    /// [`hand_over`](Self::hand_over) with the application's own state for this endpoint
    /// (at most 1 MiB, opaque to vmlink): what the successor needs to go on where this
    /// process stopped, such as how far a transfer had come. The successor reads it with
    /// [`Incoming::app_state`].
    pub fn hand_over_with(
        &mut self,
        mut endpoint: Endpoint,
        app_state: &[u8],
    ) -> Result<(), Box<HandOverFailed>> {
        let deadline = Deadline::after(self.timeout);
        let failed = |endpoint, error| Err(Box::new(HandOverFailed { endpoint, error }));
        if app_state.len() > protocol::MAX_APP_STATE {
            return failed(
                endpoint,
                ShmError::Malformed("an application state past 1 MiB cannot be handed over"),
            );
        }
        if endpoint.memory().sub_channels() > 0 {
            return failed(
                endpoint,
                ShmError::Unsupported("a channel set (sub-channels) cannot be handed over"),
            );
        }
        let saved = endpoint.channel_mut().snapshot();
        let state = saved.to_bytes();
        let layout = endpoint.memory().layout();
        let peer = endpoint.peer();
        let service = endpoint.service().as_bytes();
        let fixed = HandOverBody {
            guest_to_host: layout.guest_to_host.into(),
            host_to_guest: layout.host_to_guest.into(),
            buffer: layout.buffer.into(),
            role: match endpoint.role() {
                Role::Host => 0,
                Role::Guest => 1,
            }
            .into(),
            peer_pid: (peer.pid as u32).into(),
            peer_uid: peer.uid.into(),
            peer_gid: peer.gid.into(),
            service_len: (service.len() as u32).into(),
            state_len: (state.len() as u32).into(),
            app_len: (app_state.len() as u32).into(),
            reserved: 0.into(),
        };
        let mut body = Vec::with_capacity(
            size_of::<HandOverBody>() + service.len() + state.len() + app_state.len(),
        );
        body.extend_from_slice(fixed.as_bytes());
        body.extend_from_slice(service);
        body.extend_from_slice(&state);
        body.extend_from_slice(app_state);
        let doorbell = endpoint.channel().doorbell();
        let Some(socket) = doorbell.hangup_fd() else {
            return failed(
                endpoint,
                ShmError::Malformed("an endpoint without its peer's socket cannot be handed over"),
            );
        };
        let memfd = endpoint.memory().mapping().memfd();
        let sent = protocol::send(
            self.stream.as_fd(),
            protocol::HANDOVER,
            &body,
            &[memfd, doorbell.wait_fd(), doorbell.signal_fd(), socket],
            deadline,
        );
        if let Err(error) = sent {
            return failed(endpoint, error);
        }
        let verdict = match protocol::recv(
            &self.stream,
            deadline,
            "waiting for the successor to confirm",
        ) {
            Ok(m) => m,
            Err(error) => return failed(endpoint, error),
        };
        match verdict.kind {
            protocol::CONFIRM if verdict.body.is_empty() => Ok(()),
            protocol::ERROR => failed(endpoint, protocol::parse_error(&verdict.body)),
            kind => {
                let e = ShmError::UnexpectedMessage {
                    kind,
                    expected: "confirm",
                };
                failed(endpoint, refuse(&self.stream, e, deadline))
            }
        }
    }

    /// Turns the successor away (it gets [`ShmError::Refused`] with `why`): this process
    /// keeps everything it serves.
    pub fn refuse(self, why: &str) {
        let deadline = Deadline::after(self.timeout);
        protocol::send_error(self.stream.as_fd(), RefusalCode::Other(0), why, deadline);
    }

    /// Tells the successor that no more endpoints follow.
    pub fn finish(self) -> Result<(), ShmError> {
        let deadline = Deadline::after(self.timeout);
        protocol::send(self.stream.as_fd(), protocol::DONE, &[], &[], deadline)
    }
}

/// The successor's side: connected to a serving process, taking its endpoints one by one.
#[derive(Debug)]
pub struct TakeOver {
    stream: UnixStream,
    timeout: Duration,
    config: Option<Config>,
    done: bool,
}

impl TakeOver {
    /// Connects to a serving process's [`HandOverListener`] at `path` and asks for its
    /// endpoints.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ShmError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ShmError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Self::over(stream)
    }

    /// [`connect`](Self::connect) over an already-connected socket.
    pub fn over(stream: UnixStream) -> Result<Self, ShmError> {
        stream
            .set_nonblocking(true)
            .map_err(ShmError::io("make the socket non-blocking"))?;
        let deadline = Deadline::after(DEFAULT_HANDOVER_TIMEOUT);
        same_user(&stream, deadline)?;
        // The monitor publishes the endpoints taken over: started now, before the serving
        // process stops serving, it adds nothing to the blackout.
        crate::monitor::start();
        protocol::send(stream.as_fd(), protocol::TAKE_OVER, &[], &[], deadline)?;
        Ok(Self {
            stream,
            timeout: DEFAULT_HANDOVER_TIMEOUT,
            config: None,
            done: false,
        })
    }

    /// How long to wait for each endpoint (default [`DEFAULT_HANDOVER_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Restore endpoints with this configuration instead of the one each was saved with
    /// (the GPA page limit is capped at the buffer area's pages either way).
    pub fn with_config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// The next endpoint, restored but not yet confirmed, or `None` once the predecessor
    /// has handed over everything. An endpoint that fails a check is refused (the
    /// predecessor keeps it) and returned as the error; the next call may still bring
    /// another.
    pub fn next_endpoint(&mut self) -> Result<Option<Incoming<'_>>, ShmError> {
        if self.done {
            return Ok(None);
        }
        let deadline = Deadline::after(self.timeout);
        let m = protocol::recv_limited(
            &self.stream,
            deadline,
            "waiting for an endpoint",
            protocol::MAX_HANDOVER_BODY,
        )
        .map_err(|e| refuse(&self.stream, e, deadline))?;
        match m.kind {
            protocol::DONE if m.body.is_empty() => {
                self.done = true;
                Ok(None)
            }
            protocol::HANDOVER => match receive(&m.body, m.fds, self.config) {
                Ok((endpoint, app_state)) => Ok(Some(Incoming {
                    endpoint: Some(endpoint),
                    app_state,
                    stream: &self.stream,
                    deadline,
                })),
                Err(e) => Err(refuse(&self.stream, e, deadline)),
            },
            protocol::ERROR => Err(protocol::parse_error(&m.body)),
            kind => Err(refuse(
                &self.stream,
                ShmError::UnexpectedMessage {
                    kind,
                    expected: "an endpoint or done",
                },
                deadline,
            )),
        }
    }
}

/// An endpoint received and restored, not yet the successor's: [`confirm`](Self::confirm)
/// makes it so; dropping it unconfirmed refuses it (the predecessor keeps serving it).
#[derive(Debug)]
pub struct Incoming<'a> {
    /// `None` once confirmed or refused.
    endpoint: Option<Endpoint>,
    app_state: Vec<u8>,
    stream: &'a UnixStream,
    deadline: Deadline,
}

impl Incoming<'_> {
    /// The endpoint, to look at before confirming (its service, its peer). Nothing may be
    /// sent or received on it before [`confirm`](Self::confirm): the predecessor still
    /// owns the rings.
    pub fn endpoint(&self) -> Option<&Endpoint> {
        self.endpoint.as_ref()
    }

    /// The predecessor's application state for this endpoint
    /// ([`Successor::hand_over_with`]); empty when it sent none.
    pub fn app_state(&self) -> &[u8] {
        &self.app_state
    }

    /// Takes the endpoint: tells the predecessor, which then lets go of it. An error
    /// means the predecessor may not have heard: the endpoint is dropped (it keeps
    /// serving it if it did not hear, and owns nothing more if it did).
    pub fn confirm(mut self) -> Result<Endpoint, ShmError> {
        let endpoint = self
            .endpoint
            .take()
            .ok_or(ShmError::Malformed("an incoming endpoint confirmed twice"))?;
        protocol::send(
            self.stream.as_fd(),
            protocol::CONFIRM,
            &[],
            &[],
            self.deadline,
        )?;
        Ok(endpoint)
    }

    /// Refuses the endpoint: the predecessor keeps serving it.
    pub fn refuse(mut self, why: &str) {
        self.refuse_with(why);
    }

    fn refuse_with(&mut self, why: &str) {
        if self.endpoint.take().is_some() {
            protocol::send_error(
                self.stream.as_fd(),
                RefusalCode::Other(0),
                why,
                self.deadline,
            );
        }
    }
}

impl Drop for Incoming<'_> {
    /// An endpoint dropped unconfirmed is refused, so the predecessor does not wait for
    /// its deadline to go on serving it.
    fn drop(&mut self) {
        self.refuse_with("the successor dropped the endpoint without confirming");
    }
}

/// Checks one `HANDOVER` message and restores its endpoint.
fn receive(
    body: &[u8],
    fds: Vec<OwnedFd>,
    config: Option<Config>,
) -> Result<(Endpoint, Vec<u8>), ShmError> {
    let (fixed, rest) = HandOverBody::read_from_prefix(body)
        .map_err(|_| ShmError::Malformed("hand-over shorter than its fixed part"))?;
    let service_len = fixed.service_len.get() as usize;
    let state_len = fixed.state_len.get() as usize;
    let app_len = fixed.app_len.get() as usize;
    if service_len + state_len + app_len != rest.len() {
        return Err(ShmError::Malformed("hand-over lengths do not add up"));
    }
    if fixed.reserved.get() != 0 {
        return Err(ShmError::Malformed("hand-over with a reserved word set"));
    }
    let (service, rest) = rest.split_at(service_len);
    let (state, app_state) = rest.split_at(state_len);
    let service = protocol::check_service_name(service)?.to_owned();
    let role = match fixed.role.get() {
        0 => Role::Host,
        1 => Role::Guest,
        _ => return Err(ShmError::Malformed("hand-over of an unknown role")),
    };
    let layout = Layout::new(
        fixed.guest_to_host.get(),
        fixed.host_to_guest.get(),
        fixed.buffer.get(),
    );
    layout.validate()?;
    let saved = SavedEndpoint::from_bytes(state)?;
    let [memfd, wait, signal, socket]: [OwnedFd; 4] = fds
        .try_into()
        .map_err(|_| ShmError::Malformed("hand-over without exactly 4 fds"))?;
    for bell in [&wait, &signal] {
        sys::set_nonblocking(bell.as_fd()).map_err(ShmError::io("configure a doorbell fd"))?;
    }
    match sys::socket_type(socket.as_fd()) {
        Ok(SockType::Stream) => {}
        _ => {
            return Err(ShmError::Malformed(
                "hand-over whose peer socket is not a stream socket",
            ));
        }
    }
    let memory = map_checked(memfd, layout, 0)?;
    let (outgoing, incoming) = match role {
        Role::Host => (memory.host_to_guest(), memory.guest_to_host()),
        Role::Guest => (memory.guest_to_host(), memory.host_to_guest()),
    };
    let doorbell = EventFdDoorbell::from_fds(wait, signal).with_hangup(socket);
    let config = effective_config(config.unwrap_or(saved.config()), layout);
    let channel: ShmChannel = vmlink_channel::Endpoint::restore(
        RingTx::new(outgoing)?,
        RingRx::new(incoming)?,
        doorbell,
        config,
        &saved,
    )?;
    let peer = PeerCredentials {
        pid: fixed.peer_pid.get() as i32,
        uid: fixed.peer_uid.get(),
        gid: fixed.peer_gid.get(),
    };
    Ok((
        Endpoint::new(channel, memory, peer, service, role),
        app_state.to_vec(),
    ))
}
