//! `jwt`: a signed token (Bearer, or a cookie) checked against an allow-list of algorithms
//! and a key from a secret, a PEM file, a JWKS file or a JWKS URL fetched in the background.
//!
//! Algorithm confusion is impossible by construction: a `secret` is only allowed with the
//! HS algorithms and the public-key sources never with them, and every key carries its own
//! validation whose algorithms are the allowed ones of that key's family (and of the JWK's
//! `alg`, when it names one). Keys are decoded once, when loaded; a check verifies one
//! signature against a ready key.
//!
//! A client sends the same token on every request for its lifetime, and an RS/ES signature
//! costs far more than the rest of a request, so a successful verification is remembered
//! (see [`Cache`]) and a repeated token costs a digest and a map lookup.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use http::header::AUTHORIZATION;
use http::{request, HeaderName, HeaderValue, StatusCode, Uri};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use schemars::JsonSchema;
use serde::de::{self, Deserializer};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::auth::{claim_header_value, digest, unauthorized};
use super::jwks::{jwks_keys, refresh_loop, Alg, Failure, Jwks, Key, KeySet, Remote};
use crate::chain::{Claims, Context, Flow, Middleware, Reason, Reject};
use crate::config::value::{ConfigFile, Duration, FileContent, HeaderNameValue};
use crate::config::{KeyPath, Problem};
use crate::pool::outbound_url;

/// A cached verification is trusted at most this long (seconds), whatever the token's `exp`.
const CACHE_TTL: u64 = 300;
/// The largest `cache_size`, so a typo cannot let the cache grow to gigabytes.
const CACHE_SIZE_MAX: usize = 1_000_000;

/// `jwt`: a signed JWT in `authorization: Bearer` (or a cookie); `401` without a valid one.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The accepted algorithms: HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384,
    /// PS512, ES256, ES384 or EdDSA.
    #[schemars(with = "Vec<String>")]
    algorithms: Vec<Alg>,
    /// The HMAC secret, for the HS algorithms (use `${VAR}`).
    #[schemars(with = "Option<String>")]
    secret: Option<Secret>,
    // Boxed: the settings of every middleware type share one enum.
    /// A PEM public key file.
    public_key_file: Option<Box<ConfigFile<Vec<u8>>>>,
    /// A JWKS document file.
    jwks_file: Option<Box<ConfigFile<JwkSet>>>,
    /// The issuer's JWKS, `https://host[:port]/path` (or `http://`), fetched again every
    /// `jwks_refresh`.
    #[schemars(with = "Option<String>")]
    jwks_url: Option<Box<JwksUrl>>,
    /// How often `jwks_url` is fetched again.
    #[serde(default = "default_refresh")]
    jwks_refresh: Duration,
    /// The required `iss` claim.
    issuer: Option<String>,
    /// The accepted `aud` values; empty: `aud` is not checked.
    #[serde(default)]
    audiences: Vec<String>,
    /// The clock skew allowed for `exp` and `nbf`.
    #[serde(default = "default_leeway")]
    leeway: Duration,
    /// Read the token from this cookie when there is no `authorization: Bearer`.
    cookie: Option<String>,
    /// Claims that must have exactly these values.
    #[serde(default)]
    require_claims: BTreeMap<String, String>,
    /// Claims sent to the app, each as the named request header.
    #[serde(default)]
    forward_claims: BTreeMap<String, HeaderNameValue>,
    /// How many verified tokens to remember; 0 verifies every request.
    #[serde(default = "default_cache_size")]
    cache_size: usize,
}

fn default_cache_size() -> usize {
    10_000
}

fn default_refresh() -> Duration {
    Duration(std::time::Duration::from_secs(300))
}

fn default_leeway() -> Duration {
    Duration(std::time::Duration::from_secs(30))
}

/// The HMAC secret; never printed.
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// A `jwks_file`: the key set, as a JWKS URL would serve it.
impl FileContent for JwkSet {
    fn parse(bytes: Vec<u8>) -> Result<Self, String> {
        serde_json::from_slice(&bytes).map_err(|e| format!("not a JWKS document: {e}"))
    }
}

