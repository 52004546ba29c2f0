//! Dirty tracking of host writes to guest memory: a VMM that migrates a live guest copies
//! the pages its dirty bitmap shows, so every page the host's rings write must be marked
//! there, and no other.
//!
//! Guest memory is a `GuestMemoryMmap<AtomicBitmap>` (vm-memory's `backend-bitmap`) of two
//! regions, and the rings' pages are scattered over both. A stand-in guest (a channel over
//! the same rings, on the host) sends and receives; before each host step the bitmaps are
//! cleared, and after it the set of dirty pages of all guest RAM must be exactly the pages
//! that step wrote.

use vm_memory::bitmap::{AtomicBitmap, Bitmap, RefSlice};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};
use vmlink_channel::Polled;
use vmlink_channel::Wait;
use vmlink_channel::{Channel, Config, InProcessDoorbell, in_process_pair};
use vmlink_kvm::{GuestRing, HostChannel, RingPages, host_channel};
use vmlink_ring::protocol::PAGE_SIZE;
use vmlink_ring::{ControlWord, RingMem, WaitDecision, init_control};

type Mem = GuestMemoryMmap<AtomicBitmap>;
/// The bitmap slice of a region of `Mem`.
type Dirty<'m> = RefSlice<'m, AtomicBitmap>;

/// The guest's outgoing ring: control page, two data pages.
const G2H: [u64; 3] = [0x10, 0x401, 0x12];
/// The host's outgoing ring: control page, three data pages.
const H2G: [u64; 4] = [0x402, 0x14, 0x405, 0x16];

/// 1 MiB at GPA 0 and 1 MiB at 4 MiB: pages 0..0x100 and 0x400..0x500.
fn guest_memory() -> Mem {
    let mem = Mem::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(4 << 20), 1 << 20)])
        .expect("guest memory");
    for region in mem.iter() {
        // One bit per 4 KiB page: the host's page size is the ring's.
        assert_eq!(MmapRegion::bitmap(region).len(), (1 << 20) / PAGE_SIZE);
    }
    mem
}

/// Every dirty page of guest RAM, by page number, in order.
fn dirty_pages(mem: &Mem) -> Vec<u64> {
    let mut dirty = Vec::new();
    for region in mem.iter() {
        let first = region.start_addr().0 / PAGE_SIZE as u64;
        let bitmap = region.bitmap();
        for page in 0..region.len() / PAGE_SIZE as u64 {
            if bitmap.dirty_at(page as usize * PAGE_SIZE) {
                dirty.push(first + page);
            }
        }
    }
    dirty
}

/// Clears every region's bitmap, as a migration pass does after copying the dirty pages.
fn clear(mem: &Mem) {
    for region in mem.iter() {
        MmapRegion::bitmap(region).reset();
    }
    assert_eq!(dirty_pages(mem), [] as [u64; 0]);
}

/// Sorted page numbers.
fn pages(mut list: Vec<u64>) -> Vec<u64> {
    list.sort_unstable();
    list
}

/// A control word of a ring, read through vm-memory.
fn control(mem: &Mem, control_page: u64, word: ControlWord) -> u32 {
    mem.read_obj(GuestAddress(
        control_page * PAGE_SIZE as u64 + word.offset() as u64,
    ))
    .expect("control word")
}

struct Setup<'m> {
    host: HostChannel<'m, InProcessDoorbell, Dirty<'m>>,
    guest: Channel<GuestRing<'m, Dirty<'m>>, InProcessDoorbell>,
}

fn setup(mem: &Mem) -> Setup<'_> {
    assert_eq!(dirty_pages(mem), [] as [u64; 0], "fresh memory is clean");
    let list: Vec<u64> = G2H.iter().chain(&H2G).copied().collect();
    // SAFETY: `mem` is an anonymous mapping owned by the test and dropped after the rings;
    // the test reads ring pages only through vm-memory's accessors.
    let rings = unsafe { RingPages::new(mem, &list, G2H.len()) }.expect("valid page list");
    // The guest allocated the rings, so it initialises the control pages.
    init_control(&rings.guest_to_host());
    init_control(&rings.host_to_guest());
    let (a, b) = in_process_pair();
    let host = host_channel(&rings, a, Config::default()).expect("host channel");
    let guest = Channel::new(
        rings.guest_to_host(),
        rings.host_to_guest(),
        b,
        Config::default(),
    )
    .expect("guest channel");
    Setup { host, guest }
}

/// A payload whose bytes say which packet they belong to.
fn payload(seq: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seq.wrapping_mul(31) ^ i as u8).collect()
}

/// Bytes a packet of `len` payload bytes takes in the ring: descriptor, padded payload,
/// trailer.
fn ring_bytes(len: usize) -> usize {
    16 + len.next_multiple_of(8) + 8
}

