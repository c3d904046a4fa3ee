//! End-to-end and fault tests across every stage: real nats-server with
//! JetStream, the real MNIST files served by a local mirror, real libtorch, real
//! HTTP. Training runs are time-boxed (`TRAINER_MAX_MINUTES`) to keep CI sane.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Stack, python, test_digits};
use mnistflow_integration::{mnist_dir, output_within, wait_until, workspace_root};
use mnistflow_nats::{
    DatasetDownload, DatasetReady, InferenceLoaded, ModelPublished, ModelVersion, Prediction, TrainFailed,
    TrainProgress, TrainRequest, subjects,
};
use tokio::sync::Mutex;

/// Training tests share two cores: one at a time keeps their time-boxed runs comparable.
static TRAINING: Mutex<()> = Mutex::const_new(());

async fn predict_web(http: &reqwest::Client, addr: std::net::SocketAddr, png: &[u8]) -> Result<Prediction, String> {
    let response = http
        .post(format!("http://{addr}/api/predict"))
        .header("content-type", "image/png")
        .body(png.to_vec())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))
}

fn nats_cli(server: &str, args: &[&str]) -> std::process::Output {
    output_within(
        std::process::Command::new(python())
            .arg(workspace_root().join("integration/tests/nats_cli.py"))
            .args(["-s", server])
            .args(args),
        Duration::from_secs(60),
        &format!("the nats-py client (scripts/setup installs it): nats {}", args.join(" ")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn download_train_publish_reload_and_a_web_prediction_then_a_hand_written_retrain_under_load() {
    let _one = TRAINING.lock().await;
    let stack = Stack::new(&[("TRAINER_MAX_MINUTES", "1")]).await;
    let _downloader = stack.start_downloader();
    let _trainer = stack.start_trainer();
    let inference = stack.start_inference("inference-e2e").await;
    let (web, _web_stage) = stack.start_web().await;

    stack.bus.publish(&DatasetDownload { auto_train: Some(false), ..Default::default() }).await.unwrap();
    let ready = stack.wait_event::<DatasetReady>(Duration::from_secs(60), |_| true).await;
    assert_eq!((ready.train_count, ready.test_count), (60_000, 10_000));
    // Sized by examples, not by time, so the accuracy does not depend on the
    // machine's load. (Auto-training after a download is covered by the NATS
    // restart test below.)
    let request = TrainRequest {
        dataset_id: Some(ready.dataset_id.clone()),
        max_train_examples: Some(6000),
        ..Default::default()
    };
    stack.bus.publish(&request).await.unwrap();
    let first = stack.wait_event::<ModelPublished>(Duration::from_secs(240), |p| p.promoted).await;
    assert_eq!(first.dataset_id.as_ref(), Some(&ready.dataset_id));
    assert!(first.metrics.accuracy > 0.9, "{} examples should pass 90 %: {}", 6000, first.metrics.accuracy);
    stack
        .wait_event::<InferenceLoaded>(Duration::from_secs(30), |l| l.ok && l.version.as_ref() == Some(&first.version))
        .await;

    // Real digits through the web tier, over NATS, to the inference stage.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let digits = test_digits(40);
    let mut correct = 0;
    for (png, label) in &digits {
        let p = predict_web(&http, web, png).await.unwrap();
        assert_eq!(p.model_version, first.version);
        assert_eq!(p.probabilities.len(), 10);
        correct += usize::from(p.digit == *label);
    }
    assert!(correct >= 34, "only {correct}/40 test digits right through the web tier");
    let direct: Prediction = http
        .post(format!("http://{}/v1/predict", inference.app_addr))
        .header("content-type", "image/png")
        .body(digits[0].0.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(direct.model_version, first.version);

    // A person retrains by hand, with an independent client, while users keep predicting.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let answered = Arc::new(AtomicUsize::new(0));
    let seen_versions = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::<ModelVersion>::new()));
    let mut load = Vec::new();
    for (png, _) in digits.iter().take(4) {
        let (http, stop, failures, answered, seen) =
            (http.clone(), stop.clone(), failures.clone(), answered.clone(), seen_versions.clone());
        let png = png.clone();
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match predict_web(&http, web, &png).await {
                    Ok(p) => {
                        answered.fetch_add(1, Ordering::Relaxed);
                        seen.lock().unwrap().insert(p.model_version);
                    }
                    Err(e) => failures.lock().unwrap().push(e),
                }
            }
        }));
    }
    let out =
        nats_cli(&stack.nats.url(), &["pub", "mnist.train.request", r#"{"max_train_examples": 3000, "force": true}"#]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let second = stack
        .wait_event::<ModelPublished>(Duration::from_secs(180), |p| p.version != first.version && p.promoted)
        .await;
    wait_until("the new version to answer a prediction through the web tier", Duration::from_secs(30), || {
        let served = seen_versions.lock().unwrap().contains(&second.version);
        async move { served.then_some(()) }
    })
    .await;
    // Keep the load on for 20 more answers after the swap, then stop it.
    let after_swap = answered.load(Ordering::Relaxed) + 20;
    wait_until("20 more answers after the swap", Duration::from_secs(60), || {
        let n = answered.load(Ordering::Relaxed);
        async move { (n >= after_swap).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "{} failed requests during the retrain, e.g. {:?}", failures.len(), failures.first());
    assert!(answered.load(Ordering::Relaxed) > 100, "the load was too light to mean anything");
    assert_eq!(stack.store.current().await.unwrap(), Some(second.version.clone()));
    assert_eq!(stack.store.list_models().await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_stopped_and_restarted_mid_training_loses_no_event_and_the_run_completes() {
    let _one = TRAINING.lock().await;
    let mut stack = Stack::new(&[("TRAINER_MAX_MINUTES", "0.25")]).await;
    let _downloader = stack.start_downloader();
    let _trainer = stack.start_trainer();
    let _inference = stack.start_inference("inference-restart").await;
    let request = DatasetDownload::default();
    stack.bus.publish(&request).await.unwrap();
    stack.wait_event::<TrainProgress>(Duration::from_secs(60), |_| true).await;

    stack.nats.stop();
    tokio::time::sleep(Duration::from_secs(2)).await; // the outage itself, not a wait for a condition
    stack.nats.restart();

    let published = stack.wait_event::<ModelPublished>(Duration::from_secs(180), |p| p.promoted).await;
    stack
        .wait_event::<InferenceLoaded>(Duration::from_secs(60), |l| {
            l.ok && l.version.as_ref() == Some(&published.version)
        })
        .await;
    // Everything the run said is in the stream, once.
    let ready = stack.events::<DatasetReady>().await;
    assert_eq!(ready.len(), 1, "dataset.ready recorded {} times", ready.len());
    assert_eq!(ready[0].request_id, Some(request.event_id));
    let models = stack.events::<ModelPublished>().await;
    assert_eq!(models.len(), 1, "model.published recorded {} times", models.len());
    assert!(stack.events::<TrainFailed>().await.iter().all(|f| f.will_retry), "a permanent failure was reported");
    assert_eq!(stack.store.current().await.unwrap(), Some(published.version));
}

/// Two inference instances sharing `mnist.predict`, serving a quick real model.
async fn two_instances(stack: &Stack) -> (common::Inference, common::Inference, ModelVersion) {
    let meta = mnistflow_trainer::publish_quick_model(&stack.store, &mnist_dir()).await.unwrap();
    stack.store.promote(&meta.version).await.unwrap();
    let a = stack.start_inference("inference-a").await;
    let b = stack.start_inference("inference-b").await;
    for name in ["inference-a", "inference-b"] {
        stack
            .wait_event::<InferenceLoaded>(Duration::from_secs(60), |l| {
                l.ok && l.instance == name && l.version.as_ref() == Some(&meta.version)
            })
            .await;
    }
    (a, b, meta.version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_model_version_is_refused_and_the_old_one_keeps_serving() {
    let stack = Stack::new(&[]).await;
    let (_a, _b, good) = two_instances(&stack).await;
    // A complete, checksummed version whose bytes are not TorchScript.
    let mut meta = mnistflow_store::ModelMetadata::new(ModelVersion::generate());
    meta.metrics.accuracy = 0.999;
    let bad = stack.store.publish_model(bytes::Bytes::from_static(b"definitely not torchscript"), meta).await.unwrap();
    stack.store.promote(&bad.version).await.unwrap();
    stack
        .wait_event::<InferenceLoaded>(Duration::from_secs(30), |l| !l.ok && l.refused.as_ref() == Some(&bad.version))
        .await;
    let digits = test_digits(4);
    for (png, _) in &digits {
        let reply =
            stack.bus.client().request(stack.bus.subjects().full(subjects::PREDICT), png.clone().into()).await.unwrap();
        let p: Prediction = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(p.model_version, good, "the refused version must not serve");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_write_failure_is_reported_leaves_nothing_partial_and_the_trainer_stays_up() {
    let _one = TRAINING.lock().await;
    let stack = Stack::new(&[("TRAINER_MAX_MINUTES", "0.05"), ("TRAINER_MAX_DELIVER", "2")]).await;
    let _downloader = stack.start_downloader();
    // Stage the data set first, without training.
    stack.bus.publish(&DatasetDownload { auto_train: Some(false), ..Default::default() }).await.unwrap();
    stack.wait_event::<DatasetReady>(Duration::from_secs(60), |_| true).await;
    // The model directory cannot be created: a file sits where it should be.
    // (Permissions would not stop root, which CI may be.)
    let models = stack.store_dir.path().join("models");
    std::fs::remove_dir_all(&models).ok();
    std::fs::write(&models, b"not a directory").unwrap();
    let trainer = stack.start_trainer();
    let out = nats_cli(&stack.nats.url(), &["pub", "mnist.train.request", r#"{"max_train_examples": 500}"#]);
    assert!(out.status.success());
    let failed = stack.wait_event::<TrainFailed>(Duration::from_secs(120), |f| !f.will_retry).await;
    assert!(!failed.reason.is_empty());
    assert!(models.is_file(), "the failed run replaced the blocking file");
    assert!(!trainer.task.is_finished(), "the trainer died with the store");

    // Once the store is writable again, nothing partial is there, and the next
    // request succeeds on the same worker.
    std::fs::remove_file(&models).unwrap();
    assert!(stack.store.list_models().await.unwrap().is_empty());
    assert_eq!(stack.store.current().await.unwrap(), None);
    let out = nats_cli(&stack.nats.url(), &["pub", "mnist.train.request", r#"{"max_train_examples": 500}"#]);
    assert!(out.status.success());
    let published = stack.wait_event::<ModelPublished>(Duration::from_secs(120), |_| true).await;
    assert!(stack.store.load_model(&published.version).await.is_ok());
}

/// The `nats ...` command lines of the `sh` blocks of a Markdown file of the
/// workspace, in order, a trailing `  # comment` dropped.
fn fenced_nats_lines(file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(workspace_root().join(file)).unwrap();
    let mut in_sh = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_sh = line.trim() == "```sh";
            continue;
        }
        if in_sh && line.starts_with("nats ") {
            out.push(line.split("  #").next().unwrap_or_default().trim_end().to_owned());
        }
    }
    out
}

/// The inline code spans of a Markdown file of the workspace that are whole `nats`
/// commands on one of the pipeline's subjects.
fn inline_nats_commands(file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(workspace_root().join(file)).unwrap();
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|span| span.starts_with("nats ") && span.contains(" mnist."))
        .map(str::to_owned)
        .collect()
}

/// The examples of docs/nats.md, which the test below runs.
fn doc_examples() -> Vec<String> {
    fenced_nats_lines("docs/nats.md")
}

/// The subject of a `nats` command line: its first word under the `mnist.` prefix.
fn subject_of(line: &str) -> &str {
    line.split_whitespace().find(|w| w.starts_with("mnist.")).unwrap_or_default()
}

#[test]
fn the_readme_nats_examples_are_lines_of_the_docs() {
    let examples = doc_examples();
    let readme: Vec<String> =
        fenced_nats_lines("README.md").into_iter().chain(inline_nats_commands("README.md")).collect();
    assert!(readme.len() >= 3, "the README lost its nats examples: {readme:?}");
    for line in &readme {
        assert!(
            examples.contains(line),
            "README.md's `{line}` is not a line of docs/nats.md, whose examples the_nats_docs_examples_work_as_written runs: copy one from there"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_nats_docs_examples_work_as_written() {
    let _one = TRAINING.lock().await;
    // A floor no short run reaches: the trained version waits for the documented promote.
    let stack = Stack::new(&[("TRAINER_ACCURACY_FLOOR", "0.9999")]).await;
    let _downloader = stack.start_downloader();
    let _trainer = stack.start_trainer();
    let _inference = stack.start_inference("inference-docs").await;

    // A shell where `nats` is the independent client, in a folder holding digit.png.
    let shell = tempfile::tempdir().unwrap();
    let (png, label) = test_digits(1).remove(0);
    std::fs::write(shell.path().join("digit.png"), &png).unwrap();
    let shim = shell.path().join("nats");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\nexec '{}' '{}' -s '{}' \"$@\"\n",
            python().display(),
            workspace_root().join("integration/tests/nats_cli.py").display(),
            stack.nats.url()
        ),
    )
    .unwrap();
    let mut perms = std::fs::metadata(&shim).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&shim, perms).unwrap();
    let path = format!("{}:{}", shell.path().display(), std::env::var("PATH").unwrap_or_default());

    let examples = doc_examples();
    assert!(examples.len() >= 5, "docs/nats.md lost its examples: {examples:?}");
    let mut trained: Option<ModelVersion> = None;
    let mut sent = std::collections::HashSet::new();
    for example in &examples {
        let line = match &trained {
            Some(v) => example.replace("20261130-101500-a1b2c3", v.as_str()),
            None => example.clone(),
        };
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new("sh")
                .arg("-c")
                .arg(&line)
                .current_dir(shell.path())
                .env("PATH", &path)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("timed out after 60 s waiting for the docs example to exit: {line}"))
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{line}: {stderr}");
        if line.contains(" -J ") {
            assert!(stderr.contains("Stored in Stream: "), "{line}: no JetStream acknowledgement: {stderr}");
            // A repeated Nats-Msg-Id is acknowledged as a duplicate, a new one is not.
            let repeated = line.contains("Nats-Msg-Id:") && !sent.insert(line.clone());
            assert_eq!(stderr.contains("Duplicate: true"), repeated, "{line}: {stderr}");
        }
        let subject = subject_of(&line);
        match subject {
            "mnist.dataset.download" => {
                let ready = stack.wait_event::<DatasetReady>(Duration::from_secs(60), |_| true).await;
                assert_eq!(ready.train_count, 60_000, "{line}");
            }
            "mnist.train.request" => {
                let p = stack.wait_event::<ModelPublished>(Duration::from_secs(180), |_| true).await;
                assert!(!p.promoted, "the floor should have held it back: {}", p.promotion);
                trained = Some(p.version);
            }
            "mnist.model.promote" => {
                let v = trained.clone().expect("the docs train before they promote");
                stack
                    .wait_event::<InferenceLoaded>(Duration::from_secs(60), |l| l.ok && l.version.as_ref() == Some(&v))
                    .await;
                assert_eq!(stack.store.current().await.unwrap(), Some(v));
            }
            "mnist.predict" if line.contains("digit.png") => {
                let p: Prediction =
                    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{line}: {e}: {stdout}"));
                assert_eq!(Some(&p.model_version), trained.as_ref());
                assert_eq!(p.digit, label, "{line}: {stdout}");
            }
            "mnist.predict" => {
                let e: mnistflow_nats::PredictError =
                    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{line}: {e}: {stdout}"));
                assert_eq!(e.error.code, 415, "{line}: {stdout}");
            }
            other => panic!("docs/nats.md has an example for {other} that this test does not check: {line}"),
        }
    }
}
