//! Fetching one file: mirrors in order, retries with exponential backoff and
//! jitter on transient failures, resumption of a cut transfer with a `Range`
//! request, and verification of what arrived before anyone else sees it.
//!
//! Bytes go straight from the socket to a staging file (never the whole file in
//! memory); the staging directory belongs to the caller, which removes it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use indicatif::ProgressBar;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, RANGE};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tracing::{info, warn};
use url::Url;

use crate::config::{FetchConfig, MAX_BACKOFF};
use crate::error::DownloadError;
use crate::metrics::Metrics;
use crate::verify::{FileReport, MnistFile, VerifyError, verify_file};

/// One failed attempt at one file from one mirror.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("not found on this mirror")]
    Missing,
    #[error("transfer failed: {0}")]
    Transport(String),
    #[error("no data for {0:?}")]
    Stalled(Duration),
    #[error("the body ended after {received} of {expected} bytes")]
    Truncated { received: u64, expected: u64 },
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// Our own disk failed; no mirror can help.
    #[error("staging file {}: {source}", .path.display())]
    Local { path: PathBuf, source: std::io::Error },
}

impl AttemptError {
    /// Whether the same mirror may do better on another attempt.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Status(code) => matches!(code, 408 | 425 | 429) || *code >= 500,
            Self::Transport(_) | Self::Stalled(_) | Self::Truncated { .. } => true,
            Self::Verify(VerifyError::TruncatedGzip) => true,
            Self::Missing | Self::Verify(_) | Self::Local { .. } => false,
        }
    }

    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Status(_) => "http_status",
            Self::Missing => "not_found",
            Self::Transport(_) => "transport",
            Self::Stalled(_) => "timeout",
            Self::Truncated { .. } | Self::Verify(VerifyError::TruncatedGzip) => "truncated",
            Self::Verify(VerifyError::Checksum { .. }) => "checksum",
            Self::Verify(VerifyError::Gzip(_) | VerifyError::Idx(_)) => "invalid",
            Self::Verify(VerifyError::Io(_)) | Self::Local { .. } => "local",
        }
    }

    fn local(path: &Path, source: std::io::Error) -> Self {
        Self::Local { path: path.to_owned(), source }
    }
}

/// A verified file in the staging directory.
#[derive(Debug)]
pub struct Staged {
    pub report: FileReport,
    pub path: PathBuf,
    /// The mirror it came from (credentials removed).
    pub mirror: String,
    /// Compressed bytes received for it, retries included.
    pub received: u64,
}

/// The failed attempts at one file, the same failure told once with its count
/// (offline, two mirrors with four attempts each would otherwise repeat one DNS
/// error eight times).
#[derive(Debug, Default)]
struct Attempts {
    failures: Vec<(String, u32)>,
    all_unreachable: bool,
}

impl Attempts {
    fn push(&mut self, failure: String, unreachable: bool) {
        self.all_unreachable = unreachable && (self.all_unreachable || self.failures.is_empty());
        match self.failures.last_mut() {
            Some((last, count)) if *last == failure => *count += 1,
            _ => self.failures.push((failure, 1)),
        }
    }

    fn all_unreachable(&self) -> bool {
        self.all_unreachable && !self.failures.is_empty()
    }

    fn lines(self) -> Vec<String> {
        self.failures
            .into_iter()
            .map(|(failure, count)| if count > 1 { format!("{failure} ({count} attempts)") } else { failure })
            .collect()
    }
}

/// A mirror URL fit for logs and events: no user name or password.
pub fn display_mirror(url: &Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.to_string()
}

/// The delay before retry number `attempt` (1-based): `base * 2^(attempt-1)`,
/// capped at [`MAX_BACKOFF`], times a random factor in [0.5, 1.5).
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(MAX_BACKOFF);
    exp.mul_f64(0.5 + rand::random::<f64>())
}

