//! Request heads: parsed by the server from a client's bytes, written by the upstream
//! client for the app.
//!
//! Parsing decides everything about a request's framing and validity at once, so the rest
//! of gatehouse only ever sees a request whose end is unambiguous: the rules are RFC
//! 9112's, strict where two parsers could disagree (see `parse`).

use std::mem::MaybeUninit;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST};
use http::uri::Authority;
use http::{header, Version};
use http::{request, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};

use super::hop::{self, Field, Tokens};
use super::{
    header_line, list_items, parse_length, shared_header, Framing, CHAIN_HEADERS, MAX_HEADERS,
};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// W3C Trace Context's header: the caller's span, which gatehouse replaces with its own
/// when it traces.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// A request head as the server parsed it.
#[derive(Debug)]
pub struct Head {
    /// Method, target, version and the end-to-end headers: hop-by-hop headers are gone.
    /// An absolute-form target is kept whole, and `Host` is set to its authority.
    pub parts: request::Parts,
    /// How the body that follows is delimited: `Empty`, `Length` or `Chunked`.
    pub framing: Framing,
    /// The connection may carry another request after this exchange.
    pub keep_alive: bool,
    /// The protocol asked for with `Connection: upgrade` and `Upgrade` (HTTP/1.1 only):
    /// the header is removed from `parts`, and whoever forwards an upgrade sets it again.
    pub upgrade: Option<HeaderValue>,
    /// `Expect: 100-continue`: the client waits for an interim answer before the body.
    pub expect_continue: bool,
    /// `TE: trailers`: the client takes trailer fields in a chunked response.
    pub trailers: bool,
}

/// Why a request cannot be served; the server answers `status` and closes the connection,
/// since it cannot know where the next request would start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid {
    pub status: StatusCode,
    pub message: &'static str,
}

const fn invalid(status: StatusCode, message: &'static str) -> Invalid {
    Invalid { status, message }
}

const BAD: StatusCode = StatusCode::BAD_REQUEST;

