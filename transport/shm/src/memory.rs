//! The shared memory of one channel: a sealed memfd mapped `MAP_SHARED`, laid out as
//! `[header page][guest→host ring][host→guest ring][buffer area]`.
//!
//! The header page is vmlink's memory header ([`vmlink_ring::area`]): the host writes it
//! before it offers the memory, and it lists the rings and the buffer area, so a tool that
//! only has the memfd (`vmlink inspect /proc/PID/fd/N`) can read the channel. The guest
//! checks that it says exactly what the offer says before it uses anything.
//!
//! [`Mapping`] owns the mapping and unmaps it on drop. [`SharedMemory`] is an `Arc` of it
//! plus its [`Layout`]; the rings ([`ShmRing`]) and the buffer area ([`BufferArea`]) each
//! hold a clone of that `Arc`, so the memory stays mapped as long as any of them lives.
//! Nothing here forms a reference to plain bytes of the mapping: rings go through
//! [`SliceMem`] (atomics), the buffer area and the header page are slices of `AtomicU64`.

use std::io;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use nix::sys::mman::{self, MapFlags, ProtFlags};
use vmlink_ring::MAX_DATA_LEN;
use vmlink_ring::area::{AreaError, AreaLayout, HEADER_LEN, ParsedHeader};
use vmlink_ring::protocol::{CONTROL_PAGE_SIZE, PAGE_SIZE};
use vmlink_ring::words::{WordsOutOfBounds, read_words, write_words};

/// The largest memory a channel may have (header page, rings and buffer area together):
/// 4 GiB. A guest refuses an offer above it rather than map whatever a host asks.
pub const MAX_MEMORY_LEN: u64 = 1 << 32;

/// The most sub-channels one memory holds beside its primary channel: the memory header
/// lists at most 64 channels.
pub const MAX_SUB_CHANNELS: u32 = vmlink_ring::area::MAX_CHANNELS as u32 - 1;

/// The memory header page at the start of every channel's memory, before the rings.
pub const HEADER_PAGE_LEN: u64 = HEADER_LEN as u64;

/// Why a [`Layout`] is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// A ring must be a control page plus at least one data page, in whole pages, with a
    /// data area of at most [`MAX_DATA_LEN`] bytes.
    #[error(
        "a ring of {len} bytes is invalid: it must be a 4096-byte control page plus 1 to \
         524288 data pages (whole pages)"
    )]
    BadRing {
        /// The ring's length, control page included.
        len: u64,
    },
    /// The buffer area must be whole pages.
    #[error("a buffer area of {len} bytes is not a whole number of 4096-byte pages")]
    BadBuffer {
        /// The buffer area's length.
        len: u64,
    },
    /// A memory holds a primary channel and at most [`MAX_SUB_CHANNELS`] sub-channels.
    #[error("{count} sub-channels is more than the memory header's limit of {max}")]
    TooManySubChannels {
        /// The count asked for.
        count: u32,
        /// The limit.
        max: u32,
    },
    /// The whole memory is larger than [`MAX_MEMORY_LEN`].
    #[error("{len} bytes of shared memory is more than the limit of {max}")]
    TooLarge {
        /// The total length.
        len: u64,
        /// The limit.
        max: u64,
    },
}

/// The sizes of a channel's memory, in bytes. Each ring is counted with its control page.
///
/// In memory the [`HEADER_PAGE_LEN`]-byte header page comes first, then the regions in the
/// order of the fields, back to back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    /// The guest→host ring (the guest's outgoing ring), right after the header page.
    pub guest_to_host: u64,
    /// The host→guest ring, right after it.
    pub host_to_guest: u64,
    /// The buffer area for GPA-direct bulk data, last; may be 0.
    pub buffer: u64,
}

impl Default for Layout {
    /// Rings with 64 KiB of data each and a 1 MiB buffer area.
    fn default() -> Self {
        let ring = (CONTROL_PAGE_SIZE + 64 * 1024) as u64;
        Self::new(ring, ring, 1 << 20)
    }
}

impl Layout {
    /// A layout with these ring lengths (control page included) and buffer-area length.
    pub const fn new(guest_to_host: u64, host_to_guest: u64, buffer: u64) -> Self {
        Self {
            guest_to_host,
            host_to_guest,
            buffer,
        }
    }

