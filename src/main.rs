//! The `zeroscale` command: `operator`, `activator`, `dev` and `crd`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use zeroscale::telemetry::{self, LogFormat};

/// zeroscale runs HTTP workloads on Kubernetes that scale to zero when idle.
#[derive(Debug, Parser)]
#[command(name = "zeroscale", version, about, long_about = None)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "ZEROSCALE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller: reconciles Functions into Deployments, Services and routing,
    /// and scales them with their load (leader-elected, run two for availability).
    Operator(zeroscale::operator::Config),
    /// Run the data plane: routes requests to Functions, holds them while a Function
    /// wakes from zero, balances across replicas.
    Activator(zeroscale::activator::Config),
    /// Run Functions locally without a cluster: each replica is a process on this
    /// machine, behind the same activator and autoscaler.
    Dev(zeroscale::dev::Config),
    /// Print the Function CustomResourceDefinition (the YAML in crds/).
    Crd,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Crd = cli.command {
        return match zeroscale::api::crd::function_crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    telemetry::init_tracing(cli.log_format, "info,kube=warn,hyper=warn");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Operator(c) => zeroscale::operator::run(c).await,
            Command::Activator(c) => zeroscale::activator::run(c).await,
            Command::Dev(c) => zeroscale::dev::run(c).await,
            Command::Crd => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "exiting");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
