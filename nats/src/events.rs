//! One type per event or command. Field names are the JSON keys; every field
//! not essential to the message is optional (or has a default) so payloads can be
//! written by hand, and unknown fields are ignored so producers can add fields.
//!
//! Numeric hyperparameters in [`TrainRequest`] are deliberately wide (`i64`,
//! `f64`): a request with `"epochs": -1` must decode and then be *rejected* with a
//! clear [`TrainFailed`] event, not vanish as an undecodable message.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::ids::{DatasetId, EventId, ModelVersion, RunId};
use crate::subjects;

/// A payload tied to its subject.
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The subject suffix (see [`crate::subjects`]); the bus adds the prefix.
    const SUBJECT: &'static str;
    /// The message's id, used as `Nats-Msg-Id`.
    fn event_id(&self) -> EventId;
    /// Replaces the id (a command written without one gets its delivery's, see
    /// [`crate::work::DeliveryKey`]).
    fn set_event_id(&mut self, id: EventId);
}

macro_rules! message {
    ($ty:ty, $subject:expr) => {
        impl Message for $ty {
            const SUBJECT: &'static str = $subject;
            fn event_id(&self) -> EventId {
                self.event_id
            }
            fn set_event_id(&mut self, id: EventId) {
                self.event_id = id;
            }
        }
    };
}

fn now() -> DateTime<Utc> {
    Utc::now()
}

/// Command: download the data set (or re-announce it when already stored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetDownload {
    #[serde(default)]
    pub event_id: EventId,
    #[serde(default = "now")]
    pub requested_at: DateTime<Utc>,
    /// Mirror base URLs to use instead of the configured ones, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirrors: Option<Vec<String>>,
    /// Override the downloader's auto-train setting for this download.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_train: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
}
message!(DatasetDownload, subjects::DATASET_DOWNLOAD);

impl Default for DatasetDownload {
    fn default() -> Self {
        Self { event_id: EventId::new(), requested_at: now(), mirrors: None, auto_train: None, requested_by: None }
    }
}

/// One file of a stored data set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetFile {
    /// File name in the store, e.g. `train-images-idx3-ubyte.gz`.
    pub name: String,
    /// SHA-256 of the *decompressed* IDX content.
    pub sha256: String,
    /// Decompressed size in bytes.
    pub size_bytes: u64,
    /// Number of items (images or labels) in the file.
    pub count: u64,
}

/// Event: a complete, verified data set is in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetReady {
    #[serde(default)]
    pub event_id: EventId,
    pub dataset_id: DatasetId,
    /// Store key prefix of the data set (`datasets/mnist/<id>/`).
    pub location: String,
    #[serde(default)]
    pub files: Vec<DatasetFile>,
    #[serde(default)]
    pub train_count: u64,
    #[serde(default)]
    pub test_count: u64,
    /// The mirror the files came from.
    #[serde(default)]
    pub source: String,
    /// True when identical data was already stored and this is a re-announcement.
    #[serde(default)]
    pub reused: bool,
    /// The download command this answers, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<EventId>,
    #[serde(default = "now")]
    pub created_at: DateTime<Utc>,
}
message!(DatasetReady, subjects::DATASET_READY);

/// Event: a download failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetFailed {
    #[serde(default)]
    pub event_id: EventId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<EventId>,
    pub reason: String,
    #[serde(default)]
    pub mirrors_tried: Vec<String>,
    #[serde(default)]
    pub will_retry: bool,
    #[serde(default = "now")]
    pub at: DateTime<Utc>,
}
message!(DatasetFailed, subjects::DATASET_FAILED);

/// Command: train a model. Everything is optional; the trainer fills defaults
/// from its configuration and the named preset, then validates.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainRequest {
    #[serde(default)]
    pub event_id: EventId,
    /// The data set to train on; the latest stored one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_id: Option<DatasetId>,
    /// A named preset (`default`, `best`, ...) whose values the other fields override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// `adadelta`, `adam`, `adamw`, `sgd`, `rmsprop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Stop training after this many minutes (then evaluate and publish what there is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_minutes: Option<f64>,
    /// Train on at most this many examples per epoch (short runs, tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_train_examples: Option<i64>,
    /// Promote even when worse than the current version (the accuracy floor still applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
}
message!(TrainRequest, subjects::TRAIN_REQUEST);

