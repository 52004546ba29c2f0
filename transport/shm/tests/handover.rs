//! Handing a live endpoint from one host process to the next while the guest streams both
//! ways and keeps 64 calls in flight: every packet arrives exactly once, every call is
//! answered exactly once, through 100 hand-overs and at each crash point (SIGKILL).
//!
//! The hosts are this test binary run again (test `child_role`, the role in
//! `VMLINK_SHM_TEST_ROLE`); the guest runs in the test process and checks everything:
//!
//! - its stream (in-band packets numbered 0, 1, 2, …) comes back as echoes in order, each
//!   exactly once;
//! - its calls (polled requests numbered by the guest) complete exactly once each;
//! - every packet any host sends carries the host endpoint's `packets_sent` counter before
//!   the send — a counter that travels in the saved state — so the guest sees 0, 1, 2, …
//!   with no gap and no repeat across every hand-over: nothing the hosts sent was lost or
//!   sent twice;
//! - the blackout, the largest gap between two consecutive arrivals at the guest while a
//!   hand-over is under way, is reported (p50 and p99) with the guest streaming 100,000
//!   packets per second.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{ChildProcess, child_command, role, socket_path, watchdog};
use vmlink_channel::{ChannelError, PacketType, Wait};
use vmlink_shm::{Endpoint, Guest, HandOverListener, Layout, Listener, Service, TakeOver};

const CHILD_TEST: &str = "child_role";
const SERVICE: &str = "handover-test";
/// What a host's packet is.
const ECHO: u64 = 1;
const ANSWER: u64 = 2;
/// Calls the guest keeps in flight.
const CALLS: usize = 64;
/// The guest's stream rate.
const PER_SECOND: u64 = 100_000;

fn service() -> Service {
    Service::new(SERVICE).with_layout(Layout::symmetric(64 * 4096, 0))
}

// ---- the hosts ---------------------------------------------------------------------------

/// A host process: its role is `host:MODE:SERVICE_SOCKET:PREDECESSOR:OWN` (PREDECESSOR
/// empty for the first host, which serves the socket instead).
#[test]
fn child_role() {
    let Some(role) = role() else { return };
    let _w = watchdog("child", Duration::from_secs(120));
    let parts: Vec<&str> = role.split(':').collect();
    let [kind, mode, socket, predecessor, own] = parts[..] else {
        panic!("unknown role {role}");
    };
    assert_eq!(kind, "host");
    let (endpoint, listener) = if predecessor.is_empty() {
        // The hand-over socket first, so it exists once the guest can connect.
        let listener = Listener::bind(socket, service()).expect("bind");
        let own = HandOverListener::bind(own).expect("bind the hand-over socket");
        (listener.accept().expect("the guest"), own)
    } else {
        // Ready for our own successor before we take over, so nothing but the hand-over
        // itself stands between the predecessor's last packet and our first.
        let own = HandOverListener::bind(own).expect("bind the hand-over socket");
        // The predecessor's `DONE` (or its death right after our confirm) is read on a
        // thread started now, off the path from the confirm to our first packet.
        let (give, done_reader) = std::sync::mpsc::channel::<TakeOver>();
        thread::spawn(move || {
            if let Ok(mut take) = done_reader.recv() {
                match take.next_endpoint() {
                    Ok(None) | Err(_) => {}
                    Ok(Some(_)) => panic!("a second endpoint"),
                }
            }
        });
        // Started and ready; take over when told (as an upgrade would: start the new
        // build, let it initialise, then hand over), so the blackout is the hand-over's.
        let go = PathBuf::from(format!("{}.go", own.path().display()));
        while !go.exists() {
            thread::sleep(Duration::from_micros(200));
        }
        let mut take = TakeOver::connect(predecessor).expect("connect to the predecessor");
        let incoming = take
            .next_endpoint()
            .expect("an endpoint")
            .expect("not done");
        if mode == "die-before-confirm" {
            die();
        }
        let endpoint = incoming.confirm().expect("confirm");
        println!("resumed {}", mono_ns());
        give.send(take).expect("the DONE reader");
        (endpoint, own)
    };
    println!("serving");
    serve(endpoint, &listener, mode);
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the machine, so the
/// hosts' pause and resume times and the guest's arrivals can be compared.
fn mono_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn die() -> ! {
    nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL)
        .expect("SIGKILL");
    unreachable!("killed");
}

