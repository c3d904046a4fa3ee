//! `mnistflow events`: the pipeline's events, replayed and followed; one line per event.

use mnistflow_nats::async_nats::jetstream::consumer::DeliverPolicy;
use mnistflow_nats::{
    Bus, DatasetFailed, DatasetReady, InferenceLoaded, ModelPublished, TrainFailed, TrainProgress, subjects,
};
use tokio_util::sync::CancellationToken;

use crate::{CliError, Exit};

use super::{decode, print_json};

/// One line describing an event for people.
pub fn describe(suffix: &str, payload: &[u8]) -> String {
    let text = || String::from_utf8_lossy(payload).into_owned();
    match suffix {
        subjects::DATASET_READY => decode::<DatasetReady>(payload).map_or_else(text, |e| {
            format!(
                "dataset {} ready ({} train / {} test, from {}{})",
                e.dataset_id,
                e.train_count,
                e.test_count,
                e.source,
                if e.reused { ", reused" } else { "" }
            )
        }),
        subjects::DATASET_FAILED => {
            decode::<DatasetFailed>(payload).map_or_else(text, |e| format!("download failed: {}", e.reason))
        }
        subjects::TRAIN_PROGRESS => decode::<TrainProgress>(payload).map_or_else(text, |e| {
            format!(
                "run {} epoch {}/{} step {}/{} loss {:.4} ({:.0} img/s, {})",
                e.run_id, e.epoch, e.epochs, e.step, e.steps, e.loss, e.examples_per_sec, e.phase
            )
        }),
        subjects::TRAIN_FAILED => {
            decode::<TrainFailed>(payload).map_or_else(text, |e| format!("training failed: {}", e.reason))
        }
        subjects::MODEL_PUBLISHED => decode::<ModelPublished>(payload).map_or_else(text, |e| {
            format!(
                "model {} published: accuracy {:.2} % ({}{})",
                e.version,
                e.metrics.accuracy * 100.0,
                if e.promoted { "promoted" } else { "not promoted" },
                if e.promotion.is_empty() { String::new() } else { format!(": {}", e.promotion) }
            )
        }),
        subjects::INFERENCE_LOADED => decode::<InferenceLoaded>(payload).map_or_else(text, |e| {
            if e.ok {
                format!(
                    "{} serves {} (loaded in {:.0} ms)",
                    e.instance,
                    e.version.map(|v| v.0).unwrap_or_default(),
                    e.load_ms
                )
            } else {
                format!(
                    "{} refused {}: {}",
                    e.instance,
                    e.refused.map(|v| v.0).unwrap_or_default(),
                    e.error.unwrap_or_default()
                )
            }
        }),
        _ => text(),
    }
}

pub(super) async fn events(
    bus: &Bus,
    follow: bool,
    json: bool,
    shutdown: &CancellationToken,
) -> Result<Exit, CliError> {
    let mut replay = bus.replay_events(DeliverPolicy::All).await?;
    if !follow && replay.last_at_start == 0 {
        return Ok(Exit::Ok);
    }
    loop {
        let next = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(Exit::Ok),
            next = replay.next() => next,
        };
        let Some(event) = next else { return Ok(Exit::Ok) };
        let event = event?;
        if json {
            let payload: serde_json::Value = serde_json::from_slice(&event.payload).unwrap_or(serde_json::Value::Null);
            print_json(&serde_json::json!({"subject": event.suffix, "sequence": event.sequence, "payload": payload}));
        } else {
            outln!("{:>6} {:<18} {}", event.sequence, event.suffix, describe(&event.suffix, &event.payload));
        }
        if !follow && event.sequence >= replay.last_at_start {
            return Ok(Exit::Ok);
        }
    }
}
