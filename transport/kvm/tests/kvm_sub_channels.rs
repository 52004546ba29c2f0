//! Sub-channels with the real KVM guest: the bare-metal guest (`../guest`, modes 7..=9,
//! `guest/src/sub.rs`) asks over its primary channel for two sub-channels whose rings it
//! allocated; the host validates them, gives each its own doorbell (its own MMIO address
//! for an ioeventfd, its own GSI for an irqfd), registers them and answers with the offer
//! (`vmlink_kvm::sub_channel`); both sides attach and stream on all three channels, every
//! byte checked, each channel served on the host by a thread of its own.
//!
//! - `three_channels_carry_their_traffic`: every packet each way on every channel, each
//!   channel's doorbell rung at its own address and woken on its own eventfd, each irqfd
//!   raising its own GSI.
//! - `a_corrupted_sub_channel_fails_alone`: the guest writes garbage into sub-channel 2's
//!   write index; that channel fails on the host with a ring error after exactly the good
//!   packets, the host closes it to the guest, and the other two finish their traffic.
//! - `guest_closes_a_sub_channel`: the guest closes sub-channel 1 after some packets; the
//!   host's side receives exactly those, then sees it closed, and answers the close once
//!   its thread is done; the other two finish.
//! - `host_closes_a_sub_channel`: the host closes sub-channel 2 after some packets; the
//!   guest receives everything the host sent before, then sees it closed; the other two
//!   finish.
//! - `host_offers_fewer_than_asked`: the host offers one sub-channel of the two asked; the
//!   guest attaches that one only, and both channels carry all their traffic.
//!
//! Prints `SKIPPED: <reason>` where `/dev/kvm` is unusable, unless `VMLINK_REQUIRE_KVM=1`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmlink_channel::{
    ChannelError, ChannelSet, Config, Doorbell, FailureCause, PacketType, Polled, Wait,
};
use vmlink_kvm::sub_channel::{self, Message, OfferEntry, Status};
use vmlink_kvm::test_vm::{
    CONTROL, DONE, DOORBELL, GSI, MAILBOX, MAILBOX_MAGIC, PANIC, TestVm, build_guest, kvm_or_skip,
    pic_irr, watchdog,
};
use vmlink_kvm::{
    ChannelSetup, HostChannel, KvmDoorbell, RingPages, check_setups, host_channel,
    host_sub_channels,
};
use vmlink_ring::{RingError, WaitDecision};

/// The guest's modes (see `guest/src/sub.rs`).
const MODE_SUB: u64 = 7;
const MODE_SUB_CORRUPT: u64 = 8;
const MODE_SUB_CLOSE: u64 = 9;
/// Sub-channels the guest asks for.
const SUB_COUNT: usize = 2;
const CHANNELS: usize = SUB_COUNT + 1;
/// Data packets each way on every channel.
const SUB_PACKETS: u32 = 20_000;
/// Where the guest (mode 8, 9) or the host stops on the channel it breaks or closes.
const SUB_STOP_AT: u32 = 1_000;
/// The host sends at most this many data packets ahead of those it received.
const WINDOW: u32 = 256;
/// Sub-channel `i`'s doorbell: MMIO `SUB_DOORBELL + 0x1000 × (i − 1)`, GSI `GSI + i`.
const SUB_DOORBELL: u64 = 0x3000_2000;

const KIND_DATA: u32 = 1;
const KIND_END: u32 = 2;
const KIND_SUMMARY: u32 = 3;
/// The guest's summary: how each channel ended.
const OPEN: u64 = 0;
const CLOSED_BY_HOST: u64 = 1;
const CLOSED_BY_GUEST: u64 = 2;
const CORRUPTED: u64 = 3;

/// One VM at a time: each boots a vCPU and three host threads on a 2-CPU machine.
static SERIAL: Mutex<()> = Mutex::new(());

/// Byte `i` of data packet `seq` on channel `chan` (the guest's `sub_pattern`).
fn sub_pattern(chan: u32, seq: u32, i: usize) -> u8 {
    (seq.wrapping_mul(7) as usize)
        .wrapping_add(i.wrapping_mul(13))
        .wrapping_add(chan as usize * 101) as u8
}

