//! The stream link: the conformance suite over a Unix socket pair (side B on a thread) and
//! between two processes (side B in this test binary run again, test `child_role`, told its
//! check and socket path in `VMLINK_STREAM_TEST_ROLE`), and a hostile peer writing raw
//! bytes: garbage, a length past the largest frame, a GPA-direct frame, a stream that ends
//! inside a frame, frames dribbled a byte at a time, a peer that stops reading, a peer that
//! vanishes during a call.
#![cfg(target_os = "linux")]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use socket2::SockRef;
use vmlink_channel::conformance::{
    Check, End, PairFactory, Side, Started, Threads, run_all, run_side,
};
use vmlink_channel::{
    ChannelError, ChannelState, Config, FailureCause, FrameError, PacketType, Polled, Wait,
};
use vmlink_hvsock::frame::{FRAME_HEADER_LEN, encode};
use vmlink_hvsock::link::{
    StreamBell, StreamConfig, StreamEndpoint, StreamRx, StreamTx, stream_endpoint,
};

const ROLE: &str = "VMLINK_STREAM_TEST_ROLE";

type StreamEnd = End<StreamTx, StreamRx, StreamBell>;

fn soon() -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(20))
}

/// Small socket buffers, so the link's own buffering, partial writes and back-pressure
/// are exercised rather than hidden by the kernel's.
fn small_buffers(s: &UnixStream) {
    let s = SockRef::from(s);
    s.set_send_buffer_size(4096).expect("SO_SNDBUF");
    s.set_recv_buffer_size(4096).expect("SO_RCVBUF");
}

/// The check's ring data length is the link's largest frame and send buffer.
fn link_for(data_len: usize) -> StreamConfig {
    StreamConfig::default().with_max_frame(data_len)
}

/// An end over `s`; its corruption writes a frame header whose reserved word is not zero.
fn end(s: UnixStream, data_len: usize, config: Config) -> StreamEnd {
    small_buffers(&s);
    let raw = s.try_clone().expect("dup");
    let channel = stream_endpoint(s, link_for(data_len), config).expect("endpoint");
    End::stream(
        channel,
        Box::new(move || {
            let mut garbage = [0u8; FRAME_HEADER_LEN];
            garbage[0] = 6;
            garbage[12..16].copy_from_slice(&0xdead_u32.to_le_bytes());
            (&raw).write_all(&garbage).expect("write garbage");
        }),
    )
}

fn pair(data_len: usize, ca: Config, cb: Config) -> (StreamEnd, StreamEnd) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    (end(a, data_len, ca), end(b, data_len, cb))
}

#[test]
fn socket_pair_conforms() {
    run_all(&Threads::new(pair));
}

// ---- side B in another process --------------------------------------------------------

struct Processes;

fn socket_path(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmlink-link-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("socket directory");
    dir.join("s")
}

impl PairFactory for Processes {
    type Tx = StreamTx;
    type Rx = StreamRx;
    type Bell = StreamBell;

    fn start(&self, check: Check) -> Started<StreamTx, StreamRx, StreamBell> {
        let (config_a, _) = check.configs();
        let path = socket_path(check.name());
        let listener = UnixListener::bind(&path).expect("bind");
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "child_role", "--nocapture", "--test-threads=1"])
            .env(ROLE, format!("{}:{}", check.name(), path.display()))
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn side B");
        let (socket, _) = listener.accept().expect("side B connects");
        let a = end(socket, check.ring_data_len(), config_a);
        let name = check.name();
        Started {
            a,
            peer: Box::new(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                let status = loop {
                    if let Some(status) = child.try_wait().expect("wait") {
                        break status;
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        panic!("side B of {name} did not finish");
                    }
                    thread::sleep(Duration::from_millis(5));
                };
                let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
                assert!(status.success(), "side B of {name} failed: {status}");
            }),
        }
    }
}

/// Side B of one check, when this binary runs as the child.
#[test]
fn child_role() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let (name, path) = role.split_once(':').expect("check:path");
    let check = Check::from_name(name).expect("a known check");
    let (_, config_b) = check.configs();
    let socket = UnixStream::connect(path).expect("connect to side A");
    run_side(check, Side::B, end(socket, check.ring_data_len(), config_b));
}

#[test]
fn conformance_with_side_b_in_another_process() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    run_all(&Processes);
}

// ---- a hostile peer writing raw bytes -------------------------------------------------

const MAX_FRAME: usize = 4096;

/// Our endpoint, and the peer's raw socket.
fn raw_peer() -> (StreamEndpoint, UnixStream) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let ep = stream_endpoint(
        a,
        StreamConfig::default().with_max_frame(MAX_FRAME),
        Config::default(),
    )
    .expect("endpoint");
    (ep, b)
}

