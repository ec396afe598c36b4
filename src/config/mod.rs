//! The config file: schema, value types, `${VAR}` interpolation and validation.
//!
//! Loading goes: TOML syntax (with spans) → interpolation of every string value → typed
//! deserialization (unknown keys refused) → semantic checks. Past the syntax, every
//! problem is collected rather than the first returned: one [`ConfigError`] lists them
//! all, each naming the file, line and column, the key path and what was expected. The
//! JSON Schema editors use ([`Config::schema`]) is made from the same types.

pub mod audit;
pub mod env;
pub mod error;
pub mod redis;
pub mod schema;
mod suggest;
pub mod tracing;
pub mod value;

use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use http::Method;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use error::{ConfigError, KeyPath};
pub use value::UpstreamUrl;
use value::{ByteSize, Cidr, Duration, HttpMethod, ListenAddr, PathPattern};

use audit::{AuditConfig, RawAudit};
use tracing::{RawTracing, TracingConfig};

/// The most `[[middleware]]` entries one chain may hold (the chain tracks which of them
/// ran in a 64-bit set).
pub const MAX_MIDDLEWARES: usize = 64;

/// The typed settings of a `[[middleware]]` entry. The config parses the keys every entry
/// shares and leaves the rest to the layer that knows the types (`middleware::Spec`), so
/// it stays below the middlewares.
pub trait Entries: Sized + std::fmt::Debug {
    /// Every `type` an entry may have, for error messages.
    const TYPES: &'static [&'static str];
    /// Parses and checks the settings of a `type = kind` entry (shared keys removed), `kind`
    /// being one of [`Entries::TYPES`]; the key paths of the problems are relative to the
    /// entry.
    fn parse(kind: &str, settings: toml::Value) -> Result<Self, Vec<Problem>>;
    /// The schema of each type's settings (shared keys and `type` left out), by type.
    fn schemas(generator: &mut SchemaGenerator) -> Vec<(&'static str, Schema)>;
}

/// A validated config, ready to build a server from; `S` is the middleware settings type.
#[derive(Debug)]
pub struct Config<S> {
    pub file: PathBuf,
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub admin: Option<AdminConfig>,
    pub log: LogConfig,
    pub middleware: Vec<MiddlewareEntry<S>>,
    /// `[audit]`, when audit events are wanted.
    pub audit: Option<AuditConfig>,
    /// `[tracing]`, when spans are exported.
    pub tracing: Option<TracingConfig>,
}

/// The file as written. `server` and `upstream` are required, but read as options so
/// that a problem in one of them does not stop the rest of the file from being checked.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, bound = "")]
#[schemars(
    bound = "S: Entries",
    rename = "ProxyConfig",
    title = "gatehouse proxy.toml",
    description = "The config of gatehouse, a reverse-proxy sidecar: the public listener, the app behind it and the middleware chain between them. Every string value may use ${VAR} or ${VAR:-default} from the environment."
)]
struct RawConfig<S> {
    #[schemars(required)]
    server: Option<ServerConfig>,
    #[schemars(required)]
    upstream: Option<UpstreamConfig>,
    admin: Option<AdminConfig>,
    #[serde(default)]
    log: LogConfig,
    /// The chain, in request order: each entry names its `type` and that type's keys.
    #[serde(default)]
    #[schemars(schema_with = "entries_schema::<S>")]
    middleware: Vec<toml::Table>,
    audit: Option<RawAudit>,
    tracing: Option<RawTracing>,
    #[serde(skip)]
    #[schemars(skip)]
    entries: PhantomData<S>,
}

/// The schema of `middleware`: an array whose items are one of the types, told apart by
/// `type`, each with the keys every entry shares.
fn entries_schema<S: Entries>(generator: &mut SchemaGenerator) -> Schema {
    let common = Common::json_schema(generator);
    let types = S::schemas(generator)
        .into_iter()
        .map(|(kind, settings)| schema::tagged(kind, settings, &common))
        .collect();
    schema::array_of_one_of(types)
}

