//! The feedback set: what people said about the answers they got, one sample per
//! [`FeedbackSubmitted`] event, growing and versioned.
//!
//! ```text
//! feedback/mnist/samples/trusted/<client>/<event-id>.json      from trusted labellers
//! feedback/mnist/samples/unverified/<client>/<event-id>.json   anonymous: live figures only
//! feedback/mnist/INDEX.json                                     set version, counts, live accuracy per model version
//! ```
//!
//! - **Deduplicated:** a sample's key is its event's id, and it is created
//!   exclusively (`PutMode::Create`), so a redelivered event, or the same event
//!   published twice, is stored once and counted once.
//! - **Bounded per client:** an unverified client may hold at most the limit the
//!   caller gives (counted by listing that client's own folder, which the limit
//!   bounds too); more is refused, not stored.
//! - **Versioned:** the set's version is the number of samples ever stored. Each sample
//!   records the set version that first holds it, so the set as of version `v`
//!   is the samples with `set_version <= v`; training (later) records the
//!   version it read. `INDEX.json` is written after the sample, so it never
//!   counts a sample that is not there; a sample stored by a process that died
//!   before its index write is counted when its event is redelivered (the
//!   sample's `set_version` is past the index's). A removal deletes first and
//!   recounts after, so a process that dies in between leaves the counts high
//!   until the next removal or retention pass recounts them.
//! - **Traceable:** a sample is its event (id, sender's client key, model
//!   version, both digits, the 28×28 input) plus the delivery that stored it.
//! - **Atomic:** every object is written whole (see the crate's docs); a
//!   reader never sees half a sample or half an index.
//!
//! - **Pruned:** [`Store::prune_feedback`] deletes the samples stored before a
//!   cut (the feedback stage's `FEEDBACK_RETENTION_SECS`), and
//!   [`Store::delete_feedback`] one sample by its event's id (a person's
//!   request). Either recounts the index's sample counts from what is left.
//!   The set's version never goes back (it counts every sample ever stored, so
//!   "the set as of version `v`" is the samples with `set_version <= v` that are
//!   still held), and the live accuracy per model version is an aggregate of
//!   answers, not the images: it stays as it was.
//!
//! One writer at a time: the feedback stage runs as one replica and handles one
//! delivery, or one retention pass, at a time (the index is read, then written).

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use mnistflow_nats::{EventId, FeedbackSubmitted, LiveAccuracy};
use object_store::path::Path as Key;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

/// Where the feedback set lives.
pub const FEEDBACK_PREFIX: &str = "feedback/mnist";
/// The set's index: its version, counts and live accuracy per model version.
pub const FEEDBACK_INDEX_KEY: &str = "feedback/mnist/INDEX.json";

/// One stored sample: the event as it arrived, and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackSample {
    #[serde(flatten)]
    pub event: FeedbackSubmitted,
    /// The first version of the set that holds this sample.
    pub set_version: u64,
    /// The delivery that stored it (`<stream sequence>:<payload hash>`).
    pub delivery: String,
    pub stored_at: DateTime<Utc>,
}

impl FeedbackSample {
    /// Whether the model's answer was right.
    pub fn correct(&self) -> bool {
        self.event.predicted == self.event.label
    }
}

/// `INDEX.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeedbackIndex {
    /// The set's version: how many samples it ever stored (never lowered);
    /// `trusted_samples` and `unverified_samples` count those it holds.
    pub set_version: u64,
    pub trusted_samples: u64,
    pub unverified_samples: u64,
    /// Live accuracy per model version.
    #[serde(default)]
    pub versions: BTreeMap<String, LiveAccuracy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
}

impl FeedbackIndex {
    fn count(&mut self, sample: &FeedbackSample) {
        self.set_version = self.set_version.max(sample.set_version);
        let live = self.versions.entry(sample.event.model_version.to_string()).or_default();
        if sample.event.trusted {
            self.trusted_samples += 1;
            live.trusted.add(sample.correct());
        } else {
            self.unverified_samples += 1;
            live.unverified.add(sample.correct());
        }
    }
}

/// What [`Store::store_feedback`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedbackOutcome {
    /// A new sample, now counted in `index`.
    Stored { sample: Box<FeedbackSample>, index: FeedbackIndex },
    /// The event was stored before (by an earlier delivery); nothing new.
    Duplicate { set_version: u64 },
    /// The client holds `limit` unverified samples already: refused.
    OverQuota { limit: usize },
}

/// What [`Store::prune_feedback`] deleted, and the index after it.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedbackPrune {
    pub trusted_deleted: u64,
    pub unverified_deleted: u64,
    pub index: FeedbackIndex,
}

