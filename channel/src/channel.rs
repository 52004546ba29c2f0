//! The channel: an outgoing ring, an incoming ring and a doorbell.

#[cfg(feature = "alloc")]
use alloc::vec::Vec;
#[cfg(feature = "alloc")]
use core::sync::atomic::AtomicUsize;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use core::time::Duration;
#[cfg(feature = "std")]
use std::time::Instant;

use vmlink_ring::protocol::{FLAG_COMPLETION_REQUESTED, PacketType, packet_len};
use vmlink_ring::{
    OutgoingPacket, PacketInfo, PacketMeta, ReadError, Reader, RingMem, Signal, WaitDecision,
    WriteError, WriteSlot, Writer,
};

use crate::doorbell::{Doorbell, DoorbellError};
use crate::error::{ChannelError, FailureCause, ProtocolError};
use crate::packet::{
    GpaRange, encode_gpa_header, gpa_header_len, parse_gpa_header, parse_transfer_page_header,
};
#[cfg(feature = "alloc")]
use crate::queue::PacketQueue;
use crate::sync::{Guard, Hub, Lock};
#[cfg(feature = "alloc")]
use crate::txn::slot_index;
use crate::txn::{MAX_TRANSACTIONS, Mode, Route, Transactions};

/// Whether a send may wait for space.
#[derive(Debug, Clone, Copy)]
enum Until {
    /// Never wait: a full ring is `ChannelError::Full`.
    Never,
    /// Wait until the deadline (`None`: as long as it takes).
    #[cfg(feature = "std")]
    Deadline(Option<Instant>),
}

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
struct AtomicCounters {
    packets_sent: AtomicU64,
    bytes_sent: AtomicU64,
    packets_received: AtomicU64,
    bytes_received: AtomicU64,
    signals_sent: AtomicU64,
    signals_received: AtomicU64,
    send_waits: AtomicU64,
    receive_sleeps: AtomicU64,
    late_completions: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl AtomicCounters {
    fn snapshot(&self) -> Counters {
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

const OPEN: u8 = 0;
const PEER_CLOSED: u8 = 1;
const FAILED: u8 = 2;

/// How a receive that finds the ring empty learns whether the peer has left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// Ask the doorbell (maybe a system call): `try_` receives, which must say `Closed`
    /// themselves.
    Doorbell,
    /// The channel's state only: waiting loops, whose wait asks the doorbell.
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    State,
}

/// A received packet, copied into the caller's buffer: its extra header first, then its
/// payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The packet type.
    pub packet_type: PacketType,
    /// The transaction id.
    pub transaction_id: u64,
    /// The sender asked for a completion.
    pub completion_requested: bool,
    /// Bytes of extra header at the start of the buffer (GPA ranges, transfer pages).
    pub header_len: usize,
    /// Bytes of payload after the header, padding to 8 bytes included.
    pub payload_len: usize,
}

impl Received {
    fn from_info(info: &PacketInfo) -> Self {
        Self {
            packet_type: info.packet_type(),
            transaction_id: info.transaction_id(),
            completion_requested: info.completion_requested(),
            header_len: info.header_len(),
            payload_len: info.payload_len(),
        }
    }

    /// Header and payload bytes in the buffer.
    pub fn len(&self) -> usize {
        self.header_len + self.payload_len
    }

    /// True when the packet carries neither header nor payload.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The header within the buffer the packet was received into.
    pub fn header<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[..self.header_len]
    }

    /// The payload within the buffer the packet was received into.
    pub fn payload<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.header_len..self.len()]
    }
}

