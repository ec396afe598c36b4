//! The HTTP/1.1 wire format towards the upstream: request heads out, response heads in,
//! and body framing (RFC 9112 §6). Pure functions over buffers; `upstream.rs` does the IO.
//!
//! gatehouse speaks to its app with its own lean codec rather than a general-purpose
//! client: a request head is written straight from the incoming request's parts, the
//! response head is parsed once, and no channel or task stands between them.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING, UPGRADE};
use http::{request, response, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

use super::forwarded::{HOP_BY_HOP, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO};

/// The largest response head accepted from the upstream.
pub const MAX_HEAD: usize = 64 << 10;
const MAX_HEADERS: usize = 100;
/// Room for the headers middlewares add to a parsed message (a request id, rate-limit
/// headers, a timing header...): a full map would be regrown on the first insert, even
/// one that replaces.
pub const CHAIN_HEADERS: usize = 6;

/// How the request body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestFraming {
    None,
    Length(u64),
    Chunked,
}

/// The `x-forwarded-*` values for one request, written straight into its head: they
/// replace whatever the client sent under those names (x-forwarded-for is appended to).
pub struct Forwarded<'a> {
    /// The peer's address, formatted once per connection.
    pub peer: &'a HeaderValue,
    pub proto: &'a HeaderValue,
    pub host: Option<&'a HeaderValue>,
}

