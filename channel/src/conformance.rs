//! The conformance suite every transport runs on its own connected pair.
//!
//! Each [`Check`] has two sides. Side A runs where the test runs; side B runs on the peer:
//! a thread for in-process transports ([`Threads`]), another process for shared memory,
//! a guest for KVM. The two sides talk only through the channel under test, so the same
//! scripts work wherever the peer lives: a transport implements [`PairFactory::start`] to
//! connect a fresh pair and start side B there (by calling [`run_side`] with
//! [`Side::B`]), and [`run_all`] plays side A of every check.
//!
//! The checks cover packets of every size both ways, requests and completions with many
//! calls in flight, unsolicited packets kept while a call waits, late and unknown
//! completions, transaction-id exhaustion, GPA-direct and transfer-page packets, zero-copy
//! sends and receives, batches that signal at most once, flow control and deadlines,
//! polling mode, a peer that closes, and a corrupt ring. Each panics with a message naming
//! what broke.

use std::boxed::Box;
use std::marker::PhantomData;
use std::thread;
use std::time::{Duration, Instant};
use std::vec::Vec;

use vmlink_ring::protocol::{FLAG_COMPLETION_REQUESTED, TransferPageHeader, TransferPageRange};
use vmlink_ring::{OutgoingPacket, PacketMeta, Payload, RingMem};
use zerocopy::IntoBytes;

use crate::Wait;
use crate::channel::{Channel, ChannelState, Config};
use crate::doorbell::Doorbell;
use crate::error::Polled;
use crate::error::{ChannelError, FailureCause, ProtocolError};
use crate::packet::{GpaRange, PacketError, parse_transfer_page_header};
use crate::{MAX_TRANSACTIONS, PacketType};

/// One end of a connection under test.
pub struct End<M: RingMem, D: Doorbell> {
    /// The channel.
    pub channel: Channel<M, D>,
    /// Writes an invalid write index into the ring this end sends on, as a hostile peer
    /// would. Only side B's is used.
    pub corrupt_outgoing: Box<dyn Fn() + Send>,
}

/// Which side of a check a script plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The side where the test runs.
    A,
    /// The peer's side.
    B,
}

/// Side A's end of a started check, and a way to wait for side B.
pub struct Started<M: RingMem, D: Doorbell> {
    /// Side A's end.
    pub a: End<M, D>,
    /// Waits for side B to finish; panics if it failed.
    pub peer: Box<dyn FnOnce()>,
}

/// Connects pairs and starts side B of a check on the peer.
pub trait PairFactory {
    /// The ring memory of side A's end.
    type Mem: RingMem + Send + Sync + 'static;
    /// The doorbell of side A's end.
    type Bell: Doorbell + Send + Sync + 'static;

    /// Connects a fresh pair with `check`'s ring size and configurations
    /// ([`Check::ring_data_len`], [`Check::configs`]) and starts side B on the peer.
    fn start(&self, check: Check) -> Started<Self::Mem, Self::Bell>;
}

/// A factory for transports whose ends can share a process: `make` builds a connected pair
/// (ring data length, configurations of A and B), and side B runs on a thread.
pub struct Threads<M, D, F> {
    make: F,
    _ends: PhantomData<fn() -> (M, D)>,
}

impl<M, D, F> Threads<M, D, F>
where
    M: RingMem + Send + Sync + 'static,
    D: Doorbell + Send + Sync + 'static,
    F: Fn(usize, Config, Config) -> (End<M, D>, End<M, D>),
{
    /// A factory over `make`.
    pub fn new(make: F) -> Self {
        Self {
            make,
            _ends: PhantomData,
        }
    }
}

impl<M, D, F> PairFactory for Threads<M, D, F>
where
    M: RingMem + Send + Sync + 'static,
    D: Doorbell + Send + Sync + 'static,
    F: Fn(usize, Config, Config) -> (End<M, D>, End<M, D>),
{
    type Mem = M;
    type Bell = D;

    fn start(&self, check: Check) -> Started<M, D> {
        let (ca, cb) = check.configs();
        let (a, b) = (self.make)(check.ring_data_len(), ca, cb);
        let peer = thread::Builder::new()
            .name(std::format!("side B of {}", check.name()))
            .spawn(move || run_side(check, Side::B, b))
            .expect("spawn side B");
        Started {
            a,
            peer: Box::new(move || {
                if let Err(panic) = peer.join() {
                    std::panic::resume_unwind(panic);
                }
            }),
        }
    }
}

