//! The host side: a disk image and the loop that serves one channel's requests.

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use nix::fcntl::{FallocateFlags, FcntlArg, OFlag, fallocate, fcntl};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, TryRecvError, sync_channel};
use std::thread;
use vmlink_channel::{ChannelError, OutgoingPacket, Packet, PacketType, Wait};
use vmlink_shm::{BufferArea, FileDirection, FileRing, ShmChannel};

use crate::DiskError;
use crate::proto::{
    COMPLETION_LEN, Completion, DiskInfo, INFO_LEN, Limits, MAX_SEGMENTS, MAX_TRANSFER, Op, Plan,
    REQUEST_LEN, SECTOR_SIZE, Status, decode,
};

/// How a [`Disk`] is opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskOptions {
    /// Refuse writes and discards (the image is opened read-only).
    pub read_only: bool,
    /// Open with `O_DIRECT`: reads and writes bypass the host's page cache. The buffer
    /// area is page-aligned and requests are whole sectors, which most devices accept; a
    /// device with larger logical blocks fails such requests with `EINVAL` (reported to the
    /// guest as [`Status::Io`]), and a file system without direct I/O refuses the open.
    pub direct: bool,
}

/// A disk image (a regular file or a block device) that the host serves.
///
/// Its size is taken once at open, rounded down to whole 512-byte sectors. Reads and
/// writes are positional, so one `Disk` serves any number of channels from their own
/// threads at once.
#[derive(Debug)]
pub struct Disk {
    file: File,
    info: DiskInfo,
}

impl Disk {
    /// Opens an image.
    pub fn open(path: impl AsRef<Path>, options: DiskOptions) -> Result<Self, DiskError> {
        let path = path.as_ref();
        let open_error = |source| DiskError::Open {
            path: path.display().to_string(),
            source,
        };
        let mut open = OpenOptions::new();
        open.read(true).write(!options.read_only);
        if options.direct {
            open.custom_flags(OFlag::O_DIRECT.bits());
        }
        let file = open.open(path).map_err(open_error)?;
        Self::from_file(file, options.read_only).map_err(|e| match e {
            DiskError::Open { source, .. } => open_error(source),
            other => other,
        })
    }

    /// Serves an already open file (opened for writing unless `read_only`).
    pub fn from_file(mut file: File, read_only: bool) -> Result<Self, DiskError> {
        let io = |source| DiskError::Open {
            path: String::from("(file)"),
            source,
        };
        let kind = file.metadata().map_err(io)?.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or a block device",
            )));
        }
        // A block device's metadata says 0: its end is its size.
        let len = file.seek(SeekFrom::End(0)).map_err(io)?;
        let sectors = len / u64::from(SECTOR_SIZE);
        if sectors == 0 {
            return Err(DiskError::TooSmall { len });
        }
        Ok(Self {
            file,
            info: DiskInfo {
                sectors,
                read_only,
                // Hole punching is for files; a block device's discard is not offered.
                discard: kind.is_file() && !read_only,
                max_transfer: MAX_TRANSFER,
            },
        })
    }

    /// What the guest is told about the disk.
    pub fn info(&self) -> DiskInfo {
        self.info
    }

    /// A second open file description of the image, read-only (with `O_DIRECT` when the
    /// disk has it), for a thread that reads beside the one using the disk's own file.
    ///
    /// Every system call of a multi-threaded process takes a reference on the file it
    /// names, so two threads reading through one `File` (or a `dup` of it) on two CPUs
    /// bounce that counter's cache line between them at each read. Opened through
    /// `/proc/self/fd`, which names the open image itself, so an image renamed or
    /// unlinked since [`Disk::open`] is still the one opened. `None` when that fails (no
    /// `/proc`, say) or finds another file: the caller then shares the disk's file.
    pub(crate) fn reader(&self) -> Option<File> {
        let flags = fcntl(&self.file, FcntlArg::F_GETFL).ok()?;
        let direct = OFlag::from_bits_truncate(flags) & OFlag::O_DIRECT;
        let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(direct.bits())
            .open(path)
            .ok()?;
        let (mine, theirs) = (self.file.metadata().ok()?, file.metadata().ok()?);
        (mine.dev() == theirs.dev() && mine.ino() == theirs.ino()).then_some(file)
    }

    /// Does what a validated plan says. Reads and writes move data between the image and
    /// the buffer area in place.
    fn execute(&self, plan: &Plan, area: &BufferArea) -> Completion {
        self.execute_on(&self.file, plan, area)
    }

    /// [`execute`](Self::execute) through `file`: the disk's own, or a [`reader`](Self::reader)
    /// of it for a read.
    fn execute_on(&self, file: &File, plan: &Plan, area: &BufferArea) -> Completion {
        let fd = file.as_fd();
        let result = match plan.op {
            Op::Read => area.read_file(fd, plan.offset, plan.segments()),
            Op::Write => area
                .write_file(fd, plan.offset, plan.segments())
                .and_then(|()| if plan.fua { file.sync_data() } else { Ok(()) }),
            Op::Flush => file.sync_data(),
            Op::Discard if !self.info.discard => {
                return Completion {
                    status: Status::Unsupported,
                    detail: 0,
                };
            }
            Op::Discard => {
                let flags =
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
                // The plan's range is inside the disk, far below i64::MAX.
                fallocate(fd, flags, plan.offset as i64, plan.len as i64).map_err(io::Error::from)
            }
            Op::Info => Ok(()),
        };
        match result {
            Ok(()) => Completion::OK,
            Err(e) if e.raw_os_error() == Some(nix::libc::EOPNOTSUPP) && plan.op == Op::Discard => {
                Completion {
                    status: Status::Unsupported,
                    detail: 0,
                }
            }
            other => io_completion(other),
        }
    }
}

