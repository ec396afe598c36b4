//! The differential test of gatehouse's HTTP/1 server against hyper's: the same client
//! bytes go to both (in-process, over a pipe), each hands what it read to a recording
//! service with scripted answers, and the two must agree on the verdict (served or
//! refused), on every request the service saw (method, target, host, end-to-end headers,
//! body and trailers, hence on the bytes gatehouse would send upstream), and on what the
//! client got back (statuses, bodies, an upgraded connection's bytes).
//!
//! Where gatehouse is stricter than hyper on purpose (RFC 9112 MUSTs hyper leaves to the
//! application, and codings gatehouse will not re-label), the case says what each side
//! does and why.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, HOST, TE, UPGRADE};
use http::{request, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::downstream::{self, Phases, Served};
use super::{hop, request::Forwarded, Framing};

/// One request as the service saw it, normalized the way RFC 9110/9112 define it: the
/// hop-by-hop headers (and those `Connection` names) are not the message's, and an
/// absolute-form target's authority is its host.
#[derive(Debug, PartialEq)]
struct Seen {
    method: Method,
    target: String,
    host: Option<HeaderValue>,
    headers: Vec<(String, Vec<u8>)>,
    /// The body, or `None` when the server found it malformed.
    body: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Seen {
    async fn read<B>(parts: &request::Parts, body: B) -> Seen
    where
        B: HttpBody<Data = Bytes>,
        B::Error: std::fmt::Debug,
    {
        let mut headers = parts.headers.clone();
        let mut tokens = hop::Tokens::default();
        for value in parts.headers.get_all(CONNECTION) {
            tokens.add(value);
        }
        tokens.remove_named(&mut headers);
        for name in hop::HOP_BY_HOP {
            if *name != TE {
                headers.remove(name);
            }
        }
        if headers.get(TE).is_some_and(|v| !hop::is_te_trailers(v)) {
            headers.remove(TE);
        }
        let host = match parts.uri.authority() {
            Some(a) => Some(HeaderValue::from_str(a.as_str()).unwrap()),
            None => headers.get(HOST).cloned(),
        };
        headers.remove(HOST);
        let mut pairs: Vec<(String, Vec<u8>)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect();
        pairs.sort();
        let (body, trailers) = match body.collect().await {
            Ok(collected) => {
                let trailers = collected.trailers().cloned();
                (Some(collected.to_bytes()), trailers)
            }
            Err(_) => (None, None),
        };
        Seen {
            method: parts.method.clone(),
            target: parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.to_string(), |p| p.to_string()),
            host,
            headers: pairs,
            body,
            trailers,
        }
    }

    /// What gatehouse's client would write upstream for this request.
    fn upstream_bytes(&self) -> Vec<u8> {
        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(self.target.as_str());
        for (name, value) in &self.headers {
            req = req.header(name, value.as_slice());
        }
        if let Some(host) = &self.host {
            req = req.header(HOST, host);
        }
        let (parts, ()) = req.body(()).unwrap().into_parts();
        let peer = HeaderValue::from_static("10.0.0.1");
        let proto = HeaderValue::from_static("http");
        let forwarded = Forwarded {
            peer: &peer,
            proto: &proto,
            host: self.host.as_ref(),
            traceparent: None,
        };
        let body = self.body.clone().unwrap_or_default();
        let framing = if body.is_empty() {
            Framing::Empty
        } else {
            Framing::Length(body.len() as u64)
        };
        let mut out = Vec::new();
        super::request::encode(&parts, framing, &forwarded, None, &mut out);
        out.extend_from_slice(&body);
        out
    }
}

/// The scripted answer to a request, by its path (a body that could not be read is
/// answered 400, as the proxy does).
fn answer(seen: &Seen, path: &str, upgrade: bool) -> Response<TestBody> {
    let (status, body) = match path {
        _ if seen.body.is_none() => (StatusCode::BAD_REQUEST, TestBody::Full(None)),
        "/204" => (StatusCode::NO_CONTENT, TestBody::Full(Some("x".into()))),
        "/304" => (StatusCode::NOT_MODIFIED, TestBody::Full(None)),
        "/stream" => (
            StatusCode::OK,
            TestBody::Stream(vec!["part one, ".into(), "part two".into()]),
        ),
        "/ws" if upgrade => {
            let (ours, theirs) = tokio::io::duplex(1024);
            // The "app" side of the tunnel echoes what it gets.
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(theirs);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
            (
                StatusCode::SWITCHING_PROTOCOLS,
                TestBody::Upgrade(Some(ours)),
            )
        }
        _ => (StatusCode::OK, TestBody::Full(Some("ok".into()))),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let h = resp.headers_mut();
        h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    }
    resp
}

enum TestBody {
    Full(Option<Bytes>),
    Stream(Vec<Bytes>),
    Upgrade(Option<DuplexStream>),
}

impl HttpBody for TestBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let next = match self.get_mut() {
            TestBody::Full(bytes) => bytes.take(),
            TestBody::Stream(parts) => (!parts.is_empty()).then(|| parts.remove(0)),
            TestBody::Upgrade(_) => None,
        };
        Poll::Ready(next.map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        match self {
            TestBody::Full(bytes) => bytes.is_none(),
            TestBody::Stream(parts) => parts.is_empty(),
            TestBody::Upgrade(_) => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            TestBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            _ => SizeHint::default(),
        }
    }
}

