//! The engine: one request's path from its head to its record, the same whichever
//! protocol the server read it with.
//!
//! [`Proxy::handle`] reads top to bottom: gatehouse's own checks, the chain's request
//! phases, the upstream exchange (the request body through the chain's body phases), the
//! chain's response phases, and finally, when the [`Session`] ends with the response body,
//! the one last phase that records metrics and the audit event ([`session`]). A [`Proxy`]
//! is one config generation: a reload builds a new one while in-flight requests finish on
//! the old.

mod body;
mod forwarded;
pub mod session;
#[cfg(test)]
mod tests;
mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ALLOW, CONNECTION, COOKIE, HOST, USER_AGENT};
use http::{request, response, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as HttpBody;
use prometheus_client::metrics::counter::Counter;

pub use body::{Body, Local, RequestBody};
pub use forwarded::{client_ip, Client};
pub use session::{ResponseBody, Session};
pub use upstream::{App, Exchange, Outbound, Upstream};

use crate::audit::{Audit, Decision};
use crate::chain::{path, Answer, Chain, Context, Filters, Reason, Reject, Trail};
use crate::config::value::{Cidr, UpstreamUrl};
use crate::config::{Underscores, UpstreamConfig, UpstreamProtocol};
use crate::grpc;
use crate::logging::Throttle;
use crate::middleware::Handles;
use crate::pool::{self, Endpoint, Target};
use crate::protocol::h1::request::is_host;
use crate::trace::Tracer;
use crate::Config;

/// One config generation's request handling.
pub struct Proxy {
    /// Shared with request bodies that an HTTP/2 connection's task sends.
    chain: Arc<Chain>,
    upstream: Endpoint,
    timeout: Duration,
    preserve_host: bool,
    trusted_proxies: Vec<Cidr>,
    /// Protocols an `Upgrade` may ask for (`server.upgrades`, lower case).
    upgrades: Vec<String>,
    underscores: Underscores,
    handles: Arc<Handles>,
    audit: Option<Arc<Audit>>,
    tracer: Option<Arc<Tracer>>,
    /// `gatehouse_upstream_errors_total{kind}`, by [`pool::Error::KINDS`] index.
    upstream_errors: Box<[Counter]>,
    /// The log lines of upstream failures, by the same index.
    upstream_warnings: Box<[Throttle]>,
}

impl Proxy {
    /// Builds the chain and the upstream of `config` with the server's handles (metrics,
    /// state kept across reloads), audit pipeline and tracer.
    pub fn new(
        config: &Config,
        handles: &Arc<Handles>,
        audit: Option<Arc<Audit>>,
        tracer: Option<Arc<Tracer>>,
    ) -> Proxy {
        Proxy {
            chain: Arc::new(crate::middleware::chain(&config.middleware, handles)),
            upstream: upstream_endpoint(&config.upstream, handles),
            timeout: config.upstream.timeout.0,
            preserve_host: config.upstream.preserve_host,
            trusted_proxies: config.server.trusted_proxies.clone(),
            upgrades: config
                .server
                .upgrades
                .iter()
                .map(|u| u.to_ascii_lowercase())
                .collect(),
            underscores: config.server.underscores_in_headers,
            upstream_errors: pool::Error::KINDS
                .iter()
                .map(|kind| handles.metrics.upstream_errors(kind))
                .collect(),
            upstream_warnings: pool::Error::KINDS
                .iter()
                .map(|_| Throttle::default())
                .collect(),
            handles: handles.clone(),
            audit,
            tracer,
        }
    }

    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    pub fn upstream(&self) -> &Endpoint {
        &self.upstream
    }

    /// Serves one request, never failing: every problem becomes a response. `start` is
    /// when its head arrived; `upgrade` the protocol an HTTP/1.1 `Upgrade` asked for.
    /// The returned body carries the request's session to its end.
    pub async fn handle<B>(
        self: &Arc<Self>,
        req: Request<B>,
        client: &Client,
        start: Instant,
        upgrade: Option<HeaderValue>,
    ) -> Response<ResponseBody>
    where
        B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
    {
        self.handle_with(req, client, start, upgrade, &App, ())
            .await
    }

    /// [`Proxy::handle`], with the request going to `upstream` and every step told to
    /// `trail`: how `explain` runs a request, through the very phases that serve it.
    pub async fn handle_with<B, U, T>(
        self: &Arc<Self>,
        req: Request<B>,
        client: &Client,
        start: Instant,
        upgrade: Option<HeaderValue>,
        upstream: &U,
        trail: T,
    ) -> Response<ResponseBody>
    where
        B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
        U: Upstream,
        T: Trail,
    {
        let (mut parts, body) = req.into_parts();
        let mut session = self.session(&parts, client, start);
        let resp = self
            .serve(
                &mut parts,
                body,
                client,
                upgrade,
                &mut session,
                upstream,
                trail,
            )
            .await;
        session.status = Some(resp.status());
        resp.map(|body| ResponseBody::new(body, session))
    }

    /// The answer to a request arriving once the server has stopped taking new work.
    pub fn refuse_draining<B>(
        self: &Arc<Self>,
        req: Request<B>,
        client: &Client,
        start: Instant,
    ) -> Response<ResponseBody> {
        let (parts, _) = req.into_parts();
        let mut session = self.session(&parts, client, start);
        let reject = Reject::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Reason::Draining,
            "gatehouse is shutting down",
        )
        .with_header(CONNECTION, HeaderValue::from_static("close"));
        let resp = self.answer(Answer::Reject(reject), &mut session, ());
        session.status = Some(resp.status());
        resp.map(|body| ResponseBody::new(body, session))
    }

    /// Records a request head the HTTP/1 parser refused (`400`, `431`): it never became a
    /// request, so its record has what its first `line` says (the method and target, or
    /// `-` and `*` where they cannot be read), the status, and the reason. `sent`: the
    /// answer's body bytes, when it was written whole.
    pub fn refused(
        self: &Arc<Self>,
        client: &Client,
        line: &[u8],
        status: StatusCode,
        reason: Reason,
        sent: Option<u64>,
    ) {
        let mut words = line.trim_ascii().split(|&b| b == b' ');
        let method = words.next().and_then(|m| Method::from_bytes(m).ok());
        let uri = words
            .next()
            .and_then(|t| Uri::try_from(t).ok())
            .filter(|u| u.path().starts_with('/'));
        let ctx = Context::new(
            client.ip,
            client.ip,
            client.tls,
            Instant::now(),
            client.worker,
        );
        let mut s = Session::new(
            self.clone(),
            ctx,
            method.unwrap_or_else(|| Method::from_bytes(b"-").expect("a token")),
            uri.unwrap_or_else(|| Uri::from_static("*")),
            None,
        );
        s.status = Some(status);
        s.decision = Decision::Deny;
        s.reason = Some(reason);
        s.bytes_out = sent.unwrap_or(0);
        s.completed = sent.is_some();
        // Dropping the session here writes its record.
    }

    fn session(
        self: &Arc<Self>,
        parts: &request::Parts,
        client: &Client,
        start: Instant,
    ) -> Box<Session> {
        let client_ip = client_ip(client.ip, &parts.headers, &self.trusted_proxies);
        let mut ctx = Context::new(client_ip, client.ip, client.tls, start, client.worker);
        if let Some(tracer) = &self.tracer {
            ctx.trace.ids = Some(tracer.begin(&parts.headers));
        }
        let mut session = Session::new(
            self.clone(),
            ctx,
            parts.method.clone(),
            parts.uri.clone(),
            client_host(parts),
        );
        session.version = parts.version;
        if session.ctx.trace.sampled() {
            session.user_agent = parts.headers.get(USER_AGENT).cloned();
        }
        session.grpc = grpc::is_grpc(&parts.headers);
        // As the client sent them, before a middleware can change them, and whatever the
        // request's end: a refused request's event has them too.
        if let Some(audit) = &self.audit {
            session.headers = audit.capture_headers(&parts.headers);
        }
        session
    }

    /// One request's phases, in order (Pingora's names): `request_filter` (gatehouse's own
    /// checks, then the chain's request phases), the upstream request (its body through
    /// the chain's body phases, to the app or to what `explain` takes as the app:
    /// [`Upstream`]), `response_filter` (the chain's response phases, bottom to top) and
    /// `response_body_filter` (the filters those phases asked for, wrapped around the
    /// body: they run as it streams to the client).
    /// The last phase, logging, runs when the session ends (`session.rs`). `trail` is told
    /// each step (`explain`'s report); serving passes `()`, which costs nothing.
    #[allow(clippy::too_many_arguments)]
    async fn serve<B, U, T>(
        &self,
        parts: &mut request::Parts,
        body: B,
        client: &Client,
        upgrade: Option<HeaderValue>,
        s: &mut Session,
        upstream: &U,
        mut trail: T,
    ) -> Response<Body>
    where
        B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
        U: Upstream,
        T: Trail,
    {
        if let Some(answer) = self
            .request_filter(parts, upgrade.as_ref(), s, &mut trail)
            .await
        {
            return self.answer(answer, s, trail);
        }
        let sent = Instant::now();
        let outbound = Outbound {
            parts,
            body,
            client,
            upgrade,
            sent,
        };
        let Exchange {
            result,
            answered,
            refused,
        } = upstream.forward(self, outbound, s).await;
        let received = s.bytes_in + s.upload.as_ref().map_or(0, |u| u.received());
        let phases = self.chain.body_phases(&s.ctx);
        trail.body(phases, received, refused.as_ref().map(|(i, r)| (*i, r)));
        s.ctx.upstream_time = Some(answered - sent);
        s.ctx.upstream_answered = Some(answered);
        let (mut head, body) = match result {
            Ok(answer) => answer,
            Err(pool::Error::Body) => {
                let answer = match refused {
                    Some((i, reject)) => {
                        s.ctx.denied_by = Some(i);
                        reject
                    }
                    None => Reject::new(
                        StatusCode::BAD_REQUEST,
                        Reason::ClientBodyFailed,
                        "the request body could not be read",
                    ),
                };
                return self.answer(Answer::Reject(answer), s, trail);
            }
            Err(e) => return self.answer(Answer::Reject(self.upstream_failed(e, s)), s, trail),
        };
        s.upstream_status = Some(head.status);
        if s.grpc {
            // A trailers-only answer carries its status in the head.
            s.grpc_status = grpc::status(&head.headers);
        }
        // The client's protocol decides the response's, not the upstream's.
        head.version = Version::default();
        let filters = self.response_filter(&mut head, s, trail);
        Response::from_parts(head, body.filtered(filters))
    }

    /// The chain's response phases; a refusal one of them made is the record's decision.
    fn response_filter<T: Trail>(
        &self,
        head: &mut response::Parts,
        s: &mut Session,
        trail: T,
    ) -> Filters {
        let filters = self.chain.on_response_with(head, &mut s.ctx, trail);
        if let Some(reason) = s.ctx.response_refusal.take() {
            s.decision = Decision::Deny;
            s.reason = Some(reason);
        }
        filters
    }

    /// gatehouse's own checks, then the chain's request phases; the answer, if one of them
    /// answered.
    async fn request_filter<T: Trail>(
        &self,
        parts: &mut request::Parts,
        upgrade: Option<&HeaderValue>,
        s: &mut Session,
        trail: &mut T,
    ) -> Option<Answer> {
        // Scopes match the normalized path; the Uri clone shares its bytes, so a plain
        // path is borrowed, not copied, while middlewares hold `parts` mutably.
        let uri = parts.uri.clone();
        let admitted = Self::check(parts, self.underscores)
            .and_then(|()| path::normalize(uri.path()).map_err(Reject::from));
        let path = match admitted {
            Ok(path) => path,
            Err(reject) => {
                trail.refused(&reject);
                return Some(Answer::Reject(reject));
            }
        };
        s.ctx.upgrade = upgrade.cloned();
        self.chain
            .on_request_with(parts, &path, &mut s.ctx, trail)
            .await
    }

    /// The request body on its way out, through the chain's body phases of the entries
    /// whose request phase ran, its progress kept in the body.
    pub fn request_body<B>(&self, body: B, ctx: &mut Context) -> RequestBody<B, Local<'_>> {
        let phases = self.chain.body_phases(ctx);
        let state = std::mem::take(&mut ctx.body);
        RequestBody::new(
            body,
            Local::new(&self.chain),
            phases,
            self.underscores,
            state,
        )
    }

    /// Refuses, or mends, what no middleware should ever see: what HTTP/1's parser
    /// refuses it refused already; these rules hold for HTTP/2 too. (`explain` applies
    /// them as well.) `underscores`: `server.underscores_in_headers`.
    pub fn check(parts: &mut request::Parts, underscores: Underscores) -> Result<(), Reject> {
        // A reverse proxy makes no tunnels to elsewhere.
        if parts.method == Method::CONNECT {
            return Err(Reject::new(
                StatusCode::METHOD_NOT_ALLOWED,
                Reason::MethodNotAllowed,
                "CONNECT is not served: gatehouse is a reverse proxy",
            )
            .with_header(
                ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            ));
        }
        // nginx's rule: methods are case-sensitive, but apps upper-case them, so `post`
        // would slip past a `methods = ["POST"]` scope and still reach the POST handler.
        if parts
            .method
            .as_str()
            .bytes()
            .any(|b| b.is_ascii_lowercase())
        {
            return Err(Reject::new(
                StatusCode::BAD_REQUEST,
                Reason::LowercaseMethod,
                "the request method has a lowercase letter: methods are upper case",
            ));
        }
        if parts.uri.path() == "*" {
            return Err(Reject::new(
                StatusCode::BAD_REQUEST,
                Reason::BadRequest,
                "OPTIONS * is not served",
            ));
        }
        // An HTTP/2 `:path` of `?a=1` would become an invalid HTTP/1 request line.
        if !parts
            .uri
            .path_and_query()
            .is_some_and(|p| p.as_str().starts_with('/'))
        {
            return Err(Reject::new(
                StatusCode::BAD_REQUEST,
                Reason::BadRequest,
                "the request path must start with /",
            ));
        }
        if parts.version == Version::HTTP_2 {
            check_h2(parts)?;
        }
        if underscores != Underscores::Allow
            && parts.headers.keys().any(|name| name.as_str().contains('_'))
        {
            if underscores == Underscores::Reject {
                return Err(Reject::new(
                    StatusCode::BAD_REQUEST,
                    Reason::UnderscoreInHeader,
                    "a request header name has an underscore (server.underscores_in_headers = \"reject\")",
                ));
            }
            let names: Vec<_> = parts
                .headers
                .keys()
                .filter(|name| name.as_str().contains('_'))
                .cloned()
                .collect();
            for name in names {
                parts.headers.remove(name);
            }
        }
        Ok(())
    }

    /// The answer to an upstream failure, logged and counted.
    fn upstream_failed(&self, e: pool::Error, s: &mut Session) -> Reject {
        s.upstream_error = pool::Error::KINDS.iter().position(|k| *k == e.kind());
        // A dead or saturated app fails every request alike: one line per kind and interval.
        let throttle = s.upstream_error.map(|kind| &self.upstream_warnings[kind]);
        if let Some(suppressed) = throttle.map_or(Some(0), Throttle::ready) {
            tracing::warn!(
                kind = e.kind(),
                error = %e,
                suppressed,
                "upstream request failed (logged at most every 10s per kind; suppressed: how many more since the last line)"
            );
        }
        match e {
            pool::Error::ConnectTimeout | pool::Error::Timeout => Reject::new(
                StatusCode::GATEWAY_TIMEOUT,
                Reason::UpstreamTimeout,
                if matches!(e, pool::Error::Timeout) {
                    "the upstream did not answer in time"
                } else {
                    "the upstream did not accept a connection in time"
                },
            ),
            pool::Error::Connect(_) => Reject::new(
                StatusCode::BAD_GATEWAY,
                Reason::UpstreamFailed,
                "the upstream refused the connection",
            ),
            pool::Error::Reset(_) => Reject::new(
                StatusCode::BAD_GATEWAY,
                Reason::UpstreamFailed,
                "the upstream closed the connection",
            ),
            pool::Error::Invalid(_) | pool::Error::Body => Reject::new(
                StatusCode::BAD_GATEWAY,
                Reason::UpstreamFailed,
                "the upstream sent an invalid response",
            ),
            pool::Error::Overloaded => Reject::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Reason::UpstreamOverloaded,
                "the upstream has no free connection (upstream.max_connections)",
            ),
        }
    }

    /// Sends an answer gatehouse (or a middleware) made back up the chain, and notes what
    /// it means for the record.
    fn answer<T: Trail>(&self, answer: Answer, s: &mut Session, trail: T) -> Response<Body> {
        let resp = match answer {
            Answer::Respond(resp) => resp,
            Answer::Reject(reject) => {
                s.decision = if reject.reason.is_upstream_failure() {
                    Decision::Error
                } else {
                    Decision::Deny
                };
                s.reason = Some(reject.reason);
                if s.grpc {
                    s.grpc_status = Some(grpc::status_for(reject.status));
                }
                reject.render(s.ctx.request_id.as_ref(), s.grpc)
            }
        };
        let (mut head, bytes) = resp.into_parts();
        let filters = self.response_filter(&mut head, s, trail);
        Response::from_parts(head, Body::full(bytes).filtered(filters))
    }
}

