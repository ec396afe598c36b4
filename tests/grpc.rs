//! gRPC through the real binary: the example app (`deploy/examples/grpc/app.py`, plain
//! grpcio) behind gatehouse with `upstream.protocol = "h2c"`, called by the example's client
//! (`client.py`, grpcio too), which prints each call's outcome as JSON. Unary, server-,
//! client- and bidirectional streaming calls, 16 MiB messages, metadata auth, rate limits,
//! deadlines, a dead app, the health service, TLS with ALPN h2, HTTP/1.1 clients and the
//! audit's `grpc_status`.
//!
//! Python runs from a venv the tests create in `target/grpc-venv` (reused while the
//! example's `requirements.txt` is unchanged); grpcio-tools turns `demo.proto` into stubs as
//! the app and the client start. Installing needs PyPI: without it these tests fail saying
//! so, they never pass silently.
//!
//! The tests named `example_*` run the example's own `proxy.toml`, as
//! tests/fastapi_example.rs does for the FastAPI example.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const EXAMPLE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/examples/grpc");
const API_KEY: &str = "grpc-example-key-7d1e";
/// The key's `id` in the example proxy.toml: the subject of authenticated calls.
const KEY_ID: &str = "example-client";
const MIB: usize = 1 << 20;

fn python() -> PathBuf {
    python_venv("grpc-venv", "deploy/examples/grpc/requirements.txt").join("bin/python")
}

/// The example's gRPC app, on loopback TCP or a Unix socket, killed on drop.
struct App {
    child: Child,
    /// `upstream.url` for it.
    url: String,
    log: tempfile::NamedTempFile,
    _dir: Option<tempfile::TempDir>,
}

impl App {
    async fn start(envs: &[(&str, &str)]) -> App {
        let port = free_port();
        let app = App::spawn(
            &format!("127.0.0.1:{port}"),
            format!("http://127.0.0.1:{port}"),
            envs,
            None,
        );
        app.wait_until(|| async move { TcpStream::connect(("127.0.0.1", port)).await.is_ok() })
            .await;
        app
    }

