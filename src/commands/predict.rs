//! `mnistflow predict`: classify image files over NATS or the inference HTTP API.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow};
use mnistflow_nats::{Bus, PredictClient, PredictReply};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{CliError, Exit};

use super::{nats_config, print_json};

pub(super) async fn predict(
    files: &[std::path::PathBuf],
    url: Option<&str>,
    timeout: Duration,
    json: bool,
    shutdown: &CancellationToken,
) -> Result<Exit, CliError> {
    let bus = match url {
        Some(_) => None,
        None => Some(Bus::connect(&nats_config()?, shutdown).await?),
    };
    let http = reqwest::Client::builder().timeout(timeout).build().map_err(|e| CliError::new(Exit::Usage, e))?;
    let mut exit = Exit::Ok;
    for file in files {
        let bytes = std::fs::read(file).map_err(|e| CliError::new(Exit::Usage, anyhow!("{}: {e}", file.display())))?;
        // One trace per prediction when OTEL_EXPORTER_OTLP_ENDPOINT is set.
        let span = tracing::debug_span!("predict", file = %file.display(), otel.kind = "client");
        let reply = match (&bus, url) {
            (Some(bus), _) => predict_nats(bus, bytes, timeout).instrument(span).await?,
            (None, Some(url)) => predict_http(&http, url, file, bytes).instrument(span).await?,
            (None, None) => unreachable!(),
        };
        match &reply {
            PredictReply::Ok(p) => {
                if json {
                    print_json(
                        &serde_json::json!({"file": file, "digit": p.digit, "probabilities": p.probabilities, "model_version": p.model_version}),
                    );
                } else {
                    let confidence = p.probabilities.get(usize::from(p.digit)).copied().unwrap_or_default();
                    outln!("{}: {} ({:.1} %, model {})", file.display(), p.digit, confidence * 100.0, p.model_version);
                }
            }
            PredictReply::Err(e) => {
                exit = Exit::Failed;
                if json {
                    print_json(&serde_json::json!({"file": file, "error": e.error}));
                } else {
                    eprintln!("{}: error {}: {}", file.display(), e.error.code, e.error.message);
                }
            }
        }
    }
    Ok(exit)
}

pub(super) async fn predict_nats(bus: &Bus, bytes: Vec<u8>, timeout: Duration) -> Result<PredictReply, CliError> {
    use mnistflow_nats::PredictRequestError;
    match PredictClient::new(bus.clone()).predict(bytes.into(), timeout).await {
        Ok(reply) => Ok(reply),
        Err(PredictRequestError::Timeout(_)) => {
            Err(CliError::new(Exit::Unavailable, anyhow!("no prediction within {timeout:?}")))
        }
        Err(e @ PredictRequestError::BadReply(_)) => Err(CliError::new(Exit::Failed, e)),
        Err(e) => Err(CliError::new(Exit::Unavailable, e)),
    }
}

pub(super) async fn predict_http(
    http: &reqwest::Client,
    url: &str,
    file: &Path,
    bytes: Vec<u8>,
) -> Result<PredictReply, CliError> {
    let base = url.trim_end_matches('/');
    let endpoint = if base.ends_with("/predict") {
        base.to_owned()
    } else {
        // The web tier serves /api/predict, the inference service /v1/predict; ask which one this is.
        let web = http.get(format!("{base}/api/config")).send().await.map(|r| r.status().is_success()).unwrap_or(false);
        format!("{base}{}", if web { "/api/predict" } else { "/v1/predict" })
    };
    let mime = match file.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("bmp") => "image/bmp",
        Some("webp") => "image/webp",
        Some("tif" | "tiff") => "image/tiff",
        _ => "application/octet-stream",
    };
    let mut request = http.post(&endpoint).header("content-type", mime);
    if let Some(traceparent) = mnistflow_nats::telemetry::traceparent(&tracing::Span::current()) {
        request = request.header("traceparent", traceparent);
    }
    let response = request
        .body(bytes)
        .send()
        .await
        .with_context(|| format!("POST {endpoint}"))
        .map_err(|e| CliError::new(Exit::Unavailable, e))?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| CliError::new(Exit::Unavailable, e))?;
    serde_json::from_slice(&body).map_err(|e| {
        CliError::new(
            Exit::Failed,
            anyhow!("{endpoint} answered {status} with an unexpected body ({e}): {}", String::from_utf8_lossy(&body)),
        )
    })
}
