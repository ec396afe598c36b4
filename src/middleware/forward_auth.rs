//! `forward_auth`: asks an authentication service about every request, as nginx's
//! `auth_request` and Traefik's ForwardAuth do. Like theirs, the service gets the client's
//! request headers (all of them but hop-by-hop and body framing, or the `request_headers`
//! allow-list), since auth services in the field decide on whatever header they were
//! written for, plus the method, URI, host, client chain and scheme as `x-forwarded-*`
//! headers; never the body. A 2xx lets the request through (with `copy_headers` taken from
//! the answer, and `claims_from_headers` made claims for `authorize`); anything else is
//! the client's answer; no answer in time is a 503 (fails closed).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, EXPECT, HOST, LOCATION, TE, WWW_AUTHENTICATE};
use http::{request, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use schemars::JsonSchema;
use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::chain::{Claims, Context, Flow, Middleware, Reason, Reject};
use crate::config::value::{Duration, HeaderNameValue};
use crate::config::{KeyPath, Problem};
use crate::logging::Throttle;
use crate::pool::{outbound_url, Endpoint};
use crate::protocol::h1::hop::HOP_BY_HOP;
use crate::protocol::h1::request::{X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO};

/// The most of an auth service's answer body that is buffered and passed on.
const MAX_BODY: usize = 64 << 10;
/// Idle pooled connections to the auth service are closed after this.
const POOL_IDLE: StdDuration = StdDuration::from_secs(30);

static X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
static X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");
/// The headers gatehouse sets on the auth request itself, whatever the client sent.
static SET_HERE: [&HeaderName; 5] = [
    &X_FORWARDED_METHOD,
    &X_FORWARDED_URI,
    &X_FORWARDED_HOST,
    &X_FORWARDED_FOR,
    &X_FORWARDED_PROTO,
];
/// Client headers that are not the auth request's to carry besides the hop-by-hop ones:
/// they describe the body it does not have, or (`host`) travel as `x-forwarded-host`.
static NOT_SENT: [&HeaderName; 3] = [&CONTENT_LENGTH, &EXPECT, &HOST];

/// `forward_auth`: asks an auth service about each request; a 2xx answer lets it through.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The auth service, `https://host[:port]/path` or `http://host[:port]/path`.
    #[schemars(with = "String")]
    url: AuthUrl,
    /// The longest the auth service may take.
    #[serde(default = "default_timeout")]
    timeout: Duration,
    /// Headers of a 2xx answer that are set on the upstream request.
    #[serde(default)]
    copy_headers: Vec<HeaderNameValue>,
    /// The client request headers sent to the auth service; unset: all of them but
    /// hop-by-hop and body framing.
    request_headers: Option<Vec<HeaderNameValue>>,
    /// Claims made of headers of a 2xx answer, for `authorize`: claim name → header
    /// name. The claim `sub` is also the subject.
    #[serde(default)]
    claims_from_headers: BTreeMap<String, HeaderNameValue>,
}

fn default_timeout() -> Duration {
    Duration(StdDuration::from_secs(2))
}

/// Why `request_headers` cannot name `name`, if it cannot.
fn never_sent(name: &HeaderName) -> Option<&'static str> {
    if HOP_BY_HOP.contains(&name) {
        Some("a hop-by-hop header is never sent to the auth service")
    } else if name == HOST {
        Some("the client's host is always sent, as x-forwarded-host")
    } else if NOT_SENT.contains(&name) {
        Some("the auth service never gets the body, nor the headers that describe it")
    } else if SET_HERE.contains(&name) {
        Some("always sent, with gatehouse's value")
    } else {
        None
    }
}

/// `http[s]://host[:port]/path` of the auth service.
#[derive(Clone, Debug)]
struct AuthUrl(Uri);

impl<'de> Deserialize<'de> for AuthUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        outbound_url(&s).map(AuthUrl).ok_or_else(|| {
            de::Error::custom(format!(
                "invalid URL {s:?}: expected https://host[:port]/path or http://host[:port]/path"
            ))
        })
    }
}

