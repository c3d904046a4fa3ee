//! The trainer against real parts: a real nats-server with JetStream, real
//! libtorch, the real MNIST files put into a temporary store. Runs are short
//! (`max_train_examples` of a few thousand); the full-epoch accuracy run is a
//! benchmark (`scripts/bench-trainer`), not a test.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use mnistflow_integration::{NatsServer, mnist_dir, wait_until};
use mnistflow_nats::{
    Bus, DatasetFile, DatasetId, EventId, Message, ModelPublished, NatsConfig, Received, TrainFailed, TrainProgress,
    TrainRequest, TypedSubscriber,
};
use mnistflow_store::{DatasetManifest, ModelMetadata, Store, idx};
use mnistflow_trainer::metrics::{Metrics, Outcome};
use mnistflow_trainer::{Config, Worker};
use tokio_util::sync::CancellationToken;

const FILES: [&str; 4] = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
];
const LONG: Duration = Duration::from_secs(150);

/// A nats-server, a store holding the real MNIST as a committed data set, and a bus.
struct Rig {
    nats: NatsServer,
    store_dir: tempfile::TempDir,
    store: Store,
    bus: Bus,
    dataset_id: DatasetId,
}

impl Rig {
    async fn start() -> Self {
        // Tests train side by side on a shared machine: one libtorch thread each
        // avoids OpenMP threads spinning against each other.
        tch::set_num_threads(1);
        let nats = NatsServer::start();
        let store_dir = tempfile::tempdir().unwrap();
        let store = Store::local(store_dir.path()).unwrap();
        let dataset_id = put_mnist(&store).await;
        let bus = Bus::connect(&NatsConfig::for_url(&nats.url()).unwrap(), &CancellationToken::new()).await.unwrap();
        bus.ensure_streams().await.unwrap();
        Self { nats, store_dir, store, bus, dataset_id }
    }

