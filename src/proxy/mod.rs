//! Proxying one request: down the chain, to the upstream, and back up the chain.
//!
//! A [`Proxy`] is everything one config generation needs to serve requests (chain,
//! upstream, settings); a reload swaps in a new one while in-flight requests finish on
//! the old.

pub mod body;
pub mod forwarded;
pub mod h1;
pub mod upstream;

use std::net::IpAddr;
use std::time::Instant;

use bytes::Bytes;
use http::header::{CONNECTION, HOST};
use http::{HeaderValue, Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

pub use body::{Body, ClientBody, RequestBody};
use h1::Forwarded;
use tokio::io::AsyncWriteExt;
use upstream::{Answer, Upgraded, Upstream, UpstreamError};

use crate::audit;
use crate::chain::{path, reply, Chain, Context};
use crate::config::value::{ByteSize, Cidr};
use crate::config::Config;
use crate::metrics;
use crate::middleware::body_limit::too_large_message;

/// What the server knows about the client connection a request came on.
pub struct Client {
    pub ip: IpAddr,
    /// `ip` as an `x-forwarded-for` entry, formatted once per connection.
    pub forwarded_for: HeaderValue,
    /// `x-forwarded-proto`: `http` or `https`.
    pub proto: HeaderValue,
    pub tls: bool,
}

impl Client {
    pub fn new(ip: IpAddr, tls: bool) -> Client {
        let ip = ip.to_canonical();
        Client {
            ip,
            forwarded_for: HeaderValue::from_str(&ip.to_string())
                .expect("an IP is a valid header value"),
            proto: HeaderValue::from_static(if tls { "https" } else { "http" }),
            tls,
        }
    }
}

/// One config generation's request handling.
pub struct Proxy {
    chain: Chain,
    upstream: Upstream,
    trusted_proxies: Vec<Cidr>,
    max_header_bytes: usize,
    preserve_host: bool,
}

impl Proxy {
    pub fn new(config: &Config) -> Proxy {
        Proxy {
            chain: Chain::build(&config.middleware),
            upstream: Upstream::new(&config.upstream, config.workers()),
            trusted_proxies: config.server.trusted_proxies.clone(),
            max_header_bytes: config.server.max_header_bytes.0 as usize,
            preserve_host: config.upstream.preserve_host,
        }
    }

    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Serves one request. Never fails: every problem becomes a response.
    /// `start` is when the request head arrived. The event, when audit wants one, is
    /// finished and recorded by whoever sends the response body.
    pub async fn handle(
        &self,
        req: Request<ClientBody>,
        client: &Client,
        start: Instant,
    ) -> (Response<Body>, Option<Box<audit::Event>>) {
        let (mut parts, body) = req.into_parts();
        let mut ctx = Context::new(
            forwarded::client_ip(client.ip, &parts.headers, &self.trusted_proxies),
            start,
        );
        ctx.peer = client.ip;
        ctx.tls = client.tls;
        let mut event = None;
        let resp = self
            .serve(&mut parts, body, client, &mut ctx, &mut event)
            .await;
        if let Some(e) = event.as_deref_mut() {
            e.status = resp.status().as_u16();
            e.request_id = ctx.request_id;
            e.subject = ctx.subject;
            e.upstream = ctx.upstream_time;
            e.denied_by = ctx.denied_by.map(|i| self.chain.name(i).clone());
        }
        (resp, event)
    }

    /// The answer to a request arriving once the server has stopped taking new work.
    pub fn refuse_draining(
        &self,
        req: Request<ClientBody>,
        client: &Client,
        start: Instant,
    ) -> (Response<Body>, Option<Box<audit::Event>>) {
        let event = audit::get().filter(|a| a.wants(true)).map(|a| {
            let (parts, _) = req.into_parts();
            let ip = forwarded::client_ip(client.ip, &parts.headers, &self.trusted_proxies);
            let mut e = a.capture(&parts, &parts.uri, client_host(&parts), ip, start);
            e.decision = audit::Decision::Deny;
            e.status = StatusCode::SERVICE_UNAVAILABLE.as_u16();
            e
        });
        (draining_response(), event)
    }

    async fn serve(
        &self,
        parts: &mut http::request::Parts,
        body: ClientBody,
        client: &Client,
        ctx: &mut Context,
        event: &mut Option<Box<audit::Event>>,
    ) -> Response<Body> {
        // Scopes match the normalized path; the Uri clone shares its bytes, so a plain
        // path is borrowed, not copied, while middlewares hold `parts` mutably.
        let uri = parts.uri.clone();
        let path = self.check_head(parts).and_then(|()| {
            path::normalize(uri.path())
                .map_err(|_| (StatusCode::BAD_REQUEST, "the request path has dot-segments"))
        });
        let answer = match path {
            Ok(path) => self.chain.on_request(parts, &path, ctx).await,
            Err((status, message)) => Some(reply::error(status, message, None)),
        };
        let audit = audit::get();
        // An answer gatehouse gives itself is a refusal only with an error status: a CORS
        // preflight's `204` lets the browser go on, so it is `allow`.
        let denied = answer
            .as_ref()
            .is_some_and(|a| a.status().is_client_error() || a.status().is_server_error());
        if let Some(a) = audit.filter(|a| a.wants(denied)) {
            let mut e = a.capture(parts, &uri, client_host(parts), ctx.client_ip, ctx.start);
            if denied {
                e.decision = audit::Decision::Deny;
            }
            *event = Some(e);
        }
        if let Some(answer) = answer {
            body::linger(body);
            return self.respond(answer, ctx);
        }

        let upgrade = parts.version == Version::HTTP_11 && forwarded::is_upgrade(&parts.headers);
        let client_upgrade = if upgrade {
            parts.extensions.remove::<OnUpgrade>()
        } else {
            None
        };
        let host = self.prepare_upstream_request(parts, upgrade);
        let forwarded = Forwarded {
            peer: &client.forwarded_for,
            proto: &client.proto,
            host: host.as_ref(),
        };
        let mut body = RequestBody::new(body, ctx.body_limit.map(|(limit, _)| limit));

        let sent = Instant::now();
        let (result, answered) = self.upstream.send(parts, &forwarded, &mut body, sent).await;
        let upstream_time = answered - sent;
        ctx.upstream_time = Some(upstream_time);
        ctx.upstream_answered = Some(answered);
        metrics::global().upstream_duration.observe(upstream_time);
        if let Some(e) = event.as_deref_mut() {
            e.bytes_in = body.bytes_read();
        }
        // The upstream may have answered without reading all of it (or the limit cut it).
        body::linger(body.into_inner());
        let (mut head, body) = match result {
            // The codec left the upstream's hop-by-hop headers out already.
            Ok(Answer::Response(head, body)) => (head, Body::Upstream(body)),
            Ok(Answer::Upgrade(head, upstream)) => {
                tunnel(client_upgrade, upstream);
                (head, Body::full(Bytes::new()))
            }
            Err(e) => {
                let resp = self.upstream_failed(e, ctx);
                let denied = ctx.denied_by.is_some();
                if event.is_none() && audit.is_some_and(|a| a.wants(denied)) {
                    // Only a streamed body over the limit turns an allowed request denied.
                    let a = audit.expect("checked");
                    *event = Some(a.capture(parts, &uri, host, ctx.client_ip, ctx.start));
                }
                if let Some(e) = event.as_deref_mut() {
                    e.decision = if denied {
                        audit::Decision::Deny
                    } else {
                        audit::Decision::Error
                    };
                }
                return resp;
            }
        };
        // The client's protocol decides the response's, not the upstream's.
        head.version = Version::default();
        self.chain.on_response(&mut head, ctx);
        Response::from_parts(head, body)
    }

    /// Refuses what no middleware should ever see.
    fn check_head(&self, parts: &http::request::Parts) -> Result<(), (StatusCode, &'static str)> {
        let head_bytes = parts.uri.path_and_query().map_or(1, |p| p.as_str().len())
            + parts
                .headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len() + 4)
                .sum::<usize>();
        if head_bytes > self.max_header_bytes {
            return Err((
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "the request head is larger than server.max_header_bytes",
            ));
        }
        // RFC 9112 §3.2: exactly one Host in HTTP/1.1, so gatehouse and the app agree on it.
        let mut hosts = parts.headers.get_all(HOST).iter();
        match (hosts.next(), hosts.next()) {
            (_, Some(_)) => Err((
                StatusCode::BAD_REQUEST,
                "the request has more than one Host header",
            )),
            (None, _) if parts.version == Version::HTTP_11 && parts.uri.authority().is_none() => {
                Err((StatusCode::BAD_REQUEST, "the request has no Host header"))
            }
            _ => Ok(()),
        }
    }

    /// Upstream-bound headers: hop-by-hop removed, `Host` set. Returns the client's host,
    /// for `x-forwarded-host` (the codec writes the `x-forwarded-*` headers).
    fn prepare_upstream_request(
        &self,
        parts: &mut http::request::Parts,
        upgrade: bool,
    ) -> Option<HeaderValue> {
        let host = client_host(parts);
        forwarded::strip_hop_by_hop(&mut parts.headers, upgrade);
        let upstream_host = match (&host, self.preserve_host) {
            (Some(host), true) => host.clone(),
            _ => self.upstream.authority().clone(),
        };
        parts.headers.insert(HOST, upstream_host);
        host
    }

    fn upstream_failed(&self, e: UpstreamError, ctx: &mut Context) -> Response<Body> {
        let resp = match (&e, ctx.body_limit) {
            (UpstreamError::BodyTooLarge, Some((limit, index))) => {
                ctx.denied_by = Some(index);
                ctx.reject(e.status(), &too_large_message(ByteSize(limit)))
            }
            _ => {
                if e.is_upstream_fault() {
                    metrics::global().upstream_error(e.kind());
                }
                tracing::warn!(kind = e.kind(), error = ?e, "upstream request failed");
                ctx.reject(e.status(), e.message())
            }
        };
        self.respond(resp, ctx)
    }

    /// Sends an answer gatehouse made back up the chain.
    fn respond(&self, resp: Response<Bytes>, ctx: &mut Context) -> Response<Body> {
        let (mut head, bytes) = resp.into_parts();
        if let Some(i) = ctx.denied_by {
            self.chain.count_rejection(i, head.status);
        }
        self.chain.on_response(&mut head, ctx);
        Response::from_parts(head, Body::full(bytes))
    }
}

