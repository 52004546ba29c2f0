//! vmlink measurements: two endpoints on two threads of this process, over a pair of
//! `HeapMem` rings (one each way) and a doorbell for each endpoint.

use std::hint;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use vmlink_ring::protocol::{PAGE_SIZE, PacketType};
use vmlink_ring::{HeapMem, PacketMeta, Reader, Signal, WaitDecision, WriteError, Writer};

use super::{
    BATCH_BYTES, BATCH_PACKETS, CHUNK, LATENCY_RING_BYTES, Latency, MIN_SAMPLES, PING_BYTES, Plan,
    STREAM_RING_BYTES, Throughput, nanos,
};
use crate::doorbell::Doorbell;
use crate::error::{DemoError, combine};
use crate::pattern::{self, END, RESPONSE, Tally};

/// How long a sleeping side waits before it looks at the ring again on its own. Wake-ups
/// come from doorbells; the timeout only bounds the damage of a peer that never signals.
const WAIT_TIMEOUT: Duration = Duration::from_millis(10);

/// Spins between two `yield_now` calls of a polling side. 64 spins take a few
/// microseconds: far longer than a round trip when each side has a core of its own, and
/// short enough that a side sharing its core with its peer (a busy machine) hands the core
/// over quickly.
const SPINS_PER_YIELD: u32 = 1 << 6;

/// How a reader waits for data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The reader masks interrupts and spins on the ring; writers never signal.
    Polling,
    /// The reader sleeps on its doorbell after `Reader::prepare_wait`; writers signal
    /// when a commit says so.
    Blocking,
}

impl Mode {
    /// Both modes, in the order they are reported.
    pub const ALL: [Mode; 2] = [Mode::Polling, Mode::Blocking];

    /// The mode's name in the table and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Polling => "polling",
            Mode::Blocking => "blocking",
        }
    }
}

/// The memory and doorbells of one channel: a ring from A to B, a ring from B to A, the
/// doorbell each side sleeps on, and a flag that tells a side its peer has failed.
struct Channel {
    /// The ring A writes and B reads.
    a_to_b: HeapMem,
    /// The ring B writes and A reads.
    b_to_a: HeapMem,
    /// Rung by B, slept on by A.
    bell_a: Doorbell,
    /// Rung by A, slept on by B.
    bell_b: Doorbell,
    /// Set when either side stops with an error, so the other stops waiting.
    failed: AtomicBool,
}

impl Channel {
    /// A channel whose rings have data areas of the given sizes.
    fn new(a_to_b_bytes: usize, b_to_a_bytes: usize) -> Result<Self, DemoError> {
        Ok(Self {
            a_to_b: HeapMem::new(a_to_b_bytes)?,
            b_to_a: HeapMem::new(b_to_a_bytes)?,
            bell_a: Doorbell::new(),
            bell_b: Doorbell::new(),
            failed: AtomicBool::new(false),
        })
    }

    /// Attaches both endpoints.
    fn endpoints(&self, mode: Mode) -> Result<(Endpoint<'_>, Endpoint<'_>), DemoError> {
        let a = Endpoint::new(
            self,
            &self.a_to_b,
            &self.b_to_a,
            &self.bell_a,
            &self.bell_b,
            mode,
        )?;
        let b = Endpoint::new(
            self,
            &self.b_to_a,
            &self.a_to_b,
            &self.bell_b,
            &self.bell_a,
            mode,
        )?;
        Ok((a, b))
    }

    /// Runs side A and side B on two threads and returns both results. If either fails
    /// (or panics), the other is told to stop, so neither waits forever.
    fn run_pair<RA, RB>(
        &self,
        a: impl FnOnce() -> Result<RA, DemoError> + Send,
        b: impl FnOnce() -> Result<RB, DemoError> + Send,
    ) -> Result<(RA, RB), DemoError>
    where
        RA: Send,
        RB: Send,
    {
        thread::scope(|s| {
            let side_a = s.spawn(|| self.guarded(a));
            let side_b = s.spawn(|| self.guarded(b));
            let ra = side_a
                .join()
                .unwrap_or(Err(DemoError::ThreadPanicked("vmlink side A")));
            let rb = side_b
                .join()
                .unwrap_or(Err(DemoError::ThreadPanicked("vmlink side B")));
            combine(ra, rb)
        })
    }

