//! A peer cannot make a channel allocate: its heap stays bounded by what the channel's
//! owner configured (the queue's bytes) and by what its callers asked to receive (their
//! response buffers), however large the packets the peer sends.
//!
//! A `#[global_allocator]` wraps `std::alloc::System` and keeps the process's live heap
//! bytes and their peak. Each scenario builds everything it needs first (rings, payloads,
//! threads' buffers), then resets the peak, lets a hostile peer send only maximum-size
//! packets and completions, and asserts the peak above the starting point. This binary
//! holds only these tests, and they take a lock so they never overlap, as the design asks
//! for tests that count process-wide things.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vmlink_channel::Polled;
use vmlink_channel::Wait;
use vmlink_channel::{ChannelError, Config, in_process_channel_pair};

struct Peak;

#[global_allocator]
static ALLOCATOR: Peak = Peak;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(size: usize) {
    let now = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so
// `System`'s guarantees hold; the bookkeeping touches only atomics.
unsafe impl GlobalAlloc for Peak {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation above is).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grew(new_size);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as for `dealloc`; `new_size` is the caller's, passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

static SERIAL: Mutex<()> = Mutex::new(());

/// Starts measuring: returns the live heap now, and the peak is reset to it.
fn start() -> usize {
    let now = LIVE.load(Ordering::SeqCst);
    PEAK.store(now, Ordering::SeqCst);
    now
}

/// The peak since `start`, above its starting point.
fn peak_since(base: usize) -> usize {
    PEAK.load(Ordering::SeqCst).saturating_sub(base)
}

/// Rings with room for the largest packet VMBus can describe (524,280 bytes) twice.
const RING: usize = 2 << 20;
const KIB: usize = 1024;

#[test]
fn a_flood_of_maximum_size_packets_meets_the_queue_bound() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let queue_bytes = 1 << 20;
    let (host, guest) =
        in_process_channel_pair(RING, Config::default().with_queue_bytes(queue_bytes)).unwrap();
    let max = guest.max_packet_len() - 16;
    let payload = vec![0xA5u8; max];
    let base = start();
    let peer = thread::spawn(move || {
        // The hostile peer: takes the request, never completes it, and sends only
        // maximum-size unsolicited packets as fast as the ring takes them.
        let mut buf = [0u8; 64];
        host.recv(&mut buf, Some(Instant::now() + Duration::from_secs(10)))
            .unwrap();
        let mut sent = 0usize;
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            match host.send(&payload, Some(Instant::now() + Duration::from_millis(50))) {
                Ok(()) => sent += 1,
                Err(ChannelError::TimedOut) => {}
                Err(e) => panic!("peer: {e}"),
            }
        }
        sent
    });
    // The caller waits for a completion that never comes, queueing what arrives meanwhile
    // until the queue is full by bytes; then the peer meets back-pressure.
    let mut response = [0u8; 64];
    let r = guest.call(
        b"request",
        &mut response,
        Some(Instant::now() + Duration::from_millis(1500)),
    );
    assert_eq!(r, Err(ChannelError::TimedOut));
    let sent = peer.join().unwrap();
    let peak = peak_since(base);
    // The queue's one buffer, plus a little for the threads' own bookkeeping. Before the
    // queue was bounded by bytes, 64 packets of 512 KiB each (32 MiB) could wait.
    assert!(
        peak <= queue_bytes + 64 * KIB,
        "peak heap {peak} bytes above the start (queue bound {queue_bytes}), peer sent {sent} packets"
    );
    // Both packets the queue holds, then the ones left in the ring, are there to receive.
    let mut buf = vec![0u8; max + 64];
    let mut received = 0;
    loop {
        let r = match guest.recv(&mut buf, Wait::Now).polled() {
            Ok(Some(r)) => r,
            Ok(None) | Err(ChannelError::Closed) => break,
            Err(e) => panic!("receive: {e}"),
        };
        assert_eq!(r.payload_len, max.div_ceil(8) * 8);
        assert!(buf[..max].iter().all(|b| *b == 0xA5));
        received += 1;
    }
    assert_eq!(received, sent, "nothing the peer committed was lost");
}

#[test]
fn oversized_completions_are_not_stored() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (host, guest) = in_process_channel_pair(RING, Config::default()).unwrap();
    let max = guest.max_packet_len() - 16;
    let payload = vec![0x5Au8; max];
    const CALLERS: usize = 16;
    let guest = Arc::new(guest);
    let base = start();
    let peer = thread::spawn(move || {
        // Completes every request with the largest completion the ring carries.
        let mut buf = [0u8; 64];
        for _ in 0..CALLERS {
            let r = host
                .recv(&mut buf, Some(Instant::now() + Duration::from_secs(10)))
                .unwrap();
            host.complete(
                r.transaction_id,
                &payload,
                Some(Instant::now() + Duration::from_secs(10)),
            )
            .unwrap();
        }
        host
    });
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let guest = guest.clone();
            thread::spawn(move || {
                let mut response = [0u8; 64];
                guest.call(
                    b"request",
                    &mut response,
                    Some(Instant::now() + Duration::from_secs(10)),
                )
            })
        })
        .collect();
    for c in callers {
        // Each completion is consumed and reported with its real length.
        assert_eq!(
            c.join().unwrap(),
            Err(ChannelError::BufferTooSmall {
                needed: max.div_ceil(8) * 8,
                capacity: 64
            })
        );
    }
    let _host = peer.join().unwrap();
    let peak = peak_since(base);
    // Sixteen threads' own bookkeeping; before completions were bounded by the caller's
    // buffer, each slot kept a copy of its 512 KiB completion (8 MiB here).
    assert!(peak <= 256 * KIB, "peak heap {peak} bytes above the start");
    assert_eq!(
        guest.transactions_in_flight(),
        0,
        "every slot is free again"
    );
    assert_eq!(
        guest.state(),
        vmlink_channel::ChannelState::Open,
        "the channel goes on"
    );
}
