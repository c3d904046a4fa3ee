//! Distributed tracing: one trace per prediction and per training run, exported
//! over OTLP (HTTP/protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` is set and off
//! otherwise (no exporter, no OpenTelemetry layer, no header parsing).
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` | the collector's OTLP/HTTP base URL; spans go to `<it>/v1/traces` | unset: no export |
//! | `OTEL_SERVICE_NAME` | `service.name` of the exported spans | the binary's name (`mnistflow-web`, ...) |
//!
//! `tracing` spans become OpenTelemetry spans through `tracing-opentelemetry`;
//! only our own crates' spans (`mnistflow*` targets, `DEBUG` and up, whatever
//! `RUST_LOG` says) are exported, with their `INFO`-and-up events. The W3C trace
//! context (`traceparent`, `tracestate`) crosses process boundaries in HTTP
//! headers ([`set_parent_from_http`]) and NATS message headers
//! ([`inject_nats`], [`set_parent_from_nats`]); a batched forward pass is linked
//! to the trace of each request it serves ([`link`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::{ConfigError, var};

/// The collector's base URL; unset means no export.
pub const ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The exported `service.name`.
pub const SERVICE_NAME_VAR: &str = "OTEL_SERVICE_NAME";

/// Set once an exporting layer is installed: the propagation helpers do nothing before.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Switches the propagation helpers on (`mnistflow-runtime` calls it once it installed the exporting layer).
pub fn set_enabled() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether spans are exported in this process.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Trace export settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// Where `POST /v1/traces` goes; `None`: tracing stays local (logs only).
    pub endpoint: Option<url::Url>,
    pub service_name: String,
}

impl TelemetryConfig {
    /// Reads `OTEL_EXPORTER_OTLP_ENDPOINT` and `OTEL_SERVICE_NAME` (default `service`).
    ///
    /// # Errors
    /// The endpoint is not an `http(s)://` URL.
    pub fn from_lookup(lookup: &impl Fn(&str) -> Option<String>, service: &str) -> Result<Self, ConfigError> {
        // Literal names: k8s/check finds the variables the services read by these calls.
        let endpoint: Option<url::Url> = var(lookup, "OTEL_EXPORTER_OTLP_ENDPOINT")?;
        if let Some(url) = &endpoint
            && !matches!(url.scheme(), "http" | "https")
        {
            return Err(ConfigError::new(
                ENDPOINT_VAR,
                format!("expected an http:// or https:// URL (OTLP over HTTP), got {url}"),
            ));
        }
        let service_name = var(lookup, "OTEL_SERVICE_NAME")?.unwrap_or_else(|| service.to_owned());
        Ok(Self { endpoint, service_name })
    }

    /// The URL spans are posted to: the endpoint with `/v1/traces` appended, as the
    /// OTLP specification says for the signal-independent variable.
    pub fn traces_url(&self) -> Option<String> {
        self.endpoint.as_ref().map(|e| format!("{}/v1/traces", e.as_str().trim_end_matches('/')))
    }

    /// The tracer provider exporting to the endpoint in batches from a thread of
    /// its own, or `None` (nothing built) when no endpoint is set.
    ///
    /// # Errors
    /// The exporter cannot be built.
    pub fn tracer_provider(&self) -> Result<Option<SdkTracerProvider>, ConfigError> {
        let Some(url) = self.traces_url() else { return Ok(None) };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .build()
            .map_err(|e| ConfigError::new(ENDPOINT_VAR, format!("cannot build the OTLP exporter: {e}")))?;
        let resource = Resource::builder().with_service_name(self.service_name.clone()).build();
        Ok(Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build()))
    }
}

/// Flushes and stops the exporter when dropped (keep it alive in `main`).
#[derive(Debug, Default)]
#[must_use = "dropping the guard stops exporting spans"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// A guard over `provider` (built by `mnistflow-runtime`'s tracing set-up).
    pub fn new(provider: Option<SdkTracerProvider>) -> Self {
        Self { provider }
    }

    /// Whether this guard holds an exporter.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports every finished span now (blocking: call it off the async workers).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(e) = provider.force_flush()
        {
            tracing::warn!(error = %e, "Exporting spans failed.");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            ENABLED.store(false, Ordering::Relaxed);
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "Flushing spans at exit failed.");
            }
        }
    }
}

/// The OpenTelemetry layer over `provider`, for `mnistflow-runtime`'s tracing set-up to install.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S> + use<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    let tracer = provider.tracer("mnistflow");
    // Our own spans from DEBUG (the queueing and forward-pass spans are DEBUG, so
    // they cost nothing when nothing exports), and the notable events inside them.
    let ours = tracing_subscriber::filter::filter_fn(|meta| {
        meta.target().starts_with("mnistflow")
            && if meta.is_span() {
                *meta.level() <= tracing::Level::DEBUG
            } else {
                *meta.level() <= tracing::Level::INFO
            }
    });
    tracing_opentelemetry::layer().with_tracer(tracer).with_threads(false).with_filter(ours)
}

