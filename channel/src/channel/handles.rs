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
    ChannelState, Config, Core, Counters, Endpoint, Lock, Ops, Packet, RxState, SendBatch, Wait,
    boxed, completion,
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
            core: boxed(Core::new(doorbell, config)),
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

    /// Makes this channel's spinning waits (the spin before a blocking send or receive
    /// sleeps, and polling mode's looks) give their CPU away every `looks` looks
    /// (`sched_yield(2)`), or never with 0, the default.
    ///
    /// A spinning thread keeps its CPU until the scheduler preempts it, milliseconds
    /// later; a thread that shares that CPU and has work meanwhile waits. Where waiters
    /// share CPUs with busy threads (more busy threads than CPUs, such as a guest beside
    /// the host's I/O thread on a small machine), a yield every few looks lets them run
    /// while the waiter has nothing to do. With nobody else to run a yield returns at
    /// once, but it is a system call: the peer's answer is seen up to one yield later, so
    /// a waiter with a CPU of its own should not yield.
    ///
    /// It belongs to where this process's threads run, so it is neither part of the
    /// [`Config`] nor of a saved endpoint: a successor sets it for its own threads.
    ///
    /// ```
    /// use vmlink_channel::{Config, in_process_channel_pair};
    ///
    /// let (a, _b) = in_process_channel_pair(4096, Config::default())?;
    /// assert_eq!(a.spin_yield(), 0);
    /// a.set_spin_yield(16);
    /// assert_eq!(a.spin_yield(), 16);
    /// # Ok::<(), vmlink_channel::ChannelError>(())
    /// ```
    #[cfg(feature = "std")]
    pub fn set_spin_yield(&self, looks: u32) {
        self.core
            .spin_yield
            .store(looks, core::sync::atomic::Ordering::Relaxed);
    }

    /// Every how many looks a spinning wait yields its CPU (0: never); see
    /// [`set_spin_yield`](Self::set_spin_yield).
    #[cfg(feature = "std")]
    pub fn spin_yield(&self) -> u32 {
        self.core
            .spin_yield
            .load(core::sync::atomic::Ordering::Relaxed)
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
        self.core.live.txns.in_use()
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
        let core = self.core;
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
    pub(super) core: Arc<Core<D>>,
    tx: RefCell<T>,
}

