//! The guest process of `vmlink demo` (`vmlink demo-guest`): it connects, then does what
//! the host's commands on the control channel say until told to exit.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vmlink_channel::packet::GpaRange;
use vmlink_channel::{ChannelError, Config, Doorbell, PacketMeta, PacketRx, PacketTx, PacketType};
use vmlink_secure::{AuthorizedKeys, Credentials, HandshakeRole, Keypair, SecureConfig};
use vmlink_shm::{Endpoint, Guest};

use super::wire::{self, word};
use super::{
    BASELINE_SOCKET, BATCH_BYTES, BATCH_PACKETS, CONTROL_SERVICE, FILE_CHUNK, GUEST_KEY, HOST_KEY,
    PING_BYTES, PLAIN_TWIN_SERVICE, PLAIN_TWIN_SOCKET, POLLING_SERVICE, POLLING_SOCKET,
    POLLING_SPINS, SECURE_SERVICE, SECURE_SOCKET, SOCKET_BUFFER, SOURCE_FILE, SecureShm,
    channel_no, cipher_from_wire, cpu_since, soon, thread_cpu,
};
use crate::error::{Context, Result, fail};
use crate::hash;
use crate::pattern::{self, END, RESPONSE, Tally};

/// The guest's connections and state.
struct GuestSide {
    control: Endpoint,
    polling: Endpoint,
    socket: UnixStream,
    /// The generated file's hash and length, once made.
    file: Option<(u64, u64)>,
    buf: Vec<u8>,
    /// One chunk of the file, on its way from the disk.
    chunk: Vec<u8>,
    /// The secure comparison's channels, once connected.
    pair: Option<SecurePair>,
}

/// The secure comparison's two channels, alike but for the secure layer.
struct SecurePair {
    plain: Endpoint,
    secure: SecureShm,
    /// The secure channel's memory, mapped while it is used.
    _memory: vmlink_shm::SharedMemory,
}

/// The secure comparison's channels, if connected.
fn pair_of(pair: &Option<SecurePair>) -> Result<&SecurePair> {
    match pair {
        Some(pair) => Ok(pair),
        None => fail("asked to use the secure comparison's channels before connecting them"),
    }
}

impl SecurePair {
    /// Connects both channels to the host in `dir`, the second through the handshake as
    /// the initiator, with the guest's key and the host's public key from `dir`.
    fn connect(dir: &Path, cipher: vmlink_secure::Cipher) -> Result<Self> {
        let local = Keypair::load(&dir.join(GUEST_KEY)).context("load the guest's key")?;
        let authorized = AuthorizedKeys::load(&dir.join(format!("{HOST_KEY}.pub")))
            .context("load the host's public key")?;
        let credentials = Credentials::Static { local, authorized };
        let config = SecureConfig {
            cipher,
            ..SecureConfig::default()
        };
        let connect = |service, socket| {
            Guest::new(service)
                .with_config(Config::polling(POLLING_SPINS))
                .connect(dir.join(socket))
        };
        let plain =
            connect(PLAIN_TWIN_SERVICE, PLAIN_TWIN_SOCKET).context("connect the plain channel")?;
        let (channel, memory) = connect(SECURE_SERVICE, SECURE_SOCKET)
            .context("connect the secure channel")?
            .into_parts();
        let done =
            vmlink_secure::establish(channel, HandshakeRole::Initiator, &credentials, &config)
                .context("the secure handshake")?;
        Ok(Self {
            plain,
            secure: done.endpoint,
            _memory: memory,
        })
    }
}

