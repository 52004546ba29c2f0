//! Modes 7..=9: sub-channels. The guest asks over the primary channel for `SUB_COUNT`
//! sub-channels (rings it allocated, listed in the request), attaches those the host
//! offers with the doorbell address the offer gives each, and streams `SUB_PACKETS` data
//! packets each way on every channel, checking every byte. The wire format of the
//! negotiation is `vmlink_kvm::sub_channel`'s, mirrored here (this crate depends on
//! nothing but the no_std core); the streams' format is mirrored in
//! `transport/kvm/tests/kvm_sub_channels.rs`.
//!
//! - Mode 7: every channel streams to its end; the host may close a sub-channel (a close
//!   message on the primary), which the guest's side then sees closed once it has
//!   received what the host committed before.
//! - Mode 8: after `SUB_STOP_AT` packets on sub-channel 2, once the host consumed them,
//!   the guest writes garbage into that ring's write index and rings its doorbell; it then
//!   leaves sub-channel 2 alone until the host closes it.
//! - Mode 9: after `SUB_STOP_AT` packets on sub-channel 1 the guest closes it (a close
//!   message on the primary that asks for a completion) and waits for the host's answer.
//!
//! At the end the guest sends its summary on the primary and reports `DONE`.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use core::time::Duration;

use vmlink_channel::{
    Channel, ChannelError, Config, Doorbell, DoorbellError, PacketType, Polled, Wait, Wake,
};
use vmlink_ring::{ControlWord, PageListMem, RingMem, init_control};

use crate::{CONTROL, DONE, DOORBELL, Rng, ctrl, data, mmio_write};

/// Sub-channels asked for.
const SUB_COUNT: usize = 2;
/// Pages per sub-channel ring, control page included.
const SUB_RING_PAGES: usize = 5;
/// Data packets each way on every channel.
const SUB_PACKETS: u32 = 20_000;
/// Mode 8 corrupts, mode 9 closes, after this many packets on its sub-channel.
const SUB_STOP_AT: u32 = 1_000;

const KIND_DATA: u32 = 1;
const KIND_END: u32 = 2;
const KIND_SUMMARY: u64 = 3;
/// `vmlink_kvm::sub_channel`'s message kinds.
const REQUEST: u32 = 0x7362_0001;
const OFFER: u32 = 0x7362_0002;
const CLOSE: u32 = 0x7362_0003;

/// A channel's stream ended how (the summary's `closed` word).
const OPEN: u64 = 0;
const CLOSED_BY_HOST: u64 = 1;
const CLOSED_BY_GUEST: u64 = 2;
const CORRUPTED: u64 = 3;

const CHANNELS: usize = SUB_COUNT + 1;

/// Doorbells rung per channel.
static SIGNALS: [AtomicU64; CHANNELS] = [const { AtomicU64::new(0) }; CHANNELS];
/// Channels the host closed (a close message on the primary).
static HOST_CLOSED: [AtomicBool; CHANNELS] = [const { AtomicBool::new(false) }; CHANNELS];
/// Closes of ours the host answered.
static CLOSE_ANSWERED: [AtomicBool; CHANNELS] = [const { AtomicBool::new(false) }; CHANNELS];

/// Page `i` of sub-channel `sub`'s list (its outgoing ring first): scattered over 20
/// pages from 0x320 + 0x20 × (sub − 1).
fn sub_page(sub: usize, i: usize) -> u64 {
    0x320 + 0x20 * (sub as u64 - 1) + ((i as u64 * 7) % (2 * SUB_RING_PAGES as u64)) * 2
}

/// Byte `i` of data packet `seq` on channel `chan`.
fn sub_pattern(chan: u32, seq: u32, i: usize) -> u8 {
    (seq.wrapping_mul(7) as usize)
        .wrapping_add(i.wrapping_mul(13))
        .wrapping_add(chan as usize * 101) as u8
}

/// A channel's doorbell: an MMIO write to the address the host gave it. The guest polls,
/// so it never sleeps on it; the peer is gone once the host closed the channel.
struct Bell {
    addr: u64,
    chan: usize,
}