struct RxState<M: RingMem> {
    reader: Reader<M>,
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

/// A VMBus-style channel: packets out through one ring, in through the other, and a
/// doorbell that wakes the peer only when it needs waking.
///
/// Every method takes `&self`: a channel can be shared by threads (when its memory and
/// doorbell allow), with many calls in flight at once. Sends lock the outgoing ring,
/// receives the incoming one, each only for the ring operation itself.
pub struct Channel<M: RingMem, D: Doorbell> {
    tx: Lock<Writer<M>>,
    rx: Lock<RxState<M>>,
    doorbell: D,
    state: AtomicU8,
    cause: Lock<Option<FailureCause>>,
    counters: AtomicCounters,
    txns: Transactions,
    /// For each transaction slot a caller waits on: the length of its response buffer,
    /// the most the receive path stores of its completion.
    #[cfg(feature = "alloc")]
    call_capacity: [AtomicUsize; MAX_TRANSACTIONS],
    hub: Hub,
    /// Someone arms the reader through the public `prepare_recv_wait` and waits on the
    /// doorbell outside the hub: polling spinners must then always unmask on their way
    /// out, as the hub cannot tell whether that waiter still sleeps.
    external_waits: AtomicBool,
    config: Config,
}

impl<M: RingMem, D: Doorbell> core::fmt::Debug for Channel<M, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Channel")
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
        let writer = Writer::new(outgoing).map_err(|e| ChannelError::Failed(e.into()))?;
        let reader = Reader::new(incoming).map_err(|e| ChannelError::Failed(e.into()))?;
        Ok(Self {
            tx: Lock::new(writer),
            rx: Lock::new(RxState {
                reader,
                #[cfg(feature = "alloc")]
                queue: PacketQueue::new(config.queue_bytes, config.queue_depth),
                #[cfg(feature = "alloc")]
                stored: (0..MAX_TRANSACTIONS).map(|_| Vec::new()).collect(),
                #[cfg(feature = "alloc")]
                stored_len: [0; MAX_TRANSACTIONS],
                spin_masked: false,
            }),
            doorbell,
            state: AtomicU8::new(OPEN),
            cause: Lock::new(None),
            counters: AtomicCounters::default(),
            txns: Transactions::new(),
            #[cfg(feature = "alloc")]
            call_capacity: core::array::from_fn(|_| AtomicUsize::new(0)),
            hub: Hub::default(),
            external_waits: AtomicBool::new(false),
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The doorbell.
    pub fn doorbell(&self) -> &D {
        &self.doorbell
    }

    /// The counters.
    pub fn counters(&self) -> Counters {
        self.counters.snapshot()
    }

    /// Where the channel is in its life.
    pub fn state(&self) -> ChannelState {
        match self.state.load(Ordering::Acquire) {
            OPEN => ChannelState::Open,
            PEER_CLOSED => ChannelState::PeerClosed,
            _ => match *self.cause.lock() {
                Some(c) => ChannelState::Failed(c),
                None => ChannelState::Open,
            },
        }
    }

    /// The largest packet the outgoing ring carries (descriptor, header, padded payload).
    pub fn max_packet_len(&self) -> usize {
        self.tx.lock().max_packet_len()
    }

    /// Transactions in flight (or reserved for a late completion).
    pub fn transactions_in_flight(&self) -> usize {
        self.txns.in_use()
    }

    /// Puts the channel in the failed state (the first cause sticks) and returns the
    /// error every call now returns.
    fn fail(&self, cause: impl Into<FailureCause>) -> ChannelError {
        let cause = cause.into();
        let stored = {
            let mut c = self.cause.lock();
            *c.get_or_insert(cause)
        };
        self.state.store(FAILED, Ordering::Release);
        self.hub.notify(&self.doorbell);
        ChannelError::Failed(stored)
    }

    fn failed(&self) -> Option<ChannelError> {
        if self.state.load(Ordering::Acquire) == FAILED {
            return Some(ChannelError::Failed(
                (*self.cause.lock()).unwrap_or(FailureCause::Doorbell(DoorbellError::PeerClosed)),
            ));
        }
        None
    }

    fn mark_peer_closed(&self) {
        let _ = self
            .state
            .compare_exchange(OPEN, PEER_CLOSED, Ordering::AcqRel, Ordering::Acquire);
        self.hub.notify(&self.doorbell);
    }

    /// True when the channel already knows the peer is gone (an atomic load, no system
    /// call). Receives read it *before* looking at the ring, so that what the peer
    /// committed before leaving is still received.
    fn known_gone(&self) -> bool {
        self.state.load(Ordering::Acquire) == PEER_CLOSED
    }

    /// After a receive found nothing: with [`Probe::Doorbell`], asks the doorbell whether
    /// the peer has left (maybe a system call, so only on this path). True means it has
    /// just been found gone and the receive must look at the ring once more.
    fn newly_gone(&self, probe: Probe) -> bool {
        probe == Probe::Doorbell && self.peer_gone()
    }

    /// True when the peer is gone, asking the doorbell if the state does not say so yet.
    fn peer_gone(&self) -> bool {
        if self.state.load(Ordering::Acquire) == PEER_CLOSED {
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
            bump(&self.counters.signals_sent, 1);
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
        // nobody reads (as it would had the peer left just after it); the first send that
        // finds the ring full asks the doorbell and says `Closed`.
        if self.known_gone() {
            return Err(ChannelError::Closed);
        }
        Ok(())
    }

    fn write_error(&self, e: WriteError) -> ChannelError {
        match e {
            WriteError::Full { .. } => ChannelError::Full,
            WriteError::TooLarge { len, max } => ChannelError::TooLarge { len, max },
            WriteError::Corrupt(r) => self.fail(r),
            other => ChannelError::InvalidRequest(other),
        }
    }

    // ---- sending -----------------------------------------------------------------------

    /// Runs `write` on the outgoing ring and publishes; `Full` if it does not fit now.
    fn try_send_with(
        &self,
        write: &mut dyn FnMut(&mut Writer<M>) -> Result<usize, WriteError>,
    ) -> Result<(), ChannelError> {
        self.check_send()?;
        let signal = {
            let mut tx = self.tx.lock();
            let len = match write(&mut tx) {
                Ok(len) => len,
                Err(WriteError::Full { .. }) if self.peer_gone() => {
                    return Err(ChannelError::Closed);
                }
                Err(e) => return Err(self.write_error(e)),
            };
            bump(&self.counters.packets_sent, 1);
            bump(&self.counters.bytes_sent, len as u64);
            tx.commit()
        };
        self.signal(signal)
    }

    /// Sends an in-band packet that asks for no completion; never waits.
    ///
    /// Sends do not ask the doorbell whether the peer is still there (that may be a system
    /// call): until the channel has learnt of a departure, a packet may land in a ring
    /// nobody reads, as it would had the peer left just after it. A send that finds the
    /// ring full asks, and says [`ChannelError::Closed`] rather than `Full` once the peer
    /// has gone.
    ///
    /// ```
    /// use vmlink_channel::{ChannelError, Config, in_process_channel_pair};
    ///
    /// let (a, b) = in_process_channel_pair(4096, Config::default())?;
    /// a.try_send(b"hello")?;
    /// let mut buf = [0u8; 16];
    /// let got = b.try_recv(&mut buf)?.expect("a packet");
    /// assert_eq!(&got.payload(&buf)[..5], b"hello");
    /// assert_eq!(b.try_recv(&mut buf)?, None);
    /// // A full ring is an error for `try_` sends, never a wait.
    /// while a.try_send(&[0; 1000]).is_ok() {}
    /// assert_eq!(a.try_send(&[0; 1000]), Err(ChannelError::Full));
    /// # Ok::<(), ChannelError>(())
    /// ```
    pub fn try_send(&self, payload: &[u8]) -> Result<(), ChannelError> {
        self.try_send_packet(&OutgoingPacket::in_band(&[payload]))
    }

    /// Sends any packet; never waits.
    pub fn try_send_packet(&self, packet: &OutgoingPacket<'_>) -> Result<(), ChannelError> {
        self.try_send_with(&mut |w| push_packet(w, packet))
    }

    /// Sends a completion for `transaction_id`; never waits.
    pub fn try_complete(&self, transaction_id: u64, payload: &[u8]) -> Result<(), ChannelError> {
        self.try_send_packet(&completion(transaction_id, &[payload]))
    }

    /// Writes a packet in place: reserves `header_len` bytes of extra header and
    /// `payload_len` bytes of payload, lets `fill` write them, and publishes. Never waits.
    pub fn try_send_in_place<R>(
        &self,
        meta: PacketMeta,
        header_len: usize,
        payload_len: usize,
        fill: impl FnOnce(&mut WriteSlot<'_, M>) -> R,
    ) -> Result<R, ChannelError> {
        self.send_in_place_until(meta, header_len, payload_len, Until::Never, fill)
    }

    /// Sends with or without waiting for space.
    fn send_until(
        &self,
        header_len: usize,
        payload_len: usize,
        until: Until,
        write: &mut dyn FnMut(&mut Writer<M>) -> Result<usize, WriteError>,
    ) -> Result<(), ChannelError> {
        match until {
            Until::Never => {
                let _ = (header_len, payload_len);
                self.try_send_with(write)
            }
            #[cfg(feature = "std")]
            Until::Deadline(deadline) => self.send_with(header_len, payload_len, deadline, write),
        }
    }

    fn send_in_place_until<R>(
        &self,
        meta: PacketMeta,
        header_len: usize,
        payload_len: usize,
        until: Until,
        fill: impl FnOnce(&mut WriteSlot<'_, M>) -> R,
    ) -> Result<R, ChannelError> {
        let mut fill = Some(fill);
        let mut out = None;
        self.send_until(header_len, payload_len, until, &mut |w| {
            let mut slot = w.reserve(meta, header_len, payload_len)?;
            if let Some(f) = fill.take() {
                out = Some(f(&mut slot));
            }
            slot.finish();
            Ok(packet_len(header_len, payload_len).unwrap_or(0))
        })?;
        // `fill` ran: the reservation succeeded before it was called.
        out.ok_or(ChannelError::Full)
    }

    fn send_gpa_direct_until(
        &self,
        ranges: &[GpaRange<'_>],
        payload: &[u8],
        meta: PacketMeta,
        until: Until,
    ) -> Result<(), ChannelError> {
        let header_len = gpa_header_len(ranges, self.config.gpa_page_limit)
            .map_err(ChannelError::InvalidPacket)?;
        let meta = PacketMeta {
            packet_type: PacketType::GpaDirect,
            ..meta
        };
        self.send_in_place_until(meta, header_len, payload.len(), until, |slot| {
            encode_gpa_header(ranges, |at, bytes| {
                let _ = slot.write_header(at, bytes);
            });
            let _ = slot.write_payload(0, payload);
        })
    }

    /// Sends a GPA-direct packet: `ranges` describe where the bulk data is, `payload`
    /// travels in-band after them. Never waits.
    pub fn try_send_gpa_direct(
        &self,
        ranges: &[GpaRange<'_>],
        payload: &[u8],
        meta: PacketMeta,
    ) -> Result<(), ChannelError> {
        self.send_gpa_direct_until(ranges, payload, meta, Until::Never)
    }

    /// Starts a batch: packets pushed to it are published together by one commit, which
    /// signals the peer at most once. The outgoing ring stays locked while the batch
    /// lives; a batch dropped without [`SendBatch::commit`] is discarded.
    ///
    /// ```
    /// use vmlink_channel::{Config, in_process_channel_pair};
    ///
    /// let (a, b) = in_process_channel_pair(4 * 4096, Config::default())?;
    /// let mut batch = a.batch()?;
    /// for i in 0..10u8 {
    ///     batch.push_in_band(&[i; 32])?;
    /// }
    /// batch.commit()?; // one index store, at most one doorbell signal
    /// assert_eq!(a.counters().signals_sent, 1);
    ///
    /// let mut sum = 0u32;
    /// let n = b.try_recv_batch(64, |packet| {
    ///     let mut first = [0u8; 1];
    ///     packet.read_payload(0, &mut first).unwrap();
    ///     sum += u32::from(first[0]);
    /// })?;
    /// assert_eq!((n, sum), (10, 45));
    /// # Ok::<(), vmlink_channel::ChannelError>(())
    /// ```
    pub fn batch(&self) -> Result<SendBatch<'_, M, D>, ChannelError> {
        self.check_send()?;
        Ok(SendBatch {
            channel: self,
            tx: self.tx.lock(),
            packets: 0,
            bytes: 0,
        })
    }

    /// Arms the reader for sleeping: unmask interrupts, fence, look again. Returns true
    /// when it is safe to sleep.
    fn arm_reader(&self, rx: &mut RxState<M>) -> Result<bool, ChannelError> {
        rx.spin_masked = false;
        let (decision, signal) = rx.reader.prepare_wait().map_err(|e| self.fail(e))?;
        self.signal(signal)?;
        Ok(decision == WaitDecision::Sleep)
    }

    /// Asks the peer not to signal for new data: for a receiver that polls with the
    /// `try_` calls. [`prepare_recv_wait`](Self::prepare_recv_wait) (and every blocking
    /// or async receive that goes to sleep) unmasks again, with the fence and re-check that
    /// keep a wake-up from being lost.
    ///
    /// ```
    /// use vmlink_channel::{Config, in_process_channel_pair};
    ///
    /// let (a, b) = in_process_channel_pair(4096, Config::default())?;
    /// b.mask_interrupts();
    /// a.try_send(b"x")?;
    /// assert_eq!(a.counters().signals_sent, 0, "a masked receiver is not signalled");
    /// # Ok::<(), vmlink_channel::ChannelError>(())
    /// ```
    pub fn mask_interrupts(&self) {
        self.rx.lock().reader.mask_interrupts();
    }

    /// Prepares to sleep until a packet arrives, for callers that wait on the doorbell
    /// themselves (`no_std` code with its own idle loop): commits consumed packets,
    /// unmasks interrupts, fences and looks again. On [`WaitDecision::Sleep`] the peer
    /// will signal when it sends; wait with `self.doorbell().wait(..)`.
    pub fn prepare_recv_wait(&self) -> Result<WaitDecision, ChannelError> {
        self.external_waits.store(true, Ordering::SeqCst);
        self.prepare_wait_for(true)
    }

    /// Arms the reader; with `queued`, packets waiting in the channel's queue count as
    /// something to receive (for receivers; callers wait only for the ring).
    pub(crate) fn prepare_wait_for(&self, queued: bool) -> Result<WaitDecision, ChannelError> {
        let mut rx = self.rx.lock();
        #[cfg(feature = "alloc")]
        if queued && !rx.queue.is_empty() {
            return Ok(WaitDecision::Ready);
        }
        #[cfg(not(feature = "alloc"))]
        let _ = queued;
        Ok(if self.arm_reader(&mut rx)? {
            WaitDecision::Sleep
        } else {
            WaitDecision::Ready
        })
    }

    /// Prepares to sleep until a packet with these sizes fits in the outgoing ring (sets
    /// the pending send size, fences, looks again); see
    /// [`prepare_recv_wait`](Self::prepare_recv_wait).
    pub fn prepare_send_wait(
        &self,
        header_len: usize,
        payload_len: usize,
    ) -> Result<WaitDecision, ChannelError> {
        bump(&self.counters.send_waits, 1);
        let (decision, signal) = {
            let mut tx = self.tx.lock();
            tx.prepare_wait(header_len, payload_len)
                .map_err(|e| self.write_error(e))?
        };
        self.signal(signal)?;
        Ok(decision)
    }

    // ---- transactions ------------------------------------------------------------------

    /// Sends a request whose completion will come back through the receive calls (as a
    /// packet of type [`PacketType::Completion`] with the returned transaction id). Never
    /// waits. For `no_std` users that poll; with `std`, [`call`](Self::call) is simpler.
    ///
    /// ```
    /// use vmlink_channel::{Config, PacketType, in_process_channel_pair};
    ///
    /// let (a, b) = in_process_channel_pair(4096, Config::default())?;
    /// let tid = a.try_start_request(b"status?")?;
    /// let mut buf = [0u8; 64];
    /// let request = b.try_recv(&mut buf)?.expect("the request");
    /// assert!(request.completion_requested);
    /// b.try_complete(request.transaction_id, b"ok")?;
    /// let completion = a.try_recv(&mut buf)?.expect("the completion");
    /// assert_eq!((completion.packet_type, completion.transaction_id), (PacketType::Completion, tid));
    /// # Ok::<(), vmlink_channel::ChannelError>(())
    /// ```
    pub fn try_start_request(&self, request: &[u8]) -> Result<u64, ChannelError> {
        // A failed or closed channel says so before anything else.
        self.check_send()?;
        let tid = self
            .txns
            .alloc(Mode::Polled)
            .ok_or(ChannelError::TransactionsExhausted {
                capacity: MAX_TRANSACTIONS,
            })?;
        match self.try_send_packet(&request_packet(tid, &[request])) {
            Ok(()) => Ok(tid),
            Err(e) => {
                // Never sent: nothing will complete it.
                self.txns.free(tid);
                Err(e)
            }
        }
    }

    // ---- receiving ---------------------------------------------------------------------

    /// Takes the next packet meant for a receiver off the incoming ring, dealing with
    /// completions for waiting callers on the way. Consumed packets are not yet committed.
    fn next_for_receiver(&self, rx: &mut RxState<M>) -> Result<Option<PacketInfo>, ChannelError> {
        loop {
            let info = match rx.reader.peek_info() {
                Ok(Some(info)) => info,
                Ok(None) => return Ok(None),
                Err(e) => return Err(self.fail(e)),
            };
            if info.packet_type() != PacketType::Completion {
                // Extra headers are validated where they are copied out, never in the ring.
                return Ok(Some(info));
            }
            match self.txns.route(info.transaction_id()) {
                Route::Polled => return Ok(Some(info)),
                Route::Unknown => {
                    return Err(self.fail(ProtocolError::UnknownTransaction {
                        transaction_id: info.transaction_id(),
                    }));
                }
                Route::Late(index) => {
                    self.txns.free_late(index);
                    bump(&self.counters.late_completions, 1);
                    self.consume(&mut rx.reader, &info);
                }
                #[cfg(feature = "alloc")]
                Route::Waiting(index) => {
                    // Stored only when it fits the caller's buffer: a peer cannot make the
                    // channel hold more than its callers asked to receive.
                    let needed = info.payload_len();
                    let stored = &mut rx.stored[index];
                    stored.clear();
                    if needed <= self.call_capacity[index].load(Ordering::Acquire) {
                        stored.resize(needed, 0);
                        if let Some(p) = rx.reader.packet(&info) {
                            p.read_payload(0, stored).map_err(|e| self.read_error(e))?;
                        }
                    }
                    rx.stored_len[index] = needed;
                    self.consume(&mut rx.reader, &info);
                    if !self.txns.mark_done(index) {
                        bump(&self.counters.late_completions, 1);
                    }
                    self.hub.notify(&self.doorbell);
                }
                #[cfg(not(feature = "alloc"))]
                Route::Waiting(_) => return Ok(Some(info)),
            }
        }
    }

    /// Consumes the packet at the head (not yet committed) and counts it.
    fn consume(&self, reader: &mut Reader<M>, info: &PacketInfo) {
        if let Some(p) = reader.packet(info) {
            p.consume();
            bump(&self.counters.packets_received, 1);
            bump(&self.counters.bytes_received, info.packet_len() as u64);
        }
    }

    /// Commits consumed packets and signals the writer if it waits for the space. A writer
    /// that has left needs no signal: that is not an error here, as the packets just
    /// consumed must still reach the receiver (the channel notes the departure).
    fn commit_rx(&self, rx: &mut RxState<M>) -> Result<(), ChannelError> {
        let signal = rx.reader.commit();
        match self.signal(signal) {
            Err(ChannelError::Closed) => Ok(()),
            other => other,
        }
    }

    /// Copies the packet `info` into `buf` (header, then payload) and consumes it. The
    /// header is read out of the ring once and validated in `buf`: the caller gets exactly
    /// the bytes that were checked.
    fn take_into(
        &self,
        reader: &mut Reader<M>,
        info: &PacketInfo,
        buf: &mut [u8],
    ) -> Result<Received, ChannelError> {
        let meta = Received::from_info(info);
        if meta.len() > buf.len() {
            return Err(ChannelError::BufferTooSmall {
                needed: meta.len(),
                capacity: buf.len(),
            });
        }
        if let Some(p) = reader.packet(info) {
            let (h, rest) = buf.split_at_mut(meta.header_len);
            p.read_header(0, h).map_err(|e| self.read_error(e))?;
            check_header(&meta, h, self.config.gpa_page_limit)
                .map_err(|e| self.fail(ProtocolError::Packet(e)))?;
            p.read_payload(0, &mut rest[..meta.payload_len])
                .map_err(|e| self.read_error(e))?;
        }
        self.consume(reader, info);
        if meta.packet_type == PacketType::Completion {
            self.txns.release_polled(meta.transaction_id);
        }
        Ok(meta)
    }

    #[cfg(feature = "alloc")]
    fn take_queued(
        &self,
        rx: &mut RxState<M>,
        buf: &mut [u8],
    ) -> Result<Option<Received>, ChannelError> {
        let Some((meta, data)) = rx.queue.front() else {
            return Ok(None);
        };
        if data.len() > buf.len() {
            return Err(ChannelError::BufferTooSmall {
                needed: data.len(),
                capacity: buf.len(),
            });
        }
        buf[..data.len()].copy_from_slice(data);
        rx.queue.pop();
        // Queue space freed: callers blocked on a full queue may go on.
        self.hub.notify(&self.doorbell);
        Ok(Some(meta))
    }

    /// Receives one packet into `buf` if one is there; never waits.
    ///
    /// `Ok(None)` when nothing is queued; [`ChannelError::Closed`] once the peer is gone
    /// and everything it committed has been received.
    pub fn try_recv(&self, buf: &mut [u8]) -> Result<Option<Received>, ChannelError> {
        self.try_recv_as(buf, Probe::Doorbell)
    }

    fn try_recv_as(&self, buf: &mut [u8], probe: Probe) -> Result<Option<Received>, ChannelError> {
        loop {
            if let Some(e) = self.failed() {
                return Err(e);
            }
            let gone = self.known_gone();
            let mut rx = self.rx.lock();
            #[cfg(feature = "alloc")]
            if let Some(r) = self.take_queued(&mut rx, buf)? {
                return Ok(Some(r));
            }
            let got = self
                .next_for_receiver(&mut rx)?
                .map(|info| self.take_into(&mut rx.reader, &info, buf));
            self.commit_rx(&mut rx)?;
            drop(rx);
            return match got {
                Some(r) => r.map(Some),
                None if gone => Err(ChannelError::Closed),
                None if self.newly_gone(probe) => continue,
                None => Ok(None),
            };
        }
    }

    /// Receives the next packet in place, if one is there; never waits. The returned
    /// guard reads straight out of ring memory; the packet is consumed when the guard is
    /// dropped or committed. The incoming ring stays locked meanwhile.
    ///
    /// ```
    /// use vmlink_channel::{Config, PacketMeta, in_process_channel_pair};
    ///
    /// let (a, b) = in_process_channel_pair(4 * 4096, Config::default())?;
    /// // Fill a packet in place: no intermediate buffer.
    /// a.try_send_in_place(PacketMeta::in_band(), 0, 8192, |slot| {
    ///     for chunk in 0..8 {
    ///         slot.write_payload(chunk * 1024, &[chunk as u8; 1024]).unwrap();
    ///     }
    /// })?;
    /// // Read just the part needed, straight out of the ring.
    /// let mut guard = b.try_recv_in_place()?.expect("a packet");
    /// let mut last = [0u8; 4];
    /// guard.read_payload(8188, &mut last)?;
    /// assert_eq!(last, [7; 4]);
    /// drop(guard); // consumed here
    /// # Ok::<(), vmlink_channel::ChannelError>(())
    /// ```
    pub fn try_recv_in_place(&self) -> Result<Option<RecvGuard<'_, M, D>>, ChannelError> {
        self.try_recv_in_place_as(Probe::Doorbell)
    }

    fn try_recv_in_place_as(
        &self,
        probe: Probe,
    ) -> Result<Option<RecvGuard<'_, M, D>>, ChannelError> {
        loop {
            if let Some(e) = self.failed() {
                return Err(e);
            }
            let gone = self.known_gone();
            let mut rx = self.rx.lock();
            #[cfg(feature = "alloc")]
            if let Some((meta, _)) = rx.queue.front() {
                return Ok(Some(RecvGuard {
                    channel: self,
                    rx,
                    source: Some(Source::Queued(meta)),
                }));
            }
            if let Some(info) = self.next_for_receiver(&mut rx)? {
                return Ok(Some(RecvGuard {
                    channel: self,
                    rx,
                    source: Some(Source::Ring(info)),
                }));
            }
            self.commit_rx(&mut rx)?;
            drop(rx);
            if gone {
                return Err(ChannelError::Closed);
            }
            if !self.newly_gone(probe) {
                return Ok(None);
            }
        }
    }

    /// Receives up to `max` packets in place under one lock and one commit (so the peer is
    /// signalled at most once), handing each to `each`. Returns how many were handled;
    /// never waits.
    pub fn try_recv_batch(
        &self,
        max: usize,
        mut each: impl FnMut(&BatchPacket<'_, '_, M>),
    ) -> Result<usize, ChannelError> {
        loop {
            match self.recv_batch_once(max, &mut each)? {
                (0, false) if self.newly_gone(Probe::Doorbell) => {}
                (n, _) => return Ok(n),
            }
        }
    }

    /// One batch: how many packets were handled, and whether the peer was known to be
    /// gone before the ring was read (`Closed` when that found nothing).
    fn recv_batch_once(
        &self,
        max: usize,
        each: &mut impl FnMut(&BatchPacket<'_, '_, M>),
    ) -> Result<(usize, bool), ChannelError> {
        if let Some(e) = self.failed() {
            return Err(e);
        }
        let gone = self.known_gone();
        let mut rx = self.rx.lock();
        let mut n = 0;
        let mut result = Ok(());
        #[cfg(feature = "alloc")]
        let mut took_queued = false;
        while n < max {
            #[cfg(feature = "alloc")]
            if let Some((meta, data)) = rx.queue.front() {
                each(&BatchPacket {
                    meta,
                    source: BatchSource::Queued(data),
                    channel: self,
                });
                rx.queue.pop();
                took_queued = true;
                n += 1;
                continue;
            }
            let info = match self.next_for_receiver(&mut rx) {
                Ok(Some(info)) => info,
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let meta = Received::from_info(&info);
            if let Some(p) = rx.reader.packet(&info) {
                each(&BatchPacket {
                    meta,
                    source: BatchSource::Ring(&p),
                    channel: self,
                });
            }
            self.consume(&mut rx.reader, &info);
            if meta.packet_type == PacketType::Completion {
                self.txns.release_polled(meta.transaction_id);
            }
            n += 1;
        }
        #[cfg(feature = "alloc")]
        if took_queued {
            // Queue space freed: callers blocked on a full queue may go on.
            self.hub.notify(&self.doorbell);
        }
        self.commit_rx(&mut rx)?;
        result?;
        if n == 0 && gone {
            return Err(ChannelError::Closed);
        }
        Ok((n, gone))
    }
}

/// Copies `buf.len()` bytes at `offset` of the `size`-byte region starting at `start` of
/// `data` (a packet copied out of the ring).
#[cfg(feature = "alloc")]
fn copy_region(
    data: &[u8],
    start: usize,
    size: usize,
    offset: usize,
    buf: &mut [u8],
) -> Result<(), ChannelError> {
    let out_of_bounds = ChannelError::OutOfBounds {
        offset,
        len: buf.len(),
        size,
    };
    if offset.checked_add(buf.len()).is_none_or(|end| end > size) {
        return Err(out_of_bounds);
    }
    let from = data
        .get(start + offset..start + offset + buf.len())
        .ok_or(out_of_bounds)?;
    buf.copy_from_slice(from);
    Ok(())
}

/// Validates a packet's extra header, copied out of the ring: GPA ranges and transfer
/// pages have a structure; other packets' header bytes are padding.
fn check_header(
    meta: &Received,
    header: &[u8],
    gpa_page_limit: Option<u64>,
) -> Result<(), crate::packet::PacketError> {
    match meta.packet_type {
        PacketType::GpaDirect => parse_gpa_header(header, gpa_page_limit).map(drop),
        PacketType::TransferPages => parse_transfer_page_header(header).map(drop),
        _ => Ok(()),
    }
}

/// What a packet read in place needs of its channel: the GPA page limit to validate a
/// header against, and a way to fail the channel when it finds a violation.
trait PacketSource {
    fn gpa_page_limit(&self) -> Option<u64>;
    fn read_error(&self, e: ReadError) -> ChannelError;
    fn fail_protocol(&self, e: crate::packet::PacketError) -> ChannelError;
}

impl<M: RingMem, D: Doorbell> PacketSource for Channel<M, D> {
    fn gpa_page_limit(&self) -> Option<u64> {
        self.config.gpa_page_limit
    }

    /// A caller's mistake is its error; a corrupt ring fails the channel.
    fn read_error(&self, e: ReadError) -> ChannelError {
        match e {
            ReadError::BufferTooSmall { needed, capacity } => {
                ChannelError::BufferTooSmall { needed, capacity }
            }
            ReadError::OutOfBounds { offset, len, size } => {
                ChannelError::OutOfBounds { offset, len, size }
            }
            ReadError::Corrupt(r) => self.fail(r),
        }
    }

    fn fail_protocol(&self, e: crate::packet::PacketError) -> ChannelError {
        self.fail(ProtocolError::Packet(e))
    }
}

/// Copies a packet's whole extra header into `scratch` with `read` (one read of the ring).
fn copy_header<'s>(
    meta: &Received,
    scratch: &'s mut [u8],
    read: impl FnOnce(&mut [u8]) -> Result<(), ChannelError>,
) -> Result<&'s mut [u8], ChannelError> {
    let (len, capacity) = (meta.header_len, scratch.len());
    let header = scratch.get_mut(..len).ok_or(ChannelError::BufferTooSmall {
        needed: len,
        capacity,
    })?;
    read(header)?;
    Ok(header)
}

/// The whole extra header, copied into `scratch` once and validated there (a violation
/// fails the channel): the caller gets exactly the bytes that were checked.
fn validated_header<'s>(
    channel: &dyn PacketSource,
    meta: &Received,
    scratch: &'s mut [u8],
    read: impl FnOnce(&mut [u8]) -> Result<(), ChannelError>,
) -> Result<&'s [u8], ChannelError> {
    let header = copy_header(meta, scratch, read)?;
    check_header(meta, header, channel.gpa_page_limit()).map_err(|e| channel.fail_protocol(e))?;
    Ok(header)
}

/// A GPA-direct packet's ranges, from its header copied into `scratch` once and validated
/// there (a violation fails the channel).
fn validated_gpa_ranges<'s>(
    channel: &dyn PacketSource,
    meta: &Received,
    scratch: &'s mut [u8],
    read: impl FnOnce(&mut [u8]) -> Result<(), ChannelError>,
) -> Result<crate::packet::GpaRanges<'s>, ChannelError> {
    if meta.packet_type != PacketType::GpaDirect {
        return Err(ChannelError::NotGpaDirect {
            packet_type: meta.packet_type,
        });
    }
    let header = copy_header(meta, scratch, read)?;
    parse_gpa_header(header, channel.gpa_page_limit()).map_err(|e| channel.fail_protocol(e))
}

