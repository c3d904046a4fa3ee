//! `POST /api/feedback`: a person says which digit an answer really was; the
//! web tier publishes it as a `feedback.submitted` event (JetStream, so nothing
//! is lost while the feedback stage is down) and answers 202.
//!
//! The body is JSON of at most 16 KiB (Rocket's `json` limit):
//! `{"model_version", "predicted", "label", "input"}`, where `input` is the
//! reply's own 28×28 image ([`mnistflow_nats::Prediction::input`], 1,568 hex
//! digits): it cannot grow, and anything else is answered 422 naming the field.
//!
//! Who sent it: with `Authorization: Bearer <WEB_LABELLER_TOKEN>` the feedback
//! is from a trusted labeller (client key `labeller`); without one it is
//! anonymous and unverified (client key `ip-<hash of the client address>`, the
//! address as [`crate::lockout::client_address`] finds it, so a sender cannot
//! pick its own key to dodge the stage's per-client bound). A wrong token is
//! 403 and counts towards the same lockout as wrong admin tokens.
//!
//! `DELETE /api/feedback/<id>`: a person asks for their feedback to be deleted,
//! by the `event_id` the `POST` answered with (the page shows it). The id is the
//! capability: only its sender was told it, and it cannot be guessed (a UUID v7:
//! past its millisecond, a counter seeded at random every millisecond and 32
//! random bits), so no other proof is asked. The web tier publishes `feedback.delete`
//! on the feedback stream and answers 202; the feedback stage deletes the sample
//! and announces `feedback.deleted` (`found: false` for an id it does not hold).

use mnistflow_nats::{EventId, FeedbackDelete, FeedbackSubmitted, ModelVersion};
use rocket::http::Status;
use rocket::request::{FromRequest, Outcome};
use rocket::serde::json::Json;
use rocket::{Request, State, delete, post};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::AppState;
use crate::error::ApiError;
use crate::lockout::Failure;

/// The sender, as far as this server can tell.
#[derive(Debug)]
pub struct Sender {
    /// The client key the stage bounds by.
    pub client: String,
    pub trusted: bool,
}

/// The client key of an anonymous sender at `ip`: a hash, not the address.
pub fn anonymous_client(ip: std::net::IpAddr) -> String {
    let digest = Sha256::digest(format!("mnistflow feedback client {ip}").as_bytes());
    format!("ip-{}", &hex_prefix(&digest))
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[rocket::async_trait]
impl<'r> FromRequest<'r> for Sender {
    type Error = ApiError;

    async fn from_request(req: &'r Request<'_>) -> Outcome<Self, Self::Error> {
        let Some(state) = req.rocket().state::<AppState>() else {
            return Outcome::Error(ApiError::new(Status::InternalServerError, "no state").stash(req));
        };
        let now = std::time::Instant::now();
        let ip = crate::admin::client_of(req, state);
        let Some(token) = crate::admin::bearer(req) else {
            return Outcome::Success(Self { client: anonymous_client(ip), trusted: false });
        };
        let Some(expected) = &state.config.labeller_token else {
            let refused = ApiError::new(
                Status::Forbidden,
                "this server has no labeller token (WEB_LABELLER_TOKEN): send feedback without Authorization",
            );
            return Outcome::Error(refused.stash(req));
        };
        if let Err(left) = state.admin_lockout.check(ip, now) {
            state.metrics.feedback("locked_out");
            return Outcome::Error(crate::admin::locked_out(left).stash(req));
        }
        if crate::admin::token_matches(expected.expose_secret(), token) {
            state.admin_lockout.succeeded(ip);
            return Outcome::Success(Self { client: "labeller".into(), trusted: true });
        }
        state.metrics.feedback("wrong_token");
        match state.admin_lockout.failed(ip, now) {
            Failure::Counted { left } => {
                warn!(client = %ip, attempts_left = left, "Feedback with a wrong labeller token.");
                Outcome::Error(ApiError::new(Status::Forbidden, "the labeller token is wrong").stash(req))
            }
            Failure::LockedOut(period) => {
                state.metrics.admin_lockout();
                warn!(client = %ip, lockout_secs = period.as_secs(), "Too many wrong tokens: client locked out.");
                Outcome::Error(crate::admin::locked_out(period).stash(req))
            }
        }
    }
}

/// Body of `POST /api/feedback`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackBody {
    pub model_version: String,
    pub predicted: u8,
    pub label: u8,
    pub input: String,
}

