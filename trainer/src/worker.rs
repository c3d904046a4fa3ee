//! The work-queue side: take a `train.request`, train off the async runtime while
//! reporting progress and keeping the delivery alive, publish the version, run
//! the quality gate, announce, and only then acknowledge.
//!
//! Delivery semantics:
//! - invalid request (bad hyperparameters, unknown data set, undecodable JSON):
//!   `train.failed` with `will_retry: false`, then `term` — never redelivered;
//! - transient failure (store or NATS trouble, a libtorch error): `train.failed`
//!   with `will_retry` as the delivery count allows, then `nak` with a delay;
//! - shutdown mid-run: training stops at the next step and the request is
//!   `nak`ed at once, so another worker picks it up;
//! - a crash or kill: no ack, so the server redelivers after the ack wait. A
//!   partial version is never visible (the store's metadata is the commit
//!   marker and each attempt uses a fresh version name), and a redelivered
//!   request whose version was already stored (a crash after the store, before
//!   the ack) is finished from the stored version instead of training again
//!   (every request is first looked up among the stored versions' `request_id`).
//!   A request written without an `event_id` takes its delivery's id (stream
//!   sequence and payload hash, see [`mnistflow_nats::DeliveryKey`]), so it is
//!   recognised too, and the answers' ids derive from the same key: a repeated
//!   `model.published` or `train.failed` is stored once by JetStream.
//!
//! The loop (decode, in-progress signals every third of the ack wait, settling)
//! is the shared runner, [`mnistflow_nats::work`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use mnistflow_nats::work::{self, Handler, Outcome as WorkOutcome, Take, Work};
use mnistflow_nats::{
    Bus, DeliveryKey, EventId, ModelPublished, ModelVersion, RunId, TrainFailed, TrainProgress, TrainRequest,
    WorkQueueOptions,
};
use mnistflow_store::{ModelMetadata, Store, StoreError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::{Config, Mode, ProgressBar};
use crate::data::{FILE_NAMES, Mnist, RawMnist};
use crate::gate::{self, Incumbent};
use crate::metrics::{Metrics, Outcome};
use crate::params::Hyperparameters;
use crate::train::{self, Control, LIBTORCH_VERSION, Progress, TrainError};

/// The stored version's metadata key holding the id of its `model.published`
/// (found in a cluster test: an acknowledgement lost in a leader election led to
/// a redelivery that announced the stored version a second time, under a new id).
const PUBLISHED_EVENT_ID: &str = "published_event_id";

/// What can stop the worker itself (not a single request).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Bus(#[from] mnistflow_nats::BusError),
    /// In job mode: the one request failed transiently (it will be redelivered).
    #[error("the train request failed: {0}")]
    JobFailed(String),
}

/// Everything a run needs, handed in by the caller (tests build it themselves).
#[derive(Debug, Clone)]
pub struct Worker {
    pub bus: Bus,
    pub store: Store,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
}

impl Handler<TrainRequest> for Worker {
    async fn handle(&self, work: Work<'_, TrainRequest>) -> WorkOutcome {
        let (outcome, settle) = self.handle_request(&work).await;
        self.metrics.run_finished(outcome);
        settle
    }

    async fn undecodable(&self, key: &DeliveryKey, error: &str, raw: &[u8]) {
        // The id its sender waits for, when the payload names one (a newer schema version).
        let request_id = mnistflow_nats::schema::event_id_of(raw);
        self.fail(key, 1, None, request_id, &format!("undecodable train request: {error}"), false).await;
        self.metrics.run_finished(Outcome::Rejected);
    }
}

