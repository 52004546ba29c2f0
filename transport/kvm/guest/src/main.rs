//! The vmlink KVM test guest: the no_std ring and channel code at CPL3 on its own
//! (identity-mapped) physical memory, polling its incoming ring and ringing an MMIO
//! doorbell. The memory map and message format are mirrored in
//! `transport/kvm/src/test_vm.rs`.
//!
//! The host picks a mode by writing a word at `MODE` before the first `KVM_RUN`: 0 runs
//! the traffic test; 1..=6 run a hostile guest that sends a few good packets, waits until
//! the host consumed them, corrupts its outgoing ring in way `mode`, rings the doorbell,
//! waits for the host's acknowledgement in `ACK`, then reports `DONE`. Modes 7..=9 ask
//! for sub-channels and stream on every channel (see `sub.rs`).
//!
//! The traffic mode has a second phase. Its `DONE` (after the summary) ends the traffic;
//! a VMM that runs the vCPU again from there gets a guest serving the heartbeat integration
//! service on the same channel, with `vmlink-ic`'s no_std codec and the rules of its agent:
//! each in-band packet is parsed as a message; NEGOTIATE gets the negotiation's answer,
//! HEARTBEAT (once negotiated) the sequence number plus one; anything else whose headers can
//! be read (a message that does not parse, another type, a heartbeat before the
//! negotiation, a packet longer than the guest's 512-byte buffer, which is consumed) gets
//! status `HV_E_FAIL` with the message echoed. Each answer is an in-band packet carrying the
//! request's transaction id. The host ends the phase by setting `IC_STOP`; the guest then
//! writes what it answered and refused at `IC_ANSWERED` and `IC_REFUSED` and reports
//! `DONE` again.
#![no_std]
#![no_main]

use core::ptr::NonNull;
use core::time::Duration;

use vmlink_channel::Polled;
use vmlink_channel::Wait;
use vmlink_channel::packet::GpaRange;
use vmlink_channel::{
    Channel, ChannelError, Config, Doorbell, DoorbellError, OutgoingPacket, PacketMeta, PacketType,
    Wake,
};
use vmlink_ic::status::HV_E_FAIL;
use vmlink_ic::{IcFlags, Message, MessageType, Service, heartbeat, negotiate};
use vmlink_ring::{ControlWord, PageListMem, RingMem, init_control};

mod sub;

const MAILBOX: u64 = 0x20_0000;
const DOORBELL: u64 = 0x3000_0000;
const CONTROL: u64 = 0x3000_1000;
const MODE: u64 = MAILBOX + 0x800;
const ACK: u64 = MAILBOX + 0x808;
/// Set by the host to end the heartbeat phase.
const IC_STOP: u64 = MAILBOX + 0x810;
/// Where the guest leaves the messages it answered, and those it refused, at the end of the
/// heartbeat phase.
const IC_ANSWERED: u64 = MAILBOX + 0x818;
const IC_REFUSED: u64 = MAILBOX + 0x820;
/// The heartbeat phase's buffers: its messages are under 256 bytes.
const IC_BUF: usize = 512;
const HOSTILE_GOOD: u32 = 4;
const MAILBOX_MAGIC: u64 = 0x766d_6c69_6e6b_2121;
const DONE: u64 = 0xD0E;
const PANIC: u64 = 0xBAD;
/// Ring pages per ring, control page included.
const RING_PAGES: usize = 9;
const PACKETS: u32 = 50_000;
/// The packets the traffic mode sends, when the host writes a count here (0: `PACKETS`).
/// The host may raise or lower it while the guest runs, never below what was sent: a
/// migration test streams with a large count and settles it after the last migration.
const LIMIT: u64 = MAILBOX + 0x830;

/// The traffic mode's packet count now (the host's word at `LIMIT`, or `PACKETS`).
fn limit() -> u32 {
    // SAFETY: `LIMIT` is an aligned word of guest RAM the host may write at any time; a
    // volatile read sees its current value.
    let word = unsafe { core::ptr::read_volatile(LIMIT as *const u32) };
    if word == 0 { PACKETS } else { word }
}
const GPA_PAGES: [u64; 3] = [0x300, 0x305, 0x302];
const GPA_OFFSET: u32 = 100;
const GPA_LEN: u32 = 3 * 4096 - 200;

const KIND_DATA: u32 = 1;
const KIND_END: u32 = 2;
const KIND_SUMMARY: u32 = 3;
const KIND_COMPLETION: u32 = 4;