/// Makes `span` a child of the remote span in `traceparent` (and `tracestate`),
/// as sent by a browser, a proxy or another service. Does nothing when tracing
/// is off or the header is missing or malformed (the span starts a new trace).
pub fn set_parent_from_http(span: &Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    if !enabled() {
        return;
    }
    let Some(traceparent) = traceparent else { return };
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert("traceparent".to_owned(), traceparent.to_owned());
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_owned(), state.to_owned());
    }
    set_remote_parent(span, &carrier);
}

/// Makes `span` a child of the span whose context `headers` carry (a NATS
/// request or a JetStream message sent with [`inject_nats`]).
pub fn set_parent_from_nats(span: &Span, headers: Option<&HeaderMap>) {
    if !enabled() {
        return;
    }
    if let Some(headers) = headers {
        set_remote_parent(span, &NatsHeaders(headers));
    }
}

fn set_remote_parent(span: &Span, carrier: &dyn Extractor) {
    let cx = TraceContextPropagator::new().extract(carrier);
    if cx.span().span_context().is_valid() {
        // Fails only for a disabled span or one already started: it then keeps its own trace.
        let _ = span.set_parent(cx);
    }
}

/// Writes `span`'s context into `headers` (`traceparent`, `tracestate`), so the
/// receiver's spans join its trace. Does nothing when tracing is off.
pub fn inject_nats(span: &Span, headers: &mut HeaderMap) {
    if !enabled() {
        return;
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut NatsHeadersMut(headers));
}

/// `span`'s W3C `traceparent`, when tracing is on and it is recorded (for HTTP requests we send).
pub fn traceparent(span: &Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}

/// A handle on a span's trace, to link another span to it later (on another
/// thread): the forward pass links to each request's queueing span.
#[derive(Debug, Clone)]
pub struct LinkTarget(opentelemetry::trace::SpanContext);

/// `span`'s context as a link target, or `None` when tracing is off.
pub fn link_target(span: &Span) -> Option<LinkTarget> {
    if !enabled() || span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(LinkTarget(sc))
}

/// Links `span` (before it is entered) to `target`'s trace.
pub fn link(span: &Span, target: &LinkTarget) {
    span.add_link(target.0.clone());
}

struct NatsHeaders<'a>(&'a HeaderMap);

impl Extractor for NatsHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(async_nats::HeaderValue::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

struct NatsHeadersMut<'a>(&'a mut HeaderMap);

impl Injector for NatsHeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn without_an_endpoint_no_exporter_is_built() {
        let config = TelemetryConfig::from_lookup(&lookup(&[("OTEL_SERVICE_NAME", "x")]), "mnistflow-web").unwrap();
        assert_eq!(config.endpoint, None);
        assert_eq!(config.traces_url(), None);
        assert!(config.tracer_provider().unwrap().is_none());
        assert!(!TelemetryGuard::new(None).exporting());
    }

    #[test]
    fn an_empty_endpoint_counts_as_unset() {
        let config = TelemetryConfig::from_lookup(&lookup(&[(ENDPOINT_VAR, " ")]), "s").unwrap();
        assert!(config.tracer_provider().unwrap().is_none());
    }

    #[test]
    fn the_endpoint_gets_the_traces_path_and_the_service_its_name() {
        let config =
            TelemetryConfig::from_lookup(&lookup(&[(ENDPOINT_VAR, "http://collector:4318/")]), "mnistflow-web")
                .unwrap();
        assert_eq!(config.traces_url().as_deref(), Some("http://collector:4318/v1/traces"));
        assert_eq!(config.service_name, "mnistflow-web");
        let named = TelemetryConfig::from_lookup(
            &lookup(&[(ENDPOINT_VAR, "https://otel.example/base"), (SERVICE_NAME_VAR, "web-eu")]),
            "mnistflow-web",
        )
        .unwrap();
        assert_eq!(named.traces_url().as_deref(), Some("https://otel.example/base/v1/traces"));
        assert_eq!(named.service_name, "web-eu");
    }

    #[test]
    fn a_grpc_or_malformed_endpoint_is_refused_naming_the_variable() {
        for bad in ["collector:4317", "grpc://collector:4317", "not a url"] {
            let e = TelemetryConfig::from_lookup(&lookup(&[(ENDPOINT_VAR, bad)]), "s").unwrap_err();
            assert_eq!(e.var, ENDPOINT_VAR, "{bad}");
        }
    }

    #[test]
    fn propagation_helpers_do_nothing_while_tracing_is_off() {
        let span = tracing::info_span!("off");
        let mut headers = HeaderMap::new();
        inject_nats(&span, &mut headers);
        assert!(headers.is_empty());
        assert_eq!(traceparent(&span), None);
        assert!(link_target(&span).is_none());
    }
}
