//! Status codes (`icmsg_hdr.status`): the HRESULTs Linux's `include/uapi/linux/hyperv.h`
//! names, with its names.

/// Success.
pub const HV_S_OK: u32 = 0x0000_0000;
/// Unspecified failure.
pub const HV_E_FAIL: u32 = 0x8000_4005;
/// KVP enumeration: no more entries (Linux sends it when the daemon returns no key).
pub const HV_S_CONT: u32 = 0x8007_0103;
/// The request is not supported.
pub const HV_ERROR_NOT_SUPPORTED: u32 = 0x8007_0032;
/// The machine is locked.
pub const HV_ERROR_MACHINE_LOCKED: u32 = 0x8007_04F7;
/// The device is not connected.
pub const HV_ERROR_DEVICE_NOT_CONNECTED: u32 = 0x8007_048F;
/// An argument is invalid.
pub const HV_INVALIDARG: u32 = 0x8007_0057;
/// A GUID was not found.
pub const HV_GUID_NOTFOUND: u32 = 0x8004_1002;
/// File copy: the file exists and OVER_WRITE was not asked.
pub const HV_ERROR_ALREADY_EXISTS: u32 = 0x8007_0050;
/// File copy: the disk is full.
pub const HV_ERROR_DISK_FULL: u32 = 0x8007_0070;