/// Runs the guest: `dir` is the host's private directory with the sockets.
pub fn run(dir: &Path) -> Result<()> {
    let control = Guest::new(CONTROL_SERVICE)
        .from_env()
        .context("connect the control channel")?;
    let polling = Guest::new(POLLING_SERVICE)
        .with_config(Config::polling(POLLING_SPINS))
        .connect(dir.join(POLLING_SOCKET))
        .context("connect the polling channel")?;
    let socket =
        UnixStream::connect(dir.join(BASELINE_SOCKET)).context("connect the baseline socket")?;
    let mut g = GuestSide {
        control,
        polling,
        socket,
        file: None,
        buf: vec![0u8; 2 << 20],
        chunk: vec![0u8; FILE_CHUNK],
        pair: None,
    };
    loop {
        let r = g
            .control
            .channel()
            .recv(&mut g.buf, soon())
            .context("wait for a command")?;
        let cmd = wire::decode(r.payload(&g.buf));
        let signals = g.signals();
        let tally = match word(&cmd, 0) {
            wire::OP_SERVE_CALLS => match word(&cmd, 1) {
                channel_no::CONTROL => serve_calls(g.control.channel(), &mut g.buf)?,
                channel_no::POLLING => serve_calls(g.polling.channel(), &mut g.buf)?,
                channel_no::PLAIN => serve_calls(pair_of(&g.pair)?.plain.channel(), &mut g.buf)?,
                channel_no::SECURE => serve_calls(&pair_of(&g.pair)?.secure, &mut g.buf)?,
                other => return fail(format!("no channel {other}")),
            },
            wire::OP_SERVE_SOCKET => serve_socket(&mut g.socket)?,
            wire::OP_STREAM_CHANNEL => {
                let (size, budget) = (word(&cmd, 1) as usize, Duration::from_micros(word(&cmd, 2)));
                match word(&cmd, 3) {
                    channel_no::CONTROL => stream_channel(g.control.channel(), size, budget)?,
                    channel_no::PLAIN => {
                        stream_channel(pair_of(&g.pair)?.plain.channel(), size, budget)?
                    }
                    channel_no::SECURE => stream_channel(&pair_of(&g.pair)?.secure, size, budget)?,
                    other => return fail(format!("no stream over channel {other}")),
                }
                continue;
            }
            wire::OP_SECURE => {
                let cipher = cipher_from_wire(word(&cmd, 1))?;
                g.pair = Some(SecurePair::connect(dir, cipher)?);
                Tally::default()
            }
            wire::OP_STREAM_SOCKET => {
                let budget = Duration::from_micros(word(&cmd, 2));
                stream_socket(&mut g.socket, word(&cmd, 1) as usize, budget)?
            }
            wire::OP_MAKE_FILE => {
                let (hash, len) = make_file(&dir.join(SOURCE_FILE), word(&cmd, 1))?;
                g.file = Some((hash, len));
                Tally::default()
            }
            wire::OP_FILE_CHANNEL | wire::OP_FILE_SOCKET => {
                let Some((hash, len)) = g.file else {
                    return fail("asked to send the file before making it");
                };
                let source = dir.join(SOURCE_FILE);
                let mut file = File::open(&source).context("open the file")?;
                if word(&cmd, 0) == wire::OP_FILE_CHANNEL {
                    file_channel(&g.control, &mut file, &mut g.chunk, &mut g.buf)?;
                } else {
                    file_socket(&mut g.socket, &mut file, &mut g.chunk)?;
                }
                g.file_done(hash, len)?
            }
            wire::OP_EXIT => return Ok(()),
            other => return fail(format!("unknown command {other:#x}")),
        };
        let report = [
            wire::REPORT,
            g.signals() - signals,
            tally.packets,
            tally.bytes,
            tally.mismatches,
        ];
        if let Some(first) = &tally.first_mismatch {
            eprintln!("vmlink demo-guest: data check failed: {first}");
        }
        g.control
            .channel()
            .send(&wire::encode(&report), soon())
            .context("report")?;
    }
}

impl GuestSide {
    /// Doorbell signals this process has sent on all its channels.
    fn signals(&self) -> u64 {
        let pair = self.pair.as_ref().map_or(0, |p| {
            p.plain.channel().counters().signals_sent + p.secure.counters().signals_sent
        });
        self.control.channel().counters().signals_sent
            + self.polling.channel().counters().signals_sent
            + pair
    }

    /// Tells the host the file's hash and checks the host's.
    fn file_done(&mut self, hash: u64, len: u64) -> Result<Tally> {
        let ch = self.control.channel();
        ch.send(&wire::encode(&[wire::FILE_DONE, len, hash]), soon())
            .context("send the file's hash")?;
        let r = ch
            .recv(&mut self.buf, soon())
            .context("wait for the host's hash")?;
        let reply = wire::decode(r.payload(&self.buf));
        let mut tally = Tally::default();
        if reply[..] == [wire::HOST_HASH, len, hash] {
            tally.pass(len as usize);
        } else {
            tally.fail(len as usize, || {
                format!(
                    "file: sent {len} bytes hashing to {hash:#018x}, the host answered {}",
                    wire::describe(&reply)
                )
            });
        }
        Ok(tally)
    }
}

