//! iceoryx2 as a peer (only with the `iceoryx2` feature): its inter-process services
//! (`ipc`, shared memory under `/dev/shm`) between two threads of one process, polling.
//!
//! - `rtt_64/iceoryx2/request_response`: the measuring thread's client sends each 64-byte
//!   request with `send_copy` and spins on its pending response; the peer thread's server
//!   spins on `receive` and answers every request with a copy of it.
//! - `bulk/iceoryx2/publish_subscribe/<size>KiB`: a `[u8]` publish/subscribe service. The
//!   publisher loans an uninitialised sample of the packet's size, writes the stamped packet
//!   into it in place (`write_from_slice`, one pass over the shared memory, the same copy
//!   `vmlink/ring_copy` makes) and sends it; the subscriber copies each sample out (every
//!   byte read once, as the other consumers do) and checks its stamps. No overflow: a full
//!   subscriber queue (8 packets, the other cases' ring holds eight 64 KiB packets) makes
//!   `send` retry until it delivers (iceoryx2's own wait: yields, then sleeps).
//!
//! iceoryx2's `ipc` ports are not `Send`, so the peer thread builds its node and ports itself
//! ([`spawn_local`]). Service names carry the process id, so parallel runs never share a
//! service; nodes and ports are dropped when their benchmark ends (the peer's when its
//! thread exits). Neither side registers signal handlers.

use std::any::Any;
use std::cell::RefCell;
use std::process;

use iceoryx2::node::Node;
use iceoryx2::prelude::{
    BackpressureStrategy, Config, NodeBuilder, ServiceName, SignalHandlingMode, ipc,
};

use crate::harness::{
    BULK_STRIDE, Backoff, Check, Group, MSG, Msg, Peer, Round, bench_pair, msg, stamp, verify,
};

/// Subscriber queue depth of the bulk service.
const QUEUE: usize = 8;

/// A node of this process with iceoryx2's built-in defaults (no config file is looked up)
/// and no signal handlers.
fn new_node() -> Node<ipc::Service> {
    NodeBuilder::new()
        .config(&Config::default())
        .signal_handling_mode(SignalHandlingMode::Disabled)
        .create::<ipc::Service>()
        .expect("iceoryx2 node")
}

/// `vmlink-bench/<pid>/<what>`: unique to this process.
fn service_name(what: &str) -> ServiceName {
    let name = format!("vmlink-bench/{}/{what}", process::id());
    ServiceName::new(&name).expect("valid service name")
}

/// Spawns a [`Peer`] whose state `init` builds on the peer thread itself (iceoryx2's ports
/// are bound to their thread) and whose rounds run `body(state, iters)`. Returns once the
/// state exists (an untimed round of no messages), so the measuring side's first message
/// finds its peer connected. The state lives in the peer thread's thread-local slot and is
/// dropped when the thread exits.
fn spawn_local<S: 'static>(
    name: &str,
    init: impl FnOnce() -> S + Send + 'static,
    mut body: impl FnMut(&mut S, u64) -> u64 + Send + 'static,
) -> Peer {
    thread_local! {
        static STATE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
    }
    let mut init = Some(init);
    let mut peer = Peer::spawn(name, move |n| {
        STATE.with_borrow_mut(|slot| {
            let state = slot.get_or_insert_with(|| {
                let init = init.take().expect("the state is built once");
                Box::new(init())
            });
            body(state.downcast_mut::<S>().expect("this peer's state"), n)
        })
    });
    peer.start(0);
    peer.wait_finished();
    peer
}

