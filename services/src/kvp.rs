//! Key-value pair exchange (KVP): the host gets, sets, deletes and enumerates string-keyed
//! values in the guest's pools, and gets or sets a network adapter's addresses.
//!
//! What follows the message header depends on the operation (Linux
//! `include/uapi/linux/hyperv.h`):
//!
//! | operation | body |
//! | --- | --- |
//! | GET, SET | `hv_kvp_msg`: [`KvpHeader`] (operation, pool, 2 bytes of padding), then [`KvpExchangeValue`] at byte 4 |
//! | DELETE | [`KvpHeader`], then [`KvpDelete`] at byte 4 |
//! | ENUMERATE | [`KvpHeader`], then [`KvpEnumerate`] (index, then the value) at byte 4 |
//! | GET_IP_INFO, SET_IP_INFO | `hv_kvp_ip_msg` ([`KvpIpMsg`]): operation, pool, then [`KvpIpAddrValue`] at byte 2, no padding |
//!
//! The encoder writes the whole `hv_kvp_msg` (7432 bytes, the union's tail zeroed) or
//! `hv_kvp_ip_msg` (7428 bytes); the parser asks only for the bytes the operation reads.
//!
//! # Examples
//!
//! ```
//! use vmlink_ic::kvp::{self, Kvp, KvpExchangeValue, KvpPool, KvpValue};
//! use vmlink_ic::{Header, Message, MessageType, Version};
//!
//! let header = Header::request(MessageType::Kvp, Version::new(3, 0), Version::new(4, 0), 4);
//! let data = KvpExchangeValue::new("OSName", KvpValue::String("Linux"))?;
//! let mut out = [0u8; 7460];
//! let len = kvp::encode(&mut out, &header, &Kvp::Set { pool: KvpPool::Guest, data: &data })?;
//!
//! let Kvp::Set { pool, data } = kvp::parse(&Message::parse(&out[..len])?)? else { panic!() };
//! assert_eq!(pool, KvpPool::Guest);
//! let (mut key, mut value) = ([0u8; 64], [0u8; 64]);
//! assert_eq!(data.key(&mut key)?, "OSName");
//! assert_eq!(data.value(&mut value)?, KvpValue::String("Linux"));
//! # Ok::<(), vmlink_ic::IcError>(())
//! ```

use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::message::{encode_in_place, view_at};
use crate::{Header, IcError, Message, MessageType, utf16};

/// Bytes of a key field, terminator included (`HV_KVP_EXCHANGE_MAX_KEY_SIZE`).
pub const MAX_KEY_SIZE: usize = 512;
/// Bytes of a value field, terminator included (`HV_KVP_EXCHANGE_MAX_VALUE_SIZE`).
pub const MAX_VALUE_SIZE: usize = 2048;
/// Value type: a UTF-16LE string.
pub const REG_SZ: u32 = 1;
/// Value type: a 32-bit number.
pub const REG_U32: u32 = 4;
/// Value type: a 64-bit number.
pub const REG_U64: u32 = 8;
/// Address family: none.
pub const ADDR_FAMILY_NONE: u8 = 0;
/// Address family: IPv4.
pub const ADDR_FAMILY_IPV4: u8 = 1;
/// Address family: IPv6.
pub const ADDR_FAMILY_IPV6: u8 = 2;

/// Where the data of GET, SET, DELETE and ENUMERATE starts.
const DATA_OFFSET: usize = size_of::<KvpHeader>();
/// Where the address data of GET_IP_INFO and SET_IP_INFO starts.
const IP_DATA_OFFSET: usize = 2;

wire_enum! {
    /// The operations (`enum hv_kvp_exchg_op`).
    pub enum KvpOperation: u8, IcError::KvpOperation {
        /// Get a value by key.
        Get = 0,
        /// Set a value.
        Set = 1,
        /// Delete a value.
        Delete = 2,
        /// Get the key and value at an index.
        Enumerate = 3,
        /// Get an adapter's addresses.
        GetIpInfo = 4,
        /// Set an adapter's addresses.
        SetIpInfo = 5,
    }
}

