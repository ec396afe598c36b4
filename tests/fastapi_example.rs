//! The FastAPI example (`deploy/examples/fastapi`) behind the real binary, with the example's
//! own `proxy.toml`: what the app used to do in Python middleware (timing header, API-key
//! check, audit log) is now done by gatehouse, and these tests check it end to end.
//!
//! The app runs under uvicorn from a Python venv the test creates in `target/fastapi-venv`
//! (reused while `requirements.txt` is unchanged). Installing it needs PyPI: without it the
//! tests fail saying so, they never pass silently.
//!
//! One test per feature, each with its own gatehouse and app, so after a merge a failure
//! names the feature that broke. The deploy configs are also checked with `gatehouse check`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::net::{TcpStream, UnixStream};

const EXAMPLE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/examples/fastapi");
const API_KEY: &str = "example-test-key-5f2c";
/// The key's `id` in the example proxy.toml: the subject of authenticated requests.
const KEY_ID: &str = "example-client";
/// `burst` of the example's rate limit.
const BURST: usize = 5;

/// The venv with the example's pinned requirements (see [`common::python_venv`]).
fn python_venv() -> PathBuf {
    common::python_venv("fastapi-venv", "deploy/examples/fastapi/requirements.txt")
}

/// Where uvicorn listens: a free port on 127.0.0.1, or a Unix socket in a temporary directory
/// (`--uds`, as in deploy/kubernetes/components/unix-socket).
enum Listen {
    Tcp(u16),
    Unix {
        path: PathBuf,
        _dir: tempfile::TempDir,
    },
}

impl Listen {
    fn tcp() -> Listen {
        Listen::Tcp(free_port())
    }

    fn unix() -> Listen {
        let dir = tempfile::tempdir().unwrap();
        Listen::Unix {
            path: dir.path().join("app.sock"),
            _dir: dir,
        }
    }
}

/// uvicorn serving one of the example apps, killed on drop.
struct App {
    child: Child,
    listen: Listen,
    log: tempfile::NamedTempFile,
}

