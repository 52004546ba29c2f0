//! A connected socket of a family `std` does not name (AF_VSOCK, AF_HYPERV), over
//! `socket2`, and the calls that make one: the same steps for both families.

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::error::{SocketError, SocketOp};

/// How many connections wait to be accepted before the system refuses more.
const BACKLOG: i32 = 128;

/// A connected stream socket of a family `std` has no type for (AF_VSOCK on Linux,
/// AF_HYPERV on Windows): `std::io::Read` and `Write` (on `&SocketStream` too, so one
/// thread may read while another writes), half-close, timeouts, and its descriptor.
pub struct SocketStream(Socket);

impl SocketStream {
    /// Shuts down the reading side, the writing side or both, as
    /// [`std::net::TcpStream::shutdown`].
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.0.shutdown(how)
    }

    /// Sets how long a read may wait (`None`: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.0.set_read_timeout(timeout)
    }

    /// Sets how long a write may wait (`None`: forever).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.0.set_write_timeout(timeout)
    }

    /// Makes reads and writes return [`io::ErrorKind::WouldBlock`] instead of waiting.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.0.set_nonblocking(nonblocking)
    }

    /// A second handle to the same socket.
    pub fn try_clone(&self) -> io::Result<SocketStream> {
        self.0.try_clone().map(SocketStream)
    }

    /// The socket itself, for options this type does not offer.
    pub fn as_socket2(&self) -> &Socket {
        &self.0
    }
}

impl fmt::Debug for SocketStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SocketStream").field(&self.0).finish()
    }
}

impl Read for SocketStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        (&*self).read_vectored(bufs)
    }
}

impl Read for &SocketStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.0).read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        (&self.0).read_vectored(bufs)
    }
}

impl Write for SocketStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for &SocketStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&self.0).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&self.0).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(unix)]
impl std::os::fd::AsRawFd for SocketStream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(unix)]
impl std::os::fd::AsFd for SocketStream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(unix)]
impl From<SocketStream> for std::os::fd::OwnedFd {
    fn from(stream: SocketStream) -> Self {
        stream.0.into()
    }
}

#[cfg(windows)]
impl std::os::windows::io::AsRawSocket for SocketStream {
    fn as_raw_socket(&self) -> std::os::windows::io::RawSocket {
        self.0.as_raw_socket()
    }
}

#[cfg(windows)]
impl std::os::windows::io::AsSocket for SocketStream {
    fn as_socket(&self) -> std::os::windows::io::BorrowedSocket<'_> {
        self.0.as_socket()
    }
}

/// A listening socket of such a family, and the address text its errors name.
#[derive(Debug)]
pub(crate) struct RawListener {
    pub(crate) socket: Socket,
    pub(crate) addr: String,
}

impl RawListener {
    /// A socket of `domain` bound to `addr` and listening.
    pub(crate) fn bind(
        domain: Domain,
        protocol: Option<Protocol>,
        addr: &SockAddr,
        text: String,
    ) -> Result<Self, SocketError> {
        let socket = new_socket(domain, protocol, &text)?;
        socket
            .bind(addr)
            .map_err(|e| SocketError::new(SocketOp::Bind, &text, e))?;
        socket
            .listen(BACKLOG)
            .map_err(|e| SocketError::new(SocketOp::Listen, &text, e))?;
        Ok(Self { socket, addr: text })
    }

    /// The next connection and its peer's address.
    pub(crate) fn accept(&self) -> Result<(SocketStream, SockAddr), SocketError> {
        self.socket
            .accept()
            .map(|(socket, peer)| (SocketStream(socket), peer))
            .map_err(|e| SocketError::new(SocketOp::Accept, &self.addr, e))
    }
}

/// A socket of `domain` connected to `addr`, waiting at most `timeout` if one is given.
pub(crate) fn connect(
    domain: Domain,
    protocol: Option<Protocol>,
    addr: &SockAddr,
    text: &str,
    timeout: Option<Duration>,
) -> Result<SocketStream, SocketError> {
    let socket = new_socket(domain, protocol, text)?;
    match timeout {
        Some(timeout) => socket.connect_timeout(addr, timeout),
        None => socket.connect(addr),
    }
    .map_err(|e| SocketError::new(SocketOp::Connect, text, e))?;
    Ok(SocketStream(socket))
}

fn new_socket(
    domain: Domain,
    protocol: Option<Protocol>,
    text: &str,
) -> Result<Socket, SocketError> {
    Socket::new(domain, Type::STREAM, protocol)
        .map_err(|e| SocketError::new(SocketOp::Create, text, e))
}
