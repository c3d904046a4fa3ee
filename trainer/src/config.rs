//! The trainer's configuration, read once at start-up through a lookup function
//! (the process environment in `main`, a closure in tests).
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `NATS_URL`, `NATS_*`, `STORE_URL` | shared settings (see the README) | |
//! | `TRAINER_MODE` | `worker` (consume requests in a loop) or `job` (consume one request, then exit) | `worker` |
//! | `TRAINER_JOB_WAIT_SECS` | in `job` mode, how long to wait for a request before exiting | `120` |
//! | `TRAINER_EPOCHS` | epochs of the `default` preset | `1` |
//! | `TRAINER_BATCH_SIZE` | batch size of the `default` preset | `64` |
//! | `TRAINER_LR` | learning rate of the `default` preset | preset's |
//! | `TRAINER_OPTIMIZER` | `adam`, `adamw`, `adadelta`, `sgd` or `rmsprop` for the `default` preset | preset's |
//! | `TRAINER_SEED` | random seed when the request names none | `1` |
//! | `TRAINER_DEVICE` | `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when present) | `auto` |
//! | `TRAINER_PRECISION` | training step precision for every preset: `f32`, `bf16` (mixed) or `auto` (bf16 where the CPU has it natively) | `auto` |
//! | `TRAINER_MAX_MINUTES` | training time limit when the request names none | none |
//! | `TRAINER_ACCURACY_FLOOR` | minimum test accuracy for promotion to `CURRENT` | `0.97` |
//! | `TRAINER_TOLERANCE` | how much worse than `CURRENT` a new version may be and still be promoted | `0.002` |
//! | `TRAINER_ACK_WAIT_SECS` | the work-queue consumer's ack wait (in-progress signals go out at a third of it) | `60` |
//! | `TRAINER_MAX_DELIVER` | deliveries of one request before the server gives up | `5` |
//! | `TRAINER_RETRY_DELAY_SECS` | delay before a transiently failed request is redelivered | `15` |
//! | `TRAINER_PROGRESS_SECS` | interval between `train.progress` events | `2` |
//! | `TRAINER_THREADS` | libtorch intra-op threads of the training thread (0 = one per CPU this process may use, cgroup quota included) | `0` |
//! | `TRAINER_METRICS_ADDR` | `host:port` of `/metrics` and `/healthz` in worker mode; empty or `off` disables | `0.0.0.0:9103` |
//! | `TRAINER_PROGRESS_BAR` | `auto` (when stderr is a terminal), `on` or `off` | `auto` |
//! | `TRAINER_SIGNING_KEY` | the model-signing private key file (PKCS#8 PEM, ed25519): every version is published signed | unset: versions are published unsigned (an inference with a keyring refuses them) |

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mnistflow_nats::{ConfigError, NatsConfig};
use mnistflow_runtime::env::{self, listen_addr, positive, positive_secs as secs, var, var_or};
use mnistflow_store::SigningKey;

use crate::params::{DeviceChoice, OptimizerKind, Precision, Preset};

/// Whether the process serves requests in a loop or handles one and exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Consume requests until shutdown (the local default).
    Worker,
    /// Consume one request and exit (the Kubernetes Job, started per request).
    Job,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "worker" => Ok(Self::Worker),
            "job" => Ok(Self::Job),
            other => Err(format!("{other:?} is neither worker nor job")),
        }
    }
}

/// When to draw a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressBar {
    /// When stderr is a terminal.
    Auto,
    On,
    Off,
}

impl std::str::FromStr for ProgressBar {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "on" | "true" | "1" | "yes" => Ok(Self::On),
            "off" | "false" | "0" | "no" => Ok(Self::Off),
            other => Err(format!("{other:?} is not auto, on or off")),
        }
    }
}

/// Defaults a request's hyperparameters fall back to (after its preset).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainDefaults {
    /// The `default` preset with the `TRAINER_*` overrides applied.
    pub default_preset: Preset,
    pub seed: u64,
    pub device: DeviceChoice,
    pub max_minutes: Option<f64>,
    /// Overrides every preset's precision when set.
    pub precision: Option<Precision>,
}