/// Event: progress of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainProgress {
    #[serde(default)]
    pub event_id: EventId,
    pub run_id: RunId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<EventId>,
    /// `training` while steps run, then `evaluating`, `exporting`.
    #[serde(default)]
    pub phase: String,
    pub epoch: u32,
    pub epochs: u32,
    pub step: u64,
    pub steps: u64,
    /// Mean training loss since the previous progress event.
    pub loss: f64,
    pub examples_per_sec: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_secs: Option<f64>,
    #[serde(default = "now")]
    pub at: DateTime<Utc>,
}
message!(TrainProgress, subjects::TRAIN_PROGRESS);

/// Event: a training run failed or its request was rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainFailed {
    #[serde(default)]
    pub event_id: EventId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<RunId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<EventId>,
    pub reason: String,
    /// Whether the request will be delivered again (transient failure).
    #[serde(default)]
    pub will_retry: bool,
    #[serde(default = "now")]
    pub at: DateTime<Utc>,
}
message!(TrainFailed, subjects::TRAIN_FAILED);

/// Test-set metrics of a model version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelMetrics {
    pub accuracy: f64,
    pub loss: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_class_accuracy: Vec<f64>,
    /// `confusion[true][predicted]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub confusion: Vec<Vec<u64>>,
}

/// Event: a model version was stored; `promoted` says whether it is now `CURRENT`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelPublished {
    #[serde(default)]
    pub event_id: EventId,
    pub version: ModelVersion,
    /// Store key prefix of the version (`models/mnist-cnn/<version>/`).
    pub location: String,
    /// SHA-256 of `model.pt`.
    pub sha256: String,
    pub metrics: ModelMetrics,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_id: Option<DatasetId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<RunId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<EventId>,
    /// The hyperparameters the run actually used.
    #[serde(default)]
    pub hyperparameters: serde_json::Value,
    pub promoted: bool,
    /// Why it was (not) promoted, in words.
    #[serde(default)]
    pub promotion: String,
    #[serde(default = "now")]
    pub at: DateTime<Utc>,
}
message!(ModelPublished, subjects::MODEL_PUBLISHED);

/// Command: serve this version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelPromote {
    #[serde(default)]
    pub event_id: EventId,
    pub version: ModelVersion,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
}
message!(ModelPromote, subjects::MODEL_PROMOTE);

/// Event: an inference instance loaded a version, or refused one and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceLoaded {
    #[serde(default)]
    pub event_id: EventId,
    pub instance: String,
    /// The version now served (after a refusal: the one still served, if any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<ModelVersion>,
    pub ok: bool,
    /// The version that was refused, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<ModelVersion>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub load_ms: f64,
    #[serde(default = "now")]
    pub at: DateTime<Utc>,
}
message!(InferenceLoaded, subjects::INFERENCE_LOADED);

/// Event: a stage could not carry out a command it was given, and terminated it
/// (never redelivered): a payload it cannot read (not JSON, missing fields, a
/// schema version newer than it reads) or, for `model.promote`, a version that
/// cannot be served. The downloader and the trainer answer theirs with
/// `dataset.failed` and `train.failed`; the promoter with this.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRejected {
    #[serde(default)]
    pub event_id: EventId,
    /// The command's subject suffix (`model.promote`).
    pub command: String,
    /// The command's `event_id` when it names one, else its delivery's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<EventId>,
    /// The schema version the command declared, when it is readable JSON (the
    /// event's own `schema_version` is its format's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_schema_version: Option<u64>,
    /// The stage that rejected it (`promoter`).
    #[serde(default)]
    pub stage: String,
    pub reason: String,
    #[serde(default = "now")]
    pub at: DateTime<Utc>,
}
message!(CommandRejected, subjects::COMMAND_REJECTED);

/// A retention policy as configured (absent parts prune nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    /// Keep the newest N model versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_versions: Option<u32>,
    /// Also keep every version served within this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_served_secs: Option<u64>,
    /// Delete events older than this many seconds from the events stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_max_age_secs: Option<u64>,
}

