//! `vmlink policy check`: validates a policy file and explains what a principal may do.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use vmlink_policy::{Peer, Policy, PolicyError};

/// Options of `vmlink policy`.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// What to do.
    #[command(subcommand)]
    command: PolicyCommand,
}

/// The policy subcommands.
#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate a policy file (exit 0 when it loads, 1 when it does not, naming the line);
    /// with a principal (`--uid`, `--gid`, `--exe`, `--key`), explain what it may do, and
    /// with `--service` (and `--operation`) decide that one request (exit 1 on deny).
    Check(CheckArgs),
}

/// Options of `vmlink policy check`.
#[derive(Debug, Args)]
struct CheckArgs {
    /// The policy file (TOML).
    file: PathBuf,
    /// The principal's uid.
    #[arg(long, requires = "gid")]
    uid: Option<u32>,
    /// One of the principal's groups (give each: the primary one first).
    #[arg(long)]
    gid: Vec<u32>,
    /// The principal's executable.
    #[arg(long)]
    exe: Option<PathBuf>,
    /// The principal's secure-channel key fingerprint (SHA256:...).
    #[arg(long)]
    key: Option<String>,
    /// Decide opening this service (or, with `--operation`, an operation in it).
    #[arg(long, requires = "uid")]
    service: Option<String>,
    /// The operation to decide (e.g. kvp.read, shutdown).
    #[arg(long, requires = "service")]
    operation: Option<String>,
}

/// Runs `vmlink policy`; the exit status.
pub fn run(args: &PolicyArgs) -> ExitCode {
    let PolicyCommand::Check(c) = &args.command;
    let policy = match Policy::load(&c.file) {
        Ok(p) => p,
        Err(e @ PolicyError::Invalid { .. }) => {
            eprintln!("vmlink policy: {e}");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("vmlink policy: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "{}: valid: {} roles, {} principals; everything not granted is denied",
        c.file.display(),
        policy.roles(),
        policy.principals()
    );
    let Some(uid) = c.uid else {
        return ExitCode::SUCCESS;
    };
    let peer = Peer {
        uid,
        gids: c.gid.clone(),
        exe: c.exe.clone(),
        key: c.key.clone(),
        pid: None,
    };
    print!("{}", policy.explain(&peer));
    let Some(service) = &c.service else {
        return ExitCode::SUCCESS;
    };
    let decision = policy.decide(&peer, service, c.operation.as_deref());
    println!("{}", decision.audit_line());
    if decision.allowed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
