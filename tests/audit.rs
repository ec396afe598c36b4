//! Audit events against the real binary: the event's fields, `include`, the sinks, a stuck
//! sink, flushing on SIGTERM and reopening on SIGHUP, and the spool's journal across
//! SIGKILL, a torn tail, a changed sink list, its size bound and an unwritable disk.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A gatehouse with an `[audit]` section in front of a test upstream; `{events}` in the
/// template is a file in a temp dir the test keeps.
struct Setup {
    up: Upstream,
    gh: Gatehouse,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn start(rest: &str) -> Setup {
        let up = Upstream::start().await;
        Setup::start_with(&up.url(), rest, up).await
    }

    async fn start_with(upstream_url: &str, rest: &str, up: Upstream) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("events.jsonl");
        let gh = Gatehouse::start(
            &config("shutdown_grace = \"3s\"", "", rest),
            &[
                ("upstream", upstream_url),
                ("events", events.to_str().unwrap()),
                ("dir", dir.path().to_str().unwrap()),
            ],
        )
        .await;
        Setup { up, gh, dir }
    }

    fn events_path(&self) -> PathBuf {
        self.dir.path().join("events.jsonl")
    }

    /// SIGTERM, a clean exit, and the events the file sink got.
    async fn stop(&mut self) -> Vec<Value> {
        self.gh.send_signal("TERM");
        self.gh.assert_exits_with(0).await;
        read_events(&self.events_path())
    }
}

