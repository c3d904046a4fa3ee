//! `mnist.predict` over a real nats-server: two instances in queue group
//! `inference` share the requests of a plain NATS client and answer correctly;
//! one of them, the real binary in its own process, SIGKILLed under load loses
//! only the requests in flight inside it; bad payloads get JSON errors with the
//! HTTP codes, never silence.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{World, digit, encode, label, trained_model};
use image::{DynamicImage, ImageFormat};
use mnistflow_integration::wait_until;
use mnistflow_nats::{PredictReply, subjects};

async fn request(client: &mnistflow_nats::async_nats::Client, subject: &str, payload: Vec<u8>) -> PredictReply {
    let reply = tokio::time::timeout(Duration::from_secs(20), client.request(subject.to_owned(), Bytes::from(payload)))
        .await
        .expect("a reply within 20 s")
        .expect("a reply, not a NATS error");
    serde_json::from_slice(&reply.payload).unwrap_or_else(|e| panic!("reply is not JSON: {e}"))
}

fn nats_200s(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with("inference_requests_total{route=\"nats\",status=\"200\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_in_one_queue_group_answer_a_nats_client_correctly() {
    let model = tokio::task::spawn_blocking(trained_model).await.unwrap();
    let world = World::new().await;
    let version = world.serve(model, "trained").await;
    let a = world.start(&[("INFERENCE_INSTANCE", "a"), ("INFERENCE_PROMOTER", "false")], true).await;
    let b = world.start(&[("INFERENCE_INSTANCE", "b"), ("INFERENCE_PROMOTER", "false")], true).await;
    let client = mnistflow_nats::async_nats::connect(world.nats.url()).await.unwrap();
    let subject = world.bus.subjects().full(subjects::PREDICT);

    let indices: Vec<usize> = (0..200).map(|k| k * 50).collect();
    let replies = futures::future::join_all(indices.iter().map(|&i| {
        let png = encode(&DynamicImage::ImageLuma8(digit(i)), ImageFormat::Png);
        request(&client, &subject, png)
    }))
    .await;
    let mut correct = 0;
    for (&i, reply) in indices.iter().zip(&replies) {
        match reply {
            PredictReply::Ok(p) => {
                assert_eq!(p.model_version, version);
                assert_eq!(p.probabilities.len(), 10);
                correct += usize::from(p.digit == label(i));
            }
            PredictReply::Err(e) => panic!("digit {i}: error reply {e:?}"),
        }
    }
    assert!(correct >= 194, "only {correct} of 200 digits classified correctly");
    // Both instances took a share.
    for app in [&a, &b] {
        let served = nats_200s(&app.app().service().metrics.encode());
        assert!(served > 0, "instance {} answered no NATS request", app.app().service().instance);
    }
    let total: u64 = [&a, &b].iter().map(|r| nats_200s(&r.app().service().metrics.encode())).sum();
    assert_eq!(total, 200);

    // 784 raw pixels are accepted on NATS too.
    let raw = digit(0).into_raw();
    assert!(matches!(request(&client, &subject, raw).await, PredictReply::Ok(p) if p.digit == label(0)));
    a.stop(Duration::from_secs(10)).await;
    b.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_nats_payloads_get_json_errors_with_the_http_codes() {
    let world = World::new().await;
    world.serve(&common::tiny_model(5), "tiny").await;
    let app = world.start(&[("INFERENCE_MAX_PIXELS", "1000000")], true).await;
    let client = mnistflow_nats::async_nats::connect(world.nats.url()).await.unwrap();
    let subject = world.bus.subjects().full(subjects::PREDICT);
    let png = common::small_png();
    let big = encode(&DynamicImage::ImageLuma8(image::GrayImage::new(2000, 1000)), ImageFormat::Png);
    for (what, payload, code) in [
        ("empty", Vec::new(), 400),
        ("text", b"not an image at all".to_vec(), 415),
        ("truncated PNG", png[..png.len() / 2].to_vec(), 422),
        ("over the pixel limit", big, 422),
    ] {
        match request(&client, &subject, payload).await {
            PredictReply::Err(e) => assert_eq!(e.error.code, code, "{what}: {}", e.error.message),
            PredictReply::Ok(p) => panic!("{what}: answered {p:?}"),
        }
    }
    assert!(matches!(request(&client, &subject, png).await, PredictReply::Ok(_)));
    app.stop(Duration::from_secs(10)).await;
}

/// One NATS request's outcome under load: when it started, how long it took, and
/// the error if it got no prediction.
type Outcome = (std::time::Instant, Duration, Result<(), String>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_instances_sigkilled_under_nats_load_loses_only_its_in_flight_requests_and_nothing_hangs() {
    use std::os::unix::process::ExitStatusExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    let world = World::new().await;
    world.serve(&common::tiny_model(60), "tiny").await;
    // Instance a: the real binary in its own process, so that SIGKILL kills it as
    // it would a pod (no drain, no goodbye to the server: its socket just closes).
    let port = mnistflow_integration::free_port();
    let mut a = tokio::process::Command::new(env!("CARGO_BIN_EXE_inference"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("NATS_URL", world.nats.url())
        .env("STORE_URL", world.store_dir.path())
        .env("INFERENCE_ADDRESS", "127.0.0.1")
        .env("INFERENCE_PORT", port.to_string())
        .env("INFERENCE_INSTANCE", "a")
        .env("INFERENCE_PROMOTER", "false")
        .env("INFERENCE_WORKERS", "1")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("start target/debug/inference");
    let b = world.start(&[("INFERENCE_INSTANCE", "b"), ("INFERENCE_PROMOTER", "false")], true).await;
    let http = common::http();
    let a_metrics = format!("http://127.0.0.1:{port}/metrics");
    wait_until("instance a (its own process) to be ready", Duration::from_secs(60), || {
        let r = http.get(format!("http://127.0.0.1:{port}/readyz")).send();
        async move { r.await.ok().filter(|r| r.status() == 200).map(|_| ()) }
    })
    .await;

    // The load: eight clients, one request in flight each, with the client's own
    // request timeout (no timeout of ours around it: a request that outlives the
    // client's timeout is a hang, caught below).
    let timeout = Duration::from_secs(2);
    let client = mnistflow_nats::async_nats::ConnectOptions::new()
        .request_timeout(Some(timeout))
        .connect(world.nats.url())
        .await
        .unwrap();
    let subject = world.bus.subjects().full(subjects::PREDICT);
    let stop = Arc::new(AtomicBool::new(false));
    let workers = 8;
    let load: Vec<_> = (0..workers)
        .map(|i| {
            let (client, subject, stop) = (client.clone(), subject.clone(), stop.clone());
            let png = encode(&DynamicImage::ImageLuma8(digit(i)), ImageFormat::Png);
            tokio::spawn(async move {
                let mut seen: Vec<Outcome> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let reply = tokio::time::timeout(
                        Duration::from_secs(30),
                        client.request(subject.clone(), Bytes::from(png.clone())),
                    )
                    .await
                    .expect("a NATS request outlived its 2 s request timeout by 28 s: it hung");
                    let outcome = match reply {
                        Ok(msg) => match serde_json::from_slice::<PredictReply>(&msg.payload) {
                            // A tiny random model: any well-formed prediction is an answer.
                            Ok(PredictReply::Ok(p)) if p.probabilities.len() == 10 => Ok(()),
                            other => Err(format!("unexpected reply: {other:?}")),
                        },
                        Err(e) => Err(e.to_string()),
                    };
                    seen.push((started, started.elapsed(), outcome));
                }
                seen
            })
        })
        .collect();

    // Kill a once it has answered its share of the load.
    wait_until("instance a to answer 20 NATS requests under load", Duration::from_secs(60), || {
        let r = http.get(&a_metrics).send();
        async move { Some(nats_200s(&r.await.ok()?.text().await.ok()?)).filter(|&n| n >= 20) }
    })
    .await;
    a.start_kill().expect("SIGKILL to instance a");
    let status = tokio::time::timeout(Duration::from_secs(10), a.wait())
        .await
        .expect("instance a to die within 10 s of SIGKILL")
        .unwrap();
    let reaped = Instant::now();
    assert_eq!(status.signal(), Some(9), "instance a was not killed by SIGKILL: {status}");

    // Then b carries the load alone.
    let before = nats_200s(&b.app().service().metrics.encode());
    let service = b.app().service().clone();
    wait_until("instance b to answer 200 NATS requests after the kill", Duration::from_secs(60), || {
        let n = nats_200s(&service.metrics.encode());
        async move { (n >= before + 200).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for task in load {
        outcomes
            .extend(tokio::time::timeout(Duration::from_secs(35), task).await.expect("a load client to stop").unwrap());
    }

    let failed: Vec<_> = outcomes.iter().filter(|(_, _, o)| o.is_err()).collect();
    let slowest = outcomes.iter().map(|(_, took, _)| *took).max().unwrap_or_default();
    eprintln!(
        "{} requests, {} failed (in flight inside a when it died), slowest {slowest:?}",
        outcomes.len(),
        failed.len()
    );
    // Only what was in flight inside a is lost: at most one request per client.
    let some = &failed[..failed.len().min(5)];
    assert!(failed.len() <= workers, "{} requests failed, more than the {workers} in flight: {some:?}", failed.len());
    // ... and only around the kill. The server drops a's subscription when it reads the
    // closed socket, in well under the 1 s allowed here after the process was reaped.
    for (started, _, outcome) in &failed {
        let after = started.saturating_duration_since(reaped);
        assert!(
            *started < reaped + Duration::from_secs(1),
            "a request sent {after:?} after the kill failed: {outcome:?}"
        );
    }
    // Nothing outlives the client's timeout by more than scheduling slack.
    assert!(slowest <= timeout + Duration::from_secs(1), "a request took {slowest:?}, past its {timeout:?} timeout");
    b.stop(Duration::from_secs(10)).await;
}