/// The receiving half of a split [`Endpoint`]: owned by one thread, no lock on its path.
///
/// Its methods are the endpoint's receiving ones, taking `&mut self`.
#[cfg(feature = "alloc")]
pub struct Receiver<R, D> {
    pub(super) core: Arc<Core<D>>,
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
        self.core.live.txns.in_use()
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

/// The sending operations, on the endpoint (`&self`) and on a [`Sender`] (`&mut self`).
macro_rules! send_ops {
    ($recv:ty) => {
        /// Sends an in-band packet that asks for no completion.
        ///
        /// Sends do not ask the doorbell whether the peer is still there (that may be a
        /// system call): until the channel has learnt of a departure, a packet may land in
        /// a ring nobody reads, as it would had the peer left just after it. A send that
        /// finds the ring full asks (the first after a send went out, then every 64th, so
        /// a sender that keeps trying pays the question rarely), and says
        /// [`ChannelError::Closed`] rather than `Full` once the peer has gone.
        ///
        /// ```
        /// use vmlink_channel::{ChannelError, Config, Wait, in_process_channel_pair};
        ///
        /// let (a, b) = in_process_channel_pair(4096, Config::default())?;
        /// a.send(b"hello", Wait::Now)?;
        /// let mut buf = [0u8; 16];
        /// let got = b.recv(&mut buf, Wait::Now)?;
        /// assert_eq!(&got.payload(&buf)[..5], b"hello");
        /// assert_eq!(b.recv(&mut buf, Wait::Now), Err(ChannelError::Empty));
        /// // A full ring is an error for a send that may not wait.
        /// while a.send(&[0; 1000], Wait::Now).is_ok() {}
        /// assert_eq!(a.send(&[0; 1000], Wait::Now), Err(ChannelError::Full));
        /// # Ok::<(), ChannelError>(())
        /// ```
        pub fn send(
            self: $recv,
            payload: &[u8],
            wait: impl Into<Wait>,
        ) -> Result<(), ChannelError> {
            self.send_packet(&OutgoingPacket::in_band_slice(payload), wait)
        }

        /// Sends any packet.
        pub fn send_packet(
            self: $recv,
            packet: &OutgoingPacket<'_>,
            wait: impl Into<Wait>,
        ) -> Result<(), ChannelError> {
            let (h, p) = (packet.header.len(), packet.payload.len());
            self.ops()
                .send_until(h, p, wait.into(), &mut |w| w.push(packet))
        }

        /// Sends a completion for `transaction_id`.
        pub fn complete(
            self: $recv,
            transaction_id: u64,
            payload: &[u8],
            wait: impl Into<Wait>,
        ) -> Result<(), ChannelError> {
            self.send_packet(&completion(transaction_id, &[payload]), wait)
        }

        /// Sends a GPA-direct packet: `ranges` describe where the bulk data is, `payload`
        /// travels in-band after them. A link that cannot carry guest pages refuses with
        /// [`ChannelError::Unsupported`].
        ///
        /// ```
        /// use vmlink_channel::packet::GpaRange;
        /// use vmlink_channel::{Config, PacketMeta, Wait, in_process_channel_pair};
        ///
        /// let config = Config::default().with_gpa_page_limit(256);
        /// let (a, b) = in_process_channel_pair(4096, config)?;
        /// let pages = [10, 11];
        /// let ranges = [GpaRange { byte_offset: 512, byte_count: 6000, pages: &pages }];
        /// a.send_gpa_direct(&ranges, b"write", PacketMeta::in_band(), Wait::Forever)?;
        ///
        /// let pages = b.recv_with(Wait::Forever, |packet| {
        ///     let mut scratch = [0u8; 64];
        ///     let range = packet.gpa_ranges(&mut scratch)?.next().expect("one range");
        ///     assert_eq!(range.byte_count, 6000);
        ///     Ok::<_, vmlink_channel::ChannelError>(range.pages().collect::<Vec<_>>())
        /// })??;
        /// assert_eq!(pages, [10, 11]);
        /// # Ok::<(), vmlink_channel::ChannelError>(())
        /// ```
        pub fn send_gpa_direct(
            self: $recv,
            ranges: &[GpaRange<'_>],
            payload: &[u8],
            meta: PacketMeta,
            wait: impl Into<Wait>,
        ) -> Result<(), ChannelError> {
            self.ops()
                .send_gpa_direct_until(ranges, payload, meta, wait.into())
        }

        /// Sends a request whose completion comes back through the receive calls (as a
        /// packet of type [`PacketType`](crate::PacketType)`::Completion` with the returned
        /// transaction id): for code that polls, or that receives on another thread. With
        /// `std`, [`Endpoint::call`] waits for the completion itself.
        ///
        /// ```
        /// use vmlink_channel::{Config, PacketType, Wait, in_process_channel_pair};
        ///
        /// let (a, b) = in_process_channel_pair(4096, Config::default())?;
        /// let tid = a.start_request(b"status?", Wait::Now)?;
        /// let mut buf = [0u8; 64];
        /// let request = b.recv(&mut buf, Wait::Now)?;
        /// assert!(request.completion_requested);
        /// b.complete(request.transaction_id, b"ok", Wait::Now)?;
        /// let completion = a.recv(&mut buf, Wait::Now)?;
        /// assert_eq!((completion.packet_type, completion.transaction_id), (PacketType::Completion, tid));
        /// # Ok::<(), vmlink_channel::ChannelError>(())
        /// ```
        pub fn start_request(
            self: $recv,
            request: &[u8],
            wait: impl Into<Wait>,
        ) -> Result<u64, ChannelError> {
            self.ops().start_request(request, wait.into())
        }

        /// Sends a GPA-direct request (`ranges` name the bulk data, `payload` travels
        /// in-band after them) whose completion comes back through the receive calls, as
        /// with [`start_request`](Self::start_request): the way a block device's guest
        /// keeps many requests in flight. A link that cannot carry guest pages refuses
        /// with [`ChannelError::Unsupported`] and no id stays reserved.
        ///
        /// ```
        /// use vmlink_channel::packet::GpaRange;
        /// use vmlink_channel::{Config, PacketType, Wait, in_process_channel_pair};
        ///
        /// let config = Config::default().with_gpa_page_limit(64);
        /// let (guest, host) = in_process_channel_pair(4096, config)?;
        /// let pages = [3];
        /// let ranges = [GpaRange { byte_offset: 0, byte_count: 4096, pages: &pages }];
        /// let tid = guest.start_gpa_request(&ranges, b"read", Wait::Now)?;
        ///
        /// let request = host.recv_with(Wait::Now, |packet| {
        ///     let mut scratch = [0u8; 64];
        ///     let page = packet.gpa_ranges(&mut scratch)?.next().unwrap().pages().next();
        ///     Ok::<_, vmlink_channel::ChannelError>((packet.meta().transaction_id, page))
        /// })??;
        /// assert_eq!(request, (tid, Some(3)));
        /// host.complete(tid, b"done", Wait::Now)?;
        /// let mut buf = [0u8; 16];
        /// let done = guest.recv(&mut buf, Wait::Now)?;
        /// assert_eq!((done.packet_type, done.transaction_id), (PacketType::Completion, tid));
        /// # Ok::<(), vmlink_channel::ChannelError>(())
        /// ```
        pub fn start_gpa_request(
            self: $recv,
            ranges: &[GpaRange<'_>],
            payload: &[u8],
            wait: impl Into<Wait>,
        ) -> Result<u64, ChannelError> {
            self.ops().start_gpa_request(ranges, payload, wait.into())
        }

        /// Prepares to sleep until a packet with these sizes fits in the outgoing ring (sets
        /// the pending send size, fences, looks again), for code that waits on the doorbell
        /// itself; see [`Endpoint::prepare_recv_wait`].
        pub fn prepare_send_wait(
            self: $recv,
            header_len: usize,
            payload_len: usize,
        ) -> Result<WaitDecision, ChannelError> {
            self.ops().prepare_send_wait(header_len, payload_len)
        }
    };
}

/// The async twins of the sending operations.
#[cfg(feature = "alloc")]
macro_rules! send_ops_async {
    ($recv:ty) => {
        /// [`send`](Self::send), waiting asynchronously for space.
        pub async fn send_async(self: $recv, payload: &[u8]) -> Result<(), ChannelError> {
            self.send_packet_async(&OutgoingPacket::in_band_slice(payload))
                .await
        }

        /// [`send_packet`](Self::send_packet), waiting asynchronously for space.
        pub async fn send_packet_async(
            self: $recv,
            packet: &OutgoingPacket<'_>,
        ) -> Result<(), ChannelError> {
            self.ops().send_packet_async(packet).await
        }

        /// [`complete`](Self::complete), waiting asynchronously for space.
        pub async fn complete_async(
            self: $recv,
            transaction_id: u64,
            payload: &[u8],
        ) -> Result<(), ChannelError> {
            self.send_packet_async(&completion(transaction_id, &[payload]))
                .await
        }

        /// [`send_gpa_direct`](Self::send_gpa_direct), waiting asynchronously for space.
        pub async fn send_gpa_direct_async(
            self: $recv,
            ranges: &[GpaRange<'_>],
            payload: &[u8],
            meta: PacketMeta,
        ) -> Result<(), ChannelError> {
            self.ops()
                .send_gpa_direct_async(ranges, payload, meta)
                .await
        }

        /// [`start_request`](Self::start_request), waiting asynchronously for space.
        pub async fn start_request_async(self: $recv, request: &[u8]) -> Result<u64, ChannelError> {
            self.ops().start_request_async(request).await
        }

        /// [`start_gpa_request`](Self::start_gpa_request), waiting asynchronously for space.
        pub async fn start_gpa_request_async(
            self: $recv,
            ranges: &[GpaRange<'_>],
            payload: &[u8],
        ) -> Result<u64, ChannelError> {
            self.ops().start_gpa_request_async(ranges, payload).await
        }
    };
}

/// The in-place send over a ring, and its async twin.
macro_rules! ring_send_ops {
    ($recv:ty) => {
        /// Writes a packet in place: reserves `header_len` bytes of extra header and
        /// `payload_len` bytes of payload in the ring, lets `fill` write them, and
        /// publishes.
        ///
        /// ```
        /// use vmlink_channel::{Config, PacketMeta, Wait, in_process_channel_pair};
        ///
        /// let (a, b) = in_process_channel_pair(4 * 4096, Config::default())?;
        /// // Fill a packet in place: no intermediate buffer.
        /// a.send_in_place(PacketMeta::in_band(), 0, 8192, Wait::Now, |slot| {
        ///     for chunk in 0..8 {
        ///         slot.write_payload(chunk * 1024, &[chunk as u8; 1024]).unwrap();
        ///     }
        /// })?;
        /// // Read just the part needed, straight out of the ring.
        /// let last = b.recv_with(Wait::Now, |packet| {
        ///     let mut last = [0u8; 4];
        ///     packet.read_payload(8188, &mut last).map(|()| last)
        /// })?;
        /// assert_eq!(last, Ok([7; 4]));
        /// # Ok::<(), vmlink_channel::ChannelError>(())
        /// ```
        pub fn send_in_place<X>(
            self: $recv,
            meta: PacketMeta,
            header_len: usize,
            payload_len: usize,
            wait: impl Into<Wait>,
            fill: impl FnOnce(&mut WriteSlot<'_, M>) -> X,
        ) -> Result<X, ChannelError> {
            self.ops()
                .send_in_place_until(meta, header_len, payload_len, wait.into(), fill)
        }
    };
}

/// The receiving operations, on the endpoint (`&self`) and on a [`Receiver`] (`&mut self`).
macro_rules! recv_ops {
    ($recv:ty) => {
        /// Receives one packet into `buf` (its extra header, then its payload).
        ///
        /// [`ChannelError::Closed`] once the peer is gone and everything it committed has
        /// been received; with [`Wait::Now`], [`ChannelError::Empty`] when nothing is there.
        /// A receive that does not wait learns of a departure the channel has not yet seen
        /// by asking the doorbell (maybe a system call) when it finds nothing: the first
        /// time after a packet arrived, then every 64th time, so a receiver that polls pays
        /// the question rarely and still sees `Closed` within 64 empty looks.
        pub fn recv(
            self: $recv,
            buf: &mut [u8],
            wait: impl Into<Wait>,
        ) -> Result<Received, ChannelError> {
            match wait.into() {
                Wait::Now => self.ops().try_recv(buf)?.ok_or(ChannelError::Empty),
                #[cfg(feature = "std")]
                w => self.ops().recv(buf, w.deadline().unwrap_or(None)),
            }
        }

        /// Receives the next packet in place and hands it to `f`. `f` reads straight out
        /// of the link (nothing is copied but what it reads); the packet is consumed when
        /// `f` returns. The receiving half stays locked meanwhile.
        ///
        /// A header that `f` finds malformed fails the channel: the receive returns that
        /// failure, though `f` ran.
        pub fn recv_with<X>(
            self: $recv,
            wait: impl Into<Wait>,
            f: impl FnOnce(&mut Packet<'_>) -> X,
        ) -> Result<X, ChannelError> {
            match wait.into() {
                Wait::Now => self.ops().try_recv_with(f)?.ok_or(ChannelError::Empty),
                #[cfg(feature = "std")]
                w => self.ops().recv_with(w.deadline().unwrap_or(None), f),
            }
        }

        /// Receives up to `max` packets in place under one lock and one commit (so the
        /// peer is signalled at most once), handing each to `each`; returns how many. It
        /// waits (as `wait` allows) until there is at least one; with [`Wait::Now`] it
        /// returns 0 when there is none (a count, not [`ChannelError::Empty`]).
        ///
        /// ```
        /// use vmlink_channel::{Config, Wait, in_process_channel_pair};
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
        /// let n = b.recv_batch(64, Wait::Now, |packet| {
        ///     let mut first = [0u8; 1];
        ///     packet.read_payload(0, &mut first).unwrap();
        ///     sum += u32::from(first[0]);
        /// })?;
        /// assert_eq!((n, sum), (10, 45));
        /// # Ok::<(), vmlink_channel::ChannelError>(())
        /// ```
        pub fn recv_batch(
            self: $recv,
            max: usize,
            wait: impl Into<Wait>,
            each: impl FnMut(&mut Packet<'_>),
        ) -> Result<usize, ChannelError> {
            match wait.into() {
                Wait::Now => self.ops().try_recv_batch(max, each),
                #[cfg(feature = "std")]
                w => self
                    .ops()
                    .recv_batch(max, w.deadline().unwrap_or(None), each),
            }
        }

        /// Asks the peer not to signal for new data: for a receiver that polls with
        /// [`Wait::Now`]. [`prepare_recv_wait`](Self::prepare_recv_wait) (and every receive
        /// that goes to sleep) unmasks again, with the fence and re-check that keep a
        /// wake-up from being lost.
        ///
        /// ```
        /// use vmlink_channel::{Config, Wait, in_process_channel_pair};
        ///
        /// let (a, b) = in_process_channel_pair(4096, Config::default())?;
        /// b.mask_interrupts();
        /// a.send(b"x", Wait::Now)?;
        /// assert_eq!(a.counters().signals_sent, 0, "a masked receiver is not signalled");
        /// # Ok::<(), vmlink_channel::ChannelError>(())
        /// ```
        pub fn mask_interrupts(self: $recv) {
            self.ops().mask_interrupts()
        }

        /// Prepares to sleep until a packet arrives, for code that waits on the doorbell
        /// itself (`no_std` code with its own idle loop): commits consumed packets,
        /// unmasks interrupts, fences and looks again. On [`WaitDecision::Sleep`] the peer
        /// will signal when it sends; then wait on the doorbell.
        pub fn prepare_recv_wait(self: $recv) -> Result<WaitDecision, ChannelError> {
            self.ops().prepare_recv_wait()
        }
    };
}

/// The async twins of the receiving operations.
#[cfg(feature = "alloc")]
macro_rules! recv_ops_async {
    ($recv:ty) => {
        /// [`recv`](Self::recv), waiting asynchronously.
        pub async fn recv_async(self: $recv, buf: &mut [u8]) -> Result<Received, ChannelError> {
            self.ops().recv_async(buf).await
        }

        /// [`recv_with`](Self::recv_with), waiting asynchronously.
        pub async fn recv_with_async<X>(
            self: $recv,
            f: impl FnOnce(&mut Packet<'_>) -> X,
        ) -> Result<X, ChannelError> {
            self.ops().recv_with_async(f).await
        }

        /// [`recv_batch`](Self::recv_batch), waiting asynchronously.
        pub async fn recv_batch_async(
            self: $recv,
            max: usize,
            each: impl FnMut(&mut Packet<'_>),
        ) -> Result<usize, ChannelError> {
            self.ops().recv_batch_async(max, each).await
        }
    };
}

impl<T: PacketTx, R: PacketRx, D: Doorbell> Endpoint<T, R, D> {
    send_ops!(&Self);
    recv_ops!(&Self);

    /// Starts a batch: packets pushed to it are published together by one commit, which
    /// signals the peer at most once. The sending half stays locked while the batch
    /// lives; a batch dropped without [`SendBatch::commit`] is discarded.
    pub fn batch(&self) -> Result<SendBatch<'_, T, D>, ChannelError> {
        self.ops().batch()
    }

    /// Sends `request` (in-band, completion requested) and waits for its completion,
    /// copying the completion's payload into `response`. Returns the payload's length
    /// (padded to 8 bytes).
    ///
    /// Many calls may be in flight at once from different threads. Packets that arrive
    /// meanwhile for receivers wait in the channel's queue, completions for other calls in
    /// their slots. A call that gives up (its deadline passed; with [`Wait::Now`], at once
    /// if the completion is not there) keeps its transaction id reserved until the late
    /// completion arrives, which is then discarded and counted.
    ///
    /// A completion longer than `response` is consumed without being copied (the channel
    /// never holds more of a completion than its caller can take) and the call returns
    /// [`ChannelError::BufferTooSmall`] with its length: size `response` for the largest
    /// completion the peer may send.
    #[cfg(feature = "std")]
    pub fn call(
        &self,
        request: &[u8],
        response: &mut [u8],
        wait: impl Into<Wait>,
    ) -> Result<usize, ChannelError> {
        let deadline = wait
            .into()
            .deadline()
            .unwrap_or_else(|()| Some(Instant::now()));
        self.ops().call(request, response, deadline)
    }
}

#[cfg(feature = "alloc")]
impl<T: PacketTx, R: PacketRx, D: AsyncDoorbell> Endpoint<T, R, D> {
    send_ops_async!(&Self);
    recv_ops_async!(&Self);

    /// [`call`](Self::call), waiting asynchronously. Dropping the future abandons the
    /// call: its transaction id stays reserved until the late completion arrives.
    pub async fn call_async(
        &self,
        request: &[u8],
        response: &mut [u8],
    ) -> Result<usize, ChannelError> {
        self.ops().call_async(request, response).await
    }
}

impl<M: RingMem, D: Doorbell> Channel<M, D> {
    ring_send_ops!(&Self);
}

#[cfg(feature = "alloc")]
impl<T: PacketTx, D: Doorbell> Sender<T, D> {
    send_ops!(&mut Self);

    /// Starts a batch; see [`Endpoint::batch`].
    pub fn batch(
        &mut self,
    ) -> Result<SendBatch<'_, T, D, core::cell::RefMut<'_, T>>, ChannelError> {
        self.ops().batch()
    }
}

#[cfg(feature = "alloc")]
impl<T: PacketTx, D: AsyncDoorbell> Sender<T, D> {
    send_ops_async!(&mut Self);
}

#[cfg(feature = "alloc")]
impl<M: RingMem, D: Doorbell> Sender<RingTx<M>, D> {
    ring_send_ops!(&mut Self);
}

#[cfg(feature = "alloc")]
impl<R: PacketRx, D: Doorbell> Receiver<R, D> {
    recv_ops!(&mut Self);
}

#[cfg(feature = "alloc")]
impl<R: PacketRx, D: AsyncDoorbell> Receiver<R, D> {
    recv_ops_async!(&mut Self);
}