    async fn start_unix() -> App {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.sock");
        let app = App::spawn(
            &format!("unix:{}", path.display()),
            format!("unix:{}", path.display()),
            &[],
            Some(dir),
        );
        app.wait_until(|| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(&path).await.is_ok() }
        })
        .await;
        app
    }

    fn spawn(
        listen: &str,
        url: String,
        envs: &[(&str, &str)],
        dir: Option<tempfile::TempDir>,
    ) -> App {
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(python())
            .arg("app.py")
            .current_dir(EXAMPLE_DIR)
            .env("LISTEN", listen)
            .env("PYTHONDONTWRITEBYTECODE", "1") // no __pycache__ in the source tree
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("start the example app");
        App {
            child,
            url,
            log,
            _dir: dir,
        }
    }

    async fn wait_until<F, Fut>(&self, listening: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !listening().await {
            assert!(
                Instant::now() < deadline,
                "the app did not listen within 30s\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One call by the example's client; `flags` go before the call (`--api-key K`...). Returns
/// the JSON it printed.
async fn call(port: u16, flags: &[&str], args: &[&str]) -> Value {
    let out = within(
        STEP,
        "client.py",
        tokio::process::Command::new(python())
            .arg("client.py")
            .arg("--target")
            .arg(format!("127.0.0.1:{port}"))
            .args(flags)
            .args(args)
            .current_dir(EXAMPLE_DIR)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("run client.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "client.py {args:?}: {e}\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The call succeeded: its result.
fn ok(out: &Value) -> &Value {
    assert_eq!(out["ok"], true, "the call failed: {out}");
    &out["result"]
}

/// The call failed with gRPC status `code` (and its number `value`); returns the details.
fn failed(out: &Value, code: &str, value: u64) -> String {
    assert_eq!(out["ok"], false, "the call succeeded: {out}");
    assert_eq!(out["code"], code, "{out}");
    assert_eq!(out["code_value"], value, "{out}");
    out["details"].as_str().unwrap_or_default().to_owned()
}

/// A metadata value of the call (initial or trailing: a trailers-only answer has only the
/// latter).
fn metadata(out: &Value, name: &str) -> Option<String> {
    ["initial_metadata", "trailing_metadata"]
        .iter()
        .filter_map(|part| out[part].as_array())
        .flatten()
        .find(|pair| pair[0] == name)
        .map(|pair| pair[1].as_str().unwrap().to_owned())
}

/// The example's app behind gatehouse with the example's proxy.toml.
struct Example {
    app: App,
    gh: Gatehouse,
    audit_dir: tempfile::TempDir,
}

impl Example {
    async fn start(rate_limit: &str) -> Example {
        let app = App::start(&[]).await;
        let template = std::fs::read_to_string(Path::new(EXAMPLE_DIR).join("proxy.toml"))
            .expect("read the example proxy.toml");
        let audit_dir = tempfile::tempdir().unwrap();
        let port = free_port().to_string();
        let listen = format!("127.0.0.1:{port}");
        let admin = format!("127.0.0.1:{}", free_port());
        let audit_file = audit_dir.path().join("audit.jsonl");
        let mut gh = Gatehouse::spawn(
            &template,
            &[("port", &port)],
            &[
                ("GATEHOUSE_LISTEN", &listen),
                ("ADMIN_LISTEN", &admin),
                ("APP_URL", &app.url),
                ("API_KEY", API_KEY),
                ("RATE_LIMIT", rate_limit),
                ("AUDIT_FILE", audit_file.to_str().unwrap()),
            ],
        );
        gh.wait_ready().await;
        Example { app, gh, audit_dir }
    }

    async fn call(&self, args: &[&str]) -> Value {
        call(self.gh.port, &["--api-key", API_KEY], args).await
    }
}

/// gatehouse with `config(server, upstream, rest)` in front of `app`, speaking h2c to it.
async fn gatehouse(app_url: &str, server: &str, upstream: &str, rest: &str) -> Gatehouse {
    let upstream = format!("protocol = \"h2c\"\n{upstream}");
    Gatehouse::start(
        &config(&format!("workers = 1\n{server}"), &upstream, rest),
        &[("upstream", app_url)],
    )
    .await
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn example_calls_of_every_kind_pass_through() {
    let ex = Example::start("1000/s").await;
    let echo = ex.call(&["echo", "hello"]).await;
    let reply = ok(&echo);
    assert_eq!(reply["text"], "hello");
    let seen = &reply["seen"];
    let id = metadata(&echo, "x-request-id").expect("x-request-id metadata");
    assert!(is_uuid(&id), "{echo}");
    assert_eq!(seen["x-request-id"], id.as_str(), "the app got the same id");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert!(
        seen.get("x-api-key").is_none(),
        "the key was stripped: {seen}"
    );
    assert!(metadata(&echo, "x-response-time").is_some(), "{echo}");

    let count = ex.call(&["count", "5", "1000"]).await;
    assert_eq!(
        *ok(&count),
        serde_json::json!({"messages": 5, "bytes": 5000})
    );
    let collect = ex.call(&["collect", "5", "1000"]).await;
    assert_eq!(
        *ok(&collect),
        serde_json::json!({"messages": 5, "bytes": 5000})
    );
    // Lock step: each message leaves only once the previous one came back, so this ends
    // only if both directions are open at once.
    let chat = ex.call(&["chat", "5", "1000"]).await;
    assert_eq!(
        *ok(&chat),
        serde_json::json!({"messages": 5, "bytes": 5000})
    );
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn example_api_key_refusals_are_unauthenticated() {
    let ex = Example::start("1000/s").await;
    for flags in [&[][..], &["--api-key", "not-the-key"][..]] {
        let out = call(ex.gh.port, flags, &["echo", "never"]).await;
        let details = failed(&out, "UNAUTHENTICATED", 16);
        assert!(!details.is_empty(), "gatehouse's message: {out}");
        assert_eq!(
            metadata(&out, "www-authenticate").as_deref(),
            Some("ApiKey")
        );
        assert!(metadata(&out, "x-request-id").is_some(), "{out}");
        assert!(metadata(&out, "x-response-time").is_some(), "{out}");
    }
    ok(&ex.call(&["echo", "with the key"]).await);
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn example_rate_limit_is_resource_exhausted() {
    let ex = Example::start("1/h").await;
    let mut allowed = 0;
    let limited = loop {
        let out = ex.call(&["echo", "again"]).await;
        if out["ok"] == false {
            break out;
        }
        allowed += 1;
        assert!(allowed <= 6, "no refusal after {allowed} calls");
    };
    assert_eq!(allowed, 5, "the burst is 5");
    failed(&limited, "RESOURCE_EXHAUSTED", 8);
    let retry: u64 = metadata(&limited, "retry-after")
        .expect("retry-after metadata")
        .parse()
        .expect("whole seconds");
    assert!(retry >= 1);
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn example_health_service_passes_through_without_a_key() {
    let ex = Example::start("1000/s").await;
    for service in ["", "demo.v1.Demo"] {
        let out = call(ex.gh.port, &[], &["health", service]).await;
        assert_eq!(ok(&out)["status"], "SERVING", "{out}");
    }
    // The app's own answer for a service it does not know.
    let out = call(ex.gh.port, &[], &["health", "nope"]).await;
    failed(&out, "NOT_FOUND", 5);
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn example_audit_events_carry_grpc_status() {
    let mut ex = Example::start("1000/s").await;
    let allowed = ex.call(&["echo", "fine"]).await;
    ok(&allowed);
    let app_error = ex.call(&["echo", "fail:NOT_FOUND:no such thing"]).await;
    assert_eq!(failed(&app_error, "NOT_FOUND", 5), "no such thing");
    let denied = call(ex.gh.port, &[], &["echo", "no key"]).await;
    failed(&denied, "UNAUTHENTICATED", 16);
    let plain = get(ex.gh.port, "/not-grpc").await;
    assert_eq!(plain.status, 401, "{plain:?}");
    ex.gh.send_signal("TERM");
    ex.gh.assert_exits_with(0).await;

    let path = ex.audit_dir.path().join("audit.jsonl");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("audit file: {e}\n{}", ex.gh.output()));
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let event_for = |id: String| {
        let found: Vec<_> = events.iter().filter(|e| e["request_id"] == id).collect();
        assert_eq!(found.len(), 1, "one event for {id}:\n{text}");
        found[0].clone()
    };
    let id = |out: &Value| metadata(out, "x-request-id").expect("x-request-id");

    let e = event_for(id(&allowed));
    assert_eq!(
        (&e["grpc_status"], &e["decision"], &e["status"]),
        (&0.into(), &"allow".into(), &200.into()),
        "{e}"
    );
    assert_eq!(e["path"], "/demo.v1.Demo/Echo");
    assert_eq!(e["subject"], KEY_ID);
    assert!(e["bytes_in"].as_u64().unwrap() > 0, "{e}");
    let e = event_for(id(&app_error));
    assert_eq!(
        (&e["grpc_status"], &e["decision"]),
        (&5.into(), &"allow".into())
    );
    let e = event_for(id(&denied));
    assert_eq!(
        (&e["grpc_status"], &e["decision"], &e["status"]),
        (&16.into(), &"deny".into(), &200.into()),
        "{e}"
    );
    assert_eq!(e["denied_by"], "api_key");
    let e = event_for(plain.header("x-request-id").unwrap());
    assert!(e["grpc_status"].is_null(), "not a gRPC call: {e}");
    drop(ex.app);
}

#[test]
fn example_config_passes_gatehouse_check() {
    let out = cli(
        &["check", "--config", &format!("{EXAMPLE_DIR}/proxy.toml")],
        &[("API_KEY", API_KEY)],
        None,
    );
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("over h2c"), "{}", out.stdout);
}

/// 16 MiB messages each way: gatehouse forwards them in flow-controlled pieces, so its
/// memory grows by less than one message.
#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn large_messages_stream_with_flat_memory() {
    let ex = Example::start("1000/s").await;
    ok(&ex.call(&["echo", "warm"]).await);
    let before = ex.gh.peak_rss_kib();
    let size = (16 * MIB).to_string();
    let total = serde_json::json!({"messages": 4, "bytes": 64 * MIB});
    for kind in ["collect", "count", "chat"] {
        let out = ex.call(&[kind, "4", &size]).await;
        assert_eq!(*ok(&out), total, "{kind}");
    }
    let grown = ex.gh.peak_rss_kib().saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "peak RSS grew by {grown} KiB moving 16 MiB messages: a message was held whole"
    );
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn jwt_bearer_metadata_allowed_and_denied() {
    let app = App::start(&[]).await;
    let rest = r#"
[[middleware]]
type = "jwt"
algorithms = ["HS256"]
secret = "grpc-test-secret"
require_claims = { scope = "calls" }
"#;
    let gh = gatehouse(&app.url, "", "", rest).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = |claims: Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"grpc-test-secret"),
        )
        .unwrap()
    };
    let good = token(serde_json::json!({"sub": "svc", "scope": "calls", "exp": now + 600}));
    ok(&call(gh.port, &["--bearer", &good], &["echo", "hi"]).await);
    let expired = token(serde_json::json!({"sub": "svc", "scope": "calls", "exp": now - 600}));
    failed(
        &call(gh.port, &["--bearer", &expired], &["echo", "hi"]).await,
        "UNAUTHENTICATED",
        16,
    );
    failed(
        &call(gh.port, &[], &["echo", "hi"]).await,
        "UNAUTHENTICATED",
        16,
    );
    let wrong_scope = token(serde_json::json!({"sub": "svc", "scope": "other", "exp": now + 600}));
    failed(
        &call(gh.port, &["--bearer", &wrong_scope], &["echo", "hi"]).await,
        "PERMISSION_DENIED",
        7,
    );
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn upstream_timeout_is_deadline_exceeded() {
    let app = App::start(&[]).await;
    let gh = gatehouse(&app.url, "", "timeout = \"300ms\"", "").await;
    // The client's own deadline is far off: the answer is gatehouse's.
    let out = call(gh.port, &["--timeout", "60"], &["echo", "slow", "5000"]).await;
    let details = failed(&out, "DEADLINE_EXCEEDED", 4);
    assert!(details.contains("did not answer in time"), "{details}");
}

/// `grpc-timeout` bounds the wait even when `upstream.timeout` is long. The app here (the
/// harness's h2c upstream) does not enforce the deadline itself, as a gRPC server would, so
/// the answer can only be gatehouse's.
#[tokio::test]
async fn grpc_timeout_bounds_the_upstream_wait() {
    let up = Upstream::start().await;
    let gh = gatehouse(&up.url(), "", "timeout = \"60s\"", "").await;
    let mut sender = h2_connect(gh.port).await;
    let grpc_call = |timeout: &str| {
        http::Request::post(format!("http://127.0.0.1:{}/slow?ms=30000", gh.port))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("grpc-timeout", timeout)
            .body(full(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap()
    };
    let resp = within(STEP, "answer", sender.send_request(grpc_call("200m")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    assert_eq!(resp.headers()["grpc-status"], "4", "{resp:?}");
    assert!(resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .is_empty());
    // A malformed grpc-timeout is no deadline (as for gRPC servers): the app answers.
    let fast = http::Request::post(format!("http://127.0.0.1:{}/echo", gh.port))
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "soon")
        .body(full(Bytes::new()))
        .unwrap();
    let resp = within(STEP, "answer", sender.send_request(fast))
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-upstream"], "echo");
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn app_down_is_unavailable() {
    let nothing = format!("http://127.0.0.1:{}", free_port());
    let gh = gatehouse(&nothing, "", "", "").await;
    let out = call(gh.port, &[], &["echo", "anyone?"]).await;
    let details = failed(&out, "UNAVAILABLE", 14);
    assert!(details.contains("refused"), "{details}");
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn tls_with_alpn_h2_from_the_client() {
    let app = App::start(&[]).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let server = format!(
        "[server.tls]\ncert = \"{}\"\nkey = \"{}\"",
        cert_file.display(),
        key_file.display()
    );
    let rest = format!(
        "[[middleware]]\ntype = \"api_key\"\nkeys = [{{ id = \"c\", key = \"{API_KEY}\" }}]"
    );
    let gh = gatehouse(&app.url, &server, "", &rest).await;
    let ca = cert_file.to_str().unwrap();
    let out = call(
        gh.port,
        &["--tls-ca", ca, "--api-key", API_KEY],
        &["echo", "hi"],
    )
    .await;
    assert_eq!(ok(&out)["seen"]["x-forwarded-proto"], "https");
    let out = call(gh.port, &["--tls-ca", ca], &["chat", "3", "100"]).await;
    failed(&out, "UNAUTHENTICATED", 16);
}

/// An HTTP/1.1 client that accepts trailers gets the app's status in chunked trailers, and
/// gatehouse's own answer as a gRPC status too.
#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn http1_client_gets_trailers_and_grpc_answers() {
    let app = App::start(&[]).await;
    let rest = format!(
        "[[middleware]]\ntype = \"api_key\"\nkeys = [{{ id = \"c\", key = \"{API_KEY}\" }}]"
    );
    let gh = gatehouse(&app.url, "", "", &rest).await;
    // Echo(Message{text: "hi"}), one length-prefixed message.
    let message = b"\0\0\0\0\x04\x0a\x02hi";
    let grpc_call = |key: &str| {
        request("POST", "/demo.v1.Demo/Echo")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-api-key", key)
            .body(full(Bytes::from_static(message)))
            .unwrap()
    };
    let mut conn = H1::connect(gh.port).await;
    let resp = conn.send_streaming(grpc_call(API_KEY)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    let mut body = resp.into_body();
    let (mut data, mut trailers) = (Vec::new(), None);
    while let Some(frame) = within(STEP, "body", body.frame()).await {
        let frame = frame.expect("body frame");
        match frame.into_data() {
            Ok(bytes) => data.extend_from_slice(&bytes),
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    assert_eq!(data[0], 0, "an uncompressed message");
    assert!(data.windows(2).any(|w| w == b"hi"), "{data:?}");
    let trailers = trailers.expect("trailers");
    assert_eq!(trailers["grpc-status"], "0", "{trailers:?}");

    let denied = conn.send(grpc_call("wrong")).await;
    assert_eq!(denied.status, 200);
    assert_eq!(denied.header("grpc-status").as_deref(), Some("16"));
    assert_eq!(
        denied.header("content-type").as_deref(),
        Some("application/grpc")
    );
    assert!(denied.body.is_empty());
}

#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn unix_socket_app() {
    let app = App::start_unix().await;
    let gh = gatehouse(&app.url, "", "", "").await;
    let out = call(gh.port, &[], &["chat", "3", "100"]).await;
    assert_eq!(*ok(&out), serde_json::json!({"messages": 3, "bytes": 300}));
}

/// Calls share one connection to the app, up to its `SETTINGS_MAX_CONCURRENT_STREAMS`.
#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn app_stream_limit_opens_more_connections() {
    for (limit, more) in [(None, false), (Some("2"), true)] {
        let envs: Vec<(&str, &str)> = limit
            .map(|l| ("MAX_CONCURRENT_STREAMS", l))
            .into_iter()
            .collect();
        let app = App::start(&envs).await;
        let gh = gatehouse(&app.url, "", "", "").await;
        let out = call(gh.port, &[], &["parallel", "6", "2000"]).await;
        let peers = ok(&out)["peers"].as_array().unwrap().len();
        if more {
            assert!(
                peers > 1,
                "limit 2, six calls at once, {peers} connection(s): {out}"
            );
        } else {
            assert_eq!(peers, 1, "no limit: one connection: {out}");
        }
    }
}

/// With `protocol = "h2c"`, a WebSocket upgrade still reaches the app over HTTP/1.1.
#[tokio::test]
async fn upgrades_still_take_http1() {
    let up = Upstream::start().await;
    let gh = gatehouse(&up.url(), "", "", "").await;
    let mut conn = H1::connect(gh.port).await;
    let resp = conn.send_streaming(websocket_request("/ws")).await;
    assert_eq!(resp.status(), 101, "{resp:?}");
    let upgraded = within(STEP, "upgrade", hyper::upgrade::on(resp))
        .await
        .expect("upgraded connection");
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    io.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    within(STEP, "echo", io.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"ping");
    // And a plain request goes over HTTP/2.
    let echo = get(gh.port, "/echo").await;
    assert_eq!(echo.status, 200);
    assert_eq!(echo.json()["headers"]["x-forwarded-for"][0], "127.0.0.1");
}

/// A body phase's refusal stops a stream that hyper's task was sending: the client gets
/// RESOURCE_EXHAUSTED, and the app never a whole body.
#[tokio::test]
#[cfg_attr(
    not(gatehouse_has_python_venv),
    ignore = "needs python3 with venv (apt-get install python3-venv) and PyPI"
)]
async fn body_limit_is_resource_exhausted() {
    let app = App::start(&[]).await;
    let rest = "[[middleware]]\ntype = \"body_limit\"\nmax = \"64KiB\"";
    let gh = gatehouse(&app.url, "", "", rest).await;
    let out = call(gh.port, &[], &["collect", "8", "100000"]).await;
    failed(&out, "RESOURCE_EXHAUSTED", 8);
    ok(&call(gh.port, &[], &["collect", "2", "1000"]).await);
}
