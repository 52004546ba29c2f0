//! Blocking: vmlink's blocking calls and streams beside a raw eventfd ping-pong and a Unix
//! socket, measured in the same interleaved rounds with the caller or producer pinned to
//! CPU 0 and the peer to CPU 1. Every message is checked.
//!
//! Round trips (64-byte request and response, both sides blocking): a raw eventfd
//! ping-pong (the floor for a round trip that sleeps), a Unix socketpair, and the channel's
//! `call` over eventfd doorbells, once sleeping at once (`Config::sleep_at_once`: the
//! wake-up path itself) and once with the default spin before sleeping. Streams (64-byte
//! messages one way, `send` with `Wait::Forever`, `recv_batch` with `Wait::Forever`): the
//! default configuration and sleeping at once, with the doorbells rung per packet.
//!
//! `cargo run --release -p vmlink-examples --example blocking [ROUNDS]`

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vmlink_channel::fd::EventFd;
use vmlink_channel::{Channel, Config, DEFAULT_SPIN_BEFORE_SLEEP, EventFdDoorbell, Wait};
use vmlink_ring::HeapMem;

// Only the byte-wise messages are used here.
#[allow(dead_code)]
#[path = "common/message.rs"]
mod message;
#[path = "common/rounds.rs"]
mod rounds;
use message::{check, msg};
use rounds::{load_average, measure, median, pin, rounds_arg};

/// Round trips per case per round.
const RTT_MSGS: u64 = 5_000;
/// Messages per streaming case per round.
const STREAM_MSGS: u64 = 300_000;
/// Data bytes of each ring.
const RING: usize = 16 * 4096;

type EventFdChannel = Channel<Arc<HeapMem>, EventFdDoorbell>;

/// Two channels joined by rings on the heap and eventfd doorbells.
fn channel_pair(config: Config) -> (EventFdChannel, EventFdChannel) {
    let a_to_b = Arc::new(HeapMem::new(RING).expect("ring"));
    let b_to_a = Arc::new(HeapMem::new(RING).expect("ring"));
    let (da, db) = EventFdDoorbell::pair().expect("eventfd pair");
    let a = Channel::new(Arc::clone(&a_to_b), Arc::clone(&b_to_a), da, config).expect("channel");
    let b = Channel::new(b_to_a, a_to_b, db, config).expect("channel");
    (a, b)
}

/// Case 1: a raw eventfd ping-pong, both sides blocking in `read`.
fn rtt_eventfd() -> f64 {
    let ping = EventFd::blocking().expect("eventfd");
    let pong = EventFd::blocking().expect("eventfd");
    let (ping, pong) = (&ping, &pong);
    measure(
        RTT_MSGS,
        move || {
            for _ in 0..RTT_MSGS {
                assert!(ping.drain().expect("read"));
                pong.signal().expect("write");
            }
        },
        move || {
            for _ in 0..RTT_MSGS {
                ping.signal().expect("write");
                assert!(pong.drain().expect("read"));
            }
        },
    )
    .0
}

/// Case 2: a Unix socketpair, 64 bytes each way, blocking reads.
fn rtt_socket() -> f64 {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    measure(
        RTT_MSGS,
        move || {
            let mut buf = [0u8; 64];
            for seq in 0..RTT_MSGS {
                b.read_exact(&mut buf).expect("read");
                check(seq, &buf);
                b.write_all(&buf).expect("write");
            }
        },
        move || {
            let mut buf = [0u8; 64];
            for seq in 0..RTT_MSGS {
                a.write_all(&msg(seq)).expect("write");
                a.read_exact(&mut buf).expect("read");
                check(seq, &buf);
            }
        },
    )
    .0
}

/// Cases 3 and 4: the channel's `call` against a server blocking in `recv` and answering
/// with `complete`, both with `config`.
fn rtt_call(config: Config) -> f64 {
    let (a, b) = channel_pair(config);
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
    .0
}

