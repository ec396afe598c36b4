//! The middleware chain: order and short-circuit, each middleware type of this issue,
//! and the `paths` / `skip_paths` / `methods` selectors.
mod common;

use common::*;
use serde_json::json;

const DENY_ALL: &str = "deny = [\"0.0.0.0/0\", \"::/0\"]";

fn get_with(path: &str, headers: &[(&str, &str)]) -> http::Request<Body> {
    let mut b = request("GET", path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(empty()).unwrap()
}

/// `12.345ms`-style durations.
fn is_millis(v: &str) -> bool {
    let Some(num) = v.strip_suffix("ms") else {
        return false;
    };
    let Some((int, frac)) = num.split_once('.') else {
        return false;
    };
    !int.is_empty()
        && !frac.is_empty()
        && int.chars().all(|c| c.is_ascii_digit())
        && frac.chars().all(|c| c.is_ascii_digit())
}

// ----- chain order and short-circuit --------------------------------------------------------

#[tokio::test]
async fn rejection_short_circuits_and_earlier_middlewares_see_the_response() {
    let (up, gh) = proxy_with(
        "",
        "",
        r#"
[[middleware]]
type = "request_id"

[[middleware]]
type = "timing"

[[middleware]]
type = "headers"
response = { set = { "x-frame-options" = "DENY" } }

[[middleware]]
type = "ip_filter"
deny = ["127.0.0.0/8"]
"#,
    )
    .await;
    let resp = get(gh.port, "/echo").await;
    let json = resp.assert_gatehouse_error(403, "forbidden");
    let id = resp
        .header("x-request-id")
        .expect("x-request-id on the 403");
    assert_eq!(json["request_id"], id.as_str());
    let took = resp
        .header("x-response-time")
        .expect("x-response-time on the 403");
    assert!(is_millis(&took), "{took}");
    assert_eq!(resp.header("x-frame-options").as_deref(), Some("DENY"));
    assert_eq!(up.request_count(), 0, "the upstream must never be reached");
}

#[tokio::test]
async fn middlewares_after_a_rejection_never_see_the_request() {
    let (up, gh) = proxy_with(
        "",
        "",
        r#"
[[middleware]]
type = "ip_filter"
deny = ["127.0.0.0/8"]

[[middleware]]
type = "request_id"

[[middleware]]
type = "headers"
response = { set = { "x-after" = "yes" } }
"#,
    )
    .await;
    let resp = get(gh.port, "/echo").await;
    let json = resp.assert_gatehouse_error(403, "forbidden");
    assert!(json["request_id"].is_null(), "{json}");
    assert!(resp.header("x-request-id").is_none(), "{resp:?}");
    assert!(resp.header("x-after").is_none(), "{resp:?}");
    assert_eq!(up.request_count(), 0);
}

// ----- request_id -----------------------------------------------------------------------------

#[tokio::test]
async fn request_id_is_generated_when_absent() {
    let (_up, gh) = proxy_with("", "", "[[middleware]]\ntype = \"request_id\"\n").await;
    let resp = get(gh.port, "/echo").await;
    assert_eq!(resp.status, 200);
    let id = resp.header("x-request-id").expect("x-request-id");
    assert!(is_uuid(&id), "not a UUID: {id}");
    assert_eq!(
        resp.upstream_headers().get("x-request-id"),
        Some(&vec![id.clone()])
    );
    // A new one per request.
    let other = get(gh.port, "/echo").await.header("x-request-id").unwrap();
    assert_ne!(id, other);
}

#[tokio::test]
async fn incoming_request_id_is_kept_when_trusted() {
    let (_up, gh) = proxy_with("", "", "[[middleware]]\ntype = \"request_id\"\n").await;
    let resp = send(gh.port, get_with("/echo", &[("x-request-id", "abc-123")])).await;
    assert_eq!(resp.header("x-request-id").as_deref(), Some("abc-123"));
    assert_eq!(
        resp.upstream_headers().get("x-request-id"),
        Some(&vec!["abc-123".to_string()])
    );
}

#[tokio::test]
async fn incoming_request_id_is_replaced_when_not_trusted() {
    let (_up, gh) = proxy_with(
        "",
        "",
        "[[middleware]]\ntype = \"request_id\"\ntrust_incoming = false\n",
    )
    .await;
    let resp = send(gh.port, get_with("/echo", &[("x-request-id", "abc-123")])).await;
    let id = resp.header("x-request-id").expect("x-request-id");
    assert_ne!(id, "abc-123");
    assert!(is_uuid(&id), "{id}");
    assert_eq!(resp.upstream_headers().get("x-request-id"), Some(&vec![id]));
}

#[tokio::test]
async fn request_id_custom_header() {
    let (_up, gh) = proxy_with(
        "",
        "",
        "[[middleware]]\ntype = \"request_id\"\nheader = \"x-trace\"\n",
    )
    .await;
    let resp = get(gh.port, "/echo").await;
    let id = resp.header("x-trace").expect("x-trace");
    assert!(is_uuid(&id), "{id}");
    let seen = resp.upstream_headers();
    assert_eq!(seen.get("x-trace"), Some(&vec![id]));
    assert!(!seen.contains_key("x-request-id"), "{seen:?}");
    assert!(resp.header("x-request-id").is_none());

    let resp = send(gh.port, get_with("/echo", &[("x-trace", "trace-7")])).await;
    assert_eq!(resp.header("x-trace").as_deref(), Some("trace-7"));
}

// ----- timing -----------------------------------------------------------------------------------

#[tokio::test]
async fn timing_headers() {
    let (_up, gh) = proxy_with("", "", "[[middleware]]\ntype = \"timing\"\n").await;
    let resp = get(gh.port, "/echo").await;
    assert_eq!(resp.status, 200);
    let took = resp.header("x-response-time").expect("x-response-time");
    assert!(
        is_millis(&took),
        "x-response-time should look like 12.345ms: {took}"
    );
    let st = resp.header_all("server-timing").join(", ");
    assert!(st.contains("upstream;dur="), "server-timing: {st:?}");
    assert!(st.contains("proxy;dur="), "server-timing: {st:?}");
}

#[tokio::test]
async fn timing_without_server_timing_and_custom_header() {
    let (_up, gh) = proxy_with(
        "",
        "",
        "[[middleware]]\ntype = \"timing\"\nheader = \"x-took\"\nserver_timing = false\n",
    )
    .await;
    let resp = get(gh.port, "/echo").await;
    assert_eq!(resp.status, 200);
    let took = resp.header("x-took").expect("x-took");
    assert!(is_millis(&took), "{took}");
    assert!(resp.header("x-response-time").is_none(), "{resp:?}");
    assert!(resp.header("server-timing").is_none(), "{resp:?}");
}

/// A decimal with exactly `frac` fractional digits, in microseconds: seconds have 6
/// places (`0.001234` is 1234), milliseconds 3 (`1.234` is 1234).
fn fixed_point(v: &str, frac: usize) -> u64 {
    let (int, dec) = v.split_once('.').unwrap_or_else(|| panic!("{v:?}"));
    assert_eq!(dec.len(), frac, "{v:?}");
    assert!(
        [int, dec]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())),
        "{v:?}"
    );
    format!("{int}{dec}").parse().unwrap()
}

