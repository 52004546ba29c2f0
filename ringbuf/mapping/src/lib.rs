//! The raw-pointer edge of [`vmlink_ring`]: ring memory over mapped pages.
//!
//! `vmlink-ring` forbids `unsafe` code. Its ring memory is built from atomics the caller
//! holds ([`ControlWords::from_atomics`], [`DataPage::from_atomics`], [`SliceMem::new`]);
//! this crate turns the raw pointer of a mapping (a `mmap`ed file, guest pages in a VMM,
//! identity-mapped pages in a bare-metal guest) into those atomics. Each function checks
//! what it can (alignment, lengths) and returns a typed [`LayoutError`]; the caller vouches
//! for the rest in the function's `# Safety` section: the memory stays mapped, readable and
//! writable for the lifetime it names, and this process touches it only through atomics
//! while anything built from it lives. The peer may write it at any time: that is what
//! ring memory is for, and atomics permit it.
//!
//! With the `alloc` feature, `MappedRing` is a ring over a region together with a shared
//! handle to the mapping that holds it, for transports whose mappings are reference
//! counted.
//!
//! Each function only casts: `AtomicU32` and `AtomicU64` have the size and bit validity of
//! `u32` and `u64` (any bit pattern is a valid atomic), and allow shared mutation.
//!
//! # Examples
//!
//! ```
//! use core::ptr::NonNull;
//! use core::sync::atomic::AtomicU64;
//! use vmlink_ring::{OutgoingPacket, Reader, Writer, init_control};
//!
//! // A stand-in for a mapping: one control page and one data page, 8-aligned.
//! let region: Vec<AtomicU64> = (0..2 * 512).map(|_| AtomicU64::new(0)).collect();
//! let ptr = NonNull::from(region.as_slice()).cast::<u8>();
//! // SAFETY: `region` outlives `ring` and is accessed only through it.
//! let ring = unsafe { vmlink_ring_mapping::slice_mem(ptr, 2 * 4096) }?;
//! init_control(&ring);
//! let (mut writer, mut reader) = (Writer::new(ring)?, Reader::new(ring)?);
//! let _ = writer.write(&OutgoingPacket::in_band_slice(b"mapped"))?;
//! assert_eq!(reader.peek()?.expect("a packet").info().payload_len(), 8);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![no_std]
// Loom builds of the ring swap its atomics for loom's, which no mapping can hold: the crate
// is empty there (it is only a dev-dependency of the ring's tests in such builds).
#![cfg(not(loom))]

#[cfg(test)]
extern crate std;

#[cfg(feature = "alloc")]
extern crate alloc;

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64};

use vmlink_ring::protocol::{ALIGNMENT, CONTROL_PAGE_SIZE, PAGE_SIZE};
use vmlink_ring::{
    CONTROL_WORDS, ControlWords, DataPage, LayoutError, PAGE_WORDS, SliceMem, check_data_len,
};

/// Checks that `ptr` is 8-byte aligned, as every ring word needs.
fn check_aligned(ptr: NonNull<u8>) -> Result<(), LayoutError> {
    let addr = ptr.as_ptr() as usize;
    if addr.is_multiple_of(ALIGNMENT) {
        Ok(())
    } else {
        Err(LayoutError::Misaligned { addr })
    }
}

/// The control words at the start of a mapped control page.
///
/// Fails with [`LayoutError::Misaligned`] unless `ptr` is 8-byte aligned.
///
/// # Safety
/// `ptr` must point to at least 128 bytes (the control words) that stay mapped, readable
/// and writable for `'a`, and that this process accesses only atomically while the
/// returned reference, or anything built from it, lives.
pub unsafe fn control_words<'a>(ptr: NonNull<u8>) -> Result<&'a ControlWords, LayoutError> {
    check_aligned(ptr)?;
    // SAFETY: `ptr` is 8-aligned (checked), so aligned for `AtomicU32`; the caller
    // guarantees `CONTROL_WORDS * 4` bytes behind it stay mapped and writable for 'a and are
    // only accessed atomically by this process. `[AtomicU32; N]` has the layout of
    // `[u32; N]`, every bit pattern is a valid `AtomicU32`, and atomics allow the shared
    // mutation the peer does.
    let words = unsafe { ptr.cast::<[AtomicU32; CONTROL_WORDS]>().as_ref() };
    Ok(ControlWords::from_atomics(words))
}

