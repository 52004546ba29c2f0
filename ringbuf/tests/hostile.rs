//! A hostile peer, one rule at a time.
//!
//! Each test breaks one rule a peer must follow (docs/ARCHITECTURE.md, "Rules for memory
//! the peer can write") and checks that vmlink answers with the typed error for that rule, that its own
//! state is unchanged (repairing the ring lets the same packet through), and that nothing
//! was published on its behalf. A last property test throws arbitrary ring images at the
//! reader and requires bounded, panic-free progress.

use std::cell::Cell;

use proptest::prelude::*;
use vmlink_ring::protocol::{PacketDescriptor, PacketType};
use vmlink_ring::{
    ControlWord, ControlWords, HeapMem, Index, LayoutError, OutgoingPacket, PacketMeta,
    PageListMem, Payload, RawPacket, ReadError, Reader, RingError, RingMem, SliceMem, WriteError,
    Writer,
};

const DATA: usize = 4096;

/// A ring with one 8-byte in-band packet written by our own writer.
fn ring_with_one_packet() -> HeapMem {
    let ring = HeapMem::new(DATA).unwrap();
    let mut w = Writer::new(&ring).unwrap();
    let _ = w
        .write(&OutgoingPacket::in_band_slice(b"8 bytes!"))
        .unwrap();
    ring
}

fn descriptor(ring: &HeapMem, at: usize) -> PacketDescriptor {
    let mut raw = [0u8; 16];
    ring.read_data(at, &mut raw);
    zerocopy::transmute!(raw)
}

fn set_descriptor(ring: &HeapMem, at: usize, d: PacketDescriptor) {
    ring.write_data(at, zerocopy::IntoBytes::as_bytes(&d));
}

/// Applies `corrupt`, checks the reader reports `expected` without moving, then restores the
/// descriptor and checks the very same packet is read.
fn rejects_descriptor(corrupt: impl FnOnce(&mut PacketDescriptor), expected: RingError) {
    let ring = ring_with_one_packet();
    let good = descriptor(&ring, 0);
    let mut bad = good;
    corrupt(&mut bad);
    set_descriptor(&ring, 0, bad);

    let mut reader = Reader::new(&ring).unwrap();
    assert_eq!(reader.peek().unwrap_err(), expected);
    // Asking again gives the same answer: nothing moved.
    assert_eq!(reader.peek().unwrap_err(), expected);
    let mut buf = [0u8; 64];
    assert_eq!(
        reader.read_into(&mut buf).unwrap_err(),
        ReadError::Corrupt(expected)
    );
    assert!(!reader.has_uncommitted());
    assert_eq!(
        ring.load_control(ControlWord::ReadIndex),
        0,
        "nothing was published"
    );

    set_descriptor(&ring, 0, good);
    let (info, _) = reader
        .read_into(&mut buf)
        .unwrap()
        .expect("the repaired packet");
    assert_eq!(&buf[..info.payload_len()], b"8 bytes!");
    assert_eq!(ring.load_control(ControlWord::ReadIndex), 32);
}

#[test]
fn data_offset_inside_descriptor() {
    for off8 in [0, 1] {
        rejects_descriptor(
            |d| d.data_offset8 = off8,
            RingError::DataOffsetTooSmall {
                offset: 0,
                data_offset: u32::from(off8) * 8,
            },
        );
    }
}

#[test]
fn data_offset_past_length() {
    rejects_descriptor(
        |d| d.data_offset8 = 4,
        RingError::DataOffsetPastLength {
            offset: 0,
            data_offset: 32,
            length: 24,
        },
    );
    rejects_descriptor(
        |d| d.data_offset8 = u16::MAX,
        RingError::DataOffsetPastLength {
            offset: 0,
            data_offset: 524_280,
            length: 24,
        },
    );
}

#[test]
fn length_past_available() {
    // 32 bytes are published: a 24-byte packet and its trailer. A length of 32 leaves no
    // room for the trailer.
    rejects_descriptor(
        |d| d.length8 = 4,
        RingError::LengthPastAvailable {
            offset: 0,
            length: 32,
            available: 32,
        },
    );
    rejects_descriptor(
        |d| d.length8 = u16::MAX,
        RingError::LengthPastAvailable {
            offset: 0,
            length: 524_280,
            available: 32,
        },
    );
}

