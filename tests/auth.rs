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

/// A rejection: the status, SPEC's body, the challenge, and the upstream never reached.
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
        "middleware[0].keys",
    );
    assert_config_error(
        "[[middleware]]\ntype = \"api_key\"\nkeys_file = \"/nonexistent/keys\"\n",
        "middleware[0].keys_file: cannot read /nonexistent/keys",
    );
    assert_config_error(
        "[[middleware]]\ntype = \"api_key\"\nheader = \"x-k\"\nquery = \"k\"\nkeys = [{ id = \"a\", key = \"b\" }]\n",
        "middleware[0].query",
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
        "middleware[0].users[0].password_hash: expected a bcrypt",
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("htpasswd");
    std::fs::write(&file, "carol:$apr1$abc$def\n").unwrap();
    assert_config_error(
        &format!(
            "[[middleware]]\ntype = \"basic_auth\"\nhtpasswd_file = \"{}\"\n",
            file.display()
        ),
        "middleware[0].htpasswd_file:",
    );
}
