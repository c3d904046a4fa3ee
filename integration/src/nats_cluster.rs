//! A real three-server JetStream cluster on loopback: one `nats-server` on each
//! of 127.0.0.1, 127.0.0.2 and 127.0.0.3, every one on the same client,
//! monitoring and route ports (as pods behind one headless Service are), routed
//! to the others, each with its own JetStream store directory. A server can be
//! killed (SIGKILL) and restarted on its data; the monitoring endpoints tell which
//! server leads a stream and whether every replica is current. With
//! [`NatsCluster::start_with_tls`] client connections and routes are over TLS, as
//! k8s/components/nats-tls configures them.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::keda::get_json;
use crate::nats_server::nats_server_bin;

/// The cluster's name (`cluster { name }`), as the k8s configuration names it.
pub const CLUSTER_NAME: &str = "mnistflow";

/// One server of the cluster.
struct Node {
    host: String,
    name: String,
    child: Option<Child>,
}

/// The certificates of a cluster over TLS (PEM files), as the k8s component
/// mounts them: one for the client port, one that the servers present to each
/// other on the routes and verify against `routes_ca` (mutual TLS).
#[derive(Debug, Clone)]
pub struct ClusterTls {
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub routes_cert: PathBuf,
    pub routes_key: PathBuf,
    pub routes_ca: PathBuf,
}

/// Three clustered JetStream servers; every one killed on drop.
pub struct NatsCluster {
    nodes: Vec<Node>,
    dir: TempDir,
    client_port: u16,
    monitor_port: u16,
    route_port: u16,
    tls: Option<ClusterTls>,
}

impl std::fmt::Debug for NatsCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsCluster").field("client_port", &self.client_port).finish_non_exhaustive()
    }
}

/// The loopback addresses the servers listen on (Linux routes all of 127/8 to lo).
pub const HOSTS: [&str; 3] = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];

impl NatsCluster {
    /// Starts three servers and waits until each is healthy with JetStream
    /// (`/healthz?js-enabled-only=true`) and the cluster has a meta leader.
    ///
    /// # Panics
    /// A server cannot start, or the cluster does not form within 30 s.
    pub fn start() -> Self {
        Self::start_inner(None)
    }

    /// As [`NatsCluster::start`], with TLS required on the client port and on
    /// the routes (`verify: true`: each server checks its peer's certificate,
    /// by the route's address), the blocks of k8s/components/nats-tls. The
    /// monitoring port stays plain HTTP, as there.
    ///
    /// # Panics
    /// As [`NatsCluster::start`]; a route refused over TLS keeps the cluster from forming.
    pub fn start_with_tls(tls: ClusterTls) -> Self {
        Self::start_inner(Some(tls))
    }

    fn start_inner(tls: Option<ClusterTls>) -> Self {
        let dir = tempfile::Builder::new().prefix("mnistflow-nats-cluster-").tempdir().expect("temp dir");
        let mut used = Vec::new();
        let (client_port, monitor_port, route_port) =
            (port_free_on_all(&mut used), port_free_on_all(&mut used), port_free_on_all(&mut used));
        let nodes = HOSTS
            .iter()
            .enumerate()
            .map(|(i, host)| Node { host: (*host).to_owned(), name: format!("n{}", i + 1), child: None })
            .collect();
        let mut cluster = Self { nodes, dir, client_port, monitor_port, route_port, tls };
        for i in 0..HOSTS.len() {
            cluster.spawn(i);
        }
        cluster.wait_formed(Duration::from_secs(30));
        cluster
    }

    fn config(&self, i: usize) -> String {
        let node = &self.nodes[i];
        let routes =
            HOSTS.iter().map(|h| format!("nats-route://{h}:{}", self.route_port)).collect::<Vec<_>>().join(", ");
        let store = self.dir.path().join(&node.name);
        let (client_tls, route_tls) = match &self.tls {
            None => (String::new(), String::new()),
            Some(t) => (
                format!("tls {{ cert_file: {:?}, key_file: {:?} }}\n", t.server_cert, t.server_key),
                format!(
                    ", tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true }}, no_advertise: true",
                    t.routes_cert, t.routes_key, t.routes_ca
                ),
            ),
        };
        format!(
            "server_name: {name}\nlisten: {host}:{client}\nhttp: {host}:{monitor}\n{client_tls}\
             jetstream {{ store_dir: \"{store}\" }}\n\
             cluster {{ name: {CLUSTER_NAME}, listen: {host}:{route}, routes: [{routes}]{route_tls} }}\n",
            name = node.name,
            host = node.host,
            client = self.client_port,
            monitor = self.monitor_port,
            route = self.route_port,
            store = store.display(),
        )
    }

