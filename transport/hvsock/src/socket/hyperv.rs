//! AF_HYPERV: Windows' Hyper-V sockets, named by a VM id and a service id.
//!
//! [`HvSocketAddr`] and its `SOCKADDR_HV` layout ([`SockaddrHv`]: family 34, a reserved
//! `u16`, the VM id, the service id; 36 bytes) exist on every platform, so the layout is
//! pinned by tests that run everywhere. The well-known VM ids are those of Windows'
//! `hvsocket.h` (`HV_GUID_ZERO`, `HV_GUID_CHILDREN`, `HV_GUID_LOOPBACK`, `HV_GUID_PARENT`,
//! …), and on Windows a compile-time check holds each against `windows-sys`. On Windows,
//! `listen` and `connect` give [`SocketStream`](super::SocketStream)s
//! (`HV_PROTOCOL_RAW`); they are type-checked for `x86_64-pc-windows-gnu` but have not run:
//! that takes a Windows machine with Hyper-V.

use std::fmt;
use std::str::FromStr;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::error::AddrParseError;
use super::vsock::parse_decimal;
use crate::guid::{Guid, port_to_service_id};

/// `AF_HYPERV`, Winsock's address family of Hyper-V sockets.
pub const AF_HYPERV: u16 = 34;
/// `HV_PROTOCOL_RAW`, the one protocol of a Hyper-V stream socket.
pub const HV_PROTOCOL_RAW: i32 = 1;

/// `HV_GUID_ZERO` (`HV_GUID_WILDCARD`): a listener bound to it takes connections from
/// every partition.
pub const VMID_WILDCARD: Guid = Guid::NIL;
/// `HV_GUID_BROADCAST`.
pub const VMID_BROADCAST: Guid = Guid::from_bytes([0xff; 16]);
/// `HV_GUID_CHILDREN`: a listener bound to it takes connections from the child partitions.
pub const VMID_CHILDREN: Guid = Guid::from_fields(
    0x90db_8b89,
    0x0d35,
    0x4f79,
    [0x8c, 0xe9, 0x49, 0xea, 0x0a, 0xc8, 0xb7, 0xcd],
);
/// `HV_GUID_LOOPBACK`: this partition.
pub const VMID_LOOPBACK: Guid = Guid::from_fields(
    0xe0e1_6197,
    0xdd56,
    0x4a10,
    [0x91, 0x95, 0x5e, 0xe7, 0xa1, 0x55, 0xa8, 0x38],
);
/// `HV_GUID_PARENT`: the parent partition (the host, from a guest).
pub const VMID_PARENT: Guid = Guid::from_fields(
    0xa42e_7cda,
    0xd03f,
    0x480c,
    [0x9c, 0xc2, 0xa4, 0xde, 0x20, 0xab, 0xb8, 0x78],
);
/// `HV_GUID_SILOHOST`: the host of a silo (a Windows container).
pub const VMID_SILOHOST: Guid = Guid::from_fields(
    0x36bd_0c5c,
    0x7276,
    0x4223,
    [0x88, 0xba, 0x7d, 0x03, 0xb6, 0x54, 0xc5, 0x68],
);

/// The names [`HvSocketAddr`]'s text form takes for VM ids.
const VMID_NAMES: [(&str, Guid); 6] = [
    ("wildcard", VMID_WILDCARD),
    ("broadcast", VMID_BROADCAST),
    ("children", VMID_CHILDREN),
    ("loopback", VMID_LOOPBACK),
    ("parent", VMID_PARENT),
    ("silohost", VMID_SILOHOST),
];

