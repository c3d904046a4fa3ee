//! The stage's configuration, read through a lookup function (`INFERENCE_*` plus the
//! shared `NATS_*` and `STORE_URL`).
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `INFERENCE_ADDRESS` / `INFERENCE_PORT` | where the HTTP API listens (port 0: any free port) | `0.0.0.0` / `8080` |
//! | `INFERENCE_WORKERS` | Rocket worker threads | number of CPUs |
//! | `INFERENCE_MAX_BATCH` | most images in one forward pass | `32` |
//! | `INFERENCE_MAX_WAIT_MS` | how long the batcher waits to fill a batch after the first request | `2` |
//! | `INFERENCE_QUEUE_CAPACITY` | requests waiting for the compute thread before 503 | `1024` |
//! | `INFERENCE_TORCH_THREADS` | libtorch intra-op threads (0: libtorch's default) | `0` |
//! | `INFERENCE_PRECISION` | `f32`, `bf16` (CPU autocast: convolutions and linear layers in bfloat16) or `auto` (`bf16` where the CPU has AMX or AVX-512 BF16) | `auto` |
//! | `INFERENCE_MAX_BODY_BYTES` | largest accepted upload (HTTP 413) | `10485760` (10 MiB) |
//! | `INFERENCE_MAX_PIXELS` | largest decoded image, width × height (HTTP 422) | `40000000` |
//! | `INFERENCE_MAX_DIMENSION` | largest width or height (HTTP 422) | `20000` |
//! | `INFERENCE_DECODE_BUDGET_BYTES` | memory all image decodes may hold at once, HTTP and NATS together; an image that needs more is refused (422), one that does not fit now is answered busy (HTTP 503 with `Retry-After`, NATS code 429) | `268435456` (256 MiB) |
//! | `INFERENCE_REQUEST_TIMEOUT_MS` | longest wait for an answer from the compute thread (then 503) | `10000` |
//! | `INFERENCE_MODEL_VERSION` | pin this version, ignoring `CURRENT` | unset |
//! | `INFERENCE_POLL_SECS` | how often `CURRENT` is polled besides file notifications and events | `5` |
//! | `INFERENCE_DRAIN_SECS` | shutdown deadline for in-flight work (keep it under the pod's grace period) | `20` |
//! | `INFERENCE_INSTANCE` | the instance name in events | `HOSTNAME`, else random |
//! | `INFERENCE_PROMOTER` | consume `model.promote` commands here (off in Kubernetes: the promoter Deployment does) | `true` |
//! | `INFERENCE_ROLE` | `serve`, or `promoter`: only the `model.promote` consumer and health probes | `serve` |
//! | `RETENTION_*` | model and event retention, run where the promoter runs: [`crate::retention`] | off |
//! | `INFERENCE_MAX_MODEL_BYTES` | largest model a version may hold; a bigger one is refused before it is read | `67108864` (64 MiB) |
//! | `INFERENCE_TRUSTED_KEYS` | the keyring: a PEM public key file, or a directory of them; a version not signed by one of these keys is refused | unset: versions load unverified (a warning; `mnistflow up` and the manifests set it) |
//! | `INFERENCE_SIGNING_KEY` | the promoter's private key file (PKCS#8 PEM): it signs, once, the versions published before signing | unset: no migration |

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mnistflow_nats::{ConfigError, ModelVersion, NatsConfig};
use mnistflow_runtime::env::{self, flag, positive, positive_secs, var, var_or};
use mnistflow_store::{Keyring, SigningKey};
use mnistflow_torch::Precision;

/// The default decode budget, sized to a 1 GiB pod (k8s/base/inference.yaml):
/// about 165 MiB idle with the model, plus the budget, plus up to as much again
/// of freed decode buffers that glibc keeps in its heap (scripts/bench-uploads).
pub const DEFAULT_DECODE_BUDGET_BYTES: u64 = 256 << 20;

/// Limits applied to every upload, HTTP and NATS alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted body in bytes.
    pub max_body_bytes: u64,
    /// Largest decoded image (width × height).
    pub max_pixels: u64,
    /// Largest width or height.
    pub max_dimension: u32,
    /// Memory all decodes in the process may hold at once (see
    /// [`DecodeBudget`](crate::preprocess::DecodeBudget)); also the most one
    /// image may need.
    pub decode_budget_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 10 * 1024 * 1024,
            max_pixels: 40_000_000,
            max_dimension: 20_000,
            decode_budget_bytes: DEFAULT_DECODE_BUDGET_BYTES,
        }
    }
}

/// How the micro-batcher groups requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    pub max_batch: usize,
    pub max_wait: Duration,
    pub queue_capacity: usize,
    /// libtorch intra-op threads for the compute thread; 0 keeps libtorch's default.
    pub torch_threads: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { max_batch: 32, max_wait: Duration::from_millis(2), queue_capacity: 1024, torch_threads: 0 }
    }
}

