//! `HvStream` over an in-process channel pair: bulk data both ways, partial reads,
//! half-close, and a hostile peer sending raw packets.

mod common;

use std::io::{self, ErrorKind, Read, Write};
use std::thread;
use std::time::Duration;

use common::{noise, payload};
use vmlink_channel::packet::GpaRange;
use vmlink_channel::{
    Config, InProcessChannel, OutgoingPacket, PacketMeta, PacketType, Payload, Wait,
    in_process_channel_pair,
};
use vmlink_hvsock::wire::{HVS_MTU_SIZE, HVS_SEND_BUF_SIZE};
use vmlink_hvsock::{HvSockError, HvStream};

type Stream = HvStream<
    vmlink_channel::RingTx<std::sync::Arc<vmlink_ring::HeapMem>>,
    vmlink_channel::RingRx<std::sync::Arc<vmlink_ring::HeapMem>>,
    vmlink_channel::InProcessDoorbell,
>;

/// A stream and the raw channel of its peer, rings of `ring` bytes.
fn stream_and_peer(ring: usize) -> (Stream, InProcessChannel) {
    let (a, b) = in_process_channel_pair(ring, Config::default()).unwrap();
    (HvStream::new(a), b)
}

/// FNV-1a over bytes.
fn fnv(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn hv_error(e: &io::Error) -> HvSockError {
    *e.get_ref()
        .and_then(|e| e.downcast_ref::<HvSockError>())
        .unwrap_or_else(|| panic!("not an HvSockError: {e:?}"))
}

#[test]
fn ten_megabytes_each_way_at_once() {
    const LEN: usize = 10 * 1024 * 1024;
    let (a, b) = in_process_channel_pair(16 * 4096, Config::default()).unwrap();
    let (mut a_read, mut a_write) = HvStream::new(a).split();
    let (mut b_read, mut b_write) = HvStream::new(b).split();

    // Writes of odd sizes, some past a packet, some inside one.
    let send = |w: &mut dyn Write, seed: u64| -> io::Result<u64> {
        let data = noise(seed, LEN);
        let sizes = [1, 4088, 4089, 65536, 3, 12345, 100_000];
        let mut at = 0;
        for size in sizes.iter().cycle() {
            if at == LEN {
                break;
            }
            let end = (at + size).min(LEN);
            w.write_all(&data[at..end])?;
            at = end;
        }
        Ok(fnv(FNV_START, &data))
    };
    // Reads into buffers of odd sizes until the FIN.
    let receive = |r: &mut dyn Read| -> io::Result<(usize, u64)> {
        let mut buf = vec![0u8; 70_001];
        let (mut total, mut hash) = (0, FNV_START);
        for size in [1, 7, 4088, 70_001, 333].iter().cycle() {
            let n = r.read(&mut buf[..*size])?;
            if n == 0 {
                return Ok((total, hash));
            }
            hash = fnv(hash, &buf[..n]);
            total += n;
        }
        unreachable!()
    };

    let a_sends = thread::spawn(move || {
        let hash = send(&mut a_write, 1)?;
        a_write.shutdown_write()?;
        io::Result::Ok(hash)
    });
    let b_sends = thread::spawn(move || {
        let hash = send(&mut b_write, 2)?;
        b_write.shutdown_write()?;
        io::Result::Ok(hash)
    });
    let b_receives = thread::spawn(move || receive(&mut b_read));
    let (a_got, a_hash) = receive(&mut a_read).unwrap();
    let (b_got, b_hash) = b_receives.join().unwrap().unwrap();
    assert_eq!((a_got, a_hash), (LEN, b_sends.join().unwrap().unwrap()));
    assert_eq!((b_got, b_hash), (LEN, a_sends.join().unwrap().unwrap()));
    assert_ne!(a_hash, b_hash, "the two directions carried different data");
}

#[test]
fn io_copy_through_an_echo() {
    const LEN: usize = 10 * 1024 * 1024;
    let (a, b) = in_process_channel_pair(8 * 4096, Config::default()).unwrap();
    let (mut a_read, mut a_write) = HvStream::new(a).split();
    let (mut b_read, mut b_write) = HvStream::new(b).split();
    let echo = thread::spawn(move || {
        let n = io::copy(&mut b_read, &mut b_write)?;
        b_write.shutdown_write()?;
        io::Result::Ok(n)
    });
    let data = noise(3, LEN);
    let expected = fnv(FNV_START, &data);
    let sender = thread::spawn(move || {
        io::copy(&mut &data[..], &mut a_write)?;
        a_write.shutdown_write()
    });
    let mut back = Vec::with_capacity(LEN);
    a_read.read_to_end(&mut back).unwrap();
    sender.join().unwrap().unwrap();
    assert_eq!(echo.join().unwrap().unwrap(), LEN as u64);
    assert_eq!(back.len(), LEN);
    assert_eq!(fnv(FNV_START, &back), expected);
}

#[test]
fn partial_reads_of_every_size() {
    let (mut s, peer) = stream_and_peer(4 * 4096);
    let mut sender = HvStream::new(peer);
    let data = noise(4, HVS_SEND_BUF_SIZE);
    let mut got = vec![0u8; HVS_SEND_BUF_SIZE];
    for size in 1..=HVS_SEND_BUF_SIZE + 1 {
        sender.write_all(&data).unwrap();
        let mut at = 0;
        while at < data.len() {
            let end = (at + size).min(data.len());
            let n = s.read(&mut got[at..end]).unwrap();
            assert_eq!(
                n,
                end - at,
                "reads of {size}: a packet's data is there whole"
            );
            at += n;
        }
        assert_eq!(got, data, "reads of {size}");
        assert_eq!(s.buffered(), 0);
    }
}

#[test]
fn reads_join_packets_and_take_the_largest() {
    let (mut s, peer) = stream_and_peer(16 * 4096);
    // Three packets, the last the largest a packet may carry, sent raw.
    let big = noise(5, HVS_MTU_SIZE);
    peer.send(&payload(1, 3, b"abc"), Wait::Now).unwrap();
    peer.send(&payload(1, 2, b"de"), Wait::Now).unwrap();
    peer.send(&payload(1, HVS_MTU_SIZE as u32, &big), Wait::Now)
        .unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"abcd");
    let mut rest = vec![0u8; 1 + HVS_MTU_SIZE];
    s.read_exact(&mut rest).unwrap();
    assert_eq!(rest[0], b'e');
    assert_eq!(rest[1..], big[..]);
}

