//! Saving an endpoint for a successor (servicing) and restoring it.
//!
//! What is saved is what the endpoint holds in private memory: the transaction table, the
//! packets queued for receivers, the counters and the failure state. The links' positions
//! live in the memory they share with the peer (a ring's indices) and are not copied:
//! saving commits what the receiving half consumed and discards what the sending half
//! pushed but did not commit, so nothing is half-kept, and a successor's link reads the
//! positions back from the shared memory.

use alloc::vec::Vec;

use super::*;
use crate::txn::SavedSlot;

#[cfg(feature = "saved-state")]
mod format;
#[cfg(feature = "saved-state")]
pub use format::{SAVED_STATE_MAGIC, SAVED_STATE_VERSION, SavedStateError};

/// An endpoint's saved state: see [`Endpoint::save`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedEndpoint {
    transactions: [(u32, SavedSlot); MAX_TRANSACTIONS],
    queued: Vec<(Received, Vec<u8>)>,
    counters: Counters,
    failure: Option<FailureCause>,
    peer_closed: bool,
    config: Config,
}

impl SavedEndpoint {
    /// Each transaction slot: its generation (the high half of the ids it hands out) and
    /// what is in flight there.
    pub fn transactions(&self) -> &[(u32, SavedSlot); MAX_TRANSACTIONS] {
        &self.transactions
    }

    /// The packets queued for receivers, oldest first: description and bytes (extra
    /// header, then payload).
    pub fn queued(&self) -> &[(Received, Vec<u8>)] {
        &self.queued
    }

    /// The counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Why the endpoint failed, if it had.
    pub fn failure(&self) -> Option<FailureCause> {
        self.failure
    }

    /// The peer had left.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// The configuration the endpoint ran with (a successor may restore with it, or with
    /// its own).
    pub fn config(&self) -> Config {
        self.config
    }
}

/// The endpoint's core, no longer shared: a [`Watch`] holds it only while it takes a
/// sample (a few atomic loads), so this waits at most that long.
fn unshare<D>(mut core: alloc::sync::Arc<Core<D>>) -> Core<D> {
    loop {
        match alloc::sync::Arc::try_unwrap(core) {
            Ok(core) => return core,
            Err(shared) => {
                core = shared;
                #[cfg(feature = "std")]
                std::thread::yield_now();
                #[cfg(not(feature = "std"))]
                core::hint::spin_loop();
            }
        }
    }
}

impl<T: PacketTx, R: PacketRx, D: Doorbell> Endpoint<T, R, D> {
    /// Quiesces the endpoint and saves its state for a successor, handing back the links
    /// and the doorbell (a successor in this process takes them; one in another process
    /// maps the same memory and gets the doorbell's fds).
    ///
    /// Consumed packets are committed (the peer is signalled if it waits for the space),
    /// packets pushed but not committed are discarded. Polled transactions stay in flight;
    /// a call waiting in this process cannot follow, so its id stays reserved and its
    /// completion will be discarded as late.
    ///
    /// ```
    /// use vmlink_channel::{Config, Endpoint, Wait, in_process_channel_pair};
    ///
    /// let (a, b) = in_process_channel_pair(4096, Config::default())?;
    /// let tid = a.start_request(b"status?", Wait::Now)?;
    /// let (saved, tx, rx, doorbell) = a.save();
    /// // ... a successor takes over ...
    /// let a = Endpoint::restore(tx, rx, doorbell, Config::default(), &saved)?;
    /// let mut buf = [0u8; 64];
    /// let request = b.recv(&mut buf, Wait::Now)?;
    /// b.complete(request.transaction_id, b"fine", Wait::Now)?;
    /// assert_eq!(a.recv(&mut buf, Wait::Now)?.transaction_id, tid);
    /// # Ok::<(), vmlink_channel::ChannelError>(())
    /// ```
    pub fn save(mut self) -> (SavedEndpoint, T, R, D) {
        let saved = self.snapshot();
        let Endpoint { core, tx, rx } = self;
        let Core { doorbell, .. } = unshare(core);
        (saved, tx.into_inner(), rx.into_inner().link, doorbell)
    }

