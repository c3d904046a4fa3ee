//! The micro-batcher behind both APIs: a bounded queue into one dedicated compute
//! thread that collects up to `max_batch` requests (waiting at most `max_wait`
//! after the first while requests come concurrently; after a batch of one, a
//! request runs as soon as it arrives), runs one forward pass on the model
//! served at that moment, and answers each request through its oneshot channel.
//!
//! Traced (when spans are exported): each request's wait in the queue is a
//! `batcher.queue` span in the request's trace, and each forward pass a `forward`
//! span of its own, linked to the queueing span of every request it served.
//!
//! The queue is bounded: when it is full a request is refused at once
//! ([`PredictFailure::QueueFull`]: HTTP 503 with `Retry-After`, a NATS error reply)
//! instead of piling up. The thread ends once every [`Batcher`] handle is dropped
//! and the queue is drained, so shutdown answers everything already queued.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mnistflow_nats::ModelVersion;
use mnistflow_nats::telemetry::{self, LinkTarget};
use tokio::sync::oneshot;
use tracing::{Span, debug_span, error, info};

use crate::config::BatchConfig;
use crate::metrics::Metrics;
use crate::model::{CLASSES, ModelSlot, most_likely};
use crate::preprocess::{PIXELS, Pixels};

/// One classification.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub digit: u8,
    pub probabilities: Vec<f32>,
    pub version: ModelVersion,
    /// The input as the reply carries it (set by [`crate::service::Service::predict`]).
    pub input: Option<String>,
}

/// Why a request got no classification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PredictFailure {
    #[error("the prediction queue is full; retry shortly")]
    QueueFull,
    #[error("no model is loaded yet")]
    NoModel,
    #[error("the service is shutting down")]
    ShuttingDown,
    #[error("no answer from the compute thread within {0:?}")]
    Timeout(Duration),
    #[error("the forward pass failed")]
    Model,
}

impl PredictFailure {
    /// The HTTP status (also the `code` of a NATS error reply).
    pub fn status(&self) -> u16 {
        match self {
            Self::Model => 500,
            _ => 503,
        }
    }
}

struct Job {
    pixels: Box<Pixels>,
    reply: oneshot::Sender<Result<Answer, PredictFailure>>,
    /// Open while the job waits; closed when its batch is taken.
    queued: Span,
    /// The queueing span's trace, for the forward pass's link.
    link: Option<LinkTarget>,
}

/// A handle to the compute thread. Cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: SyncSender<Job>,
    depth: Arc<AtomicI64>,
    metrics: Metrics,
    timeout: Duration,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").field("depth", &self.depth.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

impl Batcher {
    /// Starts the compute thread. It reads the model from `slot` once per batch.
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub fn start(
        config: BatchConfig,
        slot: Arc<ModelSlot>,
        metrics: Metrics,
        timeout: Duration,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = mpsc::sync_channel::<Job>(config.queue_capacity);
        let depth = Arc::new(AtomicI64::new(0));
        let worker = Worker { rx, slot, metrics: metrics.clone(), depth: depth.clone(), config };
        let handle = std::thread::Builder::new().name("inference-compute".into()).spawn(move || worker.run())?;
        Ok((Self { tx, depth, metrics, timeout }, handle))
    }

    /// Queues one image and waits for its classification.
    ///
    /// # Errors
    /// The queue is full, no model is loaded, the service is stopping, the answer
    /// took longer than the request timeout, or the forward pass failed.
    pub async fn predict(&self, pixels: Box<Pixels>) -> Result<Answer, PredictFailure> {
        let (reply, answer) = oneshot::channel();
        // Count before sending so the worker's decrement can never run first.
        let depth = self.depth.fetch_add(1, Ordering::Relaxed) + 1;
        let queued = debug_span!("batcher.queue", depth);
        let link = telemetry::link_target(&queued);
        match self.tx.try_send(Job { pixels, reply, queued, link }) {
            Ok(()) => self.metrics.queue_depth(depth),
            Err(e) => {
                self.depth.fetch_sub(1, Ordering::Relaxed);
                return Err(match e {
                    TrySendError::Full(_) => PredictFailure::QueueFull,
                    TrySendError::Disconnected(_) => PredictFailure::ShuttingDown,
                });
            }
        }
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(result)) => result,
            // The worker dropped the job without answering (it panicked).
            Ok(Err(_)) => Err(PredictFailure::Model),
            Err(_) => Err(PredictFailure::Timeout(self.timeout)),
        }
    }

    /// Requests waiting for the compute thread.
    pub fn depth(&self) -> i64 {
        self.depth.load(Ordering::Relaxed)
    }
}

