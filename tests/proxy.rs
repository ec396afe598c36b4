//! Proxying: pass-through, Host, hop-by-hop and forwarded headers, streaming, upgrades,
//! unix upstreams, upstream failures, upstream connection reuse.
mod common;

use common::*;
use http_body_util::BodyExt;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1024 * 1024;

#[tokio::test]
async fn get_passes_method_path_and_query() {
    let (up, gh) = proxy_with("", "", "").await;
    let resp = get(gh.port, "/echo/some/path?a=1&b=two%20words&a=3").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let json = resp.json();
    assert_eq!(json["method"], "GET");
    assert_eq!(json["uri"], "/echo/some/path?a=1&b=two%20words&a=3");
    assert_eq!(json["body_bytes"], 0);
    assert_eq!(resp.header("x-upstream").as_deref(), Some("echo"));
    assert_eq!(up.request_count(), 1);
}

#[tokio::test]
async fn post_body_passes_intact() {
    let (_up, gh) = proxy_with("", "", "").await;
    let body = "hello upstream, ".repeat(1000);
    let resp = send(
        gh.port,
        request("POST", "/echo?x=y")
            .header("content-type", "text/plain")
            .body(full(body.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let json = resp.json();
    assert_eq!(json["method"], "POST");
    assert_eq!(json["uri"], "/echo?x=y");
    assert_eq!(json["body_bytes"], body.len());
    assert_eq!(json["body"], body.as_str());
}

#[tokio::test]
async fn other_methods_pass() {
    let (_up, gh) = proxy_with("", "", "").await;
    for method in ["PUT", "DELETE", "PATCH"] {
        let resp = send(gh.port, request(method, "/echo").body(full("x")).unwrap()).await;
        assert_eq!(resp.status, 200, "{method}: {resp:?}");
        assert_eq!(resp.json()["method"], method);
    }
}

#[tokio::test]
async fn upstream_status_and_body_come_back() {
    let (_up, gh) = proxy_with("", "", "").await;
    for code in [201u16, 404, 418, 500, 503] {
        let resp = get(gh.port, &format!("/status/{code}")).await;
        assert_eq!(resp.status.as_u16(), code, "{resp:?}");
        assert_eq!(resp.text(), format!("upstream status {code}"));
        assert_eq!(resp.header("content-type").as_deref(), Some("text/plain"));
    }
}

#[tokio::test]
async fn host_is_preserved_by_default() {
    let (_up, gh) = proxy_with("", "", "").await;
    let resp = send(
        gh.port,
        request("GET", "/echo")
            .header("host", "front.example")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        resp.upstream_headers().get("host"),
        Some(&vec!["front.example".to_string()])
    );
}

#[tokio::test]
async fn host_is_rewritten_without_preserve_host() {
    let (up, gh) = proxy_with("", "preserve_host = false", "").await;
    let resp = send(
        gh.port,
        request("GET", "/echo")
            .header("host", "front.example")
            .body(empty())
            .unwrap(),
    )
    .await;
    let expected = up.addr.unwrap().to_string();
    assert_eq!(
        resp.upstream_headers().get("host"),
        Some(&vec![expected]),
        "{resp:?}"
    );
    // The original host is still available as x-forwarded-host.
    assert_eq!(
        resp.upstream_headers().get("x-forwarded-host"),
        Some(&vec!["front.example".to_string()])
    );
}

#[tokio::test]
async fn hop_by_hop_request_headers_are_removed() {
    let (_up, gh) = proxy_with("", "", "").await;
    let resp = send(
        gh.port,
        request("GET", "/echo")
            .header("connection", "keep-alive, x-custom-hop")
            .header("keep-alive", "timeout=5")
            .header("te", "gzip")
            .header("x-custom-hop", "secret")
            .header("proxy-connection", "keep-alive")
            .header("upgrade", "h2c-nope")
            .header("x-end-to-end", "kept")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let seen = resp.upstream_headers();
    for hop in [
        "keep-alive",
        "te",
        "x-custom-hop",
        "proxy-connection",
        "upgrade",
    ] {
        assert!(
            !seen.contains_key(hop),
            "hop-by-hop header `{hop}` reached the upstream: {seen:?}"
        );
    }
    if let Some(conn) = seen.get("connection") {
        let joined = conn.join(",").to_lowercase();
        assert!(
            !joined.contains("x-custom-hop"),
            "the client's Connection header was forwarded: {conn:?}"
        );
    }
    assert_eq!(seen.get("x-end-to-end"), Some(&vec!["kept".to_string()]));
}

#[tokio::test]
async fn chunked_request_body_is_reframed_not_forwarded_as_header() {
    let (_up, gh) = proxy_with("", "", "").await;
    let resp = send(
        gh.port,
        request("POST", "/echo")
            .header("connection", "x-custom-hop")
            .header("x-custom-hop", "1")
            .body(streamed_body(3000, 1000))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let json = resp.json();
    assert_eq!(json["body_bytes"], 3000);
    let seen = resp.upstream_headers();
    assert!(!seen.contains_key("x-custom-hop"), "{seen:?}");
    // A body must be framed exactly once: never both.
    assert!(
        !(seen.contains_key("transfer-encoding") && seen.contains_key("content-length")),
        "{seen:?}"
    );
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_removed() {
    let (_up, gh) = proxy_with("", "", "").await;
    let resp = get(gh.port, "/hop").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.text(), "hop");
    assert_eq!(resp.header("x-end-to-end").as_deref(), Some("yes"));
    for hop in ["x-up-hop", "keep-alive", "proxy-connection"] {
        assert!(
            resp.header(hop).is_none(),
            "hop-by-hop response header `{hop}` reached the client: {resp:?}"
        );
    }
    assert!(
        !resp.header_all("connection").join(",").contains("x-up-hop"),
        "{resp:?}"
    );
}

#[tokio::test]
async fn forwarded_headers_are_set() {
    let (_up, gh) = proxy_with("", "", "").await;
    let resp = send(
        gh.port,
        request("GET", "/echo")
            .header("host", "front.example")
            .body(empty())
            .unwrap(),
    )
    .await;
    let seen = resp.upstream_headers();
    assert_eq!(
        seen.get("x-forwarded-for"),
        Some(&vec!["127.0.0.1".to_string()])
    );
    assert_eq!(
        seen.get("x-forwarded-proto"),
        Some(&vec!["http".to_string()])
    );
    assert_eq!(
        seen.get("x-forwarded-host"),
        Some(&vec!["front.example".to_string()])
    );
}

#[tokio::test]
async fn x_forwarded_for_is_appended() {
    let (_up, gh) = proxy_with("", "", "").await;
    let resp = send(
        gh.port,
        request("GET", "/echo")
            .header("x-forwarded-for", "1.2.3.4")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "spoofed.example")
            .header("host", "front.example")
            .body(empty())
            .unwrap(),
    )
    .await;
    let seen = resp.upstream_headers();
    assert_eq!(
        seen.get("x-forwarded-for").map(|v| v.join(", ")),
        Some("1.2.3.4, 127.0.0.1".to_string()),
        "{seen:?}"
    );
    // proto and host are *set*, not appended.
    assert_eq!(
        seen.get("x-forwarded-proto"),
        Some(&vec!["http".to_string()])
    );
    assert_eq!(
        seen.get("x-forwarded-host"),
        Some(&vec!["front.example".to_string()])
    );
}

#[tokio::test]
async fn server_sent_events_stream_through() {
    let (_up, gh) = proxy_with("", "", "").await;
    let mut conn = H1::connect(gh.port).await;
    let resp = conn
        .send_streaming(
            request("GET", "/stream?chunks=5&ms=300")
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "text/event-stream"
    );
    let mut body = resp.into_body();
    // The first data frame must arrive on its own, before the upstream has finished.
    let first = loop {
        let frame = within(STEP, "first chunk", body.frame())
            .await
            .expect("body ended before any data")
            .expect("body error");
        if let Ok(data) = frame.into_data() {
            if !data.is_empty() {
                break data;
            }
        }
    };
    let first = String::from_utf8_lossy(&first).into_owned();
    assert!(first.starts_with("data: 0\n\n"), "first chunk: {first:?}");
    assert!(
        !first.contains("data: 4"),
        "the whole stream arrived at once (buffered?): {first:?}"
    );
    let rest = within(STEP, "rest of stream", body.collect())
        .await
        .unwrap()
        .to_bytes();
    let all = format!("{first}{}", String::from_utf8_lossy(&rest));
    assert_eq!(
        all,
        "data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\n"
    );
}

#[tokio::test]
async fn large_upload_streams_without_buffering() {
    let (_up, gh) = proxy_with("", "", "").await;
    let total = 100 * MIB;
    let mut conn = H1::connect(gh.port).await;
    let resp = conn
        .send_streaming(
            request("POST", "/upload")
                .body(streamed_body(total, 64 * 1024))
                .unwrap(),
        )
        .await;
    let resp = collect(resp).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.text(), total.to_string());
    let peak = gh.peak_rss_kib();
    assert!(
        peak < 80 * 1024,
        "gatehouse peak RSS {peak} KiB after a 100 MiB upload: body buffered?"
    );
}

#[tokio::test]
async fn large_upload_with_content_length_streams() {
    let (_up, gh) = proxy_with("", "", "").await;
    let total = 100 * MIB;
    let resp = send(
        gh.port,
        request("POST", "/upload")
            .header("content-length", total.to_string())
            .body(streamed_body(total, 64 * 1024))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.text(), total.to_string());
    let peak = gh.peak_rss_kib();
    assert!(peak < 80 * 1024, "gatehouse peak RSS {peak} KiB");
}

#[tokio::test]
async fn large_download_arrives_complete() {
    let (_up, gh) = proxy_with("", "", "").await;
    let total = 100 * MIB;
    let mut conn = H1::connect(gh.port).await;
    let resp = conn
        .send_streaming(
            request("GET", &format!("/big?bytes={total}"))
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut received = 0usize;
    within(Duration::from_secs(300), "download", async {
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("body error during download");
            if let Some(data) = frame.data_ref() {
                assert!(data.iter().all(|&b| b == b'x'), "corrupted data");
                received += data.len();
            }
        }
    })
    .await;
    assert_eq!(received, total);
    let peak = gh.peak_rss_kib();
    assert!(peak < 80 * 1024, "gatehouse peak RSS {peak} KiB");
}

#[tokio::test]
async fn websocket_upgrade_passes_through() {
    let (_up, gh) = proxy_with("", "", "").await;
    let mut conn = H1::connect(gh.port).await;
    let resp = conn.send_streaming(websocket_request("/ws")).await;
    assert_eq!(resp.status(), 101, "{resp:?}");
    assert!(
        resp.headers()
            .get("upgrade")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket")),
        "{resp:?}"
    );
    let upgraded = within(STEP, "upgrade", hyper::upgrade::on(resp))
        .await
        .expect("upgraded connection");
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    for msg in [&b"hello"[..], b"second message", &[0u8, 1, 2, 255, 254][..]] {
        io.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        within(STEP, "echo", io.read_exact(&mut buf))
            .await
            .expect("echoed bytes");
        assert_eq!(buf, msg);
    }
}

#[tokio::test]
async fn unix_socket_upstream() {
    let up = Upstream::start_unix().await;
    let gh = Gatehouse::start(&config("", "", ""), &[("upstream", &up.url())]).await;
    let resp = send(
        gh.port,
        request("POST", "/echo?over=unix")
            .body(full("via unix"))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}\n{}", gh.output());
    let json = resp.json();
    assert_eq!(json["uri"], "/echo?over=unix");
    assert_eq!(json["body"], "via unix");
    assert_eq!(up.request_count(), 1);
}

#[tokio::test]
async fn upstream_down_gives_502_with_request_id() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let gh = Gatehouse::start(
        &config(
            "",
            "",
            "[[middleware]]\ntype = \"request_id\"\n\n[[middleware]]\ntype = \"timing\"\n",
        ),
        &[("upstream", &dead)],
    )
    .await;
    let resp = get(gh.port, "/echo").await;
    let json = resp.assert_gatehouse_error(502, "bad_gateway");
    let id = resp.header("x-request-id").expect("x-request-id on a 502");
    assert_eq!(json["request_id"], id.as_str(), "{json}");
    assert!(is_uuid(&id), "{id}");
    assert!(
        resp.header("x-response-time").is_some(),
        "timing on a 502: {resp:?}"
    );
}

#[tokio::test]
async fn upstream_reset_gives_502() {
    let up = RawUpstream::resetting().await;
    let gh = Gatehouse::start(&config("", "", ""), &[("upstream", &up.url())]).await;
    let resp = get(gh.port, "/echo").await;
    let json = resp.assert_gatehouse_error(502, "bad_gateway");
    assert!(
        json["request_id"].is_null(),
        "no request_id middleware: {json}"
    );
    // Gatehouse stays healthy afterwards.
    let resp = get(gh.port, "/echo").await;
    resp.assert_gatehouse_error(502, "bad_gateway");
}

#[tokio::test]
async fn upstream_timeout_gives_504() {
    let (_up, gh) = proxy_with("", "timeout = \"500ms\"", "").await;
    let resp = get(gh.port, "/slow?ms=3000").await;
    let json = resp.assert_gatehouse_error(504, "gateway_timeout");
    assert!(json["request_id"].is_null(), "{json}");
    // A fast request still works.
    assert_eq!(get(gh.port, "/echo").await.status, 200);
}

#[tokio::test]
async fn upstream_timeout_is_to_the_response_head_only() {
    // The head comes at once; the body takes longer than `timeout` and must not be cut.
    let (_up, gh) = proxy_with("", "timeout = \"500ms\"", "").await;
    let resp = get(gh.port, "/stream?chunks=3&ms=600").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.text(), "data: 0\n\ndata: 1\n\ndata: 2\n\n");
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let (up, gh) = proxy_with("", "", "").await;
    let n = 20;
    for i in 0..n {
        // A new client connection each time: reuse must come from gatehouse's pool.
        let resp = get(gh.port, &format!("/echo?i={i}")).await;
        assert_eq!(resp.status, 200);
    }
    assert_eq!(up.request_count(), n);
    let conns = up.connection_count();
    assert!(
        conns <= n / 4,
        "{n} sequential requests opened {conns} upstream connections"
    );
}

#[tokio::test]
async fn invalid_upstream_response_gives_502() {
    let up = RawUpstream::replying(b"this is not HTTP at all\r\n\r\n").await;
    let gh = Gatehouse::start(&config("", "", ""), &[("upstream", &up.url())]).await;
    let resp = get(gh.port, "/echo").await;
    resp.assert_gatehouse_error(502, "bad_gateway");
}

#[tokio::test]
async fn truncated_upstream_body_is_not_passed_off_as_complete() {
    // The upstream promises 1000 bytes, sends 10 and closes.
    let up = RawUpstream::replying(
        b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\ncontent-type: text/plain\r\n\r\n0123456789",
    )
    .await;
    let gh = Gatehouse::start(&config("", "", ""), &[("upstream", &up.url())]).await;
    let mut conn = H1::connect(gh.port).await;
    let resp = conn
        .send_streaming(request("GET", "/echo").body(empty()).unwrap())
        .await;
    if resp.status() == 502 {
        return; // also acceptable: gatehouse noticed before sending the head
    }
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut received = 0;
    let mut errored = false;
    within(STEP, "truncated body", async {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => received += f.data_ref().map_or(0, |d| d.len()),
                Err(_) => {
                    errored = true;
                    break;
                }
            }
        }
    })
    .await;
    assert!(
        errored,
        "the client got a clean end of body after {received} of 1000 bytes"
    );
}