#[test]
fn unknown_packet_types() {
    for t in [0u16, 1, 5, 8, 10, 0x0C, 0x0D, 0xFFFF] {
        rejects_descriptor(
            |d| d.packet_type = t,
            RingError::UnknownPacketType {
                offset: 0,
                packet_type: t,
            },
        );
    }
}

#[test]
fn unknown_flags() {
    for f in [2u16, 3, 0x8000] {
        rejects_descriptor(
            |d| d.flags = f,
            RingError::UnknownFlags {
                offset: 0,
                flags: f,
            },
        );
    }
}

/// The descriptor rules again, broken by a peer that writes its packets with
/// [`Writer::push_raw`] instead of by hand: each bad packet is refused by its own rule, and
/// the raw writer stays sound (a valid raw packet reads back as written).
#[test]
fn raw_packets_break_each_descriptor_rule() {
    let good = PacketDescriptor {
        packet_type: PacketType::InBand.raw(),
        data_offset8: 2,
        length8: 3,
        flags: 0,
        transaction_id: 9,
    };
    type Corrupt = fn(&mut PacketDescriptor);
    let cases: [(Corrupt, RingError); 5] = [
        (
            |d| d.data_offset8 = 1,
            RingError::DataOffsetTooSmall {
                offset: 0,
                data_offset: 8,
            },
        ),
        (
            |d| d.data_offset8 = 4,
            RingError::DataOffsetPastLength {
                offset: 0,
                data_offset: 32,
                length: 24,
            },
        ),
        (
            |d| d.length8 = u16::MAX,
            RingError::LengthPastAvailable {
                offset: 0,
                length: 524_280,
                available: 32,
            },
        ),
        (
            |d| d.packet_type = 0x0D,
            RingError::UnknownPacketType {
                offset: 0,
                packet_type: 0x0D,
            },
        ),
        (
            |d| d.flags = 0x8000,
            RingError::UnknownFlags {
                offset: 0,
                flags: 0x8000,
            },
        ),
    ];
    for (corrupt, expected) in cases {
        let ring = HeapMem::new(DATA).unwrap();
        let mut peer = Writer::new(&ring).unwrap();
        let mut bad = good;
        corrupt(&mut bad);
        peer.push_raw(&RawPacket {
            descriptor: bad,
            body: b"8 bytes!",
        })
        .unwrap();
        let _ = peer.commit();
        assert_eq!(peer.published_index(), 32, "the packet's real size");
        let mut reader = Reader::new(&ring).unwrap();
        assert_eq!(reader.peek().unwrap_err(), expected);
    }

    let ring = HeapMem::new(DATA).unwrap();
    let mut peer = Writer::new(&ring).unwrap();
    peer.push_raw(&RawPacket {
        descriptor: good,
        body: b"8 bytes!",
    })
    .unwrap();
    let _ = peer.commit();
    assert_eq!(ring.to_image(), ring_with_one_packet_tid(9).to_image());
    let mut buf = [0u8; 8];
    let (info, _) = Reader::new(&ring)
        .unwrap()
        .read_into(&mut buf)
        .unwrap()
        .expect("the valid raw packet");
    assert_eq!((info.transaction_id(), &buf), (9, b"8 bytes!"));
}

/// [`ring_with_one_packet`] with a transaction id on the packet.
fn ring_with_one_packet_tid(transaction_id: u64) -> HeapMem {
    let ring = HeapMem::new(DATA).unwrap();
    let mut w = Writer::new(&ring).unwrap();
    let packet = OutgoingPacket {
        meta: PacketMeta {
            transaction_id,
            ..PacketMeta::in_band()
        },
        ..OutgoingPacket::in_band_slice(b"8 bytes!")
    };
    let _ = w.write(&packet).unwrap();
    ring
}

#[test]
fn truncated_packet() {
    // The writer index says 16 bytes were published: too few for a descriptor and trailer.
    let ring = ring_with_one_packet();
    ring.store_control(ControlWord::WriteIndex, 16);
    let mut reader = Reader::new(&ring).unwrap();
    assert_eq!(
        reader.peek().unwrap_err(),
        RingError::TruncatedPacket {
            offset: 0,
            available: 16
        }
    );
}