#[test]
fn fin_both_ways() {
    let (a, b) = in_process_channel_pair(4 * 4096, Config::default()).unwrap();
    let (mut a, mut b) = (HvStream::new(a), HvStream::new(b));
    a.write_all(b"from a").unwrap();
    a.shutdown_write().unwrap();
    // b reads a's data, then the end, as often as it asks.
    let mut got = Vec::new();
    b.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"from a");
    assert_eq!(b.read(&mut [0u8; 8]).unwrap(), 0);
    assert!(b.peer_finished());
    // b still sends after a's FIN, and a still reads after its own.
    b.write_all(b"from b").unwrap();
    b.shutdown_write().unwrap();
    let mut got = Vec::new();
    a.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"from b");
    assert!(a.peer_finished());
}

#[test]
fn one_fin_and_no_writes_after_it() {
    let (mut s, peer) = stream_and_peer(4 * 4096);
    s.shutdown_write().unwrap();
    s.shutdown_write().unwrap();
    for data in [&b"x"[..], &b""[..], &[0u8; 10_000][..]] {
        let e = s.write(data).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::BrokenPipe);
        assert_eq!(hv_error(&e), HvSockError::WriteAfterShutdown);
    }
    let mut buf = [0u8; 16];
    let fin = peer.recv(&mut buf, Wait::Now).unwrap();
    assert_eq!(fin.payload(&buf), [1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        peer.recv(&mut buf, Wait::Now),
        Err(vmlink_channel::ChannelError::Empty),
        "one FIN only"
    );
    // Reading goes on until the peer's FIN.
    peer.send(&payload(1, 2, b"ok"), Wait::Now).unwrap();
    peer.send(&payload(1, 0, b""), Wait::Now).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"ok");
}

