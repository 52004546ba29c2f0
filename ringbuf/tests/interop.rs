//! Rings as other VMBus implementations write them, byte for byte.
//!
//! The images here are built by hand the way Linux's `hv_ringbuffer_write` builds them
//! (`drivers/hv/ring_buffer.c`): a descriptor, the payload, padding to 8 bytes, and an
//! 8-byte trailer holding the packet's start offset in its high 32 bits, copied with
//! wrap-around at the end of the data area; `write_index` advanced past the trailer. They
//! do not go through vmlink's writer, so a layout mistake shared by our writer and reader
//! cannot hide here. The other direction checks that vmlink's writer produces exactly the
//! bytes such a reader expects.

use vmlink_ring::protocol::{
    FLAG_COMPLETION_REQUESTED, GpaDirectHeader, GpaRangeHeader, PacketDescriptor, PacketType,
};
use vmlink_ring::{
    ControlWord, HeapMem, OutgoingPacket, PacketMeta, Payload, Reader, RingMem, Writer,
};
use zerocopy::IntoBytes;

const CONTROL: usize = 4096;

/// A ring image under construction, written the way Linux's writer does.
struct LinuxImage {
    image: Vec<u8>,
    data_len: usize,
    write: usize,
}

impl LinuxImage {
    fn new(data_len: usize, start: usize, feature_bits: u32) -> Self {
        let mut image = vec![0u8; CONTROL + data_len];
        image[0x40..0x44].copy_from_slice(&feature_bits.to_le_bytes());
        Self {
            image,
            data_len,
            write: start,
        }
    }

    /// `hv_copyto_ringbuffer`: copy with wrap-around.
    fn copy_to(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.image[CONTROL + self.write] = *b;
            self.write = (self.write + 1) % self.data_len;
        }
    }

    /// One packet: descriptor, header, payload, padding (`pad` byte), trailer.
    fn packet(
        &mut self,
        packet_type: u16,
        flags: u16,
        tid: u64,
        header: &[u8],
        payload: &[u8],
        pad: u8,
    ) {
        let start = self.write;
        let unpadded = 16 + header.len() + payload.len();
        let len = unpadded.div_ceil(8) * 8;
        let d = PacketDescriptor {
            packet_type,
            data_offset8: ((16 + header.len()) / 8) as u16,
            length8: (len / 8) as u16,
            flags,
            transaction_id: tid,
        };
        self.copy_to(d.as_bytes());
        self.copy_to(header);
        self.copy_to(payload);
        self.copy_to(&vec![pad; len - unpadded]);
        // Linux: `u64 prev_indices = hv_get_ring_bufferindices(...)`, the start offset << 32.
        self.copy_to(&((start as u64) << 32).to_le_bytes());
    }

    /// Publishes: write index past the last trailer, read index at `read`.
    fn finish(mut self, read: usize) -> Vec<u8> {
        self.image[0..4].copy_from_slice(&(self.write as u32).to_le_bytes());
        self.image[4..8].copy_from_slice(&(read as u32).to_le_bytes());
        self.image
    }
}

fn payload(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i * 13) as u8))
        .collect()
}

#[test]
fn reads_linux_written_packets_including_a_wrapped_one() {
    let data_len = 8192;
    // Start near the end so the second packet wraps across the end of the data area.
    let start = data_len - 40;
    let mut img = LinuxImage::new(data_len, start, 1);
    let p1 = payload(1, 5);
    let p2 = payload(2, 301);
    let p3 = payload(3, 0);
    img.packet(6, 0, 0, &[], &p1, 0);
    img.packet(
        6,
        FLAG_COMPLETION_REQUESTED,
        0xAABB_CCDD_0011_2233,
        &[],
        &p2,
        0,
    );
    img.packet(0x0B, 0, 0xAABB_CCDD_0011_2233, &[], &p3, 0);
    let image = img.finish(start);

    let ring = HeapMem::from_image(&image).unwrap();
    let mut reader = Reader::new(&ring).unwrap();
    let mut buf = vec![0u8; 4096];

    let (info, _) = reader.read_into(&mut buf).unwrap().unwrap();
    assert_eq!(
        (info.packet_type(), info.flags(), info.payload_len()),
        (PacketType::InBand, 0, 8)
    );
    assert_eq!(&buf[..5], &p1[..]);
    assert_eq!(&buf[5..8], &[0, 0, 0]);

    let (info, _) = reader.read_into(&mut buf).unwrap().unwrap();
    assert_eq!(info.packet_type(), PacketType::InBand);
    assert!(info.completion_requested());
    assert_eq!(info.transaction_id(), 0xAABB_CCDD_0011_2233);
    assert_eq!(info.payload_len(), 304);
    assert_eq!(&buf[..301], &p2[..]);

    let (info, _) = reader.read_into(&mut buf).unwrap().unwrap();
    assert_eq!(
        (info.packet_type(), info.payload_len()),
        (PacketType::Completion, 0)
    );
    assert_eq!(info.transaction_id(), 0xAABB_CCDD_0011_2233);
    assert!(reader.read_into(&mut buf).unwrap().is_none());
    assert_eq!(
        ring.load_control(ControlWord::ReadIndex),
        ring.load_control(ControlWord::WriteIndex)
    );
}

