//! Ring arithmetic, signals, and the checks both halves share.

use crate::error::{Index, LayoutError, RingError};
use crate::mem::{ControlWord, RingMem, check_data_len};
use crate::protocol::{ALIGNMENT, FEATURE_PENDING_SEND_SIZE};

/// Whether a commit obliges the caller to signal the peer (ring its doorbell).
///
/// Commits decide by the VMBus rules: the writer signals only when it took the ring from
/// empty to non-empty and the reader has not masked interrupts; the reader signals only when
/// it freed enough space to cross the writer's `pending_send_size`. Combine the signals of
/// several commits with `|`.
#[must_use = "a commit may oblige the caller to signal the peer"]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Signal(bool);

impl Signal {
    /// No signal is needed.
    pub const NONE: Signal = Signal(false);
    /// A signal is needed.
    pub const NEEDED: Signal = Signal(true);

    /// True when the peer must be signalled.
    pub const fn is_needed(self) -> bool {
        self.0
    }
}

impl core::ops::BitOr for Signal {
    type Output = Signal;
    fn bitor(self, rhs: Signal) -> Signal {
        Signal(self.0 | rhs.0)
    }
}

impl core::ops::BitOrAssign for Signal {
    fn bitor_assign(&mut self, rhs: Signal) {
        self.0 |= rhs.0;
    }
}

/// What a side that is about to sleep must do, after it has armed its wake-up.
#[must_use = "sleeping after `Ready` loses a wake-up"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitDecision {
    /// The condition already holds (data arrived, or space appeared): do not sleep.
    Ready,
    /// Sleep until the peer signals (or a timeout passes); the peer is now obliged to
    /// signal when the condition starts to hold.
    Sleep,
}

/// Initialises a ring's control page as the allocating side does: indices 0, interrupts
/// unmasked, no pending send, feature bit 0 (pending send size supported) set.
///
/// Only the side that allocates the memory calls this, before the peer attaches.
pub fn init_control<M: RingMem + ?Sized>(mem: &M) {
    mem.store_control(ControlWord::WriteIndex, 0);
    mem.store_control(ControlWord::ReadIndex, 0);
    mem.store_control(ControlWord::InterruptMask, 0);
    mem.store_control(ControlWord::PendingSendSize, 0);
    mem.store_control(ControlWord::FeatureBits, FEATURE_PENDING_SEND_SIZE);
}

/// Does the reader of this ring need a signal? True when data is queued and the reader has
/// not masked interrupts.
///
/// Looks only at the control page, so a host can recover a peer that lost an interrupt: if
/// this is true while the peer sleeps, signal it.
pub fn reader_needs_signal<M: RingMem + ?Sized>(mem: &M) -> bool {
    let write = mem.load_control(ControlWord::WriteIndex);
    let read = mem.load_control(ControlWord::ReadIndex);
    let mask = mem.load_control(ControlWord::InterruptMask);
    mask == 0 && write != read
}

/// Does the writer of this ring need a signal? True when the ring's `feature_bits` bit 0
/// (pending send size supported) is set, the writer asked for space with
/// `pending_send_size`, and more than that is free.
///
/// Looks only at the control page. Corrupt indices count as "signal": a needless signal is
/// harmless, a missing one can stall the writer. With feature bit 0 clear the answer is
/// always false, as in Linux and DPDK: such a writer re-checks on its own.
pub fn writer_needs_signal<M: RingMem + ?Sized>(mem: &M) -> bool {
    if mem.load_control(ControlWord::FeatureBits) & FEATURE_PENDING_SEND_SIZE == 0 {
        return false;
    }
    let pending = mem.load_control(ControlWord::PendingSendSize);
    if pending == 0 {
        return false;
    }
    let Ok(geo) = Geometry::new(mem.data_len()) else {
        return true;
    };
    let write = geo.check_index(mem.load_control(ControlWord::WriteIndex), Index::Write);
    let read = geo.check_index(mem.load_control(ControlWord::ReadIndex), Index::Read);
    match (write, read) {
        (Ok(w), Ok(r)) => geo.free(w, r) > pending as usize,
        _ => true,
    }
}

/// The data area's size and the arithmetic on indices into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    len: u32,
}

impl Geometry {
    pub(crate) fn new(data_len: usize) -> Result<Self, LayoutError> {
        check_data_len(data_len)?;
        // `check_data_len` caps the length at 2^31, so it fits.
        Ok(Self {
            len: data_len as u32,
        })
    }

    #[inline]
    pub(crate) fn len(self) -> usize {
        self.len as usize
    }

    /// Validates an index read from the control page.
    #[inline]
    pub(crate) fn check_index(self, value: u32, index: Index) -> Result<u32, RingError> {
        if value >= self.len {
            Err(RingError::IndexOutOfRange {
                index,
                value,
                data_len: self.len,
            })
        } else if !(value as usize).is_multiple_of(ALIGNMENT) {
            Err(RingError::IndexMisaligned { index, value })
        } else {
            Ok(value)
        }
    }

