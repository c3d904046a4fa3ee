//! The trainer stage (see DESIGN.md): takes `train.request` commands from the
//! JetStream work queue, trains the seed's CNN with tch (libtorch) off the async
//! runtime, streams `train.progress`, evaluates on the 10,000 test images, exports
//! TorchScript, stores the version atomically, runs the quality gate and
//! announces `model.published` — acknowledging the request only after all that.
//!
//! Parts:
//! - [`config`]: `Config::from_lookup` (`TRAINER_*` variables).
//! - [`params`]: presets (`default`, `best`), request overrides, validation.
//! - [`data`]: the MNIST files decoded once into tensors.
//! - [`train`]: the training loop (Adam/AdamW/SGD/RMSprop from tch, Adadelta
//!   here), evaluation (accuracy, loss, per-class accuracy, confusion matrix) and
//!   the TorchScript export.
//! - [`gate`]: whether a new version becomes `CURRENT`.
//! - [`worker`]: the work-queue loop and delivery semantics.
//! - [`metrics`]: Prometheus metrics and `/healthz`.
//! - [`model`]: the network itself.
//!
//! For other crates' tests, [`quick_model`] trains a small but good model from
//! the MNIST files in seconds, and [`publish_quick_model`] stores it as a version.

pub mod config;
pub mod data;
pub mod gate;
pub mod metrics;
pub mod model;
pub mod params;
pub mod train;
pub mod worker;

use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use mnistflow_nats::{Bus, ModelMetrics, ModelVersion, TrainRequest};
use mnistflow_store::{ModelMetadata, Store, StoreError};
use tokio_util::sync::CancellationToken;

pub use config::{Config, Mode};
pub use params::{Hyperparameters, Preset};
pub use train::{LIBTORCH_VERSION, TrainError};
pub use worker::Worker;

/// Runs the trainer as configured: connects to NATS and the store, serves
/// metrics (worker mode), then consumes requests until `shutdown` (worker) or
/// after one request (job).
///
/// # Errors
/// NATS unreachable, the store URL unsupported, the metrics address unusable, or
/// (job mode) the request failed transiently.
pub async fn main_with(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = Store::open(&config.store_url)?;
    match &config.signing_key {
        Some(key) => tracing::info!(key_id = key.key_id(), "Versions are published signed."),
        None => tracing::warn!("TRAINER_SIGNING_KEY is unset: versions are published unsigned."),
    }
    let bus = Bus::connect(&config.nats, &shutdown).await?;
    bus.ensure_streams().await?;
    run(config, bus, store, shutdown).await
}

/// The stage on its resources (`mnistflow up` hands every stage the same bus and
/// store): serves metrics (worker mode), then consumes requests until `shutdown`
/// (worker) or after one request (job).
///
/// # Errors
/// The metrics address is unusable, or (job mode) the request failed transiently.
pub async fn run(config: Config, bus: Bus, store: Store, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(metrics::Metrics::new());
    let server = match (config.mode, config.metrics_addr) {
        (Mode::Worker, Some(addr)) => Some(metrics::serve(addr, metrics.clone(), shutdown.clone()).await?.1),
        _ => None,
    };
    let worker = Worker { bus, store, config: Arc::new(config), metrics };
    let result = worker.run(shutdown.clone()).await;
    shutdown.cancel();
    if let Some(server) = server {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    }
    Ok(result?)
}

/// A model trained in-process by [`train_from_dir`] or [`quick_model`].
#[derive(Debug, Clone)]
pub struct TrainedModel {
    /// The TorchScript file (`model.pt`): float `[N,1,28,28]` in `[0,1]` → log-probabilities `[N,10]`.
    pub torchscript: Vec<u8>,
    /// On the full 10,000-image test set.
    pub metrics: ModelMetrics,
    pub hyperparameters: Hyperparameters,
    pub stats: train::TrainStats,
}

