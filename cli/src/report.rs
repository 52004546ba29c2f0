//! Output: the results as a readable table, or as JSON.

use std::fmt::Write as _;

use crate::demo::{
    CONTROL_RING_BYTES, FILE_CHUNK, FILE_SLOTS, FileCopy, FileRow, LatencyRow, Mode, PING_BYTES,
    POLLING_SPINS, RECV_BATCH, Results, SECURE_RING_BYTES, SECURE_STREAM_BYTES, SOCKET_BUFFER,
    SecureRow, Throughput, ThroughputRow, packets_per_commit,
};

/// A duration in whole nanoseconds, saturating.
fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A time in nanoseconds with a readable unit: `312 ns`, `18.3 µs`, `1.25 ms`.
fn time(ns: u64) -> String {
    let ns_f = ns as f64;
    if ns < 1_000 {
        format!("{ns} ns")
    } else if ns < 1_000_000 {
        format!("{:.2} µs", ns_f / 1e3)
    } else {
        format!("{:.2} ms", ns_f / 1e6)
    }
}

/// A rate with a metric prefix: `850 k`, `12.3 M`.
fn rate(per_s: f64) -> String {
    if per_s >= 1e6 {
        format!("{:.2} M", per_s / 1e6)
    } else if per_s >= 1e3 {
        format!("{:.1} k", per_s / 1e3)
    } else {
        format!("{per_s:.0}")
    }
}