/// Event: a retention pass deleted something (model versions, old events).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetentionPruned {
    #[serde(default)]
    pub event_id: EventId,
    /// The policy the pass applied.
    #[serde(default)]
    pub policy: RetentionPolicy,
    /// The model versions deleted from the store, oldest first.
    #[serde(default)]
    pub deleted_versions: Vec<ModelVersion>,
    /// The versions kept, each with why (`current`, `pinned`, `newest 3`, `served 2026-...`).
    #[serde(default)]
    pub kept_versions: Vec<KeptVersion>,
    /// How many events were purged from the events stream.
    #[serde(default)]
    pub events_purged: u64,
    /// Events stored before this time were purged (when the age policy is on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_before: Option<DateTime<Utc>>,
    /// The stage that pruned (`promoter`).
    #[serde(default)]
    pub stage: String,
    #[serde(default = "now")]
    pub at: DateTime<Utc>,
}
message!(RetentionPruned, subjects::RETENTION_PRUNED);

/// A version a retention pass kept, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptVersion {
    pub version: ModelVersion,
    pub reason: String,
}

/// Reply to a prediction (HTTP and `mnist.predict` alike).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub digit: u8,
    pub probabilities: Vec<f32>,
    pub model_version: ModelVersion,
    /// The 28×28 image the model saw, after preprocessing: 784 bytes (row by
    /// row, 0 = background, 255 = ink) as 1,568 lowercase hex digits. What the
    /// page sends back with its feedback ([`FeedbackSubmitted::input`]); absent
    /// from replies of instances older than this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
}

/// The side of the model's input image.
pub const INPUT_SIDE: usize = 28;
/// Pixels of the model's input image.
pub const INPUT_PIXELS: usize = INPUT_SIDE * INPUT_SIDE;

/// Checks an `input` (see [`Prediction::input`]): exactly 784 bytes as 1,568
/// hex digits.
///
/// # Errors
/// Says what is wrong, in words meant for the sender.
pub fn decode_input(hex_pixels: &str) -> Result<Vec<u8>, String> {
    if hex_pixels.len() != 2 * INPUT_PIXELS {
        return Err(format!(
            "input must be the {INPUT_PIXELS} pixels of the 28×28 image as {} hex digits (got {} characters)",
            2 * INPUT_PIXELS,
            hex_pixels.len()
        ));
    }
    hex::decode(hex_pixels).map_err(|e| format!("input is not hex: {e}"))
}

/// Event (JetStream work queue `feedback`): a person said which digit an answer
/// really was. Published by the web tier (`POST /api/feedback`), consumed by
/// the feedback stage, which stores it as a sample of the feedback set.
///
/// Only feedback from a trusted labeller (`trusted`, set by the web tier after
/// checking the labeller token, never by the sender) may ever enter a training
/// set or a promotion decision; anonymous feedback is unverified and feeds only
/// the live figures, marked as such.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackSubmitted {
    #[serde(default)]
    pub event_id: EventId,
    /// The version that answered.
    pub model_version: ModelVersion,
    /// The digit it answered.
    pub predicted: u8,
    /// The digit it really was, according to the sender.
    pub label: u8,
    /// The 28×28 image the model saw, as in [`Prediction::input`].
    pub input: String,
    /// Who sent it, as the web tier knows them: `ip-<hash>` for anonymous
    /// senders (a hash of the client address, not the address), `labeller` for
    /// the holder of the labeller token. The stage bounds what one client may store.
    pub client: String,
    /// From a trusted labeller (authenticated by the web tier).
    #[serde(default)]
    pub trusted: bool,
    #[serde(default = "now")]
    pub at: DateTime<Utc>,
}
message!(FeedbackSubmitted, subjects::FEEDBACK_SUBMITTED);

impl FeedbackSubmitted {
    /// Whether a client key is safe as a store path segment: 1 to 64 of
    /// `[a-z0-9_-]`.
    pub fn client_is_valid(client: &str) -> bool {
        !client.is_empty()
            && client.len() <= 64
            && client.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    }

