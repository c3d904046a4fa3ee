//! Moving `CURRENT` is a compare-and-set: two promotions racing from the same
//! base, each through its own `Store` (as two pods would), on a real directory
//! (the exclusive-create log) and on an object store with conditional puts
//! (in memory: `PutMode::Update` on the ETag, as on gs://).

use std::sync::Arc;

use bytes::Bytes;
use mnistflow_nats::ModelVersion;
use mnistflow_store::{ModelMetadata, Store, StoreError};
use tokio::sync::Barrier;

fn version(n: u32) -> ModelVersion {
    ModelVersion(format!("20261130-0600{n:02}-00000{n}"))
}

async fn publish(store: &Store, n: u32) -> ModelVersion {
    let meta = ModelMetadata::new(version(n));
    store.publish_model(Bytes::from(vec![n as u8; 100]), meta).await.unwrap().version
}

/// Rounds of two racers that read the same pointer, then both move it: exactly
/// one wins each round, the other gets a conflict naming the base, and `CURRENT`
/// names the winner.
async fn race(a: Store, b: Store) {
    for n in 1..=20u32 {
        publish(&a, 2 * n).await;
        publish(&a, 2 * n + 1).await;
    }
    for n in 1..=20u32 {
        let barrier = Arc::new(Barrier::new(2));
        let racer = |store: Store, v: ModelVersion| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let base = store.current_pointer().await.unwrap();
                barrier.wait().await;
                store.promote_from(&base, &v).await.map(|_| (base.version, v))
            })
        };
        let (ra, rb) = (racer(a.clone(), version(2 * n)), racer(b.clone(), version(2 * n + 1)));
        let (ra, rb) = (ra.await.unwrap(), rb.await.unwrap());
        let (won, lost) = match (ra, rb) {
            (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
            (Ok(_), Ok(_)) => panic!("round {n}: both promotions from the same base succeeded"),
            (Err(x), Err(y)) => panic!("round {n}: both failed: {x}; {y}"),
        };
        assert!(matches!(lost, StoreError::Conflict { .. }), "round {n}: the loser's error is {lost}");
        assert!(lost.to_string().contains("conflict"), "{lost}");
        assert_eq!(a.current().await.unwrap(), Some(won.1.clone()), "round {n}: CURRENT names the winner");
        assert_eq!(b.current_pointer().await.unwrap().version, Some(won.1), "round {n}: the pointer too");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_directory_one_promotion_per_base_wins_and_the_other_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    race(Store::local(dir.path()).unwrap(), Store::local(dir.path()).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_an_object_store_one_promotion_per_base_wins_and_the_other_conflicts() {
    let store = Store::memory();
    race(store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_promotions_racing_all_land_and_current_names_the_last_move() {
    let dir = tempfile::tempdir().unwrap();
    let first = Store::local(dir.path()).unwrap();
    // A store promoted before the log existed: generation 0 is the plain CURRENT.
    let old = publish(&first, 1).await;
    first.put(mnistflow_store::CURRENT_KEY, Bytes::from(format!("{old}\n"))).await.unwrap();
    for n in 2..=9 {
        publish(&first, n).await;
    }
    let mut tasks = Vec::new();
    for n in 2..=9 {
        let store = Store::local(dir.path()).unwrap();
        tasks.push(tokio::spawn(async move { store.promote(&version(n)).await.map(|_| ()) }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failures.push(e.to_string());
        }
    }
    // Eight racers, five attempts each: a few may give up with a conflict, never silently.
    assert!(failures.iter().all(|f| f.contains("conflict")), "{failures:?}");
    assert!(failures.len() < 8, "every manual promotion lost: {failures:?}");
    let pointer = first.current_pointer().await.unwrap();
    assert_eq!(first.current().await.unwrap(), pointer.version, "CURRENT names the log's latest record");
}
