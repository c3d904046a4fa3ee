//! The contract against a real nats-server with JetStream.

use std::time::Duration;

use futures::StreamExt;
use mnistflow_integration::NatsServer;
use mnistflow_nats::events::Message;
use mnistflow_nats::*;
use tokio_util::sync::CancellationToken;

async fn bus(server: &NatsServer) -> Bus {
    let bus = Bus::connect(&NatsConfig::for_url(&server.url()).unwrap(), &CancellationToken::new()).await.unwrap();
    bus.ensure_streams().await.unwrap();
    bus
}

/// Publishes `event`, reads the stored copy back from its stream, decodes it.
async fn round_trip<M: Message + PartialEq + std::fmt::Debug>(bus: &Bus, event: M) {
    bus.publish(&event).await.unwrap();
    let subject = bus.subjects().full(M::SUBJECT);
    let (role, _) = mnistflow_nats::streams::route(M::SUBJECT).unwrap();
    let stream = bus.jetstream().get_stream(bus.subjects().stream_name(role)).await.unwrap();
    let raw = stream.get_last_raw_message_by_subject(&subject).await.unwrap();
    let back: M = serde_json::from_slice(&raw.payload).unwrap();
    assert_eq!(back, event, "{subject}");
    let id = raw.headers.get("Nats-Msg-Id").map(|v| v.to_string());
    assert_eq!(id, Some(event.event_id().to_string()), "{subject} Nats-Msg-Id");
}

#[tokio::test]
async fn every_event_and_command_round_trips_through_jetstream() {
    let server = NatsServer::start();
    let bus = bus(&server).await;
    let file = DatasetFile {
        name: "t10k-labels-idx1-ubyte.gz".into(),
        sha256: "ff".repeat(32),
        size_bytes: 10008,
        count: 10000,
    };
    let metrics = ModelMetrics {
        accuracy: 0.99,
        loss: 0.03,
        per_class_accuracy: vec![0.99; 10],
        confusion: vec![vec![1; 10]; 10],
    };
    round_trip(
        &bus,
        DatasetDownload { mirrors: Some(vec!["http://m/".into()]), auto_train: Some(false), ..Default::default() },
    )
    .await;
    round_trip(
        &bus,
        DatasetReady {
            event_id: EventId::new(),
            dataset_id: "d1".into(),
            location: "datasets/mnist/d1".into(),
            files: vec![file],
            train_count: 60000,
            test_count: 10000,
            source: "http://m/".into(),
            reused: false,
            request_id: Some(EventId::new()),
            created_at: chrono::Utc::now(),
        },
    )
    .await;
    round_trip(
        &bus,
        DatasetFailed {
            event_id: EventId::new(),
            request_id: None,
            reason: "all mirrors failed".into(),
            mirrors_tried: vec!["a".into()],
            will_retry: false,
            at: chrono::Utc::now(),
        },
    )
    .await;
    round_trip(
        &bus,
        TrainRequest { epochs: Some(2), preset: Some("best".into()), learning_rate: Some(0.5), ..Default::default() },
    )
    .await;
    round_trip(
        &bus,
        TrainProgress {
            event_id: EventId::new(),
            run_id: RunId::new(),
            request_id: None,
            phase: "training".into(),
            epoch: 1,
            epochs: 1,
            step: 10,
            steps: 938,
            loss: 0.5,
            examples_per_sec: 600.0,
            eta_secs: Some(90.0),
            at: chrono::Utc::now(),
        },
    )
    .await;
    round_trip(
        &bus,
        TrainFailed {
            event_id: EventId::new(),
            run_id: Some(RunId::new()),
            request_id: None,
            reason: "batch_size must be positive".into(),
            will_retry: false,
            at: chrono::Utc::now(),
        },
    )
    .await;
    round_trip(
        &bus,
        ModelPublished {
            event_id: EventId::new(),
            version: ModelVersion::generate(),
            location: "models/mnist-cnn/x".into(),
            sha256: "ab".repeat(32),
            metrics,
            dataset_id: Some("d1".into()),
            run_id: Some(RunId::new()),
            request_id: None,
            hyperparameters: serde_json::json!({"epochs": 1}),
            promoted: true,
            promotion: "first version".into(),
            at: chrono::Utc::now(),
        },
    )
    .await;
    round_trip(
        &bus,
        ModelPromote { event_id: EventId::new(), version: ModelVersion::generate(), requested_by: Some("cli".into()) },
    )
    .await;
    round_trip(
        &bus,
        InferenceLoaded {
            event_id: EventId::new(),
            instance: "inference-0".into(),
            version: Some(ModelVersion::generate()),
            ok: false,
            refused: Some(ModelVersion::generate()),
            error: Some("checksum mismatch".into()),
            load_ms: 12.5,
            at: chrono::Utc::now(),
        },
    )
    .await;
}

