//! What every mnistflow binary does the same way, so that a stage's `main.rs`
//! and `lib.rs` read as its own logic. Not the wire contract (that is
//! `mnistflow-nats`); this crate sits on top of it.
//!
//! - [`env`]: environment parsers for `Config::from_lookup` (`var`, `flag`,
//!   positive numbers and seconds, listen addresses, `STORE_URL`) and the lists
//!   of variables each binary reads (`--print-env-vars`).
//! - [`logging`]: tracing, set up once first in `main` (JSON or plain, `RUST_LOG`, OTLP export).
//! - [`signal`]: the one shutdown token per process, cancelled by SIGTERM or SIGINT.
//! - [`http`]: the Rocket start-up (release defaults, no `ROCKET_*`, our address,
//!   graceful stop, the bound address) and the `/metrics` answer.
//! - [`process`]: per-binary process settings (glibc malloc, OpenMP wait
//!   policy) applied before the libraries that read them start.

pub mod env;
pub mod http;
pub mod logging;
pub mod process;
pub mod signal;

pub use env::ConfigError;
pub use logging::{init_tracing, init_tracing_from_lookup, init_tracing_with_default};
pub use signal::shutdown_token;
