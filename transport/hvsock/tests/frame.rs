//! The stream framing: literal frame images, frames arriving in pieces of every size, and
//! a hostile peer's frames (garbage, lengths, a stream that ends inside a frame).

use std::io::{self, Read};

use vmlink_hvsock::frame::{FRAME_HEADER_LEN, FrameError, FrameReader, encode, frame_len};

/// An in-band packet with transaction id 7 and payload "hello", as it lies on the stream:
/// written by hand from the format, not by the encoder.
const HELLO: [u8; 32] = [
    6, 0, // packet type: in-band
    0, 0, // flags
    0, 0, 0, 0, // extra header: none
    8, 0, 0, 0, // payload: 8 bytes ("hello" padded)
    0, 0, 0, 0, // reserved
    7, 0, 0, 0, 0, 0, 0, 0, // transaction id
    b'h', b'e', b'l', b'l', b'o', 0, 0, 0,
];

/// A completion for transaction 0x0102030405060708 with a 16-byte extra header and no
/// payload, completion-requested flag set.
fn completion_image() -> Vec<u8> {
    let mut v = vec![11, 0, 1, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    v.extend_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
    v.extend_from_slice(&[0xaa; 16]);
    v
}

#[test]
fn the_encoder_writes_the_literal_images() {
    let mut out = [0xffu8; 64];
    let n = encode(&mut out, 6, 0, 7, &[], b"hello").unwrap();
    assert_eq!(&out[..n], HELLO);
    let n = encode(&mut out, 11, 1, 0x0102_0304_0506_0708, &[0xaa; 16], &[]).unwrap();
    assert_eq!(out[..n], completion_image()[..]);
    assert_eq!(frame_len(0, 5), 32);
    assert_eq!(FRAME_HEADER_LEN, 24);
}

#[test]
fn the_reader_reads_the_literal_images() {
    let mut r = FrameReader::new(1024);
    assert_eq!(r.push(&HELLO), 32);
    assert_eq!(r.push(&completion_image()), 40);
    let f = r.next_frame().unwrap().unwrap();
    assert_eq!((f.packet_type, f.flags, f.transaction_id), (6, 0, 7));
    assert_eq!(f.payload, b"hello\0\0\0");
    assert!(f.header.is_empty());
    r.consume();
    let f = r.next_frame().unwrap().unwrap();
    assert_eq!(
        (f.packet_type, f.flags, f.transaction_id),
        (11, 1, 0x0102_0304_0506_0708)
    );
    assert_eq!(f.header, [0xaa; 16]);
    assert!(f.payload.is_empty());
    r.consume();
    assert_eq!(r.next_frame(), Ok(None));
    assert_eq!(r.buffered(), 0);
}

/// A reader that hands out its bytes `step` at a time, then ends.
struct Pieces<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.step.min(out.len()).min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Every frame of `stream`, reading it `step` bytes at a time: (type, tid, payload).
fn frames(stream: &[u8], step: usize, max: usize) -> Result<Vec<(u16, u64, Vec<u8>)>, FrameError> {
    let mut r = FrameReader::new(max);
    let mut src = Pieces { data: stream, step };
    let mut got = Vec::new();
    loop {
        while let Some(f) = r.next_frame()? {
            got.push((f.packet_type, f.transaction_id, f.payload.to_vec()));
            r.consume();
        }
        if r.fill(&mut src).unwrap() == 0 && r.at_eof() {
            r.next_frame()?;
            return Ok(got);
        }
    }
}

#[test]
fn frames_arrive_whole_whatever_the_pieces() {
    let mut stream = Vec::new();
    let mut out = vec![0u8; 5000];
    let mut want = Vec::new();
    for (i, len) in [0usize, 1, 7, 8, 9, 100, 4000, 3].into_iter().enumerate() {
        let payload: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
        let n = encode(&mut out, 6, 0, i as u64, &[], &payload).unwrap();
        stream.extend_from_slice(&out[..n]);
        let mut padded = payload.clone();
        padded.resize(len.div_ceil(8) * 8, 0);
        want.push((6u16, i as u64, padded));
    }
    for step in [1, 2, 3, 7, 23, 24, 25, 1000, 100_000] {
        assert_eq!(
            frames(&stream, step, 4096 + 24).unwrap(),
            want,
            "step {step}"
        );
    }
}

/// A frame header with these fields, then `body` bytes of zeros.
fn raw(packet_type: u16, header_len: u32, payload_len: u32, reserved: u32, body: usize) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&packet_type.to_le_bytes());
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(&header_len.to_le_bytes());
    v.extend_from_slice(&payload_len.to_le_bytes());
    v.extend_from_slice(&reserved.to_le_bytes());
    v.extend_from_slice(&0u64.to_le_bytes());
    v.resize(v.len() + body, 0);
    v
}

