//! `vmlink stat` and `vmlink top`: the live channels of every process this user may see,
//! read from the reports each publishes in the runtime directory (`vmlink_shm::monitor`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use clap::Args;
use vmlink_shm::Role;
use vmlink_shm::monitor::{
    self, ChannelReport, HostReport, ListenerKind, RingFill, Scan, StateReport,
};

use crate::error::{Context, Result, fail};
use crate::report::string;

/// Options of `vmlink stat`.
#[derive(Debug, Args)]
pub struct StatArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// The runtime directory to read (default: where this user's processes publish,
    /// `$XDG_RUNTIME_DIR/vmlink` or its fallback).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// Options of `vmlink top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Print one JSON object per refresh (one per line) instead of a table.
    #[arg(long)]
    json: bool,
    /// The runtime directory to read (as for `vmlink stat`).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Seconds between refreshes (0.05 to 3600).
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    interval: f64,
    /// Stop after this many refreshes (default: until interrupted).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
}

fn scan(dir: Option<&PathBuf>) -> Result<Scan> {
    match dir {
        Some(dir) => monitor::scan_dir(dir).context(&format!("read {}", dir.display())),
        None => monitor::scan().context(&format!("read {}", monitor::runtime_dir().display())),
    }
}

/// `n` and the noun, in the plural unless `n` is 1.
fn count(n: u64, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

/// Runs `vmlink stat`.
pub fn stat(args: &StatArgs) -> Result<()> {
    let scan = scan(args.dir.as_ref())?;
    let out = if args.json {
        stat_json(&scan)
    } else {
        stat_text(&scan)
    };
    print!("{out}");
    Ok(())
}

/// Runs `vmlink top`.
pub fn top(args: &TopArgs) -> Result<()> {
    if !(0.05..=3600.0).contains(&args.interval) {
        return fail(format!(
            "--interval {} is out of range: give 0.05 to 3600 seconds",
            args.interval
        ));
    }
    if args.count == Some(0) {
        return fail("--count 0 would show nothing: give at least 1");
    }
    let interval = Duration::from_secs_f64(args.interval);
    let clear = !args.json && std::io::stdout().is_terminal();
    let mut before = scan(args.dir.as_ref())?;
    let mut shown = 0u64;
    while args.count.is_none_or(|n| shown < n) {
        thread::sleep(interval);
        let now = scan(args.dir.as_ref())?;
        let rows = rates(&before, &now);
        let mut out = String::new();
        if clear {
            out.push_str("\x1b[H\x1b[2J");
        }
        out.push_str(&if args.json {
            top_json(&now, &rows)
        } else {
            top_text(&now, &rows, args.interval)
        });
        let mut stdout = std::io::stdout().lock();
        if stdout
            .write_all(out.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            // The reader went away (`vmlink top | head`): nothing more to show.
            return Ok(());
        }
        before = now;
        shown += 1;
    }
    Ok(())
}

/// One channel's rates between two scans.
struct Rates<'a> {
    host: &'a HostReport,
    channel: &'a ChannelReport,
    /// Per second: packets and bytes sent, received, signals sent and received. `None`
    /// for a channel the earlier scan did not have.
    per_s: Option<[f64; 6]>,
}

fn rates<'a>(before: &Scan, now: &'a Scan) -> Vec<Rates<'a>> {
    let earlier: HashMap<(u32, u64), (u64, &ChannelReport)> = before
        .hosts
        .iter()
        .flat_map(|h| {
            h.channels
                .iter()
                .map(move |c| ((h.pid, c.id), (h.sampled_ns, c)))
        })
        .collect();
    let mut rows = Vec::new();
    for host in &now.hosts {
        for channel in &host.channels {
            let per_s = earlier.get(&(host.pid, channel.id)).and_then(|(t0, c0)| {
                let dt = host.sampled_ns.checked_sub(*t0)? as f64 / 1e9;
                if dt <= 0.0 {
                    return None;
                }
                let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / dt;
                let (a, b) = (&c0.counters, &channel.counters);
                Some([
                    rate(a.packets_sent, b.packets_sent),
                    rate(a.bytes_sent, b.bytes_sent),
                    rate(a.packets_received, b.packets_received),
                    rate(a.bytes_received, b.bytes_received),
                    rate(a.signals_sent, b.signals_sent),
                    rate(a.signals_received, b.signals_received),
                ])
            });
            rows.push(Rates {
                host,
                channel,
                per_s,
            });
        }
    }
    rows
}

fn role(r: Role) -> &'static str {
    match r {
        Role::Host => "host",
        Role::Guest => "guest",
    }
}

