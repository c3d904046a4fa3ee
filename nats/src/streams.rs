//! The JetStream streams and durable consumers, created idempotently at start-up
//! by whichever stage comes first ([`ensure`]).
//!
//! Every durable consumer of a work queue is created here, with the streams, and
//! not first by the stage that consumes it: the trainer runs only when KEDA sees
//! lag on its consumer, and KEDA 2.20's `nats-jetstream` scaler reports an error,
//! not lag, while that consumer does not exist (kedacore/keda#7668).
//!
//! | stream | subjects | retention | consumers |
//! |---|---|---|---|
//! | `<P>_EVENTS` | every event of [`EVENT_SUBJECTS`] | limits (30 days, 10,000 per subject) | ephemeral replays (web, CLI) |
//! | `<P>_TRAIN` | `train.request` | work queue | `trainer` (the KEDA scaler watches its lag) |
//! | `<P>_COMMANDS` | `dataset.download`, `model.promote` | work queue | `downloader`, `promoter` |
//! | `<P>_FEEDBACK` | `feedback.submitted`, `feedback.delete` | work queue, bounded ([`FEEDBACK_MAX_MESSAGES`], [`FEEDBACK_MAX_BYTES`], new messages refused when full) | `feedback`, `feedback-delete` |

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

use tracing::{debug, info};

use crate::bus::BusError;
use crate::subjects::{self, EVENT_SUBJECTS, Subjects};

/// Stream roles; the full name is `<PREFIX>_<ROLE>` (see [`Subjects::stream_name`]).
pub const EVENTS: &str = "EVENTS";
pub const TRAIN: &str = "TRAIN";
pub const COMMANDS: &str = "COMMANDS";
pub const FEEDBACK: &str = "FEEDBACK";

/// Feedback waiting for the feedback stage, at most (a flood while the stage is
/// down fills the stream, then publishes are refused: the page answers 503).
pub const FEEDBACK_MAX_MESSAGES: i64 = 30_000;
/// Bytes of feedback waiting, at most (a message is about 2 KiB; the local
/// overlay's JetStream has 800 MB in all).
pub const FEEDBACK_MAX_BYTES: i64 = 64 * 1024 * 1024;
/// The largest feedback message the stream stores.
pub const FEEDBACK_MAX_MESSAGE_BYTES: i32 = 8 * 1024;

/// Durable consumer of `train.request`.
pub const TRAINER_CONSUMER: &str = "trainer";
/// Durable consumer of `dataset.download`.
pub const DOWNLOADER_CONSUMER: &str = "downloader";
/// Durable consumer of `model.promote`.
pub const PROMOTER_CONSUMER: &str = "promoter";
/// Durable consumer of `feedback.submitted`.
pub const FEEDBACK_CONSUMER: &str = "feedback";
/// Durable consumer of `feedback.delete`.
pub const FEEDBACK_DELETE_CONSUMER: &str = "feedback-delete";

/// One work-queue command and the durable consumer that takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkConsumer {
    /// The command's subject suffix.
    pub suffix: &'static str,
    /// The stream's role (see [`Subjects::stream_name`]).
    pub stream: &'static str,
    /// The durable consumer's name (what KEDA's trigger names).
    pub durable: &'static str,
    /// Deliveries of one message before the server gives up, until the consuming
    /// stage binds with its own setting (`TRAINER_MAX_DELIVER`, ...).
    pub max_deliver: i64,
}

/// Every durable consumer of the deployment: the one definition that set-up
/// ([`ensure`]), the stages ([`crate::Bus::work_queue`]) and the KEDA trigger
/// (`k8s/base/trainer.yaml`, checked by `k8s/check`) share.
pub const WORK_CONSUMERS: [WorkConsumer; 5] = [
    WorkConsumer { suffix: subjects::TRAIN_REQUEST, stream: TRAIN, durable: TRAINER_CONSUMER, max_deliver: 5 },
    WorkConsumer { suffix: subjects::DATASET_DOWNLOAD, stream: COMMANDS, durable: DOWNLOADER_CONSUMER, max_deliver: 3 },
    WorkConsumer { suffix: subjects::MODEL_PROMOTE, stream: COMMANDS, durable: PROMOTER_CONSUMER, max_deliver: 5 },
    WorkConsumer {
        suffix: subjects::FEEDBACK_SUBMITTED,
        stream: FEEDBACK,
        durable: FEEDBACK_CONSUMER,
        max_deliver: 10,
    },
    WorkConsumer {
        suffix: subjects::FEEDBACK_DELETE,
        stream: FEEDBACK,
        durable: FEEDBACK_DELETE_CONSUMER,
        max_deliver: 10,
    },
];

