//! `POST /api/predict`: the inference HTTP API's input and output, answered by
//! whichever inference instance takes the NATS request.
//!
//! Input: a multipart form with the image in field `file`, or the image itself as
//! the body (`image/*` or `application/octet-stream`). The body is capped at
//! `WEB_MAX_UPLOAD_BYTES` while it is read, so an oversized upload is answered
//! 413 before anything reaches NATS. The image bytes, unchanged, are the payload
//! of a request to `<prefix>.predict`; the reply (a `Prediction`, or a
//! `PredictError` whose code becomes the HTTP status) is passed through; an
//! instance's "busy" reply (code 429: its decode budget is full) becomes 503
//! with the `Retry-After` it suggested.
//!
//! At most `WEB_MAX_PREDICTIONS` predictions are in flight, counted from before
//! the upload is read (so the bodies in memory are bounded too); beyond that
//! the answer is 503 with `Retry-After`. An upload must arrive within
//! `WEB_UPLOAD_TIMEOUT_MS` (408 otherwise), so a client trickling its body
//! cannot hold a slot.

use std::time::{Duration, Instant};

use bytes::Bytes;
use mnistflow_nats::async_nats::{self, RequestErrorKind};
use mnistflow_nats::{PredictReply, subjects, telemetry};
use rocket::data::{self, Data, FromData, ToByteUnit};
use rocket::http::{ContentType, Status};
use rocket::request::{self, FromRequest};
use rocket::{Request, State, post};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{Instrument, debug, debug_span, info, info_span, warn};

use crate::AppState;
use crate::error::ApiError;

/// The image bytes of an upload, and its slot among the predictions in flight.
#[derive(Debug)]
pub struct Upload(pub Bytes, OwnedSemaphorePermit);

/// The `code` of an inference instance's reply when its decode budget is full
/// (the inference crate's `BUSY_CODE`; the web tier does not link it).
const BUSY_CODE: u16 = 429;

#[rocket::async_trait]
impl<'r> FromData<'r> for Upload {
    type Error = ApiError;

    async fn from_data(req: &'r Request<'_>, data: Data<'r>) -> data::Outcome<'r, Self> {
        let Some(state) = req.rocket().state::<AppState>() else {
            return data::Outcome::Error(ApiError::new(Status::InternalServerError, "no state").stash(req));
        };
        let Ok(permit) = state.predictions.clone().try_acquire_owned() else {
            state.metrics.prediction("busy", None);
            let busy = ApiError::new(
                Status::ServiceUnavailable,
                "too many predictions in flight on this server; try again in a moment",
            )
            .retry_after(Some(1));
            return data::Outcome::Error(busy.stash(req));
        };
        let timeout = state.config.upload_timeout;
        let read = tokio::time::timeout(timeout, read_upload(req, data, state.config.max_upload_bytes));
        match read.await {
            Ok(Ok(bytes)) => data::Outcome::Success(Self(bytes, permit)),
            Ok(Err(e)) => data::Outcome::Error(e.stash(req)),
            Err(_) => {
                state.metrics.prediction("upload_timeout", None);
                let slow = ApiError::new(
                    Status::RequestTimeout,
                    format!("the upload did not arrive within {} ms", timeout.as_millis()),
                );
                data::Outcome::Error(slow.stash(req))
            }
        }
    }
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(Status::PayloadTooLarge, format!("the image is larger than the {limit} bytes this service accepts"))
}

enum Kind {
    Raw,
    Multipart(String),
}

async fn read_upload(req: &Request<'_>, data: Data<'_>, limit: u64) -> Result<Bytes, ApiError> {
    if let Some(length) = req.headers().get_one("Content-Length").and_then(|v| v.trim().parse::<u64>().ok())
        && length > limit
    {
        return Err(too_large(limit));
    }
    let kind = match req.content_type() {
        None => Kind::Raw,
        Some(ct) if ct.top() == "multipart" && ct.sub() == "form-data" => match ct.param("boundary") {
            Some(b) => Kind::Multipart(b.to_owned()),
            None => return Err(ApiError::new(Status::BadRequest, "multipart body without a boundary")),
        },
        Some(ct) if ct.top() == "image" || *ct == ContentType::Binary => Kind::Raw,
        Some(other) => {
            return Err(ApiError::new(
                Status::UnsupportedMediaType,
                format!("send an image: a multipart form with field `file`, or an image/* body (got {other})"),
            ));
        }
    };
    let capped = data
        .open(limit.bytes())
        .into_bytes()
        .await
        .map_err(|e| ApiError::new(Status::BadRequest, format!("reading the upload failed: {e}")))?;
    if !capped.is_complete() {
        return Err(too_large(limit));
    }
    let body = Bytes::from(capped.into_inner());
    let image = match kind {
        Kind::Raw => body,
        Kind::Multipart(boundary) => file_field(body, boundary).await?,
    };
    if image.is_empty() {
        return Err(ApiError::new(Status::BadRequest, "the image is empty"));
    }
    Ok(image)
}

async fn file_field(body: Bytes, boundary: String) -> Result<Bytes, ApiError> {
    let bad = |e: multer::Error| ApiError::new(Status::BadRequest, format!("malformed multipart body: {e}"));
    let stream = futures::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    while let Some(field) = multipart.next_field().await.map_err(bad)? {
        if field.name() == Some("file") {
            return field.bytes().await.map_err(bad);
        }
    }
    Err(ApiError::new(Status::BadRequest, "the multipart form has no `file` field"))
}

/// The W3C trace context a caller sent (`traceparent`, `tracestate`), if any.
pub(crate) struct TraceContext<'r> {
    parent: Option<&'r str>,
    state: Option<&'r str>,
}

