//! Guest memory: validating a guest's ring page list and building rings over it.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ptr::NonNull;

use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryRegion};
use vmlink_channel::packet::ReceivedGpaRange;
use vmlink_channel::{Channel, ChannelError, Config, Doorbell};
use vmlink_ring::protocol::PAGE_SIZE;
use vmlink_ring::{ControlWord, DataPage, MAX_DATA_LEN, PageListMem, RingMem};

/// A guest's ring page list was rejected. Nothing was mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PageError {
    /// The list does not hold the two rings it should.
    #[error(
        "a page list of {len} pages cannot hold an outgoing ring of {guest_to_host} pages and an incoming ring (each needs a control page and at least one data page)"
    )]
    BadLength {
        /// Pages in the list.
        len: usize,
        /// Pages said to belong to the guest's outgoing ring (control page included).
        guest_to_host: usize,
    },
    /// A ring's data area would exceed the ring core's limit.
    #[error("a ring of {pages} pages is larger than the ring core allows")]
    RingTooLarge {
        /// The ring's pages, control page included.
        pages: usize,
    },
    /// A page lies (partly) outside guest RAM.
    #[error("page {page:#x} (list index {index}) is outside guest RAM")]
    OutsideGuestRam {
        /// Index in the list.
        index: usize,
        /// The page number.
        page: u64,
    },
    /// The memory region holding a page has no host mapping.
    #[error("page {page:#x} (list index {index}) has no host mapping")]
    NoHostMapping {
        /// Index in the list.
        index: usize,
        /// The page number.
        page: u64,
    },
    /// A page appears twice in the list (the rings would overlap).
    #[error("page {page:#x} appears at list indices {first} and {second}")]
    Duplicate {
        /// The page number.
        page: u64,
        /// Its first index.
        first: usize,
        /// Its second index.
        second: usize,
    },
    /// Two different pages map to the same host memory (aliased regions).
    #[error("pages at list indices {first} and {second} alias the same host memory")]
    Aliased {
        /// The first index.
        first: usize,
        /// The second index.
        second: usize,
    },
}

/// Resolves one guest page to its host address and to the dirty bitmap of its region (a
/// slice starting at the page), checking the whole page is in one region.
fn host_page<'m, M, B>(mem: &'m M, index: usize, page: u64) -> Result<(NonNull<u8>, B), PageError>
where
    M: GuestMemory,
    <M::R as GuestMemoryRegion>::B: WithBitmapSlice<'m, S = B>,
    B: BitmapSlice,
{
    let outside = PageError::OutsideGuestRam { index, page };
    let gpa = page.checked_mul(PAGE_SIZE as u64).ok_or(outside.clone())?;
    let (region, addr) = mem
        .to_region_addr(GuestAddress(gpa))
        .ok_or(outside.clone())?;
    // The last byte of the page must be in the same region.
    region
        .checked_offset(addr, PAGE_SIZE - 1)
        .ok_or(outside.clone())?;
    let host = region
        .get_host_address(addr)
        .map_err(|_| PageError::NoHostMapping { index, page })?;
    let host = NonNull::new(host).ok_or(PageError::NoHostMapping { index, page })?;
    if !(host.as_ptr() as usize).is_multiple_of(8) {
        return Err(PageError::NoHostMapping { index, page });
    }
    // Bitmap offsets are relative to the region, as in vm-memory's own writes.
    let dirty = region.bitmap().slice_at(addr.raw_value() as usize);
    Ok((host, dirty))
}

/// A ring over guest pages, as the host sees it: the ring core's
/// [`PageListMem`] over the ring's pages, plus the dirty bitmap of the
/// guest memory regions holding them.
///
/// Every store goes to guest memory first and is then marked dirty in the region's bitmap
/// (`vm_memory::bitmap::Bitmap::mark_dirty`), the order vm-memory's own writes use: a
/// migration pass that clears the bit between the store and the mark copies the page
/// again in its next pass. Data bytes mark the pages they land in, control words their
/// control page; reads mark nothing. With `B = ()` (memory without dirty tracking) marking
/// does nothing.
///
/// `B` is the bitmap slice type of the memory's regions: `()` for `GuestMemoryMmap<()>`,
/// `RefSlice<'m, AtomicBitmap>` for `GuestMemoryMmap<AtomicBitmap>` (in general
/// `vm_memory::bitmap::MS<'m, M>`).
#[derive(Debug, Clone)]
pub struct GuestRing<'m, B = ()> {
    mem: PageListMem<'m, Vec<&'m DataPage>>,
    control_dirty: B,
    /// One per data page, in ring order, each starting at its page.
    data_dirty: Vec<B>,
}

