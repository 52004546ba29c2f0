//! The guest's side, interrupts: the ivshmem device's MSI-X vectors delivered to Linux
//! userspace as eventfds through VFIO (`vfio-pci`, Linux's `include/uapi/linux/vfio.h`).
//!
//! `ivshmem-doorbell` interrupts only through MSI-X (it has no INTx pin, so
//! `uio_pci_generic` gets no IRQ), and VFIO needs the device in an IOMMU group: a kernel
//! with VFIO's no-IOMMU mode, or a guest with an IOMMU (QEMU's `intel-iommu` on `q35`).
//! [`MsixVectors::open`] puts the device's group in a type-1 container, takes the device's
//! fd and has VFIO signal one eventfd per MSI-X vector; it also turns on bus mastering,
//! without which the device's MSI-X writes are dropped.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use vmlink_channel::fd::EventFd;

use crate::IvshmemError;

/// The most MSI-X vectors wired to eventfds.
pub const MAX_MSIX_VECTORS: usize = 64;

/// VFIO's API version this code speaks.
const VFIO_API_VERSION: i32 = 0;
/// The type-1 IOMMU backend.
const VFIO_TYPE1_IOMMU: i32 = 1;
/// `vfio_group_status.flags`: every device in the group is bound to VFIO.
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;
/// The MSI-X interrupt index of a PCI device.
const VFIO_PCI_MSIX_IRQ_INDEX: u32 = 2;
/// `vfio_irq_set.flags`: data is an array of eventfds.
const VFIO_IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// `vfio_irq_set.flags`: set the trigger.
const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
/// PCI command register: bus master enable.
const PCI_COMMAND_MASTER: u16 = 0x4;

/// `struct vfio_group_status`.
#[repr(C)]
#[derive(Debug, Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

/// `struct vfio_irq_info`.
#[repr(C)]
#[derive(Debug, Default)]
struct IrqInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    count: u32,
}

/// `struct vfio_irq_set` with room for [`MAX_MSIX_VECTORS`] eventfds after it.
#[repr(C)]
#[derive(Debug)]
struct IrqSet {
    argsz: u32,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    fds: [i32; MAX_MSIX_VECTORS],
}

/// The ioctls (`_IO(';', 100 + n)`), each an `unsafe fn` nix generates.
mod ioctl {
    use super::{GroupStatus, IrqInfo, IrqSet};

    const T: u8 = b';';
    nix::ioctl_none_bad!(get_api_version, nix::request_code_none!(T, 100));
    nix::ioctl_write_int_bad!(check_extension, nix::request_code_none!(T, 101));
    nix::ioctl_write_int_bad!(set_iommu, nix::request_code_none!(T, 102));
    nix::ioctl_readwrite_bad!(
        group_get_status,
        nix::request_code_none!(T, 103),
        GroupStatus
    );
    nix::ioctl_write_ptr_bad!(group_set_container, nix::request_code_none!(T, 104), i32);
    nix::ioctl_write_ptr_bad!(group_get_device_fd, nix::request_code_none!(T, 106), u8);
    nix::ioctl_readwrite_bad!(
        device_get_irq_info,
        nix::request_code_none!(T, 109),
        IrqInfo
    );
    nix::ioctl_write_ptr_bad!(device_set_irqs, nix::request_code_none!(T, 110), IrqSet);
}

/// A device's MSI-X vectors, each signalling an eventfd. Dropping it closes the device,
/// the group and the container, which tears the wiring down.
#[derive(Debug)]
pub struct MsixVectors {
    vectors: Vec<EventFd>,
    _device: OwnedFd,
    _group: File,
    _container: File,
}

