//! `authorize` through the real binary: a policy of admins, readers, an address deny rule
//! and a default decides requests carrying real JWTs (and none), each decision named in the
//! audit event and the refusal; claims and the subject can come from a `forward_auth`
//! service's answer headers; a rule that fails to evaluate does not match and is counted;
//! an invalid expression stops the config at its position; `explain` and `gatehouse test`
//! name the deciding rule; a reload replaces the rules while requests keep coming.
mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An HS256 token for `sub` with `extra` claims, signed with the policy's secret.
fn token(sub: &str, extra: Value) -> String {
    let mut claims = json!({"sub": sub, "exp": now() + 600});
    for (k, v) in extra.as_object().unwrap() {
        claims[k] = v.clone();
    }
    let key = EncodingKey::from_secret(b"policy-secret");
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
}

/// `method path`, with a bearer `token` and from `forwarded_for` when given.
fn req(
    method: &str,
    path: &str,
    token: Option<&str>,
    forwarded_for: Option<&str>,
) -> http::Request<Body> {
    let mut b = request(method, path);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    if let Some(ip) = forwarded_for {
        b = b.header("x-forwarded-for", ip);
    }
    b.body(empty()).unwrap()
}

/// The example policy: health checks open, admins under `/admin/`, readers may read, one
/// network refused, everything else denied. `jwt` runs on `/api/**` and `/admin/**` only,
/// so other requests reach the policy without a subject.
const POLICY: &str = r#"
[[middleware]]
type = "jwt"
paths = ["/api/**", "/admin/**"]
algorithms = ["HS256"]
secret = "policy-secret"

[[middleware]]
name = "authz"
type = "authorize"
skip_paths = ["/open/**"]
default = "deny"
rules = [
  { name = "health", allow = "request.path == '/healthz'" },
  { name = "admins", allow = "request.path.startsWith('/admin/') && 'admin' in claims.roles" },
  { name = "readers", allow = "request.method in ['GET', 'HEAD'] && subject != null" },
  { name = "block-ip", deny = "source.ip.startsWith('10.9.')" },
]
"#;

const SERVER: &str = "trusted_proxies = [\"127.0.0.0/8\"]";

const ADMIN_AND_AUDIT: &str = r#"
[admin]
listen = "127.0.0.1:{admin}"

[audit]
flush_interval = "50ms"

[[audit.sinks]]
type = "file"
path = "{events}"
"#;

