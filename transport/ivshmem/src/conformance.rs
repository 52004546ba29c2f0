//! The channel conformance suite ([`vmlink_channel::conformance`]) between this process
//! (side A, the host) and a guest (side B), over the ivshmem memory.
//!
//! The suite wants a fresh pair per check, with the check's ring size, and every check
//! ends with side B waiting for side A to close. The memory holds one channel, and a guest
//! cannot see the host's channel close (QEMU tells it nothing), so the two sides agree on
//! both through a *mailbox*: the last page of the buffer area, as 64-bit words both sides
//! reach atomically. For each check the host zeroes both rings' control pages, posts the
//! check's index and a new sequence number; the guest builds its end over the first
//! `ring_data_len` bytes of each ring's data area ([`Shrunk`]) and answers ready; the host
//! builds its end and says go, and only then does side B start (a packet B sent before the
//! host's end read the ring's indices would look like a corrupt ring). Each end's doorbell ([`ClosingBell`]) writes the check's sequence
//! number into its side's "closed" word when it drops and rings the peer, and reports the
//! peer closed when the peer's word holds it. The guest posts each check's result.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vmlink_channel::conformance::{Check, End, PairFactory, Side, Started, run_side};
use vmlink_channel::{Channel, Doorbell, DoorbellError, EventFdDoorbell, RingRx, RingTx, Wake};
use vmlink_ring::{ControlWord, RingMem};
use vmlink_shm::{BufferArea, ShmRing};

use crate::channel::{BarRing, GuestDoorbell, guest_rings};
use crate::guest::{BarMap, Device};
use crate::{IvshmemError, PeerId, Server};

/// Mailbox word: the current check's index in [`Check::ALL`] (host).
const CHECK: usize = 0;
/// Mailbox word: the current check's sequence number, from 1 (host, written last).
const SEQ: usize = 1;
/// Mailbox word: the sequence number whose end the guest has built (guest).
const READY: usize = 2;
/// Mailbox word: the sequence number whose host end has closed (host).
const HOST_CLOSED: usize = 3;
/// Mailbox word: the sequence number whose guest end has closed (guest).
const GUEST_CLOSED: usize = 4;
/// Mailbox word: `2 * seq + ok` of the last check the guest finished (guest).
const RESULT: usize = 5;
/// Mailbox word: non-zero once the guest serves the mailbox (guest).
const HELLO: usize = 6;
/// Mailbox word: non-zero when the host has no more checks (host).
const DONE: usize = 7;
/// Mailbox word: the sequence number whose host end is built, so side B may start (host).
const GO: usize = 8;
/// Words in the mailbox.
const WORDS: usize = 9;

/// Memory both sides see as 64-bit words.
pub trait Words: Send + Sync + 'static {
    /// The words.
    fn words(&self) -> &[AtomicU64];
}

impl Words for BufferArea {
    fn words(&self) -> &[AtomicU64] {
        BufferArea::words(self)
    }
}

/// BAR2, as the guest maps it.
#[derive(Debug)]
pub struct BarWords(Arc<BarMap>);

impl Words for BarWords {
    fn words(&self) -> &[AtomicU64] {
        self.0.words()
    }
}

/// The mailbox: a few words at word index `at` of `words`.
#[derive(Debug)]
pub struct Mailbox<W> {
    words: W,
    at: usize,
}

impl<W: Words> Mailbox<W> {
    fn new(words: W, at: usize) -> Result<Self, IvshmemError> {
        if at + WORDS > words.words().len() {
            return Err(IvshmemError::OutOfBounds {
                offset: at * 8,
                len: WORDS * 8,
                size: words.words().len() * 8,
            });
        }
        Ok(Self { words, at })
    }

    fn load(&self, i: usize) -> u64 {
        self.words.words()[self.at + i].load(Ordering::SeqCst)
    }

    fn store(&self, i: usize, v: u64) {
        self.words.words()[self.at + i].store(v, Ordering::SeqCst)
    }
}

/// A ring over the first `data_len` bytes of another ring's data area (whole pages): a
/// smaller ring in the same place.
#[derive(Debug, Clone)]
pub struct Shrunk<M> {
    ring: M,
    data_len: usize,
}

impl<M: RingMem> Shrunk<M> {
    /// `ring` seen with `data_len` data bytes (at most its own).
    pub fn new(ring: M, data_len: usize) -> Self {
        let data_len = data_len.min(ring.data_len());
        Self { ring, data_len }
    }
}

