//! The host side: a disk image and the loop that serves one channel's requests.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use nix::fcntl::{FallocateFlags, OFlag, fallocate};
use vmlink_channel::{ChannelError, OutgoingPacket, Packet, PacketMeta, PacketType, Payload, Wait};
use vmlink_shm::{BufferArea, ShmChannel};

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

    /// Does what a validated plan says. Reads and writes move data between the image and
    /// the buffer area in place.
    fn execute(&self, plan: &Plan, area: &BufferArea) -> Completion {
        let fd = self.file.as_fd();
        let result = match plan.op {
            Op::Read => area.read_file(fd, plan.offset, plan.segments()),
            Op::Write => area
                .write_file(fd, plan.offset, plan.segments())
                .and_then(|()| {
                    if plan.fua {
                        self.file.sync_data()
                    } else {
                        Ok(())
                    }
                }),
            Op::Flush => self.file.sync_data(),
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
            Err(e) => Completion {
                status: Status::Io,
                detail: e.raw_os_error().map_or(nix::libc::EIO as u32, |n| n as u32),
            },
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
    /// Batches of requests taken from the ring (each answered with one commit).
    pub batches: u64,
}

/// The most requests taken from the ring before their completions are published.
const BATCH: usize = 64;

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
    let pages = area.guest_pages();
    let page = 4096usize;
    let limits = Limits {
        sectors: disk.info.sectors,
        read_only: disk.info.read_only,
        buffers: pages.start as usize * page..pages.end as usize * page,
    };
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
            let reply = handle(disk, packet, &limits, &mut plan, &mut scratch, area);
            match reply {
                Some(Reply::Done(c)) if c.status != Status::Ok => stats.refused += 1,
                Some(_) => {
                    stats.completed += 1;
                    match plan.op {
                        Op::Read => stats.bytes_read += plan.len,
                        Op::Write => stats.bytes_written += plan.len,
                        _ => {}
                    }
                }
                // The channel failed; the receive reports it.
                None => return,
            }
            let Some(reply) = reply else { return };
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
    OutgoingPacket {
        meta: PacketMeta {
            packet_type: PacketType::Completion,
            flags: 0,
            transaction_id: tid,
        },
        header: &[],
        payload: Payload::Bytes(&bytes[..len]),
    }
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
    let meta = packet.meta();
    let refuse = |status| Some(Reply::Done(Completion { status, detail: 0 }));
    let mut payload = [0u8; REQUEST_LEN];
    if meta.payload_len != REQUEST_LEN || packet.read_payload(0, &mut payload).is_err() {
        return refuse(Status::Malformed);
    }
    let ranges = match meta.packet_type {
        PacketType::GpaDirect => match packet.gpa_ranges(scratch) {
            Ok(ranges) => Some(ranges),
            // More ranges than any valid request has: refused, the channel stays up.
            Err(ChannelError::BufferTooSmall { .. }) => return refuse(Status::BadBuffer),
            Err(_) => return None,
        },
        _ => None,
    };
    if let Err(status) = decode(meta.packet_type, &payload, ranges, limits, plan) {
        return refuse(status);
    }
    match plan.op {
        Op::Info => Some(Reply::Info(disk.info)),
        _ => Some(Reply::Done(disk.execute(plan, area))),
    }
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
