//! A guest agent answering `call`s over whichever transport it is given: one `agent`
//! function, generic over the endpoint's link, serves over vmlink-shm shared memory, over a
//! Unix socketpair with the stream link, and over a hybrid vsock (the host connecting
//! through a stand-in for a Firecracker VMM's Unix socket, which joins it to the agent's
//! listener on `<path>_<port>` as Firecracker's vsock muxer does). A host thread makes the
//! calls, checks every answer, and the example prints the round trips per transport.
//!
//! `cargo run --release -p vmlink-examples --example agent [shm|socketpair|hybrid|all]`

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use vmlink_channel::{ChannelError, Config, Doorbell, Endpoint, PacketRx, PacketTx, Wait};
use vmlink_hvsock::link::{StreamConfig, stream_endpoint};
use vmlink_hvsock::socket::{HybridAddr, StreamAddr};
use vmlink_shm::{Guest, Layout, Listener, Service};

/// Calls the host makes per transport.
const CALLS: u64 = 20_000;
/// The agent's operations: the first byte of a request.
const ECHO: u8 = 1;
const ADD: u8 = 2;
/// The answer to a request the agent does not know.
const UNKNOWN: &[u8] = b"unknown operation";

/// The agent: answers requests until the host leaves; returns how many it answered.
/// `ECHO` answers the request's bytes, `ADD` the sum of its two little-endian u64s.
fn agent<T: PacketTx, R: PacketRx, D: Doorbell>(
    ep: &Endpoint<T, R, D>,
) -> Result<u64, ChannelError> {
    let mut buf = vec![0u8; 4096];
    let mut answered = 0;
    loop {
        let r = match ep.recv(&mut buf, Wait::Forever) {
            Ok(r) => r,
            Err(ChannelError::Closed) => return Ok(answered),
            Err(e) => return Err(e),
        };
        if !r.completion_requested {
            continue;
        }
        let request = r.payload(&buf);
        let sum;
        let answer: &[u8] = match request.first() {
            Some(&ECHO) => request,
            Some(&ADD) if request.len() >= 17 => {
                let word = |at: usize| u64::from_le_bytes(request[at..at + 8].try_into().unwrap());
                sum = word(1).wrapping_add(word(9)).to_le_bytes();
                &sum
            }
            _ => UNKNOWN,
        };
        ep.complete(r.transaction_id, answer, Wait::Forever)?;
        answered += 1;
    }
}

/// The host: `CALLS` calls, alternating echo and add, every answer checked; returns the
/// median and 99th-percentile round trip.
fn host<T: PacketTx, R: PacketRx, D: Doorbell>(ep: &Endpoint<T, R, D>) -> (Duration, Duration) {
    let mut times = Vec::with_capacity(CALLS as usize);
    let mut response = [0u8; 64];
    for i in 0..CALLS {
        let mut request = [0u8; 24];
        request[0] = if i % 2 == 0 { ECHO } else { ADD };
        request[1..9].copy_from_slice(&i.to_le_bytes());
        request[9..17].copy_from_slice(&(i * 3).to_le_bytes());
        let t0 = Instant::now();
        let n = ep
            .call(&request, &mut response, Wait::Forever)
            .expect("call");
        times.push(t0.elapsed());
        if request[0] == ECHO {
            assert_eq!(&response[..n], &request[..], "echo {i}");
        } else {
            assert_eq!(response[..8], (i * 4).to_le_bytes(), "add {i}");
        }
    }
    let mut unknown = [0u8; 32];
    let n = ep
        .call(&[9], &mut unknown, Wait::Forever)
        .expect("an unknown operation is answered");
    assert_eq!(&unknown[..UNKNOWN.len()], UNKNOWN, "{n} bytes");
    times.sort();
    (times[times.len() / 2], times[times.len() * 99 / 100])
}

fn report(transport: &str, (p50, p99): (Duration, Duration), answered: u64) {
    println!(
        "{transport:<11} {answered} calls answered, round trip p50 {:.1} µs, p99 {:.1} µs",
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
}

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmlink-agent-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Private to this user, as vmlink-shm requires of a listening socket's directory.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .expect("scratch directory");
    dir
}

