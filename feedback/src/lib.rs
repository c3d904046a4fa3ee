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
//! Being the feedback set's one writer, the stage also removes from it (README
//! "Operating it", "Retention"):
//!
//! - **by age**, when `FEEDBACK_RETENTION_SECS` is set: a pass at start and every
//!   `FEEDBACK_RETENTION_INTERVAL_SECS` deletes the samples stored longer ago and
//!   announces `feedback.pruned` (counts and the cut) when it deleted any;
//! - **on request**: `feedback.delete` (the web tier's `DELETE /api/feedback/<id>`,
//!   on the same stream) deletes that one sample and announces `feedback.deleted`
//!   (`found: false` for an id the set does not hold: deleted before, or never
//!   stored). A request for a sample whose `feedback.submitted` still waits in the
//!   queue is retried until it has been stored (a few deliveries at most).
//!
//! Deliveries and passes take turns (one lock), so the index has one writer. The
//! live accuracy per version is an aggregate and stays; only the samples go.
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
use mnistflow_nats::{
    Bus, BusError, EventId, FeedbackDelete, FeedbackDeleted, FeedbackPruned, FeedbackStored, FeedbackSubmitted,
    LiveAccuracy, NatsConfig, WorkQueueOptions, streams,
};
use mnistflow_runtime::env::{self, ConfigError, listen_addr, positive, var, var_or};
use mnistflow_runtime::http::{self as serve, OpenMetrics};
use mnistflow_store::{FeedbackIndex, FeedbackOutcome, Store};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

/// Everything the stage reads from its environment.
///
/// | variable | meaning | default |
/// |---|---|---|
/// | `FEEDBACK_ADDR` | `host:port` of `/healthz`, `/readyz`, `/metrics`; `off` disables | `0.0.0.0:9105` |
/// | `FEEDBACK_MAX_PER_CLIENT` | unverified samples one client may hold; more are refused | `100` |
/// | `FEEDBACK_ACK_WAIT_SECS` | the work queue's ack wait | `30` |
/// | `FEEDBACK_MAX_DELIVER` | deliveries of one event before the server gives up | `10` |
/// | `FEEDBACK_RETENTION_SECS` | delete samples stored longer ago than this; unset: keep them | unset |
/// | `FEEDBACK_RETENTION_INTERVAL_SECS` | time between retention passes (the first runs at start) | `3600` |
#[derive(Debug, Clone)]
pub struct Config {
    pub nats: NatsConfig,
    pub store_url: String,
    pub addr: Option<SocketAddr>,
    pub max_per_client: usize,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    /// Samples stored longer ago are deleted; `None`: kept.
    pub retention: Option<Duration>,
    pub retention_interval: Duration,
}

impl Config {
    /// This stage's own variables (beside [`env::PROCESS_VARS`],
    /// [`NatsConfig::ENV_VARS`] and [`env::STORE_VARS`]).
    pub const ENV_VARS: &'static [&'static str] = &[
        "FEEDBACK_ADDR",
        "FEEDBACK_MAX_PER_CLIENT",
        "FEEDBACK_ACK_WAIT_SECS",
        "FEEDBACK_MAX_DELIVER",
        "FEEDBACK_RETENTION_SECS",
        "FEEDBACK_RETENTION_INTERVAL_SECS",
    ];

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
        let retention: Option<u64> = var(&lookup, "FEEDBACK_RETENTION_SECS")?;
        if retention == Some(0) {
            return Err(ConfigError::new("FEEDBACK_RETENTION_SECS", "must be at least 1 (unset it to keep feedback)"));
        }
        let retention_interval: u64 = positive(&lookup, "FEEDBACK_RETENTION_INTERVAL_SECS", 3600)?;
        Ok(Self {
            nats,
            store_url,
            addr,
            max_per_client,
            ack_wait: Duration::from_secs(ack_wait),
            max_deliver,
            retention: retention.map(Duration::from_secs),
            retention_interval: Duration::from_secs(retention_interval),
        })
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
    removed: Family<OutcomeLabels, Counter>,
    retention_passes: Counter,
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
        registry.register("set_version", "The feedback set's version (samples ever stored)", set_version.clone());
        let removed = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "removed",
            "Samples removed from the set: pruned (by age), deleted (on request); unknown: delete requests for an id the set does not hold",
            removed.clone(),
        );
        let retention_passes = Counter::default();
        registry.register(
            "retention_passes",
            "Retention passes completed (FEEDBACK_RETENTION_SECS set), deleting or not",
            retention_passes.clone(),
        );
        Self { registry, samples, answers, accuracy, set_version, removed, retention_passes }
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

    fn removed(&self, outcome: &'static str, n: u64) {
        self.removed.get_or_create(&OutcomeLabels { outcome }).inc_by(n);
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
    /// Held by each delivery and retention pass: the set has one writer at a time.
    writes: tokio::sync::Mutex<()>,
}

/// Deliveries of a delete request for an id the set does not hold (yet) that are
/// retried while feedback still waits in the queue (it may be that sample's).
const DELETE_WAITS_FOR_SUBMISSIONS: i64 = 5;