    /// Checks what decoding cannot: digits 0 to 9, a valid version and client
    /// key, an input of exactly 784 pixels.
    ///
    /// # Errors
    /// Says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.predicted > 9 || self.label > 9 {
            return Err(format!("digits are 0 to 9 (predicted {}, label {})", self.predicted, self.label));
        }
        if !ModelVersion::is_valid(self.model_version.as_str()) {
            return Err(format!("{:?} is not a model version", self.model_version.as_str()));
        }
        if !Self::client_is_valid(&self.client) {
            return Err(format!("{:?} is not a client key (1 to 64 of a-z, 0-9, - and _)", self.client));
        }
        decode_input(&self.input).map(drop)
    }
}

/// Answers judged by feedback, and how many of them were right.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub answers: u64,
    pub correct: u64,
}

impl Tally {
    /// `correct / answers`, or `None` before the first answer.
    pub fn accuracy(&self) -> Option<f64> {
        (self.answers > 0).then(|| self.correct as f64 / self.answers as f64)
    }

    /// Counts one answer.
    pub fn add(&mut self, correct: bool) {
        self.answers += 1;
        self.correct += u64::from(correct);
    }
}

/// A version's live accuracy from feedback, trusted and unverified apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveAccuracy {
    /// Feedback from trusted labellers.
    #[serde(default)]
    pub trusted: Tally,
    /// Anonymous feedback: shown, never trusted.
    #[serde(default)]
    pub unverified: Tally,
}

/// Event: the feedback stage stored a sample (first delivery only: a repeat is
/// not announced again).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackStored {
    #[serde(default)]
    pub event_id: EventId,
    /// The [`FeedbackSubmitted`] event this sample is.
    pub feedback_id: EventId,
    pub model_version: ModelVersion,
    pub trusted: bool,
    pub correct: bool,
    /// The feedback set's version that first holds this sample (samples ever stored).
    pub set_version: u64,
    /// The version's live accuracy, this sample included.
    pub accuracy: LiveAccuracy,
    #[serde(default = "now")]
    pub at: DateTime<Utc>,
}
message!(FeedbackStored, subjects::FEEDBACK_STORED);

/// Event: a retention pass of the feedback stage deleted the samples stored
/// before `before` (published only by a pass that deleted something). The live
/// accuracy figures are aggregates and stay; only the samples (the images) go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackPruned {
    #[serde(default)]
    pub event_id: EventId,
    /// The policy: samples stored longer ago than this many seconds are deleted.
    pub max_age_secs: u64,
    /// The cut: samples stored before this time were deleted.
    pub before: DateTime<Utc>,
    /// Trusted samples deleted by this pass.
    pub trusted_deleted: u64,
    /// Unverified (anonymous) samples deleted by this pass.
    pub unverified_deleted: u64,
    /// Samples the set holds after the pass.
    pub trusted_left: u64,
    pub unverified_left: u64,
    #[serde(default = "now")]
    pub at: DateTime<Utc>,
}
message!(FeedbackPruned, subjects::FEEDBACK_PRUNED);

/// Command: delete the sample of feedback event `feedback_id` (the id
/// `POST /api/feedback` answered with: whoever holds it may delete it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackDelete {
    #[serde(default)]
    pub event_id: EventId,
    /// The [`FeedbackSubmitted`] event whose sample goes.
    pub feedback_id: EventId,
    #[serde(default = "now")]
    pub requested_at: DateTime<Utc>,
}
message!(FeedbackDelete, subjects::FEEDBACK_DELETE);

/// Event: the feedback stage handled a [`FeedbackDelete`]. `found` is false when
/// the set held no sample of that id (never stored, or deleted before): nothing
/// changed then.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackDeleted {
    #[serde(default)]
    pub event_id: EventId,
    /// The command this answers.
    pub request_id: EventId,
    pub feedback_id: EventId,
    pub found: bool,
    /// Whether the deleted sample was a trusted labeller's (absent when not found).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted: Option<bool>,
    #[serde(default = "now")]
    pub at: DateTime<Utc>,
}
message!(FeedbackDeleted, subjects::FEEDBACK_DELETED);

/// Error reply to a prediction: `{"error": {"code": 415, "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictError {
    pub error: ErrorBody,
}

