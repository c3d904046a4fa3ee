//! The JetStream streams and durable consumers, created idempotently at start-up
//! by whichever stage comes first.
//!
//! | stream | subjects | retention | consumers |
//! |---|---|---|---|
//! | `<P>_EVENTS` | every event of [`EVENT_SUBJECTS`] | limits (30 days, 10,000 per subject) | ephemeral replays (web, CLI) |
//! | `<P>_TRAIN` | `train.request` | work queue | `trainer` (the KEDA scaler watches its lag) |
//! | `<P>_COMMANDS` | `dataset.download`, `model.promote` | work queue | `downloader`, `promoter` |

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

use crate::bus::BusError;
use crate::subjects::{self, EVENT_SUBJECTS, Subjects};

/// Stream roles; the full name is `<PREFIX>_<ROLE>` (see [`Subjects::stream_name`]).
pub const EVENTS: &str = "EVENTS";
pub const TRAIN: &str = "TRAIN";
pub const COMMANDS: &str = "COMMANDS";

/// Durable consumer of `train.request`.
pub const TRAINER_CONSUMER: &str = "trainer";
/// Durable consumer of `dataset.download`.
pub const DOWNLOADER_CONSUMER: &str = "downloader";
/// Durable consumer of `model.promote`.
pub const PROMOTER_CONSUMER: &str = "promoter";

/// The window within which a repeated `Nats-Msg-Id` is stored once.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(10 * 60);

/// Which stream holds a subject suffix, and which durable consumes it (if a command).
pub fn route(suffix: &str) -> Option<(&'static str, Option<&'static str>)> {
    match suffix {
        subjects::TRAIN_REQUEST => Some((TRAIN, Some(TRAINER_CONSUMER))),
        subjects::DATASET_DOWNLOAD => Some((COMMANDS, Some(DOWNLOADER_CONSUMER))),
        subjects::MODEL_PROMOTE => Some((COMMANDS, Some(PROMOTER_CONSUMER))),
        s if EVENT_SUBJECTS.contains(&s) => Some((EVENTS, None)),
        _ => None,
    }
}

/// The configuration of each stream.
pub fn stream_configs(subjects: &Subjects) -> Vec<stream::Config> {
    let base = stream::Config {
        storage: stream::StorageType::File,
        duplicate_window: DUPLICATE_WINDOW,
        num_replicas: 1,
        ..Default::default()
    };
    vec![
        stream::Config {
            name: subjects.stream_name(EVENTS),
            description: Some("mnistflow events, replayable by late subscribers".into()),
            subjects: EVENT_SUBJECTS.iter().map(|s| subjects.full(s)).collect(),
            retention: stream::RetentionPolicy::Limits,
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_messages_per_subject: 10_000,
            ..base.clone()
        },
        stream::Config {
            name: subjects.stream_name(TRAIN),
            description: Some("mnistflow training requests (work queue)".into()),
            subjects: vec![subjects.full(subjects::TRAIN_REQUEST)],
            retention: stream::RetentionPolicy::WorkQueue,
            ..base.clone()
        },
        stream::Config {
            name: subjects.stream_name(COMMANDS),
            description: Some("mnistflow commands: downloads and promotions (work queue)".into()),
            subjects: vec![subjects.full(subjects::DATASET_DOWNLOAD), subjects.full(subjects::MODEL_PROMOTE)],
            retention: stream::RetentionPolicy::WorkQueue,
            ..base
        },
    ]
}

/// The durable pull consumer for a work-carrying command.
///
/// `ack_wait` is how long a delivery may go without an ack or an in-progress
/// signal before the server redelivers it; long work sends in-progress acks.
pub fn work_consumer_config(
    subjects: &Subjects,
    suffix: &str,
    durable: &str,
    max_deliver: i64,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(durable.to_owned()),
        description: Some(format!("mnistflow {durable}")),
        filter_subject: subjects.full(suffix),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(60),
        max_deliver,
        max_ack_pending: 64,
        ..Default::default()
    }
}

/// Creates the streams, or updates them to the current configuration.
///
/// # Errors
/// The server refused (JetStream disabled, or a conflicting stream owns a subject).
pub async fn ensure(js: &jetstream::Context, subjects: &Subjects) -> Result<(), BusError> {
    for config in stream_configs(subjects) {
        let name = config.name.clone();
        js.create_or_update_stream(config)
            .await
            .map_err(|e| BusError::Stream(format!("creating or updating stream {name}: {e}")))?;
    }
    Ok(())
}