/// `https://host[:port]/path` (or `http://`) of a JWKS document.
#[derive(Clone, Debug)]
struct JwksUrl(Uri);

impl FromStr for JwksUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        outbound_url(s).map(JwksUrl).ok_or_else(|| {
            format!(
                "invalid URL {s:?}: expected https://host[:port]/path or http://host[:port]/path"
            )
        })
    }
}

impl<'de> Deserialize<'de> for JwksUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

impl Settings {
    fn sources(&self) -> usize {
        [
            self.secret.is_some(),
            self.public_key_file.is_some(),
            self.jwks_file.is_some(),
            self.jwks_url.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count()
    }

    /// The checks every key shares; each key narrows `algorithms` to its own.
    ///
    /// jsonwebtoken compares `iss` and `aud` only when the token carries them (as a string
    /// or a list), so a configured `issuer` or `audiences` also makes its claim required:
    /// otherwise a token that leaves the claim out, or gives it another type, would pass.
    fn base_validation(&self) -> Validation {
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = self.leeway.0.as_secs();
        v.validate_nbf = true;
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            v.required_spec_claims.insert("iss".into());
        }
        if self.audiences.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.audiences);
            v.required_spec_claims.insert("aud".into());
        }
        v
    }

    /// The key of `public_key_file`, parsed by the family of the allowed algorithms.
    fn pem_key(&self, pem: &ConfigFile<Vec<u8>>) -> Result<DecodingKey, String> {
        let parsed = match self.algorithms[0].0.family() {
            AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(&pem.content),
            AlgorithmFamily::Ec => DecodingKey::from_ec_pem(&pem.content),
            AlgorithmFamily::Ed => DecodingKey::from_ed_pem(&pem.content),
            AlgorithmFamily::Hmac => unreachable!("validated: no HS algorithm with a PEM key"),
        };
        parsed.map_err(|e| {
            format!(
                "{}: not a public key for {:?}: {e}",
                pem.path.display(),
                self.algorithms[0].0
            )
        })
    }

    /// Every key of the configured static source, ready to verify with.
    fn static_keys(&self) -> Result<Vec<Key>, Problem> {
        let at = KeyPath::default();
        let base = self.base_validation();
        if let Some(secret) = &self.secret {
            let key = DecodingKey::from_secret(secret.0.as_bytes());
            return Ok(Key::new(None, key, None, &self.algorithms, &base)
                .into_iter()
                .collect());
        }
        if let Some(pem) = &self.public_key_file {
            let key = self
                .pem_key(pem)
                .map_err(|e| (at.key("public_key_file"), e))?;
            return Ok(Key::new(None, key, None, &self.algorithms, &base)
                .into_iter()
                .collect());
        }
        if let Some(file) = &self.jwks_file {
            let keys = jwks_keys(&file.content, &self.algorithms, &base);
            if keys.is_empty() {
                return Err((
                    at.key("jwks_file"),
                    format!(
                        "{}: no key usable with the allowed algorithms",
                        file.path.display()
                    ),
                ));
            }
            return Ok(keys);
        }
        Ok(Vec::new())
    }
}

