//! The wire format across releases (issue 21, item 1, the fixture set): every
//! message this release's stages and CLI put on NATS, recorded from a real
//! `mnistflow up` run (`tests/compat/v1/<subject>.json`), plus the hand-written
//! forms people send (`*.hand-written.json`), must still decode. A change that
//! stops one decoding breaks a rolling upgrade (old pods' messages meet new pods):
//! add a new fixture set for a new format and keep the old ones passing.

use std::collections::BTreeSet;
use std::path::PathBuf;

use mnistflow_nats::events::Message;
use mnistflow_nats::{
    DatasetDownload, DatasetFailed, DatasetReady, InferenceLoaded, ModelPromote, ModelPublished, TrainFailed,
    TrainProgress, TrainRequest,
};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/compat/v1")
}

/// Decodes `<name>.json` as `M`, checks `M` belongs to that subject, and that a
/// round trip through this release's encoding keeps it. Returns the file name.
fn check<M: Message + std::fmt::Debug + PartialEq>(name: &str) -> String {
    let file = format!("{name}.json");
    let text = std::fs::read_to_string(dir().join(&file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    let raw: serde_json::Value = serde_json::from_str(&text).unwrap();
    let decoded: M = serde_json::from_value(raw.clone())
        .or_else(|e| {
            // Hand-written commands carry no event_id: the work-queue runner gives
            // them their delivery's; here any id does.
            let mut with_id = raw.clone();
            with_id["event_id"] = serde_json::json!("01a22f3e-0000-7000-8000-000000000000");
            serde_json::from_value(with_id).map_err(|_| e)
        })
        .unwrap_or_else(|e| panic!("{file} no longer decodes as {}: {e}", std::any::type_name::<M>()));
    assert_eq!(name.split('.').take(2).collect::<Vec<_>>().join("."), M::SUBJECT, "{file}");
    if let Some(id) = raw.get("event_id") {
        assert_eq!(id.as_str().unwrap(), decoded.event_id().to_string(), "{file}: the event id changed");
    }
    let encoded = serde_json::to_value(&decoded).unwrap();
    for (key, value) in raw.as_object().unwrap() {
        assert_eq!(encoded.get(key), Some(value), "{file}: {key} is no longer read (or written) the same way");
    }
    let again: M = serde_json::from_value(encoded).unwrap();
    assert_eq!(again, decoded, "{file}: a round trip changes it");
    file
}

#[test]
fn every_recorded_message_of_format_v1_still_decodes() {
    let checked: BTreeSet<String> = [
        check::<DatasetDownload>("dataset.download"),
        check::<DatasetDownload>("dataset.download.hand-written"),
        check::<DatasetReady>("dataset.ready"),
        check::<DatasetFailed>("dataset.failed"),
        check::<TrainRequest>("train.request"),
        check::<TrainRequest>("train.request.hand-written"),
        check::<TrainProgress>("train.progress"),
        check::<TrainFailed>("train.failed"),
        check::<ModelPublished>("model.published"),
        check::<ModelPromote>("model.promote"),
        check::<ModelPromote>("model.promote.hand-written"),
        check::<InferenceLoaded>("inference.loaded"),
    ]
    .into_iter()
    .collect();
    let present: BTreeSet<String> =
        std::fs::read_dir(dir()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(present, checked, "a fixture without a check, or a check without a fixture");
}
