//! Locks and the wake-up hub shared by every waiter of a channel.
//!
//! Locks guard short critical sections only (ring operations); nobody sleeps while holding
//! one. With `std` they are `std::sync::Mutex` (poisoning ignored: ring state stays
//! consistent because every ring call is all-or-nothing); without it, spin locks.
//!
//! Every atomic, mutex and condition variable of the crate comes from here, so that under
//! `--cfg loom` they are loom's and `tests/loom.rs` model-checks the hub and the polling
//! spinner. loom has no clock: its `Condvar::wait_timeout` waits until notified, and the
//! in-process doorbell ignores its timeout, so in a model a timed wait never times out.

#[cfg(feature = "alloc")]
use alloc::vec::Vec;
pub(crate) use core::sync::atomic::Ordering;
#[cfg(feature = "alloc")]
use core::task::{Context, Poll, Waker};
#[cfg(feature = "std")]
use core::time::Duration;

// The primitives: core's and std's, or loom's.
#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64};
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64};

#[cfg(all(feature = "alloc", not(loom)))]
pub(crate) use core::sync::atomic::AtomicUsize;
#[cfg(all(feature = "alloc", loom))]
pub(crate) use loom::sync::atomic::AtomicUsize;

#[cfg(all(feature = "std", loom))]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};
#[cfg(all(feature = "std", not(loom)))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

#[cfg(feature = "alloc")]
use crate::doorbell::AsyncDoorbell;
#[cfg(feature = "alloc")]
use crate::doorbell::DoorbellError;
#[cfg(feature = "std")]
use crate::doorbell::{Doorbell, Wake};

/// Stands between a `SeqCst` store and a `SeqCst` load of another atomic where the hub
/// relies on their single total order (a waiter raises the count then reads the
/// generation; an announcer bumps the generation then reads the count). A normal build
/// needs nothing here and gets nothing. loom treats `SeqCst` accesses as `AcqRel` (so it
/// would report lost wake-ups that cannot happen) but models `fence(SeqCst)` fully, so under
/// loom a fence stands in for that order.
#[inline(always)]
fn seq_cst_order() {
    #[cfg(loom)]
    loom::sync::atomic::fence(Ordering::SeqCst);
}

/// A mutual-exclusion lock.
#[derive(Debug, Default)]
pub(crate) struct Lock<T>(
    #[cfg(feature = "std")] Mutex<T>,
    #[cfg(not(feature = "std"))] spin::Mutex<T>,
);

/// A held lock.
#[cfg(feature = "std")]
pub(crate) type Guard<'a, T> = MutexGuard<'a, T>;
/// A held lock.
#[cfg(not(feature = "std"))]
pub(crate) type Guard<'a, T> = spin::MutexGuard<'a, T>;

impl<T> Lock<T> {
    pub(crate) fn new(value: T) -> Self {
        #[cfg(feature = "std")]
        return Self(Mutex::new(value));
        #[cfg(not(feature = "std"))]
        return Self(spin::Mutex::new(value));
    }

    pub(crate) fn lock(&self) -> Guard<'_, T> {
        #[cfg(feature = "std")]
        return self.0.lock().unwrap_or_else(|e| e.into_inner());
        #[cfg(not(feature = "std"))]
        return self.0.lock();
    }

    pub(crate) fn try_lock(&self) -> Option<Guard<'_, T>> {
        #[cfg(feature = "std")]
        return match self.0.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        #[cfg(not(feature = "std"))]
        return self.0.try_lock();
    }

    /// The value, for the lock's only owner.
    #[cfg(feature = "alloc")]
    pub(crate) fn get_mut(&mut self) -> &mut T {
        #[cfg(feature = "std")]
        return self.0.get_mut().unwrap_or_else(|e| e.into_inner());
        #[cfg(not(feature = "std"))]
        return self.0.get_mut();
    }

    /// The value, for the lock's only owner.
    #[cfg(feature = "alloc")]
    pub(crate) fn into_inner(self) -> T {
        #[cfg(feature = "std")]
        return self.0.into_inner().unwrap_or_else(|e| e.into_inner());
        #[cfg(not(feature = "std"))]
        return self.0.into_inner();
    }
}

