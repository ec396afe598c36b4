//! Response heads: parsed by the upstream client from the app's bytes, written by the
//! server for the client. Which responses have a body, and how long it is, is decided by
//! [`framing`], for both.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::{response, HeaderMap, Method, Response, StatusCode, Version};

use super::hop::{self, Field, Tokens};
use super::{
    has_token, header_line, list_items, parse_length, shared_header, Framing, CHAIN_HEADERS,
    MAX_HEADERS,
};

/// The largest response head accepted from the upstream.
pub const MAX_HEAD: usize = 64 << 10;

/// Statuses that never have a body, whatever their headers say (RFC 9110 §15.2, §15.3.5,
/// §15.4.5).
pub fn is_bodiless(status: StatusCode) -> bool {
    status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// How a response body is delimited (RFC 9112 §6.3), given the request's method, what
/// `Transfer-Encoding` said (`Some(true)` when `chunked` was its last coding) and the
/// `Content-Length`.
pub fn framing(
    status: StatusCode,
    head_request: bool,
    chunked: Option<bool>,
    length: Option<u64>,
) -> Framing {
    if head_request || is_bodiless(status) {
        return Framing::Empty;
    }
    match (chunked, length) {
        (Some(true), _) => Framing::Chunked,
        (Some(false), _) => Framing::UntilClose,
        (None, Some(0)) => Framing::Empty,
        (None, Some(n)) => Framing::Length(n),
        (None, None) => Framing::UntilClose,
    }
}

/// A response head as the client parsed it.
#[derive(Debug)]
pub struct Head {
    /// Status and end-to-end headers (a `101` keeps `Connection` and `Upgrade`, which the
    /// client needs).
    pub parts: response::Parts,
    pub framing: Framing,
    /// The connection may carry another request once this response has been read.
    pub keep_alive: bool,
}

/// Why the upstream's bytes are not an HTTP/1.1 response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid(pub &'static str);

/// Parses a response head from the start of `buf`. `Ok(None)`: not complete yet.
/// On success, the head's bytes are removed from `buf`.
///
/// One pass over the header lines decides the framing and the connection's fate, and
/// leaves out hop-by-hop headers, which describe this hop only. Header values share one
/// copy of the head instead of one allocation each. `Content-Length` values must agree;
/// with `Transfer-Encoding` too, the latter wins and the length is dropped.
pub fn parse(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, Invalid> {
    // Uninitialised slots: filling a hundred empty headers cost more than parsing the head.
    let mut slots = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
            return Err(Invalid("response head too large"))
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(Invalid("response head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Invalid("too many response headers")),
        Err(_) => return Err(Invalid("malformed response head")),
    };
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(Invalid("invalid status"))?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // One copy of the head backs every header value, and the read buffer stays unshared
    // for the next read.
    let head = Bytes::copy_from_slice(&buf[..len]);
    let base = buf.as_ptr() as usize;

    let upgrade = status == StatusCode::SWITCHING_PROTOCOLS;
    let mut headers = HeaderMap::with_capacity(resp.headers.len() + CHAIN_HEADERS);
    let mut length: Option<u64> = None;
    let mut chunked: Option<bool> = None;
    let mut tokens = Tokens::default();
    for h in resp.headers.iter() {
        let (name, value) = shared_header(h.name.as_bytes(), h.value, |v| {
            let at = v.as_ptr() as usize - base;
            head.slice(at..at + v.len())
        })
        .map_err(Invalid)?;
        match hop::field(&name) {
            Field::ContentLength => {
                for item in list_items(&value) {
                    let n = parse_length(item).ok_or(Invalid("invalid content-length"))?;
                    if length.is_some_and(|l| l != n) {
                        return Err(Invalid("conflicting content-length"));
                    }
                    length = Some(n);
                }
            }
            Field::TransferEncoding => {
                // The lines are one list (RFC 9110 §5.3): a line without a coding changes
                // nothing.
                let last = list_items(&value).filter(|c| !c.is_empty()).last();
                chunked = last
                    .map_or(chunked, |c| Some(c.eq_ignore_ascii_case(b"chunked")))
                    .or(Some(false));
                continue;
            }
            // A `101` keeps `Connection` and `Upgrade` for the client.
            Field::Connection => {
                tokens.add(&value);
                if !upgrade {
                    continue;
                }
            }
            Field::Upgrade if upgrade => {}
            Field::Upgrade | Field::Te | Field::HopByHop => continue,
            Field::Host | Field::Expect | Field::Other => {}
        }
        headers.append(name, value);
    }
    buf.advance(len);

    if chunked.is_some() {
        headers.remove(CONTENT_LENGTH);
    }
    if !upgrade {
        tokens.remove_named(&mut headers);
    }
    let framing = framing(status, *method == Method::HEAD, chunked, length);
    let keep_alive = framing != Framing::UntilClose
        && !tokens.close
        && (version == Version::HTTP_11 || tokens.keep_alive);
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Head {
        parts,
        framing,
        keep_alive,
    }))
}

/// What the server knows when it writes a response head.
#[derive(Clone, Copy, Debug)]
pub struct Writing {
    /// The request was a HEAD: no body follows, whatever the headers say.
    pub head_request: bool,
    /// The client speaks HTTP/1.0: no chunked coding, and persistence must be announced.
    pub http10: bool,
    /// The connection closes after this response.
    pub close: bool,
    /// The body's exact length, when known without a header (a body gatehouse made).
    pub exact: Option<u64>,
}

/// Writes the status line and headers, adding the framing, `connection` and `date` (the
/// current one, from `date`, unless the response has its own), and returns the body's
/// framing. The response's own `transfer-encoding` is this hop's business and is
/// replaced; of several `content-length` lines the first valid one counts.
pub fn encode(
    out: &mut Vec<u8>,
    parts: &response::Parts,
    writing: Writing,
    date: &[u8],
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
    let bodiless = is_bodiless(status);
    let mut length = None;
    let (mut has_date, mut has_close) = (false, false);
    for (name, value) in &parts.headers {
        if name == CONTENT_LENGTH {
            // No length on a response that can have no body at all; a HEAD or 304 keeps
            // the one a GET would get.
            if length.is_some() || (bodiless && status != StatusCode::NOT_MODIFIED) {
                continue;
            }
            match parse_length(value.as_bytes().trim_ascii()) {
                Some(n) => length = Some(n),
                None => continue,
            }
        } else if name == TRANSFER_ENCODING {
            continue;
        } else if name == DATE {
            has_date = true;
        } else if name == CONNECTION {
            has_close |= has_token(value, "close");
        }
        header_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let framing = if bodiless || writing.head_request {
        Framing::Empty
    } else {
        match (length, writing.exact) {
            (Some(n), _) | (None, Some(n)) => Framing::Length(n),
            (None, None) if writing.http10 => Framing::UntilClose,
            (None, None) => Framing::Chunked,
        }
    };
    match framing {
        Framing::Length(n) if length.is_none() => header_line(
            out,
            b"content-length",
            itoa::Buffer::new().format(n).as_bytes(),
        ),
        // A HEAD answer states the length a GET would get, when it is known, but never an
        // implicit 0.
        Framing::Empty if writing.head_request && !bodiless && length.is_none() => {
            if let Some(n) = writing.exact.filter(|&n| n > 0) {
                header_line(
                    out,
                    b"content-length",
                    itoa::Buffer::new().format(n).as_bytes(),
                );
            }
        }
        Framing::Chunked => header_line(out, b"transfer-encoding", b"chunked"),
        _ => {}
    }
    let close = writing.close || framing == Framing::UntilClose;
    if close && !has_close {
        header_line(out, b"connection", b"close");
    } else if !close && writing.http10 {
        header_line(out, b"connection", b"keep-alive");
    }
    if !has_date {
        header_line(out, b"date", date);
    }
    out.extend_from_slice(b"\r\n");
    framing
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, HeaderValue};

    fn parse_str(raw: &str, method: Method) -> Result<Option<Head>, Invalid> {
        parse(&mut BytesMut::from(raw), &method)
    }

    fn head(raw: &str, method: Method) -> Head {
        parse_str(raw, method).unwrap().unwrap()
    }

    #[test]
    fn parsed_framing() {
        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            Method::GET,
        );
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(5), true));
        let h = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            Method::GET,
        );
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!h.parts.headers.contains_key("content-length"));
        let h = head("HTTP/1.1 200 OK\r\n\r\n", Method::GET);
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", Method::HEAD);
        assert_eq!(h.framing, Framing::Empty);
        let h = head(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
            Method::GET,
        );
        assert_eq!(h.framing, Framing::Empty);
        assert!(!head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", Method::GET).keep_alive);
        assert!(
            head(
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
                Method::GET
            )
            .keep_alive
        );
        let h = head(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            Method::GET,
        );
        assert!(!h.keep_alive);
        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
            Method::GET,
        );
        assert_eq!(h.framing, Framing::Length(2));
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert!(parse_str(bad, Method::GET).is_err(), "{bad:?}");
        }
        assert!(parse_str("HTTP/1.1 200 OK\r\nContent-Le", Method::GET)
            .unwrap()
            .is_none());
    }

    #[test]
    fn transfer_encoding_lines_are_one_list() {
        for (lines, framing) in [
            ("chunked\r\nTransfer-Encoding: ,", Framing::Chunked),
            ("chunked\r\nTransfer-Encoding:", Framing::Chunked),
            ("chunked,", Framing::Chunked),
            ("gzip\r\nTransfer-Encoding: chunked", Framing::Chunked),
            ("chunked\r\nTransfer-Encoding: gzip", Framing::UntilClose),
            (",", Framing::UntilClose),
        ] {
            let raw = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {lines}\r\n\r\n");
            assert_eq!(head(&raw, Method::GET).framing, framing, "{raw:?}");
        }
    }

    #[test]
    fn header_count_limit_and_empty_values() {
        let lines = |n: usize| -> String { (0..n).map(|i| format!("x-h{i}: {i}\r\n")).collect() };
        let full = head(
            &format!("HTTP/1.1 200 OK\r\n{}\r\n", lines(MAX_HEADERS)),
            Method::GET,
        );
        assert_eq!(full.parts.headers.len(), MAX_HEADERS);
        let err = parse_str(
            &format!("HTTP/1.1 200 OK\r\n{}\r\n", lines(MAX_HEADERS + 1)),
            Method::GET,
        );
        assert_eq!(err.unwrap_err(), Invalid("too many response headers"));
        let h = head(
            "HTTP/1.1 200 OK\r\nx-empty:\r\nx-b: \r\nContent-Length: 0\r\n\r\n",
            Method::GET,
        );
        assert_eq!(h.parts.headers["x-empty"], "");
        assert_eq!(h.parts.headers["x-b"], "");
    }

    #[test]
    fn hop_by_hop_headers_stay_on_this_hop() {
        let raw = "HTTP/1.1 200 OK\r\nConnection: keep-alive, x-hop\r\nKeep-Alive: timeout=5\r\nx-hop: 1\r\nTransfer-Encoding: chunked\r\nUpgrade: h2c\r\nx-end: 2\r\n\r\n";
        let h = head(raw, Method::GET);
        let names: Vec<&str> = h.parts.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-end"]);
        assert_eq!(h.framing, Framing::Chunked);
        let raw =
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        let h = head(raw, Method::GET);
        assert_eq!(h.parts.headers["upgrade"], "websocket");
        assert_eq!(h.parts.headers["connection"], "Upgrade");
    }

    fn written(status: u16, headers: &[(&str, &str)], writing: Writing) -> (String, Framing) {
        let mut resp = Response::new(());
        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
        for (n, v) in headers {
            resp.headers_mut().append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let mut out = Vec::new();
        let framing = encode(&mut out, &resp.into_parts().0, writing, b"D");
        (String::from_utf8(out).unwrap(), framing)
    }

    const PLAIN: Writing = Writing {
        head_request: false,
        http10: false,
        close: false,
        exact: None,
    };

    #[test]
    fn written_framing() {
        let (text, framing) = written(
            200,
            &[("x-a", "1")],
            Writing {
                exact: Some(12),
                ..PLAIN
            },
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 12\r\ndate: D\r\n\r\n"
        );
        assert_eq!(framing, Framing::Length(12));
        let (text, framing) = written(404, &[("date", "x"), ("content-length", "3")], PLAIN);
        assert_eq!(
            text,
            "HTTP/1.1 404 Not Found\r\ndate: x\r\ncontent-length: 3\r\n\r\n"
        );
        assert_eq!(framing, Framing::Length(3));
        let (text, framing) = written(
            200,
            &[("date", "x"), ("transfer-encoding", "gzip, chunked")],
            Writing {
                close: true,
                ..PLAIN
            },
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ndate: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(framing, Framing::Chunked);
        let (text, framing) = written(
            200,
            &[("date", "x")],
            Writing {
                http10: true,
                ..PLAIN
            },
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ndate: x\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(framing, Framing::UntilClose);
        let (text, _) = written(
            200,
            &[("date", "x")],
            Writing {
                http10: true,
                exact: Some(1),
                ..PLAIN
            },
        );
        assert!(text.ends_with("connection: keep-alive\r\n\r\n"), "{text}");
    }

    #[test]
    fn bodiless_responses_get_no_framing() {
        for (status, head_request) in [(204, false), (304, false), (200, true), (100, false)] {
            let writing = Writing {
                head_request,
                exact: Some(0),
                ..PLAIN
            };
            let (text, framing) = written(status, &[("date", "x")], writing);
            assert!(!text.contains("content-length"), "{text}");
            assert!(!text.contains("transfer-encoding"), "{text}");
            assert_eq!(framing, Framing::Empty);
        }
        let (text, _) = written(204, &[("date", "x"), ("content-length", "5")], PLAIN);
        assert!(!text.contains("content-length"), "{text}");
        // A HEAD and a 304 keep the length the GET would have.
        let writing = Writing {
            head_request: true,
            exact: Some(0),
            ..PLAIN
        };
        let (text, framing) = written(200, &[("date", "x"), ("content-length", "99")], writing);
        assert!(text.contains("content-length: 99\r\n"), "{text}");
        assert_eq!(framing, Framing::Empty);
        let (text, _) = written(304, &[("date", "x"), ("content-length", "99")], PLAIN);
        assert!(text.contains("content-length: 99\r\n"), "{text}");
    }

    #[test]
    fn a_requested_close_is_not_announced_twice() {
        let writing = Writing {
            close: true,
            exact: Some(0),
            ..PLAIN
        };
        let (text, _) = written(503, &[("date", "x"), ("connection", "close")], writing);
        assert_eq!(text.matches("connection").count(), 1, "{text}");
        let (text, _) = written(
            502,
            &[],
            Writing {
                exact: Some(0),
                ..PLAIN
            },
        );
        assert!(
            text.starts_with("HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\ndate: D\r\n"),
            "{text}"
        );
    }
}