/// What [`serve`] did, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeStats {
    /// Requests completed successfully.
    pub completed: u64,
    /// Requests refused or failed (an error completion each).
    pub refused: u64,
    /// Packets that asked for no completion: ignored, as nothing can answer them.
    pub ignored: u64,
    /// Bytes read from the image into the buffer area.
    pub bytes_read: u64,
    /// Bytes written from the buffer area to the image.
    pub bytes_written: u64,
    /// Batches of requests taken from the ring (each request's completion is published as
    /// soon as it is done; only those that found the ring full wait for the batch's end).
    pub batches: u64,
    /// With [`ServeOptions::io_threads`]: requests handed to a worker (the rest were done
    /// by the serving thread).
    pub handed_over: u64,
}

/// The most requests taken from the ring before their completions are published.
const BATCH: usize = 64;

/// With [`ServeOptions::io_threads`]: the least a read moves to be handed to a worker
/// whatever the queue's depth. Below it, a hand-over (a queue and a thread's wake-up, some
/// microseconds) costs more than the serving thread doing the request at once, unless
/// the guest keeps a deep queue ([`DEEP_QUEUE`]).
pub const WORKER_MIN_BYTES: u64 = 64 * 1024;

/// With [`ServeOptions::io_threads`]: how many bytes of large reads the serving thread
/// gathers before they are worth a hand-over (one 1 MiB read, or two of 64 KiB).
pub const HAND_OVER_BYTES: u64 = 128 * 1024;

/// With [`ServeOptions::io_threads`]: smaller reads are gathered too (sixteen to a
/// hand-over) when they come this deep into one batch taken from the ring. A guest that
/// keeps that many requests waiting keeps a worker awake, so its wake-up is paid once
/// for many reads; at depth 8 nothing small is ever handed over, and a worker's wake-up
/// cannot delay a guest that waits on each answer.
pub const DEEP_QUEUE: usize = 12;

/// The most requests in one hand-over. A worker publishes a hand-over's completions with
/// one commit, so more to a hand-over is fewer commits; measured here (4 KiB reads at
/// depth 32, means of six alternated runs), sixteen beat eight and twelve.
const CHUNK: usize = 16;

/// How many times a worker that finds no hand-over queued looks again (giving its CPU
/// away between looks) before it blocks; see `next_chunk`.
const WORKER_SPIN_LOOKS: u32 = 16;

/// A completion to send: the request's id and what to say.
#[derive(Clone, Copy)]
enum Reply {
    Done(Completion),
    Info(DiskInfo),
}

/// Serves one channel's requests until the guest leaves: takes the requests waiting in
/// the ring in batches, validates each ([`decode`]), does it, and publishes its completion
/// at once, so a guest waiting on it goes on while the rest of the batch is served. A
/// guest that is busy (its interrupts masked while it polls) is not signalled; one that
/// sleeps is woken by the first completion that finds the ring empty.
///
/// Bad requests get an error completion and change nothing. Requests the guest committed
/// before it left are still served, so every write it was told is complete is in the
/// image. Returns the counts when the guest has gone; a channel the guest broke (a
/// malformed ring or header, a page past the buffer area) is an error.
pub fn serve(
    disk: &Disk,
    channel: &ShmChannel,
    area: &BufferArea,
) -> Result<ServeStats, DiskError> {
    let limits = limits(disk, area);
    // Allocated once: the plan's segment table and room for the longest GPA header a
    // request may have (one range per segment).
    let mut plan = Box::new(Plan::new());
    let mut scratch = vec![0u8; 8 + MAX_SEGMENTS * 16].into_boxed_slice();
    let mut replies = [(0u64, Reply::Done(Completion::OK)); BATCH];
    let mut stats = ServeStats::default();
    loop {
        // Completions that did not fit at once, sent after the batch as room comes.
        let mut n = 0;
        let mut send_error = None;
        let got = channel.recv_batch(BATCH, Wait::Forever, |packet| {
            let meta = packet.meta();
            if !meta.completion_requested {
                stats.ignored += 1;
                return;
            }
            // `None`: the channel failed, and the receive reports it.
            let Some(reply) = handle(disk, packet, &limits, &mut plan, &mut scratch, area) else {
                return;
            };
            match reply {
                Reply::Done(c) if c.status != Status::Ok => stats.refused += 1,
                _ => {
                    stats.completed += 1;
                    match plan.op {
                        Op::Read => stats.bytes_read += plan.len,
                        Op::Write => stats.bytes_written += plan.len,
                        _ => {}
                    }
                }
            }
            // Each completion is published as soon as its request is done, so a guest
            // waiting on it goes on while the rest of the batch is served (a guest that is
            // polling is not signalled for it).
            if n == 0 && send_error.is_none() {
                let mut bytes = [0u8; INFO_LEN];
                match channel.send_packet(
                    &completion(meta.transaction_id, reply, &mut bytes),
                    Wait::Now,
                ) {
                    Ok(()) => return,
                    Err(ChannelError::Full) => {}
                    Err(e) => {
                        send_error = Some(e);
                        return;
                    }
                }
            }
            replies[n] = (meta.transaction_id, reply);
            n += 1;
        });
        let sent = match send_error {
            Some(e) => Err(e),
            None => got.and_then(|_| send_replies(channel, &replies[..n])),
        };
        stats.batches += 1;
        match sent {
            Ok(()) => {}
            Err(ChannelError::Closed) => return Ok(stats),
            Err(e) => return Err(e.into()),
        }
    }
}

