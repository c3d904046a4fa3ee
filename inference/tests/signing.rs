//! Signed model versions (issue 14, item 3), against a real store directory,
//! nats-server and libtorch: with a keyring, inference serves only versions
//! signed by a trusted key and refuses, with the reason, a tampered one (model or
//! metadata changed after signing), an unsigned one and one signed by a key it
//! does not trust, while the old version keeps answering; the promoter signs,
//! once, a store published before signing (the v1 compatibility fixture), which
//! is then served. A signed version in a metadata format newer than this release
//! reads is refused with the reason (issue 21, item 1).

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::{World, http, next_refusal, small_png, tiny_model};
use mnistflow_integration::wait_until;
use mnistflow_nats::{InferenceLoaded, ModelVersion};
use mnistflow_store::signing::{SIGNATURE_FILE, public_key_path};
use mnistflow_store::{
    CURRENT_KEY, METADATA_FILE, MODEL_FILE, ModelMetadata, SIGNING_MIGRATED_KEY, SigningKey, Store, sha256_hex,
};
use tokio_util::sync::CancellationToken;

const V1_FIXTURE: &str = include_str!("../../store/tests/compat/v1/metadata.json");

async fn publish_signed(store: &Store, model: &[u8], version: &ModelVersion, key: &SigningKey) {
    store.publish_signed_model(Bytes::copy_from_slice(model), ModelMetadata::new(version.clone()), key).await.unwrap();
}

fn key_of(version: &ModelVersion, file: &str) -> String {
    format!("{}/{file}", Store::model_prefix(version))
}

/// The version an HTTP prediction is answered by.
async fn answered_by(base: &str) -> String {
    let answer = http()
        .post(format!("{base}/v1/predict"))
        .header("Content-Type", "image/png")
        .body(small_png())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let body: serde_json::Value = answer.json().await.unwrap();
    body["model_version"].as_str().unwrap_or_default().to_owned()
}

