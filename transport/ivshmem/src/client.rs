//! A client of the ivshmem protocol, as QEMU's device is one: it takes the setup a server
//! sends and then follows peers coming and going. Used to test servers (this crate's and
//! others') and by host tools that join a server as a peer.
//!
//! The protocol has no end-of-setup marker: the setup ends with the client's own id
//! repeated once per vector, so the client must know how many vectors it expects.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vmlink_channel::fd::EventFd;

use crate::IvshmemError;
use crate::server::PeerId;
use crate::wire::{self, PROTOCOL_VERSION, SHM_MESSAGE};

/// A message after the setup.
#[derive(Debug)]
#[non_exhaustive]
pub enum Notification {
    /// Peer `id` connected, or gained a vector: its next eventfd (vector `vector`).
    PeerVector {
        /// The peer.
        id: PeerId,
        /// The vector this eventfd interrupts it on.
        vector: u16,
    },
    /// Peer `id` left.
    PeerGone {
        /// The peer.
        id: PeerId,
    },
}

/// A connected client after its setup: its id, the shared memory, its own vectors and the
/// vectors of every peer it was told of.
#[derive(Debug)]
pub struct Client {
    sock: UnixStream,
    id: PeerId,
    memory: OwnedFd,
    own: Vec<EventFd>,
    peers: BTreeMap<PeerId, Vec<EventFd>>,
}

/// A peer id from a message's value.
fn peer_id(value: i64) -> Result<PeerId, IvshmemError> {
    PeerId::try_from(value).map_err(|_| IvshmemError::BadPeerId { value })
}

impl Client {
    /// Connects to the server at `path` and takes its setup, expecting `vectors` vectors
    /// of its own; every message must arrive within `timeout` of the one before.
    pub fn connect(
        path: impl AsRef<Path>,
        vectors: u16,
        timeout: Duration,
    ) -> Result<Self, IvshmemError> {
        let sock = UnixStream::connect(path).map_err(IvshmemError::io("connect to the server"))?;
        Self::from_stream(sock, vectors, timeout)
    }

    /// Takes the setup on a connected socket (see [`connect`](Self::connect)).
    pub fn from_stream(
        sock: UnixStream,
        vectors: u16,
        timeout: Duration,
    ) -> Result<Self, IvshmemError> {
        sock.set_read_timeout(Some(timeout))
            .map_err(IvshmemError::io("set the read timeout"))?;
        let no_fd = |m: wire::Message| match m.fd {
            None => Ok(m.value),
            Some(_) => Err(IvshmemError::UnexpectedFd { value: m.value }),
        };
        let version = no_fd(wire::recv(&sock)?)?;
        if version != PROTOCOL_VERSION {
            return Err(IvshmemError::UnsupportedVersion { version });
        }
        let id = peer_id(no_fd(wire::recv(&sock)?)?)?;
        let shm = wire::recv(&sock)?;
        if shm.value != SHM_MESSAGE {
            return Err(IvshmemError::BadPeerId { value: shm.value });
        }
        let memory = shm.fd.ok_or(IvshmemError::MissingFd {
            what: "shared memory",
        })?;
        let mut client = Self {
            sock,
            id,
            memory,
            own: Vec::new(),
            peers: BTreeMap::new(),
        };
        while client.own.len() < usize::from(vectors) {
            client.next()?;
        }
        Ok(client)
    }

    /// Reads one message and applies it. Before the setup is over a peer-gone message is
    /// as valid as after it (a peer may leave while we connect).
    fn next(&mut self) -> Result<Notification, IvshmemError> {
        let msg = wire::recv(&self.sock)?;
        let id = peer_id(msg.value)?;
        match msg.fd {
            Some(fd) => {
                let list = if id == self.id {
                    &mut self.own
                } else {
                    self.peers.entry(id).or_default()
                };
                list.push(EventFd::from_fd(fd));
                Ok(Notification::PeerVector {
                    id,
                    vector: (list.len() - 1) as u16,
                })
            }
            None if id == self.id => Err(IvshmemError::MissingFd {
                what: "interrupt setup",
            }),
            None => {
                self.peers.remove(&id);
                Ok(Notification::PeerGone { id })
            }
        }
    }

    /// Waits up to `timeout` for the next message and applies it. `Ok(None)`: nothing came.
    pub fn next_notification(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<Notification>, IvshmemError> {
        self.sock
            .set_read_timeout(Some(timeout))
            .map_err(IvshmemError::io("set the read timeout"))?;
        match self.next() {
            Ok(n) => Ok(Some(n)),
            Err(IvshmemError::Timeout { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// This client's id.
    pub fn id(&self) -> PeerId {
        self.id
    }

    /// The shared memory's fd.
    pub fn memory(&self) -> &OwnedFd {
        &self.memory
    }

    /// This client's own eventfds, one per vector: readable when a peer rings it.
    pub fn own_vectors(&self) -> &[EventFd] {
        &self.own
    }

    /// The peers known now and their vectors' eventfds (write one to ring that peer).
    pub fn peers(&self) -> &BTreeMap<PeerId, Vec<EventFd>> {
        &self.peers
    }

    /// Rings peer `id` on `vector`.
    pub fn ring(&self, id: PeerId, vector: u16) -> Result<(), IvshmemError> {
        let fds = self
            .peers
            .get(&id)
            .ok_or(IvshmemError::UnknownPeer { id })?;
        crate::server::ring_vector(fds, id, vector)
    }

    /// The socket (tests use it to misbehave).
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }
}
