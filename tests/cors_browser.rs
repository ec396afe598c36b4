//! `cors` as a browser sees it: headless Chromium loads a page from one origin, and the
//! page's `fetch` calls go to gatehouse on another, in front of an app that still runs a
//! permissive CORS layer of its own (it reflects any origin, with credentials). The page
//! (tests/fixtures/cors_page.html) reports what its script could see, a status, a body,
//! headers or the bare network error that a CORS refusal is, to the server it came from;
//! the test checks that, what reached the app, and the audit events. A second page
//! ([`WS_PAGE`]), served from an allowed origin and from a foreign one, opens a WebSocket
//! through gatehouse and reads the headers gatehouse itself adds.
//!
//! Chromium runs without a driver: the page itself is the observer, so nothing but the
//! browser is needed. It comes from Debian (`apt-get install chromium`, which `.ci/run`
//! does). Where there is none the tests are compiled ignored, with the reason (see build.rs),
//! except under CI (`CI=true`), where a missing browser fails them.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const PAGE: &str = include_str!("fixtures/cors_page.html");
const KEY: &str = "page-key-7c1e";

/// `web` serves the page's origin on `/api/**` (with credentials; `api_key` below it on
/// `/api/private/**`), `partner-only` refuses it on `/partner/**`, `public` is `"*"` on
/// `/public/**`. No `allow_headers`: the default has to let the JSON `PUT` through.
const CONFIG: &str = r#"[server]
listen = "127.0.0.1:{port}"
shutdown_grace = "3s"

[upstream]
url = "{upstream}"

[[middleware]]
type = "request_id"

[[middleware]]
type = "cors"
name = "web"
paths = ["/api/**"]
allow_origins = ["{page}"]
allow_credentials = true
expose_headers = ["x-upstream", "x-request-id"]

[[middleware]]
type = "cors"
name = "partner-only"
paths = ["/partner/**"]
allow_origins = ["https://partner.example"]

[[middleware]]
type = "cors"
name = "public"
paths = ["/public/**"]
allow_origins = ["*"]

[[middleware]]
type = "api_key"
paths = ["/api/private/**"]
keys = [{ id = "page", key = "{key}" }]

