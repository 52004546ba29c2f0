//! `rtt_64/vmlink/ivshmem_blocking_call`: the host's channel over an ivshmem server's memory
//! (`vmlink_ivshmem::Server::channel`) against a peer that joins the server the way QEMU
//! does (the protocol's client) and runs the guest's end of the channel over that same
//! memory with the eventfds QEMU is given: it rings the host's eventfd for vector 0 (what a
//! write to the guest's Doorbell register makes QEMU do) and wakes on its own vector 0
//! (what QEMU turns into the guest's interrupt). Everything but the VM itself, so the row
//! is what the transport costs on the host; `tests/qemu_boot.rs` in vmlink-ivshmem measures
//! the real guest under QEMU.

use std::time::Duration;

use vmlink_channel::fd::EventFdDoorbell;
use vmlink_channel::{Channel, Config};
use vmlink_ivshmem::client::Client;
use vmlink_ivshmem::{LOCAL_PEER, Server, ServerConfig, ServerEvent};

use crate::harness::Group;
use crate::rtt::vmlink_channel;

/// Registers the round trip of 64-byte calls over the ivshmem host channel.
pub fn call(g: &mut Group<'_>, name: &'static str, config: Config) {
    let dir = std::env::temp_dir().join(format!("vmlink-bench-ivshmem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory for the socket");
    let server = Server::bind(dir.join("ivshmem.sock"), ServerConfig::default()).expect("server");
    let peer = Client::connect(server.path(), 1, Duration::from_secs(5)).expect("a peer");
    // The server's thread registers the peer; its event says when.
    loop {
        match server.next_event(Duration::from_secs(5)) {
            Some(ServerEvent::Connected { id }) if id == peer.id() => break,
            Some(_) => {}
            None => panic!("the server never registered its peer"),
        }
    }
    let host = server
        .channel(peer.id(), 0, config)
        .expect("the host's channel");
    let memory = server.memory();
    let wait = peer.own_vectors()[0].try_clone().expect("dup");
    let ring = peer.peers()[&LOCAL_PEER][0].try_clone().expect("dup");
    let guest = Channel::new(
        memory.guest_to_host(),
        memory.host_to_guest(),
        EventFdDoorbell::from_fds(wait, ring),
        config,
    )
    .expect("the guest's channel");
    vmlink_channel(g, name, host, guest, true);
    drop((peer, server));
    let _ = std::fs::remove_dir_all(&dir);
}