    /// Two rings with `ring_data` bytes of data each, and `buffer` bytes of buffer area.
    pub const fn symmetric(ring_data: u64, buffer: u64) -> Self {
        let ring = CONTROL_PAGE_SIZE as u64 + ring_data;
        Self::new(ring, ring, buffer)
    }

    /// Checks every length and returns the total, header page included.
    pub fn validate(&self) -> Result<u64, LayoutError> {
        let page = PAGE_SIZE as u64;
        for len in [self.guest_to_host, self.host_to_guest] {
            let data = len.checked_sub(CONTROL_PAGE_SIZE as u64);
            match data {
                Some(d) if d > 0 && d.is_multiple_of(page) && d <= MAX_DATA_LEN as u64 => {}
                _ => return Err(LayoutError::BadRing { len }),
            }
        }
        if !self.buffer.is_multiple_of(page) {
            return Err(LayoutError::BadBuffer { len: self.buffer });
        }
        // Each ring is at most 2 GiB + 4 KiB, so only the buffer can overflow the sum.
        let len =
            (HEADER_PAGE_LEN + self.guest_to_host + self.host_to_guest).saturating_add(self.buffer);
        if len > MAX_MEMORY_LEN {
            return Err(LayoutError::TooLarge {
                len,
                max: MAX_MEMORY_LEN,
            });
        }
        Ok(len)
    }

    /// Checks every length for a memory of `1 + sub_channels` channels, each with this
    /// layout's two rings, and returns the total, header page included.
    pub fn validate_set(&self, sub_channels: u32) -> Result<u64, LayoutError> {
        if sub_channels > MAX_SUB_CHANNELS {
            return Err(LayoutError::TooManySubChannels {
                count: sub_channels,
                max: MAX_SUB_CHANNELS,
            });
        }
        self.validate()?;
        let len = self.set_len(sub_channels);
        if len > MAX_MEMORY_LEN {
            return Err(LayoutError::TooLarge {
                len,
                max: MAX_MEMORY_LEN,
            });
        }
        Ok(len)
    }

    /// The total length of a memory with `sub_channels` sub-channels (of a validated
    /// layout; saturating).
    fn set_len(&self, sub_channels: u32) -> u64 {
        let pair = self.guest_to_host + self.host_to_guest;
        (HEADER_PAGE_LEN + self.buffer)
            .saturating_add(pair.saturating_mul(1 + u64::from(sub_channels)))
    }

    /// What the memory header of a memory with `sub_channels` sub-channels says: every
    /// channel's two rings back to back after the header page, then the buffer area.
    pub fn area_for(&self, sub_channels: u32) -> Result<AreaLayout, LayoutError> {
        self.validate_set(sub_channels)?;
        let rings = [(self.guest_to_host, self.host_to_guest); vmlink_ring::area::MAX_CHANNELS];
        Ok(
            AreaLayout::packed(&rings[..=sub_channels as usize], self.buffer)
                .expect("a valid set is a valid area"),
        )
    }

    /// The total length (of a validated layout), header page included.
    pub fn total_len(&self) -> u64 {
        HEADER_PAGE_LEN + self.guest_to_host + self.host_to_guest + self.buffer
    }

    /// Where the guest→host ring starts: right after the header page.
    pub fn guest_to_host_offset(&self) -> u64 {
        HEADER_PAGE_LEN
    }

    /// Where the host→guest ring starts (of a validated layout).
    pub fn host_to_guest_offset(&self) -> u64 {
        HEADER_PAGE_LEN + self.guest_to_host
    }

    /// Where the buffer area starts (of a validated layout).
    pub fn buffer_offset(&self) -> u64 {
        HEADER_PAGE_LEN + self.guest_to_host + self.host_to_guest
    }

    /// What the memory header of this layout says: one channel, its two rings, the buffer
    /// area, in this order after the header page.
    pub fn area(&self) -> Result<AreaLayout, LayoutError> {
        self.validate()?;
        // Every rule of the header follows from the layout's own: whole pages, rings of a
        // control page and 1 to 524288 data pages, back to back after the header page.
        Ok(
            AreaLayout::packed(&[(self.guest_to_host, self.host_to_guest)], self.buffer)
                .expect("a valid layout is a valid area"),
        )
    }

