//! The web tier's configuration, read from `WEB_*` variables (plus the shared `NATS_*`).
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `WEB_ADDRESS` | address to listen on | `0.0.0.0` |
//! | `WEB_PORT` | port to listen on (`0`: any free port, reported at start) | `8080` |
//! | `WEB_METRICS_ADDR` | `host:port` of `/metrics` (Prometheus), kept off the public port; empty or `off` disables | `0.0.0.0:9102` |
//! | `WEB_PREDICT_TIMEOUT_MS` | how long a prediction may wait for an inference instance, retries included | `5000` |
//! | `WEB_PREDICT_ATTEMPT_TIMEOUT_MS` | how long one attempt waits before it is sent again (within the timeout above) | `2000` |
//! | `WEB_MAX_UPLOAD_BYTES` | largest accepted upload (NATS' default `max_payload` is 1 MiB) | `1048576` |
//! | `WEB_MAX_PREDICTIONS` | predictions in flight at once, uploads being read included; more get 503 with `Retry-After` | `64` |
//! | `WEB_UPLOAD_TIMEOUT_MS` | how long an upload's body may take to arrive (a slow sender is cut off with 408: Rocket 0.5 has no read timeout of its own) | `10000` |
//! | `WEB_ADMIN_TOKEN` | enables the admin API and controls; at least 16 characters | unset (admin disabled) |
//! | `WEB_LABELLER_TOKEN` | trusted labellers send it with their feedback (`Authorization: Bearer`), which then counts as trusted; at least 16 characters | unset (all feedback unverified) |
//! | `WEB_ADMIN_MAX_FAILURES` | wrong admin tokens from one client before it is locked out (`lockout.rs`) | `5` |
//! | `WEB_ADMIN_LOCKOUT_SECS` | the window those failures are counted in, and how long a lockout lasts | `900` |
//! | `WEB_FORWARDED_FOR_HOPS` | trusted proxies appending to `X-Forwarded-For`: the client is that many entries from its right (`0`: the TCP peer; Google's Application Load Balancer: `2`) | `0` |
//! | `WEB_EVENTS_REPLAY` | how many recent events a new page replays (plus the last of each kind) | `1000` |
//! | `WEB_SSE_HEARTBEAT_SECS` | keep-alive comment interval on the event stream | `15` |
//! | `WEB_MAX_EVENT_STREAMS` | open event streams allowed at once (each holds a JetStream consumer); more get 503 | `1000` |
//! | `WEB_SHUTDOWN_GRACE_SECS` | how long open connections may finish after shutdown is requested | `5` |

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mnistflow_nats::NatsConfig;
use mnistflow_runtime::env::{self, ConfigError, listen_addr, positive, var_or};
use secrecy::{ExposeSecret, SecretString};

/// The shortest admin token accepted: a guessable token is worse than none.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;
/// The most events a page may ask to replay.
pub const MAX_EVENTS_REPLAY: usize = 10_000;

/// Everything the web tier reads from its environment.
#[derive(Debug, Clone)]
pub struct Config {
    pub nats: NatsConfig,
    pub address: IpAddr,
    pub port: u16,
    /// Where `/metrics` is served: a port of its own, never the page's public
    /// one (the LoadBalancer exposes only that); `None` serves no metrics.
    pub metrics_addr: Option<SocketAddr>,
    /// The page's deadline for a prediction, every retry included.
    pub predict_timeout: Duration,
    /// How long one attempt may wait for its reply before it is sent again: a
    /// reply routed through a NATS server that died never comes, and the
    /// prediction is idempotent, so a second attempt beats a 504.
    pub predict_attempt_timeout: Duration,
    pub max_upload_bytes: u64,
    /// Predictions in flight at once, from the first byte of the upload to the
    /// answer; more are answered 503 at once.
    pub max_predictions: usize,
    /// The deadline for reading an upload's body.
    pub upload_timeout: Duration,
    /// `None` disables the admin API entirely (its routes answer 404).
    pub admin_token: Option<SecretString>,
    /// Makes feedback that carries it trusted; `None`: all feedback is unverified.
    pub labeller_token: Option<SecretString>,
    /// Wrong admin tokens from one client before it is locked out.
    pub admin_max_failures: u32,
    /// The window failures are counted in, and the lockout's length.
    pub admin_lockout: Duration,
    /// Trusted proxies appending to `X-Forwarded-For` (0: the TCP peer is the client).
    pub forwarded_for_hops: usize,
    pub events_replay: usize,
    pub sse_heartbeat: Duration,
    pub max_event_streams: usize,
    pub shutdown_grace: Duration,
}

