//! The `trainer` binary: telemetry, configuration, shutdown trigger, then the library's `run`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if mnistflow_runtime::env::print_env_vars_if_asked(&mnistflow_trainer::Config::env_vars()) {
        return Ok(());
    }
    let _telemetry = mnistflow_runtime::init_tracing("mnistflow-trainer")?;
    let config = mnistflow_trainer::Config::from_env()?;
    let shutdown = mnistflow_runtime::shutdown_token();
    mnistflow_trainer::main_with(config, shutdown).await
}
