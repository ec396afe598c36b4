//! Verification keys from a JWKS, shared by the middlewares that check signed tokens
//! (`jwt`, and `oidc` for its ID tokens and bearer tokens): the usable keys of a set, each
//! with its own validation, a background task that fetches the set again every so often or
//! when a request meets an unknown `kid`, and the verification of a token against a set.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::ACCEPT;
use http::Uri;
use jsonwebtoken::jwk::{JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::de::{self, Deserializer};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::{watch, Notify};

use crate::chain::Reason;
use crate::pool::{Endpoint, Trust};

/// An unknown `kid` asks for a JWKS refetch at most this often.
pub(super) const REFETCH_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// How long one JWKS fetch (connect, request, body) may take.
pub(super) const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The largest JWKS document accepted.
const JWKS_MAX_BYTES: usize = 1 << 20;

/// One allowed algorithm; `none` does not exist here.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Alg(pub(super) Algorithm);

impl<'de> Deserialize<'de> for Alg {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Algorithm::from_str(&s).map(Alg).map_err(|_| {
            de::Error::custom(format!(
                "unknown algorithm {s:?}: expected HS256, HS384, HS512, RS256, RS384, RS512, \
                 PS256, PS384, PS512, ES256, ES384 or EdDSA"
            ))
        })
    }
}

/// The keys in use, numbered so that a verification made with an older set is not reused.
pub(super) struct KeySet {
    pub(super) generation: u64,
    pub(super) keys: Vec<Key>,
}

/// A verification key with the validation that goes with it.
pub(super) struct Key {
    kid: Option<String>,
    key: DecodingKey,
    validation: Validation,
}

impl Key {
    /// The key, if one of the allowed algorithms is of its family (and is `only`, if set).
    pub(super) fn new(
        kid: Option<String>,
        key: DecodingKey,
        only: Option<Algorithm>,
        allowed: &[Alg],
        base: &Validation,
    ) -> Option<Key> {
        let algorithms: Vec<Algorithm> = allowed
            .iter()
            .map(|a| a.0)
            .filter(|a| a.family() == key.family() && only.is_none_or(|o| o == *a))
            .collect();
        if algorithms.is_empty() {
            return None;
        }
        let mut validation = base.clone();
        validation.algorithms = algorithms;
        Some(Key {
            kid,
            key,
            validation,
        })
    }
}

/// The signing keys of a JWKS usable with the allowed algorithms; symmetric (`oct`) keys
/// and encryption keys are left out.
pub(super) fn jwks_keys(set: &JwkSet, allowed: &[Alg], base: &Validation) -> Vec<Key> {
    set.keys
        .iter()
        .filter(|jwk| !matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)))
        .filter_map(|jwk| {
            let key = DecodingKey::from_jwk(jwk).ok()?;
            if key.family() == AlgorithmFamily::Hmac {
                return None;
            }
            let only = match jwk.common.key_algorithm {
                Some(a) => Some(Algorithm::from_str(&a.to_string()).ok()?),
                None => None,
            };
            Key::new(jwk.common.key_id.clone(), key, only, allowed, base)
        })
        .collect()
}

/// What the request path shares with the background JWKS task.
pub(super) struct Remote {
    /// The JWKS document's URL.
    pub(super) url: Uri,
    /// Wakes the task for an early refetch.
    kick: Notify,
    /// Counts finished fetch attempts, so a request can wait for the one it asked for.
    fetched: watch::Sender<u64>,
    /// When a request last asked for a refetch.
    last_kick: Mutex<Option<Instant>>,
}

impl Remote {
    pub(super) fn new(url: Uri) -> Remote {
        Remote {
            url,
            kick: Notify::new(),
            fetched: watch::Sender::new(0),
            last_kick: Mutex::new(None),
        }
    }

