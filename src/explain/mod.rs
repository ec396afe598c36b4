//! `gatehouse explain`: what the chain of a config does to one request, without the app.
//! [`cases`] builds `gatehouse test` on it.
//!
//! Nothing here imitates the proxy: the request is written as an HTTP/1.1 head and read by
//! the server's own parser (so `400`/`431` are explained too), then goes through the
//! proxy `run` would build from the same file, by the very pipeline that serves
//! ([`Proxy::handle_with`]), with a [`Trail`] that records each step. Where serving would
//! ask the app, [`Assumed`] stands in: it takes the body through the body phases and
//! answers with the chosen status, and the response phases run on that answer.
//!
//! Outside state is never touched unless `live`: middlewares that would ask Redis, an auth
//! service or a JWKS URL are reported with what they would ask ([`Middleware::would_ask`])
//! and taken to let the request through; a local rate limit decides from a fresh bucket.
//! With `live` they are asked for real, read-only where possible (a Redis rate limit reads
//! its bucket without taking from it).
//!
//! [`Middleware::would_ask`]: crate::chain::Middleware::would_ask

pub mod cases;

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{request, response, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use serde::Serialize;

use crate::chain::reject::code_for;
use http_body_util::BodyExt;

use crate::audit::Decision;
use crate::chain::{Answer, BodyPhase, Chain, Context, Exclusion, Policy, Reject, Trail};
use crate::middleware::Handles;
use crate::pool;
use crate::protocol::h1::{self, Framing};
use crate::proxy::{self, Proxy};
use crate::Config;

/// Body bytes are shown to the body phases in pieces of this size, as a client's would be.
const BODY_PIECE: usize = 64 << 10;

/// A request target: a path (with its query), or an `http`/`https` URL whose host is the
/// Host, written on the request line as given (absolute-form).
#[derive(Debug, Clone)]
pub struct Target {
    text: String,
    /// An absolute URL's authority, the request's `Host`.
    host: Option<String>,
    tls: bool,
}

impl FromStr for Target {
    type Err = String;
    fn from_str(url: &str) -> Result<Target, String> {
        let uri: Uri = url.parse().map_err(|_| {
            format!("invalid URL {url:?}: expected a path such as /api/items?page=2, or http://host/path")
        })?;
        let tls = match (uri.scheme_str(), uri.host()) {
            (None, None) if url.starts_with('/') || url == "*" => false,
            (Some("http"), Some(_)) => false,
            (Some("https"), Some(_)) => true,
            _ => {
                return Err(format!(
                "invalid URL {url:?}: expected a path, or an http:// or https:// URL with a host"
            ))
            }
        };
        Ok(Target {
            text: url.to_owned(),
            host: uri.authority().map(|a| a.as_str().to_owned()),
            tls,
        })
    }
}

/// A request method, as HTTP spells it (case matters: `get` is not `GET`).
pub fn parse_method(text: &str) -> Result<Method, String> {
    Method::from_bytes(text.as_bytes())
        .map_err(|_| format!("invalid method {text:?}: expected a token such as GET"))
}

/// One request to explain.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub target: Target,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The client's address (the connection's peer).
    pub from: IpAddr,
    /// The body's size when no `content-length` is given: with `transfer-encoding: chunked`
    /// that many bytes stream through the body phases, otherwise it becomes the length.
    pub body_size: Option<u64>,
    /// What the app is taken to answer.
    pub upstream_status: StatusCode,
    /// The response headers the app is taken to answer with.
    pub upstream_headers: Vec<(HeaderName, HeaderValue)>,
}

impl Request {
    /// A request without headers or body from 127.0.0.1, the app taken to answer `200`.
    pub fn new(method: Method, target: Target) -> Request {
        Request {
            method,
            target,
            headers: Vec::new(),
            from: IpAddr::from([127, 0, 0, 1]),
            body_size: None,
            upstream_status: StatusCode::OK,
            upstream_headers: Vec::new(),
        }
    }