impl super::Settings for Settings {
    fn validate(&self) -> Result<(), Problem> {
        let at = KeyPath::default();
        if self.timeout.0.is_zero() {
            return Err((at.key("timeout"), "must be more than 0s".into()));
        }
        if self.claims_from_headers.contains_key("") {
            return Err((
                at.key("claims_from_headers"),
                "a claim name is empty: name each claim, e.g. { role = \"x-user-role\" }".into(),
            ));
        }
        let Some(names) = &self.request_headers else {
            return Ok(());
        };
        if names.is_empty() {
            return Err((
                at.key("request_headers"),
                "list at least one header, or leave `request_headers` out to send every \
                 client header"
                    .into(),
            ));
        }
        for (i, name) in names.iter().enumerate() {
            if let Some(why) = never_sent(&name.0) {
                let mut at = at.key("request_headers");
                at.push_index(i);
                return Err((at, format!("{}: {why}", name.0)));
            }
        }
        Ok(())
    }

    fn summary(&self) -> String {
        let names = |v: &[HeaderNameValue]| {
            super::list(&v.iter().map(|h| h.0.as_str()).collect::<Vec<_>>())
        };
        format!(
            "url={} timeout={} request_headers={} copy_headers={} claims_from_headers={:?}",
            self.url.0,
            self.timeout,
            self.request_headers.as_deref().map_or("all".into(), names),
            names(&self.copy_headers),
            super::auth::forwarded(&self.claims_from_headers)
        )
    }

    fn role(&self) -> super::Role {
        super::Role::authentication()
    }

    fn build(&self, build: &super::Build) -> Box<dyn Middleware> {
        Box::new(ForwardAuth {
            url: self.url.0.clone(),
            timeout: self.timeout.0,
            copy: self.copy_headers.iter().map(|h| h.0.clone()).collect(),
            claims: self
                .claims_from_headers
                .iter()
                .map(|(c, h)| (c.clone(), h.0.clone()))
                .collect(),
            allow: self
                .request_headers
                .as_ref()
                .map(|names| names.iter().map(|h| h.0.clone()).collect()),
            service: Endpoint::for_url(
                &self.url.0,
                &build.handles.trust,
                self.timeout.0,
                POOL_IDLE,
                build.handles.workers + 1,
            ),
            unanswered: Throttle::default(),
        })
    }
}

struct ForwardAuth {
    url: Uri,
    timeout: StdDuration,
    copy: Vec<HeaderName>,
    /// Claim name → the answer header it is made of.
    claims: Vec<(String, HeaderName)>,
    /// The client headers to send; `None`: all but hop-by-hop and body framing.
    allow: Option<Vec<HeaderName>>,
    /// The auth service, over pooled keep-alive connections.
    service: Endpoint,
    /// Holds back repeats of the warning that the auth service did not answer.
    unanswered: Throttle,
}

impl ForwardAuth {
    /// The question to the auth service about `req`: the client's headers (the allowed
    /// ones; the hop-by-hop ones were removed when the request was read), less what
    /// describes its body, and the `x-forwarded-*` headers as the app gets them (the
    /// client's own values of those never pass).
    fn auth_request(&self, req: &request::Parts, ctx: &Context) -> Request<Bytes> {
        let mut auth = Request::get(self.url.clone())
            .body(Bytes::new())
            .expect("a GET of a valid URI");
        let headers = auth.headers_mut();
        *headers = match &self.allow {
            None => req.headers.clone(),
            Some(names) => {
                let mut picked = HeaderMap::new();
                for name in names {
                    for value in req.headers.get_all(name) {
                        picked.append(name.clone(), value.clone());
                    }
                }
                picked
            }
        };
        // `te: trailers` is kept for the app (gRPC); a bodiless GET has no use for it.
        for name in [&TE].into_iter().chain(NOT_SENT).chain(SET_HERE) {
            headers.remove(name);
        }
        let header = |s: &str| HeaderValue::from_str(s).ok();
        if let Some(v) = header(req.method.as_str()) {
            headers.insert(&X_FORWARDED_METHOD, v);
        }
        if let Some(v) = req.uri.path_and_query().and_then(|pq| header(pq.as_str())) {
            headers.insert(&X_FORWARDED_URI, v);
        }
        let host = req
            .headers
            .get(HOST)
            .cloned()
            .or_else(|| req.uri.authority().and_then(|a| header(a.as_str())));
        if let Some(v) = host {
            headers.insert(&X_FORWARDED_HOST, v);
        }
        headers.insert(&X_FORWARDED_FOR, forwarded_for(&req.headers, ctx.peer));
        let proto = if ctx.tls { "https" } else { "http" };
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        auth
    }

