//! `POST /api/admin/{download,train,promote}`: commands published on the bus,
//! allowed only with the admin token.
//!
//! The API exists only when `WEB_ADMIN_TOKEN` is set (404 otherwise, as if the
//! routes were absent). A request without `Authorization: Bearer <token>` gets
//! 401, a wrong token 403. Tokens are compared through their SHA-256 digests
//! with a constant-time comparison, so neither content nor length leaks through
//! timing. Wrong tokens count against the client that sent them: past
//! `WEB_ADMIN_MAX_FAILURES` the client gets 429 with `Retry-After`, whatever it
//! sends, for `WEB_ADMIN_LOCKOUT_SECS` (see [`crate::lockout`] for who a client
//! is behind each load balancer). A published command answers 202 with its
//! event id: the effect is asynchronous and shows up on the event stream.

use mnistflow_nats::{DatasetDownload, EventId, Message, ModelPromote, ModelVersion, TrainRequest};
use rocket::http::Status;
use rocket::request::{FromRequest, Outcome};
use rocket::serde::json::Json;
use rocket::{Request, State, post};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::{info, warn};

use crate::AppState;
use crate::error::ApiError;
use crate::lockout::Failure;

/// Who the commands are attributed to (`requested_by`).
const REQUESTED_BY: &str = "web admin";

/// Proof that the request carried the admin token.
#[derive(Debug)]
pub struct Admin(());

/// Whether `given` is the configured token, in time independent of both.
pub fn token_matches(expected: &str, given: &str) -> bool {
    let expected = Sha256::digest(expected.as_bytes());
    let given = Sha256::digest(given.as_bytes());
    expected.as_slice().ct_eq(given.as_slice()).into()
}

/// The client a request comes from, as the lockout counts clients (see
/// [`crate::lockout::client_address`]).
pub(crate) fn client_of(req: &Request<'_>, state: &AppState) -> std::net::IpAddr {
    let peer = req.remote().map(|a| a.ip());
    crate::lockout::client_address(peer, req.headers().get("X-Forwarded-For"), state.config.forwarded_for_hops)
        .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]))
}

/// The bearer token of `Authorization`, if one is given.
pub(crate) fn bearer<'r>(req: &'r Request<'_>) -> Option<&'r str> {
    req.headers()
        .get_one("Authorization")
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

#[rocket::async_trait]
impl<'r> FromRequest<'r> for Admin {
    type Error = ApiError;

    async fn from_request(req: &'r Request<'_>) -> Outcome<Self, Self::Error> {
        let Some(state) = req.rocket().state::<AppState>() else {
            return Outcome::Error(ApiError::new(Status::InternalServerError, "no state").stash(req));
        };
        let Some(expected) = &state.config.admin_token else {
            return Outcome::Error(ApiError::new(Status::NotFound, "no such page or API route").stash(req));
        };
        let now = std::time::Instant::now();
        let peer = req.remote().map(|a| a.ip());
        let client = client_of(req, state);
        if let Err(left) = state.admin_lockout.check(client, now) {
            state.metrics.admin_auth_failure("locked_out", state.admin_lockout.locked(now));
            return Outcome::Error(locked_out(left).stash(req));
        }
        match bearer(req) {
            None => Outcome::Error(
                ApiError::new(Status::Unauthorized, "the admin token is required (Authorization: Bearer <token>)")
                    .stash(req),
            ),
            Some(token) if token_matches(expected.expose_secret(), token) => {
                state.admin_lockout.succeeded(client);
                Outcome::Success(Self(()))
            }
            Some(_) => {
                let failure = state.admin_lockout.failed(client, now);
                state.metrics.admin_auth_failure("wrong_token", state.admin_lockout.locked(now));
                match failure {
                    Failure::Counted { left } => {
                        warn!(%client, ?peer, attempts_left = left, "Admin request with a wrong token.");
                        Outcome::Error(ApiError::new(Status::Forbidden, "the admin token is wrong").stash(req))
                    }
                    Failure::LockedOut(period) => {
                        state.metrics.admin_lockout();
                        warn!(%client, ?peer, lockout_secs = period.as_secs(), "Too many wrong admin tokens: client locked out.");
                        Outcome::Error(locked_out(period).stash(req))
                    }
                }
            }
        }
    }
}

pub(crate) fn locked_out(left: std::time::Duration) -> ApiError {
    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    ApiError::new(
        Status::TooManyRequests,
        format!("too many wrong admin tokens from this address; try again in {secs} s"),
    )
    .retry_after(secs)
}

/// The answer to an accepted command.
#[derive(Debug, Serialize, Deserialize)]
pub struct Accepted {
    pub event_id: EventId,
    pub subject: String,
    pub sequence: u64,
    pub duplicate: bool,
}

/// Body of `POST /api/admin/download`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadBody {
    #[serde(default)]
    pub auto_train: Option<bool>,
}

