//! The commands that talk to a running pipeline.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::Args;
use futures::StreamExt;
use mnistflow_nats::async_nats::jetstream::consumer::DeliverPolicy;
use mnistflow_nats::events::Message;
use mnistflow_nats::{
    Bus, DatasetDownload, DatasetFailed, DatasetReady, EventId, InferenceLoaded, ModelPromote, ModelPublished,
    ModelVersion, NatsConfig, PredictClient, PredictReply, TrainFailed, TrainProgress, TrainRequest, subjects,
};
use mnistflow_store::Store;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{CliError, Command, Exit, ModelsAction};

/// `mnistflow train` options; unset values take the trainer's defaults.
#[derive(Args, Debug, Clone, Default)]
pub struct TrainArgs {
    /// A named preset (`default`, `best`).
    #[arg(long)]
    pub preset: Option<String>,
    #[arg(long)]
    pub epochs: Option<i64>,
    #[arg(long)]
    pub batch_size: Option<i64>,
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// adadelta, adam, adamw, sgd, rmsprop.
    #[arg(long)]
    pub optimizer: Option<String>,
    #[arg(long)]
    pub seed: Option<i64>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long)]
    pub device: Option<String>,
    /// Stop training after this many minutes.
    #[arg(long)]
    pub max_minutes: Option<f64>,
    /// Train on at most this many examples per epoch.
    #[arg(long)]
    pub max_train_examples: Option<i64>,
    /// A data set id (default: the latest).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Promote even if worse than the served version (the accuracy floor still applies).
    #[arg(long)]
    pub force: bool,
    /// Minutes to wait for the run to finish.
    #[arg(long, default_value_t = 60.0)]
    pub timeout_minutes: f64,
}

impl TrainArgs {
    fn request(&self) -> TrainRequest {
        TrainRequest {
            event_id: EventId::new(),
            dataset_id: self.dataset.clone().map(Into::into),
            preset: self.preset.clone(),
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            optimizer: self.optimizer.clone(),
            seed: self.seed,
            device: self.device.clone(),
            max_minutes: self.max_minutes,
            max_train_examples: self.max_train_examples,
            force: self.force.then_some(true),
            requested_by: Some("mnistflow-cli".into()),
        }
    }
}

/// NATS settings for a command-line client: the environment, with a short
/// connect timeout unless `NATS_CONNECT_TIMEOUT_SECS` says otherwise.
fn nats_config() -> Result<NatsConfig, CliError> {
    let mut config = NatsConfig::from_env()?.with_client_name("mnistflow-cli");
    if std::env::var_os("NATS_CONNECT_TIMEOUT_SECS").is_none() {
        config.connect_timeout = Duration::from_secs(5);
    }
    Ok(config)
}

async fn connect(shutdown: &CancellationToken) -> Result<Bus, CliError> {
    let bus = Bus::connect(&nats_config()?, shutdown).await?;
    bus.ensure_streams().await?;
    Ok(bus)
}

