//! vmlink-ivshmem's protocol client against a hostile ivshmem server: what a tool that joins
//! a server as a peer (or QEMU's side of the protocol, as this crate's `Client` plays it)
//! takes from the socket. The input, raw:
//!
//! | bytes | meaning |
//! | --- | --- |
//! | 0 | the vectors the client expects (1 to 4) |
//! | then, per message (up to 64) | 1 byte of flags, 8 bytes of value (little-endian) |
//!
//! Flags: bit 0, an fd goes with the message (a memfd for value -1, else an eventfd); bit
//! 1, the message's 8 bytes are cut after `flags >> 5` bytes and the server hangs up there;
//! bit 2, two fds go with it; bit 3, the value is replaced by a well-formed one (the
//! version 0, the id 1, -1, or a peer id below 8, by position), so setups that get far are
//! common. A server thread sends the messages over a socket pair, then closes it.
//!
//! Asserted: no panic and no hang (every read is under a deadline, and the server's end
//! closes); a setup that succeeds has exactly the vectors asked for, the memory fd, and no
//! peer entry under its own id; each vector notified after it is the next of its peer's
//! list, each departure removes the peer, and the connection's end is an error, never a
//! timeout. No fd outlives the run (the count in `/proc/self/fd` is the same before and
//! after).
#![no_main]

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vmlink_ivshmem::client::{Client, Notification};
use vmlink_ivshmem::wire;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// One message the hostile server sends.
struct Msg {
    value: i64,
    fds: usize,
    cut: Option<usize>,
}

fn parse(data: &[u8]) -> (u16, Vec<Msg>) {
    let vectors = u16::from(data[0] % 4) + 1;
    let mut msgs = Vec::new();
    for (i, chunk) in data[1..].chunks_exact(9).take(64).enumerate() {
        let flags = chunk[0];
        let mut value = i64::from_le_bytes(chunk[1..9].try_into().unwrap());
        if flags & 8 != 0 {
            value = match i {
                0 => 0,
                1 => 1,
                2 => -1,
                _ => value.rem_euclid(8),
            };
        }
        let fds = if flags & 4 != 0 {
            2
        } else {
            usize::from(flags & 1)
        };
        let cut = (flags & 2 != 0).then_some(usize::from(flags >> 5));
        msgs.push(Msg { value, fds, cut });
    }
    (vectors, msgs)
}

/// The hostile server: sends every message as asked, then hangs up.
fn serve(sock: UnixStream, msgs: Vec<Msg>) {
    use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
    use std::io::IoSlice;
    use std::os::fd::{AsRawFd, OwnedFd};
    for m in msgs {
        let fds: Vec<OwnedFd> = (0..m.fds)
            .map(|_| {
                if m.value == wire::SHM_MESSAGE {
                    nix::sys::memfd::memfd_create(
                        c"fuzz-ivshmem",
                        nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
                    )
                    .unwrap()
                } else {
                    nix::sys::eventfd::EventFd::new().unwrap().into()
                }
            })
            .collect();
        let bytes = m.value.to_le_bytes();
        let len = m.cut.map_or(8, |c| c.min(8));
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        if len > 0 {
            let iov = [IoSlice::new(&bytes[..len])];
            if sendmsg::<UnixAddr>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                .is_err()
            {
                return;
            }
        }
        if m.cut.is_some() {
            return;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let before = open_fds();
    {
        let (vectors, msgs) = parse(data);
        let (ours, theirs) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || serve(theirs, msgs));
        match Client::from_stream(ours, vectors, Duration::from_secs(2)) {
            Ok(mut client) => {
                assert_eq!(client.own_vectors().len(), usize::from(vectors));
                let _ = client.memory().as_fd();
                assert!(!client.peers().contains_key(&client.id()));
                loop {
                    match client.next_notification(Duration::from_secs(2)) {
                        Ok(Some(Notification::PeerVector { id, vector })) => {
                            let got = if id == client.id() {
                                client.own_vectors().len()
                            } else {
                                client.peers().get(&id).map_or(0, Vec::len)
                            };
                            assert_eq!(usize::from(vector) + 1, got);
                        }
                        Ok(Some(Notification::PeerGone { id })) => {
                            assert!(!client.peers().contains_key(&id));
                        }
                        // Kinds this target does not know yet.
                        Ok(Some(_)) => {}
                        Ok(None) => panic!("the server hung up, yet a read timed out"),
                        Err(_) => break,
                    }
                }
            }
            Err(_) => {}
        }
        server.join().unwrap();
    }
    assert_eq!(open_fds(), before, "an fd outlived the run");
});
