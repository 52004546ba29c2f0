//! `vmlink-bench-report`: runs the comparison benchmarks (`cargo bench -p vmlink-benches`)
//! and turns criterion's results into one readable report: a table per group with every
//! peer and floor and its ratio, the issue's targets checked against the same run, and SVG
//! plots (round-trip latency against payload size, throughput against ring size). With the
//! benchmarks it runs `scripts/instr` (callgrind's instructions per message of the ring and
//! channel paths against the committed baseline) and includes its table.
//!
//! ```text
//! cargo run --release -p vmlink-benches --bin vmlink-bench-report            # full run
//! cargo run --release -p vmlink-benches --bin vmlink-bench-report -- --quick # shorter
//! cargo run --release -p vmlink-benches --bin vmlink-bench-report -- --no-run
//! cargo run --release -p vmlink-benches --bin vmlink-bench-report -- --no-instr
//! ```
//!
//! The report goes to stdout and, as `REPORT.md` with the plots, into `docs/benchmarks/`
//! (or `--out DIR`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::SystemTime;

use serde_json::Value;

/// The workspace root (this package lives one level below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the package sits inside the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// What the command line asked for.
struct Args {
    run: bool,
    quick: bool,
    out: PathBuf,
    filter: Option<String>,
    features: Option<String>,
    instr: bool,
    interleaved: bool,
    disk: bool,
}

const USAGE: &str = "\
usage: vmlink-bench-report [--quick] [--no-run] [--no-instr] [--no-interleaved] [--no-disk]
                           [--out DIR] [--filter REGEX] [--features LIST]

Runs the headline comparisons in interleaved rounds with pinned threads (the `floors` and
`processes` examples of vmlink-examples), `cargo bench -p vmlink-benches --bench compare`
(warm-up 1 s, measurement 3 s per benchmark; --quick: 0.5 s and 1 s) and `scripts/instr`
(instructions per message under callgrind, against benches/instr-baseline.json), then prints
the report and writes REPORT.md and SVG plots into DIR (default: docs/benchmarks in the
workspace).
  --no-run        only report the results the runs already left
  --no-instr      do not run scripts/instr (its last table is still reported)
  --no-interleaved  do not run the interleaved examples (their last output is still reported)
  --no-disk       do not run `vmlink disk bench` (vmlink-disk beside qemu-nbd and the host's
                  own pread/pwrite; needs qemu-utils; its last table is still reported)
  --filter REGEX  only run the benchmarks criterion's filter matches
  --features LIST cargo features of vmlink-benches to enable (iceoryx2: its peers, which
                  need libclang to build)";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        run: true,
        quick: false,
        out: root().join("docs/benchmarks"),
        filter: None,
        features: None,
        instr: true,
        interleaved: true,
        disk: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--no-run" => args.run = false,
            "--no-instr" => args.instr = false,
            "--no-interleaved" => args.interleaved = false,
            "--no-disk" => args.disk = false,
            "--out" => args.out = PathBuf::from(it.next().ok_or("--out needs a directory")?),
            "--filter" => args.filter = Some(it.next().ok_or("--filter needs a pattern")?),
            "--features" => args.features = Some(it.next().ok_or("--features needs a list")?),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("vmlink-bench-report: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(if e.is_empty() { 0 } else { 2 });
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmlink-bench-report: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let machine = Machine::probe();
    let started = SystemTime::now();
    if args.run {
        if args.interleaved {
            for example in INTERLEAVED {
                run_interleaved(example)?;
            }
        }
        if args.disk {
            run_disk()?;
        }
        run_benches(args)?;
        if args.instr {
            run_instr();
        }
    }
    let since = args.run.then_some(started);
    let results = collect(&target_dir().join("criterion"), since)?;
    if results.is_empty() {
        return Err("no criterion results found: run without --no-run first".into());
    }
    let signals =
        fs::read_to_string(target_dir().join("vmlink-benches/signals.txt")).unwrap_or_default();
    let instr =
        fs::read_to_string(target_dir().join("vmlink-benches/instr.txt")).unwrap_or_default();
    let interleaved = INTERLEAVED
        .iter()
        .filter_map(|e| {
            let out = fs::read_to_string(interleaved_path(e)).ok()?;
            Some(((*e).to_owned(), out))
        })
        .collect();
    let disk = fs::read_to_string(disk_path()).unwrap_or_default();
    let report = Report {
        results,
        signals,
        instr,
        interleaved,
        disk,
        machine,
        quick: args.quick,
        ran: args.run,
    };
    fs::create_dir_all(&args.out).map_err(|e| format!("create {}: {e}", args.out.display()))?;
    let mut plots = Vec::new();
    for plot in PLOTS {
        if let Some(svg) = report.plot(plot) {
            let path = args.out.join(plot.file);
            fs::write(&path, svg).map_err(|e| format!("write {}: {e}", path.display()))?;
            plots.push(plot);
        }
    }
    let md = report.markdown(&plots);
    let path = args.out.join("REPORT.md");
    fs::write(&path, &md).map_err(|e| format!("write {}: {e}", path.display()))?;
    println!("{md}");
    eprintln!("report written to {}", path.display());
    Ok(())
}

