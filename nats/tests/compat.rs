//! The wire format across releases (issue 21, item 1, the fixture set).
//!
//! - `tests/compat/v1/`: every message the first release's stages and CLI put on
//!   NATS, recorded from a real `mnistflow up` run (`<subject>.json`), plus the
//!   hand-written forms people send (`*.hand-written.json`). Format version 1: no
//!   `schema_version`. This release must still read each one.
//! - `tests/compat/v2/`: the same messages in this release's format (version 2:
//!   `schema_version` first, nothing else changed), plus the subjects new in it.
//!   This release reads them, and so does the previous one: `frozen/v1.rs` holds
//!   the version-1 types as that release shipped them, standing in for a second
//!   build, and decodes every v2 message of a subject it knew to the same value
//!   as its v1 recording.
//!
//! A format change adds a fixture set and keeps the old ones passing (docs/nats.md, "Versions").

#[path = "frozen/v1.rs"]
mod v1;

use std::collections::BTreeSet;
use std::path::PathBuf;

use mnistflow_nats::events::Message;
use mnistflow_nats::schema::{self, DecodeError, SCHEMA_VERSION};
use mnistflow_nats::{
    CommandRejected, DatasetDownload, DatasetFailed, DatasetReady, FeedbackDelete, FeedbackDeleted, FeedbackPruned,
    InferenceLoaded, ModelPromote, ModelPublished, RetentionPruned, TrainFailed, TrainProgress, TrainRequest,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn dir(version: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/compat").join(version)
}

fn read(version: &str, name: &str) -> serde_json::Value {
    let file = dir(version).join(format!("{name}.json"));
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// Hand-written commands carry no `event_id`: the work-queue runner gives them
/// their delivery's; here any id does.
fn with_id(raw: &serde_json::Value) -> serde_json::Value {
    let mut with_id = raw.clone();
    if with_id.get("event_id").is_none() {
        with_id["event_id"] = serde_json::json!("01a22f3e-0000-7000-8000-000000000000");
    }
    with_id
}

/// Decodes `<version>/<name>.json` with this release's decoder, checks `M`
/// belongs to that subject, and that a round trip through this release's
/// encoding keeps every recorded field. Returns the file name.
fn check<M: Message + std::fmt::Debug + PartialEq>(version: &str, name: &str) -> String {
    let file = format!("{name}.json");
    let raw = read(version, name);
    let decoded: M = schema::decode(&serde_json::to_vec(&with_id(&raw)).unwrap())
        .unwrap_or_else(|e| panic!("{version}/{file} no longer decodes as {}: {e}", std::any::type_name::<M>()));
    assert_eq!(name.split('.').take(2).collect::<Vec<_>>().join("."), M::SUBJECT, "{file}");
    if let Some(id) = raw.get("event_id") {
        assert_eq!(id.as_str().unwrap(), decoded.event_id().to_string(), "{version}/{file}: the event id changed");
    }
    let encoded: serde_json::Value = serde_json::from_slice(&schema::encode(&decoded).unwrap()).unwrap();
    assert_eq!(encoded[schema::FIELD], SCHEMA_VERSION, "{version}/{file}: written without this release's version");
    for (key, value) in raw.as_object().unwrap() {
        assert_eq!(
            encoded.get(key),
            Some(value),
            "{version}/{file}: {key} is no longer read (or written) the same way"
        );
    }
    let again: M = schema::decode(&serde_json::to_vec(&encoded).unwrap()).unwrap();
    assert_eq!(again, decoded, "{version}/{file}: a round trip changes it");
    file
}

fn listing(version: &str) -> BTreeSet<String> {
    std::fs::read_dir(dir(version)).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

#[test]
fn every_recorded_message_of_format_v1_still_decodes() {
    let checked: BTreeSet<String> = [
        check::<DatasetDownload>("v1", "dataset.download"),
        check::<DatasetDownload>("v1", "dataset.download.hand-written"),
        check::<DatasetReady>("v1", "dataset.ready"),
        check::<DatasetFailed>("v1", "dataset.failed"),
        check::<TrainRequest>("v1", "train.request"),
        check::<TrainRequest>("v1", "train.request.hand-written"),
        check::<TrainProgress>("v1", "train.progress"),
        check::<TrainFailed>("v1", "train.failed"),
        check::<ModelPublished>("v1", "model.published"),
        check::<ModelPromote>("v1", "model.promote"),
        check::<ModelPromote>("v1", "model.promote.hand-written"),
        check::<InferenceLoaded>("v1", "inference.loaded"),
    ]
    .into_iter()
    .collect();
    assert_eq!(listing("v1"), checked, "a fixture without a check, or a check without a fixture");
}

#[test]
fn every_message_of_format_v2_decodes_and_is_written_so() {
    let checked: BTreeSet<String> = [
        check::<DatasetDownload>("v2", "dataset.download"),
        check::<DatasetDownload>("v2", "dataset.download.hand-written"),
        check::<DatasetReady>("v2", "dataset.ready"),
        check::<DatasetFailed>("v2", "dataset.failed"),
        check::<TrainRequest>("v2", "train.request"),
        check::<TrainRequest>("v2", "train.request.hand-written"),
        check::<TrainProgress>("v2", "train.progress"),
        check::<TrainFailed>("v2", "train.failed"),
        check::<ModelPublished>("v2", "model.published"),
        check::<ModelPromote>("v2", "model.promote"),
        check::<ModelPromote>("v2", "model.promote.hand-written"),
        check::<InferenceLoaded>("v2", "inference.loaded"),
        check::<CommandRejected>("v2", "command.rejected"),
        check::<RetentionPruned>("v2", "retention.pruned"),
        check::<FeedbackPruned>("v2", "feedback.pruned"),
        check::<FeedbackDelete>("v2", "feedback.delete"),
        check::<FeedbackDeleted>("v2", "feedback.deleted"),
    ]
    .into_iter()
    .collect();
    assert_eq!(listing("v2"), checked, "a fixture without a check, or a check without a fixture");
    for name in &checked {
        let raw = read("v2", name.trim_end_matches(".json"));
        assert_eq!(raw[schema::FIELD], 2, "v2/{name} does not say it is version 2");
    }
}

/// Decodes a v2 message with the frozen v1 type as the v1 release did, and its
/// v1 recording likewise: every recorded field must come out the same (fields
/// left out take defaults, some of them the time of decoding).
fn v1_reads_v2<T: DeserializeOwned + Serialize>(name: &str) -> String {
    let new: T = serde_json::from_value(with_id(&read("v2", name)))
        .unwrap_or_else(|e| panic!("the v1 release cannot read v2/{name}.json: {e}"));
    let old: T = serde_json::from_value(with_id(&read("v1", name))).unwrap();
    let (new, old) = (serde_json::to_value(new).unwrap(), serde_json::to_value(old).unwrap());
    for key in with_id(&read("v1", name)).as_object().unwrap().keys() {
        assert_eq!(new.get(key), old.get(key), "the v1 release reads {key} of v2/{name}.json differently from v1's");
    }
    format!("{name}.json")
}

#[test]
fn the_previous_release_reads_every_message_of_this_one() {
    let read_by_v1: BTreeSet<String> = [
        v1_reads_v2::<v1::DatasetDownload>("dataset.download"),
        v1_reads_v2::<v1::DatasetDownload>("dataset.download.hand-written"),
        v1_reads_v2::<v1::DatasetReady>("dataset.ready"),
        v1_reads_v2::<v1::DatasetFailed>("dataset.failed"),
        v1_reads_v2::<v1::TrainRequest>("train.request"),
        v1_reads_v2::<v1::TrainRequest>("train.request.hand-written"),
        v1_reads_v2::<v1::TrainProgress>("train.progress"),
        v1_reads_v2::<v1::TrainFailed>("train.failed"),
        v1_reads_v2::<v1::ModelPublished>("model.published"),
        v1_reads_v2::<v1::ModelPromote>("model.promote"),
        v1_reads_v2::<v1::ModelPromote>("model.promote.hand-written"),
        v1_reads_v2::<v1::InferenceLoaded>("inference.loaded"),
    ]
    .into_iter()
    .collect();
    // Subjects new in v2 have no v1 reader: the v1 release's page and CLI replay
    // the events stream as plain JSON objects, which these are.
    let new_subjects: BTreeSet<String> = listing("v2").difference(&read_by_v1).cloned().collect();
    assert_eq!(
        new_subjects,
        [
            "command.rejected.json",
            "feedback.delete.json",
            "feedback.deleted.json",
            "feedback.pruned.json",
            "retention.pruned.json",
        ]
        .map(str::to_owned)
        .into()
    );
    for name in &new_subjects {
        let raw = read("v2", name.trim_end_matches(".json"));
        assert!(raw.is_object() && raw["event_id"].is_string(), "{name}");
    }
}

#[test]
fn a_message_of_a_newer_version_is_refused_naming_its_version() {
    let mut raw = read("v2", "model.promote");
    raw[schema::FIELD] = serde_json::json!(SCHEMA_VERSION + 1);
    let error = schema::decode::<ModelPromote>(&serde_json::to_vec(&raw).unwrap()).unwrap_err();
    assert_eq!(error, DecodeError::TooNew { subject: "model.promote", found: u64::from(SCHEMA_VERSION) + 1 });
    // The frozen v1 type does not look: that is why the version is bumped only for
    // a change a v1 reader would misread (docs/nats.md, "Versions").
    assert!(serde_json::from_value::<v1::ModelPromote>(raw).is_ok());
}
