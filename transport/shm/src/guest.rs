//! The guest side: it connects, checks what the host offers, maps it and attaches.

use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vmlink_channel::{Channel, Config, EventFdDoorbell};
use vmlink_ring::area::AreaLayout;
use zerocopy::{FromBytes, IntoBytes};

use crate::endpoint::{Endpoint, Role, effective_config};
use crate::error::{Quoted, ShmError};
use crate::host::DEFAULT_HANDSHAKE_TIMEOUT;
use crate::memory::{Layout, LayoutError, MAX_SUB_CHANNELS, Mapping, SharedMemory};
use crate::protocol::{self, Deadline, OfferBody, SetHelloBody};
use crate::{SOCKET_FD_ENV, sys};

/// Set once the inherited socket has been taken, so it is never owned twice.
static INHERITED_TAKEN: AtomicBool = AtomicBool::new(false);

/// Connects to a host's service as a guest.
///
/// ```no_run
/// let guest = vmlink_shm::Guest::new("echo").connect("/run/vmlink/echo.sock")?;
/// guest.channel().send(b"hello", None)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Guest {
    service: String,
    config: Config,
    timeout: Duration,
    sub_channels: Option<u32>,
}

impl Guest {
    /// A guest of the service `service`, with the default channel configuration and
    /// handshake timeout.
    pub fn new(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            config: Config::default(),
            timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            sub_channels: None,
        }
    }

    /// The same guest asking for `count` sub-channels beside the primary channel (at most
    /// [`MAX_SUB_CHANNELS`](crate::MAX_SUB_CHANNELS)). The host offers up to its service's
    /// limit (maybe none); [`Endpoint::take_sub_channels`] gives what came. A host that
    /// does not know sub-channels refuses the hello.
    pub fn with_sub_channels(mut self, count: u32) -> Self {
        self.sub_channels = Some(count);
        self
    }

    /// The same guest with another channel configuration (the GPA page limit is capped at
    /// the buffer area's page count).
    pub fn with_config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// The same guest with another handshake timeout.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Connects to the listener at `path` and runs the handshake. When nothing can be
    /// reached there the error is [`ShmError::Connect`], whose source says why (`NotFound`:
    /// no socket file; `ConnectionRefused`: a socket file nobody listens on).
    pub fn connect(&self, path: impl AsRef<Path>) -> Result<Endpoint, ShmError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ShmError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        self.connect_stream(stream)
    }

    /// Runs the guest side of the handshake on an already-connected socket.
    pub fn connect_stream(&self, stream: UnixStream) -> Result<Endpoint, ShmError> {
        guest_handshake(self, stream)
    }

    /// Runs the handshake on the socket inherited from a host that spawned this process
    /// with [`Service::spawn`](crate::Service::spawn) (its number is in [`SOCKET_FD_ENV`]).
    /// The fd is made close-on-exec, so it goes no further. It can be taken only once per
    /// process.
    pub fn from_env(&self) -> Result<Endpoint, ShmError> {
        let value = std::env::var(SOCKET_FD_ENV)
            .map_err(|_| ShmError::NoInheritedSocket(format!("{SOCKET_FD_ENV} is not set")))?;
        let fd: RawFd = value.parse().map_err(|_| {
            ShmError::NoInheritedSocket(format!(
                "{SOCKET_FD_ENV}={} is not an fd number",
                Quoted(&value)
            ))
        })?;
        if fd < 3 {
            return Err(ShmError::NoInheritedSocket(format!(
                "fd {fd} is a standard stream"
            )));
        }
        // Close-on-exec from now on; this also fails (EBADF) when the fd is not open.
        sys::set_cloexec_raw(fd, true)
            .map_err(|e| ShmError::NoInheritedSocket(format!("fd {fd}: {e}")))?;
        if INHERITED_TAKEN.swap(true, Ordering::AcqRel) {
            return Err(ShmError::NoInheritedSocket(
                "the inherited socket was taken already".into(),
            ));
        }
        // SAFETY: the fd is open (F_SETFD succeeded), was inherited for this purpose by the
        // spawning host, and the flag above makes this the only place that takes ownership
        // of it; nothing else in this crate uses it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        match sys::socket_type(owned.as_fd()) {
            Ok(sys::SockType::Stream) => {}
            _ => {
                // Not ours after all: give it back unclosed.
                std::mem::forget(owned);
                INHERITED_TAKEN.store(false, Ordering::Release);
                return Err(ShmError::NoInheritedSocket(format!(
                    "fd {fd} is not a stream socket"
                )));
            }
        }
        self.connect_stream(UnixStream::from(owned))
    }
}

/// Tells the host why its offer is unusable, and returns the error.
fn reject(stream: &UnixStream, error: ShmError, deadline: Deadline) -> ShmError {
    if !matches!(
        error,
        ShmError::PeerClosed { .. } | ShmError::TimedOut(..) | ShmError::Refused { .. }
    ) {
        protocol::send_error(
            stream.as_fd(),
            error.refusal_code(),
            &error.to_string(),
            deadline,
        );
    }
    error
}