[audit]
[[audit.sinks]]
type = "file"
path = "{events}"
"#;

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_chromium),
    ignore = "needs chromium (apt-get install chromium)"
)]
async fn a_page_on_another_origin_gets_what_the_readme_promises() {
    let chromium = find_program("chromium", "Debian: apt-get install chromium");
    let app = App::start().await;
    let gatehouse_port = free_port().to_string();
    let gatehouse_url = format!("http://127.0.0.1:{gatehouse_port}");
    let mut pages = PageServer::start(&render(
        PAGE,
        &[("gatehouse", &gatehouse_url), ("key", KEY)],
    ))
    .await;
    let events = tempfile::tempdir().unwrap();
    let events_file = events.path().join("events.jsonl");
    let mut gh = Gatehouse::start(
        CONFIG,
        &[
            ("port", &gatehouse_port),
            ("upstream", &app.url),
            ("page", &pages.origin),
            ("key", KEY),
            ("events", events_file.to_str().unwrap()),
        ],
    )
    .await;

    let (report, _) = pages.report(&chromium, &gh).await;
    gh.send_signal("TERM");
    gh.assert_exits_with(0).await;
    let events: Vec<Value> = std::fs::read_to_string(&events_file)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let page = Page(&report);
    println!("browser: {}", report["user_agent"]);

    // A simple GET from the allowed origin: readable, the exposed headers too, and not the
    // one the app tried to expose; no cookie without `credentials: "include"`.
    let (status, r) = page.readable("simple_allowed");
    assert_eq!(status, 200);
    assert_eq!(r["headers"]["x-upstream"], "app", "exposed: {r}");
    assert!(
        r["headers"]["x-request-id"].as_str().is_some_and(is_uuid),
        "the request id is exposed: {r}"
    );
    assert_eq!(r["headers"]["x-internal"], Value::Null, "not exposed: {r}");
    let seen = page.app_saw("simple_allowed");
    assert_eq!(seen["method"], "GET");
    assert_eq!(seen["headers"]["cookie"], Value::Null, "{seen}");

    // The app reflects any origin with credentials; gatehouse's refusal still holds.
    page.refused("simple_refused");
    assert!(
        app.got("GET", "/partner/items"),
        "a simple request is sent all the same"
    );

    // A preflighted PUT with JSON and a custom header, with only `allow_origins` set.
    page.readable("put_json_allowed");
    let seen = page.app_saw("put_json_allowed");
    assert_eq!(seen["method"], "PUT");
    assert_eq!(seen["headers"]["content-type"], "application/json");
    assert_eq!(seen["headers"]["x-client-version"], "1.2.3");
    assert_eq!(seen["body"], r#"{"name":"widget"}"#);
    page.refused("put_json_refused");
    assert!(
        !app.got("PUT", "/partner/items/7"),
        "the preflight stopped it"
    );

    // Credentials: the cookie goes along where `allow_credentials` is on, and `"*"` can
    // never be read with credentials.
    page.readable("credentials_allowed");
    let seen = page.app_saw("credentials_allowed");
    assert_eq!(seen["headers"]["cookie"], "session=s3cr3t", "{seen}");
    page.refused("credentials_any_origin");
    assert_eq!(page.readable("any_origin").0, 200);

    // `api_key` below `cors`: its 401 is readable, its preflight was answered by `cors`.
    let (status, r) = page.readable("unauthorized");
    assert_eq!(status, 401, "{r}");
    let body: Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["error"], "unauthorized");
    assert_eq!(body["request_id"], r["headers"]["x-request-id"], "{r}");
    assert_eq!(page.readable("authorized").0, 200);
    assert_eq!(
        app.count("GET", "/api/private/report"),
        1,
        "only the authorized call"
    );
    assert_eq!(
        app.count("OPTIONS", ""),
        0,
        "gatehouse answers every preflight"
    );

    // The preflights' audit events: the browser's go-ahead is `allow`, a refusal `deny`.
    let find = |method: &str, path: &str| -> Vec<&Value> {
        let found: Vec<&Value> = events
            .iter()
            .filter(|e| e["method"] == method && e["path"] == path)
            .collect();
        assert!(!found.is_empty(), "no {method} {path} event in {events:#?}");
        found
    };
    for path in ["/api/items/7", "/api/private/report"] {
        for e in find("OPTIONS", path) {
            assert_eq!(
                (&e["status"], &e["decision"], &e["denied_by"]),
                (&json!(204), &json!("allow"), &Value::Null),
                "{e}"
            );
        }
    }
    let refused = find("OPTIONS", "/partner/items/7");
    assert_eq!(refused.len(), 1, "{refused:#?}");
    assert_eq!(
        (&refused[0]["status"], &refused[0]["decision"]),
        (&json!(403), &json!("deny"))
    );
    assert_eq!(refused[0]["denied_by"], "partner-only");
    let statuses: Vec<&Value> = find("GET", "/api/private/report")
        .iter()
        .map(|e| &e["status"])
        .collect();
    assert!(statuses.contains(&&json!(401)), "{statuses:?}");
}