/// The 4 KiB data page at a mapped address.
///
/// Fails with [`LayoutError::Misaligned`] unless `ptr` is 8-byte aligned.
///
/// # Safety
/// `ptr` must point to 4096 bytes that stay mapped, readable and writable for `'a`, and
/// that this process accesses only atomically while the returned reference, or anything
/// built from it, lives.
pub unsafe fn data_page<'a>(ptr: NonNull<u8>) -> Result<&'a DataPage, LayoutError> {
    check_aligned(ptr)?;
    // SAFETY: `ptr` is 8-aligned (checked), as `AtomicU64` needs; the caller guarantees the
    // 4096 bytes behind it stay mapped and writable for 'a and are only accessed atomically
    // by this process. `[AtomicU64; PAGE_WORDS]` has the layout of `[u64; PAGE_WORDS]`,
    // every bit pattern is a valid `AtomicU64`, and atomics allow shared mutation.
    let words = unsafe { ptr.cast::<[AtomicU64; PAGE_WORDS]>().as_ref() };
    Ok(DataPage::from_atomics(words))
}

/// `count` 64-bit words at a mapped address, to be accessed atomically.
///
/// Fails with [`LayoutError::Misaligned`] unless `ptr` is 8-byte aligned.
///
/// # Safety
/// `ptr` must point to `count * 8` bytes that stay mapped, readable and writable for `'a`,
/// and that this process accesses only atomically while the returned slice, or anything
/// built from it, lives.
pub unsafe fn atomic_words<'a>(
    ptr: NonNull<u8>,
    count: usize,
) -> Result<&'a [AtomicU64], LayoutError> {
    check_aligned(ptr)?;
    // SAFETY: `ptr` is non-null and 8-aligned (checked), as `AtomicU64` needs; the caller
    // guarantees `count * 8` bytes behind it stay mapped and writable for 'a (so the length
    // fits in `isize`, and the bytes lie in one mapping) and are only accessed atomically by
    // this process. `AtomicU64` has the layout of `u64`, every bit pattern is a valid
    // `AtomicU64`, and atomics allow shared mutation.
    Ok(unsafe { core::slice::from_raw_parts(ptr.cast::<AtomicU64>().as_ptr(), count) })
}

/// A ring over a mapped region: a 4096-byte control page followed by the data area, `len`
/// bytes in all.
///
/// Fails before touching the region unless `ptr` is 8-byte aligned
/// ([`LayoutError::Misaligned`]), the region holds a control page and at least one data
/// page ([`LayoutError::RegionTooShort`]) and the data area is whole pages within the
/// ring's limit (see [`check_data_len`]).
///
/// # Safety
/// `ptr..ptr + len` must stay mapped, readable and writable for `'a`, and this process must
/// access it only through ring memory (atomically) while the returned value or anything
/// built from it lives. Other processes or a guest may write it at any time; that is what
/// ring memory is for. If another process can shrink the mapping (a file it can truncate),
/// seal it first, or an access may fault.
pub unsafe fn slice_mem<'a>(ptr: NonNull<u8>, len: usize) -> Result<SliceMem<'a>, LayoutError> {
    check_aligned(ptr)?;
    if len < CONTROL_PAGE_SIZE + PAGE_SIZE {
        return Err(LayoutError::RegionTooShort { len });
    }
    let data_len = len - CONTROL_PAGE_SIZE;
    check_data_len(data_len)?;
    // SAFETY: the region starts with the control page, mapped for 'a and accessed only
    // atomically (the caller's guarantee for the whole region).
    let control = unsafe { control_words(ptr) }?;
    // SAFETY: `CONTROL_PAGE_SIZE < len`, so the offset stays inside the region.
    let data_ptr = unsafe { ptr.add(CONTROL_PAGE_SIZE) };
    // SAFETY: the data area is the region's last `data_len` bytes, mapped for 'a and
    // accessed only atomically (the caller's guarantee for the whole region); it starts
    // 4096 bytes past an 8-aligned base, so 8-aligned.
    let data = unsafe { atomic_words(data_ptr, data_len / 8) }?;
    SliceMem::new(control, data)
}

