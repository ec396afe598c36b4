//! Shared harness for the gatehouse integration tests.
//!
//! * [`Gatehouse`]: the real binary, started from a TOML template, killed on drop.
//! * [`Upstream`]: an in-process HTTP/1.1 (and h2c) test service, on TCP or a Unix socket.
//! * client helpers: [`send`], [`get`], [`H1`], [`h2_send`], [`raw_exchange`].
#![allow(dead_code)]

pub mod browser;
pub mod wasm;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Upper bound for any single network step, so that a broken product fails instead of hanging.
pub const STEP: Duration = Duration::from_secs(60);

/// Await `fut`, panicking with `what` if it takes longer than `limit`.
pub async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// A port nothing listens on, for a server that binds it itself (a gatehouse under test).
/// Taken below the kernel's ephemeral range (32768 up by default), where every `bind(0)`
/// and outgoing connection of the tests gets its port: a port from `bind(0)`, released for
/// gatehouse, could go to another test's server before gatehouse binds it, and the test
/// would then talk to that server. Each call of a process gets a different port, from a
/// start that differs between processes.
pub fn free_port() -> u16 {
    const FIRST: u32 = 10_000;
    const COUNT: u32 = 32_768 - FIRST;
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU32> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        std::sync::atomic::AtomicU32::new(std::process::id().wrapping_mul(7919) ^ nanos)
    });
    (0..COUNT)
        .map(|_| (FIRST + next.fetch_add(1, Ordering::Relaxed) % COUNT) as u16)
        .find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("a free port below 32768")
}

/// The program `name` on `PATH`; `install` says how to get it when it is missing.
pub fn find_program(name: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("no `{name}` on PATH ({install})"))
}

/// Replace every `{name}` in `template` with its value. TOML inline tables (`{ a = 1 }`)
/// are left alone because only the given names are replaced.
pub fn render(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = template.to_string();
    for (name, value) in vars {
        out = out.replace(&format!("{{{name}}}"), value);
    }
    out
}

/// A `Command` for the binary with a clean environment for the variables it reads.
pub fn gatehouse_cmd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gatehouse"));
    cmd.env_remove("GATEHOUSE_CONFIG").env_remove("RUST_LOG");
    // The roots outbound https trusts: a test that wants others sets them.
    cmd.env_remove("SSL_CERT_FILE").env_remove("SSL_CERT_DIR");
    for otel in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
    ] {
        cmd.env_remove(otel);
    }
    cmd
}

// ---------------------------------------------------------------------------------------------
// The gatehouse process
// ---------------------------------------------------------------------------------------------

pub struct Gatehouse {
    child: Child,
    /// The port `{port}` was replaced with (the listen port in the usual templates).
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    exited: Option<ExitStatus>,
}

impl Gatehouse {
    /// Write the config (with `{port}` and `vars` filled in), run the binary and wait until
    /// `port` accepts TCP connections.
    pub async fn start(template: &str, vars: &[(&str, &str)]) -> Gatehouse {
        let mut gh = Gatehouse::spawn(template, vars, &[]);
        gh.wait_ready().await;
        gh
    }

