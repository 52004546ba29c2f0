//! `vmlink inspect`: decodes a ring image read-only.
//!
//! The file (or `/proc/PID/fd/N` of a live channel's memfd) is opened read-only and read
//! into memory once; the copy becomes a [`HeapMem`] ring and a [`Reader`] walks its queued
//! packets. The original memory is never mapped or written. A ring that breaks a rule is
//! reported with the [`RingError`](vmlink_ring::RingError) that names the rule, after
//! whatever could be decoded before it.

use std::fmt::Write as _;
use std::path::Path;

use clap::ValueEnum;
use vmlink_channel::packet::{PacketError, parse_gpa_header};
use vmlink_ring::protocol::{CONTROL_PAGE_SIZE, PacketType};
use vmlink_ring::{ControlWord, HeapMem, Reader, RingMem};

use crate::error::{Context, Result, fail};
use crate::report::string;

/// What the file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImageLayout {
    /// One ring: a 4096-byte control page, then the data area.
    Ring,
    /// A vmlink-shm channel's memory: the guest→host ring, the host→guest ring (each a
    /// control page plus `--ring-data` bytes), then the buffer area.
    Shm,
}

/// Payload bytes shown per packet.
const SHOWN_BYTES: usize = 32;

/// One decoded packet.
#[derive(Debug)]
struct Packet {
    offset: u32,
    packet_type: PacketType,
    flags: u16,
    transaction_id: u64,
    header_len: usize,
    payload_len: usize,
    /// GPA-direct packets: `(byte_offset, byte_count, pages)` per range.
    ranges: Vec<(u32, u32, Vec<u64>)>,
    /// The first [`SHOWN_BYTES`] payload bytes.
    head: Vec<u8>,
}

