//! The real-KVM test: a bare-metal guest built from this repository (`../guest`) runs the
//! no_std ring and channel code at CPL3 on its own scattered ring pages, and exchanges
//! traffic both ways with a host channel built by this crate. The VM setup and the host's
//! side live in `vmlink_kvm::test_vm` (shared with the `kvm_demo` example).
//!
//! After the traffic the same guest, resumed, answers the heartbeat integration service
//! with vmlink-ic's no_std codec, and the host drives it with `vmlink_ic::host::Host`:
//! a negotiation, a thousand heartbeats, hostile messages refused with `HV_E_FAIL`.
//!
//! Prints `SKIPPED: <reason>` where `/dev/kvm` is unusable, unless `VMLINK_REQUIRE_KVM=1`,
//! which turns that into a failure.

use std::time::{Duration, Instant};

use vmlink_channel::{PacketType, Wait};
use vmlink_ic::host::Host;
use vmlink_ic::link::IcLink;
use vmlink_ic::negotiate::Negotiated;
use vmlink_ic::status::HV_E_FAIL;
use vmlink_ic::wire::{IC_HEADER_LEN, ICMSG_HDR};
use vmlink_ic::{Header, IcError, IcFlags, Message, MessageType, Service, Version, heartbeat};
use vmlink_kvm::test_vm::{
    TestVm, build_guest, kvm_or_skip, run_heartbeat_phase, run_traffic, watchdog,
};

/// Heartbeats timed in the heartbeat phase.
const HEARTBEATS: u64 = 1000;
/// How long the host waits for each answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Transaction ids of the host's raw messages (the `Host`'s own count up from 1).
const RAW_TID: u64 = 1 << 40;

#[test]
fn guest_and_host_exchange_traffic() {
    let Some((kvm, vm)) = kvm_or_skip() else {
        return;
    };
    let dog = watchdog(Duration::from_secs(120));
    let t_build = Instant::now();
    let elf = std::fs::read(build_guest()).expect("the guest ELF");
    let build_time = t_build.elapsed();
    let mut tvm = TestVm::new(kvm, vm, &elf, 0);
    let run = run_traffic(&mut tvm);
    let (stats, exits, elapsed) = (run.stats, run.exits, run.elapsed);
    let _ = dog.send(());

    // Guest summary: [kind, sent, requests, completions ok, host packets ok, end seen,
    // errors, first error, doorbells rung, packets sent, packets received, gpa sent].
    assert_eq!(stats.traffic_problem(), None);
    let g = &stats.summary;
    assert_eq!(g[11], 1, "the guest sent the GPA-direct packet");

    let packets = g[9] + g[10]; // guest's sent + received (completions included)
    println!(
        "kvm guest: {packets} packets ({} guest->host incl. {} requests + 1 GPA-direct, {} host->guest incl. {} completions) in {elapsed:?} (guest build {build_time:?})",
        g[9], g[2], g[10], stats.requests_completed
    );
    println!(
        "doorbells: guest->host MMIO {} ({:.5}/packet), host eventfd wakes {}, host->guest irqfd {} (guest polls, interrupts masked)",
        g[8],
        g[8] as f64 / packets as f64,
        stats.eventfd_wakes,
        stats.irqfd_signals,
    );
    println!(
        "exits to userspace: {exits} ({:.6}/packet)",
        exits as f64 / packets as f64
    );
    assert!(
        elapsed < Duration::from_secs(30),
        "took {elapsed:?}: guest code fell into CPL0 emulation?"
    );
    let _ = stats.rx_signals;

    // The heartbeat phase: the guest, resumed after its DONE, answers on the same channel.
    let dog = watchdog(Duration::from_secs(60));
    let phase = run_heartbeat_phase(&mut tvm, |channel| heartbeat_host(channel));
    let _ = dog.send(());
    let mut rtt = phase.host;
    assert_eq!(rtt.len() as u64, HEARTBEATS);
    // Answered: the negotiation, the timed heartbeats, one heartbeat after each hostile
    // message the guest got once negotiated. Refused: the four hostile messages.
    assert_eq!(
        (phase.answered, phase.refused),
        (1 + HEARTBEATS + 3, 4),
        "the guest's heartbeat counts (answered, refused)"
    );
    rtt.sort();
    let ns = |d: Duration| d.as_nanos();
    let mean = rtt.iter().sum::<Duration>() / rtt.len() as u32;
    // The guest polls; the host spins before it sleeps on the ioeventfd, unless
    // VMLINK_SPIN=off (the test suite's setting), where each answer costs a wake-up.
    let host_waits = if std::env::var_os("VMLINK_SPIN").is_some_and(|v| v == "off") {
        "sleeps on the ioeventfd"
    } else {
        "spins, then sleeps"
    };
    println!(
        "ic heartbeat: negotiated framework 3.0, message 3.0; {HEARTBEATS} heartbeats each answered seq+1, round trip median {} ns, mean {} ns (min {} ns, p99 {} ns; host {host_waits}); 4 hostile messages refused with HV_E_FAIL, each followed by a valid heartbeat",
        ns(rtt[rtt.len() / 2]),
        ns(mean),
        ns(rtt[0]),
        ns(rtt[rtt.len() * 99 / 100]),
    );
    println!(
        "ic phase: {:?}, exits to userspace {}",
        phase.elapsed, phase.exits
    );
}