/// Messages from the training thread.
enum Update {
    Progress(Progress),
    Phase(&'static str),
}

/// What the training thread hands back.
struct Artefact {
    torchscript: Vec<u8>,
    metrics: mnistflow_nats::ModelMetrics,
    stats: train::TrainStats,
    data: crate::data::DataSummary,
    device: String,
    /// Seconds per phase of the blocking part.
    timings: serde_json::Value,
}

/// A failure of one request.
enum Failure {
    /// Retrying cannot help.
    Permanent(String),
    /// Retrying may help.
    Transient(String),
    Cancelled,
}

impl Worker {
    /// Consumes requests until `shutdown` (worker mode) or after one request (job
    /// mode; it exits if none arrives within `TRAINER_JOB_WAIT_SECS`).
    ///
    /// # Errors
    /// The work queue cannot be bound, or (job mode) the request failed transiently.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let options = WorkQueueOptions { ack_wait: self.config.ack_wait, max_deliver: self.config.max_deliver };
        let mut queue = self.bus.work_queue::<TrainRequest>(options).await?;
        info!(mode = ?self.config.mode, "Waiting for train requests.");
        let take = match self.config.mode {
            Mode::Worker => Take::All,
            Mode::Job => Take::One { wait: self.config.job_wait },
        };
        let failed_before = self.metrics.runs(Outcome::Failed);
        let last = work::run(&mut queue, self, self.config.ack_wait, take, &shutdown).await?;
        if self.config.mode == Mode::Job {
            // A transient failure fails the Job even on the last delivery, where the
            // request is terminated rather than handed back (as before the runner).
            let failed = self.metrics.runs(Outcome::Failed) > failed_before;
            return match last {
                Some(WorkOutcome::Retry { reason, .. }) => Err(WorkerError::JobFailed(reason)),
                Some(WorkOutcome::Reject { reason }) if failed => Err(WorkerError::JobFailed(reason)),
                Some(WorkOutcome::Cancelled) => Err(WorkerError::JobFailed("cancelled by shutdown".into())),
                _ => Ok(()),
            };
        }
        info!("Trainer stopped.");
        Ok(())
    }