/// Runs one of the pipeline commands.
///
/// # Errors
/// With the exit status that fits (see [`Exit`]).
pub async fn run(command: Command, json: bool, shutdown: CancellationToken) -> Result<Exit, CliError> {
    match command {
        Command::Up(_) => unreachable!("handled by crate::run"),
        Command::Download { mirrors, no_train, timeout } => {
            let bus = connect(&shutdown).await?;
            download(&bus, mirrors, no_train, Duration::from_secs(timeout), json).await
        }
        Command::Train(args) => {
            let bus = connect(&shutdown).await?;
            train(&bus, &args, json).await
        }
        Command::Predict { files, url, timeout } => {
            predict(&files, url.as_deref(), Duration::from_secs(timeout), json, &shutdown).await
        }
        Command::Models { action } => models(action, json, &shutdown).await,
        Command::Events { follow } => {
            let bus = connect(&shutdown).await?;
            events(&bus, follow, json, &shutdown).await
        }
        Command::Backup { dir: parent, dated, keep } => {
            // Read-only: no streams are created on the installation backed up.
            let bus = Bus::connect(&nats_config()?, &shutdown).await?;
            let store = Store::from_lookup(|k| std::env::var(k).ok())?;
            let dir = if dated { crate::backup::dated_dir(&parent, chrono::Utc::now()) } else { parent.clone() };
            let summary =
                crate::backup::backup(&bus, &store, &dir).await.map_err(|e| CliError::new(Exit::Failed, e))?;
            report_backup("Backed up", &summary, &dir, json);
            if let Some(keep) = keep {
                crate::backup::prune(&parent, usize::from(keep)).await.map_err(|e| CliError::new(Exit::Failed, e))?;
            }
            Ok(Exit::Ok)
        }
        Command::Restore { dir, store_only } => {
            let store = Store::from_lookup(|k| std::env::var(k).ok())?;
            let summary = if store_only {
                crate::backup::restore_store(&store, &dir).await
            } else {
                let bus = Bus::connect(&nats_config()?, &shutdown).await?;
                crate::backup::restore(&bus, &store, &dir).await
            }
            .map_err(|e| CliError::new(Exit::Failed, e))?;
            report_backup("Restored", &summary, &dir, json);
            Ok(Exit::Ok)
        }
    }
}

fn report_backup(done: &str, summary: &crate::backup::Summary, dir: &Path, json: bool) {
    if json {
        print_json(summary);
        return;
    }
    let bytes: u64 = summary.objects.iter().map(|o| o.size).sum();
    let streams: Vec<String> = summary.streams.iter().map(|(name, n)| format!("{name} {n}")).collect();
    let streams = if streams.is_empty() { "none".to_owned() } else { streams.join(", ") };
    outln!(
        "{done} {} objects ({:.1} MB) and the streams' messages ({streams}) {} {}.",
        summary.objects.len(),
        bytes as f64 / 1e6,
        if done == "Restored" { "from" } else { "into" },
        dir.display()
    );
}

/// Subscribes to the given event subjects (core NATS, live) before a command is
/// published, so its answer cannot be missed.
async fn listen(bus: &Bus, suffixes: &[&str]) -> Result<mnistflow_nats::async_nats::Subscriber, CliError> {
    let client = bus.client();
    let subscriber = if suffixes.len() == 1 {
        client.subscribe(bus.subjects().full(suffixes[0])).await
    } else {
        client.subscribe(bus.subjects().all()).await
    }
    .map_err(|e| CliError::new(Exit::Unavailable, anyhow!("subscribing: {e}")))?;
    client.flush().await.map_err(|e| CliError::new(Exit::Unavailable, anyhow!("flushing: {e}")))?;
    Ok(subscriber)
}

fn decode<M: DeserializeOwned>(payload: &[u8]) -> Option<M> {
    serde_json::from_slice(payload).ok()
}

