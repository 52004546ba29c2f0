//! `AsyncHvStream` over an in-process pair on tokio: bulk data both ways, half-close, and
//! a hostile peer.

mod common;

use std::io::ErrorKind;
use std::sync::Arc;

use common::{noise, payload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmlink_channel::{Config, InProcessChannel, Wait, in_process_channel_pair};
use vmlink_hvsock::{AsyncHvStream, HvSockError};

type Stream = AsyncHvStream<
    vmlink_channel::RingTx<Arc<vmlink_ring::HeapMem>>,
    vmlink_channel::RingRx<Arc<vmlink_ring::HeapMem>>,
    vmlink_channel::InProcessDoorbell,
>;

fn pair(ring: usize) -> (Stream, Stream) {
    let (a, b) = in_process_channel_pair(ring, Config::default()).unwrap();
    (AsyncHvStream::new(a.into()), AsyncHvStream::new(b.into()))
}

fn stream_and_peer(ring: usize) -> (Stream, Arc<InProcessChannel>) {
    let (a, b) = in_process_channel_pair(ring, Config::default()).unwrap();
    (AsyncHvStream::new(a.into()), b.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_megabytes_each_way_at_once() {
    const LEN: usize = 4 * 1024 * 1024;
    let (a, b) = pair(8 * 4096);
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let a_data = noise(1, LEN);
    let b_data = noise(2, LEN);
    let (a_copy, b_copy) = (a_data.clone(), b_data.clone());
    let a_sends = tokio::spawn(async move {
        for chunk in a_copy.chunks(10_007) {
            a_write.write_all(chunk).await?;
        }
        a_write.shutdown().await
    });
    let b_sends = tokio::spawn(async move {
        b_write.write_all(&b_copy).await?;
        b_write.shutdown().await
    });
    let b_receives = tokio::spawn(async move {
        let mut got = Vec::new();
        b_read.read_to_end(&mut got).await.map(|_| got)
    });
    let mut a_got = Vec::new();
    a_read.read_to_end(&mut a_got).await.unwrap();
    a_sends.await.unwrap().unwrap();
    b_sends.await.unwrap().unwrap();
    assert!(a_got == b_data, "a received what b sent");
    assert!(
        b_receives.await.unwrap().unwrap() == a_data,
        "b received what a sent"
    );
}

#[tokio::test]
async fn fin_once_and_no_writes_after_it() {
    let (mut s, peer) = stream_and_peer(4 * 4096);
    s.write_all(b"hello").await.unwrap();
    s.shutdown().await.unwrap();
    s.shutdown().await.unwrap();
    let e = s.write(b"x").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BrokenPipe);
    let mut buf = [0u8; 16];
    let got = peer.recv(&mut buf, Wait::Now).unwrap();
    assert_eq!(got.payload(&buf), b"\x01\0\0\0\x05\0\0\0hello\0\0\0");
    let fin = peer.recv(&mut buf, Wait::Now).unwrap();
    assert_eq!(fin.payload(&buf), [1, 0, 0, 0, 0, 0, 0, 0]);
    assert!(peer.recv(&mut buf, Wait::Now).is_err(), "one FIN only");
    // Reading goes on until the peer's FIN.
    peer.send(&payload(1, 2, b"ok"), Wait::Now).unwrap();
    peer.send(&payload(1, 0, b""), Wait::Now).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"ok");
    assert!(s.peer_finished());
}

#[tokio::test]
async fn partial_reads_across_packets() {
    let (mut s, peer) = stream_and_peer(16 * 4096);
    let data = noise(3, 16384);
    peer.send(&payload(1, 3, b"abc"), Wait::Now).unwrap();
    peer.send(&payload(1, 16384, &data), Wait::Now).unwrap();
    let mut first = [0u8; 2];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"ab");
    // The rest in reads of odd sizes.
    let mut rest = vec![0u8; 1 + 16384];
    let mut at = 0;
    for size in [1, 1000, 5000, 11_000, 384].iter().cycle() {
        if at == rest.len() {
            break;
        }
        let end = (at + size).min(rest.len());
        let n = s.read(&mut rest[at..end]).await.unwrap();
        assert!(n > 0);
        at += n;
    }
    assert_eq!(rest[0], b'c');
    assert!(rest[1..] == data[..]);
}

#[tokio::test]
async fn hostile_packets_fail_the_stream() {
    for (bad, expect) in [
        (
            payload(2, 1, b"x"),
            HvSockError::UnknownPacketType { pkt_type: 2 },
        ),
        (
            payload(1, 16385, &[0; 16385]),
            HvSockError::DataTooLarge { data_size: 16385 },
        ),
        (
            payload(1, 9, b"x"),
            HvSockError::DataPastPayload {
                data_size: 9,
                available: 8,
            },
        ),
    ] {
        let (mut s, peer) = stream_and_peer(16 * 4096);
        peer.send(&payload(1, 4, b"good"), Wait::Now).unwrap();
        peer.send(&bad, Wait::Now).unwrap();
        let mut buf = vec![0xEEu8; 32 * 1024];
        assert_eq!(s.read(&mut buf).await.unwrap(), 4);
        assert_eq!(&buf[..4], b"good");
        for _ in 0..2 {
            let e = s.read(&mut buf[4..]).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidData);
            let inner = e.get_ref().and_then(|e| e.downcast_ref::<HvSockError>());
            assert_eq!(inner, Some(&expect));
        }
        assert!(
            buf[4..].iter().all(|&b| b == 0xEE),
            "nothing of {expect:?} delivered"
        );
        assert_eq!(s.failure(), Some(expect));
        assert!(s.write(b"x").await.is_err());
    }
}
