//! Helpers for `scripts/bench-inference` (not a test): publish a model into a
//! store, write a 28×28 MNIST PNG, load `mnist.predict` over NATS, and measure
//! reloads under paced HTTP load.
//!
//! ```text
//! inference_bench publish <store-dir> <model.pt>            # publish + promote, print the version
//! inference_bench png <out.png>                              # MNIST test digit 0
//! inference_bench nats <nats-url> <png> <in-flight> <secs>   # request/reply load
//! inference_bench reload <store-dir> <http-base> <model.pt> <count> <req-per-sec>
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use mnistflow_nats::{ModelVersion, Prediction, subjects};
use mnistflow_store::{ModelMetadata, Store};

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

async fn publish(store: &Store, model: &[u8]) -> anyhow::Result<ModelVersion> {
    let version = ModelVersion::generate();
    store.publish_model(Bytes::copy_from_slice(model), ModelMetadata::new(version.clone())).await?;
    store.promote(&version).await?;
    Ok(version)
}

async fn nats_load(url: &str, png: Vec<u8>, in_flight: usize, secs: u64) -> anyhow::Result<()> {
    let client = mnistflow_nats::async_nats::connect(url).await?;
    let subject = mnistflow_nats::Subjects::default().full(subjects::PREDICT);
    let payload = Bytes::from(png);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let errors = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..in_flight)
        .map(|_| {
            let (client, subject, payload, errors) = (client.clone(), subject.clone(), payload.clone(), errors.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match client.request(subject.clone(), payload.clone()).await {
                        Ok(m) if serde_json::from_slice::<Prediction>(&m.payload).is_ok() => {
                            latencies.push(t.elapsed())
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                latencies
            })
        })
        .collect();
    let started = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    println!(
        "nats: {} ok, {} errors in {elapsed:.1} s = {:.0} req/s; p50 {:.1} ms, p99 {:.1} ms",
        all.len(),
        errors.load(Ordering::Relaxed),
        all.len() as f64 / elapsed,
        percentile(&all, 0.5).as_secs_f64() * 1000.0,
        percentile(&all, 0.99).as_secs_f64() * 1000.0
    );
    Ok(())
}

async fn reload(store: Store, base: &str, model: Vec<u8>, count: usize, rate: u64) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let png = std::fs::read(std::env::temp_dir().join("mnistflow-bench-digit.png")).unwrap_or_else(|_| digit_png());
    let first_seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = format!("{base}/v1/predict");
    let load = (rate > 0).then(|| {
        let (client, first_seen, ok, failed, stop, url) =
            (client.clone(), first_seen.clone(), ok.clone(), failed.clone(), stop.clone(), url.clone());
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            let mut inflight = tokio::task::JoinSet::new();
            while !stop.load(Ordering::Relaxed) {
                ticker.tick().await;
                let (client, first_seen, ok, failed, url, png) =
                    (client.clone(), first_seen.clone(), ok.clone(), failed.clone(), url.clone(), png.clone());
                inflight.spawn(async move {
                    let res = client.post(&url).header("Content-Type", "image/png").body(png).send().await;
                    match res {
                        Ok(r) if r.status().is_success() => match r.json::<Prediction>().await {
                            Ok(p) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                first_seen.lock().unwrap().entry(p.model_version.0).or_insert_with(Instant::now);
                            }
                            Err(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        },
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                while inflight.try_join_next().is_some() {}
            }
            while inflight.join_next().await.is_some() {}
        })
    });
    let mut latencies = Vec::new();
    for _ in 0..count {
        let promoted = Instant::now();
        let version = publish(&store, &model).await?;
        // Without load, ask once in a while; with load, watch the answers.
        let deadline = promoted + Duration::from_secs(30);
        loop {
            if rate == 0 {
                let r = client.get(format!("{base}/readyz")).send().await?.json::<serde_json::Value>().await?;
                if r["model_version"] == version.as_str() {
                    latencies.push(promoted.elapsed());
                    break;
                }
            } else if let Some(t) = first_seen.lock().unwrap().get(version.as_str()) {
                latencies.push(t.duration_since(promoted));
                break;
            }
            if Instant::now() > deadline {
                bail!("{version} not served within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if rate > 0 {
            // Keep the load running between reloads, so the count of failed
            // requests covers ten seconds around ten swaps, not just the swaps.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(load) = load {
        load.await?;
    }
    latencies.sort();
    println!(
        "reload: {count} versions; promote→served p50 {:.0} ms, max {:.0} ms; load {} ok, {} failed",
        percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    Ok(())
}

fn digit_png() -> Vec<u8> {
    let dir = mnistflow_integration::mnist_dir();
    let images = mnistflow_store::idx::parse_gz(&std::fs::read(dir.join("t10k-images-idx3-ubyte.gz")).expect("MNIST"))
        .expect("IDX");
    let img = image::GrayImage::from_raw(28, 28, images.data[..784].to_vec()).expect("28×28");
    let mut out = Vec::new();
    image::DynamicImage::ImageLuma8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("PNG");
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().with_context(|| format!("missing argument {i}; see the source's header"));
    match args.first().map(String::as_str) {
        Some("publish") => {
            let store = Store::open(&arg(1)?)?;
            let model = std::fs::read(arg(2)?)?;
            println!("{}", publish(&store, &model).await?);
        }
        Some("png") => std::fs::write(arg(1)?, digit_png())?,
        Some("nats") => nats_load(&arg(1)?, std::fs::read(arg(2)?)?, arg(3)?.parse()?, arg(4)?.parse()?).await?,
        Some("reload") => {
            reload(Store::open(&arg(1)?)?, &arg(2)?, std::fs::read(arg(3)?)?, arg(4)?.parse()?, arg(5)?.parse()?)
                .await?
        }
        _ => bail!("usage: inference_bench publish|png|nats|reload ... (see the source's header)"),
    }
    Ok(())
}
