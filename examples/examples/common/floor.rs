//! The VMBus-layout floor of the `floors` and `instr` examples: a minimal hand-written ring
//! in the VMBus layout. Both examples include this file with
//! `#[path = "common/floor.rs"] mod floor;`.
//!
//! What the format fixes, and nothing more: a control page whose first words are the write
//! index and the read index (offsets 0 and 4, so both in one cache line, which each side's
//! index store takes from the other), then the data area. A packet is a 16-byte descriptor
//! (type 6 = in-band, data offset and total length in 8-byte units, flags, transaction id),
//! the 64-byte payload and an 8-byte trailer holding the packet's start offset: 88 bytes.
//! Data moves as relaxed `AtomicU64` loads and stores (as vmlink's, so peer-writable memory
//! is never a plain `&[u8]`); the writer publishes with a `Release` store of the write
//! index, the reader reads it with `Acquire` and frees space with a `Release` store of the
//! read index. Each side caches the other's index and re-reads it only when it looks empty
//! (reader) or full (writer), as vmlink's ring does. No validation, no interrupt mask, no
//! pending-send size, no doorbell: this is the floor the format allows, not a usable ring.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Data area of a floor ring: 64 KiB, as the vmlink rings it is compared with (a smaller
/// ring is slower here, its fewer lines bouncing more often).
const FLOOR_DATA: usize = 64 * 1024;
const FLOOR_WORDS: usize = FLOOR_DATA / 8;
/// Descriptor (16) + payload (64) + trailer (8).
const FLOOR_PACKET: u32 = 88;

/// The control page: the format puts the write index at offset 0 and the read index at
/// offset 4. The rest of the page (interrupt mask, pending send size, feature bits) is
/// unused here.
#[repr(C, align(4096))]
struct FloorControl {
    write_index: AtomicU32,
    read_index: AtomicU32,
}

/// One ring: the control page, then the data area.
#[repr(C)]
pub struct FloorRing {
    control: FloorControl,
    data: [AtomicU64; FLOOR_WORDS],
}

impl FloorRing {
    pub fn new() -> Box<Self> {
        Box::new(Self {
            control: FloorControl {
                write_index: AtomicU32::new(0),
                read_index: AtomicU32::new(0),
            },
            data: [const { AtomicU64::new(0) }; FLOOR_WORDS],
        })
    }

    /// The data word at byte offset `off` (a multiple of 8) plus `i` words, wrapping.
    #[inline]
    fn at(&self, off: u32, i: usize) -> &AtomicU64 {
        &self.data[(off as usize / 8 + i) % FLOOR_WORDS]
    }
}

pub struct FloorWriter<'r> {
    ring: &'r FloorRing,
    /// Where the next packet goes (unpublished).
    tail: u32,
    published: u32,
    /// The reader's index as last read.
    read: u32,
}

impl<'r> FloorWriter<'r> {
    pub fn new(ring: &'r FloorRing) -> Self {
        Self {
            ring,
            tail: 0,
            published: 0,
            read: 0,
        }
    }

    /// Free bytes; the writer never fills the ring (equal indices mean empty).
    #[inline]
    fn free(&self) -> u32 {
        if self.tail >= self.read {
            FLOOR_DATA as u32 - (self.tail - self.read)
        } else {
            self.read - self.tail
        }
    }

    /// Appends one in-band packet without publishing it; false when the ring is full.
    #[inline]
    pub fn push(&mut self, payload: &[u64; 8]) -> bool {
        if self.free() <= FLOOR_PACKET {
            self.read = self.ring.control.read_index.load(Ordering::Acquire);
            if self.free() <= FLOOR_PACKET {
                return false;
            }
        }
        let (r, t) = (self.ring, self.tail);
        // type 6 (in-band), data offset 16 bytes (2), length 80 bytes (10), flags 0.
        let descriptor = 6 | (2 << 16) | (10 << 32);
        r.at(t, 0).store(descriptor, Ordering::Relaxed);
        r.at(t, 1).store(0, Ordering::Relaxed); // transaction id
        for (i, w) in payload.iter().enumerate() {
            r.at(t, 2 + i).store(*w, Ordering::Relaxed);
        }
        r.at(t, 10).store(u64::from(t) << 32, Ordering::Relaxed); // trailer
        self.tail = (t + FLOOR_PACKET) % FLOOR_DATA as u32;
        true
    }

    /// Publishes what was pushed.
    #[inline]
    pub fn publish(&mut self) {
        if self.tail != self.published {
            self.ring
                .control
                .write_index
                .store(self.tail, Ordering::Release);
            self.published = self.tail;
        }
    }
}

pub struct FloorReader<'r> {
    ring: &'r FloorRing,
    /// The next packet (consumed up to here, unpublished).
    head: u32,
    published: u32,
    /// The writer's index as last read.
    write: u32,
}

impl<'r> FloorReader<'r> {
    pub fn new(ring: &'r FloorRing) -> Self {
        Self {
            ring,
            head: 0,
            published: 0,
            write: 0,
        }
    }

    /// Takes the next packet's 64-byte payload, unchecked; false when the ring is empty.
    #[inline]
    pub fn pop(&mut self, out: &mut [u64; 8]) -> bool {
        if self.head == self.write {
            self.write = self.ring.control.write_index.load(Ordering::Acquire);
            if self.head == self.write {
                return false;
            }
        }
        let (r, h) = (self.ring, self.head);
        let d = r.at(h, 0).load(Ordering::Relaxed);
        let data_offset8 = ((d >> 16) & 0xffff) as usize;
        let length8 = ((d >> 32) & 0xffff) as u32;
        for (i, w) in out.iter_mut().enumerate() {
            *w = r.at(h, data_offset8 + i).load(Ordering::Relaxed);
        }
        // Skip the packet and its trailer.
        self.head = (h + length8 * 8 + 8) % FLOOR_DATA as u32;
        true
    }

    /// Frees what was consumed.
    #[inline]
    pub fn release(&mut self) {
        if self.head != self.published {
            self.ring
                .control
                .read_index
                .store(self.head, Ordering::Release);
            self.published = self.head;
        }
    }
}
