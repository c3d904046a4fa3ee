//! Fixtures shared by the inference tests: models (a properly trained CNN, cached
//! under the target directory; tiny random ones; a deliberately slow one), MNIST
//! test digits, image encoders, and a running instance on random ports.
#![allow(dead_code)]

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use image::{DynamicImage, GrayImage, ImageFormat, Luma};
use mnistflow_inference::{App, Config};
use mnistflow_integration::NatsServer;
use mnistflow_nats::{Bus, InferenceLoaded, ModelVersion, NatsConfig, Received, TrainRequest, TypedSubscriber};
use mnistflow_store::{ModelMetadata, Store, idx};
use tch::nn;
use tch::{CModule, Device, Kind, Tensor};
use tokio_util::sync::CancellationToken;

/// Exports `forward` as TorchScript by tracing (the trainer's way) and returns the file's bytes.
pub fn trace(vs: &mut nn::VarStore, forward: impl Fn(&Tensor) -> Tensor) -> Vec<u8> {
    vs.freeze();
    let module = CModule::create_by_tracing(
        "MnistNet",
        "forward",
        &[Tensor::zeros([1, 1, 28, 28], (Kind::Float, Device::Cpu))],
        &mut |inputs| vec![forward(&inputs[0])],
    )
    .expect("tracing");
    // libtorch names the archive after the file, so the name must be a plain one.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.pt");
    module.save(&path).expect("saving TorchScript");
    std::fs::read(&path).unwrap()
}

/// A tiny random model (one linear layer): fast to load, distinct per seed.
pub fn tiny_model(seed: i64) -> Vec<u8> {
    tch::manual_seed(seed);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let linear = nn::linear(vs.root() / "fc", 784, 10, Default::default());
    trace(&mut vs, |x| x.view([-1, 784]).apply(&linear).log_softmax(-1, Kind::Float))
}

/// A model whose every forward pass costs a fixed large matrix product (tens of
/// milliseconds whatever the batch): makes queues fill and drains observable.
pub fn slow_model() -> Vec<u8> {
    tch::manual_seed(7);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let linear = nn::linear(vs.root() / "fc", 784, 10, Default::default());
    let big = vs.root().randn("big", &[1024, 1024], 0.0, 1.0);
    trace(&mut vs, move |x| {
        // Depends on the input, so that no optimisation can fold it into a constant.
        let b = &big + x.sum(Kind::Float) * 0.0;
        let burn = b.matmul(&b).matmul(&b).sum(Kind::Float) * 0.0;
        x.view([-1, 784]).apply(&linear).log_softmax(-1, Kind::Float) + burn
    })
}

/// MNIST test images (`[10000 × 784]` bytes) and labels.
pub fn mnist_test() -> &'static (Vec<u8>, Vec<u8>) {
    static TEST: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    TEST.get_or_init(|| load_mnist("t10k"))
}

fn load_mnist(set: &str) -> (Vec<u8>, Vec<u8>) {
    let dir = mnistflow_integration::mnist_dir();
    let images = idx::parse_gz(&std::fs::read(dir.join(format!("{set}-images-idx3-ubyte.gz"))).unwrap()).unwrap();
    let labels = idx::parse_gz(&std::fs::read(dir.join(format!("{set}-labels-idx1-ubyte.gz"))).unwrap()).unwrap();
    assert_eq!(images.item_len(), 784);
    (images.data, labels.data)
}

/// The default model: what the trainer's `default` preset makes of the real
/// MNIST (about 98.8 % on the test set), exported as the trainer exports it.
/// Trained once (about 40 s on an idle 2-core machine) and cached under the
/// target directory, keyed by what produced it ([`fixture_key`]): a change to the
/// trainer's code, its presets or the libtorch bindings trains a new one instead
/// of reusing a stale file. A file lock keeps two test binaries from training it
/// at the same time. The test output names the key and whether it was trained.
pub fn trained_model() -> &'static [u8] {
    static MODEL: OnceLock<Vec<u8>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&dir).unwrap();
        let key = fixture_key();
        let path = dir.join(format!("{FIXTURE_PREFIX}{key}.pt"));
        let lock = std::fs::File::create(dir.join("mnistflow-inference-fixture-cnn.lock")).unwrap();
        lock.lock().expect("locking the model fixture");
        if let Ok(bytes) = std::fs::read(&path)
            && CModule::load_data(&mut Cursor::new(&bytes)).is_ok()
        {
            eprintln!("fixture: the default model {key}, cached in {}", path.display());
            return bytes;
        }
        eprintln!("fixture: the default model {key} is not cached in {}: training it", dir.display());
        let bytes = train(&key);
        let tmp = path.with_extension("pt.tmp");
        std::fs::write(&tmp, &bytes).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        // Models of earlier trainer code are never read again.
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(FIXTURE_PREFIX) && entry.path() != path {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        bytes
    })
}

const FIXTURE_PREFIX: &str = "mnistflow-inference-fixture-cnn-";

/// What produced the default model: the request (`TrainRequest::default()` through
/// `train_from_dir`, whose presets are in the trainer's source), the trainer's and
/// the torch crate's source files and manifests, and the `tch` / `torch-sys`
/// entries of Cargo.lock. The first 16 hex digits of their SHA-256.
pub fn fixture_key() -> String {
    use sha2::{Digest, Sha256};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    for dir in ["trainer/src", "torch/src"] {
        let mut found: Vec<PathBuf> =
            std::fs::read_dir(root.join(dir)).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
        found.sort();
        files.extend(found);
    }
    files.extend(["trainer/Cargo.toml", "torch/Cargo.toml"].map(|f| root.join(f)));
    let mut hash = Sha256::new();
    hash.update(b"train_from_dir(MNIST, TrainRequest::default())\n");
    for file in &files {
        hash.update(file.strip_prefix(root).unwrap().to_string_lossy().as_bytes());
        hash.update(std::fs::read(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display())));
    }
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).expect("reading Cargo.lock");
    for package in lock.split("[[package]]") {
        if package.contains("name = \"tch\"") || package.contains("name = \"torch-sys\"") {
            hash.update(package.as_bytes());
        }
    }
    hex::encode(hash.finalize())[..16].to_string()
}

