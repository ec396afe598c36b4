//! Authentication middlewares against the real binary: api_key, basic_auth, jwt (with a
//! JWKS server whose keys rotate) and forward_auth (with a real auth service).
mod common;

use common::*;

fn get_with(path: &str, headers: &[(&str, &str)]) -> http::Request<Body> {
    let mut b = request("GET", path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(empty()).unwrap()
}

/// A rejection: the status, gatehouse's error body, the challenge, and the upstream never reached.
async fn assert_rejected(
    gh: &Gatehouse,
    up: &Upstream,
    req: http::Request<Body>,
    status: u16,
    challenge: Option<&str>,
) -> Resp {
    let before = up.request_count();
    let resp = send(gh.port, req).await;
    let code = if status == 401 {
        "unauthorized"
    } else {
        "forbidden"
    };
    resp.assert_gatehouse_error(status, code);
    assert_eq!(
        resp.header("www-authenticate").as_deref(),
        challenge,
        "{resp:?}"
    );
    assert_eq!(
        up.request_count(),
        before,
        "a rejected request reached the upstream"
    );
    resp
}

/// `gatehouse check` of `rest` (middlewares) fails naming `needle`.
fn assert_config_error(rest: &str, needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let text = config("", "", rest)
        .replace("{port}", "1")
        .replace("{upstream}", "http://127.0.0.1:1");
    std::fs::write(&path, text).unwrap();
    let out = cli(&["check", "--config", path.to_str().unwrap()], &[], None);
    assert_eq!(out.code, Some(2), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains(needle),
        "{needle:?} not in {}",
        out.stderr
    );
}

// ----- api_key ------------------------------------------------------------------------------

#[tokio::test]
async fn api_key_header_sets_subject_strips_and_rejects() {
    let (up, gh) = proxy_with(
        "",
        "",
        r#"
[[middleware]]
type = "request_id"

[[middleware]]
type = "api_key"
keys = [{ id = "ci", key = "${CI_KEY:-s3cret-ci}" }, { id = "ops", key = "s3cret-ops" }]
"#,
    )
    .await;
    let resp = send(gh.port, get_with("/echo", &[("x-api-key", "s3cret-ops")])).await;
    assert_eq!(resp.status, 200);
    let seen = resp.upstream_headers();
    assert!(
        !seen.contains_key("x-api-key"),
        "credential forwarded: {seen:?}"
    );
    let resp = send(gh.port, get_with("/echo", &[("x-api-key", "s3cret-ci")])).await;
    assert_eq!(resp.status, 200);

    for bad in [
        vec![],
        vec![("x-api-key", "s3cret-c")],
        vec![("x-api-key", "S3CRET-CI")],
    ] {
        let resp = assert_rejected(&gh, &up, get_with("/echo", &bad), 401, Some("ApiKey")).await;
        // The request id middleware before it still ran on the 401.
        assert!(resp.json()["request_id"].is_string(), "{resp:?}");
    }
    // The key must come from the header, not the query.
    assert_rejected(
        &gh,
        &up,
        get_with("/echo?api_key=s3cret-ci", &[]),
        401,
        Some("ApiKey"),
    )
    .await;
}

#[tokio::test]
async fn api_key_query_parameter_is_removed_and_the_rest_kept() {
    let (up, gh) = proxy_with(
        "",
        "",
        r#"
[[middleware]]
type = "api_key"
query = "api_key"
keys = [{ id = "ci", key = "k+1/2" }]
"#,
    )
    .await;
    let resp = get(gh.port, "/echo?a=%20b&api_key=k%2B1%2F2&c").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["uri"], "/echo?a=%20b&c");
    let resp = get(gh.port, "/echo?api_key=k%2B1%2F2").await;
    assert_eq!(resp.json()["uri"], "/echo");
    assert_rejected(
        &gh,
        &up,
        get_with("/echo?api_key=k", &[]),
        401,
        Some("ApiKey"),
    )
    .await;
    assert_rejected(
        &gh,
        &up,
        get_with("/echo", &[("x-api-key", "k+1/2")]),
        401,
        Some("ApiKey"),
    )
    .await;
}

#[tokio::test]
async fn api_key_without_strip_forwards_the_credential() {
    let (_up, gh) = proxy_with(
        "",
        "",
        r#"
[[middleware]]
type = "api_key"
header = "authorization"
strip = false
keys = [{ id = "ci", key = "Token abc" }]
"#,
    )
    .await;
    let resp = send(
        gh.port,
        get_with("/echo", &[("authorization", "Token abc")]),
    )
    .await;
    assert_eq!(resp.upstream_headers()["authorization"], ["Token abc"]);
}

