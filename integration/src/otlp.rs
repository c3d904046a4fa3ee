//! A stand-in for an OpenTelemetry collector: an HTTP/1.1 server on a random
//! loopback port accepting `POST /v1/traces` (OTLP over HTTP, binary protobuf),
//! decoding each body as an `ExportTraceServiceRequest` with the official
//! protobuf definitions (`opentelemetry-proto`, prost) and keeping every span.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One exported span and the `service.name` of the process that sent it.
#[derive(Debug, Clone)]
pub struct CollectedSpan {
    pub service: String,
    pub span: Span,
}

impl CollectedSpan {
    pub fn name(&self) -> &str {
        &self.span.name
    }

    /// The trace id, lowercase hex (as in `traceparent`).
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// The parent's span id in hex; empty for a root span.
    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// `(trace id, span id)` of every link, in hex.
    pub fn links(&self) -> Vec<(String, String)> {
        self.span.links.iter().map(|l| (hex(&l.trace_id), hex(&l.span_id))).collect()
    }

    /// A string, integer, float or boolean attribute, as text.
    pub fn attribute(&self, key: &str) -> Option<String> {
        let kv = self.span.attributes.iter().find(|kv| kv.key == key)?;
        Some(match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            Value::DoubleValue(d) => d.to_string(),
            Value::BoolValue(b) => b.to_string(),
            other => format!("{other:?}"),
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Default)]
struct State {
    spans: Vec<CollectedSpan>,
    /// Every request line seen, with its answer's status.
    requests: Vec<String>,
}

/// The collector. Stops listening on drop.
pub struct OtlpCollector {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for OtlpCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpCollector").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl OtlpCollector {
    /// Listens on a random loopback port.
    ///
    /// # Panics
    /// When no port can be bound.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind collector");
        let addr = listener.local_addr().expect("collector addr");
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, &state).await;
                });
            }
        });
        Self { addr, state, task }
    }

    /// The value for `OTEL_EXPORTER_OTLP_ENDPOINT` (exporters append `/v1/traces`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.state.lock().unwrap().spans.clone()
    }

    /// Every request received so far (`POST /v1/traces 200`).
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

impl Drop for OtlpCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves one connection's requests (exporters keep connections alive).
async fn serve(stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).await? == 0 {
            return Ok(());
        }
        let request_line = request_line.trim_end().to_owned();
        let mut length = 0usize;
        let mut content_type = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "content-type" => content_type = value.trim().to_ascii_lowercase(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).await?;
        let status = if !request_line.starts_with("POST /v1/traces ") {
            "404 Not Found"
        } else if content_type != "application/x-protobuf" {
            "415 Unsupported Media Type"
        } else {
            match ExportTraceServiceRequest::decode(body.as_slice()) {
                Ok(export) => {
                    let mut state = state.lock().unwrap();
                    for resource_spans in export.resource_spans {
                        let service = resource_spans
                            .resource
                            .iter()
                            .flat_map(|r| &r.attributes)
                            .find(|kv| kv.key == "service.name")
                            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                                Value::StringValue(s) => Some(s.clone()),
                                _ => None,
                            })
                            .unwrap_or_default();
                        for scope_spans in resource_spans.scope_spans {
                            for span in scope_spans.spans {
                                state.spans.push(CollectedSpan { service: service.clone(), span });
                            }
                        }
                    }
                    "200 OK"
                }
                Err(_) => "400 Bad Request",
            }
        };
        state.lock().unwrap().requests.push(format!("{request_line} {status}"));
        // An empty ExportTraceServiceResponse encodes to zero bytes.
        let answer = format!("HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n");
        reader.get_mut().write_all(answer.as_bytes()).await?;
    }
}
