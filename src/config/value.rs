//! Value types of the config file: durations, sizes, rates, header names, CIDRs, path
//! patterns. Each parses from its TOML string once, at load, so the request path only
//! ever sees ready-made values, and each names what it expected when it refuses one.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use http::{HeaderName, HeaderValue, Method};
use ipnet::IpNet;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, Deserialize, Deserializer};
use serde::{Serialize, Serializer};

use super::schema;

/// Implements `Deserialize` through `FromStr`, so every value type reports its own
/// "expected ..." message and serde adds where in the file it was.
macro_rules! deserialize_from_str {
    ($($ty:ty),* $(,)?) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(de::Error::custom)
            }
        }
    )*};
}

deserialize_from_str!(
    Duration,
    ByteSize,
    Rate,
    HeaderNameValue,
    HeaderText,
    Cidr,
    HttpMethod,
    PathPattern,
    ListenAddr,
    UpstreamUrl,
);

/// Writes each value type as the string it is read from, so a default shows in the
/// schema as it would be written.
macro_rules! serialize_as_text {
    ($($ty:ty => $text:expr),* $(,)?) => {$(
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let text: fn(&$ty) -> String = $text;
                s.serialize_str(&text(self))
            }
        }
    )*};
}

serialize_as_text!(
    Duration => ToString::to_string,
    ByteSize => ToString::to_string,
    HeaderNameValue => |h| h.0.as_str().to_owned(),
    Cidr => ToString::to_string,
    HttpMethod => |m| m.0.as_str().to_owned(),
    PathPattern => ToString::to_string,
    ListenAddr => |a| a.0.to_string(),
    UpstreamUrl => ToString::to_string,
);

/// The schema of each value type: a string, described, with the pattern it must match
/// where one can say it (built from the same unit tables the parser reads).
macro_rules! string_schema {
    ($($ty:ty => $name:literal: $schema:expr),* $(,)?) => {$(
        impl JsonSchema for $ty {
            fn schema_name() -> Cow<'static, str> {
                $name.into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                $schema
            }
        }
    )*};
}

/// An HTTP token (RFC 9110 §5.6.2): what header names and methods are made of.
const TOKEN: &str = "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$";

string_schema!(
    Duration => "Duration": schema::pattern(
        "A whole number with a unit ms, s, m or h, e.g. \"250ms\", \"5s\", \"1m\".",
        &number_with_unit(DURATION_UNITS.map(|(unit, _)| unit)),
    ),
    ByteSize => "ByteSize": schema::pattern(
        "A whole number with a unit B, KiB, MiB, GiB (or KB, MB, GB for 1000-based), e.g. \"64KiB\".",
        &number_with_unit(SIZE_UNITS.map(|(unit, _)| unit)),
    ),
    Rate => "Rate": schema::pattern(
        "A count per s, m or h, e.g. \"100/s\", \"6000/m\".",
        &format!(
            "^\\s*0*[1-9][0-9]*\\s*/\\s*({})\\s*$",
            RATE_UNITS.map(|(unit, _)| unit).join("|")
        ),
    ),
    HeaderNameValue => "HeaderName": schema::pattern("An HTTP header name, e.g. \"x-request-id\".", TOKEN),
    HeaderText => "HeaderValue": schema::string("An HTTP header value: no control characters."),
    Cidr => "Cidr": schema::string("A network such as \"10.0.0.0/8\" or \"::1/128\", or one address."),
    HttpMethod => "HttpMethod": schema::pattern("An HTTP method such as \"GET\".", TOKEN),
    PathPattern => "PathPattern": schema::pattern(
        "A request path pattern: `*` matches within a segment, `**` anything below, e.g. \"/api/**\".",
        "^/",
    ),
    ListenAddr => "ListenAddr": schema::string("IP:PORT, e.g. \"0.0.0.0:8080\"."),
    UpstreamUrl => "UpstreamUrl": schema::pattern(
        "\"http://HOST:PORT\" or \"unix:/path/to/socket\".",
        "^(http://[^/]+/?|unix:/.*)$",
    ),
);

