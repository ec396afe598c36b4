//! `compress` through the real binary: every codec's output decoded byte for byte by
//! independent decoders (Python's `gzip`, `brotli` and `zstandard`, in a venv this test
//! makes), bodies from 0 bytes to 50 MiB, chunked and with a Content-Length, streamed with
//! pauses; negotiation; every response it must leave alone; the head it makes; trailers;
//! a stream of events that stays live; HTTP/2 clients; the audit's `bytes_out`; `explain`.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Request};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::{mpsc, Notify};

const CODINGS: [&str; 3] = ["gzip", "br", "zstd"];

// ---------------------------------------------------------------------------------------------
// The app and the decoders
// ---------------------------------------------------------------------------------------------

/// A body of `n` bytes that compresses as JSON does (words, numbers, some noise), the same
/// for the same `n`.
fn payload(n: usize) -> Bytes {
    const WORDS: [&str; 12] = [
        "{\"id\": ",
        "\"name\": ",
        "\"alpha\", ",
        "\"beta\", ",
        "\"tags\": [",
        "], ",
        "true, ",
        "null, ",
        "\"description\": ",
        "\"gatehouse\"",
        "}, ",
        "\n",
    ];
    let mut rng = fastrand::Rng::with_seed(n as u64);
    let mut out = Vec::with_capacity(n + 32);
    while out.len() < n {
        match rng.u8(..) {
            0..=199 => out.extend_from_slice(WORDS[rng.usize(..WORDS.len())].as_bytes()),
            200..=239 => out.extend_from_slice(rng.u32(..100_000).to_string().as_bytes()),
            _ => out.extend((0..8).map(|_| rng.u8(b'a'..=b'z'))),
        }
    }
    out.truncate(n);
    out.into()
}

/// A streamed response body: each frame sent on the channel (data or trailers).
struct Frames(mpsc::Receiver<Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

/// Streams `body` in pieces of random sizes (1 byte to 64 KiB), pausing now and then (the
/// channel runs dry while the task sleeps), then the `trailers`, if any.
fn stream(body: Bytes, trailers: Option<HeaderMap>) -> Body {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut rng = fastrand::Rng::with_seed(body.len() as u64 + 7);
        let mut at = 0;
        while at < body.len() {
            let n = if rng.u8(..) < 16 {
                rng.usize(1..16)
            } else {
                rng.usize(1..=64 << 10)
            }
            .min(body.len() - at);
            if tx.send(Frame::data(body.slice(at..at + n))).await.is_err() {
                return;
            }
            at += n;
            if rng.u8(..) < 32 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        if let Some(trailers) = trailers {
            let _ = tx.send(Frame::trailers(trailers)).await;
        }
    });
    Frames(rx).boxed()
}

/// The app: `/body?n=N` answers N bytes of [`payload`], streamed with pauses; `cl=1` gives
/// them a Content-Length (chunked otherwise), `type=` a content-type (JSON by default),
/// `status=`, `etag=strong|weak`, `ce=` (content-encoding), `cc=` (cache-control), `vary=`
/// and `trailers=1` (an `x-checksum` trailer) shape the head. `/sse` is a stream of events
/// that sends one, then holds the stream open until the test releases it. `/page` is
/// [`PAGE`] for a browser, which reports to `/report?r=` what it saw.
struct App {
    server: TestServer,
    release: Arc<Notify>,
    reports: mpsc::UnboundedReceiver<String>,
}