wire_enum! {
    /// The pools (`enum hv_kvp_exchg_pool`).
    pub enum KvpPool: u8, IcError::KvpPool {
        /// Values the host pushes to the guest.
        External = 0,
        /// Values the guest publishes.
        Guest = 1,
        /// Values the guest reports automatically (OS name, version, ...).
        Auto = 2,
        /// Automatic values from outside the guest.
        AutoExternal = 3,
        /// Automatic values internal to the guest.
        AutoInternal = 4,
    }
}

/// `struct hv_kvp_hdr` (4 bytes).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct KvpHeader {
    /// The operation ([`KvpOperation`]).
    pub operation: u8,
    /// The pool ([`KvpPool`]).
    pub pool: u8,
    /// Padding.
    pub pad: U16,
}

/// `struct hv_kvp_exchg_msg_value`: a key and a value (2572 bytes).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct KvpExchangeValue {
    /// The value's type (`REG_SZ`, `REG_U32`, `REG_U64`).
    pub value_type: U32,
    /// Bytes of the key, terminator included.
    pub key_size: U32,
    /// Bytes of the value (a string's terminator included).
    pub value_size: U32,
    /// The key, UTF-16LE.
    pub key: [u8; MAX_KEY_SIZE],
    /// The value: UTF-16LE, or a little-endian number at its start.
    pub value: [u8; MAX_VALUE_SIZE],
}

/// `struct hv_kvp_msg_delete` (516 bytes).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct KvpDelete {
    /// Bytes of the key, terminator included.
    pub key_size: U32,
    /// The key, UTF-16LE.
    pub key: [u8; MAX_KEY_SIZE],
}

/// `struct hv_kvp_msg_enumerate` (2576 bytes).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct KvpEnumerate {
    /// The index the host asks for.
    pub index: U32,
    /// The key and value at it.
    pub data: KvpExchangeValue,
}

/// `struct hv_kvp_ipaddr_value`: an adapter's addresses, UTF-16LE strings (7426 bytes).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct KvpIpAddrValue {
    /// The adapter's id (128 units).
    pub adapter_id: [u8; 256],
    /// Address family (`ADDR_FAMILY_*`).
    pub addr_family: u8,
    /// Whether DHCP is on.
    pub dhcp_enabled: u8,
    /// Addresses (1024 units).
    pub ip_addr: [u8; 2048],
    /// Subnet masks (1024 units).
    pub sub_net: [u8; 2048],
    /// Gateways (512 units).
    pub gate_way: [u8; 1024],
    /// DNS servers (1024 units).
    pub dns_addr: [u8; 2048],
}

/// `struct hv_kvp_msg`: the whole body of GET, SET, DELETE and ENUMERATE (7432 bytes).
///
/// Its body is a C union whose largest member is 7426 bytes; the union is 4-aligned
/// (`hv_kvp_msg_delete` is not packed), so it takes 7428.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct KvpMsg {
    /// Operation and pool.
    pub header: KvpHeader,
    /// The union: [`KvpExchangeValue`], [`KvpDelete`] or [`KvpEnumerate`] at its start.
    pub body: [u8; 7428],
}

/// `struct hv_kvp_ip_msg`: the whole body of GET_IP_INFO and SET_IP_INFO (7428 bytes).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct KvpIpMsg {
    /// The operation.
    pub operation: u8,
    /// The pool.
    pub pool: u8,
    /// The addresses.
    pub kvp_ip_val: KvpIpAddrValue,
}

/// A value, decoded or to encode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvpValue<'a> {
    /// `REG_SZ`.
    String(&'a str),
    /// `REG_U32`.
    U32(u32),
    /// `REG_U64`.
    U64(u64),
}

impl KvpExchangeValue {
    /// A key and value: the key and a string value UTF-16LE with terminators, a number
    /// little-endian at the value's start; sizes and type set to match.
    pub fn new(key: &str, value: KvpValue<'_>) -> Result<Self, IcError> {
        let mut data = Self::new_zeroed();
        data.key_size = U32::new(utf16::encode(key, &mut data.key)?);
        let (value_type, size) = match value {
            KvpValue::String(text) => (REG_SZ, utf16::encode(text, &mut data.value)?),
            KvpValue::U32(number) => (
                REG_U32,
                write_number(&mut data.value, &number.to_le_bytes()),
            ),
            KvpValue::U64(number) => (
                REG_U64,
                write_number(&mut data.value, &number.to_le_bytes()),
            ),
        };
        data.value_type = U32::new(value_type);
        data.value_size = U32::new(size);
        Ok(data)
    }