    /// Write the config and run `gatehouse run --config PATH` without waiting for anything.
    /// `{port}` is a fresh free port unless `vars` gives one. `envs` are set for the process.
    pub fn spawn(template: &str, vars: &[(&str, &str)], envs: &[(&str, &str)]) -> Gatehouse {
        let port = match vars.iter().find(|(k, _)| *k == "port") {
            Some((_, p)) => p.parse().expect("port var"),
            None => free_port(),
        };
        let port_s = port.to_string();
        let mut all: Vec<(&str, &str)> = vec![("port", port_s.as_str())];
        all.extend(vars.iter().filter(|(k, _)| *k != "port"));
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(&config_path, render(template, &all)).unwrap();
        let mut cmd = gatehouse_cmd();
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap());
        let child = cmd.spawn().expect("spawn gatehouse");
        Gatehouse {
            child,
            port,
            dir,
            config_path,
            exited: None,
        }
    }

    /// Poll until the listen port accepts TCP (up to 10 s); panics with the captured output
    /// if the process exits or never listens.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                self.exited = Some(status);
                panic!(
                    "gatehouse exited during start-up with {status}\nconfig:\n{}\n{}",
                    std::fs::read_to_string(&self.config_path).unwrap_or_default(),
                    self.output()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "gatehouse did not listen on {} within 10s\n{}",
                    self.port,
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Polls `path` until its response carries `header: value` (e.g. after a SIGHUP reload).
    pub async fn wait_for_header(&self, path: &str, header: &str, value: &str) {
        let what = format!("{path} to answer with {header}: {value}");
        within(Duration::from_secs(10), &what, async {
            while get(self.port, path).await.header(header).as_deref() != Some(value) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    }

    pub fn send_signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Wait for the process to exit; `None` if it is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited {
                return Some(s);
            }
            if let Some(s) = self.child.try_wait().unwrap() {
                self.exited = Some(s);
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (up to 20 s) for the process to exit and asserts its exit code.
    pub async fn assert_exits_with(&mut self, code: i32) {
        let status = self.wait_exit(Duration::from_secs(20)).await;
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(code),
            "status {status:?}\n{}",
            self.output()
        );
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Both captured streams, for assertion messages.
    pub fn output(&self) -> String {
        format!(
            "--- gatehouse stdout ---\n{}\n--- gatehouse stderr ---\n{}",
            self.stdout(),
            self.stderr()
        )
    }

    /// Peak resident set size (`VmHWM`) of the process, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .expect("VmHWM in /proc/PID/status");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Gatehouse {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Result of a one-shot CLI invocation.
pub struct CliOutput {
    /// `None` if it was killed after the timeout.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Run the binary with `args` to completion (killed after 20 s), in `cwd` if given.
pub fn cli(args: &[&str], envs: &[(&str, &str)], cwd: Option<&Path>) -> CliOutput {
    let logs = tempfile::tempdir().unwrap();
    let mut cmd = gatehouse_cmd();
    cmd.args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(logs.path().join("out")).unwrap())
        .stderr(std::fs::File::create(logs.path().join("err")).unwrap());
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    let mut child = cmd.spawn().expect("spawn gatehouse");
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    CliOutput {
        code,
        stdout: std::fs::read_to_string(logs.path().join("out")).unwrap(),
        stderr: std::fs::read_to_string(logs.path().join("err")).unwrap(),
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

pub type Body = BoxBody<Bytes, Infallible>;

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).boxed()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// A streamed body without a known length: every `Bytes` sent on the channel is one frame,
/// dropping the sender ends the body.
struct ChanBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

pub fn channel_body() -> (mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = mpsc::channel(4);
    (tx, ChanBody(rx).boxed())
}

/// A body of `total` bytes sent in `chunk`-sized frames (no Content-Length).
pub fn streamed_body(total: usize, chunk: usize) -> Body {
    let (tx, body) = channel_body();
    tokio::spawn(async move {
        let block = Bytes::from(vec![b'x'; chunk]);
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk);
            if tx.send(block.slice(..n)).await.is_err() {
                return;
            }
            left -= n;
        }
    });
    body
}

// ---------------------------------------------------------------------------------------------
// The test upstream
// ---------------------------------------------------------------------------------------------

/// An in-process upstream service. Routes:
/// * `/echo` (and any unknown path): 200, JSON `{method, uri, headers: {name: [values]},
///   body_bytes, body}`; also sets the response headers `x-upstream: echo`,
///   `x-up-multi: one` and `x-up-remove` twice (`a`, `b`) for response-header tests.
/// * `/slow?ms=N`: 200 after N ms.
/// * `/stream?chunks=N&ms=M`: text/event-stream, N chunks `data: i\n\n`, M ms apart.
/// * `/upload`: counts the streamed request body, answers the count.
/// * `/status/N`: status N.
/// * `/big?bytes=N`: N bytes in 64 KiB chunks.
/// * `/close`: 200 with `connection: close` (the upstream closes the connection).
/// * `/hop`: 200 with hop-by-hop response headers (`connection: x-up-hop`, `x-up-hop`,
///   `keep-alive`, `proxy-connection`) plus `x-end-to-end: yes`.
/// * `/ws`: answers an upgrade with 101 and echoes raw bytes on the upgraded connection.
pub struct Upstream {
    pub addr: Option<SocketAddr>,
    pub unix_path: Option<PathBuf>,
    /// Requests received.
    pub requests: Arc<AtomicUsize>,
    /// Connections accepted.
    pub connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
    _dir: Option<tempfile::TempDir>,
}

/// A listener the test upstream accepts connections from: TCP or Unix.
trait Accept: Send + 'static {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    async fn accept_one(&self) -> std::io::Result<TcpStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Accept for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<tokio::net::UnixStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        Upstream::serve(listener, Some(addr), None, None)
    }

    /// The same service on a Unix socket in a fresh temp dir.
    pub async fn start_unix() -> Upstream {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("upstream.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        Upstream::serve(listener, None, Some(path), Some(dir))
    }

    fn serve(
        listener: impl Accept,
        addr: Option<SocketAddr>,
        unix_path: Option<PathBuf>,
        dir: Option<tempfile::TempDir>,
    ) -> Upstream {
        let (requests, connections): (Arc<AtomicUsize>, Arc<AtomicUsize>) = Default::default();
        let (r, c) = (Arc::clone(&requests), Arc::clone(&connections));
        let task = tokio::spawn(async move {
            loop {
                let Ok(stream) = listener.accept_one().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_upstream_conn(stream, Arc::clone(&r)));
            }
        });
        Upstream {
            addr,
            unix_path,
            requests,
            connections,
            task,
            _dir: dir,
        }
    }

    /// The value for `upstream.url`.
    pub fn url(&self) -> String {
        match (&self.addr, &self.unix_path) {
            (Some(a), _) => format!("http://{a}"),
            (None, Some(p)) => format!("unix:{}", p.display()),
            _ => unreachable!(),
        }
    }

    pub fn request_count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Waits (up to 10 s) until at least `n` requests have reached this upstream.
    pub async fn wait_for_requests(&self, n: usize) {
        within(
            Duration::from_secs(10),
            "requests reaching the upstream",
            async {
                while self.request_count() < n {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        )
        .await;
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_upstream_conn<S>(stream: S, requests: Arc<AtomicUsize>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        requests.fetch_add(1, Ordering::SeqCst);
        upstream_route(req)
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await;
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.parse().ok()).flatten()
    })
}

fn stream_response(status: StatusCode, content_type: &str, body: Body) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(body)
        .unwrap()
}

async fn upstream_route(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let resp = match path.as_str() {
        "/slow" => {
            let ms = query_param(&req, "ms").unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(full("slow done"))
        }
        "/stream" => {
            let chunks = query_param(&req, "chunks").unwrap_or(5);
            let ms = query_param(&req, "ms").unwrap_or(300);
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                for i in 0..chunks {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    if tx
                        .send(Bytes::from(format!("data: {i}\n\n")))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            stream_response(StatusCode::OK, "text/event-stream", body)
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut count = 0usize;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => count += f.data_ref().map_or(0, |d| d.len()),
                    Err(e) => {
                        return Ok(stream_response(
                            StatusCode::BAD_REQUEST,
                            "text/plain",
                            full(format!("body error after {count} bytes: {e}")),
                        ))
                    }
                }
            }
            Response::new(full(count.to_string()))
        }
        "/big" => {
            let total = query_param(&req, "bytes").unwrap_or(1 << 20) as usize;
            stream_response(
                StatusCode::OK,
                "application/octet-stream",
                streamed_body(total, 64 * 1024),
            )
        }
        "/close" => Response::builder()
            .header("connection", "close")
            .body(full("closing"))
            .unwrap(),
        "/hop" => Response::builder()
            .header("connection", "x-up-hop")
            .header("x-up-hop", "1")
            .header("keep-alive", "timeout=99")
            .header("proxy-connection", "keep-alive")
            .header("x-end-to-end", "yes")
            .body(full("hop"))
            .unwrap(),
        "/ws" => {
            let wants_upgrade = req
                .headers()
                .get("upgrade")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
            if !wants_upgrade {
                return Ok(stream_response(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    full("no upgrade header reached the upstream"),
                ));
            }
            let on_upgrade = hyper::upgrade::on(req);
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        match io.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if io.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body(empty())
                .unwrap()
        }
        // A body followed by a trailer (hyper sends it to a client that accepts trailers,
        // when the head names it).
        "/trailers" => Response::builder()
            .header("trailer", "x-up-trailer")
            .body(with_trailers("with trailers", &[("x-up-trailer", "1")]))
            .unwrap(),
        p if p.starts_with("/status/") => {
            let code: u16 = p["/status/".len()..].parse().unwrap_or(500);
            stream_response(
                StatusCode::from_u16(code).unwrap(),
                "text/plain",
                full(format!("upstream status {code}")),
            )
        }
        _ => echo(req).await,
    };
    Ok(resp)
}

