//! The config file: schema, value types, `${VAR}` interpolation and validation.
//!
//! Loading goes: TOML syntax (with spans) → interpolation of every string value → typed
//! deserialization (unknown keys refused) → semantic checks. Every failure becomes one
//! [`ConfigError`] naming the file, line and column, the key path and what was expected.

pub mod audit;
pub mod env;
pub mod error;
pub mod tracing;
pub mod value;

use std::path::{Path, PathBuf};

use http::Method;
use serde::de::DeserializeOwned;
use serde::Deserialize;

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
    /// Parses and checks the settings of a `type = kind` entry (shared keys removed); the
    /// key path of an error is relative to the entry.
    fn parse(kind: &str, settings: toml::Value) -> Result<Self, Problem>;
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: ServerConfig,
    upstream: UpstreamConfig,
    admin: Option<AdminConfig>,
    #[serde(default)]
    log: LogConfig,
    #[serde(default)]
    middleware: Vec<toml::Table>,
    audit: Option<RawAudit>,
    tracing: Option<RawTracing>,
}

/// `[server]`: the public listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: ListenAddr,
    /// Runtime worker threads; 0 means one per CPU.
    #[serde(default)]
    pub workers: usize,
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: ByteSize,
    #[serde(default = "defaults::header_read_timeout")]
    pub header_read_timeout: Duration,
    /// The longest a request body may go without a byte arriving while it is read.
    #[serde(default = "defaults::body_read_timeout")]
    pub body_read_timeout: Duration,
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: Duration,
    #[serde(default = "defaults::zero")]
    pub shutdown_delay: Duration,
    #[serde(default = "defaults::shutdown_grace")]
    pub shutdown_grace: Duration,
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
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key: PathBuf,
}

/// `[admin]`: the probe and metrics listener, on its own port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: ListenAddr,
    /// When set, the upstream is probed (a connect) this often and `/readyz` answers 503
    /// while the last probe failed, so a pod whose app is down leaves the endpoints.
    pub upstream_check: Option<Duration>,
}

/// `[upstream]`: the service gatehouse stands in front of.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub url: UpstreamUrl,
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Duration,
    /// Time to the upstream's response head.
    #[serde(default = "defaults::upstream_timeout")]
    pub timeout: Duration,
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
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Underscores {
    #[default]
    Drop,
    Reject,
    Allow,
}

/// `server.scheduling` (Linux; elsewhere ignored). `batch` (the default) runs gatehouse's
/// threads under `SCHED_BATCH`, which never preempts the running task when a socket wakes
/// them: beside the app on a shared CPU, an app that writes a response's head and body in
/// two writes is no longer interrupted between them, so gatehouse wakes once per response
/// instead of twice, and a request costs about one context switch fewer. Alone on a core
/// it changes nothing. `normal` lets gatehouse preempt the app as soon as bytes arrive,
/// for the lowest latency next to an app that keeps its CPU busy.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduling {
    #[default]
    Batch,
    Normal,
}

/// `upstream.protocol`: HTTP/1.1, or HTTP/2 with prior knowledge (what gRPC apps serve).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
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

/// `[log]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
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

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Common {
    name: Option<String>,
    #[serde(default)]
    paths: Vec<PathPattern>,
    #[serde(default)]
    skip_paths: Vec<PathPattern>,
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

/// Deserializes `value` into `T`, reporting the failing key's path.
pub fn deserialize<T: DeserializeOwned>(value: toml::Value) -> Result<T, Problem> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut path = KeyPath::from_serde(e.path());
        let message = e.inner().message().to_owned();
        // serde names an unknown or missing key in the message, at its parent's path:
        // point at the key itself, so the line and column are the offending line's.
        for marker in ["unknown field `", "missing field `"] {
            if let Some(name) = message
                .strip_prefix(marker)
                .and_then(|rest| rest.split('`').next())
            {
                if !path.ends_with_key(name) {
                    path.push_key(name);
                }
            }
        }
        (path, message)
    })
}

