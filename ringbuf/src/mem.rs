//! Where a ring's bytes live.
//!
//! [`RingMem`] is the only way the ring code touches memory the peer can write. Control
//! words are atomics; the data area is a sequence of `AtomicU64` words copied with relaxed
//! word-wise loads and stores ([`crate::words`]), so a peer writing at the same time can
//! make us read garbage, which validation then rejects, but never undefined behaviour. No
//! `&[u8]` or `&mut [u8]` into ring memory is ever formed.
//!
//! Backends:
//! - [`HeapMem`] (feature `alloc`): a ring on the heap, for tests and in-process use, with
//!   byte-image import and export.
//! - [`SliceMem`]: a contiguous control page and data area borrowed as atomics, from
//!   safe storage or from a mapped region.
//! - [`PageListMem`]: a control page and a list of separate data pages, as a guest describes
//!   a ring by its page numbers; packets may span pages and wrap across the end.
//!
//! Everything here is safe code: [`ControlWords::from_atomics`] and
//! [`DataPage::from_atomics`] view atomics the caller already holds, and turning a mapped
//! region's raw pointer into such atomics is the job of the `vmlink-ring-mapping` crate,
//! which holds the `unsafe` and its arguments.

use crate::error::LayoutError;
#[cfg(feature = "alloc")]
use crate::protocol::CONTROL_PAGE_SIZE;
use crate::protocol::{
    FEATURE_BITS_OFFSET, INTERRUPT_MASK_OFFSET, PAGE_SIZE, PENDING_SEND_SIZE_OFFSET,
    READ_INDEX_OFFSET, WRITE_INDEX_OFFSET,
};
use crate::sync::{AtomicU32, AtomicU64, Ordering};
use crate::words::{load_words, read_words_unchecked, store_words, write_words_unchecked};
use bytemuck::TransparentWrapper;

/// The largest data area a ring may have: indices are `u32` and the ring arithmetic adds
/// two of them.
pub const MAX_DATA_LEN: usize = 1 << 31;

/// Number of 32-bit control words vmlink accesses (the first 128 bytes of the control page;
/// the rest of the page is reserved).
pub const CONTROL_WORDS: usize = 32;

/// Number of 64-bit words in a 4 KiB page.
pub const PAGE_WORDS: usize = PAGE_SIZE / 8;

/// A word of the control page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ControlWord {
    /// `write_index` (offset 0x00).
    WriteIndex,
    /// `read_index` (offset 0x04).
    ReadIndex,
    /// `interrupt_mask` (offset 0x08).
    InterruptMask,
    /// `pending_send_size` (offset 0x0C).
    PendingSendSize,
    /// `feature_bits` (offset 0x40).
    FeatureBits,
}

impl ControlWord {
    /// Every control word vmlink uses.
    pub const ALL: [ControlWord; 5] = [
        ControlWord::WriteIndex,
        ControlWord::ReadIndex,
        ControlWord::InterruptMask,
        ControlWord::PendingSendSize,
        ControlWord::FeatureBits,
    ];

    /// The word's byte offset in the control page.
    pub const fn offset(self) -> usize {
        match self {
            ControlWord::WriteIndex => WRITE_INDEX_OFFSET,
            ControlWord::ReadIndex => READ_INDEX_OFFSET,
            ControlWord::InterruptMask => INTERRUPT_MASK_OFFSET,
            ControlWord::PendingSendSize => PENDING_SEND_SIZE_OFFSET,
            ControlWord::FeatureBits => FEATURE_BITS_OFFSET,
        }
    }

    const fn slot(self) -> usize {
        self.offset() / 4
    }
}

