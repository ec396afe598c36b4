//! What an attacker or a careless client tries against the proxy (two external probes):
//! upgrade smuggling, an app's unasked-for `101`, hop-by-hop headers against the chain,
//! CONNECT, lowercase methods, transfer codings, Host, `:authority` and request-target
//! games, cookie crumbs, request trailers, underscored headers, tunnels' records, bounds on
//! the app's connections and on slow bodies, and the HTTP/2 preface.
mod common;

use common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An app that answers `101 Switching Protocols` to a request `switches` picks (as
/// hypercorn does for `Upgrade: h2c`; a misbehaving app for anything) and then echoes
/// whatever comes on the connection as raw bytes, and any other request with a 200 whose
/// body is the head it got. Returns its URL and a channel of every head and raw chunk it
/// saw (heads lower-cased).
async fn switching_app(
    switches: fn(&str) -> bool,
) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(head) = read_http_head(&mut stream, &mut buf).await {
                    let _ = tx.send(head.clone());
                    if switches(&head) {
                        let switched = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n";
                        if stream.write_all(switched).await.is_err() {
                            return;
                        }
                        let mut piece = [0u8; 4096];
                        while let Ok(n) = stream.read(&mut piece).await {
                            if n == 0 {
                                return;
                            }
                            let _ = tx.send(String::from_utf8_lossy(&piece[..n]).into_owned());
                            if stream.write_all(&piece[..n]).await.is_err() {
                                return;
                            }
                        }
                        return;
                    }
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{head}",
                        head.len()
                    );
                    if stream.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, rx)
}

#[tokio::test]
async fn an_h2c_upgrade_is_never_forwarded_so_the_chain_cannot_be_bypassed() {
    let (url, mut heads) = switching_app(|head| head.contains("\r\nupgrade: h2c")).await;
    let gh = Gatehouse::start(
        &config(
            "",
            "",
            r#"
[[middleware]]
type = "api_key"
paths = ["/items/**"]
keys = [{ id = "ci", key = "k" }]
"#,
        ),
        &[("upstream", &url)],
    )
    .await;
    let mut stream = TcpStream::connect(gh.addr()).await.unwrap();
    stream
        .write_all(
            b"GET /public HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, HTTP2-Settings\r\n\
              Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
        )
        .await
        .unwrap();
    let mut reply = vec![0u8; 4096];
    let n = within(STEP, "the answer", stream.read(&mut reply))
        .await
        .unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]).into_owned();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let head = heads.recv().await.unwrap();
    assert!(!head.contains("upgrade"), "the app saw an upgrade: {head}");
    assert!(!head.contains("http2-settings"), "{head}");
    // The connection is still HTTP/1.1 through the chain: the key is still asked for.
    stream
        .write_all(b"GET /items/1 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (rest, _) = read_until_closed(&mut stream, STEP).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 401"), "{rest}");
    assert!(
        heads.try_recv().is_err(),
        "the refused request reached the app"
    );
}

