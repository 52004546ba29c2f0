//! Doorbells: how one side wakes the other.
//!
//! A doorbell has two ends of behaviour: [`Doorbell::signal`] rings the peer's bell, and
//! [`Doorbell::wait`] sleeps until our own bell rings. A ring is sticky, like an eventfd
//! counter: one that happens before the wait makes the wait return at once. Transports
//! plug in what they have: eventfds, ioeventfd / irqfd, an MMIO write, a futex.

use core::task::{Context, Poll};
use core::time::Duration;

/// A doorbell operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DoorbellError {
    /// The peer is gone (its end was closed, its process died).
    #[error("the peer is gone")]
    PeerClosed,
    /// The operating system refused (an `errno`).
    #[error("doorbell I/O failed (os error {0})")]
    Os(i32),
}

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Our bell rang (or the wait woke spuriously: callers re-check their condition).
    Signalled,
    /// The timeout passed first.
    TimedOut,
}

/// Signals the peer and waits to be signalled.
pub trait Doorbell {
    /// Rings the peer's bell.
    fn signal(&self) -> Result<(), DoorbellError>;

    /// Sleeps until our bell rings, `timeout` passes, or the peer is gone. A ring since the
    /// last wait returns at once (and is consumed). May return `Signalled` spuriously.
    /// Rings are reported before [`DoorbellError::PeerClosed`], so a peer that rang and then
    /// left is still seen to have rung.
    fn wait(&self, timeout: Option<Duration>) -> Result<Wake, DoorbellError>;

    /// Wakes a thread of this side blocked in [`wait`](Self::wait), as if the peer had
    /// rung (a ring that finds nobody waiting makes the next wait return at once). The
    /// channel uses it when one of its threads makes progress a sleeping thread waits for,
    /// e.g. a polling receiver that took a completion meant for a sleeping caller.
    fn wake_local(&self) -> Result<(), DoorbellError>;

    /// True once the peer is known to be gone. Never blocks.
    fn peer_closed(&self) -> bool {
        false
    }
}

/// A doorbell a future can wait on.
pub trait AsyncDoorbell: Doorbell {
    /// Polls our bell: `Ready(Ok(()))` when it rang since the last wait (consuming the
    /// ring), `Ready(Err(PeerClosed))` when the peer is gone, otherwise registers the
    /// context's waker (replacing any earlier one) and returns `Pending`.
    fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<Result<(), DoorbellError>>;
}

impl<T: Doorbell + ?Sized> Doorbell for &T {
    fn signal(&self) -> Result<(), DoorbellError> {
        (**self).signal()
    }
    fn wait(&self, timeout: Option<Duration>) -> Result<Wake, DoorbellError> {
        (**self).wait(timeout)
    }
    fn wake_local(&self) -> Result<(), DoorbellError> {
        (**self).wake_local()
    }
    fn peer_closed(&self) -> bool {
        (**self).peer_closed()
    }
}

impl<T: AsyncDoorbell + ?Sized> AsyncDoorbell for &T {
    fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<Result<(), DoorbellError>> {
        (**self).poll_wait(cx)
    }
}

#[cfg(feature = "std")]
pub use inproc::{InProcessDoorbell, in_process_pair};

#[cfg(feature = "std")]
mod inproc {
    use super::{AsyncDoorbell, Doorbell, DoorbellError, Wake};
    use crate::sync::{AtomicBool, Condvar, Mutex, MutexGuard, Ordering};
    use core::task::{Context, Poll, Waker};
    use core::time::Duration;
    use std::sync::Arc;
    use std::time::Instant;

    #[derive(Debug, Default)]
    struct BellState {
        rung: bool,
        waker: Option<Waker>,
    }

    #[derive(Debug, Default)]
    struct Bell {
        state: Mutex<BellState>,
        cv: Condvar,
    }

