//! KEDA's `nats-jetstream` scaler, as far as a single server goes: the query it
//! makes against the NATS monitoring endpoint and the lag it computes, so a test
//! can see what the ScaledJob would see.
//!
//! Taken from `pkg/scalers/nats_jetstream_scaler.go` (KEDA 2.20): one
//! `GET <endpoint>/jsz?acc=<account>&consumers=true&config=true`, the account
//! by name, the stream by name, the consumer by name; the lag is the consumer's
//! `num_pending + num_ack_pending`. Since kedacore/keda#7668 (2.20) a stream
//! without that consumer is an error, no longer the stream's last sequence.
//!
//! On a cluster ([`jetstream_lag_clustered`]) the scaler first reads that `/jsz`
//! on its endpoint (a headless Service: any server); when `meta_cluster.cluster_size`
//! is over 1 it reads `/varz` there, then, for each server the cluster advertises
//! (`connect_urls`, or without them the server's own name and its routes' names,
//! each prefixed to the endpoint's host), that server's `/varz` for its name and
//! its `/jsz` on the endpoint's port, and uses the answer of the server that
//! leads the consumer (`consumer_detail[].cluster.leader`); if none claims it,
//! the endpoint's first answer.

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
    let jsz = get_json(monitoring_url, &jsz_path(account))?;
    lag_in(&jsz, account, stream, consumer).map(|(lag, _)| lag)
}

fn jsz_path(account: &str) -> String {
    format!("/jsz?acc={account}&consumers=true&config=true")
}

/// The lag KEDA's scaler reports on a cluster, and the `server_name` of the
/// server whose answer it used (the consumer's leader when one claimed it).
///
/// # Errors
/// As [`jetstream_lag`], or a server the cluster advertises did not answer
/// (KEDA then reports that error).
pub fn jetstream_lag_clustered(
    endpoint: &str,
    account: &str,
    stream: &str,
    consumer: &str,
) -> Result<(u64, String), String> {
    let first = get_json(endpoint, &jsz_path(account))?;
    // On a cluster the endpoint's answer may lack the stream (one of fewer
    // replicas than servers): KEDA goes on to the other servers.
    let endpoint_answer = lag_in(&first, account, stream, consumer).map(|(lag, _)| lag);
    let varz = get_json(endpoint, "/varz")?;
    let endpoint_name = varz["server_name"].as_str().unwrap_or_default().to_owned();
    if first["meta_cluster"]["cluster_size"].as_u64().unwrap_or(0) <= 1 {
        return Ok((endpoint_answer?, endpoint_name));
    }
    let (scheme_host, port) = endpoint.rsplit_once(':').ok_or(format!("{endpoint}: no port"))?;
    let scheme = scheme_host.split("://").next().unwrap_or("http");
    let advertised: Vec<String> = varz["connect_urls"]
        .as_array()
        .map(|a| a.iter().filter_map(|u| u.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    if !advertised.is_empty() {
        for url in advertised {
            let host = url.split(':').next().unwrap_or_default();
            let node_url = format!("{scheme}://{host}:{port}");
            let node = get_json(&node_url, "/varz")?["server_name"].as_str().unwrap_or_default().to_owned();
            let jsz = get_json(&node_url, &jsz_path(account))?;
            if let Ok((lag, leader)) = lag_in(&jsz, account, stream, consumer)
                && leader == node
            {
                return Ok((lag, node));
            }
        }
    } else {
        // Not advertised: the server's own name and its routes', each as
        // `<name>.<endpoint host>` (a pod's name under its headless Service).
        let endpoint_host = scheme_host.split("://").nth(1).unwrap_or_default();
        let mut names = vec![endpoint_name.clone()];
        names.extend(
            varz["cluster"]["urls"]
                .as_array()
                .map(|a| a.iter().filter_map(|u| u.as_str().map(str::to_owned)).collect::<Vec<_>>())
                .unwrap_or_default(),
        );
        for name in names {
            let node = name.split('.').next().unwrap_or_default().to_owned();
            let jsz = get_json(&format!("{scheme}://{node}.{endpoint_host}:{port}"), &jsz_path(account))?;
            if let Ok((lag, leader)) = lag_in(&jsz, account, stream, consumer)
                && leader == node
            {
                return Ok((lag, node));
            }
        }
    }
    Ok((endpoint_answer?, endpoint_name))
}

/// The `server_name` of `consumer`'s leader as the server at `monitoring_url`
/// reports it in KEDA's query (empty on a single server).
///
/// # Errors
/// As [`jetstream_lag`].
pub fn consumer_leader(monitoring_url: &str, account: &str, stream: &str, consumer: &str) -> Result<String, String> {
    let jsz = get_json(monitoring_url, &jsz_path(account))?;
    lag_in(&jsz, account, stream, consumer).map(|(_, leader)| leader)
}

/// The consumer's lag in one `/jsz` answer, and its leader's name (empty on a single server).
fn lag_in(jsz: &serde_json::Value, account: &str, stream: &str, consumer: &str) -> Result<(u64, String), String> {
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
    let leader = c["cluster"]["leader"].as_str().unwrap_or_default().to_owned();
    Ok((count("num_pending")? + count("num_ack_pending")?, leader))
}

/// A plain HTTP/1.0 GET (no chunked answer) of `path` on `base` (`http://host:port`), decoded as JSON.
pub(crate) fn get_json(base: &str, path: &str) -> Result<serde_json::Value, String> {
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
