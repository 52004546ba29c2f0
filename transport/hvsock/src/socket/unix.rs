//! Unix stream sockets on a path, in the same shape as the other families, for tests and
//! for two programs on one machine.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use super::error::{SocketError, SocketOp};

/// Listens on the socket path `path`. A file already there is an error (`AddrInUse`),
/// never removed.
pub fn listen(path: &Path) -> Result<UnixListener, SocketError> {
    UnixListener::bind(path).map_err(|e| SocketError::new(SocketOp::Bind, path.display(), e))
}

/// Waits for the next connection on `listener`, which listens on `path` (named in errors).
pub fn accept(listener: &UnixListener, path: &Path) -> Result<UnixStream, SocketError> {
    listener
        .accept()
        .map(|(stream, _)| stream)
        .map_err(|e| SocketError::new(SocketOp::Accept, path.display(), e))
}

/// Connects to the socket path `path`.
pub fn connect(path: &Path) -> Result<UnixStream, SocketError> {
    UnixStream::connect(path).map_err(|e| SocketError::new(SocketOp::Connect, path.display(), e))
}
