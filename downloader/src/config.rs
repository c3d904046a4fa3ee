//! The downloader's configuration, read once through a lookup function so tests
//! never touch the process environment. A malformed value stops the process at
//! start-up with an error naming the variable.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `DOWNLOADER_MODE` | `once` (a Job: download, announce, exit) or `service` (act on each `dataset.download`) | `once` |
//! | `DOWNLOADER_MIRRORS` | comma-separated base URLs, tried in order: `https://`, `http://`, `file:///dir/` or an absolute path | the two mirrors torchvision uses |
//! | `DOWNLOADER_ALLOWED_MIRRORS` | comma-separated `http(s)://` base URLs under which a `dataset.download` command may name mirrors; a command can never name `file://` or carry credentials | the `http(s)://` entries of `DOWNLOADER_MIRRORS` |
//! | `DOWNLOADER_SHA256` | four SHA-256 of the decompressed files (train-images, train-labels, t10k-images, t10k-labels), or `off` | the published MNIST values |
//! | `DOWNLOADER_AUTO_TRAIN` | publish `train.request` after `dataset.ready` | `true` |
//! | `DOWNLOADER_RETRIES` | extra attempts per file and mirror on transient errors | `3` |
//! | `DOWNLOADER_TIMEOUT_SECS` | connect timeout, and the longest a transfer may stall | `30` |
//! | `DOWNLOADER_BACKOFF_MS` | first retry delay (doubles each time, with jitter, capped at 30 s) | `500` |
//! | `DOWNLOADER_TMP_DIR` | where downloads are staged (removed afterwards) | the system's temp dir |
//! | `DOWNLOADER_PROGRESS` | `auto` (a bar when stderr is a terminal), `on`, `off` | `auto` |
//! | `DOWNLOADER_METRICS_ADDR` | service mode: health and Prometheus metrics address, or `off` | `0.0.0.0:9102` |
//! | `DOWNLOADER_MAX_DELIVER` | service mode: deliveries of one command before giving up | `3` |
//! | `DOWNLOADER_RETRY_DELAY_SECS` | service mode: delay before a failed command is redelivered | `30` |
//!
//! Plus the shared `NATS_*` variables ([`NatsConfig`]) and `STORE_URL`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use mnistflow_nats::{ConfigError, NatsConfig, redact_credentials};
use mnistflow_runtime::env::{self, flag, listen_addr, positive, positive_secs, var, var_or};
use url::Url;

use crate::verify::KNOWN_SHA256;

/// The public MNIST mirrors torchvision uses, in its order.
pub const DEFAULT_MIRRORS: [&str; 2] =
    ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"];

/// The default health and metrics address in service mode.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9102";

/// How the process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Download (or re-announce), then exit: non-zero when it failed. A Kubernetes Job.
    Once,
    /// Stay up and act on each `dataset.download` command.
    Service,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "once" | "job" => Ok(Self::Once),
            "service" | "serve" => Ok(Self::Service),
            other => Err(format!("{other:?} is not a mode (use once or service)")),
        }
    }
}

/// Whether to draw a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, log lines otherwise.
    Auto,
    On,
    Off,
}

impl FromStr for ProgressMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "on" | "true" | "1" | "yes" => Ok(Self::On),
            "off" | "false" | "0" | "no" => Ok(Self::Off),
            other => Err(format!("{other:?} is not one of auto, on, off")),
        }
    }
}

impl ProgressMode {
    /// Resolves `Auto` against stderr.
    pub fn enabled(self) -> bool {
        match self {
            Self::Auto => std::io::IsTerminal::is_terminal(&std::io::stderr()),
            Self::On => true,
            Self::Off => false,
        }
    }
}

/// How files are fetched and checked.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Base URLs (each ending in `/`), tried in order for each file.
    pub mirrors: Vec<Url>,
    /// Expected SHA-256 of the decompressed files in [`crate::verify::FILES`] order;
    /// `None` accepts any well-formed MNIST-shaped data (the id still addresses its content).
    pub expected_sha256: Option<[String; 4]>,
    /// Extra attempts per file and mirror after a transient failure.
    pub retries: u32,
    /// Connect timeout, and the longest a transfer may go without a byte.
    pub timeout: Duration,
    /// The first retry delay; doubled per attempt, with jitter, capped at [`MAX_BACKOFF`].
    pub backoff: Duration,
    /// Where downloads are staged (a fresh directory inside, removed afterwards).
    pub temp_dir: Option<PathBuf>,
    pub progress: ProgressMode,
}