fn frame(packet_type: u16, flags: u16, tid: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; FRAME_HEADER_LEN + payload.len().next_multiple_of(8)];
    let n = encode(&mut out, packet_type, flags, tid, &[], payload).expect("encode");
    out.truncate(n);
    out
}

fn header(packet_type: u16, header_len: u32, payload_len: u32, reserved: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&packet_type.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&header_len.to_le_bytes());
    h.extend_from_slice(&payload_len.to_le_bytes());
    h.extend_from_slice(&reserved.to_le_bytes());
    h.extend_from_slice(&7u64.to_le_bytes());
    h
}

/// The whole frames before the bad bytes arrive; then the channel fails with `cause`, for
/// good, and nothing of the bad frame is delivered.
fn fails_after_good_frames(bad: &[u8], cause: FrameError) {
    let (ep, mut peer) = raw_peer();
    peer.write_all(&frame(6, 0, 0, b"whole")).unwrap();
    peer.write_all(bad).unwrap();
    let mut buf = vec![0u8; MAX_FRAME];
    let r = ep.recv(&mut buf, soon()).expect("the whole frame first");
    assert_eq!(&r.payload(&buf)[..5], b"whole");
    let expected = ChannelError::Failed(FailureCause::Frame(cause));
    assert_eq!(ep.recv(&mut buf, soon()), Err(expected));
    assert_eq!(ep.recv(&mut buf, Wait::Now), Err(expected), "sticky");
    assert_eq!(ep.send(b"x", Wait::Now), Err(expected));
    assert_eq!(ep.state(), ChannelState::Failed(FailureCause::Frame(cause)));
    assert_eq!(
        ep.counters().packets_received,
        1,
        "nothing of the bad frame"
    );
}

#[test]
fn garbage_fails_the_channel() {
    fails_after_good_frames(
        &header(6, 0, 8, 0xdead_beef),
        FrameError::Reserved(0xdead_beef),
    );
    fails_after_good_frames(&[0xff; 24], FrameError::Reserved(u32::MAX));
    fails_after_good_frames(&header(0x1234, 0, 8, 0), FrameError::PacketType(0x1234));
    fails_after_good_frames(
        &header(6, 0, 5, 0),
        FrameError::Unaligned {
            what: "payload",
            len: 5,
        },
    );
}

#[test]
fn a_length_past_the_largest_frame_fails_without_reading_it() {
    // Announces 4 GiB of payload; the link takes its buffer once and never more.
    fails_after_good_frames(
        &header(6, 0, 0xffff_fff8, 0),
        FrameError::TooLong {
            len: 24 + 0xffff_fff8,
            max: MAX_FRAME,
        },
    );
    fails_after_good_frames(
        &header(6, 0, MAX_FRAME as u32, 0),
        FrameError::TooLong {
            len: 24 + MAX_FRAME as u64,
            max: MAX_FRAME,
        },
    );
}

#[test]
fn gpa_direct_frames_are_refused_both_ways() {
    fails_after_good_frames(&header(9, 32, 8, 0), FrameError::PacketType(9));
    let (ep, _peer) = raw_peer();
    let pages = [1u64];
    let range = vmlink_channel::packet::GpaRange {
        byte_offset: 0,
        byte_count: 8,
        pages: &pages,
    };
    let meta = vmlink_channel::PacketMeta {
        packet_type: PacketType::GpaDirect,
        flags: 0,
        transaction_id: 0,
    };
    assert!(matches!(
        ep.send_gpa_direct(&[range], b"", meta, Wait::Now),
        Err(ChannelError::Unsupported { .. })
    ));
    assert_eq!(ep.state(), ChannelState::Open);
}

#[test]
fn a_stream_that_ends_inside_a_frame_fails() {
    let (ep, mut peer) = raw_peer();
    let whole = frame(6, 0, 0, b"whole");
    let cut = frame(6, 0, 0, &[5u8; 100]);
    peer.write_all(&whole).unwrap();
    peer.write_all(&cut[..50]).unwrap();
    drop(peer);
    let mut buf = vec![0u8; MAX_FRAME];
    assert_eq!(
        &ep.recv(&mut buf, soon()).expect("whole").payload(&buf)[..5],
        b"whole"
    );
    assert_eq!(
        ep.recv(&mut buf, soon()),
        Err(ChannelError::Failed(FailureCause::Frame(
            FrameError::Truncated {
                have: 50,
                want: 128
            }
        )))
    );
}

#[test]
fn a_stream_that_ends_between_frames_is_a_close() {
    let (ep, mut peer) = raw_peer();
    peer.write_all(&frame(6, 0, 0, b"last")).unwrap();
    drop(peer);
    let mut buf = vec![0u8; 64];
    assert_eq!(
        &ep.recv(&mut buf, soon()).expect("last").payload(&buf)[..4],
        b"last"
    );
    assert_eq!(ep.recv(&mut buf, soon()), Err(ChannelError::Closed));
    assert_eq!(ep.state(), ChannelState::PeerClosed);
    assert_eq!(ep.send(b"x", soon()), Err(ChannelError::Closed));
}