impl Config {
    /// The variables [`Config::from_lookup`] reads itself (the `NATS_*` ones are
    /// [`NatsConfig::ENV_VARS`]).
    pub const ENV_VARS: &'static [&'static str] = &[
        "WEB_ADDRESS",
        "WEB_PORT",
        "WEB_METRICS_ADDR",
        "WEB_PREDICT_TIMEOUT_MS",
        "WEB_PREDICT_ATTEMPT_TIMEOUT_MS",
        "WEB_MAX_UPLOAD_BYTES",
        "WEB_MAX_PREDICTIONS",
        "WEB_UPLOAD_TIMEOUT_MS",
        "WEB_ADMIN_TOKEN",
        "WEB_LABELLER_TOKEN",
        "WEB_ADMIN_MAX_FAILURES",
        "WEB_ADMIN_LOCKOUT_SECS",
        "WEB_FORWARDED_FOR_HOPS",
        "WEB_EVENTS_REPLAY",
        "WEB_SSE_HEARTBEAT_SECS",
        "WEB_MAX_EVENT_STREAMS",
        "WEB_SHUTDOWN_GRACE_SECS",
    ];

    /// Every variable this binary reads: the process's, NATS', its own
    /// (`--print-env-vars` prints them; `k8s/check` compares them with the manifests).
    pub fn env_vars() -> Vec<&'static str> {
        env::env_vars(&[env::PROCESS_VARS, NatsConfig::ENV_VARS, Self::ENV_VARS])
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
        let nats = NatsConfig::from_lookup(&lookup)?.with_client_name("mnistflow-web");
        let address: IpAddr = var_or(&lookup, "WEB_ADDRESS", IpAddr::from([0, 0, 0, 0]))?;
        let port: u16 = var_or(&lookup, "WEB_PORT", 8080)?;
        let metrics_addr = listen_addr(&lookup, "WEB_METRICS_ADDR", SocketAddr::from(([0, 0, 0, 0], 9102)))?;
        if metrics_addr.is_some_and(|m| {
            m.port() != 0
                && m.port() == port
                && (m.ip() == address || m.ip().is_unspecified() || address.is_unspecified())
        }) {
            return Err(ConfigError::new(
                "WEB_METRICS_ADDR",
                format!("must not be the page's public port {port}: metrics are kept off the load balancer"),
            ));
        }
        let timeout_ms: u64 = positive(&lookup, "WEB_PREDICT_TIMEOUT_MS", 5_000)?;
        let attempt_ms: u64 = positive(&lookup, "WEB_PREDICT_ATTEMPT_TIMEOUT_MS", 2_000)?;
        let max_upload_bytes: u64 = positive(&lookup, "WEB_MAX_UPLOAD_BYTES", 1_048_576)?;
        let max_predictions: usize = positive(&lookup, "WEB_MAX_PREDICTIONS", 64)?;
        let upload_ms: u64 = positive(&lookup, "WEB_UPLOAD_TIMEOUT_MS", 10_000)?;
        let admin_token = token(&lookup, "WEB_ADMIN_TOKEN")?;
        let labeller_token = token(&lookup, "WEB_LABELLER_TOKEN")?;
        let admin_max_failures: u32 = positive(&lookup, "WEB_ADMIN_MAX_FAILURES", 5)?;
        let admin_lockout_secs: u64 = positive(&lookup, "WEB_ADMIN_LOCKOUT_SECS", 900)?;
        let forwarded_for_hops: usize = var_or(&lookup, "WEB_FORWARDED_FOR_HOPS", 0)?;
        if forwarded_for_hops > 16 {
            return Err(ConfigError::new("WEB_FORWARDED_FOR_HOPS", "at most 16 trusted proxies"));
        }
        let events_replay: usize = var_or(&lookup, "WEB_EVENTS_REPLAY", 1_000)?;
        if events_replay > MAX_EVENTS_REPLAY {
            return Err(ConfigError::new("WEB_EVENTS_REPLAY", format!("at most {MAX_EVENTS_REPLAY}")));
        }
        let heartbeat: u64 = positive(&lookup, "WEB_SSE_HEARTBEAT_SECS", 15)?;
        let max_event_streams: usize = positive(&lookup, "WEB_MAX_EVENT_STREAMS", 1_000)?;
        let grace: u64 = var_or(&lookup, "WEB_SHUTDOWN_GRACE_SECS", 5)?;
        Ok(Self {
            nats,
            address,
            port,
            metrics_addr,
            predict_timeout: Duration::from_millis(timeout_ms),
            predict_attempt_timeout: Duration::from_millis(attempt_ms.min(timeout_ms)),
            max_upload_bytes,
            max_predictions,
            upload_timeout: Duration::from_millis(upload_ms),
            admin_token,
            labeller_token,
            admin_max_failures,
            admin_lockout: Duration::from_secs(admin_lockout_secs),
            forwarded_for_hops,
            events_replay,
            sse_heartbeat: Duration::from_secs(heartbeat),
            max_event_streams,
            shutdown_grace: Duration::from_secs(grace),
        })
    }

    /// Whether the admin API and controls are enabled.
    pub fn admin_enabled(&self) -> bool {
        self.admin_token.is_some()
    }
}

