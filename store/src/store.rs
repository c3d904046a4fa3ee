use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use mnistflow_nats::{DatasetFile, DatasetId, ModelMetrics, ModelVersion};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tracing::{debug, info};

use crate::signing::{Keyring, SIGNATURE_FILE, SignatureError, SigningKey};
use crate::{
    CURRENT_KEY, DATASETS_PREFIX, MANIFEST_FILE, METADATA_FILE, MODEL_FILE, MODELS_PREFIX, SIGNING_MIGRATED_KEY,
};

/// What can go wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `STORE_URL` is malformed or names an unsupported scheme.
    #[error("STORE_URL: {0}")]
    Config(String),
    #[error("{0} not found in the store")]
    NotFound(String),
    /// Bytes do not match their recorded SHA-256: a torn or tampered artefact.
    #[error("checksum mismatch for {key}: metadata says {expected}, content is {actual}")]
    Checksum { key: String, expected: String, actual: String },
    #[error("{0:?} is not a valid model version name")]
    InvalidVersion(String),
    /// A stored JSON document does not decode.
    #[error("{key} is corrupt: {message}")]
    Corrupt { key: String, message: String },
    #[error("storage backend: {0}")]
    Backend(#[from] object_store::Error),
    #[error("local file: {0}")]
    Io(#[from] std::io::Error),
    /// A version is larger than the reader accepts (checked before reading it).
    #[error("{key} is {size} bytes, over the limit of {limit} bytes: refused without reading it")]
    TooLarge { key: String, size: u64, limit: u64 },
    /// Another promotion moved `CURRENT` after it was read (compare-and-set lost).
    #[error("conflict: CURRENT is no longer {expected} (moving it to {wanted}): {detail}")]
    Conflict { expected: String, wanted: String, detail: String },
    /// A version is not vouched for by a trusted key (unsigned, tampered with,
    /// or signed by a key not in the keyring): refused.
    #[error("version {version} refused, signature check failed: {reason}")]
    Signature { version: String, reason: SignatureError },
    /// A document in a format this release cannot read (written by a newer one).
    #[error(
        "{key} has schema version {found}; this release reads {METADATA_MIN_SCHEMA_VERSION} to {METADATA_SCHEMA_VERSION}"
    )]
    UnsupportedSchema { key: String, found: String },
}

impl StoreError {
    fn from_get(key: &str, e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { .. } => Self::NotFound(key.to_owned()),
            other => Self::Backend(other),
        }
    }
}

/// A stored data set's manifest (its commit marker).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetManifest {
    pub dataset_id: DatasetId,
    pub created_at: DateTime<Utc>,
    /// The mirror the files came from.
    pub source: String,
    pub files: Vec<DatasetFile>,
    pub train_count: u64,
    pub test_count: u64,
}

/// The `metadata.json` format this release writes. 2: `schema_version` itself
/// (absent means 1, the format before it), and `metadata.sig` beside it.
pub const METADATA_SCHEMA_VERSION: u32 = 2;
/// The oldest `metadata.json` format this release reads (the previous one).
pub const METADATA_MIN_SCHEMA_VERSION: u32 = 1;

fn schema_v1() -> u32 {
    1
}

/// A model version's metadata (its commit marker).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMetadata {
    /// The format (see [`METADATA_SCHEMA_VERSION`]); absent in format 1.
    #[serde(default = "schema_v1")]
    pub schema_version: u32,
    pub version: ModelVersion,
    pub created_at: DateTime<Utc>,
    /// SHA-256 of `model.pt`, filled in by [`Store::publish_model`].
    #[serde(default)]
    pub sha256: String,
    #[serde(default)]
    pub size_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_id: Option<DatasetId>,
    #[serde(default)]
    pub metrics: ModelMetrics,
    #[serde(default)]
    pub hyperparameters: serde_json::Value,
    /// Everything else the trainer records (training time, device, libtorch version, ...).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ModelMetadata {
    /// Metadata for a new version with everything but the identity left empty.
    pub fn new(version: ModelVersion) -> Self {
        Self {
            schema_version: METADATA_SCHEMA_VERSION,
            version,
            created_at: Utc::now(),
            sha256: String::new(),
            size_bytes: 0,
            dataset_id: None,
            metrics: ModelMetrics::default(),
            hyperparameters: serde_json::Value::Null,
            extra: serde_json::Map::new(),
        }
    }
}