fn sub_doorbell(chan: usize) -> (u64, u32) {
    (SUB_DOORBELL + 0x1000 * (chan as u64 - 1), GSI + chan as u32)
}

/// How a host thread's channel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ending {
    /// All traffic both ways.
    Finished,
    /// The guest closed it (the endpoint said `Closed` after its last packet).
    PeerClosed,
    /// The endpoint failed.
    Failed(FailureCause),
    /// The host closed it after receiving what it was told to.
    ClosedByHost,
    /// The host did not offer it.
    NotOffered,
}

/// What the host saw on one channel.
#[derive(Debug)]
struct ChannelReport {
    /// Guest packets checked, every byte.
    received: u32,
    /// Data packets the host sent.
    sent: u32,
    ending: Ending,
    /// Waits the channel's ioeventfd ended.
    wakes: u64,
    /// A ring was left in the ioeventfd at the end (the host, busy, never waited after it).
    pending: bool,
    /// Its irqfd raised its GSI in the PIC (None: the channel was closed).
    irq: Option<bool>,
}

/// A packet on the primary that is not stream data: negotiation or the guest's summary.
struct Other {
    packet_type: PacketType,
    tid: u64,
    completion_requested: bool,
    payload: Vec<u8>,
}

/// One channel's traffic as the host sees it.
struct HostStream {
    chan: u32,
    rng: u64,
    sent: u32,
    pending_len: usize,
    end_sent: bool,
    send_closed: bool,
    received: u32,
    /// Stop (the host closes the channel) after receiving this many.
    stop_at: Option<u32>,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl HostStream {
    fn new(chan: u32, stop_at: Option<u32>) -> Self {
        Self {
            chan,
            rng: 0x9e37_79b9_7f4a_7c15 ^ (u64::from(chan) << 32),
            sent: 0,
            pending_len: 0,
            end_sent: false,
            send_closed: false,
            received: 0,
            stop_at,
            buf: vec![0; 4096],
            out: vec![0; 4096],
        }
    }

    fn finished(&self) -> bool {
        self.end_sent && self.received == SUB_PACKETS
    }

    fn stop_due(&self) -> bool {
        self.stop_at == Some(self.received)
    }

    /// One pass: send what fits, then receive and check everything there is (other
    /// packets go to `others`). `Ok(progress)`, or how the channel ended.
    fn step(
        &mut self,
        channel: &HostChannel<'_, &KvmDoorbell>,
        others: &mut Vec<Other>,
    ) -> Result<bool, Ending> {
        let mut progress = false;
        while !self.end_sent && !self.send_closed {
            let seq = self.sent;
            // Keep pace with the guest, so a channel closed or broken part way is part way
            // in both directions.
            if seq < SUB_PACKETS && seq >= self.received + WINDOW {
                break;
            }
            let len = if seq == SUB_PACKETS {
                self.out[0..4].copy_from_slice(&KIND_END.to_le_bytes());
                16
            } else {
                if self.pending_len == 0 {
                    self.rng ^= self.rng << 13;
                    self.rng ^= self.rng >> 7;
                    self.rng ^= self.rng << 17;
                    self.pending_len = 16 + (self.rng % 1500) as usize;
                }
                self.out[0..4].copy_from_slice(&KIND_DATA.to_le_bytes());
                self.pending_len
            };
            self.out[4..8].copy_from_slice(&seq.to_le_bytes());
            self.out[8..12].copy_from_slice(&(len as u32).to_le_bytes());
            self.out[12..16].copy_from_slice(&self.chan.to_le_bytes());
            for (i, b) in self.out[16..len].iter_mut().enumerate() {
                *b = sub_pattern(self.chan, seq, i + 16);
            }
            match channel.send(&self.out[..len], Wait::Now) {
                Ok(()) => {
                    progress = true;
                    self.pending_len = 0;
                    if seq == SUB_PACKETS {
                        self.end_sent = true;
                    } else {
                        self.sent += 1;
                    }
                }
                Err(ChannelError::Full) => break,
                // The receive below drains what the guest committed, then says so.
                Err(ChannelError::Closed) => self.send_closed = true,
                Err(ChannelError::Failed(cause)) => return Err(Ending::Failed(cause)),
                Err(e) => panic!("channel {}: sending: {e}", self.chan),
            }
        }
        while !self.stop_due() {
            let r = match channel.recv(&mut self.buf, Wait::Now).polled() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(ChannelError::Closed) => return Err(Ending::PeerClosed),
                Err(ChannelError::Failed(cause)) => return Err(Ending::Failed(cause)),
                Err(e) => panic!("channel {}: receiving: {e}", self.chan),
            };
            progress = true;
            let p = r.payload(&self.buf);
            let kind = u32::from_le_bytes(p[0..4].try_into().unwrap());
            if kind != KIND_DATA {
                assert_eq!(self.chan, 0, "only the primary carries other messages");
                others.push(Other {
                    packet_type: r.packet_type,
                    tid: r.transaction_id,
                    completion_requested: r.completion_requested,
                    payload: p.to_vec(),
                });
                continue;
            }
            let seq = u32::from_le_bytes(p[4..8].try_into().unwrap());
            let len = u32::from_le_bytes(p[8..12].try_into().unwrap()) as usize;
            let chan = u32::from_le_bytes(p[12..16].try_into().unwrap());
            assert_eq!(r.packet_type, PacketType::InBand);
            assert_eq!(
                (chan, seq),
                (self.chan, self.received),
                "channel {}: guest packets in order, each on its channel",
                self.chan
            );
            assert!(
                len <= p.len() && p.len() - len < 8,
                "channel {}: packet {seq}: length {len} in a payload of {}",
                self.chan,
                p.len()
            );
            if let Some(i) = (16..len).find(|&i| p[i] != sub_pattern(chan, seq, i)) {
                panic!("channel {}: packet {seq}: byte {i} is wrong", self.chan);
            }
            self.received += 1;
        }
        Ok(progress)
    }
}

