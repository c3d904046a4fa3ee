//! Connection settings shared by every binary, read from the environment through
//! a lookup function so tests never touch the process environment.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `NATS_URL` | server URL(s), comma-separated | `nats://127.0.0.1:4222` |
//! | `NATS_USER` / `NATS_PASSWORD` | user/password auth | none |
//! | `NATS_TOKEN` | token auth | none |
//! | `NATS_CREDS` | path of a `.creds` file (NGS / decentralised auth) | none |
//! | `NATS_TLS_CA` | PEM file of the CA(s) that signed the server's certificate: TLS is then required and the server verified against it (name and chain) | none: plain `nats://`, or TLS verified against the system's roots for `tls://` URLs |
//! | `NATS_TLS_CERT` / `NATS_TLS_KEY` | PEM client certificate and key, for servers that verify clients (mutual TLS) | none |
//! | `NATS_PREFIX` | subject prefix | `mnist` |
//! | `NATS_CONNECT_TIMEOUT_SECS` | how long start-up keeps retrying an unreachable server | `60` |
//! | `NATS_STREAM_REPLICAS` | replicas of each JetStream stream (`1`, `3` or `5`; `3` on a three-server cluster) | `1` |
//! | `NATS_PUBLISH_RETRY_SECS` | how long a JetStream publish is retried (same `Nats-Msg-Id`) through a leader change | `30` |
//! | `NATS_RETAIN_SERVERS_ORDER` | connect to `NATS_URL`'s servers in the order given instead of at random | `false` |
//! | `NATS_SETUP` | this identity creates the streams and durable consumers at start-up; `false`: it waits for them (a least-privilege identity) | `true` |

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use async_nats::ServerAddr;
use secrecy::SecretString;

use crate::subjects::Subjects;

/// The subject prefix when `NATS_PREFIX` is unset.
pub const DEFAULT_PREFIX: &str = "mnist";
/// The server when `NATS_URL` is unset.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";
/// The most replicas JetStream allows for a stream.
pub const MAX_STREAM_REPLICAS: usize = 5;

/// A configuration variable with a bad value. The message names the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    pub var: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(var: impl Into<String>, message: impl Into<String>) -> Self {
        Self { var: var.into(), message: message.into() }
    }
}

/// Reads `name` through `lookup` and parses it; `Ok(None)` when unset or empty.
///
/// # Errors
/// The value does not parse; the error names the variable and the value.
pub fn var<T>(lookup: &impl Fn(&str) -> Option<String>, name: &str) -> Result<Option<T>, ConfigError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    match lookup(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(raw) => raw.parse().map(Some).map_err(|e| ConfigError::new(name, format!("cannot parse {raw:?}: {e}"))),
    }
}

/// Like [`var`] with a default for the unset case.
///
/// # Errors
/// The value does not parse.
pub fn var_or<T>(lookup: &impl Fn(&str) -> Option<String>, name: &str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    Ok(var(lookup, name)?.unwrap_or(default))
}

/// A boolean variable: `1/0`, `true/false`, `yes/no`, `on/off`.
///
/// # Errors
/// Any other value.
pub fn flag(lookup: &impl Fn(&str) -> Option<String>, name: &str, default: bool) -> Result<bool, ConfigError> {
    match lookup(name).map(|v| v.trim().to_ascii_lowercase()).filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(v) => match v.as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(ConfigError::new(name, format!("expected true or false, got {v:?}"))),
        },
    }
}

/// A listening address (`host:port`) that may be switched off: unset means
/// `default`; empty, `off`, `none` or `false` mean `None` (nothing listens).
///
/// # Errors
/// Any other value that is not a socket address; the error names the variable.
pub fn listen_addr(
    lookup: &impl Fn(&str) -> Option<String>,
    name: &str,
    default: SocketAddr,
) -> Result<Option<SocketAddr>, ConfigError> {
    match lookup(name).map(|v| v.trim().to_owned()) {
        None => Ok(Some(default)),
        Some(v) if v.is_empty() || matches!(v.to_ascii_lowercase().as_str(), "off" | "none" | "false") => Ok(None),
        Some(v) => {
            v.parse().map(Some).map_err(|e| ConfigError::new(name, format!("{v:?} is not host:port or off: {e}")))
        }
    }
}

/// How to reach NATS.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub servers: Vec<ServerAddr>,
    pub subjects: Subjects,
    pub user: Option<String>,
    pub password: Option<SecretString>,
    pub token: Option<SecretString>,
    pub creds_file: Option<PathBuf>,
    /// CA bundle the server's certificate must chain to; `Some` requires TLS.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (mutual TLS).
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// How long [`crate::Bus::connect`] keeps retrying before giving up.
    pub connect_timeout: Duration,
    /// The client name shown in the server's monitoring.
    pub client_name: String,
    /// How many servers hold each stream: 1 on one server, 3 on a three-server
    /// cluster so that losing any one server loses no message and stops nothing.
    pub stream_replicas: usize,
    /// How long [`crate::Bus::publish`] keeps retrying a publish that got no
    /// acknowledgement: a stream's new leader is elected a few seconds after the
    /// old one died, and the retry carries the same `Nats-Msg-Id`, so it is stored
    /// once however many attempts reach the stream.
    pub publish_retry: Duration,
    /// Try the servers in `NATS_URL`'s order (a test pins a client to one server;
    /// in production random order spreads clients over the cluster).
    pub retain_servers_order: bool,
    /// Whether this identity sets up the streams and durable consumers
    /// (`NATS_SETUP`, default true). A least-privilege identity that may not
    /// create them (`false`) waits, up to `connect_timeout`, until the set-up
    /// identity (the promoter, the downloader, or a person's `admin`) has.
    pub setup: bool,
}