fn ring_page(i: usize) -> u64 {
    // Deliberately scattered: 0x210 + a permutation of even offsets.
    0x210 + ((i as u64 * 11) % 40) * 2
}

fn mmio_write(addr: u64, value: u64) {
    // SAFETY: `addr` is an identity-mapped address with no memslot: the write exits to
    // KVM (ioeventfd or userspace), it touches no memory of ours.
    unsafe { core::ptr::write_volatile(addr as *mut u64, value) }
}

fn pattern(seq: u32, i: usize) -> u8 {
    (seq.wrapping_mul(7) as usize).wrapping_add(i.wrapping_mul(13)) as u8
}

struct MmioBell;

static mut SIGNALS: u64 = 0;

impl Doorbell for MmioBell {
    fn signal(&self) -> Result<(), DoorbellError> {
        // SAFETY: single-threaded guest; nothing else touches SIGNALS concurrently.
        unsafe { SIGNALS += 1 };
        mmio_write(DOORBELL, 1);
        Ok(())
    }
    fn wait(&self, _timeout: Option<Duration>) -> Result<Wake, DoorbellError> {
        // The guest polls; it never sleeps on the bell.
        Ok(Wake::Signalled)
    }
    fn wake_local(&self) -> Result<(), DoorbellError> {
        Ok(())
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn page(n: u64) -> NonNull<u8> {
    NonNull::new((n * 4096) as *mut u8).expect("page 0 is never a ring page")
}

/// The control words of ring page `n`.
fn ctrl(n: u64) -> &'static vmlink_ring::ControlWords {
    // SAFETY: each ring page is an identity-mapped 4 KiB guest page, distinct from every
    // other page we use, accessed only atomically by us and by the host.
    unsafe { vmlink_ring_mapping::control_words(page(n)) }.expect("aligned")
}

/// Data page `n` of a ring.
fn data(n: u64) -> &'static vmlink_ring::DataPage {
    // SAFETY: as for `ctrl`.
    unsafe { vmlink_ring_mapping::data_page(page(n)) }.expect("aligned")
}

/// # Safety
/// Entered once by the host with a valid stack, at CPL3, memory identity-mapped.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text._start")]
pub extern "C" fn _start() -> ! {
    main()
}

