//! The `feedback` binary: telemetry, configuration, shutdown trigger, then the library.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if mnistflow_runtime::env::print_env_vars_if_asked(&mnistflow_feedback::Config::env_vars()) {
        return Ok(());
    }
    let _telemetry = mnistflow_runtime::init_tracing("mnistflow-feedback")?;
    let config = mnistflow_feedback::Config::from_env()?;
    let shutdown = mnistflow_runtime::shutdown_token();
    mnistflow_feedback::main_with(config, shutdown).await
}
