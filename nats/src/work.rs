//! The work-queue loop every consuming stage shares: take one delivery, decode it
//! (an undecodable one is reported and terminated), run the stage's handler while
//! signalling progress every third of the ack wait, then settle the delivery as
//! the handler decided (ack, nak with a delay, term) and log it.
//!
//! Ids: a command is identified by its [`DeliveryKey`] (stream sequence and a hash
//! of the payload), which is the same on every redelivery. A command written
//! without an `event_id` (`nats pub mnist.train.request '{"epochs":1}'`) takes
//! the key's id, and a stage derives the ids of the events it publishes in answer
//! from the key, so a redelivered command is recognised and its answers are
//! de-duplicated by JetStream (`Nats-Msg-Id`).

use std::future::Future;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::bus::{BusError, Delivery, WorkQueue};
use crate::events::Message;
use crate::ids::EventId;

/// Identifies one command across its redeliveries: `<stream sequence>:<first 16
/// hex digits of the payload's SHA-256>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeliveryKey(String);

impl DeliveryKey {
    /// The key of the message stored at `sequence` with these bytes.
    pub fn new(sequence: u64, payload: &[u8]) -> Self {
        Self(format!("{sequence}:{}", &hex::encode(Sha256::digest(payload))[..16]))
    }

    /// The id of the answer `role` (`ready`, `published`, `failed-2`, ...): the same
    /// for every delivery of the command. A UUID of version 8 (custom), hashed from
    /// the key and the role.
    pub fn event_id(&self, role: &str) -> EventId {
        let digest = Sha256::digest(format!("{}/{role}", self.0).as_bytes());
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        bytes[6] = (bytes[6] & 0x0f) | 0x80;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        EventId(Uuid::from_bytes(bytes))
    }

    /// The command's own id when it was written without one.
    pub fn command_id(&self) -> EventId {
        self.event_id("command")
    }
}

impl std::fmt::Display for DeliveryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the handler decided; the runner settles the delivery accordingly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The effect is durable: ack.
    Done,
    /// A transient failure: redeliver after `after` (nak with delay).
    Retry { after: Duration, reason: String },
    /// Retrying cannot help: term, never redelivered.
    Reject { reason: String },
    /// Shutdown interrupted the work: nak at once, so another consumer takes it.
    Cancelled,
}

/// One decoded command, as the handler sees it.
#[derive(Debug)]
pub struct Work<'a, M> {
    pub command: &'a M,
    pub key: &'a DeliveryKey,
    /// 1 on the first delivery.
    pub delivered: i64,
    /// The message's headers (W3C trace context among them).
    pub headers: Option<&'a async_nats::HeaderMap>,
    pub shutdown: &'a CancellationToken,
}

/// A stage's logic for one command type.
pub trait Handler<M: Message>: Send + Sync {
    /// Does the work and says how the delivery ends. Runs while the runner keeps the
    /// delivery alive; it must return [`Outcome::Cancelled`] soon after `shutdown`.
    fn handle(&self, work: Work<'_, M>) -> impl Future<Output = Outcome> + Send;

    /// Told about an undecodable command before the runner terminates it (a stage
    /// announces it as a failure event).
    fn undecodable(&self, key: &DeliveryKey, error: &str, raw: &[u8]) -> impl Future<Output = ()> + Send {
        let _ = (key, error, raw);
        async {}
    }
}

/// How many commands the runner takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Every command until shutdown (a worker or service).
    All,
    /// One command, or none if none arrives within the wait (a Kubernetes Job).
    One { wait: Duration },
}

