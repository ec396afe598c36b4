//! `[audit]` and `[[audit.sinks]]`: parsed and checked at load, fixed for the process's life.

use std::path::PathBuf;

use serde::Deserialize;

use crate::config::tracing::Resource;
use crate::config::value::{ByteSize, Duration, HeaderNameValue, HeaderPairs};
use crate::config::{deserialize, KeyPath, Problem};

/// The validated `[audit]` section.
#[derive(Debug, PartialEq)]
pub struct AuditConfig {
    pub queue_capacity: usize,
    pub include: Include,
    pub request_headers: Vec<HeaderNameValue>,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub spool_dir: Option<PathBuf>,
    pub spool_max_bytes: ByteSize,
    /// How often the journals are fsynced: what a machine crash may lose.
    pub fsync_interval: Duration,
    pub sinks: Vec<SinkConfig>,
}

/// Which requests produce an event.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Include {
    #[default]
    All,
    /// Only requests that gatehouse or a middleware refused.
    Denied,
}

/// One `[[audit.sinks]]` entry.
#[derive(Debug, PartialEq)]
pub struct SinkConfig {
    /// Unique; defaults to the type. Labels the sink's metrics and names its spool.
    pub name: String,
    pub kind: SinkKind,
}

/// A sink's type and its own keys.
#[derive(Debug, PartialEq)]
pub enum SinkKind {
    Stdout,
    File(FileSettings),
    Http(HttpSettings),
    RedisStream(RedisSettings),
    Otlp(OtlpSettings),
}

/// The sink types `type` accepts.
pub const SINK_TYPES: [&str; 5] = ["stdout", "file", "http", "redis_stream", "otlp"];

/// `type = "otlp"`: the `http` sink's keys (`url` is the OTLP/HTTP logs endpoint, e.g.
/// `http://otel-collector:4318/v1/logs`), and the resource the records are about: the
/// `[tracing]` one, else the one `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` say.
#[derive(Debug, PartialEq)]
pub struct OtlpSettings {
    pub http: HttpSettings,
    pub resource: Resource,
}

/// `type = "redis_stream"`: `XADD` per event.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]` (or `rediss://` is refused: no TLS).
    pub url: String,
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Approximate length the stream is trimmed to (`MAXLEN ~`).
    #[serde(default = "default_maxlen")]
    pub maxlen: u64,
    /// For one batch, connecting included.
    #[serde(default = "default_http_timeout")]
    pub timeout: Duration,
}

fn default_stream() -> String {
    "gatehouse:audit".into()
}
fn default_maxlen() -> u64 {
    1_000_000
}

impl RedisSettings {
    fn validate(self) -> Result<RedisSettings, Problem> {
        let key = |name: &str| KeyPath::default().key(name);
        let tcp = self.url.starts_with("redis://") || self.url.starts_with("redis+unix://");
        if !tcp || redis::Client::open(self.url.as_str()).is_err() {
            return Err((
                key("url"),
                format!(
                    "invalid URL {:?}: expected redis://[user:password@]host:port[/db]",
                    self.url
                ),
            ));
        }
        if self.stream.is_empty() {
            return Err((key("stream"), "expected a stream name".into()));
        }
        if self.maxlen == 0 {
            return Err((key("maxlen"), "expected a length above zero".into()));
        }
        if self.timeout.0.is_zero() {
            return Err((key("timeout"), "expected a duration above zero".into()));
        }
        Ok(self)
    }
}

/// `type = "http"`: POSTs each batch as a JSON array.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// `http://host:port/path`.
    pub url: String,
    /// Sent with every POST (e.g. `authorization`).
    #[serde(default)]
    pub headers: HeaderPairs,
    /// For one attempt, connecting included.
    #[serde(default = "default_http_timeout")]
    pub timeout: Duration,
    /// Attempts after the first, on 5xx, 429, timeouts and connection errors.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// The wait before the first retry; doubled for each next one (with jitter).
    #[serde(default = "default_backoff")]
    pub backoff: Duration,
}