#[test]
fn frames_dribbled_a_byte_at_a_time_arrive_whole() {
    let (ep, mut peer) = raw_peer();
    let frames: Vec<Vec<u8>> = (0..20u8)
        .map(|i| frame(6, 0, 0, &vec![i; usize::from(i) * 13]))
        .collect();
    let writer = thread::spawn(move || {
        for f in &frames {
            for b in f {
                peer.write_all(&[*b]).unwrap();
            }
        }
        peer
    });
    let mut buf = vec![0u8; MAX_FRAME];
    for i in 0..20u8 {
        let r = ep.recv(&mut buf, soon()).expect("frame");
        let len = usize::from(i) * 13;
        assert_eq!(r.payload_len, len.next_multiple_of(8));
        assert!(r.payload(&buf)[..len].iter().all(|b| *b == i), "frame {i}");
    }
    let _peer = writer.join().unwrap();
    assert_eq!(ep.recv(&mut buf, Wait::Now), Err(ChannelError::Empty));
}

/// A sender over small socket buffers and a 16 KiB link that sent `chunk` until `Full`
/// (the peer not reading), the peer's socket, the link's configuration and how many went.
fn filled_sender(chunk: &[u8]) -> (StreamEndpoint, UnixStream, StreamConfig, u32) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    small_buffers(&a);
    small_buffers(&b);
    let link = StreamConfig::default()
        .with_max_frame(4096)
        .with_send_buffer(16 * 1024);
    let sender = stream_endpoint(a, link, Config::default()).unwrap();
    let mut sent = 0u32;
    while sender.send(chunk, Wait::Now).is_ok() {
        sent += 1;
        assert!(
            sent < 1000,
            "a peer that does not read must stop the sender"
        );
    }
    (sender, b, link, sent)
}

#[test]
fn a_peer_that_stops_reading_meets_a_bounded_buffer() {
    let chunk = [3u8; 1000];
    let (sender, b, link, sent) = filled_sender(&chunk);
    assert_eq!(sender.send(&chunk, Wait::Now), Err(ChannelError::Full));
    let t0 = Instant::now();
    assert_eq!(
        sender.send(&chunk, Some(Instant::now() + Duration::from_millis(50))),
        Err(ChannelError::TimedOut)
    );
    assert!(t0.elapsed() >= Duration::from_millis(45));
    // Everything the buffer and the socket hold arrives once the peer reads, and a blocked
    // send goes out.
    let receiver = stream_endpoint(b, link, Config::default()).unwrap();
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let mut n = 0u32;
        while let Ok(r) = receiver.recv(&mut buf, Some(Instant::now() + Duration::from_secs(2))) {
            assert_eq!(r.payload(&buf)[..1000], [3u8; 1000]);
            n += 1;
        }
        n
    });
    sender
        .send(&chunk, soon())
        .expect("a blocked send goes out");
    drop(sender);
    assert_eq!(reader.join().unwrap(), sent + 1);
}