fn main() -> ! {
    let mut pages = [0u64; 2 * RING_PAGES];
    for (i, p) in pages.iter_mut().enumerate() {
        *p = ring_page(i);
    }
    let mut g2h_pages = [data(pages[1]); RING_PAGES - 1];
    let mut h2g_pages = [data(pages[RING_PAGES + 1]); RING_PAGES - 1];
    for i in 1..RING_PAGES {
        g2h_pages[i - 1] = data(pages[i]);
        h2g_pages[i - 1] = data(pages[RING_PAGES + i]);
    }
    let g2h = PageListMem::new(ctrl(pages[0]), g2h_pages).expect("ring");
    let h2g = PageListMem::new(ctrl(pages[RING_PAGES]), h2g_pages).expect("ring");
    // We allocated the rings: we initialise both control pages. We poll the incoming
    // ring, so its interrupts stay masked (the reader owns that word).
    init_control(&g2h);
    init_control(&h2g);
    h2g.store_control(ControlWord::InterruptMask, 1);

    // Fill the GPA-direct buffer: byte i of the range is pattern(0xFFFF, i).
    let mut k = 0usize;
    let mut in_page = GPA_OFFSET as usize;
    for &p in &GPA_PAGES {
        while in_page < 4096 && k < GPA_LEN as usize {
            // SAFETY: identity-mapped guest page owned by the guest, not shared yet.
            unsafe {
                core::ptr::write_volatile(
                    (p * 4096 + in_page as u64) as *mut u8,
                    pattern(0xFFFF, k),
                )
            };
            k += 1;
            in_page += 1;
        }
        in_page = 0;
    }

    // Tell the host where the rings are: the page list in the mailbox page.
    let mb = MAILBOX as *mut u64;
    // SAFETY: the mailbox page is identity-mapped guest memory; the host reads it only
    // after the control write below.
    unsafe {
        core::ptr::write_volatile(mb, MAILBOX_MAGIC);
        core::ptr::write_volatile(mb.add(1), RING_PAGES as u64);
        core::ptr::write_volatile(mb.add(2), pages.len() as u64);
        for (i, &p) in pages.iter().enumerate() {
            core::ptr::write_volatile(mb.add(3 + i), p);
        }
    }
    mmio_write(CONTROL, MAILBOX);

    // SAFETY: the host wrote the mode word before the first run; nothing writes it now.
    let mode = unsafe { core::ptr::read_volatile(MODE as *const u64) };
    if mode >= 7 {
        sub::run(g2h, h2g, mode)
    }
    if mode != 0 {
        // A second view of our outgoing ring (the same pages), to corrupt it behind the
        // channel's back.
        let raw = PageListMem::new(ctrl(pages[0]), g2h_pages).expect("ring");
        let channel = Channel::new(g2h, h2g, MmioBell, Config::default()).expect("channel");
        hostile(&channel, &raw, mode)
    }
    let channel = Channel::new(g2h, h2g, MmioBell, Config::default()).expect("channel");
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut out = [0u8; 2048];
    let mut buf = [0u8; 4096];
    let mut seq = 0u32;
    let mut next_len = 0usize;
    let mut requests = 0u64;
    let mut outstanding: [(u64, u32); 64] = [(u64::MAX, 0); 64];
    let mut in_flight = 0usize;
    let mut completions_ok = 0u64;
    let mut host_ok = 0u64;
    let mut host_next = 0u32;
    let mut end_seen = false;
    // The packet count, looked at again every 256 packets and whenever it is reached.
    let mut lim = limit();
    let mut errors = 0u64;
    let mut first_error = 0u64;
    let mut gpa_sent = false;
    let mut fail = |code: u64, errors: &mut u64| {
        *errors += 1;
        if first_error == 0 {
            first_error = code;
        }
        first_error
    };
    loop {
        // Send.
        let mut progress = false;
        if seq == PACKETS / 2 && !gpa_sent {
            let range = GpaRange {
                byte_offset: GPA_OFFSET,
                byte_count: GPA_LEN,
                pages: &GPA_PAGES,
            };
            match channel.send_gpa_direct(&[range], b"gpa-direct", PacketMeta::in_band(), Wait::Now)
            {
                Ok(()) => gpa_sent = true,
                Err(ChannelError::Full) => {}
                Err(_) => {
                    fail(1, &mut errors);
                    gpa_sent = true;
                }
            }
        } else if seq < lim {
            if next_len == 0 {
                next_len = 12 + (rng.next() % 2000) as usize;
            }
            let len = next_len;
            out[0..4].copy_from_slice(&KIND_DATA.to_le_bytes());
            out[4..8].copy_from_slice(&seq.to_le_bytes());
            out[8..12].copy_from_slice(&(len as u32).to_le_bytes());
            for (i, b) in out[12..len].iter_mut().enumerate() {
                *b = pattern(seq, i + 12);
            }
            let is_request = seq % 8 == 7;
            let sent = if is_request {
                if in_flight == outstanding.len() {
                    Err(ChannelError::Full)
                } else {
                    channel.start_request(&out[..len], Wait::Now).map(|tid| {
                        let slot = outstanding
                            .iter_mut()
                            .find(|s| s.0 == u64::MAX)
                            .expect("free");
                        *slot = (tid, seq);
                        in_flight += 1;
                        requests += 1;
                    })
                }
            } else {
                channel.send(&out[..len], Wait::Now)
            };
            match sent {
                Ok(()) => {
                    seq += 1;
                    next_len = 0;
                    progress = true;
                }
                Err(ChannelError::Full) | Err(ChannelError::TransactionsExhausted { .. }) => {}
                Err(_) => {
                    fail(2, &mut errors);
                    seq += 1;
                }
            }
        }

        // Receive everything there is.
        loop {
            match channel.recv(&mut buf, Wait::Now).polled() {
                Ok(Some(r)) => {
                    progress = true;
                    let p = r.payload(&buf);
                    if p.len() < 12 {
                        fail(3, &mut errors);
                        continue;
                    }
                    let kind = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
                    let s = u32::from_le_bytes([p[4], p[5], p[6], p[7]]);
                    let len = u32::from_le_bytes([p[8], p[9], p[10], p[11]]) as usize;
                    match (r.packet_type, kind) {
                        (vmlink_channel::PacketType::Completion, KIND_COMPLETION) => {
                            match outstanding.iter_mut().find(|o| o.0 == r.transaction_id) {
                                Some(o) if o.1 == s => {
                                    *o = (u64::MAX, 0);
                                    in_flight -= 1;
                                    completions_ok += 1;
                                }
                                _ => {
                                    fail(4, &mut errors);
                                }
                            }
                        }
                        (vmlink_channel::PacketType::InBand, KIND_DATA) => {
                            let ok = s == host_next
                                && len <= p.len()
                                && p[12..len]
                                    .iter()
                                    .enumerate()
                                    .all(|(i, &b)| b == pattern(s, i + 12));
                            if ok {
                                host_ok += 1;
                            } else {
                                fail(5, &mut errors);
                            }
                            host_next = s.wrapping_add(1);
                        }
                        (vmlink_channel::PacketType::InBand, KIND_END) => {
                            if s != host_next {
                                fail(6, &mut errors);
                            }
                            end_seen = true;
                        }
                        _ => {
                            fail(7, &mut errors);
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    fail(8, &mut errors);
                    break;
                }
            }
            if errors > 1000 {
                break;
            }
        }

        if seq & 255 == 0 || seq >= lim {
            lim = limit();
        }
        if (seq >= lim && gpa_sent && end_seen && in_flight == 0) || errors > 1000 {
            break;
        }
        if !progress {
            core::hint::spin_loop();
        }
    }

    // The summary: what the guest sent, received and checked.
    let c = channel.counters();
    // SAFETY: single-threaded guest.
    let signals = unsafe { SIGNALS };
    let fields = [
        KIND_SUMMARY as u64,
        seq as u64,
        requests,
        completions_ok,
        host_ok,
        end_seen as u64,
        errors,
        first_error,
        signals,
        c.packets_sent,
        c.packets_received,
        gpa_sent as u64,
    ];
    for (i, f) in fields.iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&f.to_le_bytes());
    }
    while let Err(ChannelError::Full) = channel.send(&out[..fields.len() * 8], Wait::Now) {
        core::hint::spin_loop();
    }
    mmio_write(CONTROL, DONE);
    // The traffic is over. If the VMM runs us again, the heartbeat phase follows.
    serve_heartbeat(&channel)
}