/// The stage's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub nats: NatsConfig,
    pub store_url: String,
    pub address: IpAddr,
    pub port: u16,
    pub workers: usize,
    pub batch: BatchConfig,
    pub limits: Limits,
    /// The number format of the forward pass, resolved (never `Auto`).
    pub precision: Precision,
    pub request_timeout: Duration,
    pub pinned_version: Option<ModelVersion>,
    pub poll: Duration,
    pub drain: Duration,
    pub instance: String,
    pub promoter: bool,
    /// What this process is (`INFERENCE_ROLE`): `serve` (the default) or
    /// `promoter` (only the `model.promote` consumer and health probes: the
    /// Kubernetes promoter Deployment, so serving pods never write the store).
    pub role: Role,
    /// The largest model a version may hold (`INFERENCE_MAX_MODEL_BYTES`,
    /// default 64 MiB): a bigger one is refused before it is read into memory.
    pub max_model_bytes: u64,
    /// The public keys a version must be signed with (`INFERENCE_TRUSTED_KEYS`);
    /// `None`: versions are loaded without a signature check.
    pub keyring: Option<Keyring>,
    /// The promoter's private key (`INFERENCE_SIGNING_KEY`), for the one-time
    /// migration of versions published before signing. Serving pods never hold it.
    pub signing_key: Option<Arc<SigningKey>>,
    /// `RETENTION_*` (see [`crate::retention`]): run by the promoter; `None`: off.
    pub retention: Option<crate::retention::RetentionConfig>,
}

/// What an inference process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Serve,
    Promoter,
}

