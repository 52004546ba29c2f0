//! Helpers shared by the fuzz targets: a hostile peer's vocabulary (raw or nudged control
//! words, hand-built packets, scribbles), byte-level views of a ring, an allocation guard
//! that proves a library call allocated nothing, and the checked whole-header reads of
//! packets received in place.

use arbitrary::Arbitrary;
use core::cell::Cell;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::alloc::{GlobalAlloc, Layout, System};
use vmlink_channel::packet::{
    GpaRanges, pages_spanned, parse_gpa_header, parse_transfer_page_header,
};
use vmlink_channel::{ChannelError, FailureCause, Packet, PacketType, Received};
use vmlink_ring::protocol::{CONTROL_PAGE_SIZE, DESCRIPTOR_SIZE, PAGE_SIZE, TRAILER_SIZE};
use vmlink_ring::{ControlWord, HeapMem, RingMem};

// ---------------------------------------------------------------------------------------
// Allocation guard
// ---------------------------------------------------------------------------------------

/// Counts allocations made while a [`NoAlloc`] guard is active.
struct CountingAlloc;

static GUARD_ACTIVE: AtomicBool = AtomicBool::new(false);
static GUARDED_ALLOCS: AtomicUsize = AtomicUsize::new(0);
static GUARDED_LARGEST: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread is inside [`largest_alloc`].
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    /// The largest allocation this thread made while tracking.
    static TRACKED_LARGEST: Cell<usize> = const { Cell::new(0) };
}

