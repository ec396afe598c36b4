//! `rate_limit`: GCRA (the generic cell rate algorithm, a token bucket kept as one
//! timestamp per key) with `rate` and `burst`, per client address, header value, subject or
//! for everyone. The same maths runs in both backends, in microseconds: in [`Gcra::decide`]
//! for `local` and in a Lua script for `redis`, so switching backend moves the state, not the
//! behaviour.
//!
//! Why not the `governor` crate: its keyed store (a DashMap) has no size bound, only a sweep
//! the caller must schedule, so an attacker rotating addresses grows it between sweeps; a
//! bounded store would have to be written anyway, and the Redis script needs the maths in a
//! form we own. What remains is a dozen lines of arithmetic, unit-tested below.

mod local;
mod redis;

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Instant;

use http::header::RETRY_AFTER;
use http::{request, response, HeaderName, HeaderValue, StatusCode};
use schemars::JsonSchema;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

use crate::chain::{Context, Flow, Middleware, Reason, Reject};
use crate::config::redis::{entry_redis, RedisConnection};
use crate::config::value::{Duration, Rate};
use crate::config::{KeyPath, Problem};

/// `rate_limit`: requests per key over time (GCRA), `429` beyond.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The sustained rate each key gets.
    rate: Rate,
    /// Requests allowed at once; defaults to the rate's per-second amount (at least 1).
    burst: Option<u64>,
    /// What a request is counted under: "client_ip", "header:NAME", "subject" or "global".
    #[serde(default)]
    #[schemars(with = "String")]
    key: KeySpec,
    #[serde(default)]
    backend: Backend,
    /// For `backend = "redis"`: `redis://host:port[/db]`, short for `redis = { url = … }`.
    redis_url: Option<String>,
    /// For `backend = "redis"`: where Redis is (a server, Sentinel, Cluster) and how to log
    /// in, as every Redis user in gatehouse takes it.
    redis: Option<RedisConnection>,
    #[serde(default)]
    on_backend_error: OnBackendError,
    /// The most keys the local backend holds; past it, idle keys are forgotten first.
    #[serde(default = "default_max_keys")]
    max_keys: usize,
    /// How long a Redis decision may take before `on_backend_error` applies.
    #[serde(default = "default_timeout")]
    timeout: Duration,
}

fn default_max_keys() -> usize {
    100_000
}

fn default_timeout() -> Duration {
    Duration(std::time::Duration::from_millis(50))
}

/// What a request is counted under.
#[derive(Debug, Clone, Default, PartialEq)]
enum KeySpec {
    /// `ctx.client_ip`, after `server.trusted_proxies`.
    #[default]
    ClientIp,
    /// The header's value; requests without it share one bucket of their own.
    Header(HeaderName),
    /// The authenticated subject; unauthenticated requests share one bucket.
    Subject,
    /// One bucket for every request.
    Global,
}

impl FromStr for KeySpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "client_ip" => Ok(KeySpec::ClientIp),
            "subject" => Ok(KeySpec::Subject),
            "global" => Ok(KeySpec::Global),
            _ => match s.strip_prefix("header:") {
                Some(name) => HeaderName::from_bytes(name.as_bytes())
                    .map(KeySpec::Header)
                    .map_err(|_| format!("invalid header name {name:?} in key {s:?}")),
                None => Err(format!(
                    "invalid key {s:?}: expected \"client_ip\", \"header:NAME\", \"subject\" or \"global\""
                )),
            },
        }
    }
}

impl<'de> Deserialize<'de> for KeySpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

impl fmt::Display for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySpec::ClientIp => f.write_str("client_ip"),
            KeySpec::Header(name) => write!(f, "header:{name}"),
            KeySpec::Subject => f.write_str("subject"),
            KeySpec::Global => f.write_str("global"),
        }
    }
}

impl KeySpec {
    /// The request's bucket, borrowed from the request: no allocation.
    fn of<'a>(&self, req: &'a request::Parts, ctx: &'a Context) -> KeyRef<'a> {
        match self {
            KeySpec::ClientIp => KeyRef::Ip(ctx.client_ip),
            KeySpec::Header(name) => req
                .headers
                .get(name)
                .map_or(KeyRef::Shared, |v| KeyRef::Text(v.as_bytes())),
            KeySpec::Subject => ctx
                .subject
                .as_deref()
                .map_or(KeyRef::Shared, |s| KeyRef::Text(s.as_bytes())),
            KeySpec::Global => KeyRef::Shared,
        }
    }
}

/// A request's bucket. `Shared` is the one bucket of requests without a header value or
/// subject, and the single bucket of `global`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum KeyRef<'a> {
    Ip(IpAddr),
    Text(&'a [u8]),
    Shared,
}

