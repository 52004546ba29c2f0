//! Channel sets over vmlink-shm: sub-channels negotiated in the handshake, each with its
//! own rings, doorbells and socket pair in one memory; traffic on every channel at once,
//! one channel failing or closing without the others noticing.

use std::os::unix::net::UnixStream;
use std::thread;

use vmlink_channel::packet::GpaRange;
use vmlink_channel::{ChannelError, ChannelState, PacketMeta, Wait};
use vmlink_ring::{ControlWord, RingMem};
use vmlink_shm::{Endpoint, Guest, Layout, Service, ShmError};

/// A host of `service` and a guest asking for `asked` sub-channels, connected.
fn connect(service: Service, asked: Option<u32>) -> (Endpoint, Endpoint) {
    let (a, b) = UnixStream::pair().unwrap();
    let host = thread::spawn(move || service.serve_stream(a));
    let mut guest = Guest::new("set");
    if let Some(n) = asked {
        guest = guest.with_sub_channels(n);
    }
    let guest = guest.connect_stream(b).unwrap();
    (host.join().unwrap().unwrap(), guest)
}

fn service(max: u32) -> Service {
    Service::new("set")
        .with_layout(Layout::symmetric(4 * 4096, 16 * 4096))
        .with_sub_channels(max)
}

#[test]
fn the_host_offers_up_to_its_limit_and_every_channel_carries_its_own_traffic() {
    let (mut host, mut guest) = connect(service(2), Some(3));
    let (hs, gs) = (host.take_sub_channels(), guest.take_sub_channels());
    assert_eq!((hs.len(), gs.len()), (2, 2));
    assert_eq!(
        gs.iter().map(Endpoint::channel_index).collect::<Vec<_>>(),
        [1, 2]
    );
    // The memory header lists all three channels, back to back, then the buffer area.
    let header = guest.memory().header().unwrap();
    assert_eq!(header.layout.channels().len(), 3);
    let rings: Vec<u64> = header
        .layout
        .channels()
        .iter()
        .flat_map(|c| [c.guest_to_host.offset, c.host_to_guest.offset])
        .collect();
    assert_eq!(
        rings,
        (0..6).map(|i| 4096 + i * 5 * 4096).collect::<Vec<_>>()
    );
    let hosts: Vec<Endpoint> = std::iter::once(host).chain(hs).collect();
    let guests: Vec<Endpoint> = std::iter::once(guest).chain(gs).collect();
    // Each channel streams 20,000 packets each way at once, on threads of its own; every
    // packet says which channel and which packet it is.
    const N: u32 = 20_000;
    let stream = |ep: Endpoint, tag: u8| {
        thread::spawn(move || {
            let index = ep.channel_index();
            thread::scope(|s| {
                let sending = s.spawn(|| {
                    for i in 0..N {
                        let mut p = [tag; 24];
                        p[..4].copy_from_slice(&index.to_le_bytes());
                        p[4..8].copy_from_slice(&i.to_le_bytes());
                        ep.channel().send(&p, Wait::Forever).unwrap();
                    }
                });
                let mut buf = [0u8; 64];
                for i in 0..N {
                    let got = ep.channel().recv(&mut buf, Wait::Forever).unwrap();
                    let p = got.payload(&buf);
                    assert_eq!(u32::from_le_bytes(p[..4].try_into().unwrap()), index);
                    assert_eq!(u32::from_le_bytes(p[4..8].try_into().unwrap()), i);
                    assert!(p[8..24].iter().all(|&b| b == tag ^ 1), "channel {index}");
                }
                sending.join().unwrap();
            });
            ep
        })
    };
    let hosts: Vec<_> = hosts.into_iter().map(|e| stream(e, 0x10)).collect();
    let guests: Vec<_> = guests.into_iter().map(|e| stream(e, 0x11)).collect();
    let hosts: Vec<Endpoint> = hosts.into_iter().map(|t| t.join().unwrap()).collect();
    let guests: Vec<Endpoint> = guests.into_iter().map(|t| t.join().unwrap()).collect();
    for (h, g) in hosts.iter().zip(&guests) {
        let (hc, gc) = (h.channel().counters(), g.channel().counters());
        assert_eq!(
            (hc.packets_received, gc.packets_received),
            (N as u64, N as u64)
        );
        // Each channel rang its own doorbells: a signal one side sent is one the other
        // side's bell of this channel counted, not another channel's.
        assert!(hc.signals_sent > 0 && gc.signals_sent > 0, "{hc:?} {gc:?}");
    }
}

