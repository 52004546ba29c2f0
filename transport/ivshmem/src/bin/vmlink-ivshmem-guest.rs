//! The test guest's init: runs as PID 1 in a QEMU guest's initramfs (a static binary for
//! `x86_64-unknown-linux-musl`). Anywhere else it runs only its pipe modes
//! (`vmlink-ivshmem-guest connect` / `serve`, see `pipe.rs`): the guest's end of
//! `vmlink ivshmem-server`.
//!
//! It mounts `/proc`, `/sys` and `/dev`, loads the kernel modules in `/lib/modules/order`
//! (`finit_module`), finds the ivshmem device, maps its BARs, reads its IVPosition and the
//! vmlink memory header in BAR2, checks the host's pattern in the host's half of the
//! buffer area, writes its own pattern into the guest's half, rings the host (peer
//! `vmlink.peer=`, vector `vmlink.vector=` from the kernel command line), then tries to
//! bind the device to `uio_pci_generic`, then to `vfio-pci` when the device has an IOMMU
//! group, where it wires MSI-X vector 0 to an eventfd and times rounds of ringing the host
//! on vector 0 and being rung back, and reports what it found. Every result is one console line
//! `VMLINK-IVSHMEM <event> key=value ...`; then it powers the VM off.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use nix::kmod::{ModuleInitFlags, finit_module};
use nix::mount::{MsFlags, mount};
use nix::sys::reboot::{RebootMode, reboot};
use vmlink_ivshmem::boot::LINE_PREFIX;
use vmlink_ivshmem::guest::{Device, find_devices};
use vmlink_ivshmem::vfio::MsixVectors;

#[path = "vmlink-ivshmem-guest/channel.rs"]
mod channel;
#[path = "vmlink-ivshmem-guest/pipe.rs"]
mod pipe;

/// Byte `i` of the pattern peer `who` writes (the host test computes the same).
fn pattern(who: u32, i: usize) -> u8 {
    (i.wrapping_mul(13) as u32)
        .wrapping_add(who.wrapping_mul(7))
        .wrapping_add(0x5a) as u8
}

/// Bytes of pattern each side writes.
const PATTERN_LEN: usize = 4096;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{LINE_PREFIX}{line}");
    let _ = out.flush();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if matches!(args.first().map(String::as_str), Some("connect" | "serve")) {
        std::process::exit(pipe::main(&args));
    }
    if std::process::id() != 1 {
        eprintln!(
            "vmlink-ivshmem-guest is a VM's init: it runs only as PID 1 and powers the machine off \
             (or `vmlink-ivshmem-guest connect|serve`: a pipe with `vmlink ivshmem-server`)"
        );
        std::process::exit(2);
    }
    let start = Instant::now();
    let mounts = [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ];
    for (src, target, fs) in mounts {
        if let Err(e) = mount(Some(src), target, Some(fs), MsFlags::empty(), None::<&str>) {
            say(&format!("mount target={target} error={e}"));
        }
    }
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let uptime = uptime.split_whitespace().next().unwrap_or("?");
    say(&format!("start uptime={uptime}"));
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let param = |key: &str| -> Option<String> {
        cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('=').map(str::to_owned))
    };
    let peer: u16 = param("vmlink.peer")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let vector: u16 = param("vmlink.vector")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);

    let mode = param("vmlink.mode").unwrap_or_default();
    let ok = match mode.as_str() {
        "channel" => report(channel::serve(&param)),
        "conformance" => report(channel::conformance(&param)),
        "pipe" => report(pipe::init_mode().map_err(|e| e.to_string().into())),
        "heartbeat" => report(channel::heartbeat(peer, vector)),
        _ => {
            let ok = report(run(peer, vector));
            load_modules();
            if let Some(dev) = find_devices(Path::new("/sys/bus/pci/devices"))
                .ok()
                .and_then(|d| d.into_iter().next())
            {
                try_uio(&dev);
                if try_vfio(&dev) {
                    msix_probe(&dev, peer);
                }
            }
            ok
        }
    };
    say(&format!(
        "done ok={} ms={}",
        u8::from(ok),
        start.elapsed().as_millis()
    ));
    nix::unistd::sync();
    let _ = reboot(RebootMode::RB_POWER_OFF);
    // Only reached if the power-off failed: PID 1 must not exit.
    loop {
        std::thread::park();
    }
}

/// Reports an error as an `error` line; true when there was none.
fn report(result: Result<(), Box<dyn std::error::Error>>) -> bool {
    match result {
        Ok(()) => true,
        Err(e) => {
            say(&format!("error message={:?}", e.to_string()));
            false
        }
    }
}

fn run(peer: u16, vector: u16) -> Result<(), Box<dyn std::error::Error>> {
    let devices = find_devices(Path::new("/sys/bus/pci/devices"))?;
    let path = devices.first().ok_or("no ivshmem device")?;
    let dev = Device::open(path)?;
    let id = dev.iv_position()?;
    let header = dev.header()?;
    let buffer = header.layout.buffer();
    let channels = header.layout.channels().len();
    say(&format!(
        "device path={} devices={} iv_position={id} bar2={} header=v{}.{} channels={channels} buffer_offset={} buffer_len={}",
        path.display(),
        devices.len(),
        dev.memory_len(),
        header.version.major,
        header.version.minor,
        buffer.offset,
        buffer.len,
    ));
    // The host's pattern, first page of the buffer area (the host's half).
    let host_at = usize::try_from(buffer.offset)?;
    let mut got = vec![0u8; PATTERN_LEN];
    dev.read_memory(host_at, &mut got)?;
    let host_ok = got.iter().enumerate().all(|(i, &b)| b == pattern(0, i));
    // Ours, first page of the guest's half.
    let guest_at = host_at + usize::try_from(buffer.len / 2)?;
    let ours: Vec<u8> = (0..PATTERN_LEN).map(|i| pattern(id, i)).collect();
    dev.write_memory(guest_at, &ours)?;
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    dev.ring(peer, vector)?;
    say(&format!(
        "exchange host_pattern={} wrote_offset={guest_at} wrote_len={PATTERN_LEN} rang_peer={peer} rang_vector={vector}",
        if host_ok { "ok" } else { "bad" },
    ));
    Ok(())
}

