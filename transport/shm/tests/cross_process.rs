//! Host and guest in two processes: the guest is this test binary run again (test
//! `child_role`, its role in `VMLINK_SHM_TEST_ROLE`), spawned by `Service::spawn` so it
//! inherits its end of a socket pair. Covers the conformance suite with side B in the
//! child, requests / completions / streams / GPA-direct bulk data with every byte checked,
//! a guest killed by SIGKILL mid-stream, and a guest that tries to truncate the memory.

mod common;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{ChildProcess, check, child_command, len_of, payload, role, soon, watchdog};
use vmlink_channel::conformance::{Check, End, PairFactory, Side, Started, run_all, run_side};
use vmlink_channel::packet::{GpaRange, parse_gpa_header};
use vmlink_channel::{ChannelError, EventFdDoorbell, PacketMeta, PacketType, RingRx, RingTx};
use vmlink_ring::{ControlWord, RingMem};
use vmlink_shm::{Endpoint, Guest, Layout, Service, ShmRing};

const CHILD_TEST: &str = "child_role";
/// Seeds of the two stream directions.
const HOST_SEED: u64 = 0x1234_5678;
const GUEST_SEED: u64 = 0x8765_4321;

fn layout() -> Layout {
    Layout::symmetric(16 * 4096, 64 * 4096)
}

/// Spawns the child in `role` as the guest of a service with `layout`.
fn spawn(role: &str, service: Service) -> (Endpoint, ChildProcess) {
    let mut cmd: Command = child_command(CHILD_TEST, role);
    let (host, child) = service.spawn(&mut cmd).expect("spawn the guest");
    (host, ChildProcess::new(child))
}

/// The child's side: runs only when spawned with a role.
#[test]
fn child_role() {
    let Some(role) = role() else { return };
    // Never outlive a parent that died without killing us.
    let _w = watchdog("child", Duration::from_secs(60));
    match role.split_once(':') {
        Some(("conformance", name)) => conformance_b(name),
        _ => match role.as_str() {
            "echo" => echo_guest(),
            "stream_forever" => stream_forever(),
            "send_then_sleep" => send_then_sleep(),
            "truncate" => truncate_guest(),
            other => panic!("unknown role {other}"),
        },
    }
}

// ---- conformance, side B in the child ----------------------------------------------------

struct Processes;

impl PairFactory for Processes {
    type Tx = RingTx<ShmRing>;
    type Rx = RingRx<ShmRing>;
    type Bell = EventFdDoorbell;

    fn start(&self, check: Check) -> Started<Self::Tx, Self::Rx, EventFdDoorbell> {
        let (config_a, _) = check.configs();
        let service = Service::new("conformance")
            .with_layout(Layout::symmetric(check.ring_data_len() as u64, 64 * 4096))
            .with_config(config_a);
        let (host, mut child) = spawn(&format!("conformance:{}", check.name()), service);
        let (channel, memory) = host.into_parts();
        let h2g = memory.host_to_guest();
        Started {
            a: End::ring(
                channel,
                Box::new(move || h2g.store_control(ControlWord::WriteIndex, 13)),
            ),
            peer: Box::new(move || child.expect_success(Duration::from_secs(30))),
        }
    }
}

fn conformance_b(name: &str) {
    let check = Check::from_name(name).expect("a known check");
    let (_, config_b) = check.configs();
    let guest = Guest::new("conformance")
        .with_config(config_b)
        .from_env()
        .expect("guest handshake");
    let (channel, memory) = guest.into_parts();
    let g2h = memory.guest_to_host();
    let end = End::ring(
        channel,
        Box::new(move || g2h.store_control(ControlWord::WriteIndex, 13)),
    );
    run_side(check, Side::B, end);
}

#[test]
fn conformance_with_the_guest_in_another_process() {
    if role().is_some() {
        return;
    }
    let _w = watchdog("conformance", Duration::from_secs(120));
    run_all(&Processes);
}

// ---- requests, completions, streams and bulk data ---------------------------------------

const CALLS: u64 = 2000;
const STREAM: u64 = 20_000;
const BULK_PAGES: u64 = 8;

