//! The `model.promote` command consumer (durable `promoter`, shared by every
//! instance so each command is handled once): point `CURRENT` at the version, then
//! ack. An unknown, uncommitted or corrupt version is terminated with a log line,
//! never acked as if it had worked; a store outage is nak'ed for redelivery.

use std::time::Duration;

use mnistflow_nats::{Bus, BusError, Delivery, ModelPromote, WorkQueueOptions};
use mnistflow_store::{Store, StoreError};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

/// Consumes `model.promote` until `shutdown`.
///
/// # Errors
/// The work queue cannot be bound (stream missing).
pub async fn run(bus: Bus, store: Store, shutdown: CancellationToken) -> Result<(), BusError> {
    let mut queue = bus.work_queue::<ModelPromote>(WorkQueueOptions::default()).await?;
    loop {
        let delivery = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            d = queue.next() => match d {
                Some(d) => d,
                None => break,
            },
        };
        let span = info_span!("promote", sequence = delivery.stream_sequence(), delivered = delivery.delivered());
        handle(&store, delivery).instrument(span).await;
    }
    info!("Promoter stopped.");
    Ok(())
}

async fn handle(store: &Store, delivery: Delivery<ModelPromote>) {
    let command = match delivery.payload() {
        Ok(c) => c.clone(),
        Err(error) => {
            warn!(%error, raw = %String::from_utf8_lossy(delivery.raw()), "Undecodable model.promote terminated.");
            settle(delivery.term().await);
            return;
        }
    };
    let version = command.version;
    match store.promote(&version).await {
        Ok(metadata) => {
            info!(%version, accuracy = metadata.metrics.accuracy, requested_by = ?command.requested_by, "Promoted.");
            settle(delivery.ack().await);
        }
        Err(e @ (StoreError::Backend(_) | StoreError::Io(_))) => {
            warn!(%version, error = %e, "Promotion failed on the store; will be redelivered.");
            settle(delivery.nak(Some(Duration::from_secs(5))).await);
        }
        Err(e) => {
            warn!(%version, error = %e, "Promotion refused: the version cannot be served.");
            settle(delivery.term().await);
        }
    }
}

fn settle(result: Result<(), BusError>) {
    if let Err(e) = result {
        warn!(error = %e, "Settling a model.promote delivery failed; it may be redelivered.");
    }
}