/// Parses the request head at the start of `buf`, whose bytes back the header values and
/// the target (no copy). `Ok(None)`: the head has not ended yet (and is within
/// `max_head`). `Ok(Some((head, len)))`: the head took `len` bytes.
///
/// Refused with `400` unless stated: an invalid head; a head over `max_head` bytes or
/// over [`MAX_HEADERS`] lines (`431`); a version other than 1.0 and 1.1 (`505`); an
/// HTTP/1.1 request without exactly one valid `Host`; an authority-form target on another
/// method than CONNECT; `Content-Length` values that differ or are not digits; both
/// `Content-Length` and `Transfer-Encoding` (a smuggling attempt: RFC 9112 §6.3 allows
/// refusing it); `Transfer-Encoding` in HTTP/1.0, or whose last coding is not `chunked`;
/// any coding besides a single `chunked` (`501`: the app would get bytes labelled as
/// something else).
pub fn parse(buf: &Bytes, max_head: usize) -> Result<Option<(Head, usize)>, Invalid> {
    // Uninitialised slots: filling a hundred empty headers would cost more than the parse.
    let mut slots = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let too_large = invalid(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "the request head is larger than server.max_header_bytes",
    );
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) if len > max_head => return Err(too_large),
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max_head => return Err(too_large),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(invalid(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "the request has more than 100 header lines",
            ))
        }
        // httparse refuses a version at its first wrong byte: whether the line names
        // another version (505) or is malformed (400) is known once it has ended, so
        // that how the line was cut into reads cannot change the answer.
        Err(httparse::Error::Version) if !buf.contains(&b'\n') => {
            return match buf.len() > max_head {
                true => Err(too_large),
                false => Ok(None),
            };
        }
        // A well-formed request line of another version is 505; anything else that
        // trips the version check is a malformed line.
        Err(httparse::Error::Version) if names_a_version(buf) => {
            return Err(invalid(
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                "only HTTP/1.0, HTTP/1.1 and HTTP/2 are served",
            ))
        }
        Err(_) => return Err(invalid(BAD, "the request head is malformed")),
    };
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| invalid(BAD, "the request method is invalid"))?;
    let target = req.path.unwrap_or("").as_bytes();
    let uri = Uri::from_maybe_shared(buf.slice_ref(target))
        .map_err(|_| invalid(BAD, "the request target is invalid"))?;
    check_target(&method, target, &uri)?;

    let mut headers = HeaderMap::with_capacity(req.headers.len() + CHAIN_HEADERS);
    let mut tokens = Tokens::default();
    let mut length: Option<u64> = None;
    let mut codings: Option<Codings> = None;
    let mut hosts = 0usize;
    let mut empty_host = false;
    let mut upgrade = None;
    let mut expect_continue = false;
    let mut trailers = false;
    for h in req.headers.iter() {
        let (name, value) = shared_header(h.name.as_bytes(), h.value, |v| buf.slice_ref(v))
            .map_err(|_| invalid(BAD, "a request header is invalid"))?;
        match hop::field(&name) {
            Field::ContentLength => {
                // Digits only: a list (even of equal values) is refused, as hyper and
                // nginx do.
                let n = parse_length(value.as_bytes())
                    .ok_or(invalid(BAD, "the content-length is not a number"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(invalid(BAD, "the request has conflicting content-lengths"));
                }
                length = Some(n);
            }
            Field::TransferEncoding => {
                codings.get_or_insert_default().add(&value);
                continue;
            }
            Field::Host => {
                hosts += 1;
                // Empty is allowed only where no host is needed: see below.
                empty_host = value.is_empty();
                if !empty_host && !is_host(value.as_bytes()) {
                    return Err(invalid(BAD, "the Host header is not a valid host"));
                }
            }
            Field::Connection => {
                tokens.add(&value);
                continue;
            }
            Field::Upgrade => {
                upgrade = Some(value);
                continue;
            }
            // `te: trailers` is end-to-end in meaning (gRPC needs it); other codings are
            // this hop's business.
            Field::Te if !hop::is_te_trailers(&value) => continue,
            Field::Te => trailers = true,
            Field::Expect => {
                expect_continue |= value.as_bytes().eq_ignore_ascii_case(b"100-continue")
            }
            Field::HopByHop => continue,
            Field::Other => {}
        }
        headers.append(name, value);
    }
    tokens.remove_named(&mut headers);

    if version == Version::HTTP_11 && hosts != 1 {
        return Err(invalid(
            BAD,
            if hosts == 0 {
                "the request has no Host header"
            } else {
                "the request has more than one Host header"
            },
        ));
    }
    if hosts > 1 {
        return Err(invalid(BAD, "the request has more than one Host header"));
    }
    // RFC 9112 §3.2.2: an absolute-form target's authority is the host, whatever `Host` said.
    let uri = match uri.authority() {
        Some(authority) if uri.scheme().is_some() => {
            let value = HeaderValue::from_str(authority.as_str())
                .map_err(|_| invalid(BAD, "the request target is invalid"))?;
            headers.insert(HOST, value);
            root_path(uri)
        }
        // An origin-form target's host is `Host`'s: an empty one names none.
        None if empty_host => return Err(invalid(BAD, "the Host header is empty")),
        _ => uri,
    };

    let framing = match (codings, length) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                BAD,
                "the request has both Content-Length and Transfer-Encoding",
            ))
        }
        (Some(_), None) if version == Version::HTTP_10 => {
            return Err(invalid(
                BAD,
                "HTTP/1.0 requests cannot use Transfer-Encoding",
            ))
        }
        (Some(codings), None) => codings.framing()?,
        (None, Some(0) | None) => Framing::Empty,
        (None, Some(n)) => Framing::Length(n),
    };
    let keep_alive = match version {
        Version::HTTP_10 => tokens.keep_alive && !tokens.close,
        _ => !tokens.close,
    } && method != Method::CONNECT;
    let upgrade = upgrade.filter(|_| tokens.upgrade && version == Version::HTTP_11);

    let mut parts = Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some((
        Head {
            parts,
            framing,
            keep_alive,
            upgrade,
            expect_continue,
            trailers,
        },
        len,
    )))
}

/// Whether the first line is `method SP target SP HTTP/d.d`.
fn names_a_version(buf: &[u8]) -> bool {
    let line = buf
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or(buf);
    let mut parts = line.split(|&b| b == b' ');
    let version = (parts.next(), parts.next(), parts.next(), parts.next());
    matches!(version, (Some(_), Some(_), Some([b'H', b'T', b'T', b'P', b'/', major, b'.', minor]), None)
        if major.is_ascii_digit() && minor.is_ascii_digit())
}