impl<B: Bitmap> GuestRing<'_, B> {
    /// Marks `len` data-area bytes from `offset` dirty, page by page.
    #[inline]
    fn mark_data(&self, offset: usize, len: usize) {
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let in_page = at % PAGE_SIZE;
            let n = (PAGE_SIZE - in_page).min(end - at);
            self.data_dirty[at / PAGE_SIZE].mark_dirty(in_page, n);
            at += n;
        }
    }
}

impl<B: Bitmap> RingMem for GuestRing<'_, B> {
    #[inline]
    fn data_len(&self) -> usize {
        self.mem.data_len()
    }
    #[inline]
    fn load_control(&self, word: ControlWord) -> u32 {
        self.mem.load_control(word)
    }
    #[inline]
    fn store_control(&self, word: ControlWord, value: u32) {
        self.mem.store_control(word, value);
        self.control_dirty.mark_dirty(word.offset(), 4);
    }
    #[inline]
    fn read_data(&self, offset: usize, buf: &mut [u8]) {
        self.mem.read_data(offset, buf)
    }
    #[inline]
    fn write_data(&self, offset: usize, data: &[u8]) {
        self.mem.write_data(offset, data);
        self.mark_data(offset, data.len());
    }
}

/// A guest's two rings, validated and resolved to host memory.
///
/// Borrows the guest memory for `'m`, and the rings and channels built from it borrow it
/// too. Built only from a page list that passed every check, by the `unsafe`
/// [`RingPages::new`], whose contract says what the VMM owes these pages while they are
/// ring memory. `B` is the regions' dirty-bitmap slice type (see [`GuestRing`]): every page
/// the host's rings write is marked dirty there.
#[derive(Debug)]
pub struct RingPages<'m, B = ()> {
    guest_to_host: GuestRing<'m, B>,
    host_to_guest: GuestRing<'m, B>,
    pages: Vec<u64>,
    /// Each page's host address, in list order (to refuse aliasing across channels).
    hosts: Vec<usize>,
}

/// The host's channel over a guest's rings.
pub type HostChannel<'m, D, B = ()> = Channel<GuestRing<'m, B>, D>;