/// A byte count with a binary unit: `64 B`, `4 KiB`, `1 MiB`.
fn size(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

/// How many times faster `ours` is than `theirs` (times, lower is better), e.g. `3.2x`.
fn speedup(theirs: f64, ours: f64) -> f64 {
    theirs / ours
}

/// The latency speedup of a row at the median.
fn latency_speedup_p50(row: &LatencyRow) -> f64 {
    speedup(row.socket.p50_ns as f64, row.vmlink.p50_ns as f64)
}

/// The latency speedup of a row at the 99th percentile.
fn latency_speedup_p99(row: &LatencyRow) -> f64 {
    speedup(row.socket.p99_ns as f64, row.vmlink.p99_ns as f64)
}

/// The throughput speedup of a row (vmlink packets/s over socket packets/s).
fn throughput_speedup(row: &ThroughputRow) -> f64 {
    row.vmlink.packets_per_s() / row.socket.packets_per_s()
}

/// The results as the table the demo prints.
pub fn table(r: &Results) -> String {
    let mut out = String::new();
    // Writing to a `String` cannot fail.
    let _ = write_table(&mut out, r);
    out
}

/// A share as a whole percentage, `?` when unknown.
fn percent(share: Option<f64>) -> String {
    share.map_or_else(|| "?".to_owned(), |s| format!("{:.0}%", s * 100.0))
}

/// Why a latency row's numbers are what they are, in one line.
fn latency_why(row: &LatencyRow, spin: std::time::Duration) -> String {
    let signals = row.vmlink.signals_per_round_trip.unwrap_or(0.0);
    let waits = if signals < 0.5 {
        "replies came within the spin, nobody slept"
    } else {
        "waits ended asleep, woken by the doorbell"
    };
    match row.mode {
        Mode::Blocking if spin.is_zero() => format!(
            "each side sleeps on its eventfd at once and the reply's doorbell wakes it \
             ({signals:.2} signals/rt), as each socket read sleeps until the write wakes it"
        ),
        Mode::Blocking => format!(
            "the channel's default wait: spin up to a wake-up's cost (at most {} µs), then \
             sleep; {signals:.2} signals/rt: {waits}; each socket read sleeps until the write \
             wakes it",
            spin.as_micros()
        ),
        Mode::Polling => format!(
            "receivers look {POLLING_SPINS} times (signals masked) before sleeping: a reply is \
             a cache line written on one CPU and read on the other; {signals:.2} signals/rt"
        ),
    }
}

/// The share of the time on CPU from which a side counts as the one that sets the rate.
const BOUND: f64 = 0.85;

/// Why a streaming row's numbers are what they are, in one line.
fn throughput_why(row: &ThroughputRow) -> String {
    let per_commit = packets_per_commit(row.packet_bytes);
    let limit = |t: &Throughput, unit: &str| match t.busier() {
        Some((sender, busy, ns)) if busy >= BOUND => format!(
            ", so the {} sets the rate at {ns:.0} ns of CPU per {unit}",
            if sender { "sender" } else { "receiver" }
        ),
        Some(_) => ", neither always running (waits, or other work on the CPUs)".to_owned(),
        None => String::new(),
    };
    format!(
        "vmlink: {per_commit} per commit, up to {RECV_BATCH} per receive, sender on CPU {}, \
         receiver {}{}; socket: {} writes, {} and {}{}",
        percent(row.vmlink.sender_busy()),
        percent(row.vmlink.receiver_busy()),
        limit(&row.vmlink, "packet"),
        size(SOCKET_BUFFER),
        percent(row.socket.sender_busy()),
        percent(row.socket.receiver_busy()),
        limit(&row.socket, "frame"),
    )
}

/// The measured copies' times in milliseconds, space-separated, in the order they ran.
fn copy_times(copy: &FileCopy) -> String {
    let times: Vec<String> = copy
        .times
        .iter()
        .map(|t| format!("{:.0}", t.as_secs_f64() * 1e3))
        .collect();
    times.join(" ")
}

/// Why the file row's numbers are what they are, in one line.
fn file_why(f: &FileRow) -> String {
    format!(
        "{FILE_SLOTS} chunks in flight in GPA-direct packets; the host copies each out of the \
         named pages and writes it, the socket adds a copy into and out of the kernel; copies \
         (ms): vmlink {}, socket {}",
        copy_times(&f.vmlink),
        copy_times(&f.socket),
    )
}

/// Writes the table into `out`.
fn write_table(out: &mut String, r: &Results) -> std::fmt::Result {
    writeln!(
        out,
        "vmlink demo: a host process and a guest process it spawned, over vmlink-shm \
         (sealed memfd, eventfd doorbells)"
    )?;
    write!(out, "machine: {} CPUs", r.machine.cpus)?;
    if let Some(load) = r.machine.load_average {
        write!(out, ", load average {load:.2} before the run")?;
        if r.machine.busy() {
            write!(out, " (busy: expect noisy numbers)")?;
        }
    }
    writeln!(out)?;
    writeln!(out)?;
    writeln!(
        out,
        "Round-trip latency, {PING_BYTES} B request + {PING_BYTES} B completion"
    )?;
    writeln!(
        out,
        "  {:<9} {:>8}  {:>11}  {:>11}  {:>10}  {:>11}  {:>11}  {:>8}",
        "mode",
        "samples",
        "vmlink p50",
        "vmlink p99",
        "signals/rt",
        "socket p50",
        "socket p99",
        "speedup"
    )?;
    for row in &r.latency {
        writeln!(
            out,
            "  {:<9} {:>8}  {:>11}  {:>11}  {:>10.2}  {:>11}  {:>11}  {:>7.1}x",
            row.mode.name(),
            row.vmlink.samples,
            time(row.vmlink.p50_ns),
            time(row.vmlink.p99_ns),
            row.vmlink.signals_per_round_trip.unwrap_or(0.0),
            time(row.socket.p50_ns),
            time(row.socket.p99_ns),
            latency_speedup_p50(row),
        )?;
        writeln!(out, "    {}", latency_why(row, r.spin_before_sleep))?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "Streaming guest -> host, {} rings, {} rounds of {} ms each way, vmlink and socket \
         alternating",
        size(CONTROL_RING_BYTES as usize),
        r.plan.stream_rounds,
        r.plan.stream_budget.as_millis(),
    )?;
    writeln!(
        out,
        "  {:<9} {:>8}  {:>12}  {:>11}  {:>11}  {:>12}  {:>11}  {:>8}",
        "packet",
        "packets",
        "vmlink pkt/s",
        "vmlink GB/s",
        "signals/pkt",
        "socket pkt/s",
        "socket GB/s",
        "speedup"
    )?;
    for row in &r.throughput {
        writeln!(
            out,
            "  {:<9} {:>8}  {:>12}  {:>11.2}  {:>11.4}  {:>12}  {:>11.2}  {:>7.1}x",
            size(row.packet_bytes),
            row.vmlink.packets,
            rate(row.vmlink.packets_per_s()),
            row.vmlink.gb_per_s(row.packet_bytes),
            row.vmlink.signals_per_packet().unwrap_or(0.0),
            rate(row.socket.packets_per_s()),
            row.socket.gb_per_s(row.packet_bytes),
            throughput_speedup(row),
        )?;
        writeln!(out, "    {}", throughput_why(row))?;
    }
    writeln!(out)?;
    let f = &r.file;
    writeln!(
        out,
        "File copy guest -> host page cache, {} in {} chunks, median of {} copies each way \
         (alternating, after one unmeasured)",
        size(f.bytes as usize),
        size(FILE_CHUNK),
        r.plan.file_rounds,
    )?;
    writeln!(
        out,
        "  {:<9} {:>12}  {:>11}  {:>12}  {:>11}  {:>8}  {:<18}  check",
        "", "vmlink time", "vmlink GB/s", "socket time", "socket GB/s", "speedup", "hash"
    )?;
    writeln!(
        out,
        "  {:<9} {:>12}  {:>11.2}  {:>12}  {:>11.2}  {:>7.1}x  {:#018x}  {}",
        "file",
        time(nanos(f.vmlink.elapsed())),
        f.vmlink.gb_per_s(f.bytes),
        time(nanos(f.socket.elapsed())),
        f.socket.gb_per_s(f.bytes),
        speedup(
            f.socket.elapsed().as_secs_f64(),
            f.vmlink.elapsed().as_secs_f64()
        ),
        f.vmlink.hash,
        if f.vmlink.verified && f.socket.verified {
            "ok (both sides)"
        } else {
            "FAILED"
        },
    )?;
    writeln!(out, "    {}", file_why(f))?;
    writeln!(out)?;
    if let Some(sec) = &r.secure {
        write_secure(out, sec, r.plan.stream_rounds.max(2))?;
    }
    writeln!(
        out,
        "socket: a Unix stream socket between the same two processes, blocking, same payloads \
         and checks"
    )?;
    writeln!(
        out,
        "speedup: socket time / vmlink time (latency at the median, streams over all rounds); \
         above 1 means vmlink is faster"
    )?;
    writeln!(
        out,
        "signals: doorbell rings (eventfd writes), both processes; on CPU: the thread's run \
         time / the wall time; hash: 64-bit FNV-1a over words"
    )?;
    writeln!(out)?;
    let check = &r.vmlink_check;
    write!(
        out,
        "verified {} packets, {} bytes through vmlink",
        check.packets, check.bytes
    )?;
    writeln!(
        out,
        " (and {} packets through the socket): {} mismatches",
        r.socket_check.packets,
        r.mismatches()
    )?;
    if let Some(first) = r.first_mismatch() {
        writeln!(out, "DATA CHECK FAILED; first mismatch: {first}")?;
    }
    Ok(())
}

/// A cipher's full name.
fn cipher_name(cipher: vmlink_secure::Cipher) -> &'static str {
    match cipher {
        vmlink_secure::Cipher::ChaChaPoly => "ChaCha20-Poly1305",
        vmlink_secure::Cipher::AesGcm => "AES-256-GCM",
    }
}

