//! Least privilege on NATS: a real nats-server started with the deployment's own
//! configuration (`k8s/base/nats.conf` as the ConfigMap carries it, its empty `tls.conf`, with the local
//! overlay's `nats-single.conf` and `nats-jetstream.conf` as its includes, and the
//! passwords of `k8s/base/secret.yaml`), and each stage's NATS calls made through
//! the `nats` crate with that stage's own identity: set-up by the promoter and the
//! downloader, the downloader's and the trainer's work queues and events, inference
//! answering `mnist.predict` in its queue group and announcing loads, the web tier
//! asking predictions and replaying the events stream, the web tier passing feedback
//! on and the feedback stage taking it and announcing it (a person's deletion request
//! likewise, and the stage's retention passes). Then the refusals: the web
//! identity may not publish a command nor answer `mnist.predict`, inference may not
//! queue training; the feedback stage may not queue training, promote nor request a
//! deletion; the backup identity
//! reads every stream and may change nothing. And a password rotation by reload: a second user of the web
//! identity with the new password beside the old, the stage moving to it, the
//! old one removed and refused, the moved stage never dropped.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use mnistflow_integration::{NatsServer, workspace_root};
use mnistflow_nats::async_nats::jetstream::consumer::DeliverPolicy;
use mnistflow_nats::events::Message;
use mnistflow_nats::work::{self, Handler, Outcome, Take, Work};
use mnistflow_nats::{
    Bus, DatasetDownload, DatasetId, DatasetReady, EventId, FeedbackDelete, FeedbackDeleted, FeedbackPruned,
    FeedbackStored, FeedbackSubmitted, InferenceLoaded, LiveAccuracy, ModelMetrics, ModelPromote, ModelPublished,
    ModelVersion, NatsConfig, RunId, TrainProgress, TrainRequest, WorkQueueOptions, subjects,
};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

/// The `stringData` of `k8s/base/secret.yaml` (flat `KEY: value` lines).
fn secret() -> HashMap<String, String> {
    let text = std::fs::read_to_string(workspace_root().join("k8s/base/secret.yaml")).unwrap();
    let data = text.split("stringData:").nth(1).expect("secret.yaml has stringData");
    data.lines()
        .filter_map(|l| l.trim().split_once(": "))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect()
}

/// A nats-server with the deployment's configuration, in a folder laid out as the
/// ConfigMap mounts it (the local overlay's one-server includes).
fn server(dir: &Path) -> NatsServer {
    let k8s = workspace_root().join("k8s");
    std::fs::copy(k8s.join("base/nats.conf"), dir.join("nats.conf")).unwrap();
    std::fs::copy(k8s.join("base/tls.conf"), dir.join("tls.conf")).unwrap();
    std::fs::copy(k8s.join("overlays/local/nats-single.conf"), dir.join("cluster.conf")).unwrap();
    // The overlay's JetStream limits, on a directory of the test's (not the pod's /data).
    let jetstream = std::fs::read_to_string(k8s.join("overlays/local/nats-jetstream.conf")).unwrap();
    assert!(jetstream.contains("/data/jetstream"), "nats-jetstream.conf no longer stores under /data/jetstream");
    let store = dir.join("js").display().to_string();
    std::fs::write(dir.join("jetstream.conf"), jetstream.replace("/data/jetstream", &store)).unwrap();
    let mut env: Vec<(String, String)> = secret().into_iter().filter(|(k, _)| k.starts_with("NATS_")).collect();
    env.push(("POD_NAME".into(), "nats-0".into()));
    NatsServer::start_with_config(&dir.join("nats.conf"), &env)
}

/// A bus connected as `user` with the password the Secret gives that stage.
async fn connect(nats: &NatsServer, user: &str, setup: bool) -> Bus {
    let password = secret()[&format!("NATS_{}_PASSWORD", user.to_ascii_uppercase())].clone();
    connect_as(nats, user, &password, setup).await.unwrap_or_else(|e| panic!("{user} connects: {e}"))
}

/// A bus connected as `user` with `password` (refused credentials fail at once).
async fn connect_as(
    nats: &NatsServer,
    user: &str,
    password: &str,
    setup: bool,
) -> Result<Bus, mnistflow_nats::BusError> {
    let url = nats.url();
    let config = NatsConfig::from_lookup(|k| match k {
        "NATS_URL" => Some(url.clone()),
        "NATS_USER" => Some(user.to_owned()),
        "NATS_PASSWORD" => Some(password.to_owned()),
        "NATS_SETUP" => Some(setup.to_string()),
        "NATS_CONNECT_TIMEOUT_SECS" => Some("20".into()),
        "NATS_PUBLISH_RETRY_SECS" => Some("10".into()),
        _ => None,
    })
    .unwrap()
    .with_client_name(format!("test-{user}"));
    Bus::connect(&config, &CancellationToken::new()).await
}

