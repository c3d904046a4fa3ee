//! Distributed tracing across the real web and inference stages over a real
//! nats-server, exported over OTLP/HTTP to a collector the test starts, which
//! decodes the spans with the official protobuf definitions.
//!
//! The exporting subscriber is global: every test of this binary shares it and
//! the collector, and tells its spans apart by trace id.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::{Stack, test_digits};
use mnistflow_integration::{CollectedSpan, OtlpCollector, wait_until};
use mnistflow_nats::telemetry::{ENDPOINT_VAR, TelemetryGuard};
use mnistflow_nats::{DatasetDownload, DatasetReady, ModelPublished, TrainRequest};
use mnistflow_store::ModelMetadata;
use tch::{CModule, Device, Kind, Tensor, nn};
use tracing::Instrument;

struct Exported {
    collector: OtlpCollector,
    telemetry: TelemetryGuard,
    _runtime: tokio::runtime::Runtime,
}

/// The collector (on a runtime of its own, so it outlives each test's) and the
/// process's tracing, exporting to it.
fn exported() -> &'static Exported {
    static EXPORTED: OnceLock<Exported> = OnceLock::new();
    EXPORTED.get_or_init(|| {
        std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let collector = runtime.block_on(OtlpCollector::start());
            let endpoint = collector.endpoint();
            let telemetry = mnistflow_runtime::init_tracing_from_lookup("mnistflow-test", "error", &|key| {
                (key == ENDPOINT_VAR).then(|| endpoint.clone())
            })
            .unwrap();
            assert!(telemetry.exporting(), "an endpoint is set: spans are exported");
            Exported { collector, telemetry, _runtime: runtime }
        })
        .join()
        .unwrap()
    })
}

/// Exports what has ended, then waits until the collector holds what `ready` wants.
async fn collected(what: &str, ready: impl Fn(&[CollectedSpan]) -> bool) -> Vec<CollectedSpan> {
    let exported = exported();
    tokio::task::spawn_blocking(|| exported.telemetry.flush()).await.unwrap();
    wait_until(what, Duration::from_secs(20), || {
        let spans = exported.collector.spans();
        std::future::ready(ready(&spans).then_some(spans))
    })
    .await
}

/// A one-layer model, exported the trainer's way: its answers do not matter here.
fn tiny_model() -> Vec<u8> {
    tch::manual_seed(3);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let linear = nn::linear(vs.root() / "fc", 784, 10, Default::default());
    vs.freeze();
    let module = CModule::create_by_tracing(
        "MnistNet",
        "forward",
        &[Tensor::zeros([1, 1, 28, 28], (Kind::Float, Device::Cpu))],
        &mut |inputs| vec![inputs[0].view([-1, 784]).apply(&linear).log_softmax(-1, Kind::Float)],
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.pt");
    module.save(&path).unwrap();
    std::fs::read(&path).unwrap()
}

async fn predict(http: &reqwest::Client, web: std::net::SocketAddr, png: &[u8], traceparent: Option<&str>) {
    let mut request = http.post(format!("http://{web}/api/predict")).header("content-type", "image/png");
    if let Some(tp) = traceparent {
        request = request.header("traceparent", tp);
    }
    let response = request.body(png.to_vec()).send().await.unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap_or_default());
}

fn find<'a>(spans: &'a [CollectedSpan], what: &str, pred: impl Fn(&CollectedSpan) -> bool) -> &'a CollectedSpan {
    let found: Vec<_> = spans.iter().filter(|s| pred(s)).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {what} span, got {}; every span: {:#?}",
        found.len(),
        spans.iter().map(|s| (s.name(), s.trace_id(), s.span_id(), s.parent_span_id())).collect::<Vec<_>>()
    );
    found[0]
}

