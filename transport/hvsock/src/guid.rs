//! GUIDs, and the hv_sock service ids that stand for vsock ports.
//!
//! A [`Guid`] is 16 bytes as Windows and Linux (`guid_t`) store them: the first three
//! fields little-endian, the last eight bytes as they are. Its text form
//! `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` prints the first three fields as numbers, so
//! `00000001-facb-11e6-…` is the bytes `01 00 00 00 cb fa e6 11 …`.
//!
//! Hyper-V sockets name a service by a GUID; Linux maps a vsock port to the service id
//! `<port>-facb-11e6-bd58-64006a7986d3` (the port in the first four bytes, little-endian),
//! and only ids of that form reach a Linux guest ([`port_to_service_id`],
//! [`service_id_to_port`]).

use core::fmt;
use core::str::FromStr;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// A GUID: 16 bytes in Windows / Linux `guid_t` order.
///
/// ```
/// use vmlink_hvsock::Guid;
///
/// let id: Guid = "00000001-facb-11e6-bd58-64006a7986d3".parse()?;
/// assert_eq!(id.to_bytes()[..8], [0x01, 0, 0, 0, 0xcb, 0xfa, 0xe6, 0x11]);
/// assert_eq!(id.to_string(), "00000001-facb-11e6-bd58-64006a7986d3");
/// # Ok::<(), vmlink_hvsock::GuidParseError>(())
/// ```
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(transparent)]
pub struct Guid([u8; 16]);

impl Guid {
    /// The all-zero GUID.
    pub const NIL: Guid = Guid([0; 16]);