macro_rules! checks {
    ($($variant:ident => $name:literal, $len:expr, $configs:expr, $a:ident, $b:ident;)*) => {
        /// A conformance check.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[non_exhaustive]
        pub enum Check {
            $(
                #[doc = concat!("`", $name, "`")]
                $variant,
            )*
        }

        impl Check {
            /// Every check, in the order [`run_all`] runs them.
            pub const ALL: &'static [Check] = &[$(Check::$variant),*];

            /// The check's name (stable: a peer process is told which check to run by it).
            pub fn name(self) -> &'static str {
                match self { $(Check::$variant => $name,)* }
            }

            /// The check named `name`.
            pub fn from_name(name: &str) -> Option<Check> {
                match name { $($name => Some(Check::$variant),)* _ => None }
            }

            /// Data bytes of each ring the check's pair needs.
            pub fn ring_data_len(self) -> usize {
                match self { $(Check::$variant => $len,)* }
            }

            /// The configurations of side A and side B.
            pub fn configs(self) -> (Config, Config) {
                match self { $(Check::$variant => $configs,)* }
            }
        }

        /// Plays `side` of `check` on `end`, panicking if the channel misbehaves.
        pub fn run_side<M, D>(check: Check, side: Side, end: End<M, D>)
        where
            M: RingMem + Send + Sync,
            D: Doorbell + Send + Sync,
        {
            match (check, side) {
                $(
                    (Check::$variant, Side::A) => $a(end),
                    (Check::$variant, Side::B) => $b(end),
                )*
            }
        }
    };
}

fn same(c: Config) -> (Config, Config) {
    (c, c)
}

const PAGE: usize = 4096;

checks! {
    InBandBothWays => "in_band_both_ways", 4 * PAGE, same(Config::default()), in_band_a, in_band_b;
    EveryPayloadSize => "every_payload_size", PAGE, same(Config::default()), sizes_a, sizes_b;
    CallsInFlight => "calls_in_flight", 8 * PAGE, same(Config::default()), calls_a, serve_b;
    UnsolicitedPacketsSurviveACall => "unsolicited_packets_survive_a_call", 8 * PAGE,
        same(Config::default()), unsolicited_a, unsolicited_b;
    LateCompletionIsDiscarded => "late_completion_is_discarded", 4 * PAGE,
        same(Config::default()), late_a, late_b;
    UnknownCompletionFailsTheChannel => "unknown_completion_fails_the_channel", 4 * PAGE,
        same(Config::default()), unknown_a, unknown_b;
    TransactionsExhaustCleanly => "transactions_exhaust_cleanly", 16 * PAGE,
        same(Config::default()), exhaust_a, exhaust_b;
    GpaDirectPackets => "gpa_direct_packets", 4 * PAGE,
        same(Config::default().with_gpa_page_limit(64)), gpa_a, gpa_b;
    GpaPagesPastTheReceiversLimit => "gpa_pages_past_the_receivers_limit", 4 * PAGE,
        (Config::default(), Config::default().with_gpa_page_limit(4)), gpa_limit_a, gpa_limit_b;
    TransferPagePackets => "transfer_page_packets", 4 * PAGE, same(Config::default()),
        transfer_a, transfer_b;
    ZeroCopy => "zero_copy", 16 * PAGE, same(Config::default()), zero_copy_a, zero_copy_b;
    BatchesSignalAtMostOnce => "batches_signal_at_most_once", 16 * PAGE,
        same(Config::default()), batch_a, batch_b;
    FlowControlAndDeadlines => "flow_control_and_deadlines", PAGE, same(Config::default()),
        flow_a, flow_b;
    PollingMode => "polling_mode", PAGE, same(Config::polling(200)), polling_a, polling_b;
    PeerCloseDrainsThenCloses => "peer_close_drains_then_closes", 4 * PAGE,
        same(Config::default()), close_a, close_b;
    BlockedReceiveSeesClose => "blocked_receive_sees_close", 4 * PAGE,
        same(Config::default()), blocked_close_a, blocked_close_b;
    CorruptRingFailsFast => "corrupt_ring_fails_fast", 4 * PAGE, same(Config::default()),
        corrupt_a, corrupt_b;
    CountersAddUp => "counters_add_up", 4 * PAGE, same(Config::default()), counters_a, counters_b;
}

/// Plays side A of every check against `f`, one fresh pair each.
pub fn run_all<F: PairFactory>(f: &F) {
    for &check in Check::ALL {
        run_one(f, check);
    }
}

/// Plays side A of one check against `f`, then waits for side B.
pub fn run_one<F: PairFactory>(f: &F, check: Check) {
    let started = f.start(check);
    run_side(check, Side::A, started.a);
    (started.peer)();
}

// ---- helpers --------------------------------------------------------------------------

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Under Miri (which runs the in-process suite with its data-race detector), loops that
/// repeat the same exchange many times run fewer rounds: `n` natively, about a twentieth
/// (at least 2) under Miri.
fn rounds(n: u64) -> u64 {
    if cfg!(miri) { n.div_ceil(20).max(2) } else { n }
}

/// A deadline comfortably past anything a check waits for.
fn soon() -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(20))
}

fn after(ms: u64) -> Option<Instant> {
    Some(Instant::now() + Duration::from_millis(ms))
}

/// Side B's last step: wait until side A has finished and closed its end, discarding
/// whatever A still sends, so B never leaves before A is done.
fn until_closed<M: RingMem, D: Doorbell>(ch: &Channel<M, D>) {
    let mut buf = std::vec![0u8; 1 << 20];
    loop {
        match ch.recv(&mut buf, soon()) {
            Ok(_) => {}
            Err(ChannelError::Closed) => return,
            Err(e) => panic!("side B waiting for side A to close: {e}"),
        }
    }
}

fn failed_cause(e: ChannelError) -> FailureCause {
    match e {
        ChannelError::Failed(c) => c,
        other => panic!("expected a failed channel, got {other:?}"),
    }
}

mod checks;
use checks::*;