#[test]
fn sub_channels_share_the_buffer_area() {
    let (mut host, mut guest) = connect(service(1), Some(1));
    let (h1, g1) = (
        host.take_sub_channels().remove(0),
        guest.take_sub_channels().remove(0),
    );
    let page = guest.buffer().guest_pages().start;
    let offset = page as usize * 4096;
    guest
        .buffer()
        .write(offset, b"written by the guest")
        .unwrap();
    let pages = [page];
    let ranges = [GpaRange {
        byte_offset: 0,
        byte_count: 20,
        pages: &pages,
    }];
    g1.channel()
        .send_gpa_direct(&ranges, b"look", PacketMeta::in_band(), Wait::Forever)
        .unwrap();
    let named = h1
        .channel()
        .recv_with(Wait::Forever, |p| {
            let mut scratch = [0u8; 64];
            let r = p.gpa_ranges(&mut scratch)?.next().unwrap();
            Ok::<_, ChannelError>(r.pages().next().unwrap())
        })
        .unwrap()
        .unwrap();
    let mut got = [0u8; 20];
    // The host's primary and sub-channel views see the same area.
    host.buffer().read(named as usize * 4096, &mut got).unwrap();
    assert_eq!(&got, b"written by the guest");
    h1.buffer().read(offset, &mut got).unwrap();
    assert_eq!(&got, b"written by the guest");
}

#[test]
fn a_closed_sub_channel_ends_alone_on_either_side() {
    let (mut host, mut guest) = connect(service(3), Some(3));
    let mut hs = host.take_sub_channels();
    let mut gs = guest.take_sub_channels();
    // The guest closes sub-channel 1: the host's end sees its peer gone...
    let g1 = gs.remove(0);
    g1.channel().send(b"last words", Wait::Forever).unwrap();
    drop(g1);
    let h1 = hs.remove(0);
    let mut buf = [0u8; 32];
    let got = h1.channel().recv(&mut buf, Wait::Forever).unwrap();
    assert_eq!(
        &got.payload(&buf)[..10],
        b"last words",
        "what it committed still arrives"
    );
    assert_eq!(
        h1.channel().recv(&mut buf, Wait::Forever),
        Err(ChannelError::Closed)
    );
    // ...and the host closes sub-channel 3 on its side.
    drop(hs.remove(1));
    let g3 = gs.remove(1);
    assert_eq!(
        g3.channel().recv(&mut buf, Wait::Forever),
        Err(ChannelError::Closed)
    );
    // The primary and sub-channel 2 go on both ways.
    for (h, g) in [(&host, &guest), (&hs[0], &gs[0])] {
        h.channel().send(b"ping", Wait::Forever).unwrap();
        assert_eq!(
            &g.channel()
                .recv(&mut buf, Wait::Forever)
                .unwrap()
                .payload(&buf)[..4],
            b"ping"
        );
        g.channel().send(b"pong", Wait::Forever).unwrap();
        assert_eq!(
            &h.channel()
                .recv(&mut buf, Wait::Forever)
                .unwrap()
                .payload(&buf)[..4],
            b"pong"
        );
        assert_eq!(h.channel().state(), ChannelState::Open);
    }
    // Closing the primary leaves a sub-channel working too.
    drop(guest);
    assert_eq!(
        host.channel().recv(&mut buf, Wait::Forever),
        Err(ChannelError::Closed)
    );
    gs[0].channel().send(b"still here", Wait::Forever).unwrap();
    assert_eq!(
        &hs[0]
            .channel()
            .recv(&mut buf, Wait::Forever)
            .unwrap()
            .payload(&buf)[..10],
        b"still here"
    );
}

