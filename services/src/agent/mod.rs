//! The guest agent: answers the host's integration services on the channels it is given.
//!
//! [`Agent::serve`] runs one service on one channel until the host closes it: it answers
//! the version negotiation, then every request of the service. Every message is hostile
//! input: one that does not parse, comes before the negotiation, has another service's
//! type or asks for something refused is answered with `HV_E_FAIL` (when its headers can be
//! read at all), logged, and changes nothing; the service goes on. What each service does:
//!
//! - heartbeat: answers each sequence number with the next;
//! - shutdown: starts the configured command with the request in its environment, then
//!   answers (accepted means the command is running; one that cannot start is refused) and
//!   waits for it; with no command configured (the default) it logs and refuses, so a test
//!   never shuts the machine down;
//! - time sync: measures the offset of the agent's clock from the host's (see [`clock`]),
//!   logs it and publishes it in KVP's auto pool under [`TIME_OFFSET_KEY`], a vmlink
//!   extension; it slews the system clock only when configured to and privileged
//!   ([`AgentConfig::slew_clock`]);
//! - KVP: a store of the five pools, persisted in a file ([`store`]); the auto pool holds
//!   what Linux's KVP daemon reports (the host name, addresses, OS) and the time offset;
//!   `GET_IP_INFO` answers with an adapter's addresses ([`netinfo`]), `SET_IP_INFO` is
//!   refused (the agent does not configure the network);
//! - file copy: into a configured root directory, confined there ([`files`]); with no root
//!   configured every copy is refused.

pub mod clock;
pub mod files;
pub mod netinfo;
pub mod store;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};

use vmlink_channel::{ChannelError, PacketType, Wait};

use crate::fcopy::Fcopy;
use crate::kvp::{
    ADDR_FAMILY_IPV4, ADDR_FAMILY_IPV6, IpField, Kvp, KvpEnumerate, KvpExchangeValue, KvpPool,
    KvpValue,
};
use crate::link::IcLink;
use crate::negotiate::{self, Negotiated};
use crate::service::Service;
use crate::shutdown::{Action, ShutdownFlags};
use crate::status::{HV_E_FAIL, HV_S_CONT, HV_S_OK};
use crate::timesync::{self, TimeSync};
use crate::{IcError, IcFlags, Message, MessageType, heartbeat, kvp};

use self::clock::{Clock, Sample, SystemClock};
use self::files::FileReceiver;
use self::store::{KvpStore, StoreError};

/// The auto-pool key under which the agent publishes its clock's offset from the host's:
/// nanoseconds, agent minus host, as a decimal integer (a vmlink extension).
pub const TIME_OFFSET_KEY: &str = "VmlinkTimeOffsetNs";

/// The largest message the services send: a KVP message (8 + 20 + 7432 bytes), padded.
pub const MAX_MESSAGE: usize = 7464;

/// Where the agent's log lines go.
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// What the agent does for each service.
#[derive(Clone)]
pub struct AgentConfig {
    /// The KVP store's file; in memory when `None`.
    pub kvp_file: Option<PathBuf>,
    /// Where file copies land; copies are refused when `None`.
    pub files_root: Option<PathBuf>,
    /// The command a shutdown request runs (program, then arguments); refused when `None`.
    pub shutdown_command: Option<Vec<OsString>>,
    /// The agent's clock, against which time sync measures the offset.
    pub clock: Arc<dyn Clock>,
    /// Slew the system clock towards the host's after each measurement (at most
    /// [`MAX_SLEW`](clock::MAX_SLEW) away; larger offsets are only reported). Needs
    /// `CAP_SYS_TIME`: [`Agent::new`] refuses without it. Off by default: report only.
    pub slew_clock: bool,
    /// Log lines (default: standard error, prefixed `vmlink agent:`).
    pub log: Log,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            kvp_file: None,
            files_root: None,
            shutdown_command: None,
            clock: Arc::new(SystemClock),
            slew_clock: false,
            log: Arc::new(|line| eprintln!("vmlink agent: {line}")),
        }
    }
}

impl core::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("kvp_file", &self.kvp_file)
            .field("files_root", &self.files_root)
            .field("shutdown_command", &self.shutdown_command)
            .field("slew_clock", &self.slew_clock)
            .finish_non_exhaustive()
    }
}

