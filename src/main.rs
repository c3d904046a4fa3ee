//! The `mnistflow` binary: telemetry, argument parsing, then [`mnistflow::run`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = mnistflow::Cli::parse();
    let up = matches!(cli.command, mnistflow::Command::Up(_));
    // `up` trains and serves in this process: the inference image's malloc
    // settings, applied by re-executing once before any thread starts.
    let applied = if up {
        mnistflow_runtime::process::apply(mnistflow_runtime::process::UP)
    } else {
        mnistflow_runtime::process::Applied::AlreadySet
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli, up, &applied))
}

async fn run(cli: mnistflow::Cli, up: bool, applied: &mnistflow_runtime::process::Applied) -> ExitCode {
    // `up` narrates the pipeline itself; stage logs show warnings and errors unless RUST_LOG says more.
    // Rocket announces each launch at WARN ("Rocket has launched from ..."); each
    // stage logs the address it bound instead.
    let default_filter = if up { "warn,mnistflow=info,rocket::launch=error" } else { "warn" };
    // `up`'s log lines share the terminal with its plain narration: plain text too,
    // unless LOG_FORMAT=json asks for JSON (the narration then goes to stdout).
    let lookup = |key: &str| match std::env::var(key).ok() {
        None if up && key == "LOG_FORMAT" => Some("text".to_owned()),
        value => value,
    };
    let telemetry = match mnistflow_runtime::init_tracing_from_lookup("mnistflow", default_filter, &lookup) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    mnistflow_runtime::process::log(applied);
    let code = mnistflow::run(cli).await;
    // Exports the last spans before the process ends.
    drop(telemetry);
    code
}
