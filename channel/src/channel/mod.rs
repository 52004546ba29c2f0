//! The endpoint: a packet link's two halves, a doorbell, and everything written once over
//! them (transactions, the queue, failure states, counters, waiting).

#[cfg(feature = "alloc")]
use alloc::vec::Vec;
// The counters' own: statistics that order nothing, so plain atomics even under loom.
use core::sync::atomic::{AtomicU32, AtomicU64};
use core::time::Duration;
#[cfg(feature = "std")]
use std::time::Instant;

use vmlink_ring::protocol::{FLAG_COMPLETION_REQUESTED, PacketType};
use vmlink_ring::{OutgoingPacket, PacketMeta, RingMem, Signal, WaitDecision, WriteSlot};

use crate::doorbell::{Doorbell, DoorbellError};
use crate::error::{ChannelError, FailureCause, ProtocolError};
use crate::link::{PacketRx, PacketTx, Received, RingRx, RingTx};
use crate::packet::{GpaRange, parse_gpa_header, parse_transfer_page_header};
#[cfg(feature = "alloc")]
use crate::queue::PacketQueue;
#[cfg(feature = "alloc")]
use crate::sync::AtomicUsize;
use crate::sync::{AtomicBool, AtomicU8, Ordering};
use crate::sync::{Guard, Hub, Lock};
#[cfg(feature = "alloc")]
use crate::txn::slot_index;
use crate::txn::{MAX_TRANSACTIONS, Mode, Route, Transactions};

/// How long an operation may wait: the one waiting shape every operation takes.
///
/// `Now` never sleeps: what cannot happen at once is [`ChannelError::Full`] for a send,
/// [`ChannelError::Empty`] for a receive. `Until` waits up to a deadline, then says
/// [`ChannelError::TimedOut`]; `Forever` waits as long as it takes. Every operation also
/// has an `_async` twin that waits on the executor instead (deadlines come from the
/// executor's timers).
///
/// `Option<Instant>` converts (`None` is `Forever`), as does an `Instant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Do not wait.
    Now,
    /// Wait until the deadline.
    #[cfg(feature = "std")]
    Until(Instant),
    /// Wait as long as it takes.
    #[cfg(feature = "std")]
    Forever,
}

#[cfg(feature = "std")]
impl From<Option<Instant>> for Wait {
    fn from(deadline: Option<Instant>) -> Self {
        deadline.map_or(Wait::Forever, Wait::Until)
    }
}

#[cfg(feature = "std")]
impl From<Instant> for Wait {
    fn from(deadline: Instant) -> Self {
        Wait::Until(deadline)
    }
}

impl Wait {
    /// The deadline of a wait that may sleep (`None`: no deadline); `Err(())` for `Now`.
    #[cfg(feature = "std")]
    fn deadline(self) -> Result<Option<Instant>, ()> {
        match self {
            Wait::Now => Err(()),
            Wait::Until(d) => Ok(Some(d)),
            Wait::Forever => Ok(None),
        }
    }
}

mod call;
mod config;
mod handles;
mod recv;
#[cfg(feature = "alloc")]
mod saved;
mod send;
#[cfg(feature = "std")]
mod wait;
#[cfg(feature = "alloc")]
mod watch;

#[cfg(feature = "alloc")]
pub(crate) use call::CallStep;
use config::{AtomicCounters, bump, bump_held, initial_wake_cost, probe_due, progressed};
pub use config::{ChannelState, Config, Counters, DEFAULT_SPIN_BEFORE_SLEEP};

#[cfg(feature = "alloc")]
pub use handles::{Receiver, Sender};
pub use recv::Packet;
#[cfg(feature = "alloc")]
pub use saved::SavedEndpoint;
#[cfg(feature = "saved-state")]
pub use saved::{SAVED_STATE_MAGIC, SAVED_STATE_VERSION, SavedStateError};
pub use send::SendBatch;
pub(crate) use send::completion;
pub(crate) use send::{gpa_request_meta, request_packet};
#[cfg(feature = "alloc")]
pub use watch::{Sample, Watch};

const OPEN: u8 = 0;
const PEER_CLOSED: u8 = 1;
const FAILED: u8 = 2;

/// How a receive that finds the ring empty learns whether the peer has left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// Ask the doorbell (maybe a system call): receives that do not wait, which must say `Closed`
    /// themselves.
    Doorbell,
    /// The channel's state only: waiting loops, whose wait asks the doorbell.
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    State,
}

