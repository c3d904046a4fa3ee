//! Hot reload against a real store, nats-server and libtorch: new versions are
//! served under concurrent load without a single failed request; corrupt ones are
//! refused while the old model keeps answering; `model.promote` commands move
//! `CURRENT` (bad ones are terminated, not acked); a pinned instance ignores `CURRENT`.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Running, World, http, small_png, tiny_model};
use futures::StreamExt;
use mnistflow_integration::wait_until;
use mnistflow_nats::async_nats::jetstream::consumer::pull;
use mnistflow_nats::{InferenceLoaded, ModelPromote, ModelVersion, Prediction, Received, TypedSubscriber, streams};
use tokio::task::JoinHandle;

/// Concurrent clients posting a PNG in a loop, counting answers per version and failures.
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<BTreeMap<String, u64>>>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(app: &Running, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let tasks = (0..clients)
            .map(|_| {
                let (stop, seen, failures) = (Arc::clone(&stop), Arc::clone(&seen), Arc::clone(&failures));
                let url = app.url("/v1/predict");
                tokio::spawn(async move {
                    let client = http();
                    let png = small_png();
                    while !stop.load(Ordering::Relaxed) {
                        let res = client.post(&url).header("Content-Type", "image/png").body(png.clone()).send().await;
                        match res {
                            Ok(r) if r.status().as_u16() == 200 => match r.json::<Prediction>().await {
                                Ok(p) => *seen.lock().unwrap().entry(p.model_version.0).or_default() += 1,
                                Err(e) => failures.lock().unwrap().push(format!("bad body: {e}")),
                            },
                            Ok(r) => failures.lock().unwrap().push(format!("status {}", r.status())),
                            Err(e) => failures.lock().unwrap().push(format!("transport: {e}")),
                        }
                    }
                })
            })
            .collect();
        Self { stop, seen, failures, tasks }
    }

    fn count(&self, version: &ModelVersion) -> u64 {
        self.seen.lock().unwrap().get(version.as_str()).copied().unwrap_or(0)
    }

    fn total(&self) -> u64 {
        self.seen.lock().unwrap().values().sum()
    }

    async fn stop(self) -> (BTreeMap<String, u64>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let seen = self.seen.lock().unwrap().clone();
        let failures = self.failures.lock().unwrap().clone();
        (seen, failures)
    }
}