    /// Runs one side; if it does not return `Ok`, marks the channel failed.
    fn guarded<R>(&self, side: impl FnOnce() -> Result<R, DemoError>) -> Result<R, DemoError> {
        let mut guard = FailOnDrop {
            channel: self,
            armed: true,
        };
        let result = side();
        guard.armed = result.is_err();
        result
    }
}

/// Marks a channel failed and wakes both sides when dropped while armed: on an error
/// return, and on a panic.
struct FailOnDrop<'a> {
    /// The channel to mark.
    channel: &'a Channel,
    /// Whether dropping marks it.
    armed: bool,
}

impl Drop for FailOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.channel.failed.store(true, Ordering::SeqCst);
            self.channel.bell_a.ring();
            self.channel.bell_b.ring();
        }
    }
}

/// What [`Endpoint::recv`] received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Received {
    /// A data packet (checked and tallied).
    Data,
    /// The packet that ends the run.
    End,
}

/// One side of a channel: the writer of its outgoing ring, the reader of its incoming
/// ring, and the doorbells.
struct Endpoint<'a> {
    /// Writes the outgoing ring.
    tx: Writer<&'a HeapMem>,
    /// Reads the incoming ring.
    rx: Reader<&'a HeapMem>,
    /// The doorbell this side sleeps on.
    bell: &'a Doorbell,
    /// The doorbell the peer sleeps on.
    peer_bell: &'a Doorbell,
    /// Set when the peer has failed.
    failed: &'a AtomicBool,
    /// How this side waits for data.
    mode: Mode,
    /// Signals this side sent (commits whose `Signal` was needed).
    signals: u64,
}

impl<'a> Endpoint<'a> {
    /// Attaches to `outgoing` as writer and `incoming` as reader; a polling endpoint masks
    /// its interrupts.
    fn new(
        channel: &'a Channel,
        outgoing: &'a HeapMem,
        incoming: &'a HeapMem,
        bell: &'a Doorbell,
        peer_bell: &'a Doorbell,
        mode: Mode,
    ) -> Result<Self, DemoError> {
        let mut rx = Reader::new(incoming)?;
        if mode == Mode::Polling {
            rx.mask_interrupts();
        }
        Ok(Self {
            tx: Writer::new(outgoing)?,
            rx,
            bell,
            peer_bell,
            failed: &channel.failed,
            mode,
            signals: 0,
        })
    }

    /// Rings the peer's doorbell if a commit said so.
    fn notify(&mut self, signal: Signal) {
        if signal.is_needed() {
            self.signals += 1;
            self.peer_bell.ring();
        }
    }

    /// Fails if the peer has failed.
    fn check_peer(&self) -> Result<(), DemoError> {
        if self.failed.load(Ordering::Relaxed) {
            Err(DemoError::PeerFailed)
        } else {
            Ok(())
        }
    }

    /// Publishes every packet written since the last flush, signalling if needed.
    fn flush(&mut self) {
        let signal = self.tx.commit();
        self.notify(signal);
    }

    /// Publishes the read index for every packet received since the last release,
    /// signalling a writer that waits for that space.
    fn release(&mut self) {
        let signal = self.rx.commit();
        self.notify(signal);
    }

    /// Waits until the incoming ring holds data: spinning when polling, sleeping on the
    /// doorbell after `prepare_wait` when blocking.
    fn wait_readable(&mut self) -> Result<(), DemoError> {
        let mut spins = 0u32;
        loop {
            if self.rx.available()? > 0 {
                return Ok(());
            }
            self.check_peer()?;
            match self.mode {
                Mode::Polling => {
                    spins = spins.wrapping_add(1);
                    if spins.is_multiple_of(SPINS_PER_YIELD) {
                        thread::yield_now();
                    } else {
                        hint::spin_loop();
                    }
                }
                Mode::Blocking => {
                    let (decision, signal) = self.rx.prepare_wait()?;
                    self.notify(signal);
                    if decision == WaitDecision::Sleep {
                        self.bell.wait(WAIT_TIMEOUT);
                    }
                }
            }
        }
    }