fn trust(trusted: bool) -> &'static str {
    if trusted { "trusted" } else { "unverified" }
}

impl Store {
    /// The key of a sample.
    pub fn feedback_sample_key(event: &FeedbackSubmitted) -> String {
        format!("{FEEDBACK_PREFIX}/samples/{}/{}/{}.json", trust(event.trusted), event.client, event.event_id)
    }

    /// The set's index (empty before the first sample).
    ///
    /// # Errors
    /// A backend error, or a corrupt index.
    pub async fn feedback_index(&self) -> Result<FeedbackIndex, StoreError> {
        match self.get_opt(FEEDBACK_INDEX_KEY).await? {
            None => Ok(FeedbackIndex::default()),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::Corrupt { key: FEEDBACK_INDEX_KEY.into(), message: e.to_string() }),
        }
    }

    async fn put_feedback_index(&self, index: &FeedbackIndex) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(index)
            .map_err(|e| StoreError::Corrupt { key: FEEDBACK_INDEX_KEY.into(), message: e.to_string() })?;
        self.put(FEEDBACK_INDEX_KEY, Bytes::from(bytes)).await
    }

    /// Stores `event` as a sample (the caller validated it), unless it is stored
    /// already or its unverified client holds `max_per_client` samples; then
    /// updates the index. Returns what it did.
    ///
    /// # Errors
    /// A backend error, or a corrupt index or sample; nothing was counted twice.
    pub async fn store_feedback(
        &self,
        event: &FeedbackSubmitted,
        delivery: &str,
        max_per_client: usize,
    ) -> Result<FeedbackOutcome, StoreError> {
        let key = Self::feedback_sample_key(event);
        let mut index = self.feedback_index().await?;
        if let Some(existing) = self.get_opt(&key).await? {
            let sample: FeedbackSample = serde_json::from_slice(&existing)
                .map_err(|e| StoreError::Corrupt { key: key.clone(), message: e.to_string() })?;
            if sample.set_version > index.set_version {
                // Stored by a delivery that died before its index write.
                index.count(&sample);
                index.updated_at = Some(Utc::now());
                self.put_feedback_index(&index).await?;
            }
            return Ok(FeedbackOutcome::Duplicate { set_version: sample.set_version });
        }
        if !event.trusted {
            let folder = format!("{FEEDBACK_PREFIX}/samples/unverified/{}/", event.client);
            if self.count_under(&folder, max_per_client).await? >= max_per_client {
                return Ok(FeedbackOutcome::OverQuota { limit: max_per_client });
            }
        }
        let sample = FeedbackSample {
            event: event.clone(),
            set_version: index.set_version + 1,
            delivery: delivery.to_owned(),
            stored_at: Utc::now(),
        };
        let bytes = serde_json::to_vec_pretty(&sample)
            .map_err(|e| StoreError::Corrupt { key: key.clone(), message: e.to_string() })?;
        let create = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.inner.put_opts(&Key::from(key.as_str()), PutPayload::from(bytes), create).await {
            Ok(_) => {}
            // Another writer got there first (should not happen with one writer).
            Err(object_store::Error::AlreadyExists { .. }) => {
                return Ok(FeedbackOutcome::Duplicate { set_version: sample.set_version });
            }
            Err(e) => return Err(e.into()),
        }
        index.count(&sample);
        index.updated_at = Some(sample.stored_at);
        self.put_feedback_index(&index).await?;
        Ok(FeedbackOutcome::Stored { sample: Box::new(sample), index })
    }

    /// How many objects lie under `prefix`, counting no further than `stop`.
    async fn count_under(&self, prefix: &str, stop: usize) -> Result<usize, StoreError> {
        use futures::StreamExt;
        let mut listing = self.inner.list(Some(&Key::from(prefix)));
        let mut n = 0;
        while let Some(item) = listing.next().await {
            item?;
            n += 1;
            if n >= stop {
                break;
            }
        }
        Ok(n)
    }

    /// The key of every sample under `samples/<under>`, in no particular order.
    async fn feedback_sample_keys(&self, under: &str) -> Result<Vec<String>, StoreError> {
        use futures::TryStreamExt;
        let prefix = format!("{FEEDBACK_PREFIX}/samples/{under}");
        let keys: Vec<String> =
            self.inner.list(Some(&Key::from(prefix.as_str()))).map_ok(|m| m.location.to_string()).try_collect().await?;
        Ok(keys.into_iter().filter(|k| k.ends_with(".json")).collect())
    }

    async fn feedback_sample(&self, key: &str) -> Result<FeedbackSample, StoreError> {
        let bytes = self.get(key).await?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt { key: key.to_owned(), message: e.to_string() })
    }

    /// Sets the index's sample counts to the samples the store holds, and writes
    /// the index if they changed.
    async fn recount_feedback(&self, mut index: FeedbackIndex) -> Result<FeedbackIndex, StoreError> {
        let trusted = self.count_under(&format!("{FEEDBACK_PREFIX}/samples/trusted/"), usize::MAX).await? as u64;
        let unverified = self.count_under(&format!("{FEEDBACK_PREFIX}/samples/unverified/"), usize::MAX).await? as u64;
        if (index.trusted_samples, index.unverified_samples) != (trusted, unverified) {
            index.trusted_samples = trusted;
            index.unverified_samples = unverified;
            index.updated_at = Some(Utc::now());
            self.put_feedback_index(&index).await?;
        }
        Ok(index)
    }

    /// Deletes every sample stored before `before`, then recounts the index (which
    /// also repairs the counts of a pass that died between its deletions and its
    /// index write). The live accuracy and the set's version stay.
    ///
    /// # Errors
    /// A backend error, or a corrupt sample (named); what was deleted before it
    /// stays deleted, and the next pass recounts.
    pub async fn prune_feedback(&self, before: DateTime<Utc>) -> Result<FeedbackPrune, StoreError> {
        let index = self.feedback_index().await?;
        let (mut trusted_deleted, mut unverified_deleted) = (0, 0);
        for key in self.feedback_sample_keys("").await? {
            let sample = self.feedback_sample(&key).await?;
            if sample.stored_at >= before {
                continue;
            }
            match self.inner.delete(&Key::from(key.as_str())).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            if sample.event.trusted {
                trusted_deleted += 1;
            } else {
                unverified_deleted += 1;
            }
        }
        let index = self.recount_feedback(index).await?;
        Ok(FeedbackPrune { trusted_deleted, unverified_deleted, index })
    }

    /// Deletes the sample of feedback event `id` (what the page gave the person
    /// who sent it), then recounts the index. Returns the deleted sample, or
    /// `None` when the set holds no sample of that id (never stored, or deleted
    /// already): nothing changes then.
    ///
    /// # Errors
    /// A backend error, or a corrupt sample.
    pub async fn delete_feedback(&self, id: EventId) -> Result<Option<FeedbackSample>, StoreError> {
        let name = format!("/{id}.json");
        let Some(key) = self.feedback_sample_keys("").await?.into_iter().find(|k| k.ends_with(&name)) else {
            return Ok(None);
        };
        let sample = self.feedback_sample(&key).await?;
        match self.inner.delete(&Key::from(key.as_str())).await {
            Ok(()) => {}
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        self.recount_feedback(self.feedback_index().await?).await?;
        Ok(Some(sample))
    }

    /// Every sample of the set as of `set_version` (all when `None`), trusted
    /// ones only when `trusted_only` (what training may use), sorted by set version.
    ///
    /// # Errors
    /// A backend error, or a corrupt sample.
    pub async fn feedback_samples(
        &self,
        set_version: Option<u64>,
        trusted_only: bool,
    ) -> Result<Vec<FeedbackSample>, StoreError> {
        let mut samples = Vec::new();
        for key in self.feedback_sample_keys(if trusted_only { "trusted/" } else { "" }).await? {
            let sample = self.feedback_sample(&key).await?;
            if set_version.is_none_or(|v| sample.set_version <= v) {
                samples.push(sample);
            }
        }
        samples.sort_by_key(|s| s.set_version);
        Ok(samples)
    }
}

