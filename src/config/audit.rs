//! `[audit]` and `[[audit.sinks]]`: parsed and checked at load, fixed for the process's life.

use std::path::PathBuf;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

use crate::config::redis::RedisConnection;
use crate::config::tracing::Resource;
use crate::config::value::{ByteSize, Duration, HeaderNameValue, HeaderPairs};
use crate::config::{schema, suggest, typed, KeyPath, Problem};

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
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Include {
    /// Every request.
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

/// What an `otlp` sink is, for the schema (its keys are the `http` sink's).
const OTLP: &str = "`type = \"otlp\"`: OTLP/HTTP log records, with the `http` sink's keys; `url` is the logs endpoint, e.g. `http://otel-collector:4318/v1/logs`.";

/// `type = "otlp"`: the `http` sink's keys (`url` is the OTLP/HTTP logs endpoint, e.g.
/// `http://otel-collector:4318/v1/logs`), and the resource the records are about: the
/// `[tracing]` one, else the one `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` say.
#[derive(Debug, PartialEq)]
pub struct OtlpSettings {
    pub http: HttpSettings,
    pub resource: Resource,
}

/// `type = "redis_stream"`: `XADD` per event.
#[derive(Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]`, short for `redis = { url = … }`.
    pub url: Option<String>,
    /// Where Redis is (a server, Sentinel, Cluster) and how to log in, as every Redis user
    /// in gatehouse takes it. On a cluster the stream is one key, so it lives on the primary
    /// of its slot (CRC16 of the name, or of its `{hash tag}`).
    pub redis: Option<RedisConnection>,
    /// The stream events are added to.
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
    /// The Redis the stream is on.
    pub fn connection(&self) -> RedisConnection {
        match (&self.redis, &self.url) {
            (Some(redis), _) => redis.clone(),
            (None, Some(url)) => RedisConnection::from_url(url),
            (None, None) => RedisConnection::default(),
        }
    }

    /// What is wrong with the keys' values, every one of it.
    fn problems(&self) -> Vec<Problem> {
        let key = |name: &str| KeyPath::default().key(name);
        let mut problems = Vec::new();
        match (&self.url, &self.redis) {
            (None, None) => problems.push((
                key("url"),
                "expected `url` (redis://host:port) or a `redis` table".into(),
            )),
            (Some(_), Some(_)) => problems.push((
                key("redis"),
                "give `url` or a `redis` table, not both".into(),
            )),
            (Some(_), None) => {
                if let Err(found) = self.connection().resolve() {
                    problems.extend(found.into_iter().map(|(_, m)| (key("url"), m)));
                }
            }
            (None, Some(redis)) => {
                if let Err(found) = redis.resolve() {
                    problems.extend(found.into_iter().map(|(p, m)| (key("redis").join(&p), m)));
                }
            }
        }
        if self.stream.is_empty() {
            problems.push((key("stream"), "expected a stream name".into()));
        }
        if self.maxlen == 0 {
            problems.push((key("maxlen"), "expected a length above zero".into()));
        }
        if self.timeout.0.is_zero() {
            problems.push((key("timeout"), "expected a duration above zero".into()));
        }
        problems
    }
}

/// `type = "http"`: POSTs each batch as a JSON array.
#[derive(Debug, PartialEq, Deserialize, JsonSchema)]
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
    /// What is wrong with the keys' values, every one of it.
    fn problems(&self) -> Vec<Problem> {
        let key = |name: &str| KeyPath::default().key(name);
        let mut problems = Vec::new();
        match self.url.parse::<::http::Uri>() {
            Err(_) => problems.push((
                key("url"),
                format!("invalid URL {:?}: expected http://host:port/path", self.url),
            )),
            Ok(uri) if uri.scheme_str() != Some("http") || uri.authority().is_none() => problems.push((
                key("url"),
                format!(
                    "invalid URL {:?}: expected http://host:port/path (https is not supported by this sink; send to a local collector)",
                    self.url
                ),
            )),
            Ok(_) => {}
        }
        for (name, d) in [("timeout", self.timeout), ("backoff", self.backoff)] {
            if d.0.is_zero() {
                problems.push((key(name), "expected a duration above zero".into()));
            }
        }
        if self.retries > 100 {
            problems.push((
                key("retries"),
                format!("{}: expected 0 up to 100", self.retries),
            ));
        }
        problems
    }
}