impl Doorbell for Bell {
    fn signal(&self) -> Result<(), DoorbellError> {
        SIGNALS[self.chan].fetch_add(1, Ordering::Relaxed);
        mmio_write(self.addr, 1);
        Ok(())
    }
    fn wait(&self, _timeout: Option<Duration>) -> Result<Wake, DoorbellError> {
        Ok(Wake::Signalled)
    }
    fn wake_local(&self) -> Result<(), DoorbellError> {
        Ok(())
    }
    fn peer_closed(&self) -> bool {
        HOST_CLOSED[self.chan].load(Ordering::SeqCst)
    }
}

/// One channel's traffic, as the guest sees it.
struct Stream {
    chan: u32,
    rng: Rng,
    /// Packets to send (fewer when this channel is to be corrupted or closed).
    limit: u32,
    sent: u32,
    next_len: usize,
    host_next: u32,
    host_ok: u64,
    end_seen: bool,
    errors: u64,
    first_error: u64,
    closed: u64,
}

impl Stream {
    fn new(chan: u32, limit: u32) -> Self {
        Self {
            chan,
            rng: Rng(0x1234_5678_9abc_def1 ^ (u64::from(chan) << 40)),
            limit,
            sent: 0,
            next_len: 0,
            host_next: 0,
            host_ok: 0,
            end_seen: false,
            errors: 0,
            first_error: 0,
            closed: OPEN,
        }
    }

    fn fail(&mut self, code: u64) {
        self.errors += 1;
        if self.first_error == 0 {
            self.first_error = code;
        }
    }

    /// Sent everything and saw the host's end, or no longer in use.
    fn finished(&self) -> bool {
        self.closed != OPEN || (self.sent >= self.limit && self.end_seen) || self.errors > 100
    }

    /// One pass: a packet sent if one is due and fits, then every packet there is received
    /// and checked. On the primary, negotiation messages are handled. Returns whether
    /// anything moved.
    fn step<R: RingMem, D: Doorbell>(
        &mut self,
        channel: &Channel<R, D>,
        out: &mut [u8],
        buf: &mut [u8],
    ) -> bool {
        if self.closed != OPEN {
            return false;
        }
        let mut progress = false;
        if self.sent < self.limit {
            if self.next_len == 0 {
                self.next_len = 16 + (self.rng.next() % 1500) as usize;
            }
            let (len, seq) = (self.next_len, self.sent);
            out[0..4].copy_from_slice(&KIND_DATA.to_le_bytes());
            out[4..8].copy_from_slice(&seq.to_le_bytes());
            out[8..12].copy_from_slice(&(len as u32).to_le_bytes());
            out[12..16].copy_from_slice(&self.chan.to_le_bytes());
            for (i, b) in out[16..len].iter_mut().enumerate() {
                *b = sub_pattern(self.chan, seq, i + 16);
            }
            match channel.send(&out[..len], Wait::Now) {
                Ok(()) => {
                    self.sent += 1;
                    self.next_len = 0;
                    progress = true;
                }
                Err(ChannelError::Full) => {}
                // Closed: the receive below sees it once the ring is drained.
                Err(ChannelError::Closed) => {}
                Err(_) => self.fail(1),
            }
        }
        loop {
            match channel.recv(buf, Wait::Now).polled() {
                Ok(Some(r)) => {
                    progress = true;
                    let p = r.payload(buf);
                    if p.len() < 8 {
                        self.fail(2);
                        continue;
                    }
                    let kind = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
                    let word1 = u32::from_le_bytes([p[4], p[5], p[6], p[7]]);
                    if kind == CLOSE && self.chan == 0 {
                        // The host closed a sub-channel, or answered our close.
                        let ch = word1 as usize;
                        if ch == 0 || ch >= CHANNELS {
                            self.fail(3);
                        } else if r.packet_type == PacketType::Completion {
                            CLOSE_ANSWERED[ch].store(true, Ordering::SeqCst);
                        } else {
                            HOST_CLOSED[ch].store(true, Ordering::SeqCst);
                        }
                        continue;
                    }
                    if p.len() < 16 || r.packet_type != PacketType::InBand {
                        self.fail(4);
                        continue;
                    }
                    let len = u32::from_le_bytes([p[8], p[9], p[10], p[11]]) as usize;
                    let chan = u32::from_le_bytes([p[12], p[13], p[14], p[15]]);
                    match kind {
                        KIND_DATA => {
                            let ok = word1 == self.host_next
                                && chan == self.chan
                                && len <= p.len()
                                && p.len() - len < 8
                                && p[16..len]
                                    .iter()
                                    .enumerate()
                                    .all(|(i, &b)| b == sub_pattern(chan, word1, i + 16));
                            if ok {
                                self.host_ok += 1;
                            } else {
                                self.fail(5);
                            }
                            self.host_next = word1.wrapping_add(1);
                        }
                        KIND_END if word1 == self.host_next && chan == self.chan => {
                            self.end_seen = true;
                        }
                        _ => self.fail(6),
                    }
                }
                Ok(None) => break,
                Err(ChannelError::Closed) => {
                    self.closed = CLOSED_BY_HOST;
                    break;
                }
                Err(_) => {
                    self.fail(7);
                    break;
                }
            }
            if self.errors > 100 {
                break;
            }
        }
        progress
    }
}

