//! The disk end to end over vmlink-shm: data checked against the image, bad requests
//! refused without changing anything, a guest that leaves mid-request.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};

use vmlink_channel::packet::GpaRange;
use vmlink_channel::{ChannelError, OutgoingPacket, PacketMeta, PacketType, Payload, Wait};
use vmlink_disk::proto::{Completion, FLAG_FUA, Op, RequestHeader};
use vmlink_disk::{
    Disk, DiskClient, DiskError, DiskInfo, DiskOptions, Done, ServeOptions, ServeStats, Status,
    config, serve, serve_with, service,
};
use vmlink_shm::{FileRing, Guest};

/// A scratch directory, removed on drop; in /dev/shm when there is one (a tmpfs).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("vmlink-disk-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// An image of `len` bytes filled with a pattern; returns its path and contents.
    fn image(&self, len: usize) -> (PathBuf, Vec<u8>) {
        let path = self.0.join("disk.img");
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[2])
            .collect();
        std::fs::write(&path, &data).unwrap();
        (path, data)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

type Host = JoinHandle<Result<ServeStats, DiskError>>;

/// A host serving `image` on a socket pair and a connected guest client.
fn connect(image: &Path, options: DiskOptions) -> (DiskClient, Host) {
    connect_with(image, options, ServeOptions::default())
}

/// [`connect`] with the host serving with `serving`.
fn connect_with(image: &Path, options: DiskOptions, serving: ServeOptions) -> (DiskClient, Host) {
    let (a, b) = UnixStream::pair().unwrap();
    let image = image.to_path_buf();
    let host = thread::spawn(move || {
        let disk = Disk::open(&image, options)?;
        let endpoint = service("disk").serve_stream(a)?;
        serve_with(&disk, endpoint.channel(), endpoint.buffer(), serving)
    });
    let endpoint = Guest::new("disk")
        .with_config(config())
        .connect_stream(b)
        .unwrap();
    let (channel, memory) = endpoint.into_parts();
    (DiskClient::new(channel, memory.buffer()).unwrap(), host)
}

/// Serving through an io_uring 16 deep.
fn through_io_uring() -> ServeOptions {
    ServeOptions {
        io_uring: 16,
        ..ServeOptions::default()
    }
}

/// The first CPU this process may use.
fn first_cpu() -> usize {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    (0..nix::sched::CpuSet::count())
        .find(|&c| set.is_set(c).unwrap_or(false))
        .unwrap()
}

#[test]
fn io_threads_on_a_cpu_the_process_may_not_use_fail_before_serving() {
    let scratch = Scratch::new("pin");
    let (path, _) = scratch.image(1 << 20);
    let (a, b) = UnixStream::pair().unwrap();
    let host = thread::spawn(move || {
        let disk = Disk::open(&path, DiskOptions::default())?;
        let endpoint = service("disk").serve_stream(a)?;
        let serving = ServeOptions {
            io_threads: 2,
            worker_cpu: Some(nix::sched::CpuSet::count()),
            ..ServeOptions::default()
        };
        serve_with(&disk, endpoint.channel(), endpoint.buffer(), serving)
    });
    let endpoint = Guest::new("disk")
        .with_config(config())
        .connect_stream(b)
        .unwrap();
    let err = host.join().unwrap().unwrap_err();
    assert!(
        matches!(err, DiskError::Pin { cpu, .. } if cpu == nix::sched::CpuSet::count()),
        "{err}"
    );
    // The guest finds the channel closed, not a host that never answers.
    let (channel, memory) = endpoint.into_parts();
    assert!(DiskClient::new(channel, memory.buffer()).is_err());
}

/// A small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn queued_reads_and_writes_at_depth_32_match_the_image_byte_for_byte() {
    queued_reads_and_writes(0, 0);
}

#[test]
fn io_threads_complete_out_of_order_and_match_the_image_byte_for_byte() {
    queued_reads_and_writes(3, 0);
}

#[test]
fn io_uring_completes_out_of_order_and_matches_the_image_byte_for_byte() {
    queued_reads_and_writes(0, 32);
}

/// A depth smaller than the guest's queue: requests wait in the ring for room.
#[test]
fn a_shallow_io_uring_under_a_deep_queue_matches_the_image_too() {
    queued_reads_and_writes(0, 3);
}

#[test]
fn io_uring_beside_io_threads_or_at_an_impossible_depth_fails_before_serving() {
    let scratch = Scratch::new("uring-options");
    let (path, _) = scratch.image(1 << 20);
    for (io_threads, io_uring) in [(1, 8), (0, FileRing::MAX_DEPTH + 1)] {
        let (a, b) = UnixStream::pair().unwrap();
        let path = path.clone();
        let host = thread::spawn(move || {
            let disk = Disk::open(&path, DiskOptions::default())?;
            let endpoint = service("disk").serve_stream(a)?;
            let serving = ServeOptions {
                io_threads,
                io_uring,
                ..ServeOptions::default()
            };
            serve_with(&disk, endpoint.channel(), endpoint.buffer(), serving)
        });
        let endpoint = Guest::new("disk")
            .with_config(config())
            .connect_stream(b)
            .unwrap();
        let err = host.join().unwrap().unwrap_err();
        assert!(matches!(err, DiskError::IoUring(_)), "{err}");
        // The guest finds the channel closed, not a host that never answers.
        let (channel, memory) = endpoint.into_parts();
        assert!(DiskClient::new(channel, memory.buffer()).is_err());
    }
}

