//! `zeroscale-bench`: the harness behind `make bench` (BENCHMARKS.md explains the method).
//!
//! One binary plays every part so each part is a separate process, as in production:
//! `backend` (the HTTP server every proxy forwards to), `load` (the load generator),
//! `memory` (an activator loaded with N Functions, measured from outside) and `run`, which
//! starts the others, measures, prints the markdown table and writes the JSON file.

mod autoscale;
mod backend;
mod child;
mod coldstart;
mod datapath;
mod error;
mod haproxy;
mod http;
mod instructions;
mod load;
mod machine;
mod memory;
mod nginx;
mod procfs;
mod report;
mod run;
mod wrk;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The zeroscale benchmark harness.
#[derive(Debug, Parser)]
#[command(name = "zeroscale-bench", about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a small fixed body over HTTP/1.1 (the backend of every data-path run).
    Backend(backend::Args),
    /// Send keep-alive requests at a fixed concurrency and print the results as JSON.
    Load(load::Args),
    /// Load an activator with N Functions and print its memory as JSON.
    Memory(memory::Args),
    /// Run every benchmark, print the markdown table and write the JSON results.
    Run(run::Args),
    /// Count instructions per request of the proxies under callgrind, and nothing else.
    Count(run::CountArgs),
    /// Render the markdown of a JSON results file again (or put it into BENCHMARKS.md).
    Report(report::Args),
    /// Print the autoscaler table alone: simulated time, deterministic, no processes.
    Autoscaler,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Backend(args) => backend::main(args),
        Command::Load(args) => load::main(args),
        Command::Memory(args) => memory::main(args),
        Command::Run(args) => run::main(args),
        Command::Count(args) => run::count_main(args),
        Command::Report(args) => report::main(args),
        Command::Autoscaler => autoscale::main(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zeroscale-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