    /// Asks for a refetch (at most once per [`REFETCH_EVERY`]) and waits for it; false
    /// when none was due.
    pub(super) async fn refetch(&self) -> bool {
        {
            let mut last = self.last_kick.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if last.is_some_and(|t| now.duration_since(t) < REFETCH_EVERY) {
                return false;
            }
            *last = Some(now);
        }
        let mut fetched = self.fetched.subscribe();
        fetched.borrow_and_update();
        self.kick.notify_one();
        tokio::time::timeout(FETCH_TIMEOUT * 2, fetched.changed())
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Where the JWKS document comes from.
pub(super) struct Jwks {
    url: Uri,
    endpoint: Endpoint,
    /// The control thread's pool shard: the refreshes run there.
    shard: usize,
}

impl Jwks {
    pub(super) fn new(url: &Uri, trust: &Trust, workers: usize) -> Jwks {
        // Fetches are minutes apart: nothing worth keeping idle in between.
        let idle = std::time::Duration::from_secs(1);
        Jwks {
            url: url.clone(),
            endpoint: Endpoint::for_url(url, trust, FETCH_TIMEOUT, idle, workers + 1),
            shard: workers,
        }
    }

    /// One GET of the document.
    async fn fetch(&self) -> Result<JwkSet, String> {
        let req = http::Request::get(self.url.clone())
            .header(ACCEPT, "application/json")
            .body(Bytes::new())
            .map_err(|e| e.to_string())?;
        let resp = self
            .endpoint
            .fetch(self.shard, req, FETCH_TIMEOUT, JWKS_MAX_BYTES)
            .await?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        serde_json::from_slice(resp.body()).map_err(|e| format!("not a JWKS document: {e}"))
    }
}

/// Fetches the JWKS now, then every `every` or when kicked; a failed fetch keeps the last
/// good set.
pub(super) async fn refresh_loop(
    jwks: Jwks,
    every: std::time::Duration,
    allowed: Vec<Alg>,
    base: Validation,
    keys: Arc<ArcSwap<KeySet>>,
    remote: Arc<Remote>,
) {
    let mut last = None;
    loop {
        match jwks.fetch().await {
            // An unchanged document keeps the key set, and so the cached verifications.
            Ok(set) if last.as_ref() == Some(&set) => {}
            Ok(set) => {
                let fresh = jwks_keys(&set, &allowed, &base);
                tracing::debug!(url = %jwks.url, keys = fresh.len(), "JWKS fetched");
                keys.store(Arc::new(KeySet {
                    generation: keys.load().generation + 1,
                    keys: fresh,
                }));
                last = Some(set);
            }
            Err(e) => {
                tracing::warn!(url = %jwks.url, error = %e, "JWKS fetch failed; keeping the last keys")
            }
        }
        remote.fetched.send_modify(|n| *n += 1);
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = remote.kick.notified() => {}
        }
    }
}

/// Why a token did not verify.
pub(super) enum Failure {
    /// No key for its `kid` (or no key at all yet): a JWKS refetch may help.
    NoKey,
    Invalid(Reason),
}

/// The refusal reason of a failed verification.
fn reason(error: &jsonwebtoken::errors::Error) -> Reason {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => Reason::Expired,
        ErrorKind::InvalidSignature => Reason::BadSignature,
        ErrorKind::InvalidIssuer => Reason::WrongIssuer,
        ErrorKind::InvalidAudience => Reason::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => Reason::WrongIssuer,
        ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => Reason::WrongAudience,
        _ => Reason::InvalidCredentials,
    }
}

impl KeySet {
    /// The claims of a token that verifies, with the generation of the key set that did it.
    pub(super) fn verify(
        &self,
        token: &str,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<(u64, Map<String, Value>), Failure> {
        let set = self;
        let mut candidates = set
            .keys
            .iter()
            .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
            .filter(|k| k.validation.algorithms.contains(&alg))
            .peekable();
        if candidates.peek().is_none() {
            let kid_known =
                kid.is_some_and(|kid| set.keys.iter().any(|k| k.kid.as_deref() == Some(kid)));
            return Err(if kid_known {
                Failure::Invalid(Reason::InvalidCredentials)
            } else {
                Failure::NoKey
            });
        }
        // Without a `kid` several keys may be tried: one the signature does not fit says
        // nothing about the token, while one it fits names the real problem (expired...).
        let mut why = None;
        for k in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &k.key, &k.validation) {
                Ok(data) => return Ok((set.generation, data.claims)),
                Err(e) => {
                    if why.is_none_or(|r| r == Reason::BadSignature) {
                        why = Some(reason(&e));
                    }
                }
            }
        }
        Err(Failure::Invalid(why.unwrap_or(Reason::InvalidCredentials)))
    }
}