/// A Hyper-V socket address: which partition, and which service on it. Text form
/// `VMID:SERVICE`: the VM id a GUID or `wildcard`, `broadcast`, `children`, `loopback`,
/// `parent`, `silohost`; the service a GUID, or a decimal vsock port that stands for the
/// service id `<port>-facb-11e6-bd58-64006a7986d3` (what a Linux guest's vsock port is).
///
/// ```
/// use vmlink_hvsock::socket::HvSocketAddr;
/// use vmlink_hvsock::socket::hyperv::VMID_PARENT;
///
/// let addr: HvSocketAddr = "parent:5001".parse()?;
/// assert_eq!(addr.vm_id, VMID_PARENT);
/// assert_eq!(addr.service_id.to_string(), "00001389-facb-11e6-bd58-64006a7986d3");
/// assert_eq!(addr.to_string(), "parent:00001389-facb-11e6-bd58-64006a7986d3");
/// # Ok::<(), vmlink_hvsock::socket::AddrParseError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HvSocketAddr {
    /// The partition (VM), or one of the well-known ids.
    pub vm_id: Guid,
    /// The service.
    pub service_id: Guid,
}

impl HvSocketAddr {
    /// The address of `service_id` on `vm_id`.
    pub const fn new(vm_id: Guid, service_id: Guid) -> Self {
        Self { vm_id, service_id }
    }

    /// The `SOCKADDR_HV` that names it.
    pub const fn to_sockaddr(&self) -> SockaddrHv {
        SockaddrHv {
            family: AF_HYPERV,
            reserved: 0,
            vm_id: self.vm_id,
            service_id: self.service_id,
        }
    }
}

/// The VM id's name if it has one, then the service id as a GUID.
impl fmt::Display for HvSocketAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match VMID_NAMES.iter().find(|(_, id)| *id == self.vm_id) {
            Some((name, _)) => write!(f, "{name}:{}", self.service_id),
            None => write!(f, "{}:{}", self.vm_id, self.service_id),
        }
    }
}

impl FromStr for HvSocketAddr {
    type Err = AddrParseError;

    fn from_str(text: &str) -> Result<Self, AddrParseError> {
        let (vm, service) =
            text.split_once(':')
                .ok_or_else(|| AddrParseError::MissingSeparator {
                    text: text.to_owned(),
                    expected: "VMID:SERVICE",
                })?;
        let vm_id = match VMID_NAMES.iter().find(|(name, _)| *name == vm) {
            Some((_, id)) => *id,
            None => vm.parse().map_err(|_| AddrParseError::BadGuid {
                text: vm.to_owned(),
                what: "VM id",
                names: ", or wildcard, broadcast, children, loopback, parent, silohost",
            })?,
        };
        let service_id = match parse_decimal(service) {
            Some(port) => port_to_service_id(port),
            None => service.parse().map_err(|_| AddrParseError::BadGuid {
                text: service.to_owned(),
                what: "service id",
                names: ", or a decimal vsock port",
            })?,
        };
        Ok(Self { vm_id, service_id })
    }
}

/// `SOCKADDR_HV` as Windows' `hvsocket.h` lays it out: 36 bytes, little-endian.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SockaddrHv {
    /// `Family`: [`AF_HYPERV`].
    pub family: u16,
    /// `Reserved`: zero.
    pub reserved: u16,
    /// `VmId`.
    pub vm_id: Guid,
    /// `ServiceId`.
    pub service_id: Guid,
}

#[cfg(windows)]
pub use self::windows::{HvSocketListener, connect, connect_timeout, listen};

#[cfg(windows)]
#[allow(unsafe_code)]
mod windows {
    use std::time::Duration;

    use socket2::{Domain, Protocol, SockAddr, SockAddrStorage, socklen_t};
    use windows_sys::Win32::System::Hypervisor as hv;
    use windows_sys::core::GUID;

    use super::{HvSocketAddr, SockaddrHv};
    use crate::guid::Guid;
    use crate::socket::error::SocketError;
    use crate::socket::sock::{self, RawListener, SocketStream};

    const fn same(ours: Guid, theirs: GUID) -> bool {
        let (d1, d2, d3, d4) = ours.to_fields();
        let mut same = d1 == theirs.data1 && d2 == theirs.data2 && d3 == theirs.data3;
        let mut i = 0;
        while i < 8 {
            same &= d4[i] == theirs.data4[i];
            i += 1;
        }
        same
    }

