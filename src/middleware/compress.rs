//! `compress`: compresses response bodies (zstd, Brotli, gzip) as they stream, by the
//! client's `Accept-Encoding`, so that the app spends no CPU on it.
//!
//! The request phase negotiates (q-values, `identity`, `*`, the server's order breaking
//! ties) and keeps the choice in the context; the response-body phase decides from the
//! response head whether this body is compressed, makes the head match (`content-encoding`,
//! `vary`, no `content-length`, a weak `ETag`) and hands the body to an [`Encoder`]. The
//! encoder never holds more than its codec's window: each piece of the body goes out as
//! soon as the codec emits it, and everything is flushed whenever the app pauses.
//!
//! Memory per compressed stream is bounded by the level's table ([`Level::params`]): the
//! windows of Brotli and zstd are capped (and shrunk further for a body whose
//! `Content-Length` is smaller), gzip's is deflate's 32 KiB.

use std::io::Write;

use bytes::Bytes;
use flate2::write::GzEncoder;
use http::header::{
    ACCEPT_ENCODING, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE,
    ETAG, RANGE, VARY,
};
use http::{request, response, HeaderMap, HeaderValue, Method, StatusCode};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::chain::{BodyFilter, BodyPhase, Boundary, Context, Flow, Middleware};
use crate::config::value::ByteSize;
use crate::config::{KeyPath, Problem};
use crate::protocol::h1::parse_length;

/// `compress`: compresses response bodies as they stream, by the client's `Accept-Encoding`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The codings offered, the server's preference first: among those the client accepts
    /// with the same q-value, the first listed wins.
    #[serde(default = "default_algorithms")]
    algorithms: Vec<Algorithm>,
    /// Bodies smaller than this by their `Content-Length` are sent as they are (a body of
    /// unknown length is compressed).
    #[serde(default = "default_min_size")]
    min_size: ByteSize,
    /// Media types to compress: `"application/json"`, `"text/*"` or `"*/*"`.
    /// `text/event-stream` is compressed only when listed by name.
    #[serde(default = "default_content_types")]
    content_types: Vec<String>,
    /// How hard the codecs work: `"fastest"`, `"default"` or `"best"`.
    #[serde(default)]
    level: Level,
}

fn default_algorithms() -> Vec<Algorithm> {
    vec![Algorithm::Zstd, Algorithm::Br, Algorithm::Gzip]
}

fn default_min_size() -> ByteSize {
    ByteSize(1024)
}

fn default_content_types() -> Vec<String> {
    [
        "text/*",
        "application/json",
        "application/javascript",
        "application/xml",
        "image/svg+xml",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A content coding gatehouse can apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum Algorithm {
    /// Zstandard (RFC 8878).
    Zstd,
    /// Brotli (RFC 7932).
    Br,
    /// gzip (RFC 1952).
    Gzip,
}

impl Algorithm {
    /// Its `content-encoding` token.
    fn token(self) -> &'static str {
        match self {
            Algorithm::Zstd => "zstd",
            Algorithm::Br => "br",
            Algorithm::Gzip => "gzip",
        }
    }

    /// Whether `coding` (from `Accept-Encoding`) names it; `x-gzip` is gzip (RFC 9110
    /// §8.4.1.3).
    fn is_named(self, coding: &[u8]) -> bool {
        coding.eq_ignore_ascii_case(self.token().as_bytes())
            || self == Algorithm::Gzip && coding.eq_ignore_ascii_case(b"x-gzip")
    }
}

/// How hard the codecs work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum Level {
    /// The cheapest setting of each codec (gzip 1, Brotli 1, zstd 1).
    Fastest,
    /// What each codec is tuned for on the fly (gzip 6, Brotli 4, zstd 3).
    #[default]
    Default,
    /// Smaller output for more CPU (gzip 9, Brotli 5, zstd 12).
    Best,
}