#[derive(Debug, Default)]
struct HubState {
    /// A thread is blocked in `Doorbell::wait`; others wait on the condition variable.
    #[cfg(feature = "alloc")]
    sleeper: bool,
    /// Threads waiting on the condition variable (a notification with none is skipped: it
    /// would still cost a system call).
    #[cfg(feature = "std")]
    cv_waiters: u32,
    /// Tasks waiting for the next event.
    #[cfg(feature = "alloc")]
    wakers: Vec<Waker>,
}

impl HubState {
    /// How many parties an event must wake: the doorbell sleeper, condition-variable
    /// waiters, registered tasks.
    #[cfg(feature = "alloc")]
    fn waiting(&self) -> u32 {
        #[allow(unused_mut)]
        let mut n = u32::from(self.sleeper)
            .saturating_add(self.wakers.len().try_into().unwrap_or(u32::MAX));
        #[cfg(feature = "std")]
        {
            n = n.saturating_add(self.cv_waiters);
        }
        n
    }
}

/// Where every waiter of a channel waits, so that one doorbell serves them all: at most one
/// thread blocks in the doorbell at a time, and whatever wakes it is broadcast.
///
/// A waiter reads the generation, then arms its condition in the ring (unmask interrupts,
/// set the pending send size) and re-checks it, then waits for the generation to move. An
/// event between the read and the wait is never lost: either it bumped the generation
/// already, or its doorbell ring is still pending for whoever sleeps next.
///
/// The generation is an atomic, so reading it and announcing an event nobody waits for
/// take no lock: an announcer bumps the generation and then looks at `waiting`; a waiter
/// raises `waiting` (under the lock) and then looks at the generation again. Both in
/// sequentially consistent order, so at least one of them sees the other.
#[derive(Debug, Default)]
pub(crate) struct Hub {
    generation: AtomicU64,
    waiting: AtomicU32,
    state: Lock<HubState>,
    #[cfg(feature = "std")]
    cv: Condvar,
}

impl Hub {
    /// The current generation; a waiter passes it to `wait` / `poll_wait`.
    #[cfg(feature = "alloc")]
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Publishes how many wait, after a change under the lock.
    #[cfg(feature = "alloc")]
    fn recount(&self, st: &HubState) {
        self.waiting.store(st.waiting(), Ordering::SeqCst);
    }

    /// Wakes everyone waiting on the condition variable or as a task (the lock held; the
    /// generation already bumped).
    fn wake_all(&self, st: &mut HubState) {
        #[cfg(not(feature = "alloc"))]
        let _ = st;
        #[cfg(feature = "std")]
        if st.cv_waiters > 0 {
            self.cv.notify_all();
        }
        #[cfg(feature = "alloc")]
        if !st.wakers.is_empty() {
            for w in st.wakers.drain(..) {
                w.wake();
            }
            self.recount(st);
        }
    }

