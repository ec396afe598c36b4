//! The decision trail through the real binary: every refusal's `deny_reason` in its audit
//! event (and in the JSON error body's message), gatehouse's own refusals before a request
//! is read recorded too, and `fail_open` in events and `gatehouse_fail_open_total` when
//! Redis is stopped under `on_backend_error = "allow"`.

mod common;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

fn the_event<'a>(events: &'a [Value], path: &str) -> &'a Value {
    let found: Vec<&Value> = events.iter().filter(|e| e["path"] == path).collect();
    assert_eq!(found.len(), 1, "one event for {path} in {events:#?}");
    found[0]
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn token(claims: Value, secret: &str) -> String {
    let mut all = json!({"sub": "alice", "iss": "https://idp.test", "aud": "api", "exp": now() + 600, "scope": "admin"});
    for (k, v) in claims.as_object().unwrap() {
        all[k] = v.clone();
    }
    let key = EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &all, &key).unwrap()
}

const CHAIN: &str = r#"
[admin]
listen = "127.0.0.1:{admin}"

[[middleware]]
type = "request_id"

[[middleware]]
name = "ip"
type = "ip_filter"
paths = ["/ip/**"]
deny = ["127.0.0.0/8"]

[[middleware]]
type = "cors"
paths = ["/cors/**"]
allow_origins = ["https://ok.example"]

[[middleware]]
name = "body"
type = "body_limit"
paths = ["/body/**"]
max = "16B"

[[middleware]]
name = "local-limit"
type = "rate_limit"
paths = ["/rl/**"]
rate = "1/h"
burst = 1

[[middleware]]
name = "redis-allow"
type = "rate_limit"
paths = ["/redis-allow/**"]
rate = "100/s"
backend = "redis"
redis_url = "{redis}"
on_backend_error = "allow"
timeout = "500ms"

[[middleware]]
name = "redis-deny"
type = "rate_limit"
paths = ["/redis-deny/**"]
rate = "100/s"
backend = "redis"
redis_url = "{redis}"
on_backend_error = "deny"
timeout = "500ms"

[[middleware]]
name = "key"
type = "api_key"
paths = ["/key/**"]
keys = [{ id = "ci", key = "k" }]

[[middleware]]
name = "token"
type = "jwt"
paths = ["/jwt/**"]
algorithms = ["HS256"]
secret = "s3cret"
issuer = "https://idp.test"
audiences = ["api"]
require_claims = { scope = "admin" }

[[middleware]]
name = "sso"
type = "forward_auth"
paths = ["/sso/**"]
url = "{auth}"

[[middleware]]
name = "sso-down"
type = "forward_auth"
paths = ["/sso-down/**"]
url = "http://127.0.0.1:{nothing}/verify"

[audit]
flush_interval = "50ms"

[[audit.sinks]]
type = "file"
path = "{events}"
"#;

