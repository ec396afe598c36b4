//! The provider as its discovery document describes it: where browsers sign in, the
//! endpoints gatehouse calls (one connection pool per origin), and the background task that
//! discovers it and then keeps its keys fresh.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use http::header::ACCEPT;
use http::Uri;
use jsonwebtoken::Validation;
use serde::Deserialize;

use super::{ALGORITHMS, DISCOVERY_RETRY, MAX_ANSWER};
use crate::middleware::jwks::{refresh_loop, Alg, Jwks, KeySet, Remote, FETCH_TIMEOUT};
use crate::pool::{outbound_url, Endpoint, Trust};

/// What the provider's discovery document says, with the endpoints gatehouse calls.
pub(super) struct Provider {
    pub(super) authorization_endpoint: String,
    /// The code exchange and the refreshes.
    pub(super) token: Call,
    /// Claims the ID token leaves out (`email`, `groups` at some providers).
    pub(super) userinfo: Option<Call>,
    pub(super) revocation: Option<Call>,
    pub(super) end_session_endpoint: Option<String>,
}

/// An endpoint URL with the connection pool of its origin (shared by the endpoints of one
/// origin).
pub(super) struct Call {
    pub(super) url: Uri,
    pub(super) endpoint: Arc<Endpoint>,
}

/// The discovery document's fields gatehouse uses.
#[derive(Deserialize)]
struct Document {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    userinfo_endpoint: Option<String>,
    jwks_uri: String,
    revocation_endpoint: Option<String>,
    end_session_endpoint: Option<String>,
}

/// An endpoint URL of the discovery document, checked to be one gatehouse can call.
fn http_url(field: &str, url: &str) -> Result<Uri, String> {
    outbound_url(url)
        .ok_or_else(|| format!("`{field}` {url:?} is not an https://host or http://host URL"))
}

/// One GET of the discovery document, checked against the configured issuer.
async fn discover(
    url: &Uri,
    issuer: &str,
    workers: usize,
    trust: &Trust,
) -> Result<(Provider, Uri), String> {
    let idle = StdDuration::from_secs(1);
    let endpoint = Endpoint::for_url(url, trust, FETCH_TIMEOUT, idle, workers + 1);
    let req = http::Request::get(url.clone())
        .header(ACCEPT, "application/json")
        .body(Bytes::new())
        .map_err(|e| e.to_string())?;
    let resp = endpoint
        .fetch(workers, req, FETCH_TIMEOUT, MAX_ANSWER)
        .await?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let doc: Document = serde_json::from_slice(resp.body())
        .map_err(|e| format!("not an OpenID discovery document: {e}"))?;
    if doc.issuer.trim_end_matches('/') != issuer {
        return Err(format!(
            "the document's issuer is {:?}, not the configured {issuer:?}",
            doc.issuer
        ));
    }
    let jwks = http_url("jwks_uri", &doc.jwks_uri)?;
    // One pool per origin: scheme, host and port.
    let mut pools: Vec<(Uri, Arc<Endpoint>)> = Vec::new();
    let mut call = |field: &str, url: &str| -> Result<Call, String> {
        let url = http_url(field, url)?;
        let origin = |u: &Uri| {
            (
                u.scheme().cloned(),
                u.host().map(str::to_owned),
                u.port_u16(),
            )
        };
        let endpoint = match pools.iter().find(|(u, _)| origin(u) == origin(&url)) {
            Some((_, pool)) => Arc::clone(pool),
            None => {
                let pool = Arc::new(Endpoint::for_url(
                    &url,
                    trust,
                    FETCH_TIMEOUT,
                    StdDuration::from_secs(30),
                    workers + 1,
                ));
                pools.push((url.clone(), Arc::clone(&pool)));
                pool
            }
        };
        Ok(Call { url, endpoint })
    };
    let token = call("token_endpoint", &doc.token_endpoint)?;
    let userinfo = doc
        .userinfo_endpoint
        .as_deref()
        .map(|u| call("userinfo_endpoint", u))
        .transpose()?;
    let revocation = doc
        .revocation_endpoint
        .as_deref()
        .map(|u| call("revocation_endpoint", u))
        .transpose()?;
    Ok((
        Provider {
            authorization_endpoint: doc.authorization_endpoint,
            token,
            userinfo,
            revocation,
            end_session_endpoint: doc.end_session_endpoint,
        },
        jwks,
    ))
}

/// Discovers the provider (trying again every [`DISCOVERY_RETRY`] while it cannot be
/// reached), then keeps its key set fresh as `jwt` keeps a JWKS URL's.
#[allow(clippy::too_many_arguments)]
pub(super) async fn discover_then_refresh(
    url: Uri,
    issuer: String,
    workers: usize,
    trust: Trust,
    validation: Validation,
    provider: Arc<ArcSwapOption<Provider>>,
    keys: Arc<ArcSwap<KeySet>>,
    remote: Arc<Remote>,
) {
    let jwks = loop {
        match discover(&url, &issuer, workers, &trust).await {
            Ok((found, jwks)) => {
                provider.store(Some(Arc::new(found)));
                break jwks;
            }
            Err(e) => {
                tracing::warn!(url = %url, error = %e, "OpenID discovery failed; trying again");
                tokio::time::sleep(DISCOVERY_RETRY).await;
            }
        }
    };
    let allowed: Vec<Alg> = ALGORITHMS.iter().map(|a| Alg(*a)).collect();
    refresh_loop(
        Jwks::new(&jwks, &trust, workers),
        StdDuration::from_secs(300),
        allowed,
        validation,
        keys,
        remote,
    )
    .await
}