/// The longest pause between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            mirrors: DEFAULT_MIRRORS.iter().map(|m| parse_mirror(m).expect("default mirrors parse")).collect(),
            expected_sha256: Some(KNOWN_SHA256.map(str::to_owned)),
            retries: 3,
            timeout: Duration::from_secs(30),
            backoff: Duration::from_millis(500),
            temp_dir: None,
            progress: ProgressMode::Auto,
        }
    }
}

/// The stage's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub nats: NatsConfig,
    pub store_url: String,
    pub mode: Mode,
    pub fetch: FetchConfig,
    /// The base URLs a command's mirrors must lie under (`http(s)://` only).
    pub allowed_mirrors: Vec<Url>,
    /// Publish `train.request` after `dataset.ready` (a command may override it).
    pub auto_train: bool,
    /// Service mode: where `/healthz`, `/readyz` and `/metrics` listen; `None` disables them.
    pub metrics_addr: Option<SocketAddr>,
    /// Service mode: deliveries of one command before it is given up.
    pub max_deliver: i64,
    /// Service mode: delay before a failed command is delivered again.
    pub retry_delay: Duration,
}

impl Config {
    /// The variables [`Config::from_lookup`] reads itself (the `NATS_*` ones are
    /// [`NatsConfig::ENV_VARS`]).
    pub const ENV_VARS: &'static [&'static str] = &[
        "DOWNLOADER_MODE",
        "DOWNLOADER_MIRRORS",
        "DOWNLOADER_ALLOWED_MIRRORS",
        "DOWNLOADER_SHA256",
        "DOWNLOADER_RETRIES",
        "DOWNLOADER_TIMEOUT_SECS",
        "DOWNLOADER_BACKOFF_MS",
        "DOWNLOADER_TMP_DIR",
        "DOWNLOADER_PROGRESS",
        "DOWNLOADER_AUTO_TRAIN",
        "DOWNLOADER_METRICS_ADDR",
        "DOWNLOADER_MAX_DELIVER",
        "DOWNLOADER_RETRY_DELAY_SECS",
    ];

    /// Every variable this binary reads: the process's, NATS', the store's, its own
    /// (`--print-env-vars` prints them; `k8s/check` compares them with the manifests).
    pub fn env_vars() -> Vec<&'static str> {
        env::env_vars(&[env::PROCESS_VARS, NatsConfig::ENV_VARS, env::STORE_VARS, Self::ENV_VARS])
    }

    /// Reads the process environment.
    ///
    /// # Errors
    /// A variable is malformed; the error names it.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads settings through `lookup`.
    ///
    /// # Errors
    /// A variable is malformed; the error names it.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let nats = NatsConfig::from_lookup(&lookup)?.with_client_name("mnistflow-downloader");
        let store_url = env::store_url(&lookup);
        let mode = var_or(&lookup, "DOWNLOADER_MODE", Mode::Once)?;

        let mirrors = match lookup("DOWNLOADER_MIRRORS").filter(|v| !v.trim().is_empty()) {
            None => FetchConfig::default().mirrors,
            Some(raw) => parse_mirror_list(raw.split(',')).map_err(|e| ConfigError::new("DOWNLOADER_MIRRORS", e))?,
        };
        let allowed_mirrors = match lookup("DOWNLOADER_ALLOWED_MIRRORS").filter(|v| !v.trim().is_empty()) {
            None => mirrors.iter().filter(|m| m.scheme() != "file").cloned().collect(),
            Some(raw) => {
                let allowed =
                    parse_mirror_list(raw.split(',')).map_err(|e| ConfigError::new("DOWNLOADER_ALLOWED_MIRRORS", e))?;
                if let Some(local) = allowed.iter().find(|m| m.scheme() == "file") {
                    return Err(ConfigError::new(
                        "DOWNLOADER_ALLOWED_MIRRORS",
                        format!(
                            "{local}: commands may not name file:// mirrors; list it in DOWNLOADER_MIRRORS instead"
                        ),
                    ));
                }
                allowed
            }
        };
        let expected_sha256 = match lookup("DOWNLOADER_SHA256").map(|v| v.trim().to_ascii_lowercase()) {
            None => Some(KNOWN_SHA256.map(str::to_owned)),
            Some(v) if v.is_empty() => Some(KNOWN_SHA256.map(str::to_owned)),
            Some(v) if matches!(v.as_str(), "off" | "none" | "false") => None,
            Some(v) => Some(parse_sha256_list(&v).map_err(|e| ConfigError::new("DOWNLOADER_SHA256", e))?),
        };
        let retries: u32 = var_or(&lookup, "DOWNLOADER_RETRIES", 3)?;
        let timeout = positive_secs(&lookup, "DOWNLOADER_TIMEOUT_SECS", 30.0)?;
        let backoff_ms: u64 = var_or(&lookup, "DOWNLOADER_BACKOFF_MS", 500)?;
        let temp_dir: Option<PathBuf> = var(&lookup, "DOWNLOADER_TMP_DIR")?;
        let progress = var_or(&lookup, "DOWNLOADER_PROGRESS", ProgressMode::Auto)?;
        let auto_train = flag(&lookup, "DOWNLOADER_AUTO_TRAIN", true)?;
        let metrics_addr = listen_addr(
            &lookup,
            "DOWNLOADER_METRICS_ADDR",
            DEFAULT_METRICS_ADDR.parse().expect("default metrics address parses"),
        )?;
        let max_deliver: i64 = positive(&lookup, "DOWNLOADER_MAX_DELIVER", 3)?;
        let retry_delay = positive_secs(&lookup, "DOWNLOADER_RETRY_DELAY_SECS", 30.0)?;
        Ok(Self {
            nats,
            store_url,
            mode,
            fetch: FetchConfig {
                mirrors,
                expected_sha256,
                retries,
                timeout,
                backoff: Duration::from_millis(backoff_ms),
                temp_dir,
                progress,
            },
            allowed_mirrors,
            auto_train,
            metrics_addr,
            max_deliver,
            retry_delay,
        })
    }
}

