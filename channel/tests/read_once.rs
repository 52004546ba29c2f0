//! Extra headers (GPA ranges, transfer pages) are read out of ring memory once, validated in
//! that private copy, and only that copy is handed out: a peer that rewrites the header
//! right after it was read cannot get different bytes to the caller. Every receive path is
//! covered: copying, in place, batches and the queue callers fill while they wait.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use vmlink_channel::Polled;
use vmlink_channel::Wait;
use vmlink_channel::packet::{GpaRange, PacketError, parse_gpa_header};
use vmlink_channel::{
    Channel, ChannelError, ChannelState, Config, FailureCause, InProcessDoorbell, OutgoingPacket,
    PacketMeta, PacketType, Payload, ProtocolError, in_process_pair,
};
use vmlink_ring::{ControlWord, HeapMem, RingMem};

const DATA: usize = 4 * 4096;
/// The header of the first packet of a fresh ring: after its 16-byte descriptor.
const HEADER: std::ops::Range<usize> = 16..48;
const PAGES: [u64; 2] = [3, 4];

/// The incoming ring as a hostile peer sees it: right after the receiver's first read that
/// touches the first packet's header, the peer rewrites that header so that it names a page
/// far past the limit and claims 1,000 ranges. Counts the reads that touch the header.
#[derive(Debug, Clone)]
struct Rewriting {
    ring: Arc<HeapMem>,
    /// Only the receiver's incoming ring is rewritten.
    armed: bool,
    header_reads: Arc<AtomicUsize>,
}

