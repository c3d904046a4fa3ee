//! `mnistflow models`: list, show and promote stored versions.

use std::time::Duration;

use anyhow::anyhow;
use futures::StreamExt;
use mnistflow_nats::{EventId, InferenceLoaded, ModelPromote, ModelVersion, subjects};
use mnistflow_store::Store;
use tokio_util::sync::CancellationToken;

use crate::{CliError, Exit, ModelsAction};

use super::{connect, decode, listen, print_json};

pub(super) async fn models(action: ModelsAction, json: bool, shutdown: &CancellationToken) -> Result<Exit, CliError> {
    match action {
        ModelsAction::List => {
            let store = Store::from_lookup(|k| std::env::var(k).ok())?;
            let current = store.current().await?;
            let versions = store.list_models().await?;
            if json {
                print_json(&serde_json::json!({"current": current, "versions": versions}));
            } else if versions.is_empty() {
                outln!("No model versions in {}.", store.url());
            } else {
                for m in &versions {
                    let mark = if Some(&m.version) == current.as_ref() { "*" } else { " " };
                    outln!(
                        "{mark} {}  accuracy {:.2} %  loss {:.4}  dataset {}  {}",
                        m.version,
                        m.metrics.accuracy * 100.0,
                        m.metrics.loss,
                        m.dataset_id.as_ref().map_or("-", |d| d.as_str()),
                        m.created_at.format("%Y-%m-%d %H:%M:%S UTC")
                    );
                }
            }
            Ok(Exit::Ok)
        }
        ModelsAction::Show { version } => {
            let store = Store::from_lookup(|k| std::env::var(k).ok())?;
            let version = match version {
                Some(v) => ModelVersion(v),
                None => store
                    .current()
                    .await?
                    .ok_or_else(|| CliError::new(Exit::Failed, anyhow!("no version is current")))?,
            };
            let meta = store
                .model_metadata(&version)
                .await?
                .ok_or_else(|| CliError::new(Exit::Failed, anyhow!("no version {version} in {}", store.url())))?;
            if json {
                print_json(&meta);
            } else {
                outln!("{}", serde_json::to_string_pretty(&meta).unwrap_or_default());
            }
            Ok(Exit::Ok)
        }
        ModelsAction::Promote { version, timeout } => {
            if !ModelVersion::is_valid(&version) {
                return Err(CliError::new(Exit::Usage, anyhow!("{version:?} is not a valid version name")));
            }
            let bus = connect(shutdown).await?;
            let mut sub = listen(&bus, &[subjects::INFERENCE_LOADED]).await?;
            let command = ModelPromote {
                event_id: EventId::new(),
                version: ModelVersion(version.clone()),
                requested_by: Some("mnistflow-cli".into()),
            };
            bus.publish(&command).await?;
            if !json {
                eprintln!("Promotion of {version} requested; waiting for an inference instance to load it...");
            }
            let wait = Duration::from_secs(timeout);
            let loaded = tokio::time::timeout(wait, async {
                while let Some(msg) = sub.next().await {
                    let Some(l) = decode::<InferenceLoaded>(&msg.payload) else { continue };
                    let about_it = l.version.as_ref().map(|v| v.as_str()) == Some(version.as_str()) && l.ok
                        || l.refused.as_ref().map(|v| v.as_str()) == Some(version.as_str());
                    if about_it {
                        return Some(l);
                    }
                }
                None
            })
            .await
            .ok()
            .flatten()
            .ok_or_else(|| {
                CliError::new(Exit::Unavailable, anyhow!("no inference instance confirmed {version} within {wait:?}"))
            })?;
            if json {
                print_json(&loaded);
            } else if loaded.ok {
                outln!("{} now serves {version}.", loaded.instance);
            } else {
                eprintln!(
                    "{} refused {version}: {}",
                    loaded.instance,
                    loaded.error.as_deref().unwrap_or("unknown reason")
                );
            }
            Ok(if loaded.ok { Exit::Ok } else { Exit::Failed })
        }
    }
}