#[cfg(test)]
mod tests {
    use mnistflow_nats::ModelVersion;

    use super::*;

    fn event(client: &str, trusted: bool, predicted: u8, label: u8) -> FeedbackSubmitted {
        FeedbackSubmitted {
            event_id: EventId::new(),
            model_version: ModelVersion::from("20261201-000000-abcdef"),
            predicted,
            label,
            input: "00".repeat(784),
            client: client.into(),
            trusted,
            at: Utc::now(),
        }
    }

    #[tokio::test]
    async fn samples_are_stored_once_counted_per_trust_and_bounded_per_unverified_client() {
        let store = Store::memory();
        let right = event("ip-a", false, 7, 7);
        let FeedbackOutcome::Stored { index, .. } = store.store_feedback(&right, "1:x", 2).await.unwrap() else {
            panic!("not stored")
        };
        assert_eq!(index.set_version, 1);
        assert_eq!(
            store.store_feedback(&right, "2:x", 2).await.unwrap(),
            FeedbackOutcome::Duplicate { set_version: 1 }
        );
        store.store_feedback(&event("ip-a", false, 7, 1), "3:x", 2).await.unwrap();
        assert_eq!(
            store.store_feedback(&event("ip-a", false, 7, 1), "4:x", 2).await.unwrap(),
            FeedbackOutcome::OverQuota { limit: 2 }
        );
        // Another client, and a labeller, are not held back by ip-a's flood.
        store.store_feedback(&event("ip-b", false, 3, 3), "5:x", 2).await.unwrap();
        for i in 0..3 {
            store.store_feedback(&event("labeller", true, 3, 5), &format!("{}:x", 6 + i), 2).await.unwrap();
        }
        let index = store.feedback_index().await.unwrap();
        assert_eq!((index.set_version, index.trusted_samples, index.unverified_samples), (6, 3, 3));
        let live = index.versions["20261201-000000-abcdef"];
        assert_eq!((live.unverified.answers, live.unverified.correct), (3, 2));
        assert_eq!((live.trusted.answers, live.trusted.correct), (3, 0));
        assert_eq!(store.feedback_samples(None, true).await.unwrap().len(), 3);
        let as_of_2 = store.feedback_samples(Some(2), false).await.unwrap();
        assert_eq!(as_of_2.iter().map(|s| s.set_version).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[tokio::test]
    async fn a_sample_whose_index_write_was_lost_is_counted_on_redelivery() {
        let store = Store::memory();
        let e = event("ip-a", false, 1, 1);
        store.store_feedback(&e, "1:x", 10).await.unwrap();
        // The process died after the sample, before the index: the index is the old one.
        store.put_feedback_index(&FeedbackIndex::default()).await.unwrap();
        assert_eq!(store.store_feedback(&e, "1:x", 10).await.unwrap(), FeedbackOutcome::Duplicate { set_version: 1 });
        let index = store.feedback_index().await.unwrap();
        assert_eq!((index.set_version, index.unverified_samples), (1, 1));
        // And only once.
        store.store_feedback(&e, "1:x", 10).await.unwrap();
        assert_eq!(store.feedback_index().await.unwrap().unverified_samples, 1);
    }

    #[tokio::test]
    async fn pruning_and_deleting_remove_samples_and_recount_but_keep_the_live_accuracy() {
        let store = Store::memory();
        let (old, new, labelled) =
            (event("ip-a", false, 1, 1), event("ip-a", false, 2, 3), event("labeller", true, 4, 4));
        for (i, e) in [&old, &new, &labelled].into_iter().enumerate() {
            store.store_feedback(e, &format!("{i}:x"), 10).await.unwrap();
        }
        // `old` was stored two hours ago.
        let key = Store::feedback_sample_key(&old);
        let mut sample = store.feedback_sample(&key).await.unwrap();
        sample.stored_at = Utc::now() - chrono::Duration::hours(2);
        store.put(&key, Bytes::from(serde_json::to_vec(&sample).unwrap())).await.unwrap();
        let before = store.feedback_index().await.unwrap();

        let pruned = store.prune_feedback(Utc::now() - chrono::Duration::hours(1)).await.unwrap();
        assert_eq!((pruned.trusted_deleted, pruned.unverified_deleted), (0, 1));
        assert_eq!(
            (pruned.index.set_version, pruned.index.trusted_samples, pruned.index.unverified_samples),
            (3, 1, 1)
        );
        assert_eq!(pruned.index.versions, before.versions, "the live accuracy stays");
        assert_eq!(store.feedback_index().await.unwrap(), pruned.index);
        let left: Vec<_> =
            store.feedback_samples(None, false).await.unwrap().into_iter().map(|s| s.event.event_id).collect();
        assert_eq!(left, vec![new.event_id, labelled.event_id]);
        // A second pass finds nothing.
        let again = store.prune_feedback(Utc::now() - chrono::Duration::hours(1)).await.unwrap();
        assert_eq!((again.trusted_deleted, again.unverified_deleted), (0, 0));

        let deleted = store.delete_feedback(labelled.event_id).await.unwrap().expect("the labelled sample");
        assert_eq!(deleted.event, labelled);
        let index = store.feedback_index().await.unwrap();
        assert_eq!((index.set_version, index.trusted_samples, index.unverified_samples), (3, 0, 1));
        // Twice, or an id never stored: nothing changes.
        assert_eq!(store.delete_feedback(labelled.event_id).await.unwrap(), None);
        assert_eq!(store.delete_feedback(EventId::new()).await.unwrap(), None);
        assert_eq!(store.feedback_index().await.unwrap(), index);
        assert_eq!(store.feedback_samples(None, false).await.unwrap().len(), 1);
    }
}
