//! `vmlink disk bench`: the disk beside qemu-nbd and the host's own pread/pwrite.
//!
//! One image in a tmpfs, so the device is measured, not the disk. Three systems run the
//! same cases in interleaved rounds (the order rotating each round), and each round's
//! ratios are taken before the medians:
//! - vmlink: `vmlink-disk` over a vmlink-shm channel in blocking mode (spin, then sleep on
//!   the doorbell), its host serving on a thread pinned to CPU 0 and its I/O thread
//!   (`--io-threads`, 1 by default) pinned to CPU 1 beside the guest, whose spin while it
//!   waits gives that CPU away every 16 looks (`--guest-spin-yield`), so the I/O thread
//!   runs when it has work instead of when the scheduler preempts the spin.
//! - qemu-nbd: `qemu-nbd` serving the image on a Unix socket (pinned to CPU 0), driven by
//!   vmlink-nbd's client on CPU 1 with the same queue depth; `qemu-img bench` over
//!   `nbd+unix` runs the same case once as a cross-check, and the better of the two is
//!   what vmlink is compared with, so a slow client cannot flatter the ratio.
//! - floor: this process's own `pread` / `pwrite` on the image: one thread at depth 1, at
//!   depth 8 and 32 the fastest across the rounds of that many threads, two (this
//!   machine's CPUs) and one io_uring kept that deep (reported as 0 threads, "ur" in the
//!   table); like the guest, each moves data through a distinct buffer per request in
//!   flight, and each thread reads and writes through its own open file of the image (as
//!   fio's jobs do), not one shared by all.
//!
//! The image holds a known pattern (each 512-byte sector starts with its own number), and
//! writes write that same pattern, so every read can be checked: a sample of them is, in
//! every system.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use clap::Args;
use nix::sched::{CpuSet, sched_setaffinity};
use nix::time::{ClockId, clock_gettime};
use nix::unistd::Pid;
use vmlink_channel::Wait;
use vmlink_disk::proto::Completion;
use vmlink_disk::{
    Disk, DiskClient, DiskError, DiskOptions, Done, ServeOptions, ServeStats, serve_with,
};
use vmlink_nbd::{ImgBench, NbdClient, QemuNbd, QemuNbdOptions, qemu_img_bench};
use vmlink_shm::{Endpoint, Guest, Layout};

use crate::error::{Context, Result, fail};

/// Options of `vmlink disk bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Interleaved rounds (medians are taken across them).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds each system runs each case in each round.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// The image's size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Where the image is made (a tmpfs, so the device is measured rather than a disk).
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// A short run of every case (one round of 50 ms each on a 64 MiB image), for tests.
    #[arg(long)]
    smoke: bool,
    /// Only these cases (repeatable): 4k-randread, 4k-randwrite, 1m-seqread, 1m-seqwrite.
    #[arg(long = "case", value_name = "NAME", value_parser = ["4k-randread", "4k-randwrite", "1m-seqread", "1m-seqwrite"])]
    only: Vec<String>,
    /// Only these queue depths (repeatable): 1, 8, 32.
    #[arg(long = "depth", value_name = "N", value_parser = clap::builder::PossibleValuesParser::new(["1", "8", "32"]))]
    depths: Vec<String>,
    /// Only these systems (repeatable; for profiling one): vmlink, two-channels, qemu-nbd,
    /// floor. Ratios need both of their systems.
    #[arg(long = "system", value_name = "NAME", value_parser = ["vmlink", "two-channels", "qemu-nbd", "floor"])]
    systems: Vec<String>,
    /// I/O threads per channel on vmlink's host, pinned beside the guest (0: the channel's
    /// own thread moves all the data).
    #[arg(long, value_name = "N", default_value_t = 1)]
    io_threads: usize,
    /// Move vmlink's data through one io_uring this deep per channel instead of
    /// positional I/O (and no I/O threads). On a tmpfs image the kernel hands each queued
    /// transfer to a worker of its own, so this measures that path, not a faster one.
    #[arg(long, value_name = "DEPTH", default_value_t = 0, conflicts_with = "io_threads",
          value_parser = clap::value_parser!(u32).range(0..=4096))]
    io_uring: u32,
    /// Every how many looks vmlink's guest gives its CPU away while it spins waiting for
    /// completions, when it shares that CPU with the host's I/O thread (or, with two
    /// channels, with the other channel's host); 0: never. Measured here, 16 lifted both
    /// 4 KiB random reads and 1 MiB reads at depth 32 (README.md).
    #[arg(long, value_name = "LOOKS", default_value_t = 16)]
    guest_spin_yield: u32,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// One workload.
#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    block: usize,
    random: bool,
    write: bool,
    depth: usize,
}

fn cases() -> Vec<Case> {
    let mut all = Vec::new();
    for (name, block, random, write) in [
        ("4k-randread", 4096, true, false),
        ("4k-randwrite", 4096, true, true),
        ("1m-seqread", 1 << 20, false, false),
        ("1m-seqwrite", 1 << 20, false, true),
    ] {
        for depth in [1, 8, 32] {
            all.push(Case {
                name,
                block,
                random,
                write,
                depth,
            });
        }
    }
    all
}

/// What one system did in one case.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    ops: u64,
    secs: f64,
    cpu_ns: u64,
    /// Doorbells rung both ways (vmlink only).
    doorbells: u64,
    /// Reads whose data was checked.
    checked: u64,
    /// Floor: the thread count that was faster.
    threads: usize,
}

impl Sample {
    fn iops(&self) -> f64 {
        self.ops as f64 / self.secs
    }
}

const SEED: u64 = 0x766d_6c69_6e6b_6469;
const FILLER: u8 = 0xa5;

/// The first 8 bytes of the sector at byte `offset` on the disk.
fn stamp(offset: u64) -> [u8; 8] {
    ((offset / 512) ^ SEED).to_le_bytes()
}

/// Fills `buf` with what the disk holds at `offset`.
fn fill(buf: &mut [u8], offset: u64) {
    for (i, sector) in buf.chunks_mut(512).enumerate() {
        sector.fill(FILLER);
        sector[..8].copy_from_slice(&stamp(offset + i as u64 * 512));
    }
}

