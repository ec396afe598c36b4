//! Property tests of the HTTP/1 layer: arbitrary and mutated heads and chunked bodies, fed
//! whole and in arbitrary reads, never panic, never spin, hold bounded memory and are never
//! accepted against the strict rules (the invariants are in `http1_check`, shared with the
//! fuzz targets in `tests/fuzz`); what the encoders write, the parsers read back the same.
//! `PROPTEST_CASES=10000 cargo test --test http1_props` runs a longer campaign.

mod http1_check;

use gatehouse::protocol::h1::chunked::{self, MAX_LINE};
use gatehouse::protocol::h1::request::{self, Forwarded};
use gatehouse::protocol::h1::response::{self, Writing};
use gatehouse::protocol::h1::{Framing, MAX_HEADERS};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::{select, Index};

use http1_check::{chunked_body, request_head, response_head, Decoding, HOP_BY_HOP};

/// Read sizes: small ones put a boundary inside every line, large ones few.
fn cuts() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![vec(1usize..16, 1..5), vec(1usize..5000, 1..5)]
}

/// The server's head limit: its default, or one small enough to be reached.
fn max_head() -> impl Strategy<Value = usize> {
    prop_oneof![Just(64 << 10), 16usize..2048]
}

/// Bytes of any value, or bytes a parser treats as special, which random bytes seldom hit.
fn bytes(alphabet: &'static [u8], len: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![vec(any::<u8>(), 0..len), vec(select(alphabet), 0..len)]
}

const HEAD_ALPHABET: &[u8] = b"GET / HTTP/1.0\r\n:Host,chunked0 \t_?";
const CHUNK_ALPHABET: &[u8] = b"0123456789abcdefABCDEF;= \t\r\n:x\"";

/// Well-formed field lines that decide framing or persistence, or are hop-by-hop, for
/// mutated heads to gain: some make a head ambiguous, and must be refused.
const FIELDS: &[&str] = &[
    "Content-Length: 0",
    "Content-Length: 5",
    "content-length: 5, 5",
    "Content-Length: 5, 6",
    "Content-Length: +5",
    "Content-Length:",
    "Content-Length: 99999999999999999999",
    "Transfer-Encoding: chunked",
    "transfer-encoding: CHUNKED",
    "Transfer-Encoding: gzip",
    "Transfer-Encoding: gzip, chunked",
    "Transfer-Encoding: chunked, gzip",
    "Transfer-Encoding: chunked,",
    "Transfer-Encoding: ,",
    "Host: b:8080",
    "Host: user@a",
    "Host: b:abc",
    "Host: b:",
    "Host:",
    "Host: [::1]:80",
    "x_auth_subject: a",
    "Connection: close",
    "Connection: keep-alive",
    "Connection: Upgrade",
    "Connection: x-a, host",
    "Connection: content-length",
    "Connection: te",
    "Upgrade: websocket",
    "Expect: 100-continue",
    "TE: trailers",
    "TE: gzip",
    "Keep-Alive: 5",
    "Trailer: x-t",
    "Proxy-Authorization: x",
    "x-a: 1",
];

/// Malformed lines, and chunk-size lines, for the line edits to insert.
const MALFORMED: &[&str] = &[
    " folded",
    "\tfolded",
    "no colon",
    ": no name",
    "bad name: x",
    "x-nul: a\0b",
    "0",
    "5;a=b",
    "ffffffffffffffff",
    "00000000000000005",
];

