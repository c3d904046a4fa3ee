//! The downloader stage (DESIGN.md): fetches MNIST from an ordered list of
//! mirrors, verifies every file (SHA-256 of the decompressed content, IDX
//! header, MNIST shape), stores the data set once under a content-addressed id
//! with its manifest written last, and announces it: `dataset.ready`, then
//! `train.request`. Runs once (a Kubernetes Job) or as a service acting on each
//! `dataset.download` command.
//!
//! Parts:
//! - [`config`]: `DOWNLOADER_*` settings, read through a lookup function.
//! - [`verify`]: the four files, their known checksums, one-pass verification, the content address.
//! - [`fetch`]: mirrors, retries with backoff and jitter, `Range` resumption, `file://` mirrors.
//! - [`stage`]: the [`Downloader`]: obtain (reuse or download + store), announce, report failures.
//! - [`service`]: the work-queue loop of service mode.
//! - [`metrics`]: Prometheus metrics and `/healthz`, `/readyz`, `/metrics`.

pub mod config;
mod error;
pub mod fetch;
pub mod metrics;
pub mod service;
pub mod stage;
pub mod verify;

use std::sync::Arc;

use anyhow::Context;
use mnistflow_nats::Bus;
use mnistflow_store::Store;
use tokio_util::sync::CancellationToken;

pub use config::{Config, Mode};
pub use error::DownloadError;
pub use metrics::Metrics;
pub use service::ServiceOptions;
pub use stage::{Downloader, Obtained, Origin};

/// The binary's resources: opens the store, connects to NATS, makes sure the
/// streams exist, then [`run`]s.
///
/// # Errors
/// Start-up failed (store URL, NATS unreachable), or as [`run`].
pub async fn main_with(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = Store::open(&config.store_url)?;
    let bus = Bus::connect(&config.nats, &shutdown).await?;
    bus.ensure_streams().await?;
    run(config, bus, store, shutdown).await
}

/// The stage on its resources (`mnistflow up` hands every stage the same bus and
/// store): runs in the configured mode until `shutdown` (service) or after one
/// download (once).
///
/// # Errors
/// The metrics address is taken, the work queue cannot be bound, or in `once`
/// mode the download failed (already announced as `dataset.failed`).
pub async fn run(config: Config, bus: Bus, store: Store, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let downloader = Downloader::new(&config, store, bus.clone(), metrics.clone())?;
    match config.mode {
        Mode::Once => {
            downloader.run_once(&shutdown).await?;
            Ok(())
        }
        Mode::Service => {
            let service = service::run(&downloader, ServiceOptions::from(&config), shutdown.clone());
            let Some(addr) = config.metrics_addr else {
                return Ok(service.await?);
            };
            let server = metrics::serve(addr, metrics, bus.clone(), shutdown.clone())
                .await
                .with_context(|| format!("DOWNLOADER_METRICS_ADDR {addr}"))?;
            tracing::info!(addr = %server.addr, "Health and metrics served.");
            tokio::select! {
                r = service => Ok(r?),
                r = server.task => match r {
                    Ok(Ok(())) if shutdown.is_cancelled() => Ok(()),
                    Ok(Ok(())) => Err(anyhow::anyhow!("the metrics server stopped")),
                    Ok(Err(e)) => Err(e).with_context(|| format!("DOWNLOADER_METRICS_ADDR {addr}")),
                    Err(e) => Err(anyhow::anyhow!("the metrics server panicked: {e}")),
                },
            }
        }
    }
}
