//! Command line, configuration loading and errors, process lifecycle (exit codes, SIGTERM).
mod common;

use common::*;
use std::path::PathBuf;
use std::time::Duration;

/// A valid config with every middleware type of this issue, each with a distinct name.
const VALID: &str = r#"[server]
listen = "127.0.0.1:18080"

[upstream]
url = "http://127.0.0.1:18000"

[[middleware]]
type = "request_id"
name = "first-id"

[[middleware]]
type = "timing"
name = "second-timer"

[[middleware]]
type = "headers"
name = "third-headers"
request = { set = { "x-env" = "prod" } }

[[middleware]]
type = "ip_filter"
name = "fourth-ipf"
deny = ["10.0.0.0/8"]

[[middleware]]
type = "cors"
name = "fifth-cors"
allow_origins = ["https://app.example"]

[[middleware]]
type = "body_limit"
name = "sixth-limit"
max = "1MiB"
"#;

/// Writes `contents` as `proxy.toml` in a fresh temp dir.
fn write_config(contents: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, contents).unwrap();
    (dir, path)
}

fn check(contents: &str) -> CliOutput {
    let (_dir, path) = write_config(contents);
    cli(&["check", "--config", path.to_str().unwrap()], &[], None)
}

/// `check` must fail with exit 2; returns stderr for further assertions.
fn check_invalid(contents: &str) -> String {
    let out = check(contents);
    assert_eq!(
        out.code,
        Some(2),
        "expected exit 2 for invalid config\nstdout: {}\nstderr: {}",
        out.stdout,
        out.stderr
    );
    out.stderr
}

/// Asserts `text` contains `proxy.toml:LINE:COL` for the given line (any column).
fn assert_location(text: &str, line: usize) {
    let needle = format!("proxy.toml:{line}:");
    let found = text.match_indices(&needle).any(|(i, _)| {
        text[i + needle.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    });
    assert!(found, "expected `{needle}COL` in the error, got:\n{text}");
}

/// `check` refuses `contents`, pointing at `line` and naming each of `mentions`.
fn assert_invalid_at(contents: &str, line: usize, mentions: &[&str]) {
    let err = check_invalid(contents);
    assert_location(&err, line);
    for what in mentions {
        assert_mentions(&err, what);
    }
}

fn assert_mentions(text: &str, what: &str) {
    assert!(
        text.contains(what),
        "expected the error to mention `{what}`, got:\n{text}"
    );
}

/// Line of `stdout` (1-based index into its lines) that contains both `a` and `b`.
fn line_with(stdout: &str, a: &str, b: &str) -> usize {
    stdout
        .lines()
        .position(|l| l.contains(a) && l.contains(b))
        .unwrap_or_else(|| panic!("no line with `{a}` and `{b}` in check output:\n{stdout}"))
}

fn assert_chain_printed(stdout: &str) {
    let lines = [
        line_with(stdout, "first-id", "request_id"),
        line_with(stdout, "second-timer", "timing"),
        line_with(stdout, "third-headers", "headers"),
        line_with(stdout, "fourth-ipf", "ip_filter"),
        line_with(stdout, "fifth-cors", "cors"),
        line_with(stdout, "sixth-limit", "body_limit"),
    ];
    assert!(
        lines.windows(2).all(|w| w[0] < w[1]),
        "chain not printed one line per middleware in order (lines {lines:?}):\n{stdout}"
    );
}

#[test]
fn version_prints_the_version() {
    let out = cli(&["--version"], &[], None);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert!(
        out.stdout.contains(env!("CARGO_PKG_VERSION")),
        "version output: {}",
        out.stdout
    );
}

#[test]
fn help_exits_zero_and_lists_subcommands() {
    let out = cli(&["--help"], &[], None);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert!(out.stdout.contains("run"), "help: {}", out.stdout);
    assert!(out.stdout.contains("check"), "help: {}", out.stdout);
}

#[test]
fn check_valid_prints_chain_in_order() {
    let out = check(VALID);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert_chain_printed(&out.stdout);
}

const PARTNER_KEYS: &str = r#"
[[middleware]]
type = "api_key"
name = "partner-keys"
paths = ["/api/**"]
keys = [{ id = "p", key = "k" }]
"#;

const BROWSERS: &str = r#"
[[middleware]]
type = "cors"
name = "browsers"
allow_origins = ["https://app.example"]
"#;

/// A config listening on `{port}` with `chain` as its middlewares.
fn with_chain(chain: &[&str]) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{{port}}\"\n\n[upstream]\nurl = \"http://127.0.0.1:9\"\n{}",
        chain.concat()
    )
}