/// A codec's quality and its window (log2 bytes), the largest part of its memory.
struct Params {
    quality: u32,
    window_log: u32,
    /// zstd's match-finder tables (log2 entries), where the level's own would be far
    /// larger than its window.
    tables_log: Option<u32>,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Fastest => "fastest",
            Level::Default => "default",
            Level::Best => "best",
        }
    }

    /// The codec's settings at this level. Windows are capped at 256 KiB (Brotli) and
    /// 1 MiB (zstd) whatever the level: a proxy compresses many streams at once, and JSON
    /// and HTML gain little from longer ones. gzip's is always 32 KiB. Brotli stops at
    /// quality 5: from 6 on it costs several times the CPU for a percent or two, and from
    /// 9 on its hasher alone takes over 30 MiB per stream. zstd 12's tables are capped at
    /// 2^18 entries (its own are 2^22 and more: 42 MiB per stream with a 1 MiB window).
    fn params(self, algorithm: Algorithm) -> Params {
        let (quality, window_log) = match (algorithm, self) {
            (Algorithm::Gzip, Level::Fastest) => (1, 15),
            (Algorithm::Gzip, Level::Default) => (6, 15),
            (Algorithm::Gzip, Level::Best) => (9, 15),
            (Algorithm::Br, Level::Fastest) => (1, 18),
            (Algorithm::Br, Level::Default) => (4, 18),
            (Algorithm::Br, Level::Best) => (5, 18),
            (Algorithm::Zstd, Level::Fastest) => (1, 19),
            (Algorithm::Zstd, Level::Default) => (3, 20),
            (Algorithm::Zstd, Level::Best) => (12, 20),
        };
        Params {
            quality,
            window_log,
            tables_log: (algorithm == Algorithm::Zstd && self == Level::Best).then_some(18),
        }
    }
}

/// A `content_types` entry, lower case.
#[derive(Debug, Clone, PartialEq, Eq)]
enum MediaRange {
    /// `*/*`
    Any,
    /// `text/*`: the type, with its slash.
    Type(String),
    /// `application/json`
    Exact(String),
}

impl MediaRange {
    fn parse(text: &str) -> Result<MediaRange, String> {
        let lower = text.trim().to_ascii_lowercase();
        let token = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
        };
        match lower.split_once('/') {
            Some(("*", "*")) => Ok(MediaRange::Any),
            Some((kind, "*")) if token(kind) => Ok(MediaRange::Type(format!("{kind}/"))),
            Some((kind, sub)) if token(kind) && token(sub) => Ok(MediaRange::Exact(lower)),
            _ => Err(format!(
                "invalid media type {text:?}: expected \"type/subtype\" (\"application/json\"), \"type/*\" (\"text/*\") or \"*/*\""
            )),
        }
    }

    /// Whether it covers `essence` (a `type/subtype`, in any case). Wildcards leave
    /// `text/event-stream` out: a stream of events is compressed only when named.
    fn covers(&self, essence: &str) -> bool {
        match self {
            MediaRange::Exact(name) => name.eq_ignore_ascii_case(essence),
            _ if essence.eq_ignore_ascii_case("text/event-stream") => false,
            MediaRange::Any => true,
            MediaRange::Type(prefix) => starts_with_ignore_case(essence, prefix),
        }
    }
}

impl super::Settings for Settings {
    fn validate(&self) -> Result<(), Problem> {
        let at = |key: &str, i: usize| {
            let mut p = KeyPath::default().key(key);
            p.push_index(i);
            p
        };
        if self.algorithms.is_empty() {
            return Err((
                KeyPath::default().key("algorithms"),
                "expected at least one of \"zstd\", \"br\", \"gzip\"".into(),
            ));
        }
        for (i, a) in self.algorithms.iter().enumerate() {
            if self.algorithms[..i].contains(a) {
                return Err((
                    at("algorithms", i),
                    format!("{:?} is listed twice: list each algorithm once", a.token()),
                ));
            }
        }
        if self.content_types.is_empty() {
            return Err((
                KeyPath::default().key("content_types"),
                "expected at least one media type, such as \"text/*\" or \"application/json\""
                    .into(),
            ));
        }
        for (i, text) in self.content_types.iter().enumerate() {
            MediaRange::parse(text).map_err(|e| (at("content_types", i), e))?;
        }
        Ok(())
    }

