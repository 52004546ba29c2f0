//! The secure channel (vmlink-secure) beside the plain one it runs over, in interleaved
//! rounds with pinned threads: 64-byte polling calls (a round trip) and a 64 KiB stream one
//! way, plain, ChaCha20-Poly1305 and AES-256-GCM. Every byte is checked.
//!
//! ```text
//! cargo run --release -p vmlink-examples --example secure [ROUNDS]
//! ```
//!
//! Goals: secure 64 B round trip within 2x the plain one; 64 KiB secure stream at least
//! 1 GB/s with ChaCha20-Poly1305 and 2 GB/s with AES-256-GCM.
//!
//! The floor of a secure round trip, measured in the same rounds: the plain round trip plus
//! four AEAD operations on the 88-byte frame a 64-byte call seals (request and response,
//! each sealed once and opened once; an open costs what a seal does). Where the plain round
//! trip is short (its two CPUs share a cache), those four operations alone can cost more
//! than it, and no secure layer gets under the floor's ratio.

#[path = "common/rounds.rs"]
mod rounds;

use rounds::{load_average, measure, median, pin, rounds_arg};
use vmlink_channel::{
    ChannelError, Config, Doorbell, Endpoint, PacketRx, PacketTx, Wait, in_process_channel_pair,
};
use vmlink_secure::{Cipher, KeyState, RekeyLimits, SecureConfig, establish_pair};

/// Bytes a 64-byte call seals: the 24-byte inner header and the payload.
const FRAME: usize = 88;
/// Seals per floor measurement.
const SEALS: u64 = 200_000;

/// Nanoseconds per seal of a [`FRAME`]-byte frame with `cipher` (this crate's cipher, as
/// the layer runs it).
fn seal_ns(cipher: Cipher) -> f64 {
    let mut key = KeyState::new([7; 32], cipher, RekeyLimits::default());
    let mut frame = [0x5a_u8; FRAME];
    let start = std::time::Instant::now();
    for _ in 0..SEALS {
        std::hint::black_box(key.seal(&mut frame).expect("seal"));
    }
    start.elapsed().as_nanos() as f64 / SEALS as f64
}

/// Ring data bytes each way: room for 15 packets of 64 KiB.
const RING: usize = 1 << 20;
/// Round trips per round.
const RTT_MSGS: u64 = 20_000;
/// 64 KiB packets per round.
const STREAM_MSGS: u64 = 4_000;
const BIG: usize = 64 * 1024;
const SPIN: u32 = 10_000;

/// Which channel a case runs over.
#[derive(Clone, Copy)]
enum Kind {
    Plain,
    Secure(Cipher),
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Plain => "plain",
            Kind::Secure(Cipher::ChaChaPoly) => "secure ChaCha20-Poly1305",
            Kind::Secure(Cipher::AesGcm) => "secure AES-256-GCM",
        }
    }
}

/// Runs `f` with a connected pair of `kind`: the handshake runs before `f` and is not
/// measured.
fn with_pair<F>(kind: Kind, f: F) -> f64
where
    F: PairUser,
{
    let (a, b) = in_process_channel_pair(RING, Config::polling(SPIN)).expect("channel pair");
    match kind {
        Kind::Plain => f.run(a, b),
        Kind::Secure(cipher) => {
            let config = SecureConfig {
                cipher,
                ..SecureConfig::default()
            };
            let (a, b) = establish_pair(a, b, &config).expect("handshake");
            f.run(a.endpoint, b.endpoint)
        }
    }
}

/// A measurement over a connected pair of any link type.
trait PairUser {
    fn run<T, R, D>(self, a: Endpoint<T, R, D>, b: Endpoint<T, R, D>) -> f64
    where
        T: PacketTx + Send,
        R: PacketRx + Send,
        D: Doorbell + Send + Sync;
}

/// 64-byte polling calls: ns per round trip.
struct Rtt;

