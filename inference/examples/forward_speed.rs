//! Throughput of the batched forward pass alone (no HTTP, no preprocessing), in
//! float and under bfloat16 CPU autocast (`INFERENCE_PRECISION`), at several batch
//! sizes and thread counts: the compute limit the HTTP and NATS benchmarks are
//! measured against.
//!
//! ```sh
//! cargo run --release -p mnistflow-inference --example forward_speed -- MODEL.pt
//! ```

use std::time::Instant;

use mnistflow_torch::CpuAutocast;
use tch::{CModule, Device, Kind, Tensor};

fn rate(module: &CModule, bf16: bool, batch: i64) -> anyhow::Result<f64> {
    let _guard = tch::no_grad_guard();
    let _autocast = bf16.then(CpuAutocast::bf16);
    let x = Tensor::rand([batch, 1, 28, 28], (Kind::Float, Device::Cpu));
    for _ in 0..5 {
        let _ = module.forward_ts(&[&x])?;
    }
    let started = Instant::now();
    let mut images = 0;
    while images < 4_000 {
        let out = module.forward_ts(&[&x])?.to_kind(Kind::Float);
        let _ = std::hint::black_box(out);
        images += batch;
    }
    Ok(images as f64 / started.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).ok_or_else(|| anyhow::anyhow!("usage: forward_speed MODEL.pt"))?;
    let module = CModule::load_on_device(&path, Device::Cpu)?;
    println!("CPU has native bf16: {}", mnistflow_torch::cpu_has_native_bf16());
    for threads in [1, 2] {
        tch::set_num_threads(threads);
        for batch in [1, 8, 16, 32, 64] {
            println!(
                "threads {threads} batch {batch:>2}: f32 {:>6.0} images/s, bf16 {:>6.0} images/s",
                rate(&module, false, batch)?,
                rate(&module, true, batch)?
            );
        }
    }
    Ok(())
}