pub(crate) struct RxState<R> {
    link: R,
    /// Packets copied out of the ring while callers waited for completions.
    #[cfg(feature = "alloc")]
    queue: PacketQueue,
    /// Completions stored for waiting callers, by transaction slot: the payload, when it
    /// fitted the caller's buffer (never more than that buffer's length).
    #[cfg(feature = "alloc")]
    stored: Vec<Vec<u8>>,
    /// The length of each slot's completion, stored or not.
    #[cfg(feature = "alloc")]
    stored_len: [usize; MAX_TRANSACTIONS],
    /// A polling spinner masked the incoming ring's interrupts and left them masked
    /// (nobody was waiting for a signal); arming for sleep unmasks and clears this.
    spin_masked: bool,
}

/// What an endpoint shares between its halves: the doorbell, the state, the transaction
/// table, the wake-up hub, the counters and the configuration. Everything written once
/// over the link that needs neither half lives here.
pub(crate) struct Core<D> {
    doorbell: D,
    /// What a [`Watch`] reads.
    live: Live,
    /// For each transaction slot a caller waits on: the length of its response buffer,
    /// the most the receive path stores of its completion.
    #[cfg(feature = "alloc")]
    call_capacity: [AtomicUsize; MAX_TRANSACTIONS],
    hub: Hub,
    /// Someone arms the reader through the public `prepare_recv_wait` and waits on the
    /// doorbell outside the hub: polling spinners must then always unmask on their way
    /// out, as the hub cannot tell whether that waiter still sleeps.
    external_waits: AtomicBool,
    /// The measured cost of a wake-up in nanoseconds, which an adaptive spin before
    /// sleeping lasts (see [`Config::spin_before_sleep`]).
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    wake_cost_ns: AtomicU64,
    /// How long a receive wait has lasted lately, in nanoseconds: a moving average of
    /// each wait's length from its spin's start to what ended it (see
    /// [`Config::spin_before_sleep`]).
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    wait_ns: AtomicU64,
    /// Every how many looks a spinning wait yields its CPU, 0 for never (see
    /// [`Endpoint::set_spin_yield`]).
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    spin_yield: AtomicU32,
    config: Config,
}

/// The part of the core a monitor may read while the endpoint runs: its state, failure
/// cause, counters and transaction table, all atomics (and the cause's lock, taken only
/// once the channel has failed).
pub(crate) struct Live {
    state: AtomicU8,
    cause: Lock<Option<FailureCause>>,
    counters: AtomicCounters,
    txns: Transactions,
}

impl Live {
    fn new() -> Self {
        Self {
            state: AtomicU8::new(OPEN),
            cause: Lock::new(None),
            counters: AtomicCounters::default(),
            txns: Transactions::new(),
        }
    }

    /// Where the channel is in its life.
    fn state(&self) -> ChannelState {
        match self.state.load(Ordering::Acquire) {
            OPEN => ChannelState::Open,
            PEER_CLOSED => ChannelState::PeerClosed,
            _ => match *self.cause.lock() {
                Some(c) => ChannelState::Failed(c),
                None => ChannelState::Open,
            },
        }
    }
}

/// Where an [`Endpoint`] keeps its core: behind an `Arc` under `alloc`, which the halves
/// of [`Endpoint::split`] share and a [`Watch`] holds weakly; in place without an
/// allocator (nobody can watch there). Operations borrow the core once and reach every
/// field from that borrow.
#[cfg(feature = "alloc")]
type CoreBox<D> = alloc::sync::Arc<Core<D>>;
#[cfg(not(feature = "alloc"))]
type CoreBox<D> = Core<D>;

/// Puts a core where an [`Endpoint`] keeps it.
fn boxed<D>(core: Core<D>) -> CoreBox<D> {
    #[cfg(feature = "alloc")]
    return alloc::sync::Arc::new(core);
    #[cfg(not(feature = "alloc"))]
    core
}

/// Where a half lives: behind a lock in a shared [`Endpoint`], in a `RefCell` in a
/// [`Sender`] or [`Receiver`] that one thread owns (no lock, no atomic instruction).
pub(crate) trait Half {
    type Item;
    type Guard<'a>: core::ops::DerefMut<Target = Self::Item>
    where
        Self: 'a;
    fn lock(&self) -> Self::Guard<'_>;
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    fn try_lock(&self) -> Option<Self::Guard<'_>>;
}