/// Runs the bench target with criterion's output in a log beside the report.
fn run_benches(args: &Args) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let (warm, measure) = if args.quick { ("0.5", "1") } else { ("1", "3") };
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root())
        .args(["bench", "-p", "vmlink-benches", "--bench", "compare"]);
    if let Some(f) = &args.features {
        cmd.args(["--features", f]);
    }
    cmd.arg("--").args([
        "--warm-up-time",
        warm,
        "--measurement-time",
        measure,
        "--noplot",
    ]);
    if let Some(f) = &args.filter {
        cmd.arg(f);
    }
    fs::create_dir_all(&args.out).map_err(|e| format!("create {}: {e}", args.out.display()))?;
    let log_path = target_dir().join("vmlink-benches/criterion.log");
    if let Some(dir) = log_path.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    let log = fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    eprintln!(
        "running the benchmarks (criterion's output: {}); this takes minutes",
        log_path.display()
    );
    let status = cmd
        .stdout(Stdio::from(log))
        .status()
        .map_err(|e| format!("run cargo bench: {e}"))?;
    if !status.success() {
        return Err(format!(
            "cargo bench failed ({status}); see {}",
            log_path.display()
        ));
    }
    Ok(())
}

/// The examples that measure the headline targets in interleaved rounds with pinned threads:
/// the ring and channel against their floors and rtrb, two processes against two threads,
/// the blocking paths against eventfd and a Unix socket, and the stream link against a raw
/// Unix socket.
const INTERLEAVED: [&str; 4] = ["floors", "processes", "blocking", "sockets"];

/// Where an interleaved example's output is kept for the report.
fn interleaved_path(example: &str) -> PathBuf {
    target_dir().join(format!("vmlink-benches/{example}.txt"))
}

/// Where `vmlink disk bench`'s table is kept for the report.
fn disk_path() -> PathBuf {
    target_dir().join("vmlink-benches/disk.txt")
}

/// Runs `vmlink disk bench` (release build, the full matrix) with its table kept for the
/// report, after the interleaved examples and before criterion's long run.
fn run_disk() -> Result<(), String> {
    eprintln!("running `vmlink disk bench` (vmlink-disk beside qemu-nbd and pread/pwrite)");
    let args = ["-p", "vmlink-cli", "--", "disk", "bench"];
    run_kept("vmlink disk bench", &args, &disk_path())
}

/// Runs an interleaved example (release build) with its output kept for the report. It runs
/// first, on a quiet machine, before criterion's long run.
fn run_interleaved(example: &str) -> Result<(), String> {
    eprintln!("running the `{example}` example (interleaved rounds, pinned threads)");
    let args = ["-p", "vmlink-examples", "--example", example];
    run_kept(
        &format!("the {example} example"),
        &args,
        &interleaved_path(example),
    )
}

/// `cargo run --release -q ARGS` with its stdout kept at `path` for the report; a failure
/// removes an earlier output, which must not pass for this run's.
fn run_kept(what: &str, args: &[&str], path: &Path) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root())
        .args(["run", "--release", "-q"])
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("run {what}: {e}"))?;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    if !out.status.success() {
        let _ = fs::remove_file(path);
        return Err(format!("{what} failed ({})", out.status));
    }
    fs::write(path, &out.stdout).map_err(|e| format!("write {}: {e}", path.display()))
}

/// Runs `scripts/instr`, which writes its table where [`run`] reads it. A failure (no
/// valgrind, say) is reported and leaves that part of the report out; the timings stand.
fn run_instr() {
    eprintln!("counting instructions per message under callgrind (scripts/instr)");
    let status = Command::new(root().join("scripts/instr"))
        .current_dir(root())
        .env("CARGO_TARGET_DIR", target_dir())
        .stdout(Stdio::null())
        .status();
    let failure = match status {
        Ok(s) if s.success() => return,
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    };
    // An earlier table must not pass for this run's.
    let _ = fs::remove_file(target_dir().join("vmlink-benches/instr.txt"));
    eprintln!("vmlink-bench-report: scripts/instr failed ({failure}); no instruction counts");
}

// ---- results ----------------------------------------------------------------------------

/// One benchmark's result.
#[derive(Debug, Clone)]
struct Bench {
    /// Median time per iteration, nanoseconds.
    ns: f64,
    /// Elements or bytes one iteration moves.
    per_iter: Per,
}

#[derive(Debug, Clone, Copy)]
enum Per {
    Elements(f64),
    Bytes(f64),
}

impl Bench {
    /// Elements or bytes per second.
    fn rate(&self) -> f64 {
        let n = match self.per_iter {
            Per::Elements(n) | Per::Bytes(n) => n,
        };
        n * 1e9 / self.ns
    }