/// The memory a ring lives in: a control page and a data area, both writable by the peer.
///
/// Implementations must keep every access atomic (control words) or word-wise atomic /
/// volatile (data), never forming references to plain bytes of shared memory.
///
/// The ring code calls [`read_data`](Self::read_data) and [`write_data`](Self::write_data)
/// only with `offset + len <= data_len()`; an implementation may panic on anything else,
/// as that would be a bug in vmlink, not something a peer can cause.
pub trait RingMem {
    /// Length of the data area in bytes: a non-zero multiple of 4096, at most
    /// [`MAX_DATA_LEN`].
    fn data_len(&self) -> usize;

    /// Loads a control word with `Acquire` ordering.
    fn load_control(&self, word: ControlWord) -> u32;

    /// Stores a control word with `Release` ordering.
    fn store_control(&self, word: ControlWord, value: u32);

    /// Copies `buf.len()` bytes starting `offset` bytes into the data area into `buf`.
    fn read_data(&self, offset: usize, buf: &mut [u8]);

    /// Copies `data` into the data area starting `offset` bytes in.
    fn write_data(&self, offset: usize, data: &[u8]);

    /// Copies `out.len()` 8-byte words starting `offset` bytes into the data area (a
    /// multiple of 8) into `out`, each word the little-endian value of its 8 bytes: the same
    /// as [`read_data`](Self::read_data) into `out`'s bytes, which is what the default does.
    /// Backends that hold the data area as words override it to skip the byte handling:
    /// the ring reads descriptors this way.
    #[inline]
    fn read_data_words(&self, offset: usize, out: &mut [u64]) {
        self.read_data(offset, bytemuck::cast_slice_mut(out))
    }

    /// Copies `words` into the data area starting `offset` bytes in (a multiple of 8), each
    /// word as its 8 little-endian bytes: the same as [`write_data`](Self::write_data) with
    /// `words`' bytes, which is what the default does. Backends that hold the data area as
    /// words override it to skip the byte handling: the ring writes small packets this way.
    #[inline]
    fn write_data_words(&self, offset: usize, words: &[u64]) {
        self.write_data(offset, bytemuck::cast_slice(words))
    }
}

/// Implements [`RingMem`] for a pointer to a `RingMem` by forwarding every method, the
/// word copies included (their defaults would lose the pointee's overrides).
macro_rules! forward_ring_mem {
    ($($pointer:ty),+) => {$(
        impl<T: RingMem + ?Sized> RingMem for $pointer {
            #[inline]
            fn data_len(&self) -> usize {
                (**self).data_len()
            }
            #[inline]
            fn load_control(&self, word: ControlWord) -> u32 {
                (**self).load_control(word)
            }
            #[inline]
            fn store_control(&self, word: ControlWord, value: u32) {
                (**self).store_control(word, value)
            }
            #[inline]
            fn read_data(&self, offset: usize, buf: &mut [u8]) {
                (**self).read_data(offset, buf)
            }
            #[inline]
            fn write_data(&self, offset: usize, data: &[u8]) {
                (**self).write_data(offset, data)
            }
            #[inline]
            fn read_data_words(&self, offset: usize, out: &mut [u64]) {
                (**self).read_data_words(offset, out)
            }
            #[inline]
            fn write_data_words(&self, offset: usize, words: &[u64]) {
                (**self).write_data_words(offset, words)
            }
        }
    )+};
}

forward_ring_mem!(&T);
#[cfg(feature = "alloc")]
forward_ring_mem!(alloc::sync::Arc<T>);

/// Checks that a data area of `len` bytes can hold a ring.
pub fn check_data_len(len: usize) -> Result<(), LayoutError> {
    if len == 0 {
        Err(LayoutError::NoDataPages)
    } else if !len.is_multiple_of(PAGE_SIZE) {
        Err(LayoutError::NotPageMultiple { len })
    } else if len > MAX_DATA_LEN {
        Err(LayoutError::TooLarge {
            len,
            max: MAX_DATA_LEN,
        })
    } else {
        Ok(())
    }
}

