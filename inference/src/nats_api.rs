//! `mnist.predict` over NATS, through the contract's serving side
//! ([`Bus::serve_predictions`]: a queue-group subscription, so N instances share
//! the load). The payload is the image (or 784 raw pixels); the reply is the HTTP
//! API's JSON, a `Prediction` or a `PredictError` with a code: every request with
//! a reply subject gets an answer.

use std::sync::Arc;
use std::time::Instant;

use mnistflow_nats::{Bus, BusError, PredictReply, Prediction, Responder, telemetry};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug_span, info, warn};

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
    let mut requests = bus.serve_predictions().await?;
    // Bounds the decoding tasks; the batcher's queue bounds the rest.
    let permits = Arc::new(Semaphore::new(max_in_flight));
    loop {
        let request = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            r = requests.next() => match r {
                Some(r) => r,
                None => break,
            },
        };
        let started = Instant::now();
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            let error = ApiError::Predict(crate::batcher::PredictFailure::QueueFull);
            respond(&service, request.responder, Err(error), started).await;
            continue;
        };
        let service = service.clone();
        let span = debug_span!("predict", route = "nats", bytes = request.image.len(), otel.kind = "server");
        // The requester's trace (the web tier's), carried in the message headers.
        telemetry::set_parent_from_nats(&span, request.headers.as_ref());
        tracker.spawn(
            async move {
                let result = service.predict(request.image.to_vec(), true).await.map(Prediction::from);
                respond(&service, request.responder, result, started).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
    requests.unsubscribe().await;
    info!("Stopped taking NATS predictions.");
    Ok(())
}

async fn respond(service: &Service, responder: Responder, result: Result<Prediction, ApiError>, started: Instant) {
    let (status, reply) = match result {
        Ok(p) => (200, PredictReply::Ok(p)),
        Err(e) => (e.status(), PredictReply::Err(e.reply())),
    };
    service.metrics.request("nats", status, started.elapsed().as_secs_f64());
    if let Err(e) = responder.send(&reply).await {
        warn!(error = %e, cause = ?std::error::Error::source(&e), "Sending a prediction reply failed.");
    }
}
