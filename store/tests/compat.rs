//! Stored versions across releases (issue 21, item 1, the fixture set): the
//! `metadata.json` a real trainer run of the release before schema versions wrote
//! (`tests/compat/v1/metadata.json`, format 1: no `schema_version`) and the same
//! version in format 2 (`tests/compat/v2/`: `schema_version: 2` added, signed by
//! a fixture key whose public half is kept there) must still be read by the store,
//! so versions published before an upgrade stay listable, loadable and promotable
//! after it; a format newer than this release reads is refused with the reason.

use mnistflow_nats::ModelVersion;
use mnistflow_store::signing::SIGNATURE_FILE;
use mnistflow_store::{Keyring, METADATA_SCHEMA_VERSION, ModelMetadata, Store, StoreError};

const FIXTURE: &str = include_str!("compat/v1/metadata.json");
const FIXTURE_V2: &str = include_str!("compat/v2/metadata.json");
const FIXTURE_V2_SIG: &str = include_str!("compat/v2/metadata.sig");

#[tokio::test]
async fn metadata_written_by_format_v1_is_still_read() {
    let raw: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
    let version = ModelVersion(raw["version"].as_str().unwrap().to_owned());
    let dir = tempfile::tempdir().unwrap();
    let store = Store::local(dir.path()).unwrap();
    store.put(&format!("{}/metadata.json", Store::model_prefix(&version)), FIXTURE.into()).await.unwrap();

    let read: ModelMetadata = store.model_metadata(&version).await.unwrap().expect("the version is listed");
    assert_eq!(read.schema_version, 1, "absent means format 1");
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

#[tokio::test]
async fn metadata_of_format_v2_is_read_and_its_recorded_signature_verifies() {
    let raw: serde_json::Value = serde_json::from_str(FIXTURE_V2).unwrap();
    assert_eq!(raw["schema_version"], 2);
    assert_eq!(METADATA_SCHEMA_VERSION, 2, "a new format adds a fixture set beside v1 and v2");
    let version = ModelVersion(raw["version"].as_str().unwrap().to_owned());
    let dir = tempfile::tempdir().unwrap();
    let store = Store::local(dir.path()).unwrap();
    let prefix = Store::model_prefix(&version);
    store.put(&format!("{prefix}/metadata.json"), FIXTURE_V2.into()).await.unwrap();
    store.put(&format!("{prefix}/{SIGNATURE_FILE}"), FIXTURE_V2_SIG.into()).await.unwrap();

    let read = store.model_metadata(&version).await.unwrap().expect("the version is listed");
    assert_eq!(read.schema_version, 2);
    assert_eq!(read.metrics.accuracy, raw["metrics"]["accuracy"].as_f64().unwrap());
    let again: serde_json::Value = serde_json::to_value(&read).unwrap();
    assert_eq!(again, raw, "format 2 is written back as it was read");
    // The signature format: the recorded signature verifies with the recorded public key.
    let ring = Keyring::read(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/compat/v2/signing.pub")))
        .unwrap();
    ring.verify(&version, FIXTURE_V2.as_bytes(), Some(FIXTURE_V2_SIG.as_bytes())).unwrap();
}

#[tokio::test]
async fn metadata_of_a_newer_format_is_refused_with_the_reason_not_misread() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::local(dir.path()).unwrap();
    let raw: serde_json::Value = serde_json::from_str(FIXTURE_V2).unwrap();
    let version = ModelVersion(raw["version"].as_str().unwrap().to_owned());
    let key = format!("{}/metadata.json", Store::model_prefix(&version));
    for future in [serde_json::json!(3), serde_json::json!("2.1"), serde_json::json!(0)] {
        let mut newer = raw.clone();
        newer["schema_version"] = future.clone();
        // A newer format may also change what the old fields mean: it must not be read as v2.
        newer["metrics"] = serde_json::json!("moved elsewhere in format 3");
        store.put(&key, serde_json::to_vec(&newer).unwrap().into()).await.unwrap();
        match store.model_metadata(&version).await {
            Err(e @ StoreError::UnsupportedSchema { .. }) => {
                let message = e.to_string();
                assert!(message.contains(&future.to_string()) && message.contains("reads 1 to 2"), "{message}");
            }
            other => panic!("schema_version {future}: expected UnsupportedSchema, got {other:?}"),
        }
        assert!(store.list_models().await.unwrap().is_empty(), "skipped in listings");
    }
}
