//! The `inference` binary: the image's process settings (re-executing once,
//! before any thread starts), telemetry, configuration, a runtime with
//! `INFERENCE_WORKERS` threads, the shutdown trigger, then the library.

fn main() -> anyhow::Result<()> {
    if mnistflow_runtime::env::print_env_vars_if_asked(&mnistflow_inference::Config::env_vars()) {
        return Ok(());
    }
    let applied = mnistflow_runtime::process::apply(mnistflow_runtime::process::INFERENCE);
    let _telemetry = mnistflow_runtime::init_tracing("mnistflow-inference")?;
    mnistflow_runtime::process::log(&applied);
    let config = mnistflow_inference::Config::from_env()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers)
        .thread_name("inference-worker")
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let shutdown = mnistflow_runtime::shutdown_token();
        mnistflow_inference::main_with(config, shutdown).await
    })
}