/// The body of an error reply; `code` follows HTTP status semantics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: u16,
    pub message: String,
    /// Seconds after which a busy instance suggests sending the request again
    /// (the HTTP API's `Retry-After`); absent from the replies of most errors
    /// (and then not written at all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u32>,
}

impl PredictError {
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        Self { error: ErrorBody { code, message: message.into(), retry_after_secs: None } }
    }

    /// The same error with a retry hint in seconds.
    #[must_use]
    pub fn with_retry_after(mut self, seconds: Option<u32>) -> Self {
        self.error.retry_after_secs = seconds;
        self
    }

    /// A busy answer (503): the request may succeed if sent again after `retry_after_secs`.
    pub fn busy(message: impl Into<String>, retry_after_secs: u32) -> Self {
        Self::new(503, message).with_retry_after(Some(retry_after_secs))
    }

    /// What kind of refusal this is, for a caller that answers it in turn.
    pub fn kind(&self) -> Refusal {
        match (self.error.code, self.error.retry_after_secs) {
            (503 | 429, retry_after_secs) => Refusal::Busy { retry_after_secs },
            (code, _) => Refusal::Rejected { code },
        }
    }
}

/// The kinds of [`PredictError`] a caller tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The instance could not take the request now: code 503 (a full queue, no
    /// model yet, shutting down) or 429 (its decode budget is full: another
    /// instance may not be); with a hint, the seconds after which to try again.
    Busy { retry_after_secs: Option<u32> },
    /// The request itself was refused (bad input: 4xx) or failed (5xx).
    Rejected { code: u16 },
}

/// A reply on `mnist.predict`: either a prediction or an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PredictReply {
    Ok(Prediction),
    Err(PredictError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_written_payloads_decode() {
        let r: TrainRequest = serde_json::from_str(r#"{"epochs":2}"#).unwrap();
        assert_eq!(r.epochs, Some(2));
        assert_eq!(r.event_id.0.get_version_num(), 7);
        let r: TrainRequest = serde_json::from_str(r#"{"epochs":-1,"batch_size":0,"optimizer":"nope"}"#).unwrap();
        assert_eq!(r.epochs, Some(-1));
        let d: DatasetDownload = serde_json::from_str("{}").unwrap();
        assert!(d.mirrors.is_none());
        let p: ModelPromote = serde_json::from_str(r#"{"version":"20261130-050000-abcdef","extra":1}"#).unwrap();
        assert_eq!(p.version.as_str(), "20261130-050000-abcdef");
    }

    #[test]
    fn predict_replies_are_told_apart() {
        let ok: PredictReply =
            serde_json::from_str(r#"{"digit":7,"probabilities":[0,0,0,0,0,0,0,1,0,0],"model_version":"v"}"#).unwrap();
        assert!(matches!(ok, PredictReply::Ok(Prediction { digit: 7, .. })));
        let err: PredictReply = serde_json::from_str(r#"{"error":{"code":415,"message":"no"}}"#).unwrap();
        assert!(matches!(err, PredictReply::Err(PredictError { error: ErrorBody { code: 415, .. } })));
    }

    #[test]
    fn error_replies_keep_their_wire_shape_and_busy_ones_are_typed() {
        let plain = PredictError::new(503, "the prediction queue is full; retry shortly");
        assert_eq!(
            serde_json::to_string(&PredictReply::Err(plain.clone())).unwrap(),
            r#"{"error":{"code":503,"message":"the prediction queue is full; retry shortly"}}"#
        );
        assert_eq!(plain.kind(), Refusal::Busy { retry_after_secs: None });
        let busy: PredictReply =
            serde_json::from_str(r#"{"error":{"code":503,"message":"busy","retry_after_secs":2}}"#).unwrap();
        let PredictReply::Err(busy) = busy else { panic!("a busy reply decoded as a prediction") };
        assert_eq!(busy.kind(), Refusal::Busy { retry_after_secs: Some(2) });
        assert_eq!(busy, PredictError::busy("busy", 2));
        assert_eq!(PredictError::new(415, "no").kind(), Refusal::Rejected { code: 415 });
    }
}