    /// The buffer area's length in 4 KiB pages: GPA-direct page numbers must be below it.
    pub fn buffer_pages(&self) -> u64 {
        self.buffer / PAGE_SIZE as u64
    }
}

/// A shared, read-write mapping of a whole memfd, unmapped on drop. It keeps the memfd
/// open too, so tools can find the memory under `/proc/PID/fd/`.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    memfd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory that this process only ever accesses through
// atomics (`SliceMem`, `AtomicU64` slices), so using it from several threads is as safe as
// using it from one; the pointer is never handed out for plain access.
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`: all access is atomic.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `memfd` read-write and shared. The caller has checked that the
    /// file is at least `len` bytes long and sealed against shrinking, so no access faults.
    pub(crate) fn map(memfd: OwnedFd, len: usize) -> io::Result<Self> {
        let size = NonZeroUsize::new(len).ok_or(io::ErrorKind::InvalidInput)?;
        // SAFETY: no address hint and no MAP_FIXED let the kernel pick an unused range, so
        // no existing mapping is replaced; the fd is open for the call. The new mapping is
        // reached only through atomics (see `Send` / `Sync` above) and unmapped in `drop`.
        let addr = unsafe {
            mman::mmap(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &memfd,
                0,
            )
        }?;
        Ok(Self {
            ptr: addr.cast(),
            len,
            memfd,
        })
    }

    /// The mapping's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a mapping is never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The memfd behind the mapping (sealed: it can neither shrink nor grow).
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// The header page as 64-bit words (shared with the peer: access them atomically);
    /// empty when the mapping is shorter than a header page.
    fn header_words(&self) -> &[AtomicU64] {
        if self.len < HEADER_LEN {
            return &[];
        }
        // SAFETY: the first `HEADER_LEN` bytes lie inside the mapping (checked above), which
        // lives as long as `&self`; the mapping is page-aligned, so 8-aligned. `AtomicU64`
        // has the layout of `u64` and allows shared mutation, including by the peer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU64>(), HEADER_LEN / 8) }
    }

    /// A private copy of the header page, read once a word at a time (zeros when the
    /// mapping is shorter than a header page).
    pub(crate) fn read_header_page(&self) -> [u8; HEADER_LEN] {
        let mut page = [0u8; HEADER_LEN];
        // A short mapping has no header words: the copy is refused before it reads any.
        match read_words(self.header_words(), 0, &mut page) {
            Ok(()) => page,
            Err(WordsOutOfBounds { .. }) => [0u8; HEADER_LEN],
        }
    }

    /// Writes `page` over the header page, a word at a time (nothing when the mapping is
    /// shorter than a header page).
    pub(crate) fn write_header_page(&self, page: &[u8; HEADER_LEN]) {
        // A short mapping has no header words: the copy is refused before it writes any.
        let _: Result<(), WordsOutOfBounds> = write_words(self.header_words(), 0, page);
    }

    /// Reads the memory header once into a private copy and validates it against the
    /// mapping's length.
    pub fn read_header(&self) -> Result<ParsedHeader, AreaError> {
        AreaLayout::parse(&self.read_header_page(), self.len as u64)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr + len` is exactly the mapping `map` made; every ring and buffer
        // view holds an `Arc` of this mapping, so none is left when it drops.
        let _ = unsafe { mman::munmap(self.ptr.cast(), self.len) };
    }
}

/// A channel's mapped memory and its layout, as one channel of it sees it.
///
/// A memory may hold a primary channel and sub-channels, each with the layout's two rings,
/// and one buffer area they share. A `SharedMemory` is the view of one of those channels
/// ([`channel_index`](Self::channel_index)): its rings are that channel's.
#[derive(Debug, Clone)]
pub struct SharedMemory {
    map: Arc<Mapping>,
    layout: Layout,
    sub_channels: u32,
    index: u32,
}

impl SharedMemory {
    /// Wraps a mapping of a validated layout (`map.len() == layout.total_len()`).
    #[cfg(test)]
    pub(crate) fn new(map: Mapping, layout: Layout) -> Self {
        Self::new_set(map, layout, 0)
    }