#[tokio::test]
async fn the_policy_decides_by_its_first_true_rule_and_names_it() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let admin = free_port();
    let rest = format!("{POLICY}\n{ADMIN_AND_AUDIT}");
    let gh = Gatehouse::start(
        &config(SERVER, "", &rest),
        &[
            ("upstream", &up.url()),
            ("admin", &admin.to_string()),
            ("events", events.to_str().unwrap()),
        ],
    )
    .await;
    let root = token("root", json!({"roles": ["admin", "ops"]}));
    let reader = token("rita", json!({"scope": "read"}));

    // (request, status, the rule that decided)
    let cases: Vec<(http::Request<Body>, u16, &str)> = vec![
        (req("GET", "/healthz", None, None), 200, "health"),
        (
            req("POST", "/admin/users", Some(&root), None),
            200,
            "admins",
        ),
        (
            req("GET", "/api/items", Some(&reader), None),
            200,
            "readers",
        ),
        // A reader may not write; the rule `admins` fails on the reader's missing `roles`
        // claim (an evaluation error: no match), then nothing else matches.
        (
            req("POST", "/admin/users", Some(&reader), None),
            403,
            "default",
        ),
        (
            req("POST", "/api/items", Some(&reader), None),
            403,
            "default",
        ),
        // Readers' rule comes first; a write from the refused network meets the deny rule.
        (
            req("GET", "/api/items", Some(&reader), Some("10.9.0.5")),
            200,
            "readers",
        ),
        (
            req("POST", "/api/items", Some(&reader), Some("10.9.0.5")),
            403,
            "block-ip",
        ),
        // No subject, no rule allowed: 401, whichever rule refused.
        (req("GET", "/public", None, None), 401, "default"),
        (
            req("GET", "/public", None, Some("10.9.0.7")),
            401,
            "block-ip",
        ),
    ];
    let total = cases.len() + 1;
    for (request, status, rule) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let resp = send(gh.port, request).await;
        assert_eq!(resp.status, status, "{what}: {resp:?}");
        if status == 200 {
            continue;
        }
        let code = if status == 401 {
            "unauthorized"
        } else {
            "forbidden"
        };
        let body = resp.assert_gatehouse_error(status, code);
        let message = body["message"].as_str().unwrap();
        let named = match rule {
            "default" => "no policy rule allows the request (default) (policy_denied)".to_owned(),
            rule => format!("denied by policy rule \"{rule}\" (policy_denied)"),
        };
        assert_eq!(message, named, "{what}");
        assert_eq!(
            resp.header("www-authenticate").is_some(),
            status == 401,
            "{what}: a 401 challenges, a 403 does not"
        );
    }
    // Out of the policy's scope: no decision.
    assert_eq!(get(gh.port, "/open/page").await.status, 200);

    let all = wait_for_events(&events, total).await;
    // Events are written once each response is out: in any order.
    let mut rules: Vec<(String, String, Value, Value)> = all
        .iter()
        .map(|e| {
            (
                e["method"].as_str().unwrap().to_owned(),
                e["path"].as_str().unwrap().to_owned(),
                e["policy_rule"].clone(),
                e["deny_reason"].clone(),
            )
        })
        .collect();
    let denied = json!("policy_denied");
    let expected = [
        ("GET", "/healthz", json!("health"), Value::Null),
        ("POST", "/admin/users", json!("admins"), Value::Null),
        ("GET", "/api/items", json!("readers"), Value::Null),
        ("POST", "/admin/users", json!("default"), denied.clone()),
        ("POST", "/api/items", json!("default"), denied.clone()),
        ("GET", "/api/items", json!("readers"), Value::Null),
        ("POST", "/api/items", json!("block-ip"), denied.clone()),
        ("GET", "/public", json!("default"), denied.clone()),
        ("GET", "/public", json!("block-ip"), denied.clone()),
        ("GET", "/open/page", Value::Null, Value::Null),
    ];
    let mut expected: Vec<(String, String, Value, Value)> = expected
        .into_iter()
        .map(|(m, p, r, d)| (m.to_owned(), p.to_owned(), r, d))
        .collect();
    let order = |a: &(String, String, Value, Value), b: &(String, String, Value, Value)| {
        format!("{a:?}").cmp(&format!("{b:?}"))
    };
    rules.sort_by(order);
    expected.sort_by(order);
    assert_eq!(rules, expected);

    // The evaluation error of `admins` (the reader's token has no `roles`) was counted.
    let metrics = get(admin, "/metrics").await.text();
    assert!(
        metrics.contains("gatehouse_policy_errors_total{middleware=\"authz\",rule=\"admins\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("gatehouse_policy_errors_total{middleware=\"authz\",rule=\"readers\"} 1"),
        "{metrics}"
    );
    // And logged, naming the rule.
    let log = gh.stderr();
    assert!(
        log.contains("a policy rule failed to evaluate") && log.contains("admins"),
        "{log}"
    );
}

/// An auth service that knows users by their `authorization`, answering with who they are
/// and their roles (`max` has two, in two header lines); `Bearer nobody` passes without a
/// role; anything else gets a 401.
fn directory(req: &http::request::Parts) -> http::Response<Body> {
    let user = req
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    match user {
        Some("Bearer ada") => reply(200, &[("x-user", "ada"), ("x-user-role", "admin")], ""),
        Some("Bearer rob") => reply(200, &[("x-user", "rob"), ("x-user-role", "reader")], ""),
        Some("Bearer max") => reply(
            200,
            &[
                ("x-user", "max"),
                ("x-user-role", "reader"),
                ("x-user-role", "admin"),
            ],
            "",
        ),
        Some("Bearer nobody") => reply(200, &[("x-user", "nobody")], ""),
        _ => reply(401, &[("www-authenticate", "Bearer realm=\"sso\"")], ""),
    }
}

#[tokio::test]
async fn claims_from_the_headers_of_forward_auths_answer() {
    let auth = TestServer::start(directory).await;
    let rest = format!(
        r#"
[[middleware]]
type = "forward_auth"
url = "{}"
claims_from_headers = {{ sub = "x-user", role = "x-user-role" }}

[[middleware]]
type = "authorize"
rules = [
  {{ name = "admins", allow = "request.path.startsWith('/admin/') && 'admin' in claims.role.split(', ')" }},
  {{ name = "readers", allow = "request.method == 'GET' && subject != null && !request.path.startsWith('/admin/')" }},
]
"#,
        auth.url("/verify")
    );
    let (up, gh) = proxy_with(SERVER, "", &rest).await;
    let as_user = |method: &str, path: &str, user: &str| {
        request(method, path)
            .header("authorization", format!("Bearer {user}"))
            // A client's own claim headers are not the service's answer.
            .header("x-user-role", "admin")
            .body(empty())
            .unwrap()
    };
    // (user, request, status, what)
    let cases = [
        ("ada", "POST", "/admin/users", 200, "the admin's role claim"),
        (
            "max",
            "POST",
            "/admin/users",
            200,
            "both role headers, joined",
        ),
        ("rob", "GET", "/items", 200, "the reader's subject"),
        (
            "rob",
            "POST",
            "/admin/users",
            403,
            "a reader is no admin; 403: it has a subject",
        ),
        (
            "rob",
            "GET",
            "/admin/users",
            403,
            "readers read outside /admin/ only",
        ),
        (
            "nobody",
            "POST",
            "/admin/users",
            403,
            "no role header: no role claim",
        ),
    ];
    for (user, method, path, status, what) in cases {
        let resp = send(gh.port, as_user(method, path, user)).await;
        assert_eq!(
            resp.status, status,
            "{user} {method} {path}: {what}: {resp:?}"
        );
        if status == 403 {
            let body = resp.assert_gatehouse_error(403, "forbidden");
            assert_eq!(
                body["message"], "no policy rule allows the request (default) (policy_denied)",
                "{what}"
            );
        }
    }
    assert_eq!(up.request_count(), 3);
}

