//! The agent and the host library against each other over an in-process channel pair: every
//! service, and the requests a hostile host may send.

use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use vmlink_channel::{Config, InProcessChannel, in_process_channel_pair};

use super::clock::SkewedClock;
use super::*;
use crate::host::{Host, HostError};
use crate::shutdown::ShutdownFlags;
use crate::{Header, Version};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Log lines, kept for the test to look at.
fn recording_log() -> (Log, Arc<StdMutex<Vec<String>>>) {
    let lines = Arc::new(StdMutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    let log: Log = Arc::new(move |l: &str| sink.lock().expect("log").push(l.to_owned()));
    (log, lines)
}

/// Runs `service` of `agent` on one end of a fresh pair and `host` on the other; returns
/// what the agent served once the host is done (and has dropped its end).
fn run<R>(
    agent: &Agent,
    service: Service,
    host: impl FnOnce(&InProcessChannel) -> R + Send,
) -> (Served, R)
where
    R: Send,
{
    let (a, b) = in_process_channel_pair(64 * 1024, Config::default()).expect("pair");
    std::thread::scope(|s| {
        let served = s.spawn(|| agent.serve(&b, service));
        let r = host(&a);
        drop(a);
        (served.join().expect("agent thread").expect("served"), r)
    })
}

#[test]
fn heartbeats_are_answered_with_the_next_number() {
    let agent = Agent::new(AgentConfig::default()).expect("agent");
    let (served, ()) = run(&agent, Service::Heartbeat, |ch| {
        let mut host = Host::negotiate(ch, Service::Heartbeat, TIMEOUT).expect("negotiate");
        assert_eq!(host.version().framework, Version::new(3, 0));
        assert_eq!(host.version().message, Version::new(3, 0));
        for seq in 0..1000 {
            host.heartbeat(seq * 7).expect("heartbeat");
        }
    });
    assert_eq!(served.answered, 1001);
    assert_eq!(served.refused, 0);
}

/// What an answer's headers say, read from their fixed offsets (an answer to garbage need
/// not parse as a message).
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u32,
    transaction_id: u8,
    flags: IcFlags,
}

/// Sends `payload` with `tid` and returns the answer's headers (None: no answer in 200 ms).
fn raw_exchange(ch: &InProcessChannel, tid: u64, payload: &[u8]) -> Option<Answer> {
    ch.send_message(tid, payload, Wait::Forever).expect("send");
    let mut buf = vec![0u8; MAX_MESSAGE];
    let got = ch
        .recv_message(
            &mut buf,
            Wait::Until(std::time::Instant::now() + Duration::from_millis(200)),
        )
        .ok()?;
    assert_eq!(got.transaction_id, tid, "answers carry the request's id");
    assert!(got.copied >= 28, "an answer has both headers");
    Some(Answer {
        status: u32::from_le_bytes(buf[20..24].try_into().expect("4 bytes")),
        transaction_id: buf[24],
        flags: IcFlags(buf[25]),
    })
}

