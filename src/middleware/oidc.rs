//! `oidc`: browser sign-in with OpenID Connect, in the sidecar. A browser without a session
//! is sent to the provider (authorization-code flow with PKCE S256, `state` and `nonce`); the
//! callback exchanges the code, verifies the ID token against the issuer's keys (discovered
//! from `/.well-known/openid-configuration`, kept fresh as `jwt` keeps a JWKS) and seals the
//! session into a cookie. Later requests open the cookie and go on as its user; the access
//! token is refreshed before it expires, once per session however many requests arrive.
//!
//! Cookies are sealed with XChaCha20-Poly1305 (RustCrypto's `chacha20poly1305`): an AEAD
//! with 24-byte nonces, so a fresh random nonce per cookie is safe without a counter shared
//! between workers or replicas, and fast in software where AES-GCM needs AES-NI to be. The
//! cookie's name is the associated data, so a sealed value cannot be moved to another cookie
//! (the short-lived `state` cookie and the session are never interchangeable).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration as StdDuration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::{KeyInit, OsRng};
use chacha20poly1305::XChaCha20Poly1305;
use http::header::{
    ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, COOKIE, HOST, LOCATION, SET_COOKIE,
};
use http::{request, response, HeaderName, HeaderValue, Method, Response, StatusCode, Uri};
use jsonwebtoken::{Algorithm, Validation};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use schemars::JsonSchema;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::auth::{claim_header_value, cookie, digest};
use super::jwks::{Failure, KeySet, Remote, FETCH_TIMEOUT};
use crate::chain::{Claims, Context, Flow, Middleware, Reason, Reject, SessionDigest};
use crate::config::redis::{entry_redis, RedisConnection};
use crate::config::value::{Duration, HeaderNameValue};
use crate::config::{KeyPath, Problem};
use crate::pool::outbound_url;

mod cookies;
mod provider;
mod store;

use cookies::{CHUNK, MAX_CHUNKS};

use provider::{discover_then_refresh, Provider};

/// How long a sign-in may take between the redirect to the provider and the callback.
const STATE_TTL: u64 = 600;
/// A finished refresh is remembered this long, so a request that still carries the cookie
/// from before it (sent while the refresh ran) gets its result instead of a second refresh
/// with a refresh token the provider has rotated away.
const REFRESH_REMEMBERED: StdDuration = StdDuration::from_secs(60);
/// How often discovery is tried again while the provider cannot be reached.
const DISCOVERY_RETRY: StdDuration = StdDuration::from_secs(2);
/// The largest provider answer (discovery document, token response) accepted.
const MAX_ANSWER: usize = 256 << 10;
/// The algorithms an ID token (and an API bearer token) may be signed with: the issuer's
/// public keys, never a shared secret.
const ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// `oidc`: browser sign-in with an OpenID Provider; the session lives in a sealed cookie.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The provider's issuer URL, `https://host[:port][/path]` (or `http://`); its discovery document is
    /// `<issuer>/.well-known/openid-configuration`.
    #[schemars(with = "String")]
    issuer: Issuer,
    /// The client registered at the provider for this app.
    client_id: String,
    /// The client's secret (use `${VAR}`); leave it out for a public client.
    #[schemars(with = "Option<String>")]
    client_secret: Option<Secret>,
    /// Where the provider sends the browser back; register `<app origin><redirect_path>`.
    #[serde(default = "default_redirect_path")]
    redirect_path: String,
    /// The scopes asked for; `openid` is required.
    #[serde(default = "default_scopes")]
    scopes: Vec<String>,
    /// The session cookie (`<name>_0`, `<name>_1`... when split; `<name>_state` during a
    /// sign-in).
    #[serde(default = "default_cookie_name")]
    cookie_name: String,
    /// 32 random bytes, base64 (`openssl rand -base64 32`; use `${VAR}`): seals the cookies.
    #[schemars(with = "String")]
    cookie_secret: CookieSecret,
    /// Earlier secrets still accepted, so rotating `cookie_secret` ends no session.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    cookie_secret_previous: Vec<CookieSecret>,
    /// Whether the cookies carry `Secure`. Browsers keep `Secure` cookies from
    /// `http://localhost` and `http://127.0.0.1` too; turn it off only for a plain-HTTP
    /// deployment on another host.
    #[serde(default = "super::auth::yes")]
    cookie_secure: bool,
    /// Where sessions live: `cookie` (sealed into the cookie itself) or `redis` (the cookie
    /// holds only the session's id; sign-out deletes the session server-side).
    #[serde(default)]
    session_store: SessionStore,
    /// For `session_store = "redis"`: `redis://[:password@]host:port[/db]`, short for
    /// `redis = { url = … }`.
    redis_url: Option<String>,
    /// For `session_store = "redis"`: where Redis is (a server, Sentinel, Cluster) and how
    /// to log in, as `rate_limit`'s `redis` table. (Boxed: the settings of every middleware
    /// type share one enum.)
    redis: Option<Box<RedisConnection>>,
    /// How long a session lasts after sign-in, refreshes included.
    #[serde(default = "default_session_ttl")]
    session_ttl: Duration,
    /// Refresh the access token before it expires; off: the session ends with it.
    #[serde(default = "super::auth::yes")]
    refresh: bool,
    /// Signs out: clears the session, revokes its tokens at the provider, and sends the
    /// browser through the provider's `end_session_endpoint`.
    #[serde(default = "default_logout_path")]
    logout_path: String,
    /// Where the provider sends the browser after sign-out (an absolute URL registered at the
    /// provider as a post-logout redirect URI).
    post_logout_redirect: Option<String>,
    /// Who may sign in; empty lists allow everyone the provider signs in.
    #[serde(default)]
    allowed: Allowed,
    /// Claims sent to the app, each as the named request header.
    #[serde(default)]
    forward_claims: BTreeMap<String, HeaderNameValue>,
    /// A request with `authorization: Bearer` is verified as a JWT signed by the issuer,
    /// for this client (`aud`), instead of being sent to sign in.
    #[serde(default = "super::auth::yes")]
    api_bearer: bool,
    /// The clock skew allowed for `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway")]
    leeway: Duration,
}

/// `session_store`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum SessionStore {
    #[default]
    Cookie,
    Redis,
}

/// `allowed = { email_domains, groups }`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Allowed {
    /// The user's verified `email` must be at one of these domains.
    #[serde(default)]
    email_domains: Vec<String>,
    /// The user's `groups` claim must hold one of these.
    #[serde(default)]
    groups: Vec<String>,
}

fn default_redirect_path() -> String {
    "/oauth2/callback".into()
}
fn default_logout_path() -> String {
    "/oauth2/sign_out".into()
}
fn default_cookie_name() -> String {
    "gatehouse_session".into()
}
fn default_scopes() -> Vec<String> {
    ["openid", "email", "profile"].map(String::from).to_vec()
}
fn default_session_ttl() -> Duration {
    Duration(StdDuration::from_secs(12 * 3600))
}
fn default_leeway() -> Duration {
    Duration(StdDuration::from_secs(30))
}

/// The issuer URL, without a trailing slash.
#[derive(Debug)]
struct Issuer(String);