/// What [`Store::sign_unsigned_versions`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SigningMigration {
    /// The migration had run before: nothing was looked at.
    pub already_done: bool,
    /// Versions signed now.
    pub signed: Vec<ModelVersion>,
    /// Versions left unsigned, and why (their model does not match their metadata).
    pub refused: Vec<(ModelVersion, String)>,
}

impl ModelMetadata {
    /// Decodes a stored `metadata.json` (at `key`), refusing a schema version
    /// this release cannot read before decoding the rest: a newer format may not
    /// decode as this one, and must be named as what it is, not as corrupt.
    ///
    /// # Errors
    /// [`StoreError::UnsupportedSchema`], or [`StoreError::Corrupt`].
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self, StoreError> {
        #[derive(Deserialize)]
        struct Probe {
            schema_version: Option<serde_json::Value>,
        }
        let corrupt = |e: serde_json::Error| StoreError::Corrupt { key: key.to_owned(), message: e.to_string() };
        let probe: Probe = serde_json::from_slice(bytes).map_err(corrupt)?;
        match probe.schema_version {
            None => {}
            Some(serde_json::Value::Number(n))
                if n.as_u64().is_some_and(|v| {
                    (u64::from(METADATA_MIN_SCHEMA_VERSION)..=u64::from(METADATA_SCHEMA_VERSION)).contains(&v)
                }) => {}
            Some(other) => return Err(StoreError::UnsupportedSchema { key: key.to_owned(), found: other.to_string() }),
        }
        serde_json::from_slice(bytes).map_err(corrupt)
    }
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The storage layer. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<dyn ObjectStore>,
    pub(crate) url: String,
    pub(crate) local_root: Option<PathBuf>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("url", &self.url).finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the store named by `STORE_URL` through `lookup` (default `./.mnistflow/store`).
    ///
    /// # Errors
    /// See [`Store::open`].
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, StoreError> {
        let url = lookup("STORE_URL").filter(|v| !v.trim().is_empty()).unwrap_or_else(|| ".mnistflow/store".to_owned());
        Self::open(url.trim())
    }

