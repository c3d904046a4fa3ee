//! The page in headless Chromium against the real stack: nats-server, the
//! inference stage serving a real TorchScript model from the store, the trainer
//! worker and the web tier. (The web crate's own browser tests use a small
//! k-nearest-neighbour responder; this one uses nothing but the product.)
//!
//! Needs Debian's `chromium` and `chromium-driver` (`MNISTFLOW_BROWSER=1 scripts/setup`).

mod common;

use std::time::Duration;

use common::{Stack, test_digits};
use fantoccini::Locator;
use fantoccini::actions::MouseActions;
use mnistflow_integration::browser::{Browser, stroke};
use mnistflow_integration::mnist_dir;
use mnistflow_nats::{DatasetDownload, DatasetReady, InferenceLoaded, ModelPublished};
use serde_json::{Value, json};

const ADMIN_TOKEN: &str = "browser-test-admin-token-42";

/// Uploads `png` through the page's file input and returns what the answer panel
/// shows once the answer for this upload arrived: digit and model version.
async fn upload(b: &Browser, png: &[u8], name: &str) -> (u8, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, png).unwrap();
    // Clear the previous answer first, so the one read below is this upload's.
    b.js("document.getElementById('result-body').hidden = true; document.getElementById('digit').textContent = ''")
        .await;
    b.wd.find(Locator::Id("file")).await.unwrap().send_keys(&path.display().to_string()).await.unwrap();
    let shown = b
        .until(
            &format!("the answer for {name}"),
            "const b = document.getElementById('result-body'); \
             return (!b.hidden && b.dataset.source === 'upload' && document.getElementById('digit').textContent !== '') \
               ? [document.getElementById('digit').textContent, document.getElementById('model-version').textContent] : null",
        )
        .await;
    (shown[0].as_str().unwrap().parse().unwrap(), shown[1].as_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_answers_from_the_real_model_and_a_retrain_from_its_admin_controls_goes_live() {
    // The retrain below is short (TRAINER_MAX_MINUTES); it must be promoted
    // whatever its accuracy against the first model.
    let stack = Stack::new(&[("WEB_ADMIN_TOKEN", ADMIN_TOKEN), ("TRAINER_TOLERANCE", "1")]).await;
    // A dataset the trainer can use, stored by the real downloader.
    let downloader = stack.start_downloader();
    stack.bus.publish(&DatasetDownload { auto_train: Some(false), ..Default::default() }).await.unwrap();
    let first = mnistflow_trainer::publish_quick_model(&stack.store, &mnist_dir()).await.unwrap();
    stack.store.promote(&first.version).await.unwrap();
    stack.wait_event::<DatasetReady>(Duration::from_secs(60), |_| true).await;
    let inference = stack.start_inference("inference-browser").await;
    stack
        .wait_event::<InferenceLoaded>(Duration::from_secs(60), |l| l.ok && l.version.as_ref() == Some(&first.version))
        .await;
    let (web_addr, web) = stack.start_web().await;
    let base = format!("http://{web_addr}");

    let b = Browser::start().await;
    b.open(&base).await;
    b.until_live().await;
    b.until(
        "the instance serving the first model",
        &format!(
            "return document.querySelector('li[data-instance=\"inference-browser\"][data-version=\"{}\"]') ? true : null",
            first.version
        ),
    )
    .await;

    // Real MNIST test digits, uploaded as a person would: each answered by the
    // real model through web -> NATS -> inference.
    for (i, (png, label)) in test_digits(3).into_iter().enumerate() {
        let (digit, version) = upload(&b, &png, &format!("mnist-test-{i}.png")).await;
        assert_eq!(digit, label, "test digit {i}");
        assert_eq!(version, first.version.to_string());
    }
    let bars = b.js("return [...document.querySelectorAll('#bars li .pct')].map(e => parseFloat(e.textContent))").await;
    let bars: Vec<f64> = serde_json::from_value(bars).unwrap();
    assert_eq!(bars.len(), 10);
    assert!((bars.iter().sum::<f64>() - 100.0).abs() < 2.0, "probabilities shown sum to 100 %: {bars:?}");

    // A digit drawn on the canvas with the mouse: a one.
    stroke(&b, MouseActions::new("mouse".into()), &[(0.0, -95.0), (2.0, -30.0), (4.0, 30.0), (6.0, 95.0)]).await;
    assert_eq!(b.answer("drawing").await, 1, "the real model reads a drawn one");
    b.screenshot("real-stack-drawn").await;

    // Retrain from the page's admin controls: the real trainer takes the request,
    // publishes, the inference instance hot-reloads, and the open page shows it all.
    let trainer = stack.start_trainer();
    b.wd.find(Locator::Id("admin-token")).await.unwrap().send_keys(ADMIN_TOKEN).await.unwrap();
    b.wd.find(Locator::Id("admin-epochs")).await.unwrap().send_keys("1").await.unwrap();
    b.js("window.__sameDocument = 'yes'").await;
    b.wd.find(Locator::Id("admin-train")).await.unwrap().click().await.unwrap();
    b.until("the confirmation", "return /sent/.test(document.getElementById('admin-status').textContent) || null")
        .await;
    let second = stack.wait_event::<ModelPublished>(Duration::from_secs(240), |p| p.version != first.version).await;
    assert!(second.promoted, "{second:?}");
    let row = b
        .until(
            "the new version, current, in the models table",
            &format!(
                "const r = document.querySelector('#models-body tr.current[data-version=\"{}\"]'); return r ? r.textContent : null",
                second.version
            ),
        )
        .await;
    let shown_accuracy = format!("{:.2} %", second.metrics.accuracy * 100.0);
    assert!(row.as_str().unwrap().contains(&shown_accuracy), "{row} shows {shown_accuracy}");
    b.until(
        "the instance to serve the new version",
        &format!(
            "return document.querySelector('li[data-instance=\"inference-browser\"][data-version=\"{}\"]') ? true : null",
            second.version
        ),
    )
    .await;
    assert!(
        b.js("return !document.getElementById('loss').hidden").await == Value::Bool(true),
        "the run's loss curve was drawn"
    );
    assert_eq!(b.js("return window.__sameDocument || null").await, json!("yes"), "the page was not reloaded");

    // The next upload is answered by the new version.
    let (png, label) = test_digits(1).remove(0);
    let (digit, version) = upload(&b, &png, "after-retrain.png").await;
    assert_eq!((digit, version), (label, second.version.to_string()));
    let shot = b.screenshot("real-stack").await;
    assert!(std::fs::metadata(shot).unwrap().len() > 10_000);
    b.close().await;

    trainer.stop().await;
    web.stop().await;
    inference.stage.stop().await;
    downloader.stop().await;
}
