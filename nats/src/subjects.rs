//! Every subject of the pipeline. The suffixes are constants here and nowhere
//! else; [`Subjects`] prepends the configured prefix.

/// Command: fetch (or re-announce) the data set. Work queue, consumed by the downloader.
pub const DATASET_DOWNLOAD: &str = "dataset.download";
/// Event: a complete, verified data set is in the store.
pub const DATASET_READY: &str = "dataset.ready";
/// Event: a download failed.
pub const DATASET_FAILED: &str = "dataset.failed";
/// Command: train a model. JetStream work queue, consumed by the trainer.
pub const TRAIN_REQUEST: &str = "train.request";
/// Event: training progress.
pub const TRAIN_PROGRESS: &str = "train.progress";
/// Event: a training run failed or was rejected.
pub const TRAIN_FAILED: &str = "train.failed";
/// Event: a model version was stored (and perhaps promoted).
pub const MODEL_PUBLISHED: &str = "model.published";
/// Command: serve this version (rollback is promotion of an older one).
pub const MODEL_PROMOTE: &str = "model.promote";
/// Event: an inference instance loaded (or refused) a version.
pub const INFERENCE_LOADED: &str = "inference.loaded";
/// Event: a command was rejected and terminated (unreadable, or not carried out), with why.
pub const COMMAND_REJECTED: &str = "command.rejected";
/// Event: a retention pass deleted model versions or old events.
pub const RETENTION_PRUNED: &str = "retention.pruned";
/// Request/reply: classify an image. Core NATS, queue group [`PREDICT_QUEUE_GROUP`].
pub const PREDICT: &str = "predict";
/// Event (JetStream work queue): a person said whether an answer was right.
/// Published by the web tier, consumed by the feedback stage.
pub const FEEDBACK_SUBMITTED: &str = "feedback.submitted";
/// Event: the feedback stage stored a sample; carries the live accuracy of the
/// version it judged.
pub const FEEDBACK_STORED: &str = "feedback.stored";
/// Event: a retention pass of the feedback stage deleted samples older than
/// `FEEDBACK_RETENTION_SECS` from the feedback set.
pub const FEEDBACK_PRUNED: &str = "feedback.pruned";
/// Command (JetStream work queue, the stream of [`FEEDBACK_SUBMITTED`]): delete
/// the sample of one feedback event, at the request of the person who sent it.
/// Published by the web tier, consumed by the feedback stage.
pub const FEEDBACK_DELETE: &str = "feedback.delete";
/// Event: the feedback stage carried out a [`FEEDBACK_DELETE`] (deleted the
/// sample, or found none).
pub const FEEDBACK_DELETED: &str = "feedback.deleted";
/// The queue group inference instances share on [`PREDICT`].
pub const PREDICT_QUEUE_GROUP: &str = "inference";

/// Subjects kept in the events stream (replayable by late subscribers).
pub const EVENT_SUBJECTS: &[&str] = &[
    DATASET_READY,
    DATASET_FAILED,
    TRAIN_PROGRESS,
    TRAIN_FAILED,
    MODEL_PUBLISHED,
    INFERENCE_LOADED,
    FEEDBACK_STORED,
    FEEDBACK_PRUNED,
    FEEDBACK_DELETED,
    COMMAND_REJECTED,
    RETENTION_PRUNED,
];

/// Builds full subject names from the configured prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Self { prefix: crate::config::DEFAULT_PREFIX.to_owned() }
    }
}

impl Subjects {
    /// A prefix is one or more NATS tokens: letters, digits, `-` and `_`, separated by dots.
    ///
    /// # Errors
    /// The prefix is empty or holds a wildcard, whitespace or an empty token.
    pub fn new(prefix: &str) -> Result<Self, String> {
        let ok = !prefix.is_empty()
            && prefix.split('.').all(|token| {
                !token.is_empty() && token.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        if ok {
            Ok(Self { prefix: prefix.to_owned() })
        } else {
            Err(format!("{prefix:?} is not a valid subject prefix (tokens of [A-Za-z0-9_-] joined by dots)"))
        }
    }

    /// The prefix itself (`mnist`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>.<suffix>`.
    pub fn full(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.prefix)
    }

    /// `<prefix>.>`: everything the pipeline says.
    pub fn all(&self) -> String {
        format!("{}.>", self.prefix)
    }

    /// Strips the prefix from a full subject, if it carries it.
    pub fn suffix<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject.strip_prefix(self.prefix.as_str())?.strip_prefix('.')
    }

    /// Stream names are derived from the prefix so that two pipelines can share a server.
    pub fn stream_name(&self, role: &str) -> String {
        let base: String =
            self.prefix.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
        format!("{base}_{role}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_validated() {
        assert!(Subjects::new("mnist").is_ok());
        assert!(Subjects::new("team-a.mnist").is_ok());
        for bad in ["", "mnist.", "mn ist", "mnist.*", "a.>", "a..b"] {
            assert!(Subjects::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn subjects_carry_the_prefix_and_strip_back() {
        let s = Subjects::new("team-a.mnist").unwrap();
        assert_eq!(s.full(TRAIN_REQUEST), "team-a.mnist.train.request");
        assert_eq!(s.suffix("team-a.mnist.train.request"), Some(TRAIN_REQUEST));
        assert_eq!(s.suffix("other.train.request"), None);
        assert_eq!(s.stream_name("EVENTS"), "TEAM_A_MNIST_EVENTS");
    }
}