    fn summary(&self) -> String {
        let algorithms: Vec<&str> = self.algorithms.iter().map(|a| a.token()).collect();
        format!(
            "algorithms={} min_size={} content_types={} level={}",
            super::list(&algorithms),
            self.min_size,
            super::list(&self.content_types),
            self.level.name()
        )
    }

    fn build(&self, _: &super::Build) -> Box<dyn Middleware> {
        Box::new(Compress {
            algorithms: self.algorithms.clone(),
            min_size: self.min_size.0,
            content_types: self
                .content_types
                .iter()
                .map(|t| MediaRange::parse(t).expect("validated"))
                .collect(),
            level: self.level,
        })
    }
}

struct Compress {
    algorithms: Vec<Algorithm>,
    min_size: u64,
    content_types: Vec<MediaRange>,
    level: Level,
}

/// What the request phase decided, kept for the response-body phase: the coding to use,
/// or why the request gets none. A request without `Accept-Encoding` keeps nothing.
#[derive(Clone, Copy)]
struct Negotiated(Result<Algorithm, &'static str>);

/// Why a request without `Accept-Encoding` gets no coding.
const NOT_ASKED: &str = "the request has no accept-encoding";

impl Middleware for Compress {
    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Context) -> Flow<'a> {
        let verdict = if req.method == Method::HEAD {
            Err("a HEAD request: its response has no body")
        } else if req.headers.contains_key(RANGE) {
            Err("the request asks for a range")
        } else if ctx.upgrade.is_some() || req.method == Method::CONNECT {
            Err("the request asks for an upgrade")
        } else if !req.headers.contains_key(ACCEPT_ENCODING) {
            return Flow::Continue;
        } else {
            self.negotiate(&req.headers)
        };
        ctx.state.insert(Negotiated(verdict));
        Flow::Continue
    }

    fn filters_response_body(&self) -> bool {
        true
    }

    fn on_response_body(&self, resp: &mut response::Parts, ctx: &mut Context) -> BodyPhase {
        let negotiated = ctx.state.remove::<Negotiated>();
        if let Err(reason) = self.compressible(resp) {
            return BodyPhase::Pass(reason);
        }
        // The answer depends on the request's Accept-Encoding from here on, whatever it is.
        if !varies_by_encoding(&resp.headers) {
            resp.headers
                .append(VARY, HeaderValue::from_static("accept-encoding"));
        }
        let algorithm = match negotiated.map_or(Err(NOT_ASKED), |n| n.0) {
            Ok(algorithm) => algorithm,
            Err(reason) => return BodyPhase::Pass(reason),
        };
        let length = resp
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| parse_length(v.as_bytes()));
        let encoder = match Encoder::new(algorithm, self.level, length) {
            Ok(encoder) => encoder,
            Err(_) => return BodyPhase::Pass("the codec could not be set up"),
        };
        let headers = &mut resp.headers;
        headers.insert(
            CONTENT_ENCODING,
            HeaderValue::from_static(algorithm.token()),
        );
        headers.remove(CONTENT_LENGTH);
        // Byte ranges of the coded body are not ranges of the app's.
        headers.remove(ACCEPT_RANGES);
        if let Some(weak) = headers.get(ETAG).and_then(weaken) {
            headers.insert(ETAG, weak);
        }
        BodyPhase::Filter(Box::new(encoder))
    }
}