impl<'de> Deserialize<'de> for Issuer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let trimmed = s.trim_end_matches('/');
        match outbound_url(trimmed) {
            Some(_) => Ok(Issuer(trimmed.to_owned())),
            None => Err(de::Error::custom(format!(
                "invalid issuer {s:?}: expected https://host[:port][/path] or http://host[:port][/path]"
            ))),
        }
    }
}

/// The client secret; never printed.
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

/// A cookie key: 32 bytes, given in base64; never printed.
struct CookieSecret([u8; 32]);

impl std::fmt::Debug for CookieSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

impl<'de> Deserialize<'de> for CookieSecret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bytes = STANDARD
            .decode(s.trim())
            .or_else(|_| URL_SAFE_NO_PAD.decode(s.trim()))
            .map_err(|_| {
                de::Error::custom("not base64: make one with `openssl rand -base64 32`")
            })?;
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            de::Error::custom(format!(
                "{} bytes: a cookie secret is 32 random bytes (`openssl rand -base64 32`)",
                bytes.len()
            ))
        })?;
        Ok(CookieSecret(key))
    }
}

/// A path key: absolute, no query.
fn check_path(at: &KeyPath, key: &str, path: &str) -> Result<(), Problem> {
    if !path.starts_with('/') || path.contains(['?', '#']) {
        return Err((
            at.key(key),
            format!("{path:?}: expected an absolute path such as /oauth2/callback"),
        ));
    }
    Ok(())
}

/// Whether `name` can be a cookie name (an RFC 6265 token).
fn cookie_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl super::Settings for Settings {
    fn validate(&self) -> Result<(), Problem> {
        let at = KeyPath::default();
        if self.client_id.is_empty() {
            return Err((at.key("client_id"), "the client id is empty".into()));
        }
        check_path(&at, "redirect_path", &self.redirect_path)?;
        check_path(&at, "logout_path", &self.logout_path)?;
        if self.redirect_path == self.logout_path {
            return Err((
                at.key("logout_path"),
                "the sign-out path must differ from `redirect_path`".into(),
            ));
        }
        if !self.scopes.iter().any(|s| s == "openid") {
            return Err((
                at.key("scopes"),
                "OpenID Connect needs the `openid` scope: add it to the list".into(),
            ));
        }
        if !cookie_token(&self.cookie_name) {
            return Err((
                at.key("cookie_name"),
                format!(
                    "{:?} cannot be a cookie name: use letters, digits, `-` and `_`",
                    self.cookie_name
                ),
            ));
        }
        match (
            self.session_store,
            entry_redis(self.redis_url.as_deref(), self.redis.as_deref())?,
        ) {
            (SessionStore::Redis, None) => {
                return Err((
                    at.key("redis_url"),
                    "session_store = \"redis\" needs a `redis_url` such as \
                     \"redis://127.0.0.1:6379\" (or a `redis` table)"
                        .into(),
                ))
            }
            (SessionStore::Cookie, Some(_)) => {
                let key = if self.redis_url.is_some() {
                    "redis_url"
                } else {
                    "redis"
                };
                return Err((
                    at.key(key),
                    "only used with session_store = \"redis\"".into(),
                ));
            }
            _ => {}
        }
        if self.session_ttl.0 < StdDuration::from_secs(60) {
            return Err((at.key("session_ttl"), "at least 1m".into()));
        }
        if let Some(url) = &self.post_logout_redirect {
            if !url.parse::<Uri>().is_ok_and(|u| u.scheme().is_some()) {
                return Err((
                    at.key("post_logout_redirect"),
                    format!("{url:?}: expected an absolute URL such as https://app.example/"),
                ));
            }
        }
        Ok(())
    }

    fn summary(&self) -> String {
        format!(
            "issuer={} client_id={} redirect_path={} logout_path={} cookie={} store={:?} session_ttl={} \
             refresh={} allowed={{email_domains={}, groups={}}} forward={:?} api_bearer={}",
            self.issuer.0,
            self.client_id,
            self.redirect_path,
            self.logout_path,
            self.cookie_name,
            self.session_store,
            self.session_ttl,
            self.refresh,
            super::list(&self.allowed.email_domains),
            super::list(&self.allowed.groups),
            super::auth::forwarded(&self.forward_claims),
            self.api_bearer
        )
    }

    fn role(&self) -> super::Role {
        super::Role::authentication()
    }

    fn build(&self, build: &super::Build) -> Box<dyn Middleware> {
        Box::new(Oidc(Arc::new(self.inner(build))))
    }
}

impl Settings {
    /// The middleware's state, and the background discovery when there is a runtime.
    fn inner(&self, build: &super::Build) -> Inner {
        let handles = build.handles;
        let discovery_url: Uri = format!("{}/.well-known/openid-configuration", self.issuer.0)
            .parse()
            .expect("validated: an http issuer URL");
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = self.leeway.0.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer.0]);
        validation.required_spec_claims.insert("iss".into());
        validation.set_audience(&[&self.client_id]);
        validation.required_spec_claims.insert("aud".into());
        let keys = Arc::new(ArcSwap::from_pointee(KeySet {
            generation: 0,
            keys: Vec::new(),
        }));
        let provider = Arc::new(ArcSwapOption::empty());
        let remote = Arc::new(Remote::new(discovery_url.clone()));
        let metrics = Metrics::new(&handles.metrics, build.name);
        // `check` and an offline `explain` ask the provider nothing.
        let task = handles.runtime.as_ref().map(|rt| {
            rt.spawn(discover_then_refresh(
                discovery_url.clone(),
                self.issuer.0.clone(),
                handles.workers,
                handles.trust.clone(),
                validation,
                Arc::clone(&provider),
                Arc::clone(&keys),
                Arc::clone(&remote),
            ))
        });
        let mut openers = vec![XChaCha20Poly1305::new(&self.cookie_secret.0.into())];
        openers.extend(
            self.cookie_secret_previous
                .iter()
                .map(|s| XChaCha20Poly1305::new(&s.0.into())),
        );
        let basic = self.client_secret.as_ref().map(|secret| {
            let form = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let pair = format!("{}:{}", form(&self.client_id), form(&secret.0));
            HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(pair)))
                .expect("base64 is a valid header value")
        });
        let secure = if self.cookie_secure { "; Secure" } else { "" };
        Inner {
            discovery_url,
            client_id: self.client_id.clone(),
            basic,
            redirect_path: self.redirect_path.clone(),
            logout_path: self.logout_path.clone(),
            post_logout_redirect: self.post_logout_redirect.clone(),
            scope: self.scopes.join(" "),
            jar: cookies::Jar {
                name: self.cookie_name.clone(),
                state: format!("{}_state", self.cookie_name),
                attributes: format!("; Path=/; HttpOnly; SameSite=Lax{secure}"),
                openers,
            },
            session_ttl: self.session_ttl.0.as_secs(),
            refresh: self.refresh,
            email_domains: self
                .allowed
                .email_domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            groups: self.allowed.groups.clone(),
            forward: self
                .forward_claims
                .iter()
                .map(|(c, h)| (c.clone(), h.0.clone()))
                .collect(),
            api_bearer: self.api_bearer,
            store: entry_redis(self.redis_url.as_deref(), self.redis.as_deref())
                .expect("validated")
                .map(|redis| store::Store::new(build.name, handles, &redis)),
            provider,
            keys,
            remote,
            task,
            flights: Mutex::default(),
            metrics,
        }
    }
}