/// The config of `rules` (the lines of an inline array) in a file, and `gatehouse check`'s
/// answer.
fn check_rules(rules: &str) -> CliOutput {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let rest = format!("[[middleware]]\ntype = \"authorize\"\nrules = [\n{rules}]\n");
    let text = config("", "", &rest)
        .replace("{port}", "1")
        .replace("{upstream}", "http://127.0.0.1:1");
    std::fs::write(&path, text).unwrap();
    cli(&["check", "--config", path.to_str().unwrap()], &[], None)
}

#[test]
fn an_invalid_expression_is_a_config_error_at_its_place_in_the_file() {
    // The config's lines: [server] 1-3, [upstream] 5-7, the entry from 9; the rules from 12.
    let cases = [
        (
            "  { name = \"ok\", allow = \"true\" },\n  { name = \"admins\", allow = \"'admin' in claims.roles &&\" },\n",
            // `  { name = "admins", allow = "` is 30 characters: the error is at the end, the
            // closing quote.
            "proxy.toml:13:57: middleware[1].rules[2].allow: rule \"admins\": invalid expression: Syntax error",
        ),
        (
            "  { name = \"typo\", deny = 'subject == null || sourse.ip == \"10.0.0.1\"' },\n",
            "proxy.toml:12:47: middleware[1].rules[1].deny: rule \"typo\": invalid expression: unknown variable `sourse`: expected one of request, source, subject, claims, time",
        ),
        (
            "  { name = \"field\", allow = \"request.pathname == '/'\" },\n",
            "proxy.toml:12:38: middleware[1].rules[1].allow: rule \"field\": invalid expression: `request` has no field `pathname`",
        ),
        (
            // A literal pattern is compiled at load: the error is at the pattern.
            "  { name = \"versions\", allow = \"request.path.matches('^/v[0-9+/')\" },\n",
            "proxy.toml:12:54: middleware[1].rules[1].allow: rule \"versions\": invalid expression: invalid pattern for matches(): unclosed character class",
        ),
        (
            "  { name = \"both\", allow = \"true\", deny = \"false\" },\n",
            "middleware[1].rules[1].deny: rule \"both\": set exactly one of `allow` and `deny`",
        ),
    ];
    for (rules, needle) in cases {
        let out = check_rules(rules);
        assert_eq!(out.code, Some(2), "{rules}: {}{}", out.stdout, out.stderr);
        assert!(
            out.stderr.contains(needle),
            "{needle:?} not in {}",
            out.stderr
        );
    }
    // A comprehension's own variable is no unknown name.
    let out = check_rules(
        "  { name = \"any\", allow = \"claims.roles.exists(r, r.startsWith('ad'))\" },\n",
    );
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
}

#[tokio::test]
async fn run_refuses_to_start_with_an_invalid_expression() {
    let rest = "[[middleware]]\ntype = \"authorize\"\nrules = [{ name = \"r\", allow = \"request.method ==\" }]\n";
    let mut gh = Gatehouse::spawn(
        &config("", "", rest),
        &[("upstream", "http://127.0.0.1:1")],
        &[],
    );
    gh.assert_exits_with(2).await;
    assert!(gh.stderr().contains("proxy.toml:11:"), "{}", gh.stderr());
}

