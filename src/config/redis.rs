//! Where a Redis is and how to log in: the `redis` table every Redis user in gatehouse takes
//! (`rate_limit`'s, the `redis_stream` sink's), so one server, a Sentinel-managed primary or
//! a Cluster is written the same way everywhere. Checked at load; [`RedisConnection::resolve`]
//! turns it into a [`Target`] with the TLS files read, at start and on every SIGHUP (so a
//! rotated password or certificate is picked up by a reload).

use std::path::PathBuf;

use redis::{ConnectionAddr, IntoConnectionInfo};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::config::{KeyPath, Problem};

/// The port sentinels listen on unless told otherwise.
const SENTINEL_PORT: u16 = 26379;

/// A Redis server, a Sentinel-managed primary or a Redis Cluster.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisConnection {
    /// `redis://[user:password@]host:port[/db]`, `rediss://…` (TLS), or
    /// `redis+sentinel://[user:password@]host:port[,host:port…]/PRIMARY[/db]` (the sentinels'
    /// addresses and the name they know the primary by). With `cluster = true`, one seed node.
    pub url: Option<String>,
    /// Redis Cluster: keys are spread over primaries, found from `nodes` (or `url`).
    #[serde(default)]
    pub cluster: bool,
    /// Cluster seed nodes, `host:port`; any one reachable tells the rest.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Sentinel: the name the sentinels know the primary by (with `sentinels`).
    pub sentinel_master: Option<String>,
    /// Sentinel: the sentinels' addresses, `host:port` (port 26379 when left out).
    #[serde(default)]
    pub sentinels: Vec<String>,
    /// ACL user (Redis 6+); the URL's user when left out.
    pub username: Option<String>,
    /// The password (use `${VAR}`); the URL's when left out. Re-read on SIGHUP.
    pub password: Option<String>,
    /// A file holding the password (a mounted Secret), read at start and on SIGHUP, so a
    /// rotated one is picked up by a reload; a final newline is not part of it.
    pub password_file: Option<PathBuf>,
    /// TLS to every node (and sentinel); implied by `rediss://`.
    #[serde(default)]
    pub tls: bool,
    /// PEM CA certificates the servers' certificates must chain to (else the system's).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that require one (`tls-auth-clients`).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
}

/// A checked [`RedisConnection`], files read: what a connection is made from.
#[derive(Clone)]
pub struct Target {
    pub kind: Topology,
    /// The logical database (`/db` in the URL); always 0 on a cluster.
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: Option<redis::TlsCertificates>,
}

/// How the primary (or primaries) are found.
#[derive(Clone, Debug, PartialEq)]
pub enum Topology {
    /// One server, `host:port`.
    Single(ConnectionAddr),
    /// Asks the sentinels for `master`'s address, and again after every failure.
    Sentinel {
        master: String,
        sentinels: Vec<ConnectionAddr>,
    },
    /// Redis Cluster from these seed nodes.
    Cluster(Vec<ConnectionAddr>),
}

impl Target {
    /// The servers, for logs and `explain` (never the credentials).
    pub fn describe(&self) -> String {
        let list = |addrs: &[ConnectionAddr]| {
            addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        match &self.kind {
            Topology::Single(addr) => addr.to_string(),
            Topology::Sentinel { master, sentinels } => {
                format!("primary {master:?} of sentinels {}", list(sentinels))
            }
            Topology::Cluster(nodes) => format!("cluster {}", list(nodes)),
        }
    }
}

/// A middleware entry's Redis, given as `redis_url` (the short form) or as a `redis` table,
/// checked (the problem located at the key given); `None` when the entry gives neither.
pub fn entry_redis(
    url: Option<&str>,
    table: Option<&RedisConnection>,
) -> Result<Option<RedisConnection>, Problem> {
    let at = |key: &str| KeyPath::default().key(key);
    match (url, table) {
        (Some(_), Some(_)) => Err((
            at("redis"),
            "give `redis_url` or a `redis` table, not both".into(),
        )),
        (Some(url), None) => {
            let connection = RedisConnection::from_url(url);
            // The short form's problems are all about its URL.
            match connection.resolve() {
                Ok(_) => Ok(Some(connection)),
                Err(problems) => {
                    let (_, message) = problems.into_iter().next().expect("a problem");
                    Err((at("redis_url"), message))
                }
            }
        }
        (None, Some(table)) => match table.resolve() {
            Ok(_) => Ok(Some(table.clone())),
            Err(problems) => {
                let (path, message) = problems.into_iter().next().expect("a problem");
                Err((at("redis").join(&path), message))
            }
        },
        (None, None) => Ok(None),
    }
}

impl RedisConnection {
    /// A connection to `url` and nothing else (the short forms `redis_url` and a sink's `url`).
    pub fn from_url(url: &str) -> RedisConnection {
        RedisConnection {
            url: Some(url.to_owned()),
            ..RedisConnection::default()
        }
    }

