//! `GET /api/events`: the pipeline's events as Server-Sent Events.
//!
//! A fresh page first gets the last event of each kind (so it shows the current
//! data set, model and instances however old they are), then the last
//! `WEB_EVENTS_REPLAY` events of the JetStream events stream, then a `live`
//! marker, then new events as they are stored. Replay and live come from one
//! ephemeral ordered consumer, so nothing falls in a gap between the two. Each
//! SSE event is named by its subject suffix (`model.published`, ...), carries
//! the JSON payload as data and the stream sequence as id, so a reconnecting
//! `EventSource` (which sends `Last-Event-ID`) resumes exactly where it stopped.

use std::collections::VecDeque;

use futures::StreamExt;
use mnistflow_nats::async_nats::jetstream::consumer::DeliverPolicy;
use mnistflow_nats::async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};
use mnistflow_nats::subjects::EVENT_SUBJECTS;
use mnistflow_nats::{Bus, Subjects, streams};
use rocket::http::Status;
use rocket::request::{FromRequest, Outcome};
use rocket::response::stream::{Event, EventStream};
use rocket::{Request, Shutdown, State, get};
use tracing::{debug, warn};

use crate::AppState;
use crate::error::ApiError;

/// One item of a page's feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedItem {
    /// A stored event: its stream sequence, subject suffix and compact JSON payload.
    Event { sequence: u64, name: String, data: String },
    /// Everything stored when the feed opened has been sent; what follows is new.
    Live,
}

/// Why a feed could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("event replay unavailable: {0}")]
pub struct FeedError(String);

/// The replay-then-live feed of one page.
pub struct Feed {
    backlog: VecDeque<FeedItem>,
    messages: Ordered,
    live_pending: bool,
    subjects: Subjects,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed").field("backlog", &self.backlog.len()).finish_non_exhaustive()
    }
}

impl Feed {
    /// Opens a feed replaying up to `replay` recent events (plus the last one of
    /// each kind), or resuming after sequence `resume_after`.
    ///
    /// # Errors
    /// The events stream is missing or the server did not answer.
    pub async fn open(bus: &Bus, replay: usize, resume_after: Option<u64>) -> Result<Self, FeedError> {
        let subjects = bus.subjects().clone();
        let name = subjects.stream_name(streams::EVENTS);
        let mut stream =
            bus.jetstream().get_stream(&name).await.map_err(|e| FeedError(format!("stream {name}: {e}")))?;
        let state = stream.info().await.map_err(|e| FeedError(format!("stream {name}: {e}")))?.state.clone();
        let (first, last) = (state.first_sequence, state.last_sequence);
        let resume_after = resume_after.filter(|s| *s <= last);
        let start = match resume_after {
            Some(seq) => seq + 1,
            None => last.saturating_sub(replay as u64).saturating_add(1).max(first),
        };
        let mut backlog = Vec::new();
        if resume_after.is_none() {
            for suffix in EVENT_SUBJECTS {
                match stream.get_last_raw_message_by_subject(&subjects.full(suffix)).await {
                    Ok(m) if m.sequence < start => {
                        if let Some(item) = item(&subjects, m.subject.as_str(), m.sequence, &m.payload) {
                            backlog.push((m.sequence, item));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => debug!(subject = suffix, error = %e, "No last message for subject."),
                }
            }
        }
        backlog.sort_by_key(|(seq, _)| *seq);
        let mut backlog: VecDeque<FeedItem> = backlog.into_iter().map(|(_, i)| i).collect();
        let live_pending = start <= last;
        if !live_pending {
            backlog.push_back(FeedItem::Live);
        }
        let consumer = stream
            .create_consumer(OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: start },
                description: Some("mnistflow web page feed".into()),
                ..Default::default()
            })
            .await
            .map_err(|e| FeedError(format!("ordered consumer on {name}: {e}")))?;
        let messages = consumer.messages().await.map_err(|e| FeedError(format!("ordered consumer on {name}: {e}")))?;
        Ok(Self { backlog, messages, live_pending, subjects })
    }

    /// The next item; `None` when the consumer failed (the page reconnects and resumes).
    pub async fn next(&mut self) -> Option<FeedItem> {
        loop {
            if let Some(item) = self.backlog.pop_front() {
                return Some(item);
            }
            let message = match self.messages.next().await? {
                Ok(m) => m,
                Err(e) => {
                    warn!(error = %e, "Event feed consumer failed; the page will reconnect.");
                    return None;
                }
            };
            let (sequence, pending) = message.info().map(|i| (i.stream_sequence, i.pending)).unwrap_or((0, 0));
            if let Some(item) = item(&self.subjects, message.subject.as_str(), sequence, &message.payload) {
                self.backlog.push_back(item);
            }
            if self.live_pending && pending == 0 {
                self.live_pending = false;
                self.backlog.push_back(FeedItem::Live);
            }
        }
    }
}

fn item(subjects: &Subjects, subject: &str, sequence: u64, payload: &[u8]) -> Option<FeedItem> {
    let name = subjects.suffix(subject)?.to_owned();
    match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(value) => Some(FeedItem::Event { sequence, name, data: value.to_string() }),
        Err(e) => {
            warn!(%subject, sequence, error = %e, "Skipping an event that is not JSON.");
            None
        }
    }
}

/// The `Last-Event-ID` an `EventSource` sends when it reconnects.
pub struct LastEventId(pub Option<u64>);

#[rocket::async_trait]
impl<'r> FromRequest<'r> for LastEventId {
    type Error = std::convert::Infallible;

    async fn from_request(req: &'r Request<'_>) -> Outcome<Self, Self::Error> {
        Outcome::Success(Self(req.headers().get_one("Last-Event-ID").and_then(|v| v.trim().parse().ok())))
    }
}

#[get("/api/events")]
pub(crate) fn events(
    state: &State<AppState>,
    resume: LastEventId,
    mut shutdown: Shutdown,
) -> Result<EventStream![Event + 'static], ApiError> {
    // Each stream holds a consumer on the NATS server: a bounded number at a time.
    let permit = state.event_streams.clone().try_acquire_owned().map_err(|_| {
        warn!(limit = state.config.max_event_streams, "Event stream refused: too many open.");
        ApiError::new(Status::ServiceUnavailable, "too many open event streams on this server; retry shortly")
    })?;
    let bus = state.bus.clone();
    let replay = state.config.events_replay;
    let metrics = state.metrics.clone();
    let heartbeat = state.config.sse_heartbeat;
    Ok(EventStream! {
        let _permit = permit;
        let _open = metrics.sse_client();
        match Feed::open(&bus, replay, resume.0).await {
            Err(e) => {
                warn!(error = %e, "Cannot open the event feed.");
                let data = serde_json::json!({ "message": e.to_string() }).to_string();
                yield Event::data(data).event("feed.error").with_retry(std::time::Duration::from_secs(5));
            }
            Ok(mut feed) => loop {
                let next = tokio::select! {
                    biased;
                    () = &mut shutdown => None,
                    item = feed.next() => item,
                };
                match next {
                    None => break,
                    Some(FeedItem::Live) => yield Event::data("{}").event("live"),
                    Some(FeedItem::Event { sequence, name, data }) => {
                        yield Event::data(data).event(name).id(sequence.to_string());
                    }
                }
            },
        }
    }
    .heartbeat(heartbeat))
}