/// Where the counts live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum Backend {
    /// In this process.
    #[default]
    Local,
    /// In Redis, shared by every replica.
    Redis,
}

/// What happens to a request while Redis fails or is slow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum OnBackendError {
    /// Fail open: the request passes unlimited while Redis is slow or gone.
    #[default]
    Allow,
    /// Fail closed: 503 `unavailable`.
    Deny,
}

impl Settings {
    fn burst(&self) -> u64 {
        self.burst
            .unwrap_or_else(|| (self.rate.count / self.rate.per.as_secs().max(1)).max(1))
    }

    /// The Redis to use (`backend = "redis"`).
    fn connection(&self) -> RedisConnection {
        match (&self.redis, &self.redis_url) {
            (Some(redis), _) => redis.clone(),
            (None, Some(url)) => RedisConnection::from_url(url),
            (None, None) => RedisConnection::default(),
        }
    }

    fn gcra(&self) -> Gcra {
        let interval = self.rate.per.as_micros() as u64 / self.rate.count;
        Gcra {
            interval,
            tolerance: interval * self.burst(),
        }
    }
}

impl super::Settings for Settings {
    fn validate(&self) -> Result<(), Problem> {
        let at = |key: &str| KeyPath::default().key(key);
        if self.rate.per.as_micros() as u64 / self.rate.count == 0 {
            return Err((
                at("rate"),
                "expected at most 1000000 requests per second".into(),
            ));
        }
        match self.burst {
            Some(0) => return Err((at("burst"), "expected at least 1".into())),
            Some(b) if b > u64::from(u32::MAX) || self.gcra().interval.checked_mul(b).is_none() => {
                return Err((at("burst"), format!("expected at most {}", u32::MAX)))
            }
            _ => {}
        }
        if self.max_keys == 0 {
            return Err((at("max_keys"), "expected at least 1".into()));
        }
        if self.timeout.0.is_zero() {
            return Err((at("timeout"), "expected a duration above zero".into()));
        }
        let redis = entry_redis(self.redis_url.as_deref(), self.redis.as_ref())?;
        match (self.backend, redis) {
            (Backend::Redis, None) => Err((
                at("redis_url"),
                "backend = \"redis\" needs a `redis_url` such as \"redis://127.0.0.1:6379\" (or a `redis` table)".into(),
            )),
            (Backend::Local, Some(_)) => Err((
                at(if self.redis_url.is_some() { "redis_url" } else { "redis" }),
                "only used with backend = \"redis\"".into(),
            )),
            _ => Ok(()),
        }
    }

    fn summary(&self) -> String {
        let backend = match self.backend {
            Backend::Local => format!("local max_keys={}", self.max_keys),
            Backend::Redis => format!(
                "redis timeout={}ms on_backend_error={:?}",
                self.timeout.0.as_millis(),
                self.on_backend_error
            )
            .to_lowercase(),
        };
        let unit = match self.rate.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        format!(
            "rate={}/{unit} burst={} key={} backend={backend}",
            self.rate.count,
            self.burst(),
            self.key
        )
    }

    fn role(&self) -> super::Role {
        super::Role {
            refuses: Some(http::Method::GET),
            response_headers: vec![
                RATELIMIT_LIMIT,
                RATELIMIT_REMAINING,
                RATELIMIT_RESET,
                RETRY_AFTER,
            ],
            ..super::Role::default()
        }
    }

    fn build(&self, build: &super::Build) -> Box<dyn Middleware> {
        let (name, handles) = (build.name, build.handles);
        let states = handles.kept.get::<States>();
        let backend = match self.backend {
            Backend::Local => Store::Local(states.local(name, self)),
            Backend::Redis => Store::Redis(Box::new(redis::Remote::new(
                name,
                handles,
                &self.connection(),
                self.timeout.0,
            ))),
        };
        Box::new(RateLimit {
            epoch: states.epoch,
            gcra: self.gcra(),
            limit: self.burst() as u32,
            limit_value: HeaderValue::from(self.burst() as u32),
            key: self.key.clone(),
            on_backend_error: self.on_backend_error,
            store: backend,
        })
    }
}

/// The local limiters' state across config generations, owned by whoever builds chains
/// (the server keeps one for its life): a reload that keeps a limiter's name and settings
/// keeps its counts, since the new chain is built while the old one still holds the state.
pub struct States {
    /// The origin of local GCRA time, shared so states kept across reloads agree.
    epoch: Instant,
    /// By (middleware name, settings); entries whose limiter is gone are dropped.
    local: Mutex<Vec<(String, Settings, Weak<local::Store>)>>,
}

