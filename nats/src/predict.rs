//! `mnist.predict` request/reply, both ends: the payload is the image bytes (or
//! 784 raw pixels), unchanged; the reply is a [`PredictReply`] as JSON (a
//! [`Prediction`](crate::Prediction) or a [`PredictError`](crate::PredictError)
//! whose `code` follows HTTP). Requests carry the W3C trace context in their
//! headers, so the answering instance's spans join the caller's trace.
//!
//! - [`PredictClient`]: sends one request and returns the decoded reply or a
//!   typed [`PredictRequestError`]; with [`PredictClient::with_retries`] it sends
//!   it again within the deadline when an attempt cannot be answered (its server
//!   went away, it outlived its own timeout, or no instance was subscribed for a
//!   moment). A prediction changes nothing, so sending it twice is harmless.
//! - [`PredictRequests`]: the serving side, a queue-group subscription yielding
//!   [`PredictRequest`]s, each answered once through its [`Responder`].

use std::time::Duration;

use async_nats::{Client, HeaderMap, RequestErrorKind, Subject, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use tokio::time::Instant;
use tracing::{Instrument, debug, debug_span, info};

use crate::bus::{Bus, BusError};
use crate::events::PredictReply;
use crate::subjects;

/// Why a prediction request got no reply to decode.
#[derive(Debug, thiserror::Error)]
pub enum PredictRequestError {
    /// No inference instance is subscribed to `mnist.predict`.
    #[error("no inference instance is running (no responders on mnist.predict)")]
    NoResponders,
    /// No reply within the caller's deadline.
    #[error("no inference instance answered within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The image does not fit in one message; `max_payload` is the server's
    /// limit when it was known before sending.
    #[error("the image is larger than the message bus accepts{}", .max_payload.map(|m| format!(" ({m} bytes)")).unwrap_or_default())]
    TooLarge { max_payload: Option<usize> },
    /// The request could not be sent or its reply not received.
    #[error("the prediction request failed after {attempts} attempts")]
    Transport {
        attempts: u32,
        #[source]
        source: async_nats::RequestError,
    },
    /// A reply came but is neither a prediction nor an error reply.
    #[error("the inference instance sent an undecodable reply")]
    BadReply(#[source] serde_json::Error),
}

/// How long "no responders" is retried: inference instances that lost their
/// server are subscribed again on another within this (loopback: ~10 ms).
const NO_RESPONDERS_GRACE: Duration = Duration::from_millis(1500);

/// The requesting side of `mnist.predict`.
#[derive(Debug, Clone)]
pub struct PredictClient {
    bus: Bus,
    /// `Some(attempt timeout)` when failed attempts are sent again.
    retry: Option<Duration>,
}

/// Why an attempt failed when it may be worth another.
#[derive(Debug)]
enum Failure {
    NoReply,
    NoResponders,
    Transport(async_nats::RequestError),
}

impl PredictClient {
    /// One attempt a request (a command-line caller: it reports at once when no
    /// instance runs); a request in flight when the connection drops is still
    /// sent again.
    pub fn new(bus: Bus) -> Self {
        Self { bus, retry: None }
    }

    /// Sends failed attempts again within the request's deadline, each waiting
    /// at most `attempt_timeout` for its reply; "no responders" is retried for
    /// 1.5 s at most.
    #[must_use]
    pub fn with_retries(mut self, attempt_timeout: Duration) -> Self {
        self.retry = Some(attempt_timeout);
        self
    }

    /// Asks an inference instance to classify `image` and waits at most `timeout`
    /// for the answer.
    ///
    /// # Errors
    /// See [`PredictRequestError`]; an error *reply* (bad input, a busy
    /// instance) is `Ok(PredictReply::Err(..))`.
    pub async fn predict(&self, image: Bytes, timeout: Duration) -> Result<PredictReply, PredictRequestError> {
        let client = self.bus.client();
        let max_payload = client.server_info().max_payload;
        if max_payload > 0 && image.len() > max_payload {
            return Err(PredictRequestError::TooLarge { max_payload: Some(max_payload) });
        }
        let subject = self.bus.subjects().full(subjects::PREDICT);
        let started = Instant::now();
        let deadline = started + timeout;
        let mut disconnections = self.bus.disconnections();
        disconnections.borrow_and_update();
        let mut pause = Duration::from_millis(20);
        let mut attempt = 0u32;
        let span = debug_span!("nats.request", otel.kind = "client", %subject);
        let reply = loop {
            attempt += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(PredictRequestError::Timeout(timeout));
            }
            let wait = self.retry.map_or(remaining, |attempt_timeout| remaining.min(attempt_timeout));
            let mut request = async_nats::Request::new().payload(image.clone()).timeout(Some(wait));
            let mut headers = HeaderMap::new();
            crate::telemetry::inject_nats(&span, &mut headers);
            if !headers.is_empty() {
                request = request.headers(headers);
            }
            let went_away = async {
                if disconnections.changed().await.is_err() {
                    // No disconnection signal (a bus without one): only the timeouts apply.
                    std::future::pending::<()>().await;
                }
            };
            // The client's own timeout is the attempt's deadline; the outer one only
            // guards against a stuck client.
            let outcome = tokio::select! {
                biased;
                () = went_away => {
                    info!(attempt, "The NATS connection dropped with a prediction in flight; sending it again.");
                    continue;
                }
                outcome = tokio::time::timeout(
                    wait + Duration::from_millis(500),
                    client.send_request(subject.clone(), request).instrument(span.clone()),
                ) => outcome,
            };
            let failure = match outcome {
                Ok(Ok(reply)) => break reply,
                Err(_) => Failure::NoReply,
                Ok(Err(e)) => match e.kind() {
                    RequestErrorKind::TimedOut => Failure::NoReply,
                    RequestErrorKind::MaxPayloadExceeded => {
                        return Err(PredictRequestError::TooLarge { max_payload: None });
                    }
                    RequestErrorKind::NoResponders => Failure::NoResponders,
                    _ => Failure::Transport(e),
                },
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            // "No responders" is worth a retry only briefly: while instances move to
            // another server it lasts milliseconds; when none runs, the caller should
            // hear so at once rather than after its whole timeout.
            let grace = if self.retry.is_some() { NO_RESPONDERS_GRACE } else { Duration::ZERO };
            let gave_up = match failure {
                Failure::NoResponders => started.elapsed() >= grace,
                Failure::Transport(_) => self.retry.is_none(),
                Failure::NoReply => false,
            };
            if gave_up || remaining <= pause {
                return Err(match failure {
                    Failure::NoReply => PredictRequestError::Timeout(timeout),
                    Failure::NoResponders => PredictRequestError::NoResponders,
                    Failure::Transport(source) => PredictRequestError::Transport { attempts: attempt, source },
                });
            }
            if matches!(failure, Failure::NoReply) {
                info!(
                    attempt,
                    wait_ms = wait.as_millis() as u64,
                    "No reply within the attempt's timeout; sending it again."
                );
            } else {
                debug!(attempt, ?failure, "Prediction attempt failed; retrying.");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(250));
            }
        };
        serde_json::from_slice(&reply.payload).map_err(PredictRequestError::BadReply)
    }
}

impl Bus {
    /// Takes `mnist.predict` requests in the queue group `inference`, so N
    /// instances share the load.
    ///
    /// # Errors
    /// The subscription cannot be made.
    pub async fn serve_predictions(&self) -> Result<PredictRequests, BusError> {
        let subject = self.subjects().full(subjects::PREDICT);
        let subscriber = self
            .client()
            .queue_subscribe(subject.clone(), subjects::PREDICT_QUEUE_GROUP.to_owned())
            .await
            .map_err(|e| BusError::subscribe(subject.clone(), e))?;
        info!(%subject, group = subjects::PREDICT_QUEUE_GROUP, "Serving predictions over NATS.");
        Ok(PredictRequests { client: self.client().clone(), subscriber })
    }
}

/// The serving side's subscription.
pub struct PredictRequests {
    client: Client,
    subscriber: Subscriber,
}

impl std::fmt::Debug for PredictRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PredictRequests").finish_non_exhaustive()
    }
}