/// Stamps `buf` (already filled) for `offset`.
fn restamp(buf: &mut [u8], offset: u64) {
    for (i, sector) in buf.chunks_mut(512).enumerate() {
        sector[..8].copy_from_slice(&stamp(offset + i as u64 * 512));
    }
}

/// Whether `buf` holds what the disk holds at `offset`.
fn holds(buf: &[u8], offset: u64) -> bool {
    // Word-wise and without an early exit inside a sector, so the compiler vectorizes it:
    // a byte-by-byte check of a 1 MiB read cost more than the read itself.
    let filler = u64::from_ne_bytes([FILLER; 8]);
    buf.chunks(512).enumerate().all(|(i, sector)| {
        let words = sector[8..].chunks_exact(8);
        let whole = words.remainder().is_empty();
        let differ = words
            .map(|w| u64::from_ne_bytes(w.try_into().unwrap_or_default()) ^ filler)
            .fold(0, |acc, x| acc | x);
        whole && differ == 0 && sector[..8] == stamp(offset + i as u64 * 512)
    })
}

/// [`holds`] for the `len` bytes at byte `at` of the buffer area, read in place (the
/// floor checks its own buffers in place too, so neither pays a copy for its check).
fn holds_in_area(words: &[AtomicU64], at: usize, len: usize, offset: u64) -> bool {
    let filler = u64::from_ne_bytes([FILLER; 8]);
    let Some(words) = words.get(at / 8..(at + len) / 8) else {
        return false;
    };
    at.is_multiple_of(512)
        && len.is_multiple_of(512)
        && words.chunks(64).enumerate().all(|(i, sector)| {
            let differ = sector[1..]
                .iter()
                .map(|w| w.load(Ordering::Relaxed) ^ filler)
                .fold(0, |acc, x| acc | x);
            differ == 0
                && sector[0].load(Ordering::Relaxed).to_ne_bytes() == stamp(offset + i as u64 * 512)
        })
}

/// Check one read in this many.
const CHECK_EVERY: u64 = 16;

/// Offsets for a case: random blocks, or one sequential stream shared by all slots.
struct Offsets {
    rng: u64,
    next: u64,
    blocks: u64,
    block: u64,
    random: bool,
}

impl Offsets {
    fn new(case: &Case, len: u64, seed: u64) -> Self {
        Self {
            rng: seed | 1,
            next: 0,
            blocks: len / case.block as u64,
            block: case.block as u64,
            random: case.random,
        }
    }

    fn next(&mut self) -> u64 {
        let block = if self.random {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.rng % self.blocks
        } else {
            let b = self.next;
            self.next = (self.next + 1) % self.blocks;
            b
        };
        block * self.block
    }
}

fn pin(cpu: usize) -> Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu).context("pinning")?;
    sched_setaffinity(Pid::from_raw(0), &set).context("pinning")
}

fn unpin() -> Result<()> {
    let mut set = CpuSet::new();
    for cpu in 0..CpuSet::count().min(1024) {
        let _ = set.set(cpu);
    }
    sched_setaffinity(Pid::from_raw(0), &set).context("unpinning")
}

/// This process's CPU time.
fn process_cpu() -> u64 {
    clock_gettime(ClockId::CLOCK_PROCESS_CPUTIME_ID)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Another process's CPU time: the sum over its threads of the kernel's run time.
fn tasks_cpu(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Pins every thread of a process to `cpu` (threads it makes later inherit it).
fn pin_process(pid: u32, cpu: usize) -> Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu).context("pinning")?;
    let tasks =
        std::fs::read_dir(format!("/proc/{pid}/task")).context("listing qemu-nbd's threads")?;
    for task in tasks.flatten() {
        if let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) {
            sched_setaffinity(Pid::from_raw(tid), &set).context("pinning qemu-nbd")?;
        }
    }
    Ok(())
}

// ---- vmlink ----------------------------------------------------------------------------

type Server = JoinHandle<std::result::Result<ServeStats, DiskError>>;

/// Bytes of the guest's half each channel's client gets: 32 buffers of 1 MiB and its
/// bounce buffer, rounded up.
const CLIENT_BUFFERS: usize = 34 << 20;

/// vmlink-disk over one channel, or a channel set: a host thread per channel (pinned to
/// CPU 0, 1, 0, ...), a guest client per channel (on the bench's thread, or with several
/// channels on threads pinned to CPU 1, 0, 1, ...).
struct Vmlink {
    clients: Vec<DiskClient>,
    hosts: Vec<Arc<Endpoint>>,
    servers: Vec<Server>,
    len: u64,
}

impl Vmlink {
    fn start(
        image: &Path,
        len: u64,
        channels: usize,
        io_threads: usize,
        io_uring: u32,
        spin_yield: u32,
    ) -> Result<Self> {
        let disk =
            Arc::new(Disk::open(image, DiskOptions::default()).context("opening the image")?);
        let subs = channels as u32 - 1;
        let layout = Layout::symmetric(256 * 1024, 2 * (channels * CLIENT_BUFFERS) as u64);
        let (a, b) = UnixStream::pair().context("a socket pair")?;
        let accept =
            thread::spawn(move || vmlink_disk::service_with("disk", layout, subs).serve_stream(a));
        let mut guest = Guest::new("disk").with_config(vmlink_disk::config());
        if subs > 0 {
            guest = guest.with_sub_channels(subs);
        }
        let mut endpoint = guest.connect_stream(b).context("connecting the guest")?;
        let host = match accept.join() {
            Ok(host) => host.context("the host's handshake")?,
            Err(_) => return fail("the host's handshake panicked"),
        };
        let mut hosts = Vec::new();
        let mut servers = Vec::new();
        for (i, ep) in host.into_set().into_channels() {
            let ep = Arc::new(ep);
            let (served, disk) = (Arc::clone(&ep), Arc::clone(&disk));
            servers.push(thread::spawn(move || {
                // The host's thread on CPU 0 (1, 0, ... for more channels), its I/O
                // threads on the other CPU, the guest's.
                let _ = pin(i % 2);
                let options = ServeOptions {
                    io_threads,
                    worker_cpu: Some(1 - i % 2),
                    io_uring,
                };
                serve_with(&disk, served.channel(), served.buffer(), options)
            }));
            hosts.push(ep);
        }
        let subs = endpoint.take_sub_channels();
        if subs.len() + 1 != channels {
            return fail("the host offered fewer sub-channels than asked");
        }
        let half = endpoint.buffer().guest_pages().start as usize * 4096;
        let mut clients = Vec::new();
        for (i, ep) in std::iter::once(endpoint).chain(subs).enumerate() {
            let (channel, memory) = ep.into_parts();
            let mine = half + i * CLIENT_BUFFERS..half + (i + 1) * CLIENT_BUFFERS;
            // A guest that shares its CPU with a busy host thread lets it run while it
            // waits (`Endpoint::set_spin_yield`).
            if io_threads > 0 || channels > 1 {
                channel.set_spin_yield(spin_yield);
            }
            clients.push(
                DiskClient::with_buffers(channel, memory.buffer(), mine)
                    .context("the disk's info")?,
            );
        }
        Ok(Self {
            clients,
            hosts,
            servers,
            len,
        })
    }