/// Answers the guest until a successor takes the endpoint.
fn serve(mut endpoint: Endpoint, listener: &HandOverListener, mode: &str) {
    let mut buf = vec![0u8; 4096];
    loop {
        let ch = endpoint.channel();
        let mut handled = 0;
        loop {
            let p = match ch.recv(&mut buf, Wait::Now) {
                Ok(p) => p,
                Err(ChannelError::Empty) => break,
                Err(ChannelError::Closed) => return,
                Err(e) => panic!("host recv: {e}"),
            };
            handled += 1;
            let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
            let stamp = ch.counters().packets_sent;
            let deadline = Some(Instant::now() + Duration::from_secs(10));
            if p.completion_requested {
                let answer = [ANSWER.to_le_bytes(), n.to_le_bytes(), stamp.to_le_bytes()];
                ch.complete(p.transaction_id, answer.as_flattened(), deadline)
                    .expect("complete");
            } else {
                let echo = [ECHO.to_le_bytes(), n.to_le_bytes(), stamp.to_le_bytes()];
                ch.send(echo.as_flattened(), deadline).expect("echo");
            }
        }
        let now = Instant::now();
        if let Some(mut successor) = listener.accept_until(Some(now)).expect("accept") {
            println!("paused {}", mono_ns());
            match successor.hand_over(endpoint) {
                Ok(()) => {
                    if mode == "die-after-confirm" {
                        die();
                    }
                    successor.finish().expect("finish");
                    println!("handed over");
                    return;
                }
                Err(failed) => {
                    println!("the successor failed: {}", failed.error);
                    endpoint = failed.endpoint;
                    continue;
                }
            }
        }
        if handled == 0 {
            let wait = Some(now + Duration::from_millis(1));
            if let Err(ChannelError::Closed) = endpoint.channel().recv(&mut [], wait) {
                return;
            }
        }
    }
}

// ---- the guest ---------------------------------------------------------------------------

/// What the guest checked, and when packets arrived.
#[derive(Default)]
struct Tally {
    sent: u64,
    echoed: u64,
    calls_started: u64,
    calls_answered: u64,
    next_stamp: u64,
    /// Arrival gaps of 20 µs or more: when each ended ([`mono_ns`]) and how long it was
    /// (ns), for the blackouts.
    gaps: Vec<(u64, u64)>,
}

struct GuestRun {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    thread: thread::JoinHandle<Tally>,
}

impl GuestRun {
    /// A guest streaming at [`PER_SECOND`] with `calls` calls in flight.
    fn start(socket: &Path, calls: usize) -> Self {
        let guest = Guest::new(SERVICE).connect(socket).expect("connect");
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let (s, r) = (stop.clone(), received.clone());
        let thread = thread::spawn(move || run_guest(&guest, calls, &s, &r));
        Self {
            stop,
            received,
            thread,
        }
    }