/// An absolute-form target with an empty path (`http://a?q=1`) asks for `/` (RFC 9110
/// §4.2.3): written as it is, its request line to the app would be invalid.
fn root_path(uri: Uri) -> Uri {
    match uri.path_and_query() {
        Some(p) if !p.as_str().starts_with('/') => {
            let mut parts = uri.into_parts();
            let rooted = format!(
                "/{}",
                parts.path_and_query.as_ref().map_or("", |p| p.as_str())
            );
            parts.path_and_query = Some(rooted.parse().expect("a path and query with / in front"));
            Uri::from_parts(parts).expect("the parts of a valid URI")
        }
        _ => uri,
    }
}

/// The request-target form must fit the method (RFC 9112 §3.2): authority-form only for
/// CONNECT, asterisk-form only for OPTIONS, otherwise origin-form or absolute-form.
fn check_target(method: &Method, target: &[u8], uri: &Uri) -> Result<(), Invalid> {
    let origin_form = target.starts_with(b"/");
    let absolute_form = uri.scheme().is_some();
    let asterisk_form = target == b"*";
    let names_a_host = |uri: &Uri| {
        uri.authority()
            .is_some_and(|a| is_host(a.as_str().as_bytes()))
    };
    let ok = if *method == Method::CONNECT {
        !origin_form && !absolute_form && !asterisk_form && names_a_host(uri)
    } else if asterisk_form {
        *method == Method::OPTIONS
    } else {
        origin_form
            || absolute_form
                && matches!(uri.scheme_str(), Some("http" | "https"))
                && names_a_host(uri)
    };
    if ok {
        Ok(())
    } else {
        Err(invalid(BAD, "the request target does not fit the method"))
    }
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2): a non-empty host without user info, and a
/// port of digits if there is a colon. A plain name or IPv4 address with an optional port,
/// what nearly every request carries, is checked byte by byte; anything else (an IPv6
/// literal, a percent-encoded name) goes through the URI parser. Also the check of an
/// HTTP/2 `:authority`.
pub fn is_host(value: &[u8]) -> bool {
    // The port follows the last colon, unless that colon is inside an IPv6 literal.
    let (name, port) = match value.iter().rposition(|&b| b == b':') {
        Some(colon) if !value[colon..].contains(&b']') => {
            (&value[..colon], Some(&value[colon + 1..]))
        }
        _ => (value, None),
    };
    let port_ok =
        port.is_none_or(|p| (1..=5).contains(&p.len()) && p.iter().all(u8::is_ascii_digit));
    if name.is_empty() || !port_ok {
        return false;
    }
    name.iter()
        .all(|b| b.is_ascii_alphanumeric() || *b == b'.' || *b == b'-')
        || !value.contains(&b'@')
            && Authority::try_from(value).is_ok_and(|a| a.as_str().len() == value.len())
}

/// The `Transfer-Encoding` codings of a request, across its lines.
#[derive(Default)]
struct Codings {
    count: usize,
    last_chunked: bool,
}

impl Codings {
    fn add(&mut self, value: &HeaderValue) {
        for coding in list_items(value).filter(|c| !c.is_empty()) {
            self.count += 1;
            self.last_chunked = coding.eq_ignore_ascii_case(b"chunked");
        }
    }

    /// Only `chunked`, alone, delimits a body gatehouse can forward as it is labelled.
    fn framing(&self) -> Result<Framing, Invalid> {
        match (self.count, self.last_chunked) {
            (1, true) => Ok(Framing::Chunked),
            (_, false) => Err(invalid(
                BAD,
                "the request body's length cannot be determined: chunked is not its last transfer coding",
            )),
            _ => Err(invalid(
                StatusCode::NOT_IMPLEMENTED,
                "transfer codings other than a single chunked are not supported",
            )),
        }
    }
}

/// The `x-forwarded-*` values for one request, written straight into its head: they
/// replace whatever the client sent under those names (`x-forwarded-for` is appended to).
pub struct Forwarded<'a> {
    /// The peer's address, formatted once per connection.
    pub peer: &'a HeaderValue,
    pub proto: &'a HeaderValue,
    pub host: Option<&'a HeaderValue>,
    /// gatehouse's `traceparent` (`[tracing]`), replacing the client's.
    pub traceparent: Option<&'a [u8]>,
}