#[tokio::test]
async fn timing_in_seconds_as_fastapi_writes_x_process_time() {
    let (_up, gh) = proxy_with(
        "",
        "",
        "[[middleware]]\ntype = \"timing\"\nheader = \"x-process-time\"\nformat = \"seconds\"\n",
    )
    .await;
    let resp = get(gh.port, "/echo").await;
    assert_eq!(resp.status, 200);
    assert!(resp.header("x-response-time").is_none(), "{resp:?}");
    // A plain float, as Python's `str(float)` of seconds: no unit, microsecond digits.
    let took = resp.header("x-process-time").expect("x-process-time");
    let total_us = fixed_point(&took, 6);
    assert!(took.parse::<f64>().is_ok(), "{took}");
    // server-timing stays in milliseconds: its upstream and proxy shares (each truncated to
    // the microsecond) add up to the header's total, which they would not if either were
    // written in another unit.
    let st = resp.header_all("server-timing").join(", ");
    let dur = |name: &str| {
        let at = st
            .find(&format!("{name};dur="))
            .unwrap_or_else(|| panic!("{st}"));
        let value = st[at + name.len() + 5..].split(',').next().unwrap().trim();
        fixed_point(value, 3)
    };
    let parts_us = dur("upstream") + dur("proxy");
    assert!(
        total_us >= parts_us && total_us - parts_us <= 1,
        "x-process-time {took} vs server-timing {st}"
    );
}

#[test]
fn timing_format_is_checked_and_summarized() {
    let check = |format: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        let rest = format!("[[middleware]]\ntype = \"timing\"\nformat = \"{format}\"\n");
        let text = config("", "", &rest)
            .replace("{port}", "1")
            .replace("{upstream}", "http://127.0.0.1:1");
        std::fs::write(&path, text).unwrap();
        cli(&["check", "--config", path.to_str().unwrap()], &[], None)
    };
    for format in ["ms", "seconds"] {
        let out = check(format);
        assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
        assert!(
            out.stdout.contains(&format!("format={format} ")),
            "{}",
            out.stdout
        );
    }
    let out = check("s");
    assert_eq!(out.code, Some(2), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("middleware[1].format")
            && out.stderr.contains("expected `ms` or `seconds`"),
        "{}",
        out.stderr
    );
}

