//! Identifiers carried in payloads.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new UUID v7 (time-ordered) id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// The id of one message; also its JetStream `Nats-Msg-Id`, so a retried
    /// publish of the same event is stored once.
    EventId
);
uuid_id!(
    /// One training run (all its progress events and its outcome share it).
    RunId
);

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }

        impl $name {
            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// A data set, content-addressed: derived from the SHA-256 of its decompressed files,
    /// so downloading identical data again yields the same id.
    DatasetId
);
string_id!(
    /// A model version: `YYYYMMDD-HHMMSS-xxxxxx`, sortable by creation time.
    ModelVersion
);

impl ModelVersion {
    /// A fresh version name from the current UTC time and a random suffix.
    pub fn generate() -> Self {
        let now = chrono::Utc::now();
        let suffix: u32 = rand::random::<u32>() & 0x00ff_ffff;
        Self(format!("{}-{suffix:06x}", now.format("%Y%m%d-%H%M%S")))
    }

    /// Whether a string is safe to use as a version (a path segment of the store).
    pub fn is_valid(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 128
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !s.starts_with('.')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_uuid_v7_and_serialise_as_plain_strings() {
        let id = EventId::new();
        assert_eq!(id.0.get_version_num(), 7);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
    }

    #[test]
    fn generated_versions_sort_by_time_and_are_path_safe() {
        let v = ModelVersion::generate();
        assert!(ModelVersion::is_valid(v.as_str()), "{v}");
        assert!(!ModelVersion::is_valid("../etc"));
        assert!(!ModelVersion::is_valid(""));
    }
}