/// Cases 5 and 6: a saturated blocking stream with `config`; nanoseconds per message and
/// doorbells rung per packet (both directions).
fn stream(config: Config) -> (f64, f64) {
    let (a, b) = channel_pair(config);
    let (a, b) = (&a, &b);
    let (ns, ()) = measure(
        STREAM_MSGS,
        move || {
            let mut seq = 0;
            let mut buf = [0u8; 64];
            while seq < STREAM_MSGS {
                b.recv_batch(64, Wait::Forever, |p| {
                    p.read_payload(0, &mut buf).expect("payload");
                    check(seq, &buf);
                    seq += 1;
                })
                .expect("recv_batch");
            }
        },
        move || {
            for seq in 0..STREAM_MSGS {
                a.send(&msg(seq), Wait::Forever).expect("send");
            }
        },
    );
    let doorbells = a.counters().signals_sent + b.counters().signals_sent;
    (ns, doorbells as f64 / STREAM_MSGS as f64)
}

/// What each round measures, in order.
const NAMES: [&str; 6] = [
    "eventfd ping-pong (floor)",
    "Unix socketpair, 64 B",
    "channel call, sleeping at once",
    "channel call, default spin",
    "stream, default spin (ns/msg)",
    "stream, sleeping at once (ns/msg)",
];

/// One round: every case once, in order or reversed; figures in [`NAMES`] order, then the
/// two streams' doorbells per packet.
fn round(reverse: bool) -> ([f64; 6], [f64; 2]) {
    let sleeping = Config::default().sleep_at_once();
    let spinning = Config::default().with_spin_before_sleep(DEFAULT_SPIN_BEFORE_SLEEP);
    let mut ns = [0.0; 6];
    let mut doorbells = [0.0; 2];
    let mut order: Vec<usize> = (0..6).collect();
    if reverse {
        order.reverse();
    }
    for i in order {
        ns[i] = match i {
            0 => rtt_eventfd(),
            1 => rtt_socket(),
            2 => rtt_call(sleeping),
            3 => rtt_call(spinning),
            4 => {
                let (t, d) = stream(spinning);
                doorbells[0] = d;
                t
            }
            _ => {
                let (t, d) = stream(sleeping);
                doorbells[1] = d;
                t
            }
        };
    }
    (ns, doorbells)
}

fn main() {
    let rounds = rounds_arg(9);
    println!(
        "load average {} (1, 5, 15 min) at the start; {rounds} rounds of {RTT_MSGS} round \
         trips and {STREAM_MSGS} streamed messages per case; caller/producer on CPU 0, peer \
         on CPU 1",
        load_average()
    );
    pin(0);
    let _ = round(false);
    let mut all = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let (ns, d) = round(r % 2 == 1);
        println!(
            "round {r:2}: rtt µs: eventfd {:.1}, socket {:.1}, call {:.1}, call+spin {:.1} | \
             stream ns/msg: spin {:.0} ({:.4} doorbells/pkt), at once {:.0} ({:.4})",
            ns[0] / 1e3,
            ns[1] / 1e3,
            ns[2] / 1e3,
            ns[3] / 1e3,
            ns[4],
            d[0],
            ns[5],
            d[1]
        );
        all.push((ns, d));
    }
    let col = |i: usize| all.iter().map(|(ns, _)| ns[i]).collect::<Vec<_>>();
    let ratio =
        |a: usize, b: usize| median(&all.iter().map(|(ns, _)| ns[a] / ns[b]).collect::<Vec<_>>());
    println!("\nmedians across rounds:");
    for (i, name) in NAMES.iter().enumerate() {
        let unit = if i < 4 {
            "µs round trip"
        } else {
            "ns per message"
        };
        let scale = if i < 4 { 1e3 } else { 1.0 };
        println!("  {name:<36} {:8.2} {unit}", median(&col(i)) / scale);
    }
    let dpp = |j: usize| median(&all.iter().map(|(_, d)| d[j]).collect::<Vec<_>>());
    println!("\nratios, each computed per round, then the median across rounds:");
    println!(
        "  call, sleeping at once / eventfd ping-pong   {:5.2}   (goal <= 1.10)",
        ratio(2, 0)
    );
    println!(
        "  call, sleeping at once / Unix socket         {:5.2}",
        ratio(2, 1)
    );
    println!(
        "  call, default spin     / eventfd ping-pong   {:5.2}",
        ratio(3, 0)
    );
    println!(
        "  call, default spin     / Unix socket         {:5.2}",
        ratio(3, 1)
    );
    println!(
        "  saturated stream, doorbells per packet: default spin {:.4} (goal < 0.01), \
         sleeping at once {:.4}",
        dpp(0),
        dpp(1)
    );
    println!(
        "\nload average {} (1, 5, 15 min) at the end",
        load_average()
    );
}
