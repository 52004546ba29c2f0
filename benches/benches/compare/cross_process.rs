//! Two-process variants: the measuring process spawns this same bench binary again as a
//! child (the role in [`CHILD_ENV`]), which answers over a vmlink-shm channel (sealed memfd
//! rings, eventfd doorbells) or over a Unix socket / pipe pair given to it as stdin and
//! stdout. They register in the `rtt_64` and `stream_64` groups beside their in-process
//! twins, so the cross-process ratios come from the same run.
//!
//! The child checks every message it receives (order and content) and exits non-zero on a
//! mismatch; the parent checks every response and, when the benchmark ends, that the child
//! exited cleanly.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Instant;

use vmlink_channel::{ChannelError, Config};
use vmlink_shm::{Guest, Layout, Service, ShmChannel};

use crate::harness::{Backoff, Check, Group, MSG, expected, msg, send_batches, verify};
use vmlink_channel::Wait;

/// Names the child's role; the bench's `main` hands over to [`child_main`] when it is set.
pub const CHILD_ENV: &str = "VMLINK_BENCH_CHILD";

/// Data bytes of each shm ring: the same as the in-process rings they are compared with.
const RING: u64 = 16 * 4096;
/// Packets per commit when streaming, as in `stream_64`'s batched in-process case.
const BATCH: u64 = 32;

/// The child's side of each scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Completes every request over shm, spinning before it sleeps.
    ShmEchoPolling,
    /// Completes every request over shm, sleeping on the doorbell.
    ShmEchoBlocking,
    /// Takes streamed packets over shm in batches; answers a request with its checksum.
    ShmSink,
    /// Echoes 64-byte messages from stdin to stdout (a socket or pipes).
    StreamEcho,
}

impl Role {
    const ALL: [(Role, &'static str); 4] = [
        (Role::ShmEchoPolling, "shm-echo-polling"),
        (Role::ShmEchoBlocking, "shm-echo-blocking"),
        (Role::ShmSink, "shm-sink"),
        (Role::StreamEcho, "stream-echo"),
    ];

    fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(r, _)| *r == self)
            .map_or("", |(_, n)| n)
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, n)| *n == s).map(|(r, _)| *r)
    }

    fn config(self) -> Config {
        match self {
            Role::ShmEchoBlocking => Config::default(),
            _ => Config::polling(crate::rtt::SPIN),
        }
    }
}

/// The service name both sides use.
const SERVICE: &str = "vmlink-bench";

/// Runs the child role named in [`CHILD_ENV`], if any: `Some(exit code)` when this process
/// is a child.
pub fn child_main() -> Option<ExitCode> {
    let role = std::env::var(CHILD_ENV).ok()?;
    let Some(role) = Role::parse(&role) else {
        eprintln!("{CHILD_ENV}={role:?}: unknown role");
        return Some(ExitCode::from(2));
    };
    let ok = match role {
        Role::StreamEcho => stream_echo(),
        _ => {
            let end = Guest::new(SERVICE)
                .with_config(role.config())
                .from_env()
                .expect("connect to the measuring process");
            if role == Role::ShmSink {
                shm_sink(end.channel())
            } else {
                shm_echo(end.channel())
            }
        }
    };
    Some(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// Completes every request with its own payload until the parent leaves; false if a
/// request arrived out of order or changed.
fn shm_echo(ch: &ShmChannel) -> bool {
    let mut check = Check::new(8);
    let mut count = 0u64;
    let mut buf = [0u8; MSG];
    loop {
        match ch.recv(&mut buf, None) {
            Ok(r) => {
                check.packet(r.payload(&buf));
                count += 1;
                ch.complete(r.transaction_id, &buf, None)
                    .expect("complete the request");
            }
            Err(ChannelError::Closed) => return check.round() == expected(0, count, MSG / 8),
            Err(e) => panic!("echo: {e}"),
        }
    }
}

/// Takes streamed packets in batches of up to 64, spinning between them; a request marks
/// the end of a round and is completed with the round's checksum (the parent compares it
/// with the closed form).
fn shm_sink(ch: &ShmChannel) -> bool {
    // Polling with `recv_batch` (`Wait::Now`): the producer need not signal.
    ch.mask_interrupts();
    let mut check = Check::new(8);
    let mut buf = [0u8; MSG];
    let mut fence = None;
    let mut b = Backoff::default();
    loop {
        let got = ch.recv_batch(64, Wait::Now, |p| {
            let meta = p.meta();
            if meta.completion_requested {
                fence = Some(meta.transaction_id);
            } else {
                p.read_payload(0, &mut buf).expect("64-byte payload");
                check.packet(&buf);
            }
        });
        match got {
            Ok(0) => b.snooze(),
            Ok(_) => {}
            Err(ChannelError::Closed) => return true,
            Err(e) => panic!("sink: {e}"),
        }
        if let Some(tid) = fence.take() {
            let sum = check.round().to_le_bytes();
            ch.complete(tid, &sum, None).expect("complete the fence");
        }
    }
}

/// Echoes 64-byte messages from stdin to stdout until end of file; false on a wrong one.
fn stream_echo() -> bool {
    let mut rx = io::stdin().lock();
    let mut tx = io::stdout().lock();
    let mut check = Check::new(8);
    let mut count = 0u64;
    let mut buf = [0u8; MSG];
    loop {
        match rx.read_exact(&mut buf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return check.round() == expected(0, count, MSG / 8);
            }
            Err(e) => panic!("stream echo: {e}"),
        }
        check.packet(&buf);
        count += 1;
        tx.write_all(&buf).expect("echo");
        tx.flush().expect("flush");
    }
}

/// This bench binary again, as a child in `role`.
fn child_command(role: Role) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("the bench binary's path"));
    c.env(CHILD_ENV, role.name());
    c
}

