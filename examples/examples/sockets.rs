//! Sockets: vmlink's stream link (`vmlink_hvsock::link`, vmlink packets framed on a Unix
//! stream socket) beside a raw Unix socketpair doing the same work, in the same
//! interleaved rounds, with the caller or producer pinned to CPU 0 and the peer to CPU 1.
//! Every message is checked.
//!
//! - Round trips (64-byte request and response), in pairs that wait alike: the raw socket
//!   blocking in `read` beside vmlink's `call` (answered by `complete`) sleeping at once
//!   (`Config::sleep_at_once`), and the raw socket polling with non-blocking `recv` in a
//!   loop beside vmlink's `call` with the default spin before sleeping (which polls the
//!   socket the same way, then sleeps).
//! - The floor of a wait that can also be woken locally: the raw socket ping-pong waiting as
//!   the link's sleeping wait does, `recv` without blocking (nothing yet), `poll` on the
//!   socket and an eventfd, then `recv`.
//! - 64 KiB streaming: the raw socket writes each 64 KiB message with `write_all` and the
//!   reader takes it with `read_exact`; vmlink `send`s each as a packet and the reader
//!   `recv`s it into its buffer.
//! - 64-byte streaming: the raw socket writes each message with one `write` and the reader
//!   reads whatever arrived into a 64 KiB buffer; vmlink `send`s each (one commit, one
//!   `send` system call each) and the reader takes them with `recv_batch`.
//!
//! `cargo run --release -p vmlink-examples --example sockets [ROUNDS]`

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{MsgFlags, recv};
use vmlink_channel::fd::EventFd;

use vmlink_channel::{Config, DEFAULT_SPIN_BEFORE_SLEEP, Wait};
use vmlink_hvsock::link::{StreamConfig, StreamEndpoint, stream_endpoint};

#[allow(dead_code)]
#[path = "common/message.rs"]
mod message;
#[path = "common/rounds.rs"]
mod rounds;
use message::{check, msg};
use rounds::{load_average, median, pin, rounds_arg};

/// Round trips per case per round.
const RTT_MSGS: u64 = 5_000;
/// 64 KiB messages per case per round.
const BIG_MSGS: u64 = 4_000;
const BIG: usize = 64 * 1024;
/// 64-byte messages per case per round.
const SMALL_MSGS: u64 = 200_000;

/// [`rounds::measure`] without the peer's result.
fn measure(n: u64, peer: impl FnOnce() + Send, main: impl FnOnce()) -> f64 {
    rounds::measure(n, peer, main).0
}

fn spinning() -> Config {
    Config::default().with_spin_before_sleep(DEFAULT_SPIN_BEFORE_SLEEP)
}

fn link_pair() -> (StreamEndpoint, StreamEndpoint) {
    link_pair_with(spinning())
}

fn link_pair_with(config: Config) -> (StreamEndpoint, StreamEndpoint) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let link = StreamConfig::default();
    (
        stream_endpoint(a, link, config).expect("endpoint"),
        stream_endpoint(b, link, config).expect("endpoint"),
    )
}

/// A 64 KiB message: message `seq` repeated, so every 64 bytes are checkable.
fn big(seq: u64, buf: &mut [u8]) {
    let m = msg(seq);
    for chunk in buf.chunks_exact_mut(64) {
        chunk.copy_from_slice(&m);
    }
}

fn check_big(seq: u64, got: &[u8]) {
    assert_eq!(got.len(), BIG);
    // The first and last 64 bytes: a torn or shifted message shows at its ends.
    check(seq, &got[..64]);
    check(seq, &got[BIG - 64..]);
}

/// How a raw socket waits for the bytes it reads.
#[derive(Clone, Copy)]
enum RawWait {
    /// A blocking `read`.
    Block,
    /// Non-blocking `recv` in a loop, never sleeping.
    Spin,
    /// As a wait that can also be woken locally: non-blocking `recv`, and when nothing is
    /// there `poll` on the socket and an eventfd, then again.
    Poll,
}