impl Served for TestBody {
    type Upgraded = DuplexStream;

    fn take_upgrade(&mut self) -> Option<DuplexStream> {
        match self {
            TestBody::Upgrade(io) => io.take(),
            _ => None,
        }
    }

    fn tunnel_closed(&mut self, _: u64, _: u64) {}
}

struct NoPhases;

impl Phases for NoPhases {
    fn idle(&self) {}
    fn head(&self) {}
    fn busy(&self, _: bool) {}
    fn refusal(&self, invalid: super::request::Invalid) -> Response<Bytes> {
        let mut answer = Response::new(Bytes::from_static(invalid.message.as_bytes()));
        *answer.status_mut() = invalid.status;
        answer
    }
}

type Record = Arc<Mutex<Vec<Seen>>>;

/// What one server made of the client's bytes.
#[derive(Debug)]
struct Outcome {
    seen: Vec<Seen>,
    /// Statuses of the responses the client got, in order (interim ones included).
    statuses: Vec<u16>,
    bodies: Vec<Bytes>,
    /// What came back after a `101`.
    tunnelled: Bytes,
}

impl Outcome {
    /// What the client read (`got`, answers to `methods`) and what the app saw.
    fn of(got: BytesMut, methods: &[Method], record: &Record) -> Outcome {
        let (statuses, bodies, tunnelled) = responses(got, methods);
        let seen = std::mem::take(&mut *record.lock().unwrap());
        Outcome {
            seen,
            statuses,
            bodies,
            tunnelled,
        }
    }
}

/// Writes `bytes` (then, after a `101`, `after`) as a client and reads until the server
/// closes.
async fn client(mut io: DuplexStream, bytes: &[u8], after: &[u8]) -> BytesMut {
    io.write_all(bytes).await.unwrap();
    let mut got = BytesMut::new();
    loop {
        let read = tokio::time::timeout(Duration::from_secs(5), io.read_buf(&mut got)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(_)) => {}
            Err(_) => panic!(
                "the server neither answered nor closed: {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
        if !after.is_empty() && got.windows(4).any(|w| w == b"\r\n\r\n") {
            io.write_all(after).await.unwrap();
            // The echo comes back, then the client is done with the tunnel.
            let mut echo = vec![0u8; after.len()];
            io.read_exact(&mut echo).await.unwrap();
            got.extend_from_slice(&echo);
            return got;
        }
    }
}

/// Reads the responses in `bytes`, answering requests with `methods` in order.
fn responses(mut bytes: BytesMut, methods: &[Method]) -> (Vec<u16>, Vec<Bytes>, Bytes) {
    let (mut statuses, mut bodies) = (Vec::new(), Vec::new());
    let mut answered = 0;
    loop {
        let method = methods.get(answered).cloned().unwrap_or(Method::GET);
        let Ok(Some(head)) = super::response::parse(&mut bytes, &method) else {
            return (statuses, bodies, bytes.freeze());
        };
        let status = head.parts.status;
        statuses.push(status.as_u16());
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return (statuses, bodies, bytes.freeze());
        }
        if status.is_informational() {
            continue;
        }
        answered += 1;
        let body = match head.framing {
            Framing::Empty => Bytes::new(),
            Framing::Length(n) => bytes.split_to(n as usize).freeze(),
            Framing::UntilClose => bytes.split().freeze(),
            Framing::Chunked => {
                let mut decoder = super::chunked::Chunked::Size;
                let (mut body, mut trailers) = (Vec::new(), None);
                loop {
                    match decoder.decode(&mut bytes, &mut trailers).unwrap() {
                        super::chunked::Decoded::Data(d) => body.extend_from_slice(&d),
                        super::chunked::Decoded::End => break,
                        super::chunked::Decoded::Trailers(_) => {}
                        super::chunked::Decoded::NeedMore => panic!("a cut-short chunked body"),
                    }
                }
                body.into()
            }
        };
        bodies.push(body);
    }
}