/// `[server]`: the public listener.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The address clients connect to.
    pub listen: ListenAddr,
    /// Runtime worker threads; 0 means one per CPU.
    #[serde(default)]
    pub workers: usize,
    /// The largest request head (request line and headers); larger ones get `431`.
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: ByteSize,
    /// The longest a client may take to send a request head.
    #[serde(default = "defaults::header_read_timeout")]
    pub header_read_timeout: Duration,
    /// The longest a request body may go without a byte arriving while it is read.
    #[serde(default = "defaults::body_read_timeout")]
    pub body_read_timeout: Duration,
    /// How long a client connection may sit idle between requests.
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: Duration,
    /// On SIGTERM, how long to keep serving (with `/readyz` failing) before draining, so
    /// load balancers stop sending first.
    #[serde(default = "defaults::zero")]
    pub shutdown_delay: Duration,
    /// How long in-flight requests get to finish once draining starts.
    #[serde(default = "defaults::shutdown_grace")]
    pub shutdown_grace: Duration,
    /// Peers whose `x-forwarded-for` is believed when finding the client address.
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    /// Protocols a client's `Upgrade` may switch the connection to, through a tunnel to
    /// the app; any other upgrade (h2c, say) is ignored and the request served as usual.
    #[serde(default = "defaults::upgrades")]
    pub upgrades: Vec<String>,
    /// What becomes of a request header whose name has an `_`.
    #[serde(default)]
    pub underscores_in_headers: Underscores,
    /// How the kernel weighs gatehouse's threads against the app's on a shared CPU.
    #[serde(default)]
    pub scheduling: Scheduling,
    /// Present: the public listener terminates TLS.
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`: PEM files, re-read on SIGHUP and when their content changes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key: PathBuf,
}

/// `[admin]`: the probe and metrics listener, on its own port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// The address of `/healthz`, `/readyz` and `/metrics`; not the public one.
    pub listen: ListenAddr,
    /// When set, the upstream is probed (a connect) this often and `/readyz` answers 503
    /// while the last probe failed, so a pod whose app is down leaves the endpoints.
    pub upstream_check: Option<Duration>,
    /// What `/readyz` waits for at start: `["redis"]` answers 503 until every Redis the
    /// config uses (shared rate limits, `redis_stream` sinks) has been connected to once,
    /// so a pod takes no traffic before its shared limiter works. Later outages leave it
    /// ready: `on_backend_error` decides then.
    #[serde(default)]
    pub ready_requires: Vec<ReadyRequirement>,
}

/// Something `/readyz` waits for at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReadyRequirement {
    /// Every Redis the config uses, connected to once.
    Redis,
}

/// `[upstream]`: the service gatehouse stands in front of.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `http://HOST:PORT` or `unix:/path/to/socket`.
    pub url: UpstreamUrl,
    /// The longest a connection to the app may take.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Duration,
    /// Time to the upstream's response head.
    #[serde(default = "defaults::upstream_timeout")]
    pub timeout: Duration,
    /// Send the client's `Host` to the app (else the upstream's host).
    #[serde(default = "defaults::yes")]
    pub preserve_host: bool,
    /// How long an idle pooled connection is kept: below the app's own keep-alive timeout,
    /// so gatehouse never sends a request on a connection the app is closing.
    #[serde(default = "defaults::pool_idle_timeout")]
    pub idle_timeout: Duration,
    /// The most connections to the app at once (per config generation).
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// The most requests waiting for a free connection; beyond, `503 upstream_overloaded`.
    #[serde(default = "defaults::max_pending")]
    pub max_pending: usize,
    /// What gatehouse speaks to the app.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
}

/// `server.underscores_in_headers`. WSGI, CGI and PHP map `x_auth_subject` and
/// `x-auth-subject` to one variable, so a client's underscored twin could shadow a header
/// the chain set: by default it is dropped before the chain (nginx's rule); `reject`
/// answers `400`, `allow` keeps it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Underscores {
    /// Removed before the chain.
    #[default]
    Drop,
    /// The request is refused `400`.
    Reject,
    /// Kept.
    Allow,
}

/// `server.scheduling` (Linux; elsewhere ignored). `batch` (the default) runs gatehouse's
/// threads under `SCHED_BATCH`, which never preempts the running task when a socket wakes
/// them: beside the app on a shared CPU, an app that writes a response's head and body in
/// two writes is no longer interrupted between them, so gatehouse wakes once per response
/// instead of twice, and a request costs about one context switch fewer. Alone on a core
/// it changes nothing. `normal` lets gatehouse preempt the app as soon as bytes arrive,
/// for the lowest latency next to an app that keeps its CPU busy.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scheduling {
    #[default]
    Batch,
    Normal,
}

/// `upstream.protocol`: HTTP/1.1, or HTTP/2 with prior knowledge (what gRPC apps serve).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1.
    #[default]
    Http1,
    /// HTTP/2 without TLS, with prior knowledge (gRPC apps).
    H2c,
}

impl std::fmt::Display for UpstreamProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2c => "h2c",
        })
    }
}

/// `[log]`: gatehouse's own log lines, on stderr.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A level (`error`, `warn`, `info`, `debug`, `trace`) or a filter such as
    /// `info,gatehouse=debug`.
    #[serde(default = "defaults::log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::default(),
            level: defaults::log_level(),
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
/// `log.format`: how log lines are written.
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable lines.
    Text,
}

