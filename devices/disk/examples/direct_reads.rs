//! Random reads from a disk image opened with `O_DIRECT`, served three ways in
//! interleaved rounds: positional I/O on the serving thread, one I/O thread beside it, and
//! one io_uring 32 deep. On a real disk (not a tmpfs) the io_uring keeps the device's
//! queue as deep as the guest's.
//!
//! ```text
//! cargo run --release -p vmlink-disk --example direct_reads -- [DIR] [SECONDS]
//! ```
//!
//! Makes a 1 GiB image in DIR (default `/var/tmp`, which must be on a file system with
//! direct I/O), and removes it when done.

use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use vmlink_channel::Wait;
use vmlink_disk::{Disk, DiskClient, DiskOptions, ServeOptions, config, serve_with, service};
use vmlink_shm::Guest;

type Error = Box<dyn std::error::Error + Send + Sync>;

const DEPTH: usize = 32;

/// Reads of `block` bytes at random aligned offsets, `DEPTH` in flight, for `secs`;
/// returns reads per second.
fn run(image: &Path, serving: ServeOptions, block: usize, secs: f64) -> Result<f64, Error> {
    let (a, b) = UnixStream::pair()?;
    let path = image.to_path_buf();
    let host = thread::spawn(move || -> Result<_, Error> {
        let options = DiskOptions {
            direct: true,
            ..DiskOptions::default()
        };
        let disk = Disk::open(&path, options)?;
        let endpoint = service("disk").serve_stream(a)?;
        Ok(serve_with(
            &disk,
            endpoint.channel(),
            endpoint.buffer(),
            serving,
        )?)
    });
    let (channel, memory) = Guest::new("disk")
        .with_config(config())
        .connect_stream(b)?
        .into_parts();
    let mut disk = DiskClient::new(channel, memory.buffer())?;
    let base = disk.buffers().start;
    let blocks = disk.info().len() / block as u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % blocks) * (block as u64 / 512)
    };
    let mut ids = [0u64; DEPTH];
    for (i, id) in ids.iter_mut().enumerate() {
        let at = base + i * block;
        *id = disk.submit_read(next(), at..at + block, Wait::Forever)?;
    }
    let (start, mut reads) = (Instant::now(), 0u64);
    while start.elapsed() < Duration::from_secs_f64(secs) {
        let done = disk.reap(Wait::Forever)?;
        done.result()?;
        reads += 1;
        let i = ids
            .iter()
            .position(|&id| id == done.id)
            .ok_or("a completion for no request")?;
        let at = base + i * block;
        ids[i] = disk.submit_read(next(), at..at + block, Wait::Forever)?;
    }
    let rate = reads as f64 / start.elapsed().as_secs_f64();
    while disk.in_flight() > 0 {
        disk.reap(Wait::Forever)?.result()?;
    }
    drop(disk);
    host.join().map_err(|_| "the host panicked")??;
    Ok(rate)
}

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "/var/tmp".into()));
    let secs: f64 = args.next().map_or(Ok(2.0), |s| s.parse())?;
    let image = dir.join(format!("vmlink-direct-reads-{}.img", std::process::id()));
    {
        // Written, not sparse, so every read reaches the device.
        let file = std::fs::File::create(&image)?;
        let chunk = vec![0x5a_u8; 1 << 20];
        for i in 0..1024u64 {
            file.write_all_at(&chunk, i << 20)?;
        }
        file.sync_all()?;
    }
    let ways = [
        ("positional", ServeOptions::default()),
        (
            "1 I/O thread",
            ServeOptions {
                io_threads: 1,
                ..ServeOptions::default()
            },
        ),
        (
            "io_uring 32",
            ServeOptions {
                io_uring: 32,
                ..ServeOptions::default()
            },
        ),
    ];
    let result = (|| -> Result<(), Error> {
        for block in [4096, 65536] {
            let mut rates = vec![Vec::new(); ways.len()];
            for _ in 0..3 {
                for (way, (_, serving)) in ways.iter().enumerate() {
                    rates[way].push(run(&image, *serving, block, secs)?);
                }
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let base = median(&mut rates[0].clone());
            for (way, (name, _)) in ways.iter().enumerate() {
                let m = median(&mut rates[way]);
                println!(
                    "{} KiB reads, depth {DEPTH}, O_DIRECT: {name:>12} {:>8.0} a second ({:.2}x positional)",
                    block / 1024,
                    m,
                    m / base
                );
            }
        }
        Ok(())
    })();
    std::fs::remove_file(&image)?;
    result
}
