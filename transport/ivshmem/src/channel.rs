//! vmlink channels over the ivshmem memory, the same [`Channel`] API as every other
//! transport.
//!
//! The memory holds one channel (vmlink-shm's layout, see [`crate::memory`]). The host
//! writes the host→guest ring and reads the guest→host ring; the guest does the opposite.
//!
//! - Host ([`Server::channel`]): the rings in the server's memfd, as vmlink-shm's
//!   [`ShmRing`](vmlink_shm::ShmRing); the doorbell is an [`EventFdDoorbell`] that rings
//!   the guest peer's eventfd for a vector (QEMU turns that into an MSI-X interrupt in the
//!   guest), waits on our own
//!   eventfd for that vector (which QEMU writes when the guest writes its Doorbell
//!   register), and watches the peer: when the server sees the peer go (QEMU exited or was
//!   killed) or the server stops, the doorbell's hang-up fd hangs up, and the channel sees
//!   its peer closed ([`ChannelError::Closed`](vmlink_channel::ChannelError::Closed) once
//!   it has drained what the peer committed).
//! - Guest ([`guest_channel`]): the rings in BAR2, as vmlink-ring's `SliceMem` over the
//!   mapping ([`BarRing`]); the doorbell ([`GuestDoorbell`]) rings the host by writing
//!   `(host << 16) | vector` to the Doorbell register and waits for the host's doorbell on
//!   the vector's MSI-X eventfd when VFIO gives one ([`Interrupts::Msix`]), else by polling:
//!   a wait sleeps [`Interrupts::Polling`]'s interval and reports a (maybe spurious) wake,
//!   after which the channel looks at the ring again. A guest cannot learn that the host
//!   went away: QEMU keeps the memory mapped and tells the guest nothing, so the host's
//!   silence shows as waits ending at their deadlines.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags};
use vmlink_channel::fd::{EventFd, poll_until, revents};
use vmlink_channel::{Channel, Config, Doorbell, DoorbellError, EventFdDoorbell, Wake};
use vmlink_shm::ShmChannel;

use crate::guest::{BarMap, Device, ring_doorbell};
use crate::vfio::MsixVectors;
use crate::{IvshmemError, LOCAL_PEER, PeerId, Server};

/// A host channel: the same type as vmlink-shm's channels.
pub type HostChannel = ShmChannel;

/// A guest channel: rings in BAR2, the guest's doorbell.
pub type GuestChannel = Channel<BarRing, GuestDoorbell>;

/// `config` with the GPA page limit capped at the buffer area's page count (page numbers
/// are indices into the buffer area).
fn capped(config: Config, buffer_pages: u64) -> Config {
    let limit = config
        .gpa_page_limit
        .map_or(buffer_pages, |l| l.min(buffer_pages));
    config.with_gpa_page_limit(limit)
}

impl Server {
    /// The host's end of the channel with client `peer`: we ring it on `vector` and wait on
    /// our own eventfd for `vector` (the guest rings [`LOCAL_PEER`] on that vector). The
    /// channel sees its peer closed when the server sees `peer` leave or the server stops.
    ///
    /// Every client maps the same memory, which holds one channel: one guest at a time
    /// talks over it. A channel made again over the same memory (after a guest left)
    /// starts from the ring indices as they are.
    pub fn channel(
        &self,
        peer: PeerId,
        vector: u16,
        config: Config,
    ) -> Result<HostChannel, IvshmemError> {
        let (signal, hangup) = self.watch_peer(peer, vector)?;
        let wait = self
            .local_vector(vector)?
            .try_clone()
            .map_err(IvshmemError::io("dup an eventfd"))?;
        let doorbell = EventFdDoorbell::from_fds(wait, signal).with_hangup(OwnedFd::from(hangup));
        let memory = self.memory();
        let config = capped(config, memory.layout().buffer_pages());
        Ok(Channel::new(
            memory.host_to_guest(),
            memory.guest_to_host(),
            doorbell,
            config,
        )?)
    }
}

/// One ring in BAR2: ring memory over the mapping, keeping it mapped.
pub type BarRing = vmlink_ring_mapping::MappedRing;

/// A ring at `offset`, `len` bytes, in the BAR2 mapping `map`.
fn bar_ring(map: &Arc<BarMap>, offset: u64, len: u64) -> Result<BarRing, IvshmemError> {
    let bad = || IvshmemError::OutOfBounds {
        offset: offset as usize,
        len: len as usize,
        size: map.len,
    };
    let (offset, len) = (
        usize::try_from(offset).map_err(|_| bad())?,
        usize::try_from(len).map_err(|_| bad())?,
    );
    if offset.checked_add(len).is_none_or(|end| end > map.len) {
        return Err(bad());
    }
    let start = map.ptr.as_ptr().wrapping_add(offset);
    let start = std::ptr::NonNull::new(start).ok_or_else(bad)?;
    // SAFETY: `start..start + len` lies inside the BAR2 mapping (checked above), which the
    // `Arc` given as the ring's owner keeps mapped. This process reaches it only through
    // the ring (atomics); the host writes it at any time, which ring memory allows. A BAR
    // mapping cannot shrink.
    unsafe { BarRing::new(start, len, map.clone()) }
        .map_err(|e| IvshmemError::BadHeader(format!("a ring: {e:?}")))
}