/// The stage's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub nats: NatsConfig,
    pub store_url: String,
    pub mode: Mode,
    pub job_wait: Duration,
    pub defaults: TrainDefaults,
    pub accuracy_floor: f64,
    pub tolerance: f64,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    pub retry_delay: Duration,
    pub progress_interval: Duration,
    /// libtorch intra-op threads of the training thread; 0 (the default) means
    /// one per CPU available. On an otherwise idle 2-core machine two threads
    /// step ~1.6x faster than one; but OpenMP's spinning threads lose 3-4x as
    /// soon as another busy process wants the same CPUs, so set 1 where the
    /// trainer shares its cores (the tests do; see the README's benchmark).
    pub threads: usize,
    pub metrics_addr: Option<SocketAddr>,
    pub progress_bar: ProgressBar,
    /// Signs every published version (`TRAINER_SIGNING_KEY`).
    pub signing_key: Option<Arc<SigningKey>>,
}

impl Config {
    /// The variables [`Config::from_lookup`] reads itself (the `NATS_*` ones are
    /// [`NatsConfig::ENV_VARS`]).
    pub const ENV_VARS: &'static [&'static str] = &[
        "TRAINER_MODE",
        "TRAINER_SIGNING_KEY",
        "TRAINER_JOB_WAIT_SECS",
        "TRAINER_EPOCHS",
        "TRAINER_BATCH_SIZE",
        "TRAINER_LR",
        "TRAINER_OPTIMIZER",
        "TRAINER_SEED",
        "TRAINER_DEVICE",
        "TRAINER_MAX_MINUTES",
        "TRAINER_PRECISION",
        "TRAINER_ACCURACY_FLOOR",
        "TRAINER_TOLERANCE",
        "TRAINER_ACK_WAIT_SECS",
        "TRAINER_MAX_DELIVER",
        "TRAINER_RETRY_DELAY_SECS",
        "TRAINER_PROGRESS_SECS",
        "TRAINER_THREADS",
        "TRAINER_METRICS_ADDR",
        "TRAINER_PROGRESS_BAR",
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
        let nats = NatsConfig::from_lookup(&lookup)?.with_client_name("mnistflow-trainer");
        let store_url = env::store_url(&lookup);

        let mut preset = Preset::default_preset();
        preset.epochs = positive(&lookup, "TRAINER_EPOCHS", preset.epochs)?;
        preset.batch_size = positive(&lookup, "TRAINER_BATCH_SIZE", preset.batch_size)?;
        if let Some(lr) = var::<f64>(&lookup, "TRAINER_LR")? {
            if !(lr.is_finite() && lr > 0.0) {
                return Err(ConfigError::new("TRAINER_LR", "must be a positive number"));
            }
            preset.learning_rate = lr;
        }
        if let Some(name) = var::<String>(&lookup, "TRAINER_OPTIMIZER")? {
            preset.optimizer = name.parse::<OptimizerKind>().map_err(|e| ConfigError::new("TRAINER_OPTIMIZER", e))?;
        }
        let seed: u64 = var_or(&lookup, "TRAINER_SEED", 1)?;
        let device: DeviceChoice = var_or(&lookup, "TRAINER_DEVICE", DeviceChoice::Auto)?;
        let max_minutes: Option<f64> = var(&lookup, "TRAINER_MAX_MINUTES")?;
        if let Some(m) = max_minutes
            && !(m.is_finite() && m > 0.0)
        {
            return Err(ConfigError::new("TRAINER_MAX_MINUTES", "must be a positive number of minutes"));
        }

        let accuracy_floor: f64 = var_or(&lookup, "TRAINER_ACCURACY_FLOOR", 0.97)?;
        if !(0.0..=1.0).contains(&accuracy_floor) {
            return Err(ConfigError::new("TRAINER_ACCURACY_FLOOR", "must be between 0 and 1"));
        }
        let tolerance: f64 = var_or(&lookup, "TRAINER_TOLERANCE", 0.002)?;
        if !(0.0..=1.0).contains(&tolerance) {
            return Err(ConfigError::new("TRAINER_TOLERANCE", "must be between 0 and 1"));
        }
        let max_deliver: i64 = positive(&lookup, "TRAINER_MAX_DELIVER", 5)?;
        let threads: usize = var_or(&lookup, "TRAINER_THREADS", 0)?;
        let metrics_addr = listen_addr(&lookup, "TRAINER_METRICS_ADDR", SocketAddr::from(([0, 0, 0, 0], 9103)))?;

        Ok(Self {
            nats,
            store_url,
            mode: var_or(&lookup, "TRAINER_MODE", Mode::Worker)?,
            job_wait: secs(&lookup, "TRAINER_JOB_WAIT_SECS", 120.0)?,
            defaults: TrainDefaults {
                default_preset: preset,
                seed,
                device,
                max_minutes,
                precision: var(&lookup, "TRAINER_PRECISION")?,
            },
            accuracy_floor,
            tolerance,
            ack_wait: secs(&lookup, "TRAINER_ACK_WAIT_SECS", 60.0)?,
            max_deliver,
            retry_delay: secs(&lookup, "TRAINER_RETRY_DELAY_SECS", 15.0)?,
            progress_interval: secs(&lookup, "TRAINER_PROGRESS_SECS", 2.0)?,
            threads,
            metrics_addr,
            progress_bar: var_or(&lookup, "TRAINER_PROGRESS_BAR", ProgressBar::Auto)?,
            signing_key: match var::<PathBuf>(&lookup, "TRAINER_SIGNING_KEY")? {
                None => None,
                Some(path) => Some(Arc::new(
                    SigningKey::read(&path).map_err(|e| ConfigError::new("TRAINER_SIGNING_KEY", e.to_string()))?,
                )),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn defaults_are_the_seed_run_as_a_worker() {
        let c = Config::from_lookup(|_| None).unwrap();
        assert_eq!(c.mode, Mode::Worker);
        assert_eq!(c.defaults.default_preset.epochs, 1);
        assert_eq!(c.defaults.default_preset.batch_size, 64);
        assert_eq!(c.defaults.device, DeviceChoice::Auto);
        assert!((c.accuracy_floor - 0.97).abs() < 1e-12);
        assert_eq!(c.ack_wait, Duration::from_secs(60));
        assert!(c.metrics_addr.is_some());
    }

    #[test]
    fn overrides_apply_and_metrics_can_be_disabled() {
        let c = Config::from_lookup(env(&[
            ("TRAINER_MODE", "job"),
            ("TRAINER_EPOCHS", "3"),
            ("TRAINER_OPTIMIZER", "adadelta"),
            ("TRAINER_DEVICE", "cpu"),
            ("TRAINER_METRICS_ADDR", ""),
            ("TRAINER_ACK_WAIT_SECS", "2.5"),
        ]))
        .unwrap();
        assert_eq!(c.mode, Mode::Job);
        assert_eq!(c.defaults.default_preset.epochs, 3);
        assert_eq!(c.defaults.default_preset.optimizer, OptimizerKind::Adadelta);
        assert_eq!(c.defaults.device, DeviceChoice::Cpu);
        assert_eq!(c.metrics_addr, None);
        assert_eq!(c.ack_wait, Duration::from_millis(2500));
    }

    #[test]
    fn bad_values_fail_naming_the_variable() {
        for (name, value) in [
            ("TRAINER_MODE", "daemon"),
            ("TRAINER_EPOCHS", "-1"),
            ("TRAINER_EPOCHS", "many"),
            ("TRAINER_BATCH_SIZE", "0"),
            ("TRAINER_LR", "-0.1"),
            ("TRAINER_OPTIMIZER", "adagrad"),
            ("TRAINER_DEVICE", "tpu"),
            ("TRAINER_ACCURACY_FLOOR", "1.5"),
            ("TRAINER_TOLERANCE", "x"),
            ("TRAINER_ACK_WAIT_SECS", "0"),
            ("TRAINER_METRICS_ADDR", "localhost"),
            ("TRAINER_THREADS", "-2"),
            ("TRAINER_PROGRESS_BAR", "sometimes"),
            ("TRAINER_MAX_DELIVER", "0"),
            ("TRAINER_PRECISION", "f8"),
        ] {
            let err = Config::from_lookup(env(&[(name, value)])).unwrap_err();
            assert_eq!(err.var, name, "{name}={value}: {err}");
        }
    }

    #[test]
    fn the_variable_list_names_exactly_what_is_read() {
        mnistflow_runtime::env::assert_lists_exactly(&Config::env_vars(), &[], |lookup| {
            Config::from_lookup(lookup).unwrap();
        });
    }
}