fn echo_guest() {
    let g = Guest::new("echo").from_env().expect("guest handshake");
    let ch = g.channel();
    let mut buf = vec![0u8; 8192];
    // Requests: answer each with its bytes plus one.
    for n in 0..CALLS {
        let r = ch.recv(&mut buf, soon(20)).expect("request");
        assert!(r.completion_requested);
        check(HOST_SEED, n, r.payload(&buf));
        let reply: Vec<u8> = r.payload(&buf)[..len_of(HOST_SEED, n)]
            .iter()
            .map(|b| b.wrapping_add(1))
            .collect();
        ch.complete(r.transaction_id, &reply, soon(20))
            .expect("complete");
    }
    // Streams both ways at once.
    thread::scope(|s| {
        s.spawn(|| {
            for n in 0..STREAM {
                ch.send(&payload(GUEST_SEED, n, len_of(GUEST_SEED, n)), soon(20))
                    .expect("guest sends");
            }
        });
        let mut buf = vec![0u8; 8192];
        for n in 0..STREAM {
            let r = ch.recv(&mut buf, soon(20)).expect("guest receives");
            check(HOST_SEED, n, r.payload(&buf));
        }
    });
    // Bulk data: the host's pages in, ours out.
    let buffer = g.buffer();
    let r = ch.recv(&mut buf, soon(20)).expect("gpa packet");
    assert_eq!(r.packet_type, PacketType::GpaDirect);
    let limit = ch.config().gpa_page_limit;
    let ranges: Vec<_> = parse_gpa_header(r.header(&buf), limit)
        .expect("ranges")
        .collect();
    assert_eq!(ranges.len(), 1);
    let range = ranges[0];
    let pages: Vec<u64> = range.pages().collect();
    assert!(pages.iter().all(|p| buffer.host_pages().contains(p)));
    let mut data = vec![0u8; range.byte_count as usize];
    let start = buffer.page_offset(pages[0]).unwrap() + range.byte_offset as usize;
    buffer.read(start, &mut data).expect("read bulk");
    assert!(data == payload(HOST_SEED, 99, data.len()), "bulk bytes");
    let back = buffer.page_offset(buffer.guest_pages().start).unwrap();
    let answer: Vec<u8> = data.iter().map(|b| !b).collect();
    buffer.write(back, &answer).expect("write bulk");
    ch.send(&(data.len() as u64).to_le_bytes(), soon(20))
        .expect("bulk done");
    // Wait for the host to finish.
    assert_eq!(ch.recv(&mut buf, soon(20)), Err(ChannelError::Closed));
}

#[test]
fn requests_streams_and_bulk_data_cross_process() {
    if role().is_some() {
        return;
    }
    let _w = watchdog("echo", Duration::from_secs(60));
    let service = Service::new("echo").with_layout(layout());
    let (host, mut child) = spawn("echo", service);
    let ch = host.channel();
    let mut reply = vec![0u8; 8192];
    for n in 0..CALLS {
        let len = len_of(HOST_SEED, n);
        let got = ch
            .call(&payload(HOST_SEED, n, len), &mut reply, soon(20))
            .expect("call");
        assert_eq!(got, len.div_ceil(8) * 8);
        let want: Vec<u8> = payload(HOST_SEED, n, len)
            .iter()
            .map(|b| b.wrapping_add(1))
            .collect();
        assert!(reply[..len] == want[..], "reply {n}");
    }
    thread::scope(|s| {
        s.spawn(|| {
            for n in 0..STREAM {
                ch.send(&payload(HOST_SEED, n, len_of(HOST_SEED, n)), soon(20))
                    .expect("host sends");
            }
        });
        let mut buf = vec![0u8; 8192];
        for n in 0..STREAM {
            let r = ch.recv(&mut buf, soon(20)).expect("host receives");
            check(GUEST_SEED, n, r.payload(&buf));
        }
    });
    // Bulk: BULK_PAGES pages from the host's half, starting 100 bytes into the first.
    let buffer = host.buffer();
    let len = (BULK_PAGES as usize - 1) * 4096;
    let data = payload(HOST_SEED, 99, len);
    let first = buffer.host_pages().start + 1;
    buffer
        .write(buffer.page_offset(first).unwrap() + 100, &data)
        .unwrap();
    let pages: Vec<u64> = (first..first + BULK_PAGES).collect();
    let ranges = [GpaRange {
        byte_offset: 100,
        byte_count: len as u32,
        pages: &pages,
    }];
    let meta = PacketMeta {
        packet_type: PacketType::GpaDirect,
        flags: 0,
        transaction_id: 0,
    };
    ch.send_gpa_direct(&ranges, b"bulk", meta, soon(20))
        .expect("gpa send");
    let r = ch.recv(&mut reply, soon(20)).expect("bulk done");
    assert_eq!(r.packet_type, PacketType::InBand);
    assert_eq!(r.payload(&reply)[..8], (len as u64).to_le_bytes());
    let mut back = vec![0u8; len];
    buffer
        .read(
            buffer.page_offset(buffer.guest_pages().start).unwrap(),
            &mut back,
        )
        .unwrap();
    assert!(
        back.iter().zip(&data).all(|(b, d)| *b == !d),
        "the guest's bulk answer"
    );
    // A page number past the buffer area is refused before it is sent.
    let outside = [buffer.pages()];
    let bad = [GpaRange {
        byte_offset: 0,
        byte_count: 8,
        pages: &outside,
    }];
    assert!(matches!(
        ch.send_gpa_direct(&bad, b"", meta, soon(1)),
        Err(ChannelError::InvalidPacket(_))
    ));
    drop(host);
    child.expect_success(Duration::from_secs(20));
}