/// Fetches and verifies files; shared by the four concurrent file tasks.
#[derive(Debug, Clone)]
pub struct Fetcher {
    http: reqwest::Client,
    config: Arc<FetchConfig>,
    metrics: Arc<Metrics>,
}

impl Fetcher {
    /// # Errors
    /// The HTTP client cannot be built (no TLS backend).
    pub fn new(config: FetchConfig, metrics: Arc<Metrics>) -> Result<Self, DownloadError> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.timeout)
            .user_agent(concat!("mnistflow-downloader/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| DownloadError::Local(format!("HTTP client: {}", error_chain(&e))))?;
        Ok(Self { http, config: Arc::new(config), metrics })
    }

    pub fn config(&self) -> &FetchConfig {
        &self.config
    }

    /// Fetches `file` into `dir`, trying each mirror in order, and verifies it.
    ///
    /// # Errors
    /// [`DownloadError::Exhausted`] when no mirror delivered a valid file (every
    /// attempt is listed, naming the file and the mirror), [`DownloadError::Local`]
    /// when the staging disk fails.
    pub async fn fetch(
        &self,
        mirrors: &[Url],
        file: &'static MnistFile,
        expected: Option<&str>,
        dir: &Path,
        progress: &ProgressBar,
    ) -> Result<Staged, DownloadError> {
        let path = dir.join(file.name);
        let mut attempts = Attempts::default();
        let mut received = 0u64;
        for mirror in mirrors {
            let shown = display_mirror(mirror);
            let url = match mirror.join(file.name) {
                Ok(url) => url,
                Err(e) => {
                    attempts.push(format!("{} from {shown}: {e}", file.name), false);
                    continue;
                }
            };
            // A partial file from another mirror is not a prefix of this one's.
            remove_if_present(&path).await.map_err(|e| local(&path, e))?;
            for attempt in 0..=self.config.retries {
                if attempt > 0 {
                    tokio::time::sleep(backoff(self.config.backoff, attempt)).await;
                }
                let started = Instant::now();
                let result = match url.scheme() {
                    "file" => self.copy_local(&url, &path, progress, &mut received).await,
                    _ => self.get_http(&url, &path, progress, &mut received).await,
                };
                let result = match result {
                    Ok(()) => self.verify(&path, file, expected).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(report) => {
                        info!(
                            file = file.name,
                            mirror = %shown,
                            sha256 = %report.sha256,
                            count = report.count(),
                            secs = started.elapsed().as_secs_f64(),
                            "File downloaded and verified."
                        );
                        return Ok(Staged { report, path, mirror: shown, received });
                    }
                    Err(AttemptError::Local { path, source }) => {
                        self.metrics.failure("local");
                        return Err(local(&path, source));
                    }
                    Err(e) => {
                        self.metrics.failure(e.reason());
                        let retry = e.retryable() && attempt < self.config.retries;
                        warn!(file = file.name, mirror = %shown, attempt = attempt + 1, retry, error = %e, "Download attempt failed.");
                        let unreachable = matches!(e, AttemptError::Transport(_) | AttemptError::Stalled(_));
                        attempts.push(format!("{} from {shown}: {e}", file.name), unreachable);
                        if matches!(e, AttemptError::Verify(_)) {
                            // Bad content is no prefix to resume from.
                            remove_if_present(&path).await.map_err(|e| local(&path, e))?;
                        }
                        if !e.retryable() {
                            break;
                        }
                    }
                }
            }
        }
        remove_if_present(&path).await.map_err(|e| local(&path, e))?;
        let unreachable = attempts.all_unreachable();
        Err(DownloadError::Exhausted { file: file.name.to_owned(), attempts: attempts.lines(), unreachable })
    }

    async fn verify(
        &self,
        path: &Path,
        file: &'static MnistFile,
        expected: Option<&str>,
    ) -> Result<FileReport, AttemptError> {
        let path = path.to_owned();
        let expected = expected.map(str::to_owned);
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(|| verify_file(&path, file, expected.as_deref())))
            .await
            .map_err(|e| AttemptError::Verify(VerifyError::Io(std::io::Error::other(e))))?
            .map_err(AttemptError::from)
    }

    /// One HTTP attempt. Resumes with `Range` when a previous attempt left a
    /// partial file, and restarts cleanly if the server does not honour it.
    async fn get_http(
        &self,
        url: &Url,
        path: &Path,
        progress: &ProgressBar,
        received_total: &mut u64,
    ) -> Result<(), AttemptError> {
        let have = tokio::fs::metadata(path).await.map(|m| m.len()).unwrap_or(0);
        let mut request = self.http.get(url.clone());
        if have > 0 {
            request = request.header(RANGE, format!("bytes={have}-"));
        }
        let stall = self.config.timeout;
        let response = tokio::time::timeout(stall, request.send())
            .await
            .map_err(|_| AttemptError::Stalled(stall))?
            .map_err(|e| AttemptError::Transport(error_chain(&e.without_url())))?;
        let status = response.status();
        let length = response.content_length();
        let (file, start) = if status == StatusCode::PARTIAL_CONTENT && have > 0 {
            if content_range_start(&response) != Some(have) {
                remove_if_present(path).await.map_err(|e| AttemptError::local(path, e))?;
                return Err(AttemptError::Transport("the mirror answered a different range; restarting".into()));
            }
            let file = tokio::fs::OpenOptions::new().append(true).open(path).await;
            (file.map_err(|e| AttemptError::local(path, e))?, have)
        } else if status == StatusCode::RANGE_NOT_SATISFIABLE {
            remove_if_present(path).await.map_err(|e| AttemptError::local(path, e))?;
            return Err(AttemptError::Transport("range not satisfiable; restarting".into()));
        } else if status.is_success() {
            (tokio::fs::File::create(path).await.map_err(|e| AttemptError::local(path, e))?, 0)
        } else if matches!(status, StatusCode::NOT_FOUND | StatusCode::GONE) {
            return Err(AttemptError::Missing);
        } else {
            return Err(AttemptError::Status(status.as_u16()));
        };
        if start > 0 {
            info!(url = %display_mirror(url), from = start, "Resuming a cut transfer.");
        }
        let expected = length.map(|l| l + start);
        if let Some(l) = length {
            progress.inc_length(l);
        }
        let mut out = BufWriter::with_capacity(256 * 1024, file);
        let mut received = start;
        let mut body = response.bytes_stream();
        let outcome = loop {
            match tokio::time::timeout(stall, body.next()).await {
                Err(_) => break Err(AttemptError::Stalled(stall)),
                Ok(None) => break Ok(()),
                Ok(Some(Err(e))) => {
                    break Err(match expected {
                        Some(expected) if received < expected => AttemptError::Truncated { received, expected },
                        _ => AttemptError::Transport(error_chain(&e.without_url())),
                    });
                }
                Ok(Some(Ok(chunk))) => {
                    if let Err(e) = out.write_all(&chunk).await {
                        break Err(AttemptError::local(path, e));
                    }
                    let n = chunk.len() as u64;
                    received += n;
                    *received_total += n;
                    self.metrics.bytes_downloaded.inc_by(n);
                    progress.inc(n);
                }
            }
        };
        // Whatever arrived is kept on disk for the next attempt to resume from.
        out.flush().await.map_err(|e| AttemptError::local(path, e))?;
        outcome?;
        match expected {
            Some(expected) if received < expected => Err(AttemptError::Truncated { received, expected }),
            Some(expected) if received > expected => {
                remove_if_present(path).await.map_err(|e| AttemptError::local(path, e))?;
                Err(AttemptError::Transport(format!("received {received} bytes, {expected} announced")))
            }
            _ => Ok(()),
        }
    }

    /// One attempt from a `file://` mirror: a streamed copy into the staging file,
    /// so the source can change or vanish afterwards without affecting what is verified and stored.
    async fn copy_local(
        &self,
        url: &Url,
        path: &Path,
        progress: &ProgressBar,
        received_total: &mut u64,
    ) -> Result<(), AttemptError> {
        let source = url.to_file_path().map_err(|()| AttemptError::Missing)?;
        let mut input = match tokio::fs::File::open(&source).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(AttemptError::Missing),
            Err(e) => return Err(AttemptError::Transport(format!("{}: {e}", source.display()))),
        };
        if let Ok(meta) = input.metadata().await {
            progress.inc_length(meta.len());
        }
        let file = tokio::fs::File::create(path).await.map_err(|e| AttemptError::local(path, e))?;
        let mut out = BufWriter::with_capacity(256 * 1024, file);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = input
                .read(&mut buf)
                .await
                .map_err(|e| AttemptError::Transport(format!("{}: {e}", source.display())))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).await.map_err(|e| AttemptError::local(path, e))?;
            *received_total += n as u64;
            self.metrics.bytes_downloaded.inc_by(n as u64);
            progress.inc(n as u64);
        }
        out.flush().await.map_err(|e| AttemptError::local(path, e))
    }
}

