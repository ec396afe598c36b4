//! `api_key`: a shared secret in a header (`x-api-key`) or a query parameter. Keys are
//! compared by SHA-256 digest against every configured key without an early exit, so the
//! time taken says nothing about which key, or how much of one, matched.

use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{request, HeaderName, HeaderValue, Uri};
use schemars::JsonSchema;
use serde::Deserialize;
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::auth::{colon_entries, digest, unauthorized};
use crate::chain::{Context, Flow, Middleware, Reason};
use crate::config::value::{ConfigFile, FileContent, HeaderNameValue};
use crate::config::{KeyPath, Problem};

/// `api_key`: a key in a header or query parameter; `401` without a known one.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Header carrying the key; the default when `query` is not set.
    header: Option<HeaderNameValue>,
    /// Query parameter carrying the key, instead of a header.
    query: Option<String>,
    /// The accepted keys; the id becomes the request's subject.
    #[serde(default)]
    keys: Vec<KeyEntry>,
    /// `id:key` lines, read at every (re)load of the config.
    keys_file: Option<ConfigFile<Vec<KeyEntry>>>,
    /// Remove the credential before the request goes upstream.
    #[serde(default = "super::auth::yes")]
    strip: bool,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    /// Who holds the key: logged and audited, never the key.
    id: String,
    /// The key itself (use `${VAR}` to keep it out of the file).
    key: String,
}

/// Only the id: a secret must not end up in a log line.
impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.id)
    }
}

/// A `keys_file` holds `id:key` lines; blank lines and lines starting with `#` are skipped.
impl FileContent for Vec<KeyEntry> {
    fn parse(bytes: Vec<u8>) -> Result<Self, String> {
        colon_entries(&bytes, "id:key")?
            .map(|entry| {
                let (_, id, key) = entry?;
                Ok(KeyEntry {
                    id: id.to_owned(),
                    key: key.to_owned(),
                })
            })
            .collect()
    }
}

impl Settings {
    fn all_keys(&self) -> impl Iterator<Item = &KeyEntry> {
        self.keys
            .iter()
            .chain(self.keys_file.iter().flat_map(|f| &f.content))
    }
}

impl super::Settings for Settings {
    fn validate(&self) -> Result<(), Problem> {
        let at = KeyPath::default();
        if self.header.is_some() && self.query.is_some() {
            return Err((
                at.key("query"),
                "set either `header` or `query`, not both".into(),
            ));
        }
        if self.query.as_deref() == Some("") {
            return Err((at.key("query"), "the query parameter name is empty".into()));
        }
        if let Some(i) = self.keys.iter().position(|k| k.key.is_empty()) {
            let mut path = at.key("keys");
            path.push_index(i);
            return Err((path.key("key"), "the key is empty".into()));
        }
        if self.all_keys().next().is_none() {
            return Err((
                at.key("keys"),
                "an api_key middleware needs `keys` or a non-empty `keys_file`".into(),
            ));
        }
        Ok(())
    }

    fn summary(&self) -> String {
        let source = match &self.query {
            Some(q) => format!("query={q}"),
            None => format!("header={}", self.header_name()),
        };
        let ids: Vec<&str> = self.all_keys().map(|k| k.id.as_str()).collect();
        let file = self.keys_file.as_ref().map_or(String::new(), |f| {
            format!(" keys_file={}", f.path.display())
        });
        format!(
            "{source} keys={}{file} strip={}",
            super::list(&ids),
            self.strip
        )
    }

    fn role(&self) -> super::Role {
        super::Role::authentication()
    }

    fn build(&self, _: &super::Build) -> Box<dyn Middleware> {
        Box::new(ApiKey {
            source: match &self.query {
                Some(q) => Source::Query(q.as_str().into()),
                None => Source::Header(self.header_name()),
            },
            keys: self
                .all_keys()
                .map(|k| (digest(&[k.key.as_bytes()]), Arc::from(k.id.as_str())))
                .collect(),
            strip: self.strip,
            challenge: HeaderValue::from_static("ApiKey"),
        })
    }
}

impl Settings {
    fn header_name(&self) -> HeaderName {
        self.header
            .as_ref()
            .map_or(HeaderName::from_static("x-api-key"), |h| h.0.clone())
    }
}

enum Source {
    Header(HeaderName),
    Query(Box<str>),
}

struct ApiKey {
    source: Source,
    /// Digest of each key, with its id ready to become the subject without allocating.
    keys: Box<[([u8; 32], Arc<str>)]>,
    strip: bool,
    challenge: HeaderValue,
}

impl ApiKey {
    /// The id of the key whose digest is `presented`: every key is compared, always.
    fn lookup(&self, presented: &[u8; 32]) -> Option<&Arc<str>> {
        let mut found = subtle::Choice::from(0);
        let mut index = 0u32;
        for (i, (key, _)) in self.keys.iter().enumerate() {
            let eq = key.ct_eq(presented);
            index.conditional_assign(&(i as u32), eq);
            found |= eq;
        }
        bool::from(found).then(|| &self.keys[index as usize].1)
    }
}