/// One `[[middleware]]` entry: the keys every type accepts, and the type's own settings.
#[derive(Debug)]
pub struct MiddlewareEntry<S> {
    pub name: String,
    pub paths: Vec<PathPattern>,
    pub skip_paths: Vec<PathPattern>,
    pub methods: Vec<Method>,
    pub spec: S,
}

/// Keys every middleware entry accepts besides `type`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Common {
    /// Names the entry in logs, metrics, audit events and `explain`; defaults to its
    /// type, and must be unique in the chain.
    name: Option<String>,
    /// Run only for request paths matching one of these patterns (`*` within a segment,
    /// `**` below); empty: every path.
    #[serde(default)]
    paths: Vec<PathPattern>,
    /// Skip request paths matching one of these patterns.
    #[serde(default)]
    skip_paths: Vec<PathPattern>,
    /// Run only for these request methods; empty: every method.
    #[serde(default)]
    methods: Vec<HttpMethod>,
}

const COMMON_KEYS: [&str; 4] = ["name", "paths", "skip_paths", "methods"];

mod defaults {
    use super::{ByteSize, Duration};
    use std::time::Duration as D;

    pub fn max_header_bytes() -> ByteSize {
        ByteSize(64 << 10)
    }
    pub fn header_read_timeout() -> Duration {
        Duration(D::from_secs(10))
    }
    pub fn idle_timeout() -> Duration {
        Duration(D::from_secs(60))
    }
    pub fn body_read_timeout() -> Duration {
        Duration(D::from_secs(60))
    }
    pub fn max_connections() -> usize {
        1024
    }
    pub fn max_pending() -> usize {
        1024
    }
    pub fn zero() -> Duration {
        Duration(D::ZERO)
    }
    pub fn shutdown_grace() -> Duration {
        Duration(D::from_secs(20))
    }
    pub fn connect_timeout() -> Duration {
        Duration(D::from_secs(2))
    }
    pub fn upstream_timeout() -> Duration {
        Duration(D::from_secs(30))
    }
    pub fn pool_idle_timeout() -> Duration {
        Duration(D::from_secs(2))
    }
    pub fn yes() -> bool {
        true
    }
    pub fn log_level() -> String {
        "info".into()
    }
    pub fn upgrades() -> Vec<String> {
        vec!["websocket".into()]
    }
}

/// A problem found below some key, before it is placed in the file.
pub type Problem = (KeyPath, String);

/// serde's message for a required key that is not there.
const MISSING: &str = "missing field `";

/// Deserializes `value` into `T`, reporting the first failing key's path.
fn first_problem<T: DeserializeOwned>(value: toml::Value) -> Result<T, Problem> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut path = KeyPath::from_serde(e.path());
        let message = e.inner().message().to_owned();
        // serde names an unknown or missing key in the message, at its parent's path:
        // point at the key itself, so the line and column are the offending line's.
        for marker in ["unknown field `", MISSING] {
            if let Some(name) = message
                .strip_prefix(marker)
                .and_then(|rest| rest.split('`').next())
            {
                if !path.ends_with_key(name) {
                    path.push_key(name);
                }
            }
        }
        let message = suggest::unknown_key(&message, &[]).unwrap_or(message);
        (path, message)
    })
}

/// Deserializes `value` into `T`, collecting every problem instead of stopping at the
/// first: each failing key is taken out and the rest deserialized again, so what is left
/// still gets checked. Also returns the `T` built from what was left, if one could be
/// (a key whose value was refused then gets its default), so the caller can go on
/// checking what depends on it; only a result without problems is to be used.
fn deserialize_all<T: DeserializeOwned>(mut value: toml::Value) -> (Option<T>, Vec<Problem>) {
    let mut problems: Vec<Problem> = Vec::new();
    // What was taken out, as paths of the value as written.
    let mut removed: Vec<KeyPath> = Vec::new();
    loop {
        let (path, message) = match first_problem(value.clone()) {
            Ok(typed) => return (Some(typed), problems),
            Err(problem) => problem,
        };
        let written = path.before_removals(&removed);
        // A table that misses a required key cannot be built: it goes, and its parent
        // is tried without it (serde reports a missing key after every present one, so
        // nothing in the table is left unchecked). The root cannot go.
        let (take, take_written) = if message.starts_with(MISSING) {
            match (path.parent(), written.parent()) {
                (Some(p), Some(w)) if p != KeyPath::default() => (p, w),
                _ => {
                    problems.push((written, message));
                    return (None, problems);
                }
            }
        } else {
            (path, written.clone())
        };
        problems.push((written, message));
        if !take.remove_from(&mut value) {
            return (None, problems);
        }
        removed.push(take_written);
    }
}