/// A change to a message given as lines (each with its line ending).
#[derive(Debug, Clone)]
enum LineEdit {
    Duplicate(Index),
    /// The line ends in a bare LF.
    BareLf(Index),
    /// The line's first `: ` written another way.
    Colon(Index, &'static str),
    /// The line grown to this many bytes, before its ending (`;` then `v`s).
    Long(Index, usize),
    /// This many header lines, inserted before the line.
    Many(Index, usize),
    /// One of [`FIELDS`] or [`MALFORMED`], inserted before the line.
    Field(Index, &'static str),
}

fn line_edit() -> impl Strategy<Value = LineEdit> {
    let colons = select(&[" :", ":", ":\t", " : ", "\t:", ":  "][..]);
    // Around the chunk line limit, and past a head's.
    let long = prop_oneof![MAX_LINE - 2..=MAX_LINE + 2, 60_000usize..70_000];
    prop_oneof![
        any::<Index>().prop_map(LineEdit::Duplicate),
        any::<Index>().prop_map(LineEdit::BareLf),
        (any::<Index>(), colons).prop_map(|(i, c)| LineEdit::Colon(i, c)),
        (any::<Index>(), long).prop_map(|(i, n)| LineEdit::Long(i, n)),
        (any::<Index>(), MAX_HEADERS - 8..MAX_HEADERS + 4).prop_map(|(i, n)| LineEdit::Many(i, n)),
        (any::<Index>(), select([FIELDS, MALFORMED].concat()))
            .prop_map(|(i, f)| LineEdit::Field(i, f)),
    ]
}

/// No edits half the time, so that what the added fields alone do is seen often.
fn edits<T: std::fmt::Debug + Clone>(
    edit: impl Strategy<Value = T>,
) -> impl Strategy<Value = Vec<T>> {
    prop_oneof![Just(Vec::new()), vec(edit, 1..3)]
}

#[derive(Debug, Clone)]
enum ByteEdit {
    Insert(Index, u8),
    Remove(Index),
    Replace(Index, u8),
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    let byte = || prop_oneof![any::<u8>(), select(&b"\r\n :,;\t\0"[..])];
    prop_oneof![
        (any::<Index>(), byte()).prop_map(|(i, b)| ByteEdit::Insert(i, b)),
        any::<Index>().prop_map(ByteEdit::Remove),
        (any::<Index>(), byte()).prop_map(|(i, b)| ByteEdit::Replace(i, b)),
    ]
}

/// A head's `lines` with `fields` (from [`FIELDS`]) after its start line.
fn with_fields(mut lines: Vec<Vec<u8>>, fields: &[&str]) -> Vec<Vec<u8>> {
    let fields = fields.iter().map(|f| format!("{f}\r\n").into_bytes());
    lines.splice(1..1, fields);
    lines
}

/// `lines` changed by the edits, written out.
fn mutate(mut lines: Vec<Vec<u8>>, line_edits: &[LineEdit], byte_edits: &[ByteEdit]) -> Vec<u8> {
    for edit in line_edits {
        let count = lines.len();
        match edit {
            LineEdit::Duplicate(i) => {
                let i = i.index(count);
                lines.insert(i, lines[i].clone());
            }
            LineEdit::BareLf(i) => {
                let line = &mut lines[i.index(count)];
                if line.ends_with(b"\r\n") {
                    line.remove(line.len() - 2);
                }
            }
            LineEdit::Colon(i, colon) => {
                let line = &mut lines[i.index(count)];
                if let Some(at) = line.windows(2).position(|w| w == b": ") {
                    line.splice(at..at + 2, colon.bytes());
                }
            }
            LineEdit::Long(i, n) => {
                let line = &mut lines[i.index(count)];
                let end = line.len()
                    - line
                        .iter()
                        .rev()
                        .take_while(|&&b| b == b'\r' || b == b'\n')
                        .count();
                if end < *n {
                    let grown = std::iter::once(b';').chain(std::iter::repeat_n(b'v', n - end - 1));
                    line.splice(end..end, grown);
                }
            }
            LineEdit::Many(i, n) => {
                let at = i.index(count);
                let many = (0..*n).map(|k| format!("x-many-{k}: {k}\r\n").into_bytes());
                lines.splice(at..at, many);
            }
            LineEdit::Field(i, field) => {
                let at = i.index(count);
                lines.insert(at, format!("{field}\r\n").into_bytes());
            }
        }
    }
    let mut bytes = lines.concat();
    for edit in byte_edits {
        match edit {
            ByteEdit::Insert(i, b) => bytes.insert(i.index(bytes.len() + 1), *b),
            ByteEdit::Remove(i) if !bytes.is_empty() => {
                bytes.remove(i.index(bytes.len()));
            }
            ByteEdit::Replace(i, b) if !bytes.is_empty() => {
                let at = i.index(bytes.len());
                bytes[at] = *b;
            }
            _ => {}
        }
    }
    bytes
}

/// A header name that no rule singles out.
fn plain_name() -> impl Strategy<Value = String> {
    "[xX]-[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}"
}

/// An end-to-end header name in lower case (as `http` holds it), no framing or hop-by-hop
/// one, nor one an encoder writes itself.
fn field_name() -> impl Strategy<Value = HeaderName> {
    "[a-z0-9!#$%&'*+.^_`|~-]{1,16}".prop_filter_map("a name with a rule of its own", |name| {
        let special = [
            "host",
            "content-length",
            "date",
            "expect",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
        ];
        let special = |name: &str| HOP_BY_HOP.contains(&name) || special.contains(&name);
        (!special(&name)).then(|| name.parse().unwrap())
    })
}

/// A header value: visible ASCII, obs-text, inner spaces and tabs (the parsers trim the
/// outer ones).
fn field_value() -> impl Strategy<Value = HeaderValue> {
    let byte =
        prop_oneof![8 => 0x21u8..0x7f, 2 => 0x80u8..=0xff, 1 => Just(b' '), 1 => Just(b'\t')];
    vec(byte, 0..24).prop_map(|v| HeaderValue::from_bytes(v.trim_ascii()).unwrap())
}

fn fields() -> impl Strategy<Value = Vec<(HeaderName, HeaderValue)>> {
    vec((field_name(), field_value()), 0..8)
}

fn origin_target() -> impl Strategy<Value = String> {
    "/[A-Za-z0-9._~!$&'()*+,;=:@%/-]{0,30}(\\?[A-Za-z0-9._~!$&'()*+,;=:@%/?-]{0,20})?"
}

/// `uri-host [":" port]`.
fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9-]{1,12}(\\.[a-z0-9-]{1,12}){0,2}(:[0-9]{1,5})?",
        "\\[::[0-9]{1,4}\\](:[0-9]{1,5})?",
    ]
}

