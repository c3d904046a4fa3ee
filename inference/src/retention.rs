//! Retention, run by the promoter (the one writer of `CURRENT` and of the store's
//! retention files in the cluster) every `RETENTION_INTERVAL_SECS`:
//!
//! - **Model versions** (on when `RETENTION_KEEP_VERSIONS` is set): keep the
//!   newest N, every version seen served within `RETENTION_KEEP_SERVED_SECS`, the
//!   one `CURRENT` names and every version in `models/mnist-cnn/PINNED`; delete
//!   the rest (metadata first, so no reader sees half a version). Which version
//!   was served when is recorded in `models/mnist-cnn/SERVED.json` by every pass
//!   and by every promotion this process makes.
//! - **Event history** (on when `RETENTION_EVENTS_MAX_AGE_SECS` is set): events
//!   stored longer ago than that are purged from the events stream.
//!
//! A pass that deleted anything publishes `retention.pruned` (what was deleted,
//! what was kept and why) and logs it. Nothing is deleted unless configured.
//! Future kinds of data (the feedback loop's `feedback/` images) get a setting of
//! their own and a part of the same pass.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `RETENTION_KEEP_VERSIONS` | keep the newest N model versions (at least 1); unset: no version is deleted | unset |
//! | `RETENTION_KEEP_SERVED_SECS` | also keep every version served within this many seconds | `0` |
//! | `RETENTION_EVENTS_MAX_AGE_SECS` | purge events older than this (at most the stream's own 30 days); unset: none | unset |
//! | `RETENTION_INTERVAL_SECS` | time between passes (the first runs at start) | `3600` |

use std::time::Duration;

use chrono::{DateTime, Utc};
use mnistflow_nats::config::var;
use mnistflow_nats::{Bus, ConfigError, EventId, KeptVersion, ModelVersion, RetentionPolicy, RetentionPruned};
use mnistflow_store::Store;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

/// Serialises the store writes of this process that must not interleave: a
/// promotion and a retention pass (which must never delete the version being
/// promoted).
pub(crate) static STORE_WRITES: Mutex<()> = Mutex::const_new(());

/// The longest age of events the stream keeps anyway (its `max_age`).
const STREAM_MAX_AGE_SECS: u64 = 30 * 24 * 3600;

/// Retention as configured; `None` from [`RetentionConfig::from_lookup`] when off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionConfig {
    pub policy: RetentionPolicy,
    pub interval: Duration,
}

impl RetentionConfig {
    /// Reads `RETENTION_*` through `lookup`; `None` when no policy is set.
    ///
    /// # Errors
    /// A malformed or out-of-range value; the error names the variable.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, ConfigError> {
        let keep_versions: Option<u32> = var(&lookup, "RETENTION_KEEP_VERSIONS")?;
        if keep_versions == Some(0) {
            return Err(ConfigError::new(
                "RETENTION_KEEP_VERSIONS",
                "must be at least 1 (unset it to keep every version)",
            ));
        }
        let keep_served_secs: Option<u64> = var(&lookup, "RETENTION_KEEP_SERVED_SECS")?;
        let events_max_age_secs: Option<u64> = var(&lookup, "RETENTION_EVENTS_MAX_AGE_SECS")?;
        match events_max_age_secs {
            Some(0) => return Err(ConfigError::new("RETENTION_EVENTS_MAX_AGE_SECS", "must be at least 1")),
            Some(age) if age > STREAM_MAX_AGE_SECS => {
                return Err(ConfigError::new(
                    "RETENTION_EVENTS_MAX_AGE_SECS",
                    format!("must be at most {STREAM_MAX_AGE_SECS} (the events stream keeps 30 days at most)"),
                ));
            }
            _ => {}
        }
        let interval: u64 = var(&lookup, "RETENTION_INTERVAL_SECS")?.unwrap_or(3600);
        if interval == 0 {
            return Err(ConfigError::new("RETENTION_INTERVAL_SECS", "must be at least 1"));
        }
        if keep_versions.is_none() && events_max_age_secs.is_none() {
            return Ok(None);
        }
        Ok(Some(Self {
            policy: RetentionPolicy { keep_versions, keep_served_secs, events_max_age_secs },
            interval: Duration::from_secs(interval),
        }))
    }
}

