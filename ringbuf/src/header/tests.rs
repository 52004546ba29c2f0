use super::*;
use alloc::vec::Vec;

#[test]
fn mismatch_messages_are_plain_words() {
    use alloc::string::ToString;
    let overflow = PacketError::RangesMismatchHeader {
        count: u32::MAX,
        needed: None,
        len: 24,
    };
    assert_eq!(
        overflow.to_string(),
        "the header names 4294967295 ranges, more than its 24 bytes can hold"
    );
    let short = PacketError::RangesMismatchHeader {
        count: 2,
        needed: Some(40),
        len: 24,
    };
    assert_eq!(
        short.to_string(),
        "the header's 2 ranges need 40 bytes, but the header has 24"
    );
}

fn encode(ranges: &[GpaRange<'_>]) -> Vec<u8> {
    let len = gpa_header_len(ranges, None).unwrap();
    let mut out = alloc::vec![0u8; len];
    encode_gpa_header(ranges, |at, b| out[at..at + b.len()].copy_from_slice(b));
    out
}

#[test]
fn gpa_round_trip() {
    let pages_a = [7u64, 3];
    let pages_b = [42u64];
    let ranges = [
        GpaRange {
            byte_offset: 100,
            byte_count: 4096,
            pages: &pages_a,
        },
        GpaRange {
            byte_offset: 0,
            byte_count: 4096,
            pages: &pages_b,
        },
    ];
    let bytes = encode(&ranges);
    assert_eq!(bytes.len(), 8 + 8 + 16 + 8 + 8);
    let parsed: Vec<_> = parse_gpa_header(&bytes, Some(43)).unwrap().collect();
    assert_eq!(parsed.len(), 2);
    assert_eq!((parsed[0].byte_offset, parsed[0].byte_count), (100, 4096));
    assert_eq!(parsed[0].pages().collect::<Vec<_>>(), [7, 3]);
    assert_eq!(parsed[1].pages().collect::<Vec<_>>(), [42]);
    assert_eq!(
        parse_gpa_header(&bytes, Some(42)).unwrap_err(),
        PacketError::PageOutOfRange {
            index: 1,
            page: 42,
            limit: 42
        }
    );
}

#[test]
fn gpa_send_side_checks() {
    let p = [1u64];
    assert_eq!(gpa_header_len(&[], None), Err(PacketError::NoRanges));
    let bad = [GpaRange {
        byte_offset: 4096,
        byte_count: 1,
        pages: &p,
    }];
    assert_eq!(
        gpa_header_len(&bad, None),
        Err(PacketError::OffsetPastPage {
            index: 0,
            byte_offset: 4096
        })
    );
    let empty = [GpaRange {
        byte_offset: 0,
        byte_count: 0,
        pages: &[],
    }];
    assert_eq!(
        gpa_header_len(&empty, None),
        Err(PacketError::EmptyRange { index: 0 })
    );
    let short = [GpaRange {
        byte_offset: 4000,
        byte_count: 200,
        pages: &p,
    }];
    assert_eq!(
        gpa_header_len(&short, None),
        Err(PacketError::PageCountMismatch {
            index: 0,
            needed: 2,
            given: 1
        })
    );
    let far = [GpaRange {
        byte_offset: 0,
        byte_count: 1,
        pages: &[9],
    }];
    assert_eq!(
        gpa_header_len(&far, Some(9)),
        Err(PacketError::PageOutOfRange {
            index: 0,
            page: 9,
            limit: 9
        })
    );
}

#[test]
fn gpa_hostile_headers() {
    let mut h = Vec::new();
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&u32::MAX.to_le_bytes()); // 4 billion ranges
    h.extend_from_slice(&10u32.to_le_bytes()); // the first is well formed...
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&1u64.to_le_bytes()); // ...and then the header ends
    assert!(matches!(
        parse_gpa_header(&h, None),
        Err(PacketError::RangesMismatchHeader { .. })
    ));
    assert_eq!(
        parse_gpa_header(&h[..4], None).unwrap_err(),
        PacketError::HeaderTooShort { len: 4 }
    );
    // A range claiming u32::MAX bytes needs ~1M page numbers the header does not have.
    let mut h = Vec::new();
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&u32::MAX.to_le_bytes());
    h.extend_from_slice(&4095u32.to_le_bytes());
    h.extend_from_slice(&5u64.to_le_bytes());
    assert!(matches!(
        parse_gpa_header(&h, None),
        Err(PacketError::RangesMismatchHeader { .. })
    ));
    // Trailing bytes after the last range.
    let p = [1u64];
    let mut ok = encode(&[GpaRange {
        byte_offset: 0,
        byte_count: 10,
        pages: &p,
    }]);
    ok.extend_from_slice(&[0; 8]);
    assert_eq!(
        parse_gpa_header(&ok, None).unwrap_err(),
        PacketError::RangesMismatchHeader {
            count: 1,
            needed: Some(24),
            len: 32
        }
    );
    // Zero ranges, offset past the page, empty range.
    let mut zero = encode(&[GpaRange {
        byte_offset: 0,
        byte_count: 10,
        pages: &p,
    }]);
    zero[4] = 0;
    assert_eq!(
        parse_gpa_header(&zero, None).unwrap_err(),
        PacketError::NoRanges
    );
    let mut off = encode(&[GpaRange {
        byte_offset: 0,
        byte_count: 10,
        pages: &p,
    }]);
    off[12..16].copy_from_slice(&4096u32.to_le_bytes());
    assert_eq!(
        parse_gpa_header(&off, None).unwrap_err(),
        PacketError::OffsetPastPage {
            index: 0,
            byte_offset: 4096
        }
    );
    let mut empty = encode(&[GpaRange {
        byte_offset: 0,
        byte_count: 10,
        pages: &p,
    }]);
    empty[8..12].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(
        parse_gpa_header(&empty, None).unwrap_err(),
        PacketError::EmptyRange { index: 0 }
    );
}

