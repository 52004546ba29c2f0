//! Helpers the command-line tests share: byte patterns and private directories.
#![allow(dead_code)]

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

/// `len` bytes that differ from `seed` to `seed` and do not repeat with a short period.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A fresh directory only this user can enter, as the shm sockets need.
pub fn private_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmlink-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
    dir
}
