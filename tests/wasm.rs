//! `type = "wasm"`: proxy-wasm plugins written with the official Rust SDK (the crates of
//! `tests/fixtures/wasm`, built for `wasm32-wasip1` by the test run), through the real
//! binary: headers, a local reply, a body rewrite, configuration, an HTTP call to a
//! cluster, shared data, metrics, a timer; hostile plugins (a loop, a 1 GiB allocation, a
//! trap, a bad pointer) contained, and a trapped instance replaced; a reload with a changed
//! module; `explain` and `check` on plugins.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::wasm::{assemblyscript_headers, plugin};
use common::*;
use http_body_util::BodyExt;
use serde_json::{json, Value};

/// A `type = "wasm"` entry named `name` that runs the test plugin `module` on `/{name}/**`
/// only, with the further keys of `extra` (TOML lines).
fn entry(name: &str, module: &str, extra: &str) -> String {
    let paths = format!("paths = [\"/{name}/**\"]");
    wasm_entry(name, &plugin(module), &paths, extra)
}

/// A `type = "wasm"` entry named `name` running the module file `module`, with `scope`
/// (a `paths` line, or nothing) and `extra` (TOML lines).
fn wasm_entry(name: &str, module: &Path, scope: &str, extra: &str) -> String {
    format!(
        "[[middleware]]\ntype = \"wasm\"\nname = \"{name}\"\n{scope}\nmodule = \"{}\"\n{extra}\n\n",
        module.display()
    )
}

/// An `[audit]` section writing events to `events`, flushed quickly.
fn audit_to(events: &Path) -> String {
    format!(
        "[audit]\nflush_interval = \"10ms\"\n[[audit.sinks]]\ntype = \"file\"\npath = \"{}\"\n\n",
        events.display()
    )
}

