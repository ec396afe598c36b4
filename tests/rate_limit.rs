//! `rate_limit` against the real binary: local and Redis backends (a real `redis-server`
//! started per test on a free port), keys, headers, reload, outages and the memory bound.

mod common;

use std::time::Duration;

use common::*;

/// One `rate_limit` entry: `keys` are extra TOML lines (rate, burst, key, ...).
fn limiter(keys: &str) -> String {
    format!("[[middleware]]\ntype = \"rate_limit\"\n{keys}\n")
}

/// GET `path` with extra request headers, on a fresh connection.
async fn get_with(port: u16, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut req = request("GET", path);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    send(port, req.body(empty()).unwrap()).await
}

/// Asserts a pass with the given `ratelimit-*` headers (limit, remaining).
fn assert_passed(resp: &Resp, limit: u32, remaining: u32) {
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("ratelimit-limit"), Some(limit.to_string()));
    assert_eq!(
        resp.header("ratelimit-remaining"),
        Some(remaining.to_string())
    );
    assert!(resp.header("ratelimit-reset").is_some(), "{resp:?}");
}

/// Asserts a 429 with SPEC's body, `retry-after` and the headers; returns retry-after.
fn assert_limited(resp: &Resp, limit: u32) -> u64 {
    resp.assert_gatehouse_error(429, "rate_limited");
    assert_eq!(resp.header("ratelimit-limit"), Some(limit.to_string()));
    assert_eq!(resp.header("ratelimit-remaining").as_deref(), Some("0"));
    let reset: u64 = resp.header("ratelimit-reset").unwrap().parse().unwrap();
    let retry: u64 = resp.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1 && retry <= reset, "{resp:?}");
    retry
}

#[tokio::test]
async fn local_burst_then_429_then_refill() {
    let (up, gh) = proxy_with(
        "",
        "",
        &limiter("rate = \"1/s\"\nburst = 3\nkey = \"global\""),
    )
    .await;
    for remaining in [2, 1, 0] {
        assert_passed(&get(gh.port, "/echo").await, 3, remaining);
    }
    let retry = assert_limited(&get(gh.port, "/echo").await, 3);
    assert_eq!(
        up.request_count(),
        3,
        "a refused request never reaches the upstream"
    );

    tokio::time::sleep(Duration::from_secs(retry)).await;
    let resp = get(gh.port, "/echo").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(up.request_count(), 4);
}

#[tokio::test]
async fn stacked_limiters_report_the_tightest_and_a_refusal_its_own() {
    let mw = [
        limiter("name = \"wide\"\nrate = \"1/h\"\nburst = 10\nkey = \"global\""),
        limiter("name = \"narrow\"\nrate = \"1/h\"\nburst = 2\nkey = \"global\""),
    ]
    .concat();
    let (_up, gh) = proxy_with("", "", &mw).await;
    assert_passed(&get(gh.port, "/echo").await, 2, 1);
    assert_passed(&get(gh.port, "/echo").await, 2, 0);
    // "narrow" refuses; "wide" (which counted it, 7 left) still sees the response.
    assert_limited(&get(gh.port, "/echo").await, 2);
}

#[tokio::test]
async fn keys_are_kept_apart() {
    let mw = [
        limiter("paths = [\"/tenant/**\"]\nrate = \"1/h\"\nburst = 1\nkey = \"header:x-tenant\""),
        limiter("name = \"per_ip\"\npaths = [\"/ip/**\"]\nrate = \"1/h\"\nburst = 1"),
        limiter("name = \"per_subject\"\npaths = [\"/subject/**\"]\nrate = \"1/h\"\nburst = 1\nkey = \"subject\""),
    ]
    .concat();
    let (_up, gh) = proxy_with("trusted_proxies = [\"127.0.0.1/32\"]", "", &mw).await;

    // header:NAME: one bucket per value, and one for requests without the header.
    for tenant in [Some("a"), Some("b"), None] {
        let headers: Vec<(&str, &str)> = tenant.map(|t| ("x-tenant", t)).into_iter().collect();
        assert_passed(&get_with(gh.port, "/tenant/x", &headers).await, 1, 0);
        assert_limited(&get_with(gh.port, "/tenant/x", &headers).await, 1);
    }

    // client_ip: the address trusted_proxies let through from x-forwarded-for.
    for ip in ["10.0.0.1", "10.0.0.2"] {
        let xff = [("x-forwarded-for", ip)];
        assert_passed(&get_with(gh.port, "/ip/x", &xff).await, 1, 0);
        assert_limited(&get_with(gh.port, "/ip/x", &xff).await, 1);
    }

    // subject: with no authentication, every client shares the anonymous bucket.
    assert_passed(
        &get_with(gh.port, "/subject/x", &[("x-forwarded-for", "10.0.0.3")]).await,
        1,
        0,
    );
    assert_limited(
        &get_with(gh.port, "/subject/x", &[("x-forwarded-for", "10.0.0.4")]).await,
        1,
    );
}

