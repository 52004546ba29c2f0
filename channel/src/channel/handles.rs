//! The public handles: the shared [`Endpoint`], and the [`Sender`] and [`Receiver`] halves
//! [`Endpoint::split`] makes for two threads that need no lock between them. Every method
//! forwards to the operations written once in the other files of this module.

#[cfg(feature = "alloc")]
use alloc::sync::Arc;
#[cfg(feature = "alloc")]
use core::cell::RefCell;
#[cfg(feature = "std")]
use std::time::Instant;

use vmlink_ring::{OutgoingPacket, PacketMeta, RingMem, WaitDecision, WriteSlot};

#[cfg(feature = "alloc")]
use super::NoHalf;
use super::{
    ChannelState, Config, Core, Counters, Endpoint, Lock, Ops, Packet, RxState, SendBatch,
};
use crate::Channel;
#[cfg(feature = "alloc")]
use crate::doorbell::AsyncDoorbell;
use crate::doorbell::Doorbell;
use crate::error::ChannelError;
#[cfg(feature = "alloc")]
use crate::link::RingTx;
use crate::link::{PacketRx, PacketTx, Received};
use crate::packet::GpaRange;

impl<T: PacketTx, R: PacketRx, D: Doorbell> Endpoint<T, R, D> {
    /// An endpoint sending through `tx`, receiving through `rx`, signalling the peer and
    /// sleeping through `doorbell`.
    pub fn over(tx: T, rx: R, doorbell: D, config: Config) -> Self {
        Self {
            rx: Lock::new(RxState::new(rx, &config)),
            tx: Lock::new(tx),
            core: Core::new(doorbell, config),
        }
    }

    fn ops(&self) -> Ops<'_, D, Lock<T>, Lock<RxState<R>>> {
        Ops {
            core: &self.core,
            tx: &self.tx,
            rx: &self.rx,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.core.config
    }

    /// The doorbell.
    pub fn doorbell(&self) -> &D {
        &self.core.doorbell
    }

    /// The counters.
    pub fn counters(&self) -> Counters {
        self.core.counters()
    }

    /// Where the channel is in its life.
    pub fn state(&self) -> ChannelState {
        self.core.state()
    }

    /// The largest packet the sending half carries (descriptor, header, padded payload).
    pub fn max_packet_len(&self) -> usize {
        self.tx.lock().max_packet_len()
    }

    /// Transactions in flight (or reserved for a late completion).
    pub fn transactions_in_flight(&self) -> usize {
        self.core.txns.in_use()
    }

    /// Splits the endpoint into a [`Sender`] and a [`Receiver`] for two threads, one
    /// sending and one receiving, with no lock between them: each half is owned by its
    /// thread (`Send`, not `Sync`), so its operations take no lock and execute no locked
    /// instruction of their own. They share the doorbell, the state, the counters and the
    /// transaction table: a request started on the sender is completed through the
    /// receiver. What the endpoint had queued for receivers stays queued for the receiver.
    ///
    /// ```
    /// use std::thread;
    /// use vmlink_channel::{Config, in_process_channel_pair};
    ///
    /// let (a, b) = in_process_channel_pair(16 * 4096, Config::default())?;
    /// let (mut tx, _) = a.split();
    /// let (_, mut rx) = b.split();
    /// let producer = thread::spawn(move || {
    ///     for i in 0..1000u32 {
    ///         tx.send(&i.to_le_bytes(), None).unwrap();
    ///     }
    /// });
    /// let mut buf = [0u8; 8];
    /// for i in 0..1000u32 {
    ///     let got = rx.recv(&mut buf, None)?;
    ///     assert_eq!(got.payload(&buf)[..4], i.to_le_bytes());
    /// }
    /// producer.join().unwrap();
    /// # Ok::<(), vmlink_channel::ChannelError>(())
    /// ```
    #[cfg(feature = "alloc")]
    pub fn split(self) -> (Sender<T, D>, Receiver<R, D>) {
        let core = Arc::new(self.core);
        (
            Sender {
                core: Arc::clone(&core),
                tx: RefCell::new(self.tx.into_inner()),
            },
            Receiver {
                core,
                rx: RefCell::new(self.rx.into_inner()),
            },
        )
    }
}