    /// Checks the keys and reads the TLS files: every problem, located below this table.
    pub fn resolve(&self) -> Result<Target, Vec<Problem>> {
        let at = |key: &str| KeyPath::default().key(key);
        let mut problems = Vec::new();
        let mut tls = self.tls;
        let (mut username, mut password, mut db) = (None, None, 0);
        let sentinel_url = self
            .url
            .as_deref()
            .and_then(|u| u.strip_prefix("redis+sentinel://"));
        let mut kind = None;
        match (&self.url, sentinel_url) {
            (Some(_), Some(rest)) => match parse_sentinel_url(rest) {
                Ok(parsed) => {
                    (username, password, db) = (parsed.username, parsed.password, parsed.db);
                    kind = Some(Topology::Sentinel {
                        master: parsed.master,
                        sentinels: parsed.sentinels,
                    });
                }
                Err(e) => problems.push((at("url"), e)),
            },
            (Some(url), None) => match url.as_str().into_connection_info() {
                Ok(info) => {
                    let (addr, redis) = (info.addr().clone(), info.redis_settings());
                    tls |= matches!(addr, ConnectionAddr::TcpTls { .. });
                    username = redis.username().map(str::to_owned);
                    password = redis.password().map(str::to_owned);
                    db = redis.db();
                    kind = Some(Topology::Single(plain(addr)));
                }
                Err(e) => problems.push((
                    at("url"),
                    format!("invalid Redis URL {url:?} ({e}): expected redis://[user:password@]host:port[/db], rediss://… or redis+sentinel://host:port[,host:port…]/PRIMARY"),
                )),
            },
            (None, _) => {}
        }
        let addrs = |key: &str, list: &[String], default_port: u16, problems: &mut Vec<Problem>| {
            let mut out = Vec::with_capacity(list.len());
            for (i, item) in list.iter().enumerate() {
                match host_port(item, default_port) {
                    Ok(addr) => out.push(addr),
                    Err(e) => {
                        let mut path = at(key);
                        path.push_index(i);
                        problems.push((path, e));
                    }
                }
            }
            out
        };
        if self.cluster {
            let mut nodes = addrs("nodes", &self.nodes, 6379, &mut problems);
            match kind.take() {
                Some(Topology::Single(seed)) if db == 0 => nodes.insert(0, seed),
                Some(Topology::Single(_)) => problems.push((at("url"), "a cluster has only database 0: leave /db out of the URL".into())),
                Some(Topology::Sentinel { .. }) => problems.push((at("cluster"), "a cluster is not found through sentinels: give its nodes in `nodes` (or one in a redis:// `url`)".into())),
                Some(Topology::Cluster(_)) | None => {}
            }
            if nodes.is_empty() && problems.is_empty() {
                problems.push((at("nodes"), "cluster = true needs seed nodes, e.g. nodes = [\"10.0.0.1:6379\", \"10.0.0.2:6379\"]".into()));
            }
            kind = Some(Topology::Cluster(nodes));
        } else if !self.nodes.is_empty() {
            problems.push((at("nodes"), "only used with cluster = true".into()));
        }
        match (&self.sentinel_master, self.sentinels.is_empty(), &kind) {
            (None, true, _) => {}
            (Some(master), false, None) if !master.is_empty() => {
                kind = Some(Topology::Sentinel {
                    master: master.clone(),
                    sentinels: addrs("sentinels", &self.sentinels, SENTINEL_PORT, &mut problems),
                });
            }
            (Some(_), false, None) => problems.push((at("sentinel_master"), "expected the primary's name, as the sentinels know it".into())),
            (Some(_), true, None) => problems.push((at("sentinels"), "sentinel_master needs the sentinels' addresses, e.g. sentinels = [\"10.0.0.1:26379\"]".into())),
            (None, false, None) => problems.push((at("sentinel_master"), "sentinels need the name they know the primary by, e.g. sentinel_master = \"mymaster\"".into())),
            (_, _, Some(_)) => problems.push((
                at(if self.sentinel_master.is_some() { "sentinel_master" } else { "sentinels" }),
                "give one of `url`, `nodes` (with cluster = true) and `sentinel_master` with `sentinels`".into(),
            )),
        }
        if kind.is_none() && problems.is_empty() {
            problems.push((
                at("url"),
                "expected where Redis is: `url` (redis://host:port), `nodes` with cluster = true, or `sentinel_master` with `sentinels`".into(),
            ));
        }
        for (key, own, from_url) in [
            ("username", &self.username, &mut username),
            ("password", &self.password, &mut password),
        ] {
            match (own, &from_url) {
                (Some(_), Some(_)) => problems.push((
                    at(key),
                    format!("the URL has a {key} already: give it in one place"),
                )),
                (Some(own), None) => *from_url = Some(own.clone()),
                _ => {}
            }
        }
        if let Some(path) = &self.password_file {
            match std::fs::read_to_string(path) {
                _ if password.is_some() => problems.push((
                    at("password_file"),
                    "a password is given already (`password` or the URL's): give it in one place"
                        .into(),
                )),
                Ok(text) if !text.trim_end_matches(['\r', '\n']).is_empty() => {
                    password = Some(text.trim_end_matches(['\r', '\n']).to_owned());
                }
                Ok(_) => problems.push((
                    at("password_file"),
                    format!("{} is empty: expected the password", path.display()),
                )),
                Err(e) => problems.push((
                    at("password_file"),
                    format!("cannot read {}: {e}", path.display()),
                )),
            }
        }
        if username.is_some() && password.is_none() {
            problems.push((
                at("password"),
                "an ACL `username` needs its `password`".into(),
            ));
        }
        let tls = match self.tls_files(tls) {
            Ok(tls) => tls,
            Err(found) => {
                problems.extend(found);
                None
            }
        };
        match kind {
            Some(kind) if problems.is_empty() => Ok(Target {
                kind,
                db,
                username,
                password,
                tls,
            }),
            _ => Err(problems),
        }
    }