    fn rate_text(&self) -> String {
        match self.per_iter {
            Per::Elements(_) => si(self.rate(), "/s"),
            Per::Bytes(_) => format!("{:.2} GB/s", self.rate() / 1e9),
        }
    }

    /// Time per element (or per iteration for byte throughput).
    fn time_text(&self) -> String {
        let ns = match self.per_iter {
            Per::Elements(n) => self.ns / n,
            Per::Bytes(_) => self.ns,
        };
        duration(ns)
    }
}

/// group → id → result.
type Results = BTreeMap<String, BTreeMap<String, Bench>>;

/// Reads every `new/benchmark.json` + `new/estimates.json` under `dir` (written after
/// `since`, when given).
fn collect(dir: &Path, since: Option<SystemTime>) -> Result<Results, String> {
    let mut out = Results::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if !p.is_dir() {
                continue;
            }
            if p.file_name().is_some_and(|n| n == "new") {
                if let Some((group, id, b)) = read_bench(&p, since)? {
                    out.entry(group).or_default().insert(id, b);
                }
            } else {
                stack.push(p);
            }
        }
    }
    Ok(out)
}

fn read_json(path: &Path) -> Result<Value, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn read_bench(
    dir: &Path,
    since: Option<SystemTime>,
) -> Result<Option<(String, String, Bench)>, String> {
    let est_path = dir.join("estimates.json");
    let (Ok(meta), true) = (fs::metadata(&est_path), dir.join("benchmark.json").exists()) else {
        return Ok(None);
    };
    if let (Some(since), Ok(modified)) = (since, meta.modified())
        && modified < since
    {
        return Ok(None);
    }
    let info = read_json(&dir.join("benchmark.json"))?;
    let est = read_json(&est_path)?;
    let group = info["group_id"].as_str().unwrap_or_default().to_owned();
    let mut id = info["function_id"].as_str().unwrap_or_default().to_owned();
    if let Some(v) = info["value_str"].as_str() {
        id = format!("{id}/{v}");
    }
    let Some(ns) = est["median"]["point_estimate"].as_f64() else {
        return Err(format!("{}: no median", est_path.display()));
    };
    let per_iter = match &info["throughput"] {
        Value::Object(m) if m.contains_key("Bytes") => {
            Per::Bytes(m["Bytes"].as_f64().unwrap_or(1.0))
        }
        Value::Object(m) if m.contains_key("Elements") => {
            Per::Elements(m["Elements"].as_f64().unwrap_or(1.0))
        }
        _ => Per::Elements(1.0),
    };
    Ok(Some((group, id, Bench { ns, per_iter })))
}

// ---- the machine ------------------------------------------------------------------------

struct Machine {
    cpu: String,
    cpus: usize,
    kernel: String,
    rustc: String,
    load: String,
}

impl Machine {
    fn probe() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown CPU".into(), |(_, m)| m.trim().to_owned());
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or("?".into(), |s| s.trim().to_owned());
        let rustc = Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
            .arg("-V")
            .output()
            .ok()
            .map_or("rustc ?".into(), |o| {
                String::from_utf8_lossy(&o.stdout).trim().to_owned()
            });
        let load = fs::read_to_string("/proc/loadavg").map_or("?".into(), |s| {
            s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        });
        Self {
            cpu,
            cpus,
            kernel,
            rustc,
            load,
        }
    }
}

// ---- the report -------------------------------------------------------------------------

/// How a group is read.
struct GroupSpec {
    name: &'static str,
    title: &'static str,
    /// The function every result of the group is compared with, at the same parameter.
    reference: &'static str,
    /// True: compare times (ratio = time / reference time, lower is better). False:
    /// compare rates (ratio = rate / reference rate, higher is better).
    latency: bool,
    /// Compare with the reference at this parameter rather than at each result's own.
    reference_param: Option<&'static str>,
}

const GROUPS: &[GroupSpec] = &[
    GroupSpec {
        name: "rtt_64",
        title: "Round trip, 64-byte request and response (two threads; `_two_processes` and `shm_` cases: two processes)",
        reference: "floor/atomic_pingpong",
        latency: true,
        reference_param: None,
    },
    GroupSpec {
        name: "stream_64",
        title: "64-byte payloads streamed one way",
        reference: "rtrb/push_pop",
        latency: false,
        reference_param: None,
    },
    GroupSpec {
        name: "bulk",
        title: "Bulk packets streamed one way",
        reference: "floor/cross_core_handoff",
        latency: false,
        reference_param: None,
    },
    GroupSpec {
        name: "signals",
        title: "Streams for the doorbell counts (saturated, and a trickle of one packet per 50 µs)",
        reference: "vmlink/channel_blocking_saturated",
        latency: false,
        reference_param: None,
    },
    GroupSpec {
        name: "scaling_ring",
        title: "1 KiB packets through rings of 16 KiB to 4 MiB",
        reference: "rtrb/chunks",
        latency: false,
        reference_param: None,
    },
    GroupSpec {
        name: "rtt_payload",
        title: "Round trip carrying the payload both ways, 0 bytes to the largest packet of a 256 KiB ring",
        reference: "floor/handoff",
        latency: true,
        reference_param: None,
    },
    GroupSpec {
        name: "scaling_pairs",
        title: "N channel pairs, blocking, 64-byte packets (aggregate)",
        reference: "vmlink/channel_blocking_pairs",
        latency: false,
        reference_param: Some("1"),
    },
    GroupSpec {
        name: "ic",
        title: "Integration services: heartbeat and KVP GET round trips beside the channel `call` under them",
        reference: "vmlink/channel_polling_call",
        latency: true,
        reference_param: None,
    },
];

