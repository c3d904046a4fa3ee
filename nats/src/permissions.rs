//! Least privilege on NATS: what this crate does for a client whose identity may
//! not do everything.
//!
//! Each stage connects as its own user (k8s/base/nats.conf lists them with their
//! allow-lists). The server does not fail a refused publish or subscription in
//! the client's call: it drops it and says so in an asynchronous `-ERR
//! 'Permissions Violation for Publish to "…"'`. [`Violations`] turns those into
//! one clear error line each (the identity, the subject, what was refused) and
//! remembers the last ones, so [`crate::Bus::publish`] fails at once with
//! "permission denied" instead of retrying an acknowledgement that never comes.
//!
//! Replies travel on a per-identity inbox prefix ([`inbox_prefix`]), so one
//! identity may subscribe only to its own replies, never to another's.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tracing::error;

/// How many refused subjects are remembered (bounded: a misconfigured stage may
/// be refused on every message).
const REMEMBERED: usize = 32;

/// The inbox prefix of NATS user `user`: `_INBOX_<identity>`, the identity being
/// the name up to its first `.` when that is one subject token, else the
/// client's default `_INBOX` (no user: no permissions to fit). A second user of
/// one identity during a password rotation (`web.next` beside `web`,
/// k8s/base/nats.conf) thus reads its replies where the identity may.
pub fn inbox_prefix(user: Option<&str>) -> String {
    let identity = user.map(|u| u.split('.').next().unwrap_or_default());
    match identity {
        Some(u) if !u.is_empty() && u.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') => {
            format!("_INBOX_{u}")
        }
        _ => "_INBOX".to_owned(),
    }
}

/// The permission violations the server reported to this connection.
#[derive(Debug, Clone)]
pub struct Violations {
    user: Arc<str>,
    recent: Arc<Mutex<VecDeque<(u64, String)>>>,
    count: Arc<watch::Sender<u64>>,
}

impl Violations {
    pub(crate) fn new(user: Option<&str>) -> Self {
        Self { user: user.unwrap_or("(no user)").into(), recent: Arc::default(), count: Arc::new(watch::channel(0).0) }
    }

    /// Handles a server `-ERR`; true when it was a permission violation (logged
    /// at error level, remembered).
    pub(crate) fn report(&self, server_error: &str) -> bool {
        if !server_error.to_ascii_lowercase().contains("permissions violation") {
            return false;
        }
        error!(
            nats_user = %self.user,
            error = %server_error,
            "NATS refused an operation this identity is not allowed (k8s/base/nats.conf lists each user's \
             permissions); the message or subscription was dropped."
        );
        let mut recent = self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if recent.len() == REMEMBERED {
            recent.pop_front();
        }
        let seq = *self.count.borrow() + 1;
        recent.push_back((seq, server_error.to_owned()));
        drop(recent);
        self.count.send_replace(seq);
        true
    }

    /// Waits for the refusal of a publish to `subject` reported after violation
    /// number `after` (from [`Violations::count`]); pending forever if none comes.
    pub(crate) async fn publish_refused_after(&self, after: u64, subject: &str) -> String {
        let mut count = self.count.subscribe();
        let needle = format!("publish to \"{subject}\"");
        loop {
            if let Some(found) = self.find_after(after, &needle) {
                return found;
            }
            if count.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// The refusal of a publish to `subject`, if the server reported one.
    pub fn publish_refused(&self, subject: &str) -> Option<String> {
        self.find(&format!("publish to \"{subject}\""))
    }

    /// The refusal of a subscription to `subject`, if the server reported one.
    pub fn subscription_refused(&self, subject: &str) -> Option<String> {
        self.find(&format!("subscription to \"{subject}\""))
    }

    fn find(&self, needle: &str) -> Option<String> {
        self.find_after(0, needle)
    }

    fn find_after(&self, after: u64, needle: &str) -> Option<String> {
        let needle = needle.to_ascii_lowercase();
        let recent = self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        recent
            .iter()
            .rev()
            .find(|(seq, e)| *seq > after && e.to_ascii_lowercase().contains(&needle))
            .map(|(_, e)| e.clone())
    }

    /// How many violations were reported so far; changes on each (a test waits on it).
    pub fn count(&self) -> watch::Receiver<u64> {
        self.count.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbox_prefix_is_per_user_when_the_name_is_a_token() {
        assert_eq!(inbox_prefix(Some("web")), "_INBOX_web");
        // A rotation's second user of identity `a` shares its inbox.
        assert_eq!(inbox_prefix(Some("a.b")), "_INBOX_a");
        assert_eq!(inbox_prefix(Some(".b")), "_INBOX");
        assert_eq!(inbox_prefix(Some("a b.c")), "_INBOX");
        assert_eq!(inbox_prefix(None), "_INBOX");
    }

    #[test]
    fn a_publish_violation_is_found_by_subject_and_other_errors_are_not_violations() {
        let v = Violations::new(Some("web"));
        assert!(!v.report("Maximum Payload Violation"));
        assert!(v.report("Permissions Violation for Publish to \"mnist.model.promote\""));
        assert!(v.publish_refused("mnist.model.promote").is_some());
        assert!(v.publish_refused("mnist.train.request").is_none());
        assert!(v.subscription_refused("mnist.model.promote").is_none());
        assert_eq!(*v.count().borrow(), 1);
    }
}
