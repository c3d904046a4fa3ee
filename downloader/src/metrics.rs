//! Prometheus metrics and the small HTTP server of service mode:
//! `GET /healthz` (the process is up), `GET /readyz` (NATS is connected) and
//! `GET /metrics` (OpenMetrics text).

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;

use mnistflow_nats::async_nats;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rocket::http::{ContentType, Status};
use rocket::{Build, Rocket, State, get, routes};
use tokio_util::sync::CancellationToken;

/// `reason` label of the failure counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// `outcome` label of the data-set counter: `stored`, `reused`, `failed`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

/// The downloader's metrics. Cheap to update from any task.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Compressed bytes received from mirrors.
    pub bytes_downloaded: Counter,
    /// Failed attempts (one file, one mirror) and failed data sets, by reason.
    pub failures: Family<ReasonLabel, Counter>,
    /// Data sets handled, by outcome.
    pub datasets: Family<OutcomeLabel, Counter>,
    /// Unix time of the last data set stored or re-announced.
    pub last_success: Gauge<f64, AtomicU64>,
    /// Seconds the last successful download (or re-announcement) took.
    pub last_duration: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("downloader");
        let bytes_downloaded = Counter::default();
        let failures = Family::<ReasonLabel, Counter>::default();
        let datasets = Family::<OutcomeLabel, Counter>::default();
        let last_success = Gauge::<f64, AtomicU64>::default();
        let last_duration = Gauge::<f64, AtomicU64>::default();
        registry.register("bytes_downloaded", "Compressed bytes received from mirrors", bytes_downloaded.clone());
        registry.register("failures", "Failed attempts and failed data sets, by reason", failures.clone());
        registry.register("datasets", "Data sets handled, by outcome (stored, reused, failed)", datasets.clone());
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the last data set stored or re-announced",
            last_success.clone(),
        );
        registry.register("last_duration_seconds", "Duration of the last successful run", last_duration.clone());
        Self { registry, bytes_downloaded, failures, datasets, last_success, last_duration }
    }

    /// Counts a failure.
    pub fn failure(&self, reason: &str) {
        self.failures.get_or_create(&ReasonLabel { reason: reason.to_owned() }).inc();
    }

    /// Counts a handled data set.
    pub fn dataset(&self, outcome: &str) {
        self.datasets.get_or_create(&OutcomeLabel { outcome: outcome.to_owned() }).inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What the routes need.
struct HttpState {
    metrics: std::sync::Arc<Metrics>,
    nats: async_nats::Client,
}

#[get("/healthz")]
fn healthz() -> &'static str {
    "ok\n"
}

#[get("/readyz")]
fn readyz(state: &State<HttpState>) -> (Status, String) {
    match state.nats.connection_state() {
        async_nats::connection::State::Connected => (Status::Ok, "ok\n".into()),
        other => (Status::ServiceUnavailable, format!("NATS {other:?}\n")),
    }
}

#[get("/metrics")]
fn metrics_text(state: &State<HttpState>) -> (ContentType, String) {
    let content_type =
        ContentType::new("application", "openmetrics-text").with_params([("version", "1.0.0"), ("charset", "utf-8")]);
    (content_type, state.metrics.encode())
}

/// The health and metrics application, unlaunched (tests use Rocket's local client).
pub fn rocket(addr: SocketAddr, metrics: std::sync::Arc<Metrics>, nats: async_nats::Client) -> Rocket<Build> {
    let config = rocket::Config {
        address: addr.ip(),
        port: addr.port(),
        log_level: rocket::config::LogLevel::Off,
        // Our CancellationToken owns the signals.
        shutdown: rocket::config::Shutdown {
            ctrlc: false,
            #[cfg(unix)]
            signals: std::collections::HashSet::new(),
            grace: 1,
            mercy: 1,
            ..Default::default()
        },
        ..rocket::Config::default()
    };
    rocket::custom(config).manage(HttpState { metrics, nats }).mount("/", routes![healthz, readyz, metrics_text])
}

/// Serves health and metrics on `addr` until `shutdown`. The task ends with an
/// error if the address cannot be bound, so the caller can stop the service.
///
/// # Errors
/// Rocket rejects the configuration.
pub async fn serve(
    addr: SocketAddr,
    metrics: std::sync::Arc<Metrics>,
    nats: async_nats::Client,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<Result<(), rocket::Error>>, rocket::Error> {
    let ignited = rocket(addr, metrics, nats).ignite().await?;
    let handle = ignited.shutdown();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        handle.notify();
    });
    Ok(tokio::spawn(async move { ignited.launch().await.map(drop) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_expose_counters_by_reason() {
        let m = Metrics::new();
        m.bytes_downloaded.inc_by(42);
        m.failure("checksum");
        m.dataset("stored");
        m.last_success.set(1.5);
        let text = m.encode();
        assert!(text.contains("downloader_bytes_downloaded_total 42"), "{text}");
        assert!(text.contains("downloader_failures_total{reason=\"checksum\"} 1"), "{text}");
        assert!(text.contains("downloader_datasets_total{outcome=\"stored\"} 1"), "{text}");
        assert!(text.contains("downloader_last_success_timestamp_seconds 1.5"), "{text}");
    }

    #[tokio::test]
    async fn routes_answer_health_readiness_and_metrics() {
        use rocket::local::asynchronous::Client;
        let server = mnistflow_integration::NatsServer::start();
        let nats = async_nats::connect(server.url()).await.unwrap();
        let metrics = std::sync::Arc::new(Metrics::new());
        metrics.dataset("reused");
        let client = Client::tracked(rocket("127.0.0.1:0".parse().unwrap(), metrics, nats)).await.unwrap();

        let health = client.get("/healthz").dispatch().await;
        assert_eq!(health.status(), Status::Ok);
        let ready = client.get("/readyz").dispatch().await;
        assert_eq!(ready.status(), Status::Ok);
        let response = client.get("/metrics").dispatch().await;
        assert_eq!(response.status(), Status::Ok);
        assert_eq!(response.content_type().map(|c| c.sub().to_string()), Some("openmetrics-text".into()));
        let text = response.into_string().await.unwrap();
        assert!(text.contains("downloader_datasets_total{outcome=\"reused\"} 1"), "{text}");

        drop(server);
        let client = &client;
        let status =
            mnistflow_integration::wait_until("readiness to fail", std::time::Duration::from_secs(10), || async move {
                let status = client.get("/readyz").dispatch().await.status();
                (status != Status::Ok).then_some(status)
            })
            .await;
        assert_eq!(status, Status::ServiceUnavailable, "readiness follows the NATS connection");
    }
}