impl Default for States {
    fn default() -> Self {
        States {
            epoch: Instant::now(),
            local: Mutex::new(Vec::new()),
        }
    }
}

impl States {
    fn local(&self, name: &str, settings: &Settings) -> Arc<local::Store> {
        let mut states = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        states.retain(|(_, _, state)| state.strong_count() > 0);
        let found = states
            .iter()
            .find(|(n, s, _)| n == name && s == settings)
            .and_then(|(_, _, state)| state.upgrade());
        found.unwrap_or_else(|| {
            let state = Arc::new(local::Store::new(settings.max_keys));
            states.push((name.to_owned(), settings.clone(), Arc::downgrade(&state)));
            state
        })
    }
}

/// A rate limit the request was counted against, for the `ratelimit-*` response headers
/// (kept in the context's `state`). When several limiters see a request, the one with the
/// fewest remaining requests is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Quota {
    limit: u32,
    remaining: u32,
    /// Whole seconds until the bucket is full again.
    reset: u32,
}

/// GCRA parameters, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Gcra {
    /// Time one request uses up: `per / count`.
    interval: u64,
    /// `burst * interval`: how far ahead of now a key's theoretical arrival time may be.
    tolerance: u64,
}

/// One decision: whether the request passes, the key's new theoretical arrival time (TAT,
/// to store), and what the headers say.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Outcome {
    allowed: bool,
    tat: u64,
    remaining: u64,
    /// Microseconds until the bucket is full again.
    reset: u64,
    /// Microseconds until one more request would pass (0 when allowed).
    retry_after: u64,
}

impl Gcra {
    /// Decides a request at `now` for a key whose stored TAT is `stored` (0 when the key is
    /// unknown: a TAT in the past means a full bucket, so forgetting it changes nothing).
    fn decide(&self, stored: u64, now: u64) -> Outcome {
        let tat = stored.max(now);
        let new_tat = tat + self.interval;
        if new_tat - now > self.tolerance {
            return Outcome {
                allowed: false,
                tat: stored,
                remaining: 0,
                reset: tat - now,
                retry_after: new_tat - self.tolerance - now,
            };
        }
        Outcome {
            allowed: true,
            tat: new_tat,
            remaining: (self.tolerance - (new_tat - now)) / self.interval,
            reset: new_tat - now,
            retry_after: 0,
        }
    }
}

/// The `ratelimit-*` headers of `quota`; `limit` is its limit as a header value, when the
/// caller has one ready.
fn quota_headers(quota: Quota, limit: Option<&HeaderValue>) -> [(HeaderName, HeaderValue); 3] {
    let limit = limit
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(quota.limit));
    [
        (RATELIMIT_LIMIT, limit),
        (RATELIMIT_REMAINING, HeaderValue::from(quota.remaining)),
        (RATELIMIT_RESET, HeaderValue::from(quota.reset)),
    ]
}

const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Microseconds rounded up to whole seconds (a client retrying sooner would be refused).
fn ceil_secs(micros: u64) -> u32 {
    micros.div_ceil(1_000_000).min(u64::from(u32::MAX)) as u32
}

enum Store {
    Local(Arc<local::Store>),
    Redis(Box<redis::Remote>),
}

struct RateLimit {
    /// The origin of local GCRA time.
    epoch: Instant,
    gcra: Gcra,
    limit: u32,
    /// `limit` as a header value, made once: cloning it shares its bytes.
    limit_value: HeaderValue,
    key: KeySpec,
    on_backend_error: OnBackendError,
    store: Store,
}

impl RateLimit {
    /// Applies a decision: records the quota for the response, or answers 429.
    fn settle(&self, out: Outcome, ctx: &mut Context) -> Flow<'static> {
        let quota = Quota {
            limit: self.limit,
            remaining: out.remaining.min(u64::from(self.limit)) as u32,
            reset: ceil_secs(out.reset),
        };
        if !out.allowed {
            // Earlier limiters' response phases then repeat these headers, not their own.
            ctx.state.insert(quota);
            let mut reject = Reject::new(
                StatusCode::TOO_MANY_REQUESTS,
                Reason::RateLimited,
                "too many requests",
            );
            reject
                .headers
                .extend(quota_headers(quota, Some(&self.limit_value)));
            reject
                .headers
                .push((RETRY_AFTER, HeaderValue::from(ceil_secs(out.retry_after))));
            return Flow::Reject(reject);
        }
        match ctx.state.get_mut::<Quota>() {
            Some(q) if q.remaining <= quota.remaining => {}
            Some(q) => *q = quota,
            None => {
                ctx.state.insert(quota);
            }
        }
        Flow::Continue
    }
}