impl<X> Half for Lock<X> {
    type Item = X;
    type Guard<'a>
        = Guard<'a, X>
    where
        X: 'a;
    fn lock(&self) -> Guard<'_, X> {
        Lock::lock(self)
    }
    fn try_lock(&self) -> Option<Guard<'_, X>> {
        Lock::try_lock(self)
    }
}

impl<X> Half for core::cell::RefCell<X> {
    type Item = X;
    type Guard<'a>
        = core::cell::RefMut<'a, X>
    where
        X: 'a;
    fn lock(&self) -> core::cell::RefMut<'_, X> {
        self.borrow_mut()
    }
    fn try_lock(&self) -> Option<core::cell::RefMut<'_, X>> {
        self.try_borrow_mut().ok()
    }
}

/// The half a [`Sender`] or [`Receiver`] does not have.
#[cfg(feature = "alloc")]
pub(crate) struct NoHalf;

/// The operations, written once over the core and whichever halves a handle has: an
/// [`Endpoint`] has both behind locks, a [`Sender`] only the sending one, a [`Receiver`]
/// only the receiving one.
pub(crate) struct Ops<'a, D, TC, RC> {
    core: &'a Core<D>,
    tx: &'a TC,
    rx: &'a RC,
}

impl<D, TC, RC> core::ops::Deref for Ops<'_, D, TC, RC> {
    type Target = Core<D>;
    fn deref(&self) -> &Core<D> {
        self.core
    }
}

/// One side of a packet link with everything written once above it: transactions
/// ([`call`](Self::call)), the queue of packets kept while calls wait, failure states,
/// counters, and waiting on a doorbell that wakes the peer only when it needs waking.
///
/// Every method takes `&self`: an endpoint can be shared by threads (when its link and
/// doorbell allow), with many calls in flight at once. It moves to another thread when its
/// links are `Send` and its doorbell `Send + Sync` (under `alloc` the core that holds the
/// doorbell is shared: with the halves of [`split`](Self::split) and, for the few loads of
/// a sample, a [`Watch`]). Sends lock the sending half,
/// receives the receiving one, each only for the link operation itself. Two threads that
/// only send and only receive use [`split`](Self::split) instead: halves without locks.
///
/// Over a VMBus ring pair it is a [`Channel`]; any other [`PacketTx`] / [`PacketRx`] pair
/// (a stream transport, a layer over another link) gets the same API from
/// [`Endpoint::over`].
pub struct Endpoint<T, R, D> {
    core: CoreBox<D>,
    tx: Lock<T>,
    rx: Lock<RxState<R>>,
}

/// A VMBus-style channel: packets out through one ring, in through the other, and a
/// doorbell that wakes the peer only when it needs waking.
pub type Channel<M, D> = Endpoint<RingTx<M>, RingRx<M>, D>;

impl<T: PacketTx, R: PacketRx, D: Doorbell> core::fmt::Debug for Endpoint<T, R, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Endpoint")
            .field("state", &self.state())
            .field("counters", &self.counters())
            .finish_non_exhaustive()
    }
}

impl<M: RingMem, D: Doorbell> Channel<M, D> {
    /// A channel writing to `outgoing`, reading from `incoming`, signalling through
    /// `doorbell`. Both rings' control pages must be initialised (by whichever side
    /// allocated the memory); their indices are read once and validated.
    pub fn new(
        outgoing: M,
        incoming: M,
        doorbell: D,
        config: Config,
    ) -> Result<Self, ChannelError> {
        Ok(Self::over(
            RingTx::new(outgoing)?,
            RingRx::new(incoming)?,
            doorbell,
            config,
        ))
    }
}

impl<R> RxState<R> {
    fn new(link: R, config: &Config) -> Self {
        #[cfg(not(feature = "alloc"))]
        let _ = config;
        Self {
            link,
            #[cfg(feature = "alloc")]
            queue: PacketQueue::new(config.queue_bytes, config.queue_depth),
            #[cfg(feature = "alloc")]
            stored: (0..MAX_TRANSACTIONS).map(|_| Vec::new()).collect(),
            #[cfg(feature = "alloc")]
            stored_len: [0; MAX_TRANSACTIONS],
            spin_masked: false,
        }
    }
}

impl<D: Doorbell> Core<D> {
    fn new(doorbell: D, config: Config) -> Self {
        Self::with_live(doorbell, config, Live::new())
    }

