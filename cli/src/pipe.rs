//! `vmlink serve` / `vmlink connect`: bytes from stdin go out over the channel, bytes from
//! the channel go to stdout, in both directions at once.
//!
//! Framing: VMBus payloads are padded to 8 bytes, so every packet carries its exact length
//! in a header of its own: `[length: u32 LE][flags: u32 LE][data]`. Flag [`FIN`] marks
//! the last packet of a direction (stdin reached end of file). The command ends when both
//! directions have finished.

use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use vmlink_channel::{ChannelError, Config, Doorbell, Endpoint, PacketRx, PacketTx};
use vmlink_hvsock::link::{StreamConfig, stream_endpoint};
use vmlink_hvsock::socket::{HybridAddr, StreamAddr, VsockAddr};
use vmlink_shm::{Guest, Layout, Listener, Policy, RefusalCode, Role, Service, ShmError, monitor};

use crate::error::{Context, Result, fail};
use crate::secure::Prepared;
use crate::takeover;
use vmlink_secure::HandshakeRole;

/// Flag: this direction is finished; no packets follow.
pub const FIN: u32 = 1;
/// Bytes of the frame header.
const HEADER: usize = 8;
/// Data bytes per packet at most.
pub const CHUNK: usize = 60 * 1024;
/// Data area of each ring.
pub const RING_BYTES: u64 = 1 << 20;
/// The service name `serve` and `connect` use unless told otherwise.
pub const DEFAULT_SERVICE: &str = "vmlink-pipe";
/// Transfers shorter than this show no progress.
const PROGRESS_AFTER: Duration = Duration::from_secs(1);

/// The flags of the stream transports, which have no handshake and so no service name.
pub const STREAM_FLAGS: [&str; 3] = ["vsock", "hybrid_vsock", "unix_stream"];

/// Where `serve` listens or `connect` connects: exactly one of the four.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Transport {
    /// Shared memory: the Unix socket of vmlink-shm's handshake. For `serve`, its
    /// directory must be private to this user (it is created with mode 0700 if missing).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// vmlink packets over an AF_VSOCK stream (Linux): CID:PORT, the CID a number, `any`,
    /// `host`, `local` or `hypervisor`.
    #[arg(long, value_name = "CID:PORT")]
    pub vsock: Option<VsockAddr>,
    /// vmlink packets over a Firecracker / Cloud Hypervisor hybrid vsock: PATH:PORT, PATH
    /// the VMM's Unix socket.
    #[arg(long, value_name = "PATH:PORT")]
    pub hybrid_vsock: Option<HybridAddr>,
    /// vmlink packets over a plain Unix stream socket at PATH.
    #[arg(long, value_name = "PATH")]
    pub unix_stream: Option<PathBuf>,
}

impl Transport {
    /// The stream address, unless this is shared memory.
    fn stream(&self) -> Option<StreamAddr> {
        if let Some(a) = &self.vsock {
            return Some(StreamAddr::Vsock(*a));
        }
        if let Some(a) = &self.hybrid_vsock {
            return Some(StreamAddr::Hybrid(a.clone()));
        }
        self.unix_stream.clone().map(StreamAddr::Unix)
    }
}

/// The memory of each `serve` / `connect` channel: two rings of [`RING_BYTES`] data bytes,
/// no buffer area.
pub fn channel_layout() -> Layout {
    Layout::symmetric(RING_BYTES, 0)
}

/// Serves the first client at `at`, then pipes; with `take_over`, takes the channel over
/// from the `vmlink serve` on the same `--socket` instead (see [`crate::takeover`]); with
/// `secure`, only a client that completes the secure handshake too.
pub fn serve(
    at: &Transport,
    service: &str,
    take_over: bool,
    secure: Option<&Prepared>,
    access: Option<&vmlink_policy::Policy>,
) -> Result<()> {
    match (&at.socket, at.stream()) {
        (Some(path), _) if take_over => {
            let (end, state) = takeover::take_over(path, service)?;
            takeover::serve(end, state, path)
        }
        (Some(path), _) => serve_shm(path, service, secure, access),
        (None, Some(addr)) => {
            let listener = addr
                .listen()
                .or_else(|e| fail(format!("listen on {addr}: {e}")))?;
            loop {
                let stream = listener
                    .accept()
                    .or_else(|e| fail(format!("accept on {addr}: {e}")))?;
                let end = stream_endpoint(stream, StreamConfig::default(), Config::default())
                    .context("set up the stream link")?;
                let Some(prepared) = secure else {
                    drop(listener);
                    return pipe_over(end, Role::Host, None, true);
                };
                // A client that fails the secure handshake costs only itself.
                match prepared.establish(end, HandshakeRole::Responder, "serve") {
                    Ok((end, _)) => {
                        drop(listener);
                        monitor::publish(end.watch(), DEFAULT_SERVICE, Role::Host, None);
                        return pipe(&end);
                    }
                    Err(e) => eprintln!(
                        "vmlink serve: refused a client (secure handshake: {}); still listening",
                        one_line(&e.to_string())
                    ),
                }
            }
        }
        (None, None) => {
            fail("say where to listen: --socket, --vsock, --hybrid-vsock or --unix-stream")
        }
    }
}