/// Answers calls on `ch` (checking each request) until an END packet.
fn serve_calls<T: PacketTx, R: PacketRx, D: Doorbell>(
    ch: &vmlink_channel::Endpoint<T, R, D>,
    buf: &mut [u8],
) -> Result<Tally> {
    let mut tally = Tally::default();
    let mut reply = [0u8; PING_BYTES];
    loop {
        let r = ch.recv(buf, soon()).context("wait for a request")?;
        let payload = r.payload(buf);
        let seq = pattern::claimed_seq(payload).unwrap_or(0);
        if !r.completion_requested {
            if seq == END {
                return Ok(tally);
            }
            return fail(format!("unexpected packet {seq:#x} among requests"));
        }
        if payload.len() == PING_BYTES && pattern::check(seq, 0, payload) {
            tally.pass(PING_BYTES);
        } else {
            tally.fail(payload.len(), || format!("request {seq} arrived corrupt"));
        }
        pattern::fill(seq | RESPONSE, 0, &mut reply);
        ch.complete(r.transaction_id, &reply, soon())
            .context("complete a request")?;
    }
}

/// Echoes frames on the socket (checking each) until an END frame.
fn serve_socket(socket: &mut UnixStream) -> Result<Tally> {
    let mut tally = Tally::default();
    let mut frame = [0u8; PING_BYTES];
    loop {
        socket.read_exact(&mut frame).context("socket request")?;
        let seq = pattern::claimed_seq(&frame).unwrap_or(0);
        if seq == END {
            return Ok(tally);
        }
        if pattern::check(seq, 0, &frame) {
            tally.pass(PING_BYTES);
        } else {
            tally.fail(PING_BYTES, || {
                format!("socket request {seq} arrived corrupt")
            });
        }
        pattern::fill(seq | RESPONSE, 0, &mut frame);
        socket.write_all(&frame).context("socket response")?;
    }
}

/// Streams packets of `size` bytes for `budget`, then `[END, packets, signals, cpu]` (the
/// nanoseconds this thread ran, 0 when unknown). Packets go out in batches (one commit, so
/// at most one signal, per [`BATCH_PACKETS`] packets or [`BATCH_BYTES`]); when the ring is
/// full a plain send waits for space.
fn stream_channel<T: PacketTx, R: PacketRx, D: Doorbell>(
    ch: &vmlink_channel::Endpoint<T, R, D>,
    size: usize,
    budget: Duration,
) -> Result<()> {
    let signals = ch.counters().signals_sent;
    let mut packet = vec![0u8; size];
    let clock_every = clock_every(size);
    let cpu = thread_cpu();
    let start = Instant::now();
    let mut seq = 0u64;
    let mut next_look = clock_every;
    loop {
        let mut batch = ch.batch().context("start a batch")?;
        let mut bytes = 0;
        while batch.len() < BATCH_PACKETS && bytes < BATCH_BYTES {
            pattern::fill(seq, 0, &mut packet);
            match batch.push_in_band(&packet) {
                Ok(()) => {
                    seq += 1;
                    bytes += size;
                }
                Err(ChannelError::Full) => break,
                Err(e) => return fail(format!("stream a packet: {e}")),
            }
        }
        let pushed = batch.len();
        batch.commit().context("commit a batch")?;
        if pushed == 0 {
            pattern::fill(seq, 0, &mut packet);
            ch.send(&packet, soon()).context("stream a packet")?;
            seq += 1;
        }
        if seq >= next_look {
            if start.elapsed() >= budget {
                break;
            }
            next_look = seq + clock_every;
        }
    }
    let sent = ch.counters().signals_sent;
    let end = [END, seq, sent - signals.min(sent), cpu_since(cpu)];
    ch.send(&wire::encode(&end), soon())
        .context("end the stream")?;
    Ok(())
}

/// How many packets of `size` bytes a streaming sender sends between looks at the clock:
/// about [`SOCKET_BUFFER`] bytes' worth, the same for both mechanisms.
fn clock_every(size: usize) -> u64 {
    (SOCKET_BUFFER / size.max(1)).max(1) as u64
}