/// A disk image of 8 MiB (its path and contents kept in the returned scratch and model)
/// served with one I/O thread, and a connected guest.
fn one_worker(name: &str) -> (Scratch, Vec<u8>, DiskClient, Host) {
    let scratch = Scratch::new(name);
    let (path, model) = scratch.image(8 << 20);
    let serving = ServeOptions {
        io_threads: 1,
        ..ServeOptions::default()
    };
    let (disk, host) = connect_with(&path, DiskOptions::default(), serving);
    (scratch, model, disk, host)
}

#[test]
fn a_lone_large_read_is_not_handed_to_a_worker() {
    // At depth 1 the serving thread would only wait for the worker it woke: it moves
    // each read itself.
    let (_scratch, model, mut disk, host) = one_worker("lone");
    let buffers = disk.buffers();
    let len = 1 << 20;
    let mut got = vec![0u8; len];
    for i in 0..8u64 {
        let id = disk
            .submit_read(i * 2048, buffers.start..buffers.start + len, Wait::Forever)
            .unwrap();
        let done = disk.reap(Wait::Forever).unwrap();
        assert_eq!(done.id, id);
        done.result().unwrap();
        disk.area().read(buffers.start, &mut got).unwrap();
        assert!(got == model[i as usize * len..][..len], "read {i}");
    }
    drop(disk);
    let stats = host.join().unwrap().unwrap();
    assert_eq!((stats.completed, stats.handed_over), (9, 0), "{stats:?}");
}

/// `rounds` rounds of `depth` 4 KiB reads submitted at once, then all reaped; every read
/// checked against the image. Returns the host's counts.
fn small_reads_in_rounds(name: &str, depth: usize, rounds: usize) -> ServeStats {
    let (_scratch, model, mut disk, host) = one_worker(name);
    let buffers = disk.buffers();
    let slot = |i: usize| buffers.start + i * 4096;
    let mut rng = Rng(0x2545f4914f6cdd1d);
    let mut got = vec![0u8; 4096];
    for _ in 0..rounds {
        // Each request's id, slot and sector.
        let mut open = Vec::with_capacity(depth);
        for i in 0..depth {
            let sector = rng.next() % ((8 << 20) / 512 - 8);
            let id = disk
                .submit_read(sector, slot(i)..slot(i) + 4096, Wait::Forever)
                .unwrap();
            open.push((id, i, sector as usize));
        }
        for _ in 0..depth {
            let done = disk.reap(Wait::Forever).unwrap();
            done.result().unwrap();
            let &(_, i, sector) = open.iter().find(|r| r.0 == done.id).unwrap();
            disk.area().read(slot(i), &mut got).unwrap();
            assert!(
                got == model[sector * 512..][..4096],
                "read at sector {sector}"
            );
        }
    }
    drop(disk);
    let stats = host.join().unwrap().unwrap();
    assert_eq!(stats.completed, (depth * rounds) as u64 + 1, "{stats:?}");
    stats
}

#[test]
fn a_guest_that_leaves_with_reads_queued_for_a_worker_ends_the_serving_cleanly() {
    let mut handed = 0;
    for round in 0..20u64 {
        let (_scratch, _, mut disk, host) = one_worker("leave-deep");
        let buffers = disk.buffers();
        // Small reads deep enough to be handed over, and large ones, then gone.
        for i in 0..48u64 {
            let len = if i % 4 == 3 { 65536 } else { 4096 };
            let at = buffers.start + i as usize * 65536;
            disk.submit_read((round * 977 + i * 131) % 16000, at..at + len, Wait::Forever)
                .unwrap();
        }
        drop(disk);
        // The host ends without an error; what a worker had not read when it found the
        // guest gone is dropped (a read for nobody), and nothing is refused.
        let stats = host.join().unwrap().unwrap();
        assert!(stats.completed <= 49 && stats.refused == 0, "{stats:?}");
        handed += stats.handed_over;
    }
    // The guest left while workers held some of its reads.
    assert!(handed > 0);
}

#[test]
fn small_reads_are_handed_over_only_from_a_deep_queue() {
    // Eight at a time never reach `DEEP_QUEUE` in one batch: the serving thread does them.
    const { assert!(vmlink_disk::DEEP_QUEUE > 8) };
    let shallow = small_reads_in_rounds("shallow", 8, 200);
    assert_eq!(shallow.handed_over, 0, "{shallow:?}");
    // Thirty-two submitted while the host wakes to the first: a batch takes more than
    // `DEEP_QUEUE` of them, and the workers move some. Whether a worker takes a hand-over
    // before the serving thread, finding the ring empty, takes it back is the scheduler's
    // choice (about one run in ten here, on two busy CPUs, the worker never won in 200
    // rounds), so up to five runs, and at least one must hand some over.
    let mut before = Vec::new();
    let deep = loop {
        let stats = small_reads_in_rounds(&format!("deep-{}", before.len()), 32, 200);
        if stats.handed_over > 0 || before.len() == 4 {
            break stats;
        }
        before.push(stats);
    };
    assert!(
        deep.handed_over > 0 && deep.handed_over < 32 * 200,
        "{deep:?} after {before:?}"
    );
}