/// Sleeps on the channel's doorbell after a spell of polling that found nothing.
struct Idle(u32);

impl Idle {
    fn after(&mut self, progress: bool, channel: &HostChannel<'_, &KvmDoorbell>) {
        if progress {
            self.0 = 0;
        } else if self.0 < 2000 {
            self.0 += 1;
            std::hint::spin_loop();
        } else {
            self.0 = 0;
            // Until the guest rings (or a short timeout: a full ring may have room by then,
            // and the guest signals only data, never space).
            if channel.prepare_recv_wait() == Ok(WaitDecision::Sleep) {
                let _ = channel.doorbell().wait(Some(Duration::from_millis(2)));
            }
        }
    }
}

/// What a sub-channel's thread tells the primary's.
enum Event {
    /// Its channel failed: close it to the guest.
    Failed(usize),
    /// The host closed it: tell the guest.
    HostClosed(usize),
}

/// Serves sub-channel `chan` on this thread to its end.
fn serve_sub(
    chan: usize,
    channel: HostChannel<'_, &KvmDoorbell>,
    stop_at: Option<u32>,
    events: mpsc::Sender<Event>,
    done: &AtomicBool,
) -> ChannelReport {
    let mut stream = HostStream::new(chan as u32, stop_at);
    let mut idle = Idle(0);
    let mut others = Vec::new();
    let ending = loop {
        match stream.step(&channel, &mut others) {
            Ok(progress) => {
                if stream.finished() {
                    break Ending::Finished;
                }
                if stream.stop_due() {
                    break Ending::ClosedByHost;
                }
                idle.after(progress, &channel);
            }
            Err(ending) => break ending,
        }
    };
    let wakes = channel.doorbell().wakes();
    let pending = channel.doorbell().ioevent_fd().drain().unwrap_or(false);
    // The host no longer touches the rings once the endpoint is gone.
    drop(channel);
    done.store(true, Ordering::SeqCst);
    match ending {
        Ending::Failed(_) => events.send(Event::Failed(chan)).unwrap(),
        Ending::ClosedByHost => events.send(Event::HostClosed(chan)).unwrap(),
        _ => {}
    }
    ChannelReport {
        received: stream.received,
        sent: stream.sent,
        ending,
        wakes,
        pending,
        irq: None,
    }
}