// ----- headers ----------------------------------------------------------------------------------

const HEADERS_MW: &str = r#"
[[middleware]]
type = "headers"
request = { set = { "x-env" = "prod" }, add = { "x-multi" = "b" }, remove = ["x-debug"] }
response = { set = { "x-upstream" = "replaced" }, add = { "x-up-multi" = "two" }, remove = ["x-up-remove"] }
"#;

#[tokio::test]
async fn headers_modify_the_request() {
    let (_up, gh) = proxy_with("", "", HEADERS_MW).await;
    let req = request("GET", "/echo")
        .header("x-env", "dev")
        .header("x-multi", "a")
        .header("x-debug", "1")
        .header("x-debug", "2")
        .body(empty())
        .unwrap();
    let resp = send(gh.port, req).await;
    assert_eq!(resp.status, 200);
    let seen = resp.upstream_headers();
    assert_eq!(
        seen.get("x-env"),
        Some(&vec!["prod".to_string()]),
        "set replaces"
    );
    assert_eq!(
        seen.get("x-multi").map(|v| v.join(", ")),
        Some("a, b".to_string()),
        "add appends one more value"
    );
    assert!(
        !seen.contains_key("x-debug"),
        "remove deletes every value: {seen:?}"
    );

    // set and add also work when the client sent nothing.
    let seen = get(gh.port, "/echo").await.upstream_headers();
    assert_eq!(seen.get("x-env"), Some(&vec!["prod".to_string()]));
    assert_eq!(seen.get("x-multi"), Some(&vec!["b".to_string()]));
}

#[tokio::test]
async fn headers_modify_the_response() {
    let (_up, gh) = proxy_with("", "", HEADERS_MW).await;
    let resp = get(gh.port, "/echo").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header_all("x-upstream"), vec!["replaced"]);
    assert_eq!(resp.header_all("x-up-multi").join(", "), "one, two");
    assert!(resp.header("x-up-remove").is_none(), "{resp:?}");
}

// ----- ip_filter --------------------------------------------------------------------------------

/// Status of a GET through an `ip_filter` with `filter` keys, sending one
/// `x-forwarded-for` header line per entry of `xff`.
async fn ip_filter_status(server: &str, filter: &str, xff: &[&str]) -> u16 {
    let mw = format!("[[middleware]]\ntype = \"ip_filter\"\n{filter}\n");
    let (up, gh) = proxy_with(server, "", &mw).await;
    let headers: Vec<(&str, &str)> = xff.iter().map(|v| ("x-forwarded-for", *v)).collect();
    let resp = send(gh.port, get_with("/echo", &headers)).await;
    if resp.status == 403 {
        resp.assert_gatehouse_error(403, "forbidden");
        assert_eq!(up.request_count(), 0);
    }
    resp.status.as_u16()
}

const TRUST_LOCAL: &str = "trusted_proxies = [\"127.0.0.1/32\"]";

