//! Prometheus metrics and the health endpoint of a worker (`/metrics`, `/healthz`),
//! served by Rocket on `TRAINER_METRICS_ADDR`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};

use mnistflow_runtime::http::{self, OpenMetrics, Served};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rocket::http::{ContentType, Status};
use rocket::{State, get, routes};
use tokio_util::sync::CancellationToken;

/// How a request ended, the label of `trainer_runs_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A version was stored and announced.
    Published,
    /// The request was invalid and terminated.
    Rejected,
    /// A transient failure; the request was handed back for redelivery (or given up).
    Failed,
    /// Shutdown interrupted the run; the request was handed back.
    Cancelled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Published => "published",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

/// The trainer's metrics. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    runs: Family<OutcomeLabel, Counter>,
    examples_per_sec: Gauge<f64, AtomicU64>,
    train_loss: Gauge<f64, AtomicU64>,
    test_accuracy: Gauge<f64, AtomicU64>,
    test_loss: Gauge<f64, AtomicU64>,
    run_seconds: Gauge<f64, AtomicU64>,
    busy: Gauge<i64, AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("trainer");
        let runs = Family::<OutcomeLabel, Counter>::default();
        registry.register("runs", "Train requests handled, by outcome", runs.clone());
        let examples_per_sec = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "examples_per_second",
            "Training throughput of the current or last run",
            examples_per_sec.clone(),
        );
        let train_loss = Gauge::<f64, AtomicU64>::default();
        registry.register("train_loss", "Mean training loss at the last progress report", train_loss.clone());
        let test_accuracy = Gauge::<f64, AtomicU64>::default();
        registry.register("last_test_accuracy", "Test accuracy of the last published version", test_accuracy.clone());
        let test_loss = Gauge::<f64, AtomicU64>::default();
        registry.register("last_test_loss", "Test loss of the last published version", test_loss.clone());
        let run_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "last_run_seconds",
            "Wall time of the last published run, request to event",
            run_seconds.clone(),
        );
        let busy = Gauge::<i64, AtomicI64>::default();
        registry.register("busy", "1 while a request is being worked on", busy.clone());
        Self { registry, runs, examples_per_sec, train_loss, test_accuracy, test_loss, run_seconds, busy }
    }

    pub fn run_finished(&self, outcome: Outcome) {
        self.runs.get_or_create(&OutcomeLabel { outcome: outcome.as_str().into() }).inc();
    }

    /// How many runs ended with `outcome`. Reading creates no series: a zero
    /// `outcome="failed"` series appearing would fire the TrainingFailed alert.
    pub fn runs(&self, outcome: Outcome) -> u64 {
        self.runs.get(&OutcomeLabel { outcome: outcome.as_str().into() }).map_or(0, |c| c.get())
    }

    pub fn progress(&self, examples_per_sec: f64, loss: f64) {
        self.examples_per_sec.set(examples_per_sec);
        self.train_loss.set(loss);
    }

    pub fn published(&self, accuracy: f64, loss: f64, seconds: f64) {
        self.test_accuracy.set(accuracy);
        self.test_loss.set(loss);
        self.run_seconds.set(seconds);
    }

    pub fn set_busy(&self, busy: bool) {
        self.busy.set(i64::from(busy));
    }

    pub fn is_busy(&self) -> bool {
        self.busy.get() != 0
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "Encoding metrics failed.");
        }
        out
    }
}

#[get("/metrics")]
fn metrics(m: &State<Arc<Metrics>>) -> OpenMetrics {
    OpenMetrics(m.encode())
}

#[get("/healthz")]
fn healthz(m: &State<Arc<Metrics>>) -> (Status, (ContentType, String)) {
    let body = serde_json::json!({ "status": "ok", "busy": m.is_busy() }).to_string();
    (Status::Ok, (ContentType::JSON, body))
}

/// Serves `/metrics` and `/healthz` on `addr` until `shutdown`; returns the bound
/// address (port 0 picks a free one) once listening.
///
/// # Errors
/// The address cannot be bound or Rocket fails to start.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let rocket = rocket::custom(http::config(addr, std::time::Duration::from_secs(1)))
        .manage(metrics)
        .mount("/", routes![metrics, healthz]);
    let Served { addr: bound, task } =
        tokio::time::timeout(std::time::Duration::from_secs(10), http::launch(rocket, shutdown))
            .await
            .map_err(|_| anyhow::anyhow!("TRAINER_METRICS_ADDR: {addr} did not start listening within 10 s"))?
            .map_err(|e| anyhow::anyhow!("TRAINER_METRICS_ADDR: cannot listen on {addr}: {e}"))?;
    let task = tokio::spawn(async move {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "Metrics server stopped."),
            Err(e) => tracing::error!(error = %e, "Metrics server task failed."),
        }
    });
    tracing::info!(addr = %bound, "Metrics and health endpoint listening.");
    Ok((bound, task))
}
