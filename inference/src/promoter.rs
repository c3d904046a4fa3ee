//! The `model.promote` command consumer (durable `promoter`, shared by every
//! instance so each command is handled once): point `CURRENT` at the version, then
//! ack. An unknown, uncommitted or corrupt version is terminated with a log line,
//! never acked as if it had worked; a store outage is nak'ed for redelivery.

use std::time::Duration;

use mnistflow_nats::work::{self, Handler, Outcome, Take, Work};
use mnistflow_nats::{Bus, BusError, ModelPromote, WorkQueueOptions};
use mnistflow_store::{Store, StoreError};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

/// Consumes `model.promote` until `shutdown`.
///
/// # Errors
/// The work queue cannot be bound (stream missing).
pub async fn run(bus: Bus, store: Store, shutdown: CancellationToken) -> Result<(), BusError> {
    let options = WorkQueueOptions::default();
    let mut queue = bus.work_queue::<ModelPromote>(options).await?;
    let result = work::run(&mut queue, &Promoter { store }, options.ack_wait, Take::All, &shutdown).await;
    info!("Promoter stopped.");
    result.map(|_| ())
}

struct Promoter {
    store: Store,
}

impl Handler<ModelPromote> for Promoter {
    async fn handle(&self, work: Work<'_, ModelPromote>) -> Outcome {
        let span = info_span!("promote", key = %work.key, delivered = work.delivered);
        let version = work.command.version.clone();
        async {
            match self.store.promote(&version).await {
                Ok(metadata) => {
                    let requested_by = &work.command.requested_by;
                    info!(%version, accuracy = metadata.metrics.accuracy, ?requested_by, "Promoted.");
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
                    Outcome::Reject { reason: e.to_string() }
                }
            }
        }
        .instrument(span)
        .await
    }
}
