//! Moving `CURRENT` as a compare-and-set: a move names the pointer it replaces
//! (read with [`Store::current_pointer`]) and fails with [`StoreError::Conflict`]
//! if another promotion moved it since, so two promoters, or a trainer's gate and
//! a manual promotion, cannot interleave read, decide, overwrite.
//!
//! - Object stores (`gs://`, `s3://`, `memory://`): a conditional put of
//!   `CURRENT` on the ETag/generation it was read with (`PutMode::Update`), or
//!   `PutMode::Create` when there was none. S3 needs `AWS_CONDITIONAL_PUT=etag`;
//!   a backend without conditional puts is refused, never overwritten blindly.
//! - A local or shared directory (a PVC, Filestore over NFS): no conditional
//!   overwrite exists across hosts, so each move first creates the next record of
//!   a log, `models/mnist-cnn.current/<generation>`, exclusively (object_store's
//!   `PutMode::Create`: `link(2)` of a staged file, atomic on NFS too). Exactly one
//!   move per generation succeeds; the winner then writes `CURRENT` (what readers
//!   read) and re-reads the log, writing again until `CURRENT` names the latest
//!   record, so a slower winner of an older generation cannot leave it behind. A
//!   store with no record yet starts from `CURRENT` as generation 0.

use bytes::Bytes;
use mnistflow_nats::ModelVersion;
use object_store::path::Path as Key;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use tracing::{info, warn};

use crate::store::{ModelMetadata, Store, StoreError};
use crate::{CURRENT_KEY, CURRENT_LOG_PREFIX};

/// How often [`Store::promote`] tries again on a fresh pointer after a conflict.
const PROMOTE_ATTEMPTS: u32 = 5;

/// `CURRENT` as read for a compare-and-set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentPointer {
    /// The version served, if any.
    pub version: Option<ModelVersion>,
    token: Token,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// The object's ETag and version (`None`: no `CURRENT` yet).
    Object(Option<(Option<String>, Option<String>)>),
    /// The latest record of the log (0: none yet).
    Log(u64),
}

fn parse_version(bytes: &[u8]) -> Option<ModelVersion> {
    Some(String::from_utf8_lossy(bytes).trim().to_owned()).filter(|s| !s.is_empty()).map(ModelVersion)
}

fn record_key(generation: u64) -> String {
    format!("{CURRENT_LOG_PREFIX}/{generation:020}")
}