/// `type = "file"`: one JSON event per line, appended.
#[derive(Debug, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    /// The file events are appended to (reopened on SIGHUP, for logrotate).
    pub path: PathBuf,
}

/// `type = "stdout"`: one JSON event per line; no keys of its own.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct NoKeys {}

/// `[audit]`: one event per request, sent to every sink.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Audit")]
pub(crate) struct RawAudit {
    /// Events that may wait for the sinks; beyond, events are dropped and counted.
    #[serde(default = "default_queue_capacity")]
    queue_capacity: usize,
    #[serde(default)]
    include: Include,
    /// Request headers recorded in each event, as fields named after them (`user-agent`
    /// becomes `user_agent`).
    #[serde(default)]
    request_headers: Vec<HeaderNameValue>,
    /// Events per write to a sink.
    #[serde(default = "default_batch_size")]
    batch_size: usize,
    /// The longest an event waits for its batch to fill.
    #[serde(default = "default_flush_interval")]
    flush_interval: Duration,
    /// Where events a sink could not take yet are journaled, so a restart loses none.
    spool_dir: Option<PathBuf>,
    /// The most a sink's spool may hold; beyond, its oldest events are dropped.
    #[serde(default = "default_spool_max_bytes")]
    spool_max_bytes: ByteSize,
    /// How often the journals are fsynced: what a machine crash may lose.
    #[serde(default = "default_fsync_interval")]
    fsync_interval: Duration,
    /// Where events go: each entry names its `type` and that type's keys.
    #[serde(default)]
    #[schemars(schema_with = "sinks_schema")]
    sinks: Vec<toml::Table>,
}