impl super::Settings for Settings {
    fn validate(&self) -> Result<(), Problem> {
        let at = KeyPath::default();
        if self.algorithms.is_empty() {
            return Err((at.key("algorithms"), "list at least one algorithm".into()));
        }
        if self.sources() != 1 {
            return Err((
                at.key("secret"),
                "set exactly one of `secret`, `public_key_file`, `jwks_file`, `jwks_url`".into(),
            ));
        }
        let hmac = |a: &Alg| a.0.family() == AlgorithmFamily::Hmac;
        if self.secret.is_some() && !self.algorithms.iter().all(hmac) {
            return Err((
                at.key("algorithms"),
                "a `secret` verifies only HS256, HS384 and HS512".into(),
            ));
        }
        if self.secret.is_none() && self.algorithms.iter().any(hmac) {
            return Err((
                at.key("algorithms"),
                "HS algorithms need a `secret`; public keys verify only RS, PS, ES and EdDSA"
                    .into(),
            ));
        }
        if self.public_key_file.is_some()
            && self
                .algorithms
                .iter()
                .any(|a| a.0.family() != self.algorithms[0].0.family())
        {
            return Err((
                at.key("algorithms"),
                "one public key cannot serve algorithms of different families".into(),
            ));
        }
        if self.secret.as_ref().is_some_and(|s| s.0.is_empty()) {
            return Err((at.key("secret"), "the secret is empty".into()));
        }
        if self.cookie.as_deref() == Some("") {
            return Err((at.key("cookie"), "the cookie name is empty".into()));
        }
        if self.cache_size > CACHE_SIZE_MAX {
            return Err((at.key("cache_size"), format!("at most {CACHE_SIZE_MAX}")));
        }
        if self.jwks_refresh.0 < std::time::Duration::from_secs(1) {
            return Err((at.key("jwks_refresh"), "at least 1s".into()));
        }
        self.static_keys().map(|_| ())
    }

    fn summary(&self) -> String {
        let source = if self.secret.is_some() {
            "secret".to_owned()
        } else if let Some(p) = &self.public_key_file {
            format!("public_key_file={}", p.path.display())
        } else if let Some(f) = &self.jwks_file {
            format!("jwks_file={}", f.path.display())
        } else if let Some(u) = &self.jwks_url {
            format!("jwks_url={} refresh={}", u.0, self.jwks_refresh)
        } else {
            String::new()
        };
        let algs: Vec<String> = self
            .algorithms
            .iter()
            .map(|a| format!("{:?}", a.0))
            .collect();
        format!(
            "algorithms={} {source} issuer={:?} audiences={:?} require={:?} forward={:?} cache_size={}",
            super::list(&algs),
            self.issuer,
            self.audiences,
            self.require_claims,
            super::auth::forwarded(&self.forward_claims),
            self.cache_size
        )
    }

    fn role(&self) -> super::Role {
        super::Role::authentication()
    }

    fn build(&self, build: &super::Build) -> Box<dyn Middleware> {
        let (name, handles) = (build.name, build.handles);
        let keys = Arc::new(ArcSwap::from_pointee(KeySet {
            generation: 0,
            keys: self.static_keys().expect("validated"),
        }));
        let remote = self.jwks_url.as_ref().map(|url| {
            let remote = Arc::new(Remote::new(url.0.clone()));
            // `check` and an offline `explain` fetch nothing.
            let task = handles.runtime.as_ref().map(|rt| {
                rt.spawn(refresh_loop(
                    Jwks::new(&url.0, &handles.trust, handles.workers),
                    self.jwks_refresh.0,
                    self.algorithms.clone(),
                    self.base_validation(),
                    Arc::clone(&keys),
                    Arc::clone(&remote),
                ))
            });
            (remote, task)
        });
        let (remote, task) = match remote {
            Some((r, t)) => (Some(r), t),
            None => (None, None),
        };
        Box::new(Jwt {
            keys,
            remote,
            task,
            cookie: self.cookie.clone(),
            require: self
                .require_claims
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            forward: self
                .forward_claims
                .iter()
                .map(|(c, h)| (c.clone(), h.0.clone()))
                .collect(),
            cache: Cache::new(
                self.cache_size,
                self.leeway.0.as_secs(),
                &handles.metrics,
                &name.into(),
            ),
            challenge: HeaderValue::from_static("Bearer"),
            invalid: HeaderValue::from_static("Bearer error=\"invalid_token\""),
        })
    }
}

struct Jwt {
    keys: Arc<ArcSwap<KeySet>>,
    remote: Option<Arc<Remote>>,
    task: Option<tokio::task::JoinHandle<()>>,
    cookie: Option<String>,
    require: Vec<(String, String)>,
    forward: Vec<(String, HeaderName)>,
    cache: Option<Cache>,
    challenge: HeaderValue,
    invalid: HeaderValue,
}

