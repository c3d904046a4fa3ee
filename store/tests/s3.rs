//! The `s3://` store against a real S3-compatible server: moto's (PyPI `moto[server]`,
//! installed by scripts/setup into `.tools/venv`), on a random port. The store reads
//! its S3 settings from the process environment (`AWS_*`, as in the cluster), so the
//! test re-runs this binary's `#[ignore]`d half with that environment set: the
//! endpoint, plain HTTP allowed, dummy keys, and a bucket created first.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mnistflow_nats::ModelVersion;
use mnistflow_store::{ModelMetadata, Store, StoreError, watch::watch_current};
use tokio_util::sync::CancellationToken;

const BUCKET: &str = "mnistflow-test";

/// A moto server on a random loopback port, killed on drop.
struct Moto {
    child: Child,
    addr: SocketAddr,
}

impl Moto {
    fn start() -> Self {
        let bin = std::env::var_os("MOTO_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/moto_server"));
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} ({e}): run scripts/setup", bin.display()));
        let moto = Self { child, addr: SocketAddr::from(([127, 0, 0, 1], port)) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(moto.addr).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not listen on {} within 30 s", moto.addr);
            std::thread::sleep(Duration::from_millis(50));
        }
        moto
    }

    /// Creates `bucket` (S3's `PUT /bucket`; moto checks no signature).
    fn create_bucket(&self, bucket: &str) {
        let mut tcp = TcpStream::connect(self.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(tcp, "PUT /{bucket} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", self.addr)
            .unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).expect("moto's answer to creating the bucket within 10 s");
        assert!(response.starts_with("HTTP/1.1 200"), "creating bucket {bucket}: {response}");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_s3_store_publishes_promotes_loads_and_follows_current_on_a_real_s3_server() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let mut child = Command::new(std::env::current_exe().unwrap());
    child
        .args(["--exact", "s3_store_against_the_server_in_the_environment", "--ignored", "--nocapture"])
        .env("MNISTFLOW_TEST_STORE_URL", format!("s3://{BUCKET}/models-test"))
        .env("AWS_ENDPOINT", format!("http://{}", moto.addr))
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1");
    let mut running = child.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = running.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = running.kill();
            panic!("the s3:// half did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "the s3:// half failed (its output is above)");
}

fn version(n: u32) -> ModelVersion {
    ModelVersion(format!("20261130-0600{n:02}-00000{n}"))
}

#[tokio::test]
#[ignore = "run by the_s3_store_... with a moto server's address in its environment"]
async fn s3_store_against_the_server_in_the_environment() {
    let url =
        std::env::var("MNISTFLOW_TEST_STORE_URL").expect("MNISTFLOW_TEST_STORE_URL (set by the test that runs this)");
    let store = Store::open(&url).unwrap();
    assert_eq!(store.local_root(), None, "{url} must be an object store, not a directory");
    assert_eq!(store.current().await.unwrap(), None);
    assert!(store.list_models().await.unwrap().is_empty());

    let mut published = Vec::new();
    for n in 1..=2 {
        let mut meta = ModelMetadata::new(version(n));
        meta.metrics.accuracy = 0.9 + f64::from(n) / 100.0;
        let model = Bytes::from(vec![n as u8; 100_000 + n as usize]);
        published.push((store.publish_model(model.clone(), meta).await.unwrap(), model));
    }
    assert_eq!(store.current().await.unwrap(), None, "publishing alone must not promote");
    let listed: Vec<ModelVersion> = store.list_models().await.unwrap().into_iter().map(|m| m.version).collect();
    assert_eq!(listed, vec![version(1), version(2)]);

    let shutdown = CancellationToken::new();
    let mut rx = watch_current(store.clone(), Duration::from_millis(100), shutdown.clone());
    store.promote(&version(2)).await.unwrap();
    assert_eq!(store.current().await.unwrap(), Some(version(2)));
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| v.as_ref() == Some(&version(2))))
        .await
        .expect("the watcher to follow CURRENT to v2 by polling within 10 s")
        .unwrap();
    let (bytes, meta) = store.load_model(&version(2)).await.unwrap();
    assert_eq!(bytes, published[1].1);
    assert_eq!(meta.sha256, published[1].0.sha256);

    // Roll back, and refuse what is not there.
    store.promote(&version(1)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| v.as_ref() == Some(&version(1))))
        .await
        .expect("the watcher to follow CURRENT back to v1 within 10 s")
        .unwrap();
    let missing = store.promote(&version(9)).await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))), "promoting a missing version: {missing:?}");
    assert_eq!(store.current().await.unwrap(), Some(version(1)));
    shutdown.cancel();
}