/// Connects to `at`, then pipes (after the secure handshake, with `secure`).
pub fn connect(at: &Transport, service: &str, secure: Option<&Prepared>) -> Result<()> {
    match (&at.socket, at.stream()) {
        (Some(path), _) => connect_shm(path, service, secure),
        (None, Some(addr)) => {
            let stream = addr
                .connect()
                .or_else(|e| fail(format!("connect to {addr}: {e}")))?;
            pipe_stream(stream, Role::Guest, secure)
        }
        (None, None) => {
            fail("say where to connect: --socket, --vsock, --hybrid-vsock or --unix-stream")
        }
    }
}

/// The handshake role of a pipe side.
fn handshake_role(role: Role) -> HandshakeRole {
    match role {
        Role::Host => HandshakeRole::Responder,
        Role::Guest => HandshakeRole::Initiator,
    }
}

/// The command a pipe side is.
fn command(role: Role) -> &'static str {
    match role {
        Role::Host => "serve",
        Role::Guest => "connect",
    }
}

/// Pipes over `end`, first through the secure handshake with `secure`; the channel piped
/// is published for `vmlink stat` (vmlink-shm's plain channels publish themselves).
fn pipe_over<T, R, D>(
    end: Endpoint<T, R, D>,
    role: Role,
    secure: Option<&Prepared>,
    publish: bool,
) -> Result<()>
where
    T: PacketTx + Send,
    R: PacketRx + Send,
    D: Doorbell + Send + Sync + 'static,
{
    match secure {
        None => {
            if publish {
                monitor::publish(end.watch(), DEFAULT_SERVICE, role, None);
            }
            pipe(&end)
        }
        Some(prepared) => {
            let (end, _) = prepared
                .establish(end, handshake_role(role), command(role))
                .context("secure handshake")?;
            monitor::publish(end.watch(), DEFAULT_SERVICE, role, None);
            pipe(&end)
        }
    }
}

/// Pipes over the stream link on a connected stream, published for `vmlink stat` as the
/// side `role`.
fn pipe_stream(
    stream: vmlink_hvsock::socket::Stream,
    role: Role,
    secure: Option<&Prepared>,
) -> Result<()> {
    let end = stream_endpoint(stream, StreamConfig::default(), Config::default())
        .context("set up the stream link")?;
    pipe_over(end, role, secure, true)
}