struct Worker {
    rx: mpsc::Receiver<Job>,
    slot: Arc<ModelSlot>,
    metrics: Metrics,
    depth: Arc<AtomicI64>,
    config: BatchConfig,
}

impl Worker {
    fn run(self) {
        if self.config.torch_threads > 0 {
            tch::set_num_threads(self.config.torch_threads as i32);
        }
        let mut jobs: Vec<Job> = Vec::with_capacity(self.config.max_batch);
        let mut input: Vec<f32> = Vec::with_capacity(self.config.max_batch * PIXELS);
        // Waiting for a batch to fill pays only when requests come concurrently.
        let mut wait = true;
        while self.collect(&mut jobs, wait) {
            let n = jobs.len();
            wait = n > 1;
            let depth = self.depth.fetch_sub(n as i64, Ordering::Relaxed) - n as i64;
            self.metrics.queue_depth(depth);
            // A panic must not kill the thread: the dropped reply channels tell
            // each waiting request that its batch failed.
            if std::panic::catch_unwind(AssertUnwindSafe(|| self.run_batch(&mut jobs, &mut input))).is_err() {
                error!(batch = n, "A batch panicked; its requests were answered with 500.");
            }
            jobs.clear();
        }
        info!("Compute thread stopped: queue closed and drained.");
    }

    /// Blocks for the first job, then takes what is already queued and, when
    /// `wait`, gathers more until the batch is full or `max_wait` has passed.
    /// False once the queue is closed and empty.
    fn collect(&self, jobs: &mut Vec<Job>, wait: bool) -> bool {
        match self.rx.recv() {
            Ok(job) => jobs.push(job),
            Err(_) => return false,
        }
        let deadline = Instant::now() + if wait { self.config.max_wait } else { Duration::ZERO };
        while jobs.len() < self.config.max_batch {
            match self.rx.try_recv() {
                Ok(job) => {
                    jobs.push(job);
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match self.rx.recv_timeout(deadline - now) {
                Ok(job) => jobs.push(job),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        true
    }

    fn run_batch(&self, jobs: &mut Vec<Job>, input: &mut Vec<f32>) {
        let n = jobs.len();
        let span = debug_span!("forward", batch = n, version = tracing::field::Empty);
        for job in jobs.iter_mut() {
            // Ends the job's queueing span.
            job.queued = Span::none();
            if let Some(link) = &job.link {
                telemetry::link(&span, link);
            }
        }
        let _entered = span.enter();
        let Some(model) = self.slot.get() else {
            for job in jobs.drain(..) {
                let _ = job.reply.send(Err(PredictFailure::NoModel));
            }
            return;
        };
        input.clear();
        for job in jobs.iter() {
            input.extend_from_slice(&job.pixels[..]);
        }
        self.metrics.batch(n);
        span.record("version", tracing::field::display(&model.version));
        match model.forward(input, n) {
            Ok(out) => {
                for (job, row) in jobs.drain(..).zip(out.chunks(CLASSES)) {
                    let probabilities: Vec<f32> = row.iter().map(|v| v.exp()).collect();
                    let digit = most_likely(&probabilities);
                    self.metrics.prediction(digit);
                    let _ = job.reply.send(Ok(Answer {
                        digit,
                        probabilities,
                        version: model.version.clone(),
                        input: None,
                    }));
                }
            }
            Err(e) => {
                error!(error = %e, batch = n, version = %model.version, "Forward pass failed.");
                for job in jobs.drain(..) {
                    let _ = job.reply.send(Err(PredictFailure::Model));
                }
            }
        }
    }
}