#[test]
fn padding_need_not_be_zero_and_feature_bits_may_be_zero() {
    // Some writers leave stale bytes in the padding, and a sender may not set feature bit 0.
    let mut img = LinuxImage::new(4096, 0, 0);
    img.packet(6, 0, 7, &[], b"abc", 0xEE);
    let ring = HeapMem::from_image(&img.finish(0)).unwrap();
    let mut reader = Reader::new(&ring).unwrap();
    let packet = reader.peek().unwrap().unwrap();
    assert_eq!(packet.info().payload_len(), 8);
    let mut buf = [0u8; 8];
    packet.read_payload(0, &mut buf).unwrap();
    assert_eq!(&buf[..3], b"abc");
    assert_eq!(
        &buf[3..],
        &[0xEE; 5],
        "padding is handed over as found, not required to be zero"
    );
    packet.consume();
    let _ = reader.commit();
    // And our writer works on a ring whose feature bits are 0.
    let mut writer = Writer::new(&ring).unwrap();
    let _ = writer
        .write(&OutgoingPacket::in_band_slice(b"reply"))
        .unwrap();
    assert!(reader.peek().unwrap().is_some());
}

#[test]
fn reads_a_linux_gpa_direct_packet() {
    // vmbus_sendpacket_mpb_desc: descriptor, {reserved, rangecount}, one range
    // {len, offset, pfns...}, then the in-band payload.
    let mut header = Vec::new();
    header.extend_from_slice(
        GpaDirectHeader {
            reserved: 0,
            range_count: 1,
        }
        .as_bytes(),
    );
    header.extend_from_slice(
        GpaRangeHeader {
            byte_count: 5000,
            byte_offset: 100,
        }
        .as_bytes(),
    );
    header.extend_from_slice(&0x1234u64.to_le_bytes());
    header.extend_from_slice(&0x9876u64.to_le_bytes());
    let mut img = LinuxImage::new(4096, 0, 1);
    img.packet(9, FLAG_COMPLETION_REQUESTED, 42, &header, b"request", 0);
    let ring = HeapMem::from_image(&img.finish(0)).unwrap();
    let mut reader = Reader::new(&ring).unwrap();
    let packet = reader.peek().unwrap().unwrap();
    let info = *packet.info();
    assert_eq!(info.packet_type(), PacketType::GpaDirect);
    assert_eq!(info.header_len(), 32);
    assert_eq!(info.payload_len(), 8);
    let mut got = [0u8; 32];
    packet.read_header(0, &mut got).unwrap();
    assert_eq!(&got[..], &header[..]);
    let mut body = [0u8; 7];
    packet.read_payload(0, &mut body).unwrap();
    assert_eq!(&body, b"request");
}

#[test]
fn reads_a_ring_filled_to_linux_limit() {
    // Linux lets a packet occupy data_len - 8 bytes with its trailer (free space must
    // exceed the packet, trailer included). vmlink writes less, but reads it.
    let data_len = 4096;
    let mut img = LinuxImage::new(data_len, 0, 1);
    let big = payload(9, data_len - 8 - 8 - 16);
    img.packet(6, 0, 0, &[], &big, 0);
    let image = img.finish(0);
    assert_eq!(
        u32::from_le_bytes(image[0..4].try_into().unwrap()),
        (data_len - 8) as u32
    );
    let ring = HeapMem::from_image(&image).unwrap();
    let mut reader = Reader::new(&ring).unwrap();
    let mut buf = vec![0u8; data_len];
    let (info, _) = reader.read_into(&mut buf).unwrap().unwrap();
    assert_eq!(&buf[..info.payload_len()], &big[..]);
}