/// Opens a WebSocket to gatehouse's `/ws` and reports its events (`open`, `error`,
/// `close`), then what it could read of a `GET /api/items` (`ratelimit-remaining` and
/// `x-request-id`, which no `expose_headers` names) and of a `PUT /api/put` that
/// `allow_methods` leaves out.
const WS_PAGE: &str = r#"<!doctype html>
<script>
const gatehouse = "{gatehouse}";
function websocket() {
  return new Promise(resolve => {
    const events = [];
    const ws = new WebSocket(gatehouse.replace("http:", "ws:") + "/ws");
    ws.onopen = () => { events.push("open"); resolve(events); };
    ws.onerror = () => events.push("error");
    ws.onclose = () => { events.push("close"); resolve(events); };
  });
}
async function read(path, init) {
  try {
    const r = await fetch(gatehouse + path, init);
    const h = name => r.headers.get(name);
    return {status: r.status, ratelimit_remaining: h("ratelimit-remaining"), request_id: h("x-request-id")};
  } catch (e) {
    return {error: String(e)};
  }
}
(async () => {
  let report;
  try {
    report = {
      websocket: await websocket(),
      get: await read("/api/items"),
      put: await read("/api/put", {method: "PUT"}),
    };
  } catch (e) {
    report = {failure: String(e)};
  }
  await fetch("/report", {method: "POST", body: JSON.stringify(report)});
})();
</script>
"#;

/// `web` allows the page's origin on `/api/**` and `/ws`, with a `rate_limit` below it and a
/// `request_id` above, and no `expose_headers`.
const WS_CONFIG: &str = r#"[server]
listen = "127.0.0.1:{port}"
shutdown_grace = "3s"

[upstream]
url = "{upstream}"

[[middleware]]
type = "request_id"

[[middleware]]
type = "cors"
name = "web"
paths = ["/api/**", "/ws"]
allow_origins = ["{page}"]
allow_methods = ["GET", "POST"]

[[middleware]]
type = "rate_limit"
rate = "100/s"
"#;

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_chromium),
    ignore = "needs chromium (apt-get install chromium)"
)]
async fn a_websocket_opens_from_an_allowed_origin_only_and_gatehouse_s_headers_are_readable() {
    let chromium = find_program("chromium", "Debian: apt-get install chromium");
    let app = App::start().await;
    let gatehouse_port = free_port().to_string();
    let gatehouse_url = format!("http://127.0.0.1:{gatehouse_port}");
    let page = render(WS_PAGE, &[("gatehouse", &gatehouse_url)]);
    let (mut allowed, mut foreign) = (
        PageServer::start(&page).await,
        PageServer::start(&page).await,
    );
    let mut gh = Gatehouse::start(
        WS_CONFIG,
        &[
            ("port", &gatehouse_port),
            ("upstream", &app.url),
            ("page", &allowed.origin),
        ],
    )
    .await;

    // From a foreign origin: no WebSocket, and the handshake never reaches the app.
    let (report, _) = foreign.report(&chromium, &gh).await;
    assert_eq!(report["websocket"], json!(["error", "close"]), "{report:#}");
    assert!(!app.got("GET", "/ws"), "the app saw the handshake");
    assert!(report["get"]["error"].is_string(), "{report:#}");

    // From the allowed origin: it opens, and the headers gatehouse adds are readable.
    let (report, browser) = allowed.report(&chromium, &gh).await;
    assert_eq!(report["websocket"], json!(["open"]), "{report:#}");
    assert!(app.got("GET", "/ws"));
    let get = &report["get"];
    assert_eq!(get["status"], 200, "{report:#}");
    assert!(
        get["ratelimit_remaining"]
            .as_str()
            .is_some_and(|r| r.parse::<u32>().is_ok()),
        "{report:#}"
    );
    assert!(
        get["request_id"].as_str().is_some_and(is_uuid),
        "{report:#}"
    );
    // A method `allow_methods` leaves out: refused, and the console does not blame the
    // origin, which is allowed.
    assert!(report["put"]["error"].is_string(), "{report:#}");
    assert!(!app.got("PUT", "/api/put"));
    // Chromium may write the console message after the page has posted its report.
    let log = browser
        .log_once(|log| log.contains("/api/put") && log.contains("does not have HTTP ok status"))
        .await;
    let console: Vec<&str> = log.lines().filter(|l| l.contains("/api/put")).collect();
    assert!(
        console
            .iter()
            .any(|l| l.contains("does not have HTTP ok status"))
            && !console
                .iter()
                .any(|l| l.contains("No 'Access-Control-Allow-Origin'")),
        "the console on the PUT: {console:#?}"
    );
    gh.send_signal("TERM");
    gh.assert_exits_with(0).await;
}