    // The layout and the constants are Windows' own.
    const _: () = assert!(size_of::<hv::SOCKADDR_HV>() == size_of::<SockaddrHv>());
    const _: () = assert!(windows_sys::Win32::Networking::WinSock::AF_HYPERV == super::AF_HYPERV);
    const _: () = assert!(hv::HV_PROTOCOL_RAW as i32 == super::HV_PROTOCOL_RAW);
    const _: () = assert!(same(super::VMID_WILDCARD, hv::HV_GUID_ZERO));
    const _: () = assert!(same(super::VMID_BROADCAST, hv::HV_GUID_BROADCAST));
    const _: () = assert!(same(super::VMID_CHILDREN, hv::HV_GUID_CHILDREN));
    const _: () = assert!(same(super::VMID_LOOPBACK, hv::HV_GUID_LOOPBACK));
    const _: () = assert!(same(super::VMID_PARENT, hv::HV_GUID_PARENT));
    const _: () = assert!(same(super::VMID_SILOHOST, hv::HV_GUID_SILOHOST));
    const _: () = assert!(same(
        crate::guid::port_to_service_id(0),
        hv::HV_GUID_VSOCK_TEMPLATE
    ));

    /// A listening Hyper-V socket.
    #[derive(Debug)]
    pub struct HvSocketListener {
        inner: RawListener,
    }

    impl HvSocketListener {
        /// Waits for the next connection.
        pub fn accept(&self) -> Result<SocketStream, SocketError> {
            self.inner.accept().map(|(stream, _)| stream)
        }
    }

    /// Listens on `addr` (a VM id of [`VMID_WILDCARD`](super::VMID_WILDCARD) or
    /// [`VMID_CHILDREN`](super::VMID_CHILDREN) on a host, the service's id).
    pub fn listen(addr: &HvSocketAddr) -> Result<HvSocketListener, SocketError> {
        let inner = RawListener::bind(domain(), protocol(), &sockaddr(addr), text(addr))?;
        Ok(HvSocketListener { inner })
    }

    /// Connects to `addr`.
    pub fn connect(addr: &HvSocketAddr) -> Result<SocketStream, SocketError> {
        sock::connect(domain(), protocol(), &sockaddr(addr), &text(addr), None)
    }

    /// Connects to `addr`, waiting at most `timeout`.
    pub fn connect_timeout(
        addr: &HvSocketAddr,
        timeout: Duration,
    ) -> Result<SocketStream, SocketError> {
        sock::connect(
            domain(),
            protocol(),
            &sockaddr(addr),
            &text(addr),
            Some(timeout),
        )
    }

    fn domain() -> Domain {
        Domain::from(i32::from(super::AF_HYPERV))
    }

    fn protocol() -> Option<Protocol> {
        Some(Protocol::from(super::HV_PROTOCOL_RAW))
    }

    fn text(addr: &HvSocketAddr) -> String {
        format!("hyperv:{addr}")
    }

    fn guid(id: Guid) -> GUID {
        let (data1, data2, data3, data4) = id.to_fields();
        GUID {
            data1,
            data2,
            data3,
            data4,
        }
    }