#[tokio::test]
async fn client_hanging_up_before_the_answer_cancels_the_upstream_request() {
    // An upstream that takes the request and never answers; it reports when gatehouse
    // has the head sent and when gatehouse closes the connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    let (got_head, mut head_rx) = tokio::sync::mpsc::channel::<()>(1);
    let (closed, mut closed_rx) = tokio::sync::mpsc::channel::<()>(1);
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut head = Vec::new();
        loop {
            match stream.read(&mut buf).await {
                Ok(n) if n > 0 => {
                    head.extend_from_slice(&buf[..n]);
                    if head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let _ = got_head.try_send(());
                    }
                }
                _ => break, // EOF or reset: gatehouse gave up on the request
            }
        }
        let _ = closed.send(()).await;
    });
    // A long upstream timeout, so only the client's leaving can end the exchange.
    let gh = Gatehouse::start(
        &config("", "timeout = \"120s\"", ""),
        &[("upstream", &upstream)],
    )
    .await;
    let mut client = tokio::net::TcpStream::connect(gh.addr()).await.unwrap();
    client
        .write_all(b"GET /report HTTP/1.1\r\nhost: app\r\n\r\n")
        .await
        .unwrap();
    within(STEP, "the request reaches the upstream", head_rx.recv()).await;
    drop(client);
    within(
        STEP,
        "gatehouse closes the upstream connection of an abandoned request",
        closed_rx.recv(),
    )
    .await;
}