/// The answer to accepted feedback.
#[derive(Debug, Serialize, Deserialize)]
pub struct FeedbackAccepted {
    pub event_id: EventId,
    /// Whether it counts as a trusted labeller's.
    pub trusted: bool,
}

#[post("/api/feedback", data = "<request>")]
pub(crate) async fn feedback(
    sender: Sender,
    request: Result<Json<FeedbackBody>, rocket::serde::json::Error<'_>>,
    state: &State<AppState>,
) -> Result<(Status, Json<FeedbackAccepted>), ApiError> {
    if let Err(rocket::serde::json::Error::Io(e)) = &request
        && e.to_string().contains("limit")
    {
        state.metrics.feedback("too_large");
        return Err(ApiError::new(Status::PayloadTooLarge, "feedback bodies are at most 16 KiB"));
    }
    let request = crate::admin::body(request).inspect_err(|_| state.metrics.feedback("invalid"))?;
    let event = FeedbackSubmitted {
        event_id: EventId::new(),
        model_version: ModelVersion::from(request.model_version.trim()),
        predicted: request.predicted,
        label: request.label,
        input: request.input.to_ascii_lowercase(),
        client: sender.client,
        trusted: sender.trusted,
        at: chrono::Utc::now(),
    };
    if let Err(reason) = event.validate() {
        state.metrics.feedback("invalid");
        return Err(ApiError::new(Status::UnprocessableEntity, reason));
    }
    match state.bus.publish(&event).await {
        Ok(published) => {
            state.metrics.feedback(if event.trusted { "trusted" } else { "unverified" });
            info!(event_id = %event.event_id, sequence = published.sequence, trusted = event.trusted, "Feedback published.");
            Ok((Status::Accepted, Json(FeedbackAccepted { event_id: event.event_id, trusted: event.trusted })))
        }
        Err(e) => {
            state.metrics.feedback("failed");
            warn!(error = %format!("{e:#}"), "Publishing feedback failed.");
            Err(ApiError::new(Status::ServiceUnavailable, "feedback cannot be taken right now; try again later")
                .retry_after(5))
        }
    }
}

/// The answer to a deletion request.
#[derive(Debug, Serialize, Deserialize)]
pub struct FeedbackDeleteAccepted {
    /// The `feedback.delete` command (the `feedback.deleted` event names it as `request_id`).
    pub event_id: EventId,
    pub feedback_id: EventId,
}

#[delete("/api/feedback/<id>")]
pub(crate) async fn delete_feedback(
    id: &str,
    state: &State<AppState>,
) -> Result<(Status, Json<FeedbackDeleteAccepted>), ApiError> {
    let Ok(feedback_id) = id.parse::<EventId>() else {
        state.metrics.feedback("delete_invalid");
        return Err(ApiError::new(
            Status::UnprocessableEntity,
            "the feedback id is the UUID POST /api/feedback answered",
        ));
    };
    let command = FeedbackDelete { event_id: EventId::new(), feedback_id, requested_at: chrono::Utc::now() };
    match state.bus.publish(&command).await {
        Ok(published) => {
            state.metrics.feedback("delete_requested");
            info!(%feedback_id, sequence = published.sequence, "Feedback deletion requested.");
            Ok((Status::Accepted, Json(FeedbackDeleteAccepted { event_id: command.event_id, feedback_id })))
        }
        Err(e) => {
            state.metrics.feedback("failed");
            warn!(error = %format!("{e:#}"), "Publishing a feedback deletion failed.");
            Err(ApiError::new(Status::ServiceUnavailable, "deletion cannot be requested right now; try again later")
                .retry_after(5))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_clients_are_keyed_by_a_hash_of_their_address() {
        let a = anonymous_client("192.0.2.1".parse().unwrap());
        assert_eq!(a, anonymous_client("192.0.2.1".parse().unwrap()));
        assert_ne!(a, anonymous_client("192.0.2.2".parse().unwrap()));
        assert!(FeedbackSubmitted::client_is_valid(&a), "{a}");
        assert!(!a.contains("192"));
    }
}