/// The heartbeat phase: answers the host's heartbeat service on `channel` until the host
/// sets `IC_STOP`, then leaves its counts in the mailbox and reports `DONE`.
fn serve_heartbeat<R: RingMem, D: Doorbell>(channel: &Channel<R, D>) -> ! {
    let mut buf = [0u8; IC_BUF];
    let mut out = [0u8; IC_BUF];
    let mut version = None;
    let (mut answered, mut refused) = (0u64, 0u64);
    loop {
        // Copy as much of the payload as fits; a longer packet is consumed all the same.
        let got = channel.recv_with(Wait::Now, |p| {
            let meta = p.meta();
            let copied = meta.payload_len.min(buf.len());
            p.read_payload(0, &mut buf[..copied])
                .map(|()| (meta, copied))
        });
        let (meta, copied) = match got {
            Ok(Ok(m)) => m,
            Err(ChannelError::Empty) => {
                // SAFETY: the stop word is identity-mapped guest memory the host writes.
                if unsafe { core::ptr::read_volatile(IC_STOP as *const u64) } != 0 {
                    break;
                }
                core::hint::spin_loop();
                continue;
            }
            Ok(Err(_)) | Err(_) => panic!("the heartbeat channel failed"),
        };
        if meta.packet_type != PacketType::InBand {
            refused += 1;
            continue;
        }
        let whole = copied == meta.payload_len;
        let (len, ok) = answer(&buf[..copied], whole, &mut version, &mut out);
        if ok {
            answered += 1;
        } else {
            refused += 1;
        }
        if len > 0 {
            let mut packet = OutgoingPacket::in_band_slice(&out[..len]);
            packet.meta = PacketMeta {
                transaction_id: meta.transaction_id,
                ..PacketMeta::in_band()
            };
            loop {
                match channel.send_packet(&packet, Wait::Now) {
                    Ok(()) => break,
                    Err(ChannelError::Full) => core::hint::spin_loop(),
                    Err(_) => panic!("the heartbeat channel failed"),
                }
            }
        }
    }
    // SAFETY: the mailbox page is identity-mapped guest memory; the host reads these words
    // only after the control write below.
    unsafe {
        core::ptr::write_volatile(IC_ANSWERED as *mut u64, answered);
        core::ptr::write_volatile(IC_REFUSED as *mut u64, refused);
    }
    mmio_write(CONTROL, DONE);
    loop {
        core::hint::spin_loop();
    }
}