#[test]
fn transfer_pages() {
    let mut h = Vec::new();
    h.extend_from_slice(
        TransferPageHeader {
            pageset_id: 3,
            sender_owns_set: 1,
            reserved: 0,
            range_count: 2,
        }
        .as_bytes(),
    );
    h.extend_from_slice(
        TransferPageRange {
            byte_count: 100,
            byte_offset: 0,
        }
        .as_bytes(),
    );
    h.extend_from_slice(
        TransferPageRange {
            byte_count: 50,
            byte_offset: 4096,
        }
        .as_bytes(),
    );
    let t = parse_transfer_page_header(&h).unwrap();
    assert_eq!(t.pageset_id, 3);
    assert!(t.sender_owns_set);
    let r: Vec<_> = t.ranges().map(|r| (r.byte_offset, r.byte_count)).collect();
    assert_eq!(r, [(0, 100), (4096, 50)]);
    assert!(matches!(
        parse_transfer_page_header(&h[..16]),
        Err(PacketError::RangesMismatchHeader { .. })
    ));
    assert!(matches!(
        parse_transfer_page_header(&h[..20]),
        Err(PacketError::RangesMismatchHeader { .. })
    ));
    let mut over = h.clone();
    over[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        parse_transfer_page_header(&over),
        Err(PacketError::RangeOverflow { index: 1, .. })
    ));
    let mut none = h.clone();
    none[4..8].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(
        parse_transfer_page_header(&none[..8]).unwrap_err(),
        PacketError::NoRanges
    );
    assert_eq!(
        parse_transfer_page_header(&h[..3]).unwrap_err(),
        PacketError::HeaderTooShort { len: 3 }
    );
}