    /// The request head as a client would send it: the given headers, the URL's host (or
    /// `localhost`) as `Host` unless one is given, and `content-length` from `body_size`
    /// unless the headers frame the body themselves.
    fn head(&self) -> Vec<u8> {
        let has = |name: &HeaderName| self.headers.iter().any(|(n, _)| n == name);
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.target.text).into_bytes();
        let mut extra: Vec<(&[u8], Vec<u8>)> = Vec::new();
        if !has(&HOST) {
            let host = self.target.host.as_deref().unwrap_or("localhost");
            extra.push((b"host", host.as_bytes().to_vec()));
        }
        if let Some(size) = self.body_size {
            if !has(&CONTENT_LENGTH) && !has(&TRANSFER_ENCODING) {
                extra.push((b"content-length", size.to_string().into_bytes()));
            }
        }
        let given = self
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
        for (name, value) in extra.iter().map(|(n, v)| (*n, v.as_slice())).chain(given) {
            h1::header_line(&mut out, name, value);
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// `Name: value`, as `curl -H` takes it.
pub fn parse_header(text: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("invalid header {text:?}: expected 'Name: value'"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("invalid header name {:?}", name.trim()))?;
    let value = HeaderValue::from_str(value.trim()).map_err(|_| {
        format!("invalid value for header {name}: control characters are not allowed")
    })?;
    Ok((name, value))
}

/// What the chain did to the request, step by step, and what the client gets.
#[derive(Debug, Serialize)]
pub struct Report {
    pub request: Summary,
    /// Whether outside state (Redis, auth services, JWKS URLs) was asked.
    pub live: bool,
    /// gatehouse's own refusal before any middleware (a malformed head, `CONNECT`,
    /// dot-segments), if any.
    pub gatehouse: Option<Refusal>,
    /// Every chain entry, in request order.
    pub chain: Vec<Step>,
    /// The app's synthetic answer, when the request got that far.
    pub upstream: Option<Upstream>,
    /// The response phases that ran, in the order they ran (bottom to top).
    pub response: Vec<ResponseStep>,
    /// What the client gets.
    pub status: u16,
    pub headers: BTreeMap<String, Vec<String>>,
    /// The audit event's `decision`: `allow`, `deny` or `error`.
    pub decision: &'static str,
    pub denied_by: Option<String>,
    pub deny_reason: Option<&'static str>,
    pub fail_open: Vec<String>,
    /// Who the request is from, as authentication said (the audit event's `subject`).
    pub subject: Option<String>,
    /// The policy rule that decided the request, or `default` (the audit event's
    /// `policy_rule`); `None` when no policy middleware ran.
    pub policy_rule: Option<String>,
}

/// The request as the chain saw it arrive.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub method: String,
    pub url: String,
    pub host: Option<String>,
    /// After `server.trusted_proxies`.
    pub client_ip: IpAddr,
}

/// One chain entry's part.
#[derive(Debug, Serialize)]
pub struct Step {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(flatten)]
    pub result: StepResult,
    /// What the request phase changed, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changes: Option<Changes>,
    /// The body phase's verdict, when the body went through it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<BodyResult>,
    /// How a policy middleware decided, rule by rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicySteps>,
}

/// A policy middleware's decision: each rule it evaluated, in order, and what decided.
#[derive(Debug, Serialize)]
pub struct PolicySteps {
    /// The deciding rule's name, or `default`.
    pub rule: String,
    pub allowed: bool,
    pub rules: Vec<RuleResult>,
}

