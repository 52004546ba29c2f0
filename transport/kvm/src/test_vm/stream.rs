//! The migration stream between a source and a destination VMM (see
//! docs/MIGRATION-STREAM.md): a header, then records, each a tag, three zero bytes and a
//! `u32` length (little-endian) before its body. Every length is checked against its bound
//! before anything is allocated or read; a stream that ends early, names memory outside the
//! guest, or holds a record that does not parse is a [`StreamError`], never a panic.

use std::io::{Read, Write};

use zerocopy::{FromBytes, IntoBytes};

/// What a stream starts with.
pub const MAGIC: &[u8; 8] = b"VMLKMIGR";
/// The version this code writes (and the newest it reads).
pub const VERSION: u16 = 1;
/// Bytes of a guest page.
pub const PAGE: usize = 4096;
/// Pages in one `PAGES` record at most.
pub const MAX_PAGES_PER_RECORD: usize = 256;
/// Guest memory a stream may describe at most.
pub const MAX_MEMORY: u64 = 1 << 30;
/// Bytes of a record's body at most (a full `PAGES` record is about 1 MiB).
pub const MAX_RECORD: usize = 4 << 20;

/// A record's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    /// Guest pages: a `u32` count, then per page its guest address (`u64`) and its bytes.
    Pages = 1,
    /// The VM's state (irqchips, clock).
    Vm = 2,
    /// The vCPU's state.
    Vcpu = 3,
    /// The host's endpoint: ring layout, the channel's saved state, the application's.
    Endpoint = 4,
    /// The end of the source's part: a `u64`, the pages sent in all.
    End = 5,
    /// Destination to source: everything arrived and was restored; a `u64` echoes the
    /// pages received.
    Ready = 6,
    /// Either way: a refusal, with its reason (UTF-8).
    Error = 7,
    /// Source to destination: the source has stopped for good; run.
    Go = 8,
    /// Destination to source, empty: the guest runs here (the downtime ends).
    Resumed = 9,
}

impl Tag {
    fn from_raw(raw: u8) -> Option<Self> {
        Some(match raw {
            1 => Tag::Pages,
            2 => Tag::Vm,
            3 => Tag::Vcpu,
            4 => Tag::Endpoint,
            5 => Tag::End,
            6 => Tag::Ready,
            7 => Tag::Error,
            8 => Tag::Go,
            9 => Tag::Resumed,
            _ => return None,
        })
    }
}

/// Why a migration stream could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The socket failed or timed out.
    #[error("migration stream: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended before a whole header or record.
    #[error("the migration stream ended early (in {0})")]
    Truncated(&'static str),
    /// Not a migration stream.
    #[error("not a vmlink migration stream (no VMLKMIGR magic)")]
    Magic,
    /// Written by newer code.
    #[error("a migration stream of version {0}; this code reads up to {VERSION}")]
    Newer(u16),
    /// A length past its bound.
    #[error("{what} of {len} past the bound of {max}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its value.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// A value that cannot be.
    #[error("a malformed migration stream: {0}")]
    Malformed(&'static str),
    /// A record this side did not expect here.
    #[error("a {got:?} record where {expected} was expected")]
    Unexpected {
        /// What came.
        got: Tag,
        /// What was expected.
        expected: &'static str,
    },
    /// The other side refused.
    #[error("the other side refused: {0}")]
    Refused(String),
    /// The other side did not answer in time.
    #[error("no answer from the other side in time (waiting for {0})")]
    Timeout(&'static str),
    /// KVM refused the state, or could not give it.
    #[error("the VM's state: {0}")]
    Restore(String),
}

/// Reads exactly `buf.len()` bytes, or says the stream ended in `what`.
fn read_all(r: &mut impl Read, buf: &mut [u8], what: &'static str) -> Result<(), StreamError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => StreamError::Truncated(what),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => StreamError::Timeout(what),
        _ => StreamError::Io(e),
    })
}

/// Writes the header for `memory` bytes of guest memory.
pub fn write_header(w: &mut impl Write, memory: u64) -> Result<(), StreamError> {
    let mut h = [0u8; 24];
    h[..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(PAGE as u32).to_le_bytes());
    h[16..24].copy_from_slice(&memory.to_le_bytes());
    w.write_all(&h)?;
    Ok(())
}