/// A secret token from `name`: unset or blank is `None`; a set one is at least
/// [`MIN_ADMIN_TOKEN_LEN`] characters without surrounding spaces.
fn token(lookup: &impl Fn(&str) -> Option<String>, name: &str) -> Result<Option<SecretString>, ConfigError> {
    let token = lookup(name).filter(|v| !v.trim().is_empty()).map(SecretString::from);
    if let Some(t) = &token {
        let t = t.expose_secret();
        if t.chars().count() < MIN_ADMIN_TOKEN_LEN || t.trim() != t {
            return Err(ConfigError::new(
                name,
                format!("must be at least {MIN_ADMIN_TOKEN_LEN} characters without surrounding spaces"),
            ));
        }
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let c = Config::from_lookup(|_| None).unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.metrics_addr, Some(SocketAddr::from(([0, 0, 0, 0], 9102))));
        assert_eq!(c.address.to_string(), "0.0.0.0");
        assert_eq!(c.predict_timeout, Duration::from_secs(5));
        assert_eq!(c.predict_attempt_timeout, Duration::from_secs(2));
        assert_eq!(c.max_upload_bytes, 1_048_576);
        assert_eq!(c.max_predictions, 64);
        assert_eq!(c.upload_timeout, Duration::from_secs(10));
        assert!(!c.admin_enabled());
        assert_eq!(c.nats.client_name, "mnistflow-web");
    }

    #[test]
    fn every_setting_is_read_from_its_variable() {
        let c = Config::from_lookup(env(&[
            ("WEB_ADDRESS", "127.0.0.1"),
            ("WEB_PORT", "0"),
            ("WEB_PREDICT_TIMEOUT_MS", "250"),
            ("WEB_MAX_UPLOAD_BYTES", "1000"),
            ("WEB_ADMIN_TOKEN", "0123456789abcdef"),
            ("WEB_EVENTS_REPLAY", "5"),
            ("WEB_SSE_HEARTBEAT_SECS", "2"),
            ("WEB_METRICS_ADDR", "127.0.0.1:9999"),
        ]))
        .unwrap();
        assert_eq!(c.address.to_string(), "127.0.0.1");
        assert_eq!(c.port, 0);
        assert_eq!(c.predict_timeout, Duration::from_millis(250));
        // An attempt never outlasts the whole deadline.
        assert_eq!(c.predict_attempt_timeout, Duration::from_millis(250));
        assert_eq!(c.max_upload_bytes, 1000);
        assert!(c.admin_enabled());
        assert_eq!(c.events_replay, 5);
        assert_eq!(c.sse_heartbeat, Duration::from_secs(2));
        assert_eq!(c.metrics_addr, Some(SocketAddr::from(([127, 0, 0, 1], 9999))));
        assert_eq!(Config::from_lookup(env(&[("WEB_METRICS_ADDR", "off")])).unwrap().metrics_addr, None);
    }

    #[test]
    fn malformed_values_are_rejected_naming_the_variable() {
        for (var, bad) in [
            ("WEB_ADDRESS", "localhost:80"),
            ("WEB_PORT", "70000"),
            ("WEB_PREDICT_TIMEOUT_MS", "0"),
            ("WEB_PREDICT_TIMEOUT_MS", "soon"),
            ("WEB_PREDICT_ATTEMPT_TIMEOUT_MS", "0"),
            ("WEB_MAX_UPLOAD_BYTES", "-1"),
            ("WEB_ADMIN_TOKEN", "short"),
            ("WEB_LABELLER_TOKEN", "short"),
            ("WEB_EVENTS_REPLAY", "100000"),
            ("WEB_SSE_HEARTBEAT_SECS", "0"),
            ("WEB_MAX_EVENT_STREAMS", "0"),
            ("WEB_MAX_PREDICTIONS", "0"),
            ("WEB_UPLOAD_TIMEOUT_MS", "0"),
            ("WEB_METRICS_ADDR", "9102"),
            ("WEB_METRICS_ADDR", "0.0.0.0:8080"),
        ] {
            let err = Config::from_lookup(env(&[(var, bad)])).unwrap_err();
            assert_eq!(err.var, var, "{var}={bad}: {err}");
        }
    }

    #[test]
    fn an_empty_admin_token_leaves_admin_disabled() {
        let c = Config::from_lookup(env(&[("WEB_ADMIN_TOKEN", "  ")])).unwrap();
        assert!(!c.admin_enabled());
    }

    #[test]
    fn the_variable_list_names_exactly_what_is_read() {
        mnistflow_runtime::env::assert_lists_exactly(&Config::env_vars(), &[], |lookup| {
            Config::from_lookup(lookup).unwrap();
        });
    }
}
