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
//!
//! The suite runs over any link ([`End`] holds an [`Endpoint`]): over a VMBus ring pair
//! ([`End::ring`]) every check runs in full; over a byte stream ([`End::stream`]) the
//! ring's data length is the stream link's buffer and largest frame, GPA-direct sends must
//! be refused with [`ChannelError::Unsupported`], and the corruption is garbage on the
//! stream.

use std::boxed::Box;
use std::marker::PhantomData;
use std::thread;
use std::time::{Duration, Instant};
use std::vec::Vec;

use vmlink_ring::protocol::{FLAG_COMPLETION_REQUESTED, TransferPageHeader, TransferPageRange};
use vmlink_ring::{OutgoingPacket, PacketMeta, Payload, RingMem};
use zerocopy::IntoBytes;

use crate::Wait;
use crate::channel::{Channel, ChannelState, Config, Endpoint};
use crate::doorbell::Doorbell;
use crate::error::Polled;
use crate::error::{ChannelError, FailureCause, ProtocolError};
use crate::link::{PacketRx, PacketTx, RingRx, RingTx};
use crate::packet::{GpaRange, PacketError, parse_transfer_page_header};
use crate::{MAX_TRANSACTIONS, PacketType};

/// What kind of link an end runs over: what the checks may ask of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// A VMBus ring pair: GPA-direct packets, packets written in place, a ring the peer can
    /// corrupt (a [`FailureCause::Ring`]).
    Ring,
    /// A byte stream (a socket): GPA-direct packets are refused with
    /// [`ChannelError::Unsupported`], and the corruption is garbage on the stream (a
    /// [`FailureCause::Frame`]).
    Stream,
}

/// Writes a packet in place, for links that can ([`End::ring`]).
type InPlace<T, R, D> = fn(&Endpoint<T, R, D>, &[u8]) -> Result<(), ChannelError>;

/// One end of a connection under test.
pub struct End<T: PacketTx, R: PacketRx, D: Doorbell> {
    /// The endpoint.
    pub channel: Endpoint<T, R, D>,
    /// Corrupts what this end sends, as a hostile peer would: an invalid write index in a
    /// ring, garbage on a stream. Only side B's is used.
    pub corrupt_outgoing: Box<dyn Fn() + Send>,
    kind: LinkKind,
    in_place: Option<InPlace<T, R, D>>,
}

/// An end over a VMBus ring pair in memory `M`.
pub type RingEnd<M, D> = End<RingTx<M>, RingRx<M>, D>;

impl<M: RingMem, D: Doorbell> RingEnd<M, D> {
    /// An end over a VMBus ring pair.
    pub fn ring(channel: Channel<M, D>, corrupt_outgoing: Box<dyn Fn() + Send>) -> Self {
        Self {
            channel,
            corrupt_outgoing,
            kind: LinkKind::Ring,
            in_place: Some(|ch, bytes| {
                ch.send_in_place(PacketMeta::in_band(), 0, bytes.len(), soon(), |slot| {
                    let half = bytes.len() / 2;
                    // Out of order, to show the slot is written in place.
                    slot.write_payload(half, &bytes[half..])
                        .expect("second half");
                    slot.write_payload(0, &bytes[..half]).expect("first half");
                })
            }),
        }
    }
}

impl<T: PacketTx, R: PacketRx, D: Doorbell> End<T, R, D> {
    /// An end over a byte stream; `corrupt_outgoing` writes bytes that are not a valid
    /// frame into the stream this end sends on.
    pub fn stream(channel: Endpoint<T, R, D>, corrupt_outgoing: Box<dyn Fn() + Send>) -> Self {
        Self {
            channel,
            corrupt_outgoing,
            kind: LinkKind::Stream,
            in_place: None,
        }
    }

    /// The kind of link.
    pub fn kind(&self) -> LinkKind {
        self.kind
    }
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
pub struct Started<T: PacketTx, R: PacketRx, D: Doorbell> {
    /// Side A's end.
    pub a: End<T, R, D>,
    /// Waits for side B to finish; panics if it failed.
    pub peer: Box<dyn FnOnce()>,
}

/// Connects pairs and starts side B of a check on the peer.
pub trait PairFactory {
    /// The sending half of side A's link.
    type Tx: PacketTx + Send + 'static;
    /// The receiving half of side A's link.
    type Rx: PacketRx + Send + 'static;
    /// The doorbell of side A's end.
    type Bell: Doorbell + Send + Sync + 'static;

    /// Connects a fresh pair with `check`'s ring size and configurations
    /// ([`Check::ring_data_len`], [`Check::configs`]) and starts side B on the peer.
    fn start(&self, check: Check) -> Started<Self::Tx, Self::Rx, Self::Bell>;
}

/// A factory for transports whose ends can share a process: `make` builds a connected pair
/// (ring data length, configurations of A and B), and side B runs on a thread.
pub struct Threads<T, R, D, F> {
    make: F,
    _ends: Ends<T, R, D>,
}

/// The link and doorbell types a [`Threads`] factory's pairs have.
type Ends<T, R, D> = PhantomData<fn() -> (T, R, D)>;

impl<T, R, D, F> Threads<T, R, D, F>
where
    T: PacketTx + Send + 'static,
    R: PacketRx + Send + 'static,
    D: Doorbell + Send + Sync + 'static,
    F: Fn(usize, Config, Config) -> (End<T, R, D>, End<T, R, D>),
{
    /// A factory over `make`.
    pub fn new(make: F) -> Self {
        Self {
            make,
            _ends: PhantomData,
        }
    }
}

impl<T, R, D, F> PairFactory for Threads<T, R, D, F>
where
    T: PacketTx + Send + 'static,
    R: PacketRx + Send + 'static,
    D: Doorbell + Send + Sync + 'static,
    F: Fn(usize, Config, Config) -> (End<T, R, D>, End<T, R, D>),
{
    type Tx = T;
    type Rx = R;
    type Bell = D;

    fn start(&self, check: Check) -> Started<T, R, D> {
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

            /// Data bytes of each ring the check's pair needs (on a stream link: its send
            /// buffer and largest frame).
            pub fn ring_data_len(self) -> usize {
                match self { $(Check::$variant => $len,)* }
            }

            /// The configurations of side A and side B.
            pub fn configs(self) -> (Config, Config) {
                match self { $(Check::$variant => $configs,)* }
            }
        }

        /// Plays `side` of `check` on `end`, panicking if the channel misbehaves.
        pub fn run_side<T, R, D>(check: Check, side: Side, end: End<T, R, D>)
        where
            T: PacketTx + Send,
            R: PacketRx + Send,
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
fn until_closed<T: PacketTx, R: PacketRx, D: Doorbell>(ch: &Endpoint<T, R, D>) {
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