    fn spawn(&mut self, i: usize) {
        let conf = self.dir.path().join(format!("{}.conf", self.nodes[i].name));
        std::fs::write(&conf, self.config(i)).expect("write the server's config");
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", self.nodes[i].name))).expect("log file");
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e} (run scripts/setup)", nats_server_bin().display()));
        self.nodes[i].child = Some(child);
    }

    /// Waits until every running server answers `/healthz` with 200, which a
    /// clustered server does once it has joined the JetStream meta group and its
    /// streams are current.
    ///
    /// # Panics
    /// Not within `timeout`; the message names the servers still unhealthy.
    pub fn wait_formed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let unhealthy: Vec<_> = (0..self.nodes.len())
                .filter(|&i| self.nodes[i].child.is_some())
                .filter(|&i| get_json(&self.monitoring_url(i), "/healthz").map(|j| j["status"] != "ok").unwrap_or(true))
                .map(|i| self.nodes[i].name.clone())
                .collect();
            if unhealthy.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the NATS cluster did not become healthy within {timeout:?}: {unhealthy:?} (logs in {})",
                self.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `nats://127.0.0.N:<port>` of server `i` (0, 1 or 2).
    pub fn url(&self, i: usize) -> String {
        format!("nats://{}:{}", self.nodes[i].host, self.client_port)
    }

    /// Every server's URL, comma-separated, starting with server `first`: the
    /// `NATS_URL` of a client pinned to `first` (with `NATS_RETAIN_SERVERS_ORDER`).
    pub fn urls_from(&self, first: usize) -> String {
        (0..self.nodes.len()).map(|k| self.url((first + k) % self.nodes.len())).collect::<Vec<_>>().join(",")
    }

    /// Server `i`'s monitoring endpoint, `http://127.0.0.N:<port>` (the same
    /// port on every server, as behind a headless Service).
    pub fn monitoring_url(&self, i: usize) -> String {
        format!("http://{}:{}", self.nodes[i].host, self.monitor_port)
    }

    /// Server `i`'s `server_name` (`n1`, `n2`, `n3`).
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The index of the server named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Whether server `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Kills server `i` with SIGKILL (no lame duck, no flush: a crash or a lost
    /// node) and waits for it to exit; its data stays.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts server `i` again on its address, ports and data.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// Makes server `i` read its configuration again (`nats-server --signal
    /// reload`): certificate files rewritten in place (a renewal) take effect.
    ///
    /// # Panics
    /// The server does not run, or does not report a reload within 10 s.
    pub fn reload(&self, i: usize) {
        let pid = self.nodes[i].child.as_ref().map(Child::id).expect("the server runs");
        crate::nats_server::reload(&pid.to_string(), &self.monitoring_url(i));
    }

    /// The stream's `/jsz` detail as a running server other than `skip` reports it.
    fn stream_detail(&self, account: &str, stream: &str, from: usize) -> Result<serde_json::Value, String> {
        let jsz = get_json(
            &self.monitoring_url(from),
            &format!("/jsz?acc={account}&streams=true&consumers=true&config=true"),
        )?;
        jsz["account_details"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["name"] == account))
            .and_then(|a| a["stream_detail"].as_array())
            .and_then(|s| s.iter().find(|s| s["name"] == stream))
            .cloned()
            .ok_or(format!("{}: no stream {stream} in account {account}", self.nodes[from].name))
    }

    /// The name of the server leading `stream` (in the global account), asked of
    /// the running servers in turn.
    ///
    /// # Errors
    /// No running server knows a leader (an election is under way).
    pub fn stream_leader(&self, stream: &str) -> Result<String, String> {
        let mut last = String::from("no server runs");
        for i in (0..self.nodes.len()).filter(|&i| self.is_running(i)) {
            match self.stream_detail("$G", stream, i) {
                Ok(d) => match d["cluster"]["leader"].as_str().filter(|l| !l.is_empty()) {
                    Some(leader) => return Ok(leader.to_owned()),
                    None => last = format!("{}: {stream} has no leader", self.nodes[i].name),
                },
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The stream's replication as its leader reports it: the configured
    /// replica count, and each follower's name with whether it is current.
    ///
    /// # Errors
    /// No leader answered.
    pub fn stream_replicas(&self, stream: &str) -> Result<(u64, Vec<(String, bool)>), String> {
        let leader = self.stream_leader(stream)?;
        let i = self.index_of(&leader).ok_or(format!("unknown leader {leader}"))?;
        let d = self.stream_detail("$G", stream, i)?;
        let configured = d["config"]["num_replicas"].as_u64().unwrap_or(1);
        Ok((configured, followers(&d["cluster"])))
    }

    /// The durable consumer's leader and its followers (name, current), as the
    /// running servers report them; the first server that names a leader answers.
    ///
    /// # Errors
    /// No running server knows a leader for it.
    pub fn consumer_replicas(&self, stream: &str, consumer: &str) -> Result<(String, Vec<(String, bool)>), String> {
        let mut last = String::from("no server runs");
        for i in (0..self.nodes.len()).filter(|&i| self.is_running(i)) {
            let detail = self.stream_detail("$G", stream, i)?;
            let Some(c) = detail["consumer_detail"].as_array().and_then(|c| c.iter().find(|c| c["name"] == consumer))
            else {
                last = format!("{}: no consumer {consumer}", self.nodes[i].name);
                continue;
            };
            let leader = c["cluster"]["leader"].as_str().unwrap_or_default().to_owned();
            if leader != self.nodes[i].name {
                last = format!("{}: not the leader of {consumer} ({leader:?} is)", self.nodes[i].name);
                continue;
            }
            return Ok((leader, followers(&c["cluster"])));
        }
        Err(last)
    }

    /// The names of the clients connected to server `i` (`/connz`): which stage
    /// is on which server.
    ///
    /// # Errors
    /// The server did not answer.
    pub fn client_names(&self, i: usize) -> Result<Vec<String>, String> {
        let connz = get_json(&self.monitoring_url(i), "/connz?limit=1000")?;
        Ok(connz["connections"]
            .as_array()
            .map(|c| c.iter().filter_map(|c| c["name"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default())
    }

    /// What server `i`'s route port says to a peer that speaks clear text: its
    /// `INFO` line (a plain route port), or `None` when it closes the connection
    /// without one (a TLS route port expects a TLS handshake first, and clear
    /// text fails it).
    ///
    /// # Errors
    /// No connection, or neither an `INFO` line nor a close within 5 s.
    pub fn route_port_greeting(&self, i: usize) -> Result<Option<serde_json::Value>, String> {
        use std::io::{BufRead, BufReader, Write};
        let addr = format!("{}:{}", self.nodes[i].host, self.route_port);
        let mut stream = std::net::TcpStream::connect(&addr).map_err(|e| format!("{addr}: {e}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        // Clear text where a TLS server expects its ClientHello: the handshake fails at once.
        stream.write_all(b"PING\r\n").map_err(|e| format!("{addr}: {e}"))?;
        let mut line = String::new();
        match BufReader::new(stream).read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => {
                let json = line.strip_prefix("INFO ").ok_or(format!("{addr}: not an INFO line: {line:?}"))?;
                serde_json::from_str(json.trim()).map(Some).map_err(|e| format!("{addr}: {e}: {line:?}"))
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(None),
            Err(e) => Err(format!("{addr}: neither INFO nor a close within 5 s: {e}")),
        }
    }

    /// The server's data directory root (one subdirectory per server, logs beside).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// A port that nothing listens on at any of [`HOSTS`] (and not one of `used`).
fn port_free_on_all(used: &mut Vec<u16>) -> u16 {
    for _ in 0..100 {
        let Ok(first) = TcpListener::bind((HOSTS[0], 0)) else { continue };
        let Ok(port) = first.local_addr().map(|a| a.port()) else { continue };
        if used.contains(&port) {
            continue;
        }
        if HOSTS[1..].iter().all(|h| TcpListener::bind((*h, port)).is_ok()) {
            used.push(port);
            return port;
        }
    }
    panic!("no port free on all of {HOSTS:?} after 100 tries");
}

/// The followers of a stream or consumer (`cluster.replicas` of `/jsz`): each
/// one's name, and whether it is current (and not offline).
fn followers(cluster: &serde_json::Value) -> Vec<(String, bool)> {
    let Some(replicas) = cluster["replicas"].as_array() else { return Vec::new() };
    replicas
        .iter()
        .map(|p| {
            let current = p["current"].as_bool().unwrap_or(false) && !p["offline"].as_bool().unwrap_or(false);
            (p["name"].as_str().unwrap_or_default().to_owned(), current)
        })
        .collect()
}
