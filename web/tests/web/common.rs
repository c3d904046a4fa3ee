//! Shared test kit: NATS, configuration, the test inference responder, MNIST fixtures.

use std::io::Read;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use mnistflow_integration::{NatsServer, mnist_dir};
use mnistflow_nats::{Bus, ModelVersion, NatsConfig, PredictError, Prediction, subjects};
use mnistflow_web::Config;
use rocket::local::asynchronous::Client;
use tokio::task::JoinHandle;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const RESPONDER_VERSION: &str = "knn-test-responder";

/// A real nats-server with the streams created, and a bus on it.
pub async fn nats() -> (NatsServer, Bus) {
    let server = NatsServer::start();
    let config = NatsConfig::for_url(&server.url()).unwrap();
    let bus = Bus::connect(&config, &tokio_util::sync::CancellationToken::new()).await.unwrap();
    bus.ensure_streams().await.unwrap();
    (server, bus)
}

/// The web configuration for a server on `nats`, with `extra` variables.
pub fn config(nats: &NatsServer, extra: &[(&str, &str)]) -> Config {
    let mut vars: Vec<(String, String)> = vec![
        ("NATS_URL".into(), nats.url()),
        ("WEB_ADDRESS".into(), "127.0.0.1".into()),
        ("WEB_PORT".into(), "0".into()),
        ("WEB_METRICS_ADDR".into(), "127.0.0.1:0".into()),
        // Generous: the test responder is unoptimised code on a machine that may be busy.
        ("WEB_PREDICT_TIMEOUT_MS".into(), "20000".into()),
    ];
    for (k, v) in extra {
        vars.retain(|(n, _)| n != k);
        vars.push(((*k).to_owned(), (*v).to_owned()));
    }
    Config::from_lookup(move |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())).unwrap()
}

/// Rocket's local client over the real service.
pub async fn client(nats: &NatsServer, bus: &Bus, extra: &[(&str, &str)]) -> Client {
    Client::untracked(mnistflow_web::build(config(nats, extra), bus.clone())).await.unwrap()
}

/// How the test responder answers.
#[derive(Debug, Clone)]
pub enum Answer {
    /// Classify the image with k-nearest neighbours over MNIST.
    Knn,
    /// Reply with this error.
    Error(u16, &'static str),
    /// Never reply (the request times out).
    Silent,
    /// Reply busy, with a retry hint in seconds.
    Busy(u32),
}

/// A test inference instance on `<prefix>.predict`, queue group `inference`.
pub struct Responder {
    pub received: Arc<Mutex<Vec<Bytes>>>,
    task: JoinHandle<()>,
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Responder {
    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

pub async fn responder(bus: &Bus, answer: Answer) -> Responder {
    let client = bus.client().clone();
    let subject = bus.subjects().full(subjects::PREDICT);
    let mut sub = client.queue_subscribe(subject, subjects::PREDICT_QUEUE_GROUP.into()).await.unwrap();
    client.flush().await.unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let seen = received.clone();
    let task = tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            seen.lock().unwrap().push(msg.payload.clone());
            let Some(reply) = msg.reply.clone() else { continue };
            let body = match &answer {
                Answer::Silent => continue,
                Answer::Error(code, message) => serde_json::to_vec(&PredictError::new(*code, *message)).unwrap(),
                Answer::Busy(secs) => serde_json::to_vec(&PredictError::busy("all instances are busy", *secs)).unwrap(),
                Answer::Knn => {
                    let payload = msg.payload.clone();
                    match tokio::task::spawn_blocking(move || classify(&payload)).await.unwrap() {
                        Ok(p) => serde_json::to_vec(&p).unwrap(),
                        Err(e) => serde_json::to_vec(&PredictError::new(415, e)).unwrap(),
                    }
                }
            };
            client.publish(reply, body.into()).await.unwrap();
            client.flush().await.unwrap();
        }
    });
    Responder { received, task }
}

/// Real MNIST, decoded once.
pub struct Mnist {
    pub train_images: Vec<u8>,
    pub train_labels: Vec<u8>,
    pub test_images: Vec<u8>,
    pub test_labels: Vec<u8>,
}

fn idx(name: &str) -> Vec<u8> {
    let gz = std::fs::read(mnist_dir().join(name)).unwrap();
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut raw).unwrap();
    let ndims = usize::from(raw[3]);
    raw.split_off(4 + 4 * ndims)
}

