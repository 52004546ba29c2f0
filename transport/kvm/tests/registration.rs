//! Tearing a doorbell down leaves no registration behind: KVM refuses a second ioeventfd
//! on an address already taken, and accepts one again once the first registration is
//! dropped or unregistered.

use vmlink_kvm::KvmDoorbell;
use vmlink_kvm::test_vm::{DOORBELL, GSI, kvm_or_skip};

#[test]
fn unregistering_frees_the_address_and_the_gsi() {
    let Some((_kvm, vm)) = kvm_or_skip() else {
        return;
    };
    vm.create_irq_chip().expect("irqchip");
    let first = KvmDoorbell::new(DOORBELL, GSI).expect("doorbell");
    let second = KvmDoorbell::new(DOORBELL, GSI).expect("doorbell");

    let registration = first.register(&vm).expect("register");
    assert!(
        second.register(&vm).is_err(),
        "KVM refuses a second ioeventfd on the same address while the first is registered"
    );
    // Dropping the registration unregisters both eventfds.
    drop(registration);
    let again = second
        .register(&vm)
        .expect("the address is free again after a drop");
    // And the explicit form does the same.
    again.unregister().expect("unregister");
    first
        .register(&vm)
        .expect("free again after unregister")
        .unregister()
        .expect("unregister");
}