#[tokio::test]
async fn client_going_away_mid_download_does_not_hurt_the_proxy() {
    let (_up, gh) = proxy_with("", "", "").await;
    for _ in 0..3 {
        let mut conn = H1::connect(gh.port).await;
        let resp = conn
            .send_streaming(
                request("GET", &format!("/big?bytes={}", 50 * MIB))
                    .body(empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let _ = within(STEP, "first frame", body.frame()).await;
        drop(body);
        drop(conn);
    }
    let resp = get(gh.port, "/echo").await;
    assert_eq!(resp.status, 200);
    let resp = get(gh.port, "/stream?chunks=2&ms=10").await;
    assert_eq!(resp.text(), "data: 0\n\ndata: 1\n\n");
}

#[tokio::test]
async fn head_request_passes() {
    let (_up, gh) = proxy_with("", "", "").await;
    let resp = send(
        gh.port,
        request("HEAD", "/status/200").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(resp.body.is_empty());
}

#[tokio::test]
async fn upstream_closing_its_connection_is_handled() {
    let (up, gh) = proxy_with("", "", "").await;
    // One client connection throughout: the upstream's `connection: close` is hop-by-hop and
    // must neither break the next request nor close the client's connection.
    let mut conn = H1::connect(gh.port).await;
    for i in 0..4 {
        let resp = conn
            .send(request("GET", "/close").body(empty()).unwrap())
            .await;
        assert_eq!(resp.status, 200, "round {i}: {resp:?}");
        assert_eq!(resp.text(), "closing");
        let resp = conn
            .send(request("GET", "/echo").body(empty()).unwrap())
            .await;
        assert_eq!(resp.status, 200, "round {i}: {resp:?}");
    }
    assert_eq!(up.request_count(), 8);
}

#[tokio::test]
async fn expect_100_continue() {
    let (_up, gh) = proxy_with("", "", "").await;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", gh.port))
        .await
        .unwrap();
    stream
        .write_all(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\
              Expect: 100-continue\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut interim = Vec::new();
    let mut buf = [0u8; 1024];
    while !interim.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = within(
            Duration::from_secs(10),
            "100 Continue before the body",
            stream.read(&mut buf),
        )
        .await
        .unwrap();
        assert!(
            n > 0,
            "connection closed: {:?}",
            String::from_utf8_lossy(&interim)
        );
        interim.extend_from_slice(&buf[..n]);
    }
    let interim = String::from_utf8_lossy(&interim).into_owned();
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim:?}");
    stream.write_all(b"hello").await.unwrap();
    let (rest, _) = read_until_closed(&mut stream, Duration::from_secs(20)).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("HTTP/1.1 200"), "{interim:?}{rest:?}");
    assert!(rest.contains("\"body_bytes\":5"), "{rest:?}");
}

#[tokio::test]
async fn x_forwarded_for_with_several_header_lines() {
    let (_up, gh) = proxy_with("", "", "").await;
    let resp = send(
        gh.port,
        request("GET", "/echo")
            .header("x-forwarded-for", "1.2.3.4")
            .header("x-forwarded-for", "5.6.7.8")
            .body(empty())
            .unwrap(),
    )
    .await;
    let seen = resp.upstream_headers();
    assert_eq!(
        seen.get("x-forwarded-for").map(|v| v.join(", ")),
        Some("1.2.3.4, 5.6.7.8, 127.0.0.1".to_string()),
        "{seen:?}"
    );
}

#[tokio::test]
async fn early_upstream_response_to_an_upload_is_passed_through() {
    // The upstream answers 401 without reading a 10 MiB upload (as an app rejecting an
    // unauthenticated upload does). The client must get that 401, not a 502.
    let (_up, gh) = proxy_with("", "", "").await;
    for _ in 0..2 {
        let resp = send(
            gh.port,
            request("POST", "/status/401")
                .body(streamed_body(10 * MIB, 64 * 1024))
                .unwrap(),
        )
        .await;
        assert_eq!(resp.status, 401, "{resp:?}\n{}", gh.output());
        assert_eq!(resp.text(), "upstream status 401");
    }
}