#[test]
fn no_data_pages() {
    assert_eq!(HeapMem::new(0).unwrap_err(), LayoutError::NoDataPages);
    assert_eq!(
        HeapMem::new(100).unwrap_err(),
        LayoutError::NotPageMultiple { len: 100 }
    );
    let control = ControlWords::new();
    assert_eq!(
        SliceMem::new(&control, &[]).unwrap_err(),
        LayoutError::NoDataPages
    );
    let no_pages: [&vmlink_ring::DataPage; 0] = [];
    assert_eq!(
        PageListMem::new(&control, no_pages).unwrap_err(),
        LayoutError::NoDataPages
    );

    /// A backend that claims an impossible data area.
    #[derive(Debug)]
    struct Liar(usize);
    impl RingMem for Liar {
        fn data_len(&self) -> usize {
            self.0
        }
        fn load_control(&self, _: ControlWord) -> u32 {
            0
        }
        fn store_control(&self, _: ControlWord, _: u32) {}
        fn read_data(&self, _: usize, _: &mut [u8]) {
            unreachable!("never read from an invalid ring")
        }
        fn write_data(&self, _: usize, _: &[u8]) {
            unreachable!("never written to an invalid ring")
        }
    }
    assert_eq!(
        Reader::new(Liar(0)).unwrap_err(),
        RingError::Layout(LayoutError::NoDataPages)
    );
    assert_eq!(
        Writer::new(Liar(0)).unwrap_err(),
        RingError::Layout(LayoutError::NoDataPages)
    );
    assert_eq!(
        Writer::new(Liar(12)).unwrap_err(),
        RingError::Layout(LayoutError::NotPageMultiple { len: 12 })
    );
}

#[test]
fn write_index_out_of_range_or_misaligned() {
    for (value, expected) in [
        (
            4096,
            RingError::IndexOutOfRange {
                index: Index::Write,
                value: 4096,
                data_len: 4096,
            },
        ),
        (
            u32::MAX,
            RingError::IndexOutOfRange {
                index: Index::Write,
                value: u32::MAX,
                data_len: 4096,
            },
        ),
        (
            36,
            RingError::IndexMisaligned {
                index: Index::Write,
                value: 36,
            },
        ),
    ] {
        // At attach time.
        let ring = ring_with_one_packet();
        ring.store_control(ControlWord::WriteIndex, value);
        assert_eq!(Reader::new(&ring).unwrap_err(), expected);
        // And while running: the reader consumed one packet and looks for more.
        let ring = ring_with_one_packet();
        let mut reader = Reader::new(&ring).unwrap();
        reader.peek().unwrap().unwrap().consume();
        let _ = reader.commit();
        ring.store_control(ControlWord::WriteIndex, value);
        assert_eq!(reader.peek().unwrap_err(), expected);
        assert_eq!(reader.available().unwrap_err(), expected);
        assert!(matches!(reader.prepare_wait(), Err(e) if e == expected));
        assert_eq!(ring.load_control(ControlWord::ReadIndex), 32);
    }
}

#[test]
fn read_index_out_of_range_or_misaligned() {
    for (value, expected) in [
        (
            8192,
            RingError::IndexOutOfRange {
                index: Index::Read,
                value: 8192,
                data_len: 4096,
            },
        ),
        (
            4,
            RingError::IndexMisaligned {
                index: Index::Read,
                value: 4,
            },
        ),
    ] {
        let ring = HeapMem::new(DATA).unwrap();
        ring.store_control(ControlWord::ReadIndex, value);
        assert_eq!(Writer::new(&ring).unwrap_err(), expected);

        // While running: the writer filled the ring, so it must re-read the read index.
        let ring = HeapMem::new(DATA).unwrap();
        let mut writer = Writer::new(&ring).unwrap();
        let big = [7u8; 4000];
        let _ = writer.write(&OutgoingPacket::in_band_slice(&big)).unwrap();
        ring.store_control(ControlWord::ReadIndex, value);
        assert_eq!(
            writer
                .write(&OutgoingPacket::in_band_slice(&big))
                .unwrap_err(),
            WriteError::Corrupt(expected)
        );
        assert_eq!(
            writer.prepare_wait(0, 4000).unwrap_err(),
            WriteError::Corrupt(expected)
        );
        assert_eq!(
            ring.load_control(ControlWord::WriteIndex),
            4024,
            "nothing more was published"
        );
        assert!(!writer.has_uncommitted());
    }
}