fn guest_handshake(guest: &Guest, stream: UnixStream) -> Result<Endpoint, ShmError> {
    let name = protocol::check_service_name(guest.service.as_bytes())?.to_owned();
    let deadline = Deadline::after(guest.timeout);
    let host = sys::peer_credentials(stream.as_fd()).map_err(ShmError::io("SO_PEERCRED"))?;

    let (hello, expected) = match guest.sub_channels {
        None => (protocol::HELLO, protocol::OFFER),
        Some(_) => (protocol::HELLO_SET, protocol::OFFER_SET),
    };
    let mut body = Vec::new();
    if let Some(count) = guest.sub_channels {
        if count > MAX_SUB_CHANNELS {
            return Err(ShmError::Layout(LayoutError::TooManySubChannels {
                count,
                max: MAX_SUB_CHANNELS,
            }));
        }
        let fixed = SetHelloBody {
            sub_channels: (count as u16).into(),
            reserved: 0.into(),
            reserved2: 0.into(),
        };
        body.extend_from_slice(fixed.as_bytes());
    }
    body.extend_from_slice(name.as_bytes());
    protocol::send(stream.as_fd(), hello, &body, &[], deadline)?;
    let offer = protocol::recv(&stream, deadline, "waiting for the host's offer")
        .map_err(|e| reject(&stream, e, deadline))?;
    match offer.kind {
        kind if kind == expected => {}
        protocol::ERROR => return Err(protocol::parse_error(&offer.body)),
        kind => {
            let e = ShmError::UnexpectedMessage {
                kind,
                expected: "offer",
            };
            return Err(reject(&stream, e, deadline));
        }
    }
    let attached = attach(
        &name,
        guest.sub_channels,
        offer.body,
        offer.fds,
        guest.config,
    )
    .map_err(|e| reject(&stream, e, deadline))?;
    let (memory, bells, config) = attached;
    let mut stream = Some(stream);
    let mut channels = Vec::with_capacity(bells.len());
    for (index, (guest_bell, host_bell, socket)) in bells.into_iter().enumerate() {
        // The primary's hang-up fd is the handshake's socket; a sub-channel's its own.
        let hangup = match socket {
            Some(socket) => socket,
            None => OwnedFd::from(stream.take().expect("the primary comes first")),
        };
        let doorbell = EventFdDoorbell::from_fds(guest_bell, host_bell).with_hangup(hangup);
        let view = memory.for_channel(index as u32);
        let channel = Channel::new(view.guest_to_host(), view.host_to_guest(), doorbell, config)
            .map_err(ShmError::Channel)?;
        channels.push((channel, view));
    }
    let sock = channels[0]
        .0
        .doorbell()
        .hangup_fd()
        .expect("hang-up fd set above");
    protocol::send(sock, protocol::READY, &[], &[], deadline)?;
    let mut endpoints = channels
        .into_iter()
        .map(|(channel, view)| Endpoint::new(channel, view, host, name.clone(), Role::Guest));
    let primary = endpoints.next().expect("the primary channel");
    Ok(primary.with_sub_channels(endpoints.collect()))
}

/// One channel's fds from an offer: the bell the guest waits on, the bell it signals, and
/// for a sub-channel the guest's end of its socket pair.
type Bells = (OwnedFd, OwnedFd, Option<OwnedFd>);

type Attached = (SharedMemory, Vec<Bells>, Config);

/// Checks an offer (of one channel, or of a set when `asked` says how many sub-channels
/// were asked for) and maps its memory. Returns the memory, every channel's fds, and the
/// channel configuration.
fn attach(
    asked_service: &str,
    asked: Option<u32>,
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
    config: Config,
) -> Result<Attached, ShmError> {
    let (fixed, rest) = OfferBody::read_from_prefix(&body)
        .map_err(|_| ShmError::Malformed("offer shorter than its fixed part"))?;
    let service_len = fixed.service_len.get() as usize;
    if service_len != rest.len() {
        return Err(ShmError::Malformed("offer's service name length is wrong"));
    }
    let offered = protocol::check_service_name(rest)?;
    if offered != asked_service {
        return Err(ShmError::ServiceMismatch {
            asked: asked_service.to_owned(),
            offered: offered.to_owned(),
        });
    }
    // An offer's flags are zero; a set offer's are its sub-channel count.
    let subs = fixed.flags.get();
    match asked {
        None if subs != 0 => return Err(ShmError::Malformed("offer has unknown flags")),
        Some(asked) if subs > asked => {
            return Err(ShmError::TooManySubChannels {
                asked,
                offered: subs,
            });
        }
        _ => {}
    }
    let layout = Layout::new(
        fixed.guest_to_host.get(),
        fixed.host_to_guest.get(),
        fixed.buffer.get(),
    );
    layout.validate_set(subs)?;
    let expected = 3 + 3 * subs as usize;
    if fds.len() != expected {
        return Err(ShmError::UnexpectedFds {
            expected,
            received: fds.len(),
        });
    }
    let mut fds = fds.into_iter();
    let memfd = fds.next().expect("counted");
    let mut bells = Vec::with_capacity(1 + subs as usize);
    for index in 0..=subs {
        let (host_bell, guest_bell) = (fds.next().expect("counted"), fds.next().expect("counted"));
        for bell in [&host_bell, &guest_bell] {
            sys::set_nonblocking(bell.as_fd()).map_err(ShmError::io("configure a doorbell fd"))?;
        }
        let socket = if index == 0 {
            None
        } else {
            let socket = fds.next().expect("counted");
            match sys::socket_type(socket.as_fd()) {
                Ok(sys::SockType::Stream) => {}
                _ => {
                    return Err(ShmError::Malformed(
                        "a sub-channel's socket is not a stream socket",
                    ));
                }
            }
            Some(socket)
        };
        bells.push((guest_bell, host_bell, socket));
    }
    let memory = map_checked(memfd, layout, subs)?;
    Ok((memory, bells, effective_config(config, layout)))
}