impl CountingAlloc {
    fn note(size: usize) {
        if GUARD_ACTIVE.load(Ordering::Relaxed) {
            GUARDED_ALLOCS.fetch_add(1, Ordering::Relaxed);
            GUARDED_LARGEST.fetch_max(size, Ordering::Relaxed);
        }
        // Const-initialised thread locals without destructors never allocate; `try_with`
        // fails only while the thread is being torn down.
        let _ = TRACKING.try_with(|t| {
            if t.get() {
                let _ = TRACKED_LARGEST.try_with(|l| l.set(l.get().max(size)));
            }
        });
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the only
// addition is bumping two counters, which cannot affect the allocation.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::note(layout.size());
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we pass on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::note(new_size);
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract, which we pass on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller upholds `GlobalAlloc::dealloc`'s contract, which we pass on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// While alive, counts every heap allocation; [`NoAlloc::finish`] asserts there were none.
///
/// The ring core and the packet parsers are `no_std` code that must never allocate, least of
/// all an amount the peer chose (DESIGN.md, rule 5). Wrap each library call in a guard and
/// allocate nothing of our own until `finish`.
#[must_use]
pub struct NoAlloc {
    what: &'static str,
}

impl NoAlloc {
    /// Starts counting.
    pub fn start(what: &'static str) -> Self {
        GUARDED_ALLOCS.store(0, Ordering::Relaxed);
        GUARDED_LARGEST.store(0, Ordering::Relaxed);
        GUARD_ACTIVE.store(true, Ordering::SeqCst);
        Self { what }
    }

    /// Stops counting; panics if the guarded code allocated.
    pub fn finish(self) {
        GUARD_ACTIVE.store(false, Ordering::SeqCst);
        let n = GUARDED_ALLOCS.load(Ordering::Relaxed);
        let largest = GUARDED_LARGEST.load(Ordering::Relaxed);
        assert!(
            n == 0,
            "{} allocated {n} times (largest {largest} bytes)",
            self.what
        );
    }
}

impl Drop for NoAlloc {
    fn drop(&mut self) {
        GUARD_ACTIVE.store(false, Ordering::SeqCst);
    }
}

/// Runs `f` and returns its result with the size of the largest heap allocation (or
/// reallocation) this thread made meanwhile; 0 when it made none. Unlike [`NoAlloc`] it
/// counts only the calling thread, so other threads may allocate freely meanwhile.
pub fn largest_alloc<R>(f: impl FnOnce() -> R) -> (R, usize) {
    TRACKED_LARGEST.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    let r = f();
    TRACKING.with(|t| t.set(false));
    (r, TRACKED_LARGEST.with(Cell::get))
}

/// Runs `f` under a [`NoAlloc`] guard. Only for calls whose result borrows nothing.
pub fn no_alloc<R>(what: &'static str, f: impl FnOnce() -> R) -> R {
    let g = NoAlloc::start(what);
    let r = f();
    g.finish();
    r
}

// ---------------------------------------------------------------------------------------
// Control words and ring geometry
// ---------------------------------------------------------------------------------------

/// A value a hostile peer stores in an index word: anything at all, or a value nudged into
/// range and alignment so that the fuzzer reaches the code behind the index checks.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexValue {
    /// Exactly this value.
    Raw(u32),
    /// `value % data_len`, rounded down to 8.
    Nudged(u32),
    /// Zero.
    Zero,
}

impl IndexValue {
    /// The word to store for a ring with a `data_len`-byte data area.
    pub fn resolve(self, data_len: usize) -> u32 {
        match self {
            IndexValue::Raw(v) => v,
            IndexValue::Nudged(v) => ((v as usize % data_len) & !7) as u32,
            IndexValue::Zero => 0,
        }
    }
}

/// The control page as a hostile peer may have left it.
#[derive(Arbitrary, Debug, Clone)]
pub struct ControlPage {
    /// `write_index`.
    pub write_index: IndexValue,
    /// `read_index`.
    pub read_index: IndexValue,
    /// `interrupt_mask`.
    pub interrupt_mask: u32,
    /// `pending_send_size`.
    pub pending_send_size: u32,
    /// `feature_bits`.
    pub feature_bits: u32,
}

/// Data-area length for a page count taken from the input: 1 to 4 pages.
pub fn data_len_for(pages: u8) -> usize {
    (pages as usize % 4 + 1) * PAGE_SIZE
}

/// A zeroed ring image (control page, then `data_len` bytes) with `control` stored in it.
pub fn image_with_control(data_len: usize, control: &ControlPage) -> Vec<u8> {
    let mut image = vec![0u8; CONTROL_PAGE_SIZE + data_len];
    let words = [
        (
            ControlWord::WriteIndex,
            control.write_index.resolve(data_len),
        ),
        (ControlWord::ReadIndex, control.read_index.resolve(data_len)),
        (ControlWord::InterruptMask, control.interrupt_mask),
        (ControlWord::PendingSendSize, control.pending_send_size),
        (ControlWord::FeatureBits, control.feature_bits),
    ];
    for (word, value) in words {
        let at = word.offset();
        image[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }
    image
}

/// Reads a control word out of an image.
pub fn image_control(image: &[u8], word: ControlWord) -> u32 {
    let at = word.offset();
    u32::from_le_bytes(image[at..at + 4].try_into().unwrap())
}

/// Stores a control word into an image.
pub fn set_image_control(image: &mut [u8], word: ControlWord, value: u32) {
    let at = word.offset();
    image[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

/// The whole data area of a ring, copied out.
pub fn data_snapshot(mem: &HeapMem) -> Vec<u8> {
    let mut data = vec![0u8; mem.data_len()];
    mem.read_data(0, &mut data);
    data
}

/// `len` bytes of `data` starting at ring offset `at`, wrapping at the end (computed
/// independently of the library's own wrapping code).
pub fn wrapped(data: &[u8], at: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| data[(at + i) % data.len()]).collect()
}

/// Writes `bytes` into the data area at `at` (taken modulo the data length), wrapping; at
/// most one data area's worth.
pub fn write_wrapped_peer(mem: &HeapMem, at: usize, bytes: &[u8]) {
    let len = mem.data_len();
    let bytes = &bytes[..bytes.len().min(len)];
    let at = at % len;
    let first = (len - at).min(bytes.len());
    mem.write_data(at, &bytes[..first]);
    if first < bytes.len() {
        mem.write_data(0, &bytes[first..]);
    }
}

/// Bytes from index `from` forward to index `to` in a ring of `len` bytes.
pub fn distance(len: usize, from: u32, to: u32) -> usize {
    (to as usize + len - from as usize) % len
}

/// True when `v` is a valid index for a `len`-byte data area.
pub fn index_ok(len: usize, v: u32) -> bool {
    (v as usize) < len && v % 8 == 0
}

// ---------------------------------------------------------------------------------------
// Hand-built packets (what a peer writer puts in the ring)
// ---------------------------------------------------------------------------------------

/// A packet type as the peer writes it.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum TypeSel {
    /// 6
    InBand,
    /// 7
    TransferPages,
    /// 9
    GpaDirect,
    /// 0x0B
    Completion,
    /// Anything.
    Raw(u16),
}

impl TypeSel {
    /// The raw type field.
    pub fn raw(self) -> u16 {
        match self {
            TypeSel::InBand => 6,
            TypeSel::TransferPages => 7,
            TypeSel::GpaDirect => 9,
            TypeSel::Completion => 0x0B,
            TypeSel::Raw(v) => v,
        }
    }
}

/// Packet flags as the peer writes them.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum FlagSel {
    /// 0
    None,
    /// 1
    CompletionRequested,
    /// Anything.
    Raw(u16),
}

impl FlagSel {
    /// The raw flags field.
    pub fn raw(self) -> u16 {
        match self {
            FlagSel::None => 0,
            FlagSel::CompletionRequested => 1,
            FlagSel::Raw(v) => v,
        }
    }
}

/// A packet the peer writes into the ring: well formed unless told otherwise.
#[derive(Arbitrary, Debug, Clone)]
pub struct PeerPacket {
    /// Type field.
    pub packet_type: TypeSel,
    /// Flags field.
    pub flags: FlagSel,
    /// Transaction id.
    pub transaction_id: u64,
    /// Extra header length in 8-byte units (0..=7).
    pub header8: u8,
    /// Payload length in bytes (capped by the ring).
    pub payload_len: u16,
    /// Byte pattern for header and payload.
    pub fill: u8,
    /// Overrides `data_offset8` with a raw value.
    pub raw_data_offset8: Option<u16>,
    /// Overrides `length8` with a raw value.
    pub raw_length8: Option<u16>,
    /// Writes garbage padding instead of zeros (allowed: readers must not require zeros).
    pub dirty_padding: bool,
}

impl PeerPacket {
    /// The packet's bytes (descriptor, header, payload, padding, trailer) for a ring of
    /// `data_len` bytes, starting at `start`. At most `data_len` bytes long.
    pub fn encode(&self, data_len: usize, start: u32) -> Vec<u8> {
        let header_len = (self.header8 % 8) as usize * 8;
        let max_payload = data_len.saturating_sub(DESCRIPTOR_SIZE + TRAILER_SIZE + header_len);
        let payload_len = (self.payload_len as usize).min(max_payload);
        let body = header_len + payload_len;
        let padded = (DESCRIPTOR_SIZE + body).div_ceil(8) * 8;
        let data_offset8 = self
            .raw_data_offset8
            .unwrap_or(((DESCRIPTOR_SIZE + header_len) / 8) as u16);
        let length8 = self.raw_length8.unwrap_or((padded / 8) as u16);
        let mut out = Vec::with_capacity(padded + TRAILER_SIZE);
        out.extend_from_slice(&self.packet_type.raw().to_le_bytes());
        out.extend_from_slice(&data_offset8.to_le_bytes());
        out.extend_from_slice(&length8.to_le_bytes());
        out.extend_from_slice(&self.flags.raw().to_le_bytes());
        out.extend_from_slice(&self.transaction_id.to_le_bytes());
        out.extend((0..body).map(|i| self.fill.wrapping_add(i as u8)));
        let pad = if self.dirty_padding { 0xA5 } else { 0 };
        out.resize(padded, pad);
        out.extend_from_slice(&((start as u64) << 32).to_le_bytes());
        out.truncate(data_len);
        out
    }
}

/// The peer writes bytes anywhere in the data area.
#[derive(Arbitrary, Debug, Clone)]
pub struct Scribble {
    /// Where (modulo the data length).
    pub offset: u16,
    /// What.
    pub bytes: Vec<u8>,
}

impl Scribble {
    /// Applies the scribble.
    pub fn apply(&self, mem: &HeapMem) {
        write_wrapped_peer(mem, self.offset as usize, &self.bytes);
    }

