//! Event history by age: purging the events stream up to a time, so that a
//! retention pass knows (and reports) exactly what it removed. The stream's own
//! `max_age` (30 days, [`crate::streams`]) stays the outer bound; this removes
//! earlier, when an installation configures a shorter age.

use std::time::Duration;

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use chrono::{DateTime, Utc};
use futures::StreamExt;

use crate::bus::{Bus, BusError};
use crate::streams;

/// What a purge removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Purged {
    /// Events removed.
    pub events: u64,
    /// The first sequence kept (everything before it is gone).
    pub kept_from: u64,
}

impl Bus {
    /// Removes every event stored before `cutoff` from the events stream.
    ///
    /// # Errors
    /// The stream is missing, or the server refused the lookup or the purge.
    pub async fn purge_events_before(&self, cutoff: DateTime<Utc>) -> Result<Purged, BusError> {
        let name = self.subjects().stream_name(streams::EVENTS);
        let fail = |what: &str, e: crate::bus::Cause| BusError::stream(format!("{what} on stream {name}"), e);
        let mut stream = self.jetstream().get_stream(&name).await.map_err(|e| fail("lookup", e.into()))?;
        let state = stream.info().await.map_err(|e| fail("info", e.into()))?.state.clone();
        if state.messages == 0 {
            return Ok(Purged { events: 0, kept_from: state.last_sequence + 1 });
        }
        let start_time = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(
            cutoff.timestamp_nanos_opt().unwrap_or(i64::MAX),
        ))
        .map_err(|e| fail("cutoff", e.into()))?;
        // The first event at or after the cutoff: where an ephemeral consumer
        // starting at that time begins (none pending: every event is older).
        let mut lookup = stream
            .create_consumer(consumer::pull::Config {
                deliver_policy: DeliverPolicy::ByStartTime { start_time },
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                memory_storage: true,
                description: Some("mnistflow retention: first event to keep".into()),
                ..Default::default()
            })
            .await
            .map_err(|e| fail("time lookup consumer", e.into()))?;
        let pending = lookup.info().await.map_err(|e| fail("time lookup consumer info", e.into()))?.num_pending;
        let kept_from = if pending == 0 {
            state.last_sequence + 1
        } else {
            let mut batch = lookup
                .fetch()
                .max_messages(1)
                .expires(Duration::from_secs(5))
                .messages()
                .await
                .map_err(|e| fail("time lookup fetch", e.into()))?;
            match batch.next().await {
                Some(Ok(m)) => m.info().map_err(|e| fail("time lookup message", e))?.stream_sequence,
                Some(Err(e)) => return Err(fail("time lookup fetch", e)),
                None => return Err(fail("time lookup fetch", "no event within 5 s although one is pending".into())),
            }
        };
        let name_of_consumer = lookup.cached_info().name.clone();
        // Gone by itself after its inactivity threshold if this fails.
        let _ = stream.delete_consumer(&name_of_consumer).await;
        if kept_from <= state.first_sequence {
            return Ok(Purged { events: 0, kept_from });
        }
        let response = stream.purge().sequence(kept_from).await.map_err(|e| fail("purge", e.into()))?;
        Ok(Purged { events: response.purged, kept_from })
    }
}
