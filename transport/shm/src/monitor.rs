//! Live monitoring: every channel this process holds, readable by another process (`vmlink
//! stat`, `vmlink top`) while it runs.
//!
//! # How it is published
//!
//! Each process that makes a vmlink-shm endpoint or binds a [`Listener`](crate::Listener)
//! answers queries on one Unix socket, `<runtime dir>/<pid>.sock`, served by a thread of
//! its own. A query is a connection: the thread checks the caller's credentials (this
//! user or root), writes one report — the process, its listeners, and for every live
//! channel its service, role, peer, state, [`Counters`](vmlink_channel::Counters), calls in
//! flight and how full each ring is — and closes the connection.
//!
//! Why a socket and not a statistics area in the channel's shared memory: the shared
//! memory is the peer's too. Counters there would be writable by the guest (a monitor
//! would show whatever it liked), would tell the guest what the host counts, and would put
//! one more cache line the peer can touch on the data path. A query socket keeps them in
//! this process's private memory: a sample is a few relaxed atomic loads by the monitor
//! thread ([`Watch`]), taking no lock of the endpoint's, and the endpoint does no work for
//! it at all. Access is the file system's: the runtime directory is private (0700) and
//! the thread answers only its own user and root.
//!
//! # The runtime directory
//!
//! [`runtime_dir`]: `$XDG_RUNTIME_DIR/vmlink` when `XDG_RUNTIME_DIR` is set, else
//! `/run/user/UID/vmlink` when that user directory exists, else `vmlink-UID` in the temp
//! directory; created with mode 0700, and refused (nothing is published) if it exists
//! with another owner or wider permissions.
//!
//! A process that dies leaves its socket file behind; nobody answers on it, so [`scan`]
//! reports it as stale and reads no figure from it, and the next process to publish
//! removes the files of processes that no longer exist.
//!
//! Publishing is on by default; [`disable`] (before the first endpoint or listener) or the
//! environment variable `VMLINK_NO_MONITOR` (any non-empty value) turn it off.
//!
//! # Examples
//!
//! ```
//! use std::thread;
//! use vmlink_shm::{Guest, Layout, Listener, Service, monitor};
//!
//! let dir = std::env::temp_dir().join(format!("vmlink-monitor-doc-{}", std::process::id()));
//! let path = dir.join("stats.sock");
//! let service = Service::new("stats").with_layout(Layout::symmetric(16 * 4096, 0));
//! let listener = Listener::bind(&path, service)?;
//! let guest = thread::spawn(move || Guest::new("stats").connect(&path));
//! let host = listener.accept()?;
//! let guest = guest.join().unwrap()?;
//! guest.channel().send(b"counted", None)?;
//!
//! // What `vmlink stat` reads: this process's report, among the others.
//! let scan = monitor::scan()?;
//! let me = scan.hosts.iter().find(|h| h.pid == std::process::id()).expect("published");
//! let channel = me
//!     .channels
//!     .iter()
//!     .find(|c| c.role == vmlink_shm::Role::Host && c.service == "stats")
//!     .expect("the host's channel");
//! // One packet waits, unread: its 16-byte descriptor, the payload padded to 8 bytes, and
//! // the 8 bytes VMBus puts after every packet.
//! assert_eq!(channel.incoming.expect("a sound ring").used, 32);
//! assert_eq!(channel.counters.packets_received, 0);
//! drop((host, guest, listener));
//! std::fs::remove_dir(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, Weak};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use vmlink_channel::{ChannelState, Counters, Sample, Watch};
use vmlink_ring::{ControlWord, RingMem};

use crate::endpoint::Role;
use crate::host::private_dir;
use crate::memory::{Layout, Mapping, SharedMemory, ShmRing};
use crate::policy::PeerCredentials;
use crate::{ShmError, sys};

/// The first bytes of every report.
pub const STATS_MAGIC: [u8; 8] = *b"VMLKSTAT";

/// The report format this crate writes; it reads this one and refuses newer ones.
pub const STATS_VERSION: u16 = 1;

