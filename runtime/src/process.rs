//! Per-binary process settings that glibc and libgomp read only when the
//! process starts, so that a bare binary (or `mnistflow up`) runs as its
//! container image does. They cannot be changed from inside a running process
//! (glibc reads `GLIBC_TUNABLES` at load; libgomp reads `OMP_WAIT_POLICY` when it
//! initialises, and `mallopt` would need `unsafe`, which the workspace forbids),
//! so [`apply`] re-executes the binary once, with the same arguments, and the
//! variables that are unset added. A variable the user set is left alone.
//! Call it first in `main`, before any thread starts.

use std::ffi::OsString;

/// glibc's malloc as the inference image sets it: buffers of up to 64 MiB stay
/// in the heap (not mmapped and unmapped per batch), free memory is returned
/// only above 256 MiB, and two arenas instead of eight per core.
pub const MALLOC_TUNABLES: &str =
    "glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=268435456:glibc.malloc.arena_max=2";

/// The inference binary: OpenMP threads sleep between forward passes (leaving
/// the CPUs to the HTTP workers) and the image's malloc settings.
pub const INFERENCE: &[(&str, &str)] = &[("OMP_WAIT_POLICY", "PASSIVE"), ("GLIBC_TUNABLES", MALLOC_TUNABLES)];

/// The trainer binary: the malloc settings only. Without them every training
/// step maps and unmaps its activation buffers (each over glibc's default
/// threshold) and faults their pages in again: 1.92 million minor page faults
/// in 200 steps against 93 thousand with them (`scripts/bench-trainer`, AVX2,
/// f32), as the seed's PyTorch script pays too (2.47 million). The passive wait
/// policy slowed training, so OpenMP keeps its default.
pub const TRAINER: &[(&str, &str)] = &[("GLIBC_TUNABLES", MALLOC_TUNABLES)];

/// `mnistflow up`, which trains and serves in one OpenMP runtime: the malloc
/// settings only (the passive wait policy slowed training).
pub const UP: &[(&str, &str)] = &[("GLIBC_TUNABLES", MALLOC_TUNABLES)];

/// Set in the re-executed process, so it never re-executes again.
const APPLIED: &str = "MNISTFLOW_PROCESS_SETTINGS";

/// What [`apply`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// Every variable was already set (by the user, the image, or our re-execution).
    AlreadySet,
    /// The re-execution failed; the process runs on without the settings.
    Failed(String),
}

/// Re-executes the running binary with `settings`' unset variables set, unless
/// all are set already or it has done so once. Returns only when it did not
/// re-execute (see [`Applied`]); log the outcome once tracing is up.
pub fn apply(settings: &[(&str, &str)]) -> Applied {
    let missing: Vec<_> = settings.iter().filter(|(k, _)| std::env::var_os(k).is_none()).collect();
    if missing.is_empty() || std::env::var_os(APPLIED).is_some() {
        return Applied::AlreadySet;
    }
    reexec(&missing)
}

#[cfg(unix)]
fn reexec(missing: &[&(&str, &str)]) -> Applied {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return Applied::Failed(format!("cannot find the running binary: {e}")),
    };
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut command = std::process::Command::new(&exe);
    command.args(args).env(APPLIED, "1");
    for (k, v) in missing {
        command.env(k, v);
    }
    // Only returns on failure.
    let e = command.exec();
    Applied::Failed(format!("cannot re-execute {}: {e}", exe.display()))
}

#[cfg(not(unix))]
fn reexec(_missing: &[&(&str, &str)]) -> Applied {
    Applied::Failed("re-executing is implemented on Unix only".into())
}

/// Logs what [`apply`] returned (call it once tracing is set up).
pub fn log(applied: &Applied) {
    if let Applied::Failed(why) = applied {
        tracing::warn!(error = %why, "Running without the process settings of the image.");
    }
}