#[test]
fn our_writer_produces_linux_bytes() {
    // Start near the end so the packet wraps; payload not a multiple of 8.
    let data_len = 4096;
    let start = data_len - 24;
    let mut expected = LinuxImage::new(data_len, start, 1);
    let body = payload(5, 37);
    expected.packet(6, FLAG_COMPLETION_REQUESTED, 0x55, &[], &body, 0);
    expected.packet(0x0B, 0, 0x66, &[], b"", 0);
    let expected = expected.finish(start);

    // Our writer on a ring whose stale bytes are not zero: padding must still be zero.
    let mut stale = vec![0xA5u8; CONTROL + data_len];
    stale[..CONTROL].fill(0);
    stale[0..4].copy_from_slice(&(start as u32).to_le_bytes());
    stale[4..8].copy_from_slice(&(start as u32).to_le_bytes());
    stale[0x40..0x44].copy_from_slice(&1u32.to_le_bytes());
    let ring = HeapMem::from_image(&stale).unwrap();
    let mut writer = Writer::new(&ring).unwrap();
    let request = PacketMeta {
        packet_type: PacketType::InBand,
        flags: FLAG_COMPLETION_REQUESTED,
        transaction_id: 0x55,
    };
    writer
        .push(&OutgoingPacket {
            meta: request,
            header: &[],
            payload: Payload::Gather(&[&body[..10], &body[10..]]),
        })
        .unwrap();
    let completion = PacketMeta {
        packet_type: PacketType::Completion,
        flags: 0,
        transaction_id: 0x66,
    };
    writer
        .push(&OutgoingPacket {
            meta: completion,
            header: &[],
            payload: Payload::EMPTY,
        })
        .unwrap();
    let _ = writer.commit();

    let got = ring.to_image();
    let used = {
        // Compare the bytes the packets occupy (the rest of the ring keeps its stale bytes).
        let end = u32::from_le_bytes(expected[0..4].try_into().unwrap()) as usize;
        let mut offsets = Vec::new();
        let mut i = start;
        while i != end {
            offsets.push(i);
            i = (i + 1) % data_len;
        }
        offsets
    };
    for i in used {
        assert_eq!(got[CONTROL + i], expected[CONTROL + i], "data byte {i:#x}");
    }
    assert_eq!(got[..CONTROL], expected[..CONTROL], "control page");
}

#[test]
fn in_place_write_matches_copy_write() {
    let a = HeapMem::new(4096).unwrap();
    let b = HeapMem::new(4096).unwrap();
    let body = payload(7, 123);
    let header = [3u8; 16];
    let meta = PacketMeta {
        packet_type: PacketType::GpaDirect,
        flags: 0,
        transaction_id: 9,
    };
    let _ = Writer::new(&a)
        .unwrap()
        .write(&OutgoingPacket {
            meta,
            header: &header,
            payload: Payload::Bytes(&body),
        })
        .unwrap();
    let mut w = Writer::new(&b).unwrap();
    let mut slot = w.reserve(meta, 16, 123).unwrap();
    // Fill out of order and in odd pieces.
    slot.write_payload(100, &body[100..]).unwrap();
    slot.write_payload(0, &body[..3]).unwrap();
    slot.write_payload(3, &body[3..100]).unwrap();
    slot.write_header(8, &header[8..]).unwrap();
    slot.write_header(0, &header[..8]).unwrap();
    let _ = slot.commit();
    assert_eq!(a.to_image(), b.to_image());
}

#[test]
fn packet_infos_go_stale_when_the_reader_moves() {
    let ring = HeapMem::new(4096).unwrap();
    let mut writer = Writer::new(&ring).unwrap();
    let _ = writer
        .write(&OutgoingPacket::in_band_slice(b"first"))
        .unwrap();
    let _ = writer
        .write(&OutgoingPacket::in_band_slice(b"second"))
        .unwrap();
    let mut reader = Reader::new(&ring).unwrap();
    let first = reader.peek_info().unwrap().unwrap();
    assert_eq!(
        reader.peek_info().unwrap(),
        Some(first),
        "peeking again sees the same packet"
    );
    let mut buf = [0u8; 8];
    reader
        .packet(&first)
        .unwrap()
        .read_payload(0, &mut buf)
        .unwrap();
    assert_eq!(&buf[..5], b"first");
    reader.packet(&first).unwrap().consume();
    assert!(
        reader.packet(&first).is_none(),
        "consumed: the info is stale"
    );
    let second = reader.peek_info().unwrap().unwrap();
    assert_eq!(second.offset(), 32);
    reader.revert();
    assert!(
        reader.packet(&second).is_none(),
        "reverted: the info is stale"
    );
    assert_eq!(reader.peek_info().unwrap().unwrap().offset(), 0);
}

