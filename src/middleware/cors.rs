//! `cors`: answers browsers' preflight requests itself (the app never sees them) and adds
//! the CORS response headers for allowed origins, so the app needs no CORS code. On the
//! requests it handles it owns the `access-control-*` response headers: what the app (or a
//! middleware below) set is replaced, so a leftover permissive CORS layer in the app cannot
//! widen `allow_origins`.
//!
//! Browsers apply no CORS to WebSockets: a page on any origin may open one, with the
//! user's cookies, and read what comes back. So `cors` refuses a WebSocket handshake from an
//! origin it does not allow, where it would only withhold its headers from a plain request.

use http::header::{
    HeaderName, ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS,
    ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS,
    ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN,
    VARY,
};
use http::{request, response, HeaderMap, HeaderValue, Method, Response, StatusCode};
use hyper::ext::Protocol;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::chain::{Context, Flow, Middleware, Reason, Reject};
use crate::config::value::{Duration, HeaderNameValue, HttpMethod};
use crate::config::{KeyPath, Problem};

/// `cors`: answers browsers' preflights and lets the allowed origins read responses.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Exact origins (`"https://app.example.com"`), subdomain wildcards
    /// (`"https://*.example.com"`), or `"*"` for any origin.
    allow_origins: Vec<String>,
    /// Methods a page may use, answered in preflights.
    #[serde(default = "default_methods")]
    allow_methods: Vec<HttpMethod>,
    /// Request headers a browser may send. Unset (or `"*"`), a preflight from an allowed
    /// origin gets the headers it asks for: a fixed default list would break the first
    /// `content-type: application/json` call, or the first header a tracing SDK adds.
    allow_headers: Option<Vec<HeaderNameValue>>,
    /// Response headers a page may read, besides the ones the chain's answers add.
    #[serde(default)]
    expose_headers: Vec<HeaderNameValue>,
    /// Let pages send cookies and other credentials.
    #[serde(default)]
    allow_credentials: bool,
    /// How long a browser may keep a preflight's answer.
    #[serde(default = "default_max_age")]
    max_age: Duration,
}

fn default_methods() -> Vec<HttpMethod> {
    [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
    ]
    .into_iter()
    .map(HttpMethod)
    .collect()
}

fn default_max_age() -> Duration {
    Duration(std::time::Duration::from_secs(600))
}

impl super::Settings for Settings {
    fn validate(&self) -> Result<(), Problem> {
        let at = |i: usize| {
            let mut p = KeyPath::default().key("allow_origins");
            p.push_index(i);
            p
        };
        if self.allow_origins.is_empty() {
            return Err((
                KeyPath::default().key("allow_origins"),
                "expected at least one origin, or \"*\"".into(),
            ));
        }
        for (i, origin) in self.allow_origins.iter().enumerate() {
            if origin == "*" {
                if self.allow_credentials {
                    return Err((at(i), "\"*\" cannot be combined with allow_credentials = true (browsers refuse it): list the origins".into()));
                }
                continue;
            }
            let host = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"));
            let valid = host.is_some_and(|h| {
                let h = h.strip_prefix("*.").unwrap_or(h);
                !h.is_empty()
                    && !h.contains(['/', '*', ' '])
                    && HeaderValue::from_str(origin).is_ok()
            });
            if !valid {
                return Err((at(i), format!("invalid origin {origin:?}: expected \"https://host[:port]\", \"https://*.domain\" or \"*\"")));
            }
        }
        Ok(())
    }

    fn summary(&self) -> String {
        let headers = match &self.allow_headers {
            Some(list) if !self.reflects_headers() => {
                super::list(&list.iter().map(|h| h.0.as_str()).collect::<Vec<_>>())
            }
            _ => "(as requested)".to_owned(),
        };
        format!(
            "allow_origins=[{}] allow_headers={headers} allow_credentials={} max_age={}",
            self.allow_origins.join(", "),
            self.allow_credentials,
            self.max_age
        )
    }

    fn role(&self) -> super::Role {
        super::Role {
            answers_preflights: true,
            ..super::Role::default()
        }
    }