    fn with_live(doorbell: D, config: Config, live: Live) -> Self {
        Self {
            doorbell,
            live,
            #[cfg(feature = "alloc")]
            call_capacity: core::array::from_fn(|_| AtomicUsize::new(0)),
            hub: Hub::default(),
            external_waits: AtomicBool::new(false),
            wake_cost_ns: AtomicU64::new(initial_wake_cost(&config)),
            wait_ns: AtomicU64::new(initial_wake_cost(&config)),
            spin_yield: AtomicU32::new(0),
            config,
        }
    }

    /// The configured GPA page limit.
    #[cfg(feature = "alloc")]
    pub(crate) fn gpa_page_limit(&self) -> Option<u64> {
        self.config.gpa_page_limit
    }

    /// The counters.
    fn counters(&self) -> Counters {
        self.live.counters.snapshot()
    }

    /// Where the channel is in its life.
    fn state(&self) -> ChannelState {
        self.live.state()
    }

    /// Puts the channel in the failed state (the first cause sticks) and returns the
    /// error every call now returns.
    fn fail(&self, cause: impl Into<FailureCause>) -> ChannelError {
        let cause = cause.into();
        let stored = {
            let mut c = self.live.cause.lock();
            *c.get_or_insert(cause)
        };
        self.live.state.store(FAILED, Ordering::Release);
        self.hub.notify(&self.doorbell);
        ChannelError::Failed(stored)
    }

    fn failed(&self) -> Option<ChannelError> {
        if self.live.state.load(Ordering::Acquire) == FAILED {
            return Some(ChannelError::Failed(
                (*self.live.cause.lock())
                    .unwrap_or(FailureCause::Doorbell(DoorbellError::PeerClosed)),
            ));
        }
        None
    }

    fn mark_peer_closed(&self) {
        let _ = self.live.state.compare_exchange(
            OPEN,
            PEER_CLOSED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.hub.notify(&self.doorbell);
    }

    /// True when the channel already knows the peer is gone (an atomic load, no system
    /// call). Receives read it *before* looking at the ring, so that what the peer
    /// committed before leaving is still received.
    fn known_gone(&self) -> bool {
        self.live.state.load(Ordering::Acquire) == PEER_CLOSED
    }

    /// After a receive found nothing: with [`Probe::Doorbell`], asks the doorbell whether
    /// the peer has left (maybe a system call, so only on this path, and only on the
    /// first empty look after a packet and every 64th after that: see
    /// [`probe_due`](config::probe_due)). True means it has just been found gone and the
    /// receive must look at the ring once more.
    fn newly_gone(&self, probe: Probe) -> bool {
        probe == Probe::Doorbell
            && probe_due(&self.live.counters.rx.empty_looks)
            && self.peer_gone()
    }

    /// A receive found a packet: the next empty look asks the doorbell again.
    #[inline]
    fn received(&self) {
        progressed(&self.live.counters.rx.empty_looks);
    }

    /// True when the peer is gone, asking the doorbell if the state does not say so yet.
    fn peer_gone(&self) -> bool {
        if self.live.state.load(Ordering::Acquire) == PEER_CLOSED {
            return true;
        }
        if self.doorbell.peer_closed() {
            self.mark_peer_closed();
            return true;
        }
        false
    }

    fn doorbell_error(&self, e: DoorbellError) -> ChannelError {
        match e {
            DoorbellError::PeerClosed => {
                self.mark_peer_closed();
                ChannelError::Closed
            }
            other => self.fail(FailureCause::Doorbell(other)),
        }
    }

    /// Rings the peer's doorbell if a commit asked for it.
    fn signal(&self, signal: Signal) -> Result<(), ChannelError> {
        if signal.is_needed() {
            bump(&self.live.counters.tx.signals_sent, 1);
            self.doorbell.signal().map_err(|e| self.doorbell_error(e))?;
        }
        Ok(())
    }

    fn check_send(&self) -> Result<(), ChannelError> {
        if let Some(e) = self.failed() {
            return Err(e);
        }
        // Only what the channel already knows: asking the doorbell may be a system call,
        // too dear for every send. A send to a peer that left unnoticed lands in a ring
        // nobody reads (as it would had the peer left just after it); a send that finds
        // the ring full asks the doorbell (the first after progress, then every 64th) and
        // says `Closed`.
        if self.known_gone() {
            return Err(ChannelError::Closed);
        }
        Ok(())
    }

    /// A link's error as the endpoint reports it: a broken link fails the endpoint.
    fn link_error(&self, e: ChannelError) -> ChannelError {
        match e {
            ChannelError::Failed(cause) => self.fail(cause),
            other => other,
        }
    }
}