/// The host's side of the heartbeat phase: hostile messages around a negotiation and
/// [`HEARTBEATS`] timed heartbeats; returns the heartbeats' round trips.
fn heartbeat_host<L: IcLink>(link: &L) -> Vec<Duration> {
    let v3 = Version::new(3, 0);
    let request = |t, tid| Header::request(t, v3, v3, tid);
    let mut msg = [0u8; 600];

    // A heartbeat before the negotiation.
    let len = heartbeat::encode(&mut msg, &request(MessageType::Heartbeat, 1), 5).unwrap();
    refused(link, RAW_TID, &msg[..len], &msg[ICMSG_HDR..len]);

    let mut host = Host::negotiate(link, Service::Heartbeat, ANSWER_TIMEOUT).expect("negotiate");
    assert_eq!(
        host.version(),
        Negotiated {
            framework: v3,
            message: v3
        }
    );
    let mut rtt = Vec::with_capacity(HEARTBEATS as usize);
    for i in 0..HEARTBEATS {
        let seq = 0x5eed_0000_0000 + i * 7919;
        let t = Instant::now();
        host.heartbeat(seq).expect("heartbeat answered seq+1");
        rtt.push(t.elapsed());
    }

    // A heartbeat whose icmsgsize lies: 400 bytes, past the pipe's size. The guest echoes
    // what is there: the body and the packet's padding to 8 bytes.
    let len = heartbeat::encode(&mut msg, &request(MessageType::Heartbeat, 2), 6).unwrap();
    let size_at = ICMSG_HDR - IC_HEADER_LEN + 10;
    msg[size_at..size_at + 2].copy_from_slice(&400u16.to_le_bytes());
    assert!(matches!(
        Message::parse(&msg[..len]),
        Err(IcError::IcSizePastPipe { icmsgsize: 400, .. })
    ));
    refused(
        link,
        RAW_TID + 1,
        &msg[..len],
        &msg[ICMSG_HDR..len.next_multiple_of(8)],
    );
    host.heartbeat(u64::MAX)
        .expect("a heartbeat after the lying one");

    // Another service's message on the heartbeat channel.
    let len = vmlink_ic::encode(&mut msg, &request(MessageType::Vss, 3), &[7; 12]).unwrap();
    refused(link, RAW_TID + 2, &msg[..len], &[7; 12]);
    host.heartbeat(1)
        .expect("a heartbeat after the VSS message");

    // A heartbeat in a packet longer than the guest's buffer: consumed, refused.
    msg[..].fill(0);
    let len = heartbeat::encode(&mut msg, &request(MessageType::Heartbeat, 4), 8).unwrap();
    let body = msg[ICMSG_HDR..len].to_vec();
    refused(link, RAW_TID + 3, &msg, &body);
    host.heartbeat(2)
        .expect("a heartbeat after the long packet");
    rtt
}

/// Sends `message` raw with `tid` and checks the guest's answer: status `HV_E_FAIL`, a
/// heartbeat-channel response to the same transaction with `body` echoed.
fn refused<L: IcLink>(link: &L, tid: u64, message: &[u8], body: &[u8]) {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    link.send_message(tid, message, Wait::Until(deadline))
        .expect("send the raw message");
    let mut buf = [0u8; 1024];
    let got = link
        .recv_message(&mut buf, Wait::Until(deadline))
        .expect("the guest's answer");
    assert_eq!(
        (got.packet_type, got.transaction_id, got.whole()),
        (PacketType::InBand, tid, true)
    );
    let answer = Message::parse(&buf[..got.copied]).expect("the refusal parses");
    let sent = &message[8..ICMSG_HDR];
    assert_eq!(answer.header.status, HV_E_FAIL);
    assert_eq!(
        answer.header.flags,
        IcFlags::TRANSACTION | IcFlags::RESPONSE
    );
    assert_eq!(
        answer.header.transaction_id, sent[16],
        "the message's own id"
    );
    assert_eq!(
        answer.header.message_type as u16,
        u16::from_le_bytes([sent[4], sent[5]])
    );
    assert_eq!(answer.body, body, "the body echoed");
}
