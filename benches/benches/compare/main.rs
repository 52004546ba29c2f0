//! vmlink beside its peers and the physical floors, between two threads of one process.
//!
//! Run everything (minutes; use a quiet machine, and read ratios, not absolute times):
//!
//! ```text
//! cargo bench -p vmlink-benches                      # all groups
//! cargo bench -p vmlink-benches -- rtt_64            # one group (criterion filter)
//! cargo bench -p vmlink-benches -- rtt_64 --warm-up-time 1 --measurement-time 2
//! ```
//!
//! CI short mode (compiles and runs every benchmark once, seconds not minutes):
//!
//! ```text
//! cargo test -p vmlink-benches --benches
//! ```
//!
//! iceoryx2 joins as a further peer (`rtt_64/iceoryx2/request_response` and
//! `bulk/iceoryx2/publish_subscribe/<size>KiB`, in `iceoryx.rs`) with the off-by-default
//! `iceoryx2` feature, which neither the CI short mode nor clippy builds: iceoryx2 is heavy
//! to build, needs libclang for its bindings (Debian: `libclang-dev`) and Rust 1.89.
//!
//! ```text
//! cargo bench -p vmlink-benches --features iceoryx2              # all groups, with iceoryx2
//! cargo bench -p vmlink-benches --features iceoryx2 -- iceoryx2  # only its cases
//! cargo test -p vmlink-benches --features iceoryx2 --benches -- iceoryx2
//! ```
//!
//! Groups, each with its peers and floors so every ratio comes from one run:
//! - `rtt_64` ([`rtt`]): round trip of a 64-byte request and response.
//! - `stream_64` ([`stream`]): 64-byte payloads streamed one way.
//! - `bulk` ([`bulk`]): 4 KiB and 64 KiB packets streamed one way.
//! - `signals` ([`signals`]): doorbells per packet, saturated and trickling (printed).
//! - `scaling_ring`, `rtt_payload`, `scaling_pairs` ([`scaling`]): ring sizes 16 KiB to
//!   4 MiB, round trips from 0 bytes to the largest packet, N channel pairs.
//! - `ic` ([`ic`]): integration-service round trips (heartbeat, KVP GET) beside the
//!   channel `call` under them, and the codec's work per heartbeat.
//!
//! Every benchmark checks a checksum of what it moved, allocates nothing inside the timed
//! region, and drives a long-lived peer thread per round (`harness::Peer`), so thread
//! start-up is never timed. The two-process cases ([`cross_process`]) run this binary again
//! as a child process and sit in the same groups as their in-process twins.

mod bulk;
mod cross_process;
mod harness;
mod ic;
#[cfg(feature = "iceoryx2")]
mod iceoryx;
mod ivshmem;
mod rtt;
mod scaling;
mod secure;
mod signals;
mod stream;

use std::process::ExitCode;

use criterion::Criterion;

fn main() -> ExitCode {
    // The two-process benchmarks run this binary again as their peer.
    if let Some(code) = cross_process::child_main() {
        return code;
    }
    harness::self_check();
    let mut c = Criterion::default().configure_from_args();
    rtt::rtt_64(&mut c);
    stream::stream_64(&mut c);
    bulk::bulk(&mut c);
    signals::signals(&mut c);
    scaling::scaling(&mut c);
    ic::ic(&mut c);
    c.final_summary();
    ExitCode::SUCCESS
}
