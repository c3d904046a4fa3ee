//! Service mode: act on each `dataset.download` command from the durable
//! work-queue consumer. A command is acknowledged only after its data set is
//! committed and `dataset.ready` (and `train.request`) are published; a failure
//! is answered with `dataset.failed` and either redelivered later (transient,
//! bounded by `DOWNLOADER_MAX_DELIVER`) or terminated. Never acked before its
//! effect is durable.

use std::time::Duration;

use mnistflow_nats::{BusError, DatasetDownload, Delivery, WorkQueueOptions};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::config::Config;
use crate::error::DownloadError;
use crate::stage::{Downloader, Origin};

/// How the service treats deliveries.
#[derive(Debug, Clone, Copy)]
pub struct ServiceOptions {
    /// Deliveries of one command before it is given up.
    pub max_deliver: i64,
    /// Delay before a failed command is delivered again.
    pub retry_delay: Duration,
    /// How long a delivery may go without a sign of life before the server redelivers it.
    pub ack_wait: Duration,
}

impl From<&Config> for ServiceOptions {
    fn from(config: &Config) -> Self {
        Self {
            max_deliver: config.max_deliver,
            retry_delay: config.retry_delay,
            ack_wait: WorkQueueOptions::default().ack_wait,
        }
    }
}

/// Consumes `dataset.download` commands one at a time until `shutdown`.
///
/// # Errors
/// The work queue cannot be bound, or its subscription ends.
pub async fn run(
    downloader: &Downloader,
    options: ServiceOptions,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let mut queue = downloader
        .bus()
        .work_queue::<DatasetDownload>(WorkQueueOptions {
            ack_wait: options.ack_wait,
            max_deliver: options.max_deliver,
        })
        .await?;
    info!("Waiting for download commands.");
    loop {
        let delivery = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            next = queue.next() => match next {
                Some(d) => d,
                None => return Err(BusError::Subscribe { subject: "dataset.download".into(), message: "the work queue ended".into() }),
            },
        };
        handle(downloader, &delivery, options, &shutdown).await;
    }
}

async fn handle(
    downloader: &Downloader,
    delivery: &Delivery<DatasetDownload>,
    options: ServiceOptions,
    shutdown: &CancellationToken,
) {
    let delivered = delivery.delivered();
    // Stable across redeliveries (a hand-written `{}` gets a new random event id at each decode).
    let key = format!("{}:{}", delivery.stream_sequence(), &hex::encode(Sha256::digest(delivery.raw()))[..16]);
    let span = info_span!("command", sequence = delivery.stream_sequence(), delivered);
    async {
        let command = match delivery.payload() {
            Ok(c) => c.clone(),
            Err(e) => {
                let raw = String::from_utf8_lossy(delivery.raw()).into_owned();
                warn!(error = %e, %raw, "Undecodable download command.");
                let origin = Origin { command: None, key: Some(key) };
                let error = DownloadError::BadRequest(format!("undecodable payload: {e}"));
                downloader.report_failure(&error, &origin, "failed", false).await;
                settle(delivery.term().await);
                return;
            }
        };
        info!(request_id = %command.event_id, requested_by = ?command.requested_by, "Download command received.");
        let origin = Origin { command: Some(command), key: Some(key) };
        let work = downloader.download(&origin);
        tokio::pin!(work);
        let mut heartbeat = tokio::time::interval(options.ack_wait / 3);
        heartbeat.tick().await;
        let result = loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break Err(DownloadError::Cancelled),
                r = &mut work => break r,
                _ = heartbeat.tick() => settle(delivery.in_progress().await),
            }
        };
        match result {
            Ok(ready) => {
                settle(delivery.ack().await);
                info!(dataset_id = %ready.dataset_id, reused = ready.reused, "Download command done.");
            }
            Err(DownloadError::Cancelled) => {
                // Someone else (or our next start) picks it up at once.
                settle(delivery.nak(None).await);
            }
            Err(e) => {
                let will_retry = e.transient() && delivered < options.max_deliver;
                downloader.report_failure(&e, &origin, &format!("failed-{delivered}"), will_retry).await;
                if will_retry {
                    settle(delivery.nak(Some(options.retry_delay)).await);
                } else {
                    settle(delivery.term().await);
                }
            }
        }
    }
    .instrument(span)
    .await;
}

fn settle(result: Result<(), BusError>) {
    if let Err(e) = result {
        warn!(error = %e, "Could not signal the server about a command; it will be redelivered.");
    }
}