#[tokio::test]
async fn ip_filter_deny_uses_trusted_x_forwarded_for() {
    let status = ip_filter_status(TRUST_LOCAL, "deny = [\"10.0.0.0/8\"]", &["10.9.9.9"]).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn ip_filter_allow_list_excluding_client_rejects() {
    let status = ip_filter_status(TRUST_LOCAL, "allow = [\"192.168.0.0/16\"]", &["10.9.9.9"]).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn ip_filter_allow_list_including_client_passes() {
    let status = ip_filter_status(TRUST_LOCAL, "allow = [\"10.0.0.0/8\"]", &["10.9.9.9"]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn ip_filter_allow_list_fails_closed_on_garbage_x_forwarded_for() {
    let status = ip_filter_status(TRUST_LOCAL, "allow = [\"10.0.0.0/8\"]", &["not-an-ip"]).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn ip_filter_ignores_x_forwarded_for_without_trusted_proxies() {
    // The client (127.0.0.1) is not 10/8, whatever it claims.
    let status = ip_filter_status("", "deny = [\"10.0.0.0/8\"]", &["10.9.9.9"]).await;
    assert_eq!(status, 200);
    // ...and it is 127.0.0.1, so a deny on that still applies.
    let status = ip_filter_status("", "deny = [\"127.0.0.0/8\"]", &["10.9.9.9"]).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn ip_filter_reads_every_x_forwarded_for_line() {
    // Two header lines are one list: the last line's address is the one the proxy added.
    let status = ip_filter_status(
        TRUST_LOCAL,
        "deny = [\"10.0.0.0/8\"]",
        &["192.168.1.1", "10.9.9.9"],
    )
    .await;
    assert_eq!(status, 403);
    let status = ip_filter_status(
        TRUST_LOCAL,
        "deny = [\"10.0.0.0/8\"]",
        &["10.9.9.9", "192.168.1.1"],
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn ip_filter_uses_the_rightmost_untrusted_address() {
    // A client can prepend anything; only the entry added by the trusted proxy counts.
    let status = ip_filter_status(
        TRUST_LOCAL,
        "deny = [\"10.0.0.0/8\"]",
        &["10.9.9.9, 192.168.1.1"],
    )
    .await;
    assert_eq!(status, 200);
    let status = ip_filter_status(
        TRUST_LOCAL,
        "deny = [\"192.168.0.0/16\"]",
        &["10.9.9.9, 192.168.1.1"],
    )
    .await;
    assert_eq!(status, 403);
}

// ----- cors -------------------------------------------------------------------------------------

const CORS_MW: &str = r#"
[[middleware]]
type = "cors"
allow_origins = ["https://app.example"]
allow_methods = ["GET", "POST"]
allow_headers = ["x-custom", "content-type"]
expose_headers = ["x-upstream"]
allow_credentials = true
max_age = "10m"
"#;

fn preflight(origin: &str) -> http::Request<Body> {
    request("OPTIONS", "/api/items")
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "x-custom")
        .body(empty())
        .unwrap()
}

fn lower_list(resp: &Resp, name: &str) -> Vec<String> {
    resp.header_all(name)
        .iter()
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect()
}

#[tokio::test]
async fn cors_preflight_from_allowed_origin_is_answered_by_gatehouse() {
    let (up, gh) = proxy_with("", "", CORS_MW).await;
    let resp = send(gh.port, preflight("https://app.example")).await;
    assert_eq!(resp.status, 204, "{resp:?}");
    assert_eq!(
        resp.header("access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    let methods = lower_list(&resp, "access-control-allow-methods");
    assert!(methods.contains(&"post".to_string()), "{methods:?}");
    let headers = lower_list(&resp, "access-control-allow-headers");
    assert!(headers.contains(&"x-custom".to_string()), "{headers:?}");
    assert_eq!(
        resp.header("access-control-max-age").as_deref(),
        Some("600")
    );
    assert_eq!(
        resp.header("access-control-allow-credentials").as_deref(),
        Some("true")
    );
    assert_eq!(
        up.request_count(),
        0,
        "a preflight must not reach the upstream"
    );
}

#[tokio::test]
async fn cors_preflight_from_disallowed_origin_is_403() {
    let (up, gh) = proxy_with("", "", CORS_MW).await;
    let resp = send(gh.port, preflight("https://evil.example")).await;
    resp.assert_gatehouse_error(403, "forbidden");
    assert!(
        resp.header("access-control-allow-origin").is_none(),
        "{resp:?}"
    );
    assert_eq!(up.request_count(), 0);
}

#[tokio::test]
async fn cors_simple_request_from_allowed_origin() {
    let (up, gh) = proxy_with("", "", CORS_MW).await;
    let resp = send(
        gh.port,
        get_with("/echo", &[("origin", "https://app.example")]),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    assert!(
        lower_list(&resp, "vary").contains(&"origin".to_string()),
        "vary: {:?}",
        resp.header_all("vary")
    );
    let exposed = lower_list(&resp, "access-control-expose-headers");
    assert!(exposed.contains(&"x-upstream".to_string()), "{exposed:?}");
    assert_eq!(up.request_count(), 1);
}

#[tokio::test]
async fn cors_simple_request_from_disallowed_origin_gets_no_cors_headers() {
    let (_up, gh) = proxy_with("", "", CORS_MW).await;
    let resp = send(
        gh.port,
        get_with("/echo", &[("origin", "https://evil.example")]),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(
        resp.header("access-control-allow-origin").is_none(),
        "{resp:?}"
    );
    assert!(
        resp.header("access-control-allow-credentials").is_none(),
        "{resp:?}"
    );
}

#[tokio::test]
async fn cors_plain_options_is_not_a_preflight() {
    // OPTIONS without Access-Control-Request-Method goes to the upstream.
    let (up, gh) = proxy_with("", "", CORS_MW).await;
    let req = request("OPTIONS", "/echo")
        .header("origin", "https://app.example")
        .body(empty())
        .unwrap();
    let resp = send(gh.port, req).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["method"], "OPTIONS");
    assert_eq!(up.request_count(), 1);
}

#[tokio::test]
async fn cors_allow_headers_defaults_to_what_the_preflight_asks_for() {
    let (_up, gh) = proxy_with(
        "",
        "",
        "[[middleware]]\ntype = \"cors\"\nallow_origins = [\"https://app.example\"]\n",
    )
    .await;
    // What Chromium sends before `fetch(url, {method: "PUT", headers: {"content-type":
    // "application/json", "x-client-version": "1"}})`.
    let asking = |origin: &str| {
        request("OPTIONS", "/api/items/7")
            .header("origin", origin)
            .header("access-control-request-method", "PUT")
            .header(
                "access-control-request-headers",
                "content-type,x-client-version",
            )
            .body(empty())
            .unwrap()
    };
    let resp = send(gh.port, asking("https://app.example")).await;
    assert_eq!(resp.status, 204, "{resp:?}");
    assert_eq!(
        lower_list(&resp, "access-control-allow-headers"),
        ["content-type", "x-client-version"]
    );
    assert!(
        lower_list(&resp, "vary").contains(&"access-control-request-headers".to_string()),
        "the answer depends on the requested headers: {resp:?}"
    );
    // Only allowed origins get anything.
    let resp = send(gh.port, asking("https://evil.example")).await;
    resp.assert_gatehouse_error(403, "forbidden");
    assert!(resp.header("access-control-allow-headers").is_none());
}

#[tokio::test]
async fn cors_allow_headers_empty_allows_no_request_headers() {
    let (_up, gh) = proxy_with(
        "",
        "",
        "[[middleware]]\ntype = \"cors\"\nallow_origins = [\"https://app.example\"]\n\
         allow_headers = []\n",
    )
    .await;
    let resp = send(gh.port, preflight("https://app.example")).await;
    assert_eq!(resp.status, 204, "{resp:?}");
    assert!(
        resp.header("access-control-allow-headers").is_none(),
        "{resp:?}"
    );
}

/// An app still running a permissive CORS layer of its own.
const PERMISSIVE_APP: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\
    access-control-allow-origin: *\r\naccess-control-allow-methods: *\r\n\
    access-control-expose-headers: x-internal\r\nvary: accept-encoding\r\n\r\nok";

fn cors_headers(resp: &Resp) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = resp
        .headers
        .iter()
        .filter(|(n, _)| n.as_str().starts_with("access-control-"))
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
        .collect();
    found.sort();
    found
}

#[tokio::test]
async fn cors_replaces_the_apps_own_cors_headers() {
    let app = RawUpstream::replying(PERMISSIVE_APP).await;
    let gh = Gatehouse::start(
        &config("", "", CORS_MW),
        &[("upstream", app.url().as_str())],
    )
    .await;
    let from = |origin: Option<&str>| {
        let mut req = request("GET", "/api/items");
        if let Some(origin) = origin {
            req = req.header("origin", origin);
        }
        send(gh.port, req.body(empty()).unwrap())
    };

    let allowed = from(Some("https://app.example")).await;
    assert_eq!(allowed.status, 200, "{allowed:?}");
    assert_eq!(
        cors_headers(&allowed),
        [
            ("access-control-allow-credentials", "true"),
            ("access-control-allow-origin", "https://app.example"),
            ("access-control-expose-headers", "x-upstream"),
        ]
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
    );
    assert_eq!(
        lower_list(&allowed, "vary"),
        ["accept-encoding", "origin"],
        "the app's vary is kept"
    );

    // The app's `*` must not make the response readable to an origin gatehouse refuses.
    let refused = from(Some("https://evil.example")).await;
    assert_eq!(refused.status, 200, "{refused:?}");
    assert_eq!(cors_headers(&refused), []);

    // Without `Origin` it is not a CORS request: the app's answer passes as it is.
    let plain = from(None).await;
    assert_eq!(
        plain.header("access-control-allow-origin").as_deref(),
        Some("*")
    );
}

#[tokio::test]
async fn cors_exposes_the_headers_the_chain_adds_besides_its_own_list() {
    let chain = format!(
        "[[middleware]]\ntype = \"request_id\"\nheader = \"x-trace-id\"\n{CORS_MW}\n\
         [[middleware]]\ntype = \"rate_limit\"\nrate = \"100/s\"\n"
    );
    let (_up, gh) = proxy_with("", "", &chain).await;
    let resp = send(
        gh.port,
        get_with("/echo", &[("origin", "https://app.example")]),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        lower_list(&resp, "access-control-expose-headers"),
        [
            "x-upstream",
            "x-trace-id",
            "ratelimit-limit",
            "ratelimit-remaining",
            "ratelimit-reset",
            "retry-after"
        ]
    );
    assert!(resp.header("ratelimit-remaining").is_some(), "{resp:?}");
}

#[tokio::test]
async fn cors_above_auth_makes_its_401_readable_and_lets_preflights_through() {
    let (up, gh) = proxy_with(
        "",
        "",
        &format!(
            "{CORS_MW}\n[[middleware]]\ntype = \"api_key\"\nkeys = [{{ id = \"web\", key = \"k\" }}]\n"
        ),
    )
    .await;
    let preflight = send(gh.port, preflight("https://app.example")).await;
    assert_eq!(preflight.status, 204, "{preflight:?}");
    let denied = send(
        gh.port,
        get_with("/echo", &[("origin", "https://app.example")]),
    )
    .await;
    denied.assert_gatehouse_error(401, "unauthorized");
    assert_eq!(
        denied.header("access-control-allow-origin").as_deref(),
        Some("https://app.example"),
        "a page can read the 401 only with it: {denied:?}"
    );
    assert_eq!(up.request_count(), 0);
}

/// A WebSocket handshake for the test upstream's `/ws`, from `origin`.
fn websocket_from(origin: Option<&str>) -> http::Request<Body> {
    let mut req = websocket_request("/ws");
    if let Some(origin) = origin {
        let origin = http::HeaderValue::from_str(origin).unwrap();
        req.headers_mut().insert("origin", origin);
    }
    req
}

#[tokio::test]
async fn cors_refuses_a_websocket_handshake_from_an_origin_it_does_not_allow() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let audit = format!(
        "[audit]\nflush_interval = \"10ms\"\n[[audit.sinks]]\ntype = \"file\"\npath = \"{}\"\n",
        events.display()
    );
    let gh = Gatehouse::start(
        &config("", "", &format!("{CORS_MW}\n{audit}")),
        &[("upstream", &up.url())],
    )
    .await;
    let refused = send(gh.port, websocket_from(Some("https://evil.example"))).await;
    let body = refused.assert_gatehouse_error(403, "forbidden");
    assert_eq!(
        body["message"],
        "WebSocket handshake: origin not allowed (origin_not_allowed)"
    );
    assert_eq!(up.request_count(), 0, "the app never sees the handshake");
    let event = &wait_for_events(&events, 1).await[0];
    assert_eq!(
        (&event["path"], &event["status"], &event["decision"]),
        (&json!("/ws"), &json!(403), &json!("deny")),
        "{event}"
    );
    assert_eq!(
        (&event["denied_by"], &event["deny_reason"]),
        (&json!("cors"), &json!("origin_not_allowed"))
    );

    // An allowed origin, and a client that sends no `Origin` (no browser): the tunnel works.
    for origin in [Some("https://app.example"), None] {
        let mut conn = H1::connect(gh.port).await;
        assert_websocket_echoes(conn.send_streaming(websocket_from(origin)).await).await;
    }
}

#[tokio::test]
async fn cors_lets_a_websocket_handshake_outside_its_scope_through() {
    let scoped = CORS_MW.replace("allow_origins", "paths = [\"/api/**\"]\nallow_origins");
    let (_up, gh) = proxy_with("", "", &scoped).await;
    let mut conn = H1::connect(gh.port).await;
    let handshake = websocket_from(Some("https://evil.example"));
    assert_websocket_echoes(conn.send_streaming(handshake).await).await;
}

/// Over HTTP/2 a plain request from a refused origin passes as over HTTP/1 (without CORS
/// headers), and an extended CONNECT (`:protocol`, a WebSocket over HTTP/2) never reaches
/// the app: gatehouse does not announce it, so the stream is reset before the chain.
#[tokio::test]
async fn cors_over_h2_plain_requests_pass_and_extended_connect_never_reaches_the_app() {
    let (up, gh) = proxy_with("", "", CORS_MW).await;
    let mut h2 = h2_connect(gh.port).await;
    let url = |path: &str| format!("http://127.0.0.1:{}{path}", gh.port);
    let plain = http::Request::get(url("/echo"))
        .header("origin", "https://evil.example")
        .body(empty())
        .unwrap();
    let resp = within(STEP, "h2 response", h2.send_request(plain))
        .await
        .expect("h2 response");
    let resp = collect(resp).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(
        resp.header("access-control-allow-origin").is_none(),
        "{resp:?}"
    );

    let mut connect = http::Request::connect(url("/ws"))
        .header("origin", "https://evil.example")
        .body(empty())
        .unwrap();
    connect
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    within(STEP, "h2 ready", h2.ready()).await.unwrap();
    let answer = within(STEP, "extended CONNECT", h2.send_request(connect)).await;
    let err = answer.expect_err("an extended CONNECT gets no response");
    assert!(format!("{err:?}").contains("PROTOCOL_ERROR"), "{err:?}");
    assert_eq!(
        up.request_count(),
        1,
        "only the plain request reached the app"
    );
}

// ----- body_limit -------------------------------------------------------------------------------

const BODY_LIMIT_MW: &str = "[[middleware]]\ntype = \"body_limit\"\nmax = \"1KiB\"\n";

#[tokio::test]
async fn body_limit_rejects_by_content_length() {
    let (up, gh) = proxy_with("", "", BODY_LIMIT_MW).await;
    let resp = send(
        gh.port,
        request("POST", "/upload")
            .body(full(vec![b'x'; 2048]))
            .unwrap(),
    )
    .await;
    resp.assert_gatehouse_error(413, "payload_too_large");
    assert_eq!(up.request_count(), 0, "the upstream must not be reached");
}

#[tokio::test]
async fn body_limit_rejects_streamed_body() {
    let mw = format!("[[middleware]]\ntype = \"request_id\"\n\n{BODY_LIMIT_MW}");
    let (_up, gh) = proxy_with("", "", &mw).await;
    let resp = send(
        gh.port,
        request("POST", "/upload")
            .body(streamed_body(2048, 512))
            .unwrap(),
    )
    .await;
    let json = resp.assert_gatehouse_error(413, "payload_too_large");
    let id = resp
        .header("x-request-id")
        .expect("x-request-id on the 413");
    assert_eq!(json["request_id"], id.as_str());
}

#[tokio::test]
async fn body_limit_passes_small_bodies() {
    let (up, gh) = proxy_with("", "", BODY_LIMIT_MW).await;
    let resp = send(
        gh.port,
        request("POST", "/upload")
            .body(full(vec![b'x'; 512]))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.text(), "512");
    // Exactly the limit passes, streamed or not.
    let resp = send(
        gh.port,
        request("POST", "/upload")
            .body(full(vec![b'x'; 1024]))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.text(), "1024");
    let resp = send(
        gh.port,
        request("POST", "/upload")
            .body(streamed_body(1024, 256))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.text(), "1024");
    assert_eq!(up.request_count(), 3);
}

// ----- paths / skip_paths / methods -------------------------------------------------------------

async fn statuses(gh: &Gatehouse, reqs: &[(&str, &str)]) -> Vec<(String, u16)> {
    let mut out = Vec::new();
    for (method, path) in reqs {
        let resp = send(gh.port, request(method, path).body(empty()).unwrap()).await;
        out.push((format!("{method} {path}"), resp.status.as_u16()));
    }
    out
}

fn expect(pairs: &[(&str, &str, u16)]) -> Vec<(String, u16)> {
    pairs
        .iter()
        .map(|(m, p, s)| (format!("{m} {p}"), *s))
        .collect()
}

#[tokio::test]
async fn paths_double_star_matches_the_subtree_only() {
    let mw = format!("[[middleware]]\ntype = \"ip_filter\"\n{DENY_ALL}\npaths = [\"/api/**\"]\n");
    let (_up, gh) = proxy_with("", "", &mw).await;
    let got = statuses(
        &gh,
        &[
            ("GET", "/api/x"),
            ("GET", "/api/x/y"),
            ("GET", "/api/x/y?q=1"),
            ("GET", "/apix"),
            ("GET", "/apix/y"),
            ("GET", "/other"),
        ],
    )
    .await;
    assert_eq!(
        got,
        expect(&[
            ("GET", "/api/x", 403),
            ("GET", "/api/x/y", 403),
            ("GET", "/api/x/y?q=1", 403),
            ("GET", "/apix", 200),
            ("GET", "/apix/y", 200),
            ("GET", "/other", 200),
        ])
    );
}

#[tokio::test]
async fn paths_single_star_matches_one_segment() {
    let mw = format!("[[middleware]]\ntype = \"ip_filter\"\n{DENY_ALL}\npaths = [\"/api/*\"]\n");
    let (_up, gh) = proxy_with("", "", &mw).await;
    let got = statuses(
        &gh,
        &[
            ("GET", "/api/x"),
            ("GET", "/api/x?q=1"),
            ("GET", "/api/x/y"),
            ("GET", "/apix"),
        ],
    )
    .await;
    assert_eq!(
        got,
        expect(&[
            ("GET", "/api/x", 403),
            ("GET", "/api/x?q=1", 403),
            ("GET", "/api/x/y", 200),
            ("GET", "/apix", 200),
        ])
    );
}

#[tokio::test]
async fn paths_without_wildcard_match_exactly() {
    let mw = format!("[[middleware]]\ntype = \"ip_filter\"\n{DENY_ALL}\npaths = [\"/exact\"]\n");
    let (_up, gh) = proxy_with("", "", &mw).await;
    let got = statuses(
        &gh,
        &[
            ("GET", "/exact"),
            ("GET", "/exact/sub"),
            ("GET", "/exactly"),
        ],
    )
    .await;
    assert_eq!(
        got,
        expect(&[
            ("GET", "/exact", 403),
            ("GET", "/exact/sub", 200),
            ("GET", "/exactly", 200),
        ])
    );
}

#[tokio::test]
async fn skip_paths_exempts() {
    let mw = format!(
        "[[middleware]]\ntype = \"ip_filter\"\n{DENY_ALL}\nskip_paths = [\"/health\", \"/public/**\"]\n"
    );
    let (_up, gh) = proxy_with("", "", &mw).await;
    let got = statuses(
        &gh,
        &[
            ("GET", "/health"),
            ("GET", "/public/a/b"),
            ("GET", "/healthz"),
            ("GET", "/other"),
        ],
    )
    .await;
    assert_eq!(
        got,
        expect(&[
            ("GET", "/health", 200),
            ("GET", "/public/a/b", 200),
            ("GET", "/healthz", 403),
            ("GET", "/other", 403),
        ])
    );
}

#[tokio::test]
async fn paths_and_skip_paths_combine() {
    let mw = format!(
        "[[middleware]]\ntype = \"ip_filter\"\n{DENY_ALL}\npaths = [\"/api/**\"]\nskip_paths = [\"/api/public/**\"]\n"
    );
    let (_up, gh) = proxy_with("", "", &mw).await;
    let got = statuses(
        &gh,
        &[
            ("GET", "/api/private"),
            ("GET", "/api/public/x"),
            ("GET", "/else"),
        ],
    )
    .await;
    assert_eq!(
        got,
        expect(&[
            ("GET", "/api/private", 403),
            ("GET", "/api/public/x", 200),
            ("GET", "/else", 200),
        ])
    );
}

#[tokio::test]
async fn methods_limit_the_entry() {
    let mw = format!("[[middleware]]\ntype = \"ip_filter\"\n{DENY_ALL}\nmethods = [\"POST\"]\n");
    let (_up, gh) = proxy_with("", "", &mw).await;
    let got = statuses(
        &gh,
        &[("GET", "/echo"), ("POST", "/echo"), ("PUT", "/echo")],
    )
    .await;
    assert_eq!(
        got,
        expect(&[
            ("GET", "/echo", 200),
            ("POST", "/echo", 403),
            ("PUT", "/echo", 200),
        ])
    );
}

#[tokio::test]
async fn skipped_middleware_does_not_run_on_the_response_either() {
    let (_up, gh) = proxy_with(
        "",
        "",
        r#"
[[middleware]]
type = "headers"
paths = ["/api/**"]
response = { set = { "x-api" = "yes" } }
"#,
    )
    .await;
    assert_eq!(
        get(gh.port, "/api/x").await.header("x-api").as_deref(),
        Some("yes")
    );
    assert!(get(gh.port, "/other").await.header("x-api").is_none());
}

#[tokio::test]
async fn body_limit_over_h2() {
    let (_up, gh) = proxy_with("", "", BODY_LIMIT_MW).await;
    let resp = h2_send(gh.port, "POST", "/upload", streamed_body(4096, 1024)).await;
    resp.assert_gatehouse_error(413, "payload_too_large");
    let resp = h2_send(gh.port, "POST", "/upload", streamed_body(1000, 100)).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.text(), "1000");
}

/// Paths (of `DENY_ALL` with `paths = ["/admin/**"]`) that got past the filter: anything
/// but a 403 `forbidden` or a 400 `bad_request` from gatehouse. The upstream must stay unhit.
async fn bypasses(paths: &[&str]) -> Vec<String> {
    let mw = format!("[[middleware]]\ntype = \"ip_filter\"\n{DENY_ALL}\npaths = [\"/admin/**\"]\n");
    let (up, gh) = proxy_with("", "", &mw).await;
    let mut passed = Vec::new();
    for path in paths {
        let resp = get(gh.port, path).await;
        match resp.status.as_u16() {
            403 => {
                resp.assert_gatehouse_error(403, "forbidden");
            }
            400 => {
                resp.assert_gatehouse_error(400, "bad_request");
            }
            _ => passed.push(format!("{path} -> {} {}", resp.status, resp.text())),
        }
    }
    if passed.is_empty() {
        assert_eq!(up.request_count(), 0);
    }
    passed
}

#[tokio::test]
async fn paths_cannot_be_bypassed_with_dot_segments() {
    // An upstream resolving dot-segments would serve /admin/secret past the filter.
    let passed = bypasses(&[
        "/admin/secret",
        "/x/../admin/secret",
        "/./admin/secret",
        "/x/%2e%2e/admin/secret",
        "/x/.%2e/admin/secret",
        "/x/%2E./admin/secret",
    ])
    .await;
    assert!(passed.is_empty(), "got past the filter: {passed:#?}");
}

#[tokio::test]
async fn paths_cannot_be_bypassed_with_equivalent_spellings() {
    // nginx matches locations on the normalized path (merged slashes, decoded %XX); most
    // app frameworks route `//admin/secret` and `/%61dmin/secret` to /admin/secret.
    let passed = bypasses(&["//admin/secret", "/%61dmin/secret", "/admin%2Fsecret"]).await;
    assert!(passed.is_empty(), "got past the filter: {passed:#?}");
}