impl App {
    /// Start `app:app` from `app_dir` (relative to the example) and wait until it listens.
    async fn start(app_dir: &str, listen: Listen, envs: &[(&str, &str)]) -> App {
        let venv = python_venv();
        let log = tempfile::NamedTempFile::new().unwrap();
        let address = match &listen {
            Listen::Tcp(port) => vec!["--host=127.0.0.1".to_owned(), format!("--port={port}")],
            Listen::Unix { path, .. } => vec![format!("--uds={}", path.display())],
        };
        let child = Command::new(venv.join("bin/python"))
            .args(["-m", "uvicorn", "app:app"])
            .args(address)
            .arg(format!("--app-dir={app_dir}"))
            .current_dir(EXAMPLE_DIR)
            .env("PYTHONDONTWRITEBYTECODE", "1") // no __pycache__ in the source tree
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("start uvicorn");
        let mut app = App { child, listen, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !app.listening().await {
            if let Some(status) = app.child.try_wait().unwrap() {
                panic!("uvicorn exited with {status}\n{}", app.output());
            }
            assert!(
                Instant::now() < deadline,
                "uvicorn did not listen within 30s\n{}",
                app.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        app
    }

    async fn listening(&self) -> bool {
        match &self.listen {
            Listen::Tcp(port) => TcpStream::connect(("127.0.0.1", *port)).await.is_ok(),
            Listen::Unix { path, .. } => UnixStream::connect(path).await.is_ok(),
        }
    }

    /// The value for gatehouse's `upstream.url` (`APP_URL` in the example's proxy.toml).
    fn url(&self) -> String {
        match &self.listen {
            Listen::Tcp(port) => format!("http://127.0.0.1:{port}"),
            Listen::Unix { path, .. } => format!("unix:{}", path.display()),
        }
    }

    fn port(&self) -> u16 {
        match self.listen {
            Listen::Tcp(port) => port,
            Listen::Unix { .. } => panic!("the app listens on a Unix socket"),
        }
    }

    /// uvicorn's log (one access line per request it served).
    fn output(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Waits (up to 10 s) until the access log shows a request for `path_and_query`.
    async fn wait_for_access(&self, path_and_query: &str) {
        let line = format!("\"GET {path_and_query} HTTP/1.1\"");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.output().contains(&line) {
            assert!(
                Instant::now() < deadline,
                "the app never logged {line}\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl App {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The "after" app behind gatehouse with the example's proxy.toml, every `${VAR}` of it set
/// by the test: listen and admin addresses, the app's URL, the key, the rate, the audit file.
struct Example {
    app: App,
    gh: Gatehouse,
    audit_dir: tempfile::TempDir,
}

impl Example {
    async fn start(rate_limit: &str, listen: Listen) -> Example {
        let app = App::start(".", listen, &[]).await;
        let template = std::fs::read_to_string(Path::new(EXAMPLE_DIR).join("proxy.toml"))
            .expect("read the example proxy.toml");
        let audit_dir = tempfile::tempdir().unwrap();
        let port = free_port().to_string();
        let listen = format!("127.0.0.1:{port}");
        let admin = format!("127.0.0.1:{}", free_port());
        let app_url = app.url();
        let audit_file = audit_dir.path().join("audit.jsonl");
        let mut gh = Gatehouse::spawn(
            &template,
            &[("port", &port)],
            &[
                ("GATEHOUSE_LISTEN", &listen),
                ("ADMIN_LISTEN", &admin),
                ("APP_URL", &app_url),
                ("API_KEY", API_KEY),
                ("RATE_LIMIT", rate_limit),
                ("AUDIT_FILE", audit_file.to_str().unwrap()),
                ("SHUTDOWN_DELAY", "0s"),
            ],
        );
        gh.wait_ready().await;
        Example { app, gh, audit_dir }
    }

    fn audit_file(&self) -> PathBuf {
        self.audit_dir.path().join("audit.jsonl")
    }

    async fn get(&self, path: &str, key: Option<&str>) -> Resp {
        let mut req = request("GET", path).header("user-agent", "fastapi-example-test");
        if let Some(key) = key {
            req = req.header("x-api-key", key);
        }
        send(self.gh.port, req.body(empty()).unwrap()).await
    }
}

/// `x-response-time` as gatehouse formats it: milliseconds with three decimals.
fn assert_timing_header(resp: &Resp) {
    let value = resp.header("x-response-time").expect("x-response-time");
    let ms = value
        .strip_suffix("ms")
        .unwrap_or_else(|| panic!("x-response-time {value:?} should end in ms"));
    let (whole, frac) = ms.split_once('.').expect("x-response-time has decimals");
    assert!(
        !whole.is_empty()
            && whole.bytes().all(|b| b.is_ascii_digit())
            && frac.len() == 3
            && frac.bytes().all(|b| b.is_ascii_digit()),
        "x-response-time {value:?} is not like 12.345ms"
    );
}

/// The migration's starting point still works: the "before" app does the request id, the
/// timing headers, the key check, the rate limit and the audit log itself (what the README's
/// side-by-side compares and bench.sh measures).
#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn before_app_did_it_in_python_middleware() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let app = App::start(
        "before",
        Listen::tcp(),
        &[
            ("API_KEY", API_KEY),
            ("AUDIT_FILE", audit.to_str().unwrap()),
            ("RATE_LIMIT", "1/h"),
        ],
    )
    .await;
    let denied = get(app.port(), "/items/1").await;
    assert_eq!(denied.status, 401, "{denied:?}");
    assert_eq!(denied.header("www-authenticate").as_deref(), Some("ApiKey"));
    assert!(denied.header("ratelimit-limit").is_none(), "{denied:?}");
    let key = |path: &str| request("GET", path).header("x-api-key", API_KEY);
    let ok = send(app.port(), key("/items/2?page=3").body(empty()).unwrap()).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_timing_header(&ok);
    assert!(ok
        .header("server-timing")
        .is_some_and(|v| v.starts_with("app;dur=")));
    let id = ok.header("x-request-id").expect("x-request-id");
    assert!(is_uuid(&id), "generated request id {id:?}");
    assert_eq!(
        ok.json()["request_id"],
        id.as_str(),
        "the routes got the id"
    );
    assert_eq!(
        ok.header("ratelimit-limit").as_deref(),
        Some(BURST.to_string().as_str())
    );
    assert_eq!(ok.header("ratelimit-remaining").as_deref(), Some("4"));

    // A well-formed incoming id is kept; a malformed one is replaced.
    let kept = send(
        app.port(),
        key("/items/3")
            .header("x-request-id", "client-id.7")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(kept.header("x-request-id").as_deref(), Some("client-id.7"));
    assert_eq!(kept.json()["request_id"], "client-id.7");
    let replaced = send(
        app.port(),
        key("/items/4")
            .header("x-request-id", "no spaces")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert!(
        replaced.header("x-request-id").is_some_and(|v| is_uuid(&v)),
        "{replaced:?}"
    );

    // Three requests of the burst of 5 are spent: two more pass, then 429.
    for _ in 0..2 {
        let resp = send(app.port(), key("/items/5").body(empty()).unwrap()).await;
        assert_eq!(resp.status, 200, "{resp:?}");
    }
    let limited = send(app.port(), key("/items/6").body(empty()).unwrap()).await;
    assert_eq!(limited.status, 429, "{limited:?}");
    assert_eq!(limited.json()["error"], "rate_limited");
    assert_eq!(limited.header("ratelimit-remaining").as_deref(), Some("0"));
    let retry: u64 = limited
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .unwrap();
    assert!(retry >= 1, "retry-after {retry}");
    assert!(limited.header("x-request-id").is_some(), "{limited:?}");

    let lines = within(STEP, "the before app's audit lines", async {
        loop {
            let text = std::fs::read_to_string(&audit).unwrap_or_default();
            if text.lines().count() >= 7 {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let events: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 7, "one line per request:\n{lines}");
    assert_eq!(events[0]["status"], 401, "{lines}");
    assert_eq!(events[1]["status"], 200, "{lines}");
    assert_eq!(events[1]["query"], "page=3", "{lines}");
    assert_eq!(events[1]["subject"], KEY_ID, "{lines}");
    assert_eq!(events[1]["request_id"], id.as_str(), "{lines}");
    assert_eq!(events[6]["status"], 429, "{lines}");
}

/// gatehouse adds the request id (and hands it to the app), the timing headers, and takes
/// the API key off the request before the app sees it.
#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn request_id_and_timing_headers_come_from_gatehouse() {
    let ex = Example::start("1000/s", Listen::tcp()).await;
    let resp = ex.get("/items/7", Some(API_KEY)).await;
    assert_eq!(resp.status, 200, "{resp:?}\n{}", ex.gh.output());
    let id = resp.header("x-request-id").expect("x-request-id");
    assert!(is_uuid(&id), "generated request id {id:?}");
    let body = resp.json();
    assert_eq!(body["id"], 7, "the app answered: {body}");
    assert_eq!(body["request_id"], id.as_str(), "the app got the same id");
    assert_eq!(body["api_key_seen"], false, "the key was stripped: {body}");
    assert_timing_header(&resp);
    let server_timing = resp.header("server-timing").expect("server-timing");
    assert!(server_timing.contains("upstream;dur="), "{server_timing}");

    // The slow route: the app's time shows in the headers of gatehouse, not of the app.
    let slow = ex.get("/slow?seconds=0.2", Some(API_KEY)).await;
    assert_eq!(slow.status, 200, "{slow:?}");
    assert_eq!(slow.json()["slept"], 0.2);
    assert_timing_header(&slow);
    assert!(slow.header("x-request-id").is_some_and(|v| v != id));
}

/// Missing and wrong keys get gatehouse's 401 (with the request id) and never reach the app.
#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn api_key_rejections_are_401_and_never_reach_the_app() {
    let ex = Example::start("1000/s", Listen::tcp()).await;
    for key in [None, Some("not-the-key")] {
        let resp = ex.get("/items/401", key).await;
        let body = resp.assert_gatehouse_error(401, "unauthorized");
        assert_eq!(resp.header("www-authenticate").as_deref(), Some("ApiKey"));
        let id = resp.header("x-request-id").expect("x-request-id on a 401");
        assert_eq!(body["request_id"], id.as_str());
        assert_timing_header(&resp);
    }
    // The app logs requests in order: once it has logged the allowed one sent afterwards,
    // a rejected request that had reached it would be in its log too.
    let ok = ex.get("/items/200", Some(API_KEY)).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    ex.app.wait_for_access("/items/200").await;
    assert!(
        !ex.app.output().contains("/items/401"),
        "a rejected request reached the app:\n{}",
        ex.app.output()
    );
    // The app's health endpoint is public (skip_paths).
    assert_eq!(ex.get("/healthz", None).await.status, 200);
}

/// The streaming route's chunks pass through one by one, not buffered into one body.
#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn stream_arrives_in_chunks() {
    let ex = Example::start("1000/s", Listen::tcp()).await;
    let mut conn = H1::connect(ex.gh.port).await;
    let resp = conn
        .send_streaming(
            request("GET", "/stream?chunks=4&interval=0.3")
                .header("x-api-key", API_KEY)
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    let mut body = resp.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = within(STEP, "next stream frame", body.frame()).await {
        let frame = frame.expect("stream frame");
        if let Some(data) = frame.data_ref() {
            if frames.is_empty() {
                // The app sleeps between chunks: the first one is here while the rest is not.
                assert!(!body.is_end_stream(), "the body ended with the first chunk");
            }
            frames.push(String::from_utf8_lossy(data).into_owned());
        }
    }
    assert!(frames.len() > 1, "one frame only: {frames:?}");
    assert_eq!(frames.concat(), "chunk 0\nchunk 1\nchunk 2\nchunk 3\n");
}

/// The app on a Unix socket (`uvicorn --uds`, `upstream.url = "unix:…"`), as
/// deploy/kubernetes/components/unix-socket runs the pod: requests, rejections and streams
/// behave as over TCP, and once the app is gone gatehouse answers 502.
#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn example_over_a_unix_socket() {
    let mut ex = Example::start("1000/s", Listen::unix()).await;
    let resp = ex.get("/items/9", Some(API_KEY)).await;
    assert_eq!(resp.status, 200, "{resp:?}\n{}", ex.gh.output());
    let body = resp.json();
    assert_eq!(body["id"], 9, "{body}");
    assert_eq!(
        body["request_id"].as_str(),
        resp.header("x-request-id").as_deref()
    );
    assert_eq!(body["api_key_seen"], false, "{body}");
    assert!(resp
        .header("server-timing")
        .is_some_and(|v| v.contains("upstream;dur=")));
    ex.get("/items/9", None)
        .await
        .assert_gatehouse_error(401, "unauthorized");
    let stream = ex
        .get("/stream?chunks=3&interval=0.05", Some(API_KEY))
        .await;
    assert_eq!(stream.text(), "chunk 0\nchunk 1\nchunk 2\n", "{stream:?}");

    ex.app.kill();
    ex.get("/items/9", Some(API_KEY))
        .await
        .assert_gatehouse_error(502, "bad_gateway");
}

/// After the burst, the key's requests get 429 with retry-after; the allowed ones carried the
/// ratelimit-* headers.
#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn rate_limit_answers_429_after_the_burst() {
    let ex = Example::start("1/h", Listen::tcp()).await;
    let mut allowed = 0;
    let limited = loop {
        let resp = ex.get("/items/1", Some(API_KEY)).await;
        if resp.status == 429 {
            break resp;
        }
        assert_eq!(resp.status, 200, "{resp:?}");
        for name in ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"] {
            assert!(resp.header(name).is_some(), "{name} missing: {resp:?}");
        }
        allowed += 1;
        assert!(allowed <= BURST + 1, "no 429 after {allowed} requests");
    };
    assert!(
        allowed >= BURST,
        "429 after {allowed} requests, burst is {BURST}"
    );
    let body = limited.assert_gatehouse_error(429, "rate_limited");
    assert_eq!(
        body["request_id"].as_str(),
        limited.header("x-request-id").as_deref()
    );
    let retry: u64 = limited
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .expect("retry-after in whole seconds");
    assert!(retry >= 1, "retry-after {retry}");
    assert_eq!(limited.header("ratelimit-remaining").as_deref(), Some("0"));
}

/// Every request is one audit event in the file; SIGTERM flushes them before exit 0.
#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn audit_events_are_written_to_the_file_sink() {
    let mut ex = Example::start("1000/s", Listen::tcp()).await;
    let ok = ex.get("/items/5?page=2", Some(API_KEY)).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let denied = ex.get("/items/6", None).await;
    assert_eq!(denied.status, 401, "{denied:?}");
    ex.gh.send_signal("TERM");
    ex.gh.assert_exits_with(0).await;

    let text = std::fs::read_to_string(ex.audit_file())
        .unwrap_or_else(|e| panic!("audit file: {e}\n{}", ex.gh.output()));
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let event_for = |resp: &Resp| {
        let id = resp.header("x-request-id").expect("x-request-id");
        let matching: Vec<_> = events.iter().filter(|e| e["request_id"] == id).collect();
        assert_eq!(matching.len(), 1, "one event for {id}:\n{text}");
        matching[0].clone()
    };

    let allow = event_for(&ok);
    for field in [
        "ts",
        "request_id",
        "method",
        "host",
        "path",
        "query",
        "status",
        "duration_ms",
        "upstream_ms",
        "client_ip",
        "subject",
        "decision",
        "denied_by",
        "bytes_in",
        "bytes_out",
        "completed",
        "user_agent",
    ] {
        assert!(allow.get(field).is_some(), "{field} missing: {allow}");
    }
    assert!(allow["ts"].is_string(), "{allow}");
    assert_eq!(allow["method"], "GET");
    assert_eq!(allow["host"], format!("127.0.0.1:{}", ex.gh.port));
    assert_eq!(allow["path"], "/items/5");
    assert_eq!(allow["query"], "page=2");
    assert_eq!(allow["status"], 200);
    assert_eq!(allow["client_ip"], "127.0.0.1");
    assert_eq!(allow["subject"], KEY_ID);
    assert_eq!(allow["decision"], "allow");
    assert!(allow["denied_by"].is_null(), "{allow}");
    assert_eq!(allow["bytes_in"], 0);
    assert_eq!(allow["bytes_out"], ok.body.len());
    assert_eq!(allow["completed"], true);
    assert_eq!(allow["user_agent"], "fastapi-example-test");
    assert!(allow["duration_ms"].is_number() && allow["upstream_ms"].is_number());

    let deny = event_for(&denied);
    assert_eq!(deny["status"], 401);
    assert_eq!(deny["decision"], "deny");
    assert_eq!(deny["denied_by"], "api_key");
    assert!(deny["subject"].is_null(), "{deny}");
    assert_eq!(deny["path"], "/items/6");
    assert!(deny["query"].is_null(), "{deny}");
}

/// The configs shipped (the example `proxy.toml` and those under deploy/) load in the real
/// binary (`gatehouse check`), with the variables a pod or the test would set; the pod's
/// configs also with the `APP_URL` that components/unix-socket sets, whose socket they use.
#[test]
fn deploy_configs_pass_gatehouse_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let socket = Some("unix:/run/app/app.sock");
    for (config, app_url) in [
        ("proxy.toml", None),
        ("deploy/examples/fastapi/proxy.toml", None),
        ("deploy/kubernetes/base/proxy.toml", None),
        ("deploy/kubernetes/components/redis/proxy.toml", None),
        ("deploy/kubernetes/base/proxy.toml", socket),
        ("deploy/kubernetes/components/redis/proxy.toml", socket),
    ] {
        let path = root.join(config);
        let mut envs = vec![
            ("API_KEY", API_KEY),
            ("REDIS_URL", "redis://rate-limit-redis:6379"),
        ];
        envs.extend(app_url.map(|url| ("APP_URL", url)));
        let out = cli(&["check", "--config", path.to_str().unwrap()], &envs, None);
        assert_eq!(
            out.code,
            Some(0),
            "gatehouse check {config} (APP_URL {app_url:?})\n{}\n{}",
            out.stdout,
            out.stderr
        );
        if let Some(url) = app_url {
            assert!(
                out.stdout.contains(&format!("-> upstream {url} ")),
                "{config} with APP_URL={url}:\n{}",
                out.stdout
            );
        }
    }
}