#[test]
fn committed_packets_reach_the_peer_while_the_sender_idles() {
    let (sender, b, link, sent) = filled_sender(&[5u8; 1000]);
    let receiver = stream_endpoint(b, link, Config::default()).unwrap();
    assert!(sent > 8, "more than the socket takes at once: {sent}");
    // The sender now idles, holding its endpoint: what it committed still arrives, all of
    // it (the link's flusher writes what the socket did not take at once).
    let mut buf = [0u8; 1024];
    for i in 0..sent {
        receiver
            .recv(&mut buf, Some(Instant::now() + Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("packet {i} of {sent}: {e}"));
    }
    assert_eq!(receiver.recv(&mut buf, Wait::Now), Err(ChannelError::Empty));
    drop(sender);
}

#[test]
fn a_peer_that_vanishes_during_a_call_closes_it() {
    let (ep, peer) = raw_peer();
    let server = thread::spawn(move || {
        // Read the request, then leave without answering.
        let mut peer = peer;
        let mut buf = [0u8; 64];
        let _ = std::io::Read::read(&mut peer, &mut buf);
    });
    let mut response = [0u8; 16];
    assert_eq!(
        ep.call(b"anyone?", &mut response, soon()),
        Err(ChannelError::Closed)
    );
    server.join().unwrap();
}

#[test]
fn maximum_size_frames_of_noise_are_delivered_as_sent() {
    let (ep, mut peer) = raw_peer();
    let max_payload = MAX_FRAME - FRAME_HEADER_LEN;
    let noise: Vec<u8> = (0..max_payload).map(|i| (i * 7 + 3) as u8).collect();
    let f = frame(6, 1, 99, &noise);
    assert_eq!(f.len(), MAX_FRAME);
    let writer = thread::spawn(move || {
        for _ in 0..8 {
            peer.write_all(&f).unwrap();
        }
        peer
    });
    let mut buf = vec![0u8; MAX_FRAME];
    for _ in 0..8 {
        let r = ep.recv(&mut buf, soon()).expect("a maximum frame");
        assert!(r.completion_requested);
        assert_eq!(r.transaction_id, 99);
        assert_eq!(r.payload(&buf), &noise[..]);
    }
    let _peer = writer.join().unwrap();
    assert_eq!(ep.recv(&mut buf, Wait::Now).polled(), Ok(None));
}

#[test]
fn a_configuration_that_cannot_carry_a_frame_is_refused() {
    for link in [
        StreamConfig::default().with_max_frame(16),
        StreamConfig::default()
            .with_max_frame(4096)
            .with_send_buffer(100),
    ] {
        let (a, _b) = UnixStream::pair().unwrap();
        let err = stream_endpoint(a, link, Config::default()).expect_err("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
    }
}

// ---- async waits on tokio's reactor -----------------------------------------------------

/// A pair whose ends wait only through tokio (no spin, no blocking wait).
fn async_pair(
    max_frame: usize,
) -> (
    std::sync::Arc<StreamEndpoint>,
    std::sync::Arc<StreamEndpoint>,
) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    small_buffers(&a);
    small_buffers(&b);
    let link = StreamConfig::default().with_max_frame(max_frame);
    let config = Config::default().sleep_at_once();
    (
        std::sync::Arc::new(stream_endpoint(a, link, config).unwrap()),
        std::sync::Arc::new(stream_endpoint(b, link, config).unwrap()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_calls_from_many_tasks_and_a_back_pressured_stream() {
    let (host, guest) = async_pair(4096);
    let server = tokio::spawn({
        let guest = guest.clone();
        async move {
            let mut buf = vec![0u8; 4096];
            let mut streamed = 0u32;
            loop {
                match guest.recv_async(&mut buf).await {
                    Ok(r) if r.completion_requested => {
                        let mut answer = r.payload(&buf).to_vec();
                        answer.reverse();
                        guest
                            .complete_async(r.transaction_id, &answer)
                            .await
                            .expect("complete");
                    }
                    Ok(r) => {
                        assert_eq!(r.payload(&buf)[..4], streamed.to_le_bytes());
                        streamed += 1;
                        // A slow reader: the sender meets back-pressure through the socket.
                        if streamed.is_multiple_of(100) {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                    Err(ChannelError::Closed) => return streamed,
                    Err(e) => panic!("server: {e}"),
                }
            }
        }
    });
    let mut callers = Vec::new();
    for t in 0..4u8 {
        let host = host.clone();
        callers.push(tokio::spawn(async move {
            for i in 0..200u32 {
                let request: Vec<u8> = (0..8 + (i % 50) * 8).map(|k| (k as u8) ^ t).collect();
                let mut response = vec![0u8; 512];
                let n = host
                    .call_async(&request, &mut response)
                    .await
                    .expect("call");
                let mut expect = request.clone();
                expect.reverse();
                assert_eq!(&response[..n], &expect[..], "task {t} call {i}");
            }
        }));
    }
    for c in callers {
        c.await.unwrap();
    }
    for i in 0..3000u32 {
        let mut packet = [0u8; 1000];
        packet[..4].copy_from_slice(&i.to_le_bytes());
        host.send_async(&packet).await.expect("send");
    }
    assert_eq!(host.transactions_in_flight(), 0);
    drop(host);
    assert_eq!(
        server.await.unwrap(),
        3000,
        "every streamed packet, in order"
    );
}

#[tokio::test]
async fn an_async_receive_sees_garbage_and_a_departure() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let ep = stream_endpoint(
        a,
        StreamConfig::default(),
        Config::default().sleep_at_once(),
    )
    .unwrap();
    let mut raw = b;
    let writer = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(50));
        raw.write_all(&header(6, 0, 5, 0)).unwrap();
        raw
    });
    let mut buf = [0u8; 64];
    assert_eq!(
        ep.recv_async(&mut buf).await,
        Err(ChannelError::Failed(FailureCause::Frame(
            FrameError::Unaligned {
                what: "payload",
                len: 5
            }
        )))
    );
    drop(writer.await.unwrap());
    let (a, b) = UnixStream::pair().expect("socketpair");
    let ep = stream_endpoint(
        a,
        StreamConfig::default(),
        Config::default().sleep_at_once(),
    )
    .unwrap();
    let leaver = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(50));
        drop(b);
    });
    assert_eq!(ep.recv_async(&mut buf).await, Err(ChannelError::Closed));
    leaver.await.unwrap();
}