/// A valid request head, as lines, with the blank line that ends it.
fn request_lines() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let method = select(
        &[
            "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "X-PURGE", "post",
            "Delete", "x-purge",
        ][..],
    );
    let target = prop_oneof![
        3 => origin_target(),
        1 => host().prop_map(|h| format!("http://{h}/p?q")),
        1 => host().prop_map(|h| format!("http://{h}?q")),
    ];
    let framing = select(
        &[
            "",
            "Content-Length: 12",
            "content-length: 0",
            "Transfer-Encoding: chunked",
            "Connection: close",
            "Connection: keep-alive, x-a\r\nX-A: named",
            "Connection: Upgrade\r\nUpgrade: websocket",
            "Expect: 100-continue",
            "TE: trailers",
        ][..],
    );
    let fields = vec((plain_name(), "[ -~]{0,20}"), 0..6);
    (method, target, any::<bool>(), host(), framing, fields).prop_map(
        |(method, target, http10, host, framing, fields)| {
            let http10 = http10 && !framing.starts_with("Transfer");
            let mut lines = vec![format!(
                "{method} {target} HTTP/1.{}\r\n",
                u8::from(!http10)
            )];
            if !http10 {
                lines.push(format!("Host: {host}\r\n"));
            }
            if !framing.is_empty() {
                lines.push(format!("{framing}\r\n"));
            }
            lines.extend(fields.iter().map(|(n, v)| format!("{n}: {v}\r\n")));
            lines.push("\r\n".into());
            lines.into_iter().map(String::into_bytes).collect()
        },
    )
}

/// A valid response head, as lines, with the blank line that ends it.
fn response_lines() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let status = prop_oneof![
        select(&[100u16, 101, 103, 200, 204, 206, 304, 404, 500][..]),
        100u16..1000
    ];
    let framing = select(
        &[
            "",
            "Content-Length: 12",
            "Content-Length: 0",
            "Transfer-Encoding: chunked",
            "Transfer-Encoding: gzip",
            "Transfer-Encoding: chunked\r\nContent-Length: 12",
            "Connection: close",
            "Connection: keep-alive, x-a\r\nX-A: named",
            "Connection: Upgrade\r\nUpgrade: websocket",
        ][..],
    );
    let fields = vec((plain_name(), "[ -~]{0,20}"), 0..6);
    (any::<bool>(), status, "[A-Za-z ]{0,12}", framing, fields).prop_map(
        |(http10, status, reason, framing, fields)| {
            let mut lines = vec![format!(
                "HTTP/1.{} {status} {reason}\r\n",
                u8::from(!http10)
            )];
            if !framing.is_empty() {
                lines.push(format!("{framing}\r\n"));
            }
            lines.extend(fields.iter().map(|(n, v)| format!("{n}: {v}\r\n")));
            lines.push("\r\n".into());
            lines.into_iter().map(String::into_bytes).collect()
        },
    )
}

