//! Booting a Linux guest under QEMU for tests: finding QEMU and a kernel, building the
//! guest's init (this crate's `vmlink-ivshmem-guest`, static, for
//! `x86_64-unknown-linux-musl`) and an initramfs around it, and running QEMU under a
//! timeout while collecting the guest's serial console line by line.
//!
//! QEMU runs with `-accel tcg` only: KVM is not relied on. Kernel modules the guest may
//! load ([`GUEST_MODULES`]) are copied into the initramfs from the kernel's
//! `/lib/modules/<release>` when present (Debian ships them uncompressed).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::initramfs::Initramfs;

/// The prefix of every line the guest's init prints for the host to parse.
pub const LINE_PREFIX: &str = "VMLINK-IVSHMEM ";

/// Modules the guest's init loads, in dependency order, as paths under
/// `/lib/modules/<release>/`: UIO with its generic PCI driver, and VFIO's PCI driver.
pub const GUEST_MODULES: &[&str] = &[
    "kernel/drivers/uio/uio.ko",
    "kernel/drivers/uio/uio_pci_generic.ko",
    "kernel/virt/lib/irqbypass.ko",
    "kernel/drivers/vfio/vfio.ko",
    "kernel/drivers/vfio/vfio_virqfd.ko",
    "kernel/drivers/vfio/vfio_iommu_type1.ko",
    "kernel/drivers/vfio/pci/vfio-pci-core.ko",
    "kernel/drivers/vfio/pci/vfio-pci.ko",
];

/// A kernel to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The image (`/boot/vmlinuz-<release>`).
    pub image: PathBuf,
    /// Its release (`6.1.0-48-amd64`).
    pub release: String,
}

impl Kernel {
    /// The kernel named by `VMLINK_KERNEL` (a vmlinuz path), else the newest
    /// `/boot/vmlinuz-*`.
    pub fn find() -> Result<Self, String> {
        if let Some(path) = std::env::var_os("VMLINK_KERNEL") {
            let image = PathBuf::from(path);
            let release = image
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .unwrap_or_default()
                .to_owned();
            return if image.is_file() {
                Ok(Self { image, release })
            } else {
                Err(format!("VMLINK_KERNEL={} is not a file", image.display()))
            };
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
            .map_err(|e| format!("cannot read /boot: {e}"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            })
            .collect();
        found.sort();
        let image = found.pop().ok_or(
            "no /boot/vmlinuz-* (apt-get install --no-install-recommends linux-image-amd64)",
        )?;
        std::fs::File::open(&image).map_err(|e| format!("cannot read {}: {e}", image.display()))?;
        let release = image
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .unwrap_or_default()
            .to_owned();
        Ok(Self { image, release })
    }

    /// The kernel's modules directory.
    pub fn modules_dir(&self) -> PathBuf {
        Path::new("/lib/modules").join(&self.release)
    }
}

/// `qemu-system-x86_64`: `VMLINK_QEMU` if set, else the first on `PATH`.
pub fn find_qemu() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("VMLINK_QEMU") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("VMLINK_QEMU={} is not a file", path.display()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "qemu-system-x86_64 not found (apt-get install --no-install-recommends qemu-system-x86)"
                .to_owned()
        })
}

/// QEMU's version line (`QEMU emulator version ...`).
pub fn qemu_version(qemu: &Path) -> Option<String> {
    let out = Command::new(qemu).arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_owned)
}

/// Builds the guest's init for `x86_64-unknown-linux-musl` with a nested cargo into its
/// own target directory (`target/ivshmem-guest` of the workspace) and returns the binary.
pub fn build_guest_init() -> Result<PathBuf, String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target_dir = manifest.join("../../target/ivshmem-guest");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(manifest)
        .args([
            "build",
            "-p",
            "vmlink-ivshmem",
            "--bin",
            "vmlink-ivshmem-guest",
            "--features",
            "conformance",
            "--release",
            "--locked",
            "--target",
            "x86_64-unknown-linux-musl",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true")
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building the guest init failed ({status}); is the target installed? \
             (rustup target add x86_64-unknown-linux-musl)"
        ));
    }
    Ok(target_dir.join("x86_64-unknown-linux-musl/release/vmlink-ivshmem-guest"))
}

/// The initramfs: `/init` (the guest's init), `/dev/console`, empty mount points, and the
/// [`GUEST_MODULES`] the kernel has, under `/lib/modules/` with their load order in
/// `/lib/modules/order`. Returns the archive and the modules it holds.
pub fn initramfs(init: &[u8], kernel: &Kernel) -> (Vec<u8>, Vec<String>) {
    let mut a = Initramfs::new();
    a.dir("dev", 0o755)
        .char_device("dev/console", 0o600, 5, 1)
        .dir("proc", 0o755)
        .dir("sys", 0o755)
        .dir("lib", 0o755)
        .dir("lib/modules", 0o755);
    let mut names = Vec::new();
    for rel in GUEST_MODULES {
        let path = kernel.modules_dir().join(rel);
        if let Ok(data) = std::fs::read(&path) {
            let name = Path::new(rel)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            a.file(&format!("lib/modules/{name}"), 0o644, &data);
            names.push(name);
        }
    }
    let order: String = names.iter().map(|n| format!("{n}\n")).collect();
    a.file("lib/modules/order", 0o644, order.as_bytes());
    a.file("init", 0o755, init);
    (a.finish(), names)
}

