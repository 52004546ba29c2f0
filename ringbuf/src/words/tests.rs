//! Every offset and length against a byte model, checked and unchecked, and the ranges the
//! checked copies refuse.
use super::*;
use alloc::vec::Vec;

/// What the words hold before each copy: no byte zero, no two bytes alike, so a stray or
/// misplaced byte shows.
fn background(i: usize) -> u8 {
    0x80 | i as u8
}

fn fill(words: &[AtomicU64]) {
    for (i, w) in words.iter().enumerate() {
        let bytes: [u8; 8] = core::array::from_fn(|b| background(i * 8 + b));
        w.store(u64::from_le_bytes(bytes), Ordering::Relaxed);
    }
}

fn bytes(words: &[AtomicU64]) -> Vec<u8> {
    words
        .iter()
        .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
        .collect()
}

type Write = fn(&[AtomicU64], usize, &[u8]);
type Read = fn(&[AtomicU64], usize, &mut [u8]);

const WRITES: [(&str, Write); 2] = [
    ("checked", |w, o, d| write_words(w, o, d).unwrap()),
    ("unchecked", write_words_unchecked),
];
const READS: [(&str, Read); 2] = [
    ("checked", |w, o, b| read_words(w, o, b).unwrap()),
    ("unchecked", read_words_unchecked),
];

#[test]
fn word_copies_handle_every_alignment() {
    let words: [AtomicU64; 4] = core::array::from_fn(|_| AtomicU64::new(0));
    let pattern: [u8; 32] = core::array::from_fn(|i| i as u8 + 1);
    // Every offset and length natively; the first word's offsets under Miri.
    let offsets = if cfg!(miri) { 0..9 } else { 0..32 };
    for offset in offsets {
        for len in 0..=32 - offset {
            for (write_name, write) in WRITES {
                fill(&words);
                write(&words, offset, &pattern[..len]);
                // The bytes written are where they belong; every other byte of the edge
                // words was merged back as it was.
                for (i, b) in bytes(&words).into_iter().enumerate() {
                    let expect = if (offset..offset + len).contains(&i) {
                        pattern[i - offset]
                    } else {
                        background(i)
                    };
                    assert_eq!(
                        b, expect,
                        "{write_name}: offset {offset} len {len} byte {i}"
                    );
                }
                for (read_name, read) in READS {
                    let mut back = [0u8; 32];
                    read(&words, offset, &mut back[..len]);
                    assert_eq!(
                        &back[..len],
                        &pattern[..len],
                        "{write_name} then {read_name}: offset {offset} len {len}"
                    );
                    assert!(back[len..].iter().all(|&b| b == 0), "read past the buffer");
                }
            }
        }
    }
}

#[test]
fn words_are_little_endian() {
    let words = [AtomicU64::new(0), AtomicU64::new(0)];
    write_words(&words, 0, &[1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap();
    assert_eq!(words[0].load(Ordering::Relaxed), 0x0807_0605_0403_0201);
    assert_eq!(words[1].load(Ordering::Relaxed), 0x09);
    words[1].store(0x1122_3344_5566_7788, Ordering::Relaxed);
    let mut buf = [0u8; 3];
    read_words(&words, 8, &mut buf).unwrap();
    assert_eq!(buf, [0x88, 0x77, 0x66]);
}

#[test]
fn words_out_of_range_are_refused_whole() {
    let words: [AtomicU64; 4] = core::array::from_fn(|_| AtomicU64::new(0));
    fill(&words);
    let before = bytes(&words);
    let data = [0x5Au8; 40];
    let cases = [
        // Offset past the end, even for an empty copy.
        (33, 0),
        (usize::MAX, 0),
        // The end past the end: by a byte, from inside the last word, from the start.
        (32, 1),
        (25, 8),
        (0, 33),
        (1, 32),
        // The end overflows `usize`.
        (usize::MAX, 1),
        (usize::MAX - 3, 8),
    ];
    for (offset, len) in cases {
        let err = WordsOutOfBounds {
            offset,
            len,
            size: 32,
        };
        assert_eq!(
            write_words(&words, offset, &data[..len]),
            Err(err),
            "offset {offset} len {len}"
        );
        assert_eq!(bytes(&words), before, "a refused write wrote");
        let mut buf = [0xC3u8; 40];
        assert_eq!(read_words(&words, offset, &mut buf[..len]), Err(err));
        assert!(buf.iter().all(|&b| b == 0xC3), "a refused read copied");
    }

    // Empty copies at the very end are in range; so are copies that end there.
    assert_eq!(write_words(&words, 32, &[]), Ok(()));
    assert_eq!(read_words(&words, 32, &mut []), Ok(()));
    assert_eq!(write_words(&words, 31, &[0xEE]), Ok(()));
    let mut last = [0u8; 1];
    assert_eq!(read_words(&words, 31, &mut last), Ok(()));
    assert_eq!(last, [0xEE]);

    // No words at all: only an empty copy at 0.
    assert_eq!(read_words(&[], 0, &mut []), Ok(()));
    assert_eq!(write_words(&[], 0, &[]), Ok(()));
    assert_eq!(
        write_words(&[], 0, &[1]),
        Err(WordsOutOfBounds {
            offset: 0,
            len: 1,
            size: 0
        })
    );
    assert_eq!(
        read_words(&[], 1, &mut []),
        Err(WordsOutOfBounds {
            offset: 1,
            len: 0,
            size: 0
        })
    );
}

#[test]
fn words_out_of_bounds_says_what_did_not_fit() {
    let err = WordsOutOfBounds {
        offset: 14,
        len: 4,
        size: 16,
    };
    assert_eq!(
        std::format!("{err}"),
        "4 bytes at offset 14 do not fit in 16 bytes of words"
    );
}
