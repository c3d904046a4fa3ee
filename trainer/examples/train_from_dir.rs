//! Trains from a directory of MNIST `.gz` files without NATS or a store, printing
//! progress, the test metrics and the time of each phase (experiments, profiling).
//!
//! ```sh
//! cargo run --release -p mnistflow-trainer --example train_from_dir -- '{"max_train_examples":6000}' [threads]
//! ```
//! The first argument is a train request (JSON); the MNIST directory is
//! `MNIST_DIR` or `../shared/mnist`.

use std::time::Instant;

use mnistflow_nats::TrainRequest;
use mnistflow_trainer::config::TrainDefaults;
use mnistflow_trainer::data::{Mnist, RawMnist};
use mnistflow_trainer::params::DeviceChoice;
use mnistflow_trainer::train::{self, Control};
use mnistflow_trainer::{Hyperparameters, Preset};

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut args = std::env::args().skip(1);
    let request: TrainRequest = serde_json::from_str(&args.next().unwrap_or_else(|| "{}".into()))?;
    if let Some(threads) = args.next() {
        tch::set_num_threads(threads.parse()?);
    }
    println!("libtorch threads: {}", tch::get_num_threads());
    let dir = std::env::var("MNIST_DIR").unwrap_or_else(|_| "../shared/mnist".into());
    let mut default_preset = Preset::default_preset();
    // LABEL_SMOOTHING=x overrides the default preset's (experiments).
    if let Ok(v) = std::env::var("LABEL_SMOOTHING") {
        default_preset.label_smoothing = v.parse()?;
    }
    // WARMUP=x: the one-cycle schedule's warm-up fraction.
    if let Ok(v) = std::env::var("WARMUP") {
        default_preset.schedule = mnistflow_trainer::params::Schedule::OneCycle { warmup: v.parse()? };
    }
    let defaults = TrainDefaults {
        default_preset,
        seed: 1,
        device: DeviceChoice::Auto,
        max_minutes: None,
        // PRECISION=bf16 trains in bfloat16 mixed precision.
        precision: std::env::var("PRECISION").ok().map(|p| p.parse()).transpose().map_err(anyhow::Error::msg)?,
    };
    let hp = Hyperparameters::resolve(&request, &defaults)?;
    let device = hp.device.resolve().map_err(anyhow::Error::msg)?;
    println!("hyperparameters: {}", serde_json::to_string(&hp)?);

    let t = Instant::now();
    let data = Mnist::decode(&RawMnist::from_dir(dir.as_ref())?)?.to_device(device)?;
    println!("data decoded in {:.2} s", t.elapsed().as_secs_f64());

    let mut trained = train::train(&data, &hp, device, &Control::default(), &mut |p| {
        println!(
            "epoch {}/{} step {}/{} loss {:.4} {:.0} img/s eta {:.0} s",
            p.epoch,
            p.epochs,
            p.step,
            p.steps,
            p.loss,
            p.examples_per_sec,
            p.eta_secs.unwrap_or(0.0)
        );
    })?;
    println!("trained in {:.1} s ({:.0} img/s)", trained.stats.train_secs, trained.stats.examples_per_sec);

    let t = Instant::now();
    let metrics = train::evaluate(&trained.net, &data.test_images, &data.test_labels)?;
    println!(
        "evaluated in {:.2} s: accuracy {:.4} loss {:.4}",
        t.elapsed().as_secs_f64(),
        metrics.accuracy,
        metrics.loss
    );

    let t = Instant::now();
    let check = data.test_sample(16)?;
    let bytes = train::export_torchscript(&mut trained, &check)?;
    println!("exported {} bytes in {:.2} s", bytes.len(), t.elapsed().as_secs_f64());
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