impl<M: RingMem> RingMem for Shrunk<M> {
    fn data_len(&self) -> usize {
        self.data_len
    }
    fn load_control(&self, word: ControlWord) -> u32 {
        self.ring.load_control(word)
    }
    fn store_control(&self, word: ControlWord, value: u32) {
        self.ring.store_control(word, value)
    }
    fn read_data(&self, offset: usize, buf: &mut [u8]) {
        self.ring.read_data(offset, buf)
    }
    fn write_data(&self, offset: usize, data: &[u8]) {
        self.ring.write_data(offset, data)
    }
    fn read_data_words(&self, offset: usize, out: &mut [u64]) {
        self.ring.read_data_words(offset, out)
    }
    fn write_data_words(&self, offset: usize, words: &[u64]) {
        self.ring.write_data_words(offset, words)
    }
}

/// Resets a ring's control page to a fresh ring's: indices, mask and pending size zero,
/// feature bit 0 (pending send size honoured) set, as the host initialises it.
fn reset(ring: &impl RingMem) {
    for word in ControlWord::ALL {
        let value = u32::from(word == ControlWord::FeatureBits);
        ring.store_control(word, value);
    }
}

/// A doorbell that also tells the peer, through the mailbox, when its end closes, and
/// learns the same of the peer's end.
#[derive(Debug)]
pub struct ClosingBell<D: Doorbell, W: Words> {
    inner: D,
    mailbox: Arc<Mailbox<W>>,
    seq: u64,
    mine: usize,
    theirs: usize,
}

impl<D: Doorbell, W: Words> Doorbell for ClosingBell<D, W> {
    fn signal(&self) -> Result<(), DoorbellError> {
        self.inner.signal()
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<Wake, DoorbellError> {
        if self.peer_closed() {
            // A ring that raced the close is reported first.
            return match self.inner.wait(Some(Duration::ZERO)) {
                Ok(Wake::Signalled) => Ok(Wake::Signalled),
                Ok(Wake::TimedOut) | Err(DoorbellError::PeerClosed) => {
                    Err(DoorbellError::PeerClosed)
                }
                Err(e) => Err(e),
            };
        }
        self.inner.wait(timeout)
    }

    fn wake_local(&self) -> Result<(), DoorbellError> {
        self.inner.wake_local()
    }

    fn peer_closed(&self) -> bool {
        self.mailbox.load(self.theirs) == self.seq || self.inner.peer_closed()
    }
}

impl<D: Doorbell, W: Words> Drop for ClosingBell<D, W> {
    fn drop(&mut self) {
        self.mailbox.store(self.mine, self.seq);
        let _ = self.inner.signal();
    }
}

/// The host's bell in a check.
pub type HostBell = ClosingBell<EventFdDoorbell, BufferArea>;

/// Side A's pairs with the guest `peer` of `server`, whose init serves the mailbox
/// ([`run_guest_side`]).
#[derive(Debug)]
pub struct GuestPairs<'a> {
    server: &'a Server,
    peer: PeerId,
    mailbox: Arc<Mailbox<BufferArea>>,
    seq: std::cell::Cell<u64>,
    /// How long side A waits for the guest's end of each check, and for its result.
    pub timeout: Duration,
}

/// Polls `f` every millisecond until it is true or `timeout` passes.
fn until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl<'a> GuestPairs<'a> {
    /// Pairs with `peer`, once its guest serves the mailbox (waiting up to `hello`).
    pub fn new(server: &'a Server, peer: PeerId, hello: Duration) -> Result<Self, IvshmemError> {
        let buffer = server.memory().buffer();
        let at = buffer.words().len() - 512;
        let mailbox = Arc::new(Mailbox::new(buffer, at)?);
        if !until(hello, || mailbox.load(HELLO) != 0) {
            return Err(IvshmemError::Timeout {
                what: "the guest's conformance mailbox",
            });
        }
        Ok(Self {
            server,
            peer,
            mailbox,
            seq: std::cell::Cell::new(0),
            timeout: Duration::from_secs(60),
        })
    }

    /// Tells the guest there are no more checks.
    pub fn finish(&self) {
        self.mailbox.store(DONE, 1);
    }
}

impl Drop for GuestPairs<'_> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl PairFactory for GuestPairs<'_> {
    type Tx = RingTx<Shrunk<ShmRing>>;
    type Rx = RingRx<Shrunk<ShmRing>>;
    type Bell = HostBell;

