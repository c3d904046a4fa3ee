//! Following the `CURRENT` pointer.
//!
//! On a local directory a `notify` watcher (on its own thread, feeding a bounded
//! channel) wakes the checker at once; polling runs as well, because network
//! volumes (NFS, Filestore) do not deliver inotify events for writes made by
//! other nodes, and object stores have no notifications at all.

use std::time::Duration;

use mnistflow_nats::ModelVersion;
use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{MODELS_PREFIX, Store};

/// Follows `CURRENT`: the returned receiver holds the latest value read, and
/// changes whenever the pointer moves. Stops when `shutdown` is cancelled.
/// `poll` is the fallback interval (also the only mechanism on object stores).
pub fn watch_current(
    store: Store,
    poll: Duration,
    shutdown: CancellationToken,
) -> watch::Receiver<Option<ModelVersion>> {
    let (tx, rx) = watch::channel(None);
    let (wake_tx, mut wake_rx) = mpsc::channel::<()>(1);
    // Kept alive for as long as the task runs; dropping it stops the notify thread.
    let watcher = store.local_root().and_then(|root| {
        let dir = root.join(MODELS_PREFIX);
        std::fs::create_dir_all(&dir).ok()?;
        let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Reads are events too (inotify reports opening and closing a file
            // unwritten): reacting to our own read of CURRENT would loop forever.
            if res.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
                // A full channel already holds a wake-up: that is the debounce.
                let _ = wake_tx.try_send(());
            }
        })
        .map_err(|e| warn!(error = %e, "File watcher unavailable, polling only."))
        .ok()?;
        w.watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|e| warn!(error = %e, dir = %dir.display(), "Cannot watch the models directory, polling only."))
            .ok()?;
        Some(w)
    });
    tokio::spawn(async move {
        let _watcher = watcher;
        let mut ticker = tokio::time::interval(poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                _ = wake_rx.recv() => {}
                _ = ticker.tick() => {}
            }
            match store.current().await {
                Ok(current) => {
                    tx.send_if_modified(|v| {
                        if *v == current {
                            false
                        } else {
                            debug!(?current, "CURRENT changed.");
                            *v = current;
                            true
                        }
                    });
                }
                Err(e) => warn!(error = %e, "Reading CURRENT failed; will retry."),
            }
            if tx.is_closed() {
                break;
            }
        }
    });
    rx
}