#[tokio::test]
async fn many_distinct_keys_stay_within_max_keys_and_the_limiter_still_works() {
    let (_up, gh) = proxy_with(
        "",
        "",
        &limiter("rate = \"1/h\"\nburst = 1\nkey = \"header:x-key\"\nmax_keys = 50"),
    )
    .await;
    let key = |k: &str| {
        request("GET", "/echo")
            .header("x-key", k)
            .body(empty())
            .unwrap()
    };
    let mut conn = H1::connect(gh.port).await;
    assert_eq!(conn.send(key("first")).await.status, 200);
    assert_eq!(conn.send(key("first")).await.status, 429);
    for i in 0..20_000 {
        let resp = conn.send(key(&format!("k{i}"))).await;
        assert_eq!(resp.status, 200, "a new key always has its burst");
    }
    // The limiter still refuses a key it holds...
    assert_eq!(conn.send(key("k19999")).await.status, 429);
    // ...and "first" was forgotten to make room: the table did not grow past max_keys.
    assert_eq!(conn.send(key("first")).await.status, 200);
}

#[tokio::test]
async fn state_survives_sighup_when_name_and_settings_are_unchanged() {
    let generation = |g: &str| {
        format!("[[middleware]]\ntype = \"headers\"\nresponse = {{ set = {{ \"x-generation\" = \"{g}\" }} }}\n")
    };
    let kept = limiter("name = \"kept\"\npaths = [\"/kept\"]\nrate = \"1/h\"\nburst = 2");
    let changed = |burst: u32| {
        limiter(&format!(
            "name = \"changed\"\npaths = [\"/changed\"]\nrate = \"1/h\"\nburst = {burst} # changed"
        ))
    };
    let (_up, gh) = proxy_with(
        "",
        "",
        &[generation("1"), kept.clone(), changed(2)].concat(),
    )
    .await;
    assert_passed(&get(gh.port, "/kept").await, 2, 1);
    assert_passed(&get(gh.port, "/changed").await, 2, 1);

    let new = std::fs::read_to_string(&gh.config_path)
        .unwrap()
        .replace("\"1\"", "\"2\"")
        .replace("burst = 2 # changed", "burst = 3 # changed");
    assert!(new.contains("burst = 3 # changed"), "{new}");
    std::fs::write(&gh.config_path, new).unwrap();
    gh.send_signal("HUP");
    gh.wait_for_header("/echo", "x-generation", "2").await;

    // Unchanged: the used request is still used.
    assert_passed(&get(gh.port, "/kept").await, 2, 0);
    assert_limited(&get(gh.port, "/kept").await, 2);
    // Changed settings: a fresh limiter.
    assert_passed(&get(gh.port, "/changed").await, 3, 2);
}

/// `rest` for a gatehouse limiting through `redis` (URL in `{redis}`).
fn redis_limiter(name: &str, keys: &str) -> String {
    limiter(&format!(
        "name = \"{name}\"\nbackend = \"redis\"\nredis_url = \"{{redis}}\"\ntimeout = \"200ms\"\n{keys}"
    ))
}

async fn start_with_redis(up: &Upstream, redis: &str, rest: &str) -> Gatehouse {
    Gatehouse::start(
        &config("", "", rest),
        &[("upstream", &up.url()), ("redis", redis)],
    )
    .await
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
async fn two_processes_sharing_one_redis_share_one_budget() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let rest = redis_limiter("shared", "rate = \"1/h\"\nburst = 4\nkey = \"global\"");
    let a = start_with_redis(&up, &redis.url(), &rest).await;
    let b = start_with_redis(&up, &redis.url(), &rest).await;
    for (remaining, port) in [(3, a.port), (2, b.port), (1, a.port), (0, b.port)] {
        assert_passed(&get(port, "/echo").await, 4, remaining);
    }
    assert_limited(&get(a.port, "/echo").await, 4);
    assert_limited(&get(b.port, "/echo").await, 4);
    assert_eq!(up.request_count(), 4);
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
async fn redis_refill_after_retry_after() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let rest = redis_limiter(
        "refill",
        "rate = \"1/s\"\nburst = 2\nkey = \"header:x-key\"",
    );
    let gh = start_with_redis(&up, &redis.url(), &rest).await;
    let send = |k: &'static str| {
        let req = request("GET", "/echo").header("x-key", k);
        send(gh.port, req.body(empty()).unwrap())
    };
    assert_passed(&send("a").await, 2, 1);
    assert_passed(&send("a").await, 2, 0);
    let retry = assert_limited(&send("a").await, 2);
    assert_passed(&send("b").await, 2, 1);
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(send("a").await.status, 200);
}