/// The ack wait a consumer is created with at set-up (a stage that binds with
/// another value updates it).
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(60);

/// The window within which a repeated `Nats-Msg-Id` is stored once.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(10 * 60);

/// Which stream holds a subject suffix, and which durable consumes it (if a command).
pub fn route(suffix: &str) -> Option<(&'static str, Option<&'static str>)> {
    if let Some(c) = work_consumer(suffix) {
        return Some((c.stream, Some(c.durable)));
    }
    EVENT_SUBJECTS.contains(&suffix).then_some((EVENTS, None))
}

/// The work-queue consumer of a command suffix, if it is one.
pub fn work_consumer(suffix: &str) -> Option<&'static WorkConsumer> {
    WORK_CONSUMERS.iter().find(|c| c.suffix == suffix)
}

/// The configuration of each stream, held by `replicas` servers
/// (`NATS_STREAM_REPLICAS`: 1 on one server, 3 on the three-server cluster).
pub fn stream_configs(subjects: &Subjects, replicas: usize) -> Vec<stream::Config> {
    let base = stream::Config {
        storage: stream::StorageType::File,
        duplicate_window: DUPLICATE_WINDOW,
        num_replicas: replicas,
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
            ..base.clone()
        },
        stream::Config {
            name: subjects.stream_name(FEEDBACK),
            description: Some("mnistflow feedback from the page, for the feedback stage (work queue)".into()),
            subjects: vec![subjects.full(subjects::FEEDBACK_SUBMITTED), subjects.full(subjects::FEEDBACK_DELETE)],
            retention: stream::RetentionPolicy::WorkQueue,
            max_messages: FEEDBACK_MAX_MESSAGES,
            max_bytes: FEEDBACK_MAX_BYTES,
            max_message_size: FEEDBACK_MAX_MESSAGE_BYTES,
            discard: stream::DiscardPolicy::New,
            ..base
        },
    ]
}

