//! The pipeline on a three-server JetStream cluster (real nats-servers on
//! 127.0.0.1, 127.0.0.2 and 127.0.0.3, routed, streams of three replicas),
//! losing a server to SIGKILL: while training, while predicting, and KEDA's
//! clustered lag query before and after its consumer's leader dies.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Pipeline, test_digits};
use mnistflow_integration::{NatsCluster, keda, mnist_dir, wait_until};
use mnistflow_nats::streams::{self, TRAINER_CONSUMER};
use mnistflow_nats::{
    Bus, DatasetDownload, DatasetReady, EventId, InferenceLoaded, ModelPublished, NatsConfig, Prediction, TrainFailed,
    TrainProgress, TrainRequest,
};
use tokio_util::sync::CancellationToken;

/// The settings every stage of these tests shares: the cluster's streams are
/// replicated three times.
const CLUSTER_ENV: [(&str, &str); 1] = [("NATS_STREAM_REPLICAS", "3")];

/// The page's timeout for one prediction, retries included.
const PAGE_TIMEOUT: Duration = Duration::from_secs(5);

fn stream_names(bus: &Bus) -> Vec<String> {
    [streams::EVENTS, streams::TRAIN, streams::COMMANDS].iter().map(|r| bus.subjects().stream_name(r)).collect()
}

/// Waits until every stream has three replicas and every follower is current.
async fn wait_replicas_current(cluster: &NatsCluster, bus: &Bus, timeout: Duration) {
    for stream in stream_names(bus) {
        wait_until(&format!("{stream}: three replicas, every one current"), timeout, || {
            let state = cluster.stream_replicas(&stream);
            async move {
                match state {
                    Ok((3, followers)) if followers.len() == 2 && followers.iter().all(|(_, current)| *current) => {
                        Some(())
                    }
                    _ => None,
                }
            }
        })
        .await;
    }
}

