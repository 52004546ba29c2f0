//! The host process of `vmlink demo`: sets up, spawns the guest, runs the measurements by
//! commanding the guest over the control channel, and collects the results.

use std::fs::{self, File};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmlink_channel::packet::parse_gpa_header;
use vmlink_channel::{Config, Doorbell, PacketRx, PacketTx, PacketType};
use vmlink_secure::{AuthorizedKeys, Cipher, Credentials, HandshakeRole, Keypair, SecureConfig};
use vmlink_shm::{Endpoint, Layout, Listener, Service};

use super::wire::{self, word};
use super::{
    BASELINE_SOCKET, BUFFER_BYTES, CONTROL_RING_BYTES, CONTROL_SERVICE, FILE_CHUNK, FileCopy,
    FileRow, GUEST_KEY, HOST_KEY, Latency, LatencyRow, MIN_SAMPLES, Machine, Mode, PING_BYTES,
    PLAIN_TWIN_SERVICE, PLAIN_TWIN_SOCKET, POLLING_RING_BYTES, POLLING_SERVICE, POLLING_SOCKET,
    POLLING_SPINS, Plan, RECEIVED_FILE, RECV_BATCH, Results, SECURE_RING_BYTES, SECURE_SERVICE,
    SECURE_SOCKET, SECURE_STREAM_BYTES, SOCKET_BUFFER, STREAM_SIZES, SecureRow, SecureShm,
    Throughput, ThroughputRow, WAIT, channel_no, cipher_to_wire, cpu_from_wire, cpu_since, nanos,
    order, soon, thread_cpu,
};
use crate::error::{Context, Result, fail};
use crate::hash;
use crate::pattern::{self, END, RESPONSE, Tally};

