//! mnistflow's web tier: the page people use, a stateless Rocket service that
//! talks only NATS (no store, no libtorch), so any number of replicas can sit
//! behind one load balancer.
//!
//! - [`config`]: `WEB_*` settings.
//! - `page`: `GET /` (one HTML page with its script, style and icon embedded in
//!   the binary), `/api/config`, `/healthz`, `/readyz`.
//! - `metrics`: Prometheus metrics, served by [`start`] on a listener of its own
//!   (`WEB_METRICS_ADDR`), off the public port.
//! - `predict`: `POST /api/predict`, forwarded as a NATS request to
//!   `<prefix>.predict` (queue group `inference`).
//! - [`events`]: `GET /api/events`, Server-Sent Events replaying the JetStream
//!   events stream and then following it live.
//! - `admin`: `POST /api/admin/{download,train,promote}`, behind `WEB_ADMIN_TOKEN`.
//! - `feedback`: `POST /api/feedback`, published as `<prefix>.feedback.submitted`
//!   (trusted with `WEB_LABELLER_TOKEN`, unverified without).
//! - `security`: security headers (a strict CSP the page satisfies) on every answer.
//! - `error`: the one mapping from failures to JSON error answers.
//!
//! [`build`] assembles the Rocket instance from its resources (tests use it with
//! Rocket's local client); [`start`] binds and serves it until shutdown.

mod admin;
pub mod config;
mod error;
pub mod events;
mod feedback;
pub mod lockout;
mod metrics;
mod page;
mod predict;
mod security;

use std::net::SocketAddr;
use std::sync::Arc;

use mnistflow_nats::Bus;
use mnistflow_runtime::http::{self, ServeError, Served};
use rocket::config::Ident;
use rocket::data::{Limits, ToByteUnit};
use rocket::{Build, Rocket, catchers, routes};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use admin::token_matches;
pub use config::Config;
pub use error::ApiError;
pub use metrics::Metrics;
pub use security::CONTENT_SECURITY_POLICY;

/// What every route shares.
pub(crate) struct AppState {
    pub(crate) config: Config,
    pub(crate) bus: Bus,
    pub(crate) metrics: Arc<Metrics>,
    /// One permit per open event stream.
    pub(crate) event_streams: Arc<tokio::sync::Semaphore>,
    /// Wrong admin tokens per client.
    pub(crate) admin_lockout: lockout::AdminLockout,
    /// One permit per prediction in flight (`WEB_MAX_PREDICTIONS`).
    pub(crate) predictions: Arc<tokio::sync::Semaphore>,
}

/// Why the web tier could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("web server: {0}")]
    Serve(#[from] ServeError),
    #[error("web server task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Rocket's settings: the shared start-up's ([`http::config`]) with our
/// address, grace period and body limits.
fn rocket_config(config: &Config, addr: SocketAddr) -> rocket::Config {
    let mut rc = http::config(addr, config.shutdown_grace);
    rc.shutdown.mercy = 2;
    let max = config.max_upload_bytes;
    rc.limits = Limits::default()
        .limit("json", 16.kibibytes())
        .limit("string", 16.kibibytes())
        .limit("form", 16.kibibytes())
        .limit("data-form", max.bytes())
        .limit("file", max.bytes())
        .limit("bytes", max.bytes());
    rc.ident = Ident::none();
    // Behind a TCP load balancer no proxy sets X-Real-IP; a client could forge it.
    rc.ip_header = None;
    rc
}

/// Assembles the public service: routes, catchers, security headers, metrics
/// counting (not serving: see [`start`]).
pub fn build(config: Config, bus: Bus) -> Rocket<Build> {
    build_with(config, bus, Arc::new(Metrics::default()))
}

fn build_with(config: Config, bus: Bus, metrics: Arc<Metrics>) -> Rocket<Build> {
    let rocket_config = rocket_config(&config, SocketAddr::new(config.address, config.port));
    let event_streams = Arc::new(tokio::sync::Semaphore::new(config.max_event_streams));
    let admin_lockout = lockout::AdminLockout::new(config.admin_max_failures, config.admin_lockout);
    let predictions = Arc::new(tokio::sync::Semaphore::new(config.max_predictions));
    let state = AppState { config, bus, metrics, event_streams, admin_lockout, predictions };
    rocket::custom(rocket_config)
        .manage(state)
        .mount(
            "/",
            routes![
                page::index,
                page::app_js,
                page::app_css,
                page::favicon,
                page::config,
                page::healthz,
                page::readyz,
                page::csp_report,
                predict::predict,
                events::events,
                admin::download,
                admin::train,
                admin::promote,
                feedback::feedback,
                feedback::delete_feedback,
            ],
        )
        .register("/", catchers![error::default_catcher])
        .attach(security::SecurityHeaders)
        .attach(metrics::HttpMetrics)
}

/// A running web server: the public listener and, unless switched off, the
/// metrics listener.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    task: JoinHandle<Result<(), ServeError>>,
    metrics_task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Server {
    /// The address it listens on (the real port when `WEB_PORT=0`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `/metrics` is served (the real port when `WEB_METRICS_ADDR`'s is 0),
    /// or `None` when metrics are switched off.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Waits until the server has stopped (after shutdown and the grace period).
    ///
    /// # Errors
    /// The server failed while running.
    pub async fn wait(self) -> Result<(), WebError> {
        let result = self.task.await?;
        if let Some(task) = self.metrics_task {
            task.await??;
        }
        Ok(result?)
    }
}

/// Binds `config.address:config.port` (and `config.metrics_addr`) and serves
/// until `shutdown` is cancelled.
///
/// # Errors
/// An address cannot be bound or Rocket refused its configuration.
pub async fn start(config: Config, bus: Bus, shutdown: CancellationToken) -> Result<Server, WebError> {
    let metrics = Arc::new(Metrics::default());
    // Its own token, so that it also stops when the public listener fails to start.
    let metrics_shutdown = shutdown.child_token();
    let metrics_listener = match config.metrics_addr {
        None => None,
        Some(addr) => {
            let rocket =
                rocket::custom(rocket_config(&config, addr)).manage(metrics.clone()).mount("/", metrics::routes());
            let Served { addr, task } = http::launch(rocket, metrics_shutdown.clone()).await?;
            info!(%addr, "Web tier metrics listening.");
            Some((addr, task))
        }
    };
    let Served { addr, task } =
        http::launch(build_with(config, bus, metrics), shutdown).await.inspect_err(|_| metrics_shutdown.cancel())?;
    info!(%addr, "Web tier listening.");
    let (metrics_addr, metrics_task) = metrics_listener.unzip();
    Ok(Server { addr, metrics_addr, task, metrics_task })
}

/// The binary's body: connect to NATS, make sure the streams exist, serve until shutdown.
///
/// # Errors
/// NATS unreachable, or the server could not start.
pub async fn main_with(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let bus = Bus::connect(&config.nats, &shutdown).await?;
    bus.ensure_streams().await?;
    run(config, bus, shutdown).await
}

/// The stage on its resources (`mnistflow up` hands every stage the same bus):
/// serves until `shutdown` and the grace period.
///
/// # Errors
/// The server could not start or failed.
pub async fn run(config: Config, bus: Bus, shutdown: CancellationToken) -> anyhow::Result<()> {
    let server = start(config, bus, shutdown.clone()).await?;
    server.wait().await?;
    info!("Web tier stopped.");
    Ok(())
}
