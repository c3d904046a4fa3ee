//! Tracing, set up once first thing in `main` (its export over OTLP is
//! `mnistflow_nats::telemetry`'s).

use std::sync::atomic::{AtomicBool, Ordering};

use mnistflow_nats::ConfigError;
use mnistflow_nats::telemetry::{self, TelemetryConfig, TelemetryGuard};
use tracing_subscriber::{EnvFilter, Layer as _, fmt, prelude::*};

static INITIALISED: AtomicBool = AtomicBool::new(false);

/// Initialises tracing once, first thing in `main`: JSON when `LOG_FORMAT=json`
/// (the cluster's ConfigMap sets it) or stderr is not a terminal, pretty otherwise;
/// the filter comes from `RUST_LOG` (default `info`). Spans are exported over
/// OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, as `service` unless
/// `OTEL_SERVICE_NAME` says otherwise; keep the guard until the end of `main`.
///
/// # Errors
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is not an HTTP(S) URL.
pub fn init_tracing(service: &str) -> Result<TelemetryGuard, ConfigError> {
    init_tracing_with_default(service, "info")
}

/// Like [`init_tracing`] with another filter when `RUST_LOG` is unset (command-line
/// tools keep their output for results and use `warn`).
///
/// # Errors
/// As [`init_tracing`].
pub fn init_tracing_with_default(service: &str, default_filter: &str) -> Result<TelemetryGuard, ConfigError> {
    init_tracing_from_lookup(service, default_filter, &|key| std::env::var(key).ok())
}

/// [`init_tracing_with_default`] reading `LOG_FORMAT` and the telemetry variables
/// through `lookup` (tests export to a collector of their own without touching the
/// environment; `mnistflow up` defaults `LOG_FORMAT` to plain text).
/// Only the first call in a process installs anything; later calls return an
/// empty guard.
///
/// # Errors
/// As [`init_tracing`].
pub fn init_tracing_from_lookup(
    service: &str,
    default_filter: &str,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<TelemetryGuard, ConfigError> {
    let config = TelemetryConfig::from_lookup(lookup, service)?;
    if INITIALISED.swap(true, Ordering::SeqCst) {
        return Ok(TelemetryGuard::default());
    }
    let provider = config.tracer_provider()?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = match lookup("LOG_FORMAT").as_deref().map(str::trim) {
        Some("json") => true,
        Some("pretty" | "text") => false,
        _ => !std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    // Each layer has its own filter: RUST_LOG decides what is logged, not what is exported.
    let logs = if json {
        fmt::layer().json().with_writer(std::io::stderr).with_current_span(true).with_filter(filter).boxed()
    } else {
        // Colours only for a terminal: escape codes in a file or a pipe are noise.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).with_filter(filter).boxed()
    };
    let otel = provider.as_ref().map(telemetry::layer);
    // Another subscriber already installed (a test harness) keeps its place.
    if tracing_subscriber::registry().with(logs).with(otel).try_init().is_err() {
        return Ok(TelemetryGuard::default());
    }
    if let Some(endpoint) = config.traces_url().filter(|_| provider.is_some()) {
        telemetry::set_enabled();
        tracing::info!(%endpoint, service = %config.service_name, "Exporting traces over OTLP.");
    }
    Ok(TelemetryGuard::new(provider))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_endpoint_tracing_is_installed_without_an_exporter() {
        // The only test of this binary that installs the global subscriber.
        let guard = init_tracing_from_lookup("mnistflow-test", "off", &|_| None).unwrap();
        assert!(!guard.exporting(), "no exporter is built");
        assert!(!telemetry::enabled(), "the propagation helpers stay off");
        let span = tracing::debug_span!("batcher.queue");
        assert!(span.is_disabled(), "DEBUG spans cost nothing when nothing exports");
        assert!(telemetry::link_target(&span).is_none());
    }

    #[test]
    fn a_bad_endpoint_fails_fast_naming_the_variable() {
        let lookup = |k: &str| (k == telemetry::ENDPOINT_VAR).then(|| "localhost:4318".to_owned());
        let error = init_tracing_from_lookup("mnistflow-test", "off", &lookup).unwrap_err();
        assert_eq!(error.var, telemetry::ENDPOINT_VAR);
    }
}
