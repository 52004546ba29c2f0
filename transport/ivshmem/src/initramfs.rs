//! A writer of initramfs archives: the `newc` cpio format the Linux kernel unpacks into its
//! root file system at boot (`Documentation/driver-api/early-userspace/buffer-format.rst`
//! in Linux), so a test guest needs no tool beyond this crate to be built.
//!
//! ```
//! use vmlink_ivshmem::initramfs::Initramfs;
//!
//! let mut archive = Initramfs::new();
//! archive.dir("dev", 0o755);
//! archive.char_device("dev/console", 0o600, 5, 1);
//! archive.file("init", 0o755, b"#!/bin/true\n");
//! let bytes = archive.finish();
//! assert!(bytes.starts_with(b"070701"));
//! assert_eq!(bytes.len() % 4, 0);
//! ```

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

/// An initramfs being built: entries in the order they are added (parents first).
#[derive(Debug, Default)]
pub struct Initramfs {
    out: Vec<u8>,
    ino: u32,
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory (`path` relative to the root, no leading `/`).
    pub fn dir(&mut self, path: &str, perm: u32) -> &mut Self {
        self.entry(path, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// Adds a regular file with `data`.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> &mut Self {
        self.entry(path, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> &mut Self {
        self.entry(path, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> &mut Self {
        self.ino += 1;
        let size = u32::try_from(data.len()).expect("an initramfs file is under 4 GiB");
        let name_size = u32::try_from(name.len() + 1).expect("a short name");
        let fields = [
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name_size, 0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
        self
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// Ends the archive (the `TRAILER!!!` entry) and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_follow_the_newc_format() {
        let mut a = Initramfs::new();
        a.file("init", 0o755, b"abc");
        let bytes = a.finish();
        // Header: magic + 13 fields of 8 hex digits.
        assert_eq!(&bytes[..6], b"070701");
        let field = |i: usize| {
            let s = std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).unwrap();
            u32::from_str_radix(s, 16).unwrap()
        };
        assert_eq!(field(1), 0o100_755);
        assert_eq!(field(6), 3);
        assert_eq!(field(11), 5);
        // Name "init\0" at 110, padded to 116, then the data.
        assert_eq!(&bytes[110..115], b"init\0");
        assert_eq!(&bytes[116..119], b"abc");
        assert!(bytes.windows(10).any(|w| w == b"TRAILER!!!"));
        assert_eq!(bytes.len() % 4, 0);
    }
}
