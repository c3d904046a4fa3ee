//! The `feedback` binary: telemetry, configuration, shutdown trigger, then the library.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = mnistflow_nats::runtime::init_tracing_with_default("mnistflow-feedback", "info,rocket=warn")?;
    let config = mnistflow_feedback::Config::from_env()?;
    let shutdown = mnistflow_nats::runtime::shutdown_token();
    mnistflow_feedback::main_with(config, shutdown).await
}