/// Each header name with its values, as JSON.
fn fields_json(fields: &HeaderMap) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for name in fields.keys() {
        let values: Vec<serde_json::Value> = fields
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned().into())
            .collect();
        map.insert(name.as_str().to_string(), values.into());
    }
    map.into()
}

async fn echo(req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let collected = body.collect().await.ok();
    let trailers = collected
        .as_ref()
        .and_then(|c| c.trailers())
        .map(fields_json);
    let body = collected.map(|c| c.to_bytes()).unwrap_or_default();
    let json = serde_json::json!({
        "method": parts.method.as_str(),
        "uri": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or(""),
        "headers": fields_json(&parts.headers),
        "trailers": trailers,
        "body_bytes": body.len(),
        "body": String::from_utf8_lossy(&body),
    });
    Response::builder()
        .header("content-type", "application/json")
        .header("x-upstream", "echo")
        .header("x-up-multi", "one")
        .header("x-up-remove", "a")
        .header("x-up-remove", "b")
        .body(full(json.to_string()))
        .unwrap()
}

/// A TCP "upstream" that reads the request head, then either resets the connection
/// (`resetting`) or writes a fixed `reply` and closes it: for 502s and truncated responses.
pub struct RawUpstream {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl RawUpstream {
    /// Accepts and resets every connection without answering.
    pub async fn resetting() -> RawUpstream {
        RawUpstream::replying(b"").await
    }