impl MsixVectors {
    /// Wires the MSI-X vectors of the PCI device `pci_dir` (a directory under
    /// `/sys/bus/pci/devices`, bound to `vfio-pci`) to eventfds, up to `max` of them.
    pub fn open(pci_dir: &Path, max: usize) -> Result<Self, IvshmemError> {
        let name = pci_dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or(IvshmemError::NoDevice {
                sysfs: pci_dir.to_path_buf(),
            })?;
        let group = std::fs::read_link(pci_dir.join("iommu_group"))
            .map_err(IvshmemError::io("read the device's IOMMU group"))?;
        let group = group.file_name().ok_or(IvshmemError::NoDevice {
            sysfs: pci_dir.to_path_buf(),
        })?;
        let rw = |p: &Path| OpenOptions::new().read(true).write(true).open(p);
        let container =
            rw(Path::new("/dev/vfio/vfio")).map_err(IvshmemError::io("open /dev/vfio/vfio"))?;
        let c = container.as_raw_fd();
        // SAFETY: `c` is an open VFIO container fd for the call; the ioctl takes no argument.
        let version = unsafe { ioctl::get_api_version(c) }
            .map_err(IvshmemError::io("VFIO_GET_API_VERSION"))?;
        // SAFETY: as above; the argument is an integer, not a pointer.
        let type1 = unsafe { ioctl::check_extension(c, VFIO_TYPE1_IOMMU) }
            .map_err(IvshmemError::io("VFIO_CHECK_EXTENSION"))?;
        if version != VFIO_API_VERSION || type1 != 1 {
            return Err(IvshmemError::io("VFIO API version or type-1 IOMMU")(
                std::io::Error::other(format!(
                    "API version {version}, type-1 IOMMU support {type1}"
                )),
            ));
        }
        let group_file = rw(&Path::new("/dev/vfio").join(group))
            .map_err(IvshmemError::io("open the VFIO group"))?;
        let g = group_file.as_raw_fd();
        let mut status = GroupStatus {
            argsz: size_of::<GroupStatus>() as u32,
            flags: 0,
        };
        // SAFETY: `g` is an open VFIO group fd; `status` is a live `vfio_group_status` whose
        // `argsz` says its size, which the kernel fills.
        unsafe { ioctl::group_get_status(g, &mut status) }
            .map_err(IvshmemError::io("VFIO_GROUP_GET_STATUS"))?;
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(IvshmemError::io("VFIO group")(std::io::Error::other(
                "not viable: a device of the group is not bound to vfio-pci",
            )));
        }
        // SAFETY: `g` is an open group fd; the argument points at a live int holding the
        // open container's fd, which the kernel only reads.
        unsafe { ioctl::group_set_container(g, &c) }
            .map_err(IvshmemError::io("VFIO_GROUP_SET_CONTAINER"))?;
        // SAFETY: `c` is the open container, now holding the group; the argument is an int.
        unsafe { ioctl::set_iommu(c, VFIO_TYPE1_IOMMU) }
            .map_err(IvshmemError::io("VFIO_SET_IOMMU"))?;
        let cname = CString::new(name)
            .map_err(|e| IvshmemError::io("device name")(std::io::Error::other(e)))?;
        // SAFETY: `g` is an open group fd; the argument is a NUL-terminated string that
        // lives for the call and that the kernel only reads.
        let raw = unsafe { ioctl::group_get_device_fd(g, cname.as_ptr().cast()) }
            .map_err(IvshmemError::io("VFIO_GROUP_GET_DEVICE_FD"))?;
        // SAFETY: the ioctl returned a new fd that nothing else owns.
        let device = unsafe { OwnedFd::from_raw_fd(raw) };
        let d = device.as_raw_fd();
        let mut info = IrqInfo {
            argsz: size_of::<IrqInfo>() as u32,
            index: VFIO_PCI_MSIX_IRQ_INDEX,
            ..IrqInfo::default()
        };
        // SAFETY: `d` is the open device fd; `info` is a live `vfio_irq_info` whose `argsz`
        // says its size, which the kernel fills.
        unsafe { ioctl::device_get_irq_info(d, &mut info) }
            .map_err(IvshmemError::io("VFIO_DEVICE_GET_IRQ_INFO"))?;
        let count = (info.count as usize).min(max).min(MAX_MSIX_VECTORS);
        if count == 0 {
            return Err(IvshmemError::io("MSI-X")(std::io::Error::other(
                "the device has no MSI-X vectors",
            )));
        }
        let vectors = (0..count)
            .map(|_| EventFd::new().map_err(IvshmemError::io("eventfd")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut set = IrqSet {
            argsz: (5 * 4 + 4 * count) as u32,
            flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            index: VFIO_PCI_MSIX_IRQ_INDEX,
            start: 0,
            count: count as u32,
            fds: [-1; MAX_MSIX_VECTORS],
        };
        for (slot, fd) in set.fds.iter_mut().zip(&vectors) {
            *slot = fd.as_raw_fd();
        }
        // SAFETY: `d` is the open device fd; `set` is a live `vfio_irq_set` followed by
        // `count` open eventfds, `argsz` covering exactly those, which the kernel only reads.
        unsafe { ioctl::device_set_irqs(d, &set) }
            .map_err(IvshmemError::io("VFIO_DEVICE_SET_IRQS"))?;
        enable_bus_master(pci_dir)?;
        Ok(Self {
            vectors,
            _device: device,
            _group: group_file,
            _container: container,
        })
    }

    /// The eventfd of each vector: readable when the device raised that vector.
    pub fn vectors(&self) -> &[EventFd] {
        &self.vectors
    }
}

/// Sets the bus-master bit of the device's PCI command register (through sysfs `config`):
/// MSI-X messages are writes by the device, dropped while it is off.
fn enable_bus_master(pci_dir: &Path) -> Result<(), IvshmemError> {
    let config = OpenOptions::new()
        .read(true)
        .write(true)
        .open(pci_dir.join("config"))
        .map_err(IvshmemError::io("open the PCI config space"))?;
    let mut command = [0u8; 2];
    config
        .read_exact_at(&mut command, 4)
        .map_err(IvshmemError::io("read the PCI command register"))?;
    let value = u16::from_le_bytes(command) | PCI_COMMAND_MASTER;
    config
        .write_all_at(&value.to_le_bytes(), 4)
        .map_err(IvshmemError::io("write the PCI command register"))
}