#[test]
fn hostile_requests_are_refused_and_the_service_goes_on() {
    let (log, lines) = recording_log();
    let agent = Agent::new(AgentConfig {
        log,
        ..AgentConfig::default()
    })
    .expect("agent");
    let (served, ()) = run(&agent, Service::Heartbeat, |ch| {
        let mut out = [0u8; 4096];
        let hb = |tid| {
            Header::request(
                MessageType::Heartbeat,
                Version::new(3, 0),
                Version::new(3, 0),
                tid,
            )
        };
        // A heartbeat before the negotiation.
        let n = heartbeat::encode(&mut out, &hb(1), 5).expect("encode");
        let h = raw_exchange(ch, 1, &out[..n]).expect("an answer");
        assert_eq!(h.status, HV_E_FAIL);
        assert!(h.flags.contains(IcFlags::RESPONSE));
        // Negotiate properly.
        let n = negotiate::encode_request(
            &mut out,
            2,
            Service::Heartbeat.framework_versions(),
            Service::Heartbeat.message_versions(),
        )
        .expect("encode");
        assert_eq!(
            raw_exchange(ch, 2, &out[..n]).expect("answer").status,
            HV_S_OK
        );
        // Another service's message on this channel.
        let sd = Header::request(
            MessageType::Shutdown,
            Version::new(3, 0),
            Version::new(3, 0),
            3,
        );
        let n = crate::shutdown::encode(
            &mut out,
            &sd,
            ShutdownFlags::try_from(0).expect("flags"),
            0,
            0,
            "",
        )
        .expect("encode");
        assert_eq!(
            raw_exchange(ch, 3, &out[..n]).expect("answer").status,
            HV_E_FAIL
        );
        // Sizes that lie: icmsgsize past the pipe's size. The headers are echoed.
        let n = heartbeat::encode(&mut out, &hb(4), 9).expect("encode");
        out[18..20].copy_from_slice(&500u16.to_le_bytes());
        let h = raw_exchange(ch, 4, &out[..n]).expect("answer");
        assert_eq!((h.status, h.transaction_id), (HV_E_FAIL, 4));
        // Too short for any header: no answer, nothing changes.
        assert_eq!(raw_exchange(ch, 5, &[1, 2, 3]), None);
        // An unknown message type.
        let n = heartbeat::encode(&mut out, &hb(6), 9).expect("encode");
        out[12..14].copy_from_slice(&99u16.to_le_bytes());
        assert_eq!(
            raw_exchange(ch, 6, &out[..n]).expect("answer").status,
            HV_E_FAIL
        );
        // Maximum-size garbage.
        assert_eq!(
            raw_exchange(ch, 7, &[0xff; 60_000])
                .expect("headers echoed")
                .status,
            HV_E_FAIL
        );
        // The service still answers.
        let n = heartbeat::encode(&mut out, &hb(8), 41).expect("encode");
        assert_eq!(
            raw_exchange(ch, 8, &out[..n]).expect("answer").status,
            HV_S_OK
        );
    });
    assert_eq!(served.answered, 2);
    assert_eq!(served.refused, 6);
    assert!(
        lines.lock().expect("log").len() >= 6,
        "each refusal is logged"
    );
}

#[test]
fn shutdown_is_refused_without_a_command_and_runs_one_when_configured() {
    let (log, lines) = recording_log();
    let agent = Agent::new(AgentConfig {
        log,
        ..AgentConfig::default()
    })
    .expect("agent");
    let flags = ShutdownFlags::try_from(3).expect("reboot, forced");
    let (_, r) = run(&agent, Service::Shutdown, |ch| {
        let mut host = Host::negotiate(ch, Service::Shutdown, TIMEOUT).expect("negotiate");
        assert_eq!(host.version().message, Version::new(3, 2));
        host.shutdown(flags, 7, 30, "maintenance")
    });
    assert!(matches!(r, Err(HostError::Refused { status: HV_E_FAIL })));
    assert!(
        lines
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains("no shutdown command"))
    );

    let dir = std::env::temp_dir().join(format!("vmlink-ic-shutdown-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let marker = dir.join("ran");
    let script = format!(
        "echo \"$VMLINK_SHUTDOWN_ACTION $VMLINK_SHUTDOWN_FORCE $VMLINK_SHUTDOWN_REASON $VMLINK_SHUTDOWN_MESSAGE\" > {}",
        marker.display()
    );
    let agent = Agent::new(AgentConfig {
        shutdown_command: Some(vec!["sh".into(), "-c".into(), script.into()]),
        ..AgentConfig::default()
    })
    .expect("agent");
    let (_, r) = run(&agent, Service::Shutdown, |ch| {
        Host::negotiate(ch, Service::Shutdown, TIMEOUT)?.shutdown(flags, 7, 30, "maintenance")
    });
    r.expect("accepted");
    assert_eq!(
        std::fs::read_to_string(&marker).expect("the command ran"),
        "reboot 1 7 maintenance\n"
    );
    std::fs::remove_dir_all(dir).expect("clean up");
}

#[test]
fn a_shutdown_command_that_cannot_start_is_refused() {
    let (log, lines) = recording_log();
    let agent = Agent::new(AgentConfig {
        log,
        shutdown_command: Some(vec!["/nonexistent/vmlink-shutdown".into()]),
        ..AgentConfig::default()
    })
    .expect("agent");
    let flags = ShutdownFlags::try_from(0).expect("power off");
    let (_, r) = run(&agent, Service::Shutdown, |ch| {
        Host::negotiate(ch, Service::Shutdown, TIMEOUT)?.shutdown(flags, 1, 30, "")
    });
    assert!(matches!(r, Err(HostError::Refused { status: HV_E_FAIL })));
    assert!(
        lines
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains("the shutdown command did not start")),
        "{:?}",
        lines.lock().expect("log")
    );
}