    pub async fn replying(reply: &'static [u8]) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
                            .await
                        {
                            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                            _ => break,
                        }
                    }
                    if reply.is_empty() {
                        let _ = stream.set_zero_linger(); // reset
                    } else {
                        let _ = stream.write_all(reply).await;
                        let _ = stream.shutdown().await; // then a clean close
                    }
                });
            }
        });
        RawUpstream { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// A fully read response.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {self:?}"))
    }

    /// Request headers the upstream saw, from an `/echo` body: name -> values.
    pub fn upstream_headers(&self) -> HashMap<String, Vec<String>> {
        let json = self.json();
        let map = json["headers"].as_object().expect("echo body has headers");
        map.iter()
            .map(|(k, v)| {
                let values = v
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect();
                (k.clone(), values)
            })
            .collect()
    }

    /// Asserts this is one of gatehouse's own error responses (its JSON error body, as
    /// docs/security.md shows it) with the given status and code; returns the JSON body.
    pub fn assert_gatehouse_error(&self, status: u16, code: &str) -> serde_json::Value {
        assert_eq!(self.status.as_u16(), status, "unexpected status: {self:?}");
        let ct = self.header("content-type").unwrap_or_default();
        assert!(
            ct.starts_with("application/json"),
            "content-type should be application/json, got {ct:?}: {self:?}"
        );
        let json = self.json();
        let obj = json.as_object().expect("error body is a JSON object");
        let mut keys: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
        keys.sort();
        assert_eq!(
            keys,
            ["error", "message", "request_id"],
            "error body keys: {json}"
        );
        assert_eq!(json["error"], code, "error code: {json}");
        assert!(json["message"].is_string(), "message is a string: {json}");
        assert!(
            json["request_id"].is_string() || json["request_id"].is_null(),
            "request_id is a string or null: {json}"
        );
        json
    }
}

pub async fn collect(resp: Response<Incoming>) -> Resp {
    let (parts, body) = resp.into_parts();
    let body = within(STEP, "reading response body", body.collect())
        .await
        .expect("response body")
        .to_bytes();
    Resp {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    }
}

/// A WebSocket upgrade request (RFC 6455's sample key) for `path`.
pub fn websocket_request(path: &str) -> http::Request<Body> {
    request("GET", path)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(empty())
        .unwrap()
}

/// Asserts that `resp` is a `101` whose tunnel carries bytes to the test upstream's `/ws`
/// and back.
pub async fn assert_websocket_echoes(resp: Response<Incoming>) {
    assert_eq!(resp.status(), 101, "{resp:?}");
    let upgraded = within(STEP, "upgrade", hyper::upgrade::on(resp))
        .await
        .expect("upgraded connection");
    let mut io = TokioIo::new(upgraded);
    io.write_all(b"hello").await.unwrap();
    let mut back = [0u8; 5];
    within(STEP, "echo", io.read_exact(&mut back))
        .await
        .unwrap();
    assert_eq!(&back, b"hello");
}