/// One evaluated rule: `true` (the deciding one), `false`, or `error` with `error` saying
/// why (an error does not match).
#[derive(Debug, Serialize)]
pub struct RuleResult {
    pub name: String,
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<&Policy> for PolicySteps {
    fn from(p: &Policy) -> PolicySteps {
        let evaluated = p.rule.map_or(p.rules.len(), |i| i + 1);
        let rules = p.rules[..evaluated]
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let error = p
                    .errors
                    .iter()
                    .find(|(at, _)| *at == i)
                    .map(|(_, e)| e.clone());
                let result = match (&error, Some(i) == p.rule) {
                    (Some(_), _) => "error",
                    (None, true) => "true",
                    (None, false) => "false",
                };
                RuleResult {
                    name: name.to_string(),
                    result,
                    error,
                }
            })
            .collect();
        PolicySteps {
            rule: p.rule_name().to_owned(),
            allowed: p.allowed,
            rules,
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum StepResult {
    /// An earlier step answered.
    NotReached,
    /// Out of the entry's scope: `rule` is the scope key (`methods`, `paths`, `skip_paths`)
    /// and `values` what excluded the request (for `skip_paths`, the pattern that matched).
    Skipped {
        rule: &'static str,
        values: Vec<String>,
    },
    Continue,
    /// Let through only because its backend failed (`on_backend_error = "allow"`).
    FailedOpen,
    /// Not run: it would have asked outside state (offline), and is taken to let the
    /// request through.
    WouldAsk {
        would_ask: String,
    },
    /// Answered without refusing (a CORS preflight).
    Respond {
        status: u16,
    },
    Deny(Refusal),
}

#[derive(Debug, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum BodyResult {
    Continue {
        bytes: u64,
    },
    /// Refused once `bytes` had arrived.
    Deny {
        bytes: u64,
        #[serde(flatten)]
        refusal: Refusal,
    },
}

/// An answer gatehouse or a middleware made instead of the app's.
#[derive(Debug, Serialize)]
pub struct Refusal {
    pub status: u16,
    /// The JSON body's `error`.
    pub error: &'static str,
    /// The `deny_reason` of the audit event.
    pub reason: &'static str,
    pub message: String,
}

impl From<&Reject> for Refusal {
    fn from(r: &Reject) -> Refusal {
        Refusal {
            status: r.status.as_u16(),
            error: code_for(r.status),
            reason: r.reason.code(),
            message: r.message.to_string(),
        }
    }
}

/// The app's part: it is never contacted, and taken to answer with `status`.
#[derive(Debug, Serialize)]
pub struct Upstream {
    pub status: u16,
}

#[derive(Debug, Serialize)]
pub struct ResponseStep {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub changes: Changes,
    /// The response-body phase's verdict, when the entry has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<ResponseBodyResult>,
}

/// What a response-body phase does to the body.
#[derive(Debug, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ResponseBodyResult {
    /// The body streams through this filter.
    Filter { filter: String },
    /// The body goes as it is, for this reason.
    Pass { reason: &'static str },
}

/// What one phase changed.
#[derive(Debug, Default, Serialize)]
pub struct Changes {
    pub headers: Vec<HeaderChange>,
    /// The request target, when it changed (an `api_key` query parameter removed).
    pub uri: Option<String>,
    /// The subject, when the phase set it.
    pub subject: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct HeaderChange {
    pub op: Op,
    pub name: String,
    /// The values after the change: all of them for `set`, the new ones for `add`, none
    /// for `remove`.
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Set,
    Add,
    Remove,
}

impl Changes {
    /// The differences from `before` to `after`, in the order of `after`'s names, then the
    /// removed ones.
    fn between(before: &HeaderMap, after: &HeaderMap) -> Vec<HeaderChange> {
        let values = |map: &HeaderMap, name: &HeaderName| -> Vec<String> {
            map.get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect()
        };
        let mut changes = Vec::new();
        for name in after.keys() {
            let (old, new) = (values(before, name), values(after, name));
            if old == new {
                continue;
            }
            let (op, values) = if !old.is_empty() && new.starts_with(&old) {
                (Op::Add, new[old.len()..].to_vec())
            } else {
                (Op::Set, new)
            };
            changes.push(HeaderChange {
                op,
                name: name.to_string(),
                values,
            });
        }
        for name in before.keys().filter(|n| !after.contains_key(*n)) {
            changes.push(HeaderChange {
                op: Op::Remove,
                name: name.to_string(),
                values: Vec::new(),
            });
        }
        changes
    }
}

/// Records each step of the chain for the report.
struct Recorder<'c> {
    chain: &'c Chain,
    live: bool,
    steps: Vec<Step>,
    /// The request before the running request phase.
    before: Option<Before>,
    /// The response headers before the running response phase.
    response_before: HeaderMap,
    /// The running response phase's response-body verdict, if it has that phase.
    response_body: Option<ResponseBodyResult>,
    response: Vec<ResponseStep>,
    /// gatehouse's own refusal before the chain, if any.
    gatehouse: Option<Refusal>,
}

/// What a request phase may change: headers, target, subject, policy decision.
type Before = (HeaderMap, Uri, Option<Arc<str>>, Option<Policy>);

impl<'c> Recorder<'c> {
    fn new(chain: &'c Chain, live: bool) -> Self {
        Recorder {
            chain,
            live,
            steps: chain
                .links()
                .iter()
                .map(|link| Step {
                    name: link.name.to_string(),
                    kind: link.kind,
                    result: StepResult::NotReached,
                    changes: None,
                    body: None,
                    policy: None,
                })
                .collect(),
            before: None,
            response_before: HeaderMap::new(),
            response_body: None,
            response: Vec::new(),
            gatehouse: None,
        }
    }
}

impl Trail for Recorder<'_> {
    fn skipped(&mut self, i: usize, rule: Exclusion<'_>) {
        let scope = &self.chain.links()[i].scope;
        let (rule, values) = match rule {
            Exclusion::Methods => (
                "methods",
                scope.methods.iter().map(Method::to_string).collect(),
            ),
            Exclusion::Paths => ("paths", scope.paths.iter().map(|p| p.to_string()).collect()),
            Exclusion::SkipPaths(pattern) => ("skip_paths", vec![pattern.to_string()]),
        };
        self.steps[i].result = StepResult::Skipped { rule, values };
    }