/// The largest report a reader accepts.
pub const MAX_REPORT_LEN: usize = 16 << 20;

/// The environment variable that, set to anything non-empty, turns publishing off.
pub const DISABLE_ENV: &str = "VMLINK_NO_MONITOR";

/// How long a reader waits for a process to answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the monitor thread gives a reader to take its report.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a report could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MonitorError {
    /// The runtime directory could not be found, made, or trusted.
    #[error("runtime directory: {0}")]
    Directory(#[source] ShmError),
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// The process did not answer within the query timeout.
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    /// The answer does not start with [`STATS_MAGIC`].
    #[error("the answer is not a vmlink report")]
    NotAReport,
    /// The answer is in a newer format than this code reads.
    #[error("the report is format version {found}; this code reads up to {supported}")]
    NewerVersion {
        /// The version in the answer.
        found: u16,
        /// [`STATS_VERSION`].
        supported: u16,
    },
    /// The answer is longer than [`MAX_REPORT_LEN`].
    #[error("the report is longer than {MAX_REPORT_LEN} bytes")]
    TooLarge,
    /// The answer's body does not decode.
    #[error("the report is malformed: {0}")]
    Malformed(String),
}

impl MonitorError {
    fn io(what: &'static str) -> impl FnOnce(io::Error) -> MonitorError {
        move |source| MonitorError::Io { what, source }
    }
}

/// One process's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HostReport {
    /// Its process id.
    pub pid: u32,
    /// Its effective user id.
    pub uid: u32,
    /// Its program (the file name of its first argument).
    pub program: String,
    /// When it answered, in nanoseconds of the system's monotonic clock (rates are
    /// differences of two reports' counters over the difference of these).
    pub sampled_ns: u64,
    /// Its listeners.
    #[serde(deserialize_with = "grown")]
    pub listeners: Vec<ListenerReport>,
    /// Its live channels, oldest first.
    #[serde(deserialize_with = "grown")]
    pub channels: Vec<ChannelReport>,
}

/// A listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ListenerReport {
    /// Its socket's path.
    pub path: String,
    /// What it listens for.
    pub kind: ListenerKind,
    /// The services it serves (none for a hand-over listener).
    #[serde(deserialize_with = "grown")]
    pub services: Vec<String>,
}

/// What a listener listens for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ListenerKind {
    /// Guests of its services ([`Listener`](crate::Listener)).
    Services,
    /// A successor to hand this process's channels to
    /// ([`HandOverListener`](crate::HandOverListener)).
    HandOver,
}

/// A live channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ChannelReport {
    /// Its number in its process (never reused while the process lives).
    pub id: u64,
    /// The service.
    pub service: String,
    /// Which side this process is.
    pub role: Role,
    /// Who is at the other end, as of when it connected (`None` where the transport
    /// cannot tell, as over vsock).
    pub peer: Option<PeerCredentials>,
    /// When the channel was made, in milliseconds since the Unix epoch.
    pub since_unix_ms: u64,
    /// Where it is in its life.
    pub state: StateReport,
    /// Its counters.
    pub counters: CounterReport,
    /// Transactions in flight (or reserved for a late completion).
    pub calls_in_flight: u64,
    /// How full the ring this side writes is; `None` when its indices are not sound, or
    /// the channel has no rings (a stream link).
    pub outgoing: Option<RingFill>,
    /// How full the ring this side reads is; `None` as for `outgoing`.
    pub incoming: Option<RingFill>,
}

/// A channel's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateReport {
    /// Both sides are there.
    Open,
    /// The peer left.
    PeerClosed,
    /// The channel failed.
    Failed {
        /// Why, in words.
        cause: String,
    },
}

impl std::fmt::Display for StateReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateReport::Open => f.write_str("open"),
            StateReport::PeerClosed => f.write_str("peer closed"),
            StateReport::Failed { cause } => write!(f, "failed: {cause}"),
        }
    }
}

