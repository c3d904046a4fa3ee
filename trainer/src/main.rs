//! The `trainer` binary: the image's process settings (re-executing once,
//! before any thread starts), telemetry, configuration, shutdown trigger, then
//! the library's `run`.

fn main() -> anyhow::Result<()> {
    if mnistflow_runtime::env::print_env_vars_if_asked(&mnistflow_trainer::Config::env_vars()) {
        return Ok(());
    }
    let applied = mnistflow_runtime::process::apply(mnistflow_runtime::process::TRAINER);
    let _telemetry = mnistflow_runtime::init_tracing("mnistflow-trainer")?;
    mnistflow_runtime::process::log(&applied);
    let config = mnistflow_trainer::Config::from_env()?;
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async move {
        let shutdown = mnistflow_runtime::shutdown_token();
        mnistflow_trainer::main_with(config, shutdown).await
    })
}
