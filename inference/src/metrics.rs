//! Prometheus metrics (`GET /metrics`, OpenMetrics text).
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `inference_requests_total` | `route` (`http`, `nats`), `status` | answered predictions by status |
//! | `inference_request_duration_seconds` | `route` | time from arrival to answer |
//! | `inference_batch_size` | | images per forward pass |
//! | `inference_queue_depth` | | requests waiting for the compute thread |
//! | `inference_model_info` | `version` | 1 for the version served |
//! | `inference_reloads_total` | `outcome` (`loaded`, `refused`) | model loads |
//! | `inference_predictions_total` | `digit` | predicted digits |

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DigitLabels {
    digit: u8,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric of the service. Cheap to clone (shared handles).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily<RouteLabels>,
    batch_size: Histogram,
    queue_depth: Gauge,
    model_info: Family<VersionLabels, Gauge>,
    served: Arc<Mutex<Option<String>>>,
    reloads: Family<OutcomeLabels, Counter>,
    predictions: Family<DigitLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("inference");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Answered prediction requests by route and status", requests.clone());
        let latency: HistogramFamily<RouteLabels> = Family::new_with_constructor(latency_histogram);
        registry.register("request_duration_seconds", "Time from arrival to answer", latency.clone());
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        registry.register("batch_size", "Images per forward pass", batch_size.clone());
        let queue_depth = Gauge::default();
        registry.register("queue_depth", "Requests waiting for the compute thread", queue_depth.clone());
        let model_info = Family::<VersionLabels, Gauge>::default();
        registry.register("model_info", "The model version served (value 1)", model_info.clone());
        let reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register("reloads", "Model loads by outcome", reloads.clone());
        let predictions = Family::<DigitLabels, Counter>::default();
        registry.register("predictions", "Predicted digits", predictions.clone());
        Self {
            registry: Arc::new(registry),
            requests,
            latency,
            batch_size,
            queue_depth,
            model_info,
            served: Arc::default(),
            reloads,
            predictions,
        }
    }

    /// One answered request.
    pub fn request(&self, route: &'static str, status: u16, seconds: f64) {
        self.requests.get_or_create(&RequestLabels { route, status }).inc();
        self.latency.get_or_create(&RouteLabels { route }).observe(seconds);
    }

    pub fn batch(&self, size: usize) {
        self.batch_size.observe(size as f64);
    }

    pub fn queue_depth(&self, depth: i64) {
        self.queue_depth.set(depth);
    }

    pub fn prediction(&self, digit: u8) {
        self.predictions.get_or_create(&DigitLabels { digit }).inc();
    }

    pub fn reload(&self, ok: bool) {
        self.reloads.get_or_create(&OutcomeLabels { outcome: if ok { "loaded" } else { "refused" } }).inc();
    }

    /// The version now served: its info series is 1, the previous one's is removed.
    pub fn serving(&self, version: &str) {
        let mut served = self.served.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(old) = served.take() {
            self.model_info.remove(&VersionLabels { version: old });
        }
        self.model_info.get_or_create(&VersionLabels { version: version.to_owned() }).set(1);
        *served = Some(version.to_owned());
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
