//! Asynchronous file I/O in place on the buffer area, through one io_uring.

use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{IoUring, opcode, types};

use crate::memory::{BufferArea, FileIo};

/// Reads and writes between a file and a [`BufferArea`] through one io_uring, many at a
/// time: a device serving GPA-direct requests keeps the file's queue as deep as its
/// guest's (the way a VMM's block back-end drives a disk with `O_DIRECT`), where
/// [`BufferArea::read_file`] waits for each transfer in turn.
///
/// Each transfer has a tag of the caller's, handed back with its result. A transfer the
/// kernel ends short (a file that shrank, a signal) is finished with positional I/O
/// before its result is reported, so a result is all of it or an error, as from
/// [`read_file`](BufferArea::read_file). The ring keeps the area mapped while the kernel
/// may touch it: dropping it waits for every transfer in flight.
///
/// Queued transfers reach the kernel at the next [`submit_and_reap`](Self::submit_and_reap).
///
/// ```
/// use std::io::Write;
/// use std::os::fd::AsFd;
/// use std::os::unix::net::UnixStream;
/// use vmlink_shm::{FileDirection, FileRing, Guest, Layout, Service};
///
/// // A host and a guest on a socket pair; the host's side of the buffer area.
/// let (a, b) = UnixStream::pair()?;
/// let layout = Layout::symmetric(4096, 8 * 4096);
/// let host = std::thread::spawn(move || Service::new("doc").with_layout(layout).serve_stream(a));
/// let _guest = Guest::new("doc").connect_stream(b)?;
/// let host = host.join().unwrap()?;
/// let area = host.buffer();
///
/// let path = std::env::temp_dir().join(format!("vmlink-uring-doc-{}", std::process::id()));
/// let mut file = std::fs::File::options().read(true).write(true).create(true).open(&path)?;
/// std::fs::remove_file(&path)?;
/// file.write_all(&[7u8; 8192])?;
///
/// let mut ring = FileRing::new(&area, file.as_fd(), 8)?;
/// ring.queue(FileDirection::Read, 0, &[0..4096], 1)?;
/// ring.queue(FileDirection::Read, 4096, &[8192..10240, 12288..14336], 2)?;
/// let mut done = Vec::new();
/// while ring.in_flight() > 0 {
///     ring.submit_and_reap(1, |tag, result| done.push((tag, result.is_ok())))?;
/// }
/// done.sort();
/// assert_eq!(done, [(1, true), (2, true)]);
/// let mut buf = [0u8; 2048];
/// area.read(12288, &mut buf)?;
/// assert!(buf.iter().all(|&b| b == 7));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct FileRing<'f> {
    ring: IoUring,
    /// Keeps the mapping alive (its `Arc`) while transfers are in flight.
    area: BufferArea,
    fd: BorrowedFd<'f>,
    /// One per transfer in flight, allocated once; never moved while the kernel may read
    /// their iovecs.
    slots: Box<[Slot]>,
    /// Free slots, allocated once at the ring's depth.
    free: Vec<u32>,
    /// Queued and not yet reaped (submitted or not).
    in_flight: usize,
}

/// The direction of a [`FileRing`] transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileDirection {
    /// From the file into the area.
    Read,
    /// From the area into the file; with `dsync`, durable when it completes
    /// (`RWF_DSYNC`).
    Write {
        /// Write through to stable storage before completing.
        dsync: bool,
    },
}

struct Slot {
    tag: u64,
    dir: FileDirection,
    file_offset: u64,
    len: usize,
    count: usize,
    iov: [libc::iovec; FileRing::MAX_RANGES],
}

