//! The `web` binary: telemetry, configuration, shutdown trigger, then the library's `run`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Rocket logs every request at info; its warnings and errors are what matter.
    let _telemetry = mnistflow_nats::runtime::init_tracing_with_default("mnistflow-web", "info,rocket=warn")?;
    let config = mnistflow_web::Config::from_env()?;
    let shutdown = mnistflow_nats::runtime::shutdown_token();
    mnistflow_web::main_with(config, shutdown).await
}
