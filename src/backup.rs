//! `mnistflow backup DIR` and `mnistflow restore DIR`: the JetStream streams and
//! the model store of an installation, copied to a directory and back into an
//! empty installation.
//!
//! ```text
//! DIR/streams/<STREAM>.jsonl   one message per line, in sequence order: subject,
//!                              headers (Nats-Msg-Id and trace context included),
//!                              payload (text, or hex when not UTF-8), time
//! DIR/store/<key>              every object of the store, byte for byte
//! DIR/backup.json              what was copied (counts, keys, sizes, SHA-256);
//!                              written last: a directory without it is no backup
//! ```
//!
//! Order. The backup reads the streams first and the store second: the stages
//! write an artefact before they announce it, so every version an event names is
//! in the copy of the store (the store may hold more, never less). The restore
//! writes the store first, `CURRENT` last, then republishes the messages: a stage
//! already running sees a version only once it is complete, and an event only
//! once the artefact it names is there.
//!
//! What a restore gives back: the same objects, the same messages in the same
//! order with the same headers, so the served version and the event history are
//! the same. Stream sequence numbers and the times JetStream stamps restart in the
//! new installation (the events carry their own times); commands that were still
//! queued at backup time (a training request waiting for the trainer) are queued
//! again and will run. A restore refuses a target that already holds objects or
//! messages, and checks every file against its SHA-256 before writing anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use mnistflow_nats::async_nats::HeaderMap;
use mnistflow_nats::async_nats::jetstream::stream::RawMessageErrorKind;
use mnistflow_nats::{Bus, streams};
use mnistflow_store::{CURRENT_KEY, Store, sha256_hex};
use serde::{Deserialize, Serialize};
use tracing::info;

/// The layout version of a backup directory.
pub const FORMAT: u32 = 1;
const SUMMARY_FILE: &str = "backup.json";

/// `DIR/backup.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub format: u32,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// The store the objects came from (for the person reading it).
    pub store_url: String,
    /// Messages per stream, in the order restored.
    pub streams: BTreeMap<String, u64>,
    pub objects: Vec<Object>,
}

/// One object of the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    pub key: String,
    pub size: u64,
    pub sha256: String,
}

/// One message of a stream, as a line of `streams/<STREAM>.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Line {
    sequence: u64,
    subject: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    payload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    payload_hex: Option<String>,
    time: String,
}

impl Line {
    fn payload(&self) -> anyhow::Result<Bytes> {
        match (&self.payload, &self.payload_hex) {
            (Some(text), None) => Ok(Bytes::from(text.clone().into_bytes())),
            (None, Some(hex)) => Ok(Bytes::from(hex::decode(hex).context("payload_hex")?)),
            (None, None) => Ok(Bytes::new()),
            (Some(_), Some(_)) => bail!("both payload and payload_hex"),
        }
    }
}

/// The full names of the contract's streams.
fn stream_names(bus: &Bus) -> Vec<String> {
    [streams::EVENTS, streams::TRAIN, streams::COMMANDS, streams::FEEDBACK]
        .iter()
        .map(|role| bus.subjects().stream_name(role))
        .collect()
}

/// A key is a relative path of plain segments (no `..`, nothing absolute), so a
/// backup cannot write outside its directory, nor a restore outside the store.
fn safe_relative(key: &str) -> anyhow::Result<PathBuf> {
    let ok = !key.is_empty()
        && key
            .split('/')
            .all(|segment| !segment.is_empty() && segment != "." && segment != ".." && !segment.contains('\\'));
    if !ok {
        bail!("{key:?} is not a plain relative key");
    }
    Ok(PathBuf::from(key))
}

/// Writes `bytes` to `path` through a temporary file renamed into place.
async fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await.with_context(|| format!("creating {}", parent.display()))?;
    }
    let tmp = path.with_extension("partial");
    tokio::fs::write(&tmp, bytes).await.with_context(|| format!("writing {}", tmp.display()))?;
    tokio::fs::rename(&tmp, path).await.with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

