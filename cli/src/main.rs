//! The `vmlink` command.
//!
//! `vmlink demo` is the first thing to run: two endpoints exchange real data over
//! VMBus-compatible rings and the command prints what they achieved (round-trip latency
//! polling and blocking, streaming throughput, doorbell signals per packet) beside a Unix
//! socket baseline measured in the same run, after checking every byte that crossed.
//!
//! ```text
//! cargo run --release -p vmlink-cli -- demo
//! cargo run --release -p vmlink-cli -- demo --quick --json
//! ```

mod doorbell;
mod error;
mod measure;
mod pattern;
mod report;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// vmlink: VMBus-compatible shared-memory ring buffers.
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
    /// Move real data between two endpoints over a pair of rings, check every byte, and
    /// print latency and throughput beside a Unix socket baseline.
    ///
    /// Both endpoints are threads of this process sharing heap memory (one ring each
    /// way). Exits with status 1 if any byte did not arrive as sent, 2 on an error.
    Demo(DemoArgs),
}

/// Options of `vmlink demo`.
#[derive(Debug, Args)]
struct DemoArgs {
    /// Print the results as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Run each measurement briefly (well under a second in all), e.g. for CI.
    #[arg(long)]
    quick: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => demo(&args),
    }
}

/// Runs `vmlink demo`: measures, prints, and returns the exit status (0 when every byte
/// checked out, 1 on a mismatch, 2 on an error).
fn demo(args: &DemoArgs) -> ExitCode {
    let plan = if args.quick {
        measure::Plan::quick()
    } else {
        measure::Plan::full()
    };
    if !args.json {
        eprintln!(
            "vmlink demo: measuring (about {} s)...",
            if args.quick { "0.5" } else { "3" }
        );
    }
    let results = match measure::run(&plan) {
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
