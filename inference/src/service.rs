//! The state both APIs share: limits, the batcher, the model slot, metrics, and the
//! one function that turns an upload into an answer.

use std::sync::Arc;

use mnistflow_nats::{ModelVersion, PredictError, Prediction};
use mnistflow_store::Store;

use crate::batcher::{Answer, Batcher, PredictFailure};
use crate::config::Limits;
use crate::metrics::Metrics;
use crate::model::ModelSlot;
use crate::preprocess::{self, DecodeBudget, PreprocessError};

/// Uploads that decode to at most this many pixels are prepared on the calling
/// task: a 28×28 PNG takes microseconds, less than a hop to the blocking pool.
/// Anything larger goes to `spawn_blocking`, off the async workers.
pub const INLINE_MAX_PIXELS: u64 = 128 * 128;

/// The `code` of a NATS error reply when the decode budget is full (HTTP answers 503).
pub const BUSY_CODE: u16 = 429;

/// Why a prediction request failed; the one place statuses are decided.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Input(#[from] PreprocessError),
    #[error(transparent)]
    Predict(#[from] PredictFailure),
    #[error("{1}")]
    Other(u16, String),
}

impl ApiError {
    /// The HTTP status, also the `code` of a NATS error reply.
    pub fn status(&self) -> u16 {
        match self {
            Self::Input(e) => e.status(),
            Self::Predict(e) => e.status(),
            Self::Other(code, _) => *code,
        }
    }

    /// Seconds a client should wait before retrying, for 503s.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            Self::Predict(PredictFailure::QueueFull | PredictFailure::Timeout(_) | PredictFailure::ShuttingDown) => {
                Some(1)
            }
            Self::Predict(PredictFailure::NoModel) => Some(5),
            Self::Input(PreprocessError::Busy) => Some(1),
            _ => None,
        }
    }

    /// The JSON error body of the HTTP API.
    pub fn body(&self) -> PredictError {
        PredictError::new(self.status(), self.to_string())
    }

    /// The error reply on `mnist.predict`: the HTTP body with the retry hint in
    /// `retry_after_secs`, and a full decode budget told apart from the other 503s
    /// by its code, [`BUSY_CODE`] (429): this instance is busy, another
    /// instance of the queue group may not be, so a requester can retry at once.
    pub fn reply(&self) -> PredictError {
        let code = if matches!(self, Self::Input(PreprocessError::Busy)) { BUSY_CODE } else { self.status() };
        PredictError::new(code, self.to_string()).with_retry_after(self.retry_after())
    }
}

/// Everything a request needs. Shared as `Arc<Service>`.
#[derive(Debug)]
pub struct Service {
    pub batcher: Batcher,
    pub slot: Arc<ModelSlot>,
    pub metrics: Metrics,
    pub limits: Limits,
    pub store: Store,
    pub instance: String,
    pub pinned: Option<ModelVersion>,
    /// The memory all decodes may hold at once, HTTP and NATS together.
    pub decode_budget: DecodeBudget,
}

impl Service {
    /// Prepares `bytes` (off the async workers unless tiny) and classifies it
    /// through the batcher. `raw_ok` also accepts 784 raw pixel bytes.
    ///
    /// # Errors
    /// Bad input (400/413/415/422), a full decode budget, a full queue or no
    /// model (503), a failed forward pass (500).
    pub async fn predict(&self, bytes: Vec<u8>, raw_ok: bool) -> Result<Answer, ApiError> {
        let limits = self.limits;
        let small = bytes.len() as u64 <= limits.max_body_bytes
            && preprocess::dimensions(&bytes).is_none_or(|(w, h)| u64::from(w) * u64::from(h) <= INLINE_MAX_PIXELS);
        let pixels = if small {
            preprocess::prepare_within(&bytes, &limits, raw_ok, &self.decode_budget)
        } else {
            let span = tracing::Span::current();
            let budget = self.decode_budget.clone();
            tokio::task::spawn_blocking(move || {
                span.in_scope(|| preprocess::prepare_within(&bytes, &limits, raw_ok, &budget))
            })
            .await
            .map_err(|e| ApiError::Other(500, format!("preprocessing failed: {e}")))?
        };
        let pixels = pixels?;
        let input = seen(&pixels);
        let mut answer = self.batcher.predict(Box::new(pixels)).await?;
        answer.input = Some(input);
        Ok(answer)
    }
}

/// The model's input as the reply carries it ([`Prediction::input`]): each pixel
/// of `[0, 1]` to one byte, as hex.
pub fn seen(pixels: &preprocess::Pixels) -> String {
    let bytes: Vec<u8> = pixels.iter().map(|p| (p.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
    hex::encode(bytes)
}

impl From<Answer> for Prediction {
    fn from(a: Answer) -> Self {
        Self { digit: a.digit, probabilities: a.probabilities, model_version: a.version, input: a.input }
    }
}
