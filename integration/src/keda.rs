//! KEDA's `nats-jetstream` scaler, as far as a single server goes: the query it
//! makes against the NATS monitoring endpoint and the lag it computes, so a test
//! can see what the ScaledJob would see.
//!
//! Taken from `pkg/scalers/nats_jetstream_scaler.go` (KEDA 2.20): one
//! `GET <endpoint>/jsz?acc=<account>&consumers=true&config=true`, the account
//! by name, the stream by name, the consumer by name; the lag is the consumer's
//! `num_pending + num_ack_pending`. Since kedacore/keda#7668 (2.20) a stream
//! without that consumer is an error, no longer the stream's last sequence.
//! The clustered path (`/varz`, then each server's `/jsz` to find the consumer's
//! leader) is not reproduced here.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The lag KEDA's scaler would report for `consumer` on `stream`, or the error
/// it would report instead.
///
/// # Errors
/// The endpoint did not answer with JSON, or the account, stream or consumer is
/// missing from the answer (the scaler then reports an error, and the ScaledJob
/// never starts a Job).
pub fn jetstream_lag(monitoring_url: &str, account: &str, stream: &str, consumer: &str) -> Result<u64, String> {
    let jsz = get_json(monitoring_url, &format!("/jsz?acc={account}&consumers=true&config=true"))?;
    let accounts = jsz["account_details"].as_array().ok_or("no account_details in /jsz")?;
    let acc = accounts.iter().find(|a| a["name"] == account).ok_or(format!("account {account} not found"))?;
    let streams = acc["stream_detail"].as_array().map(Vec::as_slice).unwrap_or_default();
    let s = streams.iter().find(|s| s["name"] == stream).ok_or("stream not found")?;
    let consumers = s["consumer_detail"].as_array().map(Vec::as_slice).unwrap_or_default();
    let c = consumers
        .iter()
        .find(|c| c["name"] == consumer)
        .ok_or(format!("consumer {consumer:?} not found in stream {stream:?}"))?;
    let count = |key: &str| c[key].as_u64().ok_or(format!("consumer {consumer}: no {key}"));
    Ok(count("num_pending")? + count("num_ack_pending")?)
}

/// A plain HTTP/1.0 GET (no chunked answer) of `path` on `base` (`http://host:port`), decoded as JSON.
fn get_json(base: &str, path: &str) -> Result<serde_json::Value, String> {
    let host = base.strip_prefix("http://").ok_or(format!("{base}: not an http:// URL"))?.trim_end_matches('/');
    let mut conn = TcpStream::connect(host).map_err(|e| format!("{host}: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).map_err(|e| format!("{host}{path}: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").ok_or(format!("{host}{path}: no HTTP header"))?;
    if head.split(" ").nth(1) != Some("200") {
        return Err(format!("{host}{path}: {}", head.lines().next().unwrap_or_default()));
    }
    serde_json::from_str(body).map_err(|e| format!("{host}{path}: {e}"))
}