    /// Opens `url`: a bare path or `file:///path` (created if missing), `memory://`,
    /// `gs://bucket[/prefix]` or `s3://bucket[/prefix]` (credentials from the usual
    /// environment of those clouds).
    ///
    /// # Errors
    /// [`StoreError::Config`] for an unsupported scheme, a malformed URL or a local
    /// path that cannot be created.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        if url == "memory://" || url == "memory:" {
            return Ok(Self::memory());
        }
        let path = match url.split_once("://") {
            None => PathBuf::from(url),
            Some(("file", rest)) => PathBuf::from(rest),
            Some((scheme @ ("gs" | "s3"), _)) => {
                let parsed = url::Url::parse(url).map_err(|e| StoreError::Config(format!("{url:?}: {e}")))?;
                let options: Vec<(String, String)> = std::env::vars()
                    .filter(|(k, _)| k.starts_with("AWS_") || k.starts_with("GOOGLE_"))
                    .map(|(k, v)| (k.to_ascii_lowercase(), v))
                    .collect();
                let (store, prefix) = object_store::parse_url_opts(&parsed, options)
                    .map_err(|e| StoreError::Config(format!("{url:?} ({scheme}): {e}")))?;
                let inner: Arc<dyn ObjectStore> = if prefix.as_ref().is_empty() {
                    Arc::from(store)
                } else {
                    Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
                };
                return Ok(Self { inner, url: url.to_owned(), local_root: None });
            }
            Some((scheme, _)) => {
                return Err(StoreError::Config(format!(
                    "unsupported scheme {scheme:?} in {url:?} (use a path, file://, memory://, gs:// or s3://)"
                )));
            }
        };
        Self::local(&path)
    }

    /// A store in a local directory (created if missing).
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn local(path: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(path)
            .map_err(|e| StoreError::Config(format!("cannot create store directory {}: {e}", path.display())))?;
        let root =
            path.canonicalize().map_err(|e| StoreError::Config(format!("cannot resolve {}: {e}", path.display())))?;
        let fs = LocalFileSystem::new_with_prefix(&root)
            .map_err(|e| StoreError::Config(format!("{}: {e}", root.display())))?
            .with_automatic_cleanup(true);
        Ok(Self { inner: Arc::new(fs), url: format!("file://{}", root.display()), local_root: Some(root) })
    }

    /// An in-memory store (unit tests of the store's callers).
    pub fn memory() -> Self {
        Self { inner: Arc::new(InMemory::new()), url: "memory://".into(), local_root: None }
    }

    /// Wraps any object store (tests that inject failures).
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, url: impl Into<String>) -> Self {
        Self { inner, url: url.into(), local_root: None }
    }

    /// The URL this store was opened with (normalised).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The directory behind a local store (for `notify` and direct file reads).
    pub fn local_root(&self) -> Option<&Path> {
        self.local_root.as_deref()
    }

    // ---- generic objects -------------------------------------------------

    /// Reads a whole object.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] or a backend error.
    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let result = self.inner.get(&Key::from(key)).await.map_err(|e| StoreError::from_get(key, e))?;
        result.bytes().await.map_err(|e| StoreError::from_get(key, e))
    }

    /// Reads an object if it exists.
    ///
    /// # Errors
    /// A backend error other than not-found.
    pub async fn get_opt(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        match self.get(key).await {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes a whole object atomically.
    ///
    /// # Errors
    /// A backend error.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.inner.put(&Key::from(key), PutPayload::from(bytes)).await?;
        debug!(key, "Stored.");
        Ok(())
    }

    /// Streams a local file into the store (multipart: never the whole file in
    /// memory); the object appears only once complete.
    ///
    /// # Errors
    /// The file cannot be read or the upload fails (it is then aborted).
    pub async fn put_file(&self, key: &str, path: &Path) -> Result<(), StoreError> {
        let mut file = tokio::fs::File::open(path).await?;
        let upload = self.inner.put_multipart(&Key::from(key)).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, 5 * 1024 * 1024);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match file.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    writer.abort().await.ok();
                    return Err(e.into());
                }
            };
            if n == 0 {
                break;
            }
            writer.write(&buf[..n]);
        }
        writer.finish().await?;
        Ok(())
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        match self.get_opt(key).await? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt { key: key.to_owned(), message: e.to_string() }),
        }
    }

    async fn put_json<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(value)
            .map_err(|e| StoreError::Corrupt { key: key.into(), message: e.to_string() })?;
        self.put(key, bytes.into()).await
    }

    /// The immediate "subdirectories" under `prefix`.
    /// Every object's key and size, sorted by key (backups). A local store's
    /// temporary upload files are not objects and are not listed.
    ///
    /// # Errors
    /// A backend error.
    pub async fn keys(&self) -> Result<Vec<(String, u64)>, StoreError> {
        use futures::TryStreamExt;
        let mut keys: Vec<(String, u64)> =
            self.inner.list(None).map_ok(|meta| (meta.location.to_string(), meta.size)).try_collect().await?;
        keys.sort();
        Ok(keys)
    }

    async fn children(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let listing = self.inner.list_with_delimiter(Some(&Key::from(prefix))).await?;
        Ok(listing.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_owned)).collect())
    }

    // ---- data sets -------------------------------------------------------

    /// `datasets/mnist/<id>`.
    pub fn dataset_prefix(id: &DatasetId) -> String {
        format!("{DATASETS_PREFIX}/{id}")
    }

    /// The key of one file of a data set.
    pub fn dataset_key(id: &DatasetId, name: &str) -> String {
        format!("{DATASETS_PREFIX}/{id}/{name}")
    }

    /// Stores one file of a data set that is not yet committed (invisible until
    /// [`Store::commit_dataset`]).
    ///
    /// # Errors
    /// The file cannot be read or written.
    pub async fn put_dataset_file(&self, id: &DatasetId, name: &str, path: &Path) -> Result<(), StoreError> {
        self.put_file(&Self::dataset_key(id, name), path).await
    }

    /// Makes a data set visible by writing its manifest, after checking every
    /// file it lists is present.
    ///
    /// # Errors
    /// A listed file is missing, or the write fails.
    pub async fn commit_dataset(&self, manifest: &DatasetManifest) -> Result<(), StoreError> {
        for file in &manifest.files {
            let key = Self::dataset_key(&manifest.dataset_id, &file.name);
            self.inner.head(&Key::from(key.as_str())).await.map_err(|e| StoreError::from_get(&key, e))?;
        }
        let key = format!("{}/{MANIFEST_FILE}", Self::dataset_prefix(&manifest.dataset_id));
        self.put_json(&key, manifest).await?;
        info!(dataset_id = %manifest.dataset_id, "Data set committed.");
        Ok(())
    }

    /// A committed data set's manifest; `None` if absent or uncommitted.
    ///
    /// # Errors
    /// A backend error or a corrupt manifest.
    pub async fn dataset(&self, id: &DatasetId) -> Result<Option<DatasetManifest>, StoreError> {
        self.get_json(&format!("{}/{MANIFEST_FILE}", Self::dataset_prefix(id))).await
    }

    /// Every committed data set, oldest first.
    ///
    /// # Errors
    /// A backend error or a corrupt manifest.
    pub async fn datasets(&self) -> Result<Vec<DatasetManifest>, StoreError> {
        let mut out = Vec::new();
        for id in self.children(DATASETS_PREFIX).await? {
            if let Some(m) = self.dataset(&DatasetId(id)).await? {
                out.push(m);
            }
        }
        out.sort_by_key(|m| m.created_at);
        Ok(out)
    }

    /// The most recently committed data set.
    ///
    /// # Errors
    /// A backend error or a corrupt manifest.
    pub async fn latest_dataset(&self) -> Result<Option<DatasetManifest>, StoreError> {
        Ok(self.datasets().await?.pop())
    }

    /// Reads one file of a data set.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] or a backend error.
    pub async fn get_dataset_file(&self, id: &DatasetId, name: &str) -> Result<Bytes, StoreError> {
        self.get(&Self::dataset_key(id, name)).await
    }

    // ---- models ----------------------------------------------------------

    /// `models/mnist-cnn/<version>`.
    pub fn model_prefix(version: &ModelVersion) -> String {
        format!("{MODELS_PREFIX}/{version}")
    }

    fn check_version(version: &ModelVersion) -> Result<(), StoreError> {
        if ModelVersion::is_valid(version.as_str()) {
            Ok(())
        } else {
            Err(StoreError::InvalidVersion(version.0.clone()))
        }
    }

    /// Stores a new version: the model file, read back and verified, then its
    /// metadata (with the SHA-256 and size filled in) as the commit marker. Does
    /// not move `CURRENT`; see [`Store::promote`]. Unsigned: an inference with a
    /// keyring refuses it; publishers use [`Store::publish_signed_model`].
    ///
    /// # Errors
    /// An invalid version name, a failed write, or a read-back mismatch.
    pub async fn publish_model(&self, model: Bytes, metadata: ModelMetadata) -> Result<ModelMetadata, StoreError> {
        self.publish(model, metadata, None).await
    }

    /// [`Store::publish_model`], signing the metadata with `key`: the signature
    /// is written before the metadata, so the version is never visible unsigned.
    ///
    /// # Errors
    /// As [`Store::publish_model`].
    pub async fn publish_signed_model(
        &self,
        model: Bytes,
        metadata: ModelMetadata,
        key: &SigningKey,
    ) -> Result<ModelMetadata, StoreError> {
        self.publish(model, metadata, Some(key)).await
    }

    async fn publish(
        &self,
        model: Bytes,
        mut metadata: ModelMetadata,
        key: Option<&SigningKey>,
    ) -> Result<ModelMetadata, StoreError> {
        Self::check_version(&metadata.version)?;
        let prefix = Self::model_prefix(&metadata.version);
        metadata.sha256 = sha256_hex(&model);
        metadata.size_bytes = model.len() as u64;
        let model_key = format!("{prefix}/{MODEL_FILE}");
        self.put(&model_key, model).await?;
        let stored = self.get(&model_key).await?;
        let actual = sha256_hex(&stored);
        if actual != metadata.sha256 {
            return Err(StoreError::Checksum { key: model_key, expected: metadata.sha256, actual });
        }
        let metadata_key = format!("{prefix}/{METADATA_FILE}");
        let bytes = serde_json::to_vec_pretty(&metadata)
            .map_err(|e| StoreError::Corrupt { key: metadata_key.clone(), message: e.to_string() })?;
        if let Some(key) = key {
            let signature = key.sign(&metadata.version, &bytes);
            self.put(&format!("{prefix}/{SIGNATURE_FILE}"), signature.to_bytes().into()).await?;
        }
        self.put(&metadata_key, bytes.into()).await?;
        info!(version = %metadata.version, sha256 = %metadata.sha256, signed_by = ?key.map(SigningKey::key_id), "Model version stored.");
        Ok(metadata)
    }

    /// A complete version's metadata; `None` if absent or uncommitted.
    ///
    /// # Errors
    /// A backend error or corrupt metadata.
    pub async fn model_metadata(&self, version: &ModelVersion) -> Result<Option<ModelMetadata>, StoreError> {
        Self::check_version(version)?;
        let key = format!("{}/{METADATA_FILE}", Self::model_prefix(version));
        match self.get_opt(&key).await? {
            None => Ok(None),
            Some(bytes) => ModelMetadata::decode(&key, &bytes).map(Some),
        }
    }

    /// Every committed version, oldest first. Uncommitted directories (a crash
    /// mid-write) and versions with corrupt metadata are skipped.
    ///
    /// # Errors
    /// A backend error.
    pub async fn list_models(&self) -> Result<Vec<ModelMetadata>, StoreError> {
        let mut out = Vec::new();
        for name in self.children(MODELS_PREFIX).await? {
            let version = ModelVersion(name);
            match self.model_metadata(&version).await {
                Ok(Some(m)) => out.push(m),
                Ok(None) | Err(StoreError::InvalidVersion(_)) => {}
                Err(StoreError::Corrupt { key, message }) => {
                    tracing::warn!(%key, error = %message, "Skipping corrupt model metadata.")
                }
                Err(e @ StoreError::UnsupportedSchema { .. }) => {
                    tracing::warn!(error = %e, "Skipping model metadata of a newer format.")
                }
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.version.cmp(&b.version));
        Ok(out)
    }

    /// Reads a version's model and checks it against its metadata.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if uncommitted, [`StoreError::Checksum`] if the
    /// bytes do not match.
    pub async fn load_model(&self, version: &ModelVersion) -> Result<(Bytes, ModelMetadata), StoreError> {
        self.load_model_within(version, u64::MAX).await
    }

    /// [`Store::load_model`], refusing a version whose model is over `limit`
    /// bytes before reading it into memory (by its metadata and by the stored
    /// object's size: either may lie about the other).
    ///
    /// # Errors
    /// [`StoreError::TooLarge`], or as [`Store::load_model`].
    pub async fn load_model_within(
        &self,
        version: &ModelVersion,
        limit: u64,
    ) -> Result<(Bytes, ModelMetadata), StoreError> {
        let metadata = self
            .model_metadata(version)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("{}/{METADATA_FILE}", Self::model_prefix(version))))?;
        self.read_model(version, metadata, limit).await
    }

    /// [`Store::load_model_within`], after checking that the version's metadata
    /// is signed by a key of `keyring` (before its model is read): the model's
    /// SHA-256 is in the metadata, so the signature covers the model too.
    ///
    /// # Errors
    /// [`StoreError::Signature`] for an unsigned version, a signature that does
    /// not match (the metadata or the model changed after signing) or a key not
    /// in the keyring; [`StoreError::Corrupt`] for metadata naming another
    /// version; otherwise as [`Store::load_model_within`].
    pub async fn load_verified_model_within(
        &self,
        version: &ModelVersion,
        limit: u64,
        keyring: &Keyring,
    ) -> Result<(Bytes, ModelMetadata, String), StoreError> {
        Self::check_version(version)?;
        let prefix = Self::model_prefix(version);
        let metadata_key = format!("{prefix}/{METADATA_FILE}");
        let raw = self.get(&metadata_key).await?;
        let signature = self.get_opt(&format!("{prefix}/{SIGNATURE_FILE}")).await?;
        let key_id = keyring
            .verify(version, &raw, signature.as_deref())
            .map_err(|reason| StoreError::Signature { version: version.0.clone(), reason })?;
        let metadata = ModelMetadata::decode(&metadata_key, &raw)?;
        if &metadata.version != version {
            return Err(StoreError::Corrupt {
                key: metadata_key,
                message: format!("it describes version {}", metadata.version),
            });
        }
        let (bytes, metadata) = self.read_model(version, metadata, limit).await?;
        Ok((bytes, metadata, key_id))
    }

    /// Reads a version's model within `limit` and checks it against `metadata`.
    async fn read_model(
        &self,
        version: &ModelVersion,
        metadata: ModelMetadata,
        limit: u64,
    ) -> Result<(Bytes, ModelMetadata), StoreError> {
        let key = format!("{}/{MODEL_FILE}", Self::model_prefix(version));
        let head = self.inner.head(&Key::from(key.as_str())).await.map_err(|e| StoreError::from_get(&key, e))?;
        let size = head.size.max(metadata.size_bytes);
        if size > limit {
            return Err(StoreError::TooLarge { key, size, limit });
        }
        // The object may have grown between the head and the read: bounded anyway.
        let result = self.inner.get(&Key::from(key.as_str())).await.map_err(|e| StoreError::from_get(&key, e))?;
        if result.meta.size > limit {
            return Err(StoreError::TooLarge { key, size: result.meta.size, limit });
        }
        let bytes = result.bytes().await.map_err(|e| StoreError::from_get(&key, e))?;
        let actual = sha256_hex(&bytes);
        if actual != metadata.sha256 {
            return Err(StoreError::Checksum { key, expected: metadata.sha256, actual });
        }
        Ok((bytes, metadata))
    }

    /// Migration to signed versions (run by the promoter, once per store): signs
    /// every committed version that has no signature yet, after checking its
    /// model against the SHA-256 its metadata records (a mismatch is left
    /// unsigned and reported). Each signature is one atomic write; a marker
    /// object records that the migration ran, so versions that turn up unsigned
    /// later are never signed by it: from then on only publishers sign.
    ///
    /// Trust assumption: the store's content at migration time is what the old
    /// trainers published (nobody has tampered with it before the upgrade).
    ///
    /// # Errors
    /// A backend error (the migration is then retried on the next start).
    pub async fn sign_unsigned_versions(&self, key: &SigningKey) -> Result<SigningMigration, StoreError> {
        let mut report = SigningMigration::default();
        if self.get_opt(SIGNING_MIGRATED_KEY).await?.is_some() {
            report.already_done = true;
            return Ok(report);
        }
        for name in self.children(MODELS_PREFIX).await? {
            let version = ModelVersion(name);
            if Self::check_version(&version).is_err() {
                continue;
            }
            let prefix = Self::model_prefix(&version);
            let signature_key = format!("{prefix}/{SIGNATURE_FILE}");
            let Some(raw) = self.get_opt(&format!("{prefix}/{METADATA_FILE}")).await? else { continue };
            if self.get_opt(&signature_key).await?.is_some() {
                continue;
            }
            let checked = match ModelMetadata::decode(&format!("{prefix}/{METADATA_FILE}"), &raw) {
                Err(e) => Err(e.to_string()),
                Ok(metadata) if metadata.version != version => {
                    Err(format!("metadata describes version {}", metadata.version))
                }
                Ok(metadata) => match self.read_model(&version, metadata, u64::MAX).await {
                    Ok(_) => Ok(()),
                    Err(e @ (StoreError::Backend(_) | StoreError::Io(_))) => return Err(e),
                    Err(e) => Err(e.to_string()),
                },
            };
            match checked {
                Ok(()) => {
                    self.put(&signature_key, key.sign(&version, &raw).to_bytes().into()).await?;
                    info!(%version, key_id = key.key_id(), "Version published before signing: signed.");
                    report.signed.push(version);
                }
                Err(error) => {
                    tracing::warn!(%version, %error, "Version published before signing fails its checks: left unsigned.");
                    report.refused.push((version, error));
                }
            }
        }
        let marker = serde_json::json!({
            "migrated_at": Utc::now(),
            "key_id": key.key_id(),
            "signed": report.signed,
            "refused": report.refused.iter().map(|(v, e)| serde_json::json!({"version": v, "error": e})).collect::<Vec<_>>(),
        });
        self.put_json(SIGNING_MIGRATED_KEY, &marker).await?;
        Ok(report)
    }

    /// The version `CURRENT` names, if any.
    ///
    /// # Errors
    /// A backend error.
    pub async fn current(&self) -> Result<Option<ModelVersion>, StoreError> {
        Ok(self
            .get_opt(CURRENT_KEY)
            .await?
            .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
            .filter(|s| !s.is_empty())
            .map(ModelVersion))
    }
}
