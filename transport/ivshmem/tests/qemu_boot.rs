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
//! Then the channel API between this process and the guest's userspace: the conformance
//! suite with side B in the guest; 10,000 calls and 64 MiB each way with digests checked on
//! both sides, then the server restarted while the guest waits (q35, MSI-X); and two
//! guests on one server, one killed mid-stream (its QEMU gets `SIGKILL`) while the other
//! goes on (`pc`, the victim polling). Each prints its figures.
//!
//! Needs `qemu-system-x86_64`, a kernel in `/boot` (`VMLINK_QEMU` / `VMLINK_KERNEL`
//! override them) and the `x86_64-unknown-linux-musl` Rust target. Where one is missing
//! the tests print `SKIPPED: <reason>` and pass, unless `VMLINK_REQUIRE_QEMU=1`, which
//! turns that into a failure. The consoles are left in `target/ivshmem-boot/*.log`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vmlink_channel::{ChannelError, Config, Received, Wait};
use vmlink_ivshmem::boot::{self, DoorbellDevice, Kernel};
use vmlink_ivshmem::channel::HostChannel;
use vmlink_ivshmem::conformance::GuestPairs;
use vmlink_ivshmem::exchange::{CHUNK, Digest, Pattern, op, op_word, word};
use vmlink_ivshmem::{LOCAL_PEER, PeerId, Server, ServerConfig, ServerEvent};

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

/// Bytes of each bulk transfer.
const TRANSFER: u64 = 64 << 20;
/// Calls in the call test.
const CALLS: u64 = 10_000;

/// A deadline `secs` from now.
fn within(secs: u64) -> Wait {
    Wait::Until(Instant::now() + Duration::from_secs(secs))
}

/// The first `Connected` event within `timeout`: the QEMU that just started.
fn connected(server: &Server, timeout: Duration) -> Result<PeerId, String> {
    let end = Instant::now() + timeout;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match server.next_event(left) {
            Some(ServerEvent::Connected { id }) => return Ok(id),
            Some(_) => {}
            None => break,
        }
    }
    Err("QEMU never connected to the server".into())
}

/// The payload of a received packet.
fn payload(buf: &[u8], r: &Received) -> Vec<u8> {
    buf[r.header_len..r.header_len + r.payload_len].to_vec()
}

/// Waits for the guest's `READY` on a fresh host channel.
fn ready(ch: &HostChannel) -> Result<(), String> {
    let mut buf = [0u8; 64];
    let r = ch
        .recv(&mut buf, within(BOOT_TIMEOUT.as_secs()))
        .map_err(|e| format!("no READY from the guest: {e}"))?;
    if buf[r.header_len] != op::READY {
        return Err(format!("the guest's first packet is not READY: {r:?}"));
    }
    Ok(())
}

/// Sends `bytes` of pattern `seed` as `DATA` chunks; returns the digest sent.
fn send_transfer(ch: &HostChannel, bytes: u64, seed: u64) -> Result<Digest, ChannelError> {
    let mut pattern = Pattern::new(seed);
    let mut digest = Digest::default();
    let mut packet = vec![0u8; 8 + CHUNK];
    packet[..8].copy_from_slice(&op_word(op::DATA));
    let mut left = bytes;
    while left > 0 {
        let n = (left as usize).min(CHUNK);
        pattern.fill(&mut packet[8..8 + n]);
        digest.update(&packet[8..8 + n]);
        ch.send(&packet[..8 + n], within(60))?;
        left -= n as u64;
    }
    Ok(digest)
}

/// Host figures of one phase: packets and doorbells each way, and the time it took.
struct Phase {
    name: &'static str,
    sent: u64,
    signals_sent: u64,
    received: u64,
    signals_received: u64,
    elapsed: Duration,
    bytes: u64,
}

impl Phase {
    fn line(&self) -> String {
        let moved = self.sent + self.received;
        let per = |s: u64| s as f64 / moved.max(1) as f64;
        let rate = if self.bytes > 0 {
            format!(
                ", {:.1} MiB/s",
                self.bytes as f64 / (1 << 20) as f64 / self.elapsed.as_secs_f64()
            )
        } else {
            String::new()
        };
        format!(
            "{}: {:.2} s{rate}; packets host->guest {}, guest->host {}; doorbells host->guest {} ({:.3} per packet moved), guest->host {} ({:.3} per packet moved)",
            self.name,
            self.elapsed.as_secs_f64(),
            self.sent,
            self.received,
            self.signals_sent,
            per(self.signals_sent),
            self.signals_received,
            per(self.signals_received)
        )
    }
}