async fn through_gatehouse(bytes: &[u8], after: &[u8], methods: &[Method]) -> Outcome {
    let (client_io, mut server_io) = tokio::io::duplex(64 << 10);
    let record = Record::default();
    let server = {
        let record = record.clone();
        tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let settings = downstream::Settings {
                max_head: 64 << 10,
                h2c: false,
            };
            let call = |req: Request<downstream::Body>, upgrade: Option<HeaderValue>| {
                let record = record.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let seen = Seen::read(&parts, body).await;
                    let resp = answer(&seen, parts.uri.path(), upgrade.is_some());
                    record.lock().unwrap().push(seen);
                    resp
                }
            };
            downstream::serve(&mut server_io, &mut buf, &settings, &NoPhases, call, || {
                false
            })
            .await
        })
    };
    let got = client(client_io, bytes, after).await;
    server.abort();
    Outcome::of(got, methods, &record)
}

async fn through_hyper(bytes: &[u8], after: &[u8], methods: &[Method]) -> Outcome {
    let (client_io, server_io) = tokio::io::duplex(64 << 10);
    let record = Record::default();
    let service = {
        let record = record.clone();
        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let record = record.clone();
            async move {
                let (mut parts, body) = req.into_parts();
                let upgrade = parts.headers.contains_key(UPGRADE)
                    && parts
                        .headers
                        .get_all(CONNECTION)
                        .iter()
                        .any(|v| super::has_token(v, "upgrade"));
                let on_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
                let seen = Seen::read(&parts, body).await;
                let mut resp = answer(&seen, parts.uri.path(), upgrade);
                record.lock().unwrap().push(seen);
                if let (Some(io), Some(on_upgrade)) = (resp.body_mut().take_upgrade(), on_upgrade) {
                    tokio::spawn(async move {
                        if let Ok(upgraded) = on_upgrade.await {
                            let mut client = TokioIo::new(upgraded);
                            let mut app = io;
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut app).await;
                        }
                    });
                }
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let server = tokio::spawn(
        hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server_io), service)
            .with_upgrades(),
    );
    let got = client(client_io, bytes, after).await;
    server.abort();
    Outcome::of(got, methods, &record)
}

