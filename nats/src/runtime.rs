//! Process plumbing shared by every binary: tracing and the shutdown token.

use tokio_util::sync::CancellationToken;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Initialises tracing once, first thing in `main`: JSON when `LOG_FORMAT=json`
/// (the cluster's ConfigMap sets it) or stderr is not a terminal, pretty otherwise;
/// the filter comes from `RUST_LOG` (default `info`).
pub fn init_tracing() {
    init_tracing_with_default("info");
}

/// Like [`init_tracing`] with another filter when `RUST_LOG` is unset (command-line
/// tools keep their output for results and use `warn`).
pub fn init_tracing_with_default(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = match std::env::var("LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("pretty" | "text") => false,
        _ => !std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        registry.with(fmt::layer().json().with_writer(std::io::stderr).with_current_span(true)).try_init()
    } else {
        registry.with(fmt::layer().with_writer(std::io::stderr)).try_init()
    };
    // A second call (tests, the umbrella CLI) keeps the first subscriber.
    drop(result);
}

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("Shutdown requested.");
        trigger.cancel();
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
