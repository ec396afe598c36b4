//! Invariants of the HTTP/1 layer (`gatehouse::protocol::h1`) that hold for any input, whatever
//! its bytes and however they arrive. Shared by the property tests (`tests/http1_props.rs`)
//! and the fuzz targets (`tests/fuzz`), so a long fuzz campaign checks exactly what
//! `cargo test` checks.
//!
//! Each check runs a parser on the input whole, then again fed in pieces (as reads from a
//! socket deliver it), and requires the same verdict: a peer must not be able to change
//! where a message ends by choosing its write sizes. A head the parser accepts is then read
//! again by a plain reading of its lines, written here from RFC 9112 and not from the
//! parser, which must agree with what the parser decided (framing, the strict refusals,
//! hop-by-hop headers, persistence). Panics are failures: every check runs in the
//! property tests and under libFuzzer alike.

use bytes::{Bytes, BytesMut};
use gatehouse::config::Underscores;
use gatehouse::protocol::h1::chunked::{self, Chunked, Decoded, InvalidChunk};
use gatehouse::protocol::h1::{request, response, Framing, MAX_HEADERS};
use gatehouse::proxy::Proxy;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

/// Hop-by-hop headers whatever `Connection` says (RFC 9110 §7.6.1, and the list Go's and
/// nginx's proxies use).
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// `input` in reads of the sizes in `cuts`, in turn and again (all of it at once when
/// `cuts` is empty). A read is at least 1/512 of the input, so that a long input costs at
/// most about 512 parses of it.
pub fn pieces<'a>(input: &'a [u8], cuts: &'a [usize]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let least = (input.len() / 512).max(1);
    let mut sizes = cuts.iter().cycle();
    let mut rest = input;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let size = sizes.next().map_or(rest.len(), |&s| s.max(least));
        let (piece, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        Some(piece)
    })
}

/// `request::parse` with a head limit of `max_head`, on `input` whole and fed in `cuts`.
pub fn request_head(
    input: &[u8],
    max_head: usize,
    cuts: &[usize],
) -> Result<Option<(request::Head, usize)>, request::Invalid> {
    let bytes = Bytes::copy_from_slice(input);
    let whole = request::parse(&bytes, max_head);
    let mut fed = 0;
    let mut first = Ok(None);
    for piece in pieces(input, cuts) {
        fed += piece.len();
        first = request::parse(&bytes.slice(..fed), max_head);
        if !matches!(first, Ok(None)) {
            break;
        }
    }
    match (&whole, &first) {
        (Ok(Some((head, len))), Ok(Some((fed_head, fed_len)))) => {
            assert_eq!(
                (format!("{head:?}"), len),
                (format!("{fed_head:?}"), fed_len),
                "fed in reads of {cuts:?}, the head parsed differently"
            );
            assert!(*len <= input.len() && *len <= max_head, "took {len} bytes");
            check_request(&input[..*len], head);
        }
        (Ok(None), Ok(None)) => assert!(
            input.len() <= max_head,
            "an unfinished head of {} bytes is past the limit of {max_head}",
            input.len()
        ),
        (Err(error), Err(fed_error)) => {
            assert!(
                [400, 431, 501, 505].contains(&error.status.as_u16()),
                "{error:?}"
            );
            // Past the limit, a prefix is refused as too large before the byte that makes
            // the whole input malformed arrives: refused all the same.
            if input.len() <= max_head {
                assert_eq!(error, fed_error, "fed in reads of {cuts:?}");
            }
        }
        _ => {
            panic!("fed in reads of {cuts:?}, the verdict changed: {whole:?} whole, {first:?} fed")
        }
    }
    whole
}

/// `response::parse` for a request of `method`, on `input` whole and fed in `cuts`; the
/// length of the head is what the parse took from the buffer.
pub fn response_head(
    input: &[u8],
    method: &Method,
    cuts: &[usize],
) -> Result<Option<(response::Head, usize)>, response::Invalid> {
    let mut buf = BytesMut::from(input);
    let whole = response::parse(&mut buf, method);
    let len = input.len() - buf.len();
    if matches!(whole, Ok(Some(_))) {
        assert_eq!(buf, input[len..], "what follows the head is left as it was");
    } else {
        assert_eq!(len, 0, "a head not taken leaves the buffer alone");
    }
    let mut fed_buf = BytesMut::new();
    let mut fed = 0;
    let mut first = Ok(None);
    for piece in pieces(input, cuts) {
        fed += piece.len();
        fed_buf.extend_from_slice(piece);
        first = response::parse(&mut fed_buf, method);
        if !matches!(first, Ok(None)) {
            break;
        }
    }
    match (&whole, &first) {
        (Ok(Some(head)), Ok(Some(fed_head))) => {
            assert_eq!(
                (format!("{head:?}"), len),
                (format!("{fed_head:?}"), fed - fed_buf.len()),
                "fed in reads of {cuts:?}, the head parsed differently"
            );
            check_response(&input[..len], method, head);
        }
        (Ok(None), Ok(None)) => assert!(
            input.len() <= response::MAX_HEAD,
            "an unfinished head of {} bytes is past the limit",
            input.len()
        ),
        (Err(error), Err(fed_error)) => {
            if input.len() <= response::MAX_HEAD {
                assert_eq!(error, fed_error, "fed in reads of {cuts:?}");
            }
        }
        _ => {
            panic!("fed in reads of {cuts:?}, the verdict changed: {whole:?} whole, {first:?} fed")
        }
    }
    whole.map(|head| head.map(|head| (head, len)))
}