// ---- a guest killed mid-stream -----------------------------------------------------------

fn stream_forever() {
    let g = Guest::new("stream").from_env().expect("guest handshake");
    let mut n = 0u64;
    loop {
        g.channel()
            .send(&payload(GUEST_SEED, n, len_of(GUEST_SEED, n)), soon(50))
            .expect("send");
        n += 1;
    }
}

#[test]
fn guest_killed_mid_stream_everything_committed_arrives() {
    if role().is_some() {
        return;
    }
    let _w = watchdog("sigkill mid-stream", Duration::from_secs(30));
    let (host, mut child) = spawn(
        "stream_forever",
        Service::new("stream").with_layout(layout()),
    );
    let ch = host.channel();
    let mut buf = vec![0u8; 8192];
    let mut n = 0u64;
    while n < 3000 {
        let r = ch.recv(&mut buf, soon(20)).expect("receive");
        check(GUEST_SEED, n, r.payload(&buf));
        n += 1;
    }
    // Let the ring fill, so the guest dies with packets committed and unread.
    thread::sleep(Duration::from_millis(50));
    child.child.kill().expect("SIGKILL");
    let killed = Instant::now();
    let end = loop {
        match ch.recv(&mut buf, soon(20)) {
            Ok(r) => {
                check(GUEST_SEED, n, r.payload(&buf));
                n += 1;
            }
            Err(e) => break e,
        }
    };
    assert_eq!(end, ChannelError::Closed);
    assert!(
        killed.elapsed() < Duration::from_secs(1),
        "{:?}",
        killed.elapsed()
    );
    assert!(n > 3000, "the packets left in the ring were received ({n})");
    let status = child.wait(Duration::from_secs(5));
    assert!(!status.success());
}

fn send_then_sleep() {
    let g = Guest::new("stream").from_env().expect("guest handshake");
    for n in 0..100 {
        g.channel()
            .send(&payload(GUEST_SEED, n, len_of(GUEST_SEED, n)), soon(20))
            .expect("send");
    }
    thread::sleep(Duration::from_secs(30));
}

#[test]
fn guest_killed_while_the_host_is_blocked_in_receive() {
    if role().is_some() {
        return;
    }
    let _w = watchdog("sigkill blocked", Duration::from_secs(30));
    let (host, mut child) = spawn(
        "send_then_sleep",
        Service::new("stream").with_layout(layout()),
    );
    let ch = host.channel();
    let mut buf = vec![0u8; 8192];
    for n in 0..100 {
        let r = ch.recv(&mut buf, soon(20)).expect("receive");
        check(GUEST_SEED, n, r.payload(&buf));
    }
    let pid = child.child.id() as i32;
    let killer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        // The child is ours and not yet reaped, so the pid is still its.
        let pid = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill");
        Instant::now()
    });
    let r = ch.recv(&mut buf, soon(20));
    let returned = Instant::now();
    let killed = killer.join().unwrap();
    assert_eq!(r.map(|r| r.len()), Err(ChannelError::Closed));
    assert!(returned.duration_since(killed) < Duration::from_secs(1));
    child.wait(Duration::from_secs(5));
}

// ---- a guest that tries to truncate the memory -------------------------------------------

fn truncate_guest() {
    let g = Guest::new("trunc").from_env().expect("guest handshake");
    use nix::errno::Errno;
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    let fd = g.memory().mapping().memfd();
    let len = g.memory().layout().total_len() as i64;
    for size in [0, len / 2, len + 4096] {
        let r = nix::unistd::ftruncate(fd, size);
        assert_eq!(r, Err(Errno::EPERM), "ftruncate to {size}");
    }
    let r = fcntl(fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE));
    assert!(r.is_err(), "F_SEAL_SEAL forbids more seals");
    g.channel().send(b"tried", soon(20)).expect("report");
    let mut buf = [0u8; 64];
    let r = g
        .channel()
        .recv(&mut buf, soon(20))
        .expect("host still there");
    assert_eq!(&r.payload(&buf)[..4], b"good");
}

#[test]
fn a_guest_cannot_truncate_the_memory() {
    if role().is_some() {
        return;
    }
    let _w = watchdog("truncate", Duration::from_secs(30));
    let (host, mut child) = spawn("truncate", Service::new("trunc").with_layout(layout()));
    let mut buf = [0u8; 64];
    let r = host.channel().recv(&mut buf, soon(20)).expect("report");
    assert_eq!(&r.payload(&buf)[..5], b"tried");
    // The whole mapping is still there and readable.
    let mut all = vec![0u8; host.buffer().len()];
    host.buffer().read(0, &mut all).unwrap();
    host.channel().send(b"good", soon(20)).expect("send");
    child.expect_success(Duration::from_secs(20));
}
