//! Feedback from the page on the real stack (issue 17, item 3): nats-server, the
//! inference stage serving a real TorchScript model, the web tier, the feedback
//! stage and a local store; the page in headless Chromium.
//!
//! - Feedback clicked (and typed) on the page is stored in the store's feedback
//!   set and changes the live accuracy the page shows and the stage exports.
//! - Deliberately wrong anonymous feedback is stored as unverified, one client
//!   floods and is bounded, and the served model does not change.
//! - An event delivered twice is stored (and announced) once.
//! - Retention (issue 21, item 3): samples stored longer ago than
//!   `FEEDBACK_RETENTION_SECS` are pruned by the stage's pass, which announces how
//!   many; a person deletes theirs by the id `POST /api/feedback` answered, once
//!   (a repeat, or an unknown id, changes nothing and is reported).
//!
//! The browser test needs Debian's `chromium` and `chromium-driver`
//! (`MNISTFLOW_BROWSER=1 scripts/setup`).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Stack, test_digits};
use fantoccini::Locator;
use mnistflow_integration::browser::Browser;
use mnistflow_integration::{mnist_dir, wait_until};
use mnistflow_nats::{
    EventId, FeedbackDeleted, FeedbackPruned, FeedbackStored, FeedbackSubmitted, InferenceLoaded, ModelPublished,
    ModelVersion, Prediction, subjects,
};
use mnistflow_store::{FeedbackSample, ModelMetadata};
use serde_json::{Value, json};

const LABELLER_TOKEN: &str = "feedback-test-labeller-token-7";
const WAIT: Duration = Duration::from_secs(60);