/// Parses `source`, read from `file`, into `T`, with `${VAR}`s taken from `lookup`; also
/// returns the document, to place later problems in the file with
/// [`ConfigError::at_key`]. Every TOML file gatehouse reads (the config, `gatehouse test`
/// cases) goes through here, so their errors look alike.
pub fn parse_toml<'s, T: DeserializeOwned>(
    file: &Path,
    source: &'s str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(T, toml_edit::ImDocument<&'s str>), ConfigError> {
    let invalid = |e: toml::de::Error| {
        let message = format!("invalid TOML: {}", e.message().trim());
        ConfigError::at_span(file, source, e.span(), message)
    };
    let doc = toml_edit::ImDocument::parse(source).map_err(|e| {
        let message = format!("invalid TOML: {}", e.message().trim());
        ConfigError::at_span(file, source, e.span(), message)
    })?;
    let at =
        |(path, message): Problem| ConfigError::at_key(file, source, doc.as_item(), path, message);
    let mut value: toml::Value = toml::from_str(source).map_err(invalid)?;
    env::interpolate(&mut value, &mut KeyPath::default(), lookup).map_err(at)?;
    let typed = deserialize(value).map_err(at)?;
    Ok((typed, doc))
}

impl<S: Entries> Config<S> {
    /// Reads, interpolates and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::file(path, format!("cannot read the config file: {e}")))?;
        Config::parse(path, &source, &|name| std::env::var(name).ok())
    }

    /// Parses `source` as if read from `file`, taking `${VAR}`s from `lookup`.
    pub fn parse(
        file: &Path,
        source: &str,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let (raw, doc): (RawConfig, _) = parse_toml(file, source, lookup)?;
        let at = |(path, message): Problem| {
            ConfigError::at_key(file, source, doc.as_item(), path, message)
        };

        let mut middleware = Vec::with_capacity(raw.middleware.len());
        for (i, table) in raw.middleware.into_iter().enumerate() {
            let mut base = KeyPath::default();
            base.push_key("middleware");
            base.push_index(i);
            let entry = parse_entry(table).map_err(|(p, m)| at((base.join(&p), m)))?;
            if let Some(first) = middleware
                .iter()
                .position(|m: &MiddlewareEntry<S>| m.name == entry.name)
            {
                return Err(at((
                    base.key("name"),
                    format!(
                        "duplicate middleware name {:?} (also middleware[{first}]): give one of them a distinct `name`",
                        entry.name
                    ),
                )));
            }
            middleware.push(entry);
        }
        if middleware.len() > MAX_MIDDLEWARES {
            return Err(at((
                KeyPath::default().key("middleware"),
                format!(
                    "{} middlewares: at most {MAX_MIDDLEWARES} are supported",
                    middleware.len()
                ),
            )));
        }

        let tracing = raw
            .tracing
            .map(|t| TracingConfig::from_raw(t, lookup))
            .transpose()
            .map_err(|(p, m)| at((KeyPath::default().key("tracing").join(&p), m)))?;
        let resource = || match &tracing {
            Some(t) => Ok(t.resource.clone()),
            None => tracing::resource(None, Default::default(), lookup),
        };
        let audit = raw
            .audit
            .map(|a| AuditConfig::from_raw(a, &resource))
            .transpose()
            .map_err(|(p, m)| at((KeyPath::default().key("audit").join(&p), m)))?;

        let config = Config {
            file: file.to_owned(),
            server: raw.server,
            upstream: raw.upstream,
            admin: raw.admin,
            log: raw.log,
            middleware,
            audit,
            tracing,
        };
        config.validate().map_err(at)?;
        Ok(config)
    }
}