#[test]
fn write_index_moved_backwards() {
    let ring = HeapMem::new(DATA).unwrap();
    let mut writer = Writer::new(&ring).unwrap();
    for _ in 0..3 {
        let _ = writer
            .write(&OutgoingPacket::in_band_slice(b"abc"))
            .unwrap();
    }
    let mut reader = Reader::new(&ring).unwrap();
    reader.peek().unwrap().unwrap().consume();
    // The writer "un-publishes" the third packet.
    ring.store_control(ControlWord::WriteIndex, 64);
    let err = RingError::IndexMovedBackwards {
        index: Index::Write,
        old: 96,
        new: 64,
    };
    assert_eq!(reader.available().unwrap_err(), err);
    // Moving before our read position, even wrapping around, is also backwards.
    ring.store_control(ControlWord::WriteIndex, 0);
    assert_eq!(
        reader.available().unwrap_err(),
        RingError::IndexMovedBackwards {
            index: Index::Write,
            old: 96,
            new: 0
        }
    );
    // Restored, the reader carries on where it was.
    ring.store_control(ControlWord::WriteIndex, 96);
    assert_eq!(reader.available().unwrap(), 64);
}

#[test]
fn read_index_moved_backwards_or_past_the_writer() {
    let ring = HeapMem::new(DATA).unwrap();
    let mut writer = Writer::new(&ring).unwrap();
    let payload = [1u8; 1000];
    let mut reader = Reader::new(&ring).unwrap();
    for _ in 0..3 {
        let _ = writer
            .write(&OutgoingPacket::in_band_slice(&payload))
            .unwrap();
    }
    // The reader consumes two packets (1024 bytes each with descriptor and trailer).
    for _ in 0..2 {
        reader.peek().unwrap().unwrap().consume();
    }
    let _ = reader.commit();
    assert_eq!(writer.free_space().unwrap(), 4096 - 1024);
    // The reader index goes back to the first packet.
    ring.store_control(ControlWord::ReadIndex, 0);
    assert_eq!(
        writer.free_space().unwrap_err(),
        RingError::IndexMovedBackwards {
            index: Index::Read,
            old: 2048,
            new: 0
        }
    );
    // Or claims to have read past what was ever published.
    ring.store_control(ControlWord::ReadIndex, 3072 + 8);
    assert_eq!(
        writer.free_space().unwrap_err(),
        RingError::IndexMovedBackwards {
            index: Index::Read,
            old: 2048,
            new: 3080
        }
    );
    ring.store_control(ControlWord::ReadIndex, 2048);
    assert_eq!(writer.free_space().unwrap(), 4096 - 1024);
}

/// A ring whose control words are scripted: each load of `word` takes the next value from
/// `script` (then repeats the last), and every load is counted.
#[derive(Debug)]
struct Scripted<'a> {
    ring: &'a HeapMem,
    word: ControlWord,
    script: Vec<u32>,
    loads: Cell<usize>,
}

impl RingMem for Scripted<'_> {
    fn data_len(&self) -> usize {
        self.ring.data_len()
    }
    fn load_control(&self, word: ControlWord) -> u32 {
        if word != self.word {
            return self.ring.load_control(word);
        }
        let n = self.loads.get();
        self.loads.set(n + 1);
        self.script[n.min(self.script.len() - 1)]
    }
    fn store_control(&self, word: ControlWord, value: u32) {
        self.ring.store_control(word, value)
    }
    fn read_data(&self, offset: usize, buf: &mut [u8]) {
        self.ring.read_data(offset, buf)
    }
    fn write_data(&self, offset: usize, data: &[u8]) {
        self.ring.write_data(offset, data)
    }
}

#[test]
fn write_index_read_once_per_look() {
    // The peer flips the write index between a valid value and garbage on every load. A
    // reader that re-read it to re-validate would see a different value than it checked.
    let ring = ring_with_one_packet();
    let flip = Scripted {
        ring: &ring,
        word: ControlWord::WriteIndex,
        // attach, then the first peek's look, then garbage forever.
        script: vec![0, 32, 0xFFFF_FFF8],
        loads: Cell::new(0),
    };
    let mut reader = Reader::new(&flip).unwrap();
    assert_eq!(flip.loads.get(), 1, "attach reads the write index once");
    let packet = reader
        .peek()
        .unwrap()
        .expect("the packet published at index 32");
    assert_eq!(packet.info().payload_len(), 8);
    let mut buf = [0u8; 8];
    packet.read_payload(0, &mut buf).unwrap();
    assert_eq!(&buf, b"8 bytes!");
    packet.consume();
    assert_eq!(flip.loads.get(), 2, "one peek, one load");
    let _ = reader.commit();
    // Now the peer's garbage is seen, once, and reported.
    assert_eq!(
        reader.peek().unwrap_err(),
        RingError::IndexOutOfRange {
            index: Index::Write,
            value: 0xFFFF_FFF8,
            data_len: 4096
        }
    );
    assert_eq!(flip.loads.get(), 3);
}

