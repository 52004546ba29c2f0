//! The real thing: our ivshmem server, a real QEMU (`-accel tcg`, never KVM) with an
//! `ivshmem-doorbell` device connected to it, and a real Linux kernel (Debian's) booting an
//! initramfs this test builds around our static musl init (`vmlink-ivshmem-guest`).
//!
//! The first test (the default `pc` machine): the host writes a pattern into its half of
//! the buffer area before the boot. The guest finds the PCI device in sysfs, maps BAR0 and
//! BAR2, reads its IVPosition and vmlink's memory header through BAR2, checks the host's
//! pattern, writes its own into its half of the buffer area and rings the host's peer on
//! vector 1 through the Doorbell register; then it loads the UIO and VFIO modules from the
//! initramfs, tries them on the device, reports every result on the serial console and
//! powers off. The host checks the guest's pattern in the memfd, that its own vector-1
//! eventfd fired (and vector 0 did not), and that the server saw the QEMU peer come and go.
//!
//! The second test (`q35` with QEMU's emulated Intel IOMMU): the host's doorbell reaches
//! guest userspace as an MSI-X interrupt through `vfio-pci`, ten round trips.
//!
//! Needs `qemu-system-x86_64`, a kernel in `/boot` (`VMLINK_QEMU` / `VMLINK_KERNEL`
//! override them) and the `x86_64-unknown-linux-musl` Rust target. Where one is missing
//! the tests print `SKIPPED: <reason>` and pass, unless `VMLINK_REQUIRE_QEMU=1`, which
//! turns that into a failure. The consoles are left in `target/ivshmem-boot/*.log`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmlink_ivshmem::boot::{self, DoorbellDevice, Kernel};
use vmlink_ivshmem::{LOCAL_PEER, Server, ServerConfig, ServerEvent};

/// How long QEMU may run, boot included, before it is killed.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes of pattern each side writes (as the guest's init).
const PATTERN_LEN: usize = 4096;
/// The vector the guest rings us on.
const VECTOR: u16 = 1;

/// Byte `i` of the pattern peer `who` writes (as the guest's init computes it).
fn pattern(who: u32, i: usize) -> u8 {
    (i.wrapping_mul(13) as u32)
        .wrapping_add(who.wrapping_mul(7))
        .wrapping_add(0x5a) as u8
}

/// QEMU, a kernel and the musl target, or why not.
fn prerequisites() -> Result<(PathBuf, Kernel), String> {
    let qemu = boot::find_qemu()?;
    let kernel = Kernel::find()?;
    let sysroot = std::process::Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("cannot run rustc: {e}"))?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_owned();
    let musl = Path::new(&sysroot).join("lib/rustlib/x86_64-unknown-linux-musl");
    if !musl.is_dir() {
        return Err("the x86_64-unknown-linux-musl target is not installed (rustup target add x86_64-unknown-linux-musl)".into());
    }
    Ok((qemu, kernel))
}

fn field<'a>(fields: &'a [(String, String)], key: &str) -> &'a str {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key}= in {fields:?}"))
}

/// One QEMU at a time: the machine has two CPUs.
static ONE_QEMU: Mutex<()> = Mutex::new(());

/// What a boot needs, built once per test.
struct Prepared {
    qemu: PathBuf,
    kernel: Kernel,
    work: PathBuf,
    initrd: PathBuf,
    init_len: usize,
    archive_len: usize,
    modules: Vec<String>,
    build_time: Duration,
}

/// Checks the prerequisites (skipping or failing as `VMLINK_REQUIRE_QEMU` says), builds
/// the guest's init and an initramfs named `name`.
fn prepare(name: &str) -> Option<Prepared> {
    let (qemu, kernel) = match prerequisites() {
        Ok(p) => p,
        Err(reason) => {
            if std::env::var("VMLINK_REQUIRE_QEMU").as_deref() == Ok("1") {
                panic!("QEMU is required (VMLINK_REQUIRE_QEMU=1) but unusable: {reason}");
            }
            println!("SKIPPED: {reason}");
            return None;
        }
    };
    let work = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/ivshmem-boot");
    std::fs::create_dir_all(&work).unwrap();
    let t = Instant::now();
    let init_path = boot::build_guest_init().unwrap_or_else(|e| panic!("{e}"));
    let build_time = t.elapsed();
    let init = std::fs::read(&init_path).unwrap();
    let (archive, modules) = boot::initramfs(&init, &kernel);
    let initrd = work.join(format!("{name}.cpio"));
    std::fs::write(&initrd, &archive).unwrap();
    Some(Prepared {
        qemu,
        kernel,
        work,
        initrd,
        init_len: init.len(),
        archive_len: archive.len(),
        modules,
        build_time,
    })
}

