//! The `trainer` binary: telemetry, configuration, shutdown trigger, then the library's `run`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = mnistflow_nats::runtime::init_tracing("mnistflow-trainer")?;
    let config = mnistflow_trainer::Config::from_env()?;
    let shutdown = mnistflow_nats::runtime::shutdown_token();
    mnistflow_trainer::main_with(config, shutdown).await
}
