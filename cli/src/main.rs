//! The `vmlink` command.
//!
//! `vmlink demo` is the first thing to run: a host process spawns a guest process, the two
//! exchange real data over vmlink-shm channels, and the command prints what they achieved
//! (round-trip latency polling and blocking, streaming throughput, doorbell signals per
//! packet, a file copied through the shared buffer area) beside a Unix socket baseline
//! measured between the same two processes in the same run, after checking every byte.
//!
//! ```text
//! cargo run --release -p vmlink-cli -- demo
//! cargo run --release -p vmlink-cli -- demo --quick --json
//! ```

mod demo;
mod disk;
mod error;
mod hash;
mod ic;
mod inspect;
mod ivshmem;
mod pattern;
mod pipe;
mod policy;
mod report;
mod secure;
mod stat;
mod takeover;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use error::Context as _;

/// vmlink: VMBus-compatible shared-memory rings and message channels.
#[derive(Debug, Parser)]
#[command(name = "vmlink", version, about)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Spawn a guest process, move real data to it over vmlink-shm channels, check every
    /// byte, and print latency, throughput and a file copy beside a Unix socket baseline.
    ///
    /// The host (this process) spawns `vmlink demo-guest` with `Service::spawn`; both
    /// processes then also share a polling channel and a plain Unix socket for the
    /// baseline. Exits with status 1 if any data check failed, 2 on an error.
    Demo(DemoArgs),
    /// Listen for one client and pipe bytes: stdin goes to the client, what the client
    /// sends comes out on stdout.
    ///
    /// Over shared memory (`--socket`: the Unix socket of vmlink-shm's handshake, which
    /// passes the memory and doorbells) or over a stream socket carrying vmlink packets:
    /// `--vsock CID:PORT` (AF_VSOCK, Linux), `--hybrid-vsock PATH:PORT` (a Firecracker /
    /// Cloud Hypervisor VMM's Unix socket PATH: serve listens on PATH_PORT, where the VMM
    /// delivers a guest's connections to PORT) or `--unix-stream PATH`.
    ///
    /// Both directions run at once; end of file on stdin finishes the outgoing one, and
    /// the command exits when both are finished. Progress is shown on stderr for long
    /// transfers when stderr is a terminal.
    ///
    /// The first client to complete the handshake is served. A client that fails it (an
    /// unknown service, bytes that are no handshake, silence past the 5-second handshake
    /// timeout) is refused with the reason and logged on stderr, and the command keeps
    /// listening. Fails at once if another `vmlink serve` is listening on the socket.
    ///
    /// Over `--socket`, a serving `vmlink serve` waits for a successor on SOCKET.takeover:
    /// `vmlink serve --socket SOCKET --take-over` takes the channel over (once the old
    /// one's stdin is finished), and the old one exits; the client notices nothing.
    Serve(ServeArgs),
    /// Connect to `vmlink serve` and pipe bytes: stdin goes to the server, what the server
    /// sends comes out on stdout.
    ///
    /// The same transports as `serve`; `--hybrid-vsock PATH:PORT` connects to the VMM's
    /// socket PATH and asks it for the guest's PORT (`CONNECT PORT`).
    ///
    /// Its outgoing direction finishes at end of file on stdin: to only receive, give it
    /// `< /dev/null` rather than a terminal.
    Connect(ConnectArgs),
    /// Decode a ring's memory read-only: the control page and every queued packet, or
    /// exactly which rule a corrupt ring breaks.
    ///
    /// PATH is a file holding a ring image, or a live channel's memfd as
    /// `/proc/PID/fd/N`; it is read once into private memory and never written. Exits
    /// with status 0 when every ring is sound, 1 when one is corrupt (after printing what
    /// could be decoded and the broken rule), 2 when the file cannot be read.
    ///
    /// Memory that starts with a vmlink memory header (every vmlink-shm channel's memfd,
    /// such as that of `vmlink serve` or `vmlink connect`) describes itself: every channel's
    /// two rings and the buffer area are decoded from it, with no flags (`--layout` and
    /// `--ring-data` are then ignored). Any other file is taken as one ring unless told
    /// otherwise, and the output says which layout it assumed; an image of a vmlink-shm
    /// channel from before the header is decoded with `--layout shm --ring-data BYTES`, the
    /// data bytes of each ring.
    Inspect(InspectArgs),
    /// Serve Hyper-V's integration services (heartbeat, shutdown, time sync, key-value
    /// pairs, file copy) on a socket, each on its own channel, until killed.
    ///
    /// The guest agent: `vmlink ic` commands connect to it. Every request is checked as
    /// hostile input; a bad one is answered with a failure and logged on stderr, and the
    /// service goes on. Shutdown only runs `--shutdown-command`; file copies only land in
    /// `--files-root`.
    Agent(ic::AgentArgs),
    /// Send integration-service requests to a running `vmlink agent`.
    ///
    /// Exits 0 on success, 1 when the agent refused the request (a key not found, a copy
    /// outside its root, a shutdown it is not configured to run), 2 on any other error.
    Ic(ic::IcArgs),
    /// List the live vmlink-shm channels of every process this user may see: service,
    /// role, peer, state, counters, calls in flight and how full each ring is.
    ///
    /// Every process with a vmlink-shm channel or listener publishes them on a socket in
    /// the runtime directory (`$XDG_RUNTIME_DIR/vmlink`, else `/run/user/UID/vmlink`, else
    /// `vmlink-UID` in the temp directory); reading them takes no lock of the channels'.
    /// Sockets of processes that died are counted as stale and ignored. Exits 0 (also
    /// when nothing is published), 2 when the directory cannot be read.
    Stat(stat::StatArgs),
    /// Show the live channels' rates per second (packets, bytes and signals each way),
    /// refreshed in place, like `top`.
    ///
    /// Reads what `vmlink stat` reads, every `--interval` seconds; a channel's rates are
    /// the differences of its counters over the time between its process's two answers.
    Top(stat::TopArgs),
    /// Check a role-based access policy file: that it loads (or which line is wrong), and
    /// what a principal (uid, groups, executable, key) may do under it.
    Policy(policy::PolicyArgs),
    /// Make a static key pair for `serve` / `connect --secure`: FILE (private, 0600) and
    /// FILE.pub (a public key line for the peer's `--peer-keys`).
    Keygen(KeygenArgs),
    /// A virtual disk over vmlink: `serve` an image to guests, or `bench` it beside
    /// qemu-nbd and the host's own pread/pwrite.
    Disk(disk::DiskArgs),
    /// Serve QEMU's `ivshmem-doorbell` devices their memory and doorbells (an ivshmem
    /// server, QEMU's protocol, on SOCKET), and pipe bytes with the first guest that runs
    /// the pipe: stdin goes to it, what it sends comes out on stdout.
    ///
    /// Start this first, then QEMU with `-chardev socket,path=SOCKET,id=ivs -device
    /// ivshmem-doorbell,chardev=ivs,vectors=2`; in the guest, `vmlink-ivshmem-guest
    /// connect` is the other end (as root: it maps the device's BARs). Both directions run
    /// at once; the command exits when both are finished, or with an error when the guest's
    /// QEMU goes away first. Stdin is not read before the guest's hello, and a peer that
    /// leaves before saying it is passed over. Other QEMU instances may connect as peers of
    /// their own (they share the memory: keep SOCKET in a private directory); a client that
    /// breaks the protocol (sends anything, stops reading) is dropped and logged, and the
    /// others go on. Fails at once if the socket is served.
    IvshmemServer(ivshmem::IvshmemServerArgs),
    /// The guest side of `vmlink demo` (spawned by it; not for direct use).
    #[command(hide = true)]
    DemoGuest(DemoGuestArgs),
}

