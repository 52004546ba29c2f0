//! Configuration, life-cycle states and counters.

use super::*;

/// How a channel behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Polling mode: how many times a receiver that found nothing looks again (one CPU
    /// spin hint between looks, interrupts masked) before it unmasks and sleeps. A look
    /// costs tens of nanoseconds; 0 (the default) sleeps at once.
    pub spin_iterations: u32,
    /// How long a sender waiting for space sleeps before it looks again even without a
    /// signal, for peers that do not honour `pending_send_size`.
    pub space_recheck: Duration,
    /// With `alloc`: how many unsolicited packets may wait in the channel while callers
    /// wait for completions. When it is full, callers stop reading the ring until a
    /// receiver takes packets.
    pub queue_depth: usize,
    /// With `alloc`: how many bytes (headers and payloads) those packets may hold in all.
    /// The queue's one buffer of exactly this size is allocated when the first packet is
    /// queued; a peer that sends only maximum-size packets meets the same back-pressure
    /// as a full queue, never more memory. A packet larger than this is never queued: it
    /// stays in the ring until a receiver takes it. The default, 1 MiB, holds two of the
    /// largest packets VMBus can describe (524,280 bytes).
    pub queue_bytes: usize,
    /// GPA-direct page numbers must be below this (the shm transport's buffer area);
    /// `None` checks only the structure.
    pub gpa_page_limit: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            spin_iterations: 0,
            space_recheck: Duration::from_millis(10),
            queue_depth: 64,
            queue_bytes: 1 << 20,
            gpa_page_limit: None,
        }
    }
}

impl Config {
    /// Polling mode with `spin_iterations` looks before sleeping.
    pub fn polling(spin_iterations: u32) -> Self {
        Self {
            spin_iterations,
            ..Self::default()
        }
    }

    /// The same configuration with a GPA page-number limit.
    pub fn with_gpa_page_limit(mut self, limit: u64) -> Self {
        self.gpa_page_limit = Some(limit);
        self
    }

    /// The same configuration with another unsolicited-packet queue depth.
    pub fn with_queue_depth(mut self, depth: usize) -> Self {
        self.queue_depth = depth;
        self
    }

    /// The same configuration with another bound on the queue's bytes.
    pub fn with_queue_bytes(mut self, bytes: usize) -> Self {
        self.queue_bytes = bytes;
        self
    }
}

/// Where a channel is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelState {
    /// Both sides are there.
    Open,
    /// The peer left; what it committed can still be received.
    PeerClosed,
    /// A ring or the protocol was violated; every call fails with the cause.
    Failed(FailureCause),
}

/// Counters a tool can read, all since the channel was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counters {
    /// Packets committed to the outgoing ring.
    pub packets_sent: u64,
    /// Bytes of those packets in the ring (descriptor, header, padded payload).
    pub bytes_sent: u64,
    /// Packets taken from the incoming ring (completions for waiting calls included).
    pub packets_received: u64,
    /// Bytes of those packets in the ring.
    pub bytes_received: u64,
    /// Doorbell signals sent to the peer.
    pub signals_sent: u64,
    /// Wake-ups by the peer's doorbell.
    pub signals_received: u64,
    /// Times a send found the ring full and waited for space.
    pub send_waits: u64,
    /// Times a receive went to sleep.
    pub receive_sleeps: u64,
    /// Completions that arrived after their caller gave up, discarded.
    pub late_completions: u64,
}

#[derive(Debug, Default)]
pub(super) struct AtomicCounters {
    pub(super) packets_sent: AtomicU64,
    pub(super) bytes_sent: AtomicU64,
    pub(super) packets_received: AtomicU64,
    pub(super) bytes_received: AtomicU64,
    pub(super) signals_sent: AtomicU64,
    pub(super) signals_received: AtomicU64,
    pub(super) send_waits: AtomicU64,
    pub(super) receive_sleeps: AtomicU64,
    pub(super) late_completions: AtomicU64,
}

pub(super) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl AtomicCounters {
    #[cfg(feature = "alloc")]
    pub(super) fn from_snapshot(c: &Counters) -> Self {
        Self {
            packets_sent: AtomicU64::new(c.packets_sent),
            bytes_sent: AtomicU64::new(c.bytes_sent),
            packets_received: AtomicU64::new(c.packets_received),
            bytes_received: AtomicU64::new(c.bytes_received),
            signals_sent: AtomicU64::new(c.signals_sent),
            signals_received: AtomicU64::new(c.signals_received),
            send_waits: AtomicU64::new(c.send_waits),
            receive_sleeps: AtomicU64::new(c.receive_sleeps),
            late_completions: AtomicU64::new(c.late_completions),
        }
    }

    pub(super) fn snapshot(&self) -> Counters {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            packets_sent: l(&self.packets_sent),
            bytes_sent: l(&self.bytes_sent),
            packets_received: l(&self.packets_received),
            bytes_received: l(&self.bytes_received),
            signals_sent: l(&self.signals_sent),
            signals_received: l(&self.signals_received),
            send_waits: l(&self.send_waits),
            receive_sleeps: l(&self.receive_sleeps),
            late_completions: l(&self.late_completions),
        }
    }
}