/// No two stored events of type `M` share an event id.
fn assert_once<M: mnistflow_nats::events::Message>(events: &[M], id: impl Fn(&M) -> EventId) {
    let mut ids: Vec<_> = events.iter().map(id).collect();
    ids.sort();
    let before = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), before, "{}: {} events stored more than once", M::SUBJECT, before - ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_train_streams_leader_mid_run_publishes_one_version_and_records_each_event_once() {
    let mut cluster = NatsCluster::start();
    let stack = Pipeline::new(
        &cluster.urls_from(0),
        &[CLUSTER_ENV[0], ("TRAINER_MAX_MINUTES", "0.25"), ("NATS_PUBLISH_RETRY_SECS", "30")],
    )
    .await;
    wait_replicas_current(&cluster, &stack.bus, Duration::from_secs(20)).await;
    let _downloader = stack.start_downloader();
    let _trainer = stack.start_trainer();

    let request = DatasetDownload::default();
    stack.bus.publish(&request).await.unwrap();
    stack.wait_event::<TrainProgress>(Duration::from_secs(90), |_| true).await;
    let train_stream = stack.bus.subjects().stream_name(streams::TRAIN);
    let leader = cluster.stream_leader(&train_stream).unwrap();
    let killed = cluster.index_of(&leader).unwrap();
    cluster.kill(killed);
    let killed_at = Instant::now();
    // The test's own bus may have been on the killed server: it reconnects too.
    let new_leader = wait_until(&format!("a new leader of {train_stream}"), Duration::from_secs(30), || {
        let l = cluster.stream_leader(&train_stream).ok().filter(|l| *l != leader);
        async move { l }
    })
    .await;
    eprintln!("{train_stream}: leader {leader} killed; {new_leader} leads after {:?}", killed_at.elapsed());

    let published = stack.wait_event::<ModelPublished>(Duration::from_secs(180), |p| p.promoted).await;
    assert_eq!(stack.store.current().await.unwrap(), Some(published.version.clone()));

    cluster.restart(killed);
    cluster.wait_formed(Duration::from_secs(30));
    wait_replicas_current(&cluster, &stack.bus, Duration::from_secs(60)).await;

    // Exactly one version, announced once; the data set once; every event once.
    assert_eq!(stack.store.list_models().await.unwrap().len(), 1, "a second version was stored");
    let models = stack.events::<ModelPublished>().await;
    assert_eq!(models.len(), 1, "model.published recorded {} times", models.len());
    let ready = stack.events::<DatasetReady>().await;
    assert_eq!(ready.len(), 1, "dataset.ready recorded {} times", ready.len());
    assert_eq!(ready[0].request_id, Some(request.event_id));
    let progress = stack.events::<TrainProgress>().await;
    assert!(!progress.is_empty(), "no train.progress in the history");
    assert!(progress.iter().all(|p| Some(p.run_id) == published.run_id), "progress of another run was recorded");
    assert_once(&progress, |p| p.event_id);
    assert!(stack.events::<TrainFailed>().await.iter().all(|f| f.will_retry), "a permanent failure was reported");
    // The request was taken off the work queue (acknowledged once, not left for another run).
    let mut consumer = stack
        .bus
        .jetstream()
        .get_stream(&train_stream)
        .await
        .unwrap()
        .get_consumer::<mnistflow_nats::async_nats::jetstream::consumer::pull::Config>(TRAINER_CONSUMER)
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "the training request is still queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_server_of_inference_and_web_fails_no_prediction_through_the_page() {
    let mut cluster = NatsCluster::start();
    let stack = Pipeline::new(&cluster.urls_from(0), &CLUSTER_ENV).await;
    wait_replicas_current(&cluster, &stack.bus, Duration::from_secs(20)).await;
    let meta = mnistflow_trainer::publish_quick_model(&stack.store, &mnist_dir()).await.unwrap();
    stack.store.promote(&meta.version).await.unwrap();

    // Inference and web both on server 2 (127.0.0.2), the test's own bus on server 1.
    let pinned = 1;
    let pin = cluster.urls_from(pinned);
    let on_pinned = [("NATS_URL", pin.as_str()), ("NATS_RETAIN_SERVERS_ORDER", "true")];
    let _inference = stack.start_inference_with("inference-cluster", &on_pinned).await;
    let timeout_ms = PAGE_TIMEOUT.as_millis().to_string();
    let mut web_env = on_pinned.to_vec();
    web_env.push(("WEB_PREDICT_TIMEOUT_MS", &timeout_ms));
    let (web, _web) = stack.start_web_with(&web_env).await;
    stack
        .wait_event::<InferenceLoaded>(Duration::from_secs(60), |l| l.ok && l.version.as_ref() == Some(&meta.version))
        .await;
    let names = cluster.client_names(pinned).unwrap();
    for stage in ["mnistflow-inference", "mnistflow-web"] {
        assert!(names.iter().any(|n| n == stage), "{stage} is not on {}: {names:?}", cluster.name(pinned));
    }

    // Eight clients back to back through the page's API, so that predictions are
    // in flight through the server when it dies (with a pause between requests
    // the kill mostly falls between them and a build without the retry passes).
    let http = reqwest::Client::builder().timeout(PAGE_TIMEOUT * 2).build().unwrap();
    let digits = Arc::new(test_digits(8));
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for worker in 0..8 {
        let (http, digits, stop) = (http.clone(), digits.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let outcome = async {
                    let r = http
                        .post(format!("http://{web}/api/predict"))
                        .header("content-type", "image/png")
                        .body(digits[worker].0.clone())
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                    let status = r.status();
                    let body = r.text().await.map_err(|e| e.to_string())?;
                    if !status.is_success() {
                        return Err(format!("{status}: {body}"));
                    }
                    let p: Prediction = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
                    if p.digit == digits[worker].1 { Ok(()) } else { Err(format!("wrong digit {}", p.digit)) }
                }
                .await;
                seen.push((started, started.elapsed(), outcome));
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // the load runs before the kill
    cluster.kill(pinned);
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await; // and after it
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for task in load {
        all.extend(task.await.unwrap());
    }
    let failed: Vec<_> = all.iter().filter_map(|(_, _, o)| o.as_ref().err()).collect();
    let slowest = all.iter().map(|(_, d, _)| *d).max().unwrap_or_default();
    let after = all.iter().filter(|(s, _, o)| *s > killed_at && o.is_ok()).count();
    eprintln!(
        "{} predictions, {} failed, slowest {slowest:?}, {after} answered after the kill",
        all.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{} predictions failed, e.g. {:?}", failed.len(), failed.first());
    assert!(slowest < PAGE_TIMEOUT, "a prediction took {slowest:?}, past the page's timeout");
    assert!(after > 50, "only {after} predictions were answered after the kill");
    // Both stages moved to a server that runs.
    wait_until("inference and web on the surviving servers", Duration::from_secs(10), || {
        let names: Vec<String> =
            (0..3).filter(|&i| i != pinned).flat_map(|i| cluster.client_names(i).unwrap_or_default()).collect();
        async move {
            (names.iter().any(|n| n == "mnistflow-inference") && names.iter().any(|n| n == "mnistflow-web"))
                .then_some(())
        }
    })
    .await;

    cluster.restart(pinned);
    cluster.wait_formed(Duration::from_secs(30));
    wait_replicas_current(&cluster, &stack.bus, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_of_one_replica_are_raised_to_three_in_place_and_keda_reads_lag_from_the_consumers_leader() {
    let mut cluster = NatsCluster::start();
    // A deployment that began on one replica: its streams, a queued request.
    let single =
        Bus::connect(&NatsConfig::for_url(&cluster.urls_from(0)).unwrap(), &CancellationToken::new()).await.unwrap();
    single.ensure_streams().await.unwrap();
    let train_stream = single.subjects().stream_name(streams::TRAIN);
    assert_eq!(cluster.stream_replicas(&train_stream).unwrap().0, 1);
    single.publish(&TrainRequest::default()).await.unwrap();

    // The same deployment with NATS_STREAM_REPLICAS=3.
    let replicated = single.clone().with_stream_replicas(3);
    replicated.ensure_streams().await.unwrap();
    wait_replicas_current(&cluster, &replicated, Duration::from_secs(30)).await;
    let mut stream = replicated.jetstream().get_stream(&train_stream).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1, "the queued request was lost in the update");

    let (leader, followers) =
        wait_until("the trainer consumer on three servers, every one current", Duration::from_secs(30), || {
            let r = cluster.consumer_replicas(&train_stream, TRAINER_CONSUMER);
            async move { r.ok().filter(|(_, f)| f.len() == 2 && f.iter().all(|(_, c)| *c)) }
        })
        .await;
    eprintln!("trainer consumer: leader {leader}, followers {followers:?}");

    // KEDA on the "headless Service" (server 1's endpoint): the leader's answer.
    let lag = |endpoint: String| {
        let stream = train_stream.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                keda::jetstream_lag_clustered(&endpoint, "$G", &stream, TRAINER_CONSUMER)
            })
            .await
            .unwrap()
        }
    };
    let leader = wait_until("the trainer consumer's leader", Duration::from_secs(20), || {
        let l = trainer_consumer_leader(&cluster, &train_stream);
        async move { l }
    })
    .await;
    let (n, answered_by) = lag(cluster.monitoring_url(0)).await.unwrap();
    assert_eq!((n, answered_by.as_str()), (1, leader.as_str()), "KEDA did not read the consumer leader's lag");

    // The consumer's leader dies: KEDA, still on the same endpoint (or another
    // server's, if it was the endpoint), follows the new leader.
    let killed = cluster.index_of(&leader).unwrap();
    cluster.kill(killed);
    let endpoint = cluster.monitoring_url(if killed == 0 { 1 } else { 0 });
    let new_leader = wait_until("a new trainer consumer leader", Duration::from_secs(30), || {
        let l = trainer_consumer_leader(&cluster, &train_stream).filter(|l| *l != leader);
        async move { l }
    })
    .await;
    let (n, answered_by) = lag(endpoint).await.unwrap();
    assert_eq!((n, answered_by.as_str()), (1, new_leader.as_str()));
}

/// The trainer consumer's leader as the running servers report it through
/// KEDA's own query on each of them.
fn trainer_consumer_leader(cluster: &NatsCluster, stream: &str) -> Option<String> {
    (0..3).filter(|&i| cluster.is_running(i)).find_map(|i| {
        keda::consumer_leader(&cluster.monitoring_url(i), "$G", stream, TRAINER_CONSUMER).ok().filter(|l| !l.is_empty())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_published_while_their_streams_leader_dies_are_each_stored_once() {
    let mut cluster = NatsCluster::start();
    let config = NatsConfig::from_lookup(|k| match k {
        "NATS_URL" => Some(cluster.urls_from(0)),
        "NATS_STREAM_REPLICAS" => Some("3".into()),
        _ => None,
    })
    .unwrap();
    let bus = Bus::connect(&config, &CancellationToken::new()).await.unwrap();
    bus.ensure_streams().await.unwrap();
    wait_replicas_current(&cluster, &bus, Duration::from_secs(20)).await;
    let train_stream = bus.subjects().stream_name(streams::TRAIN);

    // A publisher sending training requests one after another (no trainer runs:
    // they stay queued) while the stream's leader is killed under it.
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for _ in 0..150 {
                let request = TrainRequest { event_id: EventId::new(), ..Default::default() };
                let started = Instant::now();
                let outcome = bus.publish(&request).await.map_err(|e| e.to_string());
                sent.push((request.event_id, started.elapsed(), outcome));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sent
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leader = cluster.stream_leader(&train_stream).unwrap();
    cluster.kill(cluster.index_of(&leader).unwrap());
    let sent = publisher.await.unwrap();

    let failed: Vec<_> = sent.iter().filter_map(|(_, _, o)| o.as_ref().err()).collect();
    let slowest = sent.iter().map(|(_, d, _)| *d).max().unwrap_or_default();
    eprintln!("{train_stream}: leader {leader} killed; {} publishes, slowest {slowest:?}", sent.len());
    assert!(failed.is_empty(), "{} publishes failed across the election, e.g. {:?}", failed.len(), failed.first());
    // Stored once each: as many messages as publishes, none twice (Nats-Msg-Id).
    let mut stream = bus.jetstream().get_stream(&train_stream).await.unwrap();
    let stored = stream.info().await.unwrap().state.messages;
    assert_eq!(stored, sent.len() as u64, "{stored} requests stored for {} published", sent.len());
}
