//! Helpers shared by the integration tests: a scratch directory (on tmpfs when there is
//! one) and images filled with an offset-dependent pattern.

#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A scratch directory removed on drop: under /dev/shm when it is writable, so images
/// live in memory, else under the system's temporary directory.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let shm = Path::new("/dev/shm");
        let parent = if shm.is_dir() && fs::metadata(shm).is_ok_and(|m| !m.permissions().readonly())
        {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let path = parent.join(format!(
            "vmlink-nbd-test-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).expect("create scratch dir");
        Scratch { path }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// The byte the test images hold at `offset`: differs between neighbouring bytes and
/// between blocks, so data from the wrong place shows.
pub fn pattern(offset: u64) -> u8 {
    let x = offset.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    ((x >> 56) as u8) ^ ((offset >> 12) as u8)
}

/// Writes a `size`-byte image of [`pattern`] with std file I/O.
pub fn make_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    let mut file = fs::File::create(&path).expect("create image");
    let mut chunk = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < size {
        let n = chunk.len().min((size - at) as usize);
        for (i, b) in chunk[..n].iter_mut().enumerate() {
            *b = pattern(at + i as u64);
        }
        file.write_all(&chunk[..n]).expect("write image");
        at += n as u64;
    }
    file.sync_all().expect("sync image");
    path
}

/// Asserts that `data` is the pattern at `offset`, naming the first wrong byte.
pub fn assert_pattern(offset: u64, data: &[u8]) {
    if let Some(i) = (0..data.len()).find(|&i| data[i] != pattern(offset + i as u64)) {
        panic!(
            "byte at offset {} is {:#04x}, expected {:#04x} (read of {} bytes at {offset})",
            offset + i as u64,
            data[i],
            pattern(offset + i as u64),
            data.len()
        );
    }
}

/// A tiny deterministic generator (xorshift64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}