fn get_with(path: &str, headers: &[(&str, &str)]) -> http::Request<Body> {
    let mut b = request("GET", path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(empty()).unwrap()
}

/// The audit event of the request for `path`, waiting (up to 20 s) for it to be written.
async fn event_for(events: &Path, path: &str) -> Value {
    within(
        Duration::from_secs(20),
        &format!("the audit event of {path}"),
        async {
            loop {
                if let Some(event) = read_events(events).into_iter().find(|e| e["path"] == path) {
                    return event;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await
}

/// Asserts the event is a refusal by `entry` for `reason` with `status`.
fn assert_denied(event: &Value, entry: &str, reason: &str, status: u16) {
    assert_eq!(
        (
            &event["decision"],
            &event["denied_by"],
            &event["deny_reason"],
            &event["status"]
        ),
        (
            &json!("deny"),
            &json!(entry),
            &json!(reason),
            &json!(status)
        ),
        "{event}"
    );
}

/// `check` on `config` (a whole proxy.toml), run in the config's directory.
fn check(config: &str) -> CliOutput {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    cli(
        &["check", "--config", path.to_str().unwrap()],
        &[],
        Some(dir.path()),
    )
}

/// A whole config of `rest` in front of an upstream that is never asked.
fn offline_config(rest: &str) -> String {
    config("", "", rest)
        .replace("{port}", &free_port().to_string())
        .replace("{upstream}", "http://127.0.0.1:9")
}

/// `explain --json --config CONFIG ARGS...`, off the test's runtime (whose servers the
/// binary may be asking); it must succeed.
async fn explain_json(config: &Path, args: &[&str]) -> Value {
    let mut all = vec![
        "explain".to_owned(),
        "--json".to_owned(),
        "--config".to_owned(),
        config.display().to_string(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        cli(&args, &[], None)
    })
    .await
    .unwrap();
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_wasm32_wasip1),
    ignore = "needs the wasm32-wasip1 target (rustup target add wasm32-wasip1)"
)]
async fn a_headers_plugin_changes_what_the_app_and_the_client_see() {
    let rest = format!(
        "{}{}{SECRET_HEADER}",
        entry("plugin", "headers", "configuration = \"from-config\""),
        entry("bare", "headers", ""),
    );
    let (_up, gh) = proxy_with("", "", &rest).await;
    assert_headers_plugin(gh.port, "plugin", "headers", Some("from-config")).await;
    assert_headers_plugin(gh.port, "bare", "headers", None).await;

    // Outside the plugins' paths nothing is changed.
    let resp = send(gh.port, get_with("/other/echo", &[("x-remove-me", "1")])).await;
    assert_eq!(resp.header("x-secret").as_deref(), Some("s3"));
    assert_eq!(resp.header("x-plugin"), None);
    let seen = resp.upstream_headers();
    assert!(
        seen.contains_key("x-remove-me") && !seen.contains_key("x-plugin-saw"),
        "{seen:?}"
    );
}

/// The same plugin in AssemblyScript (its SDK's ABI is 0.2.0: `malloc` rather than
/// `proxy_on_memory_allocate`, `wasi_unstable`, the root context found by root id), as
/// Envoy runs it.
#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_node),
    ignore = "needs node and npm (apt-get install nodejs npm)"
)]
async fn an_assemblyscript_headers_plugin_runs_as_the_rust_one() {
    let module = tokio::task::spawn_blocking(assemblyscript_headers)
        .await
        .unwrap();
    let rest = format!(
        "{}{SECRET_HEADER}",
        wasm_entry(
            "as",
            &module,
            "paths = [\"/as/**\"]",
            "root_id = \"headers\"\nconfiguration = \"from-as\""
        )
    );
    let (_up, gh) = proxy_with("", "", &rest).await;
    assert_headers_plugin(gh.port, "as", "headers-as", Some("from-as")).await;
}

/// A `headers` entry to put after a headers plugin's: it sets x-secret on every response
/// before the plugin sees it (the response passes the chain from the inside out).
const SECRET_HEADER: &str =
    "[[middleware]]\ntype = \"headers\"\nresponse = { set = { \"x-secret\" = \"s3\" } }\n";

/// What a headers plugin does on `/{entry}/…`: `marker` is its `x-plugin`, `config` its
/// configuration.
async fn assert_headers_plugin(port: u16, entry: &str, marker: &str, config: Option<&str>) {
    let path = format!("/{entry}/echo");
    let resp = send(
        port,
        get_with(&path, &[("x-in", "hello"), ("x-remove-me", "1")]),
    )
    .await;
    assert_eq!(resp.status, 200, "{entry}: {resp:?}");
    let seen = resp.upstream_headers();
    assert_eq!(
        seen.get("x-plugin-saw"),
        Some(&vec!["hello".to_owned()]),
        "{entry}: {seen:?}"
    );
    assert!(!seen.contains_key("x-remove-me"), "{entry}: {seen:?}");
    assert_eq!(resp.header("x-plugin").as_deref(), Some(marker), "{resp:?}");
    assert_eq!(resp.header("x-secret"), None, "{entry}: {resp:?}");
    assert_eq!(
        resp.header("x-plugin-config").as_deref(),
        config,
        "{resp:?}"
    );
    assert_eq!(
        resp.header("x-upstream").as_deref(),
        Some("echo"),
        "the app's own headers pass"
    );

    let resp = get(port, &path).await;
    assert_eq!(
        resp.upstream_headers().get("x-plugin-saw"),
        Some(&vec!["none".to_owned()]),
        "{entry}: without x-in"
    );
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_wasm32_wasip1),
    ignore = "needs the wasm32-wasip1 target (rustup target add wasm32-wasip1)"
)]
async fn a_local_reply_answers_for_the_app_and_is_audited_as_the_entry_s_deny() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let rest = format!("{}{}", entry("gate", "local_reply", ""), audit_to(&events));
    let (up, gh) = proxy_with("", "", &rest).await;

    let refused = get(gh.port, "/gate/refused").await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(refused.text(), "no token\n");
    assert_eq!(refused.header("x-denied-by").as_deref(), Some("plugin"));
    assert_eq!(up.request_count(), 0, "the app was asked");
    assert_denied(
        &event_for(&events, "/gate/refused").await,
        "gate",
        "plugin_denied",
        403,
    );

    let allowed = send(
        gh.port,
        get_with("/gate/allowed", &[("x-token", "let-me-in")]),
    )
    .await;
    assert_eq!(allowed.status, 200, "{allowed:?}");
    assert_eq!(up.request_count(), 1);
    let event = event_for(&events, "/gate/allowed").await;
    assert_eq!(event["decision"], "allow", "{event}");
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_wasm32_wasip1),
    ignore = "needs the wasm32-wasip1 target (rustup target add wasm32-wasip1)"
)]
async fn the_request_body_is_shown_whole_and_may_be_refused() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let rest = format!(
        "{}{}{}",
        entry("rb", "request_body", ""),
        entry("small", "request_body", "max_body = \"16B\""),
        audit_to(&events)
    );
    let (_up, gh) = proxy_with("", "", &rest).await;
    let post = |path: &str, body: &'static str| {
        request("POST", path)
            .header("content-type", "text/plain")
            .body(full(body))
            .unwrap()
    };

    // Held for the plugin while it pauses, passed on to the app all the same.
    let resp = send(gh.port, post("/rb/echo", "hello, plugin")).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("x-body-seen").as_deref(), Some("13"));
    assert!(resp.text().contains("hello, plugin"), "{resp:?}");

    let refused = send(gh.port, post("/rb/no", "this is forbidden here")).await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(refused.text(), "body refused\n");
    assert_eq!(refused.header("x-denied-by").as_deref(), Some("body"));
    assert_denied(
        &event_for(&events, "/rb/no").await,
        "rb",
        "plugin_denied",
        403,
    );

    // More than max_body held for a plugin that pauses: 413.
    let big = send(
        gh.port,
        post("/small/echo", "a body longer than sixteen bytes"),
    )
    .await;
    assert_eq!(big.status, 413, "{big:?}");
    assert_denied(
        &event_for(&events, "/small/echo").await,
        "small",
        "body_too_large",
        413,
    );
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_wasm32_wasip1),
    ignore = "needs the wasm32-wasip1 target (rustup target add wasm32-wasip1)"
)]
async fn trailers_both_ways_pass_through_the_plugin() {
    let rest = wasm_entry("trail", &plugin("trailers"), "", "");
    let (_up, gh) = proxy_with("", "", &rest).await;
    // Over HTTP/2, whose client sends trailers.
    let mut sender = h2_connect(gh.port).await;
    let req = request("POST", &format!("http://127.0.0.1:{}/echo", gh.port))
        .body(with_trailers("hello", &[("x-checksum", "abc123")]))
        .unwrap();
    let resp = collect(sender.send_request(req).await.unwrap()).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let json: Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(
        json["trailers"]["x-plugin-saw"],
        json!(["abc123"]),
        "{json}"
    );
    assert_eq!(json["trailers"]["x-checksum"], json!(["abc123"]), "{json}");

    let req = request("GET", "/trailers")
        .header("te", "trailers")
        .body(empty())
        .unwrap();
    let resp = H1::connect(gh.port).await.send_streaming(req).await;
    let collected = within(
        Duration::from_secs(10),
        "the body",
        resp.into_body().collect(),
    )
    .await
    .unwrap();
    let trailers = collected
        .trailers()
        .cloned()
        .expect("the response's trailers");
    assert_eq!(collected.to_bytes(), "with trailers");
    assert_eq!(trailers["x-up-trailer"], "1");
    assert_eq!(trailers["x-plugin-trailer"], "seen");
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_wasm32_wasip1),
    ignore = "needs the wasm32-wasip1 target (rustup target add wasm32-wasip1)"
)]
async fn a_body_rewrite_replaces_the_whole_response_body() {
    let scope = "paths = [\"/big\", \"/echo\"]";
    let rest = wasm_entry("upper", &plugin("body_rewrite"), scope, "");
    let (_up, gh) = proxy_with("", "", &rest).await;
    // Several pieces (the app sends 64 KiB at a time): the plugin holds them to the end.
    let resp = get(gh.port, "/big?bytes=200000").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body.len(), 200_000);
    assert!(resp.body.iter().all(|&b| b == b'X'), "not upper-cased");

    let resp = get(gh.port, "/echo").await;
    let text = resp.text();
    assert!(text.contains("\"METHOD\":\"GET\""), "{text}");
    assert_eq!(text, text.to_uppercase());
    // Outside its paths the body is the app's.
    let resp = get(gh.port, "/plain/echo").await;
    assert!(resp.text().contains("\"method\":\"GET\""), "{resp:?}");
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_wasm32_wasip1),
    ignore = "needs the wasm32-wasip1 target (rustup target add wasm32-wasip1)"
)]
async fn a_plugin_reads_its_configuration_and_refusing_it_refuses_the_config() {
    let config = r#"configuration = '{"header": "x-tenant", "value": "acme"}'"#;
    let (_up, gh) = proxy_with("", "", &entry("tenant", "config", config)).await;
    let resp = get(gh.port, "/tenant/echo").await;
    assert_eq!(
        resp.upstream_headers().get("x-tenant"),
        Some(&vec!["acme".to_owned()]),
        "{resp:?}"
    );

    for bad in ["not json", r#"{"header": "x-tenant"}"#] {
        let rest = entry("tenant", "config", &format!("configuration = '{bad}'"));
        let out = check(&offline_config(&rest));
        assert_eq!(out.code, Some(2), "{bad}: {}{}", out.stdout, out.stderr);
        assert!(
            out.stderr.contains("middleware[1]") || out.stderr.contains("tenant"),
            "names the entry: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains("configuration"),
            "says the plugin refused its configuration: {}",
            out.stderr
        );
    }
}

