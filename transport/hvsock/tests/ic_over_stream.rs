//! The integration services over the stream link: vmlink-ic's agent and host library run
//! unchanged over an endpoint whose link is a Unix socketpair, as they run over shared
//! memory — negotiation, 1,000 heartbeats, and KVP round trips, each service on its own
//! connection as on Hyper-V.
#![cfg(target_os = "linux")]

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use vmlink_channel::Config;
use vmlink_hvsock::link::{StreamConfig, StreamEndpoint, stream_endpoint};
use vmlink_ic::Service;
use vmlink_ic::agent::{Agent, AgentConfig};
use vmlink_ic::host::Host;
use vmlink_ic::kvp::KvpPool;

const TIMEOUT: Duration = Duration::from_secs(10);

fn pair() -> (StreamEndpoint, StreamEndpoint) {
    let (a, b) = UnixStream::pair().unwrap();
    let link = StreamConfig::default();
    (
        stream_endpoint(a, link, Config::default()).unwrap(),
        stream_endpoint(b, link, Config::default()).unwrap(),
    )
}

#[test]
fn heartbeat_and_kvp_over_a_socket() {
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let agent = Arc::new(
        Agent::new(AgentConfig {
            log: {
                let log = log.clone();
                Arc::new(move |line| log.lock().unwrap().push(line.to_owned()))
            },
            ..AgentConfig::default()
        })
        .unwrap(),
    );
    let mut served = Vec::new();
    let mut hosts = Vec::new();
    for service in [Service::Heartbeat, Service::Kvp] {
        let (host, guest) = pair();
        let agent = agent.clone();
        served.push(thread::spawn(move || agent.serve(&guest, service)));
        hosts.push((service, host));
    }
    for (service, ep) in &hosts {
        let mut host = Host::negotiate(ep, *service, TIMEOUT).expect("negotiate");
        match service {
            Service::Heartbeat => {
                for seq in 0..1000 {
                    host.heartbeat(seq).expect("seq + 1");
                }
            }
            _ => {
                for pool in [KvpPool::External, KvpPool::Guest] {
                    host.kvp_set(pool, "over", "a socket").expect("set");
                    assert_eq!(
                        host.kvp_get(pool, "over").expect("get").as_deref(),
                        Some("a socket")
                    );
                }
                assert_eq!(host.kvp_get(KvpPool::External, "missing").unwrap(), None);
            }
        }
    }
    drop(hosts);
    for s in served {
        s.join()
            .unwrap()
            .expect("the agent served until the host left");
    }
    let log = log.lock().unwrap();
    let refused: Vec<_> = log.iter().filter(|l| l.contains("refused")).collect();
    assert_eq!(refused.len(), 1, "only the missing key: {log:?}");
    assert!(refused[0].contains("\"missing\""), "{log:?}");
}