/// Over shared memory: the agent is vmlink-shm's guest of a host listening in this process.
fn over_shm() {
    let dir = scratch_dir("shm");
    let path = dir.join("agent.sock");
    let service = Service::new("agent").with_layout(Layout::symmetric(64 * 1024, 0));
    let listener = Listener::bind(&path, service).expect("listen");
    let guest = thread::spawn({
        let path = path.clone();
        move || {
            let end = Guest::new("agent").connect(&path).expect("connect");
            agent(end.channel()).expect("agent")
        }
    });
    let end = listener.accept().expect("accept");
    let times = host(end.channel());
    drop(end);
    report("shm", times, guest.join().expect("agent thread"));
    let _ = std::fs::remove_dir_all(dir);
}

/// Over a Unix socketpair: the stream link on both ends.
fn over_socketpair() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let link = StreamConfig::default();
    let guest = thread::spawn(move || {
        let ep = stream_endpoint(b, link, Config::default()).expect("endpoint");
        agent(&ep).expect("agent")
    });
    let ep = stream_endpoint(a, link, Config::default()).expect("endpoint");
    let times = host(&ep);
    drop(ep);
    report("socketpair", times, guest.join().expect("agent thread"));
}

/// A stand-in for a VMM's hybrid vsock socket at `path`: one connection, whose first line
/// `CONNECT <port>` is joined to the listener on `<path>_<port>` and answered `OK <port>`;
/// then the two sockets are spliced both ways.
fn stand_in_vmm(path: &Path) -> thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).expect("VMM socket");
    let base = path.to_owned();
    thread::spawn(move || {
        let (host, _) = listener.accept().expect("the host connects");
        let mut reader = BufReader::new(host.try_clone().expect("dup"));
        let mut line = String::new();
        reader.read_line(&mut line).expect("CONNECT line");
        let port: u32 = line
            .strip_prefix("CONNECT ")
            .and_then(|p| p.trim_end().parse().ok())
            .expect("CONNECT <port>");
        let mut guest_path = base.into_os_string();
        guest_path.push(format!("_{port}"));
        let guest = UnixStream::connect(guest_path).expect("the agent listens");
        (&host).write_all(b"OK 1073741824\n").expect("OK");
        let (g2, h2) = (
            guest.try_clone().expect("dup"),
            host.try_clone().expect("dup"),
        );
        let up = thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut &guest);
            let _ = guest.shutdown(std::net::Shutdown::Write);
        });
        let _ = std::io::copy(&mut &g2, &mut &h2);
        let _ = h2.shutdown(std::net::Shutdown::Write);
        let _ = up.join();
    })
}

/// Over a hybrid vsock: the agent listens as a guest would be reached (`<path>_<port>`),
/// the host asks the VMM's socket for the port.
fn over_hybrid() {
    let dir = scratch_dir("hybrid");
    let addr = StreamAddr::Hybrid(HybridAddr::new(dir.join("vmm.sock"), 5000));
    let listener = addr.listen().expect("the agent listens");
    let vmm = stand_in_vmm(&dir.join("vmm.sock"));
    let guest = thread::spawn(move || {
        let stream = listener.accept().expect("a connection");
        let ep =
            stream_endpoint(stream, StreamConfig::default(), Config::default()).expect("endpoint");
        agent(&ep).expect("agent")
    });
    let stream = addr.connect().expect("connect through the VMM");
    let ep = stream_endpoint(stream, StreamConfig::default(), Config::default()).expect("endpoint");
    let times = host(&ep);
    drop(ep);
    report("hybrid", times, guest.join().expect("agent thread"));
    vmm.join().expect("VMM thread");
    let _ = std::fs::remove_dir_all(dir);
}

fn main() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    match which.as_str() {
        "shm" => over_shm(),
        "socketpair" => over_socketpair(),
        "hybrid" => over_hybrid(),
        "all" => {
            over_shm();
            over_socketpair();
            over_hybrid();
        }
        other => {
            eprintln!("agent: unknown transport {other:?}: shm, socketpair, hybrid or all");
            std::process::exit(2);
        }
    }
}
