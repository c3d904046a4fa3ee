//! Prometheus metrics and the fairing that counts every HTTP answer. `GET
//! /metrics` (OpenMetrics text) is served by a listener of its own
//! (`WEB_METRICS_ADDR`, see [`routes`]), never on the page's public port: the
//! load balancer exposes only that, and request counts, latencies and admin
//! activity are nobody's business outside the cluster.

use std::sync::Arc;
use std::time::Instant;

use mnistflow_runtime::http::OpenMetrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use rocket::fairing::{Fairing, Info, Kind};
use rocket::{Data, Request, Response, Route, State, get};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: String,
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct AdminLabels {
    pub command: String,
    pub outcome: String,
}

/// Every metric the web tier exports.
pub struct Metrics {
    registry: Registry,
    http: Family<HttpLabels, Counter>,
    http_seconds: Histogram,
    predictions: Family<OutcomeLabels, Counter>,
    predict_seconds: Histogram,
    sse_clients: Gauge,
    admin_commands: Family<AdminLabels, Counter>,
    admin_auth_failures: Family<ReasonLabels, Counter>,
    admin_lockouts: Counter,
    admin_locked_clients: Gauge,
    csp_reports: Counter,
    feedback: Family<OutcomeLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mnistflow_web");
        let http = Family::<HttpLabels, Counter>::default();
        registry.register("http_requests", "HTTP answers by method, route and status", http.clone());
        let http_seconds = Histogram::new(exponential_buckets(0.000_5, 2.0, 16));
        registry.register("http_request_duration_seconds", "Time to the response head", http_seconds.clone());
        let predictions = Family::<OutcomeLabels, Counter>::default();
        registry.register("predictions", "Predictions forwarded over NATS, by outcome", predictions.clone());
        let predict_seconds = Histogram::new(exponential_buckets(0.000_5, 2.0, 16));
        registry.register(
            "predict_duration_seconds",
            "NATS request/reply time of predictions that got an answer",
            predict_seconds.clone(),
        );
        let sse_clients = Gauge::default();
        registry.register("sse_clients", "Open event streams", sse_clients.clone());
        let admin_commands = Family::<AdminLabels, Counter>::default();
        registry.register("admin_commands", "Admin commands by command and outcome", admin_commands.clone());
        let admin_auth_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "admin_auth_failures",
            "Admin requests refused: wrong_token (counted towards a lockout) or locked_out",
            admin_auth_failures.clone(),
        );
        let admin_lockouts = Counter::default();
        registry.register(
            "admin_lockouts",
            "Clients locked out after too many wrong admin tokens",
            admin_lockouts.clone(),
        );
        let admin_locked_clients = Gauge::default();
        registry.register(
            "admin_locked_clients",
            "Clients locked out of the admin API now (this replica)",
            admin_locked_clients.clone(),
        );
        let csp_reports = Counter::default();
        registry.register("csp_reports", "Content-Security-Policy violation reports received", csp_reports.clone());
        let feedback = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "feedback",
            "POST /api/feedback by outcome: trusted, unverified (published), invalid, too_large, wrong_token, locked_out, failed; DELETE /api/feedback/<id>: delete_requested, delete_invalid",
            feedback.clone(),
        );
        Self {
            feedback,
            registry,
            http,
            http_seconds,
            predictions,
            predict_seconds,
            sse_clients,
            admin_commands,
            admin_auth_failures,
            admin_lockouts,
            admin_locked_clients,
            csp_reports,
        }
    }
}

impl Metrics {
    /// The registry in OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "Encoding metrics failed.");
        }
        out
    }

    pub(crate) fn prediction(&self, outcome: &str, seconds: Option<f64>) {
        self.predictions.get_or_create(&OutcomeLabels { outcome: outcome.to_owned() }).inc();
        if let Some(s) = seconds {
            self.predict_seconds.observe(s);
        }
    }

    pub(crate) fn admin_command(&self, command: &str, outcome: &str) {
        self.admin_commands
            .get_or_create(&AdminLabels { command: command.to_owned(), outcome: outcome.to_owned() })
            .inc();
    }

    /// An admin request refused for its token (`wrong_token`) or its client (`locked_out`).
    pub(crate) fn admin_auth_failure(&self, reason: &str, locked_clients: usize) {
        self.admin_auth_failures.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
        self.admin_locked_clients.set(i64::try_from(locked_clients).unwrap_or(i64::MAX));
    }

    pub(crate) fn admin_lockout(&self) {
        self.admin_lockouts.inc();
    }

    pub(crate) fn feedback(&self, outcome: &str) {
        self.feedback.get_or_create(&OutcomeLabels { outcome: outcome.to_owned() }).inc();
    }

    pub(crate) fn csp_report(&self) {
        self.csp_reports.inc();
    }

    /// Counts an open event stream until the guard is dropped.
    pub(crate) fn sse_client(&self) -> SseClientGuard {
        self.sse_clients.inc();
        SseClientGuard(self.sse_clients.clone())
    }
}

/// Decrements the open-streams gauge when the stream ends.
pub(crate) struct SseClientGuard(Gauge);

impl Drop for SseClientGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts and times every answer.
pub(crate) struct HttpMetrics;

#[derive(Clone, Copy)]
struct Started(Option<Instant>);

#[rocket::async_trait]
impl Fairing for HttpMetrics {
    fn info(&self) -> Info {
        Info { name: "HTTP metrics", kind: Kind::Request | Kind::Response }
    }

    async fn on_request(&self, req: &mut Request<'_>, _data: &mut Data<'_>) {
        req.local_cache(|| Started(Some(Instant::now())));
    }

    async fn on_response<'r>(&self, req: &'r Request<'_>, res: &mut Response<'r>) {
        let Some(state) = req.rocket().state::<crate::AppState>() else { return };
        let route = req.route().map_or_else(|| "unmatched".to_owned(), |r| r.uri.as_str().to_owned());
        let labels =
            HttpLabels { method: req.method().as_str().to_owned(), route, status: res.status().code.to_string() };
        state.metrics.http.get_or_create(&labels).inc();
        if let Started(Some(at)) = *req.local_cache(|| Started(None)) {
            state.metrics.http_seconds.observe(at.elapsed().as_secs_f64());
        }
    }
}

#[get("/metrics")]
fn metrics(metrics: &State<Arc<Metrics>>) -> OpenMetrics {
    OpenMetrics(metrics.encode())
}

/// The metrics listener's routes; its Rocket manages an `Arc<Metrics>`.
pub(crate) fn routes() -> Vec<Route> {
    rocket::routes![metrics]
}