/// Writes the secure comparison's section into `out`.
fn write_secure(out: &mut String, sec: &SecureRow, rounds: usize) -> std::fmt::Result {
    writeln!(
        out,
        "Secure channel: a Noise XX handshake with key files ({}), then {} on every packet",
        time(nanos(sec.handshake)),
        cipher_name(sec.cipher),
    )?;
    writeln!(
        out,
        "  guest key {} ({})",
        sec.guest_key,
        if sec.guest_key_expected {
            "the key written for the guest, authorized by the host"
        } else {
            "NOT the key written for the guest"
        }
    )?;
    writeln!(
        out,
        "  the same polling channel ({} rings) without and with the secure layer, {rounds} \
         rounds each, alternating which goes first",
        size(SECURE_RING_BYTES as usize),
    )?;
    writeln!(
        out,
        "  {:<22} {:>12}  {:>12}  {:>12}",
        "", "plain", "secure", "secure/plain"
    )?;
    let (p, s) = (&sec.plain_latency, &sec.secure_latency);
    for (what, plain, secure) in [
        ("round trip p50", p.p50_ns, s.p50_ns),
        ("round trip p99", p.p99_ns, s.p99_ns),
    ] {
        writeln!(
            out,
            "  {:<22} {:>12}  {:>12}  {:>11.2}x",
            format!("{PING_BYTES} B {what}"),
            time(plain),
            time(secure),
            secure as f64 / plain.max(1) as f64,
        )?;
    }
    let gb = |t: &Throughput| format!("{:.2} GB/s", t.gb_per_s(SECURE_STREAM_BYTES));
    writeln!(
        out,
        "  {:<22} {:>12}  {:>12}  {:>11.2}x",
        format!("{} stream", size(SECURE_STREAM_BYTES)),
        gb(&sec.plain_stream),
        gb(&sec.secure_stream),
        sec.stream_ratio(),
    )?;
    writeln!(
        out,
        "    every packet of the secure channel is sealed by the sender and copied out, \
         verified and decrypted by the receiver; the ring's descriptors stay plaintext"
    )?;
    writeln!(out)
}

