//! Replaying the events stream, then following it live, through one ephemeral
//! ordered consumer (so nothing falls in a gap between history and live).
//!
//! [`Bus::replay_events`] starts from a JetStream deliver policy (the CLI's
//! `events`, `mnistflow up`'s log, the test kit); [`Bus::event_feed`] is a page's
//! feed: the last event of each kind however old, then the most recent events
//! (or everything after a sequence the reader already has), then a
//! [`ReplayItem::Live`] marker once the history is out.

use std::collections::VecDeque;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};
use futures::StreamExt;
use tracing::debug;

use crate::bus::{Bus, BusError};
use crate::streams;
use crate::subjects::{EVENT_SUBJECTS, Subjects};

/// One message from the events stream, undecoded (its type follows from `suffix`).
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// The subject without the prefix, e.g. `model.published`.
    pub suffix: String,
    pub payload: bytes::Bytes,
    /// Stream sequence: increasing, gap-free per stream.
    pub sequence: u64,
}

/// One item of a replay.
#[derive(Debug, Clone)]
pub enum ReplayItem {
    Event(StoredEvent),
    /// Everything stored when the replay opened has been handed out; what
    /// follows is new. Only [`Bus::event_feed`] marks it.
    Live,
}

/// A replay of the events stream followed by live events.
pub struct EventReplay {
    backlog: VecDeque<ReplayItem>,
    messages: Ordered,
    /// Whether a [`ReplayItem::Live`] marker is still to come after the history.
    live_pending: bool,
    subjects: Subjects,
    /// The stream's last sequence when the replay began: everything up to it is history.
    pub last_at_start: u64,
}

impl std::fmt::Debug for EventReplay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventReplay")
            .field("backlog", &self.backlog.len())
            .field("last_at_start", &self.last_at_start)
            .finish_non_exhaustive()
    }
}

impl EventReplay {
    /// The next stored event (history first, then live); `None` when the stream ends.
    pub async fn next(&mut self) -> Option<Result<StoredEvent, BusError>> {
        loop {
            match self.next_item().await? {
                Ok(ReplayItem::Event(e)) => return Some(Ok(e)),
                Ok(ReplayItem::Live) => {}
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// The next item, with the [`ReplayItem::Live`] marker where the history ends;
    /// `None` when the stream ends.
    pub async fn next_item(&mut self) -> Option<Result<ReplayItem, BusError>> {
        if let Some(item) = self.backlog.pop_front() {
            return Some(Ok(item));
        }
        let message = match self.messages.next().await? {
            Ok(m) => m,
            Err(e) => return Some(Err(BusError::subscribe(self.subjects.all(), e))),
        };
        let (sequence, pending) = message.info().map(|i| (i.stream_sequence, i.pending)).unwrap_or((0, 0));
        let suffix = self.subjects.suffix(&message.subject).unwrap_or(message.subject.as_str()).to_owned();
        if self.live_pending && pending == 0 {
            self.live_pending = false;
            self.backlog.push_back(ReplayItem::Live);
        }
        Some(Ok(ReplayItem::Event(StoredEvent { suffix, payload: message.payload.clone(), sequence })))
    }
}

impl Bus {
    /// Replays the events stream from `from` (e.g. `DeliverPolicy::All`,
    /// `DeliverPolicy::LastPerSubject`, `ByStartTime`), then follows it live.
    ///
    /// # Errors
    /// The events stream is missing (call [`Bus::ensure_streams`]).
    pub async fn replay_events(&self, from: DeliverPolicy) -> Result<EventReplay, BusError> {
        let mut stream = self.events_stream().await?;
        let last_at_start = self.events_stream_state(&mut stream).await?.1;
        self.open_replay(&stream, from, None, VecDeque::new(), false, last_at_start).await
    }

    /// A page's feed: the last event of each kind older than the replayed window,
    /// then up to `recent` recent events, or, when `resume_after` names a stored
    /// sequence, everything after it (and no last-of-each-kind); then a
    /// [`ReplayItem::Live`] marker; then new events.
    ///
    /// # Errors
    /// The events stream is missing or the server did not answer.
    pub async fn event_feed(&self, recent: usize, resume_after: Option<u64>) -> Result<EventReplay, BusError> {
        let mut stream = self.events_stream().await?;
        let (first, last) = self.events_stream_state(&mut stream).await?;
        let resume_after = resume_after.filter(|s| *s <= last);
        let start = match resume_after {
            Some(seq) => seq + 1,
            None => last.saturating_sub(recent as u64).saturating_add(1).max(first),
        };
        let mut older = Vec::new();
        if resume_after.is_none() {
            for suffix in EVENT_SUBJECTS {
                match stream.get_last_raw_message_by_subject(&self.subjects().full(suffix)).await {
                    Ok(m) if m.sequence < start => older.push(StoredEvent {
                        suffix: (*suffix).to_owned(),
                        payload: m.payload.clone(),
                        sequence: m.sequence,
                    }),
                    Ok(_) => {}
                    Err(e) => debug!(subject = suffix, error = %e, "No last message for subject."),
                }
            }
        }
        older.sort_by_key(|e| e.sequence);
        let mut backlog: VecDeque<ReplayItem> = older.into_iter().map(ReplayItem::Event).collect();
        let live_pending = start <= last;
        if !live_pending {
            backlog.push_back(ReplayItem::Live);
        }
        let from = DeliverPolicy::ByStartSequence { start_sequence: start };
        self.open_replay(&stream, from, Some("mnistflow web page feed"), backlog, live_pending, last).await
    }

    async fn events_stream(&self) -> Result<async_nats::jetstream::stream::Stream, BusError> {
        let name = self.subjects().stream_name(streams::EVENTS);
        self.jetstream().get_stream(&name).await.map_err(|e| BusError::stream(format!("stream {name}"), e))
    }

    /// The events stream's first and last sequence now.
    async fn events_stream_state(
        &self,
        stream: &mut async_nats::jetstream::stream::Stream,
    ) -> Result<(u64, u64), BusError> {
        let name = self.subjects().stream_name(streams::EVENTS);
        let state = &stream.info().await.map_err(|e| BusError::stream(format!("stream {name}"), e))?.state;
        Ok((state.first_sequence, state.last_sequence))
    }

    async fn open_replay(
        &self,
        stream: &async_nats::jetstream::stream::Stream,
        from: DeliverPolicy,
        description: Option<&str>,
        backlog: VecDeque<ReplayItem>,
        live_pending: bool,
        last_at_start: u64,
    ) -> Result<EventReplay, BusError> {
        let name = self.subjects().stream_name(streams::EVENTS);
        let consumer = stream
            .create_consumer(OrderedConfig {
                deliver_policy: from,
                description: description.map(str::to_owned),
                ..Default::default()
            })
            .await
            .map_err(|e| BusError::stream(format!("replay consumer on {name}"), e))?;
        let messages = consumer.messages().await.map_err(|e| BusError::subscribe(self.subjects().all(), e))?;
        Ok(EventReplay { backlog, messages, live_pending, subjects: self.subjects().clone(), last_at_start })
    }
}