/// Splits `function/param` when the last segment is a parameter (a number, or a size).
fn split_param(id: &str) -> (&str, Option<&str>) {
    match id.rsplit_once('/') {
        Some((f, p)) if p.starts_with(|c: char| c.is_ascii_digit()) => (f, Some(p)),
        _ => (id, None),
    }
}

/// A plot: one line per function of `group`, the parameter along x.
struct Plot {
    group: &'static str,
    file: &'static str,
    title: &'static str,
    /// True: plot time per iteration; false: plot the rate.
    latency: bool,
    y_label: &'static str,
}

const PLOTS: &[Plot] = &[
    Plot {
        group: "rtt_payload",
        file: "rtt_payload.svg",
        title: "Round-trip latency against payload size",
        latency: true,
        y_label: "round trip (µs, log)",
    },
    Plot {
        group: "scaling_ring",
        file: "scaling_ring.svg",
        title: "Throughput of 1 KiB packets against ring size",
        latency: false,
        y_label: "GB/s (log)",
    },
];

struct Report {
    results: Results,
    signals: String,
    /// `scripts/instr`'s table: instructions per message under callgrind.
    instr: String,
    /// The interleaved examples' outputs, by example name.
    interleaved: Vec<(String, String)>,
    /// `vmlink disk bench`'s table.
    disk: String,
    machine: Machine,
    quick: bool,
    /// The benchmarks ran in this invocation (not `--no-run`).
    ran: bool,
}

/// One line of the targets table.
struct Target {
    what: &'static str,
    goal: &'static str,
    measured: Option<(f64, String)>,
    met: fn(f64) -> bool,
}

impl Report {
    fn get(&self, group: &str, id: &str) -> Option<&Bench> {
        self.results.get(group)?.get(id)
    }

    /// `a`'s time over `b`'s.
    fn time_ratio(&self, group: &str, a: &str, b: &str) -> Option<(f64, String)> {
        let (x, y) = (self.get(group, a)?, self.get(group, b)?);
        let r = x.ns / y.ns;
        Some((
            r,
            format!("{} / {} = {r:.2}×", duration(x.ns), duration(y.ns)),
        ))
    }

    /// `a`'s rate over `b`'s.
    fn rate_ratio(&self, group: &str, a: &str, b: &str) -> Option<(f64, String)> {
        let (x, y) = (self.get(group, a)?, self.get(group, b)?);
        let r = x.rate() / y.rate();
        Some((
            r,
            format!("{} / {} = {r:.2}×", x.rate_text(), y.rate_text()),
        ))
    }