/// `rtt_64/iceoryx2/request_response`.
pub fn request_response(g: &mut Group<'_>) {
    const NAME: &str = "iceoryx2/request_response";
    let service = service_name("rtt_64");
    let node = new_node();
    let rr = node
        .service_builder(&service)
        .request_response::<Msg, Msg>()
        .open_or_create()
        .expect("request/response service");
    let client = rr.client_builder().create().expect("client");

    let peer = spawn_local(
        "iceoryx2-server",
        move || {
            let node = new_node();
            let rr = node
                .service_builder(&service)
                .request_response::<Msg, Msg>()
                .open_or_create()
                .expect("request/response service");
            let server = rr.server_builder().create().expect("server");
            // Ports first, then their service and node.
            (server, rr, node, Check::new(8))
        },
        |(server, _, _, check), n| {
            for _ in 0..n {
                let mut b = Backoff::default();
                let req = loop {
                    match server.receive().expect("receive a request") {
                        Some(req) => break req,
                        None => b.snooze(),
                    }
                };
                let m = *req.payload();
                check.packet(&m);
                req.send_copy(m).expect("send the response");
            }
            check.round()
        },
    );

    let mut check = Check::new(8);
    let mut seq = 0u64;
    bench_pair(
        g,
        NAME,
        peer,
        move |n| {
            for _ in 0..n {
                let pending = client.send_copy(msg(seq)).expect("send a request");
                seq += 1;
                let mut b = Backoff::default();
                loop {
                    if let Some(resp) = pending.receive().expect("receive the response") {
                        check.packet(resp.payload());
                        break;
                    }
                    b.snooze();
                }
            }
            check.round()
        },
        move |first, n, r: Round| {
            verify(NAME, r.mine, first, n, MSG / 8);
            verify(NAME, r.theirs, first, n, MSG / 8);
        },
    );
    // `bench_pair` dropped the client (and the peer with its ports); the service and node
    // go last.
    drop(rr);
    drop(node);
}

/// `bulk/iceoryx2/publish_subscribe/<size>KiB`.
pub fn publish_subscribe(g: &mut Group<'_>, id: String, size: usize) {
    let service = service_name(&format!("bulk/{size}"));
    let node = new_node();
    let ps = node
        .service_builder(&service)
        .publish_subscribe::<[u8]>()
        .enable_safe_overflow(false)
        .subscriber_max_buffer_size(QUEUE)
        .history_size(0)
        .open_or_create()
        .expect("publish/subscribe service");
    let publisher = ps
        .publisher_builder()
        .initial_max_slice_len(size)
        .max_loaned_samples(1)
        .backpressure_strategy(BackpressureStrategy::RetryUntilDelivered)
        .create()
        .expect("publisher");

    let peer = spawn_local(
        "iceoryx2-subscriber",
        move || {
            let node = new_node();
            let ps = node
                .service_builder(&service)
                .publish_subscribe::<[u8]>()
                .enable_safe_overflow(false)
                .subscriber_max_buffer_size(QUEUE)
                .history_size(0)
                .open_or_create()
                .expect("publish/subscribe service");
            let subscriber = ps
                .subscriber_builder()
                .buffer_size(QUEUE)
                .create()
                .expect("subscriber");
            let dst = vec![0u8; size];
            (subscriber, ps, node, Check::new(BULK_STRIDE), dst)
        },
        |(subscriber, _, _, check, dst), n| {
            let mut b = Backoff::default();
            let mut got = 0;
            while got < n {
                match subscriber.receive().expect("receive a sample") {
                    Some(sample) => {
                        dst.copy_from_slice(sample.payload());
                        drop(sample);
                        check.packet(dst);
                        got += 1;
                    }
                    None => b.snooze(),
                }
            }
            check.round()
        },
    );

    let mut src = vec![0xa5u8; size];
    let mut seq = 0u64;
    let name = id.clone();
    let check_name = id.clone();
    bench_pair(
        g,
        id,
        peer,
        move |n| {
            for _ in 0..n {
                stamp(&mut src, seq, BULK_STRIDE, 0);
                seq += 1;
                let sample = publisher.loan_slice_uninit(size).expect("loan a sample");
                let sample = sample.write_from_slice(&src);
                let delivered = sample.send().expect("send the sample");
                assert_eq!(delivered, 1, "{name}: the subscriber is gone");
            }
            0
        },
        move |first, n, r: Round| verify(&check_name, r.theirs, first, n, size / BULK_STRIDE),
    );
    drop(ps);
    drop(node);
}