    fn start(&self, check: Check) -> Started<Self::Tx, Self::Rx, HostBell> {
        let index = Check::ALL
            .iter()
            .position(|c| *c == check)
            .expect("a check of the suite");
        let memory = self.server.memory();
        let (h2g, g2h) = (memory.host_to_guest(), memory.guest_to_host());
        reset(&h2g);
        reset(&g2h);
        let seq = self.seq.get() + 1;
        self.seq.set(seq);
        self.mailbox.store(CHECK, index as u64);
        self.mailbox.store(SEQ, seq);
        assert!(
            until(self.timeout, || self.mailbox.load(READY) == seq),
            "the guest did not build its end of {}",
            check.name()
        );
        let (signal, hangup) = self
            .server
            .watch_peer(self.peer, 0)
            .expect("the guest is connected");
        let wait = self
            .server
            .local_vector(0)
            .and_then(|v| v.try_clone().map_err(IvshmemError::io("dup")))
            .expect("our vector 0");
        let bell = ClosingBell {
            inner: EventFdDoorbell::from_fds(wait, signal).with_hangup(hangup.into()),
            mailbox: self.mailbox.clone(),
            seq,
            mine: HOST_CLOSED,
            theirs: GUEST_CLOSED,
        };
        let len = check.ring_data_len();
        let (config, _) = check.configs();
        let channel = Channel::new(
            Shrunk::new(h2g.clone(), len),
            Shrunk::new(g2h, len),
            bell,
            config,
        )
        .unwrap_or_else(|e| {
            panic!(
                "a fresh pair for {}: {e:?}; guest->host write {} read {}, host->guest write {} read {}",
                check.name(),
                memory.guest_to_host().load_control(ControlWord::WriteIndex),
                memory.guest_to_host().load_control(ControlWord::ReadIndex),
                memory.host_to_guest().load_control(ControlWord::WriteIndex),
                memory.host_to_guest().load_control(ControlWord::ReadIndex),
            )
        });
        // Side B starts only now: what it sends before our end read the indices would
        // be taken for a corrupt ring.
        self.mailbox.store(GO, seq);
        let mailbox = self.mailbox.clone();
        let timeout = self.timeout;
        let name = check.name();
        Started {
            a: End::ring(
                channel,
                Box::new(move || h2g.store_control(ControlWord::WriteIndex, 13)),
            ),
            peer: Box::new(move || {
                let done = until(timeout, || mailbox.load(RESULT) >> 1 == seq);
                assert!(done, "the guest did not finish side B of {name}");
                assert_eq!(
                    mailbox.load(RESULT) & 1,
                    1,
                    "side B of {name} failed in the guest (see its console)"
                );
            }),
        }
    }
}

/// Side B in the guest: serves the host's checks through the mailbox until the host says
/// it is done, ringing the host through `bell` (leaked: it lives as long as the process).
/// `report` gets one line per check (`check name=... ok=0|1 ms=...`). Returns the number
/// of checks that failed.
pub fn run_guest_side(
    device: &Device,
    bell: &'static GuestDoorbell,
    report: &dyn Fn(&str),
) -> Result<usize, IvshmemError> {
    let header = device
        .header()
        .map_err(|e| IvshmemError::BadHeader(e.to_string()))?;
    let buffer = header.layout.buffer();
    let at = usize::try_from((buffer.offset + buffer.len) / 8).unwrap_or(usize::MAX) - 512;
    let mailbox = Arc::new(Mailbox::new(BarWords(device.memory_map()), at)?);
    mailbox.store(HELLO, 1);
    let (mut last, mut failed) = (0u64, 0usize);
    loop {
        let seq = mailbox.load(SEQ);
        if seq == last {
            if mailbox.load(DONE) != 0 {
                return Ok(failed);
            }
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        last = seq;
        let check = usize::try_from(mailbox.load(CHECK))
            .ok()
            .and_then(|i| Check::ALL.get(i).copied())
            .ok_or(IvshmemError::BadHeader("an unknown check".into()))?;
        let (out, inc): (BarRing, BarRing) = guest_rings(device)?;
        let len = check.ring_data_len();
        let doorbell = ClosingBell {
            inner: bell,
            mailbox: mailbox.clone(),
            seq,
            mine: GUEST_CLOSED,
            theirs: HOST_CLOSED,
        };
        let (_, config) = check.configs();
        let corrupt = out.clone();
        let channel = Channel::new(
            Shrunk::new(out, len),
            Shrunk::new(inc, len),
            doorbell,
            config,
        )?;
        mailbox.store(READY, seq);
        while mailbox.load(GO) != seq {
            if mailbox.load(DONE) != 0 {
                return Ok(failed);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let t = Instant::now();
        let end = End::ring(
            channel,
            Box::new(move || corrupt.store_control(ControlWord::WriteIndex, 13)),
        );
        let ok =
            std::panic::catch_unwind(AssertUnwindSafe(|| run_side(check, Side::B, end))).is_ok();
        failed += usize::from(!ok);
        report(&format!(
            "check name={} ok={} ms={}",
            check.name(),
            u8::from(ok),
            t.elapsed().as_millis()
        ));
        mailbox.store(RESULT, seq * 2 + u64::from(ok));
    }
}