    /// The data-area offsets the scribble touches.
    pub fn touches(&self, data_len: usize) -> impl Iterator<Item = usize> + '_ {
        let n = self.bytes.len().min(data_len);
        (0..n).map(move |i| (self.offset as usize + i) % data_len)
    }
}

// ---------------------------------------------------------------------------------------
// Whole-header reads of received packets
// ---------------------------------------------------------------------------------------

/// A packet received in place whose extra header can be copied out whole (a
/// [`Packet`]).
pub trait WholeHeader {
    /// The packet's description.
    fn received(&self) -> Received;
    /// `header(scratch)`.
    fn whole_header<'s>(&mut self, scratch: &'s mut [u8]) -> Result<&'s [u8], ChannelError>;
    /// `gpa_ranges(scratch)`.
    fn ranges<'s>(&mut self, scratch: &'s mut [u8]) -> Result<GpaRanges<'s>, ChannelError>;
}

impl WholeHeader for Packet<'_> {
    fn received(&self) -> Received {
        self.meta()
    }
    fn whole_header<'s>(&mut self, scratch: &'s mut [u8]) -> Result<&'s [u8], ChannelError> {
        self.header(scratch)
    }
    fn ranges<'s>(&mut self, scratch: &'s mut [u8]) -> Result<GpaRanges<'s>, ChannelError> {
        self.gpa_ranges(scratch)
    }
}

