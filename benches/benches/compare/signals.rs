//! `signals`: doorbells per packet. criterion times each case; the doorbell counts come
//! from the channels' counters and are printed to stderr and written to
//! `target/vmlink-benches/signals.txt` once each case has run.
//!
//! Cases: a saturated stream (the producer sends as fast as `send` lets it) and a trickle
//! (one packet every 50 µs, so a blocking consumer falls asleep between packets), each
//! with a blocking channel (default config) and a polling one.

use std::fs;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use vmlink_channel::{
    Config, Counters, DEFAULT_SPIN_BEFORE_SLEEP, InProcessChannel, in_process_channel_pair,
};

use crate::harness::{Check, Group, MSG, Peer, bench_pair, msg, spin_for, verify};

/// Data bytes of each ring.
const RING: usize = 16 * 4096;
/// Time between packets in a trickle.
const TRICKLE_GAP: Duration = Duration::from_micros(50);

/// Registers the group.
pub fn signals(c: &mut Criterion) {
    let mut out = Report {
        path: report_path(),
        started: false,
    };
    let mut g = c.benchmark_group("signals");
    g.throughput(Throughput::Elements(1));
    for (mode, config) in [
        // Blocking waits as a user gets them: spinning before they sleep.
        (
            "blocking",
            Config::default().with_spin_before_sleep(DEFAULT_SPIN_BEFORE_SLEEP),
        ),
        ("sleep_at_once", Config::default().sleep_at_once()),
        ("polling", Config::polling(crate::rtt::SPIN)),
    ] {
        case(&mut g, &mut out, mode, config, None);
        case(&mut g, &mut out, mode, config, Some(TRICKLE_GAP));
    }
    g.finish();
}

/// Where the counts go: `$CARGO_TARGET_DIR` or the workspace's `target/`.
fn report_path() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")))
        .join("vmlink-benches/signals.txt")
}

/// One case: `send` on this thread (a `gap` between packets for a trickle), `recv_batch`
/// on the peer.
fn case(g: &mut Group<'_>, out: &mut Report, mode: &str, config: Config, gap: Option<Duration>) {
    let (tx, rx) = in_process_channel_pair(RING, config).expect("channel pair");
    let (tx, rx) = (Arc::new(tx), Arc::new(rx));
    let peer = {
        let rx = Arc::clone(&rx);
        let mut check = Check::new(8);
        let mut buf = [0u8; MSG];
        Peer::spawn("signals-consumer", move |n| {
            let mut got = 0;
            while got < n {
                got += rx
                    .recv_batch(64, None, |p| {
                        p.read_payload(0, &mut buf).expect("64-byte payload");
                        check.packet(&buf);
                    })
                    .expect("receive") as u64;
            }
            check.round()
        })
    };
    let load = if gap.is_some() {
        "trickle"
    } else {
        "saturated"
    };
    let name = format!("vmlink/channel_{mode}_{load}");
    let before = (tx.counters(), rx.counters());
    let sender = Arc::clone(&tx);
    let mut seq = 0u64;
    bench_pair(
        g,
        name.clone(),
        peer,
        move |n| {
            for _ in 0..n {
                sender.send(&msg(seq), None).expect("send");
                seq += 1;
                if let Some(gap) = gap {
                    spin_for(gap);
                }
            }
            0
        },
        |first, n, r| verify("signals", r.theirs, first, n, MSG / 8),
    );
    out.add(&name, &tx, &rx, before);
}

/// The counts file, started afresh by the first case that ran in this process (a
/// criterion filter that skips the group leaves the last counts alone).
struct Report {
    path: PathBuf,
    started: bool,
}

impl Report {
    /// Prints and records the doorbells per packet since `before`; nothing when the case
    /// was filtered out.
    fn add(
        &mut self,
        name: &str,
        tx: &InProcessChannel,
        rx: &InProcessChannel,
        before: (Counters, Counters),
    ) {
        let (t, r) = (tx.counters(), rx.counters());
        let packets = t.packets_sent - before.0.packets_sent;
        if packets == 0 {
            return;
        }
        let to_consumer = t.signals_sent - before.0.signals_sent;
        let to_producer = r.signals_sent - before.1.signals_sent;
        let sleeps = r.receive_sleeps - before.1.receive_sleeps;
        let per = |x: u64| x as f64 / packets as f64;
        let line = format!(
            "signals/{name}: {packets} packets; doorbells/packet {:.4} \
             (producer->consumer {to_consumer} = {:.4}/packet, consumer->producer {to_producer}); \
             consumer sleeps {sleeps} = {:.4}/packet",
            per(to_consumer + to_producer),
            per(to_consumer),
            per(sleeps),
        );
        eprintln!("{line}");
        if !self.started {
            self.started = true;
            if let Some(dir) = self.path.parent() {
                let _ = fs::create_dir_all(dir);
            }
            let _ = fs::write(
                &self.path,
                "# doorbells per 64-byte packet, from the last `signals` run\n",
            );
        }
        if let Ok(mut f) = fs::OpenOptions::new().append(true).open(&self.path) {
            let _ = writeln!(f, "{line}");
        }
    }
}