/// One ring as decoded.
#[derive(Debug)]
struct RingReport {
    name: &'static str,
    data_len: usize,
    /// The control page's words, if the image holds a ring at all.
    control: Option<[(&'static str, u32); 5]>,
    /// Bytes between the read and the write index, if the indices are valid.
    queued: Option<usize>,
    packets: Vec<Packet>,
    /// Queued packets not listed (past `--max-packets`).
    more: usize,
    /// The rule the ring breaks, if any.
    error: Option<String>,
}

/// Inspects `path`; returns whether every ring was sound. Prints to stdout.
pub fn run(
    path: &Path,
    layout: ImageLayout,
    ring_data: u64,
    max_packets: usize,
    json: bool,
) -> Result<bool> {
    let image = std::fs::read(path).context(&format!("read {}", path.display()))?;
    let rings: Vec<(&'static str, &[u8])> = match layout {
        ImageLayout::Ring => vec![("ring", &image[..])],
        ImageLayout::Shm => {
            let ring = CONTROL_PAGE_SIZE as u64 + ring_data;
            if ring
                .checked_mul(2)
                .is_none_or(|both| both > image.len() as u64)
            {
                return fail(format!(
                    "{} bytes cannot hold two rings of {ring} bytes (--ring-data {ring_data})",
                    image.len()
                ));
            }
            let ring = ring as usize;
            vec![
                ("guest_to_host", &image[..ring]),
                ("host_to_guest", &image[ring..2 * ring]),
            ]
        }
    };
    let reports: Vec<RingReport> = rings
        .into_iter()
        .map(|(name, bytes)| inspect_ring(name, bytes, max_packets))
        .collect();
    let buffer = match layout {
        ImageLayout::Ring => None,
        ImageLayout::Shm => Some(image.len() - 2 * (CONTROL_PAGE_SIZE + ring_data as usize)),
    };
    let assumed = Assumed::new(layout, ring_data, image.len() as u64);
    if json {
        println!("{}", to_json(path, &assumed, &reports, buffer));
    } else {
        print!("{}", to_text(path, &assumed, &reports, buffer));
    }
    Ok(reports.iter().all(|r| r.error.is_none()))
}

/// The layout the file was decoded with, said in words, and how to choose another.
struct Assumed {
    /// `ring` or `shm`.
    name: &'static str,
    /// The data bytes of each ring.
    ring_data: u64,
    /// What that means.
    description: String,
    /// How to decode the file otherwise, when that may be what the user wants.
    hint: Option<String>,
}

impl Assumed {
    fn new(layout: ImageLayout, ring_data: u64, file_len: u64) -> Self {
        let serve = crate::pipe::channel_layout();
        let serve_ring_data = crate::pipe::RING_BYTES;
        match layout {
            ImageLayout::Ring => {
                let data = file_len.saturating_sub(CONTROL_PAGE_SIZE as u64);
                let hint = if file_len == serve.total_len() {
                    format!(
                        "this file has the size of a vmlink serve/connect channel's memory, \
                         which holds two rings: decode it with --layout shm --ring-data \
                         {serve_ring_data}"
                    )
                } else {
                    "if this is a vmlink-shm channel's memory, which holds two rings and a \
                     buffer area, decode it with --layout shm --ring-data BYTES, BYTES being \
                     the data bytes of each ring"
                        .to_owned()
                };
                Self {
                    name: "ring",
                    ring_data: data,
                    description: format!(
                        "one ring (--layout ring, the default): a {CONTROL_PAGE_SIZE}-byte \
                         control page, then {data} data bytes"
                    ),
                    hint: Some(hint),
                }
            }
            ImageLayout::Shm => Self {
                name: "shm",
                ring_data,
                description: format!(
                    "a vmlink-shm channel's memory (--layout shm --ring-data {ring_data}): the \
                     guest_to_host ring, the host_to_guest ring (each a {CONTROL_PAGE_SIZE}-byte \
                     control page and {ring_data} data bytes), then the buffer area"
                ),
                hint: None,
            },
        }
    }
}

/// Decodes one ring image.
fn inspect_ring(name: &'static str, bytes: &[u8], max_packets: usize) -> RingReport {
    let mut report = RingReport {
        name,
        data_len: bytes.len().saturating_sub(CONTROL_PAGE_SIZE),
        control: None,
        queued: None,
        packets: Vec::new(),
        more: 0,
        error: None,
    };
    let mem = match HeapMem::from_image(bytes) {
        Ok(mem) => mem,
        Err(e) => {
            report.error = Some(e.to_string());
            return report;
        }
    };
    report.control = Some([
        ("write_index", mem.load_control(ControlWord::WriteIndex)),
        ("read_index", mem.load_control(ControlWord::ReadIndex)),
        (
            "interrupt_mask",
            mem.load_control(ControlWord::InterruptMask),
        ),
        (
            "pending_send_size",
            mem.load_control(ControlWord::PendingSendSize),
        ),
        ("feature_bits", mem.load_control(ControlWord::FeatureBits)),
    ]);
    let mut reader = match Reader::new(mem) {
        Ok(r) => r,
        Err(e) => {
            report.error = Some(e.to_string());
            return report;
        }
    };
    match reader.available() {
        Ok(n) => report.queued = Some(n),
        Err(e) => {
            report.error = Some(e.to_string());
            return report;
        }
    }
    loop {
        let info = match reader.peek_info() {
            Ok(Some(info)) => info,
            Ok(None) => break,
            Err(e) => {
                report.error = Some(e.to_string());
                break;
            }
        };
        let Some(packet) = reader.packet(&info) else {
            break;
        };
        if report.packets.len() >= max_packets {
            report.more += 1;
            packet.consume();
            continue;
        }
        let mut header = vec![0u8; info.header_len()];
        let mut head = vec![0u8; info.payload_len().min(SHOWN_BYTES)];
        // Both reads are within the validated lengths.
        let _ = packet.read_header(0, &mut header);
        let _ = packet.read_payload(0, &mut head);
        let mut ranges = Vec::new();
        if info.packet_type() == PacketType::GpaDirect {
            match parse_gpa_header(&header, None) {
                Ok(parsed) => {
                    for r in parsed {
                        ranges.push((r.byte_offset, r.byte_count, r.pages().collect()));
                    }
                }
                Err(e) => {
                    report.error = Some(format!(
                        "packet at {:#x}: GPA-direct header: {}",
                        info.offset(),
                        packet_error(&e)
                    ));
                }
            }
        }
        report.packets.push(Packet {
            offset: info.offset(),
            packet_type: info.packet_type(),
            flags: info.flags(),
            transaction_id: info.transaction_id(),
            header_len: info.header_len(),
            payload_len: info.payload_len(),
            ranges,
            head,
        });
        packet.consume();
        if report.error.is_some() {
            break;
        }
    }
    report
}

/// A header's defect in plain words.
fn packet_error(e: &PacketError) -> String {
    match *e {
        PacketError::RangesMismatchHeader {
            count,
            needed: Some(needed),
            len,
        } => format!("its {count} ranges take {needed} bytes but the header has {len}"),
        PacketError::RangesMismatchHeader {
            count,
            needed: None,
            len,
        } => format!("it names {count} ranges, more than its {len} bytes hold"),
        ref other => other.to_string(),
    }
}

/// Page numbers as a comma-separated list.
fn page_list(pages: &[u64], separator: &str) -> String {
    let pages: Vec<String> = pages.iter().map(u64::to_string).collect();
    pages.join(separator)
}

/// A packet type's name.
fn type_name(t: PacketType) -> &'static str {
    match t {
        PacketType::InBand => "in-band",
        PacketType::TransferPages => "transfer-pages",
        PacketType::GpaDirect => "gpa-direct",
        PacketType::Completion => "completion",
    }
}

/// Bytes as hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The report as text.
fn to_text(
    path: &Path,
    assumed: &Assumed,
    reports: &[RingReport],
    buffer: Option<usize>,
) -> String {
    let mut out = String::new();
    // Writing to a `String` cannot fail.
    let _ = writeln!(out, "{}", path.display());
    let _ = writeln!(out, "layout: {}", assumed.description);
    if let Some(hint) = &assumed.hint {
        let _ = writeln!(out, "  {hint}");
    }
    for r in reports {
        let _ = writeln!(out, "\n{}: {} data bytes", r.name, r.data_len);
        for (name, value) in r.control.into_iter().flatten() {
            let _ = writeln!(out, "  {name:<18} {value:#x}");
        }
        if let Some(q) = r.queued {
            let _ = writeln!(out, "  queued bytes       {q}");
        }
        let _ = writeln!(out, "  packets:");
        if r.packets.is_empty() && r.error.is_none() {
            let _ = writeln!(out, "    (none)");
        }
        for p in &r.packets {
            let _ = write!(
                out,
                "    @{:#07x} {:<14} flags {:#x} tid {:#x} header {} payload {}",
                p.offset,
                type_name(p.packet_type),
                p.flags,
                p.transaction_id,
                p.header_len,
                p.payload_len
            );
            if !p.head.is_empty() {
                let more = if p.payload_len > p.head.len() {
                    ".."
                } else {
                    ""
                };
                let _ = write!(out, " [{}{more}]", hex(&p.head));
            }
            let _ = writeln!(out);
            for (offset, count, pages) in &p.ranges {
                let _ = writeln!(
                    out,
                    "        range: {count} bytes at offset {offset} of pages {}",
                    page_list(pages, ", ")
                );
            }
        }
        if r.more > 0 {
            let _ = writeln!(out, "    ... and {} more", r.more);
        }
        match &r.error {
            Some(e) => {
                let _ = writeln!(out, "  CORRUPT: {e}");
            }
            None => {
                let _ = writeln!(out, "  ok");
            }
        }
    }
    if let Some(b) = buffer {
        let pages = b / 4096;
        let unit = if pages == 1 { "page" } else { "pages" };
        let _ = writeln!(out, "\nbuffer area: {b} bytes ({pages} {unit})");
    }
    out
}

/// The report as one JSON object.
fn to_json(
    path: &Path,
    assumed: &Assumed,
    reports: &[RingReport],
    buffer: Option<usize>,
) -> String {
    let rings: Vec<String> = reports
        .iter()
        .map(|r| {
            let control = r.control.map_or_else(
                || "null".to_owned(),
                |words| {
                    let words: Vec<String> = words
                        .iter()
                        .map(|(name, value)| format!("\"{name}\":{value}"))
                        .collect();
                    format!("{{{}}}", words.join(","))
                },
            );
            let packets: Vec<String> = r
                .packets
                .iter()
                .map(|p| {
                    let ranges: Vec<String> = p
                        .ranges
                        .iter()
                        .map(|(offset, count, pages)| {
                            format!(
                                "{{\"byte_offset\":{offset},\"byte_count\":{count},\"pages\":[{}]}}",
                                page_list(pages, ",")
                            )
                        })
                        .collect();
                    format!(
                        concat!(
                            "{{\"offset\":{},\"type\":\"{}\",\"flags\":{},\"transaction_id\":{},",
                            "\"header_len\":{},\"payload_len\":{},\"payload_head\":\"{}\",",
                            "\"ranges\":[{}]}}"
                        ),
                        p.offset,
                        type_name(p.packet_type),
                        p.flags,
                        p.transaction_id,
                        p.header_len,
                        p.payload_len,
                        hex(&p.head),
                        ranges.join(",")
                    )
                })
                .collect();
            format!(
                concat!(
                    "{{\"name\":\"{}\",\"data_len\":{},\"control\":{},\"queued\":{},",
                    "\"packets\":[{}],\"more_packets\":{},\"ok\":{},\"error\":{}}}"
                ),
                r.name,
                r.data_len,
                control,
                r.queued.map_or_else(|| "null".to_owned(), |q| q.to_string()),
                packets.join(","),
                r.more,
                r.error.is_none(),
                r.error.as_deref().map_or_else(|| "null".to_owned(), string),
            )
        })
        .collect();
    format!(
        concat!(
            "{{\"path\":{},\"layout\":\"{}\",\"ring_data\":{},\"layout_description\":{},",
            "\"layout_hint\":{},\"rings\":[{}],\"buffer_bytes\":{}}}"
        ),
        string(&path.display().to_string()),
        assumed.name,
        assumed.ring_data,
        string(&assumed.description),
        assumed
            .hint
            .as_deref()
            .map_or_else(|| "null".to_owned(), string),
        rings.join(","),
        buffer.map_or_else(|| "null".to_owned(), |b| b.to_string())
    )
}
