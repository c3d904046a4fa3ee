//! What model retention needs from the store: the pinned versions, the history of
//! which version was served when, and deleting a version.
//!
//! ```text
//! models/mnist-cnn/PINNED        one version per line (`#` starts a comment): never pruned
//! models/mnist-cnn/SERVED.json   {"<version>": "<last time seen served, RFC 3339>", ...}
//! ```
//!
//! Both are small objects rewritten whole (atomically, like every object). The
//! promoter, the one writer of `SERVED.json`, records a version when it promotes
//! it and at every retention pass (`inference/src/retention.rs`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mnistflow_nats::ModelVersion;
use object_store::ObjectStoreExt;
use object_store::path::Path as Key;
use tracing::info;

use crate::store::{Store, StoreError};
use crate::{METADATA_FILE, MODELS_PREFIX};

/// The list of pinned versions.
pub const PINNED_KEY: &str = "models/mnist-cnn/PINNED";
/// The served history.
pub const SERVED_KEY: &str = "models/mnist-cnn/SERVED.json";

/// When each version was last seen served.
pub type ServedHistory = BTreeMap<ModelVersion, DateTime<Utc>>;

impl Store {
    /// The pinned versions (empty when there is no `PINNED`).
    ///
    /// # Errors
    /// A backend error.
    pub async fn pinned(&self) -> Result<Vec<ModelVersion>, StoreError> {
        let Some(bytes) = self.get_opt(PINNED_KEY).await? else { return Ok(Vec::new()) };
        Ok(String::from_utf8_lossy(&bytes)
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .map(|l| ModelVersion(l.to_owned()))
            .collect())
    }

    /// Adds (`pin: true`) or removes a version from `PINNED`; returns the new list.
    ///
    /// # Errors
    /// An invalid version name, or a backend error.
    pub async fn set_pinned(&self, version: &ModelVersion, pin: bool) -> Result<Vec<ModelVersion>, StoreError> {
        if !ModelVersion::is_valid(version.as_str()) {
            return Err(StoreError::InvalidVersion(version.0.clone()));
        }
        let mut list = self.pinned().await?;
        list.retain(|v| v != version);
        if pin {
            list.push(version.clone());
        }
        let text: String = list.iter().map(|v| format!("{v}\n")).collect();
        self.put(PINNED_KEY, text.into()).await?;
        Ok(list)
    }

    /// When each version was last seen served (empty when nothing was recorded).
    ///
    /// # Errors
    /// A backend error or a corrupt history.
    pub async fn served_history(&self) -> Result<ServedHistory, StoreError> {
        let Some(bytes) = self.get_opt(SERVED_KEY).await? else { return Ok(ServedHistory::new()) };
        serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Corrupt { key: SERVED_KEY.into(), message: e.to_string() })
    }

    /// Records `version` as served at `at` (a later time replaces an earlier one)
    /// and forgets versions no longer in `keep` (deleted ones), if given.
    ///
    /// # Errors
    /// A backend error or a corrupt history.
    pub async fn record_served(
        &self,
        version: Option<&ModelVersion>,
        at: DateTime<Utc>,
        keep: Option<&[ModelVersion]>,
    ) -> Result<ServedHistory, StoreError> {
        let mut history = self.served_history().await?;
        let before = history.clone();
        if let Some(version) = version {
            let seen = history.entry(version.clone()).or_insert(at);
            *seen = (*seen).max(at);
        }
        if let Some(keep) = keep {
            history.retain(|v, _| keep.contains(v));
        }
        if history != before {
            let bytes = serde_json::to_vec_pretty(&history)
                .map_err(|e| StoreError::Corrupt { key: SERVED_KEY.into(), message: e.to_string() })?;
            self.put(SERVED_KEY, bytes.into()).await?;
        }
        Ok(history)
    }

    /// Deletes a version: its metadata first (the commit marker: from then on no
    /// reader sees the version, and a crash leaves an uncommitted directory that
    /// lists and loads skip), then every other object under its prefix.
    ///
    /// # Errors
    /// An invalid version name, or a backend error (the deletion may be partial;
    /// running it again finishes it).
    pub async fn delete_model(&self, version: &ModelVersion) -> Result<(), StoreError> {
        if !ModelVersion::is_valid(version.as_str()) {
            return Err(StoreError::InvalidVersion(version.0.clone()));
        }
        let prefix = format!("{MODELS_PREFIX}/{version}");
        let marker = Key::from(format!("{prefix}/{METADATA_FILE}"));
        match self.inner.delete(&marker).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let keys: Vec<Key> =
            self.inner.list(Some(&Key::from(prefix.as_str()))).map_ok(|m| m.location).try_collect().await?;
        for key in keys {
            match self.inner.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        info!(%version, "Model version deleted.");
        Ok(())
    }
}