impl std::fmt::Debug for FileRing<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileRing")
            .field("depth", &self.slots.len())
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl<'f> FileRing<'f> {
    /// The most area ranges one transfer may have.
    pub const MAX_RANGES: usize = 64;

    /// The deepest ring [`new`](Self::new) makes.
    pub const MAX_DEPTH: u32 = 4096;

    /// A ring for up to `depth` transfers in flight (1 to [`MAX_DEPTH`](Self::MAX_DEPTH))
    /// between `fd` and `area`. Fails when the kernel refuses an io_uring (too old, or
    /// disabled by `kernel.io_uring_disabled` or a seccomp filter).
    pub fn new(area: &BufferArea, fd: BorrowedFd<'f>, depth: u32) -> io::Result<Self> {
        check_depth(depth)?;
        let ring = IoUring::new(depth)?;
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let slots = (0..depth)
            .map(|_| Slot {
                tag: 0,
                dir: FileDirection::Read,
                file_offset: 0,
                len: 0,
                count: 0,
                iov: [empty; Self::MAX_RANGES],
            })
            .collect();
        Ok(Self {
            ring,
            area: area.clone(),
            fd,
            slots,
            free: (0..depth).rev().collect(),
            in_flight: 0,
        })
    }

    /// Whether this kernel gives this process an io_uring `depth` deep, without keeping
    /// one: what [`new`](Self::new) would fail with, for a server that checks before it
    /// accepts anyone.
    pub fn probe(depth: u32) -> io::Result<()> {
        check_depth(depth)?;
        IoUring::new(depth).map(drop)
    }

    /// Transfers that may be queued now.
    pub fn room(&self) -> usize {
        self.free.len()
    }

    /// Transfers queued and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues a transfer of the area's byte `ranges`, in order, from or to the file at
    /// `file_offset`; `tag` comes back with its result. Errors, with nothing queued:
    /// `WouldBlock` when the ring is full ([`room`](Self::room) is 0), `InvalidInput`
    /// for no bytes, more than [`MAX_RANGES`](Self::MAX_RANGES) ranges or a range outside
    /// the area, `EFBIG` for an offset past `i64::MAX`.
    pub fn queue(
        &mut self,
        dir: FileDirection,
        file_offset: u64,
        ranges: &[Range<usize>],
        tag: u64,
    ) -> io::Result<()> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_owned());
        if ranges.len() > Self::MAX_RANGES {
            return Err(invalid("more ranges than one io_uring transfer takes"));
        }
        self.area.check_ranges(ranges)?;
        let len: usize = ranges.iter().map(ExactSizeIterator::len).sum();
        if len == 0 {
            return Err(invalid("a transfer of no bytes"));
        }
        if i64::try_from(file_offset).is_err() || u32::try_from(len).is_err() {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        let Some(&index) = self.free.last() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let base = self.area.base();
        let slot = &mut self.slots[index as usize];
        for (iov, r) in slot.iov.iter_mut().zip(ranges) {
            *iov = libc::iovec {
                iov_base: base.wrapping_add(r.start).cast(),
                iov_len: r.len(),
            };
        }
        (slot.tag, slot.dir, slot.file_offset, slot.len, slot.count) =
            (tag, dir, file_offset, len, ranges.len());
        let fd = types::Fd(self.fd.as_raw_fd());
        let flags = match dir {
            FileDirection::Write { dsync: true } => libc::RWF_DSYNC,
            _ => 0,
        };
        let entry = match (dir, ranges.len()) {
            (FileDirection::Read, 1) => {
                opcode::Read::new(fd, slot.iov[0].iov_base.cast(), len as u32)
                    .offset(file_offset)
                    .build()
            }
            (FileDirection::Read, n) => opcode::Readv::new(fd, slot.iov.as_ptr(), n as u32)
                .offset(file_offset)
                .build(),
            (FileDirection::Write { .. }, 1) => {
                opcode::Write::new(fd, slot.iov[0].iov_base.cast::<u8>(), len as u32)
                    .offset(file_offset)
                    .rw_flags(flags)
                    .build()
            }
            (FileDirection::Write { .. }, n) => {
                opcode::Writev::new(fd, slot.iov.as_ptr(), n as u32)
                    .offset(file_offset)
                    .rw_flags(flags)
                    .build()
            }
        }
        .user_data(u64::from(index));
        // The submission queue holds `depth` entries and at most `depth` transfers are queued
        // or in flight, so it has room. The kernel touches the buffers as the peer may; this
        // process reaches them only through atomics.
        // SAFETY: the buffers lie inside the mapping (ranges checked above), which `self.area`
        // keeps mapped until the transfer is reaped (`Drop` drains); the iovecs stay in an
        // unmoved slot not reused before its completion; `fd` outlives `self` (`'f`).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.free.pop();
        self.in_flight += 1;
        Ok(())
    }

    /// Hands what is queued to the kernel, waits until at least `wait_for` transfers
    /// (at most those in flight) have completed, and reports every completed one to
    /// `done` with its tag. Returns how many were reported. An error is the ring's own
    /// (the transfers' are each handed to `done`).
    pub fn submit_and_reap(
        &mut self,
        wait_for: usize,
        mut done: impl FnMut(u64, io::Result<()>),
    ) -> io::Result<usize> {
        let want = wait_for.min(self.in_flight);
        let mut reaped = 0;
        loop {
            // Completions already there count towards the wait.
            reaped += self.reap(&mut done);
            let submitted = self.ring.submission().is_empty();
            if reaped >= want && submitted {
                return Ok(reaped);
            }
            match self.ring.submit_and_wait(want.saturating_sub(reaped)) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // The completion queue is full: reap, then go on.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for every transfer in flight (queued ones are handed to the kernel first)
    /// and reports each to `done`. An error is the ring's own; transfers may then still be
    /// in flight, and dropping the ring keeps the area mapped for good rather than unmap
    /// it under them.
    pub fn drain(&mut self, mut done: impl FnMut(u64, io::Result<()>)) -> io::Result<()> {
        while self.in_flight > 0 {
            self.submit_and_reap(self.in_flight, &mut done)?;
        }
        Ok(())
    }

    /// Reports every completion waiting; returns how many.
    fn reap(&mut self, done: &mut impl FnMut(u64, io::Result<()>)) -> usize {
        let mut n = 0;
        loop {
            let Some(cqe) = self.ring.completion().next() else {
                return n;
            };
            n += 1;
            let Ok(index) = u32::try_from(cqe.user_data()) else {
                continue;
            };
            let Some(slot) = self.slots.get(index as usize) else {
                continue;
            };
            let result = self.finish(slot, cqe.result());
            let tag = slot.tag;
            self.free.push(index);
            self.in_flight -= 1;
            done(tag, result);
        }
    }

    /// A transfer's result: its bytes all moved, or the rest moved here after a short one.
    fn finish(&self, slot: &Slot, result: i32) -> io::Result<()> {
        let moved = match usize::try_from(result) {
            Err(_) => return Err(io::Error::from_raw_os_error(result.saturating_neg())),
            Ok(n) if n == slot.len => return Ok(()),
            Ok(n) => n,
        };
        // A short transfer: the rest with positional I/O, from where the kernel stopped.
        let base = self.area.base() as usize;
        let mut rest = [const { 0..0 }; FileRing::MAX_RANGES];
        let (mut count, mut skip) = (0, moved);
        for iov in &slot.iov[..slot.count] {
            let start = iov.iov_base as usize - base;
            if skip >= iov.iov_len {
                skip -= iov.iov_len;
                continue;
            }
            rest[count] = start + skip..start + iov.iov_len;
            (count, skip) = (count + 1, 0);
        }
        let at = slot.file_offset + moved as u64;
        match slot.dir {
            FileDirection::Read => self.area.file_io(FileIo::Read, self.fd, at, &rest[..count]),
            FileDirection::Write { dsync } => self
                .area
                .file_io(FileIo::Write, self.fd, at, &rest[..count])
                .and_then(|()| {
                    if dsync {
                        nix::unistd::fdatasync(self.fd).map_err(io::Error::from)
                    } else {
                        Ok(())
                    }
                }),
        }
    }
}

/// `InvalidInput` unless `depth` is 1 to [`FileRing::MAX_DEPTH`].
fn check_depth(depth: u32) -> io::Result<()> {
    if depth == 0 || depth > FileRing::MAX_DEPTH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "an io_uring depth of {depth} is not 1 to {}",
                FileRing::MAX_DEPTH
            ),
        ));
    }
    Ok(())
}