impl App {
    async fn start() -> App {
        let release = Arc::new(Notify::new());
        let held = release.clone();
        let (report, reports) = mpsc::unbounded_channel();
        let server = TestServer::start(move |parts| {
            let query: Vec<(&str, &str)> = parts
                .uri
                .query()
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .collect();
            let param = |name: &str| query.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
            match parts.uri.path() {
                "/page" => {
                    return reply(
                        200,
                        &[("content-type", "text/html; charset=utf-8")],
                        &page(),
                    )
                }
                "/report" => {
                    let _ = report.send(param("r").unwrap_or("").to_owned());
                    return reply(204, &[], "");
                }
                _ => {}
            }
            if parts.uri.path() == "/sse" {
                let (tx, rx) = mpsc::channel(4);
                let held = held.clone();
                tokio::spawn(async move {
                    let _ = tx.send(Frame::data(Bytes::from("data: first\n\n"))).await;
                    held.notified().await;
                    let _ = tx.send(Frame::data(Bytes::from("data: second\n\n"))).await;
                });
                return http::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Frames(rx).boxed())
                    .unwrap();
            }
            let n: usize = param("n").map_or(0, |n| n.parse().unwrap());
            let body = payload(n);
            let mut resp = http::Response::builder()
                .status(param("status").map_or(200, |s| s.parse().unwrap()))
                .header("content-type", param("type").unwrap_or("application/json"))
                .header("accept-ranges", "bytes");
            if param("cl") == Some("1") {
                resp = resp.header("content-length", n);
            }
            match param("etag") {
                Some("strong") => resp = resp.header("etag", "\"v1\""),
                Some("weak") => resp = resp.header("etag", "W/\"v1\""),
                _ => {}
            }
            for (param_name, header) in [
                ("ce", "content-encoding"),
                ("cc", "cache-control"),
                ("vary", "vary"),
            ] {
                if let Some(value) = param(param_name) {
                    resp = resp.header(header, value);
                }
            }
            if param("trailers") == Some("1") {
                // hyper sends only the trailer fields its head announces.
                resp = resp.header("trailer", "x-checksum");
            }
            let trailers = (param("trailers") == Some("1")).then(|| {
                let mut t = HeaderMap::new();
                t.insert("x-checksum", n.to_string().parse().unwrap());
                t
            });
            resp.body(stream(body, trailers)).unwrap()
        })
        .await;
        App {
            server,
            release,
            reports,
        }
    }

    fn url(&self) -> String {
        self.server.url("")
    }
}

/// The venv holding the decoders.
fn decoders() -> PathBuf {
    python_venv("compress-venv", "tests/fixtures/compress/requirements.txt")
}