    /// Wraps a mapping of a validated layout with `sub_channels` sub-channels, as the
    /// primary channel sees it.
    pub(crate) fn new_set(map: Mapping, layout: Layout, sub_channels: u32) -> Self {
        debug_assert_eq!(map.len() as u64, layout.set_len(sub_channels));
        Self {
            map: Arc::new(map),
            layout,
            sub_channels,
            index: 0,
        }
    }

    /// Another view of a mapping some other view holds (the monitor's, to read the rings'
    /// indices), as channel `index` sees it.
    pub(crate) fn from_shared(
        map: Arc<Mapping>,
        layout: Layout,
        sub_channels: u32,
        index: u32,
    ) -> Self {
        debug_assert_eq!(map.len() as u64, layout.set_len(sub_channels));
        Self {
            map,
            layout,
            sub_channels,
            index,
        }
    }

    /// The same memory as channel `index` (0: the primary) sees it.
    pub(crate) fn for_channel(&self, index: u32) -> Self {
        debug_assert!(index <= self.sub_channels);
        Self {
            index,
            ..self.clone()
        }
    }

    /// The layout: each channel's ring lengths and the buffer area's.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// How many sub-channels the memory holds beside the primary channel.
    pub fn sub_channels(&self) -> u32 {
        self.sub_channels
    }

    /// Which channel of the memory this view is (0: the primary).
    pub fn channel_index(&self) -> u32 {
        self.index
    }

    /// Where this view's channel's rings start.
    fn channel_offset(&self) -> u64 {
        HEADER_PAGE_LEN
            + u64::from(self.index) * (self.layout.guest_to_host + self.layout.host_to_guest)
    }

    /// The mapping.
    pub fn mapping(&self) -> &Arc<Mapping> {
        &self.map
    }

    fn ring_at(&self, offset: usize, len: usize) -> ShmRing {
        // The layout was validated: the ring lies inside the mapping, starts page-aligned,
        // and has a control page plus whole data pages.
        assert!(offset + len <= self.map.len);
        // SAFETY: `offset < len` of the mapping (asserted), so the pointer stays inside it.
        let start = unsafe { self.map.ptr.add(offset) };
        // SAFETY: `start..start + len` lies inside the mapping, which stays mapped while the
        // `Arc` given as the ring's owner lives. This process accesses it only through the
        // ring (atomics); the peer may write it at any time, which ring memory allows. The
        // memfd is sealed against shrinking, so no access can fault.
        unsafe { ShmRing::new(start, len, self.map.clone()) }
            .expect("a validated layout holds page-aligned rings")
    }

    /// Writes the memory header that describes the layout (the host does, before it offers
    /// the memory).
    pub(crate) fn write_header(&self) {
        let area = self
            .layout
            .area_for(self.sub_channels)
            .expect("the layout was validated");
        self.map.write_header_page(&area.encode());
    }

    /// Reads the memory header as it is now, once, into a private copy, and validates it.
    /// The channel itself never uses it after the handshake: a tool's view of the memory.
    pub fn header(&self) -> Result<ParsedHeader, AreaError> {
        self.map.read_header()
    }

    /// This channel's guest→host ring (the guest writes it, the host reads it).
    pub fn guest_to_host(&self) -> ShmRing {
        self.ring_at(
            self.channel_offset() as usize,
            self.layout.guest_to_host as usize,
        )
    }

    /// This channel's host→guest ring (the host writes it, the guest reads it).
    pub fn host_to_guest(&self) -> ShmRing {
        self.ring_at(
            (self.channel_offset() + self.layout.guest_to_host) as usize,
            self.layout.host_to_guest as usize,
        )
    }

    /// The buffer area (every channel of the memory shares it).
    pub fn buffer(&self) -> BufferArea {
        let offset = (self.layout.set_len(self.sub_channels) - self.layout.buffer) as usize;
        let len = self.layout.buffer as usize;
        assert!(offset + len <= self.map.len);
        let words: &'static [AtomicU64] = if len == 0 {
            &[]
        } else {
            // SAFETY: `offset < len` of the mapping (asserted), so the pointer stays inside.
            let start = unsafe { self.map.ptr.add(offset) }.cast::<AtomicU64>();
            // SAFETY: `len / 8` words from `start` (page-aligned, so 8-aligned) lie inside
            // the mapping, which the `Arc` in `BufferArea` keeps mapped; the `'static` slice
            // never leaves `BufferArea` with a longer lifetime than `&self`. `AtomicU64` has
            // the layout of `u64` and allows shared mutation, including by the peer.
            unsafe { std::slice::from_raw_parts(start.as_ptr(), len / 8) }
        };
        BufferArea {
            words,
            _map: self.map.clone(),
        }
    }
}