/// What a run gave.
#[derive(Debug)]
struct Run {
    /// Per channel, the primary first.
    reports: Vec<ChannelReport>,
    /// The guest's summary: [kind, offered, close answered, then per channel: sent, host
    /// packets checked, end seen, errors, first error, doorbells rung, how it ended].
    summary: Vec<u64>,
    /// The offer the host made.
    offer: Vec<OfferEntry>,
    /// Doorbell writes that reached userspace (no ioeventfd caught them), per channel.
    missed: [u64; CHANNELS],
    exits: u64,
    elapsed: Duration,
}

impl Run {
    /// Channel `chan`'s summary words: (sent, host packets checked, end seen, errors,
    /// first error, doorbells rung, how it ended).
    fn guest(&self, chan: usize) -> [u64; 7] {
        self.summary[3 + 7 * chan..10 + 7 * chan]
            .try_into()
            .unwrap()
    }

    fn print(&self, what: &str) {
        println!(
            "{what}: {:?}, {} exits to userspace, offer {:?}",
            self.elapsed,
            self.exits,
            self.offer.iter().map(|e| e.status).collect::<Vec<_>>()
        );
        for (chan, r) in self.reports.iter().enumerate() {
            let g = self.guest(chan);
            println!(
                "  channel {chan}: guest->host {} sent / {} checked by the host; host->guest {} sent / {} checked by the guest; guest doorbells {} at its own address, host eventfd wakes {}{}, missed {}; irqfd {:?}; host {:?}, guest {}",
                g[0],
                r.received,
                r.sent,
                g[1],
                g[5],
                r.wakes,
                if r.pending { " (+1 left pending)" } else { "" },
                self.missed[chan],
                r.irq,
                r.ending,
                ["open", "closed by host", "closed by guest", "corrupted"][g[6] as usize]
            );
        }
    }

    /// Channel `chan` carried all its traffic both ways, every byte checked by both sides,
    /// its doorbell rung and woken.
    fn assert_complete(&self, chan: usize) {
        let (r, g) = (&self.reports[chan], self.guest(chan));
        let all = u64::from(SUB_PACKETS);
        assert_eq!(r.ending, Ending::Finished, "channel {chan}");
        assert_eq!(
            (u64::from(r.received), u64::from(r.sent)),
            (all, all),
            "channel {chan}: host counts"
        );
        assert_eq!(
            g,
            [all, all, 1, 0, 0, g[5], OPEN],
            "channel {chan}: the guest sent and checked everything, without error"
        );
        self.assert_own_doorbell(chan, true);
    }

    /// The guest rang channel `chan`'s own doorbell address (the one the offer gave it: a
    /// write anywhere else would exit to userspace and fail the run), every ring went
    /// through an ioeventfd, and, where nothing but the guest rings it (`guest_only`), the
    /// host's eventfd for this channel saw rings (woke a wait, or held one at the end).
    fn assert_own_doorbell(&self, chan: usize, guest_only: bool) {
        let (r, g) = (&self.reports[chan], self.guest(chan));
        assert!(g[5] > 0, "channel {chan}: the guest rang its doorbell");
        assert_eq!(
            self.missed[chan], 0,
            "channel {chan}: every ring went through its ioeventfd"
        );
        if guest_only {
            assert!(
                r.wakes > 0 || r.pending,
                "channel {chan}: the host's eventfd for it was rung"
            );
        }
    }
}

/// Reads the primary's page list from the guest's mailbox.
fn mailbox_pages(mem: &GuestMemoryMmap) -> (usize, Vec<u64>) {
    let magic: u64 = mem.read_obj(GuestAddress(MAILBOX)).unwrap();
    assert_eq!(magic, MAILBOX_MAGIC);
    let g2h: u64 = mem.read_obj(GuestAddress(MAILBOX + 8)).unwrap();
    let total: u64 = mem.read_obj(GuestAddress(MAILBOX + 16)).unwrap();
    let pages = (0..total.min(64))
        .map(|i| mem.read_obj(GuestAddress(MAILBOX + 24 + 8 * i)).unwrap())
        .collect();
    (g2h as usize, pages)
}

/// Whether `bell`'s irqfd raises its own GSI in the PIC, and only that: the line was
/// low before, it is latched after (the guest runs with interrupts off, so the pulse stays
/// in the request register), and no other line came up.
fn irq_raises(vm: &VmFd, bell: &KvmDoorbell) -> bool {
    let bit = 1u8 << bell.gsi();
    let before = pic_irr(vm);
    if before & bit != 0 {
        return false;
    }
    bell.signal().unwrap();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        let now = pic_irr(vm);
        if now & bit != 0 {
            return now & !before == bit;
        }
        thread::sleep(Duration::from_millis(1));
    }
    false
}

