//! The typed bus every stage talks through.

use std::marker::PhantomData;
use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use async_nats::{Client, ConnectOptions, HeaderMap, Subscriber};
use futures::StreamExt;
use secrecy::ExposeSecret;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::NatsConfig;
use crate::events::Message;
use crate::permissions::{self, Violations};
use crate::streams;
use crate::subjects::Subjects;
use crate::work::DeliveryKey;

/// A failure's cause, kept as the error's source (the client's own error types).
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// What can go wrong talking to NATS. The client's error is each variant's
/// `source` (print the chain with `{:#}` through `anyhow`).
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The server stayed unreachable for the whole connect timeout.
    #[error("NATS_URL: cannot reach {url} after {attempts} attempts over {waited:?}")]
    Unreachable {
        url: String,
        attempts: u32,
        waited: Duration,
        #[source]
        last_error: async_nats::ConnectError,
    },
    /// The server refused our credentials (or the credentials file is unreadable); retrying will not help.
    #[error("NATS_USER/NATS_PASSWORD/NATS_TOKEN/NATS_CREDS: the server refused the credentials")]
    Auth(#[source] Cause),
    /// Shutdown was requested while connecting.
    #[error("shutdown requested while connecting to NATS")]
    Cancelled,
    /// A stream or consumer could not be read, created or updated; `what` names it.
    #[error("JetStream set-up failed: {what}")]
    Stream {
        what: String,
        #[source]
        source: Cause,
    },
    #[error("publish to {subject} failed after {attempts} attempts")]
    Publish {
        subject: String,
        attempts: u32,
        #[source]
        source: Cause,
    },
    #[error("subscribe to {subject} failed")]
    Subscribe {
        subject: String,
        #[source]
        source: Cause,
    },
    #[error("acknowledging a message failed")]
    Ack(#[source] Cause),
    #[error("encoding a payload failed")]
    Encode(#[from] serde_json::Error),
}

impl BusError {
    /// A stream or consumer failure, `what` naming it.
    pub(crate) fn stream(what: impl Into<String>, source: impl Into<Cause>) -> Self {
        Self::Stream { what: what.into(), source: source.into() }
    }

    pub(crate) fn subscribe(subject: impl Into<String>, source: impl Into<Cause>) -> Self {
        Self::Subscribe { subject: subject.into(), source: source.into() }
    }
}

/// The server's answer to a JetStream publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub sequence: u64,
    /// True when the server had already stored a message with this id.
    pub duplicate: bool,
}

/// A connected, typed view of the pipeline's subjects.
#[derive(Clone)]
pub struct Bus {
    client: Client,
    js: jetstream::Context,
    subjects: Subjects,
    stream_replicas: usize,
    publish_retry: Duration,
    disconnections: watch::Receiver<u64>,
    setup: bool,
    setup_wait: Duration,
    violations: Violations,
    /// Set by [`Bus::close`]: the disconnection that follows is ours, not news.
    closing: Arc<AtomicBool>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("prefix", &self.subjects.prefix()).finish_non_exhaustive()
    }
}