impl Middleware for ApiKey {
    fn request_fields(&self) -> Vec<HeaderName> {
        match &self.source {
            Source::Header(name) => vec![name.clone()],
            Source::Query(_) => Vec::new(),
        }
    }

    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Context) -> Flow<'a> {
        let presented = match &self.source {
            Source::Header(name) => req.headers.get(name).map(|v| digest(&[v.as_bytes()])),
            Source::Query(param) => req
                .uri
                .query()
                .and_then(|q| query_value(q, param))
                .map(|v| percent_decoded_digest(v.as_bytes())),
        };
        let Some(presented) = presented else {
            return Flow::Reject(unauthorized(
                &self.challenge,
                Reason::MissingCredentials,
                "missing API key",
            ));
        };
        let Some(id) = self.lookup(&presented) else {
            return Flow::Reject(unauthorized(
                &self.challenge,
                Reason::InvalidCredentials,
                "invalid API key",
            ));
        };
        ctx.subject = Some(Arc::clone(id));
        if self.strip {
            match &self.source {
                Source::Header(name) => {
                    req.headers.remove(name);
                }
                Source::Query(param) => req.uri = without_param(&req.uri, param),
            }
        }
        Flow::Continue
    }
}

/// The raw value of the first `name=value` pair of `query` named `name`.
fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name && !v.is_empty()).then_some(v)
    })
}

/// Digest of the percent-decoded `raw` (so a key with `+` or `/` may be sent encoded),
/// decoded on the stack: no allocation.
fn percent_decoded_digest(raw: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (raw[i], raw.get(i + 1).copied(), raw.get(i + 2).copied()) {
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                hasher.update([(hex(h).unwrap() * 16 + hex(l).unwrap()) as u8]);
                i += 3;
            }
            (b, _, _) => {
                hasher.update([b]);
                i += 1;
            }
        }
    }
    hasher.finalize().into()
}

/// `uri` without any `name=...` pair in its query; everything else kept byte for byte.
fn without_param(uri: &Uri, name: &str) -> Uri {
    let Some(query) = uri.query() else {
        return uri.clone();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.split_once('=').map_or(*pair, |(k, _)| k) != name)
        .collect();
    let mut pq = uri.path().to_owned();
    if !kept.is_empty() {
        pq.push('?');
        pq.push_str(&kept.join("&"));
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query =
        Some(PathAndQuery::try_from(pq).expect("a subset of a valid path and query is valid"));
    Uri::from_parts(parts).expect("only the query changed")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_keys(bytes: &[u8]) -> Result<Vec<KeyEntry>, String> {
        Vec::<KeyEntry>::parse(bytes.to_vec())
    }

    #[test]
    fn keys_file_lines() {
        let keys = parse_keys(b"# ci\n\nci:abc\n  ops:x:y  \n").unwrap();
        let pairs: Vec<(&str, &str)> = keys.iter().map(|k| (&*k.id, &*k.key)).collect();
        assert_eq!(pairs, [("ci", "abc"), ("ops", "x:y")]);
        assert_eq!(
            parse_keys(b"ok:1\nnokey\n").unwrap_err(),
            "line 2: expected `id:key`"
        );
        assert!(parse_keys(b":key").is_err());
        assert!(parse_keys(b"id:").is_err());
    }

    #[test]
    fn query_parameter_found_and_removed_byte_exact() {
        assert_eq!(query_value("a=1&api_key=k%2B1&b", "api_key"), Some("k%2B1"));
        assert_eq!(query_value("xapi_key=1", "api_key"), None);
        assert_eq!(query_value("api_key=", "api_key"), None);
        let uri: Uri = "/p/a?x=%20y&api_key=s&z&api_key=t&w=1".parse().unwrap();
        assert_eq!(without_param(&uri, "api_key"), "/p/a?x=%20y&z&w=1");
        let uri: Uri = "http://h:1/p?api_key=s".parse().unwrap();
        assert_eq!(without_param(&uri, "api_key"), "http://h:1/p");
    }

    #[test]
    fn percent_decoding_before_digest() {
        assert_eq!(percent_decoded_digest(b"k%2B1"), digest(&[b"k+1"]));
        assert_eq!(percent_decoded_digest(b"k%2"), digest(&[b"k%2"]));
        assert_eq!(percent_decoded_digest(b"plain"), digest(&[b"plain"]));
    }

    #[test]
    fn lookup_finds_any_key() {
        let m = ApiKey {
            source: Source::Header(HeaderName::from_static("x-api-key")),
            keys: ["a", "b", "c"]
                .iter()
                .map(|k| (digest(&[k.as_bytes()]), Arc::from(format!("id-{k}"))))
                .collect(),
            strip: true,
            challenge: HeaderValue::from_static("ApiKey"),
        };
        for k in ["a", "b", "c"] {
            assert_eq!(
                m.lookup(&digest(&[k.as_bytes()])).map(|s| &**s),
                Some(&*format!("id-{k}"))
            );
        }
        assert!(m.lookup(&digest(&[b"d"])).is_none());
    }
}