/// The control words of a ring's control page (its first 128 bytes).
///
/// `#[repr(transparent)]` over `[AtomicU32; CONTROL_WORDS]`: [`from_atomics`](Self::from_atomics)
/// views words held elsewhere (a mapped control page, say) as control words.
#[derive(Debug, TransparentWrapper)]
#[repr(transparent)]
pub struct ControlWords([AtomicU32; CONTROL_WORDS]);

impl Default for ControlWords {
    fn default() -> Self {
        Self::new()
    }
}

impl ControlWords {
    /// All-zero control words.
    pub fn new() -> Self {
        Self(core::array::from_fn(|_| AtomicU32::new(0)))
    }

    /// The first [`CONTROL_WORDS`] words of a control page, held elsewhere, as control
    /// words (the same memory, no copy).
    ///
    /// ```
    /// use core::sync::atomic::{AtomicU32, Ordering};
    /// use vmlink_ring::{CONTROL_WORDS, ControlWord, ControlWords, DataPage, PageListMem, RingMem};
    ///
    /// let words: [AtomicU32; CONTROL_WORDS] = core::array::from_fn(|_| AtomicU32::new(0));
    /// let page = DataPage::new();
    /// let ring = PageListMem::new(ControlWords::from_atomics(&words), [&page])?;
    /// ring.store_control(ControlWord::ReadIndex, 0x40);
    /// assert_eq!(words[1].load(Ordering::Relaxed), 0x40);
    /// # Ok::<(), vmlink_ring::LayoutError>(())
    /// ```
    #[inline]
    pub fn from_atomics(words: &[AtomicU32; CONTROL_WORDS]) -> &Self {
        Self::wrap_ref(words)
    }

    /// The words, in control-page order.
    pub fn atomics(&self) -> &[AtomicU32; CONTROL_WORDS] {
        &self.0
    }

    #[inline]
    fn get(&self, word: ControlWord) -> &AtomicU32 {
        &self.0[word.slot()]
    }

    #[inline]
    fn load(&self, word: ControlWord) -> u32 {
        self.get(word).load(Ordering::Acquire)
    }

    #[inline]
    fn store(&self, word: ControlWord, value: u32) {
        self.get(word).store(value, Ordering::Release)
    }
}

/// One 4 KiB data page of a ring.
///
/// `#[repr(transparent)]` over `[AtomicU64; PAGE_WORDS]`: [`from_atomics`](Self::from_atomics)
/// views words held elsewhere (a mapped page, say) as a data page.
#[derive(Debug, TransparentWrapper)]
#[repr(transparent)]
pub struct DataPage([AtomicU64; PAGE_WORDS]);

impl Default for DataPage {
    fn default() -> Self {
        Self::new()
    }
}

impl DataPage {
    /// A zeroed page.
    pub fn new() -> Self {
        Self(core::array::from_fn(|_| AtomicU64::new(0)))
    }

    /// A zeroed page on the heap.
    #[cfg(feature = "alloc")]
    pub fn new_boxed() -> alloc::boxed::Box<Self> {
        alloc::boxed::Box::new(Self::new())
    }

    /// A page's words, held elsewhere, as a data page (the same memory, no copy).
    #[inline]
    pub fn from_atomics(words: &[AtomicU64; PAGE_WORDS]) -> &Self {
        Self::wrap_ref(words)
    }

    /// The page's words.
    pub fn words(&self) -> &[AtomicU64] {
        &self.0
    }
}

/// A ring whose data area is one contiguous run of words.
///
/// Over a mapped region (a control page followed by the data area), build it with
/// `vmlink_ring_mapping::slice_mem`, which checks the region and holds the `unsafe`.
#[derive(Debug, Clone, Copy)]
pub struct SliceMem<'a> {
    control: &'a ControlWords,
    data: &'a [AtomicU64],
}

impl<'a> SliceMem<'a> {
    /// A ring over borrowed control words and data words.
    pub fn new(control: &'a ControlWords, data: &'a [AtomicU64]) -> Result<Self, LayoutError> {
        check_data_len(data.len() * 8)?;
        Ok(Self { control, data })
    }
}