impl Bus {
    /// Connects, retrying an unreachable server with exponential backoff (logged)
    /// until `config.connect_timeout`; later disconnections are retried forever by
    /// the client itself.
    ///
    /// # Errors
    /// [`BusError::Unreachable`] after the timeout, [`BusError::Auth`] at once on
    /// refused credentials, [`BusError::Cancelled`] on shutdown.
    pub async fn connect(config: &NatsConfig, shutdown: &CancellationToken) -> Result<Self, BusError> {
        let url = config.servers.iter().map(|s| s.as_url_str().to_owned()).collect::<Vec<_>>().join(",");
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        let mut attempts = 0u32;
        let (disconnected, disconnections) = watch::channel(0u64);
        let disconnected = std::sync::Arc::new(disconnected);
        let violations = Violations::new(config.user.as_deref());
        let closing = Arc::new(AtomicBool::new(false));
        loop {
            attempts += 1;
            let options = options(config, disconnected.clone(), violations.clone(), closing.clone()).await?;
            match options.connect(config.servers.clone()).await {
                Ok(client) => {
                    info!(%url, attempts, server = %client.server_info().server_name, "Connected to NATS.");
                    let mut bus = Self::new(client, config.subjects.clone());
                    bus.stream_replicas = config.stream_replicas;
                    bus.publish_retry = config.publish_retry;
                    bus.disconnections = disconnections;
                    bus.setup = config.setup;
                    bus.setup_wait = config.connect_timeout;
                    bus.violations = violations;
                    bus.closing = closing;
                    return Ok(bus);
                }
                Err(e) => {
                    if matches!(
                        e.kind(),
                        async_nats::ConnectErrorKind::Authentication
                            | async_nats::ConnectErrorKind::AuthorizationViolation
                    ) {
                        return Err(BusError::Auth(e.into()));
                    }
                    let waited = started.elapsed();
                    if waited + delay > config.connect_timeout {
                        return Err(BusError::Unreachable { url, attempts, waited, last_error: e });
                    }
                    warn!(%url, attempts, error = %e, retry_in_ms = delay.as_millis() as u64, "NATS unreachable, retrying.");
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => return Err(BusError::Cancelled),
                        () = tokio::time::sleep(jitter(delay)) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Wraps an existing client (streams of one replica, the default publish
    /// retry, and no disconnection signal: [`Bus::connect`] sets those up).
    pub fn new(client: Client, subjects: Subjects) -> Self {
        let js = jetstream::new(client.clone());
        let (_, disconnections) = watch::channel(0);
        Self {
            client,
            js,
            subjects,
            stream_replicas: 1,
            publish_retry: Duration::from_secs(30),
            disconnections,
            setup: true,
            setup_wait: Duration::from_secs(60),
            violations: Violations::new(None),
            closing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Closes the connection (every clone's) after flushing what was published:
    /// the last step of a process that stops, before a server it manages goes
    /// away. The disconnection that follows is logged at debug, not as a warning.
    ///
    /// # Errors
    /// The connection could not be drained.
    pub async fn close(&self) -> Result<(), async_nats::client::DrainError> {
        self.closing.store(true, Ordering::SeqCst);
        self.client.drain().await
    }

    /// The permission violations the server reported to this connection
    /// ([`crate::permissions`]; each is also logged at error level).
    pub fn violations(&self) -> &Violations {
        &self.violations
    }

    /// Sets the streams' replica count that [`Bus::ensure_streams`] applies.
    #[must_use]
    pub fn with_stream_replicas(mut self, replicas: usize) -> Self {
        self.stream_replicas = replicas;
        self
    }

    /// A counter of this connection's disconnections, bumped as the client loses
    /// its server (before it reconnects to another). A request/reply caller
    /// watches it: the reply to a request that was in flight through the lost
    /// server never comes, and waiting for it would spend the whole timeout.
    pub fn disconnections(&self) -> watch::Receiver<u64> {
        self.disconnections.clone()
    }

    /// How many servers hold each stream ([`NatsConfig::stream_replicas`]).
    pub fn stream_replicas(&self) -> usize {
        self.stream_replicas
    }

    /// The underlying client (request/reply for predictions, raw subscriptions).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// Creates or updates the streams and creates every work-queue consumer that
    /// is missing (idempotent; every stage calls it at start-up, so the trainer's
    /// consumer exists, for KEDA to read its lag, before any trainer runs).
    ///
    /// An identity without the right to (`NATS_SETUP=false`) only waits, up to
    /// `NATS_CONNECT_TIMEOUT_SECS`, until they all exist.
    ///
    /// # Errors
    /// JetStream is disabled on the server or refused the configuration; or,
    /// without set-up, a stream or consumer still missing at the deadline.
    pub async fn ensure_streams(&self) -> Result<(), BusError> {
        if self.setup {
            // A JetStream request that times out during set-up (a cluster whose
            // servers are still electing their leaders, a Job started beside the
            // NATS pods) is tried again within the connect timeout: set-up is
            // idempotent, so a request that did reach the server does no harm.
            let started = Instant::now();
            let mut delay = Duration::from_millis(250);
            loop {
                match streams::ensure(&self.js, &self.subjects, self.stream_replicas).await {
                    Err(e) if timed_out(&e) && started.elapsed() + delay < self.setup_wait => {
                        warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "JetStream set-up timed out; retrying.");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                    other => return other,
                }
            }
        } else {
            streams::wait_for(&self.js, &self.subjects, self.setup_wait).await
        }
    }

    /// Publishes `message` to its subject through JetStream with `Nats-Msg-Id` set
    /// to its event id, and waits for the server to store it.
    ///
    /// A publish that got no acknowledgement (the connection dropped, the stream
    /// had no leader while a cluster elected a new one) is sent again, with the
    /// same `Nats-Msg-Id`, until `NATS_PUBLISH_RETRY_SECS` have passed: the
    /// stream stores it once however many attempts reached it, and the caller
    /// learns of a failure only when none did.
    ///
    /// # Errors
    /// No stream holds the subject, or the server did not acknowledge within the
    /// retry window.
    pub async fn publish<M: Message>(&self, message: &M) -> Result<Published, BusError> {
        let subject = self.subjects.full(M::SUBJECT);
        let payload = bytes::Bytes::from(crate::schema::encode(message)?);
        let id = message.event_id().to_string();
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        let mut attempt = 1u32;
        loop {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            // The consumer's spans (a training run) join the publisher's trace.
            crate::telemetry::inject_nats(&tracing::Span::current(), &mut headers);
            // A refused publish gets no acknowledgement, only the server's
            // asynchronous permission violation: whichever comes first.
            let seen = *self.violations.count().borrow();
            let outcome = match self.js.publish_with_headers(subject.clone(), headers, payload.clone()).await {
                Ok(ack) => tokio::select! {
                    outcome = ack => outcome,
                    refused = self.violations.publish_refused_after(seen, &subject) => {
                        return Err(BusError::Publish {
                            subject,
                            attempts: attempt,
                            source: format!("permission denied: {refused}").into(),
                        });
                    }
                },
                Err(e) => Err(e),
            };
            match outcome {
                Ok(ack) => {
                    debug!(%subject, sequence = ack.sequence, duplicate = ack.duplicate, attempt, "Published.");
                    return Ok(Published { sequence: ack.sequence, duplicate: ack.duplicate });
                }
                Err(e) => {
                    let retryable = match e.kind() {
                        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe | PublishErrorKind::Other => true,
                        // "No responders": on a cluster, the stream has no leader for
                        // a moment; on one server, no stream holds the subject.
                        PublishErrorKind::StreamNotFound => self.stream_replicas > 1,
                        _ => false,
                    };
                    if !retryable || started.elapsed() + delay > self.publish_retry {
                        return Err(BusError::Publish { subject, attempts: attempt, source: e.into() });
                    }
                    warn!(%subject, attempt, error = %e, "Publish not acknowledged; retrying with the same Nats-Msg-Id.");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                    attempt += 1;
                }
            }
        }
    }

    /// Subscribes (core NATS, live only) to `M`'s subject.
    ///
    /// # Errors
    /// The client is closed.
    pub async fn subscribe<M: Message>(&self) -> Result<TypedSubscriber<M>, BusError> {
        let subject = self.subjects.full(M::SUBJECT);
        let inner = self.client.subscribe(subject.clone()).await.map_err(|e| BusError::subscribe(subject, e))?;
        Ok(TypedSubscriber { inner, _type: PhantomData })
    }

    /// Binds to the durable work-queue consumer of command `M`. Set-up
    /// ([`Bus::ensure_streams`]) creates it; if it is missing anyway it is created
    /// here, and if its ack wait or delivery limit differ from `options` it is
    /// updated to them (the consuming stage knows how often it signals progress).
    /// Deliveries come one at a time; each must be acked, nak'ed or terminated.
    ///
    /// # Errors
    /// `M` is not a work-queue command, or the stream is missing.
    pub async fn work_queue<M: Message>(&self, options: WorkQueueOptions) -> Result<WorkQueue<M>, BusError> {
        let Some(def) = streams::work_consumer(M::SUBJECT) else {
            return Err(BusError::stream(format!("{} as a work queue", M::SUBJECT), "it is not a work-queue command"));
        };
        let (durable, name) = (def.durable, self.subjects.stream_name(def.stream));
        let stream = self.js.get_stream(&name).await.map_err(|e| BusError::stream(format!("stream {name}"), e))?;
        let mut config = streams::work_consumer_config(
            &self.subjects,
            M::SUBJECT,
            durable,
            options.max_deliver,
            self.stream_replicas,
        );
        config.ack_wait = options.ack_wait;
        let fail = |e: Cause| BusError::stream(format!("consumer {durable} on {name}"), e);
        let mut consumer: PullConsumer =
            stream.get_or_create_consumer(durable, config.clone()).await.map_err(|e| fail(e.into()))?;
        let current = &consumer.cached_info().config;
        if current.ack_wait != options.ack_wait
            || current.max_deliver != options.max_deliver
            || current.num_replicas.max(1) != self.stream_replicas
        {
            info!(
                consumer = durable,
                ack_wait_ms = options.ack_wait.as_millis() as u64,
                max_deliver = options.max_deliver,
                "Updating the work-queue consumer to this stage's settings."
            );
            stream.update_consumer(config).await.map_err(|e| fail(e.into()))?;
            consumer = stream.get_consumer(durable).await.map_err(fail)?;
        }
        let messages = consumer
            .stream()
            .max_messages_per_batch(1)
            .messages()
            .await
            .map_err(|e| BusError::subscribe(self.subjects.full(M::SUBJECT), e))?;
        Ok(WorkQueue { consumer, messages, _type: PhantomData })
    }
}

/// `error` and its causes, outermost first.
pub fn error_chain<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| e.source())
}

/// `error` and its causes in one line, joined by `: ` (what a log line or a test
/// message should show of an error whose causes are sources).
pub fn error_chain_text(error: &(dyn std::error::Error + 'static)) -> String {
    error_chain(error).map(ToString::to_string).collect::<Vec<_>>().join(": ")
}

/// Whether a set-up failure is a JetStream request that got no answer in time.
fn timed_out(error: &BusError) -> bool {
    error_chain(error).any(|e| e.to_string().contains("timed out"))
}

/// Picks rustls' crypto provider for the process once. async-nats builds its TLS
/// configuration from the process default, and with both of rustls' providers
/// compiled in (async-nats enables `ring` and `aws-lc-rs`) there is none: the
/// first TLS connection would panic. `ring` is the one the HTTP clients use.
fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err: a provider is installed already (by the embedding program), which is fine.
        let _ = async_nats::rustls::crypto::ring::default_provider().install_default();
    });
}

async fn options(
    config: &NatsConfig,
    disconnected: Arc<watch::Sender<u64>>,
    violations: Violations,
    closing: Arc<AtomicBool>,
) -> Result<ConnectOptions, BusError> {
    install_tls_provider();
    let mut options = ConnectOptions::new()
        .name(&config.client_name)
        .custom_inbox_prefix(permissions::inbox_prefix(config.user.as_deref()))
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let disconnected = disconnected.clone();
            let violations = violations.clone();
            let closing = closing.clone();
            async move {
                match event {
                    async_nats::Event::Disconnected if closing.load(Ordering::SeqCst) => {
                        debug!("NATS connection closed.");
                    }
                    async_nats::Event::Disconnected => {
                        disconnected.send_modify(|n| *n += 1);
                        warn!("Disconnected from NATS, reconnecting.");
                    }
                    async_nats::Event::Connected => info!("Reconnected to NATS."),
                    async_nats::Event::LameDuckMode => info!("The NATS server is shutting down (lame duck mode)."),
                    async_nats::Event::ServerError(async_nats::ServerError::Other(e)) if violations.report(&e) => {}
                    other => debug!(event = %other, "NATS client event."),
                }
            }
        });
    if config.retain_servers_order {
        options = options.retain_servers_order();
    }
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.expose_secret().to_owned());
    }
    if let Some(token) = &config.token {
        options = options.token(token.expose_secret().to_owned());
    }
    if let Some(path) = &config.creds_file {
        options = options.credentials_file(path).await.map_err(|e| BusError::Auth(e.into()))?;
    }
    if let Some(ca) = &config.tls_ca {
        // The server's certificate must chain to this CA and name the host dialled.
        options = options.require_tls(true).add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &config.tls_client {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options)
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.75 + rand::random::<f64>() * 0.5)
}