/// Options of `vmlink demo`.
#[derive(Debug, Args)]
struct DemoArgs {
    /// Print the results as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Run each measurement briefly (about a second in all), e.g. for CI.
    #[arg(long)]
    quick: bool,
    /// Also compare a secure channel with a plain one: the host writes a key pair for each
    /// side, the guest connects both channels (the secure one through a Noise XX handshake
    /// with those keys), and round trips and 64 KiB streams go over each in turn.
    #[arg(long)]
    secure: bool,
    /// The secure channel's transport cipher.
    #[arg(long, value_enum, default_value = "chacha", requires = "secure")]
    cipher: secure::CipherArg,
}

/// Options of `vmlink serve`.
#[derive(Debug, Args)]
struct ServeArgs {
    /// Where to listen (exactly one).
    #[command(flatten)]
    at: pipe::Transport,
    /// The service name clients must ask for (`--socket` only: a stream carries one
    /// channel and no handshake).
    #[arg(long, default_value = pipe::DEFAULT_SERVICE, conflicts_with_all = pipe::STREAM_FLAGS)]
    service: String,
    /// Take the channel over from the `vmlink serve` running on the same `--socket` (it
    /// waits for a successor on SOCKET.takeover), then pipe on: the old one exits, the
    /// client notices nothing, and every byte comes out exactly once, on the old one's
    /// stdout up to the hand-over and on this one's after. The old one hands over once
    /// its own stdin is finished; this one's stdin is not read. A secure channel is taken
    /// over with its keys (no --secure here): its next packet starts a new key epoch.
    #[arg(long, conflicts_with_all = pipe::STREAM_FLAGS, conflicts_with = "secure")]
    take_over: bool,
    /// A role-based access policy (TOML; see `vmlink policy check`) for `--socket`: who may
    /// open the service. With `--secure` a client is judged after the secure handshake,
    /// so principals may name its key (`key = "SHA256:..."`). A denied client is refused,
    /// logged with who, what and why, and `serve` keeps listening.
    #[arg(long, value_name = "FILE", conflicts_with_all = pipe::STREAM_FLAGS, conflicts_with = "take_over")]
    policy: Option<PathBuf>,
    /// The secure channel.
    #[command(flatten)]
    secure: secure::SecureArgs,
}

