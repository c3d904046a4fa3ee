//! Reading the environment: one set of parsers every stage's `Config::from_lookup`
//! uses, and the lists of variables each binary reads (`--print-env-vars`, which
//! `k8s/check` compares with the manifests).
//!
//! Every parser reads through a `lookup` function, so tests never touch the
//! process environment, and fails naming the variable. `var`, `var_or`, `flag`,
//! `listen_addr` and [`ConfigError`] are the contract crate's (its `NatsConfig`
//! reads the `NATS_*` variables with them) and are re-exported here so that a
//! stage imports its parsers from one place.

use std::collections::BTreeSet;
use std::fmt::Display;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

pub use mnistflow_nats::config::{ConfigError, flag, listen_addr, var, var_or};

/// Where the store is when `STORE_URL` is unset: a directory under the working directory.
pub const DEFAULT_STORE_URL: &str = ".mnistflow/store";

/// Read by every binary's process set-up ([`crate::logging`]) and by
/// `mnistflow_nats::telemetry`.
pub const PROCESS_VARS: &[&str] = &["RUST_LOG", "LOG_FORMAT", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME"];

/// Read by every binary that opens the store: `STORE_URL`, and for a bucket
/// `object_store`'s own settings (every `AWS_*` or `GOOGLE_*` variable; `*` marks a prefix).
pub const STORE_VARS: &[&str] = &["STORE_URL", "AWS_*", "GOOGLE_*"];

/// The flag that makes a binary print the variables it reads, one a line, and exit.
pub const PRINT_ENV_VARS: &str = "--print-env-vars";

/// `STORE_URL`, trimmed; [`DEFAULT_STORE_URL`] when unset or empty.
pub fn store_url(lookup: &impl Fn(&str) -> Option<String>) -> String {
    lookup("STORE_URL")
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_STORE_URL.into())
}

/// A number that must be greater than zero (a count, a size, a number of
/// milliseconds); `default` when unset.
///
/// # Errors
/// The value does not parse, or it is zero or negative.
pub fn positive<T>(lookup: &impl Fn(&str) -> Option<String>, name: &str, default: T) -> Result<T, ConfigError>
where
    T: FromStr + PartialOrd + Default + Copy,
    T::Err: Display,
{
    let value = var_or(lookup, name, default)?;
    if value > T::default() { Ok(value) } else { Err(ConfigError::new(name, "must be at least 1")) }
}