/// Writes the request head for `parts`, with framing headers that match `framing` (the
/// client's own `content-length` is replaced: the length hyper decoded is authoritative).
/// The `x-forwarded-*` headers come from `forwarded`.
pub fn encode_request(
    parts: &request::Parts,
    framing: RequestFraming,
    forwarded: &Forwarded,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut prior_for = false;
    for (name, value) in &parts.headers {
        if name == X_FORWARDED_FOR {
            prior_for = true;
            continue;
        }
        if name == CONTENT_LENGTH || name == X_FORWARDED_PROTO || name == X_FORWARDED_HOST {
            continue;
        }
        header_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if prior_for {
        for value in parts.headers.get_all(&X_FORWARDED_FOR) {
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(forwarded.peer.as_bytes());
    out.extend_from_slice(b"\r\n");
    header_line(out, b"x-forwarded-proto", forwarded.proto.as_bytes());
    if let Some(host) = forwarded.host {
        header_line(out, b"x-forwarded-host", host.as_bytes());
    }
    match framing {
        RequestFraming::Length(n) => header_line(
            out,
            b"content-length",
            itoa::Buffer::new().format(n).as_bytes(),
        ),
        RequestFraming::None
            if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) =>
        {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        RequestFraming::None => {}
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// One `name: value` line of a head, in either direction.
pub fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Frames one chunk of a chunked body.
pub fn encode_chunk(data: &[u8], out: &mut Vec<u8>) {
    encode_chunk_size(data.len(), out);
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The size line that opens a chunk of `len` bytes, for a writer that sends the data
/// itself (the chunk ends with a CRLF after it).
pub fn encode_chunk_size(mut len: usize, out: &mut Vec<u8>) {
    let mut hex = [0u8; 16];
    let mut i = hex.len();
    loop {
        i -= 1;
        hex[i] = b"0123456789abcdef"[len % 16];
        len /= 16;
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&hex[i..]);
    out.extend_from_slice(b"\r\n");
}

/// The end of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// How the response body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseFraming {
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub parts: response::Parts,
    pub framing: ResponseFraming,
    /// The connection may carry another request once this response has been read.
    pub keep_alive: bool,
}

/// Why the upstream's bytes are not an HTTP/1.1 response.
#[derive(Debug)]
pub struct InvalidResponse(pub &'static str);

/// A parsed header line as `http` types. The value is not copied: `share` gives the bytes
/// of the head that back it (an empty value needs none). `Err` names the part not valid.
pub fn shared_header(
    name: &[u8],
    value: &[u8],
    share: impl FnOnce(&[u8]) -> Bytes,
) -> Result<(HeaderName, HeaderValue), &'static str> {
    let name = HeaderName::from_bytes(name).map_err(|_| "invalid header name")?;
    let value = if value.is_empty() {
        HeaderValue::from_static("")
    } else {
        HeaderValue::from_maybe_shared(share(value)).map_err(|_| "invalid header value")?
    };
    Ok((name, value))
}

/// Parses a response head from the start of `buf`. `Ok(None)`: not complete yet.
/// On success, the head's bytes are removed from `buf`.
///
/// One pass over the header lines decides the framing and the connection's fate, and
/// leaves out hop-by-hop headers (RFC 9110 §7.6.1), which describe this hop only; a
/// `101` keeps `Connection` and `Upgrade` for the client. Header values share the head's
/// single copy of the head instead of one allocation each.
pub fn parse_response(
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Option<Head>, InvalidResponse> {
    // Uninitialised slots: filling a hundred empty headers cost more than parsing the head.
    let mut slots = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(InvalidResponse("response head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(InvalidResponse("too many response headers"))
        }
        Err(_) => return Err(InvalidResponse("malformed response head")),
    };
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(InvalidResponse("invalid status"))?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // One copy of the head backs every header value (instead of one allocation each),
    // and the read buffer stays unshared for the next read.
    let head = Bytes::copy_from_slice(&buf[..len]);
    let base = buf.as_ptr() as usize;

    let upgrade = status == StatusCode::SWITCHING_PROTOCOLS;
    let mut headers = HeaderMap::with_capacity(resp.headers.len() + CHAIN_HEADERS);
    let mut length: Option<u64> = None;
    let mut transfer_encoding: Option<bool> = None; // Some(last coding is chunked)
    let mut conn = ConnectionTokens::default();
    for h in resp.headers.iter() {
        let (name, value) = shared_header(h.name.as_bytes(), h.value, |v| {
            let at = v.as_ptr() as usize - base;
            head.slice(at..at + v.len())
        })
        .map_err(InvalidResponse)?;
        if name == CONTENT_LENGTH {
            for item in list_items(&value) {
                let n = parse_length(item).ok_or(InvalidResponse("invalid content-length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(InvalidResponse("conflicting content-length"));
                }
                length = Some(n);
            }
        } else if name == TRANSFER_ENCODING {
            let last = value
                .to_str()
                .ok()
                .and_then(|v| v.rsplit(',').next())
                .unwrap_or("");
            transfer_encoding = Some(last.trim().eq_ignore_ascii_case("chunked"));
            continue;
        } else if name == CONNECTION {
            conn.add(&value);
            if !upgrade {
                continue;
            }
        } else if HOP_BY_HOP.iter().any(|h| *h == name) && !(upgrade && name == UPGRADE) {
            continue;
        }
        headers.append(name, value);
    }
    buf.advance(len);

    let framing = if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        ResponseFraming::Empty
    } else {
        match (transfer_encoding, length) {
            (Some(true), _) => ResponseFraming::Chunked,
            (Some(false), _) => ResponseFraming::Close,
            (None, Some(0)) => ResponseFraming::Empty,
            (None, Some(n)) => ResponseFraming::Length(n),
            (None, None) => ResponseFraming::Close,
        }
    };
    if transfer_encoding.is_some() {
        // A message with both is a smuggling attempt; Transfer-Encoding wins (RFC 9112 §6.3).
        headers.remove(CONTENT_LENGTH);
    }
    if conn.other && !upgrade {
        conn.remove_listed(&mut headers);
    }
    let keep_alive = framing != ResponseFraming::Close
        && !conn.close
        && (version == Version::HTTP_11 || conn.keep_alive);
    let mut parts = response::Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Head {
        parts,
        framing,
        keep_alive,
    }))
}

/// What the `Connection` header lines said.
#[derive(Default)]
struct ConnectionTokens {
    close: bool,
    keep_alive: bool,
    /// Names other headers, which are hop-by-hop too.
    other: bool,
    values: Vec<HeaderValue>,
}

impl ConnectionTokens {
    fn add(&mut self, value: &HeaderValue) {
        for token in list_items(value) {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"upgrade") {
                self.other = true;
                self.values.push(value.clone());
            }
        }
    }

    fn remove_listed(&self, headers: &mut HeaderMap) {
        for value in &self.values {
            for token in value.to_str().unwrap_or("").split(',') {
                headers.remove(token.trim());
            }
        }
    }
}

/// The items of a comma-separated list value (RFC 9110 §5.6.1), without the spaces
/// around them. Bytes, not `str`: these are checked on every message.
pub fn list_items(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
}

/// Whether a list value (`Connection`, say) holds `token`, in any case.
pub fn has_token(value: &HeaderValue, token: &str) -> bool {
    list_items(value).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// A `Content-Length` value: digits only (RFC 9110 §8.6), so no sign or space slips by.
pub fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))?
    })
}

/// Decodes a chunked body incrementally from a read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk with this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    Done,
}