/// `T` from `value`, or every problem found in it.
pub fn typed<T: DeserializeOwned>(value: toml::Value) -> Result<T, Vec<Problem>> {
    match deserialize_all(value) {
        (Some(typed), problems) if problems.is_empty() => Ok(typed),
        (_, problems) => Err(problems),
    }
}

/// Drops the "missing" reports of keys that another problem is about already (a refused
/// value is taken out, and then found missing).
fn settle(mut problems: Vec<Problem>) -> Vec<Problem> {
    let about: Vec<KeyPath> = problems
        .iter()
        .filter(|(_, m)| !m.starts_with(MISSING))
        .map(|(p, _)| p.clone())
        .collect();
    problems.retain(|(path, message)| {
        !message.starts_with(MISSING) || !about.iter().any(|p| p.starts_with(path))
    });
    problems.dedup();
    problems
}

/// The TOML document of `source` and its value with every `${VAR}` expanded; a value
/// that cannot be expanded is taken out and its problem returned. Only a syntax error
/// stops here: nothing after it can be read.
fn read_toml<'s>(
    file: &Path,
    source: &'s str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(toml_edit::ImDocument<&'s str>, toml::Value, Vec<Problem>), ConfigError> {
    let doc = toml_edit::ImDocument::parse(source).map_err(|e| {
        let message = format!("invalid TOML: {}", e.message().trim());
        ConfigError::at_span(file, source, e.span(), message)
    })?;
    let mut value: toml::Value = toml::from_str(source).map_err(|e| {
        let message = format!("invalid TOML: {}", e.message().trim());
        ConfigError::at_span(file, source, e.span(), message)
    })?;
    let mut problems = Vec::new();
    env::interpolate(&mut value, &mut KeyPath::default(), lookup, &mut problems);
    // Taken out last first, so the indexes of the ones still to go stay right.
    let mut failed: Vec<&KeyPath> = problems.iter().map(|(p, _)| p).collect();
    failed.sort_unstable_by(|a, b| b.cmp(a));
    for path in failed {
        path.remove_from(&mut value);
    }
    Ok((doc, value, problems))
}

/// Parses `source`, read from `file`, into `T`, with `${VAR}`s taken from `lookup`; also
/// returns the document, to place later problems in the file with
/// [`ConfigError::at_key`]. Every TOML file gatehouse reads besides the config
/// (`gatehouse test` cases) goes through here, so their errors look alike.
pub fn parse_toml<'s, T: DeserializeOwned>(
    file: &Path,
    source: &'s str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(T, toml_edit::ImDocument<&'s str>), ConfigError> {
    let (doc, value, mut problems) = read_toml(file, source, lookup)?;
    let (typed, more) = deserialize_all(value);
    problems.extend(more);
    match typed {
        Some(typed) if problems.is_empty() => Ok((typed, doc)),
        _ => Err(ConfigError::at_keys(
            file,
            source,
            doc.as_item(),
            settle(problems),
        )),
    }
}