#[rocket::async_trait]
impl<'r> FromRequest<'r> for TraceContext<'r> {
    type Error = std::convert::Infallible;

    async fn from_request(req: &'r Request<'_>) -> request::Outcome<Self, Self::Error> {
        let headers = req.headers();
        request::Outcome::Success(Self { parent: headers.get_one("traceparent"), state: headers.get_one("tracestate") })
    }
}

/// A prediction's JSON, passed through as the inference instance wrote it.
#[derive(rocket::Responder)]
#[response(status = 200, content_type = "json")]
pub(crate) struct PredictionJson(Vec<u8>);

#[post("/api/predict", data = "<upload>")]
pub(crate) async fn predict(
    upload: Result<Upload, ApiError>,
    trace: TraceContext<'_>,
    state: &State<AppState>,
) -> Result<PredictionJson, ApiError> {
    let Upload(image, _slot) = upload?;
    let span = info_span!("predict", bytes = image.len(), otel.kind = "server", otel.name = "POST /api/predict");
    // The page's trace when it sent one; otherwise this span starts the trace.
    telemetry::set_parent_from_http(&span, trace.parent, trace.state);
    forward(state, image).instrument(span).await
}

async fn forward(state: &AppState, image: Bytes) -> Result<PredictionJson, ApiError> {
    let client = state.bus.client();
    let max_payload = client.server_info().max_payload;
    if max_payload > 0 && image.len() > max_payload {
        state.metrics.prediction("too_large", None);
        return Err(ApiError::new(
            Status::PayloadTooLarge,
            format!("the image is larger than the message bus accepts ({max_payload} bytes)"),
        ));
    }
    let subject = state.bus.subjects().full(subjects::PREDICT);
    let timeout = state.config.predict_timeout;
    let started = Instant::now();
    let deadline = started + timeout;
    let mut disconnections = state.bus.disconnections();
    disconnections.borrow_and_update();
    let mut pause = Duration::from_millis(20);
    let mut attempt = 0u32;
    // Retried within the page's deadline: a request whose NATS server went away
    // (its reply can never come), an attempt that outlived its own timeout (the
    // reply came back through a server that died), and "no responders" (the
    // inference instances are resubscribing on the servers that remain). A
    // prediction changes nothing, so sending it twice is harmless.
    // The inference instance's spans join this trace through the message headers.
    let span = debug_span!("nats.request", otel.kind = "client", %subject);
    let reply = loop {
        attempt += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(timed_out(state, timeout));
        }
        let wait = remaining.min(state.config.predict_attempt_timeout);
        let mut request = async_nats::Request::new().payload(image.clone()).timeout(Some(wait));
        let mut headers = async_nats::HeaderMap::new();
        telemetry::inject_nats(&span, &mut headers);
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
            Err(_) => None,
            Ok(Err(e)) => match e.kind() {
                RequestErrorKind::TimedOut => None,
                RequestErrorKind::MaxPayloadExceeded => {
                    state.metrics.prediction("too_large", None);
                    return Err(ApiError::new(
                        Status::PayloadTooLarge,
                        "the image is larger than the message bus accepts",
                    ));
                }
                RequestErrorKind::NoResponders => Some(Failure::NoResponders),
                _ => Some(Failure::Bus(e.to_string())),
            },
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        // "No responders" is worth a retry only briefly: while instances move to
        // another server it lasts milliseconds; when none runs, the page should
        // say so at once rather than after its whole timeout.
        let gave_up = matches!(failure, Some(Failure::NoResponders)) && started.elapsed() >= NO_RESPONDERS_GRACE;
        if gave_up || remaining <= pause {
            return Err(match failure {
                None => timed_out(state, timeout),
                Some(Failure::NoResponders) => {
                    state.metrics.prediction("no_responders", None);
                    ApiError::new(
                        Status::ServiceUnavailable,
                        "no inference instance is running: start one (or wait for one to load a model) and try again",
                    )
                }
                Some(Failure::Bus(error)) => {
                    warn!(%error, attempt, "Prediction request failed.");
                    state.metrics.prediction("bus_error", None);
                    ApiError::new(Status::ServiceUnavailable, "the message bus is unavailable; try again shortly")
                }
            });
        }
        if let Some(failure) = &failure {
            debug!(attempt, ?failure, "Prediction attempt failed; retrying.");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        } else {
            info!(
                attempt,
                wait_ms = wait.as_millis() as u64,
                "No reply within the attempt's timeout; sending it again."
            );
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    match serde_json::from_slice::<PredictReply>(&reply.payload) {
        Ok(PredictReply::Ok(_)) => {
            state.metrics.prediction("ok", Some(seconds));
            Ok(PredictionJson(reply.payload.to_vec()))
        }
        Ok(PredictReply::Err(e)) => {
            state.metrics.prediction("rejected", Some(seconds));
            let code = e.error.code;
            let status = match code {
                BUSY_CODE => Status::ServiceUnavailable,
                400..600 => Status::new(code),
                _ => Status::BadGateway,
            };
            let retry_after = e.error.retry_after.or((status == Status::ServiceUnavailable).then_some(1));
            Err(ApiError::new(status, e.error.message).retry_after(retry_after))
        }
        Err(e) => {
            warn!(error = %e, "Undecodable prediction reply.");
            state.metrics.prediction("bad_reply", Some(seconds));
            Err(ApiError::new(Status::BadGateway, "the inference instance sent an answer this page cannot read"))
        }
    }
}

/// How long "no responders" is retried: inference instances that lost their
/// server are subscribed again on another within this (loopback: ~10 ms).
const NO_RESPONDERS_GRACE: Duration = Duration::from_millis(1500);

/// Why an attempt failed when it is worth another.
#[derive(Debug)]
enum Failure {
    NoResponders,
    Bus(String),
}

fn timed_out(state: &AppState, timeout: Duration) -> ApiError {
    state.metrics.prediction("timeout", None);
    ApiError::new(
        Status::GatewayTimeout,
        format!("no inference instance answered within {} ms; try again", timeout.as_millis()),
    )
}
