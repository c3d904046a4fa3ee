//! A loaded TorchScript model and the slot the compute thread reads it from.
//!
//! Contract (DESIGN.md): input float `[N, 1, 28, 28]` in `[0, 1]`, white on black;
//! output log-probabilities `[N, 10]`. A model is only ever put in the slot after a
//! warm-up forward pass that checks this contract, so a wrong or broken file is
//! refused at load time, never discovered by a request.

use std::io::Cursor;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use mnistflow_nats::ModelVersion;
use mnistflow_store::ModelMetadata;
use mnistflow_torch::{CpuAutocast, Precision};
use tch::{CModule, Device, Kind, Tensor};

use crate::preprocess::{PIXELS, SIDE};

/// Number of classes.
pub const CLASSES: usize = 10;

/// Why a model cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("not a loadable TorchScript module: {0}")]
    Load(String),
    #[error("forward pass failed: {0}")]
    Forward(String),
    #[error("model breaks the contract: {0}")]
    Contract(String),
}

/// A TorchScript model, warmed up and checked, with the version it came from.
#[derive(Debug)]
pub struct Model {
    module: CModule,
    /// `Bf16`: every forward pass runs under CPU autocast.
    precision: Precision,
    pub version: ModelVersion,
    pub metadata: Option<ModelMetadata>,
    /// How long loading and warming up took.
    pub load_time: Duration,
}

impl Model {
    /// Loads a module from bytes and runs the warm-up checks, in `precision`
    /// (`F32` or `Bf16`; `Auto` is resolved for the CPU): an output of shape
    /// `[N, 10]` whose exponentials sum to 1 per row.
    ///
    /// # Errors
    /// Not TorchScript, the forward pass fails, or the output breaks the contract.
    pub fn load(
        bytes: &[u8],
        version: ModelVersion,
        metadata: Option<ModelMetadata>,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        let started = Instant::now();
        let mut module = CModule::load_data_on_device(&mut Cursor::new(bytes), Device::Cpu)
            .map_err(|e| ModelError::Load(e.to_string()))?;
        module.f_set_eval().map_err(|e| ModelError::Load(e.to_string()))?;
        let precision = precision.resolve(Device::Cpu);
        let mut model = Self { module, precision, version, metadata, load_time: Duration::ZERO };
        // Warm-up: also allocates libtorch's kernels and buffers before the first request.
        for n in [1usize, 3] {
            let input: Vec<f32> = (0..n * PIXELS).map(|i| (i % 7) as f32 / 7.0).collect();
            let out = model.forward(&input, n)?;
            for row in out.chunks(CLASSES) {
                let total: f32 = row.iter().map(|v| v.exp()).sum();
                if !row.iter().all(|v| v.is_finite()) || (total - 1.0).abs() > 1e-3 {
                    return Err(ModelError::Contract(format!(
                        "output rows must be log-probabilities; a row sums to {total} after exp"
                    )));
                }
            }
        }
        model.load_time = started.elapsed();
        Ok(model)
    }

    /// The number format of its forward passes.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Runs one forward pass over `n` images (`input.len() == n * 784`) and returns
    /// `n * 10` float log-probabilities.
    ///
    /// # Errors
    /// libtorch fails, or the output is not `[n, 10]`.
    pub fn forward(&self, input: &[f32], n: usize) -> Result<Vec<f32>, ModelError> {
        if input.len() != n * PIXELS {
            return Err(ModelError::Forward(format!("{} values for {n} images", input.len())));
        }
        let _guard = tch::no_grad_guard();
        let _autocast = (self.precision == Precision::Bf16).then(CpuAutocast::bf16);
        let f = |e: tch::TchError| ModelError::Forward(e.to_string());
        let x = Tensor::from_slice(input).f_view([n as i64, 1, SIDE as i64, SIDE as i64]).map_err(f)?;
        let out = self.module.forward_ts(&[x]).map_err(f)?;
        if out.size() != [n as i64, CLASSES as i64] {
            return Err(ModelError::Contract(format!("output shape {:?}, expected [{n}, {CLASSES}]", out.size())));
        }
        let out = out.f_to_kind(Kind::Float).map_err(f)?.f_contiguous().map_err(f)?.f_view([-1]).map_err(f)?;
        Vec::<f32>::try_from(&out).map_err(f)
    }
}

/// The most likely class of one output row (log-probabilities or probabilities:
/// the order is the same); 0 for an empty row.
pub fn most_likely(row: &[f32]) -> u8 {
    row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u8)
}

/// The model being served, swapped atomically: the compute thread takes one
/// `Arc` per batch, so a batch in flight finishes on the model it started with and
/// the old model is freed when its last batch ends.
#[derive(Debug, Default)]
pub struct ModelSlot {
    current: RwLock<Option<Arc<Model>>>,
}

impl ModelSlot {
    /// The model now served.
    pub fn get(&self) -> Option<Arc<Model>> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Serves `model` from the next batch on; returns the previous one.
    pub fn swap(&self, model: Arc<Model>) -> Option<Arc<Model>> {
        self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner).replace(model)
    }

    /// The version now served.
    pub fn version(&self) -> Option<ModelVersion> {
        self.get().map(|m| m.version.clone())
    }
}