/// Loads every module `/lib/modules/order` names, in order, and reports each.
fn load_modules() {
    let order = std::fs::read_to_string("/lib/modules/order").unwrap_or_default();
    for name in order.lines().filter(|l| !l.is_empty()) {
        let result = File::open(Path::new("/lib/modules").join(name))
            .map_err(|e| e.to_string())
            .and_then(|f| {
                finit_module(&f, c"", ModuleInitFlags::empty()).map_err(|e| e.to_string())
            });
        let result = match result {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("{e:?}").replace(' ', "_"),
        };
        say(&format!("module name={name} result={result}"));
    }
}

/// Tries to bind the device to `uio_pci_generic` and reports whether it took it.
fn try_uio(dev: &Path) {
    let new_id = std::fs::write("/sys/bus/pci/drivers/uio_pci_generic/new_id", "1af4 1110");
    let driver = std::fs::read_link(dev.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "none".into());
    let uio = std::fs::read_dir(dev.join("uio"))
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .unwrap_or_else(|| "none".into());
    let irq = std::fs::read_to_string(dev.join("irq")).unwrap_or_default();
    // The PCI Interrupt Pin register (config space 0x3d): 0 means no INTx.
    let pin = std::fs::read(dev.join("config"))
        .ok()
        .and_then(|c| c.get(0x3d).copied())
        .map_or_else(|| "?".to_owned(), |p| p.to_string());
    say(&format!(
        "uio new_id={} driver={driver} uio={uio} dev_node={} irq={} intx_pin={pin}",
        match new_id {
            Ok(()) => "ok".to_owned(),
            Err(e) => e.kind().to_string().replace(' ', "_"),
        },
        Path::new("/dev").join(&uio).exists(),
        irq.trim(),
    ));
}

/// Reports whether VFIO can take the device: it needs an IOMMU group (Debian's kernel has
/// no VFIO no-IOMMU mode). With one, the device is moved from its driver to `vfio-pci`
/// (`driver_override`) and the group's `/dev/vfio/N` node is looked for. True when the
/// device ended up on `vfio-pci` with its group's node there.
fn try_vfio(dev: &Path) -> bool {
    let group = std::fs::read_link(dev.join("iommu_group"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let noiommu = Path::new("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode").exists();
    let Some(group) = group else {
        say(&format!("vfio iommu_group=none noiommu_param={noiommu}"));
        return false;
    };
    let name = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let step = |what: &str, r: std::io::Result<()>| match r {
        Ok(()) => format!("{what}=ok"),
        Err(e) => format!("{what}={}", e.kind().to_string().replace(' ', "_")),
    };
    let over = step(
        "override",
        std::fs::write(dev.join("driver_override"), "vfio-pci"),
    );
    let unbind = if dev.join("driver").exists() {
        step("unbind", std::fs::write(dev.join("driver/unbind"), &name))
    } else {
        "unbind=none".to_owned()
    };
    let probe = step("probe", std::fs::write("/sys/bus/pci/drivers_probe", &name));
    let driver = std::fs::read_link(dev.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "none".into());
    let node = Path::new("/dev/vfio").join(&group).exists();
    say(&format!(
        "vfio iommu_group={group} noiommu_param={noiommu} {over} {unbind} {probe} driver={driver} dev_node={node}"
    ));
    driver == "vfio-pci" && node
}

/// Rounds of the MSI-X probe.
const MSIX_ROUNDS: usize = 10;

/// The host's doorbell as an interrupt in guest userspace: MSI-X vector 0 wired to an
/// eventfd through VFIO; then [`MSIX_ROUNDS`] rounds of ringing the host on vector 0 and
/// waiting (20 s at most) for the host to ring us back.
fn msix_probe(dev: &Path, peer: u16) {
    let result = (|| -> Result<String, Box<dyn std::error::Error>> {
        let msix = MsixVectors::open(dev, 64)?;
        let device = Device::open(dev)?;
        let bell = &msix.vectors()[0];
        let mut times = Vec::new();
        for _ in 0..MSIX_ROUNDS {
            let t = Instant::now();
            device.ring(peer, 0)?;
            let deadline = Instant::now() + std::time::Duration::from_secs(20);
            if !bell.wait_readable(Some(deadline))? {
                return Ok(format!("result=timeout rounds={}", times.len()));
            }
            bell.drain()?;
            times.push(t.elapsed().as_micros());
        }
        times.sort_unstable();
        Ok(format!(
            "result=interrupt vectors={} rounds={} round_trip_us_min={} round_trip_us_median={}",
            msix.vectors().len(),
            times.len(),
            times[0],
            times[times.len() / 2]
        ))
    })();
    match result {
        Ok(fields) => say(&format!("msix {fields}")),
        Err(e) => say(&format!("msix result=error message={:?}", e.to_string())),
    }
}