/// What the host does.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// The most sub-channels it offers.
    max_subs: usize,
    /// A sub-channel it closes after receiving that many packets.
    stop: Option<(usize, u32)>,
}

impl Plan {
    const ALL: Self = Self {
        max_subs: SUB_COUNT,
        stop: None,
    };
}

/// The host's side: the primary channel, the negotiation, a thread per sub-channel.
fn serve(
    mem: &GuestMemoryMmap,
    vm: &VmFd,
    bell0: &KvmDoorbell,
    ready: mpsc::Receiver<()>,
    plan: Plan,
) -> (Vec<ChannelReport>, Vec<u64>, Vec<OfferEntry>) {
    ready.recv().expect("the guest's mailbox");
    let (g2h, pages) = mailbox_pages(mem);
    // SAFETY: `mem` is the `TestVm`'s mapping, which outlives this function (the VM and
    // its vCPU are dropped first); the host touches ring pages only through the rings and
    // reads only the mailbox through vm-memory.
    let rings0 = unsafe { RingPages::new(mem, &pages, g2h) }.expect("valid page list");
    let primary = host_channel(&rings0, bell0, Config::default()).expect("host channel");

    // The guest asks: the first packet on the primary.
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(20);
    let r = primary
        .recv(&mut buf, Wait::Until(deadline))
        .expect("the guest's request");
    assert!(r.completion_requested);
    let Ok(Message::Request(request)) = sub_channel::parse(r.payload(&buf)) else {
        panic!("not a sub-channel request")
    };
    let tid = r.transaction_id;

    // The host offers: each asked sub-channel validated, checked against the primary and
    // those offered before it, given its own doorbell, registered.
    let mut offered: Vec<(RingPages<'_>, KvmDoorbell)> = Vec::new();
    // The sub-channel number (its place in the request) of each offered one.
    let mut chans = Vec::new();
    let mut registrations = Vec::new();
    let mut entries = Vec::new();
    for chan in 1..=request.count() {
        if offered.len() == plan.max_subs {
            entries.push(OfferEntry::refused(Status::NotOffered));
            continue;
        }
        let pages = request.pages(chan).expect("in the request");
        // SAFETY: as for the primary's rings.
        let rings = match unsafe { RingPages::new(mem, &pages, request.guest_to_host()) } {
            Ok(r) => r,
            Err(_) => {
                entries.push(OfferEntry::refused(Status::BadPages));
                continue;
            }
        };
        let (addr, gsi) = sub_doorbell(chan);
        let Ok(bell) = KvmDoorbell::new(addr, gsi) else {
            entries.push(OfferEntry::refused(Status::NoDoorbell));
            continue;
        };
        let checked = check_setups(
            std::iter::once((&rings0, bell0))
                .chain(offered.iter().map(|(r, b)| (r, b)))
                .chain(std::iter::once((&rings, &bell))),
        );
        if checked.is_err() {
            entries.push(OfferEntry::refused(Status::SharedPages));
            continue;
        }
        match bell.register(vm) {
            Ok(reg) => registrations.push(reg),
            Err(_) => {
                entries.push(OfferEntry::refused(Status::NoDoorbell));
                continue;
            }
        }
        entries.push(OfferEntry {
            status: Status::Offered,
            gsi,
            doorbell: addr,
        });
        offered.push((rings, bell));
        chans.push(chan);
    }
    assert_eq!(
        offered.len(),
        plan.max_subs,
        "as many sub-channels offered as the host allows: {entries:?}"
    );
    let (sub_rings, bells): (Vec<_>, Vec<_>) = offered.into_iter().unzip();
    let setups = sub_rings
        .into_iter()
        .zip(&bells)
        .map(|(rings, bell)| ChannelSetup::new(rings, bell))
        .collect();
    let subs = host_sub_channels((&rings0, bell0), setups, Config::default())
        .expect("the offered sub-channels");
    let mut offer = [0u8; 256];
    let n = sub_channel::encode_offer(&entries, &mut offer).unwrap();
    primary
        .complete(tid, &offer[..n], Wait::Until(deadline))
        .expect("send the offer");
    let set = ChannelSet::new(primary, subs);
    assert_eq!(set.open(), 1 + plan.max_subs);
    let bell_of = |chan: usize| chans.iter().position(|&c| c == chan).map(|k| &bells[k]);

    // Each channel on a thread of its own; the primary, which also carries the closes,
    // here.
    let done: Vec<AtomicBool> = (0..CHANNELS).map(|_| AtomicBool::new(false)).collect();
    let (events_tx, events) = mpsc::channel();
    let reports = thread::scope(|s| {
        let mut primary = None;
        let mut threads = Vec::new();
        for (index, channel) in set.into_channels() {
            if index == 0 {
                primary = Some(channel);
                continue;
            }
            let chan = chans[index - 1];
            let stop_at = plan.stop.and_then(|(c, n)| (c == chan).then_some(n));
            let (tx, done) = (events_tx.clone(), &done[chan]);
            threads.push((
                chan,
                s.spawn(move || serve_sub(chan, channel, stop_at, tx, done)),
            ));
        }
        let primary = primary.expect("the primary is open");
        let mut stream = HostStream::new(0, None);
        let mut idle = Idle(0);
        let mut others = Vec::new();
        let mut closes: Vec<(u64, usize)> = Vec::new();
        let mut summary = None;
        let mut msg = [0u8; 8];
        loop {
            let mut progress = stream.step(&primary, &mut others).expect("the primary");
            for o in others.drain(..) {
                progress = true;
                if u32::from_le_bytes(o.payload[0..4].try_into().unwrap()) == KIND_SUMMARY {
                    summary = Some(
                        o.payload
                            .chunks_exact(8)
                            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                            .collect::<Vec<_>>(),
                    );
                    continue;
                }
                match sub_channel::parse(&o.payload) {
                    // The guest closed a sub-channel: its endpoint sees the peer gone once
                    // it has received what came before; answer once its thread is done.
                    Ok(Message::Close { channel })
                        if o.packet_type == PacketType::InBand && (channel as usize) < CHANNELS =>
                    {
                        bell_of(channel as usize)
                            .expect("an offered sub-channel")
                            .close();
                        if o.completion_requested {
                            closes.push((o.tid, channel as usize));
                        }
                    }
                    other => panic!("unexpected message on the primary: {other:?}"),
                }
            }
            // Sub-channels that failed or that the host closed: tell the guest.
            while let Ok(Event::Failed(chan) | Event::HostClosed(chan)) = events.try_recv() {
                let n = sub_channel::encode_close(chan as u32, &mut msg).unwrap();
                primary
                    .send(
                        &msg[..n],
                        Wait::Until(Instant::now() + Duration::from_secs(10)),
                    )
                    .expect("send a close");
                progress = true;
            }
            // Closes of the guest's whose thread is done: answered.
            let mut i = 0;
            while i < closes.len() {
                let (tid, chan) = closes[i];
                if done[chan].load(Ordering::SeqCst) {
                    let n = sub_channel::encode_close(chan as u32, &mut msg).unwrap();
                    primary
                        .complete(
                            tid,
                            &msg[..n],
                            Wait::Until(Instant::now() + Duration::from_secs(10)),
                        )
                        .expect("answer a close");
                    closes.swap_remove(i);
                    progress = true;
                } else {
                    i += 1;
                }
            }
            if summary.is_some() && closes.is_empty() {
                break;
            }
            idle.after(progress, &primary);
        }
        let mut reports = vec![Some(ChannelReport {
            received: stream.received,
            sent: stream.sent,
            ending: if stream.finished() {
                Ending::Finished
            } else {
                Ending::PeerClosed
            },
            wakes: bell0.wakes(),
            pending: bell0.ioevent_fd().drain().unwrap_or(false),
            irq: None,
        })];
        reports.resize_with(CHANNELS, || None);
        for (chan, t) in threads {
            reports[chan] = Some(t.join().expect("a sub-channel thread"));
        }
        (reports, summary.expect("the summary"))
    });
    let (list, summary) = reports;
    let mut list: Vec<ChannelReport> = list
        .into_iter()
        .map(|r| {
            r.unwrap_or(ChannelReport {
                received: 0,
                sent: 0,
                ending: Ending::NotOffered,
                wakes: 0,
                pending: false,
                irq: None,
            })
        })
        .collect();
    // Each irqfd raises its own GSI (checked one at a time, lowest first: the bits stay).
    list[0].irq = Some(irq_raises(vm, bell0));
    for (&chan, bell) in chans.iter().zip(&bells) {
        if !bell.peer_closed() && list[chan].ending != Ending::ClosedByHost {
            list[chan].irq = Some(irq_raises(vm, bell));
        }
    }
    drop(registrations);
    (list, summary, entries)
}

/// Runs the vCPU to the guest's `DONE`; counts doorbell writes that reached userspace.
fn run_vcpu(vcpu: &mut VcpuFd, mut on_mailbox: impl FnMut()) -> (u64, [u64; CHANNELS]) {
    let mut exits = 0u64;
    let mut missed = [0u64; CHANNELS];
    loop {
        let exit = vcpu.run().expect("KVM_RUN");
        exits += 1;
        match exit {
            VcpuExit::MmioWrite(addr, data) if addr == CONTROL => {
                let mut v = [0u8; 8];
                v[..data.len()].copy_from_slice(data);
                match u64::from_le_bytes(v) {
                    DONE => return (exits, missed),
                    MAILBOX => on_mailbox(),
                    PANIC => panic!("the guest panicked"),
                    other => panic!("guest reported {other:#x}"),
                }
            }
            VcpuExit::MmioWrite(addr, _) if addr == DOORBELL => missed[0] += 1,
            VcpuExit::MmioWrite(addr, _) if (1..CHANNELS).any(|c| sub_doorbell(c).0 == addr) => {
                missed[(1..CHANNELS).find(|&c| sub_doorbell(c).0 == addr).unwrap()] += 1;
            }
            VcpuExit::MmioRead(_, data) => data.fill(0),
            other => panic!("unexpected exit {other:?} after {exits} exits"),
        }
    }
}

/// Boots the guest in `mode` and serves it; `None` where KVM is unusable.
fn run(mode: u64, plan: Plan) -> Option<Run> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (kvm, vm) = kvm_or_skip()?;
    let dog = watchdog(Duration::from_secs(120));
    let elf = std::fs::read(build_guest()).expect("the guest ELF");
    let mut tvm = TestVm::new(kvm, vm, &elf, mode);
    let (vcpu, vm, mem) = tvm.split();
    let bell0 = KvmDoorbell::new(DOORBELL, GSI).unwrap();
    let registration = bell0
        .register(vm)
        .expect("register the primary's doorbells");
    let (ready_tx, ready_rx) = mpsc::channel();
    let start = Instant::now();
    let (exits, missed, (reports, summary, offer)) = thread::scope(|s| {
        let host = s.spawn(|| serve(mem, vm, &bell0, ready_rx, plan));
        let (exits, missed) = run_vcpu(vcpu, || ready_tx.send(()).unwrap());
        (exits, missed, host.join().expect("the host's side"))
    });
    let elapsed = start.elapsed();
    registration.unregister().expect("unregister");
    let _ = dog.send(());
    assert_eq!(summary.len(), 3 + 7 * CHANNELS, "the guest's summary");
    assert_eq!(
        summary[1],
        offer.iter().filter(|e| e.status == Status::Offered).count() as u64,
        "the guest attached every offered sub-channel"
    );
    assert!(
        elapsed < Duration::from_secs(60),
        "took {elapsed:?}: guest code fell into CPL0 emulation?"
    );
    Some(Run {
        reports,
        summary,
        offer,
        missed,
        exits,
        elapsed,
    })
}

