//! hv_sock packets in a ring, byte for byte.
//!
//! The images are written here by hand from the format (Linux's
//! `net/vmw_vsock/hyperv_transport.c` and `drivers/hv/ring_buffer.c`), not produced by the
//! crate's encoder or vmlink's ring writer: a descriptor (type 6, data_offset8 2, length8,
//! flags 0, transaction id 0), the `vmpipe_proto_header` (pkt_type 1, data_size), the data,
//! zero padding to 8 bytes, and the 8-byte trailer that Linux's writer fills with the
//! packet's start offset in its high 32 bits (`prev_indices`). Linux's reader skips the
//! trailer without reading it (`__hv_pkt_iter_next`); vmlink's writer writes the same value.
//! `HVS_PKT_LEN(n)` bytes in all.

use std::sync::Arc;
use std::time::Duration;

use std::io::{ErrorKind, Read, Write};
use vmlink_channel::{Channel, Config, InProcessDoorbell, in_process_pair};
use vmlink_hvsock::HvStream;
use vmlink_hvsock::wire::hvs_pkt_len;
use vmlink_ring::{ControlWord, HeapMem, RingMem};

const CONTROL: usize = 4096;

/// "hello" at offset 0: HVS_PKT_LEN(5) = 40 bytes.
const HELLO_AT_0: [u8; 40] = [
    0x06, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00,
    0x00, // type 6, data_offset8 2, length8 4, flags 0
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // transaction id 0
    0x01, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, // pkt_type 1, data_size 5
    0x68, 0x65, 0x6c, 0x6c, 0x6f, 0x00, 0x00, 0x00, // "hello", 3 bytes of padding
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // trailer: started at 0
];

/// A FIN at offset 40 (0x28): HVS_PKT_LEN(0) = 32 bytes.
const FIN_AT_40: [u8; 32] = [
    0x06, 0x00, 0x02, 0x00, 0x03, 0x00, 0x00,
    0x00, // type 6, data_offset8 2, length8 3, flags 0
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // transaction id 0
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // pkt_type 1, data_size 0
    0x00, 0x00, 0x00, 0x00, 0x28, 0x00, 0x00, 0x00, // trailer: started at 0x28
];

/// The head of a 4,088-byte packet at offset 0: length8 = (16 + 8 + 4088) / 8 = 514.
const FULL_HEAD: [u8; 24] = [
    0x06, 0x00, 0x02, 0x00, 0x02, 0x02, 0x00, 0x00, // type 6, data_offset8 2, length8 0x0202
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // transaction id 0
    0x01, 0x00, 0x00, 0x00, 0xf8, 0x0f, 0x00, 0x00, // pkt_type 1, data_size 0x0ff8
];

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

/// The 4,088-byte packet at offset 0, 4,120 bytes: head, data (no padding: 8 + 4088 is a
/// multiple of 8), trailer 0.
fn full_packet() -> Vec<u8> {
    let mut p = FULL_HEAD.to_vec();
    p.extend(pattern(4088));
    p.extend([0; 8]);
    p
}

/// A ring image: control page (indices, feature bit 0) and a data area holding `bytes` at
/// `start`, wrapping around its end.
fn ring_image(data_len: usize, start: usize, bytes: &[u8]) -> HeapMem {
    let mut image = vec![0u8; CONTROL + data_len];
    let end = (start + bytes.len()) % data_len;
    image[0..4].copy_from_slice(&(end as u32).to_le_bytes());
    image[4..8].copy_from_slice(&(start as u32).to_le_bytes());
    image[0x40..0x44].copy_from_slice(&1u32.to_le_bytes());
    for (i, b) in bytes.iter().enumerate() {
        image[CONTROL + (start + i) % data_len] = *b;
    }
    HeapMem::from_image(&image).unwrap()
}

type Stream = HvStream<
    vmlink_channel::RingTx<Arc<HeapMem>>,
    vmlink_channel::RingRx<Arc<HeapMem>>,
    InProcessDoorbell,
>;

/// A stream reading `incoming` and writing a fresh ring of `out_len` data bytes; the
/// peer's doorbell is returned so the peer stays "there".
fn stream(incoming: HeapMem, out_len: usize) -> (Stream, Arc<HeapMem>, InProcessDoorbell) {
    let outgoing = Arc::new(HeapMem::new(out_len).unwrap());
    let (ours, theirs) = in_process_pair();
    let channel = Channel::new(
        Arc::clone(&outgoing),
        Arc::new(incoming),
        ours,
        Config::default(),
    )
    .unwrap();
    (HvStream::new(channel), outgoing, theirs)
}