/// A signed-in browser's session, sealed into its cookie.
#[derive(Debug, Serialize, Deserialize)]
struct Session {
    /// Random, made at sign-in: names the session in the audit (as a digest) and in the
    /// refresh single-flight.
    id: String,
    /// The ID token's claims (`sub` among them), refreshed with it.
    claims: Map<String, Value>,
    access_token: String,
    /// Unix seconds: when the access token expires, and when to refresh it (within the
    /// last quarter of its life, at most a minute before).
    access_expires: u64,
    refresh_at: u64,
    refresh_token: Option<String>,
    /// For the provider's sign-out (`id_token_hint`).
    id_token: String,
    /// Unix seconds: the end of `session_ttl`.
    expires: u64,
}

impl Session {
    fn subject(&self) -> Option<&str> {
        self.claims.get("sub").and_then(Value::as_str)
    }
}

/// A sign-in under way, sealed into the `state` cookie of the browser that started it.
#[derive(Serialize, Deserialize)]
struct Pending {
    state: String,
    nonce: String,
    verifier: String,
    /// The path and query to come back to (same origin).
    back: String,
    /// Unix seconds.
    expires: u64,
}

/// The token endpoint's answer.
#[derive(Deserialize)]
struct Tokens {
    access_token: String,
    id_token: Option<String>,
    refresh_token: Option<String>,
    expires_in: Option<u64>,
}

/// `gatehouse_oidc_events_total{middleware, event}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    middleware: Arc<str>,
    event: &'static str,
}

/// This middleware's counters.
struct Metrics {
    logins: Counter,
    login_failures: Counter,
    refreshes: Counter,
    refresh_failures: Counter,
    logouts: Counter,
}

impl Metrics {
    fn new(metrics: &crate::metrics::Metrics, name: &str) -> Metrics {
        let family = metrics.family::<EventLabels, Counter>(
            "gatehouse_oidc_events",
            "Browser sign-ins, session refreshes and sign-outs of an oidc middleware, by \
             middleware name and event (login, login_failed, refresh, refresh_failed, logout)",
        );
        let middleware: Arc<str> = name.into();
        let handle = |event| {
            family.get_or_create_owned(&EventLabels {
                middleware: middleware.clone(),
                event,
            })
        };
        Metrics {
            logins: handle("login"),
            login_failures: handle("login_failed"),
            refreshes: handle("refresh"),
            refresh_failures: handle("refresh_failed"),
            logouts: handle("logout"),
        }
    }
}

/// A refresh of one session: running (its result still to come) or done a moment ago.
enum Flight {
    Running(watch::Receiver<Option<Refreshed>>),
    Done(Refreshed, Instant),
}

/// A refresh's result: the new session, or `None` when the provider refused it.
type Refreshed = Option<Arc<Session>>;

struct Inner {
    discovery_url: Uri,
    client_id: String,
    /// `authorization: Basic` of the client's id and secret (client_secret_basic); `None`
    /// for a public client, which sends its id in the form.
    basic: Option<HeaderValue>,
    redirect_path: String,
    logout_path: String,
    post_logout_redirect: Option<String>,
    scope: String,
    jar: cookies::Jar,
    session_ttl: u64,
    refresh: bool,
    email_domains: Vec<String>,
    groups: Vec<String>,
    forward: Vec<(String, HeaderName)>,
    api_bearer: bool,
    /// `session_store = "redis"`; `None`: the cookie holds the session.
    store: Option<store::Store>,
    provider: Arc<ArcSwapOption<Provider>>,
    keys: Arc<ArcSwap<KeySet>>,
    remote: Arc<Remote>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Refreshes by digest of the refresh token they spend (the lock is held for a map
    /// operation, never across an await).
    flights: Mutex<HashMap<[u8; 32], Flight>>,
    metrics: Metrics,
}

struct Oidc(Arc<Inner>);

impl Drop for Inner {
    /// A reloaded chain stops the old generation's discovery and key refreshes.
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The associated data of a session sealed into a store (never a cookie's name).
const STORED: &str = "gatehouse oidc stored session";

/// What a live session needs.
enum Next {
    Admit,
    /// Its lifetime is over, or its access token without a refresh.
    Expired,
    Refresh,
}

/// The page of a session store that cannot be reached: fails closed, without a redirect.
fn store_unavailable() -> Reject {
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        Reason::BackendUnavailable,
        "the session store is not answering; try again in a moment".into(),
    )
}

/// Cookies to set on the response of a request that goes on to the app (a refreshed
/// session, re-issued), kept in the context for the response phase.
#[derive(Clone)]
struct Reissue(Vec<HeaderValue>);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// When an access token given at `now` for `expires_in` seconds (5 minutes when the
/// provider does not say) expires, and when it is due for a refresh.
fn lifetime(now: u64, expires_in: Option<u64>) -> (u64, u64) {
    let life = expires_in.unwrap_or(300);
    (now + life, now + life - (life / 4).min(60))
}

fn random(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Whether the client reads HTML (a browser navigating), rather than an API client or a
/// page's `fetch`, which cannot follow a redirect to a sign-in form.
fn wants_html(req: &request::Parts) -> bool {
    req.headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"))
}

/// A path and query that stays on this origin: `/x`, never `//host` or `/\host`.
fn same_origin(back: &str) -> bool {
    back.starts_with('/') && !back.starts_with("//") && !back.starts_with("/\\")
}

/// A small HTML page for a browser that cannot go on (a failed sign-in), with a way back.
fn page(status: StatusCode, reason: Reason, message: String) -> Reject {
    let escaped = message
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let body = format!(
        "<!doctype html><meta charset=\"utf-8\"><title>Sign-in failed</title>\
         <h1>Sign-in failed</h1><p>{escaped}</p><p><a href=\"/\">Start again</a></p>\n"
    );
    let mut reject = Reject::new(status, reason, message)
        .with_header(
            CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )
        .with_header(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    reject.body = Some(Bytes::from(body));
    reject
}

/// A `302` to `location` with `cookies` set.
fn redirect(location: &str, cookies: Vec<HeaderValue>) -> Response<Bytes> {
    let mut resp = Response::new(Bytes::new());
    *resp.status_mut() = StatusCode::FOUND;
    let headers = resp.headers_mut();
    if let Ok(location) = HeaderValue::from_str(location) {
        headers.insert(LOCATION, location);
    }
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    for c in cookies {
        headers.append(SET_COOKIE, c);
    }
    resp
}

/// Where this request's callback is, as the browser reaches this app.
fn origin(req: &request::Parts, ctx: &Context) -> Option<String> {
    let host = req
        .headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))?;
    // Behind a trusted proxy (one `server.trusted_proxies` peeled off), its word on the
    // scheme the browser used.
    let forwarded_https = ctx.client_ip != ctx.peer
        && req
            .headers
            .get("x-forwarded-proto")
            .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
    let scheme = if ctx.tls || forwarded_https {
        "https"
    } else {
        "http"
    };
    Some(format!("{scheme}://{host}"))
}

impl Inner {
    /// The `set-cookie` values that keep `session` in the browser: the session itself
    /// (split when large), or its id when a store holds it; they also expire the request's
    /// other session cookies (a split one becoming whole, or fewer chunks). `Err` with its
    /// size for a session too large for [`cookies::MAX_CHUNKS`] cookies.
    fn session_cookies(
        &self,
        req: &request::Parts,
        session: &Session,
    ) -> Result<Vec<HeaderValue>, usize> {
        let sealed = match &self.store {
            None => self.jar.seal(&self.jar.name, session),
            Some(_) => self.jar.seal(&self.jar.name, &session.id),
        };
        self.jar
            .session(req, &sealed, session.expires.saturating_sub(unix_now()))
    }