/// The next `inference.loaded` event about `version`: loaded (`refused` false) or refused.
async fn next_loaded(
    events: &mut TypedSubscriber<InferenceLoaded>,
    version: &ModelVersion,
    refused: bool,
) -> InferenceLoaded {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(Received::Message(e)) = events.next().await
                && e.ok != refused
                && (if refused { e.refused.as_ref() } else { e.version.as_ref() }) == Some(version)
            {
                return e;
            }
        }
    })
    .await
    .expect("an inference.loaded event within 30 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_concurrent_load_fail_no_request_and_serve_each_new_version() {
    let world = World::new().await;
    let first = world.serve(&tiny_model(10), "v1").await;
    let mut events = world.bus.subscribe::<InferenceLoaded>().await.unwrap();
    let app = world.start(&[], true).await;
    let load = Load::start(&app, 6);
    wait_until("the first version to answer", Duration::from_secs(10), || {
        let n = load.count(&first);
        async move { (n >= 20).then_some(()) }
    })
    .await;
    let mut versions = vec![first];
    for (k, seed) in [11i64, 12, 13].into_iter().enumerate() {
        let v = common::version(&format!("v{}", k + 2));
        common::publish(&world.store, &tiny_model(seed), &v).await;
        let before = load.total();
        let promoted = Instant::now();
        if k == 1 {
            // Through the command consumer, as the web admin and CLI do.
            let command =
                ModelPromote { event_id: Default::default(), version: v.clone(), requested_by: Some("test".into()) };
            world.bus.publish(&command).await.unwrap();
        } else {
            world.store.promote(&v).await.unwrap();
        }
        let event = next_loaded(&mut events, &v, false).await;
        assert!(event.load_ms > 0.0);
        wait_until("the new version to be served", Duration::from_secs(10), || {
            let n = load.count(&v);
            async move { (n > 0).then_some(()) }
        })
        .await;
        eprintln!(
            "{v}: served {:?} after promotion, {} requests in between",
            promoted.elapsed(),
            load.total() - before
        );
        versions.push(v);
    }
    let last = versions.last().unwrap().clone();
    wait_until("load on the last version", Duration::from_secs(10), || {
        let n = load.count(&last);
        async move { (n >= 20).then_some(()) }
    })
    .await;
    let (seen, failures) = load.stop().await;
    assert!(failures.is_empty(), "{} failed requests: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    for v in &versions {
        assert!(seen.get(v.as_str()).copied().unwrap_or(0) > 0, "{v} never answered: {seen:?}");
    }
    eprintln!("answers per version: {seen:?}");
    app.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_version_is_refused_and_the_old_one_keeps_answering() {
    let world = World::new().await;
    let good = world.serve(&tiny_model(20), "good").await;
    let mut events = world.bus.subscribe::<InferenceLoaded>().await.unwrap();
    let app = world.start(&[], true).await;
    let load = Load::start(&app, 4);

    // 1. Bytes that pass the checksum but are not TorchScript.
    let garbage = common::version("garbage");
    common::publish(&world.store, b"PK\x03\x04 definitely not a TorchScript archive", &garbage).await;
    world.store.promote(&garbage).await.unwrap();
    let event = next_loaded(&mut events, &garbage, true).await;
    assert_eq!(event.version.as_ref(), Some(&good), "the refusal names the version still served");
    assert!(event.error.as_deref().unwrap_or_default().contains("TorchScript"), "{event:?}");

    // 2. A version whose model.pt was replaced after publication: the checksum catches it.
    let tampered = common::version("tampered");
    common::publish(&world.store, &tiny_model(21), &tampered).await;
    let key = format!("{}/{}", mnistflow_store::Store::model_prefix(&tampered), mnistflow_store::MODEL_FILE);
    world.store.put(&key, Bytes::from(tiny_model(22))).await.unwrap();
    world.store.put(mnistflow_store::CURRENT_KEY, Bytes::from(format!("{tampered}\n"))).await.unwrap();
    let event = next_loaded(&mut events, &tampered, true).await;
    assert_eq!(event.version.as_ref(), Some(&good));
    assert!(event.error.as_deref().unwrap_or_default().contains("checksum"), "{event:?}");

    let before = load.count(&good);
    wait_until("the old version to keep answering", Duration::from_secs(10), || {
        let n = load.count(&good);
        async move { (n >= before + 20).then_some(()) }
    })
    .await;
    let (seen, failures) = load.stop().await;
    assert!(failures.is_empty(), "failed requests: {:?}", &failures[..failures.len().min(5)]);
    assert_eq!(seen.keys().collect::<Vec<_>>(), vec![good.as_str()], "only the good version may answer");
    let ready = http().get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let metrics = app.app().service().metrics.encode();
    assert!(metrics.contains("inference_reloads_total{outcome=\"refused\"} 2"), "{metrics}");

    // A good version afterwards is taken as usual.
    let next = world.serve(&tiny_model(23), "next").await;
    let event = next_loaded(&mut events, &next, false).await;
    assert_eq!(event.instance, app.app().service().instance);
    app.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_commands_move_current_and_unknown_versions_are_terminated_not_acked() {
    let world = World::new().await;
    let first = world.serve(&tiny_model(30), "first").await;
    let second = common::version("second");
    common::publish(&world.store, &tiny_model(31), &second).await;
    let app = world.start(&[], true).await;

    // An ack and a term both leave the consumer with nothing pending; only a term makes
    // JetStream publish its terminated-message advisory, naming the stream sequence.
    let stream_name = world.bus.subjects().stream_name(streams::COMMANDS);
    let advisory = format!("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{stream_name}.{}", streams::PROMOTER_CONSUMER);
    let mut terminated = world.bus.client().subscribe(advisory).await.unwrap();
    world.bus.client().flush().await.unwrap();

    let command = |v: &str| ModelPromote { event_id: Default::default(), version: v.into(), requested_by: None };
    world.bus.publish(&command(second.as_str())).await.unwrap();
    let slot = app.app().service().slot.clone();
    let want = second.clone();
    wait_until("the promoted version to be served", Duration::from_secs(10), || {
        let served = slot.version();
        let want = want.clone();
        async move { (served == Some(want)).then_some(()) }
    })
    .await;
    assert_eq!(world.store.current().await.unwrap(), Some(second.clone()));

    let unknown = world.bus.publish(&command("19990101-000000-nosuch")).await.unwrap();
    // The first advisory must be the unknown version's: had the good command above been
    // terminated too, its advisory (a lower sequence) would have come first.
    let advisory = tokio::time::timeout(Duration::from_secs(10), terminated.next())
        .await
        .expect("JetStream's MSG_TERMINATED advisory for the unknown version's command within 10 s")
        .expect("the advisory subscription to stay open");
    let advisory: serde_json::Value = serde_json::from_slice(&advisory.payload).unwrap();
    assert_eq!(advisory["stream_seq"], unknown.sequence, "the terminated message is the unknown version's: {advisory}");
    assert_eq!(advisory["consumer"], streams::PROMOTER_CONSUMER, "{advisory}");
    let stream = world.bus.jetstream().get_stream(&stream_name).await.unwrap();
    let consumer = stream.get_consumer::<pull::Config>(streams::PROMOTER_CONSUMER).await.unwrap();
    let info = consumer.get_info().await.unwrap();
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "both commands settled: {info:?}");
    assert_eq!(world.store.current().await.unwrap(), Some(second.clone()), "CURRENT must not move");
    assert_eq!(slot.version(), Some(second));
    let _ = first;
    app.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_instance_serves_its_version_whatever_current_says() {
    let world = World::new().await;
    let pinned = world.serve(&tiny_model(40), "pinned").await;
    let follower = world.start(&[("INFERENCE_PROMOTER", "false")], true).await;
    let fixed =
        world.start(&[("INFERENCE_MODEL_VERSION", pinned.as_str()), ("INFERENCE_PROMOTER", "false")], true).await;
    let newer = world.serve(&tiny_model(41), "newer").await;
    let slot = follower.app().service().slot.clone();
    let want = newer.clone();
    wait_until("the following instance to take the new version", Duration::from_secs(10), || {
        let served = slot.version();
        let want = want.clone();
        async move { (served == Some(want)).then_some(()) }
    })
    .await;
    // The pinned instance polls as often; by now it would have moved.
    assert_eq!(fixed.app().service().slot.version(), Some(pinned.clone()));
    let p: Prediction = http()
        .post(fixed.url("/v1/predict"))
        .header("Content-Type", "image/png")
        .body(small_png())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(p.model_version, pinned);
    follower.stop(Duration::from_secs(10)).await;
    fixed.stop(Duration::from_secs(10)).await;
}
