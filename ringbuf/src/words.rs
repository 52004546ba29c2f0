//! Byte copies to and from shared 64-bit words.
//!
//! Memory the peer can write is only ever reached as `AtomicU64` words, never as `&[u8]`:
//! a peer writing at the same time can make a copy read garbage, but never undefined
//! behaviour. These are the copies between such words and private bytes, the one
//! implementation vmlink has: a ring's data area ([`RingMem`](crate::RingMem)) and, in
//! `vmlink-shm`, a channel's memory header page and buffer area all go through them.
//!
//! The words are little-endian: byte `i` of the run is byte `i % 8` of word `i / 8` in
//! little-endian order, so the bytes read back are the bytes of the memory as the peer
//! sees them. Every load and store is `Relaxed`; ordering against the peer is the caller's
//! business (the ring's control words carry it). A partial word at either edge of a write
//! is loaded, merged and stored back whole, so the writer must own the other bytes of that
//! word while it writes.
//!
//! [`read_words`] and [`write_words`] check the byte range before they touch a word: a
//! range that does not lie inside the words is refused whole with [`WordsOutOfBounds`],
//! nothing copied, and no call panics or overflows.

use crate::protocol::ALIGNMENT;
use crate::sync::{AtomicU64, Ordering};

/// A byte range given to [`read_words`] or [`write_words`] does not lie inside the words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{len} bytes at offset {offset} do not fit in {size} bytes of words")]
pub struct WordsOutOfBounds {
    /// Byte offset of the copy.
    pub offset: usize,
    /// Length of the copy in bytes.
    pub len: usize,
    /// Size of the words in bytes.
    pub size: usize,
}

/// Checks that `len` bytes at byte `offset` lie inside `words`.
#[inline]
fn check(words: &[AtomicU64], offset: usize, len: usize) -> Result<(), WordsOutOfBounds> {
    // A slice's size in bytes is at most `isize::MAX`, so this cannot overflow.
    let size = core::mem::size_of_val(words);
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(WordsOutOfBounds { offset, len, size }),
    }
}

/// Copies `buf.len()` bytes starting `offset` bytes into `words` into `buf`, a relaxed
/// load per word; bytes at unaligned edges are taken from whole words.
///
/// A range past the end of `words` (or one whose end overflows `usize`) is an error, and
/// `buf` is left as it was.
///
/// ```
/// use core::sync::atomic::{AtomicU64, Ordering};
/// use vmlink_ring::words::{WordsOutOfBounds, read_words};
///
/// let words = [AtomicU64::new(u64::from_le_bytes(*b"vmlink!!")), AtomicU64::new(0)];
/// let mut buf = [0u8; 4];
/// read_words(&words, 2, &mut buf)?;
/// assert_eq!(&buf, b"link");
/// assert_eq!(
///     read_words(&words, 14, &mut buf),
///     Err(WordsOutOfBounds { offset: 14, len: 4, size: 16 })
/// );
/// assert_eq!(words[0].load(Ordering::Relaxed), u64::from_le_bytes(*b"vmlink!!"));
/// # Ok::<(), WordsOutOfBounds>(())
/// ```
#[inline]
pub fn read_words(
    words: &[AtomicU64],
    offset: usize,
    buf: &mut [u8],
) -> Result<(), WordsOutOfBounds> {
    check(words, offset, buf.len())?;
    // In range: every word the copy indexes exists (see `read_words_unchecked`).
    read_words_unchecked(words, offset, buf);
    Ok(())
}

/// Copies `data` into `words` starting `offset` bytes in, a relaxed store per word;
/// partial words at the edges are loaded, merged with `data` and stored back whole.
///
/// A range past the end of `words` (or one whose end overflows `usize`) is an error, and
/// no word is written.
///
/// ```
/// use core::sync::atomic::{AtomicU64, Ordering};
/// use vmlink_ring::words::{WordsOutOfBounds, write_words};
///
/// let words = [AtomicU64::new(u64::from_le_bytes(*b"vmlink!!")), AtomicU64::new(0)];
/// write_words(&words, 6, b"??ok")?;
/// assert_eq!(words[0].load(Ordering::Relaxed), u64::from_le_bytes(*b"vmlink??"));
/// assert_eq!(words[1].load(Ordering::Relaxed), u64::from_le_bytes(*b"ok\0\0\0\0\0\0"));
/// assert_eq!(
///     write_words(&words, usize::MAX, b"x"),
///     Err(WordsOutOfBounds { offset: usize::MAX, len: 1, size: 16 })
/// );
/// # Ok::<(), WordsOutOfBounds>(())
/// ```
#[inline]
pub fn write_words(
    words: &[AtomicU64],
    offset: usize,
    data: &[u8],
) -> Result<(), WordsOutOfBounds> {
    check(words, offset, data.len())?;
    // In range: every word the copy indexes exists (see `write_words_unchecked`).
    write_words_unchecked(words, offset, data);
    Ok(())
}