    /// The environment a trainer process (or `Config::from_lookup`) gets, plus `extra`.
    fn env(&self, extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut env: HashMap<String, String> = [
            ("NATS_URL", self.nats.url()),
            ("STORE_URL", self.store_dir.path().display().to_string()),
            ("TRAINER_DEVICE", "cpu".into()),
            ("TRAINER_ACK_WAIT_SECS", "3".into()),
            ("TRAINER_PROGRESS_SECS", "0.2".into()),
            ("TRAINER_RETRY_DELAY_SECS", "1".into()),
            ("TRAINER_METRICS_ADDR", String::new()),
            ("TRAINER_PROGRESS_BAR", "off".into()),
            ("TRAINER_ACCURACY_FLOOR", "0.5".into()),
            ("TRAINER_THREADS", "1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in extra {
            env.insert((*k).to_owned(), (*v).to_owned());
        }
        env
    }

    fn config(&self, extra: &[(&str, &str)]) -> Config {
        let env = self.env(extra);
        Config::from_lookup(|k| env.get(k).cloned()).unwrap()
    }

    /// Runs an in-process worker until the returned token is cancelled.
    fn spawn_worker(&self, extra: &[(&str, &str)]) -> (Arc<Metrics>, CancellationToken, tokio::task::JoinHandle<()>) {
        let metrics = Arc::new(Metrics::new());
        let worker = Worker {
            bus: self.bus.clone(),
            store: self.store.clone(),
            config: Arc::new(self.config(extra)),
            metrics: metrics.clone(),
        };
        let token = CancellationToken::new();
        let stop = token.clone();
        let task = tokio::spawn(async move { worker.run(stop).await.unwrap() });
        (metrics, token, task)
    }

    /// Spawns the real `trainer` binary.
    fn spawn_binary(&self, extra: &[(&str, &str)]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_trainer"))
            .envs(self.env(extra))
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the trainer binary")
    }

    /// Publishes raw JSON on the request subject, as `nats pub` would.
    async fn publish_raw(&self, json: &str) {
        let subject = self.bus.subjects().full(TrainRequest::SUBJECT);
        self.bus.jetstream().publish(subject, json.to_owned().into()).await.unwrap().await.unwrap();
    }
}

/// Stores the real MNIST files as a committed data set, the way the downloader does.
async fn put_mnist(store: &Store) -> DatasetId {
    let dir = mnist_dir();
    let id = DatasetId::from("mnist-test");
    let mut files = Vec::new();
    for name in FILES {
        let path = dir.join(name);
        store.put_dataset_file(&id, name, &path).await.unwrap();
        let plain = idx::gunzip(&std::fs::read(&path).unwrap()).unwrap();
        let count = idx::parse(&plain).unwrap().count() as u64;
        files.push(DatasetFile {
            name: name.into(),
            sha256: mnistflow_store::sha256_hex(&plain),
            size_bytes: plain.len() as u64,
            count,
        });
    }
    let manifest = DatasetManifest {
        dataset_id: id.clone(),
        created_at: chrono::Utc::now(),
        source: "test".into(),
        files,
        train_count: 60_000,
        test_count: 10_000,
    };
    store.commit_dataset(&manifest).await.unwrap();
    id
}

/// The next message on `sub` satisfying `pred`, within `timeout`.
async fn next_matching<M: Message>(sub: &mut TypedSubscriber<M>, timeout: Duration, pred: impl Fn(&M) -> bool) -> M {
    tokio::time::timeout(timeout, async {
        loop {
            match sub.next().await {
                Some(Received::Message(m)) if pred(&m) => return m,
                Some(_) => {}
                None => panic!("subscription ended"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no matching {} within {timeout:?}", M::SUBJECT))
}

/// The first `n` test images as float `[n,1,28,28]` in [0,1], and their labels.
fn test_digits(n: usize) -> (tch::Tensor, Vec<u8>) {
    let dir = mnist_dir();
    let images = idx::parse_gz(&std::fs::read(dir.join(FILES[2])).unwrap()).unwrap();
    let labels = idx::parse_gz(&std::fs::read(dir.join(FILES[3])).unwrap()).unwrap();
    let pixels: Vec<f32> = images.data[..n * 784].iter().map(|p| f32::from(*p) / 255.0).collect();
    (tch::Tensor::from_slice(&pixels).view([n as i64, 1, 28, 28]), labels.data[..n].to_vec())
}

fn classify(torchscript: &[u8], images: &tch::Tensor) -> (Vec<i64>, tch::Tensor) {
    let module = tch::CModule::load_data(&mut &torchscript[..]).unwrap();
    let out = tch::no_grad(|| module.forward_ts(&[images]).unwrap());
    let digits = Vec::<i64>::try_from(out.argmax(-1, false)).unwrap();
    (digits, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_written_request_produces_progress_a_working_stored_model_and_model_published() {
    let rig = Rig::start().await;
    let mut progress = rig.bus.subscribe::<TrainProgress>().await.unwrap();
    let mut published = rig.bus.subscribe::<ModelPublished>().await.unwrap();
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let (addr, _server) =
        mnistflow_trainer::metrics::serve("127.0.0.1:0".parse().unwrap(), metrics.clone(), shutdown.clone())
            .await
            .unwrap();
    let worker = Worker {
        bus: rig.bus.clone(),
        store: rig.store.clone(),
        config: Arc::new(rig.config(&[])),
        metrics: metrics.clone(),
    };
    let stop = shutdown.clone();
    let task = tokio::spawn(async move { worker.run(stop).await.unwrap() });

    rig.publish_raw(r#"{"epochs":1,"max_train_examples":3000,"requested_by":"a person with nats pub"}"#).await;

    let first = next_matching(&mut progress, LONG, |p| p.phase == "training").await;
    assert_eq!(first.epochs, 1);
    assert_eq!(first.steps, 3000_u64.div_ceil(64));
    assert!(first.loss.is_finite() && first.examples_per_sec > 0.0, "{first:?}");
    let event = next_matching(&mut published, LONG, |_| true).await;
    assert_eq!(event.run_id, Some(first.run_id));
    assert_eq!(event.request_id, first.request_id);
    assert_eq!(event.dataset_id.as_ref(), Some(&rig.dataset_id));
    assert!(event.promoted, "{}", event.promotion);
    assert_eq!(event.hyperparameters["max_train_examples"], 3000);
    assert_eq!(event.hyperparameters["batch_size"], 64);
    assert!(event.metrics.accuracy > 0.85, "accuracy {}", event.metrics.accuracy);

    // The stored version: intact, current, with the metadata the issue lists.
    let (bytes, meta) = rig.store.load_model(&event.version).await.unwrap();
    assert_eq!(meta.sha256, event.sha256);
    assert_eq!(rig.store.current().await.unwrap(), Some(event.version.clone()));
    assert_eq!(meta.metrics.confusion.len(), 10);
    assert_eq!(meta.metrics.confusion.iter().flatten().sum::<u64>(), 10_000);
    assert_eq!(meta.metrics.per_class_accuracy.len(), 10);
    assert_eq!(meta.extra["device"], "cpu");
    assert_eq!(meta.extra["libtorch_version"], mnistflow_trainer::LIBTORCH_VERSION);
    assert_eq!(meta.extra["requested_by"], "a person with nats pub");
    assert!(meta.extra["training"]["seconds"].as_f64().unwrap() > 0.0);
    let files = meta.extra["dataset"]["files"].as_array().unwrap();
    assert_eq!(files.len(), 4);
    assert!(files.iter().all(|f| f["sha256"].as_str().unwrap().len() == 64));

    // The TorchScript loads on its own and classifies a real test digit.
    let (images, labels) = test_digits(1);
    let (digits, out) = classify(&bytes, &images);
    assert_eq!(digits[0], i64::from(labels[0]), "the first test digit is a {}", labels[0]);
    let total = f64::try_from(out.exp().sum(tch::Kind::Float)).unwrap();
    assert!((total - 1.0).abs() < 1e-3, "log-probabilities: {total}");

    // Metrics and health.
    let body = reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap();
    assert!(body.contains(r#"trainer_runs_total{outcome="published"} 1"#), "{body}");
    assert!(body.contains("trainer_last_test_accuracy"), "{body}");
    let health = reqwest::get(format!("http://{addr}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_trainer_mid_run_leaves_no_version_and_the_redelivered_request_completes() {
    let rig = Rig::start().await;
    let mut progress = rig.bus.subscribe::<TrainProgress>().await.unwrap();
    let mut published = rig.bus.subscribe::<ModelPublished>().await.unwrap();
    let mut child = rig.spawn_binary(&[]);

    let request = TrainRequest { max_train_examples: Some(4000), ..Default::default() };
    rig.bus.publish(&request).await.unwrap();
    let first = next_matching(&mut progress, LONG, |p| p.request_id == Some(request.event_id)).await;
    assert!(first.step < first.steps, "killed mid-run: {first:?}");
    child.kill().unwrap();
    child.wait().unwrap();

    assert!(rig.store.list_models().await.unwrap().is_empty(), "a version is visible after the kill");
    assert_eq!(rig.store.current().await.unwrap(), None);

    let (_metrics, stop, task) = rig.spawn_worker(&[]);
    let event = next_matching(&mut published, LONG, |e| e.request_id == Some(request.event_id)).await;
    assert_ne!(event.run_id, Some(first.run_id), "a new run completed the redelivered request");
    let versions = rig.store.list_models().await.unwrap();
    assert_eq!(versions.len(), 1, "exactly the completed version is stored");
    assert_eq!(versions[0].version, event.version);
    assert_eq!(versions[0].extra["request_id"], serde_json::json!(request.event_id));
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonsense_hyperparameters_get_a_clear_failure_event_and_are_not_retried() {
    let rig = Rig::start().await;
    let mut failed = rig.bus.subscribe::<TrainFailed>().await.unwrap();
    let (metrics, stop, task) = rig.spawn_worker(&[("TRAINER_ACK_WAIT_SECS", "1")]);
    // JetStream announces each terminated delivery; an ack or a lapsed ack wait announces none.
    let advisory =
        format!("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{}.trainer", rig.bus.subjects().stream_name("TRAIN"));
    let mut terminated = rig.bus.client().subscribe(advisory).await.unwrap();
    rig.bus.client().flush().await.unwrap();

    let mut cases = vec![
        (r#"{"epochs":-1}"#, "epochs"),
        (r#"{"batch_size":0}"#, "batch_size"),
        (r#"{"optimizer":"nope"}"#, "optimizer"),
        (r#"{"learning_rate":-3,"preset":"fastest"}"#, "preset"),
    ];
    if !tch::Cuda::is_available() {
        cases.push((r#"{"device":"cuda"}"#, "device"));
    }
    for (json, field) in &cases {
        let id = EventId::new();
        let with_id = format!(r#"{{"event_id":"{id}",{}"#, &json[1..]);
        rig.publish_raw(&with_id).await;
        let event = next_matching(&mut failed, LONG, |f| f.request_id == Some(id)).await;
        assert!(!event.will_retry, "{json}: {event:?}");
        assert!(event.reason.contains(&format!("{field}:")), "{json}: the reason names {field}: {}", event.reason);
    }
    rig.publish_raw("this is not json").await;
    let event = next_matching(&mut failed, LONG, |f| f.request_id.is_none()).await;
    assert!(!event.will_retry && event.reason.contains("undecodable"), "{event:?}");

    // Terminated, not left to time out: nothing pending, nothing redelivered, even after the ack wait.
    let total = cases.len() as u64 + 1;
    wait_until("every request counted as rejected", Duration::from_secs(10), || {
        let n = metrics.runs(Outcome::Rejected);
        async move { (n == total).then_some(()) }
    })
    .await;
    for k in 0..total {
        tokio::time::timeout(Duration::from_secs(10), terminated.next())
            .await
            .unwrap_or_else(|_| {
                panic!("JetStream's MSG_TERMINATED advisory for request {} of {total} within 10 s", k + 1)
            })
            .expect("the advisory subscription to stay open");
    }
    // A terminated message is out of the consumer for good: with nothing pending or
    // awaiting an ack, there is nothing left that the ack wait could redeliver.
    let info = consumer_info(&rig.bus).await;
    assert_eq!((info.num_pending, info.num_ack_pending, info.num_redelivered), (0, 0, 0), "{info:?}");
    assert_eq!(metrics.runs(Outcome::Rejected), total);
    assert!(rig.store.list_models().await.unwrap().is_empty());
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
}

async fn consumer_info(bus: &Bus) -> mnistflow_nats::async_nats::jetstream::consumer::Info {
    let stream = bus.jetstream().get_stream(bus.subjects().stream_name("TRAIN")).await.unwrap();
    let mut consumer: mnistflow_nats::async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("trainer").await.unwrap();
    consumer.info().await.unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_fails_the_quality_gate_is_stored_but_not_promoted() {
    let rig = Rig::start().await;
    let mut published = rig.bus.subscribe::<ModelPublished>().await.unwrap();

    // Below the floor: stored, not promoted, and the event says why.
    let (_m, stop, task) = rig.spawn_worker(&[("TRAINER_ACCURACY_FLOOR", "0.999")]);
    let request = TrainRequest { max_train_examples: Some(1000), ..Default::default() };
    rig.bus.publish(&request).await.unwrap();
    let event = next_matching(&mut published, LONG, |e| e.request_id == Some(request.event_id)).await;
    assert!(!event.promoted);
    assert!(event.promotion.contains("below the floor"), "{}", event.promotion);
    assert_eq!(rig.store.current().await.unwrap(), None);
    assert!(rig.store.model_metadata(&event.version).await.unwrap().is_some(), "stored all the same");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();

    // Above the floor but much worse than CURRENT: held back, unless forced.
    let mut incumbent = ModelMetadata::new(mnistflow_nats::ModelVersion::generate());
    incumbent.metrics.accuracy = 0.9999;
    let incumbent = rig.store.publish_model(event_model_bytes(&rig, &event).await, incumbent).await.unwrap();
    rig.store.promote(&incumbent.version).await.unwrap();
    let (_m, stop, task) = rig.spawn_worker(&[("TRAINER_ACCURACY_FLOOR", "0.5"), ("TRAINER_TOLERANCE", "0.01")]);
    let worse = TrainRequest { max_train_examples: Some(1000), ..Default::default() };
    rig.bus.publish(&worse).await.unwrap();
    let event = next_matching(&mut published, LONG, |e| e.request_id == Some(worse.event_id)).await;
    assert!(!event.promoted);
    assert!(event.promotion.contains("worse than current"), "{}", event.promotion);
    assert_eq!(rig.store.current().await.unwrap(), Some(incumbent.version.clone()));

    let forced = TrainRequest { max_train_examples: Some(1000), force: Some(true), ..Default::default() };
    rig.bus.publish(&forced).await.unwrap();
    let event = next_matching(&mut published, LONG, |e| e.request_id == Some(forced.event_id)).await;
    assert!(event.promoted, "{}", event.promotion);
    assert_eq!(rig.store.current().await.unwrap(), Some(event.version));
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
}

async fn event_model_bytes(rig: &Rig, event: &ModelPublished) -> bytes::Bytes {
    rig.store.load_model(&event.version).await.unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_job_mode_the_binary_handles_one_request_and_exits() {
    let rig = Rig::start().await;
    let mut published = rig.bus.subscribe::<ModelPublished>().await.unwrap();
    let request = TrainRequest { max_train_examples: Some(1000), ..Default::default() };
    rig.bus.publish(&request).await.unwrap();
    let mut child = rig.spawn_binary(&[("TRAINER_MODE", "job")]);
    let event = next_matching(&mut published, LONG, |e| e.request_id == Some(request.event_id)).await;
    let status = wait_until("the job to exit", Duration::from_secs(30), || {
        let s = child.try_wait().unwrap();
        async move { s }
    })
    .await;
    assert!(status.success(), "{status}");
    assert_eq!(rig.store.list_models().await.unwrap().len(), 1);
    assert!(rig.store.model_metadata(&event.version).await.unwrap().is_some());
}

#[test]
fn quick_model_is_accurate_and_loads_as_torchscript() {
    tch::set_num_threads(1);
    let model = mnistflow_trainer::quick_model(&mnist_dir()).unwrap();
    assert!(model.metrics.accuracy > 0.93, "{}", model.metrics.accuracy);
    let (images, labels) = test_digits(20);
    let (digits, _) = classify(&model.torchscript, &images);
    let correct = digits.iter().zip(&labels).filter(|(d, l)| **d == i64::from(**l)).count();
    assert!(correct >= 18, "{correct}/20 correct");
    // The cache hands out the same model.
    let again = mnistflow_trainer::quick_model(Path::new("/nonexistent")).unwrap();
    assert!(Arc::ptr_eq(&model, &again));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_version_is_already_stored_is_finished_from_the_store_without_training() {
    // What a redelivery finds after a crash between storing the version and acknowledging.
    let rig = Rig::start().await;
    let request = TrainRequest::default();
    let mut stored = ModelMetadata::new(mnistflow_nats::ModelVersion::generate());
    stored.metrics.accuracy = 0.99;
    stored.extra.insert("request_id".into(), serde_json::json!(request.event_id));
    // The first attempt chose its announcement's id with the version (and may have
    // announced it before the crash): the redelivery announces it under that id.
    let announced = mnistflow_nats::EventId::new();
    stored.extra.insert("published_event_id".into(), serde_json::json!(announced));
    let stored = rig.store.publish_model(bytes::Bytes::from_static(b"torchscript"), stored).await.unwrap();
    let mut progress = rig.bus.subscribe::<TrainProgress>().await.unwrap();
    let mut published = rig.bus.subscribe::<ModelPublished>().await.unwrap();
    let (_m, stop, task) = rig.spawn_worker(&[]);

    rig.bus.publish(&request).await.unwrap();
    let event = next_matching(&mut published, LONG, |e| e.request_id == Some(request.event_id)).await;
    assert_eq!(event.version, stored.version);
    assert_eq!(event.event_id, announced, "announced under a new id: the events stream would hold it twice");
    assert!(event.promoted, "{}", event.promotion);
    assert_eq!(rig.store.current().await.unwrap(), Some(stored.version));
    assert_eq!(rig.store.list_models().await.unwrap().len(), 1, "no second version");
    // Training publishes its progress before the version it makes, on the worker's one
    // connection, so any progress of this request reached our subscription before the
    // announcement did: what is not there now never will be.
    let trained = progress.next().now_or_never();
    assert!(trained.is_none(), "it trained again: {trained:?}");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_a_worker_down_mid_run_hands_the_request_back_at_once() {
    let rig = Rig::start().await;
    let mut progress = rig.bus.subscribe::<TrainProgress>().await.unwrap();
    let mut published = rig.bus.subscribe::<ModelPublished>().await.unwrap();
    // A long ack wait: only an explicit hand-back gets the request redelivered in time.
    let slow = [("TRAINER_ACK_WAIT_SECS", "300")];
    let (metrics, stop, task) = rig.spawn_worker(&slow);
    let request = TrainRequest { max_train_examples: Some(3000), ..Default::default() };
    rig.bus.publish(&request).await.unwrap();
    let first = next_matching(&mut progress, LONG, |p| p.request_id == Some(request.event_id)).await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), task).await.unwrap().unwrap();
    assert_eq!(metrics.runs(Outcome::Cancelled), 1);
    assert!(rig.store.list_models().await.unwrap().is_empty());

    let (_m, stop, task) = rig.spawn_worker(&slow);
    let event = next_matching(&mut published, LONG, |e| e.request_id == Some(request.event_id)).await;
    assert_ne!(event.run_id, Some(first.run_id));
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
}

#[test]
fn every_optimizer_learns_and_a_time_limit_ends_training_early() {
    use mnistflow_trainer::config::TrainDefaults;
    use mnistflow_trainer::data::{Mnist, RawMnist};
    use mnistflow_trainer::params::DeviceChoice;
    use mnistflow_trainer::train::{self, Control};

    tch::set_num_threads(1);
    let data = Mnist::decode(&RawMnist::from_dir(&mnist_dir()).unwrap()).unwrap();
    let test_images = data.test_images.narrow(0, 0, 1000);
    let test_labels = data.test_labels.narrow(0, 0, 1000);
    let defaults = TrainDefaults {
        default_preset: mnistflow_trainer::Preset::default_preset(),
        seed: 3,
        device: DeviceChoice::Cpu,
        max_minutes: None,
        precision: None,
    };
    for (optimizer, lr) in [("adam", 2e-3), ("adamw", 2e-3), ("adadelta", 1.0), ("sgd", 0.05), ("rmsprop", 1e-3)] {
        let request = TrainRequest {
            optimizer: Some(optimizer.into()),
            learning_rate: Some(lr),
            max_train_examples: Some(1500),
            ..Default::default()
        };
        let hp = mnistflow_trainer::Hyperparameters::resolve(&request, &defaults).unwrap();
        let trained = train::train(&data, &hp, tch::Device::Cpu, &Control::default(), &mut |_| {}).unwrap();
        assert_eq!(trained.stats.examples, 1500);
        assert_eq!(trained.stats.stopped_early, None);
        let metrics = train::evaluate(&trained.net, &test_images, &test_labels).unwrap();
        assert!(metrics.accuracy > 0.75, "{optimizer}: accuracy {}", metrics.accuracy);
    }

    let request = TrainRequest { epochs: Some(50), max_minutes: Some(0.02), ..Default::default() };
    let hp = mnistflow_trainer::Hyperparameters::resolve(&request, &defaults).unwrap();
    let trained = train::train(&data, &hp, tch::Device::Cpu, &Control::default(), &mut |_| {}).unwrap();
    assert!(trained.stats.stopped_early.is_some());
    assert!(trained.stats.train_secs < 10.0, "{}", trained.stats.train_secs);
    assert!(trained.stats.steps > 0 && trained.stats.examples < 50 * 60_000);
}

/// How many messages the events stream holds on `subject`.
async fn stored_on(bus: &Bus, subject: &str) -> u64 {
    let stream = bus.jetstream().get_stream("MNIST_EVENTS").await.unwrap();
    let counts: Vec<(String, usize)> =
        futures::TryStreamExt::try_collect(stream.info_with_subjects(subject).await.unwrap()).await.unwrap();
    counts.iter().map(|(_, n)| *n as u64).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_written_request_without_an_event_id_redelivered_after_a_crash_before_the_ack_yields_one_version_and_one_published()
 {
    // The state a trainer leaves when it is killed after storing the version and
    // announcing it but before the ack: the request, written as people write it
    // (no event_id), is still in the work queue and will be delivered again.
    let rig = Rig::start().await;
    let raw = r#"{"epochs":1,"max_train_examples":2000}"#;
    let subject = rig.bus.subjects().full(TrainRequest::SUBJECT);
    let ack = rig.bus.jetstream().publish(subject, raw.into()).await.unwrap().await.unwrap();
    let key = mnistflow_nats::DeliveryKey::new(ack.sequence, raw.as_bytes());
    let mut stored = ModelMetadata::new(mnistflow_nats::ModelVersion::generate());
    stored.metrics.accuracy = 0.99;
    stored.extra.insert("request_id".into(), serde_json::json!(key.command_id()));
    let stored = rig.store.publish_model(bytes::Bytes::from_static(b"torchscript"), stored).await.unwrap();
    let first_answer = ModelPublished {
        event_id: key.event_id("published"),
        version: stored.version.clone(),
        location: String::new(),
        sha256: stored.sha256.clone(),
        metrics: stored.metrics.clone(),
        dataset_id: None,
        run_id: None,
        request_id: Some(key.command_id()),
        hyperparameters: serde_json::Value::Null,
        promoted: true,
        promotion: "the attempt that crashed".into(),
        at: chrono::Utc::now(),
    };
    rig.bus.publish(&first_answer).await.unwrap();
    let mut progress = rig.bus.subscribe::<TrainProgress>().await.unwrap();
    let mut published = rig.bus.subscribe::<ModelPublished>().await.unwrap();

    let (metrics, stop, task) = rig.spawn_worker(&[]);
    let event = next_matching(&mut published, LONG, |e| e.request_id == Some(key.command_id())).await;

    assert_eq!(event.version, stored.version, "the redelivery finished the stored version");
    assert_eq!(rig.store.list_models().await.unwrap().len(), 1, "no second version");
    assert_eq!(event.event_id, first_answer.event_id, "the answer's id derives from the delivery");
    wait_until("the request to be acknowledged", LONG, || async {
        (consumer_info(&rig.bus).await.num_pending == 0 && metrics.runs(Outcome::Published) == 1).then_some(())
    })
    .await;
    assert_eq!(stored_on(&rig.bus, "mnist.model.published").await, 1, "model.published stored once");
    assert!(progress.next().now_or_never().is_none(), "it trained again");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
}