/// What decoding a chunked body produced.
#[derive(Debug, PartialEq)]
pub struct Decoding {
    pub data: Vec<u8>,
    pub trailers: Option<HeaderMap>,
    /// `Ok(Some(n))`: the body ended after `n` bytes; `Ok(None)`: it has not ended yet.
    pub end: Result<Option<usize>, InvalidChunk>,
}

/// The chunked decoder on `input` whole and fed in `cuts`: the same data, trailers and end
/// (or error) either way.
pub fn chunked_body(input: &[u8], cuts: &[usize]) -> Decoding {
    let whole = decode(input, &[]);
    let fed = decode(input, cuts);
    assert_eq!(
        whole, fed,
        "fed in reads of {cuts:?}, the body decoded differently"
    );
    whole
}

/// Decodes `input` fed in `cuts` as a driver does: after each read, decode until the
/// decoder asks for more. Checks that each call makes progress or asks for more, and that
/// what the decoder keeps unconsumed while it waits is bounded by its longest line.
fn decode(input: &[u8], cuts: &[usize]) -> Decoding {
    let mut state = Chunked::Size;
    let mut buf = BytesMut::new();
    let mut pending = None;
    let mut out = Decoding {
        data: Vec::new(),
        trailers: None,
        end: Ok(None),
    };
    let (mut calls, mut reads, mut fed) = (0, 0, 0);
    'reads: for piece in pieces(input, cuts) {
        buf.extend_from_slice(piece);
        fed += piece.len();
        reads += 1;
        loop {
            // Each call returns data (at least a byte), the trailers or the end (once
            // each), or asks for more (once a read).
            calls += 1;
            assert!(
                calls <= fed + reads + 2,
                "{calls} decode calls for {fed} bytes in {reads} reads: the decoder spins"
            );
            let before = buf.len();
            let result = state.decode(&mut buf, &mut pending);
            assert!(buf.len() <= before, "the decoder added to its buffer");
            match result {
                Ok(Decoded::Data(data)) => {
                    assert!(!data.is_empty(), "empty data: no progress");
                    assert!(before - buf.len() >= data.len());
                    out.data.extend_from_slice(&data);
                }
                Ok(Decoded::Trailers(fields)) => {
                    assert!(out.trailers.is_none(), "the trailers came twice");
                    assert!(!fields.is_empty() && fields.len() <= MAX_HEADERS);
                    out.trailers = Some(fields);
                }
                Ok(Decoded::NeedMore) => {
                    assert!(
                        buf.len() <= chunked::MAX_LINE + 1,
                        "{} bytes held unconsumed while waiting for more",
                        buf.len()
                    );
                    continue 'reads;
                }
                Ok(Decoded::End) => {
                    // The end stays the end, and what follows it (the next message) is
                    // left alone.
                    let rest = buf.clone();
                    assert_eq!(state.decode(&mut buf, &mut pending), Ok(Decoded::End));
                    assert_eq!(buf, rest);
                    out.end = Ok(Some(fed - buf.len()));
                    break 'reads;
                }
                Err(error) => {
                    out.end = Err(error);
                    break 'reads;
                }
            }
        }
    }
    out
}

/// A head as a plain reading of its lines sees it: the start line, then each field line's
/// name (in lower case) and value (without the whitespace around it).
struct Lines<'a> {
    start: &'a [u8],
    fields: Vec<(String, &'a [u8])>,
}

