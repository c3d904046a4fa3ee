//! mnistflow's wire contract: what travels on NATS and how. Stages publish,
//! consume, request and reply through its typed [`Bus`], so no stage writes a
//! subject or a message payload by hand (artefacts in the store, such as a model's
//! metadata, are the store's business, not this crate's).
//!
//! - [`subjects`]: every subject, under a configurable prefix (`mnist` by default).
//! - [`ids`]: UUID v7 event ids and the other identifiers that travel in payloads.
//! - [`events`]: one type per event or command of DESIGN.md, tied to its subject
//!   by the [`Message`] trait; every field but the essential ones is optional so a
//!   person can write payloads by hand (`nats pub mnist.train.request '{"epochs":2}'`).
//! - [`schema`]: the schema version every message carries, how it is written and checked.
//! - [`streams`]: the JetStream streams and durable consumers, created idempotently.
//! - [`bus`]: the typed [`Bus`]: connect with retry, publish with `Nats-Msg-Id`
//!   de-duplication, typed subscriptions and work queues that report undecodable
//!   messages instead of panicking.
//! - [`predict`]: `mnist.predict` request/reply, the typed client and the serving side.
//! - [`history`]: event history by age (purging the events stream up to a time).
//! - [`replay`]: the events stream replayed, then followed live (a page's feed).
//! - [`work`]: the work-queue runner (decode, heartbeats, ack/nak/term) and the
//!   delivery-derived ids of commands and their answers.
//! - [`redact`]: credentials removed from text bound for events and logs.
//! - [`config`]: `NATS_URL`, credentials and the subject prefix from the environment.
//! - [`telemetry`]: trace export over OTLP and W3C trace context in HTTP and NATS headers.

pub mod bus;
pub mod config;
pub mod events;
pub mod history;
pub mod ids;
pub mod permissions;
pub mod predict;
pub mod redact;
pub mod replay;
pub mod schema;
pub mod streams;
pub mod subjects;
pub mod telemetry;
pub mod work;

pub use bus::{
    Bus, BusError, Delivery, Published, Received, TypedSubscriber, WorkQueue, WorkQueueOptions, error_chain,
    error_chain_text,
};
pub use config::{ConfigError, NatsConfig};
pub use events::*;
pub use ids::{DatasetId, EventId, ModelVersion, RunId};
pub use predict::{PredictClient, PredictRequest, PredictRequestError, PredictRequests, Responder};
pub use redact::redact_credentials;
pub use replay::{EventReplay, ReplayItem, StoredEvent};
pub use subjects::Subjects;
pub use work::{DeliveryKey, Outcome, Take, Work};

/// Re-exported so that callers need not depend on `async-nats` directly for the
/// few client types the bus takes or hands out (a replay's `DeliverPolicy`,
/// headers, the raw client of the test kit).
pub use async_nats;