#[tokio::test]
async fn a_websocket_upgrade_still_passes_and_its_tunnel_is_recorded_when_it_closes() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let mut gh = Gatehouse::start(
        &config(
            "",
            "",
            &format!(
                "[audit]\nflush_interval = \"10ms\"\n[[audit.sinks]]\ntype = \"file\"\npath = \"{}\"\n",
                events.display()
            ),
        ),
        &[("upstream", &up.url())],
    )
    .await;
    let mut conn = H1::connect(gh.port).await;
    let resp = conn.send_streaming(websocket_request("/ws")).await;
    assert_eq!(resp.status(), 101, "{resp:?}");
    let upgraded = within(STEP, "upgrade", hyper::upgrade::on(resp))
        .await
        .unwrap();
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    let mut sent = 0;
    for msg in [&b"hello"[..], b"a second, longer message"] {
        io.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        within(STEP, "echo", io.read_exact(&mut back))
            .await
            .unwrap();
        sent += msg.len();
    }
    // Nothing is recorded while the tunnel is open.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(std::fs::read_to_string(&events).unwrap_or_default(), "");
    drop(io);
    let line = within(STEP, "the tunnel's event", async {
        loop {
            if let Some(line) = std::fs::read_to_string(&events)
                .unwrap_or_default()
                .lines()
                .next()
                .map(str::to_owned)
            {
                return line;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["status"], 101, "{event}");
    assert_eq!(event["bytes_in"], sent, "{event}");
    assert_eq!(event["bytes_out"], sent, "{event}");
    assert_eq!(event["completed"], true, "{event}");
    gh.send_signal("TERM");
    gh.assert_exits_with(0).await;
}

#[tokio::test]
async fn a_clients_connection_header_cannot_remove_what_the_chain_sets() {
    let (_up, gh) = proxy_with(
        "",
        "",
        r#"
[[middleware]]
type = "request_id"

[[middleware]]
type = "headers"
request = { set = { "x-tenant" = "acme" } }
"#,
    )
    .await;
    let resp = send(
        gh.port,
        request("GET", "/echo")
            .header("connection", "x-tenant, x-request-id, x-hop")
            .header("x-hop", "1")
            .body(empty())
            .unwrap(),
    )
    .await;
    let seen = resp.upstream_headers();
    assert_eq!(
        seen.get("x-tenant"),
        Some(&vec!["acme".to_owned()]),
        "{seen:?}"
    );
    assert!(seen.contains_key("x-request-id"), "{seen:?}");
    // What the client named as hop-by-hop of its own is still removed.
    assert!(!seen.contains_key("x-hop"), "{seen:?}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_outlives_the_header_read_timeout() {
    let (up, gh) = proxy_with(
        "header_read_timeout = \"1s\"\nidle_timeout = \"30s\"",
        "",
        "",
    )
    .await;
    let mut conn = H1::connect(gh.port).await;
    let first = conn
        .send(request("GET", "/echo").body(empty()).unwrap())
        .await;
    assert_eq!(first.status, 200);
    // Waiting for the next request is idle_timeout's business, not header_read_timeout's.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let second = conn
        .send(request("GET", "/echo").body(empty()).unwrap())
        .await;
    assert_eq!(second.status, 200, "{second:?}");
    assert_eq!(up.request_count(), 2);
}

#[tokio::test]
async fn connect_and_asterisk_targets_are_answered_by_gatehouse() {
    let (up, gh) = proxy_with("", "", "").await;
    let (reply, closed) = raw_exchange(
        gh.port,
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
        STEP,
    )
    .await;
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("HTTP/1.1 405"), "{text}");
    assert!(text.contains("\"error\":\"method_not_allowed\""), "{text}");
    assert!(closed, "nothing is tunnelled after a refused CONNECT");
    let (reply, _) = raw_exchange(
        gh.port,
        b"OPTIONS * HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
        STEP,
    )
    .await;
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    // Over HTTP/2 too: an answer, not a reset stream.
    let mut sender = h2_connect(gh.port).await;
    let req = http::Request::connect("evil.example:443")
        .body(empty())
        .unwrap();
    let resp = within(STEP, "h2 CONNECT", sender.send_request(req))
        .await
        .expect("an answer");
    collect(resp)
        .await
        .assert_gatehouse_error(405, "method_not_allowed");
    assert_eq!(up.request_count(), 0);
}

/// The JSON body of a raw HTTP/1 response.
fn raw_json(text: &str) -> serde_json::Value {
    let body = &text[text.find("\r\n\r\n").expect("a head") + 4..];
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Sends a raw request and returns the status line's code.
async fn raw_status(port: u16, bytes: &[u8]) -> (u16, String) {
    let (reply, _) = raw_exchange(port, bytes, STEP).await;
    let text = String::from_utf8_lossy(&reply).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn only_a_single_chunked_coding_is_forwarded() {
    let (up, gh) = proxy_with("", "", "").await;
    for (codings, expected) in [
        ("gzip, chunked", 501),
        ("identity, chunked", 501),
        ("chunked, chunked", 501),
        ("gzip", 400),
    ] {
        let raw = format!(
            "POST /echo HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: {codings}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let (status, text) = raw_status(gh.port, raw.as_bytes()).await;
        assert_eq!(status, expected, "{codings}: {text}");
        assert!(text.contains("\"error\":"), "a JSON answer: {text}");
    }
    let (status, text) = raw_status(
        gh.port,
        b"POST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert_eq!(up.request_count(), 0);
    let (status, text) = raw_status(
        gh.port,
        b"POST /echo HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"body\":\"hello\""), "{text}");
}

#[tokio::test]
async fn host_authority_and_request_target_rules() {
    let (up, gh) = proxy_with("", "", "").await;
    for raw in [
        &b"GET http://app.example/echo HTTP/1.1\r\n\r\n"[..],
        b"GET /echo HTTP/1.1\r\nHost: evil.example/x\r\n\r\n",
        b"GET evil.example:80 HTTP/1.1\r\nHost: app\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: app:abc\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: app:\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost:\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: user:pw@app\r\n\r\n",
    ] {
        let (status, text) = raw_status(gh.port, raw).await;
        assert_eq!(status, 400, "{}: {text}", String::from_utf8_lossy(raw));
    }
    assert_eq!(up.request_count(), 0);
    // An absolute-form target's authority is the host, whatever Host said.
    let (status, text) = raw_status(
        gh.port,
        b"GET http://app.example:8080/echo?x=1 HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let json = raw_json(&text);
    assert_eq!(json["uri"], "/echo?x=1");
    assert_eq!(json["headers"]["host"][0], "app.example:8080", "{json}");
    assert_eq!(json["headers"]["x-forwarded-host"][0], "app.example:8080");
    // One with an empty path asks for `/`.
    let (status, text) = raw_status(
        gh.port,
        b"GET http://app.example?a=1 HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(raw_json(&text)["uri"], "/?a=1");
    // HTTP/2: `:authority` and a different `host` disagree; user info in `:authority`, a
    // port that is no number, a `:path` without `/`.
    let mut sender = h2_connect(gh.port).await;
    let req = request("GET", "http://app.example/echo")
        .header("host", "evil.example")
        .body(empty())
        .unwrap();
    let resp = collect(sender.send_request(req).await.unwrap()).await;
    resp.assert_gatehouse_error(400, "bad_request");
    for uri in [
        "http://user:pw@app.example/echo"
            .parse::<http::Uri>()
            .unwrap(),
        "http://app.example:abc/echo".parse().unwrap(),
        http::Uri::from_parts({
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(http::uri::Scheme::HTTP);
            parts.authority = Some("app.example".parse().unwrap());
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("?a=1"));
            parts
        })
        .unwrap(),
    ] {
        let req = request("GET", "/").uri(uri.clone()).body(empty()).unwrap();
        match sender.send_request(req).await {
            Ok(resp) => {
                collect(resp)
                    .await
                    .assert_gatehouse_error(400, "bad_request");
            }
            // A client library may refuse to send it at all, which is as good.
            Err(e) => eprintln!("{uri}: the client refused to send it: {e}"),
        }
    }
    assert_eq!(up.request_count(), 2);
}

#[tokio::test]
async fn max_connections_bounds_the_apps_connections_and_max_pending_the_queue() {
    let admin = free_port();
    let up = Upstream::start().await;
    let gh = Gatehouse::start(
        &config(
            "",
            "max_connections = 1\nmax_pending = 1",
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n",
        ),
        &[("upstream", &up.url()), ("admin", &admin.to_string())],
    )
    .await;
    // One slow request holds the only connection, a second waits for it, a third finds
    // the queue full.
    let port = gh.port;
    let slow = tokio::spawn(async move { get(port, "/slow?ms=1500").await });
    up.wait_for_requests(1).await;
    let waiting = tokio::spawn(async move { get(port, "/echo?waited").await });
    within(STEP, "the second request to wait", async {
        loop {
            let metrics = get(admin, "/metrics").await.text();
            if metrics.contains("gatehouse_upstream_pending_requests 1") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let refused = get(port, "/echo?refused").await;
    let json = refused.assert_gatehouse_error(503, "unavailable");
    assert!(
        json["message"]
            .as_str()
            .unwrap()
            .contains("upstream.max_connections"),
        "{json}"
    );
    assert_eq!(slow.await.unwrap().status, 200);
    assert_eq!(waiting.await.unwrap().status, 200);
    let metrics = get(admin, "/metrics").await.text();
    assert!(
        metrics.contains("gatehouse_upstream_errors_total{kind=\"overloaded\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gatehouse_upstream_connections 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_cut_off_after_body_read_timeout() {
    // An app that reports when a request's connection ends.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (ended, mut ended_rx) = tokio::sync::mpsc::channel::<usize>(1);
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut total = 0;
        let mut piece = [0u8; 4096];
        while let Ok(n) = stream.read(&mut piece).await {
            if n == 0 {
                break;
            }
            total += n;
        }
        let _ = ended.send(total).await;
    });
    let gh = Gatehouse::start(
        &config("body_read_timeout = \"1s\"", "timeout = \"120s\"", ""),
        &[("upstream", &url)],
    )
    .await;
    let mut client = TcpStream::connect(gh.addr()).await.unwrap();
    client
        .write_all(b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 100\r\n\r\nonly 10 b")
        .await
        .unwrap();
    let (_, closed) = read_until_closed(&mut client, STEP).await;
    assert!(closed, "a stalled body is cut off");
    let seen = within(STEP, "the app's connection to end", ended_rx.recv())
        .await
        .unwrap();
    assert!(seen > 0, "the request had reached the app");
}

#[tokio::test]
async fn an_invalid_http2_preface_gets_goaway_protocol_error() {
    let (up, gh) = proxy_with("", "", "").await;
    for preface in [
        &b"INVALID CONNECTION PREFACE\r\n\r\n"[..],
        b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
    ] {
        let (reply, closed) = raw_exchange(gh.port, preface, STEP).await;
        assert!(closed, "the connection closes");
        assert_goaway_protocol_error(&reply);
    }
    // An HTTP/1.x request with an unknown minor version is still HTTP/1's to answer.
    let (reply, _) = raw_exchange(gh.port, b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", STEP).await;
    assert!(
        reply.starts_with(b"HTTP/1.1 505"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
    assert_eq!(up.request_count(), 0);
}

/// `reply` is an HTTP/2 server's frames ending in GOAWAY with PROTOCOL_ERROR.
fn assert_goaway_protocol_error(reply: &[u8]) {
    let mut at = 0;
    let mut goaway = None;
    while at + 9 <= reply.len() {
        let len = u32::from_be_bytes([0, reply[at], reply[at + 1], reply[at + 2]]) as usize;
        let kind = reply[at + 3];
        let payload = &reply[at + 9..(at + 9 + len).min(reply.len())];
        if kind == 0x7 {
            goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
        }
        at += 9 + len;
    }
    assert_eq!(at, reply.len(), "whole frames only: {reply:?}");
    assert_eq!(goaway, Some(0x1), "GOAWAY with PROTOCOL_ERROR: {reply:?}");
}

#[tokio::test]
async fn a_streamed_body_over_the_limit_aborts_the_apps_request() {
    // An app that reads a chunked request body and reports whether it ended properly
    // (its last chunk) or was cut off (the connection closed).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (seen, mut seen_rx) = tokio::sync::mpsc::channel::<(usize, bool)>(1);
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        let mut piece = [0u8; 16 << 10];
        while let Ok(n) = stream.read(&mut piece).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&piece[..n]);
            if got.ends_with(b"\r\n0\r\n\r\n") {
                break;
            }
        }
        let _ = seen
            .send((got.len(), got.ends_with(b"\r\n0\r\n\r\n")))
            .await;
    });
    let gh = Gatehouse::start(
        &config(
            "",
            "",
            "[[middleware]]\ntype = \"body_limit\"\nmax = \"16KiB\"\n",
        ),
        &[("upstream", &url)],
    )
    .await;
    let mut client = TcpStream::connect(gh.addr()).await.unwrap();
    client
        .write_all(b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    // 64 KiB in 4 KiB chunks: four times the limit.
    let chunk = format!("1000\r\n{}\r\n", "x".repeat(4096));
    for _ in 0..16 {
        if client.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = client.write_all(b"0\r\n\r\n").await;
    let (reply, _) = read_until_closed(&mut client, STEP).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    let (bytes, complete) = within(STEP, "the app's request to end", seen_rx.recv())
        .await
        .unwrap();
    assert!(
        !complete,
        "the app got a whole body over the limit ({bytes} bytes)"
    );
    assert!(bytes < 64 << 10, "{bytes} bytes reached the app");
}

#[tokio::test]
async fn an_apps_unasked_for_101_is_a_502_and_opens_no_tunnel_past_the_chain() {
    let (url, mut seen) = switching_app(|_| true).await;
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let gh = Gatehouse::start(
        &config(
            "",
            "",
            &format!(
                r#"
[[middleware]]
type = "api_key"
paths = ["/items/**"]
keys = [{{ id = "ci", key = "k" }}]

[audit]
flush_interval = "10ms"
[[audit.sinks]]
type = "file"
path = "{}"
"#,
                events.display()
            ),
        ),
        &[("upstream", &url)],
    )
    .await;
    // HTTP/1.1: the 101 is refused, and the client connection stays HTTP through the chain.
    let mut stream = TcpStream::connect(gh.addr()).await.unwrap();
    stream
        .write_all(b"GET /public HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let head = within(STEP, "the answer", read_http_head(&mut stream, &mut buf))
        .await
        .expect("an answer");
    assert!(head.starts_with("http/1.1 502"), "{head}");
    let first = within(STEP, "the app's head", seen.recv()).await.unwrap();
    assert!(first.starts_with("get /public"), "{first}");
    stream
        .write_all(b"GET /items/7 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (rest, _) = read_until_closed(&mut stream, STEP).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.contains("HTTP/1.1 401"),
        "the key is still asked for: {rest}"
    );
    // HTTP/2 clients never see a 101 either.
    let resp = h2_send(gh.port, "GET", "/public", empty()).await;
    resp.assert_gatehouse_error(502, "bad_gateway");
    let second = within(STEP, "the app's head", seen.recv()).await.unwrap();
    assert!(second.starts_with("get /public"), "{second}");
    // Nothing but the two heads reached the app: no tunnelled bytes, no third request.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(seen.try_recv().is_err(), "something went past the chain");
    let events = wait_for_events(&events, 3).await;
    let outcomes: Vec<(u64, &str)> = events
        .iter()
        .map(|e| {
            (
                e["status"].as_u64().unwrap(),
                e["decision"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(outcomes, [(502, "error"), (401, "deny"), (502, "error")]);
}

#[tokio::test]
async fn a_lowercase_method_is_refused_before_the_chain_on_both_protocols() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let (up, gh) = proxy_with(
        "",
        "",
        &format!(
            r#"
[[middleware]]
type = "api_key"
methods = ["POST", "DELETE"]
keys = [{{ id = "ci", key = "k" }}]

[audit]
flush_interval = "10ms"
[[audit.sinks]]
type = "file"
path = "{}"
"#,
            events.display()
        ),
    )
    .await;
    let (status, text) = raw_status(
        gh.port,
        b"post /items/7 HTTP/1.1\r\nHost: app\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("\"error\":\"bad_request\""), "{text}");
    let resp = h2_send(gh.port, "delete", "/items/7", empty()).await;
    resp.assert_gatehouse_error(400, "bad_request");
    assert_eq!(up.request_count(), 0);
    let events = wait_for_events(&events, 2).await;
    for event in &events {
        assert_eq!(event["deny_reason"], "lowercase_method", "{event}");
        assert_eq!(event["denied_by"], serde_json::Value::Null, "{event}");
    }
    // Upper case still goes through the scope.
    let resp = send(gh.port, request("POST", "/items/7").body(empty()).unwrap()).await;
    resp.assert_gatehouse_error(401, "unauthorized");
}

#[tokio::test]
async fn http2_cookie_crumbs_reach_an_http1_app_as_one_cookie() {
    let (_up, gh) = proxy_with("", "", "").await;
    let mut sender = h2_connect(gh.port).await;
    let req = request("GET", &format!("http://127.0.0.1:{}/echo", gh.port))
        .header("cookie", "session=abc")
        .header("cookie", "csrf=xyz")
        .header("cookie", "theme=dark")
        .body(empty())
        .unwrap();
    let resp = collect(sender.send_request(req).await.unwrap()).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        resp.upstream_headers()["cookie"],
        ["session=abc; csrf=xyz; theme=dark"]
    );
}

#[tokio::test]
async fn request_trailers_never_carry_what_the_head_may_not_or_the_chain_owns() {
    let (_up, gh) = proxy_with(
        "",
        "",
        r#"
[[middleware]]
type = "request_id"

[[middleware]]
type = "headers"
request = { set = { "x-env" = "prod" }, remove = ["x-debug"] }

[[middleware]]
type = "api_key"
keys = [{ id = "ci", key = "k" }]
"#,
    )
    .await;
    let sneaked = [
        ("host", "evil.example"),
        ("authorization", "Bearer forged"),
        ("content-length", "999"),
        ("cookie", "admin=1"),
        ("x-env", "dev"),
        ("x-debug", "1"),
        ("x-api-key", "k"),
        ("x-request-id", "forged"),
        ("x-forwarded-for", "10.0.0.1"),
        ("x_auth_subject", "admin"),
        ("x-checksum", "abc123"),
    ];
    // HTTP/1.1, chunked with a trailer section.
    let mut raw = String::from(
        "POST /echo HTTP/1.1\r\nHost: app\r\nx-api-key: k\r\nTE: trailers\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n",
    );
    for (name, value) in sneaked {
        raw.push_str(&format!("{name}: {value}\r\n"));
    }
    raw.push_str("\r\n");
    let (status, text) = raw_status(gh.port, raw.as_bytes()).await;
    assert_eq!(status, 200, "{text}");
    let json = raw_json(&text);
    assert_eq!(json["body"], "hello");
    assert_eq!(
        json["trailers"],
        serde_json::json!({"x-checksum": ["abc123"]})
    );
    // HTTP/2 request trailers, the same rules.
    let mut sender = h2_connect(gh.port).await;
    let req = request("POST", &format!("http://127.0.0.1:{}/echo", gh.port))
        .header("x-api-key", "k")
        .body(with_trailers("hello", &sneaked))
        .unwrap();
    let resp = collect(sender.send_request(req).await.unwrap()).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let json = resp.json();
    assert_eq!(json["body"], "hello");
    assert_eq!(
        json["trailers"],
        serde_json::json!({"x-checksum": ["abc123"]})
    );
}

#[tokio::test]
async fn underscored_headers_are_dropped_by_default_refused_or_allowed_as_configured() {
    let sneaky = |port| {
        request("GET", &format!("http://127.0.0.1:{port}/echo"))
            .header("x_auth_subject", "admin")
            .header("x-auth-subject", "someone")
            .body(empty())
            .unwrap()
    };
    let (_up, gh) = proxy_with("", "", "").await;
    let resp = send(gh.port, sneaky(gh.port)).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let seen = resp.upstream_headers();
    assert!(!seen.contains_key("x_auth_subject"), "{seen:?}");
    assert_eq!(seen["x-auth-subject"], ["someone"]);
    let mut sender = h2_connect(gh.port).await;
    let resp = collect(sender.send_request(sneaky(gh.port)).await.unwrap()).await;
    assert!(!resp.upstream_headers().contains_key("x_auth_subject"));

    let (up, gh) = proxy_with("underscores_in_headers = \"reject\"", "", "").await;
    send(gh.port, sneaky(gh.port))
        .await
        .assert_gatehouse_error(400, "bad_request");
    let mut sender = h2_connect(gh.port).await;
    collect(sender.send_request(sneaky(gh.port)).await.unwrap())
        .await
        .assert_gatehouse_error(400, "bad_request");
    assert_eq!(up.request_count(), 0);

    let (_up, gh) = proxy_with("underscores_in_headers = \"allow\"", "", "").await;
    let resp = send(gh.port, sneaky(gh.port)).await;
    assert_eq!(resp.upstream_headers()["x_auth_subject"], ["admin"]);
}
