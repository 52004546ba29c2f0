//! AF_VSOCK: virtio-vsock (and VMware's VMCI, and Hyper-V's hv_sock as Linux presents it)
//! stream sockets, named by a context id (CID) and a port.
//!
//! [`VsockAddr`] parses and prints `CID:PORT`, both decimal, with the names of Linux's
//! `include/uapi/linux/vm_sockets.h`: CID `hypervisor` = 0 (`VMADDR_CID_HYPERVISOR`),
//! `local` = 1 (`VMADDR_CID_LOCAL`, the loopback transport), `host` = 2
//! (`VMADDR_CID_HOST`), `any` = 2^32 − 1 (`VMADDR_CID_ANY`, for binding), and port
//! `any` = 2^32 − 1 (`VMADDR_PORT_ANY`, let the system choose). On Linux, [`listen`],
//! [`VsockListener::accept`] and [`connect`] give connected
//! [`SocketStream`](super::SocketStream)s through `socket2`'s AF_VSOCK support; every
//! failure is a [`SocketError`](super::SocketError) naming the step and the address.
//!
//! What the tests run: parsing and printing, the constants against the `libc` crate's,
//! listening on `any:any` and on a fixed port with a port the system chose, a second bind of
//! a bound port (`EADDRINUSE`), binding a CID that is not this machine's (`EADDRNOTAVAIL`),
//! and a non-blocking accept with nobody connecting. What they do not run: a connection.
//! The machine they were written on is a guest whose only vsock transport leads to its
//! VMM: the loopback transport (`vsock_loopback`) is not there and cannot be loaded, so
//! nothing in the machine can reach one of its own listeners, and a connect leaves the
//! machine (the tests never connect; the VMM drops a request for a CID it does not serve
//! and the connect fails with `ETIMEDOUT` after the kernel's 2 s). Where AF_VSOCK does not
//! exist at all (`EAFNOSUPPORT`, no `/dev/vsock`), the tests that need a socket say so and
//! pass, unless `VMLINK_REQUIRE_VSOCK=1` (CI sets it), which makes them fail.

use std::fmt;
use std::str::FromStr;

use super::error::AddrParseError;

/// `VMADDR_CID_HYPERVISOR`: the hypervisor.
pub const CID_HYPERVISOR: u32 = 0;
/// `VMADDR_CID_LOCAL`: this machine, through the loopback transport.
pub const CID_LOCAL: u32 = 1;
/// `VMADDR_CID_HOST`: the host, seen from a guest.
pub const CID_HOST: u32 = 2;
/// `VMADDR_CID_ANY`: any CID of this machine (binding only).
pub const CID_ANY: u32 = u32::MAX;
/// `VMADDR_PORT_ANY`: a port the system chooses (binding only).
pub const PORT_ANY: u32 = u32::MAX;

/// An AF_VSOCK address: a context id and a port. Text form `CID:PORT`.
///
/// ```
/// use vmlink_hvsock::socket::VsockAddr;
///
/// let addr: VsockAddr = "host:5000".parse()?;
/// assert_eq!(addr, VsockAddr::new(2, 5000));
/// assert_eq!(addr.to_string(), "2:5000");
/// assert_eq!("any:any".parse::<VsockAddr>()?, VsockAddr::new(u32::MAX, u32::MAX));
/// assert!("3:0x10".parse::<VsockAddr>().is_err(), "decimal only");
/// # Ok::<(), vmlink_hvsock::socket::AddrParseError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VsockAddr {
    /// The context id: which machine.
    pub cid: u32,
    /// The port on it.
    pub port: u32,
}

impl VsockAddr {
    /// The address of `port` on `cid`.
    pub const fn new(cid: u32, port: u32) -> Self {
        Self { cid, port }
    }
}

/// `any` for 2^32 − 1, the number otherwise: what [`FromStr`] reads back.
impl fmt::Display for VsockAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let any_or = |n: u32| {
            if n == u32::MAX {
                "any".to_owned()
            } else {
                n.to_string()
            }
        };
        write!(f, "{}:{}", any_or(self.cid), any_or(self.port))
    }
}

impl FromStr for VsockAddr {
    type Err = AddrParseError;