/// The sending half of a split [`Endpoint`]: owned by one thread, no lock on its path.
///
/// Its methods are the endpoint's sending ones, taking `&mut self`. It moves to another
/// thread but is not shared between threads:
///
/// ```compile_fail
/// fn shared<T: Sync>() {}
/// type Half = vmlink_channel::Sender<
///     vmlink_channel::RingTx<std::sync::Arc<vmlink_ring::HeapMem>>,
///     vmlink_channel::InProcessDoorbell,
/// >;
/// shared::<Half>();
/// ```
#[cfg(feature = "alloc")]
pub struct Sender<T, D> {
    core: Arc<Core<D>>,
    tx: RefCell<T>,
}

/// The receiving half of a split [`Endpoint`]: owned by one thread, no lock on its path.
///
/// Its methods are the endpoint's receiving ones, taking `&mut self`.
#[cfg(feature = "alloc")]
pub struct Receiver<R, D> {
    core: Arc<Core<D>>,
    rx: RefCell<RxState<R>>,
}

#[cfg(feature = "alloc")]
impl<T: PacketTx, D: Doorbell> core::fmt::Debug for Sender<T, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Sender")
            .field("state", &self.core.state())
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "alloc")]
impl<R: PacketRx, D: Doorbell> core::fmt::Debug for Receiver<R, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Receiver")
            .field("state", &self.core.state())
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "alloc")]
impl<T: PacketTx, D: Doorbell> Sender<T, D> {
    fn ops(&self) -> Ops<'_, D, RefCell<T>, NoHalf> {
        Ops {
            core: &self.core,
            tx: &self.tx,
            rx: &NoHalf,
        }
    }

    /// The counters, shared with the receiver.
    pub fn counters(&self) -> Counters {
        self.core.counters()
    }

    /// Where the channel is in its life.
    pub fn state(&self) -> ChannelState {
        self.core.state()
    }

    /// The largest packet the sending half carries.
    pub fn max_packet_len(&self) -> usize {
        self.tx.borrow().max_packet_len()
    }

    /// Transactions in flight (or reserved for a late completion).
    pub fn transactions_in_flight(&self) -> usize {
        self.core.txns.in_use()
    }
}

#[cfg(feature = "alloc")]
impl<R: PacketRx, D: Doorbell> Receiver<R, D> {
    fn ops(&self) -> Ops<'_, D, NoHalf, RefCell<RxState<R>>> {
        Ops {
            core: &self.core,
            tx: &NoHalf,
            rx: &self.rx,
        }
    }

    /// The counters, shared with the sender.
    pub fn counters(&self) -> Counters {
        self.core.counters()
    }

    /// Where the channel is in its life.
    pub fn state(&self) -> ChannelState {
        self.core.state()
    }
}