#[test]
fn three_channels_carry_their_traffic() {
    let Some(run) = run(MODE_SUB, Plan::ALL) else {
        return;
    };
    run.print("three channels");
    assert_eq!(
        run.offer,
        [
            OfferEntry {
                status: Status::Offered,
                gsi: GSI + 1,
                doorbell: SUB_DOORBELL
            },
            OfferEntry {
                status: Status::Offered,
                gsi: GSI + 2,
                doorbell: SUB_DOORBELL + 0x1000
            },
        ]
    );
    for chan in 0..CHANNELS {
        run.assert_complete(chan);
        assert_eq!(
            run.reports[chan].irq,
            Some(true),
            "channel {chan}'s irqfd raises its GSI"
        );
    }
}

#[test]
fn a_corrupted_sub_channel_fails_alone() {
    let Some(run) = run(MODE_SUB_CORRUPT, Plan::ALL) else {
        return;
    };
    run.print("sub-channel 2 corrupted by the guest");
    for chan in [0, 1] {
        run.assert_complete(chan);
    }
    let (r, g) = (&run.reports[2], run.guest(2));
    assert!(
        matches!(
            r.ending,
            Ending::Failed(FailureCause::Ring(RingError::IndexOutOfRange { .. }))
        ),
        "sub-channel 2 fails on the garbage: {:?}",
        r.ending
    );
    assert_eq!(
        r.received, SUB_STOP_AT,
        "every good packet was checked before the garbage"
    );
    assert_eq!(g[0], u64::from(SUB_STOP_AT));
    assert_eq!(g[6], CORRUPTED, "the guest heard the host close it");
    assert_eq!(
        (g[3], g[4]),
        (0, 0),
        "the guest found no error in what it read"
    );
    run.assert_own_doorbell(2, true);
}