    /// Handles one request to its end and says how its delivery ends (the runner
    /// settles it: ack, nak with delay, or term).
    async fn handle_request(&self, work: &Work<'_, TrainRequest>) -> (Outcome, WorkOutcome) {
        let request = work.command;
        let run_id = RunId::new();
        let span =
            info_span!("train", %run_id, request_id = %request.event_id, key = %work.key, delivered = work.delivered);
        // Tracing: the run joins the trace of whoever requested it (its message headers).
        mnistflow_nats::telemetry::set_parent_from_nats(&span, work.headers);
        async {
            self.metrics.set_busy(true);
            let started = Instant::now();
            let result = self.attempt(work, run_id).await;
            self.metrics.set_busy(false);
            match result {
                Ok(published) => {
                    self.metrics.published(
                        published.metrics.accuracy,
                        published.metrics.loss,
                        started.elapsed().as_secs_f64(),
                    );
                    (Outcome::Published, WorkOutcome::Done)
                }
                Err(Failure::Permanent(reason)) => {
                    warn!(%reason, "Train request rejected.");
                    self.fail(work.key, work.delivered, Some(run_id), Some(request.event_id), &reason, false).await;
                    (Outcome::Rejected, WorkOutcome::Reject { reason })
                }
                Err(Failure::Transient(reason)) => {
                    let will_retry = work.delivered < self.config.max_deliver;
                    error!(%reason, will_retry, "Training failed.");
                    self.fail(work.key, work.delivered, Some(run_id), Some(request.event_id), &reason, will_retry)
                        .await;
                    let outcome = if will_retry {
                        WorkOutcome::Retry { after: self.config.retry_delay, reason }
                    } else {
                        WorkOutcome::Reject { reason }
                    };
                    (Outcome::Failed, outcome)
                }
                Err(Failure::Cancelled) => {
                    info!("Training interrupted by shutdown; handing the request back.");
                    (Outcome::Cancelled, WorkOutcome::Cancelled)
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Announces a failure as `train.failed`, with an id derived from the delivery so
    /// a repeated announcement of the same delivery is stored once.
    async fn fail(
        &self,
        key: &DeliveryKey,
        delivered: i64,
        run_id: Option<RunId>,
        request_id: Option<EventId>,
        reason: &str,
        will_retry: bool,
    ) {
        let event = TrainFailed {
            event_id: key.event_id(&format!("failed-{delivered}")),
            run_id,
            request_id,
            reason: reason.to_owned(),
            will_retry,
            at: chrono::Utc::now(),
        };
        if let Err(e) = self.bus.publish(&event).await {
            warn!(error = %e, "Could not publish train.failed.");
        }
    }

    async fn attempt(&self, work: &Work<'_, TrainRequest>, run_id: RunId) -> Result<ModelPublished, Failure> {
        let request = work.command;
        let hp =
            Hyperparameters::resolve(request, &self.config.defaults).map_err(|e| Failure::Permanent(e.to_string()))?;

        if let Some(stored) = self.stored_version_for(request.event_id).await {
            info!(version = %stored.version, "This request's version was stored by an earlier attempt; finishing it.");
            return self.finish(work, run_id, stored).await;
        }

        let raw = self.fetch_dataset(request).await?;
        let dataset_id = raw.dataset_id.clone();
        info!(dataset_id = ?dataset_id.as_ref().map(ToString::to_string), hyperparameters = %serde_json::to_string(&hp).unwrap_or_default(), "Training started.");
        let artefact = self.train_off_runtime(request, run_id, hp.clone(), raw, work.shutdown).await?;

        let version = ModelVersion::generate();
        let mut metadata = ModelMetadata::new(version.clone());
        metadata.dataset_id = dataset_id;
        metadata.metrics = artefact.metrics.clone();
        metadata.hyperparameters = serde_json::to_value(&hp).unwrap_or_default();
        let extra = &mut metadata.extra;
        extra.insert("run_id".into(), serde_json::json!(run_id));
        extra.insert("request_id".into(), serde_json::json!(request.event_id));
        // The announcement's id is chosen once, with the version: a redelivered
        // request finished from the store announces it again under the same
        // `Nats-Msg-Id`, which the events stream stores once.
        extra.insert(PUBLISHED_EVENT_ID.into(), serde_json::json!(work.key.event_id("published")));
        if let Some(by) = &request.requested_by {
            extra.insert("requested_by".into(), serde_json::json!(by));
        }
        extra.insert("dataset".into(), serde_json::to_value(&artefact.data).unwrap_or_default());
        extra.insert(
            "training".into(),
            serde_json::json!({
                "seconds": artefact.stats.train_secs,
                "steps": artefact.stats.steps,
                "examples": artefact.stats.examples,
                "examples_per_sec": artefact.stats.examples_per_sec,
                "final_loss": artefact.stats.final_loss,
                "stopped_early": artefact.stats.stopped_early,
                "precision": artefact.stats.precision,
            }),
        );
        extra.insert("device".into(), serde_json::json!(artefact.device));
        extra.insert("timings".into(), artefact.timings.clone());
        extra.insert("libtorch_version".into(), serde_json::json!(LIBTORCH_VERSION));
        extra.insert("trainer_version".into(), serde_json::json!(env!("CARGO_PKG_VERSION")));
        extra.insert("architecture".into(), serde_json::json!(crate::model::ARCHITECTURE));
        extra.insert(
            "contract".into(),
            serde_json::json!({
                "input": "float [N,1,28,28] in [0,1], white digit on black",
                "output": "log-probabilities [N,10]",
            }),
        );

        let model = Bytes::from(artefact.torchscript);
        let stored = match &self.config.signing_key {
            Some(key) => self.store.publish_signed_model(model, metadata, key).instrument(info_span!("store")).await,
            None => self.store.publish_model(model, metadata).instrument(info_span!("store")).await,
        }
        .map_err(|e| Failure::Transient(format!("storing the model failed: {e}")))?;
        self.finish(work, run_id, stored).await
    }

    /// Gate, promote, announce — for a version that is stored (the runner then
    /// acknowledges). The announcement's id derives from the delivery, so finishing
    /// the same request again after a crash before the ack is stored once.
    #[tracing::instrument(name = "publish", skip_all)]
    async fn finish(
        &self,
        work: &Work<'_, TrainRequest>,
        run_id: RunId,
        stored: ModelMetadata,
    ) -> Result<ModelPublished, Failure> {
        let request = work.command;
        let version = stored.version.clone();
        let hp_force = stored.hyperparameters.get("force").and_then(serde_json::Value::as_bool).unwrap_or(false);
        // The gate decides against the CURRENT it read, and the move is conditional
        // on it: if another promotion moved CURRENT meanwhile, decide again against
        // the new one (a few times; then the delivery is retried).
        let mut attempt = 1;
        let decision = loop {
            let pointer = self
                .store
                .current_pointer()
                .await
                .map_err(|e| Failure::Transient(format!("reading CURRENT failed: {e}")))?;
            let incumbent = self.incumbent(pointer.version.clone(), &version).await;
            let decision = gate::decide(
                stored.metrics.accuracy,
                self.config.accuracy_floor,
                self.config.tolerance,
                incumbent.as_ref(),
                hp_force || request.force.unwrap_or(false),
            );
            if !decision.promote {
                break decision;
            }
            match self.store.promote_from(&pointer, &version).await {
                Ok(_) => break decision,
                Err(e @ StoreError::Conflict { .. }) if attempt < 5 => {
                    warn!(%version, attempt, error = %e, "CURRENT moved while gating; deciding again.");
                    attempt += 1;
                }
                Err(e) => return Err(Failure::Transient(format!("promoting {version} failed: {e}"))),
            }
        };
        // The id chosen when the version was stored (from the delivery's key), else
        // (a version stored before ids were kept) the key's: a repeat is stored once.
        let event_id = stored
            .extra
            .get(PUBLISHED_EVENT_ID)
            .and_then(|v| serde_json::from_value::<EventId>(v.clone()).ok())
            .unwrap_or_else(|| work.key.event_id("published"));
        let event = ModelPublished {
            event_id,
            version: version.clone(),
            location: format!("{}/", Store::model_prefix(&version)),
            sha256: stored.sha256.clone(),
            metrics: stored.metrics.clone(),
            dataset_id: stored.dataset_id.clone(),
            run_id: Some(run_id),
            request_id: Some(request.event_id),
            hyperparameters: stored.hyperparameters.clone(),
            promoted: decision.promote,
            promotion: decision.reason.clone(),
            at: chrono::Utc::now(),
        };
        self.bus.publish(&event).await.map_err(|e| Failure::Transient(format!("announcing {version} failed: {e}")))?;
        info!(
            %version,
            accuracy = stored.metrics.accuracy,
            loss = stored.metrics.loss,
            promoted = decision.promote,
            reason = %decision.reason,
            "Model published."
        );
        Ok(event)
    }

    /// The current version other than `new`, with its accuracy. An unreadable
    /// current version does not block promotion (the new one replaces it).
    async fn incumbent(&self, current: Option<ModelVersion>, new: &ModelVersion) -> Option<Incumbent> {
        let current = current.filter(|c| c != new)?;
        match self.store.model_metadata(&current).await {
            Ok(Some(m)) => Some(Incumbent { version: current.to_string(), accuracy: m.metrics.accuracy }),
            Ok(None) => None,
            Err(e) => {
                warn!(%current, error = %e, "Current version unreadable; the gate ignores it.");
                None
            }
        }
    }

    /// A version an earlier delivery of this request stored, if any.
    async fn stored_version_for(&self, request_id: EventId) -> Option<ModelMetadata> {
        let wanted = serde_json::json!(request_id);
        match self.store.list_models().await {
            Ok(models) => models.into_iter().rev().find(|m| m.extra.get("request_id") == Some(&wanted)),
            Err(e) => {
                warn!(error = %e, "Could not list stored versions; training again.");
                None
            }
        }
    }

    #[tracing::instrument(name = "fetch", skip_all)]
    async fn fetch_dataset(&self, request: &TrainRequest) -> Result<RawMnist, Failure> {
        let manifest = match &request.dataset_id {
            Some(id) => self
                .store
                .dataset(id)
                .await
                .map_err(|e| Failure::Transient(format!("reading data set {id} failed: {e}")))?
                .ok_or_else(|| Failure::Permanent(format!("dataset_id: data set {id} is not in the store")))?,
            None => self
                .store
                .latest_dataset()
                .await
                .map_err(|e| Failure::Transient(format!("listing data sets failed: {e}")))?
                .ok_or_else(|| Failure::Transient("no data set in the store yet (run the downloader)".into()))?,
        };
        let id = manifest.dataset_id.clone();
        let fetch = |name: &'static str| {
            let store = self.store.clone();
            let id = id.clone();
            async move {
                store
                    .get_dataset_file(&id, name)
                    .await
                    .map_err(|e| Failure::Transient(format!("reading {name} of data set {id} failed: {e}")))
            }
        };
        let (a, b, c, d) =
            tokio::try_join!(fetch(FILE_NAMES[0]), fetch(FILE_NAMES[1]), fetch(FILE_NAMES[2]), fetch(FILE_NAMES[3]))?;
        Ok(RawMnist { dataset_id: Some(id), files: [a, b, c, d], manifest: manifest.files })
    }

    /// Decodes, trains, evaluates and exports on a blocking thread, while this task
    /// publishes progress and watches for shutdown (the runner keeps the delivery alive).
    async fn train_off_runtime(
        &self,
        request: &TrainRequest,
        run_id: RunId,
        hp: Hyperparameters,
        raw: RawMnist,
        shutdown: &CancellationToken,
    ) -> Result<Artefact, Failure> {
        let cancel = Arc::new(AtomicBool::new(false));
        let control = Control { cancel: cancel.clone(), progress_interval: self.config.progress_interval };
        let (tx, mut rx) = mpsc::channel::<Update>(64);
        let span = tracing::Span::current();
        let threads = match self.config.threads {
            // The CPUs this process may use (cgroup quota included), not the host's.
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            n => n,
        };
        let mut job = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            // Set on the thread that trains: with OpenMP the setting is per thread.
            tch::set_num_threads(i32::try_from(threads).unwrap_or(i32::MAX));
            run_blocking(&raw, &hp, &control, &tx)
        });

        let bar = progress_bar(self.config.progress_bar);
        let mut phase = "training";
        let mut last: Option<Progress> = None;
        let result = loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled(), if !cancel.load(Ordering::Relaxed) => {
                    cancel.store(true, Ordering::Relaxed);
                }
                // Updates before the result, so the last progress report is not lost.
                Some(update) = rx.recv() => match update {
                    Update::Phase(p) => {
                        phase = p;
                        if let Some(last) = &last {
                            self.report(last, phase, run_id, request.event_id, bar.as_ref()).await;
                        }
                    }
                    Update::Progress(p) => {
                        self.report(&p, phase, run_id, request.event_id, bar.as_ref()).await;
                        last = Some(p);
                    }
                },
                r = &mut job => break r,
            }
        };
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        match result {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(TrainError::Cancelled)) => Err(Failure::Cancelled),
            Ok(Err(e @ (TrainError::Diverged { .. } | TrainError::Data(_)))) => Err(Failure::Permanent(e.to_string())),
            Ok(Err(e)) => Err(Failure::Transient(e.to_string())),
            Err(join) => Err(Failure::Transient(format!("the training thread panicked: {join}"))),
        }
    }

    async fn report(
        &self,
        p: &Progress,
        phase: &str,
        run_id: RunId,
        request_id: EventId,
        bar: Option<&indicatif::ProgressBar>,
    ) {
        self.metrics.progress(p.examples_per_sec, p.loss);
        match bar {
            Some(bar) => {
                bar.set_length(p.steps);
                bar.set_position(p.step);
                bar.set_message(format!(
                    "{phase}: epoch {}/{} loss {:.4} {:.0} img/s",
                    p.epoch, p.epochs, p.loss, p.examples_per_sec
                ));
            }
            None => info!(
                phase,
                epoch = p.epoch,
                epochs = p.epochs,
                step = p.step,
                steps = p.steps,
                loss = p.loss,
                examples_per_sec = p.examples_per_sec,
                eta_secs = p.eta_secs,
                "Training progress."
            ),
        }
        let event = TrainProgress {
            event_id: EventId::new(),
            run_id,
            request_id: Some(request_id),
            phase: phase.to_owned(),
            epoch: p.epoch,
            epochs: p.epochs,
            step: p.step,
            steps: p.steps,
            loss: p.loss,
            examples_per_sec: p.examples_per_sec,
            eta_secs: p.eta_secs,
            at: chrono::Utc::now(),
        };
        if let Err(e) = self.bus.publish(&event).await {
            warn!(error = %e, "Could not publish train.progress.");
        }
    }
}

