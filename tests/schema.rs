//! `gatehouse schema`: the committed `deploy/proxy.schema.json` (what the shipped configs'
//! `#:schema` lines point editors at) is what the binary prints; it is a valid draft-07
//! schema; every config shipped in the repository validates against it with a real
//! validator; and the schema and the loader agree: configs the loader refuses for their
//! shape the schema refuses too, and a config using every middleware and sink type passes
//! both.

mod common;

use std::path::{Path, PathBuf};

use common::cli;
use serde_json::Value;

const COMMITTED: &str = "deploy/proxy.schema.json";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// What `gatehouse schema` prints, parsed.
fn printed() -> (String, Value) {
    let out = cli(&["schema"], &[], None);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let schema = serde_json::from_str(&out.stdout).expect("gatehouse schema prints JSON");
    (out.stdout, schema)
}

fn validator() -> jsonschema::Validator {
    let (_, schema) = printed();
    jsonschema::draft7::new(&schema).expect("the schema compiles")
}

/// The problems `validator` finds in the TOML `source`, one line each.
fn problems(validator: &jsonschema::Validator, source: &str) -> Vec<String> {
    let value: toml::Value = toml::from_str(source).expect("the test's TOML parses");
    let json = serde_json::to_value(value).expect("TOML converts to JSON");
    validator
        .iter_errors(&json)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

#[test]
fn the_committed_schema_is_what_the_binary_prints() {
    let (stdout, schema) = printed();
    let committed = std::fs::read_to_string(root().join(COMMITTED)).unwrap();
    assert!(
        committed == stdout,
        "{COMMITTED} is stale: regenerate it with `cargo run -- schema > {COMMITTED}`"
    );
    assert!(
        jsonschema::draft7::meta::is_valid(&schema),
        "not a valid draft-07 schema"
    );
    assert_eq!(schema["$schema"], "http://json-schema.org/draft-07/schema#");
}

#[test]
fn the_schema_describes_keys_with_defaults_and_tells_middleware_types_apart() {
    let (_, schema) = printed();
    let server = &schema["properties"]["server"]["properties"];
    assert_eq!(server["header_read_timeout"]["default"], "10s");
    assert!(server["header_read_timeout"]["description"]
        .as_str()
        .is_some_and(|d| d.contains("request head")));
    assert_eq!(
        schema["required"],
        serde_json::json!(["server", "upstream"])
    );

    let types: Vec<&Value> = schema["properties"]["middleware"]["items"]["oneOf"]
        .as_array()
        .expect("middleware items are a oneOf")
        .iter()
        .collect();
    let kinds: Vec<&str> = types
        .iter()
        .map(|t| {
            t["properties"]["type"]["const"]
                .as_str()
                .expect("a const type")
        })
        .collect();
    // One branch per type `check` accepts (the list its unknown-type error gives).
    let (_, err) = check("[[middleware]]\ntype = \"?\"\n");
    let listed = err
        .split("expected one of ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .expect("the known types are listed");
    assert_eq!(kinds.join(", "), listed.trim());

    let timing = types
        .iter()
        .find(|t| t["properties"]["type"]["const"] == "timing")
        .unwrap();
    assert_eq!(timing["additionalProperties"], false);
    assert_eq!(timing["required"], serde_json::json!(["type"]));
    for key in [
        "header",
        "format",
        "server_timing",
        "name",
        "paths",
        "skip_paths",
        "methods",
    ] {
        assert!(
            timing["properties"].get(key).is_some(),
            "timing has no {key}"
        );
    }
    assert_eq!(timing["properties"]["header"]["default"], "x-response-time");
}

/// Every TOML file of the repository that is a config: `proxy.toml` and every `*.toml`
/// under `deploy/` and `tests/fixtures/` but the `gatehouse test` case files and the
/// test plugins' cargo manifests.
fn shipped_configs() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "toml") && !path.ends_with("Cargo.toml")
            {
                let source = std::fs::read_to_string(&path).unwrap();
                let value: toml::Value =
                    toml::from_str(&source).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                if value.get("case").is_none() {
                    out.push(path);
                }
            }
        }
    }
    let mut found = vec![root().join("proxy.toml")];
    walk(&root().join("deploy"), &mut found);
    walk(&root().join("tests/fixtures"), &mut found);
    found
}

#[test]
fn every_shipped_config_validates_and_points_at_the_schema() {
    let validator = validator();
    let configs = shipped_configs();
    assert!(configs.len() >= 5, "{configs:?}");
    for path in configs {
        let source = std::fs::read_to_string(&path).unwrap();
        let found = problems(&validator, &source);
        assert!(
            found.is_empty(),
            "{}:\n{}",
            path.display(),
            found.join("\n")
        );
        // Taplo reads the directive on the first line, relative to the file.
        let directive = source.lines().next().unwrap_or_default();
        let target = directive
            .strip_prefix("#:schema ")
            .unwrap_or_else(|| panic!("{}: no #:schema first line", path.display()));
        let target = path.parent().unwrap().join(target);
        assert_eq!(
            target.canonicalize().unwrap(),
            root().join(COMMITTED).canonicalize().unwrap(),
            "{}",
            path.display()
        );
    }
}

