//! Service mode: act on each `dataset.download` command from the durable
//! work-queue consumer. A command is acknowledged only after its data set is
//! committed and `dataset.ready` (and `train.request`) are published; a failure
//! is answered with `dataset.failed` and either redelivered later (transient,
//! bounded by `DOWNLOADER_MAX_DELIVER`) or terminated. Never acked before its
//! effect is durable. The loop itself (decode, progress signals, settling) is the
//! shared [`mnistflow_nats::work`] runner.

use std::time::Duration;

use mnistflow_nats::work::{self, Handler, Outcome, Take, Work};
use mnistflow_nats::{BusError, DatasetDownload, DeliveryKey, WorkQueueOptions};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span};

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
    let handler = Service { downloader, options };
    work::run(&mut queue, &handler, options.ack_wait, Take::All, &shutdown).await.map(|_| ())
}

struct Service<'a> {
    downloader: &'a Downloader,
    options: ServiceOptions,
}

impl Handler<DatasetDownload> for Service<'_> {
    async fn handle(&self, work: Work<'_, DatasetDownload>) -> Outcome {
        let span = info_span!("command", key = %work.key, delivered = work.delivered);
        async {
            let command = work.command;
            info!(request_id = %command.event_id, requested_by = ?command.requested_by, "Download command received.");
            let origin = Origin { command: Some(command.clone()), key: Some(work.key.clone()) };
            let result = tokio::select! {
                biased;
                () = work.shutdown.cancelled() => Err(DownloadError::Cancelled),
                r = self.downloader.download(&origin) => r,
            };
            match result {
                Ok(ready) => {
                    info!(dataset_id = %ready.dataset_id, reused = ready.reused, "Download command done.");
                    Outcome::Done
                }
                // Someone else (or our next start) picks it up at once.
                Err(DownloadError::Cancelled) => Outcome::Cancelled,
                Err(e) => {
                    let will_retry = e.transient() && work.delivered < self.options.max_deliver;
                    let role = format!("failed-{}", work.delivered);
                    self.downloader.report_failure(&e, &origin, &role, will_retry).await;
                    if will_retry {
                        Outcome::Retry { after: self.options.retry_delay, reason: e.to_string() }
                    } else {
                        Outcome::Reject { reason: e.to_string() }
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn undecodable(&self, key: &DeliveryKey, error: &str, _raw: &[u8]) {
        let origin = Origin { command: None, key: Some(key.clone()) };
        let error = DownloadError::BadRequest(format!("undecodable payload: {error}"));
        self.downloader.report_failure(&error, &origin, "failed", false).await;
    }
}
