//! 4 KiB random reads from `qemu-nbd` at queue depths 1 and 32: this crate's client, then
//! `qemu-img bench` (sequential) for comparison.
//!
//! `cargo run --release -p vmlink-nbd --example nbd_rates [COUNT]` (default 50,000 reads
//! per run). The image (64 MiB) lives in /dev/shm when it can.

use std::path::{Path, PathBuf};
use std::time::Instant;

use vmlink_nbd::{ImgBench, NbdClient, NbdError, QemuNbd, QemuNbdOptions, qemu_img_bench};

const SIZE: u64 = 64 << 20;
const BLOCK: u32 = 4096;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let count: u64 = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => 50_000,
    };
    let dir = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let image = dir.join(format!("vmlink-nbd-rates-{}.img", std::process::id()));
    std::fs::write(&image, vec![0x5au8; SIZE as usize])?;
    let result = run(&image, count);
    let _ = std::fs::remove_file(&image);
    result
}

fn run(image: &Path, count: u64) -> Result<(), Box<dyn std::error::Error>> {
    println!("{}", QemuNbd::version()?);
    let server = QemuNbd::start(image, "rates", &QemuNbdOptions::default())?;
    println!("server: {}", server.command_line());
    for depth in [1usize, 32] {
        let mut client = server.connect()?;
        let rate = reads(&mut client, depth, count)?;
        client.disconnect()?;
        println!("vmlink-nbd client, 4 KiB random reads, QD {depth:>2}: {rate:>9.0} reads/s");
    }
    for depth in [1u32, 32] {
        let bench = ImgBench {
            count,
            depth,
            size: BLOCK.into(),
            ..ImgBench::default()
        };
        let result = qemu_img_bench(server.socket_path(), server.export(), &bench)?;
        println!(
            "qemu-img bench, 4 KiB sequential reads,  QD {depth:>2}: {:>9.0} reads/s",
            result.ops_per_sec
        );
        if depth == 1 {
            println!("  ({})", result.command);
        }
    }
    Ok(())
}

/// `count` random 4 KiB reads with up to `depth` in flight; gives reads per second.
fn reads(client: &mut NbdClient, depth: usize, count: u64) -> Result<f64, NbdError> {
    let mut buffers = vec![vec![0u8; BLOCK as usize]; depth];
    let blocks = client.size() / u64::from(BLOCK);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_offset = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % blocks) * u64::from(BLOCK)
    };
    let started = Instant::now();
    let (mut submitted, mut completed) = (0u64, 0u64);
    for slot in 0..depth.min(count as usize) {
        client.submit_read(slot as u64, next_offset(), BLOCK)?;
        submitted += 1;
    }
    while completed < count {
        let reply = client.reap(|h| Some(&mut buffers[h as usize][..]))?;
        assert!(reply.is_ok(), "read failed: {reply:?}");
        completed += 1;
        if submitted < count {
            client.submit_read(reply.handle, next_offset(), BLOCK)?;
            submitted += 1;
        }
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}