    /// Doorbells per packet of a `signals` case, from the counts file.
    fn doorbells(&self, case: &str) -> Option<(f64, String)> {
        let line = self
            .signals
            .lines()
            .find(|l| l.starts_with(&format!("signals/{case}:")))?;
        let v: f64 = line
            .split("doorbells/packet ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some((v, format!("{v:.4} doorbells/packet")))
    }

    fn targets(&self) -> Vec<Target> {
        vec![
            Target {
                what: "Polling round trip (channel `call`) vs the atomic ping-pong floor",
                goal: "≤ 1.3×",
                measured: self.time_ratio(
                    "rtt_64",
                    "vmlink/channel_polling_call",
                    "floor/atomic_pingpong",
                ),
                met: |r| r <= 1.3,
            },
            Target {
                what: "Polling round trip, ring layer, vs the floor",
                goal: "≤ 1.3×",
                measured: self.time_ratio("rtt_64", "vmlink/ring_polling", "floor/atomic_pingpong"),
                met: |r| r <= 1.3,
            },
            Target {
                what: "Polling round trip (channel `call`) vs rtrb's",
                goal: "< 1× (faster)",
                measured: self.time_ratio("rtt_64", "vmlink/channel_polling_call", "rtrb/pair"),
                met: |r| r < 1.0,
            },
            Target {
                what: "Blocking round trip (eventfd doorbells) vs raw eventfd ping-pong",
                goal: "≤ 1.1×",
                measured: self.time_ratio(
                    "rtt_64",
                    "vmlink/channel_blocking_eventfd_call",
                    "eventfd/pingpong_blocking",
                ),
                met: |r| r <= 1.1,
            },
            Target {
                what: "Blocking round trip over the stream link vs a blocking Unix socketpair",
                goal: "≤ 1.2×",
                measured: self.time_ratio(
                    "rtt_64",
                    "vmlink/stream_link_blocking_call",
                    "unix/socketpair",
                ),
                met: |r| r <= 1.2,
            },
            Target {
                what: "Polling round trip, two processes vs two threads",
                goal: "≤ 1.1×",
                measured: self.time_ratio(
                    "rtt_64",
                    "vmlink/shm_polling_call",
                    "vmlink/channel_polling_call",
                ),
                met: |r| r <= 1.1,
            },
            Target {
                what: "64-byte streaming (channel, batches of 32) vs rtrb push/pop",
                goal: "≥ 1.5×",
                measured: self.rate_ratio("stream_64", "vmlink/channel_batch_32", "rtrb/push_pop"),
                met: |r| r >= 1.5,
            },
            Target {
                what: "64-byte streaming (ring, commit every 32) vs rtrb push/pop",
                goal: "≥ 1.5×",
                measured: self.rate_ratio("stream_64", "vmlink/ring_commit_32", "rtrb/push_pop"),
                met: |r| r >= 1.5,
            },
            Target {
                what: "64-byte streaming, two processes vs two threads",
                goal: "≥ 0.9×",
                measured: self.rate_ratio(
                    "stream_64",
                    "vmlink/shm_batch_32",
                    "vmlink/channel_batch_32",
                ),
                met: |r| r >= 0.9,
            },
            Target {
                what: "64 KiB in place vs the cross-core floor",
                goal: "≥ 0.8×",
                measured: self.rate_ratio(
                    "bulk",
                    "vmlink/ring_in_place/64KiB",
                    "floor/cross_core_handoff/64KiB",
                ),
                met: |r| r >= 0.8,
            },
            Target {
                what: "64 KiB copy API vs the cross-core floor",
                goal: "≥ 0.5×",
                measured: self.rate_ratio(
                    "bulk",
                    "vmlink/ring_copy/64KiB",
                    "floor/cross_core_handoff/64KiB",
                ),
                met: |r| r >= 0.5,
            },
            Target {
                what: "64 KiB in place vs a Unix socket",
                goal: "≥ 5×",
                measured: self.rate_ratio(
                    "bulk",
                    "vmlink/ring_in_place/64KiB",
                    "unix/socket/64KiB",
                ),
                met: |r| r >= 5.0,
            },
            Target {
                what: "64 KiB copy API vs a Unix socket",
                goal: "≥ 5×",
                measured: self.rate_ratio("bulk", "vmlink/ring_copy/64KiB", "unix/socket/64KiB"),
                met: |r| r >= 5.0,
            },
            Target {
                what: "Doorbells per packet, saturated stream (blocking channel)",
                goal: "< 0.01",
                measured: self.doorbells("vmlink/channel_blocking_saturated"),
                met: |r| r < 0.01,
            },
            Target {
                what: "Doorbells per packet, saturated stream (polling channel)",
                goal: "< 0.01",
                measured: self.doorbells("vmlink/channel_polling_saturated"),
                met: |r| r < 0.01,
            },
        ]
    }

    fn markdown(&self, plots: &[&Plot]) -> String {
        let m = &self.machine;
        let mut s = String::new();
        let _ = writeln!(s, "# vmlink benchmark report\n");
        let _ = writeln!(
            s,
            "Machine: {}, {} CPUs, Linux {}, {}; load average {} {}.{}\n",
            m.cpu,
            m.cpus,
            m.kernel,
            m.rustc,
            if self.ran {
                "before the run"
            } else {
                "when reported"
            },
            m.load,
            if self.quick {
                " Quick mode (0.5 s warm-up, 1 s measurement per benchmark)."
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "Reproduce: `cargo run --release -p vmlink-benches --bin vmlink-bench-report`. \
             Every figure is a criterion median from the same run; ratios compare results \
             of one run on one machine.\n"
        );
        if !self.interleaved.is_empty() {
            let _ = writeln!(
                s,
                "## Headline targets: interleaved rounds\n\nEach example runs every case once \
                 per round, alternating their order, with the two sides pinned to two CPUs, \
                 and reports medians across rounds and ratios computed per round: the \
                 comparisons this drifting machine cannot spoil. Instruction counts for the \
                 same paths are further down.\n"
            );
            for (example, out) in &self.interleaved {
                let _ = writeln!(
                    s,
                    "### `{example}` (`cargo run --release -p vmlink-examples --example \
                     {example}`)\n\n```text\n{out}```\n"
                );
            }
        }
        if !self.disk.is_empty() {
            let _ = writeln!(
                s,
                "## Block device: vmlink-disk beside qemu-nbd and pread/pwrite\n\n\
                 `vmlink disk bench` (`cargo run --release -p vmlink-cli -- disk bench`): four \
                 systems in interleaved rounds on one image in a tmpfs, ratios per round, \
                 medians across rounds.\n\n```text\n{}```\n",
                self.disk
            );
        }
        let _ = writeln!(s, "## Targets from criterion\n");
        let _ = writeln!(
            s,
            "From the criterion groups below, whose cases run one after another: where the \
             machine drifts between them, so do these ratios. The interleaved figures above \
             are the ones to trust for the round trips and streams.\n"
        );
        let _ = writeln!(s, "| target | goal | measured | met |");
        let _ = writeln!(s, "| --- | --- | --- | --- |");
        for t in self.targets() {
            let (measured, met) = match &t.measured {
                Some((r, text)) => (text.clone(), if (t.met)(*r) { "yes" } else { "**no**" }),
                None => ("not measured".into(), "–"),
            };
            let _ = writeln!(s, "| {} | {} | {measured} | {met} |", t.what, t.goal);
        }
        for g in GROUPS {
            let Some(results) = self.results.get(g.name) else {
                continue;
            };
            let _ = writeln!(s, "\n## `{}`: {}\n", g.name, g.title);
            let _ = writeln!(
                s,
                "Ratio: {} of `{}` {}{}.\n",
                if g.latency {
                    "time over the time"
                } else {
                    "rate over the rate"
                },
                g.reference,
                g.reference_param
                    .map_or("at the same parameter".to_owned(), |p| format!("at {p}")),
                if g.latency {
                    " (lower is better)"
                } else {
                    " (higher is better)"
                }
            );
            if let (Some(a), Some(b)) = (
                results.get(g.reference),
                results.get(&format!("{}_at_end", g.reference)),
            ) {
                let _ = writeln!(
                    s,
                    "The floor measured {} at the start of this group and {} at its end: \
                     where they differ much, the machine changed under the group (on a \
                     virtual machine, its CPUs moving between host cores) and ratios between \
                     cases far apart in the list carry that error.\n",
                    duration(a.ns),
                    duration(b.ns)
                );
            }
            let _ = writeln!(s, "| benchmark | median | rate | ratio |");
            let _ = writeln!(s, "| --- | ---: | ---: | ---: |");
            for (id, b) in self.ordered(results) {
                let (f, p) = split_param(id);
                let _ = f;
                let reference = match g.reference_param.or(p) {
                    Some(p) => results.get(&format!("{}/{p}", g.reference)),
                    None => results.get(g.reference),
                };
                let ratio = reference.map_or("–".into(), |r| {
                    let x = if g.latency {
                        b.ns / r.ns
                    } else {
                        b.rate() / r.rate()
                    };
                    format!("{x:.2}×")
                });
                let _ = writeln!(
                    s,
                    "| `{id}` | {} | {} | {ratio} |",
                    b.time_text(),
                    b.rate_text()
                );
            }
        }
        if !self.signals.is_empty() {
            let _ = writeln!(s, "\n## Doorbells\n\n```text\n{}```", self.signals);
        }
        if !self.instr.is_empty() {
            let _ = writeln!(
                s,
                "\n## Instructions per message (callgrind)\n\nFrom `scripts/instr`: \
                 single-threaded, so repeatable where timings are not; compared with \
                 `benches/instr-baseline.json` for the same rustc.\n\n```text\n{}```",
                self.instr
            );
        }
        if !plots.is_empty() {
            let _ = writeln!(s, "\n## Plots\n");
            for p in plots {
                let _ = writeln!(s, "![{}]({})\n", p.title, p.file);
            }
        }
        s
    }

    /// Results in a stable order: by parameter (numerically, then by name), then by id.
    fn ordered<'a>(&self, results: &'a BTreeMap<String, Bench>) -> Vec<(&'a String, &'a Bench)> {
        let mut v: Vec<_> = results.iter().collect();
        v.sort_by(|(a, _), (b, _)| {
            let (fa, pa) = split_param(a);
            let (fb, pb) = split_param(b);
            param_value(pa)
                .total_cmp(&param_value(pb))
                .then_with(|| rank(fa).cmp(&rank(fb)))
                .then_with(|| fa.cmp(fb))
        });
        v
    }

    /// An SVG line plot for `plot`, if its group ran.
    fn plot(&self, plot: &Plot) -> Option<String> {
        let results = self.results.get(plot.group)?;
        let mut params: Vec<&str> = Vec::new();
        let mut lines: BTreeMap<&str, Vec<(usize, f64)>> = BTreeMap::new();
        let mut ordered = self.ordered(results);
        ordered.sort_by(|(a, _), (b, _)| {
            param_value(split_param(a).1).total_cmp(&param_value(split_param(b).1))
        });
        for (id, b) in ordered {
            let (f, Some(p)) = split_param(id) else {
                continue;
            };
            let x = match params.iter().position(|q| *q == p) {
                Some(i) => i,
                None => {
                    params.push(p);
                    params.len() - 1
                }
            };
            let y = if plot.latency {
                b.ns / 1e3
            } else {
                b.rate() / 1e9
            };
            lines.entry(f).or_default().push((x, y));
        }
        if params.len() < 2 || lines.is_empty() {
            return None;
        }
        Some(svg(plot, &params, &lines))
    }
}

/// Floors first, then vmlink, then the peers.
fn rank(function: &str) -> u8 {
    if function.starts_with("floor/") {
        0
    } else if function.starts_with("vmlink/") {
        1
    } else {
        2
    }
}

/// A parameter's numeric value for sorting (`64KiB` → 65536); none sorts first.
fn param_value(p: Option<&str>) -> f64 {
    let Some(p) = p else { return -1.0 };
    let digits: String = p.chars().take_while(|c| c.is_ascii_digit()).collect();
    let n: f64 = digits.parse().unwrap_or(0.0);
    match &p[digits.len()..] {
        "KiB" => n * 1024.0,
        "MiB" => n * 1024.0 * 1024.0,
        _ => n,
    }
}

fn si(v: f64, unit: &str) -> String {
    if v >= 1e9 {
        format!("{:.2} G{unit}", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2} M{unit}", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k{unit}", v / 1e3)
    } else {
        format!("{v:.0} {unit}")
    }
}