fn queued_reads_and_writes(io_threads: usize, io_uring: u32) {
    let scratch = Scratch::new(&format!("queue-{io_threads}-{io_uring}"));
    let (path, mut model) = scratch.image(8 << 20);
    let serving = ServeOptions {
        io_threads,
        // Pinned, as a VMM would, when there are I/O threads.
        worker_cpu: (io_threads > 0).then(first_cpu),
        io_uring,
    };
    // One thread with positional I/O does requests in ring order; I/O threads and an
    // io_uring complete them in any order.
    let in_order = io_threads == 0 && io_uring == 0;
    let (mut disk, host) = connect_with(&path, DiskOptions::default(), serving);
    assert_eq!(disk.info().sectors, (8 << 20) / 512);
    let buffers = disk.buffers();
    // 32 slots of 128 KiB in the guest's half; each request uses its own.
    let slot = |i: usize| buffers.start + i * 131072;
    let mut rng = Rng(0x9e3779b97f4a7c15);
    // What each id is: (slot, sector, bytes, write?).
    let mut pending = std::collections::HashMap::new();
    let mut free: Vec<usize> = (0..32).collect();
    let (mut reads, mut writes) = (0, 0);
    let (mut read_bytes, mut written_bytes) = (0u64, 0u64);
    for _ in 0..3000 {
        while let Some(s) = free.pop() {
            // With I/O threads or an io_uring, requests in flight complete in any order,
            // as on a real multi-queue disk: keep them apart, so each has one right
            // answer. (On one thread they run in ring order; overlaps are kept in to test
            // that.)
            let (sector, sectors) = loop {
                // Up to 124 KiB: about half of them at least `WORKER_MIN_BYTES`, so
                // with I/O threads both the serving thread and the workers move reads.
                let sectors = 1 + (rng.next() % 248) as usize;
                let sector = rng.next() % (model.len() / 512 - sectors) as u64;
                let clear = pending.values().all(
                    |&(_, _, ps, pl, _): &(usize, usize, u64, usize, bool)| {
                        sector + sectors as u64 <= ps || ps + (pl / 512) as u64 <= sector
                    },
                );
                if in_order || clear {
                    break (sector, sectors);
                }
            };
            let len = sectors * 512;
            // Buffers at every sector offset inside a slot's first page.
            let start = slot(s) + (rng.next() % 8) as usize * 512;
            let write = rng.next().is_multiple_of(3);
            let id = if write {
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                disk.area().write(start, &data).unwrap();
                let at = sector as usize * 512;
                model[at..at + len].copy_from_slice(&data);
                writes += 1;
                written_bytes += len as u64;
                disk.submit_write(
                    sector,
                    start..start + len,
                    rng.next().is_multiple_of(8),
                    Wait::Forever,
                )
                .unwrap()
            } else {
                reads += 1;
                read_bytes += len as u64;
                disk.submit_read(sector, start..start + len, Wait::Forever)
                    .unwrap()
            };
            // Overlapping requests in flight would race on the model; keep writes apart by
            // waiting for everything before a write is modelled over a pending read.
            assert!(pending.insert(id, (s, start, sector, len, write)).is_none());
        }
        let done = disk.reap(Wait::Forever).unwrap();
        done.result().unwrap();
        let (s, start, sector, len, write) = pending.remove(&done.id).expect("a known id");
        if !write {
            let mut got = vec![0u8; len];
            disk.area().read(start, &mut got).unwrap();
            let at = sector as usize * 512;
            // A read overlapping a write still in flight may see either; only compare
            // what no pending write touches.
            let overlaps = pending.values().any(|&(_, _, ws, wl, w)| {
                w && ws as usize * 512 < at + len && at < ws as usize * 512 + wl
            });
            if !overlaps && got != model[at..at + len] {
                let first = got.iter().zip(&model[at..]).position(|(a, b)| a != b);
                panic!("read of {len} bytes at sector {sector}: first difference at {first:?}");
            }
        }
        free.push(s);
    }
    while disk.in_flight() > 0 {
        disk.reap(Wait::Forever).unwrap().result().unwrap();
    }
    disk.flush().unwrap();
    drop(disk);
    let stats = host.join().unwrap().unwrap();
    assert!(
        reads > 1000 && writes > 500,
        "{reads} reads, {writes} writes"
    );
    assert_eq!(stats.refused, 0);
    if io_threads > 0 {
        // Workers took large reads, and the serving thread kept some to itself (the
        // writes, the small reads, what it found last in the ring).
        assert!(
            stats.handed_over > 100 && stats.handed_over < reads,
            "{stats:?}"
        );
    } else {
        assert_eq!(stats.handed_over, 0);
    }
    // Every request counted once, whichever thread moved it (the info query, the flush).
    assert_eq!(stats.completed, reads + writes + 2, "{stats:?}");
    assert_eq!(
        (stats.bytes_read, stats.bytes_written),
        (read_bytes, written_bytes)
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        model,
        "the image is what was written"
    );
    assert!(
        stats.batches < stats.completed,
        "some batches held several requests: {stats:?}"
    );
}