impl<'a> Lines<'a> {
    /// Reads an accepted head, which must end with its blank line (no more, no less).
    fn read(head: &'a [u8]) -> Self {
        let mut lines = head
            .split(|&b| b == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
            // Empty lines before the start line are ignored (RFC 9112 §2.2).
            .skip_while(|line| line.is_empty());
        let start = lines.next().expect("a start line");
        let mut fields = Vec::new();
        for line in lines.by_ref() {
            if line.is_empty() {
                break;
            }
            let colon = line
                .iter()
                .position(|&b| b == b':')
                .expect("a field line has a colon");
            let name = String::from_utf8(line[..colon].to_ascii_lowercase()).expect("a token");
            fields.push((name, line[colon + 1..].trim_ascii()));
        }
        assert_eq!(
            (lines.next(), lines.next()),
            (Some(&b""[..]), None),
            "the head ends right after its blank line"
        );
        Lines { start, fields }
    }

    fn values(&self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.fields
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, value)| *value)
    }

    /// The non-empty items of a list header across all its lines, in lower case, or `None`
    /// without any such line (RFC 9110 §5.3: the lines are one comma-separated list).
    fn items(&self, name: &'a str) -> Option<Vec<String>> {
        let mut values = self.values(name).peekable();
        values.peek()?;
        Some(
            values
                .flat_map(|value| value.split(|&b| b == b','))
                .map(|item| String::from_utf8_lossy(item.trim_ascii()).to_ascii_lowercase())
                .filter(|item| !item.is_empty())
                .collect(),
        )
    }

    /// The one length every `Content-Length` item states (RFC 9110 §8.6: digits only), or
    /// `Err` when they are not all the same number.
    fn length(&self) -> Result<Option<u64>, ()> {
        let mut length = None;
        for item in self
            .values("content-length")
            .flat_map(|value| value.split(|&b| b == b','))
        {
            let item = item.trim_ascii();
            if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
                return Err(());
            }
            let n = std::str::from_utf8(item)
                .unwrap()
                .parse::<u64>()
                .map_err(|_| ())?;
            if length.is_some_and(|l| l != n) {
                return Err(());
            }
            length = Some(n);
        }
        Ok(length)
    }

    /// The fields `keep` lets through, as a header map.
    fn headers(&self, keep: impl Fn(&str, &[u8]) -> bool) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in self.fields.iter().filter(|(n, v)| keep(n, v)) {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        map
    }
}

/// An accepted request head, read again: what the parser decided must follow from RFC
/// 9112's rules and the strict refusals `request::parse` documents.
fn check_request(bytes: &[u8], head: &request::Head) {
    let lines = Lines::read(bytes);
    let parts = &head.parts;
    let mut start = lines.start.split(|&b| b == b' ');
    let (method, target, version) = (start.next(), start.next(), start.next());
    assert_eq!(start.next(), None, "a request line has three parts");
    assert_eq!(Some(parts.method.as_str().as_bytes()), method);
    let http10 = match version {
        Some(b"HTTP/1.0") => true,
        Some(b"HTTP/1.1") => false,
        other => panic!("accepted version {other:?}"),
    };
    assert_eq!(parts.version == Version::HTTP_10, http10);
    // A fragment is no part of a target: the one a client sends is dropped.
    let target = target.unwrap().split(|&b| b == b'#').next().unwrap();
    if target.starts_with(b"/") {
        assert_eq!(
            parts.uri.path_and_query().map(|p| p.as_str().as_bytes()),
            Some(target)
        );
    }

    let length = lines
        .length()
        .expect("accepted Content-Length values that are not one number");
    let framing = match lines.items("transfer-encoding") {
        Some(codings) => {
            assert_eq!(
                length, None,
                "accepted both Content-Length and Transfer-Encoding"
            );
            assert!(!http10, "accepted Transfer-Encoding in HTTP/1.0");
            assert_eq!(
                codings,
                ["chunked"],
                "accepted codings other than chunked alone"
            );
            Framing::Chunked
        }
        None => match length {
            None | Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
        },
    };
    assert_eq!(head.framing, framing);
    let hosts = lines.values("host").count();
    assert!(
        hosts == 1 || (http10 && hosts == 0),
        "accepted {hosts} Host lines"
    );
    // A Host names a host: not empty (unless an absolute-form target names it instead),
    // no user info, and a port of digits after the colon that follows any IPv6 literal.
    let absolute = parts.uri.scheme().is_some();
    for host in lines.values("host") {
        assert!(!host.is_empty() || absolute, "accepted an empty Host");
        assert!(!host.contains(&b'@'), "accepted user info in Host");
        let after_literal = host.iter().rposition(|&b| b == b']').map_or(0, |i| i + 1);
        if let Some(colon) = host[after_literal..].iter().position(|&b| b == b':') {
            let port = &host[after_literal + colon + 1..];
            assert!(
                !port.is_empty() && port.iter().all(u8::is_ascii_digit),
                "accepted the Host port {:?}",
                String::from_utf8_lossy(port)
            );
        }
    }
    // Whatever its form, a target the app is sent starts with `/` (CONNECT and `*` are
    // answered by gatehouse).
    if parts.method != Method::CONNECT && target != b"*" {
        assert!(
            parts
                .uri
                .path_and_query()
                .is_some_and(|p| p.as_str().starts_with('/')),
            "accepted a target the app cannot be sent: {:?}",
            parts.uri
        );
    }
    check_admission(parts);

    let tokens = lines.items("connection").unwrap_or_default();
    let said = |token: &str| tokens.iter().any(|t| t == token);
    assert_eq!(
        head.keep_alive,
        (!http10 || said("keep-alive")) && !said("close") && parts.method != Method::CONNECT
    );
    let upgrade = lines
        .values("upgrade")
        .last()
        .filter(|_| !http10 && said("upgrade"));
    assert_eq!(head.upgrade.as_ref().map(HeaderValue::as_bytes), upgrade);
    assert_eq!(
        head.expect_continue,
        lines
            .values("expect")
            .any(|v| v.eq_ignore_ascii_case(b"100-continue"))
    );

    // What is left: every field the client sent but the hop-by-hop ones (`te: trailers`
    // is end-to-end), in order; `Connection` cannot name `Host` away; an absolute-form
    // target's authority is the Host.
    let mut expected = lines.headers(|name, value| {
        (name == "host" || !said(name))
            && match name {
                "te" => value.eq_ignore_ascii_case(b"trailers"),
                name => !HOP_BY_HOP.contains(&name),
            }
    });
    if let Some(authority) = parts
        .uri
        .authority()
        .filter(|_| parts.uri.scheme().is_some())
    {
        expected.insert(http::header::HOST, authority.as_str().parse().unwrap());
    }
    assert_eq!(parts.headers, expected, "the end-to-end headers");
}

