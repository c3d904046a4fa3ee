//! Schema versions of the messages on NATS (docs/nats.md, "Versions").
//!
//! Every event and command carries `schema_version`; a message without one is
//! version 1, the unversioned format of the first release (recorded in
//! `nats/tests/compat/v1`). This release writes [`SCHEMA_VERSION`] and reads every
//! version from [`OLDEST_READABLE`] up to it; anything else (a newer version, an
//! unreadable payload) is a [`DecodeError`] naming what was found and what this
//! release reads, which the consuming stage answers with an event (and a work
//! queue terminates the command), never a crash.
//!
//! Version 2 is version 1 plus the field itself: a version-1 reader ignores the
//! unknown field and reads it as before (`nats/tests/compat.rs` checks it with a
//! frozen copy of the version-1 types). The number is bumped only for a change
//! an older reader would misread; a compatible change (a new optional field that
//! an older reader may safely ignore) keeps it.

use serde::Serialize;

use crate::events::Message;
use crate::ids::EventId;

/// The version this release writes.
pub const SCHEMA_VERSION: u32 = 2;
/// The oldest version this release still reads (the previous one).
pub const OLDEST_READABLE: u32 = 1;
/// The JSON key that carries the version.
pub const FIELD: &str = "schema_version";

/// Why a payload could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload is not JSON, or not the fields `subject` needs.
    #[error("{subject}: {message}")]
    Invalid { subject: &'static str, message: String },
    /// Written by a newer release: this one cannot know what it means.
    #[error(
        "{subject} carries schema version {found}; this release reads versions {OLDEST_READABLE} to \
         {SCHEMA_VERSION} (upgrade this stage)"
    )]
    TooNew { subject: &'static str, found: u64 },
    /// Older than the previous version (no stage of this release writes it).
    #[error(
        "{subject} carries schema version {found}; this release reads versions {OLDEST_READABLE} to \
         {SCHEMA_VERSION} (the sender is too old)"
    )]
    TooOld { subject: &'static str, found: u64 },
    /// `schema_version` is there but not a positive integer.
    #[error("{subject}: schema_version must be a positive integer, not {found}")]
    BadVersion { subject: &'static str, found: String },
}

/// The version a payload declares: its `schema_version`, or 1 when it has none.
///
/// # Errors
/// [`DecodeError::BadVersion`] when the field is not a positive integer.
pub fn version_of(subject: &'static str, value: &serde_json::Value) -> Result<u64, DecodeError> {
    match value.get(FIELD) {
        None => Ok(1),
        Some(v) => {
            v.as_u64().filter(|n| *n >= 1).ok_or_else(|| DecodeError::BadVersion { subject, found: v.to_string() })
        }
    }
}

/// Checks the version `value` declares is one this release reads.
///
/// # Errors
/// As [`version_of`], or [`DecodeError::TooNew`] / [`DecodeError::TooOld`].
pub fn check(subject: &'static str, value: &serde_json::Value) -> Result<u64, DecodeError> {
    let found = version_of(subject, value)?;
    if found > u64::from(SCHEMA_VERSION) {
        Err(DecodeError::TooNew { subject, found })
    } else if found < u64::from(OLDEST_READABLE) {
        Err(DecodeError::TooOld { subject, found })
    } else {
        Ok(found)
    }
}

/// A message as written: its version first, then its fields.
#[derive(Serialize)]
struct Versioned<'a, M> {
    schema_version: u32,
    #[serde(flatten)]
    message: &'a M,
}

/// The payload of `message` in this release's format ([`SCHEMA_VERSION`]).
///
/// # Errors
/// The message does not serialise (not expected of this crate's types).
pub fn encode<M: Message>(message: &M) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&Versioned { schema_version: SCHEMA_VERSION, message })
}

/// Reads a payload of any version this release reads.
///
/// # Errors
/// [`DecodeError`]: not JSON, an unreadable version, or fields that do not fit `M`.
pub fn decode<M: Message>(raw: &[u8]) -> Result<M, DecodeError> {
    let value: serde_json::Value = serde_json::from_slice(raw).map_err(|e| invalid::<M>(&e))?;
    decode_value(value)
}

/// [`decode`] of a parsed payload.
///
/// # Errors
/// As [`decode`].
pub fn decode_value<M: Message>(value: serde_json::Value) -> Result<M, DecodeError> {
    check(M::SUBJECT, &value)?;
    serde_json::from_value(value).map_err(|e| invalid::<M>(&e))
}

/// The `event_id` a payload names, if it names a valid one: how a stage that
/// cannot read a command still answers it with the id its sender waits for.
pub fn event_id_of(raw: &[u8]) -> Option<EventId> {
    let value: serde_json::Value = serde_json::from_slice(raw).ok()?;
    serde_json::from_value(value.get("event_id")?.clone()).ok()
}

/// The version a raw payload declares, if it is JSON with a well-formed one.
pub fn raw_version(raw: &[u8]) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(raw).ok()?;
    version_of("", &value).ok()
}

fn invalid<M: Message>(e: &serde_json::Error) -> DecodeError {
    DecodeError::Invalid { subject: M::SUBJECT, message: e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{ModelPromote, TrainRequest};

    #[test]
    fn a_message_is_written_with_its_version_first_and_read_back() {
        let request = TrainRequest { epochs: Some(2), ..Default::default() };
        let raw = encode(&request).unwrap();
        assert!(raw.starts_with(b"{\"schema_version\":2,\"event_id\":"), "{}", String::from_utf8_lossy(&raw));
        assert_eq!(decode::<TrainRequest>(&raw).unwrap(), request);
    }

    #[test]
    fn versions_one_and_two_are_read_and_others_are_refused_with_what_was_found() {
        let v = |body: &str| decode::<ModelPromote>(body.as_bytes());
        assert!(v(r#"{"version":"20261130-050000-abcdef"}"#).is_ok(), "no version is version 1");
        assert!(v(r#"{"schema_version":1,"version":"20261130-050000-abcdef"}"#).is_ok());
        assert!(v(r#"{"schema_version":2,"version":"20261130-050000-abcdef"}"#).is_ok());
        let too_new = v(r#"{"schema_version":3,"version":"20261130-050000-abcdef"}"#).unwrap_err();
        assert_eq!(too_new, DecodeError::TooNew { subject: "model.promote", found: 3 });
        assert!(too_new.to_string().contains("schema version 3; this release reads versions 1 to 2"), "{too_new}");
        for bad in ["0", "-1", "\"2\"", "1.5", "null"] {
            let body = format!(r#"{{"schema_version":{bad},"version":"20261130-050000-abcdef"}}"#);
            assert!(matches!(v(&body), Err(DecodeError::BadVersion { .. })), "{bad} accepted");
        }
        assert!(matches!(v("not json"), Err(DecodeError::Invalid { .. })));
        assert!(matches!(v(r#"{"schema_version":2}"#), Err(DecodeError::Invalid { .. })));
    }

    #[test]
    fn an_unreadable_command_still_yields_its_id_and_version() {
        let raw = br#"{"schema_version":9,"event_id":"01a22f3e-0000-7000-8000-000000000000","new":{}}"#;
        assert_eq!(event_id_of(raw).unwrap().to_string(), "01a22f3e-0000-7000-8000-000000000000");
        assert_eq!(raw_version(raw), Some(9));
        assert_eq!(event_id_of(b"nope"), None);
        assert_eq!(raw_version(b"{}"), Some(1));
    }
}