    /// Waits until a packet with `payload` bytes fits in the outgoing ring: publishes what
    /// is pending, sets `pending_send_size` and sleeps on the doorbell, looking again at
    /// least every [`WAIT_TIMEOUT`].
    fn wait_writable(&mut self, payload: usize) -> Result<(), DemoError> {
        loop {
            self.check_peer()?;
            let (decision, signal) = self.tx.prepare_wait(0, payload)?;
            self.notify(signal);
            match decision {
                WaitDecision::Ready => return Ok(()),
                WaitDecision::Sleep => {
                    self.bell.wait(WAIT_TIMEOUT);
                }
            }
        }
    }

    /// Writes packet `seq` with `size` payload bytes in place (reserve, then fill the
    /// payload chunk by chunk), waiting for space if the ring is full. The packet is
    /// published by the next [`flush`](Self::flush).
    fn send(&mut self, seq: u64, size: usize, scratch: &mut [u8]) -> Result<(), DemoError> {
        loop {
            match self.tx.reserve(PacketMeta::in_band(), 0, size) {
                Ok(mut slot) => {
                    let mut offset = 0;
                    while offset < size {
                        let n = (size - offset).min(scratch.len());
                        let chunk = &mut scratch[..n];
                        pattern::fill(seq, offset / 8, chunk);
                        slot.write_payload(offset, chunk)?;
                        offset += n;
                    }
                    slot.finish();
                    return Ok(());
                }
                Err(WriteError::Full { .. }) => self.wait_writable(size)?,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Receives the next packet, expecting packet `expect` (or the end packet) with `size`
    /// payload bytes, and checks every byte of it into `tally`. The packet is consumed;
    /// the next [`release`](Self::release) publishes that.
    fn recv(
        &mut self,
        expect: u64,
        size: usize,
        scratch: &mut [u8],
        tally: &mut Tally,
    ) -> Result<Received, DemoError> {
        loop {
            self.wait_readable()?;
            let Some(packet) = self.rx.peek()? else {
                continue;
            };
            let info = *packet.info();
            if info.packet_type() != PacketType::InBand || info.payload_len() != size {
                packet.consume();
                tally.fail(info.payload_len(), || {
                    format!(
                        "packet {expect}: expected an in-band packet of {size} bytes, got {:?} of {}",
                        info.packet_type(), info.payload_len()
                    )
                });
                return Ok(Received::Data);
            }
            let mut claimed = None;
            let mut ok = true;
            let mut offset = 0;
            while offset < size {
                let n = (size - offset).min(scratch.len());
                let chunk = &mut scratch[..n];
                packet.read_payload(offset, chunk)?;
                let seq = *claimed.get_or_insert_with(|| pattern::claimed_seq(chunk));
                ok &= seq.is_some_and(|seq| pattern::check(seq, offset / 8, chunk));
                offset += n;
            }
            packet.consume();
            let claimed = claimed.flatten();
            let received = if claimed == Some(END) {
                Received::End
            } else {
                ok &= claimed == Some(expect);
                Received::Data
            };
            if ok {
                tally.pass(size);
            } else {
                tally.fail(size, || {
                    format!("packet {expect}: bad contents (first word says {claimed:?})")
                });
            }
            return Ok(received);
        }
    }
}

/// Measures 64-byte request / 64-byte response round trips in `mode`. Returns the latency
/// and the check of every request and response.
pub fn latency(plan: &Plan, mode: Mode) -> Result<(Latency, Tally), DemoError> {
    let channel = Channel::new(LATENCY_RING_BYTES, LATENCY_RING_BYTES)?;
    let (mut client, mut server) = channel.endpoints(mode)?;
    let warmup = match mode {
        Mode::Polling => plan.warmup_polling,
        Mode::Blocking => plan.warmup_blocking,
    };
    let ((samples, round_trips, client_tally, client_signals), (server_tally, server_signals)) =
        channel.run_pair(
            || ping_client(&mut client, plan, warmup),
            || ping_server(&mut server),
        )?;
    let mut tally = client_tally;
    tally.merge(server_tally);
    let signals = (client_signals + server_signals) as f64 / round_trips.max(1) as f64;
    let what = match mode {
        Mode::Polling => "the polling latency run",
        Mode::Blocking => "the blocking latency run",
    };
    Ok((Latency::from_samples(samples, Some(signals), what)?, tally))
}

/// The requesting side of a latency run: sends request `i`, waits for response `i`, and
/// times each round trip after `warmup` until the time budget is spent. Returns the
/// samples in nanoseconds, the number of round trips, its check and its signal count.
fn ping_client(
    ep: &mut Endpoint<'_>,
    plan: &Plan,
    warmup: u64,
) -> Result<(Vec<u64>, u64, Tally, u64), DemoError> {
    let mut scratch = vec![0u8; CHUNK];
    let mut tally = Tally::default();
    let mut samples = Vec::with_capacity(plan.max_samples);
    let mut deadline = None;
    let mut seq = 0u64;
    while samples.len() < plan.max_samples {
        let start = Instant::now();
        ep.send(seq, PING_BYTES, &mut scratch)?;
        ep.flush();
        let received = ep.recv(seq | RESPONSE, PING_BYTES, &mut scratch, &mut tally)?;
        let end = Instant::now();
        ep.release();
        if received == Received::End {
            tally.mismatch(|| format!("round trip {seq}: the server ended the run"));
        }
        seq += 1;
        if seq > warmup {
            samples.push(nanos(end - start));
            let deadline = *deadline.get_or_insert(end + plan.latency_budget);
            if samples.len() >= MIN_SAMPLES && end >= deadline {
                break;
            }
        }
    }
    ep.send(END, PING_BYTES, &mut scratch)?;
    ep.flush();
    Ok((samples, seq, tally, ep.signals))
}

/// The answering side of a latency run: answers request `i` with response `i` until the
/// end packet. Returns its check and its signal count.
fn ping_server(ep: &mut Endpoint<'_>) -> Result<(Tally, u64), DemoError> {
    let mut scratch = vec![0u8; CHUNK];
    let mut tally = Tally::default();
    let mut seq = 0u64;
    loop {
        let received = ep.recv(seq, PING_BYTES, &mut scratch, &mut tally)?;
        if received == Received::End {
            ep.release();
            return Ok((tally, ep.signals));
        }
        ep.send(seq | RESPONSE, PING_BYTES, &mut scratch)?;
        ep.flush();
        ep.release();
        seq += 1;
    }
}

/// Streams packets of `size` payload bytes one way for the time budget, readers blocking,
/// commits batched. Returns the throughput and the check of every packet.
pub fn stream(plan: &Plan, size: usize) -> Result<(Throughput, Tally), DemoError> {
    // The return ring carries nothing here; it only completes the channel.
    let channel = Channel::new(STREAM_RING_BYTES, PAGE_SIZE)?;
    let (mut writer, mut reader) = channel.endpoints(Mode::Blocking)?;
    let start = Barrier::new(2);
    let ((sent, writer_signals), (received, elapsed, mut tally, reader_signals)) = channel
        .run_pair(
            || stream_writer(&mut writer, plan, size, &start),
            || stream_reader(&mut reader, size, &start),
        )?;
    if sent != received {
        tally.mismatch(|| format!("{size}-byte stream: sent {sent} packets, received {received}"));
    }
    Ok((
        Throughput {
            packets: received,
            elapsed,
            signals: Some(writer_signals + reader_signals),
        },
        tally,
    ))
}

/// True when a batch of `packets` packets and `bytes` payload bytes is due for a commit.
fn batch_full(packets: usize, bytes: usize) -> bool {
    packets >= BATCH_PACKETS || bytes >= BATCH_BYTES
}

/// The sending side of a stream: writes packets until the budget is spent, then the end
/// packet. Returns the data packets sent and its signal count.
fn stream_writer(
    ep: &mut Endpoint<'_>,
    plan: &Plan,
    size: usize,
    start: &Barrier,
) -> Result<(u64, u64), DemoError> {
    let mut scratch = vec![0u8; CHUNK];
    start.wait();
    let deadline = Instant::now() + plan.stream_budget;
    let (mut seq, mut batch_packets, mut batch_bytes) = (0u64, 0, 0);
    loop {
        if seq.is_multiple_of(64) && Instant::now() >= deadline {
            break;
        }
        ep.send(seq, size, &mut scratch)?;
        seq += 1;
        batch_packets += 1;
        batch_bytes += size;
        if batch_full(batch_packets, batch_bytes) {
            ep.flush();
            (batch_packets, batch_bytes) = (0, 0);
        }
    }
    ep.send(END, size, &mut scratch)?;
    ep.flush();
    Ok((seq, ep.signals))
}

/// The receiving side of a stream: checks packets until the end packet. Returns the data
/// packets received, the time from the start until the end packet, its check and its
/// signal count.
fn stream_reader(
    ep: &mut Endpoint<'_>,
    size: usize,
    start: &Barrier,
) -> Result<(u64, Duration, Tally, u64), DemoError> {
    let mut scratch = vec![0u8; CHUNK];
    let mut tally = Tally::default();
    start.wait();
    let begin = Instant::now();
    let (mut seq, mut batch_packets, mut batch_bytes) = (0u64, 0, 0);
    while ep.recv(seq, size, &mut scratch, &mut tally)? == Received::Data {
        seq += 1;
        batch_packets += 1;
        batch_bytes += size;
        if batch_full(batch_packets, batch_bytes) {
            ep.release();
            (batch_packets, batch_bytes) = (0, 0);
        }
    }
    let elapsed = begin.elapsed();
    ep.release();
    Ok((seq, elapsed, tally, ep.signals))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmlink_ring::OutgoingPacket;

    #[test]
    fn recv_checks_sequence_and_every_byte() -> Result<(), DemoError> {
        let channel = Channel::new(PAGE_SIZE * 4, PAGE_SIZE)?;
        let (mut a, mut b) = channel.endpoints(Mode::Polling)?;
        let mut scratch = vec![0u8; CHUNK];
        let mut tally = Tally::default();

        // In order, intact: passes.
        a.send(0, 64, &mut scratch)?;
        a.flush();
        assert_eq!(b.recv(0, 64, &mut scratch, &mut tally)?, Received::Data);
        assert_eq!((tally.packets, tally.mismatches), (1, 0));

        // Intact but out of sequence: fails.
        a.send(7, 64, &mut scratch)?;
        a.flush();
        assert_eq!(b.recv(1, 64, &mut scratch, &mut tally)?, Received::Data);
        assert_eq!(tally.mismatches, 1);

        // One byte flipped: fails.
        let mut bad = [0u8; 64];
        pattern::fill(2, 0, &mut bad);
        bad[40] ^= 1;
        let signal = a.tx.write(&OutgoingPacket::in_band(&[&bad]))?;
        a.notify(signal);
        assert_eq!(b.recv(2, 64, &mut scratch, &mut tally)?, Received::Data);
        assert_eq!(tally.mismatches, 2);

        // The wrong size: fails. The end packet is recognised and checked.
        a.send(3, 128, &mut scratch)?;
        a.send(END, 64, &mut scratch)?;
        a.flush();
        assert_eq!(b.recv(3, 64, &mut scratch, &mut tally)?, Received::Data);
        assert_eq!(b.recv(4, 64, &mut scratch, &mut tally)?, Received::End);
        assert_eq!((tally.packets, tally.mismatches), (5, 3));
        Ok(())
    }

    #[test]
    fn full_ring_waits_for_the_reader() -> Result<(), DemoError> {
        // A 4 KiB ring holds only a few 1 KiB packets: the writer must wait for space.
        let channel = Channel::new(PAGE_SIZE, PAGE_SIZE)?;
        let (mut a, mut b) = channel.endpoints(Mode::Blocking)?;
        let count = 200u64;
        let (_, tally) = channel.run_pair(
            || {
                let mut scratch = vec![0u8; CHUNK];
                for seq in 0..count {
                    a.send(seq, 1024, &mut scratch)?;
                    a.flush();
                }
                a.send(END, 1024, &mut scratch)?;
                a.flush();
                Ok(())
            },
            || {
                let mut scratch = vec![0u8; CHUNK];
                let mut tally = Tally::default();
                let mut seq = 0;
                while b.recv(seq, 1024, &mut scratch, &mut tally)? == Received::Data {
                    seq += 1;
                    b.release();
                }
                b.release();
                Ok(tally)
            },
        )?;
        assert_eq!((tally.packets, tally.mismatches), (count + 1, 0));
        Ok(())
    }
}