/// HTTP/2's own rules for the request's authority (RFC 9113 §8.3.1), and its cookie
/// crumbs joined for an HTTP/1 app.
fn check_h2(parts: &mut request::Parts) -> Result<(), Reject> {
    let bad = |message| {
        Err(Reject::new(
            StatusCode::BAD_REQUEST,
            Reason::BadRequest,
            message,
        ))
    };
    // `:authority` and `host` must agree; one `host` at most.
    let mut hosts = parts.headers.get_all(HOST).iter();
    let (first, second) = (hosts.next(), hosts.next());
    let authority = parts.uri.authority().map(|a| a.as_str().as_bytes());
    if second.is_some() || first.zip(authority).is_some_and(|(h, a)| h.as_bytes() != a) {
        return bad("the request's :authority and Host disagree");
    }
    // No user info (`user:pw@`), and a port of digits, as HTTP/1's `Host` must be.
    if !authority
        .or(first.map(HeaderValue::as_bytes))
        .is_none_or(is_host)
    {
        return bad("the request's :authority is not a host with an optional port");
    }
    if first.is_none() {
        if let Some(host) = client_host(parts) {
            parts.headers.insert(HOST, host);
        }
    }
    // A client may send each cookie as its own field (RFC 9113 §8.2.3); an HTTP/1 app
    // must get one line joined with "; ", or a WSGI server joins them with ",".
    if parts.headers.get_all(COOKIE).iter().nth(1).is_some() {
        let mut joined = Vec::new();
        for crumb in parts.headers.get_all(COOKIE) {
            if !joined.is_empty() {
                joined.extend_from_slice(b"; ");
            }
            joined.extend_from_slice(crumb.as_bytes());
        }
        let joined = HeaderValue::from_bytes(&joined).expect("joined header values are valid");
        parts.headers.insert(COOKIE, joined);
    }
    Ok(())
}

/// The upstream of `config`: the pool has a shard per worker plus the control thread's,
/// and its connections are bounded by `max_connections`.
fn upstream_endpoint(config: &UpstreamConfig, handles: &Handles) -> Endpoint {
    let target = match &config.url {
        UpstreamUrl::Tcp { host, port } => Target::Tcp {
            host: host.clone(),
            port: *port,
        },
        UpstreamUrl::Unix(path) => Target::Unix(path.clone()),
    };
    let m = &handles.metrics;
    let limit = pool::Limit::new(
        config.max_connections,
        config.max_pending,
        m.upstream_connections.clone(),
        m.upstream_pending.clone(),
    );
    let endpoint = Endpoint::new(
        target,
        config.connect_timeout.0,
        config.idle_timeout.0,
        handles.workers + 1,
    )
    .with_limit(limit);
    match config.protocol {
        UpstreamProtocol::Http1 => endpoint,
        UpstreamProtocol::H2c => endpoint.with_h2(),
    }
}

/// The request's Host as the client sent it: the header, else the URI's authority (HTTP/2).
fn client_host(parts: &request::Parts) -> Option<HeaderValue> {
    parts.headers.get(HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}
