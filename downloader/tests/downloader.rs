//! The downloader against a real nats-server, a local HTTP mirror serving the
//! real MNIST files (misbehaving on demand) and a store in a temporary directory.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use mnistflow_downloader::verify::{FILES, KNOWN_SHA256, dataset_id};
use mnistflow_downloader::{Config, DownloadError, Downloader, Metrics, Origin};
use mnistflow_integration::{Fault, MirrorServer, NatsServer, free_port, mnist_dir, wait_until};
use mnistflow_nats::async_nats::Subscriber;
use mnistflow_nats::{Bus, DatasetDownload, DatasetFailed, DatasetReady, TrainRequest};
use mnistflow_store::{Store, idx};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

/// A test's world: a nats-server, a store directory, a staging directory.
struct World {
    nats: NatsServer,
    store_dir: TempDir,
    tmp_dir: TempDir,
}

impl World {
    fn new() -> Self {
        Self {
            nats: NatsServer::start(),
            store_dir: tempfile::tempdir().unwrap(),
            tmp_dir: tempfile::tempdir().unwrap(),
        }
    }

    fn env(&self, mirrors: &[String], extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut env: HashMap<String, String> = [
            ("NATS_URL", self.nats.url()),
            ("STORE_URL", self.store_dir.path().display().to_string()),
            ("DOWNLOADER_MIRRORS", mirrors.join(",")),
            ("DOWNLOADER_RETRIES", "2".into()),
            ("DOWNLOADER_BACKOFF_MS", "10".into()),
            ("DOWNLOADER_TIMEOUT_SECS", "10".into()),
            ("DOWNLOADER_PROGRESS", "off".into()),
            ("DOWNLOADER_METRICS_ADDR", "off".into()),
            ("DOWNLOADER_TMP_DIR", self.tmp_dir.path().display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in extra {
            env.insert((*k).to_owned(), (*v).to_owned());
        }
        env
    }

    fn config(&self, mirrors: &[String], extra: &[(&str, &str)]) -> Config {
        let env = self.env(mirrors, extra);
        Config::from_lookup(|k| env.get(k).cloned()).unwrap()
    }

    async fn downloader(&self, config: &Config) -> Downloader {
        let store = Store::open(&config.store_url).unwrap();
        let bus = Bus::connect(&config.nats, &CancellationToken::new()).await.unwrap();
        bus.ensure_streams().await.unwrap();
        Downloader::new(config, store, bus, Arc::new(Metrics::new())).unwrap()
    }

    async fn watch(&self) -> Subscriber {
        let client = mnistflow_nats::async_nats::connect(self.nats.url()).await.unwrap();
        let sub = client.subscribe("mnist.>").await.unwrap();
        client.flush().await.unwrap();
        sub
    }

    fn store(&self) -> Store {
        Store::open(&self.store_dir.path().display().to_string()).unwrap()
    }
}

async fn next_message(sub: &mut Subscriber) -> (String, Bytes) {
    let msg = tokio::time::timeout(WAIT, sub.next()).await.expect("timed out waiting for an event").unwrap();
    (msg.subject.to_string(), msg.payload)
}

/// The next message on `subject`, skipping others.
async fn next_on<T: serde::de::DeserializeOwned>(sub: &mut Subscriber, subject: &str) -> T {
    loop {
        let (s, payload) = next_message(sub).await;
        if s == subject {
            return serde_json::from_slice(&payload).unwrap();
        }
    }
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path.display().to_string());
        }
    }
    out
}