/// How [`serve_with`] serves a channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeOptions {
    /// Worker threads that move data beside the serving thread (0: the serving thread does
    /// everything itself, as [`serve`] does).
    ///
    /// The serving thread takes requests from the ring, checks them and gathers the reads
    /// of at least [`WORKER_MIN_BYTES`] (and smaller ones [`DEEP_QUEUE`] deep in a batch);
    /// everything else it does at once. Writes and discards stay with it because the
    /// kernel serializes them on the image's inode lock (a buffered write to a file holds
    /// it), so a second thread would only wait: measured here, 1 MiB writes on a tmpfs
    /// image lost 6-13% at depth 8 and 32 when handed over.
    ///
    /// Once it has gathered [`HAND_OVER_BYTES`] (or sixteen reads) and another request
    /// follows in the ring, it queues the gathered reads for the workers, or does them
    /// itself when the queue already holds one hand-over per worker. A worker takes the
    /// next hand-over as soon as it is done with one, so it never waits for the serving
    /// thread to finish a request of its own. When the ring is empty the serving thread
    /// does what it has gathered and what no worker has taken yet, so a lone read never
    /// waits for a worker to wake. Each worker moves its reads' data and publishes their
    /// completions, a hand-over's together with one commit, so requests complete in any
    /// order and several are moved at once (the way a VMM's I/O thread pool serves a
    /// queue). A worker that finds nothing queued looks again a few times, giving its CPU
    /// away between looks, before it sleeps. On two CPUs one worker beside the
    /// serving thread keeps both busy. The workers inherit the serving thread's CPU
    /// affinity unless [`worker_cpu`](Self::worker_cpu) pins them. Each worker reads
    /// through an open file of the image of its own, not the serving thread's, so their
    /// reads do not bounce one file's reference count between CPUs (it shares the disk's
    /// when the image cannot be opened again through `/proc/self/fd`).
    pub io_threads: usize,
    /// Pins every worker to this CPU (`None`: they inherit the serving thread's affinity).
    /// With the serving thread pinned to another CPU, the two never take turns on one.
    /// A CPU the process may not use fails [`serve_with`] with [`DiskError::Pin`] before
    /// any request is served.
    pub worker_cpu: Option<usize>,
    /// Moves reads' and writes' data through one io_uring this deep (0: positional I/O,
    /// one transfer at a time per thread). The serving thread queues every read and write
    /// as it takes it from the ring and publishes each completion as the kernel reports
    /// it, so up to this many transfers are in flight at once: what a disk opened with
    /// `O_DIRECT` ([`DiskOptions::direct`]) needs to be kept busy. Flushes, discards and a
    /// request of more than [`FileRing::MAX_RANGES`] segments are done at once, as without
    /// it. Needs [`io_threads`](Self::io_threads) 0 and a kernel that allows io_uring;
    /// otherwise [`serve_with`] fails with [`DiskError::IoUring`] before any request is
    /// served. While transfers are in flight and no request waits in the ring, the
    /// serving thread waits for the kernel rather than the ring: a request that comes
    /// then is taken at the next completion. (On a tmpfs image the kernel hands each
    /// queued transfer to a worker thread of its own, which costs more than a `pread`:
    /// there, positional I/O is faster.)
    pub io_uring: u32,
}

/// Requests gathered for one thread to do, with their transaction ids. Allocated once
/// per worker (and one for the serving thread), then passed back and forth.
struct Chunk {
    tids: [u64; CHUNK],
    plans: Box<[Plan]>,
    n: usize,
    bytes: u64,
}

impl Chunk {
    fn new() -> Box<Self> {
        Box::new(Self {
            tids: [0; CHUNK],
            plans: (0..CHUNK).map(|_| Plan::new()).collect(),
            n: 0,
            bytes: 0,
        })
    }

