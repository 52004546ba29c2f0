//! `vmlink inspect`: decodes a ring image read-only.
//!
//! The file (or `/proc/PID/fd/N` of a live channel's memfd) is opened read-only and read
//! into memory once; each ring in the copy becomes a [`HeapMem`] ring and a [`Reader`]
//! walks its queued packets. The original memory is never mapped or written. A ring that
//! breaks a rule is reported with the [`RingError`](vmlink_ring::RingError) that names the
//! rule, after whatever could be decoded before it.
//!
//! A file that starts with the memory header's magic (a vmlink-shm channel's memory, see
//! [`vmlink_ring::area`]) is decoded as its header says: every channel's two rings and the
//! buffer area, no flags needed. A corrupt header is reported with the
//! [`AreaError`] that names the rule it breaks. Other files are decoded with the layout the
//! flags give (one ring by default).

use std::fmt::Write as _;
use std::path::Path;

use clap::ValueEnum;
use vmlink_channel::packet::{PacketError, parse_gpa_header};
use vmlink_ring::area::{self, AreaError, AreaLayout, HEADER_MAGIC, ParsedHeader, Span};
use vmlink_ring::protocol::{CONTROL_PAGE_SIZE, PAGE_SIZE, PacketType};
use vmlink_ring::{ControlWord, HeapMem, Reader, RingMem};
use vmlink_shm::HEADER_PAGE_LEN;

use crate::error::{Context, Result, fail};
use crate::report::string;

/// What the file holds, when it does not start with a memory header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImageLayout {
    /// One ring: a 4096-byte control page, then the data area.
    Ring,
    /// A vmlink-shm channel's memory from before the memory header: the guest→host ring,
    /// the host→guest ring (each a control page plus `--ring-data` bytes), then the buffer
    /// area.
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
    /// `ring`, `guest_to_host`, or with a header `channel N guest_to_host`.
    name: String,
    /// The channel the ring belongs to, when the layout has channels.
    channel: Option<usize>,
    /// Where the ring starts in the file.
    offset: u64,
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

/// The buffer area as found.
#[derive(Debug)]
struct BufferReport {
    /// Where it starts in the file, when a header says so.
    offset: Option<u64>,
    len: u64,
    /// Its 4 KiB pages that hold a byte other than zero, when a header locates it.
    used_pages: Option<u64>,
}

/// Everything the output says.
struct Report<'a> {
    path: &'a Path,
    /// `ring`, `shm` or `header`.
    layout: &'static str,
    /// The data bytes of each ring, when the flags gave one size for all.
    ring_data: Option<u64>,
    /// The layout in words.
    description: String,
    /// How to decode the file otherwise, when that may be what the user wants.
    hint: Option<String>,
    /// The memory header, when the layout came from it.
    header: Option<ParsedHeader>,
    /// The rule a corrupt memory header breaks.
    header_error: Option<AreaError>,
    rings: Vec<RingReport>,
    buffer: Option<BufferReport>,
}

impl Report<'_> {
    /// Whether everything decoded is sound.
    fn sound(&self) -> bool {
        self.header_error.is_none() && self.rings.iter().all(|r| r.error.is_none())
    }
}

/// Inspects `path`; returns whether the header (if any) and every ring were sound. Prints
/// to stdout.
pub fn run(
    path: &Path,
    layout: ImageLayout,
    ring_data: u64,
    max_packets: usize,
    json: bool,
) -> Result<bool> {
    let image = std::fs::read(path).context(&format!("read {}", path.display()))?;
    let report = if area::has_magic(&image) {
        from_header(path, &image, max_packets)
    } else {
        from_flags(path, &image, layout, ring_data, max_packets)?
    };
    if json {
        println!("{}", to_json(&report));
    } else {
        print!("{}", to_text(&report));
    }
    Ok(report.sound())
}