/// Serves the first client of `service` at `path` that completes the handshake, then
/// pipes, ready to hand the channel to a successor. A client whose handshake fails costs
/// only itself: it is refused (the listener tells it why), one line on stderr says so,
/// and the listener keeps waiting.
fn serve_shm(
    path: &Path,
    service: &str,
    secure: Option<&Prepared>,
    access: Option<&vmlink_policy::Policy>,
) -> Result<()> {
    let name = service;
    // Under a policy the peer is judged when it opens the service; with a secure channel
    // too, once its key is known (after the secure handshake), so key principals count.
    let policy = match (access, secure) {
        (Some(a), None) => Policy::roles(a.clone()),
        (Some(_), Some(_)) => Policy::identify(),
        (None, _) => Policy::default(),
    };
    let service = Service::new(service)
        .with_layout(channel_layout())
        .with_policy(policy);
    let listener = match Listener::bind(path, service) {
        Ok(listener) => listener,
        Err(ShmError::SocketInUse(_)) => {
            return fail(format!(
                "another vmlink serve is listening on {}",
                path.display()
            ));
        }
        Err(ShmError::NotASocket(_)) => {
            return fail(format!(
                "{} exists and is not a socket; it was left alone (choose another path)",
                path.display()
            ));
        }
        Err(e) => return fail(format!("listen on {}: {e}", path.display())),
    };
    loop {
        let end = match listener.accept() {
            Ok(end) => end,
            Err(ShmError::ListenerStopped) => {
                return fail(format!("stopped listening on {}", path.display()));
            }
            Err(ShmError::Denied { audit, .. }) => {
                eprintln!("vmlink serve: {audit}; still listening");
                continue;
            }
            Err(e) => {
                eprintln!(
                    "vmlink serve: refused a client ({}); still listening",
                    one_line(&e.to_string())
                );
                continue;
            }
        };
        let Some(prepared) = secure else {
            drop(listener);
            return takeover::serve(
                takeover::Served::Plain(Box::new(end)),
                takeover::PipeState::default(),
                path,
            );
        };
        let identity = end.identity().cloned();
        let (channel, rest) = end.detach();
        let (end, key) = match prepared.establish(channel, HandshakeRole::Responder, "serve") {
            Ok(done) => done,
            Err(e) => {
                eprintln!(
                    "vmlink serve: refused a client (secure handshake: {}); still listening",
                    one_line(&e.to_string())
                );
                continue;
            }
        };
        if let (Some(policy), Some(who)) = (access, identity) {
            let who = match key {
                Some(k) => who.with_key(k.fingerprint()),
                None => who,
            };
            let decision = policy.decide(&who, name, None);
            if !decision.allowed() {
                eprintln!("vmlink serve: {}; still listening", decision.audit_line());
                continue;
            }
        }
        drop(listener);
        return takeover::serve(
            takeover::Served::secure(end, rest),
            takeover::PipeState::default(),
            path,
        );
    }
}

/// Connects to `service` at `path`, then pipes.
fn connect_shm(path: &Path, service: &str, secure: Option<&Prepared>) -> Result<()> {
    let end = match Guest::new(service).connect(path) {
        Ok(end) => end,
        Err(e) => return fail(connect_error(path, service, &e)),
    };
    match secure {
        None => pipe(end.channel()),
        Some(_) => {
            let (channel, _memory) = end.into_parts();
            pipe_over(channel, Role::Guest, secure, false)
        }
    }
}

