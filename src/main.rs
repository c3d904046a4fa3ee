//! The `mnistflow` binary: telemetry, argument parsing, then [`mnistflow::run`].

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = mnistflow::Cli::parse();
    let default_filter = if matches!(cli.command, mnistflow::Command::Up(_)) { "info" } else { "warn" };
    mnistflow_nats::runtime::init_tracing_with_default(default_filter);
    mnistflow::run(cli).await
}
