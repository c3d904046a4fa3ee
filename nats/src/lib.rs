//! mnistflow's wire contract, the only crate that serialises or publishes.
//!
//! - [`subjects`]: every subject, under a configurable prefix (`mnist` by default).
//! - [`ids`]: UUID v7 event ids and the other identifiers that travel in payloads.
//! - [`events`]: one type per event or command of DESIGN.md, tied to its subject
//!   by the [`Message`] trait; every field but the essential ones is optional so a
//!   person can write payloads by hand (`nats pub mnist.train.request '{"epochs":2}'`).
//! - [`streams`]: the JetStream streams and durable consumers, created idempotently.
//! - [`bus`]: the typed [`Bus`]: connect with retry, publish with `Nats-Msg-Id`
//!   de-duplication, typed subscriptions and work queues that report undecodable
//!   messages instead of panicking.
//! - [`work`]: the work-queue runner (decode, heartbeats, ack/nak/term) and the
//!   delivery-derived ids of commands and their answers.
//! - [`config`]: `NATS_URL`, credentials and the subject prefix from the environment.
//! - [`runtime`]: process plumbing shared by every binary (tracing, shutdown).
//! - [`telemetry`]: trace export over OTLP and W3C trace context in HTTP and NATS headers.

pub mod bus;
pub mod config;
pub mod events;
pub mod ids;
pub mod permissions;
pub mod runtime;
pub mod streams;
pub mod subjects;
pub mod telemetry;
pub mod work;

pub use bus::{
    Bus, BusError, Delivery, EventReplay, Published, Received, StoredEvent, TypedSubscriber, WorkQueue,
    WorkQueueOptions,
};
pub use config::{ConfigError, NatsConfig};
pub use events::*;
pub use ids::{DatasetId, EventId, ModelVersion, RunId};
pub use subjects::Subjects;
pub use work::{DeliveryKey, Outcome, Take, Work};

/// Re-exported so that callers need not depend on `async-nats` directly for the
/// few client types the bus hands out (request/reply for predictions).
pub use async_nats;
