//! `vmlink agent` and `vmlink ic`: Hyper-V's integration services between two processes
//! over vmlink-shm.
//!
//! The agent listens on a socket and serves each service on its own channel: a host tool
//! connects with the service's name (`ic-heartbeat`, `ic-kvp`, ...), negotiates versions as
//! Hyper-V does, and sends its requests. Each `vmlink ic` command opens the channels it
//! needs, runs, prints what it found (a table, or one JSON object with `--json`) and exits:
//! 0 on success, 1 when the agent refused the request, 2 on any other error.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use vmlink_ic::Service;
use vmlink_ic::agent::clock::SkewedClock;
use vmlink_ic::agent::{Agent, AgentConfig, TIME_OFFSET_KEY};
use vmlink_ic::fcopy::{CREATE_PATH, OVER_WRITE};
use vmlink_ic::host::{Host, HostError};
use vmlink_ic::kvp::KvpPool;
use vmlink_ic::shutdown::{Action, ShutdownFlags};
use vmlink_shm::{Guest, Listener};

use crate::error::{Context, Result, fail};
use crate::report::string;

/// Options of `vmlink agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Where to listen. Its directory must be private to this user (it is created with
    /// mode 0700 if missing).
    #[arg(long)]
    socket: PathBuf,
    /// The KVP store's file (created at the first change); without it the store lives
    /// in memory and is lost when the agent exits.
    #[arg(long)]
    kvp_file: Option<PathBuf>,
    /// The directory file copies land in (and nowhere else); without it every copy is
    /// refused.
    #[arg(long)]
    files_root: Option<PathBuf>,
    /// The command a shutdown request runs, with `sh -c`: the agent starts it, then
    /// answers (a command that cannot start is refused); the request is in its environment (VMLINK_SHUTDOWN_ACTION shutdown|reboot|hibernate,
    /// VMLINK_SHUTDOWN_FORCE, VMLINK_SHUTDOWN_REASON, VMLINK_SHUTDOWN_TIMEOUT,
    /// VMLINK_SHUTDOWN_MESSAGE). Without it shutdown requests are logged and refused.
    #[arg(long)]
    shutdown_command: Option<String>,
    /// Pretend the agent's clock is off by this many milliseconds (positive: ahead), to
    /// see time sync measure it. The system clock is never changed.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    clock_skew_ms: i64,
    /// Slew the system clock towards the host's after each time sample (offsets up to
    /// 0.5 s; larger ones are only reported). Needs CAP_SYS_TIME: without it the agent
    /// refuses to start. By default time sync only measures and reports.
    #[arg(long)]
    slew_clock: bool,
    /// The most service channels served at once; a connection past it is closed at once
    /// and logged, so a host cannot make the agent start threads without bound.
    #[arg(long, default_value_t = 64)]
    max_channels: usize,
    /// A role-based access policy (TOML; see `vmlink policy check`): who may open each
    /// service (`ic-heartbeat`, `ic-shutdown`, `ic-timesync`, `ic-kvp`, `ic-fcopy`) and ask
    /// for which operations in it (`heartbeat`, `time`, `shutdown`, `kvp.read`,
    /// `kvp.write`, `kvp.delete`, `kvp.ip`, `fcopy`). Without it, only this user may
    /// connect, for everything. A denial is logged with who, what and why; the client
    /// hears only that it was refused.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
}

/// Options of `vmlink ic`.
#[derive(Debug, Args)]
pub struct IcArgs {
    /// The socket `vmlink agent` listens on.
    #[arg(long)]
    socket: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// How long to wait for each answer, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// The request.
    #[command(subcommand)]
    request: IcRequest,
}