/// Ring memory over a mapping that an owner keeps mapped: [`SliceMem`] over the region,
/// beside a shared handle to whatever unmaps it when dropped (a file mapping, a BAR, guest
/// memory). Clones share the owner, so the region stays mapped while any of them lives.
/// Every access goes straight to the [`SliceMem`].
///
/// With the `alloc` feature.
///
/// ```
/// use core::ptr::NonNull;
/// use core::sync::atomic::AtomicU64;
/// use std::sync::Arc;
/// use vmlink_ring::{OutgoingPacket, Reader, Writer, init_control};
/// use vmlink_ring_mapping::MappedRing;
///
/// // A stand-in for a mapping that unmaps when its last handle goes.
/// let region: Arc<Vec<AtomicU64>> = Arc::new((0..2 * 512).map(|_| AtomicU64::new(0)).collect());
/// let ptr = NonNull::from(region.as_slice()).cast::<u8>();
/// // SAFETY: the ring keeps `region` alive and reaches it only through atomics.
/// let ring = unsafe { MappedRing::new(ptr, 2 * 4096, region) }?;
/// init_control(&ring);
/// let (mut writer, mut reader) = (Writer::new(ring.clone())?, Reader::new(ring)?);
/// let _ = writer.write(&OutgoingPacket::in_band_slice(b"owned"))?;
/// assert_eq!(reader.peek()?.expect("a packet").info().payload_len(), 8);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[cfg(feature = "alloc")]
#[derive(Clone)]
pub struct MappedRing {
    // Built over the region that `_owner` keeps mapped; never handed out with its `'static`.
    mem: SliceMem<'static>,
    _owner: alloc::sync::Arc<dyn Send + Sync>,
}

#[cfg(feature = "alloc")]
impl MappedRing {
    /// A ring over `ptr..ptr + len` (as [`slice_mem`] checks it), kept mapped by `owner`.
    ///
    /// # Safety
    /// `ptr..ptr + len` must stay mapped, readable and writable while `owner` (or any clone
    /// of it) lives, and this process must access it only through ring memory
    /// (atomically) meanwhile. Other processes or a guest may write it at any time. If
    /// another process can shrink the mapping, seal it first, or an access may fault.
    pub unsafe fn new(
        ptr: NonNull<u8>,
        len: usize,
        owner: alloc::sync::Arc<dyn Send + Sync>,
    ) -> Result<Self, LayoutError> {
        // SAFETY: the caller guarantees the region stays mapped and is accessed only
        // atomically while `owner` lives; `owner` is stored beside the `SliceMem`, which
        // never leaves this type, so no access outlives it.
        let mem = unsafe { slice_mem(ptr, len) }?;
        Ok(Self { mem, _owner: owner })
    }
}

#[cfg(feature = "alloc")]
impl core::fmt::Debug for MappedRing {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MappedRing")
            .field("mem", &self.mem)
            .finish_non_exhaustive()
    }
}

