//! The demo's error type.

use std::fmt;
use std::io;

use vmlink_ring::{LayoutError, ReadError, RingError, WriteError};

/// Why a demo run could not finish. A data mismatch is not an error: it is counted and
/// reported, and makes the command exit non-zero after printing its results.
#[derive(Debug)]
pub enum DemoError {
    /// The ring memory could not be set up.
    Layout(LayoutError),
    /// A ring broke a rule while attaching or reading its control page.
    Ring(RingError),
    /// Writing a packet failed for a reason other than a full ring.
    Write(WriteError),
    /// Reading a packet failed.
    Read(ReadError),
    /// A socket baseline failed.
    Io(io::Error),
    /// The other side of a measurement stopped with an error.
    PeerFailed,
    /// A measurement thread panicked.
    ThreadPanicked(&'static str),
    /// A measurement produced no samples.
    NoSamples(&'static str),
}

impl fmt::Display for DemoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DemoError::Layout(e) => write!(f, "cannot set up ring memory: {e}"),
            DemoError::Ring(e) => write!(f, "ring error: {e}"),
            DemoError::Write(e) => write!(f, "write failed: {e}"),
            DemoError::Read(e) => write!(f, "read failed: {e}"),
            DemoError::Io(e) => write!(f, "socket baseline failed: {e}"),
            DemoError::PeerFailed => f.write_str("the other side of the measurement failed"),
            DemoError::ThreadPanicked(who) => write!(f, "the {who} thread panicked"),
            DemoError::NoSamples(what) => write!(f, "{what} produced no samples"),
        }
    }
}

impl std::error::Error for DemoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DemoError::Layout(e) => Some(e),
            DemoError::Ring(e) => Some(e),
            DemoError::Write(e) => Some(e),
            DemoError::Read(e) => Some(e),
            DemoError::Io(e) => Some(e),
            DemoError::PeerFailed | DemoError::ThreadPanicked(_) | DemoError::NoSamples(_) => None,
        }
    }
}

impl From<LayoutError> for DemoError {
    fn from(e: LayoutError) -> Self {
        DemoError::Layout(e)
    }
}

impl From<RingError> for DemoError {
    fn from(e: RingError) -> Self {
        DemoError::Ring(e)
    }
}

impl From<WriteError> for DemoError {
    fn from(e: WriteError) -> Self {
        DemoError::Write(e)
    }
}

impl From<ReadError> for DemoError {
    fn from(e: ReadError) -> Self {
        DemoError::Read(e)
    }
}

impl From<io::Error> for DemoError {
    fn from(e: io::Error) -> Self {
        DemoError::Io(e)
    }
}

/// Combines the results of the two sides of a measurement, preferring the error that
/// caused the failure over the [`DemoError::PeerFailed`] it provoked on the other side.
pub fn combine<A, B>(
    a: Result<A, DemoError>,
    b: Result<B, DemoError>,
) -> Result<(A, B), DemoError> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (Err(DemoError::PeerFailed), Err(e)) | (Err(e), _) | (_, Err(e)) => Err(e),
    }
}