impl NatsConfig {
    /// Every variable [`NatsConfig::from_lookup`] reads.
    pub const ENV_VARS: &'static [&'static str] = &[
        "NATS_URL",
        "NATS_PREFIX",
        "NATS_USER",
        "NATS_PASSWORD",
        "NATS_TOKEN",
        "NATS_CREDS",
        "NATS_TLS_CA",
        "NATS_TLS_CERT",
        "NATS_TLS_KEY",
        "NATS_CONNECT_TIMEOUT_SECS",
        "NATS_STREAM_REPLICAS",
        "NATS_PUBLISH_RETRY_SECS",
        "NATS_RETAIN_SERVERS_ORDER",
        "NATS_SETUP",
    ];

    /// Settings for a server at `url` with defaults for everything else (tests, tools).
    ///
    /// # Errors
    /// `url` is not a NATS URL.
    pub fn for_url(url: &str) -> Result<Self, ConfigError> {
        Self::from_lookup(|k| (k == "NATS_URL").then(|| url.to_owned()))
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
        let raw = lookup("NATS_URL").filter(|v| !v.trim().is_empty()).unwrap_or_else(|| DEFAULT_URL.to_owned());
        let servers = raw
            .split(',')
            .map(|s| parse_server(s.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError::new("NATS_URL", e))?;
        let prefix = lookup("NATS_PREFIX").unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
        let subjects = Subjects::new(prefix.trim()).map_err(|e| ConfigError::new("NATS_PREFIX", e))?;
        let secret = |name: &str| lookup(name).filter(|v| !v.is_empty()).map(SecretString::from);
        let user = lookup("NATS_USER").filter(|v| !v.is_empty());
        let password = secret("NATS_PASSWORD");
        if user.is_some() != password.is_some() {
            return Err(ConfigError::new("NATS_USER", "NATS_USER and NATS_PASSWORD must be set together"));
        }
        let token = secret("NATS_TOKEN");
        let creds_file: Option<PathBuf> = lookup("NATS_CREDS").filter(|v| !v.is_empty()).map(PathBuf::from);
        if let Some(path) = &creds_file
            && !path.is_file()
        {
            return Err(ConfigError::new("NATS_CREDS", format!("{} is not a readable file", path.display())));
        }
        let file = |name: &str| -> Result<Option<PathBuf>, ConfigError> {
            match lookup(name).filter(|v| !v.trim().is_empty()).map(PathBuf::from) {
                Some(path) if !path.is_file() => {
                    Err(ConfigError::new(name, format!("{} is not a readable file", path.display())))
                }
                other => Ok(other),
            }
        };
        let tls_ca = file("NATS_TLS_CA")?;
        let tls_client = match (file("NATS_TLS_CERT")?, file("NATS_TLS_KEY")?) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err(ConfigError::new("NATS_TLS_CERT", "NATS_TLS_CERT and NATS_TLS_KEY must be set together")),
        };
        let secs: f64 = var_or(&lookup, "NATS_CONNECT_TIMEOUT_SECS", 60.0)?;
        if !(secs.is_finite() && secs >= 0.0) {
            return Err(ConfigError::new("NATS_CONNECT_TIMEOUT_SECS", "must be a non-negative number of seconds"));
        }
        let stream_replicas: usize = var_or(&lookup, "NATS_STREAM_REPLICAS", 1)?;
        if !(1..=MAX_STREAM_REPLICAS).contains(&stream_replicas) {
            return Err(ConfigError::new(
                "NATS_STREAM_REPLICAS",
                format!("must be between 1 and {MAX_STREAM_REPLICAS} (JetStream's limit), got {stream_replicas}"),
            ));
        }
        let retry: f64 = var_or(&lookup, "NATS_PUBLISH_RETRY_SECS", 30.0)?;
        if !(retry.is_finite() && retry >= 0.0) {
            return Err(ConfigError::new("NATS_PUBLISH_RETRY_SECS", "must be a non-negative number of seconds"));
        }
        let retain_servers_order = flag(&lookup, "NATS_RETAIN_SERVERS_ORDER", false)?;
        let setup = flag(&lookup, "NATS_SETUP", true)?;
        Ok(Self {
            servers,
            subjects,
            user,
            password,
            token,
            creds_file,
            tls_ca,
            tls_client,
            connect_timeout: Duration::from_secs_f64(secs),
            client_name: "mnistflow".to_owned(),
            stream_replicas,
            publish_retry: Duration::from_secs_f64(retry),
            retain_servers_order,
            setup,
        })
    }

    /// Sets the client name shown in the server's monitoring (`mnistflow-trainer`, ...).
    #[must_use]
    pub fn with_client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = name.into();
        self
    }
}

