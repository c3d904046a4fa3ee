//! The HTTP API (documented in `inference/openapi.yaml`, which a test checks
//! against the mounted routes):
//!
//! - `POST /v1/predict`: an image as `multipart/form-data` field `file`, or as the
//!   raw body (`image/*`, or `application/octet-stream` which also takes 784 raw
//!   pixels); answers [`Prediction`] JSON.
//! - `GET /v1/models`: the version served, its metadata, the versions available.
//! - `GET /healthz` (alive), `GET /readyz` (a model is loaded), `GET /metrics`.
//!
//! Every error is a JSON [`PredictError`] body, mapped in one place ([`ApiError`]'s
//! responder, plus one catcher for Rocket's own errors); 503s carry `Retry-After`.

use std::sync::Arc;
use std::time::Instant;

use mnistflow_nats::{PredictError, Prediction, telemetry};
use mnistflow_runtime::http::OpenMetrics;
use rocket::data::{Capped, Data, ToByteUnit};
use rocket::form::error::ErrorKind;
use rocket::form::{Errors, Form, FromForm};
use rocket::http::{ContentType, Header, Status};
use rocket::request::{FromRequest, Outcome, Request};
use rocket::response::{self, Responder, Response};
use rocket::serde::json::Json;
use rocket::{Build, Rocket, State, catch, catchers, get, post, routes};
use serde_json::{Value, json};
use tracing::{Instrument, debug_span, error};

use crate::config::Config;
use crate::preprocess::PreprocessError;
use crate::service::{ApiError, Service};

impl<'r> Responder<'r, 'static> for ApiError {
    fn respond_to(self, req: &'r Request<'_>) -> response::Result<'static> {
        let status = Status::from_code(self.status()).unwrap_or(Status::InternalServerError);
        if status.code >= 500 {
            error!(status = status.code, error = %self, "Request failed.");
        }
        let mut response = Response::build_from(Json(self.body()).respond_to(req)?).status(status).finalize();
        if let Some(seconds) = self.retry_after() {
            response.set_header(Header::new("Retry-After", seconds.to_string()));
        }
        Ok(response)
    }
}

/// The declared `Content-Length`, if any (to refuse an oversized body unread).
struct ContentLength(Option<u64>);

#[rocket::async_trait]
impl<'r> FromRequest<'r> for ContentLength {
    type Error = std::convert::Infallible;

    async fn from_request(req: &'r Request<'_>) -> Outcome<Self, Self::Error> {
        Outcome::Success(Self(req.headers().get_one("Content-Length").and_then(|v| v.trim().parse().ok())))
    }
}

/// The caller's W3C trace context; the request's span joins its trace.
struct TraceContext<'r> {
    parent: Option<&'r str>,
    state: Option<&'r str>,
}

impl TraceContext<'_> {
    fn span(&self, kind: &'static str) -> tracing::Span {
        let span = debug_span!("predict", route = "http", kind, otel.kind = "server");
        telemetry::set_parent_from_http(&span, self.parent, self.state);
        span
    }
}

#[rocket::async_trait]
impl<'r> FromRequest<'r> for TraceContext<'r> {
    type Error = std::convert::Infallible;

    async fn from_request(req: &'r Request<'_>) -> Outcome<Self, Self::Error> {
        let headers = req.headers();
        Outcome::Success(Self { parent: headers.get_one("traceparent"), state: headers.get_one("tracestate") })
    }
}

#[derive(FromForm)]
struct Upload<'r> {
    file: Capped<&'r [u8]>,
}

fn too_large(service: &Service, size: u64) -> ApiError {
    ApiError::Input(PreprocessError::BodyTooLarge { size, limit: service.limits.max_body_bytes })
}

async fn answer(
    service: &Service,
    started: Instant,
    result: Result<Prediction, ApiError>,
) -> Result<Json<Prediction>, ApiError> {
    let status = result.as_ref().map_or_else(ApiError::status, |_| 200);
    service.metrics.request("http", status, started.elapsed().as_secs_f64());
    result.map(Json)
}

#[post("/v1/predict", format = "multipart/form-data", data = "<form>", rank = 1)]
async fn predict_form(
    length: ContentLength,
    trace: TraceContext<'_>,
    form: Result<Form<Upload<'_>>, Errors<'_>>,
    service: &State<Arc<Service>>,
) -> Result<Json<Prediction>, ApiError> {
    let started = Instant::now();
    let result = async {
        if let ContentLength(Some(n)) = length
            && n > service.limits.max_body_bytes
        {
            return Err(too_large(service, n));
        }
        let form = form.map_err(|errors| {
            tracing::debug!(%errors, "Multipart form refused.");
            // Rocket reports a size limit as an invalid length with a maximum
            // (an incomplete stream has none), or as multer's size errors.
            let over_limit = |e: &rocket::form::Error<'_>| {
                matches!(e.kind, ErrorKind::InvalidLength { max: Some(_), .. })
                    || (matches!(e.kind, ErrorKind::Multipart(_)) && e.status() == Status::PayloadTooLarge)
                    // A chunked body over the limit surfaces as an I/O error.
                    || (matches!(e.kind, ErrorKind::Io(_)) && e.to_string().contains("size exceeded"))
            };
            if errors.iter().any(over_limit) {
                too_large(service, service.limits.max_body_bytes + 1)
            } else if errors.iter().any(|e| matches!(e.kind, ErrorKind::Missing)) {
                ApiError::Other(400, "multipart/form-data needs an image in the field `file`".into())
            } else {
                ApiError::Other(400, format!("malformed multipart/form-data: {errors}"))
            }
        })?;
        if !form.file.is_complete() {
            return Err(too_large(service, form.file.n.written + 1));
        }
        Ok(service.predict(form.file.value.to_vec(), false).await?.into())
    }
    .instrument(trace.span("multipart"))
    .await;
    answer(service, started, result).await
}