    /// The certificates TLS is made with (`None` without TLS).
    fn tls_files(&self, tls: bool) -> Result<Option<redis::TlsCertificates>, Vec<Problem>> {
        let at = |key: &str| KeyPath::default().key(key);
        let mut problems = Vec::new();
        let mut read = |key: &str, path: &Option<PathBuf>| {
            let path = path.as_ref()?;
            if !tls {
                problems.push((
                    at(key),
                    "only used with TLS: a rediss:// URL or tls = true".into(),
                ));
                return None;
            }
            match std::fs::read(path) {
                Ok(bytes) if pem_blocks(&bytes) > 0 => Some(bytes),
                Ok(_) => {
                    problems.push((
                        at(key),
                        format!("{}: expected PEM (-----BEGIN …)", path.display()),
                    ));
                    None
                }
                Err(e) => {
                    problems.push((at(key), format!("cannot read {}: {e}", path.display())));
                    None
                }
            }
        };
        let root_cert = read("tls_ca_file", &self.tls_ca_file);
        let cert = read("tls_cert_file", &self.tls_cert_file);
        let key = read("tls_key_file", &self.tls_key_file);
        let client_tls = match (cert, key) {
            (Some(client_cert), Some(client_key)) => Some(redis::ClientTlsConfig {
                client_cert,
                client_key,
            }),
            (Some(_), None) => {
                problems.push((
                    at("tls_key_file"),
                    "tls_cert_file needs its private key".into(),
                ));
                None
            }
            (None, Some(_)) => {
                problems.push((
                    at("tls_cert_file"),
                    "tls_key_file needs its certificate".into(),
                ));
                None
            }
            (None, None) => None,
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(tls.then_some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }
}

/// How many PEM blocks `bytes` holds.
fn pem_blocks(bytes: &[u8]) -> usize {
    bytes.windows(11).filter(|w| w == b"-----BEGIN ").count()
}

/// `addr` without its TLS parameters (they are added where connections are made).
fn plain(addr: ConnectionAddr) -> ConnectionAddr {
    match addr {
        ConnectionAddr::TcpTls { host, port, .. } => ConnectionAddr::Tcp(host, port),
        other => other,
    }
}

/// `host:port` (or `host`, then `default_port`), IPv6 in brackets.
fn host_port(s: &str, default_port: u16) -> Result<ConnectionAddr, String> {
    let bad = || format!("invalid address {s:?}: expected host:port");
    let (host, port) = match s.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') || host.starts_with('[') => {
            (host, port.parse::<u16>().map_err(|_| bad())?)
        }
        _ => (s, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(['/', '@', ' ', ',']) {
        return Err(bad());
    }
    Ok(ConnectionAddr::Tcp(host.to_owned(), port))
}

/// What a `redis+sentinel://` URL says.
#[derive(Debug, PartialEq)]
struct SentinelUrl {
    username: Option<String>,
    password: Option<String>,
    sentinels: Vec<ConnectionAddr>,
    master: String,
    db: i64,
}

/// `[user:password@]host:port[,host:port…]/PRIMARY[/db]`: what follows `redis+sentinel://`.
fn parse_sentinel_url(rest: &str) -> Result<SentinelUrl, String> {
    let shape = "expected redis+sentinel://[user:password@]host:port[,host:port…]/PRIMARY[/db]";
    let (authority, path) = rest
        .split_once('/')
        .ok_or_else(|| format!("the primary's name is missing: {shape}"))?;
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let (username, password) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, ""))) {
        None => (None, None),
        Some((user, pass)) => (
            Some(percent_decode(user)?).filter(|u| !u.is_empty()),
            Some(percent_decode(pass)?).filter(|p| !p.is_empty()),
        ),
    };
    let sentinels = hosts
        .split(',')
        .map(|h| host_port(h, SENTINEL_PORT))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{e}: {shape}"))?;
    let mut parts = path.split('/');
    let master = parts.next().unwrap_or_default().to_owned();
    if master.is_empty() {
        return Err(format!("the primary's name is missing: {shape}"));
    }
    let db = match parts.next() {
        None | Some("") => 0,
        Some(db) => db
            .parse()
            .map_err(|_| format!("invalid database {db:?}: {shape}"))?,
    };
    if parts.next().is_some() {
        return Err(shape.to_owned());
    }
    Ok(SentinelUrl {
        username,
        password,
        sentinels,
        master,
        db,
    })
}

/// `%XX` escapes in a URL's user or password.
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("invalid %-escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(toml: &str) -> Result<Target, Vec<String>> {
        toml::from_str::<RedisConnection>(toml)
            .unwrap()
            .resolve()
            .map_err(|p| p.into_iter().map(|(k, m)| format!("{k}: {m}")).collect())
    }

