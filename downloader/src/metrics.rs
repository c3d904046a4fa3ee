//! Prometheus metrics and the small HTTP server of service mode:
//! `GET /healthz` (the process is up), `GET /readyz` (NATS is connected) and
//! `GET /metrics` (OpenMetrics text).
//!
//! Besides its own counters, each scrape reads the state of the pipeline's
//! work-queue consumers from JetStream (`downloader_work_queue_*{stream,consumer}`):
//! nats-server has no Prometheus endpoint, and the downloader service is the one
//! stage always running beside NATS (the trainer runs as Jobs in the cluster).

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use mnistflow_nats::Bus;
use mnistflow_nats::async_nats;
use mnistflow_nats::streams::WORK_CONSUMERS;
use mnistflow_runtime::http::{self, OpenMetrics, ServeError, Served};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rocket::http::Status;
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

/// `stream` and `consumer` labels of the work-queue gauges.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabel {
    pub stream: String,
    pub consumer: String,
}

/// How long one scrape waits for one consumer's state.
const CONSUMER_INFO_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// Per work-queue consumer: messages not yet delivered plus delivered and not
    /// yet acknowledged, the lag KEDA's `nats-jetstream` scaler starts trainer Jobs on.
    pub work_queue_lag: Family<ConsumerLabel, Gauge>,
    /// Of the lag, the messages delivered and not yet acknowledged (work in progress).
    pub work_queue_ack_pending: Family<ConsumerLabel, Gauge>,
    /// Messages delivered more than once and not yet acknowledged (failed or killed work).
    pub work_queue_redelivered: Family<ConsumerLabel, Gauge>,
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
        let work_queue_lag = Family::<ConsumerLabel, Gauge>::default();
        registry.register(
            "work_queue_lag",
            "Work-queue messages waiting or unacknowledged, per JetStream consumer (read at scrape time)",
            work_queue_lag.clone(),
        );
        let work_queue_ack_pending = Family::<ConsumerLabel, Gauge>::default();
        registry.register(
            "work_queue_ack_pending",
            "Work-queue messages delivered and not yet acknowledged, per JetStream consumer",
            work_queue_ack_pending.clone(),
        );
        let work_queue_redelivered = Family::<ConsumerLabel, Gauge>::default();
        registry.register(
            "work_queue_redelivered",
            "Work-queue messages delivered more than once and not yet acknowledged, per JetStream consumer",
            work_queue_redelivered.clone(),
        );
        Self {
            registry,
            bytes_downloaded,
            failures,
            datasets,
            last_success,
            last_duration,
            work_queue_lag,
            work_queue_ack_pending,
            work_queue_redelivered,
        }
    }

    /// Reads each work-queue consumer's state ([`WORK_CONSUMERS`]) from JetStream into the `work_queue_*`
    /// gauges. A consumer that cannot be read (missing, NATS away, no answer within
    /// [`CONSUMER_INFO_TIMEOUT`]) is left out of this scrape rather than shown stale.
    pub async fn read_work_queues(&self, bus: &Bus) {
        for consumer in WORK_CONSUMERS {
            let (stream, durable) = (bus.subjects().stream_name(consumer.stream), consumer.durable);
            let labels = ConsumerLabel { stream: stream.clone(), consumer: durable.to_owned() };
            let info = tokio::time::timeout(CONSUMER_INFO_TIMEOUT, async {
                let stream = bus.jetstream().get_stream_no_info(&stream).await.map_err(|e| e.to_string())?;
                stream.consumer_info(durable).await.map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|_| Err("no answer in time".to_owned()));
            match info {
                Ok(info) => {
                    let ack_pending = i64::try_from(info.num_ack_pending).unwrap_or(i64::MAX);
                    let pending = i64::try_from(info.num_pending).unwrap_or(i64::MAX);
                    self.work_queue_lag.get_or_create(&labels).set(pending.saturating_add(ack_pending));
                    self.work_queue_ack_pending.get_or_create(&labels).set(ack_pending);
                    self.work_queue_redelivered
                        .get_or_create(&labels)
                        .set(i64::try_from(info.num_redelivered).unwrap_or(i64::MAX));
                }
                Err(error) => {
                    tracing::debug!(%stream, consumer = durable, %error, "Work-queue consumer not read.");
                    self.work_queue_lag.remove(&labels);
                    self.work_queue_ack_pending.remove(&labels);
                    self.work_queue_redelivered.remove(&labels);
                }
            }
        }
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
    bus: Bus,
}

#[get("/healthz")]
fn healthz() -> &'static str {
    "ok\n"
}

#[get("/readyz")]
fn readyz(state: &State<HttpState>) -> (Status, String) {
    match state.bus.client().connection_state() {
        async_nats::connection::State::Connected => (Status::Ok, "ok\n".into()),
        other => (Status::ServiceUnavailable, format!("NATS {other:?}\n")),
    }
}

#[get("/metrics")]
async fn metrics_text(state: &State<HttpState>) -> OpenMetrics {
    state.metrics.read_work_queues(&state.bus).await;
    OpenMetrics(state.metrics.encode())
}

/// The health and metrics application, unlaunched (tests use Rocket's local client).
pub fn rocket(addr: SocketAddr, metrics: std::sync::Arc<Metrics>, bus: Bus) -> Rocket<Build> {
    rocket::custom(http::config(addr, Duration::from_secs(1)))
        .manage(HttpState { metrics, bus })
        .mount("/", routes![healthz, readyz, metrics_text])
}

/// Serves health and metrics on `addr` until `shutdown`; returns once it
/// listens, with the address it bound (port 0 picks a free one).
///
/// # Errors
/// Rocket rejects the configuration or the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    metrics: std::sync::Arc<Metrics>,
    bus: Bus,
    shutdown: CancellationToken,
) -> Result<Served, ServeError> {
    http::launch(rocket(addr, metrics, bus), shutdown).await
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
        let bus = Bus::new(nats, mnistflow_nats::Subjects::default());
        bus.ensure_streams().await.unwrap();
        // Two training requests waiting for the trainer's consumer (set-up created it).
        let subjects = bus.subjects();
        for _ in 0..2 {
            let subject = subjects.full(mnistflow_nats::subjects::TRAIN_REQUEST);
            bus.jetstream().publish(subject, "{}".into()).await.unwrap().await.unwrap();
        }
        let metrics = std::sync::Arc::new(Metrics::new());
        metrics.dataset("reused");
        let client = Client::tracked(rocket("127.0.0.1:0".parse().unwrap(), metrics, bus)).await.unwrap();

        let health = client.get("/healthz").dispatch().await;
        assert_eq!(health.status(), Status::Ok);
        let ready = client.get("/readyz").dispatch().await;
        assert_eq!(ready.status(), Status::Ok);
        let response = client.get("/metrics").dispatch().await;
        assert_eq!(response.status(), Status::Ok);
        assert_eq!(response.content_type().map(|c| c.sub().to_string()), Some("openmetrics-text".into()));
        let text = response.into_string().await.unwrap();
        assert!(text.contains("downloader_datasets_total{outcome=\"reused\"} 1"), "{text}");
        let trainer = "{stream=\"MNIST_TRAIN\",consumer=\"trainer\"}";
        assert!(text.contains(&format!("downloader_work_queue_lag{trainer} 2")), "{text}");
        assert!(text.contains(&format!("downloader_work_queue_ack_pending{trainer} 0")), "{text}");

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