    /// Whether it is worth handing over (or must go, being full).
    fn ready(&self) -> bool {
        self.n == CHUNK || self.bytes >= HAND_OVER_BYTES
    }

    /// Does every request and publishes its completion as `publish` says; empties the
    /// chunk. An error is the channel's.
    fn run(
        &mut self,
        disk: &Disk,
        file: &File,
        channel: &ShmChannel,
        area: &BufferArea,
        counts: &Tally,
        publish: Publish,
    ) -> Result<(), ChannelError> {
        match publish {
            Publish::EachAtOnce => self.execute(disk, file, area, counts, |tid, done| {
                let mut bytes = [0u8; INFO_LEN];
                channel.send_packet(
                    &completion(tid, Reply::Done(done), &mut bytes),
                    Wait::Forever,
                )
            }),
            Publish::Together => {
                let mut replies = [(0u64, Reply::Done(Completion::OK)); CHUNK];
                let mut n = 0;
                self.execute(disk, file, area, counts, |tid, done| {
                    replies[n] = (tid, Reply::Done(done));
                    n += 1;
                    Ok(())
                })?;
                send_replies(channel, &replies[..n])
            }
        }
    }

    /// Does every request, handing each one's id and completion to `done` in turn;
    /// empties the chunk.
    fn execute(
        &mut self,
        disk: &Disk,
        file: &File,
        area: &BufferArea,
        counts: &Tally,
        mut done: impl FnMut(u64, Completion) -> Result<(), ChannelError>,
    ) -> Result<(), ChannelError> {
        let n = std::mem::take(&mut self.n);
        self.bytes = 0;
        for (plan, &tid) in self.plans[..n].iter().zip(&self.tids) {
            let completion = disk.execute_on(file, plan, area);
            counts.count(plan, completion);
            done(tid, completion)?;
        }
        Ok(())
    }
}

/// When a chunk's completions are published.
#[derive(Clone, Copy)]
enum Publish {
    /// Each as soon as its request is done: the serving thread's way, as the guest runs
    /// beside it and may be waiting on the first.
    EachAtOnce,
    /// All with one commit once the chunk is done: a worker's way. One commit takes the
    /// sending half's lock, stores the write index, fences and asks whether to signal
    /// once for the chunk, not once per request, and the serving thread publishing on the
    /// same ring from another CPU meets that lock and that index once. The first
    /// completion waits for the chunk's last request: at most [`CHUNK`] small reads,
    /// while a chunk of large reads holds one, or a few up to [`HAND_OVER_BYTES`].
    Together,
}

/// Takes the next queued chunk for a worker: looks [`WORKER_SPIN_LOOKS`] times, giving
/// the CPU away between looks, then blocks. `None` once the serving thread has stopped.
///
/// A chunk queued while the worker looks is taken without the serving thread paying for a
/// wake-up (a futex system call and an interrupt to the worker's CPU) or the worker for a
/// sleep. On a CPU of its own the looks last microseconds; on one it shares with the
/// guest (two CPUs), each look lets the guest run.
fn next_chunk(work_rx: &Mutex<Receiver<Box<Chunk>>>) -> Option<Box<Chunk>> {
    for _ in 0..WORKER_SPIN_LOOKS {
        // Another worker blocked in the queue holds its lock: that is a look too.
        if let Ok(rx) = work_rx.try_lock() {
            match rx.try_recv() {
                Ok(chunk) => return Some(chunk),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {}
            }
        }
        thread::yield_now();
    }
    work_rx.lock().ok()?.recv().ok()
}

