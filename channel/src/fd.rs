//! Eventfds, the poll loop, eventfd doorbells (Linux), and their tokio adapter.
//!
//! This module is vmlink's edge with the kernel for signalling, and every transport uses
//! it: [`EventFd`] is the one eventfd type (vmlink-shm's doorbells, vmlink-kvm's ioeventfd
//! and irqfd), and [`poll_until`] the one poll loop (deadline, `EINTR` retried, an
//! [`Errno`] on failure). Both sit on `nix`, so no raw system call is written here.
//!
//! An [`EventFdDoorbell`] end owns two eventfds: the one it waits on (its bell) and the
//! peer's, which it signals. The eventfd counter makes a ring sticky: a ring before the
//! wait makes the wait return at once, and the read that clears it consumes every ring
//! so far. The fds can come from anywhere (another process, a VMM's ioeventfd / irqfd),
//! so [`EventFdDoorbell::from_fds`] takes them as they are.
//!
//! An eventfd cannot tell that its peer is gone. For that an end may hold a *hang-up fd*:
//! one end of a connected stream (e.g. a Unix socket, the one the fds came over) whose
//! `POLLHUP` / `POLLRDHUP` means the peer closed it or died. Waits watch it beside the bell
//! and report [`DoorbellError::PeerClosed`], after any ring that came first. Dropping the
//! end closes its hang-up fd, which is how the peer learns that we are gone.
//!
//! With the `tokio` feature an [`EventFdDoorbell`] is also an
//! [`AsyncDoorbell`](crate::AsyncDoorbell): its first async wait registers its fds with the
//! reactor of the tokio runtime it runs in, so a channel built on it can be used from
//! blocking threads and async tasks alike. `TokioDoorbell` does the registration up front.

use core::sync::atomic::{AtomicBool, Ordering};
use core::time::Duration;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Instant;

use nix::sys::eventfd::EfdFlags;

use crate::doorbell::{Doorbell, DoorbellError, Wake};

/// The `nix` types [`poll_until`] takes and returns, so other crates need no `nix` of
/// their own to call it.
pub use nix::errno::Errno;
pub use nix::poll::{PollFd, PollFlags};

/// `POLLRDHUP`: the peer of a stream socket shut down its writing half or closed it.
/// nix 0.32 has no name for it, so [`PollFd::revents`] reports `None` when it is set;
/// [`revents`] reads that back as this flag.
pub const POLLRDHUP: PollFlags = PollFlags::from_bits_retain(nix::libc::POLLRDHUP);

/// Poll events that mean the peer hung up.
const HANGUP_EVENTS: PollFlags = PollFlags::POLLHUP
    .union(PollFlags::POLLERR)
    .union(POLLRDHUP);

impl From<Errno> for DoorbellError {
    fn from(e: Errno) -> Self {
        DoorbellError::Os(e as i32)
    }
}