/// One ring in a channel's shared memory: [`RingMem`](vmlink_ring::RingMem) over the
/// mapping, keeping it mapped.
pub type ShmRing = vmlink_ring_mapping::MappedRing;

/// An access to the buffer area fell outside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{len} bytes at offset {offset} do not fit in a buffer area of {size} bytes")]
pub struct OutOfBounds {
    /// Offset of the access.
    pub offset: usize,
    /// Length of the access.
    pub len: usize,
    /// Size of the buffer area.
    pub size: usize,
}

/// The buffer area: pages both sides map, for bulk data that GPA-direct packets point at.
///
/// GPA-direct page numbers on this transport are 4 KiB page indices into it. By
/// convention the host allocates from the first half of the pages
/// ([`host_pages`](Self::host_pages)) and the guest from the second
/// ([`guest_pages`](Self::guest_pages)). The peer may write any byte at any time, so the
/// area is only reachable as atomics and through copies.
#[derive(Debug, Clone)]
pub struct BufferArea {
    words: &'static [AtomicU64],
    _map: Arc<Mapping>,
}

impl BufferArea {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.words.len() * 8
    }

    /// True when the channel has no buffer area.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Length in 4 KiB pages.
    pub fn pages(&self) -> u64 {
        (self.len() / PAGE_SIZE) as u64
    }

    /// The pages the host allocates from: the first half.
    pub fn host_pages(&self) -> Range<u64> {
        0..self.pages() / 2
    }

    /// The pages the guest allocates from: the second half.
    pub fn guest_pages(&self) -> Range<u64> {
        self.pages() / 2..self.pages()
    }

    /// The area as 64-bit words (shared with the peer: access them atomically).
    pub fn words(&self) -> &[AtomicU64] {
        self.words
    }

    /// Byte offset of page `page` in the area, `None` when the area has no such page.
    pub fn page_offset(&self, page: u64) -> Option<usize> {
        let offset = usize::try_from(page).ok()?.checked_mul(PAGE_SIZE)?;
        (offset < self.len()).then_some(offset)
    }

    /// Copies `buf.len()` bytes starting `offset` bytes into the area into `buf`.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        read_words(self.words, offset, buf).map_err(OutOfBounds::from_words)
    }

    /// Copies `data` into the area starting `offset` bytes in.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), OutOfBounds> {
        write_words(self.words, offset, data).map_err(OutOfBounds::from_words)
    }
}

/// Most iovecs one `preadv` / `pwritev` call is given (Linux allows 1024).
const IOV_BATCH: usize = 64;

/// The direction of [`BufferArea::file_io`].
#[derive(Clone, Copy)]
pub(crate) enum FileIo {
    /// From the file into the area.
    Read,
    /// From the area into the file.
    Write,
}

impl BufferArea {
    /// Reads the file behind `fd`, from `file_offset` on, straight into the area's byte
    /// `ranges` in order until every one is full: positional I/O (`pread(2)` for one
    /// range, vectored `preadv(2)` for several) into the mapping, with no copy through private memory. This is how a device serves
    /// a GPA-direct read in place.
    ///
    /// Every range is checked against the area first (an [`OutOfBounds`] range is
    /// `InvalidInput`, and nothing is read); a file that ends early is `UnexpectedEof`
    /// (what was read stays in the area). The peer may write the same bytes meanwhile: it
    /// then gets what it wrote or what the file held, as it would from a DMA.
    pub fn read_file(
        &self,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        ranges: &[Range<usize>],
    ) -> io::Result<()> {
        self.file_io(FileIo::Read, fd, file_offset, ranges)
    }

    /// Writes the area's byte `ranges`, in order, to the file behind `fd` from
    /// `file_offset` on (`pwrite(2)` or `pwritev(2)` straight from the mapping). Ranges are checked as
    /// for [`read_file`](Self::read_file); a file that takes no more bytes is `WriteZero`.
    /// The peer may change the bytes while they are written: the file then holds some mix
    /// of the old and the new, as a disk would after a DMA from changing memory.
    pub fn write_file(
        &self,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        ranges: &[Range<usize>],
    ) -> io::Result<()> {
        self.file_io(FileIo::Write, fd, file_offset, ranges)
    }