/// Why the agent could not start or a service stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The KVP store could not be loaded or saved.
    #[error("KVP store: {0}")]
    Store(#[from] StoreError),
    /// The file-copy root is not a directory the agent can use.
    #[error("file-copy root {path}: {source}")]
    FilesRoot {
        /// The configured root.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Slewing the clock was asked for without the privilege to do it.
    #[error("slewing the clock needs CAP_SYS_TIME, which this process does not have")]
    NoTimePrivilege,
    /// The channel failed.
    #[error("channel: {0}")]
    Channel(#[from] ChannelError),
}

/// What a service did on its channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Messages answered with success.
    pub answered: u64,
    /// Messages refused (answered with a failure, or dropped when unreadable).
    pub refused: u64,
}

/// The agent: its configuration, its KVP store and what time sync measured.
pub struct Agent {
    config: AgentConfig,
    store: Mutex<KvpStore>,
    offset: Mutex<Option<i64>>,
}

impl core::fmt::Debug for Agent {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Agent")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// An agent: loads its KVP store and checks its file-copy root.
    pub fn new(config: AgentConfig) -> Result<Self, AgentError> {
        if config.slew_clock && !clock::may_set_time() {
            return Err(AgentError::NoTimePrivilege);
        }
        let store = match &config.kvp_file {
            Some(path) => KvpStore::open(path)?,
            None => KvpStore::in_memory(),
        };
        if let Some(root) = &config.files_root {
            FileReceiver::new(root).map_err(|source| AgentError::FilesRoot {
                path: root.clone(),
                source,
            })?;
        }
        let agent = Self {
            config,
            store: Mutex::new(store),
            offset: Mutex::new(None),
        };
        agent.refresh_auto_pool();
        Ok(agent)
    }

    /// The KVP store.
    pub fn store(&self) -> MutexGuard<'_, KvpStore> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last offset time sync measured: the agent's clock minus the host's, in 100 ns
    /// units.
    pub fn time_offset(&self) -> Option<i64> {
        *self.offset.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log(&self, service: Service, line: &str) {
        (self.config.log)(&format!("{service}: {line}"));
    }

    /// Serves `service` on `link` until the peer closes it (`Ok`) or the channel fails.
    pub fn serve<L: IcLink>(&self, link: &L, service: Service) -> Result<Served, AgentError> {
        self.serve_granting(link, service, &|_| Ok(()))
    }

    /// Serves `service` on `link` as [`serve`](Self::serve) does, asking `grant` before
    /// each request whether the peer may ask for its operation: `heartbeat`, `time`,
    /// `shutdown`, `kvp.read` (get, enumerate), `kvp.write` (set), `kvp.delete`, `kvp.ip`
    /// (the IP information requests) or `fcopy` (the version negotiation is always
    /// answered). A request `grant` refuses (with the operator's audit line) is logged
    /// with that line, changes nothing, and is answered with Hyper-V's failure status and
    /// nothing more.
    pub fn serve_granting<L: IcLink>(
        &self,
        link: &L,
        service: Service,
        grant: &dyn Fn(&str) -> Result<(), String>,
    ) -> Result<Served, AgentError> {
        let mut session = Session {
            agent: self,
            service,
            version: None,
            files: None,
            then: None,
            grant,
        };
        if service == Service::FileCopy
            && let Some(root) = &self.config.files_root
        {
            session.files =
                Some(
                    FileReceiver::new(root).map_err(|source| AgentError::FilesRoot {
                        path: root.clone(),
                        source,
                    })?,
                );
        }
        let mut served = Served::default();
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut out = vec![0u8; MAX_MESSAGE];
        loop {
            let incoming = match link.recv_message(&mut buf, Wait::Forever) {
                Ok(i) => i,
                Err(ChannelError::Closed) => return Ok(served),
                Err(e) => return Err(e.into()),
            };
            if incoming.packet_type != PacketType::InBand {
                self.log(
                    service,
                    &format!("a {:?} packet ignored", incoming.packet_type),
                );
                served.refused += 1;
                continue;
            }
            if !incoming.whole() {
                self.log(
                    service,
                    &format!("a {}-byte message, past the largest, refused", incoming.len),
                );
            }
            let (len, ok) = session.answer(&buf[..incoming.copied], incoming.whole(), &mut out);
            if ok {
                served.answered += 1;
            } else {
                served.refused += 1;
            }
            if len > 0 {
                link.send_message(incoming.transaction_id, &out[..len], Wait::Forever)?;
            }
            if let Some(running) = session.then.take() {
                running.wait(self, service);
            }
        }
    }

    /// Starts the shutdown command for `request`, before the answer goes out, so that an
    /// accepted shutdown is one whose command is already running.
    fn start_shutdown(&self, request: &ShutdownRequest<'_>) -> Result<Shutdown, Refusal> {
        let action = match request.flags.action {
            Action::PowerOff => "shutdown",
            Action::Reboot => "reboot",
            Action::Hibernate => "hibernate",
        };
        let refuse = |why: &str| {
            refused(format!(
                "{:?} (reason {:#x}): {why}",
                request.flags.action, request.reason
            ))
        };
        let Some((program, args)) = self
            .config
            .shutdown_command
            .as_deref()
            .and_then(<[OsString]>::split_first)
        else {
            return Err(refuse("no shutdown command is configured"));
        };
        Command::new(program)
            .args(args)
            .env("VMLINK_SHUTDOWN_ACTION", action)
            .env(
                "VMLINK_SHUTDOWN_FORCE",
                u8::from(request.flags.force).to_string(),
            )
            .env("VMLINK_SHUTDOWN_REASON", request.reason.to_string())
            .env("VMLINK_SHUTDOWN_TIMEOUT", request.timeout.to_string())
            .env("VMLINK_SHUTDOWN_MESSAGE", request.message)
            .spawn()
            .map(|child| Shutdown { action, child })
            .map_err(|e| refuse(&format!("the shutdown command did not start: {e}")))
    }

    /// Recomputes the auto pool: what Linux's KVP daemon reports there, in its order, then
    /// the time offset when one was measured.
    fn refresh_auto_pool(&self) {
        let uts = nix::sys::utsname::uname().ok();
        let field = |f: fn(&nix::sys::utsname::UtsName) -> &std::ffi::OsStr| {
            uts.as_ref()
                .map(|u| f(u).to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let release = field(|u| u.release());
        let mut numbers = release.split(|c: char| !c.is_ascii_digit());
        let major = numbers.next().unwrap_or_default().to_owned();
        let minor = numbers.next().unwrap_or_default().to_owned();
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let interfaces = netinfo::interfaces().unwrap_or_default();
        let addresses = |v4| {
            interfaces
                .iter()
                .map(|i| i.addresses(v4))
                .filter(|a| !a.is_empty())
                .collect::<Vec<_>>()
                .join(";")
        };
        let entries = [
            ("FullyQualifiedDomainName", host),
            (
                "IntegrationServicesVersion",
                format!("vmlink {}", env!("CARGO_PKG_VERSION")),
            ),
            ("NetworkAddressIPv4", addresses(true)),
            ("NetworkAddressIPv6", addresses(false)),
            ("OSBuildNumber", release.clone()),
            ("OSName", os_name()),
            ("OSMajorVersion", major),
            ("OSMinorVersion", minor),
            ("OSVersion", release),
            ("ProcessorArchitecture", field(|u| u.machine())),
        ];
        let mut store = self.store();
        for (k, v) in entries {
            // Within the pool's bound: these are the agent's own ten keys.
            let _ = store.set_auto(k, &v);
        }
        if let Some(offset) = self.time_offset() {
            let _ = store.set_auto(TIME_OFFSET_KEY, &(i128::from(offset) * 100).to_string());
        }
    }
}

/// `NAME` from `/etc/os-release`, or the kernel's name.
fn os_name() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "Linux".to_owned())
}

/// What a shutdown request asks for.
struct ShutdownRequest<'m> {
    flags: ShutdownFlags,
    reason: u32,
    timeout: u32,
    message: &'m str,
}

/// A shutdown command started before its answer was sent, waited for after.
#[derive(Debug)]
struct Shutdown {
    action: &'static str,
    child: std::process::Child,
}

impl Shutdown {
    fn wait(mut self, agent: &Agent, service: Service) {
        let action = self.action;
        match self.child.wait() {
            Ok(s) => agent.log(service, &format!("{action}: the command exited with {s}")),
            Err(e) => agent.log(service, &format!("{action}: waiting for the command: {e}")),
        }
    }
}

/// One service on one channel.
struct Session<'a> {
    agent: &'a Agent,
    service: Service,
    version: Option<Negotiated>,
    files: Option<FileReceiver>,
    then: Option<Shutdown>,
    /// Whether the peer may ask for an operation (the operator's audit line if not).
    grant: &'a dyn Fn(&str) -> Result<(), String>,
}