    fn from_str(text: &str) -> Result<Self, AddrParseError> {
        let (cid, port) = text
            .split_once(':')
            .ok_or_else(|| AddrParseError::MissingSeparator {
                text: text.to_owned(),
                expected: "CID:PORT",
            })?;
        let cid = match cid {
            "hypervisor" => CID_HYPERVISOR,
            "local" => CID_LOCAL,
            "host" => CID_HOST,
            "any" => CID_ANY,
            n => parse_decimal(n).ok_or_else(|| AddrParseError::BadCid { text: n.to_owned() })?,
        };
        let port = match port {
            "any" => PORT_ANY,
            n => parse_decimal(n).ok_or_else(|| AddrParseError::BadPort {
                text: n.to_owned(),
                any: ", or any",
            })?,
        };
        Ok(Self { cid, port })
    }
}

/// A decimal number below 2^32: ASCII digits only (no sign, no blanks, no `0x`).
pub(crate) fn parse_decimal(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(target_os = "linux")]
pub use self::linux::{VsockListener, connect, connect_timeout, listen};

#[cfg(target_os = "linux")]
mod linux {
    use std::time::Duration;

    use socket2::{Domain, SockAddr};

    use super::VsockAddr;
    use crate::socket::error::SocketError;
    use crate::socket::sock::{self, RawListener, SocketStream};

    /// A listening AF_VSOCK socket.
    #[derive(Debug)]
    pub struct VsockListener {
        inner: RawListener,
        local: VsockAddr,
    }