impl Compress {
    /// The coding for a request's `Accept-Encoding`: the one with the highest q-value
    /// among `algorithms` (the first listed on a tie), unless the client prefers
    /// `identity` (named, or through `*`) to it.
    fn negotiate(&self, headers: &HeaderMap) -> Result<Algorithm, &'static str> {
        let mut best: Option<(Algorithm, u16)> = None;
        let mut identity = 0;
        let mut wildcard = None;
        let mut named = [None; 3];
        let mut identity_named = None;
        for (coding, q) in headers
            .get_all(ACCEPT_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .filter_map(coding)
        {
            if coding == b"*" {
                wildcard = Some(q);
            } else if coding.eq_ignore_ascii_case(b"identity") {
                identity_named = Some(q);
            } else if let Some(i) = self.algorithms.iter().position(|a| a.is_named(coding)) {
                named[i] = Some(q);
            }
        }
        if let Some(q) = identity_named.or(wildcard) {
            identity = q;
        }
        for (i, &algorithm) in self.algorithms.iter().enumerate() {
            let q = named[i].or(wildcard).unwrap_or(0);
            if q > 0 && best.is_none_or(|(_, b)| q > b) {
                best = Some((algorithm, q));
            }
        }
        match best {
            Some((algorithm, q)) if q >= identity => Ok(algorithm),
            Some(_) => Err("the client prefers identity to every coding it accepts"),
            None => Err("the client's accept-encoding accepts none of algorithms"),
        }
    }

    /// Whether a response with this head may be compressed at all; why not, if not.
    fn compressible(&self, resp: &response::Parts) -> Result<(), &'static str> {
        let status = resp.status;
        if status.is_informational() {
            return Err("an informational or upgrade response");
        }
        if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            return Err("a 204 or 304 response has no body");
        }
        if status == StatusCode::PARTIAL_CONTENT {
            return Err("a 206 partial response");
        }
        let headers = &resp.headers;
        if headers.contains_key(CONTENT_ENCODING) {
            return Err("the response has a content-encoding already");
        }
        if list_has(headers, CACHE_CONTROL, b"no-transform") {
            return Err("the response's cache-control says no-transform");
        }
        let Some(essence) = headers.get(CONTENT_TYPE).and_then(essence) else {
            return Err("the response has no content-type");
        };
        if starts_with_ignore_case(essence, "application/grpc") {
            return Err("a gRPC response (gRPC compresses its messages itself)");
        }
        if !self.content_types.iter().any(|t| t.covers(essence)) {
            return Err("its content-type is not in content_types");
        }
        let length = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| parse_length(v.as_bytes()));
        if length.is_some_and(|n| n < self.min_size) {
            return Err("its content-length is below min_size");
        }
        Ok(())
    }
}

/// One `Accept-Encoding` element: its coding and q-value in thousandths; `None` when
/// empty or its q-value is not one (RFC 9110 §12.4.2).
fn coding(element: &[u8]) -> Option<(&[u8], u16)> {
    let mut parts = element.split(|&b| b == b';');
    let coding = parts.next()?.trim_ascii();
    if coding.is_empty() {
        return None;
    }
    let mut q = 1000;
    for param in parts {
        let param = param.trim_ascii();
        let Some(eq) = param.iter().position(|&b| b == b'=') else {
            continue;
        };
        if param[..eq].trim_ascii().eq_ignore_ascii_case(b"q") {
            q = qvalue(param[eq + 1..].trim_ascii())?;
        }
    }
    Some((coding, q))
}

/// `0`, `0.5`, `1.000`: in thousandths.
fn qvalue(text: &[u8]) -> Option<u16> {
    let (whole, fraction) = match text.split_first()? {
        (b'0', rest) => (0, rest),
        (b'1', rest) => (1000, rest),
        _ => return None,
    };
    let digits = match fraction {
        [] => &[][..],
        [b'.', digits @ ..] if digits.len() <= 3 => digits,
        _ => return None,
    };
    let mut thousandths = 0u16;
    for (i, &d) in digits.iter().enumerate() {
        if !d.is_ascii_digit() {
            return None;
        }
        thousandths += u16::from(d - b'0') * [100, 10, 1][i];
    }
    (whole + thousandths <= 1000).then_some(whole + thousandths)
}

