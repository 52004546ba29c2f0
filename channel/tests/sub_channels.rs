//! Sub-channels: several channels in one shared memory area with one owner.
//!
//! The owner lays the area out with the memory header (`vmlink_ring::area`) listing every
//! channel's two rings, writes the header and initialises the rings; the other side copies
//! the header page out once, validates it, and builds one channel per entry over the same
//! memory. Each channel has its own doorbell; a channel that fails takes no other down.

use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use vmlink_channel::Polled;
use vmlink_channel::Wait;
use vmlink_channel::{Channel, ChannelError, ChannelState, Config, InProcessDoorbell};
use vmlink_ring::area::{AreaLayout, HEADER_LEN};
use vmlink_ring::{ControlWord, RingMem, SliceMem, init_control};

const CHANNELS: usize = 3;
const RING: u64 = 4096 + 4 * 4096;

/// The one memory area: 64-bit words, accessed only atomically.
struct Area {
    words: Box<[AtomicU64]>,
}

impl Area {
    fn new(len: u64) -> Self {
        Self {
            words: (0..len / 8).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// A ring's memory at `offset`, `len` bytes, inside the area.
    fn ring(&self, offset: u64, len: u64) -> SliceMem<'_> {
        let (offset, len) = (offset as usize, len as usize);
        assert!(offset.is_multiple_of(8) && offset + len <= self.words.len() * 8);
        let start = std::ptr::NonNull::from(&self.words[offset / 8]).cast::<u8>();
        // SAFETY: `start..start + len` lies inside `self.words` (asserted), which lives as
        // long as the returned value borrows `self`, and is only ever accessed atomically:
        // through this ring memory and the header's word loads and stores.
        unsafe { vmlink_ring_mapping::slice_mem(start, len) }.expect("a validated ring")
    }

    fn write_header(&self, page: &[u8; HEADER_LEN]) {
        for (w, chunk) in self.words.iter().zip(page.as_chunks::<8>().0) {
            w.store(u64::from_le_bytes(*chunk), Ordering::Relaxed);
        }
    }

    /// A private copy of the header page, each word read once.
    fn read_header(&self) -> [u8; HEADER_LEN] {
        let mut page = [0u8; HEADER_LEN];
        for (chunk, w) in page
            .as_chunks_mut::<8>()
            .0
            .iter_mut()
            .zip(self.words.iter())
        {
            *chunk = w.load(Ordering::Relaxed).to_le_bytes();
        }
        page
    }
}

type Sub<'a> = Channel<SliceMem<'a>, InProcessDoorbell>;

/// The owner's channels and the peer's, built from the header the owner wrote.
fn sub_channels<'a>(area: &'a Area, layout: &AreaLayout) -> Vec<(Sub<'a>, Sub<'a>)> {
    // The owner: the header, then every ring's control page.
    area.write_header(&layout.encode());
    for c in layout.channels() {
        init_control(&area.ring(c.guest_to_host.offset, c.guest_to_host.len));
        init_control(&area.ring(c.host_to_guest.offset, c.host_to_guest.len));
    }
    // The peer: its own copy of the header, validated against the area's length.
    let parsed = AreaLayout::parse(&area.read_header(), (area.words.len() * 8) as u64)
        .expect("a valid header");
    assert_eq!(parsed.layout.channels().len(), CHANNELS);
    parsed
        .layout
        .channels()
        .iter()
        .map(|c| {
            let g2h = || area.ring(c.guest_to_host.offset, c.guest_to_host.len);
            let h2g = || area.ring(c.host_to_guest.offset, c.host_to_guest.len);
            let (dh, dg) = vmlink_channel::in_process_pair();
            let host = Channel::new(h2g(), g2h(), dh, Config::default()).unwrap();
            let guest = Channel::new(g2h(), h2g(), dg, Config::default()).unwrap();
            (host, guest)
        })
        .collect()
}

fn soon() -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(10))
}

#[test]
fn channels_in_one_area_carry_their_own_traffic() {
    let layout = AreaLayout::packed(&[(RING, RING); CHANNELS], 0).unwrap();
    let area = Area::new(layout.len());
    let channels = sub_channels(&area, &layout);
    thread::scope(|s| {
        for (i, (host, guest)) in channels.iter().enumerate() {
            // The guest side of each channel answers its 1,000 requests with its channel
            // number.
            s.spawn(move || {
                let mut buf = [0u8; 64];
                for _ in 0..1000 {
                    let r = guest.recv(&mut buf, soon()).unwrap();
                    let mut answer = r.payload(&buf)[..8].to_vec();
                    answer.push(i as u8);
                    guest.complete(r.transaction_id, &answer, soon()).unwrap();
                }
            });
            // Two callers per channel, all channels at once.
            for caller in 0..2u64 {
                s.spawn(move || {
                    let mut response = [0u8; 64];
                    for n in 0..500u64 {
                        let token = (caller << 32) | n;
                        let len = host
                            .call(&token.to_le_bytes(), &mut response, soon())
                            .unwrap();
                        assert_eq!(len, 16);
                        assert_eq!(response[..8], token.to_le_bytes());
                        assert_eq!(response[8], i as u8, "the answer came on its own channel");
                    }
                });
            }
        }
    });
    for (i, (host, guest)) in channels.iter().enumerate() {
        assert_eq!(host.counters().packets_sent, 1000, "channel {i}");
        assert_eq!(guest.counters().packets_received, 1000, "channel {i}");
    }
}

#[test]
fn a_sub_channel_that_fails_takes_no_other_down() {
    let layout = AreaLayout::packed(&[(RING, RING); CHANNELS], 0).unwrap();
    let area = Area::new(layout.len());
    let channels = sub_channels(&area, &layout);
    // A hostile write to channel 1's guest→host ring: a write index past its data.
    let c1 = layout.channels()[1];
    area.ring(c1.guest_to_host.offset, c1.guest_to_host.len)
        .store_control(ControlWord::WriteIndex, !7u32);
    let mut buf = [0u8; 64];
    let (host1, _) = &channels[1];
    assert!(matches!(
        host1.recv(&mut buf, Wait::Now).polled(),
        Err(ChannelError::Failed(_))
    ));
    assert!(matches!(host1.state(), ChannelState::Failed(_)));
    for i in [0, 2] {
        let (host, guest) = &channels[i];
        guest.send(b"alive", Wait::Now).unwrap();
        let r = host
            .recv(&mut buf, Wait::Now)
            .polled()
            .unwrap()
            .expect("a packet");
        assert_eq!(&r.payload(&buf)[..5], b"alive");
        assert_eq!(host.state(), ChannelState::Open, "channel {i}");
    }
}