impl<S: Entries> Config<S> {
    /// Reads, interpolates and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::file(path, format!("cannot read the config file: {e}")))?;
        Config::parse(path, &source, &|name| std::env::var(name).ok())
    }

    /// Parses `source` as if read from `file`, taking `${VAR}`s from `lookup`. Every
    /// problem in the file is reported, not just the first.
    pub fn parse(
        file: &Path,
        source: &str,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let (doc, value, mut problems) = read_toml(file, source, lookup)?;
        let (raw, more) = deserialize_all::<RawConfig<S>>(value);
        problems.extend(more);
        let config = raw.and_then(|raw| Self::from_raw(file, raw, lookup, &mut problems));
        match config {
            Some(config) if problems.is_empty() => Ok(config),
            _ => Err(ConfigError::at_keys(
                file,
                source,
                doc.as_item(),
                settle(problems),
            )),
        }
    }

    /// The JSON Schema (draft-07) of the file: what `gatehouse schema` prints, for
    /// editors to complete and check a config with. Made from the types the file is
    /// deserialized into, so it says what the loader accepts.
    pub fn schema() -> serde_json::Value {
        schema::generator()
            .into_root_schema_for::<RawConfig<S>>()
            .to_value()
    }

    /// Types the sections and entries of `raw`, adding what is wrong to `problems`; the
    /// config when `[server]` and `[upstream]` could be read.
    fn from_raw(
        file: &Path,
        raw: RawConfig<S>,
        lookup: &dyn Fn(&str) -> Option<String>,
        problems: &mut Vec<Problem>,
    ) -> Option<Self> {
        let root = KeyPath::default();
        let mut middleware: Vec<MiddlewareEntry<S>> = Vec::with_capacity(raw.middleware.len());
        for (i, table) in raw.middleware.into_iter().enumerate() {
            let mut base = root.key("middleware");
            base.push_index(i);
            let entry = match parse_entry(table) {
                Ok(entry) => entry,
                Err(found) => {
                    problems.extend(found.into_iter().map(|(p, m)| (base.join(&p), m)));
                    continue;
                }
            };
            if let Some(first) = middleware.iter().position(|m| m.name == entry.name) {
                problems.push((
                    base.key("name"),
                    format!(
                        "duplicate middleware name {:?} (also middleware[{}]): give one of them a distinct `name`",
                        entry.name,
                        first + 1
                    ),
                ));
            }
            middleware.push(entry);
        }
        if middleware.len() > MAX_MIDDLEWARES {
            problems.push((
                root.key("middleware"),
                format!(
                    "{} middlewares: at most {MAX_MIDDLEWARES} are supported",
                    middleware.len()
                ),
            ));
        }

        let below = |section: &str, found: Vec<Problem>| {
            let base = root.key(section);
            found.into_iter().map(move |(p, m)| (base.join(&p), m))
        };
        let tracing = match raw.tracing.map(|t| TracingConfig::from_raw(t, lookup)) {
            Some(Err(found)) => {
                problems.extend(below("tracing", found));
                None
            }
            Some(Ok(t)) => t,
            None => None,
        };
        let resource = || match &tracing {
            Some(t) => Ok(t.resource.clone()),
            None => tracing::resource(None, Default::default(), lookup),
        };
        let audit = match raw.audit.map(|a| AuditConfig::from_raw(a, &resource)) {
            Some(Err(found)) => {
                problems.extend(below("audit", found));
                None
            }
            Some(Ok(a)) => Some(a),
            None => None,
        };

        let mut required = |section: &str, present: bool| {
            let key = root.key(section);
            if !present && !problems.iter().any(|(p, _)| p.starts_with(&key)) {
                problems.push((key, format!("{MISSING}{section}`: add a [{section}] table")));
            }
        };
        required("server", raw.server.is_some());
        required("upstream", raw.upstream.is_some());
        let config = Config {
            file: file.to_owned(),
            server: raw.server?,
            upstream: raw.upstream?,
            admin: raw.admin,
            log: raw.log,
            middleware,
            audit,
            tracing,
        };
        config.validate(problems);
        Some(config)
    }
}