/// Decodes a file that starts with the memory header's magic: as the header says, or not
/// at all when the header is corrupt.
fn from_header<'a>(path: &'a Path, image: &[u8], max_packets: usize) -> Report<'a> {
    let mut report = Report {
        path,
        layout: "header",
        ring_data: None,
        description: String::new(),
        hint: None,
        header: None,
        header_error: None,
        rings: Vec::new(),
        buffer: None,
    };
    let parsed = match AreaLayout::parse(image, image.len() as u64) {
        Ok(parsed) => parsed,
        Err(e) => {
            report.description = format!(
                "read from the memory's header (the file starts with its magic \"{}\"), \
                 which is corrupt, so nothing else was decoded",
                String::from_utf8_lossy(&HEADER_MAGIC)
            );
            report.header_error = Some(e);
            return report;
        }
    };
    let area = parsed.layout;
    let count = area.channels().len();
    let channels = if count == 1 { "channel" } else { "channels" };
    report.description = format!(
        "read from the memory's header (version {}): {count} {channels}, a buffer area of \
         {} bytes, {} bytes in all; --layout and --ring-data are only for files without a \
         header",
        parsed.version,
        area.buffer().len,
        area.len()
    );
    for (i, ch) in area.channels().iter().enumerate() {
        for (name, span) in [
            ("guest_to_host", ch.guest_to_host),
            ("host_to_guest", ch.host_to_guest),
        ] {
            let mut ring = inspect_ring(
                format!("channel {i} {name}"),
                slice(image, span),
                max_packets,
            );
            ring.channel = Some(i);
            ring.offset = span.offset;
            report.rings.push(ring);
        }
    }
    let buffer = area.buffer();
    let used_pages = slice(image, buffer)
        .chunks(PAGE_SIZE)
        .filter(|page| page.iter().any(|&b| b != 0))
        .count() as u64;
    report.buffer = Some(BufferReport {
        offset: Some(buffer.offset),
        len: buffer.len,
        used_pages: Some(used_pages),
    });
    report.header = Some(parsed);
    report
}

/// The bytes of a region the header validated against the image's length.
fn slice(image: &[u8], span: Span) -> &[u8] {
    // Validated: offset + len <= image.len().
    &image[span.offset as usize..(span.offset + span.len) as usize]
}

/// Decodes a file without a memory header with the layout the flags give.
fn from_flags<'a>(
    path: &'a Path,
    image: &[u8],
    layout: ImageLayout,
    ring_data: u64,
    max_packets: usize,
) -> Result<Report<'a>> {
    let rings: Vec<(&'static str, Option<usize>, usize, &[u8])> = match layout {
        ImageLayout::Ring => vec![("ring", None, 0, image)],
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
                ("guest_to_host", Some(0), 0, &image[..ring]),
                ("host_to_guest", Some(0), ring, &image[ring..2 * ring]),
            ]
        }
    };
    let rings: Vec<RingReport> = rings
        .into_iter()
        .map(|(name, channel, offset, bytes)| {
            let mut ring = inspect_ring(name.to_owned(), bytes, max_packets);
            ring.channel = channel;
            ring.offset = offset as u64;
            ring
        })
        .collect();
    let buffer = match layout {
        ImageLayout::Ring => None,
        ImageLayout::Shm => Some(BufferReport {
            offset: None,
            len: (image.len() - 2 * (CONTROL_PAGE_SIZE + ring_data as usize)) as u64,
            used_pages: None,
        }),
    };
    let assumed = Assumed::new(layout, ring_data, image.len() as u64);
    Ok(Report {
        path,
        layout: assumed.name,
        ring_data: Some(assumed.ring_data),
        description: assumed.description,
        hint: assumed.hint,
        header: None,
        header_error: None,
        rings,
        buffer,
    })
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
        // Channels of this vmlink start with a memory header and never get here; an image
        // of the same channel from before the header is one page shorter.
        let old_serve_len = crate::pipe::channel_layout().total_len() - HEADER_PAGE_LEN;
        let serve_ring_data = crate::pipe::RING_BYTES;
        match layout {
            ImageLayout::Ring => {
                let data = file_len.saturating_sub(CONTROL_PAGE_SIZE as u64);
                let hint = if file_len == old_serve_len {
                    format!(
                        "this file has no memory header and the size of an older vmlink \
                         serve/connect channel's memory, which holds two rings: decode it \
                         with --layout shm --ring-data {serve_ring_data}"
                    )
                } else {
                    "this file has no memory header; if it is the memory of a vmlink-shm \
                     channel from before the header, which holds two rings and a buffer \
                     area, decode it with --layout shm --ring-data BYTES, BYTES being the data \
                     bytes of each ring"
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
                    "a vmlink-shm channel's memory without a memory header (--layout shm \
                     --ring-data {ring_data}): the guest_to_host ring, the host_to_guest ring \
                     (each a {CONTROL_PAGE_SIZE}-byte control page and {ring_data} data \
                     bytes), then the buffer area"
                ),
                hint: None,
            },
        }
    }
}