    #[test]
    fn urls_give_the_topology_and_credentials() {
        let t = resolve("url = \"redis://app:s%40cret@r1:6380/2\"").unwrap();
        assert_eq!(
            t.kind,
            Topology::Single(ConnectionAddr::Tcp("r1".into(), 6380))
        );
        assert_eq!(
            (t.username.as_deref(), t.password.as_deref(), t.db),
            (Some("app"), Some("s@cret"), 2)
        );
        assert!(t.tls.is_none());
        let t = resolve("url = \"rediss://r1\"").unwrap();
        assert!(t.tls.is_some(), "rediss:// is TLS");
        let t = resolve("url = \"redis+sentinel://:pw@s1,s2:26380/mymaster/1\"").unwrap();
        assert_eq!(
            t.kind,
            Topology::Sentinel {
                master: "mymaster".into(),
                sentinels: vec![
                    ConnectionAddr::Tcp("s1".into(), 26379),
                    ConnectionAddr::Tcp("s2".into(), 26380)
                ]
            }
        );
        assert_eq!((t.password.as_deref(), t.db), (Some("pw"), 1));
        let t = resolve("sentinel_master = \"m\"\nsentinels = [\"[::1]:5000\"]\nusername = \"u\"\npassword = \"p\"").unwrap();
        assert_eq!(
            t.kind,
            Topology::Sentinel {
                master: "m".into(),
                sentinels: vec![ConnectionAddr::Tcp("::1".into(), 5000)]
            }
        );
        let t = resolve("cluster = true\nurl = \"redis://a:1\"\nnodes = [\"b:2\"]").unwrap();
        assert_eq!(
            t.kind,
            Topology::Cluster(vec![
                ConnectionAddr::Tcp("a".into(), 1),
                ConnectionAddr::Tcp("b".into(), 2)
            ])
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-a-secret\n").unwrap();
        let t = resolve(&format!("url = \"redis://r\"\npassword_file = {file:?}")).unwrap();
        assert_eq!(t.password.as_deref(), Some("from-a-secret"));
    }

    #[test]
    fn bad_settings_name_their_key() {
        for (toml, expected) in [
            ("", "url: expected where Redis is"),
            ("url = \"http://r\"", "url: invalid Redis URL \"http://r\""),
            (
                "url = \"redis+sentinel://s1\"",
                "url: the primary's name is missing",
            ),
            (
                "url = \"redis+sentinel://s1:x/m\"",
                "url: invalid address \"s1:x\"",
            ),
            ("cluster = true", "nodes: cluster = true needs seed nodes"),
            (
                "nodes = [\"a:1\"]\nurl = \"redis://r\"",
                "nodes: only used with cluster = true",
            ),
            (
                "cluster = true\nnodes = [\"a:b\"]",
                "nodes[1]: invalid address \"a:b\"",
            ),
            (
                "sentinels = [\"s:1\"]",
                "sentinel_master: sentinels need the name",
            ),
            (
                "sentinel_master = \"m\"",
                "sentinels: sentinel_master needs",
            ),
            (
                "url = \"redis://r\"\nsentinel_master = \"m\"\nsentinels = [\"s\"]",
                "sentinel_master: give one of",
            ),
            (
                "url = \"redis://:p@r\"\npassword = \"q\"",
                "password: the URL has a password already",
            ),
            (
                "url = \"redis://r\"\nusername = \"u\"",
                "password: an ACL `username` needs",
            ),
            (
                "url = \"redis://r\"\npassword = \"p\"\npassword_file = \"Cargo.toml\"",
                "password_file: a password is given already",
            ),
            (
                "url = \"redis://r\"\npassword_file = \"/nonexistent/pw\"",
                "password_file: cannot read /nonexistent/pw",
            ),
            (
                "url = \"redis://r\"\ntls_ca_file = \"/x\"",
                "tls_ca_file: only used with TLS",
            ),
            (
                "url = \"rediss://r\"\ntls_ca_file = \"/nonexistent/ca.pem\"",
                "tls_ca_file: cannot read /nonexistent/ca.pem",
            ),
            (
                "url = \"rediss://r\"\ntls_ca_file = \"Cargo.toml\"",
                "tls_ca_file: Cargo.toml: expected PEM",
            ),
        ] {
            let problems = resolve(toml)
                .err()
                .unwrap_or_else(|| panic!("{toml:?} was accepted"));
            assert!(
                problems.iter().any(|p| p.starts_with(expected)),
                "{toml:?}: {problems:?}"
            );
        }
    }
}