/// `^\s*[0-9]+\s*(u1|u2)\s*$`: what [`split_number`] accepts with one of `units`.
fn number_with_unit<const N: usize>(units: [&str; N]) -> String {
    format!("^\\s*[0-9]+\\s*({})\\s*$", units.join("|"))
}

/// Duration units, in milliseconds.
const DURATION_UNITS: [(&str, u64); 4] = [("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000)];

/// Size units, in bytes.
const SIZE_UNITS: [(&str, u64); 8] = [
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("KB", 1_000),
    ("kB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
];

/// Rate units, in seconds.
const RATE_UNITS: [(&str, u64); 3] = [("s", 1), ("m", 60), ("h", 3600)];

/// The factor of `unit` in `units`.
fn unit_factor(units: &[(&str, u64)], unit: &str) -> Option<u64> {
    units.iter().find(|(u, _)| *u == unit).map(|&(_, f)| f)
}

/// A duration written as `"250ms"`, `"5s"`, `"1m"` or `"1h"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Duration(pub std::time::Duration);

impl FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let expected = || {
            format!("invalid duration {s:?}: expected a whole number with a unit ms, s, m or h (e.g. \"250ms\", \"5s\", \"1m\")")
        };
        let (num, unit) = split_number(s.trim()).ok_or_else(expected)?;
        let ms_per_unit = unit_factor(&DURATION_UNITS, unit).ok_or_else(expected)?;
        let ms = num.checked_mul(ms_per_unit).ok_or_else(expected)?;
        Ok(Duration(std::time::Duration::from_millis(ms)))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        match ms {
            0 => f.write_str("0s"),
            _ if ms.is_multiple_of(3_600_000) => write!(f, "{}h", ms / 3_600_000),
            _ if ms.is_multiple_of(60_000) => write!(f, "{}m", ms / 60_000),
            _ if ms.is_multiple_of(1_000) => write!(f, "{}s", ms / 1_000),
            _ => write!(f, "{ms}ms"),
        }
    }
}

/// A byte size written as `"512KiB"`, `"1MiB"`, `"1GiB"`, `"100B"` (or `"64KB"` for 1000-based).
/// The unit is required, as a duration's is: a bare `"10"` could mean anything, so it is
/// refused rather than taken for bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let expected = || {
            format!("invalid size {s:?}: expected a whole number with a unit B, KiB, MiB or GiB (e.g. \"64KiB\", \"1MiB\")")
        };
        let (num, unit) = split_number(s.trim()).ok_or_else(expected)?;
        if unit.is_empty() {
            return Err(format!(
                "invalid size {s:?}: expected a unit after the number, such as \"{num}B\" (bytes), \"{num}KiB\" or \"{num}MiB\""
            ));
        }
        let mult = unit_factor(&SIZE_UNITS, unit).ok_or_else(expected)?;
        num.checked_mul(mult).map(ByteSize).ok_or_else(expected)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        match b {
            _ if b >= 1 << 30 && b.is_multiple_of(1 << 30) => write!(f, "{}GiB", b >> 30),
            _ if b >= 1 << 20 && b.is_multiple_of(1 << 20) => write!(f, "{}MiB", b >> 20),
            _ if b >= 1 << 10 && b.is_multiple_of(1 << 10) => write!(f, "{}KiB", b >> 10),
            _ => write!(f, "{b}B"),
        }
    }
}

/// A rate written as `"100/s"`, `"6000/m"` or `"1000/h"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub per: std::time::Duration,
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let expected = || {
            format!("invalid rate {s:?}: expected a positive whole number per s, m or h (e.g. \"100/s\", \"6000/m\")")
        };
        let (count, unit) = s.trim().split_once('/').ok_or_else(expected)?;
        let count: u64 = count.trim().parse().map_err(|_| expected())?;
        let secs = unit_factor(&RATE_UNITS, unit.trim()).ok_or_else(expected)?;
        if count == 0 {
            return Err(expected());
        }
        Ok(Rate {
            count,
            per: std::time::Duration::from_secs(secs),
        })
    }
}