/// A server of one page on a fresh origin; the page posts its report to `/report`.
struct PageServer {
    origin: String,
    reports: mpsc::Receiver<Bytes>,
    _server: tokio::task::JoinHandle<()>,
}

impl PageServer {
    async fn start(page: &str) -> PageServer {
        let (report_tx, reports) = mpsc::channel::<Bytes>(1);
        let page = page.to_owned();
        let (origin, server) = serve(Arc::new(move |req: Request<Bytes>| {
            match (req.method().as_str(), req.uri().path()) {
                ("GET", "/") => respond(StatusCode::OK, "text/html", page.clone()),
                ("POST", "/report") => {
                    let _ = report_tx.try_send(req.into_body());
                    respond(StatusCode::NO_CONTENT, "text/plain", String::new())
                }
                _ => respond(StatusCode::NOT_FOUND, "text/plain", String::new()),
            }
        }))
        .await;
        PageServer {
            origin,
            reports,
            _server: server,
        }
    }

    /// Shows the page in a fresh browser until it reports: the report, and the browser, still
    /// open, whose log holds its console messages.
    async fn report(&mut self, chromium: &Path, gh: &Gatehouse) -> (Value, Browser) {
        let browser = Browser::open(chromium, &format!("{}/", self.origin));
        let wait = tokio::time::timeout(Duration::from_secs(60), self.reports.recv());
        let report = match wait.await {
            Ok(Some(body)) => serde_json::from_slice::<Value>(&body).expect("a JSON report"),
            _ => panic!(
                "no report from the page within 60s\n--- chromium ---\n{}\n{}",
                browser.log(),
                gh.output()
            ),
        };
        assert!(
            report.get("failure").is_none(),
            "the page failed: {report:#}"
        );
        (report, browser)
    }
}

/// The page's report.
struct Page<'a>(&'a Value);

impl Page<'_> {
    /// A call whose response the page could read: its status and what it saw.
    fn readable(&self, case: &str) -> (u64, &Value) {
        let r = &self.0["results"][case];
        let status = r["status"]
            .as_u64()
            .unwrap_or_else(|| panic!("{case}: the page could not read the response: {r}"));
        (status, r)
    }

    /// A call the browser refused to show the page: a network error (a `TypeError`).
    fn refused(&self, case: &str) {
        let r = &self.0["results"][case];
        assert!(
            r["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("TypeError")),
            "{case}: expected the browser to refuse it, the page saw {r}"
        );
    }

    /// What the app answered it saw, from a readable call's body.
    fn app_saw(&self, case: &str) -> Value {
        let (_, r) = self.readable(case);
        serde_json::from_str(r["body"].as_str().unwrap())
            .unwrap_or_else(|e| panic!("{case}: not the app's JSON ({e}): {r}"))
    }
}

/// Headless Chromium showing one URL, with a fresh profile; killed (with every process it
/// started) on drop.
struct Browser {
    child: Child,
    dir: tempfile::TempDir,
}

