//! The stream link's data path allocates nothing: once warmed up, blocking sends and
//! receives on two threads (the sender meeting back-pressure, the receiver sleeping in
//! `poll`) and calls answered by a server thread make zero heap allocations on every thread
//! that touches the endpoints.
//!
//! A counting `#[global_allocator]` counts allocations per thread while that thread
//! measures; the link starts no threads of its own, so every allocation made for an
//! operation is made on the thread that called it. This binary holds only these tests.
//! `VMLINK_ALLOC_BACKTRACE=1` prints a backtrace for every counted allocation.
#![cfg(target_os = "linux")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use socket2::SockRef;
use vmlink_channel::{Config, Wait};
use vmlink_hvsock::link::{StreamConfig, StreamEndpoint, stream_endpoint};

struct Counting;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

thread_local! {
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

fn note_allocation() {
    // Const thread-locals of `Cell`s need no lazy initialisation, so this never allocates.
    let _ = MEASURING.try_with(|m| {
        if m.get() {
            COUNT.with(|c| c.set(c.get() + 1));
            if BACKTRACES.load(std::sync::atomic::Ordering::Relaxed) {
                // Capturing and printing allocate: stop counting meanwhile.
                m.set(false);
                eprintln!("{}", std::backtrace::Backtrace::force_capture());
                m.set(true);
            }
        }
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so
// `System`'s guarantees hold; the counting touches only const thread-locals.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract, passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Print a backtrace for every counted allocation (read once, as reading the environment
/// allocates).
static BACKTRACES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs `f` with this thread's allocations counted; returns the count.
fn measured(f: impl FnOnce()) -> u64 {
    if std::env::var_os("VMLINK_ALLOC_BACKTRACE").is_some_and(|v| v != "0") {
        BACKTRACES.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let before = COUNT.with(Cell::get);
    MEASURING.with(|m| m.set(true));
    f();
    MEASURING.with(|m| m.set(false));
    COUNT.with(Cell::get) - before
}

fn soon() -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(20))
}

/// A pair over a socketpair with small kernel buffers and an 8 KiB link, so sends wait for
/// room and receives sleep.
fn pair(config: Config) -> (StreamEndpoint, StreamEndpoint) {
    let (a, b) = UnixStream::pair().unwrap();
    for s in [&a, &b] {
        SockRef::from(s).set_send_buffer_size(4096).unwrap();
        SockRef::from(s).set_recv_buffer_size(4096).unwrap();
    }
    let link = StreamConfig::default().with_max_frame(8192);
    (
        stream_endpoint(a, link, config).unwrap(),
        stream_endpoint(b, link, config).unwrap(),
    )
}

const WARM_UP: u64 = 2_000;
const MEASURED: u64 = 20_000;

#[test]
fn blocking_sends_and_receives_allocate_nothing() {
    let (tx, rx) = pair(Config::default().sleep_at_once());
    let receiver = thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let mut take = |n: u64, first: u64| {
            for i in first..first + n {
                let r = rx.recv(&mut buf, soon()).expect("recv");
                assert_eq!(r.payload(&buf)[..8], i.to_le_bytes());
            }
        };
        take(WARM_UP, 0);
        measured(|| take(MEASURED, WARM_UP))
    });
    let mut packet = [7u8; 1000];
    let mut give = |n: u64, first: u64| {
        for i in first..first + n {
            packet[..8].copy_from_slice(&i.to_le_bytes());
            tx.send(&packet, soon()).expect("send");
        }
    };
    give(WARM_UP, 0);
    let sent = measured(|| give(MEASURED, WARM_UP));
    let received = receiver.join().unwrap();
    assert_eq!((sent, received), (0, 0), "allocations (sender, receiver)");
    assert!(tx.counters().send_waits > 0, "the sender met back-pressure");
}

#[test]
fn calls_allocate_nothing() {
    let (host, guest) = pair(Config::default().sleep_at_once());
    let server = thread::spawn(move || {
        let mut buf = [0u8; 256];
        let mut serve = |n: u64| {
            for _ in 0..n {
                let r = guest.recv(&mut buf, soon()).expect("request");
                let len = r.payload_len;
                guest
                    .complete(r.transaction_id, &buf[..len], Wait::Forever)
                    .expect("complete");
            }
        };
        serve(WARM_UP);
        measured(|| serve(MEASURED))
    });
    let mut response = [0u8; 256];
    let mut call = |n: u64, first: u64| {
        for i in first..first + n {
            let len = host
                .call(&i.to_le_bytes(), &mut response, Wait::Forever)
                .expect("call");
            assert_eq!(response[..len], i.to_le_bytes());
        }
    };
    call(WARM_UP, 0);
    let caller = measured(|| call(MEASURED, WARM_UP));
    let served = server.join().unwrap();
    assert_eq!((caller, served), (0, 0), "allocations (caller, server)");
}