/// Waits (up to 10 s) until gatehouse has logged `text`.
async fn wait_for_log(gh: &Gatehouse, text: &str) {
    within(Duration::from_secs(10), text, async {
        while !gh.stderr().contains(text) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

fn the_event<'a>(events: &'a [Value], path: &str) -> &'a Value {
    let found: Vec<&Value> = events.iter().filter(|e| e["path"] == path).collect();
    assert_eq!(found.len(), 1, "one event for {path} in {events:#?}");
    found[0]
}

const FILE_SINK: &str = "[[audit.sinks]]\ntype = \"file\"\npath = \"{events}\"\n";

/// `concurrency` keep-alive connections sending `total` GETs of `path` between them; returns
/// the `x-request-id`s the client saw.
async fn load(port: u16, total: usize, concurrency: usize, path: &str) -> Vec<String> {
    let tasks: Vec<_> = (0..concurrency)
        .map(|c| {
            let path = path.to_owned();
            tokio::spawn(async move {
                let mut h1 = H1::connect(port).await;
                let mut ids = Vec::new();
                for _ in (c..total).step_by(concurrency) {
                    let resp = h1.send(request("GET", &path).body(empty()).unwrap()).await;
                    assert_eq!(resp.status, 200);
                    ids.extend(resp.header("x-request-id"));
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::with_capacity(total);
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    ids
}

#[tokio::test]
async fn ten_thousand_requests_give_ten_thousand_events_with_the_ids_clients_saw() {
    let mut s = Setup::start(&format!(
        "[[middleware]]\ntype = \"request_id\"\n\n[audit]\n{FILE_SINK}"
    ))
    .await;
    let seen: HashSet<String> = load(s.gh.port, 10_000, 50, "/echo")
        .await
        .into_iter()
        .collect();
    assert_eq!(seen.len(), 10_000);
    let events = s.stop().await;
    assert_eq!(events.len(), 10_000);
    let ids: HashSet<String> = events
        .iter()
        .map(|e| e["request_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, seen);
    assert!(events
        .iter()
        .all(|e| e["status"] == 200 && e["decision"] == "allow" && e["completed"] == true));
}

#[tokio::test]
async fn events_carry_spec_fields() {
    let mut s = Setup::start(&format!(
        "[[middleware]]\ntype = \"request_id\"\n\n\
         [[middleware]]\ntype = \"ip_filter\"\nname = \"block\"\npaths = [\"/denied\"]\ndeny = [\"127.0.0.0/8\"]\n\n\
         [audit]\nrequest_headers = [\"user-agent\", \"X-Tenant\"]\n{FILE_SINK}"
    ))
    .await;
    let port = s.gh.port;
    let allowed = send(
        port,
        request("GET", "/echo?page=2&x")
            .header("user-agent", "t/1")
            .header("x-tenant", "acme")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(allowed.status, 200);
    let upload = send(
        port,
        request("POST", "/upload")
            .body(full(vec![b'u'; 1000]))
            .unwrap(),
    )
    .await;
    assert_eq!(upload.status, 200);
    let denied = get(port, "/denied").await;
    assert_eq!(denied.status, 403);

    // A client that goes away in the middle of a streamed response.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(b"GET /stream?chunks=50&ms=100 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("data: 0") {
        let mut buf = [0; 4096];
        let n = within(STEP, "first chunk", stream.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "stream ended early");
        got.extend_from_slice(&buf[..n]);
    }
    drop(stream);
    let events = wait_for_events(&s.events_path(), 4).await;
    let events_now = s.stop().await;
    assert_eq!(events.len(), events_now.len());

    let e = the_event(&events, "/echo");
    let obj = e.as_object().unwrap();
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut expected = vec![
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
        "session",
        "decision",
        "denied_by",
        "deny_reason",
        "policy_rule",
        "fail_open",
        "bytes_in",
        "bytes_out",
        "completed",
        "trace_id",
        "span_id",
        "grpc_status",
        "user_agent",
        "x_tenant",
    ];
    expected.sort_unstable();
    assert_eq!(keys, expected);
    let ts = e["ts"].as_str().unwrap();
    assert!(
        ts.len() == 24 && ts.ends_with('Z') && &ts[10..11] == "T" && &ts[19..20] == ".",
        "{ts}"
    );
    assert_eq!(
        e["request_id"].as_str(),
        allowed.header("x-request-id").as_deref()
    );
    assert_eq!(e["method"], "GET");
    assert_eq!(e["host"], format!("127.0.0.1:{port}"));
    assert_eq!(e["query"], "page=2&x");
    assert_eq!(e["status"], 200);
    assert_eq!(e["client_ip"], "127.0.0.1");
    assert_eq!(e["subject"], Value::Null);
    assert_eq!(e["decision"], "allow");
    assert_eq!(e["denied_by"], Value::Null);
    assert_eq!(e["bytes_in"], 0);
    assert_eq!(e["bytes_out"], allowed.body.len() as u64);
    assert_eq!(e["completed"], true);
    assert!(e["grpc_status"].is_null(), "not a gRPC call: {e}");
    assert_eq!(e["user_agent"], "t/1");
    assert_eq!(e["x_tenant"], "acme");
    let (duration, upstream) = (
        e["duration_ms"].as_f64().unwrap(),
        e["upstream_ms"].as_f64().unwrap(),
    );
    assert!(
        upstream > 0.0 && duration >= upstream,
        "{duration} {upstream}"
    );

    let e = the_event(&events, "/upload");
    assert_eq!(e["method"], "POST");
    assert_eq!(e["query"], Value::Null);
    assert_eq!(e["bytes_in"], 1000);
    assert_eq!(e["bytes_out"], upload.body.len() as u64);
    assert_eq!(e["user_agent"], Value::Null);

    let e = the_event(&events, "/denied");
    assert_eq!(e["status"], 403);
    assert_eq!(e["decision"], "deny");
    assert_eq!(e["denied_by"], "block");
    assert_eq!(e["upstream_ms"], Value::Null);
    assert_eq!(e["bytes_out"], denied.body.len() as u64);
    assert_eq!(e["completed"], true);
    assert_eq!(
        e["request_id"].as_str(),
        denied.header("x-request-id").as_deref()
    );

    let e = the_event(&events, "/stream");
    assert_eq!(e["completed"], false);
    assert_eq!(e["status"], 200);
    let out = e["bytes_out"].as_u64().unwrap();
    assert!(out > 0 && out < 50 * "data: 49\n\n".len() as u64, "{out}");
}

/// An app that answers `/broken` with bytes that are no HTTP response (gatehouse answers
/// `502`), and anything else with `200 ok`.
async fn half_broken_app() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let Some(head) = read_http_head(&mut stream, &mut buf).await else {
                    return;
                };
                let reply: &[u8] = if head.starts_with("get /broken ") {
                    b"this is not HTTP at all\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                };
                let _ = stream.write_all(reply).await;
            });
        }
    });
    (url, task)
}

/// The keys of an event, sorted.
fn keys(event: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = event
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

/// Whatever its end (allowed, refused by a middleware, refused by the HTTP/1 parser, failed
/// upstream), an event has the same keys, and the `request_headers` are the client's.
#[tokio::test]
async fn every_event_has_the_same_keys_and_the_clients_request_headers() {
    let (app, app_task) = half_broken_app().await;
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let chain = "[[middleware]]\ntype = \"headers\"\nrequest = { set = { \"x-tenant\" = \"rewritten\" } }\n\n\
                 [[middleware]]\ntype = \"api_key\"\npaths = [\"/private/**\"]\nkeys = [{ id = \"ci\", key = \"k\" }]\n\n\
                 [audit]\nrequest_headers = [\"user-agent\", \"x-tenant\"]\n";
    let gh = Gatehouse::start(
        &config("", "", &format!("{chain}{FILE_SINK}")),
        &[("upstream", &app), ("events", events.to_str().unwrap())],
    )
    .await;
    let port = gh.port;
    let from_client = |path: &str, agent: &str, tenant: &str| {
        request("GET", path)
            .header("user-agent", agent)
            .header("x-tenant", tenant)
            .body(empty())
            .unwrap()
    };
    let allowed = send(port, from_client("/open", "probe/1", "acme")).await;
    assert_eq!(allowed.status, 200, "{allowed:?}");
    send(port, from_client("/private/x", "probe/2", "t-9"))
        .await
        .assert_gatehouse_error(401, "unauthorized");
    send(port, from_client("/broken", "probe/3", "t-3"))
        .await
        .assert_gatehouse_error(502, "bad_gateway");
    let (raw, _) = raw_exchange(
        port,
        b"GET /malformed HTTP/1.1\r\nHost: x\r\nUser-Agent: probe/4\r\nno colon here\r\n\r\n",
        STEP,
    )
    .await;
    assert!(
        raw.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&raw)
    );

    let events = wait_for_events(&events, 4).await;
    let (allowed, denied, failed, refused) = (
        the_event(&events, "/open"),
        the_event(&events, "/private/x"),
        the_event(&events, "/broken"),
        the_event(&events, "/malformed"),
    );
    assert_eq!(allowed["decision"], "allow");
    assert_eq!(denied["decision"], "deny");
    assert_eq!(failed["decision"], "error");
    assert_eq!(
        (refused["decision"].as_str(), refused["status"].as_u64()),
        (Some("deny"), Some(400))
    );
    for other in [denied, failed, refused] {
        assert_eq!(keys(other), keys(allowed), "{other}");
    }
    // The values the client sent, not the ones a middleware set before the request went on.
    for (event, agent, tenant) in [
        (allowed, "probe/1", "acme"),
        (denied, "probe/2", "t-9"),
        (failed, "probe/3", "t-3"),
    ] {
        assert_eq!(event["user_agent"], agent, "{event}");
        assert_eq!(event["x_tenant"], tenant, "{event}");
    }
    // A head the parser refused was never read as a request: nothing of it is known.
    assert_eq!(refused["user_agent"], Value::Null);
    assert_eq!(refused["x_tenant"], Value::Null);
    app_task.abort();
}

#[tokio::test]
async fn include_denied_records_only_denials() {
    let mut s = Setup::start(&format!(
        "[[middleware]]\ntype = \"ip_filter\"\npaths = [\"/denied\"]\ndeny = [\"127.0.0.0/8\"]\n\n\
         [audit]\ninclude = \"denied\"\n{FILE_SINK}"
    ))
    .await;
    for _ in 0..5 {
        assert_eq!(get(s.gh.port, "/echo").await.status, 200);
    }
    for _ in 0..3 {
        assert_eq!(get(s.gh.port, "/denied").await.status, 403);
    }
    assert_eq!(s.up.request_count(), 5);
    let events = s.stop().await;
    assert_eq!(events.len(), 3, "{events:#?}");
    assert!(events.iter().all(|e| e["decision"] == "deny"
        && e["denied_by"] == "ip_filter"
        && e["path"] == "/denied"));
}

const CORS_ENTRY: &str = "[[middleware]]\ntype = \"cors\"\nname = \"browsers\"\n\
                          allow_origins = [\"https://app.example\"]\n";

/// A browser's preflight from `origin` for a `PUT` of `path`.
async fn preflight(port: u16, path: &str, origin: &str) -> Resp {
    let req = request("OPTIONS", path)
        .header("origin", origin)
        .header("access-control-request-method", "PUT")
        .header("access-control-request-headers", "content-type")
        .body(empty())
        .unwrap();
    send(port, req).await
}

#[tokio::test]
async fn a_cors_preflight_answered_204_is_allowed_and_its_403_denied_by_the_entry() {
    let mut s = Setup::start(&format!("{CORS_ENTRY}\n[audit]\n{FILE_SINK}")).await;
    let ok = preflight(s.gh.port, "/go-ahead", "https://app.example").await;
    assert_eq!(ok.status, 204, "{ok:?}");
    let refused = preflight(s.gh.port, "/refused", "https://evil.example").await;
    assert_eq!(refused.status, 403, "{refused:?}");
    let events = s.stop().await;
    assert_eq!(events.len(), 2, "{events:#?}");

    let e = the_event(&events, "/go-ahead");
    assert_eq!(e["method"], "OPTIONS");
    assert_eq!(e["status"], 204);
    assert_eq!(e["decision"], "allow", "{e}");
    assert_eq!(e["denied_by"], Value::Null, "{e}");
    assert_eq!(e["upstream_ms"], Value::Null, "gatehouse answered it: {e}");

    let e = the_event(&events, "/refused");
    assert_eq!(e["status"], 403);
    assert_eq!(e["decision"], "deny", "{e}");
    assert_eq!(e["denied_by"], "browsers", "{e}");
    assert_eq!(s.up.request_count(), 0, "no preflight reaches the app");
}

/// The symptom the decision caused: `include = "denied"` filling up with successful preflights.
#[tokio::test]
async fn include_denied_leaves_successful_preflights_out() {
    let mut s = Setup::start(&format!(
        "{CORS_ENTRY}\n[audit]\ninclude = \"denied\"\n{FILE_SINK}"
    ))
    .await;
    for _ in 0..3 {
        let ok = preflight(s.gh.port, "/go-ahead", "https://app.example").await;
        assert_eq!(ok.status, 204, "{ok:?}");
    }
    let refused = preflight(s.gh.port, "/refused", "https://evil.example").await;
    assert_eq!(refused.status, 403, "{refused:?}");
    let events = s.stop().await;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["path"], "/refused");
    assert_eq!(events[0]["denied_by"], "browsers");
}

#[tokio::test]
async fn stdout_sink_and_a_dead_upstream_as_error() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let up = Upstream::start().await;
    let mut s = Setup::start_with(&dead, "[audit]\n[[audit.sinks]]\ntype = \"stdout\"\n", up).await;
    assert_eq!(get(s.gh.port, "/x?y").await.status, 502);
    s.stop().await;
    let lines: Vec<Value> =
        s.gh.stdout()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(lines.len(), 1, "{}", s.gh.stdout());
    let e = &lines[0];
    assert_eq!(e["status"], 502);
    assert_eq!(e["decision"], "error");
    assert_eq!(e["denied_by"], Value::Null);
    assert_eq!(e["query"], "y");
}

#[tokio::test]
async fn a_tiny_queue_drops_and_counts_while_requests_are_served() {
    let mut s = Setup::start(&format!("[audit]\nqueue_capacity = 1\n{FILE_SINK}")).await;
    load(s.gh.port, 1000, 20, "/echo").await;
    let events = s.stop().await;
    let log = s.gh.stderr();
    assert!(log.contains("audit queue full"), "{log}");
    // Dropped at the queue, or at the sink's own buffer when the dispatcher outran it.
    let dropped: u64 = log
        .lines()
        .filter(|l| l.contains("dropped during this run"))
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["dropped"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert!(dropped > 0);
    assert_eq!(events.len() as u64 + dropped, 1000);
}

#[tokio::test]
async fn a_stuck_sink_drops_for_itself_while_requests_and_other_sinks_go_on() {
    let fifo_dir = tempfile::tempdir().unwrap();
    let fifo = fifo_dir.path().join("nobody-reads");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let mut s = Setup::start(&format!(
        "[audit]\nqueue_capacity = 1000\n\
         [[audit.sinks]]\ntype = \"file\"\nname = \"stuck\"\npath = \"{}\"\n{FILE_SINK}",
        fifo.display()
    ))
    .await;
    load(s.gh.port, 2000, 20, "/echo").await;
    let events = s.stop().await;
    assert_eq!(events.len(), 2000);
    let log = s.gh.stderr();
    assert!(
        log.contains("audit sink too slow") && log.contains("\"sink\":\"stuck\""),
        "{log}"
    );
    // The stuck sink holds a batch and a full buffer when the grace runs out.
    let lost = log
        .lines()
        .find(|l| l.contains("audit events lost"))
        .unwrap_or_else(|| panic!("{log}"));
    let lost: Value = serde_json::from_str(lost).unwrap();
    assert_eq!(lost["sink"], "stuck");
    assert!(lost["lost"].as_u64().unwrap() >= 1000, "{lost}");
}

#[tokio::test]
async fn sigterm_flushes_a_full_queue() {
    let mut s = Setup::start(&format!(
        "[audit]\nqueue_capacity = 4096\nbatch_size = 65536\nflush_interval = \"1h\"\n{FILE_SINK}"
    ))
    .await;
    load(s.gh.port, 3000, 20, "/echo").await;
    // Neither the batch size nor the interval is reached: only the shutdown writes.
    assert!(read_events(&s.events_path()).is_empty());
    assert_eq!(s.stop().await.len(), 3000);
}

#[tokio::test]
async fn sighup_reopens_the_file_for_logrotate() {
    let mut s = Setup::start(&format!("[audit]\nflush_interval = \"10ms\"\n{FILE_SINK}")).await;
    assert_eq!(get(s.gh.port, "/first").await.status, 200);
    wait_for_events(&s.events_path(), 1).await;
    let rotated = s.dir.path().join("events.jsonl.1");
    std::fs::rename(s.events_path(), &rotated).unwrap();
    s.gh.send_signal("HUP");
    wait_for_log(&s.gh, "config reloaded").await;
    assert_eq!(get(s.gh.port, "/second").await.status, 200);
    let events = wait_for_events(&s.events_path(), 1).await;
    assert_eq!(events[0]["path"], "/second");
    let old = read_events(&rotated);
    assert_eq!(old.len(), 1);
    assert_eq!(old[0]["path"], "/first");
    assert_eq!(s.stop().await.len(), 1);
}

#[tokio::test]
async fn a_changed_audit_section_takes_effect_on_restart() {
    let mut s = Setup::start(&format!("[audit]\n{FILE_SINK}")).await;
    let source = std::fs::read_to_string(&s.gh.config_path).unwrap();
    std::fs::write(
        &s.gh.config_path,
        source.replace("[audit]", "[audit]\ninclude = \"denied\""),
    )
    .unwrap();
    s.gh.send_signal("HUP");
    wait_for_log(&s.gh, "only takes effect on restart").await;
    assert!(
        s.gh.stderr().contains("\"key\":\"audit\""),
        "{}",
        s.gh.stderr()
    );
    assert_eq!(get(s.gh.port, "/echo").await.status, 200);
    assert_eq!(s.stop().await.len(), 1, "include = \"all\" still holds");
}

/// An HTTP audit collector: answers the statuses of `script` to the first POSTs, then 200,
/// each after `delay`; keeps the events of the batches it accepted, in arrival order (from
/// when they arrived: a batch whose answer the sender never got counts).
struct Collector {
    addr: std::net::SocketAddr,
    state: std::sync::Arc<CollectorState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct CollectorState {
    script: std::sync::Mutex<std::collections::VecDeque<u16>>,
    accepted: std::sync::Mutex<Vec<Value>>,
    attempts: std::sync::atomic::AtomicUsize,
    /// `authorization` and `content-type` of the last POST.
    last_headers: std::sync::Mutex<(String, String)>,
    delay: std::sync::Mutex<Duration>,
}

impl Collector {
    async fn start(script: &[u16]) -> Collector {
        Collector::on(0, script).await
    }

    /// On `port` (0: any free one).
    async fn on(port: u16, script: &[u16]) -> Collector {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let state = std::sync::Arc::new(CollectorState {
            script: std::sync::Mutex::new(script.iter().copied().collect()),
            ..Default::default()
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let st = st.clone();
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let st = st.clone();
                        async move {
                            let header = |name: &str| {
                                req.headers()
                                    .get(name)
                                    .map(|v| v.to_str().unwrap().to_owned())
                                    .unwrap_or_default()
                            };
                            *st.last_headers.lock().unwrap() =
                                (header("authorization"), header("content-type"));
                            let body = http_body_util::BodyExt::collect(req.into_body())
                                .await
                                .unwrap()
                                .to_bytes();
                            st.attempts
                                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let status = st.script.lock().unwrap().pop_front().unwrap_or(200);
                            if status == 200 {
                                let batch: Vec<Value> = serde_json::from_slice(&body).unwrap();
                                st.accepted.lock().unwrap().extend(batch);
                            }
                            let delay = *st.delay.lock().unwrap();
                            tokio::time::sleep(delay).await;
                            let resp = http::Response::builder()
                                .status(status)
                                .body(empty())
                                .unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        Collector { addr, state, task }
    }

    fn url(&self) -> String {
        format!("http://{}/ingest", self.addr)
    }

    fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }

    fn attempts(&self) -> usize {
        self.state
            .attempts
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    fn accepted_ids(&self) -> Vec<String> {
        self.state
            .accepted
            .lock()
            .unwrap()
            .iter()
            .map(|e| e["request_id"].as_str().unwrap().to_owned())
            .collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn http_sink(collector: &Collector, more: &str) -> String {
    format!(
        "[[middleware]]\ntype = \"request_id\"\n\n[audit]\nbatch_size = 5\nflush_interval = \"20ms\"\n\
         [[audit.sinks]]\ntype = \"http\"\nurl = \"{}\"\nbackoff = \"10ms\"\n{more}\n",
        collector.url()
    )
}

#[tokio::test]
async fn http_sink_retries_5xx_and_429_until_the_collector_recovers() {
    let collector = Collector::start(&[503, 503, 429, 500, 503]).await;
    let mut s = Setup::start(&http_sink(
        &collector,
        "retries = 10\nheaders = { authorization = \"Bearer t\" }",
    ))
    .await;
    let mut sent = Vec::new();
    for _ in 0..40 {
        let resp = get(s.gh.port, "/echo").await;
        sent.extend(resp.header("x-request-id"));
    }
    s.stop().await;
    let mut got = collector.accepted_ids();
    assert_eq!(got.len(), 40, "every event exactly once");
    got.sort();
    sent.sort();
    assert_eq!(got, sent);
    assert!(
        collector.attempts() > 5 + 40 / 5 - 1,
        "{}",
        collector.attempts()
    );
    let headers = collector.state.last_headers.lock().unwrap().clone();
    assert_eq!(headers, ("Bearer t".into(), "application/json".into()));
}

#[tokio::test]
async fn http_sink_fails_a_batch_on_4xx_without_retrying() {
    let collector = Collector::start(&[400]).await;
    let mut s = Setup::start(&http_sink(&collector, "retries = 10")).await;
    let first = get(s.gh.port, "/first").await;
    wait_for_log(&s.gh, "audit sink failed to deliver a batch").await;
    assert!(
        s.gh.stderr().contains("400 Bad Request"),
        "{}",
        s.gh.stderr()
    );
    let second = get(s.gh.port, "/second").await;
    s.stop().await;
    assert_eq!(collector.attempts(), 2);
    assert_eq!(
        collector.accepted_ids(),
        vec![second.header("x-request-id").unwrap()]
    );
    assert_ne!(first.header("x-request-id"), second.header("x-request-id"));
}

/// `count` GETs on one keep-alive connection (so events are produced in this order);
/// returns the request ids.
async fn in_order(port: u16, count: usize) -> Vec<String> {
    let mut h1 = H1::connect(port).await;
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        let resp = h1
            .send(request("GET", "/echo").body(empty()).unwrap())
            .await;
        assert_eq!(resp.status, 200);
        ids.push(resp.header("x-request-id").unwrap());
    }
    ids
}

async fn wait_for_accepted(collector: &Collector, n: usize) {
    within(Duration::from_secs(10), "events at the collector", async {
        while collector.accepted_ids().len() < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

fn spool_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

#[tokio::test]
async fn with_a_spool_every_event_arrives_once_and_in_order_through_an_outage() {
    let collector = Collector::start(&[503; 20]).await;
    let mut s = Setup::start(
        &http_sink(&collector, "retries = 0")
            .replace("[audit]\n", "[audit]\nspool_dir = \"{dir}/spool\"\n"),
    )
    .await;
    let sent = in_order(s.gh.port, 60).await;
    wait_for_accepted(&collector, 60).await;
    s.stop().await;
    assert_eq!(collector.accepted_ids(), sent);
    assert!(s.gh.stderr().contains("spooling it"), "{}", s.gh.stderr());
    assert_eq!(spool_files(&s.dir.path().join("spool/http")), 0);
}

#[tokio::test]
async fn the_spool_is_delivered_by_the_next_process() {
    let collector = Collector::start(&[503; 10_000]).await;
    let spool = tempfile::tempdir().unwrap();
    let template = http_sink(&collector, "retries = 0").replace(
        "[audit]\n",
        &format!("[audit]\nspool_dir = \"{}\"\n", spool.path().display()),
    );
    let mut first = Setup::start(&template).await;
    let sent = in_order(first.gh.port, 20).await;
    first.stop().await;
    assert!(collector.accepted_ids().is_empty());
    assert!(spool_files(&spool.path().join("http")) > 0);

    collector.state.script.lock().unwrap().clear();
    let mut second = Setup::start(&template).await;
    wait_for_accepted(&collector, 20).await;
    assert_eq!(collector.accepted_ids(), sent);
    assert!(second
        .gh
        .stderr()
        .contains("audit spool from an earlier run"));
    second.stop().await;
    assert_eq!(spool_files(&spool.path().join("http")), 0);
}

#[tokio::test]
async fn a_torn_spool_file_is_replayed_up_to_its_last_intact_record() {
    let spool = tempfile::tempdir().unwrap();
    let sink_dir = spool.path().join("file");
    std::fs::create_dir_all(&sink_dir).unwrap();
    let records: Vec<bytes::Bytes> = (0..3)
        .map(|i| format!("{{\"request_id\":\"old-{i}\"}}").into())
        .collect();
    let data = gatehouse::audit::spool::encode(&records);
    // A crash while the last record was being written.
    std::fs::write(
        sink_dir.join("00000000000000000000-3.spool"),
        &data[..data.len() - 5],
    )
    .unwrap();
    let mut s = Setup::start(&format!(
        "[audit]\nflush_interval = \"10ms\"\nspool_dir = \"{}\"\n{FILE_SINK}",
        spool.path().display()
    ))
    .await;
    let replayed = wait_for_events(&s.events_path(), 2).await;
    assert_eq!(replayed.len(), 2);
    assert_eq!(replayed[0]["request_id"], "old-0");
    assert_eq!(replayed[1]["request_id"], "old-1");
    assert!(s.gh.stderr().contains("torn record"), "{}", s.gh.stderr());
    assert_eq!(get(s.gh.port, "/new").await.status, 200);
    let events = s.stop().await;
    assert_eq!(events.len(), 3);
    assert_eq!(events[2]["path"], "/new");
    assert_eq!(spool_files(&sink_dir), 0);
}

/// The `request_id`s of the events in `stream`, in stream order.
fn stream_ids(redis: &Redis, stream: &str) -> Vec<String> {
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query(&mut con)
        .unwrap();
    entries
        .into_iter()
        .map(|(_, fields)| {
            assert_eq!(fields[0], "event");
            let event: Value = serde_json::from_str(&fields[1]).unwrap();
            event["request_id"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn redis_sink(port: u16, audit: &str) -> String {
    format!(
        "[[middleware]]\ntype = \"request_id\"\n\n[audit]\nflush_interval = \"20ms\"\n{audit}\n\
         [[audit.sinks]]\ntype = \"redis_stream\"\nurl = \"redis://127.0.0.1:{port}\"\nstream = \"audit\"\nmaxlen = 100000\n"
    )
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
async fn the_redis_stream_gets_every_event() {
    let redis = Redis::start().await;
    let mut s = Setup::start(&redis_sink(redis.port, "")).await;
    let sent: HashSet<String> = load(s.gh.port, 2000, 20, "/echo")
        .await
        .into_iter()
        .collect();
    s.stop().await;
    let got = stream_ids(&redis, "audit");
    assert_eq!(got.len(), 2000);
    assert_eq!(got.into_iter().collect::<HashSet<_>>(), sent);
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
async fn a_redis_that_comes_up_late_gets_the_spooled_events_in_order() {
    let port = free_port();
    let mut s = Setup::start(&redis_sink(port, "spool_dir = \"{dir}/spool\"")).await;
    let sent = in_order(s.gh.port, 30).await;
    wait_for_log(&s.gh, "spooling it").await;
    let redis = Redis::on(port).await;
    within(
        Duration::from_secs(10),
        "the spool replayed into redis",
        async {
            while stream_ids(&redis, "audit").len() < 30 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    s.stop().await;
    assert_eq!(stream_ids(&redis, "audit"), sent);
}

/// A collector that accepts connections and never answers; returns its URL.
async fn silent_collector() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ingest", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (url, task)
}

#[tokio::test]
async fn an_http_collector_that_never_answers_times_out() {
    let (url, task) = silent_collector().await;
    let mut s = Setup::start(&format!(
        "[audit]\nflush_interval = \"10ms\"\n\
         [[audit.sinks]]\ntype = \"http\"\nurl = \"{url}\"\ntimeout = \"100ms\"\nretries = 1\nbackoff = \"10ms\"\n"
    ))
    .await;
    assert_eq!(get(s.gh.port, "/echo").await.status, 200);
    wait_for_log(&s.gh, "audit sink failed to deliver a batch").await;
    assert!(
        s.gh.stderr()
            .contains("no answer within 100ms (after 2 attempts)"),
        "{}",
        s.gh.stderr()
    );
    s.stop().await;
    task.abort();
}

#[tokio::test]
async fn at_shutdown_what_a_hung_sink_holds_goes_to_the_spool() {
    let (url, task) = silent_collector().await;
    let spool = tempfile::tempdir().unwrap();
    let mut s = Setup::start(&format!(
        "[[middleware]]\ntype = \"request_id\"\n\n\
         [audit]\nflush_interval = \"10ms\"\nspool_dir = \"{}\"\n\
         [[audit.sinks]]\ntype = \"http\"\nurl = \"{url}\"\ntimeout = \"1h\"\n",
        spool.path().display()
    ))
    .await;
    let sent = in_order(s.gh.port, 25).await;
    s.stop().await;
    assert!(
        s.gh.stderr()
            .contains("what the sinks did not take in time is spooled"),
        "{}",
        s.gh.stderr()
    );
    let mut files: Vec<_> = std::fs::read_dir(spool.path().join("http"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let spooled: Vec<String> = files
        .iter()
        .flat_map(|f| gatehouse::audit::spool::decode(&std::fs::read(f).unwrap()).events)
        .map(|e| {
            serde_json::from_slice::<Value>(&e).unwrap()["request_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(spooled, sent);
    task.abort();
}

// ---------------------------------------------------------------------------------------------
// The journal: what survives SIGKILL
// ---------------------------------------------------------------------------------------------

/// A config with a `request_id` middleware and one `http` sink (named `http`) to
/// `127.0.0.1:port`, journaled in `spool`; `audit` adds `[audit]` keys.
fn journaled_http(spool: &Path, port: u16, audit: &str) -> String {
    format!(
        "[[middleware]]\ntype = \"request_id\"\n\n[audit]\nspool_dir = \"{}\"\n{audit}\n\
         [[audit.sinks]]\ntype = \"http\"\nurl = \"http://127.0.0.1:{port}/ingest\"\nretries = 10\n",
        spool.display()
    )
}

fn request_id(event: &[u8]) -> String {
    let event: Value = serde_json::from_slice(event).unwrap();
    event["request_id"].as_str().unwrap().to_owned()
}

/// The `request_id`s in the journal of one sink's spool directory, in journal order.
fn journal_ids(dir: &Path) -> Vec<String> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    segments.retain(|p| p.extension().is_some_and(|e| e == "spool"));
    segments.sort();
    segments
        .iter()
        // A segment delivered and removed meanwhile is at the collector.
        .filter_map(|p| std::fs::read(p).ok())
        .flat_map(|data| gatehouse::audit::spool::decode(&data).events)
        .map(|e| request_id(&e))
        .collect()
}

/// Waits until every event of `sent` is in the journal in `dir`, or (read after it) at
/// `collector`.
async fn wait_journaled(dir: &Path, collector: Option<&Collector>, sent: &[String]) {
    within(Duration::from_secs(10), "every event journaled", async {
        loop {
            let mut have: HashSet<String> = journal_ids(dir).into_iter().collect();
            have.extend(collector.map(Collector::accepted_ids).unwrap_or_default());
            if sent.iter().all(|id| have.contains(id)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Waits until `collector` holds every event of `sent`.
async fn wait_for_ids(collector: &Collector, sent: &[String]) {
    within(Duration::from_secs(20), "events at the collector", async {
        loop {
            let have: HashSet<String> = collector.accepted_ids().into_iter().collect();
            if sent.iter().all(|id| have.contains(id)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

async fn sigkill(gh: &mut Gatehouse) {
    gh.send_signal("KILL");
    assert!(gh.wait_exit(Duration::from_secs(10)).await.is_some());
}

/// Each id once, where it first came: after a crash the batch that was in flight comes again.
fn first_seen(ids: Vec<String>) -> Vec<String> {
    let mut seen = HashSet::new();
    ids.into_iter()
        .filter(|id| seen.insert(id.clone()))
        .collect()
}

enum Collecting {
    Down,
    /// Two seconds per batch.
    Slow,
    Up,
}

/// 1,500 requests on 20 connections, SIGKILL once every event is in the journal or at the
/// collector, then a restart on the same spool with the collector up: every event arrives,
/// at least once. Returns what the collector accepted.
async fn burst_then_sigkill(collecting: Collecting) -> Vec<String> {
    let port = free_port();
    let spool = tempfile::tempdir().unwrap();
    let dir = spool.path().join("http");
    let collector = match collecting {
        Collecting::Down => None,
        Collecting::Slow | Collecting::Up => Some(Collector::on(port, &[]).await),
    };
    if let (Collecting::Slow, Some(c)) = (collecting, &collector) {
        c.set_delay(Duration::from_secs(2));
    }
    let template = journaled_http(
        spool.path(),
        port,
        "batch_size = 50\nflush_interval = \"1s\"",
    );
    let mut first = Setup::start(&template).await;
    let sent = load(first.gh.port, 1500, 20, "/echo").await;
    wait_journaled(&dir, collector.as_ref(), &sent).await;
    sigkill(&mut first.gh).await;

    let collector = match collector {
        Some(c) => {
            c.set_delay(Duration::ZERO);
            c
        }
        None => Collector::on(port, &[]).await,
    };
    let mut second = Setup::start(&template).await;
    wait_for_ids(&collector, &sent).await;
    second.stop().await;
    let got = collector.accepted_ids();
    let sent: HashSet<String> = sent.into_iter().collect();
    assert_eq!(got.iter().cloned().collect::<HashSet<_>>(), sent);
    assert_eq!(spool_files(&dir), 0, "delivered, the journal is emptied");
    got
}

#[tokio::test]
async fn sigkill_with_the_collector_down_loses_no_journaled_event() {
    let got = burst_then_sigkill(Collecting::Down).await;
    assert_eq!(
        got.len(),
        1500,
        "nothing was acknowledged: each exactly once"
    );
}

#[tokio::test]
async fn sigkill_with_a_slow_collector_loses_no_journaled_event() {
    burst_then_sigkill(Collecting::Slow).await;
}

#[tokio::test]
async fn sigkill_with_the_collector_up_loses_no_journaled_event() {
    burst_then_sigkill(Collecting::Up).await;
}

#[tokio::test]
async fn a_sink_gets_its_events_in_order_across_sigkills_and_restarts() {
    let port = free_port();
    let spool = tempfile::tempdir().unwrap();
    let dir = spool.path().join("http");
    let template = journaled_http(
        spool.path(),
        port,
        "batch_size = 30\nflush_interval = \"1h\"",
    );
    let mut sent = Vec::new();
    // Two runs with the collector down, each killed once its events are journaled.
    for _ in 0..2 {
        let mut run = Setup::start(&template).await;
        sent.extend(in_order(run.gh.port, 30).await);
        wait_journaled(&dir, None, &sent).await;
        sigkill(&mut run.gh).await;
    }
    let collector = Collector::on(port, &[]).await;
    let mut last = Setup::start(&template).await;
    assert!(
        last.gh.stderr().contains("audit spool from an earlier run"),
        "{}",
        last.gh.stderr()
    );
    sent.extend(in_order(last.gh.port, 30).await);
    wait_for_ids(&collector, &sent).await;
    last.stop().await;
    assert_eq!(collector.accepted_ids(), sent);
}

#[tokio::test]
async fn a_torn_journal_tail_after_a_crash_is_cut_off_and_the_rest_delivered() {
    let port = free_port();
    let spool = tempfile::tempdir().unwrap();
    let dir = spool.path().join("http");
    let template = journaled_http(
        spool.path(),
        port,
        "batch_size = 10\nflush_interval = \"20ms\"",
    );
    let mut first = Setup::start(&template).await;
    let sent = in_order(first.gh.port, 20).await;
    wait_journaled(&dir, None, &sent).await;
    sigkill(&mut first.gh).await;
    // As if the kill came in the middle of an append: half a record ends the open segment.
    let open_segment = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "spool") && !p.to_str().unwrap().contains('-'))
        .expect("the segment the killed process appended to");
    let record = gatehouse::audit::spool::records(&[bytes::Bytes::from_static(
        b"{\"request_id\":\"torn\"}",
    )]);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&open_segment)
        .unwrap();
    std::io::Write::write_all(&mut file, &record[..record.len() / 2]).unwrap();

    let collector = Collector::on(port, &[]).await;
    let mut second = Setup::start(&template).await;
    wait_for_ids(&collector, &sent).await;
    assert!(
        second.gh.stderr().contains("torn record"),
        "{}",
        second.gh.stderr()
    );
    let more = in_order(second.gh.port, 5).await;
    wait_for_ids(&collector, &more).await;
    second.stop().await;
    assert_eq!(collector.accepted_ids(), [sent, more].concat());
    assert_eq!(spool_files(&dir), 0);
}

/// The `request_id`s of a file sink's events.
fn file_ids(path: &Path) -> Vec<String> {
    read_events(path)
        .iter()
        .map(|e| e["request_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_removed_sinks_journal_is_kept_and_reported_not_delivered_elsewhere() {
    let port = free_port();
    let spool = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let (local, other) = (
        out.path().join("local.jsonl"),
        out.path().join("other.jsonl"),
    );
    let sink = |name: &str| {
        match name {
        "collector" => format!(
            "[[audit.sinks]]\ntype = \"http\"\nname = \"collector\"\nurl = \"http://127.0.0.1:{port}/ingest\"\nretries = 10\n"
        ),
        _ => format!(
            "[[audit.sinks]]\ntype = \"file\"\nname = \"{name}\"\npath = \"{}\"\n",
            out.path().join(format!("{name}.jsonl")).display()
        ),
    }
    };
    let config = |names: [&str; 2]| {
        format!(
            "[[middleware]]\ntype = \"request_id\"\n\n[audit]\nspool_dir = \"{}\"\nflush_interval = \"20ms\"\n{}{}",
            spool.path().display(),
            sink(names[0]),
            sink(names[1])
        )
    };
    let mut first = Setup::start(&config(["collector", "local"])).await;
    let before = in_order(first.gh.port, 10).await;
    wait_journaled(&spool.path().join("collector"), None, &before).await;
    wait_for_events(&local, 10).await;
    sigkill(&mut first.gh).await;

    let mut second = Setup::start(&config(["local", "other"])).await;
    wait_for_log(&second.gh, "sink no longer configured").await;
    let log = second.gh.stderr();
    let report: Value = log
        .lines()
        .find(|l| l.contains("sink no longer configured"))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap();
    assert_eq!(report["sink"], "collector", "{report}");
    assert_eq!(report["events"], 10, "{report}");
    let after = in_order(second.gh.port, 5).await;
    second.stop().await;
    assert_eq!(journal_ids(&spool.path().join("collector")), before);
    assert_eq!(file_ids(&other), after, "a new sink gets only new events");
    assert_eq!(first_seen(file_ids(&local)), [before, after].concat());
}

/// The value of the sample line that starts with `series`, 0 when absent.
fn sample(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.parse().expect("an integer sample"))
}

/// Polls the admin's `/metrics` until `series` reaches `value`; returns that scrape.
async fn wait_sample(admin: u16, series: &str, value: u64) -> String {
    within(Duration::from_secs(20), series, async {
        loop {
            let text = get(admin, "/metrics").await.text();
            if sample(&text, series) >= value {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

#[tokio::test]
async fn at_spool_max_bytes_the_oldest_unread_events_are_dropped_and_counted() {
    let (port, admin) = (free_port(), free_port());
    let spool = tempfile::tempdir().unwrap();
    let dir = spool.path().join("http");
    let template = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n{}",
        journaled_http(
            spool.path(),
            port,
            "batch_size = 5\nflush_interval = \"20ms\"\nspool_max_bytes = \"64KiB\""
        )
        .replace("retries = 10", "retries = 0")
    );
    let mut s = Setup::start(&template).await;
    let sent = in_order(s.gh.port, 1000).await;
    let series = |outcome: &str| {
        format!("gatehouse_audit_events_total{{sink=\"http\",outcome=\"{outcome}\"}}")
    };
    let metrics = wait_sample(admin, &series("spooled"), 1000).await;
    let dropped = sample(&metrics, &series("dropped"));
    assert!(dropped > 0, "{metrics}");
    assert_eq!(sample(&metrics, "gatehouse_audit_dropped_total"), dropped);
    let on_disk: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    // The bound, plus the segment being read (an eighth of it) and a cursor.
    assert!(on_disk <= 64 * 1024 * 9 / 8 + 64, "{on_disk}");

    let collector = Collector::on(port, &[]).await;
    wait_sample(admin, &series("delivered"), 1000 - dropped).await;
    s.stop().await;
    let got = collector.accepted_ids();
    assert_eq!(got.len() as u64 + dropped, 1000);
    // What went is one run of events: those after the batch (and segment) being delivered.
    let kept = got.iter().zip(&sent).take_while(|(g, s)| g == s).count();
    assert!(kept > 0 && kept < got.len(), "{kept} of {}", got.len());
    assert_eq!(got[kept..], sent[kept + dropped as usize..]);
}

/// `chattr +i` on a directory and its files, undone on drop: not even root can write there
/// (files already open included), as on a disk remounted read-only.
struct Immutable(PathBuf);

impl Immutable {
    fn set(dir: &Path) -> Immutable {
        let status = std::process::Command::new("chattr")
            .args(["-R", "+i"])
            .arg(dir)
            .status()
            .expect("chattr (e2fsprogs) is installed");
        assert!(
            status.success(),
            "chattr +i needs a filesystem that supports it (ext4, xfs...) for the temp dir"
        );
        Immutable(dir.to_owned())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .args(["-R", "-i"])
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_chattr),
    ignore = "needs root and chattr (e2fsprogs) for chattr +i"
)]
async fn an_unwritable_journal_degrades_to_delivery_from_memory_and_recovers() {
    let collector = Collector::start(&[]).await;
    let admin = free_port();
    let spool = tempfile::tempdir().unwrap();
    let dir = spool.path().join("http");
    let template = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n{}",
        journaled_http(
            spool.path(),
            collector.addr.port(),
            "batch_size = 5\nflush_interval = \"20ms\""
        )
    );
    let mut s = Setup::start(&template).await;
    let mut sent = in_order(s.gh.port, 10).await;
    wait_for_ids(&collector, &sent).await;

    let unwritable = Immutable::set(&dir);
    let during = in_order(s.gh.port, 20).await;
    sent.extend(during);
    wait_for_ids(&collector, &sent).await;
    wait_for_log(&s.gh, "audit spool unwritable").await;
    let metrics = get(admin, "/metrics").await.text();
    let unspooled = "gatehouse_audit_events_total{sink=\"http\",outcome=\"unspooled\"}";
    assert_eq!(sample(&metrics, unspooled), 20, "{metrics}");

    drop(unwritable);
    within(
        Duration::from_secs(10),
        "the journal written again",
        async {
            while !s.gh.stderr().contains("audit spool writable again") {
                sent.extend(in_order(s.gh.port, 1).await);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await;
    sent.extend(in_order(s.gh.port, 10).await);
    wait_for_ids(&collector, &sent).await;
    s.stop().await;
    assert_eq!(collector.accepted_ids(), sent, "once each, in order");
    assert_eq!(spool_files(&dir), 0);
}

/// A `file` sink whose file cannot be opened (its directory does not exist) stops gatehouse
/// at start, naming the sink and the path, instead of losing every event after it.
#[test]
fn a_file_sink_that_cannot_be_opened_is_a_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing-dir/audit.jsonl");
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\n[upstream]\nurl = \"http://127.0.0.1:9\"\n\
             [audit]\n[[audit.sinks]]\ntype = \"file\"\npath = \"{}\"\n",
            free_port(),
            path.display()
        ),
    )
    .unwrap();
    let out = cli(&["run", "--config", config.to_str().unwrap()], &[], None);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "audit sink \"file\": cannot open {}",
            path.display()
        )),
        "{}",
        out.stderr
    );
    assert!(!path.exists());
}
