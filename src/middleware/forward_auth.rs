//! `forward_auth`: asks an authentication service about every request, as nginx's
//! `auth_request` and Traefik's ForwardAuth do. The service gets the method, URI and host
//! as `x-forwarded-*` headers plus the selected request headers, never the body. A 2xx lets
//! the request through (with `copy_headers` taken from the answer); anything else is the
//! client's answer; no answer in time is a 503 (fails closed).

use std::time::Duration as StdDuration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, LOCATION, WWW_AUTHENTICATE};
use http::{request, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::chain::{Context, Flow, Middleware};
use crate::config::value::{Duration, HeaderNameValue};
use crate::config::{KeyPath, Problem};

/// The most of an auth service's answer body that is buffered and passed on.
const MAX_BODY: usize = 64 << 10;
/// Idle pooled connections to the auth service are closed after this.
const POOL_IDLE: StdDuration = StdDuration::from_secs(30);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    url: AuthUrl,
    #[serde(default = "default_timeout")]
    timeout: Duration,
    /// Headers of a 2xx answer that are set on the upstream request.
    #[serde(default)]
    copy_headers: Vec<HeaderNameValue>,
    /// Client request headers sent to the auth service.
    #[serde(default = "default_request_headers")]
    request_headers: Vec<HeaderNameValue>,
}

fn default_timeout() -> Duration {
    Duration(StdDuration::from_secs(2))
}

fn default_request_headers() -> Vec<HeaderNameValue> {
    ["authorization", "cookie"]
        .into_iter()
        .map(|n| HeaderNameValue(HeaderName::from_static(n)))
        .collect()
}

/// `http://host[:port]/path` of the auth service.
#[derive(Clone, Debug)]
struct AuthUrl(Uri);

impl<'de> Deserialize<'de> for AuthUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.parse::<Uri>() {
            Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() => Ok(AuthUrl(uri)),
            _ => Err(de::Error::custom(format!(
                "invalid URL {s:?}: expected http://host:port/path (https is not supported)"
            ))),
        }
    }
}

impl super::Settings for Settings {
    fn validate(&self) -> Result<(), Problem> {
        if self.timeout.0.is_zero() {
            return Err((
                KeyPath::default().key("timeout"),
                "must be more than 0s".into(),
            ));
        }
        Ok(())
    }

    fn summary(&self) -> String {
        let names = |v: &[HeaderNameValue]| {
            super::list(&v.iter().map(|h| h.0.as_str()).collect::<Vec<_>>())
        };
        format!(
            "url={} timeout={} request_headers={} copy_headers={}",
            self.url.0,
            self.timeout,
            names(&self.request_headers),
            names(&self.copy_headers)
        )
    }

    fn build(&self, _name: &str) -> Box<dyn Middleware> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(self.timeout.0));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connector);
        Box::new(ForwardAuth {
            url: self.url.0.clone(),
            timeout: self.timeout.0,
            copy: self.copy_headers.iter().map(|h| h.0.clone()).collect(),
            send: self.request_headers.iter().map(|h| h.0.clone()).collect(),
            client,
        })
    }
}

struct ForwardAuth {
    url: Uri,
    timeout: StdDuration,
    copy: Vec<HeaderName>,
    send: Vec<HeaderName>,
    /// Keep-alive connections to the auth service, pooled.
    client: Client<HttpConnector, Empty<Bytes>>,
}

/// What the auth service said.
enum Verdict {
    Allow(http::HeaderMap),
    Deny(Response<Bytes>),
}

impl ForwardAuth {
    /// The question to the auth service about `req`.
    fn auth_request(&self, req: &request::Parts) -> Request<Empty<Bytes>> {
        let mut auth = Request::get(self.url.clone())
            .body(Empty::new())
            .expect("a GET of a valid URI");
        let headers = auth.headers_mut();
        for name in &self.send {
            for value in req.headers.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        let header = |s: &str| HeaderValue::from_str(s).ok();
        if let Some(v) = header(req.method.as_str()) {
            headers.insert("x-forwarded-method", v);
        }
        if let Some(v) = req.uri.path_and_query().and_then(|pq| header(pq.as_str())) {
            headers.insert("x-forwarded-uri", v);
        }
        let host = req
            .headers
            .get(HOST)
            .cloned()
            .or_else(|| req.uri.authority().and_then(|a| header(a.as_str())));
        if let Some(v) = host {
            headers.insert("x-forwarded-host", v);
        }
        auth
    }

    async fn ask(&self, auth: Request<Empty<Bytes>>) -> Result<Verdict, String> {
        let resp = self.client.request(auth).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("answer body: {e}"))?
            .to_bytes();
        if parts.status.is_success() {
            return Ok(Verdict::Allow(parts.headers));
        }
        let mut deny = Response::new(body);
        *deny.status_mut() = parts.status;
        for name in [CONTENT_TYPE, WWW_AUTHENTICATE, LOCATION] {
            for value in parts.headers.get_all(&name) {
                deny.headers_mut().append(name.clone(), value.clone());
            }
        }
        Ok(Verdict::Deny(deny))
    }
}

impl Middleware for ForwardAuth {
    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Context) -> Flow<'a> {
        let auth = self.auth_request(req);
        Flow::wait(async move {
            match tokio::time::timeout(self.timeout, self.ask(auth)).await {
                Ok(Ok(Verdict::Allow(answer))) => {
                    for name in &self.copy {
                        req.headers.remove(name);
                        for value in answer.get_all(name) {
                            req.headers.append(name.clone(), value.clone());
                        }
                    }
                    Flow::Continue
                }
                Ok(Ok(Verdict::Deny(resp))) => Flow::Respond(resp),
                Ok(Err(e)) => {
                    tracing::debug!(url = %self.url, error = %e, "forward_auth: no answer");
                    unavailable(ctx)
                }
                Err(_) => {
                    tracing::debug!(url = %self.url, "forward_auth: timed out");
                    unavailable(ctx)
                }
            }
        })
    }
}

fn unavailable(ctx: &Context) -> Flow<'static> {
    Flow::Respond(ctx.reject(
        StatusCode::SERVICE_UNAVAILABLE,
        "the authentication service is unavailable",
    ))
}