#[test]
fn time_sync_measures_a_skewed_clock_within_a_millisecond() {
    let skew_ms = 250i64;
    let agent = Agent::new(AgentConfig {
        clock: Arc::new(SkewedClock::new(skew_ms * 10_000)),
        ..AgentConfig::default()
    })
    .expect("agent");
    let (_, ()) = run(&agent, Service::TimeSync, |ch| {
        let mut host = Host::negotiate(ch, Service::TimeSync, TIMEOUT).expect("negotiate");
        assert_eq!(host.version().message, Version::new(4, 0));
        for i in 0..10 {
            host.time(i == 0).expect("sample");
        }
    });
    let offset_ns = i128::from(agent.time_offset().expect("measured")) * 100;
    let error_ns = (offset_ns - i128::from(skew_ms) * 1_000_000).abs();
    assert!(
        error_ns < 1_000_000,
        "measured {offset_ns} ns for a {skew_ms} ms skew"
    );
    let published = agent
        .store()
        .get(KvpPool::Auto, TIME_OFFSET_KEY)
        .expect("published")
        .parse::<i128>()
        .expect("a number");
    assert_eq!(published, offset_ns);
}

#[test]
fn kvp_round_trips_in_every_pool_and_the_auto_pool_is_read_only() {
    let agent = Agent::new(AgentConfig::default()).expect("agent");
    let (_, ()) = run(&agent, Service::Kvp, |ch| {
        let mut host = Host::negotiate(ch, Service::Kvp, TIMEOUT).expect("negotiate");
        for pool in store::POOLS {
            if pool == KvpPool::Auto {
                continue;
            }
            let key = format!("key-{pool:?}");
            assert_eq!(host.kvp_get(pool, &key).expect("get"), None);
            host.kvp_set(pool, &key, "välue ✓").expect("set");
            host.kvp_set(pool, "second", "2").expect("set");
            assert_eq!(
                host.kvp_get(pool, &key).expect("get").as_deref(),
                Some("välue ✓")
            );
            let list = host.kvp_list(pool).expect("list");
            assert_eq!(
                list,
                [
                    (key.clone(), "välue ✓".to_owned()),
                    ("second".into(), "2".into())
                ]
            );
            assert!(host.kvp_delete(pool, &key).expect("delete"));
            assert!(!host.kvp_delete(pool, &key).expect("delete again"));
            assert_eq!(host.kvp_list(pool).expect("list").len(), 1);
        }
        let auto = host.kvp_list(KvpPool::Auto).expect("auto pool");
        assert_eq!(auto[0].0, "FullyQualifiedDomainName");
        assert!(auto.iter().any(|(k, v)| k == "OSName" && !v.is_empty()));
        assert!(matches!(
            host.kvp_set(KvpPool::Auto, "OSName", "mine"),
            Err(HostError::Refused { .. })
        ));
    });
}