fn data_area(ring: &HeapMem) -> Vec<u8> {
    ring.to_image()[CONTROL..].to_vec()
}

#[test]
fn the_literal_lengths_are_hvs_pkt_len() {
    assert_eq!(HELLO_AT_0.len(), hvs_pkt_len(5));
    assert_eq!(FIN_AT_40.len(), hvs_pkt_len(0));
    assert_eq!(full_packet().len(), hvs_pkt_len(4088));
    assert_eq!(full_packet().len(), 4120);
}

#[test]
fn reads_hello_then_fin() {
    let mut bytes = HELLO_AT_0.to_vec();
    bytes.extend(FIN_AT_40);
    let (mut s, _, _peer) = stream(ring_image(4096, 0, &bytes), 4096);
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).unwrap(), 5);
    assert_eq!(&buf[..5], b"hello");
    assert!(!s.peer_finished());
    assert_eq!(s.read(&mut buf).unwrap(), 0);
    assert!(s.peer_finished());
    assert_eq!(s.read(&mut buf).unwrap(), 0, "after FIN, every read is 0");
}

#[test]
fn reads_a_packet_that_wraps_around_the_ring() {
    // The descriptor fills the last 16 bytes; header, data and trailer wrap to the start.
    // Linux's trailer holds the start offset, 4080 = 0xff0, whatever the wrap.
    let mut bytes = HELLO_AT_0.to_vec();
    bytes[32..40].copy_from_slice(&[0, 0, 0, 0, 0xf0, 0x0f, 0, 0]);
    let (mut s, _, _peer) = stream(ring_image(4096, 4080, &bytes), 4096);
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
}

#[test]
fn reads_a_full_packet_in_pieces() {
    let (mut s, _, _peer) = stream(ring_image(8192, 0, &full_packet()), 4096);
    let mut got = vec![0u8; 4088];
    let mut at = 0;
    for piece in [1, 7, 1000, 3000, 80] {
        let n = s.read(&mut got[at..at + piece]).unwrap();
        assert_eq!(n, piece);
        at += n;
    }
    assert_eq!(s.buffered(), 0);
    assert_eq!(got, pattern(4088));
    s.set_read_timeout(Some(Duration::from_millis(10)));
    assert_eq!(
        s.read(&mut got).unwrap_err().kind(),
        ErrorKind::TimedOut,
        "no FIN was sent"
    );
}

#[test]
fn writes_the_literal_images() {
    let (mut s, out, _peer) = stream(HeapMem::new(4096).unwrap(), 4096);
    s.write_all(b"hello").unwrap();
    assert_eq!(out.load_control(ControlWord::WriteIndex), 40);
    s.shutdown_write().unwrap();
    s.shutdown_write().unwrap();
    assert_eq!(out.load_control(ControlWord::WriteIndex), 72, "one FIN");
    let data = data_area(&out);
    assert_eq!(data[..40], HELLO_AT_0);
    assert_eq!(data[40..72], FIN_AT_40);
    assert!(data[72..].iter().all(|&b| b == 0));
}

#[test]
fn writes_4088_bytes_a_packet() {
    let (mut s, out, _peer) = stream(HeapMem::new(4096).unwrap(), 16384);
    let mut data = pattern(4088);
    data.push(0xAB);
    s.write_all(&data).unwrap();
    // 4,088 bytes in a 4,120-byte packet, then 1 byte in a 40-byte one.
    assert_eq!(out.load_control(ControlWord::WriteIndex), 4120 + 40);
    let area = data_area(&out);
    assert_eq!(area[..4120], full_packet()[..]);
    assert_eq!(
        area[4120..4160],
        [
            0x06, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, // length8 4
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
            0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, // data_size 1
            0xAB, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // the byte, 7 of padding
            0x00, 0x00, 0x00, 0x00, 0x18, 0x10, 0x00, 0x00, // trailer: started at 4120
        ]
    );
}

#[test]
fn a_full_packet_waiting_on_an_8k_ring_arms_linuxs_pending_send_size() {
    // The channel arms pending_send_size only while a send waits: to the packet and its
    // trailer, or a quarter of the ring if more. For a full data packet on an 8 KiB ring
    // that is Linux's HVS_PKT_LEN(HVS_SEND_BUF_SIZE).
    let (mut s, out, _peer) = stream(HeapMem::new(4096).unwrap(), 8192);
    assert_eq!(out.load_control(ControlWord::PendingSendSize), 0);
    s.write_all(&pattern(4088)).unwrap();
    s.set_write_timeout(Some(Duration::from_millis(20)));
    let e = s.write(&pattern(4088)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut);
    assert_eq!(out.load_control(ControlWord::PendingSendSize), 4120);
}
