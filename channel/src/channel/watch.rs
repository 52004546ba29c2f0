//! Watching an endpoint from another thread: its state, counters and calls in flight, read
//! without taking either half, for monitors and statistics servers.

use alloc::sync::{Arc, Weak};

use super::{ChannelState, Core, Counters, Endpoint, Receiver, Sender};
use crate::doorbell::Doorbell;
use crate::link::{PacketRx, PacketTx};

/// A read-only view of a live endpoint, for a monitor in the same process.
///
/// It reads what the endpoint keeps anyway — its state, [`Counters`] and transaction
/// table — with plain atomic loads, taking neither half's lock: sampling never waits for
/// the endpoint and the endpoint never waits for a sample. It holds the endpoint weakly:
/// once the endpoint (and every half split from it) is dropped,
/// [`sample`](Self::sample) says `None`. A sample keeps the endpoint's doorbell for the
/// few loads it takes; an endpoint dropped meanwhile closes its doorbell when the sample
/// ends.
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
    core: Weak<dyn Sampled + Send + Sync>,
}

/// What a [`Watch`] asks of a core whose doorbell type it does not know.
trait Sampled {
    fn sample(&self) -> Sample;
}

impl<D> Sampled for Core<D> {
    fn sample(&self) -> Sample {
        Sample {
            state: self.live.state(),
            counters: self.live.counters.snapshot(),
            transactions_in_flight: self.live.txns.in_use(),
        }
    }
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
    fn of<D: Send + Sync + 'static>(core: &Arc<Core<D>>) -> Self {
        let core: Arc<dyn Sampled + Send + Sync> = core.clone();
        Self {
            core: Arc::downgrade(&core),
        }
    }

    /// The endpoint's state, counters and calls in flight now; `None` once the endpoint
    /// and every half split from it are dropped.
    pub fn sample(&self) -> Option<Sample> {
        Some(self.core.upgrade()?.sample())
    }

    /// True while the endpoint (or a half split from it) exists.
    pub fn is_alive(&self) -> bool {
        self.core.strong_count() > 0
    }
}

impl core::fmt::Debug for Watch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Watch")
            .field("alive", &self.is_alive())
            .finish_non_exhaustive()
    }
}

impl<T: PacketTx, R: PacketRx, D: Doorbell + Send + Sync + 'static> Endpoint<T, R, D> {
    /// A [`Watch`] on this endpoint, for a monitor in another thread.
    pub fn watch(&self) -> Watch {
        Watch::of(&self.core)
    }
}

impl<T: PacketTx, D: Doorbell + Send + Sync + 'static> Sender<T, D> {
    /// A [`Watch`] on the endpoint this half was split from.
    pub fn watch(&self) -> Watch {
        Watch::of(&self.core)
    }
}

impl<R: PacketRx, D: Doorbell + Send + Sync + 'static> Receiver<R, D> {
    /// A [`Watch`] on the endpoint this half was split from.
    pub fn watch(&self) -> Watch {
        Watch::of(&self.core)
    }
}