    /// The GUID of these 16 bytes, in storage order.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The 16 bytes, in storage order.
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    /// The GUID whose text form is `d1-d2-d3-d4[0..2]-d4[2..8]` (Linux `GUID_INIT`).
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Self {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Self([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// The three numbers and eight bytes of the text form.
    pub const fn to_fields(self) -> (u32, u16, u16, [u8; 8]) {
        let b = self.0;
        (
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
            [b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]],
        )
    }
}

/// Why a GUID's text did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GuidParseError {
    /// The text is not 36 bytes long.
    #[error("a GUID is 36 characters, not {len}")]
    Length {
        /// The text's length in bytes.
        len: usize,
    },
    /// A dash is missing at one of positions 8, 13, 18 and 23.
    #[error("no dash at position {at}")]
    Dash {
        /// The position.
        at: usize,
    },
    /// A character that is not a hexadecimal digit where one belongs.
    #[error("no hexadecimal digit at position {at}")]
    Digit {
        /// The position.
        at: usize,
    },
}

const DASHES: [usize; 4] = [8, 13, 18, 23];

impl FromStr for Guid {
    type Err = GuidParseError;

    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, hexadecimal digits of either case.
    fn from_str(text: &str) -> Result<Self, GuidParseError> {
        let text = text.as_bytes();
        if text.len() != 36 {
            return Err(GuidParseError::Length { len: text.len() });
        }
        if let Some(&at) = DASHES.iter().find(|&&at| text[at] != b'-') {
            return Err(GuidParseError::Dash { at });
        }
        // The 32 digits, most significant first within each field.
        let mut digits = [0u8; 32];
        let mut n = 0;
        for (at, &c) in text.iter().enumerate() {
            if DASHES.contains(&at) {
                continue;
            }
            let Some(v) = (c as char).to_digit(16) else {
                return Err(GuidParseError::Digit { at });
            };
            // A hexadecimal digit: below 16.
            digits[n] = v as u8;
            n += 1;
        }
        let mut text_order = [0u8; 16];
        for (byte, pair) in text_order.iter_mut().zip(digits.as_chunks::<2>().0) {
            *byte = pair[0] << 4 | pair[1];
        }
        let t = text_order;
        Ok(Guid::from_fields(
            u32::from_be_bytes([t[0], t[1], t[2], t[3]]),
            u16::from_be_bytes([t[4], t[5]]),
            u16::from_be_bytes([t[6], t[7]]),
            [t[8], t[9], t[10], t[11], t[12], t[13], t[14], t[15]],
        ))
    }
}

impl fmt::Display for Guid {
    /// The lower-case text form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (d1, d2, d3, d4) = self.to_fields();
        write!(
            f,
            "{d1:08x}-{d2:04x}-{d3:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            d4[0], d4[1], d4[2], d4[3], d4[4], d4[5], d4[6], d4[7]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

/// The template of hv_sock service ids, `00000000-facb-11e6-bd58-64006a7986d3` (Linux
/// `srv_id_template`): a port's id is this with the port in its first four bytes.
pub const SERVICE_ID_TEMPLATE: Guid = Guid::from_fields(
    0,
    0xfacb,
    0x11e6,
    [0xbd, 0x58, 0x64, 0x00, 0x6a, 0x79, 0x86, 0xd3],
);

/// The highest port either side may listen on (Linux `MAX_LISTEN_PORT`); the ports above
/// it are the host's ephemeral ports, for connections it starts.
pub const MAX_LISTEN_PORT: u32 = 0x7FFF_FFFF;

/// The service id of a vsock port: the template with the port in its first four bytes,
/// little-endian.
///
/// ```
/// use vmlink_hvsock::{port_to_service_id, service_id_to_port};
///
/// let id = port_to_service_id(0x0000_1234);
/// assert_eq!(id.to_string(), "00001234-facb-11e6-bd58-64006a7986d3");
/// assert_eq!(service_id_to_port(&id), Some(0x1234));
/// ```
pub const fn port_to_service_id(port: u32) -> Guid {
    let mut bytes = SERVICE_ID_TEMPLATE.to_bytes();
    let p = port.to_le_bytes();
    bytes[0] = p[0];
    bytes[1] = p[1];
    bytes[2] = p[2];
    bytes[3] = p[3];
    Guid::from_bytes(bytes)
}

/// The vsock port a service id stands for, or `None` when its last twelve bytes are not
/// the template's (Linux `is_valid_srv_id`, `get_port_by_srv_id`). Whether a port may be
/// listened on is a separate rule: see [`MAX_LISTEN_PORT`].
pub fn service_id_to_port(id: &Guid) -> Option<u32> {
    let (port, rest) = id.0.split_first_chunk::<4>()?;
    (rest == &SERVICE_ID_TEMPLATE.0[4..]).then(|| u32::from_le_bytes(*port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_bytes() {
        assert_eq!(
            SERVICE_ID_TEMPLATE.to_bytes(),
            [
                0x00, 0x00, 0x00, 0x00, 0xcb, 0xfa, 0xe6, 0x11, 0xbd, 0x58, 0x64, 0x00, 0x6a, 0x79,
                0x86, 0xd3
            ]
        );
        assert_eq!(
            SERVICE_ID_TEMPLATE.to_string(),
            "00000000-facb-11e6-bd58-64006a7986d3"
        );
        assert_eq!(core::mem::size_of::<Guid>(), 16);
    }

    #[test]
    fn ports_both_ways_from_literal_text() {
        for (text, port) in [
            ("00000000-facb-11e6-bd58-64006a7986d3", 0),
            ("00000016-facb-11e6-bd58-64006a7986d3", 22),
            ("00001234-facb-11e6-bd58-64006a7986d3", 0x1234),
            ("7fffffff-facb-11e6-bd58-64006a7986d3", MAX_LISTEN_PORT),
            ("80000000-FACB-11E6-BD58-64006A7986D3", 0x8000_0000),
            ("deadbeef-facb-11e6-bd58-64006a7986d3", 0xdead_beef),
        ] {
            let id: Guid = text.parse().unwrap();
            assert_eq!(service_id_to_port(&id), Some(port), "{text}");
            assert_eq!(port_to_service_id(port), id, "{text}");
            assert_eq!(id.to_string(), text.to_ascii_lowercase());
        }
        // The port's bytes are little-endian in storage.
        assert_eq!(
            port_to_service_id(0x0102_0304).to_bytes()[..4],
            [4, 3, 2, 1]
        );
    }

    #[test]
    fn other_guids_are_no_port() {
        for text in [
            // The KVP integration service's interface type.
            "a9a0f4e7-5a45-4d96-b827-8a841e8c03e6",
            // One bit off in each of the last three groups of the template.
            "00000001-facb-11e6-bd58-64006a7986d2",
            "00000001-facb-11e7-bd58-64006a7986d3",
            "00000001-facc-11e6-bd58-64006a7986d3",
            "00000001-facb-11e6-bd59-64006a7986d3",
            "00000000-0000-0000-0000-000000000000",
        ] {
            let id: Guid = text.parse().unwrap();
            assert_eq!(service_id_to_port(&id), None, "{text}");
        }
    }

    #[test]
    fn mixed_endian_text() {
        let id: Guid = "01020304-0506-0708-090a-0b0c0d0e0f10".parse().unwrap();
        assert_eq!(
            id.to_bytes(),
            [4, 3, 2, 1, 6, 5, 8, 7, 9, 10, 11, 12, 13, 14, 15, 16]
        );
        assert_eq!(
            id.to_fields(),
            (0x0102_0304, 0x0506, 0x0708, [9, 10, 11, 12, 13, 14, 15, 16])
        );
        assert_eq!(
            format!("{id:?}"),
            "Guid(01020304-0506-0708-090a-0b0c0d0e0f10)"
        );
    }

    #[test]
    fn bad_text() {
        let parse = |t: &str| t.parse::<Guid>();
        assert_eq!(parse(""), Err(GuidParseError::Length { len: 0 }));
        assert_eq!(
            parse("00000000-facb-11e6-bd58-64006a7986d"),
            Err(GuidParseError::Length { len: 35 })
        );
        assert_eq!(
            parse("00000000-facb-11e6-bd58-64006a7986d3 "),
            Err(GuidParseError::Length { len: 37 })
        );
        assert_eq!(
            parse("00000000+facb-11e6-bd58-64006a7986d3"),
            Err(GuidParseError::Dash { at: 8 })
        );
        assert_eq!(
            parse("00000000-facb-11e6-bd5864006a7986d3-"),
            Err(GuidParseError::Dash { at: 23 })
        );
        assert_eq!(
            parse("0000000g-facb-11e6-bd58-64006a7986d3"),
            Err(GuidParseError::Digit { at: 7 })
        );
        assert_eq!(
            parse("{0000000-facb-11e6-bd58-64006a7986d3"),
            Err(GuidParseError::Digit { at: 0 })
        );
        // A multi-byte character is not a digit (and is no reason to panic).
        assert_eq!(
            parse("00000000-facb-11e6-bd58-64006a7986é"),
            Err(GuidParseError::Digit { at: 34 })
        );
    }
}