/// Runs `f` on `ch` and returns its result with the host's counters over it.
fn phase<T>(
    ch: &HostChannel,
    name: &'static str,
    bytes: u64,
    f: impl FnOnce() -> Result<T, String>,
) -> Result<(T, Phase), String> {
    let (before, t) = (ch.counters(), Instant::now());
    let out = f()?;
    let (after, elapsed) = (ch.counters(), t.elapsed());
    Ok((
        out,
        Phase {
            name,
            sent: after.packets_sent - before.packets_sent,
            signals_sent: after.signals_sent - before.signals_sent,
            received: after.packets_received - before.packets_received,
            signals_received: after.signals_received - before.signals_received,
            elapsed,
            bytes,
        },
    ))
}

/// What the host side of the channel test saw.
struct HostRun {
    phases: Vec<Phase>,
    /// Digests of the host→guest transfer: what we sent, what the guest says it got.
    down: (u64, u64, u64),
    /// Of the guest→host transfer: what the guest says it sent, what we got, and what
    /// pattern `seed` gives.
    up: (u64, u64, u64, u64),
    /// Events the restarted server saw while the guest waited.
    after_restart: Vec<String>,
}

/// The host's side of the channel test: calls, 64 MiB each way, then the server restarted
/// while the guest waits.
fn channel_host(server: Server) -> Result<HostRun, String> {
    let id = connected(&server, Duration::from_secs(30))?;
    let ch = server
        .channel(id, 0, Config::default())
        .map_err(|e| e.to_string())?;
    ready(&ch)?;
    let mut phases = Vec::new();
    let err = |e: ChannelError| e.to_string();

    // Calls: the guest echoes each.
    let ((), p) = phase(&ch, "10,000 calls", 0, || {
        let mut request = op_word(op::ECHO).to_vec();
        request.extend_from_slice(&[0; 56]);
        let mut response = [0u8; 64];
        for i in 0..CALLS {
            request[8..16].copy_from_slice(&i.to_le_bytes());
            let n = ch.call(&request, &mut response, within(30)).map_err(err)?;
            if response[..n] != request[..] {
                return Err(format!("call {i}: the echo differs"));
            }
        }
        Ok(())
    })?;
    phases.push(p);

    // 64 MiB host → guest, then the guest's digest of it.
    let (down, p) = phase(&ch, "64 MiB host->guest", TRANSFER, || {
        let sent = send_transfer(&ch, TRANSFER, 1).map_err(err)?;
        let mut answer = [0u8; 16];
        let n = ch
            .call(&op_word(op::END), &mut answer, within(60))
            .map_err(err)?;
        if n != 16 || word(&answer, 1) != TRANSFER {
            return Err(format!("the guest's END answer: {:?}", &answer[..n]));
        }
        Ok((sent.value(), word(&answer, 0), sent.bytes()))
    })?;
    phases.push(p);

    // 64 MiB guest → host.
    let (up, p) = phase(&ch, "64 MiB guest->host", TRANSFER, || {
        let mut ask = op_word(op::SEND).to_vec();
        ask.extend_from_slice(&TRANSFER.to_le_bytes());
        ask.extend_from_slice(&2u64.to_le_bytes());
        ch.call(&ask, &mut [], within(30)).map_err(err)?;
        let mut got = Digest::default();
        let mut buf = vec![0u8; 8 + CHUNK + 64];
        loop {
            let r = ch.recv(&mut buf, within(60)).map_err(err)?;
            let p = payload(&buf, &r);
            match p[0] {
                op::DATA => got.update(&p[8..]),
                op::END => {
                    let mut expect = Digest::default();
                    let mut pattern = Pattern::new(2);
                    let mut chunk = vec![0u8; CHUNK];
                    for _ in 0..TRANSFER / CHUNK as u64 {
                        pattern.fill(&mut chunk);
                        expect.update(&chunk);
                    }
                    return Ok((word(&p, 1), got.value(), expect.value(), got.bytes()));
                }
                other => return Err(format!("unexpected packet {other} from the guest")),
            }
        }
    })?;
    phases.push(p);

    // The guest waits 8 s for a packet; meanwhile the server goes away and comes back on
    // the same socket.
    let mut wait = op_word(op::WAIT).to_vec();
    wait.extend_from_slice(&8u64.to_le_bytes());
    ch.call(&wait, &mut [], within(30)).map_err(err)?;
    let path = server.path().to_path_buf();
    drop(ch);
    drop(server);
    let again = Server::bind(&path, ServerConfig::default()).map_err(|e| e.to_string())?;
    let mut after_restart = Vec::new();
    while let Some(e) = again.next_event(Duration::from_secs(3)) {
        after_restart.push(format!("{e:?}"));
    }
    if !again.peers().is_empty() {
        after_restart.push(format!("peers {:?}", again.peers()));
    }
    Ok(HostRun {
        phases,
        down,
        up,
        after_restart,
    })
}

