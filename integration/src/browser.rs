//! Headless Chromium for the page's tests, driven over WebDriver: each
//! [`Browser`] starts its own `chromedriver` (Debian's `chromium-driver`; install
//! with `MNISTFLOW_BROWSER=1 scripts/setup`) on a free port with a throwaway
//! profile, records CSP violations from the first moment of every document, and
//! kills both on drop. Screenshots go to `target/screenshots/`.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::actions::{InputSource, MOUSE_BUTTON_LEFT, PointerAction};
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{ClientBuilder, Locator};
use serde_json::{Value, json};

/// Every wait in the page; generous because other builds may share the machine.
pub const WAIT: Duration = Duration::from_secs(45);

/// A custom WebDriver command (chromedriver's extensions).
#[derive(Debug)]
pub struct Custom {
    pub path: &'static str,
    pub body: Value,
}

impl WebDriverCompatibleCommand for Custom {
    fn endpoint(&self, base: &url::Url, session: Option<&str>) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/{}", session.unwrap_or_default(), self.path))
    }

    fn method_and_body(&self, _url: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(self.body.to_string()))
    }
}

/// Headless Chromium under its own chromedriver; both killed on drop.
pub struct Browser {
    pub wd: fantoccini::Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver leads its own process group: end it and the browsers it started.
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.driver.id())]).status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Records every CSP violation from the first moment of every document.
pub const CSP_MONITOR: &str = "window.__cspViolations = [];\
document.addEventListener('securitypolicyviolation', (e) => window.__cspViolations.push(\
{directive: e.violatedDirective, blocked: e.blockedURI, sample: e.sample}));";

impl Browser {
    pub async fn start() -> Self {
        let port = crate::free_port();
        let driver = Command::new(std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into()))
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver not found: run MNISTFLOW_BROWSER=1 scripts/setup");
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "chromedriver did not listen on {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = tempfile::Builder::new().prefix("mnistflow-chromium-").tempdir().unwrap();
        let mut options = json!({
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--disable-default-apps", "--disable-extensions",
                "--window-size=1280,1400", "--force-device-scale-factor=1", "--lang=en-US",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        });
        if let Some(bin) = std::env::var_os("CHROME_BIN")
            .map(PathBuf::from)
            .or_else(|| Some(PathBuf::from("/usr/bin/chromium")).filter(|p| p.exists()))
        {
            options["binary"] = json!(bin.display().to_string());
        }
        let mut caps = serde_json::Map::new();
        caps.insert("goog:chromeOptions".into(), options);
        caps.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
        let wd = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("WebDriver session");
        wd.issue_cmd(Custom {
            path: "goog/cdp/execute",
            body: json!({"cmd": "Page.addScriptToEvaluateOnNewDocument", "params": {"source": CSP_MONITOR}}),
        })
        .await
        .unwrap();
        Self { wd, driver, _profile: profile }
    }

    /// Opens the page at `base` (`http://host:port`) and waits until its script has started.
    pub async fn open(&self, base: &str) {
        self.wd.goto(&format!("{base}/")).await.unwrap();
        self.until("the page has started", "return document.documentElement.dataset.ready === 'true' || null").await;
    }

    pub async fn js(&self, script: &str) -> Value {
        self.wd.execute(script, vec![]).await.unwrap()
    }

    /// Polls `script` until it returns something other than null/false.
    pub async fn until(&self, what: &str, script: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = self.js(script).await;
            if !(v.is_null() || v == Value::Bool(false)) {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                let _ = self.screenshot(&format!("timeout-{}", what.replace(' ', "-"))).await;
                panic!("timed out after {WAIT:?} waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn until_live(&self) {
        self.until(
            "the event stream to be live",
            "return document.getElementById('feed-status').dataset.state === 'live' || null",
        )
        .await;
    }

    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let dir = crate::workspace_root().join("target/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, self.wd.screenshot().await.unwrap()).unwrap();
        path
    }

    pub async fn visible(&self, css: &str) -> bool {
        match self.wd.find(Locator::Css(css)).await {
            Ok(e) => e.is_displayed().await.unwrap(),
            Err(_) => false,
        }
    }

    /// The digit the page shows once an answer with that source arrived.
    pub async fn answer(&self, source: &str) -> u8 {
        let script = format!(
            "const b = document.getElementById('result-body'); \
             return (!b.hidden && b.dataset.source === '{source}') ? document.getElementById('digit').textContent : null"
        );
        self.until(&format!("an answer for the {source}"), &script).await.as_str().unwrap().parse().unwrap()
    }

    /// The digit the page shows for a drawing of `strokes` strokes (not an earlier,
    /// partial one: the page may ask between strokes).
    pub async fn drawing_answer(&self, strokes: usize) -> u8 {
        let script = format!(
            "const b = document.getElementById('result-body'); \
             return (!b.hidden && b.dataset.source === 'drawing' && b.dataset.strokes === '{strokes}') \
               ? document.getElementById('digit').textContent : null"
        );
        self.until(&format!("an answer for a drawing of {strokes} strokes"), &script)
            .await
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub async fn close(self) {
        let _ = self.wd.clone().close().await;
    }
}

pub async fn clear_answer(b: &Browser) {
    b.wd.find(Locator::Id("clear")).await.unwrap().click().await.unwrap();
    b.until("the answer to clear", "return document.getElementById('result-body').hidden || null").await;
}

/// Draws `points` (offsets from the canvas centre, in CSS pixels) as one stroke.
pub async fn stroke<S>(b: &Browser, source: S, points: &[(f64, f64)])
where
    S: InputSource<Action = PointerAction>,
{
    let canvas = b.wd.find(Locator::Id("pad")).await.unwrap();
    let (x, y) = points[0];
    let mut s = source.then(PointerAction::MoveToElement { element: canvas.clone(), duration: None, x, y });
    s = s.then(PointerAction::Down { button: MOUSE_BUTTON_LEFT });
    for &(x, y) in &points[1..] {
        s = s.then(PointerAction::MoveToElement {
            element: canvas.clone(),
            duration: Some(Duration::from_millis(30)),
            x,
            y,
        });
    }
    s = s.then(PointerAction::Up { button: MOUSE_BUTTON_LEFT });
    b.wd.perform_actions(s).await.unwrap();
}
