//! The guest's side: the ivshmem PCI device as Linux userspace reaches it through sysfs.
//!
//! [`find_devices`] lists the ivshmem devices (vendor 0x1af4, device 0x1110) under
//! `/sys/bus/pci/devices`; [`Device::open`] enables one and maps its BAR0 (registers) and
//! BAR2 (the shared memory) through the `resource0` / `resource2` files, which needs no
//! kernel driver. Registers are read and written with volatile 32-bit accesses; the shared
//! memory is only ever touched as `AtomicU64` words, as everywhere in vmlink, because the
//! host and other guests write it too.

use std::fs::{File, OpenOptions};
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, atomic::AtomicU64};

use nix::sys::mman::{self, MapFlags, ProtFlags};
use vmlink_ring::area::{AreaError, AreaLayout, HEADER_LEN, ParsedHeader};
use vmlink_ring::words::{read_words, write_words};

use crate::IvshmemError;

/// The ivshmem device's PCI vendor id.
pub const VENDOR_ID: u16 = 0x1af4;
/// The ivshmem device's PCI device id.
pub const DEVICE_ID: u16 = 0x1110;

/// BAR0 register: Interrupt Mask (read/write).
pub const REG_INTR_MASK: usize = 0x0;
/// BAR0 register: Interrupt Status (read/write; reading clears it).
pub const REG_INTR_STATUS: usize = 0x4;
/// BAR0 register: IVPosition, this device's peer id (read-only).
pub const REG_IV_POSITION: usize = 0x8;
/// BAR0 register: Doorbell (write-only): `(peer << 16) | vector`.
pub const REG_DOORBELL: usize = 0xc;
/// The registers' span in BAR0.
const REGS_LEN: u64 = 16;