/// The name of a dated backup directory: the UTC time, `20261201T031500Z`
/// (names sort in time order).
const DATED_FORMAT: &str = "%Y%m%dT%H%M%SZ";

/// `parent/<UTC time of now>`: where `mnistflow backup --dated PARENT` writes.
#[must_use]
pub fn dated_dir(parent: &Path, now: chrono::DateTime<chrono::Utc>) -> PathBuf {
    parent.join(now.format(DATED_FORMAT).to_string())
}

/// Deletes all but the newest `keep` complete backups in `parent`: only
/// directories named by [`dated_dir`] that hold a `backup.json`. Anything else
/// (an incomplete backup, `lost+found` on a fresh volume, a copy a person put
/// there) is left alone. Returns the directories deleted, oldest first.
///
/// # Errors
/// `keep` is 0 (it would delete the backup just made), or reading `parent` or
/// deleting a directory fails.
pub async fn prune(parent: &Path, keep: usize) -> anyhow::Result<Vec<PathBuf>> {
    if keep == 0 {
        bail!("--keep 0 would delete every backup, the one just made included");
    }
    let mut complete = Vec::new();
    let mut entries = tokio::fs::read_dir(parent).await.with_context(|| format!("reading {}", parent.display()))?;
    while let Some(entry) = entries.next_entry().await.with_context(|| format!("reading {}", parent.display()))? {
        let name = entry.file_name().to_string_lossy().into_owned();
        let dated = chrono::NaiveDateTime::parse_from_str(&name, DATED_FORMAT).is_ok();
        if dated && entry.path().join(SUMMARY_FILE).is_file() {
            complete.push(entry.path());
        }
    }
    complete.sort();
    let old = complete.len().saturating_sub(keep);
    let deleted: Vec<PathBuf> = complete.into_iter().take(old).collect();
    for dir in &deleted {
        tokio::fs::remove_dir_all(dir).await.with_context(|| format!("deleting {}", dir.display()))?;
        info!(dir = %dir.display(), "Old backup deleted.");
    }
    Ok(deleted)
}

/// Copies the streams, then the store, into `dir` (which must not exist or be empty).
///
/// # Errors
/// `dir` is not empty, or reading NATS, the store or writing `dir` fails.
pub async fn backup(bus: &Bus, store: &Store, dir: &Path) -> anyhow::Result<Summary> {
    if dir.exists() && std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.next().is_some() {
        bail!("{} is not empty: a backup goes into a new directory", dir.display());
    }
    let mut counts = BTreeMap::new();
    for name in stream_names(bus) {
        let mut stream = match bus.jetstream().get_stream(&name).await {
            Ok(stream) => stream,
            Err(e) => {
                info!(stream = %name, error = %e, "No such stream; nothing to copy.");
                continue;
            }
        };
        let state = stream.info().await.with_context(|| format!("reading stream {name}"))?.state.clone();
        let mut out = String::new();
        let mut copied = 0u64;
        if state.messages > 0 {
            for sequence in state.first_sequence..=state.last_sequence {
                let message = match stream.get_raw_message(sequence).await {
                    Ok(m) => m,
                    // Deleted or acked (work queues) messages leave gaps.
                    Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => continue,
                    Err(e) => return Err(anyhow!("reading {name} message {sequence}: {e}")),
                };
                let headers = message
                    .headers
                    .iter()
                    .map(|(k, values)| (k.to_string(), values.iter().map(ToString::to_string).collect()))
                    .collect();
                let (payload, payload_hex) = match std::str::from_utf8(&message.payload) {
                    Ok(text) => (Some(text.to_owned()), None),
                    Err(_) => (None, Some(hex::encode(&message.payload))),
                };
                let line = Line {
                    sequence,
                    subject: message.subject.to_string(),
                    headers,
                    payload,
                    payload_hex,
                    time: message.time.to_string(),
                };
                out.push_str(&serde_json::to_string(&line)?);
                out.push('\n');
                copied += 1;
            }
        }
        write_file(&dir.join("streams").join(format!("{name}.jsonl")), out.as_bytes()).await?;
        info!(stream = %name, messages = copied, "Stream copied.");
        counts.insert(name, copied);
    }
    let mut objects = Vec::new();
    for (key, _) in store.keys().await.context("listing the store")? {
        let relative = safe_relative(&key)?;
        let bytes = store.get(&key).await.with_context(|| format!("reading {key}"))?;
        write_file(&dir.join("store").join(relative), &bytes).await?;
        objects.push(Object { key, size: bytes.len() as u64, sha256: sha256_hex(&bytes) });
    }
    info!(objects = objects.len(), "Store copied.");
    let summary = Summary {
        format: FORMAT,
        created_at: chrono::Utc::now(),
        store_url: store.url().to_owned(),
        streams: counts,
        objects,
    };
    write_file(&dir.join(SUMMARY_FILE), serde_json::to_string_pretty(&summary)?.as_bytes()).await?;
    Ok(summary)
}

