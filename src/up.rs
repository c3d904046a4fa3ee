//! `mnistflow up`: the whole pipeline in one process on one machine.
//!
//! Starts (or uses, with `NATS_URL`) a nats-server, connects once, creates the
//! streams, runs the downloader (service), the trainer (worker), inference and web
//! on that one connection and one local store directory, then kicks off what is missing: a download when no data set
//! is stored, a training run when no model is current. A second `up` finds both
//! and starts serving at once. Ctrl-C cancels one token that every stage watches;
//! the managed nats-server, in a process group of its own, does not see it and is
//! stopped once the stages have.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::Args;
use mnistflow_nats::async_nats::jetstream::consumer::DeliverPolicy;
use mnistflow_nats::{Bus, DatasetDownload, NatsConfig, TrainRequest};
use mnistflow_store::Store;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{CliError, Exit};

/// `up`'s narration (what starts, each event, the stop), one plain line each. It
/// goes to stderr beside the log lines, which `up` writes as plain text too; with
/// `LOG_FORMAT=json` the log lines are JSON and the narration goes to stdout
/// instead, so that stderr stays one JSON object a line.
fn narrate_line(line: std::fmt::Arguments<'_>) {
    if std::env::var("LOG_FORMAT").is_ok_and(|f| f.trim() == "json") {
        println!("{line}");
    } else {
        eprintln!("{line}");
    }
}

macro_rules! narrate {
    ($($arg:tt)*) => { narrate_line(format_args!($($arg)*)) };
}

/// `mnistflow up` options. Stage settings (`TRAINER_EPOCHS`, `INFERENCE_MAX_BATCH`,
/// `DOWNLOADER_MIRRORS`, ...) are read from the environment as usual.
#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    /// Where the store and the managed nats-server's data live.
    #[arg(long, env = "MNISTFLOW_HOME", default_value = ".mnistflow")]
    pub home: PathBuf,
    /// Port of the managed nats-server (ignored when NATS_URL is set).
    #[arg(long, default_value_t = 4222)]
    pub nats_port: u16,
    /// Port of the page.
    #[arg(long, env = "WEB_PORT", default_value_t = 8080)]
    pub web_port: u16,
    /// Port of the inference HTTP API.
    #[arg(long, env = "INFERENCE_PORT", default_value_t = 8081)]
    pub inference_port: u16,
    /// Address every HTTP port binds to.
    #[arg(long, default_value = "127.0.0.1")]
    pub address: String,
    /// Do not download or train on start (serve what the store has).
    #[arg(long)]
    pub no_bootstrap: bool,
}

/// A nats-server child process owned by `up`, killed on drop.
struct ManagedNats {
    child: tokio::process::Child,
}

impl ManagedNats {
    fn start(home: &std::path::Path, port: u16) -> anyhow::Result<Self> {
        let bin = std::env::var_os("NATS_SERVER_BIN")
            .map(PathBuf::from)
            .filter(|p| p.exists())
            .or_else(|| {
                let tools = PathBuf::from(".tools/bin/nats-server");
                tools.exists().then_some(tools)
            })
            .unwrap_or_else(|| PathBuf::from("nats-server"));
        let data = home.join("nats");
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let child = tokio::process::Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: Ctrl-C in the terminal reaches `up` only, which
            // stops the stages first and the server last (no stage sees it vanish).
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} (run scripts/setup, or set NATS_URL)", bin.display()))?;
        Ok(Self { child })
    }

    /// Waits (10 s at most) until the server accepts connections, so that the
    /// first connect succeeds instead of logging a retry.
    async fn wait_ready(&mut self, port: u16) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("the nats-server on port {port} exited at start ({status}); is the port taken?");
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("the nats-server did not accept connections on port {port} within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) {
        // SIGTERM would be nicer for JetStream; SIGKILL is safe (it fsyncs its store)
        // and kill_on_drop covers panics.
        self.child.kill().await.ok();
        tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await.ok();
    }
}