    /// Waits until the guest has received `more` packets beyond what it had.
    fn progress(&self, more: u64) {
        let start = self.received.load(Ordering::Acquire);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.received.load(Ordering::Acquire) < start + more {
            assert!(Instant::now() < deadline, "the guest stopped receiving");
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("the guest")
    }
}

fn run_guest(guest: &Endpoint, calls: usize, stop: &AtomicBool, received: &AtomicU64) -> Tally {
    let ch = guest.channel();
    let mut t = Tally::default();
    let mut outstanding = BTreeSet::new();
    let mut buf = [0u8; 64];
    let start = Instant::now();
    let mut last = mono_ns();
    let mut draining_since: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Acquire) && draining_since.is_none() {
            draining_since = Some(Instant::now());
        }
        if let Some(since) = draining_since {
            if t.echoed == t.sent && outstanding.is_empty() {
                return t;
            }
            assert!(
                since.elapsed() < Duration::from_secs(20),
                "drained {} of {} echoes and all but {} calls",
                t.echoed,
                t.sent,
                outstanding.len()
            );
        } else {
            // The stream, paced.
            let due = start.elapsed().as_nanos() as u64 * PER_SECOND / 1_000_000_000;
            while t.sent < due {
                match ch.send(&t.sent.to_le_bytes(), Wait::Now) {
                    Ok(()) => t.sent += 1,
                    Err(ChannelError::Full) => break,
                    Err(e) => panic!("guest send: {e}"),
                }
            }
            while outstanding.len() < calls {
                let n = t.calls_started;
                match ch.start_request(&n.to_le_bytes(), Wait::Now) {
                    Ok(_) => {
                        outstanding.insert(n);
                        t.calls_started += 1;
                    }
                    Err(ChannelError::Full) => break,
                    Err(e) => panic!("guest request: {e}"),
                }
            }
        }
        let mut got = 0;
        loop {
            let p = match ch.recv(&mut buf, Wait::Now) {
                Ok(p) => p,
                Err(ChannelError::Empty) => break,
                Err(e) => panic!("guest recv: {e}"),
            };
            got += 1;
            let now = mono_ns();
            let gap = now - last;
            if gap >= 20_000 {
                t.gaps.push((now, gap));
            }
            last = now;
            let word = |i: usize| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap());
            let (kind, n, stamp) = (word(0), word(1), word(2));
            assert_eq!(
                stamp, t.next_stamp,
                "the hosts' packet {stamp} arrived where {} was due",
                t.next_stamp
            );
            t.next_stamp += 1;
            match (p.packet_type, kind) {
                (PacketType::InBand, ECHO) => {
                    assert_eq!(n, t.echoed, "echo {n} arrived where {} was due", t.echoed);
                    t.echoed += 1;
                }
                (PacketType::Completion, ANSWER) => {
                    assert!(
                        outstanding.remove(&n),
                        "call {n} answered twice or never asked"
                    );
                    t.calls_answered += 1;
                }
                other => panic!("unexpected packet {other:?}"),
            }
        }
        received.fetch_add(got, Ordering::Release);
        if got == 0 {
            let wait = Some(Instant::now() + Duration::from_micros(200));
            if let Err(ChannelError::Closed) = ch.recv(&mut [], wait) {
                panic!("the host went away");
            }
        }
    }
}

// ---- the orchestration -----------------------------------------------------------------

struct Paths {
    socket: PathBuf,
    dir: PathBuf,
}

impl Paths {
    fn new(tag: &str) -> Self {
        let socket = socket_path(tag);
        let dir = socket.parent().expect("a directory").to_path_buf();
        Self { socket, dir }
    }

    fn own(&self, generation: usize) -> PathBuf {
        self.dir.join(format!("handover-{generation}"))
    }

    fn host(&self, generation: usize, mode: &str) -> ChildProcess {
        let predecessor = match generation {
            0 => String::new(),
            g => self.own(g - 1).display().to_string(),
        };
        let role = format!(
            "host:{mode}:{}:{predecessor}:{}",
            self.socket.display(),
            self.own(generation).display()
        );
        let mut cmd: Command = child_command(CHILD_TEST, &role);
        ChildProcess::new(cmd.spawn().expect("spawn a host"))
    }

    /// Waits until host `generation` is ready (its hand-over socket is bound), then tells
    /// it to take over.
    fn go(&self, generation: usize) {
        let own = self.own(generation);
        self.wait_for(&own);
        std::fs::write(format!("{}.go", own.display()), b"").expect("go");
    }