    fn before(&mut self, i: usize, req: &request::Parts, ctx: &Context) -> bool {
        if !self.live {
            if let Some(question) = self.chain.links()[i].middleware.would_ask(req, ctx) {
                self.steps[i].result = StepResult::WouldAsk {
                    would_ask: question,
                };
                self.before = None;
                return false;
            }
        }
        self.before = Some((
            req.headers.clone(),
            req.uri.clone(),
            ctx.subject.clone(),
            ctx.policy.clone(),
        ));
        true
    }

    fn after(&mut self, i: usize, req: &request::Parts, ctx: &Context, answer: Option<&Answer>) {
        let Some((headers, uri, subject, policy)) = self.before.take() else {
            return; // held back: `before` recorded what it would ask
        };
        let step = &mut self.steps[i];
        step.result = match answer {
            None if ctx.fail_open & 1 << i != 0 => StepResult::FailedOpen,
            None => StepResult::Continue,
            Some(Answer::Respond(resp)) => StepResult::Respond {
                status: resp.status().as_u16(),
            },
            Some(Answer::Reject(reject)) => StepResult::Deny(reject.into()),
        };
        step.changes = Some(Changes {
            headers: Changes::between(&headers, &req.headers),
            uri: (uri != req.uri).then(|| req.uri.to_string()),
            subject: ctx
                .subject
                .as_deref()
                .filter(|s| Some(*s) != subject.as_deref())
                .map(str::to_owned),
        });
        step.policy = ctx
            .policy
            .as_ref()
            .filter(|p| Some(*p) != policy.as_ref())
            .map(PolicySteps::from);
    }

    fn refused(&mut self, reject: &Reject) {
        self.gatehouse = Some(reject.into());
    }

    fn body(&mut self, phases: u64, received: u64, refused: Option<(usize, &Reject)>) {
        if received == 0 {
            return; // no body: no body phase saw a byte
        }
        for (i, step) in self.steps.iter_mut().enumerate() {
            if phases & 1 << i != 0 {
                step.body = Some(match refused {
                    Some((at, reject)) if at == i => BodyResult::Deny {
                        bytes: received,
                        refusal: reject.into(),
                    },
                    _ => BodyResult::Continue { bytes: received },
                });
            }
        }
    }

    fn before_response(&mut self, _: usize, resp: &response::Parts) {
        self.response_before = resp.headers.clone();
    }

    fn response_body(&mut self, _: usize, phase: &BodyPhase) {
        self.response_body = Some(match phase {
            BodyPhase::Filter(filter) => ResponseBodyResult::Filter {
                filter: filter.describe(),
            },
            BodyPhase::Pass(reason) => ResponseBodyResult::Pass { reason },
        });
    }

    fn after_response(&mut self, i: usize, resp: &response::Parts, _: &Context) {
        let link = &self.chain.links()[i];
        self.response.push(ResponseStep {
            name: link.name.to_string(),
            kind: link.kind,
            changes: Changes {
                headers: Changes::between(&self.response_before, &resp.headers),
                ..Changes::default()
            },
            body: self.response_body.take(),
        });
    }
}

