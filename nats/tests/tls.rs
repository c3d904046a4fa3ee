//! NATS over TLS (issue 21, item 5, the client side): a real nats-server with
//! certificates made here, and the bus every stage connects through. The
//! server's certificate must chain to `NATS_TLS_CA` and name the address dialled;
//! a server that verifies clients gets `NATS_TLS_CERT`/`NATS_TLS_KEY`. The
//! cluster test runs three servers with TLS on client connections and on routes,
//! as k8s/components/nats-tls configures them.

use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use mnistflow_integration::{ClusterTls, NatsCluster, NatsServer};
use mnistflow_nats::{Bus, BusError, DatasetDownload, NatsConfig, streams};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// Writes `<name>.pem` and `<name>.key` signed by `ca` for `names` (IP
/// addresses become IP SANs) and returns their paths.
fn leaf(
    dir: &Path,
    name: &str,
    ca: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    client: bool,
) -> (PathBuf, PathBuf) {
    let usage = if client { ExtendedKeyUsagePurpose::ClientAuth } else { ExtendedKeyUsagePurpose::ServerAuth };
    leaf_for(dir, name, ca, names, vec![usage])
}

/// As [`leaf`], with the extended key usages given (a route certificate is
/// presented as a server's and as a client's).
fn leaf_for(
    dir: &Path,
    name: &str,
    ca: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    usages: Vec<ExtendedKeyUsagePurpose>,
) -> (PathBuf, PathBuf) {
    let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = usages;
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

fn write_ca(dir: &Path, name: &str, ca: &CertifiedIssuer<'static, KeyPair>) -> PathBuf {
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, ca.pem()).unwrap();
    path
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

async fn connect(server: &NatsServer, vars: &[(&str, &Path)]) -> Result<Bus, BusError> {
    connect_to(&server.url(), &[], vars).await
}

async fn connect_to(url: &str, settings: &[(&str, &str)], vars: &[(&str, &Path)]) -> Result<Bus, BusError> {
    let mut env: Vec<(String, String)> =
        vec![("NATS_URL".into(), url.to_owned()), ("NATS_CONNECT_TIMEOUT_SECS".into(), "2".into())];
    env.extend(settings.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    env.extend(vars.iter().map(|(k, v)| ((*k).to_owned(), path(v).to_owned())));
    let config = NatsConfig::from_lookup(|k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())).unwrap();
    Bus::connect(&config, &CancellationToken::new()).await
}

/// A round trip through JetStream: streams created, a command published and stored.
async fn works(bus: &Bus) {
    bus.ensure_streams().await.unwrap();
    let published = bus.publish(&DatasetDownload::default()).await.unwrap();
    assert_eq!(published.sequence, 1);
}

/// The error with its causes (what the stage's `main` prints).
fn refused(result: Result<Bus, BusError>, what: &str) -> String {
    match result {
        Ok(_) => panic!("{what}: connected"),
        Err(e) => mnistflow_nats::error_chain_text(&e),
    }
}

#[tokio::test]
async fn the_bus_verifies_the_server_certificate_against_nats_tls_ca() {
    let dir = TempDir::new().unwrap();
    let ca = new_ca("mnistflow test CA");
    let ca_file = write_ca(dir.path(), "ca", &ca);
    let (cert, key) = leaf(dir.path(), "server", &ca, &["127.0.0.1", "localhost"], false);
    let server = NatsServer::start_with_args(&["--tls", "--tlscert", path(&cert), "--tlskey", path(&key)]);

    let bus = connect(&server, &[("NATS_TLS_CA", &ca_file)]).await.expect("TLS with the right CA");
    works(&bus).await;

    // No CA given: the system's roots do not know ours, and nothing falls back to clear text.
    let error = refused(connect(&server, &[]).await, "without NATS_TLS_CA");
    assert!(error.to_lowercase().contains("certificate") || error.contains("tls"), "{error}");
    // Another CA: refused.
    let other = write_ca(dir.path(), "other-ca", &new_ca("someone else's CA"));
    refused(connect(&server, &[("NATS_TLS_CA", &other)]).await, "with another CA");
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused() {
    let dir = TempDir::new().unwrap();
    let ca = new_ca("mnistflow test CA");
    let ca_file = write_ca(dir.path(), "ca", &ca);
    let (cert, key) = leaf(dir.path(), "server", &ca, &["nats.example"], false);
    let server = NatsServer::start_with_args(&["--tls", "--tlscert", path(&cert), "--tlskey", path(&key)]);
    let error =
        refused(connect(&server, &[("NATS_TLS_CA", &ca_file)]).await, "a certificate for nats.example at 127.0.0.1");
    assert!(error.to_lowercase().contains("certificate"), "{error}");
}

#[tokio::test]
async fn a_server_that_verifies_clients_admits_only_a_client_certificate_from_its_ca() {
    let dir = TempDir::new().unwrap();
    let ca = new_ca("mnistflow test CA");
    let ca_file = write_ca(dir.path(), "ca", &ca);
    let (cert, key) = leaf(dir.path(), "server", &ca, &["127.0.0.1"], false);
    let server = NatsServer::start_with_args(&[
        "--tlsverify",
        "--tlscert",
        path(&cert),
        "--tlskey",
        path(&key),
        "--tlscacert",
        path(&ca_file),
    ]);
    refused(connect(&server, &[("NATS_TLS_CA", &ca_file)]).await, "without a client certificate");
    let (client_cert, client_key) = leaf(dir.path(), "trainer", &ca, &["trainer"], true);
    let bus =
        connect(&server, &[("NATS_TLS_CA", &ca_file), ("NATS_TLS_CERT", &client_cert), ("NATS_TLS_KEY", &client_key)])
            .await
            .expect("mutual TLS");
    works(&bus).await;
    let stranger_ca = new_ca("someone else's CA");
    let (stranger_cert, stranger_key) = leaf(dir.path(), "stranger", &stranger_ca, &["stranger"], true);
    refused(
        connect(
            &server,
            &[("NATS_TLS_CA", &ca_file), ("NATS_TLS_CERT", &stranger_cert), ("NATS_TLS_KEY", &stranger_key)],
        )
        .await,
        "a client certificate from another CA",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_server_cluster_over_tls_replicates_a_stream_refuses_a_client_without_the_ca_and_serves_a_renewed_certificate_after_a_reload()
 {
    let dir = TempDir::new().unwrap();
    let ca = new_ca("mnistflow test CA");
    let ca_file = write_ca(dir.path(), "ca", &ca);
    // The addresses dialled (clients) and routed to (servers): 127.0.0.1-3.
    let hosts = mnistflow_integration::CLUSTER_HOSTS;
    let (server_cert, server_key) = leaf(dir.path(), "server", &ca, &hosts, false);
    let server_files = (server_cert.clone(), server_key.clone());
    let (routes_cert, routes_key) = leaf_for(
        dir.path(),
        "routes",
        &ca,
        &hosts,
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
    );
    let cluster = NatsCluster::start_with_tls(ClusterTls {
        server_cert,
        server_key,
        routes_cert,
        routes_key,
        routes_ca: ca_file.clone(),
    });

    // Every route port speaks only TLS (a clear-text peer gets no INFO, only a
    // close): the routes that formed the cluster are TLS connections.
    for i in 0..hosts.len() {
        let greeting = cluster.route_port_greeting(i).unwrap();
        assert!(greeting.is_none(), "{}: the route port answers clear text: {greeting:?}", cluster.name(i));
    }

    // A stage verifying the servers against the CA: streams of three replicas, a command stored.
    let url = cluster.urls_from(0);
    let bus = connect_to(&url, &[("NATS_STREAM_REPLICAS", "3")], &[("NATS_TLS_CA", &ca_file)])
        .await
        .expect("a client with NATS_TLS_CA connects to the TLS cluster");
    works(&bus).await;
    let stream = bus.subjects().stream_name(streams::COMMANDS);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match cluster.stream_replicas(&stream) {
            Ok((3, followers)) if followers.len() == 2 && followers.iter().all(|(_, current)| *current) => break,
            state => assert!(
                Instant::now() < deadline,
                "{stream}: not three current replicas over the TLS routes within 20 s: {state:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Without the CA (the system's roots do not know it), and in clear text: refused.
    let error = refused(connect_to(&url, &[], &[]).await, "a client without NATS_TLS_CA");
    assert!(error.to_lowercase().contains("certificate") || error.contains("tls"), "{error}");

    // A renewal: the client port's certificate rewritten in place (as the kubelet
    // updates a mounted Secret), here by another CA so the change shows, then each
    // server reloaded. New connections get the new certificate; the stage connected
    // before keeps working.
    let renewed_ca = new_ca("mnistflow renewed CA");
    let renewed_ca_file = write_ca(dir.path(), "renewed-ca", &renewed_ca);
    let (cert, key) = leaf(dir.path(), "renewed", &renewed_ca, &hosts, false);
    std::fs::copy(&cert, &server_files.0).unwrap();
    std::fs::copy(&key, &server_files.1).unwrap();
    for i in 0..hosts.len() {
        cluster.reload(i);
    }
    refused(connect_to(&url, &[], &[("NATS_TLS_CA", &ca_file)]).await, "the old CA after the renewal and reload");
    let renewed = connect_to(&url, &[("NATS_STREAM_REPLICAS", "3")], &[("NATS_TLS_CA", &renewed_ca_file)])
        .await
        .expect("the renewed certificate is served after the reload");
    renewed.ensure_streams().await.unwrap();
    let published = bus.publish(&DatasetDownload::default()).await.expect("the stage connected before the reload");
    assert_eq!(published.sequence, 2);
}
