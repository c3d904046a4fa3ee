//! Issue 14, item 7: wrong admin tokens lock out the client that sent them, over
//! real sockets (the client address comes from the TCP peer or the trusted
//! position of `X-Forwarded-For`, which Rocket's local client cannot exercise).

use mnistflow_nats::Bus;
use mnistflow_web::Server;
use tokio_util::sync::CancellationToken;

use crate::common::{ADMIN_TOKEN, config, nats};

async fn web(
    server: &mnistflow_integration::NatsServer,
    bus: &Bus,
    extra: &[(&str, &str)],
) -> (Server, CancellationToken) {
    let mut vars =
        vec![("WEB_ADMIN_TOKEN", ADMIN_TOKEN), ("WEB_ADMIN_MAX_FAILURES", "3"), ("WEB_ADMIN_LOCKOUT_SECS", "600")];
    vars.extend_from_slice(extra);
    let shutdown = CancellationToken::new();
    let web = mnistflow_web::start(config(server, &vars), bus.clone(), shutdown.clone()).await.unwrap();
    (web, shutdown)
}

async fn train(http: &reqwest::Client, web: &Server, token: &str, forwarded_for: Option<&str>) -> reqwest::Response {
    let mut request = http
        .post(format!("http://{}/api/admin/train", web.addr()))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {token}"))
        .body("{}");
    if let Some(f) = forwarded_for {
        request = request.header("x-forwarded-for", f);
    }
    request.send().await.unwrap()
}

async fn train_requests(bus: &Bus) -> u64 {
    let mut stream = bus.jetstream().get_stream(bus.subjects().stream_name("TRAIN")).await.unwrap();
    stream.info().await.unwrap().state.messages
}

async fn metrics(http: &reqwest::Client, web: &Server) -> String {
    let addr = web.metrics_addr().expect("a metrics listener");
    http.get(format!("http://{addr}/metrics")).send().await.unwrap().text().await.unwrap()
}

const WRONG: &str = "test-admin-token-wrong-000000";

#[tokio::test]
async fn wrong_admin_tokens_lock_out_the_peer_and_a_forged_forwarded_for_does_not_escape() {
    let (server, bus) = nats().await;
    let (web, shutdown) = web(&server, &bus, &[]).await;
    let http = reqwest::Client::new();

    assert_eq!(train(&http, &web, WRONG, None).await.status(), 403);
    // Without trusted proxies the header is ignored: a client cannot be a new client per request.
    assert_eq!(train(&http, &web, WRONG, Some("192.0.2.1")).await.status(), 403);
    let locked = train(&http, &web, WRONG, Some("192.0.2.2")).await;
    assert_eq!(locked.status(), 429, "the third wrong token locks the client out");
    let retry: u64 = locked.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((590..=600).contains(&retry), "Retry-After {retry}");
    // Now even the right token is refused: guessing stops here.
    let right = train(&http, &web, ADMIN_TOKEN, None).await;
    assert_eq!(right.status(), 429);
    assert!(right.text().await.unwrap().contains("too many wrong admin tokens"));
    assert_eq!(train_requests(&bus).await, 0, "a locked-out client published a command");

    let text = metrics(&http, &web).await;
    assert!(text.contains(r#"mnistflow_web_admin_auth_failures_total{reason="wrong_token"} 3"#), "{text}");
    assert!(text.contains(r#"mnistflow_web_admin_auth_failures_total{reason="locked_out"} 1"#), "{text}");
    assert!(text.contains("mnistflow_web_admin_lockouts_total 1"), "{text}");
    assert!(text.contains("mnistflow_web_admin_locked_clients 1"), "{text}");
    shutdown.cancel();
    web.wait().await.unwrap();
}

#[tokio::test]
async fn behind_a_trusted_proxy_one_client_is_locked_out_and_the_others_are_not() {
    let (server, bus) = nats().await;
    // Google's Application Load Balancer: "<what the client sent>, <client>, <load balancer>".
    let (web, shutdown) = web(&server, &bus, &[("WEB_FORWARDED_FOR_HOPS", "2")]).await;
    let http = reqwest::Client::new();

    for forged in
        ["203.0.113.50, 34.120.0.1", "198.51.100.1, 203.0.113.50, 34.120.0.1", "9.9.9.9, 203.0.113.50, 34.120.0.1"]
    {
        let status = train(&http, &web, WRONG, Some(forged)).await.status();
        assert!(status == 403 || status == 429, "{forged}: {status}");
    }
    assert_eq!(train(&http, &web, ADMIN_TOKEN, Some("203.0.113.50, 34.120.0.1")).await.status(), 429);
    // Another client behind the same proxy (same TCP peer) is not affected.
    assert_eq!(train(&http, &web, ADMIN_TOKEN, Some("203.0.113.51, 34.120.0.1")).await.status(), 202);
    assert_eq!(train_requests(&bus).await, 1);
    shutdown.cancel();
    web.wait().await.unwrap();
}