/// `check` of a chain: its exit status and its `warning:` lines.
fn check_warnings(chain: &[&str]) -> Vec<String> {
    let out = check(&render(&with_chain(chain), &[("port", "18080")]));
    assert_eq!(out.code, Some(0), "a warning is no error: {}", out.stderr);
    out.stdout
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .map(str::to_owned)
        .collect()
}

/// The order warning names both entries, a request both take, and the fix.
fn assert_order_warning(text: &str) {
    for part in [
        "\"partner-keys\" (api_key) comes before \"browsers\" (cors)",
        "OPTIONS /api/",
        "preflights carry no credentials",
        "Move \"browsers\" above \"partner-keys\"",
    ] {
        assert_mentions(text, part);
    }
}

#[test]
fn check_warns_when_authentication_comes_before_cors_and_still_passes() {
    let warnings = check_warnings(&[PARTNER_KEYS, BROWSERS]);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_order_warning(&warnings[0]);
    // In the right order, or on paths the other never sees, there is nothing to say.
    assert_eq!(check_warnings(&[BROWSERS, PARTNER_KEYS]), [] as [String; 0]);
    let elsewhere = BROWSERS.replace("allow_origins", "paths = [\"/web/**\"]\nallow_origins");
    assert_eq!(
        check_warnings(&[PARTNER_KEYS, &elsewhere]),
        [] as [String; 0]
    );
}

#[test]
fn check_warns_when_a_limit_or_an_ip_filter_comes_before_cors() {
    for entry in [
        "type = \"rate_limit\"\nrate = \"10/s\"",
        "type = \"body_limit\"\nmax = \"1KiB\"",
        "type = \"ip_filter\"\ndeny = [\"10.0.0.0/8\"]",
    ] {
        let guard = format!("\n[[middleware]]\nname = \"guard\"\npaths = [\"/api/**\"]\n{entry}\n");
        let warnings = check_warnings(&[&guard, BROWSERS]);
        assert_eq!(warnings.len(), 1, "{entry}: {warnings:?}");
        let kind = entry.split('"').nth(1).unwrap();
        for part in [
            &format!("\"guard\" ({kind}) comes before \"browsers\" (cors)"),
            " /api/",
            "its refusals carry no CORS headers, so a page cannot read them",
            "Move \"browsers\" above \"guard\"",
        ] {
            assert_mentions(&warnings[0], part);
        }
        assert_eq!(check_warnings(&[BROWSERS, &guard]), [] as [String; 0]);
    }
}

