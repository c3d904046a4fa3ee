//! The bare `inference` binary runs with its image's process settings
//! (`OMP_WAIT_POLICY=PASSIVE`, glibc's malloc tunables: runtime/src/process.rs):
//! it re-executes itself once with them, keeping what the caller set.

use mnistflow_integration::process::{FIRST_MALLOC_TUNABLE, environment_once_settled};

const BINARY: &str = env!("CARGO_BIN_EXE_inference");

#[test]
fn the_bare_binary_runs_with_the_images_openmp_and_malloc_settings() {
    let _ = environment_once_settled(BINARY, &[], &["OMP_WAIT_POLICY=PASSIVE", FIRST_MALLOC_TUNABLE]);
}

#[test]
fn a_setting_the_caller_chose_is_kept() {
    let environment = environment_once_settled(
        BINARY,
        &[("OMP_WAIT_POLICY", "ACTIVE")],
        &["OMP_WAIT_POLICY=ACTIVE", FIRST_MALLOC_TUNABLE],
    );
    assert!(!environment.iter().any(|v| v == "OMP_WAIT_POLICY=PASSIVE"), "{environment:?}");
}