    /// Fails with `InvalidInput` unless every range lies inside the area.
    pub(crate) fn check_ranges(&self, ranges: &[Range<usize>]) -> io::Result<()> {
        let size = self.len();
        for r in ranges {
            if r.start > r.end || r.end > size {
                let err = OutOfBounds {
                    offset: r.start,
                    len: r.end.wrapping_sub(r.start),
                    size,
                };
                return Err(io::Error::new(io::ErrorKind::InvalidInput, err));
            }
        }
        Ok(())
    }

    /// The area's first byte in this process.
    pub(crate) fn base(&self) -> *mut u8 {
        self.words.as_ptr().cast::<u8>().cast_mut()
    }

    pub(crate) fn file_io(
        &self,
        dir: FileIo,
        fd: BorrowedFd<'_>,
        mut file_offset: u64,
        ranges: &[Range<usize>],
    ) -> io::Result<()> {
        self.check_ranges(ranges)?;
        let base = self.base();
        // The next byte to move: range `index`, `done` bytes into it.
        let (mut index, mut done) = (0, 0);
        loop {
            while index < ranges.len() && done == ranges[index].len() {
                (index, done) = (index + 1, 0);
            }
            if index == ranges.len() {
                return Ok(());
            }
            let at = libc::off_t::try_from(file_offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
            let n = if let [r] = &ranges[index..] {
                // One range left: `pread(2)` / `pwrite(2)`, which skip the vector's import
                // and its table (measured here, 4 KiB reads from a tmpfs file: 3-6% less
                // time than a one-entry `preadv`).
                let (at_byte, len) = (base.wrapping_add(r.start + done).cast(), r.len() - done);
                match dir {
                    // SAFETY: the range lies inside the mapping (every range was checked
                    // against the area's length above), which `self` keeps mapped for the
                    // call; the kernel writes those bytes as the peer may at any time,
                    // and this process reaches them only through atomics, never a
                    // reference to plain bytes.
                    FileIo::Read => unsafe { libc::pread(fd.as_raw_fd(), at_byte, len, at) },
                    // SAFETY: as for the read; the kernel only reads the range's bytes.
                    FileIo::Write => unsafe { libc::pwrite(fd.as_raw_fd(), at_byte, len, at) },
                }
            } else {
                let mut iov = [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; IOV_BATCH];
                let mut count = 0;
                for (i, r) in ranges[index..].iter().enumerate().take(IOV_BATCH) {
                    let skip = if i == 0 { done } else { 0 };
                    iov[count] = libc::iovec {
                        iov_base: base.wrapping_add(r.start + skip).cast(),
                        iov_len: r.len() - skip,
                    };
                    count += 1;
                }
                match dir {
                    // SAFETY: as for `pread` above, for each iovec's range; `count`
                    // iovecs are initialised.
                    FileIo::Read => unsafe {
                        libc::preadv(fd.as_raw_fd(), iov.as_ptr(), count as libc::c_int, at)
                    },
                    // SAFETY: as for the read; the kernel only reads the iovecs' bytes.
                    FileIo::Write => unsafe {
                        libc::pwritev(fd.as_raw_fd(), iov.as_ptr(), count as libc::c_int, at)
                    },
                }
            };
            let mut n = match usize::try_from(n) {
                Ok(0) => {
                    return Err(match dir {
                        FileIo::Read => io::ErrorKind::UnexpectedEof.into(),
                        FileIo::Write => io::ErrorKind::WriteZero.into(),
                    });
                }
                Ok(n) => n,
                Err(_) => {
                    let err = io::Error::last_os_error();
                    if err.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(err);
                }
            };
            file_offset += n as u64;
            while n > 0 {
                let step = n.min(ranges[index].len() - done);
                (done, n) = (done + step, n - step);
                if done == ranges[index].len() {
                    (index, done) = (index + 1, 0);
                }
            }
        }
    }
}

impl OutOfBounds {
    /// The buffer area's words are the whole area, so the copy's range is the access's.
    fn from_words(e: WordsOutOfBounds) -> Self {
        Self {
            offset: e.offset,
            len: e.len,
            size: e.size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A memfd of `len` bytes, mapped whole.
    fn mapping(len: usize) -> Mapping {
        let fd = crate::sys::memfd_create(c"vmlink-memory-test").unwrap();
        crate::sys::ftruncate(fd.as_fd(), len as u64).unwrap();
        Mapping::map(fd, len).unwrap()
    }

    #[test]
    fn the_buffer_area_copies_in_range_and_refuses_the_rest() {
        let layout = Layout::symmetric(4096, 2 * 4096);
        let memory = SharedMemory::new(mapping(layout.validate().unwrap() as usize), layout);
        let area = memory.buffer();
        assert_eq!(area.len(), 8192);
        let pattern: Vec<u8> = (1..=40).collect();
        // Across a page boundary at every alignment, and up to the very end.
        for offset in (4096 - 20..4096 + 8).chain(8192 - 40..=8192) {
            let len = pattern.len().min(8192 - offset);
            area.write(offset, &pattern[..len]).unwrap();
            let mut back = vec![0u8; len];
            area.read(offset, &mut back).unwrap();
            assert_eq!(back, pattern[..len], "offset {offset}");
        }
        // The ring's checked copies refuse these whole; the area reports them in its terms.
        let before = {
            let mut all = vec![0u8; area.len()];
            area.read(0, &mut all).unwrap();
            all
        };
        for (offset, len) in [(8193, 0), (8192, 1), (8190, 8), (usize::MAX, 1)] {
            let err = OutOfBounds {
                offset,
                len,
                size: 8192,
            };
            assert_eq!(area.write(offset, &pattern[..len]), Err(err));
            let mut buf = vec![0xC3u8; len];
            assert_eq!(area.read(offset, &mut buf), Err(err));
            assert!(buf.iter().all(|&b| b == 0xC3));
        }
        let mut after = vec![0u8; area.len()];
        area.read(0, &mut after).unwrap();
        assert_eq!(after, before, "a refused write wrote");
        // No buffer area: only empty copies at 0.
        let bare = Layout::symmetric(4096, 0);
        let none = SharedMemory::new(mapping(bare.validate().unwrap() as usize), bare).buffer();
        assert_eq!(none.read(0, &mut []), Ok(()));
        assert_eq!(
            none.write(0, &[1]),
            Err(OutOfBounds {
                offset: 0,
                len: 1,
                size: 0
            })
        );
    }

    #[test]
    // One range in a slice of ranges is the API's shape, not a mistaken `vec![0; n]`.
    #[allow(clippy::single_range_in_vec_init)]
    fn file_io_moves_the_ranges_in_order_and_refuses_what_is_outside() {
        use std::os::fd::AsFd;
        let layout = Layout::symmetric(4096, 64 * 4096);
        let memory = SharedMemory::new(mapping(layout.validate().unwrap() as usize), layout);
        let area = memory.buffer();
        let file = crate::sys::memfd_create(c"vmlink-file-io-test").unwrap();
        let pattern: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        crate::sys::ftruncate(file.as_fd(), pattern.len() as u64).unwrap();
        area.write(0, &pattern[..area.len()]).unwrap();
        area.write_file(file.as_fd(), 0, &[0..area.len()]).unwrap();
        // 100 scattered ranges of odd lengths (more than one preadv's worth of iovecs),
        // read from an odd file offset, land where they were asked to.
        let ranges: Vec<Range<usize>> = (0..100)
            .map(|i| i * 2600 + 3..i * 2600 + 3 + 997 + i)
            .collect();
        let total: usize = ranges.iter().map(|r| r.len()).sum();
        area.write(0, &vec![0u8; area.len()]).unwrap();
        area.read_file(file.as_fd(), 1001, &ranges).unwrap();
        let mut at = 1001;
        for r in &ranges {
            let mut got = vec![0u8; r.len()];
            area.read(r.start, &mut got).unwrap();
            assert_eq!(got, pattern[at..at + r.len()], "range {r:?}");
            at += r.len();
        }
        // And written back elsewhere in the file, they come out in the same order.
        area.write_file(file.as_fd(), 200_000, &ranges).unwrap();
        let mut back = vec![0u8; total];
        nix::sys::uio::pread(file.as_fd(), &mut back, 200_000).unwrap();
        assert_eq!(back, pattern[1001..1001 + total]);
        // A range past the area is refused before anything moves.
        let before = {
            let mut b = vec![0u8; 4096];
            area.read(0, &mut b).unwrap();
            b
        };
        let bad = [0..4096, area.len() - 8..area.len() + 1];
        let err = area.read_file(file.as_fd(), 0, &bad).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("262144"), "{err}");
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = [10..5, 0..1];
        assert_eq!(
            area.write_file(file.as_fd(), 0, &reversed)
                .unwrap_err()
                .kind(),
            io::ErrorKind::InvalidInput
        );
        let mut after = vec![0u8; 4096];
        area.read(0, &mut after).unwrap();
        assert_eq!(after, before);
        // A file that ends early is an EOF error; empty ranges move nothing.
        let err = area
            .read_file(file.as_fd(), 200_000 + total as u64 - 100, &[0..4096])
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        area.read_file(file.as_fd(), u64::MAX, &[5..5]).unwrap();
    }

    #[test]
    fn the_header_page_round_trips_and_a_short_mapping_has_none() {
        let layout = Layout::symmetric(4096, 0);
        let memory = SharedMemory::new(mapping(layout.validate().unwrap() as usize), layout);
        memory.write_header();
        let page = memory.mapping().read_header_page();
        assert_eq!(page, layout.area().unwrap().encode());
        assert_eq!(memory.header().unwrap().layout, layout.area().unwrap());
        // Shorter than a header page: reads are zeros and writes do nothing, no panic.
        let short = mapping(HEADER_LEN - 8);
        short.write_header_page(&page);
        assert_eq!(short.read_header_page(), [0u8; HEADER_LEN]);
    }

    #[test]
    fn layout_rules() {
        assert_eq!(
            Layout::default().validate(),
            Ok(4096 + 2 * (4096 + 65536) + (1 << 20))
        );
        assert_eq!(
            Layout::new(4096, 8192, 0).validate(),
            Err(LayoutError::BadRing { len: 4096 })
        );
        assert_eq!(
            Layout::new(8192, 8193, 0).validate(),
            Err(LayoutError::BadRing { len: 8193 })
        );
        assert_eq!(
            Layout::new(8192, 8192, 100).validate(),
            Err(LayoutError::BadBuffer { len: 100 })
        );
        assert!(matches!(
            Layout::new(8192, 8192, 1 << 40).validate(),
            Err(LayoutError::TooLarge { .. })
        ));
        assert_eq!(Layout::symmetric(4096, 8192).buffer_pages(), 2);
        // The limit counts the header page.
        let ring = 4096 + (1u64 << 30);
        let fits = Layout::new(ring, ring, MAX_MEMORY_LEN - 4096 - 2 * ring);
        assert_eq!(fits.validate(), Ok(MAX_MEMORY_LEN));
        assert_eq!(
            Layout::new(ring, ring, fits.buffer + 4096).validate(),
            Err(LayoutError::TooLarge {
                len: MAX_MEMORY_LEN + 4096,
                max: MAX_MEMORY_LEN
            })
        );
    }

    #[test]
    fn the_header_page_comes_first() {
        let layout = Layout::new(3 * 4096, 5 * 4096, 2 * 4096);
        assert_eq!(layout.total_len(), 4096 + 10 * 4096);
        assert_eq!(layout.guest_to_host_offset(), 4096);
        assert_eq!(layout.host_to_guest_offset(), 4 * 4096);
        assert_eq!(layout.buffer_offset(), 9 * 4096);
        let area = layout.area().unwrap();
        assert_eq!(area.len(), layout.total_len());
        assert_eq!(area.channels().len(), 1);
        let ch = area.channels()[0];
        assert_eq!(
            (ch.guest_to_host.offset, ch.guest_to_host.len),
            (4096, 3 * 4096)
        );
        assert_eq!(
            (ch.host_to_guest.offset, ch.host_to_guest.len),
            (4 * 4096, 5 * 4096)
        );
        assert_eq!(
            (area.buffer().offset, area.buffer().len),
            (9 * 4096, 2 * 4096)
        );
        assert_eq!(
            Layout::new(4096, 8192, 0).area(),
            Err(LayoutError::BadRing { len: 4096 })
        );
    }
}
