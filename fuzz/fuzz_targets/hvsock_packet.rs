//! hv_sock packets from a hostile peer: the input is an in-band VMBus packet's payload (the
//! `vmpipe_proto_header` and what follows it), parsed by `vmlink_hvsock::wire::parse` and
//! then received by an `HvStream` from a live in-process channel.
//!
//! Asserted:
//! - the parser never panics or allocates, and accepts exactly the payloads a reference
//!   check accepts (at least 8 bytes, `pkt_type` 1, `data_size` at most 16 KiB and within
//!   the payload), refusing the others with the error the reference names;
//! - an accepted payload re-encodes (`wire::encode`, which allocates nothing) to exactly its
//!   first `8 + data_size` bytes, which parse back to the same segment;
//! - every error message is plain words;
//! - the stream, given the same payload as a packet (padded to 8 bytes by the ring), reads
//!   exactly the parsed data, or `Ok(0)` for a FIN, or fails with `InvalidData` wrapping the
//!   parser's error, delivering nothing, and stays failed.
#![no_main]

use std::io::{ErrorKind, Read};

use libfuzzer_sys::fuzz_target;
use vmlink_channel::{Config, Wait, in_process_channel_pair};
use vmlink_fuzz::no_alloc;
use vmlink_hvsock::wire::{self, HVS_MTU_SIZE, Segment};
use vmlink_hvsock::{HvSockError, HvStream};

/// Room for the largest packet and more.
const OUT: usize = 8 + HVS_MTU_SIZE + 64;

/// What the rules say of `payload`, written apart from the crate's parser.
fn reference(payload: &[u8]) -> Result<&[u8], HvSockError> {
    if payload.len() < 8 {
        return Err(HvSockError::PayloadTooShort { len: payload.len() });
    }
    let pkt_type = u32::from_le_bytes(payload[0..4].try_into().unwrap());
    let data_size = u32::from_le_bytes(payload[4..8].try_into().unwrap());
    if pkt_type != 1 {
        return Err(HvSockError::UnknownPacketType { pkt_type });
    }
    if data_size as usize > 16384 {
        return Err(HvSockError::DataTooLarge { data_size });
    }
    if data_size as usize > payload.len() - 8 {
        return Err(HvSockError::DataPastPayload {
            data_size,
            available: payload.len() - 8,
        });
    }
    Ok(&payload[8..8 + data_size as usize])
}

fn plain(error: HvSockError) {
    let message = error.to_string();
    assert!(
        !message.contains("None") && !message.contains("Some(") && !message.contains('{'),
        "{message}"
    );
}

fn check_parser(payload: &[u8], out: &mut [u8]) {
    let parsed = no_alloc("wire::parse", || wire::parse(payload));
    match (parsed, reference(payload)) {
        (Ok(segment), Ok(data)) => {
            assert_eq!(segment.data(), data);
            assert_eq!(segment == Segment::Fin, data.is_empty());
            let len = no_alloc("wire::encode", || wire::encode(segment.data(), out))
                .expect("accepted data re-encodes");
            assert_eq!(len, 8 + data.len());
            assert_eq!(out[..len], payload[..len], "re-encoded identically");
            assert_eq!(wire::parse(&out[..len]), Ok(segment));
        }
        (Err(e), Err(r)) => {
            assert_eq!(e, r);
            plain(e);
        }
        (p, r) => panic!("parser {p:?}, reference {r:?}"),
    }
}

/// The same payload through a stream: what it reads agrees with the parser.
fn check_stream(payload: &[u8]) {
    let (a, peer) = in_process_channel_pair(8 * 4096, Config::default().sleep_at_once())
        .expect("a pair");
    if peer.send(payload, Wait::Now).is_err() {
        return; // larger than the ring
    }
    let mut padded = payload.to_vec();
    padded.resize(payload.len().div_ceil(8) * 8, 0);
    let mut stream = HvStream::new(a);
    stream.set_read_timeout(Some(std::time::Duration::ZERO));
    let mut got = vec![0xA5u8; OUT];
    match wire::parse(&padded) {
        Ok(segment) => {
            let mut read = 0;
            loop {
                let n = stream.read(&mut got[read..]).expect("a good packet reads");
                if n == 0 {
                    break;
                }
                read += n;
                if read == segment.data().len() {
                    break;
                }
            }
            assert_eq!(&got[..read], segment.data());
            assert_eq!(stream.peer_finished(), segment == Segment::Fin);
        }
        Err(expected) => {
            for _ in 0..2 {
                let e = stream.read(&mut got).expect_err("a bad packet is refused");
                assert_eq!(e.kind(), ErrorKind::InvalidData);
                let inner = e.get_ref().and_then(|e| e.downcast_ref::<HvSockError>());
                assert_eq!(inner, Some(&expected));
            }
            assert!(got.iter().all(|&b| b == 0xA5), "nothing was delivered");
            assert_eq!(stream.failure(), Some(expected));
        }
    }
}

fuzz_target!(|payload: &[u8]| {
    let mut out = vec![0u8; OUT];
    check_parser(payload, &mut out);
    check_stream(payload);
});