/// Runs the pipeline until Ctrl-C.
///
/// # Errors
/// A stage's configuration is invalid or NATS cannot be reached.
pub async fn up(args: UpArgs, shutdown: CancellationToken) -> Result<Exit, CliError> {
    std::fs::create_dir_all(&args.home).with_context(|| format!("creating {}", args.home.display()))?;
    let store_dir = args.home.join("store");
    let store = Store::local(&store_dir)?;

    let external = std::env::var("NATS_URL").ok().filter(|v| !v.trim().is_empty());
    let (nats_url, managed) = match external {
        Some(url) => (url, None),
        None => {
            let mut managed = ManagedNats::start(&args.home, args.nats_port)?;
            managed.wait_ready(args.nats_port).await?;
            (format!("nats://127.0.0.1:{}", args.nats_port), Some(managed))
        }
    };
    let mut nats =
        NatsConfig::from_lookup(|k| if k == "NATS_URL" { Some(nats_url.clone()) } else { std::env::var(k).ok() })?
            .with_client_name("mnistflow-up");
    nats.connect_timeout = nats.connect_timeout.min(Duration::from_secs(20));
    let bus = Bus::connect(&nats, &shutdown).await?;
    bus.ensure_streams().await?;

    // Every stage reads its configuration through this lookup: the process
    // environment, with the settings that make one process work overriding it.
    let store_url = store.url().to_owned();
    let web_addr = args.address.clone();
    // The model-signing key, generated once (0600) beside the store: the
    // trainer and the promoter sign with it, inference trusts its public half,
    // as in the cluster (README, "Signed model versions").
    let key_path = args.home.join("keys/model-signing.pem");
    mnistflow_store::SigningKey::read_or_generate(&key_path)
        .with_context(|| format!("the local model-signing key {}", key_path.display()))?;
    let public_path = mnistflow_store::signing::public_key_path(&key_path);
    let overrides: Vec<(&'static str, String)> = vec![
        ("NATS_URL", nats_url.clone()),
        ("STORE_URL", store_url),
        ("DOWNLOADER_MODE", "service".into()),
        ("TRAINER_MODE", "worker".into()),
        ("WEB_ADDRESS", web_addr.clone()),
        ("WEB_PORT", args.web_port.to_string()),
        ("INFERENCE_ADDRESS", web_addr.clone()),
        ("INFERENCE_PORT", args.inference_port.to_string()),
    ];
    let defaults: Vec<(&'static str, String)> = vec![
        // Picked free (and logged by each stage), so that two pipelines run side by side.
        ("DOWNLOADER_METRICS_ADDR", format!("{web_addr}:0")),
        ("TRAINER_METRICS_ADDR", format!("{web_addr}:0")),
        ("WEB_METRICS_ADDR", format!("{web_addr}:0")),
        ("INFERENCE_INSTANCE", "inference-local".into()),
        ("FEEDBACK_ADDR", format!("{web_addr}:0")),
        ("TRAINER_SIGNING_KEY", key_path.display().to_string()),
        ("INFERENCE_SIGNING_KEY", key_path.display().to_string()),
        ("INFERENCE_TRUSTED_KEYS", public_path.display().to_string()),
    ];
    let lookup = move |key: &str| -> Option<String> {
        overrides
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var(key).ok())
            .or_else(|| defaults.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()))
    };

    let downloader = mnistflow_downloader::Config::from_lookup(&lookup)?;
    let trainer = mnistflow_trainer::Config::from_lookup(&lookup)?;
    let inference = mnistflow_inference::Config::from_lookup(&lookup)?;
    let web = mnistflow_web::Config::from_lookup(&lookup)?;
    let feedback = mnistflow_feedback::Config::from_lookup(&lookup)?;

    // One connection and one store for all five stages.
    let mut stages = JoinSet::new();
    let (b, st, token) = (bus.clone(), store.clone(), shutdown.clone());
    stages.spawn(async move { ("downloader", mnistflow_downloader::run(downloader, b, st, token).await) });
    let (b, st, token) = (bus.clone(), store.clone(), shutdown.clone());
    stages.spawn(async move { ("trainer", mnistflow_trainer::run(trainer, b, st, token).await) });
    let (b, st, token) = (bus.clone(), store.clone(), shutdown.clone());
    stages.spawn(async move { ("inference", mnistflow_inference::run(inference, b, st, token).await) });
    let (b, token) = (bus.clone(), shutdown.clone());
    stages.spawn(async move { ("web", mnistflow_web::run(web, b, token).await) });
    // The feedback stage: stores what people say about the answers.
    let (b, st, token) = (bus.clone(), store.clone(), shutdown.clone());
    stages.spawn(async move { ("feedback", mnistflow_feedback::run(feedback, b, st, token).await) });

    let page = format!("http://{}:{}/", args.address, args.web_port);
    narrate!(
        "mnistflow is starting: page {page}, inference API http://{}:{}/v1/predict, NATS {nats_url}, store {}.",
        args.address,
        args.inference_port,
        store.url()
    );
    narrate!("Ctrl-C stops everything.");

    if !args.no_bootstrap {
        bootstrap(&bus, &store).await?;
    }

    // Narrate the pipeline until shutdown; a stage that dies takes the others down.
    let mut replay = bus.replay_events(DeliverPolicy::New).await?;
    let mut failed: Option<anyhow::Error> = None;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            done = stages.join_next() => {
                match done {
                    Some(Ok((name, Ok(())))) if shutdown.is_cancelled() => info!(stage = name, "Stage stopped."),
                    Some(Ok((name, Ok(())))) => { failed = Some(anyhow!("stage {name} exited")); }
                    Some(Ok((name, Err(e)))) => { failed = Some(e.context(format!("stage {name} failed"))); }
                    Some(Err(e)) => { failed = Some(anyhow!("a stage panicked: {e}")); }
                    None => break,
                }
                if failed.is_some() { break; }
            }
            event = replay.next() => match event {
                Some(Ok(e)) => narrate!("[{}] {}", e.suffix, crate::commands::describe(&e.suffix, &e.payload)),
                Some(Err(e)) => warn!(error = %e, "Event stream hiccup."),
                None => {}
            },
        }
    }
    if let Some(e) = &failed {
        error!(error = %format!("{e:#}"), "Stopping the pipeline.");
    }
    shutdown.cancel();
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(done) = stages.join_next().await {
            if let Ok((name, Err(e))) = done {
                warn!(stage = name, error = %format!("{e:#}"), "Stage ended with an error during shutdown.");
            }
        }
    })
    .await;
    if drained.is_err() {
        warn!("Some stages did not stop within 30 s; aborting them.");
        stages.abort_all();
    }
    // The stages have stopped: close the one connection cleanly, then the server
    // (which would otherwise vanish under a live connection).
    drop(replay);
    match tokio::time::timeout(Duration::from_secs(5), bus.close()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "Closing the NATS connection failed."),
        Err(_) => warn!("The NATS connection did not close within 5 s."),
    }
    if let Some(nats) = managed {
        nats.stop().await;
    }
    match failed {
        Some(e) => Err(CliError::new(Exit::Failed, e)),
        None => {
            narrate!("Stopped.");
            Ok(Exit::Ok)
        }
    }
}