/// Reads and checks a backup: its summary, every object against its SHA-256.
///
/// # Errors
/// No summary (an incomplete backup), another format, or a file that does not
/// match what the summary says.
pub async fn verify(dir: &Path) -> anyhow::Result<Summary> {
    let path = dir.join(SUMMARY_FILE);
    let text = tokio::fs::read_to_string(&path)
        .await
        .with_context(|| format!("{}: not a complete backup (no {SUMMARY_FILE})", dir.display()))?;
    let summary: Summary = serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))?;
    if summary.format != FORMAT {
        bail!("{}: backup format {}, this build reads {FORMAT}", path.display(), summary.format);
    }
    for object in &summary.objects {
        let file = dir.join("store").join(safe_relative(&object.key)?);
        let bytes = tokio::fs::read(&file).await.with_context(|| format!("reading {}", file.display()))?;
        let actual = sha256_hex(&bytes);
        if actual != object.sha256 {
            bail!("{}: SHA-256 {actual}, the backup recorded {}", file.display(), object.sha256);
        }
    }
    for name in summary.streams.keys() {
        let file = dir.join("streams").join(format!("{name}.jsonl"));
        if !file.is_file() {
            bail!("{} is missing", file.display());
        }
    }
    Ok(summary)
}

async fn check_empty(store: &Store) -> anyhow::Result<()> {
    if let Some((key, _)) = store.keys().await.context("listing the target store")?.first() {
        bail!("the target store {} is not empty (it holds {key}): restore into an empty installation", store.url());
    }
    Ok(())
}

/// Writes every object of the backup into `store`, `CURRENT` last.
async fn write_objects(summary: &Summary, store: &Store, dir: &Path) -> anyhow::Result<()> {
    let (mut rest, current): (Vec<&Object>, Vec<&Object>) = summary.objects.iter().partition(|o| o.key != CURRENT_KEY);
    rest.extend(current);
    for object in rest {
        let bytes = tokio::fs::read(dir.join("store").join(safe_relative(&object.key)?)).await?;
        store.put(&object.key, Bytes::from(bytes)).await.with_context(|| format!("writing {}", object.key))?;
    }
    info!(objects = summary.objects.len(), store = %store.url(), "Store restored.");
    Ok(())
}

/// Restores only the store of `dir` into an empty store: how a store moves to
/// another shape (a volume to a bucket) while NATS stays as it is.
///
/// # Errors
/// The backup does not verify, the target store is not empty, or writing fails.
pub async fn restore_store(store: &Store, dir: &Path) -> anyhow::Result<Summary> {
    let summary = verify(dir).await?;
    check_empty(store).await?;
    write_objects(&summary, store, dir).await?;
    Ok(Summary { streams: BTreeMap::new(), ..summary })
}

