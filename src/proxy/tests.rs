//! The request lifecycle built in-process: every way a request can end goes through the
//! one last phase exactly once, and it records the same facts in metrics and the audit
//! event.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::{Client, Proxy};
use crate::audit::Audit;
use crate::middleware::Handles;
use crate::Config;

/// An app on loopback: `/ok` answers `200 hello`, `/hang` never answers, `/long` sends
/// half of its declared body and stops.
async fn app() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let reply: &[u8] = if head.starts_with("GET /ok ") {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
                } else if head.starts_with("GET /long ") {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello"
                } else {
                    // /hang: hold the connection, answer nothing.
                    let _ = stream.read(&mut buf).await;
                    return;
                };
                let _ = stream.write_all(reply).await;
                let _ = stream.read(&mut buf).await;
            });
        }
    });
    url
}

struct Setup {
    proxy: Arc<Proxy>,
    handles: Arc<Handles>,
    audit: Arc<Audit>,
    events: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn setup(upstream: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let source = format!(
        "[server]\nlisten = \"127.0.0.1:1\"\n[upstream]\nurl = \"{upstream}\"\ntimeout = \"60s\"\n\
         [[middleware]]\ntype = \"ip_filter\"\nname = \"no-admin\"\ndeny = [\"0.0.0.0/0\"]\npaths = [\"/admin/**\"]\n\
         [audit]\nflush_interval = \"10ms\"\n[[audit.sinks]]\ntype = \"file\"\npath = \"{}\"\n",
        events.display()
    );
    let config = Config::parse(std::path::Path::new("t.toml"), &source, &|_| None).unwrap();
    let handles = Arc::new(Handles::offline());
    let audit = Audit::start(
        config.audit.as_ref().unwrap(),
        &handles.metrics,
        &handles.redis,
        2,
    )
    .unwrap();
    let proxy = Arc::new(Proxy::new(&config, &handles, Some(audit.clone()), None));
    Setup {
        proxy,
        handles,
        audit,
        events,
        _dir: dir,
    }
}

impl Setup {
    fn request(&self, path: &str) -> Request<Empty<Bytes>> {
        Request::get(path)
            .header("host", "app")
            .body(Empty::new())
            .unwrap()
    }

    /// The audit events written so far, once the pipeline has flushed.
    async fn events(&self) -> Vec<serde_json::Value> {
        self.audit.shutdown(Duration::from_secs(5)).await;
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn client() -> Client {
    Client::new([10, 0, 0, 7].into(), false, 0)
}

#[tokio::test]
async fn every_end_of_a_request_is_recorded_once() {
    let s = setup(&app().await).await;
    let client = client();

    // Proxied, body read to the end.
    let resp = s
        .proxy
        .handle(s.request("/ok"), &client, Instant::now(), None)
        .await;
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "hello");

    // Refused by a middleware.
    let resp = s
        .proxy
        .handle(s.request("/admin/x"), &client, Instant::now(), None)
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    drop(resp.into_body().collect().await.unwrap());

    // The client leaves mid-body: the response body is dropped unfinished.
    let resp = s
        .proxy
        .handle(s.request("/long"), &client, Instant::now(), None)
        .await;
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "hello");
    drop(body);

    // The client leaves before any answer: the request future is dropped.
    let abandoned = s
        .proxy
        .handle(s.request("/hang"), &client, Instant::now(), None);
    assert!(tokio::time::timeout(Duration::from_millis(200), abandoned)
        .await
        .is_err());

    let m = &s.handles.metrics;
    for (status, count) in [(200, 2), (403, 1), (499, 1)] {
        assert_eq!(m.requests(status), count, "status {status}");
    }
    assert_eq!(
        m.upstream_duration.count(),
        2,
        "two answers came from the app"
    );
    let text = m.encode();
    assert!(
        text.contains("gatehouse_rejections_total{middleware=\"no-admin\",status=\"403\"} 1"),
        "{text}"
    );

    let events = s.events().await;
    let by_path = |path: &str| {
        events
            .iter()
            .find(|e| e["path"] == path)
            .unwrap_or_else(|| panic!("no event for {path}: {events:?}"))
    };
    assert_eq!(events.len(), 4, "{events:#?}");
    let ok = by_path("/ok");
    assert_eq!(
        (ok["status"].as_u64(), ok["decision"].as_str()),
        (Some(200), Some("allow"))
    );
    assert_eq!(
        (ok["bytes_out"].as_u64(), ok["completed"].as_bool()),
        (Some(5), Some(true))
    );
    assert_eq!(ok["client_ip"], "10.0.0.7");
    let denied = by_path("/admin/x");
    assert_eq!(denied["decision"], "deny");
    assert_eq!(denied["denied_by"], "no-admin");
    let long = by_path("/long");
    assert_eq!(
        (long["bytes_out"].as_u64(), long["completed"].as_bool()),
        (Some(5), Some(false))
    );
    let hang = by_path("/hang");
    assert_eq!(hang["status"], 499);
    assert_eq!(hang["completed"], false);
    assert!(
        hang["upstream_ms"].is_null(),
        "the app never answered: {hang}"
    );
}

#[tokio::test]
async fn an_upstream_failure_is_an_error_with_its_kind_counted() {
    // Nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = setup(&format!("http://127.0.0.1:{port}")).await;
    let mut req = s.request("/ok");
    req.headers_mut()
        .insert("x-request-id", HeaderValue::from_static("r-1"));
    let resp = s.proxy.handle(req, &client(), Instant::now(), None).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    drop(resp);
    assert!(s
        .handles
        .metrics
        .encode()
        .contains("gatehouse_upstream_errors_total{kind=\"connect\"} 1"));
    let events = s.events().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["decision"], "error");
    assert_eq!(events[0]["status"], 502);
}
