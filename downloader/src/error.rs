use mnistflow_nats::BusError;
use mnistflow_store::StoreError;

/// Said once when no mirror could be reached.
pub const UNREACHABLE_HINT: &str = ". No mirror could be reached: offline? Point DOWNLOADER_MIRRORS at a local copy \
     (file:///path/to/mnist/; scripts/fetch-mnist makes one) where the downloader runs";

/// Why a data set could not be obtained or announced.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// Every mirror failed for one file; each entry names the file, the mirror and
    /// what went wrong (repeated failures once, with their count). `unreachable`:
    /// no mirror could be reached at all, which earns a hint (offline?).
    #[error("{file}: every mirror failed: {}{}", .attempts.join("; "), if *.unreachable { UNREACHABLE_HINT } else { "" })]
    Exhausted { file: String, attempts: Vec<String>, unreachable: bool },
    /// Each file is valid on its own but they do not belong together.
    #[error("the downloaded files disagree: {0}")]
    Inconsistent(String),
    /// The command cannot be carried out as given (an invalid mirror, an undecodable payload).
    #[error("invalid download command: {0}")]
    BadRequest(String),
    /// Staging on the local disk failed (disk full, permissions) or the HTTP client could not start.
    #[error("local staging: {0}")]
    Local(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("announcing on NATS: {0}")]
    Bus(#[from] BusError),
    #[error("shutdown requested")]
    Cancelled,
}

impl DownloadError {
    /// A short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Exhausted { .. } => "mirrors_exhausted",
            Self::Inconsistent(_) => "inconsistent",
            Self::BadRequest(_) => "bad_request",
            Self::Local(_) => "local",
            Self::Store(_) => "store",
            Self::Bus(_) => "bus",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the same command may succeed later (mirrors come back, NATS reconnects).
    pub fn transient(&self) -> bool {
        !matches!(self, Self::BadRequest(_) | Self::Inconsistent(_))
    }
}