/// The requests of `vmlink ic`.
#[derive(Debug, Subcommand)]
enum IcRequest {
    /// Send heartbeats; print their round trip.
    Heartbeat {
        /// How many (1 to 1,000,000; each round trip is kept for the percentiles).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        count: u32,
    },
    /// Send the host's clock as samples (or a sync), then print the offset the agent
    /// measured and published in KVP's auto pool.
    Time {
        /// How many samples (1 to 1,000,000).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        samples: u32,
        /// Send the first as a sync request.
        #[arg(long)]
        sync: bool,
    },
    /// Key-value pairs in the agent's pools.
    Kvp {
        /// The operation.
        #[command(subcommand)]
        op: KvpOp,
    },
    /// Ask the guest to shut down, reboot or hibernate.
    Shutdown {
        /// Reboot instead of shutting down.
        #[arg(long, conflicts_with = "hibernate")]
        reboot: bool,
        /// Hibernate instead of shutting down.
        #[arg(long)]
        hibernate: bool,
        /// Ask for it by force.
        #[arg(long)]
        force: bool,
        /// The message shown to the guest's users.
        #[arg(long)]
        reason: String,
        /// The reason code.
        #[arg(long, default_value_t = 0)]
        code: u32,
        /// Seconds the guest is given.
        #[arg(long, default_value_t = 60)]
        timeout_s: u32,
    },
    /// Copy a host file into the guest: DEST is a full guest path, file name included.
    Copy {
        /// The host file.
        src: PathBuf,
        /// The guest path (absolute, inside the agent's files root).
        dest: String,
        /// Replace an existing file.
        #[arg(long)]
        overwrite: bool,
        /// Create missing directories.
        #[arg(long)]
        create_path: bool,
    },
}

/// KVP operations.
#[derive(Debug, Subcommand)]
enum KvpOp {
    /// Print a key's value.
    Get {
        /// The pool.
        #[arg(long, value_enum, default_value = "external")]
        pool: Pool,
        /// The key.
        key: String,
    },
    /// Set a key.
    Set {
        /// The pool.
        #[arg(long, value_enum, default_value = "external")]
        pool: Pool,
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Delete a key.
    Delete {
        /// The pool.
        #[arg(long, value_enum, default_value = "external")]
        pool: Pool,
        /// The key.
        key: String,
    },
    /// List a pool.
    List {
        /// The pool.
        #[arg(long, value_enum, default_value = "external")]
        pool: Pool,
    },
    /// Print an adapter's addresses, by MAC address.
    IpInfo {
        /// The MAC address (`00:15:5d:01:02:03`).
        mac: String,
    },
}

/// The KVP pools.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Pool {
    /// Pool 0: values the host pushes to the guest.
    External,
    /// Pool 1: values the guest publishes.
    Guest,
    /// Pool 2: the guest's automatic values (read-only).
    Auto,
    /// Pool 3.
    AutoExternal,
    /// Pool 4.
    AutoInternal,
}

impl From<Pool> for KvpPool {
    fn from(p: Pool) -> Self {
        match p {
            Pool::External => KvpPool::External,
            Pool::Guest => KvpPool::Guest,
            Pool::Auto => KvpPool::Auto,
            Pool::AutoExternal => KvpPool::AutoExternal,
            Pool::AutoInternal => KvpPool::AutoInternal,
        }
    }
}