    fn doorbells(&self) -> u64 {
        let hosts: u64 = self
            .hosts
            .iter()
            .map(|h| h.channel().counters().signals_sent)
            .sum();
        let guests: u64 = self
            .clients
            .iter()
            .map(|c| c.channel().counters().signals_sent)
            .sum();
        hosts + guests
    }

    fn run(&mut self, case: &Case, secs: f64, seed: u64) -> Result<Sample> {
        let (bells, cpu, start) = (self.doorbells(), process_cpu(), Instant::now());
        let deadline = start + Duration::from_secs_f64(secs);
        let len = self.len;
        // The depth spread over the channels (depth 1 uses the first alone).
        let n = self.clients.len().min(case.depth);
        let mut sample = if n == 1 {
            drive(&mut self.clients[0], case, case.depth, len, deadline, seed)?
        } else {
            let results: Vec<Result<Sample>> = thread::scope(|s| {
                let workers: Vec<_> = self.clients[..n]
                    .iter_mut()
                    .enumerate()
                    .map(|(i, client)| {
                        let depth = case.depth / n + usize::from(i < case.depth % n);
                        s.spawn(move || {
                            pin(1 - i % 2)?;
                            drive(client, case, depth, len, deadline, seed + i as u64)
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .map(|w| w.join().unwrap_or_else(|_| fail("a guest thread panicked")))
                    .collect()
            });
            let mut total = Sample::default();
            for r in results {
                let r = r?;
                total.ops += r.ops;
                total.checked += r.checked;
            }
            total
        };
        sample.secs = start.elapsed().as_secs_f64();
        sample.cpu_ns = process_cpu() - cpu;
        sample.doorbells = self.doorbells() - bells;
        Ok(sample)
    }

    /// Closes every guest channel and waits for the hosts to finish; their stats summed.
    fn finish(&mut self) -> Result<ServeStats> {
        self.clients.clear();
        let mut total = ServeStats::default();
        for server in self.servers.drain(..) {
            match server.join() {
                Ok(stats) => {
                    let s = stats.context("the host")?;
                    total.completed += s.completed;
                    total.refused += s.refused;
                }
                Err(_) => return fail("the host's thread panicked"),
            }
        }
        Ok(total)
    }
}

/// One client's loop: `depth` requests in flight until `deadline`, then drained; reads
/// checked one in [`CHECK_EVERY`].
fn drive(
    client: &mut DiskClient,
    case: &Case,
    depth: usize,
    len: u64,
    deadline: Instant,
    seed: u64,
) -> Result<Sample> {
    let base = client.buffers().start;
    let slot = |i: usize| base + i * case.block;
    if slot(depth) > client.buffers().end + case.block {
        return fail("the buffer area is too small for this depth");
    }
    let mut buf = vec![0u8; case.block];
    let mut offsets = Offsets::new(case, len, seed);
    if case.write {
        fill(&mut buf, 0);
        for i in 0..depth {
            client
                .area()
                .write(slot(i), &buf)
                .context("the buffer area")?;
        }
    }
    // Each slot's request: (id, offset).
    let mut at = [(u64::MAX, 0u64); 64];
    let mut sample = Sample::default();
    for (i, entry) in at.iter_mut().enumerate().take(depth) {
        let offset = offsets.next();
        *entry = (submit(client, case, slot(i), offset)?, offset);
    }
    let mut open = depth;
    // What one reap took: every completion waiting, with one commit of the ring.
    let mut reaped = [Done {
        id: 0,
        completion: Completion::OK,
    }; 64];
    while open > 0 {
        let n = client
            .reap_into(&mut reaped[..open], Wait::Forever)
            .context("reaping")?;
        for done in &reaped[..n] {
            done.result().context("a request")?;
            let Some(i) = at[..depth].iter().position(|&(id, _)| id == done.id) else {
                return fail("a completion for no request");
            };
            sample.ops += 1;
            if !case.write && sample.ops.is_multiple_of(CHECK_EVERY) {
                if !holds_in_area(client.area().words(), slot(i), case.block, at[i].1) {
                    return fail(format!("vmlink read wrong data at offset {}", at[i].1));
                }
                sample.checked += 1;
            }
            if Instant::now() < deadline {
                let offset = offsets.next();
                at[i] = (submit(client, case, slot(i), offset)?, offset);
            } else {
                at[i].0 = u64::MAX;
                open -= 1;
            }
        }
    }
    Ok(sample)
}

fn submit(client: &mut DiskClient, case: &Case, slot: usize, offset: u64) -> Result<u64> {
    let range = slot..slot + case.block;
    let id = if case.write {
        // Word stores straight into the area, as the others stamp their private buffers.
        let words = client.area().words();
        for s in 0..case.block / 512 {
            let stamp = u64::from_le_bytes(stamp(offset + s as u64 * 512));
            words[(slot + s * 512) / 8].store(stamp, Ordering::Relaxed);
        }
        client.submit_write(offset / 512, range, false, Wait::Forever)
    } else {
        client.submit_read(offset / 512, range, Wait::Forever)
    };
    id.context("submitting")
}

// ---- qemu-nbd --------------------------------------------------------------------------

struct Nbd {
    server: QemuNbd,
    client: NbdClient,
    buffers: Vec<Vec<u8>>,
    len: u64,
}

impl Nbd {
    fn start(image: &Path, len: u64) -> Result<Self> {
        let options = QemuNbdOptions {
            // One connection for the client, one for qemu-img bench.
            shared: 2,
            ..QemuNbdOptions::default()
        };
        let server = QemuNbd::start(image, "disk", &options).context("starting qemu-nbd")?;
        pin_process(server.pid(), 0)?;
        let client = server.connect().context("connecting to qemu-nbd")?;
        if client.size() < len {
            return fail("qemu-nbd serves less than the image");
        }
        Ok(Self {
            server,
            client,
            buffers: (0..32).map(|_| vec![0u8; 1 << 20]).collect(),
            len,
        })
    }

    fn cpu(&self) -> u64 {
        process_cpu() + tasks_cpu(self.server.pid())
    }

    fn run(&mut self, case: &Case, secs: f64, seed: u64) -> Result<Sample> {
        let mut offsets = Offsets::new(case, self.len, seed);
        if case.write {
            for b in &mut self.buffers[..case.depth] {
                fill(&mut b[..case.block], 0);
            }
        }
        let mut at = [0u64; 64];
        let (cpu, start) = (self.cpu(), Instant::now());
        let deadline = start + Duration::from_secs_f64(secs);
        let mut sample = Sample::default();
        for (i, offset) in at.iter_mut().enumerate().take(case.depth) {
            *offset = offsets.next();
            self.submit(case, i, *offset)?;
        }
        let mut open = case.depth;
        let block = case.block;
        while open > 0 {
            let buffers = &mut self.buffers;
            let reply = self
                .client
                .reap(|handle| buffers.get_mut(handle as usize).map(|b| &mut b[..block]))
                .context("an NBD reply")?;
            if !reply.is_ok() {
                return fail(format!("qemu-nbd failed a request: {reply:?}"));
            }
            let i = reply.handle as usize;
            sample.ops += 1;
            if !case.write && sample.ops.is_multiple_of(CHECK_EVERY) {
                if !holds(&self.buffers[i][..block], at[i]) {
                    return fail(format!("qemu-nbd read wrong data at offset {}", at[i]));
                }
                sample.checked += 1;
            }
            if Instant::now() < deadline {
                at[i] = offsets.next();
                self.submit(case, i, at[i])?;
            } else {
                open -= 1;
            }
        }
        sample.secs = start.elapsed().as_secs_f64();
        sample.cpu_ns = self.cpu() - cpu;
        Ok(sample)
    }

    fn submit(&mut self, case: &Case, slot: usize, offset: u64) -> Result<()> {
        let buf = &mut self.buffers[slot][..case.block];
        if case.write {
            restamp(buf, offset);
            self.client.submit_write(slot as u64, offset, buf)
        } else {
            self.client
                .submit_read(slot as u64, offset, case.block as u32)
        }
        .context("an NBD request")
    }

    /// `qemu-img bench` over the same server: the same block size, depth and direction,
    /// sequential, about `ops` requests. Its operations per second.
    fn img_bench(&self, case: &Case, ops: u64) -> Result<f64> {
        let args = ImgBench {
            count: ops.max(case.depth as u64 * 4),
            depth: case.depth as u32,
            size: case.block as u64,
            write: case.write,
            ..ImgBench::default()
        };
        let result =
            qemu_img_bench(self.server.socket_path(), "disk", &args).context("qemu-img bench")?;
        Ok(result.ops_per_sec)
    }
}

// ---- the floor -------------------------------------------------------------------------

/// The host's own pread / pwrite on the image from `threads` threads (unpinned). Like the
/// guest's requests, the requests in flight move data through as many distinct buffers as
/// the case's depth: each thread cycles through its share of them (one each with a thread
/// per request). A thread that reused one buffer would keep it in its CPU's cache, which
/// no device serving that many requests at once can do.
fn floor_run(
    file: &Arc<File>,
    len: u64,
    case: &Case,
    threads: usize,
    secs: f64,
    seed: u64,
) -> Result<Sample> {
    let next = Arc::new(AtomicU64::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let checked = Arc::new(AtomicU64::new(0));
    let case = *case;
    // Made before the clock starts, as the guest's are.
    let sets: Vec<Vec<Vec<u8>>> = (0..threads)
        .map(|_| {
            (0..(case.depth / threads).max(1))
                .map(|_| {
                    let mut buf = vec![0u8; case.block];
                    fill(&mut buf, 0);
                    buf
                })
                .collect()
        })
        .collect();
    // Each thread's own open file, as fio's jobs open theirs: threads sharing one bounce
    // its reference count between the CPUs at every system call.
    let files = (0..threads)
        .map(|_| own_file(file, case.write))
        .collect::<Result<Vec<File>>>()?;
    let (cpu, start) = (process_cpu(), Instant::now());
    let deadline = start + Duration::from_secs_f64(secs);
    let workers: Vec<JoinHandle<Result<()>>> = sets
        .into_iter()
        .zip(files)
        .enumerate()
        .map(|(t, (mut buffers, file))| {
            let (next, ops, checked) = (Arc::clone(&next), Arc::clone(&ops), Arc::clone(&checked));
            thread::spawn(move || {
                unpin()?;
                let mut rng = Offsets::new(&case, len, seed ^ ((t as u64 + 1) * 0x9e37_79b9));
                let blocks = len / case.block as u64;
                let mut done = 0u64;
                while Instant::now() < deadline {
                    let offset = if case.random {
                        rng.next()
                    } else {
                        (next.fetch_add(1, Ordering::Relaxed) % blocks) * case.block as u64
                    };
                    let at = (done % buffers.len() as u64) as usize;
                    let buf = &mut buffers[at];
                    if case.write {
                        restamp(buf, offset);
                        file.write_all_at(buf, offset).context("pwrite")?;
                    } else {
                        file.read_exact_at(buf, offset).context("pread")?;
                        if (done + 1).is_multiple_of(CHECK_EVERY) {
                            if !holds(buf, offset) {
                                return fail(format!("pread read wrong data at offset {offset}"));
                            }
                            checked.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    done += 1;
                }
                ops.fetch_add(done, Ordering::Relaxed);
                Ok(())
            })
        })
        .collect();
    for w in workers {
        match w.join() {
            Ok(r) => r?,
            Err(_) => return fail("a floor thread panicked"),
        }
    }
    Ok(Sample {
        ops: ops.load(Ordering::Relaxed),
        secs: start.elapsed().as_secs_f64(),
        cpu_ns: process_cpu() - cpu,
        doorbells: 0,
        checked: checked.load(Ordering::Relaxed),
        threads,
    })
}

/// Another open file description of the image `file` has open, for reading (and writing
/// when `write`), through `/proc/self/fd`.
fn own_file(file: &File, write: bool) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .context("opening the image again")
}

/// The host's own reads and writes on the image through one io_uring kept `depth` deep,
/// from one thread (unpinned): each completion's buffer goes straight back out at the next
/// offset. Its [`Sample::threads`] is 0.
fn floor_uring(file: &File, len: u64, case: &Case, secs: f64, seed: u64) -> Result<Sample> {
    use io_uring::{IoUring, opcode, types};
    let depth = case.depth;
    let mut ring = IoUring::new(depth.next_power_of_two() as u32).context("io_uring_setup")?;
    let mut buffers: Vec<Vec<u8>> = (0..depth)
        .map(|_| {
            let mut buf = vec![0u8; case.block];
            fill(&mut buf, 0);
            buf
        })
        .collect();
    let mut offsets = Offsets::new(case, len, seed ^ 0x75_7269_6e67);
    let mut at = vec![0u64; depth];
    let fd = types::Fd(file.as_raw_fd());
    let (cpu, start) = (process_cpu(), Instant::now());
    let deadline = start + Duration::from_secs_f64(secs);
    let (mut done, mut checked, mut open) = (0u64, 0u64, 0usize);
    // Queues buffer `i` for the next offset, and returns the offset.
    let mut queue = |ring: &mut IoUring, buffers: &mut [Vec<u8>], i: usize| -> Result<u64> {
        let offset = offsets.next();
        let buf = &mut buffers[i];
        let entry = if case.write {
            restamp(buf, offset);
            opcode::Write::new(fd, buf.as_ptr(), case.block as u32)
                .offset(offset)
                .build()
        } else {
            opcode::Read::new(fd, buf.as_mut_ptr(), case.block as u32)
                .offset(offset)
                .build()
        }
        .user_data(i as u64);
        // SAFETY: the entry names `buffers[i]`, which stays allocated, unmoved and untouched
        // until its completion is reaped: the vector is not resized while the ring lives,
        // a buffer is queued again only after its completion, and every queued entry is
        // reaped before this function returns (the loop below runs until none is open).
        match unsafe { ring.submission().push(&entry) } {
            Ok(()) => Ok(offset),
            Err(_) => fail("the io_uring submission queue is full"),
        }
    };
    for (i, offset) in at.iter_mut().enumerate() {
        *offset = queue(&mut ring, &mut buffers, i)?;
        open += 1;
    }
    while open > 0 {
        ring.submit_and_wait(1).context("io_uring_enter")?;
        let reaped: Vec<(usize, i32)> = ring
            .completion()
            .map(|c| (c.user_data() as usize, c.result()))
            .collect();
        for (i, result) in reaped {
            open -= 1;
            if result < 0 {
                return fail(format!(
                    "io_uring: {}",
                    std::io::Error::from_raw_os_error(-result)
                ));
            }
            if result as usize != case.block {
                return fail(format!("io_uring: a short transfer of {result} bytes"));
            }
            done += 1;
            if !case.write && done.is_multiple_of(CHECK_EVERY) {
                if !holds(&buffers[i], at[i]) {
                    return fail(format!("io_uring read wrong data at offset {}", at[i]));
                }
                checked += 1;
            }
            if Instant::now() < deadline {
                at[i] = queue(&mut ring, &mut buffers, i)?;
                open += 1;
            }
        }
    }
    Ok(Sample {
        ops: done,
        secs: start.elapsed().as_secs_f64(),
        cpu_ns: process_cpu() - cpu,
        doorbells: 0,
        checked,
        threads: 0,
    })
}

/// The floor's variants for a case, in a fixed order: one thread at depth 1; else two
/// threads (this machine's CPUs), `depth` threads (at depth 32 and 8) and one io_uring
/// `depth` deep. Which is the floor is chosen across the rounds ([`Results::floor`]), not
/// in each: the best of several noisy runs in every round would sit above what any of
/// them does.
fn floor(file: &Arc<File>, len: u64, case: &Case, secs: f64, seed: u64) -> Result<Vec<Sample>> {
    let mut variants = vec![floor_run(
        file,
        len,
        case,
        1.max(case.depth.min(2)),
        secs,
        seed,
    )?];
    if case.depth > 2 {
        variants.push(floor_run(file, len, case, case.depth, secs, seed)?);
    }
    if case.depth > 1 {
        // On a thread of its own, unpinned like the others (this one is the guest's, pinned).
        variants.push(thread::scope(|s| {
            s.spawn(|| unpin().and_then(|()| floor_uring(file, len, case, secs, seed)))
                .join()
                .unwrap_or_else(|_| fail("the io_uring floor panicked"))
        })?);
    }
    Ok(variants)
}

// ---- the run ---------------------------------------------------------------------------

/// A case's results: per system, one sample per round.
#[derive(Debug, Default)]
struct Results {
    vmlink: Vec<Sample>,
    /// vmlink over two channels.
    two: Vec<Sample>,
    nbd: Vec<Sample>,
    /// The floor's variants ([`floor`]), each with one sample per round.
    floor_variants: Vec<Vec<Sample>>,
    img_bench: f64,
}

impl Results {
    /// The floor: the variant with the highest median across the rounds, and the io_uring
    /// variant alone (depth 8 and 32), whether or not it was faster.
    fn floor(&self) -> (&[Sample], &[Sample]) {
        let median_iops = |v: &Vec<Sample>| median(v.iter().map(Sample::iops).collect());
        let best = self
            .floor_variants
            .iter()
            .max_by(|a, b| median_iops(a).total_cmp(&median_iops(b)))
            .map_or(&[][..], Vec::as_slice);
        let uring = self
            .floor_variants
            .iter()
            .find(|v| v.first().is_some_and(|s| s.threads == 0))
            .map_or(&[][..], Vec::as_slice);
        (best, uring)
    }
}

/// A figure for JSON with `decimals` decimals, or `null` for one that was not measured
/// (JSON has no NaN): a system left out with `--system`, the io_uring floor at depth 1.
fn json_number(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        "null".to_string()
    }
}

/// A figure with two decimals and its unit, or "-" for one that was not measured (NaN).
fn shown(x: f64, unit: &str) -> String {
    if x.is_nan() {
        "-".to_string()
    } else {
        format!("{x:.2}{unit}")
    }
}

/// Doorbells per request with three decimals, or "-" when vmlink did not run.
fn bells(x: f64) -> String {
    if x.is_nan() {
        "-".to_string()
    } else {
        format!("{x:.3}")
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Makes the image: `len` bytes of the pattern.
fn make_image(path: &Path, len: u64) -> Result<()> {
    let file = File::create(path).context("creating the image")?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(chunk.len() as u64) as usize;
        fill(&mut chunk[..n], at);
        file.write_all_at(&chunk[..n], at)
            .context("writing the image")?;
        at += n as u64;
    }
    Ok(())
}

/// A private directory for the image, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the benchmark; the exit status (0, or 1 when a read's data was wrong).
pub fn run(args: &BenchArgs) -> Result<u8> {
    // A directory that is not there is a mistake to report, not one to make: made, it
    // would stay behind, and likely not on a tmpfs.
    if !args.dir.is_dir() {
        return fail(format!(
            "--dir {}: not a directory (the image is made in a new directory inside it)",
            args.dir.display()
        ));
    }
    let (rounds, secs, size_mib) = if args.smoke {
        (1, 0.05, 64)
    } else {
        (args.rounds.max(1), args.seconds, args.size_mib.max(64))
    };
    let cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| args.only.is_empty() || args.only.iter().any(|n| n == c.name))
        .filter(|c| args.depths.is_empty() || args.depths.iter().any(|d| *d == c.depth.to_string()))
        .collect();
    if !args.json {
        eprintln!(
            "vmlink disk bench: {} cases x {} systems x {rounds} rounds of {secs} s on a {size_mib} MiB image in {}",
            cases.len(),
            ["vmlink", "two-channels", "qemu-nbd", "floor"]
                .iter()
                .filter(|n| args.systems.is_empty() || args.systems.iter().any(|s| s == *n))
                .count(),
            args.dir.display()
        );
    }
    let scratch = Scratch(
        args.dir
            .join(format!("vmlink-disk-bench-{}", std::process::id())),
    );
    std::fs::create_dir(&scratch.0).context("making the image's directory")?;
    let image = scratch.0.join("disk.img");
    let len = size_mib << 20;
    make_image(&image, len)?;
    let nbd_version = QemuNbd::version().context("qemu-nbd")?;
    // An io_uring replaces the I/O threads.
    let io_threads = if args.io_uring > 0 {
        0
    } else {
        args.io_threads
    };
    let (uring, spin) = (args.io_uring, args.guest_spin_yield);
    let mut vmlink = Vmlink::start(&image, len, 1, io_threads, uring, spin)?;
    let mut two = Vmlink::start(&image, len, 2, io_threads, uring, spin)?;
    let mut nbd = Nbd::start(&image, len)?;
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .context("the image")?,
    );
    pin(1)?;
    let mut results: Vec<Results> = cases.iter().map(|_| Results::default()).collect();
    let mut bad = None;
    for round in 0..rounds {
        for (c, case) in cases.iter().enumerate() {
            let seed = (round * 100 + c) as u64 + 1;
            let r = &mut results[c];
            for k in 0..4 {
                let system = (k + round + c) % 4;
                let names = ["vmlink", "qemu-nbd", "two-channels", "floor"];
                if !args.systems.is_empty() && !args.systems.iter().any(|n| n == names[system]) {
                    continue;
                }
                let outcome = match system {
                    0 => vmlink.run(case, secs, seed).map(|s| r.vmlink.push(s)),
                    1 => nbd.run(case, secs, seed).map(|s| r.nbd.push(s)),
                    2 => two.run(case, secs, seed).map(|s| r.two.push(s)),
                    _ => floor(&file, len, case, secs, seed).map(|variants| {
                        r.floor_variants.resize_with(variants.len(), Vec::new);
                        for (v, sample) in variants.into_iter().enumerate() {
                            r.floor_variants[v].push(sample);
                        }
                    }),
                };
                if let Err(e) = outcome {
                    if e.0.contains("wrong data") {
                        bad.get_or_insert(e.0);
                    } else {
                        return Err(e);
                    }
                }
            }
        }
    }
    // The cross-check, once per case: qemu-img bench as many requests as our client did.
    let with_nbd = args.systems.is_empty() || args.systems.iter().any(|n| n == "qemu-nbd");
    for (c, case) in cases.iter().enumerate().filter(|_| with_nbd) {
        let ops = median(results[c].nbd.iter().map(|s| s.iops() * secs).collect());
        results[c].img_bench = nbd.img_bench(case, ops as u64)?;
    }
    unpin()?;
    let stats = vmlink.finish()?;
    let stats_two = two.finish()?;
    let report = Report {
        cases: &cases,
        results: &results,
        nbd_version: &nbd_version,
        rounds,
        secs,
        size_mib,
        host_refused: stats.refused + stats_two.refused,
        io_threads,
        io_uring: args.io_uring,
        guest_spin_yield: args.guest_spin_yield,
    };
    if args.json {
        print!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
    match bad {
        None => Ok(0),
        Some(e) => {
            eprintln!("vmlink disk bench: data check failed: {e}");
            Ok(1)
        }
    }
}

struct Report<'a> {
    cases: &'a [Case],
    results: &'a [Results],
    nbd_version: &'a str,
    rounds: usize,
    secs: f64,
    size_mib: u64,
    host_refused: u64,
    io_threads: usize,
    io_uring: u32,
    guest_spin_yield: u32,
}

/// One case's medians and ratios.
struct Row {
    vmlink: f64,
    two: f64,
    two_vs_floor: f64,
    nbd: f64,
    img: f64,
    floor: f64,
    floor_threads: usize,
    /// The floor's io_uring variant's median (NaN at depth 1, where it does not run).
    uring: f64,
    vs_nbd: f64,
    vs_floor: f64,
    bells: f64,
    cpu: [f64; 3],
    checked: u64,
}

impl Report<'_> {
    fn row(&self, c: usize) -> Row {
        let r = &self.results[c];
        let (floor, uring) = r.floor();
        let iops = |s: &[Sample]| median(s.iter().map(Sample::iops).collect());
        let cpu = |s: &[Sample]| {
            median(
                s.iter()
                    .map(|s| s.cpu_ns as f64 / 1000.0 / s.ops.max(1) as f64)
                    .collect(),
            )
        };
        // Per round: vmlink over the better qemu-nbd figure (our client or qemu-img's).
        let vs_nbd = median(
            (0..r.vmlink.len().min(r.nbd.len()))
                .map(|i| r.vmlink[i].iops() / r.nbd[i].iops().max(r.img_bench))
                .collect(),
        );
        let vs_floor = median(
            (0..r.vmlink.len().min(floor.len()))
                .map(|i| r.vmlink[i].iops() / floor[i].iops())
                .collect(),
        );
        let two_rounds = r.two.len().min(floor.len());
        let two_vs_floor = median(
            (0..two_rounds)
                .map(|i| r.two[i].iops() / floor[i].iops())
                .collect(),
        );
        let floor_threads = floor.first().map_or(0, |s| s.threads);
        Row {
            vmlink: iops(&r.vmlink),
            two: iops(&r.two),
            two_vs_floor,
            nbd: iops(&r.nbd),
            img: r.img_bench,
            floor: iops(floor),
            floor_threads,
            uring: iops(uring),
            vs_nbd,
            vs_floor,
            bells: median(
                r.vmlink
                    .iter()
                    .map(|s| s.doorbells as f64 / s.ops.max(1) as f64)
                    .collect(),
            ),
            cpu: [cpu(&r.vmlink), cpu(&r.nbd), cpu(floor)],
            checked: [&r.vmlink, &r.two, &r.nbd]
                .into_iter()
                .chain(&r.floor_variants)
                .flat_map(|s| s.iter())
                .map(|s| s.checked)
                .sum(),
        }
    }

    fn table(&self) -> String {
        let mut out = format!(
            "vmlink disk bench: {} rounds of {} s per case and system, {} MiB image; {}\n\n",
            self.rounds, self.secs, self.size_mib, self.nbd_version
        );
        out += "case            depth |       vmlink   qemu-nbd (client / qemu-img)   floor (threads) | vs nbd  vs floor | bells/req | CPU us/req vmlink nbd floor | 2 channels*  vs floor\n";
        for (c, case) in self.cases.iter().enumerate() {
            let r = self.row(c);
            // A system that did not run (`--system`) shows as "-".
            let unit = |iops: f64| {
                if iops.is_nan() || iops <= 0.0 {
                    "-".to_string()
                } else if case.block >= 1 << 20 {
                    format!("{:.2} GB/s", iops * case.block as f64 / 1e9)
                } else {
                    format!("{:.0}k", iops / 1e3)
                }
            };
            out += &format!(
                "{:<15} {:>5} | {:>12} {:>12} / {:<12} {:>12} ({:>2}) | {:>6} {:>8} | {:>9} | {:>17} {:>6} {:>6} | {:>11} {:>8}\n",
                case.name,
                case.depth,
                unit(r.vmlink),
                unit(r.nbd),
                unit(r.img),
                unit(r.floor),
                match r.floor_threads {
                    0 => "ur".to_string(),
                    n => n.to_string(),
                },
                shown(r.vs_nbd, "x"),
                shown(r.vs_floor, "x"),
                bells(r.bells),
                shown(r.cpu[0], ""),
                shown(r.cpu[1], ""),
                shown(r.cpu[2], ""),
                unit(r.two),
                shown(r.two_vs_floor, "x"),
            );
        }
        out += &match (self.io_threads, self.io_uring) {
            (_, depth @ 1..) => format!(
                "\nvmlink: one channel (the honest configuration on this machine's 2 CPUs): its host on\n\
                 CPU 0, moving data through one io_uring {depth} deep, the guest on CPU 1.\n"
            ),
            (0, _) => "\nvmlink: one channel (the honest configuration on this machine's 2 CPUs): its host on\n\
                  CPU 0, the guest on CPU 1.\n"
                .to_string(),
            (n, _) => format!(
                "\nvmlink: one channel (the honest configuration on this machine's 2 CPUs): its host\n\
                 thread on CPU 0, its {n} I/O thread(s) for reads (of 64 KiB or more, or deep in the\n\
                 queue) and the guest on CPU 1; the guest's spin {}.\n",
                match self.guest_spin_yield {
                    0 => "never gives the CPU away".to_string(),
                    y => format!("gives the CPU away every {y} looks"),
                }
            ),
        };
        out += "qemu-nbd: pinned to CPU 0, its client on CPU 1.\n\
                floor: the host's own pread/pwrite, unpinned, the fastest (by median) of one thread per\n\
                request in flight, two threads and one io_uring as deep as the queue (\"ur\"), with a\n\
                buffer per request in flight and an open file of the image per thread.\n\
                * two channels, each with a host thread and a guest thread: four busy threads on two\n\
                CPUs, oversubscribed, shown to prove the mechanism, not as scaling.\n";
        out += "\nGoals (blocking mode):\n";
        for line in self.goals() {
            out += &format!("  {line}\n");
        }
        let checked: u64 = (0..self.cases.len()).map(|c| self.row(c).checked).sum();
        out += &format!(
            "\n{checked} reads checked byte for byte; the host refused {} requests.\n",
            self.host_refused
        );
        out
    }

    fn find(&self, name: &str, depth: usize) -> Option<Row> {
        let c = self
            .cases
            .iter()
            .position(|c| c.name == name && c.depth == depth)?;
        Some(self.row(c))
    }

    fn goals(&self) -> Vec<String> {
        let mut lines = Vec::new();
        // A ratio whose systems did not both run (`--system`) is neither met nor missed.
        let mark = |x: f64, ok: bool| match (x.is_nan(), ok) {
            (true, _) => "not measured",
            (false, true) => "met",
            (false, false) => "NOT met",
        };
        if let Some(r) = self.find("4k-randread", 32) {
            lines.push(format!(
                "4 KiB random read, depth 32: {} qemu-nbd (goal >= 3): {}; {} the floor (goal >= 0.5): {}",
                shown(r.vs_nbd, "x"),
                mark(r.vs_nbd, r.vs_nbd >= 3.0),
                shown(r.vs_floor, "x"),
                mark(r.vs_floor, r.vs_floor >= 0.5)
            ));
            lines.push(format!(
                "doorbells per request at depth 32: {} (goal < 0.1): {}",
                bells(r.bells),
                mark(r.bells, r.bells < 0.1)
            ));
        }
        for name in ["1m-seqread", "1m-seqwrite"] {
            for depth in [1, 8, 32] {
                if let Some(r) = self.find(name, depth) {
                    lines.push(format!(
                        "{name} depth {depth}: {} the floor's GB/s (goal >= 0.8): {}",
                        shown(r.vs_floor, "x"),
                        mark(r.vs_floor, r.vs_floor >= 0.8)
                    ));
                }
            }
        }
        lines
    }

    fn json(&self) -> String {
        let rows: Vec<String> = self
            .cases
            .iter()
            .enumerate()
            .map(|(c, case)| {
                let r = self.row(c);
                format!(
                    "{{\"case\":\"{}\",\"depth\":{},\"block\":{},\"vmlink_iops\":{},\"two_channels_iops\":{},\"nbd_iops\":{},\"qemu_img_iops\":{},\"floor_iops\":{},\"floor_threads\":{},\"floor_io_uring_iops\":{},\"vs_nbd\":{},\"vs_floor\":{},\"doorbells_per_request\":{},\"cpu_us_per_request\":{{\"vmlink\":{},\"nbd\":{},\"floor\":{}}},\"checked\":{}}}",
                    case.name,
                    case.depth,
                    case.block,
                    json_number(r.vmlink, 1),
                    json_number(r.two, 1),
                    json_number(r.nbd, 1),
                    // 0 when qemu-img did not run (`--system`).
                    json_number(if r.img > 0.0 { r.img } else { f64::NAN }, 1),
                    json_number(r.floor, 1),
                    r.floor_threads,
                    json_number(r.uring, 1),
                    json_number(r.vs_nbd, 4),
                    json_number(r.vs_floor, 4),
                    json_number(r.bells, 5),
                    json_number(r.cpu[0], 3),
                    json_number(r.cpu[1], 3),
                    json_number(r.cpu[2], 3),
                    r.checked
                )
            })
            .collect();
        format!(
            "{{\"qemu_nbd\":\"{}\",\"rounds\":{},\"seconds\":{},\"size_mib\":{},\"host_refused\":{},\"io_threads\":{},\"io_uring\":{},\"guest_spin_yield\":{},\"cases\":[{}]}}\n",
            self.nbd_version.replace('"', "'"),
            self.rounds,
            self.secs,
            self.size_mib,
            self.host_refused,
            self.io_threads,
            self.io_uring,
            self.guest_spin_yield,
            rows.join(",")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_check_finds_any_wrong_byte() {
        let offset = 3 * 1024 * 1024;
        let mut buf = vec![0u8; 4096];
        fill(&mut buf, offset);
        assert!(holds(&buf, offset));
        assert!(!holds(&buf, offset + 512), "another offset's stamps");
        for at in [0, 7, 8, 9, 511, 512, 1000, 4095] {
            let mut bad = buf.clone();
            bad[at] ^= 0x40;
            assert!(!holds(&bad, offset), "byte {at} changed");
        }
    }

    #[test]
    fn the_in_place_check_finds_any_wrong_byte_too() {
        let offset = 5 * 1024 * 1024;
        let mut buf = vec![0u8; 4096];
        fill(&mut buf, offset);
        // The block at byte 1024 of an area of 8 KiB.
        let area = |bytes: &[u8]| -> Vec<AtomicU64> {
            let mut whole = vec![0u8; 8192];
            whole[1024..1024 + bytes.len()].copy_from_slice(bytes);
            whole
                .chunks_exact(8)
                .map(|w| AtomicU64::new(u64::from_ne_bytes(w.try_into().unwrap())))
                .collect()
        };
        let words = area(&buf);
        assert!(holds_in_area(&words, 1024, 4096, offset));
        assert!(
            !holds_in_area(&words, 1024, 4096, offset + 512),
            "another offset"
        );
        assert!(!holds_in_area(&words, 1536, 4096, offset), "another place");
        assert!(!holds_in_area(&words, 6144, 4096, offset), "past the area");
        for at in [0, 7, 8, 9, 511, 512, 1000, 4095] {
            let mut bad = buf.clone();
            bad[at] ^= 0x40;
            assert!(
                !holds_in_area(&area(&bad), 1024, 4096, offset),
                "byte {at} changed"
            );
        }
    }
}
