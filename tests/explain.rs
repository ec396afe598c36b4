//! `gatehouse explain` and `gatehouse test` through the real binary: the chain of a config
//! run on one request in-process, text and JSON; a refusal by each middleware type; scope
//! skips; gatehouse's own refusals; outside state (Redis, an auth service, a JWKS URL)
//! untouched offline and asked, read-only, with `--live`; policy test files passing and
//! failing, the shipped ones included.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// A config of `rest` (middlewares) in front of `upstream`, written to a temp dir.
fn write_config(server: &str, upstream: &str, rest: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let text = config(server, "", rest)
        .replace("{port}", &free_port().to_string())
        .replace("{upstream}", upstream);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// `gatehouse explain --config CONFIG ARGS...`, off the test's runtime (whose servers the
/// binary may be asking).
async fn explain(config: &Path, args: &[&str]) -> CliOutput {
    let mut all = vec![
        "explain".to_owned(),
        "--config".to_owned(),
        config.display().to_string(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        cli(&args, &[], None)
    })
    .await
    .unwrap()
}

/// `explain --json`, which must succeed.
async fn explain_json(config: &Path, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = explain(config, &all).await;
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

/// The text report, which must succeed.
async fn explain_text(config: &Path, args: &[&str]) -> String {
    let out = explain(config, args).await;
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    out.stdout
}

fn assert_lines(text: &str, lines: &[&str]) {
    let all: Vec<&str> = text.lines().collect();
    let mut at = 0;
    for line in lines {
        match all[at..].iter().position(|l| l == line) {
            Some(i) => at += i + 1,
            None => panic!("{line:?} not found (in order) in:\n{text}"),
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn hs256(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

const ALLOWING: &str = r#"
[[middleware]]
type = "request_id"

[[middleware]]
type = "headers"
request = { set = { "x-env" = "prod" }, remove = ["x-debug"] }
response = { set = { "x-frame-options" = "DENY" } }

[[middleware]]
type = "api_key"
keys = [{ id = "ci", key = "k-123" }]

[[middleware]]
name = "per-key"
type = "rate_limit"
rate = "10/s"
burst = 3
key = "subject"

[[middleware]]
type = "timing"
"#;

#[tokio::test]
async fn explains_an_allowed_request_in_text_and_json_without_the_app() {
    let up = Upstream::start().await;
    let (_dir, config) = write_config("", &up.url(), ALLOWING);
    let args = [
        "--from",
        "198.51.100.7",
        "-H",
        "x-api-key: k-123",
        "-H",
        "x-debug: 1",
        "-H",
        "x-request-id: req-1",
        "GET",
        "/items?page=2",
    ];
    let text = explain_text(&config, &args).await;
    assert_lines(
        &text,
        &[
            "GET /items?page=2 (host localhost) from 198.51.100.7, offline: outside state is not asked (--live asks it)",
            "request phases:",
            "   1. request_id: continue",
            "   2. headers: continue",
            "        set x-env: prod",
            "        remove x-debug",
            "   3. api_key: continue",
            "        remove x-api-key",
            "        subject ci",
            "   4. per-key (rate_limit): continue",
            "   5. timing: continue",
            "app: not contacted; taken to answer 200",
            "response phases:",
            "      per-key (rate_limit):",
            "        set ratelimit-limit: 3",
            "        set ratelimit-remaining: 2",
            "      api_key: no change",
            "      headers:",
            "        set x-frame-options: DENY",
            "      request_id:",
            "        set x-request-id: req-1",
            "status 200 (the app's answer, as taken: it is not contacted)",
        ],
    );
    assert_eq!(
        text.lines().last(),
        Some("status 200 (the app's answer, as taken: it is not contacted)")
    );

    let report = explain_json(&config, &args).await;
    assert_eq!(report["request"]["client_ip"], "198.51.100.7");
    assert_eq!(report["request"]["host"], "localhost");
    assert_eq!(report["live"], false);
    assert_eq!(report["gatehouse"], Value::Null);
    let results: Vec<&Value> = report["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["result"])
        .collect();
    assert_eq!(results, ["continue"; 5]);
    assert_eq!(
        step(&report, "headers")["changes"],
        json!({"headers": [
            {"op": "set", "name": "x-env", "values": ["prod"]},
            {"op": "remove", "name": "x-debug", "values": []},
        ], "uri": null, "subject": null})
    );
    assert_eq!(step(&report, "api_key")["changes"]["subject"], "ci");
    assert_eq!(step(&report, "per-key")["type"], "rate_limit");
    assert_eq!(report["upstream"], json!({"status": 200}));
    let ran: Vec<&Value> = report["response"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["name"])
        .collect();
    assert_eq!(
        ran,
        ["timing", "per-key", "api_key", "headers", "request_id"]
    );
    assert_eq!(report["status"], 200);
    assert_eq!(report["headers"]["x-request-id"], json!(["req-1"]));
    assert_eq!(report["headers"]["ratelimit-remaining"], json!(["2"]));
    assert!(report["headers"]["x-response-time"][0]
        .as_str()
        .unwrap()
        .ends_with("ms"));
    assert_eq!(report["denied_by"], Value::Null);
    assert_eq!(report["deny_reason"], Value::Null);
    assert_eq!(report["fail_open"], json!([]));
    // Another status from the app, and a full URL: its host is the Host, https the scheme.
    let report = explain_json(
        &config,
        &[
            "--upstream-status",
            "503",
            "-H",
            "x-api-key: k-123",
            "DELETE",
            "https://api.example:8443/items/1",
        ],
    )
    .await;
    assert_eq!(report["status"], 503);
    assert_eq!(report["request"]["host"], "api.example:8443");
    assert_eq!(report["headers"]["x-frame-options"], json!(["DENY"]));
    assert_eq!(up.request_count(), 0, "explain contacted the app");
}

/// One refusal: `rest` holds the refusing entry, named `name`, between a `request_id` and a
/// `headers` entry; `args` the request.
struct Refusal {
    what: &'static str,
    rest: String,
    args: Vec<String>,
    status: u16,
    error: &'static str,
    reason: &'static str,
}

fn refusal(
    what: &'static str,
    entry: &str,
    args: &[&str],
    (status, error, reason): (u16, &'static str, &'static str),
) -> Refusal {
    Refusal {
        what,
        rest: format!(
            "[[middleware]]\ntype = \"request_id\"\n\n[[middleware]]\nname = \"refuser\"\n{entry}\n\n\
             [[middleware]]\ntype = \"headers\"\nresponse = {{ set = {{ \"x-late\" = \"1\" }} }}\n"
        ),
        args: args.iter().map(|a| a.to_string()).collect(),
        status,
        error,
        reason,
    }
}

#[tokio::test]
async fn explains_a_refusal_by_each_middleware_type() {
    let bcrypt = bcrypt::hash("right", 4).unwrap();
    let basic = format!(
        "type = \"basic_auth\"\nusers = [{{ user = \"alice\", password_hash = \"{bcrypt}\" }}]"
    );
    let jwt = "type = \"jwt\"\nalgorithms = [\"HS256\"]\nsecret = \"s3cret\"\nissuer = \"https://idp.test\"\naudiences = [\"api\"]\nrequire_claims = { scope = \"admin\" }";
    let claims = |extra: Value| {
        let mut c = json!({"sub": "alice", "iss": "https://idp.test", "aud": "api", "exp": now() + 600, "scope": "admin"});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let bearer = |token: String| format!("authorization: Bearer {token}");
    // Two RSA keys without `kid`: the reason is the one of the key the signature fits.
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    let keys: Vec<EncodingKey> = ["rsa_private.pem", "rsa2_private.pem"]
        .iter()
        .map(|f| EncodingKey::from_rsa_pem(&fixture(f)).unwrap())
        .collect();
    let set = jsonwebtoken::jwk::JwkSet {
        keys: keys
            .iter()
            .map(|k| jsonwebtoken::jwk::Jwk::from_encoding_key(k, Algorithm::RS256).unwrap())
            .collect(),
    };
    std::fs::write(&jwks, serde_json::to_string(&set).unwrap()).unwrap();
    let expired_by_second_key = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims(json!({"exp": now() - 3600})),
        &keys[1],
    )
    .unwrap();

    let cases = [
        refusal(
            "ip_filter",
            "type = \"ip_filter\"\ndeny = [\"203.0.113.0/24\"]",
            &["--from", "203.0.113.9", "GET", "/"],
            (403, "forbidden", "ip_denied"),
        ),
        refusal(
            "cors preflight",
            "type = \"cors\"\nallow_origins = [\"https://app.example\"]",
            &[
                "-H",
                "origin: https://evil.example",
                "-H",
                "access-control-request-method: POST",
                "OPTIONS",
                "/items",
            ],
            (403, "forbidden", "origin_not_allowed"),
        ),
        refusal(
            "cors preflight for a method",
            "type = \"cors\"\nallow_origins = [\"https://app.example\"]\nallow_methods = [\"GET\"]",
            &[
                "-H",
                "origin: https://app.example",
                "-H",
                "access-control-request-method: PUT",
                "OPTIONS",
                "/items",
            ],
            (403, "forbidden", "method_not_allowed"),
        ),
        refusal(
            "cors websocket handshake",
            "type = \"cors\"\nallow_origins = [\"https://app.example\"]",
            &[
                "-H",
                "Upgrade: websocket",
                "-H",
                "Connection: upgrade",
                "-H",
                "Origin: https://evil.example",
                "GET",
                "http://x/ws",
            ],
            (403, "forbidden", "origin_not_allowed"),
        ),
        refusal(
            "body_limit",
            "type = \"body_limit\"\nmax = \"1KiB\"",
            &["--body-size", "2048", "POST", "/upload"],
            (413, "payload_too_large", "body_too_large"),
        ),
        refusal(
            "api_key missing",
            "type = \"api_key\"\nkeys = [{ id = \"ci\", key = \"k\" }]",
            &["GET", "/"],
            (401, "unauthorized", "missing_credentials"),
        ),
        refusal(
            "api_key wrong",
            "type = \"api_key\"\nkeys = [{ id = \"ci\", key = \"k\" }]",
            &["-H", "x-api-key: nope", "GET", "/"],
            (401, "unauthorized", "invalid_credentials"),
        ),
        refusal(
            "basic_auth missing",
            &basic,
            &["GET", "/"],
            (401, "unauthorized", "missing_credentials"),
        ),
        refusal(
            "basic_auth wrong password",
            &basic,
            &["-H", "authorization: Basic YWxpY2U6d3Jvbmc=", "GET", "/"],
            (401, "unauthorized", "invalid_credentials"),
        ),
        refusal(
            "basic_auth malformed",
            &basic,
            &["-H", "authorization: Basic !!!", "GET", "/"],
            (401, "unauthorized", "invalid_credentials"),
        ),
        refusal(
            "jwt missing",
            jwt,
            &["GET", "/"],
            (401, "unauthorized", "missing_credentials"),
        ),
        refusal(
            "jwt malformed",
            jwt,
            &["-H", "authorization: Bearer not.a.token", "GET", "/"],
            (401, "unauthorized", "invalid_credentials"),
        ),
        refusal(
            "jwt expired",
            jwt,
            &[
                "-H",
                &bearer(hs256("s3cret", claims(json!({"exp": now() - 3600})))),
                "GET",
                "/",
            ],
            (401, "unauthorized", "expired"),
        ),
        refusal(
            "jwt bad signature",
            jwt,
            &["-H", &bearer(hs256("other", claims(json!({})))), "GET", "/"],
            (401, "unauthorized", "bad_signature"),
        ),
        refusal(
            "jwt wrong issuer",
            jwt,
            &[
                "-H",
                &bearer(hs256("s3cret", claims(json!({"iss": "https://evil.test"})))),
                "GET",
                "/",
            ],
            (401, "unauthorized", "wrong_issuer"),
        ),
        refusal(
            "jwt wrong audience",
            jwt,
            &[
                "-H",
                &bearer(hs256("s3cret", claims(json!({"aud": "billing"})))),
                "GET",
                "/",
            ],
            (401, "unauthorized", "wrong_audience"),
        ),
        refusal(
            "jwt claim",
            jwt,
            &[
                "-H",
                &bearer(hs256("s3cret", claims(json!({"scope": "read"})))),
                "GET",
                "/",
            ],
            (403, "forbidden", "claim_mismatch"),
        ),
        refusal(
            "jwt expired, second of two keys",
            &format!(
                "type = \"jwt\"\nalgorithms = [\"RS256\"]\njwks_file = \"{}\"",
                jwks.display()
            ),
            &["-H", &bearer(expired_by_second_key), "GET", "/"],
            (401, "unauthorized", "expired"),
        ),
    ];
    for case in cases {
        let (_dir, config) = write_config("", "http://127.0.0.1:9", &case.rest);
        let args: Vec<&str> = case.args.iter().map(String::as_str).collect();
        let report = explain_json(&config, &args).await;
        let what = case.what;
        let refuser = step(&report, "refuser");
        assert_eq!(refuser["result"], "deny", "{what}: {report:#}");
        assert_eq!(refuser["status"], case.status, "{what}");
        assert_eq!(refuser["error"], case.error, "{what}");
        assert_eq!(refuser["reason"], case.reason, "{what}: {refuser}");
        assert_eq!(step(&report, "request_id")["result"], "continue", "{what}");
        assert_eq!(step(&report, "headers")["result"], "not_reached", "{what}");
        assert_eq!(report["status"], case.status, "{what}");
        assert_eq!(report["denied_by"], "refuser", "{what}");
        assert_eq!(report["deny_reason"], case.reason, "{what}");
        assert_eq!(report["upstream"], Value::Null, "{what}");
        // The entry above it still sees the answer; the one below does not.
        let ran: Vec<&Value> = report["response"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| &s["name"])
            .collect();
        assert_eq!(ran, ["request_id"], "{what}");
        assert!(report["headers"]["x-request-id"][0].is_string(), "{what}");
        assert!(report["headers"].get("x-late").is_none(), "{what}");
        assert_eq!(
            report["headers"]["content-type"],
            json!(["application/json"]),
            "{what}"
        );

        let text = explain_text(&config, &args).await;
        let denies = format!(
            "   2. refuser ({}): denies: {} {}, {}: ",
            refuser["type"].as_str().unwrap(),
            case.status,
            case.error,
            case.reason
        );
        assert!(
            text.lines().any(|l| l.starts_with(&denies)),
            "{what}: {denies:?} in\n{text}"
        );
        assert_lines(&text, &["   3. headers: not reached", "app: not asked"]);
        assert_eq!(
            text.lines().last().unwrap(),
            format!(
                "status {} (denied by refuser: {})",
                case.status, case.reason
            ),
            "{what}"
        );
    }
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_by_the_body_phase_when_chunked() {
    let (_dir, config) = write_config(
        "",
        "http://127.0.0.1:9",
        "[[middleware]]\ntype = \"body_limit\"\nmax = \"100KiB\"\n",
    );
    let chunked = [
        "-H",
        "transfer-encoding: chunked",
        "--body-size",
        "300000",
        "POST",
        "/upload",
    ];
    let report = explain_json(&config, &chunked).await;
    let limit = step(&report, "body_limit");
    assert_eq!(
        limit["result"], "continue",
        "no length to refuse up front: {report:#}"
    );
    assert_eq!(limit["body"]["result"], "deny");
    assert_eq!(limit["body"]["reason"], "body_too_large");
    let bytes = limit["body"]["bytes"].as_u64().unwrap();
    assert!(bytes > 100 * 1024 && bytes <= 300_000, "{bytes}");
    assert_eq!(
        (report["status"].as_u64(), report["deny_reason"].as_str()),
        (Some(413), Some("body_too_large"))
    );
    // Within the limit, the whole body passes.
    let report = explain_json(
        &config,
        &[
            "-H",
            "transfer-encoding: chunked",
            "--body-size",
            "1000",
            "POST",
            "/upload",
        ],
    )
    .await;
    assert_eq!(
        step(&report, "body_limit")["body"],
        json!({"result": "continue", "bytes": 1000})
    );
    assert_eq!(report["status"], 200);
}

#[tokio::test]
async fn scope_skips_name_the_rule_that_excluded_the_entry() {
    let rest = r#"
[[middleware]]
name = "admin-only"
type = "ip_filter"
paths = ["/admin/**"]
deny = ["0.0.0.0/0"]

[[middleware]]
name = "key"
type = "api_key"
keys = [{ id = "ci", key = "k" }]
skip_paths = ["/healthz", "/metrics"]

[[middleware]]
name = "writes"
type = "body_limit"
methods = ["POST", "PUT"]
max = "1KiB"
"#;
    let (_dir, config) = write_config("", "http://127.0.0.1:9", rest);
    let report = explain_json(&config, &["GET", "/healthz"]).await;
    assert_eq!(step(&report, "admin-only")["result"], "skipped");
    assert_eq!(step(&report, "admin-only")["rule"], "paths");
    assert_eq!(step(&report, "admin-only")["values"], json!(["/admin/**"]));
    assert_eq!(step(&report, "key")["rule"], "skip_paths");
    assert_eq!(step(&report, "key")["values"], json!(["/healthz"]));
    assert_eq!(step(&report, "writes")["rule"], "methods");
    assert_eq!(step(&report, "writes")["values"], json!(["POST", "PUT"]));
    assert!(
        step(&report, "key").get("changes").is_none(),
        "a skipped entry changes nothing"
    );
    assert_eq!(report["status"], 200);
    assert_eq!(
        report["response"],
        json!([]),
        "skipped entries see no response either"
    );
    let text = explain_text(&config, &["GET", "/healthz"]).await;
    assert_lines(
        &text,
        &[
            "   1. admin-only (ip_filter): skipped: paths [/admin/**] do not match this path",
            "   2. key (api_key): skipped: skip_paths /healthz matches this path",
            "   3. writes (body_limit): skipped: methods [POST, PUT] do not include GET",
        ],
    );
    // Scopes match the normalized path, as when serving.
    let report = explain_json(&config, &["GET", "//%61dmin/x"]).await;
    assert_eq!(step(&report, "admin-only")["result"], "deny");
    assert_eq!(step(&report, "key")["result"], "not_reached");
}

#[tokio::test]
async fn gatehouse_s_own_refusals_come_before_the_chain() {
    let (_dir, config) = write_config(
        "max_header_bytes = \"1KiB\"",
        "http://127.0.0.1:9",
        "[[middleware]]\ntype = \"request_id\"\n",
    );
    let big = format!("x-big: {}", "a".repeat(2000));
    let cases: [(&[&str], u16, &str); 6] = [
        (&["GET", "/a/../admin"], 400, "bad_request"),
        (&["OPTIONS", "*"], 400, "bad_request"),
        (&["post", "/items"], 400, "lowercase_method"),
        (&["-H", "Host: app:abc", "GET", "/"], 400, "bad_request"),
        (&["-H", &big, "GET", "/"], 431, "headers_too_large"),
        (
            &[
                "-H",
                "content-length: 5",
                "-H",
                "transfer-encoding: chunked",
                "POST",
                "/",
            ],
            400,
            "bad_request",
        ),
    ];
    for (args, status, reason) in cases {
        let report = explain_json(&config, args).await;
        assert_eq!(
            report["gatehouse"]["status"], status,
            "{args:?}: {report:#}"
        );
        assert_eq!(report["gatehouse"]["reason"], reason, "{args:?}");
        assert_eq!(report["status"], status);
        assert_eq!(report["deny_reason"], reason);
        assert_eq!(report["denied_by"], Value::Null);
        assert_eq!(step(&report, "request_id")["result"], "not_reached");
        assert_eq!(report["response"], json!([]));
        let text = explain_text(&config, args).await;
        assert!(
            text.contains(&format!("gatehouse refuses it: {status} ")),
            "{text}"
        );
        assert_eq!(
            text.lines().last().unwrap(),
            format!("status {status} (refused by gatehouse: {reason})")
        );
    }
}

/// `server.underscores_in_headers` holds in `explain` as in the proxy: dropped before the
/// chain by default, refused with `reject`.
#[tokio::test]
async fn underscored_headers_are_explained_as_the_proxy_treats_them() {
    let chain = "[[middleware]]\ntype = \"request_id\"\n";
    let (_dir, config) = write_config("", "http://127.0.0.1:9", chain);
    let report = explain_json(&config, &["-H", "x_auth_subject: admin", "GET", "/"]).await;
    assert_eq!(report["status"], 200, "{report:#}");
    let (_dir, config) = write_config(
        "underscores_in_headers = \"reject\"",
        "http://127.0.0.1:9",
        chain,
    );
    let report = explain_json(&config, &["-H", "x_auth_subject: admin", "GET", "/"]).await;
    assert_eq!(report["status"], 400, "{report:#}");
    assert_eq!(report["deny_reason"], "underscore_in_header");
    assert_eq!(step(&report, "request_id")["result"], "not_reached");
}

/// A gRPC call is answered as the proxy answers it: a trailers-only `200` whose
/// `grpc-status` carries the refusal, the reason still in the report.
#[tokio::test]
async fn a_refused_grpc_call_is_explained_as_a_grpc_status() {
    let (_dir, config) = write_config(
        "",
        "http://127.0.0.1:9",
        "[[middleware]]\ntype = \"api_key\"\nheader = \"x-api-key\"\nkeys = [{ id = \"demo\", key = \"k-123\" }]\n",
    );
    let args = [
        "-H",
        "content-type: application/grpc",
        "POST",
        "/demo.v1.Demo/Echo",
    ];
    let report = explain_json(&config, &args).await;
    assert_eq!(report["status"], 200, "{report:#}");
    assert_eq!(report["headers"]["grpc-status"], json!(["16"]));
    assert_eq!(
        report["headers"]["content-type"],
        json!(["application/grpc"])
    );
    assert_eq!(report["deny_reason"], "missing_credentials");
    assert_eq!(report["denied_by"], "api_key");
}

#[test]
fn a_bad_command_line_exits_1_and_a_bad_config_2() {
    let (_dir, config) = write_config("", "http://127.0.0.1:9", "");
    let path = config.to_str().unwrap();
    for args in [
        vec!["explain", "--config", path, "GET", "ftp://host/x"],
        vec!["explain", "--config", path, "GET", "items"],
        vec!["explain", "--config", path, "G T", "/"],
        vec!["explain", "--config", path, "-H", "no colon", "GET", "/"],
        vec!["explain", "--config", path, "--from", "nowhere", "GET", "/"],
        vec![
            "explain",
            "--config",
            path,
            "--upstream-status",
            "99",
            "GET",
            "/",
        ],
        vec!["explain", "--config", path, "GET"],
    ] {
        let out = cli(&args, &[], None);
        assert_eq!(out.code, Some(1), "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.starts_with("error: "),
            "{args:?}: {}",
            out.stderr
        );
        assert!(out.stdout.is_empty());
    }
    let out = cli(
        &["explain", "--config", path, "GET", "ftp://host/x"],
        &[],
        None,
    );
    assert!(
        out.stderr
            .contains("expected a path, or an http:// or https:// URL"),
        "{}",
        out.stderr
    );
    let (_bad_dir, bad) = write_config(
        "",
        "http://127.0.0.1:9",
        "[[middleware]]\ntype = \"ip_filter\"\n",
    );
    let out = cli(
        &["explain", "--config", bad.to_str().unwrap(), "GET", "/"],
        &[],
        None,
    );
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("middleware[1].allow"), "{}", out.stderr);
}

// ----- outside state: offline and --live ----------------------------------------------------

/// An auth service that lets `x-token: good` through as `x-user: alice`.
async fn auth_service() -> TestServer {
    TestServer::start(|req| match req.headers.get("x-token") {
        Some(t) if t == "good" => reply(200, &[("x-user", "alice")], ""),
        _ => reply(
            401,
            &[
                ("www-authenticate", "Token"),
                ("content-type", "text/plain"),
            ],
            "who are you?",
        ),
    })
    .await
}

/// A JWKS document with the test EC key, and a token it verifies.
async fn jwks_service() -> (TestServer, String) {
    let key = EncodingKey::from_ec_pem(&fixture("ec_private.pem")).unwrap();
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("ec-1".into());
    let doc = serde_json::to_string(&jsonwebtoken::jwk::JwkSet { keys: vec![jwk] }).unwrap();
    let server =
        TestServer::start(move |_| reply(200, &[("content-type", "application/json")], &doc)).await;
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("ec-1".into());
    let token =
        jsonwebtoken::encode(&header, &json!({"sub": "alice", "exp": now() + 600}), &key).unwrap();
    (server, token)
}

fn outside_chain(jwks: &str, auth: &str, redis: &str, on_backend_error: &str) -> String {
    format!(
        r#"
[[middleware]]
type = "request_id"

[[middleware]]
type = "jwt"
algorithms = ["ES256"]
jwks_url = "{jwks}"
forward_claims = {{ sub = "x-user-id" }}

[[middleware]]
type = "forward_auth"
url = "{auth}"
copy_headers = ["x-user"]

[[middleware]]
name = "shared"
type = "rate_limit"
rate = "1/h"
burst = 2
backend = "redis"
redis_url = "{redis}"
on_backend_error = "{on_backend_error}"
timeout = "500ms"
"#
    )
}

fn redis_conn(redis: &Redis) -> redis::Connection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
async fn outside_state_is_untouched_offline_and_asked_read_only_with_live() {
    let redis = Redis::start().await;
    let auth = auth_service().await;
    let (jwks, token) = jwks_service().await;
    let (_dir, config) = write_config(
        "",
        "http://127.0.0.1:9",
        &outside_chain(
            &jwks.url("/jwks.json"),
            &auth.url("/verify"),
            &redis.url(),
            "deny",
        ),
    );
    let authorization = format!("authorization: Bearer {token}");
    let args = [
        "-H",
        authorization.as_str(),
        "-H",
        "x-token: good",
        "GET",
        "/items",
    ];
    let bucket = "gatehouse:rl:shared:127.0.0.1";

    // Offline: each says what it would ask, and is taken to let the request through.
    let report = explain_json(&config, &args).await;
    let would = |name: &str| {
        step(&report, name)["would_ask"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(step(&report, "jwt")["result"], "would_ask");
    assert_eq!(
        would("jwt"),
        format!(
            "would fetch the keys at {} to verify the token",
            jwks.url("/jwks.json")
        )
    );
    assert_eq!(
        would("forward_auth"),
        format!(
            "would ask the authentication service: GET {} (a 2xx lets the request through)",
            auth.url("/verify")
        )
    );
    assert_eq!(
        would("shared"),
        format!(
            "would ask Redis at 127.0.0.1:{} about the bucket {bucket}",
            redis.port
        )
    );
    assert_eq!(report["status"], 200);
    let text = explain_text(&config, &args).await;
    assert!(text.contains(&format!("   4. shared (rate_limit): would ask Redis at 127.0.0.1:{} about the bucket {bucket}; taken to let the request through", redis.port)), "{text}");
    assert_eq!(
        (jwks.hits(), auth.hits()),
        (0, 0),
        "offline explain asked a service"
    );
    let keys: usize = redis::cmd("DBSIZE").query(&mut redis_conn(&redis)).unwrap();
    assert_eq!(keys, 0, "offline explain touched Redis");
    // Without a token, jwt decides from what gatehouse holds: no question to ask.
    let report = explain_json(&config, &["GET", "/items"]).await;
    assert_eq!(step(&report, "jwt")["reason"], "missing_credentials");

    // Live: asked for real.
    let report = explain_json(&config, &[&["--live"], &args[..]].concat()).await;
    assert_eq!(report["live"], true);
    assert_eq!(step(&report, "jwt")["result"], "continue", "{report:#}");
    assert_eq!(step(&report, "jwt")["changes"]["subject"], "alice");
    assert_eq!(step(&report, "forward_auth")["result"], "continue");
    assert_eq!(
        step(&report, "forward_auth")["changes"]["headers"],
        json!([{"op": "set", "name": "x-user", "values": ["alice"]}])
    );
    assert_eq!(step(&report, "shared")["result"], "continue");
    assert_eq!(report["headers"]["ratelimit-remaining"], json!(["1"]));
    assert!(
        jwks.hits() >= 1 && auth.hits() == 1,
        "jwks {} auth {}",
        jwks.hits(),
        auth.hits()
    );
    // Read-only: the bucket was looked at, not taken from.
    let exists: bool = redis::cmd("EXISTS")
        .arg(bucket)
        .query(&mut redis_conn(&redis))
        .unwrap();
    assert!(!exists, "a live explain took from the bucket");

    // An exhausted bucket refuses, and stays as it was.
    let mut conn = redis_conn(&redis);
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(&mut conn).unwrap();
    let tat = (secs + 7200) * 1_000_000 + micros;
    let _: () = redis::cmd("SET")
        .arg(bucket)
        .arg(tat)
        .arg("PX")
        .arg(7_200_000)
        .query(&mut conn)
        .unwrap();
    let report = explain_json(&config, &[&["--live"], &args[..]].concat()).await;
    assert_eq!(
        step(&report, "shared")["reason"],
        "rate_limited",
        "{report:#}"
    );
    assert_eq!(report["status"], 429);
    assert!(report["headers"]["retry-after"][0].is_string());
    let after: u64 = redis::cmd("GET").arg(bucket).query(&mut conn).unwrap();
    assert_eq!(after, tat, "a live explain changed the bucket");

    // The auth service says no: its answer, auth_service_denied.
    let report = explain_json(
        &config,
        &[
            "--live",
            "-H",
            &authorization,
            "-H",
            "x-token: bad",
            "GET",
            "/items",
        ],
    )
    .await;
    assert_eq!(
        step(&report, "forward_auth")["reason"],
        "auth_service_denied"
    );
    assert_eq!(report["status"], 401);
    assert_eq!(report["headers"]["www-authenticate"], json!(["Token"]));
    assert_eq!(step(&report, "shared")["result"], "not_reached");

    // Redis gone: on_backend_error decides; "allow" fails open, and says so.
    let port = redis.kill();
    let report = explain_json(&config, &[&["--live"], &args[..]].concat()).await;
    assert_eq!(
        step(&report, "shared")["reason"],
        "backend_unavailable",
        "{report:#}"
    );
    assert_eq!(report["status"], 503);
    let (_open_dir, fail_open) = write_config(
        "",
        "http://127.0.0.1:9",
        &outside_chain(
            &jwks.url("/jwks.json"),
            &auth.url("/verify"),
            &format!("redis://127.0.0.1:{port}"),
            "allow",
        ),
    );
    let report = explain_json(&fail_open, &[&["--live"], &args[..]].concat()).await;
    assert_eq!(
        step(&report, "shared")["result"],
        "failed_open",
        "{report:#}"
    );
    assert_eq!(report["fail_open"], json!(["shared"]));
    assert_eq!(report["status"], 200);
    let text = explain_text(&fail_open, &[&["--live"], &args[..]].concat()).await;
    assert_lines(
        &text,
        &[
            "   4. shared (rate_limit): continue, failed open: its backend failed",
            "status 200 (the app's answer, as taken: it is not contacted); failed open: shared",
        ],
    );

    // The auth service gone: 503, auth_service_unavailable.
    let (_down_dir, down) = write_config(
        "",
        "http://127.0.0.1:9",
        &format!(
            "[[middleware]]\ntype = \"forward_auth\"\nurl = \"http://127.0.0.1:{}/verify\"\n",
            free_port()
        ),
    );
    let report = explain_json(&down, &["--live", "GET", "/"]).await;
    assert_eq!(
        report["deny_reason"], "auth_service_unavailable",
        "{report:#}"
    );
    assert_eq!(report["status"], 503);
}

// ----- gatehouse test ------------------------------------------------------------------------

const POLICY_CONFIG: &str = r#"
[[middleware]]
type = "headers"
response = { set = { "x-frame-options" = "DENY" } }

[[middleware]]
name = "admin-private"
type = "ip_filter"
paths = ["/admin/**"]
allow = ["10.0.0.0/8"]

[[middleware]]
type = "api_key"
keys = [{ id = "ci", key = "${CI_KEY}" }]
skip_paths = ["/healthz"]

[[middleware]]
type = "forward_auth"
url = "http://127.0.0.1:9/verify"
paths = ["/sso/**"]
"#;

fn policy_files(cases: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let (dir, config) = write_config("", "http://127.0.0.1:9", POLICY_CONFIG);
    let file = dir.path().join("cases.toml");
    std::fs::write(&file, cases).unwrap();
    (dir, config, file)
}

fn policy_test(config: &Path, file: &Path) -> CliOutput {
    cli(
        &[
            "test",
            file.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
        &[("CI_KEY", "ci-secret")],
        None,
    )
}

const PASSING: &str = r#"
[[case]]
name = "admin closed to the internet"
method = "GET"
url = "/admin/users"
from = "203.0.113.9"
headers = { "x-api-key" = "${CI_KEY}" }
expect = 403
expect_denied_by = "admin-private"
expect_headers = { "x-frame-options" = "DENY" }

[[case]]
name = "admin open inside"
url = "http://internal.example/admin/users"
from = "10.2.3.4"
headers = { "x-api-key" = "${CI_KEY}" }
expect = 200

[[case]]
name = "health needs no key"
url = "/healthz"
expect = 200

[[case]]
name = "sso asks the auth service"
url = "/sso/login"
headers = { "x-api-key" = "${CI_KEY}" }
upstream_status = 302
expect = 302
"#;

#[test]
fn policy_tests_pass() {
    let (_dir, config, file) = policy_files(PASSING);
    let out = policy_test(&config, &file);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert_lines(
        &out.stdout,
        &[
            "ok   admin closed to the internet: status 403 (denied by admin-private: ip_denied)",
            "ok   admin open inside: status 200 (the app's answer, as taken: it is not contacted)",
            "ok   health needs no key: status 200 (the app's answer, as taken: it is not contacted)",
            "ok   sso asks the auth service: status 302 (the app's answer, as taken: it is not contacted)",
            "       assumed: forward_auth would ask the authentication service: GET http://127.0.0.1:9/verify (a 2xx lets the request through), and lets it through",
            "4 cases: 4 passed, 0 failed",
        ],
    );
}

#[test]
fn policy_tests_fail_with_what_differed() {
    let cases = r#"
[[case]]
name = "admin open to everyone (wrong)"
url = "/admin/users"
from = "203.0.113.9"
headers = { "x-api-key" = "${CI_KEY}" }
expect = 200
expect_headers = { "x-frame-options" = "SAMEORIGIN", "x-missing" = "1" }

[[case]]
name = "who refuses the keyless"
url = "/items"
expect = 401
expect_denied_by = "admin-private"

[[case]]
name = "still fine"
url = "/healthz"
expect = 200
"#;
    let (_dir, config, file) = policy_files(cases);
    let out = policy_test(&config, &file);
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    assert_lines(
        &out.stdout,
        &[
            "FAIL admin open to everyone (wrong): status 403 (denied by admin-private: ip_denied)",
            "       expected status 200, got 403",
            "       expected header x-frame-options: SAMEORIGIN, got DENY",
            "       expected header x-missing: 1, got none",
            "FAIL who refuses the keyless: status 401 (denied by api_key: missing_credentials)",
            "       expected denied by admin-private, got denied by api_key",
            "ok   still fine: status 200 (the app's answer, as taken: it is not contacted)",
            "3 cases: 1 passed, 2 failed",
        ],
    );
}

#[test]
fn errors_in_a_test_file_are_located_and_exit_2() {
    let cases = [
        ("[[case]]\nname = \"x\"\nurl = \"/\"\nexpct = 200\n", "cases.toml:4:1: case[1].expct: unknown field `expct`"),
        ("[[case]]\nname = \"x\"\nurl = \"/\"\n", "cases.toml:1:1: case[1].expect: missing field `expect`"),
        ("[[case]]\nname = \"x\"\nurl = \"items\"\nexpect = 200\n", "cases.toml:3:1: case[1].url: invalid URL \"items\""),
        ("[[case]]\nname = \"x\"\nurl = \"/\"\nfrom = \"the moon\"\nexpect = 200\n", "cases.toml:4:1: case[1].from: invalid address \"the moon\""),
        ("[[case]]\nname = \"x\"\nurl = \"/\"\nexpect = 200\nexpect_denied_by = \"nobody\"\n", "case[1].expect_denied_by: no middleware named \"nobody\""),
        ("[[case]]\nname = \"x\"\nurl = \"/\"\nexpect = 900\n", "cases.toml:4:1: case[1].expect: invalid status 900"),
        ("[[case]]\nname = \"x\"\nurl = \"/\"\nheaders = { \"x-k\" = \"${NOT_SET_ANYWHERE}\" }\nexpect = 200\n", "case[1].headers.x-k: environment variable NOT_SET_ANYWHERE"),
        ("[[case]]\nname = \"x\"\nurl = \"/\"\nexpect = 200\n[[case]]\nname = \"x\"\nurl = \"/\"\nexpect = 200\n", "case[2].name: duplicate case name \"x\""),
        ("", "no test cases"),
    ];
    for (text, wanted) in cases {
        let (_dir, config, file) = policy_files(text);
        let out = policy_test(&config, &file);
        assert_eq!(out.code, Some(2), "{text}: {}{}", out.stdout, out.stderr);
        assert!(
            out.stderr.contains(wanted),
            "{wanted:?} not in {}",
            out.stderr
        );
    }
    // A config error is exit 2 too; so is a missing test file.
    let (_dir, config, file) = policy_files(PASSING);
    std::fs::write(&config, "[server]\n").unwrap();
    assert_eq!(policy_test(&config, &file).code, Some(2));
    let (_dir, config, _) = policy_files(PASSING);
    let out = policy_test(&config, Path::new("/nonexistent/cases.toml"));
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("cannot read the test file"),
        "{}",
        out.stderr
    );
}

#[test]
fn the_shipped_configs_pass_their_policy_tests() {
    let root = env!("CARGO_MANIFEST_DIR");
    for dir in [".", "deploy/examples/fastapi", "deploy/kubernetes/base"] {
        let file = format!("{root}/{dir}/proxy.test.toml");
        let config = format!("{root}/{dir}/proxy.toml");
        let out = cli(
            &["test", &file, "--config", &config],
            &[("API_KEY", "shipped-config-test-key")],
            None,
        );
        assert_eq!(out.code, Some(0), "{dir}: {}{}", out.stdout, out.stderr);
        assert!(
            out.stdout.contains(" passed, 0 failed"),
            "{dir}: {}",
            out.stdout
        );
    }
}

// ----- serving and explaining agree -------------------------------------------------------

/// One request of the agreement table: method, path (one per case), headers, body bytes.
type Case = (
    &'static str,
    &'static str,
    Vec<(&'static str, String)>,
    usize,
);

/// Headers whose values differ by nature between two runs (an id, a duration, a bucket's
/// remaining count) or come from the wire rather than the chain.
const VARYING: [&str; 5] = [
    "x-request-id",
    "x-response-time",
    "server-timing",
    "ratelimit-remaining",
    "ratelimit-reset",
];
const WIRE: [&str; 4] = ["date", "content-length", "connection", "transfer-encoding"];

/// The same config served and explained, one entry of each type (the auth service asked,
/// `--live`), for a table of requests: the same status, decision, deciding entry, reason,
/// subject, failed-open entries and response headers of gatehouse's own. Serving and
/// `explain` run one pipeline; this is what keeps an explanation from lying.
#[tokio::test]
async fn serving_and_explaining_agree_on_a_table_of_requests_across_every_type() {
    let auth = auth_service().await;
    let app = RawUpstream::replying(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let hash = bcrypt::hash("pw", 4).unwrap();
    let chain = format!(
        r#"
[[middleware]]
type = "request_id"

[[middleware]]
type = "timing"

[[middleware]]
type = "headers"
response = {{ set = {{ "x-frame-options" = "DENY" }} }}

[[middleware]]
type = "cors"
paths = ["/cors/**"]
allow_origins = ["https://ok.example"]

[[middleware]]
type = "ip_filter"
paths = ["/ip/**"]
deny = ["127.0.0.0/8"]

[[middleware]]
type = "body_limit"
paths = ["/body/**"]
max = "16B"

[[middleware]]
type = "rate_limit"
paths = ["/limit/**"]
rate = "1000/s"

[[middleware]]
type = "api_key"
paths = ["/key/**"]
keys = [{{ id = "ci", key = "k-1" }}]

[[middleware]]
type = "basic_auth"
paths = ["/basic/**"]
users = [{{ user = "bob", password_hash = "{hash}" }}]

[[middleware]]
type = "jwt"
paths = ["/jwt/**"]
algorithms = ["HS256"]
secret = "s3cret"
require_claims = {{ scope = "read" }}

[[middleware]]
type = "forward_auth"
paths = ["/fa/**"]
url = "{auth}"
copy_headers = ["x-user"]
"#,
        auth = auth.url("/verify")
    );
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let audit = format!(
        "[audit]\nflush_interval = \"10ms\"\n[[audit.sinks]]\ntype = \"file\"\npath = \"{}\"\n",
        events.display()
    );
    let template = config("", "", &format!("{chain}{audit}"));
    let gh = Gatehouse::start(&template, &[("upstream", &app.url())]).await;
    let config_path = gh.config_path.clone();
    let jwt = |scope: &str| {
        let claims = json!({"sub": "alice", "exp": now() + 600, "scope": scope});
        format!("Bearer {}", hs256("s3cret", claims))
    };
    let h = |name: &'static str, value: &str| (name, value.to_owned());
    let cases: Vec<Case> = vec![
        ("GET", "/open", vec![], 0),
        ("GET", "/a/../b", vec![], 0),
        ("post", "/lower", vec![], 0),
        (
            "OPTIONS",
            "/cors/pre",
            vec![
                h("origin", "https://ok.example"),
                h("access-control-request-method", "GET"),
            ],
            0,
        ),
        (
            "OPTIONS",
            "/cors/pre-put",
            vec![
                h("origin", "https://ok.example"),
                h("access-control-request-method", "PUT"),
            ],
            0,
        ),
        (
            "GET",
            "/cors/ok",
            vec![h("origin", "https://ok.example")],
            0,
        ),
        (
            "GET",
            "/cors/evil",
            vec![h("origin", "https://evil.example")],
            0,
        ),
        ("GET", "/ip/x", vec![], 0),
        ("POST", "/body/small", vec![], 8),
        ("POST", "/body/big", vec![], 32),
        ("GET", "/limit/x", vec![], 0),
        ("GET", "/key/none", vec![], 0),
        ("GET", "/key/bad", vec![h("x-api-key", "nope")], 0),
        ("GET", "/key/good", vec![h("x-api-key", "k-1")], 0),
        ("GET", "/basic/none", vec![], 0),
        (
            "GET",
            "/basic/good",
            vec![h("authorization", "Basic Ym9iOnB3")],
            0,
        ),
        (
            "GET",
            "/jwt/read",
            vec![h("authorization", &jwt("read"))],
            0,
        ),
        (
            "GET",
            "/jwt/write",
            vec![h("authorization", &jwt("write"))],
            0,
        ),
        (
            "GET",
            "/jwt/garbage",
            vec![h("authorization", "Bearer x.y.z")],
            0,
        ),
        ("GET", "/fa/good", vec![h("x-token", "good")], 0),
        ("GET", "/fa/bad", vec![h("x-token", "bad")], 0),
    ];
    let mut served = Vec::new();
    for (method, path, headers, body) in &cases {
        let mut req = request(method, path);
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        served.push(send(gh.port, req.body(full(vec![b'x'; *body])).unwrap()).await);
    }
    let events = wait_for_events(&events, cases.len()).await;
    for ((method, path, headers, body), resp) in cases.iter().zip(&served) {
        let mut args: Vec<String> = vec!["--live".into()];
        for (name, value) in headers {
            args.extend(["-H".into(), format!("{name}: {value}")]);
        }
        if *body > 0 {
            args.extend(["--body-size".into(), body.to_string()]);
        }
        args.extend([method.to_string(), path.to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let report = explain_json(&config_path, &args).await;
        let what = format!("{method} {path}");
        let event = events
            .iter()
            .find(|e| e["method"] == *method && e["path"] == *path)
            .unwrap_or_else(|| panic!("{what}: no event in {events:#?}"));
        assert_eq!(report["status"], resp.status.as_u16(), "{what}: {report:#}");
        for field in [
            "decision",
            "denied_by",
            "deny_reason",
            "subject",
            "fail_open",
        ] {
            assert_eq!(report[field], event[field], "{what}: {field}: {report:#}");
        }
        let ours = |name: &str| !WIRE.contains(&name);
        let explained: std::collections::BTreeMap<String, Vec<String>> =
            serde_json::from_value(report["headers"].clone()).unwrap();
        let explained: Vec<(&String, &Vec<String>)> =
            explained.iter().filter(|(n, _)| ours(n)).collect();
        let mut got: Vec<(String, Vec<String>)> = resp
            .headers
            .keys()
            .map(|n| n.as_str())
            .filter(|n| ours(n))
            .map(|n| (n.to_owned(), resp.header_all(n)))
            .collect();
        got.sort();
        let names = |list: Vec<&String>| list.into_iter().cloned().collect::<Vec<_>>();
        assert_eq!(
            names(explained.iter().map(|(n, _)| *n).collect()),
            names(got.iter().map(|(n, _)| n).collect()),
            "{what}: the header names"
        );
        for ((name, values), (_, served)) in explained.iter().zip(&got) {
            if !VARYING.contains(&name.as_str()) {
                assert_eq!(*values, served, "{what}: {name}");
            }
        }
    }
}