/// [`serve`] with options: with [`ServeOptions::io_threads`] above 0, worker threads move
/// data beside the serving thread.
pub fn serve_with(
    disk: &Disk,
    channel: &ShmChannel,
    area: &BufferArea,
    options: ServeOptions,
) -> Result<ServeStats, DiskError> {
    if options.io_uring > 0 {
        if options.io_threads > 0 {
            return Err(DiskError::IoUring(io::Error::new(
                io::ErrorKind::InvalidInput,
                "io_uring serves without I/O threads",
            )));
        }
        return serve_uring(disk, channel, area, options.io_uring);
    }
    if options.io_threads == 0 {
        return serve(disk, channel, area);
    }
    let limits = limits(disk, area);
    let workers = options.io_threads;
    // Chunks: one in each worker's hands, one queued for each worker, one being gathered.
    // The queue and the free list each hold every chunk that can be outside them, so
    // neither send ever blocks.
    let (free_tx, free_rx) = sync_channel::<Box<Chunk>>(2 * workers);
    for _ in 0..2 * workers {
        let _ = free_tx.send(Chunk::new());
    }
    let (work_tx, work_rx) = sync_channel::<Box<Chunk>>(2 * workers);
    let work_rx = Mutex::new(work_rx);
    // The serving thread's counts (each worker keeps its own).
    let counts = Tally::default();
    let mut scratch = vec![0u8; 8 + MAX_SEGMENTS * 16].into_boxed_slice();
    let mut gathered = Chunk::new();
    let mut stats = ServeStats::default();
    let (pinned_tx, pinned_rx) = sync_channel::<io::Result<()>>(workers);
    let ended = thread::scope(|s| {
        let mut handles = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (work_rx, free_tx) = (&work_rx, free_tx.clone());
            let pinned_tx = pinned_tx.clone();
            handles.push(s.spawn(move || {
                let pinned = options.worker_cpu.map_or(Ok(()), pin_this_thread);
                let stop = pinned.is_err();
                let _ = pinned_tx.send(pinned);
                if stop {
                    return None;
                }
                // Reads through a file of its own: see `Disk::reader`.
                let own = disk.reader();
                let file = own.as_ref().unwrap_or(&disk.file);
                let counts = Tally::default();
                // The next queued chunk, as soon as there is one: a worker never waits for
                // the serving thread to finish a request of its own.
                while let Some(mut chunk) = next_chunk(work_rx) {
                    counts.handed.set(counts.handed.get() + chunk.n as u64);
                    // A guest that left is the serving thread's to notice.
                    let _ = chunk.run(disk, file, channel, area, &counts, Publish::Together);
                    let _ = free_tx.send(chunk);
                }
                Some(counts)
            }));
        }
        drop(pinned_tx);
        // Every worker pinned (or not asked to be) before the first request.
        for _ in 0..workers {
            if let Ok(Err(source)) = pinned_rx.recv() {
                drop(work_tx);
                return Err(DiskError::Pin {
                    cpu: options.worker_cpu.unwrap_or(0),
                    source,
                });
            }
        }
        // A chunk the serving thread does itself, through the disk's own file.
        let here = |chunk: &mut Chunk| {
            chunk.run(
                disk,
                &disk.file,
                channel,
                area,
                &counts,
                Publish::EachAtOnce,
            )
        };
        let ended = loop {
            let mut failed = None;
            // Requests taken in this batch so far.
            let mut taken = 0;
            let got = channel.recv_batch(BATCH, Wait::Forever, |packet| {
                taken += 1;
                let meta = packet.meta();
                if !meta.completion_requested {
                    stats.ignored += 1;
                    return;
                }
                // Another request follows what was gathered: queue that for the workers,
                // or do it here when the queue already holds all it may.
                if gathered.ready() {
                    let sent = match free_rx.try_recv() {
                        Ok(fresh) => work_tx
                            .send(std::mem::replace(&mut gathered, fresh))
                            .map_err(|_| ChannelError::Closed),
                        Err(TryRecvError::Empty) => here(&mut gathered),
                        Err(TryRecvError::Disconnected) => Err(ChannelError::Closed),
                    };
                    if let Err(e) = sent {
                        failed = Some(e);
                        return;
                    }
                }
                let at = gathered.n;
                let plan = &mut gathered.plans[at];
                let reply =
                    match take_request(packet, &limits, plan, &mut scratch, disk, &mut stats) {
                        Taken::Failed => return,
                        Taken::Answer(reply) => reply,
                        // Writes, discards, flushes and small reads (but those deep in a
                        // queue) are done at once.
                        Taken::Valid
                            if plan.op != Op::Read
                                || (plan.len < WORKER_MIN_BYTES && taken < DEEP_QUEUE) =>
                        {
                            let done = disk.execute(plan, area);
                            counts.count(plan, done);
                            Reply::Done(done)
                        }
                        Taken::Valid => {
                            gathered.bytes += plan.len;
                            gathered.tids[at] = meta.transaction_id;
                            gathered.n += 1;
                            return;
                        }
                    };
                let mut bytes = [0u8; INFO_LEN];
                if let Err(e) = channel.send_packet(
                    &completion(meta.transaction_id, reply, &mut bytes),
                    Wait::Forever,
                ) {
                    failed = Some(e);
                }
            });
            stats.batches += 1;
            // The ring is empty: what is gathered is done here, at once, and so is what is
            // queued that no worker has taken yet (a worker waiting for the queue holds its
            // lock, and takes the next chunk itself).
            let mut done = match (failed, got) {
                (Some(e), _) | (None, Err(e)) => Err(e),
                (None, Ok(_)) => here(&mut gathered),
            };
            while done.is_ok() {
                let Some(mut chunk) = work_rx.try_lock().ok().and_then(|rx| rx.try_recv().ok())
                else {
                    break;
                };
                done = here(&mut chunk);
                let _ = free_tx.send(chunk);
            }
            if let Err(e) = done {
                break e;
            }
        };
        // The workers finish what they hold and stop; their counts join the serving
        // thread's.
        drop(work_tx);
        for handle in handles {
            match handle.join() {
                Ok(Some(theirs)) => counts.add(&theirs),
                Ok(None) => {}
                // As the scope would have: a worker's panic is the caller's.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(ended)
    })?;
    stats.completed += counts.completed.get();
    stats.refused += counts.refused.get();
    stats.bytes_read = counts.read.get();
    stats.bytes_written = counts.written.get();
    stats.handed_over = counts.handed.get();
    match ended {
        ChannelError::Closed => Ok(stats),
        e => Err(e.into()),
    }
}

/// A transfer in flight through [`serve_uring`]'s ring: its request's id, what it does,
/// its bytes.
#[derive(Clone, Copy)]
struct InFlight {
    tid: u64,
    op: Op,
    len: u64,
}

/// [`serve`] with reads and writes through one io_uring `depth` deep
/// ([`ServeOptions::io_uring`]).
fn serve_uring(
    disk: &Disk,
    channel: &ShmChannel,
    area: &BufferArea,
    depth: u32,
) -> Result<ServeStats, DiskError> {
    let limits = limits(disk, area);
    let mut ring = FileRing::new(area, disk.file.as_fd(), depth).map_err(DiskError::IoUring)?;
    let mut plan = Box::new(Plan::new());
    let mut scratch = vec![0u8; 8 + MAX_SEGMENTS * 16].into_boxed_slice();
    // Each transfer in flight, by the tag the ring hands back, and the free tags.
    let idle = InFlight {
        tid: 0,
        op: Op::Info,
        len: 0,
    };
    let mut table = vec![idle; depth as usize].into_boxed_slice();
    let mut tags: Vec<u64> = (0..u64::from(depth)).collect();
    // Completions that found the ring full, sent as room comes: at most one per request
    // taken, and a batch takes at most what the io_uring has room for.
    let mut waiting: Vec<(u64, Reply)> = Vec::with_capacity(BATCH + depth as usize);
    let counts = Tally::default();
    let mut stats = ServeStats::default();
    // Publishes one completion at once, or keeps it for later when the ring is full.
    let reply = |waiting: &mut Vec<(u64, Reply)>, tid: u64, r: Reply| {
        if waiting.is_empty() {
            let mut bytes = [0u8; INFO_LEN];
            match channel.send_packet(&completion(tid, r, &mut bytes), Wait::Now) {
                Err(ChannelError::Full) => {}
                other => return other,
            }
        }
        waiting.push((tid, r));
        Ok(())
    };
    let ended = loop {
        let mut failed = None;
        let mut taken = 0;
        if ring.room() > 0 {
            // Wait for requests only when nothing is in flight to wait for instead.
            let wait = if ring.in_flight() > 0 {
                Wait::Now
            } else {
                Wait::Forever
            };
            let got = channel.recv_batch(ring.room().min(BATCH), wait, |packet| {
                taken += 1;
                let meta = packet.meta();
                if !meta.completion_requested {
                    stats.ignored += 1;
                    return;
                }
                let r = match take_request(
                    packet,
                    &limits,
                    &mut plan,
                    &mut scratch,
                    disk,
                    &mut stats,
                ) {
                    Taken::Failed => return,
                    Taken::Answer(reply) => reply,
                    // Reads and writes go to the io_uring while it has room (a batch
                    // takes no more than that, so a tag is free).
                    Taken::Valid
                        if matches!(plan.op, Op::Read | Op::Write)
                            && plan.segments().len() <= FileRing::MAX_RANGES
                            && !tags.is_empty() =>
                    {
                        let dir = match plan.op {
                            Op::Read => FileDirection::Read,
                            _ => FileDirection::Write { dsync: plan.fua },
                        };
                        let tag = tags.pop().unwrap_or_default();
                        let done = match ring.queue(dir, plan.offset, plan.segments(), tag) {
                            Ok(()) => {
                                table[tag as usize] = InFlight {
                                    tid: meta.transaction_id,
                                    op: plan.op,
                                    len: plan.len,
                                };
                                return;
                            }
                            // No room after all: done here, at once.
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                tags.push(tag);
                                disk.execute(&plan, area)
                            }
                            Err(e) => {
                                tags.push(tag);
                                io_completion(Err(e))
                            }
                        };
                        counts.count(&plan, done);
                        Reply::Done(done)
                    }
                    Taken::Valid => {
                        let done = disk.execute(&plan, area);
                        counts.count(&plan, done);
                        Reply::Done(done)
                    }
                };
                if let Err(e) = reply(&mut waiting, meta.transaction_id, r) {
                    failed.get_or_insert(e);
                }
            });
            // A look that found the ring empty is no batch.
            stats.batches += u64::from(taken > 0);
            match got {
                Ok(_) | Err(ChannelError::Empty) => {}
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            break e;
        }
        // Hand what was queued to the kernel; wait for a transfer when nothing else can go
        // on (no request came, or the io_uring is full).
        let wait_for = usize::from(taken == 0 || ring.room() == 0);
        let mut sent = Ok(());
        let reaped = ring.submit_and_reap(wait_for, |tag, result| {
            let t = table[tag as usize];
            tags.push(tag);
            let done = io_completion(result);
            counts.count_op(t.op, t.len, done);
            if let Err(e) = reply(&mut waiting, t.tid, Reply::Done(done)) {
                sent = Err(e);
            }
        });
        if let Err(e) = reaped {
            // The io_uring itself failed: what is in flight is drained below.
            return finish_uring(ring, &table, counts, stats, Err(DiskError::IoUring(e)));
        }
        if let Err(e) = sent.and_then(|()| send_replies(channel, &waiting)) {
            break e;
        }
        waiting.clear();
    };
    let ended = match ended {
        ChannelError::Closed => Ok(()),
        e => Err(e.into()),
    };
    finish_uring(ring, &table, counts, stats, ended)
}

/// A transfer's completion: success, or the host's errno as [`Status::Io`].
fn io_completion(result: io::Result<()>) -> Completion {
    match result {
        Ok(()) => Completion::OK,
        Err(e) => Completion {
            status: Status::Io,
            detail: e.raw_os_error().map_or(nix::libc::EIO as u32, |n| n as u32),
        },
    }
}

/// Waits for every transfer still in flight (a guest that left still finds each write it
/// was told is complete in the image, and nothing writes into the area after this
/// returns), then adds up the counts.
fn finish_uring(
    mut ring: FileRing<'_>,
    table: &[InFlight],
    counts: Tally,
    mut stats: ServeStats,
    ended: Result<(), DiskError>,
) -> Result<ServeStats, DiskError> {
    let drained = ring.drain(|tag, result| {
        let t = table[tag as usize];
        counts.count_op(t.op, t.len, io_completion(result));
    });
    stats.completed += counts.completed.get();
    stats.refused += counts.refused.get();
    stats.bytes_read = counts.read.get();
    stats.bytes_written = counts.written.get();
    ended?;
    drained.map_err(DiskError::IoUring)?;
    Ok(stats)
}

/// Pins the calling thread to `cpu`.
fn pin_this_thread(cpu: usize) -> io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).map_err(io::Error::from)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(io::Error::from)
}