fn print_json<T: serde::Serialize>(value: &T) {
    outln!("{}", serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")));
}

async fn download(
    bus: &Bus,
    mirrors: Vec<String>,
    no_train: bool,
    timeout: Duration,
    json: bool,
) -> Result<Exit, CliError> {
    let mut sub = listen(bus, &[subjects::DATASET_READY, subjects::DATASET_FAILED]).await?;
    let command = DatasetDownload {
        mirrors: (!mirrors.is_empty()).then_some(mirrors),
        auto_train: no_train.then_some(false),
        requested_by: Some("mnistflow-cli".into()),
        ..Default::default()
    };
    bus.publish(&command).await?;
    if !json {
        eprintln!("Download requested ({}); waiting for the downloader...", command.event_id);
    }
    let answer = tokio::time::timeout(timeout, async {
        while let Some(msg) = sub.next().await {
            let suffix = bus.subjects().suffix(&msg.subject).unwrap_or_default();
            if suffix == DatasetReady::SUBJECT
                && let Some(ready) = decode::<DatasetReady>(&msg.payload)
                && ready.request_id == Some(command.event_id)
            {
                return Ok(ready);
            }
            if suffix == DatasetFailed::SUBJECT
                && let Some(failed) = decode::<DatasetFailed>(&msg.payload)
                && failed.request_id == Some(command.event_id)
            {
                return Err(failed);
            }
        }
        Err(DatasetFailed {
            event_id: EventId::new(),
            request_id: None,
            reason: "subscription closed".into(),
            mirrors_tried: vec![],
            will_retry: false,
            at: chrono::Utc::now(),
        })
    })
    .await
    .map_err(|_| {
        CliError::new(Exit::Unavailable, anyhow!("no answer from a downloader within {timeout:?} (is one running?)"))
    })?;
    match answer {
        Ok(ready) => {
            if json {
                print_json(&ready);
            } else {
                outln!(
                    "Data set {} ready{} at {} ({} training + {} test images, from {}).",
                    ready.dataset_id,
                    if ready.reused { " (already stored)" } else { "" },
                    ready.location,
                    ready.train_count,
                    ready.test_count,
                    ready.source
                );
            }
            Ok(Exit::Ok)
        }
        Err(failed) => {
            if json {
                print_json(&failed);
            } else {
                eprintln!("Download failed: {} (mirrors tried: {})", failed.reason, failed.mirrors_tried.join(", "));
            }
            Ok(Exit::Failed)
        }
    }
}

async fn train(bus: &Bus, args: &TrainArgs, json: bool) -> Result<Exit, CliError> {
    let mut sub = listen(bus, &[subjects::TRAIN_PROGRESS, subjects::MODEL_PUBLISHED, subjects::TRAIN_FAILED]).await?;
    let request = args.request();
    bus.publish(&request).await?;
    let bar = (!json && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let bar = indicatif::ProgressBar::new(1);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} epoch {prefix} [{bar:30}] {pos}/{len} steps {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    if !json {
        eprintln!("Training requested ({}); waiting for a trainer...", request.event_id);
    }
    let timeout = Duration::from_secs_f64(args.timeout_minutes.max(0.0) * 60.0);
    let outcome = tokio::time::timeout(timeout, async {
        while let Some(msg) = sub.next().await {
            match bus.subjects().suffix(&msg.subject).unwrap_or_default() {
                s if s == TrainProgress::SUBJECT => {
                    let Some(p) = decode::<TrainProgress>(&msg.payload) else { continue };
                    if p.request_id != Some(request.event_id) {
                        continue;
                    }
                    if json {
                        print_json(&p);
                    } else if let Some(bar) = &bar {
                        bar.set_length(p.steps.max(1));
                        bar.set_position(p.step);
                        bar.set_prefix(format!("{}/{}", p.epoch, p.epochs));
                        bar.set_message(format!("loss {:.4}, {:.0} img/s, {}", p.loss, p.examples_per_sec, p.phase));
                    } else {
                        eprintln!(
                            "epoch {}/{} step {}/{} loss {:.4} {:.0} img/s {}",
                            p.epoch, p.epochs, p.step, p.steps, p.loss, p.examples_per_sec, p.phase
                        );
                    }
                }
                s if s == ModelPublished::SUBJECT => {
                    if let Some(p) = decode::<ModelPublished>(&msg.payload)
                        && p.request_id == Some(request.event_id)
                    {
                        return Ok(p);
                    }
                }
                s if s == TrainFailed::SUBJECT => {
                    if let Some(f) = decode::<TrainFailed>(&msg.payload)
                        && f.request_id == Some(request.event_id)
                        && !f.will_retry
                    {
                        return Err(f);
                    }
                }
                _ => {}
            }
        }
        Err(TrainFailed {
            event_id: EventId::new(),
            run_id: None,
            request_id: Some(request.event_id),
            reason: "subscription closed".into(),
            will_retry: false,
            at: chrono::Utc::now(),
        })
    })
    .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    match outcome {
        Err(_) => Err(CliError::new(
            Exit::Unavailable,
            anyhow!("the run did not finish within {timeout:?} (is a trainer running?)"),
        )),
        Ok(Ok(published)) => {
            if json {
                print_json(&published);
            } else {
                outln!(
                    "Published {}: test accuracy {:.2} %, loss {:.4}; {} ({}).",
                    published.version,
                    published.metrics.accuracy * 100.0,
                    published.metrics.loss,
                    if published.promoted { "now served" } else { "not promoted" },
                    published.promotion
                );
            }
            Ok(Exit::Ok)
        }
        Ok(Err(failed)) => {
            if json {
                print_json(&failed);
            } else {
                eprintln!("Training failed: {}", failed.reason);
            }
            Ok(Exit::Failed)
        }
    }
}

async fn predict(
    files: &[std::path::PathBuf],
    url: Option<&str>,
    timeout: Duration,
    json: bool,
    shutdown: &CancellationToken,
) -> Result<Exit, CliError> {
    let bus = match url {
        Some(_) => None,
        None => Some(Bus::connect(&nats_config()?, shutdown).await?),
    };
    let http = reqwest::Client::builder().timeout(timeout).build().map_err(|e| CliError::new(Exit::Usage, e))?;
    let mut exit = Exit::Ok;
    for file in files {
        let bytes = std::fs::read(file).map_err(|e| CliError::new(Exit::Usage, anyhow!("{}: {e}", file.display())))?;
        // One trace per prediction when OTEL_EXPORTER_OTLP_ENDPOINT is set.
        let span = tracing::debug_span!("predict", file = %file.display(), otel.kind = "client");
        let reply = match (&bus, url) {
            (Some(bus), _) => predict_nats(bus, bytes, timeout).instrument(span).await?,
            (None, Some(url)) => predict_http(&http, url, file, bytes).instrument(span).await?,
            (None, None) => unreachable!(),
        };
        match &reply {
            PredictReply::Ok(p) => {
                if json {
                    print_json(
                        &serde_json::json!({"file": file, "digit": p.digit, "probabilities": p.probabilities, "model_version": p.model_version}),
                    );
                } else {
                    let confidence = p.probabilities.get(usize::from(p.digit)).copied().unwrap_or_default();
                    outln!("{}: {} ({:.1} %, model {})", file.display(), p.digit, confidence * 100.0, p.model_version);
                }
            }
            PredictReply::Err(e) => {
                exit = Exit::Failed;
                if json {
                    print_json(&serde_json::json!({"file": file, "error": e.error}));
                } else {
                    eprintln!("{}: error {}: {}", file.display(), e.error.code, e.error.message);
                }
            }
        }
    }
    Ok(exit)
}

async fn predict_nats(bus: &Bus, bytes: Vec<u8>, timeout: Duration) -> Result<PredictReply, CliError> {
    use mnistflow_nats::PredictRequestError;
    match PredictClient::new(bus.clone()).predict(bytes.into(), timeout).await {
        Ok(reply) => Ok(reply),
        Err(PredictRequestError::Timeout(_)) => {
            Err(CliError::new(Exit::Unavailable, anyhow!("no prediction within {timeout:?}")))
        }
        Err(e @ PredictRequestError::BadReply(_)) => Err(CliError::new(Exit::Failed, e)),
        Err(e) => Err(CliError::new(Exit::Unavailable, e)),
    }
}

async fn predict_http(
    http: &reqwest::Client,
    url: &str,
    file: &Path,
    bytes: Vec<u8>,
) -> Result<PredictReply, CliError> {
    let base = url.trim_end_matches('/');
    let endpoint = if base.ends_with("/predict") {
        base.to_owned()
    } else {
        // The web tier serves /api/predict, the inference service /v1/predict; ask which one this is.
        let web = http.get(format!("{base}/api/config")).send().await.map(|r| r.status().is_success()).unwrap_or(false);
        format!("{base}{}", if web { "/api/predict" } else { "/v1/predict" })
    };
    let mime = match file.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("bmp") => "image/bmp",
        Some("webp") => "image/webp",
        Some("tif" | "tiff") => "image/tiff",
        _ => "application/octet-stream",
    };
    let mut request = http.post(&endpoint).header("content-type", mime);
    if let Some(traceparent) = mnistflow_nats::telemetry::traceparent(&tracing::Span::current()) {
        request = request.header("traceparent", traceparent);
    }
    let response = request
        .body(bytes)
        .send()
        .await
        .with_context(|| format!("POST {endpoint}"))
        .map_err(|e| CliError::new(Exit::Unavailable, e))?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| CliError::new(Exit::Unavailable, e))?;
    serde_json::from_slice(&body).map_err(|e| {
        CliError::new(
            Exit::Failed,
            anyhow!("{endpoint} answered {status} with an unexpected body ({e}): {}", String::from_utf8_lossy(&body)),
        )
    })
}