#[test]
fn a_sub_channel_the_peer_corrupts_fails_alone() {
    let (mut host, mut guest) = connect(service(2), Some(2));
    let hs = host.take_sub_channels();
    let gs = guest.take_sub_channels();
    // A hostile guest writes a write index no writer could: misaligned, past the ring.
    gs[0]
        .memory()
        .guest_to_host()
        .store_control(ControlWord::WriteIndex, 13);
    // No signal needed: a receive looks at the ring before it sleeps.
    let mut buf = [0u8; 32];
    let err = hs[0].channel().recv(&mut buf, Wait::Forever).unwrap_err();
    assert!(matches!(err, ChannelError::Failed(_)), "{err:?}");
    assert!(matches!(hs[0].channel().state(), ChannelState::Failed(_)));
    // The others never noticed.
    for (h, g) in [(&host, &guest), (&hs[1], &gs[1])] {
        g.channel().send(b"fine", Wait::Forever).unwrap();
        assert_eq!(
            &h.channel()
                .recv(&mut buf, Wait::Forever)
                .unwrap()
                .payload(&buf)[..4],
            b"fine"
        );
        assert_eq!(h.channel().state(), ChannelState::Open);
    }
}

#[test]
fn without_sub_channels_on_either_side_the_set_is_the_primary() {
    // A service that offers none answers a set hello with none.
    let (mut host, mut guest) = connect(service(0), Some(4));
    assert_eq!(
        (
            host.take_sub_channels().len(),
            guest.take_sub_channels().len()
        ),
        (0, 0)
    );
    assert_eq!(guest.memory().header().unwrap().layout.channels().len(), 1);
    // A guest that asks for none gets a plain offer from a service that has some.
    let (host, guest) = connect(service(4), None);
    assert_eq!(
        (host.sub_channel_count(), guest.sub_channel_count()),
        (0, 0)
    );
    guest.channel().send(b"x", Wait::Forever).unwrap();
    let mut buf = [0u8; 8];
    host.channel().recv(&mut buf, Wait::Forever).unwrap();
    // The set picks: the primary alone.
    let set = guest.into_set();
    assert_eq!(set.len(), 1);
    assert_eq!(set.by_key(99).unwrap().0, 0);
}

#[test]
fn asking_for_more_than_the_header_holds_is_refused_before_connecting() {
    let (_a, b) = UnixStream::pair().unwrap();
    let err = Guest::new("set")
        .with_sub_channels(64)
        .connect_stream(b)
        .unwrap_err();
    assert!(matches!(err, ShmError::Layout(_)), "{err}");
    assert!(err.to_string().contains("63"), "{err}");
    // A service configured past it is refused when it would serve.
    let (a, _b) = UnixStream::pair().unwrap();
    let err = Service::new("set")
        .with_sub_channels(64)
        .serve_stream(a)
        .unwrap_err();
    assert!(matches!(err, ShmError::Layout(_)), "{err}");
}

#[test]
fn a_set_picks_channels_by_key_and_cpu_and_hands_back_completions_on_the_same_channel() {
    let (mut host, guest) = connect(service(3), Some(3));
    let hosts: Vec<Endpoint> = std::iter::once(host.take_sub_channels())
        .flatten()
        .collect();
    let set = guest.into_set();
    assert_eq!(set.len(), 4);
    // Each host channel answers calls with its own index.
    let servers: Vec<_> = std::iter::once(host)
        .chain(hosts)
        .map(|h| {
            thread::spawn(move || {
                let mut buf = [0u8; 16];
                loop {
                    match h.channel().recv(&mut buf, Wait::Forever) {
                        Ok(r) => h
                            .channel()
                            .complete(
                                r.transaction_id,
                                &h.channel_index().to_le_bytes(),
                                Wait::Forever,
                            )
                            .unwrap(),
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    let mut reply = [0u8; 8];
    for key in 0..64u64 {
        let (index, ep) = set.by_key(key).unwrap();
        ep.channel()
            .call(b"who", &mut reply, Wait::Forever)
            .unwrap();
        assert_eq!(
            u32::from_le_bytes(reply[..4].try_into().unwrap()) as usize,
            index
        );
    }
    let (index, ep) = set.by_cpu().unwrap();
    ep.channel()
        .call(b"who", &mut reply, Wait::Forever)
        .unwrap();
    assert_eq!(
        u32::from_le_bytes(reply[..4].try_into().unwrap()) as usize,
        index
    );
    drop(set);
    for s in servers {
        s.join().unwrap();
    }
}