#[test]
fn gpa_builder_writes_exact_bytes() {
    let pages_a = [7u64, 3];
    let pages_b = [42u64];
    let ranges = [
        GpaRange {
            byte_offset: 100,
            byte_count: 4096,
            pages: &pages_a,
        },
        GpaRange {
            byte_offset: 0,
            byte_count: 9,
            pages: &pages_b,
        },
    ];
    let header = GpaHeader::new(&ranges, Some(43)).unwrap();
    assert_eq!(header.encoded_len(), 48);
    assert_eq!(header.ranges(), &ranges);
    // The bytes the old callback encoder writes, and exactly those, at the buffer's
    // front; the rest of the buffer is untouched.
    let mut buf = [0xEEu8; 64];
    let bytes = header.write_to(&mut buf).unwrap();
    assert_eq!(bytes, encode(&ranges).as_slice());
    let mut expected = Vec::new();
    for w in [0u32, 2, 4096, 100] {
        expected.extend_from_slice(&w.to_le_bytes());
    }
    for p in [7u64, 3] {
        expected.extend_from_slice(&p.to_le_bytes());
    }
    expected.extend_from_slice(&9u32.to_le_bytes());
    expected.extend_from_slice(&0u32.to_le_bytes());
    expected.extend_from_slice(&42u64.to_le_bytes());
    assert_eq!(bytes, expected.as_slice());
    assert!(buf[48..].iter().all(|&b| b == 0xEE));
    // An exact-size buffer is enough; one byte less is not.
    let mut exact = [0u8; 48];
    assert!(header.write_to(&mut exact).is_ok());
    assert_eq!(
        header.write_to(&mut exact[..47]).unwrap_err(),
        PacketError::BufferTooSmall {
            needed: 48,
            capacity: 47
        }
    );
    // The builder refuses what `gpa_header_len` refuses.
    assert_eq!(
        GpaHeader::new(&ranges, Some(42)).unwrap_err(),
        PacketError::PageOutOfRange {
            index: 1,
            page: 42,
            limit: 42
        }
    );
    assert_eq!(
        GpaHeader::new(&[], None).unwrap_err(),
        PacketError::NoRanges
    );
}

#[test]
fn gpa_header_length_is_bounded() {
    // Each range of one page takes 16 bytes: 32,766 of them fill the longest header a
    // packet carries, one more does not fit.
    let page = [0u64];
    let one = GpaRange {
        byte_offset: 0,
        byte_count: 1,
        pages: &page,
    };
    let fits = (MAX_HEADER_LEN - 8) / 16;
    let ranges = alloc::vec![one; fits + 1];
    assert_eq!(gpa_header_len(&ranges[..fits], None), Ok(8 + 16 * fits));
    assert!(8 + 16 * fits <= MAX_HEADER_LEN);
    assert_eq!(
        gpa_header_len(&ranges, None),
        Err(PacketError::HeaderTooLong {
            max: MAX_HEADER_LEN
        })
    );
    // A range's own page list past the bound.
    let many = alloc::vec![0u64; MAX_HEADER_LEN / 8];
    let big = [GpaRange {
        byte_offset: 0,
        byte_count: u32::try_from(many.len() * PAGE_SIZE).unwrap(),
        pages: &many,
    }];
    assert_eq!(
        gpa_header_len(&big, None),
        Err(PacketError::HeaderTooLong {
            max: MAX_HEADER_LEN
        })
    );
}

#[test]
fn transfer_page_builder_round_trips_and_checks() {
    let ranges = [
        TransferPageRange {
            byte_count: 100,
            byte_offset: 0,
        },
        TransferPageRange {
            byte_count: 50,
            byte_offset: 4096,
        },
    ];
    let header = TransferPagesHeader::new(3, true, &ranges).unwrap();
    assert_eq!(header.encoded_len(), 24);
    assert_eq!(header.ranges(), &ranges);
    let mut buf = [0u8; 32];
    let bytes = header.write_to(&mut buf).unwrap();
    assert_eq!(
        bytes,
        [
            3, 0, 1, 0, 2, 0, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 50, 0, 0, 0, 0, 0x10, 0, 0
        ]
    );
    let parsed = parse_transfer_page_header(bytes).unwrap();
    assert_eq!((parsed.pageset_id, parsed.sender_owns_set), (3, true));
    assert!(parsed.ranges().eq(ranges));
    assert_eq!(
        header.write_to(&mut buf[..23]).unwrap_err(),
        PacketError::BufferTooSmall {
            needed: 24,
            capacity: 23
        }
    );
    assert_eq!(
        TransferPagesHeader::new(0, false, &[]).unwrap_err(),
        PacketError::NoRanges
    );
    let over = [
        ranges[0],
        TransferPageRange {
            byte_count: 2,
            byte_offset: u32::MAX - 1,
        },
    ];
    assert_eq!(
        transfer_page_header_len(&over),
        Err(PacketError::RangeOverflow {
            index: 1,
            byte_offset: u32::MAX - 1,
            byte_count: 2
        })
    );
    let fits = (MAX_HEADER_LEN - 8) / 8;
    let lots = alloc::vec![ranges[0]; fits + 1];
    assert_eq!(transfer_page_header_len(&lots[..fits]), Ok(8 + 8 * fits));
    assert_eq!(
        transfer_page_header_len(&lots),
        Err(PacketError::HeaderTooLong {
            max: MAX_HEADER_LEN
        })
    );
}