fn write_config(rest: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let text = config(SERVER, "", rest)
        .replace("{port}", "1")
        .replace("{upstream}", "http://127.0.0.1:1");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn explain(config: &Path, args: &[&str]) -> CliOutput {
    let mut all = vec!["explain", "--config", config.to_str().unwrap()];
    all.extend(args);
    cli(&all, &[], None)
}

#[test]
fn explain_and_test_name_the_deciding_rule_and_the_rules_before_it() {
    let (dir, config) = write_config(POLICY);
    let reader = format!(
        "authorization: Bearer {}",
        token("rita", json!({"scope": "read"}))
    );
    let out = explain(&config, &["-H", &reader, "POST", "/admin/users"]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    for line in [
        "   2. authz (authorize): denies: 403 forbidden, policy_denied: no policy rule allows the request (default)",
        "        rule health: false",
        "        rule admins: error (No such key: roles): does not match",
        "        rule readers: false",
        "        rule block-ip: false",
        "        default: denies",
        "status 403 (denied by authz: policy_denied, rule default)",
    ] {
        assert!(out.stdout.lines().any(|l| l == line), "{line:?} not in\n{}", out.stdout);
    }
    let out = explain(&config, &["--json", "-H", &reader, "GET", "/api/items"]);
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(report["policy_rule"], "readers");
    assert_eq!(
        report["chain"][1]["policy"],
        json!({
            "rule": "readers",
            "allowed": true,
            "rules": [
                {"name": "health", "result": "false"},
                {"name": "admins", "result": "false"},
                {"name": "readers", "result": "true"},
            ],
        })
    );

    let cases = dir.path().join("proxy.test.toml");
    let root = token("root", json!({"roles": ["admin"]}));
    std::fs::write(
        &cases,
        format!(
            r#"
[[case]]
name = "admins administer"
method = "DELETE"
url = "/admin/users/7"
headers = {{ authorization = "Bearer {root}" }}
expect = 200
expect_rule = "admins"

[[case]]
name = "the refused network cannot write"
method = "POST"
url = "/api/items"
headers = {{ authorization = "Bearer {root}", x-forwarded-for = "10.9.3.4" }}
expect = 403
expect_denied_by = "authz"
expect_rule = "block-ip"

[[case]]
name = "a wrong expectation"
url = "/healthz"
expect = 200
expect_rule = "readers"
"#
        ),
    )
    .unwrap();
    let out = cli(
        &[
            "test",
            cases.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
        None,
    );
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("ok   admins administer: status 200"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("ok   the refused network cannot write: status 403 (denied by authz: policy_denied, rule block-ip)"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("FAIL a wrong expectation"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("expected rule readers to decide, got rule health"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("3 cases: 2 passed, 1 failed"),
        "{}",
        out.stdout
    );
}

const BEFORE_RELOAD: &str = r#"
[[middleware]]
type = "jwt"
algorithms = ["HS256"]
secret = "policy-secret"

[[middleware]]
type = "authorize"
rules = [{ name = "readers", allow = "request.method == 'GET'" }]
"#;

const AFTER_RELOAD: &str = r#"
[[middleware]]
type = "jwt"
algorithms = ["HS256"]
secret = "policy-secret"

[[middleware]]
type = "authorize"
rules = [
  { name = "no-reports", deny = "request.path.startsWith('/reports')" },
  { name = "writers", allow = "'write' in claims.scope.split(' ')" },
]
"#;

#[tokio::test]
async fn a_reload_replaces_the_rules_while_requests_keep_coming() {
    let (up, gh) = proxy_with("", "", BEFORE_RELOAD).await;
    let writer = token("wendy", json!({"scope": "read write"}));
    let post = || req("POST", "/items", Some(&writer), None);
    assert_eq!(send(gh.port, post()).await.status, 403);
    assert_eq!(
        send(gh.port, req("GET", "/reports/q3", Some(&writer), None))
            .await
            .status,
        200
    );

    // Requests keep coming on their own connections while the config is replaced.
    let port = gh.port;
    let load_token = writer.clone();
    let load = tokio::spawn(async move {
        let mut statuses = Vec::new();
        for _ in 0..200 {
            let r = req("POST", "/items", Some(&load_token), None);
            statuses.push(send(port, r).await.status);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        statuses
    });
    let text = std::fs::read_to_string(&gh.config_path).unwrap();
    let replaced = text.replace(BEFORE_RELOAD.trim(), AFTER_RELOAD.trim());
    assert_ne!(text, replaced, "the rules are in the file");
    std::fs::write(&gh.config_path, replaced).unwrap();
    gh.send_signal("HUP");
    within(STEP, "the new rules to take effect", async {
        while send(gh.port, post()).await.status != 200 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let statuses = load.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == 403 || *s == 200),
        "every request was decided by the old rules or the new: {statuses:?}"
    );
    assert_eq!(
        send(gh.port, req("GET", "/reports/q3", Some(&writer), None))
            .await
            .status,
        403,
        "the new deny rule applies"
    );
    assert!(up.request_count() > 0);
}