/// How a work-queue consumer is created (the first binder's options stick: the
/// consumer is durable).
#[derive(Debug, Clone, Copy)]
pub struct WorkQueueOptions {
    /// How long a delivery may go without ack or in-progress signal before redelivery.
    pub ack_wait: Duration,
    /// How many deliveries before the server gives up on a message.
    pub max_deliver: i64,
}

impl Default for WorkQueueOptions {
    fn default() -> Self {
        Self { ack_wait: Duration::from_secs(60), max_deliver: 5 }
    }
}

/// One message from a subscription: decoded, or reported as undecodable.
#[derive(Debug)]
pub enum Received<M> {
    Message(M),
    Undecodable { subject: String, error: String },
}

/// A core-NATS subscription yielding typed messages.
pub struct TypedSubscriber<M> {
    inner: Subscriber,
    _type: PhantomData<fn() -> M>,
}

impl<M: Message> TypedSubscriber<M> {
    /// The next message; `None` when the subscription ends.
    pub async fn next(&mut self) -> Option<Received<M>> {
        let msg = self.inner.next().await?;
        Some(match crate::schema::decode(&msg.payload) {
            Ok(m) => Received::Message(m),
            Err(e) => {
                warn!(subject = %msg.subject, error = %e, "Unreadable message (undecodable, or a schema version this release does not read) ignored.");
                Received::Undecodable { subject: msg.subject.to_string(), error: e.to_string() }
            }
        })
    }
}