    /// What the request's session cookie holds (the session, or its id in a store); `Err`
    /// for a cookie that does not open (tampered, or sealed with a secret no longer
    /// configured).
    fn cookie_holds<T: for<'de> Deserialize<'de>>(
        &self,
        req: &request::Parts,
    ) -> Result<Option<T>, ()> {
        match self.jar.session_value(req) {
            None => Ok(None),
            Some(v) => self.jar.open(&self.jar.name, &v).map(Some).ok_or(()),
        }
    }

    /// The session stored under `id`: `Ok(None)` when the store has none (signed out,
    /// expired, lost) or it does not open.
    async fn stored(
        &self,
        store: &store::Store,
        worker: usize,
        id: &str,
    ) -> Result<Option<Session>, store::Unavailable> {
        let sealed = store.get(worker, id).await?;
        Ok(sealed.and_then(|s| self.jar.open(STORED, &s)))
    }

    /// Puts `session` where it is kept: nothing to do for cookies, a write for a store.
    async fn save(&self, session: &Session, worker: usize) -> Result<(), store::Unavailable> {
        match &self.store {
            None => Ok(()),
            Some(store) => {
                let ttl = session.expires.saturating_sub(unix_now());
                store
                    .set(worker, &session.id, &self.jar.seal(STORED, session), ttl)
                    .await
            }
        }
    }

    /// What a live session needs now.
    fn next(&self, session: &Session, now: u64) -> Next {
        if session.expires <= now {
            return Next::Expired;
        }
        if !Inner::due(session, now) {
            return Next::Admit;
        }
        if !self.refresh || session.refresh_token.is_none() {
            return if session.access_expires > now {
                Next::Admit
            } else {
                Next::Expired
            };
        }
        Next::Refresh
    }

    /// The request goes on with `session`, refreshed first when due, or is sent to sign in.
    fn proceed<'a>(
        self: &'a Arc<Self>,
        session: Session,
        req: &'a mut request::Parts,
        ctx: &'a mut Context,
    ) -> Flow<'a> {
        match self.next(&session, unix_now()) {
            Next::Admit => self.admit(&session.claims, Some(&session.id), req, ctx),
            Next::Expired => {
                let clear = self.jar.clear(req);
                self.login(req, ctx, Reason::SessionExpired, clear)
            }
            Next::Refresh => Flow::wait(async move {
                let refreshed = self.refreshed(session, ctx.worker).await;
                // A store keeps the refreshed session under the same id: the cookie stays.
                // A session grown too large for its cookies ends as a failed refresh would.
                let cookies = match (&refreshed, &self.store) {
                    (Some(fresh), None) => self.session_cookies(req, fresh).ok(),
                    (Some(_), Some(_)) => Some(Vec::new()),
                    (None, _) => None,
                };
                match (refreshed, cookies) {
                    (Some(fresh), Some(cookies)) => {
                        let flow = self.admit(&fresh.claims, Some(&fresh.id), req, ctx);
                        if matches!(flow, Flow::Continue) && !cookies.is_empty() {
                            ctx.state.insert(Reissue(cookies));
                        }
                        flow
                    }
                    _ => {
                        let clear = self.jar.clear(req);
                        self.login(req, ctx, Reason::SessionExpired, clear)
                    }
                }
            }),
        }
    }