    impl Bell {
        fn lock(&self) -> MutexGuard<'_, BellState> {
            self.state.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// Wakes whoever waits on this bell; `ring` also sets the sticky flag.
        fn wake(&self, ring: bool) {
            let waker = {
                let mut st = self.lock();
                st.rung |= ring;
                st.waker.take()
            };
            self.cv.notify_all();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    #[derive(Debug, Default)]
    struct Shared {
        bells: [Bell; 2],
        closed: [AtomicBool; 2],
    }

    /// One end of a doorbell between two threads of a process.
    ///
    /// Made in pairs by [`in_process_pair`]. Dropping an end tells the other that its peer
    /// is gone, waking it if it waits.
    #[derive(Debug)]
    pub struct InProcessDoorbell {
        shared: Arc<Shared>,
        side: usize,
    }

    /// Two connected doorbell ends: each end's `signal` rings the other's bell.
    pub fn in_process_pair() -> (InProcessDoorbell, InProcessDoorbell) {
        let shared = Arc::new(Shared::default());
        (
            InProcessDoorbell {
                shared: shared.clone(),
                side: 0,
            },
            InProcessDoorbell { shared, side: 1 },
        )
    }

    impl InProcessDoorbell {
        fn mine(&self) -> &Bell {
            &self.shared.bells[self.side]
        }
        fn peer(&self) -> &Bell {
            &self.shared.bells[1 - self.side]
        }
    }

    impl Doorbell for InProcessDoorbell {
        fn signal(&self) -> Result<(), DoorbellError> {
            if self.peer_closed() {
                return Err(DoorbellError::PeerClosed);
            }
            self.peer().wake(true);
            Ok(())
        }

        fn wait(&self, timeout: Option<Duration>) -> Result<Wake, DoorbellError> {
            let bell = self.mine();
            // loom has no clock: in a model a timed wait never times out.
            #[cfg(loom)]
            let timeout: Option<Duration> = timeout.and(None);
            let deadline = timeout.map(|t| Instant::now() + t);
            let mut st = bell.lock();
            loop {
                if st.rung {
                    st.rung = false;
                    return Ok(Wake::Signalled);
                }
                if self.peer_closed() {
                    return Err(DoorbellError::PeerClosed);
                }
                match deadline {
                    None => st = bell.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                    Some(d) => {
                        let now = Instant::now();
                        if now >= d {
                            return Ok(Wake::TimedOut);
                        }
                        st = bell
                            .cv
                            .wait_timeout(st, d - now)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                }
            }
        }

        fn wake_local(&self) -> Result<(), DoorbellError> {
            self.mine().wake(true);
            Ok(())
        }

        fn peer_closed(&self) -> bool {
            self.shared.closed[1 - self.side].load(Ordering::SeqCst)
        }
    }

    impl AsyncDoorbell for InProcessDoorbell {
        fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<Result<(), DoorbellError>> {
            let mut st = self.mine().lock();
            if st.rung {
                st.rung = false;
                return Poll::Ready(Ok(()));
            }
            if self.peer_closed() {
                return Poll::Ready(Err(DoorbellError::PeerClosed));
            }
            match &mut st.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
            Poll::Pending
        }
    }

    impl Drop for InProcessDoorbell {
        fn drop(&mut self) {
            self.shared.closed[self.side].store(true, Ordering::SeqCst);
            // Wake the peer without ringing: it sees the closure when it looks.
            self.peer().wake(false);
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::thread;

        #[test]
        fn rings_are_sticky_and_consumed() {
            let (a, b) = in_process_pair();
            a.signal().unwrap();
            assert_eq!(b.wait(Some(Duration::ZERO)).unwrap(), Wake::Signalled);
            assert_eq!(
                b.wait(Some(Duration::from_millis(1))).unwrap(),
                Wake::TimedOut
            );
            assert_eq!(
                a.wait(Some(Duration::ZERO)).unwrap(),
                Wake::TimedOut,
                "rings go one way"
            );
        }

        #[test]
        fn wakes_a_blocked_waiter_and_reports_closure() {
            let (a, b) = in_process_pair();
            let t = thread::spawn(move || {
                let first = b.wait(None);
                let second = b.wait(None);
                (first, second)
            });
            thread::sleep(Duration::from_millis(20));
            a.signal().unwrap();
            thread::sleep(Duration::from_millis(20));
            drop(a);
            let (first, second) = t.join().unwrap();
            assert_eq!(first, Ok(Wake::Signalled));
            assert_eq!(second, Err(DoorbellError::PeerClosed));
        }

        #[test]
        fn a_ring_before_closing_is_still_seen() {
            let (a, b) = in_process_pair();
            a.signal().unwrap();
            drop(a);
            assert!(b.peer_closed());
            assert_eq!(b.wait(None), Ok(Wake::Signalled));
            assert_eq!(b.wait(None), Err(DoorbellError::PeerClosed));
            assert_eq!(b.signal(), Err(DoorbellError::PeerClosed));
        }
    }
}