/// Restores `dir` into an empty installation: the store (`CURRENT` last), then
/// the messages of each stream in their order, with their headers.
///
/// # Errors
/// The backup does not verify, the target store or streams are not empty, or
/// writing fails.
pub async fn restore(bus: &Bus, store: &Store, dir: &Path) -> anyhow::Result<Summary> {
    let summary = verify(dir).await?;
    check_empty(store).await?;
    bus.ensure_streams().await.context("creating the streams")?;
    for name in summary.streams.keys() {
        let mut stream = bus.jetstream().get_stream(name).await.with_context(|| format!("stream {name}"))?;
        let messages = stream.info().await?.state.messages;
        if messages > 0 {
            bail!("stream {name} already holds {messages} messages: restore into an empty installation");
        }
    }

    let (mut rest, current): (Vec<&Object>, Vec<&Object>) = (
        summary.objects.iter().filter(|o| o.key != CURRENT_KEY).collect(),
        summary.objects.iter().filter(|o| o.key == CURRENT_KEY).collect(),
    );
    rest.extend(current);
    for object in rest {
        let bytes = tokio::fs::read(dir.join("store").join(safe_relative(&object.key)?)).await?;
        store.put(&object.key, Bytes::from(bytes)).await.with_context(|| format!("writing {}", object.key))?;
    }
    info!(objects = summary.objects.len(), store = %store.url(), "Store restored.");

    for (name, expected) in &summary.streams {
        let text = tokio::fs::read_to_string(dir.join("streams").join(format!("{name}.jsonl"))).await?;
        let mut restored = 0u64;
        for (n, raw) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let line: Line = serde_json::from_str(raw).with_context(|| format!("{name}.jsonl line {}", n + 1))?;
            let mut headers = HeaderMap::new();
            for (key, values) in &line.headers {
                for value in values {
                    headers.append(key.as_str(), value.as_str());
                }
            }
            let ack = bus
                .jetstream()
                .publish_with_headers(line.subject.clone(), headers, line.payload()?)
                .await
                .with_context(|| format!("publishing {name} message {}", line.sequence))?
                .await
                .with_context(|| format!("storing {name} message {}", line.sequence))?;
            if ack.stream != *name {
                bail!("{} went to stream {}, not {name}", line.subject, ack.stream);
            }
            restored += 1;
        }
        if restored != *expected {
            bail!("{name}: {restored} messages in the file, the backup recorded {expected}");
        }
        info!(stream = %name, messages = restored, "Stream restored.");
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dated_directory_is_named_by_the_utc_time() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-01T03:15:07+01:00").unwrap().to_utc();
        assert_eq!(dated_dir(Path::new("/backups"), now), Path::new("/backups/20261201T021507Z"));
    }

    #[tokio::test]
    async fn prune_keeps_the_newest_complete_backups_and_touches_nothing_else() {
        let parent = tempfile::tempdir().unwrap();
        let make = |name: &str, complete: bool| {
            let dir = parent.path().join(name);
            std::fs::create_dir_all(dir.join("store")).unwrap();
            if complete {
                std::fs::write(dir.join(SUMMARY_FILE), "{}").unwrap();
            }
        };
        make("20261128T030000Z", true);
        make("20261129T030000Z", true);
        make("20261130T030000Z", false); // a run that failed half-way
        make("20261201T030000Z", true);
        make("20261202T030000Z", true);
        make("lost+found", false);
        make("by-hand", true); // not a dated name: a person's copy

        let deleted = prune(parent.path(), 2).await.unwrap();
        let names = |dirs: &[PathBuf]| -> Vec<String> {
            dirs.iter().map(|d| d.file_name().unwrap().to_string_lossy().into_owned()).collect()
        };
        assert_eq!(names(&deleted), ["20261128T030000Z", "20261129T030000Z"]);
        let mut left: Vec<PathBuf> = std::fs::read_dir(parent.path()).unwrap().map(|e| e.unwrap().path()).collect();
        left.sort();
        assert_eq!(names(&left), ["20261130T030000Z", "20261201T030000Z", "20261202T030000Z", "by-hand", "lost+found"]);
        assert!(prune(parent.path(), 2).await.unwrap().is_empty(), "a second prune deletes nothing");
        assert!(prune(parent.path(), 0).await.is_err(), "--keep 0 is refused");
    }
}