/// Trains on the MNIST `.gz` files in `dir` (on the CPU) with `request`'s
/// hyperparameters over the `default` preset, evaluates and exports. Blocking:
/// call it from a plain thread or `spawn_blocking`.
///
/// # Errors
/// Invalid hyperparameters, unreadable files, or a libtorch failure.
pub fn train_from_dir(dir: &Path, request: &TrainRequest) -> Result<TrainedModel, TrainError> {
    let defaults = config::TrainDefaults {
        default_preset: Preset::default_preset(),
        seed: 1,
        device: params::DeviceChoice::Cpu,
        max_minutes: None,
        precision: None,
    };
    let hp = Hyperparameters::resolve(request, &defaults).map_err(|e| TrainError::Data(e.to_string()))?;
    let raw = data::RawMnist::from_dir(dir).map_err(|e| TrainError::Data(e.to_string()))?;
    let data = data::Mnist::decode(&raw).map_err(|e| TrainError::Data(e.to_string()))?;
    let mut trained = train::train(&data, &hp, tch::Device::Cpu, &train::Control::default(), &mut |_| {})?;
    let metrics = train::evaluate(&trained.net, &data.test_images, &data.test_labels)?;
    let check = data.test_sample(16)?;
    let torchscript = train::export_torchscript(&mut trained, &check)?;
    Ok(TrainedModel { torchscript, metrics, hyperparameters: hp, stats: trained.stats })
}

/// How many training examples [`quick_model`] uses.
pub const QUICK_MODEL_EXAMPLES: i64 = 8_000;

static QUICK: Mutex<Option<Arc<TrainedModel>>> = Mutex::new(None);

/// A small model for other crates' tests: the seed CNN trained for one pass over
/// the first [`QUICK_MODEL_EXAMPLES`] shuffled training images of the MNIST files
/// in `dir` (e.g. `mnistflow_integration::mnist_dir()`), about 96 % accurate.
/// Takes about 15 s on two cores the first time; later calls in the same process
/// return the same model at once. Blocking.
///
/// # Errors
/// See [`train_from_dir`].
pub fn quick_model(dir: &Path) -> Result<Arc<TrainedModel>, TrainError> {
    // Holding the lock while training makes concurrent callers wait for one run.
    let mut cached = QUICK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(m) = cached.as_ref() {
        return Ok(m.clone());
    }
    let request = TrainRequest { max_train_examples: Some(QUICK_MODEL_EXAMPLES), seed: Some(7), ..Default::default() };
    let model = Arc::new(train_from_dir(dir, &request)?);
    *cached = Some(model.clone());
    Ok(model)
}

/// Stores [`quick_model`] as a new version (not promoted; call
/// [`Store::promote`]) with metadata like the worker's, and returns that metadata.
///
/// # Errors
/// Training (see [`quick_model`]) or the store failed.
pub async fn publish_quick_model(store: &Store, dir: &Path) -> Result<ModelMetadata, QuickModelError> {
    let dir = dir.to_path_buf();
    let model = tokio::task::spawn_blocking(move || quick_model(&dir))
        .await
        .map_err(|e| QuickModelError::Train(TrainError::Data(format!("training thread panicked: {e}"))))??;
    let mut metadata = ModelMetadata::new(ModelVersion::generate());
    metadata.metrics = model.metrics.clone();
    metadata.hyperparameters = serde_json::to_value(&model.hyperparameters).unwrap_or_default();
    metadata.extra.insert("device".into(), serde_json::json!("cpu"));
    metadata.extra.insert("libtorch_version".into(), serde_json::json!(LIBTORCH_VERSION));
    metadata.extra.insert("architecture".into(), serde_json::json!(model::ARCHITECTURE));
    metadata.extra.insert("quick_model".into(), serde_json::json!(true));
    Ok(store.publish_model(Bytes::from(model.torchscript.clone()), metadata).await?)
}

/// Why [`publish_quick_model`] failed.
#[derive(Debug, thiserror::Error)]
pub enum QuickModelError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Store(#[from] StoreError),
}