fn train(key: &str) -> Vec<u8> {
    let started = std::time::Instant::now();
    let trained =
        mnistflow_trainer::train_from_dir(&mnistflow_integration::mnist_dir(), &TrainRequest::default()).unwrap();
    eprintln!(
        "fixture: trained the default model {key} in {:.0?}: {:.2} % on the test set ({:?})",
        started.elapsed(),
        trained.metrics.accuracy * 100.0,
        trained.hyperparameters
    );
    trained.torchscript
}

/// A fresh version name (unique within a test).
pub fn version(tag: &str) -> ModelVersion {
    ModelVersion(format!("{}-{tag}", ModelVersion::generate()))
}

/// Stores `model` as `version` (does not promote).
pub async fn publish(store: &Store, model: &[u8], version: &ModelVersion) -> ModelMetadata {
    store.publish_model(Bytes::copy_from_slice(model), ModelMetadata::new(version.clone())).await.unwrap()
}

/// The next refusal of `version` (`inference.loaded` with `ok: false`).
pub async fn next_refusal(events: &mut TypedSubscriber<InferenceLoaded>, version: &ModelVersion) -> InferenceLoaded {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(Received::Message(e)) = events.next().await
                && !e.ok
                && e.refused.as_ref() == Some(version)
            {
                return e;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("a refusal of {version} (inference.loaded, ok false) within 30 s"))
}

/// Encodes an image in `format`.
pub fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    image.write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

/// MNIST test digit `i` as a 28×28 grayscale image.
pub fn digit(i: usize) -> GrayImage {
    let (images, _) = mnist_test();
    GrayImage::from_raw(28, 28, images[i * 784..(i + 1) * 784].to_vec()).unwrap()
}

pub fn label(i: usize) -> u8 {
    mnist_test().1[i]
}

/// A 28×28 PNG of a simple shape (no MNIST needed).
pub fn small_png() -> Vec<u8> {
    let mut img = GrayImage::new(28, 28);
    for y in 6..22 {
        img.put_pixel(14, y, Luma([255]));
        img.put_pixel(15, y, Luma([255]));
    }
    encode(&DynamicImage::ImageLuma8(img), ImageFormat::Png)
}

/// A nats-server and a local store for one test.
pub struct World {
    pub nats: NatsServer,
    pub store_dir: tempfile::TempDir,
    pub store: Store,
    pub bus: Bus,
}

impl World {
    pub async fn new() -> Self {
        let nats = NatsServer::start();
        let store_dir = tempfile::tempdir().unwrap();
        let store = Store::local(store_dir.path()).unwrap();
        let bus = Bus::connect(&NatsConfig::for_url(&nats.url()).unwrap(), &CancellationToken::new()).await.unwrap();
        bus.ensure_streams().await.unwrap();
        Self { nats, store_dir, store, bus }
    }

    /// Publishes and promotes `model` as a new version.
    pub async fn serve(&self, model: &[u8], tag: &str) -> ModelVersion {
        let v = version(tag);
        publish(&self.store, model, &v).await;
        self.store.promote(&v).await.unwrap();
        v
    }

    pub fn config(&self, extra: &[(&str, &str)]) -> Config {
        let mut pairs: Vec<(String, String)> = vec![
            ("NATS_URL".into(), self.nats.url()),
            ("STORE_URL".into(), self.store_dir.path().display().to_string()),
            ("INFERENCE_ADDRESS".into(), "127.0.0.1".into()),
            ("INFERENCE_PORT".into(), "0".into()),
            ("INFERENCE_POLL_SECS".into(), "0.2".into()),
            ("INFERENCE_DRAIN_SECS".into(), "5".into()),
        ];
        for (k, v) in extra {
            pairs.retain(|(n, _)| n != k);
            pairs.push(((*k).into(), (*v).into()));
        }
        Config::from_lookup(move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())).unwrap()
    }

    /// Starts an instance; waits until it serves a model unless `wait_ready` is false.
    pub async fn start(&self, extra: &[(&str, &str)], wait_ready: bool) -> Running {
        let shutdown = CancellationToken::new();
        let config = self.config(extra);
        let bus = Bus::connect(&config.nats, &shutdown).await.unwrap();
        let store = Store::local(self.store_dir.path()).unwrap();
        let app = App::start(config, bus, store, shutdown.clone()).await.unwrap();
        let running = Running { base: format!("http://{}", app.http_addr()), app: Some(app), shutdown };
        if wait_ready {
            let slot = running.app().service().slot.clone();
            mnistflow_integration::wait_until("a model to be served", Duration::from_secs(30), || {
                let slot = slot.clone();
                async move { slot.version() }
            })
            .await;
        }
        running
    }
}

/// A running instance, stopped on drop.
pub struct Running {
    pub base: String,
    pub app: Option<App>,
    pub shutdown: CancellationToken,
}

impl Running {
    pub fn app(&self) -> &App {
        self.app.as_ref().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Cancels and drains, within `timeout`.
    pub async fn stop(mut self, timeout: Duration) {
        self.shutdown.cancel();
        if let Some(app) = self.app.take() {
            tokio::time::timeout(timeout, app.wait()).await.expect("drain within the deadline").unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An HTTP client with a timeout on every request.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

/// Reads the cached fixture path (for the benchmark script).
pub fn fixture_path() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}