impl<'m, B: BitmapSlice> RingPages<'m, B> {
    /// Validates `pages` (4 KiB guest page numbers: the guest's outgoing ring, control page
    /// first, then the host's outgoing ring, control page first) against `mem` and resolves
    /// them. `guest_to_host` is the number of pages of the first ring, control page
    /// included.
    ///
    /// Every page is checked before any is mapped: inside guest RAM and wholly inside one
    /// region, no page twice, no two pages aliasing the same host memory, each ring at
    /// least a control page and a data page.
    ///
    /// # Safety
    ///
    /// The rings reach the listed pages through atomic references (`&ControlWords`,
    /// `&DataPage`) made from the regions' host addresses
    /// (`GuestMemoryRegion::get_host_address`), outside vm-memory's accessors, for as long
    /// as the returned value or any ring or channel built from it lives (at most `'m`).
    /// The guest may read and write the pages at any time; the ring code validates
    /// everything it reads. For that time the caller (the VMM) guarantees:
    ///
    /// - **The pages stay mapped**, readable and writable, at the host addresses `mem`
    ///   gives for them. Borrowing `mem` keeps its regions alive, but cannot stop memory
    ///   being unmapped behind its back: no region holding a ring page may be removed from
    ///   the host's address space (`munmap`), replaced (`mmap` with `MAP_FIXED`, `mremap`)
    ///   or, if backed by a file, truncated.
    /// - **Nothing else in this process writes them or makes references to them.** No Rust
    ///   reference (`&`/`&mut`) to those bytes is formed (for example a slice built from
    ///   `get_host_address`), and they are written only through rings built by
    ///   `RingPages`. Reading them through vm-memory's accessors (`Bytes::read_slice`,
    ///   `VolatileSlice`) is allowed, as a migration thread copying dirty pages does:
    ///   vm-memory's own safe API mixes such volatile reads with atomic stores to guest
    ///   memory, and this contract accepts the same. Such a copy may catch a ring
    ///   mid-update, as it may any page the guest is writing.
    ///
    /// ```
    /// use vm_memory::{GuestAddress, GuestMemoryMmap};
    /// use vmlink_kvm::RingPages;
    /// use vmlink_ring::RingMem;
    ///
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    /// // SAFETY: `mem` is an anonymous mapping owned here and kept until the rings are
    /// // dropped; nothing else in this program touches the listed pages.
    /// let rings = unsafe { RingPages::new(&mem, &[0x20, 0x35, 0x21, 0x40, 0x22], 3) }?;
    /// assert_eq!(rings.guest_to_host().data_len(), 2 * 4096);
    /// assert_eq!(rings.host_to_guest().data_len(), 4096);
    /// # Ok::<(), vmlink_kvm::PageError>(())
    /// ```
    ///
    /// Without `unsafe` (and so without a caller vouching for the contract) the call does
    /// not compile:
    ///
    /// ```compile_fail,E0133
    /// # use vm_memory::{GuestAddress, GuestMemoryMmap};
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    /// let rings = vmlink_kvm::RingPages::new(&mem, &[0x20, 0x35, 0x21, 0x40, 0x22], 3);
    /// ```
    pub unsafe fn new<M>(mem: &'m M, pages: &[u64], guest_to_host: usize) -> Result<Self, PageError>
    where
        M: GuestMemory,
        <M::R as GuestMemoryRegion>::B: WithBitmapSlice<'m, S = B>,
    {
        let len = pages.len();
        if guest_to_host < 2 || len < guest_to_host + 2 {
            return Err(PageError::BadLength { len, guest_to_host });
        }
        for ring in [guest_to_host, len - guest_to_host] {
            if (ring - 1).saturating_mul(PAGE_SIZE) > MAX_DATA_LEN {
                return Err(PageError::RingTooLarge { pages: ring });
            }
        }
        let mut seen: HashMap<u64, usize> = HashMap::with_capacity(len);
        for (index, &page) in pages.iter().enumerate() {
            if let Some(&first) = seen.get(&page) {
                return Err(PageError::Duplicate {
                    page,
                    first,
                    second: index,
                });
            }
            seen.insert(page, index);
        }
        let mut hosts = Vec::with_capacity(len);
        for (index, &page) in pages.iter().enumerate() {
            hosts.push(host_page(mem, index, page)?);
        }
        let mut by_host: HashMap<usize, usize> = HashMap::with_capacity(len);
        for (index, (host, _)) in hosts.iter().enumerate() {
            if let Some(&first) = by_host.get(&(host.as_ptr() as usize)) {
                return Err(PageError::Aliased {
                    first,
                    second: index,
                });
            }
            by_host.insert(host.as_ptr() as usize, index);
        }
        let ring = |hosts: &[(NonNull<u8>, B)]| {
            let (control_page, control_dirty) = &hosts[0];
            // SAFETY: the pointer is the 8-aligned host address of a whole guest page of
            // `mem` (checked by `host_page`), distinct from every other ring page (checked
            // above). The caller guarantees it stays mapped while the rings live (at most
            // 'm), that nothing else in this process makes references to it, and that this
            // process writes it only through these atomics; its only other access is
            // vm-memory's volatile reads, the mix vm-memory's safe API itself makes. The
            // guest writes from outside the process, which atomics allow.
            let control = unsafe { vmlink_ring_mapping::control_words(*control_page) }
                .expect("host_page checked 8-byte alignment");
            let data = hosts[1..]
                .iter()
                // SAFETY: as above, for each data page.
                .map(|(p, _)| unsafe { vmlink_ring_mapping::data_page(*p) })
                .collect::<Result<Vec<_>, _>>()
                .expect("host_page checked 8-byte alignment");
            GuestRing {
                mem: PageListMem::new(control, data).expect("validated: 1..=MAX_DATA_LEN"),
                control_dirty: control_dirty.clone(),
                data_dirty: hosts[1..].iter().map(|(_, d)| d.clone()).collect(),
            }
        };
        Ok(Self {
            guest_to_host: ring(&hosts[..guest_to_host]),
            host_to_guest: ring(&hosts[guest_to_host..]),
            pages: pages.to_vec(),
            hosts: hosts.iter().map(|(h, _)| h.as_ptr() as usize).collect(),
        })
    }

    /// The validated page list.
    pub fn pages(&self) -> &[u64] {
        &self.pages
    }

    /// Each page's host address, in list order.
    pub(crate) fn host_addresses(&self) -> &[usize] {
        &self.hosts
    }

    /// The guest's outgoing ring (the host reads it).
    pub fn guest_to_host(&self) -> GuestRing<'m, B> {
        self.guest_to_host.clone()
    }

