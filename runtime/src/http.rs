//! The Rocket start-up every HTTP listener shares: release defaults (no
//! `Rocket.toml`, no `ROCKET_*` variables), the address from our own `Config`,
//! Rocket's log and signal handling off (our tracing and our shutdown token own
//! them), a graceful stop when the token fires, and the bound address reported
//! (port 0 picks a free one). Plus the OpenMetrics answer of every `/metrics`.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use rocket::fairing::AdHoc;
use rocket::http::ContentType;
use rocket::response::{self, Responder};
use rocket::{Build, Request, Rocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Why a listener could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Rocket refused its configuration or could not bind (its error as text:
    /// a `rocket::Error` dropped unexamined panics).
    #[error("{0}")]
    Rocket(String),
    #[error("the server stopped before it listened")]
    NotStarted,
    #[error("the server task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl From<rocket::Error> for ServeError {
    fn from(e: rocket::Error) -> Self {
        Self::Rocket(e.to_string())
    }
}

/// Rocket's settings for a listener on `addr`: release defaults, logging off,
/// no colours, signals ignored, `grace` (at least a second) for in-flight
/// requests and a mercy of one second. Callers change fields as they need
/// (limits, workers, the `Server` header).
pub fn config(addr: SocketAddr, grace: Duration) -> rocket::Config {
    let mut config = rocket::Config::release_default();
    config.address = addr.ip();
    config.port = addr.port();
    config.log_level = rocket::config::LogLevel::Off;
    config.cli_colors = false;
    config.shutdown.ctrlc = false;
    #[cfg(unix)]
    config.shutdown.signals.clear();
    config.shutdown.grace = u32::try_from(grace.as_secs()).unwrap_or(u32::MAX).max(1);
    config.shutdown.mercy = 1;
    config
}

/// A launched listener.
#[derive(Debug)]
pub struct Served {
    /// The address it bound (the real port when asked for port 0).
    pub addr: SocketAddr,
    /// Ends when the server has stopped (after the shutdown token fired and the grace period).
    pub task: JoinHandle<Result<(), ServeError>>,
}

/// Ignites and launches `rocket`, asking it to stop when `shutdown` fires;
/// returns once it listens.
///
/// # Errors
/// The configuration is refused or the address cannot be bound.
pub async fn launch(rocket: Rocket<Build>, shutdown: CancellationToken) -> Result<Served, ServeError> {
    let (tx, rx) = oneshot::channel::<SocketAddr>();
    let tx = Mutex::new(Some(tx));
    let rocket = rocket.attach(AdHoc::on_liftoff("Report the address", move |rocket| {
        let addr = SocketAddr::new(rocket.config().address, rocket.config().port);
        if let Some(tx) = tx.lock().ok().and_then(|mut t| t.take()) {
            let _ = tx.send(addr);
        }
        Box::pin(async {})
    }));
    let rocket = rocket.ignite().await?;
    let handle = rocket.shutdown();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        handle.notify();
    });
    let task = tokio::spawn(async move {
        rocket.launch().await?;
        Ok(())
    });
    match rx.await {
        Ok(addr) => Ok(Served { addr, task }),
        Err(_) => match task.await? {
            Err(e) => Err(e),
            Ok(()) => Err(ServeError::NotStarted),
        },
    }
}

/// A `/metrics` answer: the OpenMetrics text exposition with its content type.
#[derive(Debug)]
pub struct OpenMetrics(pub String);

impl<'r> Responder<'r, 'static> for OpenMetrics {
    fn respond_to(self, req: &'r Request<'_>) -> response::Result<'static> {
        let content_type = ContentType::new("application", "openmetrics-text")
            .with_params([("version", "1.0.0"), ("charset", "utf-8")]);
        (content_type, self.0).respond_to(req)
    }
}

/// `/healthz` of a stage whose only dependency is NATS (the promoter, the feedback
/// stage): the process answers.
#[rocket::get("/healthz")]
pub fn healthz() -> &'static str {
    "ok"
}

/// `/readyz` of such a stage: ready while its NATS connection is up (the [`Bus`] in
/// Rocket's managed state).
///
/// [`Bus`]: mnistflow_nats::Bus
#[rocket::get("/readyz")]
pub fn readyz(bus: &rocket::State<mnistflow_nats::Bus>) -> (rocket::http::Status, &'static str) {
    match bus.client().connection_state() {
        mnistflow_nats::async_nats::connection::State::Connected => (rocket::http::Status::Ok, "ready"),
        _ => (rocket::http::Status::ServiceUnavailable, "NATS disconnected"),
    }
}