/// An auth service for `dispatch_http_call`: `GET /check` with `x-token: good` is 200 with
/// `x-user: alice`, anything else 401.
async fn auth_cluster() -> TestServer {
    TestServer::start(|parts| {
        let token = parts.headers.get("x-token").map(|v| v.as_bytes());
        if parts.method == "GET" && parts.uri.path() == "/check" && token == Some(b"good") {
            reply(200, &[("x-user", "alice")], "")
        } else {
            reply(401, &[], "no")
        }
    })
    .await
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_wasm32_wasip1),
    ignore = "needs the wasm32-wasip1 target (rustup target add wasm32-wasip1)"
)]
async fn an_http_call_to_a_cluster_decides_on_its_answer() {
    let auth = auth_cluster().await;
    let down = format!("http://127.0.0.1:{}", free_port());
    let rest = format!(
        "{}{}{}",
        entry(
            "call",
            "http_call",
            &format!("clusters = {{ auth = \"{}\" }}", auth.url(""))
        ),
        entry(
            "down",
            "http_call",
            &format!("clusters = {{ auth = \"{down}\" }}")
        ),
        entry("nocluster", "http_call", ""),
    );
    let (up, gh) = proxy_with("", "", &rest).await;

    let resp = send(gh.port, get_with("/call/echo", &[("x-token", "good")])).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        resp.upstream_headers().get("x-user"),
        Some(&vec!["alice".to_owned()])
    );
    assert_eq!(auth.hits(), 1);

    let resp = send(gh.port, get_with("/call/echo", &[("x-token", "bad")])).await;
    assert_eq!(
        (resp.status.as_u16(), resp.text().as_str()),
        (403, "auth said no\n"),
        "{resp:?}"
    );
    assert_eq!(resp.header("x-denied-by").as_deref(), Some("plugin"));
    assert_eq!(auth.hits(), 2);

    // Nothing listens on the cluster: the plugin hears of it and refuses.
    let resp = send(gh.port, get_with("/down/echo", &[("x-token", "good")])).await;
    assert_eq!(
        (resp.status.as_u16(), resp.text().as_str()),
        (403, "auth unavailable\n"),
        "{resp:?}"
    );
    // A cluster the entry does not name: the dispatch itself fails, the plugin refuses.
    let resp = send(gh.port, get_with("/nocluster/echo", &[("x-token", "good")])).await;
    assert_eq!(
        (resp.status.as_u16(), resp.text().as_str()),
        (403, "auth unavailable\n"),
        "{resp:?}"
    );
    assert_eq!(
        up.request_count(),
        1,
        "only the allowed request reached the app"
    );
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_wasm32_wasip1),
    ignore = "needs the wasm32-wasip1 target (rustup target add wasm32-wasip1)"
)]
async fn shared_data_is_one_counter_across_the_workers_instances() {
    let (_up, gh) = proxy_with("workers = 2", "", &entry("count", "shared_data", "")).await;
    let mut seen = Vec::new();
    // Each on a connection of its own, so the requests spread over the workers.
    for _ in 0..20 {
        let resp = get(gh.port, "/count/echo").await;
        assert_eq!(resp.status, 200, "{resp:?}");
        seen.push(
            resp.header("x-count")
                .expect("x-count")
                .parse::<u64>()
                .unwrap(),
        );
    }
    assert_eq!(seen, (1..=20).collect::<Vec<u64>>());
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_wasm32_wasip1),
    ignore = "needs the wasm32-wasip1 target (rustup target add wasm32-wasip1)"
)]
async fn queues_tell_their_owner_and_properties_describe_the_request() {
    let rest = format!(
        "[[middleware]]\ntype = \"api_key\"\nkeys = [{{ id = \"ci\", key = \"k3y\" }}]\n\n{}",
        wasm_entry("qp", &plugin("queue_props"), "", "")
    );
    let (_up, gh) = proxy_with("workers = 1", "", &rest).await;
    let resp = send(gh.port, get_with("/echo?x=1", &[("x-api-key", "k3y")])).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    for (name, want) in [
        ("x-prop-path", "/echo?x=1"),
        ("x-prop-method", "GET"),
        ("x-prop-source", "127.0.0.1"),
        ("x-prop-plugin", "qp"),
        ("x-prop-subject", "ci"),
        ("x-prop-code", "200"),
        ("x-prop-set", "set-here"),
    ] {
        assert_eq!(resp.header(name).as_deref(), Some(want), "{name}: {resp:?}");
    }
    // The root context learns of the queued path after the request, from gatehouse's
    // background task; later responses carry what it stored.
    within(
        Duration::from_secs(10),
        "the queued path in shared data",
        async {
            loop {
                let resp = send(gh.port, get_with("/echo?x=2", &[("x-api-key", "k3y")])).await;
                if resp
                    .header("x-last")
                    .is_some_and(|p| p.starts_with("/echo?x="))
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_wasm32_wasip1),
    ignore = "needs the wasm32-wasip1 target (rustup target add wasm32-wasip1)"
)]
async fn plugin_metrics_are_exported_on_the_admin_listener() {
    let admin = free_port();
    let rest = format!(
        "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n{}",
        wasm_entry("meter", &plugin("metric"), "", "")
    );
    let (_up, gh) = proxy_with("", "", &rest).await;
    for path in ["/status/404", "/status/404", "/echo"] {
        get(gh.port, path).await;
    }
    let counter = "gatehouse_plugin_counter_total{middleware=\"meter\",name=\"requests\"}";
    let gauge = "gatehouse_plugin_gauge{middleware=\"meter\",name=\"last_status\"}";
    let sample = |text: &str, series: &str| -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(str::to_owned)
    };
    within(Duration::from_secs(10), "the plugin's metrics", async {
        loop {
            let resp = get(admin, "/metrics").await;
            assert_eq!(resp.status, 200, "{resp:?}");
            let text = resp.text();
            if sample(&text, counter).as_deref() == Some("3") {
                assert_eq!(sample(&text, gauge).as_deref(), Some("200"), "{text}");
                return;
            }
            assert!(
                sample(&text, counter).is_none_or(|n| n.parse::<u64>().unwrap() < 3),
                "{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_wasm32_wasip1),
    ignore = "needs the wasm32-wasip1 target (rustup target add wasm32-wasip1)"
)]
async fn a_timer_ticks_in_the_root_context() {
    let (_up, gh) = proxy_with("", "", &entry("ticks", "timer", "")).await;
    let mut last = None;
    let ticked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let resp = get(gh.port, "/ticks/echo").await;
            assert_eq!(resp.status, 200, "{resp:?}");
            last = resp.header("x-ticks");
            let ticks: u64 = last.as_deref().expect("x-ticks").parse().unwrap();
            if ticks > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        ticked.is_ok(),
        "no on_tick in 10 s of a 50 ms tick period: last x-ticks {last:?}\n{}",
        gh.output()
    );
}

/// The hostile plugin in each mode, once refusing (`on_error = "deny"`) and once letting
/// the request pass (`"allow"`), and a well-behaved plugin beside them.
#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_wasm32_wasip1),
    ignore = "needs the wasm32-wasip1 target (rustup target add wasm32-wasip1)"
)]
async fn hostile_plugins_fail_their_requests_and_nothing_else() {
    let modes = ["loop", "alloc", "trap_response", "bad_pointer"];
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let mut rest = String::new();
    for mode in modes {
        let limits = "max_memory = \"64MiB\"\nfuel_per_call = 20000000";
        for on_error in ["deny", "allow"] {
            rest += &entry(
                &format!("{mode}-{on_error}"),
                "hostile",
                &format!("configuration = \"{mode}\"\non_error = \"{on_error}\"\n{limits}"),
            );
        }
    }
    rest += &entry("fine", "headers", "");
    rest += &audit_to(&events);
    let (up, gh) = proxy_with("workers = 2", "", &rest).await;

    // While one worker runs the loop, requests keep being answered.
    let port = gh.port;
    let looping = tokio::spawn(async move { get(port, "/loop-deny/echo").await });
    for i in 0..4 {
        let resp = get(gh.port, &format!("/fine/{i}")).await;
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.header("x-plugin").as_deref(), Some("headers"));
    }
    let resp = looping.await.unwrap();
    assert_eq!(resp.status, 500, "{resp:?}");
    assert_denied(
        &event_for(&events, "/loop-deny/echo").await,
        "loop-deny",
        "plugin_failed",
        500,
    );

    for mode in modes {
        let denying = format!("{mode}-deny");
        let path = format!("/{denying}/echo");
        let resp = get(gh.port, &path).await;
        assert_eq!(resp.status, 500, "{mode}: {resp:?}");
        assert_denied(
            &event_for(&events, &path).await,
            &denying,
            "plugin_failed",
            500,
        );

        let allowing = format!("{mode}-allow");
        let path = format!("/{allowing}/echo");
        let resp = get(gh.port, &path).await;
        assert_eq!(
            resp.status, 200,
            "{mode} with on_error = \"allow\": {resp:?}"
        );
        assert_eq!(resp.header("x-upstream").as_deref(), Some("echo"));
        let event = event_for(&events, &path).await;
        assert_eq!(
            (&event["decision"], &event["fail_open"]),
            (&json!("allow"), &json!([allowing])),
            "{mode}: {event}"
        );
    }

    // The same entries again: every failure above dropped its instance, and the fresh ones
    // fail (and recover) alike; gatehouse itself is still there.
    let mut statuses = HashMap::new();
    for mode in modes {
        for on_error in ["deny", "allow"] {
            let resp = get(gh.port, &format!("/{mode}-{on_error}/again")).await;
            statuses.insert(format!("{mode}-{on_error}"), resp.status.as_u16());
        }
    }
    let want: HashMap<String, u16> = modes
        .iter()
        .flat_map(|m| [(format!("{m}-deny"), 500), (format!("{m}-allow"), 200)])
        .collect();
    assert_eq!(statuses, want);
    let resp = get(gh.port, "/fine/after").await;
    assert_eq!(resp.header("x-plugin").as_deref(), Some("headers"));
    // The app saw the fine requests, those of the "allow" entries, and those that failed
    // only in the response phase.
    let fine = 4 + 1;
    assert_eq!(up.request_count(), fine + 2 * modes.len() + 2);
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_wasm32_wasip1),
    ignore = "needs the wasm32-wasip1 target (rustup target add wasm32-wasip1)"
)]
async fn a_trapped_instance_is_replaced_not_reused() {
    // One worker: one instance, whose memory counts the requests it served.
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let rest = format!(
        "{}{}",
        entry("counted", "hostile", "configuration = \"count\""),
        audit_to(&events)
    );
    let (_up, gh) = proxy_with("workers = 1", "", &rest).await;
    let count = |resp: &Resp| resp.header("x-instance-count");
    for n in 1..=3 {
        let resp = get(gh.port, "/counted/echo").await;
        assert_eq!(count(&resp), Some(n.to_string()), "{resp:?}");
    }
    let trapped = send(gh.port, get_with("/counted/trap", &[("x-trap", "1")])).await;
    assert_eq!(trapped.status, 500, "{trapped:?}");
    assert_denied(
        &event_for(&events, "/counted/trap").await,
        "counted",
        "plugin_failed",
        500,
    );
    // A fresh instance: its count starts again.
    for n in 1..=2 {
        let resp = get(gh.port, "/counted/echo").await;
        assert_eq!(count(&resp), Some(n.to_string()), "{resp:?}");
    }
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_wasm32_wasip1),
    ignore = "needs the wasm32-wasip1 target (rustup target add wasm32-wasip1)"
)]
async fn a_reload_runs_the_changed_module() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("plugin.wasm");
    std::fs::copy(plugin("headers"), &module).unwrap();
    // The configuration suits both plugins: headers echoes it, config reads it.
    let config = r#"configuration = '{"header": "x-swapped", "value": "yes"}'"#;
    let (_up, gh) = proxy_with("", "", &wasm_entry("swap", &module, "", config)).await;
    let resp = get(gh.port, "/echo").await;
    assert_eq!(
        resp.header("x-plugin").as_deref(),
        Some("headers"),
        "{resp:?}"
    );
    assert!(!resp.upstream_headers().contains_key("x-swapped"));

    std::fs::copy(plugin("config"), &module).unwrap();
    gh.send_signal("HUP");
    let mut last = None;
    let swapped = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let resp = get(gh.port, "/echo").await;
            let done = resp.upstream_headers().get("x-swapped") == Some(&vec!["yes".to_owned()]);
            last = Some(resp);
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        swapped.is_ok(),
        "the new module did not run after SIGHUP: {last:?}\n{}",
        gh.output()
    );
    let resp = last.unwrap();
    assert_eq!(
        resp.header("x-plugin"),
        None,
        "the old module still ran: {resp:?}"
    );
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_wasm32_wasip1),
    ignore = "needs the wasm32-wasip1 target (rustup target add wasm32-wasip1)"
)]
async fn explain_runs_plugins_and_asks_clusters_only_live() {
    let auth = auth_cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    let rest = format!(
        "{}{}",
        entry("gate", "local_reply", ""),
        entry(
            "call",
            "http_call",
            &format!("clusters = {{ auth = \"{}\" }}", auth.url(""))
        ),
    );
    std::fs::write(&config, offline_config(&rest)).unwrap();

    // The local reply: the entry's deny, with the plugin's answer.
    let report = explain_json(&config, &["GET", "/gate/x"]).await;
    let gate = step(&report, "gate");
    assert_eq!(
        (&gate["result"], &gate["reason"], &gate["status"]),
        (&json!("deny"), &json!("plugin_denied"), &json!(403)),
        "{report:#}"
    );
    assert_eq!(
        (&report["status"], &report["denied_by"]),
        (&json!(403), &json!("gate"))
    );
    assert_eq!(
        report["headers"]["x-denied-by"],
        json!(["plugin"]),
        "{report:#}"
    );
    let report = explain_json(&config, &["-H", "x-token: let-me-in", "GET", "/gate/x"]).await;
    assert_eq!(step(&report, "gate")["result"], "continue", "{report:#}");
    assert_eq!(report["status"], 200);

    // The call out: offline it is only reported.
    let args = ["-H", "x-token: good", "GET", "/call/x"];
    let report = explain_json(&config, &args).await;
    let call = step(&report, "call");
    assert_eq!(call["result"], "would_ask", "{report:#}");
    let would = call["would_ask"].as_str().unwrap_or_default();
    assert!(
        would.starts_with("would ask") && would.contains("/check") && would.contains("auth"),
        "{report:#}"
    );
    assert_eq!(auth.hits(), 0, "offline explain asked the cluster");

    // Live: asked, and the plugin decides on the answer.
    let live = [&["--live"], &args[..]].concat();
    let report = explain_json(&config, &live).await;
    let call = step(&report, "call");
    assert_eq!(call["result"], "continue", "{report:#}");
    assert!(
        call["changes"].to_string().contains("alice"),
        "the x-user the answer named: {report:#}"
    );
    assert_eq!(report["status"], 200);
    assert_eq!(auth.hits(), 1);
    let live = ["--live", "-H", "x-token: bad", "GET", "/call/x"];
    let report = explain_json(&config, &live).await;
    assert_eq!(
        (
            &report["status"],
            &report["denied_by"],
            &report["deny_reason"]
        ),
        (&json!(403), &json!("call"), &json!("plugin_denied")),
        "{report:#}"
    );
}

#[test]
#[cfg_attr(
    not(gatehouse_has_wasm32_wasip1),
    ignore = "needs the wasm32-wasip1 target (rustup target add wasm32-wasip1)"
)]
fn check_names_a_module_that_is_missing_or_not_webassembly() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.wasm");
    let not_wasm = dir.path().join("not.wasm");
    std::fs::write(&not_wasm, "(module) but as text, not a binary module\n").unwrap();
    for module in [&missing, &not_wasm] {
        let out = check(&offline_config(&wasm_entry("tenant", module, "", "")));
        assert_eq!(out.code, Some(2), "{}{}", out.stdout, out.stderr);
        assert!(
            out.stderr.contains(&module.display().to_string()),
            "names the file: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains("middleware[1]"),
            "names the entry: {}",
            out.stderr
        );
    }
    // The well-formed plugin passes.
    let out = check(&offline_config(&entry("tenant", "headers", "")));
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
}
