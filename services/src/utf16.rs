//! UTF-16LE text in fixed-size fields, as KVP keys and values, file-copy names and KVP IP
//! strings carry it.
//!
//! A field is a byte array; the text's size in bytes (KVP's `key_size`, `value_size`) counts
//! the terminating NUL unit. Decoding checks, in this order: the size is not zero, is even, lies
//! within the field, the last unit it covers is the NUL terminator, no NUL comes before it, and
//! no surrogate lacks its pair. Fields without a size (file-copy names, IP strings) end at
//! their first NUL unit, which must lie within the field.
//!
//! # Examples
//!
//! ```
//! use vmlink_ic::utf16;
//!
//! let mut field = [0xAAu8; 16];
//! let size = utf16::encode("héllo", &mut field)?;
//! assert_eq!(size, 12); // five units and the terminator
//! assert_eq!(&field[..4], b"h\0\xe9\0");
//! assert!(field[12..].iter().all(|&b| b == 0)); // the rest of the field is zeroed
//!
//! let mut out = [0u8; 16];
//! assert_eq!(utf16::decode(&field, size, &mut out)?, "héllo");
//! assert!(utf16::chars(&field, size)?.eq("héllo".chars()));
//! assert_eq!(utf16::decode_terminated(&field, &mut out)?, "héllo");
//! # Ok::<(), vmlink_ic::IcError>(())
//! ```

use crate::IcError;

/// The text's bytes (terminator excluded) after every check on `size` and the units.
fn validated(field: &[u8], size: u32) -> Result<&[u8], IcError> {
    if size == 0 {
        return Err(IcError::Utf16EmptySize);
    }
    if !size.is_multiple_of(2) {
        return Err(IcError::Utf16OddSize(size));
    }
    let bytes = usize::try_from(size)
        .ok()
        .and_then(|size| field.get(..size))
        .ok_or(IcError::Utf16SizePastField {
            size,
            field: field.len(),
        })?;
    let (text, terminator) = bytes.split_at(bytes.len() - 2);
    if terminator != [0, 0] {
        return Err(IcError::Utf16MissingTerminator);
    }
    check_units(text)?;
    Ok(text)
}

fn units(text: &[u8]) -> impl Iterator<Item = u16> + '_ {
    text.chunks_exact(2)
        .map(|unit| u16::from_le_bytes([unit[0], unit[1]]))
}

fn check_units(text: &[u8]) -> Result<(), IcError> {
    let mut units = units(text).enumerate();
    while let Some((at, unit)) = units.next() {
        match unit {
            0 => return Err(IcError::Utf16EmbeddedNul { at }),
            0xD800..=0xDBFF => match units.next() {
                Some((_, 0xDC00..=0xDFFF)) => {}
                _ => return Err(IcError::Utf16LoneSurrogate { at }),
            },
            0xDC00..=0xDFFF => return Err(IcError::Utf16LoneSurrogate { at }),
            _ => {}
        }
    }
    Ok(())
}

fn decode_units(text: &[u8]) -> impl Iterator<Item = char> + '_ {
    // Only ever called on checked text, where every item is Ok.
    char::decode_utf16(units(text)).map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
}

/// The characters of the `size`-byte text (terminator included) at the start of `field`.
pub fn chars(field: &[u8], size: u32) -> Result<impl Iterator<Item = char> + '_, IcError> {
    validated(field, size).map(decode_units)
}

/// Decodes the `size`-byte text (terminator included) at the start of `field` into `out` as
/// UTF-8, without the terminator.
pub fn decode<'o>(field: &[u8], size: u32, out: &'o mut [u8]) -> Result<&'o str, IcError> {
    let text = validated(field, size)?;
    let needed: usize = decode_units(text).map(char::len_utf8).sum();
    let capacity = out.len();
    let out = out
        .get_mut(..needed)
        .ok_or(IcError::OutputTooSmall { needed, capacity })?;
    let mut at = 0;
    for c in decode_units(text) {
        at += c.encode_utf8(&mut out[at..]).len();
    }
    // The bytes are whole encoded characters, so this is always Ok.
    core::str::from_utf8(out).map_err(|_| IcError::Utf16MissingTerminator)
}

/// The byte size (terminator included) of the NUL-terminated text at the start of `field`.
pub fn terminated_size(field: &[u8]) -> Result<u32, IcError> {
    let units = units(field)
        .position(|unit| unit == 0)
        .ok_or(IcError::Utf16MissingTerminator)?;
    u32::try_from((units + 1) * 2).map_err(|_| IcError::Utf16MissingTerminator)
}

/// Decodes the NUL-terminated text at the start of `field` into `out` as UTF-8.
pub fn decode_terminated<'o>(field: &[u8], out: &'o mut [u8]) -> Result<&'o str, IcError> {
    decode(field, terminated_size(field)?, out)
}

/// Writes `text` to the start of `field` as UTF-16LE with a NUL terminator, zeroes the rest
/// of the field, and returns the size in bytes, terminator included.
pub fn encode(text: &str, field: &mut [u8]) -> Result<u32, IcError> {
    if text.contains('\0') {
        return Err(IcError::TextHasNul);
    }
    let needed = (text.encode_utf16().count() + 1) * 2;
    let size = u32::try_from(needed).ok().filter(|_| needed <= field.len());
    let size = size.ok_or(IcError::TextTooLong {
        needed,
        capacity: field.len(),
    })?;
    field.fill(0);
    for (unit, dst) in text.encode_utf16().zip(field.chunks_exact_mut(2)) {
        dst.copy_from_slice(&unit.to_le_bytes());
    }
    Ok(size)
}
