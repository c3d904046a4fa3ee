//! The `model.promote` command consumer (durable `promoter`, shared by every
//! instance so each command is handled once): point `CURRENT` at the version, then
//! ack. An unknown, uncommitted or corrupt version, or a command it cannot read
//! (a schema version newer than it reads), is terminated, logged and answered
//! with `command.rejected`, never acked as if it had worked; a store outage is
//! nak'ed for redelivery. Where retention is configured it runs beside it
//! ([`crate::retention`]).
//!
//! In Kubernetes it runs alone, in the promoter Deployment ([`serve`],
//! `INFERENCE_ROLE=promoter`): the serving pods mount the store read-only and
//! never write a model or `CURRENT`. Locally (`mnistflow up`, tests) every
//! inference instance also runs it (`INFERENCE_PROMOTER`, default true).
//!
//! With the model-signing key (`INFERENCE_SIGNING_KEY`) it first migrates the
//! store to signed versions, once ([`Store::sign_unsigned_versions`]): the
//! versions published before signing existed are signed, so that inference with a
//! keyring keeps serving them after the upgrade.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mnistflow_nats::events::Message;
use mnistflow_nats::work::{self, DeliveryKey, Handler, Outcome, Take, Work};
use mnistflow_nats::{Bus, BusError, CommandRejected, EventId, ModelPromote, WorkQueueOptions, schema};
use mnistflow_store::{SigningKey, Store, StoreError};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::Config;

/// The promoter process, on its bus (its own identity: it creates the streams
/// and consumers) and store: consumes `model.promote` until `shutdown`, and answers
/// `GET /healthz` and `GET /readyz` (NATS connected) on `INFERENCE_PORT`. No
/// model is loaded and no image is parsed here.
///
/// # Errors
/// The store URL is unsupported, NATS unreachable, set-up refused, or the HTTP
/// server cannot bind.
pub async fn serve(config: Config, bus: Bus, store: Store, shutdown: CancellationToken) -> anyhow::Result<()> {
    bus.ensure_streams().await?;
    if let Some(retention) = config.retention.clone() {
        tokio::spawn(crate::retention::run(retention, bus.clone(), store.clone(), STAGE.into(), shutdown.clone()));
    }
    let consumer = tokio::spawn(run(bus.clone(), store, config.signing_key.clone(), STAGE.into(), shutdown.clone()));
    let mut rc = mnistflow_runtime::http::config(SocketAddr::new(config.address, config.port), Duration::from_secs(1));
    rc.workers = 2;
    rc.ident = rocket::config::Ident::try_new("mnistflow-promoter").unwrap_or_default();
    let rocket = rocket::custom(rc)
        .manage(bus)
        .mount("/", rocket::routes![mnistflow_runtime::http::healthz, mnistflow_runtime::http::readyz]);
    let served = mnistflow_runtime::http::launch(rocket, shutdown.clone()).await;
    let served = match served {
        Ok(served) => {
            info!(addr = %served.addr, "Promoter serving.");
            served.task.await.map_err(|e| anyhow::anyhow!("HTTP server task: {e}")).and_then(|r| Ok(r?))
        }
        Err(e) => Err(anyhow::Error::new(e).context("HTTP server")),
    };
    shutdown.cancel();
    match tokio::time::timeout(config.drain, consumer).await {
        Ok(Ok(Err(e))) => error!(error = %e, "The model.promote consumer stopped."),
        Ok(_) => {}
        Err(_) => warn!("The model.promote consumer did not stop within the drain deadline."),
    }
    served
}

/// The stage name in the promoter Deployment's events.
const STAGE: &str = "promoter";

/// Signs the versions published before signing (once per store; with `key`),
/// then consumes `model.promote` until `shutdown`; a command it cannot read or
/// carry out is terminated and answered with `command.rejected` (`stage` names
/// this process in it).
///
/// # Errors
/// The work queue cannot be bound (stream missing).
pub async fn run(
    bus: Bus,
    store: Store,
    key: Option<Arc<SigningKey>>,
    stage: String,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    match key {
        Some(key) => migrate(&store, &key, &shutdown).await,
        None => warn!("INFERENCE_SIGNING_KEY is unset: versions published before signing are not migrated here."),
    }
    let options = WorkQueueOptions::default();
    let mut queue = bus.work_queue::<ModelPromote>(options).await?;
    let promoter = Promoter { store, bus, stage };
    let result = work::run(&mut queue, &promoter, options.ack_wait, Take::All, &shutdown).await;
    info!("Promoter stopped.");
    result.map(|_| ())
}