impl<T: PacketTx, R: PacketRx, D: Doorbell> Endpoint<T, R, D> {
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
        self.ops().try_send(payload)
    }

    /// Sends any packet; never waits.
    pub fn try_send_packet(&self, packet: &OutgoingPacket<'_>) -> Result<(), ChannelError> {
        self.ops().try_send_packet(packet)
    }

    /// Sends a completion for `transaction_id`; never waits.
    pub fn try_complete(&self, transaction_id: u64, payload: &[u8]) -> Result<(), ChannelError> {
        self.ops().try_complete(transaction_id, payload)
    }

    /// Sends a GPA-direct packet: `ranges` describe where the bulk data is, `payload`
    /// travels in-band after them. Never waits.
    pub fn try_send_gpa_direct(
        &self,
        ranges: &[GpaRange<'_>],
        payload: &[u8],
        meta: PacketMeta,
    ) -> Result<(), ChannelError> {
        self.ops().try_send_gpa_direct(ranges, payload, meta)
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
    pub fn batch(&self) -> Result<SendBatch<'_, T, D>, ChannelError> {
        self.ops().batch()
    }

    /// Prepares to sleep until a packet with these sizes fits in the outgoing ring (sets
    /// the pending send size, fences, looks again); see
    /// [`prepare_recv_wait`](Self::prepare_recv_wait).
    pub fn prepare_send_wait(
        &self,
        header_len: usize,
        payload_len: usize,
    ) -> Result<WaitDecision, ChannelError> {
        self.ops().prepare_send_wait(header_len, payload_len)
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
        self.ops().mask_interrupts()
    }

    /// Prepares to sleep until a packet arrives, for callers that wait on the doorbell
    /// themselves (`no_std` code with its own idle loop): commits consumed packets,
    /// unmasks interrupts, fences and looks again. On [`WaitDecision::Sleep`] the peer
    /// will signal when it sends; wait with `self.doorbell().wait(..)`.
    pub fn prepare_recv_wait(&self) -> Result<WaitDecision, ChannelError> {
        self.ops().prepare_recv_wait()
    }

    /// Receives one packet into `buf` if one is there; never waits.
    ///
    /// `Ok(None)` when nothing is queued; [`ChannelError::Closed`] once the peer is gone
    /// and everything it committed has been received.
    pub fn try_recv(&self, buf: &mut [u8]) -> Result<Option<Received>, ChannelError> {
        self.ops().try_recv(buf)
    }

    /// Receives the next packet in place, if one is there, and hands it to `f`; never
    /// waits. `f` reads straight out of the link (nothing is copied but what it reads);
    /// the packet is consumed when `f` returns. The receiving half stays locked meanwhile.
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
    /// let last = b.try_recv_with(|packet| {
    ///     let mut last = [0u8; 4];
    ///     packet.read_payload(8188, &mut last).map(|()| last)
    /// })?;
    /// assert_eq!(last, Some(Ok([7; 4])));
    /// # Ok::<(), vmlink_channel::ChannelError>(())
    /// ```
    pub fn try_recv_with<X>(
        &self,
        f: impl FnOnce(&mut Packet<'_>) -> X,
    ) -> Result<Option<X>, ChannelError> {
        self.ops().try_recv_with(f)
    }

    /// Receives up to `max` packets in place under one lock and one commit (so the peer is
    /// signalled at most once), handing each to `each`. Returns how many were handled;
    /// never waits.
    pub fn try_recv_batch(
        &self,
        max: usize,
        each: impl FnMut(&mut Packet<'_>),
    ) -> Result<usize, ChannelError> {
        self.ops().try_recv_batch(max, each)
    }

    #[cfg(feature = "std")]
    /// Sends an in-band packet that asks for no completion, waiting for space until
    /// `deadline` (`None`: as long as it takes).
    pub fn send(&self, payload: &[u8], deadline: Option<Instant>) -> Result<(), ChannelError> {
        self.ops().send(payload, deadline)
    }

    #[cfg(feature = "std")]
    /// Sends any packet, waiting for space until `deadline`.
    pub fn send_packet(
        &self,
        packet: &OutgoingPacket<'_>,
        deadline: Option<Instant>,
    ) -> Result<(), ChannelError> {
        self.ops().send_packet(packet, deadline)
    }

    #[cfg(feature = "std")]
    /// Sends a completion for `transaction_id`, waiting for space until `deadline`.
    pub fn complete(
        &self,
        transaction_id: u64,
        payload: &[u8],
        deadline: Option<Instant>,
    ) -> Result<(), ChannelError> {
        self.ops().complete(transaction_id, payload, deadline)
    }

    #[cfg(feature = "std")]
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
    /// let pages = b.recv_with(None, |packet| {
    ///     let mut scratch = [0u8; 64];
    ///     let range = packet.gpa_ranges(&mut scratch)?.next().expect("one range");
    ///     assert_eq!(range.byte_count, 6000);
    ///     Ok::<_, vmlink_channel::ChannelError>(range.pages().collect::<Vec<_>>())
    /// })??;
    /// assert_eq!(pages, [10, 11]);
    /// # Ok::<(), vmlink_channel::ChannelError>(())
    /// ```
    pub fn send_gpa_direct(
        &self,
        ranges: &[GpaRange<'_>],
        payload: &[u8],
        meta: PacketMeta,
        deadline: Option<Instant>,
    ) -> Result<(), ChannelError> {
        self.ops().send_gpa_direct(ranges, payload, meta, deadline)
    }

    #[cfg(feature = "std")]
    /// Receives one packet into `buf`, waiting until `deadline` (`None`: as long as it
    /// takes). [`ChannelError::Closed`] once the peer is gone and everything it committed
    /// has been received.
    pub fn recv(
        &self,
        buf: &mut [u8],
        deadline: Option<Instant>,
    ) -> Result<Received, ChannelError> {
        self.ops().recv(buf, deadline)
    }

    #[cfg(feature = "std")]
    /// Receives the next packet in place, waiting until `deadline`, and hands it to `f`;
    /// see [`try_recv_with`](Self::try_recv_with).
    pub fn recv_with<X>(
        &self,
        deadline: Option<Instant>,
        f: impl FnOnce(&mut Packet<'_>) -> X,
    ) -> Result<X, ChannelError> {
        self.ops().recv_with(deadline, f)
    }

    #[cfg(feature = "std")]
    /// Receives batches in place until `each` has seen at least one packet, waiting until
    /// `deadline`; see [`try_recv_batch`](Self::try_recv_batch).
    pub fn recv_batch(
        &self,
        max: usize,
        deadline: Option<Instant>,
        each: impl FnMut(&mut Packet<'_>),
    ) -> Result<usize, ChannelError> {
        self.ops().recv_batch(max, deadline, each)
    }

    #[cfg(feature = "std")]
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
        self.ops().call(request, response, deadline)
    }

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
        self.ops().try_start_request(request)
    }
}

#[cfg(feature = "alloc")]
impl<T: PacketTx, R: PacketRx, D: AsyncDoorbell> Endpoint<T, R, D> {
    #[cfg(feature = "alloc")]
    /// Receives one packet into `buf`, waiting asynchronously.
    /// [`ChannelError::Closed`] once the peer is gone and everything it committed has been
    /// received.
    pub async fn recv_async(&self, buf: &mut [u8]) -> Result<Received, ChannelError> {
        self.ops().recv_async(buf).await
    }

    #[cfg(feature = "alloc")]
    /// Sends any packet, waiting asynchronously for space.
    pub async fn send_packet_async(&self, packet: &OutgoingPacket<'_>) -> Result<(), ChannelError> {
        self.ops().send_packet_async(packet).await
    }

    #[cfg(feature = "alloc")]
    /// Sends an in-band packet that asks for no completion, waiting asynchronously for
    /// space.
    pub async fn send_async(&self, payload: &[u8]) -> Result<(), ChannelError> {
        self.ops().send_async(payload).await
    }

    #[cfg(feature = "alloc")]
    /// Sends a completion for `transaction_id`, waiting asynchronously for space.
    pub async fn complete_async(
        &self,
        transaction_id: u64,
        payload: &[u8],
    ) -> Result<(), ChannelError> {
        self.ops().complete_async(transaction_id, payload).await
    }

    #[cfg(feature = "alloc")]
    /// Sends `request` and waits asynchronously for its completion, copying its payload
    /// into `response`; see [`call`](Self::call). Dropping the future abandons the call:
    /// its transaction id stays reserved until the late completion arrives.
    pub async fn call_async(
        &self,
        request: &[u8],
        response: &mut [u8],
    ) -> Result<usize, ChannelError> {
        self.ops().call_async(request, response).await
    }
}

impl<M: RingMem, D: Doorbell> Channel<M, D> {
    /// Writes a packet in place: reserves `header_len` bytes of extra header and
    /// `payload_len` bytes of payload, lets `fill` write them, and publishes. Never waits.
    pub fn try_send_in_place<X>(
        &self,
        meta: PacketMeta,
        header_len: usize,
        payload_len: usize,
        fill: impl FnOnce(&mut WriteSlot<'_, M>) -> X,
    ) -> Result<X, ChannelError> {
        self.ops()
            .try_send_in_place(meta, header_len, payload_len, fill)
    }

    #[cfg(feature = "std")]
    /// Writes a packet in place, waiting for space until `deadline`.
    pub fn send_in_place<X>(
        &self,
        meta: PacketMeta,
        header_len: usize,
        payload_len: usize,
        deadline: Option<Instant>,
        fill: impl FnOnce(&mut WriteSlot<'_, M>) -> X,
    ) -> Result<X, ChannelError> {
        self.ops()
            .send_in_place(meta, header_len, payload_len, deadline, fill)
    }
}

#[cfg(feature = "alloc")]
impl<T: PacketTx, D: Doorbell> Sender<T, D> {
    /// [`Endpoint::try_send`], on this half alone.
    pub fn try_send(&mut self, payload: &[u8]) -> Result<(), ChannelError> {
        self.ops().try_send(payload)
    }

    /// [`Endpoint::try_send_packet`], on this half alone.
    pub fn try_send_packet(&mut self, packet: &OutgoingPacket<'_>) -> Result<(), ChannelError> {
        self.ops().try_send_packet(packet)
    }

    /// [`Endpoint::try_complete`], on this half alone.
    pub fn try_complete(
        &mut self,
        transaction_id: u64,
        payload: &[u8],
    ) -> Result<(), ChannelError> {
        self.ops().try_complete(transaction_id, payload)
    }

    /// [`Endpoint::try_send_gpa_direct`], on this half alone.
    pub fn try_send_gpa_direct(
        &mut self,
        ranges: &[GpaRange<'_>],
        payload: &[u8],
        meta: PacketMeta,
    ) -> Result<(), ChannelError> {
        self.ops().try_send_gpa_direct(ranges, payload, meta)
    }

    /// [`Endpoint::batch`], on this half alone.
    pub fn batch(
        &mut self,
    ) -> Result<SendBatch<'_, T, D, core::cell::RefMut<'_, T>>, ChannelError> {
        self.ops().batch()
    }

    /// [`Endpoint::prepare_send_wait`], on this half alone.
    pub fn prepare_send_wait(
        &mut self,
        header_len: usize,
        payload_len: usize,
    ) -> Result<WaitDecision, ChannelError> {
        self.ops().prepare_send_wait(header_len, payload_len)
    }

    #[cfg(feature = "std")]
    /// [`Endpoint::send`], on this half alone.
    pub fn send(&mut self, payload: &[u8], deadline: Option<Instant>) -> Result<(), ChannelError> {
        self.ops().send(payload, deadline)
    }

    #[cfg(feature = "std")]
    /// [`Endpoint::send_packet`], on this half alone.
    pub fn send_packet(
        &mut self,
        packet: &OutgoingPacket<'_>,
        deadline: Option<Instant>,
    ) -> Result<(), ChannelError> {
        self.ops().send_packet(packet, deadline)
    }

    #[cfg(feature = "std")]
    /// [`Endpoint::complete`], on this half alone.
    pub fn complete(
        &mut self,
        transaction_id: u64,
        payload: &[u8],
        deadline: Option<Instant>,
    ) -> Result<(), ChannelError> {
        self.ops().complete(transaction_id, payload, deadline)
    }

    #[cfg(feature = "std")]
    /// [`Endpoint::send_gpa_direct`], on this half alone.
    pub fn send_gpa_direct(
        &mut self,
        ranges: &[GpaRange<'_>],
        payload: &[u8],
        meta: PacketMeta,
        deadline: Option<Instant>,
    ) -> Result<(), ChannelError> {
        self.ops().send_gpa_direct(ranges, payload, meta, deadline)
    }

    /// [`Endpoint::try_start_request`], on this half alone.
    pub fn try_start_request(&mut self, request: &[u8]) -> Result<u64, ChannelError> {
        self.ops().try_start_request(request)
    }
}

#[cfg(feature = "alloc")]
impl<T: PacketTx, D: AsyncDoorbell> Sender<T, D> {
    #[cfg(feature = "alloc")]
    /// [`Endpoint::send_packet_async`], on this half alone.
    pub async fn send_packet_async(
        &mut self,
        packet: &OutgoingPacket<'_>,
    ) -> Result<(), ChannelError> {
        self.ops().send_packet_async(packet).await
    }

    #[cfg(feature = "alloc")]
    /// [`Endpoint::send_async`], on this half alone.
    pub async fn send_async(&mut self, payload: &[u8]) -> Result<(), ChannelError> {
        self.ops().send_async(payload).await
    }

    #[cfg(feature = "alloc")]
    /// [`Endpoint::complete_async`], on this half alone.
    pub async fn complete_async(
        &mut self,
        transaction_id: u64,
        payload: &[u8],
    ) -> Result<(), ChannelError> {
        self.ops().complete_async(transaction_id, payload).await
    }
}

#[cfg(feature = "alloc")]
impl<M: RingMem, D: Doorbell> Sender<RingTx<M>, D> {
    /// [`Endpoint::try_send_in_place`], on this half alone.
    pub fn try_send_in_place<X>(
        &mut self,
        meta: PacketMeta,
        header_len: usize,
        payload_len: usize,
        fill: impl FnOnce(&mut WriteSlot<'_, M>) -> X,
    ) -> Result<X, ChannelError> {
        self.ops()
            .try_send_in_place(meta, header_len, payload_len, fill)
    }

    #[cfg(feature = "std")]
    /// [`Endpoint::send_in_place`], on this half alone.
    pub fn send_in_place<X>(
        &mut self,
        meta: PacketMeta,
        header_len: usize,
        payload_len: usize,
        deadline: Option<Instant>,
        fill: impl FnOnce(&mut WriteSlot<'_, M>) -> X,
    ) -> Result<X, ChannelError> {
        self.ops()
            .send_in_place(meta, header_len, payload_len, deadline, fill)
    }
}

#[cfg(feature = "alloc")]
impl<R: PacketRx, D: Doorbell> Receiver<R, D> {
    /// [`Endpoint::mask_interrupts`], on this half alone.
    pub fn mask_interrupts(&mut self) {
        self.ops().mask_interrupts()
    }

    /// [`Endpoint::prepare_recv_wait`], on this half alone.
    pub fn prepare_recv_wait(&mut self) -> Result<WaitDecision, ChannelError> {
        self.ops().prepare_recv_wait()
    }

    /// [`Endpoint::try_recv`], on this half alone.
    pub fn try_recv(&mut self, buf: &mut [u8]) -> Result<Option<Received>, ChannelError> {
        self.ops().try_recv(buf)
    }

    /// [`Endpoint::try_recv_with`], on this half alone.
    pub fn try_recv_with<X>(
        &mut self,
        f: impl FnOnce(&mut Packet<'_>) -> X,
    ) -> Result<Option<X>, ChannelError> {
        self.ops().try_recv_with(f)
    }

    /// [`Endpoint::try_recv_batch`], on this half alone.
    pub fn try_recv_batch(
        &mut self,
        max: usize,
        each: impl FnMut(&mut Packet<'_>),
    ) -> Result<usize, ChannelError> {
        self.ops().try_recv_batch(max, each)
    }

    #[cfg(feature = "std")]
    /// [`Endpoint::recv`], on this half alone.
    pub fn recv(
        &mut self,
        buf: &mut [u8],
        deadline: Option<Instant>,
    ) -> Result<Received, ChannelError> {
        self.ops().recv(buf, deadline)
    }

    #[cfg(feature = "std")]
    /// [`Endpoint::recv_with`], on this half alone.
    pub fn recv_with<X>(
        &mut self,
        deadline: Option<Instant>,
        f: impl FnOnce(&mut Packet<'_>) -> X,
    ) -> Result<X, ChannelError> {
        self.ops().recv_with(deadline, f)
    }

    #[cfg(feature = "std")]
    /// [`Endpoint::recv_batch`], on this half alone.
    pub fn recv_batch(
        &mut self,
        max: usize,
        deadline: Option<Instant>,
        each: impl FnMut(&mut Packet<'_>),
    ) -> Result<usize, ChannelError> {
        self.ops().recv_batch(max, deadline, each)
    }
}

#[cfg(feature = "alloc")]
impl<R: PacketRx, D: AsyncDoorbell> Receiver<R, D> {
    #[cfg(feature = "alloc")]
    /// [`Endpoint::recv_async`], on this half alone.
    pub async fn recv_async(&mut self, buf: &mut [u8]) -> Result<Received, ChannelError> {
        self.ops().recv_async(buf).await
    }
}