/// How the guest learns of the host's doorbell.
#[derive(Debug)]
pub enum Interrupts {
    /// The device's MSI-X vectors through VFIO: waits sleep on the vector's eventfd.
    Msix(MsixVectors),
    /// No interrupt: a wait sleeps this long and reports a wake, and the channel looks at
    /// the ring again.
    Polling(Duration),
}

impl Interrupts {
    /// `"msix"` or `"polling"`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Msix(_) => "msix",
            Self::Polling(_) => "polling",
        }
    }
}

/// The guest's doorbell: rings the host through the Doorbell register, waits on an MSI-X
/// eventfd or polls.
#[derive(Debug)]
pub struct GuestDoorbell {
    regs: Arc<BarMap>,
    host: PeerId,
    vector: u16,
    interrupts: Interrupts,
    /// Rung by [`Doorbell::wake_local`]; every wait watches it.
    local: EventFd,
}

impl GuestDoorbell {
    /// How this doorbell waits.
    pub fn interrupts(&self) -> &Interrupts {
        &self.interrupts
    }
}

impl Doorbell for GuestDoorbell {
    /// One MMIO write of the Doorbell register. QEMU writes the host's eventfd; if the
    /// host is gone the write goes nowhere, so this never reports the peer closed.
    fn signal(&self) -> Result<(), DoorbellError> {
        ring_doorbell(&self.regs, self.host, self.vector)
            .map_err(|_| DoorbellError::Os(nix::errno::Errno::EFAULT as i32))
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<Wake, DoorbellError> {
        let now = Instant::now();
        let deadline = timeout.and_then(|t| now.checked_add(t));
        let (bell, until, polling) = match &self.interrupts {
            Interrupts::Msix(msix) => {
                let bell = msix
                    .vectors()
                    .get(usize::from(self.vector))
                    .ok_or(DoorbellError::Os(nix::errno::Errno::EINVAL as i32))?;
                (Some(bell), deadline, false)
            }
            Interrupts::Polling(every) => {
                let tick = now + *every;
                (None, Some(deadline.map_or(tick, |d| d.min(tick))), true)
            }
        };
        let mut fds = [
            PollFd::new(self.local.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.local.as_fd(), PollFlags::empty()),
        ];
        let count = match bell {
            Some(b) => {
                fds[1] = PollFd::new(b.as_fd(), PollFlags::POLLIN);
                2
            }
            None => 1,
        };
        if poll_until(&mut fds[..count], until)? == 0 {
            // A polling tick that ends before the caller's deadline is a wake: look again.
            let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
            return Ok(if polling && !timed_out {
                Wake::Signalled
            } else {
                Wake::TimedOut
            });
        }
        if !revents(&fds[0]).is_empty() {
            self.local.drain()?;
        }
        if let Some(b) = bell
            && count == 2
            && !revents(&fds[1]).is_empty()
        {
            b.drain()?;
        }
        Ok(Wake::Signalled)
    }

    fn wake_local(&self) -> Result<(), DoorbellError> {
        self.local.signal()
    }
}

/// The guest's two rings in `device`'s BAR2 (outgoing: guest→host, incoming:
/// host→guest), where the memory header read there says; it must describe one channel.
pub fn guest_rings(device: &Device) -> Result<(BarRing, BarRing), IvshmemError> {
    let header = device
        .header()
        .map_err(|e| IvshmemError::BadHeader(e.to_string()))?;
    let [channel] = header.layout.channels() else {
        return Err(IvshmemError::BadHeader(format!(
            "{} channels where one was expected",
            header.layout.channels().len()
        )));
    };
    let map = device.memory_map();
    Ok((
        bar_ring(
            &map,
            channel.guest_to_host.offset,
            channel.guest_to_host.len,
        )?,
        bar_ring(
            &map,
            channel.host_to_guest.offset,
            channel.host_to_guest.len,
        )?,
    ))
}

/// The guest's doorbell through `device`: rings the host ([`LOCAL_PEER`]) on `vector` and
/// waits as `interrupts` says (with MSI-X: on the eventfd of the same vector).
pub fn guest_doorbell(
    device: &Device,
    vector: u16,
    interrupts: Interrupts,
) -> Result<GuestDoorbell, IvshmemError> {
    if let Interrupts::Msix(msix) = &interrupts
        && msix.vectors().len() <= usize::from(vector)
    {
        return Err(IvshmemError::NoSuchVector {
            id: LOCAL_PEER,
            vector,
            vectors: msix.vectors().len() as u16,
        });
    }
    Ok(GuestDoorbell {
        regs: device.regs_map(),
        host: LOCAL_PEER,
        vector,
        interrupts,
        local: EventFd::new().map_err(IvshmemError::io("eventfd"))?,
    })
}

/// The guest's end of the channel in `device`'s BAR2 ([`guest_rings`], [`guest_doorbell`]).
pub fn guest_channel(
    device: &Device,
    vector: u16,
    interrupts: Interrupts,
    config: Config,
) -> Result<GuestChannel, IvshmemError> {
    let (outgoing, incoming) = guest_rings(device)?;
    let doorbell = guest_doorbell(device, vector, interrupts)?;
    let pages = device
        .header()
        .map_err(|e| IvshmemError::BadHeader(e.to_string()))?
        .layout
        .buffer()
        .len
        / 4096;
    Ok(Channel::new(
        outgoing,
        incoming,
        doorbell,
        capped(config, pages),
    )?)
}