fn get_with(path: &str, headers: &[(&str, &str)]) -> http::Request<Body> {
    let mut b = request("GET", path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(empty()).unwrap()
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
async fn every_refusal_names_its_reason_and_failing_open_is_recorded() {
    let up = Upstream::start().await;
    let redis = Redis::start().await;
    let auth = TestServer::start(|_| reply(401, &[("www-authenticate", "Token")], "")).await;
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let admin = free_port();
    let gh = Gatehouse::start(
        &config("max_header_bytes = \"1KiB\"", "", CHAIN),
        &[
            ("upstream", &up.url()),
            ("admin", &admin.to_string()),
            ("redis", &redis.url()),
            ("auth", &auth.url("/verify")),
            ("nothing", &free_port().to_string()),
            ("events", events.to_str().unwrap()),
        ],
    )
    .await;
    let port = gh.port;
    let bearer = |t: String| format!("Bearer {t}");

    let mut expected: Vec<(&str, u16, Option<&str>, Option<&str>)> = Vec::new();
    let mut refused =
        |path: &'static str, status: u16, by: Option<&'static str>, reason: &'static str| {
            expected.push((path, status, by, Some(reason)));
        };
    let resp = get(port, "/ok").await;
    assert_eq!(resp.status, 200);
    let resp = get(port, "/ip/x").await;
    let body = resp.assert_gatehouse_error(403, "forbidden");
    assert_eq!(
        body["message"],
        "the client address is not allowed (ip_denied)"
    );
    refused("/ip/x", 403, Some("ip"), "ip_denied");
    let preflight = request("OPTIONS", "/cors/x")
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .body(empty())
        .unwrap();
    assert_eq!(send(port, preflight).await.status, 403);
    refused("/cors/x", 403, Some("cors"), "origin_not_allowed");
    let upload = request("POST", "/body/x")
        .body(full(vec![b'x'; 100]))
        .unwrap();
    send(port, upload)
        .await
        .assert_gatehouse_error(413, "payload_too_large");
    refused("/body/x", 413, Some("body"), "body_too_large");
    assert_eq!(get(port, "/rl/a").await.status, 200);
    get(port, "/rl/b")
        .await
        .assert_gatehouse_error(429, "rate_limited");
    refused("/rl/b", 429, Some("local-limit"), "rate_limited");
    for (path, key, reason) in [
        ("/key/missing", None, "missing_credentials"),
        ("/key/wrong", Some("nope"), "invalid_credentials"),
    ] {
        let headers: Vec<(&str, &str)> = key.map(|k| ("x-api-key", k)).into_iter().collect();
        let resp = send(port, get_with(path, &headers)).await;
        let body = resp.assert_gatehouse_error(401, "unauthorized");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .ends_with(&format!("({reason})")),
            "{body}"
        );
        refused(path, 401, Some("key"), reason);
    }
    for (path, token, status, reason) in [
        ("/jwt/none", None, 401, "missing_credentials"),
        (
            "/jwt/expired",
            Some(token(json!({"exp": now() - 3600}), "s3cret")),
            401,
            "expired",
        ),
        (
            "/jwt/signature",
            Some(token(json!({}), "other")),
            401,
            "bad_signature",
        ),
        (
            "/jwt/issuer",
            Some(token(json!({"iss": "https://evil.test"}), "s3cret")),
            401,
            "wrong_issuer",
        ),
        (
            "/jwt/audience",
            Some(token(json!({"aud": "billing"}), "s3cret")),
            401,
            "wrong_audience",
        ),
        (
            "/jwt/claim",
            Some(token(json!({"scope": "read"}), "s3cret")),
            403,
            "claim_mismatch",
        ),
    ] {
        let authorization = token.map(bearer);
        let headers: Vec<(&str, &str)> = authorization
            .iter()
            .map(|a| ("authorization", a.as_str()))
            .collect();
        let resp = send(port, get_with(path, &headers)).await;
        assert_eq!(resp.status, status, "{path}: {resp:?}");
        refused(path, status, Some("token"), reason);
    }
    assert_eq!(get(port, "/sso/x").await.status, 401);
    refused("/sso/x", 401, Some("sso"), "auth_service_denied");
    get(port, "/sso-down/x")
        .await
        .assert_gatehouse_error(503, "unavailable");
    refused(
        "/sso-down/x",
        503,
        Some("sso-down"),
        "auth_service_unavailable",
    );
    // gatehouse's own: a dot-segment path, a malformed head, a head over max_header_bytes.
    let (raw, _) = raw_exchange(
        port,
        b"GET /a/../b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        STEP,
    )
    .await;
    assert!(
        raw.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    refused("/a/../b", 400, None, "bad_request");
    let (raw, _) = raw_exchange(
        port,
        b"GET /malformed HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        STEP,
    )
    .await;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    assert!(
        raw.starts_with("HTTP/1.1 400") && raw.contains("(bad_request)"),
        "{raw}"
    );
    refused("/malformed", 400, None, "bad_request");
    // A request line that cannot be read at all (on the plaintext port, one that is plain
    // text without an HTTP/1 version is taken for a mangled HTTP/2 preface instead).
    let (raw, _) = raw_exchange(port, b"NONSENSE HTTP/1.1\r\n\r\n", STEP).await;
    assert!(
        raw.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    refused("*", 400, None, "bad_request");
    let huge = format!(
        "GET /huge HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(2000)
    );
    let (raw, _) = raw_exchange(port, huge.as_bytes(), STEP).await;
    assert!(
        raw.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    refused("/huge", 431, None, "headers_too_large");

    // Redis up: both limiters decide. Stopped: one fails open, one closed.
    assert_eq!(get(port, "/redis-allow/up").await.status, 200);
    assert_eq!(get(port, "/redis-deny/up").await.status, 200);
    redis.kill();
    assert_eq!(get(port, "/redis-allow/down-1").await.status, 200);
    assert_eq!(get(port, "/redis-allow/down-2").await.status, 200);
    get(port, "/redis-deny/down")
        .await
        .assert_gatehouse_error(503, "unavailable");
    refused(
        "/redis-deny/down",
        503,
        Some("redis-deny"),
        "backend_unavailable",
    );

    // And six allowed: /ok, /rl/a, two with Redis up, two failing open.
    let all = wait_for_events(&events, expected.len() + 6).await;
    for (path, status, by, reason) in &expected {
        let e = the_event(&all, path);
        assert_eq!(e["status"], *status, "{path}: {e}");
        assert_eq!(e["decision"], "deny", "{path}: {e}");
        assert_eq!(e["denied_by"], json!(by), "{path}: {e}");
        assert_eq!(e["deny_reason"], json!(reason), "{path}: {e}");
        assert_eq!(e["fail_open"], json!([]), "{path}: {e}");
    }
    // Refused before it was a request: what its first line said.
    assert_eq!(the_event(&all, "/huge")["method"], "GET");
    assert_eq!(the_event(&all, "/huge")["request_id"], Value::Null);
    assert_eq!(
        the_event(&all, "*")["method"],
        "NONSENSE",
        "no target: `*` stands for it"
    );
    for path in ["/ok", "/rl/a", "/redis-allow/up", "/redis-deny/up"] {
        let e = the_event(&all, path);
        assert_eq!(
            (&e["decision"], &e["deny_reason"], &e["fail_open"]),
            (&json!("allow"), &Value::Null, &json!([])),
            "{path}: {e}"
        );
    }
    for path in ["/redis-allow/down-1", "/redis-allow/down-2"] {
        let e = the_event(&all, path);
        assert_eq!(e["status"], 200, "{e}");
        assert_eq!(e["decision"], "allow", "{e}");
        assert_eq!(e["fail_open"], json!(["redis-allow"]), "{e}");
        assert_eq!(e["deny_reason"], Value::Null, "{e}");
    }

    let metrics = get(admin, "/metrics").await.text();
    assert!(
        metrics.contains("# TYPE gatehouse_fail_open counter"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gatehouse_fail_open_total{middleware=\"redis-allow\"} 2"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("gatehouse_fail_open_total{middleware=\"redis-deny\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gatehouse_requests_total{status=\"431\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gatehouse_requests_total{status=\"400\"} 3"),
        "{metrics}"
    );
    assert_eq!(
        up.request_count(),
        6,
        "only the allowed requests reach the app"
    );
}