impl Drop for Jwt {
    /// A reloaded chain stops the old generation's JWKS refreshes.
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl Jwt {
    /// Remembers a verified token (`key` is its digest, when caching), then admits it.
    fn accept(
        &self,
        key: Option<[u8; 32]>,
        (generation, claims): (u64, Map<String, Value>),
        req: &mut request::Parts,
        ctx: &mut Context,
    ) -> Flow<'static> {
        let verified = Arc::new(Verified {
            subject: match claims.get("sub") {
                Some(Value::String(sub)) => Some(sub.as_str().into()),
                _ => None,
            },
            forward: self
                .forward
                .iter()
                .map(|(claim, _)| claims.get(claim).and_then(claim_header_value))
                .collect(),
            allowed: self
                .require
                .iter()
                .all(|(name, want)| claim_satisfies(claims.get(name), name, want)),
            // A verified token has a numeric `exp` (required); 0 would only mean "expired".
            exp: claims.get("exp").and_then(Value::as_u64).unwrap_or(0),
            nbf: claims.get("nbf").and_then(Value::as_u64),
            claims: Arc::new(Claims::new(claims)),
        });
        if let (Some(cache), Some(key)) = (&self.cache, key) {
            cache.insert(key, generation, Arc::clone(&verified), unix_now());
        }
        self.admit(&verified, req, ctx)
    }

    /// The request goes on with the verified token's subject and forwarded claims, or gets
    /// a 403 for a missing claim.
    fn admit(
        &self,
        verified: &Verified,
        req: &mut request::Parts,
        ctx: &mut Context,
    ) -> Flow<'static> {
        if !verified.allowed {
            return Flow::Reject(Reject::new(
                StatusCode::FORBIDDEN,
                Reason::ClaimMismatch,
                "the token lacks a required claim",
            ));
        }
        if verified.subject.is_some() {
            ctx.subject.clone_from(&verified.subject);
        }
        ctx.claims = Some(Arc::clone(&verified.claims));
        for ((_, header), value) in self.forward.iter().zip(&verified.forward) {
            req.headers.remove(header);
            if let Some(value) = value {
                req.headers.insert(header.clone(), value.clone());
            }
        }
        Flow::Continue
    }

    fn reject(&self, reason: Reason, message: &'static str) -> Flow<'static> {
        Flow::Reject(unauthorized(&self.invalid, reason, message))
    }

    /// The 401 to a token that does not verify, saying why.
    fn invalid_token(&self, reason: Reason) -> Flow<'static> {
        let message = match reason {
            Reason::Expired => "the token has expired or is not valid yet",
            Reason::BadSignature => "the token's signature does not verify",
            Reason::WrongIssuer => "the token is from another issuer",
            Reason::WrongAudience => "the token is for none of the audiences",
            _ => "invalid token",
        };
        self.reject(reason, message)
    }
}

impl Middleware for Jwt {
    fn request_fields(&self) -> Vec<HeaderName> {
        self.forward
            .iter()
            .map(|(_, header)| header.clone())
            .collect()
    }

    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Context) -> Flow<'a> {
        let Some(token) = bearer(req, self.cookie.as_deref()) else {
            return Flow::Reject(unauthorized(
                &self.challenge,
                Reason::MissingCredentials,
                "missing bearer token",
            ));
        };
        let key = self.cache.is_some().then(|| digest(&[token.as_bytes()]));
        if let (Some(cache), Some(key)) = (&self.cache, &key) {
            if let Some(verified) = cache.get(key, self.keys.load().generation, unix_now()) {
                return self.admit(&verified, req, ctx);
            }
        }
        // `alg: none` (and any name outside the allow-list's enum) fails here.
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return self.reject(Reason::InvalidCredentials, "malformed token");
        };
        match self
            .keys
            .load()
            .verify(token, header.alg, header.kid.as_deref())
        {
            Ok(verified) => self.accept(key, verified, req, ctx),
            Err(Failure::Invalid(reason)) => self.invalid_token(reason),
            Err(Failure::NoKey) => match &self.remote {
                None => self.reject(Reason::InvalidCredentials, "no key for this token"),
                Some(remote) => {
                    let token = token.to_owned();
                    Flow::wait(async move {
                        if !remote.refetch().await {
                            return self
                                .reject(Reason::InvalidCredentials, "no key for this token");
                        }
                        match self
                            .keys
                            .load()
                            .verify(&token, header.alg, header.kid.as_deref())
                        {
                            Ok(verified) => self.accept(key, verified, req, ctx),
                            Err(Failure::Invalid(reason)) => self.invalid_token(reason),
                            Err(Failure::NoKey) => {
                                self.reject(Reason::InvalidCredentials, "no key for this token")
                            }
                        }
                    })
                }
            },
        }
    }

    fn would_ask(&self, req: &request::Parts, _: &Context) -> Option<String> {
        // Only a token to verify needs the keys: a missing or malformed one is refused
        // from what gatehouse holds.
        let remote = self.remote.as_ref()?;
        let token = bearer(req, self.cookie.as_deref())?;
        jsonwebtoken::decode_header(token).ok()?;
        Some(format!(
            "would fetch the keys at {} to verify the token",
            remote.url
        ))
    }
}