impl PairUser for Rtt {
    fn run<T, R, D>(self, a: Endpoint<T, R, D>, b: Endpoint<T, R, D>) -> f64
    where
        T: PacketTx + Send,
        R: PacketRx + Send,
        D: Doorbell + Send + Sync,
    {
        b.mask_interrupts();
        measure(
            RTT_MSGS,
            move || {
                let mut buf = [0u8; 64];
                for seq in 0..RTT_MSGS {
                    let r = loop {
                        match b.recv(&mut buf, Wait::Now) {
                            Ok(r) => break r,
                            Err(ChannelError::Empty) => std::hint::spin_loop(),
                            Err(e) => panic!("recv: {e}"),
                        }
                    };
                    assert_eq!(r.payload(&buf)[..8], seq.to_le_bytes());
                    b.complete(r.transaction_id, &buf, Wait::Now)
                        .expect("complete");
                }
            },
            move || {
                let mut req = [0u8; 64];
                let mut resp = [0u8; 64];
                for seq in 0..RTT_MSGS {
                    req[..8].copy_from_slice(&seq.to_le_bytes());
                    let len = a.call(&req, &mut resp, Wait::Forever).expect("call");
                    assert_eq!(len, 64);
                    assert_eq!(resp[..8], seq.to_le_bytes());
                }
            },
        )
        .0
    }
}

/// A 64 KiB stream one way: ns per packet.
struct Stream;

impl PairUser for Stream {
    fn run<T, R, D>(self, a: Endpoint<T, R, D>, b: Endpoint<T, R, D>) -> f64
    where
        T: PacketTx + Send,
        R: PacketRx + Send,
        D: Doorbell + Send + Sync,
    {
        measure(
            STREAM_MSGS,
            move || {
                let mut buf = vec![0u8; BIG];
                for seq in 0..STREAM_MSGS {
                    let r = b.recv(&mut buf, Wait::Forever).expect("recv");
                    let p = r.payload(&buf);
                    assert_eq!(p.len(), BIG);
                    assert_eq!(p[..8], seq.to_le_bytes());
                    assert_eq!(p[BIG - 1], seq as u8);
                }
            },
            move || {
                let mut msg = vec![0x5a_u8; BIG];
                for seq in 0..STREAM_MSGS {
                    msg[..8].copy_from_slice(&seq.to_le_bytes());
                    msg[BIG - 1] = seq as u8;
                    a.send(&msg, Wait::Forever).expect("send");
                }
            },
        )
        .0
    }
}

fn main() {
    let rounds = rounds_arg(5);
    pin(0);
    let kinds = [
        Kind::Plain,
        Kind::Secure(Cipher::ChaChaPoly),
        Kind::Secure(Cipher::AesGcm),
    ];
    let mut rtt = vec![Vec::new(); kinds.len()];
    let mut stream = vec![Vec::new(); kinds.len()];
    let mut seals = vec![Vec::new(); kinds.len()];
    for round in 0..rounds {
        let mut line = format!("round {round:2}:");
        for (i, k) in kinds.iter().enumerate() {
            let r = with_pair(*k, Rtt);
            let s = with_pair(*k, Stream);
            rtt[i].push(r);
            stream[i].push(s);
            if let Kind::Secure(cipher) = k {
                seals[i].push(seal_ns(*cipher));
            }
            line += &format!(
                " {} rtt {r:.0} ns, 64 KiB {:.2} GB/s |",
                k.name(),
                BIG as f64 / s
            );
        }
        println!("{line}");
    }
    println!("\nmedians over {rounds} rounds (ratios computed per round, then the median):");
    for (i, k) in kinds.iter().enumerate() {
        let rtt_ratio: Vec<f64> = rtt[i].iter().zip(&rtt[0]).map(|(s, p)| s / p).collect();
        let stream_gbs: Vec<f64> = stream[i].iter().map(|s| BIG as f64 / s).collect();
        let stream_ratio: Vec<f64> = stream[i]
            .iter()
            .zip(&stream[0])
            .map(|(s, p)| p / s)
            .collect();
        println!(
            "  {:<26} 64 B call {:>7.0} ns ({:.2}x plain)   64 KiB stream {:>5.2} GB/s ({:.2}x plain)",
            k.name(),
            median(&rtt[i]),
            median(&rtt_ratio),
            median(&stream_gbs),
            median(&stream_ratio),
        );
        if !seals[i].is_empty() {
            let floor: Vec<f64> = seals[i]
                .iter()
                .zip(&rtt[0])
                .map(|(seal, plain)| (plain + 4.0 * seal) / plain)
                .collect();
            let over: Vec<f64> = rtt[i]
                .iter()
                .zip(seals[i].iter().zip(&rtt[0]))
                .map(|(secure, (seal, plain))| secure / (plain + 4.0 * seal))
                .collect();
            println!(
                "  {:<26} floor: plain + 4 x {:.0} ns (seal of {FRAME} B) = {:.2}x plain; \
                 the call is {:.2}x its floor",
                "",
                median(&seals[i]),
                median(&floor),
                median(&over),
            );
        }
    }
    println!(
        "\nload average {} (1, 5, 15 min) at the end",
        load_average()
    );
}
