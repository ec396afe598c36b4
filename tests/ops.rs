//! Operating gatehouse: the admin listener (probes, metrics), TLS termination and
//! certificate rotation, reloads and drains with requests in flight.
mod common;

use common::*;
use std::time::Duration;

/// `[admin]` on `{admin}`, probing the upstream when `upstream_check` is given.
fn admin_section(upstream_check: Option<&str>) -> String {
    let check = upstream_check.map_or(String::new(), |d| format!("upstream_check = \"{d}\"\n"));
    format!("[admin]\nlisten = \"127.0.0.1:{{admin}}\"\n{check}\n")
}

/// An upstream and a gatehouse with an admin listener; returns the admin port too.
async fn with_admin(server: &str, rest: &str) -> (Upstream, Gatehouse, u16) {
    let up = Upstream::start().await;
    let admin = free_port();
    let template = config(server, "", &format!("{}{rest}", admin_section(None)));
    let gh = Gatehouse::start(
        &template,
        &[("upstream", &up.url()), ("admin", &admin.to_string())],
    )
    .await;
    (up, gh, admin)
}

/// The value of the sample line that starts with `series` (e.g.
/// `gatehouse_requests_total{status="200"}`), 0 if the line is absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().expect("a numeric sample"))
}

async fn scrape(admin: u16) -> String {
    let resp = get(admin, "/metrics").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    resp.text()
}