/// What a request needs of a verified token.
struct Verified {
    subject: Option<Arc<str>>,
    /// The header value of each `forward_claims` entry, in order (`None`: no such claim).
    forward: Vec<Option<HeaderValue>>,
    /// Whether the `require_claims` hold.
    allowed: bool,
    exp: u64,
    nbf: Option<u64>,
    /// Every claim, for the policy middlewares after this one: kept with the cached
    /// verification, so a repeated token is not parsed again.
    claims: Arc<Claims>,
}

/// One remembered verification.
struct Entry {
    /// The key set it was made with; any other generation makes it stale.
    generation: u64,
    /// Unix time after which it is no longer trusted ([`CACHE_TTL`]).
    until: u64,
    verified: Arc<Verified>,
}

impl Entry {
    /// Within the TTL, and `exp`/`nbf` still hold at `now` (unix seconds) with `leeway`:
    /// the checks jsonwebtoken made, made again, so a token never outlives its `exp` here.
    fn live(&self, now: u64, leeway: u64) -> bool {
        let v = &self.verified;
        now < self.until
            && v.exp.saturating_add(leeway) >= now
            && v.nbf.is_none_or(|nbf| nbf <= now.saturating_add(leeway))
    }
}

/// `gatehouse_jwt_cache_lookups_total{middleware, result}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LookupLabels {
    middleware: Arc<str>,
    result: &'static str,
}

/// Verifications by token digest, behind one lock.
type Shard = Mutex<HashMap<[u8; 32], Entry>>;

/// Successful verifications by SHA-256 of the token (never the token itself), in shards
/// that each have their own lock (held for a map operation, never across an await) so
/// that workers do not contend. Failures are not cached: a flood of bad tokens cannot
/// push good ones out, and costs what it costs without a cache.
struct Cache {
    shards: Box<[Shard]>,
    per_shard: usize,
    leeway: u64,
    /// `gatehouse_jwt_cache_lookups_total` for this middleware: hits, misses.
    hits: Counter,
    misses: Counter,
}

impl Cache {
    /// Room for `size` tokens (`None` for 0); a shard holds at least 64 so that eviction
    /// has a choice, and there are at most 16.
    fn new(
        size: usize,
        leeway: u64,
        metrics: &crate::metrics::Metrics,
        middleware: &Arc<str>,
    ) -> Option<Cache> {
        let shards = (size / 64).clamp(1, 16);
        (size > 0).then(|| {
            let lookups = metrics.family::<LookupLabels, Counter>(
                "gatehouse_jwt_cache_lookups",
                "Bearer tokens looked up in a jwt middleware's cache of verified tokens, by middleware name and result (hit or miss)",
            );
            let handle = |result| {
                lookups.get_or_create_owned(&LookupLabels {
                    middleware: middleware.clone(),
                    result,
                })
            };
            let (hits, misses) = (handle("hit"), handle("miss"));
            Cache {
                shards: (0..shards).map(|_| Mutex::default()).collect(),
                per_shard: size / shards,
                leeway,
                hits,
                misses,
            }
        })
    }

