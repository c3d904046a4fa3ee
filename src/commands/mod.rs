//! The commands that talk to a running pipeline, one file per subcommand
//! (`up` is [`crate::up`], `backup`/`restore` are [`crate::backup`]); this file
//! dispatches and holds what they share (connecting, listening, printing).

mod download;
mod events;
mod models;
mod predict;
mod train;

pub use events::describe;
use std::path::Path;
use std::time::Duration;
pub use train::TrainArgs;

use anyhow::anyhow;
use mnistflow_nats::{Bus, NatsConfig};
use mnistflow_store::Store;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::{CliError, Command, Exit};
use download::download;
use events::events;
use models::models;
use predict::predict;
use train::train;

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