    /// The key, decoded into `out`.
    pub fn key<'o>(&self, out: &'o mut [u8]) -> Result<&'o str, IcError> {
        utf16::decode(&self.key, self.key_size.get(), out)
    }

    /// The value by its type; a string is decoded into `out`. A number is read from the
    /// value's start whatever `value_size` says (as Linux does).
    pub fn value<'o>(&self, out: &'o mut [u8]) -> Result<KvpValue<'o>, IcError> {
        let [a, b, c, d, e, f, g, h, ..] = self.value;
        match self.value_type.get() {
            REG_SZ => utf16::decode(&self.value, self.value_size.get(), out).map(KvpValue::String),
            REG_U32 => Ok(KvpValue::U32(u32::from_le_bytes([a, b, c, d]))),
            REG_U64 => Ok(KvpValue::U64(u64::from_le_bytes([a, b, c, d, e, f, g, h]))),
            other => Err(IcError::KvpValueType(other)),
        }
    }
}

fn write_number(field: &mut [u8], bytes: &[u8]) -> u32 {
    field[..bytes.len()].copy_from_slice(bytes);
    bytes.len() as u32
}

impl KvpDelete {
    /// A delete of `key`.
    pub fn new(key: &str) -> Result<Self, IcError> {
        let mut data = Self::new_zeroed();
        data.key_size = U32::new(utf16::encode(key, &mut data.key)?);
        Ok(data)
    }

    /// The key, decoded into `out`.
    pub fn key<'o>(&self, out: &'o mut [u8]) -> Result<&'o str, IcError> {
        utf16::decode(&self.key, self.key_size.get(), out)
    }
}

impl KvpEnumerate {
    /// The entry at `index`.
    pub fn new(index: u32, data: KvpExchangeValue) -> Self {
        Self {
            index: U32::new(index),
            data,
        }
    }
}

/// The text fields of [`KvpIpAddrValue`], each NUL-terminated UTF-16LE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpField {
    /// `adapter_id`.
    AdapterId,
    /// `ip_addr`.
    IpAddr,
    /// `sub_net`.
    SubNet,
    /// `gate_way`.
    Gateway,
    /// `dns_addr`.
    DnsAddr,
}

impl KvpIpAddrValue {
    fn field(&self, field: IpField) -> &[u8] {
        match field {
            IpField::AdapterId => &self.adapter_id,
            IpField::IpAddr => &self.ip_addr,
            IpField::SubNet => &self.sub_net,
            IpField::Gateway => &self.gate_way,
            IpField::DnsAddr => &self.dns_addr,
        }
    }

    fn field_mut(&mut self, field: IpField) -> &mut [u8] {
        match field {
            IpField::AdapterId => &mut self.adapter_id,
            IpField::IpAddr => &mut self.ip_addr,
            IpField::SubNet => &mut self.sub_net,
            IpField::Gateway => &mut self.gate_way,
            IpField::DnsAddr => &mut self.dns_addr,
        }
    }

    /// A text field, decoded into `out` (its terminator must lie within the field).
    pub fn text<'o>(&self, field: IpField, out: &'o mut [u8]) -> Result<&'o str, IcError> {
        utf16::decode_terminated(self.field(field), out)
    }

    /// Writes a text field (terminated, the rest of the field zeroed).
    pub fn set_text(&mut self, field: IpField, text: &str) -> Result<(), IcError> {
        utf16::encode(text, self.field_mut(field)).map(|_| ())
    }
}