/// The secure comparison as a JSON object, or `null`.
fn secure_json(r: &Results) -> String {
    let Some(sec) = &r.secure else {
        return "null".to_owned();
    };
    format!(
        concat!(
            "{{\"cipher\":{},\"handshake_ns\":{},\"guest_key\":{},\"guest_key_expected\":{},",
            "\"plain_p50_ns\":{},\"plain_p99_ns\":{},\"secure_p50_ns\":{},\"secure_p99_ns\":{},",
            "\"latency_ratio_p50\":{},\"stream_packet_bytes\":{},",
            "\"plain_stream_packets\":{},\"secure_stream_packets\":{},",
            "\"plain_gb_per_s\":{},\"secure_gb_per_s\":{},\"stream_ratio\":{}}}"
        ),
        string(cipher_name(sec.cipher)),
        nanos(sec.handshake),
        string(&sec.guest_key),
        sec.guest_key_expected,
        sec.plain_latency.p50_ns,
        sec.plain_latency.p99_ns,
        sec.secure_latency.p50_ns,
        sec.secure_latency.p99_ns,
        num(sec.latency_ratio()),
        SECURE_STREAM_BYTES,
        sec.plain_stream.packets,
        sec.secure_stream.packets,
        num(sec.plain_stream.gb_per_s(SECURE_STREAM_BYTES)),
        num(sec.secure_stream.gb_per_s(SECURE_STREAM_BYTES)),
        num(sec.stream_ratio()),
    )
}

/// A JSON number, or `null` when it is not finite.
fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        "null".to_owned()
    }
}

/// A JSON number for an optional value.
fn opt_num(x: Option<f64>) -> String {
    x.map_or_else(|| "null".to_owned(), num)
}

