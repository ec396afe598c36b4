//! gatehouse's own HTTP/1.1 server for the request a proxy sees most: HTTP/1.1 without a
//! body or an upgrade. Its head is parsed straight from the connection's buffer, and its
//! response goes out in one write, with no per-request buffer and no connection task.
//!
//! Anything else (a body, an upgrade, HTTP/1.0, the h2c preface, a malformed or very large
//! head) hands the connection, with the bytes read so far, to hyper, which serves it from
//! then on: the rare cases keep hyper's well-trodden handling, including its error replies.

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING, UPGRADE};
use http::{response, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http::{Uri, Version};
use http_body::{Body as HttpBody, Frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::proxy::h1::{has_token, parse_length, CHAIN_HEADERS};
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
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| Miss::Other)?;
        let value = if h.value.is_empty() {
            HeaderValue::from_static("")
        } else {
            HeaderValue::from_maybe_shared(all.slice_ref(h.value)).map_err(|_| Miss::Other)?
        };
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
            write!(out, "{:x}\r\n", data.len())?;
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
        Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
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
        push_header(out, name.as_str(), value.as_bytes());
    }
    let no_length = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if no_length || head_only {
        // A HEAD answer states the length a GET would get, but never an implicit 0.
        if let (true, None, Some(n @ 1..)) = (head_only && !no_length, length, exact) {
            push_header(
                out,
                "content-length",
                itoa::Buffer::new().format(n).as_bytes(),
            );
        }
        Framing::None
    } else {
        match (length, exact) {
            (Some(n), _) => Framing::Length(n),
            (None, Some(n)) => {
                push_header(
                    out,
                    "content-length",
                    itoa::Buffer::new().format(n).as_bytes(),
                );
                Framing::Length(n)
            }
            (None, None) => {
                push_header(out, "transfer-encoding", b"chunked");
                Framing::Chunked
            }
        }
    };
    if close && !has_close {
        push_header(out, "connection", b"close");
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        push_date(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// An IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT").
const DATE_LEN: usize = 29;

thread_local! {
    /// The `date` value of the current second, formatted once per second per worker.
    static DATE_CACHE: Cell<(u64, [u8; DATE_LEN])> = const { Cell::new((u64::MAX, [0; DATE_LEN])) };
}

fn push_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (cached, mut text) = DATE_CACHE.get();
    if cached != second {
        text.copy_from_slice(httpdate::fmt_http_date(now).as_bytes());
        DATE_CACHE.set((second, text));
    }
    out.extend_from_slice(&text);
}

#[cfg(test)]
mod tests {
    use super::*;

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