fn duration(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

// ---- SVG --------------------------------------------------------------------------------

const COLOURS: [&str; 8] = [
    "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666",
];

/// A line chart: categorical x (the parameters in order), logarithmic y.
fn svg(plot: &Plot, params: &[&str], lines: &BTreeMap<&str, Vec<(usize, f64)>>) -> String {
    let (w, h) = (760.0_f64, 440.0_f64);
    let (left, right, top, bottom) = (70.0, 230.0, 40.0, 60.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let ys = lines
        .values()
        .flatten()
        .map(|(_, y)| *y)
        .filter(|y| *y > 0.0);
    let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let (lo, hi) = (
        lo.log10().floor(),
        hi.log10().ceil().max(lo.log10().floor() + 1.0),
    );
    let x_at = |i: usize| left + pw * i as f64 / (params.len() - 1) as f64;
    let y_at = |y: f64| top + ph * (1.0 - (y.log10() - lo) / (hi - lo));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        plot.title
    );
    // Decades on y.
    let mut d = lo;
    while d <= hi {
        let y = y_at(10f64.powf(d));
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            y + 4.0,
            number(10f64.powf(d))
        );
        d += 1.0;
    }
    for (i, p) in params.iter().enumerate() {
        let x = x_at(i);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#eee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{p}</text>"##,
            top + ph,
            top + ph + 18.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        h - 18.0,
        if plot.latency {
            "payload (bytes)"
        } else {
            "ring data size"
        }
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + ph / 2.0,
        plot.y_label
    );
    for (k, (name, pts)) in lines.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let path: Vec<String> = pts
            .iter()
            .filter(|(_, y)| *y > 0.0)
            .map(|(x, y)| format!("{:.1},{:.1}", x_at(*x), y_at(*y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for p in &path {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(s, r#"<circle cx="{x}" cy="{y}" r="3" fill="{colour}"/>"#);
        }
        let ly = top + 10.0 + 20.0 * k as f64;
        let lx = left + pw + 16.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="3"/><text x="{}" y="{}">{name}</text>"#,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn number(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench(ns: f64, per_iter: Per) -> Bench {
        Bench { ns, per_iter }
    }

    fn report() -> Report {
        let mut results = Results::new();
        let rtt = results.entry("rtt_64".into()).or_default();
        rtt.insert(
            "floor/atomic_pingpong".into(),
            bench(100.0, Per::Elements(1.0)),
        );
        rtt.insert(
            "vmlink/channel_polling_call".into(),
            bench(120.0, Per::Elements(1.0)),
        );
        rtt.insert("rtrb/pair".into(), bench(110.0, Per::Elements(1.0)));
        let payload = results.entry("rtt_payload".into()).or_default();
        for (p, f, v) in [(0, 50.0, 60.0), (64, 55.0, 70.0), (4096, 400.0, 900.0)] {
            payload.insert(format!("floor/handoff/{p}"), bench(f, Per::Elements(1.0)));
            payload.insert(
                format!("vmlink/ring_polling/{p}"),
                bench(v, Per::Elements(1.0)),
            );
        }
        let bulk = results.entry("bulk".into()).or_default();
        bulk.insert(
            "floor/cross_core_handoff/64KiB".into(),
            bench(10_000.0, Per::Bytes(65536.0)),
        );
        bulk.insert(
            "vmlink/ring_in_place/64KiB".into(),
            bench(20_000.0, Per::Bytes(65536.0)),
        );
        Report {
            results,
            signals: "# doorbells\nsignals/vmlink/channel_blocking_saturated: 1000 packets; \
                      doorbells/packet 0.0040 (producer->consumer 4 = 0.0040/packet)\n"
                .into(),
            instr: "case               Ir/msg  / floor\nfloor               165.0    1.00x\n\
                    ring                616.1    3.73x\n"
                .into(),
            interleaved: vec![(
                "floors".into(),
                "  vmlink-ring, polling / VMBus floor rtt  1.24   (goal <= 1.15)\n".into(),
            )],
            disk: "4k-randread  32 |  486k\n".into(),
            machine: Machine {
                cpu: "test CPU".into(),
                cpus: 2,
                kernel: "6.0".into(),
                rustc: "rustc 1.0".into(),
                load: "0.00 0.00 0.00".into(),
            },
            quick: false,
            ran: true,
        }
    }

    #[test]
    fn parameters_split_and_sort_by_size() {
        assert_eq!(
            split_param("vmlink/ring_copy/64KiB"),
            ("vmlink/ring_copy", Some("64KiB"))
        );
        assert_eq!(split_param("rtrb/pair"), ("rtrb/pair", None));
        assert_eq!(
            split_param("unix/socketpair/0"),
            ("unix/socketpair", Some("0"))
        );
        assert_eq!(param_value(Some("64KiB")), 65536.0);
        assert_eq!(param_value(Some("4MiB")), 4.0 * 1024.0 * 1024.0);
        assert_eq!(param_value(Some("4096")), 4096.0);
        assert!(param_value(None) < param_value(Some("0")));
    }

    #[test]
    fn targets_are_ratios_of_the_same_run() {
        let r = report();
        let t = r.targets();
        let polling = &t[0];
        let (ratio, text) = polling.measured.clone().expect("measured");
        assert!((ratio - 1.2).abs() < 1e-9, "{text}");
        assert!((polling.met)(ratio), "1.2x the floor meets a 1.3x target");
        let in_place = t
            .iter()
            .find(|t| t.what.starts_with("64 KiB in place vs the cross-core"))
            .expect("listed");
        let (ratio, _) = in_place.measured.clone().expect("measured");
        assert!((ratio - 0.5).abs() < 1e-9);
        assert!(!(in_place.met)(ratio), "half the floor misses 0.8x");
        let doorbells = t
            .iter()
            .find(|t| t.what.contains("saturated stream (blocking"))
            .expect("listed");
        assert_eq!(doorbells.measured.as_ref().map(|m| m.0), Some(0.004));
        let missing = t
            .iter()
            .find(|t| t.what.contains("two processes vs two threads"))
            .expect("listed");
        assert!(
            missing.measured.is_none(),
            "absent results are not invented"
        );
    }

    #[test]
    fn markdown_has_every_result_with_its_ratio() {
        let md = report().markdown(&[]);
        assert!(md.contains("Machine: test CPU, 2 CPUs"));
        assert!(
            md.contains("| `vmlink/channel_polling_call` | 120 ns | 8.33 M/s | 1.20× |"),
            "{md}"
        );
        assert!(
            md.contains("| `vmlink/ring_polling/4096` | 900 ns | 1.11 M/s | 2.25× |"),
            "{md}"
        );
        assert!(
            md.contains("| `vmlink/ring_in_place/64KiB` | 20.00 µs | 3.28 GB/s | 0.50× |"),
            "{md}"
        );
        assert!(md.contains("0.0040 doorbells/packet | yes |"), "{md}");
    }

    #[test]
    fn markdown_has_the_interleaved_figures_first() {
        let md = report().markdown(&[]);
        let headline = md
            .find("## Headline targets: interleaved rounds")
            .expect("headline");
        let criterion = md
            .find("## Targets from criterion")
            .expect("criterion targets");
        assert!(headline < criterion);
        assert!(
            md.contains("### `floors` (`cargo run --release -p vmlink-examples --example floors`)")
        );
        assert!(md.contains("VMBus floor rtt  1.24   (goal <= 1.15)"));
    }

    #[test]
    fn markdown_has_the_instruction_counts() {
        let md = report().markdown(&[]);
        assert!(
            md.contains("## Instructions per message (callgrind)"),
            "{md}"
        );
        let disk = md
            .find("## Block device: vmlink-disk beside qemu-nbd")
            .expect("the disk section");
        assert!(disk < md.find("## Targets from criterion").unwrap());
        assert!(md.contains("4k-randread  32 |  486k"), "{md}");
        assert!(
            md.contains("ring                616.1    3.73x\n```"),
            "{md}"
        );
        let mut without = report();
        without.instr.clear();
        assert!(!without.markdown(&[]).contains("callgrind"));
    }

    #[test]
    fn plots_draw_one_line_per_function() {
        let r = report();
        let svg = r.plot(&PLOTS[0]).expect("rtt_payload ran");
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("floor/handoff") && svg.contains("vmlink/ring_polling"));
        assert!(svg.contains(">4096</text>"));
        assert!(r.plot(&PLOTS[1]).is_none(), "scaling_ring did not run");
    }
}
