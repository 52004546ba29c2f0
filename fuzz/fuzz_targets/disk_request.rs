//! vmlink-disk's request decoder against a hostile guest: the input is one request as the
//! host sees it — the packet's type, the disk's size and read-only flag, the in-band payload
//! and the GPA-direct header's bytes — laid out raw:
//!
//! | bytes | meaning |
//! | --- | --- |
//! | 0 | packet type: 0 in-band, 1 GPA direct, 2 transfer pages, else completion |
//! | 1 | bit 0: the disk is read-only; bits 1-2: the GPA page limit (none, 64, 16384, 2^40) |
//! | 2..10 | the disk's size in sectors (u64, taken modulo 2^40, at least 1) |
//! | 10 | the payload's length (modulo 33) |
//! | 11.. | the payload, then the GPA header (for a GPA-direct packet) |
//!
//! The header goes through the channel's own parser (`parse_gpa_header` with the page
//! limit), as `Packet::gpa_ranges` does, then `vmlink_disk::proto::decode`.
//!
//! Asserted: no panic and no allocation; a refusal is a `Status` other than `Ok`; an
//! accepted plan is a read or write only from a GPA-direct packet and a flush, discard or
//! info only from an in-band one, never a write or discard on a read-only disk; its bytes
//! start on a sector and end inside the disk, at most 1 MiB; a read's or write's segments
//! lie in the guest's half of the buffer area, start and end on sector boundaries, never
//! touch each other (adjacent ones are merged) and hold exactly its bytes; the other ops
//! name no segments.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmlink_channel::PacketType;
use vmlink_channel::packet::parse_gpa_header;
use vmlink_disk::Status;
use vmlink_disk::proto::{Limits, MAX_TRANSFER, Op, Plan, SECTOR_SIZE, decode};
use vmlink_fuzz::no_alloc;

/// The buffer area the limits describe: 64 MiB, the guest's half from 32 MiB.
const AREA: usize = 64 << 20;

fuzz_target!(|data: &[u8]| {
    if data.len() < 11 {
        return;
    }
    let packet_type = match data[0] {
        0 => PacketType::InBand,
        1 => PacketType::GpaDirect,
        2 => PacketType::TransferPages,
        _ => PacketType::Completion,
    };
    let read_only = data[1] & 1 != 0;
    let page_limit = [None, Some(64), Some(16384), Some(1 << 40)][usize::from(data[1] >> 1 & 3)];
    let sectors = (u64::from_le_bytes(data[2..10].try_into().unwrap()) % (1 << 40)).max(1);
    let payload_len = usize::from(data[10] % 33).min(data.len() - 11);
    let (payload, header) = data[11..].split_at(payload_len);
    let limits = Limits {
        sectors,
        read_only,
        buffers: AREA / 2..AREA,
    };
    let mut plan = Box::new(Plan::new());
    let outcome = no_alloc("decoding a request", || {
        let ranges = match packet_type {
            PacketType::GpaDirect => match parse_gpa_header(header, page_limit) {
                Ok(r) => Some(r),
                // The channel fails itself on a malformed header: nothing reaches the disk.
                Err(_) => return None,
            },
            _ => None,
        };
        Some(decode(packet_type, payload, ranges, &limits, &mut plan))
    });
    let Some(outcome) = outcome else { return };
    if let Err(status) = outcome {
        assert_ne!(status, Status::Ok);
        return;
    }
    let sector = u64::from(SECTOR_SIZE);
    let data_op = matches!(plan.op, Op::Read | Op::Write);
    assert_eq!(data_op, packet_type == PacketType::GpaDirect, "{:?} from {packet_type:?}", plan.op);
    if !data_op {
        assert_eq!(packet_type, PacketType::InBand);
    }
    if read_only {
        assert!(matches!(plan.op, Op::Read | Op::Flush | Op::Info), "{:?} on a read-only disk", plan.op);
    }
    assert_eq!(plan.offset % sector, 0);
    assert!(plan.len <= u64::from(MAX_TRANSFER));
    assert!(plan.offset + plan.len <= sectors * sector, "past the end of the disk");
    match plan.op {
        Op::Flush | Op::Info => assert_eq!((plan.offset, plan.len), (0, 0)),
        _ => assert!(plan.len > 0),
    }
    if !data_op {
        assert!(plan.segments().is_empty());
        return;
    }
    let mut total = 0;
    let mut last_end = None;
    for seg in plan.segments() {
        assert!(seg.start < seg.end, "an empty segment");
        assert!(limits.buffers.start <= seg.start && seg.end <= limits.buffers.end);
        assert_eq!(seg.start % SECTOR_SIZE as usize, 0);
        assert_eq!(seg.end % SECTOR_SIZE as usize, 0);
        assert_ne!(last_end, Some(seg.start), "adjacent segments were not merged");
        last_end = Some(seg.end);
        total += seg.len() as u64;
    }
    assert_eq!(total, plan.len);
});
