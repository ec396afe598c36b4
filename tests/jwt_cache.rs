//! The `jwt` verified-token cache against the real binary: a repeated token keeps working
//! (claims forwarded, requirements enforced, spoofed headers removed on every hit), a cached
//! token is still rejected once past its `exp`, and once a JWKS refresh drops its key.
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

const INVALID: &str = "Bearer error=\"invalid_token\"";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn mint(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: serde_json::Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

/// `GET /echo` with the token and a spoofed `x-auth-subject`.
fn bearer(token: &str) -> http::Request<Body> {
    request("GET", "/echo")
        .header("authorization", format!("Bearer {token}"))
        .header("x-auth-subject", "mallory")
        .body(empty())
        .unwrap()
}

/// Sends `token` and checks a rejection with `status`, the upstream never reached.
async fn assert_rejected(gh: &Gatehouse, up: &Upstream, token: &str, status: u16) {
    let before = up.request_count();
    let resp = send(gh.port, bearer(token)).await;
    let (code, challenge) = match status {
        401 => ("unauthorized", Some(INVALID.to_owned())),
        _ => ("forbidden", None),
    };
    resp.assert_gatehouse_error(status, code);
    assert_eq!(resp.header("www-authenticate"), challenge, "{resp:?}");
    assert_eq!(
        up.request_count(),
        before,
        "a rejected request reached the upstream"
    );
}

/// Sends `token` and checks it passes with its `sub` forwarded (the spoofed value removed).
async fn assert_admitted(gh: &Gatehouse, token: &str, sub: &str) {
    let resp = send(gh.port, bearer(token)).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.upstream_headers()["x-auth-subject"], [sub]);
}

#[tokio::test]
async fn cached_tokens_keep_their_claims_and_expire_at_exp() {
    let (up, gh) = proxy_with(
        "",
        "",
        r#"
[[middleware]]
type = "jwt"
algorithms = ["HS256"]
secret = "cache-secret"
leeway = "0s"
require_claims = { scope = "read" }
forward_claims = { sub = "x-auth-subject" }
"#,
    )
    .await;
    let key = EncodingKey::from_secret(b"cache-secret");
    let hs = |sub: &str, scope: &str, exp: u64| {
        let claims = json!({ "sub": sub, "scope": scope, "exp": exp });
        mint(Algorithm::HS256, &key, None, claims)
    };

    // Repeated tokens: each keeps its own subject, and a missing claim stays a 403.
    let (alice, bob) = (
        hs("alice", "read", now() + 600),
        hs("bob", "read", now() + 600),
    );
    let writer = hs("carol", "write", now() + 600);
    for _ in 0..3 {
        assert_admitted(&gh, &alice, "alice").await;
        assert_admitted(&gh, &bob, "bob").await;
        assert_rejected(&gh, &up, &writer, 403).await;
    }

    // Accepted (and cached) while valid, rejected once past `exp` (leeway 0). Should the
    // machine stall past `exp` before both requests are answered, a fresh token is tried.
    let (brief, exp) = 'fresh: {
        for _ in 0..5 {
            let exp = now() + 3;
            let brief = hs("dave", "read", exp);
            let answers = [
                send(gh.port, bearer(&brief)).await,
                send(gh.port, bearer(&brief)).await,
            ];
            if now() < exp {
                for resp in answers {
                    assert_eq!(resp.status, 200, "{resp:?}");
                    assert_eq!(resp.upstream_headers()["x-auth-subject"], ["dave"]);
                }
                break 'fresh (brief, exp);
            }
        }
        panic!("five tokens in a row expired before two requests were answered");
    };
    within(STEP, "the token's expiry", async {
        while now() <= exp {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_rejected(&gh, &up, &brief, 401).await;
    assert_admitted(&gh, &alice, "alice").await;
}

/// Serves a JWKS document that the test can replace, counting fetches.
struct JwksServer {
    url: String,
    document: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(document: String) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let document = Arc::new(Mutex::new(document));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (served, counter) = (Arc::clone(&document), Arc::clone(&fetches));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (served, counter) = (Arc::clone(&served), Arc::clone(&counter));
                let service = hyper::service::service_fn(move |_req| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let body = served.lock().unwrap().clone();
                    async move { Ok::<_, std::convert::Infallible>(http::Response::new(full(body))) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        JwksServer {
            url,
            document,
            fetches,
            task,
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Waits until `n` more fetches have started: the first of them has then been applied.
    async fn wait_fetches(&self, n: usize) {
        let target = self.fetches() + n;
        within(STEP, "JWKS refreshes", async {
            while self.fetches() < target {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_cached_token_is_rejected_once_a_refresh_drops_its_key() {
    let fixture = |name: &str| {
        std::fs::read(format!(
            "{}/tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    };
    let rsa = EncodingKey::from_rsa_pem(&fixture("rsa_private.pem")).unwrap();
    let ec = EncodingKey::from_ec_pem(&fixture("ec_private.pem")).unwrap();
    let document = |keys: &[(&EncodingKey, Algorithm, &str)]| {
        let keys = keys
            .iter()
            .map(|(key, alg, kid)| {
                let mut jwk = Jwk::from_encoding_key(key, *alg).unwrap();
                jwk.common.key_id = Some((*kid).into());
                jwk
            })
            .collect();
        serde_json::to_string(&JwkSet { keys }).unwrap()
    };
    let jwks = JwksServer::start(document(&[
        (&rsa, Algorithm::RS256, "k1"),
        (&ec, Algorithm::ES256, "k2"),
    ]))
    .await;
    let rest = format!(
        "[[middleware]]\ntype = \"jwt\"\nalgorithms = [\"RS256\", \"ES256\"]\njwks_url = \"{}\"\n\
         jwks_refresh = \"1s\"\nforward_claims = {{ sub = \"x-auth-subject\" }}\n",
        jwks.url
    );
    let (up, gh) = proxy_with("", "", &rest).await;
    let claims = |sub: &str| json!({ "sub": sub, "exp": now() + 600 });
    let k1 = mint(Algorithm::RS256, &rsa, Some("k1"), claims("alice"));
    let k2 = mint(Algorithm::ES256, &ec, Some("k2"), claims("bob"));
    jwks.wait_fetches(1).await;
    // Unchanged documents refreshed in between: the tokens keep working.
    for _ in 0..3 {
        assert_admitted(&gh, &k1, "alice").await;
        assert_admitted(&gh, &k2, "bob").await;
        jwks.wait_fetches(1).await;
    }

    // The issuer retires k1: once the refresh lands, the cached k1 token is refused.
    *jwks.document.lock().unwrap() = document(&[(&ec, Algorithm::ES256, "k2")]);
    jwks.wait_fetches(2).await;
    assert_rejected(&gh, &up, &k1, 401).await;
    assert_admitted(&gh, &k2, "bob").await;
}

#[test]
fn cache_size_is_checked_and_zero_is_allowed() {
    let check = |size: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        let rest = format!(
            "[[middleware]]\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\nsecret = \"s\"\ncache_size = {size}\n"
        );
        let text = config("", "", &rest)
            .replace("{port}", "1")
            .replace("{upstream}", "http://127.0.0.1:1");
        std::fs::write(&path, text).unwrap();
        cli(&["check", "--config", path.to_str().unwrap()], &[], None)
    };
    let out = check("0");
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let out = check("2000000");
    assert_eq!(out.code, Some(2), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr
            .contains("middleware[1].cache_size: at most 1000000"),
        "{}",
        out.stderr
    );
}