fn push_packet<M: RingMem>(
    w: &mut Writer<M>,
    packet: &OutgoingPacket<'_>,
) -> Result<usize, WriteError> {
    let payload: usize = packet.payload.iter().map(|p| p.len()).sum();
    w.push(packet)?;
    Ok(packet_len(packet.header.len(), payload).unwrap_or(0))
}

/// An in-band request asking for a completion.
pub(crate) fn request_packet<'a>(tid: u64, payload: &'a [&'a [u8]]) -> OutgoingPacket<'a> {
    OutgoingPacket {
        meta: PacketMeta {
            packet_type: PacketType::InBand,
            flags: FLAG_COMPLETION_REQUESTED,
            transaction_id: tid,
        },
        header: &[],
        payload,
    }
}

/// A completion for `tid`.
pub(crate) fn completion<'a>(tid: u64, payload: &'a [&'a [u8]]) -> OutgoingPacket<'a> {
    OutgoingPacket {
        meta: PacketMeta {
            packet_type: PacketType::Completion,
            flags: 0,
            transaction_id: tid,
        },
        header: &[],
        payload,
    }
}

/// Packets pushed together and published by one commit.
pub struct SendBatch<'c, M: RingMem, D: Doorbell> {
    channel: &'c Channel<M, D>,
    tx: Guard<'c, Writer<M>>,
    packets: u64,
    bytes: u64,
}

impl<M: RingMem, D: Doorbell> core::fmt::Debug for SendBatch<'_, M, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SendBatch")
            .field("packets", &self.packets)
            .finish_non_exhaustive()
    }
}