/// A byte count for people: B, KiB, MiB, GiB.
fn bytes(n: f64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut x = n;
    let mut unit = 0;
    while x >= 1024.0 && unit + 1 < UNITS.len() {
        x /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{x:.0} {}", UNITS[unit])
    } else {
        format!("{x:.1} {}", UNITS[unit])
    }
}

fn fill_text(f: Option<RingFill>) -> String {
    match f {
        Some(f) if f.size > 0 => format!(
            "{} of {} ({:.0}%)",
            bytes(f.used as f64),
            bytes(f.size as f64),
            f.used as f64 * 100.0 / f.size as f64
        ),
        _ => "indices not sound".to_owned(),
    }
}

fn header_text(scan: &Scan) -> String {
    let mut out = format!(
        "{} process{} publishing in {}",
        scan.hosts.len(),
        if scan.hosts.len() == 1 { "" } else { "es" },
        scan.dir.display()
    );
    if !scan.stale.is_empty() {
        let _ = write!(
            out,
            " ({} stale registration{} of dead processes ignored)",
            scan.stale.len(),
            if scan.stale.len() == 1 { "" } else { "s" }
        );
    }
    out.push('\n');
    for (path, e) in &scan.failed {
        let _ = writeln!(out, "{}: {e}", path.display());
    }
    out
}

fn stat_text(scan: &Scan) -> String {
    let mut out = header_text(scan);
    for h in &scan.hosts {
        let _ = writeln!(
            out,
            "\npid {} {} (uid {}): {}",
            h.pid,
            h.program,
            h.uid,
            count(h.channels.len() as u64, "channel")
        );
        for l in &h.listeners {
            match l.kind {
                ListenerKind::Services => {
                    let _ = writeln!(out, "  listening on {}: {}", l.path, l.services.join(", "));
                }
                _ => {
                    let _ = writeln!(out, "  waiting for a successor on {}", l.path);
                }
            }
        }
        for c in &h.channels {
            let k = &c.counters;
            let peer = c.peer.map_or_else(
                || "peer unknown".to_owned(),
                |p| format!("peer pid {} uid {}", p.pid, p.uid),
            );
            let _ = writeln!(
                out,
                "  #{} {} {}, {peer}, {}",
                c.id,
                c.service,
                role(c.role),
                c.state
            );
            let _ = writeln!(
                out,
                "     sent {} ({}), received {} ({})",
                count(k.packets_sent, "packet"),
                bytes(k.bytes_sent as f64),
                count(k.packets_received, "packet"),
                bytes(k.bytes_received as f64)
            );
            let _ = writeln!(
                out,
                "     signals {} out, {} in; waits {} send, {} receive; calls in flight {}; \
                 late completions {}",
                k.signals_sent,
                k.signals_received,
                k.send_waits,
                k.receive_sleeps,
                c.calls_in_flight,
                k.late_completions
            );
            let _ = writeln!(
                out,
                "     outgoing ring {}, incoming ring {}",
                fill_text(c.outgoing),
                fill_text(c.incoming)
            );
        }
    }
    out
}

fn top_text(scan: &Scan, rows: &[Rates<'_>], interval: f64) -> String {
    let mut out = header_text(scan);
    let _ = writeln!(out, "rates per second over the last {interval} s\n");
    let _ = writeln!(
        out,
        "{:>7} {:<12} {:>4} {:<16} {:<5} {:<11} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>5} {:>5} {:>5}",
        "PID",
        "PROGRAM",
        "ID",
        "SERVICE",
        "ROLE",
        "STATE",
        "TX PKT/S",
        "TX B/S",
        "RX PKT/S",
        "RX B/S",
        "SIG OUT",
        "SIG IN",
        "CALLS",
        "OUT%",
        "IN%"
    );
    for r in rows {
        let state = match &r.channel.state {
            StateReport::Open => "open",
            StateReport::PeerClosed => "peer closed",
            StateReport::Failed { .. } => "failed",
        };
        let rate = |i: usize| {
            r.per_s
                .map_or_else(|| "-".to_owned(), |p| format!("{:.0}", p[i]))
        };
        let bps = |i: usize| r.per_s.map_or_else(|| "-".to_owned(), |p| bytes(p[i]));
        let pct = |f: Option<RingFill>| match f {
            Some(f) if f.size > 0 => format!("{:.0}", f.used as f64 * 100.0 / f.size as f64),
            _ => "?".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:>7} {:<12} {:>4} {:<16} {:<5} {:<11} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>5} {:>5} {:>5}",
            r.host.pid,
            truncate(&r.host.program, 12),
            r.channel.id,
            truncate(&r.channel.service, 16),
            role(r.channel.role),
            state,
            rate(0),
            bps(1),
            rate(2),
            bps(3),
            rate(4),
            rate(5),
            r.channel.calls_in_flight,
            pct(r.channel.outgoing),
            pct(r.channel.incoming),
        );
    }
    out
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

