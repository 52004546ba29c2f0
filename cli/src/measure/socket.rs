//! Baselines: the same exchanges over a Unix socketpair between two threads, with the
//! same payloads, the same batching and the same data check.

use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use super::{
    BATCH_BYTES, BATCH_PACKETS, Latency, MIN_SAMPLES, PING_BYTES, Plan, Throughput, nanos,
};
use crate::error::{DemoError, combine};
use crate::pattern::{self, RESPONSE, Tally};

/// Runs two sides on two threads and returns both results. A side that fails drops its
/// socket, which ends the other side's reads and writes, so neither waits forever.
fn run_pair<RA: Send, RB: Send>(
    a: impl FnOnce() -> Result<RA, DemoError> + Send,
    b: impl FnOnce() -> Result<RB, DemoError> + Send,
) -> Result<(RA, RB), DemoError> {
    thread::scope(|s| {
        let side_a = s.spawn(a);
        let side_b = s.spawn(b);
        let ra = side_a
            .join()
            .unwrap_or(Err(DemoError::ThreadPanicked("socket side A")));
        let rb = side_b
            .join()
            .unwrap_or(Err(DemoError::ThreadPanicked("socket side B")));
        combine(ra, rb)
    })
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean end of stream.
fn read_packet(r: &mut impl Read, buf: &mut [u8]) -> Result<bool, DemoError> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Checks packet `expect` into `tally`.
fn check_packet(expect: u64, buf: &[u8], tally: &mut Tally) {
    if pattern::check(expect, 0, buf) {
        tally.pass(buf.len());
    } else {
        tally.fail(buf.len(), || {
            format!(
                "socket packet {expect}: bad contents (first word says {:?})",
                pattern::claimed_seq(buf)
            )
        });
    }
}

/// Measures 64-byte write / 64-byte `read_exact` ping-pong round trips over a blocking
/// socketpair. Returns the latency and the check of every request and response.
pub fn latency(plan: &Plan) -> Result<(Latency, Tally), DemoError> {
    let (mut client, mut server) = UnixStream::pair()?;
    let ((samples, mut tally), server_tally) = run_pair(
        move || {
            let mut req = [0u8; PING_BYTES];
            let mut resp = [0u8; PING_BYTES];
            let mut tally = Tally::default();
            let mut samples = Vec::with_capacity(plan.max_samples);
            let mut deadline = None;
            let mut seq = 0u64;
            while samples.len() < plan.max_samples {
                pattern::fill(seq, 0, &mut req);
                let start = Instant::now();
                client.write_all(&req)?;
                client.read_exact(&mut resp)?;
                let end = Instant::now();
                check_packet(seq | RESPONSE, &resp, &mut tally);
                seq += 1;
                if seq > plan.warmup_blocking {
                    samples.push(nanos(end - start));
                    let deadline = *deadline.get_or_insert(end + plan.latency_budget);
                    if samples.len() >= MIN_SAMPLES && end >= deadline {
                        break;
                    }
                }
            }
            // Dropping the socket ends the server.
            Ok((samples, tally))
        },
        move || {
            let mut req = [0u8; PING_BYTES];
            let mut resp = [0u8; PING_BYTES];
            let mut tally = Tally::default();
            let mut seq = 0u64;
            while read_packet(&mut server, &mut req)? {
                check_packet(seq, &req, &mut tally);
                pattern::fill(seq | RESPONSE, 0, &mut resp);
                server.write_all(&resp)?;
                seq += 1;
            }
            Ok(tally)
        },
    )?;
    tally.merge(server_tally);
    let latency = Latency::from_samples(samples, None, "the socket latency run")?;
    Ok((latency, tally))
}

/// Streams packets of `size` bytes one way over a socketpair for the time budget; the
/// writer batches packets into one `write` by the ring's commit rule and the reader reads
/// through a buffer of the same size. Returns the throughput and the check.
pub fn stream(plan: &Plan, size: usize) -> Result<(Throughput, Tally), DemoError> {
    let (mut tx, rx) = UnixStream::pair()?;
    let start = Barrier::new(2);
    let (sent, (received, elapsed, mut tally)) = run_pair(
        || {
            let mut batch = vec![0u8; BATCH_BYTES.max(size)];
            start.wait();
            let deadline = Instant::now() + plan.stream_budget;
            let (mut seq, mut batch_packets, mut used) = (0u64, 0, 0);
            loop {
                if seq.is_multiple_of(64) && Instant::now() >= deadline {
                    break;
                }
                if used + size > batch.len() {
                    tx.write_all(&batch[..used])?;
                    (batch_packets, used) = (0, 0);
                }
                pattern::fill(seq, 0, &mut batch[used..used + size]);
                used += size;
                batch_packets += 1;
                seq += 1;
                if batch_packets >= BATCH_PACKETS || used >= BATCH_BYTES {
                    tx.write_all(&batch[..used])?;
                    (batch_packets, used) = (0, 0);
                }
            }
            tx.write_all(&batch[..used])?;
            // Closing the socket ends the reader's stream.
            drop(tx);
            Ok(seq)
        },
        || {
            let mut rx = BufReader::with_capacity(BATCH_BYTES, rx);
            let mut packet = vec![0u8; size];
            let mut tally = Tally::default();
            start.wait();
            let begin = Instant::now();
            let mut seq = 0u64;
            while read_packet(&mut rx, &mut packet)? {
                check_packet(seq, &packet, &mut tally);
                seq += 1;
            }
            let elapsed: Duration = begin.elapsed();
            Ok((seq, elapsed, tally))
        },
    )?;
    if sent != received {
        tally.mismatch(|| format!("{size}-byte socket stream: sent {sent}, received {received}"));
    }
    Ok((
        Throughput {
            packets: received,
            elapsed,
            signals: None,
        },
        tally,
    ))
}
