//! `vmlink-ivshmem-guest connect` / `serve`: the guest's end of `vmlink ivshmem-server`'s
//! pipe, run as root in a guest with an `ivshmem-doorbell` device. Stdin goes to the host,
//! what the host sends comes out on stdout, in both directions at once, framed as
//! `vmlink serve` frames (`[length: u32 LE][flags: u32 LE][data]`, flag 1 ending a
//! direction). The command exits when both directions are finished.
//!
//! The host's doorbells arrive as MSI-X interrupts when the device is bound to `vfio-pci`
//! (a guest with an IOMMU), else the guest polls; stderr says which.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use vmlink_channel::{ChannelError, Config, Wait};
use vmlink_ivshmem::channel::{GuestChannel, Interrupts, guest_channel};
use vmlink_ivshmem::guest::{Device, find_devices};
use vmlink_ivshmem::vfio::MsixVectors;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The frame flag ending a direction.
const FIN: u32 = 1;
/// Data bytes per frame at most (as `vmlink serve`'s).
const CHUNK: usize = 60 * 1024;
/// A polling wait's sleep.
const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_micros(100);

const USAGE: &str =
    "usage: vmlink-ivshmem-guest connect|serve [--device /sys/bus/pci/devices/ADDR] [--poll]
  Pipes stdin to the host's `vmlink ivshmem-server` and what it sends to stdout (as root,
  in a QEMU guest with an ivshmem-doorbell device). `serve` and `connect` are the same pipe:
  over ivshmem the host's server is always the listening side.";

/// Runs the pipe mode `args` names (`connect` or `serve` and its options); the exit code.
pub fn main(args: &[String]) -> i32 {
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vmlink-ivshmem-guest: {e}");
            2
        }
    }
}

fn run(args: &[String]) -> Result<(), BoxError> {
    let mut device: Option<PathBuf> = None;
    let mut poll = false;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--device" => device = Some(it.next().ok_or("--device needs a path")?.into()),
            "--poll" => poll = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    let path = match device {
        Some(p) => p,
        None => find_devices(Path::new("/sys/bus/pci/devices"))?
            .into_iter()
            .next()
            .ok_or("no ivshmem device (1af4:1110) in /sys/bus/pci/devices")?,
    };
    let driver = std::fs::read_link(path.join("driver"))
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
    let interrupts = if !poll && driver.as_deref() == Some("vfio-pci") {
        Interrupts::Msix(MsixVectors::open(&path, 64)?)
    } else {
        Interrupts::Polling(POLL_INTERVAL)
    };
    eprintln!(
        "vmlink-ivshmem-guest: {} ({}), interrupts: {}",
        path.display(),
        driver.as_deref().unwrap_or("no driver"),
        interrupts.name()
    );
    let dev = Device::open(&path)?;
    let ch = guest_channel(&dev, 0, interrupts, Config::default())?;
    // The hello: an empty frame, so the host knows which peer runs the pipe.
    ch.send(&frame(&[], 0), Wait::Forever)?;
    std::thread::scope(|s| {
        let outgoing = s.spawn(|| send_stdin(&ch));
        let incoming = receive_stdout(&ch);
        let outgoing = outgoing
            .join()
            .unwrap_or_else(|_| Err("the stdin thread panicked".into()));
        incoming.and(outgoing)
    })
}

fn frame(data: &[u8], flags: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + data.len());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(data);
    out
}

fn send_stdin(ch: &GuestChannel) -> Result<(), BoxError> {
    let mut stdin = std::io::stdin().lock();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read stdin: {e}").into()),
        };
        ch.send(
            &frame(&buf[..n], if n == 0 { FIN } else { 0 }),
            Wait::Forever,
        )?;
        if n == 0 {
            return Ok(());
        }
    }
}

fn receive_stdout(ch: &GuestChannel) -> Result<(), BoxError> {
    let mut stdout = std::io::stdout().lock();
    let mut buf = vec![0u8; 8 + CHUNK + 64];
    loop {
        let r = match ch.recv(&mut buf, Wait::Forever) {
            Ok(r) => r,
            Err(ChannelError::Closed) => return Err("the host left before finishing".into()),
            Err(e) => return Err(format!("receive: {e}").into()),
        };
        let payload = &buf[r.header_len..r.header_len + r.payload_len];
        let (header, rest) = payload
            .split_first_chunk::<8>()
            .ok_or("a packet without a frame header")?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let flags = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let data = rest.get(..len).ok_or("a frame longer than its packet")?;
        stdout.write_all(data)?;
        stdout.flush()?;
        if flags & FIN != 0 {
            return Ok(());
        }
    }
}

/// Bytes the `pipe` init mode sends the host.
const INIT_PIPE_BYTES: usize = 4 << 20;

/// The init's `pipe` mode (`vmlink.mode=pipe`), a user's two commands played in a test
/// guest: it moves the device to `vfio-pci` when it can, writes [`INIT_PIPE_BYTES`] of
/// pattern 3 to `/in`, runs `/init connect < /in > /out` as a child (as a user would run
/// `vmlink-ivshmem-guest connect`), and reports what the child said on stderr (`pipe_said`)
/// and both files' digests (`pipe` line).
pub fn init_mode() -> Result<(), BoxError> {
    use std::fs::File;
    use std::process::{Command, Stdio};
    use vmlink_ivshmem::exchange::{Digest, Pattern};

    super::load_modules();
    if let Some(dev) = find_devices(Path::new("/sys/bus/pci/devices"))?
        .into_iter()
        .next()
    {
        super::try_vfio(&dev);
    }
    let mut data = vec![0u8; INIT_PIPE_BYTES];
    Pattern::new(3).fill(&mut data);
    let mut sent = Digest::default();
    sent.update(&data);
    std::fs::write("/in", &data)?;
    let t = std::time::Instant::now();
    let out = Command::new("/init")
        .arg("connect")
        .stdin(File::open("/in")?)
        .stdout(File::create("/out")?)
        .stderr(Stdio::piped())
        .output()?;
    let ms = t.elapsed().as_millis();
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        super::say(&format!("pipe_said {line}"));
    }
    let got = std::fs::read("/out")?;
    let mut received = Digest::default();
    received.update(&got);
    super::say(&format!(
        "pipe status={} ms={ms} sent_bytes={} sent_digest={:016x} received_bytes={} received_digest={:016x}",
        out.status.code().unwrap_or(-1),
        sent.bytes(),
        sent.value(),
        received.bytes(),
        received.value()
    ));
    Ok(())
}