#[test]
fn a_linux_guest_under_qemu_shares_memory_and_rings_the_server() {
    let _one = ONE_QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let test_start = Instant::now();
    let Some(Prepared {
        qemu,
        kernel,
        work,
        initrd,
        init_len,
        archive_len,
        modules,
        build_time,
    }) = prepare("boot")
    else {
        return;
    };

    // The server, in a private directory, and the host's pattern in its half of the buffer.
    let dir = work.join(format!("sock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let server = Server::bind(dir.join("ivshmem.sock"), ServerConfig::default()).unwrap();
    let layout = server.memory().layout();
    let buffer = server.memory().buffer();
    let host_pattern: Vec<u8> = (0..PATTERN_LEN).map(|i| pattern(0, i)).collect();
    buffer.write(0, &host_pattern).unwrap();

    let boot = boot::run_qemu(
        &qemu,
        &kernel,
        &initrd,
        &[],
        Some(DoorbellDevice {
            socket: server.path(),
            vectors: 2,
        }),
        &format!("vmlink.peer={LOCAL_PEER} vmlink.vector={VECTOR}"),
        BOOT_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let console = boot.console();
    std::fs::write(work.join("boot-console.log"), &console).unwrap();
    let fail = |what: &str| -> ! {
        panic!(
            "{what}\n--- console ({} lines) ---\n{console}--- qemu stderr ---\n{}",
            boot.lines.len(),
            boot.stderr
        )
    };
    if boot.status.is_none() {
        fail(&format!(
            "QEMU did not finish within {BOOT_TIMEOUT:?} and was killed"
        ));
    }

    // The guest's report.
    let Some((t_start, start)) = boot.event("start") else {
        fail("the guest's init never reported (no `start` line)")
    };
    let Some((_, device)) = boot.event("device") else {
        fail("the guest found no ivshmem device")
    };
    let Some((_, exchange)) = boot.event("exchange") else {
        fail("the guest did not finish its exchange")
    };
    let Some((t_done, done)) = boot.event("done") else {
        fail("the guest did not finish")
    };
    if let Some((_, e)) = boot.event("error") {
        fail(&format!("the guest reported an error: {e:?}"));
    }
    let id: u32 = field(&device, "iv_position").parse().unwrap();
    assert_eq!(id, 1, "the first client's id, read from IVPosition");
    assert_eq!(
        field(&device, "bar2"),
        layout.total_len().to_string(),
        "BAR2 is the whole memfd"
    );
    assert_eq!(
        field(&device, "header"),
        "v1.0",
        "vmlink's memory header, parsed in the guest"
    );
    assert_eq!(field(&device, "channels"), "1");
    assert_eq!(
        field(&device, "buffer_offset"),
        layout.buffer_offset().to_string()
    );
    assert_eq!(
        field(&exchange, "host_pattern"),
        "ok",
        "the guest read the host's pattern"
    );
    assert_eq!(field(&done, "ok"), "1");
    assert!(
        boot.status.unwrap().success(),
        "QEMU exits 0 on the guest's power-off: {:?}",
        boot.status
    );

    // The guest's pattern arrived in our memfd, where it said it wrote it.
    let wrote: usize = field(&exchange, "wrote_offset").parse().unwrap();
    let in_buffer = wrote - layout.buffer_offset() as usize;
    assert_eq!(
        in_buffer,
        buffer.len() / 2,
        "the guest writes its half of the buffer area"
    );
    let mut got = vec![0u8; PATTERN_LEN];
    buffer.read(in_buffer, &mut got).unwrap();
    let expected: Vec<u8> = (0..PATTERN_LEN).map(|i| pattern(id, i)).collect();
    assert!(got == expected, "the guest's pattern in the memfd");

    // Its doorbell reached our eventfd for vector 1, and nothing rang vector 0.
    assert!(
        server.local_vector(VECTOR).unwrap().drain().unwrap(),
        "the guest's doorbell fired our eventfd"
    );
    assert!(
        !server.local_vector(0).unwrap().drain().unwrap(),
        "vector 0 was not rung"
    );

    // The server saw QEMU connect as peer 1 and leave when it exited.
    let mut events = Vec::new();
    while let Some(e) = server.next_event(Duration::from_secs(2)) {
        let last = matches!(e, ServerEvent::Disconnected { .. });
        events.push(e);
        if last {
            break;
        }
    }
    assert!(
        matches!(
            events.as_slice(),
            [
                ServerEvent::Connected { id: 1 },
                ServerEvent::Disconnected { id: 1 }
            ]
        ),
        "{events:?}"
    );
    assert!(server.peers().is_empty());

    // The figures.
    println!(
        "{} ; kernel {} ; guest init {} bytes, initramfs {} bytes (modules: {})",
        boot::qemu_version(&qemu).unwrap_or_default(),
        kernel.release,
        init_len,
        archive_len,
        modules.join(" ")
    );
    println!(
        "boot to userspace {:.2} s (QEMU start to the init's first line; guest uptime then {} s), init done at {:.2} s, QEMU exited at {:.2} s",
        t_start.as_secs_f64(),
        field(&start, "uptime"),
        t_done.as_secs_f64(),
        boot.elapsed.as_secs_f64()
    );
    for (_, line) in boot.guest_lines() {
        if line.starts_with("module") || line.starts_with("uio") || line.starts_with("vfio") {
            println!("guest: {line}");
        }
    }
    println!(
        "guest init build {:.1} s; whole test {:.1} s",
        build_time.as_secs_f64(),
        test_start.elapsed().as_secs_f64()
    );
    drop(server);
    std::fs::remove_dir(&dir).unwrap();
}

/// The host's doorbell as an interrupt in guest userspace. `ivshmem-doorbell` interrupts
/// only through MSI-X (it has no INTx pin, so `uio_pci_generic` binds but gets no IRQ), and
/// Debian's kernel has no VFIO no-IOMMU mode, so `vfio-pci` needs an IOMMU group: QEMU's
/// emulated Intel IOMMU gives it one (`-machine q35 -device intel-iommu`, `intel_iommu=on`).
/// Our init moves the device to `vfio-pci`, wires MSI-X vector 0 to an eventfd
/// (`vfio::MsixVectors`), and times rounds of ringing us on vector 0 while a host thread
/// rings it back on its vector 0 each time. The memory exchange works the same on q35.
#[test]
fn with_a_virtual_iommu_the_hosts_doorbell_reaches_guest_userspace_through_vfio_msix() {
    let _one = ONE_QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(p) = prepare("viommu") else {
        return;
    };
    let dir = p.work.join(format!("sock-viommu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let server = Server::bind(dir.join("ivshmem.sock"), ServerConfig::default()).unwrap();
    let done_flag = std::sync::atomic::AtomicBool::new(false);
    let (boot, answered) = std::thread::scope(|s| {
        // The host: each time the guest rings vector 0, ring it back on its vector 0.
        let host = s.spawn(|| {
            let bell = server.local_vector(0).unwrap();
            let mut answered = 0u32;
            while !done_flag.load(std::sync::atomic::Ordering::Acquire) {
                let deadline = Instant::now() + Duration::from_millis(200);
                if bell.wait_readable(Some(deadline)).unwrap()
                    && bell.drain().unwrap()
                    && server.ring(1, 0).is_ok()
                {
                    answered += 1;
                }
            }
            answered
        });
        let boot = boot::run_qemu(
            &p.qemu,
            &p.kernel,
            &p.initrd,
            &["-machine", "q35", "-device", "intel-iommu"],
            Some(DoorbellDevice {
                socket: server.path(),
                vectors: 2,
            }),
            &format!("intel_iommu=on vmlink.peer={LOCAL_PEER} vmlink.vector={VECTOR}"),
            BOOT_TIMEOUT,
        );
        done_flag.store(true, std::sync::atomic::Ordering::Release);
        (boot, host.join().unwrap())
    });
    let boot = boot.unwrap_or_else(|e| panic!("{e}"));
    let console = boot.console();
    std::fs::write(p.work.join("viommu-console.log"), &console).unwrap();
    let report = |event: &str| {
        boot.event(event)
            .unwrap_or_else(|| panic!("no {event} report\n{console}\n{}", boot.stderr))
            .1
    };
    let (uio, vfio, msix, done) = (
        report("uio"),
        report("vfio"),
        report("msix"),
        report("done"),
    );
    println!("guest (q35 + intel-iommu): uio {uio:?}");
    println!("guest (q35 + intel-iommu): vfio {vfio:?}");
    println!("guest (q35 + intel-iommu): msix {msix:?}; host answered {answered} rings");
    if let Some((t, _)) = boot.event("start") {
        println!(
            "guest (q35 + intel-iommu): boot to userspace {:.2} s, QEMU exited at {:.2} s",
            t.as_secs_f64(),
            boot.elapsed.as_secs_f64()
        );
    }
    assert_eq!(field(&done, "ok"), "1", "{console}");
    assert!(server.local_vector(VECTOR).unwrap().drain().unwrap());
    assert_eq!(
        field(&uio, "intx_pin"),
        "0",
        "ivshmem-doorbell has no INTx: {console}"
    );
    assert_eq!(
        field(&uio, "irq"),
        "0",
        "so uio_pci_generic gets no IRQ: {console}"
    );
    assert_ne!(field(&vfio, "iommu_group"), "none", "{console}");
    assert_eq!(field(&vfio, "driver"), "vfio-pci", "{console}");
    assert_eq!(field(&vfio, "dev_node"), "true", "{console}");
    assert_eq!(field(&msix, "result"), "interrupt", "{console}");
    assert_eq!(field(&msix, "rounds"), "10", "{console}");
    assert_eq!(answered, 10, "one answer per round");
    drop(server);
    std::fs::remove_dir(&dir).unwrap();
}