fn temp_root(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vmlink-ic-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("root");
    std::fs::canonicalize(dir).expect("canonical")
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn file_copy_lands_cancels_and_cleans_up_after_a_vanished_host() {
    let root = temp_root("fcopy");
    let src = root.with_extension("src");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&src, &data).expect("source");
    let agent = Agent::new(AgentConfig {
        files_root: Some(root.clone()),
        ..AgentConfig::default()
    })
    .expect("agent");
    let dir = root.to_str().expect("utf-8").to_owned();
    let (_, ()) = run(&agent, Service::FileCopy, |ch| {
        let mut host = Host::negotiate(ch, Service::FileCopy, TIMEOUT).expect("negotiate");
        assert_eq!(host.version().message, Version::new(1, 1));
        let stats = host.copy_file(&src, &dir, "copy.bin", 0).expect("copy");
        assert_eq!(stats.bytes, data.len() as u64);
        // Again without the overwrite flag: refused at START.
        assert!(matches!(
            host.copy_file(&src, &dir, "copy.bin", 0),
            Err(HostError::Refused {
                status: crate::status::HV_ERROR_ALREADY_EXISTS
            })
        ));
        // A cancelled copy leaves nothing.
        host.copy_start("cancelled.bin", &dir, 0, 10)
            .expect("start");
        host.copy_write(0, b"12345").expect("write");
        host.copy_finish(false).expect("cancel");
        // Outside the root.
        assert!(matches!(
            host.copy_start("x", "/etc", crate::fcopy::CREATE_PATH, 1),
            Err(HostError::Refused { status: HV_E_FAIL })
        ));
        // A write past the size.
        host.copy_start("short.bin", &dir, 0, 4).expect("start");
        assert!(host.copy_write(0, b"too long").is_err());
        // The host vanishes mid-copy.
        host.copy_start("vanished.bin", &dir, 0, 10).expect("start");
        host.copy_write(0, b"12345").expect("write");
    });
    assert_eq!(std::fs::read(root.join("copy.bin")).expect("copied"), data);
    assert_eq!(entries(&root), ["copy.bin"]);
    std::fs::remove_dir_all(&root).expect("clean up");
    std::fs::remove_file(&src).expect("clean up");
}

#[test]
fn file_copy_without_a_root_is_refused() {
    let agent = Agent::new(AgentConfig::default()).expect("agent");
    let (_, r) = run(&agent, Service::FileCopy, |ch| {
        Host::negotiate(ch, Service::FileCopy, TIMEOUT)?.copy_start("a", "/tmp", 0, 1)
    });
    assert!(matches!(r, Err(HostError::Refused { status: HV_E_FAIL })));
}

#[test]
fn ip_info_answers_with_the_adapters_addresses() {
    let interfaces = netinfo::interfaces().expect("getifaddrs");
    let iface = interfaces
        .iter()
        .find(|i| i.mac.is_some() && !i.ipv4.is_empty())
        .expect("this machine has an interface with a MAC and an IPv4 address");
    let mac = iface.mac.clone().expect("a MAC").to_ascii_lowercase();
    let agent = Agent::new(AgentConfig::default()).expect("agent");
    let (_, (info, unknown)) = run(&agent, Service::Kvp, |ch| {
        let mut host = Host::negotiate(ch, Service::Kvp, TIMEOUT).expect("negotiate");
        (host.ip_info(&mac), host.ip_info("00:00:00:00:00:01"))
    });
    let [addresses, subnets, gateways, _dns] = info.expect("the adapter's addresses");
    assert_eq!(addresses, iface.addresses(true));
    assert_eq!(subnets, iface.subnets(true));
    let expected: Vec<String> = netinfo::ipv4_gateways(&iface.name)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(gateways, expected.join(";"));
    assert!(matches!(
        unknown,
        Err(HostError::Refused { status: HV_E_FAIL })
    ));
}

#[test]
fn time_sync_version_3_has_no_reference_and_is_answered() {
    let agent = Agent::new(AgentConfig {
        clock: Arc::new(SkewedClock::new(-30_000_000)),
        ..AgentConfig::default()
    })
    .expect("agent");
    let (_, ()) = run(&agent, Service::TimeSync, |ch| {
        let mut out = [0u8; 4096];
        let v3 = [Version::new(3, 0)];
        let n = negotiate::encode_request(&mut out, 1, Service::TimeSync.framework_versions(), &v3)
            .expect("encode");
        assert_eq!(
            raw_exchange(ch, 1, &out[..n]).expect("answer").status,
            HV_S_OK
        );
        let header = Header::request(
            MessageType::TimeSync,
            Version::new(3, 0),
            Version::new(3, 0),
            2,
        );
        let body = timesync::TimeSyncData::new(SystemClock.now(), 0, 0, timesync::FLAG_SAMPLE);
        let n = crate::encode_body(&mut out, &header, &body).expect("encode");
        assert_eq!(
            raw_exchange(ch, 2, &out[..n]).expect("answer").status,
            HV_S_OK
        );
    });
    // 3 s behind, measured without a transit: within a millisecond all the same.
    let offset = agent.time_offset().expect("measured");
    assert!((offset + 30_000_000).abs() < 10_000, "{offset}");
}