/// A child process that must exit cleanly once the benchmark is over.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let status = child.wait().expect("wait for the child");
            if !std::thread::panicking() {
                assert!(status.success(), "bench child failed: {status}");
            }
        }
    }
}

/// Spawns a shm child in `role` and connects to it.
fn shm_child(role: Role) -> (ShmChannel, ChildGuard) {
    let (end, child) = Service::new(SERVICE)
        .with_layout(Layout::symmetric(RING, 0))
        .with_config(role.config())
        .spawn(&mut child_command(role))
        .expect("spawn the shm child");
    let (channel, _memory) = end.into_parts();
    (channel, ChildGuard(Some(child)))
}

/// `rtt_64` across processes: `call` over shm, the child completing each request.
pub fn shm_call(g: &mut Group<'_>, name: &str, polling: bool) {
    let role = if polling {
        Role::ShmEchoPolling
    } else {
        Role::ShmEchoBlocking
    };
    let (ch, child) = shm_child(role);
    let mut check = Check::new(8);
    let mut seq = 0u64;
    let mut buf = [0u8; MSG];
    g.bench_function(name, |b| {
        b.iter_custom(|n| {
            let first = seq;
            let start = Instant::now();
            for _ in 0..n {
                let len = ch.call(&msg(seq), &mut buf, None).expect("call");
                check.packet(&buf[..len]);
                seq += 1;
            }
            let took = start.elapsed();
            verify(name, check.round(), first, n, MSG / 8);
            took
        })
    });
    // The child sees the channel close, checks its tally and exits.
    drop(ch);
    drop(child);
}

/// `rtt_64` across processes over a byte stream: a Unix socketpair (`socket`) or two
/// pipes, the child echoing stdin to stdout.
pub fn stream_rtt(g: &mut Group<'_>, name: &str, socket: bool) {
    let mut cmd = child_command(Role::StreamEcho);
    if socket {
        let (mine, theirs) = UnixStream::pair().expect("socketpair");
        let theirs_out = theirs.try_clone().expect("dup");
        cmd.stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::from(OwnedFd::from(theirs_out)));
        let child = ChildGuard(Some(cmd.spawn().expect("spawn the socket child")));
        drop(cmd); // closes our copies of the child's ends
        let mut rx = mine.try_clone().expect("dup");
        let mut tx = mine;
        stream_rtt_loop(g, name, &mut tx, &mut rx);
        drop((tx, rx)); // end of file: the child checks its tally and exits
        drop(child);
    } else {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut c = cmd.spawn().expect("spawn the pipe child");
        let mut tx = c.stdin.take().expect("child stdin");
        let mut rx = c.stdout.take().expect("child stdout");
        let child = ChildGuard(Some(c));
        stream_rtt_loop(g, name, &mut tx, &mut rx);
        drop((tx, rx));
        drop(child);
    }
}

fn stream_rtt_loop(g: &mut Group<'_>, name: &str, tx: &mut dyn Write, rx: &mut dyn Read) {
    let mut check = Check::new(8);
    let mut seq = 0u64;
    let mut buf = [0u8; MSG];
    g.bench_function(name, |b| {
        b.iter_custom(|n| {
            let first = seq;
            let start = Instant::now();
            for _ in 0..n {
                tx.write_all(&msg(seq)).expect("request");
                seq += 1;
                rx.read_exact(&mut buf).expect("response");
                check.packet(&buf);
            }
            let took = start.elapsed();
            verify(name, check.round(), first, n, MSG / 8);
            took
        })
    });
}

/// `stream_64` across processes: batches of 32 over shm to a child that spins on
/// `recv_batch` (`Wait::Now`); each round ends with a request the child completes with its
/// checksum, so the time covers every packet's arrival.
pub fn shm_stream(g: &mut Group<'_>, name: &str) {
    let (ch, child) = shm_child(Role::ShmSink);
    let mut seq = 0u64;
    let mut sum = [0u8; 8];
    g.bench_function(name, |b| {
        b.iter_custom(|n| {
            let first = seq;
            let start = Instant::now();
            send_batches(&ch, &mut seq, first + n, BATCH);
            let len = ch.call(&[], &mut sum, None).expect("fence");
            let took = start.elapsed();
            assert_eq!(len, 8, "{name}: fence answer");
            verify(name, u64::from_le_bytes(sum), first, n, MSG / 8);
            took
        })
    });
    drop(ch);
    drop(child);
}