impl RingMem for SliceMem<'_> {
    #[inline]
    fn data_len(&self) -> usize {
        self.data.len() * 8
    }
    #[inline]
    fn load_control(&self, word: ControlWord) -> u32 {
        self.control.load(word)
    }
    #[inline]
    fn store_control(&self, word: ControlWord, value: u32) {
        self.control.store(word, value)
    }
    #[inline]
    fn read_data(&self, offset: usize, buf: &mut [u8]) {
        read_words_unchecked(self.data, offset, buf)
    }
    #[inline]
    fn write_data(&self, offset: usize, data: &[u8]) {
        write_words_unchecked(self.data, offset, data)
    }
    #[inline]
    fn read_data_words(&self, offset: usize, out: &mut [u64]) {
        load_words(self.data, offset, out)
    }
    #[inline]
    fn write_data_words(&self, offset: usize, words: &[u64]) {
        store_words(self.data, offset, words)
    }
}

/// A ring whose data area is a list of separate 4 KiB pages, in ring order.
///
/// This is how a guest hands a ring to its host: a control page and data pages named by
/// page number, contiguous in guest-physical memory or not, and rarely contiguous in the
/// host's address space. `L` is any list of page references: an array or slice without an
/// allocator, a `Vec` with one.
#[derive(Debug, Clone)]
pub struct PageListMem<'a, L> {
    control: &'a ControlWords,
    pages: L,
}

impl<'a, L: AsRef<[&'a DataPage]>> PageListMem<'a, L> {
    /// A ring over a control page and its data pages.
    pub fn new(control: &'a ControlWords, pages: L) -> Result<Self, LayoutError> {
        check_data_len(pages.as_ref().len() * PAGE_SIZE)?;
        Ok(Self { control, pages })
    }

    /// The data pages, in ring order.
    pub fn pages(&self) -> &[&'a DataPage] {
        self.pages.as_ref()
    }

    #[inline]
    fn for_each_page(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(&DataPage, usize, core::ops::Range<usize>),
    ) {
        let pages = self.pages.as_ref();
        let mut done = 0;
        while done < len {
            let at = offset + done;
            let in_page = at % PAGE_SIZE;
            let n = (PAGE_SIZE - in_page).min(len - done);
            f(pages[at / PAGE_SIZE], in_page, done..done + n);
            done += n;
        }
    }
}

impl<'a, L: AsRef<[&'a DataPage]>> RingMem for PageListMem<'a, L> {
    #[inline]
    fn data_len(&self) -> usize {
        self.pages.as_ref().len() * PAGE_SIZE
    }
    #[inline]
    fn load_control(&self, word: ControlWord) -> u32 {
        self.control.load(word)
    }
    #[inline]
    fn store_control(&self, word: ControlWord, value: u32) {
        self.control.store(word, value)
    }
    #[inline]
    fn read_data(&self, offset: usize, buf: &mut [u8]) {
        self.for_each_page(offset, buf.len(), |page, in_page, range| {
            read_words_unchecked(&page.0, in_page, &mut buf[range])
        })
    }
    #[inline]
    fn write_data(&self, offset: usize, data: &[u8]) {
        self.for_each_page(offset, data.len(), |page, in_page, range| {
            write_words_unchecked(&page.0, in_page, &data[range])
        })
    }
}

/// A ring on the heap: for tests, fuzzing and two threads of one process.
///
/// [`HeapMem::new`] initialises the control page as the allocating side does (indices 0,
/// feature bit 0 set). Byte images in the VMBus layout (control page, then data) can be
/// imported and exported, so tests can hand-build rings the way other implementations
/// write them. Only the first 128 bytes of the control page are kept; the rest is reserved
/// and exported as zeros.
///
/// The control words sit in cache lines of their own: the data area's pointer and length
/// (read on every copy) and whatever precedes the ring in its allocation (an `Arc`'s
/// counts) never share a line with the indices the peer writes.
#[cfg(feature = "alloc")]
#[derive(Debug)]
#[repr(C)]
pub struct HeapMem {
    data: alloc::boxed::Box<[AtomicU64]>,
    control: LineAligned<ControlWords>,
}

