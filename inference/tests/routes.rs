//! Route tests over real HTTP against a running instance (real nats-server, real
//! libtorch, a tiny random model): every status the API documents, with real image
//! files of each kind generated here.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{World, encode, http, small_png, tiny_model};
use image::{DynamicImage, GrayImage, ImageBuffer, ImageFormat, Luma, Rgba, RgbaImage};
use mnistflow_nats::{PredictError, Prediction};
use serde_json::Value;

/// A 56×56 drawing of a "1": a thick vertical stroke, dark on light.
fn drawing() -> GrayImage {
    let mut img = GrayImage::from_pixel(56, 56, Luma([240]));
    for y in 10..46 {
        for x in 26..32 {
            img.put_pixel(x, y, Luma([20]));
        }
    }
    img
}

fn multipart(field: &str, filename: &str, content_type: &str, body: &[u8]) -> (String, Vec<u8>) {
    let boundary = "----mnistflow-test-boundary-7d1f";
    let mut out = Vec::new();
    out.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n"
        )
        .as_bytes(),
    );
    out.extend_from_slice(body);
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), out)
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A valid PNG whose header claims `w`×`h` pixels (a decompression bomb's header).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut png = small_png();
    // IHDR data starts at byte 16 (8 signature + 4 length + 4 type); its CRC follows the 13 data bytes.
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

struct Reply {
    status: u16,
    retry_after: Option<String>,
    json: Value,
}

fn post(url: &str, content_type: Option<&str>, body: Vec<u8>) -> impl Future<Output = Reply> + Send + 'static {
    let mut req = http().post(url).body(body);
    if let Some(ct) = content_type {
        req = req.header("Content-Type", ct);
    }
    async move {
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let retry_after = res.headers().get("Retry-After").map(|v| v.to_str().unwrap().to_owned());
        let json = res.json().await.unwrap_or(Value::Null);
        Reply { status, retry_after, json }
    }
}

