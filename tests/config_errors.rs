//! Config errors, through the real binary: every problem of a file at once, each at
//! `file:line:col` with its key path, "did you mean" for a misspelt key, value or type,
//! the chain numbered alike in errors and in `check`, exit 2; a reload that succeeds logs
//! the new chain on one line, one that fails logs every problem; an empty tracing endpoint
//! exports nothing.

mod common;

use std::time::Duration;

use common::{cli, free_port, within, Gatehouse};

/// `check` on `source` written to a `proxy.toml` of its own.
fn check(source: &str, envs: &[(&str, &str)]) -> common::CliOutput {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, source).unwrap();
    cli(
        &["check", "--config", path.to_str().unwrap()],
        envs,
        Some(dir.path()),
    )
}

const BAD: &str = r#"[server]
listen = "127.0.0.1:8080"
workers = 5000

[upstream]
url = "http://127.0.0.1:8000"
timout = "5s"

[log]
format = "jsn"

[[middleware]]
type = "request_id"
heder = "x-id"

[[middleware]]
type = "rate_limt"
rate = "10/s"

[[middleware]]
type = "body_limit"
max = "10"
path = ["/upload/**"]

[[middleware]]
type = "api_key"
keys = [{ id = "ci", key = "${CI_KEY}" }]
"#;

#[test]
fn every_problem_is_reported_at_once_in_file_order() {
    let out = check(BAD, &[]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    let lines: Vec<&str> = out.stderr.lines().collect();
    let want = [
        "proxy.toml:3:1: server.workers: 5000 workers: expected 0 (one per CPU) up to 1024",
        "proxy.toml:7:1: upstream.timout: unknown field `timout`, expected one of",
        "proxy.toml:10:1: log.format: unknown variant `jsn`, expected `json` or `text`; did you mean `json`?",
        "proxy.toml:14:1: middleware[1].heder: unknown field `heder`, expected `header` or `trust_incoming`; did you mean `header`?",
        "proxy.toml:17:1: middleware[2].type: unknown middleware type \"rate_limt\": expected one of",
        "proxy.toml:22:1: middleware[3].max: invalid size \"10\": expected a unit after the number",
        "proxy.toml:23:1: middleware[3].path: unknown field `path`, expected `max`; did you mean `paths`?",
        "proxy.toml:27:22: middleware[4].keys[1].key: environment variable CI_KEY is not set",
    ];
    assert_eq!(lines.len(), want.len(), "{}", out.stderr);
    for (line, want) in lines.iter().zip(want) {
        let line = line
            .strip_prefix("gatehouse: error: ")
            .unwrap_or_else(|| panic!("not an error line: {line}"));
        // The file is named as given: a path ending in proxy.toml.
        let at = line.find("proxy.toml:").expect("names the file");
        assert!(line[at..].starts_with(want), "{line}\nwanted {want}");
    }
    assert!(
        lines[1].ends_with("; did you mean `timeout`?"),
        "{}",
        lines[1]
    );
    assert!(
        lines[4].ends_with("; did you mean \"rate_limit\"?"),
        "{}",
        lines[4]
    );
}

#[test]
fn the_chain_is_numbered_alike_in_errors_and_in_check() {
    let entries = |third: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n\
             [[middleware]]\ntype = \"request_id\"\n\
             [[middleware]]\ntype = \"timing\"\n\
             [[middleware]]\ntype = \"body_limit\"\nname = \"uploads\"\nmax = \"{third}\"\n"
        )
    };
    let out = check(&entries("5 parsecs"), &[]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains(": middleware[3].max: invalid size"),
        "{}",
        out.stderr
    );
    let out = check(&entries("5MiB"), &[]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("\n  3. uploads (type body_limit)"),
        "{}",
        out.stdout
    );
}

#[test]
fn a_config_that_cannot_be_read_as_toml_stops_at_the_syntax_error() {
    let out = check("[server\nlisten = 1\n", &[]);
    assert_eq!(out.code, Some(2));
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", out.stderr);
    assert!(
        lines[0].contains("proxy.toml:1:8: invalid TOML: invalid table header; expected"),
        "{}",
        lines[0]
    );
}

const CHAIN: &str = r#"[server]
listen = "127.0.0.1:{port}"
[upstream]
url = "http://127.0.0.1:{app}"
[[middleware]]
type = "request_id"
[[middleware]]
type = "timing"
"#;

async fn wait_for_log(gh: &Gatehouse, text: &str) {
    within(Duration::from_secs(10), text, async {
        while !gh.stderr().contains(text) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_reload_logs_the_new_chain_or_every_problem() {
    let app = free_port().to_string();
    let gh = Gatehouse::start(CHAIN, &[("app", &app)]).await;
    let port = gh.port.to_string();
    let config = common::render(CHAIN, &[("port", &port), ("app", &app)]);

    let grown = format!(
        "{config}[[middleware]]\ntype = \"api_key\"\nname = \"keys\"\nkeys = [{{ id = \"a\", key = \"k\" }}]\n"
    );
    std::fs::write(&gh.config_path, grown).unwrap();
    gh.send_signal("HUP");
    wait_for_log(&gh, "config reloaded: request_id → timing → keys → proxy").await;

    let broken = format!("{config}[[middleware]]\ntype = \"api_ky\"\n[[middleware]]\ntype = \"timing\"\nname = \"t2\"\nformt = \"ms\"\n");
    std::fs::write(&gh.config_path, broken).unwrap();
    gh.send_signal("HUP");
    wait_for_log(&gh, "config reload failed").await;
    let log = gh.stderr();
    let failed = log
        .lines()
        .find(|l| l.contains("config reload failed"))
        .unwrap();
    // One log line holds both problems.
    assert!(
        failed.contains("middleware[3].type: unknown middleware type")
            && failed.contains("middleware[4].formt: unknown field"),
        "{failed}"
    );
}

#[test]
fn an_empty_tracing_endpoint_exports_nothing() {
    let source =
        "[server]\nlisten = \"127.0.0.1:8080\"\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n\
                  [tracing]\nendpoint = \"${OTEL_EXPORTER_OTLP_ENDPOINT:-}\"\n";
    let out = check(source, &[]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(!out.stdout.contains("tracing:"), "{}", out.stdout);
    let out = check(
        source,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")],
    );
    assert!(
        out.stdout
            .contains("tracing: export to http://collector:4318/v1/traces"),
        "{}",
        out.stdout
    );
    // Left out with the variable unset, it is still an error: `[tracing]` asks for export.
    let out = check(
        "[server]\nlisten = \"127.0.0.1:8080\"\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n[tracing]\n",
        &[],
    );
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("tracing.endpoint: missing"),
        "{}",
        out.stderr
    );
}

#[test]
fn the_fastapi_example_exports_traces_only_where_a_collector_is_named() {
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/fastapi/proxy.toml"
    );
    let envs = [
        ("API_KEY", "k"),
        ("AUDIT_FILE", "/tmp/gatehouse-audit.jsonl"),
    ];
    let out = cli(&["check", "--config", config], &envs, None);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(!out.stdout.contains("tracing:"), "{}", out.stdout);
    let mut with = envs.to_vec();
    with.push(("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"));
    let out = cli(&["check", "--config", config], &with, None);
    assert!(out.stdout.contains("tracing: export to"), "{}", out.stdout);
}