/// The answer to the heartbeat channel's message `payload` (`whole`: not cut to the
/// buffer) in `out`: its length (0: nothing to send) and whether the request succeeded.
/// `version` is the negotiated one, if any. The rules are vmlink-ic's agent's.
fn answer(
    payload: &[u8],
    whole: bool,
    version: &mut Option<negotiate::Negotiated>,
    out: &mut [u8],
) -> (usize, bool) {
    let service = Service::Heartbeat;
    let message = match Message::parse(payload) {
        Ok(m) if whole => m,
        Ok(m) => return (fail(&m, out), false),
        Err(_) => return (vmlink_ic::refuse_raw(payload, out), false),
    };
    if message.header.flags.contains(IcFlags::RESPONSE) {
        // An answer where requests come: ignored.
        return (0, false);
    }
    match message.header.message_type {
        MessageType::Negotiate => {
            let (framework, versions) = (service.framework_versions(), service.message_versions());
            match negotiate::respond(&message, framework, versions, out) {
                Ok(answer) => match answer.outcome {
                    Ok(v) => {
                        *version = Some(v);
                        (answer.len, true)
                    }
                    // The failed negotiation's answer (counts 0/0, HV_E_FAIL).
                    Err(_) => (answer.len, false),
                },
                Err(_) => (fail(&message, out), false),
            }
        }
        t if t != service.message_type() => (fail(&message, out), false),
        _ if version.is_none() => (fail(&message, out), false),
        _ => match heartbeat::answer(&message, out) {
            Ok(len) => (len, true),
            Err(_) => (fail(&message, out), false),
        },
    }
}

/// The failure answer to a message that parsed: its header with `HV_E_FAIL`, its body
/// echoed.
fn fail(m: &Message<'_>, out: &mut [u8]) -> usize {
    vmlink_ic::encode(out, &m.header.response(HV_E_FAIL), m.body).unwrap_or(0)
}

/// Sends a few good packets, waits for the host to consume them, then corrupts the ring.
fn hostile<R: RingMem, D: Doorbell>(channel: &Channel<R, D>, raw: &R, mode: u64) -> ! {
    for i in 0..HOSTILE_GOOD {
        let mut p = [0u8; 40];
        p[0..4].copy_from_slice(&i.to_le_bytes());
        while let Err(ChannelError::Full) = channel.send(&p, Wait::Now) {
            core::hint::spin_loop();
        }
    }
    let w = raw.load_control(ControlWord::WriteIndex);
    while raw.load_control(ControlWord::ReadIndex) != w {
        core::hint::spin_loop();
    }
    let data_len = raw.data_len() as u32;
    // A raw packet at the write index: descriptor, 8 payload bytes, trailer.
    let packet = |ty: u16, offset8: u16, len8: u16| {
        let mut b = [0u8; 32];
        b[0..2].copy_from_slice(&ty.to_le_bytes());
        b[2..4].copy_from_slice(&offset8.to_le_bytes());
        b[4..6].copy_from_slice(&len8.to_le_bytes());
        b[8..16].copy_from_slice(&0x77u64.to_le_bytes());
        b[24..32].copy_from_slice(&((w as u64) << 32).to_le_bytes());
        raw.write_data(w as usize, &b);
        raw.store_control(ControlWord::WriteIndex, w + 32);
    };
    match mode {
        // Write index past the end of the data area.
        1 => raw.store_control(ControlWord::WriteIndex, data_len + 8),
        // Misaligned write index.
        2 => raw.store_control(ControlWord::WriteIndex, w + 3),
        // Write index moved backwards (below what the host already consumed).
        3 => raw.store_control(ControlWord::WriteIndex, w - 8),
        // A descriptor whose data offset is smaller than the descriptor.
        4 => packet(6, 1, 3),
        // A descriptor whose data offset is past the packet's length.
        5 => packet(6, 4, 3),
        // An unknown packet type.
        _ => packet(0x77, 2, 3),
    }
    mmio_write(DOORBELL, 1);
    // SAFETY: the ack word is identity-mapped guest memory the host writes.
    while unsafe { core::ptr::read_volatile(ACK as *const u64) } == 0 {
        core::hint::spin_loop();
    }
    mmio_write(CONTROL, DONE);
    loop {
        core::hint::spin_loop();
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    mmio_write(CONTROL, PANIC);
    loop {
        core::hint::spin_loop();
    }
}