async fn models(action: ModelsAction, json: bool, shutdown: &CancellationToken) -> Result<Exit, CliError> {
    match action {
        ModelsAction::List => {
            let store = Store::from_lookup(|k| std::env::var(k).ok())?;
            let current = store.current().await?;
            let versions = store.list_models().await?;
            if json {
                print_json(&serde_json::json!({"current": current, "versions": versions}));
            } else if versions.is_empty() {
                outln!("No model versions in {}.", store.url());
            } else {
                for m in &versions {
                    let mark = if Some(&m.version) == current.as_ref() { "*" } else { " " };
                    outln!(
                        "{mark} {}  accuracy {:.2} %  loss {:.4}  dataset {}  {}",
                        m.version,
                        m.metrics.accuracy * 100.0,
                        m.metrics.loss,
                        m.dataset_id.as_ref().map_or("-", |d| d.as_str()),
                        m.created_at.format("%Y-%m-%d %H:%M:%S UTC")
                    );
                }
            }
            Ok(Exit::Ok)
        }
        ModelsAction::Show { version } => {
            let store = Store::from_lookup(|k| std::env::var(k).ok())?;
            let version = match version {
                Some(v) => ModelVersion(v),
                None => store
                    .current()
                    .await?
                    .ok_or_else(|| CliError::new(Exit::Failed, anyhow!("no version is current")))?,
            };
            let meta = store
                .model_metadata(&version)
                .await?
                .ok_or_else(|| CliError::new(Exit::Failed, anyhow!("no version {version} in {}", store.url())))?;
            if json {
                print_json(&meta);
            } else {
                outln!("{}", serde_json::to_string_pretty(&meta).unwrap_or_default());
            }
            Ok(Exit::Ok)
        }
        ModelsAction::Promote { version, timeout } => {
            if !ModelVersion::is_valid(&version) {
                return Err(CliError::new(Exit::Usage, anyhow!("{version:?} is not a valid version name")));
            }
            let bus = connect(shutdown).await?;
            let mut sub = listen(&bus, &[subjects::INFERENCE_LOADED]).await?;
            let command = ModelPromote {
                event_id: EventId::new(),
                version: ModelVersion(version.clone()),
                requested_by: Some("mnistflow-cli".into()),
            };
            bus.publish(&command).await?;
            if !json {
                eprintln!("Promotion of {version} requested; waiting for an inference instance to load it...");
            }
            let wait = Duration::from_secs(timeout);
            let loaded = tokio::time::timeout(wait, async {
                while let Some(msg) = sub.next().await {
                    let Some(l) = decode::<InferenceLoaded>(&msg.payload) else { continue };
                    let about_it = l.version.as_ref().map(|v| v.as_str()) == Some(version.as_str()) && l.ok
                        || l.refused.as_ref().map(|v| v.as_str()) == Some(version.as_str());
                    if about_it {
                        return Some(l);
                    }
                }
                None
            })
            .await
            .ok()
            .flatten()
            .ok_or_else(|| {
                CliError::new(Exit::Unavailable, anyhow!("no inference instance confirmed {version} within {wait:?}"))
            })?;
            if json {
                print_json(&loaded);
            } else if loaded.ok {
                outln!("{} now serves {version}.", loaded.instance);
            } else {
                eprintln!(
                    "{} refused {version}: {}",
                    loaded.instance,
                    loaded.error.as_deref().unwrap_or("unknown reason")
                );
            }
            Ok(if loaded.ok { Exit::Ok } else { Exit::Failed })
        }
    }
}