/// Signs the versions published before signing, retrying a store outage until
/// `shutdown` (the consumer starts meanwhile only after it: a promotion of an
/// old version then finds it signed).
async fn migrate(store: &Store, key: &SigningKey, shutdown: &CancellationToken) {
    loop {
        match store.sign_unsigned_versions(key).await {
            Ok(report) if report.already_done => {
                info!(key_id = key.key_id(), "Versions published before signing were migrated before.");
            }
            Ok(report) => {
                let signed: Vec<&str> = report.signed.iter().map(|v| v.as_str()).collect();
                let refused: Vec<&str> = report.refused.iter().map(|(v, _)| v.as_str()).collect();
                info!(key_id = key.key_id(), ?signed, ?refused, "Versions published before signing migrated.");
            }
            Err(e) => {
                warn!(error = %e, "Signing the versions published before signing failed; will retry.");
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                }
            }
        }
        return;
    }
}

struct Promoter {
    store: Store,
    bus: Bus,
    stage: String,
}

impl Promoter {
    /// Announces a terminated command; its id is derived from the delivery, so a
    /// repeat (a redelivery after a lost ack) is stored once.
    async fn reject(&self, key: &DeliveryKey, request_id: EventId, raw: Option<&[u8]>, reason: &str) {
        let event = CommandRejected {
            event_id: key.event_id("rejected"),
            command: ModelPromote::SUBJECT.into(),
            request_id: Some(request_id),
            command_schema_version: raw.and_then(schema::raw_version),
            stage: self.stage.clone(),
            reason: reason.to_owned(),
            at: chrono::Utc::now(),
        };
        if let Err(e) = self.bus.publish(&event).await {
            warn!(error = %e, "Could not announce the rejected command (command.rejected).");
        }
    }
}

impl Handler<ModelPromote> for Promoter {
    async fn handle(&self, work: Work<'_, ModelPromote>) -> Outcome {
        let span = info_span!("promote", key = %work.key, delivered = work.delivered);
        let version = work.command.version.clone();
        async {
            let promoted = {
                // Never alongside a retention pass, which must not delete this version.
                let _writes = crate::retention::STORE_WRITES.lock().await;
                self.store.promote(&version).await
            };
            match promoted {
                Ok(metadata) => {
                    let requested_by = &work.command.requested_by;
                    info!(%version, accuracy = metadata.metrics.accuracy, ?requested_by, "Promoted.");
                    crate::retention::record_promotion(&self.store, &version).await;
                    Outcome::Done
                }
                Err(e @ StoreError::Conflict { .. }) => {
                    // Store::promote already retried on fresh pointers: other
                    // promotions keep moving CURRENT; try again later.
                    warn!(%version, error = %e, "Promotion lost to concurrent promotions; will be redelivered.");
                    Outcome::Retry { after: Duration::from_secs(2), reason: e.to_string() }
                }
                Err(e @ (StoreError::Backend(_) | StoreError::Io(_))) => {
                    warn!(%version, error = %e, "Promotion failed on the store; will be redelivered.");
                    Outcome::Retry { after: Duration::from_secs(5), reason: e.to_string() }
                }
                Err(e) => {
                    warn!(%version, error = %e, "Promotion refused: the version cannot be served.");
                    let reason = format!("promotion of {version} refused: {e}");
                    self.reject(work.key, work.command.event_id, None, &reason).await;
                    Outcome::Reject { reason }
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn undecodable(&self, key: &DeliveryKey, error: &str, raw: &[u8]) {
        let request_id = schema::event_id_of(raw).unwrap_or_else(|| key.command_id());
        self.reject(key, request_id, Some(raw), &format!("unreadable command: {error}")).await;
    }
}
