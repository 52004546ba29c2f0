use super::*;
use crate::error::RingError;
use crate::header::{GpaRange, parse_gpa_header, parse_transfer_page_header};
use crate::protocol::TransferPageRange;
use crate::{HeapMem, Reader};

/// One packet of `payload` bytes takes `16 + payload + 8` bytes of ring.
fn fill(writer: &mut Writer<&HeapMem>, packets: usize, payload: usize) {
    let bytes = alloc::vec![0x5A; payload];
    for _ in 0..packets {
        writer.push(&OutgoingPacket::in_band_slice(&bytes)).unwrap();
    }
    let _ = writer.commit();
}

#[test]
fn pending_send_size_is_exact_and_signals_on_crossing_only() {
    let ring = HeapMem::new(4096).unwrap();
    let mut writer = Writer::new(&ring).unwrap();
    let mut reader = Reader::new(&ring).unwrap();
    // 12 packets of 312 bytes: 3744 used, 352 free.
    fill(&mut writer, 12, 288);
    assert_eq!(writer.free_space().unwrap(), 352);
    // Below a quarter of the ring, which `prepare_wait` would have raised it to.
    let threshold = 1000;
    writer.set_pending_send_size(threshold).unwrap();
    assert_eq!(ring.load_control(ControlWord::PendingSendSize), 1000);

    let mut free = 352;
    let mut signals = 0;
    let mut buf = [0u8; 288];
    while let Some((_, signal)) = reader.read_into(&mut buf).unwrap() {
        let before = free;
        free += 312;
        let crossed = before <= threshold && threshold < free;
        assert_eq!(signal.is_needed(), crossed, "free {before} -> {free}");
        signals += usize::from(signal.is_needed());
    }
    assert_eq!(signals, 1, "exactly one commit crosses the threshold");
    assert_eq!(free, 4096);

    // Cleared: nothing signals however much is freed.
    fill(&mut writer, 12, 288);
    writer.set_pending_send_size(1000).unwrap();
    writer.clear_pending_send_size();
    assert_eq!(ring.load_control(ControlWord::PendingSendSize), 0);
    while let Some((_, signal)) = reader.read_into(&mut buf).unwrap() {
        assert!(!signal.is_needed());
    }

    // Exactly at the threshold is not past it: free goes 352 -> 664 -> 976 -> 1288,
    // and with a threshold of 976 the third commit, not the second, signals.
    fill(&mut writer, 12, 288);
    writer.set_pending_send_size(976).unwrap();
    let signalled: alloc::vec::Vec<bool> = (0..4)
        .map(|_| {
            let (_, signal) = reader.read_into(&mut buf).unwrap().unwrap();
            signal.is_needed()
        })
        .collect();
    assert_eq!(signalled, [false, false, true, false]);
}

#[test]
fn pending_send_size_bounds_and_clearing() {
    let ring = HeapMem::new(4096).unwrap();
    let mut writer = Writer::new(&ring).unwrap();
    assert_eq!(
        writer.set_pending_send_size(4096).unwrap_err(),
        WriteError::PendingSendSizeTooLarge {
            bytes: 4096,
            data_len: 4096
        }
    );
    assert_eq!(ring.load_control(ControlWord::PendingSendSize), 0);
    writer.set_pending_send_size(4095).unwrap();
    assert_eq!(ring.load_control(ControlWord::PendingSendSize), 4095);
    writer.set_pending_send_size(0).unwrap();
    assert_eq!(ring.load_control(ControlWord::PendingSendSize), 0);
    // The next successful reservation clears it, as after `prepare_wait`.
    writer.set_pending_send_size(64).unwrap();
    writer.push(&OutgoingPacket::in_band_slice(b"go")).unwrap();
    assert_eq!(ring.load_control(ControlWord::PendingSendSize), 0);
}

#[test]
fn single_slice_and_gathered_payloads_write_the_same_bytes() {
    let a = HeapMem::new(4096).unwrap();
    let b = HeapMem::new(4096).unwrap();
    let (mut wa, mut wb) = (Writer::new(&a).unwrap(), Writer::new(&b).unwrap());
    let _ = wa
        .write(&OutgoingPacket::in_band_slice(b"hello, guest"))
        .unwrap();
    let _ = wb
        .write(&OutgoingPacket::in_band(&[b"hello, ", b"guest"]))
        .unwrap();
    assert_eq!(a.to_image(), b.to_image());
    assert_eq!(Payload::from(b"abc").len(), 3);
    assert_eq!(Payload::Gather(&[b"ab", b"c"]).len(), 3);
    assert!(Payload::default().is_empty());
    assert_eq!(
        OutgoingPacket::in_band_slice(b"hello, guest").packet_len(),
        Some(32)
    );
}