/// Any method the proxy forwards: all but CONNECT, which it answers itself.
fn forwarded_method() -> impl Strategy<Value = Method> {
    let standard = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::OPTIONS,
        Method::PATCH,
        Method::TRACE,
    ];
    prop_oneof![
        select(standard.to_vec()),
        "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}"
            .prop_filter_map("CONNECT", |m| (m != "CONNECT").then(|| m.parse().unwrap())),
    ]
}

fn request_method() -> impl Strategy<Value = Method> {
    select(&[Method::GET, Method::HEAD, Method::POST][..])
}

/// A chunked body, as lines: size lines (in any valid spelling, with extensions), data,
/// the last chunk, trailers (sometimes about as many as allowed) and the blank line.
fn chunked_lines() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let ext = select(&["", ";a=b", " ; x", ";q=\"s t\"", "\t;e"][..]);
    let chunk = (vec(any::<u8>(), 1..40), 0usize..3, ext);
    let trailers = prop_oneof![0usize..3, MAX_HEADERS - 2..MAX_HEADERS + 2];
    (vec(chunk, 0..5), trailers).prop_map(|(chunks, trailers)| {
        let mut lines = Vec::new();
        for (data, spelling, ext) in chunks {
            let size = match spelling {
                0 => format!("{:x}", data.len()),
                1 => format!("{:X}", data.len()),
                _ => format!("{:016x}", data.len()),
            };
            lines.push(format!("{size}{ext}\r\n").into_bytes());
            lines.push([data, b"\r\n".to_vec()].concat());
        }
        lines.push(b"0\r\n".to_vec());
        lines.extend((0..trailers).map(|k| format!("x-t{k}: {k}\r\n").into_bytes()));
        lines.push(b"\r\n".to_vec());
        lines
    })
}

/// `headers` without `names`.
fn without(mut headers: HeaderMap, names: &[HeaderName]) -> HeaderMap {
    for name in names {
        headers.remove(name);
    }
    headers
}

