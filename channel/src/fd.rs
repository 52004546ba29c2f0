//! Eventfd doorbells (Linux), and their tokio adapter.
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

// The only module of the crate that talks to the kernel: `eventfd`, `read`, `write` and
// `poll` through `libc`. Each unsafe block makes exactly one such call (or wraps a fresh
// fd), with its SAFETY argument above it; everything else in the crate stays safe.
#![allow(unsafe_code)]

use core::sync::atomic::{AtomicBool, Ordering};
use core::time::Duration;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Instant;

use crate::doorbell::{Doorbell, DoorbellError, Wake};

/// Poll events that mean the peer hung up.
const HANGUP_EVENTS: libc::c_short = libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR;

/// One end of a doorbell made of eventfds.
///
/// `signal` adds 1 to the peer's eventfd; `wait` polls our own and reads it to zero. With a
/// hang-up fd ([`with_hangup`](Self::with_hangup)) the end also learns when its peer is
/// gone; without one, [`peer_closed`](Doorbell::peer_closed) is always false and waits
/// never return [`DoorbellError::PeerClosed`].
#[derive(Debug)]
pub struct EventFdDoorbell {
    wait: OwnedFd,
    signal: OwnedFd,
    hangup: Option<OwnedFd>,
    /// The hang-up fd was seen hung up (it never recovers).
    closed: AtomicBool,
    /// Registrations with tokio's reactor, made by the first `poll_wait`.
    #[cfg(feature = "tokio")]
    reactor: std::sync::OnceLock<tokio_bell::Registrations>,
}

#[cfg(feature = "tokio")]
fn io_error(e: &io::Error) -> DoorbellError {
    DoorbellError::Os(e.raw_os_error().unwrap_or(libc::EIO))
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// A new eventfd, counter 0, close-on-exec and non-blocking.
fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: `eventfd` takes no pointers; it returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by `eventfd`, is open, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads an eventfd's counter, resetting it. True when it was non-zero (the bell rang);
/// false when it was zero (`EAGAIN`: nothing rang, or another reader took it).
fn read_counter(fd: BorrowedFd<'_>) -> Result<bool, DoorbellError> {
    let mut value = 0u64;
    loop {
        // SAFETY: `fd` is a borrowed open fd; the buffer is a live, writable u64 and the
        // length passed is exactly its size.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                (&raw mut value).cast::<libc::c_void>(),
                size_of::<u64>(),
            )
        };
        if n == size_of::<u64>() as isize {
            return Ok(true);
        }
        if n >= 0 {
            // An eventfd reads 8 bytes or fails; anything else is not an eventfd.
            return Err(DoorbellError::Os(libc::EINVAL));
        }
        match errno() {
            libc::EINTR => {}
            libc::EAGAIN => return Ok(false),
            e => return Err(DoorbellError::Os(e)),
        }
    }
}

/// Adds 1 to an eventfd's counter.
fn add_one(fd: BorrowedFd<'_>) -> Result<(), DoorbellError> {
    let one = 1u64;
    loop {
        // SAFETY: `fd` is a borrowed open fd; the buffer is a live u64 and the length passed
        // is exactly its size.
        let n = unsafe {
            libc::write(
                fd.as_raw_fd(),
                (&raw const one).cast::<libc::c_void>(),
                size_of::<u64>(),
            )
        };
        if n >= 0 {
            return Ok(());
        }
        match errno() {
            libc::EINTR => {}
            // The counter is saturated: the bell is rung already.
            libc::EAGAIN => return Ok(()),
            e => return Err(DoorbellError::Os(e)),
        }
    }
}

/// `poll(2)` until something is ready or `deadline` passes (`None`: no deadline), retrying
/// on `EINTR`. Returns how many entries have events (0: timed out).
fn poll_until(fds: &mut [libc::pollfd], deadline: Option<Instant>) -> Result<usize, DoorbellError> {
    loop {
        let timeout_ms: libc::c_int = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up, so a wait never ends before its timeout.
                let ms = left.as_nanos().div_ceil(1_000_000);
                ms.min(libc::c_int::MAX as u128) as libc::c_int
            }
        };
        // SAFETY: `fds` is a live, writable slice of `pollfd`s and the count passed is its
        // length (at most 2 here, so the cast cannot truncate).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(n as usize);
        }
        match errno() {
            libc::EINTR => {}
            e => return Err(DoorbellError::Os(e)),
        }
    }
}

fn pollfd(fd: BorrowedFd<'_>, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    }
}

