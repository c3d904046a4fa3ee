//! `mnistflow backup` and `mnistflow restore` (issue 21, item 4): an installation
//! made by `mnistflow up` (a real nats-server, the real stages, a model trained on
//! the real MNIST) is backed up while it runs, restored into an empty one (another
//! nats-server, an empty store), and `up` there serves the same version, with the
//! same event history, without downloading or training anything.

mod common;

use std::process::Output;

use mnistflow_integration::NatsServer;

use crate::common::{Up, mnistflow};

fn ok(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{what}: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn events(nats_url: &str) -> Vec<String> {
    ok(&mnistflow(&[("NATS_URL", nats_url)], &["events", "--json"]), "events").lines().map(str::to_owned).collect()
}

#[test]
fn a_backup_restored_into_an_empty_installation_serves_the_same_version_with_the_same_history() {
    let a = tempfile::tempdir().unwrap();
    let mut up = Up::start(a.path(), "a.log", &[]);
    let served = up.wait_served();
    let nats_a = format!("nats://127.0.0.1:{}", up.nats);
    let store_a = a.path().join("store").display().to_string();
    let history = events(&nats_a);
    assert!(history.iter().any(|e| e.contains("model.published")), "{history:?}");
    let backup = a.path().join("backup");
    let backup_arg = backup.display().to_string();
    let said = ok(&mnistflow(&[("NATS_URL", &nats_a), ("STORE_URL", &store_a)], &["backup", &backup_arg]), "backup");
    assert!(said.starts_with("Backed up "), "{said}");
    let (status, log) = up.interrupt();
    assert_eq!(status.code(), Some(0), "{log}");

    // An empty installation: its own nats-server, an empty store.
    let b = tempfile::tempdir().unwrap();
    let nats_b = NatsServer::start();
    let store_b = b.path().join("store").display().to_string();
    let restore =
        |store: &str| mnistflow(&[("NATS_URL", &nats_b.url()), ("STORE_URL", store)], &["restore", &backup_arg]);

    // A damaged backup is refused before anything is written.
    let damaged = a.path().join("damaged");
    copy_dir(&backup, &damaged);
    let model = std::fs::read_dir(damaged.join("store/models/mnist-cnn"))
        .unwrap()
        .map(|e| e.unwrap().path().join("model.pt"))
        .find(|p| p.is_file())
        .expect("a model in the backup");
    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&model, bytes).unwrap();
    let out = mnistflow(
        &[("NATS_URL", &nats_b.url()), ("STORE_URL", &store_b)],
        &["restore", &damaged.display().to_string()],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SHA-256"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(events(&nats_b.url()).is_empty(), "a refused restore published messages");

    let said = ok(&restore(&store_b), "restore");
    assert!(said.starts_with("Restored "), "{said}");
    assert_eq!(events(&nats_b.url()), history, "the event history differs after the restore");
    // Headers came back too: the first event, published again with its
    // Nats-Msg-Id, is recognised as a duplicate by the restored stream.
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(backup.join("streams/MNIST_EVENTS.jsonl")).unwrap().lines().next().unwrap(),
    )
    .unwrap();
    let msg_id = first["headers"]["Nats-Msg-Id"][0].as_str().expect("a Nats-Msg-Id in the backup").to_owned();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let duplicate = runtime.block_on(async {
        let client = mnistflow_nats::async_nats::connect(nats_b.url()).await.unwrap();
        let js = mnistflow_nats::async_nats::jetstream::new(client);
        let mut headers = mnistflow_nats::async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        let payload = first["payload"].as_str().unwrap().to_owned();
        let subject = first["subject"].as_str().unwrap().to_owned();
        js.publish_with_headers(subject, headers, payload.into()).await.unwrap().await.unwrap().duplicate
    });
    assert!(duplicate, "the restored stream did not know the first event's Nats-Msg-Id {msg_id}");

    // Restoring again would mix two installations: refused.
    let out = restore(&store_b);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"), "{}", String::from_utf8_lossy(&out.stderr));

    // The store alone moves to another place (a volume to a bucket), NATS untouched.
    let c = tempfile::tempdir().unwrap();
    let store_c = c.path().join("moved").display().to_string();
    let said =
        ok(&mnistflow(&[("STORE_URL", &store_c)], &["restore", "--store-only", &backup_arg]), "restore --store-only");
    assert!(said.contains("messages (none)"), "{said}");
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&mnistflow(&[("STORE_URL", &store_c)], &["models", "list", "--json"]), "models list"))
            .unwrap();
    assert_eq!(listed["current"], served.as_str(), "{listed}");

    // `up` on the restored installation serves the same version, trains and downloads nothing.
    // The versions are signed by the first installation's key, which a backup does not
    // hold (README, "Backup and restore"): the restored installation is given that key pair.
    copy_dir(&a.path().join("keys"), &b.path().join("keys"));
    let mut up = Up::start(b.path(), "b.log", &[("NATS_URL", &nats_b.url())]);
    assert_eq!(up.wait_served(), served, "the restored installation serves another version");
    let (status, log) = up.interrupt();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("Reusing data set") && !log.contains("requesting"), "{log}");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