    fn shard(&self, key: &[u8; 32]) -> MutexGuard<'_, HashMap<[u8; 32], Entry>> {
        let i = u64::from_le_bytes(key[..8].try_into().expect("8 bytes")) as usize;
        self.shards[i % self.shards.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The verification of the token with digest `key`, if made with the key set
    /// `generation` and still live at `now`.
    fn get(&self, key: &[u8; 32], generation: u64, now: u64) -> Option<Arc<Verified>> {
        let found = self.shard(key).get(key).and_then(|entry| {
            (entry.generation == generation && entry.live(now, self.leeway))
                .then(|| Arc::clone(&entry.verified))
        });
        match found {
            Some(_) => self.hits.inc(),
            None => self.misses.inc(),
        };
        found
    }

    /// Remembers a verification; a full shard first drops its dead entries (expired, or of
    /// an older key set), and if none, an arbitrary one.
    fn insert(&self, key: [u8; 32], generation: u64, verified: Arc<Verified>, now: u64) {
        let mut shard = self.shard(&key);
        if shard.len() >= self.per_shard && !shard.contains_key(&key) {
            shard.retain(|_, e| e.generation >= generation && e.live(now, self.leeway));
            if shard.len() >= self.per_shard {
                let victim = *shard.keys().next().expect("a full shard");
                shard.remove(&victim);
            }
        }
        let until = now + CACHE_TTL;
        shard.insert(
            key,
            Entry {
                generation,
                until,
                verified,
            },
        );
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The token from `authorization: Bearer …`, else from the named cookie.
fn bearer<'r>(req: &'r request::Parts, cookie: Option<&str>) -> Option<&'r str> {
    if let Some(value) = req.headers.get(AUTHORIZATION) {
        let (scheme, token) = value.to_str().ok()?.trim().split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| token.trim());
    }
    super::auth::cookie(req, cookie?)
}

