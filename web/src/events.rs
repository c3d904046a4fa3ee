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

use mnistflow_nats::{Bus, BusError, EventReplay, ReplayItem};
use rocket::http::Status;
use rocket::request::{FromRequest, Outcome};
use rocket::response::stream::{Event, EventStream};
use rocket::{Request, Shutdown, State, get};
use tracing::warn;

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

/// The replay-then-live feed of one page: [`Bus::event_feed`], its payloads
/// checked to be JSON and made compact for an SSE `data` line.
pub struct Feed(EventReplay);

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Feed").field(&self.0).finish()
    }
}

impl Feed {
    /// Opens a feed replaying up to `replay` recent events (plus the last one of
    /// each kind), or resuming after sequence `resume_after`.
    ///
    /// # Errors
    /// The events stream is missing or the server did not answer.
    pub async fn open(bus: &Bus, replay: usize, resume_after: Option<u64>) -> Result<Self, BusError> {
        bus.event_feed(replay, resume_after).await.map(Self)
    }

    /// The next item; `None` when the consumer failed (the page reconnects and resumes).
    pub async fn next(&mut self) -> Option<FeedItem> {
        loop {
            match self.0.next_item().await? {
                Ok(ReplayItem::Live) => return Some(FeedItem::Live),
                Ok(ReplayItem::Event(event)) => match serde_json::from_slice::<serde_json::Value>(&event.payload) {
                    Ok(value) => {
                        let (sequence, name) = (event.sequence, event.suffix);
                        return Some(FeedItem::Event { sequence, name, data: value.to_string() });
                    }
                    Err(e) => {
                        warn!(subject = %event.suffix, sequence = event.sequence, error = %e, "Skipping an event that is not JSON.");
                    }
                },
                Err(e) => {
                    warn!(error = %e, cause = ?std::error::Error::source(&e), "Event feed consumer failed; the page will reconnect.");
                    return None;
                }
            }
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
                let data = serde_json::json!({ "message": format!("event replay unavailable: {e}") }).to_string();
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