/// Why a request was refused: logged, answered with `status`.
struct Refusal {
    status: u32,
    why: String,
}

impl From<IcError> for Refusal {
    fn from(e: IcError) -> Self {
        Self {
            status: HV_E_FAIL,
            why: e.to_string(),
        }
    }
}

fn refused(why: impl Into<String>) -> Refusal {
    Refusal {
        status: HV_E_FAIL,
        why: why.into(),
    }
}

impl Session<'_> {
    /// The answer to `payload` in `out`: its length (0: nothing to send) and whether the
    /// request succeeded.
    fn answer(&mut self, payload: &[u8], whole: bool, out: &mut [u8]) -> (usize, bool) {
        let (agent, service) = (self.agent, self.service);
        let log = |why: &str| agent.log(service, why);
        let message = match Message::parse(payload) {
            Ok(m) if whole => m,
            Ok(m) => return (fail(&m, HV_E_FAIL, out), false),
            Err(e) => {
                log(&format!("a message that does not parse: {e}"));
                return (crate::refuse_raw(payload, out), false);
            }
        };
        if message.header.flags.contains(IcFlags::RESPONSE) {
            log("an answer where requests come: ignored");
            return (0, false);
        }
        let result = match message.header.message_type {
            MessageType::Negotiate => return self.negotiate(&message, out),
            t if t != self.service.message_type() => Err(refused(format!(
                "a {t:?} message on the {} channel",
                self.service
            ))),
            _ => match self.version {
                None => Err(refused("a request before the version negotiation")),
                Some(version) => self.request(&message, version, out),
            },
        };
        match result {
            Ok(len) => (len, true),
            // The end of a KVP enumeration: an answer, not a refusal.
            Err(r) if r.status == HV_S_CONT => (fail(&message, r.status, out), true),
            Err(r) => {
                log(&format!("refused: {}", r.why));
                (fail(&message, r.status, out), false)
            }
        }
    }

    fn negotiate(&mut self, message: &Message<'_>, out: &mut [u8]) -> (usize, bool) {
        let s = self.service;
        match negotiate::respond(message, s.framework_versions(), s.message_versions(), out) {
            Ok(answer) => match answer.outcome {
                Ok(v) => {
                    self.version = Some(v);
                    (answer.len, true)
                }
                Err(e) => {
                    self.agent.log(s, &format!("negotiation failed: {e}"));
                    (answer.len, false)
                }
            },
            Err(e) => {
                self.agent
                    .log(s, &format!("a negotiation that does not parse: {e}"));
                (fail(message, HV_E_FAIL, out), false)
            }
        }
    }

    fn request(
        &mut self,
        m: &Message<'_>,
        version: Negotiated,
        out: &mut [u8],
    ) -> Result<usize, Refusal> {
        let ok = |out: &mut [u8]| crate::encode(out, &m.header.response(HV_S_OK), m.body);
        let operation = match self.service {
            Service::Heartbeat => "heartbeat",
            Service::Shutdown => "shutdown",
            Service::TimeSync => "time",
            Service::FileCopy => "fcopy",
            Service::Kvp => match kvp::parse(m)? {
                Kvp::Get { .. } | Kvp::Enumerate { .. } => "kvp.read",
                Kvp::Set { .. } => "kvp.write",
                Kvp::Delete { .. } => "kvp.delete",
                _ => "kvp.ip",
            },
        };
        (self.grant)(operation).map_err(|audit| Refusal {
            status: HV_E_FAIL,
            why: audit,
        })?;
        match self.service {
            Service::Heartbeat => Ok(heartbeat::answer(m, out)?),
            Service::Shutdown => {
                let body = crate::shutdown::parse(m)?;
                let answer = ok(out)?;
                self.then = Some(self.agent.start_shutdown(&ShutdownRequest {
                    flags: body.flags()?,
                    reason: body.reason_code(),
                    timeout: body.timeout_seconds(),
                    message: body.display_message().unwrap_or(""),
                })?);
                Ok(answer)
            }
            Service::TimeSync => {
                let sample = match timesync::parse(m, version.message)? {
                    TimeSync::Data(d) => {
                        Sample::arrived(self.agent.config.clock.as_ref(), d.parenttime.get(), None)
                    }
                    TimeSync::Reference(d) => Sample::arrived(
                        self.agent.config.clock.as_ref(),
                        d.parenttime.get(),
                        Some(d.vmreferencetime.get()),
                    ),
                };
                let offset = sample.offset();
                *self.agent.offset.lock().unwrap_or_else(|e| e.into_inner()) = Some(offset);
                self.agent.log(
                    self.service,
                    &format!(
                        "the agent's clock is {:+.4} ms off the host's (transit {} µs)",
                        offset as f64 / 10_000.0,
                        sample.transit / 10
                    ),
                );
                if self.agent.config.slew_clock {
                    self.slew(offset);
                }
                let _ = self
                    .agent
                    .store()
                    .set_auto(TIME_OFFSET_KEY, &(i128::from(offset) * 100).to_string());
                // Linux answers time sync by sending the message back.
                Ok(ok(out)?)
            }
            Service::Kvp => self.kvp(m, out),
            Service::FileCopy => self.file_copy(m, out),
        }
    }

    /// Slews the system clock by the measured offset, or says why not.
    fn slew(&self, offset: i64) {
        let line = match clock::slew_for(offset) {
            Some(delta) => match clock::slew(delta) {
                Ok(()) => format!("slewing the clock by {} µs", delta / 10),
                Err(e) => format!("cannot slew the clock: {e}"),
            },
            None => format!(
                "an offset of {} ms is beyond what is slewed; the clock is left alone",
                offset / 10_000
            ),
        };
        self.agent.log(self.service, &line);
    }

    fn kvp(&mut self, m: &Message<'_>, out: &mut [u8]) -> Result<usize, Refusal> {
        let mut key_buf = [0u8; 3 * kvp::MAX_KEY_SIZE];
        let mut value_buf = [0u8; 3 * kvp::MAX_VALUE_SIZE];
        let request = kvp::parse(m)?;
        let header = m.header.response(HV_S_OK);
        let ok = |out: &mut [u8]| crate::encode(out, &header, m.body);
        match request {
            Kvp::Get { pool, data } => {
                let key = data.key(&mut key_buf)?;
                if pool == KvpPool::Auto {
                    self.agent.refresh_auto_pool();
                }
                let store = self.agent.store();
                let value = store
                    .get(pool, key)
                    .ok_or_else(|| refused(format!("GET {key:?}: not in the {pool:?} pool")))?;
                let data = KvpExchangeValue::new(key, KvpValue::String(value))?;
                Ok(kvp::encode(out, &header, &Kvp::Get { pool, data: &data })?)
            }
            Kvp::Set { pool, data } => {
                let key = data.key(&mut key_buf)?.to_owned();
                let value = match data.value(&mut value_buf)? {
                    KvpValue::String(s) => s.to_owned(),
                    KvpValue::U32(n) => n.to_string(),
                    KvpValue::U64(n) => n.to_string(),
                };
                self.agent
                    .store()
                    .set(pool, &key, &value)
                    .map_err(|e| refused(format!("SET {key:?}: {e}")))?;
                Ok(ok(out)?)
            }
            Kvp::Delete { pool, data } => {
                let key = data.key(&mut key_buf)?;
                match self.agent.store().delete(pool, key) {
                    Ok(true) => Ok(ok(out)?),
                    Ok(false) => Err(refused(format!("DELETE {key:?}: not in the {pool:?} pool"))),
                    Err(e) => Err(refused(format!("DELETE {key:?}: {e}"))),
                }
            }
            Kvp::Enumerate { pool, data } => {
                let index = data.index.get();
                if pool == KvpPool::Auto && index == 0 {
                    self.agent.refresh_auto_pool();
                }
                let store = self.agent.store();
                let Some((key, value)) = store.entry(pool, index as usize) else {
                    // The end of the pool: Linux's answer for "no more".
                    return Err(Refusal {
                        status: HV_S_CONT,
                        why: format!("ENUMERATE {pool:?} {index}: past the last entry"),
                    });
                };
                let entry =
                    KvpEnumerate::new(index, KvpExchangeValue::new(key, KvpValue::String(value))?);
                Ok(kvp::encode(
                    out,
                    &header,
                    &Kvp::Enumerate { pool, data: &entry },
                )?)
            }
            Kvp::GetIpInfo { pool, data } => {
                let adapter = data.text(IpField::AdapterId, &mut key_buf)?.to_owned();
                let iface = netinfo::by_mac(&adapter)
                    .map_err(|e| refused(format!("GET_IP_INFO: {e}")))?
                    .ok_or_else(|| refused(format!("GET_IP_INFO: no adapter {adapter:?}")))?;
                let mut answer = *data;
                let v4 = !iface.ipv4.is_empty();
                answer.addr_family = if v4 {
                    ADDR_FAMILY_IPV4
                } else {
                    ADDR_FAMILY_IPV6
                };
                answer.dhcp_enabled = 0;
                answer.set_text(IpField::IpAddr, &iface.addresses(v4))?;
                answer.set_text(IpField::SubNet, &iface.subnets(v4))?;
                let gateways = netinfo::ipv4_gateways(&iface.name);
                let gateways: Vec<String> = gateways.iter().map(ToString::to_string).collect();
                answer.set_text(IpField::Gateway, &gateways.join(";"))?;
                let dns: Vec<String> = netinfo::name_servers()
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                answer.set_text(IpField::DnsAddr, &dns.join(";"))?;
                Ok(kvp::encode(
                    out,
                    &header,
                    &Kvp::GetIpInfo {
                        pool,
                        data: &answer,
                    },
                )?)
            }
            Kvp::SetIpInfo { .. } => Err(refused(
                "SET_IP_INFO: this agent does not configure the network",
            )),
        }
    }

    fn file_copy(&mut self, m: &Message<'_>, out: &mut [u8]) -> Result<usize, Refusal> {
        let request = crate::fcopy::parse(m)?;
        let Some(files) = &mut self.files else {
            return Err(refused("file copy: no root directory is configured"));
        };
        let status = |r: files::Refused| Refusal {
            status: r.status,
            why: r.why,
        };
        match request {
            Fcopy::Start(start) => {
                let mut name_buf = [0u8; 3 * crate::fcopy::W_MAX_PATH];
                let mut path_buf = [0u8; 3 * crate::fcopy::W_MAX_PATH];
                let name = start.file_name(&mut name_buf)?;
                let path = start.path_name(&mut path_buf)?;
                files
                    .start(name, path, start.copy_flags.get(), start.file_size.get())
                    .map_err(status)?;
            }
            Fcopy::Write { offset, data, .. } => files.write(offset, data).map_err(status)?,
            Fcopy::Complete(_) => {
                let dest = files.complete().map_err(status)?;
                self.agent
                    .log(self.service, &format!("copied {}", dest.display()));
            }
            Fcopy::Cancel(_) => files.cancel(),
        }
        Ok(crate::encode(out, &m.header.response(HV_S_OK), m.body)?)
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        if let Some(files) = &mut self.files
            && files.busy()
        {
            self.agent
                .log(self.service, "the channel closed during a copy: removed");
            files.cancel();
        }
    }
}

/// The failure answer to a message that parsed: its header with `status`, its body echoed.
fn fail(m: &Message<'_>, status: u32, out: &mut [u8]) -> usize {
    crate::encode(out, &m.header.response(status), m.body).unwrap_or(0)
}

#[cfg(test)]
mod tests;
