//! Hot reload: follow `CURRENT` (file notifications and polling through
//! [`mnistflow_store::watch::watch_current`], plus `model.published` events for an
//! immediate check), or a pinned version; load off the request path, verify the
//! SHA-256 (the store does), warm up (the model does), then swap atomically.
//!
//! A version that fails is refused: the old model keeps serving, a
//! `mnist.inference.loaded` event with `ok: false` says why (also for a version
//! whose signature a configured keyring does not accept: unsigned, changed after
//! signing, or signed by an untrusted key), and the version is
//! not tried again until `CURRENT` names it anew. Transient store errors (the
//! backend unreachable, a pinned version not yet published) and an unsigned
//! version (the promoter may not have migrated it yet) are retried on the poll
//! interval and reported once.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mnistflow_nats::{Bus, InferenceLoaded, ModelPublished, ModelVersion, Received};
use mnistflow_store::{Keyring, ModelMetadata, SignatureError, Store, StoreError};
use mnistflow_torch::Precision;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::model::{Model, ModelError, ModelSlot};

enum LoaderJob {
    Load(Bytes, ModelVersion, Box<ModelMetadata>, oneshot::Sender<Result<Model, ModelError>>),
    Drop(Arc<Model>),
}

/// One long-lived thread that loads (and frees) every model. Loading on ever
/// new blocking-pool threads spreads libtorch's allocations over many malloc
/// arenas, and resident memory then grows with reloads; one thread reuses one.
struct Loader {
    tx: mpsc::Sender<LoaderJob>,
}

impl Loader {
    fn spawn(precision: Precision) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<LoaderJob>();
        std::thread::Builder::new().name("inference-loader".into()).spawn(move || {
            for job in rx {
                match job {
                    LoaderJob::Load(bytes, version, metadata, reply) => {
                        let _ = reply.send(Model::load(&bytes, version, Some(*metadata), precision));
                    }
                    LoaderJob::Drop(model) => drop(model),
                }
            }
        })?;
        Ok(Self { tx })
    }

    async fn load(&self, bytes: Bytes, version: ModelVersion, metadata: ModelMetadata) -> Result<Model, String> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(LoaderJob::Load(bytes, version, Box::new(metadata), reply))
            .map_err(|_| "the loader thread is gone".to_owned())?;
        match answer.await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err("loading panicked".to_owned()),
        }
    }

    /// Frees `model` on the loader thread, if this was its last user.
    fn release(&self, model: Arc<Model>) {
        let _ = self.tx.send(LoaderJob::Drop(model));
    }
}

/// Follows the version to serve and keeps the slot loaded with it.
#[derive(Debug)]
pub struct Reloader {
    pub store: Store,
    pub bus: Bus,
    pub slot: Arc<ModelSlot>,
    pub metrics: Metrics,
    pub instance: String,
    pub pinned: Option<ModelVersion>,
    pub poll: Duration,
    /// The number format models are loaded to run in.
    pub precision: Precision,
    /// A version whose model is larger is refused before it is read.
    pub max_model_bytes: u64,
    /// A version must be signed by one of these keys; `None`: no signature check.
    pub keyring: Option<Keyring>,
}

/// The outcome of one attempt, for the bookkeeping of [`Reloader::run`].
enum Attempt {
    Loaded,
    /// Will not be retried until the wanted version changes.
    Refused,
    /// May succeed later (store unreachable, version not yet there).
    Transient(String),
}