fn requests_for(mirror: &MirrorServer, file: &str) -> Vec<String> {
    mirror.requests().into_iter().filter(|r| r.contains(file)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_run_stores_the_four_verified_files_then_announces_ready_and_train_request() {
    let world = World::new();
    let mirror = MirrorServer::start(mnist_dir()).await;
    let downloader = world.downloader(&world.config(&[mirror.url()], &[])).await;
    let mut events = world.watch().await;

    let ready = downloader.run_once(&CancellationToken::new()).await.unwrap();

    assert!(!ready.reused);
    assert_eq!(ready.dataset_id, dataset_id(&KNOWN_SHA256));
    assert_eq!(ready.location, format!("datasets/mnist/{}/", ready.dataset_id));
    assert_eq!(ready.source, mirror.url());
    assert_eq!((ready.train_count, ready.test_count), (60_000, 10_000));
    let counts = [60_000, 60_000, 10_000, 10_000];
    for (i, file) in FILES.iter().enumerate() {
        let entry = &ready.files[i];
        assert_eq!(entry.name, file.name);
        assert_eq!(entry.sha256, KNOWN_SHA256[i]);
        assert_eq!(entry.count, counts[i]);
    }
    assert_eq!(ready.files[0].size_bytes, 16 + 60_000 * 784);
    assert_eq!(mirror.requests().len(), 4, "{:?}", mirror.requests());

    // The store holds exactly what the mirror served, committed by its manifest.
    let store = world.store();
    let manifest = store.dataset(&ready.dataset_id).await.unwrap().expect("manifest committed");
    assert_eq!(manifest.files, ready.files);
    for file in FILES {
        let stored = store.get_dataset_file(&ready.dataset_id, file.name).await.unwrap();
        assert_eq!(stored, std::fs::read(mnist_dir().join(file.name)).unwrap(), "{}", file.name);
    }
    let labels = idx::parse_gz(&store.get_dataset_file(&ready.dataset_id, FILES[3].name).await.unwrap()).unwrap();
    assert_eq!(labels.count(), 10_000);

    // ready first, then the training request for that data set.
    let (subject, payload) = next_message(&mut events).await;
    assert_eq!(subject, "mnist.dataset.ready");
    let announced: DatasetReady = serde_json::from_slice(&payload).unwrap();
    assert_eq!(announced.dataset_id, ready.dataset_id);
    assert_eq!(announced.files, ready.files);
    let (subject, payload) = next_message(&mut events).await;
    assert_eq!(subject, "mnist.train.request");
    let train: TrainRequest = serde_json::from_slice(&payload).unwrap();
    assert_eq!(train.dataset_id, Some(ready.dataset_id.clone()));

    assert!(files_under(world.tmp_dir.path()).is_empty(), "staging left junk");
    let text = downloader.metrics().encode();
    assert!(text.contains("downloader_datasets_total{outcome=\"stored\"} 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_announces_the_same_dataset_without_downloading_or_storing_again() {
    let world = World::new();
    let mirror = MirrorServer::start(mnist_dir()).await;
    let config = world.config(&[mirror.url()], &[]);
    let first = world.downloader(&config).await.run_once(&CancellationToken::new()).await.unwrap();
    let manifest_key = format!("datasets/mnist/{}/manifest.json", first.dataset_id);
    let manifest_before = world.store().get(&manifest_key).await.unwrap();
    let mut events = world.watch().await;

    let second = world.downloader(&config).await.run_once(&CancellationToken::new()).await.unwrap();

    assert_eq!(second.dataset_id, first.dataset_id);
    assert!(second.reused);
    assert_eq!(second.files, first.files);
    assert_ne!(second.event_id, first.event_id, "a new announcement, not a duplicate");
    assert_eq!(mirror.requests().len(), 4, "nothing fetched the second time: {:?}", mirror.requests());
    assert_eq!(world.store().get(&manifest_key).await.unwrap(), manifest_before, "manifest rewritten");
    let ready: DatasetReady = next_on(&mut events, "mnist.dataset.ready").await;
    assert!(ready.reused);
    let train: TrainRequest = next_on(&mut events, "mnist.train.request").await;
    assert_eq!(train.dataset_id, Some(first.dataset_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_known_checksums_identical_data_is_fetched_again_but_stored_once() {
    let world = World::new();
    let mirror = MirrorServer::start(mnist_dir()).await;
    let config = world.config(&[mirror.url()], &[("DOWNLOADER_SHA256", "off"), ("DOWNLOADER_AUTO_TRAIN", "false")]);
    let first = world.downloader(&config).await.run_once(&CancellationToken::new()).await.unwrap();
    let manifest_key = format!("datasets/mnist/{}/manifest.json", first.dataset_id);
    let manifest_before = world.store().get(&manifest_key).await.unwrap();

    let second = world.downloader(&config).await.run_once(&CancellationToken::new()).await.unwrap();

    assert_eq!(first.dataset_id, dataset_id(&KNOWN_SHA256), "the id addresses the content");
    assert_eq!(second.dataset_id, first.dataset_id);
    assert!(!first.reused && second.reused);
    assert_eq!(mirror.requests().len(), 8, "{:?}", mirror.requests());
    assert_eq!(world.store().get(&manifest_key).await.unwrap(), manifest_before, "manifest rewritten");
    let stream = world.downloader(&config).await.bus().jetstream().get_stream("MNIST_TRAIN").await.unwrap();
    let mut stream = stream;
    assert_eq!(stream.info().await.unwrap().state.messages, 0, "auto-train off, yet a train.request was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_answering_500_is_retried_then_the_next_mirror_is_used() {
    let world = World::new();
    let broken = MirrorServer::start(mnist_dir()).await;
    broken.fail_always(Some(Fault::Status(500)));
    let good = MirrorServer::start(mnist_dir()).await;
    let downloader = world.downloader(&world.config(&[broken.url(), good.url()], &[("DOWNLOADER_RETRIES", "1")])).await;

    let ready = downloader.run_once(&CancellationToken::new()).await.unwrap();

    assert_eq!(ready.source, good.url());
    assert_eq!(broken.requests().len(), 8, "two attempts per file: {:?}", broken.requests());
    assert_eq!(good.requests().len(), 4);
    let text = downloader.metrics().encode();
    assert!(text.contains("downloader_failures_total{reason=\"http_status\"} 8"), "{text}");
}

/// Issue 16, item 4: a download of a data set already stored, whose data the
/// served version was trained on, does not queue the same training again; a
/// command's explicit `auto_train: true` still does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_data_set_the_served_model_was_trained_on_is_not_trained_again() {
    let world = World::new();
    let mirror = MirrorServer::start(mnist_dir()).await;
    let config = world.config(&[mirror.url()], &[]);
    let downloader = world.downloader(&config).await;
    let train_requests = || async {
        let mut stream = downloader.bus().jetstream().get_stream("MNIST_TRAIN").await.unwrap();
        stream.info().await.unwrap().state.messages
    };

    let first = downloader.run_once(&CancellationToken::new()).await.unwrap();
    assert_eq!(train_requests().await, 1, "a new data set is trained on");
    // Reused, but nothing is served yet: trained on.
    assert!(downloader.run_once(&CancellationToken::new()).await.unwrap().reused);
    assert_eq!(train_requests().await, 2);

    // A served version trained on this data set (the store checks only its bytes).
    let store = world.store();
    let mut metadata = mnistflow_store::ModelMetadata::new(mnistflow_nats::ModelVersion::generate());
    metadata.dataset_id = Some(first.dataset_id.clone());
    let version = store.publish_model(Bytes::from_static(b"not a real model"), metadata).await.unwrap().version;
    store.promote(&version).await.unwrap();
    assert!(downloader.run_once(&CancellationToken::new()).await.unwrap().reused);
    assert_eq!(train_requests().await, 2, "the served version was trained on this data set, yet training was queued");

    let forced =
        Origin { command: Some(DatasetDownload { auto_train: Some(true), ..DatasetDownload::default() }), key: None };
    downloader.download(&forced).await.unwrap();
    assert_eq!(train_requests().await, 3, "auto_train: true in a command trains anyway");
}

/// Issue 16, item 4: offline, the failure names each mirror's error once, with its
/// count, and says what to do, instead of one DNS error per attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_mirrors_are_reported_once_each_with_a_hint() {
    let world = World::new();
    // Nothing listens on these ports: every attempt is refused, as offline.
    let dead = [format!("http://127.0.0.1:{}/", free_port()), format!("http://127.0.0.1:{}/", free_port())];
    let config = world
        .config(&[dead[0].clone(), dead[1].clone()], &[("DOWNLOADER_RETRIES", "3"), ("DOWNLOADER_BACKOFF_MS", "1")]);
    let downloader = world.downloader(&config).await;

    let error = downloader.run_once(&CancellationToken::new()).await.unwrap_err().to_string();

    for mirror in &dead {
        assert_eq!(error.matches(mirror.as_str()).count(), 1, "{mirror} told more than once: {error}");
    }
    assert_eq!(error.matches("(4 attempts)").count(), 2, "{error}");
    assert_eq!(error.matches("offline? Point DOWNLOADER_MIRRORS at a local copy").count(), 1, "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_body_is_retried_and_resumed_with_a_range_request() {
    let world = World::new();
    let mirror = MirrorServer::start(mnist_dir()).await;
    let file = FILES[0].name;
    mirror.fail_next(file, Fault::Truncate(1_000_000));
    let downloader = world.downloader(&world.config(&[mirror.url()], &[])).await;

    let ready = downloader.run_once(&CancellationToken::new()).await.unwrap();

    let requests = requests_for(&mirror, file);
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert!(requests[1].ends_with("range=1000000"), "resumed where the cut happened: {requests:?}");
    assert_eq!(ready.files[0].sha256, KNOWN_SHA256[0]);
    let stored = world.store().get_dataset_file(&ready.dataset_id, file).await.unwrap();
    assert_eq!(stored, std::fs::read(mnist_dir().join(file)).unwrap());
    assert!(downloader.metrics().encode().contains("downloader_failures_total{reason=\"truncated\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bytes_are_rejected_with_a_checksum_error_and_nothing_is_stored_or_announced() {
    let world = World::new();
    let mirror = MirrorServer::start(mnist_dir()).await;
    // A well-formed gzip of a well-formed IDX file, but not the train labels.
    let impostor = Bytes::from(std::fs::read(mnist_dir().join(FILES[3].name)).unwrap());
    mirror.fail_next(FILES[1].name, Fault::Body(impostor));
    let downloader = world.downloader(&world.config(&[mirror.url()], &[])).await;
    let mut events = world.watch().await;

    let err = downloader.run_once(&CancellationToken::new()).await.unwrap_err();

    let message = err.to_string();
    assert!(matches!(err, DownloadError::Exhausted { .. }), "{message}");
    assert!(
        message.contains(&format!("{} from {}: checksum mismatch", FILES[1].name, mirror.url())),
        "names the file and the mirror: {message}"
    );
    assert_eq!(requests_for(&mirror, FILES[1].name).len(), 1, "bad content is not retried on the same mirror");
    assert!(files_under(world.store_dir.path()).is_empty(), "{:?}", files_under(world.store_dir.path()));
    assert!(files_under(world.tmp_dir.path()).is_empty(), "staging left junk");
    let failed: DatasetFailed = next_on(&mut events, "mnist.dataset.failed").await;
    assert!(failed.reason.contains("checksum mismatch"), "{}", failed.reason);
    assert!(!failed.will_retry);
    let mut stream = downloader.bus().jetstream().get_stream("MNIST_EVENTS").await.unwrap();
    assert!(
        stream.get_last_raw_message_by_subject("mnist.dataset.ready").await.is_err(),
        "dataset.ready was published"
    );
    assert_eq!(stream.info().await.unwrap().state.messages, 1, "only dataset.failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_mirror_fails_the_binary_exits_non_zero_and_publishes_why() {
    let world = World::new();
    let broken = MirrorServer::start(mnist_dir()).await;
    broken.fail_always(Some(Fault::Status(503)));
    let empty = tempfile::tempdir().unwrap();
    let empty_mirror = format!("file://{}/", empty.path().display());
    let mut events = world.watch().await;

    let env = world.env(&[broken.url(), empty_mirror.clone()], &[("DOWNLOADER_RETRIES", "1"), ("LOG_FORMAT", "json")]);
    let output = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_downloader")).envs(&env).kill_on_drop(true).output(),
    )
    .await
    .expect("the downloader did not exit")
    .unwrap();

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "exit status {:?}", output.status);
    assert!(stderr.contains("every mirror failed"), "{stderr}");
    assert!(stderr.contains("HTTP status 503") && stderr.contains("not found on this mirror"), "{stderr}");
    let failed: DatasetFailed = next_on(&mut events, "mnist.dataset.failed").await;
    assert!(failed.reason.contains("every mirror failed"), "{}", failed.reason);
    assert_eq!(failed.mirrors_tried, [broken.url(), empty_mirror]);
    assert!(files_under(world.store_dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_mirror_serves_as_well_as_http() {
    let world = World::new();
    let mirror = format!("file://{}", mnist_dir().canonicalize().unwrap().display());
    let downloader = world.downloader(&world.config(&[mirror], &[])).await;

    let ready = downloader.run_once(&CancellationToken::new()).await.unwrap();

    assert!(ready.source.starts_with("file:///"), "{}", ready.source);
    assert_eq!(ready.dataset_id, dataset_id(&KNOWN_SHA256));
    assert!(world.store().dataset(&ready.dataset_id).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_command_from_a_plain_nats_client_makes_the_service_download() {
    let world = World::new();
    let mirror = MirrorServer::start(mnist_dir()).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let env = world.env(&[mirror.url()], &[("DOWNLOADER_MODE", "service"), ("DOWNLOADER_METRICS_ADDR", &addr)]);
    let config = Config::from_lookup(|k| env.get(k).cloned()).unwrap();
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(mnistflow_downloader::main_with(config, shutdown.clone()));
    let http = &reqwest::Client::new();
    let addr = addr.as_str();
    let health = wait_until("the health endpoint", WAIT, || async move {
        http.get(format!("http://{addr}/healthz")).send().await.ok().filter(|r| r.status().is_success())
    })
    .await;
    assert_eq!(health.text().await.unwrap(), "ok\n");
    assert!(mirror.requests().is_empty(), "downloaded before being asked");

    // What `nats pub mnist.dataset.download '{}'` does: a plain core publish.
    let mut events = world.watch().await;
    let client = mnistflow_nats::async_nats::connect(world.nats.url()).await.unwrap();
    client.publish("mnist.dataset.download", Bytes::from_static(b"{}")).await.unwrap();
    client.flush().await.unwrap();

    let ready: DatasetReady = next_on(&mut events, "mnist.dataset.ready").await;
    assert_eq!(ready.dataset_id, dataset_id(&KNOWN_SHA256));
    assert!(ready.request_id.is_some());
    let train: TrainRequest = next_on(&mut events, "mnist.train.request").await;
    assert_eq!(train.dataset_id, Some(ready.dataset_id.clone()));
    assert!(world.store().dataset(&ready.dataset_id).await.unwrap().is_some());

    // Acknowledged once done: nothing pending or awaiting an ack.
    let js = &mnistflow_nats::async_nats::jetstream::new(client.clone());
    wait_until("the command to be acknowledged", WAIT, || async move {
        let mut stream = js.get_stream("MNIST_COMMANDS").await.ok()?;
        let info = stream.info().await.ok()?;
        (info.state.messages == 0).then_some(())
    })
    .await;
    let metrics = http.get(format!("http://{addr}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("downloader_datasets_total{outcome=\"stored\"} 1"), "{metrics}");
    assert!(metrics.contains("downloader_bytes_downloaded_total"), "{metrics}");
    let ready_probe = http.get(format!("http://{addr}/readyz")).send().await.unwrap();
    assert!(ready_probe.status().is_success());

    shutdown.cancel();
    tokio::time::timeout(WAIT, service).await.expect("service did not stop").unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_command_is_answered_with_dataset_failed_redelivered_then_given_up() {
    let world = World::new();
    let broken = MirrorServer::start(mnist_dir()).await;
    broken.fail_always(Some(Fault::Status(500)));
    let config = world.config(
        &[broken.url()],
        &[
            ("DOWNLOADER_MODE", "service"),
            ("DOWNLOADER_RETRIES", "0"),
            ("DOWNLOADER_MAX_DELIVER", "2"),
            ("DOWNLOADER_RETRY_DELAY_SECS", "0.1"),
        ],
    );
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(mnistflow_downloader::main_with(config, shutdown.clone()));
    let mut events = world.watch().await;
    let client = mnistflow_nats::async_nats::connect(world.nats.url()).await.unwrap();
    let bus = Bus::new(client.clone(), mnistflow_nats::Subjects::default());
    bus.ensure_streams().await.unwrap();
    bus.publish(&mnistflow_nats::DatasetDownload::default()).await.unwrap();

    let first: DatasetFailed = next_on(&mut events, "mnist.dataset.failed").await;
    let second: DatasetFailed = next_on(&mut events, "mnist.dataset.failed").await;

    assert!(first.will_retry, "the first failure is retried");
    assert!(!second.will_retry, "the last delivery gives up");
    assert!(second.reason.contains("HTTP status 500"), "{}", second.reason);
    assert_eq!(first.request_id, second.request_id);
    assert_ne!(first.event_id, second.event_id);
    // Files are fetched concurrently and the first failure cancels the rest: at least one per delivery.
    assert!(broken.requests().len() >= 2, "{:?}", broken.requests());
    assert!(files_under(world.store_dir.path()).is_empty());
    let js = &mnistflow_nats::async_nats::jetstream::new(client.clone());
    wait_until("the command to be terminated", WAIT, || async move {
        let mut stream = js.get_stream("MNIST_COMMANDS").await.ok()?;
        (stream.info().await.ok()?.state.messages == 0).then_some(())
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(WAIT, service).await.expect("service did not stop").unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_commands_are_terminated_at_once_with_dataset_failed() {
    let world = World::new();
    let mirror = MirrorServer::start(mnist_dir()).await;
    let config = world.config(&[mirror.url()], &[("DOWNLOADER_MODE", "service")]);
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(mnistflow_downloader::main_with(config, shutdown.clone()));
    let mut events = world.watch().await;
    let client = mnistflow_nats::async_nats::connect(world.nats.url()).await.unwrap();
    Bus::new(client.clone(), mnistflow_nats::Subjects::default()).ensure_streams().await.unwrap();

    client.publish("mnist.dataset.download", Bytes::from_static(b"not json")).await.unwrap();
    client
        .publish("mnist.dataset.download", Bytes::from_static(br#"{"mirrors":["ftp://example.com/"]}"#))
        .await
        .unwrap();
    client.flush().await.unwrap();

    let undecodable: DatasetFailed = next_on(&mut events, "mnist.dataset.failed").await;
    assert!(undecodable.reason.contains("undecodable"), "{}", undecodable.reason);
    assert!(!undecodable.will_retry);
    let bad_mirror: DatasetFailed = next_on(&mut events, "mnist.dataset.failed").await;
    assert!(bad_mirror.reason.contains("ftp://example.com/"), "{}", bad_mirror.reason);
    assert!(!bad_mirror.will_retry);
    assert!(bad_mirror.request_id.is_some());
    let js = &mnistflow_nats::async_nats::jetstream::new(client.clone());
    wait_until("both commands to be terminated", WAIT, || async move {
        let mut stream = js.get_stream("MNIST_COMMANDS").await.ok()?;
        (stream.info().await.ok()?.state.messages == 0).then_some(())
    })
    .await;
    assert!(mirror.requests().is_empty(), "{:?}", mirror.requests());
    shutdown.cancel();
    tokio::time::timeout(WAIT, service).await.expect("service did not stop").unwrap().unwrap();
}

/// Issue 14, item 5: a command may not point the downloader at the pod's own files
/// or at a host the configuration does not list, and credentials written into a
/// command never reach the public `dataset.failed` event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_cannot_name_local_files_or_unlisted_mirrors_and_credentials_stay_out_of_events() {
    let world = World::new();
    let listed = MirrorServer::start(mnist_dir()).await;
    let unlisted = MirrorServer::start(mnist_dir()).await;
    let config = world.config(&[listed.url()], &[("DOWNLOADER_MODE", "service"), ("DOWNLOADER_AUTO_TRAIN", "false")]);
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(mnistflow_downloader::main_with(config, shutdown.clone()));
    let mut events = world.watch().await;
    let client = mnistflow_nats::async_nats::connect(world.nats.url()).await.unwrap();
    Bus::new(client.clone(), mnistflow_nats::Subjects::default()).ensure_streams().await.unwrap();

    let local = format!("file://{}/", mnist_dir().display());
    let with_credentials = unlisted.url().replacen("http://", "http://alice:s3cret@", 1);
    for mirrors in [vec![local.clone()], vec![unlisted.url()], vec![with_credentials]] {
        let payload = serde_json::json!({ "mirrors": mirrors, "auto_train": false }).to_string();
        client.publish("mnist.dataset.download", Bytes::from(payload)).await.unwrap();
    }
    client.flush().await.unwrap();

    let local_refused: DatasetFailed = next_on(&mut events, "mnist.dataset.failed").await;
    assert!(local_refused.reason.contains("cannot name a file:// mirror"), "{}", local_refused.reason);
    assert!(!local_refused.will_retry);
    let unlisted_refused: DatasetFailed = next_on(&mut events, "mnist.dataset.failed").await;
    assert!(unlisted_refused.reason.contains("is not an allowed mirror"), "{}", unlisted_refused.reason);
    assert!(!unlisted_refused.will_retry);
    let credentials_refused: DatasetFailed = next_on(&mut events, "mnist.dataset.failed").await;
    let shown = serde_json::to_string(&credentials_refused).unwrap();
    assert!(credentials_refused.reason.contains("cannot carry mirror credentials"), "{shown}");
    assert!(!shown.contains("s3cret") && !shown.contains("alice"), "credentials in the event: {shown}");
    assert!(credentials_refused.mirrors_tried[0].contains("***@"), "{shown}");
    assert!(unlisted.requests().is_empty(), "the unlisted mirror was contacted: {:?}", unlisted.requests());
    assert!(listed.requests().is_empty(), "{:?}", listed.requests());

    // The configured mirror, named in a command, is allowed.
    let payload = serde_json::json!({ "mirrors": [listed.url()], "auto_train": false }).to_string();
    client.publish("mnist.dataset.download", Bytes::from(payload)).await.unwrap();
    let ready: DatasetReady = next_on(&mut events, "mnist.dataset.ready").await;
    assert_eq!(ready.source, listed.url());
    shutdown.cancel();
    tokio::time::timeout(WAIT, service).await.expect("service did not stop").unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bytes_on_one_mirror_fall_through_to_the_next_without_retrying_it() {
    let world = World::new();
    let impostor = MirrorServer::start(mnist_dir()).await;
    // A well-formed gzip of a well-formed IDX label file, but none of the four.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &[0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3]).unwrap();
    impostor.fail_always(Some(Fault::Body(Bytes::from(gz.finish().unwrap()))));
    let good = MirrorServer::start(mnist_dir()).await;
    let downloader = world.downloader(&world.config(&[impostor.url(), good.url()], &[])).await;

    let ready = downloader.run_once(&CancellationToken::new()).await.unwrap();

    assert_eq!(ready.source, good.url());
    assert_eq!(ready.files.iter().map(|f| f.sha256.as_str()).collect::<Vec<_>>(), KNOWN_SHA256);
    assert_eq!(impostor.requests().len(), 4, "one attempt per file: {:?}", impostor.requests());
    let text = downloader.metrics().encode();
    assert!(text.contains("downloader_failures_total{reason=\"checksum\"} 4"), "{text}");
}

/// The `nats-jetstream` trigger's metadata in `k8s/base/trainer.yaml` (a flat
/// `key: value` block; read by line so the test needs no YAML parser).
fn keda_trigger() -> HashMap<String, String> {
    let path = mnistflow_integration::workspace_root().join("k8s/base/trainer.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let block = text.split("- type: nats-jetstream").nth(1).expect("a nats-jetstream trigger in trainer.yaml");
    block
        .lines()
        .skip(2) // the rest of the `- type` line, then `metadata:`
        .map_while(|line| line.trim_start().starts_with(|c: char| c.is_ascii_alphabetic() || c == '#').then_some(line))
        .filter_map(|line| line.trim().split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keda_sees_the_queued_training_request_as_lag_after_only_the_downloader_ran() {
    let world = World::new();
    let mirror = MirrorServer::start(mnist_dir()).await;
    let config = world.config(&[mirror.url()], &[("DOWNLOADER_MODE", "once")]);
    let trigger = keda_trigger();
    let [account, stream, consumer] = ["account", "stream", "consumer"].map(|k| trigger[k].clone());

    // The downloader Job, as its pod runs it: set-up, download, announce, exit.
    tokio::time::timeout(WAIT, mnistflow_downloader::main_with(config, CancellationToken::new()))
        .await
        .expect("the downloader did not finish")
        .unwrap();

    // No trainer has run: the scaler must still find the consumer and count the request.
    let monitoring = world.nats.monitoring_url();
    let query = (account.clone(), stream.clone(), consumer.clone());
    let lag = tokio::task::spawn_blocking(move || {
        mnistflow_integration::keda::jetstream_lag(&monitoring, &query.0, &query.1, &query.2)
    })
    .await
    .unwrap();
    assert_eq!(lag, Ok(1), "KEDA's query ({account}, {stream}, {consumer}) sees no queued train.request");
}
