//! The `mnistflow` binary as scripts use it: exit codes, `--json`, `--help`,
//! against a real nats-server, a real store and real stages.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use mnistflow_integration::{MirrorServer, NatsServer, free_port, mnist_dir};
use mnistflow_nats::{Bus, DatasetFailed, EventId, NatsConfig};
use mnistflow_store::Store;
use tokio_util::sync::CancellationToken;

use crate::common::{Up, http_get, mnistflow};

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn help_lists_every_command_and_the_exit_codes() {
    let out = mnistflow(&[], &["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["up", "download", "train", "predict", "models", "events", "Exit codes"] {
        assert!(text.contains(word), "--help lacks {word}: {text}");
    }
    let out = mnistflow(&[], &["train", "--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("--max-train-examples"));
}

#[test]
fn usage_and_configuration_errors_exit_2_naming_the_variable() {
    let out = mnistflow(&[], &["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    let out = mnistflow(&[("NATS_URL", "http://nope:1")], &["events"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NATS_URL"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = mnistflow(&[("STORE_URL", "ftp://x/y")], &["models", "list"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("STORE_URL"));
}

#[test]
fn an_unreachable_nats_exits_3_quickly_with_a_json_error() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let started = std::time::Instant::now();
    let out = mnistflow(&[("NATS_URL", &url), ("NATS_CONNECT_TIMEOUT_SECS", "1")], &["--json", "events"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(started.elapsed() < Duration::from_secs(10));
    let lines = json_lines(&out);
    assert!(lines[0]["error"].as_str().unwrap().contains("NATS_URL"), "{lines:?}");
    assert_eq!(lines[0]["exit"], 3);
}

#[test]
fn predict_without_any_inference_instance_says_so_and_exits_3() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.png");
    std::fs::write(&file, b"whatever").unwrap();
    let out = mnistflow(&[("NATS_URL", &server.url())], &["predict", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no inference instance"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predict_models_train_download_and_events_against_running_stages() {
    let server = NatsServer::start();
    let mirror = MirrorServer::start(mnist_dir()).await;
    let store_dir = tempfile::tempdir().unwrap();
    let store_path = store_dir.path().display().to_string();
    let url = server.url();
    let env = [("NATS_URL", url.as_str()), ("STORE_URL", store_path.as_str())];
    let store = Store::local(store_dir.path()).unwrap();
    let shutdown = CancellationToken::new();
    let lookup = {
        let (url, store_path, mirror) = (url.clone(), store_path.clone(), mirror.url());
        move |k: &str| -> Option<String> {
            Some(match k {
                "NATS_URL" => url.clone(),
                "STORE_URL" => store_path.clone(),
                "DOWNLOADER_MODE" => "service".into(),
                "DOWNLOADER_MIRRORS" => mirror.clone(),
                "DOWNLOADER_METRICS_ADDR" | "TRAINER_METRICS_ADDR" => "off".into(),
                "TRAINER_MODE" => "worker".into(),
                "TRAINER_PROGRESS_BAR" => "off".into(),
                "TRAINER_THREADS" => "1".into(),
                "INFERENCE_ADDRESS" => "127.0.0.1".into(),
                "INFERENCE_PORT" => "0".into(),
                "INFERENCE_POLL_SECS" => "1".into(),
                _ => return None,
            })
        }
    };
    // A served model, so predictions have something to answer with.
    let meta = mnistflow_trainer::publish_quick_model(&store, &mnist_dir()).await.unwrap();
    store.promote(&meta.version).await.unwrap();
    let bus = Bus::connect(&NatsConfig::for_url(&url).unwrap(), &shutdown).await.unwrap();
    let inference = mnistflow_inference::App::start(
        mnistflow_inference::Config::from_lookup(&lookup).unwrap(),
        bus.clone(),
        store.clone(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let (dl, tr) = (shutdown.clone(), shutdown.clone());
    let downloader = mnistflow_downloader::Config::from_lookup(&lookup).unwrap();
    let trainer = mnistflow_trainer::Config::from_lookup(&lookup).unwrap();
    tokio::spawn(async move { mnistflow_downloader::main_with(downloader, dl).await });
    tokio::spawn(async move { mnistflow_trainer::main_with(trainer, tr).await });
    let ready = format!("http://{}/readyz", inference.http_addr());
    mnistflow_integration::wait_until("the model to be served", Duration::from_secs(60), || {
        let ready = ready.clone();
        async move { reqwest::get(&ready).await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
    })
    .await;

    let run = move |args: Vec<String>| {
        let env = env.map(|(k, v)| (k, v.to_owned()));
        async move {
            tokio::task::spawn_blocking(move || {
                let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                mnistflow(&env, &args)
            })
            .await
            .unwrap()
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let (png, label) = {
        let images =
            mnistflow_store::idx::parse_gz(&std::fs::read(mnist_dir().join("t10k-images-idx3-ubyte.gz")).unwrap())
                .unwrap();
        let labels =
            mnistflow_store::idx::parse_gz(&std::fs::read(mnist_dir().join("t10k-labels-idx1-ubyte.gz")).unwrap())
                .unwrap();
        let img = image::GrayImage::from_raw(28, 28, images.data[..784].to_vec()).unwrap();
        let path = dir.path().join("digit.png");
        img.save(&path).unwrap();
        (path, labels.data[0])
    };
    let text = dir.path().join("notes.png");
    std::fs::write(&text, "not an image").unwrap();

    // predict: one right answer, one refused file; exit 1 because one failed.
    let out = run(vec!["--json".into(), "predict".into(), png.display().to_string(), text.display().to_string()]).await;
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out);
    assert_eq!(lines[0]["digit"], u64::from(label));
    assert_eq!(lines[0]["model_version"], meta.version.as_str());
    assert_eq!(lines[1]["error"]["code"], 415);
    // Over HTTP too.
    let http = format!("http://{}", inference.http_addr());
    let out = run(vec!["predict".into(), "--url".into(), http, png.display().to_string()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!(": {label} (")));

    // models list / show.
    let out = run(vec!["--json".into(), "models".into(), "list".into()]).await;
    assert!(out.status.success());
    let listing = &json_lines(&out)[0];
    assert_eq!(listing["current"], meta.version.as_str());
    assert_eq!(listing["versions"].as_array().unwrap().len(), 1);
    let out = run(vec!["models".into(), "show".into(), "no-such-version".into()]).await;
    assert_eq!(out.status.code(), Some(1));

    // download: the data set arrives; training is not requested.
    let out = run(vec!["--json".into(), "download".into(), "--no-train".into()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json_lines(&out)[0]["train_count"], 60_000);

    // train: a nonsense request is rejected (exit 1), a short one publishes (exit 0).
    let out = run(vec!["--json".into(), "train".into(), "--epochs=-1".into()]).await;
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(vec!["--json".into(), "train".into(), "--max-train-examples".into(), "1000".into()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out);
    let published = lines.last().unwrap();
    assert!(published["version"].is_string(), "{published}");
    assert!(lines.iter().any(|l| l["step"].is_u64()), "no progress line in {lines:?}");

    // promote: the short run fell below the accuracy floor, so it waits; promoting
    // it by hand is confirmed by the inference instance that loads it.
    assert_eq!(published["promoted"], false, "{published}");
    let trained = published["version"].as_str().unwrap().to_owned();
    let out = run(vec!["--json".into(), "models".into(), "promote".into(), trained.clone()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json_lines(&out)[0]["ok"], true);
    assert_eq!(json_lines(&out)[0]["version"], trained.as_str());
    assert_eq!(store.current().await.unwrap().map(|v| v.0), Some(trained));

    // events: the history, in order, as JSON lines.
    let failed = DatasetFailed {
        event_id: EventId::new(),
        request_id: None,
        reason: "marker".into(),
        mirrors_tried: vec![],
        will_retry: false,
        at: chrono::Utc::now(),
    };
    bus.publish(&failed).await.unwrap();
    let out = run(vec!["--json".into(), "events".into()]).await;
    assert!(out.status.success());
    let events = json_lines(&out);
    let subjects: Vec<&str> = events.iter().map(|e| e["subject"].as_str().unwrap()).collect();
    for s in ["inference.loaded", "dataset.ready", "train.progress", "model.published", "dataset.failed"] {
        assert!(subjects.contains(&s), "{s} missing from {subjects:?}");
    }
    let sequences: Vec<u64> = events.iter().map(|e| e["sequence"].as_u64().unwrap()).collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(events.last().unwrap()["payload"]["reason"], "marker");
    shutdown.cancel();
}

#[test]
fn a_reader_that_goes_away_ends_the_output_quietly() {
    let store = tempfile::tempdir().unwrap();
    // `mnistflow models list | head -0`: the pipe's reading end is already closed.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_mnistflow"))
        .args(["models", "list"])
        .env_remove("NATS_URL")
        .env("STORE_URL", store.path())
        .stdout(writer)
        .output()
        .expect("run mnistflow");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

/// One `mnistflow up` on `home`: waits until inference serves a model and the
/// page answers, then Ctrl-C; returns the model served and what `up` said.
fn up_once(home: &std::path::Path, log: &str) -> (String, String) {
    let mut up = Up::start(home, log, &[]);
    let served = up.wait_served();
    let (status, page) = http_get(up.web, "/").expect("the page");
    assert_eq!(status, 200);
    assert!(page.contains("<canvas"), "the page has the drawing pad");
    // Ctrl-C: every stage stops, exit 0.
    let (status, said) = up.interrupt();
    assert_eq!(status.code(), Some(0), "{said}");
    (served, said)
}

#[test]
fn up_brings_the_pipeline_up_from_nothing_and_a_second_up_reuses_its_data_and_model() {
    let home = tempfile::tempdir().unwrap();
    let (first, said) = up_once(home.path(), "first.log");
    assert!(said.contains("requesting a download"), "{said}");
    assert!(said.contains("Stopped."), "{said}");

    let (second, said) = up_once(home.path(), "second.log");
    assert_eq!(second, first, "the second up serves the model the first trained");
    assert!(said.contains("Reusing data set") && said.contains(&first), "{said}");
    assert!(!said.contains("requesting"), "nothing was requested again: {said}");
    let versions = std::fs::read_dir(home.path().join("store/models/mnist-cnn"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().join("metadata.json").is_file())
        .count();
    assert_eq!(versions, 1, "one model trained in all");
    // Signed locally as in the cluster: one key, generated once (0600), and the
    // version inference served is signed with it.
    let key = home.path().join("keys/model-signing.pem");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let signature: serde_json::Value = serde_json::from_slice(
        &std::fs::read(home.path().join(format!("store/models/mnist-cnn/{first}/metadata.sig"))).unwrap(),
    )
    .unwrap();
    let key_id = mnistflow_store::SigningKey::read(&key).unwrap().key_id().to_owned();
    assert_eq!(signature["key_id"], key_id.as_str(), "signed with the local key");
    let datasets = std::fs::read_dir(home.path().join("store/datasets/mnist")).unwrap().count();
    assert_eq!(datasets, 1, "one data set downloaded in all");
}

/// Waits (120 s at most) until `port` answers `/healthz` with 200.
fn wait_healthy(up: &Up, port: u16, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !matches!(http_get(port, "/healthz"), Some((200, _))) {
        assert!(std::time::Instant::now() < deadline, "{what} did not answer /healthz within 120 s:\n{}", up.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The metrics addresses a stage logged (`addr=127.0.0.1:PORT`, plain log lines).
fn logged_addrs(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("etrics") && l.contains("listening") || l.contains("Health and metrics served"))
        .filter_map(|l| l.split("addr=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn two_ups_run_side_by_side_and_ctrl_c_stops_each_without_a_warning() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Given only their homes and the three ports: the metrics listeners pick free ports.
    let first = Up::start_with(a.path(), "up.log", &[], &["--no-bootstrap"]);
    let second = Up::start_with(b.path(), "up.log", &[], &["--no-bootstrap"]);
    for up in [&first, &second] {
        wait_healthy(up, up.web, "the page");
        wait_healthy(up, up.inference, "inference");
    }
    // Each stage with a metrics listener logged the address it bound; none is shared.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (mut one, mut two) = (Vec::new(), Vec::new());
    while one.len() < 3 || two.len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "three metrics addresses each within 60 s:\n{}\n---\n{}",
            first.log(),
            second.log()
        );
        std::thread::sleep(Duration::from_millis(200));
        (one, two) = (logged_addrs(&first.log()), logged_addrs(&second.log()));
    }
    let all: std::collections::BTreeSet<_> = one.iter().chain(&two).collect();
    assert_eq!(all.len(), 6, "six distinct metrics addresses: {one:?} {two:?}");
    for addr in &all {
        let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
        assert!(http_get(port, "/metrics").is_some_and(|(s, _)| s == 200), "{addr} serves /metrics");
    }

    for up in [first, second] {
        let (status, said) = up.interrupt();
        assert_eq!(status.code(), Some(0), "{said}");
        assert!(said.contains("Stopped."), "{said}");
        // Rocket's launch notices, a lost NATS connection while stopping: none.
        let warnings: Vec<_> = said.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        assert!(warnings.is_empty(), "a clean run and stop log no warning: {warnings:#?}\n{said}");
        assert!(!said.to_lowercase().contains("disconnect"), "{said}");
        // One line per log record: no JSON mixed into the plain narration.
        assert!(!said.lines().any(|l| l.trim_start().starts_with('{')), "{said}");
    }
}