#[test]
fn gpa_direct_and_transfer_page_packets() {
    let ring = HeapMem::new(4096).unwrap();
    let mut writer = Writer::new(&ring).unwrap();
    let mut reader = Reader::new(&ring).unwrap();
    let ranges = [GpaRange {
        byte_offset: 8,
        byte_count: 4096,
        pages: &[4, 5],
    }];
    let gpa = GpaHeader::new(&ranges, Some(6)).unwrap();
    let mut scratch = [0u8; 64];
    let mut packet = OutgoingPacket::gpa_direct(&gpa, &mut scratch, b"payload").unwrap();
    packet.meta.flags = crate::protocol::FLAG_COMPLETION_REQUESTED;
    packet.meta.transaction_id = 77;
    writer.push(&packet).unwrap();
    let xfer_ranges = [TransferPageRange {
        byte_count: 10,
        byte_offset: 20,
    }];
    let xfer = TransferPagesHeader::new(1, true, &xfer_ranges).unwrap();
    let mut scratch = [0u8; 16];
    writer
        .push(&OutgoingPacket::transfer_pages(&xfer, &mut scratch, &[]).unwrap())
        .unwrap();
    let _ = writer.commit();

    let p = reader.peek().unwrap().unwrap();
    let info = *p.info();
    assert_eq!(info.packet_type(), PacketType::GpaDirect);
    assert_eq!(
        (info.transaction_id(), info.completion_requested()),
        (77, true)
    );
    let mut header = [0u8; 32];
    p.read_header(0, &mut header).unwrap();
    let range = parse_gpa_header(&header, Some(6)).unwrap().next().unwrap();
    assert_eq!((range.byte_offset, range.byte_count), (8, 4096));
    assert!(range.pages().eq([4, 5]));
    let mut payload = [0u8; 8];
    p.read_payload(0, &mut payload).unwrap();
    assert_eq!(&payload[..7], b"payload");
    p.consume();

    let p = reader.peek().unwrap().unwrap();
    assert_eq!(p.info().packet_type(), PacketType::TransferPages);
    assert_eq!(p.info().payload_len(), 0);
    let mut header = [0u8; 16];
    p.read_header(0, &mut header).unwrap();
    let t = parse_transfer_page_header(&header).unwrap();
    assert_eq!((t.pageset_id, t.sender_owns_set), (1, true));
    assert!(t.ranges().eq(xfer_ranges));

    // A scratch buffer too short for the header is a typed error.
    let mut short = [0u8; 8];
    assert_eq!(
        OutgoingPacket::gpa_direct(&gpa, &mut short, &[]).unwrap_err(),
        PacketError::BufferTooSmall {
            needed: 32,
            capacity: 8
        }
    );
}