// Inlined across crates: every ring access of a channel goes through these.
#[cfg(feature = "alloc")]
impl vmlink_ring::RingMem for MappedRing {
    #[inline]
    fn data_len(&self) -> usize {
        self.mem.data_len()
    }
    #[inline]
    fn load_control(&self, word: vmlink_ring::ControlWord) -> u32 {
        self.mem.load_control(word)
    }
    #[inline]
    fn store_control(&self, word: vmlink_ring::ControlWord, value: u32) {
        self.mem.store_control(word, value)
    }
    #[inline]
    fn read_data(&self, offset: usize, buf: &mut [u8]) {
        self.mem.read_data(offset, buf)
    }
    #[inline]
    fn write_data(&self, offset: usize, data: &[u8]) {
        self.mem.write_data(offset, data)
    }
    #[inline]
    fn read_data_words(&self, offset: usize, out: &mut [u64]) {
        self.mem.read_data_words(offset, out)
    }
    #[inline]
    fn write_data_words(&self, offset: usize, words: &[u64]) {
        self.mem.write_data_words(offset, words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::sync::atomic::Ordering;
    use std::vec::Vec;
    use vmlink_ring::{ControlWord, PageListMem, RingMem};

    /// An 8-aligned region of `pages` pages, accessed only atomically.
    fn region(pages: usize) -> Vec<AtomicU64> {
        (0..pages * PAGE_WORDS).map(|_| AtomicU64::new(0)).collect()
    }

    /// A pointer covering the whole region (one from `&region[0]` would cover one word
    /// only, and Miri rejects access past it).
    fn base(region: &[AtomicU64]) -> NonNull<u8> {
        NonNull::from(region).cast::<u8>()
    }

    #[test]
    fn slice_mem_checks_the_region() {
        // A control page and two data pages.
        let backing = region(3);
        let base = base(&backing);
        // SAFETY: `backing` outlives `mem` and is only accessed atomically.
        let mem = unsafe { slice_mem(base, 3 * PAGE_SIZE) }.unwrap();
        assert_eq!(mem.data_len(), 2 * PAGE_SIZE);
        mem.store_control(ControlWord::ReadIndex, 0x18);
        assert_eq!(backing[0].load(Ordering::Relaxed) >> 32, 0x18);
        mem.write_data(8, &[0xAB; 8]);
        assert_eq!(
            backing[PAGE_WORDS + 1].load(Ordering::Relaxed),
            0xABAB_ABAB_ABAB_ABAB
        );

        // SAFETY: as above; the function rejects the region before touching it.
        let short = unsafe { slice_mem(base, PAGE_SIZE) };
        assert_eq!(
            short.unwrap_err(),
            LayoutError::RegionTooShort { len: PAGE_SIZE }
        );
        // SAFETY: as above.
        let ragged = unsafe { slice_mem(base, 2 * PAGE_SIZE + 8) };
        assert_eq!(
            ragged.unwrap_err(),
            LayoutError::NotPageMultiple { len: PAGE_SIZE + 8 }
        );
        let odd = NonNull::new(base.as_ptr().wrapping_add(4)).unwrap();
        // SAFETY: as above; rejected for alignment before any access.
        let misaligned = unsafe { slice_mem(odd, 2 * PAGE_SIZE) };
        assert!(matches!(misaligned, Err(LayoutError::Misaligned { .. })));
    }

    #[test]
    fn pages_in_any_order() {
        // A control page and two data pages, used in reverse order as a guest's scattered
        // pages would be.
        let backing = region(3);
        let base = base(&backing);
        let at = |page: usize| NonNull::new(base.as_ptr().wrapping_add(page * PAGE_SIZE)).unwrap();
        // SAFETY: each pointer is a whole page of `backing`, which outlives the ring and is
        // only accessed atomically.
        let control = unsafe { control_words(at(0)) }.unwrap();
        // SAFETY: as above.
        let last = unsafe { data_page(at(2)) }.unwrap();
        // SAFETY: as above.
        let first = unsafe { data_page(at(1)) }.unwrap();
        let pages = [last, first];
        let mem = PageListMem::new(control, pages).unwrap();
        mem.store_control(ControlWord::WriteIndex, 0x20);
        assert_eq!(backing[0].load(Ordering::Relaxed), 0x20);
        mem.write_data(PAGE_SIZE, &[0x11; 8]);
        assert_eq!(
            backing[PAGE_WORDS].load(Ordering::Relaxed),
            0x1111_1111_1111_1111
        );

        let odd = NonNull::new(base.as_ptr().wrapping_add(12)).unwrap();
        let addr = odd.as_ptr() as usize;
        // SAFETY: rejected for alignment before any access.
        let c = unsafe { control_words(odd) };
        assert_eq!(c.unwrap_err(), LayoutError::Misaligned { addr });
        // SAFETY: as above.
        let p = unsafe { data_page(odd) };
        assert_eq!(p.unwrap_err(), LayoutError::Misaligned { addr });
        // SAFETY: as above.
        let w = unsafe { atomic_words(odd, 1) };
        assert_eq!(w.unwrap_err(), LayoutError::Misaligned { addr });
    }

    #[cfg(feature = "alloc")]
    #[test]
    fn a_mapped_ring_keeps_its_owner_while_any_clone_lives() {
        use std::sync::Arc;
        use vmlink_ring::{OutgoingPacket, Reader, Writer, init_control};

        let owner = Arc::new(region(3));
        let ptr = base(&owner);
        // SAFETY: the ring holds `owner`, which holds the region; it is accessed only
        // through the ring.
        let ring = unsafe { MappedRing::new(ptr, 3 * PAGE_SIZE, owner.clone()) }.unwrap();
        assert_eq!(ring.data_len(), 2 * PAGE_SIZE);
        init_control(&ring);
        let (mut writer, reader) = (Writer::new(ring.clone()).unwrap(), Reader::new(ring));
        // The test's handle, the writer's ring and the reader's: the test's goes first,
        // and the rings keep the region.
        assert_eq!(Arc::strong_count(&owner), 3);
        drop(owner);
        let _ = writer
            .write(&OutgoingPacket::in_band_slice(&[7u8; 100]))
            .unwrap();
        let mut reader = reader.unwrap();
        let packet = reader.peek().unwrap().expect("a packet");
        assert_eq!(packet.info().payload_len(), 104);
        // The region is refused as it would be by `slice_mem`.
        let short = Arc::new(region(1));
        let ptr = base(&short);
        // SAFETY: as above; the call fails before touching the region.
        let err = unsafe { MappedRing::new(ptr, PAGE_SIZE, short) }.unwrap_err();
        assert!(matches!(err, LayoutError::RegionTooShort { .. }), "{err:?}");
    }
}