/// The channel API between this process and a Linux guest's userspace, over ivshmem, with
/// the guest taking the host's doorbells as MSI-X interrupts through `vfio-pci` (q35 with
/// QEMU's emulated Intel IOMMU). One boot runs, in order: 10,000 calls the guest echoes;
/// 64 MiB host→guest and 64 MiB guest→host, each digest computed by both sides (and the
/// guest→host one also from the pattern's seed); and the server dropped and bound again
/// on the same socket while the guest waits 8 s for a packet. What the guest sees then is
/// silence: QEMU connects to a server once and keeps the old memory mapped, so the guest's
/// wait ends at its deadline (`TimedOut`, not `Closed`) and the new server sees no peer.
#[test]
fn a_channel_carries_calls_and_64_mib_each_way_between_the_host_and_a_linux_guest() {
    let _one = ONE_QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(p) = prepare("channel") else {
        return;
    };
    let dir = p.work.join(format!("sock-channel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let server = Server::bind(dir.join("ivshmem.sock"), ServerConfig::default()).unwrap();
    let socket = server.path().to_path_buf();
    let (boot, host) = std::thread::scope(|s| {
        let host = s.spawn(move || channel_host(server));
        let boot = boot::run_qemu(
            &p.qemu,
            &p.kernel,
            &p.initrd,
            &["-machine", "q35", "-device", "intel-iommu"],
            Some(DoorbellDevice {
                socket: &socket,
                vectors: 2,
            }),
            "intel_iommu=on vmlink.mode=channel vmlink.peer=0",
            BOOT_TIMEOUT,
        );
        (boot, host.join().unwrap())
    });
    let boot = boot.unwrap_or_else(|e| panic!("{e}"));
    let console = boot.console();
    std::fs::write(p.work.join("channel-console.log"), &console).unwrap();
    let host = host.unwrap_or_else(|e| panic!("host: {e}\n{console}\n{}", boot.stderr));
    let report = |event: &str| {
        boot.event(event)
            .unwrap_or_else(|| panic!("no {event} report\n{console}\n{}", boot.stderr))
            .1
    };
    let (channel, received, sent, wait, counters, done) = (
        report("channel"),
        report("received"),
        report("sent"),
        report("wait"),
        report("counters"),
        report("done"),
    );
    if let Some((_, e)) = boot.event("error") {
        panic!("the guest reported an error: {e:?}\n{console}");
    }
    assert_eq!(field(&done, "ok"), "1", "{console}");
    assert_eq!(
        field(&channel, "interrupts"),
        "msix",
        "the guest takes our doorbells as MSI-X interrupts: {console}"
    );
    // 64 MiB down: the guest's digest is ours.
    let (down_sent, down_guest, down_bytes) = host.down;
    assert_eq!(down_bytes, TRANSFER);
    assert_eq!(down_guest, down_sent, "host->guest digests");
    assert_eq!(field(&received, "bytes"), TRANSFER.to_string());
    assert_eq!(field(&received, "digest"), format!("{down_sent:016x}"));
    assert_eq!(field(&received, "calls_served"), CALLS.to_string());
    // 64 MiB up: the guest's digest, ours and the seed's agree.
    let (up_guest, up_host, up_seed, up_bytes) = host.up;
    assert_eq!(up_bytes, TRANSFER);
    assert_eq!(up_host, up_guest, "guest->host digests");
    assert_eq!(up_host, up_seed, "guest->host data is the seed's pattern");
    assert_eq!(field(&sent, "digest"), format!("{up_guest:016x}"));
    // The restart: the guest saw silence, the new server no peer.
    assert_eq!(field(&wait, "result"), "timed_out", "{console}");
    assert!(host.after_restart.is_empty(), "{:?}", host.after_restart);
    assert!(
        boot.status.is_some_and(|s| s.success()),
        "QEMU powers off cleanly after the server left: {:?}\n{}",
        boot.status,
        boot.stderr
    );
    // The figures.
    for phase in &host.phases {
        println!(
            "ivshmem channel (q35 + intel-iommu, MSI-X): {}",
            phase.line()
        );
    }
    println!(
        "guest: channel {channel:?}; received {received:?}; sent {sent:?}; counters {counters:?}; wait {wait:?}"
    );
    if let Some((t, _)) = boot.event("start") {
        println!(
            "boot to userspace {:.2} s, QEMU exited at {:.2} s",
            t.as_secs_f64(),
            boot.elapsed.as_secs_f64()
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Bytes streamed to the guest before it is killed.
const BEFORE_KILL: u64 = 8 << 20;

/// What the host side of the kill test saw.
struct KillRun {
    victim: PeerId,
    survivor: PeerId,
    /// Bytes the guest took before it died, and how the next send ended.
    streamed: u64,
    outcome: Result<(), ChannelError>,
    /// From the kill to the host channel's error.
    to_error: Duration,
    /// How the server reported the victim's departure.
    departure: String,
    /// The survivor rang us after the kill; the server lists it alone; ringing it works.
    survivor_rang: bool,
    peers_after: Vec<PeerId>,
    ring_survivor: Result<(), String>,
    /// The stream to the polling victim before the kill: time, doorbells each way, packets.
    polling: Option<(Duration, u64, u64, u64)>,
}

/// The host's side of the kill test: streams to the victim, kills its QEMU, and checks the
/// survivor.
fn kill_host(
    server: &Server,
    victim_up: &AtomicBool,
    kill: &AtomicBool,
) -> Result<KillRun, String> {
    let victim = connected(server, Duration::from_secs(30))?;
    victim_up.store(true, Ordering::Release);
    let survivor = connected(server, Duration::from_secs(30))?;
    let ch = server
        .channel(victim, 0, Config::default())
        .map_err(|e| e.to_string())?;
    ready(&ch)?;
    // The survivor rings vector 1 every 100 ms once its init runs: wait for that, so it
    // is alive when the victim dies.
    let beat = server.local_vector(1).map_err(|e| e.to_string())?;
    if !beat
        .wait_readable(Some(Instant::now() + BOOT_TIMEOUT))
        .map_err(|e| e.to_string())?
    {
        return Err("the survivor never rang".into());
    }
    let mut packet = vec![0u8; 8 + CHUNK];
    packet[..8].copy_from_slice(&op_word(op::DATA));
    let mut streamed = 0u64;
    let mut killed_at = None;
    let (stream_start, before) = (Instant::now(), ch.counters());
    let mut polling = None;
    let outcome = loop {
        if streamed >= BEFORE_KILL && killed_at.is_none() {
            let after = ch.counters();
            polling = Some((
                stream_start.elapsed(),
                after.signals_sent - before.signals_sent,
                after.signals_received - before.signals_received,
                after.packets_sent - before.packets_sent,
            ));
            kill.store(true, Ordering::Release);
            killed_at = Some(Instant::now());
        }
        if let Err(e) = ch.send(&packet, within(30)) {
            break Err(e);
        }
        streamed += CHUNK as u64;
        if streamed > 4 * TRANSFER {
            break Ok(());
        }
    };
    let to_error = killed_at.map_or(Duration::ZERO, |t| t.elapsed());
    let mut departure = String::from("none");
    while let Some(e) = server.next_event(Duration::from_secs(10)) {
        match e {
            ServerEvent::Disconnected { id } | ServerEvent::Dropped { id, .. } if id == victim => {
                departure = format!("{e:?}");
                break;
            }
            _ => {}
        }
    }
    // The survivor still rings.
    let _ = beat.drain();
    let survivor_rang = beat
        .wait_readable(Some(Instant::now() + Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let peers_after = server.peers();
    let ring_survivor = server.ring(survivor, 1).map_err(|e| e.to_string());
    // Tell the survivor to stop.
    let buffer = server.memory().buffer();
    buffer
        .write(buffer.len() - 8, &[1; 8])
        .map_err(|e| e.to_string())?;
    Ok(KillRun {
        victim,
        survivor,
        streamed,
        outcome,
        to_error,
        departure,
        survivor_rang,
        peers_after,
        ring_survivor,
        polling,
    })
}

/// A guest killed mid-stream: two QEMUs on one server, the victim (a polling guest, on
/// the `pc` machine) taking a stream over the channel, the survivor ringing us on vector 1
/// every 100 ms. After 8 MiB the victim's QEMU is killed (`SIGKILL`): the server reports
/// it gone, the host's channel ends with `Closed` (its send was waiting for room the dead
/// guest will never make, and the doorbell's hang-up fd told it), and the survivor is still
/// connected, still rings us, and is rung by us, until we write its stop flag.
#[test]
fn a_guest_killed_mid_stream_closes_the_hosts_channel_and_spares_the_other_peer() {
    let _one = ONE_QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(p) = prepare("kill") else {
        return;
    };
    let dir = p.work.join(format!("sock-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let server = Server::bind(dir.join("ivshmem.sock"), ServerConfig::default()).unwrap();
    let (kill, victim_up) = (AtomicBool::new(false), AtomicBool::new(false));
    let device = DoorbellDevice {
        socket: server.path(),
        vectors: 2,
    };
    let (victim, survivor, host) = std::thread::scope(|s| {
        let host = s.spawn(|| kill_host(&server, &victim_up, &kill));
        let victim = s.spawn(|| {
            boot::run_qemu_killable(
                &p.qemu,
                &p.kernel,
                &p.initrd,
                &[],
                Some(device),
                "vmlink.mode=channel vmlink.poll=1 vmlink.peer=0",
                BOOT_TIMEOUT,
                &kill,
            )
        });
        // The survivor connects second, so the ids say which is which.
        let t = Instant::now();
        while !victim_up.load(Ordering::Acquire) && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let survivor = boot::run_qemu(
            &p.qemu,
            &p.kernel,
            &p.initrd,
            &[],
            Some(device),
            "vmlink.mode=heartbeat vmlink.peer=0 vmlink.vector=1",
            BOOT_TIMEOUT,
        );
        let host = host.join().unwrap();
        // Should the host have failed before the kill, do not leave the victim running.
        kill.store(true, Ordering::Release);
        (victim.join().unwrap(), survivor, host)
    });
    let (victim, survivor) = (
        victim.unwrap_or_else(|e| panic!("{e}")),
        survivor.unwrap_or_else(|e| panic!("{e}")),
    );
    let (vc, sc) = (victim.console(), survivor.console());
    std::fs::write(p.work.join("kill-victim-console.log"), &vc).unwrap();
    std::fs::write(p.work.join("kill-survivor-console.log"), &sc).unwrap();
    let host = host.unwrap_or_else(|e| {
        panic!(
            "host: {e}
--- victim ---
{vc}
--- survivor ---
{sc}"
        )
    });
    let channel = victim
        .event("channel")
        .unwrap_or_else(|| panic!("the victim never opened its channel\n{vc}"))
        .1;
    assert_eq!(field(&channel, "interrupts"), "polling", "{vc}");
    assert!(host.streamed >= BEFORE_KILL);
    assert_eq!(
        host.outcome,
        Err(ChannelError::Closed),
        "the host's channel sees the killed guest gone"
    );
    assert!(
        host.departure.contains(&format!("id: {}", host.victim)),
        "the server reports the victim gone: {}",
        host.departure
    );
    assert!(host.survivor_rang, "the survivor still rings us\n{sc}");
    assert_eq!(host.peers_after, [host.survivor]);
    assert_eq!(host.ring_survivor, Ok(()));
    let beat = survivor
        .event("beat")
        .unwrap_or_else(|| panic!("the survivor never finished\n{sc}"))
        .1;
    assert_eq!(field(&beat, "stopped"), "flag", "{sc}");
    assert!(
        survivor.status.is_some_and(|s| s.success()),
        "the survivor powers off cleanly: {:?}\n{sc}",
        survivor.status
    );
    println!(
        "kill: victim (peer {}, polling) killed after 8 MiB; the host had sent {} MiB when its send ended with {:?}, {:.0} ms after the kill; the server reported {}; the survivor (peer {}) rang {} times and stopped on its flag",
        host.victim,
        host.streamed >> 20,
        host.outcome,
        host.to_error.as_secs_f64() * 1000.0,
        host.departure,
        host.survivor,
        field(&beat, "rings")
    );
    if let Some((t, to_guest, to_host, packets)) = host.polling {
        println!(
            "polling guest (pc): 8 MiB host->guest in {:.2} s, {:.1} MiB/s; {packets} packets, doorbells host->guest {to_guest} ({:.3} per packet), guest->host {to_host} ({:.3} per packet)",
            t.as_secs_f64(),
            8.0 / t.as_secs_f64(),
            to_guest as f64 / packets.max(1) as f64,
            to_host as f64 / packets.max(1) as f64
        );
    }
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The channel conformance suite with side B in a Linux guest's userspace (q35 with QEMU's
/// emulated Intel IOMMU, so the guest takes our doorbells as MSI-X interrupts): every
/// check of `vmlink_channel::conformance`, each on a fresh pair of the check's ring size
/// in the ivshmem memory, set up through the mailbox of `vmlink_ivshmem::conformance`.
#[test]
fn the_conformance_suite_passes_with_side_b_in_a_linux_guest() {
    let _one = ONE_QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(p) = prepare("conformance") else {
        return;
    };
    let dir = p
        .work
        .join(format!("sock-conformance-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let server = Server::bind(dir.join("ivshmem.sock"), ServerConfig::default()).unwrap();
    let (boot, host) = std::thread::scope(|s| {
        let host = s.spawn(|| {
            let id = connected(&server, Duration::from_secs(30))?;
            let pairs = GuestPairs::new(&server, id, BOOT_TIMEOUT).map_err(|e| e.to_string())?;
            let t = Instant::now();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                vmlink_channel::conformance::run_all(&pairs)
            }));
            // Dropping the pairs tells the guest there are no more checks.
            drop(pairs);
            result.map_err(|e| {
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default()
            })?;
            Ok::<_, String>(t.elapsed())
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
            "intel_iommu=on vmlink.mode=conformance vmlink.peer=0",
            BOOT_TIMEOUT,
        );
        (boot, host.join().unwrap())
    });
    let boot = boot.unwrap_or_else(|e| panic!("{e}"));
    let console = boot.console();
    std::fs::write(p.work.join("conformance-console.log"), &console).unwrap();
    let elapsed = host.unwrap_or_else(|e| panic!("side A: {e}\n{console}\n{}", boot.stderr));
    let checks: Vec<String> = boot
        .guest_lines()
        .filter(|(_, l)| l.starts_with("check "))
        .map(|(_, l)| l.to_owned())
        .collect();
    let (_, mode) = boot
        .event("conformance")
        .unwrap_or_else(|| panic!("the guest never served the suite\n{console}"));
    let (_, done) = boot
        .event("conformance_done")
        .unwrap_or_else(|| panic!("the guest did not finish\n{console}"));
    assert_eq!(field(&done, "failed"), "0", "{console}");
    assert_eq!(
        checks.len(),
        vmlink_channel::conformance::Check::ALL.len(),
        "{checks:?}"
    );
    assert_eq!(field(&mode, "interrupts"), "msix", "{console}");
    assert!(boot.status.is_some_and(|s| s.success()), "{console}");
    println!(
        "conformance: {} checks, side B in the guest ({}), {:.1} s",
        checks.len(),
        field(&mode, "interrupts"),
        elapsed.as_secs_f64()
    );
    for c in &checks {
        println!("guest: {c}");
    }
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
}
