//! NATS over TLS (issue 21, item 5, the client side): a real nats-server with
//! certificates made here, and the bus every stage connects through. The
//! server's certificate must chain to `NATS_TLS_CA` and name the address dialled;
//! a server that verifies clients gets `NATS_TLS_CERT`/`NATS_TLS_KEY`.

use std::path::{Path, PathBuf};

use mnistflow_integration::NatsServer;
use mnistflow_nats::{Bus, BusError, DatasetDownload, NatsConfig};
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
    let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages =
        vec![if client { ExtendedKeyUsagePurpose::ClientAuth } else { ExtendedKeyUsagePurpose::ServerAuth }];
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
    let mut env: Vec<(String, String)> =
        vec![("NATS_URL".into(), server.url()), ("NATS_CONNECT_TIMEOUT_SECS".into(), "2".into())];
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