#[tokio::test]
async fn a_hand_written_train_request_decodes_from_the_work_queue() {
    let server = NatsServer::start();
    let bus = bus(&server).await;
    // What `nats pub mnist.train.request '{"epochs":2}'` sends: no headers, no id.
    bus.client().publish("mnist.train.request", r#"{"epochs":2}"#.into()).await.unwrap();
    bus.client().flush().await.unwrap();
    let mut queue = bus.work_queue::<TrainRequest>(WorkQueueOptions::default()).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(5), queue.next()).await.unwrap().unwrap();
    assert_eq!(delivery.payload().unwrap().epochs, Some(2));
    assert_eq!(delivery.payload().unwrap().batch_size, None);
    delivery.ack().await.unwrap();
    assert_eq!(queue.pending().await.unwrap(), 0);
}

#[tokio::test]
async fn a_duplicate_publish_with_the_same_id_is_stored_once() {
    let server = NatsServer::start();
    let bus = bus(&server).await;
    let request = TrainRequest { epochs: Some(1), ..Default::default() };
    let first = bus.publish(&request).await.unwrap();
    let second = bus.publish(&request).await.unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate, "the retry was stored again");
    let mut stream = bus.jetstream().get_stream("MNIST_TRAIN").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
}

#[tokio::test]
async fn a_consumer_that_does_not_ack_gets_the_message_again() {
    let server = NatsServer::start();
    let bus = bus(&server).await;
    let options = WorkQueueOptions { ack_wait: Duration::from_millis(500), max_deliver: 5 };
    let mut queue = bus.work_queue::<DatasetDownload>(options).await.unwrap();
    bus.publish(&DatasetDownload::default()).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), queue.next()).await.unwrap().unwrap();
    assert_eq!(first.delivered(), 1);
    // No ack: the server must deliver it again after ack_wait.
    let again = tokio::time::timeout(Duration::from_secs(5), queue.next()).await.unwrap().unwrap();
    assert_eq!(again.stream_sequence(), first.stream_sequence());
    assert_eq!(again.delivered(), 2);
    assert_eq!(again.payload().unwrap().event_id, first.payload().unwrap().event_id);
    again.ack().await.unwrap();
}