/// Streams frames of `size` bytes over the socket for `budget` through a
/// [`SOCKET_BUFFER`]-byte buffer, then an END frame `[END, frames, cpu]`.
fn stream_socket(socket: &mut UnixStream, size: usize, budget: Duration) -> Result<Tally> {
    let mut out = BufWriter::with_capacity(SOCKET_BUFFER, &*socket);
    let mut frame = vec![0u8; size];
    let clock_every = clock_every(size);
    let cpu = thread_cpu();
    let start = Instant::now();
    let mut seq = 0u64;
    loop {
        pattern::fill(seq, 0, &mut frame);
        out.write_all(&frame).context("stream a frame")?;
        seq += 1;
        if seq.is_multiple_of(clock_every) && start.elapsed() >= budget {
            break;
        }
    }
    frame.fill(0);
    frame[..24].copy_from_slice(&wire::encode(&[END, seq, cpu_since(cpu)]));
    out.write_all(&frame).context("end the stream")?;
    out.flush().context("end the stream")?;
    Ok(Tally::default())
}

/// Writes `len` bytes of generated data to `path`; returns its hash and length.
fn make_file(path: &Path, len: u64) -> Result<(u64, u64)> {
    let mut out = BufWriter::new(File::create(path).context("create the file")?);
    let mut hasher = hash::Hasher::default();
    let mut block = vec![0u8; 64 * 1024];
    let mut left = len;
    let mut n = 0u64;
    while left > 0 {
        let take = left.min(block.len() as u64) as usize;
        pattern::fill(n ^ 0xF11E, 0, &mut block[..take]);
        hasher.update(&block[..take]);
        out.write_all(&block[..take]).context("write the file")?;
        left -= take as u64;
        n += 1;
    }
    out.flush().context("write the file")?;
    Ok((hasher.finish(), len))
}

/// Sends the file at `path` through the guest's half of the buffer area: each chunk goes
/// into a free slot, a GPA-direct packet `[slot, offset, length]` names its pages, and the
/// host's `[ACK, slot]` frees the slot again.
fn file_channel(end: &Endpoint, file: &mut File, chunk: &mut [u8], buf: &mut [u8]) -> Result<()> {
    let ch = end.channel();
    let area = end.buffer();
    let pages = area.guest_pages();
    let slot_pages = (FILE_CHUNK / 4096) as u64;
    let slots = (pages.end - pages.start) / slot_pages;
    if slots == 0 {
        return fail("the buffer area is too small for the file copy");
    }
    let mut free: Vec<u64> = (0..slots).rev().collect();
    let mut offset = 0u64;
    let meta = PacketMeta {
        packet_type: PacketType::GpaDirect,
        flags: 0,
        transaction_id: 0,
    };
    let mut wait_ack = |free: &mut Vec<u64>| -> Result<()> {
        let r = ch.recv(buf, soon()).context("wait for the host's ack")?;
        let ack = wire::decode(r.payload(buf));
        match ack[..] {
            [wire::ACK, slot] if slot < slots => {
                free.push(slot);
                Ok(())
            }
            _ => fail(format!(
                "unexpected {} during the file copy",
                wire::describe(&ack)
            )),
        }
    };
    loop {
        let n = read_full(file, chunk).context("read the file")?;
        if n == 0 {
            break;
        }
        while free.is_empty() {
            wait_ack(&mut free)?;
        }
        let slot = free.pop().unwrap_or_default();
        let first = pages.start + slot * slot_pages;
        let at = area.page_offset(first).unwrap_or_default();
        area.write(at, &chunk[..n]).context("fill a buffer slot")?;
        let list: Vec<u64> = (first..first + n.div_ceil(4096) as u64).collect();
        let range = GpaRange {
            byte_offset: 0,
            byte_count: n as u32,
            pages: &list,
        };
        ch.send_gpa_direct(
            &[range],
            &wire::encode(&[slot, offset, n as u64]),
            meta,
            soon(),
        )
        .context("send a GPA-direct packet")?;
        offset += n as u64;
    }
    while (free.len() as u64) < slots {
        wait_ack(&mut free)?;
    }
    Ok(())
}

/// Sends the file through the baseline socket, a chunk per write.
fn file_socket(socket: &mut UnixStream, file: &mut File, chunk: &mut [u8]) -> Result<()> {
    loop {
        let n = read_full(file, chunk).context("read the file")?;
        if n == 0 {
            return Ok(());
        }
        socket.write_all(&chunk[..n]).context("send the file")?;
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
