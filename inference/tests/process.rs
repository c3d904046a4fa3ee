//! The bare `inference` binary runs with its image's process settings
//! (`OMP_WAIT_POLICY=PASSIVE`, glibc's malloc tunables: runtime/src/process.rs):
//! it re-executes itself once with them, keeping what the caller set.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The first of the image's malloc tunables (runtime's `MALLOC_TUNABLES`).
const FIRST_TUNABLE: &str = "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=67108864";

/// Starts the binary (NATS unreachable: it keeps retrying, so it stays up) and
/// waits (30 s at most) until its environment, as the kernel shows it, has a
/// variable starting with each of `expected`; returns that environment. (glibc
/// rewrites `GLIBC_TUNABLES` in place as it parses it, so the kernel's copy
/// shows its first tunable only.)
fn environment_once_settled(set: &[(&str, &str)], expected: &[String]) -> Vec<String> {
    let store = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_inference"))
        .env_remove("OMP_WAIT_POLICY")
        .env_remove("GLIBC_TUNABLES")
        .env_remove("MNISTFLOW_PROCESS_SETTINGS")
        .env("NATS_URL", "nats://127.0.0.1:1")
        .env("NATS_CONNECT_TIMEOUT_SECS", "60")
        .env("STORE_URL", store.path())
        .env("INFERENCE_PORT", "0")
        .envs(set.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let path = format!("/proc/{}/environ", child.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    let environment = loop {
        let environment: Vec<String> = std::fs::read(&path)
            .map(|raw| raw.split(|b| *b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect())
            .unwrap_or_default();
        if expected.iter().all(|e| environment.iter().any(|v| v.starts_with(e.as_str()))) {
            break environment;
        }
        assert!(child.try_wait().unwrap().is_none(), "the binary exited; its environment was {environment:?}");
        assert!(Instant::now() < deadline, "no {expected:?} in the binary's environment within 30 s: {environment:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    environment
}

#[test]
fn the_bare_binary_runs_with_the_images_openmp_and_malloc_settings() {
    environment_once_settled(&[], &["OMP_WAIT_POLICY=PASSIVE".to_owned(), FIRST_TUNABLE.to_owned()]);
}

#[test]
fn a_setting_the_caller_chose_is_kept() {
    let environment = environment_once_settled(
        &[("OMP_WAIT_POLICY", "ACTIVE")],
        &["OMP_WAIT_POLICY=ACTIVE".to_owned(), FIRST_TUNABLE.to_owned()],
    );
    assert!(!environment.iter().any(|v| v == "OMP_WAIT_POLICY=PASSIVE"), "{environment:?}");
}