fn content_range_start(response: &reqwest::Response) -> Option<u64> {
    let value = response.headers().get(CONTENT_RANGE)?.to_str().ok()?;
    value.strip_prefix("bytes ")?.split('-').next()?.trim().parse().ok()
}

async fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn local(path: &Path, e: std::io::Error) -> DownloadError {
    DownloadError::Local(format!("{}: {e}", path.display()))
}

/// An error and its causes on one line (reqwest's own message is terse).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_within_jitter_and_is_capped() {
        let base = Duration::from_millis(100);
        for _ in 0..50 {
            let first = backoff(base, 1);
            assert!(first >= Duration::from_millis(50) && first < Duration::from_millis(150), "{first:?}");
            let third = backoff(base, 3);
            assert!(third >= Duration::from_millis(200) && third < Duration::from_millis(600), "{third:?}");
            assert!(backoff(base, 40) < MAX_BACKOFF.mul_f64(1.5));
        }
    }

    #[test]
    fn transient_failures_are_retried_and_bad_content_is_not() {
        assert!(AttemptError::Status(500).retryable());
        assert!(AttemptError::Status(429).retryable());
        assert!(!AttemptError::Status(403).retryable());
        assert!(!AttemptError::Missing.retryable());
        assert!(AttemptError::Truncated { received: 1, expected: 2 }.retryable());
        assert!(AttemptError::Verify(VerifyError::TruncatedGzip).retryable());
        let checksum = AttemptError::Verify(VerifyError::Checksum { expected: "a".into(), actual: "b".into() });
        assert!(!checksum.retryable());
        assert_eq!(checksum.reason(), "checksum");
    }

    #[test]
    fn a_repeated_failure_is_told_once_with_its_count_and_unreachable_mirrors_earn_the_hint() {
        let mut offline = Attempts::default();
        for mirror in ["https://a.example/", "https://b.example/"] {
            for _ in 0..4 {
                offline.push(format!("f from {mirror}: transfer failed: dns error"), true);
            }
        }
        assert!(offline.all_unreachable());
        assert_eq!(
            offline.lines(),
            [
                "f from https://a.example/: transfer failed: dns error (4 attempts)",
                "f from https://b.example/: transfer failed: dns error (4 attempts)"
            ]
        );
        let mut mixed = Attempts::default();
        mixed.push("f from a: transfer failed: dns error".into(), true);
        mixed.push("f from b: HTTP status 404".into(), false);
        mixed.push("f from c: transfer failed: dns error".into(), true);
        assert!(!mixed.all_unreachable(), "a mirror answered, so the network is up");
        assert_eq!(mixed.lines().len(), 3);
        assert!(!Attempts::default().all_unreachable());
    }

    #[test]
    fn credentials_never_reach_logs_or_events() {
        let url = Url::parse("https://user:secret@mirror.example/mnist/").unwrap();
        assert_eq!(display_mirror(&url), "https://mirror.example/mnist/");
    }
}
