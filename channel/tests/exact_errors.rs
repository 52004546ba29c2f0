//! Errors say exactly what happened, and no committed data is lost on the way.

use std::thread;
use std::time::{Duration, Instant};

use vmlink_channel::Polled;
use vmlink_channel::Wait;
use vmlink_channel::{ChannelError, ChannelState, Config, in_process_channel_pair};

fn soon() -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(10))
}

#[test]
fn a_completion_longer_than_the_response_buffer_is_reported_and_consumed() {
    let (host, guest) = in_process_channel_pair(4 * 4096, Config::default()).unwrap();
    let server = thread::spawn(move || {
        let mut buf = [0u8; 64];
        for reply in [&[7u8; 100][..], b"short"] {
            let r = host.recv(&mut buf, soon()).unwrap();
            host.complete(r.transaction_id, reply, soon()).unwrap();
        }
        host
    });
    let mut response = [0u8; 16];
    // The completion's real length (padded to 8 bytes), and the buffer's.
    assert_eq!(
        guest.call(b"big", &mut response, soon()),
        Err(ChannelError::BufferTooSmall {
            needed: 104,
            capacity: 16
        })
    );
    // It was consumed: its transaction is over, the channel goes on, and the next call
    // gets its own completion, not the one that did not fit.
    assert_eq!(guest.transactions_in_flight(), 0);
    assert_eq!(guest.state(), ChannelState::Open);
    let len = guest.call(b"small", &mut response, soon()).unwrap();
    assert_eq!(&response[..len], b"short\0\0\0");
    let _host = server.join().unwrap();
}

#[test]
fn packets_that_free_space_for_a_departed_writer_still_arrive() {
    // The writer fills the ring, asks to be signalled when space frees up
    // (pending_send_size), and leaves. Each receive that frees that space would signal a
    // peer that is gone: that must not turn the packet just taken into `Closed`.
    let (host, guest) = in_process_channel_pair(4096, Config::default()).unwrap();
    let payload = [1u8; 1000];
    let mut sent = 0;
    while host.send(&payload, Wait::Now).is_ok() {
        sent += 1;
    }
    // One more send waits for space (arming pending_send_size), times out, and leaves.
    assert_eq!(
        host.send(&payload, Some(Instant::now() + Duration::from_millis(30))),
        Err(ChannelError::TimedOut)
    );
    drop(host);
    let mut buf = [0u8; 1024];
    let mut received = 0;
    loop {
        match guest.recv(&mut buf, Wait::Now).polled() {
            Ok(Some(r)) => {
                assert_eq!(r.payload(&buf), &payload[..]);
                received += 1;
            }
            Err(ChannelError::Closed) => break,
            other => panic!("unexpected {other:?} after {received} packets"),
        }
    }
    assert_eq!(received, sent);
    assert_eq!(guest.state(), ChannelState::PeerClosed);
}
