//! Stored versions across releases (issue 21, item 1, the fixture set): the
//! `metadata.json` a real trainer run of this release wrote
//! (`tests/compat/v1/metadata.json`) must still be read by the store, so versions
//! published before an upgrade stay listable, loadable and promotable after it.

use mnistflow_nats::ModelVersion;
use mnistflow_store::{ModelMetadata, Store};

const FIXTURE: &str = include_str!("compat/v1/metadata.json");

#[tokio::test]
async fn metadata_written_by_format_v1_is_still_read() {
    let raw: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
    let version = ModelVersion(raw["version"].as_str().unwrap().to_owned());
    let dir = tempfile::tempdir().unwrap();
    let store = Store::local(dir.path()).unwrap();
    store.put(&format!("{}/metadata.json", Store::model_prefix(&version)), FIXTURE.into()).await.unwrap();

    let read: ModelMetadata = store.model_metadata(&version).await.unwrap().expect("the version is listed");
    assert_eq!(read.sha256, raw["sha256"].as_str().unwrap());
    assert_eq!(read.size_bytes, raw["size_bytes"].as_u64().unwrap());
    assert_eq!(read.dataset_id.as_ref().map(|d| d.as_str()), raw["dataset_id"].as_str());
    assert_eq!(read.metrics.accuracy, raw["metrics"]["accuracy"].as_f64().unwrap());
    assert_eq!(store.list_models().await.unwrap().len(), 1);
    // Nothing recorded is lost when this release writes it again.
    let again: serde_json::Value = serde_json::to_value(&read).unwrap();
    for (key, value) in raw.as_object().unwrap() {
        assert_eq!(again.get(key), Some(value), "{key} changed or was dropped");
    }
}