/// A request builder for origin-form `path` (`H1` adds `Host: 127.0.0.1:PORT` unless the
/// request has one).
pub fn request(method: &str, path: &str) -> http::request::Builder {
    Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(path)
}

/// One HTTP/1.1 client connection to gatehouse (upgrades enabled).
pub struct H1 {
    port: u16,
    sender: hyper::client::conn::http1::SendRequest<Body>,
    conn: JoinHandle<hyper::Result<()>>,
}

impl H1 {
    pub async fn connect(port: u16) -> H1 {
        let stream = within(STEP, "connect", TcpStream::connect(("127.0.0.1", port)))
            .await
            .expect("connect to gatehouse");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let conn = tokio::spawn(conn.with_upgrades());
        H1 { port, sender, conn }
    }

    /// Send and return the response head; the body streams.
    pub async fn send_streaming(&mut self, mut req: Request<Body>) -> Response<Incoming> {
        if !req.headers().contains_key("host") {
            let host = HeaderValue::from_str(&format!("127.0.0.1:{}", self.port)).unwrap();
            req.headers_mut().insert("host", host);
        }
        within(STEP, "sender ready", self.sender.ready())
            .await
            .expect("connection usable");
        within(STEP, "response head", self.sender.send_request(req))
            .await
            .expect("response from gatehouse")
    }

    pub async fn send(&mut self, req: Request<Body>) -> Resp {
        let resp = self.send_streaming(req).await;
        collect(resp).await
    }

    /// Wait until the server closes this connection; false if still open after `limit`.
    pub async fn closed_within(self, limit: Duration) -> bool {
        drop(self.sender);
        tokio::time::timeout(limit, self.conn).await.is_ok()
    }
}

/// One request on a fresh HTTP/1.1 connection.
pub async fn send(port: u16, req: Request<Body>) -> Resp {
    H1::connect(port).await.send(req).await
}

pub async fn get(port: u16, path: &str) -> Resp {
    send(port, request("GET", path).body(empty()).unwrap()).await
}

/// An HTTP/2 connection with prior knowledge (h2c), its driver spawned.
pub async fn h2_connect(port: u16) -> hyper::client::conn::http2::SendRequest<Body> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    sender
}

/// One request over HTTP/2 with prior knowledge (h2c); `path` is origin-form.
pub async fn h2_send(port: u16, method: &str, path: &str, body: Body) -> Resp {
    let mut sender = h2_connect(port).await;
    let req = Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .body(body)
        .unwrap();
    let resp = within(STEP, "h2 response", sender.send_request(req))
        .await
        .expect("h2 response");
    collect(resp).await
}

/// Reads from `stream` into `buf` until it holds a whole HTTP/1 head, and returns the head
/// (lower-cased, without its blank line), leaving what follows in `buf`; `None` at EOF.
pub async fn read_http_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let mut piece = [0u8; 16 << 10];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            buf.drain(..end + 4);
            return Some(head);
        }
        match stream.read(&mut piece).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&piece[..n]),
            _ => return None,
        }
    }
}