    /// The claims of an admitted request, made of the answer's headers: each header's
    /// values as text (several joined by `, `, as HTTP combines them); a header the answer
    /// lacks is a claim the request lacks. The claim `sub`, when there is one and it is not
    /// empty, is the subject, as a token's is.
    fn publish_claims(&self, answer: &HeaderMap, ctx: &mut Context) {
        let mut values = serde_json::Map::new();
        for (claim, header) in &self.claims {
            let texts: Vec<_> = answer
                .get_all(header)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()))
                .collect();
            if !texts.is_empty() {
                values.insert(claim.clone(), texts.join(", ").into());
            }
        }
        if let Some(serde_json::Value::String(sub)) = values.get("sub") {
            if !sub.is_empty() {
                ctx.subject = Some(sub.as_str().into());
            }
        }
        ctx.claims = Some(Arc::new(Claims::new(values)));
    }
}

/// The client's answer when the service refuses: its status and body, with the headers
/// that tell the client what to do (a challenge, a login redirect).
fn denied(answer: Response<Bytes>) -> Reject {
    let (parts, body) = answer.into_parts();
    let mut reject = Reject::new(
        parts.status,
        Reason::AuthServiceDenied,
        "the authentication service refused the request",
    );
    for name in [CONTENT_TYPE, WWW_AUTHENTICATE, LOCATION] {
        for value in parts.headers.get_all(&name) {
            reject.headers.push((name.clone(), value.clone()));
        }
    }
    reject.body = Some(body);
    reject
}

impl Middleware for ForwardAuth {
    fn request_fields(&self) -> Vec<HeaderName> {
        self.copy.clone()
    }

    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Context) -> Flow<'a> {
        let auth = self.auth_request(req, ctx);
        Flow::wait(async move {
            match self
                .service
                .fetch(ctx.worker, auth, self.timeout, MAX_BODY)
                .await
            {
                Ok(answer) if answer.status().is_success() => {
                    if !self.claims.is_empty() {
                        self.publish_claims(answer.headers(), ctx);
                    }
                    for name in &self.copy {
                        req.headers.remove(name);
                        for value in answer.headers().get_all(name) {
                            req.headers.append(name.clone(), value.clone());
                        }
                    }
                    Flow::Continue
                }
                Ok(answer) => Flow::Reject(denied(answer)),
                Err(e) => {
                    if let Some(suppressed) = self.unanswered.ready() {
                        tracing::warn!(url = %self.url, error = %e, suppressed, "forward_auth: the authentication service did not answer; refusing requests");
                    }
                    Flow::Reject(Reject::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        Reason::AuthServiceUnavailable,
                        "the authentication service is unavailable",
                    ))
                }
            }
        })
    }

    fn would_ask(&self, _: &request::Parts, _: &Context) -> Option<String> {
        Some(format!(
            "would ask the authentication service: GET {} (a 2xx lets the request through)",
            self.url
        ))
    }
}

/// The client's `x-forwarded-for` chain with the peer appended, as the app gets it.
fn forwarded_for(headers: &HeaderMap, peer: IpAddr) -> HeaderValue {
    let mut chain = Vec::new();
    for value in headers.get_all(&X_FORWARDED_FOR) {
        chain.extend_from_slice(value.as_bytes());
        chain.extend_from_slice(b", ");
    }
    chain.extend_from_slice(peer.to_string().as_bytes());
    HeaderValue::from_bytes(&chain).expect("header values and an address joined by \", \"")
}
