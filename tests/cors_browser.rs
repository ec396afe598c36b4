//! `cors` as a browser sees it: headless Chromium loads a page from one origin, and the
//! page's `fetch` calls go to gatehouse on another, in front of an app that still runs a
//! permissive CORS layer of its own (it reflects any origin, with credentials). The page
//! (tests/fixtures/cors_page.html) reports what its script could see, a status, a body,
//! headers or the bare network error that a CORS refusal is, to the server it came from;
//! the test checks that, what reached the app, and the audit events.
//!
//! Chromium runs without a driver: the page itself is the observer, so nothing but the
//! browser is needed. It comes from Debian (`apt-get install chromium`, which `.ci/run`
//! does). Where there is none the test says so on stderr and passes, except under CI
//! (`CI=true`), where a missing browser fails it.

mod common;

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
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
async fn a_page_on_another_origin_gets_what_the_readme_promises() {
    let Some(chromium) = find_chromium() else {
        return no_browser();
    };
    let app = App::start().await;
    let (report_tx, mut reports) = mpsc::channel::<Bytes>(1);
    let gatehouse_port = free_port().to_string();
    let gatehouse_url = format!("http://127.0.0.1:{gatehouse_port}");
    let page = render(PAGE, &[("gatehouse", &gatehouse_url), ("key", KEY)]);
    let (page_origin, _page_server) = serve(Arc::new(move |req: Request<Bytes>| {
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
    let events = tempfile::tempdir().unwrap();
    let events_file = events.path().join("events.jsonl");
    let mut gh = Gatehouse::start(
        CONFIG,
        &[
            ("port", &gatehouse_port),
            ("upstream", &app.url),
            ("page", &page_origin),
            ("key", KEY),
            ("events", events_file.to_str().unwrap()),
        ],
    )
    .await;

    let browser = Browser::open(&chromium, &format!("{page_origin}/"));
    let report = match tokio::time::timeout(Duration::from_secs(60), reports.recv()).await {
        Ok(Some(body)) => serde_json::from_slice::<Value>(&body).expect("a JSON report"),
        _ => panic!(
            "no report from the page within 60s\n--- chromium ---\n{}\n{}",
            browser.log(),
            gh.output()
        ),
    };
    drop(browser);
    gh.send_signal("TERM");
    gh.assert_exits_with(0).await;
    let events: Vec<Value> = std::fs::read_to_string(&events_file)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let page = Page(&report);
    assert!(
        report.get("failure").is_none(),
        "the page failed: {report:#}"
    );
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

/// Why the test did not run, said where `cargo test` shows it (not captured), unless the
/// run is CI's, which installs the browser and so must run the test.
fn no_browser() {
    let reason = "no `chromium` on PATH (Debian: apt-get install chromium)";
    assert!(
        std::env::var("CI").is_err(),
        "{reason}; .ci/run installs it, so CI must not skip this test"
    );
    let _ = writeln!(std::io::stderr(), "cors_browser: skipped: {reason}");
}

fn find_chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromium"))
        .find(|p| p.is_file())
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
/// any `Origin`, with credentials, and exposing `x-internal`.
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
            let (parts, body) = req.into_parts();
            log.lock()
                .unwrap()
                .push((parts.method.to_string(), parts.uri.path().to_owned()));
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
                    .serve_connection(TokioIo::new(stream), service),
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