/// Maps a memfd another process sent as the memory of `layout` (already validated), once
/// it has passed every check: sealed, exactly the layout's size, and a sound memory header
/// that says exactly what the layout says. On any failure nothing stays mapped.
pub(crate) fn map_checked(
    memfd: OwnedFd,
    layout: Layout,
    sub_channels: u32,
) -> Result<SharedMemory, ShmError> {
    let len = layout.validate_set(sub_channels)?;
    check_memory(&mut memfd.as_fd(), len)?;
    let map = Mapping::map(memfd, len as usize).map_err(ShmError::io("mmap"))?;
    // The header page, read once into a private copy: it must be sound and say exactly
    // what the layout says. On any failure the mapping is dropped (unmapped) unused.
    let expected = layout.area_for(sub_channels)?;
    let parsed = map.read_header().map_err(ShmError::BadHeader)?;
    check_header(&parsed.layout, &expected)?;
    Ok(SharedMemory::new_set(map, layout, sub_channels))
}

/// Checks that a sound header describes exactly the memory the offer implies (the area's
/// length was checked against the memory's when the header was parsed).
fn check_header(header: &AreaLayout, offer: &AreaLayout) -> Result<(), ShmError> {
    let mismatch = |what, header, offer| {
        if header == offer {
            Ok(())
        } else {
            Err(ShmError::HeaderMismatch {
                what,
                header,
                offer,
            })
        }
    };
    let count = |a: &AreaLayout| a.channels().len() as u64;
    mismatch("the number of channels", count(header), count(offer))?;
    for (h, o) in header.channels().iter().zip(offer.channels()) {
        let rings = [
            (
                "the guest-to-host ring's offset",
                "the guest-to-host ring's length",
                h.guest_to_host,
                o.guest_to_host,
            ),
            (
                "the host-to-guest ring's offset",
                "the host-to-guest ring's length",
                h.host_to_guest,
                o.host_to_guest,
            ),
        ];
        for (offset, len, h, o) in rings {
            mismatch(offset, h.offset, o.offset)?;
            mismatch(len, h.len, o.len)?;
        }
    }
    let (h, o) = (header.buffer(), offer.buffer());
    mismatch("the buffer area's offset", h.offset, o.offset)?;
    mismatch("the buffer area's length", h.len, o.len)?;
    debug_assert_eq!(header, offer);
    Ok(())
}

/// What the guest asks the kernel about an offered memfd, one question per call, so the
/// order of the questions is explicit (and tests can play a host that changes the file
/// between them).
trait MemfdFacts {
    /// The file's seals (`F_GET_SEALS`; an error for a file that cannot carry seals).
    fn seals(&mut self) -> std::io::Result<std::ffi::c_int>;
    /// The file's size and whether it is a regular file (`fstat`).
    fn size(&mut self) -> std::io::Result<(u64, bool)>;
}

impl MemfdFacts for std::os::fd::BorrowedFd<'_> {
    fn seals(&mut self) -> std::io::Result<std::ffi::c_int> {
        sys::get_seals(*self)
    }

    fn size(&mut self) -> std::io::Result<(u64, bool)> {
        sys::file_size(*self)
    }
}

/// Checks that an offered memfd can be mapped as `len` bytes for good: the seals first
/// (it can neither shrink nor grow, and no seal can be removed), and only then its size,
/// which the seals have frozen. Reading the size before the seals would let a host shrink
/// an unsealed file between the two reads and then seal it: the guest would map past the
/// file's end and die of `SIGBUS` on first access.
fn check_memory(memfd: &mut impl MemfdFacts, len: u64) -> Result<(), ShmError> {
    let seals = memfd.seals().map_err(|_| ShmError::NotAMemfd)?;
    if seals & sys::REQUIRED_SEALS != sys::REQUIRED_SEALS {
        return Err(ShmError::NotSealed {
            found: seals,
            required: sys::REQUIRED_SEALS,
        });
    }
    let (size, regular) = memfd.size().map_err(ShmError::io("fstat the memfd"))?;
    if !regular {
        return Err(ShmError::NotAMemfd);
    }
    if size != len {
        return Err(ShmError::SizeMismatch {
            actual: size,
            expected: len,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