/// What one thread of [`serve_with`] did. Each thread keeps its own and the workers'
/// are added to the serving thread's when they stop: counts shared between threads would
/// move their cache line between the CPUs at every request (measured here: the two
/// atomic additions per read were 3% of all CPU at 4 KiB reads, depth 32).
#[derive(Default)]
struct Tally {
    completed: Cell<u64>,
    refused: Cell<u64>,
    read: Cell<u64>,
    written: Cell<u64>,
    /// Requests a worker did.
    handed: Cell<u64>,
}

impl Tally {
    fn count(&self, plan: &Plan, done: Completion) {
        self.count_op(plan.op, plan.len, done);
    }

    fn count_op(&self, op: Op, len: u64, done: Completion) {
        let bump = |c: &Cell<u64>, n: u64| c.set(c.get() + n);
        if done.status != Status::Ok {
            bump(&self.refused, 1);
            return;
        }
        bump(&self.completed, 1);
        match op {
            Op::Read => bump(&self.read, len),
            Op::Write => bump(&self.written, len),
            _ => {}
        }
    }

    fn add(&self, other: &Tally) {
        for (mine, theirs) in [
            (&self.completed, &other.completed),
            (&self.refused, &other.refused),
            (&self.read, &other.read),
            (&self.written, &other.written),
            (&self.handed, &other.handed),
        ] {
            mine.set(mine.get() + theirs.get());
        }
    }
}