/// A value starting on a 128-byte boundary (two cache lines, as adjacent-line prefetch
/// pairs them) and padded to a multiple of 128 bytes.
#[cfg(feature = "alloc")]
#[derive(Debug)]
#[repr(C, align(128))]
struct LineAligned<T>(T);

#[cfg(feature = "alloc")]
impl HeapMem {
    /// A zeroed ring with a `data_len`-byte data area, its control page initialised.
    pub fn new(data_len: usize) -> Result<Self, LayoutError> {
        check_data_len(data_len)?;
        let mem = Self {
            control: LineAligned(ControlWords::new()),
            data: (0..data_len / 8).map(|_| AtomicU64::new(0)).collect(),
        };
        crate::ring::init_control(&mem);
        Ok(mem)
    }

    /// A ring from a byte image: a 4096-byte control page followed by the data area.
    pub fn from_image(image: &[u8]) -> Result<Self, LayoutError> {
        let len = image.len();
        if len < CONTROL_PAGE_SIZE {
            return Err(LayoutError::BadImageLength { len });
        }
        let (control_bytes, data) = image.split_at(CONTROL_PAGE_SIZE);
        check_data_len(data.len()).map_err(|e| match e {
            LayoutError::NotPageMultiple { .. } => LayoutError::BadImageLength { len },
            other => other,
        })?;
        let control = ControlWords::new();
        for (word, bytes) in control.0.iter().zip(control_bytes.as_chunks::<4>().0) {
            word.store(u32::from_le_bytes(*bytes), Ordering::Relaxed);
        }
        let data = data
            .as_chunks::<8>()
            .0
            .iter()
            .map(|b| AtomicU64::new(u64::from_le_bytes(*b)))
            .collect();
        Ok(Self {
            data,
            control: LineAligned(control),
        })
    }

    /// The ring as a byte image: control page (reserved bytes zero), then the data area.
    pub fn to_image(&self) -> alloc::vec::Vec<u8> {
        let mut image = alloc::vec![0u8; CONTROL_PAGE_SIZE + self.data_len()];
        let (control_bytes, data) = image.split_at_mut(CONTROL_PAGE_SIZE);
        for (word, bytes) in self
            .control
            .0
            .0
            .iter()
            .zip(control_bytes.as_chunks_mut::<4>().0)
        {
            *bytes = word.load(Ordering::Relaxed).to_le_bytes();
        }
        read_words_unchecked(&self.data, 0, data);
        image
    }
}

