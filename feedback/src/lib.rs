//! mnistflow's feedback stage: takes `feedback.submitted` (what a person said
//! about an answer, published by the web tier) from its JetStream work queue,
//! stores each as a sample of the feedback set in the store (deduplicated,
//! bounded per client, see [`mnistflow_store::feedback`]), keeps each model
//! version's live accuracy (trusted and unverified apart) and announces it
//! (`feedback.stored`, which the page shows) and exports it
//! (`mnistflow_feedback_live_accuracy`). It depends on the contract and the
//! store only: no libtorch.
//!
//! Order per delivery: sample written, index written, event published, then
//! ack; a failure before the ack is retried (the sample's key makes the repeat
//! harmless). Nothing here decides what is served: no feedback moves `CURRENT`
//! or asks for training.
//!
//! - [`Config`]: `FEEDBACK_*` settings (plus `NATS_*`, `STORE_URL`).
//! - [`run`]: the stage on its bus and store (the consumer, with `/healthz`,
//!   `/readyz` and `/metrics` on `FEEDBACK_ADDR`); [`main_with`]: the binary's
//!   body, which creates them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use mnistflow_nats::work::{self, Handler, Outcome, Take, Work};
use mnistflow_nats::{Bus, BusError, FeedbackStored, FeedbackSubmitted, LiveAccuracy, NatsConfig, WorkQueueOptions};
use mnistflow_runtime::env::{self, ConfigError, listen_addr, positive, var_or};
use mnistflow_runtime::http::{self as serve, OpenMetrics};
use mnistflow_store::{FeedbackIndex, FeedbackOutcome, Store};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

/// Everything the stage reads from its environment.
///
/// | variable | meaning | default |
/// |---|---|---|
/// | `FEEDBACK_ADDR` | `host:port` of `/healthz`, `/readyz`, `/metrics`; `off` disables | `0.0.0.0:9105` |
/// | `FEEDBACK_MAX_PER_CLIENT` | unverified samples one client may hold; more are refused | `100` |
/// | `FEEDBACK_ACK_WAIT_SECS` | the work queue's ack wait | `30` |
/// | `FEEDBACK_MAX_DELIVER` | deliveries of one event before the server gives up | `10` |
#[derive(Debug, Clone)]
pub struct Config {
    pub nats: NatsConfig,
    pub store_url: String,
    pub addr: Option<SocketAddr>,
    pub max_per_client: usize,
    pub ack_wait: Duration,
    pub max_deliver: i64,
}

impl Config {
    /// This stage's own variables (beside [`env::PROCESS_VARS`],
    /// [`NatsConfig::ENV_VARS`] and [`env::STORE_VARS`]).
    pub const ENV_VARS: &'static [&'static str] =
        &["FEEDBACK_ADDR", "FEEDBACK_MAX_PER_CLIENT", "FEEDBACK_ACK_WAIT_SECS", "FEEDBACK_MAX_DELIVER"];

    /// Every variable this binary reads (`--print-env-vars` prints them;
    /// `k8s/check` compares them with the manifests).
    pub fn env_vars() -> Vec<&'static str> {
        env::env_vars(&[env::PROCESS_VARS, NatsConfig::ENV_VARS, env::STORE_VARS, Self::ENV_VARS])
    }

    /// Reads the process environment.
    ///
    /// # Errors
    /// A variable is malformed; the error names it.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads settings through `lookup`.
    ///
    /// # Errors
    /// A variable is malformed; the error names it.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let nats = NatsConfig::from_lookup(&lookup)?.with_client_name("mnistflow-feedback");
        let store_url = env::store_url(&lookup);
        let addr = listen_addr(&lookup, "FEEDBACK_ADDR", SocketAddr::from(([0, 0, 0, 0], 9105)))?;
        let max_per_client: usize = positive(&lookup, "FEEDBACK_MAX_PER_CLIENT", 100)?;
        let ack_wait: u64 = positive(&lookup, "FEEDBACK_ACK_WAIT_SECS", 30)?;
        let max_deliver: i64 = var_or(&lookup, "FEEDBACK_MAX_DELIVER", 10)?;
        if max_deliver < 1 {
            return Err(ConfigError::new("FEEDBACK_MAX_DELIVER", "must be at least 1"));
        }
        Ok(Self { nats, store_url, addr, max_per_client, ack_wait: Duration::from_secs(ack_wait), max_deliver })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    model_version: String,
    trust: &'static str,
}