fn assert_prediction(reply: &Reply, what: &str) -> Prediction {
    assert_eq!(reply.status, 200, "{what}: {}", reply.json);
    let p: Prediction = serde_json::from_value(reply.json.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(p.digit < 10);
    assert_eq!(p.probabilities.len(), 10);
    let total: f32 = p.probabilities.iter().sum();
    assert!((total - 1.0).abs() < 1e-3, "{what}: probabilities sum to {total}");
    assert_eq!(p.probabilities.iter().cloned().fold(0.0, f32::max), p.probabilities[p.digit as usize]);
    p
}

fn assert_error(reply: &Reply, status: u16, what: &str) {
    assert_eq!(reply.status, status, "{what}: {}", reply.json);
    let e: PredictError =
        serde_json::from_value(reply.json.clone()).unwrap_or_else(|e| panic!("{what}: not a JSON error: {e}"));
    assert_eq!(e.error.code, status, "{what}");
    assert!(!e.error.message.is_empty(), "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_of_every_kind_are_classified_with_200() {
    let world = World::new().await;
    let version = world.serve(&tiny_model(1), "tiny").await;
    let app = world.start(&[], true).await;
    let url = app.url("/v1/predict");
    let gray = DynamicImage::ImageLuma8(drawing());
    let rgb = DynamicImage::ImageRgb8(gray.to_rgb8());
    // A canvas export: white strokes on fully transparent pixels.
    let mut canvas = RgbaImage::from_pixel(280, 280, Rgba([0, 0, 0, 0]));
    for y in 40..240 {
        for x in 120..160 {
            canvas.put_pixel(x, y, Rgba([255, 255, 255, 255]));
        }
    }
    let canvas = DynamicImage::ImageRgba8(canvas);
    let sixteen = DynamicImage::ImageLuma16(ImageBuffer::from_fn(40, 40, |x, _| {
        Luma([if (18..22).contains(&x) { 65535u16 } else { 0 }])
    }));
    let one = DynamicImage::ImageLuma8(GrayImage::from_pixel(1, 1, Luma([0])));
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("MNIST-format PNG", "image/png", small_png()),
        ("PNG", "image/png", encode(&gray, ImageFormat::Png)),
        ("JPEG", "image/jpeg", encode(&rgb, ImageFormat::Jpeg)),
        ("GIF", "image/gif", encode(&DynamicImage::ImageRgba8(gray.to_rgba8()), ImageFormat::Gif)),
        ("BMP", "image/bmp", encode(&rgb, ImageFormat::Bmp)),
        ("WebP", "image/webp", encode(&rgb, ImageFormat::WebP)),
        ("TIFF", "image/tiff", encode(&gray, ImageFormat::Tiff)),
        ("RGBA canvas PNG", "image/png", encode(&canvas, ImageFormat::Png)),
        ("16-bit PNG", "image/png", encode(&sixteen, ImageFormat::Png)),
        ("1×1 PNG", "image/png", encode(&one, ImageFormat::Png)),
        // The content decides, not the declared subtype.
        ("PNG sent as image/jpeg", "image/jpeg", small_png()),
        ("raw pixels as octet-stream", "application/octet-stream", vec![0u8; 784]),
    ];
    for (what, ct, body) in cases {
        let p = assert_prediction(&post(&url, Some(ct), body.clone()).await, what);
        assert_eq!(p.model_version, version, "{what}");
        let (ct, form) = multipart("file", "upload.bin", ct, &body);
        if what != "raw pixels as octet-stream" {
            assert_prediction(&post(&url, Some(&ct), form).await, &format!("{what} (multipart)"));
        }
    }
    // Deterministic: the same image gets the same answer through either route.
    let a = assert_prediction(&post(&url, Some("image/png"), small_png()).await, "raw");
    let (ct, form) = multipart("file", "digit.png", "image/png", &small_png());
    let b = assert_prediction(&post(&url, Some(&ct), form).await, "multipart");
    assert_eq!(a, b);
    app.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_get_json_errors_with_400_413_415_and_422_and_the_worker_survives() {
    let world = World::new().await;
    world.serve(&tiny_model(1), "tiny").await;
    let app = world.start(&[("INFERENCE_MAX_BODY_BYTES", "200000"), ("INFERENCE_MAX_PIXELS", "1000000")], true).await;
    let url = app.url("/v1/predict");
    let png = encode(&DynamicImage::ImageLuma8(drawing()), ImageFormat::Png);
    let jpeg = encode(&DynamicImage::ImageLuma8(drawing()), ImageFormat::Jpeg);
    let text = b"This is a text file, renamed digit.png by someone.\n".repeat(4);
    // A real image over the pixel limit (2000×1000 = 2 MP > 1 MP), tiny on the wire.
    let wide = encode(&DynamicImage::ImageLuma8(GrayImage::new(2000, 1000)), ImageFormat::Png);
    assert!(wide.len() < 200_000);
    let noise: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();

    let cases: Vec<(&str, Option<&str>, Vec<u8>, u16)> = vec![
        ("empty body", Some("image/png"), Vec::new(), 400),
        ("empty body without a type", None, Vec::new(), 400),
        ("body over the limit", Some("image/png"), noise.clone(), 413),
        ("text renamed .png", Some("image/png"), text.clone(), 415),
        ("text as text/plain", Some("text/plain"), text.clone(), 415),
        ("JSON", Some("application/json"), b"{\"digit\":7}".to_vec(), 415),
        ("truncated PNG", Some("image/png"), png[..png.len() / 2].to_vec(), 422),
        ("truncated JPEG", Some("image/jpeg"), jpeg[..jpeg.len() / 2].to_vec(), 422),
        ("PNG header only", Some("image/png"), png[..40].to_vec(), 422),
        ("decompression bomb header (100000×100000)", Some("image/png"), png_claiming(100_000, 100_000), 422),
        ("pixels over the limit (2000×1000)", Some("image/png"), wide.clone(), 422),
        ("zero-width PNG", Some("image/png"), png_claiming(0, 10), 422),
    ];
    for (what, ct, body, status) in &cases {
        assert_error(&post(&url, *ct, body.clone()).await, *status, what);
    }
    // The same limits through multipart.
    for (what, body, status) in [
        ("multipart: text renamed .png", text.clone(), 415),
        ("multipart: truncated PNG", png[..png.len() / 2].to_vec(), 422),
        ("multipart: bomb header", png_claiming(100_000, 100_000), 422),
        ("multipart: empty file", Vec::new(), 400),
        ("multipart: over the limit", noise.clone(), 413),
    ] {
        let (ct, form) = multipart("file", "digit.png", "image/png", &body);
        assert_error(&post(&url, Some(&ct), form).await, status, what);
    }
    let (ct, form) = multipart("picture", "digit.png", "image/png", &png);
    assert_error(&post(&url, Some(&ct), form).await, 400, "multipart without the field `file`");
    assert_error(
        &post(&url, Some("multipart/form-data; boundary=x"), b"garbage".to_vec()).await,
        400,
        "malformed multipart",
    );

    // Still alive and answering.
    assert_prediction(&post(&url, Some("image/png"), png.clone()).await, "after the bad uploads");
    let metrics = http().get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for status in [200, 400, 413, 415, 422] {
        let series = format!("inference_requests_total{{route=\"http\",status=\"{status}\"}}");
        assert!(metrics.contains(&series), "{series} missing from /metrics");
    }
    let res = http().get(app.url("/nowhere")).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 404);
    let e: PredictError = res.json().await.unwrap();
    assert_eq!(e.error.code, 404);
    app.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_model_readyz_and_predict_answer_503_until_one_is_promoted() {
    let world = World::new().await;
    let app = world.start(&[], false).await;
    let health = http().get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let ready = http().get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let reply = post(&app.url("/v1/predict"), Some("image/png"), small_png()).await;
    assert_error(&reply, 503, "no model");
    assert!(reply.retry_after.is_some(), "503 without Retry-After");

    let version = world.serve(&tiny_model(2), "late").await;
    let url = app.url("/readyz");
    mnistflow_integration::wait_until("readiness", Duration::from_secs(10), || {
        let url = url.clone();
        async move { (http().get(&url).send().await.ok()?.status().as_u16() == 200).then_some(()) }
    })
    .await;
    let p = assert_prediction(&post(&app.url("/v1/predict"), Some("image/png"), small_png()).await, "after promotion");
    assert_eq!(p.model_version, version);
    app.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after_instead_of_growing() {
    let world = World::new().await;
    world.serve(&common::slow_model(), "slow").await;
    let app = world
        .start(&[("INFERENCE_QUEUE_CAPACITY", "2"), ("INFERENCE_MAX_BATCH", "1"), ("INFERENCE_MAX_WAIT_MS", "0")], true)
        .await;
    let url = app.url("/v1/predict");
    let replies = futures::future::join_all((0..24).map(|_| post(&url, Some("image/png"), small_png()))).await;
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let full: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    assert_eq!(ok + full.len(), replies.len(), "only 200 and 503 expected");
    assert!(ok >= 1, "nothing was answered");
    assert!(!full.is_empty(), "24 concurrent requests never filled a queue of 2");
    for r in full {
        assert_error(r, 503, "queue full");
        assert_eq!(r.retry_after.as_deref(), Some("1"));
    }
    app.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_healthz_and_metrics_describe_the_instance() {
    let world = World::new().await;
    let old = common::version("old");
    common::publish(&world.store, &tiny_model(3), &old).await;
    let version = world.serve(&tiny_model(4), "served").await;
    let app = world.start(&[("INFERENCE_INSTANCE", "pod-a")], true).await;
    post(&app.url("/v1/predict"), Some("image/png"), small_png()).await;
    let models: Value = http().get(app.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["instance"], "pod-a");
    assert_eq!(models["served"]["version"], version.as_str());
    assert_eq!(models["served"]["metadata"]["sha256"].as_str().map(str::len), Some(64));
    assert_eq!(models["current"], version.as_str());
    let available: BTreeSet<&str> =
        models["available"].as_array().unwrap().iter().map(|m| m["version"].as_str().unwrap()).collect();
    assert_eq!(available, BTreeSet::from([old.as_str(), version.as_str()]));
    let ready: Value = http().get(app.url("/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["model_version"], version.as_str());
    let res = http().get(app.url("/metrics")).send().await.unwrap();
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = res.text().await.unwrap();
    for name in [
        "inference_requests_total",
        "inference_request_duration_seconds_bucket",
        "inference_batch_size_bucket",
        "inference_queue_depth",
        "inference_reloads_total{outcome=\"loaded\"} 1",
        "inference_predictions_total{digit=",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    assert!(text.contains(&format!("inference_model_info{{version=\"{version}\"}} 1")), "{text}");
    app.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_the_requests_in_flight_then_stops_within_the_deadline() {
    let world = World::new().await;
    world.serve(&common::slow_model(), "slow").await;
    let app = world.start(&[("INFERENCE_MAX_BATCH", "1"), ("INFERENCE_MAX_WAIT_MS", "0")], true).await;
    let url = app.url("/v1/predict");
    let in_flight: Vec<_> = (0..6).map(|_| tokio::spawn(post(&url, Some("image/png"), small_png()))).collect();
    // Shut down once all six requests are in the server (queued, or counted as a batch
    // when their forward pass began) and some still wait: each forward pass of this
    // model takes tens of ms. A request the server never read is not "in flight".
    let service = app.app().service().clone();
    mnistflow_integration::wait_until("all six requests to reach the batcher", Duration::from_secs(20), || {
        let depth = service.batcher.depth();
        let batches: i64 = service
            .metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix("inference_batch_size_count "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        async move { (depth >= 1 && depth + batches >= 6).then_some(()) }
    })
    .await;
    drop(service);
    // Time is the property here: the drain deadline (INFERENCE_DRAIN_SECS) is 5 s, and
    // six forward passes of this model take well under a second. A drain that ignored
    // its deadline would run past the 8 s bound; the 3 s beyond the deadline are slack
    // for a loaded machine.
    app.stop(Duration::from_secs(8)).await;
    for r in in_flight {
        let r = r.await.unwrap();
        assert_eq!(r.status, 200, "an in-flight request was dropped: {}", r.json);
    }
}

/// The paths and methods of `openapi.yaml` (a line scan: two-space-indented paths,
/// four-space-indented methods).
fn documented_operations() -> BTreeSet<(String, String)> {
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    let mut out = BTreeSet::new();
    let (mut in_paths, mut path) = (false, None::<String>);
    for line in spec.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() {
            in_paths = line.trim_end() == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /") {
            path = Some(format!("/{}", p.trim_end().trim_end_matches(':')));
        } else if let Some(m) = line.strip_prefix("    ").filter(|l| !l.starts_with(' ')) {
            let m = m.trim_end().trim_end_matches(':');
            if ["get", "post", "put", "delete", "patch"].contains(&m) {
                out.insert((m.to_uppercase(), path.clone().unwrap()));
            }
        }
    }
    out
}

#[test]
fn the_openapi_document_lists_exactly_the_mounted_routes() {
    let mounted: BTreeSet<(String, String)> = mnistflow_inference::http::routes()
        .iter()
        .map(|r| (r.method.as_str().to_owned(), r.uri.path().to_string()))
        .collect();
    assert_eq!(documented_operations(), mounted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_request_is_not_held_back_to_fill_a_batch() {
    let world = World::new().await;
    world.serve(&tiny_model(5), "served").await;
    // A batch window far longer than any forward pass: the first batch may wait
    // for it (nothing is known yet); after a batch of one, requests that come
    // one at a time run at once. Time is the property: a request held back waits
    // the whole 5 s window; a tiny model answers a lone one in milliseconds, so
    // the 3.5 s bound is slack for a loaded machine and still short of the window.
    let app = world.start(&[("INFERENCE_MAX_WAIT_MS", "5000")], true).await;
    let url = app.url("/v1/predict");
    assert_eq!(post(&url, Some("image/png"), small_png()).await.status, 200);
    for _ in 0..3 {
        let started = std::time::Instant::now();
        assert_eq!(post(&url, Some("image/png"), small_png()).await.status, 200);
        let took = started.elapsed();
        assert!(took < Duration::from_millis(3500), "a lone request waited {took:?} for company");
    }
    app.stop(Duration::from_secs(10)).await;
}