impl<M: RingMem, D: Doorbell> SendBatch<'_, M, D> {
    /// Adds a packet; `Full` when it does not fit (the packets added so far stay).
    pub fn push(&mut self, packet: &OutgoingPacket<'_>) -> Result<(), ChannelError> {
        let len = push_packet(&mut self.tx, packet).map_err(|e| self.channel.write_error(e))?;
        self.packets += 1;
        self.bytes += len as u64;
        Ok(())
    }

    /// Adds an in-band packet that asks for no completion.
    pub fn push_in_band(&mut self, payload: &[u8]) -> Result<(), ChannelError> {
        self.push(&OutgoingPacket::in_band(&[payload]))
    }

    /// Adds a packet written in place by `fill`.
    pub fn push_in_place<R>(
        &mut self,
        meta: PacketMeta,
        header_len: usize,
        payload_len: usize,
        fill: impl FnOnce(&mut WriteSlot<'_, M>) -> R,
    ) -> Result<R, ChannelError> {
        let mut slot = self
            .tx
            .reserve(meta, header_len, payload_len)
            .map_err(|e| self.channel.write_error(e))?;
        let r = fill(&mut slot);
        slot.finish();
        self.packets += 1;
        self.bytes += packet_len(header_len, payload_len).unwrap_or(0) as u64;
        Ok(r)
    }

    /// Packets added so far.
    pub fn len(&self) -> usize {
        self.packets as usize
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.packets == 0
    }

    /// Publishes every packet added, with one index store and at most one signal.
    pub fn commit(mut self) -> Result<(), ChannelError> {
        let signal = self.tx.commit();
        let c = self.channel;
        bump(&c.counters.packets_sent, self.packets);
        bump(&c.counters.bytes_sent, self.bytes);
        self.packets = 0;
        drop(self);
        c.signal(signal)
    }
}