/// While Redis is unusable: `allow` passes without a quota, `deny` answers 503.
async fn assert_backend_down(open: &Gatehouse, closed: &Gatehouse) {
    for _ in 0..5 {
        let resp = get(open.port, "/echo").await;
        assert_eq!(resp.status, 200, "allow fails open: {resp:?}");
        assert_eq!(
            resp.header("ratelimit-remaining"),
            None,
            "no decision, no quota"
        );
        get(closed.port, "/echo")
            .await
            .assert_gatehouse_error(503, "unavailable");
    }
}

/// Once Redis is back, both decide through it again (each worker reconnects by itself).
async fn wait_for_recovery(open: &Gatehouse, closed: &Gatehouse) {
    within(Duration::from_secs(20), "both limiters to recover", async {
        for gh in [open, closed] {
            loop {
                let resp = get(gh.port, "/echo").await;
                if resp.status == 200 && resp.header("ratelimit-remaining").is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    })
    .await;
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_redis),
    ignore = "needs redis-server (apt-get install redis-server)"
)]
async fn redis_outage_fails_open_or_closed_as_configured_and_recovers() {
    let redis = Redis::start().await;
    let up = Upstream::start().await;
    let keys = "rate = \"100/s\"\nkey = \"global\"";
    let open = start_with_redis(&up, &redis.url(), &redis_limiter("open", keys)).await;
    let closed = start_with_redis(
        &up,
        &redis.url(),
        &redis_limiter("closed", &format!("{keys}\non_backend_error = \"deny\"")),
    )
    .await;
    assert_passed(&get(open.port, "/echo").await, 100, 99);
    assert_passed(&get(closed.port, "/echo").await, 100, 99);

    // Slow: a frozen server keeps the connection open and never answers (the timeout).
    redis.signal("STOP");
    assert_backend_down(&open, &closed).await;
    redis.signal("CONT");
    wait_for_recovery(&open, &closed).await;

    // Gone: the server is killed, then started again on the same port.
    let port = redis.kill();
    assert_backend_down(&open, &closed).await;
    for gh in [&open, &closed] {
        let warnings = gh.stderr().matches("rate limit backend failed").count();
        assert!(
            (1..=2).contains(&warnings),
            "a warning at most every 10s, not one per failed request: {}",
            gh.output()
        );
    }
    let _redis = Redis::on(port).await;
    wait_for_recovery(&open, &closed).await;
}

#[tokio::test]
async fn bad_settings_are_config_errors_naming_the_key() {
    for (keys, expected) in [
        ("rate = \"10/s\"\nkey = \"cookie\"", "middleware[1].key"),
        ("rate = \"10/s\"\nburst = 0", "middleware[1].burst"),
        (
            "rate = \"10/s\"\nbackend = \"redis\"",
            "middleware[1].redis_url",
        ),
        (
            "rate = \"10/s\"\nbackend = \"redis\"\nredis_url = \"http://x\"",
            "middleware[1].redis_url",
        ),
        (
            "rate = \"10/s\"\non_backend_error = \"maybe\"",
            "middleware[1].on_backend_error",
        ),
        ("burst = 5", "middleware[1].rate"),
        (
            "rate = \"10/s\"\nbackend = \"redis\"\nredis = { sentinel_master = \"m\", sentinels = [\"s:1\", \"s:x\"] }",
            ":13:54: middleware[1].redis.sentinels[2]: invalid address \"s:x\"",
        ),
        (
            "rate = \"10/s\"\nbackend = \"redis\"\nredis = { cluster = true }",
            "middleware[1].redis.nodes: cluster = true needs seed nodes",
        ),
        (
            "rate = \"10/s\"\nbackend = \"redis\"\nredis_url = \"redis://r\"\nredis = { url = \"redis://r\" }",
            "middleware[1].redis: give `redis_url` or a `redis` table, not both",
        ),
        (
            "rate = \"10/s\"\nredis = { url = \"redis://r\" }",
            "middleware[1].redis: only used with backend = \"redis\"",
        ),
        (
            "rate = \"10/s\"\nbackend = \"redis\"\nredis = { url = \"redis://r\", tls_cert_file = \"/x.pem\" }",
            "middleware[1].redis.tls_cert_file: only used with TLS",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(
            &path,
            config("", "", &limiter(keys))
                .replace("{port}", "1")
                .replace("{upstream}", "http://127.0.0.1:1"),
        )
        .unwrap();
        let out = cli(&["check", "--config", path.to_str().unwrap()], &[], None);
        assert_eq!(out.code, Some(2), "{keys}: {}", out.stderr);
        assert!(out.stderr.contains(expected), "{keys}: {}", out.stderr);
    }
}