fn progress_bar(setting: ProgressBar) -> Option<indicatif::ProgressBar> {
    let show = match setting {
        ProgressBar::On => true,
        ProgressBar::Off => false,
        ProgressBar::Auto => std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    show.then(|| {
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} steps, eta {eta} {msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    })
}

/// The blocking part: decode, train, evaluate, export.
fn run_blocking(
    raw: &RawMnist,
    hp: &Hyperparameters,
    control: &Control,
    tx: &mpsc::Sender<Update>,
) -> Result<Artefact, TrainError> {
    let started = Instant::now();
    // Tracing: one span per phase of the run.
    let phase = info_span!("decode").entered();
    let device = hp.device.resolve().map_err(|e| TrainError::Torch(tch::TchError::Kind(e)))?;
    let data = Mnist::decode(raw).map_err(|e| match e {
        crate::data::DataError::Torch(t) => TrainError::Torch(t),
        other => TrainError::Data(other.to_string()),
    })?;
    let data = data.to_device(device).map_err(|e| TrainError::Torch(tch::TchError::Kind(e.to_string())))?;
    let decode_secs = started.elapsed().as_secs_f64();
    drop(phase);
    let phase = info_span!("training").entered();
    let mut trained = train::train(&data, hp, device, control, &mut |p| {
        // Lossy on purpose: a slow NATS never slows training down.
        let _ = tx.try_send(Update::Progress(p.clone()));
    })?;
    drop(phase);
    let phase = info_span!("evaluate").entered();
    let _ = tx.try_send(Update::Phase("evaluating"));
    let t = Instant::now();
    let metrics = train::evaluate(&trained.net, &data.test_images, &data.test_labels)?;
    let evaluate_secs = t.elapsed().as_secs_f64();
    drop(phase);
    let _phase = info_span!("export").entered();
    let _ = tx.try_send(Update::Phase("exporting"));
    let t = Instant::now();
    let check = data.test_sample(16)?;
    let torchscript = train::export_torchscript(&mut trained, &check)?;
    let timings = serde_json::json!({
        "load_secs": decode_secs,
        "train_secs": trained.stats.train_secs,
        "evaluate_secs": evaluate_secs,
        "export_secs": t.elapsed().as_secs_f64(),
    });
    Ok(Artefact {
        torchscript,
        metrics,
        stats: trained.stats,
        data: data.summary,
        device: device_name(device),
        timings,
    })
}

/// `cpu` or `cuda:N`.
pub fn device_name(device: tch::Device) -> String {
    match device {
        tch::Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_ascii_lowercase(),
    }
}