/// Reads the header; returns the guest memory's size.
pub fn read_header(r: &mut impl Read) -> Result<u64, StreamError> {
    let mut h = [0u8; 24];
    read_all(r, &mut h, "the header")?;
    if &h[..8] != MAGIC {
        return Err(StreamError::Magic);
    }
    let version = u16::from_le_bytes([h[8], h[9]]);
    if version > VERSION {
        return Err(StreamError::Newer(version));
    }
    if version == 0 || h[10..12] != [0, 0] {
        return Err(StreamError::Malformed("the header's version field"));
    }
    if u32::from_le_bytes([h[12], h[13], h[14], h[15]]) as usize != PAGE {
        return Err(StreamError::Malformed("a page size other than 4096"));
    }
    let memory = u64::from_le_bytes(h[16..24].try_into().unwrap_or_default());
    if memory == 0 || !memory.is_multiple_of(PAGE as u64) {
        return Err(StreamError::Malformed(
            "a memory size that is not whole pages",
        ));
    }
    if memory > MAX_MEMORY {
        return Err(StreamError::TooLarge {
            what: "guest memory",
            len: memory,
            max: MAX_MEMORY,
        });
    }
    Ok(memory)
}

/// Writes a record of `tag` whose body is `parts`, one after the other.
pub fn write_record(w: &mut impl Write, tag: Tag, parts: &[&[u8]]) -> Result<(), StreamError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > MAX_RECORD {
        return Err(StreamError::TooLarge {
            what: "a record",
            len: len as u64,
            max: MAX_RECORD as u64,
        });
    }
    let mut head = [0u8; 8];
    head[0] = tag as u8;
    head[4..].copy_from_slice(&(len as u32).to_le_bytes());
    w.write_all(&head)?;
    for p in parts {
        w.write_all(p)?;
    }
    Ok(())
}

/// Reads the next record into `buf` (grown as its bytes arrive, at most [`MAX_RECORD`]);
/// returns its tag and body.
pub fn read_record<'b>(
    r: &mut impl Read,
    buf: &'b mut Vec<u8>,
) -> Result<(Tag, &'b [u8]), StreamError> {
    let mut head = [0u8; 8];
    read_all(r, &mut head, "a record's head")?;
    let tag = Tag::from_raw(head[0]).ok_or(StreamError::Malformed("an unknown record tag"))?;
    if head[1..4] != [0, 0, 0] {
        return Err(StreamError::Malformed("a record head's reserved bytes"));
    }
    let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
    if len > MAX_RECORD {
        return Err(StreamError::TooLarge {
            what: "a record",
            len: len as u64,
            max: MAX_RECORD as u64,
        });
    }
    // The buffer grows with the bytes that arrive, not with the length the other side
    // claims.
    buf.clear();
    r.take(len as u64)
        .read_to_end(buf)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                StreamError::Timeout("a record's body")
            }
            _ => StreamError::Io(e),
        })?;
    if buf.len() != len {
        return Err(StreamError::Truncated("a record's body"));
    }
    Ok((tag, &buf[..]))
}

/// The pages of a `PAGES` body, each checked (aligned, inside `memory` bytes), handed to
/// `put` (guest address, bytes).
pub fn for_each_page(
    body: &[u8],
    memory: u64,
    mut put: impl FnMut(u64, &[u8]) -> Result<(), StreamError>,
) -> Result<usize, StreamError> {
    let (count, mut rest) = body
        .split_first_chunk::<4>()
        .ok_or(StreamError::Malformed("a PAGES record without its count"))?;
    let count = u32::from_le_bytes(*count) as usize;
    if count > MAX_PAGES_PER_RECORD {
        return Err(StreamError::TooLarge {
            what: "pages in a record",
            len: count as u64,
            max: MAX_PAGES_PER_RECORD as u64,
        });
    }
    if rest.len() != count * (8 + PAGE) {
        return Err(StreamError::Malformed("a PAGES record's length"));
    }
    for _ in 0..count {
        let (gpa, after) = rest
            .split_first_chunk::<8>()
            .ok_or(StreamError::Malformed("a page's address"))?;
        let gpa = u64::from_le_bytes(*gpa);
        if !gpa.is_multiple_of(PAGE as u64) {
            return Err(StreamError::Malformed(
                "a page address not on a page boundary",
            ));
        }
        if gpa >= memory {
            return Err(StreamError::Malformed("a page outside guest memory"));
        }
        let (page, after) = after.split_at(PAGE);
        put(gpa, page)?;
        rest = after;
    }
    Ok(count)
}

/// Appends the bytes of a kvm-bindings struct.
pub fn put_struct<T: IntoBytes + zerocopy::Immutable>(out: &mut Vec<u8>, value: &T) {
    out.extend_from_slice(value.as_bytes());
}

/// Takes a kvm-bindings struct from the front of `bytes` (any bytes are a value of these
/// plain-data structs; KVM checks what it is given).
pub fn take_struct<T: FromBytes>(bytes: &mut &[u8], what: &'static str) -> Result<T, StreamError> {
    let (value, rest) = T::read_from_prefix(bytes).map_err(|_| StreamError::Malformed(what))?;
    *bytes = rest;
    Ok(value)
}

