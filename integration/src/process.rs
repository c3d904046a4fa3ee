//! What a running binary's environment became, as the kernel shows it: for the
//! tests of the per-binary process settings (runtime/src/process.rs), which a
//! binary applies by re-executing itself once.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The first of the images' malloc tunables (runtime's `MALLOC_TUNABLES`).
/// glibc rewrites `GLIBC_TUNABLES` in place as it parses it, so the kernel's
/// copy shows its first tunable only.
pub const FIRST_MALLOC_TUNABLE: &str = "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=67108864";

/// Starts `binary` with NATS unreachable (it keeps retrying, so it stays up),
/// without the process-setting variables except those in `set`, and waits (30 s
/// at most) until its environment in `/proc` has a variable starting with each
/// of `expected`; kills it and returns that environment.
///
/// # Panics
/// When the binary exits or the variables do not appear in time (the message
/// names the environment it had).
#[must_use]
pub fn environment_once_settled(binary: &str, set: &[(&str, &str)], expected: &[&str]) -> Vec<String> {
    let store = tempfile::tempdir().expect("a temporary store");
    let mut child = Command::new(binary)
        .env_remove("OMP_WAIT_POLICY")
        .env_remove("GLIBC_TUNABLES")
        .env_remove("MNISTFLOW_PROCESS_SETTINGS")
        .env("NATS_URL", "nats://127.0.0.1:1")
        .env("NATS_CONNECT_TIMEOUT_SECS", "60")
        .env("STORE_URL", store.path())
        .env("INFERENCE_PORT", "0")
        .env("TRAINER_METRICS_ADDR", "off")
        .envs(set.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
    let path = format!("/proc/{}/environ", child.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    let environment = loop {
        let environment: Vec<String> = std::fs::read(&path)
            .map(|raw| raw.split(|b| *b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect())
            .unwrap_or_default();
        if expected.iter().all(|e| environment.iter().any(|v| v.starts_with(e))) {
            break environment;
        }
        assert!(child.try_wait().ok().flatten().is_none(), "{binary} exited; its environment was {environment:?}");
        assert!(Instant::now() < deadline, "no {expected:?} in {binary}'s environment within 30 s: {environment:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    environment
}