#[test]
fn blocking_calls_cross_the_bounce_buffer_and_check_their_arguments() {
    let scratch = Scratch::new("blocking");
    let (path, mut model) = scratch.image(4 << 20);
    let (mut disk, host) = connect(&path, DiskOptions::default());
    // 2.5 MiB: three trips through the 1 MiB bounce buffer.
    let data: Vec<u8> = (0..5 * 512 * 1024)
        .map(|i| (i / 512) as u8 ^ 0x3c)
        .collect();
    disk.write(100, &data).unwrap();
    model[100 * 512..100 * 512 + data.len()].copy_from_slice(&data);
    let mut back = vec![0u8; data.len() + 1024];
    disk.read(99, &mut back).unwrap();
    assert!(
        back == model[99 * 512..99 * 512 + back.len()],
        "read back differs"
    );
    // Discard: zeros afterwards (hole punching on this file system).
    disk.discard(200, 16).unwrap();
    model[200 * 512..216 * 512].fill(0);
    let mut hole = vec![1u8; 16 * 512];
    disk.read(200, &mut hole).unwrap();
    assert!(hole.iter().all(|&b| b == 0));
    // Arguments the client refuses before sending anything.
    let sectors = disk.info().sectors;
    assert!(matches!(
        disk.read(sectors, &mut [0; 512]),
        Err(DiskError::OutOfRange { .. })
    ));
    assert!(matches!(
        disk.write(0, &[0; 100]),
        Err(DiskError::Invalid(_))
    ));
    let b = disk.buffers();
    assert!(matches!(
        disk.submit_read(0, b.start + 1..b.start + 513, Wait::Now),
        Err(DiskError::Invalid(_))
    ));
    let half_end = disk.area().len();
    assert!(matches!(
        disk.submit_read(0, half_end - 512..half_end + 512, Wait::Now),
        Err(DiskError::Invalid(_))
    ));
    assert!(matches!(
        disk.submit_read(0, b.start..b.start + (2 << 20), Wait::Now),
        Err(DiskError::Invalid(_))
    ));
    // A blocking call while a queued request is in flight.
    let id = disk
        .submit_read(0, b.start..b.start + 512, Wait::Forever)
        .unwrap();
    assert!(matches!(
        disk.flush(),
        Err(DiskError::Busy { in_flight: 1 })
    ));
    assert_eq!(disk.reap(Wait::Forever).unwrap().id, id);
    drop(disk);
    host.join().unwrap().unwrap();
    assert!(std::fs::read(&path).unwrap() == model, "the image differs");
}

