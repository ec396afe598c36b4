//! Self-checks of the test harness, without gatehouse: the test upstream and the clients
//! behave as the other tests assume, so their failures point at the product.
mod common;

use common::*;
use http_body_util::BodyExt;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn upstream_routes() {
    let up = Upstream::start().await;
    let port = up.addr.unwrap().port();

    let resp = send(
        port,
        request("POST", "/echo?a=1")
            .header("x-two", "1")
            .header("x-two", "2")
            .body(full("abc"))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 200);
    let json = resp.json();
    assert_eq!(json["method"], "POST");
    assert_eq!(json["uri"], "/echo?a=1");
    assert_eq!(json["body_bytes"], 3);
    assert_eq!(resp.upstream_headers()["x-two"], ["1", "2"]);
    assert_eq!(resp.header_all("x-up-remove"), ["a", "b"]);

    assert_eq!(get(port, "/status/418").await.status, 418);
    assert_eq!(get(port, "/slow?ms=10").await.text(), "slow done");
    assert_eq!(
        get(port, "/stream?chunks=3&ms=10").await.text(),
        "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    );
    assert_eq!(get(port, "/big?bytes=200000").await.body.len(), 200000);
    let resp = send(
        port,
        request("POST", "/upload")
            .body(streamed_body(300_000, 7000))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.text(), "300000");
    assert_eq!(up.request_count(), 6);

    let resp = h2_send(port, "GET", "/echo", empty()).await;
    assert_eq!(resp.version, http::Version::HTTP_2);
}

#[tokio::test]
async fn upstream_stream_arrives_in_pieces() {
    let up = Upstream::start().await;
    let mut conn = H1::connect(up.addr.unwrap().port()).await;
    let resp = conn
        .send_streaming(
            request("GET", "/stream?chunks=3&ms=300")
                .body(empty())
                .unwrap(),
        )
        .await;
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"data: 0\n\n");
}

#[tokio::test]
async fn upstream_websocket_echo() {
    let up = Upstream::start().await;
    let mut conn = H1::connect(up.addr.unwrap().port()).await;
    let resp = conn
        .send_streaming(
            request("GET", "/ws")
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 101);
    let mut io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    io.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn keep_alive_and_connection_counting() {
    let up = Upstream::start().await;
    let mut conn = H1::connect(up.addr.unwrap().port()).await;
    for _ in 0..3 {
        let resp = conn
            .send(request("GET", "/echo").body(empty()).unwrap())
            .await;
        assert_eq!(resp.status, 200);
    }
    get(up.addr.unwrap().port(), "/echo").await;
    assert_eq!(up.connection_count(), 2);
    assert_eq!(up.request_count(), 4);
}

#[tokio::test]
async fn resetting_upstream_resets() {
    let up = RawUpstream::resetting().await;
    let (reply, closed) = raw_exchange(
        up.addr.port(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(reply.is_empty() && closed);
}

#[tokio::test]
async fn error_body_check_rejects_wrong_shapes() {
    let ok = Resp {
        status: http::StatusCode::FORBIDDEN,
        version: http::Version::HTTP_11,
        headers: [(
            http::header::CONTENT_TYPE,
            "application/json".parse().unwrap(),
        )]
        .into_iter()
        .collect(),
        body: r#"{"error":"forbidden","message":"no","request_id":null}"#.into(),
    };
    ok.assert_gatehouse_error(403, "forbidden");
    let extra_key = Resp {
        body: r#"{"error":"forbidden","message":"no","request_id":null,"x":1}"#.into(),
        ..ok
    };
    let r = std::panic::catch_unwind(|| extra_key.assert_gatehouse_error(403, "forbidden"));
    assert!(r.is_err());
}

#[tokio::test]
async fn early_response_to_an_upload_reaches_the_client_directly() {
    // The baseline for proxy::early_upstream_response_to_an_upload_is_passed_through.
    let up = Upstream::start().await;
    let resp = send(
        up.addr.unwrap().port(),
        request("POST", "/status/401")
            .body(streamed_body(10 << 20, 64 * 1024))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 401);
}