#[test]
fn page_list_ring_wraps_across_pages_and_the_end() {
    use vmlink_ring::{ControlWords, DataPage, PageListMem, init_control};
    // Four data pages allocated separately and handed over out of order, as a guest's
    // scattered pages would be.
    let control = ControlWords::new();
    let storage: Vec<Box<DataPage>> = (0..4).map(|_| DataPage::new_boxed()).collect();
    let pages = [&*storage[2], &*storage[0], &*storage[3], &*storage[1]];
    let mem = PageListMem::new(&control, pages).unwrap();
    init_control(&mem);
    // Start 40 bytes before the end: every packet below crosses a page boundary, and the
    // first crosses the end of the ring.
    mem.store_control(ControlWord::WriteIndex, 4 * 4096 - 40);
    mem.store_control(ControlWord::ReadIndex, 4 * 4096 - 40);
    let mut writer = Writer::new(&mem).unwrap();
    let mut reader = Reader::new(&mem).unwrap();
    let mut buf = vec![0u8; 8192];
    for (i, len) in [5000usize, 4096, 100, 7000, 3].into_iter().enumerate() {
        let body = payload(i as u8, len);
        let _ = writer.write(&OutgoingPacket::in_band_slice(&body)).unwrap();
        let (info, _) = reader.read_into(&mut buf).unwrap().unwrap();
        assert_eq!(info.payload_len(), len.div_ceil(8) * 8);
        assert_eq!(&buf[..len], &body[..], "packet {i}");
    }
    // The same bytes through a contiguous heap ring give the same image.
    let heap = HeapMem::new(4 * 4096).unwrap();
    heap.store_control(ControlWord::WriteIndex, 4 * 4096 - 40);
    heap.store_control(ControlWord::ReadIndex, 4 * 4096 - 40);
    let mut w2 = Writer::new(&heap).unwrap();
    for (i, len) in [5000usize, 4096, 100, 7000, 3].into_iter().enumerate() {
        let _ = w2
            .write(&OutgoingPacket::in_band_slice(&payload(i as u8, len)))
            .unwrap();
    }
    let image = heap.to_image();
    let mut page_bytes = vec![0u8; 4096];
    for (n, page) in pages.iter().enumerate() {
        let list = PageListMem::new(&control, [*page]).unwrap();
        list.read_data(0, &mut page_bytes);
        assert_eq!(
            &page_bytes[..],
            &image[CONTROL + n * 4096..CONTROL + (n + 1) * 4096],
            "page {n}"
        );
    }
}

/// Fills a ring with feature bits `feature_bits`, lets the writer ask for more space than is
/// free with `pending_send_size`, then drains it: returns whether the reader's commit asked
/// for a signal and what `writer_needs_signal` said after it.
fn drain_with_pending_send_size(feature_bits: u32) -> (bool, bool) {
    let ring = HeapMem::new(4096).unwrap();
    ring.store_control(ControlWord::FeatureBits, feature_bits);
    let mut writer = Writer::new(&ring).unwrap();
    let mut reader = Reader::new(&ring).unwrap();
    let payload = [7u8; 1000];
    while writer
        .push(&OutgoingPacket::in_band_slice(&payload))
        .is_ok()
    {}
    let _ = writer.commit();
    // What a full writer does before it sleeps (hv_sock's pending send size).
    ring.store_control(ControlWord::PendingSendSize, 2048);
    assert!(
        !vmlink_ring::writer_needs_signal(&ring),
        "nothing is free yet"
    );
    let mut buf = [0u8; 1024];
    let mut signal = vmlink_ring::Signal::NONE;
    while let Some((_, s)) = reader.read_into(&mut buf).unwrap() {
        signal |= s;
    }
    signal |= reader.commit();
    (signal.is_needed(), vmlink_ring::writer_needs_signal(&ring))
}

#[test]
fn pending_send_size_is_honoured_only_with_feature_bit_0() {
    // Linux's hv_pkt_iter_close and DPDK return before reading pending_send_size when the
    // ring's feature bit 0 is clear; so do we, in the reader's commit and in
    // writer_needs_signal.
    assert_eq!(drain_with_pending_send_size(1), (true, true));
    assert_eq!(drain_with_pending_send_size(0), (false, false));
    // Other bits do not stand in for bit 0.
    assert_eq!(drain_with_pending_send_size(0xFFFF_FFFE), (false, false));
}