/// The payload and ranges of a raw request, sent past the client's checks.
fn raw(disk: &DiskClient, header: RequestHeader, ranges: Option<&[GpaRange<'_>]>) -> u64 {
    match ranges {
        Some(r) => disk
            .channel()
            .start_gpa_request(r, &header.encode(), Wait::Forever)
            .unwrap(),
        None => disk
            .channel()
            .start_request(&header.encode(), Wait::Forever)
            .unwrap(),
    }
}

/// The status of the next completion, which must be for `id`.
fn status_of(disk: &mut DiskClient, id: u64) -> Status {
    let done = disk.reap(Wait::Forever).unwrap();
    assert_eq!(done.id, id);
    done.completion.status
}

#[test]
fn bad_requests_get_error_completions_and_change_nothing() {
    bad_requests(ServeOptions::default());
}

#[test]
fn bad_requests_through_io_uring_get_error_completions_and_change_nothing() {
    bad_requests(through_io_uring());
}

fn bad_requests(serving: ServeOptions) {
    let scratch = Scratch::new(&format!("bad-{}", serving.io_uring));
    let (path, model) = scratch.image(1 << 20);
    let (mut disk, host) = connect_with(&path, DiskOptions::default(), serving);
    let b = disk.buffers();
    let page = (b.start / 4096) as u64;
    disk.area().write(b.start, &[0xee; 8192]).unwrap();
    let pages = [page, page + 1];
    let two = [GpaRange {
        byte_offset: 0,
        byte_count: 8192,
        pages: &pages,
    }];
    let write = |sector, sectors| RequestHeader::new(Op::Write, sector, sectors);
    let sectors = disk.info().sectors;
    let host_page = [0u64];
    let cases: Vec<(RequestHeader, Option<Vec<GpaRange<'_>>>, Status)> = vec![
        // Past the end, and straddling it.
        (write(sectors, 16), Some(two.to_vec()), Status::OutOfRange),
        (
            write(sectors - 8, 16),
            Some(two.to_vec()),
            Status::OutOfRange,
        ),
        (
            write(u64::MAX - 3, 16),
            Some(two.to_vec()),
            Status::OutOfRange,
        ),
        // The ranges hold fewer or more bytes than the sectors.
        (write(0, 15), Some(two.to_vec()), Status::BadBuffer),
        (write(0, 17), Some(two.to_vec()), Status::BadBuffer),
        // A buffer in the host's half of the area.
        (
            write(0, 8),
            Some(vec![GpaRange {
                byte_offset: 0,
                byte_count: 4096,
                pages: &host_page,
            }]),
            Status::BadBuffer,
        ),
        // Misaligned offset and size.
        (
            write(0, 1),
            Some(vec![GpaRange {
                byte_offset: 8,
                byte_count: 512,
                pages: &pages[..1],
            }]),
            Status::Misaligned,
        ),
        (
            write(0, 1),
            Some(vec![GpaRange {
                byte_offset: 0,
                byte_count: 520,
                pages: &pages[..1],
            }]),
            Status::Misaligned,
        ),
        // Lengths, ops, packet kinds, flags.
        (write(0, 0), Some(two.to_vec()), Status::BadLength),
        (
            RequestHeader {
                op: 77,
                ..write(0, 16)
            },
            Some(two.to_vec()),
            Status::UnknownOp,
        ),
        (
            RequestHeader {
                op: 0,
                ..write(0, 16)
            },
            Some(two.to_vec()),
            Status::UnknownOp,
        ),
        (write(0, 16), None, Status::Malformed),
        (
            RequestHeader::new(Op::Flush, 0, 0),
            Some(two.to_vec()),
            Status::Malformed,
        ),
        (
            RequestHeader {
                flags: 0x80,
                ..write(0, 16)
            },
            Some(two.to_vec()),
            Status::Malformed,
        ),
        (
            RequestHeader {
                flags: FLAG_FUA,
                ..RequestHeader::new(Op::Read, 0, 16)
            },
            Some(two.to_vec()),
            Status::Malformed,
        ),
        (
            RequestHeader::new(Op::Discard, sectors, 1),
            None,
            Status::OutOfRange,
        ),
        (
            RequestHeader::new(Op::Discard, 0, 4096),
            None,
            Status::BadLength,
        ),
    ];
    for (header, ranges, want) in &cases {
        let id = raw(&disk, *header, ranges.as_deref());
        assert_eq!(status_of(&mut disk, id), *want, "{header:?}");
    }
    // Payloads of the wrong length or with reserved bytes set.
    for payload in [&[1u8; 8][..], &[0u8; 24], &{
        let mut b = write(0, 16).encode();
        b[3] = 1;
        b
    }] {
        let id = disk
            .channel()
            .start_gpa_request(&two, payload, Wait::Forever)
            .unwrap();
        assert_eq!(status_of(&mut disk, id), Status::Malformed);
    }
    // A packet that asks for no completion is ignored; the channel goes on.
    let packet = OutgoingPacket {
        meta: PacketMeta {
            packet_type: PacketType::InBand,
            flags: 0,
            transaction_id: 7,
        },
        header: &[],
        payload: Payload::Bytes(&write(0, 16).encode()),
    };
    disk.channel().send_packet(&packet, Wait::Forever).unwrap();
    let mut back = vec![0u8; 1 << 20];
    disk.read(0, &mut back).unwrap();
    assert!(back == model, "a refused request changed the image");
    drop(disk);
    let stats = host.join().unwrap().unwrap();
    assert_eq!(stats.refused, cases.len() as u64 + 3);
    assert_eq!((stats.ignored, stats.bytes_written), (1, 0));
}

#[test]
fn a_page_past_the_buffer_area_fails_the_channel_not_the_host() {
    let scratch = Scratch::new("past");
    let (path, model) = scratch.image(1 << 20);
    let (disk, host) = connect(&path, DiskOptions::default());
    let beyond = [disk.area().pages()];
    let ranges = [GpaRange {
        byte_offset: 0,
        byte_count: 4096,
        pages: &beyond,
    }];
    // The guest's own channel refuses to send it...
    let header = RequestHeader::new(Op::Write, 0, 8).encode();
    assert!(matches!(
        disk.channel()
            .start_gpa_request(&ranges, &header, Wait::Forever),
        Err(ChannelError::InvalidPacket(_))
    ));
    drop(disk);
    host.join().unwrap().unwrap();
    assert!(std::fs::read(&path).unwrap() == model, "the image differs");
}

#[test]
fn a_read_only_disk_refuses_writes_and_discards_and_serves_reads() {
    let scratch = Scratch::new("ro");
    let (path, model) = scratch.image(1 << 20);
    let options = DiskOptions {
        read_only: true,
        ..DiskOptions::default()
    };
    let (mut disk, host) = connect(&path, options);
    assert!(disk.info().read_only && !disk.info().discard);
    let err = disk.write(0, &[1; 512]).unwrap_err();
    assert!(
        matches!(
            err,
            DiskError::Refused {
                status: Status::ReadOnly,
                ..
            }
        ),
        "{err}"
    );
    let err = disk.discard(0, 8).unwrap_err();
    assert!(
        matches!(
            err,
            DiskError::Refused {
                status: Status::ReadOnly,
                ..
            }
        ),
        "{err}"
    );
    let mut back = vec![0u8; 1 << 20];
    disk.read(0, &mut back).unwrap();
    assert!(back == model, "read back differs");
    disk.flush().unwrap();
    drop(disk);
    host.join().unwrap().unwrap();
}

#[test]
fn a_guest_that_leaves_mid_request_finds_every_completed_write_in_the_image() {
    leave_mid_request(ServeOptions::default());
}

#[test]
fn a_guest_that_leaves_mid_request_through_io_uring_finds_every_completed_write_too() {
    leave_mid_request(through_io_uring());
}

fn leave_mid_request(serving: ServeOptions) {
    let scratch = Scratch::new(&format!("leave-{}", serving.io_uring));
    let (path, mut model) = scratch.image(4 << 20);
    let (mut disk, host) = connect_with(&path, DiskOptions::default(), serving);
    let b = disk.buffers();
    let mut completed = Vec::new();
    let mut submitted = std::collections::HashMap::new();
    // 64 writes of 64 KiB, each to its own place with its own byte; reap half and leave.
    for i in 0..64usize {
        let start = b.start + (i % 32) * 65536;
        if i >= 32 {
            let done = disk.reap(Wait::Forever).unwrap();
            done.result().unwrap();
            completed.push(submitted.remove(&done.id).unwrap());
        }
        disk.area().write(start, &[i as u8 + 1; 65536]).unwrap();
        let id = disk
            .submit_write(i as u64 * 128, start..start + 65536, false, Wait::Forever)
            .unwrap();
        submitted.insert(id, i);
    }
    drop(disk);
    host.join().unwrap().unwrap();
    let image = std::fs::read(&path).unwrap();
    for i in completed {
        model[i * 65536..(i + 1) * 65536].fill(i as u8 + 1);
        assert_eq!(
            image[i * 65536..(i + 1) * 65536],
            model[i * 65536..(i + 1) * 65536],
            "write {i}"
        );
    }
    // Writes the guest never saw complete are whole or absent, never torn between writes.
    for &i in submitted.values() {
        let got = &image[i * 65536..(i + 1) * 65536];
        let mine = got.iter().all(|&b| b == i as u8 + 1);
        assert!(
            mine || got == &model[i * 65536..(i + 1) * 65536],
            "write {i} is torn"
        );
    }
}

#[test]
fn opening_refuses_what_is_not_a_disk() {
    let scratch = Scratch::new("open");
    let err = Disk::open(scratch.0.join("missing.img"), DiskOptions::default()).unwrap_err();
    assert!(matches!(err, DiskError::Open { .. }), "{err}");
    assert!(err.to_string().contains("missing.img"), "{err}");
    let tiny = scratch.0.join("tiny.img");
    std::fs::write(&tiny, [0u8; 511]).unwrap();
    assert!(matches!(
        Disk::open(&tiny, DiskOptions::default()),
        Err(DiskError::TooSmall { len: 511 })
    ));
    assert!(matches!(
        Disk::open(&scratch.0, DiskOptions::default()),
        Err(DiskError::Open { .. })
    ));
    // A size that is not whole sectors: the tail is not part of the disk.
    let odd = scratch.0.join("odd.img");
    let file = File::create(&odd).unwrap();
    file.write_all_at(&[7; 1000], 0).unwrap();
    assert_eq!(
        Disk::open(&odd, DiskOptions::default())
            .unwrap()
            .info()
            .sectors,
        1
    );
}

#[test]
fn sub_channels_each_carry_their_own_requests_and_one_closing_leaves_the_rest() {
    use vmlink_disk::{DEFAULT_LAYOUT, service_with};
    let scratch = Scratch::new("set");
    let (path, mut model) = scratch.image(8 << 20);
    let (a, b) = UnixStream::pair().unwrap();
    let image = path.clone();
    // The host serves the primary and two sub-channels, each on a thread of its own.
    let host = thread::spawn(move || -> Result<Vec<ServeStats>, DiskError> {
        let disk = std::sync::Arc::new(Disk::open(&image, DiskOptions::default())?);
        let set = service_with("disk", DEFAULT_LAYOUT, 2)
            .serve_stream(a)?
            .into_set();
        let servers: Vec<_> = set
            .into_channels()
            .map(|(_, endpoint)| {
                let disk = std::sync::Arc::clone(&disk);
                thread::spawn(move || serve(&disk, endpoint.channel(), endpoint.buffer()))
            })
            .collect();
        servers.into_iter().map(|s| s.join().unwrap()).collect()
    });
    let mut endpoint = Guest::new("disk")
        .with_config(config())
        .with_sub_channels(4)
        .connect_stream(b)
        .unwrap();
    let subs = endpoint.take_sub_channels();
    assert_eq!(subs.len(), 2, "the host offers two");
    let half = endpoint.buffer().guest_pages();
    let (start, third) = (
        half.start as usize * 4096,
        (half.end - half.start) as usize / 3 * 4096,
    );
    // Three clients, each with a third of the guest's half, each writing its own region
    // of the disk from its own thread, 16 requests in flight.
    let clients: Vec<DiskClient> = std::iter::once(endpoint)
        .chain(subs)
        .enumerate()
        .map(|(i, ep)| {
            let (channel, memory) = ep.into_parts();
            let mine = start + i * third..start + (i + 1) * third;
            DiskClient::with_buffers(channel, memory.buffer(), mine).unwrap()
        })
        .collect();
    let region = 2 << 20;
    let writers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut disk)| {
            thread::spawn(move || {
                let b = disk.buffers();
                for round in 0..(region / 65536 / 16) {
                    for slot in 0..16 {
                        let at = b.start + slot * 65536;
                        disk.area()
                            .write(at, &[(i * 50 + slot) as u8 + 1; 65536])
                            .unwrap();
                        let sector = ((i * region + (round * 16 + slot) * 65536) / 512) as u64;
                        disk.submit_write(sector, at..at + 65536, false, Wait::Forever)
                            .unwrap();
                    }
                    for _ in 0..16 {
                        disk.reap(Wait::Forever).unwrap().result().unwrap();
                    }
                }
                disk.flush().unwrap();
                (i, disk)
            })
        })
        .collect();
    let mut clients: Vec<(usize, DiskClient)> =
        writers.into_iter().map(|w| w.join().unwrap()).collect();
    for i in 0..3 {
        for chunk in 0..region / 65536 {
            let at = i * region + chunk * 65536;
            model[at..at + 65536].fill((i * 50 + chunk % 16) as u8 + 1);
        }
    }
    // Sub-channel 1 closes; the primary and sub-channel 2 still read everything back.
    drop(clients.remove(1));
    for (_, disk) in &mut clients {
        let mut back = vec![0u8; 1 << 20];
        for at in (0..8 << 20).step_by(1 << 20) {
            disk.read((at / 512) as u64, &mut back).unwrap();
            assert!(back == model[at..at + (1 << 20)], "read back at {at}");
        }
    }
    drop(clients);
    let stats = host.join().unwrap().unwrap();
    assert_eq!(stats.len(), 3);
    for s in &stats {
        assert!(
            s.bytes_written >= region as u64,
            "every channel carried its writes: {stats:?}"
        );
    }
    assert!(std::fs::read(&path).unwrap() == model, "the image differs");
}