impl<M: RingMem, D: Doorbell> Drop for SendBatch<'_, M, D> {
    fn drop(&mut self) {
        // Uncommitted packets are discarded.
        self.tx.revert();
    }
}

enum Source {
    Ring(PacketInfo),
    /// The front of the channel's queue.
    #[cfg(feature = "alloc")]
    Queued(Received),
}

/// A received packet read in place. Consumed when dropped or committed.
pub struct RecvGuard<'c, M: RingMem, D: Doorbell> {
    channel: &'c Channel<M, D>,
    rx: Guard<'c, RxState<M>>,
    /// `None` once consumed.
    source: Option<Source>,
}

impl<M: RingMem, D: Doorbell> core::fmt::Debug for RecvGuard<'_, M, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RecvGuard")
            .field("packet", &self.meta())
            .finish_non_exhaustive()
    }
}

impl<M: RingMem, D: Doorbell> RecvGuard<'_, M, D> {
    /// The packet's type, transaction id and lengths.
    pub fn meta(&self) -> Received {
        match &self.source {
            Some(Source::Ring(info)) => Received::from_info(info),
            #[cfg(feature = "alloc")]
            Some(Source::Queued(meta)) => *meta,
            None => Received {
                packet_type: PacketType::InBand,
                transaction_id: 0,
                completion_requested: false,
                header_len: 0,
                payload_len: 0,
            },
        }
    }

    /// Copies `buf.len()` bytes of the header (`header`) or payload at `offset` into `buf`.
    fn read(&mut self, header: bool, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError> {
        let out_of_bounds = ChannelError::OutOfBounds {
            offset,
            len: buf.len(),
            size: 0,
        };
        match &self.source {
            Some(Source::Ring(info)) => match self.rx.reader.packet(info) {
                Some(p) if header => p.read_header(offset, buf),
                Some(p) => p.read_payload(offset, buf),
                None => return Err(out_of_bounds),
            }
            .map_err(|e| self.channel.read_error(e)),
            None => Err(out_of_bounds),
            #[cfg(feature = "alloc")]
            Some(Source::Queued(meta)) => {
                let data = self.rx.queue.front().map_or(&[][..], |(_, d)| d);
                let (start, size) = if header {
                    (0, meta.header_len)
                } else {
                    (meta.header_len, meta.payload_len)
                };
                copy_region(data, start, size, offset, buf)
            }
        }
    }

    /// Copies part of the payload into `buf`.
    pub fn read_payload(&mut self, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError> {
        self.read(false, offset, buf)
    }

    /// Copies the whole extra header (GPA ranges, transfer pages) into `scratch` once,
    /// validates that copy and returns it: the bytes returned are exactly the bytes that
    /// were checked, whatever the peer writes to the ring meanwhile. A malformed header
    /// fails the channel; a `scratch` shorter than the header is
    /// [`ChannelError::BufferTooSmall`].
    pub fn header<'s>(&mut self, scratch: &'s mut [u8]) -> Result<&'s [u8], ChannelError> {
        let (channel, meta) = (self.channel, self.meta());
        validated_header(channel, &meta, scratch, |h| self.read(true, 0, h))
    }

    /// Copies a GPA-direct packet's header into `scratch` once and returns its ranges,
    /// validated in that copy (a malformed header fails the channel).
    /// [`ChannelError::NotGpaDirect`] for other packets.
    pub fn gpa_ranges<'s>(
        &mut self,
        scratch: &'s mut [u8],
    ) -> Result<crate::packet::GpaRanges<'s>, ChannelError> {
        let (channel, meta) = (self.channel, self.meta());
        validated_gpa_ranges(channel, &meta, scratch, |h| self.read(true, 0, h))
    }

    /// Consumes the packet and publishes the read index now, returning any doorbell error.
    pub fn commit(mut self) -> Result<(), ChannelError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), ChannelError> {
        match self.source.take() {
            None => Ok(()),
            Some(Source::Ring(info)) => {
                let meta = Received::from_info(&info);
                if self.rx.reader.packet(&info).is_some() {
                    self.channel.consume(&mut self.rx.reader, &info);
                    if meta.packet_type == PacketType::Completion {
                        self.channel.txns.release_polled(meta.transaction_id);
                    }
                }
                self.channel.commit_rx(&mut self.rx)
            }
            #[cfg(feature = "alloc")]
            Some(Source::Queued(_)) => {
                self.rx.queue.pop();
                // Queue space freed: callers blocked on a full queue may go on.
                self.channel.hub.notify(&self.channel.doorbell);
                Ok(())
            }
        }
    }
}