fn parse_server(s: &str) -> Result<ServerAddr, String> {
    if s.is_empty() {
        return Err("empty server address".into());
    }
    let addr = ServerAddr::from_str(s).map_err(|e| format!("{s:?} is not a NATS URL: {e}"))?;
    if addr.host().is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    match addr.as_url_str().split("://").next() {
        Some("nats" | "tls" | "ws" | "wss") => Ok(addr),
        _ => Err(format!("{s:?}: unsupported scheme (use nats://, tls://, ws:// or wss://)")),
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
        let c = NatsConfig::from_lookup(|_| None).unwrap();
        assert_eq!(c.servers.len(), 1);
        assert_eq!(c.subjects.prefix(), "mnist");
        assert_eq!(c.connect_timeout, Duration::from_secs(60));
        assert_eq!(c.stream_replicas, 1);
        assert_eq!(c.publish_retry, Duration::from_secs(30));
        assert!(!c.retain_servers_order);
    }

    #[test]
    fn a_cluster_is_three_urls_and_three_replicas() {
        let c = NatsConfig::from_lookup(env(&[
            (
                "NATS_URL",
                "nats://nats-0.nats-headless:4222,nats://nats-1.nats-headless:4222, nats://nats-2.nats-headless:4222",
            ),
            ("NATS_STREAM_REPLICAS", "3"),
            ("NATS_PUBLISH_RETRY_SECS", "2.5"),
            ("NATS_RETAIN_SERVERS_ORDER", "true"),
        ]))
        .unwrap();
        assert_eq!(c.servers.len(), 3);
        assert_eq!(c.servers[2].host(), "nats-2.nats-headless");
        assert_eq!(c.stream_replicas, 3);
        assert_eq!(c.publish_retry, Duration::from_millis(2500));
        assert!(c.retain_servers_order);
    }

    #[test]
    fn bad_cluster_settings_are_rejected_naming_the_variable() {
        for (var, bad) in [
            ("NATS_STREAM_REPLICAS", "0"),
            ("NATS_STREAM_REPLICAS", "6"),
            ("NATS_STREAM_REPLICAS", "three"),
            ("NATS_PUBLISH_RETRY_SECS", "-1"),
            ("NATS_RETAIN_SERVERS_ORDER", "sometimes"),
        ] {
            let err = NatsConfig::from_lookup(env(Box::leak(Box::new([(var, bad)])))).unwrap_err();
            assert_eq!(err.var, var, "{var}={bad}: {err}");
        }
    }

    #[test]
    fn tls_files_must_exist_and_a_client_certificate_needs_its_key() {
        let err = NatsConfig::from_lookup(env(&[("NATS_TLS_CA", "/no/such/ca.pem")])).unwrap_err();
        assert_eq!(err.var, "NATS_TLS_CA");
        let err = NatsConfig::from_lookup(env(&[("NATS_TLS_CERT", "Cargo.toml")])).unwrap_err();
        assert_eq!(err.var, "NATS_TLS_CERT");
        let c =
            NatsConfig::from_lookup(env(&[("NATS_TLS_CERT", "Cargo.toml"), ("NATS_TLS_KEY", "Cargo.toml")])).unwrap();
        assert!(c.tls_client.is_some() && c.tls_ca.is_none());
    }

    #[test]
    fn malformed_nats_url_is_rejected_naming_the_variable() {
        for bad in ["http://x:4222", "nats://", "nats://host:notaport", " , "] {
            let err = NatsConfig::from_lookup(env(Box::leak(Box::new([("NATS_URL", bad)])))).unwrap_err();
            assert_eq!(err.var, "NATS_URL", "{bad}: {err}");
            assert!(err.to_string().starts_with("NATS_URL: "), "{err}");
        }
    }

    #[test]
    fn user_without_password_and_bad_prefix_are_rejected() {
        let err = NatsConfig::from_lookup(env(&[("NATS_USER", "a")])).unwrap_err();
        assert_eq!(err.var, "NATS_USER");
        let err = NatsConfig::from_lookup(env(&[("NATS_PREFIX", "a.*")])).unwrap_err();
        assert_eq!(err.var, "NATS_PREFIX");
        let err = NatsConfig::from_lookup(env(&[("NATS_CONNECT_TIMEOUT_SECS", "soon")])).unwrap_err();
        assert_eq!(err.var, "NATS_CONNECT_TIMEOUT_SECS");
    }

    #[test]
    fn flags_parse_and_reject_nonsense() {
        let l = env(&[("A", "yes"), ("B", "0"), ("C", "maybe")]);
        assert!(flag(&l, "A", false).unwrap());
        assert!(!flag(&l, "B", true).unwrap());
        assert!(flag(&l, "D", true).unwrap());
        assert_eq!(flag(&l, "C", true).unwrap_err().var, "C");
    }
}