#[test]
fn direct_io_bypasses_the_page_cache_and_keeps_every_byte() {
    direct_io(ServeOptions::default());
}

/// O_DIRECT through io_uring: what a VMM serving a real disk runs.
#[test]
fn direct_io_through_io_uring_keeps_every_byte() {
    direct_io(through_io_uring());
}

fn direct_io(serving: ServeOptions) {
    // On the temp directory's file system (a disk here), with O_DIRECT.
    let dir = std::env::temp_dir().join(format!(
        "vmlink-disk-direct-{}-{}",
        serving.io_uring,
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.img");
    let mut model: Vec<u8> = (0..4 << 20)
        .map(|i: u32| (i / 4096) as u8 ^ (i as u8))
        .collect();
    std::fs::write(&path, &model).unwrap();
    let options = DiskOptions {
        direct: true,
        ..DiskOptions::default()
    };
    let (mut disk, host) = connect_with(&path, options, serving);
    // Page-aligned buffers and whole pages: what every device takes directly.
    let b = disk.buffers();
    for i in 0..16usize {
        let at = b.start + i * 65536;
        disk.area().write(at, &[i as u8 + 1; 65536]).unwrap();
        disk.submit_write(i as u64 * 256, at..at + 65536, i == 15, Wait::Forever)
            .unwrap();
        model[i * 131072..i * 131072 + 65536].fill(i as u8 + 1);
    }
    for _ in 0..16 {
        disk.reap(Wait::Forever).unwrap().result().unwrap();
    }
    disk.flush().unwrap();
    let mut back = vec![0u8; 4 << 20];
    disk.read(0, &mut back).unwrap();
    assert!(back == model, "read back differs");
    // A buffer on a 512-byte boundary inside a page: done, or refused by a device with
    // larger blocks as an I/O error carrying EINVAL, never wrong data.
    let at = b.start + 512;
    let id = disk.submit_read(8, at..at + 512, Wait::Forever).unwrap();
    let done = disk.reap(Wait::Forever).unwrap();
    assert_eq!(done.id, id);
    match done.completion.status {
        Status::Ok => {
            let mut got = [0u8; 512];
            disk.area().read(at, &mut got).unwrap();
            assert!(got[..] == model[4096..4608]);
        }
        Status::Io => assert_eq!(done.completion.detail, 22, "EINVAL"),
        other => panic!("{other:?}"),
    }
    drop(disk);
    host.join().unwrap().unwrap();
    assert!(std::fs::read(&path).unwrap() == model, "the image differs");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn reaping_many_at_once_takes_every_completion_waiting_and_checks_its_room() {
    let scratch = Scratch::new("reap-many");
    let (path, model) = scratch.image(1 << 20);
    let (mut disk, host) = connect(&path, DiskOptions::default());
    let empty = Done {
        id: 0,
        completion: Completion::OK,
    };
    let mut done = [empty; 32];
    // Nothing in flight: nothing waits, and no room is an error, not a wait.
    assert_eq!(disk.reap_into(&mut done, Wait::Now).unwrap(), 0);
    assert!(matches!(
        disk.reap_into(&mut [], Wait::Now),
        Err(DiskError::Invalid(_))
    ));
    let base = disk.buffers().start;
    let mut ids = std::collections::HashMap::new();
    for i in 0..16usize {
        let sector = (i as u64 * 37) % 2040;
        let buffer = base + i * 4096..base + (i + 1) * 4096;
        let id = disk.submit_read(sector, buffer, Wait::Forever).unwrap();
        ids.insert(id, (i, sector));
    }
    // The host answers 16 small reads in far less than this: all wait, and one reap
    // with room for them takes them all, in the order they were completed.
    thread::sleep(std::time::Duration::from_millis(300));
    let n = disk.reap_into(&mut done, Wait::Now).unwrap();
    assert_eq!((n, disk.in_flight()), (16, 0));
    for d in &done[..n] {
        d.result().unwrap();
        let (i, sector) = ids.remove(&d.id).expect("a submitted id, once");
        let mut got = vec![0u8; 4096];
        disk.area().read(base + i * 4096, &mut got).unwrap();
        assert!(got == model[sector as usize * 512..][..4096], "read {i}");
    }
    assert!(ids.is_empty());
    // Less room than completions: they come out over several reaps.
    for i in 0..6usize {
        let buffer = base + i * 4096..base + (i + 1) * 4096;
        disk.submit_read(i as u64, buffer, Wait::Forever).unwrap();
    }
    let mut reaped = 0;
    while disk.in_flight() > 0 {
        let n = disk.reap_into(&mut done[..4], Wait::Forever).unwrap();
        assert!((1..=4).contains(&n), "{n}");
        reaped += n;
    }
    assert_eq!(reaped, 6);
    drop(disk);
    assert_eq!(host.join().unwrap().unwrap().completed, 1 + 16 + 6);
}

#[test]
fn a_host_that_sends_a_stray_packet_among_completions_is_a_bad_reply_after_them() {
    let (a, b) = UnixStream::pair().unwrap();
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let host = thread::spawn(move || {
        let endpoint = service("disk").serve_stream(a).unwrap();
        let channel = endpoint.channel();
        let mut buf = [0u8; 256];
        // The geometry, as a real host gives it.
        let info = channel.recv(&mut buf, Wait::Forever).unwrap();
        let geometry = DiskInfo {
            sectors: 2048,
            read_only: false,
            discard: false,
            max_transfer: 1 << 20,
        }
        .encode();
        let reply = OutgoingPacket::completion_slice(info.transaction_id, &geometry);
        channel.send_packet(&reply, Wait::Forever).unwrap();
        // Three reads: two completed, then a packet no host sends a guest, then the
        // third completed.
        let mut tids = Vec::new();
        for _ in 0..3 {
            tids.push(
                channel
                    .recv(&mut buf, Wait::Forever)
                    .unwrap()
                    .transaction_id,
            );
        }
        let ok = Completion::OK.encode();
        let stray = [0u8; 16];
        for (i, tid) in tids.into_iter().enumerate() {
            if i == 2 {
                let packet = OutgoingPacket::in_band_slice(&stray);
                channel.send_packet(&packet, Wait::Forever).unwrap();
            }
            let reply = OutgoingPacket::completion_slice(tid, &ok);
            channel.send_packet(&reply, Wait::Forever).unwrap();
        }
        sent_tx.send(()).unwrap();
        // Until the guest has gone.
        while channel.recv(&mut buf, Wait::Forever).is_ok() {}
    });
    let endpoint = Guest::new("disk")
        .with_config(config())
        .connect_stream(b)
        .unwrap();
    let (channel, memory) = endpoint.into_parts();
    let mut disk = DiskClient::new(channel, memory.buffer()).unwrap();
    let base = disk.buffers().start;
    let first = disk
        .submit_read(0, base..base + 4096, Wait::Forever)
        .unwrap();
    let second = disk
        .submit_read(8, base + 4096..base + 8192, Wait::Forever)
        .unwrap();
    let third = disk
        .submit_read(16, base + 8192..base + 12288, Wait::Forever)
        .unwrap();
    sent_rx.recv().unwrap();
    let mut done = [Done {
        id: 0,
        completion: Completion::OK,
    }; 8];
    // The completions before and after the stray packet are not lost to its error...
    let n = disk.reap_into(&mut done, Wait::Forever).unwrap();
    let ids: Vec<u64> = done[..n].iter().map(|d| d.id).collect();
    assert_eq!(ids, [first, second, third]);
    assert_eq!(disk.in_flight(), 0);
    // ...which the next reap reports, once.
    assert!(matches!(
        disk.reap_into(&mut done, Wait::Now),
        Err(DiskError::BadReply)
    ));
    assert_eq!(disk.reap_into(&mut done, Wait::Now).unwrap(), 0);
    drop(disk);
    host.join().unwrap();
}
