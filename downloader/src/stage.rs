//! The stage: obtain a verified data set (from the store when identical data is
//! already there, else from the mirrors), then announce it.

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mnistflow_nats::{
    Bus, DatasetDownload, DatasetFailed, DatasetReady, DeliveryKey, EventId, TrainRequest, redact_credentials,
};
use mnistflow_store::{DatasetManifest, Store, StoreError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::field::Empty;
use tracing::{Instrument, error, info, info_span, warn};
use url::Url;

use crate::config::{Config, command_mirrors};
use crate::error::DownloadError;
use crate::fetch::{Fetcher, Staged, display_mirror};
use crate::metrics::Metrics;
use crate::verify::{FILES, FileReport, check_splits, dataset_id};

/// A data set in the store, and whether this run stored it or found it there.
#[derive(Debug, Clone)]
pub struct Obtained {
    pub manifest: DatasetManifest,
    pub reused: bool,
}

/// Who asked, for the ids of the answering messages.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// The command being answered, if any.
    pub command: Option<DatasetDownload>,
    /// What identifies the command across redeliveries: the answering events'
    /// ids derive from it, so answering the same command twice publishes the
    /// same `Nats-Msg-Id`s and JetStream stores them once. `None` (a one-off
    /// run): fresh ids.
    pub key: Option<DeliveryKey>,
}

impl Origin {
    /// The id of the answering message `role` (`ready`, `train`, `failed-2`).
    pub fn event_id(&self, role: &str) -> EventId {
        self.key.as_ref().map_or_else(EventId::new, |key| key.event_id(role))
    }

    fn request_id(&self) -> Option<EventId> {
        self.command.as_ref().map(|c| c.event_id)
    }
}

/// The downloader: fetcher, store and bus. Cheap to share by reference.
#[derive(Debug)]
pub struct Downloader {
    fetcher: Fetcher,
    store: Store,
    bus: Bus,
    auto_train: bool,
    /// What a command's mirrors must lie under.
    allowed_mirrors: Vec<Url>,
    metrics: Arc<Metrics>,
}