/// A channel's counters (see [`Counters`] for what each counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CounterReport {
    /// Packets committed to the outgoing ring.
    pub packets_sent: u64,
    /// Their bytes in the ring.
    pub bytes_sent: u64,
    /// Packets taken from the incoming ring.
    pub packets_received: u64,
    /// Their bytes in the ring.
    pub bytes_received: u64,
    /// Doorbell signals sent.
    pub signals_sent: u64,
    /// Wake-ups by the peer's doorbell.
    pub signals_received: u64,
    /// Sends that waited for space.
    pub send_waits: u64,
    /// Receives that went to sleep.
    pub receive_sleeps: u64,
    /// Completions discarded because their caller had given up.
    pub late_completions: u64,
}

impl From<Counters> for CounterReport {
    fn from(c: Counters) -> Self {
        Self {
            packets_sent: c.packets_sent,
            bytes_sent: c.bytes_sent,
            packets_received: c.packets_received,
            bytes_received: c.bytes_received,
            signals_sent: c.signals_sent,
            signals_received: c.signals_received,
            send_waits: c.send_waits,
            receive_sleeps: c.receive_sleeps,
            late_completions: c.late_completions,
        }
    }
}

/// How full a ring is: bytes written and not yet read, of its data area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingFill {
    /// Bytes between the read and the write index.
    pub used: u64,
    /// The data area's length.
    pub size: u64,
}

/// Deserializes a sequence by growing a vector with what the input carries, never
/// reserving room for the length it claims (serde's own `Vec` reserves up to 1 MiB for a
/// claimed length before a single element has been read).
fn grown<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Grown<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Grown<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a sequence")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            while let Some(item) = seq.next_element()? {
                out.push(item);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_seq(Grown(std::marker::PhantomData))
}

/// What [`scan`] found in the runtime directory.
#[derive(Debug)]
#[non_exhaustive]
pub struct Scan {
    /// The directory.
    pub dir: PathBuf,
    /// The reports of every process that answered, by pid.
    pub hosts: Vec<HostReport>,
    /// Sockets nobody answers on: processes that died.
    pub stale: Vec<PathBuf>,
    /// Sockets whose process answered wrongly or not in time, with why.
    pub failed: Vec<(PathBuf, MonitorError)>,
}

/// The runtime directory reports are published in (see the [module docs](self)); not
/// created or checked here.
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = OVERRIDE.lock().unwrap_or_else(|e| e.into_inner()).clone() {
        return dir;
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        let dir = PathBuf::from(dir);
        if dir.is_absolute() {
            return dir.join("vmlink");
        }
    }
    let uid = sys::geteuid();
    let user_run = PathBuf::from(format!("/run/user/{uid}"));
    match fs::metadata(&user_run) {
        Ok(m) if m.is_dir() && m.uid() == uid => user_run.join("vmlink"),
        _ => std::env::temp_dir().join(format!("vmlink-{uid}")),
    }
}

/// Reads every report in [`runtime_dir`], which must be this user's and private (else
/// [`MonitorError::Directory`]: another user could have put sockets there that answer
/// with made-up reports). A directory that does not exist has no reports.
pub fn scan() -> Result<Scan, MonitorError> {
    let dir = runtime_dir();
    if dir.exists() {
        private_dir(&dir).map_err(MonitorError::Directory)?;
    }
    scan_dir(&dir)
}

/// Reads every report in `dir`: each `<pid>.sock` is queried; a missing directory has
/// none. The directory is taken as the caller's choice, whoever owns it (root reading a
/// user's, say).
pub fn scan_dir(dir: &Path) -> Result<Scan, MonitorError> {
    let mut scan = Scan {
        dir: dir.to_path_buf(),
        hosts: Vec::new(),
        stale: Vec::new(),
        failed: Vec::new(),
    };
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(scan),
        Err(e) => return Err(MonitorError::io("read the runtime directory")(e)),
    };
    let mut sockets: Vec<(u32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .filter_map(|e| Some((socket_pid(&e.file_name())?, e.path())))
        .collect();
    sockets.sort();
    for (_, path) in sockets {
        match query(&path) {
            Ok(report) => scan.hosts.push(report),
            Err(MonitorError::Io { source, .. })
                if matches!(
                    source.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                ) =>
            {
                scan.stale.push(path)
            }
            Err(e) => scan.failed.push((path, e)),
        }
    }
    Ok(scan)
}

