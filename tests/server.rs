//! The listening side: keep-alive, h2c, header limits, malformed requests, timeouts.
mod common;

use common::*;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test]
async fn http1_keep_alive_serves_several_requests_on_one_connection() {
    let (up, gh) = proxy_with("", "", "").await;
    let mut conn = H1::connect(gh.port).await;
    for i in 0..5 {
        let resp = conn
            .send(
                request("GET", &format!("/echo?i={i}"))
                    .body(empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(resp.status, 200, "request {i}: {resp:?}");
        assert_eq!(resp.json()["uri"], format!("/echo?i={i}"));
    }
    assert_eq!(up.request_count(), 5);
}

#[tokio::test]
async fn h2c_prior_knowledge_on_the_same_port() {
    let (up, gh) = proxy_with("", "", "").await;
    let resp = h2_send(gh.port, "GET", "/echo?via=h2", empty()).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.version, http::Version::HTTP_2);
    let json = resp.json();
    assert_eq!(json["method"], "GET");
    assert_eq!(json["uri"], "/echo?via=h2");

    let resp = h2_send(gh.port, "POST", "/echo", full("h2 body")).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["body"], "h2 body");

    // HTTP/1.1 still works on the same port.
    let resp = get(gh.port, "/echo").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.version, http::Version::HTTP_11);
    assert_eq!(up.request_count(), 3);
}

#[tokio::test]
async fn oversized_request_head_gets_431() {
    let (up, gh) = proxy_with("max_header_bytes = \"8KiB\"", "", "").await;
    let big = "a".repeat(20 * 1024);
    let resp = send(
        gh.port,
        request("GET", "/echo")
            .header("x-big", big)
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 431, "{resp:?}");
    if !resp.body.is_empty() {
        resp.assert_gatehouse_error(431, "headers_too_large");
    }
    assert_eq!(up.request_count(), 0, "the upstream must not be reached");

    // A normal request on a new connection still works.
    let resp = get(gh.port, "/echo").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(up.request_count(), 1);
}

#[tokio::test]
async fn many_small_headers_over_the_limit_get_431() {
    let (up, gh) = proxy_with("max_header_bytes = \"8KiB\"", "", "").await;
    let mut req = request("GET", "/echo");
    for i in 0..400 {
        req = req.header(
            format!("x-h-{i}"),
            "0123456789012345678901234567890123456789",
        );
    }
    let resp = send(gh.port, req.body(empty()).unwrap()).await;
    assert_eq!(resp.status, 431, "{resp:?}");
    if !resp.body.is_empty() {
        resp.assert_gatehouse_error(431, "headers_too_large");
    }
    assert_eq!(up.request_count(), 0);
}

#[tokio::test]
async fn oversized_request_line_gets_431() {
    let (up, gh) = proxy_with("max_header_bytes = \"8KiB\"", "", "").await;
    let path = format!("/echo?q={}", "a".repeat(20 * 1024));
    let resp = get(gh.port, &path).await;
    assert_eq!(resp.status, 431, "{:?}", resp.status);
    if !resp.body.is_empty() {
        resp.assert_gatehouse_error(431, "headers_too_large");
    }
    assert_eq!(up.request_count(), 0);
}

#[tokio::test]
async fn oversized_h2_request_head_gets_431() {
    let (up, gh) = proxy_with("max_header_bytes = \"8KiB\"", "", "").await;
    let mut sender = h2_connect(gh.port).await;
    let req = request("GET", &format!("http://127.0.0.1:{}/echo", gh.port))
        .header("x-big", "a".repeat(20 * 1024))
        .body(empty())
        .unwrap();
    let resp = within(STEP, "h2 response", sender.send_request(req))
        .await
        .expect("an HTTP response (431), not a stream error");
    let resp = collect(resp).await;
    assert_eq!(resp.status, 431, "{resp:?}");
    if !resp.body.is_empty() {
        resp.assert_gatehouse_error(431, "headers_too_large");
    }
    assert_eq!(up.request_count(), 0);
}

