//! `gatehouse test`: policy tests for a config, run offline (in CI, before a config
//! ships), as `opa test` runs them for a policy. Each `[[case]]` is one request explained
//! with the config's chain ([`super::explain`]) and the status, the middleware that denied
//! it, the policy rule that decided it and response headers it expects.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use http::{HeaderName, StatusCode};
use serde::Deserialize;

use super::{Report, Request, Target};
use crate::config::value::HeaderText;
use crate::config::{parse_toml, ConfigError, KeyPath};
use crate::Config;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    case: Vec<RawCase>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: String,
    #[serde(default = "get")]
    method: String,
    url: String,
    #[serde(default = "loopback")]
    from: String,
    #[serde(default)]
    headers: BTreeMap<String, HeaderText>,
    /// Request body bytes (`explain --body-size`).
    body_size: Option<u64>,
    /// What the app is taken to answer (`explain --upstream-status`).
    #[serde(default = "ok")]
    upstream_status: u16,
    expect: u16,
    expect_denied_by: Option<String>,
    /// The policy rule expected to decide (or `default`).
    expect_rule: Option<String>,
    #[serde(default)]
    expect_headers: BTreeMap<String, String>,
}

fn get() -> String {
    "GET".into()
}

fn loopback() -> String {
    "127.0.0.1".into()
}

fn ok() -> u16 {
    200
}

/// One policy test.
pub struct Case {
    pub name: String,
    pub request: Request,
    pub expect: StatusCode,
    pub expect_denied_by: Option<String>,
    pub expect_rule: Option<String>,
    pub expect_headers: Vec<(HeaderName, String)>,
}

/// Reads the cases of `file` for `config`: every error is located in `file`, like a
/// config error, and an `expect_denied_by` must name an entry of the config's chain.
pub fn load(file: &Path, config: &Config) -> Result<Vec<Case>, ConfigError> {
    let source = std::fs::read_to_string(file)
        .map_err(|e| ConfigError::file(file, format!("cannot read the test file: {e}")))?;
    let (raw, doc): (File, _) = parse_toml(file, &source, &|name| std::env::var(name).ok())?;
    let at = |i: usize, key: &str, message: String| {
        let mut path = KeyPath::default().key("case");
        path.push_index(i);
        ConfigError::at_key(file, &source, doc.as_item(), path.key(key), message)
    };
    if raw.case.is_empty() {
        return Err(ConfigError::file(
            file,
            "no test cases: expected [[case]] tables with `name`, `url` and `expect`",
        ));
    }
    let mut cases: Vec<Case> = Vec::with_capacity(raw.case.len());
    for (i, c) in raw.case.into_iter().enumerate() {
        if cases.iter().any(|other| other.name == c.name) {
            return Err(at(i, "name", format!("duplicate case name {:?}", c.name)));
        }
        let method = super::parse_method(&c.method).map_err(|e| at(i, "method", e))?;
        let target: Target = c.url.parse().map_err(|e| at(i, "url", e))?;
        let mut request = Request::new(method, target);
        request.from = c.from.parse().map_err(|_| {
            at(
                i,
                "from",
                format!(
                    "invalid address {:?}: expected an IP address such as 203.0.113.9",
                    c.from
                ),
            )
        })?;
        for (name, value) in c.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| at(i, "headers", format!("invalid header name {name:?}")))?;
            request.headers.push((name, value.0));
        }
        request.body_size = c.body_size;
        request.upstream_status =
            status(c.upstream_status).map_err(|e| at(i, "upstream_status", e))?;
        let expect = status(c.expect).map_err(|e| at(i, "expect", e))?;
        if let Some(name) = &c.expect_denied_by {
            if !config.middleware.iter().any(|m| &m.name == name) {
                let names: Vec<&str> = config.middleware.iter().map(|m| m.name.as_str()).collect();
                return Err(at(
                    i,
                    "expect_denied_by",
                    format!(
                        "no middleware named {name:?} in {}: expected one of {}",
                        config.file.display(),
                        names.join(", ")
                    ),
                ));
            }
        }
        let mut expect_headers = Vec::with_capacity(c.expect_headers.len());
        for (name, value) in c.expect_headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| at(i, "expect_headers", format!("invalid header name {name:?}")))?;
            expect_headers.push((name, value));
        }
        cases.push(Case {
            name: c.name,
            request,
            expect,
            expect_denied_by: c.expect_denied_by,
            expect_rule: c.expect_rule,
            expect_headers,
        });
    }
    Ok(cases)
}

fn status(code: u16) -> Result<StatusCode, String> {
    StatusCode::from_u16(code)
        .ok()
        .filter(|s| (100..600).contains(&s.as_u16()))
        .ok_or_else(|| format!("invalid status {code}: expected 100 to 599"))
}

/// A case's result: the explained request, and what differed from what it expected.
pub struct Verdict<'c> {
    pub case: &'c Case,
    pub report: Report,
    pub failures: Vec<String>,
}

impl Case {
    /// Explains the case's request with `config`'s chain, offline, and compares.
    pub fn run(&self, config: &Config) -> std::io::Result<Verdict<'_>> {
        let report = super::explain(config, &self.request, false)?;
        let mut failures = Vec::new();
        if report.status != self.expect.as_u16() {
            failures.push(format!(
                "expected status {}, got {}",
                self.expect.as_u16(),
                report.status
            ));
        }
        if let Some(want) = &self.expect_denied_by {
            if report.denied_by.as_deref() != Some(want.as_str()) {
                let got = match &report.denied_by {
                    Some(by) => format!("denied by {by}"),
                    None => "not denied by a middleware".to_owned(),
                };
                failures.push(format!("expected denied by {want}, got {got}"));
            }
        }
        if let Some(want) = &self.expect_rule {
            if report.policy_rule.as_deref() != Some(want.as_str()) {
                let got = match &report.policy_rule {
                    Some(rule) => format!("rule {rule}"),
                    None => "no policy middleware ran".to_owned(),
                };
                failures.push(format!("expected rule {want} to decide, got {got}"));
            }
        }
        for (name, want) in &self.expect_headers {
            let got = report.headers.get(name.as_str());
            if !got.is_some_and(|values| values.contains(want)) {
                let got = got.map_or("none".to_owned(), |values| values.join(", "));
                failures.push(format!("expected header {name}: {want}, got {got}"));
            }
        }
        Ok(Verdict {
            case: self,
            report,
            failures,
        })
    }
}

impl fmt::Display for Verdict<'_> {
    /// `ok` or `FAIL`, the name and the outcome; then what differed, and what the result
    /// rests on (middlewares that would ask outside state, taken to let the request through).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = if self.failures.is_empty() {
            "ok  "
        } else {
            "FAIL"
        };
        writeln!(f, "{mark} {}: {}", self.case.name, self.report.outcome())?;
        for failure in &self.failures {
            writeln!(f, "       {failure}")?;
        }
        for (name, question) in self.report.assumptions() {
            writeln!(f, "       assumed: {name} {question}, and lets it through")?;
        }
        Ok(())
    }
}

/// The summary line of a run.
pub fn summary(verdicts: &[Verdict<'_>]) -> String {
    let failed = verdicts.iter().filter(|v| !v.failures.is_empty()).count();
    format!(
        "{} cases: {} passed, {failed} failed",
        verdicts.len(),
        verdicts.len() - failed
    )
}
