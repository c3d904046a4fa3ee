//! The inference stage: Rocket and NATS predictions through one micro-batcher,
//! served by a TorchScript model that is hot-reloaded from the store.
//!
//! Parts:
//! - [`config`]: `INFERENCE_*` settings ([`Config::from_lookup`]).
//! - [`preprocess`]: decoding with limits and MNIST-style normalisation of real uploads.
//! - [`model`]: a loaded, warmed-up model and the [`model::ModelSlot`] it is swapped into.
//! - [`batcher`]: the bounded queue and the compute thread running batched forward passes.
//! - [`service`]: what both APIs share, and the status of every failure.
//! - [`http`]: the Rocket API; [`nats_api`]: `mnist.predict` in queue group `inference`.
//! - [`reload`]: following `CURRENT` (or a pinned version), verify, warm up, swap.
//! - [`promoter`]: the `model.promote` command consumer.
//! - [`retention`]: pruning old model versions and events, where the promoter runs.
//! - [`metrics`]: Prometheus metrics.
//!
//! [`App::start`] wires them; `main.rs` only adds telemetry, configuration and signals.

pub mod batcher;
pub mod config;
pub mod http;
pub mod metrics;
pub mod model;
pub mod nats_api;
pub mod preprocess;
pub mod promoter;
pub mod reload;
pub mod retention;
pub mod service;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use mnistflow_nats::Bus;
use mnistflow_store::Store;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub use config::Config;
pub use service::Service;

use crate::batcher::Batcher;
use crate::metrics::Metrics;
use crate::model::ModelSlot;

/// A running inference instance.
pub struct App {
    http_addr: SocketAddr,
    service: Arc<Service>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    nats: tokio::task::JoinHandle<Result<(), mnistflow_nats::BusError>>,
    tracker: TaskTracker,
    compute: JoinHandle<()>,
    config: Config,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("http_addr", &self.http_addr).finish_non_exhaustive()
    }
}

impl App {
    /// Starts everything: the compute thread, the model reloader, the promoter,
    /// `mnist.predict`, and the HTTP server; returns once the server listens.
    /// Everything stops when `shutdown` is cancelled; then call [`App::wait`].
    ///
    /// # Errors
    /// The streams cannot be ensured, a subscription fails, or the server cannot bind.
    pub async fn start(config: Config, bus: Bus, store: Store, shutdown: CancellationToken) -> anyhow::Result<Self> {
        bus.ensure_streams().await?;
        let slot = Arc::new(ModelSlot::default());
        let metrics = Metrics::new();
        let (batcher, compute) = Batcher::start(config.batch, slot.clone(), metrics.clone(), config.request_timeout)
            .context("starting the compute thread")?;
        let service = Arc::new(Service {
            batcher,
            slot: slot.clone(),
            metrics: metrics.clone(),
            limits: config.limits,
            store: store.clone(),
            instance: config.instance.clone(),
            pinned: config.pinned_version.clone(),
            decode_budget: preprocess::DecodeBudget::new(config.limits.decode_budget_bytes),
        });
        let tracker = TaskTracker::new();
        let reloader = reload::Reloader {
            store: store.clone(),
            bus: bus.clone(),
            slot,
            metrics,
            instance: config.instance.clone(),
            pinned: config.pinned_version.clone(),
            poll: config.poll,
            precision: config.precision,
            max_model_bytes: config.max_model_bytes,
            keyring: config.keyring.clone(),
        };
        tracker.spawn(reloader.run(shutdown.clone()));
        if config.promoter {
            if let Some(retention) = config.retention.clone() {
                let stage = config.instance.clone();
                tracker.spawn(retention::run(retention, bus.clone(), store.clone(), stage, shutdown.clone()));
            }
            let (bus, store, shutdown) = (bus.clone(), store.clone(), shutdown.clone());
            let key = config.signing_key.clone();
            let stage = config.instance.clone();
            tracker.spawn(async move {
                if let Err(e) = promoter::run(bus, store, key, stage, shutdown).await {
                    error!(error = %e, "The model.promote consumer stopped.");
                }
            });
        }
        let nats = tokio::spawn(nats_api::serve(
            bus.clone(),
            service.clone(),
            config.batch.queue_capacity,
            tracker.clone(),
            shutdown.clone(),
        ));

        let served =
            match mnistflow_runtime::http::launch(http::rocket(service.clone(), &config), shutdown.clone()).await {
                Ok(served) => served,
                Err(e) => {
                    shutdown.cancel();
                    return Err(anyhow::Error::new(e).context("HTTP server"));
                }
            };
        let http_addr = served.addr;
        let server = tokio::spawn(async move {
            served.task.await.map_err(|e| anyhow::anyhow!("HTTP server task: {e}"))?.context("HTTP server")
        });
        info!(
            %http_addr,
            instance = %config.instance,
            pinned = ?config.pinned_version,
            precision = %config.precision,
            "Inference serving."
        );
        Ok(Self { http_addr, service, server, nats, tracker, compute, config, shutdown })
    }

    /// Where the HTTP API listens (the real port when configured with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The shared state (tests inspect the slot and the metrics).
    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    /// Waits for shutdown, then drains: HTTP stops accepting and answers its
    /// in-flight requests (Rocket's grace period), NATS unsubscribes and its taken
    /// requests finish, the compute thread answers everything queued; all within
    /// `INFERENCE_DRAIN_SECS`.
    ///
    /// # Errors
    /// The HTTP server failed.
    pub async fn wait(self) -> anyhow::Result<()> {
        let Self { server, nats, tracker, compute, config, shutdown, service, .. } = self;
        let served = server.await;
        // Whatever ended the server ends the rest.
        shutdown.cancel();
        let deadline = tokio::time::Instant::now() + config.drain;
        match tokio::time::timeout_at(deadline, nats).await {
            Ok(Ok(Err(e))) => warn!(error = %e, "NATS predictions had stopped with an error."),
            Ok(_) => {}
            Err(_) => warn!("NATS subscription did not stop within the drain deadline."),
        }
        tracker.close();
        if tokio::time::timeout_at(deadline, tracker.wait()).await.is_err() {
            warn!("In-flight NATS requests did not finish within the drain deadline.");
        }
        drop(service);
        let joined = tokio::time::timeout_at(deadline, tokio::task::spawn_blocking(move || compute.join())).await;
        if joined.is_err() {
            warn!("The compute thread did not stop within the drain deadline.");
        }
        info!("Inference stopped.");
        served?
    }
}

/// Connects to NATS and the store, runs until `shutdown`, drains.
///
/// # Errors
/// NATS unreachable, the store URL unsupported, or the server failed.
pub async fn main_with(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = Store::open(&config.store_url)?;
    let bus = Bus::connect(&config.nats, &shutdown).await?;
    run(config, bus, store, shutdown).await
}

/// The stage on its resources (`mnistflow up` hands every stage the same bus and
/// store): serves (or, with `INFERENCE_ROLE=promoter`, promotes) until
/// `shutdown`, then drains.
///
/// # Errors
/// As [`App::start`] and [`App::wait`], or [`promoter::serve`].
pub async fn run(config: Config, bus: Bus, store: Store, shutdown: CancellationToken) -> anyhow::Result<()> {
    if config.role == config::Role::Promoter {
        return promoter::serve(config, bus, store, shutdown).await;
    }
    App::start(config, bus, store, shutdown).await?.wait().await
}