/// The stage's metrics.
pub struct Metrics {
    registry: Registry,
    samples: Family<OutcomeLabels, Counter>,
    answers: Family<VersionLabels, Gauge>,
    accuracy: Family<VersionLabels, Gauge<f64, AtomicU64>>,
    set_version: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mnistflow_feedback");
        let samples = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "samples",
            "Feedback events handled: stored, duplicate, over_quota (client limit), invalid",
            samples.clone(),
        );
        let answers = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "answers",
            "Answers judged by stored feedback, per model version and trust (trusted, unverified)",
            answers.clone(),
        );
        let accuracy = Family::<VersionLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "live_accuracy",
            "Share of a model version's answers that feedback says were right, per trust (unverified: anonymous)",
            accuracy.clone(),
        );
        let set_version = Gauge::default();
        registry.register("set_version", "The feedback set's version (its number of samples)", set_version.clone());
        Self { registry, samples, answers, accuracy, set_version }
    }
}

impl Metrics {
    /// The registry in OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            error!(error = %e, "Encoding metrics failed.");
        }
        out
    }

    fn sample(&self, outcome: &'static str) {
        self.samples.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    fn version(&self, version: &str, live: &LiveAccuracy) {
        for (trust, tally) in [("trusted", live.trusted), ("unverified", live.unverified)] {
            let labels = VersionLabels { model_version: version.to_owned(), trust };
            self.answers.get_or_create(&labels).set(i64::try_from(tally.answers).unwrap_or(i64::MAX));
            if let Some(a) = tally.accuracy() {
                self.accuracy.get_or_create(&labels).set(a);
            }
        }
    }

    /// Sets every figure from the store's index (at start-up).
    fn load(&self, index: &FeedbackIndex) {
        self.set_version.set(i64::try_from(index.set_version).unwrap_or(i64::MAX));
        for (version, live) in &index.versions {
            self.version(version, live);
        }
    }
}

struct Stage {
    store: Store,
    bus: Bus,
    metrics: Arc<Metrics>,
    max_per_client: usize,
}

impl Handler<FeedbackSubmitted> for Stage {
    async fn handle(&self, work: Work<'_, FeedbackSubmitted>) -> Outcome {
        let event = work.command;
        let span = info_span!("feedback", key = %work.key, feedback_id = %event.event_id, delivered = work.delivered);
        async {
            if let Err(reason) = event.validate() {
                self.metrics.sample("invalid");
                warn!(%reason, "Invalid feedback refused.");
                return Outcome::Reject { reason };
            }
            let outcome = match self.store.store_feedback(event, &work.key.to_string(), self.max_per_client).await {
                Ok(o) => o,
                Err(e) => {
                    warn!(error = %e, "Storing feedback failed; it will be redelivered.");
                    return Outcome::Retry { after: Duration::from_secs(5), reason: e.to_string() };
                }
            };
            match outcome {
                FeedbackOutcome::Stored { sample, index } => {
                    let version = sample.event.model_version.clone();
                    let accuracy = index.versions.get(version.as_str()).copied().unwrap_or_default();
                    let stored = FeedbackStored {
                        event_id: work.key.event_id("stored"),
                        feedback_id: event.event_id,
                        model_version: version.clone(),
                        trusted: event.trusted,
                        correct: sample.correct(),
                        set_version: sample.set_version,
                        accuracy,
                        at: sample.stored_at,
                    };
                    // Published before the ack: a failure here is retried, and the
                    // repeat finds the sample stored (not counted again).
                    if let Err(e) = self.bus.publish(&stored).await {
                        warn!(error = %e, "Announcing stored feedback failed; it will be redelivered.");
                        return Outcome::Retry { after: Duration::from_secs(2), reason: e.to_string() };
                    }
                    self.metrics.sample("stored");
                    self.metrics.set_version.set(i64::try_from(index.set_version).unwrap_or(i64::MAX));
                    self.metrics.version(version.as_str(), &accuracy);
                    info!(
                        %version,
                        trusted = event.trusted,
                        correct = sample.correct(),
                        set_version = sample.set_version,
                        "Feedback stored."
                    );
                    Outcome::Done
                }
                FeedbackOutcome::Duplicate { set_version } => {
                    self.metrics.sample("duplicate");
                    info!(set_version, "Feedback stored before; not counted again.");
                    Outcome::Done
                }
                FeedbackOutcome::OverQuota { limit } => {
                    self.metrics.sample("over_quota");
                    warn!(client = %event.client, limit, "Client holds its limit of unverified feedback; refused.");
                    Outcome::Reject {
                        reason: format!("client {} holds {limit} unverified samples already", event.client),
                    }
                }
            }
        }
        .instrument(span)
        .await
    }
}

