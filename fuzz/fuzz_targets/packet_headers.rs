//! GPA-direct and transfer-page headers from a hostile peer.
//!
//! The input is header bytes, either raw or built from ranges and then corrupted (edits,
//! truncation, trailing bytes, a wrong range count), plus an optional page limit. Every
//! input goes through both `parse_gpa_header` and `parse_transfer_page_header`.
//!
//! Asserted:
//! - `parse_*` and `validate_*` agree exactly (same error, same range count);
//! - both agree with an independent reference check of the rules in DESIGN.md;
//! - on Ok, every GPA range has byte_offset < 4096, byte_count > 0, exactly
//!   ceil((offset + count) / 4096) page numbers, all below the limit, and the ranges fill the
//!   header exactly; transfer-page ranges number `range_count`, fill the header exactly, and
//!   their ends do not overflow; every yielded value is the one in the bytes;
//! - the validators read only whole in-bounds words, each at most once, at most len / 8 of
//!   them, and nothing allocates.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmlink_channel::packet::{
    pages_spanned, parse_gpa_header, parse_transfer_page_header, validate_gpa_header,
    validate_transfer_page_header,
};
use vmlink_fuzz::{NoAlloc, no_alloc};

#[derive(Arbitrary, Debug)]
struct Input {
    limit: Option<u64>,
    header: Header,
}

#[derive(Arbitrary, Debug)]
enum Header {
    Raw(Vec<u8>),
    Gpa {
        ranges: Vec<GpaSpec>,
        corrupt: Corruption,
    },
    Transfer {
        pageset_id: u16,
        sender_owns_set: u8,
        ranges: Vec<(u32, u32)>,
        corrupt: Corruption,
    },
}

#[derive(Arbitrary, Debug)]
struct GpaSpec {
    byte_offset: u32,
    byte_count: u32,
    /// First page number; the rest follow it.
    first_page: u64,
    /// Use `byte_offset` and `byte_count` as given instead of nudging them valid.
    raw: bool,
}

#[derive(Arbitrary, Debug)]
struct Corruption {
    range_count: Option<u32>,
    edits: Vec<(u16, u8)>,
    truncate: Option<u16>,
    extra: Vec<u8>,
}

impl Corruption {
    fn apply(&self, h: &mut Vec<u8>) {
        if let Some(c) = self.range_count {
            h[4..8].copy_from_slice(&c.to_le_bytes());
        }
        for &(at, v) in self.edits.iter().take(16) {
            if !h.is_empty() {
                let i = at as usize % h.len();
                h[i] = v;
            }
        }
        if let Some(t) = self.truncate {
            h.truncate(t as usize);
        }
        h.extend_from_slice(&self.extra);
    }
}

fn build(header: &Header) -> Vec<u8> {
    match header {
        Header::Raw(b) => b.clone(),
        Header::Gpa { ranges, corrupt } => {
            let mut h = Vec::new();
            h.extend_from_slice(&0u32.to_le_bytes());
            h.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
            for r in ranges.iter().take(16) {
                let (offset, count) = if r.raw {
                    (r.byte_offset, r.byte_count)
                } else {
                    // At most 16 pages, so the header stays small.
                    let offset = r.byte_offset % 4096;
                    (offset, r.byte_count % (16 * 4096 - offset) + 1)
                };
                h.extend_from_slice(&count.to_le_bytes());
                h.extend_from_slice(&offset.to_le_bytes());
                let pages = pages_spanned(offset, count).min(16) as u64;
                for k in 0..pages {
                    h.extend_from_slice(&r.first_page.wrapping_add(k).to_le_bytes());
                }
            }
            corrupt.apply(&mut h);
            h
        }
        Header::Transfer {
            pageset_id,
            sender_owns_set,
            ranges,
            corrupt,
        } => {
            let mut h = Vec::new();
            h.extend_from_slice(&pageset_id.to_le_bytes());
            h.push(*sender_owns_set);
            h.push(0);
            h.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
            for &(count, offset) in ranges.iter().take(64) {
                h.extend_from_slice(&count.to_le_bytes());
                h.extend_from_slice(&offset.to_le_bytes());
            }
            corrupt.apply(&mut h);
            h
        }
    }
}

fn u32_at(h: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(h[at..at + 4].try_into().unwrap())
}

fn u64_at(h: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(h[at..at + 8].try_into().unwrap())
}

/// A reference GPA-direct check, written from the rules: Some(ranges) when valid.
#[allow(clippy::type_complexity)]
fn reference_gpa(h: &[u8], limit: Option<u64>) -> Option<Vec<(u32, u32, Vec<u64>)>> {
    if h.len() < 8 {
        return None;
    }
    let count = u32_at(h, 4);
    if count == 0 {
        return None;
    }
    let mut at = 8usize;
    let mut out = Vec::new();
    for _ in 0..count {
        if h.len() < at + 8 {
            return None;
        }
        let (byte_count, byte_offset) = (u32_at(h, at), u32_at(h, at + 4));
        at += 8;
        if byte_offset >= 4096 || byte_count == 0 {
            return None;
        }
        let pages = (u64::from(byte_offset) + u64::from(byte_count)).div_ceil(4096) as usize;
        if h.len() < at + 8 * pages {
            return None;
        }
        let list: Vec<u64> = (0..pages).map(|k| u64_at(h, at + 8 * k)).collect();
        if limit.is_some_and(|l| list.iter().any(|&p| p >= l)) {
            return None;
        }
        at += 8 * pages;
        out.push((byte_offset, byte_count, list));
    }
    (at == h.len()).then_some(out)
}

