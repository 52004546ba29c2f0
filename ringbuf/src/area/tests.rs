//! The layout pinned, a round trip, and one test per rule: each breaks exactly one
//! rule of a sound header and expects exactly its error.
use super::*;
use core::mem::{offset_of, size_of};

const RING: u64 = 4096 + 4 * 4096;

/// One channel of two 4-data-page rings, then two buffer pages: area 0xD000 bytes.
fn sound() -> AreaLayout {
    AreaLayout::packed(&[(RING, RING)], 2 * 4096).unwrap()
}

fn parse(page: &[u8]) -> Result<ParsedHeader, AreaError> {
    AreaLayout::parse(page, sound().len())
}

fn put_u16(page: &mut [u8], at: usize, v: u16) {
    page[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(page: &mut [u8], at: usize, v: u32) {
    page[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(page: &mut [u8], at: usize, v: u64) {
    page[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// `sound()`'s page with one 8-byte field replaced.
fn with_u64(at: usize, v: u64) -> [u8; HEADER_LEN] {
    let mut page = sound().encode();
    put_u64(&mut page, at, v);
    page
}

const G2H: Region = Region::GuestToHost { channel: 0 };
const H2G: Region = Region::HostToGuest { channel: 0 };

#[test]
fn layout_is_pinned() {
    assert_eq!(size_of::<HeaderFixed>(), FIXED_LEN);
    assert_eq!(FIXED_LEN, 64);
    assert_eq!(offset_of!(HeaderFixed, magic), 0x00);
    assert_eq!(offset_of!(HeaderFixed, version_major), 0x08);
    assert_eq!(offset_of!(HeaderFixed, version_minor), 0x0A);
    assert_eq!(offset_of!(HeaderFixed, header_len), 0x0C);
    assert_eq!(offset_of!(HeaderFixed, area_len), 0x10);
    assert_eq!(offset_of!(HeaderFixed, channel_count), 0x18);
    assert_eq!(offset_of!(HeaderFixed, channel_entry_len), 0x1C);
    assert_eq!(offset_of!(HeaderFixed, buffer_offset), 0x20);
    assert_eq!(offset_of!(HeaderFixed, buffer_len), 0x28);
    assert_eq!(offset_of!(HeaderFixed, reserved), RESERVED_OFFSET);
    assert_eq!(RESERVED_OFFSET, 0x30);
    assert_eq!(size_of::<ChannelEntry>(), ENTRY_LEN);
    assert_eq!(ENTRY_LEN, 32);
    assert_eq!(offset_of!(ChannelEntry, guest_to_host_offset), 0x00);
    assert_eq!(offset_of!(ChannelEntry, guest_to_host_len), 0x08);
    assert_eq!(offset_of!(ChannelEntry, host_to_guest_offset), 0x10);
    assert_eq!(offset_of!(ChannelEntry, host_to_guest_len), 0x18);
    assert_eq!(HEADER_LEN, 4096);
    assert_eq!(HEADER_MAGIC, *b"VMLINKMA");
    assert_eq!(MAX_CHANNELS, 64);
    // A full table fits the page.
    const { assert!(FIXED_LEN + MAX_CHANNELS * ENTRY_LEN <= HEADER_LEN) };
    assert_eq!(VERSION, Version { major: 1, minor: 0 });
}

#[test]
fn encoded_bytes_are_exact() {
    let page = sound().encode();
    let mut expect = [0u8; HEADER_LEN];
    expect[..8].copy_from_slice(b"VMLINKMA");
    put_u16(&mut expect, 0x08, 1);
    put_u16(&mut expect, 0x0A, 0);
    put_u32(&mut expect, 0x0C, 64);
    put_u64(&mut expect, 0x10, 0xD000);
    put_u32(&mut expect, 0x18, 1);
    put_u32(&mut expect, 0x1C, 32);
    put_u64(&mut expect, 0x20, 0xB000);
    put_u64(&mut expect, 0x28, 0x2000);
    put_u64(&mut expect, 0x40, 0x1000);
    put_u64(&mut expect, 0x48, RING);
    put_u64(&mut expect, 0x50, 0x6000);
    put_u64(&mut expect, 0x58, RING);
    assert_eq!(page, expect);
}

#[test]
fn the_magic_is_never_a_ring_control_page() {
    let write_index = u32::from_le_bytes(HEADER_MAGIC[..4].try_into().unwrap());
    assert!(!write_index.is_multiple_of(8));
}

#[test]
fn a_sound_header_round_trips() {
    let layout = sound();
    let parsed = parse(&layout.encode()).unwrap();
    assert_eq!(parsed.version, VERSION);
    assert_eq!(parsed.layout, layout);
    assert_eq!(layout.channels().len(), 1);
    assert_eq!(
        layout.channels()[0],
        ChannelRings {
            guest_to_host: Span::new(0x1000, RING),
            host_to_guest: Span::new(0x6000, RING),
        }
    );
    assert_eq!(layout.buffer(), Span::new(0xB000, 0x2000));
    // A longer slice (the whole area) is read the same.
    let mut area = [0u8; 2 * HEADER_LEN];
    area[..HEADER_LEN].copy_from_slice(&layout.encode());
    assert_eq!(parse(&area).unwrap().layout, layout);
}

#[test]
fn many_channels_and_no_buffer_round_trip() {
    let rings = [(RING, 8192); MAX_CHANNELS];
    let layout = AreaLayout::packed(&rings, 0).unwrap();
    assert_eq!(layout.channels().len(), MAX_CHANNELS);
    assert_eq!(layout.buffer(), Span::new(layout.len(), 0));
    let parsed = AreaLayout::parse(&layout.encode(), layout.len()).unwrap();
    assert_eq!(parsed.layout, layout);
    // No channel at all: a header page and a buffer area.
    let layout = AreaLayout::packed(&[], 4096).unwrap();
    assert_eq!(
        AreaLayout::parse(&layout.encode(), 8192).unwrap().layout,
        layout
    );
}

#[test]
fn a_newer_minor_version_with_more_fields_is_read() {
    // Version 1.7: the fixed part grows to 128 bytes and each entry to 48; the new bytes
    // and everything after the table carry values this reader does not know.
    let layout = sound();
    let old = layout.encode();
    let mut page = [0u8; HEADER_LEN];
    page[..FIXED_LEN].copy_from_slice(&old[..FIXED_LEN]);
    put_u16(&mut page, 0x0A, 7);
    put_u32(&mut page, 0x0C, 128);
    put_u32(&mut page, 0x1C, 48);
    page[FIXED_LEN..128].fill(0xAB);
    page[128..128 + ENTRY_LEN].copy_from_slice(&old[FIXED_LEN..FIXED_LEN + ENTRY_LEN]);
    page[128 + ENTRY_LEN..128 + 48].fill(0xCD);
    page[128 + 48..].fill(0xEF);
    let parsed = parse(&page).unwrap();
    assert_eq!(parsed.version, Version { major: 1, minor: 7 });
    assert_eq!(parsed.layout, layout);
}

#[test]
fn rule_truncated() {
    let page = sound().encode();
    assert_eq!(
        parse(&page[..HEADER_LEN - 1]),
        Err(AreaError::Truncated {
            len: HEADER_LEN - 1
        })
    );
    assert_eq!(parse(&[]), Err(AreaError::Truncated { len: 0 }));
}

#[test]
fn rule_magic() {
    let mut page = sound().encode();
    page[7] = b'X';
    assert_eq!(
        parse(&page),
        Err(AreaError::BadMagic {
            found: *b"VMLINKMX"
        })
    );
    assert!(!has_magic(&page));
    assert!(has_magic(&sound().encode()));
    assert!(!has_magic(b"VMLINK"));
    assert_eq!(
        std::format!("{}", parse(&[0u8; HEADER_LEN]).unwrap_err()),
        "no memory header: the first 8 bytes are 00 00 00 00 00 00 00 00 rather than \
         \"VMLINKMA\""
    );
}

#[test]
fn rule_major_version() {
    let mut page = sound().encode();
    put_u16(&mut page, 0x08, 2);
    put_u16(&mut page, 0x0A, 3);
    let e = parse(&page).unwrap_err();
    assert_eq!(
        e,
        AreaError::UnsupportedVersion {
            found: Version { major: 2, minor: 3 },
            supported: VERSION,
        }
    );
    assert_eq!(
        std::format!("{e}"),
        "the memory header is version 2.3; this reader reads version 1.x"
    );
    put_u16(&mut page, 0x08, 0);
    assert!(matches!(
        parse(&page),
        Err(AreaError::UnsupportedVersion { .. })
    ));
}

#[test]
fn rule_header_len() {
    for len in [0, 56, 65, 4104, u32::MAX] {
        let mut page = sound().encode();
        put_u32(&mut page, 0x0C, len);
        assert_eq!(parse(&page), Err(AreaError::BadHeaderLen { len }), "{len}");
    }
}

#[test]
fn rule_entry_len() {
    for len in [0, 24, 33, 4104, u32::MAX] {
        let mut page = sound().encode();
        put_u32(&mut page, 0x1C, len);
        assert_eq!(parse(&page), Err(AreaError::BadEntryLen { len }), "{len}");
    }
}

#[test]
fn rule_reserved_zero() {
    for at in [0x30, 0x3F] {
        let mut page = sound().encode();
        page[at] = 0x80;
        assert_eq!(
            parse(&page),
            Err(AreaError::ReservedNotZero {
                offset: at,
                value: 0x80
            })
        );
    }
}

#[test]
fn rule_area_len_whole_pages() {
    for len in [0, 4096, 0xD001, u64::MAX] {
        assert_eq!(
            parse(&with_u64(0x10, len)),
            Err(AreaError::BadAreaLen { len }),
            "{len}"
        );
    }
    assert_eq!(
        AreaLayout::new(4096, &[], Span::default()),
        Err(AreaError::BadAreaLen { len: 4096 })
    );
}

#[test]
fn rule_area_len_is_the_memory_length() {
    let page = sound().encode();
    assert_eq!(
        AreaLayout::parse(&page, 0xE000),
        Err(AreaError::LengthMismatch {
            header: 0xD000,
            actual: 0xE000
        })
    );
}

#[test]
fn rule_channel_count() {
    let mut page = sound().encode();
    put_u32(&mut page, 0x18, 65);
    assert_eq!(
        parse(&page),
        Err(AreaError::TooManyChannels { count: 65, max: 64 })
    );
    put_u32(&mut page, 0x18, u32::MAX);
    assert_eq!(
        parse(&page),
        Err(AreaError::TooManyChannels {
            count: u32::MAX,
            max: 64
        })
    );
    let rings = [(RING, RING); MAX_CHANNELS + 1];
    assert_eq!(
        AreaLayout::packed(&rings, 0),
        Err(AreaError::TooManyChannels { count: 65, max: 64 })
    );
}

#[test]
fn rule_table_inside_the_page() {
    // 64 entries of 64 bytes after a 64-byte header: 4160 bytes.
    let mut page = sound().encode();
    put_u32(&mut page, 0x18, 64);
    put_u32(&mut page, 0x1C, 64);
    assert_eq!(parse(&page), Err(AreaError::TablePastPage { end: 4160 }));
    // One entry of 32 bytes after a 4096-byte header.
    let mut page = sound().encode();
    put_u32(&mut page, 0x0C, 4096);
    assert_eq!(parse(&page), Err(AreaError::TablePastPage { end: 4128 }));
}

#[test]
fn rule_regions_page_aligned() {
    assert_eq!(
        parse(&with_u64(0x40, 0x1008)),
        Err(AreaError::Misaligned {
            region: G2H,
            offset: 0x1008
        })
    );
    assert_eq!(
        parse(&with_u64(0x50, 0x6800)),
        Err(AreaError::Misaligned {
            region: H2G,
            offset: 0x6800
        })
    );
    assert_eq!(
        parse(&with_u64(0x20, 0xB001)),
        Err(AreaError::Misaligned {
            region: Region::Buffer,
            offset: 0xB001
        })
    );
}

#[test]
fn rule_ring_len() {
    // No data page, not whole pages, nothing, more data than a ring may have.
    for len in [4096, RING - 8, 0, 4096 + (1 << 31) + 4096, u64::MAX] {
        assert_eq!(
            parse(&with_u64(0x48, len)),
            Err(AreaError::BadRingLen { region: G2H, len }),
            "{len}"
        );
    }
    assert_eq!(
        parse(&with_u64(0x58, 4096)),
        Err(AreaError::BadRingLen {
            region: H2G,
            len: 4096
        })
    );
    assert_eq!(
        AreaLayout::packed(&[(RING, 4096 + 100)], 0),
        Err(AreaError::BadRingLen {
            region: H2G,
            len: 4196
        })
    );
}

#[test]
fn rule_buffer_len() {
    assert_eq!(
        parse(&with_u64(0x28, 0x1800)),
        Err(AreaError::BadBufferLen { len: 0x1800 })
    );
}

#[test]
fn rule_regions_inside_the_area() {
    // A ring past the end, a ring whose end overflows, a buffer past the end, an empty
    // buffer whose offset is past the end.
    assert_eq!(
        parse(&with_u64(0x50, 0xD000)),
        Err(AreaError::OutsideArea {
            region: H2G,
            offset: 0xD000,
            len: RING,
            area_len: 0xD000
        })
    );
    let top = u64::MAX - 4095;
    assert_eq!(
        parse(&with_u64(0x40, top)),
        Err(AreaError::OutsideArea {
            region: G2H,
            offset: top,
            len: RING,
            area_len: 0xD000
        })
    );
    assert_eq!(
        parse(&with_u64(0x28, 0x3000)),
        Err(AreaError::OutsideArea {
            region: Region::Buffer,
            offset: 0xB000,
            len: 0x3000,
            area_len: 0xD000
        })
    );
    let mut page = with_u64(0x28, 0);
    put_u64(&mut page, 0x20, 0xE000);
    assert!(matches!(
        parse(&page),
        Err(AreaError::OutsideArea {
            region: Region::Buffer,
            ..
        })
    ));
    // An empty buffer at the very end is fine.
    let mut page = with_u64(0x28, 0);
    put_u64(&mut page, 0x20, 0xD000);
    assert_eq!(parse(&page).unwrap().layout.buffer(), Span::new(0xD000, 0));
}

#[test]
fn rule_no_overlap() {
    // A ring over the header page.
    let e = parse(&with_u64(0x40, 0)).unwrap_err();
    assert_eq!(
        e,
        AreaError::Overlap {
            first: Region::HeaderPage,
            second: G2H
        }
    );
    assert_eq!(
        std::format!("{e}"),
        "the header page and channel 0's guest-to-host ring overlap"
    );
    // The two rings sharing a page.
    assert_eq!(
        parse(&with_u64(0x50, 0x5000)),
        Err(AreaError::Overlap {
            first: G2H,
            second: H2G
        })
    );
    // The buffer over the second ring.
    assert_eq!(
        parse(&with_u64(0x20, 0xA000)),
        Err(AreaError::Overlap {
            first: H2G,
            second: Region::Buffer
        })
    );
    // Two channels whose rings coincide.
    let mut page = sound().encode();
    put_u32(&mut page, 0x18, 2);
    page[0x60..0x80].copy_from_slice(&sound().encode()[0x40..0x60]);
    assert_eq!(
        parse(&page),
        Err(AreaError::Overlap {
            first: G2H,
            second: Region::GuestToHost { channel: 1 }
        })
    );
    // An empty buffer area overlaps nothing, even inside a ring.
    let mut page = with_u64(0x28, 0);
    put_u64(&mut page, 0x20, 0x2000);
    assert!(parse(&page).is_ok());
}

#[test]
fn the_writer_refuses_what_readers_refuse() {
    let ch = ChannelRings {
        guest_to_host: Span::new(0x1000, RING),
        host_to_guest: Span::new(0x1000, RING),
    };
    assert_eq!(
        AreaLayout::new(0xD000, &[ch], Span::default()),
        Err(AreaError::Overlap {
            first: G2H,
            second: H2G
        })
    );
    assert!(matches!(
        AreaLayout::packed(&[(RING, RING)], 100),
        Err(AreaError::BadBufferLen { len: 100 })
    ));
    assert!(matches!(
        AreaLayout::packed(&[(u64::MAX - 4095, RING)], 0),
        Err(AreaError::BadRingLen { .. })
    ));
}

#[test]
fn errors_are_plain_words() {
    let cases = [
        (
            AreaError::Truncated { len: 100 },
            "100 bytes cannot hold the 4096-byte memory header",
        ),
        (
            AreaError::BadRingLen {
                region: Region::HostToGuest { channel: 3 },
                len: 4096,
            },
            "channel 3's host-to-guest ring of 4096 bytes is not a 4096-byte control page \
             plus 1 to 524288 data pages",
        ),
        (
            AreaError::OutsideArea {
                region: Region::Buffer,
                offset: 0x2000,
                len: 4096,
                area_len: 8192,
            },
            "the buffer area (4096 bytes at offset 0x2000) ends past the 8192-byte area",
        ),
        (
            AreaError::LengthMismatch {
                header: 8192,
                actual: 4096,
            },
            "the header describes 8192 bytes of memory but the memory is 4096 bytes",
        ),
    ];
    for (e, text) in cases {
        assert_eq!(std::format!("{e}"), text);
    }
}
