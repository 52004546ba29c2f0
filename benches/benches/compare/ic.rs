//! `ic`: the integration services' round trips (`vmlink-ic`'s host library against its
//! agent on a peer thread) beside the channel `call` they are built on, polling and
//! blocking, and the codec's own work per heartbeat.
//!
//! - `vmlink/channel_{polling,blocking}_call`: a 64-byte `call` answered by `complete`, the
//!   reference (the same case as in `rtt_64`).
//! - `vmlink_ic/heartbeat_{polling,blocking}`: `Host::heartbeat` (encode, send, wait for
//!   the answer with the request's transaction id, parse, check `seq + 1`) against
//!   `Agent::serve` (parse, answer).
//! - `vmlink_ic/kvp_get_{polling,blocking}`: a KVP GET of a 16-byte value: a 7,460-byte
//!   message each way, UTF-16 both ways.
//! - `codec/heartbeat_parse_answer`: `Message::parse` and `heartbeat::answer` on one thread.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use vmlink_channel::{Config, DEFAULT_SPIN_BEFORE_SLEEP, in_process_channel_pair};
use vmlink_ic::agent::{Agent, AgentConfig};
use vmlink_ic::host::Host;
use vmlink_ic::kvp::KvpPool;
use vmlink_ic::{Header, Message, MessageType, Service, Version, heartbeat};

use crate::harness::Group;
use crate::rtt::{RING, SPIN, vmlink_channel};

/// How long the host waits for an answer before the benchmark fails.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Registers the group.
pub fn ic(c: &mut Criterion) {
    let mut g = c.benchmark_group("ic");
    // One element is one round trip.
    g.throughput(Throughput::Elements(1));
    let modes = [
        ("polling", Config::polling(SPIN)),
        (
            "blocking",
            Config::default().with_spin_before_sleep(DEFAULT_SPIN_BEFORE_SLEEP),
        ),
    ];
    for (mode, config) in modes {
        let (a, b) = in_process_channel_pair(RING, config).expect("channel pair");
        let name = if mode == "polling" {
            "vmlink/channel_polling_call"
        } else {
            "vmlink/channel_blocking_call"
        };
        vmlink_channel(&mut g, name, a, b, true);
        service(&mut g, mode, config, Service::Heartbeat);
        service(&mut g, mode, config, Service::Kvp);
    }
    codec(&mut g);
    g.finish();
}

/// Round trips of `service` with the agent serving on a scoped peer thread.
fn service(g: &mut Group<'_>, mode: &str, config: Config, service: Service) {
    let agent = Agent::new(AgentConfig {
        log: Arc::new(|line| panic!("the agent refused a benchmark request: {line}")),
        ..AgentConfig::default()
    })
    .expect("agent");
    let (host_end, agent_end) = in_process_channel_pair(RING, config).expect("channel pair");
    std::thread::scope(|s| {
        let served = s.spawn(|| agent.serve(&agent_end, service));
        {
            let mut host = Host::negotiate(&host_end, service, TIMEOUT).expect("negotiate");
            match service {
                Service::Heartbeat => {
                    let mut seq = 0u64;
                    g.bench_function(format!("vmlink_ic/heartbeat_{mode}"), |b| {
                        b.iter(|| {
                            host.heartbeat(seq).expect("answered with seq + 1");
                            seq += 1;
                        });
                    });
                }
                _ => {
                    host.kvp_set(KvpPool::External, "bench-key", "a 16-byte value")
                        .expect("set");
                    g.bench_function(format!("vmlink_ic/kvp_get_{mode}"), |b| {
                        b.iter(|| {
                            let v = host.kvp_get(KvpPool::External, "bench-key").expect("get");
                            assert_eq!(v.as_deref(), Some("a 16-byte value"));
                        });
                    });
                }
            }
        }
        drop(host_end);
        served.join().expect("agent thread").expect("served");
    });
}

/// The codec alone: what the agent does to a heartbeat, without the channel.
fn codec(g: &mut Group<'_>) {
    let header = Header::request(
        MessageType::Heartbeat,
        Version::new(3, 0),
        Version::new(3, 0),
        1,
    );
    let mut request = [0u8; 72];
    let len = heartbeat::encode(&mut request, &header, 41).expect("encode");
    let mut answer = [0u8; 72];
    g.bench_function("codec/heartbeat_parse_answer", |b| {
        b.iter(|| {
            let m = Message::parse(std::hint::black_box(&request[..len])).expect("parse");
            let n = heartbeat::answer(&m, &mut answer).expect("answer");
            assert_eq!(answer[28], 42, "{n} bytes answered");
        });
    });
}