/// What one pass decided (and, unless a dry run, did).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pass {
    pub deleted_versions: Vec<ModelVersion>,
    pub kept_versions: Vec<KeptVersion>,
    pub events_purged: u64,
    pub events_before: Option<DateTime<Utc>>,
}

/// Decides which versions to keep: `versions` oldest first; returns the kept ones
/// (newest first, each with its reason) and the ones to delete (oldest first).
pub fn decide(
    policy: &RetentionPolicy,
    versions: &[ModelVersion],
    current: Option<&ModelVersion>,
    pinned: &[ModelVersion],
    served: &mnistflow_store::ServedHistory,
    now: DateTime<Utc>,
) -> (Vec<KeptVersion>, Vec<ModelVersion>) {
    let Some(keep_newest) = policy.keep_versions else {
        let kept = versions.iter().rev().map(|v| KeptVersion { version: v.clone(), reason: "no version limit".into() });
        return (kept.collect(), Vec::new());
    };
    let window = chrono::Duration::seconds(i64::try_from(policy.keep_served_secs.unwrap_or(0)).unwrap_or(i64::MAX));
    let since = now.checked_sub_signed(window).unwrap_or(DateTime::<Utc>::MIN_UTC);
    let mut kept = Vec::new();
    let mut deleted = Vec::new();
    for (rank, version) in versions.iter().rev().enumerate() {
        let reason = if current == Some(version) {
            Some("current".to_owned())
        } else if pinned.contains(version) {
            Some("pinned".to_owned())
        } else if rank < keep_newest as usize {
            Some(format!("among the newest {keep_newest}"))
        } else {
            served.get(version).filter(|at| **at >= since).map(|at| format!("served at {}", at.to_rfc3339()))
        };
        match reason {
            Some(reason) => kept.push(KeptVersion { version: version.clone(), reason }),
            None => deleted.push(version.clone()),
        }
    }
    deleted.reverse();
    (kept, deleted)
}

/// Runs one pass at `now`; with `dry_run`, decides and deletes nothing.
///
/// # Errors
/// The store or NATS failed; what was deleted before the failure stays deleted
/// (and the next pass carries on).
pub async fn pass(
    policy: &RetentionPolicy,
    store: &Store,
    bus: Option<&Bus>,
    now: DateTime<Utc>,
    dry_run: bool,
) -> anyhow::Result<Pass> {
    let mut result = Pass::default();
    {
        let _writes = STORE_WRITES.lock().await;
        let current = store.current().await?;
        let versions: Vec<ModelVersion> = store.list_models().await?.into_iter().map(|m| m.version).collect();
        let served = if dry_run {
            let mut h = store.served_history().await?;
            if let Some(c) = &current {
                h.insert(c.clone(), now);
            }
            h
        } else {
            store.record_served(current.as_ref(), now, None).await?
        };
        let pinned = store.pinned().await?;
        let (kept, delete) = decide(policy, &versions, current.as_ref(), &pinned, &served, now);
        result.kept_versions = kept;
        for version in delete {
            if !dry_run {
                // CURRENT moves only under this lock here, but a trainer may move it
                // (to its new version, which is among the newest): checked again.
                if store.current().await?.as_ref() == Some(&version) {
                    result.kept_versions.push(KeptVersion { version, reason: "current".into() });
                    continue;
                }
                store.delete_model(&version).await?;
            }
            result.deleted_versions.push(version);
        }
        if !dry_run && !result.deleted_versions.is_empty() {
            let remaining: Vec<ModelVersion> =
                versions.iter().filter(|v| !result.deleted_versions.contains(v)).cloned().collect();
            store.record_served(None, now, Some(&remaining)).await?;
        }
    }
    if let (Some(age), Some(bus)) = (policy.events_max_age_secs, bus) {
        let before = now - chrono::Duration::seconds(i64::try_from(age).unwrap_or(i64::MAX));
        result.events_before = Some(before);
        if !dry_run {
            result.events_purged = bus.purge_events_before(before).await?.events;
        }
    }
    Ok(result)
}