#[test]
fn guest_closes_a_sub_channel() {
    let Some(run) = run(MODE_SUB_CLOSE, Plan::ALL) else {
        return;
    };
    run.print("sub-channel 1 closed by the guest");
    for chan in [0, 2] {
        run.assert_complete(chan);
    }
    let (r, g) = (&run.reports[1], run.guest(1));
    assert_eq!(
        r.ending,
        Ending::PeerClosed,
        "the host's side of sub-channel 1 sees it closed"
    );
    assert_eq!(
        r.received, SUB_STOP_AT,
        "the host received everything the guest sent before closing"
    );
    assert_eq!(g[0], u64::from(SUB_STOP_AT));
    assert_eq!(g[6], CLOSED_BY_GUEST);
    assert_eq!(
        (g[3], g[4]),
        (0, 0),
        "the guest found no error in what it read"
    );
    assert_eq!(run.summary[2], 1, "the host answered the close");
    // Its eventfd was also rung by the host's close: only the guest's count says it rang.
    run.assert_own_doorbell(1, false);
}

#[test]
fn host_closes_a_sub_channel() {
    let Some(run) = run(
        MODE_SUB,
        Plan {
            stop: Some((2, SUB_STOP_AT)),
            ..Plan::ALL
        },
    ) else {
        return;
    };
    run.print("sub-channel 2 closed by the host");
    for chan in [0, 1] {
        run.assert_complete(chan);
    }
    let (r, g) = (&run.reports[2], run.guest(2));
    assert_eq!(r.ending, Ending::ClosedByHost);
    assert_eq!(r.received, SUB_STOP_AT);
    assert_eq!(g[6], CLOSED_BY_HOST, "the guest's side sees it closed");
    assert_eq!(
        g[1],
        u64::from(r.sent),
        "the guest received every packet the host sent before closing"
    );
    assert_eq!((g[3], g[4]), (0, 0), "the guest found no error");
    assert!(g[0] >= u64::from(SUB_STOP_AT));
    run.assert_own_doorbell(2, true);
}

#[test]
fn host_offers_fewer_than_asked() {
    let Some(run) = run(
        MODE_SUB,
        Plan {
            max_subs: 1,
            ..Plan::ALL
        },
    ) else {
        return;
    };
    run.print("one sub-channel offered of two asked");
    assert_eq!(
        run.offer,
        [
            OfferEntry {
                status: Status::Offered,
                gsi: GSI + 1,
                doorbell: SUB_DOORBELL
            },
            OfferEntry::refused(Status::NotOffered),
        ]
    );
    for chan in [0, 1] {
        run.assert_complete(chan);
    }
    assert_eq!(run.reports[2].ending, Ending::NotOffered);
    assert_eq!(
        run.guest(2),
        [0, 0, 1, 0, 0, 0, OPEN],
        "the guest did not use the sub-channel it was not offered"
    );
    assert_eq!(run.missed[2], 0);
}