impl<M: RingMem, D: Doorbell> Drop for RecvGuard<'_, M, D> {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

enum BatchSource<'a, 'r, M: RingMem> {
    Ring(&'a vmlink_ring::IncomingPacket<'r, M>),
    #[cfg(feature = "alloc")]
    Queued(&'a [u8]),
}

/// One packet of a receive batch, read in place.
pub struct BatchPacket<'a, 'r, M: RingMem> {
    meta: Received,
    source: BatchSource<'a, 'r, M>,
    channel: &'a dyn PacketSource,
}

impl<M: RingMem> core::fmt::Debug for BatchPacket<'_, '_, M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BatchPacket")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

impl<M: RingMem> BatchPacket<'_, '_, M> {
    /// The packet's type, transaction id and lengths.
    pub fn meta(&self) -> Received {
        self.meta
    }

    /// Copies part of the payload into `buf`.
    pub fn read_payload(&self, offset: usize, buf: &mut [u8]) -> Result<(), ChannelError> {
        match &self.source {
            BatchSource::Ring(p) => p
                .read_payload(offset, buf)
                .map_err(|e| self.channel.read_error(e)),
            #[cfg(feature = "alloc")]
            BatchSource::Queued(data) => {
                let start = self.meta.header_len;
                let size = self.meta.payload_len;
                copy_region(data, start, size, offset, buf)
            }
        }
    }

    fn copy_whole_header(&self, buf: &mut [u8]) -> Result<(), ChannelError> {
        match &self.source {
            BatchSource::Ring(p) => p
                .read_header(0, buf)
                .map_err(|e| self.channel.read_error(e)),
            #[cfg(feature = "alloc")]
            BatchSource::Queued(data) => copy_region(data, 0, self.meta.header_len, 0, buf),
        }
    }

    /// Copies the whole extra header into `scratch` once, validates that copy and returns
    /// it (see [`RecvGuard::header`]).
    pub fn header<'s>(&self, scratch: &'s mut [u8]) -> Result<&'s [u8], ChannelError> {
        validated_header(self.channel, &self.meta, scratch, |h| {
            self.copy_whole_header(h)
        })
    }

    /// A GPA-direct packet's ranges, validated in a copy of its header in `scratch` (see
    /// [`RecvGuard::gpa_ranges`]).
    pub fn gpa_ranges<'s>(
        &self,
        scratch: &'s mut [u8],
    ) -> Result<crate::packet::GpaRanges<'s>, ChannelError> {
        validated_gpa_ranges(self.channel, &self.meta, scratch, |h| {
            self.copy_whole_header(h)
        })
    }
}

// ---- waiting (std) ---------------------------------------------------------------------

#[cfg(feature = "std")]
fn remaining(deadline: Option<Instant>) -> Result<Option<Duration>, ChannelError> {
    match deadline {
        None => Ok(None),
        Some(d) => {
            let now = Instant::now();
            if now >= d {
                Err(ChannelError::TimedOut)
            } else {
                Ok(Some(d - now))
            }
        }
    }
}

#[cfg(feature = "std")]
fn min_timeout(a: Option<Duration>, b: Duration) -> Duration {
    a.map_or(b, |a| a.min(b))
}