    /// Bytes from `from` forward to `to` (both valid indices).
    #[inline]
    pub(crate) fn distance(self, from: u32, to: u32) -> usize {
        // Both are below `len`, so one conditional add replaces a division (which would
        // cost tens of cycles on every packet).
        if to >= from {
            (to - from) as usize
        } else {
            // `len <= 2^31` and `to < from`, so this cannot overflow.
            (to + self.len - from) as usize
        }
    }

    /// Bytes queued when the writer is at `write` and the reader at `read`.
    #[inline]
    pub(crate) fn used(self, write: u32, read: u32) -> usize {
        self.distance(read, write)
    }

    /// Bytes free when the writer is at `write` and the reader at `read`.
    #[inline]
    pub(crate) fn free(self, write: u32, read: u32) -> usize {
        self.len() - self.used(write, read)
    }

    /// The index `n` bytes past `index`.
    #[inline]
    pub(crate) fn advance(self, index: u32, n: usize) -> u32 {
        // `n` is at most the data length here, so one subtraction wraps the sum; the
        // division stays as a fallback that is never expected to run.
        let len = u64::from(self.len);
        let mut sum = u64::from(index) + n as u64;
        if sum >= len {
            sum -= len;
            if sum >= len {
                sum %= len;
            }
        }
        sum as u32
    }
}

/// Reads `buf.len()` bytes at ring offset `at`, wrapping at the end of the data area.
pub(crate) fn read_wrapped<M: RingMem + ?Sized>(mem: &M, geo: Geometry, at: u32, buf: &mut [u8]) {
    let at = at as usize;
    let first = (geo.len() - at).min(buf.len());
    let (head, tail) = buf.split_at_mut(first);
    mem.read_data(at, head);
    if !tail.is_empty() {
        mem.read_data(0, tail);
    }
}

/// Writes `data` at ring offset `at`, wrapping at the end of the data area.
pub(crate) fn write_wrapped<M: RingMem + ?Sized>(mem: &M, geo: Geometry, at: u32, data: &[u8]) {
    let at = at as usize;
    let first = (geo.len() - at).min(data.len());
    let (head, tail) = data.split_at(first);
    mem.write_data(at, head);
    if !tail.is_empty() {
        mem.write_data(0, tail);
    }
}

/// Reads `out.len()` words at ring offset `at` (a valid index, so a multiple of 8),
/// wrapping at the end of the data area.
#[inline]
pub(crate) fn read_words_wrapped<M: RingMem + ?Sized>(
    mem: &M,
    geo: Geometry,
    at: u32,
    out: &mut [u64],
) {
    let at = at as usize;
    let first = ((geo.len() - at) / 8).min(out.len());
    let (head, tail) = out.split_at_mut(first);
    mem.read_data_words(at, head);
    if !tail.is_empty() {
        mem.read_data_words(0, tail);
    }
}

/// Checks that `offset..offset + len` lies within `size` bytes.
#[inline]
pub(crate) fn in_bounds(offset: usize, len: usize, size: usize) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::HeapMem;

    #[test]
    fn arithmetic() {
        let g = Geometry::new(4096).unwrap();
        assert_eq!(g.used(0, 0), 0);
        assert_eq!(g.free(0, 0), 4096);
        assert_eq!(g.used(8, 4088), 16);
        assert_eq!(g.free(4088, 8), 16);
        assert_eq!(g.advance(4088, 16), 8);
        assert_eq!(g.advance(0, 4096), 0);
        assert_eq!(
            g.check_index(4096, Index::Read),
            Err(RingError::IndexOutOfRange {
                index: Index::Read,
                value: 4096,
                data_len: 4096
            })
        );
        assert_eq!(
            g.check_index(12, Index::Write),
            Err(RingError::IndexMisaligned {
                index: Index::Write,
                value: 12
            })
        );
        assert_eq!(
            g.check_index(u32::MAX, Index::Write).unwrap_err(),
            RingError::IndexOutOfRange {
                index: Index::Write,
                value: u32::MAX,
                data_len: 4096
            }
        );
        let big = Geometry::new(crate::mem::MAX_DATA_LEN).unwrap();
        assert_eq!(big.used(0, (1u32 << 31) - 8), 8);
        assert_eq!(big.advance((1u32 << 31) - 8, 16), 8);
    }

    #[test]
    fn owed_signals_from_the_control_page() {
        let mem = HeapMem::new(4096).unwrap();
        assert!(!reader_needs_signal(&mem));
        assert!(!writer_needs_signal(&mem));
        mem.store_control(ControlWord::WriteIndex, 64);
        assert!(reader_needs_signal(&mem));
        mem.store_control(ControlWord::InterruptMask, 1);
        assert!(!reader_needs_signal(&mem), "a masked reader is polling");
        // The writer waits for 4000 bytes; 4096 - 64 are free.
        mem.store_control(ControlWord::PendingSendSize, 4000);
        assert!(writer_needs_signal(&mem));
        mem.store_control(ControlWord::PendingSendSize, 4050);
        assert!(!writer_needs_signal(&mem));
        mem.store_control(ControlWord::ReadIndex, 5);
        assert!(
            writer_needs_signal(&mem),
            "corrupt indices err on the side of signalling"
        );
        assert_eq!(
            mem.load_control(ControlWord::FeatureBits),
            FEATURE_PENDING_SEND_SIZE
        );
    }
}
