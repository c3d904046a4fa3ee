//! Retention and the promoter's answers, on a real store directory and a real
//! nats-server: the pass the promoter runs deletes exactly the versions its policy
//! lets go (never the current, a pinned or a recently served one), announces it on
//! `retention.pruned`, and purges events older than the configured age; the
//! promoter answers a command it cannot read (a newer schema version) or carry out
//! with `command.rejected` and terminates it.

use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use mnistflow_inference::promoter;
use mnistflow_inference::retention::{self, RetentionConfig};
use mnistflow_integration::{NatsServer, wait_until};
use mnistflow_nats::{
    Bus, CommandRejected, DatasetFailed, EventId, ModelVersion, NatsConfig, Received, RetentionPolicy, RetentionPruned,
    TypedSubscriber,
};
use mnistflow_store::{ModelMetadata, Store};
use tokio_util::sync::CancellationToken;

async fn bus(server: &NatsServer) -> Bus {
    let bus = Bus::connect(&NatsConfig::for_url(&server.url()).unwrap(), &CancellationToken::new()).await.unwrap();
    bus.ensure_streams().await.unwrap();
    bus
}

fn version(i: usize) -> ModelVersion {
    ModelVersion(format!("20261201-0{i}0000-abcdef"))
}

async fn next<M: mnistflow_nats::events::Message>(sub: &mut TypedSubscriber<M>, what: &str) -> M {
    match tokio::time::timeout(Duration::from_secs(20), sub.next()).await {
        Ok(Some(Received::Message(m))) => m,
        Ok(Some(Received::Undecodable { error, .. })) => panic!("{what}: undecodable: {error}"),
        Ok(None) => panic!("{what}: the subscription ended"),
        Err(_) => panic!("no {what} within 20 s"),
    }
}

async fn failed_event(bus: &Bus, reason: &str) -> u64 {
    let event = DatasetFailed {
        event_id: EventId::new(),
        request_id: None,
        reason: reason.into(),
        mirrors_tried: vec![],
        will_retry: false,
        at: Utc::now(),
    };
    bus.publish(&event).await.unwrap().sequence
}

#[tokio::test]
async fn retention_keeps_current_pinned_newest_and_recently_served_versions_deletes_the_rest_and_old_events() {
    let server = NatsServer::start();
    let bus = bus(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::local(dir.path()).unwrap();
    // Eight versions, oldest first: 1 is served now, 2 pinned, 3 served an hour
    // ago, 4 served 40 days ago; 7 and 8 are the newest two.
    for i in 1..=8 {
        store.publish_model(Bytes::from(vec![i as u8; 64]), ModelMetadata::new(version(i))).await.unwrap();
    }
    store.promote(&version(4)).await.unwrap();
    store.promote(&version(1)).await.unwrap();
    store.set_pinned(&version(2), true).await.unwrap();
    store.record_served(Some(&version(3)), Utc::now() - chrono::Duration::hours(1), None).await.unwrap();
    store.record_served(Some(&version(4)), Utc::now() - chrono::Duration::days(40), None).await.unwrap();
    let old_events = [failed_event(&bus, "old 1").await, failed_event(&bus, "old 2").await];

    let mut pruned = bus.subscribe::<RetentionPruned>().await.unwrap();
    let config = RetentionConfig {
        policy: RetentionPolicy {
            keep_versions: Some(2),
            keep_served_secs: Some(86_400),
            events_max_age_secs: Some(1),
        },
        interval: Duration::from_millis(500),
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(retention::run(config, bus.clone(), store.clone(), "promoter".into(), shutdown.clone()));

    let first = next(&mut pruned, "retention.pruned").await;
    assert_eq!(first.deleted_versions, vec![version(4), version(5), version(6)], "{first:?}");
    assert_eq!(first.stage, "promoter");
    let reason = |v: ModelVersion| first.kept_versions.iter().find(|k| k.version == v).map(|k| k.reason.clone());
    assert_eq!(reason(version(1)).as_deref(), Some("current"));
    assert_eq!(reason(version(2)).as_deref(), Some("pinned"));
    assert!(reason(version(3)).unwrap().starts_with("served at "));
    assert_eq!(reason(version(8)).as_deref(), Some("among the newest 2"));
    for i in 1..=8 {
        let on_disk = dir.path().join(format!("models/mnist-cnn/{}", version(i))).exists();
        assert_eq!(on_disk, ![4, 5, 6].contains(&i), "version {i} on disk: {on_disk}");
    }
    for i in [1, 2, 3, 7, 8] {
        store.load_model(&version(i)).await.unwrap_or_else(|e| panic!("version {i} no longer loads: {e}"));
    }
    assert_eq!(store.current().await.unwrap(), Some(version(1)));
    let served = store.served_history().await.unwrap();
    assert!(served.contains_key(&version(1)), "the current version was not recorded as served: {served:?}");
    assert!(!served.contains_key(&version(4)), "a deleted version stays in the history: {served:?}");

    // The pass that finds the two events older than a second purges them (the
    // first, if the store work took that long, or a later one).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut purge = first.clone();
    while purge.events_purged == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no retention.pruned event purged events within 20 s");
        purge = next(&mut pruned, "retention.pruned").await;
    }
    assert!(purge.events_purged >= 1, "{purge:?}");
    let events_before = purge.events_before.unwrap();
    let mut stream = bus.jetstream().get_stream("MNIST_EVENTS").await.unwrap();
    for seq in old_events {
        assert!(stream.get_raw_message(seq).await.is_err(), "event {seq} older than the age is still stored");
    }
    let state = stream.info().await.unwrap().state.clone();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await {
            let stored = chrono::DateTime::from_timestamp(m.time.unix_timestamp(), m.time.nanosecond()).unwrap();
            assert!(stored >= events_before, "event {seq} stored at {stored} survived the cut at {events_before}");
        }
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("retention did not stop").unwrap();
}

#[tokio::test]
async fn nothing_is_deleted_without_a_version_limit_and_a_dry_run_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::local(dir.path()).unwrap();
    for i in 1..=4 {
        store.publish_model(Bytes::from(vec![i as u8; 8]), ModelMetadata::new(version(i))).await.unwrap();
    }
    let off = RetentionPolicy { keep_versions: None, keep_served_secs: None, events_max_age_secs: None };
    let pass = retention::pass(&off, &store, None, Utc::now(), false).await.unwrap();
    assert!(pass.deleted_versions.is_empty());
    let on = RetentionPolicy { keep_versions: Some(1), ..off };
    let dry = retention::pass(&on, &store, None, Utc::now(), true).await.unwrap();
    assert_eq!(dry.deleted_versions, vec![version(1), version(2), version(3)]);
    assert_eq!(store.list_models().await.unwrap().len(), 4, "a dry run deleted something");
    assert!(store.get_opt(mnistflow_store::SERVED_KEY).await.unwrap().is_none(), "a dry run wrote the history");
}