/// Explains `request` with the chain of `config`; `live` lets middlewares ask their
/// outside state. Fails only when no runtime can be started to run the chain on.
pub fn explain(config: &Config, request: &Request, live: bool) -> std::io::Result<Report> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handles = Arc::new(Handles {
        // Only a live chain gets background work (JWKS fetches).
        runtime: live.then(|| runtime.handle().clone()),
        read_only: true,
        ..Handles::offline()
    });
    // The proxy `run` would build from the file, with no audit, tracing or app: what it
    // records goes nowhere, and the app is never asked.
    let proxy = Arc::new(Proxy::new(config, &handles, None, None));
    Ok(runtime.block_on(run(config, &proxy, request, live)))
}

async fn run(config: &Config, proxy: &Arc<Proxy>, request: &Request, live: bool) -> Report {
    let mut trail = Recorder::new(proxy.chain(), live);
    let head = Bytes::from(request.head());
    let summarize = |parts: Option<&request::Parts>, client_ip| Summary {
        method: request.method.to_string(),
        url: request.target.text.clone(),
        host: parts
            .and_then(|p| p.headers.get(HOST))
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned()),
        client_ip,
    };
    let parsed = h1::request::parse(&head, config.server.max_header_bytes.0 as usize);
    let head = match parsed {
        Ok(Some((head, _))) => head,
        Ok(None) => unreachable!("a whole head was written"),
        // The server answers these itself: no middleware runs, not even on the response.
        Err(invalid) => {
            let reject = Reject::from(invalid);
            let reason = reject.reason.code();
            trail.gatehouse = Some(Refusal::from(&reject));
            let outcome = Outcome {
                resp: reject.render(None, false).into_parts().0,
                decision: Decision::Deny,
                subject: None,
                policy_rule: None,
                denied_by: None,
                deny_reason: Some(reason),
                fail_open: 0,
                upstream: None,
            };
            return finish(trail, summarize(None, request.from), outcome);
        }
    };
    let client_ip = proxy::client_ip(
        request.from,
        &head.parts.headers,
        &config.server.trusted_proxies,
    );
    let summary = summarize(Some(&head.parts), client_ip);
    let body = Zeros::new(match head.framing {
        Framing::Length(n) => n,
        Framing::Chunked => request.body_size.unwrap_or(0),
        Framing::Empty | Framing::UntilClose => 0,
    });
    let client = proxy::Client::new(request.from, request.target.tls, 0);
    let assumed = Assumed {
        status: request.upstream_status,
        headers: &request.upstream_headers,
    };
    let req = http::Request::from_parts(head.parts, body);
    let resp = proxy
        .handle_with(
            req,
            &client,
            Instant::now(),
            head.upgrade,
            &assumed,
            &mut trail,
        )
        .await;
    let (resp, body) = resp.into_parts();
    let s = body.session();
    let outcome = Outcome {
        resp,
        decision: s.decision,
        subject: s.ctx.subject.as_deref().map(str::to_owned),
        policy_rule: s.ctx.policy.as_ref().map(|p| p.rule_name().to_owned()),
        denied_by: s.ctx.denied_by,
        deny_reason: s.reason.map(|r| r.code()),
        fail_open: s.ctx.fail_open,
        upstream: s.upstream_status.map(|st| Upstream {
            status: st.as_u16(),
        }),
    };
    finish(trail, summary, outcome)
}

/// The app as `explain` takes it: it answers with this status and these headers, its body
/// empty, after the request body went through the body phases as serving sends it.
struct Assumed<'a> {
    status: StatusCode,
    headers: &'a [(HeaderName, HeaderValue)],
}

impl proxy::Upstream for Assumed<'_> {
    async fn forward<B>(
        &self,
        proxy: &Proxy,
        out: proxy::Outbound<'_, B>,
        s: &mut proxy::Session,
    ) -> proxy::Exchange
    where
        B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
    {
        let mut body = proxy.request_body(out.body, &mut s.ctx);
        let mut failed = false;
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                failed = true;
                break;
            }
        }
        let tally = body.tally();
        s.bytes_in = tally.received;
        let refused = tally.refused.take();
        let mut head = http::Response::new(()).into_parts().0;
        head.status = self.status;
        for (name, value) in self.headers {
            head.headers.append(name, value.clone());
        }
        proxy::Exchange {
            result: match failed {
                true => Err(pool::Error::Body),
                false => Ok((head, proxy::Body::full(Bytes::new()))),
            },
            answered: Instant::now(),
            refused,
        }
    }
}