/// String equality; membership for an array claim and for space-separated `scope`.
fn claim_satisfies(value: Option<&Value>, name: &str, want: &str) -> bool {
    match value {
        Some(Value::String(s)) if name == "scope" => s.split(' ').any(|p| p == want),
        Some(Value::String(s)) => s == want,
        Some(Value::Array(items)) => items.iter().any(|i| i.as_str() == Some(want)),
        Some(Value::Bool(b)) => b.to_string() == want,
        Some(Value::Number(n)) => n.to_string() == want,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn claim_requirements() {
        let scope = json!("read write");
        assert!(claim_satisfies(Some(&scope), "scope", "write"));
        assert!(!claim_satisfies(Some(&scope), "scope", "wri"));
        assert!(!claim_satisfies(Some(&scope), "role", "read"));
        assert!(claim_satisfies(Some(&json!(["a", "b"])), "groups", "b"));
        assert!(!claim_satisfies(Some(&json!(["a", "b"])), "groups", "c"));
        assert!(claim_satisfies(Some(&json!("admin")), "role", "admin"));
        assert!(claim_satisfies(
            Some(&json!(true)),
            "email_verified",
            "true"
        ));
        assert!(!claim_satisfies(None, "role", "admin"));
    }

    #[test]
    fn token_from_header_or_cookie() {
        let parts = |headers: &[(&str, &str)]| {
            let mut b = http::Request::get("/");
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            b.body(()).unwrap().into_parts().0
        };
        assert_eq!(
            bearer(&parts(&[("authorization", "Bearer a.b.c")]), None),
            Some("a.b.c")
        );
        assert_eq!(
            bearer(&parts(&[("authorization", "bearer  a.b.c ")]), None),
            Some("a.b.c")
        );
        assert_eq!(
            bearer(&parts(&[("authorization", "Basic xyz")]), Some("t")),
            None
        );
        let c = parts(&[("cookie", "x=1; t=a.b.c"), ("cookie", "y=2")]);
        assert_eq!(bearer(&c, Some("t")), Some("a.b.c"));
        assert_eq!(bearer(&c, None), None);
        assert_eq!(bearer(&c, Some("z")), None);
    }

    fn verified(exp: u64, nbf: Option<u64>) -> Arc<Verified> {
        Arc::new(Verified {
            subject: Some("alice".into()),
            forward: Vec::new(),
            allowed: true,
            exp,
            nbf,
            claims: Arc::new(Claims::new(Map::new())),
        })
    }

    #[test]
    fn cache_hits_until_exp_ttl_or_a_new_key_set() {
        let metrics = crate::metrics::Metrics::new();
        let cache = Cache::new(64, 5, &metrics, &"jwt-cache-hits".into()).unwrap();
        let (now, key) = (1_000_000, digest(&[b"token"]));
        cache.insert(key, 1, verified(now + 60, Some(now + 10)), now);
        assert!(cache.get(&digest(&[b"other"]), 1, now).is_none());
        // Not before `nbf` (with the leeway), then until `exp` plus the leeway.
        assert!(cache.get(&key, 1, now).is_none());
        let hit = cache.get(&key, 1, now + 5).expect("a hit");
        assert_eq!(hit.subject.as_deref(), Some("alice"));
        assert!(cache.get(&key, 1, now + 65).is_some());
        assert!(cache.get(&key, 1, now + 66).is_none(), "expired");
        // Another key set generation does not see it.
        assert!(cache.get(&key, 2, now + 30).is_none());
        // A long-lived token is trusted for the TTL only.
        cache.insert(key, 1, verified(now + 86_400, None), now);
        assert!(cache.get(&key, 1, now + CACHE_TTL - 1).is_some());
        assert!(cache.get(&key, 1, now + CACHE_TTL).is_none());
        assert_eq!((cache.hits.get(), cache.misses.get()), (3, 5));
        let text = metrics.encode();
        assert!(text.contains(
            "gatehouse_jwt_cache_lookups_total{middleware=\"jwt-cache-hits\",result=\"hit\"} 3"
        ));
        assert!(
            Cache::new(0, 5, &metrics, &"jwt-test".into()).is_none(),
            "0 disables the cache"
        );
    }

    #[test]
    fn cache_is_bounded_and_evicts_dead_entries_first() {
        let now = 1_000_000;
        let key = |i: usize| digest(&[i.to_string().as_bytes()]);
        // One shard of 64: 32 live entries, 31 expired and one of an older key set.
        let cache = Cache::new(64, 0, &Default::default(), &"jwt-test".into()).unwrap();
        for i in 0..64 {
            let (generation, exp) = match i {
                0..32 => (2, now + 600),
                32..63 => (2, now - 1),
                _ => (1, now + 600),
            };
            cache.insert(key(i), generation, verified(exp, None), now);
        }
        cache.insert(key(64), 2, verified(now + 600, None), now);
        assert!((0..32)
            .chain([64])
            .all(|i| cache.get(&key(i), 2, now).is_some()));
        assert_eq!(cache.shards[0].lock().unwrap().len(), 33);
        // All live: the bound holds across shards.
        let cache = Cache::new(10_000, 0, &Default::default(), &"jwt-test".into()).unwrap();
        assert_eq!(cache.shards.len(), 16);
        for i in 0..30_000 {
            cache.insert(key(i), 0, verified(now + 600, None), now);
        }
        let total: usize = cache.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(total <= 10_000 && total > 9_000, "{total}");
        assert!(cache.get(&key(29_999), 0, now).is_some());
    }

    #[test]
    fn jwks_url_is_http_or_https() {
        assert!("http://idp:8080/.well-known/jwks.json"
            .parse::<JwksUrl>()
            .is_ok());
        assert!("https://idp/jwks".parse::<JwksUrl>().is_ok());
        assert!("ftp://idp/jwks".parse::<JwksUrl>().is_err());
        assert!("idp/jwks".parse::<JwksUrl>().is_err());
    }

    #[test]
    fn claims_as_header_values() {
        assert_eq!(claim_header_value(&json!("alice")).unwrap(), "alice");
        assert_eq!(
            claim_header_value(&json!(["a", "b"])).unwrap(),
            "[\"a\",\"b\"]"
        );
        assert!(claim_header_value(&json!("bad\nvalue")).is_none());
    }
}
