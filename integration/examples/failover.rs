//! The failover figures of the README ("NATS cluster"): a three-server JetStream
//! cluster on loopback, the pipeline in this process (a quick real model, an
//! inference instance and the web tier, both on server 2), clients predicting
//! through the web tier at a steady rate; each round kills (SIGKILL) the server
//! the two stages are on, measures, restarts it and waits until every stream's
//! replicas are current again. Run through `scripts/bench-failover`.
//!
//! Per round: predictions sent and failed, the longest prediction and p99 in
//! the 5 s after the kill, how long until both stages were connected to another
//! server (polled every 10 ms on `/connz`), how long until the next prediction
//! succeeded, and how long the killed server took to catch up after its restart.
//! Then one kill of the `MNIST_TRAIN` stream's leader: how long until another
//! server leads it.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Pipeline, test_digits};
use mnistflow_integration::{NatsCluster, mnist_dir};
use mnistflow_nats::streams;

#[derive(Debug, Clone)]
struct Sample {
    started: Instant,
    took: Duration,
    ok: bool,
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn wait<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> anyhow::Result<()> {
    let rounds = arg("--rounds", 5);
    let clients = arg("--clients", 4) as usize;
    let interval = Duration::from_millis(arg("--interval-ms", 20));
    let timeout = Duration::from_millis(arg("--timeout-ms", 5000));
    let mut cluster = NatsCluster::start();
    let stack = Pipeline::new(&cluster.urls_from(0), &[("NATS_STREAM_REPLICAS", "3")]).await;
    let meta = mnistflow_trainer::publish_quick_model(&stack.store, &mnist_dir()).await?;
    stack.store.promote(&meta.version).await?;
    let pinned = 1;
    let pin = cluster.urls_from(pinned);
    let on_pinned = [("NATS_URL", pin.as_str()), ("NATS_RETAIN_SERVERS_ORDER", "true")];
    let _inference = stack.start_inference_with("inference-bench", &on_pinned).await;
    let timeout_ms = timeout.as_millis().to_string();
    let mut web_env = on_pinned.to_vec();
    web_env.push(("WEB_PREDICT_TIMEOUT_MS", &timeout_ms));
    let (web, _web) = stack.start_web_with(&web_env).await;
    stack
        .wait_event::<mnistflow_nats::InferenceLoaded>(Duration::from_secs(60), |l| {
            l.ok && l.version.as_ref() == Some(&meta.version)
        })
        .await;

    let http = reqwest::Client::builder().timeout(timeout * 2).build()?;
    let digits = Arc::new(test_digits(clients));
    let samples = Arc::new(std::sync::Mutex::new(Vec::<Sample>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for worker in 0..clients {
        let (http, digits, samples, stop) = (http.clone(), digits.clone(), samples.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let r = http
                    .post(format!("http://{web}/api/predict"))
                    .header("content-type", "image/png")
                    .body(digits[worker].0.clone())
                    .send()
                    .await;
                let ok = match r {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                samples.lock().unwrap_or_else(|e| e.into_inner()).push(Sample { started, took: started.elapsed(), ok });
                tokio::time::sleep(interval).await;
            }
        }));
    }

    println!(
        "| round | killed | predictions | failed | longest ms | p99 ms (5 s after) | stages on another server ms | next success ms | caught up after restart s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut on = pinned;
    for round in 1..=rounds {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let from = samples.lock().unwrap_or_else(|e| e.into_inner()).len();
        let killed = on;
        cluster.kill(killed);
        let killed_at = Instant::now();
        let others: Vec<usize> = (0..3).filter(|&i| i != killed).collect();
        let moved_to = wait("inference and web on another server", Duration::from_secs(30), || {
            others.iter().copied().find(|&i| {
                let names = cluster.client_names(i).unwrap_or_default();
                names.iter().any(|n| n == "mnistflow-inference") && names.iter().any(|n| n == "mnistflow-web")
            })
        })
        .await?;
        let reconnected = killed_at.elapsed();
        tokio::time::sleep(Duration::from_secs(5).saturating_sub(killed_at.elapsed())).await;
        let window: Vec<Sample> = samples.lock().unwrap_or_else(|e| e.into_inner())[from..].to_vec();
        let failed = window.iter().filter(|s| !s.ok).count();
        let longest = window.iter().map(|s| s.took).max().unwrap_or_default();
        let mut after: Vec<Duration> = window.iter().filter(|s| s.started >= killed_at).map(|s| s.took).collect();
        after.sort();
        let p99 = after.get(after.len().saturating_sub(1) * 99 / 100).copied().unwrap_or_default();
        let next_ok = window
            .iter()
            .filter(|s| s.started >= killed_at && s.ok)
            .map(|s| s.started + s.took - killed_at)
            .min()
            .unwrap_or_default();
        let restarted_at = Instant::now();
        cluster.restart(killed);
        cluster.wait_formed(Duration::from_secs(60));
        for stream in [streams::EVENTS, streams::TRAIN, streams::COMMANDS] {
            let name = stack.bus.subjects().stream_name(stream);
            wait(&format!("{name} current on three servers"), Duration::from_secs(60), || {
                cluster
                    .stream_replicas(&name)
                    .ok()
                    .filter(|(n, f)| *n == 3 && f.len() == 2 && f.iter().all(|(_, c)| *c))
            })
            .await?;
        }
        println!(
            "| {round} | {} | {} | {failed} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} |",
            cluster.name(killed),
            window.len(),
            ms(longest),
            ms(p99),
            ms(reconnected),
            ms(next_ok),
            restarted_at.elapsed().as_secs_f64()
        );
        on = moved_to;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await?;
    }

    let train = stack.bus.subjects().stream_name(streams::TRAIN);
    let leader = cluster.stream_leader(&train).map_err(anyhow::Error::msg)?;
    let i = cluster.index_of(&leader).unwrap_or(0);
    cluster.kill(i);
    let killed_at = Instant::now();
    let new = wait("a new MNIST_TRAIN leader", Duration::from_secs(60), || {
        cluster.stream_leader(&train).ok().filter(|l| *l != leader)
    })
    .await?;
    println!(
        "\n{train}: leader {leader} killed; {new} leads after {:.1} s (publishes meanwhile are retried by the bus)",
        killed_at.elapsed().as_secs_f64()
    );
    Ok(())
}
