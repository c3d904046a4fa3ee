//! The `mnistflow` binary: telemetry, argument parsing, then [`mnistflow::run`].

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = mnistflow::Cli::parse();
    // `up` narrates the pipeline itself; stage logs show warnings and errors unless RUST_LOG says more.
    let default_filter = if matches!(cli.command, mnistflow::Command::Up(_)) { "warn,mnistflow=info" } else { "warn" };
    let telemetry = match mnistflow_runtime::init_tracing_with_default("mnistflow", default_filter) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let code = mnistflow::run(cli).await;
    // Exports the last spans before the process ends.
    drop(telemetry);
    code
}