/// A JSON string literal.
pub fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The results as one JSON object (with a trailing newline).
pub fn json(r: &Results, quick: bool) -> String {
    let latency: Vec<String> = r
        .latency
        .iter()
        .map(|row| {
            format!(
                concat!(
                    "{{\"mode\":{},\"payload_bytes\":{},\"samples\":{},",
                    "\"vmlink_p50_ns\":{},\"vmlink_p99_ns\":{},\"signals_per_round_trip\":{},",
                    "\"socket_samples\":{},\"socket_p50_ns\":{},\"socket_p99_ns\":{},",
                    "\"speedup_p50\":{},\"speedup_p99\":{},\"why\":{}}}"
                ),
                string(row.mode.name()),
                PING_BYTES,
                row.vmlink.samples,
                row.vmlink.p50_ns,
                row.vmlink.p99_ns,
                opt_num(row.vmlink.signals_per_round_trip),
                row.socket.samples,
                row.socket.p50_ns,
                row.socket.p99_ns,
                num(latency_speedup_p50(row)),
                num(latency_speedup_p99(row)),
                string(&latency_why(row, r.spin_before_sleep)),
            )
        })
        .collect();
    let throughput: Vec<String> = r
        .throughput
        .iter()
        .map(|row| {
            format!(
                concat!(
                    "{{\"packet_bytes\":{},\"vmlink_packets\":{},\"vmlink_seconds\":{},",
                    "\"vmlink_packets_per_s\":{},\"vmlink_gb_per_s\":{},",
                    "\"signals\":{},\"signals_per_packet\":{},",
                    "\"socket_packets\":{},\"socket_seconds\":{},",
                    "\"socket_packets_per_s\":{},\"socket_gb_per_s\":{},\"speedup\":{},",
                    "\"rounds\":{},\"packets_per_commit\":{},\"receive_batch\":{},",
                    "\"vmlink_sender_busy\":{},\"vmlink_receiver_busy\":{},",
                    "\"socket_sender_busy\":{},\"socket_receiver_busy\":{},\"why\":{}}}"
                ),
                row.packet_bytes,
                row.vmlink.packets,
                num(row.vmlink.elapsed.as_secs_f64()),
                num(row.vmlink.packets_per_s()),
                num(row.vmlink.gb_per_s(row.packet_bytes)),
                row.vmlink
                    .signals
                    .map_or_else(|| "null".to_owned(), |s| s.to_string()),
                opt_num(row.vmlink.signals_per_packet()),
                row.socket.packets,
                num(row.socket.elapsed.as_secs_f64()),
                num(row.socket.packets_per_s()),
                num(row.socket.gb_per_s(row.packet_bytes)),
                num(throughput_speedup(row)),
                r.plan.stream_rounds,
                packets_per_commit(row.packet_bytes),
                RECV_BATCH,
                opt_num(row.vmlink.sender_busy()),
                opt_num(row.vmlink.receiver_busy()),
                opt_num(row.socket.sender_busy()),
                opt_num(row.socket.receiver_busy()),
                string(&throughput_why(row)),
            )
        })
        .collect();
    format!(
        concat!(
            "{{\"quick\":{},\"cpus\":{},\"load_average\":{},\"spin_before_sleep_ns\":{},",
            "\"latency\":[{}],\"throughput\":[{}],\"file\":{},\"secure\":{},",
            "\"verified_packets\":{},\"verified_bytes\":{},",
            "\"socket_verified_packets\":{},\"socket_verified_bytes\":{},",
            "\"mismatches\":{},\"first_mismatch\":{}}}\n"
        ),
        quick,
        r.machine.cpus,
        opt_num(r.machine.load_average),
        nanos(r.spin_before_sleep),
        latency.join(","),
        throughput.join(","),
        file_json(r),
        secure_json(r),
        r.vmlink_check.packets,
        r.vmlink_check.bytes,
        r.socket_check.packets,
        r.socket_check.bytes,
        r.mismatches(),
        r.first_mismatch().map_or_else(|| "null".to_owned(), string),
    )
}

/// The file copy as a JSON object.
fn file_json(r: &Results) -> String {
    let f = &r.file;
    format!(
        concat!(
            "{{\"bytes\":{},\"chunk_bytes\":{},\"vmlink_seconds\":{},\"vmlink_gb_per_s\":{},",
            "\"socket_seconds\":{},\"socket_gb_per_s\":{},\"speedup\":{},",
            "\"rounds\":{},\"chunks_in_flight\":{},",
            "\"vmlink_runs_seconds\":[{}],\"socket_runs_seconds\":[{}],",
            "\"hash\":\"{:016x}\",\"vmlink_verified\":{},\"socket_verified\":{},\"why\":{}}}"
        ),
        f.bytes,
        FILE_CHUNK,
        num(f.vmlink.elapsed().as_secs_f64()),
        num(f.vmlink.gb_per_s(f.bytes)),
        num(f.socket.elapsed().as_secs_f64()),
        num(f.socket.gb_per_s(f.bytes)),
        num(speedup(
            f.socket.elapsed().as_secs_f64(),
            f.vmlink.elapsed().as_secs_f64()
        )),
        r.plan.file_rounds,
        FILE_SLOTS,
        runs(&f.vmlink),
        runs(&f.socket),
        f.vmlink.hash,
        f.vmlink.verified,
        f.socket.verified,
        string(&file_why(f)),
    )
}

/// The measured copies' times in seconds, comma-separated, in the order they ran.
fn runs(copy: &FileCopy) -> String {
    let times: Vec<String> = copy.times.iter().map(|t| num(t.as_secs_f64())).collect();
    times.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(time(312), "312 ns");
        assert_eq!(time(18_300), "18.30 µs");
        assert_eq!(time(1_250_000), "1.25 ms");
        assert_eq!(rate(12_300_000.0), "12.30 M");
        assert_eq!(rate(850_000.0), "850.0 k");
        assert_eq!(size(64), "64 B");
        assert_eq!(size(4096), "4 KiB");
        assert_eq!(size(1 << 20), "1 MiB");
    }

    #[test]
    fn json_strings_and_numbers() {
        assert_eq!(string("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
        assert_eq!(num(f64::NAN), "null");
        assert_eq!(num(f64::INFINITY), "null");
        assert_eq!(num(1.5), "1.5000");
    }
}