impl Reloader {
    /// Runs until `shutdown`. Loads the wanted version at once, then on every change.
    pub async fn run(self, shutdown: CancellationToken) {
        let loader = match Loader::spawn(self.precision) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "Cannot start the model loader thread; no model will be loaded.");
                return;
            }
        };
        let mut current = self
            .pinned
            .is_none()
            .then(|| mnistflow_store::watch::watch_current(self.store.clone(), self.poll, shutdown.child_token()));
        let mut published = match self.bus.subscribe::<ModelPublished>().await {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "Cannot subscribe to model.published; following CURRENT by polling only.");
                None
            }
        };
        match &self.keyring {
            Some(ring) => info!(trusted_keys = ?ring.key_ids(), "Model versions must be signed by a trusted key."),
            None => warn!("INFERENCE_TRUSTED_KEYS is unset: model versions are loaded without a signature check."),
        }
        let mut ticker = tokio::time::interval(self.poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refused: Option<ModelVersion> = None;
        let mut reported: Option<ModelVersion> = None;
        loop {
            self.check(&loader, &mut refused, &mut reported).await;
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                changed = async { current.as_mut()?.changed().await.ok() }, if current.is_some() => {
                    if changed.is_none() {
                        current = None;
                    }
                }
                msg = async { published.as_mut()?.next().await }, if published.is_some() => match msg {
                    Some(Received::Message(event)) => info!(version = %event.version, promoted = event.promoted, "Model published; checking CURRENT."),
                    Some(Received::Undecodable { .. }) => {}
                    None => published = None,
                },
                _ = ticker.tick() => {}
            }
        }
        info!("Model reloader stopped.");
    }

    /// The version that should be served now.
    async fn wanted(&self) -> Result<Option<ModelVersion>, StoreError> {
        match &self.pinned {
            Some(v) => Ok(Some(v.clone())),
            None => self.store.current().await,
        }
    }

    async fn check(&self, loader: &Loader, refused: &mut Option<ModelVersion>, reported: &mut Option<ModelVersion>) {
        let wanted = match self.wanted().await {
            Ok(Some(v)) => v,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, "Reading CURRENT failed; will retry.");
                return;
            }
        };
        if self.slot.version().as_ref() == Some(&wanted) || refused.as_ref() == Some(&wanted) {
            return;
        }
        match self.load(loader, &wanted).await {
            Attempt::Loaded => {
                *refused = None;
                *reported = None;
            }
            Attempt::Refused => *refused = Some(wanted),
            Attempt::Transient(error) => {
                if reported.as_ref() != Some(&wanted) {
                    warn!(version = %wanted, %error, "Cannot load the wanted version yet; will retry.");
                    self.announce_refusal(&wanted, &error, 0.0).await;
                    *reported = Some(wanted);
                }
            }
        }
    }

    /// Loads, verifies, warms up and swaps in `version`.
    async fn load(&self, loader: &Loader, version: &ModelVersion) -> Attempt {
        let started = Instant::now();
        let loaded = match &self.keyring {
            Some(ring) => self
                .store
                .load_verified_model_within(version, self.max_model_bytes, ring)
                .await
                .map(|(bytes, metadata, key_id)| (bytes, metadata, Some(key_id))),
            None => self.store.load_model_within(version, self.max_model_bytes).await.map(|(b, m)| (b, m, None)),
        };
        let (bytes, metadata, signed_by) = match loaded {
            Ok(loaded) => loaded,
            // An unsigned version may yet be signed (the promoter's migration runs
            // at its start, maybe after this pod's): tried again on every poll.
            Err(
                e @ (StoreError::NotFound(_)
                | StoreError::Backend(_)
                | StoreError::Io(_)
                | StoreError::Signature { reason: SignatureError::Unsigned, .. }),
            ) => {
                return Attempt::Transient(e.to_string());
            }
            Err(e) => return self.refuse(version, &e.to_string(), started).await,
        };
        let model = match loader.load(bytes, version.clone(), metadata).await {
            Ok(model) => Arc::new(model),
            Err(e) => return self.refuse(version, &e, started).await,
        };
        let load_ms = started.elapsed().as_secs_f64() * 1000.0;
        let previous = self.slot.swap(model);
        self.metrics.serving(version.as_str());
        self.metrics.reload(true);
        info!(%version, previous = ?previous.as_ref().map(|m| m.version.as_str()), ?signed_by, load_ms, "Model loaded and serving.");
        // The previous model is freed when the last batch holding it ends.
        if let Some(previous) = previous {
            loader.release(previous);
        }
        let event = InferenceLoaded {
            event_id: Default::default(),
            instance: self.instance.clone(),
            version: Some(version.clone()),
            ok: true,
            refused: None,
            error: None,
            load_ms,
            at: chrono::Utc::now(),
        };
        if let Err(e) = self.bus.publish(&event).await {
            warn!(error = %e, "Publishing inference.loaded failed.");
        }
        Attempt::Loaded
    }

    async fn refuse(&self, version: &ModelVersion, error: &str, started: Instant) -> Attempt {
        self.metrics.reload(false);
        warn!(%version, %error, serving = ?self.slot.version().map(|v| v.0), "Model version refused; the previous one keeps serving.");
        self.announce_refusal(version, error, started.elapsed().as_secs_f64() * 1000.0).await;
        Attempt::Refused
    }

    async fn announce_refusal(&self, version: &ModelVersion, error: &str, load_ms: f64) {
        let event = InferenceLoaded {
            event_id: Default::default(),
            instance: self.instance.clone(),
            version: self.slot.version(),
            ok: false,
            refused: Some(version.clone()),
            error: Some(error.to_owned()),
            load_ms,
            at: chrono::Utc::now(),
        };
        if let Err(e) = self.bus.publish(&event).await {
            warn!(error = %e, "Publishing inference.loaded failed.");
        }
    }
}