/// Runs `handler` on the deliveries of `queue` until shutdown (or after one, see
/// [`Take`]). Progress signals go out every third of `ack_wait` (at least every
/// 100 ms). Returns the outcome of the last command handled, if any.
///
/// # Errors
/// The work queue ended (its subscription closed).
pub async fn run<M: Message, H: Handler<M>>(
    queue: &mut WorkQueue<M>,
    handler: &H,
    ack_wait: Duration,
    take: Take,
    shutdown: &CancellationToken,
) -> Result<Option<Outcome>, BusError> {
    let mut last = None;
    loop {
        let next = async {
            match take {
                Take::All => Some(queue.next().await),
                Take::One { wait } => tokio::time::timeout(wait, queue.next()).await.ok(),
            }
        };
        let delivery = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(last),
            next = next => match next {
                Some(Some(d)) => d,
                Some(None) => return Err(BusError::subscribe(M::SUBJECT, "the work queue ended")),
                None => {
                    info!(subject = M::SUBJECT, waited_secs = wait_secs(take), "No command arrived; exiting.");
                    return Ok(None);
                }
            },
        };
        let outcome = handle_one(&delivery, handler, ack_wait, shutdown).await;
        last = Some(outcome);
        if matches!(take, Take::One { .. }) {
            return Ok(last);
        }
    }
}

fn wait_secs(take: Take) -> f64 {
    match take {
        Take::One { wait } => wait.as_secs_f64(),
        Take::All => 0.0,
    }
}

async fn handle_one<M: Message, H: Handler<M>>(
    delivery: &Delivery<M>,
    handler: &H,
    ack_wait: Duration,
    shutdown: &CancellationToken,
) -> Outcome {
    let key = delivery.key();
    let command = match delivery.payload() {
        Ok(c) => c,
        Err(error) => {
            warn!(subject = M::SUBJECT, %key, %error, raw = %crate::redact_credentials(&String::from_utf8_lossy(delivery.raw())), "Undecodable command terminated.");
            handler.undecodable(key, error, delivery.raw()).await;
            let outcome = Outcome::Reject { reason: format!("undecodable: {error}") };
            settle(delivery, &outcome).await;
            return outcome;
        }
    };
    let work = Work { command, key, delivered: delivery.delivered(), headers: delivery.headers(), shutdown };
    let job = handler.handle(work);
    tokio::pin!(job);
    let mut heartbeat = tokio::time::interval((ack_wait / 3).max(Duration::from_millis(100)));
    heartbeat.tick().await;
    let outcome = loop {
        tokio::select! {
            biased;
            outcome = &mut job => break outcome,
            _ = heartbeat.tick() => {
                if let Err(e) = delivery.in_progress().await {
                    warn!(error = %e, "Could not extend the delivery's ack wait.");
                }
            }
        }
    };
    settle(delivery, &outcome).await;
    outcome
}

/// Acks, naks or terminates as decided. A failed signal is logged: the server
/// then redelivers after the ack wait, and the key makes the repeat harmless.
async fn settle<M: Message>(delivery: &Delivery<M>, outcome: &Outcome) {
    let result = match outcome {
        Outcome::Done => delivery.ack().await,
        Outcome::Retry { after, .. } => delivery.nak(Some(*after)).await,
        Outcome::Reject { .. } => delivery.term().await,
        Outcome::Cancelled => delivery.nak(None).await,
    };
    if let Err(e) = result {
        warn!(subject = M::SUBJECT, key = %delivery.key(), error = %e, ?outcome, "Could not settle the delivery; it will be redelivered.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_derived_from_a_key_are_stable_distinct_per_role_and_version_8() {
        let key = DeliveryKey::new(7, b"{}");
        assert_eq!(key.to_string(), format!("7:{}", &hex::encode(Sha256::digest(b"{}"))[..16]));
        assert_eq!(key.event_id("ready"), DeliveryKey::new(7, b"{}").event_id("ready"));
        assert_ne!(key.event_id("ready"), key.event_id("train"));
        assert_ne!(key.event_id("ready"), DeliveryKey::new(8, b"{}").event_id("ready"));
        assert_ne!(key.event_id("ready"), DeliveryKey::new(7, b"{ }").event_id("ready"));
        assert_eq!(key.event_id("ready").0.get_version_num(), 8);
    }
}