/// Sends `payload` on `channel` as soon as it fits (as a request when `request`); returns
/// the transaction id of a request.
fn send_now<R: RingMem, D: Doorbell>(
    channel: &Channel<R, D>,
    payload: &[u8],
    request: bool,
) -> u64 {
    loop {
        let r = if request {
            channel.start_request(payload, Wait::Now)
        } else {
            channel.send(payload, Wait::Now).map(|()| 0)
        };
        match r {
            Ok(tid) => return tid,
            Err(ChannelError::Full) => core::hint::spin_loop(),
            Err(_) => panic!("the primary channel failed"),
        }
    }
}

type SubRing = PageListMem<'static, [&'static vmlink_ring::DataPage; SUB_RING_PAGES - 1]>;

/// A sub-channel's two rings over its pages.
fn sub_rings(sub: usize) -> (SubRing, SubRing) {
    let ring = |first: usize| {
        let mut pages = [data(sub_page(sub, first + 1)); SUB_RING_PAGES - 1];
        for (i, p) in pages.iter_mut().enumerate() {
            *p = data(sub_page(sub, first + 1 + i));
        }
        PageListMem::new(ctrl(sub_page(sub, first)), pages).expect("ring")
    };
    (ring(0), ring(SUB_RING_PAGES))
}

/// The sub-channel modes (7..=9) over the primary channel's rings.
pub fn run<R: RingMem>(g2h: R, h2g: R, mode: u64) -> ! {
    let primary = Channel::new(
        g2h,
        h2g,
        Bell {
            addr: DOORBELL,
            chan: 0,
        },
        Config::default(),
    )
    .expect("primary");
    let mut out = [0u8; 2048];
    let mut buf = [0u8; 2048];

    // Allocate every sub-channel's rings, initialise them, list them in the request.
    let mut request = [0u8; 16 + 8 * SUB_COUNT * 2 * SUB_RING_PAGES];
    let words = [
        REQUEST,
        SUB_COUNT as u32,
        (2 * SUB_RING_PAGES) as u32,
        SUB_RING_PAGES as u32,
    ];
    for (i, w) in words.iter().enumerate() {
        request[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
    }
    for sub in 1..=SUB_COUNT {
        let (g, h) = sub_rings(sub);
        init_control(&g);
        init_control(&h);
        // We poll: the host need not raise interrupts for us.
        h.store_control(ControlWord::InterruptMask, 1);
        for i in 0..2 * SUB_RING_PAGES {
            let at = 16 + 8 * ((sub - 1) * 2 * SUB_RING_PAGES + i);
            request[at..at + 8].copy_from_slice(&sub_page(sub, i).to_le_bytes());
        }
    }
    let tid = send_now(&primary, &request, true);

    // The offer: the request's completion, the first packet the host sends.
    let (got, addrs) = loop {
        match primary.recv(&mut buf, Wait::Now).polled() {
            Ok(Some(r)) => {
                let p = r.payload(&buf);
                let word = |at: usize| u32::from_le_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
                if r.packet_type != PacketType::Completion
                    || r.transaction_id != tid
                    || p.len() < 16 + 16 * SUB_COUNT
                    || word(0) != OFFER
                    || word(4) != SUB_COUNT as u32
                {
                    panic!("not the offer");
                }
                let mut addrs = [0u64; CHANNELS];
                for (sub, a) in addrs.iter_mut().enumerate().skip(1) {
                    let e = 16 + 16 * (sub - 1);
                    if word(e) == 0 {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&p[e + 8..e + 16]);
                        *a = u64::from_le_bytes(b);
                    }
                }
                break (word(8), addrs);
            }
            Ok(None) => core::hint::spin_loop(),
            Err(_) => panic!("the primary channel failed"),
        }
    };

    // Attach what was offered.
    let attach = |sub: usize| {
        let (g, h) = sub_rings(sub);
        let bell = Bell {
            addr: addrs[sub],
            chan: sub,
        };
        (addrs[sub] != 0).then(|| Channel::new(g, h, bell, Config::default()).expect("sub-channel"))
    };
    let subs = [attach(1), attach(2)];
    let mut streams = [
        Stream::new(0, SUB_PACKETS),
        Stream::new(1, if mode == 9 { SUB_STOP_AT } else { SUB_PACKETS }),
        Stream::new(2, if mode == 8 { SUB_STOP_AT } else { SUB_PACKETS }),
    ];
    for (s, c) in streams.iter_mut().skip(1).zip(&subs) {
        if c.is_none() {
            // Not offered: nothing to stream.
            s.limit = 0;
            s.end_seen = true;
        }
    }
    // A second view of sub-channel 2's outgoing ring, to corrupt it behind its channel's
    // back (mode 8).
    let raw = sub_rings(2).0;
    let mut close_tid = None;
    loop {
        let mut progress = streams[0].step(&primary, &mut out, &mut buf);
        for (i, sub) in subs.iter().enumerate() {
            let chan = i + 1;
            let Some(channel) = sub else { continue };
            let s = &mut streams[chan];
            progress |= s.step(channel, &mut out, &mut buf);
            if s.closed == OPEN && s.sent == s.limit && s.limit < SUB_PACKETS {
                if mode == 8 && chan == 2 {
                    // Once the host has consumed everything, garbage: a write index past
                    // the end of the data area, and the doorbell.
                    let w = raw.load_control(ControlWord::WriteIndex);
                    if raw.load_control(ControlWord::ReadIndex) == w {
                        raw.store_control(ControlWord::WriteIndex, raw.data_len() as u32 + 8);
                        SIGNALS[chan].fetch_add(1, Ordering::Relaxed);
                        mmio_write(addrs[chan], 1);
                        s.closed = CORRUPTED;
                    }
                } else if mode == 9 && chan == 1 {
                    // Close it: we stop using it now, and ask to hear when the host has.
                    let mut m = [0u8; 8];
                    m[0..4].copy_from_slice(&CLOSE.to_le_bytes());
                    m[4..8].copy_from_slice(&(chan as u32).to_le_bytes());
                    close_tid = Some(send_now(&primary, &m, true));
                    s.closed = CLOSED_BY_GUEST;
                }
            }
        }
        let all_done = streams.iter().enumerate().all(|(chan, s)| match s.closed {
            CORRUPTED => HOST_CLOSED[chan].load(Ordering::SeqCst),
            CLOSED_BY_GUEST => CLOSE_ANSWERED[chan].load(Ordering::SeqCst),
            _ => s.finished(),
        });
        if all_done {
            break;
        }
        if !progress {
            core::hint::spin_loop();
        }
    }

    // The summary: [kind, offered, close answered, then per channel: sent, host packets
    // checked, end seen, errors, first error, doorbells rung, how it ended].
    let mut summary = [0u64; 3 + 7 * CHANNELS];
    summary[0] = KIND_SUMMARY;
    summary[1] = u64::from(got);
    summary[2] = u64::from(close_tid.is_some() && CLOSE_ANSWERED[1].load(Ordering::SeqCst));
    for (chan, s) in streams.iter().enumerate() {
        let at = 3 + 7 * chan;
        summary[at..at + 7].copy_from_slice(&[
            u64::from(s.sent),
            s.host_ok,
            u64::from(s.end_seen),
            s.errors,
            s.first_error,
            SIGNALS[chan].load(Ordering::Relaxed),
            s.closed,
        ]);
    }
    for (i, f) in summary.iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&f.to_le_bytes());
    }
    send_now(&primary, &out[..summary.len() * 8], false);
    mmio_write(CONTROL, DONE);
    loop {
        core::hint::spin_loop();
    }
}
