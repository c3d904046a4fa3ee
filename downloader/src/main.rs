//! The `downloader` binary: telemetry, configuration, shutdown trigger, then the library.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if mnistflow_runtime::env::print_env_vars_if_asked(&mnistflow_downloader::Config::env_vars()) {
        return Ok(());
    }
    let _telemetry = mnistflow_runtime::init_tracing("mnistflow-downloader")?;
    let config = mnistflow_downloader::Config::from_env()?;
    let shutdown = mnistflow_runtime::shutdown_token();
    mnistflow_downloader::main_with(config, shutdown).await
}