/// A KVP message, by operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kvp<'a> {
    /// GET: the host gives the key; the guest answers with the value.
    Get {
        /// The pool.
        pool: KvpPool,
        /// Key and value.
        data: &'a KvpExchangeValue,
    },
    /// SET.
    Set {
        /// The pool.
        pool: KvpPool,
        /// Key and value.
        data: &'a KvpExchangeValue,
    },
    /// DELETE.
    Delete {
        /// The pool.
        pool: KvpPool,
        /// The key.
        data: &'a KvpDelete,
    },
    /// ENUMERATE: the host gives the index; the guest answers with key and value.
    Enumerate {
        /// The pool.
        pool: KvpPool,
        /// Index, key and value.
        data: &'a KvpEnumerate,
    },
    /// GET_IP_INFO: the host gives the adapter; the guest answers with its addresses.
    GetIpInfo {
        /// The pool.
        pool: KvpPool,
        /// The addresses.
        data: &'a KvpIpAddrValue,
    },
    /// SET_IP_INFO.
    SetIpInfo {
        /// The pool.
        pool: KvpPool,
        /// The addresses.
        data: &'a KvpIpAddrValue,
    },
}

impl Kvp<'_> {
    /// The operation.
    pub fn operation(&self) -> KvpOperation {
        match self {
            Self::Get { .. } => KvpOperation::Get,
            Self::Set { .. } => KvpOperation::Set,
            Self::Delete { .. } => KvpOperation::Delete,
            Self::Enumerate { .. } => KvpOperation::Enumerate,
            Self::GetIpInfo { .. } => KvpOperation::GetIpInfo,
            Self::SetIpInfo { .. } => KvpOperation::SetIpInfo,
        }
    }

    /// The pool.
    pub fn pool(&self) -> KvpPool {
        match *self {
            Self::Get { pool, .. }
            | Self::Set { pool, .. }
            | Self::Delete { pool, .. }
            | Self::Enumerate { pool, .. }
            | Self::GetIpInfo { pool, .. }
            | Self::SetIpInfo { pool, .. } => pool,
        }
    }
}

/// The body of a KVP message: operation and pool checked, and the bytes the operation reads
/// present.
pub fn parse<'a>(message: &Message<'a>) -> Result<Kvp<'a>, IcError> {
    message.expect_type(MessageType::Kvp)?;
    let body = message.body;
    let header: &KvpHeader = view_at(body, 0, MessageType::Kvp)?;
    let operation = KvpOperation::try_from(header.operation)?;
    let pool = KvpPool::try_from(header.pool)?;
    let t = MessageType::Kvp;
    Ok(match operation {
        KvpOperation::Get => Kvp::Get {
            pool,
            data: view_at(body, DATA_OFFSET, t)?,
        },
        KvpOperation::Set => Kvp::Set {
            pool,
            data: view_at(body, DATA_OFFSET, t)?,
        },
        KvpOperation::Delete => Kvp::Delete {
            pool,
            data: view_at(body, DATA_OFFSET, t)?,
        },
        KvpOperation::Enumerate => Kvp::Enumerate {
            pool,
            data: view_at(body, DATA_OFFSET, t)?,
        },
        KvpOperation::GetIpInfo => Kvp::GetIpInfo {
            pool,
            data: view_at(body, IP_DATA_OFFSET, t)?,
        },
        KvpOperation::SetIpInfo => Kvp::SetIpInfo {
            pool,
            data: view_at(body, IP_DATA_OFFSET, t)?,
        },
    })
}

/// Writes a KVP message: a whole `hv_kvp_msg` (7432-byte body) for GET, SET, DELETE and
/// ENUMERATE, a whole `hv_kvp_ip_msg` (7428-byte body) for the IP operations.
pub fn encode(out: &mut [u8], header: &Header, kvp: &Kvp<'_>) -> Result<usize, IcError> {
    let (operation, pool) = (kvp.operation() as u8, kvp.pool() as u8);
    let data = match kvp {
        Kvp::Get { data, .. } | Kvp::Set { data, .. } => data.as_bytes(),
        Kvp::Delete { data, .. } => data.as_bytes(),
        Kvp::Enumerate { data, .. } => data.as_bytes(),
        Kvp::GetIpInfo { data, .. } | Kvp::SetIpInfo { data, .. } => {
            return encode_in_place(out, header, MessageType::Kvp, |msg: &mut KvpIpMsg| {
                msg.operation = operation;
                msg.pool = pool;
                msg.kvp_ip_val = **data;
                Ok(())
            });
        }
    };
    encode_in_place(out, header, MessageType::Kvp, |msg: &mut KvpMsg| {
        msg.header.operation = operation;
        msg.header.pool = pool;
        msg.body[..data.len()].copy_from_slice(data);
        Ok(())
    })
}