    /// No session: a browser is sent to sign in, anything else gets a `401`.
    fn login(
        &self,
        req: &request::Parts,
        ctx: &Context,
        reason: Reason,
        mut cookies: Vec<HeaderValue>,
    ) -> Flow<'static> {
        if !wants_html(req) {
            let mut reject = Reject::new(
                StatusCode::UNAUTHORIZED,
                reason,
                "sign in first: this resource needs a browser session",
            );
            reject
                .headers
                .extend(cookies.into_iter().map(|c| (SET_COOKIE, c)));
            return Flow::Reject(reject);
        }
        let Some(provider) = self.provider.load_full() else {
            return Flow::Reject(page(
                StatusCode::SERVICE_UNAVAILABLE,
                Reason::AuthServiceUnavailable,
                format!(
                    "the sign-in provider has not answered yet ({}); try again in a moment",
                    self.discovery_url
                ),
            ));
        };
        let Some(origin) = origin(req, ctx) else {
            return Flow::Reject(Reject::new(
                StatusCode::BAD_REQUEST,
                Reason::BadRequest,
                "a request without a host cannot be sent to sign in",
            ));
        };
        // Only a safe method's URL is worth coming back to: a form's POST would be replayed
        // as a GET without its body.
        let back = match (&req.method, req.uri.path_and_query()) {
            (&Method::GET | &Method::HEAD, Some(pq)) if same_origin(pq.as_str()) => pq.as_str(),
            _ => "/",
        };
        let pending = Pending {
            state: random(24),
            nonce: random(24),
            verifier: random(32),
            back: back.to_owned(),
            expires: unix_now() + STATE_TTL,
        };
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(pending.verifier.as_bytes()));
        let redirect_uri = format!("{origin}{}", self.redirect_path);
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.client_id)
            .append_pair("redirect_uri", &redirect_uri)
            .append_pair("scope", &self.scope)
            .append_pair("state", &pending.state)
            .append_pair("nonce", &pending.nonce)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256")
            .finish();
        let sep = if provider.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        let location = format!("{}{sep}{query}", provider.authorization_endpoint);
        cookies.push(self.jar.set_cookie(
            &self.jar.state,
            &self.jar.seal(&self.jar.state, &pending),
            STATE_TTL,
        ));
        let mut reject = Reject::new(StatusCode::FOUND, reason, "sign-in required");
        reject.headers.push((
            LOCATION,
            HeaderValue::from_str(&location).expect("an encoded URL is a valid header value"),
        ));
        reject
            .headers
            .push((CACHE_CONTROL, HeaderValue::from_static("no-store")));
        reject
            .headers
            .extend(cookies.into_iter().map(|c| (SET_COOKIE, c)));
        Flow::Reject(reject)
    }

    /// Whether the signed-in user is one of the allowed.
    fn allowed(&self, claims: &Map<String, Value>) -> bool {
        let domain_ok = self.email_domains.is_empty()
            || claims.get("email_verified") != Some(&Value::Bool(false))
                && claims
                    .get("email")
                    .and_then(Value::as_str)
                    .and_then(|e| e.rsplit_once('@'))
                    .is_some_and(|(_, d)| self.email_domains.contains(&d.to_ascii_lowercase()));
        let group_ok = self.groups.is_empty()
            || match claims.get("groups") {
                Some(Value::Array(items)) => items
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|g| self.groups.iter().any(|w| w == g)),
                Some(Value::String(g)) => self.groups.contains(g),
                _ => false,
            };
        domain_ok && group_ok
    }

    /// The request goes on as the user of `claims`, in the session `session` (the id; an
    /// API client's bearer token has none), or gets a `403`.
    fn admit(
        &self,
        claims: &Map<String, Value>,
        session: Option<&str>,
        req: &mut request::Parts,
        ctx: &mut Context,
    ) -> Flow<'static> {
        if !self.allowed(claims) {
            return Flow::Reject(Reject::new(
                StatusCode::FORBIDDEN,
                Reason::NotAllowed,
                "signed in, but not as one of the allowed users",
            ));
        }
        publish(ctx, claims, session);
        for (claim, header) in &self.forward {
            req.headers.remove(header);
            if let Some(value) = claims.get(claim).and_then(claim_header_value) {
                req.headers.insert(header.clone(), value);
            }
        }
        strip_cookies(req, &self.jar.name);
        Flow::Continue
    }

    /// A form POST of `pairs` to one of the provider's endpoints, authenticated as the
    /// client.
    async fn post(
        &self,
        provider: &Provider,
        revocation: bool,
        shard: usize,
        pairs: &[(&str, &str)],
    ) -> Result<Response<Bytes>, String> {
        let call = match (revocation, &provider.revocation) {
            (true, Some(call)) => call,
            _ => &provider.token,
        };
        let body = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.extend_pairs(pairs);
            if self.basic.is_none() {
                form.append_pair("client_id", &self.client_id);
            }
            form.finish()
        };
        let mut req = http::Request::post(call.url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json");
        if let Some(basic) = &self.basic {
            req = req.header(AUTHORIZATION, basic.clone());
        }
        let req = req.body(Bytes::from(body)).map_err(|e| e.to_string())?;
        call.endpoint
            .fetch(shard, req, FETCH_TIMEOUT, MAX_ANSWER)
            .await
    }

    /// `claims` completed with what the userinfo endpoint says of the same `sub` (the ID
    /// token's own claims win). A provider that does not answer leaves them as they are:
    /// the ID token alone is a sign-in.
    async fn with_userinfo(
        &self,
        provider: &Provider,
        shard: usize,
        access_token: &str,
        mut claims: Map<String, Value>,
    ) -> Map<String, Value> {
        let Some(call) = &provider.userinfo else {
            return claims;
        };
        let req = http::Request::get(call.url.clone())
            .header(ACCEPT, "application/json")
            .header(AUTHORIZATION, format!("Bearer {access_token}"))
            .body(Bytes::new());
        let Ok(req) = req else {
            return claims;
        };
        let info = match call
            .endpoint
            .fetch(shard, req, FETCH_TIMEOUT, MAX_ANSWER)
            .await
        {
            Ok(resp) if resp.status().is_success() => {
                serde_json::from_slice::<Map<String, Value>>(resp.body()).ok()
            }
            Ok(resp) => {
                tracing::warn!(status = %resp.status(), "userinfo refused");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "userinfo failed");
                None
            }
        };
        if let Some(info) = info.filter(|i| i.get("sub") == claims.get("sub")) {
            for (k, v) in info {
                claims.entry(k).or_insert(v);
            }
        }
        claims
    }

    /// The token endpoint's tokens for `form`, or why there are none.
    async fn tokens(
        &self,
        provider: &Provider,
        shard: usize,
        pairs: &[(&str, &str)],
    ) -> Result<Tokens, String> {
        let resp = self.post(provider, false, shard, pairs).await?;
        if !resp.status().is_success() {
            let error = serde_json::from_slice::<Map<String, Value>>(resp.body())
                .ok()
                .and_then(|m| m.get("error").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| resp.status().to_string());
            return Err(format!("the token endpoint answered {error}"));
        }
        serde_json::from_slice(resp.body()).map_err(|e| format!("not a token response: {e}"))
    }

    /// The claims of an ID token that verifies against the issuer's keys, fetched again
    /// once for an unknown `kid`.
    async fn verify(&self, token: &str) -> Result<Map<String, Value>, Reason> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Reason::InvalidCredentials)?;
        for attempt in 0..2 {
            match self
                .keys
                .load()
                .verify(token, header.alg, header.kid.as_deref())
            {
                Ok((_, claims)) => return Ok(claims),
                Err(Failure::Invalid(reason)) => return Err(reason),
                Err(Failure::NoKey) if attempt == 0 && self.remote.refetch().await => {}
                Err(Failure::NoKey) => break,
            }
        }
        Err(Reason::InvalidCredentials)
    }

    /// The callback: checks `state` against this browser's cookie, exchanges the code,
    /// verifies the ID token and its `nonce`, and starts the session.
    async fn callback(&self, req: &request::Parts, ctx: &Context) -> Flow<'static> {
        let query = req.uri.query().unwrap_or("");
        let param = |name: &str| {
            form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        };
        let clear_state = self.jar.set_cookie(&self.jar.state, "", 0);
        let pending: Option<Pending> = cookie(req, &self.jar.state)
            .and_then(|v| self.jar.open(&self.jar.state, v))
            .filter(|p: &Pending| p.expires > unix_now());
        let Some(pending) = pending else {
            self.metrics.login_failures.inc();
            return Flow::Reject(
                page(
                    StatusCode::BAD_REQUEST,
                    Reason::StateMismatch,
                    "this sign-in was not started in this browser, or took too long".into(),
                )
                .with_header(SET_COOKIE, clear_state),
            );
        };
        if param("state").as_deref() != Some(pending.state.as_str()) {
            self.metrics.login_failures.inc();
            return Flow::Reject(
                page(
                    StatusCode::BAD_REQUEST,
                    Reason::StateMismatch,
                    "the sign-in answer does not belong to the sign-in this browser started".into(),
                )
                .with_header(SET_COOKIE, clear_state),
            );
        }
        if let Some(error) = param("error") {
            self.metrics.login_failures.inc();
            return Flow::Reject(
                page(
                    StatusCode::FORBIDDEN,
                    Reason::NotAllowed,
                    format!("the provider did not sign you in: {error}"),
                )
                .with_header(SET_COOKIE, clear_state),
            );
        }
        let (Some(code), Some(provider), Some(origin)) =
            (param("code"), self.provider.load_full(), origin(req, ctx))
        else {
            self.metrics.login_failures.inc();
            return Flow::Reject(page(
                StatusCode::SERVICE_UNAVAILABLE,
                Reason::AuthServiceUnavailable,
                "the sign-in cannot be completed: no code, or the provider is not reachable".into(),
            ));
        };
        let redirect_uri = format!("{origin}{}", self.redirect_path);
        let form = [
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", &redirect_uri),
            ("code_verifier", &pending.verifier),
        ];
        let failed = |status, reason, message: String| {
            self.metrics.login_failures.inc();
            tracing::warn!(issuer = %self.discovery_url, error = %message, "sign-in failed");
            Flow::Reject(page(status, reason, message).with_header(SET_COOKIE, clear_state.clone()))
        };
        let tokens = match self.tokens(&provider, ctx.worker, &form).await {
            Ok(t) => t,
            Err(e) => {
                return failed(
                    StatusCode::BAD_GATEWAY,
                    Reason::AuthServiceUnavailable,
                    format!("the provider did not complete the sign-in: {e}"),
                )
            }
        };
        let Some(id_token) = tokens.id_token.clone() else {
            return failed(
                StatusCode::BAD_GATEWAY,
                Reason::InvalidCredentials,
                "the provider's answer has no ID token".into(),
            );
        };
        let claims = match self.verify(&id_token).await {
            Ok(c) => c,
            Err(reason) => {
                return failed(
                    StatusCode::BAD_GATEWAY,
                    reason,
                    format!("the ID token does not verify ({})", reason.code()),
                )
            }
        };
        if claims.get("nonce").and_then(Value::as_str) != Some(pending.nonce.as_str())
            || claims.get("sub").and_then(Value::as_str).is_none()
        {
            return failed(
                StatusCode::BAD_REQUEST,
                Reason::StateMismatch,
                "the ID token is not the answer to this sign-in (nonce)".into(),
            );
        }
        let claims = self
            .with_userinfo(&provider, ctx.worker, &tokens.access_token, claims)
            .await;
        let now = unix_now();
        let (access_expires, refresh_at) = lifetime(now, tokens.expires_in);
        let session = Session {
            id: random(16),
            claims,
            access_expires,
            refresh_at,
            access_token: tokens.access_token,
            refresh_token: tokens.refresh_token,
            id_token,
            expires: now + self.session_ttl,
        };
        if self.save(&session, ctx.worker).await.is_err() {
            self.metrics.login_failures.inc();
            return Flow::Reject(store_unavailable().with_header(SET_COOKIE, clear_state));
        }
        let mut cookies = match self.session_cookies(req, &session) {
            Ok(c) => c,
            Err(size) => {
                return failed(
                    StatusCode::BAD_GATEWAY,
                    Reason::InvalidCredentials,
                    format!(
                        "the session is too large for cookies ({size} bytes sealed, at most \
                         {}): ask for fewer scopes, or have the provider put fewer claims in \
                         the ID token",
                        CHUNK * MAX_CHUNKS
                    ),
                )
            }
        };
        self.metrics.logins.inc();
        cookies.push(clear_state);
        let back = if same_origin(&pending.back) {
            pending.back.as_str()
        } else {
            "/"
        };
        Flow::Respond(redirect(back, cookies))
    }

    /// Signs out: clears the session, revokes its refresh token (or access token) at the
    /// provider, and sends the browser through the provider's sign-out.
    async fn logout(&self, req: &request::Parts, ctx: &Context) -> Flow<'static> {
        let session = match &self.store {
            None => self.cookie_holds::<Session>(req).ok().flatten(),
            Some(store) => match self.cookie_holds::<String>(req).ok().flatten() {
                Some(id) => {
                    let session = self.stored(store, ctx.worker, &id).await.ok().flatten();
                    // Signed out server-side: a copy of the cookie opens nothing from now on.
                    if store.delete(ctx.worker, &id).await.is_err() {
                        return Flow::Reject(store_unavailable());
                    }
                    session
                }
                None => None,
            },
        };
        let mut cookies = self.jar.clear(req);
        if cookie(req, &self.jar.state).is_some() {
            cookies.push(self.jar.set_cookie(&self.jar.state, "", 0));
        }
        self.metrics.logouts.inc();
        let provider = self.provider.load_full();
        if let (Some(session), Some(provider)) = (&session, &provider) {
            if provider.revocation.is_some() {
                let (token, hint) = match &session.refresh_token {
                    Some(t) => (t.as_str(), "refresh_token"),
                    None => (session.access_token.as_str(), "access_token"),
                };
                let form = [("token", token), ("token_type_hint", hint)];
                match self.post(provider, true, ctx.worker, &form).await {
                    Ok(resp) if resp.status().is_success() => {}
                    Ok(resp) => tracing::warn!(status = %resp.status(), "token revocation refused"),
                    Err(e) => tracing::warn!(error = %e, "token revocation failed"),
                }
            }
        }
        let end = provider
            .as_ref()
            .and_then(|p| p.end_session_endpoint.as_deref());
        let location = match end {
            Some(end) => {
                let mut query = form_urlencoded::Serializer::new(String::new());
                query.append_pair("client_id", &self.client_id);
                if let Some(s) = &session {
                    query.append_pair("id_token_hint", &s.id_token);
                }
                if let Some(after) = &self.post_logout_redirect {
                    query.append_pair("post_logout_redirect_uri", after);
                }
                let sep = if end.contains('?') { '&' } else { '?' };
                format!("{end}{sep}{}", query.finish())
            }
            None => self
                .post_logout_redirect
                .clone()
                .unwrap_or_else(|| "/".into()),
        };
        Flow::Respond(redirect(&location, cookies))
    }

    /// The session with a fresh access token: one refresh at the provider per refresh
    /// token, whatever the number of requests that ask at once; the others wait for it and
    /// share its result. `None`: the provider refused, and the session is over.
    async fn refreshed(self: &Arc<Self>, session: Session, shard: usize) -> Refreshed {
        let token = session.refresh_token.clone()?;
        let key = digest(&[token.as_bytes()]);
        let mut waiting = {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            // Forgotten: results past their time, and refreshes whose task ended without
            // one (it panicked, or the runtime is going).
            flights.retain(|_, f| match f {
                Flight::Done(_, at) => at.elapsed() <= REFRESH_REMEMBERED,
                Flight::Running(rx) => rx.has_changed().is_ok(),
            });
            match flights.get(&key) {
                Some(Flight::Done(result, _)) => return result.clone(),
                Some(Flight::Running(rx)) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    flights.insert(key, Flight::Running(rx.clone()));
                    // Its own task: a client that goes away does not abandon the others.
                    let inner = Arc::clone(self);
                    tokio::spawn(async move {
                        let id = session.id.clone();
                        let mut result = inner.refresh_once(session, &token, shard).await;
                        if let Some(store) = &inner.store {
                            result = match result {
                                Some(fresh) => inner.save(&fresh, shard).await.ok().map(|()| fresh),
                                None => {
                                    let _ = store.delete(shard, &id).await;
                                    None
                                }
                            };
                        }
                        inner
                            .flights
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(key, Flight::Done(result.clone(), Instant::now()));
                        tx.send_replace(Some(result));
                    });
                    rx
                }
            }
        };
        let result = waiting.wait_for(Option::is_some).await;
        result.ok().and_then(|r| r.clone()).flatten()
    }

    /// One refresh at the token endpoint.
    async fn refresh_once(&self, session: Session, token: &str, shard: usize) -> Refreshed {
        let provider = self.provider.load_full()?;
        let form = [("grant_type", "refresh_token"), ("refresh_token", token)];
        let tokens = match self.tokens(&provider, shard, &form).await {
            Ok(t) => t,
            Err(e) => {
                self.metrics.refresh_failures.inc();
                tracing::info!(error = %e, "session refresh failed; the session ends");
                return None;
            }
        };
        let mut claims = session.claims;
        let mut id_token = session.id_token;
        if let Some(fresh) = tokens.id_token {
            match self.verify(&fresh).await {
                // The same user, or the refresh does not count.
                Ok(c) if c.get("sub") == claims.get("sub") => {
                    claims.extend(c);
                    id_token = fresh;
                }
                _ => {
                    self.metrics.refresh_failures.inc();
                    return None;
                }
            }
        }
        self.metrics.refreshes.inc();
        let (access_expires, refresh_at) = lifetime(unix_now(), tokens.expires_in);
        Some(Arc::new(Session {
            id: session.id,
            claims,
            access_token: tokens.access_token,
            access_expires,
            refresh_at,
            refresh_token: tokens.refresh_token.or(session.refresh_token),
            id_token,
            expires: session.expires,
        }))
    }

    /// Whether a session's access token is due for a refresh.
    fn due(session: &Session, now: u64) -> bool {
        now >= session.refresh_at
    }

    /// An API client's bearer token (`token`), verified as the issuer's JWT for this client.
    fn bearer<'a>(
        &'a self,
        token: Result<Map<String, Value>, Option<String>>,
        req: &'a mut request::Parts,
        ctx: &'a mut Context,
    ) -> Flow<'a> {
        match token {
            Ok(claims) => self.admit(&claims, None, req, ctx),
            Err(None) => Flow::Reject(invalid_bearer(Reason::InvalidCredentials)),
            Err(Some(unknown_kid)) => Flow::wait(async move {
                match self.verify(&unknown_kid).await {
                    Ok(claims) => self.admit(&claims, None, req, ctx),
                    Err(reason) => Flow::Reject(invalid_bearer(reason)),
                }
            }),
        }
    }

    /// The claims of the request's bearer token; `Err(Some(token))` for one signed with a
    /// key not known yet, `Err(None)` for one that does not verify. `None`: no bearer token.
    fn bearer_claims(
        &self,
        req: &request::Parts,
    ) -> Option<Result<Map<String, Value>, Option<String>>> {
        let token = bearer_token(req)?;
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return Some(Err(None));
        };
        Some(
            match self
                .keys
                .load()
                .verify(token, header.alg, header.kid.as_deref())
            {
                Ok((_, claims)) => Ok(claims),
                Err(Failure::Invalid(_)) => Err(None),
                Err(Failure::NoKey) => Err(Some(token.to_owned())),
            },
        )
    }
}

