//! `mnist.predict` over a real nats-server: two instances in queue group
//! `inference` share the requests of a plain NATS client and answer correctly;
//! bad payloads get JSON errors with the HTTP codes, never silence.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{World, digit, encode, label, trained_model};
use image::{DynamicImage, ImageFormat};
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