/// Polls `/metrics` until `series` reaches `value` (a request is counted when its response
/// ends, which may be just after the client has read it); returns that scrape.
async fn wait_sample(admin: u16, series: &str, value: f64) -> String {
    within(Duration::from_secs(10), series, async {
        loop {
            let text = scrape(admin).await;
            if sample(&text, series) >= value {
                assert_eq!(sample(&text, series), value, "{series}:\n{text}");
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Polls `/readyz` until it answers `status` (10 s at most).
async fn wait_readyz(admin: u16, status: u16) {
    within(Duration::from_secs(10), "/readyz to change", async {
        while get(admin, "/readyz").await.status != status {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn admin_endpoints_answer_on_their_own_port() {
    let (up, gh, admin) = with_admin("", "").await;
    let resp = get(admin, "/healthz").await;
    assert_eq!((resp.status.as_u16(), resp.text().as_str()), (200, "ok\n"));
    let resp = get(admin, "/readyz").await;
    assert_eq!(resp.status, 200, "{resp:?}");

    let resp = get(admin, "/metrics").await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-type").as_deref(),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let text = resp.text();
    for family in [
        "gatehouse_requests",
        "gatehouse_request_duration_seconds",
        "gatehouse_upstream_duration_seconds",
        "gatehouse_rejections",
        "gatehouse_upstream_errors",
        "gatehouse_audit_events",
        "gatehouse_audit_dropped",
        "gatehouse_audit_queue_depth",
        "gatehouse_config_reloads",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing from the first scrape:\n{text}"
        );
    }
    assert!(text.ends_with("# EOF\n"), "{text}");

    let resp = get(admin, "/nope").await;
    resp.assert_gatehouse_error(404, "not_found");
    let resp = send(admin, request("POST", "/healthz").body(full("x")).unwrap()).await;
    resp.assert_gatehouse_error(405, "method_not_allowed");
    assert_eq!(resp.header("allow").as_deref(), Some("GET, HEAD"));
    let resp = send(admin, request("HEAD", "/readyz").body(empty()).unwrap()).await;
    assert_eq!(resp.status, 200);
    assert!(resp.body.is_empty());

    // The admin paths are not served on the public port: they go to the app.
    assert_eq!(get(gh.port, "/healthz").await.json()["uri"], "/healthz");
    assert_eq!(up.request_count(), 1);
}

#[tokio::test]
async fn metrics_count_responses_rejections_upstream_errors_and_reloads() {
    let deny = "[[middleware]]\ntype = \"ip_filter\"\ndeny = [\"0.0.0.0/0\", \"::/0\"]\npaths = [\"/denied/**\"]\n";
    let (_up, gh, admin) = with_admin("", deny).await;
    let before = scrape(admin).await;
    let ok = "gatehouse_requests_total{status=\"200\"}";
    let denied = "gatehouse_rejections_total{middleware=\"ip_filter\",status=\"403\"}";
    let refused = "gatehouse_upstream_errors_total{kind=\"connect\"}";
    let reloaded = "gatehouse_config_reloads_total{result=\"success\"}";
    let failed = "gatehouse_config_reloads_total{result=\"failure\"}";
    for series in [ok, denied, refused, reloaded, failed] {
        assert_eq!(sample(&before, series), 0.0, "{series}:\n{before}");
    }
    assert!(before.contains(failed), "{before}");

    assert_eq!(get(gh.port, "/echo").await.status, 200);
    assert_eq!(get(gh.port, "/echo").await.status, 200);
    get(gh.port, "/denied/x")
        .await
        .assert_gatehouse_error(403, "forbidden");
    let after = wait_sample(admin, ok, 2.0).await;
    assert_eq!(sample(&after, denied), 1.0, "{after}");
    assert_eq!(
        sample(&after, "gatehouse_request_duration_seconds_count"),
        3.0
    );

    // A reload to a dead upstream: one successful reload, then a 502 counted by kind.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let file = std::fs::read_to_string(&gh.config_path).unwrap();
    let live = file
        .lines()
        .find(|l| l.starts_with("url = "))
        .unwrap()
        .to_owned();
    std::fs::write(
        &gh.config_path,
        file.replace(&live, &format!("url = \"{dead}\"")),
    )
    .unwrap();
    gh.send_signal("HUP");
    wait_sample(admin, reloaded, 1.0).await;
    get(gh.port, "/echo")
        .await
        .assert_gatehouse_error(502, "bad_gateway");
    wait_sample(admin, refused, 1.0).await;

    // An invalid file counts as a failure.
    std::fs::write(&gh.config_path, "[server]\nbogus = 1\n").unwrap();
    gh.send_signal("HUP");
    let text = wait_sample(admin, failed, 1.0).await;
    assert_eq!(sample(&text, reloaded), 1.0);
}

#[tokio::test]
async fn readyz_turns_503_at_once_on_sigterm_while_shutdown_delay_keeps_serving() {
    let (up, mut gh, admin) = with_admin("shutdown_delay = \"10s\"", "").await;
    assert_eq!(get(admin, "/readyz").await.status, 200);
    gh.send_signal("TERM");
    wait_readyz(admin, 503).await;
    get(admin, "/readyz")
        .await
        .assert_gatehouse_error(503, "unavailable");
    assert_eq!(get(admin, "/healthz").await.status, 200);
    // Still inside shutdown_delay: new connections are accepted and proxied.
    let resp = get(gh.port, "/echo").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(up.request_count(), 1);
    gh.assert_exits_with(0).await;
}

#[tokio::test]
async fn readyz_follows_the_upstream_when_upstream_check_is_set() {
    let port = free_port();
    let admin = free_port();
    let template = config("", "", &admin_section(Some("100ms")));
    let _gh = Gatehouse::start(
        &template,
        &[
            ("upstream", &format!("http://127.0.0.1:{port}")),
            ("admin", &admin.to_string()),
        ],
    )
    .await;
    wait_readyz(admin, 503).await;
    let resp = get(admin, "/readyz").await;
    let json = resp.assert_gatehouse_error(503, "unavailable");
    assert_eq!(json["message"], "the upstream is unreachable");

    let app = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let accepting = tokio::spawn(async move {
        while let Ok((stream, _)) = app.accept().await {
            drop(stream);
        }
    });
    wait_readyz(admin, 200).await;
    accepting.abort();
    // Listener gone: unreachable again.
    wait_readyz(admin, 503).await;
}

#[tokio::test]
async fn admin_port_taken_exits_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = taken.local_addr().unwrap().port().to_string();
    let mut gh = Gatehouse::spawn(
        &config("", "", &admin_section(None)),
        &[("upstream", "http://127.0.0.1:9"), ("admin", &admin)],
        &[],
    );
    gh.assert_exits_with(1).await;
    assert!(gh.stderr().contains("(admin)"), "{}", gh.output());
    drop(taken);
}