/// Which whole-header read to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderCall {
    /// `header(scratch)`.
    Header,
    /// `gpa_ranges(scratch)`.
    GpaRanges,
}

impl HeaderCall {
    /// The call a script's read selects (the reads' `offset`, which a whole-header read has
    /// no use for, picks it: even for `header`, odd for `gpa_ranges`).
    pub fn from_selector(v: u16) -> Self {
        if v % 2 == 0 {
            HeaderCall::Header
        } else {
            HeaderCall::GpaRanges
        }
    }
}

/// What a whole-header read amounted to, once its answer was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderVerdict {
    /// The header (or its ranges) was handed out.
    Ok,
    /// `BufferTooSmall`: the scratch was shorter than the header.
    TooSmall,
    /// `NotGpaDirect`: ranges asked of another packet type.
    NotGpaDirect,
    /// `Failed(cause)`: for a GPA-direct or transfer-page packet with a long enough scratch.
    /// The caller checks the cause against the channel's (the header's own
    /// `Protocol(Packet(_))`, or the cause the channel had already failed with) and treats
    /// the channel as failed from then on.
    Failed(FailureCause),
}

/// What earlier whole-header reads of one packet returned, for a packet whose bytes nobody
/// rewrites while it is read (then every read must agree). Holds no more than its capacity,
/// so it never allocates once made.
pub struct HeaderMemo {
    bytes: Vec<u8>,
    /// `Some(true)`: a read handed out `bytes`; `Some(false)`: a read found it malformed.
    valid: Option<bool>,
}

impl HeaderMemo {
    /// A memo for headers of up to `capacity` bytes (longer ones are not remembered).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(capacity),
            valid: None,
        }
    }

    /// Forgets everything: the next packet.
    pub fn reset(&mut self) {
        self.bytes.clear();
        self.valid = None;
    }

    fn saw_valid(&mut self, bytes: &[u8]) {
        match self.valid {
            Some(true) => assert_eq!(self.bytes, bytes, "two reads of one header differ"),
            Some(false) => panic!("a header found malformed was then handed out"),
            None if bytes.len() <= self.bytes.capacity() => {
                self.bytes.extend_from_slice(bytes);
                self.valid = Some(true);
            }
            None => {}
        }
    }

    fn saw_invalid(&mut self) {
        assert_ne!(
            self.valid,
            Some(true),
            "a header handed out was then found malformed"
        );
        self.valid = Some(false);
    }
}

/// Checks received GPA ranges: at least one; each with an offset below 4096, a non-zero
/// count, exactly the pages it spans, all below `limit`; together filling the `len`-byte
/// header exactly. Allocates nothing.
fn check_ranges(ranges: GpaRanges<'_>, len: usize, limit: Option<u64>) {
    let mut used = 8usize;
    let mut count = 0usize;
    for r in ranges {
        count += 1;
        assert!(r.byte_offset < 4096, "gpa_ranges: offset {}", r.byte_offset);
        assert!(r.byte_count > 0, "gpa_ranges: an empty range");
        assert_eq!(
            r.page_count(),
            pages_spanned(r.byte_offset, r.byte_count),
            "gpa_ranges: page count"
        );
        assert_eq!(r.pages().len(), r.page_count());
        if let Some(l) = limit {
            assert!(r.pages().all(|p| p < l), "gpa_ranges: a page past {l:#x}");
        }
        used += 8 + 8 * r.page_count();
    }
    assert!(count > 0, "gpa_ranges: no ranges");
    assert_eq!(used, len, "gpa_ranges: the ranges do not fill the header");
}

