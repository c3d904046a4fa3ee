//! A whole pipeline in one test process: real nats-server, a local mirror of the
//! real MNIST files, a temporary local store, and every stage started through its
//! library with its own shutdown token (so a test can stop or kill one stage).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mnistflow_integration::{MirrorServer, NatsServer, mnist_dir, workspace_root};
use mnistflow_nats::async_nats::jetstream::consumer::DeliverPolicy;
use mnistflow_nats::events::Message;
use mnistflow_nats::{Bus, NatsConfig};
use mnistflow_store::Store;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct Stage {
    pub token: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl Stage {
    /// Graceful stop: cancel and wait.
    pub async fn stop(self) {
        self.token.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
    }

    /// A crash, as near as one process allows: the task is dropped mid-flight.
    pub fn kill(self) {
        self.task.abort();
        self.token.cancel();
    }
}

pub struct Inference {
    pub app_addr: SocketAddr,
    pub stage: Stage,
}

/// The pipeline on one nats-server.
pub struct Stack {
    pub nats: NatsServer,
    pub pipeline: Pipeline,
}

impl std::ops::Deref for Stack {
    type Target = Pipeline;
    fn deref(&self) -> &Pipeline {
        &self.pipeline
    }
}

impl Stack {
    pub async fn new(extra: &[(&str, &str)]) -> Self {
        let nats = NatsServer::start();
        let pipeline = Pipeline::new(&nats.url(), extra).await;
        Self { nats, pipeline }
    }
}

/// Everything but the NATS server(s): a mirror, a store, the test's own bus,
/// and the stages' environment (`NATS_URL` set to `nats_url`).
pub struct Pipeline {
    pub nats_url: String,
    pub mirror: MirrorServer,
    pub store_dir: tempfile::TempDir,
    pub store: Store,
    pub bus: Bus,
    pub extra: Vec<(String, String)>,
}

impl Pipeline {
    /// Connects the test's bus to `nats_url` with `extra`'s NATS settings
    /// (`NATS_STREAM_REPLICAS`, ...) and creates the streams.
    pub async fn new(nats_url: &str, extra: &[(&str, &str)]) -> Self {
        let mirror = MirrorServer::start(mnist_dir()).await;
        let store_dir = tempfile::tempdir().unwrap();
        let store = Store::local(store_dir.path()).unwrap();
        let extra: Vec<(String, String)> = extra.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        let lookup = |key: &str| {
            if key == "NATS_URL" {
                return Some(nats_url.to_owned());
            }
            extra.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
        };
        let bus = Bus::connect(&NatsConfig::from_lookup(lookup).unwrap(), &CancellationToken::new()).await.unwrap();
        bus.ensure_streams().await.unwrap();
        Self { nats_url: nats_url.to_owned(), mirror, store_dir, store, bus, extra }
    }

    /// The environment every stage of this stack reads.
    pub fn env(&self, overrides: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + Send + Sync + 'static {
        let mut vars: Vec<(String, String)> = vec![
            ("NATS_URL".into(), self.nats_url.clone()),
            ("NATS_CONNECT_TIMEOUT_SECS".into(), "30".into()),
            ("STORE_URL".into(), self.store_dir.path().display().to_string()),
            ("DOWNLOADER_MODE".into(), "service".into()),
            ("DOWNLOADER_MIRRORS".into(), self.mirror.url()),
            ("DOWNLOADER_METRICS_ADDR".into(), "off".into()),
            ("DOWNLOADER_RETRY_DELAY_SECS".into(), "1".into()),
            ("DOWNLOADER_PROGRESS".into(), "off".into()),
            ("TRAINER_MODE".into(), "worker".into()),
            ("TRAINER_METRICS_ADDR".into(), "off".into()),
            ("TRAINER_PROGRESS_BAR".into(), "off".into()),
            // Tests run side by side: one thread each (see TRAINER_THREADS).
            ("TRAINER_THREADS".into(), "1".into()),
            // A short run keeps CI sane; the floor is lowered to match.
            ("TRAINER_MAX_MINUTES".into(), "0.15".into()),
            ("TRAINER_ACCURACY_FLOOR".into(), "0.5".into()),
            ("TRAINER_ACK_WAIT_SECS".into(), "10".into()),
            ("TRAINER_RETRY_DELAY_SECS".into(), "1".into()),
            ("INFERENCE_ADDRESS".into(), "127.0.0.1".into()),
            ("INFERENCE_PORT".into(), "0".into()),
            ("INFERENCE_POLL_SECS".into(), "1".into()),
            ("WEB_ADDRESS".into(), "127.0.0.1".into()),
            ("WEB_PORT".into(), "0".into()),
            ("WEB_METRICS_ADDR".into(), "127.0.0.1:0".into()),
        ];
        for (k, v) in
            self.extra.iter().cloned().chain(overrides.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())))
        {
            vars.retain(|(name, _)| *name != k);
            vars.push((k, v));
        }
        move |key: &str| vars.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    pub fn start_downloader(&self) -> Stage {
        let config = mnistflow_downloader::Config::from_lookup(self.env(&[])).unwrap();
        let token = CancellationToken::new();
        let t = token.clone();
        Stage { token, task: tokio::spawn(async move { mnistflow_downloader::main_with(config, t).await }) }
    }

    pub fn start_trainer(&self) -> Stage {
        let config = mnistflow_trainer::Config::from_lookup(self.env(&[])).unwrap();
        let token = CancellationToken::new();
        let t = token.clone();
        Stage { token, task: tokio::spawn(async move { mnistflow_trainer::main_with(config, t).await }) }
    }

    pub async fn start_inference(&self, instance: &str) -> Inference {
        self.start_inference_with(instance, &[]).await
    }

    /// An inference instance with extra variables (a pinned `NATS_URL`, ...).
    pub async fn start_inference_with(&self, instance: &str, overrides: &[(&str, &str)]) -> Inference {
        let mut vars = vec![("INFERENCE_INSTANCE", instance)];
        vars.extend_from_slice(overrides);
        let config = mnistflow_inference::Config::from_lookup(self.env(&vars)).unwrap();
        let token = CancellationToken::new();
        let bus = Bus::connect(&config.nats, &token).await.unwrap();
        let app = mnistflow_inference::App::start(config, bus, self.store.clone(), token.clone()).await.unwrap();
        let app_addr = app.http_addr();
        Inference { app_addr, stage: Stage { token, task: tokio::spawn(async move { app.wait().await }) } }
    }

    /// The feedback stage, serving `/metrics` on the address returned.
    pub fn start_feedback(&self, overrides: &[(&str, &str)]) -> (SocketAddr, Stage) {
        let addr = SocketAddr::from(([127, 0, 0, 1], mnistflow_integration::free_port()));
        let mut vars = vec![("FEEDBACK_ADDR", addr.to_string())];
        vars.extend(overrides.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let config = mnistflow_feedback::Config::from_lookup(self.env(&vars)).unwrap();
        let token = CancellationToken::new();
        let t = token.clone();
        (addr, Stage { token, task: tokio::spawn(async move { mnistflow_feedback::main_with(config, t).await }) })
    }

    pub async fn start_web(&self) -> (SocketAddr, Stage) {
        self.start_web_with(&[]).await
    }

    /// The web tier with extra variables (a pinned `NATS_URL`, ...).
    pub async fn start_web_with(&self, overrides: &[(&str, &str)]) -> (SocketAddr, Stage) {
        let config = mnistflow_web::Config::from_lookup(self.env(overrides)).unwrap();
        let token = CancellationToken::new();
        let bus = Bus::connect(&config.nats, &token).await.unwrap();
        let server = mnistflow_web::start(config, bus, token.clone()).await.unwrap();
        let addr = server.addr();
        (addr, Stage { token, task: tokio::spawn(async move { server.wait().await.map_err(anyhow::Error::from) }) })
    }

    /// Waits for the first recorded event of type `M` matching `predicate`
    /// (history included, so an event published before the call counts).
    pub async fn wait_event<M: Message>(&self, timeout: Duration, predicate: impl Fn(&M) -> bool) -> M {
        tokio::time::timeout(timeout, async {
            // On a cluster the stream may be electing a leader: try again.
            let mut replay = loop {
                match self.bus.replay_events(DeliverPolicy::All).await {
                    Ok(replay) => break replay,
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            };
            while let Some(event) = replay.next().await {
                let Ok(event) = event else { continue };
                if event.suffix == M::SUBJECT
                    && let Ok(m) = serde_json::from_slice::<M>(&event.payload)
                    && predicate(&m)
                {
                    return m;
                }
            }
            panic!("event stream ended");
        })
        .await
        .unwrap_or_else(|_| panic!("no matching {} event within {timeout:?}", M::SUBJECT))
    }

    /// Every recorded event of type `M`.
    pub async fn events<M: Message>(&self) -> Vec<M> {
        let mut replay = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match self.bus.replay_events(DeliverPolicy::All).await {
                    Ok(replay) => break replay,
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        })
        .await
        .expect("the events stream could not be replayed within 30 s");
        let last = replay.last_at_start;
        let mut out = Vec::new();
        if last == 0 {
            return out;
        }
        while let Ok(Some(Ok(event))) = tokio::time::timeout(Duration::from_secs(5), replay.next()).await {
            if event.suffix == M::SUBJECT
                && let Ok(m) = serde_json::from_slice::<M>(&event.payload)
            {
                out.push(m);
            }
            if event.sequence >= last {
                break;
            }
        }
        out
    }
}

/// PNG files of the first `n` MNIST test digits, with their labels.
pub fn test_digits(n: usize) -> Vec<(Vec<u8>, u8)> {
    let dir = mnist_dir();
    let images =
        mnistflow_store::idx::parse_gz(&std::fs::read(dir.join("t10k-images-idx3-ubyte.gz")).unwrap()).unwrap();
    let labels =
        mnistflow_store::idx::parse_gz(&std::fs::read(dir.join("t10k-labels-idx1-ubyte.gz")).unwrap()).unwrap();
    (0..n)
        .map(|i| {
            let pixels = images.data[i * 784..(i + 1) * 784].to_vec();
            let img = image::GrayImage::from_raw(28, 28, pixels).unwrap();
            let mut png = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
            (png, labels.data[i])
        })
        .collect()
}

/// The Python interpreter of the project's venv (it has nats-py, an independent client).
pub fn python() -> PathBuf {
    workspace_root().join(".tools/venv/bin/python")
}
