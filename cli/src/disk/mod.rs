//! `vmlink disk`: serve a disk image over vmlink, and measure it beside qemu-nbd.

mod bench;

use std::path::PathBuf;
use std::sync::Arc;
use std::thread;

use clap::{Args, Subcommand};
use vmlink_disk::{Disk, DiskOptions, ServeOptions, serve_with};
use vmlink_shm::Listener;

use crate::error::{Context, Result};

/// Options of `vmlink disk`.
#[derive(Debug, Args)]
pub struct DiskArgs {
    #[command(subcommand)]
    command: DiskCommand,
}

#[derive(Debug, Subcommand)]
enum DiskCommand {
    /// Serve a disk image (a file or a block device) to guests that connect on a socket,
    /// each on its own channel and thread, until killed.
    ///
    /// A guest (`vmlink_disk::DiskClient`) issues reads and writes whose data the server
    /// moves in place between the image and the guest's buffers in the shared memory.
    /// Every request is checked; a bad one gets an error completion and changes nothing.
    /// Each guest's arrival and departure is logged on stderr with what it did.
    Serve(ServeArgs),
    /// Measure the disk beside qemu-nbd and the host's own pread/pwrite on one image in a
    /// tmpfs: 4 KiB random reads and writes, 1 MiB sequential reads and writes, at queue
    /// depths 1, 8 and 32, in interleaved rounds, with a sample of every read's data
    /// checked. Needs qemu-nbd and qemu-img (Debian: qemu-utils).
    ///
    /// Exits 0 when every check passed (the goals are reported, not enforced), 1 on a data
    /// mismatch, 2 on an error.
    Bench(bench::BenchArgs),
}

/// Options of `vmlink disk serve`.
#[derive(Debug, Args)]
struct ServeArgs {
    /// The disk image: a regular file or a block device, its size rounded down to whole
    /// 512-byte sectors.
    image: PathBuf,
    /// The Unix socket to listen on for guests (vmlink-shm's handshake).
    #[arg(long)]
    socket: PathBuf,
    /// The service name guests ask for.
    #[arg(long, default_value = "disk")]
    service: String,
    /// Refuse writes and discards.
    #[arg(long)]
    read_only: bool,
    /// Bypass the host's page cache (O_DIRECT).
    #[arg(long)]
    direct: bool,
    /// Offer up to N sub-channels beside each guest's primary channel (a guest asks for
    /// them); each channel is served on a thread of its own.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=63))]
    sub_channels: u32,
    /// Pin channel i's thread of every guest to CPU i (modulo the CPUs this process may
    /// use), and its I/O threads to the CPU after it.
    #[arg(long)]
    pin: bool,
    /// Worker threads per channel for reads of 64 KiB or more, and for smaller reads from
    /// a deep queue (0: the channel's thread moves all the data; 1, the default, is what
    /// `vmlink disk bench` measures). They pay off where the host has a CPU to spare for
    /// reads at depth; a lone read, writes and the rest stay on the channel's thread.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(0..=64))]
    io_threads: u16,
    /// Move reads' and writes' data through one io_uring this deep per channel, up to
    /// DEPTH transfers in flight at once, instead of I/O threads: for an image on a real
    /// disk, with --direct. (On a tmpfs the kernel hands each queued transfer to a worker,
    /// and positional I/O is faster.)
    #[arg(long, value_name = "DEPTH", default_value_t = 0, conflicts_with = "io_threads",
          value_parser = clap::value_parser!(u32).range(0..=4096))]
    io_uring: u32,
}

/// Runs `vmlink disk`; the exit status for `bench`'s checks.
pub fn run(args: &DiskArgs) -> Result<u8> {
    match &args.command {
        DiskCommand::Serve(args) => serve_command(args).map(|()| 0),
        DiskCommand::Bench(args) => bench::run(args),
    }
}

fn serve_command(args: &ServeArgs) -> Result<()> {
    let options = DiskOptions {
        read_only: args.read_only,
        direct: args.direct,
    };
    let disk = Arc::new(Disk::open(&args.image, options).context("opening the image")?);
    let service = vmlink_disk::service_with(
        &args.service,
        vmlink_disk::DEFAULT_LAYOUT,
        args.sub_channels,
    );
    if args.io_uring > 0 {
        vmlink_shm::FileRing::probe(args.io_uring).context("setting up io_uring")?;
    }
    let listener = Listener::bind(&args.socket, service).context("listening")?;
    // The CPUs this process may run on, for `--pin`.
    let cpus: Vec<usize> = {
        let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
            .context("reading the CPUs this process may use")?;
        (0..nix::sched::CpuSet::count())
            .filter(|&cpu| allowed.is_set(cpu).unwrap_or(false))
            .collect()
    };
    let info = disk.info();
    eprintln!(
        "vmlink disk serve: {} ({} sectors{}) on {} as {:?}",
        args.image.display(),
        info.sectors,
        if info.read_only { ", read-only" } else { "" },
        args.socket.display(),
        args.service
    );
    loop {
        let endpoint = match listener.accept() {
            Ok(endpoint) => endpoint,
            Err(e) => {
                // A guest that fails the handshake is refused; the server goes on.
                eprintln!("vmlink disk serve: refused a guest: {e}");
                continue;
            }
        };
        let peer = endpoint.peer();
        let set = endpoint.into_set();
        eprintln!(
            "vmlink disk serve: guest pid {} connected with {} channel(s)",
            peer.pid,
            set.len()
        );
        let disk = Arc::clone(&disk);
        // An io_uring replaces the I/O threads.
        let io_threads = if args.io_uring > 0 {
            0
        } else {
            usize::from(args.io_threads)
        };
        let io_uring = args.io_uring;
        // Channel i of every guest on the i-th CPU this process may use (modulo their count),
        // its I/O threads on the next.
        let pins = args.pin.then(|| cpus.clone());
        let worker_cpus = pins.clone();
        thread::spawn(move || {
            let pid = peer.pid;
            // Each channel's end is logged as it comes: the others may go on.
            let served = set.serve_each(pins.as_deref(), |index, endpoint| {
                let options = ServeOptions {
                    io_threads,
                    worker_cpu: worker_cpus.as_ref().map(|c| c[(index + 1) % c.len()]),
                    io_uring,
                };
                match serve_with(&disk, endpoint.channel(), endpoint.buffer(), options) {
                    Ok(stats) => eprintln!(
                        "vmlink disk serve: guest pid {pid} channel {index} left: {} requests \
                         done, {} refused, {} bytes read, {} written",
                        stats.completed, stats.refused, stats.bytes_read, stats.bytes_written
                    ),
                    Err(e) => eprintln!("vmlink disk serve: guest pid {pid} channel {index}: {e}"),
                }
            });
            for (index, result) in served {
                if let Err(e) = result {
                    eprintln!("vmlink disk serve: guest pid {pid} channel {index}: pinning: {e}");
                }
            }
        });
    }
}