/// Body of `POST /api/admin/train`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainBody {
    #[serde(default)]
    pub epochs: Option<i64>,
    #[serde(default)]
    pub preset: Option<String>,
}

/// Body of `POST /api/admin/promote`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteBody {
    pub version: String,
}

/// The most epochs the page may ask for: more is a job for the CLI.
pub const MAX_EPOCHS: i64 = 100;

pub(crate) fn body<T>(body: Result<Json<T>, rocket::serde::json::Error<'_>>) -> Result<T, ApiError> {
    body.map(Json::into_inner).map_err(|e| {
        let status = match e {
            rocket::serde::json::Error::Io(_) => Status::BadRequest,
            rocket::serde::json::Error::Parse(..) => Status::UnprocessableEntity,
        };
        ApiError::new(status, format!("invalid JSON body: {e}"))
    })
}

async fn publish<M: Message>(
    state: &AppState,
    command: &str,
    message: M,
) -> Result<(Status, Json<Accepted>), ApiError> {
    match state.bus.publish(&message).await {
        Ok(published) => {
            state.metrics.admin_command(command, "published");
            info!(command, event_id = %message.event_id(), sequence = published.sequence, "Admin command published.");
            Ok((
                Status::Accepted,
                Json(Accepted {
                    event_id: message.event_id(),
                    subject: state.bus.subjects().full(M::SUBJECT),
                    sequence: published.sequence,
                    duplicate: published.duplicate,
                }),
            ))
        }
        Err(e) => {
            state.metrics.admin_command(command, "failed");
            warn!(command, error = %e, "Publishing an admin command failed.");
            Err(ApiError::new(Status::ServiceUnavailable, "the message bus is unavailable; try again shortly"))
        }
    }
}

#[post("/api/admin/download", data = "<request>")]
pub(crate) async fn download(
    _admin: Admin,
    request: Result<Json<DownloadBody>, rocket::serde::json::Error<'_>>,
    state: &State<AppState>,
) -> Result<(Status, Json<Accepted>), ApiError> {
    let request = body(request)?;
    let command = DatasetDownload {
        auto_train: request.auto_train,
        requested_by: Some(REQUESTED_BY.into()),
        ..DatasetDownload::default()
    };
    publish(state, "download", command).await
}

#[post("/api/admin/train", data = "<request>")]
pub(crate) async fn train(
    _admin: Admin,
    request: Result<Json<TrainBody>, rocket::serde::json::Error<'_>>,
    state: &State<AppState>,
) -> Result<(Status, Json<Accepted>), ApiError> {
    let request = body(request)?;
    if let Some(epochs) = request.epochs
        && !(1..=MAX_EPOCHS).contains(&epochs)
    {
        return Err(ApiError::new(Status::UnprocessableEntity, format!("epochs must be between 1 and {MAX_EPOCHS}")));
    }
    let preset = request.preset.map(|p| p.trim().to_owned()).filter(|p| !p.is_empty());
    if let Some(p) = &preset
        && (p.len() > 64 || !p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    {
        return Err(ApiError::new(Status::UnprocessableEntity, "preset must be a name of letters, digits, - and _"));
    }
    let command = TrainRequest {
        epochs: request.epochs,
        preset,
        requested_by: Some(REQUESTED_BY.into()),
        ..TrainRequest::default()
    };
    publish(state, "train", command).await
}

#[post("/api/admin/promote", data = "<request>")]
pub(crate) async fn promote(
    _admin: Admin,
    request: Result<Json<PromoteBody>, rocket::serde::json::Error<'_>>,
    state: &State<AppState>,
) -> Result<(Status, Json<Accepted>), ApiError> {
    let request = body(request)?;
    let version = request.version.trim();
    if !ModelVersion::is_valid(version) {
        return Err(ApiError::new(Status::UnprocessableEntity, format!("{version:?} is not a model version")));
    }
    let command = ModelPromote {
        event_id: EventId::new(),
        version: ModelVersion::from(version),
        requested_by: Some(REQUESTED_BY.into()),
    };
    publish(state, "promote", command).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_when_identical() {
        assert!(token_matches("0123456789abcdef", "0123456789abcdef"));
        assert!(!token_matches("0123456789abcdef", "0123456789abcdeF"));
        assert!(!token_matches("0123456789abcdef", "0123456789abcde"));
        assert!(!token_matches("0123456789abcdef", ""));
    }
}