/// Parses one mirror: an `http(s)://` or `file://` base URL, or an absolute
/// directory path. The result always ends in `/` so file names join under it.
///
/// # Errors
/// Not a URL, an unsupported scheme, or a relative path.
pub fn parse_mirror(raw: &str) -> Result<Url, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err("empty mirror".into());
    }
    let shown = redact_credentials(raw);
    let mut url = if raw.starts_with('/') {
        Url::from_directory_path(raw).map_err(|()| format!("{shown:?} is not an absolute directory path"))?
    } else {
        Url::parse(raw).map_err(|e| format!("{shown:?} is not a URL: {e}"))?
    };
    match url.scheme() {
        "http" | "https" if url.host_str().is_some() => {}
        "file" => {}
        _ => return Err(format!("{shown:?}: unsupported mirror (use http://, https://, file:// or an absolute path)")),
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

/// The mirrors a `dataset.download` command names, each checked against the
/// allow-list: `http(s)://` only (a command must not make the pod read its own
/// files), no credentials (they would be kept in the stream for anyone who can
/// read it; configure them in `DOWNLOADER_MIRRORS`), and under one of `allowed`
/// (same scheme, host and port; the path within the allowed one). Error
/// messages never repeat credentials.
///
/// # Errors
/// A mirror is invalid or not allowed, or the list is empty.
pub fn command_mirrors(raw: &[String], allowed: &[Url]) -> Result<Vec<Url>, String> {
    let mirrors = parse_mirror_list(raw.iter().map(String::as_str))?;
    for mirror in &mirrors {
        let shown = crate::fetch::display_mirror(mirror);
        if mirror.scheme() == "file" {
            return Err(format!(
                "{shown}: a command cannot name a file:// mirror (set DOWNLOADER_MIRRORS where the downloader runs)"
            ));
        }
        if !mirror.username().is_empty() || mirror.password().is_some() {
            return Err(format!(
                "{shown}: a command cannot carry mirror credentials (they would be stored in the stream); \
                 configure the mirror with its credentials in DOWNLOADER_MIRRORS"
            ));
        }
        let inside = |base: &Url| {
            base.scheme() == mirror.scheme()
                && base.host_str() == mirror.host_str()
                && base.port_or_known_default() == mirror.port_or_known_default()
                && mirror.path().starts_with(base.path())
        };
        if !allowed.iter().any(inside) {
            let list: Vec<String> = allowed.iter().map(crate::fetch::display_mirror).collect();
            let list = if list.is_empty() { "none".to_owned() } else { list.join(", ") };
            return Err(format!(
                "{shown} is not an allowed mirror (allowed: {list}; the downloader's DOWNLOADER_ALLOWED_MIRRORS sets them)"
            ));
        }
    }
    Ok(mirrors)
}

/// Parses an ordered list of mirrors.
///
/// # Errors
/// Any mirror is invalid, or the list is empty.
pub fn parse_mirror_list<'a>(raw: impl IntoIterator<Item = &'a str>) -> Result<Vec<Url>, String> {
    let mirrors = raw.into_iter().filter(|s| !s.trim().is_empty()).map(parse_mirror).collect::<Result<Vec<_>, _>>()?;
    if mirrors.is_empty() {
        return Err("no mirror given".into());
    }
    Ok(mirrors)
}