/// How many training images the responder compares against (enough for ~95 %).
const REFERENCE_IMAGES: usize = 20_000;

pub fn mnist() -> &'static Mnist {
    static MNIST: OnceLock<Mnist> = OnceLock::new();
    MNIST.get_or_init(|| {
        let mut train_images = idx("train-images-idx3-ubyte.gz");
        train_images.truncate(REFERENCE_IMAGES * 784);
        let mut train_labels = idx("train-labels-idx1-ubyte.gz");
        train_labels.truncate(REFERENCE_IMAGES);
        Mnist {
            train_images,
            train_labels,
            test_images: idx("t10k-images-idx3-ubyte.gz"),
            test_labels: idx("t10k-labels-idx1-ubyte.gz"),
        }
    })
}

/// Test image `index` as a 28×28 grayscale PNG, and its label.
pub fn test_digit_png(index: usize) -> (Vec<u8>, u8) {
    let m = mnist();
    let pixels = m.test_images[index * 784..(index + 1) * 784].to_vec();
    let img = image::GrayImage::from_raw(28, 28, pixels).unwrap();
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    (png, m.test_labels[index])
}

/// Decodes any image to 28×28 MNIST polarity and answers with its nearest neighbours' vote.
pub fn classify(bytes: &[u8]) -> Result<Prediction, String> {
    let img = image::load_from_memory(bytes).map_err(|e| format!("not an image: {e}"))?;
    // Transparent pixels count as background.
    let rgba = img.to_rgba8();
    let mut luma = image::GrayImage::new(rgba.width(), rgba.height());
    for (x, y, p) in rgba.enumerate_pixels() {
        let [r, g, b, a] = p.0;
        let v = (u32::from(r) * 299 + u32::from(g) * 587 + u32::from(b) * 114) / 1000;
        luma.put_pixel(x, y, image::Luma([((v * u32::from(a)) / 255) as u8]));
    }
    let luma = if luma.dimensions() == (28, 28) {
        luma
    } else {
        image::imageops::resize(&luma, 28, 28, image::imageops::FilterType::Triangle)
    };
    let mut x: Vec<i32> = luma.into_raw().into_iter().map(i32::from).collect();
    if x.iter().sum::<i32>() / 784 > 127 {
        x.iter_mut().for_each(|v| *v = 255 - *v);
    }
    let m = mnist();
    // Plain loops with early abandoning: this test code is built without optimisation,
    // and the machine may be busy; a reference stops as soon as it cannot be among the k best.
    let k = 5;
    let mut best: Vec<(i64, u8)> = Vec::with_capacity(k + 1);
    let images = &m.train_images;
    for i in 0..m.train_labels.len() {
        let bound = if best.len() == k { best[k - 1].0 } else { i64::MAX };
        let base = i * 784;
        let mut d: i64 = 0;
        let mut row = 0;
        while row < 784 && d < bound {
            let mut j = row;
            while j < row + 28 {
                let diff = i64::from(images[base + j]) - i64::from(x[j]);
                d += diff * diff;
                j += 1;
            }
            row += 28;
        }
        if d < bound {
            let at = best.partition_point(|(bd, _)| *bd <= d);
            best.insert(at, (d, m.train_labels[i]));
            best.truncate(k);
        }
    }
    let mut votes = [0f32; 10];
    for (_, label) in &best {
        votes[usize::from(*label)] += 1.0;
    }
    let digit = (0..10).max_by(|a, b| votes[*a].total_cmp(&votes[*b]).then(b.cmp(a))).unwrap() as u8;
    // The nearest neighbour breaks ties.
    let digit = if votes.iter().filter(|v| **v == votes[usize::from(digit)]).count() > 1 { best[0].1 } else { digit };
    let probabilities = votes.iter().map(|v| v / k as f32).collect();
    let input = x.iter().map(|v| format!("{:02x}", (*v).clamp(0, 255))).collect();
    Ok(Prediction { digit, probabilities, model_version: ModelVersion::from(RESPONDER_VERSION), input: Some(input) })
}

/// Waits for `condition` with a deadline.
pub async fn eventually<T, Fut>(what: &str, timeout: Duration, condition: impl FnMut() -> Fut) -> T
where
    Fut: std::future::Future<Output = Option<T>>,
{
    mnistflow_integration::wait_until(what, timeout, condition).await
}