impl RingMem for Rewriting {
    fn data_len(&self) -> usize {
        self.ring.data_len()
    }
    fn load_control(&self, word: ControlWord) -> u32 {
        self.ring.load_control(word)
    }
    fn store_control(&self, word: ControlWord, value: u32) {
        self.ring.store_control(word, value)
    }
    fn read_data(&self, offset: usize, buf: &mut [u8]) {
        self.ring.read_data(offset, buf);
        let touches = offset < HEADER.end && offset + buf.len() > HEADER.start;
        if self.armed && touches && self.header_reads.fetch_add(1, Ordering::SeqCst) == 0 {
            let mut hostile = [0u8; 32];
            hostile[4..8].copy_from_slice(&1000u32.to_le_bytes());
            hostile[8..12].copy_from_slice(&5000u32.to_le_bytes());
            hostile[12..16].copy_from_slice(&100u32.to_le_bytes());
            hostile[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
            hostile[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
            self.ring.write_data(HEADER.start, &hostile);
        }
    }
    fn write_data(&self, offset: usize, data: &[u8]) {
        self.ring.write_data(offset, data)
    }
}

type Honest = Channel<Arc<HeapMem>, InProcessDoorbell>;
type Victim = Channel<Rewriting, InProcessDoorbell>;

/// A sender and a receiver whose incoming ring the peer rewrites, with the count of reads
/// of the first packet's header.
fn pair(config: Config) -> (Honest, Victim, Arc<AtomicUsize>) {
    let a_to_b = Arc::new(HeapMem::new(DATA).unwrap());
    let b_to_a = Arc::new(HeapMem::new(DATA).unwrap());
    let (da, db) = in_process_pair();
    let reads = Arc::new(AtomicUsize::new(0));
    let wrap = |ring: &Arc<HeapMem>, armed| Rewriting {
        ring: ring.clone(),
        armed,
        header_reads: reads.clone(),
    };
    let a = Channel::new(a_to_b.clone(), b_to_a.clone(), da, config).unwrap();
    let b = Channel::new(wrap(&b_to_a, false), wrap(&a_to_b, true), db, config).unwrap();
    (a, b, reads)
}

fn config() -> Config {
    Config::default().with_gpa_page_limit(16)
}

fn send_gpa<M: RingMem, D: vmlink_channel::Doorbell>(a: &Channel<M, D>) {
    let ranges = [GpaRange {
        byte_offset: 100,
        byte_count: 5000,
        pages: &PAGES,
    }];
    let meta = PacketMeta {
        packet_type: PacketType::GpaDirect,
        flags: 0,
        transaction_id: 0,
    };
    a.send_gpa_direct(&ranges, b"bulk", meta, Wait::Now)
        .unwrap();
}

/// The ranges a header names, checked against what was sent.
fn assert_original(ranges: vmlink_channel::packet::GpaRanges<'_>) {
    let got: Vec<_> = ranges
        .map(|r| (r.byte_offset, r.byte_count, r.pages().collect::<Vec<_>>()))
        .collect();
    assert_eq!(got, vec![(100, 5000, PAGES.to_vec())]);
}

#[test]
fn copying_receive_hands_out_the_validated_header() {
    let (a, b, reads) = pair(config());
    send_gpa(&a);
    let mut buf = [0u8; 64];
    let r = b
        .recv(&mut buf, Wait::Now)
        .polled()
        .unwrap()
        .expect("the packet");
    assert_eq!(r.packet_type, PacketType::GpaDirect);
    assert_original(parse_gpa_header(r.header(&buf), Some(16)).unwrap());
    assert_eq!(reads.load(Ordering::SeqCst), 1, "the header is read once");
    assert_eq!(b.state(), ChannelState::Open);
}

#[test]
fn in_place_receive_hands_out_the_validated_header() {
    let (a, b, reads) = pair(config());
    send_gpa(&a);
    let r = b
        .recv_with(Wait::Now, |guard| {
            let mut scratch = [0u8; 64];
            assert_original(guard.gpa_ranges(&mut scratch).unwrap());
            assert_eq!(reads.load(Ordering::SeqCst), 1, "the header is read once");
            let mut body = [0u8; 4];
            guard.read_payload(0, &mut body).unwrap();
            assert_eq!(&body, b"bulk");
            // A second look at the header reads the (now hostile) ring again and is checked
            // again: it fails the channel rather than hand out unchecked bytes.
            let mut again = [0u8; 64];
            assert!(matches!(
                guard.header(&mut again),
                Err(ChannelError::Failed(FailureCause::Protocol(
                    ProtocolError::Packet(_)
                )))
            ));
        })
        .polled();
    assert!(matches!(r, Err(ChannelError::Failed(_))), "{r:?}");
    assert!(matches!(b.state(), ChannelState::Failed(_)));
}

#[test]
fn batch_receive_hands_out_the_validated_header() {
    let (a, b, reads) = pair(config());
    send_gpa(&a);
    let mut seen = 0;
    let n = b
        .recv_batch(8, Wait::Now, |p| {
            let mut scratch = [0u8; 64];
            assert_original(p.gpa_ranges(&mut scratch).unwrap());
            seen += 1;
        })
        .unwrap();
    assert_eq!((n, seen), (1, 1));
    assert_eq!(reads.load(Ordering::SeqCst), 1, "the header is read once");
}

#[test]
fn queued_packets_keep_the_validated_header() {
    // B calls; before completing, A sends the GPA-direct packet, which B's call copies into
    // the channel's queue. The receiver then gets the copy validated when it was queued.
    let (a, b, reads) = pair(config());
    let server = thread::spawn(move || {
        let mut buf = [0u8; 64];
        let request = a
            .recv(&mut buf, Some(Instant::now() + Duration::from_secs(10)))
            .unwrap();
        send_gpa(&a);
        a.complete(request.transaction_id, b"done", Wait::Now)
            .unwrap();
        a
    });
    let mut response = [0u8; 8];
    let len = b
        .call(
            b"go",
            &mut response,
            Some(Instant::now() + Duration::from_secs(10)),
        )
        .unwrap();
    assert_eq!(&response[..len], b"done\0\0\0\0");
    let _a = server.join().unwrap();
    assert_eq!(reads.load(Ordering::SeqCst), 1, "read once, into the queue");
    let mut buf = [0u8; 64];
    let r = b
        .recv(&mut buf, Wait::Now)
        .polled()
        .unwrap()
        .expect("the queued packet");
    assert_original(parse_gpa_header(r.header(&buf), Some(16)).unwrap());
    assert_eq!(
        reads.load(Ordering::SeqCst),
        1,
        "not read again from the ring"
    );
}

/// Writes one raw packet into A's outgoing ring, as a peer that skips every check would.
fn send_raw(a: &Honest, packet_type: PacketType, header: &[u8]) {
    let packet = OutgoingPacket {
        meta: PacketMeta {
            packet_type,
            flags: 0,
            transaction_id: 0,
        },
        header,
        payload: Payload::Bytes(b"x"),
    };
    a.send_packet(&packet, Wait::Now).unwrap();
}

fn assert_failed_with_packet_error(b: &Victim, expected: PacketError) {
    assert_eq!(
        b.state(),
        ChannelState::Failed(FailureCause::Protocol(ProtocolError::Packet(expected)))
    );
}

#[test]
fn a_malformed_header_fails_the_channel_on_every_path() {
    // { reserved, range_count = 0 }: no ranges.
    let bad = [0u8; 8];
    // Copying receive.
    let (a, b, _) = pair(Config::default());
    send_raw(&a, PacketType::GpaDirect, &bad);
    let mut buf = [0u8; 64];
    assert!(b.recv(&mut buf, Wait::Now).polled().is_err());
    assert_failed_with_packet_error(&b, PacketError::NoRanges);
    // In place.
    let (a, b, _) = pair(Config::default());
    send_raw(&a, PacketType::TransferPages, &bad);
    let r = b
        .recv_with(Wait::Now, |guard| assert!(guard.header(&mut buf).is_err()))
        .polled();
    assert!(matches!(r, Err(ChannelError::Failed(_))), "{r:?}");
    assert_failed_with_packet_error(&b, PacketError::NoRanges);
    // Batches: the batch stops at the packet that failed the channel and says so.
    let (a, b, _) = pair(Config::default());
    send_raw(&a, PacketType::GpaDirect, &bad);
    a.send(b"after", Wait::Now).unwrap();
    let mut handed = 0;
    let r = b.recv_batch(4, Wait::Now, |p| {
        handed += 1;
        let mut scratch = [0u8; 64];
        assert!(p.gpa_ranges(&mut scratch).is_err());
    });
    assert!(matches!(r, Err(ChannelError::Failed(_))), "{r:?}");
    assert_eq!(handed, 1, "no packet after the one that failed the channel");
    assert_failed_with_packet_error(&b, PacketError::NoRanges);
    // Every later call says so.
    assert!(matches!(
        b.recv(&mut buf, Wait::Now).polled(),
        Err(ChannelError::Failed(_))
    ));
}

#[test]
fn gpa_ranges_of_another_packet_type_is_the_callers_error() {
    let (a, b, _) = pair(Config::default());
    a.send(b"plain", Wait::Now).unwrap();
    let err = b
        .recv_with(Wait::Now, |guard| {
            let mut scratch = [0u8; 64];
            guard.gpa_ranges(&mut scratch).err()
        })
        .polled()
        .unwrap()
        .expect("the packet");
    assert_eq!(
        err,
        Some(ChannelError::NotGpaDirect {
            packet_type: PacketType::InBand
        })
    );
    assert_eq!(
        b.state(),
        ChannelState::Open,
        "a caller's mistake fails nothing"
    );
}