/// A request body of `left` zero bytes, in pieces of [`BODY_PIECE`], as a client's
/// would arrive.
struct Zeros {
    left: u64,
    piece: Bytes,
}

impl Zeros {
    fn new(total: u64) -> Zeros {
        Zeros {
            left: total,
            piece: Bytes::from(vec![0; BODY_PIECE.min(total as usize)]),
        }
    }
}

impl http_body::Body for Zeros {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let len = self.left.min(BODY_PIECE as u64);
        self.left -= len;
        std::task::Poll::Ready(
            (len > 0).then(|| Ok(http_body::Frame::data(self.piece.slice(..len as usize)))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }
}

/// What the client gets, and why, for the report.
struct Outcome {
    resp: response::Parts,
    decision: Decision,
    subject: Option<String>,
    policy_rule: Option<String>,
    denied_by: Option<usize>,
    deny_reason: Option<&'static str>,
    fail_open: u64,
    upstream: Option<Upstream>,
}

fn finish(trail: Recorder<'_>, request: Summary, outcome: Outcome) -> Report {
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &outcome.resp.headers {
        headers
            .entry(name.to_string())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    Report {
        request,
        live: trail.live,
        gatehouse: trail.gatehouse,
        denied_by: outcome.denied_by.map(|i| trail.chain.name(i).to_string()),
        fail_open: trail
            .chain
            .names(outcome.fail_open)
            .map(str::to_owned)
            .collect(),
        chain: trail.steps,
        upstream: outcome.upstream,
        response: trail.response,
        status: outcome.resp.status.as_u16(),
        headers,
        deny_reason: outcome.deny_reason,
        decision: outcome.decision.as_str(),
        subject: outcome.subject,
        policy_rule: outcome.policy_rule,
    }
}

impl Report {
    /// What held-back middlewares would have asked: the assumptions the result rests on.
    pub fn assumptions(&self) -> impl Iterator<Item = (&str, &str)> {
        self.chain.iter().filter_map(|s| match &s.result {
            StepResult::WouldAsk { would_ask } => Some((&*s.name, would_ask.as_str())),
            _ => None,
        })
    }

    /// The last line: the status the client gets, and why.
    pub fn outcome(&self) -> String {
        let mut out = format!("status {}", self.status);
        if let Some(refusal) = &self.gatehouse {
            let _ = write!(out, " (refused by gatehouse: {})", refusal.reason);
        } else if let (Some(by), Some(reason)) = (&self.denied_by, self.deny_reason) {
            let _ = write!(out, " (denied by {by}: {reason}");
            let denier = self
                .chain
                .iter()
                .find(|s| matches!(s.result, StepResult::Deny(_)));
            if let Some(policy) = denier.and_then(|s| s.policy.as_ref()) {
                let _ = write!(out, ", rule {}", policy.rule);
            }
            out.push(')');
        } else if let Some(step) = self
            .chain
            .iter()
            .find(|s| matches!(s.result, StepResult::Respond { .. }))
        {
            let _ = write!(out, " (answered by {})", step.name);
        } else if self.upstream.is_some() {
            let _ = write!(out, " (the app's answer, as taken: it is not contacted)");
        }
        if !self.fail_open.is_empty() {
            let _ = write!(out, "; failed open: {}", self.fail_open.join(", "));
        }
        out
    }
}

/// `name`, with the type when it differs.
fn label(name: &str, kind: &str) -> String {
    if name == kind {
        name.to_owned()
    } else {
        format!("{name} ({kind})")
    }
}

fn write_changes(f: &mut fmt::Formatter<'_>, changes: &Changes) -> fmt::Result {
    for c in &changes.headers {
        match c.op {
            Op::Remove => writeln!(f, "        remove {}", c.name)?,
            op => {
                let verb = if op == Op::Set { "set" } else { "add" };
                for value in &c.values {
                    writeln!(f, "        {verb} {}: {value}", c.name)?;
                }
            }
        }
    }
    if let Some(uri) = &changes.uri {
        writeln!(f, "        target {uri}")?;
    }
    if let Some(subject) = &changes.subject {
        writeln!(f, "        subject {subject}")?;
    }
    Ok(())
}

/// Each evaluated rule's result, then the default's decision when it decided.
fn write_policy(f: &mut fmt::Formatter<'_>, policy: &PolicySteps) -> fmt::Result {
    let verdict = if policy.allowed { "allows" } else { "denies" };
    for rule in &policy.rules {
        write!(f, "        rule {}: {}", rule.name, rule.result)?;
        match &rule.error {
            Some(error) => writeln!(f, " ({error}): does not match")?,
            None if rule.result == "true" => writeln!(f, ": {verdict}")?,
            None => writeln!(f)?,
        }
    }
    if policy.rules.iter().all(|r| r.result != "true") {
        writeln!(f, "        default: {verdict}")?;
    }
    Ok(())
}

fn write_refusal(f: &mut fmt::Formatter<'_>, r: &Refusal) -> fmt::Result {
    write!(f, "{} {}, {}: {}", r.status, r.error, r.reason, r.message)
}

/// The text report: the request, each entry, the app, each response phase, the status.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.request;
        write!(f, "{} {}", r.method, r.url)?;
        if let Some(host) = &r.host {
            write!(f, " (host {host})")?;
        }
        write!(f, " from {}", r.client_ip)?;
        writeln!(
            f,
            "{}",
            if self.live {
                ", live: outside state is asked"
            } else {
                ", offline: outside state is not asked (--live asks it)"
            }
        )?;
        if let Some(refusal) = &self.gatehouse {
            write!(f, "gatehouse refuses it: ")?;
            write_refusal(f, refusal)?;
            writeln!(f)?;
        }
        writeln!(f, "request phases:")?;
        for (i, step) in self.chain.iter().enumerate() {
            write!(f, "  {:>2}. {}: ", i + 1, label(&step.name, step.kind))?;
            match &step.result {
                StepResult::NotReached => write!(f, "not reached")?,
                StepResult::Skipped { rule, values } => {
                    let list = values.join(", ");
                    match *rule {
                        "methods" => {
                            write!(f, "skipped: methods [{list}] do not include {}", r.method)?
                        }
                        "paths" => write!(f, "skipped: paths [{list}] do not match this path")?,
                        _ => write!(f, "skipped: skip_paths {list} matches this path")?,
                    }
                }
                StepResult::Continue => write!(f, "continue")?,
                StepResult::FailedOpen => write!(f, "continue, failed open: its backend failed")?,
                StepResult::WouldAsk { would_ask } => {
                    write!(f, "{would_ask}; taken to let the request through")?
                }
                StepResult::Respond { status } => write!(f, "answers {status}")?,
                StepResult::Deny(refusal) => {
                    write!(f, "denies: ")?;
                    write_refusal(f, refusal)?;
                }
            }
            writeln!(f)?;
            if let Some(policy) = &step.policy {
                write_policy(f, policy)?;
            }
            if let Some(changes) = &step.changes {
                write_changes(f, changes)?;
            }
            match &step.body {
                Some(BodyResult::Continue { bytes }) => {
                    writeln!(f, "        body: {bytes} bytes pass")?
                }
                Some(BodyResult::Deny { bytes, refusal }) => {
                    write!(f, "        body: denies after {bytes} bytes: ")?;
                    write_refusal(f, refusal)?;
                    writeln!(f)?;
                }
                None => {}
            }
        }
        match &self.upstream {
            Some(up) => writeln!(f, "app: not contacted; taken to answer {}", up.status)?,
            None => writeln!(f, "app: not asked")?,
        }
        if !self.response.is_empty() {
            writeln!(f, "response phases:")?;
            for step in &self.response {
                let name = label(&step.name, step.kind);
                if step.changes.headers.is_empty() && step.body.is_none() {
                    writeln!(f, "      {name}: no change")?;
                    continue;
                }
                writeln!(f, "      {name}:")?;
                write_changes(f, &step.changes)?;
                match &step.body {
                    Some(ResponseBodyResult::Filter { filter }) => {
                        writeln!(f, "        body: {filter}")?
                    }
                    Some(ResponseBodyResult::Pass { reason }) => {
                        writeln!(f, "        body: as it is: {reason}")?
                    }
                    None => {}
                }
            }
        }
        writeln!(f, "{}", self.outcome())
    }
}