impl EventFdDoorbell {
    /// Two connected ends in this process: each end's `signal` rings the other's bell.
    /// They have no hang-up fd; add one to each with [`with_hangup`](Self::with_hangup)
    /// (e.g. the two ends of a `UnixStream::pair()`).
    pub fn pair() -> io::Result<(Self, Self)> {
        let a_bell = eventfd()?;
        let b_bell = eventfd()?;
        let a = Self::from_fds(a_bell.try_clone()?, b_bell.try_clone()?);
        let b = Self::from_fds(b_bell, a_bell);
        Ok((a, b))
    }

    /// An end that waits on the eventfd `wait` and signals the eventfd `signal` (fds
    /// received from the peer, a VMM, a parent process). They should be non-blocking; a
    /// blocking `wait` fd could block a wait that another waiter raced to the ring.
    pub fn from_fds(wait: OwnedFd, signal: OwnedFd) -> Self {
        Self {
            wait,
            signal,
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
        let mut fds = [pollfd(h.as_fd(), libc::POLLRDHUP)];
        let hung_up = matches!(poll_until(&mut fds, Some(Instant::now())), Ok(1))
            && fds[0].revents & HANGUP_EVENTS != 0;
        if hung_up {
            self.closed.store(true, Ordering::Release);
        }
        hung_up
    }

    /// The peer is gone; a ring that raced the hang-up is reported first.
    fn hung_up(&self) -> Result<Wake, DoorbellError> {
        self.closed.store(true, Ordering::Release);
        if read_counter(self.wait.as_fd())? {
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
        add_one(self.signal.as_fd())
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<Wake, DoorbellError> {
        // A timeout too large to add to now is no timeout.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut fds = [
            pollfd(self.wait.as_fd(), libc::POLLIN),
            pollfd(self.wait.as_fd(), 0),
        ];
        let count = match &self.hangup {
            Some(h) => {
                fds[1] = pollfd(h.as_fd(), libc::POLLRDHUP);
                2
            }
            None => 1,
        };
        loop {
            for f in &mut fds {
                f.revents = 0;
            }
            if poll_until(&mut fds[..count], deadline)? == 0 {
                return Ok(Wake::TimedOut);
            }
            let bell = fds[0].revents;
            if bell & libc::POLLNVAL != 0 {
                return Err(DoorbellError::Os(libc::EBADF));
            }
            if bell & (libc::POLLIN | libc::POLLERR) != 0 {
                // Consume the ring. Finding the counter zero means another reader took it
                // first: a spurious wake-up, which callers tolerate.
                read_counter(self.wait.as_fd())?;
                return Ok(Wake::Signalled);
            }
            if count == 2 {
                let hangup = fds[1].revents;
                if hangup & libc::POLLNVAL != 0 {
                    return Err(DoorbellError::Os(libc::EBADF));
                }
                if hangup & HANGUP_EVENTS != 0 {
                    // The bell was looked at before the hang-up fd, so a peer that rang
                    // and then left may have rung after that look: `hung_up` reads again.
                    return self.hung_up();
                }
            }
        }
    }

    /// Adds 1 to our own eventfd, waking a thread of this side blocked in `wait`.
    fn wake_local(&self) -> Result<(), DoorbellError> {
        add_one(self.wait.as_fd())
    }

    fn peer_closed(&self) -> bool {
        self.check_hangup()
    }
}

#[cfg(feature = "tokio")]
pub use self::tokio_bell::TokioDoorbell;

#[cfg(feature = "tokio")]
mod tokio_bell {
    use core::task::{Context, Poll};
    use core::time::Duration;
    use std::io;
    use std::os::fd::{AsFd, OwnedFd};

    use tokio::io::Interest;
    use tokio::io::unix::AsyncFd;

    use super::{EventFdDoorbell, io_error, read_counter};
    use crate::doorbell::{AsyncDoorbell, Doorbell, DoorbellError, Wake};

    /// An end's fds on tokio's reactor: duplicates of the bell and hang-up fds, so each
    /// registration owns the fd it registered.
    #[derive(Debug)]
    pub(super) struct Registrations {
        bell: AsyncFd<OwnedFd>,
        hangup: Option<AsyncFd<OwnedFd>>,
    }

    fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
        // SAFETY: the `AsyncFd` owns `fd`: it stays open, and `as_raw_fd` keeps returning the
        // same descriptor, until the `AsyncFd` is dropped or `into_inner` gives it back.
        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
    }

    impl Registrations {
        /// Registers `inner`'s fds with the current runtime's reactor.
        fn new(inner: &EventFdDoorbell) -> io::Result<Self> {
            let bell = register(inner.wait.try_clone()?)?;
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
                    Poll::Ready(Ok(mut guard)) => match read_counter(self.bell.get_ref().as_fd()) {
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
                return Poll::Ready(Err(DoorbellError::Os(libc::ENOTSUP)));
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