/// Consumes `feedback.submitted` until `shutdown`.
///
/// # Errors
/// The work queue cannot be bound, or the store's index is unreadable.
async fn consume(
    config: &Config,
    bus: Bus,
    store: Store,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let index = store.feedback_index().await?;
    metrics.load(&index);
    info!(set_version = index.set_version, versions = index.versions.len(), "Feedback set loaded.");
    let options = WorkQueueOptions { ack_wait: config.ack_wait, max_deliver: config.max_deliver };
    let mut queue = bus.work_queue::<FeedbackSubmitted>(options).await?;
    let stage = Stage { store, bus, metrics, max_per_client: config.max_per_client };
    let result: Result<_, BusError> = work::run(&mut queue, &stage, options.ack_wait, Take::All, &shutdown).await;
    info!("Feedback stage stopped.");
    result.map(drop).map_err(Into::into)
}

#[rocket::get("/healthz")]
fn healthz() -> &'static str {
    "ok"
}

#[rocket::get("/readyz")]
fn readyz(bus: &rocket::State<Bus>) -> (rocket::http::Status, &'static str) {
    match bus.client().connection_state() {
        mnistflow_nats::async_nats::connection::State::Connected => (rocket::http::Status::Ok, "ready"),
        _ => (rocket::http::Status::ServiceUnavailable, "NATS disconnected"),
    }
}

#[rocket::get("/metrics")]
fn metrics(metrics: &rocket::State<Arc<Metrics>>) -> OpenMetrics {
    OpenMetrics(metrics.encode())
}

/// The binary's body: store and NATS (waiting for the streams: this identity
/// does not create them), then [`run`].
///
/// # Errors
/// The store URL is unsupported, NATS unreachable, the streams missing, or
/// [`run`] failed.
pub async fn main_with(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = Store::open(&config.store_url)?;
    let bus = Bus::connect(&config.nats, &shutdown).await?;
    bus.ensure_streams().await?;
    run(config, bus, store, shutdown).await
}

/// The stage on its resources (`mnistflow up` hands every stage the same bus and
/// store): the HTTP listener, then the consumer until `shutdown`.
///
/// # Errors
/// The listener cannot bind, or the consumer failed.
pub async fn run(config: Config, bus: Bus, store: Store, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let server = match config.addr {
        None => None,
        Some(addr) => {
            let mut rc = serve::config(addr, Duration::from_secs(1));
            rc.workers = 2;
            let rocket = rocket::custom(rc)
                .manage(bus.clone())
                .manage(metrics.clone())
                .mount("/", rocket::routes![healthz, readyz, metrics]);
            let served = serve::launch(rocket, shutdown.clone())
                .await
                .map_err(|e| anyhow::anyhow!("FEEDBACK_ADDR {addr}: {e}"))?;
            info!(addr = %served.addr, "Feedback stage serving /healthz, /readyz, /metrics.");
            Some(served.task)
        }
    };
    let result = consume(&config, bus, store, metrics, shutdown.clone()).await;
    shutdown.cancel();
    if let Some(server) = server {
        match server.await {
            Ok(Err(e)) => warn!(error = %e, "The feedback stage's HTTP listener failed."),
            Err(e) => warn!(error = %e, "The feedback stage's HTTP listener panicked."),
            Ok(Ok(())) => {}
        }
    }
    result
}

#[cfg(test)]
mod config_tests {
    use super::Config;

    #[test]
    fn the_variable_list_names_exactly_what_is_read() {
        mnistflow_runtime::env::assert_lists_exactly(&Config::env_vars(), &[], |lookup| {
            Config::from_lookup(lookup).unwrap();
        });
    }
}