/// A metric's value from the feedback stage's `/metrics`: the line that starts with `series`.
async fn metric(http: &reqwest::Client, addr: SocketAddr, series: &str) -> Option<f64> {
    let text = http.get(format!("http://{addr}/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Counts of the feedback stage's handled events, by outcome.
async fn handled(http: &reqwest::Client, addr: SocketAddr, outcome: &str) -> f64 {
    metric(http, addr, &format!("mnistflow_feedback_samples_total{{outcome=\"{outcome}\"}}")).await.unwrap_or(0.0)
}

/// The model published and made current, as the trainer would announce it (the
/// page's versions table lists announced versions).
async fn serve_a_real_model(stack: &Stack) -> ModelMetadata {
    let model = mnistflow_trainer::publish_quick_model(&stack.store, &mnist_dir()).await.unwrap();
    stack.store.promote(&model.version).await.unwrap();
    stack
        .bus
        .publish(&ModelPublished {
            event_id: EventId::new(),
            version: model.version.clone(),
            location: mnistflow_store::Store::model_prefix(&model.version),
            sha256: model.sha256.clone(),
            metrics: model.metrics.clone(),
            dataset_id: None,
            run_id: None,
            request_id: None,
            hyperparameters: json!({}),
            promoted: true,
            promotion: "test".into(),
            at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    model
}

async fn samples(stack: &Stack) -> Vec<FeedbackSample> {
    stack.store.feedback_samples(None, false).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn feedback_sent_from_the_page_is_stored_and_changes_the_live_accuracy_it_shows() {
    let stack = Stack::new(&[("WEB_LABELLER_TOKEN", LABELLER_TOKEN)]).await;
    let model = serve_a_real_model(&stack).await;
    let inference = stack.start_inference("inference-feedback").await;
    stack.wait_event::<InferenceLoaded>(WAIT, |l| l.ok && l.version.as_ref() == Some(&model.version)).await;
    let (metrics_addr, feedback) = stack.start_feedback(&[]);
    let (web_addr, web) = stack.start_web().await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();

    let b = Browser::start().await;
    b.open(&format!("http://{web_addr}")).await;
    b.until_live().await;
    let row = format!("#models-body tr[data-version=\"{}\"] td.live", model.version);
    b.until(
        "the version's row, without feedback yet",
        &format!("return document.querySelector('{row}') ? true : null"),
    )
    .await;

    // An anonymous person uploads a real test digit and clicks "Yes, it was a …".
    let digits = test_digits(2);
    let dir = tempfile::tempdir().unwrap();
    let answer = |name: &str| {
        format!(
            "const b = document.getElementById('result-body'); const f = document.getElementById('feedback'); \
             return (!b.hidden && !f.hidden && f.dataset.sent === undefined && document.getElementById('digit').textContent !== '' \
               && document.getElementById('result-body').dataset.name === '{name}') ? document.getElementById('digit').textContent : null"
        )
    };
    let upload = |i: usize| {
        let path = dir.path().join(format!("digit-{i}.png"));
        std::fs::write(&path, &digits[i].0).unwrap();
        path
    };
    let path = upload(0);
    b.js("document.getElementById('result-body').dataset.name = ''").await;
    b.wd.find(Locator::Id("file")).await.unwrap().send_keys(&path.display().to_string()).await.unwrap();
    b.until("the answer to the first upload", "const b = document.getElementById('result-body'); return (!b.hidden && !document.getElementById('feedback').hidden) || null").await;
    b.js("document.getElementById('result-body').dataset.name = 'first'").await;
    let shown: u8 = b.until("the first answer", &answer("first")).await.as_str().unwrap().parse().unwrap();
    b.wd.find(Locator::Id("feedback-right")).await.unwrap().click().await.unwrap();
    b.until("the feedback to be sent", "return document.getElementById('feedback').dataset.sent || null").await;
    assert_eq!(b.js("return document.getElementById('feedback').dataset.sent").await, json!("unverified"));
    b.until(
        "the live accuracy to show one unverified answer, right",
        &format!("const c = document.querySelector('{row}'); return c && c.dataset.unverified === '1/1' || null"),
    )
    .await;
    let cell = b.js(&format!("return document.querySelector('{row}').textContent")).await;
    assert!(cell.as_str().unwrap().contains("unverified"), "the anonymous figure is marked unverified: {cell}");
    let stored = samples(&stack).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    let first = &stored[0].event;
    assert_eq!((first.predicted, first.label, first.trusted), (shown, shown, false));
    assert_eq!(first.model_version, model.version);
    assert!(first.client.starts_with("ip-"), "{}", first.client);
    let ink = hex_pixels(&first.input).iter().filter(|p| **p > 128).count();
    assert!(ink > 30, "the stored input is the digit the model saw ({ink} inked pixels)");

    // A trusted labeller: the token, then the next answer judged from the keyboard, as a wrong one.
    b.wd.find(Locator::Css("#labeller summary")).await.unwrap().click().await.unwrap();
    b.wd.find(Locator::Id("labeller-token")).await.unwrap().send_keys(LABELLER_TOKEN).await.unwrap();
    let path = upload(1);
    b.js("document.getElementById('result-body').dataset.name = ''").await;
    b.wd.find(Locator::Id("file")).await.unwrap().send_keys(&path.display().to_string()).await.unwrap();
    b.until(
        "the answer to the second upload",
        "const f = document.getElementById('feedback'); return (!f.hidden && f.dataset.sent === undefined) || null",
    )
    .await;
    b.js("document.getElementById('result-body').dataset.name = 'second'").await;
    let shown: u8 = b.until("the second answer", &answer("second")).await.as_str().unwrap().parse().unwrap();
    let wrong = (shown + 1) % 10;
    b.wd.find(Locator::Id("feedback-right")).await.unwrap().send_keys(&wrong.to_string()).await.unwrap();
    b.until("the labeller's feedback to be sent", "return document.getElementById('feedback').dataset.sent || null")
        .await;
    assert_eq!(b.js("return document.getElementById('feedback').dataset.sent").await, json!("trusted"));
    b.until(
        "the live accuracy to show one trusted answer, wrong",
        &format!("const c = document.querySelector('{row}'); return c && c.dataset.trusted === '0/1' || null"),
    )
    .await;
    b.screenshot("feedback").await;
    let stored = samples(&stack).await;
    assert_eq!(stored.len(), 2);
    let second = &stored[1].event;
    assert_eq!(
        (second.predicted, second.label, second.trusted, second.client.as_str()),
        (shown, wrong, true, "labeller")
    );
    assert_eq!(stored[1].set_version, 2);

    // The stage exports the same figures.
    let series = |trust: &str| {
        format!("mnistflow_feedback_live_accuracy{{model_version=\"{}\",trust=\"{trust}\"}}", model.version)
    };
    assert_eq!(metric(&http, metrics_addr, &series("unverified")).await, Some(1.0));
    assert_eq!(metric(&http, metrics_addr, &series("trusted")).await, Some(0.0));
    b.close().await;

    web.stop().await;
    feedback.stop().await;
    inference.stage.stop().await;
}

fn hex_pixels(input: &str) -> Vec<u8> {
    mnistflow_nats::decode_input(input).unwrap()
}

async fn predict(http: &reqwest::Client, web: SocketAddr, png: &[u8]) -> Prediction {
    let res = http
        .post(format!("http://{web}/api/predict"))
        .header("Content-Type", "image/png")
        .body(png.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

async fn post_feedback(http: &reqwest::Client, web: SocketAddr, body: &Value, token: Option<&str>) -> (u16, Value) {
    let mut req = http.post(format!("http://{web}/api/feedback")).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_anonymous_feedback_is_stored_unverified_bounded_per_client_and_changes_nothing_served() {
    let stack = Stack::new(&[("WEB_LABELLER_TOKEN", LABELLER_TOKEN)]).await;
    let model = serve_a_real_model(&stack).await;
    let inference = stack.start_inference("inference-feedback-flood").await;
    stack.wait_event::<InferenceLoaded>(WAIT, |l| l.ok && l.version.as_ref() == Some(&model.version)).await;
    let (metrics_addr, feedback) = stack.start_feedback(&[("FEEDBACK_MAX_PER_CLIENT", "5")]);
    let (web_addr, web) = stack.start_web().await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();

    let (png, _) = test_digits(1).remove(0);
    let p = predict(&http, web_addr, &png).await;
    let input = p.input.clone().expect("the reply carries the 28×28 input");
    assert_eq!(input.len(), 1568);
    let wrong = (p.digit + 1) % 10;
    let body = json!({"model_version": p.model_version, "predicted": p.digit, "label": wrong, "input": input});

    // Bad requests are refused with a clear answer and never published.
    for (bad, status, says) in [
        (
            json!({"model_version": p.model_version, "predicted": p.digit, "label": wrong, "input": "00"}),
            422,
            "1568 hex",
        ),
        (
            json!({"model_version": p.model_version, "predicted": p.digit, "label": 12, "input": body["input"]}),
            422,
            "0 to 9",
        ),
        (json!({"model_version": "../x", "predicted": 1, "label": 2, "input": body["input"]}), 422, "model version"),
        (json!({"model_version": "v", "predicted": 1, "label": 2, "input": "0".repeat(20_000)}), 413, "16 KiB"),
        (
            json!({"model_version": "v", "predicted": 1, "label": 2, "input": body["input"], "trusted": true}),
            422,
            "trusted",
        ),
    ] {
        let (got, answer) = post_feedback(&http, web_addr, &bad, None).await;
        assert_eq!(got, status, "{answer}");
        assert!(answer["error"]["message"].as_str().unwrap_or("").contains(says), "{answer} says {says}");
    }
    let (got, answer) = post_feedback(&http, web_addr, &body, Some("not-the-labeller-token")).await;
    assert_eq!(got, 403, "a wrong labeller token: {answer}");

    // One client floods: twelve wrong answers, each accepted by the web tier;
    // the stage stores its limit (5), refuses the rest.
    for _ in 0..12 {
        let (got, answer) = post_feedback(&http, web_addr, &body, None).await;
        assert_eq!(got, 202, "{answer}");
        assert_eq!(answer["trusted"], json!(false));
    }
    wait_until("the feedback stage to handle twelve events", WAIT, || async {
        let n = handled(&http, metrics_addr, "stored").await + handled(&http, metrics_addr, "over_quota").await;
        (n >= 12.0).then_some(())
    })
    .await;
    assert_eq!(handled(&http, metrics_addr, "stored").await, 5.0);
    assert_eq!(handled(&http, metrics_addr, "over_quota").await, 7.0);
    let stored = samples(&stack).await;
    assert_eq!(stored.len(), 5);
    assert!(stored.iter().all(|s| !s.event.trusted && s.event.label == wrong && s.event.input == body["input"]));
    assert!(stack.store.feedback_samples(None, true).await.unwrap().is_empty(), "nothing entered the trusted set");
    let index = stack.store.feedback_index().await.unwrap();
    assert_eq!((index.set_version, index.trusted_samples, index.unverified_samples), (5, 0, 5));
    let live = index.versions[model.version.as_str()];
    assert_eq!((live.unverified.answers, live.unverified.correct, live.trusted.answers), (5, 0, 0));

    // Nothing served changed: CURRENT, no training asked for, the same version answers.
    assert_eq!(stack.store.current().await.unwrap(), Some(model.version.clone()));
    let mut train = stack.bus.jetstream().get_stream(stack.bus.subjects().stream_name("TRAIN")).await.unwrap();
    assert_eq!(train.info().await.unwrap().state.last_sequence, 0, "a train.request was published");
    assert_eq!(predict(&http, web_addr, &png).await.model_version, model.version);

    web.stop().await;
    feedback.stop().await;
    inference.stage.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feedback_event_delivered_twice_is_stored_and_announced_once() {
    let stack = Stack::new(&[]).await;
    let (metrics_addr, feedback) = stack.start_feedback(&[]);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let event = FeedbackSubmitted {
        event_id: EventId::new(),
        model_version: ModelVersion::from("20261201-000000-abcdef"),
        predicted: 3,
        label: 8,
        input: "7f".repeat(784),
        client: "ip-0123456789abcdef".into(),
        trusted: false,
        at: chrono::Utc::now(),
    };
    // Two messages with the same event, without Nats-Msg-Id (so JetStream keeps
    // both): the stage gets it twice, as after a redelivery whose ack was lost.
    let subject = stack.bus.subjects().full(subjects::FEEDBACK_SUBMITTED);
    let payload = serde_json::to_vec(&event).unwrap();
    for _ in 0..2 {
        stack.bus.jetstream().publish(subject.clone(), payload.clone().into()).await.unwrap().await.unwrap();
    }
    wait_until("the feedback stage to handle both messages", WAIT, || async {
        let n = handled(&http, metrics_addr, "stored").await + handled(&http, metrics_addr, "duplicate").await;
        (n >= 2.0).then_some(())
    })
    .await;
    assert_eq!(handled(&http, metrics_addr, "stored").await, 1.0);
    assert_eq!(handled(&http, metrics_addr, "duplicate").await, 1.0);
    let stored = samples(&stack).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].event.event_id, event.event_id);
    assert_eq!(stack.store.feedback_index().await.unwrap().set_version, 1);
    let announced = stack.events::<FeedbackStored>().await;
    assert_eq!(announced.len(), 1, "{announced:?}");
    assert_eq!((announced[0].feedback_id, announced[0].correct), (event.event_id, false));
    feedback.stop().await;
}

fn submitted(client: &str, trusted: bool) -> FeedbackSubmitted {
    FeedbackSubmitted {
        event_id: EventId::new(),
        model_version: ModelVersion::from("20261201-000000-abcdef"),
        predicted: 3,
        label: 3,
        input: "7f".repeat(784),
        client: client.into(),
        trusted,
        at: chrono::Utc::now(),
    }
}

/// Waits until the store holds `n` samples.
async fn wait_for_samples(stack: &Stack, n: usize) {
    wait_until(&format!("{n} feedback samples in the store"), WAIT, || async {
        (stack.store.feedback_samples(None, false).await.ok()?.len() == n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_older_than_the_retention_period_is_pruned_and_the_pass_announced() {
    let stack = Stack::new(&[]).await;
    let (_, feedback) = stack.start_feedback(&[]);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let (old_trusted, old_unverified, recent) =
        (submitted("labeller", true), submitted("ip-0123456789abcdef", false), submitted("ip-0123456789abcdef", false));
    for event in [&old_trusted, &old_unverified, &recent] {
        stack.bus.publish(event).await.unwrap();
    }
    wait_for_samples(&stack, 3).await;
    feedback.stop().await;
    let accuracy = stack.store.feedback_index().await.unwrap().versions;
    // Two of them were stored two hours ago (as the store's own file says) ...
    for event in [&old_trusted, &old_unverified] {
        let path = stack.store_dir.path().join(mnistflow_store::Store::feedback_sample_key(event));
        let mut sample: FeedbackSample = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        sample.stored_at = chrono::Utc::now() - chrono::Duration::hours(2);
        std::fs::write(&path, serde_json::to_vec(&sample).unwrap()).unwrap();
    }
    // ... and the stage restarts with a retention of one hour: its first pass, at start, prunes them.
    let (metrics_addr, feedback) =
        stack.start_feedback(&[("FEEDBACK_RETENTION_SECS", "3600"), ("FEEDBACK_RETENTION_INTERVAL_SECS", "1")]);
    let pruned = stack.wait_event::<FeedbackPruned>(WAIT, |_| true).await;
    assert_eq!((pruned.trusted_deleted, pruned.unverified_deleted), (1, 1), "{pruned:?}");
    assert_eq!((pruned.trusted_left, pruned.unverified_left), (0, 1), "{pruned:?}");
    assert_eq!(pruned.max_age_secs, 3600);
    let cut = chrono::Utc::now() - chrono::Duration::hours(1);
    assert!((pruned.before - cut).num_seconds().abs() < 60, "cut {} is not an hour ago", pruned.before);
    let left = samples(&stack).await;
    assert_eq!(left.iter().map(|s| s.event.event_id).collect::<Vec<_>>(), vec![recent.event_id]);
    let index = stack.store.feedback_index().await.unwrap();
    assert_eq!((index.set_version, index.trusted_samples, index.unverified_samples), (3, 0, 1));
    assert_eq!(index.versions, accuracy, "the live accuracy stays as it was");
    // Later passes find nothing more to delete and announce nothing.
    let passes = metric(&http, metrics_addr, "mnistflow_feedback_retention_passes_total").await.unwrap();
    wait_until("two more retention passes", WAIT, || async {
        let now = metric(&http, metrics_addr, "mnistflow_feedback_retention_passes_total").await?;
        (now >= passes + 2.0).then_some(())
    })
    .await;
    assert_eq!(stack.events::<FeedbackPruned>().await.len(), 1);
    feedback.stop().await;
}

async fn delete_feedback(http: &reqwest::Client, web: SocketAddr, id: &str) -> (u16, Value) {
    let res = http.delete(format!("http://{web}/api/feedback/{id}")).send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_deletes_their_feedback_by_its_id_once_and_unknown_ids_change_nothing() {
    let stack = Stack::new(&[]).await;
    let (metrics_addr, feedback) = stack.start_feedback(&[]);
    let (web, web_stage) = stack.start_web().await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let body =
        json!({"model_version": "20261201-000000-abcdef", "predicted": 3, "label": 8, "input": "7f".repeat(784)});
    let (status, mine) = post_feedback(&http, web, &body, None).await;
    assert_eq!(status, 202, "{mine}");
    let (status, theirs) = post_feedback(&http, web, &body, None).await;
    assert_eq!(status, 202, "{theirs}");
    let mine: EventId = mine["event_id"].as_str().unwrap().parse().unwrap();
    let theirs: EventId = theirs["event_id"].as_str().unwrap().parse().unwrap();
    wait_for_samples(&stack, 2).await;

    let (status, accepted) = delete_feedback(&http, web, &mine.to_string()).await;
    assert_eq!(status, 202, "{accepted}");
    let request: EventId = accepted["event_id"].as_str().unwrap().parse().unwrap();
    let deleted = stack.wait_event::<FeedbackDeleted>(WAIT, |d| d.request_id == request).await;
    assert_eq!((deleted.feedback_id, deleted.found, deleted.trusted), (mine, true, Some(false)));
    let left = samples(&stack).await;
    assert_eq!(left.iter().map(|s| s.event.event_id).collect::<Vec<_>>(), vec![theirs]);
    let index = stack.store.feedback_index().await.unwrap();
    assert_eq!((index.set_version, index.unverified_samples), (2, 1));

    // Again, and an id never given out: reported, nothing changes.
    for id in [mine, EventId::new()] {
        let (status, accepted) = delete_feedback(&http, web, &id.to_string()).await;
        assert_eq!(status, 202, "{accepted}");
        let request: EventId = accepted["event_id"].as_str().unwrap().parse().unwrap();
        let answer = stack.wait_event::<FeedbackDeleted>(WAIT, |d| d.request_id == request).await;
        assert_eq!((answer.feedback_id, answer.found, answer.trusted), (id, false, None));
    }
    assert_eq!(samples(&stack).await.len(), 1);
    assert_eq!(stack.store.feedback_index().await.unwrap(), index);
    let removed = |outcome: &'static str| {
        let http = http.clone();
        async move {
            metric(&http, metrics_addr, &format!("mnistflow_feedback_removed_total{{outcome=\"{outcome}\"}}"))
                .await
                .unwrap_or(0.0)
        }
    };
    assert_eq!((removed("deleted").await, removed("unknown").await), (1.0, 2.0));
    // Not an id: refused before anything is published.
    let (status, error) = delete_feedback(&http, web, "not-an-id").await;
    assert_eq!(status, 422, "{error}");
    web_stage.stop().await;
    feedback.stop().await;
}