/// The request's Host as the client sent it: the header, else the URI's authority (HTTP/2).
fn client_host(parts: &http::request::Parts) -> Option<HeaderValue> {
    parts.headers.get(HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

/// After a `101 Switching Protocols`, splices the client and upstream connections.
fn tunnel(client: Option<OnUpgrade>, mut upstream: Upgraded) {
    let Some(client) = client else {
        tracing::warn!("upstream switched protocols on a request that did not ask to");
        return;
    };
    tokio::spawn(async move {
        let mut client = match client.await {
            Ok(client) => TokioIo::new(client),
            Err(e) => return tracing::debug!(error = %e, "client upgrade failed"),
        };
        // Bytes the upstream sent right after its 101 were read with the head.
        if !upstream.read.is_empty() {
            if let Err(e) = client.write_all(&upstream.read).await {
                return tracing::debug!(error = %e, "upgraded connection ended");
            }
            upstream.read.clear();
        }
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream.io).await {
            tracing::debug!(error = %e, "upgraded connection ended");
        }
    });
}

/// The answer to requests that arrive once the server has stopped taking new work.
pub fn draining_response() -> Response<Body> {
    let (mut head, bytes) = reply::error(
        StatusCode::SERVICE_UNAVAILABLE,
        "gatehouse is shutting down",
        None,
    )
    .into_parts();
    head.headers
        .insert(CONNECTION, HeaderValue::from_static("close"));
    Response::from_parts(head, Body::full(bytes))
}