/// Decodes one ring image.
fn inspect_ring(name: String, bytes: &[u8], max_packets: usize) -> RingReport {
    let mut report = RingReport {
        name,
        channel: None,
        offset: 0,
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

/// The header's regions in words, one line each.
fn header_lines(area: &AreaLayout) -> Vec<String> {
    let mut lines: Vec<String> = area
        .channels()
        .iter()
        .enumerate()
        .map(|(i, ch)| {
            format!(
                "channel {i}: guest_to_host at {:#x} ({} bytes), host_to_guest at {:#x} ({} bytes)",
                ch.guest_to_host.offset,
                ch.guest_to_host.len,
                ch.host_to_guest.offset,
                ch.host_to_guest.len
            )
        })
        .collect();
    let b = area.buffer();
    lines.push(format!("buffer area at {:#x} ({} bytes)", b.offset, b.len));
    lines
}

/// The report as text.
fn to_text(report: &Report<'_>) -> String {
    let mut out = String::new();
    // Writing to a `String` cannot fail.
    let _ = writeln!(out, "{}", report.path.display());
    let _ = writeln!(out, "layout: {}", report.description);
    if let Some(hint) = &report.hint {
        let _ = writeln!(out, "  {hint}");
    }
    if let Some(h) = &report.header {
        for line in header_lines(&h.layout) {
            let _ = writeln!(out, "  {line}");
        }
    }
    if let Some(e) = &report.header_error {
        let _ = writeln!(out, "  CORRUPT header: {e}");
    }
    for r in &report.rings {
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
    if let Some(b) = &report.buffer {
        let pages = b.len / PAGE_SIZE as u64;
        let unit = if pages == 1 { "page" } else { "pages" };
        let _ = write!(out, "\nbuffer area: {} bytes ({pages} {unit})", b.len);
        if let Some(offset) = b.offset {
            let _ = write!(out, " at offset {offset:#x}");
        }
        if let Some(used) = b.used_pages.filter(|_| b.len > 0) {
            let unit = if used == 1 {
                "page holds"
            } else {
                "pages hold"
            };
            let _ = write!(out, "; {used} {unit} data other than zeros");
        }
        let _ = writeln!(out);
    }
    out
}

/// An optional number as JSON.
fn number(n: Option<u64>) -> String {
    n.map_or_else(|| "null".to_owned(), |n| n.to_string())
}

/// A region as a JSON object.
fn span_json(s: Span) -> String {
    format!("{{\"offset\":{},\"len\":{}}}", s.offset, s.len)
}

/// The memory header as a JSON object.
fn header_json(h: &ParsedHeader) -> String {
    let channels: Vec<String> = h
        .layout
        .channels()
        .iter()
        .map(|ch| {
            format!(
                "{{\"guest_to_host\":{},\"host_to_guest\":{}}}",
                span_json(ch.guest_to_host),
                span_json(ch.host_to_guest)
            )
        })
        .collect();
    format!(
        "{{\"version\":\"{}\",\"area_len\":{},\"channels\":[{}],\"buffer\":{}}}",
        h.version,
        h.layout.len(),
        channels.join(","),
        span_json(h.layout.buffer())
    )
}

/// The report as one JSON object.
fn to_json(report: &Report<'_>) -> String {
    let rings: Vec<String> = report
        .rings
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
                    "{{\"name\":{},\"channel\":{},\"offset\":{},\"data_len\":{},",
                    "\"control\":{},\"queued\":{},\"packets\":[{}],\"more_packets\":{},",
                    "\"ok\":{},\"error\":{}}}"
                ),
                string(&r.name),
                number(r.channel.map(|c| c as u64)),
                r.offset,
                r.data_len,
                control,
                number(r.queued.map(|q| q as u64)),
                packets.join(","),
                r.more,
                r.error.is_none(),
                r.error.as_deref().map_or_else(|| "null".to_owned(), string),
            )
        })
        .collect();
    let buffer = report.buffer.as_ref();
    format!(
        concat!(
            "{{\"path\":{},\"layout\":\"{}\",\"layout_from_header\":{},\"ring_data\":{},",
            "\"layout_description\":{},\"layout_hint\":{},\"header\":{},\"header_error\":{},",
            "\"rings\":[{}],\"buffer_bytes\":{},\"buffer_offset\":{},",
            "\"buffer_used_pages\":{}}}"
        ),
        string(&report.path.display().to_string()),
        report.layout,
        report.layout == "header",
        number(report.ring_data),
        string(&report.description),
        report
            .hint
            .as_deref()
            .map_or_else(|| "null".to_owned(), string),
        report
            .header
            .as_ref()
            .map_or_else(|| "null".to_owned(), header_json),
        report
            .header_error
            .map_or_else(|| "null".to_owned(), |e| string(&e.to_string())),
        rings.join(","),
        number(buffer.map(|b| b.len)),
        number(buffer.and_then(|b| b.offset)),
        number(buffer.and_then(|b| b.used_pages)),
    )
}
