//! `[tracing]`: OpenTelemetry spans over OTLP/HTTP, with the SDK's environment variables as
//! defaults (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`),
//! so a pod already set up for OpenTelemetry needs only `[tracing]` itself.

use std::collections::BTreeMap;

use http::Uri;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::config::value::{Duration, HeaderPairs};
use crate::config::{KeyPath, Problem};

/// The validated `[tracing]` section; fixed at start, like `[audit]`.
#[derive(Debug, PartialEq)]
pub struct TracingConfig {
    /// The OTLP/HTTP traces URL: the endpoint with `/v1/traces` appended.
    pub url: Uri,
    /// For traces gatehouse starts; a parent's decision is always followed.
    pub sample_ratio: f64,
    pub headers: HeaderPairs,
    pub resource: Resource,
    /// Requests whose spans may wait for export; beyond, their spans are dropped.
    pub queue_capacity: usize,
    /// Spans per export.
    pub batch_size: usize,
    /// The longest a span waits for its batch to fill.
    pub flush_interval: Duration,
    /// For one export attempt, connecting included.
    pub timeout: Duration,
}

/// What the telemetry is about: `service.name` and the other resource attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub service_name: String,
    /// Every other attribute, sorted by key.
    pub attributes: Vec<(String, String)>,
}

/// `[tracing]`: OpenTelemetry spans over OTLP/HTTP. Spans are exported only when this
/// table is present.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "Tracing")]
pub(crate) struct RawTracing {
    /// The OTLP/HTTP base URL (`/v1/traces` is appended), e.g.
    /// `"http://otel-collector:4318"`; defaults to `$OTEL_EXPORTER_OTLP_ENDPOINT`. Written
    /// empty, nothing is exported: `"${OTEL_EXPORTER_OTLP_ENDPOINT:-}"` exports only where
    /// the variable is set.
    endpoint: Option<String>,
    /// `service.name`; defaults to `$OTEL_SERVICE_NAME`, else `gatehouse`.
    service_name: Option<String>,
    /// The share of traces gatehouse starts that are recorded (0.0 to 1.0); a parent's
    /// decision is always followed.
    #[serde(default = "default_sample_ratio")]
    sample_ratio: f64,
    /// Sent with every export (e.g. `authorization`).
    #[serde(default)]
    headers: HeaderPairs,
    /// Resource attributes, over `$OTEL_RESOURCE_ATTRIBUTES`.
    #[serde(default)]
    resource_attributes: BTreeMap<String, String>,
    /// Requests whose spans may wait for export; beyond, their spans are dropped.
    #[serde(default = "default_queue_capacity")]
    queue_capacity: usize,
    /// Spans per export.
    #[serde(default = "default_batch_size")]
    batch_size: usize,
    /// The longest a span waits for its batch to fill.
    #[serde(default = "default_flush_interval")]
    flush_interval: Duration,
    /// For one export attempt, connecting included.
    #[serde(default = "default_timeout")]
    timeout: Duration,
}

fn default_sample_ratio() -> f64 {
    1.0
}
// The OpenTelemetry SDKs' batch span processor defaults.
fn default_queue_capacity() -> usize {
    2048
}
fn default_batch_size() -> usize {
    512
}
fn default_flush_interval() -> Duration {
    Duration(std::time::Duration::from_secs(5))
}
fn default_timeout() -> Duration {
    Duration(std::time::Duration::from_secs(10))
}

