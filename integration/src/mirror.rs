use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How the mirror misbehaves for one request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status and a short text body.
    Status(u16),
    /// Announce the full length but send only this many bytes, then close.
    Truncate(usize),
    /// Serve these bytes instead of the file (a well-formed but wrong file).
    Body(Bytes),
    /// Send the body in 16 KiB pieces with this pause between them.
    Slow(Duration),
}

#[derive(Default)]
struct State {
    /// One-shot faults per file name, consumed in order.
    next: HashMap<String, VecDeque<Fault>>,
    /// A fault for every request while set.
    always: Option<Fault>,
    /// Every request line seen: `GET /name` (with `Range` when sent).
    log: Vec<String>,
}

/// A local HTTP/1.1 file server standing in for an MNIST mirror.
pub struct MirrorServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for MirrorServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorServer").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl MirrorServer {
    /// Serves the files of `root` on a random loopback port.
    ///
    /// # Panics
    /// When no port can be bound.
    pub async fn start(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind mirror");
        let addr = listener.local_addr().expect("mirror addr");
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let root = root.clone();
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, &root, &state).await;
                });
            }
        });
        Self { addr, state, task }
    }

    /// The base URL, ending in `/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Misbehave once for `file`; several calls queue up.
    pub fn fail_next(&self, file: &str, fault: Fault) {
        self.state.lock().unwrap().next.entry(file.to_owned()).or_default().push_back(fault);
    }

    /// Misbehave on every request (`None` to heal).
    pub fn fail_always(&self, fault: Option<Fault>) {
        self.state.lock().unwrap().always = fault;
    }

    /// The requests seen so far, e.g. `GET /train-images-idx3-ubyte.gz`.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }
}

impl Drop for MirrorServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, root: &std::path::Path, state: &Mutex<State>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.lines();
    let mut request = lines.next().unwrap_or_default().split_whitespace();
    let method = request.next().unwrap_or_default().to_owned();
    let path = request.next().unwrap_or("/").to_owned();
    let range_start: Option<u64> = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("range"))
        .and_then(|(_, v)| v.trim().strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok());
    let name = path.trim_start_matches('/').split('?').next().unwrap_or_default().to_owned();
    let fault = {
        let mut s = state.lock().unwrap();
        s.log.push(match range_start {
            Some(r) => format!("{method} {path} range={r}"),
            None => format!("{method} {path}"),
        });
        s.next.get_mut(&name).and_then(VecDeque::pop_front).or_else(|| s.always.clone())
    };
    let file = if name.is_empty() || name.contains("..") || name.contains('/') {
        None
    } else {
        tokio::fs::read(root.join(&name)).await.ok().map(Bytes::from)
    };
    let (status, mut body) = match (&fault, file) {
        (Some(Fault::Status(code)), _) => (*code, Bytes::from(format!("mirror fault {code}\n"))),
        (Some(Fault::Body(b)), _) => (200, b.clone()),
        (_, Some(bytes)) => (200, bytes),
        (_, None) => (404, Bytes::from_static(b"not found\n")),
    };
    let mut status_line = match status {
        200 => "200 OK".to_owned(),
        404 => "404 Not Found".to_owned(),
        other => format!("{other} Mirror Fault"),
    };
    let mut extra = String::new();
    if status == 200
        && let Some(start) = range_start
        && (start as usize) < body.len()
    {
        extra = format!("Content-Range: bytes {start}-{}/{}\r\n", body.len() - 1, body.len());
        body = body.slice(start as usize..);
        status_line = "206 Partial Content".to_owned();
    }
    let header = format!(
        "HTTP/1.1 {status_line}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nAccept-Ranges: bytes\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes()).await?;
    if method == "HEAD" {
        return stream.shutdown().await;
    }
    match fault {
        Some(Fault::Truncate(n)) => {
            stream.write_all(&body[..n.min(body.len())]).await?;
            // Close without the rest: the client sees a short body.
            stream.flush().await?;
            return Ok(());
        }
        Some(Fault::Slow(pause)) => {
            for chunk in body.chunks(16 * 1024) {
                stream.write_all(chunk).await?;
                stream.flush().await?;
                tokio::time::sleep(pause).await;
            }
        }
        _ => stream.write_all(&body).await?,
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(url: &str) -> (String, Vec<u8>) {
        let addr = url.trim_start_matches("http://").split('/').next().unwrap().to_owned();
        let path = format!("/{}", url.splitn(4, '/').nth(3).unwrap_or_default());
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        (String::from_utf8_lossy(&out[..split]).into_owned(), out[split + 4..].to_vec())
    }

    #[tokio::test]
    async fn mirror_serves_files_and_misbehaves_on_demand() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.bin"), vec![7u8; 100_000]).unwrap();
        let m = MirrorServer::start(dir.path()).await;
        let (head, body) = get(&format!("{}a.bin", m.url())).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body.len(), 100_000);

        m.fail_next("a.bin", Fault::Status(500));
        m.fail_next("a.bin", Fault::Truncate(10));
        let (head, _) = get(&format!("{}a.bin", m.url())).await;
        assert!(head.starts_with("HTTP/1.1 500"), "{head}");
        let (head, body) = get(&format!("{}a.bin", m.url())).await;
        assert!(head.contains("Content-Length: 100000"), "{head}");
        assert_eq!(body.len(), 10);
        let (_, body) = get(&format!("{}a.bin", m.url())).await;
        assert_eq!(body.len(), 100_000, "one-shot faults are consumed");
        let (head, _) = get(&format!("{}missing.bin", m.url())).await;
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        assert_eq!(m.requests().len(), 5);
    }
}