/// Whether `text` starts with `prefix`, ASCII case aside.
fn starts_with_ignore_case(text: &str, prefix: &str) -> bool {
    text.get(..prefix.len())
        .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
}

/// The `type/subtype` of a `content-type`, without its parameters.
fn essence(value: &HeaderValue) -> Option<&str> {
    let text = value.to_str().ok()?;
    let essence = text.split(';').next()?.trim();
    (!essence.is_empty()).then_some(essence)
}

/// Whether a comma-separated header (every line of it) has the token `token`.
fn list_has(headers: &HeaderMap, name: http::HeaderName, token: &[u8]) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
    })
}

/// Whether `vary` already covers `accept-encoding` (named, or `*`).
fn varies_by_encoding(headers: &HeaderMap) -> bool {
    list_has(headers, VARY, b"accept-encoding") || list_has(headers, VARY, b"*")
}

/// A strong ETag made weak (RFC 9110 §8.8.1: the coded body is not byte-for-byte the
/// app's); `None` when it is weak already.
fn weaken(etag: &HeaderValue) -> Option<HeaderValue> {
    let bytes = etag.as_bytes();
    if !bytes.starts_with(b"\"") {
        return None;
    }
    let mut weak = Vec::with_capacity(bytes.len() + 2);
    weak.extend_from_slice(b"W/");
    weak.extend_from_slice(bytes);
    HeaderValue::from_bytes(&weak).ok()
}

/// One response's compressor: the codec writes into a `Vec` that each call hands out.
struct Encoder {
    codec: Codec,
    level: Level,
}

enum Codec {
    Gzip(GzEncoder<Vec<u8>>),
    /// `None` once finished: Brotli's writer finishes only by giving its output up.
    Br(Option<Box<brotli::CompressorWriter<Vec<u8>>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

/// The smallest window (log2 bytes) Brotli is given for a small body: at quality 5, a
/// window of 64 KiB or less makes the brotli crate pick a hasher of 33 MiB.
const BROTLI_MIN_WINDOW: u32 = 17;

/// Brotli's staging buffer between its encoder and the `Vec`.
const BROTLI_BUFFER: usize = 4096;

impl Encoder {
    /// A compressor for a body of `length` bytes when known: Brotli's and zstd's windows
    /// shrink to fit a smaller body.
    fn new(algorithm: Algorithm, level: Level, length: Option<u64>) -> std::io::Result<Encoder> {
        let Params {
            quality,
            window_log,
            tables_log,
        } = level.params(algorithm);
        let codec = match algorithm {
            Algorithm::Gzip => Codec::Gzip(GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(quality),
            )),
            Algorithm::Br => {
                let fits =
                    length.map_or(window_log, |n| bits(n).clamp(BROTLI_MIN_WINDOW, window_log));
                Codec::Br(Some(Box::new(brotli::CompressorWriter::new(
                    Vec::new(),
                    BROTLI_BUFFER,
                    quality,
                    fits,
                ))))
            }
            Algorithm::Zstd => {
                let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), quality as i32)?;
                encoder.window_log(window_log)?;
                if let Some(log) = tables_log {
                    encoder.set_parameter(zstd::stream::raw::CParameter::HashLog(log))?;
                    encoder.set_parameter(zstd::stream::raw::CParameter::ChainLog(log))?;
                }
                // A known size lets zstd size its tables to the body (and says it in the
                // frame); the upstream's framing guarantees the length.
                encoder.set_pledged_src_size(length)?;
                Codec::Zstd(encoder)
            }
        };
        Ok(Encoder { codec, level })
    }

    fn algorithm(&self) -> Algorithm {
        match self.codec {
            Codec::Gzip(_) => Algorithm::Gzip,
            Codec::Br(_) => Algorithm::Br,
            Codec::Zstd(_) => Algorithm::Zstd,
        }
    }
}