/// Sends "good" then `bad` (raw), reads and checks the stream refuses `bad` with `expect`
/// after delivering exactly "good", and stays failed.
fn refuses(bad: impl FnOnce(&InProcessChannel), expect: HvSockError) {
    let (mut s, peer) = stream_and_peer(16 * 4096);
    peer.send(&payload(1, 4, b"good"), Wait::Now).unwrap();
    bad(&peer);
    peer.send(&payload(1, 5, b"after"), Wait::Now).unwrap();
    let mut buf = [0u8; 2];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(s.buffered(), 2, "half of \"good\" waits in the buffer");
    let mut rest = vec![0xEEu8; 64 * 1024];
    assert_eq!(s.read(&mut rest).unwrap(), 2);
    assert_eq!(&rest[..2], b"od");
    assert!(rest[2..].iter().all(|&b| b == 0xEE));
    let e = s.read(&mut rest).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidData, "{expect:?}");
    assert_eq!(hv_error(&e), expect);
    assert_eq!(s.failure(), Some(expect));
    // Nothing of the bad packet reached the caller's buffer or the stream's.
    assert_eq!(&rest[..2], b"od");
    assert!(rest[2..].iter().all(|&b| b == 0xEE), "{expect:?}");
    assert_eq!(s.buffered(), 0);
    // Failed for good: reads (even of what follows) and writes.
    for _ in 0..2 {
        assert_eq!(hv_error(&s.read(&mut rest).unwrap_err()), expect);
    }
    assert_eq!(hv_error(&s.write(b"x").unwrap_err()), expect);
}

#[test]
fn hostile_pipe_headers() {
    // An empty payload: no header at all.
    refuses(
        |p| p.send(&[], Wait::Now).unwrap(),
        HvSockError::PayloadTooShort { len: 0 },
    );
    refuses(
        |p| p.send(&payload(2, 4, b"data"), Wait::Now).unwrap(),
        HvSockError::UnknownPacketType { pkt_type: 2 },
    );
    refuses(
        |p| p.send(&payload(0, 0, b""), Wait::Now).unwrap(),
        HvSockError::UnknownPacketType { pkt_type: 0 },
    );
    // 100 bytes announced, 10 sent: the payload is padded to 24, 16 after the header.
    refuses(
        |p| p.send(&payload(1, 100, &[0x55; 10]), Wait::Now).unwrap(),
        HvSockError::DataPastPayload {
            data_size: 100,
            available: 16,
        },
    );
    refuses(
        |p| p.send(&payload(1, u32::MAX, b""), Wait::Now).unwrap(),
        HvSockError::DataTooLarge {
            data_size: u32::MAX,
        },
    );
}

#[test]
fn a_packet_of_16k_and_one_byte_is_refused() {
    let data = noise(6, HVS_MTU_SIZE + 1);
    refuses(
        |p| {
            p.send(&payload(1, data.len() as u32, &data), Wait::Now)
                .unwrap()
        },
        HvSockError::DataTooLarge {
            data_size: HVS_MTU_SIZE as u32 + 1,
        },
    );
}

#[test]
fn packets_that_are_not_in_band_data() {
    // GPA direct, carrying a good-looking pipe header in-band.
    refuses(
        |p| {
            let pages = [10];
            let ranges = [GpaRange {
                byte_offset: 0,
                byte_count: 8,
                pages: &pages,
            }];
            p.send_gpa_direct(
                &ranges,
                &payload(1, 1, b"x"),
                PacketMeta::in_band(),
                Wait::Now,
            )
            .unwrap()
        },
        HvSockError::NotInBand { packet_type: 9 },
    );
    // In-band, but with an extra header before the pipe header.
    refuses(
        |p| {
            let body = payload(1, 1, b"x");
            let packet = OutgoingPacket {
                meta: PacketMeta::in_band(),
                header: &[0; 8],
                payload: Payload::Bytes(&body),
            };
            p.send_packet(&packet, Wait::Now).unwrap()
        },
        HvSockError::ExtraHeader { len: 8 },
    );
}

#[test]
fn a_broken_channel_is_invalid_data() {
    // A completion for a transaction nobody started breaks the channel protocol: the
    // channel fails, and the stream says so.
    let (mut s, peer) = stream_and_peer(4 * 4096);
    let completion = OutgoingPacket {
        meta: PacketMeta {
            packet_type: PacketType::Completion,
            flags: 0,
            transaction_id: 12345,
        },
        header: &[],
        payload: Payload::Bytes(&payload(1, 1, b"x")),
    };
    peer.send_packet(&completion, Wait::Now).unwrap();
    let e = s.read(&mut [0u8; 8]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidData);
    assert!(
        e.get_ref()
            .and_then(|e| e.downcast_ref::<vmlink_channel::ChannelError>())
            .is_some(),
        "{e:?}"
    );
}