/// A duration in (fractional) seconds that must be positive and finite; `default` when unset.
///
/// # Errors
/// The value does not parse, or it is not a positive number.
pub fn positive_secs(
    lookup: &impl Fn(&str) -> Option<String>,
    name: &str,
    default: f64,
) -> Result<Duration, ConfigError> {
    let secs: f64 = var_or(lookup, name, default)?;
    if !(secs.is_finite() && secs > 0.0) {
        return Err(ConfigError::new(name, "must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The variables a binary reads: the lists given, in order, without repeats.
pub fn env_vars(lists: &[&[&'static str]]) -> Vec<&'static str> {
    let mut seen = BTreeSet::new();
    lists.iter().flat_map(|l| l.iter().copied()).filter(|v| seen.insert(*v)).collect()
}

/// When the binary was started with [`PRINT_ENV_VARS`] as its only argument,
/// prints `vars` one a line and returns true (`main` then returns).
pub fn print_env_vars_if_asked(vars: &[&str]) -> bool {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some(PRINT_ENV_VARS) || args.next().is_some() {
        return false;
    }
    for v in vars {
        println!("{v}");
    }
    true
}

/// The names `read` asks for through the lookup it is handed (which answers
/// `None`, or `values`' value): what a `Config::from_lookup` really reads, for
/// tests that compare it with the binary's list.
pub fn names_read(values: &[(&str, &str)], read: impl FnOnce(&dyn Fn(&str) -> Option<String>)) -> BTreeSet<String> {
    let asked = Mutex::new(BTreeSet::new());
    let lookup = |key: &str| {
        asked.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(key.to_owned());
        values.iter().find(|(k, _)| *k == key).map(|(_, v)| (*v).to_owned())
    };
    read(&lookup);
    asked.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Checks that a stage's `list` names exactly what `from_lookup` reads (given
/// `values`; the shared lists, whose variables are read elsewhere, may go
/// unread), for the stages' unit tests.
///
/// # Panics
/// A variable is read but not listed, or listed (outside the shared lists) but not read.
pub fn assert_lists_exactly(
    list: &[&str],
    values: &[(&str, &str)],
    read: impl FnOnce(&dyn Fn(&str) -> Option<String>),
) {
    let asked = names_read(values, read);
    let unlisted: Vec<_> = asked.iter().filter(|n| !list.contains(&n.as_str())).collect();
    assert!(unlisted.is_empty(), "read but not listed: {unlisted:?}");
    let shared: BTreeSet<&str> = PROCESS_VARS.iter().chain(STORE_VARS).copied().collect();
    let unread: Vec<_> =
        list.iter().filter(|n| !asked.contains(**n) && !shared.contains(**n) && **n != "STORE_URL").collect();
    assert!(unread.is_empty(), "listed but never read: {unread:?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
    }

    #[test]
    fn positive_numbers_refuse_zero_and_negatives_naming_the_variable() {
        assert_eq!(positive(&lookup(&[]), "N", 7u64).unwrap(), 7);
        assert_eq!(positive(&lookup(&[("N", " 3 ")]), "N", 7u64).unwrap(), 3);
        assert_eq!(positive(&lookup(&[("N", "0")]), "N", 7u64).unwrap_err().var, "N");
        assert_eq!(positive(&lookup(&[("N", "-1")]), "N", 7i64).unwrap_err().var, "N");
        assert_eq!(positive(&lookup(&[("N", "x")]), "N", 7u64).unwrap_err().var, "N");
    }

    #[test]
    fn seconds_must_be_positive_and_finite() {
        assert_eq!(positive_secs(&lookup(&[("S", "2.5")]), "S", 1.0).unwrap(), Duration::from_millis(2500));
        assert_eq!(positive_secs(&lookup(&[]), "S", 1.0).unwrap(), Duration::from_secs(1));
        for bad in ["0", "-1", "inf", "NaN", "soon"] {
            let pairs: &'static [(&str, &str)] = Box::leak(Box::new([("S", bad)]));
            assert_eq!(positive_secs(&lookup(pairs), "S", 1.0).unwrap_err().var, "S", "{bad}");
        }
    }

    #[test]
    fn the_store_url_defaults_to_a_local_directory() {
        assert_eq!(store_url(&lookup(&[])), DEFAULT_STORE_URL);
        assert_eq!(store_url(&lookup(&[("STORE_URL", " ")])), DEFAULT_STORE_URL);
        assert_eq!(store_url(&lookup(&[("STORE_URL", " s3://b/p ")])), "s3://b/p");
    }

    #[test]
    fn lists_are_joined_without_repeats_and_reads_are_recorded() {
        assert_eq!(env_vars(&[&["A", "B"], &["B", "C"]]), ["A", "B", "C"]);
        let read = names_read(&[("A", "1")], |l| {
            assert_eq!(l("A").as_deref(), Some("1"));
            assert_eq!(l("B"), None);
        });
        assert_eq!(read.into_iter().collect::<Vec<_>>(), ["A", "B"]);
    }

    #[test]
    #[should_panic(expected = "read but not listed")]
    fn a_read_missing_from_the_list_is_caught() {
        assert_lists_exactly(&["A"], &[], |l| {
            l("A");
            l("B");
        });
    }

    #[test]
    #[should_panic(expected = "listed but never read")]
    fn a_listed_name_nobody_reads_is_caught() {
        assert_lists_exactly(&["A", "B"], &[], |l| {
            l("A");
        });
    }
}
