//! `GET /api/events`: replay, cap, live marker, live events, resumption.

use std::time::Duration;

use mnistflow_nats::{
    Bus, DatasetId, DatasetReady, EventId, InferenceLoaded, ModelMetrics, ModelPublished, ModelVersion, RunId,
    TrainProgress,
};
use rocket::http::{Header, Status};
use rocket::local::asynchronous::LocalResponse;
use tokio::io::AsyncReadExt;

use crate::common::{client, nats};

/// One parsed SSE event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub name: String,
    pub id: Option<u64>,
    pub data: serde_json::Value,
}

/// Reads an open event stream incrementally.
pub struct Sse<'c> {
    response: LocalResponse<'c>,
    text: String,
}

impl<'c> Sse<'c> {
    pub fn new(response: LocalResponse<'c>) -> Self {
        Self { response, text: String::new() }
    }

    /// Reads until `n` complete events named `name` arrived (or panics after 10 s).
    pub async fn until(&mut self, name: &str, n: usize) -> Vec<SseEvent> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let events = self.events();
            if events.iter().filter(|e| e.name == name).count() >= n {
                return events;
            }
            let mut buf = [0u8; 4096];
            let read = tokio::time::timeout_at(deadline, self.response.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {n} {name} events; got:\n{}", self.text))
                .unwrap();
            assert!(read > 0, "stream ended; got:\n{}", self.text);
            self.text.push_str(std::str::from_utf8(&buf[..read]).unwrap());
        }
    }

    /// The complete events read so far (comments and heartbeats skipped).
    pub fn events(&self) -> Vec<SseEvent> {
        let complete = match self.text.rfind("\n\n") {
            Some(i) => &self.text[..i],
            None => return Vec::new(),
        };
        complete
            .split("\n\n")
            .filter_map(|block| {
                let (mut name, mut id, mut data) = (None, None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                Some(SseEvent { name: name?, id, data: serde_json::from_str(&data).ok()? })
            })
            .collect()
    }
}

pub fn dataset_ready() -> DatasetReady {
    DatasetReady {
        event_id: EventId::new(),
        dataset_id: DatasetId::from("3f2a9c0d"),
        location: "datasets/mnist/3f2a9c0d/".into(),
        files: Vec::new(),
        train_count: 60_000,
        test_count: 10_000,
        source: "https://storage.googleapis.com/cvdf-datasets/mnist/".into(),
        reused: false,
        request_id: None,
        created_at: chrono::Utc::now(),
    }
}

pub fn progress(run: RunId, epoch: u32, step: u64, loss: f64) -> TrainProgress {
    TrainProgress {
        event_id: EventId::new(),
        run_id: run,
        request_id: None,
        phase: "training".into(),
        epoch,
        epochs: 2,
        step,
        steps: 100,
        loss,
        examples_per_sec: 640.0,
        eta_secs: Some(60.0),
        at: chrono::Utc::now(),
    }
}

pub fn published(version: &str, accuracy: f64, promoted: bool, run: Option<RunId>) -> ModelPublished {
    ModelPublished {
        event_id: EventId::new(),
        version: ModelVersion::from(version),
        location: format!("models/mnist-cnn/{version}/"),
        sha256: "00".repeat(32),
        metrics: ModelMetrics { accuracy, loss: 0.03, ..Default::default() },
        dataset_id: Some(DatasetId::from("3f2a9c0d")),
        run_id: run,
        request_id: None,
        hyperparameters: serde_json::json!({"epochs": 2}),
        promoted,
        promotion: if promoted { "better than the current version".into() } else { "worse".into() },
        at: chrono::Utc::now(),
    }
}

pub fn loaded(instance: &str, version: &str) -> InferenceLoaded {
    InferenceLoaded {
        event_id: EventId::new(),
        instance: instance.into(),
        version: Some(ModelVersion::from(version)),
        ok: true,
        refused: None,
        error: None,
        load_ms: 42.0,
        at: chrono::Utc::now(),
    }
}

async fn history(bus: &Bus) -> RunId {
    let run = RunId::new();
    bus.publish(&dataset_ready()).await.unwrap();
    for (i, loss) in [2.3, 1.1, 0.4].into_iter().enumerate() {
        bus.publish(&progress(run, 1, (i as u64 + 1) * 30, loss)).await.unwrap();
    }
    bus.publish(&published("20261130-050000-aaaaaa", 0.987, true, Some(run))).await.unwrap();
    run
}

