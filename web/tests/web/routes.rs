//! Route tests: every status of every route, through Rocket's local client.

use std::time::Duration;

use mnistflow_nats::{DatasetDownload, ModelPromote, TrainRequest, WorkQueueOptions};
use rocket::http::{ContentType, Header, Status};
use rocket::local::asynchronous::LocalResponse;
use serde_json::Value;

use crate::common::{ADMIN_TOKEN, Answer, RESPONDER_VERSION, client, nats, responder, test_digit_png};

async fn json(response: LocalResponse<'_>) -> Value {
    serde_json::from_str(&response.into_string().await.unwrap_or_default()).unwrap()
}

fn assert_security_headers(response: &LocalResponse<'_>) {
    let h = response.headers();
    let csp = h.get_one("Content-Security-Policy").expect("CSP header");
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
    assert_eq!(h.get_one("X-Content-Type-Options"), Some("nosniff"));
    assert_eq!(h.get_one("X-Frame-Options"), Some("DENY"));
    assert_eq!(h.get_one("Referrer-Policy"), Some("no-referrer"));
    assert!(h.get_one("Server").is_none(), "the server should not announce itself");
}

fn multipart(field: &str, bytes: &[u8]) -> (ContentType, Vec<u8>) {
    let boundary = "mnistflowtestboundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"digit.png\"\r\nContent-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (ContentType::new("multipart", "form-data").with_params(("boundary", boundary)), body)
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_with_security_headers_and_no_inline_code() {
    let (server, bus) = nats().await;
    let client = client(&server, &bus, &[]).await;
    let page = client.get("/").dispatch().await;
    assert_eq!(page.status(), Status::Ok);
    assert_eq!(page.content_type(), Some(ContentType::HTML));
    assert_security_headers(&page);
    let html = page.into_string().await.unwrap();
    assert!(html.contains(r#"<script src="/app.js" defer></script>"#));
    assert!(html.contains(r#"<link rel="stylesheet" href="/app.css">"#));
    // Inline code would need 'unsafe-inline': none in the page.
    assert_eq!(html.matches("<script").count(), 1, "only the external script");
    assert!(!html.contains("<style") && !html.contains(" style=") && !html.contains(" onclick="));
    assert!(!html.contains("http://") && !html.contains("https://"), "no absolute (external) URLs");

    for (path, ct) in
        [("/app.js", ContentType::JavaScript), ("/app.css", ContentType::CSS), ("/favicon.svg", ContentType::SVG)]
    {
        let r = client.get(path).dispatch().await;
        assert_eq!(r.status(), Status::Ok, "{path}");
        assert_eq!(r.content_type(), Some(ct), "{path}");
        assert_security_headers(&r);
        // An SVG's XML namespace is a name, not a request.
        let body = r.into_string().await.unwrap().replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
        assert!(!body.contains("https://") && !body.contains("http://"), "{path} refers to another origin");
    }
    let js = client.get("/app.js").dispatch().await.into_string().await.unwrap();
    assert!(!js.contains("innerHTML") && !js.contains("eval("), "the script must satisfy Trusted Types");
}

#[tokio::test]
async fn unknown_routes_answer_404_in_json_without_a_debug_page() {
    let (server, bus) = nats().await;
    let client = client(&server, &bus, &[]).await;
    let r = client.get("/no/such/page").dispatch().await;
    assert_eq!(r.status(), Status::NotFound);
    assert_eq!(r.content_type(), Some(ContentType::JSON));
    assert_security_headers(&r);
    let body = json(r).await;
    assert_eq!(body["error"]["code"], 404);
    let r = client.put("/api/predict").dispatch().await;
    assert_eq!(r.status(), Status::NotFound);
    let text = r.into_string().await.unwrap();
    assert!(!text.to_lowercase().contains("rocket"), "{text}");
}

#[tokio::test]
async fn predict_answers_200_with_the_digit_for_a_raw_png_and_for_a_multipart_file() {
    let (server, bus) = nats().await;
    let client = client(&server, &bus, &[]).await;
    let inference = responder(&bus, Answer::Knn).await;
    let (png, label) = test_digit_png(0);

    let r = client.post("/api/predict").header(ContentType::PNG).body(&png).dispatch().await;
    assert_eq!(r.status(), Status::Ok);
    assert_eq!(r.content_type(), Some(ContentType::JSON));
    let body = json(r).await;
    assert_eq!(body["digit"], u64::from(label));
    assert_eq!(body["model_version"], RESPONDER_VERSION);
    assert_eq!(body["probabilities"].as_array().unwrap().len(), 10);

    let (ct, form) = multipart("file", &png);
    let r = client.post("/api/predict").header(ct).body(form).dispatch().await;
    assert_eq!(r.status(), Status::Ok);
    assert_eq!(json(r).await["digit"], u64::from(label));
    // The payload on NATS is the image itself, unchanged, both times.
    assert_eq!(
        inference.received.lock().unwrap().iter().map(|b| b.to_vec()).collect::<Vec<_>>(),
        vec![png.clone(), png]
    );
}

#[tokio::test]
async fn predict_answers_503_saying_no_inference_instance_runs_when_none_listens() {
    let (server, bus) = nats().await;
    let client = client(&server, &bus, &[]).await;
    let (png, _) = test_digit_png(0);
    let r = client.post("/api/predict").header(ContentType::PNG).body(&png).dispatch().await;
    assert_eq!(r.status(), Status::ServiceUnavailable);
    let body = json(r).await;
    assert_eq!(body["error"]["code"], 503);
    assert!(body["error"]["message"].as_str().unwrap().contains("no inference instance is running"), "{body}");
}

#[tokio::test]
async fn predict_answers_504_when_the_instance_does_not_reply_in_time() {
    let (server, bus) = nats().await;
    let client = client(&server, &bus, &[("WEB_PREDICT_TIMEOUT_MS", "300")]).await;
    let silent = responder(&bus, Answer::Silent).await;
    let (png, _) = test_digit_png(0);
    let started = std::time::Instant::now();
    let r = client.post("/api/predict").header(ContentType::PNG).body(&png).dispatch().await;
    assert_eq!(r.status(), Status::GatewayTimeout);
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    assert_eq!(silent.count(), 1, "the request reached the instance");
    assert!(json(r).await["error"]["message"].as_str().unwrap().contains("300 ms"));
}

#[tokio::test]
async fn predict_answers_413_for_an_oversized_upload_before_forwarding_it() {
    let (server, bus) = nats().await;
    let client = client(&server, &bus, &[("WEB_MAX_UPLOAD_BYTES", "1000")]).await;
    let inference = responder(&bus, Answer::Error(415, "not an image")).await;
    let big = vec![0u8; 1001];
    let r = client
        .post("/api/predict")
        .header(ContentType::PNG)
        .header(Header::new("Content-Length", "1001"))
        .body(&big)
        .dispatch()
        .await;
    assert_eq!(r.status(), Status::PayloadTooLarge);
    assert!(json(r).await["error"]["message"].as_str().unwrap().contains("1000 bytes"));
    // The same without a Content-Length the guard could check first: the capped read catches it.
    let r = client.post("/api/predict").header(ContentType::PNG).body(&big).dispatch().await;
    assert_eq!(r.status(), Status::PayloadTooLarge);
    let (ct, form) = multipart("file", &[1u8; 990]);
    let r = client.post("/api/predict").header(ct).body(form).dispatch().await;
    assert_eq!(r.status(), Status::PayloadTooLarge, "the multipart envelope counts too");
    assert_eq!(inference.count(), 0, "nothing oversized may reach NATS");
    // Exactly at the limit is accepted and forwarded.
    let r = client.post("/api/predict").header(ContentType::PNG).body(vec![0u8; 1000]).dispatch().await;
    assert_eq!(r.status(), Status::UnsupportedMediaType);
    assert_eq!(inference.count(), 1);
}

#[tokio::test]
async fn predict_passes_the_inference_error_code_and_message_through() {
    let (server, bus) = nats().await;
    let client = client(&server, &bus, &[]).await;
    let _inference = responder(&bus, Answer::Error(422, "the image has no ink")).await;
    let r = client.post("/api/predict").header(ContentType::PNG).body(b"\x89PNG not really").dispatch().await;
    assert_eq!(r.status(), Status::UnprocessableEntity);
    let body = json(r).await;
    assert_eq!(body["error"]["code"], 422);
    assert_eq!(body["error"]["message"], "the image has no ink");
}

#[tokio::test]
async fn predict_answers_503_with_retry_after_when_the_instance_is_busy() {
    let (server, bus) = nats().await;
    let client = client(&server, &bus, &[]).await;
    let _inference = responder(&bus, Answer::Busy(3)).await;
    let r = client.post("/api/predict").header(ContentType::PNG).body(b"\x89PNG not really").dispatch().await;
    assert_eq!(r.status(), Status::ServiceUnavailable);
    assert_eq!(r.headers().get_one("Retry-After"), Some("3"));
    let body = json(r).await;
    assert_eq!(body["error"]["message"], "all instances are busy");
    // A plain error reply carries no hint, and the page adds none.
    let (server, bus) = nats().await;
    let client = self::client(&server, &bus, &[]).await;
    let _inference = responder(&bus, Answer::Error(503, "no model is loaded yet")).await;
    let r = client.post("/api/predict").header(ContentType::PNG).body(b"\x89PNG not really").dispatch().await;
    assert_eq!(r.status(), Status::ServiceUnavailable);
    assert_eq!(r.headers().get_one("Retry-After"), None);
}

#[tokio::test]
async fn predictions_beyond_the_cap_answer_503_with_retry_after_and_a_busy_instance_becomes_503() {
    let (server, bus) = nats().await;
    let limits =
        [("WEB_MAX_PREDICTIONS", "1"), ("WEB_PREDICT_TIMEOUT_MS", "3000"), ("WEB_PREDICT_ATTEMPT_TIMEOUT_MS", "3000")];
    let client = client(&server, &bus, &limits).await;
    let silent = responder(&bus, Answer::Silent).await;
    let (png, _) = test_digit_png(0);
    let first = client.post("/api/predict").header(ContentType::PNG).body(&png).dispatch();
    let second = async {
        // The first holds the only slot once its request has reached the instance.
        crate::common::eventually("the first prediction to reach the instance", Duration::from_secs(10), || async {
            (silent.count() == 1).then_some(())
        })
        .await;
        let r = client.post("/api/predict").header(ContentType::PNG).body(&png).dispatch().await;
        let retry_after = r.headers().get_one("Retry-After").map(str::to_owned);
        (r.status(), retry_after, json(r).await)
    };
    let (first, (status, retry_after, body)) = tokio::join!(first, second);
    assert_eq!(status, Status::ServiceUnavailable, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(body["error"]["message"].as_str().unwrap().contains("too many predictions"), "{body}");
    assert_eq!(silent.count(), 1, "the refused prediction never reached NATS");
    assert_eq!(first.status(), Status::GatewayTimeout, "the first ran its course");
    drop(silent);

    // The slot is free again; an instance whose decode budget is full answers
    // code 429, which the page gets as 503 (with the instance's Retry-After hint
    // when it gave one: this reply has none, and the page invents none).
    let _busy = responder(&bus, Answer::Error(429, "busy: the decode budget is full")).await;
    let r = client.post("/api/predict").header(ContentType::PNG).body(&png).dispatch().await;
    assert_eq!(r.status(), Status::ServiceUnavailable);
    assert_eq!(r.headers().get_one("Retry-After"), None);
    assert_eq!(json(r).await["error"]["message"], "busy: the decode budget is full");
}

#[tokio::test]
async fn an_upload_trickling_slower_than_the_deadline_is_cut_off_with_408_and_frees_its_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (server, bus) = nats().await;
    let _inference = responder(&bus, Answer::Error(422, "the image has no ink")).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let extra = [("WEB_MAX_PREDICTIONS", "1"), ("WEB_UPLOAD_TIMEOUT_MS", "300"), ("WEB_METRICS_ADDR", "off")];
    let web =
        mnistflow_web::start(crate::common::config(&server, &extra), bus.clone(), shutdown.clone()).await.unwrap();
    let mut slow = tokio::net::TcpStream::connect(web.addr()).await.unwrap();
    let head = "POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n";
    slow.write_all(head.as_bytes()).await.unwrap();
    // More than the 14 bytes Rocket peeks at before routing (for a `_method`
    // field) whatever the content type: a body that stalls inside those is held
    // there, before any route or guard runs (see the README).
    slow.write_all(&[0u8; 100]).await.unwrap();
    // 900 bytes never come: the answer must, within the deadline and some margin.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains("\r\n\r\n") {
            let n = slow.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
    });
    read.await.expect("an answer to the trickling upload within 10 s");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // Its slot (the only one) is free: the next prediction is forwarded.
    let r = reqwest::Client::new()
        .post(format!("http://{}/api/predict", web.addr()))
        .header("content-type", "image/png")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    shutdown.cancel();
    web.wait().await.unwrap();
}

#[tokio::test]
async fn predict_rejects_text_with_415_and_empty_or_fileless_bodies_with_400_without_forwarding() {
    let (server, bus) = nats().await;
    let client = client(&server, &bus, &[]).await;
    let inference = responder(&bus, Answer::Knn).await;
    let r = client.post("/api/predict").header(ContentType::Text).body("seven").dispatch().await;
    assert_eq!(r.status(), Status::UnsupportedMediaType);
    assert!(json(r).await["error"]["message"].as_str().unwrap().contains("multipart form with field `file`"));
    let r = client.post("/api/predict").header(ContentType::PNG).dispatch().await;
    assert_eq!(r.status(), Status::BadRequest);
    let (ct, form) = multipart("picture", b"\x89PNG");
    let r = client.post("/api/predict").header(ct).body(form).dispatch().await;
    assert_eq!(r.status(), Status::BadRequest);
    assert!(json(r).await["error"]["message"].as_str().unwrap().contains("`file`"));
    let r = client
        .post("/api/predict")
        .header(ContentType::new("multipart", "form-data").with_params(("boundary", "x")))
        .body("garbage")
        .dispatch()
        .await;
    assert_eq!(r.status(), Status::BadRequest);
    assert_eq!(inference.count(), 0);
}

#[tokio::test]
async fn admin_routes_answer_404_when_no_token_is_configured() {
    let (server, bus) = nats().await;
    let client = client(&server, &bus, &[]).await;
    for path in ["/api/admin/download", "/api/admin/train", "/api/admin/promote"] {
        let r = client
            .post(path)
            .header(ContentType::JSON)
            .header(Header::new("Authorization", format!("Bearer {ADMIN_TOKEN}")))
            .body("{}")
            .dispatch()
            .await;
        assert_eq!(r.status(), Status::NotFound, "{path}");
    }
    let config = json(client.get("/api/config").dispatch().await).await;
    assert_eq!(config["admin"], false);
}

#[tokio::test]
async fn admin_routes_answer_401_without_the_token_and_403_with_a_wrong_one() {
    let (server, bus) = nats().await;
    let client = client(&server, &bus, &[("WEB_ADMIN_TOKEN", ADMIN_TOKEN)]).await;
    assert_eq!(json(client.get("/api/config").dispatch().await).await["admin"], true);
    for path in ["/api/admin/download", "/api/admin/train", "/api/admin/promote"] {
        let r = client.post(path).header(ContentType::JSON).body("{}").dispatch().await;
        assert_eq!(r.status(), Status::Unauthorized, "{path}");
        assert!(r.headers().get_one("WWW-Authenticate").unwrap().starts_with("Bearer"));
        assert_security_headers(&r);
        let r = client
            .post(path)
            .header(ContentType::JSON)
            .header(Header::new("Authorization", "Bearer test-admin-token-0123456780"))
            .body("{}")
            .dispatch()
            .await;
        assert_eq!(r.status(), Status::Forbidden, "{path}");
        assert_eq!(json(r).await["error"]["code"], 403);
    }
    // Nothing was published.
    let info =
        bus.jetstream().get_stream(bus.subjects().stream_name("TRAIN")).await.unwrap().cached_info().state.messages;
    assert_eq!(info, 0);
}

fn auth() -> Header<'static> {
    Header::new("Authorization", format!("Bearer {ADMIN_TOKEN}"))
}

#[tokio::test]
async fn admin_commands_are_published_and_answered_202() {
    let (server, bus) = nats().await;
    let client = client(&server, &bus, &[("WEB_ADMIN_TOKEN", ADMIN_TOKEN)]).await;
    let timeout = Duration::from_secs(10);

    let r = client
        .post("/api/admin/train")
        .header(ContentType::JSON)
        .header(auth())
        .body(r#"{"epochs":3,"preset":"best"}"#)
        .dispatch()
        .await;
    assert_eq!(r.status(), Status::Accepted);
    let accepted = json(r).await;
    let mut trains = bus.work_queue::<TrainRequest>(WorkQueueOptions::default()).await.unwrap();
    let d = tokio::time::timeout(timeout, trains.next()).await.unwrap().unwrap();
    let train = d.payload().unwrap().clone();
    d.ack().await.unwrap();
    assert_eq!(train.epochs, Some(3));
    assert_eq!(train.preset.as_deref(), Some("best"));
    assert_eq!(train.requested_by.as_deref(), Some("web admin"));
    assert_eq!(accepted["event_id"], train.event_id.to_string());
    assert_eq!(accepted["subject"], "mnist.train.request");

    let r = client.post("/api/admin/download").header(ContentType::JSON).header(auth()).body("{}").dispatch().await;
    assert_eq!(r.status(), Status::Accepted);
    let mut downloads = bus.work_queue::<DatasetDownload>(WorkQueueOptions::default()).await.unwrap();
    let d = tokio::time::timeout(timeout, downloads.next()).await.unwrap().unwrap();
    assert_eq!(d.payload().unwrap().requested_by.as_deref(), Some("web admin"));
    d.ack().await.unwrap();

    let r = client
        .post("/api/admin/promote")
        .header(ContentType::JSON)
        .header(auth())
        .body(r#"{"version":"20261130-050000-abcdef"}"#)
        .dispatch()
        .await;
    assert_eq!(r.status(), Status::Accepted);
    let mut promotes = bus.work_queue::<ModelPromote>(WorkQueueOptions::default()).await.unwrap();
    let d = tokio::time::timeout(timeout, promotes.next()).await.unwrap().unwrap();
    assert_eq!(d.payload().unwrap().version.as_str(), "20261130-050000-abcdef");
    d.ack().await.unwrap();
}

#[tokio::test]
async fn admin_commands_with_invalid_input_are_refused_with_422_or_400() {
    let (server, bus) = nats().await;
    let client = client(&server, &bus, &[("WEB_ADMIN_TOKEN", ADMIN_TOKEN)]).await;
    for (path, body, status) in [
        ("/api/admin/train", r#"{"epochs":0}"#, Status::UnprocessableEntity),
        ("/api/admin/train", r#"{"epochs":1000}"#, Status::UnprocessableEntity),
        ("/api/admin/train", r#"{"preset":"../etc"}"#, Status::UnprocessableEntity),
        ("/api/admin/train", r#"{"epochs":"two"}"#, Status::UnprocessableEntity),
        ("/api/admin/promote", r#"{"version":"../../CURRENT"}"#, Status::UnprocessableEntity),
        ("/api/admin/promote", r#"{}"#, Status::UnprocessableEntity),
        ("/api/admin/download", r#"not json"#, Status::UnprocessableEntity),
    ] {
        let r = client.post(path).header(ContentType::JSON).header(auth()).body(body).dispatch().await;
        assert_eq!(r.status(), status, "{path} {body}");
    }
    let stream = bus.jetstream().get_stream(bus.subjects().stream_name("COMMANDS")).await.unwrap();
    assert_eq!(stream.cached_info().state.messages, 0, "nothing invalid was published");
}

#[tokio::test]
async fn health_and_readiness_answer_and_metrics_are_served_only_off_the_public_port() {
    let (server, bus) = nats().await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let web = mnistflow_web::start(crate::common::config(&server, &[]), bus.clone(), shutdown.clone()).await.unwrap();
    let public = format!("http://{}", web.addr());
    let metrics_addr = web.metrics_addr().expect("a metrics listener");
    assert_ne!(metrics_addr.port(), web.addr().port());
    let http = reqwest::Client::new();

    let r = http.get(format!("{public}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap()["nats"], "connected");
    assert_eq!(http.get(format!("{public}/readyz")).send().await.unwrap().status(), 200);
    let r =
        http.post(format!("{public}/api/predict")).header("content-type", "image/png").body("x").send().await.unwrap();
    assert_eq!(r.status(), 503, "no inference instance");
    let r = http.get(format!("{public}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 404, "metrics must not be on the page's (load-balanced) port");

    let scrape = || async {
        let r = http.get(format!("http://{metrics_addr}/metrics")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let kind = r.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
        r.text().await.unwrap()
    };
    let text = scrape().await;
    assert!(text.contains(r#"mnistflow_web_predictions_total{outcome="no_responders"} 1"#), "{text}");
    assert!(
        text.contains(r#"mnistflow_web_http_requests_total{method="GET",route="/healthz",status="200"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"route="unmatched",status="404"} 1"#), "the refused /metrics is counted: {text}");
    assert!(!text.contains(r#"route="/metrics""#), "scrapes are not counted as page traffic: {text}");
    let r = http
        .post(format!("{public}/api/csp-report"))
        .header("content-type", "application/csp-report")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(scrape().await.contains("mnistflow_web_csp_reports_total 1"));
    // Only /metrics there: the page and the API are not served on the metrics port.
    assert_eq!(http.get(format!("http://{metrics_addr}/")).send().await.unwrap().status(), 404);

    shutdown.cancel();
    web.wait().await.unwrap();
}

#[tokio::test]
async fn metrics_can_be_switched_off() {
    let (server, bus) = nats().await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let config = crate::common::config(&server, &[("WEB_METRICS_ADDR", "off")]);
    let web = mnistflow_web::start(config, bus, shutdown.clone()).await.unwrap();
    assert_eq!(web.metrics_addr(), None);
    let r = reqwest::get(format!("http://{}/healthz", web.addr())).await.unwrap();
    assert_eq!(r.status(), 200);
    shutdown.cancel();
    web.wait().await.unwrap();
}

#[tokio::test]
async fn readiness_answers_503_while_nats_is_down() {
    let (mut server, bus) = nats().await;
    let client = client(&server, &bus, &[("WEB_PREDICT_TIMEOUT_MS", "1000")]).await;
    server.stop();
    crate::common::eventually("NATS disconnect noticed", Duration::from_secs(10), || async {
        (client.get("/readyz").dispatch().await.status() == Status::ServiceUnavailable).then_some(())
    })
    .await;
    assert_eq!(client.get("/healthz").dispatch().await.status(), Status::Ok, "liveness does not depend on NATS");
    let (png, _) = test_digit_png(0);
    let r = client.post("/api/predict").header(ContentType::PNG).body(&png).dispatch().await;
    assert!(r.status() == Status::ServiceUnavailable || r.status() == Status::GatewayTimeout, "{}", r.status());
}