#[tokio::test]
async fn api_key_keys_file_is_reread_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "# rotated monthly\nalpha:one\n").unwrap();
    let up = Upstream::start().await;
    let rest = format!(
        "[[middleware]]\ntype = \"api_key\"\nkeys_file = \"{}\"\n",
        keys.display()
    );
    let gh = Gatehouse::start(&config("", "", &rest), &[("upstream", &up.url())]).await;
    assert_eq!(
        send(gh.port, get_with("/echo", &[("x-api-key", "one")]))
            .await
            .status,
        200
    );
    assert_rejected(
        &gh,
        &up,
        get_with("/echo", &[("x-api-key", "two")]),
        401,
        Some("ApiKey"),
    )
    .await;

    std::fs::write(&keys, "beta:two\n").unwrap();
    gh.send_signal("HUP");
    within(STEP, "the new keys file to take effect", async {
        while send(gh.port, get_with("/echo", &[("x-api-key", "two")]))
            .await
            .status
            != 200
        {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_rejected(
        &gh,
        &up,
        get_with("/echo", &[("x-api-key", "one")]),
        401,
        Some("ApiKey"),
    )
    .await;
}

#[test]
fn api_key_config_errors_name_the_key() {
    assert_config_error(
        "[[middleware]]\ntype = \"api_key\"\nkeys = []\n",
        "middleware[1].keys",
    );
    assert_config_error(
        "[[middleware]]\ntype = \"api_key\"\nkeys_file = \"/nonexistent/keys\"\n",
        "middleware[1].keys_file: cannot read /nonexistent/keys",
    );
    assert_config_error(
        "[[middleware]]\ntype = \"api_key\"\nheader = \"x-k\"\nquery = \"k\"\nkeys = [{ id = \"a\", key = \"b\" }]\n",
        "middleware[1].query",
    );
}

// ----- basic_auth ---------------------------------------------------------------------------

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

/// An argon2id hash with small parameters, so a debug build verifies it quickly.
fn argon2id(password: &str) -> String {
    use argon2::PasswordHasher;
    let params = argon2::Params::new(64, 1, 1, None).unwrap();
    let hasher = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    hasher
        .hash_password(password.as_bytes())
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn basic_auth_inline_argon2_and_htpasswd_bcrypt() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let bob = bcrypt::hash("bob-pw", 4).unwrap();
    std::fs::write(&htpasswd, format!("# users\nbob:{bob}\n")).unwrap();
    let up = Upstream::start().await;
    let rest = format!(
        r#"
[[middleware]]
type = "basic_auth"
realm = "staff only"
users = [{{ user = "alice", password_hash = "{}" }}]
htpasswd_file = "{}"
"#,
        argon2id("alice-pw"),
        htpasswd.display()
    );
    let gh = Gatehouse::start(&config("", "", &rest), &[("upstream", &up.url())]).await;
    let challenge = Some("Basic realm=\"staff only\", charset=\"UTF-8\"");

    for (user, pw) in [("alice", "alice-pw"), ("bob", "bob-pw")] {
        // Twice: the second one is answered from the verification cache.
        for _ in 0..2 {
            let resp = send(
                gh.port,
                get_with("/echo", &[("authorization", &basic(user, pw))]),
            )
            .await;
            assert_eq!(resp.status, 200, "{user}: {resp:?}");
            let seen = resp.upstream_headers();
            assert!(
                !seen.contains_key("authorization"),
                "credential forwarded: {seen:?}"
            );
        }
    }
    for auth in [
        basic("alice", "bob-pw"),
        basic("bob", "alice-pw"),
        basic("mallory", "alice-pw"),
        basic("alice", ""),
        "Bearer abc".into(),
        "Basic !!".into(),
    ] {
        assert_rejected(
            &gh,
            &up,
            get_with("/echo", &[("authorization", &auth)]),
            401,
            challenge,
        )
        .await;
    }
    assert_rejected(&gh, &up, get_with("/echo", &[]), 401, challenge).await;
}

#[tokio::test]
async fn basic_auth_without_strip_forwards_authorization() {
    let rest = format!(
        "[[middleware]]\ntype = \"basic_auth\"\nstrip = false\nusers = [{{ user = \"u\", password_hash = \"{}\" }}]\n",
        bcrypt::hash("pw", 4).unwrap()
    );
    let (_up, gh) = proxy_with("", "", &rest).await;
    let auth = basic("u", "pw");
    let resp = send(gh.port, get_with("/echo", &[("authorization", &auth)])).await;
    assert_eq!(resp.upstream_headers()["authorization"], [auth]);
}

#[test]
fn basic_auth_plaintext_password_is_a_config_error() {
    assert_config_error(
        "[[middleware]]\ntype = \"basic_auth\"\nusers = [{ user = \"u\", password_hash = \"hunter2\" }]\n",
        "middleware[1].users[1].password_hash: expected a bcrypt",
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("htpasswd");
    std::fs::write(&file, "carol:$apr1$abc$def\n").unwrap();
    assert_config_error(
        &format!(
            "[[middleware]]\ntype = \"basic_auth\"\nhtpasswd_file = \"{}\"\n",
            file.display()
        ),
        "middleware[1].htpasswd_file:",
    );
}

use std::sync::{Arc, Mutex};

// ----- jwt ----------------------------------------------------------------------------------

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn mint(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: serde_json::Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

fn bearer(token: &str) -> http::Request<Body> {
    get_with("/echo", &[("authorization", &format!("Bearer {token}"))])
}

/// Claims that pass the HS test's checks; `extra` overrides.
fn claims(extra: serde_json::Value) -> serde_json::Value {
    let mut c = json!({
        "sub": "alice", "iss": "https://idp.test", "aud": "api",
        "exp": now() + 600, "scope": "read write", "email": "a@example.com",
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

/// The DER bytes of a PEM fixture.
fn pem_der(name: &str) -> Vec<u8> {
    use base64::Engine;
    let text = String::from_utf8(fixture_bytes(name)).unwrap();
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

#[tokio::test]
async fn jwt_hs256_claims_forwarding_and_every_rejection() {
    let (up, gh) = proxy_with(
        "",
        "",
        r#"
[[middleware]]
type = "jwt"
algorithms = ["HS256"]
secret = "${JWT_SECRET:-test-secret}"
issuer = "https://idp.test"
audiences = ["api", "admin"]
cookie = "session"
require_claims = { scope = "read" }
forward_claims = { sub = "x-auth-subject", email = "x-auth-email" }
"#,
    )
    .await;
    let key = EncodingKey::from_secret(b"test-secret");
    let hs = |extra| mint(Algorithm::HS256, &key, None, claims(extra));

    let token = hs(json!({}));
    let mut req = bearer(&token);
    req.headers_mut()
        .insert("x-auth-subject", "admin".parse().unwrap());
    let resp = send(gh.port, req).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let seen = resp.upstream_headers();
    assert_eq!(seen["x-auth-subject"], ["alice"]);
    assert_eq!(seen["x-auth-email"], ["a@example.com"]);

    // A spoofed header of a claim the token lacks is removed, not passed through.
    let mut req = bearer(&hs(json!({ "email": null })));
    req.headers_mut()
        .insert("x-auth-email", "ceo@example.com".parse().unwrap());
    let seen = send(gh.port, req).await.upstream_headers();
    assert!(!seen.contains_key("x-auth-email"), "{seen:?}");

    // From the cookie, when there is no authorization header.
    let resp = send(
        gh.port,
        get_with("/echo", &[("cookie", &format!("a=b; session={token}"))]),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");

    let invalid = Some("Bearer error=\"invalid_token\"");
    let unsigned = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims(json!({})).to_string().as_bytes())
    );
    let rejected = [
        hs(json!({ "exp": now() - 120 })), // expired (past the leeway)
        hs(json!({ "nbf": now() + 120 })), // not yet valid
        hs(json!({ "exp": null })),        // no expiry at all
        hs(json!({ "iss": "https://evil.test" })), // wrong issuer
        hs(json!({ "aud": "other" })),     // wrong audience
        mint(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"guess"),
            None,
            claims(json!({})),
        ),
        mint(Algorithm::HS384, &key, None, claims(json!({}))), // not an allowed algorithm
        unsigned,
        format!("{}x", &token[..token.len() - 1]),
        "not-a-token".into(),
    ];
    for token in rejected {
        assert_rejected(&gh, &up, bearer(&token), 401, invalid).await;
    }
    // Within the leeway, an expired token still passes; an audience list matches any.
    assert_eq!(
        send(gh.port, bearer(&hs(json!({ "exp": now() - 5 }))))
            .await
            .status,
        200
    );
    assert_eq!(
        send(gh.port, bearer(&hs(json!({ "aud": ["x", "admin"] }))))
            .await
            .status,
        200
    );

    assert_rejected(&gh, &up, get_with("/echo", &[]), 401, Some("Bearer")).await;
    for scope in [json!("write"), json!("readonly"), json!(null)] {
        assert_rejected(&gh, &up, bearer(&hs(json!({ "scope": scope }))), 403, None).await;
    }
}

#[tokio::test]
async fn jwt_public_key_file_and_algorithm_confusion() {
    let rest = format!(
        "[[middleware]]\ntype = \"jwt\"\nalgorithms = [\"RS256\", \"PS256\"]\npublic_key_file = \"{}\"\n",
        fixture("rsa_public.pem")
    );
    let (up, gh) = proxy_with("", "", &rest).await;
    let rsa = EncodingKey::from_rsa_pem(&fixture_bytes("rsa_private.pem")).unwrap();
    for alg in [Algorithm::RS256, Algorithm::PS256] {
        let resp = send(gh.port, bearer(&mint(alg, &rsa, None, claims(json!({}))))).await;
        assert_eq!(resp.status, 200, "{alg:?}: {resp:?}");
    }
    let invalid = Some("Bearer error=\"invalid_token\"");
    // The classic confusion: the RSA public key used as an HMAC secret.
    let public_as_secret = EncodingKey::from_secret(&fixture_bytes("rsa_public.pem"));
    for alg in [Algorithm::HS256, Algorithm::HS512] {
        let token = mint(alg, &public_as_secret, None, claims(json!({})));
        assert_rejected(&gh, &up, bearer(&token), 401, invalid).await;
    }
    // Another RSA key, and an allowed-family algorithm not in the list.
    let other = EncodingKey::from_rsa_pem(&fixture_bytes("rsa2_private.pem")).unwrap();
    assert_rejected(
        &gh,
        &up,
        bearer(&mint(Algorithm::RS256, &other, None, claims(json!({})))),
        401,
        invalid,
    )
    .await;
    assert_rejected(
        &gh,
        &up,
        bearer(&mint(Algorithm::RS512, &rsa, None, claims(json!({})))),
        401,
        invalid,
    )
    .await;
}

#[tokio::test]
async fn jwt_jwks_file_with_ec_and_ed25519_keys() {
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    let ec = EncodingKey::from_ec_pem(&fixture_bytes("ec_private.pem")).unwrap();
    let ed = EncodingKey::from_ed_pem(&fixture_bytes("ed_private.pem")).unwrap();
    let mut ec_jwk = Jwk::from_encoding_key(&ec, Algorithm::ES256).unwrap();
    ec_jwk.common.key_id = Some("ec".into());
    // jsonwebtoken cannot make an Ed25519 JWK: its `x` is the last 32 bytes of the SPKI DER.
    let ed_jwk: Jwk = serde_json::from_value(json!({
        "kty": "OKP", "crv": "Ed25519", "x": b64(&pem_der("ed_public.pem")[12..]),
    }))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let set = JwkSet {
        keys: vec![ec_jwk, ed_jwk],
    };
    std::fs::write(&path, serde_json::to_string(&set).unwrap()).unwrap();
    let rest = format!(
        "[[middleware]]\ntype = \"jwt\"\nalgorithms = [\"ES256\", \"EdDSA\"]\njwks_file = \"{}\"\n",
        path.display()
    );
    let (up, gh) = proxy_with("", "", &rest).await;
    let ok = [
        mint(Algorithm::ES256, &ec, Some("ec"), claims(json!({}))),
        mint(Algorithm::ES256, &ec, None, claims(json!({}))),
        mint(Algorithm::EdDSA, &ed, None, claims(json!({}))),
    ];
    for token in ok {
        assert_eq!(send(gh.port, bearer(&token)).await.status, 200);
    }
    let invalid = Some("Bearer error=\"invalid_token\"");
    let rejected = [
        mint(Algorithm::EdDSA, &ed, Some("ec"), claims(json!({}))), // kid of another family
        mint(Algorithm::ES256, &ec, Some("gone"), claims(json!({}))), // unknown kid, no URL
    ];
    for token in rejected {
        assert_rejected(&gh, &up, bearer(&token), 401, invalid).await;
    }
}

#[tokio::test]
async fn jwt_jwks_url_rotates_refetches_on_unknown_kid_and_keeps_the_last_good_set() {
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    let rsa = EncodingKey::from_rsa_pem(&fixture_bytes("rsa_private.pem")).unwrap();
    let ec = EncodingKey::from_ec_pem(&fixture_bytes("ec_private.pem")).unwrap();
    let jwk = |key: &EncodingKey, alg, kid: &str| {
        let mut jwk = Jwk::from_encoding_key(key, alg).unwrap();
        jwk.common.key_id = Some(kid.into());
        jwk
    };
    let document = |keys| serde_json::to_string(&JwkSet { keys }).unwrap();
    // (status, body) the JWKS server answers with.
    let state = Arc::new(Mutex::new((
        200,
        document(vec![jwk(&rsa, Algorithm::RS256, "k1")]),
    )));
    let served = Arc::clone(&state);
    let jwks = TestServer::start(move |_| {
        let (status, body) = served.lock().unwrap().clone();
        reply(status, &[("content-type", "application/json")], &body)
    })
    .await;
    let rest = format!(
        "[[middleware]]\ntype = \"jwt\"\nalgorithms = [\"RS256\", \"ES256\"]\njwks_url = \"{}\"\njwks_refresh = \"1h\"\n",
        jwks.url("/.well-known/jwks.json")
    );
    let (up, gh) = proxy_with("", "", &rest).await;
    let k1 = mint(Algorithm::RS256, &rsa, Some("k1"), claims(json!({})));
    let k2 = mint(Algorithm::ES256, &ec, Some("k2"), claims(json!({})));
    within(STEP, "the first JWKS fetch", async {
        while send(gh.port, bearer(&k1)).await.status != 200 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;

    // The issuer rotates to k2: the first k2 token triggers a refetch and passes.
    state.lock().unwrap().1 = document(vec![jwk(&ec, Algorithm::ES256, "k2")]);
    let before = jwks.hits();
    let resp = send(gh.port, bearer(&k2)).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(jwks.hits(), before + 1, "one refetch for the unknown kid");
    // k1 is gone now; another unknown kid right after is not refetched again (rate limit).
    let invalid = Some("Bearer error=\"invalid_token\"");
    assert_rejected(&gh, &up, bearer(&k1), 401, invalid).await;
    assert_eq!(jwks.hits(), before + 1, "refetches are rate-limited");
    drop(gh);

    // A failing JWKS endpoint: the keys already fetched stay in use.
    let rest = rest.replace("\"1h\"", "\"1s\"");
    let (_up, gh) = proxy_with("", "", &rest).await;
    within(STEP, "the first JWKS fetch", async {
        while send(gh.port, bearer(&k2)).await.status != 200 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    state.lock().unwrap().0 = 500;
    let failing_from = jwks.hits();
    within(STEP, "two failed refreshes", async {
        while jwks.hits() < failing_from + 2 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(send(gh.port, bearer(&k2)).await.status, 200);
}

/// Waits until gatehouse has logged a line containing `what`, and returns its output.
async fn logged(gh: &Gatehouse, what: &str) -> String {
    within(STEP, what, async {
        loop {
            let output = gh.output();
            if output.contains(what) {
                return output;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
}

#[tokio::test]
async fn jwt_jwks_url_over_https_trusts_the_roots_of_ssl_cert_file_and_nothing_else() {
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    let rsa = EncodingKey::from_rsa_pem(&fixture_bytes("rsa_private.pem")).unwrap();
    let mut jwk = Jwk::from_encoding_key(&rsa, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some("k1".into());
    let document = serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap();
    let ca = TestCa::new();
    let jwks = TestServer::start_tls(&ca, move |_| {
        reply(200, &[("content-type", "application/json")], &document)
    })
    .await;
    let rest = |url: &str| {
        format!("[[middleware]]\ntype = \"jwt\"\nalgorithms = [\"RS256\"]\njwks_url = \"{url}\"\n")
    };
    let token = mint(Algorithm::RS256, &rsa, Some("k1"), claims(json!({})));

    // Trusted through SSL_CERT_FILE: the keys are fetched over TLS and the token passes.
    let (_up, gh) = proxy_with_env(&rest(&jwks.https_url("/jwks")), &[ca.trusted_env()]).await;
    within(STEP, "the JWKS fetched over https", async {
        while send(gh.port, bearer(&token)).await.status != 200 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    drop(gh);

    // The same URL without the CA (the system's roots only): no keys, every token refused,
    // and the log says why.
    let fetched = jwks.hits();
    refused_handshake(
        &rest(&jwks.https_url("/jwks")),
        &[],
        "TLS handshake with localhost: certificate not trusted",
        &token,
        (&jwks, fetched),
    )
    .await;

    // Trusted, but asked by another name than the certificate's.
    refused_handshake(
        &rest(&format!("https://{}/jwks", jwks.addr)),
        &[ca.trusted_env()],
        "TLS handshake with 127.0.0.1: certificate name mismatch",
        &token,
        (&jwks, fetched),
    )
    .await;
}

/// A JWKS URL whose handshake fails: the log says `why`, `token` is refused, and the JWKS
/// server has still seen only its `fetched` requests.
async fn refused_handshake(
    config: &str,
    envs: &[(&str, &str)],
    why: &str,
    token: &str,
    (jwks, fetched): (&TestServer, usize),
) {
    let (up, gh) = proxy_with_env(config, envs).await;
    let output = logged(&gh, "JWKS fetch failed").await;
    assert!(output.contains(why), "{output}");
    assert_rejected(
        &gh,
        &up,
        bearer(token),
        401,
        Some("Bearer error=\"invalid_token\""),
    )
    .await;
    assert_eq!(
        jwks.hits(),
        fetched,
        "a request got through an untrusted handshake"
    );
}

/// Sends `token` `times` times and checks each is a `401 invalid_token` that never reaches
/// the upstream; `what` names the case in a failure.
async fn assert_refused(gh: &Gatehouse, up: &Upstream, token: &str, times: usize, what: &str) {
    let before = up.request_count();
    for attempt in 1..=times {
        let resp = send(gh.port, bearer(token)).await;
        assert_eq!(resp.status, 401, "{what}, use {attempt}: {resp:?}");
        resp.assert_gatehouse_error(401, "unauthorized");
        assert_eq!(
            resp.header("www-authenticate").as_deref(),
            Some("Bearer error=\"invalid_token\""),
            "{what}, use {attempt}: {resp:?}"
        );
    }
    assert_eq!(up.request_count(), before, "{what}: reached the upstream");
}

/// Sends `token` twice (the second answer comes from the verified-token cache) and checks
/// both pass; the first waits for the keys (a `jwks_url` is fetched after start).
async fn assert_passes_twice(gh: &Gatehouse, token: &str, what: &str) {
    within(STEP, "the keys", async {
        while send(gh.port, bearer(token)).await.status != 200 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    let resp = send(gh.port, bearer(token)).await;
    assert_eq!(resp.status, 200, "{what}, second use: {resp:?}");
}

#[tokio::test]
async fn jwt_issuer_and_audiences_require_their_claims_with_every_key_source() {
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    let hs = EncodingKey::from_secret(b"claims-secret");
    let rsa = EncodingKey::from_rsa_pem(&fixture_bytes("rsa_private.pem")).unwrap();
    let ec = EncodingKey::from_ec_pem(&fixture_bytes("ec_private.pem")).unwrap();
    let jwks = |key: &EncodingKey, alg| {
        let keys = vec![Jwk::from_encoding_key(key, alg).unwrap()];
        serde_json::to_string(&JwkSet { keys }).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks(&ec, Algorithm::ES256)).unwrap();
    let served = jwks(&rsa, Algorithm::RS256);
    let jwks_url =
        TestServer::start(move |_| reply(200, &[("content-type", "application/json")], &served))
            .await;
    let sources = [
        (
            "secret",
            "algorithms = [\"HS256\"]\nsecret = \"claims-secret\"".to_owned(),
            Algorithm::HS256,
            &hs,
        ),
        (
            "public_key_file",
            format!(
                "algorithms = [\"PS256\"]\npublic_key_file = \"{}\"",
                fixture("rsa_public.pem")
            ),
            Algorithm::PS256,
            &rsa,
        ),
        (
            "jwks_file",
            format!(
                "algorithms = [\"ES256\"]\njwks_file = \"{}\"",
                jwks_file.display()
            ),
            Algorithm::ES256,
            &ec,
        ),
        (
            "jwks_url",
            format!(
                "algorithms = [\"RS256\"]\njwks_url = \"{}\"",
                jwks_url.url("/jwks")
            ),
            Algorithm::RS256,
            &rsa,
        ),
    ];
    for (source, keys, alg, key) in sources {
        let rest = format!(
            "[[middleware]]\ntype = \"jwt\"\n{keys}\nissuer = \"https://idp.test\"\naudiences = [\"api\"]\n"
        );
        let (up, gh) = proxy_with("", "", &rest).await;
        let token = |extra| mint(alg, key, None, claims(extra));
        assert_passes_twice(&gh, &token(json!({})), source).await;
        // Absent, null, or of a type that is no issuer or audience: twice each, so a
        // second use cannot be answered from the cache either.
        for lacking in [
            json!({ "iss": null }),
            json!({ "aud": null }),
            json!({ "iss": null, "aud": null }),
            json!({ "iss": 42 }),
            json!({ "aud": 7 }),
            json!({ "aud": [] }),
        ] {
            let what = format!("{source}: {lacking}");
            assert_refused(&gh, &up, &token(lacking), 2, &what).await;
        }
    }
}

#[tokio::test]
async fn jwt_issuer_or_audiences_alone_requires_only_its_claim() {
    let key = EncodingKey::from_secret(b"claims-secret");
    let token = |extra| mint(Algorithm::HS256, &key, None, claims(extra));
    let cases = [
        ("issuer = \"https://idp.test\"", "iss", "aud"),
        ("audiences = [\"api\", \"admin\"]", "aud", "iss"),
    ];
    for (setting, required, optional) in cases {
        let rest = format!(
            "[[middleware]]\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\nsecret = \"claims-secret\"\n{setting}\n"
        );
        let (up, gh) = proxy_with("", "", &rest).await;
        let what = format!("{setting}: without {required}");
        assert_refused(&gh, &up, &token(json!({ required: null })), 2, &what).await;
        let what = format!("{setting}: without {optional}");
        assert_passes_twice(&gh, &token(json!({ optional: null })), &what).await;
    }
}

#[test]
fn jwt_config_errors_name_the_key() {
    let jwt = |rest: &str| format!("[[middleware]]\ntype = \"jwt\"\n{rest}\n");
    assert_config_error(
        &jwt("algorithms = [\"none\"]\nsecret = \"s\""),
        "middleware[1].algorithms[1]: unknown algorithm \"none\"",
    );
    assert_config_error(
        &jwt("algorithms = [\"HS256\", \"RS256\"]\nsecret = \"s\""),
        "middleware[1].algorithms: a `secret` verifies only",
    );
    let pem = fixture("rsa_public.pem");
    assert_config_error(
        &jwt(&format!(
            "algorithms = [\"RS256\", \"HS256\"]\npublic_key_file = \"{pem}\""
        )),
        "middleware[1].algorithms: HS algorithms need a `secret`",
    );
    assert_config_error(
        &jwt(&format!(
            "algorithms = [\"ES256\"]\npublic_key_file = \"{pem}\""
        )),
        "middleware[1].public_key_file:",
    );
    assert_config_error(&jwt(&format!("algorithms = [\"RS256\"]\npublic_key_file = \"{pem}\"\njwks_url = \"http://127.0.0.1:1/\"")), "set exactly one of");
    assert_config_error(
        &jwt("algorithms = [\"RS256\"]\njwks_url = \"ftp://idp/jwks\""),
        "middleware[1].jwks_url: invalid URL \"ftp://idp/jwks\": expected https://",
    );
}

// ----- forward_auth -------------------------------------------------------------------------

/// An auth service that decides by `authorization`: `Bearer good` passes (answering with
/// `x-user`, and echoing what it was told as `x-auth-saw`), `Bearer deny` gets a 403 with
/// its own body, anything else a 401 with a challenge.
async fn auth_service() -> TestServer {
    TestServer::start(auth_decision).await
}

/// What [`auth_service`] answers to `req`.
fn auth_decision(req: &http::request::Parts) -> http::Response<Body> {
    {
        let h = |name: &str| {
            req.headers
                .get(name)
                .map_or("-", |v| v.to_str().unwrap())
                .to_owned()
        };
        match h("authorization").as_str() {
            "Bearer good" => {
                let saw = format!(
                    "{} {} {} cookie={} body-length={}",
                    h("x-forwarded-method"),
                    h("x-forwarded-uri"),
                    h("x-forwarded-host"),
                    h("cookie"),
                    h("content-length"),
                );
                reply(
                    200,
                    &[("x-user", "alice"), ("x-user", "ops"), ("x-auth-saw", &saw)],
                    "",
                )
            }
            "Bearer deny" => reply(403, &[("content-type", "text/plain")], "no entry for you"),
            _ => reply(401, &[("www-authenticate", "Bearer realm=\"sso\"")], ""),
        }
    }
}

fn forward_auth_config(url: &str) -> String {
    format!(
        "[[middleware]]\ntype = \"request_id\"\n\n[[middleware]]\ntype = \"forward_auth\"\nurl = \"{url}\"\ntimeout = \"500ms\"\ncopy_headers = [\"x-user\", \"x-auth-saw\"]\n"
    )
}

#[tokio::test]
async fn forward_auth_allows_copies_headers_and_passes_denials_through() {
    let auth = auth_service().await;
    let (up, gh) = proxy_with("", "", &forward_auth_config(&auth.url("/verify"))).await;

    let req = request("POST", "/echo/x?y=1")
        .header("authorization", "Bearer good")
        .header("cookie", "s=1")
        .header("x-user", "root") // spoofed: must not reach the app
        .body(full("request body"))
        .unwrap();
    let resp = send(gh.port, req).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let seen = resp.upstream_headers();
    assert_eq!(seen["x-user"], ["alice", "ops"]);
    let host = format!("127.0.0.1:{}", gh.port);
    assert_eq!(
        seen["x-auth-saw"],
        [format!("POST /echo/x?y=1 {host} cookie=s=1 body-length=-")]
    );
    assert_eq!(resp.json()["body"], "request body");

    let before = up.request_count();
    let resp = send(
        gh.port,
        get_with("/echo", &[("authorization", "Bearer deny")]),
    )
    .await;
    assert_eq!(resp.status, 403);
    assert_eq!(resp.text(), "no entry for you");
    assert_eq!(resp.header("content-type").as_deref(), Some("text/plain"));
    assert!(
        resp.header("x-request-id").is_some(),
        "earlier middlewares see the answer"
    );
    let resp = send(gh.port, get_with("/echo", &[])).await;
    assert_eq!(resp.status, 401);
    assert_eq!(
        resp.header("www-authenticate").as_deref(),
        Some("Bearer realm=\"sso\"")
    );
    assert_eq!(
        up.request_count(),
        before,
        "a denied request reached the upstream"
    );
}

#[tokio::test]
async fn forward_auth_fails_closed() {
    // Nothing listens: refused.
    let refused = format!("http://127.0.0.1:{}/verify", free_port());
    // Accepts connections (the kernel does) but never answers: timed out.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}/verify", silent.local_addr().unwrap());
    for url in [refused, silent_url] {
        let (up, gh) = proxy_with("", "", &forward_auth_config(&url)).await;
        let resp = send(
            gh.port,
            get_with("/echo", &[("authorization", "Bearer good")]),
        )
        .await;
        let body = resp.assert_gatehouse_error(503, "unavailable");
        assert!(body["request_id"].is_string(), "{body}");
        assert_eq!(up.request_count(), 0, "{url}: the upstream was reached");
    }
}

#[tokio::test]
async fn forward_auth_over_https_verifies_the_auth_service() {
    let ca = TestCa::new();
    let auth = TestServer::start_tls(&ca, auth_decision).await;
    // The handshake counts against `timeout`: room for a busy machine.
    let rest = forward_auth_config(&auth.https_url("/verify")).replace("500ms", "10s");
    let (up, gh) = proxy_with_env(&rest, &[ca.trusted_env()]).await;
    let resp = send(
        gh.port,
        get_with("/echo", &[("authorization", "Bearer good")]),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(up.request_count(), 1);
    assert_eq!(resp.upstream_headers()["x-user"], ["alice", "ops"]);
    let resp = send(
        gh.port,
        get_with("/echo", &[("authorization", "Bearer deny")]),
    )
    .await;
    assert_eq!(resp.status, 403, "{resp:?}");
    drop(gh);

    // Untrusted: refused like an auth service that is down, and the log says why.
    let hits = auth.hits();
    let (up, gh) = proxy_with_env(&rest, &[]).await;
    for _ in 0..3 {
        let resp = send(
            gh.port,
            get_with("/echo", &[("authorization", "Bearer good")]),
        )
        .await;
        resp.assert_gatehouse_error(503, "unavailable");
    }
    assert_eq!(up.request_count(), 0);
    assert_eq!(
        auth.hits(),
        hits,
        "a request got through an untrusted handshake"
    );
    let output = logged(&gh, "the authentication service did not answer").await;
    assert!(
        output.contains("TLS handshake with localhost: certificate not trusted"),
        "{output}"
    );
}

/// An auth service of the kind found in the field: it decides on a header of its own,
/// `x-token: open-sesame`, answering `x-user` when it lets a request through; it records
/// the headers of every request it gets.
async fn token_service() -> (TestServer, Arc<Mutex<Vec<http::HeaderMap>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let service = TestServer::start(move |req| {
        record.lock().unwrap().push(req.headers.clone());
        match req.headers.get("x-token") {
            Some(token) if token == "open-sesame" => reply(200, &[("x-user", "alice")], ""),
            _ => reply(401, &[("www-authenticate", "Token")], ""),
        }
    })
    .await;
    (service, seen)
}

fn header_names(headers: &http::HeaderMap) -> std::collections::BTreeSet<String> {
    headers.keys().map(|n| n.to_string()).collect()
}

/// What gatehouse itself sets on every auth request.
const FORWARDED: [&str; 5] = [
    "x-forwarded-method",
    "x-forwarded-uri",
    "x-forwarded-host",
    "x-forwarded-for",
    "x-forwarded-proto",
];

#[tokio::test]
async fn forward_auth_sends_every_client_header_but_hop_by_hop_and_body_framing() {
    let (auth, seen) = token_service().await;
    let rest = format!(
        "[[middleware]]\ntype = \"forward_auth\"\nurl = \"{}\"\ncopy_headers = [\"x-user\"]\n",
        auth.url("/verify")
    );
    // Behind a trusted proxy, so the client's address (203.0.113.7, below) is not the peer:
    // the chain still ends with the peer, as the app's does.
    let (up, gh) = proxy_with("trusted_proxies = [\"127.0.0.1/32\"]", "", &rest).await;
    let last_seen = || {
        seen.lock()
            .unwrap()
            .last()
            .cloned()
            .expect("an auth request")
    };
    let expect_names = |extra: &[&str]| {
        let names = ["host"].iter().chain(&FORWARDED).chain(extra);
        names
            .map(|n| n.to_string())
            .collect::<std::collections::BTreeSet<_>>()
    };

    // Without its header, the service says no, and that is the client's answer.
    let resp = send(gh.port, get_with("/echo", &[("x-tenant", "acme")])).await;
    assert_eq!(resp.status, 401, "{resp:?}");
    assert_eq!(resp.header("www-authenticate").as_deref(), Some("Token"));
    assert_eq!(up.request_count(), 0);

    // With it: every end-to-end header goes along; hop-by-hop ones (and what `connection`
    // names) do not; the client's `x-forwarded-*` are replaced by what the app gets.
    let client_headers = [
        ("x-token", "open-sesame"),
        ("x-tenant", "acme"),
        ("authorization", "Bearer abc"),
        ("cookie", "a=1"),
        ("cookie", "b=2"),
        ("x-user", "root"),
        ("connection", "keep-alive, x-hop"),
        ("x-hop", "for gatehouse only"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("proxy-authorization", "Basic Zm9vOmJhcg=="),
        ("te", "trailers"),
        ("trailer", "x-checksum"),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-method", "DELETE"),
        ("x-forwarded-uri", "/admin"),
    ];
    let resp = send(gh.port, get_with("/echo/x?y=1", &client_headers)).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let app = resp.upstream_headers();
    assert_eq!(
        app["x-user"],
        ["alice"],
        "the client's x-user reached the app"
    );
    let got = last_seen();
    assert_eq!(
        header_names(&got),
        expect_names(&["x-token", "x-tenant", "authorization", "cookie", "x-user"]),
        "{got:?}"
    );
    let value = |name: &str| got.get(name).unwrap().to_str().unwrap().to_owned();
    let values = |name: &str| -> Vec<_> { got.get_all(name).iter().collect() };
    assert_eq!(
        value("host"),
        auth.addr.to_string(),
        "the auth service's own host"
    );
    assert_eq!(values("cookie"), ["a=1", "b=2"]);
    assert_eq!(value("x-forwarded-method"), "GET");
    assert_eq!(value("x-forwarded-uri"), "/echo/x?y=1");
    assert_eq!(value("x-forwarded-host"), format!("127.0.0.1:{}", gh.port));
    assert_eq!(value("x-forwarded-for"), "203.0.113.7, 127.0.0.1");
    for name in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"] {
        assert_eq!([value(name)], *app[name], "{name}: as the app gets it");
    }
    assert_eq!(value("x-forwarded-proto"), "http");

    // Bodies, with a length and chunked (and a 100-continue expectation): the service
    // gets neither them nor their framing.
    let sized = request("POST", "/echo")
        .header("x-token", "open-sesame")
        .header("expect", "100-continue")
        .body(full("request body"))
        .unwrap();
    let chunked = request("PUT", "/echo")
        .header("x-token", "open-sesame")
        .body(streamed_body(10_000, 1000))
        .unwrap();
    for (req, length) in [(sized, 12), (chunked, 10_000)] {
        let resp = send(gh.port, req).await;
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.json()["body_bytes"], length, "the app gets the body");
        let got = last_seen();
        assert_eq!(header_names(&got), expect_names(&["x-token"]), "{got:?}");
    }
}

#[tokio::test]
async fn forward_auth_request_headers_is_an_allow_list() {
    // The service refuses any request that carries a header it was not promised.
    let allowed = ["host", "x-token"];
    let service = TestServer::start(move |req| {
        let stray = req
            .headers
            .keys()
            .map(|n| n.as_str())
            .find(|n| !allowed.contains(n) && !FORWARDED.contains(n));
        match (stray, req.headers.get("x-token")) {
            (Some(name), _) => reply(400, &[], &format!("unexpected header {name}")),
            (None, Some(token)) if token == "open-sesame" => reply(200, &[], ""),
            (None, _) => reply(401, &[], ""),
        }
    })
    .await;
    let rest = format!(
        "[[middleware]]\ntype = \"forward_auth\"\nurl = \"{}\"\nrequest_headers = [\"X-Token\"]\n",
        service.url("/verify")
    );
    let (up, gh) = proxy_with("", "", &rest).await;
    let mut headers = vec![
        ("x-token", "open-sesame"),
        ("authorization", "Bearer abc"),
        ("cookie", "a=1"),
        ("x-tenant", "acme"),
        ("x-forwarded-prefix", "/api"),
    ];
    let resp = send(gh.port, get_with("/echo", &headers)).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.upstream_headers()["authorization"], ["Bearer abc"]);
    // An allowed header that the client's `connection` names is the client hop's only.
    headers.push(("connection", "x-token"));
    let resp = send(gh.port, get_with("/echo", &headers)).await;
    assert_eq!(resp.status, 401, "{resp:?}");
    assert_eq!(up.request_count(), 1);
    assert_eq!(service.hits(), 2);
}

/// A gatehouse terminating TLS with a certificate for `localhost` from a fresh CA, in front
/// of `rest`; returns it with the CA to trust.
async fn with_tls(rest: &str) -> (Upstream, Gatehouse, TestCa) {
    let ca = TestCa::new();
    let server = format!(
        "\n[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        ca.leaf_file.display(),
        ca.leaf_key_file.display()
    );
    let up = Upstream::start().await;
    let gh = Gatehouse::start(&config(&server, "", rest), &[("upstream", &up.url())]).await;
    (up, gh, ca)
}

#[tokio::test]
async fn forward_auth_tells_the_service_the_client_came_over_https() {
    let (auth, seen) = token_service().await;
    let rest = format!(
        "[[middleware]]\ntype = \"forward_auth\"\nurl = \"{}\"\n",
        auth.url("/verify")
    );
    let (_up, gh, ca) = with_tls(&rest).await;
    let req = request("GET", "/echo")
        .header("host", "localhost")
        .header("x-token", "open-sesame")
        .header("x-forwarded-proto", "http")
        .body(empty())
        .unwrap();
    let resp = tls_send(gh.port, ca.cert.clone(), req).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.upstream_headers()["x-forwarded-proto"], ["https"]);
    let got = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(got["x-forwarded-proto"], "https", "{got:?}");
    assert_eq!(got["x-forwarded-host"], "localhost", "{got:?}");
}

#[test]
fn forward_auth_request_headers_and_claims_config_errors_and_summary() {
    let entry = |extra: &str| {
        format!("[[middleware]]\ntype = \"forward_auth\"\nurl = \"http://127.0.0.1:9/verify\"\n{extra}\n")
    };
    assert_config_error(
        &entry("request_headers = []"),
        "middleware[1].request_headers: list at least one header, or leave `request_headers` out",
    );
    for (name, why) in [
        ("connection", "a hop-by-hop header"),
        ("Transfer-Encoding", "a hop-by-hop header"),
        ("te", "a hop-by-hop header"),
        (
            "host",
            "the client's host is always sent, as x-forwarded-host",
        ),
        ("content-length", "the auth service never gets the body"),
        ("x-forwarded-for", "always sent, with gatehouse's value"),
    ] {
        assert_config_error(
            &entry(&format!("request_headers = [\"x-token\", \"{name}\"]")),
            &format!(
                "middleware[1].request_headers[2]: {}: {why}",
                name.to_lowercase()
            ),
        );
    }
    assert_config_error(
        &entry("claims_from_headers = { \"\" = \"x-user\" }"),
        "middleware[1].claims_from_headers: a claim name is empty",
    );
    assert_config_error(
        &entry("claims_from_headers = { role = \"x user role\" }"),
        "invalid header name \"x user role\"",
    );
    for (extra, summary) in [
        (
            "",
            "request_headers=all copy_headers=[] claims_from_headers=[]",
        ),
        (
            "request_headers = [\"x-token\", \"cookie\"]",
            "request_headers=[x-token, cookie]",
        ),
        (
            "claims_from_headers = { sub = \"x-user\", role = \"X-User-Role\" }",
            "claims_from_headers=[(\"role\", \"x-user-role\"), (\"sub\", \"x-user\")]",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        let text = config("", "", &entry(extra))
            .replace("{port}", "1")
            .replace("{upstream}", "http://127.0.0.1:1");
        std::fs::write(&path, text).unwrap();
        let out = cli(&["check", "--config", path.to_str().unwrap()], &[], None);
        assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
        assert!(
            out.stdout.contains(summary),
            "{summary:?} not in {}",
            out.stdout
        );
    }
}
