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