/// One QEMU boot's outcome.
#[derive(Debug)]
pub struct Boot {
    /// Every console line, with the time since QEMU started.
    pub lines: Vec<(Duration, String)>,
    /// What QEMU wrote to stderr.
    pub stderr: String,
    /// QEMU's exit status (`None` when it was killed at the timeout).
    pub status: Option<ExitStatus>,
    /// From QEMU's start to its exit (or the kill).
    pub elapsed: Duration,
}

impl Boot {
    /// The guest's own lines (those with [`LINE_PREFIX`]), without the prefix.
    pub fn guest_lines(&self) -> impl Iterator<Item = (Duration, &str)> {
        self.lines.iter().filter_map(|(t, l)| {
            l.find(LINE_PREFIX)
                .map(|i| (*t, &l[i + LINE_PREFIX.len()..]))
        })
    }

    /// The first guest line whose first word is `event`: its time and its `key=value`
    /// fields.
    pub fn event(&self, event: &str) -> Option<(Duration, Vec<(String, String)>)> {
        self.guest_lines().find_map(|(t, l)| {
            let mut words = l.split_whitespace();
            (words.next() == Some(event)).then(|| {
                let fields = words
                    .filter_map(|w| w.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                (t, fields)
            })
        })
    }

    /// The whole console, for failure messages.
    pub fn console(&self) -> String {
        self.lines
            .iter()
            .map(|(t, l)| format!("[{:>7.3}] {l}\n", t.as_secs_f64()))
            .collect()
    }
}

/// An `ivshmem-doorbell` device for [`run_qemu`].
#[derive(Debug, Clone, Copy)]
pub struct DoorbellDevice<'a> {
    /// The ivshmem server's socket.
    pub socket: &'a Path,
    /// Interrupt vectors (`vectors=`), MSI-X vectors in the guest: `ivshmem-doorbell`
    /// has no INTx.
    pub vectors: u16,
}

/// Boots `kernel` with `initrd` under TCG (`-m 256`, serial on stdio, no default devices),
/// with `machine` arguments (e.g. `-machine q35 -device intel-iommu`, which come before
/// any device), an `ivshmem-doorbell` device when given, and `append` added to the kernel
/// command line; kills QEMU at `timeout`.
pub fn run_qemu(
    qemu: &Path,
    kernel: &Kernel,
    initrd: &Path,
    machine: &[&str],
    ivshmem: Option<DoorbellDevice<'_>>,
    append: &str,
    timeout: Duration,
) -> Result<Boot, String> {
    run_qemu_killable(
        qemu,
        kernel,
        initrd,
        machine,
        ivshmem,
        append,
        timeout,
        &AtomicBool::new(false),
    )
}

/// [`run_qemu`], also killing QEMU (`SIGKILL`) within 100 ms of `kill` turning true: a
/// guest that dies mid-stream. The boot's `status` then says it was killed.
#[allow(clippy::too_many_arguments)]
pub fn run_qemu_killable(
    qemu: &Path,
    kernel: &Kernel,
    initrd: &Path,
    machine: &[&str],
    ivshmem: Option<DoorbellDevice<'_>>,
    append: &str,
    timeout: Duration,
    kill: &AtomicBool,
) -> Result<Boot, String> {
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg", "-m", "256", "-nographic", "-no-reboot"])
        .args(["-nodefaults", "-serial", "stdio", "-kernel"])
        .arg(&kernel.image)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet {append}"))
        .args(machine);
    if let Some(dev) = ivshmem {
        cmd.arg("-chardev")
            .arg(format!("socket,path={},id=ivs", dev.socket.display()))
            .arg("-device")
            .arg(format!(
                "ivshmem-doorbell,chardev=ivs,vectors={}",
                dev.vectors
            ));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", qemu.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_owned();
            if tx.send((start.elapsed(), text)).is_err() {
                break;
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = start + timeout;
    let mut lines = Vec::new();
    let status = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => lines.push(line),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // stdout closed: QEMU is exiting.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break child.wait().ok();
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if kill.load(Ordering::Acquire) {
            let _ = child.kill();
            break child.wait().ok();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
    };
    let elapsed = start.elapsed();
    let _ = reader.join();
    lines.extend(rx.try_iter());
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Boot {
        lines,
        stderr,
        status,
        elapsed,
    })
}
