//! The init's channel modes (`vmlink.mode=` on the kernel command line):
//!
//! - `channel`: loads the modules, moves the device to `vfio-pci` when it has an IOMMU
//!   group, opens the guest's end of the channel in BAR2 (MSI-X interrupts through VFIO,
//!   else polling, reported as a `channel` line), says it is ready, and serves the host's
//!   exchange (`vmlink_ivshmem::exchange`) until the host's `WAIT`, whose outcome it reports
//!   (`wait` line) with its counters (`counters` line).
//! - `conformance`: as `channel` up to the channel, then side B of the channel
//!   conformance suite, check after check as the host posts them in the mailbox
//!   (`vmlink_ivshmem::conformance`), one `check` line each, until the host is done.
//! - `heartbeat`: rings the host on `vmlink.vector=` every 100 ms, without touching the
//!   channel, until the host writes a non-zero word at the end of the buffer area
//!   ([`STOP_FLAG_FROM_END`] bytes before its end), then reports (`beat` line).

use std::path::Path;
use std::time::{Duration, Instant};

use vmlink_channel::{ChannelError, Config, Wait};
use vmlink_ivshmem::LOCAL_PEER;
use vmlink_ivshmem::channel::{GuestChannel, Interrupts, guest_channel, guest_doorbell};
use vmlink_ivshmem::conformance::run_guest_side;
use vmlink_ivshmem::exchange::{CHUNK, Digest, Pattern, op, op_word, word};
use vmlink_ivshmem::guest::{Device, find_devices};
use vmlink_ivshmem::vfio::MsixVectors;

use super::{load_modules, say, try_vfio};

type BoxError = Box<dyn std::error::Error>;

/// The vector the channel's doorbells use, both ways.
const CHANNEL_VECTOR: u16 = 0;
/// How long a polling wait sleeps before the channel looks at the ring again.
const POLL_INTERVAL: Duration = Duration::from_micros(100);
/// How long the guest waits for any one packet before giving up.
const PACKET_DEADLINE: Duration = Duration::from_secs(60);
/// The heartbeat's stop flag: the 8 bytes this far before the buffer area's end.
const STOP_FLAG_FROM_END: usize = 8;

fn device() -> Result<(std::path::PathBuf, Device), BoxError> {
    let path = find_devices(Path::new("/sys/bus/pci/devices"))?
        .into_iter()
        .next()
        .ok_or("no ivshmem device")?;
    let dev = Device::open(&path)?;
    Ok((path, dev))
}

/// Loads the modules and picks how the guest takes the host's doorbells: MSI-X through
/// VFIO when the device has an IOMMU group (and `vmlink.poll` is not given), else polling.
fn interrupts(param: &dyn Fn(&str) -> Option<String>) -> Result<Interrupts, BoxError> {
    load_modules();
    let path = find_devices(Path::new("/sys/bus/pci/devices"))?
        .into_iter()
        .next()
        .ok_or("no ivshmem device")?;
    Ok(if param("vmlink.poll").is_none() && try_vfio(&path) {
        match MsixVectors::open(&path, 64) {
            Ok(msix) => Interrupts::Msix(msix),
            Err(e) => {
                say(&format!("channel msix_error={:?}", e.to_string()));
                Interrupts::Polling(POLL_INTERVAL)
            }
        }
    } else {
        Interrupts::Polling(POLL_INTERVAL)
    })
}

/// The `conformance` mode: side B of every check the host runs.
pub fn conformance(param: &dyn Fn(&str) -> Option<String>) -> Result<(), BoxError> {
    let interrupts = interrupts(param)?;
    let (_, dev) = device()?;
    let name = interrupts.name();
    say(&format!("conformance interrupts={name}"));
    let bell: &'static _ = Box::leak(Box::new(guest_doorbell(&dev, CHANNEL_VECTOR, interrupts)?));
    let t = Instant::now();
    let failed = run_guest_side(&dev, bell, &|line| say(line))?;
    say(&format!(
        "conformance_done failed={failed} ms={}",
        t.elapsed().as_millis()
    ));
    Ok(())
}

/// The `channel` mode.
pub fn serve(param: &dyn Fn(&str) -> Option<String>) -> Result<(), BoxError> {
    let interrupts = interrupts(param)?;
    let (_, dev) = device()?;
    let name = interrupts.name();
    let ch = guest_channel(&dev, CHANNEL_VECTOR, interrupts, Config::default())?;
    say(&format!(
        "channel interrupts={name} iv_position={} max_packet={}",
        dev.iv_position()?,
        ch.max_packet_len()
    ));
    ch.send(
        &op_word(op::READY),
        Wait::Until(Instant::now() + PACKET_DEADLINE),
    )?;
    let result = exchange(&ch);
    let c = ch.counters();
    say(&format!(
        "counters packets_sent={} packets_received={} signals_sent={} signals_received={} receive_sleeps={} send_waits={}",
        c.packets_sent,
        c.packets_received,
        c.signals_sent,
        c.signals_received,
        c.receive_sleeps,
        c.send_waits
    ));
    result
}