/// Where the environment variables' values come from (the process's, or a test's).
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl TracingConfig {
    /// Types and checks `[tracing]`, filling what it leaves out from the environment;
    /// problems are located below `tracing`. `None` when `endpoint` is written empty (as
    /// `"${OTEL_EXPORTER_OTLP_ENDPOINT:-}"` is where the variable is unset): nothing is
    /// exported.
    pub(crate) fn from_raw(
        raw: RawTracing,
        lookup: Lookup,
    ) -> Result<Option<TracingConfig>, Vec<Problem>> {
        let key = |name: &str| KeyPath::default().key(name);
        let mut problems = Vec::new();
        let endpoint = raw
            .endpoint
            .or_else(|| lookup("OTEL_EXPORTER_OTLP_ENDPOINT").filter(|e| !e.is_empty()));
        let url = match endpoint {
            None => {
                problems.push((
                    key("endpoint"),
                    "missing: set `endpoint` (e.g. \"http://otel-collector:4318\") or the environment variable OTEL_EXPORTER_OTLP_ENDPOINT; `endpoint = \"${OTEL_EXPORTER_OTLP_ENDPOINT:-}\"` exports only where it is set".to_owned(),
                ));
                None
            }
            Some(endpoint) if endpoint.is_empty() => None,
            Some(endpoint) => signal_url(&endpoint, "traces")
                .map_err(|m| problems.push((key("endpoint"), m)))
                .ok(),
        };
        if !(0.0..=1.0).contains(&raw.sample_ratio) {
            problems.push((
                key("sample_ratio"),
                format!("{}: expected 0.0 up to 1.0", raw.sample_ratio),
            ));
        }
        if !(1..=1 << 20).contains(&raw.queue_capacity) {
            problems.push((
                key("queue_capacity"),
                format!("{}: expected 1 up to 1048576", raw.queue_capacity),
            ));
        }
        if !(1..=65536).contains(&raw.batch_size) {
            problems.push((
                key("batch_size"),
                format!("{}: expected 1 up to 65536", raw.batch_size),
            ));
        }
        for (name, d) in [
            ("flush_interval", raw.flush_interval),
            ("timeout", raw.timeout),
        ] {
            if d.0.is_zero() {
                problems.push((key(name), "expected a duration above zero".into()));
            }
        }
        let resource = resource(raw.service_name, raw.resource_attributes, lookup)
            .map_err(|m| problems.push((key("resource_attributes"), m)));
        match (url, resource) {
            _ if !problems.is_empty() => Err(problems),
            (Some(url), Ok(resource)) => Ok(Some(TracingConfig {
                url,
                sample_ratio: raw.sample_ratio,
                headers: raw.headers,
                resource,
                queue_capacity: raw.queue_capacity,
                batch_size: raw.batch_size,
                flush_interval: raw.flush_interval,
                timeout: raw.timeout,
            })),
            _ => Ok(None),
        }
    }
}

/// The OTLP/HTTP URL of a signal (`traces`, `logs`) under `endpoint`, the base URL the
/// specification's `OTEL_EXPORTER_OTLP_ENDPOINT` names: `/v1/<signal>` is appended to its path.
pub fn signal_url(endpoint: &str, signal: &str) -> Result<Uri, String> {
    let expected = || {
        format!("invalid endpoint {endpoint:?}: expected an OTLP/HTTP base URL such as \"http://otel-collector:4318\"")
    };
    let uri: Uri = endpoint.parse().map_err(|_| expected())?;
    if uri.scheme_str() == Some("https") {
        return Err(format!(
            "invalid endpoint {endpoint:?}: https is not supported; export to a collector on the pod or node (http://)"
        ));
    }
    if uri.scheme_str() != Some("http") || uri.host().is_none() || uri.query().is_some() {
        return Err(expected());
    }
    let base = uri.path().trim_end_matches('/');
    format!(
        "http://{}{base}/v1/{signal}",
        uri.authority().expect("has a host")
    )
    .parse()
    .map_err(|_| expected())
}

/// The resource: `resource_attributes` over `$OTEL_RESOURCE_ATTRIBUTES`; `service.name` from
/// `service_name`, else `$OTEL_SERVICE_NAME`, else either attribute list's, else `gatehouse`.
pub fn resource(
    service_name: Option<String>,
    attributes: BTreeMap<String, String>,
    lookup: Lookup,
) -> Result<Resource, String> {
    let mut merged = match lookup("OTEL_RESOURCE_ATTRIBUTES") {
        Some(list) => parse_attribute_list(&list)?,
        None => BTreeMap::new(),
    };
    for (key, value) in attributes {
        if key.is_empty() {
            return Err("expected attribute names that are not empty".into());
        }
        merged.insert(key, value);
    }
    let listed = merged.remove("service.name");
    let service_name = service_name
        .or_else(|| lookup("OTEL_SERVICE_NAME"))
        .filter(|s| !s.is_empty())
        .or(listed)
        .unwrap_or_else(|| "gatehouse".into());
    Ok(Resource {
        service_name,
        attributes: merged.into_iter().collect(),
    })
}