/// Options of `vmlink connect`.
#[derive(Debug, Args)]
struct ConnectArgs {
    /// Where `vmlink serve` listens (exactly one).
    #[command(flatten)]
    at: pipe::Transport,
    /// The service name to ask for (`--socket` only).
    #[arg(long, default_value = pipe::DEFAULT_SERVICE, conflicts_with_all = pipe::STREAM_FLAGS)]
    service: String,
    /// The secure channel.
    #[command(flatten)]
    secure: secure::SecureArgs,
}

/// Options of `vmlink keygen`.
#[derive(Debug, Args)]
struct KeygenArgs {
    /// Where to write the private key (created with mode 0600, never replacing a file);
    /// the public key goes to FILE.pub.
    #[arg(value_name = "FILE")]
    path: PathBuf,
    /// A comment on the public key line (who the key is).
    #[arg(long, default_value = "")]
    comment: String,
}

/// Options of `vmlink inspect`.
#[derive(Debug, Args)]
struct InspectArgs {
    /// The file (or `/proc/PID/fd/N`) holding the ring memory.
    path: PathBuf,
    /// What the file holds: one ring, or a vmlink-shm channel's whole memory (two rings,
    /// then the buffer area).
    #[arg(long, value_enum, default_value = "ring")]
    layout: inspect::ImageLayout,
    /// With `--layout shm`: the data bytes of each ring (without its control page);
    /// `vmlink serve` and `vmlink connect` use 1048576.
    #[arg(long, default_value_t = 64 * 1024)]
    ring_data: u64,
    /// Packets listed per ring at most (the rest are counted).
    #[arg(long, default_value_t = 100)]
    max_packets: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Options of `vmlink demo-guest`.
#[derive(Debug, Args)]
struct DemoGuestArgs {
    /// The host's private directory holding the polling channel's and the baseline's
    /// sockets.
    #[arg(long)]
    dir: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => demo(&args),
        Command::Inspect(args) => {
            match inspect::run(
                &args.path,
                args.layout,
                args.ring_data,
                args.max_packets,
                args.json,
            ) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("vmlink inspect: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::DemoGuest(args) => status("demo-guest", demo::run_guest(&args.dir)),
        Command::Serve(args) => status(
            "serve",
            args.secure.prepare().and_then(|secure| {
                let access = match &args.policy {
                    Some(p) => Some(vmlink_policy::Policy::load(p).context("--policy")?),
                    None => None,
                };
                pipe::serve(
                    &args.at,
                    &args.service,
                    args.take_over,
                    secure.as_ref(),
                    access.as_ref(),
                )
            }),
        ),
        Command::Connect(args) => status(
            "connect",
            args.secure
                .prepare()
                .and_then(|secure| pipe::connect(&args.at, &args.service, secure.as_ref())),
        ),
        Command::Policy(args) => policy::run(&args),
        Command::Keygen(args) => status("keygen", secure::keygen(&args.path, &args.comment)),
        Command::Agent(args) => status("agent", ic::agent(&args)),
        Command::Disk(args) => match disk::run(&args) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("vmlink disk: {e}");
                ExitCode::from(2)
            }
        },
        Command::IvshmemServer(args) => status("ivshmem-server", ivshmem::run(&args)),
        Command::Stat(args) => status("stat", stat::stat(&args)),
        Command::Top(args) => status("top", stat::top(&args)),
        Command::Ic(args) => match ic::ic(&args) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("vmlink ic: {e}");
                ExitCode::from(2)
            }
        },
    }
}

/// The exit status for a command's result, printing the error if there is one.
fn status(command: &str, result: error::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmlink {command}: {e}");
            ExitCode::from(2)
        }
    }
}

/// Runs `vmlink demo`: measures, prints, and returns the exit status (0 when every byte
/// checked out, 1 on a mismatch, 2 on an error).
fn demo(args: &DemoArgs) -> ExitCode {
    let plan = if args.quick {
        demo::Plan::quick()
    } else {
        demo::Plan::full()
    };
    if !args.json {
        eprintln!(
            "vmlink demo: measuring (about {} s)...",
            if args.quick { "1" } else { "3" }
        );
    }
    let cipher = args.secure.then_some(args.cipher.into());
    let results = match demo::run(&plan, cipher) {
        Ok(results) => results,
        Err(e) => {
            eprintln!("vmlink demo: {e}");
            return ExitCode::from(2);
        }
    };
    if args.json {
        print!("{}", report::json(&results, args.quick));
    } else {
        print!("{}", report::table(&results));
    }
    if results.mismatches() == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "vmlink demo: data check failed: {} mismatches",
            results.mismatches()
        );
        ExitCode::from(1)
    }
}