/// Writes the request head for `parts` (whose headers are end-to-end only), with framing
/// headers that match `framing` (the client's own `content-length` is replaced by the
/// length actually forwarded), the `x-forwarded-*` headers (and `traceparent`) from
/// `forwarded`, and, for an upgrade, `connection: upgrade` and `upgrade`.
pub fn encode(
    parts: &request::Parts,
    framing: Framing,
    forwarded: &Forwarded,
    upgrade: Option<&HeaderValue>,
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
        if forwarded.traceparent.is_some() && name == TRACEPARENT {
            continue;
        }
        header_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(traceparent) = forwarded.traceparent {
        header_line(out, TRACEPARENT.as_str().as_bytes(), traceparent);
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
    if let Some(protocol) = upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
        header_line(
            out,
            header::UPGRADE.as_str().as_bytes(),
            protocol.as_bytes(),
        );
    }
    match framing {
        Framing::Length(n) => header_line(
            out,
            b"content-length",
            itoa::Buffer::new().format(n).as_bytes(),
        ),
        Framing::Empty if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) => {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        Framing::Empty | Framing::UntilClose => {}
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Option<(Head, usize)>, Invalid> {
        parse(&Bytes::copy_from_slice(text.as_bytes()), 64 << 10)
    }

    fn head(text: &str) -> Head {
        parse_str(text).expect("valid").expect("complete").0
    }

    fn status(text: &str) -> u16 {
        parse_str(text).expect_err("refused").status.as_u16()
    }

    #[test]
    fn a_plain_get() {
        let text =
            "GET /a/b?q=1 HTTP/1.1\r\nHost: example.com\r\nX-Two: 1\r\nX-Two: 2\r\n\r\nGET /next";
        let (h, len) = parse_str(text).unwrap().unwrap();
        assert_eq!(len, text.len() - "GET /next".len());
        assert_eq!(h.parts.method, Method::GET);
        assert_eq!(h.parts.uri, "/a/b?q=1");
        assert_eq!(h.parts.version, Version::HTTP_11);
        assert_eq!(h.parts.headers["host"], "example.com");
        assert_eq!(h.parts.headers.get_all("x-two").iter().count(), 2);
        assert_eq!(h.framing, Framing::Empty);
        assert!(h.keep_alive && h.upgrade.is_none() && !h.expect_continue);
        assert!(parse_str("GET / HTTP/1.1\r\nHost: a\r\n")
            .unwrap()
            .is_none());
    }

    #[test]
    fn framing_and_persistence() {
        let h =
            head("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(5));
        let h = head("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!h.parts.headers.contains_key("transfer-encoding"));
        let h = head("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(!h.keep_alive);
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        assert!(!head("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n").keep_alive);
        let h =
            head("PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-Continue\r\n\r\n");
        assert!(h.expect_continue);
    }

    #[test]
    fn hop_by_hop_headers_are_gone_before_anyone_reads_them() {
        let h = head(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, x-tenant, Upgrade\r\n\
             Keep-Alive: 5\r\nx-tenant: t\r\nTE: gzip\r\nUpgrade: websocket\r\n\
             Proxy-Authorization: x\r\nx-end: 1\r\n\r\n",
        );
        let names: Vec<&str> = h.parts.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["host", "x-end"]);
        assert_eq!(h.upgrade.unwrap(), "websocket");
        let h = head("GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nUpgrade: h2c\r\n\r\n");
        assert_eq!(h.parts.headers["te"], "trailers");
        assert!(
            h.upgrade.is_none(),
            "Upgrade without Connection: upgrade is no upgrade"
        );
        assert!(
            head("GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
                .upgrade
                .is_none()
        );
    }

    #[test]
    fn host_and_target_rules() {
        let h = head("GET http://app.example:8080/p?q HTTP/1.1\r\nHost: other\r\n\r\n");
        assert_eq!(h.parts.headers["host"], "app.example:8080");
        assert_eq!(h.parts.uri.path(), "/p");
        assert_eq!(head("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n").parts.uri, "*");
        assert_eq!(
            head("GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n")
                .parts
                .headers["host"],
            "[::1]:80"
        );
        for text in [
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: evil.example/x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET evil.example:80 HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET * HTTP/1.1\r\nHost: a\r\n\r\n",
            "CONNECT / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET x HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert_eq!(status(text), 400, "{text:?}");
        }
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for (text, expected) in [
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", 400),
            ("GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n", 501),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
            ("GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
            ("\x16\x03\x01 garbage\r\n\r\n", 400),
        ] {
            assert_eq!(status(text), expected, "{text:?}");
        }
    }

    #[test]
    fn head_limits() {
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "a".repeat(2000)
        );
        let bytes = Bytes::from(big);
        assert_eq!(parse(&bytes, 1024).unwrap_err().status, 431);
        assert!(parse(&bytes, 4096).unwrap().is_some());
        assert_eq!(parse(&bytes.slice(..1500), 1024).unwrap_err().status, 431);
        assert!(parse(&bytes.slice(..1500), 4096).unwrap().is_none());
        let lines: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert_eq!(
            status(&format!("GET / HTTP/1.1\r\nHost: a\r\n{lines}\r\n")),
            431
        );
    }

    fn encode_str(req: Request<()>, framing: Framing, upgrade: Option<&HeaderValue>) -> String {
        let (parts, ()) = req.into_parts();
        let peer = HeaderValue::from_static("10.0.0.9");
        let proto = HeaderValue::from_static("http");
        let forwarded = Forwarded {
            peer: &peer,
            proto: &proto,
            host: None,
            traceparent: None,
        };
        let mut out = Vec::new();
        encode(&parts, framing, &forwarded, upgrade, &mut out);
        String::from_utf8(out).unwrap()
    }

    const XF: &str = "x-forwarded-for: 10.0.0.9\r\nx-forwarded-proto: http\r\n";

    #[test]
    fn written_heads() {
        let req = Request::get("/a?b=1")
            .header("host", "x")
            .header("content-length", "99");
        assert_eq!(
            encode_str(req.body(()).unwrap(), Framing::Empty, None),
            format!("GET /a?b=1 HTTP/1.1\r\nhost: x\r\n{XF}\r\n")
        );
        let req = Request::post("/")
            .header("host", "x")
            .header("content-length", "99");
        assert_eq!(
            encode_str(req.body(()).unwrap(), Framing::Length(12), None),
            format!("POST / HTTP/1.1\r\nhost: x\r\n{XF}content-length: 12\r\n\r\n")
        );
        let req = Request::put("/").header("host", "x").body(()).unwrap();
        assert_eq!(
            encode_str(req, Framing::Chunked, None),
            format!("PUT / HTTP/1.1\r\nhost: x\r\n{XF}transfer-encoding: chunked\r\n\r\n")
        );
        let req = Request::post("/").header("host", "x").body(()).unwrap();
        assert!(encode_str(req, Framing::Empty, None).ends_with("content-length: 0\r\n\r\n"));
        let ws = HeaderValue::from_static("websocket");
        let req = Request::get("/ws").body(()).unwrap();
        assert!(encode_str(req, Framing::Empty, Some(&ws))
            .ends_with("connection: upgrade\r\nupgrade: websocket\r\n\r\n"));
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
            traceparent: None,
        };
        let mut out = Vec::new();
        encode(&parts, Framing::Empty, &forwarded, None, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nx-forwarded-for: 1.2.3.4, 5.6.7.8, 10.0.0.9\r\n\
             x-forwarded-proto: https\r\nx-forwarded-host: api.example\r\n\r\n"
        );
    }

    #[test]
    fn gatehouse_traceparent_replaces_the_clients() {
        let req = Request::get("/")
            .header(
                "traceparent",
                "00-11111111111111111111111111111111-2222222222222222-01",
            )
            .header("tracestate", "k=v")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let peer = HeaderValue::from_static("10.0.0.9");
        let proto = HeaderValue::from_static("http");
        let ours = b"00-11111111111111111111111111111111-3333333333333333-01";
        let mut forwarded = Forwarded {
            peer: &peer,
            proto: &proto,
            host: None,
            traceparent: Some(ours),
        };
        let mut out = Vec::new();
        encode(&parts, Framing::Empty, &forwarded, None, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches("traceparent").count(), 1, "{text}");
        assert!(text
            .contains("traceparent: 00-11111111111111111111111111111111-3333333333333333-01\r\n"));
        assert!(text.contains("tracestate: k=v\r\n"));
        // Without tracing, the client's passes as any end-to-end header.
        forwarded.traceparent = None;
        let mut out = Vec::new();
        encode(&parts, Framing::Empty, &forwarded, None, &mut out);
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("-2222222222222222-01"));
    }
}