/// Requests what the store lacks: a download (which auto-trains) when there is no
/// data set, a training run when there is data but no current model.
async fn bootstrap(bus: &Bus, store: &Store) -> Result<(), CliError> {
    let dataset = store.latest_dataset().await?;
    let current = store.current().await?;
    // A previous `up` stopped mid-way leaves its command queued: it will be
    // redelivered, so asking again would only do the work twice.
    let queued = |role: &'static str| async move {
        let name = bus.subjects().stream_name(role);
        match bus.jetstream().get_stream(&name).await {
            Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        }
    };
    if queued(mnistflow_nats::streams::COMMANDS).await + queued(mnistflow_nats::streams::TRAIN).await > 0 {
        narrate!("A download or training request from an earlier run is still queued; it resumes now.");
        return Ok(());
    }
    match (dataset, current) {
        (None, _) => {
            narrate!("No data set in the store yet: requesting a download (training follows).");
            bus.publish(&DatasetDownload { requested_by: Some("mnistflow-up".into()), ..Default::default() }).await?;
        }
        (Some(d), None) => {
            narrate!("Data set {} is stored but no model is served yet: requesting a training run.", d.dataset_id);
            bus.publish(&TrainRequest {
                dataset_id: Some(d.dataset_id),
                requested_by: Some("mnistflow-up".into()),
                ..Default::default()
            })
            .await?;
        }
        (Some(d), Some(v)) => narrate!("Reusing data set {} and model {v}.", d.dataset_id),
    }
    Ok(())
}