/// `ppoll(2)` until something is ready or `deadline` passes (`None`: no deadline),
/// retrying on `EINTR` with the time left. Returns how many entries have events (0: the
/// deadline passed); read each entry's events with [`revents`]. The time left goes to the
/// kernel in nanoseconds (`poll(2)`'s milliseconds would turn a 100 µs wait into 1 ms), and
/// a deadline is never cut short.
pub fn poll_until(fds: &mut [PollFd<'_>], deadline: Option<Instant>) -> Result<usize, Errno> {
    loop {
        let timeout = deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            nix::sys::time::TimeSpec::from_duration(left)
        });
        match nix::poll::ppoll(fds, timeout, None) {
            Ok(n) => return Ok(usize::try_from(n).unwrap_or(0)),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}

/// The events [`poll_until`] found on `fd`. nix 0.32 cannot name `POLLRDHUP`; `poll(2)`
/// reports only the events asked for plus `POLLHUP`, `POLLERR` and `POLLNVAL` (all named),
/// so events it cannot name are `POLLRDHUP`, returned as [`POLLRDHUP`].
pub fn revents(fd: &PollFd<'_>) -> PollFlags {
    fd.revents().unwrap_or(POLLRDHUP)
}

/// An eventfd: a kernel counter that [`signal`](Self::signal) adds 1 to and
/// [`drain`](Self::drain) reads back to zero, and that polls readable while non-zero.
///
/// [`new`](Self::new) makes one (counter 0, close-on-exec, non-blocking);
/// [`from_fd`](Self::from_fd) takes one from elsewhere (a peer, a VMM), as it is. An fd
/// that is not an eventfd makes the calls fail or report odd lengths as errors, never
/// worse.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A new eventfd, counter 0, close-on-exec and non-blocking.
    pub fn new() -> io::Result<Self> {
        let fd =
            nix::sys::eventfd::EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        Ok(Self(fd.into()))
    }

    /// A new eventfd, counter 0, close-on-exec and blocking: [`drain`](Self::drain) sleeps
    /// in `read(2)` until the counter is non-zero. For a thread that does nothing but wait
    /// on it (the benchmarks' eventfd floor); doorbells use [`new`](Self::new).
    pub fn blocking() -> io::Result<Self> {
        let fd = nix::sys::eventfd::EventFd::from_flags(EfdFlags::EFD_CLOEXEC)?;
        Ok(Self(fd.into()))
    }

    /// Takes `fd` as an eventfd. It should be non-blocking: a blocking one makes a
    /// [`drain`](Self::drain) that finds the counter zero block.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self(fd)
    }

    /// Another fd for the same eventfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(Self)
    }

    /// Adds 1 to the counter. A saturated counter (`EAGAIN`) is rung already, so that is
    /// success too.
    pub fn signal(&self) -> Result<(), DoorbellError> {
        loop {
            match nix::unistd::write(&self.0, &1u64.to_ne_bytes()) {
                Ok(_) | Err(Errno::EAGAIN) => return Ok(()),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads the counter, resetting it. True when it was non-zero (the bell rang); false
    /// when it was zero (`EAGAIN`: nothing rang, or another reader took it). The value is
    /// not used: 8 bytes read means "rang", any other length is an error. A blocking
    /// eventfd ([`blocking`](Self::blocking)) waits for a ring instead of returning false.
    pub fn drain(&self) -> Result<bool, DoorbellError> {
        let mut value = [0u8; 8];
        loop {
            match nix::unistd::read(&self.0, &mut value) {
                Ok(8) => return Ok(true),
                // An eventfd reads 8 bytes or fails; anything else is not an eventfd.
                Ok(_) => return Err(Errno::EINVAL.into()),
                Err(Errno::EAGAIN) => return Ok(false),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Waits until the counter is non-zero or `deadline` passes (`None`: no deadline),
    /// without reading it. True when it is readable.
    pub fn wait_readable(&self, deadline: Option<Instant>) -> Result<bool, DoorbellError> {
        let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
        if poll_until(&mut fds, deadline)? == 0 {
            return Ok(false);
        }
        let events = revents(&fds[0]);
        if events.contains(PollFlags::POLLNVAL) {
            return Err(Errno::EBADF.into());
        }
        Ok(true)
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl From<OwnedFd> for EventFd {
    fn from(fd: OwnedFd) -> Self {
        Self(fd)
    }
}

impl From<EventFd> for OwnedFd {
    fn from(fd: EventFd) -> Self {
        fd.0
    }
}

/// One end of a doorbell made of eventfds.
///
/// `signal` adds 1 to the peer's eventfd; `wait` polls our own and reads it to zero. With a
/// hang-up fd ([`with_hangup`](Self::with_hangup)) the end also learns when its peer is
/// gone; without one, [`peer_closed`](Doorbell::peer_closed) is always false and waits
/// never return [`DoorbellError::PeerClosed`].
#[derive(Debug)]
pub struct EventFdDoorbell {
    wait: EventFd,
    signal: EventFd,
    hangup: Option<OwnedFd>,
    /// The hang-up fd was seen hung up (it never recovers).
    closed: AtomicBool,
    /// Registrations with tokio's reactor, made by the first `poll_wait`.
    #[cfg(feature = "tokio")]
    reactor: std::sync::OnceLock<tokio_bell::Registrations>,
}

#[cfg(feature = "tokio")]
fn io_error(e: &io::Error) -> DoorbellError {
    DoorbellError::Os(e.raw_os_error().unwrap_or(Errno::EIO as i32))
}

impl EventFdDoorbell {
    /// Two connected ends in this process: each end's `signal` rings the other's bell.
    /// They have no hang-up fd; add one to each with [`with_hangup`](Self::with_hangup)
    /// (e.g. the two ends of a `UnixStream::pair()`).
    pub fn pair() -> io::Result<(Self, Self)> {
        let a_bell = EventFd::new()?;
        let b_bell = EventFd::new()?;
        let a = Self::from_fds(a_bell.try_clone()?, b_bell.try_clone()?);
        let b = Self::from_fds(b_bell, a_bell);
        Ok((a, b))
    }

    /// An end that waits on the eventfd `wait` and signals the eventfd `signal` (fds
    /// received from the peer, a VMM, a parent process: an [`OwnedFd`] or an [`EventFd`]).
    /// They should be non-blocking; a blocking `wait` fd could block a wait that another
    /// waiter raced to the ring.
    pub fn from_fds(wait: impl Into<EventFd>, signal: impl Into<EventFd>) -> Self {
        Self {
            wait: wait.into(),
            signal: signal.into(),
            hangup: None,
            closed: AtomicBool::new(false),
            #[cfg(feature = "tokio")]
            reactor: std::sync::OnceLock::new(),
        }
    }

    /// The same end, also watching `hangup`: one end of a connected stream (a Unix socket,
    /// a pipe's read end) that reports `POLLHUP` / `POLLRDHUP` once the peer is gone.
    /// The end owns it: dropping the end closes it, which tells the peer we are gone if
    /// the peer watches the other end. Only hang-ups count; data on it is left alone.
    pub fn with_hangup(mut self, hangup: OwnedFd) -> Self {
        self.hangup = Some(hangup);
        self
    }

    /// The eventfd this end waits on.
    pub fn wait_fd(&self) -> BorrowedFd<'_> {
        self.wait.as_fd()
    }

    /// The eventfd this end signals.
    pub fn signal_fd(&self) -> BorrowedFd<'_> {
        self.signal.as_fd()
    }

    /// The hang-up fd, if any.
    pub fn hangup_fd(&self) -> Option<BorrowedFd<'_>> {
        self.hangup.as_ref().map(AsFd::as_fd)
    }

    /// Looks at the hang-up fd without blocking; remembers a hang-up once seen.
    fn check_hangup(&self) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return true;
        }
        let Some(h) = &self.hangup else {
            return false;
        };
        let mut fds = [PollFd::new(h.as_fd(), POLLRDHUP)];
        let hung_up = matches!(poll_until(&mut fds, Some(Instant::now())), Ok(1))
            && revents(&fds[0]).intersects(HANGUP_EVENTS);
        if hung_up {
            self.closed.store(true, Ordering::Release);
        }
        hung_up
    }

    /// The peer is gone; a ring that raced the hang-up is reported first.
    fn hung_up(&self) -> Result<Wake, DoorbellError> {
        self.closed.store(true, Ordering::Release);
        if self.wait.drain()? {
            return Ok(Wake::Signalled);
        }
        Err(DoorbellError::PeerClosed)
    }
}

impl Doorbell for EventFdDoorbell {
    /// Adds 1 to the peer's eventfd. A saturated counter (`EAGAIN`) is already rung, so that
    /// is success too. Never reports [`DoorbellError::PeerClosed`]: writing to a departed
    /// peer's eventfd is harmless; the channel learns of a departure from [`wait`] and
    /// asks [`peer_closed`] when a receive finds nothing or a send finds the ring full.
    ///
    /// [`wait`]: Doorbell::wait
    /// [`peer_closed`]: Doorbell::peer_closed
    fn signal(&self) -> Result<(), DoorbellError> {
        self.signal.signal()
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<Wake, DoorbellError> {
        // A timeout too large to add to now is no timeout.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut fds = [
            PollFd::new(self.wait.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.wait.as_fd(), PollFlags::empty()),
        ];
        let count = match &self.hangup {
            Some(h) => {
                fds[1] = PollFd::new(h.as_fd(), POLLRDHUP);
                2
            }
            None => 1,
        };
        loop {
            // `poll` rewrites every entry's events, so nothing is left from the last turn.
            if poll_until(&mut fds[..count], deadline)? == 0 {
                return Ok(Wake::TimedOut);
            }
            let bell = revents(&fds[0]);
            if bell.contains(PollFlags::POLLNVAL) {
                return Err(Errno::EBADF.into());
            }
            if bell.intersects(PollFlags::POLLIN | PollFlags::POLLERR) {
                // Consume the ring. Finding the counter zero means another reader took it
                // first: a spurious wake-up, which callers tolerate.
                self.wait.drain()?;
                return Ok(Wake::Signalled);
            }
            if count == 2 {
                let hangup = revents(&fds[1]);
                if hangup.contains(PollFlags::POLLNVAL) {
                    return Err(Errno::EBADF.into());
                }
                if hangup.intersects(HANGUP_EVENTS) {
                    // The bell was looked at before the hang-up fd, so a peer that rang
                    // and then left may have rung after that look: `hung_up` reads again.
                    return self.hung_up();
                }
            }
        }
    }

    /// Adds 1 to our own eventfd, waking a thread of this side blocked in `wait`.
    fn wake_local(&self) -> Result<(), DoorbellError> {
        self.wait.signal()
    }

    fn peer_closed(&self) -> bool {
        self.check_hangup()
    }
}

#[cfg(feature = "tokio")]
pub use self::tokio_bell::{TokioDoorbell, register_owned};

#[cfg(feature = "tokio")]
mod tokio_bell {
    use core::task::{Context, Poll};
    use core::time::Duration;
    use std::io;
    use std::os::fd::OwnedFd;

    use tokio::io::Interest;
    use tokio::io::unix::AsyncFd;

    use super::{Errno, EventFdDoorbell, io_error};
    use crate::doorbell::{AsyncDoorbell, Doorbell, DoorbellError, Wake};

    /// An end's fds on tokio's reactor: duplicates of the bell and hang-up fds, so each
    /// registration owns the fd it registered.
    #[derive(Debug)]
    pub(super) struct Registrations {
        bell: AsyncFd<OwnedFd>,
        hangup: Option<AsyncFd<OwnedFd>>,
    }

    fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
        register_owned(fd, Interest::READABLE)
    }

    /// Registers `fd` with the current tokio runtime's reactor for `interest`: the safe
    /// form of tokio's `AsyncFd::register_with_interest` for a descriptor the caller owns
    /// (a transport's socket or eventfd copy). Fails outside a runtime with I/O enabled.
    // The one unsafe call of the module: tokio's registration, whose contract is about
    // the fd staying open, which owning it guarantees.
    #[allow(unsafe_code)]
    pub fn register_owned(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
        // SAFETY: the `AsyncFd` owns `fd`: the descriptor stays open, and `as_raw_fd`
        // keeps returning it, until the `AsyncFd` is dropped or gives it back.
        unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
    }

    impl Registrations {
        /// Registers `inner`'s fds with the current runtime's reactor.
        fn new(inner: &EventFdDoorbell) -> io::Result<Self> {
            let bell = register(inner.wait.try_clone()?.into())?;
            let hangup = match &inner.hangup {
                Some(h) => Some(register(h.try_clone()?)?),
                None => None,
            };
            Ok(Self { bell, hangup })
        }

        fn poll_wait(
            &self,
            inner: &EventFdDoorbell,
            cx: &mut Context<'_>,
        ) -> Poll<Result<(), DoorbellError>> {
            loop {
                match self.bell.poll_read_ready(cx) {
                    Poll::Ready(Ok(mut guard)) => match inner.wait.drain() {
                        Ok(true) => return Poll::Ready(Ok(())),
                        // Readiness was stale (a blocking wait or another reader took the
                        // ring): clear it and poll again, which registers the waker.
                        Ok(false) => guard.clear_ready(),
                        Err(e) => return Poll::Ready(Err(e)),
                    },
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(io_error(&e))),
                    Poll::Pending => break,
                }
            }
            // The bell has not rung (and our waker is registered with it): is the peer gone?
            if inner.closed.load(core::sync::atomic::Ordering::Acquire) {
                return Poll::Ready(inner.hung_up().map(drop));
            }
            let Some(hangup) = &self.hangup else {
                return Poll::Pending;
            };
            loop {
                match hangup.poll_read_ready(cx) {
                    Poll::Ready(Ok(mut guard)) => {
                        if inner.check_hangup() {
                            return Poll::Ready(inner.hung_up().map(drop));
                        }
                        // Data on the stream, not a hang-up: wait for the next edge.
                        guard.clear_ready();
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(io_error(&e))),
                    Poll::Pending => return Poll::Pending,
                }
            }
        }
    }

    /// With the `tokio` feature an [`EventFdDoorbell`] is an [`AsyncDoorbell`] itself: the
    /// first `poll_wait` registers its fds with the reactor of the tokio runtime it runs
    /// in, and the end stays bound to that runtime. Polled outside a tokio runtime (or in
    /// one without I/O enabled) it fails with `DoorbellError::Os(ENOTSUP)`.
    impl AsyncDoorbell for EventFdDoorbell {
        fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<Result<(), DoorbellError>> {
            if let Some(r) = self.reactor.get() {
                return r.poll_wait(self, cx);
            }
            if tokio::runtime::Handle::try_current().is_err() {
                return Poll::Ready(Err(Errno::ENOTSUP.into()));
            }
            match Registrations::new(self) {
                Ok(r) => {
                    // A racing first poll may have registered meanwhile; either set works.
                    let r = self.reactor.get_or_init(|| r);
                    r.poll_wait(self, cx)
                }
                Err(e) => Poll::Ready(Err(io_error(&e))),
            }
        }
    }

    /// An [`EventFdDoorbell`] registered with tokio's reactor up front (at construction,
    /// rather than on its first async wait). The blocking [`Doorbell`] methods work too.
    #[derive(Debug)]
    pub struct TokioDoorbell {
        // Declared before `inner`, so the registrations drop (and deregister) first.
        reactor: Registrations,
        inner: EventFdDoorbell,
    }

    impl TokioDoorbell {
        /// Registers `inner`'s fds with the current tokio runtime's reactor.
        ///
        /// # Panics
        ///
        /// Outside a tokio runtime, or in one built without I/O enabled.
        pub fn new(inner: EventFdDoorbell) -> io::Result<Self> {
            Ok(Self {
                reactor: Registrations::new(&inner)?,
                inner,
            })
        }

        /// The wrapped end.
        pub fn get_ref(&self) -> &EventFdDoorbell {
            &self.inner
        }

        /// Deregisters and gives back the wrapped end.
        pub fn into_inner(self) -> EventFdDoorbell {
            self.inner
        }
    }

    impl Doorbell for TokioDoorbell {
        fn signal(&self) -> Result<(), DoorbellError> {
            self.inner.signal()
        }
        fn wait(&self, timeout: Option<Duration>) -> Result<Wake, DoorbellError> {
            self.inner.wait(timeout)
        }
        fn wake_local(&self) -> Result<(), DoorbellError> {
            self.inner.wake_local()
        }
        fn peer_closed(&self) -> bool {
            self.inner.peer_closed()
        }
    }

    impl AsyncDoorbell for TokioDoorbell {
        fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<Result<(), DoorbellError>> {
            self.reactor.poll_wait(&self.inner, cx)
        }
    }
}