/// The durable consumer of one work-queue command.
pub struct WorkQueue<M> {
    consumer: PullConsumer,
    messages: jetstream::consumer::pull::Stream,
    _type: PhantomData<fn() -> M>,
}

impl<M: Message> WorkQueue<M> {
    /// The next delivery; `None` when the stream ends. Transient pull errors
    /// (a reconnect, a missed heartbeat) are logged and skipped.
    pub async fn next(&mut self) -> Option<Delivery<M>> {
        loop {
            match self.messages.next().await? {
                Ok(msg) => return Some(Delivery::new(msg)),
                Err(e) => {
                    warn!(error = %e, "Work queue pull error, continuing.");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// How many messages wait for this consumer (its lag).
    ///
    /// # Errors
    /// The server did not answer.
    pub async fn pending(&mut self) -> Result<u64, BusError> {
        let info = self.consumer.info().await.map_err(|e| BusError::stream("work-queue consumer info", e))?;
        Ok(info.num_pending)
    }
}

/// One delivery of a work-queue command: decoded payload plus the ack handle.
pub struct Delivery<M> {
    msg: jetstream::Message,
    payload: Result<M, String>,
    key: DeliveryKey,
}

impl<M: Message> Delivery<M> {
    fn new(msg: jetstream::Message) -> Self {
        let key = DeliveryKey::new(msg.info().map(|i| i.stream_sequence).unwrap_or(0), &msg.payload);
        let payload = decode_command(&msg.payload, &key);
        Self { msg, payload, key }
    }

    /// What identifies this command on every delivery (see [`DeliveryKey`]).
    pub fn key(&self) -> &DeliveryKey {
        &self.key
    }

    /// The decoded command, or why it could not be decoded (terminate such a message).
    ///
    /// # Errors
    /// The payload is not valid JSON for `M`.
    pub fn payload(&self) -> Result<&M, &str> {
        self.payload.as_ref().map_err(String::as_str)
    }

    /// The raw bytes (for logging an undecodable payload).
    pub fn raw(&self) -> &[u8] {
        &self.msg.payload
    }

    /// The message's headers (`Nats-Msg-Id`, the W3C trace context).
    pub fn headers(&self) -> Option<&HeaderMap> {
        self.msg.headers.as_ref()
    }

    /// How many times this message has been delivered (1 on the first delivery).
    pub fn delivered(&self) -> i64 {
        self.msg.info().map(|i| i.delivered).unwrap_or(1)
    }

    /// The stream sequence, stable across redeliveries.
    pub fn stream_sequence(&self) -> u64 {
        self.msg.info().map(|i| i.stream_sequence).unwrap_or(0)
    }

    /// Acknowledges and waits for the server to confirm, so the message is not redelivered.
    ///
    /// # Errors
    /// The server did not confirm the ack.
    pub async fn ack(&self) -> Result<(), BusError> {
        self.msg.double_ack().await.map_err(BusError::Ack)
    }

    /// Tells the server the work is still going (resets the ack timer).
    ///
    /// # Errors
    /// The signal could not be sent.
    pub async fn in_progress(&self) -> Result<(), BusError> {
        self.msg.ack_with(AckKind::Progress).await.map_err(BusError::Ack)
    }

    /// Asks for redelivery after `delay` (a transient failure).
    ///
    /// # Errors
    /// The signal could not be sent.
    pub async fn nak(&self, delay: Option<Duration>) -> Result<(), BusError> {
        self.msg.ack_with(AckKind::Nak(delay)).await.map_err(BusError::Ack)
    }

    /// Stops redelivery for good (an invalid command).
    ///
    /// # Errors
    /// The signal could not be sent.
    pub async fn term(&self) -> Result<(), BusError> {
        self.msg.ack_with(AckKind::Term).await.map_err(BusError::Ack)
    }
}

/// Decodes a command of a schema version this release reads ([`crate::schema`]);
/// one written without an `event_id` gets its delivery key's, so every delivery
/// of it carries the same id (serde's default would draw a new random one at
/// each decode).
fn decode_command<M: Message>(raw: &[u8], key: &DeliveryKey) -> Result<M, String> {
    let value: serde_json::Value = serde_json::from_slice(raw).map_err(|e| format!("{}: {e}", M::SUBJECT))?;
    let explicit = value.get("event_id").is_some();
    let mut command: M = crate::schema::decode_value(value).map_err(|e| e.to_string())?;
    if !explicit {
        command.set_event_id(key.command_id());
    }
    Ok(command)
}