#[test]
fn hostile_frames_get_their_error_and_it_is_final() {
    let cases: [(Vec<u8>, FrameError); 6] = [
        (raw(6, 0, 8, 1, 8), FrameError::Reserved(1)),
        (raw(9, 0, 8, 0, 8), FrameError::PacketType(9)),
        (raw(0xffff, 0, 0, 0, 0), FrameError::PacketType(0xffff)),
        (
            raw(6, 0, 5, 0, 8),
            FrameError::Unaligned {
                what: "payload",
                len: 5,
            },
        ),
        (
            raw(6, u32::MAX - 7, u32::MAX - 7, 0, 0),
            FrameError::TooLong {
                len: 24 + 2 * u64::from(u32::MAX - 7),
                max: 1024,
            },
        ),
        (
            raw(6, 0, 1008, 0, 0),
            FrameError::TooLong {
                len: 1032,
                max: 1024,
            },
        ),
    ];
    for (bytes, want) in cases {
        let mut r = FrameReader::new(1024);
        r.push(&HELLO);
        r.push(&bytes);
        // The good frame before it is delivered whole.
        assert_eq!(r.next_frame().unwrap().unwrap().transaction_id, 7);
        r.consume();
        assert_eq!(r.next_frame(), Err(want), "{bytes:?}");
        r.push(&HELLO);
        assert_eq!(r.next_frame(), Err(want), "final");
        let e: io::Error = want.into();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}

#[test]
fn a_stream_that_ends_inside_a_frame_is_truncated() {
    for cut in [1, 10, 23, 24, 31] {
        let got = frames(&HELLO[..cut], 5, 1024);
        let want = if cut < 24 { 24 } else { 32 };
        assert_eq!(
            got,
            Err(FrameError::Truncated { have: cut, want }),
            "cut at {cut}"
        );
    }
    // Ending between frames is a clean end.
    assert_eq!(frames(&HELLO, 5, 1024).unwrap().len(), 1);
    assert_eq!(frames(&[], 5, 1024).unwrap(), []);
}

#[test]
fn what_cannot_be_framed_is_refused() {
    let mut out = [0u8; 64];
    assert!(matches!(
        encode(&mut out, 9, 0, 0, &[], b"gpa"),
        Err(FrameError::Unframeable { packet_type: 9, .. })
    ));
    assert_eq!(
        encode(&mut out, 6, 0, 0, &[], &[0; 41]),
        Err(FrameError::OutputTooSmall {
            needed: 72,
            capacity: 64
        })
    );
}

#[test]
fn a_full_buffer_takes_no_more_until_consumed() {
    let mut r = FrameReader::new(40);
    assert_eq!(r.push(&HELLO), 32);
    assert_eq!(r.push(&HELLO), 8, "room for 8 more bytes only");
    let mut src = Pieces {
        data: &HELLO,
        step: 100,
    };
    assert_eq!(r.fill(&mut src).unwrap(), 0, "full: nothing read");
    assert!(!r.at_eof());
    assert!(r.next_frame().unwrap().is_some());
    r.consume();
    assert_eq!(r.push(&HELLO[8..]), 24);
    assert_eq!(r.next_frame().unwrap().unwrap().payload, b"hello\0\0\0");
}