fn soon() -> Wait {
    Wait::Until(Instant::now() + PACKET_DEADLINE)
}

/// Serves the host's exchange until its `WAIT`.
fn exchange(ch: &GuestChannel) -> Result<(), BoxError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = Digest::default();
    let (mut calls, mut chunks) = (0u64, 0u64);
    let mut transfer_start = None;
    loop {
        let r = ch.recv(&mut buf, soon())?;
        let p = &buf[r.header_len..r.header_len + r.payload_len];
        match p.first().copied() {
            Some(op::ECHO) => {
                ch.complete(r.transaction_id, p, soon())?;
                calls += 1;
            }
            Some(op::DATA) => {
                transfer_start.get_or_insert_with(Instant::now);
                received.update(&p[8..]);
                chunks += 1;
            }
            Some(op::END) => {
                let ms = transfer_start.take().map_or(0, |t| t.elapsed().as_millis());
                say(&format!(
                    "received bytes={} chunks={chunks} digest={:016x} ms={ms} calls_served={calls}",
                    received.bytes(),
                    received.value()
                ));
                let mut answer = Vec::with_capacity(16);
                answer.extend_from_slice(&received.value().to_le_bytes());
                answer.extend_from_slice(&received.bytes().to_le_bytes());
                ch.complete(r.transaction_id, &answer, soon())?;
                received = Digest::default();
                chunks = 0;
            }
            Some(op::SEND) => {
                let (bytes, seed) = (word(p, 1), word(p, 2));
                ch.complete(r.transaction_id, &[], soon())?;
                send_transfer(ch, bytes, seed)?;
            }
            Some(op::WAIT) => {
                ch.complete(r.transaction_id, &[], soon())?;
                let secs = word(p, 1).clamp(1, 60);
                let t = Instant::now();
                let outcome = match ch.recv(&mut buf, Wait::Until(t + Duration::from_secs(secs))) {
                    Ok(_) => "packet".to_owned(),
                    Err(ChannelError::TimedOut) => "timed_out".to_owned(),
                    Err(ChannelError::Closed) => "closed".to_owned(),
                    Err(e) => format!("{e:?}").replace(' ', "_"),
                };
                say(&format!(
                    "wait result={outcome} ms={}",
                    t.elapsed().as_millis()
                ));
                return Ok(());
            }
            other => return Err(format!("unexpected packet {other:?} ({r:?})").into()),
        }
    }
}

/// Sends `bytes` of pattern `seed` as `DATA` chunks, then `END` with the digest.
fn send_transfer(ch: &GuestChannel, bytes: u64, seed: u64) -> Result<(), BoxError> {
    let t = Instant::now();
    let mut pattern = Pattern::new(seed);
    let mut digest = Digest::default();
    let mut packet = vec![0u8; 8 + CHUNK];
    packet[..8].copy_from_slice(&op_word(op::DATA));
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(CHUNK as u64))?.next_multiple_of(8);
        pattern.fill(&mut packet[8..8 + n]);
        digest.update(&packet[8..8 + n]);
        ch.send(&packet[..8 + n], soon())?;
        left = left.saturating_sub(n as u64);
    }
    let mut end = op_word(op::END).to_vec();
    end.extend_from_slice(&digest.value().to_le_bytes());
    end.extend_from_slice(&digest.bytes().to_le_bytes());
    ch.send(&end, soon())?;
    say(&format!(
        "sent bytes={} digest={:016x} ms={}",
        digest.bytes(),
        digest.value(),
        t.elapsed().as_millis()
    ));
    Ok(())
}

/// The `heartbeat` mode.
pub fn heartbeat(peer: u16, vector: u16) -> Result<(), BoxError> {
    let (_, dev) = device()?;
    let header = dev.header()?;
    let buffer = header.layout.buffer();
    let flag_at = usize::try_from(buffer.offset + buffer.len)? - STOP_FLAG_FROM_END;
    say(&format!(
        "heartbeat iv_position={} vector={vector}",
        dev.iv_position()?
    ));
    let start = Instant::now();
    let mut rings = 0u64;
    let mut flag = [0u8; 8];
    let stopped = loop {
        dev.ring(if peer == 0 { LOCAL_PEER } else { peer }, vector)?;
        rings += 1;
        std::thread::sleep(Duration::from_millis(100));
        dev.read_memory(flag_at, &mut flag)?;
        if flag != [0; 8] {
            break "flag";
        }
        if start.elapsed() > Duration::from_secs(90) {
            break "timeout";
        }
    };
    say(&format!("beat rings={rings} stopped={stopped}"));
    Ok(())
}