    /// Listens on `addr` (`any:any` for any CID of this machine and a port the system
    /// chooses; [`VsockListener::local_addr`] says which).
    pub fn listen(addr: &VsockAddr) -> Result<VsockListener, SocketError> {
        let inner = RawListener::bind(Domain::VSOCK, None, &sockaddr(addr), text(addr))?;
        let local = inner
            .socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_vsock_address())
            .map_or(*addr, |(cid, port)| VsockAddr::new(cid, port));
        Ok(VsockListener { inner, local })
    }

    /// Connects to `addr`, waiting as long as the kernel lets a connect wait (2 s by
    /// default, `SO_VM_SOCKETS_CONNECT_TIMEOUT`).
    pub fn connect(addr: &VsockAddr) -> Result<SocketStream, SocketError> {
        sock::connect(Domain::VSOCK, None, &sockaddr(addr), &text(addr), None)
    }

    /// Connects to `addr`, waiting at most `timeout`.
    pub fn connect_timeout(
        addr: &VsockAddr,
        timeout: Duration,
    ) -> Result<SocketStream, SocketError> {
        sock::connect(
            Domain::VSOCK,
            None,
            &sockaddr(addr),
            &text(addr),
            Some(timeout),
        )
    }

    impl VsockListener {
        /// Waits for the next connection: the stream and its peer's address.
        pub fn accept(&self) -> Result<(SocketStream, VsockAddr), SocketError> {
            let (stream, peer) = self.inner.accept()?;
            let peer = peer
                .as_vsock_address()
                .map_or(VsockAddr::new(0, 0), |(cid, port)| {
                    VsockAddr::new(cid, port)
                });
            Ok((stream, peer))
        }

        /// The address it listens on, with the port the system chose for `any`.
        pub fn local_addr(&self) -> VsockAddr {
            self.local
        }

        /// Makes [`accept`](Self::accept) return `WouldBlock` instead of waiting.
        pub fn set_nonblocking(&self, nonblocking: bool) -> std::io::Result<()> {
            self.inner.socket.set_nonblocking(nonblocking)
        }
    }

    impl std::os::fd::AsRawFd for VsockListener {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            self.inner.socket.as_raw_fd()
        }
    }

    fn sockaddr(addr: &VsockAddr) -> SockAddr {
        SockAddr::vsock(addr.cid, addr.port)
    }

    fn text(addr: &VsockAddr) -> String {
        format!("vsock:{addr}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_numbers_and_names() {
        let cases = [
            ("3:5000", VsockAddr::new(3, 5000)),
            ("0:0", VsockAddr::new(0, 0)),
            ("4294967295:4294967295", VsockAddr::new(u32::MAX, u32::MAX)),
            ("hypervisor:1", VsockAddr::new(0, 1)),
            ("local:1024", VsockAddr::new(1, 1024)),
            ("host:22", VsockAddr::new(2, 22)),
            ("any:any", VsockAddr::new(u32::MAX, u32::MAX)),
            ("any:80", VsockAddr::new(u32::MAX, 80)),
        ];
        for (text, addr) in cases {
            assert_eq!(text.parse::<VsockAddr>(), Ok(addr), "{text}");
            assert_eq!(addr.to_string().parse::<VsockAddr>(), Ok(addr), "{addr}");
        }
        assert_eq!(VsockAddr::new(3, 5000).to_string(), "3:5000");
        assert_eq!(VsockAddr::new(u32::MAX, 7).to_string(), "any:7");
        assert_eq!(VsockAddr::new(2, u32::MAX).to_string(), "2:any");
    }

    #[test]
    fn refuses_what_is_not_cid_colon_port() {
        for text in [
            "", "3", "3:", ":5000", "3:5000:1", "-1:5", "+3:5", "3:+5", " 3:5", "3:5 ",
        ] {
            assert!(text.parse::<VsockAddr>().is_err(), "`{text}` parsed");
        }
        assert!(matches!(
            "3".parse::<VsockAddr>(),
            Err(AddrParseError::MissingSeparator { .. })
        ));
        assert!(matches!(
            "4294967296:1".parse::<VsockAddr>(),
            Err(AddrParseError::BadCid { text }) if text == "4294967296"
        ));
        assert!(matches!(
            "Host:1".parse::<VsockAddr>(),
            Err(AddrParseError::BadCid { .. })
        ));
        assert!(matches!(
            "3:0x10".parse::<VsockAddr>(),
            Err(AddrParseError::BadPort { text, .. }) if text == "0x10"
        ));
        assert!(matches!(
            "3:host".parse::<VsockAddr>(),
            Err(AddrParseError::BadPort { .. })
        ));
    }

    /// The names are Linux's `vm_sockets.h` constants, as the `libc` crate has them.
    #[cfg(target_os = "linux")]
    #[test]
    fn constants_are_linuxs() {
        assert_eq!(CID_HYPERVISOR, libc::VMADDR_CID_HYPERVISOR);
        assert_eq!(CID_LOCAL, libc::VMADDR_CID_LOCAL);
        assert_eq!(CID_HOST, libc::VMADDR_CID_HOST);
        assert_eq!(CID_ANY, libc::VMADDR_CID_ANY);
        assert_eq!(PORT_ANY, libc::VMADDR_PORT_ANY);
    }

    #[cfg(target_os = "linux")]
    mod sockets {
        use std::io::ErrorKind;

        use super::super::*;
        use crate::socket::SocketOp;

        /// A listener on any CID and a port the system chooses, or `None` (and a note)
        /// where this machine has no AF_VSOCK.
        fn any_listener() -> Option<VsockListener> {
            match listen(&VsockAddr::new(CID_ANY, PORT_ANY)) {
                Ok(listener) => Some(listener),
                // CI sets VMLINK_REQUIRE_VSOCK=1: there, a machine without AF_VSOCK fails.
                Err(e)
                    if e.op == SocketOp::Create
                        && std::env::var_os("VMLINK_REQUIRE_VSOCK").is_none_or(|v| v != "1") =>
                {
                    eprintln!("no AF_VSOCK here ({e}): vsock socket tests skipped");
                    None
                }
                Err(e) => panic!("{e}"),
            }
        }

        #[test]
        fn listens_on_any_port_and_accepts_nothing_without_blocking() {
            let Some(listener) = any_listener() else {
                return;
            };
            let local = listener.local_addr();
            assert_eq!(local.cid, CID_ANY);
            assert_ne!(local.port, PORT_ANY, "the system chose a port");
            listener.set_nonblocking(true).unwrap();
            let e = listener.accept().unwrap_err();
            assert_eq!(e.op, SocketOp::Accept);
            assert_eq!(e.kind(), ErrorKind::WouldBlock);
        }

        #[test]
        fn a_bound_port_cannot_be_bound_again() {
            let Some(first) = any_listener() else { return };
            let taken = first.local_addr();
            let e = listen(&taken).unwrap_err();
            assert_eq!(e.op, SocketOp::Bind);
            assert_eq!(e.kind(), ErrorKind::AddrInUse, "{e}");
            assert_eq!(e.addr, format!("vsock:any:{}", taken.port));
        }

        /// CID 1 is this machine only through the loopback transport; without it the bind
        /// fails at once, on this machine, and nothing leaves it.
        #[test]
        fn binding_a_cid_that_is_not_ours_fails() {
            if any_listener().is_none() {
                return;
            }
            match listen(&VsockAddr::new(CID_LOCAL, PORT_ANY)) {
                Err(e) => {
                    assert_eq!(e.op, SocketOp::Bind);
                    assert_eq!(e.kind(), ErrorKind::AddrNotAvailable, "{e}");
                    assert!(e.to_string().starts_with("binding vsock:1:any: "), "{e}");
                }
                Ok(_) => eprintln!("this machine has vsock loopback: CID 1 is its own"),
            }
        }
    }
}