    fn sockaddr(addr: &HvSocketAddr) -> SockAddr {
        let ours = addr.to_sockaddr();
        let theirs = hv::SOCKADDR_HV {
            Family: ours.family,
            Reserved: ours.reserved,
            VmId: guid(ours.vm_id),
            ServiceId: guid(ours.service_id),
        };
        let mut storage = SockAddrStorage::zeroed();
        // SAFETY: SOCKADDR_HV is one of Winsock's sockaddr types (and smaller than the
        // storage, which view_as asserts).
        let view = unsafe { storage.view_as::<hv::SOCKADDR_HV>() };
        *view = theirs;
        let len = size_of::<hv::SOCKADDR_HV>() as socklen_t;
        // SAFETY: the storage holds a whole SOCKADDR_HV, `len` bytes long.
        unsafe { SockAddr::new(storage, len) }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use super::*;

    /// `SOCKADDR_HV`'s layout: `Family` 0, `Reserved` 2, `VmId` 4, `ServiceId` 20, 36 in
    /// all, and its bytes in storage order.
    #[test]
    fn sockaddr_hv_is_pinned() {
        assert_eq!(size_of::<SockaddrHv>(), 36);
        assert_eq!(offset_of!(SockaddrHv, family), 0);
        assert_eq!(offset_of!(SockaddrHv, reserved), 2);
        assert_eq!(offset_of!(SockaddrHv, vm_id), 4);
        assert_eq!(offset_of!(SockaddrHv, service_id), 20);
        let addr = HvSocketAddr::new(VMID_PARENT, port_to_service_id(5001)).to_sockaddr();
        let bytes = addr.as_bytes();
        assert_eq!(bytes[..4], [34, 0, 0, 0]);
        assert_eq!(
            bytes[4..20],
            [
                0xda, 0x7c, 0x2e, 0xa4, 0x3f, 0xd0, 0x0c, 0x48, 0x9c, 0xc2, 0xa4, 0xde, 0x20, 0xab,
                0xb8, 0x78
            ]
        );
        assert_eq!(
            bytes[20..],
            [
                0x89, 0x13, 0, 0, 0xcb, 0xfa, 0xe6, 0x11, 0xbd, 0x58, 0x64, 0x00, 0x6a, 0x79, 0x86,
                0xd3
            ]
        );
        assert_eq!(SockaddrHv::read_from_bytes(bytes), Ok(addr));
    }

    /// The well-known VM ids in their text form, as `hvsocket.h` defines them.
    #[test]
    fn well_known_vm_ids() {
        let text = |id: Guid| id.to_string();
        assert_eq!(text(VMID_WILDCARD), "00000000-0000-0000-0000-000000000000");
        assert_eq!(text(VMID_BROADCAST), "ffffffff-ffff-ffff-ffff-ffffffffffff");
        assert_eq!(text(VMID_CHILDREN), "90db8b89-0d35-4f79-8ce9-49ea0ac8b7cd");
        assert_eq!(text(VMID_LOOPBACK), "e0e16197-dd56-4a10-9195-5ee7a155a838");
        assert_eq!(text(VMID_PARENT), "a42e7cda-d03f-480c-9cc2-a4de20abb878");
        assert_eq!(text(VMID_SILOHOST), "36bd0c5c-7276-4223-88ba-7d03b654c568");
    }

    #[test]
    fn parses_names_guids_and_ports() {
        let service = "0000138a-facb-11e6-bd58-64006a7986d3";
        for (text, vm_id) in VMID_NAMES {
            let addr: HvSocketAddr = format!("{text}:5002").parse().unwrap();
            assert_eq!(addr, HvSocketAddr::new(vm_id, service.parse().unwrap()));
            assert_eq!(addr.to_string(), format!("{text}:{service}"));
        }
        let vm = "12345678-9abc-def0-1234-56789abcdef0";
        let addr: HvSocketAddr = format!("{vm}:{service}").parse().unwrap();
        assert_eq!(addr.vm_id.to_string(), vm);
        assert_eq!(addr.to_string(), format!("{vm}:{service}"));
        assert_eq!(addr.to_string().parse(), Ok(addr));
    }

    #[test]
    fn refuses_bad_ids() {
        let bad = |text: &str| text.parse::<HvSocketAddr>().unwrap_err();
        assert!(matches!(
            bad("parent"),
            AddrParseError::MissingSeparator { .. }
        ));
        assert!(matches!(
            bad("host:1"),
            AddrParseError::BadGuid { what: "VM id", .. }
        ));
        assert!(matches!(
            bad(":1"),
            AddrParseError::BadGuid { what: "VM id", .. }
        ));
        assert!(matches!(
            bad("parent:"),
            AddrParseError::BadGuid {
                what: "service id",
                ..
            }
        ));
        assert!(matches!(
            bad("parent:4294967296"),
            AddrParseError::BadGuid {
                what: "service id",
                ..
            }
        ));
        assert!(matches!(
            bad("parent:0000138a-facb-11e6-bd58-64006a7986"),
            AddrParseError::BadGuid {
                what: "service id",
                ..
            }
        ));
    }
}