fn default_http_timeout() -> Duration {
    Duration(std::time::Duration::from_secs(5))
}
fn default_retries() -> u32 {
    5
}
fn default_backoff() -> Duration {
    Duration(std::time::Duration::from_millis(200))
}

impl HttpSettings {
    fn validate(self) -> Result<HttpSettings, Problem> {
        let key = |name: &str| KeyPath::default().key(name);
        let uri: ::http::Uri = self.url.parse().map_err(|_| {
            (
                key("url"),
                format!("invalid URL {:?}: expected http://host:port/path", self.url),
            )
        })?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err((
                key("url"),
                format!(
                    "invalid URL {:?}: expected http://host:port/path (https is not supported by this sink; send to a local collector)",
                    self.url
                ),
            ));
        }
        for (name, d) in [("timeout", self.timeout), ("backoff", self.backoff)] {
            if d.0.is_zero() {
                return Err((key(name), "expected a duration above zero".into()));
            }
        }
        if self.retries > 100 {
            return Err((
                key("retries"),
                format!("{}: expected 0 up to 100", self.retries),
            ));
        }
        Ok(self)
    }
}

/// `type = "file"`.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    pub path: PathBuf,
}

/// `type = "stdout"` has no keys of its own.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoKeys {}

/// `[audit]` as written, before the sinks are typed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAudit {
    #[serde(default = "default_queue_capacity")]
    queue_capacity: usize,
    #[serde(default)]
    include: Include,
    #[serde(default)]
    request_headers: Vec<HeaderNameValue>,
    #[serde(default = "default_batch_size")]
    batch_size: usize,
    #[serde(default = "default_flush_interval")]
    flush_interval: Duration,
    spool_dir: Option<PathBuf>,
    #[serde(default = "default_spool_max_bytes")]
    spool_max_bytes: ByteSize,
    #[serde(default = "default_fsync_interval")]
    fsync_interval: Duration,
    #[serde(default)]
    sinks: Vec<toml::Table>,
}

fn default_queue_capacity() -> usize {
    65536
}
fn default_spool_max_bytes() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_fsync_interval() -> Duration {
    Duration(std::time::Duration::from_secs(1))
}
fn default_batch_size() -> usize {
    256
}
fn default_flush_interval() -> Duration {
    Duration(std::time::Duration::from_secs(1))
}

/// The event's own fields: a `request_headers` entry may not shadow one.
pub const EVENT_FIELDS: [&str; 21] = [
    "ts",
    "request_id",
    "method",
    "host",
    "path",
    "query",
    "status",
    "duration_ms",
    "upstream_ms",
    "client_ip",
    "subject",
    "decision",
    "denied_by",
    "deny_reason",
    "fail_open",
    "bytes_in",
    "bytes_out",
    "completed",
    "trace_id",
    "span_id",
    "grpc_status",
];

/// The event field a request header is recorded under: `user-agent` → `user_agent`.
pub fn field_name(header: &HeaderNameValue) -> String {
    header.0.as_str().replace('-', "_")
}