    /// A new event for every waiter (the lock held).
    #[cfg(feature = "alloc")]
    fn bump(&self, st: &mut HubState) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.wake_all(st);
    }

    /// Moves the generation without waking anyone, and says whether anyone waits (then
    /// the caller must also [`notify`](Self::notify) them). The order is the point: the
    /// generation first, then the count; a waiter raises the count first, then reads the
    /// generation. A waiter not counted yet therefore sees the new generation and looks
    /// again.
    #[cfg(feature = "std")]
    pub(crate) fn announce(&self) -> bool {
        self.generation.fetch_add(1, Ordering::SeqCst);
        seq_cst_order();
        self.waiting.load(Ordering::SeqCst) != 0
    }

    /// Announces an event that did not come through the doorbell, waking a thread blocked
    /// in the doorbell too (it may be waiting for exactly this: a completion another
    /// thread took off the ring while interrupts were masked). With nobody waiting this is
    /// one atomic add.
    pub(crate) fn notify<D: crate::doorbell::Doorbell + ?Sized>(&self, doorbell: &D) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        seq_cst_order();
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut st = self.state.lock();
        self.wake_all(&mut st);
        #[cfg(feature = "alloc")]
        if st.sleeper {
            // A failure here leaves the sleeper to its own timeout or the next real ring;
            // there is nobody to report it to.
            let _ = doorbell.wake_local();
        }
        #[cfg(not(feature = "alloc"))]
        let _ = doorbell;
    }

    /// Blocks until the generation moves past `seen` or `timeout` passes, watching the
    /// doorbell if no other thread does. Returns whether the doorbell rang for us.
    #[cfg(feature = "std")]
    pub(crate) fn wait<D: Doorbell + ?Sized>(
        &self,
        doorbell: &D,
        seen: u64,
        timeout: Option<Duration>,
    ) -> Result<bool, crate::doorbell::DoorbellError> {
        let mut st = self.state.lock();
        if self.generation() != seen {
            return Ok(false);
        }
        if !st.sleeper {
            st.sleeper = true;
            self.recount(&st);
            seq_cst_order();
            // An event announced before `waiting` rose was not seen as needing a wake:
            // look once more.
            if self.generation() != seen {
                st.sleeper = false;
                self.recount(&st);
                return Ok(false);
            }
            drop(st);
            let woke = doorbell.wait(timeout);
            let mut st = self.state.lock();
            st.sleeper = false;
            self.recount(&st);
            // Whatever happened, let every waiter look (and one of them take over the
            // doorbell).
            self.bump(&mut st);
            return woke.map(|w| w == Wake::Signalled);
        }
        st.cv_waiters += 1;
        self.recount(&st);
        seq_cst_order();
        if self.generation() != seen {
            st.cv_waiters -= 1;
            self.recount(&st);
            return Ok(false);
        }
        let mut st = match timeout {
            None => self.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
            Some(t) => {
                self.cv
                    .wait_timeout(st, t)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
        };
        st.cv_waiters -= 1;
        self.recount(&st);
        Ok(false)
    }

    /// The async form of [`wait`](Self::wait): `Ready` once the generation moved past
    /// `seen` (possibly because this poll found the doorbell rung), else `Pending` with the
    /// task registered both here and with the doorbell.
    #[cfg(feature = "alloc")]
    pub(crate) fn poll_wait<D: AsyncDoorbell + ?Sized>(
        &self,
        doorbell: &D,
        seen: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Result<bool, DoorbellError>> {
        let mut st = self.state.lock();
        if self.generation() != seen {
            return Poll::Ready(Ok(false));
        }
        if !st.sleeper {
            match doorbell.poll_wait(cx) {
                Poll::Ready(r) => {
                    self.bump(&mut st);
                    return Poll::Ready(r.map(|()| true));
                }
                Poll::Pending => {}
            }
        }
        if !st.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            st.wakers.push(cx.waker().clone());
            self.recount(&st);
        }
        seq_cst_order();
        // As in `wait`: an event announced before we were counted is seen now.
        if self.generation() != seen {
            return Poll::Ready(Ok(false));
        }
        Poll::Pending
    }

    /// A pending future went away: wake the others so one of them registers with the
    /// doorbell again (the doorbell keeps only the last registered waker).
    #[cfg(feature = "alloc")]
    pub(crate) fn forget(&self) {
        let mut st = self.state.lock();
        for w in st.wakers.drain(..) {
            w.wake();
        }
        self.recount(&st);
    }
}

/// The real [`Hub`] behind a public face, under `--cfg loom` only, for the model checks in
/// `tests/loom.rs` (the hub itself stays crate-private).
#[cfg(all(loom, feature = "std"))]
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct LoomHub(Hub);

#[cfg(all(loom, feature = "std"))]
impl LoomHub {
    /// `Hub::generation`.
    pub fn generation(&self) -> u64 {
        self.0.generation()
    }

    /// `Hub::announce`.
    pub fn announce(&self) -> bool {
        self.0.announce()
    }

    /// `Hub::notify`.
    pub fn notify<D: Doorbell + ?Sized>(&self, doorbell: &D) {
        self.0.notify(doorbell)
    }

    /// `Hub::wait`.
    pub fn wait<D: Doorbell + ?Sized>(
        &self,
        doorbell: &D,
        seen: u64,
        timeout: Option<Duration>,
    ) -> Result<bool, crate::doorbell::DoorbellError> {
        self.0.wait(doorbell, seen, timeout)
    }
}
