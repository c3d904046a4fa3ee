//! `mnistflow`, the umbrella CLI: `up` runs the whole pipeline on one machine;
//! the other commands talk to a running pipeline (local or a cluster through a
//! port-forward) over NATS, and to the store for model listings.
//!
//! Exit codes scripts can rely on (see [`Exit`]): 0 success, 1 the pipeline
//! answered with a failure (training rejected, download failed, prediction
//! refused), 2 bad usage or configuration, 3 NATS unreachable or no answer in time.

/// `println!` for the CLI's output: when the reader has gone (`mnistflow events
/// | head`), stop quietly with exit code 0 instead of panicking on the broken pipe.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            tracing::warn!(error = %e, "Writing to standard output failed.");
        }
    }};
}

pub mod backup;
pub mod commands;
pub mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Failed = 1,
    Usage = 2,
    Unavailable = 3,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// An error with the exit status it maps to.
#[derive(Debug)]
pub struct CliError {
    pub exit: Exit,
    pub error: anyhow::Error,
}

impl CliError {
    pub fn new(exit: Exit, error: impl Into<anyhow::Error>) -> Self {
        Self { exit, error: error.into() }
    }
}

impl<E: Into<anyhow::Error>> From<E> for CliError {
    fn from(e: E) -> Self {
        let error = e.into();
        let exit = if error.downcast_ref::<mnistflow_nats::ConfigError>().is_some()
            || error
                .downcast_ref::<mnistflow_store::StoreError>()
                .is_some_and(|s| matches!(s, mnistflow_store::StoreError::Config(_)))
        {
            Exit::Usage
        } else if error.downcast_ref::<mnistflow_nats::BusError>().is_some() {
            Exit::Unavailable
        } else {
            Exit::Failed
        };
        Self { exit, error }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "mnistflow",
    version,
    about = "Train and serve an MNIST classifier: an event-driven pipeline on NATS JetStream.",
    after_help = "Environment: NATS_URL (default nats://127.0.0.1:4222), NATS_USER/NATS_PASSWORD, NATS_TOKEN, \
NATS_CREDS, NATS_PREFIX, STORE_URL. Exit codes: 0 ok, 1 the pipeline reported a failure, 2 usage or \
configuration error, 3 NATS unreachable or no answer in time."
)]
pub struct Cli {
    /// Print machine-readable JSON (one object per line) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the whole pipeline on this machine: a managed nats-server (unless NATS_URL
    /// is set), downloader, trainer worker, inference and web in one process, on a
    /// local store. Downloads and trains on first start, reuses both afterwards.
    Up(up::UpArgs),
    /// Ask the downloader for the data set and wait for it to be ready.
    Download {
        /// Mirror base URLs to use instead of the downloader's (repeatable).
        #[arg(long = "mirror")]
        mirrors: Vec<String>,
        /// Do not request training once the data set is ready.
        #[arg(long)]
        no_train: bool,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Request a training run and follow its progress until the version is
    /// published (exit 0) or the run fails (exit 1).
    Train(commands::TrainArgs),
    /// Classify image files (over NATS by default, over HTTP with --url).
    Predict {
        /// Image files (PNG, JPEG, GIF, BMP, WebP, ...).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// An HTTP endpoint instead of NATS: the inference service
        /// (http://host:port, posts to /v1/predict) or the web tier (posts to /api/predict).
        #[arg(long)]
        url: Option<String>,
        /// Seconds to wait for each answer.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// List, show or promote model versions.
    Models {
        #[command(subcommand)]
        action: ModelsAction,
    },
    /// Print the pipeline's recorded events, oldest first.
    Events {
        /// Keep following new events after the history.
        #[arg(long, short)]
        follow: bool,
    },
    /// Copy the JetStream streams and the model store (NATS_URL, STORE_URL) into
    /// a new directory.
    Backup {
        /// Where the backup goes (must not exist or be empty); with --dated, the
        /// parent of a new directory named by the UTC time.
        dir: PathBuf,
        /// Write into DIR/<UTC time, 20261201T031500Z> (for a CronJob: a scratch
        /// image has no shell to name it).
        #[arg(long)]
        dated: bool,
        /// After the backup, delete all but the newest N complete backups
        /// (dated directories with a backup.json) in DIR.
        #[arg(long, requires = "dated", value_parser = clap::value_parser!(u16).range(1..))]
        keep: Option<u16>,
    },
    /// Restore a backup into an empty installation (NATS_URL, STORE_URL): the
    /// store first, CURRENT last, then the streams' messages in their order.
    Restore {
        /// A directory written by `mnistflow backup`.
        dir: PathBuf,
        /// Only the store (into an empty STORE_URL; NATS is not touched): moving
        /// a store to another place, a volume to a bucket.
        #[arg(long)]
        store_only: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ModelsAction {
    /// Every stored version with its accuracy; `*` marks the one served.
    List,
    /// One version's metadata (CURRENT when no version is given).
    Show { version: Option<String> },
    /// Serve this version (an older one rolls back) and wait until an inference
    /// instance loads it.
    Promote {
        version: String,
        /// Seconds to wait for an inference instance to confirm.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> ExitCode {
    let shutdown = mnistflow_runtime::shutdown_token();
    let result = match cli.command {
        Command::Up(args) => up::up(args, shutdown).await,
        other => commands::run(other, cli.json, shutdown).await,
    };
    match result {
        Ok(exit) => exit.into(),
        Err(e) => {
            if cli.json {
                outln!("{}", serde_json::json!({"error": format!("{:#}", e.error), "exit": e.exit as u8}));
            } else {
                eprintln!("error: {:#}", e.error);
            }
            e.exit.into()
        }
    }
}
