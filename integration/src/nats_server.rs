use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A real `nats-server -js` on a random loopback port, with its own temporary
/// store directory. Killed (and the directory removed) on drop.
pub struct NatsServer {
    child: Option<Child>,
    dir: TempDir,
    port: u16,
    monitor_port: u16,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
}

impl std::fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsServer").field("port", &self.port).finish_non_exhaustive()
    }
}

/// `NATS_SERVER_BIN` (set by `.cargo/config.toml` to what `scripts/setup`
/// installed), else `nats-server` on `PATH`.
pub fn nats_server_bin() -> PathBuf {
    std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

impl NatsServer {
    /// Starts a server and waits until it listens.
    ///
    /// # Panics
    /// When the server cannot be started (the binary is missing: run `scripts/setup`).
    pub fn start() -> Self {
        Self::start_with_args(&[])
    }

    /// Starts a server with extra command-line arguments (`--user`, `--pass`, ...).
    ///
    /// # Panics
    /// When the server cannot be started.
    pub fn start_with_args(args: &[&str]) -> Self {
        let dir = tempfile::Builder::new().prefix("mnistflow-nats-").tempdir().expect("temp dir for nats-server");
        let mut server = Self {
            child: None,
            dir,
            port: 0,
            monitor_port: 0,
            extra_args: args.iter().map(|s| (*s).to_owned()).collect(),
            env: Vec::new(),
        };
        server.spawn(None);
        server
    }

    /// Starts a server with configuration file `conf` (its includes resolved next
    /// to it; JetStream's `store_dir` is the file's) and the given environment
    /// (the `$VAR`s it reads); the address, the ports and the pid file are the
    /// guard's own, whatever the file says.
    ///
    /// # Panics
    /// When the server cannot be started (the file is invalid: see its log).
    pub fn start_with_config(conf: &Path, env: &[(String, String)]) -> Self {
        let dir = tempfile::Builder::new().prefix("mnistflow-nats-").tempdir().expect("temp dir for nats-server");
        let pid = dir.path().join("nats.pid");
        let mut server = Self {
            child: None,
            dir,
            port: 0,
            monitor_port: 0,
            extra_args: vec!["-c".into(), conf.display().to_string(), "-P".into(), pid.display().to_string()],
            env: env.to_vec(),
        };
        server.spawn(None);
        server
    }

    /// Starts a server on a given port (a client may already be retrying it).
    ///
    /// # Panics
    /// When the server cannot be started.
    pub fn start_on_port(port: u16) -> Self {
        let dir = tempfile::Builder::new().prefix("mnistflow-nats-").tempdir().expect("temp dir for nats-server");
        let mut server = Self { child: None, dir, port, monitor_port: 0, extra_args: Vec::new(), env: Vec::new() };
        server.spawn(Some(port));
        server
    }

    fn spawn(&mut self, port: Option<u16>) {
        let ports_dir = self.dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).expect("ports dir");
        let port_arg = port.map_or_else(|| "-1".to_owned(), |p| p.to_string());
        let mut command = Command::new(nats_server_bin());
        command.args(["-a", "127.0.0.1", "-p", &port_arg, "-m", "-1"]);
        // A configuration file names its own JetStream directory (the flag would clash with it).
        if !self.extra_args.iter().any(|a| a == "-c") {
            command.args(["-js", "-sd"]).arg(self.dir.path().join("js"));
        }
        let child = command
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e} (run scripts/setup)", nats_server_bin().display()));
        let pid = child.id();
        self.child = Some(child);
        (self.port, self.monitor_port) = wait_for_ports(&ports_dir.join(format!("nats-server_{pid}.ports")));
    }

    /// The monitoring endpoint (`http://127.0.0.1:<port>`, a random port), where
    /// KEDA's scaler and Prometheus read `/jsz` and `/varz`.
    pub fn monitoring_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's data directory (JetStream files live under `js/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Makes a server started with [`NatsServer::start_with_config`] read its
    /// configuration file again, as an operator does: `nats-server --signal
    /// reload=<pid file>` (SIGHUP), then waits until `/varz` reports the new
    /// load time. The environment is the one it started with.
    ///
    /// # Panics
    /// The signal cannot be sent, or the server does not report a reload within
    /// 10 s (an invalid file: the server keeps its old configuration).
    pub fn reload(&self) {
        reload(&self.dir.path().join("nats.pid").display().to_string(), &self.monitoring_url());
    }

    /// Kills the server (SIGKILL) and waits for it to exit; the data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same data.
    ///
    /// # Panics
    /// When it cannot start.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        self.spawn(Some(port));
        assert_eq!(self.port, port, "nats-server came back on another port");
    }
}

/// `nats-server --signal reload=<pid or pid file>` (SIGHUP), then waits until the
/// server's `/varz` at `monitoring_url` reports a new configuration load time.
///
/// # Panics
/// The signal cannot be sent, or no reload is reported within 10 s (an invalid
/// file: the server keeps its old configuration).
pub(crate) fn reload(pid: &str, monitoring_url: &str) {
    let loaded = || {
        crate::keda::get_json(monitoring_url, "/varz")
            .map(|v| v["config_load_time"].as_str().unwrap_or_default().to_owned())
    };
    let before = loaded().expect("the server's /varz");
    let status = Command::new(nats_server_bin())
        .arg("--signal")
        .arg(format!("reload={pid}"))
        .status()
        .expect("run nats-server --signal reload");
    assert!(status.success(), "nats-server --signal reload={pid}: {status}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while loaded().as_ref().ok() == Some(&before) {
        assert!(
            Instant::now() < deadline,
            "nats-server ({monitoring_url}) did not reload its configuration within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The client and monitoring ports from the server's ports file.
fn wait_for_ports(ports_file: &Path) -> (u16, u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let port = |json: &serde_json::Value, key: &str| {
        json[key][0].as_str().and_then(|url| url.rsplit(':').next()).and_then(|p| p.parse().ok())
    };
    loop {
        if let Ok(text) = std::fs::read_to_string(ports_file)
            && let Ok(json) = serde_json::from_str::<serde_json::Value>(&text)
            && let (Some(client), Some(monitor)) = (port(&json, "nats"), port(&json, "monitoring"))
        {
            return (client, monitor);
        }
        assert!(Instant::now() < deadline, "nats-server did not write {} within 15 s", ports_file.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
