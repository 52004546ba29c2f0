//! Async waits on the ioeventfd (the `tokio` feature): a host channel over page-list rings
//! in `vm-memory` guest memory awaits packets with `recv_async` on a tokio runtime while a
//! stand-in guest on a thread sends them and rings the `KvmDoorbell`'s ioeventfd, which is
//! what KVM does on the guest's MMIO write.

use std::thread;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmlink_channel::{AsyncDoorbell, Channel, ChannelError, Config, EventFdDoorbell};
use vmlink_kvm::{KvmDoorbell, RingPages, host_channel};
use vmlink_ring::init_control;

const PACKETS: u32 = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_awaits_the_guests_doorbell() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let pages = [0x20, 0x31, 0x22, 0x40, 0x35, 0x27];
    // SAFETY: `mem` is an anonymous mapping owned by this test, dropped after the rings;
    // nothing else touches the ring pages.
    let rings = unsafe { RingPages::new(&mem, &pages, 3) }.expect("valid page list");
    init_control(&rings.guest_to_host());
    init_control(&rings.host_to_guest());
    let bell = KvmDoorbell::new(0x3000_0000, 5).unwrap();
    // The stand-in guest waits on the irqfd and rings the ioeventfd.
    let guest_bell = EventFdDoorbell::from_fds(
        bell.irq_fd().try_clone().expect("dup"),
        bell.ioevent_fd().try_clone().expect("dup"),
    );
    let host = host_channel(&rings, &bell, Config::default()).expect("host channel");

    // Nothing rang yet: a wait is pending (and registers with the reactor).
    let quick = tokio::time::timeout(
        Duration::from_millis(20),
        std::future::poll_fn(|cx| bell.poll_wait(cx)),
    )
    .await;
    assert!(quick.is_err(), "no ring, no wake");

    let t = Instant::now();
    thread::scope(|s| {
        let guest = Channel::new(
            rings.guest_to_host(),
            rings.host_to_guest(),
            guest_bell,
            Config::default(),
        )
        .expect("guest channel");
        s.spawn(move || {
            for i in 0..PACKETS {
                guest
                    .send(
                        &u64::from(i).to_le_bytes(),
                        Some(Instant::now() + Duration::from_secs(10)),
                    )
                    .expect("send");
                if i % 100 == 0 {
                    // Let the host go to sleep on the eventfd.
                    thread::sleep(Duration::from_millis(1));
                }
            }
        });
        let rt = tokio::runtime::Handle::current();
        tokio::task::block_in_place(|| {
            rt.block_on(async {
                let mut buf = [0u8; 64];
                for i in 0..PACKETS {
                    let r = host.recv_async(&mut buf).await.expect("receive");
                    assert_eq!(r.payload(&buf), &u64::from(i).to_le_bytes());
                }
            })
        });
    });
    let wakes = bell.wakes();
    println!(
        "tokio: {PACKETS} packets awaited in {:?}, {wakes} async wakes on the ioeventfd",
        t.elapsed()
    );
    assert!(wakes >= 1, "the host slept on the ioeventfd at least once");

    // The VM stops: a waiting task wakes and the channel reports the close.
    let mut buf = [0u8; 64];
    let (r, ()) = tokio::join!(host.recv_async(&mut buf), async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        bell.close();
    });
    assert_eq!(r.map(|_| ()), Err(ChannelError::Closed));
}
