//! `mnist.predict` over NATS: a queue-group subscription (`inference`) so N
//! instances share the load. The payload is the image (or 784 raw pixels); the
//! reply is the HTTP API's JSON, a `Prediction` or a `PredictError` with a code:
//! every request with a reply subject gets an answer.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use mnistflow_nats::async_nats::{self, Subject};
use mnistflow_nats::{Bus, BusError, Prediction, subjects, telemetry};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, info, warn};

use crate::service::{ApiError, Service};

/// Serves `mnist.predict` until `shutdown`, then unsubscribes; the requests already
/// taken run to completion in `tracker`.
///
/// # Errors
/// The subscription cannot be made.
pub async fn serve(
    bus: Bus,
    service: Arc<Service>,
    max_in_flight: usize,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let subject = bus.subjects().full(subjects::PREDICT);
    let client = bus.client().clone();
    let mut sub = client
        .queue_subscribe(subject.clone(), subjects::PREDICT_QUEUE_GROUP.to_owned())
        .await
        .map_err(|e| BusError::Subscribe { subject: subject.clone(), message: e.to_string() })?;
    info!(%subject, group = subjects::PREDICT_QUEUE_GROUP, "Serving predictions over NATS.");
    // Bounds the decoding tasks; the batcher's queue bounds the rest.
    let permits = Arc::new(Semaphore::new(max_in_flight));
    loop {
        let msg = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            m = sub.next() => match m {
                Some(m) => m,
                None => break,
            },
        };
        let Some(reply) = msg.reply.clone() else {
            debug!("mnist.predict without a reply subject ignored.");
            continue;
        };
        let started = Instant::now();
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            let error = ApiError::Predict(crate::batcher::PredictFailure::QueueFull);
            respond(&client, &service, reply, Err(error), started).await;
            continue;
        };
        let (client, service) = (client.clone(), service.clone());
        let span = debug_span!("predict", route = "nats", bytes = msg.payload.len(), otel.kind = "server");
        // The requester's trace (the web tier's), carried in the message headers.
        telemetry::set_parent_from_nats(&span, msg.headers.as_ref());
        tracker.spawn(
            async move {
                let result = service.predict(msg.payload.to_vec(), true).await.map(Prediction::from);
                respond(&client, &service, reply, result, started).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
    if let Err(e) = sub.unsubscribe().await {
        debug!(error = %e, "Unsubscribing from mnist.predict failed.");
    }
    info!("Stopped taking NATS predictions.");
    Ok(())
}

async fn respond(
    client: &async_nats::Client,
    service: &Service,
    reply: Subject,
    result: Result<Prediction, ApiError>,
    started: Instant,
) {
    let (status, body) = match &result {
        Ok(p) => (200, serde_json::to_vec(p)),
        Err(e) => (e.status(), serde_json::to_vec(&e.reply())),
    };
    service.metrics.request("nats", status, started.elapsed().as_secs_f64());
    match body {
        Ok(body) => {
            if let Err(e) = client.publish(reply, body.into()).await {
                warn!(error = %e, "Sending a prediction reply failed.");
            }
        }
        Err(e) => warn!(error = %e, "Encoding a prediction reply failed."),
    }
}
