//! Following `CURRENT` on a local directory costs nothing while nothing changes.
//! Alone in its test binary: it measures this process's CPU time.

use std::time::Duration;

use bytes::Bytes;
use mnistflow_nats::ModelVersion;
use mnistflow_store::{ModelMetadata, Store, watch::watch_current};
use tokio_util::sync::CancellationToken;

/// CPU time (user + system) this process has used, from `/proc/self/stat`.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The fields after the command name (which may hold spaces) start after ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, in clock ticks (100 Hz on Linux).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_current_uses_no_cpu_while_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::local(dir.path()).unwrap();
    let version = ModelVersion("20261130-050001-000001".into());
    store.publish_model(Bytes::from(vec![1u8; 1000]), ModelMetadata::new(version.clone())).await.unwrap();
    store.promote(&version).await.unwrap();

    let shutdown = CancellationToken::new();
    let mut rx = watch_current(store.clone(), Duration::from_secs(60), shutdown.clone());
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| v.as_ref() == Some(&version)))
        .await
        .unwrap()
        .unwrap();

    // Reading CURRENT is itself a file event (open, close-nowrite): a watcher that
    // reacted to it would read again at once, for ever, burning a CPU.
    let before = cpu_time();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_time() - before;
    assert!(used < Duration::from_millis(300), "{used:?} of CPU in 2 s of nothing happening");

    // And it still follows a change.
    let next = ModelVersion("20261130-050002-000002".into());
    store.publish_model(Bytes::from(vec![2u8; 1000]), ModelMetadata::new(next.clone())).await.unwrap();
    store.promote(&next).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|v| v.as_ref() == Some(&next))).await.unwrap().unwrap();
    shutdown.cancel();
}