/// A reference transfer-page check: Some(ranges as (offset, count)) when valid.
fn reference_transfer(h: &[u8]) -> Option<Vec<(u32, u32)>> {
    if h.len() < 8 {
        return None;
    }
    let count = u32_at(h, 4) as usize;
    if count == 0 || h.len() != 8 + 8 * count {
        return None;
    }
    let ranges: Vec<(u32, u32)> = (0..count)
        .map(|i| (u32_at(h, 12 + 8 * i), u32_at(h, 8 + 8 * i)))
        .collect();
    ranges
        .iter()
        .all(|&(o, c)| o.checked_add(c).is_some())
        .then_some(ranges)
}

/// Records the validator's reads: whole in-bounds words, each at most once.
struct Reads<'a> {
    header: &'a [u8],
    seen: Vec<bool>,
    count: usize,
    bad: Option<usize>,
}

impl<'a> Reads<'a> {
    fn new(header: &'a [u8]) -> Self {
        Self {
            header,
            seen: vec![false; header.len() / 8],
            count: 0,
            bad: None,
        }
    }

    /// Called from inside the guarded validator: must not allocate or panic.
    fn read(&mut self, at: usize) -> [u8; 8] {
        self.count += 1;
        let ok = at % 8 == 0 && at.checked_add(8).is_some_and(|e| e <= self.header.len());
        if !ok || self.seen[at / 8] {
            self.bad.get_or_insert(at);
            return [0xEE; 8];
        }
        self.seen[at / 8] = true;
        self.header[at..at + 8].try_into().unwrap()
    }

    fn check(&self, what: &str) {
        assert!(
            self.bad.is_none(),
            "{what}: read at {:?} out of bounds, misaligned or repeated",
            self.bad
        );
        assert!(
            self.count <= self.header.len() / 8,
            "{what}: {} reads",
            self.count
        );
    }
}

fn check_gpa(h: &[u8], limit: Option<u64>) {
    let mut reads = Reads::new(h);
    let g = NoAlloc::start("validate_gpa_header");
    let validated = validate_gpa_header(h.len(), limit, |at| reads.read(at));
    g.finish();
    reads.check("validate_gpa_header");

    let parsed = no_alloc("parse_gpa_header", || parse_gpa_header(h, limit));
    let reference = reference_gpa(h, limit);
    match (&parsed, validated) {
        (Err(e), v) => {
            assert_eq!(v, Err(*e), "parse and validate disagree");
            assert!(reference.is_none(), "rejected a valid GPA header: {e}");
        }
        (Ok(_), Err(e)) => panic!("parse accepted what validate rejected: {e}"),
        (Ok(ranges), Ok(count)) => {
            let reference = reference.expect("accepted an invalid GPA header");
            assert_eq!(count as usize, reference.len());
            let mut filled = 8usize;
            let mut n = 0usize;
            let g = NoAlloc::start("GpaRanges iteration");
            for (r, expect) in ranges.zip(&reference) {
                assert!(r.byte_offset < 4096);
                assert!(r.byte_count > 0);
                let pages = (u64::from(r.byte_offset) + u64::from(r.byte_count)).div_ceil(4096);
                assert_eq!(r.page_count() as u64, pages);
                assert_eq!(r.pages().len() as u64, pages);
                assert_eq!((r.byte_offset, r.byte_count), (expect.0, expect.1));
                for (page, &want) in r.pages().zip(&expect.2) {
                    assert_eq!(page, want);
                    if let Some(l) = limit {
                        assert!(page < l, "page {page} not below limit {l}");
                    }
                }
                filled += 8 + 8 * r.page_count();
                n += 1;
            }
            g.finish();
            assert_eq!(n, count as usize, "iterator yielded {n} of {count} ranges");
            assert_eq!(filled, h.len(), "ranges do not fill the header exactly");
        }
    }
}

fn check_transfer(h: &[u8]) {
    let mut reads = Reads::new(h);
    let g = NoAlloc::start("validate_transfer_page_header");
    let validated = validate_transfer_page_header(h.len(), |at| reads.read(at));
    g.finish();
    reads.check("validate_transfer_page_header");

    let parsed = no_alloc("parse_transfer_page_header", || {
        parse_transfer_page_header(h)
    });
    let reference = reference_transfer(h);
    match (&parsed, validated) {
        (Err(e), v) => {
            assert_eq!(v, Err(*e), "parse and validate disagree");
            assert!(
                reference.is_none(),
                "rejected a valid transfer-page header: {e}"
            );
        }
        (Ok(_), Err(e)) => panic!("parse accepted what validate rejected: {e}"),
        (Ok(t), Ok(count)) => {
            let reference = reference.expect("accepted an invalid transfer-page header");
            assert_eq!(count as usize, reference.len());
            assert_eq!(
                h.len(),
                8 + 8 * count as usize,
                "ranges do not fill the header"
            );
            assert_eq!(t.pageset_id, u16::from_le_bytes([h[0], h[1]]));
            assert_eq!(t.sender_owns_set, h[2] != 0);
            assert_eq!(t.ranges().len(), count as usize);
            for (r, &(offset, byte_count)) in t.ranges().zip(&reference) {
                assert_eq!((r.byte_offset, r.byte_count), (offset, byte_count));
                assert!(r.byte_offset.checked_add(r.byte_count).is_some());
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let h = build(&input.header);
    check_gpa(&h, input.limit);
    check_transfer(&h);
});