/// Runs a pass now and then every `config.interval` until `shutdown`; each pass
/// that deleted something is logged and announced on `retention.pruned`.
pub async fn run(config: RetentionConfig, bus: Bus, store: Store, stage: String, shutdown: CancellationToken) {
    info!(policy = ?config.policy, interval_secs = config.interval.as_secs(), "Retention on.");
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let span = info_span!("retention");
        async {
            match pass(&config.policy, &store, Some(&bus), Utc::now(), false).await {
                Ok(done) if done.deleted_versions.is_empty() && done.events_purged == 0 => {
                    debug!(kept = done.kept_versions.len(), "Retention pass: nothing to prune.");
                }
                Ok(done) => {
                    info!(
                        deleted = ?done.deleted_versions,
                        kept = done.kept_versions.len(),
                        events_purged = done.events_purged,
                        events_before = ?done.events_before,
                        "Retention pass pruned."
                    );
                    let event = RetentionPruned {
                        event_id: EventId::new(),
                        policy: config.policy.clone(),
                        deleted_versions: done.deleted_versions,
                        kept_versions: done.kept_versions,
                        events_purged: done.events_purged,
                        events_before: done.events_before,
                        stage: stage.clone(),
                        at: Utc::now(),
                    };
                    if let Err(e) = bus.publish(&event).await {
                        warn!(error = %e, "Could not announce the retention pass (retention.pruned).");
                    }
                }
                Err(e) => warn!(error = format!("{e:#}"), "Retention pass failed; the next one tries again."),
            }
        }
        .instrument(span)
        .await;
    }
    info!("Retention stopped.");
}

/// Records that `version` is served from `at` (after a promotion), so a version
/// served between two passes is known to have been served.
pub(crate) async fn record_promotion(store: &Store, version: &ModelVersion) {
    if let Err(e) = store.record_served(Some(version), Utc::now(), None).await {
        warn!(%version, error = %e, "Could not record the promoted version in the served history.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> ModelVersion {
        ModelVersion(s.to_owned())
    }

    #[test]
    fn keeps_newest_current_pinned_and_recently_served_and_deletes_the_rest_oldest_first() {
        let versions: Vec<ModelVersion> = (1..=8).map(|i| v(&format!("20261201-00000{i}-aaaaaa"))).collect();
        let now = Utc::now();
        let mut served = mnistflow_store::ServedHistory::new();
        served.insert(versions[2].clone(), now - chrono::Duration::hours(1));
        served.insert(versions[3].clone(), now - chrono::Duration::days(40));
        let policy =
            RetentionPolicy { keep_versions: Some(2), keep_served_secs: Some(86_400), events_max_age_secs: None };
        let (kept, deleted) = decide(&policy, &versions, Some(&versions[0]), &[versions[1].clone()], &served, now);
        let kept: Vec<(&str, &str)> = kept.iter().map(|k| (k.version.as_str(), k.reason.as_str())).collect();
        assert_eq!(kept[0], ("20261201-000008-aaaaaa", "among the newest 2"));
        assert_eq!(kept[1], ("20261201-000007-aaaaaa", "among the newest 2"));
        assert!(kept[2].0 == "20261201-000003-aaaaaa" && kept[2].1.starts_with("served at "), "{kept:?}");
        assert_eq!(kept[3], ("20261201-000002-aaaaaa", "pinned"));
        assert_eq!(kept[4], ("20261201-000001-aaaaaa", "current"));
        assert_eq!(deleted, vec![versions[3].clone(), versions[4].clone(), versions[5].clone()]);
        let off = RetentionPolicy { keep_versions: None, ..policy };
        assert!(decide(&off, &versions, None, &[], &served, now).1.is_empty());
    }

    #[test]
    fn nothing_is_on_unless_configured_and_bad_values_name_their_variable() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
        };
        assert_eq!(RetentionConfig::from_lookup(env(&[])).unwrap(), None);
        assert_eq!(RetentionConfig::from_lookup(env(&[("RETENTION_KEEP_SERVED_SECS", "60")])).unwrap(), None);
        let on = RetentionConfig::from_lookup(env(&[("RETENTION_KEEP_VERSIONS", "3")])).unwrap().unwrap();
        assert_eq!(on.policy.keep_versions, Some(3));
        assert_eq!(on.interval, Duration::from_secs(3600));
        for (name, value) in [
            ("RETENTION_KEEP_VERSIONS", "0"),
            ("RETENTION_EVENTS_MAX_AGE_SECS", "99999999"),
            ("RETENTION_KEEP_VERSIONS", "x"),
        ] {
            let pairs: &'static [(&'static str, &'static str)] = Box::leak(Box::new([(name, value)]));
            let e = RetentionConfig::from_lookup(env(pairs)).unwrap_err();
            assert!(e.to_string().contains(name), "{e}");
        }
    }
}