/// `key1=value1,key2=value2`, values percent-encoded (the specification's format of
/// `OTEL_RESOURCE_ATTRIBUTES`).
fn parse_attribute_list(list: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let invalid = || {
            format!("OTEL_RESOURCE_ATTRIBUTES: invalid entry {entry:?}: expected key=value (value percent-encoded)")
        };
        let (key, value) = entry.split_once('=').ok_or_else(invalid)?;
        let key = key.trim();
        if key.is_empty() {
            return Err(invalid());
        }
        out.insert(
            key.to_owned(),
            percent_decode(value.trim()).ok_or_else(invalid)?,
        );
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::tests::TestConfig;

    use super::*;

    fn parse_with(tracing: &str, env: &[(&str, &str)]) -> Result<TracingConfig, String> {
        let src = format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n{tracing}"
        );
        let lookup = |name: &str| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        };
        TestConfig::parse(Path::new("proxy.toml"), &src, &lookup)
            .map(|c| c.tracing.expect("a [tracing] section"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_come_from_the_environment() {
        let t = parse_with(
            "[tracing]\n",
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
                ("OTEL_SERVICE_NAME", "edge"),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "deployment.environment=prod, team=a%2Cb",
                ),
            ],
        )
        .unwrap();
        assert_eq!(t.url, "http://collector:4318/v1/traces");
        assert_eq!(t.sample_ratio, 1.0);
        assert_eq!(t.resource.service_name, "edge");
        assert_eq!(
            t.resource.attributes,
            [
                ("deployment.environment".into(), "prod".into()),
                ("team".into(), "a,b".into())
            ]
        );
        assert_eq!((t.queue_capacity, t.batch_size), (2048, 512));

        // The file wins over the environment; service.name falls back to "gatehouse".
        let t = parse_with(
            "[tracing]\nendpoint = \"http://c:4318/otlp\"\nsample_ratio = 0\nresource_attributes = { team = \"x\" }\n",
            &[("OTEL_RESOURCE_ATTRIBUTES", "team=y,zone=z")],
        )
        .unwrap();
        assert_eq!(t.url, "http://c:4318/otlp/v1/traces");
        assert_eq!(t.sample_ratio, 0.0);
        assert_eq!(t.resource.service_name, "gatehouse");
        assert_eq!(
            t.resource.attributes,
            [("team".into(), "x".into()), ("zone".into(), "z".into())]
        );
    }

    #[test]
    fn errors_are_located() {
        for (tracing, env, expected) in [
            (
                "[tracing]\n",
                &[][..],
                "proxy.toml:5:2: tracing.endpoint: missing: set `endpoint`",
            ),
            (
                "[tracing]\nendpoint = \"https://c:4318\"\n",
                &[],
                "proxy.toml:6:1: tracing.endpoint: invalid endpoint \"https://c:4318\": https is not supported",
            ),
            (
                "[tracing]\nendpoint = \"c:4318\"\n",
                &[],
                "tracing.endpoint: invalid endpoint \"c:4318\": expected an OTLP/HTTP base URL",
            ),
            (
                "[tracing]\nendpoint = \"http://c\"\nsample_ratio = 1.5\n",
                &[],
                "proxy.toml:7:1: tracing.sample_ratio: 1.5: expected 0.0 up to 1.0",
            ),
            (
                "[tracing]\nendpoint = \"http://c\"\nbatch_size = 0\n",
                &[],
                "tracing.batch_size: 0: expected 1 up to 65536",
            ),
            (
                "[tracing]\nendpoint = \"http://c\"\n",
                &[("OTEL_RESOURCE_ATTRIBUTES", "novalue")],
                "tracing.resource_attributes: OTEL_RESOURCE_ATTRIBUTES: invalid entry \"novalue\"",
            ),
            (
                "[tracing]\nendpoint = \"http://c\"\nsample = 1\n",
                &[],
                "proxy.toml:7:1: tracing.sample: unknown field `sample`",
            ),
        ] {
            let err = parse_with(tracing, env).unwrap_err();
            assert!(err.contains(expected), "{tracing}\n{err}");
        }
    }
}