impl<S> Config<S> {
    /// The checks that need more than one key, or a range; adds what fails to `problems`.
    fn validate(&self, problems: &mut Vec<Problem>) {
        let key = |section: &str, name: &str| KeyPath::default().key(section).key(name);
        let mut refuse = |path: KeyPath, message: String| problems.push((path, message));
        let s = &self.server;
        if s.workers > 1024 {
            refuse(
                key("server", "workers"),
                format!("{} workers: expected 0 (one per CPU) up to 1024", s.workers),
            );
        }
        if !(1 << 10..=1 << 20).contains(&s.max_header_bytes.0) {
            refuse(
                key("server", "max_header_bytes"),
                format!("{}: expected between 1KiB and 1MiB", s.max_header_bytes),
            );
        }
        for (name, d) in [
            ("header_read_timeout", s.header_read_timeout),
            ("body_read_timeout", s.body_read_timeout),
            ("idle_timeout", s.idle_timeout),
        ] {
            if d.0.is_zero() {
                refuse(key("server", name), "expected a duration above zero".into());
            }
        }
        if let Some(tls) = &s.tls {
            for (name, path) in [("cert", &tls.cert), ("key", &tls.key)] {
                if path.as_os_str().is_empty() {
                    refuse(
                        KeyPath::default().key("server").key("tls").key(name),
                        "expected the path of a PEM file".into(),
                    );
                }
            }
        }
        if let Some(admin) = &self.admin {
            let (a, p) = (admin.listen.0, s.listen.0);
            if a.port() == p.port()
                && (a.ip() == p.ip() || a.ip().is_unspecified() || p.ip().is_unspecified())
            {
                refuse(
                    key("admin", "listen"),
                    format!(
                        "{a} overlaps server.listen {p}: the admin listener needs its own port"
                    ),
                );
            }
            if admin.upstream_check.is_some_and(|d| d.0.is_zero()) {
                refuse(
                    key("admin", "upstream_check"),
                    "expected a duration above zero (or leave it out to not probe)".into(),
                );
            }
        }
        let u = &self.upstream;
        for (name, d) in [
            ("connect_timeout", u.connect_timeout),
            ("timeout", u.timeout),
            ("idle_timeout", u.idle_timeout),
        ] {
            if d.0.is_zero() {
                refuse(
                    key("upstream", name),
                    "expected a duration above zero".into(),
                );
            }
        }
        if !(1..=1 << 20).contains(&u.max_connections) {
            refuse(
                key("upstream", "max_connections"),
                format!("{}: expected 1 up to 1048576", u.max_connections),
            );
        }
        if u.max_pending > 1 << 20 {
            refuse(
                key("upstream", "max_pending"),
                format!("{}: expected 0 up to 1048576", u.max_pending),
            );
        }
        for (i, upgrade) in s.upgrades.iter().enumerate() {
            if http::HeaderValue::from_str(upgrade).is_err()
                || upgrade.is_empty()
                || upgrade.contains([' ', ','])
            {
                let mut at = key("server", "upgrades");
                at.push_index(i);
                refuse(
                    at,
                    format!("{upgrade:?}: expected a protocol name such as \"websocket\""),
                );
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            refuse(
                key("log", "level"),
                format!(
                    "invalid level {:?}: expected error, warn, info, debug or trace",
                    self.log.level
                ),
            );
        }
    }

    /// Worker threads to run: `server.workers`, or one per CPU.
    pub fn workers(&self) -> usize {
        match self.server.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// Types one `[[middleware]]` entry; problems are relative to the entry.
fn parse_entry<S: Entries>(mut table: toml::Table) -> Result<MiddlewareEntry<S>, Vec<Problem>> {
    let type_key = || KeyPath::default().key("type");
    let kind = match table.remove("type") {
        Some(toml::Value::String(kind)) => kind,
        Some(_) => {
            let message = format!("expected a string, one of {}", S::TYPES.join(", "));
            return Err(vec![(type_key(), message)]);
        }
        None => {
            let message = format!("{MISSING}type`: expected one of {}", S::TYPES.join(", "));
            return Err(vec![(type_key(), message)]);
        }
    };
    let common_table: toml::Table = COMMON_KEYS
        .iter()
        .filter_map(|k| table.remove(*k).map(|v| (k.to_string(), v)))
        .collect();
    let (common, mut problems) = deserialize_all::<Common>(toml::Value::Table(common_table));
    if !S::TYPES.contains(&kind.as_str()) {
        problems.push((
            type_key(),
            suggest::unknown_name("middleware type", &kind, S::TYPES),
        ));
        return Err(problems);
    }
    let spec = S::parse(&kind, toml::Value::Table(table)).map_err(|found| {
        // An unknown key may be a misspelt one that every type has.
        let shared: Vec<&str> = COMMON_KEYS.iter().copied().chain(["type"]).collect();
        found
            .into_iter()
            .map(|(path, message)| {
                let message = suggest::unknown_key(&message, &shared).unwrap_or(message);
                (path, message)
            })
            .collect::<Vec<_>>()
    });
    match (common, spec) {
        (Some(common), Ok(spec)) if problems.is_empty() => Ok(MiddlewareEntry {
            name: common.name.unwrap_or(kind),
            paths: common.paths,
            skip_paths: common.skip_paths,
            methods: common.methods.into_iter().map(|m| m.0).collect(),
            spec,
        }),
        (_, Err(found)) => {
            problems.extend(found);
            Err(problems)
        }
        _ => Err(problems),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Two stand-in middleware types, so the config is tested without the real ones:
    /// `plain` has no keys, `sized` has a `max` size.
    #[derive(Debug)]
    pub(crate) enum TestEntry {
        Plain,
        Sized(ByteSize),
    }

    impl Entries for TestEntry {
        const TYPES: &'static [&'static str] = &["plain", "sized"];
        fn parse(kind: &str, settings: toml::Value) -> Result<Self, Vec<Problem>> {
            match kind {
                "plain" => typed::<Plain>(settings).map(|_| TestEntry::Plain),
                _ => typed::<Sized>(settings).map(|s| TestEntry::Sized(s.max)),
            }
        }
        fn schemas(generator: &mut SchemaGenerator) -> Vec<(&'static str, Schema)> {
            vec![
                ("plain", Plain::json_schema(generator)),
                ("sized", Sized::json_schema(generator)),
            ]
        }
    }

    #[derive(Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct Plain {}

    #[derive(Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct Sized {
        max: ByteSize,
    }

    pub(crate) type TestConfig = Config<TestEntry>;

    fn parse(src: &str) -> Result<TestConfig, String> {
        let env = |name: &str| (name == "SET").then(|| "from-env".to_owned());
        TestConfig::parse(Path::new("proxy.toml"), src, &env).map_err(|e| e.to_string())
    }

    const BASE: &str =
        "[server]\nlisten = \"127.0.0.1:8080\"\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(BASE).unwrap();
        assert_eq!(c.server.max_header_bytes.0, 64 << 10);
        assert_eq!(c.server.idle_timeout.0.as_secs(), 60);
        assert!(c.upstream.preserve_host);
        assert_eq!(
            c.upstream.url,
            UpstreamUrl::Tcp {
                host: "127.0.0.1".into(),
                port: 8000
            }
        );
        assert!(c.middleware.is_empty());
    }

    #[test]
    fn entries_keep_their_order_names_scopes_and_settings() {
        let c = parse(&format!(
            "{BASE}[[middleware]]\ntype = \"sized\"\nmax = \"2KiB\"\npaths = [\"/a/**\"]\n\
             [[middleware]]\ntype = \"plain\"\nname = \"p\"\nmethods = [\"post\"]\n"
        ))
        .unwrap();
        let [sized, plain] = &c.middleware[..] else {
            panic!("two entries: {:?}", c.middleware)
        };
        assert_eq!(sized.name, "sized");
        assert!(matches!(sized.spec, TestEntry::Sized(ByteSize(2048))));
        assert_eq!(sized.paths[0].to_string(), "/a/**");
        assert_eq!(plain.name, "p");
        assert!(matches!(plain.spec, TestEntry::Plain));
        assert_eq!(plain.methods, [Method::POST]);
    }

    #[test]
    fn errors_name_file_line_column_and_key() {
        let err = parse(&format!(
            "{BASE}[[middleware]]\ntype = \"plain\"\nheder = \"x\"\n"
        ))
        .unwrap_err();
        assert!(
            err.starts_with("proxy.toml:7:1: middleware[1].heder: unknown field `heder`"),
            "{err}"
        );

        let err = parse(&format!("{BASE}[[middleware]]\ntype = \"plain\"\n\n[[middleware]]\ntype = \"sized\"\nname = \"b2\"\nmax = \"5 parsecs\"\n")).unwrap_err();
        assert!(
            err.starts_with("proxy.toml:11:1: middleware[2].max: invalid size \"5 parsecs\""),
            "{err}"
        );

        let err =
            parse("[server]\nlisten = \"nope\"\n[upstream]\nurl = \"http://x:1\"\n").unwrap_err();
        assert!(
            err.starts_with("proxy.toml:2:1: server.listen: invalid listen address"),
            "{err}"
        );

        let err = parse("[server]\n[upstream]\nurl = \"http://x:1\"\n").unwrap_err();
        assert!(
            err.starts_with("proxy.toml:1:2: server.listen: missing field `listen`"),
            "{err}"
        );

        let err = parse(&format!("bogus = 1\n{BASE}")).unwrap_err();
        assert!(
            err.starts_with("proxy.toml:1:1: bogus: unknown field `bogus`"),
            "{err}"
        );
        let err = parse(&format!("{BASE}bogus = 1\n")).unwrap_err();
        assert!(
            err.starts_with("proxy.toml:5:1: upstream.bogus: unknown field `bogus`"),
            "{err}"
        );

        let err = parse("[server\n").unwrap_err();
        assert!(err.starts_with("proxy.toml:1:8: invalid TOML"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once_in_file_order() {
        let err = parse(
            "[server]\nlisten = \"${NOPE}\"\nworkers = 5000\n\
             [upstream]\nurl = \"ftp://x\"\ntimout = \"1s\"\n\
             [[middleware]]\ntype = \"sized\"\nmax = \"5 parsecs\"\npath = [\"/a\"]\n\
             [[middleware]]\ntype = \"sizd\"\n\
             [[middleware]]\ntype = \"plain\"\nmethods = [\"GET\", \"G E\", \"PUT\", \"P T\"]\n",
        )
        .unwrap_err();
        let lines: Vec<&str> = err.lines().collect();
        let want = [
            "proxy.toml:2:1: server.listen: environment variable NOPE is not set",
            "proxy.toml:5:1: upstream.url: invalid upstream url \"ftp://x\"",
            "proxy.toml:6:1: upstream.timout: unknown field `timout`",
            "proxy.toml:9:1: middleware[1].max: invalid size \"5 parsecs\"",
            "proxy.toml:10:1: middleware[1].path: unknown field `path`, expected `max`; did you mean `paths`?",
            "proxy.toml:12:1: middleware[2].type: unknown middleware type \"sizd\": expected one of plain, sized; did you mean \"sized\"?",
            "proxy.toml:15:19: middleware[3].methods[2]: invalid HTTP method \"G E\"",
            "proxy.toml:15:33: middleware[3].methods[4]: invalid HTTP method \"P T\"",
        ];
        assert_eq!(lines.len(), want.len(), "{err}");
        for (line, want) in lines.iter().zip(want) {
            assert!(line.starts_with(want), "{line}\nwanted {want}");
        }
        // Neither the refused `listen` nor the refused `url` is also reported missing, and
        // `workers` is not checked without a [server] that could be read.
        assert!(!err.contains("missing"), "{err}");
    }

    #[test]
    fn a_table_missing_a_required_key_does_not_hide_its_siblings() {
        let err = parse(&format!(
            "{BASE}[admin]\nupstream_check = \"0s\"\n[server.tls]\ncert = \"/c\"\n[log]\nlevel = 5\n"
        ))
        .unwrap_err();
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 3, "{err}");
        assert!(
            lines[0].contains("admin.listen: missing field `listen`"),
            "{err}"
        );
        assert!(
            lines[1].contains("server.tls.key: missing field `key`"),
            "{err}"
        );
        assert!(
            lines[2].contains("log.level: invalid type: integer"),
            "{err}"
        );
    }

    #[test]
    fn unknown_type_lists_the_known_ones() {
        let err = parse(&format!("{BASE}[[middleware]]\ntype = \"teleport\"\n")).unwrap_err();
        assert!(
            err.contains("middleware[1].type: unknown middleware type \"teleport\""),
            "{err}"
        );
        assert!(err.contains("plain, sized"), "{err}");
    }

    #[test]
    fn interpolation_and_missing_variables() {
        let c = parse("[server]\nlisten = \"127.0.0.1:${PORT:-9000}\"\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n").unwrap();
        assert_eq!(c.server.listen.0.port(), 9000);
        let err = parse("[server]\nlisten = \"${MISSING}\"\n[upstream]\nurl = \"http://x:1\"\n")
            .unwrap_err();
        assert!(
            err.starts_with(
                "proxy.toml:2:1: server.listen: environment variable MISSING is not set"
            ),
            "{err}"
        );
    }

    #[test]
    fn admin_and_tls_sections() {
        let c = parse(&format!(
            "{BASE}[server.tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n[admin]\nlisten = \"127.0.0.1:9901\"\nupstream_check = \"2s\"\n"
        ))
        .unwrap();
        assert_eq!(c.server.tls.unwrap().cert, PathBuf::from("/c.pem"));
        let admin = c.admin.unwrap();
        assert_eq!(admin.listen.0.port(), 9901);
        assert_eq!(admin.upstream_check.unwrap().0.as_secs(), 2);

        let err = parse(&format!("{BASE}[admin]\nlisten = \"0.0.0.0:8080\"\n")).unwrap_err();
        assert!(
            err.contains("admin.listen: 0.0.0.0:8080 overlaps server.listen"),
            "{err}"
        );
        let err = parse(&format!("{BASE}[admin]\nupstream_check = \"1s\"\n")).unwrap_err();
        assert!(
            err.contains("admin.listen: missing field `listen`"),
            "{err}"
        );
        let err = parse(&format!(
            "{BASE}[admin]\nlisten = \"127.0.0.1:1\"\nupstream_check = \"0s\"\n"
        ))
        .unwrap_err();
        assert!(
            err.contains("admin.upstream_check: expected a duration above zero"),
            "{err}"
        );
        let err = parse(&format!("{BASE}[server.tls]\ncert = \"/c.pem\"\n")).unwrap_err();
        assert!(err.contains("server.tls.key: missing field `key`"), "{err}");
    }

    #[test]
    fn duplicate_names_are_refused() {
        let err = parse(&format!(
            "{BASE}[[middleware]]\ntype = \"plain\"\n[[middleware]]\ntype = \"plain\"\n"
        ))
        .unwrap_err();
        assert!(
            err.contains("middleware[2].name: duplicate middleware name \"plain\""),
            "{err}"
        );
    }

    #[test]
    fn upstream_urls() {
        assert_eq!(
            "unix:/run/app.sock".parse::<UpstreamUrl>().unwrap(),
            UpstreamUrl::Unix("/run/app.sock".into())
        );
        assert_eq!(
            "http://app".parse::<UpstreamUrl>().unwrap(),
            UpstreamUrl::Tcp {
                host: "app".into(),
                port: 80
            }
        );
        assert_eq!(
            "http://[::1]:9".parse::<UpstreamUrl>().unwrap(),
            UpstreamUrl::Tcp {
                host: "::1".into(),
                port: 9
            }
        );
        assert!("https://app"
            .parse::<UpstreamUrl>()
            .unwrap_err()
            .contains("TLS"));
        assert!("unix:relative".parse::<UpstreamUrl>().is_err());
        assert!("http://app/path".parse::<UpstreamUrl>().is_err());
    }
}