fn parse_sha256_list(raw: &str) -> Result<[String; 4], String> {
    let hashes: Vec<String> = raw.split(',').map(|s| s.trim().to_owned()).collect();
    let hashes: [String; 4] = hashes.try_into().map_err(|v: Vec<String>| {
        format!(
            "expected 4 comma-separated SHA-256 (train-images, train-labels, t10k-images, t10k-labels) or off, got {}",
            v.len()
        )
    })?;
    for h in &hashes {
        if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{h:?} is not a SHA-256 in hex"));
        }
    }
    Ok(hashes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn defaults_are_the_public_mirrors_and_the_known_checksums() {
        let c = Config::from_lookup(|_| None).unwrap();
        assert_eq!(c.mode, Mode::Once);
        assert_eq!(
            c.fetch.mirrors.iter().map(Url::as_str).collect::<Vec<_>>(),
            ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"]
        );
        assert_eq!(c.fetch.expected_sha256.as_ref().unwrap()[0], KNOWN_SHA256[0]);
        assert!(c.auto_train);
        assert_eq!(c.fetch.retries, 3);
        assert_eq!(c.metrics_addr, Some("0.0.0.0:9102".parse().unwrap()));
        assert_eq!(c.nats.client_name, "mnistflow-downloader");
    }

    #[test]
    fn commands_may_name_only_allowed_http_mirrors_without_credentials() {
        let c = Config::from_lookup(env(&[(
            "DOWNLOADER_MIRRORS",
            "file:///data/mnist/,https://mirror.example/mnist/,http://10.0.0.5:8080/mnist",
        )]))
        .unwrap();
        // The default allow-list: the configured http(s) mirrors, never file://.
        let allowed: Vec<_> = c.allowed_mirrors.iter().map(Url::as_str).collect();
        assert_eq!(allowed, ["https://mirror.example/mnist/", "http://10.0.0.5:8080/mnist/"]);
        let check = |m: &str| command_mirrors(&[m.to_owned()], &c.allowed_mirrors);
        assert!(check("https://mirror.example/mnist/").is_ok());
        assert!(check("https://mirror.example/mnist/v2/").is_ok());
        assert!(check("http://10.0.0.5:8080/mnist/").is_ok());
        for refused in [
            "file:///data/mnist/",
            "/etc/",
            "file:///var/run/secrets/kubernetes.io/serviceaccount/",
            "https://mirror.example/other/",
            "https://mirror.example.evil/mnist/",
            "http://mirror.example/mnist/",
            "http://10.0.0.5:8081/mnist/",
            "http://169.254.169.254/computeMetadata/v1/",
        ] {
            let err = check(refused).unwrap_err();
            assert!(err.contains("file://") || err.contains("not an allowed mirror"), "{refused}: {err}");
        }
        let err = check("https://alice:s3cret@mirror.example/mnist/").unwrap_err();
        assert!(err.contains("credentials") && !err.contains("s3cret") && !err.contains("alice"), "{err}");
        let err = check("ftp://bob:hunter2@x/").unwrap_err();
        assert!(!err.contains("hunter2") && !err.contains("bob"), "{err}");
    }

    #[test]
    fn the_allow_list_is_configurable_and_refuses_file_urls() {
        let c =
            Config::from_lookup(env(&[("DOWNLOADER_ALLOWED_MIRRORS", "https://a.example/,https://b.example/mnist/")]))
                .unwrap();
        assert_eq!(c.allowed_mirrors.len(), 2);
        assert!(command_mirrors(&["https://a.example/anything/".into()], &c.allowed_mirrors).is_ok());
        let err = Config::from_lookup(env(&[("DOWNLOADER_ALLOWED_MIRRORS", "file:///data/")])).unwrap_err();
        assert_eq!(err.var, "DOWNLOADER_ALLOWED_MIRRORS");
        let only_local = Config::from_lookup(env(&[("DOWNLOADER_MIRRORS", "/data/mnist")])).unwrap();
        let err = command_mirrors(&["https://a.example/".into()], &only_local.allowed_mirrors).unwrap_err();
        assert!(err.contains("allowed: none"), "{err}");
    }

    #[test]
    fn mirrors_are_normalised_to_directories() {
        let c = Config::from_lookup(env(&[(
            "DOWNLOADER_MIRRORS",
            "http://127.0.0.1:8080/mnist, file:///data/mnist/ ,/srv/mnist",
        )]))
        .unwrap();
        let got: Vec<_> = c.fetch.mirrors.iter().map(Url::as_str).collect();
        assert_eq!(got, ["http://127.0.0.1:8080/mnist/", "file:///data/mnist/", "file:///srv/mnist/"]);
    }

    #[test]
    fn malformed_values_are_rejected_naming_the_variable() {
        for (name, value) in [
            ("DOWNLOADER_MIRRORS", "ftp://example.com/"),
            ("DOWNLOADER_MIRRORS", "relative/dir"),
            ("DOWNLOADER_MIRRORS", " , "),
            ("DOWNLOADER_MODE", "sometimes"),
            ("DOWNLOADER_AUTO_TRAIN", "perhaps"),
            ("DOWNLOADER_RETRIES", "-1"),
            ("DOWNLOADER_TIMEOUT_SECS", "0"),
            ("DOWNLOADER_BACKOFF_MS", "fast"),
            ("DOWNLOADER_METRICS_ADDR", "localhost"),
            ("DOWNLOADER_SHA256", "abc,def"),
            ("DOWNLOADER_MAX_DELIVER", "0"),
            ("DOWNLOADER_PROGRESS", "loud"),
            ("NATS_URL", "http://nope"),
        ] {
            let err = Config::from_lookup(env(&[(name, value)])).unwrap_err();
            assert_eq!(err.var, name, "{name}={value}: {err}");
        }
    }

    #[test]
    fn checksums_can_be_replaced_or_switched_off() {
        let c = Config::from_lookup(env(&[("DOWNLOADER_SHA256", "off")])).unwrap();
        assert!(c.fetch.expected_sha256.is_none());
        let four = [KNOWN_SHA256[3], KNOWN_SHA256[2], KNOWN_SHA256[1], KNOWN_SHA256[0]].join(",");
        let c = Config::from_lookup(env(&[("DOWNLOADER_SHA256", &four)])).unwrap();
        assert_eq!(c.fetch.expected_sha256.unwrap()[0], KNOWN_SHA256[3]);
    }

    #[test]
    fn service_settings_parse() {
        let c = Config::from_lookup(env(&[
            ("DOWNLOADER_MODE", "service"),
            ("DOWNLOADER_METRICS_ADDR", "off"),
            ("DOWNLOADER_AUTO_TRAIN", "false"),
        ]))
        .unwrap();
        assert_eq!(c.mode, Mode::Service);
        assert_eq!(c.metrics_addr, None);
        assert!(!c.auto_train);
    }

    #[test]
    fn the_variable_list_names_exactly_what_is_read() {
        mnistflow_runtime::env::assert_lists_exactly(&Config::env_vars(), &[], |lookup| {
            Config::from_lookup(lookup).unwrap();
        });
    }
}
