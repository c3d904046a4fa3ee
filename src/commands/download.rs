//! `mnistflow download`: ask for a data set and follow it to `dataset.ready` (and the training run it starts).

use std::time::Duration;

use anyhow::anyhow;
use futures::StreamExt;
use mnistflow_nats::events::Message;
use mnistflow_nats::{Bus, DatasetDownload, DatasetFailed, DatasetReady, EventId, subjects};

use crate::{CliError, Exit};

use super::{decode, listen, print_json};

pub(super) async fn download(
    bus: &Bus,
    mirrors: Vec<String>,
    no_train: bool,
    timeout: Duration,
    json: bool,
) -> Result<Exit, CliError> {
    let mut sub = listen(bus, &[subjects::DATASET_READY, subjects::DATASET_FAILED]).await?;
    let command = DatasetDownload {
        mirrors: (!mirrors.is_empty()).then_some(mirrors),
        auto_train: no_train.then_some(false),
        requested_by: Some("mnistflow-cli".into()),
        ..Default::default()
    };
    bus.publish(&command).await?;
    if !json {
        eprintln!("Download requested ({}); waiting for the downloader...", command.event_id);
    }
    let answer = tokio::time::timeout(timeout, async {
        while let Some(msg) = sub.next().await {
            let suffix = bus.subjects().suffix(&msg.subject).unwrap_or_default();
            if suffix == DatasetReady::SUBJECT
                && let Some(ready) = decode::<DatasetReady>(&msg.payload)
                && ready.request_id == Some(command.event_id)
            {
                return Ok(ready);
            }
            if suffix == DatasetFailed::SUBJECT
                && let Some(failed) = decode::<DatasetFailed>(&msg.payload)
                && failed.request_id == Some(command.event_id)
            {
                return Err(failed);
            }
        }
        Err(DatasetFailed {
            event_id: EventId::new(),
            request_id: None,
            reason: "subscription closed".into(),
            mirrors_tried: vec![],
            will_retry: false,
            at: chrono::Utc::now(),
        })
    })
    .await
    .map_err(|_| {
        CliError::new(Exit::Unavailable, anyhow!("no answer from a downloader within {timeout:?} (is one running?)"))
    })?;
    match answer {
        Ok(ready) => {
            if json {
                print_json(&ready);
            } else {
                outln!(
                    "Data set {} ready{} at {} ({} training + {} test images, from {}).",
                    ready.dataset_id,
                    if ready.reused { " (already stored)" } else { "" },
                    ready.location,
                    ready.train_count,
                    ready.test_count,
                    ready.source
                );
            }
            Ok(Exit::Ok)
        }
        Err(failed) => {
            if json {
                print_json(&failed);
            } else {
                eprintln!("Download failed: {} (mirrors tried: {})", failed.reason, failed.mirrors_tried.join(", "));
            }
            Ok(Exit::Failed)
        }
    }
}