/// The `401` of a bearer token that does not verify.
fn invalid_bearer(reason: Reason) -> Reject {
    Reject::new(
        StatusCode::UNAUTHORIZED,
        reason,
        "the bearer token does not verify against the issuer",
    )
}

/// The token of `authorization: Bearer …`.
fn bearer_token(req: &request::Parts) -> Option<&str> {
    let (scheme, token) = req
        .headers
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim()
        .split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Publishes the signed-in user to later middlewares and the audit event: `sub` is the
/// subject, the claims are `authorize`'s, and the session is named by a digest of its id
/// (never the cookie).
fn publish(ctx: &mut Context, claims: &Map<String, Value>, session: Option<&str>) {
    if let Some(sub) = claims.get("sub").and_then(Value::as_str) {
        ctx.subject = Some(sub.into());
    }
    // A copy: the session is opened from its cookie on every request anyway, so there is
    // no verified form to share across requests as `jwt`'s cache does.
    ctx.claims = Some(Arc::new(Claims::new(claims.clone())));
    if let Some(id) = session {
        let digest = digest(&[b"oidc session", id.as_bytes()]);
        let mut hex = String::with_capacity(32);
        for b in &digest[..16] {
            let _ = write!(hex, "{b:02x}");
        }
        ctx.state.insert(SessionDigest(hex.into()));
    }
}

/// Takes the session cookies (`name`, `name_*`, `name_state`) out of the request: the app
/// gets the user's claims as headers, never the sealed tokens.
fn strip_cookies(req: &mut request::Parts, name: &str) {
    let ours = |pair: &str| {
        let key = pair.trim().split_once('=').map_or(pair.trim(), |(k, _)| k);
        key == name
            || key
                .strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('_'))
    };
    let values: Vec<HeaderValue> = req.headers.get_all(COOKIE).iter().cloned().collect();
    if !values
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(';').any(ours))
    {
        return;
    }
    req.headers.remove(COOKIE);
    let mut kept = String::new();
    for value in values.iter().filter_map(|v| v.to_str().ok()) {
        for pair in value
            .split(';')
            .filter(|p| !p.trim().is_empty() && !ours(p))
        {
            if !kept.is_empty() {
                kept.push_str("; ");
            }
            let _ = write!(kept, "{}", pair.trim());
        }
    }
    if let Ok(value) = HeaderValue::from_str(&kept) {
        if !kept.is_empty() {
            req.headers.insert(COOKIE, value);
        }
    }
}