/// Reads exactly `buf.len()` bytes from `s`, waiting `how`.
fn raw_read_exact(s: &UnixStream, wake: &EventFd, buf: &mut [u8], how: RawWait) {
    if let RawWait::Block = how {
        return (&*s).read_exact(buf).expect("read");
    }
    let mut have = 0;
    while have < buf.len() {
        match recv(s.as_raw_fd(), &mut buf[have..], MsgFlags::MSG_DONTWAIT) {
            Ok(0) => panic!("the peer left"),
            Ok(n) => have += n,
            Err(Errno::EAGAIN) => match how {
                RawWait::Poll => {
                    let mut fds = [
                        PollFd::new(wake.as_fd(), PollFlags::POLLIN),
                        PollFd::new(s.as_fd(), PollFlags::POLLIN),
                    ];
                    nix::poll::poll(&mut fds, PollTimeout::NONE).expect("poll");
                }
                _ => std::hint::spin_loop(),
            },
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// The raw socket ping-pong, 64 bytes each way, waiting `how`.
fn rtt_socket(how: RawWait) -> f64 {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    let (wa, wb) = (
        EventFd::new().expect("eventfd"),
        EventFd::new().expect("eventfd"),
    );
    measure(
        RTT_MSGS,
        move || {
            let mut buf = [0u8; 64];
            for seq in 0..RTT_MSGS {
                raw_read_exact(&b, &wb, &mut buf, how);
                check(seq, &buf);
                b.write_all(&buf).expect("write");
            }
        },
        move || {
            let mut buf = [0u8; 64];
            for seq in 0..RTT_MSGS {
                a.write_all(&msg(seq)).expect("write");
                raw_read_exact(&a, &wa, &mut buf, how);
                check(seq, &buf);
            }
        },
    )
}

fn rtt_link(config: Config) -> f64 {
    let (a, b) = link_pair_with(config);
    measure(
        RTT_MSGS,
        move || {
            let mut buf = [0u8; 64];
            for seq in 0..RTT_MSGS {
                let r = b.recv(&mut buf, Wait::Forever).expect("recv");
                check(seq, r.payload(&buf));
                b.complete(r.transaction_id, &buf, Wait::Forever)
                    .expect("complete");
            }
        },
        move || {
            let mut resp = [0u8; 64];
            for seq in 0..RTT_MSGS {
                let len = a.call(&msg(seq), &mut resp, Wait::Forever).expect("call");
                check(seq, &resp[..len]);
            }
        },
    )
}

fn big_socket() -> f64 {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    measure(
        BIG_MSGS,
        move || {
            let mut buf = vec![0u8; BIG];
            for seq in 0..BIG_MSGS {
                b.read_exact(&mut buf).expect("read");
                check_big(seq, &buf);
            }
        },
        move || {
            let mut buf = vec![0u8; BIG];
            for seq in 0..BIG_MSGS {
                big(seq, &mut buf);
                a.write_all(&buf).expect("write");
            }
        },
    )
}

fn big_link() -> f64 {
    let (a, b) = link_pair();
    measure(
        BIG_MSGS,
        move || {
            let mut buf = vec![0u8; BIG];
            for seq in 0..BIG_MSGS {
                let r = b.recv(&mut buf, Wait::Forever).expect("recv");
                check_big(seq, r.payload(&buf));
            }
        },
        move || {
            let mut buf = vec![0u8; BIG];
            for seq in 0..BIG_MSGS {
                big(seq, &mut buf);
                a.send(&buf, Wait::Forever).expect("send");
            }
        },
    )
}

fn small_socket() -> f64 {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    measure(
        SMALL_MSGS,
        move || {
            let mut buf = vec![0u8; 64 * 1024];
            let (mut have, mut seq) = (0, 0);
            while seq < SMALL_MSGS {
                let n = b.read(&mut buf[have..]).expect("read");
                assert!(n > 0, "the writer left early");
                have += n;
                let whole = have / 64 * 64;
                for m in buf[..whole].chunks_exact(64) {
                    check(seq, m);
                    seq += 1;
                }
                buf.copy_within(whole..have, 0);
                have -= whole;
            }
        },
        move || {
            for seq in 0..SMALL_MSGS {
                a.write_all(&msg(seq)).expect("write");
            }
        },
    )
}

fn small_link() -> f64 {
    let (a, b) = link_pair();
    measure(
        SMALL_MSGS,
        move || {
            let mut seq = 0;
            let mut buf = [0u8; 64];
            while seq < SMALL_MSGS {
                b.recv_batch(64, Wait::Forever, |p| {
                    p.read_payload(0, &mut buf).expect("payload");
                    check(seq, &buf);
                    seq += 1;
                })
                .expect("recv_batch");
            }
        },
        move || {
            for seq in 0..SMALL_MSGS {
                a.send(&msg(seq), Wait::Forever).expect("send");
            }
        },
    )
}

const CASES: usize = 9;

const NAMES: [&str; CASES] = [
    "socket ping-pong, blocking (µs)",
    "link call, sleeping at once (µs)",
    "Unix socket, 64 KiB (ns/msg)",
    "stream link, 64 KiB (ns/msg)",
    "Unix socket, 64 B (ns/msg)",
    "stream link, 64 B (ns/msg)",
    "socket ping-pong, polling (µs)",
    "link call, default spin (µs)",
    "socket ping-pong, recv/poll/recv (µs)",
];

fn round(reverse: bool) -> [f64; CASES] {
    let mut ns = [0.0; CASES];
    let mut order: Vec<usize> = (0..CASES).collect();
    if reverse {
        order.reverse();
    }
    for i in order {
        ns[i] = match i {
            0 => rtt_socket(RawWait::Block),
            1 => rtt_link(Config::default().sleep_at_once()),
            2 => big_socket(),
            3 => big_link(),
            4 => small_socket(),
            5 => small_link(),
            6 => rtt_socket(RawWait::Spin),
            7 => rtt_link(spinning()),
            _ => rtt_socket(RawWait::Poll),
        };
    }
    ns
}

fn main() {
    let rounds = rounds_arg(9);
    println!(
        "load average {} (1, 5, 15 min) at the start; {rounds} rounds; caller/producer on \
         CPU 0, peer on CPU 1",
        load_average()
    );
    pin(0);
    let _ = round(false);
    let mut all = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let ns = round(r % 2 == 1);
        println!(
            "round {r:2}: rtt µs: socket {:.2}, poll-waiting socket {:.2}, link {:.2}, polling \
             socket {:.2}, link {:.2} | 64 KiB ns/msg: socket {:.0}, link {:.0} | 64 B ns/msg: \
             socket {:.0}, link {:.0}",
            ns[0] / 1e3,
            ns[8] / 1e3,
            ns[1] / 1e3,
            ns[6] / 1e3,
            ns[7] / 1e3,
            ns[2],
            ns[3],
            ns[4],
            ns[5]
        );
        all.push(ns);
    }
    let col = |i: usize| all.iter().map(|ns| ns[i]).collect::<Vec<_>>();
    let ratio =
        |a: usize, b: usize| median(&all.iter().map(|ns| ns[a] / ns[b]).collect::<Vec<_>>());
    println!("\nmedians across rounds:");
    for (i, name) in NAMES.iter().enumerate() {
        let scale = if (2..=5).contains(&i) { 1.0 } else { 1e3 };
        println!("  {name:<36} {:10.2}", median(&col(i)) / scale);
    }
    println!("\nratios, each computed per round, then the median across rounds:");
    println!(
        "  call, sleeping / socket ping-pong, blocking {:5.2}   (goal <= 1.20)",
        ratio(1, 0)
    );
    println!(
        "  call, sleeping / socket, recv/poll/recv     {:5.2}   (the waiting floor)",
        ratio(1, 8)
    );
    println!(
        "  socket recv/poll/recv / socket blocking     {:5.2}",
        ratio(8, 0)
    );
    println!(
        "  call, spinning / socket ping-pong, polling  {:5.2}   (goal <= 1.20)",
        ratio(7, 6)
    );
    println!(
        "  call, default spin / socket, blocking       {:5.2}   (goal <= 1.20)",
        ratio(7, 0)
    );
    println!(
        "  64 KiB throughput, link / socket            {:5.2}   (goal >= 0.90)",
        ratio(2, 3)
    );
    println!(
        "  64 B throughput, link / socket              {:5.2}",
        ratio(4, 5)
    );
    println!(
        "\nload average {} (1, 5, 15 min) at the end",
        load_average()
    );
}