/// The schema of `[[audit.sinks]]`: each of [`SINK_TYPES`], told apart by `type`, with
/// `name`.
fn sinks_schema(generator: &mut SchemaGenerator) -> Schema {
    let shared = schemars::json_schema!({ "properties": { "name": {
        "type": "string",
        "description": "Unique; defaults to the type. Labels the sink's metrics and names its spool directory: letters, digits, `-` and `_`.",
        "pattern": "^[A-Za-z0-9_-]+$",
    } } });
    let types = SINK_TYPES
        .iter()
        .map(|&kind| {
            let settings = match kind {
                "stdout" => NoKeys::json_schema(generator),
                "file" => FileSettings::json_schema(generator),
                "http" => HttpSettings::json_schema(generator),
                "otlp" => {
                    let mut settings = HttpSettings::json_schema(generator);
                    settings.insert("description".into(), OTLP.into());
                    settings
                }
                "redis_stream" => RedisSettings::json_schema(generator),
                other => unreachable!("sink type {other} has no settings"),
            };
            schema::tagged(kind, settings, &shared)
        })
        .collect();
    schema::array_of_one_of(types)
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
    /// Whether `new` differs from this in more than what a reload applies to a running
    /// pipeline: the sinks' connection settings ([`RedisSettings::connection`]).
    pub fn needs_restart_for(&self, new: &AuditConfig) -> bool {
        let AuditConfig {
            queue_capacity,
            include,
            request_headers,
            batch_size,
            flush_interval,
            spool_dir,
            spool_max_bytes,
            fsync_interval,
            sinks,
        } = self;
        let same_sink = |(old, new): (&SinkConfig, &SinkConfig)| {
            old.name == new.name
                && match (&old.kind, &new.kind) {
                    (SinkKind::RedisStream(o), SinkKind::RedisStream(n)) => {
                        (&o.stream, o.maxlen, o.timeout) == (&n.stream, n.maxlen, n.timeout)
                    }
                    (o, n) => o == n,
                }
        };
        (
            queue_capacity,
            include,
            request_headers,
            batch_size,
            flush_interval,
            spool_dir,
            spool_max_bytes,
            fsync_interval,
        ) != (
            &new.queue_capacity,
            &new.include,
            &new.request_headers,
            &new.batch_size,
            &new.flush_interval,
            &new.spool_dir,
            &new.spool_max_bytes,
            &new.fsync_interval,
        ) || sinks.len() != new.sinks.len()
            || !sinks.iter().zip(&new.sinks).all(same_sink)
    }

    /// Types and checks `[audit]`; problems are located below `audit`. `resource` is what
    /// `otlp` sinks' records are about.
    pub(crate) fn from_raw(
        raw: RawAudit,
        resource: &dyn Fn() -> Result<Resource, String>,
    ) -> Result<AuditConfig, Vec<Problem>> {
        let key = |name: &str| KeyPath::default().key(name);
        let mut problems = Vec::new();
        if !(1..=1 << 24).contains(&raw.queue_capacity) {
            problems.push((
                key("queue_capacity"),
                format!("{}: expected 1 up to 16777216", raw.queue_capacity),
            ));
        }
        if !(1..=65536).contains(&raw.batch_size) {
            problems.push((
                key("batch_size"),
                format!("{}: expected 1 up to 65536", raw.batch_size),
            ));
        }
        if raw.flush_interval.0.is_zero() {
            problems.push((
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
                problems.push((
                    at,
                    format!("header {:?} would be recorded as the field {field:?}, which the event already has", header.0.as_str()),
                ));
            }
            fields.push(field);
        }
        if raw.spool_max_bytes.0 == 0 {
            problems.push((key("spool_max_bytes"), "expected a size above zero".into()));
        }
        if raw.fsync_interval.0.is_zero() {
            problems.push((
                key("fsync_interval"),
                "expected a duration above zero".into(),
            ));
        }
        if raw.sinks.is_empty() {
            problems.push((
                key("sinks"),
                "[audit] needs at least one [[audit.sinks]] entry".into(),
            ));
        }
        let mut sinks: Vec<SinkConfig> = Vec::with_capacity(raw.sinks.len());
        for (i, table) in raw.sinks.into_iter().enumerate() {
            let mut base = key("sinks");
            base.push_index(i);
            let sink = match parse_sink(table, resource) {
                Ok(sink) => sink,
                Err(found) => {
                    problems.extend(found.into_iter().map(|(p, m)| (base.join(&p), m)));
                    continue;
                }
            };
            if let Some(first) = sinks.iter().position(|s| s.name == sink.name) {
                problems.push((
                    base.key("name"),
                    format!(
                        "duplicate sink name {:?} (also audit.sinks[{}]): give one of them a distinct `name`",
                        sink.name,
                        first + 1
                    ),
                ));
            }
            sinks.push(sink);
        }
        if !problems.is_empty() {
            return Err(problems);
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

/// `T` from `value` when neither it nor its own checks (`problems`) have problems.
fn checked<T: serde::de::DeserializeOwned>(
    value: toml::Value,
    problems: impl Fn(&T) -> Vec<Problem>,
) -> Result<T, Vec<Problem>> {
    let t = typed::<T>(value)?;
    let found = problems(&t);
    if found.is_empty() {
        Ok(t)
    } else {
        Err(found)
    }
}

fn parse_sink(
    mut table: toml::Table,
    resource: &dyn Fn() -> Result<Resource, String>,
) -> Result<SinkConfig, Vec<Problem>> {
    let type_key = || KeyPath::default().key("type");
    let kind = match table.remove("type") {
        Some(toml::Value::String(kind)) => kind,
        Some(_) => {
            return Err(vec![(
                type_key(),
                "expected a string such as \"file\"".into(),
            )])
        }
        None => {
            return Err(vec![(
                type_key(),
                format!(
                    "missing field `type`: expected one of {}",
                    SINK_TYPES.join(", ")
                ),
            )])
        }
    };
    let name = match table.remove("name") {
        None => kind.clone(),
        Some(toml::Value::String(name)) if is_plain_name(&name) => name,
        Some(_) => {
            return Err(vec![(
            KeyPath::default().key("name"),
            "expected a name of letters, digits, `-` and `_` (it names the sink's spool directory)"
                .into(),
        )])
        }
    };
    let rest = toml::Value::Table(table);
    let kind = match kind.as_str() {
        "stdout" => typed::<NoKeys>(rest).map(|_| SinkKind::Stdout)?,
        "file" => SinkKind::File(typed(rest)?),
        "http" => SinkKind::Http(checked(rest, HttpSettings::problems)?),
        "redis_stream" => SinkKind::RedisStream(checked(rest, RedisSettings::problems)?),
        "otlp" => SinkKind::Otlp(OtlpSettings {
            http: checked(rest, HttpSettings::problems)?,
            resource: resource().map_err(|m| vec![(type_key(), m)])?,
        }),
        other => {
            return Err(vec![(
                type_key(),
                suggest::unknown_name("sink type", other, &SINK_TYPES),
            )])
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
    fn a_sinks_new_connection_settings_need_no_restart_its_other_keys_do() {
        let sink = |keys: &str| {
            parse(&format!(
                "[audit]\n[[audit.sinks]]\ntype = \"redis_stream\"\n{keys}\n"
            ))
            .unwrap()
        };
        let old = sink("redis = { url = \"redis://r\", username = \"u\", password = \"one\" }");
        let rotated = sink("redis = { url = \"redis://r\", username = \"u\", password = \"two\" }");
        assert!(!old.needs_restart_for(&rotated));
        let restream = sink(
            "redis = { url = \"redis://r\", username = \"u\", password = \"one\" }\nstream = \"s\"",
        );
        assert!(old.needs_restart_for(&restream));
        assert!(old.needs_restart_for(&parse("[audit]\nbatch_size = 1\n[[audit.sinks]]\ntype = \"redis_stream\"\nredis = { url = \"redis://r\", username = \"u\", password = \"one\" }\n").unwrap()));
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
                "audit.request_headers[2]: header \"host\" would be recorded as the field \"host\"",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"stdout\"\nname = \"../x\"\n",
                "proxy.toml:8:1: audit.sinks[1].name: expected a name of letters",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"kafka\"\n",
                "proxy.toml:7:1: audit.sinks[1].type: unknown sink type \"kafka\": expected one of stdout, file, http, redis_stream, otlp",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"file\"\n",
                "audit.sinks[1].path: missing field `path`",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"http\"\nurl = \"https://c/x\"\n",
                "proxy.toml:8:1: audit.sinks[1].url: invalid URL \"https://c/x\"",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"http\"\nurl = \"http://c/x\"\nheaders = { \"bad header\" = \"v\" }\n",
                "audit.sinks[1].headers: invalid header name",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"http\"\nurl = \"http://c/x\"\nbackoff = \"0s\"\n",
                "proxy.toml:9:1: audit.sinks[1].backoff: expected a duration above zero",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"redis_stream\"\nurl = \"http://r:6379\"\n",
                "proxy.toml:8:1: audit.sinks[1].url: invalid Redis URL \"http://r:6379\"",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"redis_stream\"\nredis = { cluster = true, nodes = [\"a\", \"b:70000\"] }\n",
                "proxy.toml:8:41: audit.sinks[1].redis.nodes[2]: invalid address \"b:70000\"",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"redis_stream\"\nurl = \"redis://r\"\nredis = { url = \"redis://r\" }\n",
                "audit.sinks[1].redis: give `url` or a `redis` table, not both",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"redis_stream\"\n",
                "audit.sinks[1].url: expected `url` (redis://host:port) or a `redis` table",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"redis_stream\"\nurl = \"redis://r\"\nmaxlen = 0\n",
                "proxy.toml:9:1: audit.sinks[1].maxlen: expected a length above zero",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"stdout\"\npath = \"/x\"\n",
                "proxy.toml:8:1: audit.sinks[1].path: unknown field `path`",
            ),
            (
                "[audit]\n[[audit.sinks]]\ntype = \"stdout\"\n[[audit.sinks]]\ntype = \"stdout\"\n",
                "audit.sinks[2].name: duplicate sink name \"stdout\" (also audit.sinks[1])",
            ),
        ] {
            let err = parse(audit).unwrap_err();
            assert!(err.contains(expected), "{audit}\n{err}");
        }
    }
}
