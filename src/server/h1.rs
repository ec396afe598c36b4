//! gatehouse's own HTTP/1.1 server for the request a proxy sees most: HTTP/1.1 without a
//! body or an upgrade. Its head is parsed straight from the connection's buffer, and its
//! response goes out in one write, with no per-request buffer and no connection task.
//!
//! Anything else (a body, an upgrade, HTTP/1.0, the h2c preface, a malformed or very large
//! head) hands the connection, with the bytes read so far, to hyper, which serves it from
//! then on: the rare cases keep hyper's well-trodden handling, including its error replies.

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING, UPGRADE};
use http::{response, HeaderMap, Method, Request, Response, StatusCode};
use http::{Uri, Version};
use http_body::{Body as HttpBody, Frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::proxy::h1::{
    encode_chunk_size, has_token, header_line, parse_length, shared_header, CHAIN_HEADERS,
    LAST_CHUNK,
};
use crate::proxy::ClientBody;

/// Heads that have not ended within this many bytes go to hyper, which applies
/// `server.max_header_bytes` to them; real request heads are far smaller.
const MAX_HEAD: usize = 8 << 10;
/// Free room asked of the buffer before each read.
const READ_ROOM: usize = 4 << 10;
/// As many header lines as hyper takes.
const MAX_HEADERS: usize = 100;
/// Response bytes gathered before a write: a head and a small body go out together.
const WRITE_BATCH: usize = 16 << 10;
/// The most of its write buffer a connection keeps between responses, so idle keep-alive
/// connections hold little after a large response.
const WRITE_KEEP: usize = 4 << 10;

/// How the fast path left the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done with: the client left, asked to close, broke off, or the server drains.
    Closed,
    /// hyper serves the rest; the buffer holds the bytes it must read first.
    HandOver,
}

/// Serves requests from `io` until the connection closes or a request needs hyper.
/// `call` answers one request; `draining` says whether the server is shutting down, so a
/// response can announce the close.
pub async fn serve<S, F, Fut, B>(
    io: &mut S,
    buf: &mut BytesMut,
    mut call: F,
    draining: impl Fn() -> bool,
) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Request<ClientBody>) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: HttpBody<Data = Bytes, Error = io::Error> + Unpin,
{
    let mut out = Vec::new();
    loop {
        let (req, asked_close) = match read_head(io, buf).await {
            Ok(head) => head,
            Err(outcome) => return outcome,
        };
        let head_only = req.method() == Method::HEAD;
        // hyper's rule: a client that hangs up before its answer abandons the request.
        // Pinned where it is made: the request's future is large, and moving it costs.
        let answer = pin!(call(req));
        let Some(resp) = until_client_gone(io, buf, answer).await else {
            return Outcome::Closed;
        };
        // A 101 the client did not ask for leaves nothing to talk on afterwards.
        let close = asked_close || resp.status() == StatusCode::SWITCHING_PROTOCOLS || draining();
        let written = write_response(io, buf, &mut out, resp, head_only, close).await;
        if written.is_err() || close {
            return Outcome::Closed;
        }
        if out.capacity() > WRITE_KEEP {
            out = Vec::new();
        }
    }
}

/// The next request for the fast path, and whether the client asked to close after it.
async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
) -> Result<(Request<ClientBody>, bool), Outcome> {
    loop {
        if !buf.is_empty() {
            match parse(buf) {
                Ok(head) => return Ok(head),
                Err(Miss::Partial) if buf.len() < MAX_HEAD => {}
                Err(_) => return Err(Outcome::HandOver),
            }
        }
        // Room is reclaimed in place: the previous request's head is gone by now.
        buf.reserve(READ_ROOM);
        match io.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(Outcome::Closed),
            Ok(_) => {}
        }
    }
}

/// Why a buffer holds no request for the fast path.
#[derive(Debug)]
enum Miss {
    /// The head has not ended yet.
    Partial,
    /// Not for the fast path: hyper serves it.
    Other,
}