/// The PCI devices under `sysfs_pci` (normally `/sys/bus/pci/devices`) that are ivshmem
/// devices, sorted by address.
pub fn find_devices(sysfs_pci: &Path) -> Result<Vec<PathBuf>, IvshmemError> {
    let read_id = |dir: &Path, name: &str| -> Option<u16> {
        let text = std::fs::read_to_string(dir.join(name)).ok()?;
        u16::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(sysfs_pci).map_err(IvshmemError::io("read the PCI devices"))? {
        let dir = entry
            .map_err(IvshmemError::io("read the PCI devices"))?
            .path();
        if read_id(&dir, "vendor") == Some(VENDOR_ID) && read_id(&dir, "device") == Some(DEVICE_ID)
        {
            found.push(dir);
        }
    }
    found.sort();
    Ok(found)
}

/// A shared mapping of one BAR's `resource` file, unmapped on drop.
#[derive(Debug)]
pub(crate) struct BarMap {
    pub(crate) ptr: NonNull<u8>,
    /// The BAR's size (the mapping may be rounded up to a page).
    pub(crate) len: usize,
    map_len: usize,
}

// SAFETY: the mapping is device memory or shared memory reached only through volatile
// register accesses and atomics, which are as sound from several threads as from one.
unsafe impl Send for BarMap {}
// SAFETY: as for `Send`.
unsafe impl Sync for BarMap {}

impl BarMap {
    /// Maps the whole of `file` (a sysfs `resource` file of `len` bytes), rounded up to a
    /// page, read-write and shared.
    fn map(file: &File, len: u64) -> Result<Self, IvshmemError> {
        let len = usize::try_from(len).map_err(|_| IvshmemError::BarTooSmall {
            bar: 0,
            len,
            min: 0,
        })?;
        let map_len = len.next_multiple_of(4096);
        let size = NonZeroUsize::new(map_len).ok_or(IvshmemError::BarTooSmall {
            bar: 0,
            len: 0,
            min: 1,
        })?;
        // SAFETY: no address hint and no MAP_FIXED, so the kernel picks an unused range and
        // no existing mapping is replaced; the fd is open for the call. The mapping is
        // reached only through volatile accesses and atomics, and unmapped in `drop`.
        let ptr = unsafe {
            mman::mmap(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                file.as_fd(),
                0,
            )
        }
        .map_err(IvshmemError::io("mmap a BAR"))?;
        Ok(Self {
            ptr: ptr.cast(),
            len,
            map_len,
        })
    }

    /// The 32-bit word at `offset` (4-aligned, inside the BAR).
    fn word_ptr(&self, offset: usize) -> Result<*mut u32, IvshmemError> {
        if !offset.is_multiple_of(4) || offset.checked_add(4).is_none_or(|end| end > self.len) {
            return Err(IvshmemError::OutOfBounds {
                offset,
                len: 4,
                size: self.len,
            });
        }
        Ok(self.ptr.as_ptr().wrapping_add(offset).cast::<u32>())
    }

    /// The BAR as 64-bit words.
    pub(crate) fn words(&self) -> &[AtomicU64] {
        // SAFETY: `len / 8` words from the page-aligned start lie inside the mapping,
        // which lives as long as `&self`. `AtomicU64` has the layout of `u64` and allows
        // shared mutation, including by the host and other peers.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU64>(), self.len / 8) }
    }
}

impl Drop for BarMap {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr + map_len` is exactly the mapping `map` made, and nothing
        // borrowed from it outlives `self`.
        let _ = unsafe { mman::munmap(self.ptr.cast(), self.map_len) };
    }
}

/// An opened ivshmem device: its registers and its shared memory, mapped.
#[derive(Debug)]
pub struct Device {
    path: PathBuf,
    regs: Arc<BarMap>,
    memory: Arc<BarMap>,
}

impl Device {
    /// Enables the device at `path` (a directory under `/sys/bus/pci/devices`) and maps
    /// BAR0 and BAR2.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, IvshmemError> {
        let path = path.as_ref().to_path_buf();
        // Enabling turns on memory decoding; a device already enabled (by firmware, or a
        // driver) may refuse a second enable, which changes nothing.
        let _ = std::fs::write(path.join("enable"), "1");
        let open = |name: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(path.join(name))
                .map_err(IvshmemError::io("open a BAR's resource file"))
        };
        let size = |f: &File| {
            f.metadata()
                .map(|m| m.len())
                .map_err(IvshmemError::io("stat a BAR"))
        };
        let regs_file = open("resource0")?;
        let regs_len = size(&regs_file)?;
        if regs_len < REGS_LEN {
            return Err(IvshmemError::BarTooSmall {
                bar: 0,
                len: regs_len,
                min: REGS_LEN,
            });
        }
        let mem_file = open("resource2")?;
        let mem_len = size(&mem_file)?;
        if mem_len < HEADER_LEN as u64 {
            return Err(IvshmemError::BarTooSmall {
                bar: 2,
                len: mem_len,
                min: HEADER_LEN as u64,
            });
        }
        Ok(Self {
            regs: Arc::new(BarMap::map(&regs_file, regs_len)?),
            memory: Arc::new(BarMap::map(&mem_file, mem_len)?),
            path,
        })
    }

    /// The device's sysfs directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the register at `offset` (one of the `REG_*`).
    pub fn read_reg(&self, offset: usize) -> Result<u32, IvshmemError> {
        let ptr = self.regs.word_ptr(offset)?;
        // SAFETY: `ptr` is a 4-aligned word inside the mapped BAR0 (checked by `word_ptr`),
        // which lives as long as `&self`; a volatile read is one 32-bit MMIO access.
        Ok(unsafe { ptr.read_volatile() })
    }

    /// Writes the register at `offset` (one of the `REG_*`).
    pub fn write_reg(&self, offset: usize, value: u32) -> Result<(), IvshmemError> {
        let ptr = self.regs.word_ptr(offset)?;
        // SAFETY: as in `read_reg`; a volatile write is one 32-bit MMIO access.
        unsafe { ptr.write_volatile(value) };
        Ok(())
    }

    /// This device's peer id (the IVPosition register).
    pub fn iv_position(&self) -> Result<u32, IvshmemError> {
        self.read_reg(REG_IV_POSITION)
    }

    /// Rings peer `peer` on `vector` through the Doorbell register.
    pub fn ring(&self, peer: u16, vector: u16) -> Result<(), IvshmemError> {
        self.write_reg(REG_DOORBELL, (u32::from(peer) << 16) | u32::from(vector))
    }

    /// The shared memory's size (BAR2's).
    pub fn memory_len(&self) -> usize {
        self.memory.len
    }

    /// The shared memory as 64-bit words (shared with the host: access them atomically).
    pub fn memory_words(&self) -> &[AtomicU64] {
        self.memory.words()
    }

    /// Copies shared memory at `offset` into `buf`, a word at a time.
    pub fn read_memory(&self, offset: usize, buf: &mut [u8]) -> Result<(), IvshmemError> {
        read_words(self.memory.words(), offset, buf).map_err(|e| IvshmemError::OutOfBounds {
            offset: e.offset,
            len: e.len,
            size: e.size,
        })
    }

    /// Copies `data` into the shared memory at `offset`, a word at a time.
    pub fn write_memory(&self, offset: usize, data: &[u8]) -> Result<(), IvshmemError> {
        write_words(self.memory.words(), offset, data).map_err(|e| IvshmemError::OutOfBounds {
            offset: e.offset,
            len: e.len,
            size: e.size,
        })
    }

    /// Reads vmlink's memory header at the start of the shared memory once into a private
    /// copy and validates it against BAR2's size.
    pub fn header(&self) -> Result<ParsedHeader, AreaError> {
        let mut page = [0u8; HEADER_LEN];
        // BAR2 holds at least a header page (checked in `open`).
        let _ = read_words(self.memory.words(), 0, &mut page);
        AreaLayout::parse(&page, self.memory.len as u64)
    }
}

impl Device {
    /// BAR0's mapping, shared with a doorbell that rings through it.
    pub(crate) fn regs_map(&self) -> Arc<BarMap> {
        self.regs.clone()
    }

    /// BAR2's mapping, shared with rings that live in it.
    pub(crate) fn memory_map(&self) -> Arc<BarMap> {
        self.memory.clone()
    }
}

/// Rings peer `peer` on `vector` through the Doorbell register of `regs` (BAR0).
pub(crate) fn ring_doorbell(regs: &BarMap, peer: u16, vector: u16) -> Result<(), IvshmemError> {
    let ptr = regs.word_ptr(REG_DOORBELL)?;
    // SAFETY: `ptr` is the 4-aligned Doorbell register inside the mapped BAR0 (checked by
    // `word_ptr`), which `regs` keeps mapped; a volatile write is one 32-bit MMIO access.
    unsafe { ptr.write_volatile((u32::from(peer) << 16) | u32::from(vector)) };
    Ok(())
}