impl Middleware for RateLimit {
    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Context) -> Flow<'a> {
        match &self.store {
            Store::Local(store) => {
                let now = ctx.start.saturating_duration_since(self.epoch).as_micros() as u64;
                let out = store.decide(self.key.of(req, ctx), now, &self.gcra);
                self.settle(out, ctx)
            }
            Store::Redis(remote) => Flow::wait(async move {
                match remote
                    .decide(ctx.worker, self.key.of(req, ctx), &self.gcra)
                    .await
                {
                    Some(out) => self.settle(out, ctx),
                    None => match self.on_backend_error {
                        OnBackendError::Allow => {
                            ctx.failed_open();
                            Flow::Continue
                        }
                        OnBackendError::Deny => Flow::Reject(Reject::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            Reason::BackendUnavailable,
                            "the rate limit backend is unavailable",
                        )),
                    },
                }
            }),
        }
    }

    fn would_ask(&self, req: &request::Parts, ctx: &Context) -> Option<String> {
        match &self.store {
            Store::Local(_) => None,
            Store::Redis(remote) => Some(remote.describe(self.key.of(req, ctx))),
        }
    }

    fn on_response(&self, resp: &mut response::Parts, ctx: &mut Context) {
        if let Some(&quota) = ctx.state.get::<Quota>() {
            // The quota may be another limiter's (the one with the fewest remaining).
            let own = (quota.limit == self.limit).then_some(&self.limit_value);
            for (name, value) in quota_headers(quota, own) {
                resp.headers.insert(name, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000;

    fn gcra(rate: &str, burst: Option<u64>) -> Gcra {
        settings(rate, burst).gcra()
    }

    fn settings(rate: &str, burst: Option<u64>) -> Settings {
        let mut toml = format!("rate = {rate:?}\n");
        if let Some(b) = burst {
            toml += &format!("burst = {b}\n");
        }
        toml::from_str(&toml).unwrap()
    }

    #[test]
    fn exactly_burst_at_once_then_refused_with_the_wait_for_one() {
        let g = gcra("10/s", Some(3));
        let now = 5 * SEC;
        let mut tat = 0;
        for remaining in [2, 1, 0] {
            let out = g.decide(tat, now);
            assert!(out.allowed);
            assert_eq!(out.remaining, remaining);
            tat = out.tat;
        }
        let out = g.decide(tat, now);
        assert!(!out.allowed);
        assert_eq!(out.tat, tat, "a refusal does not use up anything");
        assert_eq!(out.retry_after, SEC / 10);
        assert_eq!(out.reset, 3 * SEC / 10);
        assert_eq!(ceil_secs(out.retry_after), 1);
    }

    #[test]
    fn refills_at_the_rate() {
        let g = gcra("2/s", Some(2));
        let mut tat = 0;
        for _ in 0..2 {
            tat = g.decide(tat, 0).tat;
        }
        assert!(!g.decide(tat, 499_999).allowed);
        let out = g.decide(tat, SEC / 2);
        assert!(out.allowed);
        assert_eq!(out.remaining, 0);
        // Long idle: the bucket is full again, no more.
        let out = g.decide(out.tat, 100 * SEC);
        assert_eq!((out.allowed, out.remaining), (true, 1));
    }

    #[test]
    fn burst_defaults_to_the_per_second_amount_and_at_least_one() {
        assert_eq!(settings("100/s", None).burst(), 100);
        assert_eq!(settings("6000/m", None).burst(), 100);
        assert_eq!(settings("1000/h", None).burst(), 1);
        assert_eq!(settings("5/s", Some(9)).burst(), 9);
        assert_eq!(gcra("6000/m", None).interval, 10_000);
    }

    #[test]
    fn keys_parse_and_bad_values_are_refused() {
        assert_eq!(
            "header:X-Tenant".parse::<KeySpec>().unwrap(),
            KeySpec::Header(HeaderName::from_static("x-tenant"))
        );
        assert!("header:bad name".parse::<KeySpec>().is_err());
        assert!("ip".parse::<KeySpec>().is_err());
        use super::super::Settings as _;
        let err = |toml: &str| {
            toml::from_str::<Settings>(toml)
                .unwrap()
                .validate()
                .unwrap_err()
        };
        assert_eq!(
            err("rate = \"1/s\"\nburst = 0").0,
            KeyPath::default().key("burst")
        );
        assert_eq!(
            err("rate = \"1/s\"\nbackend = \"redis\"").0,
            KeyPath::default().key("redis_url")
        );
        assert_eq!(
            err("rate = \"2000000/s\"").0,
            KeyPath::default().key("rate")
        );
    }
}