/// Runs `vmlink agent` until it is killed.
pub fn agent(args: &AgentArgs) -> Result<()> {
    let config = AgentConfig {
        kvp_file: args.kvp_file.clone(),
        files_root: args.files_root.clone(),
        shutdown_command: args.shutdown_command.as_ref().map(|c| {
            vec![
                OsString::from("sh"),
                OsString::from("-c"),
                OsString::from(c),
            ]
        }),
        clock: Arc::new(SkewedClock::new(args.clock_skew_ms.saturating_mul(10_000))),
        slew_clock: args.slew_clock,
        ..AgentConfig::default()
    };
    let agent = Arc::new(Agent::new(config).context("start the agent")?);
    let access = match &args.policy {
        Some(path) => Some(vmlink_policy::Policy::load(path).context("--policy")?),
        None => None,
    };
    let services = Service::ALL
        .iter()
        .map(|s| {
            let service = vmlink_shm::Service::new(s.channel_name());
            match &access {
                Some(a) => service.with_policy(vmlink_shm::Policy::roles(a.clone())),
                None => service,
            }
        })
        .collect();
    let access = access.map(Arc::new);
    let listener = Listener::bind_services(&args.socket, services).context("listen")?;
    eprintln!(
        "vmlink agent: serving heartbeat, shutdown, time sync, KVP and file copy on {}",
        args.socket.display()
    );
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let endpoint = match listener.accept() {
            Ok(e) => e,
            Err(vmlink_shm::ShmError::ListenerStopped) => return fail("the listener stopped"),
            Err(vmlink_shm::ShmError::Denied { audit, .. }) => {
                eprintln!("vmlink agent: {audit}");
                continue;
            }
            Err(e) => {
                eprintln!("vmlink agent: a connection failed: {e}");
                continue;
            }
        };
        let Some(service) = Service::from_channel_name(endpoint.service()) else {
            continue;
        };
        if active.load(Ordering::Acquire) >= args.max_channels {
            eprintln!(
                "vmlink agent: {service}: {} channels are served already: this one is closed",
                args.max_channels
            );
            continue;
        }
        active.fetch_add(1, Ordering::AcqRel);
        let (agent, done) = (Arc::clone(&agent), Arc::clone(&active));
        let access = access.clone();
        let spawned = thread::Builder::new()
            .name(format!("vmlink-{service}"))
            .spawn(move || {
                // Each request's operation is judged on the identity the handshake
                // established; without a policy, everything is granted.
                let grant = |operation: &str| match (&access, endpoint.identity()) {
                    (Some(policy), Some(peer)) => {
                        let d = policy.decide(peer, service.channel_name(), Some(operation));
                        if d.allowed() { Ok(()) } else { Err(d.audit_line()) }
                    }
                    (Some(_), None) => Err("vmlink-policy: deny: the peer was not identified".into()),
                    (None, _) => Ok(()),
                };
                match agent.serve_granting(endpoint.channel(), service, &grant) {
                    Ok(s) => eprintln!(
                        "vmlink agent: {service}: the host closed the channel ({} answered, {} refused)",
                        s.answered, s.refused
                    ),
                    Err(e) => eprintln!("vmlink agent: {service}: {e}"),
                }
                drop(endpoint);
                done.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::AcqRel);
            eprintln!("vmlink agent: cannot start a service thread: {e}");
        }
    }
}

/// What a request printed, and whether the agent refused it.
struct Outcome {
    text: String,
    json: String,
    refused: bool,
}

impl Outcome {
    fn ok(text: String, json: String) -> Self {
        Self {
            text,
            json,
            refused: false,
        }
    }
}

/// Runs one `vmlink ic` request; returns the exit status (0, or 1 when refused).
pub fn ic(args: &IcArgs) -> Result<u8> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let outcome = match &args.request {
        IcRequest::Heartbeat { count } => heartbeat(&args.socket, timeout, *count)?,
        IcRequest::Time { samples, sync } => time(&args.socket, timeout, *samples, *sync)?,
        IcRequest::Kvp { op } => kvp(&args.socket, timeout, op)?,
        IcRequest::Shutdown {
            reboot,
            hibernate,
            force,
            reason,
            code,
            timeout_s,
        } => {
            let action = if *reboot {
                Action::Reboot
            } else if *hibernate {
                Action::Hibernate
            } else {
                Action::PowerOff
            };
            let flags = ShutdownFlags {
                action,
                force: *force,
            };
            with_host(&args.socket, Service::Shutdown, timeout, |h| {
                match h.shutdown(flags, *code, *timeout_s, reason) {
                    Ok(()) => Ok(Outcome::ok(
                        format!("the guest accepted: {action:?}"),
                        format!(
                            "{{\"accepted\":true,\"action\":{}}}",
                            string(&format!("{action:?}"))
                        ),
                    )),
                    Err(HostError::Refused { status }) => Ok(refusal(status)),
                    Err(e) => Err(e),
                }
            })?
        }
        IcRequest::Copy {
            src,
            dest,
            overwrite,
            create_path,
        } => copy(&args.socket, timeout, src, dest, *overwrite, *create_path)?,
    };
    if args.json {
        println!("{}", outcome.json);
    } else {
        println!("{}", outcome.text);
    }
    Ok(u8::from(outcome.refused))
}