fn fill_json(f: Option<RingFill>) -> String {
    f.map_or_else(
        || "null".to_owned(),
        |f| format!("{{\"used\":{},\"size\":{}}}", f.used, f.size),
    )
}

fn channel_json(c: &ChannelReport) -> String {
    let k = &c.counters;
    let peer = c.peer.map_or_else(
        || "null".to_owned(),
        |p| format!("{{\"pid\":{},\"uid\":{},\"gid\":{}}}", p.pid, p.uid, p.gid),
    );
    let (state, failure) = match &c.state {
        StateReport::Open => ("open", "null".to_owned()),
        StateReport::PeerClosed => ("peer_closed", "null".to_owned()),
        StateReport::Failed { cause } => ("failed", string(cause)),
    };
    format!(
        "{{\"id\":{},\"service\":{},\"role\":\"{}\",\"peer\":{peer},\
         \"since_unix_ms\":{},\"state\":\"{state}\",\"failure\":{failure},\
         \"counters\":{{\"packets_sent\":{},\"bytes_sent\":{},\"packets_received\":{},\
         \"bytes_received\":{},\"signals_sent\":{},\"signals_received\":{},\"send_waits\":{},\
         \"receive_sleeps\":{},\"late_completions\":{}}},\"calls_in_flight\":{},\
         \"outgoing\":{},\"incoming\":{}}}",
        c.id,
        string(&c.service),
        role(c.role),
        c.since_unix_ms,
        k.packets_sent,
        k.bytes_sent,
        k.packets_received,
        k.bytes_received,
        k.signals_sent,
        k.signals_received,
        k.send_waits,
        k.receive_sleeps,
        k.late_completions,
        c.calls_in_flight,
        fill_json(c.outgoing),
        fill_json(c.incoming),
    )
}

fn scan_json_fields(scan: &Scan) -> String {
    let paths = |v: &mut dyn Iterator<Item = &PathBuf>| {
        v.map(|p| string(&p.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(",")
    };
    let failed: Vec<String> = scan
        .failed
        .iter()
        .map(|(p, e)| {
            format!(
                "{{\"path\":{},\"error\":{}}}",
                string(&p.to_string_lossy()),
                string(&e.to_string())
            )
        })
        .collect();
    format!(
        "\"dir\":{},\"stale\":[{}],\"failed\":[{}]",
        string(&scan.dir.to_string_lossy()),
        paths(&mut scan.stale.iter()),
        failed.join(",")
    )
}

fn stat_json(scan: &Scan) -> String {
    let hosts: Vec<String> = scan
        .hosts
        .iter()
        .map(|h| {
            let listeners: Vec<String> = h
                .listeners
                .iter()
                .map(|l| {
                    let services: Vec<String> = l.services.iter().map(|s| string(s)).collect();
                    let kind = match l.kind {
                        ListenerKind::Services => "services",
                        _ => "hand_over",
                    };
                    format!(
                        "{{\"path\":{},\"kind\":\"{kind}\",\"services\":[{}]}}",
                        string(&l.path),
                        services.join(",")
                    )
                })
                .collect();
            let channels: Vec<String> = h.channels.iter().map(channel_json).collect();
            format!(
                "{{\"pid\":{},\"uid\":{},\"program\":{},\"sampled_ns\":{},\"listeners\":[{}],\
                 \"channels\":[{}]}}",
                h.pid,
                h.uid,
                string(&h.program),
                h.sampled_ns,
                listeners.join(","),
                channels.join(",")
            )
        })
        .collect();
    format!(
        "{{{},\"hosts\":[{}]}}\n",
        scan_json_fields(scan),
        hosts.join(",")
    )
}

fn top_json(scan: &Scan, rows: &[Rates<'_>]) -> String {
    let channels: Vec<String> = rows
        .iter()
        .map(|r| {
            let per_s = r.per_s.map_or_else(
                || "null".to_owned(),
                |p| {
                    format!(
                        "{{\"packets_sent\":{:.3},\"bytes_sent\":{:.3},\"packets_received\":{:.3},\
                         \"bytes_received\":{:.3},\"signals_sent\":{:.3},\"signals_received\":{:.3}}}",
                        p[0], p[1], p[2], p[3], p[4], p[5]
                    )
                },
            );
            format!(
                "{{\"pid\":{},\"program\":{},\"sampled_ns\":{},\"channel\":{},\
                 \"per_second\":{per_s}}}",
                r.host.pid,
                string(&r.host.program),
                r.host.sampled_ns,
                channel_json(r.channel)
            )
        })
        .collect();
    format!(
        "{{{},\"channels\":[{}]}}\n",
        scan_json_fields(scan),
        channels.join(",")
    )
}