/// One line describing an event for people.
pub fn describe(suffix: &str, payload: &[u8]) -> String {
    let text = || String::from_utf8_lossy(payload).into_owned();
    match suffix {
        subjects::DATASET_READY => decode::<DatasetReady>(payload).map_or_else(text, |e| {
            format!(
                "dataset {} ready ({} train / {} test, from {}{})",
                e.dataset_id,
                e.train_count,
                e.test_count,
                e.source,
                if e.reused { ", reused" } else { "" }
            )
        }),
        subjects::DATASET_FAILED => {
            decode::<DatasetFailed>(payload).map_or_else(text, |e| format!("download failed: {}", e.reason))
        }
        subjects::TRAIN_PROGRESS => decode::<TrainProgress>(payload).map_or_else(text, |e| {
            format!(
                "run {} epoch {}/{} step {}/{} loss {:.4} ({:.0} img/s, {})",
                e.run_id, e.epoch, e.epochs, e.step, e.steps, e.loss, e.examples_per_sec, e.phase
            )
        }),
        subjects::TRAIN_FAILED => {
            decode::<TrainFailed>(payload).map_or_else(text, |e| format!("training failed: {}", e.reason))
        }
        subjects::MODEL_PUBLISHED => decode::<ModelPublished>(payload).map_or_else(text, |e| {
            format!(
                "model {} published: accuracy {:.2} % ({}{})",
                e.version,
                e.metrics.accuracy * 100.0,
                if e.promoted { "promoted" } else { "not promoted" },
                if e.promotion.is_empty() { String::new() } else { format!(": {}", e.promotion) }
            )
        }),
        subjects::INFERENCE_LOADED => decode::<InferenceLoaded>(payload).map_or_else(text, |e| {
            if e.ok {
                format!(
                    "{} serves {} (loaded in {:.0} ms)",
                    e.instance,
                    e.version.map(|v| v.0).unwrap_or_default(),
                    e.load_ms
                )
            } else {
                format!(
                    "{} refused {}: {}",
                    e.instance,
                    e.refused.map(|v| v.0).unwrap_or_default(),
                    e.error.unwrap_or_default()
                )
            }
        }),
        _ => text(),
    }
}

async fn events(bus: &Bus, follow: bool, json: bool, shutdown: &CancellationToken) -> Result<Exit, CliError> {
    let mut replay = bus.replay_events(DeliverPolicy::All).await?;
    if !follow && replay.last_at_start == 0 {
        return Ok(Exit::Ok);
    }
    loop {
        let next = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(Exit::Ok),
            next = replay.next() => next,
        };
        let Some(event) = next else { return Ok(Exit::Ok) };
        let event = event?;
        if json {
            let payload: serde_json::Value = serde_json::from_slice(&event.payload).unwrap_or(serde_json::Value::Null);
            print_json(&serde_json::json!({"subject": event.suffix, "sequence": event.sequence, "payload": payload}));
        } else {
            outln!("{:>6} {:<18} {}", event.sequence, event.suffix, describe(&event.suffix, &event.payload));
        }
        if !follow && event.sequence >= replay.last_at_start {
            return Ok(Exit::Ok);
        }
    }
}