/// One case: the client's bytes, the methods of the requests answered, bytes sent after a
/// `101`, and how gatehouse and hyper differ, if they do.
struct Case {
    name: &'static str,
    bytes: &'static [u8],
    methods: &'static [Method],
    after: &'static [u8],
    /// `Some((gatehouse, hyper, why))`: the statuses each side answers with, when
    /// gatehouse is deliberately stricter.
    differs: Option<(&'static [u16], &'static [u16], &'static str)>,
}

const fn case(name: &'static str, bytes: &'static [u8]) -> Case {
    Case {
        name,
        bytes,
        methods: &[],
        after: b"",
        differs: None,
    }
}

const CASES: &[Case] = &[
    case("a GET", b"GET /a?b=1 HTTP/1.1\r\nHost: app\r\nAccept: */*\r\nConnection: close\r\n\r\n"),
    case(
        "pipelined requests with bodies between them",
        b"GET /1 HTTP/1.1\r\nHost: app\r\n\r\n\
          POST /2 HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello\
          PUT /3 HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\n\r\n\
          GET /4 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
    ),
    case(
        "a chunked body with trailers",
        b"POST /t HTTP/1.1\r\nHost: app\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          5\r\nhello\r\n6\r\n world\r\n0\r\nx-digest: abc\r\n\r\n",
    ),
    case("an equal repeated content-length", b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 2, 2\r\nConnection: close\r\n\r\nok"),
    case("conflicting content-lengths", b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk"),
    case("a content-length that is not a number", b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: +2\r\n\r\nok"),
    Case {
        methods: &[Method::HEAD, Method::GET],
        ..case(
            "HEAD, then a GET on the same connection",
            b"HEAD /h HTTP/1.1\r\nHost: app\r\n\r\nGET /g HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
        )
    },
    case(
        "bodiless statuses and a streamed body",
        b"GET /204 HTTP/1.1\r\nHost: app\r\n\r\nGET /304 HTTP/1.1\r\nHost: app\r\n\r\n\
          GET /stream HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
    ),
    case("HTTP/1.0 without Host", b"GET /old HTTP/1.0\r\n\r\n"),
    case(
        "HTTP/1.0 keep-alive, then a close",
        b"GET /1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.0\r\n\r\n",
    ),
    case(
        "a client's Connection header naming its own hop-by-hop headers",
        b"GET / HTTP/1.1\r\nHost: app\r\nConnection: x-hop, close\r\nx-hop: 1\r\nKeep-Alive: 5\r\n\
          Proxy-Authorization: x\r\nx-end: 2\r\n\r\n",
    ),
    case(
        "Expect: 100-continue",
        b"POST /e HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\nExpect: 100-continue\r\nConnection: close\r\n\r\nbody",
    ),
    Case {
        after: b"ping",
        ..case(
            "a WebSocket upgrade and its tunnel",
            b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
    },
    case(
        "an absolute-form target",
        b"GET http://app.example:8080/p?q=1 HTTP/1.1\r\nHost: app.example:8080\r\nConnection: close\r\n\r\n",
    ),
    case("obs-fold", b"GET / HTTP/1.1\r\nHost: app\r\nX-Folded: a\r\n b\r\n\r\n"),
    case("whitespace before the colon", b"GET / HTTP/1.1\r\nHost : app\r\n\r\n"),
    case("a space in the target", b"GET /a b HTTP/1.1\r\nHost: app\r\n\r\n"),
    case("a bad method", b"G(T / HTTP/1.1\r\nHost: app\r\n\r\n"),
    Case {
        differs: Some((
            &[400],
            &[200],
            "RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without Host",
        )),
        ..case("HTTP/1.1 without Host", b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    },
    Case {
        differs: Some((
            &[400],
            &[200],
            "RFC 9112 §3.2: more than one Host MUST get 400 (the app and gatehouse could disagree)",
        )),
        ..case("two Host headers", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n")
    },
    Case {
        differs: Some((
            &[400],
            &[200],
            "RFC 9112 §6.3 lets a server refuse both framings at once: a smuggling attempt",
        )),
        ..case(
            "Content-Length with Transfer-Encoding",
            b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
        )
    },
    Case {
        differs: Some((
            &[501],
            &[200],
            "hyper decodes the chunked coding and passes gzip bytes on as plain; gatehouse will not re-label a body (nginx answers 501 too)",
        )),
        ..case(
            "gzip, chunked",
            b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
        )
    },
    case(
        "a space before a chunk size",
        b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n 3\r\nabc\r\n0\r\n\r\n",
    ),
    case(
        "chunk data longer than its size",
        b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabcd\r\n0\r\n\r\n",
    ),
    case(
        "a bare LF after a chunk size",
        b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\nabc\r\n0\r\n\r\n",
    ),
];

#[tokio::test]
async fn gatehouse_and_hyper_read_the_same_requests_and_answer_alike() {
    let mut failures = Vec::new();
    for case in CASES {
        let ours = through_gatehouse(case.bytes, case.after, case.methods).await;
        let theirs = through_hyper(case.bytes, case.after, case.methods).await;
        // `100 Continue` is the server's to send or omit when the body is already there
        // (RFC 9110 §10.1.1): hyper always sends it, gatehouse only when it must wait.
        let final_statuses = |o: &Outcome| -> Vec<u16> {
            o.statuses.iter().copied().filter(|s| *s != 100).collect()
        };
        // The service's answers must match; a refusal's body is each server's own.
        let served_bodies = |o: &Outcome| -> Vec<Bytes> {
            o.bodies
                .iter()
                .zip(final_statuses(o))
                .filter(|(_, s)| *s < 400)
                .map(|(b, _)| b.clone())
                .collect()
        };
        if let Some((gatehouse, hyper, why)) = case.differs {
            if final_statuses(&ours) != gatehouse || final_statuses(&theirs) != hyper {
                failures.push(format!(
                    "{}: expected gatehouse {gatehouse:?} and hyper {hyper:?} ({why}), got {:?} and {:?}",
                    case.name, ours.statuses, theirs.statuses
                ));
            }
            continue;
        }
        let mut problems = Vec::new();
        if final_statuses(&ours) != final_statuses(&theirs) {
            problems.push(format!(
                "statuses {:?} vs {:?}",
                ours.statuses, theirs.statuses
            ));
        }
        if served_bodies(&ours) != served_bodies(&theirs) {
            problems.push(format!("bodies {:?} vs {:?}", ours.bodies, theirs.bodies));
        }
        if ours.tunnelled != theirs.tunnelled {
            problems.push(format!(
                "tunnel {:?} vs {:?}",
                ours.tunnelled, theirs.tunnelled
            ));
        }
        if ours.seen != theirs.seen {
            problems.push(format!("requests {:#?} vs {:#?}", ours.seen, theirs.seen));
        }
        let upstream =
            |o: &Outcome| -> Vec<Vec<u8>> { o.seen.iter().map(Seen::upstream_bytes).collect() };
        if upstream(&ours) != upstream(&theirs) {
            problems.push("different bytes upstream".into());
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}", case.name, problems.join("; ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