    /// It exposes the headers the chain's entries add besides `expose_headers`: none is
    /// CORS-safelisted, so a page could not read a `retry-after` or a request id otherwise.
    /// They are named whether or not such an entry can reach this one's responses (its
    /// place, its scope): naming a header that never comes costs a few bytes and opens
    /// nothing.
    fn build(&self, build: &super::Build) -> Box<dyn Middleware> {
        Box::new(self.cors(build.response_headers))
    }
}

impl Settings {
    fn cors(&self, chain_headers: &[HeaderName]) -> Cors {
        let reflect_headers = self.reflects_headers();
        Cors {
            any_origin: self.allow_origins.iter().any(|o| o == "*"),
            origins: self
                .allow_origins
                .iter()
                .filter(|o| *o != "*")
                .map(|o| OriginRule::new(o))
                .collect(),
            methods: self.allow_methods.iter().map(|m| m.0.clone()).collect(),
            allow_methods: join(self.allow_methods.iter().map(|m| m.0.as_str()).collect()),
            allow_headers: if reflect_headers {
                None
            } else {
                join(
                    self.allow_headers
                        .iter()
                        .flatten()
                        .map(|h| h.0.as_str())
                        .collect(),
                )
            },
            reflect_headers,
            expose_headers: exposed(&self.expose_headers, chain_headers),
            credentials: self.allow_credentials,
            max_age: HeaderValue::from(self.max_age.0.as_secs()),
        }
    }

    /// Whether preflights get the headers they ask for (`allow_headers` unset or `"*"`).
    fn reflects_headers(&self) -> bool {
        self.allow_headers
            .as_ref()
            .is_none_or(|list| list.iter().any(|h| h.0.as_str() == "*"))
    }
}

/// Names as one list header value, `None` for none.
fn join(names: Vec<&str>) -> Option<HeaderValue> {
    (!names.is_empty()).then(|| HeaderValue::from_str(&names.join(", ")).expect("validated tokens"))
}

/// `access-control-expose-headers`: the configured names, then those of `chain_headers` not
/// among them.
fn exposed(configured: &[HeaderNameValue], chain_headers: &[HeaderName]) -> Option<HeaderValue> {
    let mut names: Vec<&str> = configured.iter().map(|h| h.0.as_str()).collect();
    for name in chain_headers {
        if !names.contains(&name.as_str()) {
            names.push(name.as_str());
        }
    }
    join(names)
}

/// What the request phase decided for a request carrying `Origin`, for the response
/// phase (kept in the context's `state`).
#[derive(Debug, Clone)]
enum Verdict {
    /// The `access-control-allow-origin` value to send.
    Allowed(HeaderValue),
    Refused,
}

enum OriginRule {
    Exact(String),
    /// `https://*.example.com`: scheme and the `.example.com` suffix.
    Subdomains {
        scheme: String,
        suffix: String,
    },
}

impl OriginRule {
    fn new(origin: &str) -> Self {
        let lower = origin.to_ascii_lowercase();
        match lower.split_once("://*") {
            Some((scheme, suffix)) => OriginRule::Subdomains {
                scheme: format!("{scheme}://"),
                suffix: suffix.to_owned(),
            },
            None => OriginRule::Exact(lower),
        }
    }

    fn matches(&self, origin: &str) -> bool {
        match self {
            OriginRule::Exact(o) => o.eq_ignore_ascii_case(origin),
            OriginRule::Subdomains { scheme, suffix } => {
                let lower = origin.to_ascii_lowercase();
                lower.strip_prefix(scheme.as_str()).is_some_and(|host| {
                    host.len() > suffix.len() && host.ends_with(suffix.as_str())
                })
            }
        }
    }
}

struct Cors {
    any_origin: bool,
    origins: Vec<OriginRule>,
    methods: Vec<Method>,
    allow_methods: Option<HeaderValue>,
    allow_headers: Option<HeaderValue>,
    reflect_headers: bool,
    expose_headers: Option<HeaderValue>,
    credentials: bool,
    max_age: HeaderValue,
}

static WILDCARD: HeaderValue = HeaderValue::from_static("*");
static TRUE: HeaderValue = HeaderValue::from_static("true");
static VARY_ORIGIN: HeaderValue = HeaderValue::from_static("origin");
static VARY_PREFLIGHT: HeaderValue = HeaderValue::from_static(
    "origin, access-control-request-method, access-control-request-headers",
);