/// The pid a socket file's name gives (`<pid>.sock`).
fn socket_pid(name: &std::ffi::OsStr) -> Option<u32> {
    let name = name.to_str()?;
    let digits = name.strip_suffix(".sock")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Queries the process answering on `path` for its report.
pub fn query(path: &Path) -> Result<HostReport, MonitorError> {
    let stream = UnixStream::connect(path).map_err(MonitorError::io("connect"))?;
    stream
        .set_read_timeout(Some(QUERY_TIMEOUT))
        .map_err(MonitorError::io("set a read timeout"))?;
    let mut bytes = Vec::new();
    match (&stream)
        .take(MAX_REPORT_LEN as u64 + 1)
        .read_to_end(&mut bytes)
    {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(MonitorError::TimedOut(QUERY_TIMEOUT));
        }
        Err(e) => return Err(MonitorError::io("read the report")(e)),
    }
    decode(&bytes)
}

/// Decodes a report: [`STATS_MAGIC`], the version (little-endian `u16`), then the body in
/// postcard's format, and nothing after it.
pub fn decode(bytes: &[u8]) -> Result<HostReport, MonitorError> {
    if bytes.len() > MAX_REPORT_LEN {
        return Err(MonitorError::TooLarge);
    }
    let body = bytes
        .strip_prefix(&STATS_MAGIC)
        .ok_or(MonitorError::NotAReport)?;
    let (version, body) = body
        .split_first_chunk::<2>()
        .ok_or_else(|| MonitorError::Malformed("no version".into()))?;
    match u16::from_le_bytes(*version) {
        STATS_VERSION => {}
        0 => return Err(MonitorError::Malformed("version 0".into())),
        found => {
            return Err(MonitorError::NewerVersion {
                found,
                supported: STATS_VERSION,
            });
        }
    }
    let (report, rest) = postcard::take_from_bytes::<HostReport>(body)
        .map_err(|e| MonitorError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(MonitorError::Malformed(format!(
            "{} bytes after the report",
            rest.len()
        )));
    }
    Ok(report)
}

/// Encodes a report as [`decode`] reads it.
pub fn encode(report: &HostReport) -> Vec<u8> {
    let mut out = STATS_MAGIC.to_vec();
    out.extend_from_slice(&STATS_VERSION.to_le_bytes());
    // Plain structs, strings and vectors of known length always serialize; were one not
    // to, the reader would find the body missing and say so.
    out.extend(postcard::to_allocvec(report).unwrap_or_default());
    out
}

/// Turns publishing off for this process: endpoints and listeners made from now on are not
/// published (and no monitor thread starts if none has).
pub fn disable() {
    DISABLED.store(true, Ordering::Relaxed);
}

static DISABLED: AtomicBool = AtomicBool::new(false);

/// Publishes this process's report in `dir` itself instead of the default runtime
/// directory (for a service manager's runtime directory, a container's volume, a test);
/// takes effect if no report is published yet, and [`runtime_dir`] says `dir` from now
/// on. Readers find it with `vmlink stat --dir DIR`.
pub fn set_runtime_dir(dir: impl Into<PathBuf>) {
    *OVERRIDE.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir.into());
}

static OVERRIDE: Mutex<Option<PathBuf>> = Mutex::new(None);

