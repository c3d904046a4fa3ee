//! The storage layer against a real local directory (and in memory where the
//! backend does not matter).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use mnistflow_nats::{DatasetFile, DatasetId, ModelVersion};
use mnistflow_store::{CURRENT_KEY, DatasetManifest, ModelMetadata, Store, StoreError, watch::watch_current};
use object_store::path::Path as Key;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult,
};
use tokio_util::sync::CancellationToken;

fn version(n: u32) -> ModelVersion {
    ModelVersion(format!("20261130-0500{n:02}-00000{n}"))
}

async fn publish(store: &Store, n: u32) -> ModelMetadata {
    let mut meta = ModelMetadata::new(version(n));
    meta.metrics.accuracy = 0.9 + f64::from(n) / 100.0;
    store.publish_model(Bytes::from(vec![n as u8; 1000 + n as usize]), meta).await.unwrap()
}

#[tokio::test]
async fn publish_then_promote_and_roll_back_moves_the_pointer() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::local(dir.path()).unwrap();
    assert_eq!(store.current().await.unwrap(), None);
    let v1 = publish(&store, 1).await;
    let v2 = publish(&store, 2).await;
    assert_eq!(store.current().await.unwrap(), None, "publishing alone must not promote");
    assert_eq!(v1.sha256.len(), 64);
    store.promote(&v2.version).await.unwrap();
    assert_eq!(store.current().await.unwrap(), Some(v2.version.clone()));
    store.promote(&v1.version).await.unwrap();
    assert_eq!(store.current().await.unwrap(), Some(v1.version.clone()), "rollback");
    let listed: Vec<_> = store.list_models().await.unwrap().into_iter().map(|m| m.version).collect();
    assert_eq!(listed, vec![v1.version.clone(), v2.version]);
    let (bytes, meta) = store.load_model(&v1.version).await.unwrap();
    assert_eq!(bytes.len(), 1001);
    assert_eq!(meta, v1);
    // The files are where DESIGN.md says.
    assert!(dir.path().join("models/mnist-cnn").join(v1.version.as_str()).join("model.pt").is_file());
    assert!(dir.path().join(CURRENT_KEY).is_file());
}

#[tokio::test]
async fn a_version_without_metadata_is_invisible_and_cannot_be_promoted() {
    let store = Store::memory();
    let good = publish(&store, 1).await;
    store.promote(&good.version).await.unwrap();
    // What a crash between the two writes leaves: the model, no metadata.
    store.put(&format!("models/mnist-cnn/{}/model.pt", version(2)), Bytes::from_static(b"half")).await.unwrap();
    assert_eq!(store.list_models().await.unwrap().len(), 1);
    assert!(matches!(store.promote(&version(2)).await, Err(StoreError::NotFound(_))));
    assert_eq!(store.current().await.unwrap(), Some(good.version));
}

#[tokio::test]
async fn a_model_that_does_not_match_its_checksum_is_refused() {
    let store = Store::memory();
    let v = publish(&store, 3).await;
    store.put(&format!("models/mnist-cnn/{}/model.pt", v.version), Bytes::from_static(b"tampered")).await.unwrap();
    assert!(matches!(store.load_model(&v.version).await, Err(StoreError::Checksum { .. })));
    assert!(matches!(store.promote(&v.version).await, Err(StoreError::Checksum { .. })));
    assert_eq!(store.current().await.unwrap(), None);
}

#[tokio::test]
async fn invalid_version_names_are_rejected_before_touching_the_store() {
    let store = Store::memory();
    let meta = ModelMetadata::new(ModelVersion("../../etc".into()));
    assert!(matches!(store.publish_model(Bytes::new(), meta).await, Err(StoreError::InvalidVersion(_))));
}

/// A backend whose writes fail from the first write to a key ending in
/// `crash_on` onwards: the process "dies" at that point.
#[derive(Debug)]
struct CrashingStore {
    inner: Arc<dyn ObjectStore>,
    crashed: AtomicBool,
    crash_on: &'static str,
}