/// The bits needed to hold `n` (its window log when it is a body's length).
fn bits(n: u64) -> u32 {
    u64::BITS - n.saturating_sub(1).leading_zeros()
}

fn finished() -> std::io::Error {
    std::io::Error::other("the compressed body has ended already")
}

impl BodyFilter for Encoder {
    fn filter(&mut self, data: Bytes, at: Boundary) -> std::io::Result<Bytes> {
        let out = match &mut self.codec {
            Codec::Gzip(gz) => {
                gz.write_all(&data)?;
                match at {
                    Boundary::More => {}
                    Boundary::Pause => gz.flush()?,
                    Boundary::End => gz.try_finish()?,
                }
                gz.get_mut()
            }
            Codec::Br(slot) => {
                let br = slot.as_mut().ok_or_else(finished)?;
                br.write_all(&data)?;
                match at {
                    Boundary::More => {}
                    Boundary::Pause => br.flush()?,
                    Boundary::End => {
                        let br = slot.take().ok_or_else(finished)?;
                        return Ok(Bytes::from(br.into_inner()));
                    }
                }
                br.get_mut()
            }
            Codec::Zstd(zstd) => {
                zstd.write_all(&data)?;
                match at {
                    Boundary::More => {}
                    Boundary::Pause => zstd.flush()?,
                    Boundary::End => zstd.do_finish()?,
                }
                zstd.get_mut()
            }
        };
        Ok(Bytes::from(std::mem::take(out)))
    }