    /// Quiesces the endpoint as [`save`](Self::save) does and returns its state, keeping
    /// the endpoint: a process handing it to a successor in another process goes on
    /// serving it if the successor does not confirm, and drops it if it does. Nothing may
    /// use the endpoint between the two (`&mut self` sees to that here; the caller must
    /// not use it again before the successor's verdict).
    pub fn snapshot(&mut self) -> SavedEndpoint {
        self.tx.get_mut().rollback();
        let rx = self.rx.get_mut();
        let signal = rx.link.commit();
        // A peer that left needs no signal; any other doorbell error fails the endpoint,
        // which the state then says.
        let _ = self.core.signal(signal);
        let rx = self.rx.get_mut();
        SavedEndpoint {
            transactions: self.core.live.txns.save(),
            queued: rx.queue.iter().map(|(m, b)| (m, b.to_vec())).collect(),
            counters: self.core.counters(),
            failure: match self.core.state() {
                ChannelState::Failed(c) => Some(c),
                _ => None,
            },
            peer_closed: self.core.state() == ChannelState::PeerClosed,
            config: self.core.config,
        }
    }

    /// An endpoint over `tx` and `rx` that goes on from `saved`: its transactions, queued
    /// packets, counters and state. The peer is signalled once if the links say it may be
    /// asleep on something it was never signalled for ([`PacketTx::peer_owed_signal`],
    /// [`PacketRx::peer_owed_signal`]: over rings, unread data with its interrupts
    /// unmasked, or the space it asked for), so a wake-up lost while nobody served the
    /// endpoint cannot leave it asleep.
    ///
    /// [`ChannelError::BadSavedState`] when `saved` does not fit this endpoint (more queued
    /// packets, or bytes, than `config` lets it queue; a packet whose bytes do not match
    /// its description).
    pub fn restore(
        tx: T,
        rx: R,
        doorbell: D,
        config: Config,
        saved: &SavedEndpoint,
    ) -> Result<Self, ChannelError> {
        let mut live = Live::new();
        live.txns = Transactions::restore(&saved.transactions);
        live.counters = AtomicCounters::from_snapshot(&saved.counters);
        if let Some(cause) = saved.failure {
            live.cause = Lock::new(Some(cause));
            live.state = AtomicU8::new(FAILED);
        } else if saved.peer_closed {
            live.state = AtomicU8::new(PEER_CLOSED);
        }
        let mut ep = Self {
            rx: Lock::new(RxState::new(rx, &config)),
            tx: Lock::new(tx),
            core: boxed(Core::with_live(doorbell, config, live)),
        };
        {
            let rx = ep.rx.get_mut();
            for (meta, bytes) in &saved.queued {
                if bytes.len() != meta.len() {
                    return Err(ChannelError::BadSavedState {
                        reason: "a queued packet's bytes do not match its description",
                    });
                }
                let fits = rx.queue.push(*meta, |slot| {
                    slot.copy_from_slice(bytes);
                    Ok::<(), ChannelError>(())
                })?;
                if !fits {
                    return Err(ChannelError::BadSavedState {
                        reason: "more queued packets than this endpoint's queue holds",
                    });
                }
            }
        }
        // The unstick: the peer is signalled when the links say it may sleep on something
        // it was never signalled for while nobody served this side: data it has not read
        // with its interrupts unmasked, or the space it asked for. This side is owed
        // nothing: a restored endpoint has no waiter yet, and every wait looks at its link
        // before it sleeps. A doorbell that fails fails the endpoint (its state says so);
        // a peer that left needs no signal.
        let owed = ep.tx.get_mut().peer_owed_signal() || ep.rx.get_mut().link.peer_owed_signal();
        if owed {
            let _ = ep.core.signal(Signal::NEEDED);
        }
        Ok(ep)
    }
}