/// Takes a little-endian `u32` from the front of `bytes`.
pub fn take_u32(bytes: &mut &[u8], what: &'static str) -> Result<u32, StreamError> {
    let (v, rest) = bytes
        .split_first_chunk::<4>()
        .ok_or(StreamError::Malformed(what))?;
    *bytes = rest;
    Ok(u32::from_le_bytes(*v))
}

/// Takes a little-endian `u64` from the front of `bytes`.
pub fn take_u64(bytes: &mut &[u8], what: &'static str) -> Result<u64, StreamError> {
    let (v, rest) = bytes
        .split_first_chunk::<8>()
        .ok_or(StreamError::Malformed(what))?;
    *bytes = rest;
    Ok(u64::from_le_bytes(*v))
}

/// Takes `len` bytes from the front of `bytes`.
pub fn take_bytes<'a>(
    bytes: &mut &'a [u8],
    len: usize,
    what: &'static str,
) -> Result<&'a [u8], StreamError> {
    if bytes.len() < len {
        return Err(StreamError::Malformed(what));
    }
    let (v, rest) = bytes.split_at(len);
    *bytes = rest;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut s = Vec::new();
        write_header(&mut s, 16 * PAGE as u64).unwrap();
        let page = [7u8; PAGE];
        let gpa = (3 * PAGE as u64).to_le_bytes();
        write_record(&mut s, Tag::Pages, &[&1u32.to_le_bytes(), &gpa, &page]).unwrap();
        write_record(&mut s, Tag::End, &[&1u64.to_le_bytes()]).unwrap();
        s
    }

    /// Reads a whole stream the way the destination does; returns the pages put.
    fn read(stream: &[u8]) -> Result<Vec<u64>, StreamError> {
        let mut r = stream;
        let memory = read_header(&mut r)?;
        let mut buf = Vec::new();
        let mut put = Vec::new();
        loop {
            let (tag, body) = read_record(&mut r, &mut buf)?;
            match tag {
                Tag::Pages => {
                    for_each_page(body, memory, |gpa, _| {
                        put.push(gpa);
                        Ok(())
                    })?;
                }
                Tag::End => return Ok(put),
                got => {
                    return Err(StreamError::Unexpected {
                        got,
                        expected: "pages or the end",
                    });
                }
            }
        }
    }

    #[test]
    fn a_stream_reads_back() {
        assert_eq!(read(&sample()).unwrap(), [3 * PAGE as u64]);
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let s = sample();
        for cut in 0..s.len() {
            assert!(
                matches!(read(&s[..cut]), Err(StreamError::Truncated(_))),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn hostile_headers_and_records_are_refused() {
        let good = sample();
        let with = |at: usize, bytes: &[u8]| {
            let mut s = good.clone();
            s[at..at + bytes.len()].copy_from_slice(bytes);
            s
        };
        assert!(matches!(read(&with(0, b"X")), Err(StreamError::Magic)));
        assert!(matches!(
            read(&with(8, &[2, 0])),
            Err(StreamError::Newer(2))
        ));
        assert!(matches!(
            read(&with(12, &[0, 32, 0, 0])),
            Err(StreamError::Malformed(_))
        ));
        assert!(matches!(
            read(&with(16, &(2u64 << 30).to_le_bytes())),
            Err(StreamError::TooLarge { .. })
        ));
        assert!(matches!(
            read(&with(16, &100u64.to_le_bytes())),
            Err(StreamError::Malformed(_))
        ));
        // The first record starts at 24: tag, reserved, length, count, gpa.
        assert!(matches!(
            read(&with(24, &[99])),
            Err(StreamError::Malformed(_))
        ));
        assert!(matches!(
            read(&with(25, &[1])),
            Err(StreamError::Malformed(_))
        ));
        assert!(matches!(
            read(&with(28, &u32::MAX.to_le_bytes())),
            Err(StreamError::TooLarge { .. })
        ));
        assert!(matches!(
            read(&with(32, &1000u32.to_le_bytes())),
            Err(StreamError::TooLarge { .. })
        ));
        assert!(matches!(
            read(&with(32, &0u32.to_le_bytes())),
            Err(StreamError::Malformed(_))
        ));
        assert!(matches!(
            read(&with(36, &(16 * PAGE as u64).to_le_bytes())),
            Err(StreamError::Malformed("a page outside guest memory"))
        ));
        assert!(matches!(
            read(&with(36, &5u64.to_le_bytes())),
            Err(StreamError::Malformed(_))
        ));
        // A record where another was expected.
        let mut s = good[..24].to_vec();
        write_record(&mut s, Tag::Go, &[]).unwrap();
        assert!(matches!(
            read(&s),
            Err(StreamError::Unexpected { got: Tag::Go, .. })
        ));
    }
}
