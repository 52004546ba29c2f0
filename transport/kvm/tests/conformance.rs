//! The channel conformance suite over page-list memory: both ends on the host (side B on a
//! thread), each ring built by `RingPages` from a `vm-memory` `GuestMemoryMmap` of two
//! regions, over a deliberately scattered page list that crosses between them.
//!
//! The doorbell is `vmlink_channel::EventFdDoorbell` (a pair with a hang-up socket), not
//! `KvmDoorbell`: a `KvmDoorbell`'s far end is a vCPU's MMIO write, so without a VM there is
//! no second `KvmDoorbell` to pair it with, and it learns the guest left only when the VMM
//! calls `close`. The suite's close checks need each end to see the other go away, which
//! the eventfd pair's hang-up fd gives. Both are the same eventfd mechanism; what this
//! test exercises is the rings over guest pages, which are identical either way.

use std::os::unix::net::UnixStream;

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmlink_channel::conformance::{End, RingEnd, Threads, run_all};
use vmlink_channel::{Channel, Config, EventFdDoorbell};
use vmlink_kvm::{GuestRing, RingPages};
use vmlink_ring::protocol::PAGE_SIZE;
use vmlink_ring::{ControlWord, RingMem, init_control};

/// Scattered page numbers for a ring with `data_pages` data pages, alternating between
/// the two regions and never adjacent.
fn scattered(first: u64, data_pages: usize) -> Vec<u64> {
    (0..=data_pages as u64)
        .map(|i| {
            let base = if i % 2 == 0 { 0x10 } else { 0x400 };
            base + first + ((i * 7) % 97) * 3
        })
        .collect()
}

type PageEnd = RingEnd<GuestRing<'static>, EventFdDoorbell>;

fn pair(len: usize, ca: Config, cb: Config) -> (PageEnd, PageEnd) {
    assert!(len.is_multiple_of(PAGE_SIZE) && len / PAGE_SIZE <= 96);
    // Guest memory of two regions (pages 0..0x200 and 0x400..0x600), kept for the rest of
    // the test process: the 'static rings borrow it.
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 2 << 20),
            (GuestAddress(4 << 20), 2 << 20),
        ])
        .expect("guest memory"),
    ));
    let data_pages = len / PAGE_SIZE;
    // The "guest's" outgoing ring (B sends on it) first, then the host's (A sends on it).
    let mut pages = scattered(0, data_pages);
    pages.extend(scattered(1, data_pages));
    assert!(pages.windows(2).any(|w| w[1] != w[0] + 1));
    // SAFETY: `mem` is leaked, so it stays mapped for the rest of the process; nothing but
    // the rings touches the ring pages.
    let rings = unsafe { RingPages::new(mem, &pages, data_pages + 1) }.expect("valid page list");
    let rings: &'static RingPages<'static> = Box::leak(Box::new(rings));
    let (b_to_a, a_to_b) = (rings.guest_to_host(), rings.host_to_guest());
    assert_eq!(a_to_b.data_len(), len);
    init_control(&a_to_b);
    init_control(&b_to_a);
    let (da, db) = EventFdDoorbell::pair().expect("eventfds");
    let (ha, hb) = UnixStream::pair().expect("socket pair");
    let da = da.with_hangup(ha.into());
    let db = db.with_hangup(hb.into());
    let a = Channel::new(rings.host_to_guest(), rings.guest_to_host(), da, ca).expect("a");
    let b = Channel::new(rings.guest_to_host(), rings.host_to_guest(), db, cb).expect("b");
    (
        End::ring(
            a,
            Box::new(move || a_to_b.store_control(ControlWord::WriteIndex, 13)),
        ),
        End::ring(
            b,
            Box::new(move || b_to_a.store_control(ControlWord::WriteIndex, 13)),
        ),
    )
}

#[test]
fn page_list_rings_over_guest_memory_conform() {
    run_all(&Threads::new(pair));
}
