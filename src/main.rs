//! `mnistflow`: the umbrella CLI. For now `up` runs the foundation (a managed
//! nats-server, the streams, the store) and `events` follows the pipeline; the
//! stage commands arrive with their stages.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use mnistflow_nats::{Bus, NatsConfig, runtime};
use mnistflow_store::Store;
use tracing::info;

#[derive(Parser, Debug)]
#[command(name = "mnistflow", version, about = "Train and serve an MNIST classifier, event-driven, on one machine or Kubernetes.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the pipeline on this machine: a managed nats-server (unless NATS_URL is
    /// set), the JetStream streams and the local store. Ctrl-C stops everything.
    Up {
        /// Where the local store and nats-server data live.
        #[arg(long, env = "MNISTFLOW_HOME", default_value = ".mnistflow")]
        home: PathBuf,
        /// Port of the managed nats-server.
        #[arg(long, default_value_t = 4222)]
        nats_port: u16,
    },
    /// Print pipeline events as they happen (JSON lines).
    Events,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::init_tracing();
    let cli = Cli::parse();
    let shutdown = runtime::shutdown_token();
    match cli.command {
        Command::Up { home, nats_port } => up(home, nats_port, shutdown).await,
        Command::Events => {
            let config = NatsConfig::from_env()?;
            let bus = Bus::connect(&config, &shutdown).await?;
            let mut sub = bus.client().subscribe(bus.subjects().all()).await?;
            loop {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return Ok(()),
                    msg = futures_next(&mut sub) => match msg {
                        Some(m) => println!("{} {}", m.subject, String::from_utf8_lossy(&m.payload)),
                        None => return Ok(()),
                    }
                }
            }
        }
    }
}

async fn futures_next(sub: &mut mnistflow_nats::async_nats::Subscriber) -> Option<mnistflow_nats::async_nats::Message> {
    use futures::StreamExt;
    sub.next().await
}

async fn up(home: PathBuf, nats_port: u16, shutdown: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
    let store = Store::local(&home.join("store"))?;
    let mut managed = None;
    let config = if std::env::var_os("NATS_URL").is_some() {
        NatsConfig::from_env()?
    } else {
        let bin = std::env::var_os("NATS_SERVER_BIN").map_or_else(|| PathBuf::from("nats-server"), PathBuf::from);
        let child = tokio::process::Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", &nats_port.to_string(), "-js", "-sd"])
            .arg(home.join("nats"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} (run scripts/setup, or set NATS_URL)", bin.display()))?;
        managed = Some(child);
        NatsConfig::for_url(&format!("nats://127.0.0.1:{nats_port}"))?
    };
    let bus = Bus::connect(&config, &shutdown).await?;
    bus.ensure_streams().await?;
    info!(store = store.url(), nats = ?config.servers, "Pipeline foundation is up; stages attach as they land. Ctrl-C to stop.");
    shutdown.cancelled().await;
    if let Some(mut child) = managed {
        child.kill().await.ok();
        tokio::time::timeout(Duration::from_secs(5), child.wait()).await.ok();
    }
    if shutdown.is_cancelled() {
        info!("Stopped.");
        return Ok(());
    }
    bail!("unreachable")
}