impl AuditConfig {
    /// Types and checks `[audit]`; problems are located below `audit`. `resource` is what
    /// `otlp` sinks' records are about.
    pub(crate) fn from_raw(
        raw: RawAudit,
        resource: &dyn Fn() -> Result<Resource, String>,
    ) -> Result<AuditConfig, Problem> {
        let key = |name: &str| KeyPath::default().key(name);
        if !(1..=1 << 24).contains(&raw.queue_capacity) {
            return Err((
                key("queue_capacity"),
                format!("{}: expected 1 up to 16777216", raw.queue_capacity),
            ));
        }
        if !(1..=65536).contains(&raw.batch_size) {
            return Err((
                key("batch_size"),
                format!("{}: expected 1 up to 65536", raw.batch_size),
            ));
        }
        if raw.flush_interval.0.is_zero() {
            return Err((
                key("flush_interval"),
                "expected a duration above zero".into(),
            ));
        }
        let mut fields: Vec<String> = Vec::with_capacity(raw.request_headers.len());
        for (i, header) in raw.request_headers.iter().enumerate() {
            let field = field_name(header);
            if EVENT_FIELDS.contains(&field.as_str()) || fields.contains(&field) {
                let mut at = key("request_headers");
                at.push_index(i);
                return Err((
                    at,
                    format!("header {:?} would be recorded as the field {field:?}, which the event already has", header.0.as_str()),
                ));
            }
            fields.push(field);
        }
        if raw.spool_max_bytes.0 == 0 {
            return Err((key("spool_max_bytes"), "expected a size above zero".into()));
        }
        if raw.fsync_interval.0.is_zero() {
            return Err((
                key("fsync_interval"),
                "expected a duration above zero".into(),
            ));
        }
        if raw.sinks.is_empty() {
            return Err((
                key("sinks"),
                "[audit] needs at least one [[audit.sinks]] entry".into(),
            ));
        }
        let mut sinks: Vec<SinkConfig> = Vec::with_capacity(raw.sinks.len());
        for (i, table) in raw.sinks.into_iter().enumerate() {
            let mut base = key("sinks");
            base.push_index(i);
            let sink = parse_sink(table, resource).map_err(|(p, m)| (base.join(&p), m))?;
            if let Some(first) = sinks.iter().position(|s| s.name == sink.name) {
                return Err((
                    base.key("name"),
                    format!(
                        "duplicate sink name {:?} (also audit.sinks[{first}]): give one of them a distinct `name`",
                        sink.name
                    ),
                ));
            }
            sinks.push(sink);
        }
        Ok(AuditConfig {
            queue_capacity: raw.queue_capacity,
            include: raw.include,
            request_headers: raw.request_headers,
            batch_size: raw.batch_size,
            flush_interval: raw.flush_interval,
            spool_dir: raw.spool_dir,
            spool_max_bytes: raw.spool_max_bytes,
            fsync_interval: raw.fsync_interval,
            sinks,
        })
    }
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn parse_sink(
    mut table: toml::Table,
    resource: &dyn Fn() -> Result<Resource, String>,
) -> Result<SinkConfig, Problem> {
    let type_key = || KeyPath::default().key("type");
    let kind = match table.remove("type") {
        Some(toml::Value::String(kind)) => kind,
        Some(_) => return Err((type_key(), "expected a string such as \"file\"".into())),
        None => {
            return Err((
                type_key(),
                format!(
                    "missing field `type`: expected one of {}",
                    SINK_TYPES.join(", ")
                ),
            ))
        }
    };
    let name = match table.remove("name") {
        None => kind.clone(),
        Some(toml::Value::String(name)) if is_plain_name(&name) => name,
        Some(_) => return Err((
            KeyPath::default().key("name"),
            "expected a name of letters, digits, `-` and `_` (it names the sink's spool directory)"
                .into(),
        )),
    };
    let rest = toml::Value::Table(table);
    let kind = match kind.as_str() {
        "stdout" => deserialize::<NoKeys>(rest).map(|_| SinkKind::Stdout)?,
        "file" => SinkKind::File(deserialize(rest)?),
        "http" => SinkKind::Http(deserialize::<HttpSettings>(rest)?.validate()?),
        "redis_stream" => SinkKind::RedisStream(deserialize::<RedisSettings>(rest)?.validate()?),
        "otlp" => SinkKind::Otlp(OtlpSettings {
            http: deserialize::<HttpSettings>(rest)?.validate()?,
            resource: resource().map_err(|m| (type_key(), m))?,
        }),
        other => {
            return Err((
                type_key(),
                format!(
                    "unknown sink type {other:?}: expected one of {}",
                    SINK_TYPES.join(", ")
                ),
            ))
        }
    };
    Ok(SinkConfig { name, kind })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::tests::TestConfig;

    use super::*;

    fn parse(audit: &str) -> Result<AuditConfig, String> {
        let src = format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n{audit}"
        );
        TestConfig::parse(Path::new("proxy.toml"), &src, &|_| None)
            .map(|c| c.audit.expect("an [audit] section"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_sink_names() {
        let a = parse("[audit]\n[[audit.sinks]]\ntype = \"stdout\"\n[[audit.sinks]]\ntype = \"file\"\nname = \"f\"\npath = \"/tmp/a\"\n").unwrap();
        assert_eq!(a.queue_capacity, 65536);
        assert_eq!(a.include, Include::All);
        assert_eq!(a.batch_size, 256);
        assert_eq!(a.flush_interval.0.as_secs(), 1);
        assert_eq!(a.spool_dir, None);
        assert_eq!(a.spool_max_bytes.0, 1 << 30);
        assert_eq!(a.fsync_interval.0.as_secs(), 1);
        assert_eq!(a.sinks[0].name, "stdout");
        assert_eq!(a.sinks[0].kind, SinkKind::Stdout);
        assert_eq!(a.sinks[1].name, "f");
    }

    #[test]
    fn errors_are_located() {
        for (audit, expected) in [
            ("[audit]\n", "proxy.toml:5:2: audit.sinks: [audit] needs at least one"),
            (
                "[audit]\nqueue_capacity = 0\n[[audit.sinks]]\ntype = \"stdout\"\n",
                "proxy.toml:6:1: audit.queue_capacity: 0: expected 1 up to",
            ),
            (
                "[audit]\ninclude = \"some\"\n[[audit.sinks]]\ntype = \"stdout\"\n",
                "proxy.toml:6:1: audit.include: unknown variant `some`",
            ),
            (
                "[audit]\nflush_interval = \"0s\"\n[[audit.sinks]]\ntype = \"stdout\"\n",
                "proxy.toml:6:1: audit.flush_interval: expected a duration above zero",
            ),
            (
                "[audit]\nspool_dir = \"/s\"\nfsync_interval = \"0ms\"\n[[audit.sinks]]\ntype = \"stdout\"\n",
                "proxy.toml:7:1: audit.fsync_interval: expected a duration above zero",
            ),
            (
                "[audit]\nrequest_headers = [\"user-agent\", \"Host\"]\n[[audit.sinks]]\ntype = \"stdout\"\n",
                "audit.request_headers[1]: header \"host\" would be recorded as the field \"host\"",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"stdout\"\nname = \"../x\"\n",
                "proxy.toml:8:1: audit.sinks[0].name: expected a name of letters",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"kafka\"\n",
                "proxy.toml:7:1: audit.sinks[0].type: unknown sink type \"kafka\": expected one of stdout, file, http, redis_stream, otlp",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"file\"\n",
                "audit.sinks[0].path: missing field `path`",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"http\"\nurl = \"https://c/x\"\n",
                "proxy.toml:8:1: audit.sinks[0].url: invalid URL \"https://c/x\"",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"http\"\nurl = \"http://c/x\"\nheaders = { \"bad header\" = \"v\" }\n",
                "audit.sinks[0].headers: invalid header name",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"http\"\nurl = \"http://c/x\"\nbackoff = \"0s\"\n",
                "proxy.toml:9:1: audit.sinks[0].backoff: expected a duration above zero",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"redis_stream\"\nurl = \"http://r:6379\"\n",
                "proxy.toml:8:1: audit.sinks[0].url: invalid URL \"http://r:6379\": expected redis://",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"redis_stream\"\nurl = \"redis://r\"\nmaxlen = 0\n",
                "proxy.toml:9:1: audit.sinks[0].maxlen: expected a length above zero",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"stdout\"\npath = \"/x\"\n",
                "proxy.toml:8:1: audit.sinks[0].path: unknown field `path`",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"stdout\"\n[[audit.sinks]]\ntype = \"stdout\"\n",
                "audit.sinks[1].name: duplicate sink name \"stdout\" (also audit.sinks[0])",
            ),
        ] {
            let err = parse(audit).unwrap_err();
            assert!(err.contains(expected), "{audit}\n{err}");
        }
    }
}
