//! The memory the server shares: vmlink-shm's channel memory (`[header page][guest→host
//! ring][host→guest ring][buffer area]`, described by vmlink's memory header) in a sealed
//! memfd whose size is a power of two, because QEMU maps it as a PCI BAR and a BAR's size
//! is a power of two. The buffer area takes whatever the header page and the rings leave,
//! so the memory header's area length is exactly the memfd's (and the BAR's) size.

use std::os::fd::OwnedFd;

use vmlink_shm::{HEADER_PAGE_LEN, Layout, SharedMemory};

use crate::IvshmemError;

/// The smallest shared memory: 64 KiB.
pub const MIN_MEMORY_LEN: u64 = 64 * 1024;

/// The largest shared memory: 1 GiB.
pub const MAX_MEMORY_LEN: u64 = 1 << 30;

/// The default shared memory: 4 MiB (rings of 64 KiB data each, the rest buffer area).
pub const DEFAULT_MEMORY_LEN: u64 = 4 << 20;

/// The default ring data size: 64 KiB each way.
pub const DEFAULT_RING_DATA: u64 = 64 * 1024;

/// The layout of a memory of `len` bytes (a power of two) with `ring_data` bytes of data
/// in each ring: the buffer area is the rest, so the whole is exactly `len`.
pub fn layout_for(len: u64, ring_data: u64) -> Result<Layout, IvshmemError> {
    if !len.is_power_of_two() || !(MIN_MEMORY_LEN..=MAX_MEMORY_LEN).contains(&len) {
        return Err(IvshmemError::BadMemorySize {
            len,
            min: MIN_MEMORY_LEN,
            max: MAX_MEMORY_LEN,
        });
    }
    let rings = Layout::symmetric(ring_data, 0);
    let used = HEADER_PAGE_LEN
        .checked_add(rings.guest_to_host)
        .and_then(|n| n.checked_add(rings.host_to_guest));
    let layout = match used {
        Some(used) if used <= len => Layout::symmetric(ring_data, len - used),
        // Rings that do not fit: a layout the check below refuses with vmlink-shm's own
        // reason when the rings are malformed, or as too small a memory when they are not.
        _ => {
            rings
                .validate()
                .map_err(|e| IvshmemError::Memory(e.into()))?;
            return Err(IvshmemError::BadMemorySize {
                len,
                min: MIN_MEMORY_LEN,
                max: MAX_MEMORY_LEN,
            });
        }
    };
    layout
        .validate()
        .map_err(|e| IvshmemError::Memory(e.into()))?;
    debug_assert_eq!(layout.total_len(), len);
    Ok(layout)
}

/// Makes the shared memory: a sealed memfd of `len` bytes (a power of two) holding one
/// vmlink channel with `ring_data` bytes per ring, its memory header written and its
/// control pages initialised. Returns the host's view and the memfd QEMU maps.
pub fn create(len: u64, ring_data: u64) -> Result<(SharedMemory, OwnedFd), IvshmemError> {
    let layout = layout_for(len, ring_data)?;
    Ok(SharedMemory::create(layout, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_fill_a_power_of_two_exactly() {
        for shift in 16..=24 {
            let len = 1u64 << shift;
            let layout = layout_for(len, 16 * 1024).unwrap();
            assert_eq!(layout.total_len(), len);
        }
        assert!(matches!(
            layout_for(3 << 20, 4096),
            Err(IvshmemError::BadMemorySize { .. })
        ));
        assert!(matches!(
            layout_for(64 * 1024, 64 * 1024),
            Err(IvshmemError::BadMemorySize { .. })
        ));
        assert!(matches!(
            layout_for(1 << 20, 1000),
            Err(IvshmemError::Memory(_))
        ));
    }

    #[test]
    fn the_memory_describes_itself() {
        let (memory, _fd) = create(1 << 20, 16 * 1024).unwrap();
        let header = memory.header().unwrap();
        assert_eq!(header.layout.len(), 1 << 20);
        assert_eq!(header.layout.channels().len(), 1);
    }
}