/// What the host checks requests against: the disk, and the guest's half of the area.
fn limits(disk: &Disk, area: &BufferArea) -> Limits {
    let pages = area.guest_pages();
    Limits {
        sectors: disk.info.sectors,
        read_only: disk.info.read_only,
        buffers: pages.start as usize * 4096..pages.end as usize * 4096,
    }
}

/// The completion packet of request `tid`, its payload encoded into `bytes`.
fn completion(tid: u64, reply: Reply, bytes: &mut [u8; INFO_LEN]) -> OutgoingPacket<'_> {
    let len = match reply {
        Reply::Done(c) => {
            bytes[..COMPLETION_LEN].copy_from_slice(&c.encode());
            COMPLETION_LEN
        }
        Reply::Info(i) => {
            *bytes = i.encode();
            INFO_LEN
        }
    };
    OutgoingPacket::completion_slice(tid, &bytes[..len])
}

/// One request: its reply, or `None` when reading it failed the channel.
fn handle(
    disk: &Disk,
    packet: &mut Packet<'_>,
    limits: &Limits,
    plan: &mut Plan,
    scratch: &mut [u8],
    area: &BufferArea,
) -> Option<Reply> {
    match read_request(packet, limits, plan, scratch)? {
        Err(status) => Some(Reply::Done(Completion { status, detail: 0 })),
        Ok(()) if plan.op == Op::Info => Some(Reply::Info(disk.info)),
        Ok(()) => Some(Reply::Done(disk.execute(plan, area))),
    }
}

/// What [`take_request`] found.
enum Taken {
    /// Reading it failed the channel (the receive reports it).
    Failed,
    /// Answered without touching the disk: a refusal or the geometry (counted).
    Answer(Reply),
    /// A valid request in the plan, to be done.
    Valid,
}

