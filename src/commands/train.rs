//! `mnistflow train`: a training request, followed to its published version.

use std::time::Duration;

use anyhow::anyhow;
use clap::Args;
use futures::StreamExt;
use mnistflow_nats::events::Message;
use mnistflow_nats::{Bus, EventId, ModelPublished, TrainFailed, TrainProgress, TrainRequest, subjects};

use crate::{CliError, Exit};

use super::{decode, listen, print_json};

/// `mnistflow train` options; unset values take the trainer's defaults.
#[derive(Args, Debug, Clone, Default)]
pub struct TrainArgs {
    /// A named preset (`default`, `best`).
    #[arg(long)]
    pub preset: Option<String>,
    #[arg(long)]
    pub epochs: Option<i64>,
    #[arg(long)]
    pub batch_size: Option<i64>,
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// adadelta, adam, adamw, sgd, rmsprop.
    #[arg(long)]
    pub optimizer: Option<String>,
    #[arg(long)]
    pub seed: Option<i64>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long)]
    pub device: Option<String>,
    /// Stop training after this many minutes.
    #[arg(long)]
    pub max_minutes: Option<f64>,
    /// Train on at most this many examples per epoch.
    #[arg(long)]
    pub max_train_examples: Option<i64>,
    /// A data set id (default: the latest).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Promote even if worse than the served version (the accuracy floor still applies).
    #[arg(long)]
    pub force: bool,
    /// Minutes to wait for the run to finish.
    #[arg(long, default_value_t = 60.0)]
    pub timeout_minutes: f64,
}

impl TrainArgs {
    fn request(&self) -> TrainRequest {
        TrainRequest {
            event_id: EventId::new(),
            dataset_id: self.dataset.clone().map(Into::into),
            preset: self.preset.clone(),
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            optimizer: self.optimizer.clone(),
            seed: self.seed,
            device: self.device.clone(),
            max_minutes: self.max_minutes,
            max_train_examples: self.max_train_examples,
            force: self.force.then_some(true),
            requested_by: Some("mnistflow-cli".into()),
        }
    }
}

pub(super) async fn train(bus: &Bus, args: &TrainArgs, json: bool) -> Result<Exit, CliError> {
    let mut sub = listen(bus, &[subjects::TRAIN_PROGRESS, subjects::MODEL_PUBLISHED, subjects::TRAIN_FAILED]).await?;
    let request = args.request();
    bus.publish(&request).await?;
    let bar = (!json && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let bar = indicatif::ProgressBar::new(1);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} epoch {prefix} [{bar:30}] {pos}/{len} steps {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    if !json {
        eprintln!("Training requested ({}); waiting for a trainer...", request.event_id);
    }
    let timeout = Duration::from_secs_f64(args.timeout_minutes.max(0.0) * 60.0);
    let outcome = tokio::time::timeout(timeout, async {
        while let Some(msg) = sub.next().await {
            match bus.subjects().suffix(&msg.subject).unwrap_or_default() {
                s if s == TrainProgress::SUBJECT => {
                    let Some(p) = decode::<TrainProgress>(&msg.payload) else { continue };
                    if p.request_id != Some(request.event_id) {
                        continue;
                    }
                    if json {
                        print_json(&p);
                    } else if let Some(bar) = &bar {
                        bar.set_length(p.steps.max(1));
                        bar.set_position(p.step);
                        bar.set_prefix(format!("{}/{}", p.epoch, p.epochs));
                        bar.set_message(format!("loss {:.4}, {:.0} img/s, {}", p.loss, p.examples_per_sec, p.phase));
                    } else {
                        eprintln!(
                            "epoch {}/{} step {}/{} loss {:.4} {:.0} img/s {}",
                            p.epoch, p.epochs, p.step, p.steps, p.loss, p.examples_per_sec, p.phase
                        );
                    }
                }
                s if s == ModelPublished::SUBJECT => {
                    if let Some(p) = decode::<ModelPublished>(&msg.payload)
                        && p.request_id == Some(request.event_id)
                    {
                        return Ok(p);
                    }
                }
                s if s == TrainFailed::SUBJECT => {
                    if let Some(f) = decode::<TrainFailed>(&msg.payload)
                        && f.request_id == Some(request.event_id)
                        && !f.will_retry
                    {
                        return Err(f);
                    }
                }
                _ => {}
            }
        }
        Err(TrainFailed {
            event_id: EventId::new(),
            run_id: None,
            request_id: Some(request.event_id),
            reason: "subscription closed".into(),
            will_retry: false,
            at: chrono::Utc::now(),
        })
    })
    .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    match outcome {
        Err(_) => Err(CliError::new(
            Exit::Unavailable,
            anyhow!("the run did not finish within {timeout:?} (is a trainer running?)"),
        )),
        Ok(Ok(published)) => {
            if json {
                print_json(&published);
            } else {
                outln!(
                    "Published {}: test accuracy {:.2} %, loss {:.4}; {} ({}).",
                    published.version,
                    published.metrics.accuracy * 100.0,
                    published.metrics.loss,
                    if published.promoted { "now served" } else { "not promoted" },
                    published.promotion
                );
            }
            Ok(Exit::Ok)
        }
        Ok(Err(failed)) => {
            if json {
                print_json(&failed);
            } else {
                eprintln!("Training failed: {}", failed.reason);
            }
            Ok(Exit::Failed)
        }
    }
}