#[cfg(feature = "std")]
impl<M: RingMem, D: Doorbell> Channel<M, D> {
    /// Waits for the hub to move past `seen`, up to the deadline (and at most `cap`).
    fn wait_event(
        &self,
        seen: u64,
        deadline: Option<Instant>,
        cap: Option<Duration>,
    ) -> Result<(), ChannelError> {
        let left = remaining(deadline)?;
        let timeout = match (left, cap) {
            (l, Some(c)) => Some(min_timeout(l, c)),
            (l, None) => l,
        };
        match self.hub.wait(&self.doorbell, seen, timeout) {
            Ok(true) => {
                bump(&self.counters.signals_received, 1);
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(DoorbellError::PeerClosed) => {
                self.mark_peer_closed();
                Ok(())
            }
            Err(e) => Err(self.fail(FailureCause::Doorbell(e))),
        }
    }

    /// Sends with flow control: when the ring is full, waits (pending send size and the
    /// doorbell, re-checking every `space_recheck`) until `deadline`.
    fn send_with(
        &self,
        header_len: usize,
        payload_len: usize,
        deadline: Option<Instant>,
        write: &mut dyn FnMut(&mut Writer<M>) -> Result<usize, WriteError>,
    ) -> Result<(), ChannelError> {
        loop {
            let seen = self.hub.generation();
            match self.try_send_with(write) {
                Err(ChannelError::Full) => {}
                other => return other,
            }
            if self.prepare_send_wait(header_len, payload_len)? == WaitDecision::Ready {
                continue;
            }
            self.wait_event(seen, deadline, Some(self.config.space_recheck))?;
        }
    }

    /// Sends an in-band packet that asks for no completion, waiting for space until
    /// `deadline` (`None`: as long as it takes).
    pub fn send(&self, payload: &[u8], deadline: Option<Instant>) -> Result<(), ChannelError> {
        self.send_packet(&OutgoingPacket::in_band(&[payload]), deadline)
    }

    /// Sends any packet, waiting for space until `deadline`.
    pub fn send_packet(
        &self,
        packet: &OutgoingPacket<'_>,
        deadline: Option<Instant>,
    ) -> Result<(), ChannelError> {
        let payload: usize = packet.payload.iter().map(|p| p.len()).sum();
        self.send_with(packet.header.len(), payload, deadline, &mut |w| {
            push_packet(w, packet)
        })
    }

    /// Sends a completion for `transaction_id`, waiting for space until `deadline`.
    pub fn complete(
        &self,
        transaction_id: u64,
        payload: &[u8],
        deadline: Option<Instant>,
    ) -> Result<(), ChannelError> {
        self.send_packet(&completion(transaction_id, &[payload]), deadline)
    }

    /// Writes a packet in place, waiting for space until `deadline`.
    pub fn send_in_place<R>(
        &self,
        meta: PacketMeta,
        header_len: usize,
        payload_len: usize,
        deadline: Option<Instant>,
        fill: impl FnOnce(&mut WriteSlot<'_, M>) -> R,
    ) -> Result<R, ChannelError> {
        self.send_in_place_until(
            meta,
            header_len,
            payload_len,
            Until::Deadline(deadline),
            fill,
        )
    }

    /// Sends a GPA-direct packet, waiting for space until `deadline`.
    ///
    /// ```
    /// use vmlink_channel::packet::GpaRange;
    /// use vmlink_channel::{Config, PacketMeta, in_process_channel_pair};
    ///
    /// let config = Config::default().with_gpa_page_limit(256);
    /// let (a, b) = in_process_channel_pair(4096, config)?;
    /// let pages = [10, 11];
    /// let ranges = [GpaRange { byte_offset: 512, byte_count: 6000, pages: &pages }];
    /// a.send_gpa_direct(&ranges, b"write", PacketMeta::in_band(), None)?;
    ///
    /// let mut guard = b.recv_in_place(None)?;
    /// let mut scratch = [0u8; 64];
    /// let range = guard.gpa_ranges(&mut scratch)?.next().expect("one range");
    /// assert_eq!(range.byte_count, 6000);
    /// assert_eq!(range.pages().collect::<Vec<_>>(), [10, 11]);
    /// # Ok::<(), vmlink_channel::ChannelError>(())
    /// ```
    pub fn send_gpa_direct(
        &self,
        ranges: &[GpaRange<'_>],
        payload: &[u8],
        meta: PacketMeta,
        deadline: Option<Instant>,
    ) -> Result<(), ChannelError> {
        self.send_gpa_direct_until(ranges, payload, meta, Until::Deadline(deadline))
    }

    /// Polling mode: looks at the ring up to `spin_iterations` times with interrupts
    /// masked, so the peer need not signal while we spin. Returns true when something
    /// arrived. If another thread of this channel waits (or may wait, see
    /// `external_waits`), interrupts are unmasked again before it returns (with a fence
    /// and a last look), so that thread is never left without signals, and anything that
    /// arrived unsignalled is announced; with nobody waiting they stay masked for the next
    /// spin.
    fn spin_for_data(&self, queued: bool) -> Result<bool, ChannelError> {
        if self.config.spin_iterations == 0 {
            return Ok(false);
        }
        {
            let mut rx = self.rx.lock();
            if !rx.spin_masked {
                rx.reader.mask_interrupts();
                rx.spin_masked = true;
            }
        }
        let mut found = false;
        // No backoff: a look reads the peer's write index, a cache line that stays shared
        // (costing no traffic) until the peer writes it, and a backoff of even 64 pause
        // instructions would add a microsecond to every wake-up.
        for i in 0..self.config.spin_iterations {
            core::hint::spin_loop();
            if let Some(mut rx) = self.rx.try_lock() {
                #[cfg(feature = "alloc")]
                if queued && !rx.queue.is_empty() {
                    found = true;
                    break;
                }
                if rx.reader.available().map_or(true, |n| n > 0) {
                    found = true;
                    break;
                }
            }
            // The state is an atomic; the doorbell's own check may be a system call, so
            // it is consulted only now and then.
            if self.state.load(Ordering::Acquire) != OPEN || (i % 64 == 63 && self.peer_gone()) {
                found = true;
                break;
            }
        }
        // Found something and nobody waits for a signal: leave the interrupts masked, so
        // the peer keeps not signalling while this channel polls. The generation moves
        // first, so a waiter that armed before we masked and registers after this looks
        // again and re-arms (`Hub::announce` explains the order).
        if found && !self.external_waits.load(Ordering::SeqCst) && !self.hub.announce() {
            return Ok(true);
        }
        let ready = {
            let mut rx = self.rx.lock();
            !self.arm_reader(&mut rx)?
        };
        if ready {
            // Other threads asleep in this channel may wait for what arrived unsignalled.
            self.hub.notify(&self.doorbell);
        }
        Ok(found || ready)
    }

    /// Waits until a receive may find something: spins first in polling mode, then arms
    /// the reader and sleeps until an event or the deadline. With `queued`, packets in the
    /// channel's queue count (receivers); without, only the ring does (callers, whose
    /// completions never wait in the queue).
    fn wait_ready(
        &self,
        seen: u64,
        deadline: Option<Instant>,
        queued: bool,
    ) -> Result<(), ChannelError> {
        remaining(deadline)?;
        // A departure the channel does not know of yet ends the doorbell wait below
        // (`Doorbell::wait` returns on a hang-up), so no doorbell question here.
        if self.spin_for_data(queued)? || self.known_gone() {
            return Ok(());
        }
        if self.prepare_wait_for(queued)? == WaitDecision::Ready {
            return Ok(());
        }
        bump(&self.counters.receive_sleeps, 1);
        self.wait_event(seen, deadline, None)
    }

    /// Receives one packet into `buf`, waiting until `deadline` (`None`: as long as it
    /// takes). [`ChannelError::Closed`] once the peer is gone and everything it committed
    /// has been received.
    pub fn recv(
        &self,
        buf: &mut [u8],
        deadline: Option<Instant>,
    ) -> Result<Received, ChannelError> {
        loop {
            let seen = self.hub.generation();
            // The wait asks the doorbell whether the peer left.
            if let Some(r) = self.try_recv_as(buf, Probe::State)? {
                return Ok(r);
            }
            self.wait_ready(seen, deadline, true)?;
        }
    }

    /// Receives the next packet in place, waiting until `deadline`.
    pub fn recv_in_place(
        &self,
        deadline: Option<Instant>,
    ) -> Result<RecvGuard<'_, M, D>, ChannelError> {
        loop {
            let seen = self.hub.generation();
            if let Some(g) = self.try_recv_in_place_as(Probe::State)? {
                return Ok(g);
            }
            self.wait_ready(seen, deadline, true)?;
        }
    }

    /// Receives batches in place until `each` has seen at least one packet, waiting until
    /// `deadline`; see [`try_recv_batch`](Self::try_recv_batch).
    pub fn recv_batch(
        &self,
        max: usize,
        deadline: Option<Instant>,
        mut each: impl FnMut(&BatchPacket<'_, '_, M>),
    ) -> Result<usize, ChannelError> {
        loop {
            let seen = self.hub.generation();
            let (n, _) = self.recv_batch_once(max, &mut each)?;
            if n > 0 {
                return Ok(n);
            }
            self.wait_ready(seen, deadline, true)?;
        }
    }

    /// Sends `request` (in-band, completion requested) and waits for its completion until
    /// `deadline`, copying the completion's payload into `response`. Returns the
    /// payload's length (padded to 8 bytes).
    ///
    /// Many calls may be in flight at once from different threads. Packets that arrive
    /// meanwhile for receivers wait in the channel's queue, completions for other calls in
    /// their slots. A call that times out keeps its transaction id reserved until the late
    /// completion arrives, which is then discarded and counted.
    ///
    /// A completion longer than `response` is consumed without being copied (the channel
    /// never holds more of a completion than its caller can take) and the call returns
    /// [`ChannelError::BufferTooSmall`] with its length: size `response` for the largest
    /// completion the peer may send.
    pub fn call(
        &self,
        request: &[u8],
        response: &mut [u8],
        deadline: Option<Instant>,
    ) -> Result<usize, ChannelError> {
        let mut txn = self.begin_call(response.len())?;
        // On error, dropping `txn` frees the id: the request never went out.
        self.send_packet(&request_packet(txn.tid, &[request]), deadline)?;
        txn.sent();
        loop {
            let seen = self.hub.generation();
            match self.call_step(&mut txn, response)? {
                CallStep::Done(len) => return Ok(len),
                CallStep::QueueFull => {
                    self.wait_event(seen, deadline, Some(self.config.space_recheck))?
                }
                CallStep::Idle => self.wait_ready(seen, deadline, false)?,
            }
        }
    }
}

/// What one round of a call found.
#[cfg(feature = "alloc")]
pub(crate) enum CallStep {
    /// The completion arrived: its payload length.
    Done(usize),
    /// The unsolicited-packet queue is full: wait for a receiver to take packets.
    QueueFull,
    /// The ring holds nothing more for now: wait for data.
    Idle,
}

/// A call in flight: frees or abandons its transaction id if the call ends without its
/// completion (an error, a timeout, a dropped future).
#[cfg(feature = "alloc")]
pub(crate) struct PendingCall<'c, M: RingMem, D: Doorbell> {
    channel: &'c Channel<M, D>,
    tid: u64,
    /// The id still needs freeing or abandoning.
    armed: bool,
    /// The request went out, so a completion may still come.
    sent: bool,
}

#[cfg(feature = "alloc")]
impl<M: RingMem, D: Doorbell> PendingCall<'_, M, D> {
    pub(crate) fn tid(&self) -> u64 {
        self.tid
    }

