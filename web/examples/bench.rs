//! Measures what the web tier adds: `POST /api/predict` against a direct NATS
//! request to the same responder, sequential and concurrent, and how long an
//! event takes from `bus.publish` to an open `/api/events` stream.
//!
//! The responder answers at once with a canned prediction, so the figures are
//! the web tier's and NATS' own cost, not the model's.
//!
//! ```sh
//! cargo run -p mnistflow-web --example bench -- [requests] [concurrency]
//! ```

use std::time::{Duration, Instant};

use futures::StreamExt;
use mnistflow_integration::NatsServer;
use mnistflow_nats::{Bus, DatasetId, DatasetReady, EventId, ModelVersion, NatsConfig, Prediction, subjects};
use tokio_util::sync::CancellationToken;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(what: &str, mut samples: Vec<Duration>, wall: Duration) {
    samples.sort();
    println!(
        "| {what} | {} | {:.0} | {:.2} | {:.2} | {:.2} |",
        samples.len(),
        samples.len() as f64 / wall.as_secs_f64(),
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.9).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let requests = args.first().copied().unwrap_or(2_000);
    let concurrency = args.get(1).copied().unwrap_or(16);

    let nats = NatsServer::start();
    let token = CancellationToken::new();
    let bus = Bus::connect(&NatsConfig::for_url(&nats.url())?, &token).await?;
    bus.ensure_streams().await?;

    let reply = serde_json::to_vec(&Prediction {
        digit: 7,
        probabilities: vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0],
        model_version: ModelVersion::from("bench"),
        input: None,
    })?;
    let client = bus.client().clone();
    let mut sub = client.queue_subscribe(bus.subjects().full(subjects::PREDICT), "inference".into()).await?;
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Some(to) = msg.reply {
                let _ = client.publish(to, reply.clone().into()).await;
            }
        }
    });

    let config = mnistflow_web::Config::from_lookup(|k| match k {
        "NATS_URL" => Some(nats.url()),
        "WEB_ADDRESS" => Some("127.0.0.1".into()),
        "WEB_PORT" => Some("0".into()),
        _ => None,
    })?;
    let server = mnistflow_web::start(config, bus.clone(), token.clone()).await?;
    let base = format!("http://{}", server.addr());

    // A 28×28 PNG, like the page sends for a drawing.
    let mut img = image::GrayImage::new(28, 28);
    for y in 4..24 {
        img.put_pixel(14, y, image::Luma([255]));
    }
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    let png = bytes::Bytes::from(png);

    println!("{requests} requests, PNG of {} bytes, concurrency {concurrency} where concurrent\n", png.len());
    println!("| path | requests | per second | p50 ms | p90 ms | p99 ms |");
    println!("|---|---|---|---|---|---|");

    // Direct NATS request/reply: the floor.
    let mut samples = Vec::with_capacity(requests);
    let started = Instant::now();
    for _ in 0..requests {
        let t = Instant::now();
        bus.client().request(bus.subjects().full(subjects::PREDICT), png.clone()).await?;
        samples.push(t.elapsed());
    }
    report("NATS request, sequential", samples, started.elapsed());

    let http = reqwest::Client::new();
    let url = format!("{base}/api/predict");
    let mut samples = Vec::with_capacity(requests);
    let started = Instant::now();
    for _ in 0..requests {
        let t = Instant::now();
        let r = http.post(&url).header("Content-Type", "image/png").body(png.clone()).send().await?;
        anyhow::ensure!(r.status() == 200, "status {}", r.status());
        r.bytes().await?;
        samples.push(t.elapsed());
    }
    report("POST /api/predict, sequential", samples, started.elapsed());

    let started = Instant::now();
    let per_worker = requests / concurrency;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, url, png) = (http.clone(), url.clone(), png.clone());
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(per_worker);
                for _ in 0..per_worker {
                    let t = Instant::now();
                    let r = http.post(&url).header("Content-Type", "image/png").body(png.clone()).send().await?;
                    anyhow::ensure!(r.status() == 200, "status {}", r.status());
                    r.bytes().await?;
                    samples.push(t.elapsed());
                }
                Ok(samples)
            })
        })
        .collect();
    let mut samples = Vec::new();
    for w in workers {
        samples.extend(w.await??);
    }
    report(&format!("POST /api/predict, {concurrency} concurrent"), samples, started.elapsed());

    // Event latency: publish → SSE client.
    let mut stream = http.get(format!("{base}/api/events")).send().await?.bytes_stream();
    let mut text = String::new();
    while !text.contains("event:live") {
        text.push_str(&String::from_utf8_lossy(&stream.next().await.ok_or_else(|| anyhow::anyhow!("ended"))??));
    }
    let events = 200;
    let mut samples = Vec::with_capacity(events);
    let started = Instant::now();
    for i in 0..events {
        let marker = format!("bench-{i}");
        let event = DatasetReady {
            event_id: EventId::new(),
            dataset_id: DatasetId::from(marker.as_str()),
            location: String::new(),
            files: Vec::new(),
            train_count: 0,
            test_count: 0,
            source: String::new(),
            reused: false,
            request_id: None,
            created_at: chrono::Utc::now(),
        };
        text.clear();
        let t = Instant::now();
        bus.publish(&event).await?;
        while !text.contains(&format!("\"{marker}\"")) {
            text.push_str(&String::from_utf8_lossy(&stream.next().await.ok_or_else(|| anyhow::anyhow!("ended"))??));
        }
        samples.push(t.elapsed());
    }
    report("event: publish → SSE client", samples, started.elapsed());

    token.cancel();
    server.wait().await?;
    Ok(())
}