/// An HTTP header name, validated and lower-cased at load.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HeaderNameValue(pub HeaderName);

impl FromStr for HeaderNameValue {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        HeaderName::from_bytes(s.as_bytes())
            .map(HeaderNameValue)
            .map_err(|_| {
                format!("invalid header name {s:?}: expected a token such as \"x-request-id\"")
            })
    }
}

/// An HTTP header value: visible ASCII or obs-text, no control characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderText(pub HeaderValue);

impl FromStr for HeaderText {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        HeaderValue::from_str(s).map(HeaderText).map_err(|_| {
            format!(
                "invalid header value {s:?}: control characters (such as newlines) are not allowed"
            )
        })
    }
}

/// An IP network (`"10.0.0.0/8"`, `"::1/128"`) or a single address (`"10.1.2.3"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

impl Cidr {
    /// Whether `ip` is inside; IPv4-mapped IPv6 addresses count as their IPv4 form, so
    /// `10.0.0.0/8` also covers a dual-stack socket's `::ffff:10.1.2.3`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(Cidr(net.trunc()));
        }
        s.parse::<IpAddr>()
            .map(|ip| Cidr(IpNet::from(ip)))
            .map_err(|_| {
                format!(
                    "invalid CIDR {s:?}: expected a network such as \"10.0.0.0/8\" or an address"
                )
            })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An HTTP method name such as `"GET"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpMethod(pub Method);

impl FromStr for HttpMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let upper = s.trim().to_ascii_uppercase();
        Method::from_bytes(upper.as_bytes())
            .map(HttpMethod)
            .map_err(|_| format!("invalid HTTP method {s:?}: expected a token such as \"GET\""))
    }
}

/// A request-path pattern: `*` matches within one segment, `**` matches anything below.
///
/// Compiled once into the cheapest matcher that serves: exact, prefix, or glob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathPattern {
    source: String,
    kind: PatternKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PatternKind {
    Exact,
    /// `/api/**`: everything below `/api/` (the stored prefix keeps its trailing slash).
    Prefix(String),
    Glob,
}

impl PathPattern {
    /// Whether `path` (the request path, without query) matches.
    pub fn matches(&self, path: &str) -> bool {
        match &self.kind {
            PatternKind::Exact => path == self.source,
            PatternKind::Prefix(prefix) => path.starts_with(prefix.as_str()),
            PatternKind::Glob => glob_match(self.source.as_bytes(), path.as_bytes()),
        }
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl FromStr for PathPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.starts_with('/') {
            return Err(format!(
                "invalid path pattern {s:?}: expected an absolute path such as \"/api/**\""
            ));
        }
        if s.contains("***") {
            return Err(format!(
                "invalid path pattern {s:?}: use '*' within a segment or '**' for anything below"
            ));
        }
        let kind = if !s.contains('*') {
            PatternKind::Exact
        } else if let Some(prefix) = s
            .strip_suffix("**")
            .filter(|p| !p.contains('*') && p.ends_with('/'))
        {
            PatternKind::Prefix(prefix.to_owned())
        } else {
            PatternKind::Glob
        };
        Ok(PathPattern {
            source: s.to_owned(),
            kind,
        })
    }
}

/// A listen address such as `"0.0.0.0:8080"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim().parse().map(ListenAddr).map_err(|_| {
            format!("invalid listen address {s:?}: expected IP:PORT such as \"0.0.0.0:8080\"")
        })
    }
}

/// Where the upstream is: `http://host:port` or `unix:/path/to/socket`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamUrl {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamUrl::Tcp { host, port } => write!(f, "http://{host}:{port}"),
            UpstreamUrl::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl FromStr for UpstreamUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let expected = || {
            format!("invalid upstream url {s:?}: expected \"http://HOST:PORT\" or \"unix:/path/to/socket\"")
        };
        if let Some(path) = s.strip_prefix("unix:") {
            return if path.starts_with('/') {
                Ok(UpstreamUrl::Unix(path.into()))
            } else {
                Err(expected())
            };
        }
        if s.starts_with("https://") {
            return Err(format!("invalid upstream url {s:?}: TLS to the upstream is not supported; a sidecar reaches its app over loopback with \"http://\""));
        }
        let uri: http::Uri = s.parse().map_err(|_| expected())?;
        if uri.scheme_str() != Some("http")
            || uri.path_and_query().is_some_and(|p| p.as_str() != "/")
        {
            return Err(expected());
        }
        let host = uri
            .host()
            .ok_or_else(expected)?
            .trim_matches(['[', ']'])
            .to_owned();
        Ok(UpstreamUrl::Tcp {
            host,
            port: uri.port_u16().unwrap_or(80),
        })
    }
}

/// A table of header names to values (`set = { "x-env" = "prod" }`), validated at load.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderPairs(pub Vec<(HeaderName, HeaderValue)>);

impl<'de> Deserialize<'de> for HeaderPairs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, HeaderText>::deserialize(d)?;
        map.into_iter()
            .map(|(name, value)| {
                Ok((
                    name.parse::<HeaderNameValue>()
                        .map_err(de::Error::custom)?
                        .0,
                    value.0,
                ))
            })
            .collect::<Result<_, _>>()
            .map(HeaderPairs)
    }
}

impl Serialize for HeaderPairs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(
            self.0
                .iter()
                .map(|(name, value)| (name.as_str(), String::from_utf8_lossy(value.as_bytes()))),
        )
    }
}

impl JsonSchema for HeaderPairs {
    fn schema_name() -> Cow<'static, str> {
        "HeaderPairs".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        schemars::json_schema!({
            "type": "object",
            "description": "Header names to values, e.g. { \"x-env\" = \"prod\" }.",
            "propertyNames": generator.subschema_for::<HeaderNameValue>(),
            "additionalProperties": generator.subschema_for::<HeaderText>(),
        })
    }
}

/// What a file named in the config holds, parsed from the file's bytes.
pub trait FileContent: Sized {
    fn parse(bytes: Vec<u8>) -> Result<Self, String>;
}

/// The raw bytes (a PEM key, say), checked by whoever uses them.
impl FileContent for Vec<u8> {
    fn parse(bytes: Vec<u8>) -> Result<Self, String> {
        Ok(bytes)
    }
}

/// A file named in the config (`keys_file`, `htpasswd_file`, ...), read and parsed when the
/// config is loaded (at start and on SIGHUP), so rotating what it holds is editing the file
/// and sending SIGHUP. Its errors name the file.
#[derive(Debug)]
pub struct ConfigFile<T> {
    pub path: PathBuf,
    pub content: T,
}

impl<'de, T: FileContent> Deserialize<'de> for ConfigFile<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let path = PathBuf::from(String::deserialize(d)?);
        let bytes = std::fs::read(&path)
            .map_err(|e| de::Error::custom(format!("cannot read {}: {e}", path.display())))?;
        let content =
            T::parse(bytes).map_err(|e| de::Error::custom(format!("{}: {e}", path.display())))?;
        Ok(ConfigFile { path, content })
    }
}

impl<T> JsonSchema for ConfigFile<T> {
    fn schema_name() -> Cow<'static, str> {
        "FilePath".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        schema::string(
            "The path of a file, read when the config is loaded (at start and on SIGHUP).",
        )
    }
}

/// Glob over bytes: `**` matches any run (slashes included), `*` any run without `/`.
fn glob_match(pat: &[u8], text: &[u8]) -> bool {
    match pat.first() {
        None => text.is_empty(),
        Some(b'*') if pat.get(1) == Some(&b'*') => {
            let rest = &pat[2..];
            (0..=text.len()).any(|i| glob_match(rest, &text[i..]))
        }
        Some(b'*') => {
            let rest = &pat[1..];
            let segment_end = text.iter().position(|&b| b == b'/').unwrap_or(text.len());
            (0..=segment_end).any(|i| glob_match(rest, &text[i..]))
        }
        Some(&c) => text.first() == Some(&c) && glob_match(&pat[1..], &text[1..]),
    }
}

/// Splits `"250ms"` into `(250, "ms")`.
fn split_number(s: &str) -> Option<(u64, &str)> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits == 0 {
        return None;
    }
    let num = s[..digits].parse().ok()?;
    Some((num, s[digits..].trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!("250ms".parse::<Duration>().unwrap().0.as_millis(), 250);
        assert_eq!("5s".parse::<Duration>().unwrap().0.as_secs(), 5);
        assert_eq!("1m".parse::<Duration>().unwrap().0.as_secs(), 60);
        assert_eq!("1h".parse::<Duration>().unwrap().0.as_secs(), 3600);
        for bad in ["", "5", "s", "5 parsecs", "-1s", "1.5s"] {
            let err = bad.parse::<Duration>().unwrap_err();
            assert!(err.contains("expected"), "{bad}: {err}");
        }
        assert_eq!("90s".parse::<Duration>().unwrap().to_string(), "90s");
        assert_eq!("120s".parse::<Duration>().unwrap().to_string(), "2m");
    }

    #[test]
    fn sizes() {
        assert_eq!("512KiB".parse::<ByteSize>().unwrap().0, 512 * 1024);
        assert_eq!("1MiB".parse::<ByteSize>().unwrap().0, 1 << 20);
        assert_eq!("100B".parse::<ByteSize>().unwrap().0, 100);
        assert_eq!("64KB".parse::<ByteSize>().unwrap().0, 64_000);
        assert!("1 parsec".parse::<ByteSize>().is_err());
        assert!("99999999999999GiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(64 << 10).to_string(), "64KiB");
    }

    #[test]
    fn a_size_without_a_unit_is_refused() {
        for bare in ["10", " 10 ", "0"] {
            let err = bare.parse::<ByteSize>().unwrap_err();
            assert!(
                err.contains("expected a unit after the number"),
                "{bare}: {err}"
            );
        }
        let err = "10".parse::<ByteSize>().unwrap_err();
        assert!(err.contains("\"10B\" (bytes)"), "{err}");
        assert_eq!("10B".parse::<ByteSize>().unwrap().0, 10);
    }

    #[test]
    fn rates() {
        let r: Rate = "6000/m".parse().unwrap();
        assert_eq!((r.count, r.per.as_secs()), (6000, 60));
        assert!("0/s".parse::<Rate>().is_err());
        assert!("10/d".parse::<Rate>().is_err());
        assert!("ten/s".parse::<Rate>().is_err());
    }

    #[test]
    fn cidrs() {
        let net: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.2.3.4".parse().unwrap()));
        assert!(net.contains("::ffff:10.2.3.4".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        let one: Cidr = "192.168.1.7".parse().unwrap();
        assert!(one.contains("192.168.1.7".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    }

    #[test]
    fn path_patterns() {
        let p = |s: &str| s.parse::<PathPattern>().unwrap();
        assert!(p("/api/*").matches("/api/x"));
        assert!(!p("/api/*").matches("/api/x/y"));
        assert!(p("/api/**").matches("/api/x"));
        assert!(p("/api/**").matches("/api/x/y/z"));
        assert!(!p("/api/**").matches("/apix"));
        assert!(!p("/api/**").matches("/api"));
        assert!(p("/healthz").matches("/healthz"));
        assert!(!p("/healthz").matches("/healthz/x"));
        assert!(p("/v1/*/items").matches("/v1/abc/items"));
        assert!(!p("/v1/*/items").matches("/v1/a/b/items"));
        assert!(p("/static/*.css").matches("/static/site.css"));
        assert!(p("/a/**/z").matches("/a/b/c/z"));
        assert!("api".parse::<PathPattern>().is_err());
    }

    #[test]
    fn headers_and_methods() {
        assert!("x-ok".parse::<HeaderNameValue>().is_ok());
        assert!("bad header".parse::<HeaderNameValue>().is_err());
        assert!("a\nb".parse::<HeaderText>().is_err());
        assert_eq!("get".parse::<HttpMethod>().unwrap().0, Method::GET);
    }
}