#[test]
fn raw_packets_take_their_real_size_whatever_the_descriptor_says() {
    let ring = HeapMem::new(4096).unwrap();
    let mut writer = Writer::new(&ring).unwrap();
    let mut reader = Reader::new(&ring).unwrap();
    // Unknown type, unknown flags, and lengths that lie in both directions.
    let lies = [
        PacketDescriptor {
            packet_type: 0x77,
            data_offset8: 1,
            length8: 0,
            flags: 0xFFFF,
            transaction_id: u64::MAX,
        },
        PacketDescriptor {
            packet_type: 6,
            data_offset8: 2,
            length8: u16::MAX,
            flags: 0,
            transaction_id: 1,
        },
    ];
    for d in &lies {
        writer
            .push_raw(&RawPacket {
                descriptor: *d,
                body: b"thirteen byte",
            })
            .unwrap();
    }
    // Each took 16 + 16 + 8 bytes, so a real packet follows at 80.
    writer
        .push(&OutgoingPacket::in_band_slice(b"honest"))
        .unwrap();
    let _ = writer.commit();
    assert_eq!(writer.published_index(), 80 + 32);

    // The descriptors and padded bodies are in the ring exactly as given.
    let image = ring.to_image();
    let data = &image[4096..];
    assert_eq!(&data[..16], lies[0].as_bytes());
    assert_eq!(&data[16..32], b"thirteen byte\0\0\0");
    assert_eq!(&data[32..40], &trailer_for(0).to_le_bytes());
    assert_eq!(&data[40..56], lies[1].as_bytes());
    assert_eq!(&data[72..80], &trailer_for(40).to_le_bytes());

    // The reader refuses the first packet by its type.
    assert_eq!(
        reader.peek().unwrap_err(),
        RingError::UnknownPacketType {
            offset: 0,
            packet_type: 0x77
        }
    );
    // The writer is unharmed: it keeps writing where it should, and refuses what the
    // ring cannot hold.
    assert_eq!(writer.free_space().unwrap(), 4096 - 112);
    let huge = alloc::vec![0u8; 4096];
    assert!(matches!(
        writer.push_raw(&RawPacket {
            descriptor: PacketDescriptor::default(),
            body: &huge,
        }),
        Err(WriteError::TooLarge {
            len: 4112,
            max: 4080
        })
    ));
    assert!(!writer.has_uncommitted());
}

/// A ring of `data_len` bytes whose data area holds stale bytes and whose indices both sit
/// at `at`.
fn stale_ring(data_len: usize, at: u32) -> HeapMem {
    let mut image = alloc::vec![0u8; crate::protocol::CONTROL_PAGE_SIZE + data_len];
    image[..4].copy_from_slice(&at.to_le_bytes());
    image[4..8].copy_from_slice(&at.to_le_bytes());
    for (i, b) in image[crate::protocol::CONTROL_PAGE_SIZE..]
        .iter_mut()
        .enumerate()
    {
        *b = (i as u8).wrapping_mul(31) | 0x80;
    }
    HeapMem::from_image(&image).unwrap()
}

#[test]
fn push_writes_what_a_slot_writes_at_every_position() {
    // Every start position in a one-page ring, so packets wrap at every offset (push takes
    // its straight path where they do not); payloads of many lengths, single and gathered,
    // some with a header.
    let header = [0x11u8; 8];
    // Miri (which interprets every byte of the two ring images per case) takes a padded
    // length and a whole-word one, at a position where both wrap.
    let lengths: &[usize] = if cfg!(miri) {
        &[13, 224]
    } else {
        &[0, 1, 7, 8, 13, 64, 100, 224, 1000]
    };
    for &payload_len in lengths {
        let payload: alloc::vec::Vec<u8> = (0..payload_len).map(|i| i as u8 ^ 0x3C).collect();
        let (front, back) = payload.split_at(payload_len / 3);
        let parts = [front, back];
        for header_len in [0, 8] {
            let meta = PacketMeta {
                packet_type: crate::protocol::PacketType::InBand,
                flags: 1,
                transaction_id: 0x0123_4567_89AB_CDEF,
            };
            let positions: alloc::vec::Vec<u32> = if cfg!(miri) {
                alloc::vec![4096 - 48]
            } else {
                (0..4096).step_by(8).collect()
            };
            for at in positions {
                let short = stale_ring(4096, at);
                let slotted = stale_ring(4096, at);
                let mut w = Writer::new(&short).unwrap();
                let packet = OutgoingPacket {
                    meta,
                    header: &header[..header_len],
                    payload: if at % 16 == 0 {
                        Payload::Bytes(&payload)
                    } else {
                        Payload::Gather(&parts)
                    },
                };
                let fits = packet.packet_len().unwrap() + 8 < 4096;
                assert_eq!(w.push(&packet).is_ok(), fits);
                let mut v = Writer::new(&slotted).unwrap();
                let slot = v.reserve(meta, header_len, payload_len);
                assert_eq!(slot.is_ok(), fits);
                if let Ok(mut slot) = slot {
                    slot.write_header(0, &header[..header_len]).unwrap();
                    slot.write_payload(0, &payload).unwrap();
                    slot.finish();
                }
                assert_eq!(w.tail, v.tail);
                assert_eq!(
                    short.to_image(),
                    slotted.to_image(),
                    "at {at}, {payload_len} B"
                );
            }
        }
    }
}