/// Parses the request head at the start of `buf`, removing it on success. The header
/// values and the URI share the head's bytes instead of a copy each.
fn parse(buf: &mut BytesMut) -> Result<(Request<ClientBody>, bool), Miss> {
    let all = buf.split().freeze();
    match parse_frozen(&all) {
        Ok((req, close, len)) => {
            // A pipelined request behind this one waits in the buffer (a rare copy).
            buf.extend_from_slice(&all[len..]);
            Ok((req, close))
        }
        Err(why) => {
            // Put the bytes back in front of the buffer's free room.
            let mut whole = BytesMut::from(all);
            whole.unsplit(std::mem::take(buf));
            *buf = whole;
            Err(why)
        }
    }
}

fn parse_frozen(all: &Bytes) -> Result<(Request<ClientBody>, bool, usize), Miss> {
    // Uninitialised slots: filling a hundred empty headers would cost more than the parse.
    let mut slots = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut head, all, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Err(Miss::Partial),
        Err(_) => return Err(Miss::Other),
    };
    if head.version != Some(1) {
        return Err(Miss::Other);
    }
    let method =
        Method::from_bytes(head.method.unwrap_or("").as_bytes()).map_err(|_| Miss::Other)?;
    if method == Method::CONNECT {
        return Err(Miss::Other);
    }
    let path = head.path.unwrap_or("").as_bytes();
    let uri = Uri::from_maybe_shared(all.slice_ref(path)).map_err(|_| Miss::Other)?;
    let mut headers = HeaderMap::with_capacity(head.headers.len() + CHAIN_HEADERS);
    let mut close = false;
    for h in head.headers.iter() {
        let (name, value) = shared_header(h.name.as_bytes(), h.value, |v| all.slice_ref(v))
            .map_err(|_| Miss::Other)?;
        if (name == CONTENT_LENGTH && value != "0") || name == TRANSFER_ENCODING || name == UPGRADE
        {
            return Err(Miss::Other);
        }
        if name == CONNECTION {
            close |= has_token(&value, "close");
        }
        headers.append(name, value);
    }
    let mut req = Request::new(None);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Ok((req, close, len))
}

/// Runs `fut` while watching the otherwise idle client socket: end of stream or an error
/// means the client left, and `None` abandons `fut`. Bytes that arrive meanwhile (a
/// pipelined request) stay in `buf`, and the watch stops there, as hyper's does.
async fn until_client_gone<S, F>(
    io: &mut S,
    buf: &mut BytesMut,
    mut fut: Pin<&mut F>,
) -> Option<F::Output>
where
    S: AsyncRead + Unpin,
    F: Future,
{
    poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if client_gone(io, buf, cx) {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

fn client_gone<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut, cx: &mut Context) -> bool {
    if !buf.is_empty() {
        return false;
    }
    matches!(
        tokio_util::io::poll_read_buf(Pin::new(io), cx, buf),
        Poll::Ready(Ok(0) | Err(_))
    )
}

/// How the response body goes on the wire.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// No body bytes (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
}

/// Writes the response, streaming its body. The body is dropped (ending the request for
/// metrics and audit) only after its last byte was handed to the socket.
async fn write_response<S, B>(
    io: &mut S,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    resp: Response<B>,
    head_only: bool,
    close: bool,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: HttpBody<Data = Bytes, Error = io::Error> + Unpin,
{
    let (parts, mut body) = resp.into_parts();
    out.clear();
    let framing = encode_head(out, &parts, head_only, body.size_hint().exact(), close);
    // Its header values may pin the upstream's read buffer: let go before streaming.
    drop(parts);
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    while framing != Framing::None && !body.is_end_stream() {
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                // Nothing more yet (a slow stream): what is gathered goes out meanwhile.
                flush(io, out).await?;
                let next = pin!(poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)));
                until_client_gone(io, buf, next)
                    .await
                    .ok_or(io::ErrorKind::ConnectionAborted)?
            }
        };
        let Some(data) = frame.transpose()?.map(Frame::into_data) else {
            break;
        };
        // Trailers have no place in this framing and are dropped, as hyper does.
        let Ok(data) = data else { continue };
        if data.is_empty() {
            continue;
        }
        left = left
            .checked_sub(data.len() as u64)
            .ok_or_else(|| io::Error::other("response body longer than its content-length"))?;
        if framing == Framing::Chunked {
            encode_chunk_size(data.len(), out);
        }
        if out.len() + data.len() <= WRITE_BATCH {
            out.extend_from_slice(&data);
        } else {
            flush(io, out).await?;
            io.write_all(&data).await?;
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"\r\n");
        }
        if out.len() >= WRITE_BATCH {
            flush(io, out).await?;
        }
    }
    match framing {
        Framing::Chunked => out.extend_from_slice(LAST_CHUNK),
        // A body that ends short would leave the client waiting: the connection closes.
        Framing::Length(_) if left != 0 => {
            flush(io, out).await?;
            return Err(io::Error::other(
                "response body shorter than its content-length",
            ));
        }
        _ => {}
    }
    flush(io, out).await?;
    io.flush().await?;
    drop(body);
    Ok(())
}