#[tokio::test]
async fn run_logs_the_order_warning_at_start() {
    let gh = Gatehouse::start(&with_chain(&[PARTNER_KEYS, BROWSERS]), &[]).await;
    let line = within(
        Duration::from_secs(10),
        "the order warning in the log",
        async {
            loop {
                if let Some(line) = gh.stderr().lines().find(|l| l.contains("comes before")) {
                    return line.to_owned();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    let json: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(json["level"], "WARN", "{line}");
    assert_order_warning(json["message"].as_str().expect("a message"));
}

#[test]
fn check_defaults_to_gatehouse_config_env() {
    let (_valid_dir, valid) = write_config(VALID);
    // The cwd holds an invalid proxy.toml: the env var must win over it.
    let (cwd, _) = write_config("this is not toml");
    let out = cli(
        &["check"],
        &[("GATEHOUSE_CONFIG", valid.to_str().unwrap())],
        Some(cwd.path()),
    );
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert_chain_printed(&out.stdout);
}

#[test]
fn explicit_config_flag_beats_env() {
    let (_valid_dir, valid) = write_config(VALID);
    let (_bad_dir, bad) = write_config("this is not toml");
    let out = cli(
        &["check", "--config", valid.to_str().unwrap()],
        &[("GATEHOUSE_CONFIG", bad.to_str().unwrap())],
        None,
    );
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert_chain_printed(&out.stdout);
}

#[test]
fn check_defaults_to_proxy_toml_in_cwd() {
    let (cwd, _) = write_config(VALID);
    let out = cli(&["check"], &[], Some(cwd.path()));
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert_chain_printed(&out.stdout);

    // And it really reads that file: an invalid one there fails.
    let (bad_cwd, _) = write_config("[server]\nlisten = 5\n");
    let out = cli(&["check"], &[], Some(bad_cwd.path()));
    assert_eq!(out.code, Some(2), "stdout: {}", out.stdout);
    assert_mentions(&out.stderr, "proxy.toml");
}

#[test]
fn check_missing_file_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let out = cli(&["check"], &[], Some(dir.path()));
    assert_eq!(out.code, Some(2), "stdout: {}", out.stdout);
    assert_mentions(&out.stderr, "proxy.toml");
}

#[test]
fn unknown_key_in_middleware_is_an_error() {
    assert_invalid_at(
        r#"[server]
listen = "127.0.0.1:18080"

[upstream]
url = "http://127.0.0.1:18000"

[[middleware]]
type = "request_id"
heder = "x-id"
"#,
        9,
        &["middleware[1]", "heder"],
    );
}

#[test]
fn unknown_key_in_later_middleware_names_its_index() {
    assert_invalid_at(
        r#"[server]
listen = "127.0.0.1:18080"

[upstream]
url = "http://127.0.0.1:18000"

[[middleware]]
type = "timing"

[[middleware]]
type = "ip_filter"
alow = ["10.0.0.0/8"]
"#,
        12,
        &["middleware[2]", "alow"],
    );
}

#[test]
fn unknown_top_level_key_is_an_error() {
    assert_invalid_at(
        r#"[server]
listen = "127.0.0.1:18080"

[upstream]
url = "http://127.0.0.1:18000"

[logging]
level = "debug"
"#,
        7,
        &["logging"],
    );
}

#[test]
fn unknown_key_in_server_is_an_error() {
    assert_invalid_at(
        r#"[server]
listen = "127.0.0.1:18080"
idle_timout = "5s"

[upstream]
url = "http://127.0.0.1:18000"
"#,
        3,
        &["idle_timout"],
    );
}

#[test]
fn unknown_middleware_type_lists_known_types() {
    let err = check_invalid(
        r#"[server]
listen = "127.0.0.1:18080"

[upstream]
url = "http://127.0.0.1:18000"

[[middleware]]
type = "bogus_filter"
"#,
    );
    assert_location(&err, 8);
    assert_mentions(&err, "middleware[1]");
    assert_mentions(&err, "bogus_filter");
    for known in [
        "request_id",
        "timing",
        "headers",
        "ip_filter",
        "cors",
        "body_limit",
    ] {
        assert_mentions(&err, known);
    }
}

#[test]
fn bad_duration_is_an_error() {
    let err = check_invalid(
        r#"[server]
listen = "127.0.0.1:18080"

[upstream]
url = "http://127.0.0.1:18000"
timeout = "5 parsecs"
"#,
    );
    assert_location(&err, 6);
    assert_mentions(&err, "upstream.timeout");
    assert!(
        err.to_lowercase().contains("duration"),
        "should say a duration was expected:\n{err}"
    );
}

/// A size that is no size, or a number without its unit (which once meant bytes), is an
/// error at its line that says what was expected.
#[test]
fn bad_size_is_an_error() {
    for (max, expected) in [
        ("lots", "size"),
        (
            "10",
            "invalid size \"10\": expected a unit after the number",
        ),
    ] {
        let err = check_invalid(&format!(
            r#"[server]
listen = "127.0.0.1:18080"

[upstream]
url = "http://127.0.0.1:18000"

[[middleware]]
type = "timing"

[[middleware]]
type = "body_limit"
max = "{max}"
"#
        ));
        assert_location(&err, 12);
        assert_mentions(&err, "middleware[2].max");
        assert!(
            err.to_lowercase().contains(expected),
            "should say {expected:?}:\n{err}"
        );
    }
    let err = check_invalid(
        "[server]\nlisten = \"127.0.0.1:18080\"\n[upstream]\nurl = \"http://127.0.0.1:18000\"\n\
         [[middleware]]\ntype = \"body_limit\"\nmax = \"10\"\n",
    );
    assert_mentions(&err, "\"10B\" (bytes)");
}

#[test]
fn bad_size_in_server_is_an_error() {
    assert_invalid_at(
        r#"[server]
listen = "127.0.0.1:18080"
max_header_bytes = "8 kilobytes please"

[upstream]
url = "http://127.0.0.1:18000"
"#,
        3,
        &["server.max_header_bytes"],
    );
}

#[test]
fn wrong_value_type_is_an_error() {
    assert_invalid_at(
        r#"[server]
listen = 8080

[upstream]
url = "http://127.0.0.1:18000"
"#,
        2,
        &["server.listen"],
    );
}

#[test]
fn missing_env_var_without_default_is_an_error() {
    let err = check_invalid(
        r#"[server]
listen = "127.0.0.1:18080"

[upstream]
url = "${GATEHOUSE_TEST_SURELY_UNSET_7731}"
"#,
    );
    assert_mentions(&err, "GATEHOUSE_TEST_SURELY_UNSET_7731");
    assert_mentions(&err, "proxy.toml");
}

#[test]
fn toml_syntax_error_has_line_and_column() {
    assert_invalid_at(
        r#"[server]
listen = "127.0.0.1:18080"
idle_timeout = = "5s"

[upstream]
url = "http://127.0.0.1:18000"
"#,
        3,
        &[],
    );
}

#[test]
fn missing_listen_is_an_error() {
    let err = check_invalid(
        r#"[server]
idle_timeout = "5s"

[upstream]
url = "http://127.0.0.1:18000"
"#,
    );
    assert_mentions(&err, "server.listen");
    assert_mentions(&err, "proxy.toml");
}

#[tokio::test]
async fn env_vars_are_substituted_in_string_values() {
    let up = Upstream::start().await;
    let port = free_port().to_string();
    let template = r#"[server]
listen = "127.0.0.1:${GH_TEST_LISTEN_PORT}"

[upstream]
url = "{upstream}"

[[middleware]]
type = "headers"
response = { set = { "x-from-env" = "${GH_TEST_GREETING}", "x-defaulted" = "${GH_TEST_SURELY_UNSET_9152:-fallback}", "x-default-unused" = "${GH_TEST_GREETING:-unused}" } }
"#;
    let mut gh = Gatehouse::spawn(
        template,
        &[("upstream", &up.url()), ("port", &port)],
        &[
            ("GH_TEST_LISTEN_PORT", &port),
            ("GH_TEST_GREETING", "hello from env"),
        ],
    );
    gh.wait_ready().await;
    let resp = get(gh.port, "/echo").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("x-from-env").as_deref(), Some("hello from env"));
    assert_eq!(resp.header("x-defaulted").as_deref(), Some("fallback"));
    assert_eq!(
        resp.header("x-default-unused").as_deref(),
        Some("hello from env")
    );
}

#[tokio::test]
async fn run_with_invalid_config_exits_2() {
    let mut gh = Gatehouse::spawn(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nbogus = 1\n\n[upstream]\nurl = \"http://127.0.0.1:9\"\n",
        &[],
        &[],
    );
    gh.assert_exits_with(2).await;
    assert!(gh.stderr().contains("bogus"), "{}", gh.output());
}

#[tokio::test]
async fn run_with_port_taken_exits_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let mut gh = Gatehouse::spawn(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[upstream]\nurl = \"http://127.0.0.1:9\"\n",
        &[("port", &port)],
        &[],
    );
    gh.assert_exits_with(1).await;
    drop(taken);
}

#[tokio::test]
async fn sigterm_when_idle_exits_0() {
    let (_up, mut gh) = proxy_with("", "", "").await;
    assert_eq!(get(gh.port, "/echo").await.status, 200);
    gh.send_signal("TERM");
    gh.assert_exits_with(0).await;
}

#[tokio::test]
async fn sigint_when_idle_exits_0() {
    let (_up, mut gh) = proxy_with("", "", "").await;
    gh.send_signal("INT");
    gh.assert_exits_with(0).await;
}

#[tokio::test]
async fn sigterm_drains_in_flight_request() {
    let (up, mut gh) = proxy_with("shutdown_grace = \"10s\"", "", "").await;
    let port = gh.port;
    let in_flight = tokio::spawn(async move { get(port, "/slow?ms=1500").await });
    // Wait until the request has reached the upstream, then ask gatehouse to stop.
    up.wait_for_requests(1).await;
    gh.send_signal("TERM");
    let resp = within(Duration::from_secs(30), "in-flight response", in_flight)
        .await
        .unwrap();
    assert_eq!(resp.status, 200, "{resp:?}\n{}", gh.output());
    assert_eq!(resp.text(), "slow done");
    gh.assert_exits_with(0).await;
}

#[test]
fn unknown_key_in_nested_headers_table_is_an_error() {
    assert_invalid_at(
        r#"[server]
listen = "127.0.0.1:18080"

[upstream]
url = "http://127.0.0.1:18000"

[[middleware]]
type = "headers"
request = { sett = { "x-env" = "prod" } }
"#,
        9,
        &["middleware[1].request", "sett"],
    );
}

#[test]
fn invalid_cidr_is_an_error() {
    assert_invalid_at(
        r#"[server]
listen = "127.0.0.1:18080"

[upstream]
url = "http://127.0.0.1:18000"

[[middleware]]
type = "ip_filter"
deny = ["10.0.0.0/8", "10.0.0.0/99"]
"#,
        9,
        &["middleware[1].deny", "10.0.0.0/99"],
    );
}

#[test]
fn duplicate_middleware_names_are_an_error() {
    let err = check_invalid(
        r#"[server]
listen = "127.0.0.1:18080"

[upstream]
url = "http://127.0.0.1:18000"

[[middleware]]
type = "timing"
name = "dup"

[[middleware]]
type = "request_id"
name = "dup"
"#,
    );
    assert_mentions(&err, "middleware[2]");
    assert_mentions(&err, "dup");
}

#[test]
fn invalid_listen_and_upstream_url_are_errors() {
    assert_invalid_at(
        r#"[server]
listen = "not an address"

[upstream]
url = "http://127.0.0.1:18000"
"#,
        2,
        &["server.listen"],
    );
    assert_invalid_at(
        r#"[server]
listen = "127.0.0.1:18080"

[upstream]
url = "ftp://127.0.0.1:18000"
"#,
        5,
        &["upstream.url"],
    );
}

#[test]
fn paths_must_be_a_list() {
    assert_invalid_at(
        r#"[server]
listen = "127.0.0.1:18080"

[upstream]
url = "http://127.0.0.1:18000"

[[middleware]]
type = "timing"
paths = "/api/**"
"#,
        9,
        &["middleware[1].paths"],
    );
}

#[tokio::test]
async fn after_sigterm_new_requests_never_reach_the_upstream() {
    let (up, mut gh) = proxy_with("shutdown_grace = \"10s\"", "", "").await;
    let port = gh.port;
    let in_flight = tokio::spawn(async move { get(port, "/slow?ms=4000").await });
    up.wait_for_requests(1).await;
    gh.send_signal("TERM");
    // shutdown_delay is 0s: give the process a moment to act on the signal.
    tokio::time::sleep(Duration::from_secs(1)).await;
    if let Ok(stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Body>(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = request("GET", "/echo")
            .header("host", "x")
            .body(empty())
            .unwrap();
        if let Ok(Ok(resp)) = tokio::time::timeout(STEP, sender.send_request(req)).await {
            assert_eq!(
                resp.status(),
                503,
                "a new request during the drain: {resp:?}"
            );
        }
    }
    assert_eq!(up.request_count(), 1, "a new request reached the upstream");
    let resp = within(Duration::from_secs(30), "in-flight response", in_flight)
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    gh.assert_exits_with(0).await;
}

#[tokio::test]
async fn shutdown_grace_bounds_the_drain() {
    let (up, mut gh) = proxy_with("shutdown_grace = \"1s\"", "", "").await;
    use tokio::io::AsyncWriteExt;
    let mut in_flight = tokio::net::TcpStream::connect(("127.0.0.1", gh.port))
        .await
        .unwrap();
    in_flight
        .write_all(b"GET /slow?ms=60000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    up.wait_for_requests(1).await;
    gh.send_signal("TERM");
    let status = gh.wait_exit(Duration::from_secs(20)).await;
    assert!(
        status.is_some(),
        "gatehouse still running long after shutdown_grace\n{}",
        gh.output()
    );
    drop(in_flight);
}