impl Stage {
    /// One retention pass: deletes the samples stored longer ago than `max_age`
    /// and announces it when it deleted any. Failures are logged; the next pass
    /// tries again (and recounts the index).
    async fn prune(&self, max_age: Duration) {
        let before = chrono::Utc::now() - max_age;
        let _writing = self.writes.lock().await;
        let pruned = match self.store.prune_feedback(before).await {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, %before, "Pruning old feedback failed; the next pass tries again.");
                return;
            }
        };
        let index = &pruned.index;
        self.metrics.retention_passes.inc();
        if pruned.trusted_deleted + pruned.unverified_deleted == 0 {
            debug!(%before, "No feedback older than the retention period.");
            return;
        }
        self.metrics.removed("pruned", pruned.trusted_deleted + pruned.unverified_deleted);
        let event = FeedbackPruned {
            event_id: EventId::new(),
            max_age_secs: max_age.as_secs(),
            before,
            trusted_deleted: pruned.trusted_deleted,
            unverified_deleted: pruned.unverified_deleted,
            trusted_left: index.trusted_samples,
            unverified_left: index.unverified_samples,
            at: chrono::Utc::now(),
        };
        info!(pass = ?event, "Old feedback pruned.");
        if let Err(e) = self.bus.publish(&event).await {
            warn!(error = %e, "Could not announce the feedback retention pass (feedback.pruned).");
        }
    }

    /// Passes at start and every `interval` until `shutdown`.
    async fn prune_every(&self, max_age: Duration, interval: Duration, shutdown: &CancellationToken) {
        info!(max_age_secs = max_age.as_secs(), interval_secs = interval.as_secs(), "Feedback retention on.");
        loop {
            self.prune(max_age).await;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// Whether `feedback.submitted` events wait in the queue (or are being handled).
    async fn submissions_waiting(&self) -> Result<bool, String> {
        let name = self.bus.subjects().stream_name(streams::FEEDBACK);
        let stream = self.bus.jetstream().get_stream(&name).await.map_err(|e| e.to_string())?;
        let mut consumer: mnistflow_nats::async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer(streams::FEEDBACK_CONSUMER).await.map_err(|e| e.to_string())?;
        let info = consumer.info().await.map_err(|e| e.to_string())?;
        Ok(info.num_pending > 0 || info.num_ack_pending > 0)
    }
}

impl Handler<FeedbackDelete> for Stage {
    async fn handle(&self, work: Work<'_, FeedbackDelete>) -> Outcome {
        let command = work.command;
        let span = info_span!("feedback_delete", key = %work.key, feedback_id = %command.feedback_id, delivered = work.delivered);
        async {
            let deleted = {
                let _writing = self.writes.lock().await;
                match self.store.delete_feedback(command.feedback_id).await {
                    Ok(d) => d,
                    Err(e) => {
                        warn!(error = %e, "Deleting feedback failed; the request will be redelivered.");
                        return Outcome::Retry { after: Duration::from_secs(5), reason: e.to_string() };
                    }
                }
            };
            if deleted.is_none() && work.delivered < DELETE_WAITS_FOR_SUBMISSIONS {
                match self.submissions_waiting().await {
                    Ok(false) => {}
                    Ok(true) => {
                        info!("No such sample yet, but feedback waits in the queue: trying again after it.");
                        return Outcome::Retry { after: Duration::from_secs(1), reason: "feedback waits".into() };
                    }
                    Err(e) => warn!(error = %e, "Could not tell whether feedback waits in the queue."),
                }
            }
            let event = FeedbackDeleted {
                event_id: work.key.event_id("deleted"),
                request_id: command.event_id,
                feedback_id: command.feedback_id,
                found: deleted.is_some(),
                trusted: deleted.as_ref().map(|s| s.event.trusted),
                at: chrono::Utc::now(),
            };
            // Published before the ack: a failure is retried (the repeat finds
            // nothing to delete and says so under the same event id).
            if let Err(e) = self.bus.publish(&event).await {
                warn!(error = %e, "Announcing a feedback deletion failed; it will be redelivered.");
                return Outcome::Retry { after: Duration::from_secs(2), reason: e.to_string() };
            }
            if deleted.is_some() {
                self.metrics.removed("deleted", 1);
                info!("Feedback deleted on request.");
            } else {
                self.metrics.removed("unknown", 1);
                info!("Deletion requested for feedback the set does not hold (deleted before, or never stored).");
            }
            Outcome::Done
        }
        .instrument(span)
        .await
    }
}

impl Handler<FeedbackSubmitted> for Stage {
    async fn handle(&self, work: Work<'_, FeedbackSubmitted>) -> Outcome {
        let event = work.command;
        let span = info_span!("feedback", key = %work.key, feedback_id = %event.event_id, delivered = work.delivered);
        async {
            let _writing = self.writes.lock().await;
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
    let mut submitted = bus.work_queue::<FeedbackSubmitted>(options).await?;
    let mut deletes = bus.work_queue::<FeedbackDelete>(options).await?;
    let stage = Stage { store, bus, metrics, max_per_client: config.max_per_client, writes: Default::default() };
    let retention = async {
        match config.retention {
            Some(max_age) => stage.prune_every(max_age, config.retention_interval, &shutdown).await,
            None => info!("Feedback retention off (FEEDBACK_RETENTION_SECS unset): samples are kept."),
        }
    };
    // A queue that ends stops the stage (and so the other queue and the passes).
    let stop_all = |r: Result<_, BusError>| {
        shutdown.cancel();
        r
    };
    let (taken, deleted, ()) = tokio::join!(
        async { stop_all(work::run(&mut submitted, &stage, options.ack_wait, Take::All, &shutdown).await) },
        async { stop_all(work::run(&mut deletes, &stage, options.ack_wait, Take::All, &shutdown).await) },
        retention,
    );
    info!("Feedback stage stopped.");
    taken.and(deleted).map(drop).map_err(Into::into)
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
                .mount("/", rocket::routes![serve::healthz, serve::readyz, metrics]);
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