fn refusal(status: u32) -> Outcome {
    Outcome {
        text: format!("the agent refused (status {status:#010x})"),
        json: format!("{{\"refused\":true,\"status\":{status}}}"),
        refused: true,
    }
}

/// Connects to `service`, negotiates, and runs `f` with the host.
fn with_host<T>(
    socket: &Path,
    service: Service,
    timeout: Duration,
    f: impl FnOnce(&mut Host<'_, vmlink_shm::ShmChannel>) -> std::result::Result<T, HostError>,
) -> Result<T> {
    let endpoint = Guest::new(service.channel_name())
        .connect(socket)
        .context(&format!("connect to the agent's {service} channel"))?;
    let mut host = Host::negotiate(endpoint.channel(), service, timeout)
        .context(&format!("negotiate {service}"))?;
    f(&mut host).context(&format!("{service}"))
}

fn heartbeat(socket: &Path, timeout: Duration, count: u32) -> Result<Outcome> {
    let mut rtts = with_host(socket, Service::Heartbeat, timeout, |h| {
        let mut rtts = Vec::with_capacity(count as usize);
        for seq in 0..u64::from(count) {
            let start = Instant::now();
            h.heartbeat(seq)?;
            rtts.push(start.elapsed());
        }
        Ok(rtts)
    })?;
    rtts.sort();
    let at = |q: f64| rtts[((rtts.len() - 1) as f64 * q).round() as usize];
    let (min, p50, p99) = (rtts[0], at(0.5), at(0.99));
    Ok(Outcome::ok(
        format!(
            "{count} heartbeats answered: round trip min {} p50 {} p99 {}",
            micros(min),
            micros(p50),
            micros(p99)
        ),
        format!(
            "{{\"heartbeats\":{count},\"rtt_ns\":{{\"min\":{},\"p50\":{},\"p99\":{}}}}}",
            min.as_nanos(),
            p50.as_nanos(),
            p99.as_nanos()
        ),
    ))
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn time(socket: &Path, timeout: Duration, samples: u32, sync: bool) -> Result<Outcome> {
    let version = with_host(socket, Service::TimeSync, timeout, |h| {
        for i in 0..samples {
            h.time(sync && i == 0)?;
        }
        Ok(h.version().message)
    })?;
    let offset = with_host(socket, Service::Kvp, timeout, |h| {
        h.kvp_get(KvpPool::Auto, TIME_OFFSET_KEY)
    })?;
    let Some(offset) = offset else {
        return fail("the agent published no time offset");
    };
    let ns: i64 = offset
        .parse()
        .context("the agent's published offset is not a number")?;
    Ok(Outcome::ok(
        format!(
            "{samples} samples sent (time sync {version}); the agent's clock is {:.3} ms {} the host's",
            ns.unsigned_abs() as f64 / 1e6,
            if ns >= 0 { "ahead of" } else { "behind" }
        ),
        format!("{{\"samples\":{samples},\"version\":\"{version}\",\"offset_ns\":{ns}}}"),
    ))
}

fn kvp(socket: &Path, timeout: Duration, op: &KvpOp) -> Result<Outcome> {
    with_host(socket, Service::Kvp, timeout, |h| {
        Ok(match op {
            KvpOp::Get { pool, key } => match h.kvp_get((*pool).into(), key)? {
                Some(v) => Outcome::ok(
                    v.clone(),
                    format!("{{\"key\":{},\"value\":{}}}", string(key), string(&v)),
                ),
                None => Outcome {
                    text: format!("{key:?} is not in the {pool:?} pool"),
                    json: format!("{{\"key\":{},\"value\":null}}", string(key)),
                    refused: true,
                },
            },
            KvpOp::Set { pool, key, value } => match h.kvp_set((*pool).into(), key, value) {
                Ok(()) => Outcome::ok(
                    format!("{key} set"),
                    format!("{{\"key\":{},\"set\":true}}", string(key)),
                ),
                Err(HostError::Refused { status }) => refusal(status),
                Err(e) => return Err(e),
            },
            KvpOp::Delete { pool, key } => {
                let deleted = h.kvp_delete((*pool).into(), key)?;
                Outcome {
                    text: if deleted {
                        format!("{key} deleted")
                    } else {
                        format!("{key:?} is not in the {pool:?} pool")
                    },
                    json: format!("{{\"key\":{},\"deleted\":{deleted}}}", string(key)),
                    refused: !deleted,
                }
            }
            KvpOp::List { pool } => {
                let entries = h.kvp_list((*pool).into())?;
                let text = entries
                    .iter()
                    .map(|(k, v)| format!("{k}\t{v}"))
                    .collect::<Vec<_>>()
                    .join("\n");
                let json = entries
                    .iter()
                    .map(|(k, v)| format!("{{\"key\":{},\"value\":{}}}", string(k), string(v)))
                    .collect::<Vec<_>>()
                    .join(",");
                Outcome::ok(text, format!("{{\"entries\":[{json}]}}"))
            }
            KvpOp::IpInfo { mac } => match h.ip_info(mac) {
                Ok([addr, subnet, gateway, dns]) => Outcome::ok(
                    format!("addresses {addr}\nsubnets {subnet}\ngateways {gateway}\ndns {dns}"),
                    format!(
                        "{{\"addresses\":{},\"subnets\":{},\"gateways\":{},\"dns\":{}}}",
                        string(&addr),
                        string(&subnet),
                        string(&gateway),
                        string(&dns)
                    ),
                ),
                Err(HostError::Refused { status }) => refusal(status),
                Err(e) => return Err(e),
            },
        })
    })
}

fn copy(
    socket: &Path,
    timeout: Duration,
    src: &Path,
    dest: &str,
    overwrite: bool,
    create_path: bool,
) -> Result<Outcome> {
    let Some((dir, name)) = dest.rsplit_once('/').filter(|(_, n)| !n.is_empty()) else {
        return fail(format!(
            "{dest:?} is not a full guest path ending in a file name"
        ));
    };
    let dir = if dir.is_empty() { "/" } else { dir };
    let mut flags = 0;
    if overwrite {
        flags |= OVER_WRITE;
    }
    if create_path {
        flags |= CREATE_PATH;
    }
    with_host(socket, Service::FileCopy, timeout, |h| {
        match h.copy_file(src, dir, name, flags) {
            Ok(s) => {
                let gbps = s.bytes as f64 / s.elapsed.as_secs_f64().max(1e-9) / 1e9;
                Ok(Outcome::ok(
                    format!(
                        "copied {} bytes to {dest} in {:.1} ms ({gbps:.2} GB/s, {} writes)",
                        s.bytes,
                        s.elapsed.as_secs_f64() * 1e3,
                        s.writes
                    ),
                    format!(
                        "{{\"bytes\":{},\"ms\":{:.3},\"gbps\":{gbps:.4},\"writes\":{}}}",
                        s.bytes,
                        s.elapsed.as_secs_f64() * 1e3,
                        s.writes
                    ),
                ))
            }
            Err(HostError::Refused { status }) => Ok(refusal(status)),
            Err(e) => Err(e),
        }
    })
}