#[post("/v1/predict", data = "<data>", rank = 2)]
async fn predict_raw(
    content_type: Option<&ContentType>,
    length: ContentLength,
    trace: TraceContext<'_>,
    data: Data<'_>,
    service: &State<Arc<Service>>,
) -> Result<Json<Prediction>, ApiError> {
    let started = Instant::now();
    let result = async {
        let raw_ok = match content_type {
            None => false,
            Some(ct) if ct.top() == "image" => false,
            Some(ct) if ct.top() == "application" && ct.sub() == "octet-stream" => true,
            Some(ct) => {
                return Err(ApiError::Input(PreprocessError::Unsupported(format!(
                    ": content type {ct} (send image/*, application/octet-stream or multipart/form-data)"
                ))));
            }
        };
        let limit = service.limits.max_body_bytes;
        if let ContentLength(Some(n)) = length
            && n > limit
        {
            return Err(too_large(service, n));
        }
        let body = data
            .open(limit.bytes())
            .into_bytes()
            .await
            .map_err(|e| ApiError::Other(400, format!("reading the body failed: {e}")))?;
        if !body.is_complete() {
            return Err(too_large(service, limit + 1));
        }
        Ok(service.predict(body.value, raw_ok).await?.into())
    }
    .instrument(trace.span("raw"))
    .await;
    answer(service, started, result).await
}

#[get("/v1/models")]
async fn models(service: &State<Arc<Service>>) -> Result<Json<Value>, ApiError> {
    let served = service.slot.get();
    let store_error = |e: mnistflow_store::StoreError| {
        error!(error = %e, "Reading the store failed.");
        ApiError::Other(500, format!("reading the store failed: {e}"))
    };
    let available = service.store.list_models().await.map_err(store_error)?;
    let current = service.store.current().await.map_err(store_error)?;
    Ok(Json(json!({
        "instance": service.instance,
        "served": served.as_ref().map(|m| json!({
            "version": m.version,
            "metadata": m.metadata,
            "load_ms": m.load_time.as_secs_f64() * 1000.0,
        })),
        "pinned": service.pinned,
        "current": current,
        "available": available.iter().map(|m| json!({
            "version": m.version,
            "created_at": m.created_at,
            "accuracy": m.metrics.accuracy,
            "sha256": m.sha256,
        })).collect::<Vec<_>>(),
    })))
}

#[get("/healthz")]
fn healthz() -> Json<Value> {
    Json(json!({ "status": "alive" }))
}

#[get("/readyz")]
fn readyz(service: &State<Arc<Service>>) -> (Status, Json<Value>) {
    match service.slot.version() {
        Some(version) => (Status::Ok, Json(json!({ "status": "ready", "model_version": version }))),
        None => (Status::ServiceUnavailable, Json(json!({ "status": "no model loaded" }))),
    }
}

#[get("/metrics")]
fn metrics(service: &State<Arc<Service>>) -> OpenMetrics {
    OpenMetrics(service.metrics.encode())
}

#[catch(default)]
fn catch_all(status: Status, req: &Request<'_>) -> (Status, Json<PredictError>) {
    let message = match status.code {
        404 => format!("no route for {} {}", req.method(), req.uri().path()),
        413 => "body too large".to_owned(),
        _ => status.reason_lossy().to_owned(),
    };
    (status, Json(PredictError::new(status.code, message)))
}

/// Every (method, path) the API mounts; the OpenAPI test compares against it.
pub fn routes() -> Vec<rocket::Route> {
    routes![predict_form, predict_raw, models, healthz, readyz, metrics]
}

/// The Rocket instance: our address, port, limits and shutdown settings (no
/// `Rocket.toml`, no `ROCKET_*` variables), signals left to our own shutdown token.
pub fn rocket(service: Arc<Service>, config: &Config) -> Rocket<Build> {
    let body = config.limits.max_body_bytes.bytes();
    let mut rc = mnistflow_runtime::http::config(std::net::SocketAddr::new(config.address, config.port), config.drain);
    rc.workers = config.workers;
    rc.limits = rocket::data::Limits::default().limit("bytes", body).limit("data-form", body).limit("file", body);
    rc.ident = rocket::config::Ident::try_new("mnistflow-inference").unwrap_or_default();
    rc.shutdown.mercy = 2;
    rocket::custom(rc).manage(service).mount("/", routes()).register("/", catchers![catch_all])
}