/// The audit events (JSON lines) in the file at `path`.
pub fn read_events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Waits (up to 20 s) until the file at `path` holds `n` audit events.
pub async fn wait_for_events(path: &Path, n: usize) -> Vec<serde_json::Value> {
    within(Duration::from_secs(20), "audit events in the file", async {
        loop {
            let events = read_events(path);
            if events.len() >= n {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Write `bytes` on a new TCP connection and read until EOF, error or `limit`.
/// Returns what was read and whether the connection ended (EOF/error) within `limit`.
pub async fn raw_exchange(port: u16, bytes: &[u8], limit: Duration) -> (Vec<u8>, bool) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let _ = stream.write_all(bytes).await;
    read_until_closed(&mut stream, limit).await
}

/// Read until EOF or error (true) or `limit` passes (false).
pub async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Is `s` a UUID in the 8-4-4-4-12 hex form?
pub fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// A config listening on `{port}` and proxying to `{upstream}`: `server` lines go into
/// `[server]`, `upstream` lines into `[upstream]`, `rest` (middlewares...) follows.
pub fn config(server: &str, upstream: &str, rest: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{{port}}\"\n{server}\n\n\
         [upstream]\nurl = \"{{upstream}}\"\n{upstream}\n\n{rest}\n"
    )
}

/// Start an upstream and a gatehouse in front of it with `config(server, upstream, rest)`.
pub async fn proxy_with(server: &str, upstream: &str, rest: &str) -> (Upstream, Gatehouse) {
    let up = Upstream::start().await;
    let gh = Gatehouse::start(&config(server, upstream, rest), &[("upstream", &up.url())]).await;
    (up, gh)
}

/// [`proxy_with`] the middlewares of `rest` only, `envs` set for the process.
pub async fn proxy_with_env(rest: &str, envs: &[(&str, &str)]) -> (Upstream, Gatehouse) {
    let up = Upstream::start().await;
    let mut gh = Gatehouse::spawn(&config("", "", rest), &[("upstream", &up.url())], envs);
    gh.wait_ready().await;
    (up, gh)
}

// ---------------------------------------------------------------------------------------------
// Small servers of the kind middlewares ask (JWKS documents, auth services)
// ---------------------------------------------------------------------------------------------

type Handler = dyn Fn(&http::request::Parts) -> http::Response<Body> + Send + Sync;

/// A small real HTTP server (JWKS documents, auth services): answers every request with
/// `handler`, counting them.
pub struct TestServer {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub async fn start(
        handler: impl Fn(&http::request::Parts) -> http::Response<Body> + Send + Sync + 'static,
    ) -> TestServer {
        TestServer::serve(None, Arc::new(handler)).await
    }

    /// The same server over TLS, with a `localhost` certificate from `ca` (see
    /// [`TestServer::https_url`]).
    pub async fn start_tls(
        ca: &TestCa,
        handler: impl Fn(&http::request::Parts) -> http::Response<Body> + Send + Sync + 'static,
    ) -> TestServer {
        TestServer::serve(Some(ca.acceptor()), Arc::new(handler)).await
    }

    async fn serve(tls: Option<tokio_rustls::TlsAcceptor>, handler: Arc<Handler>) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&hits);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (handler, counter) = (Arc::clone(&handler), Arc::clone(&counter));
                let service = hyper::service::service_fn(move |req: http::Request<_>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let (parts, _) = req.into_parts();
                    let resp = handler(&parts);
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let http1 = hyper::server::conn::http1::Builder::new();
                match tls.clone() {
                    None => {
                        tokio::spawn(http1.serve_connection(TokioIo::new(stream), service));
                    }
                    // The handshake runs in the connection's task, so a client that fails
                    // it (an untrusted certificate) holds up no other.
                    Some(acceptor) => {
                        tokio::spawn(async move {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = http1.serve_connection(TokioIo::new(tls), service).await;
                            }
                        });
                    }
                }
            }
        });
        TestServer { addr, hits, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `https://localhost:PORT{path}`: the name the certificate of [`TestServer::start_tls`]
    /// is for.
    pub fn https_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A fresh certificate authority for a test, and one `localhost` certificate it issued; its
/// certificate is also written to a PEM file for `SSL_CERT_FILE`.
pub struct TestCa {
    pub cert: rustls::pki_types::CertificateDer<'static>,
    /// The CA certificate as PEM, in a file of its own.
    pub pem_file: PathBuf,
    pub leaf_pem: String,
    pub leaf_key_pem: String,
    /// The `localhost` certificate and its key, as PEM files for servers outside the test.
    pub leaf_file: PathBuf,
    pub leaf_key_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> TestCa {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pem_file = dir.path().join("ca.pem");
        std::fs::write(&pem_file, ca.pem()).unwrap();
        let (leaf_file, leaf_key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&leaf_file, leaf.pem()).unwrap();
        std::fs::write(&leaf_key_file, key.serialize_pem()).unwrap();
        TestCa {
            cert: ca.der().clone(),
            pem_file,
            leaf_file,
            leaf_key_file,
            leaf_pem: leaf.pem(),
            leaf_key_pem: key.serialize_pem(),
            _dir: dir,
        }
    }

    /// `SSL_CERT_FILE` set to the CA's certificate: the environment for a gatehouse that
    /// trusts it (and nothing else).
    pub fn trusted_env(&self) -> (&'static str, &str) {
        ("SSL_CERT_FILE", self.pem_file.to_str().unwrap())
    }

    /// A server side of TLS with the `localhost` certificate, offering `http/1.1`.
    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::pem::PemObject;
        let chain =
            vec![
                rustls::pki_types::CertificateDer::from_pem_slice(self.leaf_pem.as_bytes())
                    .unwrap(),
            ];
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(self.leaf_key_pem.as_bytes()).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

/// One HTTP/1.1 request to `port` over TLS (to `localhost`), trusting `ca`.
pub async fn tls_send(
    port: u16,
    ca: rustls::pki_types::CertificateDer<'static>,
    req: http::Request<Body>,
) -> Resp {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tls = within(STEP, "TLS handshake", connector.connect(name, tcp))
        .await
        .expect("TLS handshake with localhost");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    collect(
        within(STEP, "response over TLS", sender.send_request(req))
            .await
            .unwrap(),
    )
    .await
}

pub fn reply(status: u16, headers: &[(&str, &str)], body: &str) -> http::Response<Body> {
    let mut b = http::Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(full(body.to_owned())).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Python
// ---------------------------------------------------------------------------------------------

/// A venv in `target/<name>` with the pinned `requirements` (a path from the crate root),
/// created once per test run and reused across runs while the file is unchanged (a stamp
/// file holds what was installed). Installing needs PyPI: without it the caller's tests fail
/// saying so, they never pass silently.
pub fn python_venv(name: &str, requirements: &str) -> PathBuf {
    static VENVS: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    // Held while installing: tests of one binary share the venv, and wait for it.
    let mut venvs = VENVS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, venv)) = venvs.iter().find(|(n, _)| n == name) {
        return venv.clone();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target").join(name);
    let requirements = root.join(requirements);
    let wanted = std::fs::read_to_string(&requirements).expect("read the requirements");
    let stamp = venv.join("installed-requirements.txt");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        run_setup(
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            "python3 -m venv (on Debian install python3-venv)",
        );
        run_setup(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--disable-pip-version-check"])
                .args(["--timeout", "30", "--retries", "2", "-r"])
                .arg(&requirements),
            &format!(
                "pip install -r {}: PyPI (or the index configured for pip) must be reachable \
                 to run these tests",
                requirements.display()
            ),
        );
        std::fs::write(&stamp, wanted).expect("write the venv stamp");
    }
    venvs.push((name.to_owned(), venv.clone()));
    venv
}

/// Run a set-up command, panicking with `what` and its output if it fails.
pub fn run_setup(cmd: &mut Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: could not start: {e}"));
    assert!(
        out.status.success(),
        "{what}: failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

/// A `redis-server` on a free port, without persistence; killed on drop.
pub struct Redis {
    pub port: u16,
    child: Child,
}

impl Redis {
    pub async fn start() -> Redis {
        Redis::on(free_port()).await
    }

    /// Starts (or restarts) a server on `port` and waits until it accepts connections.
    pub async fn on(port: u16) -> Redis {
        Redis::with(port, &[]).await
    }

    /// A server on `port` started with `args` first (a config file must come first; TLS,
    /// ACL users, replication, `--sentinel`, cluster mode), waiting until it accepts
    /// connections.
    pub async fn with(port: u16, args: &[&str]) -> Redis {
        let mut child = Command::new("redis-server")
            .args(args)
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--bind", "127.0.0.1"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (apt-get install redis-server)");
        within(Duration::from_secs(10), "redis-server to listen", async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("redis-server on port {port} exited at start ({status}): is a port it binds taken?");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        Redis { port, child }
    }

    /// Sends `kill -SIGNAL` to the server (`STOP` freezes it, `CONT` thaws it).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server and waits until it is gone; returns its port for a restart.
    pub fn kill(mut self) -> u16 {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.port
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The step of `explain --format json`'s report for the chain entry `name`.
pub fn step<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["chain"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {report:#}"))
}

/// A body of frames sent in turn.
pub struct Frames(pub std::collections::VecDeque<http_body::Frame<bytes::Bytes>>);

impl http_body::Body for Frames {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}

/// A body of `data` followed by `trailers`.
pub fn with_trailers(data: &'static str, trailers: &[(&str, &str)]) -> Body {
    let mut fields = http::HeaderMap::new();
    for (name, value) in trailers {
        fields.append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let frames = [
        http_body::Frame::data(bytes::Bytes::from(data)),
        http_body::Frame::trailers(fields),
    ];
    http_body_util::BodyExt::boxed(Frames(frames.into()))
}
