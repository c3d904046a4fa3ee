//! The message types of format version 1, frozen as the first release shipped
//! them (`nats/src/events.rs` at the commit before schema versions), decoded as
//! that release decoded them: `serde_json`, unknown fields ignored. It stands in
//! for a build of the previous release: `nats/tests/compat.rs` feeds it this
//! release's messages. Do not edit it to follow the current types.

#![allow(dead_code)]

use chrono::{DateTime, Utc};
use mnistflow_nats::{DatasetId, EventId, ModelVersion, RunId};
use serde::{Deserialize, Serialize};

fn now() -> DateTime<Utc> {
    Utc::now()
}
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetDownload {
    #[serde(default)]
    pub event_id: EventId,
    #[serde(default = "now")]
    pub requested_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirrors: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_train: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetFile {
    pub name: String,
    pub sha256: String,
    pub size_bytes: u64,
    pub count: u64,
}
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetReady {
    #[serde(default)]
    pub event_id: EventId,
    pub dataset_id: DatasetId,
    pub location: String,
    #[serde(default)]
    pub files: Vec<DatasetFile>,
    #[serde(default)]
    pub train_count: u64,
    #[serde(default)]
    pub test_count: u64,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub reused: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<EventId>,
    #[serde(default = "now")]
    pub created_at: DateTime<Utc>,
}
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainRequest {
    #[serde(default)]
    pub event_id: EventId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_id: Option<DatasetId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_minutes: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_train_examples: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
}
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainProgress {
    #[serde(default)]
    pub event_id: EventId,
    pub run_id: RunId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<EventId>,
    #[serde(default)]
    pub phase: String,
    pub epoch: u32,
    pub epochs: u32,
    pub step: u64,
    pub steps: u64,
    pub loss: f64,
    pub examples_per_sec: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_secs: Option<f64>,
    #[serde(default = "now")]
    pub at: DateTime<Utc>,
}
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainFailed {
    #[serde(default)]
    pub event_id: EventId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<RunId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<EventId>,
    pub reason: String,
    #[serde(default)]
    pub will_retry: bool,
    #[serde(default = "now")]
    pub at: DateTime<Utc>,
}
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelMetrics {
    pub accuracy: f64,
    pub loss: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_class_accuracy: Vec<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub confusion: Vec<Vec<u64>>,
}
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelPublished {
    #[serde(default)]
    pub event_id: EventId,
    pub version: ModelVersion,
    pub location: String,
    pub sha256: String,
    pub metrics: ModelMetrics,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_id: Option<DatasetId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<RunId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<EventId>,
    #[serde(default)]
    pub hyperparameters: serde_json::Value,
    pub promoted: bool,
    #[serde(default)]
    pub promotion: String,
    #[serde(default = "now")]
    pub at: DateTime<Utc>,
}
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelPromote {
    #[serde(default)]
    pub event_id: EventId,
    pub version: ModelVersion,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
}
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceLoaded {
    #[serde(default)]
    pub event_id: EventId,
    pub instance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<ModelVersion>,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<ModelVersion>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub load_ms: f64,
    #[serde(default = "now")]
    pub at: DateTime<Utc>,
}