impl fmt::Display for CrashingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CrashingStore({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for CrashingStore {
    async fn put_opts(&self, location: &Key, payload: PutPayload, opts: PutOptions) -> object_store::Result<PutResult> {
        if self.crashed.load(Ordering::SeqCst) || location.as_ref().ends_with(self.crash_on) {
            self.crashed.store(true, Ordering::SeqCst);
            return Err(object_store::Error::Generic { store: "crash", source: "simulated crash".into() });
        }
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &Key,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(&self, location: &Key, options: GetOptions) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Key>>,
    ) -> BoxStream<'static, object_store::Result<Key>> {
        self.inner.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Key>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Key>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, from: &Key, to: &Key, options: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[tokio::test]
async fn a_crash_at_any_write_leaves_no_visible_partial_version() {
    for crash_on in ["model.pt", "metadata.json", "CURRENT"] {
        let dir = tempfile::tempdir().unwrap();
        let local = Store::local(dir.path()).unwrap();
        let old = publish(&local, 1).await;
        local.promote(&old.version).await.unwrap();

        let inner: Arc<dyn ObjectStore> =
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let crashing = Store::from_object_store(
            Arc::new(CrashingStore { inner, crashed: AtomicBool::new(false), crash_on }),
            "crashing",
        );
        let mut meta = ModelMetadata::new(version(2));
        meta.metrics.accuracy = 0.99;
        let result = match crashing.publish_model(Bytes::from(vec![9u8; 50_000]), meta).await {
            Ok(m) => crashing.promote(&m.version).await.map(|_| ()),
            Err(e) => Err(e),
        };
        assert!(result.is_err(), "crash on {crash_on} was not reported");

        // A fresh reader (the process restarted) sees the old state, complete.
        let reader = Store::local(dir.path()).unwrap();
        assert_eq!(reader.current().await.unwrap(), Some(old.version.clone()), "crash on {crash_on}");
        let (bytes, _) = reader.load_model(&old.version).await.unwrap();
        assert_eq!(bytes.len(), 1001);
        let visible: Vec<_> = reader.list_models().await.unwrap().into_iter().map(|m| m.version).collect();
        if crash_on == "CURRENT" {
            // Stored completely, just not promoted: visible and intact, not served.
            assert_eq!(visible.len(), 2);
            reader.load_model(&version(2)).await.unwrap();
        } else {
            assert_eq!(visible, vec![old.version.clone()], "crash on {crash_on} left a visible partial version");
        }
        // No temporary files left beside the artefacts.
        let leftovers: Vec<_> = walk(dir.path()).into_iter().filter(|p| p.contains('#')).collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

#[tokio::test]
async fn a_watcher_sees_a_new_version_without_waiting_for_the_poll_on_a_local_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::local(dir.path()).unwrap();
    let v0 = publish(&store, 0).await;
    store.promote(&v0.version).await.unwrap();
    let v1 = publish(&store, 1).await;
    let shutdown = CancellationToken::new();
    // A poll interval far longer than the bounds below: only the notify path can make them.
    let mut rx = watch_current(store.clone(), Duration::from_secs(60), shutdown.clone());
    // The first poll (at start) has read CURRENT once it reports v0; the next is 60 s away.
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| v.as_ref() == Some(&v0.version)))
        .await
        .expect("the watcher's first poll to report v0 within 10 s")
        .unwrap();
    // inotify reports the rename in milliseconds; 5 s is slack for a loaded machine
    // and still an order of magnitude below the next poll.
    store.promote(&v1.version).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| v.as_ref() == Some(&v1.version)))
        .await
        .expect("the watcher to report v1 within 5 s (the poll would take 60 s)")
        .unwrap();
    let v2 = publish(&store, 2).await;
    store.promote(&v2.version).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| v.as_ref() == Some(&v2.version)))
        .await
        .expect("the watcher to report v2 within 5 s (the poll would take 60 s)")
        .unwrap();
    shutdown.cancel();
}

#[tokio::test]
async fn polling_alone_follows_the_pointer_on_object_stores() {
    let store = Store::memory();
    let v1 = publish(&store, 1).await;
    let shutdown = CancellationToken::new();
    let mut rx = watch_current(store.clone(), Duration::from_millis(50), shutdown.clone());
    store.promote(&v1.version).await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|v| v.as_ref() == Some(&v1.version)))
        .await
        .expect("poll saw the change")
        .unwrap();
    shutdown.cancel();
}

#[tokio::test]
async fn a_dataset_is_visible_only_once_committed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::local(&dir.path().join("store")).unwrap();
    let src = dir.path().join("labels.gz");
    std::fs::write(&src, vec![1u8; 300_000]).unwrap();
    let id = DatasetId::from("abc123");
    store.put_dataset_file(&id, "labels.gz", &src).await.unwrap();
    assert_eq!(store.dataset(&id).await.unwrap(), None);
    assert!(store.latest_dataset().await.unwrap().is_none());
    let file = DatasetFile { name: "labels.gz".into(), sha256: "00".into(), size_bytes: 300_000, count: 1 };
    let manifest = DatasetManifest {
        dataset_id: id.clone(),
        created_at: chrono::Utc::now(),
        source: "test".into(),
        files: vec![file.clone()],
        train_count: 1,
        test_count: 0,
    };
    // A manifest listing a file that never arrived is refused.
    let mut broken = manifest.clone();
    broken.files.push(DatasetFile { name: "missing.gz".into(), ..file });
    assert!(matches!(store.commit_dataset(&broken).await, Err(StoreError::NotFound(_))));
    assert_eq!(store.dataset(&id).await.unwrap(), None);
    store.commit_dataset(&manifest).await.unwrap();
    assert_eq!(store.latest_dataset().await.unwrap(), Some(manifest));
    assert_eq!(store.get_dataset_file(&id, "labels.gz").await.unwrap().len(), 300_000);
}

#[test]
fn store_urls_are_parsed_and_bad_schemes_name_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    assert!(Store::open(&url).unwrap().local_root().is_some());
    assert!(Store::open(dir.path().join("bare").to_str().unwrap()).unwrap().local_root().is_some());
    assert_eq!(Store::open("memory://").unwrap().url(), "memory://");
    let err = Store::from_lookup(|k| (k == "STORE_URL").then(|| "ftp://host/x".to_owned())).unwrap_err();
    assert!(err.to_string().starts_with("STORE_URL: "), "{err}");
    assert!(err.to_string().contains("ftp"), "{err}");
}