#[tokio::test]
async fn undecodable_messages_are_reported_not_fatal() {
    let server = NatsServer::start();
    let bus = bus(&server).await;
    let mut sub = bus.subscribe::<DatasetFailed>().await.unwrap();
    bus.client().publish("mnist.dataset.failed", "not json".into()).await.unwrap();
    let good = DatasetFailed {
        event_id: EventId::new(),
        request_id: None,
        reason: "x".into(),
        mirrors_tried: vec![],
        will_retry: false,
        at: chrono::Utc::now(),
    };
    bus.publish(&good).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), sub.next()).await.unwrap().unwrap();
    assert!(matches!(first, Received::Undecodable { ref subject, .. } if subject == "mnist.dataset.failed"));
    let second = tokio::time::timeout(Duration::from_secs(5), sub.next()).await.unwrap().unwrap();
    assert!(matches!(second, Received::Message(m) if m == good));

    // A work-queue command that does not decode is handed over with its reason.
    bus.client().publish("mnist.model.promote", r#"{"nope":1}"#.into()).await.unwrap();
    let mut queue = bus.work_queue::<ModelPromote>(WorkQueueOptions::default()).await.unwrap();
    let bad = tokio::time::timeout(Duration::from_secs(5), queue.next()).await.unwrap().unwrap();
    assert!(bad.payload().unwrap_err().contains("version"), "{}", bad.payload().unwrap_err());
    bad.term().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_server_is_retried_with_backoff_then_fails_naming_nats_url() {
    // A port nobody listens on: bind, read the port, close.
    let port = mnistflow_integration::free_port();
    let mut config = NatsConfig::for_url(&format!("nats://127.0.0.1:{port}")).unwrap();
    config.connect_timeout = Duration::from_millis(1500);
    let started = std::time::Instant::now();
    let err = Bus::connect(&config, &CancellationToken::new()).await.unwrap_err();
    match &err {
        BusError::Unreachable { attempts, .. } => assert!(*attempts >= 3, "only {attempts} attempts"),
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().starts_with("NATS_URL: "), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_server_that_comes_up_late_is_reached_by_the_retry_loop() {
    let port = mnistflow_integration::free_port();
    let config = NatsConfig::for_url(&format!("nats://127.0.0.1:{port}")).unwrap();
    let connecting = tokio::spawn(async move { Bus::connect(&config, &CancellationToken::new()).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let _server = NatsServer::start_on_port(port);
    let bus = tokio::time::timeout(Duration::from_secs(10), connecting).await.unwrap().unwrap().unwrap();
    bus.ensure_streams().await.unwrap();
}

#[tokio::test]
async fn credentials_from_config_are_used_and_refusals_are_not_retried() {
    let server = NatsServer::start_with_args(&["--user", "pipeline", "--pass", "s3cret"]);
    let anonymous = NatsConfig::for_url(&server.url()).unwrap();
    let err = Bus::connect(&anonymous, &CancellationToken::new()).await.unwrap_err();
    assert!(matches!(err, BusError::Auth(_)), "{err}");
    let url = server.url();
    let with_creds = NatsConfig::from_lookup(|k| match k {
        "NATS_URL" => Some(url.clone()),
        "NATS_USER" => Some("pipeline".into()),
        "NATS_PASSWORD" => Some("s3cret".into()),
        _ => None,
    })
    .unwrap();
    let bus = Bus::connect(&with_creds, &CancellationToken::new()).await.unwrap();
    bus.ensure_streams().await.unwrap();
    let mut sub = bus.client().subscribe("mnist.>").await.unwrap();
    bus.publish(&TrainRequest::default()).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_secs(5), sub.next()).await.unwrap().is_some());
}

#[tokio::test]
async fn a_late_subscriber_replays_history_then_follows_live_events() {
    let server = NatsServer::start();
    let bus = bus(&server).await;
    let failed = |reason: &str| DatasetFailed {
        event_id: EventId::new(),
        request_id: None,
        reason: reason.into(),
        mirrors_tried: vec![],
        will_retry: false,
        at: chrono::Utc::now(),
    };
    bus.publish(&failed("one")).await.unwrap();
    bus.publish(&failed("two")).await.unwrap();
    // Commands are not events: they must not show up in the replay.
    bus.publish(&TrainRequest::default()).await.unwrap();
    let mut replay = bus.replay_events(async_nats::jetstream::consumer::DeliverPolicy::All).await.unwrap();
    assert_eq!(replay.last_at_start, 2);
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let e = tokio::time::timeout(Duration::from_secs(5), replay.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(e.suffix, "dataset.failed");
        reasons.push(serde_json::from_slice::<DatasetFailed>(&e.payload).unwrap().reason);
    }
    assert_eq!(reasons, ["one", "two"]);
    bus.publish(&failed("three")).await.unwrap();
    let live = tokio::time::timeout(Duration::from_secs(5), replay.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(live.sequence, 3);
}

#[tokio::test]
async fn set_up_creates_every_work_consumer_so_a_queued_command_counts_before_any_stage_binds() {
    let server = NatsServer::start();
    let bus = bus(&server).await;
    bus.publish(&TrainRequest::default()).await.unwrap();
    for c in &streams::WORK_CONSUMERS {
        let stream = bus.jetstream().get_stream(bus.subjects().stream_name(c.stream)).await.unwrap();
        let mut consumer = stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(c.durable)
            .await
            .unwrap_or_else(|e| panic!("set-up did not create consumer {}: {e}", c.durable));
        let info = consumer.info().await.unwrap();
        assert_eq!(info.config.filter_subject, bus.subjects().full(c.suffix), "{}", c.durable);
        let want = u64::from(c.suffix == subjects::TRAIN_REQUEST);
        assert_eq!(info.num_pending, want, "{}: pending commands", c.durable);
    }
}

#[tokio::test]
async fn a_stage_binding_with_its_own_ack_wait_updates_the_consumer_set_up_created() {
    let server = NatsServer::start();
    let bus = bus(&server).await;
    let options = WorkQueueOptions { ack_wait: Duration::from_secs(7), max_deliver: 2 };
    let _queue = bus.work_queue::<TrainRequest>(options).await.unwrap();
    let stream = bus.jetstream().get_stream("MNIST_TRAIN").await.unwrap();
    let mut consumer = stream.get_consumer::<async_nats::jetstream::consumer::pull::Config>("trainer").await.unwrap();
    let config = consumer.info().await.unwrap().config.clone();
    assert_eq!((config.ack_wait, config.max_deliver), (Duration::from_secs(7), 2));
}

#[tokio::test]
async fn events_stored_before_a_time_are_purged_and_counted() {
    let server = NatsServer::start();
    let bus = bus(&server).await;
    let failed = |reason: &str| DatasetFailed {
        event_id: EventId::new(),
        request_id: None,
        reason: reason.into(),
        mirrors_tried: vec![],
        will_retry: false,
        at: chrono::Utc::now(),
    };
    assert_eq!(bus.purge_events_before(chrono::Utc::now()).await.unwrap().events, 0, "an empty stream");
    bus.publish(&failed("old 1")).await.unwrap();
    bus.publish(&failed("old 2")).await.unwrap();
    // Acknowledged, so stored (and stamped by the server) before this instant.
    let cut = chrono::Utc::now();
    let kept = bus.publish(&failed("new")).await.unwrap().sequence;
    let purged = bus.purge_events_before(cut).await.unwrap();
    assert_eq!(purged, mnistflow_nats::history::Purged { events: 2, kept_from: kept });
    let mut stream = bus.jetstream().get_stream("MNIST_EVENTS").await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    assert_eq!((state.messages, state.first_sequence), (1, kept));
    assert_eq!(bus.purge_events_before(cut).await.unwrap().events, 0, "a second purge to the same time");
    let all = bus.purge_events_before(chrono::Utc::now()).await.unwrap();
    assert_eq!(all.events, 1);
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
}