/// What gatehouse admits to the chain after the parser, the same for HTTP/2: no method
/// with a lowercase letter (a `methods` scope would miss it), no underscored header name
/// (under the default `drop`), and a path that starts with `/`.
fn check_admission(parts: &http::request::Parts) {
    let mut admitted = parts.clone();
    let lowercase = parts
        .method
        .as_str()
        .bytes()
        .any(|b| b.is_ascii_lowercase());
    match Proxy::check(&mut admitted, Underscores::Drop) {
        Ok(()) => {
            assert!(!lowercase, "admitted the method {}", parts.method);
            assert!(
                admitted.headers.keys().all(|n| !n.as_str().contains('_')),
                "admitted underscored names: {:?}",
                admitted.headers
            );
            assert_eq!(
                admitted.headers.len(),
                parts
                    .headers
                    .iter()
                    .filter(|(n, _)| !n.as_str().contains('_'))
                    .count(),
                "dropped more than the underscored names"
            );
        }
        Err(reject) => assert!(
            lowercase || parts.method == Method::CONNECT || parts.uri.path() == "*",
            "refused {} {}: {reject:?}",
            parts.method,
            parts.uri
        ),
    }
}

/// An accepted response head, read again (RFC 9112 §6.3 decides the framing).
fn check_response(bytes: &[u8], method: &Method, head: &response::Head) {
    let lines = Lines::read(bytes);
    let parts = &head.parts;
    let mut start = lines.start.splitn(3, |&b| b == b' ');
    let http10 = match start.next() {
        Some(b"HTTP/1.0") => true,
        Some(b"HTTP/1.1") => false,
        other => panic!("accepted version {other:?}"),
    };
    assert_eq!(parts.version == Version::HTTP_10, http10);
    assert_eq!(Some(parts.status.as_str().as_bytes()), start.next());

    let status = parts.status;
    let length = lines
        .length()
        .expect("accepted Content-Length values that are not one number");
    let codings = lines.items("transfer-encoding");
    let bodiless = *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = match (&codings, length) {
        _ if bodiless => Framing::Empty,
        (Some(codings), _) if codings.last().is_some_and(|c| c == "chunked") => Framing::Chunked,
        (Some(_), _) | (None, None) => Framing::UntilClose,
        (None, Some(0)) => Framing::Empty,
        (None, Some(n)) => Framing::Length(n),
    };
    assert_eq!(head.framing, framing);

    let tokens = lines.items("connection").unwrap_or_default();
    let said = |token: &str| tokens.iter().any(|t| t == token);
    assert_eq!(
        head.keep_alive,
        framing != Framing::UntilClose && !said("close") && (!http10 || said("keep-alive"))
    );
    // A 101 keeps `Connection` and `Upgrade` (the client needs them) and what they name.
    let upgrade = status == StatusCode::SWITCHING_PROTOCOLS;
    let expected = lines.headers(|name, _| {
        (upgrade || name == "host" || !said(name))
            && match name {
                "content-length" => codings.is_none(),
                "connection" | "upgrade" => upgrade,
                name => !HOP_BY_HOP.contains(&name),
            }
    });
    assert_eq!(parts.headers, expected, "the end-to-end headers");
}