#[test]
fn read_index_read_once_per_look() {
    let ring = HeapMem::new(DATA).unwrap();
    let big = [9u8; 3000];
    // attach: 0; the full ring makes the writer look once: the reader freed everything.
    let flip = Scripted {
        ring: &ring,
        word: ControlWord::ReadIndex,
        script: vec![0, 0, 3024, 4],
        loads: Cell::new(0),
    };
    let mut writer = Writer::new(&flip).unwrap();
    let _ = writer.write(&OutgoingPacket::in_band_slice(&big)).unwrap();
    let after_first = flip.loads.get();
    // The second packet does not fit the cached view; one look finds the space.
    writer.push(&OutgoingPacket::in_band_slice(&big)).unwrap();
    assert_eq!(flip.loads.get(), after_first + 1);
}

#[test]
fn descriptor_rewritten_after_validation_cannot_widen_the_packet() {
    // The peer validates-then-rewrites: after peek validated an 8-byte payload, it claims
    // a huge one. The packet handed out keeps the validated length.
    let ring = ring_with_one_packet();
    let mut reader = Reader::new(&ring).unwrap();
    let packet = reader.peek().unwrap().unwrap();
    let mut d = descriptor(&ring, 0);
    d.length8 = u16::MAX;
    set_descriptor(&ring, 0, d);
    assert_eq!(packet.info().payload_len(), 8);
    let mut buf = vec![0u8; 1000];
    assert_eq!(
        packet.read_payload(0, &mut buf).unwrap_err(),
        ReadError::OutOfBounds {
            offset: 0,
            len: 1000,
            size: 8
        }
    );
    packet.consume();
    let _ = reader.commit();
    assert_eq!(
        ring.load_control(ControlWord::ReadIndex),
        32,
        "consumed by the validated length"
    );
}

#[test]
fn writer_ignores_its_own_index_in_shared_memory() {
    let ring = HeapMem::new(DATA).unwrap();
    let mut writer = Writer::new(&ring).unwrap();
    let _ = writer
        .write(&OutgoingPacket::in_band_slice(b"one"))
        .unwrap();
    // The peer scribbles on the write index; the writer keeps its own.
    ring.store_control(ControlWord::WriteIndex, 0x800);
    let _ = writer
        .write(&OutgoingPacket::in_band_slice(b"two"))
        .unwrap();
    assert_eq!(ring.load_control(ControlWord::WriteIndex), 64);
    let mut reader = Reader::new(&ring).unwrap();
    let mut buf = [0u8; 8];
    for expect in [b"one", b"two"] {
        let _ = reader.read_into(&mut buf).unwrap().unwrap();
        assert_eq!(&buf[..3], expect);
    }
}

