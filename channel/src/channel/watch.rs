//! Watching an endpoint from another thread: its state, counters and calls in flight, read
//! without taking either half, for monitors and statistics servers.

use alloc::sync::{Arc, Weak};

use super::{ChannelState, Counters, Endpoint, Live, Receiver, Sender};
use crate::doorbell::Doorbell;
use crate::link::{PacketRx, PacketTx};

/// A read-only view of a live endpoint, for a monitor in the same process.
///
/// It reads what the endpoint publishes anyway — its state, [`Counters`] and transaction
/// table — with plain atomic loads, taking neither half's lock: sampling never waits for
/// the endpoint and the endpoint never waits for a sample. It keeps no resource of the
/// endpoint's: once the endpoint (and every half split from it) is dropped,
/// [`sample`](Self::sample) says `None`, and the doorbell and links are long closed.
///
/// ```
/// use vmlink_channel::{ChannelState, Config, Wait, in_process_channel_pair};
///
/// let (a, b) = in_process_channel_pair(4096, Config::default())?;
/// let watch = a.watch();
/// a.send(b"hello", Wait::Now)?;
/// let sample = watch.sample().expect("the endpoint is alive");
/// assert_eq!(sample.counters.packets_sent, 1);
/// assert_eq!(sample.state, ChannelState::Open);
/// drop(a);
/// assert!(watch.sample().is_none(), "the endpoint is gone");
/// # drop(b);
/// # Ok::<(), vmlink_channel::ChannelError>(())
/// ```
#[derive(Clone)]
pub struct Watch {
    live: Weak<Live>,
}

/// What a [`Watch`] read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Sample {
    /// Where the channel is in its life.
    pub state: ChannelState,
    /// The counters since the channel was made (or, for a restored one, since its
    /// predecessor's was).
    pub counters: Counters,
    /// Transactions in flight (or reserved for a late completion).
    pub transactions_in_flight: usize,
}

impl Watch {
    fn of(live: &Arc<Live>) -> Self {
        Self {
            live: Arc::downgrade(live),
        }
    }

    /// The endpoint's state, counters and calls in flight now; `None` once the endpoint
    /// and every half split from it are dropped.
    pub fn sample(&self) -> Option<Sample> {
        let live = self.live.upgrade()?;
        Some(Sample {
            state: live.state(),
            counters: live.counters.snapshot(),
            transactions_in_flight: live.txns.in_use(),
        })
    }

    /// True while the endpoint (or a half split from it) exists.
    pub fn is_alive(&self) -> bool {
        self.live.strong_count() > 0
    }
}

impl core::fmt::Debug for Watch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Watch")
            .field("alive", &self.is_alive())
            .finish_non_exhaustive()
    }
}

impl<T: PacketTx, R: PacketRx, D: Doorbell> Endpoint<T, R, D> {
    /// A [`Watch`] on this endpoint, for a monitor in another thread.
    pub fn watch(&self) -> Watch {
        Watch::of(&self.core.live)
    }
}

impl<T: PacketTx, D: Doorbell> Sender<T, D> {
    /// A [`Watch`] on the endpoint this half was split from.
    pub fn watch(&self) -> Watch {
        Watch::of(&self.core.live)
    }
}

impl<R: PacketRx, D: Doorbell> Receiver<R, D> {
    /// A [`Watch`] on the endpoint this half was split from.
    pub fn watch(&self) -> Watch {
        Watch::of(&self.core.live)
    }
}