/// A signing key in `dir` and the path of its public key (the keyring).
fn signing_key(dir: &Path) -> (SigningKey, String) {
    let path = dir.join("model-signing.pem");
    let key = SigningKey::read_or_generate(&path).unwrap();
    (key, public_key_path(&path).display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_unsigned_and_untrusted_versions_are_refused_and_the_signed_one_keeps_serving() {
    let world = World::new().await;
    let keys = tempfile::tempdir().unwrap();
    let (key, keyring) = signing_key(keys.path());
    let good = common::version("good");
    publish_signed(&world.store, &tiny_model(40), &good, &key).await;
    world.store.promote(&good).await.unwrap();
    let mut events = world.bus.subscribe::<InferenceLoaded>().await.unwrap();
    let app = world.start(&[("INFERENCE_TRUSTED_KEYS", &keyring)], true).await;
    assert_eq!(answered_by(&app.base).await, good.as_str());

    // Whoever can write the store replaces the model and, to pass the checksum,
    // the SHA-256 its metadata records: the signature no longer matches.
    let swapped = common::version("swapped");
    publish_signed(&world.store, &tiny_model(41), &swapped, &key).await;
    let other = tiny_model(42);
    let mut metadata = world.store.model_metadata(&swapped).await.unwrap().unwrap();
    metadata.sha256 = sha256_hex(&other);
    metadata.size_bytes = other.len() as u64;
    world.store.put(&key_of(&swapped, MODEL_FILE), Bytes::from(other)).await.unwrap();
    world
        .store
        .put(&key_of(&swapped, METADATA_FILE), serde_json::to_vec_pretty(&metadata).unwrap().into())
        .await
        .unwrap();
    world.store.promote(&swapped).await.expect("the checksum alone accepts it");
    let event = next_refusal(&mut events, &swapped).await;
    assert_eq!(event.version.as_ref(), Some(&good), "the refusal names the version still served");
    let error = event.error.unwrap_or_default();
    assert!(error.contains("does not match the metadata"), "{error}");

    // Metadata alone changed (a better accuracy claimed), the model untouched.
    let boasted = common::version("boasted");
    publish_signed(&world.store, &tiny_model(43), &boasted, &key).await;
    let raw = world.store.get(&key_of(&boasted, METADATA_FILE)).await.unwrap();
    let mut value: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    value["metrics"]["accuracy"] = serde_json::json!(0.999);
    world.store.put(&key_of(&boasted, METADATA_FILE), serde_json::to_vec(&value).unwrap().into()).await.unwrap();
    world.store.put(CURRENT_KEY, Bytes::from(format!("{boasted}\n"))).await.unwrap();
    let error = next_refusal(&mut events, &boasted).await.error.unwrap_or_default();
    assert!(error.contains("does not match the metadata"), "{error}");

    // Unsigned (published without a key).
    let unsigned = common::version("unsigned");
    common::publish(&world.store, &tiny_model(44), &unsigned).await;
    world.store.promote(&unsigned).await.unwrap();
    let error = next_refusal(&mut events, &unsigned).await.error.unwrap_or_default();
    assert!(error.contains("unsigned"), "{error}");

    // Signed, but by a key the keyring does not hold.
    let stranger = SigningKey::generate();
    let untrusted = common::version("untrusted");
    publish_signed(&world.store, &tiny_model(45), &untrusted, &stranger).await;
    world.store.promote(&untrusted).await.unwrap();
    let error = next_refusal(&mut events, &untrusted).await.error.unwrap_or_default();
    assert!(error.contains(stranger.key_id()) && error.contains("not in the trusted keyring"), "{error}");

    // Signed by the trusted key, but in a metadata format newer than this release
    // reads (issue 21, item 1): refused with the reason, not misread.
    let future = common::version("future");
    publish_signed(&world.store, &tiny_model(47), &future, &key).await;
    let raw = world.store.get(&key_of(&future, METADATA_FILE)).await.unwrap();
    let mut value: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    value["schema_version"] = serde_json::json!(3);
    let bytes = serde_json::to_vec(&value).unwrap();
    let signature = key.sign(&future, &bytes).to_bytes();
    world.store.put(&key_of(&future, SIGNATURE_FILE), signature.into()).await.unwrap();
    world.store.put(&key_of(&future, METADATA_FILE), bytes.into()).await.unwrap();
    world.store.put(CURRENT_KEY, Bytes::from(format!("{future}\n"))).await.unwrap();
    let error = next_refusal(&mut events, &future).await.error.unwrap_or_default();
    assert!(error.contains("schema version 3"), "{error}");

    assert_eq!(answered_by(&app.base).await, good.as_str(), "the signed version keeps answering");
    let metrics = app.app().service().metrics.encode();
    assert!(metrics.contains("inference_reloads_total{outcome=\"refused\"} 4"), "{metrics}");

    // A version signed by the trusted key is taken as usual.
    let next = common::version("next");
    publish_signed(&world.store, &tiny_model(46), &next, &key).await;
    world.store.promote(&next).await.unwrap();
    let slot = app.app().service().slot.clone();
    wait_until("the next signed version to be served", Duration::from_secs(30), || {
        let (slot, next) = (slot.clone(), next.clone());
        async move { (slot.version() == Some(next)).then_some(()) }
    })
    .await;
    app.stop(Duration::from_secs(10)).await;
}

/// Writes a version as a trainer before signing did: the v1 fixture's metadata
/// with its version name, checksum and size made those of `model`.
async fn publish_as_v1(store: &Store, model: &[u8], version: &ModelVersion) {
    let fixture: serde_json::Value = serde_json::from_str(V1_FIXTURE).unwrap();
    let text = V1_FIXTURE
        .replace(fixture["version"].as_str().unwrap(), version.as_str())
        .replace(fixture["sha256"].as_str().unwrap(), &sha256_hex(model))
        .replace(&format!("\"size_bytes\": {},", fixture["size_bytes"]), &format!("\"size_bytes\": {},", model.len()));
    store.put(&key_of(version, MODEL_FILE), Bytes::copy_from_slice(model)).await.unwrap();
    store.put(&key_of(version, METADATA_FILE), Bytes::from(text)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_promoter_signs_a_store_published_before_signing_once_and_it_is_then_served() {
    let world = World::new().await;
    let keys = tempfile::tempdir().unwrap();
    let (key, keyring) = signing_key(keys.path());
    let old = common::version("old");
    publish_as_v1(&world.store, &tiny_model(50), &old).await;
    world.store.put(CURRENT_KEY, Bytes::from(format!("{old}\n"))).await.unwrap();
    // A version whose model no longer matches its recorded checksum is not signed.
    let torn = common::version("torn");
    publish_as_v1(&world.store, &tiny_model(51), &torn).await;
    world.store.put(&key_of(&torn, MODEL_FILE), Bytes::from(tiny_model(52))).await.unwrap();

    // The upgraded serving pod comes first: it waits for a signature, reporting why.
    let mut events = world.bus.subscribe::<InferenceLoaded>().await.unwrap();
    let app = world.start(&[("INFERENCE_TRUSTED_KEYS", &keyring), ("INFERENCE_PROMOTER", "false")], false).await;
    let error = next_refusal(&mut events, &old).await.error.unwrap_or_default();
    assert!(error.contains("unsigned"), "{error}");
    assert_eq!(app.app().service().slot.version(), None);

    // Then the promoter, holding the private key, migrates the store.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let key_path = keys.path().join("model-signing.pem").display().to_string();
    let config = world.config(&[
        ("INFERENCE_ROLE", "promoter"),
        ("INFERENCE_PORT", &port.to_string()),
        ("INFERENCE_SIGNING_KEY", &key_path),
    ]);
    let shutdown = CancellationToken::new();
    let promoter = tokio::spawn(mnistflow_inference::main_with(config, shutdown.clone()));
    let slot = app.app().service().slot.clone();
    wait_until("the migrated old version to be served", Duration::from_secs(30), || {
        let (slot, old) = (slot.clone(), old.clone());
        async move { (slot.version() == Some(old)).then_some(()) }
    })
    .await;
    assert_eq!(answered_by(&app.base).await, old.as_str());
    assert!(world.store.get_opt(&key_of(&old, SIGNATURE_FILE)).await.unwrap().is_some());
    assert!(
        world.store.get_opt(&key_of(&torn, SIGNATURE_FILE)).await.unwrap().is_none(),
        "a version failing its checksum is left unsigned"
    );
    let marker: serde_json::Value =
        serde_json::from_slice(&world.store.get(SIGNING_MIGRATED_KEY).await.unwrap()).unwrap();
    assert_eq!(marker["signed"], serde_json::json!([old.as_str()]), "{marker}");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), promoter).await.expect("the promoter stops").unwrap().unwrap();

    // Once: a version that turns up unsigned afterwards is not signed by a restart.
    let late = common::version("late");
    publish_as_v1(&world.store, &tiny_model(53), &late).await;
    let again = world.store.sign_unsigned_versions(&key).await.unwrap();
    assert!(again.already_done && again.signed.is_empty(), "{again:?}");
    assert!(world.store.get_opt(&key_of(&late, SIGNATURE_FILE)).await.unwrap().is_none());
    app.stop(Duration::from_secs(10)).await;
}
