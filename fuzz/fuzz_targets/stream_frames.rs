//! vmlink packets framed on a byte stream by a hostile peer: the first input byte says how
//! many bytes each read hands over (1 to 256), the rest is the stream, read by
//! `vmlink_hvsock::frame::FrameReader` (frames of at most 4 KiB) until it ends.
//!
//! Asserted:
//! - nothing panics, and taking bytes in (`push`) and handing frames out (`next_frame`,
//!   `consume`) allocate nothing;
//! - the frames and the error are the same whatever the size of the reads (the input read
//!   one byte at a time gives the same result);
//! - every frame delivered is whole and re-encodes to exactly the bytes it came from, in
//!   order, so the frames delivered are a prefix of the stream;
//! - after an error, every later call returns the same error and nothing more is delivered;
//! - the same stream written into a Unix socket to a stream-link endpoint
//!   (`vmlink_hvsock::link`), then closed: the endpoint delivers packets whose type,
//!   transaction id and payload are the frames' in order, never more than the frames, and
//!   ends with `Closed`, the same frame error, or a protocol failure the endpoint adds (a
//!   completion nobody waits for, a bad transfer-page header), never another error.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vmlink_channel::{ChannelError, Config, FailureCause};
use vmlink_fuzz::no_alloc;
use vmlink_hvsock::frame::{FRAME_HEADER_LEN, FrameError, FrameReader, encode};
use vmlink_hvsock::link::{StreamConfig, stream_endpoint};

/// The largest frame the reader takes.
const MAX: usize = 4096;

/// The frames (re-encoded) and the error of `stream` read `step` bytes at a time.
fn read(stream: &[u8], step: usize) -> (Vec<u8>, Option<FrameError>) {
    let mut r = FrameReader::new(MAX);
    let mut rest = stream;
    let mut out = vec![0u8; MAX];
    let mut frames = Vec::new();
    loop {
        loop {
            let next = no_alloc("next_frame", || {
                r.next_frame().map(|f| {
                    f.map(|f| {
                        encode(
                            &mut out,
                            f.packet_type,
                            f.flags,
                            f.transaction_id,
                            f.header,
                            f.payload,
                        )
                        .expect("a delivered frame re-encodes")
                    })
                })
            });
            match next {
                Ok(Some(n)) => {
                    frames.extend_from_slice(&out[..n]);
                    no_alloc("consume", || r.consume());
                }
                Ok(None) => break,
                Err(e) => {
                    // Final: the same error, nothing more.
                    let more = [0u8; 64];
                    let _ = r.push(&more);
                    assert_eq!(r.next_frame(), Err(e));
                    return (frames, Some(e));
                }
            }
        }
        if rest.is_empty() {
            r.finish();
            return match r.next_frame() {
                Ok(None) => (frames, None),
                Ok(Some(_)) => unreachable!("every whole frame was taken before the end"),
                Err(e) => (frames, Some(e)),
            };
        }
        let n = step.min(rest.len());
        let taken = no_alloc("push", || r.push(&rest[..n]));
        rest = &rest[taken..];
        if taken == 0 {
            // Full with no whole frame: only a frame past the maximum fills it, and that
            // is refused before the buffer fills.
            unreachable!("a full buffer holds a whole frame or a refused one");
        }
    }
}

/// (type, transaction id, payload) of each frame in `frames` (whole frames, re-encoded).
fn described(mut frames: &[u8]) -> Vec<(u16, u64, Vec<u8>)> {
    let mut out = Vec::new();
    while !frames.is_empty() {
        let word = |at: usize, n: usize| {
            let mut b = [0u8; 8];
            b[..n].copy_from_slice(&frames[at..at + n]);
            u64::from_le_bytes(b)
        };
        let (h, p) = (word(4, 4) as usize, word(8, 4) as usize);
        let start = FRAME_HEADER_LEN + h;
        out.push((word(0, 2) as u16, word(16, 8), frames[start..start + p].to_vec()));
        frames = &frames[start + p..];
    }
    out
}

/// The stream through a socket to a stream-link endpoint; checks what it delivers against
/// the reference `frames` and `error`.
fn over_link(stream: &[u8], frames: &[u8], error: Option<FrameError>) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let link = StreamConfig::default().with_max_frame(MAX);
    let ep = stream_endpoint(a, link, Config::default().sleep_at_once()).expect("endpoint");
    // libFuzzer's inputs are far smaller than a socket's buffer: this never blocks.
    (&b).write_all(stream).expect("write the stream");
    drop(b);
    let expected = described(frames);
    let mut buf = vec![0u8; MAX];
    let deadline = Instant::now() + Duration::from_secs(5);
    for (i, want) in expected.iter().chain(std::iter::once(&(0, 0, Vec::new()))).enumerate() {
        match ep.recv(&mut buf, Some(deadline)) {
            Ok(r) => {
                assert!(i < expected.len(), "a packet past the frames");
                let got = (r.packet_type.raw(), r.transaction_id, r.payload(&buf).to_vec());
                assert_eq!(&got, want, "packet {i}");
            }
            Err(ChannelError::Closed) => {
                assert!(i == expected.len() && error.is_none(), "closed early at {i}");
                return;
            }
            Err(ChannelError::Failed(FailureCause::Frame(e))) => {
                assert_eq!((i, Some(e)), (expected.len(), error), "the frame error");
                return;
            }
            Err(ChannelError::Failed(FailureCause::Protocol(_))) => return,
            Err(other) => panic!("packet {i}: {other:?}"),
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&step, stream)) = input.split_first() else {
        return;
    };
    let step = usize::from(step) + 1;
    let (frames, error) = read(stream, step);
    assert!(stream.starts_with(&frames), "frames are the stream's own bytes");
    if let Some(e) = error {
        let message = e.to_string();
        assert!(!message.contains("Some(") && !message.contains('{'), "{message}");
    }
    assert_eq!(read(stream, 1), (frames.clone(), error), "the same whatever the reads");
    over_link(stream, &frames, error);
});