impl Drop for FileRing<'_> {
    fn drop(&mut self) {
        if self.in_flight > 0 && self.drain(|_, _| {}).is_err() {
            // The kernel may still write into the area: keep its mapping for good rather
            // than let it be unmapped under a transfer.
            std::mem::forget(self.area.clone());
        }
    }
}

#[cfg(test)]
// One range in a slice of ranges is the API's shape, not a mistaken `vec![0; n]`.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::memory::{Layout, Mapping, SharedMemory};
    use std::os::fd::{AsFd, OwnedFd};
    use std::os::unix::fs::FileExt;

    fn area(pages: u64) -> BufferArea {
        let layout = Layout::symmetric(4096, pages * 4096);
        let len = layout.validate().unwrap() as usize;
        let fd = crate::sys::memfd_create(c"vmlink-uring-test").unwrap();
        crate::sys::ftruncate(fd.as_fd(), len as u64).unwrap();
        SharedMemory::new(Mapping::map(fd, len).unwrap(), layout).buffer()
    }

    fn file(bytes: &[u8]) -> std::fs::File {
        let fd: OwnedFd = crate::sys::memfd_create(c"vmlink-uring-file").unwrap();
        let file = std::fs::File::from(fd);
        file.write_all_at(bytes, 0).unwrap();
        file
    }

    fn run(ring: &mut FileRing<'_>) -> Vec<(u64, io::Result<()>)> {
        let mut done = Vec::new();
        while ring.in_flight() > 0 {
            ring.submit_and_reap(1, |tag, r| done.push((tag, r)))
                .unwrap();
        }
        done.sort_by_key(|d| d.0);
        done
    }

    #[test]
    fn many_transfers_in_flight_move_their_ranges_in_order() {
        let area = area(64);
        let pattern: Vec<u8> = (0..256 * 1024u32)
            .map(|i| (i * 7 + i / 509) as u8)
            .collect();
        let image = file(&pattern);
        let mut ring = FileRing::new(&area, image.as_fd(), 16).unwrap();
        // Sixteen reads at once, one range each and three ranges each, odd offsets.
        for i in 0..8usize {
            let at = i * 8192;
            ring.queue(
                FileDirection::Read,
                (i * 5000) as u64,
                &[at..at + 4096],
                i as u64,
            )
            .unwrap();
        }
        for i in 8..16usize {
            let at = i * 8192;
            let ranges = [at..at + 512, at + 1024..at + 1536, at + 4096..at + 8192];
            ring.queue(FileDirection::Read, (i * 7001) as u64, &ranges, i as u64)
                .unwrap();
        }
        assert_eq!(ring.room(), 0);
        assert_eq!(
            ring.queue(FileDirection::Read, 0, &[0..512], 99)
                .unwrap_err()
                .kind(),
            io::ErrorKind::WouldBlock
        );
        let done = run(&mut ring);
        assert_eq!(done.len(), 16);
        assert!(done.iter().all(|(_, r)| r.is_ok()), "{done:?}");
        for i in 0..16usize {
            let at = i * 8192;
            let (mut file_at, ranges) = if i < 8 {
                (i * 5000, vec![at..at + 4096])
            } else {
                (
                    i * 7001,
                    vec![at..at + 512, at + 1024..at + 1536, at + 4096..at + 8192],
                )
            };
            for r in ranges {
                let mut got = vec![0u8; r.len()];
                area.read(r.start, &mut got).unwrap();
                assert!(
                    got == pattern[file_at..file_at + r.len()],
                    "read {i}, {r:?}"
                );
                file_at += r.len();
            }
        }
        // Writes back, plain and durable, one range and two.
        area.write(0, &[0xab; 8192]).unwrap();
        ring.queue(FileDirection::Write { dsync: false }, 100, &[0..4096], 1)
            .unwrap();
        ring.queue(
            FileDirection::Write { dsync: true },
            50_000,
            &[0..1000, 4096..5096],
            2,
        )
        .unwrap();
        assert!(run(&mut ring).iter().all(|(_, r)| r.is_ok()));
        let mut back = vec![0u8; 4096];
        image.read_exact_at(&mut back, 100).unwrap();
        assert!(back.iter().all(|&b| b == 0xab));
        image.read_exact_at(&mut back[..2000], 50_000).unwrap();
        assert!(back[..2000].iter().all(|&b| b == 0xab));
        assert!(image.read_exact_at(&mut back[..1], 49_999).is_ok());
        assert_eq!(back[0], pattern[49_999]);
    }

    #[test]
    fn refused_transfers_queue_nothing() {
        let area = area(4);
        let image = file(&[1u8; 4096]);
        assert_eq!(
            FileRing::new(&area, image.as_fd(), 0).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert!(FileRing::new(&area, image.as_fd(), FileRing::MAX_DEPTH + 1).is_err());
        let mut ring = FileRing::new(&area, image.as_fd(), 4).unwrap();
        let len = area.len();
        let too_many: Vec<Range<usize>> = (0..=FileRing::MAX_RANGES)
            .map(|i| i * 8..i * 8 + 8)
            .collect();
        // A reversed range, as a hostile plan might hold.
        let (from, to) = (std::hint::black_box(512), 0);
        let bad: [(&[Range<usize>], u64); 5] = [
            (&[len - 512..len + 512], 0),
            (&[from..to], 0),
            (&[0..0], 0),
            (&too_many, 0),
            (&[0..512], u64::MAX),
        ];
        for (ranges, offset) in bad {
            let err = ring
                .queue(FileDirection::Read, offset, ranges, 0)
                .unwrap_err();
            assert!(
                matches!(err.kind(), io::ErrorKind::InvalidInput)
                    || err.raw_os_error() == Some(libc::EFBIG),
                "{err}"
            );
        }
        assert_eq!((ring.room(), ring.in_flight()), (4, 0));
        assert_eq!(
            ring.submit_and_reap(1, |_, _| panic!("nothing queued"))
                .unwrap(),
            0
        );
    }

    #[test]
    fn a_transfer_past_the_end_of_the_file_is_an_error_after_what_was_there() {
        let area = area(4);
        let image = file(&[9u8; 6000]);
        let mut ring = FileRing::new(&area, image.as_fd(), 2).unwrap();
        area.write(0, &[0u8; 8192]).unwrap();
        // 6000 bytes are there: the kernel stops short, the rest finds the end.
        ring.queue(FileDirection::Read, 0, &[0..4096, 4096..8192], 5)
            .unwrap();
        let done = run(&mut ring);
        assert_eq!(done.len(), 1);
        let err = done[0].1.as_ref().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        let mut got = vec![0u8; 8192];
        area.read(0, &mut got).unwrap();
        assert!(got[..6000].iter().all(|&b| b == 9) && got[6000..].iter().all(|&b| b == 0));
    }

    #[test]
    fn draining_the_ring_reports_every_transfer_in_flight() {
        let area = area(64);
        let image = file(&[0u8; 256 * 1024]);
        area.write(0, &vec![0x3c; 256 * 1024]).unwrap();
        let mut ring = FileRing::new(&area, image.as_fd(), 8).unwrap();
        for i in 0..8usize {
            let at = i * 32 * 1024;
            let ranges = [at..at + 32 * 1024];
            ring.queue(
                FileDirection::Write { dsync: false },
                at as u64,
                &ranges,
                i as u64,
            )
            .unwrap();
        }
        let mut tags = Vec::new();
        ring.drain(|tag, r| {
            r.unwrap();
            tags.push(tag);
        })
        .unwrap();
        tags.sort();
        assert_eq!(tags, (0..8).collect::<Vec<u64>>());
        assert_eq!((ring.in_flight(), ring.room()), (0, 8));
        let mut back = vec![0u8; 256 * 1024];
        image.read_exact_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 0x3c));
    }

    #[test]
    fn dropping_the_ring_with_transfers_in_flight_lands_them() {
        let area = area(64);
        let image = file(&[0u8; 256 * 1024]);
        area.write(0, &vec![0x5a; 256 * 1024]).unwrap();
        {
            let mut ring = FileRing::new(&area, image.as_fd(), 8).unwrap();
            for i in 0..8usize {
                let at = i * 32 * 1024;
                ring.queue(
                    FileDirection::Write { dsync: false },
                    at as u64,
                    &[at..at + 32 * 1024],
                    0,
                )
                .unwrap();
            }
            // Handed to the kernel, none reaped.
            ring.submit_and_reap(0, |_, _| {}).unwrap();
        }
        let mut back = vec![0u8; 256 * 1024];
        image.read_exact_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 0x5a));
    }
}