    /// The request went out: from now on a completion may come.
    pub(crate) fn sent(&mut self) {
        self.sent = true;
    }
}

#[cfg(feature = "alloc")]
impl<M: RingMem, D: Doorbell> Drop for PendingCall<'_, M, D> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if self.sent {
            // Keep the id until the late completion arrives.
            self.channel.txns.abandon(self.tid);
        } else {
            // Dropped before the request went out (e.g. a future cancelled while it waited
            // for space): nothing will complete it.
            self.channel.txns.free(self.tid);
        }
    }
}

#[cfg(feature = "alloc")]
impl<M: RingMem, D: Doorbell> Channel<M, D> {
    /// Reserves a transaction id for a call whose response buffer holds `capacity` bytes:
    /// the most of its completion the receive path will store.
    pub(crate) fn begin_call(
        &self,
        capacity: usize,
    ) -> Result<PendingCall<'_, M, D>, ChannelError> {
        self.check_send()?;
        let tid = self
            .txns
            .alloc(Mode::Waiting)
            .ok_or(ChannelError::TransactionsExhausted {
                capacity: MAX_TRANSACTIONS,
            })?;
        // Published before the request goes out, so before its completion can arrive.
        self.call_capacity[slot_index(tid)].store(capacity, Ordering::Release);
        Ok(PendingCall {
            channel: self,
            tid,
            armed: true,
            sent: false,
        })
    }

    /// One round of waiting for a call's completion: read the ring (completions to their
    /// slots, other packets to the queue), then take ours or arm for sleeping.
    pub(crate) fn call_step(
        &self,
        txn: &mut PendingCall<'_, M, D>,
        response: &mut [u8],
    ) -> Result<CallStep, ChannelError> {
        if let Some(e) = self.failed() {
            return Err(e);
        }
        // Waiting callers learn of a departure from their wait (which asks the doorbell).
        let gone = self.known_gone();
        let mut rx = self.rx.lock();
        if let Some(len) = self.take_completion(&mut rx, txn, response)? {
            return Ok(CallStep::Done(len));
        }
        let mut blocked = false;
        while let Some(info) = self.next_for_receiver(&mut rx)? {
            if !self.queue_packet(&mut rx, &info)? {
                blocked = true;
                break;
            }
        }
        self.commit_rx(&mut rx)?;
        if let Some(len) = self.take_completion(&mut rx, txn, response)? {
            return Ok(CallStep::Done(len));
        }
        if gone {
            return Err(ChannelError::Closed);
        }
        if blocked {
            return Ok(CallStep::QueueFull);
        }
        Ok(CallStep::Idle)
    }

    /// Copies a packet meant for a receiver into the queue (its header validated there).
    /// `Ok(false)` when the queue cannot take it now: it stays in the ring.
    fn queue_packet(&self, rx: &mut RxState<M>, info: &PacketInfo) -> Result<bool, ChannelError> {
        let RxState { reader, queue, .. } = rx;
        let queued = queue.push(Received::from_info(info), |slot| {
            self.take_into(reader, info, slot).map(drop)
        })?;
        if queued {
            self.hub.notify(&self.doorbell);
        }
        Ok(queued)
    }

    fn take_completion(
        &self,
        rx: &mut RxState<M>,
        txn: &mut PendingCall<'_, M, D>,
        response: &mut [u8],
    ) -> Result<Option<usize>, ChannelError> {
        if !self.txns.is_done(txn.tid) {
            return Ok(None);
        }
        let index = slot_index(txn.tid);
        let len = rx.stored_len[index];
        self.txns.free(txn.tid);
        txn.armed = false;
        // A completion longer than the caller's buffer was consumed without being stored.
        let stored = rx.stored[index]
            .get(..len)
            .filter(|_| len <= response.len());
        let Some(stored) = stored else {
            return Err(ChannelError::BufferTooSmall {
                needed: len,
                capacity: response.len(),
            });
        };
        response[..len].copy_from_slice(stored);
        Ok(Some(len))
    }
}

#[cfg(feature = "alloc")]
impl<M: RingMem, D: Doorbell> Channel<M, D> {
    pub(crate) fn generation(&self) -> u64 {
        self.hub.generation()
    }

    pub(crate) fn count_receive_sleep(&self) {
        bump(&self.counters.receive_sleeps, 1);
    }

    pub(crate) fn forget_waiter(&self) {
        self.hub.forget();
    }
}

#[cfg(feature = "alloc")]
impl<M: RingMem, D: crate::doorbell::AsyncDoorbell> Channel<M, D> {
    pub(crate) fn poll_event(
        &self,
        seen: u64,
        cx: &mut core::task::Context<'_>,
    ) -> core::task::Poll<Result<(), ChannelError>> {
        match self.hub.poll_wait(&self.doorbell, seen, cx) {
            core::task::Poll::Pending => core::task::Poll::Pending,
            core::task::Poll::Ready(Ok(signalled)) => {
                if signalled {
                    bump(&self.counters.signals_received, 1);
                }
                core::task::Poll::Ready(Ok(()))
            }
            core::task::Poll::Ready(Err(DoorbellError::PeerClosed)) => {
                self.mark_peer_closed();
                core::task::Poll::Ready(Ok(()))
            }
            core::task::Poll::Ready(Err(e)) => {
                core::task::Poll::Ready(Err(self.fail(FailureCause::Doorbell(e))))
            }
        }
    }
}