/// Why `vmlink connect` could not connect, in the words of its user.
fn connect_error(path: &Path, service: &str, e: &ShmError) -> String {
    let at = path.display();
    match e {
        ShmError::Connect { source, .. } if source.kind() == io::ErrorKind::NotFound => {
            format!("no vmlink serve is listening on {at} (there is no socket file)")
        }
        ShmError::Connect { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused => {
            format!(
                "no vmlink serve is listening on {at} (the socket file is left from one that \
                 has stopped)"
            )
        }
        ShmError::Connect { source, .. } => format!("cannot connect to {at}: {source}"),
        ShmError::Refused {
            code: RefusalCode::UnknownService,
            ..
        } => format!(
            "the host offers no service {} (vmlink serve offers {} unless given --service)",
            quoted(service),
            quoted(DEFAULT_SERVICE)
        ),
        ShmError::Refused { code, message } => format!(
            "the host at {at} refused the connection ({code}): {}",
            one_line(message)
        ),
        e => format!(
            "handshake with the host at {at} failed: {}",
            one_line(&e.to_string())
        ),
    }
}

/// Text on one line, its control characters escaped.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A name in double quotes, with quotes, backslashes and control characters escaped.
fn quoted(name: &str) -> String {
    let inner: String = name
        .chars()
        .map(|c| {
            if c.is_control() || c == '"' || c == '\\' {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect();
    format!("\"{inner}\"")
}

/// One frame: header and data.
fn frame(data: &[u8], flags: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + data.len());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(data);
    out
}

/// Splits a received payload into its data and flags.
fn unframe(payload: &[u8]) -> Result<(&[u8], u32)> {
    let Some((header, rest)) = payload.split_first_chunk::<HEADER>() else {
        return fail(format!(
            "a {}-byte packet has no frame header",
            payload.len()
        ));
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let flags = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > rest.len() {
        return fail(format!(
            "a frame claims {len} bytes but the packet holds {}",
            rest.len()
        ));
    }
    Ok((&rest[..len], flags))
}

/// Pipes stdin to the channel and the channel to stdout until both directions finish.
fn pipe<T, R, D>(ch: &Endpoint<T, R, D>) -> Result<()>
where
    T: PacketTx + Send,
    R: PacketRx + Send,
    D: Doorbell + Send + Sync,
{
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        let outgoing = s.spawn(|| send_stdin(ch, &sent));
        if io::stderr().is_terminal() {
            s.spawn(|| progress(&sent, &received, &done));
        }
        let incoming = receive_stdout(ch, &received, None).map(|_| ());
        let outgoing = outgoing
            .join()
            .unwrap_or_else(|_| fail("the stdin thread panicked"));
        done.store(true, Ordering::Relaxed);
        incoming.and(outgoing)
    })
}

/// Sends stdin in frames, then a FIN frame.
pub(crate) fn send_stdin<T: PacketTx, R: PacketRx, D: Doorbell>(
    ch: &Endpoint<T, R, D>,
    sent: &AtomicU64,
) -> Result<()> {
    let mut stdin = io::stdin().lock();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return fail(format!("read stdin: {e}")),
        };
        let flags = if n == 0 { FIN } else { 0 };
        ch.send(&frame(&buf[..n], flags), None)
            .context("send to the channel")?;
        if n == 0 {
            return Ok(());
        }
        sent.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// How long a receive that can be stopped waits at a time before it looks at its flag.
const LOOK: Duration = Duration::from_millis(20);

/// Writes received frames to stdout until a FIN frame (`true`), or, with a `stop` flag,
/// until the flag is set between two packets (`false`).
pub(crate) fn receive_stdout<T: PacketTx, R: PacketRx, D: Doorbell>(
    ch: &Endpoint<T, R, D>,
    received: &AtomicU64,
    stop: Option<&AtomicBool>,
) -> Result<bool> {
    let mut stdout = io::stdout().lock();
    let mut buf = vec![0u8; HEADER + CHUNK + 8];
    loop {
        if stop.is_some_and(|s| s.load(Ordering::Acquire)) {
            return Ok(false);
        }
        let wait = stop.map(|_| Instant::now() + LOOK);
        let r = match ch.recv(&mut buf, wait) {
            Ok(r) => r,
            Err(ChannelError::TimedOut | ChannelError::Empty) => continue,
            Err(ChannelError::Closed) => {
                return fail("the peer left before finishing its direction");
            }
            Err(e) => return fail(format!("receive from the channel: {e}")),
        };
        let (data, flags) = unframe(r.payload(&buf))?;
        stdout.write_all(data).context("write stdout")?;
        stdout.flush().context("write stdout")?;
        received.fetch_add(data.len() as u64, Ordering::Relaxed);
        if flags & FIN != 0 {
            return Ok(true);
        }
    }
}

/// Shows bytes sent and received on stderr (a terminal) once the transfer has run for
/// [`PROGRESS_AFTER`], until `done`.
fn progress(sent: &AtomicU64, received: &AtomicU64, done: &AtomicBool) {
    let start = Instant::now();
    let mut shown = false;
    while !done.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(100));
        if start.elapsed() < PROGRESS_AFTER {
            continue;
        }
        let (s, r) = (
            sent.load(Ordering::Relaxed),
            received.load(Ordering::Relaxed),
        );
        eprint!(
            "\rvmlink: {:.1} MB sent, {:.1} MB received, {:.0} s   ",
            s as f64 / 1e6,
            r as f64 / 1e6,
            start.elapsed().as_secs_f64()
        );
        shown = true;
    }
    if shown {
        eprintln!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_exact_lengths() {
        let f = frame(b"abc", FIN);
        let mut padded = f.clone();
        padded.resize(16, 0);
        assert_eq!(unframe(&padded).unwrap(), (&b"abc"[..], FIN));
        assert!(unframe(&f[..4]).is_err());
        let mut lying = frame(b"abc", 0);
        lying[0] = 200;
        assert!(unframe(&lying).is_err());
    }

    #[test]
    fn names_and_peer_text_stay_on_one_line() {
        assert_eq!(quoted("nope"), "\"nope\"");
        assert_eq!(quoted("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
        assert_eq!(one_line("x\ny\u{1b}[2J"), "x\\ny\\u{1b}[2J");
    }
}