/// Inference's side of `mnist.predict`: answers every request in its queue group with "7".
async fn answer_predictions(inference: &Bus, predict: &str) -> tokio::task::JoinHandle<()> {
    let mut responder =
        inference.client().queue_subscribe(predict.to_owned(), subjects::PREDICT_QUEUE_GROUP.to_owned()).await.unwrap();
    let client = inference.client().clone();
    tokio::spawn(async move {
        while let Some(m) = responder.next().await {
            if let Some(reply) = m.reply {
                client.publish(reply, "7".into()).await.unwrap();
            }
        }
    })
}

/// Takes one delivery of a work queue, acks it, returns its payload.
struct TakeOne<M>(tokio::sync::mpsc::Sender<M>);
impl<M: Message + Clone> Handler<M> for TakeOne<M> {
    async fn handle(&self, work: Work<'_, M>) -> Outcome {
        let _ = self.0.send(work.command.clone()).await;
        Outcome::Done
    }
}

async fn take_one<M: Message + Clone + Send + Sync + 'static>(bus: &Bus) -> M {
    let options = WorkQueueOptions { ack_wait: Duration::from_secs(30), max_deliver: 3 };
    let mut queue = bus.work_queue::<M>(options).await.unwrap_or_else(|e| panic!("{} work queue: {e}", M::SUBJECT));
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let stop = CancellationToken::new();
    let runner = {
        let stop = stop.clone();
        async move { work::run(&mut queue, &TakeOne(tx), options.ack_wait, Take::All, &stop).await }
    };
    let got = tokio::select! {
        r = runner => panic!("{} runner ended: {r:?}", M::SUBJECT),
        m = tokio::time::timeout(WAIT, rx.recv()) => m.unwrap_or_else(|_| panic!("no {} within {WAIT:?}", M::SUBJECT)),
    };
    stop.cancel();
    got.unwrap()
}

