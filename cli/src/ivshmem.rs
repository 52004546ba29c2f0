//! `vmlink ivshmem-server`: an ivshmem server (QEMU's protocol) for `ivshmem-doorbell`
//! devices, sharing vmlink's channel memory, and a pipe over that channel with the first
//! guest: stdin goes to the guest, what the guest sends comes out on stdout, framed as
//! `vmlink serve` frames (the guest runs `vmlink-ivshmem-guest connect`, whose first frame,
//! maybe empty, is its hello).
//!
//! The pipe's guest is the first peer whose guest says hello: a peer that leaves before
//! (a stranger on the socket dropped for breaking the protocol, a QEMU that exits) is
//! passed over, and stdin is not read until the hello.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use clap::Args;
use std::io::Write;
use std::time::Instant;

use vmlink_channel::{ChannelError, Config};
use vmlink_ivshmem::channel::HostChannel;
use vmlink_ivshmem::memory::DEFAULT_MEMORY_LEN;
use vmlink_ivshmem::{IvshmemError, PeerId, Server, ServerConfig, ServerEvent};

use crate::error::{Context, Result, fail};
use crate::pipe;

/// Options of `vmlink ivshmem-server`.
#[derive(Debug, Args)]
pub struct IvshmemServerArgs {
    /// The Unix socket to listen on: QEMU's `-chardev socket,path=SOCKET`. A stale socket
    /// there is replaced; a live one is an error.
    #[arg(long, value_name = "SOCKET")]
    socket: PathBuf,
    /// Interrupt vectors per peer (1 to 64); give QEMU's device the same `vectors=`. The
    /// channel's doorbells use vector 0.
    #[arg(long, default_value_t = 2)]
    vectors: u16,
    /// The shared memory's size in bytes: a power of two from 65536 to 1073741824 (QEMU
    /// maps it as a PCI BAR).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MEMORY_LEN)]
    memory: u64,
    /// Data bytes of each of the channel's two rings (whole 4096-byte pages); the buffer
    /// area takes the rest of the memory.
    #[arg(long, value_name = "BYTES", default_value_t = pipe::RING_BYTES)]
    ring_data: u64,
    /// Serve the memory and doorbells only, logging peers on stderr until killed: no pipe.
    #[arg(long)]
    no_pipe: bool,
}

/// Logs one server event on stderr; returns the id of a peer that connected.
fn log(event: ServerEvent) -> Option<PeerId> {
    match event {
        ServerEvent::Connected { id } => {
            eprintln!("vmlink ivshmem-server: peer {id} connected");
            return Some(id);
        }
        ServerEvent::Disconnected { id } => eprintln!("vmlink ivshmem-server: peer {id} left"),
        ServerEvent::Dropped { id, error } => {
            eprintln!("vmlink ivshmem-server: dropped peer {id}: {error}")
        }
        ServerEvent::Refused { error } => {
            eprintln!("vmlink ivshmem-server: refused a connection: {error}")
        }
        other => eprintln!("vmlink ivshmem-server: {other:?}"),
    }
    None
}

/// Runs `vmlink ivshmem-server`.
pub fn run(args: &IvshmemServerArgs) -> Result<()> {
    let config = ServerConfig {
        vectors: args.vectors,
        memory_len: args.memory,
        ring_data: args.ring_data,
        ..ServerConfig::default()
    };
    let server = Server::bind(&args.socket, config).context("serve")?;
    eprintln!(
        "vmlink ivshmem-server: serving {} ({} bytes of memory, {} vectors); QEMU: -chardev socket,path={},id=ivs -device ivshmem-doorbell,chardev=ivs,vectors={}",
        args.socket.display(),
        args.memory,
        args.vectors,
        args.socket.display(),
        args.vectors
    );
    if args.no_pipe {
        loop {
            if let Some(e) = server.next_event(Duration::from_secs(3600)) {
                log(e);
            }
        }
    }
    let done = AtomicBool::new(false);
    let (first_tx, first_rx) = mpsc::channel();
    thread::scope(|s| {
        // Every event is logged; the first peer is the pipe's.
        s.spawn(|| {
            while !done.load(Ordering::Acquire) {
                if let Some(id) = server.next_event(Duration::from_millis(100)).and_then(log) {
                    let _ = first_tx.send(id);
                }
            }
        });
        let result = (|| {
            let (ch, hello) = loop {
                let id = first_rx
                    .recv()
                    .or_else(|_| fail("the server stopped before a guest connected"))?;
                if let Some(found) = hello(&server, id)? {
                    break found;
                }
            };
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&hello).context("write stdout")?;
            stdout.flush().context("write stdout")?;
            drop(stdout);
            let sent = AtomicU64::new(0);
            let received = AtomicU64::new(0);
            thread::scope(|p| {
                let outgoing = p.spawn(|| pipe::send_stdin(&ch, &sent));
                let incoming = pipe::receive_stdout(&ch, &received, None).map(|_| ());
                let outgoing = outgoing
                    .join()
                    .unwrap_or_else(|_| fail("the stdin thread panicked"));
                incoming.and(outgoing)
            })
        })();
        done.store(true, Ordering::Release);
        result
    })
}

/// The channel with peer `id` once its guest has said hello (its first frame, whose data
/// is returned); `None` when the peer left first, or was gone already (a stranger on the
/// socket, or a QEMU whose guest never ran the pipe), so the next peer is tried. Nothing
/// of stdin is read before the hello, so nothing is lost to a peer that never answers.
fn hello(server: &Server, id: PeerId) -> Result<Option<(HostChannel, Vec<u8>)>> {
    let ch = match server.channel(id, 0, Config::default()) {
        Ok(ch) => ch,
        Err(IvshmemError::UnknownPeer { .. }) => return Ok(None),
        Err(e) => return fail(format!("the channel with peer {id}: {e}")),
    };
    let mut buf = vec![0u8; ch.max_packet_len()];
    loop {
        match ch.recv(&mut buf, Some(Instant::now() + Duration::from_millis(100))) {
            Ok(r) => {
                let payload = r.payload(&buf);
                let Some((header, rest)) = payload.split_first_chunk::<8>() else {
                    return fail(format!("peer {id}'s first packet has no frame header"));
                };
                let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
                let Some(data) = rest.get(..len as usize) else {
                    return fail(format!("peer {id}'s first frame is longer than its packet"));
                };
                eprintln!("vmlink ivshmem-server: piping with peer {id}");
                return Ok(Some((ch, data.to_vec())));
            }
            Err(ChannelError::TimedOut | ChannelError::Empty) => {}
            Err(ChannelError::Closed) => {
                eprintln!("vmlink ivshmem-server: peer {id} left before its guest said hello");
                return Ok(None);
            }
            Err(e) => return fail(format!("the channel with peer {id}: {e}")),
        }
    }
}