impl PredictRequests {
    /// The next request that can be answered (one without a reply subject is
    /// logged and skipped); `None` when the subscription ends.
    pub async fn next(&mut self) -> Option<PredictRequest> {
        loop {
            let msg = self.subscriber.next().await?;
            let Some(reply) = msg.reply else {
                debug!("mnist.predict without a reply subject ignored.");
                continue;
            };
            return Some(PredictRequest {
                image: msg.payload,
                headers: msg.headers,
                responder: Responder { client: self.client.clone(), reply },
            });
        }
    }

    /// Stops taking requests (those taken are still answered through their responders).
    pub async fn unsubscribe(mut self) {
        if let Err(e) = self.subscriber.unsubscribe().await {
            debug!(error = %e, "Unsubscribing from mnist.predict failed.");
        }
    }
}

/// One request: the image and where its answer goes.
#[derive(Debug)]
pub struct PredictRequest {
    pub image: Bytes,
    /// The requester's headers (its trace context).
    pub headers: Option<HeaderMap>,
    pub responder: Responder,
}

/// Answers one request.
#[derive(Debug)]
pub struct Responder {
    client: Client,
    reply: Subject,
}

impl Responder {
    /// Sends `reply` as JSON, in the shape HTTP answers have (untagged: the
    /// prediction or the `{"error": ...}` object alone).
    ///
    /// # Errors
    /// The reply could not be encoded or sent.
    pub async fn send(self, reply: &PredictReply) -> Result<(), BusError> {
        let body = serde_json::to_vec(reply)?;
        let subject = self.reply.to_string();
        self.client.publish(self.reply, body.into()).await.map_err(|e| BusError::Publish {
            subject,
            attempts: 1,
            source: e.into(),
        })
    }
}