impl Middleware for Oidc {
    fn request_fields(&self) -> Vec<HeaderName> {
        self.0.forward.iter().map(|(_, h)| h.clone()).collect()
    }

    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Context) -> Flow<'a> {
        let inner = &self.0;
        let path = req.uri.path();
        if path == inner.redirect_path {
            return Flow::wait(inner.callback(req, ctx));
        }
        if path == inner.logout_path {
            return Flow::wait(inner.logout(req, ctx));
        }
        if inner.api_bearer {
            if let Some(token) = inner.bearer_claims(req) {
                return inner.bearer(token, req, ctx);
            }
        }
        let Some(store) = &inner.store else {
            return match inner.cookie_holds::<Session>(req) {
                Ok(Some(session)) => inner.proceed(session, req, ctx),
                Ok(None) => inner.login(req, ctx, Reason::LoginRequired, Vec::new()),
                Err(()) => {
                    let clear = inner.jar.clear(req);
                    inner.login(req, ctx, Reason::LoginRequired, clear)
                }
            };
        };
        let id = match inner.cookie_holds::<String>(req) {
            Ok(Some(id)) => id,
            Ok(None) => return inner.login(req, ctx, Reason::LoginRequired, Vec::new()),
            Err(()) => {
                let clear = inner.jar.clear(req);
                return inner.login(req, ctx, Reason::LoginRequired, clear);
            }
        };
        Flow::wait(async move {
            match inner.stored(store, ctx.worker, &id).await {
                Err(store::Unavailable) => Flow::Reject(store_unavailable()),
                Ok(None) => {
                    let clear = inner.jar.clear(req);
                    inner.login(req, ctx, Reason::SessionExpired, clear)
                }
                Ok(Some(session)) => match inner.proceed(session, req, ctx) {
                    Flow::Continue => Flow::Continue,
                    Flow::Respond(resp) => Flow::Respond(resp),
                    Flow::Reject(reject) => Flow::Reject(reject),
                    Flow::Wait(refresh) => refresh.await,
                },
            }
        })
    }

    fn on_response(&self, resp: &mut response::Parts, ctx: &mut Context) {
        if let Some(Reissue(cookies)) = ctx.state.remove::<Reissue>() {
            for c in cookies {
                resp.headers.append(SET_COOKIE, c);
            }
        }
    }

    fn would_ask(&self, req: &request::Parts, _: &Context) -> Option<String> {
        let inner = &self.0;
        let provider = inner.provider.load_full();
        let at = |what: &str| match &provider {
            Some(p) => format!("{what} at {}", p.token.url),
            None => format!("{what} at the token endpoint of {}", inner.discovery_url),
        };
        let path = req.uri.path();
        if path == inner.redirect_path {
            return Some(at("would exchange the sign-in code for tokens"));
        }
        if let (Some(store), Ok(Some(_))) = (&inner.store, inner.cookie_holds::<String>(req)) {
            return Some(format!("would read the session from {}", store.describe()));
        }
        if path == inner.logout_path {
            let session = inner.cookie_holds::<Session>(req).ok().flatten()?;
            let revokes = provider.as_ref().is_none_or(|p| p.revocation.is_some());
            return revokes.then(|| {
                format!(
                    "would revoke the tokens of {}'s session at the provider",
                    session.subject().unwrap_or("?")
                )
            });
        }
        if inner.api_bearer && bearer_token(req).is_some() {
            return inner.keys.load().keys.is_empty().then(|| {
                format!(
                    "would fetch the issuer's keys (through {}) to verify the bearer token",
                    inner.discovery_url
                )
            });
        }
        match inner.cookie_holds::<Session>(req) {
            Ok(Some(s)) if s.expires > unix_now() => (Inner::due(&s, unix_now())
                && inner.refresh
                && s.refresh_token.is_some())
            .then(|| {
                at(&format!(
                    "would refresh {}'s session",
                    s.subject().unwrap_or("?")
                ))
            }),
            _ if provider.is_none() && wants_html(req) => Some(format!(
                "would read the discovery document at {} to send the browser to sign in",
                inner.discovery_url
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20poly1305::aead::{Aead, Payload};
    use chacha20poly1305::XNonce;
    use serde_json::json;

    fn inner(email_domains: &[&str], groups: &[&str]) -> Inner {
        let settings: Settings = toml::from_str(&format!(
            r#"
            issuer = "http://idp.test:8080/realms/x/"
            client_id = "app"
            cookie_secret = "{}"
            cookie_secret_previous = ["{}"]
            allowed = {{ email_domains = {email_domains:?}, groups = {groups:?} }}
            "#,
            STANDARD.encode([1u8; 32]),
            STANDARD.encode([2u8; 32]),
        ))
        .unwrap();
        super::super::Settings::validate(&settings).unwrap();
        let handles = super::super::Handles::offline();
        let build = super::super::Build {
            name: "oidc-unit",
            handles: &handles,
            response_headers: &[],
        };
        settings.inner(&build)
    }

    #[test]
    fn sealed_cookies_open_only_under_their_name_and_secrets() {
        let inner = inner(&[], &[]);
        let sealed = inner.jar.seal("a", &json!({"x": 1}));
        assert_eq!(inner.jar.open::<Value>("a", &sealed), Some(json!({"x": 1})));
        assert_eq!(
            inner.jar.open::<Value>("b", &sealed),
            None,
            "bound to its name"
        );
        let mut tampered = URL_SAFE_NO_PAD.decode(&sealed).unwrap();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(
            inner
                .jar
                .open::<Value>("a", &URL_SAFE_NO_PAD.encode(tampered)),
            None
        );
        // A cookie sealed with the previous secret still opens.
        let previous = XChaCha20Poly1305::new(&[2u8; 32].into());
        let nonce = [7u8; 24];
        let mut old = nonce.to_vec();
        old.extend(
            previous
                .encrypt(
                    &XNonce::from(nonce),
                    Payload {
                        msg: b"[1]",
                        aad: b"a",
                    },
                )
                .unwrap(),
        );
        assert_eq!(
            inner.jar.open::<Value>("a", &URL_SAFE_NO_PAD.encode(old)),
            Some(json!([1]))
        );
    }

    /// The request a browser sends back after `set_cookies`.
    fn sent_back(set_cookies: &[HeaderValue]) -> request::Parts {
        let pairs: Vec<&str> = set_cookies
            .iter()
            .map(|c| c.to_str().unwrap().split(';').next().unwrap())
            .filter(|pair| !pair.ends_with('='))
            .collect();
        http::Request::get("/")
            .header(COOKIE, pairs.join("; "))
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn session(claims: Value) -> Session {
        Session {
            id: "s".into(),
            claims: claims.as_object().unwrap().clone(),
            access_token: "at".into(),
            access_expires: u64::MAX / 2,
            refresh_at: u64::MAX / 2,
            refresh_token: None,
            id_token: "it".into(),
            expires: unix_now() + 3600,
        }
    }

    #[test]
    fn a_large_session_is_split_and_joined_and_a_small_one_clears_the_chunks() {
        let inner = inner(&[], &[]);
        let groups: Vec<String> = (0..800).map(|i| format!("group-{i}")).collect();
        let big = session(json!({"sub": "alice", "groups": groups}));
        let empty = http::Request::get("/").body(()).unwrap().into_parts().0;
        let set = inner.session_cookies(&empty, &big).unwrap();
        assert!(set.len() > 2, "{set:?}");
        for (i, c) in set.iter().enumerate() {
            let c = c.to_str().unwrap();
            assert!(c.starts_with(&format!("gatehouse_session_{i}=")), "{c}");
            assert!(c.len() < 4000, "{} bytes", c.len());
            for attr in [
                "; Path=/",
                "; HttpOnly",
                "; SameSite=Lax",
                "; Secure",
                "; Max-Age=",
            ] {
                assert!(c.contains(attr), "{attr} in {c}");
            }
        }
        let back = sent_back(&set);
        let opened = inner.cookie_holds::<Session>(&back).unwrap().unwrap();
        assert_eq!(opened.claims["groups"].as_array().unwrap().len(), 800);
        // A chunk missing from the middle: the rest does not open.
        let mut partial = set.clone();
        partial.remove(1);
        assert!(inner.cookie_holds::<Session>(&sent_back(&partial)).is_err());
        // Smaller again: one cookie, and every chunk the browser holds is expired.
        let small = inner
            .session_cookies(&back, &session(json!({"sub": "alice"})))
            .unwrap();
        assert!(small[0].to_str().unwrap().starts_with("gatehouse_session="));
        assert_eq!(small.len(), 1 + set.len());
        assert!(small[1..]
            .iter()
            .all(|c| c.to_str().unwrap().contains("=; Path=/")
                && c.to_str().unwrap().ends_with("Max-Age=0")));
        // Too large for the cookies a browser keeps: refused, not cut short.
        let groups: Vec<String> = (0..4000).map(|i| format!("group-{i}")).collect();
        let huge = session(json!({"sub": "alice", "groups": groups}));
        assert!(inner.session_cookies(&empty, &huge).is_err());
    }

    #[test]
    fn allowed_domains_and_groups() {
        let inner = inner(&["example.com"], &["admins"]);
        let claims = |v: Value| v.as_object().unwrap().clone();
        assert!(inner.allowed(&claims(
            json!({"email": "a@Example.com", "groups": ["staff", "admins"]})
        )));
        assert!(!inner.allowed(&claims(
            json!({"email": "a@example.com", "groups": ["staff"]})
        )));
        assert!(!inner.allowed(&claims(
            json!({"email": "a@example.com", "email_verified": false, "groups": ["admins"]})
        )));
        assert!(!inner.allowed(&claims(json!({"email": "a@evil.com", "groups": "admins"}))));
    }

    #[test]
    fn only_same_origin_paths_come_back() {
        assert!(same_origin("/a?b=c"));
        assert!(!same_origin("//evil.test/"));
        assert!(!same_origin("/\\evil.test"));
        assert!(!same_origin("https://evil.test/"));
    }

    #[test]
    fn session_cookies_are_stripped_from_the_request() {
        let mut parts = http::Request::get("/")
            .header(COOKIE, "a=1; gh=x; gh_0=y")
            .header(COOKIE, "gh_state=z; ghost=2")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        strip_cookies(&mut parts, "gh");
        assert_eq!(parts.headers.get(COOKIE).unwrap(), "a=1; ghost=2");
    }
}