#[tokio::test]
async fn the_promoter_rejects_a_newer_schema_version_and_an_unknown_version_with_command_rejected() {
    let server = NatsServer::start();
    let bus = bus(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::local(dir.path()).unwrap();
    store.publish_model(Bytes::from_static(b"model"), ModelMetadata::new(version(1))).await.unwrap();
    let mut rejected = bus.subscribe::<CommandRejected>().await.unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(promoter::run(bus.clone(), store.clone(), None, "promoter".into(), shutdown.clone()));

    let id = "01a23a10-0000-7000-8000-00000000abcd";
    let future = format!(r#"{{"schema_version":3,"event_id":"{id}","version":"{}","new_field":{{}}}}"#, version(1));
    let js = bus.jetstream();
    js.publish("mnist.model.promote", future.into()).await.unwrap().await.unwrap();
    let answer = next(&mut rejected, "command.rejected").await;
    assert_eq!(answer.command, "model.promote");
    assert_eq!(answer.request_id.unwrap().to_string(), id);
    assert_eq!(answer.command_schema_version, Some(3));
    assert!(answer.reason.contains("schema version 3; this release reads versions 1 to 2"), "{}", answer.reason);
    assert_eq!(store.current().await.unwrap(), None, "an unreadable command was carried out");

    js.publish("mnist.model.promote", r#"{"version":"20261201-090000-ffffff"}"#.into()).await.unwrap().await.unwrap();
    let answer = next(&mut rejected, "command.rejected").await;
    assert!(answer.reason.contains("20261201-090000-ffffff"), "{}", answer.reason);
    assert_eq!(answer.command_schema_version, None);

    // Both were terminated, not left for redelivery; a readable v1 command still works.
    js.publish("mnist.model.promote", format!(r#"{{"version":"{}"}}"#, version(1)).into())
        .await
        .unwrap()
        .await
        .unwrap();
    wait_until("CURRENT to name the promoted version", Duration::from_secs(20), || async {
        (store.current().await.ok()? == Some(version(1))).then_some(())
    })
    .await;
    let stream = bus.jetstream().get_stream("MNIST_COMMANDS").await.unwrap();
    let info = wait_until("the promoter's consumer to hold nothing pending", Duration::from_secs(10), || {
        let stream = stream.clone();
        async move {
            let consumer =
                stream.get_consumer::<mnistflow_nats::async_nats::jetstream::consumer::pull::Config>("promoter");
            let info = consumer.await.ok()?.cached_info().clone();
            (info.num_pending == 0 && info.num_ack_pending == 0).then_some(info)
        }
    })
    .await;
    assert_eq!(info.num_redelivered, 0, "{info:?}");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("promoter did not stop").unwrap().unwrap();
}
