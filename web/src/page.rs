//! The page and the small routes around it: `/`, its embedded assets,
//! `/api/config`, `/healthz`, `/readyz` and the CSP report sink.

use mnistflow_nats::async_nats::connection::State as ConnectionState;
use rocket::http::{ContentType, Header, Status};
use rocket::serde::json::Json;
use rocket::{State, get, post};
use serde::Serialize;
use tracing::warn;

use crate::AppState;

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");
const FAVICON_SVG: &str = include_str!("../assets/favicon.svg");

/// An embedded asset; revalidated on each load (they are small) so a new
/// release shows at once.
#[derive(rocket::Responder)]
pub(crate) struct Asset {
    body: &'static str,
    content_type: ContentType,
    cache: Header<'static>,
}

fn asset(body: &'static str, content_type: ContentType) -> Asset {
    Asset { body, content_type, cache: Header::new("Cache-Control", "no-cache") }
}

#[get("/")]
pub(crate) fn index() -> Asset {
    asset(INDEX_HTML, ContentType::HTML)
}

#[get("/app.js")]
pub(crate) fn app_js() -> Asset {
    asset(APP_JS, ContentType::JavaScript)
}

#[get("/app.css")]
pub(crate) fn app_css() -> Asset {
    asset(APP_CSS, ContentType::CSS)
}

#[get("/favicon.svg")]
pub(crate) fn favicon() -> Asset {
    asset(FAVICON_SVG, ContentType::SVG)
}

/// What the page needs to know about this server.
#[derive(Debug, Serialize)]
pub(crate) struct PageConfig {
    admin: bool,
    /// Whether trusted labellers can sign their feedback (`WEB_LABELLER_TOKEN`).
    labeller: bool,
    max_upload_bytes: u64,
    predict_timeout_ms: u64,
}

#[get("/api/config")]
pub(crate) fn config(state: &State<AppState>) -> Json<PageConfig> {
    Json(PageConfig {
        admin: state.config.admin_enabled(),
        labeller: state.config.labeller_token.is_some(),
        max_upload_bytes: state.config.max_upload_bytes,
        predict_timeout_ms: u64::try_from(state.config.predict_timeout.as_millis()).unwrap_or(u64::MAX),
    })
}

#[derive(Debug, Serialize)]
pub(crate) struct Health {
    status: &'static str,
    nats: &'static str,
}

fn nats_state(state: &AppState) -> &'static str {
    match state.bus.client().connection_state() {
        ConnectionState::Connected => "connected",
        ConnectionState::Disconnected => "disconnected",
        ConnectionState::Pending => "connecting",
    }
}

/// Liveness: the process answers. NATS trouble does not make it unhealthy (a
/// restart would not help); it shows in the body and in `/readyz`.
#[get("/healthz")]
pub(crate) fn healthz(state: &State<AppState>) -> Json<Health> {
    Json(Health { status: "ok", nats: nats_state(state) })
}

/// Readiness: 503 while NATS is unreachable, so a load balancer sends pages elsewhere.
#[get("/readyz")]
pub(crate) fn readyz(state: &State<AppState>) -> (Status, Json<Health>) {
    let nats = nats_state(state);
    if nats == "connected" {
        (Status::Ok, Json(Health { status: "ready", nats }))
    } else {
        (Status::ServiceUnavailable, Json(Health { status: "not ready", nats }))
    }
}

/// Browsers post CSP violation reports here (`report-uri`); each is logged and counted.
#[post("/api/csp-report", data = "<report>")]
pub(crate) fn csp_report(report: String, state: &State<AppState>) -> Status {
    state.metrics.csp_report();
    warn!(report = %report.chars().take(2_000).collect::<String>(), "Content-Security-Policy violation reported.");
    Status::NoContent
}