/// [`read_words`] without the up-front range check, for the ring's hot path, which has
/// validated its ranges (`offset + buf.len() <= data_len`) already.
///
/// Safe code all the same: out of range, a slice index panics. In range it indexes only
/// words that exist: the first edge word holds byte `offset < size` when `buf` is not
/// empty, the whole words end at or before byte `offset + buf.len()`, and the last edge
/// word holds byte `offset + buf.len() - 1`.
#[inline]
pub(crate) fn read_words_unchecked(words: &[AtomicU64], offset: usize, buf: &mut [u8]) {
    let mut word = offset / ALIGNMENT;
    let skip = offset % ALIGNMENT;
    let mut out = buf;
    if skip != 0 && !out.is_empty() {
        let bytes = words[word].load(Ordering::Relaxed).to_le_bytes();
        let n = (ALIGNMENT - skip).min(out.len());
        out[..n].copy_from_slice(&bytes[skip..skip + n]);
        out = &mut out[n..];
        word += 1;
    }
    let (chunks, rest) = out.as_chunks_mut::<ALIGNMENT>();
    let n = chunks.len();
    for (chunk, w) in chunks.iter_mut().zip(&words[word..word + n]) {
        *chunk = w.load(Ordering::Relaxed).to_le_bytes();
    }
    word += n;
    if !rest.is_empty() {
        let bytes = words[word].load(Ordering::Relaxed).to_le_bytes();
        rest.copy_from_slice(&bytes[..rest.len()]);
    }
}

/// [`write_words`] without the up-front range check, for the ring's hot path, which has
/// validated its ranges (`offset + data.len() <= data_len`) already.
///
/// Safe code all the same: out of range, a slice index panics (possibly after the words
/// before the end were written). In range it indexes only words that exist, as
/// [`read_words_unchecked`] does.
#[inline]
pub(crate) fn write_words_unchecked(words: &[AtomicU64], offset: usize, data: &[u8]) {
    let mut word = offset / ALIGNMENT;
    let skip = offset % ALIGNMENT;
    let mut input = data;
    if skip != 0 && !input.is_empty() {
        let n = (ALIGNMENT - skip).min(input.len());
        let mut bytes = words[word].load(Ordering::Relaxed).to_le_bytes();
        bytes[skip..skip + n].copy_from_slice(&input[..n]);
        words[word].store(u64::from_le_bytes(bytes), Ordering::Relaxed);
        input = &input[n..];
        word += 1;
    }
    let (chunks, rest) = input.as_chunks::<ALIGNMENT>();
    for (chunk, w) in chunks.iter().zip(&words[word..word + chunks.len()]) {
        w.store(u64::from_le_bytes(*chunk), Ordering::Relaxed);
    }
    word += chunks.len();
    if !rest.is_empty() {
        let mut bytes = words[word].load(Ordering::Relaxed).to_le_bytes();
        bytes[..rest.len()].copy_from_slice(rest);
        words[word].store(u64::from_le_bytes(bytes), Ordering::Relaxed);
    }
}

/// Loads `out.len()` whole words starting at byte `offset` (a multiple of 8) of `words`,
/// a relaxed load each: the ring's word-aligned reads.
///
/// Safe code: out of range, a slice index panics; the ring calls it with ranges it has
/// validated.
#[inline]
pub(crate) fn load_words(words: &[AtomicU64], offset: usize, out: &mut [u64]) {
    debug_assert!(offset.is_multiple_of(ALIGNMENT));
    let first = offset / ALIGNMENT;
    let n = out.len();
    for (o, w) in out.iter_mut().zip(&words[first..first + n]) {
        *o = w.load(Ordering::Relaxed);
    }
}

/// Stores `src` as whole words starting at byte `offset` (a multiple of 8) of `words`, a
/// relaxed store each: the ring's word-aligned writes.
///
/// Safe code: out of range, a slice index panics; the ring calls it with ranges it has
/// validated.
#[inline]
pub(crate) fn store_words(words: &[AtomicU64], offset: usize, src: &[u64]) {
    debug_assert!(offset.is_multiple_of(ALIGNMENT));
    let first = offset / ALIGNMENT;
    for (w, v) in words[first..first + src.len()].iter().zip(src) {
        w.store(*v, Ordering::Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