/// Writes `body` after a minimal `[server]` and `[upstream]`; the directory goes with the
/// returned guard.
fn write_config(body: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let source = format!(
        "[server]\nlisten = \"127.0.0.1:8080\"\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n{body}"
    );
    std::fs::write(&path, source).unwrap();
    (dir, path)
}

/// The loader's verdict on `body` (after the minimal sections): `check`'s exit code.
fn check(body: &str) -> (Option<i32>, String) {
    let (_dir, path) = write_config(body);
    let out = cli(&["check", "--config", path.to_str().unwrap()], &[], None);
    (out.code, out.stderr)
}

const BCRYPT: &str = "$2y$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW";

#[test]
fn a_config_using_every_type_passes_both_the_schema_and_the_loader() {
    let body = format!(
        r#"
[admin]
listen = "127.0.0.1:9901"
upstream_check = "2s"

[log]
format = "text"
level = "info,gatehouse=debug"

[tracing]
endpoint = "http://127.0.0.1:4318"
service_name = "edge"
sample_ratio = 0.5
headers = {{ authorization = "Bearer x" }}
resource_attributes = {{ team = "a" }}

[audit]
include = "denied"
request_headers = ["user-agent"]
spool_dir = "/tmp/gatehouse-spool"
spool_max_bytes = "1GiB"

[[audit.sinks]]
type = "stdout"

[[audit.sinks]]
type = "file"
name = "local"
path = "/tmp/audit.jsonl"

[[audit.sinks]]
type = "http"
url = "http://127.0.0.1:9000/events"
retries = 2
backoff = "100ms"

[[audit.sinks]]
type = "redis_stream"
url = "redis://127.0.0.1:6379"
maxlen = 1000

[[audit.sinks]]
type = "otlp"
url = "http://127.0.0.1:4318/v1/logs"

[[middleware]]
type = "request_id"
trust_incoming = false

[[middleware]]
type = "timing"
format = "seconds"

[[middleware]]
type = "headers"
response = {{ set = {{ "x-frame-options" = "DENY" }}, remove = ["server"] }}

[[middleware]]
type = "ip_filter"
deny = ["10.9.0.0/16"]

[[middleware]]
type = "cors"
allow_origins = ["https://app.example.com"]
allow_methods = ["GET", "POST"]
max_age = "10m"

[[middleware]]
type = "body_limit"
max = "${{BODY_MAX:-1MiB}}"
paths = ["/upload/**"]
methods = ["POST", "PUT"]

[[middleware]]
type = "rate_limit"
rate = "100/s"
burst = 20
key = "header:x-api-key"

[[middleware]]
type = "api_key"
header = "x-api-key"
keys = [{{ id = "ci", key = "k" }}]
skip_paths = ["/healthz"]

[[middleware]]
type = "basic_auth"
name = "admin-auth"
users = [{{ user = "ops", password_hash = "{BCRYPT}" }}]
paths = ["/admin/**"]

[[middleware]]
type = "jwt"
algorithms = ["HS256"]
secret = "s3cret"
audiences = ["api"]
forward_claims = {{ sub = "x-user" }}

[[middleware]]
type = "forward_auth"
url = "http://127.0.0.1:9001/auth"
copy_headers = ["x-user"]
"#
    );
    let (code, stderr) = check(&body);
    assert_eq!(code, Some(0), "{stderr}");
    let (_dir, path) = write_config(&body);
    let source = std::fs::read_to_string(path).unwrap();
    let found = problems(&validator(), &source);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn configs_the_loader_refuses_for_their_shape_the_schema_refuses() {
    let validator = validator();
    for body in [
        "bogus = 1\n",
        "[log]\nformat = \"jsn\"\n",
        "[admin]\nupstream_check = \"1s\"\n",
        "[tracing]\nendpoint = \"\"\nsample_ratio = \"high\"\n",
        "[[middleware]]\ntype = \"rate_limt\"\nrate = \"1/s\"\n",
        "[[middleware]]\nrate = \"1/s\"\n",
        "[[middleware]]\ntype = \"rate_limit\"\n",
        "[[middleware]]\ntype = \"rate_limit\"\nrate = \"10 per second\"\n",
        "[[middleware]]\ntype = \"timing\"\nheder = \"x-t\"\n",
        "[[middleware]]\ntype = \"body_limit\"\nmax = \"10 parsecs\"\n",
        "[[middleware]]\ntype = \"body_limit\"\npaths = [\"upload\"]\n",
        "[[middleware]]\ntype = \"request_id\"\ntrust_incoming = \"yes\"\n",
        "[audit]\n[[audit.sinks]]\ntype = \"kafka\"\n",
        "[audit]\n[[audit.sinks]]\ntype = \"file\"\n",
    ] {
        let (code, stderr) = check(body);
        assert_eq!(code, Some(2), "the loader took:\n{body}\n{stderr}");
        let (_dir, path) = write_config(body);
        let source = std::fs::read_to_string(path).unwrap();
        assert!(
            !problems(&validator, &source).is_empty(),
            "the schema took:\n{body}\nwhich the loader refuses:\n{stderr}"
        );
    }
    // Without [server] the loader and the schema both refuse.
    let found = problems(&validator, "[upstream]\nurl = \"http://127.0.0.1:8000\"\n");
    assert!(
        found.iter().any(|p| p.contains("server")),
        "{}",
        found.join("\n")
    );
}