/// What this process publishes.
struct Registry {
    next_id: u64,
    listeners: Vec<(u64, ListenerReport)>,
    channels: Vec<Published>,
    /// The pid the monitor thread was started for (a forked child starts its own).
    server_pid: Option<u32>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next_id: 0,
    listeners: Vec::new(),
    channels: Vec::new(),
    server_pid: None,
});

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A published channel: a watch on it and a weak hold on its memory (to read the ring
/// indices), so publishing keeps neither alive.
struct Published {
    id: u64,
    watch: Watch,
    /// The shared memory, its layout, its sub-channel count and which channel this is,
    /// for a channel over vmlink-shm's rings.
    memory: Option<(Weak<Mapping>, Layout, u32, u32)>,
    role: Role,
    service: String,
    peer: Option<PeerCredentials>,
    since_unix_ms: u64,
}

fn enabled() -> bool {
    !DISABLED.load(Ordering::Relaxed) && std::env::var_os(DISABLE_ENV).is_none_or(|v| v.is_empty())
}

/// Starts this process's monitor thread now, if publishing is on and it does not run yet
/// (otherwise the first endpoint or listener starts it): binding its socket and clearing
/// dead processes' sockets then costs nothing later, when an endpoint is made in a hurry —
/// a successor taking endpoints over starts it before it asks. False when it cannot run
/// (publishing off, no usable runtime directory).
pub fn start() -> bool {
    if !enabled() {
        return false;
    }
    start_server(&mut registry())
}

/// Publishes a vmlink-shm channel until it is dropped.
pub(crate) fn publish_channel(
    watch: Watch,
    memory: &SharedMemory,
    role: Role,
    service: &str,
    peer: PeerCredentials,
) {
    let memory = (
        std::sync::Arc::downgrade(memory.mapping()),
        memory.layout(),
        memory.sub_channels(),
        memory.channel_index(),
    );
    register(watch, Some(memory), role, service, Some(peer));
}

/// Publishes an endpoint of another transport (a stream link, say) until it and every half
/// split from it are dropped: `vmlink stat` then lists it with its counters, state and
/// calls in flight, and no ring fill. vmlink-shm's own endpoints are published when they
/// are made.
///
/// ```
/// use vmlink_channel::{Config, in_process_channel_pair};
/// use vmlink_shm::{Role, monitor};
///
/// let (a, _b) = in_process_channel_pair(4096, Config::default())?;
/// monitor::publish(a.watch(), "in-process", Role::Host, None);
/// # Ok::<(), vmlink_channel::ChannelError>(())
/// ```
pub fn publish(watch: Watch, service: &str, role: Role, peer: Option<PeerCredentials>) {
    register(watch, None, role, service, peer);
}

fn register(
    watch: Watch,
    memory: Option<(Weak<Mapping>, Layout, u32, u32)>,
    role: Role,
    service: &str,
    peer: Option<PeerCredentials>,
) {
    if !enabled() {
        return;
    }
    let mut reg = registry();
    if !start_server(&mut reg) {
        return;
    }
    reg.channels.retain(|c| c.watch.is_alive());
    let id = reg.next_id;
    reg.next_id += 1;
    reg.channels.push(Published {
        id,
        watch,
        memory,
        role,
        service: service.to_owned(),
        peer,
        since_unix_ms: unix_ms(),
    });
}

/// A published listener; dropping it withdraws it.
#[derive(Debug)]
pub(crate) struct ListenerRegistration(Option<u64>);

/// Publishes a listener until the returned registration is dropped.
pub(crate) fn publish_listener(
    path: &Path,
    kind: ListenerKind,
    services: Vec<String>,
) -> ListenerRegistration {
    if !enabled() {
        return ListenerRegistration(None);
    }
    let mut reg = registry();
    if !start_server(&mut reg) {
        return ListenerRegistration(None);
    }
    let id = reg.next_id;
    reg.next_id += 1;
    let report = ListenerReport {
        path: path.to_string_lossy().into_owned(),
        kind,
        services,
    };
    reg.listeners.push((id, report));
    ListenerRegistration(Some(id))
}

impl Drop for ListenerRegistration {
    fn drop(&mut self) {
        if let Some(id) = self.0 {
            registry().listeners.retain(|(i, _)| *i != id);
        }
    }
}

/// Starts this process's monitor thread unless it runs; false when it cannot (no usable
/// runtime directory): nothing is then published, and the channel works as ever.
fn start_server(reg: &mut Registry) -> bool {
    let pid = std::process::id();
    if reg.server_pid == Some(pid) {
        return true;
    }
    if reg.server_pid.is_some() {
        // A forked child: the parent's entries and thread are not ours.
        reg.listeners.clear();
        reg.channels.clear();
    }
    let Ok(listener) = bind(pid) else {
        return false;
    };
    let started = thread::Builder::new()
        .name("vmlink-monitor".into())
        .spawn(move || serve(listener));
    if started.is_err() {
        return false;
    }
    reg.server_pid = Some(pid);
    true
}

/// Binds `<runtime dir>/<pid>.sock` in a private runtime directory, first removing the
/// sockets of processes that no longer exist.
fn bind(pid: u32) -> Result<UnixListener, MonitorError> {
    let dir = runtime_dir();
    private_dir(&dir).map_err(MonitorError::Directory)?;
    remove_dead(&dir);
    let listener = crate::host::bind_private(&dir.join(format!("{pid}.sock")))
        .map_err(MonitorError::Directory)?;
    listener
        .set_nonblocking(false)
        .map_err(MonitorError::io("make the socket blocking"))?;
    Ok(listener)
}

/// Removes the socket files of processes that no longer exist and that nobody answers on
/// (both: a new process with a reused pid answers, and one that exists is left alone).
fn remove_dead(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let Some(pid) = socket_pid(&e.file_name()) else {
            continue;
        };
        let is_socket = e.file_type().is_ok_and(|t| t.is_socket());
        let dead = !Path::new(&format!("/proc/{pid}")).exists();
        if is_socket
            && dead
            && UnixStream::connect(e.path())
                .is_err_and(|err| err.kind() == io::ErrorKind::ConnectionRefused)
        {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// The monitor thread: one report per connection from this user or root.
fn serve(listener: UnixListener) {
    let me = sys::geteuid();
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else {
            // Out of fds or memory for a moment: the next query may succeed.
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        match sys::peer_credentials(stream.as_fd()) {
            Ok(c) if c.uid == me || c.uid == 0 => {}
            _ => continue,
        }
        let bytes = encode(&report());
        let _ = stream.set_write_timeout(Some(ANSWER_TIMEOUT));
        let _ = stream.write_all(&bytes);
    }
}

/// This process's report, now.
fn report() -> HostReport {
    let mut reg = registry();
    reg.channels.retain(|c| c.watch.is_alive());
    let channels = reg
        .channels
        .iter()
        .filter_map(|c| {
            let sample = c.watch.sample()?;
            Some(channel_report(c, &sample))
        })
        .collect();
    HostReport {
        pid: std::process::id(),
        uid: sys::geteuid(),
        program: program(),
        sampled_ns: monotonic_ns(),
        listeners: reg.listeners.iter().map(|(_, l)| l.clone()).collect(),
        channels,
    }
}

fn channel_report(c: &Published, sample: &Sample) -> ChannelReport {
    let (outgoing, incoming) = match c
        .memory
        .as_ref()
        .and_then(|(m, l, subs, index)| Some((m.upgrade()?, *l, *subs, *index)))
    {
        Some((map, layout, subs, index)) => {
            let memory = SharedMemory::from_shared(map, layout, subs, index);
            let (out, inc) = match c.role {
                Role::Host => (memory.host_to_guest(), memory.guest_to_host()),
                Role::Guest => (memory.guest_to_host(), memory.host_to_guest()),
            };
            (fill(&out), fill(&inc))
        }
        None => (None, None),
    };
    ChannelReport {
        id: c.id,
        service: c.service.clone(),
        role: c.role,
        peer: c.peer,
        since_unix_ms: c.since_unix_ms,
        state: match sample.state {
            ChannelState::Open => StateReport::Open,
            ChannelState::PeerClosed => StateReport::PeerClosed,
            ChannelState::Failed(cause) => StateReport::Failed {
                cause: cause.to_string(),
            },
        },
        counters: sample.counters.into(),
        calls_in_flight: sample.transactions_in_flight as u64,
        outgoing,
        incoming,
    }
}

/// How full `ring` is, from its control page read once; `None` when the indices are not
/// sound (the peer may have written anything there).
fn fill(ring: &ShmRing) -> Option<RingFill> {
    let size = ring.data_len() as u64;
    let write = u64::from(ring.load_control(ControlWord::WriteIndex));
    let read = u64::from(ring.load_control(ControlWord::ReadIndex));
    if write >= size || read >= size || write % 8 != 0 || read % 8 != 0 {
        return None;
    }
    Some(RingFill {
        used: (write + size - read) % size,
        size,
    })
}

fn program() -> String {
    std::env::args_os()
        .next()
        .map(|a| {
            Path::new(&a)
                .file_name()
                .map_or_else(|| a.to_string_lossy(), |n| n.to_string_lossy())
                .into_owned()
        })
        .unwrap_or_default()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Nanoseconds of the monotonic clock, which every process on the machine shares.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        (t.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(t.tv_nsec() as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_report() -> HostReport {
        HostReport {
            pid: 42,
            uid: 1000,
            program: "vmlink".into(),
            sampled_ns: 7,
            listeners: vec![ListenerReport {
                path: "/run/x.sock".into(),
                kind: ListenerKind::Services,
                services: vec!["pipe".into()],
            }],
            channels: vec![ChannelReport {
                id: 3,
                service: "pipe".into(),
                role: Role::Host,
                peer: Some(PeerCredentials {
                    pid: 9,
                    uid: 1000,
                    gid: 1000,
                }),
                since_unix_ms: 1,
                state: StateReport::Failed {
                    cause: "ring".into(),
                },
                counters: CounterReport {
                    packets_sent: 5,
                    ..CounterReport::default()
                },
                calls_in_flight: 2,
                outgoing: Some(RingFill {
                    used: 8,
                    size: 4096,
                }),
                incoming: None,
            }],
        }
    }

    #[test]
    fn a_report_reads_back_as_written() {
        let r = sample_report();
        assert_eq!(decode(&encode(&r)).unwrap(), r);
    }

    /// Version 1 as committed: every later version of this crate must still read it.
    #[test]
    fn the_committed_version_1_report_still_reads() {
        let golden = include_bytes!("../tests/monitor/report-v1.bin");
        assert_eq!(decode(golden).unwrap(), sample_report());
        assert_eq!(
            encode(&sample_report()),
            golden,
            "version 1 is what this code writes"
        );
    }

    #[test]
    fn bad_reports_are_typed_errors() {
        let good = encode(&sample_report());
        assert!(matches!(
            decode(b"VMLKSAVE\x01\x00"),
            Err(MonitorError::NotAReport)
        ));
        assert!(matches!(
            decode(&good[..9]),
            Err(MonitorError::Malformed(_))
        ));
        let mut newer = good.clone();
        newer[8] = 2;
        assert!(matches!(
            decode(&newer),
            Err(MonitorError::NewerVersion {
                found: 2,
                supported: 1
            })
        ));
        let mut zero = good.clone();
        zero[8] = 0;
        assert!(matches!(decode(&zero), Err(MonitorError::Malformed(_))));
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(decode(&trailing), Err(MonitorError::Malformed(_))));
        for cut in 10..good.len() {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        assert!(matches!(
            decode(&vec![0; MAX_REPORT_LEN + 1]),
            Err(MonitorError::TooLarge)
        ));
    }

    #[test]
    fn socket_names_give_pids_and_nothing_else_does() {
        use std::ffi::OsStr;
        assert_eq!(socket_pid(OsStr::new("123.sock")), Some(123));
        for bad in [
            "x.sock",
            ".sock",
            "12.socket",
            "-1.sock",
            "99999999999.sock",
            "12",
        ] {
            assert_eq!(socket_pid(OsStr::new(bad)), None, "{bad}");
        }
    }
}