    fn describe(&self) -> String {
        let algorithm = self.algorithm();
        format!(
            "compressed: {} at level {} (quality {})",
            algorithm.token(),
            self.level.name(),
            self.level.params(algorithm).quality
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn compress(algorithms: &[Algorithm]) -> Compress {
        Compress {
            algorithms: algorithms.to_vec(),
            min_size: 1024,
            content_types: default_content_types()
                .iter()
                .map(|t| MediaRange::parse(t).unwrap())
                .collect(),
            level: Level::Default,
        }
    }

    fn negotiate(c: &Compress, accept: &[&str]) -> Result<&'static str, &'static str> {
        let mut headers = HeaderMap::new();
        for value in accept {
            headers.append(ACCEPT_ENCODING, value.parse().unwrap());
        }
        c.negotiate(&headers).map(Algorithm::token)
    }

    #[test]
    fn negotiation_honours_q_values_identity_and_the_server_order() {
        use Algorithm::*;
        let c = compress(&[Zstd, Br, Gzip]);
        assert_eq!(negotiate(&c, &["gzip, br, zstd"]), Ok("zstd"));
        assert_eq!(negotiate(&c, &["gzip, deflate, br"]), Ok("br"));
        assert_eq!(negotiate(&c, &["gzip;q=1.0, br;q=0.8"]), Ok("gzip"));
        assert_eq!(negotiate(&c, &["gzip", "br"]), Ok("br"));
        assert_eq!(negotiate(&c, &["x-gzip"]), Ok("gzip"));
        assert_eq!(negotiate(&c, &["GZIP ; Q=0.5"]), Ok("gzip"));
        assert_eq!(negotiate(&c, &["*"]), Ok("zstd"));
        assert_eq!(negotiate(&c, &["*;q=0.5, zstd;q=0"]), Ok("br"));
        assert!(negotiate(&c, &["br;q=0, gzip;q=0, zstd;q=0"]).is_err());
        assert!(negotiate(&c, &["deflate"]).is_err());
        assert!(negotiate(&c, &["identity"]).is_err());
        assert!(negotiate(&c, &["gzip;q=0.5, identity"]).is_err());
        assert_eq!(negotiate(&c, &["gzip, identity;q=0.5"]), Ok("gzip"));
        // An unreadable q-value drops its element only.
        assert_eq!(
            negotiate(&c, &["br;q=2, gzip;q=0.1.2, zstd;q=abc, gzip"]),
            Ok("gzip")
        );
        let gzip_only = compress(&[Gzip]);
        assert!(negotiate(&gzip_only, &["br, zstd"]).is_err());
    }

    #[test]
    fn q_values() {
        assert_eq!(qvalue(b"0"), Some(0));
        assert_eq!(qvalue(b"1"), Some(1000));
        assert_eq!(qvalue(b"0.5"), Some(500));
        assert_eq!(qvalue(b"0.125"), Some(125));
        assert_eq!(qvalue(b"1.000"), Some(1000));
        for bad in [&b"1.5"[..], b"0.1234", b"2", b".5", b"", b"0,5"] {
            assert_eq!(qvalue(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn media_ranges() {
        let text = MediaRange::parse("Text/*").unwrap();
        assert!(text.covers("text/html"));
        assert!(text.covers("TEXT/Html"));
        assert!(!text.covers("TEXT/Event-Stream"));
        assert!(MediaRange::parse("application/json")
            .unwrap()
            .covers("Application/JSON"));
        assert!(!text.covers("text/event-stream"));
        assert!(!text.covers("application/json"));
        assert!(MediaRange::parse("text/event-stream")
            .unwrap()
            .covers("text/event-stream"));
        assert!(MediaRange::parse("*/*").unwrap().covers("image/png"));
        for bad in ["json", "*/json", "text/", "a b/c"] {
            assert!(MediaRange::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn etags_are_weakened_once() {
        let strong = HeaderValue::from_static("\"abc\"");
        assert_eq!(weaken(&strong).unwrap(), "W/\"abc\"");
        assert!(weaken(&HeaderValue::from_static("W/\"abc\"")).is_none());
    }

    /// Every codec at every level round-trips a body fed in pieces with pauses, and a
    /// pause makes everything fed so far decodable.
    #[test]
    fn every_codec_round_trips_and_flushes_at_a_pause() {
        let body: Vec<u8> = (0..100_000u32)
            .flat_map(|i| format!("{{\"id\":{i},\"name\":\"item {}\"}},", i % 97).into_bytes())
            .take(300_000)
            .collect();
        for algorithm in [Algorithm::Gzip, Algorithm::Br, Algorithm::Zstd] {
            for level in [Level::Fastest, Level::Default, Level::Best] {
                for length in [None, Some(body.len() as u64)] {
                    let mut encoder = Encoder::new(algorithm, level, length).unwrap();
                    let mut out = Vec::new();
                    let first = Bytes::copy_from_slice(&body[..1000]);
                    out.extend_from_slice(&encoder.filter(first, Boundary::More).unwrap());
                    out.extend_from_slice(&encoder.filter(Bytes::new(), Boundary::Pause).unwrap());
                    assert!(
                        decode(algorithm, &out, true).starts_with(&body[..1000]),
                        "{algorithm:?} {level:?}: a pause flushes"
                    );
                    for piece in body[1000..].chunks(7_777) {
                        let piece = Bytes::copy_from_slice(piece);
                        out.extend_from_slice(&encoder.filter(piece, Boundary::More).unwrap());
                    }
                    out.extend_from_slice(&encoder.filter(Bytes::new(), Boundary::End).unwrap());
                    assert_eq!(
                        decode(algorithm, &out, false),
                        body,
                        "{algorithm:?} {level:?}"
                    );
                }
            }
        }
    }

    /// Decodes `data`; `partial`: what a flushed but unfinished stream holds so far.
    fn decode(algorithm: Algorithm, data: &[u8], partial: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let result = match algorithm {
            Algorithm::Gzip => flate2::read::GzDecoder::new(data).read_to_end(&mut out),
            Algorithm::Br => brotli::Decompressor::new(data, 4096).read_to_end(&mut out),
            Algorithm::Zstd => zstd::stream::read::Decoder::new(data)
                .unwrap()
                .read_to_end(&mut out),
        };
        assert!(partial || result.is_ok(), "{algorithm:?}: {result:?}");
        out
    }
}