async fn flush<S: AsyncWrite + Unpin>(io: &mut S, out: &mut Vec<u8>) -> io::Result<()> {
    if !out.is_empty() {
        io.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// Writes the status line and headers, adding the framing, `connection: close` and
/// `date` as hyper would, and returns the body's framing. `exact` is the body's length
/// when known.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &response::Parts,
    head_only: bool,
    exact: Option<u64>,
    close: bool,
) -> Framing {
    let status = parts.status;
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut length = None;
    let (mut has_date, mut has_close) = (false, false);
    for (name, value) in &parts.headers {
        if name == CONTENT_LENGTH {
            // The first valid one frames the body; the others would contradict it.
            if length.is_some() {
                continue;
            }
            match parse_length(value.as_bytes().trim_ascii()) {
                Some(n) => length = Some(n),
                None => continue,
            }
        } else if name == TRANSFER_ENCODING {
            // The framing is this hop's own, decided below.
            continue;
        } else if name == DATE {
            has_date = true;
        } else if name == CONNECTION {
            has_close |= has_token(value, "close");
        }
        header_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let no_length = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // The length to declare, when the headers did not: a HEAD answer states the length a
    // GET would get, but never an implicit 0.
    let (framing, declare) = if no_length || head_only {
        let head_length = exact.filter(|&n| head_only && !no_length && length.is_none() && n > 0);
        (Framing::None, head_length)
    } else {
        match (length, exact) {
            (Some(n), _) => (Framing::Length(n), None),
            (None, Some(n)) => (Framing::Length(n), Some(n)),
            (None, None) => {
                header_line(out, b"transfer-encoding", b"chunked");
                (Framing::Chunked, None)
            }
        }
    };
    if let Some(n) = declare {
        header_line(
            out,
            b"content-length",
            itoa::Buffer::new().format(n).as_bytes(),
        );
    }
    if close && !has_close {
        header_line(out, b"connection", b"close");
    }
    if !has_date {
        header_line(out, b"date", &http_date());
    }
    out.extend_from_slice(b"\r\n");
    framing
}

/// An IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT").
const DATE_LEN: usize = 29;

thread_local! {
    /// The second `http_date` last formatted, and its text.
    static DATE_CACHE: Cell<(u64, [u8; DATE_LEN])> = const { Cell::new((u64::MAX, [0; DATE_LEN])) };
}

/// The current second as an IMF-fixdate, formatted once per second per worker.
fn http_date() -> [u8; DATE_LEN] {
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (cached, mut text) = DATE_CACHE.get();
    if cached != second {
        text.copy_from_slice(httpdate::fmt_http_date(now).as_bytes());
        DATE_CACHE.set((second, text));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::Body;
    use http::{HeaderName, HeaderValue};
    use tokio::io::DuplexStream;

    /// Runs the fast path on one end of an in-memory pipe, answering every request with
    /// its URI as the body; returns the client's end and the server's outcome.
    fn start(draining: bool) -> (DuplexStream, tokio::task::JoinHandle<(Outcome, BytesMut)>) {
        let (client, mut server) = tokio::io::duplex(64 << 10);
        let task = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let call = |req: Request<ClientBody>| async move {
                Response::new(Body::full(Bytes::from(req.uri().to_string())))
            };
            let outcome = serve(&mut server, &mut buf, call, move || draining).await;
            (outcome, buf)
        });
        (client, task)
    }

    async fn read_all(client: &mut DuplexStream) -> String {
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_until_the_client_asks_to_close() {
        let (mut client, task) = start(false);
        client
            .write_all(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /two HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let text = read_all(&mut client).await;
        let (one, two) = text.split_once("/one").expect("first answer");
        assert!(
            one.starts_with("HTTP/1.1 200 OK\r\n") && one.contains("content-length: 4\r\n"),
            "{text}"
        );
        assert!(!one.contains("connection"), "{text}");
        assert!(
            two.contains("connection: close\r\n") && two.ends_with("\r\n\r\n/two"),
            "{text}"
        );
        assert_eq!(task.await.unwrap().0, Outcome::Closed);
    }

    #[tokio::test]
    async fn a_draining_server_announces_the_close() {
        let (mut client, task) = start(true);
        client
            .write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let text = read_all(&mut client).await;
        assert!(
            text.contains("connection: close\r\n") && text.ends_with("/x"),
            "{text}"
        );
        assert_eq!(task.await.unwrap().0, Outcome::Closed);
    }

    #[tokio::test]
    async fn a_request_for_hyper_is_handed_over_with_its_bytes() {
        let (mut client, task) = start(false);
        let post = b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx";
        client
            .write_all(b"GET /g HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        client.write_all(post).await.unwrap();
        let (outcome, buf) = task.await.unwrap();
        assert_eq!(outcome, Outcome::HandOver);
        assert_eq!(&buf[..], post);
    }

    #[tokio::test]
    async fn a_client_that_hangs_up_abandons_its_request() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let mut started_tx = Some(started_tx);
        let task = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let call = |_req: Request<ClientBody>| {
                let started = started_tx.take();
                async move {
                    let _ = started.map(|s| s.send(()));
                    // An upstream that never answers.
                    std::future::pending::<Response<Body>>().await
                }
            };
            serve(&mut server, &mut buf, call, || false).await
        });
        client
            .write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        started_rx.await.expect("the request reached the service");
        drop(client);
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(10), task).await;
        assert_eq!(outcome.expect("serve returned").unwrap(), Outcome::Closed);
    }

    /// A body of unknown length, in the given pieces.
    struct Pieces(Vec<&'static str>);

    impl HttpBody for Pieces {
        type Data = Bytes;
        type Error = io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
            let next = (!self.0.is_empty()).then(|| self.0.remove(0));
            Poll::Ready(next.map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes())))))
        }
    }

    #[tokio::test]
    async fn bodies_of_unknown_length_are_chunked_and_short_ones_close_the_connection() {
        for (declared, expect_closed) in [(None, false), (Some("10"), true)] {
            let (mut client, mut server) = tokio::io::duplex(4096);
            let task = tokio::spawn(async move {
                let mut buf = BytesMut::new();
                let call = |_req: Request<ClientBody>| async move {
                    let mut resp = Response::new(Pieces(vec!["ab", "", "cd"]));
                    if let Some(len) = declared {
                        resp.headers_mut()
                            .insert(CONTENT_LENGTH, HeaderValue::from_static(len));
                    }
                    resp
                };
                serve(&mut server, &mut buf, call, || false).await
            });
            client
                .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                .await
                .unwrap();
            if expect_closed {
                // 4 of the 10 bytes promised: the connection ends instead of hanging.
                let text = read_all(&mut client).await;
                assert!(text.ends_with("\r\n\r\nabcd"), "{text}");
                assert_eq!(task.await.unwrap(), Outcome::Closed);
            } else {
                let mut text = String::new();
                while !text.ends_with("0\r\n\r\n") {
                    let mut piece = vec![0; 1024];
                    let n = client.read(&mut piece).await.unwrap();
                    assert!(n > 0, "closed early: {text}");
                    text.push_str(&String::from_utf8_lossy(&piece[..n]));
                }
                assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
                assert!(
                    text.ends_with("\r\n\r\n2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n"),
                    "{text}"
                );
                drop(client);
                assert_eq!(task.await.unwrap(), Outcome::Closed);
            }
        }
    }

    fn parse_str(text: &str) -> (Result<(Request<ClientBody>, bool), Miss>, BytesMut) {
        let mut buf = BytesMut::from(text.as_bytes());
        let parsed = parse(&mut buf);
        (parsed, buf)
    }

    #[test]
    fn a_plain_get_is_parsed_and_removed_from_the_buffer() {
        let (parsed, buf) = parse_str(
            "GET /a/b?q=1 HTTP/1.1\r\nHost: example.com\r\nX-Two: 1\r\nX-Two: 2\r\n\r\nGET /next",
        );
        let (req, close) = parsed.expect("parsed");
        assert!(!close);
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri(), "/a/b?q=1");
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.headers()["host"], "example.com");
        assert_eq!(req.headers().get_all("x-two").iter().count(), 2);
        assert!(req.body().is_none());
        assert_eq!(&buf[..], b"GET /next", "the pipelined bytes stay");
    }

    #[test]
    fn connection_close_is_seen() {
        let (parsed, _) =
            parse_str("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(matches!(parsed, Ok((_, true))));
    }

    #[test]
    fn a_partial_head_stays_in_the_buffer() {
        let text = "GET / HTTP/1.1\r\nHost: a\r\n";
        let (parsed, buf) = parse_str(text);
        assert!(matches!(parsed, Err(Miss::Partial)));
        assert_eq!(&buf[..], text.as_bytes());
    }

    #[test]
    fn requests_for_hyper_are_handed_over_untouched() {
        for text in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "\x16\x03\x01 garbage",
        ] {
            let (parsed, buf) = parse_str(text);
            assert!(matches!(parsed, Err(Miss::Other)), "{text:?}");
            assert_eq!(&buf[..], text.as_bytes(), "{text:?}");
        }
    }

    #[test]
    fn an_empty_content_length_is_a_bodiless_request() {
        let (parsed, _) = parse_str("DELETE /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n");
        assert!(parsed.is_ok());
    }

    fn head(
        status: u16,
        headers: &[(&str, &str)],
        head_only: bool,
        exact: Option<u64>,
        close: bool,
    ) -> (String, Framing) {
        let mut resp = Response::new(());
        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
        for (n, v) in headers {
            resp.headers_mut().append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let mut out = Vec::new();
        let framing = encode_head(&mut out, &resp.into_parts().0, head_only, exact, close);
        (String::from_utf8(out).unwrap(), framing)
    }

    #[test]
    fn a_known_length_is_written() {
        let (text, framing) = head(200, &[("date", "x"), ("x-a", "1")], false, Some(12), false);
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ndate: x\r\nx-a: 1\r\ncontent-length: 12\r\n\r\n"
        );
        assert_eq!(framing, Framing::Length(12));
    }

    #[test]
    fn the_header_length_frames_the_body() {
        let (text, framing) = head(
            404,
            &[("date", "x"), ("content-length", "3")],
            false,
            None,
            false,
        );
        assert_eq!(
            text,
            "HTTP/1.1 404 Not Found\r\ndate: x\r\ncontent-length: 3\r\n\r\n"
        );
        assert_eq!(framing, Framing::Length(3));
    }

    #[test]
    fn an_unknown_length_is_chunked() {
        let (text, framing) = head(
            200,
            &[("date", "x"), ("transfer-encoding", "chunked")],
            false,
            None,
            true,
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ndate: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(framing, Framing::Chunked);
    }

    #[test]
    fn bodiless_responses_get_no_framing() {
        for (status, head_only) in [(204, false), (304, false), (200, true)] {
            let (text, framing) = head(status, &[("date", "x")], head_only, Some(0), false);
            assert!(!text.contains("content-length"), "{text}");
            assert!(!text.contains("transfer-encoding"), "{text}");
            assert_eq!(framing, Framing::None);
        }
        // A HEAD keeps the length the GET would have.
        let (text, framing) = head(
            200,
            &[("date", "x"), ("content-length", "99")],
            true,
            Some(0),
            false,
        );
        assert!(text.contains("content-length: 99\r\n"), "{text}");
        assert_eq!(framing, Framing::None);
    }

    #[test]
    fn a_date_is_added_once() {
        let (text, _) = head(502, &[], false, Some(0), false);
        let date = text
            .lines()
            .find_map(|l| l.strip_prefix("date: "))
            .expect("a date header");
        assert!(httpdate::parse_http_date(date).is_ok(), "{date}");
        assert!(text.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{text}");
        assert!(text.contains("content-length: 0\r\n"), "{text}");
    }

    #[test]
    fn a_requested_close_is_not_announced_twice() {
        let (text, _) = head(
            503,
            &[("date", "x"), ("connection", "close")],
            false,
            Some(0),
            true,
        );
        assert_eq!(text.matches("connection").count(), 1, "{text}");
    }
}