impl Browser {
    fn open(binary: &Path, url: &str) -> Browser {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("chromium.log")).unwrap();
        let child = Command::new(binary)
            // As root (CI) Chromium needs --no-sandbox; the rest keeps it from reaching
            // out to the network (updates, sync, QUIC probes).
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                // Console messages (a CORS refusal's reason) go to the log.
                "--enable-logging=stderr",
            ])
            .arg(format!(
                "--user-data-dir={}",
                dir.path().join("profile").display()
            ))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        Browser { child, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chromium.log")).unwrap_or_default()
    }

    /// The log once `done` holds for it, or as it is after 10 s (the caller's assertion
    /// then says what is missing).
    async fn log_once(&self, done: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if done(&log) || tokio::time::Instant::now() >= deadline {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The browser's own process group: its renderer and helper processes too.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

/// The app behind gatehouse: answers every request with what it saw (method, path, headers,
/// body) as JSON, the way an app with a leftover permissive CORS layer would: reflecting
/// any `Origin`, with credentials, and exposing `x-internal`. It accepts every WebSocket
/// handshake, whatever its `Origin`, as an app that leaves that to gatehouse does.
struct App {
    url: String,
    requests: Arc<Mutex<Vec<(String, String)>>>,
    _server: tokio::task::JoinHandle<()>,
}

impl App {
    async fn start() -> App {
        let requests: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let log = Arc::clone(&requests);
        let (url, server) = serve(Arc::new(move |req: Request<Bytes>| {
            let (mut parts, body) = req.into_parts();
            log.lock()
                .unwrap()
                .push((parts.method.to_string(), parts.uri.path().to_owned()));
            if parts.headers.contains_key("sec-websocket-key") {
                return accept_websocket(&mut parts);
            }
            let headers: serde_json::Map<String, Value> = parts
                .headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").into()))
                .collect();
            let seen = json!({
                "method": parts.method.as_str(),
                "path": parts.uri.path(),
                "headers": headers,
                "body": String::from_utf8_lossy(&body),
            });
            let mut resp = respond(StatusCode::OK, "application/json", seen.to_string());
            let h = resp.headers_mut();
            let origin = parts.headers.get("origin").cloned();
            h.insert(
                "access-control-allow-origin",
                origin.unwrap_or(HeaderValue::from_static("*")),
            );
            for (name, value) in [
                ("access-control-allow-credentials", "true"),
                ("access-control-expose-headers", "x-internal"),
                ("x-internal", "secret"),
                ("x-upstream", "app"),
            ] {
                h.insert(name, HeaderValue::from_static(value));
            }
            resp
        }))
        .await;
        App {
            url,
            requests,
            _server: server,
        }
    }

    /// How many `method` requests for paths starting with `path` reached the app.
    fn count(&self, method: &str, path: &str) -> usize {
        let requests = self.requests.lock().unwrap();
        requests
            .iter()
            .filter(|(m, p)| m == method && p.starts_with(path))
            .count()
    }

    fn got(&self, method: &str, path: &str) -> bool {
        let requests = self.requests.lock().unwrap();
        requests.iter().any(|(m, p)| m == method && p == path)
    }
}

/// The `101` to a WebSocket handshake; the connection is held open until the client leaves.
fn accept_websocket(parts: &mut http::request::Parts) -> Response<Full<Bytes>> {
    let accept = websocket_accept(parts.headers["sec-websocket-key"].as_bytes());
    if let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() {
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let _ = tokio::io::copy(&mut io, &mut tokio::io::sink()).await;
            }
        });
    }
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept)
        .body(Full::default())
        .unwrap()
}

/// RFC 6455's `sec-websocket-accept` for `key`: base64 of the SHA-1 of the key and the
/// protocol's GUID.
fn websocket_accept(key: &[u8]) -> String {
    use base64::Engine;
    let mut sha1 = sha1_smol::Sha1::new();
    sha1.update(key);
    sha1.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha1.digest().bytes())
}

type Handler = Arc<dyn Fn(Request<Bytes>) -> Response<Full<Bytes>> + Send + Sync>;

/// An HTTP/1.1 server on a free 127.0.0.1 port answering with `handler`, the request body
/// read first; returns its origin.
async fn serve(handler: Handler) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = Arc::clone(&handler);
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let handler = Arc::clone(&handler);
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await?.to_bytes();
                    Ok::<_, hyper::Error>(handler(Request::from_parts(parts, body)))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades(),
            );
        }
    });
    (origin, task)
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}