    /// The host's outgoing ring (the guest reads it).
    pub fn host_to_guest(&self) -> GuestRing<'m, B> {
        self.host_to_guest.clone()
    }
}

/// The host's channel over a guest's rings: writes the host-to-guest ring, reads the
/// guest-to-host ring. The guest allocated the memory and so initialised both control
/// pages; the channel checks them.
pub fn host_channel<'m, D: Doorbell, B: BitmapSlice>(
    rings: &RingPages<'m, B>,
    doorbell: D,
    config: Config,
) -> Result<HostChannel<'m, D, B>, ChannelError> {
    Channel::new(
        rings.host_to_guest(),
        rings.guest_to_host(),
        doorbell,
        config,
    )
}

/// A GPA range could not be read from guest memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GpaReadError {
    /// The output buffer is not the range's length.
    #[error("the range holds {range} bytes, the buffer {buf}")]
    Length {
        /// Bytes in the range.
        range: usize,
        /// Bytes in the buffer.
        buf: usize,
    },
    /// A page of the range is not (wholly) in guest RAM.
    #[error("page {page:#x} of the range is outside guest RAM")]
    OutsideGuestRam {
        /// The page number.
        page: u64,
    },
}

/// Copies a received GPA-direct range straight out of guest memory into `out` (which must
/// be exactly `byte_count` long). Every page number is checked against the memory map.
pub fn read_gpa_range<M: GuestMemory>(
    mem: &M,
    range: &ReceivedGpaRange<'_>,
    out: &mut [u8],
) -> Result<(), GpaReadError> {
    let total = range.byte_count as usize;
    if out.len() != total {
        return Err(GpaReadError::Length {
            range: total,
            buf: out.len(),
        });
    }
    let mut done = 0;
    let mut in_page = range.byte_offset as usize;
    for page in range.pages() {
        if done == total {
            break;
        }
        let n = (PAGE_SIZE - in_page).min(total - done);
        let gpa = page
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|base| base.checked_add(in_page as u64))
            .ok_or(GpaReadError::OutsideGuestRam { page })?;
        mem.read_slice(&mut out[done..done + n], GuestAddress(gpa))
            .map_err(|_| GpaReadError::OutsideGuestRam { page })?;
        done += n;
        in_page = 0;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;
    use vmlink_channel::{Polled, Wait};
    use vmlink_ring::init_control;

    /// `RingPages::new` over memory owned by the test.
    fn rings<'m>(
        mem: &'m GuestMemoryMmap<()>,
        pages: &[u64],
        guest_to_host: usize,
    ) -> Result<RingPages<'m>, PageError> {
        // SAFETY: each test's `mem` is an anonymous mapping it owns and keeps until the
        // rings are gone; nothing in the test touches ring pages except through the rings
        // and vm-memory's accessors.
        unsafe { RingPages::new(mem, pages, guest_to_host) }
    }

    fn two_regions() -> GuestMemoryMmap<()> {
        // 1 MiB at 0 and 1 MiB at 4 MiB: pages 0..0x100 and 0x400..0x500.
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(4 << 20), 1 << 20),
        ])
        .unwrap()
    }

    #[test]
    fn accepts_scattered_pages_across_regions() {
        let mem = two_regions();
        let pages = [0x10, 0x4ff, 0x12, 0x400, 0x11, 0x20];
        let rings = rings(&mem, &pages, 3).unwrap();
        assert_eq!(rings.pages(), &pages);
        let g2h = rings.guest_to_host();
        let h2g = rings.host_to_guest();
        assert_eq!(g2h.data_len(), 2 * PAGE_SIZE);
        assert_eq!(h2g.data_len(), 2 * PAGE_SIZE);
        // Ring bytes land in the right guest pages, in list order.
        g2h.write_data(PAGE_SIZE - 4, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(0x4ff * 4096 + 4092))
            .unwrap();
        assert_eq!(got, [1, 2, 3, 4]);
        mem.read_slice(&mut got, GuestAddress(0x12 * 4096)).unwrap();
        assert_eq!(got, [5, 6, 7, 8]);
        // A channel over them works once the guest initialised the control pages.
        init_control(&g2h);
        init_control(&h2g);
        let (a, b) = vmlink_channel::in_process_pair();
        let host = host_channel(&rings, a, Config::default()).unwrap();
        let guest = Channel::new(g2h, h2g, b, Config::default()).unwrap();
        guest.send(b"to host!", Wait::Now).unwrap();
        host.send(b"to guest", Wait::Now).unwrap();
        let mut buf = [0u8; 32];
        let got = host.recv(&mut buf, Wait::Now).polled().unwrap().unwrap();
        assert_eq!(got.payload(&buf), b"to host!");
        let got = guest.recv(&mut buf, Wait::Now).polled().unwrap().unwrap();
        assert_eq!(got.payload(&buf), b"to guest");
    }

    #[test]
    fn rejects_wrong_lengths() {
        let mem = two_regions();
        for (pages, g2h) in [
            (&[1u64, 2, 3][..], 2),
            (&[1, 2, 3, 4][..], 1),
            (&[1, 2, 3, 4][..], 3),
            (&[][..], 0),
        ] {
            assert_eq!(
                rings(&mem, pages, g2h).unwrap_err(),
                PageError::BadLength {
                    len: pages.len(),
                    guest_to_host: g2h
                }
            );
        }
    }

    #[test]
    fn rejects_pages_outside_ram() {
        let mem = two_regions();
        for (bad, index) in [
            (0x100u64, 2usize),
            (0x3ff, 0),
            (0x500, 3),
            (u64::MAX, 1),
            (u64::MAX / 4096 + 1, 1),
        ] {
            let mut pages = [1, 2, 3, 4];
            pages[index] = bad;
            assert_eq!(
                rings(&mem, &pages, 2).unwrap_err(),
                PageError::OutsideGuestRam { index, page: bad },
                "page {bad:#x}"
            );
        }
    }

    #[test]
    fn rejects_a_page_straddling_a_region_end() {
        // A region whose size is not a page multiple: its last page is partial.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 5 * 4096 + 100)]).unwrap();
        assert_eq!(
            rings(&mem, &[1, 2, 3, 5], 2).unwrap_err(),
            PageError::OutsideGuestRam { index: 3, page: 5 }
        );
    }

    #[test]
    fn rejects_duplicates_and_overlap_between_rings() {
        let mem = two_regions();
        assert_eq!(
            rings(&mem, &[1, 2, 3, 2], 2).unwrap_err(),
            PageError::Duplicate {
                page: 2,
                first: 1,
                second: 3
            }
        );
        // Duplicates are reported before anything else, even with a page outside RAM.
        assert_eq!(
            rings(&mem, &[0x9999, 7, 8, 7], 2).unwrap_err(),
            PageError::Duplicate {
                page: 7,
                first: 1,
                second: 3
            }
        );
    }

    #[test]
    fn reads_gpa_ranges_from_guest_memory() {
        use vmlink_channel::packet::{GpaRange, encode_gpa_header, parse_gpa_header};
        let mem = two_regions();
        let data: Vec<u8> = (0..6000u32).map(|i| (i * 13) as u8).collect();
        // 6000 bytes from offset 3000 of page 0x20, continuing in page 0x401, then 0x21.
        mem.write_slice(&data[..1096], GuestAddress(0x20 * 4096 + 3000))
            .unwrap();
        mem.write_slice(&data[1096..5192], GuestAddress(0x401 * 4096))
            .unwrap();
        mem.write_slice(&data[5192..], GuestAddress(0x21 * 4096))
            .unwrap();
        let pages = [0x20, 0x401, 0x21];
        let range = GpaRange {
            byte_offset: 3000,
            byte_count: 6000,
            pages: &pages,
        };
        let mut header = vec![0u8; 8 + 8 + 24];
        encode_gpa_header(&[range], |at, bytes| {
            header[at..at + bytes.len()].copy_from_slice(bytes)
        });
        let parsed = parse_gpa_header(&header, None).unwrap().next().unwrap();
        let mut out = vec![0u8; 6000];
        read_gpa_range(&mem, &parsed, &mut out).unwrap();
        assert_eq!(out, data);
        let mut short = vec![0u8; 10];
        assert!(matches!(
            read_gpa_range(&mem, &parsed, &mut short),
            Err(GpaReadError::Length { .. })
        ));

        let bad = [0x20, 0x300, 0x21];
        let range = GpaRange {
            pages: &bad,
            ..range
        };
        encode_gpa_header(&[range], |at, bytes| {
            header[at..at + bytes.len()].copy_from_slice(bytes)
        });
        let parsed = parse_gpa_header(&header, None).unwrap().next().unwrap();
        assert_eq!(
            read_gpa_range(&mem, &parsed, &mut out),
            Err(GpaReadError::OutsideGuestRam { page: 0x300 })
        );
    }
}