impl Config {
    /// The variables [`Config::from_lookup`] reads itself (the `NATS_*` ones are
    /// [`NatsConfig::ENV_VARS`]).
    pub const ENV_VARS: &'static [&'static str] = &[
        "INFERENCE_ROLE",
        "INFERENCE_ADDRESS",
        "INFERENCE_PORT",
        "INFERENCE_WORKERS",
        "INFERENCE_MAX_BATCH",
        "INFERENCE_MAX_WAIT_MS",
        "INFERENCE_QUEUE_CAPACITY",
        "INFERENCE_TORCH_THREADS",
        "INFERENCE_MAX_BODY_BYTES",
        "INFERENCE_MAX_PIXELS",
        "INFERENCE_MAX_DIMENSION",
        "INFERENCE_DECODE_BUDGET_BYTES",
        "INFERENCE_MAX_MODEL_BYTES",
        "INFERENCE_TRUSTED_KEYS",
        "INFERENCE_SIGNING_KEY",
        "RETENTION_KEEP_VERSIONS",
        "RETENTION_KEEP_SERVED_SECS",
        "RETENTION_EVENTS_MAX_AGE_SECS",
        "RETENTION_INTERVAL_SECS",
        "INFERENCE_PRECISION",
        "INFERENCE_REQUEST_TIMEOUT_MS",
        "INFERENCE_MODEL_VERSION",
        "INFERENCE_POLL_SECS",
        "INFERENCE_DRAIN_SECS",
        "INFERENCE_INSTANCE",
        "HOSTNAME",
        "INFERENCE_PROMOTER",
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
    /// A variable is malformed or out of range; the error names it.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let nats = NatsConfig::from_lookup(&lookup)?.with_client_name("mnistflow-inference");
        let store_url = env::store_url(&lookup);
        let cpus = std::thread::available_parallelism().map_or(2, usize::from);
        let max_batch: u64 = positive(&lookup, "INFERENCE_MAX_BATCH", 32)?;
        if max_batch > 4096 {
            return Err(ConfigError::new("INFERENCE_MAX_BATCH", "must be at most 4096"));
        }
        let queue_capacity: u64 = positive(&lookup, "INFERENCE_QUEUE_CAPACITY", 1024)?;
        let batch = BatchConfig {
            max_batch: max_batch as usize,
            max_wait: Duration::from_millis(var_or(&lookup, "INFERENCE_MAX_WAIT_MS", 2)?),
            queue_capacity: queue_capacity as usize,
            torch_threads: var_or(&lookup, "INFERENCE_TORCH_THREADS", 0)?,
        };
        let limits = Limits {
            max_body_bytes: positive(&lookup, "INFERENCE_MAX_BODY_BYTES", Limits::default().max_body_bytes)?,
            max_pixels: positive(&lookup, "INFERENCE_MAX_PIXELS", Limits::default().max_pixels)?,
            max_dimension: positive(&lookup, "INFERENCE_MAX_DIMENSION", u64::from(Limits::default().max_dimension))?
                .try_into()
                .map_err(|_| ConfigError::new("INFERENCE_MAX_DIMENSION", "too large"))?,
            decode_budget_bytes: positive(&lookup, "INFERENCE_DECODE_BUDGET_BYTES", DEFAULT_DECODE_BUDGET_BYTES)?,
        };
        let pinned_version: Option<String> = var(&lookup, "INFERENCE_MODEL_VERSION")?;
        let pinned_version = match pinned_version {
            Some(v) if !ModelVersion::is_valid(&v) => {
                return Err(ConfigError::new("INFERENCE_MODEL_VERSION", format!("{v:?} is not a valid version name")));
            }
            other => other.map(ModelVersion),
        };
        let instance = lookup("INFERENCE_INSTANCE")
            .or_else(|| lookup("HOSTNAME"))
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("inference-{}", &mnistflow_nats::EventId::new().to_string()[24..]));
        Ok(Self {
            nats,
            store_url,
            address: var_or(&lookup, "INFERENCE_ADDRESS", IpAddr::from([0, 0, 0, 0]))?,
            port: var_or(&lookup, "INFERENCE_PORT", 8080)?,
            workers: positive(&lookup, "INFERENCE_WORKERS", cpus)?,
            batch,
            limits,
            precision: var_or(&lookup, "INFERENCE_PRECISION", Precision::Auto)?.resolve(tch::Device::Cpu),
            request_timeout: Duration::from_millis(positive(&lookup, "INFERENCE_REQUEST_TIMEOUT_MS", 10_000)?),
            pinned_version,
            poll: positive_secs(&lookup, "INFERENCE_POLL_SECS", 5.0)?,
            drain: positive_secs(&lookup, "INFERENCE_DRAIN_SECS", 20.0)?,
            instance,
            promoter: flag(&lookup, "INFERENCE_PROMOTER", true)?,
            role: match lookup("INFERENCE_ROLE").as_deref().map(str::trim) {
                None | Some("" | "serve") => Role::Serve,
                Some("promoter") => Role::Promoter,
                Some(other) => {
                    return Err(ConfigError::new("INFERENCE_ROLE", format!("{other:?} is not serve or promoter")));
                }
            },
            max_model_bytes: positive(&lookup, "INFERENCE_MAX_MODEL_BYTES", 64 * 1024 * 1024)?,
            keyring: match var::<PathBuf>(&lookup, "INFERENCE_TRUSTED_KEYS")? {
                None => None,
                Some(path) => {
                    Some(Keyring::read(&path).map_err(|e| ConfigError::new("INFERENCE_TRUSTED_KEYS", e.to_string()))?)
                }
            },
            signing_key: match var::<PathBuf>(&lookup, "INFERENCE_SIGNING_KEY")? {
                None => None,
                Some(path) => Some(Arc::new(
                    SigningKey::read(&path).map_err(|e| ConfigError::new("INFERENCE_SIGNING_KEY", e.to_string()))?,
                )),
            },
            retention: crate::retention::RetentionConfig::from_lookup(&lookup)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let c = Config::from_lookup(|_| None).unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.batch, BatchConfig::default());
        assert_eq!(c.limits, Limits::default());
        assert!(c.pinned_version.is_none());
        assert!(c.promoter);
        assert_eq!(c.precision, Precision::Auto.resolve(tch::Device::Cpu), "auto, resolved");
    }

    #[test]
    fn settings_are_read_from_their_variables() {
        let c = Config::from_lookup(env(&[
            ("INFERENCE_PORT", "0"),
            ("INFERENCE_MAX_BATCH", "8"),
            ("INFERENCE_MAX_WAIT_MS", "5"),
            ("INFERENCE_MODEL_VERSION", "20261130-050000-abcdef"),
            ("INFERENCE_INSTANCE", "pod-1"),
            ("INFERENCE_PROMOTER", "false"),
            ("INFERENCE_PRECISION", "f32"),
        ]))
        .unwrap();
        assert_eq!(c.precision, Precision::F32);
        assert_eq!(c.port, 0);
        assert_eq!(c.batch.max_batch, 8);
        assert_eq!(c.batch.max_wait, Duration::from_millis(5));
        assert_eq!(c.pinned_version.unwrap().as_str(), "20261130-050000-abcdef");
        assert_eq!(c.instance, "pod-1");
        assert!(!c.promoter);
    }

    #[test]
    fn bad_values_are_rejected_naming_the_variable() {
        for (name, value) in [
            ("INFERENCE_PORT", "http"),
            ("INFERENCE_MAX_BATCH", "0"),
            ("INFERENCE_MAX_BATCH", "100000"),
            ("INFERENCE_MAX_BODY_BYTES", "-1"),
            ("INFERENCE_MODEL_VERSION", "../etc"),
            ("INFERENCE_DRAIN_SECS", "0"),
            ("INFERENCE_ADDRESS", "localhost:80"),
            ("INFERENCE_PRECISION", "f8"),
        ] {
            let pairs: &'static [(&'static str, &'static str)] = Box::leak(Box::new([(name, value)]));
            let err = Config::from_lookup(env(pairs)).unwrap_err();
            assert_eq!(err.var, name, "{value}: {err}");
        }
    }

    #[test]
    fn the_variable_list_names_exactly_what_is_read() {
        mnistflow_runtime::env::assert_lists_exactly(&Config::env_vars(), &[], |lookup| {
            Config::from_lookup(lookup).unwrap();
        });
    }
}