#[tokio::test]
async fn a_new_page_gets_the_history_then_a_live_marker_then_new_events() {
    let (server, bus) = nats().await;
    let run = history(&bus).await;
    let client = client(&server, &bus, &[]).await;
    let response = client.get("/api/events").dispatch().await;
    assert_eq!(response.status(), Status::Ok);
    assert_eq!(response.content_type().unwrap().to_string(), "text/event-stream");
    let mut sse = Sse::new(response);
    let events = sse.until("live", 1).await;
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        ["dataset.ready", "train.progress", "train.progress", "train.progress", "model.published", "live"]
    );
    assert_eq!(events.iter().filter_map(|e| e.id).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert_eq!(events[1].data["run_id"], run.to_string());
    assert_eq!(events[4].data["metrics"]["accuracy"], 0.987);

    bus.publish(&loaded("inference-7d9f-abc", "20261130-050000-aaaaaa")).await.unwrap();
    let events = sse.until("inference.loaded", 1).await;
    let last = events.last().unwrap();
    assert_eq!(last.name, "inference.loaded");
    assert_eq!(last.id, Some(6));
    assert_eq!(last.data["instance"], "inference-7d9f-abc");
}

#[tokio::test]
async fn the_replay_is_capped_but_keeps_the_last_event_of_each_kind() {
    let (server, bus) = nats().await;
    history(&bus).await;
    let run = RunId::new();
    for step in 1..=6 {
        bus.publish(&progress(run, 2, step * 10, 0.1)).await.unwrap();
    }
    let client = client(&server, &bus, &[("WEB_EVENTS_REPLAY", "2")]).await;
    let mut sse = Sse::new(client.get("/api/events").dispatch().await);
    let events = sse.until("live", 1).await;
    let summary: Vec<(String, Option<u64>)> = events.iter().map(|e| (e.name.clone(), e.id)).collect();
    assert_eq!(
        summary,
        vec![
            ("dataset.ready".to_owned(), Some(1)),
            ("model.published".to_owned(), Some(5)),
            ("train.progress".to_owned(), Some(10)),
            ("train.progress".to_owned(), Some(11)),
            ("live".to_owned(), None),
        ]
    );
}

#[tokio::test]
async fn a_reconnecting_page_resumes_after_its_last_event_id() {
    let (server, bus) = nats().await;
    history(&bus).await;
    let client = client(&server, &bus, &[]).await;
    let response = client.get("/api/events").header(Header::new("Last-Event-ID", "3")).dispatch().await;
    let mut sse = Sse::new(response);
    let events = sse.until("live", 1).await;
    let ids: Vec<Option<u64>> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids, vec![Some(4), Some(5), None]);
}

#[tokio::test]
async fn an_empty_stream_is_live_at_once() {
    let (server, bus) = nats().await;
    let client = client(&server, &bus, &[]).await;
    let mut sse = Sse::new(client.get("/api/events").dispatch().await);
    let events = sse.until("live", 1).await;
    assert_eq!(events.len(), 1);
    bus.publish(&dataset_ready()).await.unwrap();
    let events = sse.until("dataset.ready", 1).await;
    assert_eq!(events[1].id, Some(1));
}

#[tokio::test]
async fn shutdown_ends_open_event_streams_at_once_and_stops_the_server_within_its_grace() {
    use tokio::io::AsyncWriteExt;
    let (server, bus) = nats().await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let config = crate::common::config(&server, &[("WEB_SHUTDOWN_GRACE_SECS", "1")]);
    let web = mnistflow_web::start(config, bus.clone(), shutdown.clone()).await.unwrap();
    let mut tcp = tokio::net::TcpStream::connect(web.addr()).await.unwrap();
    tcp.write_all(b"GET /api/events HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n\r\n").await.unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 1024];
    while !seen.contains("event:live") {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "stream closed early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let started = std::time::Instant::now();
    shutdown.cancel();
    // The stream ends (chunked terminator, then the connection closes) at once, not after the grace.
    let closed = tokio::time::timeout(Duration::from_millis(900), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the event stream stayed open after shutdown");
    // Rocket 0.5 then waits out at most grace (1 s) + mercy (2 s) for connection tasks.
    tokio::time::timeout(Duration::from_secs(6), web.wait()).await.expect("server stopped").unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "shutdown took {:?}", started.elapsed());
}

#[tokio::test]
async fn event_streams_beyond_the_limit_are_refused_with_503_until_one_closes() {
    let (server, bus) = nats().await;
    let client = client(&server, &bus, &[("WEB_MAX_EVENT_STREAMS", "1")]).await;
    let mut first = Sse::new(client.get("/api/events").dispatch().await);
    first.until("live", 1).await;
    let second = client.get("/api/events").dispatch().await;
    assert_eq!(second.status(), Status::ServiceUnavailable);
    let body: serde_json::Value = serde_json::from_str(&second.into_string().await.unwrap()).unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("too many open event streams"), "{body}");
    drop(first);
    let mut third = Sse::new(client.get("/api/events").dispatch().await);
    third.until("live", 1).await;
}