#[cfg(feature = "alloc")]
impl RingMem for HeapMem {
    #[inline]
    fn data_len(&self) -> usize {
        self.data.len() * 8
    }
    #[inline]
    fn load_control(&self, word: ControlWord) -> u32 {
        self.control.0.load(word)
    }
    #[inline]
    fn store_control(&self, word: ControlWord, value: u32) {
        self.control.0.store(word, value)
    }
    #[inline]
    fn read_data(&self, offset: usize, buf: &mut [u8]) {
        read_words_unchecked(&self.data, offset, buf)
    }
    #[inline]
    fn write_data(&self, offset: usize, data: &[u8]) {
        write_words_unchecked(&self.data, offset, data)
    }
    #[inline]
    fn read_data_words(&self, offset: usize, out: &mut [u64]) {
        load_words(&self.data, offset, out)
    }
    #[inline]
    fn write_data_words(&self, offset: usize, words: &[u64]) {
        store_words(&self.data, offset, words)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn data_len_rules() {
        assert_eq!(check_data_len(0), Err(LayoutError::NoDataPages));
        assert_eq!(
            check_data_len(4095),
            Err(LayoutError::NotPageMultiple { len: 4095 })
        );
        assert_eq!(check_data_len(4096), Ok(()));
        assert_eq!(check_data_len(MAX_DATA_LEN), Ok(()));
        assert_eq!(
            check_data_len(MAX_DATA_LEN + 4096),
            Err(LayoutError::TooLarge {
                len: MAX_DATA_LEN + 4096,
                max: MAX_DATA_LEN
            })
        );
    }

    #[test]
    fn control_word_offsets() {
        assert_eq!(ControlWord::WriteIndex.offset(), 0x00);
        assert_eq!(ControlWord::ReadIndex.offset(), 0x04);
        assert_eq!(ControlWord::InterruptMask.offset(), 0x08);
        assert_eq!(ControlWord::PendingSendSize.offset(), 0x0C);
        assert_eq!(ControlWord::FeatureBits.offset(), 0x40);
        assert!(
            ControlWord::ALL
                .iter()
                .all(|w| w.offset() + 4 <= CONTROL_WORDS * 4)
        );
        assert_eq!(core::mem::size_of::<ControlWords>(), 128);
        assert_eq!(core::mem::size_of::<DataPage>(), 4096);
    }

    #[test]
    fn atomics_are_viewed_in_place() {
        let words: [AtomicU32; CONTROL_WORDS] = core::array::from_fn(|_| AtomicU32::new(0));
        let control = ControlWords::from_atomics(&words);
        assert!(core::ptr::eq(control.atomics(), &words));
        let page_words: [AtomicU64; PAGE_WORDS] = core::array::from_fn(|_| AtomicU64::new(0));
        let page = DataPage::from_atomics(&page_words);
        assert!(core::ptr::eq(page.words(), &page_words[..]));

        let mem = PageListMem::new(control, [page]).unwrap();
        mem.store_control(ControlWord::FeatureBits, 1);
        assert_eq!(words[0x40 / 4].load(Ordering::Relaxed), 1);
        mem.write_data(PAGE_SIZE - 8, &[0xCD; 8]);
        assert_eq!(
            page_words[PAGE_WORDS - 1].load(Ordering::Relaxed),
            0xCDCD_CDCD_CDCD_CDCD
        );
        // The wrappers add nothing to the layout.
        assert_eq!(core::mem::align_of::<ControlWords>(), 4);
        assert_eq!(core::mem::align_of::<DataPage>(), 8);
    }

    #[test]
    fn page_list_spans_pages() {
        let control = ControlWords::new();
        let pages: [DataPage; 3] = core::array::from_fn(|_| DataPage::new());
        // Ring order differs from storage order, as with a guest's scattered pages.
        let list = [&pages[2], &pages[0], &pages[1]];
        let mem = PageListMem::new(&control, list).unwrap();
        assert_eq!(mem.data_len(), 3 * PAGE_SIZE);
        let data: alloc::vec::Vec<u8> = (0..5000).map(|i| (i * 7) as u8).collect();
        mem.write_data(PAGE_SIZE - 3, &data);
        let mut back = alloc::vec![0u8; 5000];
        mem.read_data(PAGE_SIZE - 3, &mut back);
        assert_eq!(back, data);
        // Byte PAGE_SIZE - 3 of the ring is in pages[2]; the next page in ring order is pages[0].
        assert_eq!(
            pages[2].words()[PAGE_WORDS - 1]
                .load(Ordering::Relaxed)
                .to_le_bytes()[5..],
            data[..3]
        );
        assert_eq!(
            pages[0].words()[0].load(Ordering::Relaxed).to_le_bytes(),
            data[3..11]
        );
        let empty: [&DataPage; 0] = [];
        assert_eq!(
            PageListMem::new(&control, empty).unwrap_err(),
            LayoutError::NoDataPages
        );
    }

    /// Writes words with `write_data_words` and reads them back both ways, then bytes with
    /// `write_data` read back as words: the word methods are the byte methods' little-endian
    /// view, whichever backend (overridden or default) runs them.
    fn words_match_bytes(mem: &dyn RingMem) {
        let words: alloc::vec::Vec<u64> = (0..400u64).map(|i| i.wrapping_mul(K) + 1).collect();
        // Across a page boundary of the page list.
        let at = PAGE_SIZE - 8 * 7;
        mem.write_data_words(at, &words);
        let mut bytes = alloc::vec![0u8; words.len() * 8];
        mem.read_data(at, &mut bytes);
        let expect: alloc::vec::Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(bytes, expect);
        let mut back = alloc::vec![0u64; words.len()];
        mem.read_data_words(at, &mut back);
        assert_eq!(back, words);
        mem.write_data(8, &[0xAB; 16]);
        let mut two = [0u64; 2];
        mem.read_data_words(8, &mut two);
        assert_eq!(two, [0xABAB_ABAB_ABAB_ABAB; 2]);
    }

    const K: u64 = 0x9e37_79b9_7f4a_7c15;

    #[test]
    fn word_copies_are_the_bytes_little_endian() {
        let heap = HeapMem::new(2 * PAGE_SIZE).unwrap();
        words_match_bytes(&heap);
        words_match_bytes(&&heap);
        words_match_bytes(&alloc::sync::Arc::new(HeapMem::new(2 * PAGE_SIZE).unwrap()));
        let control = ControlWords::new();
        let data: alloc::vec::Vec<AtomicU64> =
            (0..2 * PAGE_WORDS).map(|_| AtomicU64::new(0)).collect();
        words_match_bytes(&SliceMem::new(&control, &data).unwrap());
        let pages = [DataPage::new(), DataPage::new()];
        words_match_bytes(&PageListMem::new(&control, [&pages[1], &pages[0]]).unwrap());
    }

    #[test]
    fn heap_control_words_have_lines_of_their_own() {
        let mem = alloc::sync::Arc::new(HeapMem::new(PAGE_SIZE).unwrap());
        let base = alloc::sync::Arc::as_ptr(&mem) as usize;
        let control = core::ptr::from_ref(&mem.control) as usize;
        // The data pointer and length come first, and the Arc's counts before them: all in
        // lines before the control words' first line.
        assert!(control - base >= 16);
        assert_eq!(control % 128, 0);
        assert_eq!(core::mem::size_of::<HeapMem>() % 128, 0);
    }

    #[test]
    fn heap_image_round_trip() {
        let mut image = alloc::vec![0u8; CONTROL_PAGE_SIZE + PAGE_SIZE];
        image[0..4].copy_from_slice(&0x40u32.to_le_bytes());
        image[4..8].copy_from_slice(&0x10u32.to_le_bytes());
        image[0x40..0x44].copy_from_slice(&1u32.to_le_bytes());
        for (i, b) in image[CONTROL_PAGE_SIZE..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let mem = HeapMem::from_image(&image).unwrap();
        assert_eq!(mem.load_control(ControlWord::WriteIndex), 0x40);
        assert_eq!(mem.load_control(ControlWord::ReadIndex), 0x10);
        assert_eq!(mem.load_control(ControlWord::FeatureBits), 1);
        assert_eq!(mem.to_image(), image);
        assert_eq!(
            HeapMem::from_image(&image[..100]).unwrap_err(),
            LayoutError::BadImageLength { len: 100 }
        );
        assert_eq!(
            HeapMem::from_image(&image[..CONTROL_PAGE_SIZE]).unwrap_err(),
            LayoutError::NoDataPages
        );
        assert_eq!(
            HeapMem::from_image(&image[..CONTROL_PAGE_SIZE + 8]).unwrap_err(),
            LayoutError::BadImageLength {
                len: CONTROL_PAGE_SIZE + 8
            }
        );
    }
}