/// Kills and reaps the guest unless it exited on its own.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    /// Waits (up to [`WAIT`]) for the guest to exit successfully.
    fn finish(&mut self) -> Result<()> {
        let Some(mut child) = self.0.take() else {
            return Ok(());
        };
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().context("wait for the guest")? {
                return if status.success() {
                    Ok(())
                } else {
                    fail(format!("the guest exited with {status}"))
                };
            }
            if start.elapsed() > WAIT {
                let _ = child.kill();
                let _ = child.wait();
                return fail("the guest did not exit");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Removes the demo's directory when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The host's connections to the guest.
struct HostSide {
    control: Endpoint,
    polling: Endpoint,
    socket: UnixStream,
    buf: Vec<u8>,
    /// One chunk of the file, on its way to the disk.
    chunk: Vec<u8>,
    vmlink_check: Tally,
    socket_check: Tally,
}

/// One copy of the file.
struct Copied {
    /// From the host's command until the host had written the last byte.
    elapsed: Duration,
    /// The hash of the file the host wrote.
    hash: u64,
    /// Whether it matched the guest's hash, on both sides.
    verified: bool,
}

/// The guest's account of a phase.
struct Report {
    signals: u64,
    tally: Tally,
}

/// Runs the whole demo; with `secure`, the secure comparison too, with that cipher.
pub fn run(plan: &Plan, secure: Option<Cipher>) -> Result<Results> {
    let machine = Machine::now();
    let dir = std::env::temp_dir().join(format!("vmlink-demo-{}", std::process::id()));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .context("create the demo's directory")?;
    let dir = TempDir(dir);
    let polling_service = Service::new(POLLING_SERVICE)
        .with_layout(Layout::symmetric(POLLING_RING_BYTES, 0))
        .with_config(Config::polling(POLLING_SPINS));
    let listener = Listener::bind(dir.0.join(POLLING_SOCKET), polling_service)
        .context("listen for the polling channel")?;
    let baseline =
        UnixListener::bind(dir.0.join(BASELINE_SOCKET)).context("listen for the baseline")?;

    let exe = std::env::current_exe().context("find this executable")?;
    let mut command = Command::new(exe);
    command
        .arg("demo-guest")
        .arg("--dir")
        .arg(&dir.0)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let service = Service::new(CONTROL_SERVICE)
        .with_layout(Layout::symmetric(CONTROL_RING_BYTES, BUFFER_BYTES));
    let (control, child) = service.spawn(&mut command).context("spawn the guest")?;
    let mut child = ChildGuard(Some(child));
    let polling = listener
        .accept_timeout(WAIT)
        .context("the guest's polling channel")?;
    let socket = accept(&baseline).context("the guest's baseline connection")?;
    let mut host = HostSide {
        control,
        polling,
        socket,
        buf: vec![0u8; 2 << 20],
        chunk: vec![0u8; FILE_CHUNK],
        vmlink_check: Tally::default(),
        socket_check: Tally::default(),
    };

    let socket_latency = host.latency_socket(plan)?;
    let mut latency = Vec::new();
    for mode in Mode::ALL {
        latency.push(LatencyRow {
            mode,
            vmlink: host.latency_channel(plan, mode)?,
            socket: socket_latency,
        });
    }
    let mut throughput = Vec::new();
    for packet_bytes in STREAM_SIZES {
        throughput.push(host.stream_row(plan, packet_bytes)?);
    }
    host.command(&[wire::OP_MAKE_FILE, plan.file_bytes])?;
    host.report(false)?;
    let file = host.file_row(plan, &dir.0.join(RECEIVED_FILE))?;
    let secure = match secure {
        Some(cipher) => Some(host.secure_row(plan, &dir.0, cipher)?),
        None => None,
    };
    host.command(&[wire::OP_EXIT])?;
    child.finish()?;
    Ok(Results {
        machine,
        plan: *plan,
        spin_before_sleep: host.control.channel().config().spin_before_sleep,
        latency,
        throughput,
        file,
        secure,
        vmlink_check: host.vmlink_check,
        socket_check: host.socket_check,
    })
}

/// Accepts one connection within [`WAIT`].
fn accept(listener: &UnixListener) -> std::io::Result<UnixStream> {
    listener.set_nonblocking(true)?;
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && start.elapsed() < WAIT => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
}

impl HostSide {
    /// Doorbell signals this process has sent on both channels.
    fn signals(&self) -> u64 {
        self.control.channel().counters().signals_sent
            + self.polling.channel().counters().signals_sent
    }

    /// Sends a command to the guest.
    fn command(&self, words: &[u64]) -> Result<()> {
        self.control
            .channel()
            .send(&wire::encode(words), soon())
            .context("send a command to the guest")
    }

    /// Receives the guest's report of a phase and adds its checks to the vmlink or the
    /// socket tally.
    fn report(&mut self, socket: bool) -> Result<Report> {
        let r = self
            .control
            .channel()
            .recv(&mut self.buf, soon())
            .context("wait for the guest's report")?;
        let w = wire::decode(r.payload(&self.buf));
        if word(&w, 0) != wire::REPORT {
            return fail(format!(
                "expected the guest's report, got {}",
                wire::describe(&w)
            ));
        }
        let mut tally = Tally {
            packets: word(&w, 2),
            bytes: word(&w, 3),
            mismatches: word(&w, 4),
            first_mismatch: None,
        };
        if tally.mismatches > 0 {
            tally.first_mismatch = Some(format!(
                "the guest found {} mismatches (see its message above)",
                tally.mismatches
            ));
        }
        let into = if socket {
            &mut self.socket_check
        } else {
            &mut self.vmlink_check
        };
        into.merge(tally.clone());
        Ok(Report {
            signals: word(&w, 1),
            tally,
        })
    }

    /// Round trips over the polling channel or the control channel.
    fn latency_channel(&mut self, plan: &Plan, mode: Mode) -> Result<Latency> {
        let (ch, no, warmup) = match mode {
            Mode::Blocking => (
                self.control.channel(),
                channel_no::CONTROL,
                plan.warmup_blocking,
            ),
            Mode::Polling => (
                self.polling.channel(),
                channel_no::POLLING,
                plan.warmup_polling,
            ),
        };
        let measured = self.round_trips(ch, no, Rounds::new(plan, warmup), mode.name())?;
        self.finish_latency(measured)
    }

    /// The guest serves calls on its channel number `no` while this process makes them over
    /// `ch` (its end of that channel), checking every response: the round trips, their
    /// check, and the doorbell signals this process sent meanwhile.
    fn round_trips<T: PacketTx, R: PacketRx, D: Doorbell>(
        &self,
        ch: &vmlink_channel::Endpoint<T, R, D>,
        no: u64,
        mut rounds: Rounds,
        what: &str,
    ) -> Result<(Rounds, Tally, u64)> {
        let signals = || self.signals() + self.extra_signals(ch, no);
        let before = signals();
        self.command(&[wire::OP_SERVE_CALLS, no])?;
        let mut request = [0u8; PING_BYTES];
        let mut response = [0u8; PING_BYTES];
        let mut tally = Tally::default();
        while let Some(seq) = rounds.next() {
            pattern::fill(seq, 0, &mut request);
            let t = Instant::now();
            let n = ch
                .call(&request, &mut response, soon())
                .context("call the guest")?;
            rounds.record(t.elapsed());
            if n == PING_BYTES && pattern::check(seq | RESPONSE, 0, &response) {
                tally.pass(PING_BYTES);
            } else {
                tally.fail(n, || format!("response {seq} ({what}) arrived corrupt"));
            }
        }
        let mut end = [0u8; PING_BYTES];
        end[..8].copy_from_slice(&END.to_le_bytes());
        ch.send(&end, soon()).context("end the round trips")?;
        Ok((rounds, tally, signals() - before))
    }

    /// The signals `ch` (channel number `no`) sent, unless [`signals`](Self::signals)
    /// already counts them.
    fn extra_signals<T: PacketTx, R: PacketRx, D: Doorbell>(
        &self,
        ch: &vmlink_channel::Endpoint<T, R, D>,
        no: u64,
    ) -> u64 {
        if no == channel_no::CONTROL || no == channel_no::POLLING {
            0
        } else {
            ch.counters().signals_sent
        }
    }

    /// Takes the guest's report of round trips and sums them up.
    fn finish_latency(
        &mut self,
        (rounds, tally, signals): (Rounds, Tally, u64),
    ) -> Result<Latency> {
        let report = self.report(false)?;
        self.vmlink_check.merge(tally);
        let per = (signals + report.signals) as f64 / rounds.seq.max(1) as f64;
        Latency::from_samples(rounds.samples, Some(per))
            .ok_or_else(|| crate::error::CliError("no latency samples".into()))
    }

    /// Round trips over the baseline socket.
    fn latency_socket(&mut self, plan: &Plan) -> Result<Latency> {
        self.command(&[wire::OP_SERVE_SOCKET])?;
        let mut frame = [0u8; PING_BYTES];
        let mut tally = Tally::default();
        let mut rounds = Rounds::new(plan, plan.warmup_blocking);
        while let Some(seq) = rounds.next() {
            pattern::fill(seq, 0, &mut frame);
            let t = Instant::now();
            self.socket.write_all(&frame).context("socket request")?;
            self.socket
                .read_exact(&mut frame)
                .context("socket response")?;
            rounds.record(t.elapsed());
            if pattern::check(seq | RESPONSE, 0, &frame) {
                tally.pass(PING_BYTES);
            } else {
                tally.fail(PING_BYTES, || {
                    format!("socket response {seq} arrived corrupt")
                });
            }
        }
        frame.fill(0);
        frame[..8].copy_from_slice(&END.to_le_bytes());
        self.socket
            .write_all(&frame)
            .context("end the round trips")?;
        self.report(true)?;
        self.socket_check.merge(tally);
        Latency::from_samples(rounds.samples, None)
            .ok_or_else(|| crate::error::CliError("no socket latency samples".into()))
    }

    /// Streams packets of `size` bytes in [`Plan::stream_rounds`] rounds each way, vmlink
    /// and the socket alternating.
    fn stream_row(&mut self, plan: &Plan, size: usize) -> Result<ThroughputRow> {
        let mut vmlink = Throughput::zero(true);
        let mut socket = Throughput::zero(false);
        for round in 0..plan.stream_rounds {
            for via_socket in order(round) {
                if via_socket {
                    socket.add(self.stream_socket(plan, size)?);
                } else {
                    vmlink.add(self.stream_channel(plan, size)?);
                }
            }
        }
        Ok(ThroughputRow {
            packet_bytes: size,
            vmlink,
            socket,
        })
    }

    /// The guest streams packets of `size` bytes over the control channel.
    fn stream_channel(&mut self, plan: &Plan, size: usize) -> Result<Throughput> {
        let (throughput, tally) =
            self.stream_over(self.control.channel(), channel_no::CONTROL, plan, size)?;
        self.vmlink_check.merge(tally);
        Ok(throughput)
    }

    /// The guest streams packets of `size` bytes over its channel number `no`; this process
    /// receives and checks them on `ch`, its end of that channel.
    fn stream_over<T: PacketTx, R: PacketRx, D: Doorbell>(
        &self,
        ch: &vmlink_channel::Endpoint<T, R, D>,
        no: u64,
        plan: &Plan,
        size: usize,
    ) -> Result<(Throughput, Tally)> {
        let signals = || self.signals() + self.extra_signals(ch, no);
        let before = signals();
        let cpu = thread_cpu();
        let start = Instant::now();
        self.command(&[
            wire::OP_STREAM_CHANNEL,
            size as u64,
            plan.stream_budget.as_micros() as u64,
            no,
        ])?;
        let mut tally = Tally::default();
        let mut scratch = vec![0u8; size.max(64)];
        let mut expect = 0u64;
        let mut end: Option<(u64, u64, u64)> = None;
        while end.is_none() {
            let mut failed = None;
            ch.recv_batch(RECV_BATCH, soon(), |p| {
                if end.is_some() {
                    failed.get_or_insert_with(|| "a packet after the stream's end".to_owned());
                    return;
                }
                let len = p.meta().payload_len;
                if len > scratch.len() {
                    tally.fail(len, || format!("stream packet {expect}: {len} bytes"));
                    expect += 1;
                    return;
                }
                if let Err(e) = p.read_payload(0, &mut scratch[..len]) {
                    failed.get_or_insert_with(|| e.to_string());
                    return;
                }
                let data = &scratch[..len];
                if pattern::claimed_seq(data) == Some(END) {
                    let w = wire::decode(data);
                    end = Some((word(&w, 1), word(&w, 2), word(&w, 3)));
                } else if len == size && pattern::check(expect, 0, data) {
                    tally.pass(len);
                    expect += 1;
                } else {
                    tally.fail(len, || format!("stream packet {expect} ({size} B) corrupt"));
                    expect += 1;
                }
            })
            .context("receive the stream")?;
            if let Some(e) = failed {
                return fail(format!("receive the stream: {e}"));
            }
        }
        let elapsed = start.elapsed();
        let receiver_cpu = cpu_from_wire(cpu_since(cpu));
        let (sent, guest_signals, guest_cpu) = end.unwrap_or_default();
        if sent != expect {
            tally.mismatch(|| format!("the guest sent {sent} packets, {expect} arrived"));
        }
        let throughput = Throughput {
            packets: expect,
            elapsed,
            signals: Some(signals() - before + guest_signals),
            sender_cpu: cpu_from_wire(guest_cpu),
            receiver_cpu,
        };
        Ok((throughput, tally))
    }

    /// The guest streams frames of `size` bytes over the baseline socket.
    fn stream_socket(&mut self, plan: &Plan, size: usize) -> Result<Throughput> {
        let cpu = thread_cpu();
        let start = Instant::now();
        self.command(&[
            wire::OP_STREAM_SOCKET,
            size as u64,
            plan.stream_budget.as_micros() as u64,
        ])?;
        let mut tally = Tally::default();
        let mut input = BufReader::with_capacity(SOCKET_BUFFER, &self.socket);
        let mut frame = vec![0u8; size];
        let mut expect = 0u64;
        let (sent, guest_cpu) = loop {
            input.read_exact(&mut frame).context("receive the stream")?;
            if pattern::claimed_seq(&frame) == Some(END) {
                let w = wire::decode(&frame);
                break (word(&w, 1), word(&w, 2));
            }
            if pattern::check(expect, 0, &frame) {
                tally.pass(size);
            } else {
                tally.fail(size, || format!("socket frame {expect} ({size} B) corrupt"));
            }
            expect += 1;
        };
        let elapsed = start.elapsed();
        let receiver_cpu = cpu_from_wire(cpu_since(cpu));
        if sent != expect {
            tally.mismatch(|| format!("the guest sent {sent} frames, {expect} arrived"));
        }
        self.report(true)?;
        self.socket_check.merge(tally);
        Ok(Throughput {
            packets: expect,
            elapsed,
            signals: None,
            sender_cpu: cpu_from_wire(guest_cpu),
            receiver_cpu,
        })
    }

    /// The secure comparison: writes a key pair for each side into `dir`, has the guest
    /// connect a plain and a secure channel (alike but for the secure layer), then
    /// measures both in interleaved rounds: round trips, and streams of
    /// [`SECURE_STREAM_BYTES`] packets.
    fn secure_row(&mut self, plan: &Plan, dir: &Path, cipher: Cipher) -> Result<SecureRow> {
        let pair = SecurePair::open(self, dir, cipher)?;
        let mut plain_samples = Vec::new();
        let mut secure_samples = Vec::new();
        let mut signals = [(0u64, 0u64); 2];
        let mut plain_stream = Throughput::zero(true);
        let mut secure_stream = Throughput::zero(true);
        let rounds = plan.stream_rounds.max(2);
        for round in 0..rounds {
            for secure in order(round) {
                if secure {
                    let m = self.round_trips(
                        &pair.secure,
                        channel_no::SECURE,
                        Rounds::new(plan, plan.warmup_polling),
                        "secure",
                    )?;
                    self.finish_round(m, &mut secure_samples, &mut signals[1])?;
                } else {
                    let m = self.round_trips(
                        pair.plain.channel(),
                        channel_no::PLAIN,
                        Rounds::new(plan, plan.warmup_polling),
                        "plain",
                    )?;
                    self.finish_round(m, &mut plain_samples, &mut signals[0])?;
                }
                let (stream, tally) = if secure {
                    self.stream_over(&pair.secure, channel_no::SECURE, plan, SECURE_STREAM_BYTES)?
                } else {
                    self.stream_over(
                        pair.plain.channel(),
                        channel_no::PLAIN,
                        plan,
                        SECURE_STREAM_BYTES,
                    )?
                };
                self.vmlink_check.merge(tally);
                if secure {
                    secure_stream.add(stream);
                } else {
                    plain_stream.add(stream);
                }
            }
        }
        let latency = |samples, (signals, trips): (u64, u64)| {
            Latency::from_samples(samples, Some(signals as f64 / trips.max(1) as f64))
                .ok_or_else(|| crate::error::CliError("no latency samples".into()))
        };
        Ok(SecureRow {
            cipher,
            handshake: pair.handshake,
            guest_key_expected: pair.guest_key == pair.expected_key,
            guest_key: pair.guest_key,
            plain_latency: latency(plain_samples, signals[0])?,
            secure_latency: latency(secure_samples, signals[1])?,
            plain_stream,
            secure_stream,
        })
    }

    /// Takes the guest's report of one round of round trips and adds the round to
    /// `samples` and `signals` (signals, round trips).
    fn finish_round(
        &mut self,
        (rounds, tally, signals): (Rounds, Tally, u64),
        samples: &mut Vec<u64>,
        into: &mut (u64, u64),
    ) -> Result<()> {
        let report = self.report(false)?;
        self.vmlink_check.merge(tally);
        samples.extend_from_slice(&rounds.samples);
        into.0 += signals + report.signals;
        into.1 += rounds.seq;
        Ok(())
    }

    /// Copies the file once each way unmeasured, then [`Plan::file_rounds`] times each
    /// way, alternating which goes first; every copy is hashed on both sides.
    ///
    /// The unmeasured copies take out a cost that belongs to neither mechanism: on a
    /// virtual machine whose memory the hypervisor backs lazily (or takes back when the
    /// guest frees it), the first time the page cache takes fresh pages each one costs a
    /// fault in the hypervisor, and writing 64 MiB then runs at a tenth of its speed
    /// whoever writes it. Later copies reuse the pages the previous received file freed.
    fn file_row(&mut self, plan: &Plan, path: &Path) -> Result<FileRow> {
        let mut vmlink = FileCopy {
            times: Vec::new(),
            hash: 0,
            verified: true,
        };
        let mut socket = vmlink.clone();
        for round in 0..=plan.file_rounds {
            for via_socket in order(round) {
                let (copied, into) = if via_socket {
                    (self.file_socket(path, plan.file_bytes)?, &mut socket)
                } else {
                    (self.file_channel(path)?, &mut vmlink)
                };
                into.hash = copied.hash;
                into.verified &= copied.verified;
                if round > 0 {
                    into.times.push(copied.elapsed);
                }
            }
        }
        Ok(FileRow {
            bytes: plan.file_bytes,
            vmlink,
            socket,
        })
    }

    /// The guest sends the file through the buffer area; the host copies the pages each
    /// GPA-direct packet names out of the shared memory, frees the slot, and writes the
    /// chunk to `path`.
    fn file_channel(&mut self, path: &Path) -> Result<Copied> {
        let start = Instant::now();
        self.command(&[wire::OP_FILE_CHANNEL])?;
        let ch = self.control.channel();
        let area = self.control.buffer();
        let guest_pages = area.guest_pages();
        let limit = ch.config().gpa_page_limit;
        let mut out = File::create(path).context("create")?;
        let chunk = &mut self.chunk;
        let mut written = 0u64;
        let mut tally = Tally::default();
        let done = loop {
            let r = ch.recv(&mut self.buf, soon()).context("receive the file")?;
            let w = wire::decode(r.payload(&self.buf));
            if r.packet_type != PacketType::GpaDirect {
                if word(&w, 0) == wire::FILE_DONE {
                    break w;
                }
                return fail(format!(
                    "unexpected {} during the file copy",
                    wire::describe(&w)
                ));
            }
            let (slot, offset, len) = (word(&w, 0), word(&w, 1), word(&w, 2) as usize);
            let ranges: Vec<_> = parse_gpa_header(r.header(&self.buf), limit)
                .context("a GPA-direct header")?
                .collect();
            let [range] = ranges[..] else {
                return fail("a file chunk must be one GPA range");
            };
            if offset != written || len != range.byte_count as usize || len > chunk.len() {
                tally.mismatch(|| format!("file chunk at {offset} out of order or mis-sized"));
            }
            let len = len.min(chunk.len()).min(range.byte_count as usize);
            let mut at = 0usize;
            let mut skip = range.byte_offset as usize;
            for page in range.pages() {
                if at >= len {
                    break;
                }
                if !guest_pages.contains(&page) {
                    return fail(format!(
                        "file chunk names page {page} outside the guest's half"
                    ));
                }
                let n = (4096 - skip).min(len - at);
                let start = area.page_offset(page).unwrap_or_default() + skip;
                area.read(start, &mut chunk[at..at + n])
                    .context("read the buffer area")?;
                at += n;
                skip = 0;
            }
            ch.send(&wire::encode(&[wire::ACK, slot]), soon())
                .context("ack a chunk")?;
            out.write_all(&chunk[..at]).context("write the file")?;
            written += at as u64;
        };
        drop(out);
        let elapsed = start.elapsed();
        self.finish_file(path, &done, written, elapsed, tally, false)
    }

    /// The guest sends the file through the baseline socket; the host writes it to `path`,
    /// a chunk per write.
    fn file_socket(&mut self, path: &Path, len: u64) -> Result<Copied> {
        let start = Instant::now();
        self.command(&[wire::OP_FILE_SOCKET])?;
        let mut out = File::create(path).context("create")?;
        let mut written = 0u64;
        while written < len {
            let n = (len - written).min(FILE_CHUNK as u64) as usize;
            let chunk = &mut self.chunk[..n];
            (&self.socket)
                .read_exact(chunk)
                .context("receive the file")?;
            out.write_all(chunk).context("write the file")?;
            written += n as u64;
        }
        drop(out);
        let elapsed = start.elapsed();
        let r = self
            .control
            .channel()
            .recv(&mut self.buf, soon())
            .context("wait for the guest's hash")?;
        let done = wire::decode(r.payload(&self.buf));
        self.finish_file(path, &done, written, elapsed, Tally::default(), true)
    }

    /// Hashes the file the host wrote, compares it with the guest's `done` message, and
    /// sends the host's hash back for the guest to compare.
    fn finish_file(
        &mut self,
        path: &Path,
        done: &[u64],
        written: u64,
        elapsed: Duration,
        mut tally: Tally,
        socket: bool,
    ) -> Result<Copied> {
        let (len, guest_hash) = (word(done, 1), word(done, 2));
        if word(done, 0) != wire::FILE_DONE {
            return fail(format!(
                "expected the guest's file hash, got {}",
                wire::describe(done)
            ));
        }
        let hash = hash::file(path).context("hash the received file")?;
        let how = if socket { "socket" } else { "buffer area" };
        if hash == guest_hash && len == written {
            tally.pass(written as usize);
        } else {
            tally.fail(written as usize, || {
                format!(
                    "file via {how}: the guest sent {len} bytes hashing to {guest_hash:#018x}, \
                     the host wrote {written} hashing to {hash:#018x}"
                )
            });
        }
        self.command(&[wire::HOST_HASH, written, hash])?;
        let report = self.report(socket)?;
        let verified = tally.mismatches == 0 && report.tally.mismatches == 0;
        if socket {
            self.socket_check.merge(tally);
        } else {
            self.vmlink_check.merge(tally);
        }
        fs::remove_file(path).context("remove the received file")?;
        Ok(Copied {
            elapsed,
            hash,
            verified,
        })
    }
}

/// The host's ends of the secure comparison's two channels.
struct SecurePair {
    plain: Endpoint,
    secure: SecureShm,
    /// The secure channel's memory, mapped while it is used.
    _memory: vmlink_shm::SharedMemory,
    /// From the guest's connection to the secure channel's being ready.
    handshake: Duration,
    /// The fingerprint of the key the guest proved.
    guest_key: String,
    /// The fingerprint of the key written for the guest.
    expected_key: String,
}

impl SecurePair {
    /// Writes the key files into `dir`, listens, tells the guest to connect, and runs the
    /// secure handshake as the responder.
    fn open(host: &mut HostSide, dir: &Path, cipher: Cipher) -> Result<Self> {
        let host_key = Keypair::generate();
        let guest_key = Keypair::generate();
        host_key
            .save(&dir.join(HOST_KEY), "vmlink demo host")
            .context("write the host's key")?;
        guest_key
            .save(&dir.join(GUEST_KEY), "vmlink demo guest")
            .context("write the guest's key")?;
        let authorized = AuthorizedKeys::load(&dir.join(format!("{GUEST_KEY}.pub")))
            .context("load the guest's public key")?;
        let credentials = Credentials::Static {
            local: host_key,
            authorized,
        };
        let config = SecureConfig {
            cipher,
            ..SecureConfig::default()
        };
        let listen = |service, socket| {
            let service = Service::new(service)
                .with_layout(Layout::symmetric(SECURE_RING_BYTES, 0))
                .with_config(Config::polling(POLLING_SPINS));
            Listener::bind(dir.join(socket), service)
        };
        let plain = listen(PLAIN_TWIN_SERVICE, PLAIN_TWIN_SOCKET)
            .context("listen for the plain channel")?;
        let secure =
            listen(SECURE_SERVICE, SECURE_SOCKET).context("listen for the secure channel")?;
        host.command(&[wire::OP_SECURE, cipher_to_wire(cipher)])?;
        let plain = plain
            .accept_timeout(WAIT)
            .context("the guest's plain channel")?;
        let (channel, memory) = secure
            .accept_timeout(WAIT)
            .context("the guest's secure channel")?
            .into_parts();
        let start = Instant::now();
        let done =
            vmlink_secure::establish(channel, HandshakeRole::Responder, &credentials, &config)
                .context("the secure handshake")?;
        let handshake = start.elapsed();
        host.report(false)?;
        Ok(Self {
            plain,
            secure: done.endpoint,
            _memory: memory,
            handshake,
            guest_key: done.peer_key.map_or_else(String::new, |k| k.fingerprint()),
            expected_key: guest_key.public().fingerprint(),
        })
    }
}

/// The round trips of a latency measurement: warm-up, then samples until the budget.
struct Rounds {
    warmup: u64,
    budget: Duration,
    max: usize,
    seq: u64,
    started: Option<Instant>,
    samples: Vec<u64>,
}

impl Rounds {
    fn new(plan: &Plan, warmup: u64) -> Self {
        Self {
            warmup,
            budget: plan.latency_budget,
            max: plan.max_samples,
            seq: 0,
            started: None,
            samples: Vec::with_capacity(plan.max_samples.min(1 << 16)),
        }
    }

    /// The next round trip's sequence number, or `None` when done.
    fn next(&mut self) -> Option<u64> {
        let n = self.samples.len();
        let timed_out = self.started.is_some_and(|s| s.elapsed() >= self.budget);
        if n >= self.max || (n >= MIN_SAMPLES && timed_out) {
            return None;
        }
        Some(self.seq)
    }

    /// Records the round trip just made.
    fn record(&mut self, took: Duration) {
        if self.seq >= self.warmup {
            self.started.get_or_insert_with(Instant::now);
            self.samples.push(nanos(took));
        }
        self.seq += 1;
    }
}