/// The durable pull consumer for a work-carrying command, with
/// [`DEFAULT_ACK_WAIT`]: [`Bus::work_queue`](crate::Bus::work_queue) sets the
/// consuming stage's own (how long a delivery may go without an ack or an
/// in-progress signal before the server redelivers it).
pub fn work_consumer_config(
    subjects: &Subjects,
    suffix: &str,
    durable: &str,
    max_deliver: i64,
    replicas: usize,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(durable.to_owned()),
        description: Some(format!("mnistflow {durable}")),
        filter_subject: subjects.full(suffix),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: DEFAULT_ACK_WAIT,
        max_deliver,
        max_ack_pending: 64,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// A consumer's configured replicas, 0 meaning "as its stream" (which, for a
/// consumer created before its stream was scaled, is not what it has).
fn effective_replicas(configured: usize) -> usize {
    configured.max(1)
}

/// Creates the streams, or updates them in place to the current configuration
/// (a deployment that moves from one server to a cluster raises the replicas of
/// the streams it already has, messages and consumers kept), then creates every
/// durable consumer of [`WORK_CONSUMERS`] that does not exist yet (an existing
/// one keeps the settings its stage gave it; its replicas follow the stream's).
///
/// # Errors
/// The server refused (JetStream disabled, a conflicting stream owns a subject,
/// or fewer servers than `replicas` run JetStream).
pub async fn ensure(js: &jetstream::Context, subjects: &Subjects, replicas: usize) -> Result<(), BusError> {
    for config in stream_configs(subjects, replicas) {
        let name = config.name.clone();
        let before = match js.get_stream(&name).await {
            Ok(mut stream) => stream.info().await.ok().map(|i| i.config.num_replicas),
            Err(_) => None,
        };
        js.create_or_update_stream(config)
            .await
            .map_err(|e| BusError::stream(format!("creating or updating stream {name} ({replicas} replicas)"), e))?;
        if let Some(before) = before
            && before != replicas
        {
            info!(stream = %name, before, replicas, "Stream replicas changed in place.");
        }
    }
    for c in &WORK_CONSUMERS {
        let name = subjects.stream_name(c.stream);
        let stream = js.get_stream(&name).await.map_err(|e| BusError::stream(format!("stream {name}"), e))?;
        let fail = |e: crate::bus::Cause| BusError::stream(format!("consumer {} on {name}", c.durable), e);
        match stream.get_consumer::<consumer::pull::Config>(c.durable).await {
            Ok(existing) => {
                // Raised explicitly, its other settings kept: seen here on
                // nats-server 2.15.1, a consumer this crate created on a stream of
                // one replica stayed on one server after the stream was raised to
                // three, and died with that server (the cluster test's first run).
                let mut config = existing.cached_info().config.clone();
                if effective_replicas(config.num_replicas) != replicas {
                    let before = config.num_replicas;
                    config.num_replicas = replicas;
                    // The stream's new replica count reaches the consumer's check a
                    // moment after the stream update returns ("replica count exceeds
                    // parent stream"; 10-15 s seen here while the new replicas catch up):
                    // retried for 30 s at most.
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                    loop {
                        match stream.update_consumer(config.clone()).await {
                            Ok(_) => break,
                            Err(e) if tokio::time::Instant::now() < deadline => {
                                debug!(consumer = c.durable, error = %e, "Consumer update refused for now; retrying.");
                                tokio::time::sleep(Duration::from_millis(250)).await;
                            }
                            Err(e) => return Err(fail(e.into())),
                        }
                    }
                    info!(consumer = c.durable, stream = %name, before, replicas, "Consumer replicas changed in place.");
                }
            }
            Err(_) => {
                let config = work_consumer_config(subjects, c.suffix, c.durable, c.max_deliver, replicas);
                stream
                    .get_or_create_consumer::<consumer::pull::Config>(c.durable, config)
                    .await
                    .map_err(|e| fail(e.into()))?;
            }
        }
    }
    Ok(())
}

/// Waits, up to `deadline`, until every stream and every durable consumer of
/// [`WORK_CONSUMERS`] exists: what an identity that may not create them does at
/// start-up instead of [`ensure`] (it needs only `$JS.API.STREAM.INFO` and
/// `$JS.API.CONSUMER.INFO`). Logs what it waits for every few seconds.
///
/// # Errors
/// Something is still missing at the deadline; the error names it and who creates it.
pub async fn wait_for(js: &jetstream::Context, subjects: &Subjects, deadline: Duration) -> Result<(), BusError> {
    let until = tokio::time::Instant::now() + deadline;
    let mut next_log = tokio::time::Instant::now();
    loop {
        let missing = missing(js, subjects).await;
        let Some(missing) = missing else { return Ok(()) };
        let now = tokio::time::Instant::now();
        if now >= until {
            return Err(BusError::stream(
                format!("{missing} still missing after {deadline:?}"),
                "this identity may not create it (NATS_SETUP=false): the promoter or the downloader (or \
                 `mnistflow` run as admin) creates the streams",
            ));
        }
        if now >= next_log {
            info!(%missing, "Waiting for the set-up identity to create the JetStream streams and consumers.");
            next_log = now + Duration::from_secs(10);
        }
        tokio::time::sleep(Duration::from_millis(500).min(until - now)).await;
    }
}

/// The first stream or work consumer that does not exist yet, if any.
async fn missing(js: &jetstream::Context, subjects: &Subjects) -> Option<String> {
    for config in stream_configs(subjects, 1) {
        if js.get_stream(&config.name).await.is_err() {
            return Some(format!("stream {}", config.name));
        }
    }
    for c in &WORK_CONSUMERS {
        let name = subjects.stream_name(c.stream);
        let exists = match js.get_stream(&name).await {
            Ok(stream) => stream.get_consumer::<consumer::pull::Config>(c.durable).await.is_ok(),
            Err(_) => false,
        };
        if !exists {
            return Some(format!("consumer {} on stream {name}", c.durable));
        }
    }
    None
}