impl<S> Config<S> {
    fn validate(&self) -> Result<(), Problem> {
        let key = |section: &str, name: &str| KeyPath::default().key(section).key(name);
        let s = &self.server;
        if s.workers > 1024 {
            return Err((
                key("server", "workers"),
                format!("{} workers: expected 0 (one per CPU) up to 1024", s.workers),
            ));
        }
        if !(1 << 10..=1 << 20).contains(&s.max_header_bytes.0) {
            return Err((
                key("server", "max_header_bytes"),
                format!("{}: expected between 1KiB and 1MiB", s.max_header_bytes),
            ));
        }
        for (name, d) in [
            ("header_read_timeout", s.header_read_timeout),
            ("body_read_timeout", s.body_read_timeout),
            ("idle_timeout", s.idle_timeout),
        ] {
            if d.0.is_zero() {
                return Err((key("server", name), "expected a duration above zero".into()));
            }
        }
        if let Some(tls) = &s.tls {
            for (name, path) in [("cert", &tls.cert), ("key", &tls.key)] {
                if path.as_os_str().is_empty() {
                    return Err((
                        KeyPath::default().key("server").key("tls").key(name),
                        "expected the path of a PEM file".into(),
                    ));
                }
            }
        }
        if let Some(admin) = &self.admin {
            let (a, p) = (admin.listen.0, s.listen.0);
            if a.port() == p.port()
                && (a.ip() == p.ip() || a.ip().is_unspecified() || p.ip().is_unspecified())
            {
                return Err((
                    key("admin", "listen"),
                    format!(
                        "{a} overlaps server.listen {p}: the admin listener needs its own port"
                    ),
                ));
            }
            if admin.upstream_check.is_some_and(|d| d.0.is_zero()) {
                return Err((
                    key("admin", "upstream_check"),
                    "expected a duration above zero (or leave it out to not probe)".into(),
                ));
            }
        }
        let u = &self.upstream;
        for (name, d) in [
            ("connect_timeout", u.connect_timeout),
            ("timeout", u.timeout),
            ("idle_timeout", u.idle_timeout),
        ] {
            if d.0.is_zero() {
                return Err((
                    key("upstream", name),
                    "expected a duration above zero".into(),
                ));
            }
        }
        if !(1..=1 << 20).contains(&u.max_connections) {
            return Err((
                key("upstream", "max_connections"),
                format!("{}: expected 1 up to 1048576", u.max_connections),
            ));
        }
        if u.max_pending > 1 << 20 {
            return Err((
                key("upstream", "max_pending"),
                format!("{}: expected 0 up to 1048576", u.max_pending),
            ));
        }
        if let Some(i) = s.upgrades.iter().position(|u| {
            http::HeaderValue::from_str(u).is_err() || u.is_empty() || u.contains([' ', ','])
        }) {
            let mut at = key("server", "upgrades");
            at.push_index(i);
            return Err((
                at,
                format!(
                    "{:?}: expected a protocol name such as \"websocket\"",
                    s.upgrades[i]
                ),
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err((
                key("log", "level"),
                format!(
                    "invalid level {:?}: expected error, warn, info, debug or trace",
                    self.log.level
                ),
            ));
        }
        Ok(())
    }

    /// Worker threads to run: `server.workers`, or one per CPU.
    pub fn workers(&self) -> usize {
        match self.server.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

fn parse_entry<S: Entries>(mut table: toml::Table) -> Result<MiddlewareEntry<S>, Problem> {
    let kind = match table.remove("type") {
        Some(toml::Value::String(kind)) => kind,
        Some(_) => {
            return Err((
                KeyPath::default().key("type"),
                "expected a string such as \"request_id\"".into(),
            ))
        }
        None => {
            return Err((
                KeyPath::default().key("type"),
                format!(
                    "missing field `type`: expected one of {}",
                    S::TYPES.join(", ")
                ),
            ))
        }
    };
    let common_table: toml::Table = COMMON_KEYS
        .iter()
        .filter_map(|k| table.remove(*k).map(|v| (k.to_string(), v)))
        .collect();
    let common: Common = deserialize(toml::Value::Table(common_table))?;
    let spec = S::parse(&kind, toml::Value::Table(table))?;
    Ok(MiddlewareEntry {
        name: common.name.unwrap_or(kind),
        paths: common.paths,
        skip_paths: common.skip_paths,
        methods: common.methods.into_iter().map(|m| m.0).collect(),
        spec,
    })
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
        fn parse(kind: &str, settings: toml::Value) -> Result<Self, Problem> {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Plain {}
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Sized {
                max: ByteSize,
            }
            match kind {
                "plain" => deserialize::<Plain>(settings).map(|_| TestEntry::Plain),
                "sized" => deserialize::<Sized>(settings).map(|s| TestEntry::Sized(s.max)),
                other => Err((
                    KeyPath::default().key("type"),
                    format!("unknown middleware type {other:?}: expected one of plain, sized"),
                )),
            }
        }
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
            err.starts_with("proxy.toml:7:1: middleware[0].heder: unknown field `heder`"),
            "{err}"
        );

        let err = parse(&format!("{BASE}[[middleware]]\ntype = \"plain\"\n\n[[middleware]]\ntype = \"sized\"\nname = \"b2\"\nmax = \"5 parsecs\"\n")).unwrap_err();
        assert!(
            err.starts_with("proxy.toml:11:1: middleware[1].max: invalid size \"5 parsecs\""),
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
    fn unknown_type_lists_the_known_ones() {
        let err = parse(&format!("{BASE}[[middleware]]\ntype = \"teleport\"\n")).unwrap_err();
        assert!(
            err.contains("middleware[0].type: unknown middleware type \"teleport\""),
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
            err.contains("middleware[1].name: duplicate middleware name \"plain\""),
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