impl Store {
    /// Reads `CURRENT` for a later [`Store::move_current`].
    ///
    /// # Errors
    /// A backend error.
    pub async fn current_pointer(&self) -> Result<CurrentPointer, StoreError> {
        if self.local_root.is_some() {
            let (generation, version) = self.latest_record().await?;
            let version = if generation == 0 { self.current().await? } else { version };
            return Ok(CurrentPointer { version, token: Token::Log(generation) });
        }
        match self.inner.get(&Key::from(CURRENT_KEY)).await {
            Ok(result) => {
                let tag = (result.meta.e_tag.clone(), result.meta.version.clone());
                let bytes = result.bytes().await?;
                Ok(CurrentPointer { version: parse_version(&bytes), token: Token::Object(Some(tag)) })
            }
            Err(object_store::Error::NotFound { .. }) => {
                Ok(CurrentPointer { version: None, token: Token::Object(None) })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Points `CURRENT` at `to` if it is still `from`.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when another move came first (read the pointer
    /// again and decide again); [`StoreError::Config`] when the backend has no
    /// conditional put; a backend error.
    pub async fn move_current(&self, from: &CurrentPointer, to: &ModelVersion) -> Result<(), StoreError> {
        let conflict = |detail: String| StoreError::Conflict {
            expected: from.version.as_ref().map_or_else(|| "none".to_owned(), ToString::to_string),
            wanted: to.to_string(),
            detail,
        };
        let body = Bytes::from(format!("{to}\n"));
        match &from.token {
            Token::Object(tag) => {
                let mode = match tag {
                    None => PutMode::Create,
                    Some((e_tag, version)) => {
                        PutMode::Update(UpdateVersion { e_tag: e_tag.clone(), version: version.clone() })
                    }
                };
                let options = PutOptions { mode, ..Default::default() };
                match self.inner.put_opts(&Key::from(CURRENT_KEY), PutPayload::from(body), options).await {
                    Ok(_) => {}
                    Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) => {
                        return Err(conflict("CURRENT changed since it was read".into()));
                    }
                    Err(e @ object_store::Error::NotImplemented { .. }) => {
                        return Err(StoreError::Config(format!(
                            "{}: this backend cannot move CURRENT conditionally ({e}); for s3:// set \
                             AWS_CONDITIONAL_PUT=etag",
                            self.url
                        )));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Token::Log(generation) => {
                let next = generation + 1;
                let options = PutOptions { mode: PutMode::Create, ..Default::default() };
                match self.inner.put_opts(&Key::from(record_key(next)), PutPayload::from(body.clone()), options).await {
                    Ok(_) => {}
                    Err(object_store::Error::AlreadyExists { .. }) => {
                        return Err(conflict(format!("another promotion took generation {next} first")));
                    }
                    Err(e) => return Err(e.into()),
                }
                self.settle_current(next, to).await?;
            }
        }
        info!(version = %to, replaced = ?from.version, "CURRENT moved.");
        Ok(())
    }

    /// Writes `CURRENT` until it names the latest record (ours, or a later one
    /// whose writer may have been overtaken by ours).
    async fn settle_current(&self, mut generation: u64, version: &ModelVersion) -> Result<(), StoreError> {
        let mut version = version.clone();
        loop {
            self.put(CURRENT_KEY, Bytes::from(format!("{version}\n"))).await?;
            let (latest, latest_version) = self.latest_record().await?;
            match latest_version {
                Some(v) if latest > generation => {
                    warn!(mine = generation, latest, version = %v, "A later promotion landed meanwhile; CURRENT follows it.");
                    (generation, version) = (latest, v);
                }
                _ => return Ok(()),
            }
        }
    }

    /// The log's latest generation and version (0 and `None` when empty).
    async fn latest_record(&self) -> Result<(u64, Option<ModelVersion>), StoreError> {
        use futures::TryStreamExt;
        let prefix = Key::from(CURRENT_LOG_PREFIX);
        let listed: Vec<_> = self.inner.list(Some(&prefix)).try_collect().await?;
        let latest =
            listed.iter().filter_map(|m| m.location.filename().and_then(|n| n.parse::<u64>().ok())).max().unwrap_or(0);
        if latest == 0 {
            return Ok((0, None));
        }
        let bytes = self.get(&record_key(latest)).await?;
        Ok((latest, parse_version(&bytes)))
    }

    /// Points `CURRENT` at `version`, if it is complete and intact, provided
    /// `CURRENT` is still `from` (a caller that decided on `from`: the trainer's gate).
    ///
    /// # Errors
    /// As [`Store::load_model`] and [`Store::move_current`].
    pub async fn promote_from(
        &self,
        from: &CurrentPointer,
        version: &ModelVersion,
    ) -> Result<ModelMetadata, StoreError> {
        let (_, metadata) = self.load_model(version).await?;
        self.move_current(from, version).await?;
        Ok(metadata)
    }

    /// Points `CURRENT` at `version` after verifying it is complete and intact,
    /// whatever it pointed at (a manual promotion; rolling back is promoting an
    /// older version): on a conflict it reads the pointer again and retries, a
    /// few times.
    ///
    /// # Errors
    /// The version is unknown, uncommitted or fails its checksum; or
    /// [`StoreError::Conflict`] after every attempt lost to another promotion.
    pub async fn promote(&self, version: &ModelVersion) -> Result<ModelMetadata, StoreError> {
        let mut attempt = 1;
        loop {
            let from = self.current_pointer().await?;
            match self.promote_from(&from, version).await {
                Err(StoreError::Conflict { detail, .. }) if attempt < PROMOTE_ATTEMPTS => {
                    warn!(%version, attempt, %detail, "CURRENT moved meanwhile; promoting again from the new one.");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}