    fn wait_for(&self, path: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !path.exists() {
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                path.display()
            );
            thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Paths {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn a_hundred_hand_overs_lose_and_repeat_nothing() {
    if role().is_some() {
        return;
    }
    hundred_hand_overs("stream-and-calls", CALLS);
}

/// The blackout as defined for servicing: the guest only streams, at 100,000 packets/s, so
/// the figure is the hand-over's and not that of two CPUs saturated by calls.
#[test]
fn blackout_with_the_guest_streaming_through_100_hand_overs() {
    if role().is_some() {
        return;
    }
    hundred_hand_overs("stream", 0);
}

/// 100 consecutive hand-overs under a guest streaming and keeping `calls` calls in flight;
/// checks every packet and call and prints the blackout.
fn hundred_hand_overs(tag: &str, calls: usize) {
    let _w = watchdog("a hundred hand-overs", Duration::from_secs(240));
    let paths = Paths::new(tag);
    let mut host = paths.host(0, "normal");
    paths.wait_for(&paths.own(0));
    let guest = GuestRun::start(&paths.socket, calls);
    guest.progress(1000);
    // Each host prints when it paused (accepted its successor) and when it resumed (took
    // over), on the one monotonic clock; a hand-over's blackout is the largest arrival
    // gap at the guest that ends between its pause and 1 ms after its resume.
    let mut paused = Vec::new();
    let mut resumed = Vec::new();
    let stamp = |out: &str, what: &str| -> u64 {
        out.lines()
            .find_map(|l| l.find(what).map(|i| &l[i + what.len()..]))
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {what:?} in:\n{out}"))
    };
    for generation in 1..=100 {
        let next = paths.host(generation, "normal");
        paths.go(generation);
        host.expect_success(Duration::from_secs(30));
        assert!(host.stdout().contains("handed over"), "{}", host.stdout());
        paused.push(stamp(host.stdout(), "paused "));
        if generation > 1 {
            resumed.push(stamp(host.stdout(), "resumed "));
        }
        host = next;
        guest.progress(100);
    }
    let tally = guest.finish();
    let _ = host.child.kill();
    host.wait(Duration::from_secs(10));
    resumed.push(stamp(&host.output().0, "resumed "));
    check(&tally);
    let mut pauses = Vec::new();
    let mut blackouts: Vec<u64> = paused
        .iter()
        .zip(&resumed)
        .map(|(&p, &r)| {
            assert!(r > p, "resumed before it paused");
            pauses.push(r - p);
            if std::env::var_os("VMLINK_DEBUG_BLACKOUT").is_some() {
                for (at, gap) in tally
                    .gaps
                    .iter()
                    .filter(|(at, _)| (p - 2_000_000..=r + 3_000_000).contains(at))
                {
                    eprintln!(
                        "pause {} µs: gap {} µs from {} to {} µs after pause",
                        (r - p) / 1000,
                        gap / 1000,
                        (*at as i64 - *gap as i64 - p as i64) / 1000,
                        (*at as i64 - p as i64) / 1000
                    );
                }
                eprintln!("--");
            }
            tally
                .gaps
                .iter()
                .filter(|(at, _)| (p..=r + 1_000_000).contains(at))
                .map(|(_, gap)| *gap)
                .max()
                .unwrap_or(0)
        })
        .collect();
    blackouts.sort_unstable();
    pauses.sort_unstable();
    println!(
        "{tag}: 100 hand-overs, {} stream packets echoed, {} calls answered; blackout p50 {} µs, \
         p99 {} µs, max {} µs; hosts paused p50 {} µs, p99 {} µs",
        tally.echoed,
        tally.calls_answered,
        percentile(&blackouts, 0.5) / 1000,
        percentile(&blackouts, 0.99) / 1000,
        blackouts.last().copied().unwrap_or(0) / 1000,
        percentile(&pauses, 0.5) / 1000,
        percentile(&pauses, 0.99) / 1000,
    );
}

/// Checks everything the guest tallied.
fn check(tally: &Tally) {
    assert!(tally.sent >= 100, "the guest sent only {}", tally.sent);
    assert_eq!(tally.echoed, tally.sent);
    assert_eq!(tally.calls_answered, tally.calls_started);
    assert_eq!(tally.next_stamp, tally.echoed + tally.calls_answered);
}

fn killed(status: std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(nix::sys::signal::Signal::SIGKILL as i32)
}

#[test]
fn a_successor_that_dies_before_confirming_leaves_the_predecessor_serving() {
    if role().is_some() {
        return;
    }
    let _w = watchdog("a successor that dies", Duration::from_secs(120));
    let paths = Paths::new("die-before");
    let mut host = paths.host(0, "normal");
    paths.wait_for(&paths.own(0));
    let guest = GuestRun::start(&paths.socket, CALLS);
    guest.progress(1000);
    let mut dying = paths.host(1, "die-before-confirm");
    paths.go(1);
    assert!(killed(dying.wait(Duration::from_secs(30))));
    // The predecessor goes on serving; a successor that lives then takes over.
    guest.progress(1000);
    let _ = std::fs::remove_file(paths.dir.join("handover-1.go"));
    let mut next = paths.host(1, "normal");
    paths.go(1);
    host.expect_success(Duration::from_secs(30));
    assert!(
        host.stdout().contains("the successor failed") && host.stdout().contains("handed over"),
        "{}",
        host.stdout()
    );
    guest.progress(1000);
    let tally = guest.finish();
    check(&tally);
    drop(next.child.kill());
}

#[test]
fn a_predecessor_that_dies_after_the_confirm_leaves_the_successor_serving() {
    if role().is_some() {
        return;
    }
    let _w = watchdog("a predecessor that dies", Duration::from_secs(120));
    let paths = Paths::new("die-after");
    let mut host = paths.host(0, "die-after-confirm");
    paths.wait_for(&paths.own(0));
    let guest = GuestRun::start(&paths.socket, CALLS);
    guest.progress(1000);
    let mut next = paths.host(1, "normal");
    paths.go(1);
    assert!(killed(host.wait(Duration::from_secs(30))));
    guest.progress(1000);
    let tally = guest.finish();
    check(&tally);
    drop(next.child.kill());
}

#[test]
fn a_host_that_dies_before_handing_over_closes_the_channel() {
    if role().is_some() {
        return;
    }
    let _w = watchdog("a host that dies", Duration::from_secs(60));
    let paths = Paths::new("die-first");
    let mut host = paths.host(0, "normal");
    paths.wait_for(&paths.own(0));
    let guest = Guest::new(SERVICE).connect(&paths.socket).expect("connect");
    host.child.kill().expect("SIGKILL");
    assert!(killed(host.wait(Duration::from_secs(10))));
    // The guest sees its peer gone; nobody can take over from a dead process.
    let mut buf = [0u8; 64];
    assert_eq!(
        guest
            .channel()
            .recv(&mut buf, Some(Instant::now() + Duration::from_secs(10))),
        Err(ChannelError::Closed)
    );
    assert!(TakeOver::connect(paths.own(0)).is_err());
}

// ---- hostile or failing partners, in one process ---------------------------------------

/// A host and a guest over a socket pair, and a hand-over listener.
fn pair(tag: &str) -> (Endpoint, Endpoint, HandOverListener, Paths) {
    let paths = Paths::new(tag);
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&paths.dir)
        .expect("dir");
    let (h, g) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let guest = thread::spawn(move || Guest::new(SERVICE).connect_stream(g));
    let host = service().serve_stream(h).expect("host");
    let guest = guest.join().expect("guest thread").expect("guest");
    let listener = HandOverListener::bind(paths.own(0)).expect("bind");
    (host, guest, listener, paths)
}

/// The guest sends `n`, the host receives exactly `n`.
fn still_works(host: &Endpoint, guest: &Endpoint, n: u64) {
    guest
        .channel()
        .send(&n.to_le_bytes(), Wait::Now)
        .expect("guest send");
    let mut buf = [0u8; 16];
    host.channel()
        .recv(&mut buf, Some(Instant::now() + Duration::from_secs(5)))
        .expect("host recv");
    assert_eq!(u64::from_le_bytes(buf[..8].try_into().unwrap()), n);
}

/// The 16-byte header of a hand-over message.
fn header(kind: u16, body_len: usize) -> Vec<u8> {
    let mut h = b"VMLNKSHM".to_vec();
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&kind.to_le_bytes());
    h.extend_from_slice(&(body_len as u32).to_le_bytes());
    h
}

/// Sends one message with `fds`, as a hostile partner would.
fn send_raw(sock: &std::os::unix::net::UnixStream, bytes: &[u8], fds: &[std::os::fd::RawFd]) {
    use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
    use std::os::fd::AsRawFd;
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    let n = sendmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &[std::io::IoSlice::new(bytes)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .expect("sendmsg");
    assert_eq!(n, bytes.len());
}

/// Reads one reply's header: its kind.
fn reply_kind(sock: &mut std::os::unix::net::UnixStream) -> u16 {
    use std::io::Read;
    let mut h = [0u8; 16];
    sock.read_exact(&mut h).expect("a reply");
    u16::from_le_bytes([h[10], h[11]])
}

#[test]
fn a_successor_that_refuses_drops_or_vanishes_leaves_the_endpoint_serving() {
    if role().is_some() {
        return;
    }
    let _w = watchdog("refusing successors", Duration::from_secs(60));
    let (mut host, guest, listener, paths) = pair("refusing");
    let path = paths.own(0);

    // Refused, after reading the application state.
    let p = path.clone();
    let t = thread::spawn(move || {
        let mut take = TakeOver::connect(&p).expect("connect");
        let incoming = take.next_endpoint().expect("receive").expect("one");
        assert_eq!(incoming.app_state(), b"how far we came");
        assert_eq!(incoming.endpoint().expect("endpoint").service(), SERVICE);
        incoming.refuse("not today");
    });
    let mut s = listener
        .accept(Some(Duration::from_secs(5)))
        .expect("successor");
    let failed = s
        .hand_over_with(host, b"how far we came")
        .expect_err("refused");
    assert!(
        failed.error.to_string().contains("not today"),
        "{}",
        failed.error
    );
    host = failed.endpoint;
    t.join().expect("successor");
    still_works(&host, &guest, 1);

    // Dropped unconfirmed: refused at once, not after the timeout.
    let p = path.clone();
    let t = thread::spawn(move || {
        let mut take = TakeOver::connect(&p).expect("connect");
        drop(take.next_endpoint().expect("receive").expect("one"));
    });
    let mut s = listener
        .accept(Some(Duration::from_secs(5)))
        .expect("successor");
    let start = Instant::now();
    let failed = s.hand_over(host).expect_err("dropped");
    assert!(start.elapsed() < Duration::from_secs(2));
    host = failed.endpoint;
    t.join().expect("successor");
    still_works(&host, &guest, 2);

    // Vanished after reading the endpoint (and its fds), without a word.
    let p = path.clone();
    let t = thread::spawn(move || {
        let mut raw = std::os::unix::net::UnixStream::connect(&p).expect("connect");
        send_raw(&raw, &header(5, 0), &[]);
        assert_eq!(reply_kind(&mut raw), 6, "a hand-over");
        // Dropping the socket closes it with the rest of the message unread.
    });
    let mut s = listener
        .accept(Some(Duration::from_secs(5)))
        .expect("successor");
    let failed = s.hand_over(host).expect_err("vanished");
    t.join().expect("successor");
    host = failed.endpoint;
    still_works(&host, &guest, 3);

    // A successor that connects and says nothing costs the serving side nothing.
    let silent = std::os::unix::net::UnixStream::connect(&path).expect("connect");
    let start = Instant::now();
    let none = listener
        .accept_until(Some(Instant::now() + Duration::from_millis(10)))
        .expect("accept");
    assert!(none.is_none());
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    still_works(&host, &guest, 5);
    drop(silent);

    // Strangers that say nothing, or something else, are skipped.
    let p = path.clone();
    let t = thread::spawn(move || {
        drop(std::os::unix::net::UnixStream::connect(&p).expect("connect"));
        let mut raw = std::os::unix::net::UnixStream::connect(&p).expect("connect");
        send_raw(&raw, &header(1, 3), &[]);
        send_raw(&raw, b"svc", &[]);
        assert_eq!(reply_kind(&mut raw), 3, "an error");
    });
    let none = listener
        .accept_until(Some(Instant::now() + Duration::from_millis(500)))
        .expect("accept");
    assert!(none.is_none());
    t.join().expect("strangers");
    still_works(&host, &guest, 4);
    drop(s);
}

#[test]
fn a_hostile_predecessor_is_refused_with_a_typed_error() {
    if role().is_some() {
        return;
    }
    use std::os::fd::AsRawFd;
    let _w = watchdog("hostile predecessors", Duration::from_secs(60));
    let paths = Paths::new("hostile");
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&paths.dir)
        .expect("dir");
    let state = {
        let (a, _b) =
            vmlink_channel::in_process_channel_pair(4096, Default::default()).expect("pair");
        a.save().0.to_bytes()
    };
    let fixed = |state_len: usize, app_len: usize| {
        let mut b = Vec::new();
        for v in [64 * 4096u64, 64 * 4096, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for v in [
            0u32,
            1,
            1000,
            1000,
            SERVICE.len() as u32,
            state_len as u32,
            app_len as u32,
            0,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(SERVICE.as_bytes());
        b
    };
    let bell = || nix::sys::eventfd::EventFd::new().expect("eventfd");
    let (e1, e2, e3, e4) = (bell(), bell(), bell(), bell());
    let (s1, _s2) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let fds = [
        e1.as_raw_fd(),
        e2.as_raw_fd(),
        e3.as_raw_fd(),
        s1.as_raw_fd(),
    ];
    let mut good = fixed(state.len(), 0);
    good.extend_from_slice(&state);
    let mut garbage_state = fixed(state.len(), 0);
    garbage_state.extend(state.iter().map(|b| b ^ 0x5a));
    let mut truncated = fixed(state.len() - 3, 0);
    truncated.extend_from_slice(&state[..state.len() - 3]);
    let cases: Vec<(&str, Vec<u8>, Vec<std::os::fd::RawFd>)> = vec![
        ("no fds", good.clone(), vec![]),
        ("a short body", good[..20].to_vec(), fds.to_vec()),
        ("lengths that do not add up", fixed(9999, 0), fds.to_vec()),
        ("a garbage saved state", garbage_state, fds.to_vec()),
        ("a truncated saved state", truncated, fds.to_vec()),
        (
            "an eventfd for the memory",
            good.clone(),
            vec![e4.as_raw_fd(), fds[1], fds[2], fds[3]],
        ),
    ];
    for (i, (what, body, fds)) in cases.into_iter().enumerate() {
        let path = paths.own(i);
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let fake = thread::spawn(move || {
            let (mut sock, _) = listener.accept().expect("accept");
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            assert_eq!(reply_kind(&mut sock), 5, "take-over request");
            let mut msg = header(6, body.len());
            msg.extend_from_slice(&body);
            send_raw(&sock, &msg, &fds);
            reply_kind(&mut sock)
        });
        let mut take = TakeOver::connect(&path).expect("connect");
        let err = take.next_endpoint().err();
        assert!(err.is_some(), "{what}: accepted");
        assert_eq!(
            fake.join().expect("fake predecessor"),
            3,
            "{what}: no refusal"
        );
        println!("{what}: {}", err.expect("error"));
    }
}

#[test]
fn all_endpoints_go_over_one_connection_in_turn() {
    if role().is_some() {
        return;
    }
    let _w = watchdog("several endpoints", Duration::from_secs(60));
    let (host_a, guest_a, listener, paths) = pair("several");
    let (h, g) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let guest_b = thread::spawn(move || Guest::new(SERVICE).connect_stream(g));
    let host_b = service().serve_stream(h).expect("host");
    let guest_b = guest_b.join().expect("guest thread").expect("guest");
    // Traffic queued on both before the hand-over arrives after it.
    guest_a.channel().send(b"to a", Wait::Now).expect("send");
    guest_b.channel().send(b"to b", Wait::Now).expect("send");

    let path = paths.own(0);
    let successor = thread::spawn(move || {
        let mut take = TakeOver::connect(&path).expect("connect");
        let mut taken = Vec::new();
        while let Some(incoming) = take.next_endpoint().expect("an endpoint or done") {
            taken.push(incoming.confirm().expect("confirm"));
        }
        taken
    });
    let mut s = listener
        .accept(Some(Duration::from_secs(5)))
        .expect("successor");
    s.hand_over(host_a).map_err(|f| f.error).expect("a");
    s.hand_over(host_b).map_err(|f| f.error).expect("b");
    s.finish().expect("finish");
    let taken = successor.join().expect("successor");
    assert_eq!(taken.len(), 2);
    let mut buf = [0u8; 16];
    for (host, guest, what) in [
        (&taken[0], &guest_a, b"to a"),
        (&taken[1], &guest_b, b"to b"),
    ] {
        host.channel()
            .recv(&mut buf, Wait::Now)
            .expect("the packet sent before");
        assert_eq!(&buf[..4], what);
        still_works(host, guest, 9);
    }
}
