//! The serving path cannot be made to read a model of any size, and promotion
//! runs apart from serving: against a real store, nats-server and libtorch.

mod common;

use std::time::Duration;

use common::{World, http, next_refusal, small_png, tiny_model};
use mnistflow_nats::{InferenceLoaded, ModelPromote};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_over_the_size_limit_is_refused_unread_and_the_old_one_keeps_serving() {
    let world = World::new().await;
    let small = tiny_model(30);
    let good = world.serve(&small, "good").await;
    let mut events = world.bus.subscribe::<InferenceLoaded>().await.unwrap();
    // The limit sits between the served model and a bigger one (a real model with a
    // larger layer): the first loads, the second is refused with its size named.
    let limit = small.len() + 1024;
    let app = world.start(&[("INFERENCE_MAX_MODEL_BYTES", &limit.to_string())], true).await;
    let big = common::slow_model();
    assert!(big.len() > limit, "the big model ({} bytes) must exceed the limit {limit}", big.len());
    let too_big = world.serve(&big, "toobig").await;
    let event = next_refusal(&mut events, &too_big).await;
    assert_eq!(event.version.as_ref(), Some(&good), "the refusal names the version still served");
    let error = event.error.unwrap_or_default();
    assert!(error.contains("over the limit") && error.contains(&limit.to_string()), "{error}");
    let answer =
        http().post(app.url("/v1/predict")).header("Content-Type", "image/png").body(small_png()).send().await.unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["model_version"], good.as_str(), "{body}");
    app.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_promoter_role_moves_current_and_answers_its_probes_without_serving() {
    let world = World::new().await;
    let first = world.serve(&tiny_model(31), "first").await;
    let second = common::version("second");
    common::publish(&world.store, &tiny_model(32), &second).await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = world.config(&[("INFERENCE_ROLE", "promoter"), ("INFERENCE_PORT", &port.to_string())]);
    let shutdown = CancellationToken::new();
    let promoter = tokio::spawn(mnistflow_inference::main_with(config, shutdown.clone()));
    let base = format!("http://127.0.0.1:{port}");
    mnistflow_integration::wait_until("the promoter's /readyz", Duration::from_secs(30), || {
        let url = format!("{base}/readyz");
        async move { http().get(url).send().await.ok().filter(|r| r.status().is_success()).map(drop) }
    })
    .await;
    let predict = http().post(format!("{base}/v1/predict")).body(small_png()).send().await.unwrap();
    assert_eq!(predict.status().as_u16(), 404, "the promoter serves no predictions");
    world
        .bus
        .publish(&ModelPromote { event_id: Default::default(), version: second.clone(), requested_by: None })
        .await
        .unwrap();
    let store = world.store.clone();
    mnistflow_integration::wait_until("CURRENT to move to the promoted version", Duration::from_secs(30), || {
        let store = store.clone();
        let second = second.clone();
        async move { (store.current().await.ok().flatten() == Some(second)).then_some(()) }
    })
    .await;
    assert_ne!(first, second);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), promoter).await.expect("the promoter stops").unwrap().unwrap();
}
