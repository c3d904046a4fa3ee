//! Browser tests: the real page in headless Chromium, driven over WebDriver
//! (chromedriver, started by each test), against a real web server on a random
//! port, a real nats-server and the test inference responder.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`MNISTFLOW_BROWSER=1 scripts/setup`).
//! Each test saves a screenshot under `target/screenshots/`. The browser harness
//! is the kit's ([`mnistflow_integration::browser`]); the same page against the
//! real inference stage is tested in `integration/tests/browser.rs`.

use fantoccini::Locator;
use fantoccini::actions::{MouseActions, PenActions, TouchActions};
use mnistflow_integration::browser::{Browser, Custom, WAIT, clear_answer, stroke};
use mnistflow_nats::{Bus, RunId, TrainRequest, WorkQueueOptions};
use mnistflow_web::Server;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::common::{ADMIN_TOKEN, Answer, RESPONDER_VERSION, config, nats, responder, test_digit_png};
use crate::events::{dataset_ready, loaded, progress, published};

/// A web server on a random port, stopped on drop.
struct Web {
    base: String,
    shutdown: CancellationToken,
    _server: Server,
}

impl Drop for Web {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn web(nats: &mnistflow_integration::NatsServer, bus: &Bus, extra: &[(&str, &str)]) -> Web {
    let shutdown = CancellationToken::new();
    let server = mnistflow_web::start(config(nats, extra), bus.clone(), shutdown.clone()).await.unwrap();
    let addr = server.addr();
    assert_ne!(addr.port(), 0, "the real port is reported");
    Web { base: format!("http://{addr}"), shutdown, _server: server }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploading_a_real_mnist_digit_shows_the_right_digit_and_its_probabilities() {
    let (server, bus) = nats().await;
    let _inference = responder(&bus, Answer::Knn).await;
    let web = web(&server, &bus, &[]).await;
    let b = Browser::start().await;
    b.open(&web.base).await;

    let dir = tempfile::tempdir().unwrap();
    for index in [0usize, 1] {
        let (png, label) = test_digit_png(index);
        let path = dir.path().join(format!("mnist-test-{index}-label-{label}.png"));
        std::fs::write(&path, &png).unwrap();
        b.wd.find(Locator::Id("file")).await.unwrap().send_keys(&path.display().to_string()).await.unwrap();
        let shown = b
            .until(
                &format!("the answer for test digit {index}"),
                &format!(
                    "const b = document.getElementById('result-body'); \
                     return (!b.hidden && b.dataset.source === 'upload' && document.getElementById('digit').textContent === '{label}') \
                       ? document.getElementById('digit').textContent : null"
                ),
            )
            .await;
        assert_eq!(shown, json!(label.to_string()), "test digit {index}");
    }
    let page = b
        .js("return { version: document.getElementById('model-version').textContent, \
                      rtt: document.getElementById('rtt').textContent, \
                      bars: document.querySelectorAll('#bars li').length, \
                      top: document.querySelector('#bars li.best').dataset.digit, \
                      preview: !document.getElementById('upload-preview').hidden, \
                      fill: document.querySelector('#bars li.best .fill').getBoundingClientRect().width, \
                      track: document.querySelector('#bars li.best .track').getBoundingClientRect().width, \
                      pct: parseFloat(document.querySelector('#bars li.best .pct').textContent) }")
        .await;
    assert_eq!(page["version"], RESPONDER_VERSION);
    assert!(page["rtt"].as_str().unwrap().ends_with(" ms"), "{page}");
    assert_eq!(page["bars"], 10);
    assert_eq!(page["top"], test_digit_png(1).1.to_string());
    assert_eq!(page["preview"], true);
    // The winning bar is drawn in proportion to its probability.
    let (fill, track, pct) =
        (page["fill"].as_f64().unwrap(), page["track"].as_f64().unwrap(), page["pct"].as_f64().unwrap());
    assert!(track > 50.0 && pct > 0.0, "{page}");
    assert!((fill - pct / 100.0 * track).abs() < 2.0, "bar {fill} px of {track} px for {pct} %");
    b.screenshot("upload").await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drawing_digits_with_mouse_pen_and_touch_gets_predictions() {
    let (server, bus) = nats().await;
    let inference = responder(&bus, Answer::Knn).await;
    let web = web(&server, &bus, &[]).await;
    let b = Browser::start().await;
    b.open(&web.base).await;

    // A one, with the mouse.
    stroke(&b, MouseActions::new("mouse".into()), &[(0.0, -95.0), (2.0, -30.0), (4.0, 30.0), (6.0, 95.0)]).await;
    assert_eq!(b.answer("drawing").await, 1);
    let sent = inference.received.lock().unwrap().last().unwrap().clone();
    let img = image::load_from_memory(&sent).unwrap();
    assert_eq!((img.width(), img.height()), (28, 28), "the page sends MNIST-sized PNGs");
    b.screenshot("draw-mouse-1").await;

    // Undo empties the pad again.
    b.wd.find(Locator::Id("undo")).await.unwrap().click().await.unwrap();
    b.until("the answer to clear after undo", "return document.getElementById('result-body').hidden || null").await;

    // A zero, with a pen.
    let ring: Vec<(f64, f64)> = (0..=32)
        .map(|i| {
            let a = f64::from(i) / 32.0 * std::f64::consts::TAU;
            (60.0 * a.sin(), -85.0 * a.cos())
        })
        .collect();
    stroke(&b, PenActions::new("pen".into()), &ring).await;
    assert_eq!(b.answer("drawing").await, 0);
    b.screenshot("draw-pen-0").await;
    clear_answer(&b).await;

    // A seven, with a finger: two strokes.
    stroke(&b, TouchActions::new("finger".into()), &[(-65.0, -85.0), (0.0, -85.0), (65.0, -85.0)]).await;
    stroke(&b, TouchActions::new("finger".into()), &[(65.0, -85.0), (30.0, 0.0), (-5.0, 90.0)]).await;
    assert_eq!(b.drawing_answer(2).await, 7);
    b.screenshot("draw-touch-7").await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_published_while_the_page_is_open_appears_without_a_reload() {
    let (server, bus) = nats().await;
    let _inference = responder(&bus, Answer::Knn).await;
    // History the page replays on load.
    bus.publish(&dataset_ready()).await.unwrap();
    bus.publish(&published("20261130-040000-0a1b2c", 0.9812, true, None)).await.unwrap();
    bus.publish(&loaded("inference-5f7c9-x2k4q", "20261130-040000-0a1b2c")).await.unwrap();
    let web = web(&server, &bus, &[]).await;
    let b = Browser::start().await;
    b.open(&web.base).await;
    b.until_live().await;
    b.until(
        "the replayed model",
        "return document.querySelector('tr[data-version=\"20261130-040000-0a1b2c\"] .badge.current') ? true : null",
    )
    .await;
    b.js("window.__sameDocument = 'yes'").await;

    // Something to look at in the answer panel.
    let (png, _) = test_digit_png(2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("digit.png");
    std::fs::write(&path, png).unwrap();
    b.wd.find(Locator::Id("file")).await.unwrap().send_keys(&path.display().to_string()).await.unwrap();
    b.answer("upload").await;

    // A training run streams its progress, then publishes a better model.
    let run = RunId::new();
    let losses = [2.30, 1.62, 0.91, 0.55, 0.38, 0.29, 0.22, 0.18, 0.15, 0.13, 0.11, 0.10];
    for (i, loss) in losses.iter().enumerate() {
        let step = (i as u64 % 6 + 1) * 16;
        bus.publish(&progress(run, (i / 6 + 1) as u32, step, *loss)).await.unwrap();
    }
    b.until("the loss curve", "return !document.getElementById('loss').hidden && /12 points/.test(document.getElementById('loss').getAttribute('aria-label')) || null")
        .await;
    let version = "20261130-051500-d4e5f6";
    bus.publish(&published(version, 0.9907, true, Some(run))).await.unwrap();
    let row = b
        .until(
            "the new version in the table",
            &format!(
                "const r = document.querySelector('tr[data-version=\"{version}\"]'); return r ? r.textContent : null"
            ),
        )
        .await;
    assert!(row.as_str().unwrap().contains("99.07 %"), "{row}");
    bus.publish(&loaded("inference-5f7c9-x2k4q", version)).await.unwrap();
    b.until(
        "the instance to serve the new version",
        &format!("return document.querySelector('li[data-instance=\"inference-5f7c9-x2k4q\"][data-version=\"{version}\"]') ? true : null"),
    )
    .await;
    let current =
        b.js("return [...document.querySelectorAll('#models-body tr.current')].map(r => r.dataset.version)").await;
    assert_eq!(current, json!([version]), "exactly the newest version is marked current");
    assert_eq!(b.js("return window.__sameDocument || null").await, json!("yes"), "the page was not reloaded");
    assert!(b.js("return document.getElementById('training').textContent").await.as_str().unwrap().contains(version));
    let shot = b.screenshot("pipeline-live").await;
    assert!(std::fs::metadata(shot).unwrap().len() > 10_000);
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_controls_are_absent_without_a_token() {
    let (server, bus) = nats().await;
    let web = web(&server, &bus, &[]).await;
    let b = Browser::start().await;
    b.open(&web.base).await;
    b.until_live().await;
    assert!(!b.visible("#admin").await, "admin section shown without a token");
    for id in ["#admin-token", "#admin-download", "#admin-train", "#admin-promote"] {
        assert!(!b.visible(id).await, "{id} shown without a token");
    }
    // The page is otherwise there.
    assert!(b.visible("#pad").await && b.visible("#drop").await);
    b.screenshot("no-admin").await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_controls_with_a_token_send_a_training_request() {
    let (server, bus) = nats().await;
    bus.publish(&published("20261130-040000-0a1b2c", 0.9812, true, None)).await.unwrap();
    bus.publish(&published("20261130-050000-1b2c3d", 0.9701, false, None)).await.unwrap();
    let web = web(&server, &bus, &[("WEB_ADMIN_TOKEN", ADMIN_TOKEN)]).await;
    let b = Browser::start().await;
    b.open(&web.base).await;
    b.until_live().await;
    assert!(b.visible("#admin").await);
    // A wrong token is refused, and says so.
    b.wd.find(Locator::Id("admin-token")).await.unwrap().send_keys("not-the-token-at-all").await.unwrap();
    b.wd.find(Locator::Id("admin-train")).await.unwrap().click().await.unwrap();
    b.until("the refusal", "return /refused/.test(document.getElementById('admin-status').textContent) || null").await;

    let token = b.wd.find(Locator::Id("admin-token")).await.unwrap();
    token.clear().await.unwrap();
    token.send_keys(ADMIN_TOKEN).await.unwrap();
    b.wd.find(Locator::Id("admin-epochs")).await.unwrap().send_keys("2").await.unwrap();
    b.wd.find(Locator::Id("admin-preset")).await.unwrap().send_keys("best").await.unwrap();
    b.wd.find(Locator::Id("admin-train")).await.unwrap().click().await.unwrap();
    b.until("the confirmation", "return /sent/.test(document.getElementById('admin-status').textContent) || null")
        .await;
    let mut queue = bus.work_queue::<TrainRequest>(WorkQueueOptions::default()).await.unwrap();
    let d = tokio::time::timeout(WAIT, queue.next()).await.unwrap().unwrap();
    let request = d.payload().unwrap().clone();
    d.ack().await.unwrap();
    assert_eq!(request.epochs, Some(2));
    assert_eq!(request.preset.as_deref(), Some("best"));
    // Rolling back is one click on an older row.
    assert!(b.visible("tr[data-version=\"20261130-050000-1b2c3d\"] button").await);
    b.screenshot("admin").await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_load_requests_nothing_outside_the_server_and_violates_no_csp() {
    let (server, bus) = nats().await;
    let _inference = responder(&bus, Answer::Knn).await;
    bus.publish(&dataset_ready()).await.unwrap();
    let web = web(&server, &bus, &[("WEB_ADMIN_TOKEN", ADMIN_TOKEN)]).await;
    let b = Browser::start().await;
    b.open(&web.base).await;
    b.until_live().await;
    stroke(&b, MouseActions::new("mouse".into()), &[(0.0, -90.0), (0.0, 90.0)]).await;
    b.answer("drawing").await;

    let urls = b
        .js("return performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource')).map(e => e.name)")
        .await;
    let urls: Vec<String> = serde_json::from_value(urls).unwrap();
    for path in ["/app.js", "/app.css", "/api/config", "/api/predict"] {
        assert!(urls.iter().any(|u| u == &format!("{}{path}", web.base)), "{path} not in {urls:?}");
    }
    let outside: Vec<&String> = urls.iter().filter(|u| !u.starts_with(&format!("{}/", web.base))).collect();
    assert!(outside.is_empty(), "requests outside the server: {outside:?}");
    assert_eq!(b.js("return window.__cspViolations").await, json!([]), "CSP violations");
    let log = b.wd.issue_cmd(Custom { path: "se/log", body: json!({"type": "browser"}) }).await.unwrap();
    let problems: Vec<&Value> = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["level"] == "SEVERE" || e["message"].as_str().unwrap_or("").contains("Content Security Policy"))
        .collect();
    assert!(problems.is_empty(), "console errors: {problems:?}");
    b.screenshot("csp-clean").await;

    // The checks can fail: an injected inline script and an outside fetch are
    // blocked, and both show up where the assertions above looked.
    b.js("try { const s = document.createElement('script'); s.textContent = 'window.__pwned = 1'; document.body.append(s); } catch (e) {}; \
          fetch('https://example.com/x').catch(() => {});")
        .await;
    b.until("the violations to be recorded", "return window.__cspViolations.length >= 2 || null").await;
    let directives = b.js("return window.__cspViolations.map(v => v.directive)").await;
    let directives: Vec<String> = serde_json::from_value(directives).unwrap();
    assert!(directives.iter().any(|d| d.starts_with("connect-src")), "{directives:?}");
    assert!(directives.iter().any(|d| d.contains("trusted-types") || d.starts_with("script-src")), "{directives:?}");
    assert_eq!(b.js("return window.__pwned || null").await, Value::Null, "the inline script ran");
    let log = b.wd.issue_cmd(Custom { path: "se/log", body: json!({"type": "browser"}) }).await.unwrap();
    assert!(
        log.as_array().unwrap().iter().any(|e| e["message"].as_str().unwrap_or("").contains("Content Security Policy")),
        "the console shows the violation: {log}"
    );
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_fits_a_phone_screen_and_its_controls_are_labelled_and_keyboard_usable() {
    let (server, bus) = nats().await;
    let _inference = responder(&bus, Answer::Knn).await;
    bus.publish(&dataset_ready()).await.unwrap();
    bus.publish(&published("20261130-040000-0a1b2c", 0.9812, true, None)).await.unwrap();
    bus.publish(&published("20261130-050000-1b2c3d", 0.9701, false, None)).await.unwrap();
    bus.publish(&loaded("inference-5f7c9-x2k4q", "20261130-040000-0a1b2c")).await.unwrap();
    let web = web(&server, &bus, &[("WEB_ADMIN_TOKEN", ADMIN_TOKEN)]).await;
    let b = Browser::start().await;
    b.wd.set_window_size(390, 844).await.unwrap();
    b.open(&web.base).await;
    b.until_live().await;
    b.until("the models table", "return document.querySelectorAll('#models-body tr').length === 2 || null").await;

    // A finger draws; the answer comes; Delete on the focused pad clears it all.
    stroke(&b, TouchActions::new("finger".into()), &[(0.0, -80.0), (0.0, 80.0)]).await;
    assert_eq!(b.answer("drawing").await, 1);
    assert!(b.visible("#quick-answer").await, "on a phone the answer is repeated by the pad");
    assert!(b.wd.find(Locator::Id("quick-answer")).await.unwrap().text().await.unwrap().starts_with("Answer: 1"));
    let overflow = b.js("return document.documentElement.scrollWidth - document.documentElement.clientWidth").await;
    assert!(overflow.as_i64().unwrap() <= 0, "the page scrolls sideways by {overflow} px on a phone");
    // The versions table reads without a sideways scroll: every cell of every
    // row, Published and Status included, lies inside the screen, labelled.
    let hidden = b
        .js("const wrap = document.querySelector('.table-wrap');
             const cells = [...document.querySelectorAll('#models-body td')];
             const out = cells.filter(td => { const r = td.getBoundingClientRect();
               return r.width === 0 || r.left < 0 || r.right > document.documentElement.clientWidth; })
               .map(td => td.dataset.label);
             if (wrap.scrollWidth > wrap.clientWidth) out.push(`table scrolls by ${wrap.scrollWidth - wrap.clientWidth} px`);
             return out;")
        .await;
    assert_eq!(hidden, json!([]), "versions table cells off a 390 px screen");
    let labels = b
        .js("const td = document.querySelector('#models-body tr td[data-label=\"Published\"]');
             return td ? getComputedStyle(td, '::before').content : null")
        .await;
    assert_eq!(labels, json!("\"Published\""), "each cell says which column it is");
    // The feedback controls fit too, and take the keyboard.
    assert!(b.visible("#feedback-right").await, "the feedback question shows after an answer");
    let off = b
        .js("return [...document.querySelectorAll('#feedback button')].filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth).length")
        .await;
    assert_eq!(off, json!(0), "feedback buttons off the screen");
    b.screenshot("phone").await;
    let pad = b.wd.find(Locator::Id("pad")).await.unwrap();
    pad.send_keys("\u{E017}").await.unwrap(); // Delete
    b.until(
        "Delete to clear the pad",
        "return document.getElementById('result-body').hidden && document.getElementById('undo').disabled || null",
    )
    .await;

    // Every visible control has a name a screen reader can announce, and can take focus.
    let unnamed = b
        .js("return [...document.querySelectorAll('button, input, canvas[tabindex], select, textarea')]
               .filter(e => !e.disabled && (e.offsetParent !== null || e.type === 'file'))
               .filter(e => {
                 const named = (e.labels && e.labels.length) || e.getAttribute('aria-label') || e.getAttribute('aria-labelledby')
                   || (e.tagName === 'BUTTON' && e.textContent.trim());
                 e.focus();
                 return !named || document.activeElement !== e;
               })
               .map(e => e.id || e.outerHTML.slice(0, 60))")
        .await;
    assert_eq!(unnamed, json!([]), "controls without a name or focus");
    b.close().await;
}