#[test]
fn host_sends_mark_exactly_the_pages_they_write() {
    let mem = guest_memory();
    let Setup { host, guest } = setup(&mem);
    let [h2g_control, d0, d1, d2] = H2G;
    let mut buf = vec![0u8; 8192];
    let mut receive = |want: &[u8]| {
        let got = guest
            .recv(&mut buf, Wait::Now)
            .polled()
            .expect("guest receive")
            .expect("a packet");
        assert_eq!(got.payload(&buf), want);
    };

    // 5024 ring bytes from offset 0: data pages 0 and 1, and write_index.
    clear(&mem);
    let first = payload(1, 5000);
    host.send(&first, Wait::Now).expect("send");
    assert_eq!(dirty_pages(&mem), pages(vec![h2g_control, d0, d1]));
    receive(&first);

    // From 5024 to 11048: data pages 1 and 2.
    clear(&mem);
    let second = payload(2, 6000);
    host.send(&second, Wait::Now).expect("send");
    assert_eq!(dirty_pages(&mem), pages(vec![h2g_control, d1, d2]));
    receive(&second);

    // From 11048 past the end of the ring to 1784: data pages 2 and 0, not 1.
    clear(&mem);
    let third = payload(3, 3000);
    assert!(5024 + ring_bytes(6000) + ring_bytes(3000) > 3 * PAGE_SIZE);
    host.send(&third, Wait::Now).expect("send");
    assert_eq!(dirty_pages(&mem), pages(vec![h2g_control, d0, d2]));
    receive(&third);
    assert_eq!(
        control(&mem, h2g_control, ControlWord::WriteIndex) as usize,
        (5024 + ring_bytes(6000) + ring_bytes(3000)) % (3 * PAGE_SIZE),
        "the marked control page holds the new write index"
    );
}

#[test]
fn host_reads_mark_only_the_guests_control_page() {
    let mem = guest_memory();
    let Setup { host, guest } = setup(&mem);
    let g2h_control = G2H[0];
    let mut buf = vec![0u8; 8192];

    // The guest's packets cover both of its data pages; receiving them writes only the
    // read index (and reading the data marks nothing).
    let sent = [payload(4, 4000), payload(5, 3000)];
    for p in &sent {
        guest.send(p, Wait::Now).expect("guest send");
    }
    clear(&mem);
    for p in &sent {
        let got = host
            .recv(&mut buf, Wait::Now)
            .polled()
            .expect("receive")
            .expect("a packet");
        assert_eq!(got.payload(&buf), &p[..]);
    }
    assert!(
        host.recv(&mut buf, Wait::Now)
            .polled()
            .expect("receive")
            .is_none()
    );
    assert_eq!(dirty_pages(&mem), [g2h_control]);
    assert_eq!(
        control(&mem, g2h_control, ControlWord::ReadIndex) as usize,
        ring_bytes(4000) + ring_bytes(3000)
    );

    // interrupt_mask: set by a polling host...
    clear(&mem);
    host.mask_interrupts();
    assert_eq!(dirty_pages(&mem), [g2h_control]);
    assert_eq!(control(&mem, g2h_control, ControlWord::InterruptMask), 1);

    // ...and cleared before it sleeps.
    clear(&mem);
    assert_eq!(host.prepare_recv_wait().expect("arm"), WaitDecision::Sleep);
    assert_eq!(dirty_pages(&mem), [g2h_control]);
    assert_eq!(control(&mem, g2h_control, ControlWord::InterruptMask), 0);
}

#[test]
fn a_host_waiting_for_space_marks_its_control_page() {
    let mem = guest_memory();
    let Setup {
        host,
        guest: _guest,
    } = setup(&mem);
    let h2g_control = H2G[0];
    let mut sent = 0u8;
    while host.send(&payload(sent, 1000), Wait::Now).is_ok() {
        sent += 1;
    }
    assert!(
        sent >= 10,
        "the ring took {sent} packets before it was full"
    );
    assert_eq!(control(&mem, h2g_control, ControlWord::PendingSendSize), 0);

    // pending_send_size: the host asks the guest to signal once there is room.
    clear(&mem);
    assert_eq!(
        host.prepare_send_wait(0, 1000).expect("arm"),
        WaitDecision::Sleep
    );
    assert_ne!(control(&mem, h2g_control, ControlWord::PendingSendSize), 0);
    assert_eq!(dirty_pages(&mem), [h2g_control]);
}

#[test]
fn every_ring_store_marks_its_page() {
    // The ring memory itself, below the channel: each control word and each data page of
    // both rings, one store at a time, with the bit checked in the right region.
    let mem = guest_memory();
    let list: Vec<u64> = G2H.iter().chain(&H2G).copied().collect();
    // SAFETY: as in `setup`.
    let rings = unsafe { RingPages::new(&mem, &list, G2H.len()) }.expect("valid page list");
    for (ring, pages) in [
        (rings.guest_to_host(), &G2H[..]),
        (rings.host_to_guest(), &H2G[..]),
    ] {
        for word in ControlWord::ALL {
            clear(&mem);
            ring.store_control(word, 8);
            assert_eq!(dirty_pages(&mem), [pages[0]], "{word:?}");
        }
        for (i, &page) in pages[1..].iter().enumerate() {
            clear(&mem);
            ring.write_data(i * PAGE_SIZE + PAGE_SIZE - 1, &[0xAB]);
            assert_eq!(dirty_pages(&mem), [page], "last byte of data page {i}");
            let mut back = [0u8];
            ring.read_data(i * PAGE_SIZE + PAGE_SIZE - 1, &mut back);
            assert_eq!(back, [0xAB]);
        }
        clear(&mem);
        let mut all = vec![0u8; ring.data_len()];
        ring.read_data(0, &mut all);
        assert_eq!(dirty_pages(&mem), [] as [u64; 0], "reads mark nothing");
    }
}