impl Cors {
    /// The `access-control-allow-origin` value for `origin`, or `None` if it is not allowed.
    fn allow_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        if self.any_origin {
            return Some(WILDCARD.clone());
        }
        let text = origin.to_str().ok()?;
        self.origins
            .iter()
            .any(|r| r.matches(text))
            .then(|| origin.clone())
    }

    /// The `204` to an allowed preflight for `method` (its `access-control-request-method`),
    /// or the refusal.
    fn preflight(
        &self,
        req: &request::Parts,
        origin: &HeaderValue,
        method: &HeaderValue,
    ) -> Flow<'static> {
        let Some(allow_origin) = self.allow_origin(origin) else {
            return Flow::Reject(Reject::new(
                StatusCode::FORBIDDEN,
                Reason::OriginNotAllowed,
                "CORS preflight: origin not allowed",
            ));
        };
        if !Method::from_bytes(method.as_bytes()).is_ok_and(|m| self.methods.contains(&m)) {
            return Flow::Reject(self.method_refused(method, allow_origin));
        }
        let mut resp = Response::new(bytes::Bytes::new());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let h = resp.headers_mut();
        for (name, value) in self.preflight_headers(allow_origin) {
            h.append(name, value);
        }
        let allow_headers = if self.reflect_headers {
            req.headers.get(ACCESS_CONTROL_REQUEST_HEADERS).cloned()
        } else {
            self.allow_headers.clone()
        };
        if let Some(headers) = allow_headers {
            h.insert(ACCESS_CONTROL_ALLOW_HEADERS, headers);
        }
        h.insert(ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        Flow::Respond(resp)
    }

    /// The headers of every answer to a preflight from an allowed origin.
    fn preflight_headers(
        &self,
        allow_origin: HeaderValue,
    ) -> impl Iterator<Item = (HeaderName, HeaderValue)> {
        [
            Some((ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin)),
            self.allow_methods
                .clone()
                .map(|m| (ACCESS_CONTROL_ALLOW_METHODS, m)),
            self.credentials
                .then(|| (ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE.clone())),
            (!self.any_origin).then(|| (VARY, VARY_PREFLIGHT.clone())),
        ]
        .into_iter()
        .flatten()
    }

    /// The refusal of a preflight from an allowed origin for a `method` not in
    /// `allow_methods`: its message names both, and it carries the CORS headers of an allowed
    /// origin, so that devtools show `access-control-allow-methods` and a browser's console
    /// does not blame the origin ("no 'Access-Control-Allow-Origin' header"), which would
    /// send the developer to `allow_origins`.
    fn method_refused(&self, method: &HeaderValue, allow_origin: HeaderValue) -> Reject {
        let allowed = self
            .allow_methods
            .as_ref()
            .map_or("", |m| m.to_str().expect("method tokens"));
        let message = format!(
            "CORS preflight: method {} is not in allow_methods [{allowed}]",
            String::from_utf8_lossy(method.as_bytes())
        );
        let mut reject = Reject::new(StatusCode::FORBIDDEN, Reason::MethodNotAllowed, message);
        reject.headers.extend(self.preflight_headers(allow_origin));
        reject
    }
}

/// Whether the request opens a WebSocket: HTTP/1.1's `Upgrade: websocket` (compared whole,
/// as the proxy does before it tunnels one), or HTTP/2's extended CONNECT with `:protocol`
/// `websocket` (RFC 8441). gatehouse announces no extended CONNECT today, so none gets this
/// far, but the rule does not depend on that.
fn opens_websocket(req: &request::Parts, ctx: &Context) -> bool {
    let websocket = |p: &[u8]| p.eq_ignore_ascii_case(b"websocket");
    ctx.upgrade
        .as_ref()
        .is_some_and(|u| websocket(u.as_bytes()))
        || req
            .extensions
            .get::<Protocol>()
            .is_some_and(|p| websocket(p.as_str().as_bytes()))
}