#[test]
fn caller_errors_are_typed_and_harmless() {
    let ring = HeapMem::new(DATA).unwrap();
    let mut writer = Writer::new(&ring).unwrap();
    let max = writer.max_packet_len();
    assert_eq!(max, 4080);
    let big = vec![0u8; max - 16 + 1];
    assert_eq!(
        writer
            .write(&OutgoingPacket::in_band_slice(&big))
            .unwrap_err(),
        WriteError::TooLarge { len: max + 8, max }
    );
    assert_eq!(
        writer.prepare_wait(0, max - 16 + 1).unwrap_err(),
        WriteError::TooLarge { len: max + 8, max }
    );
    let header = [0u8; 12];
    let bad_header = OutgoingPacket {
        meta: PacketMeta::in_band(),
        header: &header,
        payload: Payload::EMPTY,
    };
    assert_eq!(
        writer.write(&bad_header).unwrap_err(),
        WriteError::HeaderMisaligned { len: 12 }
    );
    let bad_flags = OutgoingPacket {
        meta: PacketMeta {
            packet_type: PacketType::InBand,
            flags: 4,
            transaction_id: 0,
        },
        header: &[],
        payload: Payload::EMPTY,
    };
    assert_eq!(
        writer.write(&bad_flags).unwrap_err(),
        WriteError::UnknownFlags { flags: 4 }
    );
    {
        // An unfinished slot, dropped at the end of this block.
        let mut slot = writer.reserve(PacketMeta::in_band(), 8, 10).unwrap();
        assert_eq!(
            slot.write_payload(5, &[0; 6]).unwrap_err(),
            WriteError::OutOfBounds {
                offset: 5,
                len: 6,
                size: 10
            }
        );
        assert_eq!(
            slot.write_header(0, &[0; 9]).unwrap_err(),
            WriteError::OutOfBounds {
                offset: 0,
                len: 9,
                size: 8
            }
        );
        assert_eq!(
            slot.write_payload(usize::MAX, &[0; 2]).unwrap_err(),
            WriteError::OutOfBounds {
                offset: usize::MAX,
                len: 2,
                size: 10
            }
        );
    }
    assert!(!writer.has_uncommitted(), "an unfinished slot is discarded");
    assert_eq!(writer.commit(), vmlink_ring::Signal::NONE);
    assert_eq!(ring.load_control(ControlWord::WriteIndex), 0);

    let _ = writer
        .write(&OutgoingPacket::in_band_slice(&[5u8; 40]))
        .unwrap();
    let mut reader = Reader::new(&ring).unwrap();
    let mut small = [0u8; 39];
    assert_eq!(
        reader.read_into(&mut small).unwrap_err(),
        ReadError::BufferTooSmall {
            needed: 40,
            capacity: 39
        }
    );
    let mut right = [0u8; 40];
    assert!(
        reader.read_into(&mut right).unwrap().is_some(),
        "the packet stayed queued"
    );
}

/// Steps a reader through an arbitrary ring image. Returns the packets read; panics only on
/// a broken invariant.
fn drain_hostile(image: &[u8]) -> usize {
    let ring = match HeapMem::from_image(image) {
        Ok(r) => r,
        Err(_) => return 0,
    };
    let Ok(mut reader) = Reader::new(&ring) else {
        return 0;
    };
    let data_len = ring.data_len();
    let mut packets = 0;
    let mut consumed = 0usize;
    // Packets are at least 24 bytes with the trailer, so a data area holds fewer than
    // data_len / 24 of them: the loop must end well before this bound.
    for _ in 0..data_len / 24 + 2 {
        match reader.peek() {
            Ok(Some(p)) => {
                let info = *p.info();
                let mut buf = vec![0u8; info.payload_len()];
                p.read_payload(0, &mut buf).unwrap();
                let mut hdr = vec![0u8; info.header_len()];
                p.read_header(0, &mut hdr).unwrap();
                assert!(info.packet_len() + 8 <= data_len);
                consumed += info.packet_len() + 8;
                assert!(consumed < data_len, "consumed more than the ring can hold");
                p.consume();
                let _ = reader.commit();
                packets += 1;
            }
            Ok(None) => return packets,
            Err(_) => {
                // Rejected: state unchanged, same answer again.
                let again = reader.peek().map(|p| p.map(|p| *p.info()));
                assert!(again.is_err());
                return packets;
            }
        }
    }
    panic!("the reader did not terminate within the bound");
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: if cfg!(miri) { 4 } else { 256 },
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Arbitrary control words and descriptors never panic or loop.
    #[test]
    fn arbitrary_images_are_survivable(
        write in any::<u32>(), read in any::<u32>(), aligned in any::<bool>(),
        words in proptest::collection::vec(any::<u64>(), 512),
        plausible in any::<bool>(),
    ) {
        let mut image = vec![0u8; 4096 + 4096];
        let (w, r) = if aligned { ((write % 4096) & !7, (read % 4096) & !7) } else { (write, read) };
        image[0..4].copy_from_slice(&w.to_le_bytes());
        image[4..8].copy_from_slice(&r.to_le_bytes());
        for (chunk, word) in image[4096..].chunks_mut(8).zip(&words) {
            let mut v = *word;
            if plausible {
                // Bias towards descriptors that pass the type check so deeper rules run.
                v = (v & !0xFFFF) | [6u64, 7, 9, 0x0B][(v & 3) as usize];
            }
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        drain_hostile(&image);
    }
}
