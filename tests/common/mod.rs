//! `mnistflow up` as a person runs it, for the tests of the binary.

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use mnistflow_integration::{free_port, mnist_dir};

/// Runs `mnistflow` with `env` (and no inherited `NATS_URL`/`STORE_URL`), killed
/// and failed if it takes more than 120 s.
pub fn mnistflow(env: &[(&str, &str)], args: &[&str]) -> Output {
    mnistflow_integration::output_within(
        Command::new(env!("CARGO_BIN_EXE_mnistflow"))
            .args(args)
            .env_remove("NATS_URL")
            .env_remove("STORE_URL")
            .envs(env.iter().copied()),
        Duration::from_secs(120),
        &format!("mnistflow {}", args.join(" ")),
    )
}

/// A plain HTTP/1.0 GET on 127.0.0.1: status and body, `None` while nothing listens.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()))
}

/// A running `mnistflow up`.
pub struct Up {
    child: Child,
    pub nats: u16,
    pub web: u16,
    pub inference: u16,
    log_path: PathBuf,
}

impl Up {
    /// `mnistflow up --home home` with free ports, MNIST from the local copy, a
    /// short training run that is sure to be promoted, and `env` on top.
    pub fn start(home: &Path, log: &str, env: &[(&str, &str)]) -> Self {
        Self::start_with(home, log, env, &[])
    }

    /// [`Up::start`] with more arguments (`--no-bootstrap`). `up` runs in a
    /// process group of its own, as a shell runs a command in the foreground.
    pub fn start_with(home: &Path, log: &str, env: &[(&str, &str)], args: &[&str]) -> Self {
        let (nats, web, inference) = (free_port(), free_port(), free_port());
        let log_path = home.join(log);
        let child = Command::new(env!("CARGO_BIN_EXE_mnistflow"))
            .args(["up", "--home"])
            .arg(home)
            .args(["--nats-port", &nats.to_string(), "--web-port", &web.to_string()])
            .args(["--inference-port", &inference.to_string()])
            .args(args)
            .env_remove("NATS_URL")
            .env_remove("STORE_URL")
            .env("DOWNLOADER_MIRRORS", format!("file://{}/", mnist_dir().display()))
            // Short and sure to be promoted; one thread (tests run side by side). The
            // metrics listeners are up's own (free ports).
            .env("TRAINER_MAX_MINUTES", "0.1")
            .env("TRAINER_ACCURACY_FLOOR", "0.5")
            .env("TRAINER_THREADS", "1")
            .env_remove("DOWNLOADER_METRICS_ADDR")
            .env_remove("TRAINER_METRICS_ADDR")
            .env_remove("WEB_METRICS_ADDR")
            .env_remove("FEEDBACK_ADDR")
            .env_remove("LOG_FORMAT")
            .envs(env.iter().copied())
            .process_group(0)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .expect("run mnistflow up");
        Self { child, nats, web, inference, log_path }
    }

    /// What `up` has said so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits (300 s at most) until inference serves a model; returns its version.
    pub fn wait_served(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some((200, body)) = http_get(self.inference, "/readyz") {
                let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
                if let Some(v) = ready["model_version"].as_str() {
                    return v.to_owned();
                }
            }
            assert!(self.child.try_wait().unwrap().is_none(), "mnistflow up exited early:\n{}", self.log());
            assert!(Instant::now() < deadline, "no model served within 300 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Ctrl-C as a terminal sends it (SIGINT to the whole foreground process
    /// group), then waits (60 s at most) for the exit; returns it with the log.
    pub fn interrupt(mut self) -> (ExitStatus, String) {
        let group = format!("-{}", self.child.id());
        assert!(Command::new("kill").args(["-INT", "--", &group]).status().unwrap().success());
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "mnistflow up did not stop within 60 s of Ctrl-C");
            std::thread::sleep(Duration::from_millis(100));
        };
        (status, self.log())
    }
}
