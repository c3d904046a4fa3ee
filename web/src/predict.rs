//! `POST /api/predict`: the inference HTTP API's input and output, answered by
//! whichever inference instance takes the NATS request.
//!
//! Input: a multipart form with the image in field `file`, or the image itself as
//! the body (`image/*` or `application/octet-stream`). The body is capped at
//! `WEB_MAX_UPLOAD_BYTES` while it is read, so an oversized upload is answered
//! 413 before anything reaches NATS. The image bytes, unchanged, go to
//! `<prefix>.predict` through the contract's [`PredictClient`]; the reply (a
//! `Prediction`, or a `PredictError` whose code becomes the HTTP status) is
//! answered in the same JSON.
//! An instance's "busy" reply (503, or 429: its decode budget is full) becomes 503
//! with the `Retry-After` it suggested.
//!
//! At most `WEB_MAX_PREDICTIONS` predictions are in flight, counted from before
//! the upload is read (so the bodies in memory are bounded too); beyond that
//! the answer is 503 with `Retry-After`. An upload must arrive within
//! `WEB_UPLOAD_TIMEOUT_MS` (408 otherwise), so a client trickling its body
//! cannot hold a slot.

use std::time::Instant;

use bytes::Bytes;
use mnistflow_nats::{PredictClient, PredictReply, PredictRequestError, Prediction, Refusal, telemetry};
use rocket::data::{self, Data, FromData, ToByteUnit};
use rocket::http::{ContentType, Status};
use rocket::request::{self, FromRequest};
use rocket::serde::json::Json;
use rocket::{Request, State, post};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{Instrument, info_span, warn};

use crate::AppState;
use crate::error::ApiError;

/// The image bytes of an upload, and its slot among the predictions in flight.
#[derive(Debug)]
pub struct Upload(pub Bytes, OwnedSemaphorePermit);

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
            .retry_after(1);
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

#[post("/api/predict", data = "<upload>")]
pub(crate) async fn predict(
    upload: Result<Upload, ApiError>,
    trace: TraceContext<'_>,
    state: &State<AppState>,
) -> Result<Json<Prediction>, ApiError> {
    let Upload(image, _slot) = upload?;
    let span = info_span!("predict", bytes = image.len(), otel.kind = "server", otel.name = "POST /api/predict");
    // The page's trace when it sent one; otherwise this span starts the trace.
    telemetry::set_parent_from_http(&span, trace.parent, trace.state);
    forward(state, image).instrument(span).await
}

/// Sends the image to whichever inference instance takes it (retried within the
/// page's deadline, see [`PredictClient::with_retries`]) and turns the answer
/// into this page's: the reply's own code for an error reply, 503 (with
/// `Retry-After` when the instance gave a hint) for a busy one.
async fn forward(state: &AppState, image: Bytes) -> Result<Json<Prediction>, ApiError> {
    let timeout = state.config.predict_timeout;
    let started = Instant::now();
    let client = PredictClient::new(state.bus.clone()).with_retries(state.config.predict_attempt_timeout);
    let outcome = client.predict(image, timeout).await;
    let seconds = started.elapsed().as_secs_f64();
    let (label, seconds, answer) = match outcome {
        Ok(PredictReply::Ok(prediction)) => ("ok", Some(seconds), Ok(Json(prediction))),
        Ok(PredictReply::Err(e)) => {
            let kind = e.kind();
            let status = match kind {
                Refusal::Busy { .. } => Status::ServiceUnavailable,
                Refusal::Rejected { code } if (400..600).contains(&code) => Status::new(code),
                Refusal::Rejected { .. } => Status::BadGateway,
            };
            let mut error = ApiError::new(status, e.error.message);
            if let Refusal::Busy { retry_after_secs: Some(secs) } = kind {
                error = error.retry_after(u64::from(secs));
            }
            ("rejected", Some(seconds), Err(error))
        }
        Err(e) => {
            let (label, status) = match &e {
                PredictRequestError::TooLarge { .. } => ("too_large", Status::PayloadTooLarge),
                PredictRequestError::Timeout(_) => ("timeout", Status::GatewayTimeout),
                PredictRequestError::NoResponders => ("no_responders", Status::ServiceUnavailable),
                PredictRequestError::Transport { .. } => ("bus_error", Status::ServiceUnavailable),
                PredictRequestError::BadReply(_) => ("bad_reply", Status::BadGateway),
            };
            let message = match &e {
                PredictRequestError::Transport { attempts, source } => {
                    warn!(error = %source, attempts, "Prediction request failed.");
                    "the message bus is unavailable; try again shortly".to_owned()
                }
                PredictRequestError::TooLarge { .. } => e.to_string(),
                PredictRequestError::Timeout(_) => {
                    format!("no inference instance answered within {} ms; try again", timeout.as_millis())
                }
                PredictRequestError::NoResponders => {
                    "no inference instance is running: start one (or wait for one to load a model) and try again"
                        .to_owned()
                }
                PredictRequestError::BadReply(source) => {
                    warn!(error = %source, "Undecodable prediction reply.");
                    "the inference instance sent an answer this page cannot read".to_owned()
                }
            };
            let seconds = matches!(e, PredictRequestError::BadReply(_)).then_some(seconds);
            (label, seconds, Err(ApiError::new(status, message)))
        }
    };
    state.metrics.prediction(label, seconds);
    answer
}
