//! Async waits over the shared-memory transport: the host drives its endpoint from tokio
//! tasks (`call_async`, `send_async`, `recv_async`) while the guest, another process,
//! serves with blocking calls. The endpoint's eventfd doorbell registers with tokio's
//! reactor on its first async wait (vmlink-channel's `tokio` feature).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{ChildProcess, child_command, role, watchdog};
use vmlink_channel::ChannelError;
use vmlink_shm::{Guest, Layout, Service};

const CHILD_TEST: &str = "child_role";
const CALLERS: u64 = 4;
const CALLS: u64 = 200;
const STREAM: u64 = 2000;

/// The child's side: answers every request with its payload reversed and counts stream
/// packets, until the host leaves; then reports the count on stdout.
#[test]
fn child_role() {
    let Some(_role) = role() else { return };
    let _w = watchdog("async test guest", Duration::from_secs(60));
    let g = Guest::new("async").from_env().expect("guest handshake");
    let ch = g.channel();
    let mut buf = vec![0u8; 8192];
    let mut streamed = 0u64;
    loop {
        match ch.recv(&mut buf, None) {
            Ok(r) if r.completion_requested => {
                let mut answer = r.payload(&buf).to_vec();
                answer.reverse();
                ch.complete(r.transaction_id, &answer, None)
                    .expect("complete");
            }
            Ok(r) => {
                let n = u64::from_le_bytes(r.payload(&buf)[..8].try_into().expect("8 bytes"));
                assert_eq!(n, streamed, "stream in order");
                streamed += 1;
            }
            Err(ChannelError::Closed) => break,
            Err(e) => panic!("guest: {e}"),
        }
    }
    println!("streamed {streamed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_tasks_drive_a_cross_process_channel() {
    if role().is_some() {
        return;
    }
    let _w = watchdog("async host", Duration::from_secs(60));
    let mut cmd = child_command(CHILD_TEST, "serve");
    // Small rings, so async senders really wait for space.
    let service = Service::new("async").with_layout(Layout::symmetric(4096, 4096));
    let (host, child) = service.spawn(&mut cmd).expect("spawn the guest");
    let mut child = ChildProcess::new(child);
    let host = Arc::new(host);
    let streamer = tokio::spawn({
        let host = host.clone();
        async move {
            for n in 0..STREAM {
                let mut packet = n.to_le_bytes().to_vec();
                packet.resize(8 + (n as usize * 13) % 1500, n as u8);
                host.channel().send_async(&packet).await.expect("send");
            }
        }
    });
    let callers: Vec<_> = (0..CALLERS)
        .map(|t| {
            let host = host.clone();
            tokio::spawn(async move {
                let mut response = vec![0u8; 1024];
                for i in 0..CALLS {
                    let request: Vec<u8> = (0..8 + (i as usize % 60) * 8)
                        .map(|k| (t * 31 + i * 7 + k as u64) as u8)
                        .collect();
                    let len = host
                        .channel()
                        .call_async(&request, &mut response)
                        .await
                        .expect("call");
                    let mut expect = request.clone();
                    expect.reverse();
                    assert_eq!(response[..len], expect[..], "caller {t} call {i}");
                }
            })
        })
        .collect();
    for c in callers {
        c.await.expect("caller");
    }
    streamer.await.expect("streamer");
    let counters = host.channel().counters();
    eprintln!("host counters: {counters:?}");
    assert_eq!(host.channel().transactions_in_flight(), 0);
    assert!(counters.send_waits > 0, "async senders waited for space");
    drop(host);
    child.expect_success(Duration::from_secs(20));
    assert!(
        child.stdout().contains(&format!("streamed {STREAM}")),
        "the guest saw every stream packet: {}",
        child.stdout()
    );
}
