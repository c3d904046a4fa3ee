//! The `web` binary: telemetry, configuration, shutdown trigger, then the library's `run`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if mnistflow_runtime::env::print_env_vars_if_asked(&mnistflow_web::Config::env_vars()) {
        return Ok(());
    }
    // Rocket logs every request at info; its warnings and errors are what matter.
    let _telemetry = mnistflow_runtime::init_tracing_with_default("mnistflow-web", "info,rocket=warn")?;
    let config = mnistflow_web::Config::from_env()?;
    let shutdown = mnistflow_runtime::shutdown_token();
    mnistflow_web::main_with(config, shutdown).await
}
