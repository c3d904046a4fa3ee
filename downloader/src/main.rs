//! The `downloader` binary: telemetry, configuration, shutdown trigger, then the library.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = mnistflow_nats::runtime::init_tracing("mnistflow-downloader")?;
    let config = mnistflow_downloader::Config::from_env()?;
    let shutdown = mnistflow_nats::runtime::shutdown_token();
    mnistflow_downloader::main_with(config, shutdown).await
}
