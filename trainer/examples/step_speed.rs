//! Measures the training step and evaluation throughput of the seed CNN in float
//! and in bfloat16 mixed precision (experiments behind the default settings).
//!
//! ```sh
//! cargo run --release -p mnistflow-trainer --example step_speed [steps] [batch]
//! ```
//! Prints images/s by wall clock and per CPU-second (the latter stays meaningful
//! while other processes share the machine).

use std::time::Instant;

use mnistflow_trainer::model::Net;
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};

fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let steps: i64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(100);
    let batch: i64 = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(64);
    let images = Tensor::rand([steps * batch, 1, 28, 28], (Kind::Float, Device::Cpu));
    let labels = Tensor::randint(10, [steps * batch], (Kind::Int64, Device::Cpu));
    for threads in [2, 1] {
        tch::set_num_threads(threads);
        for kind in [Kind::Float, Kind::BFloat16] {
            let vs = nn::VarStore::new(Device::Cpu);
            let net = Net::new(&vs.root());
            let mut opt = nn::Adam::default().build(&vs, 1e-3).unwrap();
            let run = |n: i64, opt: &mut nn::Optimizer| {
                for s in 0..n {
                    let xs = images.narrow(0, s * batch, batch);
                    let ys = labels.narrow(0, s * batch, batch);
                    let out =
                        if kind == Kind::Float { net.forward_t(&xs, true) } else { net.forward_mixed(&xs, true, kind) };
                    let loss = out.nll_loss(&ys);
                    opt.backward_step(&loss);
                }
            };
            run(5, &mut opt);
            let (t, c) = (Instant::now(), cpu_secs());
            run(steps, &mut opt);
            let wall = t.elapsed().as_secs_f64();
            let cpu = cpu_secs() - c;
            let n = (steps * batch) as f64;
            println!(
                "train {threads} thread(s) {kind:?}: {:.0} img/s wall, {:.0} img/s per CPU-second",
                n / wall,
                n / cpu.max(1e-9)
            );
            let _g = tch::no_grad_guard();
            let (t, c) = (Instant::now(), cpu_secs());
            for s in 0..(steps * batch / 1000).max(1) {
                let xs = images.narrow(0, s * 1000, 1000.min(steps * batch));
                let _ =
                    if kind == Kind::Float { net.forward_t(&xs, false) } else { net.forward_mixed(&xs, false, kind) };
            }
            let n = ((steps * batch / 1000).max(1) * 1000.min(steps * batch)) as f64;
            println!(
                "eval  {threads} thread(s) {kind:?}: {:.0} img/s wall, {:.0} img/s per CPU-second",
                n / t.elapsed().as_secs_f64(),
                n / (cpu_secs() - c).max(1e-9)
            );
        }
    }
}