/// What the decoder found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// The buffer holds no complete piece: read more.
    NeedMore,
    End,
}

impl Chunked {
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, InvalidResponse> {
        loop {
            match *self {
                Chunked::Size => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = line[..].split(|&b| b == b';').next().unwrap_or(&[]);
                    let size = std::str::from_utf8(size)
                        .ok()
                        .map(str::trim)
                        .filter(|s| !s.is_empty() && s.len() <= 16);
                    let size = size
                        .and_then(|s| u64::from_str_radix(s, 16).ok())
                        .ok_or(InvalidResponse("invalid chunk size"))?;
                    *self = if size == 0 {
                        Chunked::Trailers
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = left.min(buf.len() as u64);
                    *self = if take == left {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left - take)
                    };
                    return Ok(Decoded::Data(buf.split_to(take as usize).freeze()));
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(InvalidResponse("chunk data not followed by CRLF"));
                    }
                    let _ = buf.split_to(2);
                    *self = Chunked::Size;
                }
                Chunked::Trailers => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    if line.is_empty() {
                        *self = Chunked::Done;
                    }
                }
                Chunked::Done => return Ok(Decoded::End),
            }
        }
    }
}

/// Removes and returns one CRLF-terminated line (without the CRLF).
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, InvalidResponse> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(end) => {
            let mut line = buf.split_to(end + 2);
            line.truncate(end);
            Ok(Some(line))
        }
        None if buf.len() > 8 << 10 => Err(InvalidResponse("chunk line too long")),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    const XF: &str = "x-forwarded-for: 10.0.0.9\r\nx-forwarded-proto: http\r\n";

    #[test]
    fn lengths_are_digits_only() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"+5",
            b"-1",
            b"5 ",
            b"0x10",
            b"18446744073709551616",
        ] {
            assert_eq!(
                parse_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn list_items_are_trimmed_and_tokens_found_in_any_case() {
        let value = HeaderValue::from_static(" keep-alive ,, Upgrade,x");
        let items: Vec<&[u8]> = list_items(&value).collect();
        assert_eq!(items, [&b"keep-alive"[..], b"", b"Upgrade", b"x"]);
        assert!(has_token(&value, "upgrade"));
        assert!(!has_token(&value, "close"));
    }

    #[test]
    fn a_repeated_equal_length_is_one_length_and_a_different_one_is_refused() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok"[..]);
        let head = parse_response(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(head.framing, ResponseFraming::Length(2));
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok"[..]);
        assert!(parse_response(&mut buf, &Method::GET).is_err());
    }

    fn encode(req: Request<()>, framing: RequestFraming) -> String {
        let (parts, ()) = req.into_parts();
        let peer = HeaderValue::from_static("10.0.0.9");
        let proto = HeaderValue::from_static("http");
        let forwarded = Forwarded {
            peer: &peer,
            proto: &proto,
            host: None,
        };
        let mut out = Vec::new();
        encode_request(&parts, framing, &forwarded, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn request_heads() {
        let req = Request::get("/a?b=1")
            .header("host", "x")
            .header("content-length", "99")
            .body(())
            .unwrap();
        assert_eq!(
            encode(req, RequestFraming::None),
            format!("GET /a?b=1 HTTP/1.1\r\nhost: x\r\n{XF}\r\n")
        );
        let req = Request::post("/")
            .header("host", "x")
            .header("content-length", "99")
            .body(())
            .unwrap();
        assert_eq!(
            encode(req, RequestFraming::Length(12)),
            format!("POST / HTTP/1.1\r\nhost: x\r\n{XF}content-length: 12\r\n\r\n")
        );
        let req = Request::put("/").header("host", "x").body(()).unwrap();
        assert_eq!(
            encode(req, RequestFraming::Chunked),
            format!("PUT / HTTP/1.1\r\nhost: x\r\n{XF}transfer-encoding: chunked\r\n\r\n")
        );
        let req = Request::post("/").header("host", "x").body(()).unwrap();
        assert!(encode(req, RequestFraming::None).ends_with("content-length: 0\r\n\r\n"));
        let mut out = Vec::new();
        encode_chunk(&[b'a'; 300], &mut out);
        assert!(out.starts_with(b"12c\r\naaa") && out.ends_with(b"a\r\n"));
    }

    #[test]
    fn forwarded_headers_replace_the_clients() {
        let req = Request::get("/")
            .header("x-forwarded-for", "1.2.3.4")
            .header("x-forwarded-for", "5.6.7.8")
            .header("x-forwarded-host", "spoofed")
            .header("x-forwarded-proto", "gopher")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let peer = HeaderValue::from_static("10.0.0.9");
        let proto = HeaderValue::from_static("https");
        let host = HeaderValue::from_static("api.example");
        let forwarded = Forwarded {
            peer: &peer,
            proto: &proto,
            host: Some(&host),
        };
        let mut out = Vec::new();
        encode_request(&parts, RequestFraming::None, &forwarded, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nx-forwarded-for: 1.2.3.4, 5.6.7.8, 10.0.0.9\r\n\
             x-forwarded-proto: https\r\nx-forwarded-host: api.example\r\n\r\n"
        );
    }

    fn parse(raw: &str, method: Method) -> Result<Option<Head>, InvalidResponse> {
        parse_response(&mut BytesMut::from(raw), &method)
    }

    #[test]
    fn response_framing() {
        let head = parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (head.framing, head.keep_alive),
            (ResponseFraming::Length(5), true)
        );
        let head = parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.framing, ResponseFraming::Chunked);
        assert!(!head.parts.headers.contains_key("content-length"));
        let head = parse("HTTP/1.1 200 OK\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!(
            (head.framing, head.keep_alive),
            (ResponseFraming::Close, false)
        );
        let head = parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", Method::HEAD)
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, ResponseFraming::Empty);
        let head = parse(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.framing, ResponseFraming::Empty);
        let head = parse("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert!(!head.keep_alive);
        let head = parse(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert!(!head.keep_alive);
        assert!(parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            Method::GET
        )
        .is_err());
        assert!(parse("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", Method::GET).is_err());
        assert!(parse("garbage\r\n\r\n", Method::GET).is_err());
        assert!(parse("HTTP/1.1 200 OK\r\nContent-Le", Method::GET)
            .unwrap()
            .is_none());
    }

    #[test]
    fn header_count_limit() {
        let head = |n: usize| {
            let lines: String = (0..n).map(|i| format!("x-h{i}: {i}\r\n")).collect();
            format!("HTTP/1.1 200 OK\r\n{lines}\r\n")
        };
        let full = parse(&head(MAX_HEADERS), Method::GET).unwrap().unwrap();
        assert_eq!(full.parts.headers.len(), MAX_HEADERS);
        assert_eq!(full.parts.headers["x-h99"], "99");
        let err = parse(&head(MAX_HEADERS + 1), Method::GET).err().unwrap();
        assert_eq!(err.0, "too many response headers");
    }

    #[test]
    fn empty_header_values() {
        let head = parse(
            "HTTP/1.1 200 OK\r\nx-empty:\r\nx-b: \r\nContent-Length: 0\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.parts.headers.get("x-empty").unwrap(), "");
        assert_eq!(head.parts.headers.get("x-b").unwrap(), "");
    }

    #[test]
    fn hop_by_hop_headers_stay_on_this_hop() {
        let raw = "HTTP/1.1 200 OK\r\nConnection: keep-alive, x-hop\r\nKeep-Alive: timeout=5\r\nx-hop: 1\r\nTransfer-Encoding: chunked\r\nUpgrade: h2c\r\nx-end: 2\r\n\r\n";
        let head = parse(raw, Method::GET).unwrap().unwrap();
        let names: Vec<&str> = head.parts.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-end"]);
        assert_eq!(head.framing, ResponseFraming::Chunked);
        let raw =
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        let head = parse(raw, Method::GET).unwrap().unwrap();
        assert_eq!(head.parts.headers.get("upgrade").unwrap(), "websocket");
        assert_eq!(head.parts.headers.get("connection").unwrap(), "Upgrade");
    }

    #[test]
    fn chunked_decoding_across_reads() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n";
        // Feed the body one byte at a time: every split point must decode the same.
        let mut state = Chunked::Size;
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        for &b in wire.iter() {
            buf.extend_from_slice(&[b]);
            loop {
                match state.decode(&mut buf).unwrap() {
                    Decoded::Data(d) => body.extend_from_slice(&d),
                    Decoded::NeedMore => break,
                    Decoded::End => break,
                }
            }
        }
        assert_eq!(body, b"hello world");
        assert_eq!(state, Chunked::Done);
        assert!(Chunked::Size.decode(&mut BytesMut::from("zz\r\n")).is_err());
        assert!(Chunked::DataEnd.decode(&mut BytesMut::from("xx")).is_err());
    }
}
