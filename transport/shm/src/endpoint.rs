//! One side of an established shared-memory channel.

use vmlink_channel::{Channel, ChannelSet, Config, EventFdDoorbell};

use crate::memory::{BufferArea, Layout, SharedMemory, ShmRing};
use crate::policy::PeerCredentials;

/// A channel over this transport: rings in the shared mapping, eventfd doorbells that also
/// watch the Unix socket for the peer's hang-up.
pub type ShmChannel = Channel<ShmRing, EventFdDoorbell>;

/// Which side of the channel an [`Endpoint`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Role {
    /// The side that allocated the memory and listened.
    Host,
    /// The side that connected.
    Guest,
}

/// One side of an established channel: the channel itself, the shared memory (rings and
/// buffer area), and who is at the other end.
///
/// Dropping it (or the channel taken from it) closes the socket, which the peer sees as a
/// hang-up: its waits end and, once it has drained what we committed, it gets
/// [`ChannelError::Closed`](vmlink_channel::ChannelError::Closed).
#[derive(Debug)]
pub struct Endpoint {
    channel: ShmChannel,
    buffer: BufferArea,
    memory: SharedMemory,
    peer: PeerCredentials,
    service: String,
    role: Role,
    identity: Option<vmlink_policy::Peer>,
    subs: Vec<Endpoint>,
}

impl Endpoint {
    pub(crate) fn new(
        channel: ShmChannel,
        memory: SharedMemory,
        peer: PeerCredentials,
        service: String,
        role: Role,
    ) -> Self {
        crate::monitor::publish_channel(channel.watch(), &memory, role, &service, peer);
        Self {
            channel,
            buffer: memory.buffer(),
            memory,
            peer,
            service,
            role,
            identity: None,
            subs: Vec::new(),
        }
    }

    /// The same primary endpoint holding its sub-channels until they are taken.
    pub(crate) fn with_sub_channels(mut self, subs: Vec<Endpoint>) -> Self {
        self.subs = subs;
        self
    }

    /// Takes the sub-channels the handshake opened beside this primary channel (in order:
    /// channel 1, 2, ...), each an endpoint of its own over the same memory with its own
    /// rings, doorbells and socket pair; empty when none were asked for or offered, or
    /// they were taken already. Dropping one closes it alone: its peer's waits end with
    /// the peer gone, and the other channels go on.
    pub fn take_sub_channels(&mut self) -> Vec<Endpoint> {
        std::mem::take(&mut self.subs)
    }

    /// Sub-channels held and not yet taken.
    pub fn sub_channel_count(&self) -> usize {
        self.subs.len()
    }

    /// This endpoint and its sub-channels as a [`ChannelSet`] (the primary at index 0),
    /// which picks a channel by CPU or by key.
    pub fn into_set(mut self) -> ChannelSet<Endpoint> {
        let subs = self.take_sub_channels();
        ChannelSet::new(self, subs)
    }

    /// Which channel of its memory this endpoint is: 0 for the primary, 1.. for
    /// sub-channels.
    pub fn channel_index(&self) -> u32 {
        self.memory.channel_index()
    }

    /// The same endpoint with the peer's identity as a role-based policy established it.
    pub(crate) fn with_identity(mut self, identity: Option<vmlink_policy::Peer>) -> Self {
        self.identity = identity;
        self
    }

    /// Who the peer is (uid, every group, executable), when the service's role-based
    /// access policy identified it at the handshake: what later decisions (operations in
    /// the service) are judged on.
    pub fn identity(&self) -> Option<&vmlink_policy::Peer> {
        self.identity.as_ref()
    }

    /// The channel.
    pub fn channel(&self) -> &ShmChannel {
        &self.channel
    }

    /// The channel, mutably (to quiesce it for a hand-over).
    pub(crate) fn channel_mut(&mut self) -> &mut ShmChannel {
        &mut self.channel
    }

    /// The buffer area, for bulk data that GPA-direct packets describe by page index.
    pub fn buffer(&self) -> &BufferArea {
        &self.buffer
    }

    /// The shared memory: layout, rings, the mapping and its memfd.
    pub fn memory(&self) -> &SharedMemory {
        &self.memory
    }

    /// The credentials of the process at the other end, as of when it connected (for a
    /// guest: the host's; over a socket pair: whoever created the pair).
    pub fn peer(&self) -> PeerCredentials {
        self.peer
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Which side this is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The channel and the shared memory, for callers that keep them apart. Sub-channels
    /// not taken ([`take_sub_channels`](Self::take_sub_channels)) are closed.
    pub fn into_parts(self) -> (ShmChannel, SharedMemory) {
        (self.channel, self.memory)
    }

    /// The channel, and everything else the endpoint holds (the memory, who the peer is,
    /// the service, the role) to put a channel back into later with [`Detached::attach`]:
    /// for a caller that runs a layer over the channel's links (a secure channel) and
    /// takes it off again to hand the endpoint to a successor.
    pub fn detach(self) -> (ShmChannel, Detached) {
        let Self {
            channel,
            buffer,
            memory,
            peer,
            service,
            role,
            identity,
            subs,
        } = self;
        (
            channel,
            Detached {
                buffer,
                memory,
                peer,
                service,
                role,
                identity,
                subs,
            },
        )
    }
}

/// An [`Endpoint`] without its channel (see [`Endpoint::detach`]): the shared memory stays
/// mapped, and dropping this does not close the socket (the channel's doorbell holds it).
#[derive(Debug)]
pub struct Detached {
    buffer: BufferArea,
    memory: SharedMemory,
    peer: PeerCredentials,
    service: String,
    role: Role,
    identity: Option<vmlink_policy::Peer>,
    subs: Vec<Endpoint>,
}

impl Detached {
    /// The endpoint again, with `channel`: the one [`Endpoint::detach`] took out (or the
    /// same rings and doorbell in another form, such as a layer taken off them).
    pub fn attach(self, channel: ShmChannel) -> Endpoint {
        Endpoint {
            channel,
            buffer: self.buffer,
            memory: self.memory,
            peer: self.peer,
            service: self.service,
            role: self.role,
            identity: self.identity,
            subs: self.subs,
        }
    }

    /// The shared memory.
    pub fn memory(&self) -> &SharedMemory {
        &self.memory
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Which side this is.
    pub fn role(&self) -> Role {
        self.role
    }
}

/// `config` with the GPA page limit capped at the buffer area's page count: page numbers
/// are indices into the buffer area, so anything at or above its page count is rejected.
pub(crate) fn effective_config(config: Config, layout: Layout) -> Config {
    let pages = layout.buffer_pages();
    let limit = config.gpa_page_limit.map_or(pages, |l| l.min(pages));
    config.with_gpa_page_limit(limit)
}
