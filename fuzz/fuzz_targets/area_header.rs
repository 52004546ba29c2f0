//! The memory header from a hostile peer: the page a host writes at the start of a shared
//! area, naming its channels' rings and its buffer area.
//!
//! The input is header bytes, either raw or a sound header (built from ring and buffer
//! lengths) then corrupted by byte edits and truncation, plus the area length the reader
//! knows from elsewhere (the memfd's size).
//!
//! Asserted:
//! - `AreaLayout::parse` never panics and allocates nothing;
//! - on Ok: the version's major is 1; the layout's length is the given area length; it has at
//!   most 64 channels; every ring is page-aligned, a control page plus 1 to 524,288 data
//!   pages, inside the area; the buffer area is whole pages inside the area; no two regions
//!   overlap and none overlaps the header page; and the layout encodes to a header that
//!   parses back to the same layout;
//! - a sound header parses back to exactly what was built;
//! - on Err: the error's message is plain words (no `None`/`Some`, no braces).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmlink_fuzz::no_alloc;
use vmlink_ring::area::{AreaLayout, HEADER_LEN, MAX_CHANNELS};

const PAGE: u64 = 4096;
/// The ring core's largest data area: 2 GiB.
const MAX_DATA: u64 = 1 << 31;

#[derive(Arbitrary, Debug)]
enum Header {
    Raw(Vec<u8>),
    Built {
        /// Ring lengths in pages (control page included), per channel.
        rings: Vec<(u8, u8)>,
        buffer_pages: u16,
        /// Byte edits: (position in the page, new value).
        edits: Vec<(u16, u8)>,
        /// Keep only this many bytes of the page (when below its length).
        truncate: Option<u16>,
        /// Give the reader another area length than the header's.
        other_len: Option<u64>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    area_len: u64,
    header: Header,
}

fn check_layout(layout: &AreaLayout, area_len: u64) {
    assert_eq!(layout.len(), area_len);
    assert!(layout.channels().len() <= MAX_CHANNELS);
    let mut regions = vec![(0u64, HEADER_LEN as u64)];
    for ch in layout.channels() {
        for span in [ch.guest_to_host, ch.host_to_guest] {
            assert_eq!(span.offset % PAGE, 0, "{span:?}");
            assert_eq!(span.len % PAGE, 0, "{span:?}");
            let data = span.len.checked_sub(PAGE).expect("a control page");
            assert!((PAGE..=MAX_DATA).contains(&data), "{span:?}");
            let end = span.end().expect("no overflow");
            assert!(end <= area_len, "{span:?} past {area_len}");
            regions.push((span.offset, end));
        }
    }
    let buffer = layout.buffer();
    assert_eq!(buffer.len % PAGE, 0);
    let end = buffer.end().expect("no overflow");
    assert!(end <= area_len);
    if buffer.len > 0 {
        assert_eq!(buffer.offset % PAGE, 0);
        regions.push((buffer.offset, end));
    }
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[..i] {
            assert!(a.0 >= b.1 || b.0 >= a.1, "{a:?} overlaps {b:?}");
        }
    }
    let again = AreaLayout::parse(&layout.encode(), area_len).expect("what we encode parses");
    assert_eq!(&again.layout, layout);
}

fn parse(bytes: &[u8], area_len: u64) {
    match no_alloc("AreaLayout::parse", || AreaLayout::parse(bytes, area_len)) {
        Ok(parsed) => {
            assert_eq!(parsed.version.major, 1);
            check_layout(&parsed.layout, area_len);
        }
        Err(e) => {
            let message = e.to_string();
            assert!(
                !message.contains("None") && !message.contains("Some(") && !message.contains('{'),
                "{message}"
            );
        }
    }
}

fuzz_target!(|input: Input| {
    match input.header {
        Header::Raw(bytes) => parse(&bytes, input.area_len),
        Header::Built {
            rings,
            buffer_pages,
            edits,
            truncate,
            other_len,
        } => {
            let rings: Vec<(u64, u64)> = rings
                .iter()
                .take(MAX_CHANNELS + 2)
                .map(|&(g, h)| (u64::from(g) * PAGE, u64::from(h) * PAGE))
                .collect();
            let Ok(layout) = AreaLayout::packed(&rings, u64::from(buffer_pages) * PAGE) else {
                return;
            };
            let mut page = layout.encode();
            if edits.is_empty() && truncate.is_none() && other_len.is_none() {
                let parsed = AreaLayout::parse(&page, layout.len()).expect("a sound header");
                assert_eq!(parsed.layout, layout);
            }
            for (at, value) in edits.iter().take(64) {
                page[usize::from(*at) % HEADER_LEN] = *value;
            }
            let len = truncate.map_or(HEADER_LEN, |t| usize::from(t).min(HEADER_LEN));
            parse(&page[..len], other_len.unwrap_or(layout.len()));
        }
    }
});