impl Downloader {
    /// # Errors
    /// The HTTP client cannot be built.
    pub fn new(config: &Config, store: Store, bus: Bus, metrics: Arc<Metrics>) -> Result<Self, DownloadError> {
        let fetcher = Fetcher::new(config.fetch.clone(), metrics.clone())?;
        Ok(Self {
            fetcher,
            store,
            bus,
            auto_train: config.auto_train,
            allowed_mirrors: config.allowed_mirrors.clone(),
            metrics,
        })
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// One-off run (a Job): obtain the data set and announce it. A failure is
    /// announced as `dataset.failed` and returned, so `main` exits non-zero.
    ///
    /// # Errors
    /// See [`DownloadError`].
    pub async fn run_once(&self, shutdown: &CancellationToken) -> Result<DatasetReady, DownloadError> {
        let origin = Origin::default();
        let result = tokio::select! {
            biased;
            () = shutdown.cancelled() => Err(DownloadError::Cancelled),
            r = self.download(&origin) => r,
        };
        if let Err(e) = &result {
            self.report_failure(e, &origin, "failed", false).await;
        }
        result
    }

    /// Obtains the data set the origin asks for and announces it:
    /// `dataset.ready`, then `train.request` when auto-train is on.
    ///
    /// # Errors
    /// See [`DownloadError`]; nothing is announced on error.
    pub async fn download(&self, origin: &Origin) -> Result<DatasetReady, DownloadError> {
        let command = origin.command.as_ref();
        let span = info_span!("download", request_id = Empty);
        if let Some(id) = origin.request_id() {
            span.record("request_id", tracing::field::display(id));
        }
        async {
            let started = Instant::now();
            let mirrors = match command.and_then(|c| c.mirrors.as_ref()) {
                Some(list) => command_mirrors(list, &self.allowed_mirrors).map_err(DownloadError::BadRequest)?,
                None => self.fetcher.config().mirrors.clone(),
            };
            let obtained = match self.obtain(&mirrors).await {
                Ok(o) => o,
                Err(e) => {
                    self.metrics.dataset("failed");
                    self.metrics.failure(e.reason());
                    return Err(e);
                }
            };
            let manifest = &obtained.manifest;
            let ready = DatasetReady {
                event_id: origin.event_id("ready"),
                dataset_id: manifest.dataset_id.clone(),
                location: format!("{}/", Store::dataset_prefix(&manifest.dataset_id)),
                files: manifest.files.clone(),
                train_count: manifest.train_count,
                test_count: manifest.test_count,
                source: manifest.source.clone(),
                reused: obtained.reused,
                request_id: origin.request_id(),
                created_at: Utc::now(),
            };
            self.bus.publish(&ready).await?;
            info!(dataset_id = %ready.dataset_id, reused = ready.reused, train = ready.train_count, test = ready.test_count, "Data set ready.");
            let asked = command.and_then(|c| c.auto_train);
            let train = match asked {
                Some(explicit) => explicit,
                None => self.auto_train && !self.served_model_trained_on(&manifest.dataset_id, obtained.reused).await,
            };
            if train {
                let request = TrainRequest {
                    event_id: origin.event_id("train"),
                    dataset_id: Some(manifest.dataset_id.clone()),
                    requested_by: Some("downloader".into()),
                    ..TrainRequest::default()
                };
                self.bus.publish(&request).await?;
                info!(dataset_id = %manifest.dataset_id, event_id = %request.event_id, "Training requested.");
            }
            self.metrics.dataset(if obtained.reused { "reused" } else { "stored" });
            self.metrics.last_success.set(Utc::now().timestamp_millis() as f64 / 1000.0);
            self.metrics.last_duration.set(started.elapsed().as_secs_f64());
            Ok(ready)
        }
        .instrument(span)
        .await
    }

    /// Whether the version served now was trained on this data set, which was
    /// already stored: training again would only repeat that run (a redelivered
    /// command, a second `download`). A command's explicit `auto_train: true`
    /// still trains. Unreadable metadata counts as "no": training is the safe side.
    async fn served_model_trained_on(&self, dataset: &mnistflow_nats::DatasetId, reused: bool) -> bool {
        if !reused {
            return false;
        }
        let served = match self.store.current().await {
            Ok(Some(version)) => self.store.model_metadata(&version).await.map(|m| m.map(|m| (version, m))),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        match served {
            Ok(Some((version, metadata))) if metadata.dataset_id.as_ref() == Some(dataset) => {
                info!(%dataset, %version, "Training not requested: the served version was trained on this data set (send auto_train: true to train anyway).");
                true
            }
            Ok(_) => false,
            Err(e) => {
                warn!(error = %e, "Could not read the served version's metadata; requesting training.");
                false
            }
        }
    }

    /// Publishes `dataset.failed` for `error` (logged if even that fails).
    pub async fn report_failure(&self, error: &DownloadError, origin: &Origin, role: &str, will_retry: bool) {
        let mirrors_tried = match origin.command.as_ref().and_then(|c| c.mirrors.clone()) {
            // As the command wrote them, without credentials: the event is public.
            Some(list) => list.iter().map(|m| redact_credentials(m).into_owned()).collect(),
            None => self.fetcher.config().mirrors.iter().map(display_mirror).collect(),
        };
        let reason = redact_credentials(&error.to_string()).into_owned();
        let event = DatasetFailed {
            event_id: origin.event_id(role),
            request_id: origin.request_id(),
            reason: reason.clone(),
            mirrors_tried,
            will_retry,
            at: Utc::now(),
        };
        error!(error = %reason, reason = error.reason(), will_retry, "Download failed.");
        if let Err(e) = self.bus.publish(&event).await {
            error!(error = %e, "Could not publish dataset.failed.");
        }
    }

    /// The data set, from the store when it already holds identical data, else
    /// fetched, verified and stored (files first, manifest last).
    ///
    /// # Errors
    /// See [`DownloadError`].
    pub async fn obtain(&self, mirrors: &[Url]) -> Result<Obtained, DownloadError> {
        let expected = self.fetcher.config().expected_sha256.clone();
        if let Some(expected) = &expected
            && let Some(manifest) = self.stored(expected).await?
        {
            info!(dataset_id = %manifest.dataset_id, "Identical data already stored; nothing to download.");
            return Ok(Obtained { manifest, reused: true });
        }

        let config = self.fetcher.config();
        let mut builder = tempfile::Builder::new();
        builder.prefix("mnistflow-download-");
        let staging = match &config.temp_dir {
            Some(dir) => builder.tempdir_in(dir),
            None => builder.tempdir(),
        }
        .map_err(|e| DownloadError::Local(format!("staging directory: {e}")))?;
        let bar = config.progress.enabled();
        let progress = progress_bar(bar);
        // Without a terminal, a log line now and then instead of a bar.
        let _reporter = (!bar).then(|| {
            let progress = progress.clone();
            AbortOnDropHandle::new(tokio::spawn(
                async move {
                    let mut tick = tokio::time::interval(PROGRESS_LOG_EVERY);
                    tick.tick().await;
                    loop {
                        tick.tick().await;
                        info!(
                            bytes = progress.position(),
                            total = progress.length(),
                            bytes_per_sec = progress.per_sec() as u64,
                            "Downloading."
                        );
                    }
                }
                .in_current_span(),
            ))
        });
        let started = Instant::now();
        let fetched = futures::future::try_join_all(FILES.iter().enumerate().map(|(i, file)| {
            let expected = expected.as_ref().map(|e| e[i].as_str());
            self.fetcher.fetch(mirrors, file, expected, staging.path(), &progress)
        }))
        .await;
        progress.finish_and_clear();
        let staged: Vec<Staged> = fetched?;
        let received: u64 = staged.iter().map(|s| s.received).sum();
        info!(bytes = received, secs = started.elapsed().as_secs_f64(), "All files downloaded and verified.");

        let reports: [FileReport; 4] = std::array::from_fn(|i| staged[i].report.clone());
        let (train_count, test_count) = check_splits(&reports).map_err(DownloadError::Inconsistent)?;
        let id = dataset_id(&reports.each_ref().map(|r| r.sha256.as_str()));
        if let Some(manifest) = self.manifest(&id).await? {
            info!(dataset_id = %id, "Identical data already stored; not storing again.");
            return Ok(Obtained { manifest, reused: true });
        }

        let mut sources: Vec<&str> = Vec::new();
        for s in &staged {
            if !sources.contains(&s.mirror.as_str()) {
                sources.push(&s.mirror);
            }
        }
        for s in &staged {
            self.store.put_dataset_file(&id, &s.report.name, &s.path).await?;
        }
        let manifest = DatasetManifest {
            dataset_id: id,
            created_at: Utc::now(),
            source: sources.join(", "),
            files: reports.iter().map(FileReport::to_dataset_file).collect(),
            train_count,
            test_count,
        };
        self.store.commit_dataset(&manifest).await?;
        Ok(Obtained { manifest, reused: false })
        // `staging` is dropped here (and on every early return): no junk left behind.
    }

    /// The stored manifest for the expected checksums, if it is there and agrees with them.
    async fn stored(&self, expected: &[String; 4]) -> Result<Option<DatasetManifest>, DownloadError> {
        let id = dataset_id(expected);
        let Some(manifest) = self.manifest(&id).await? else { return Ok(None) };
        let agrees = FILES.iter().zip(expected).all(|(file, sha)| {
            manifest.files.iter().any(|f| f.name == file.name && f.sha256.eq_ignore_ascii_case(sha))
        });
        if agrees {
            Ok(Some(manifest))
        } else {
            warn!(dataset_id = %id, "The stored manifest disagrees with its id; downloading again.");
            Ok(None)
        }
    }

    async fn manifest(&self, id: &mnistflow_nats::DatasetId) -> Result<Option<DatasetManifest>, DownloadError> {
        match self.store.dataset(id).await {
            Ok(m) => Ok(m),
            Err(StoreError::Corrupt { key, message }) => {
                warn!(%key, error = %message, "Corrupt manifest; it will be replaced.");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// How often progress is logged when no bar is drawn.
const PROGRESS_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

fn progress_bar(enabled: bool) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} MNIST [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_to_the_same_command_reuse_their_ids_and_one_off_runs_do_not() {
        let origin = Origin { command: None, key: Some(DeliveryKey::new(7, b"{}")) };
        assert_eq!(origin.event_id("ready"), origin.event_id("ready"));
        assert_ne!(origin.event_id("ready"), origin.event_id("train"));
        assert_eq!(origin.event_id("ready").0.get_version_num(), 8);
        let other = Origin { command: None, key: Some(DeliveryKey::new(8, b"{}")) };
        assert_ne!(origin.event_id("ready"), other.event_id("ready"));
        let once = Origin::default();
        assert_ne!(once.event_id("ready"), once.event_id("ready"));
    }
}
