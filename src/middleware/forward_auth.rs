//! `forward_auth`: asks an authentication service about every request, as nginx's
//! `auth_request` and Traefik's ForwardAuth do. The service gets the method, URI and host
//! as `x-forwarded-*` headers plus the selected request headers, never the body. A 2xx lets
//! the request through (with `copy_headers` taken from the answer); anything else is the
//! client's answer; no answer in time is a 503 (fails closed).

use std::time::Duration as StdDuration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, LOCATION, WWW_AUTHENTICATE};
use http::{request, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::chain::{Context, Flow, Middleware, Reason, Reject};
use crate::client::{Endpoint, Target};
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

    fn build(&self, _: &str, handles: &super::Handles) -> Box<dyn Middleware> {
        let target = Target::from_uri(&self.url.0).expect("validated: an http URL with a host");
        Box::new(ForwardAuth {
            url: self.url.0.clone(),
            timeout: self.timeout.0,
            copy: self.copy_headers.iter().map(|h| h.0.clone()).collect(),
            send: self.request_headers.iter().map(|h| h.0.clone()).collect(),
            service: Endpoint::new(target, self.timeout.0, POOL_IDLE, handles.workers + 1),
        })
    }
}

struct ForwardAuth {
    url: Uri,
    timeout: StdDuration,
    copy: Vec<HeaderName>,
    send: Vec<HeaderName>,
    /// The auth service, over pooled keep-alive connections.
    service: Endpoint,
}

impl ForwardAuth {
    /// The question to the auth service about `req`.
    fn auth_request(&self, req: &request::Parts) -> Request<Bytes> {
        let mut auth = Request::get(self.url.clone())
            .body(Bytes::new())
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
    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Context) -> Flow<'a> {
        let auth = self.auth_request(req);
        Flow::wait(async move {
            match self
                .service
                .fetch(ctx.worker, auth, self.timeout, MAX_BODY)
                .await
            {
                Ok(answer) if answer.status().is_success() => {
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
                    tracing::debug!(url = %self.url, error = %e, "forward_auth: no answer");
                    Flow::Reject(Reject::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        Reason::AuthServiceUnavailable,
                        "the authentication service is unavailable",
                    ))
                }
            }
        })
    }
}