#[test]
fn a_peer_that_leaves_without_fin_resets_the_stream() {
    let (mut s, peer) = stream_and_peer(4 * 4096);
    peer.send(&payload(1, 3, b"end"), Wait::Now).unwrap();
    drop(peer);
    let mut buf = [0u8; 8];
    assert_eq!(s.read(&mut buf).unwrap(), 3, "what it sent is still read");
    assert_eq!(
        s.read(&mut buf).unwrap_err().kind(),
        ErrorKind::ConnectionReset
    );
}

#[test]
fn timeouts() {
    let (mut s, _peer) = stream_and_peer(4096);
    s.set_read_timeout(Some(Duration::from_millis(10)));
    assert_eq!(
        s.read(&mut [0u8; 8]).unwrap_err().kind(),
        ErrorKind::TimedOut
    );
    // A 4 KiB ring takes one 3,000-byte packet (3,032 bytes with its trailer), not two.
    s.set_write_timeout(Some(Duration::from_millis(10)));
    let n = s.write(&[1u8; 3000]).unwrap();
    assert_eq!(n, 3000);
    assert_eq!(
        s.write(&[1u8; 3000]).unwrap_err().kind(),
        ErrorKind::TimedOut
    );
    assert_eq!(s.failure(), None, "a timeout fails nothing");
}

#[test]
fn a_write_sends_what_fits_and_says_so() {
    let (mut s, peer) = stream_and_peer(16 * 4096);
    // A 64 KiB ring holds 15 full packets of 4,120 bytes (61,800), and no 16th: the write
    // stops where the ring is full and reports the bytes it sent.
    let n = s.write(&vec![9u8; 100_000]).unwrap();
    assert_eq!(n, 15 * HVS_SEND_BUF_SIZE);
    let mut reader = HvStream::new(peer);
    let mut got = vec![0u8; n];
    reader.read_exact(&mut got).unwrap();
    assert!(got.iter().all(|&b| b == 9));
}

#[test]
fn dropping_a_stream_or_its_writer_sends_the_fin_once() {
    use vmlink_channel::ChannelError::{Closed, Empty};
    const FIN: [u8; 8] = [1, 0, 0, 0, 0, 0, 0, 0];
    let mut buf = [0u8; 64];
    // A stream dropped with data sent and no FIN: the FIN follows the data.
    let (mut s, peer) = stream_and_peer(4 * 4096);
    s.write_all(b"last words").unwrap();
    drop(s);
    let data = peer.recv(&mut buf, Wait::Now).unwrap();
    assert_eq!(&data.payload(&buf)[8..18], b"last words");
    assert_eq!(peer.recv(&mut buf, Wait::Now).unwrap().payload(&buf), FIN);
    // After shutdown_write, dropping sends no second FIN.
    let (mut s, peer) = stream_and_peer(4 * 4096);
    s.shutdown_write().unwrap();
    drop(s);
    assert_eq!(peer.recv(&mut buf, Wait::Now).unwrap().payload(&buf), FIN);
    assert!(
        matches!(peer.recv(&mut buf, Wait::Now), Err(Empty | Closed)),
        "one FIN only"
    );
    // A split stream: the writer's drop sends it, the reader's sends nothing.
    let (s, peer) = stream_and_peer(4 * 4096);
    let (reader, writer) = s.split();
    drop(reader);
    assert_eq!(
        peer.recv(&mut buf, Wait::Now),
        Err(vmlink_channel::ChannelError::Empty),
        "splitting and dropping the reader send nothing"
    );
    drop(writer);
    assert_eq!(peer.recv(&mut buf, Wait::Now).unwrap().payload(&buf), FIN);
    // A failed stream sends nothing when dropped.
    let (mut s, peer) = stream_and_peer(4 * 4096);
    peer.send(&payload(9, 0, b""), Wait::Now).unwrap();
    assert_eq!(s.read(&mut buf).unwrap_err().kind(), ErrorKind::InvalidData);
    drop(s);
    assert!(
        matches!(peer.recv(&mut buf, Wait::Now), Err(Empty | Closed)),
        "a failed stream sends no FIN"
    );
}

#[test]
fn a_dropped_stream_reads_as_the_end_at_its_peer() {
    let (a, b) = in_process_channel_pair(4 * 4096, Config::default()).unwrap();
    let (mut a, mut b) = (HvStream::new(a), HvStream::new(b));
    a.write_all(b"bye").unwrap();
    drop(a);
    let mut got = Vec::new();
    b.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye", "a clean end, not a reset");
}