/// Waits until the server reported a permission violation whose text holds `what`.
async fn refused(bus: &Bus, what: &str) {
    let mut count = bus.violations().count();
    let found =
        |bus: &Bus| bus.violations().publish_refused(what).or_else(|| bus.violations().subscription_refused(what));
    tokio::time::timeout(WAIT, async {
        while found(bus).is_none() {
            count.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no permission violation for {what} within {WAIT:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_stage_works_with_its_own_nats_identity_and_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let nats = server(dir.path());
    let subjects = mnistflow_nats::Subjects::default();

    // A stage that may not set up waits for the set-up identity.
    let web = connect(&nats, "web", false).await;
    let waiting = tokio::spawn({
        let web = web.clone();
        async move { web.ensure_streams().await }
    });
    let promoter = connect(&nats, "promoter", true).await;
    promoter.ensure_streams().await.expect("the promoter sets up the streams and consumers");
    tokio::time::timeout(WAIT, waiting).await.expect("web's wait for set-up ends").unwrap().unwrap();
    let downloader = connect(&nats, "downloader", true).await;
    downloader.ensure_streams().await.expect("the downloader may set up too");

    // The trainer may not create streams: with set-up it would be refused.
    let trainer = connect(&nats, "trainer", false).await;
    trainer.ensure_streams().await.unwrap();
    let inference = connect(&nats, "inference", false).await;
    let mut published = inference.subscribe::<ModelPublished>().await.unwrap();
    // A round trip on the same connection: the server has the subscription after it.
    inference.ensure_streams().await.unwrap();

    // The downloader: takes dataset.download (queued by admin), announces the data set, queues training.
    let admin = connect(&nats, "admin", true).await;
    admin.publish(&DatasetDownload::default()).await.expect("admin queues a download");
    take_one::<DatasetDownload>(&downloader).await;
    let ready = DatasetReady {
        event_id: EventId::new(),
        dataset_id: DatasetId("test".into()),
        location: "datasets/x".into(),
        files: vec![],
        train_count: 1,
        test_count: 1,
        source: "test".into(),
        reused: false,
        request_id: None,
        created_at: Utc::now(),
    };
    downloader.publish(&ready).await.expect("downloader announces dataset.ready");
    downloader.publish(&TrainRequest::default()).await.expect("downloader queues training");

    // The trainer: takes it (its consumer updated to its own ack wait), reports, publishes.
    take_one::<TrainRequest>(&trainer).await;
    let progress = TrainProgress {
        event_id: EventId::new(),
        run_id: RunId::new(),
        request_id: None,
        phase: "train".into(),
        epoch: 1,
        epochs: 1,
        step: 1,
        steps: 1,
        loss: 0.1,
        examples_per_sec: 1.0,
        eta_secs: None,
        at: Utc::now(),
    };
    trainer.publish(&progress).await.expect("trainer reports progress");
    let version = ModelVersion::generate();
    let model = ModelPublished {
        event_id: EventId::new(),
        version: version.clone(),
        location: "models/x".into(),
        sha256: String::new(),
        metrics: ModelMetrics::default(),
        dataset_id: None,
        run_id: None,
        request_id: None,
        hyperparameters: serde_json::json!({}),
        promoted: false,
        promotion: String::new(),
        at: Utc::now(),
    };
    trainer.publish(&model).await.expect("trainer publishes model.published");
    tokio::time::timeout(WAIT, published.next()).await.expect("inference hears model.published").unwrap();
    let loaded = InferenceLoaded {
        event_id: EventId::new(),
        instance: "inference-0".into(),
        version: Some(version.clone()),
        ok: true,
        refused: None,
        error: None,
        load_ms: 1.0,
        at: Utc::now(),
    };
    inference.publish(&loaded).await.expect("inference announces a load");

    // The promoter: takes model.promote.
    let promote = || ModelPromote { event_id: EventId::new(), version: version.clone(), requested_by: None };
    admin.publish(&promote()).await.unwrap();
    take_one::<ModelPromote>(&promoter).await;

    // Predictions: inference answers in its queue group, web asks.
    let predict = subjects.full(subjects::PREDICT);
    let answering = answer_predictions(&inference, &predict).await;
    // A round trip on the same connection: the server has the subscription after it.
    inference.ensure_streams().await.unwrap();
    let answer = tokio::time::timeout(WAIT, web.client().request(predict.clone(), "png".into()))
        .await
        .expect("web's prediction answered in time")
        .expect("web's prediction answered");
    assert_eq!(&answer.payload[..], b"7");

    // The web tier replays the events stream.
    let mut replay = web.replay_events(DeliverPolicy::All).await.expect("web opens a replay");
    let first = tokio::time::timeout(WAIT, replay.next()).await.expect("a replayed event").unwrap().unwrap();
    assert_eq!(first.suffix, subjects::DATASET_READY);

    // Feedback: the web tier passes it on, the feedback stage takes it and announces it.
    let feedback = connect(&nats, "feedback", false).await;
    feedback.ensure_streams().await.expect("the feedback stage waits for set-up");
    let submitted = FeedbackSubmitted {
        event_id: EventId::new(),
        model_version: version.clone(),
        predicted: 7,
        label: 1,
        input: "00".repeat(784),
        client: "ip-0123456789abcdef".into(),
        trusted: false,
        at: Utc::now(),
    };
    web.publish(&submitted).await.expect("web publishes feedback.submitted");
    let taken = take_one::<FeedbackSubmitted>(&feedback).await;
    assert_eq!(taken.event_id, submitted.event_id);
    let stored = FeedbackStored {
        event_id: EventId::new(),
        feedback_id: submitted.event_id,
        model_version: version.clone(),
        trusted: false,
        correct: false,
        set_version: 1,
        accuracy: LiveAccuracy::default(),
        at: Utc::now(),
    };
    feedback.publish(&stored).await.expect("the feedback stage announces feedback.stored");
    // A person's deletion request: the web tier passes it on (same stream), the
    // feedback stage takes it and announces it, and its retention passes.
    let delete = FeedbackDelete { event_id: EventId::new(), feedback_id: submitted.event_id, requested_at: Utc::now() };
    web.publish(&delete).await.expect("web publishes feedback.delete");
    assert_eq!(take_one::<FeedbackDelete>(&feedback).await.feedback_id, submitted.event_id);
    let deleted = FeedbackDeleted {
        event_id: EventId::new(),
        request_id: delete.event_id,
        feedback_id: submitted.event_id,
        found: true,
        trusted: Some(false),
        at: Utc::now(),
    };
    feedback.publish(&deleted).await.expect("the feedback stage announces feedback.deleted");
    let pruned = FeedbackPruned {
        event_id: EventId::new(),
        max_age_secs: 3600,
        before: Utc::now(),
        trusted_deleted: 0,
        unverified_deleted: 1,
        trusted_left: 0,
        unverified_left: 0,
        at: Utc::now(),
    };
    feedback.publish(&pruned).await.expect("the feedback stage announces feedback.pruned");
    for (suffix, result) in [
        (subjects::TRAIN_REQUEST, feedback.publish(&TrainRequest::default()).await.map(|_| ())),
        (subjects::MODEL_PROMOTE, feedback.publish(&promote()).await.map(|_| ())),
        (subjects::FEEDBACK_DELETE, feedback.publish(&delete).await.map(|_| ())),
    ] {
        let error = chain(&result.expect_err(&format!("feedback may not publish {suffix}")));
        assert!(error.contains("permission denied"), "feedback publishing {suffix}: {error}");
    }

    // Refusals. The web identity may not publish a command ...
    for (suffix, result) in [
        (subjects::MODEL_PROMOTE, web.publish(&promote()).await.map(|_| ())),
        (subjects::TRAIN_REQUEST, web.publish(&TrainRequest::default()).await.map(|_| ())),
        (subjects::DATASET_DOWNLOAD, web.publish(&DatasetDownload::default()).await.map(|_| ())),
    ] {
        let error = chain(&result.expect_err(&format!("web may not publish {suffix}")));
        assert!(error.contains("permission denied"), "web publishing {suffix}: {error}");
    }
    // ... not even as a plain (core NATS) message,
    web.client().publish(subjects.full(subjects::MODEL_PROMOTE), "{}".into()).await.unwrap();
    refused(&web, &subjects.full(subjects::MODEL_PROMOTE)).await;
    // ... nor answer predictions (in the queue group or outside it).
    let _stolen = web.client().queue_subscribe(predict.clone(), "inference".to_owned()).await.unwrap();
    refused(&web, &predict).await;
    let _plain = web.client().subscribe(format!("{predict}.>")).await.unwrap();
    refused(&web, &format!("{predict}.>")).await;
    // Inference may not queue training.
    let error = inference.publish(&TrainRequest::default()).await.expect_err("inference may not queue training");
    let error = chain(&error);
    assert!(error.contains("permission denied"), "{error}");

    // Nothing the refused identities sent reached a stream: the only commands
    // stored were admin's, and they were taken.
    let mut train = admin.jetstream().get_stream(subjects.stream_name("TRAIN")).await.unwrap();
    assert_eq!(train.info().await.unwrap().state.messages, 0, "a refused train.request was stored");
    let mut commands = admin.jetstream().get_stream(subjects.stream_name("COMMANDS")).await.unwrap();
    assert_eq!(commands.info().await.unwrap().state.messages, 0, "a refused command was stored");
    // And the predictions still go to inference only.
    let answer = web.client().request(predict, "png".into()).await.unwrap();
    assert_eq!(&answer.payload[..], b"7");
    answering.abort();
}

/// The rotation of README's "Operating it" (Rotation), on a single server where
/// `nats-server --signal reload` re-reads the file (in the cluster the same two
/// configurations reach the servers by a rolling restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_password_is_rotated_by_reload_and_the_stage_that_moved_is_never_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    let nats = server(dir.path());
    let deployed = std::fs::read_to_string(&conf).unwrap();
    let old = secret()["NATS_WEB_PASSWORD"].clone();
    let new = "rotated-web-password-0123456789";
    let predict = mnistflow_nats::Subjects::default().full(subjects::PREDICT);

    // Inference answers predictions; the web stage asks them with the old password.
    let inference = connect(&nats, "inference", false).await;
    let answering = answer_predictions(&inference, &predict).await;
    inference.client().flush().await.unwrap();
    let ask = |bus: &Bus, what: &'static str| {
        let (client, predict) = (bus.client().clone(), predict.clone());
        async move {
            let answer = tokio::time::timeout(WAIT, client.request(predict, "png".into()))
                .await
                .unwrap_or_else(|_| panic!("{what}: no answer within {WAIT:?}"))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(&answer.payload[..], b"7", "{what}");
        }
    };
    let web_old = connect_as(&nats, "web", &old, false).await.expect("web with the old password");
    let mut old_dropped = web_old.disconnections();
    ask(&web_old, "web with the old password").await;

    // 1. Both accepted: a second user of the web identity with the new password, as
    //    nats.conf's comment shows it (the password written into the file here).
    let line = format!("{{user: web.next, password: \"{new}\", permissions: $WEB_PERMISSIONS}}");
    let both = deployed.replacen("  users: [\n", &format!("  users: [\n    {line}\n"), 1);
    assert_ne!(both, deployed, "nats.conf has no `users: [` line to add the rotation's user to");
    std::fs::write(&conf, &both).unwrap();
    nats.reload();
    let web_new = connect_as(&nats, "web.next", new, false).await.expect("web.next with the new password");
    let new_dropped = web_new.disconnections();
    ask(&web_new, "web.next with the new password (its replies on the identity's inbox)").await;
    ask(&web_old, "web with the old password, after the first reload").await;
    // The second user has the identity's permissions, not more.
    web_new
        .client()
        .publish(mnistflow_nats::Subjects::default().full(subjects::MODEL_PROMOTE), "{}".into())
        .await
        .unwrap();
    refused(&web_new, &mnistflow_nats::Subjects::default().full(subjects::MODEL_PROMOTE)).await;

    // 2. The old user removed.
    let only_new =
        both.replacen("    {user: web, password: $NATS_WEB_PASSWORD, permissions: $WEB_PERMISSIONS}\n", "", 1);
    assert_ne!(only_new, both, "nats.conf's web user line changed: update the rotation procedure and this test");
    std::fs::write(&conf, &only_new).unwrap();
    nats.reload();
    let error = chain(&connect_as(&nats, "web", &old, false).await.expect_err("the old password is refused"));
    assert!(error.to_lowercase().contains("authorization"), "{error}");
    ask(&web_new, "web.next after the old user was removed").await;
    assert!(!new_dropped.has_changed().unwrap(), "the stage on the new password was disconnected by the reloads");
    // The connection on the old password was closed by the second reload.
    tokio::time::timeout(WAIT, old_dropped.changed())
        .await
        .expect("the connection on the removed user is dropped within the wait")
        .unwrap();
    answering.abort();
}

/// The scheduled backup's identity (`k8s/base/backup.yaml`): the JetStream calls
/// `mnistflow backup` makes (each stream's info, then its messages by sequence)
/// succeed on all three streams; a command, a stream or a consumer is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_identity_reads_every_stream_and_can_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let nats = server(dir.path());
    let subjects = mnistflow_nats::Subjects::default();
    let promoter = connect(&nats, "promoter", true).await;
    promoter.ensure_streams().await.unwrap();
    // One message in each stream: an event, a training request, a command.
    let admin = connect(&nats, "admin", true).await;
    let loaded = InferenceLoaded {
        event_id: EventId::new(),
        instance: "inference-0".into(),
        version: None,
        ok: false,
        refused: None,
        error: Some("no model yet".into()),
        load_ms: 0.0,
        at: Utc::now(),
    };
    admin.publish(&loaded).await.unwrap();
    admin.publish(&TrainRequest::default()).await.unwrap();
    admin
        .publish(&ModelPromote { event_id: EventId::new(), version: ModelVersion::generate(), requested_by: None })
        .await
        .unwrap();

    let backup = connect(&nats, "backup", false).await;
    for role in ["EVENTS", "TRAIN", "COMMANDS"] {
        let name = subjects.stream_name(role);
        let mut stream =
            backup.jetstream().get_stream(&name).await.unwrap_or_else(|e| panic!("backup reads {name}'s info: {e}"));
        let state = stream.info().await.unwrap_or_else(|e| panic!("backup reads {name}'s state: {e}")).state.clone();
        assert!(state.messages > 0, "{name} holds the test's message");
        let message = stream
            .get_raw_message(state.first_sequence)
            .await
            .unwrap_or_else(|e| panic!("backup reads {name} message {}: {e}", state.first_sequence));
        assert!(message.subject.starts_with("mnist."), "{name}: {}", message.subject);
    }

    // Refusals: no command, no event (JetStream or core NATS), no stream, no consumer.
    let error = chain(&backup.publish(&TrainRequest::default()).await.expect_err("backup may not queue training"));
    assert!(error.contains("permission denied"), "{error}");
    let promote = subjects.full(subjects::MODEL_PROMOTE);
    backup.client().publish(promote.clone(), "{}".into()).await.unwrap();
    refused(&backup, &promote).await;
    // (Plain publishes on the API subjects: a refused JetStream request would only time out.)
    for api in [
        "$JS.API.STREAM.CREATE.MNIST_EXTRA",
        "$JS.API.STREAM.DELETE.MNIST_EVENTS",
        "$JS.API.CONSUMER.CREATE.MNIST_EVENTS",
    ] {
        backup.client().publish(api, "{}".into()).await.unwrap();
        refused(&backup, api).await;
    }
    let mut train = admin.jetstream().get_stream(subjects.stream_name("TRAIN")).await.unwrap();
    assert_eq!(train.info().await.unwrap().state.messages, 1, "a refused train.request was stored");
}

/// An error with its causes, as `main` prints it.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    mnistflow_nats::error_chain_text(error)
}
