//! The bare `trainer` binary runs with its image's malloc settings
//! (runtime/src/process.rs, `TRAINER`): it re-executes itself once with them. It
//! leaves OpenMP's wait policy alone (the passive policy slowed training).

use mnistflow_integration::process::{FIRST_MALLOC_TUNABLE, environment_once_settled};

#[test]
fn the_bare_binary_runs_with_the_images_malloc_settings_and_openmps_default_wait() {
    let environment = environment_once_settled(env!("CARGO_BIN_EXE_trainer"), &[], &[FIRST_MALLOC_TUNABLE]);
    assert!(!environment.iter().any(|v| v.starts_with("OMP_WAIT_POLICY=")), "{environment:?}");
}