/// `data` decoded by the independent decoder of `coding`; `partial` accepts an unfinished
/// stream (what it holds so far). Panics with the decoder's message if it refuses.
fn decode(coding: &str, data: &[u8], partial: bool) -> Vec<u8> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/compress/decode.py"
    );
    let mut child = Command::new(decoders().join("bin/python"))
        .arg(script)
        .arg(coding)
        .args(partial.then_some("partial"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the decoder");
    let mut stdin = child.stdin.take().unwrap();
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().expect("feed the decoder");
    assert!(
        out.status.success(),
        "{coding} decoder refused {} bytes: {}",
        data.len(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

const SINK: &str = "[audit]\n[[audit.sinks]]\ntype = \"file\"\npath = \"{events}\"\n";

/// gatehouse with `compress` (`settings` are its keys) in front of the app, auditing every
/// request to a file.
async fn gatehouse(app: &App, settings: &str) -> (Gatehouse, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let rest = format!("[[middleware]]\ntype = \"compress\"\n{settings}\n\n{SINK}");
    let gh = Gatehouse::start(
        &config("", "", &rest),
        &[
            ("upstream", &app.url()),
            ("events", events.to_str().unwrap()),
        ],
    )
    .await;
    (gh, dir)
}

fn get(path: &str, accept: Option<&str>) -> Request<common::Body> {
    let mut req = request("GET", path);
    if let Some(accept) = accept {
        req = req.header("accept-encoding", accept);
    }
    req.body(empty()).unwrap()
}

/// Asserts that `resp` is `coding`-compressed with the head compression makes, and that
/// its body decodes to `expected`.
fn assert_compressed(resp: &Resp, coding: &str, expected: &[u8], what: &str) {
    assert_eq!(resp.status, 200, "{what}: {:?}", resp.headers);
    assert_eq!(
        resp.header("content-encoding").as_deref(),
        Some(coding),
        "{what}"
    );
    assert_eq!(resp.header("content-length"), None, "{what}");
    assert_eq!(resp.header("accept-ranges"), None, "{what}");
    assert!(
        resp.header_all("vary").contains(&"accept-encoding".into()),
        "{what}: {:?}",
        resp.headers
    );
    let decoded = decode(coding, &resp.body, false);
    assert!(
        decoded == expected,
        "{what}: decoded {} bytes differ from the app's {}",
        decoded.len(),
        expected.len()
    );
}

/// Asserts that `resp` carries the app's body untouched, and no content-encoding but the
/// app's (`ce=`).
fn assert_untouched(resp: &Resp, expected: &[u8], what: &str) {
    let app_coding = what.strip_prefix("already encoded as ");
    assert_eq!(
        resp.header("content-encoding").as_deref(),
        app_coding,
        "{what}: {:?}",
        resp.headers
    );
    assert!(
        resp.body == expected,
        "{what}: the body changed ({} bytes, expected {})",
        resp.body.len(),
        expected.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI (brotli, zstandard)"
)]
async fn every_codec_at_every_level_decodes_byte_for_byte() {
    let app = App::start().await;
    for level in ["fastest", "default", "best"] {
        let (gh, dir) = gatehouse(&app, &format!("min_size = \"0B\"\nlevel = \"{level}\"")).await;
        let mut sent = Vec::new();
        for coding in CODINGS {
            for n in [0, 1, 777, 65_537, 1_500_000] {
                for cl in [false, true] {
                    let what = format!("{coding} {level} n={n} content-length={cl}");
                    let path = format!("/body?n={n}&cl={}", u8::from(cl));
                    let resp = send(gh.port, get(&path, Some(coding))).await;
                    assert_compressed(&resp, coding, &payload(n), &what);
                    sent.push(resp.body.len() as u64);
                }
            }
        }
        // The audit counts the bytes that went to the client: the compressed ones.
        let events = wait_for_events(&dir.path().join("events.jsonl"), sent.len()).await;
        let counted: Vec<u64> = events
            .iter()
            .map(|e| e["bytes_out"].as_u64().unwrap())
            .collect();
        assert_eq!(counted, sent, "{level}: audit bytes_out");
        assert!(
            events.iter().all(|e| e["completed"] == true),
            "{level}: {events:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI (brotli, zstandard)"
)]
async fn a_50_mib_body_streams_through_every_codec() {
    let app = App::start().await;
    let (gh, _dir) = gatehouse(&app, "").await;
    let n = 50 << 20;
    let expected = payload(n);
    for coding in CODINGS {
        let resp = send(gh.port, get(&format!("/body?n={n}"), Some(coding))).await;
        assert_compressed(&resp, coding, &expected, &format!("{coding} 50 MiB"));
        assert!(
            resp.body.len() < n / 2,
            "{coding}: {} bytes",
            resp.body.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI (brotli, zstandard)"
)]
async fn http2_clients_get_compressed_bodies_and_their_trailers() {
    let app = App::start().await;
    let (gh, dir) = gatehouse(&app, "").await;
    let mut sender = h2_connect(gh.port).await;
    let mut sent = Vec::new();
    for coding in CODINGS {
        for path in [
            "/body?n=300000",
            "/body?n=300000&cl=1",
            "/body?n=300000&trailers=1",
        ] {
            let req = Request::get(format!("http://127.0.0.1:{}{path}", gh.port))
                .header("accept-encoding", coding)
                // The app (hyper) sends trailers only to a request that accepts them.
                .header("te", "trailers")
                .body(empty())
                .unwrap();
            let resp = within(STEP, "h2 response", sender.send_request(req))
                .await
                .unwrap();
            let (parts, body) = resp.into_parts();
            let collected = within(STEP, "h2 body", body.collect()).await.unwrap();
            let trailers = collected.trailers().cloned();
            let resp = Resp {
                status: parts.status,
                version: parts.version,
                headers: parts.headers,
                body: collected.to_bytes(),
            };
            let what = format!("h2 {coding} {path}");
            assert_compressed(&resp, coding, &payload(300_000), &what);
            if path.contains("trailers") {
                let checksum = trailers.as_ref().and_then(|t| t.get("x-checksum"));
                assert_eq!(
                    checksum.map(|v| v.as_bytes()),
                    Some(&b"300000"[..]),
                    "{what}"
                );
            }
            sent.push(resp.body.len() as u64);
        }
    }
    let events = wait_for_events(&dir.path().join("events.jsonl"), sent.len()).await;
    let counted: Vec<u64> = events
        .iter()
        .map(|e| e["bytes_out"].as_u64().unwrap())
        .collect();
    assert_eq!(counted, sent, "audit bytes_out");
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI (brotli, zstandard)"
)]
async fn http1_trailers_follow_the_compressed_body() {
    let app = App::start().await;
    let (gh, _dir) = gatehouse(&app, "").await;
    for coding in CODINGS {
        let req = request("GET", "/body?n=100000&trailers=1")
            .header("accept-encoding", coding)
            .header("te", "trailers")
            .body(empty())
            .unwrap();
        let resp = H1::connect(gh.port).await.send_streaming(req).await;
        let (parts, body) = resp.into_parts();
        let collected = within(STEP, "body", body.collect()).await.unwrap();
        let trailers = collected.trailers().cloned();
        let body = collected.to_bytes();
        assert_eq!(parts.headers["content-encoding"], coding);
        assert_eq!(decode(coding, &body, false), payload(100_000));
        let checksum = trailers.as_ref().and_then(|t| t.get("x-checksum"));
        assert_eq!(
            checksum.map(|v| v.as_bytes()),
            Some(&b"100000"[..]),
            "{coding}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Streams stay live
// ---------------------------------------------------------------------------------------------

/// Reads `body` until what arrived decodes (as an unfinished stream) to hold `event`;
/// returns the bytes read so far. The app holds the stream open meanwhile: the event can
/// only have come through a flush.
async fn until_event<B>(body: &mut B, coding: &str, event: &str, got: &mut Vec<u8>)
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    within(
        STEP,
        "the first event, while the app holds the stream open",
        async {
            loop {
                let frame = body.frame().await.expect("the stream is open").unwrap();
                if let Ok(data) = frame.into_data() {
                    got.extend_from_slice(&data);
                }
                let so_far = decode(coding, got, true);
                if String::from_utf8_lossy(&so_far).contains(event) {
                    return;
                }
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI (brotli, zstandard)"
)]
async fn a_listed_event_stream_is_compressed_and_stays_live() {
    let app = App::start().await;
    let (gh, _dir) = gatehouse(&app, "content_types = [\"text/event-stream\"]").await;
    for coding in CODINGS {
        for h2 in [false, true] {
            let what = format!("{coding} h2={h2}");
            let (parts, mut body) = if h2 {
                let req = Request::get(format!("http://127.0.0.1:{}/sse", gh.port))
                    .header("accept-encoding", coding)
                    .body(empty())
                    .unwrap();
                let mut sender = h2_connect(gh.port).await;
                within(STEP, "h2 head", sender.send_request(req))
                    .await
                    .unwrap()
                    .into_parts()
            } else {
                H1::connect(gh.port)
                    .await
                    .send_streaming(get("/sse", Some(coding)))
                    .await
                    .into_parts()
            };
            assert_eq!(parts.headers["content-encoding"], coding, "{what}");
            let mut got = Vec::new();
            until_event(&mut body, coding, "data: first\n\n", &mut got).await;
            app.release.notify_one();
            let rest = within(STEP, "the rest of the stream", body.collect())
                .await
                .unwrap();
            got.extend_from_slice(&rest.to_bytes());
            assert_eq!(
                decode(coding, &got, false),
                b"data: first\n\ndata: second\n\n",
                "{what}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Negotiation and the head
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn accept_encoding_is_negotiated_by_q_values_and_the_server_order() {
    let app = App::start().await;
    let (gh, _dir) = gatehouse(&app, "algorithms = [\"br\", \"zstd\", \"gzip\"]").await;
    let cases: [(Option<&str>, Option<&str>); 11] = [
        (Some("gzip, deflate, br, zstd"), Some("br")),
        (Some("gzip, zstd"), Some("zstd")),
        (Some("gzip;q=1, br;q=0.5"), Some("gzip")),
        (Some("br;q=0, gzip"), Some("gzip")),
        (Some("*"), Some("br")),
        (Some("*;q=0.2, br;q=0"), Some("zstd")),
        (Some("x-gzip"), Some("gzip")),
        (Some("gzip;q=0.5, identity"), None),
        (Some("identity"), None),
        (Some("br;q=0, gzip;q=0, zstd;q=0, *;q=0"), None),
        (None, None),
    ];
    for (accept, chosen) in cases {
        let resp = send(gh.port, get("/body?n=5000&cl=1", accept)).await;
        assert_eq!(
            resp.header("content-encoding").as_deref(),
            chosen,
            "accept-encoding {accept:?}"
        );
        // Whatever was chosen, the answer depended on the request's accept-encoding.
        assert_eq!(resp.header_all("vary"), ["accept-encoding"], "{accept:?}");
        if chosen.is_none() {
            assert_untouched(&resp, &payload(5000), &format!("{accept:?}"));
            assert_eq!(resp.header("content-length").as_deref(), Some("5000"));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn responses_it_must_not_touch_are_left_alone() {
    let app = App::start().await;
    let (gh, _dir) = gatehouse(&app, "min_size = \"1KiB\"").await;
    let n = 5000;
    let cases = [
        ("/body?n=5000&ce=br", "already encoded as br"),
        ("/body?n=5000&cc=public,no-transform", "no-transform"),
        ("/body?n=5000&status=206", "206"),
        ("/body?n=5000&type=image/png", "a type not listed"),
        (
            "/body?n=5000&type=text/event-stream",
            "an event stream under text/*",
        ),
        ("/body?n=5000&type=application/grpc", "gRPC"),
        ("/body?n=1000&cl=1", "below min_size"),
    ];
    for (path, what) in cases {
        let resp = send(gh.port, get(path, Some("gzip, br, zstd"))).await;
        let expected = if what == "below min_size" {
            payload(1000)
        } else {
            payload(n)
        };
        assert_untouched(&resp, &expected, what);
    }
    // A request with Range (the app ignores it and answers 200), and HEAD.
    let ranged = request("GET", "/body?n=5000&cl=1")
        .header("accept-encoding", "gzip")
        .header("range", "bytes=0-99")
        .body(empty())
        .unwrap();
    assert_untouched(&send(gh.port, ranged).await, &payload(n), "a Range request");
    let head = request("HEAD", "/body?n=5000&cl=1")
        .header("accept-encoding", "gzip")
        .body(empty())
        .unwrap();
    let resp = send(gh.port, head).await;
    assert_eq!(
        resp.header("content-encoding"),
        None,
        "HEAD: {:?}",
        resp.headers
    );
    assert_eq!(
        resp.header("content-length").as_deref(),
        Some("5000"),
        "HEAD"
    );
    for status in [204, 304] {
        let resp = send(
            gh.port,
            get(&format!("/body?status={status}"), Some("gzip")),
        )
        .await;
        assert_eq!(resp.status, status);
        assert_eq!(resp.header("content-encoding"), None, "{status}");
        assert!(resp.body.is_empty(), "{status}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrades_pass_through() {
    let up = Upstream::start().await;
    let rest =
        "[[middleware]]\ntype = \"compress\"\ncontent_types = [\"*/*\"]\nmin_size = \"0B\"\n";
    let gh = Gatehouse::start(&config("", "", rest), &[("upstream", &up.url())]).await;
    let mut req = websocket_request("/ws");
    req.headers_mut()
        .insert("accept-encoding", "gzip".parse().unwrap());
    let resp = H1::connect(gh.port).await.send_streaming(req).await;
    assert_eq!(resp.headers().get("content-encoding"), None);
    assert_websocket_echoes(resp).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_head_says_what_was_done() {
    let app = App::start().await;
    let (gh, _dir) = gatehouse(&app, "").await;
    let resp = send(
        gh.port,
        get("/body?n=5000&cl=1&etag=strong&vary=Origin", Some("gzip")),
    )
    .await;
    assert_eq!(resp.header("content-encoding").as_deref(), Some("gzip"));
    assert_eq!(
        resp.header("etag").as_deref(),
        Some("W/\"v1\""),
        "a strong ETag turns weak"
    );
    assert_eq!(resp.header_all("vary"), ["Origin", "accept-encoding"]);
    assert_eq!(resp.header("content-length"), None);
    let resp = send(
        gh.port,
        get("/body?n=5000&etag=weak&vary=Accept-Encoding", Some("gzip")),
    )
    .await;
    assert_eq!(
        resp.header("etag").as_deref(),
        Some("W/\"v1\""),
        "a weak ETag stays"
    );
    assert_eq!(
        resp.header_all("vary"),
        ["Accept-Encoding"],
        "no second accept-encoding"
    );
    // Not compressed for this client, yet the answer varies by accept-encoding.
    let resp = send(gh.port, get("/body?n=5000&cl=1&etag=strong", None)).await;
    assert_eq!(resp.header("etag").as_deref(), Some("\"v1\""));
    assert_eq!(resp.header_all("vary"), ["accept-encoding"]);
}

// ---------------------------------------------------------------------------------------------
// explain
// ---------------------------------------------------------------------------------------------

#[test]
fn explain_says_whether_a_body_is_compressed_and_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let rest = "[[middleware]]\ntype = \"compress\"\n";
    let text = config("", "", rest)
        .replace("{port}", "8080")
        .replace("{upstream}", "http://127.0.0.1:8000");
    std::fs::write(&path, text).unwrap();
    let explain = |args: &[&str]| {
        let mut all = vec!["explain", "--config", path.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = cli(&all, &[], None);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        out.stdout
    };
    let json = ["--upstream-header", "content-type: application/json"];
    let out = explain(
        &[
            &["-H", "accept-encoding: gzip, br"][..],
            &json,
            &["GET", "/api"],
        ]
        .concat(),
    );
    assert!(out.contains("set content-encoding: br"), "{out}");
    assert!(
        out.contains("body: compressed: br at level default"),
        "{out}"
    );
    let out = explain(&[&json[..], &["GET", "/api"]].concat());
    assert!(
        out.contains("body: as it is: the request has no accept-encoding"),
        "{out}"
    );
    let out = explain(&[
        "-H",
        "accept-encoding: gzip",
        "--upstream-header",
        "content-type: image/png",
        "GET",
        "/logo",
    ]);
    assert!(
        out.contains("body: as it is: its content-type is not in content_types"),
        "{out}"
    );
    let small = ["--upstream-header", "content-length: 100"];
    let out = explain(
        &[
            &["-H", "accept-encoding: gzip"][..],
            &json,
            &small,
            &["GET", "/api"],
        ]
        .concat(),
    );
    assert!(
        out.contains("body: as it is: its content-length is below min_size"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// A browser
// ---------------------------------------------------------------------------------------------

/// What the page does once loaded: reads a large JSON body with `fetch`, waits for the
/// first event of `/sse` (which the app holds open after it), and reports both, with the
/// length of its own text, to `/report`.
const PAGE_SCRIPT: &str = r#"<script>
(async () => {
  const result = {};
  try {
    const r = await fetch('/body?n=300000');
    result.coding = r.headers.get('content-encoding');
    result.json_length = (await r.text()).length;
    result.event = await new Promise((resolve, reject) => {
      const events = new EventSource('/sse');
      events.onmessage = (e) => { events.close(); resolve(e.data); };
      events.onerror = () => reject(new Error('EventSource failed'));
    });
    result.page_length = document.getElementById('filler').textContent.length;
  } catch (e) {
    result.failure = String(e);
  }
  await fetch('/report?r=' + encodeURIComponent(JSON.stringify(result)));
})();
</script>"#;

/// The page: 40 000 characters of text, then [`PAGE_SCRIPT`].
fn page() -> String {
    let filler = "compressible page text ".repeat(40_000 / 23 + 1);
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>compress</title></head>\
         <body><p id=\"filler\">{}</p>{PAGE_SCRIPT}</body></html>",
        &filler[..40_000]
    )
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(gatehouse_has_chromium),
    ignore = "needs chromium (apt-get install chromium)"
)]
async fn a_browser_reads_a_compressed_page_and_a_live_event_stream() {
    let chromium = common::browser::find_chromium();
    let mut app = App::start().await;
    let (gh, dir) = gatehouse(
        &app,
        "content_types = [\"text/html\", \"application/json\", \"text/event-stream\"]",
    )
    .await;
    let browser =
        common::browser::Browser::open(&chromium, &format!("http://127.0.0.1:{}/page", gh.port));
    let report = within(
        Duration::from_secs(60),
        "the page's report",
        app.reports.recv(),
    )
    .await
    .unwrap_or_else(|| panic!("no report\n{}", browser.log()));
    app.release.notify_one();
    let report: serde_json::Value = serde_json::from_str(&urldecode(&report)).unwrap();
    assert!(report.get("failure").is_none(), "the page failed: {report}");
    assert!(
        CODINGS.contains(&report["coding"].as_str().unwrap_or("none")),
        "{report}"
    );
    assert_eq!(report["json_length"], 300_000, "{report}");
    assert_eq!(report["event"], "first", "{report}");
    assert_eq!(report["page_length"], 40_000, "{report}");
    // What went to the browser was compressed: far fewer bytes than the app sent.
    let events = wait_for_events(&dir.path().join("events.jsonl"), 2).await;
    for (path, size) in [("/page", page().len()), ("/body", 300_000)] {
        let event = events
            .iter()
            .find(|e| e["path"] == path)
            .unwrap_or_else(|| panic!("no event for {path}: {events:?}"));
        let sent = event["bytes_out"].as_u64().unwrap() as usize;
        assert!(sent < size / 2, "{path}: {sent} bytes sent for {size}");
    }
}

/// `%XX` escapes decoded (what `encodeURIComponent` makes).
fn urldecode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            out.push(u8::from_str_radix(&text[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

#[test]
fn bad_settings_are_refused_with_where_and_what() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let cases = [
        (
            "content_types = [\"json\"]",
            "middleware[1].content_types[1]: invalid media type \"json\"",
        ),
        (
            "algorithms = [\"gzip\", \"gzip\"]",
            "middleware[1].algorithms[2]: \"gzip\" is listed twice",
        ),
        (
            "algorithms = []",
            "middleware[1].algorithms: expected at least one",
        ),
        (
            "algorithms = [\"deflate\"]",
            "unknown variant `deflate`, expected one of `zstd`, `br`, `gzip`",
        ),
        (
            "level = \"max\"",
            "unknown variant `max`, expected one of `fastest`, `default`, `best`",
        ),
        ("min_size = \"10\"", "expected a unit after the number"),
    ];
    for (setting, expected) in cases {
        let rest = format!("[[middleware]]\ntype = \"compress\"\n{setting}\n");
        let text = config("", "", &rest)
            .replace("{port}", "8080")
            .replace("{upstream}", "http://127.0.0.1:8000");
        std::fs::write(&path, text).unwrap();
        let out = cli(&["check", "--config", path.to_str().unwrap()], &[], None);
        assert_eq!(out.code, Some(2), "{setting}: {}", out.stderr);
        assert!(out.stderr.contains(expected), "{setting}: {}", out.stderr);
    }
}