/// The spans of one prediction, checked to form one trace: web request →
/// NATS request → inference's handling → queueing, and the forward pass
/// (a trace of its own) linked to the queueing span.
fn assert_one_trace(spans: &[CollectedSpan], trace_id: &str) -> String {
    let in_trace = |name: &'static str| move |s: &CollectedSpan| s.name() == name && s.trace_id() == trace_id;
    let web = find(spans, "web request", in_trace("POST /api/predict"));
    let nats = find(spans, "NATS request", in_trace("nats.request"));
    assert_eq!(nats.parent_span_id(), web.span_id(), "the NATS request is the web request's child");
    let handled = find(spans, "inference handling", |s| {
        s.name() == "predict" && s.trace_id() == trace_id && s.attribute("route").as_deref() == Some("nats")
    });
    assert_eq!(handled.parent_span_id(), nats.span_id(), "inference continues the trace from the NATS headers");
    let queued = find(spans, "queueing", in_trace("batcher.queue"));
    assert_eq!(queued.parent_span_id(), handled.span_id());
    let forward = find(spans, "forward pass", |s| {
        s.name() == "forward" && s.links().contains(&(trace_id.to_owned(), queued.span_id()))
    });
    assert_ne!(forward.trace_id(), trace_id, "a batched pass has a trace of its own, linked to each request's");
    assert!(forward.attribute("batch").is_some() && forward.attribute("version").is_some());
    web.parent_span_id()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_trace_id_runs_from_the_pages_request_through_nats_to_the_forward_pass() {
    let exported = exported();
    let stack = Stack::new(&[]).await;
    let version = mnistflow_nats::ModelVersion("traced".into());
    let model = tokio::task::spawn_blocking(tiny_model).await.unwrap();
    stack.store.publish_model(model.into(), ModelMetadata::new(version.clone())).await.unwrap();
    stack.store.promote(&version).await.unwrap();
    let inference = stack.start_inference("traced").await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let ready = format!("http://{}/readyz", inference.app_addr);
    wait_until("inference to load the model", Duration::from_secs(30), || async {
        let r = http.get(&ready).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    let (web, _web_stage) = stack.start_web().await;
    let digits = test_digits(9);

    // A page that traces sends its context; the whole prediction joins that trace.
    let page_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let page_span = "00f067aa0ba902b7";
    predict(&http, web, &digits[0].0, Some(&format!("00-{page_trace}-{page_span}-01"))).await;
    // Without one, the web tier starts the trace.
    predict(&http, web, &digits[1].0, None).await;
    // Concurrent requests share forward passes; each pass links to every request it served.
    let traces: Vec<String> = (0..7).map(|i| format!("{:032x}", 0xabc0_0000_u128 + i)).collect();
    let parents: Vec<String> = traces.iter().map(|t| format!("00-{t}-{page_span}-01")).collect();
    futures::future::join_all(
        digits[2..].iter().zip(&parents).map(|((png, _), tp)| predict(&http, web, png, Some(tp.as_str()))),
    )
    .await;

    // 9 predictions × 5 spans; the collector decodes what the exporter posted.
    let spans = collected("the prediction spans", |spans| {
        let forwards: usize = spans.iter().filter(|s| s.name() == "forward").map(|s| s.span.links.len()).sum();
        let webs = spans.iter().filter(|s| s.name() == "POST /api/predict").count();
        webs == 9 && forwards == 9
    })
    .await;
    let requests = exported.collector.requests();
    assert!(requests.iter().all(|r| r.ends_with(" 200 OK")), "{requests:?}");
    assert!(spans.iter().all(|s| s.service == "mnistflow-test"));

    assert_eq!(assert_one_trace(&spans, page_trace), page_span, "the web span is the page's span's child");
    let generated = find(&spans, "generated web request", |s| {
        s.name() == "POST /api/predict" && s.trace_id() != page_trace && !traces.contains(&s.trace_id())
    });
    assert_eq!(assert_one_trace(&spans, &generated.trace_id()), "", "without traceparent the web span is a root");
    for trace in &traces {
        assert_one_trace(&spans, trace);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_training_run_is_one_trace_with_a_span_per_phase_joined_to_its_requester() {
    exported();
    let stack = Stack::new(&[]).await;
    let _downloader = stack.start_downloader();
    stack.bus.publish(&DatasetDownload { auto_train: Some(false), ..Default::default() }).await.unwrap();
    let ready = stack.wait_event::<DatasetReady>(Duration::from_secs(60), |_| true).await;
    let _trainer = stack.start_trainer();

    // A requester that traces (as the CLI or the web admin do): the bus carries its context.
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let requester = tracing::info_span!(target: "mnistflow::test", "request training");
    let traceparent = format!("00-{trace}-b7ad6b7169203331-01");
    mnistflow_nats::telemetry::set_parent_from_http(&requester, Some(&traceparent), None);
    let request = TrainRequest {
        dataset_id: Some(ready.dataset_id.clone()),
        max_train_examples: Some(640),
        ..Default::default()
    };
    stack.bus.publish(&request).instrument(requester).await.unwrap();
    stack.wait_event::<ModelPublished>(Duration::from_secs(180), |p| p.request_id == Some(request.event_id)).await;

    let phases = ["fetch", "decode", "training", "evaluate", "export", "store", "publish"];
    let spans = collected("the training run's spans", |spans| {
        spans.iter().filter(|s| s.trace_id() == trace).count() >= phases.len() + 2
    })
    .await;
    let in_trace: Vec<_> = spans.iter().filter(|s| s.trace_id() == trace).collect();
    let names: Vec<_> = in_trace.iter().map(|s| s.name()).collect();
    let one = |name: &str| {
        let found: Vec<_> = in_trace.iter().filter(|s| s.name() == name).collect();
        assert_eq!(found.len(), 1, "one {name} span in the run's trace: {names:?}");
        *found[0]
    };
    let requested = one("request training");
    let run = one("train");
    assert_eq!(run.parent_span_id(), requested.span_id(), "the run continues its requester's trace");
    assert_eq!(run.attribute("request_id"), Some(request.event_id.to_string()));
    for phase in phases {
        assert_eq!(one(phase).parent_span_id(), run.span_id(), "{phase} is a phase of the run");
    }
}