/// Removes every `access-control-*` header (all of them are CORS response headers).
fn remove_cors_headers(headers: &mut HeaderMap) {
    let is_cors = |name: &HeaderName| name.as_str().starts_with("access-control-");
    if !headers.keys().any(is_cors) {
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(|n| is_cors(n)).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}

impl Middleware for Cors {
    fn on_request(&self, req: &mut request::Parts, ctx: &mut Context) -> Flow<'_> {
        // Without `Origin` no browser sent it: a WebSocket client of another kind passes.
        let Some(origin) = req.headers.get(ORIGIN) else {
            return Flow::Continue;
        };
        if req.method == Method::OPTIONS {
            if let Some(method) = req.headers.get(ACCESS_CONTROL_REQUEST_METHOD) {
                return self.preflight(req, origin, method);
            }
        }
        ctx.state.insert(match self.allow_origin(origin) {
            Some(allow) => Verdict::Allowed(allow),
            None if opens_websocket(req, ctx) => {
                return Flow::Reject(Reject::new(
                    StatusCode::FORBIDDEN,
                    Reason::OriginNotAllowed,
                    "WebSocket handshake: origin not allowed",
                ))
            }
            None => Verdict::Refused,
        });
        Flow::Continue
    }

    fn on_response(&self, resp: &mut response::Parts, ctx: &mut Context) {
        let headers = &mut resp.headers;
        match ctx.state.remove::<Verdict>() {
            // Not a CORS request: the app's headers stay, as they would without gatehouse.
            None => {}
            Some(Verdict::Refused) => remove_cors_headers(headers),
            Some(Verdict::Allowed(allow)) => {
                remove_cors_headers(headers);
                headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allow);
                if let Some(expose) = &self.expose_headers {
                    headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
                }
                if self.credentials {
                    headers.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE.clone());
                }
            }
        }
        if !self.any_origin {
            headers.append(VARY, VARY_ORIGIN.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::middleware::Spec;
    use http::header::RETRY_AFTER;
    use http::Request;

    fn settings(toml: &str) -> Settings {
        toml::from_str(toml).unwrap_or_else(|e| panic!("{e}"))
    }

    const APP: &str = "allow_origins = [\"https://app.example\"]\n";

    /// The request phase's refusal, or `None` when it lets the request through.
    fn refusal(cors: &Cors, req: &mut request::Parts, ctx: &mut Context) -> Option<Reject> {
        match cors.on_request(req, ctx) {
            Flow::Continue => None,
            Flow::Reject(reject) => Some(reject),
            _ => panic!("neither continue nor a refusal"),
        }
    }

    fn context() -> Context {
        let ip = [127, 0, 0, 1].into();
        Context::new(ip, ip, false, std::time::Instant::now(), 0)
    }

    #[test]
    fn expose_headers_add_the_chain_s_own_once_each() {
        let source = format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n\
             [[middleware]]\ntype = \"request_id\"\nheader = \"x-trace-id\"\n\
             [[middleware]]\ntype = \"cors\"\n{APP}expose_headers = [\"x-upstream\", \"Retry-After\"]\n\
             [[middleware]]\ntype = \"rate_limit\"\nrate = \"10/s\"\n\
             [[middleware]]\ntype = \"rate_limit\"\nname = \"second\"\nrate = \"100/m\"\n\
             [[middleware]]\ntype = \"api_key\"\nkeys = [{{ id = \"a\", key = \"k\" }}]\n"
        );
        let config = Config::parse(std::path::Path::new("proxy.toml"), &source, &|_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        let Spec::Cors(cors) = &config.middleware[1].spec else {
            panic!("the second entry is cors");
        };
        let made = super::super::response_headers(&config.middleware);
        assert_eq!(
            cors.cors(&made).expose_headers.unwrap(),
            "x-upstream, retry-after, x-trace-id, ratelimit-limit, ratelimit-remaining, \
             ratelimit-reset, www-authenticate"
        );
        // Alone, it exposes what it is told to, and nothing when told nothing.
        assert_eq!(
            cors.cors(&[]).expose_headers.unwrap(),
            "x-upstream, retry-after"
        );
        assert_eq!(settings(APP).cors(&[]).expose_headers, None);
        assert_eq!(
            settings(APP).cors(&[RETRY_AFTER]).expose_headers.unwrap(),
            "retry-after"
        );
    }

    #[test]
    fn a_preflight_for_a_method_not_allowed_names_it_and_allow_methods() {
        let cors = settings(&format!(
            "{APP}allow_methods = [\"GET\", \"POST\"]\nallow_credentials = true\n"
        ))
        .cors(&[]);
        let asking = |origin: &str, method: &str| {
            let (parts, ()) = Request::options("/items")
                .header(ORIGIN, origin)
                .header(ACCESS_CONTROL_REQUEST_METHOD, method)
                .body(())
                .unwrap()
                .into_parts();
            parts
        };
        let reject = refusal(
            &cors,
            &mut asking("https://app.example", "PUT"),
            &mut context(),
        )
        .expect("refused");
        assert_eq!(reject.reason, Reason::MethodNotAllowed);
        assert_eq!(reject.status, StatusCode::FORBIDDEN);
        assert_eq!(
            reject.message,
            "CORS preflight: method PUT is not in allow_methods [GET, POST]"
        );
        // The origin is allowed, and a browser is told so: what it refuses is the method.
        let header = |name: HeaderName| {
            let found = reject.headers.iter().find(|(n, _)| *n == name);
            found.map(|(_, v)| v.to_str().unwrap())
        };
        assert_eq!(
            header(ACCESS_CONTROL_ALLOW_ORIGIN),
            Some("https://app.example")
        );
        assert_eq!(header(ACCESS_CONTROL_ALLOW_METHODS), Some("GET, POST"));
        assert_eq!(header(ACCESS_CONTROL_ALLOW_CREDENTIALS), Some("true"));
        // A refused origin is told nothing, whatever the method.
        let reject = refusal(
            &cors,
            &mut asking("https://evil.example", "PUT"),
            &mut context(),
        )
        .expect("refused");
        assert_eq!(reject.reason, Reason::OriginNotAllowed);
        assert!(reject.headers.is_empty(), "{:?}", reject.headers);
        let mut allowed = asking("https://app.example", "POST");
        assert!(matches!(
            cors.on_request(&mut allowed, &mut context()),
            Flow::Respond(resp) if resp.status() == StatusCode::NO_CONTENT
        ));
    }

    #[test]
    fn a_websocket_handshake_from_an_origin_not_allowed_is_refused() {
        let cors = settings(APP).cors(&[]);
        let get = |origin: Option<&str>| {
            let mut req = Request::get("/ws");
            if let Some(origin) = origin {
                req = req.header(ORIGIN, origin);
            }
            req.body(()).unwrap().into_parts().0
        };
        let upgrading = || {
            let mut ctx = context();
            ctx.upgrade = Some(HeaderValue::from_static("WebSocket"));
            ctx
        };
        let evil = Some("https://evil.example");
        let reject = refusal(&cors, &mut get(evil), &mut upgrading()).expect("refused");
        assert_eq!(
            (reject.status, reject.reason),
            (StatusCode::FORBIDDEN, Reason::OriginNotAllowed)
        );
        // HTTP/2's extended CONNECT, were it let through before the chain.
        let mut connect = Request::connect("https://gatehouse.test/ws")
            .header(ORIGIN, "https://evil.example")
            .extension(Protocol::from_static("websocket"))
            .body(())
            .unwrap()
            .into_parts()
            .0;
        assert!(refusal(&cors, &mut connect, &mut context()).is_some());
        // An allowed origin, a client without `Origin`, a plain request or another upgrade
        // from a refused origin: through.
        let app = Some("https://app.example");
        assert!(refusal(&cors, &mut get(app), &mut upgrading()).is_none());
        assert!(refusal(&cors, &mut get(None), &mut upgrading()).is_none());
        assert!(refusal(&cors, &mut get(evil), &mut context()).is_none());
        let mut h2c = context();
        h2c.upgrade = Some(HeaderValue::from_static("h2c"));
        assert!(refusal(&cors, &mut get(evil), &mut h2c).is_none());
    }

    #[test]
    fn origin_rules() {
        assert!(OriginRule::new("https://app.example.com").matches("https://APP.example.com"));
        assert!(!OriginRule::new("https://app.example.com").matches("http://app.example.com"));
        let sub = OriginRule::new("https://*.example.com");
        assert!(sub.matches("https://a.example.com"));
        assert!(sub.matches("https://a.b.example.com"));
        assert!(!sub.matches("https://example.com"));
        assert!(!sub.matches("https://evilexample.com"));
        assert!(!sub.matches("http://a.example.com"));
    }
}