proptest! {
    #[test]
    fn request_heads_of_arbitrary_bytes(
        input in bytes(HEAD_ALPHABET, 600),
        max_head in max_head(),
        cuts in cuts(),
    ) {
        let _ = request_head(&input, max_head, &cuts);
    }

    #[test]
    fn request_heads_mutated(
        lines in request_lines(),
        fields in vec(select(FIELDS), 0..4),
        line_edits in edits(line_edit()),
        byte_edits in edits(byte_edit()),
        tail in vec(any::<u8>(), 0..16),
        max_head in max_head(),
        cuts in cuts(),
    ) {
        let lines = with_fields(lines, &fields);
        let input = [mutate(lines, &line_edits, &byte_edits), tail].concat();
        let _ = request_head(&input, max_head, &cuts);
    }

    /// A valid head is unfinished at every prefix, and reads the same whatever follows it.
    #[test]
    fn valid_request_heads_end_at_their_blank_line(
        lines in request_lines(),
        tail in vec(any::<u8>(), 0..32),
    ) {
        let head = lines.concat();
        let (alone, len) = request_head(&head, 64 << 10, &[1]).unwrap().unwrap();
        prop_assert_eq!(len, head.len());
        let followed = [head.as_slice(), &tail].concat();
        let (followed, len) = request_head(&followed, 64 << 10, &[]).unwrap().unwrap();
        prop_assert_eq!(len, head.len());
        prop_assert_eq!(format!("{alone:?}"), format!("{followed:?}"));
    }

    #[test]
    fn response_heads_of_arbitrary_bytes(
        input in bytes(HEAD_ALPHABET, 600),
        method in request_method(),
        cuts in cuts(),
    ) {
        let _ = response_head(&input, &method, &cuts);
    }

    #[test]
    fn response_heads_mutated(
        lines in response_lines(),
        fields in vec(select(FIELDS), 0..4),
        line_edits in edits(line_edit()),
        byte_edits in edits(byte_edit()),
        tail in vec(any::<u8>(), 0..16),
        method in request_method(),
        cuts in cuts(),
    ) {
        let lines = with_fields(lines, &fields);
        let input = [mutate(lines, &line_edits, &byte_edits), tail].concat();
        let _ = response_head(&input, &method, &cuts);
    }

    #[test]
    fn valid_response_heads_end_at_their_blank_line(
        lines in response_lines(),
        tail in vec(any::<u8>(), 0..32),
        method in request_method(),
    ) {
        let head = lines.concat();
        let (alone, len) = response_head(&head, &method, &[1]).unwrap().unwrap();
        prop_assert_eq!(len, head.len());
        let followed = [head.as_slice(), &tail].concat();
        let (followed, len) = response_head(&followed, &method, &[]).unwrap().unwrap();
        prop_assert_eq!(len, head.len());
        prop_assert_eq!(format!("{alone:?}"), format!("{followed:?}"));
    }

    /// What the upstream client writes, a server reads back: the same method, target and
    /// end-to-end headers, with the framing and `x-forwarded-*` the encoder owns.
    #[test]
    fn requests_round_trip(
        method in forwarded_method(),
        target in prop_oneof![
            4 => origin_target(),
            1 => (host(), origin_target()).prop_map(|(h, t)| format!("https://{h}{t}")),
            1 => Just("*".to_string()),
        ],
        (host, fields, te_trailers) in (host(), fields(), any::<bool>()),
        client_length in option::of("[0-9]{1,4}"),
        prior_for in vec(field_value().prop_filter("non-empty", |v| !v.is_empty()), 0..3),
        spoofed in any::<bool>(),
        (peer, proto, forwarded_host) in ("[0-9a-f.:]{1,20}", "https?", option::of(host())),
        traceparent in option::of("00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]"),
        upgrade in option::of("[a-z0-9/.]{1,12}"),
        framing in prop_oneof![
            Just(Framing::Empty),
            any::<u64>().prop_map(Framing::Length),
            Just(Framing::Chunked),
        ],
        cuts in cuts(),
    ) {
        let method = if target == "*" { Method::OPTIONS } else { method };
        let mut req = Request::builder()
            .method(method.clone())
            .uri(target.as_str())
            .header("host", host.as_str());
        for (name, value) in &fields {
            req = req.header(name, value);
        }
        if te_trailers {
            req = req.header("te", "trailers");
        }
        if let Some(length) = &client_length {
            req = req.header("content-length", length.as_str());
        }
        for value in &prior_for {
            req = req.header("x-forwarded-for", value);
        }
        if spoofed {
            req = req
                .header("x-forwarded-proto", "gopher")
                .header("x-forwarded-host", "spoofed.example");
        }
        let (parts, ()) = req.body(()).unwrap().into_parts();
        let values = |s: &str| HeaderValue::from_str(s).unwrap();
        let (peer, proto) = (values(&peer), values(&proto));
        let forwarded_host = forwarded_host.map(|h| values(&h));
        let upgrade = upgrade.map(|u| values(&u));
        let forwarded = Forwarded {
            peer: &peer,
            proto: &proto,
            host: forwarded_host.as_ref(),
            traceparent: traceparent.as_deref().map(str::as_bytes),
        };
        let mut out = Vec::new();
        request::encode(&parts, framing, &forwarded, upgrade.as_ref(), &mut out);

        let (head, len) = request_head(&out, 1 << 20, &cuts).unwrap().unwrap();
        prop_assert_eq!(len, out.len());
        prop_assert_eq!(&head.parts.method, &method);
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        prop_assert_eq!(&head.parts.uri, &path.parse::<Uri>().unwrap());
        let mut expected = HeaderMap::new();
        expected.insert("host", values(&host));
        for (name, value) in &fields {
            expected.append(name, value.clone());
        }
        if te_trailers {
            expected.insert("te", values("trailers"));
        }
        // The client's own x-forwarded-for, then the peer.
        let mut chain = Vec::new();
        for value in &prior_for {
            chain.extend_from_slice(value.as_bytes());
            chain.extend_from_slice(b", ");
        }
        chain.extend_from_slice(peer.as_bytes());
        expected.insert("x-forwarded-for", HeaderValue::from_bytes(&chain).unwrap());
        expected.insert("x-forwarded-proto", proto.clone());
        if let Some(host) = &forwarded_host {
            expected.insert("x-forwarded-host", host.clone());
        }
        if let Some(traceparent) = &traceparent {
            expected.insert("traceparent", values(traceparent));
        }
        // The length forwarded replaces the client's; a body-carrying method states 0.
        match framing {
            Framing::Length(n) => {
                expected.insert(CONTENT_LENGTH, n.into());
            }
            Framing::Empty if [Method::POST, Method::PUT, Method::PATCH].contains(&method) => {
                expected.insert(CONTENT_LENGTH, 0.into());
            }
            _ => {}
        }
        prop_assert_eq!(&head.parts.headers, &expected);
        prop_assert_eq!(&head.upgrade, &upgrade);
        let framing = if framing == Framing::Length(0) { Framing::Empty } else { framing };
        prop_assert_eq!(head.framing, framing);
        prop_assert!(head.keep_alive && !head.expect_continue);
    }

    /// What the server writes, the upstream client's parser reads back: the same status and
    /// headers, the framing `encode` chose, and the persistence it announced.
    #[test]
    fn responses_round_trip(
        status in 100u16..1000,
        fields in fields(),
        lengths in vec(prop_oneof!["[0-9]{1,6}", "x|-1| 12 |"], 0..3),
        date in option::of("[A-Za-z0-9 ,:]{1,29}"),
        coding in option::of(select(&["chunked", "gzip, chunked", "gzip"][..])),
        writing in (any::<bool>(), any::<bool>(), any::<bool>(), option::of(0u64..1 << 40)),
        cuts in cuts(),
    ) {
        let (head_request, http10, close, exact) = writing;
        let status = StatusCode::from_u16(status).unwrap();
        let mut resp = Response::builder().status(status);
        for (name, value) in &fields {
            resp = resp.header(name, value);
        }
        for length in &lengths {
            resp = resp.header(CONTENT_LENGTH, length.as_str());
        }
        if let Some(date) = &date {
            resp = resp.header(DATE, date.trim());
        }
        if let Some(coding) = coding {
            resp = resp.header("transfer-encoding", coding);
        }
        let (parts, ()) = resp.body(()).unwrap().into_parts();
        let writing = Writing { head_request, http10, close, exact };
        let mut out = Vec::new();
        let written = response::encode(&mut out, &parts, writing, b"Thu, 01 Jan 2026 00:00:00 GMT");
        let method = if head_request { Method::HEAD } else { Method::GET };
        let (head, len) = response_head(&out, &method, &cuts).unwrap().unwrap();
        prop_assert_eq!(len, out.len());
        prop_assert_eq!(head.parts.status, status);

        // The framing: none for a HEAD or a bodiless status; the first valid length given,
        // or the exact one; otherwise chunked, or until close for HTTP/1.0.
        let given = lengths.iter().find_map(|l| l.trim().parse::<u64>().ok());
        let bodiless = response::is_bodiless(status);
        let framing = match given.or(exact) {
            _ if bodiless || head_request => Framing::Empty,
            Some(n) => Framing::Length(n),
            None if http10 => Framing::UntilClose,
            None => Framing::Chunked,
        };
        prop_assert_eq!(written, framing);
        let read = match framing { Framing::Length(0) => Framing::Empty, f => f };
        prop_assert_eq!(head.framing, read);
        prop_assert_eq!(head.keep_alive, !close && framing != Framing::UntilClose);

        // The length a GET would get stays on a HEAD answer and a 304, never on another
        // bodiless one.
        let length = match (given, exact) {
            _ if bodiless && status != StatusCode::NOT_MODIFIED => None,
            (Some(n), _) => Some(n),
            (None, Some(n)) if !bodiless && (!head_request || n > 0) => Some(n),
            _ => None,
        };
        let read = |name| head.parts.headers.get(name).map(|v: &HeaderValue| v.to_str().unwrap());
        prop_assert_eq!(read(CONTENT_LENGTH).map(|v| v.parse::<u64>().unwrap()), length);
        prop_assert!(head.parts.headers.get_all(CONTENT_LENGTH).iter().count() <= 1);
        let date = date.as_deref().map_or("Thu, 01 Jan 2026 00:00:00 GMT", str::trim);
        prop_assert_eq!(head.parts.headers.get_all(DATE).iter().collect::<Vec<_>>(), [date]);
        // A 101 keeps the `connection` the encoder announced.
        if status == StatusCode::SWITCHING_PROTOCOLS {
            let announced = match (close, http10) {
                (true, _) => Some("close"),
                (false, true) => Some("keep-alive"),
                (false, false) => None,
            };
            prop_assert_eq!(read(CONNECTION), announced);
        }
        let mut expected = HeaderMap::new();
        for (name, value) in &fields {
            expected.append(name, value.clone());
        }
        prop_assert_eq!(without(head.parts.headers, &[CONTENT_LENGTH, DATE, CONNECTION]), expected);
    }

    /// Data split into chunks any way, with or without trailers, decodes to the same bytes
    /// and trailers whatever the reads, and leaves the next message alone.
    #[test]
    fn chunked_round_trip(
        chunks in vec(
            prop_oneof![4 => vec(any::<u8>(), 0..40), 1 => vec(any::<u8>(), 0..20_000)],
            0..8,
        ),
        fields in vec((field_name(), field_value()), 0..4),
        cuts in cuts(),
    ) {
        let mut wire = Vec::new();
        for chunk in &chunks {
            chunked::encode(chunk, &mut wire);
        }
        let mut trailers = HeaderMap::new();
        for (name, value) in fields {
            trailers.append(name, value);
        }
        if trailers.is_empty() {
            wire.extend_from_slice(chunked::LAST_CHUNK);
        } else {
            chunked::encode_last(&trailers, &mut wire);
        }
        let end = wire.len();
        wire.extend_from_slice(b"GET /next HTTP/1.1\r\n");
        let expected = Decoding {
            data: chunks.concat(),
            trailers: (!trailers.is_empty()).then_some(trailers),
            end: Ok(Some(end)),
        };
        prop_assert_eq!(chunked_body(&wire, &cuts), expected);
    }

    #[test]
    fn chunked_bodies_of_arbitrary_bytes(input in bytes(CHUNK_ALPHABET, 600), cuts in cuts()) {
        let _ = chunked_body(&input, &cuts);
    }

    #[test]
    fn chunked_bodies_mutated(
        lines in chunked_lines(),
        line_edits in edits(line_edit()),
        byte_edits in edits(byte_edit()),
        tail in vec(any::<u8>(), 0..16),
        cuts in cuts(),
    ) {
        let body = mutate(lines, &line_edits, &byte_edits);
        let decoded = chunked_body(&[body.as_slice(), &tail].concat(), &cuts);
        if line_edits.is_empty() && byte_edits.is_empty() {
            let too_many = chunked::InvalidChunk("too many trailer fields");
            let ended = decoded.end == Ok(Some(body.len())) || decoded.end == Err(too_many);
            prop_assert!(ended, "{:?}", decoded.end);
        }
    }
}

/// Found by the fuzzer: a request line naming another version was `505` whole but `400` fed
/// a byte at a time, because the version was refused before its line had ended.
#[test]
fn a_version_is_judged_once_its_line_has_ended_however_it_is_read() {
    let input = b"-GET / HTTP/0.1\r\nGPOST\x10";
    for cuts in [&[][..], &[1, 1], &[3, 7]] {
        let refused = request_head(input, 64 << 10, cuts).unwrap_err();
        assert_eq!(refused.status, 505, "{cuts:?}");
    }
}

/// Found by the fuzzer: `CONNECT :` was taken (an authority with no host), and its target
/// became a `Host` no client sent.
#[test]
fn a_connect_target_must_name_a_host_and_is_no_host_header() {
    let refused = request_head(b"CONNECT : HTTP/1.0\r\n\n", 64 << 10, &[]).unwrap_err();
    assert_eq!(refused.status, 400);
    let (head, _) = request_head(b"CONNECT app:443 HTTP/1.0\r\n\r\n", 64 << 10, &[1])
        .unwrap()
        .unwrap();
    assert!(head.parts.headers.is_empty(), "{:?}", head.parts.headers);
}
