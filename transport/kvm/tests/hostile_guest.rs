//! The hostile-guest test: the bare-metal guest (`../guest`, modes 1..=6) sends a few good
//! packets, then corrupts its outgoing ring's indices or descriptors. The host must report
//! a corrupt channel (`Failed(Ring(..))`) and keep running the VM loop: the guest finishes
//! only after the host acknowledged the failure, with a `DONE` control write the host
//! still handles.
//!
//! Prints `SKIPPED: <reason>` where `/dev/kvm` is unusable, unless `VMLINK_REQUIRE_KVM=1`.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmlink_channel::Polled;
use vmlink_channel::Wait;
use vmlink_channel::{ChannelError, ChannelState, Config, Doorbell, FailureCause};
use vmlink_kvm::test_vm::{
    ACK, DOORBELL, GSI, HOSTILE_GOOD, MAILBOX, MAILBOX_MAGIC, TestVm, build_guest, kvm_or_skip,
    run_to_done, watchdog,
};
use vmlink_kvm::{KvmDoorbell, RingPages, host_channel};
use vmlink_ring::RingError;

/// The host's side: good packets first, then the failure, then the acknowledgement.
fn host_side(mem: &GuestMemoryMmap, bell: &KvmDoorbell, ready: mpsc::Receiver<()>) -> RingError {
    ready.recv().expect("the guest's mailbox");
    let magic: u64 = mem.read_obj(GuestAddress(MAILBOX)).unwrap();
    assert_eq!(magic, MAILBOX_MAGIC);
    let g2h: u64 = mem.read_obj(GuestAddress(MAILBOX + 8)).unwrap();
    let total: u64 = mem.read_obj(GuestAddress(MAILBOX + 16)).unwrap();
    let pages: Vec<u64> = (0..total.min(64))
        .map(|i| mem.read_obj(GuestAddress(MAILBOX + 24 + 8 * i)).unwrap())
        .collect();
    // SAFETY: `mem` is the `TestVm`'s mapping, which outlives this function; the host
    // touches the ring pages only through the rings, and the mailbox through vm-memory.
    let rings = unsafe { RingPages::new(mem, &pages, g2h as usize) }.expect("valid page list");
    let channel = host_channel(&rings, bell, Config::default()).expect("host channel");
    let mut buf = [0u8; 256];
    let mut good = 0u32;
    let deadline = Instant::now() + Duration::from_secs(20);
    let cause = loop {
        assert!(Instant::now() < deadline, "no failure after {good} packets");
        match channel.recv(&mut buf, Wait::Now).polled() {
            Ok(Some(r)) => {
                let p = r.payload(&buf);
                assert_eq!(p.len(), 40);
                assert_eq!(u32::from_le_bytes(p[..4].try_into().unwrap()), good);
                good += 1;
            }
            Ok(None) => {
                let _ = bell.wait(Some(Duration::from_millis(1)));
            }
            Err(ChannelError::Failed(FailureCause::Ring(e))) => break e,
            Err(e) => panic!("expected a corrupt ring, got {e}"),
        }
    };
    assert_eq!(
        good, HOSTILE_GOOD,
        "every good packet arrived before the corruption"
    );
    assert_eq!(
        channel.state(),
        ChannelState::Failed(FailureCause::Ring(cause))
    );
    // Every later call fails fast with the same cause.
    assert_eq!(
        channel.recv(&mut buf, Wait::Now).polled().map(|_| ()),
        Err(ChannelError::Failed(FailureCause::Ring(cause)))
    );
    assert_eq!(
        channel.send(b"x", Wait::Now),
        Err(ChannelError::Failed(FailureCause::Ring(cause)))
    );
    drop(channel);
    // Let the guest finish: the VM loop must still be running to see its DONE.
    mem.write_obj(1u64, GuestAddress(ACK)).unwrap();
    cause
}

/// Boots the guest in `mode`; returns the host's failure cause and the exits seen.
fn run(elf: &[u8], mode: u64) -> Option<(RingError, u64)> {
    let (kvm, vm) = kvm_or_skip()?;
    let mut tvm = TestVm::new(kvm, vm, elf, mode);
    let (vcpu, vm, mem) = tvm.split();
    let bell = KvmDoorbell::new(DOORBELL, GSI).unwrap();
    let registration = bell.register(vm).expect("register doorbells");
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut exits = 0u64;
    let cause = thread::scope(|s| {
        let host = s.spawn(|| host_side(mem, &bell, ready_rx));
        exits = run_to_done(vcpu, || ready_tx.send(()).unwrap());
        host.join().expect("host thread")
    });
    registration.unregister().expect("unregister doorbells");
    Some((cause, exits))
}

/// A guest mode, what it does, and the causes the host may report.
type Case = (u64, &'static str, fn(&RingError) -> bool);

#[test]
fn host_survives_a_hostile_guest() {
    if kvm_or_skip().is_none() {
        return;
    }
    let dog = watchdog(Duration::from_secs(120));
    let elf = std::fs::read(build_guest()).expect("the guest ELF");
    let cases: [Case; 6] = [
        (1, "write index past the end", |e| {
            matches!(e, RingError::IndexOutOfRange { .. })
        }),
        (2, "misaligned write index", |e| {
            matches!(e, RingError::IndexMisaligned { .. })
        }),
        // Behind what the host consumed, the index looks like a wrap that filled the
        // ring: the host catches it at the (zeroed) bytes it then takes for a packet.
        (3, "write index moved backwards", |e| {
            matches!(
                e,
                RingError::IndexMovedBackwards { .. } | RingError::UnknownPacketType { .. }
            )
        }),
        (4, "data offset inside the descriptor", |e| {
            matches!(e, RingError::DataOffsetTooSmall { .. })
        }),
        (5, "data offset past the packet", |e| {
            matches!(e, RingError::DataOffsetPastLength { .. })
        }),
        (6, "unknown packet type", |e| {
            matches!(e, RingError::UnknownPacketType { .. })
        }),
    ];
    for (mode, what, expected) in cases {
        let t = Instant::now();
        let (cause, exits) = run(&elf, mode).expect("KVM probed above");
        println!(
            "hostile guest, {what}: host reports \"{cause}\" ({exits} exits, {:?})",
            t.elapsed()
        );
        assert!(expected(&cause), "{what}: unexpected cause {cause:?}");
    }
    let _ = dog.send(());
}