/// Reads the whole extra header of `p` into `scratch` with `call` and checks the answer
/// against the documented rules:
/// - `Ok` exactly when the scratch holds the header (and, for `gpa_ranges`, the packet is
///   GPA-direct); `header` returns exactly `header_len` bytes at the start of the scratch,
///   and what it returns for a GPA-direct or transfer-page packet parses; GPA ranges are
///   well formed, below `limit`, and fill the header;
/// - `NotGpaDirect { packet_type }` exactly for `gpa_ranges` of another packet type;
/// - `BufferTooSmall { needed: header_len, capacity: scratch.len() }` exactly when the
///   scratch is shorter (and the call got that far);
/// - `Failed(_)` only for GPA-direct and transfer-page packets, with a long enough scratch;
/// - nothing else.
///
/// With a `memo` (the packet's bytes cannot change meanwhile), every read of the packet
/// agrees: the same bytes, or malformed every time. Allocates nothing.
pub fn read_whole_header(
    p: &mut impl WholeHeader,
    call: HeaderCall,
    scratch: &mut [u8],
    limit: Option<u64>,
    memo: Option<&mut HeaderMemo>,
) -> HeaderVerdict {
    let m = p.received();
    let (len, cap) = (m.header_len, scratch.len());
    let structured = matches!(
        m.packet_type,
        PacketType::GpaDirect | PacketType::TransferPages
    );
    let at = scratch.as_ptr();
    let r = match call {
        HeaderCall::Header => p.whole_header(scratch).map(|h| {
            assert_eq!(
                h.len(),
                len,
                "header: {} bytes of a {len}-byte header",
                h.len()
            );
            assert_eq!(h.as_ptr(), at, "header: not the scratch's bytes");
            match m.packet_type {
                PacketType::GpaDirect => assert!(
                    parse_gpa_header(h, limit).is_ok(),
                    "header: an invalid GPA header handed out"
                ),
                PacketType::TransferPages => assert!(
                    parse_transfer_page_header(h).is_ok(),
                    "header: an invalid transfer-page header handed out"
                ),
                _ => {}
            }
        }),
        HeaderCall::GpaRanges => p
            .ranges(scratch)
            .map(|ranges| check_ranges(ranges, len, limit)),
    };
    let not_gpa = call == HeaderCall::GpaRanges && m.packet_type != PacketType::GpaDirect;
    let verdict = match r {
        Err(ChannelError::NotGpaDirect { packet_type }) => {
            assert!(not_gpa, "{call:?}: NotGpaDirect for {:?}", m.packet_type);
            assert_eq!(
                packet_type, m.packet_type,
                "NotGpaDirect names another type"
            );
            return HeaderVerdict::NotGpaDirect;
        }
        _ if not_gpa => panic!("gpa_ranges of a {:?} packet: {r:?}", m.packet_type),
        Ok(()) => {
            assert!(cap >= len, "{call:?}: a {len}-byte header into {cap} bytes");
            HeaderVerdict::Ok
        }
        Err(ChannelError::BufferTooSmall { needed, capacity }) => {
            assert!(
                cap < len,
                "{call:?}: BufferTooSmall for a {len}-byte header into {cap}"
            );
            assert_eq!(
                (needed, capacity),
                (len, cap),
                "{call:?}: BufferTooSmall numbers"
            );
            return HeaderVerdict::TooSmall;
        }
        Err(ChannelError::Failed(c)) => {
            assert!(
                cap >= len,
                "{call:?}: Failed before the header could be copied"
            );
            assert!(
                structured,
                "{call:?}: Failed({c:?}) for a {:?} packet, whose header has no structure",
                m.packet_type
            );
            HeaderVerdict::Failed(c)
        }
        Err(e) => panic!("{call:?}: undocumented error {e:?}"),
    };
    if let Some(memo) = memo {
        match verdict {
            HeaderVerdict::Ok => memo.saw_valid(&scratch[..len]),
            _ => memo.saw_invalid(),
        }
    }
    verdict
}