#[tokio::test]
async fn request_head_just_under_the_limit_passes() {
    let (_up, gh) = proxy_with("max_header_bytes = \"8KiB\"", "", "").await;
    let resp = send(
        gh.port,
        request("GET", "/echo")
            .header("x-big", "a".repeat(6 * 1024))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
}

/// Either a 400 status line or a closed connection without a response.
fn assert_400_or_closed(reply: &[u8], closed: bool) {
    let text = String::from_utf8_lossy(reply);
    assert!(
        (reply.is_empty() && closed) || text.starts_with("HTTP/1.1 400"),
        "expected a 400 or a closed connection, got (closed={closed}): {text:?}"
    );
}

/// Sends `bytes` on a fresh connection: they must get a 400 or a close, never reach the
/// upstream, and leave gatehouse serving other connections.
async fn assert_refused_without_harm(bytes: &[u8]) {
    let (up, gh) = proxy_with("", "", "").await;
    let (reply, closed) = raw_exchange(gh.port, bytes, Duration::from_secs(10)).await;
    assert_400_or_closed(&reply, closed);
    assert_eq!(up.request_count(), 0);
    let resp = get(gh.port, "/echo").await;
    assert_eq!(resp.status, 200, "other connections keep working");
}

#[tokio::test]
async fn malformed_header_line_gets_400_or_close() {
    assert_refused_without_harm(b"GET /echo HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n").await;
}

#[tokio::test]
async fn garbage_bytes_get_400_or_close() {
    assert_refused_without_harm(b"\x16\x03\x01\x00\xa5garbage \x00\xff\r\n\r\n").await;
}

#[tokio::test]
async fn malformed_request_does_not_disturb_open_connections() {
    let (_up, gh) = proxy_with("", "", "").await;
    let mut conn = H1::connect(gh.port).await;
    assert_eq!(
        conn.send(request("GET", "/echo").body(empty()).unwrap())
            .await
            .status,
        200
    );
    let (reply, closed) = raw_exchange(
        gh.port,
        b"GET /echo HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert_400_or_closed(&reply, closed);
    let resp = conn
        .send(request("GET", "/echo").body(empty()).unwrap())
        .await;
    assert_eq!(resp.status, 200);
}

#[tokio::test]
async fn slow_request_head_is_disconnected() {
    let (up, gh) = proxy_with("header_read_timeout = \"1s\"", "", "").await;
    let mut stream = TcpStream::connect(("127.0.0.1", gh.port)).await.unwrap();
    stream
        .write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Partial: ")
        .await
        .unwrap();
    let (reply, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(
        closed,
        "a stalled request head must be cut off by header_read_timeout; got so far: {:?}",
        String::from_utf8_lossy(&reply)
    );
    // If anything was answered it must not be a proxied response.
    let text = String::from_utf8_lossy(&reply);
    assert!(
        reply.is_empty() || text.starts_with("HTTP/1.1 408") || text.starts_with("HTTP/1.1 400"),
        "unexpected reply: {text:?}"
    );
    assert_eq!(up.request_count(), 0);
    assert_eq!(get(gh.port, "/echo").await.status, 200);
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed() {
    let (_up, gh) = proxy_with("idle_timeout = \"1s\"", "", "").await;
    let mut conn = H1::connect(gh.port).await;
    let resp = conn
        .send(request("GET", "/echo").body(empty()).unwrap())
        .await;
    assert_eq!(resp.status, 200);
    assert!(
        conn.closed_within(Duration::from_secs(10)).await,
        "an idle keep-alive connection must be closed after idle_timeout"
    );
}

#[tokio::test]
async fn silent_connection_is_disconnected() {
    // A connection that never sends a byte is held by nothing but the header read timeout.
    let (_up, gh) = proxy_with("header_read_timeout = \"1s\"", "", "").await;
    let mut stream = TcpStream::connect(("127.0.0.1", gh.port)).await.unwrap();
    let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(
        closed,
        "a connection that never sends anything must be closed"
    );
}

#[tokio::test]
async fn idle_timeout_does_not_cut_a_request_in_flight() {
    let (_up, gh) = proxy_with("idle_timeout = \"1s\"", "", "").await;
    let resp = get(gh.port, "/slow?ms=2500").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.text(), "slow done");
}

#[tokio::test]
async fn idle_timeout_does_not_cut_a_slow_streaming_response() {
    let (_up, gh) = proxy_with("idle_timeout = \"1s\"", "", "").await;
    let resp = get(gh.port, "/stream?chunks=3&ms=1500").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.text(), "data: 0\n\ndata: 1\n\ndata: 2\n\n");
}

/// Sends pipelined requests, the last asking to close, and returns what came back once
/// the connection closed (which it must).
async fn pipelined_until_close(port: u16, requests: &[u8]) -> String {
    let (reply, closed) = raw_exchange(port, requests, Duration::from_secs(20)).await;
    let text = String::from_utf8_lossy(&reply).into_owned();
    assert!(
        closed,
        "Connection: close must close the connection: {text:?}"
    );
    text
}

#[tokio::test]
async fn pipelined_requests_and_connection_close() {
    let (up, gh) = proxy_with("", "", "").await;
    let text = pipelined_until_close(
        gh.port,
        b"GET /echo?n=1 HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /status/201 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let first = text.find("HTTP/1.1 200").expect("first response");
    let second = text.find("HTTP/1.1 201").expect("second response");
    assert!(first < second, "responses out of order: {text:?}");
    assert_eq!(up.request_count(), 2);
}

#[tokio::test]
async fn one_connection_goes_from_bodiless_requests_to_bodies_and_back() {
    // Bodiless HTTP/1.1 requests take gatehouse's own fast path; the first request with a
    // body hands the connection to hyper, mid-connection, without losing a byte.
    let (up, gh) = proxy_with("", "", "").await;
    let mut conn = H1::connect(gh.port).await;
    let resp = conn
        .send(request("GET", "/echo?n=1").body(empty()).unwrap())
        .await;
    assert_eq!(resp.json()["uri"], "/echo?n=1", "{resp:?}");
    assert!(resp.header("date").is_some(), "{resp:?}");
    let resp = conn
        .send(request("POST", "/echo").body(full("payload")).unwrap())
        .await;
    assert_eq!(resp.json()["body"], "payload", "{resp:?}");
    let resp = conn
        .send(request("GET", "/echo?n=3").body(empty()).unwrap())
        .await;
    assert_eq!(resp.json()["uri"], "/echo?n=3", "{resp:?}");
    assert_eq!(up.request_count(), 3);
}

#[tokio::test]
async fn pipelined_requests_with_a_body_between_them() {
    let (up, gh) = proxy_with("", "", "").await;
    let text = pipelined_until_close(
        gh.port,
        b"GET /echo?n=1 HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
          GET /status/201 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let first = text.find("/echo?n=1").expect("first response");
    let second = text
        .find("\"hello\"")
        .expect("second response, with the body");
    let third = text.find("HTTP/1.1 201").expect("third response");
    assert!(first < second && second < third, "out of order: {text:?}");
    assert_eq!(up.request_count(), 3);
}

#[tokio::test]
async fn http10_request_is_answered() {
    let (up, gh) = proxy_with("", "", "").await;
    let (reply, closed) = raw_exchange(
        gh.port,
        b"GET /echo HTTP/1.0\r\n\r\n",
        Duration::from_secs(20),
    )
    .await;
    let text = String::from_utf8_lossy(&reply);
    assert_eq!(raw_status(&reply), 200, "{text:?}");
    assert!(closed, "HTTP/1.0 without keep-alive closes: {text:?}");
    assert_eq!(up.request_count(), 1);
}

#[tokio::test]
async fn h2c_requests_go_through_the_chain() {
    let (up, gh) = proxy_with(
        "",
        "",
        r#"
[[middleware]]
type = "request_id"

[[middleware]]
type = "ip_filter"
deny = ["0.0.0.0/0", "::/0"]
paths = ["/denied/**"]
"#,
    )
    .await;
    let resp = h2_send(gh.port, "GET", "/echo", empty()).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let seen = resp.upstream_headers();
    let authority = format!("127.0.0.1:{}", gh.port);
    assert_eq!(seen.get("host"), Some(&vec![authority.clone()]), "{seen:?}");
    assert_eq!(seen.get("x-forwarded-host"), Some(&vec![authority]));
    assert!(seen.contains_key("x-request-id"), "{seen:?}");

    let resp = h2_send(gh.port, "GET", "/denied/x", empty()).await;
    let json = resp.assert_gatehouse_error(403, "forbidden");
    assert_eq!(
        json["request_id"],
        resp.header("x-request-id").unwrap().as_str()
    );
    assert_eq!(up.request_count(), 1);
}

/// Status code of a raw HTTP/1.x response (0 if there was none).
fn raw_status(reply: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(reply);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn http11_request_without_host_is_rejected() {
    // RFC 9112 section 3.2: a server MUST respond 400 to an HTTP/1.1 request without Host.
    let (up, gh) = proxy_with("", "", "").await;
    let (reply, closed) = raw_exchange(
        gh.port,
        b"GET /echo HTTP/1.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert_400_or_closed(&reply, closed);
    assert_eq!(up.request_count(), 0);
    // HTTP/1.0 needs no Host.
    let (reply, _) = raw_exchange(
        gh.port,
        b"GET /echo HTTP/1.0\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        raw_status(&reply),
        200,
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
}

#[tokio::test]
async fn duplicate_host_headers_are_rejected() {
    // RFC 9112 section 3.2: more than one Host field line MUST get a 400; forwarding one of
    // them lets the proxy and the app disagree about the host.
    let (up, gh) = proxy_with("", "", "").await;
    let (reply, closed) = raw_exchange(
        gh.port,
        b"GET /echo HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert_400_or_closed(&reply, closed);
    assert_eq!(up.request_count(), 0);
}

#[tokio::test]
async fn sighup_reloads_a_valid_config_and_keeps_the_old_one_on_errors() {
    let headers = |generation: &str| {
        format!("[[middleware]]\ntype = \"headers\"\nresponse = {{ set = {{ \"x-generation\" = \"{generation}\" }} }}\n")
    };
    let (up, gh) = proxy_with("", "", &headers("1")).await;
    assert_eq!(
        get(gh.port, "/echo")
            .await
            .header("x-generation")
            .as_deref(),
        Some("1")
    );

    // A valid new file: new requests use the new chain.
    let new = std::fs::read_to_string(&gh.config_path)
        .unwrap()
        .replace("\"1\"", "\"2\"");
    std::fs::write(&gh.config_path, new).unwrap();
    gh.send_signal("HUP");
    gh.wait_for_header("/echo", "x-generation", "2").await;

    // An invalid file: logged with its location, and the running chain stays.
    std::fs::write(
        &gh.config_path,
        "[server]\nlisten = \"127.0.0.1:1\"\n[upstream]\nurl = \"http://x:1\"\nbogus = 1\n",
    )
    .unwrap();
    gh.send_signal("HUP");
    within(
        Duration::from_secs(10),
        "reload failure to be logged",
        async {
            while !gh.stderr().contains("config reload failed") {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    assert!(
        gh.stderr().contains("proxy.toml:5:1: upstream.bogus"),
        "{}",
        gh.output()
    );
    let resp = get(gh.port, "/echo").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-generation").as_deref(), Some("2"));
    assert!(up.request_count() >= 3);
}

/// The scheduling policy (`SCHED_*` number) of each of the process's threads, from
/// `/proc/PID/task/TID/stat` (field 41).
#[cfg(target_os = "linux")]
fn thread_policies(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|task| {
            let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap();
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            rest.split(' ').nth(41 - 3).unwrap().parse().unwrap()
        })
        .collect()
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn threads_run_under_sched_batch_unless_scheduling_is_normal() {
    const SCHED_OTHER: u32 = 0;
    const SCHED_BATCH: u32 = 3;
    for (server, want) in [
        ("", SCHED_BATCH),
        ("scheduling = \"normal\"\n", SCHED_OTHER),
    ] {
        let (_up, gh) = proxy_with(server, "", "").await;
        assert_eq!(get(gh.port, "/echo").await.status, 200);
        let policies = thread_policies(gh.pid());
        assert!(policies.len() > 1, "{policies:?}");
        assert!(
            policies.iter().all(|p| *p == want),
            "server: {server:?}: policies {policies:?}, want all {want}"
        );
    }
}