/// Reads and decodes one request into `plan`, answering a bad one and the geometry query
/// at once and counting them in `stats`.
fn take_request(
    packet: &mut Packet<'_>,
    limits: &Limits,
    plan: &mut Plan,
    scratch: &mut [u8],
    disk: &Disk,
    stats: &mut ServeStats,
) -> Taken {
    match read_request(packet, limits, plan, scratch) {
        None => Taken::Failed,
        Some(Err(status)) => {
            stats.refused += 1;
            Taken::Answer(Reply::Done(Completion { status, detail: 0 }))
        }
        Some(Ok(())) if plan.op == Op::Info => {
            stats.completed += 1;
            Taken::Answer(Reply::Info(disk.info))
        }
        Some(Ok(())) => Taken::Valid,
    }
}

/// Reads and decodes one request into `plan`: `Ok` when it is valid, the refusal's status
/// when not, `None` when reading it failed the channel.
fn read_request(
    packet: &mut Packet<'_>,
    limits: &Limits,
    plan: &mut Plan,
    scratch: &mut [u8],
) -> Option<Result<(), Status>> {
    let meta = packet.meta();
    let mut payload = [0u8; REQUEST_LEN];
    if meta.payload_len != REQUEST_LEN || packet.read_payload(0, &mut payload).is_err() {
        return Some(Err(Status::Malformed));
    }
    let ranges = match meta.packet_type {
        PacketType::GpaDirect => match packet.gpa_ranges(scratch) {
            Ok(ranges) => Some(ranges),
            // More ranges than any valid request has: refused, the channel stays up.
            Err(ChannelError::BufferTooSmall { .. }) => return Some(Err(Status::BadBuffer)),
            Err(_) => return None,
        },
        _ => None,
    };
    Some(decode(meta.packet_type, &payload, ranges, limits, plan))
}

/// Publishes completions with one commit; when the ring fills, what fits goes out and the
/// rest waits for room one by one.
fn send_replies(channel: &ShmChannel, replies: &[(u64, Reply)]) -> Result<(), ChannelError> {
    if replies.is_empty() {
        return Ok(());
    }
    let mut batch = channel.batch()?;
    for &(tid, reply) in replies {
        let mut bytes = [0u8; INFO_LEN];
        let packet = completion(tid, reply, &mut bytes);
        match batch.push(&packet) {
            Ok(()) => {}
            Err(ChannelError::Full) => {
                batch.commit()?;
                channel.send_packet(&packet, Wait::Forever)?;
                batch = channel.batch()?;
            }
            Err(e) => return Err(e),
        }
    }
    batch.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    /// A file of `len` pattern bytes in `dir`, opened as a disk with `options`.
    fn disk_in(dir: &Path, name: &str, len: usize, options: DiskOptions) -> (Disk, Vec<u8>) {
        let path = dir.join(format!("vmlink-disk-{name}-{}.img", std::process::id()));
        let data: Vec<u8> = (0..len).map(|i| (i / 512) as u8 ^ i as u8).collect();
        File::create(&path).unwrap().write_all(&data).unwrap();
        let disk = Disk::open(&path, options).unwrap();
        std::fs::remove_file(&path).unwrap();
        (disk, data)
    }

    #[test]
    fn a_reader_is_its_own_read_only_description_of_the_same_image_even_unlinked() {
        // The image is unlinked before the reader is opened: /proc/self/fd still names it.
        let (disk, data) = disk_in(
            &std::env::temp_dir(),
            "reader",
            64 * 1024,
            DiskOptions::default(),
        );
        let reader = disk.reader().expect("a reader");
        let mut got = vec![0u8; 4096];
        reader.read_exact_at(&mut got, 8192).unwrap();
        assert!(got[..] == data[8192..12288]);
        // Its own file position, so not a dup sharing the disk's description.
        let mut theirs = &disk.file;
        let mut mine = &reader;
        theirs.seek(SeekFrom::Start(512)).unwrap();
        assert_eq!(mine.stream_position().unwrap(), 0);
        // Read-only: a worker cannot write through it.
        assert!(reader.write_at(b"x", 0).is_err());
        assert_ne!(reader.as_raw_fd(), disk.file.as_raw_fd());
    }

    #[test]
    fn a_reader_of_a_direct_disk_bypasses_the_page_cache_too() {
        // The temp directory is on a file system with direct I/O here (a disk).
        let direct = DiskOptions {
            direct: true,
            ..DiskOptions::default()
        };
        let (disk, _) = disk_in(&std::env::temp_dir(), "reader-direct", 64 * 1024, direct);
        let reader = disk.reader().expect("a reader");
        let flags = OFlag::from_bits_truncate(fcntl(&reader, FcntlArg::F_GETFL).unwrap());
        assert!(flags.contains(OFlag::O_DIRECT), "{flags:?}");
        let (plain, _) = disk_in(
            &std::env::temp_dir(),
            "reader-plain",
            4096,
            DiskOptions::default(),
        );
        let flags =
            OFlag::from_bits_truncate(fcntl(plain.reader().unwrap(), FcntlArg::F_GETFL).unwrap());
        assert!(!flags.contains(OFlag::O_DIRECT), "{flags:?}");
    }
}
