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
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

pub use body::{Body, RequestBody};
use h1::Forwarded;
use tokio::io::AsyncWriteExt;
use upstream::{Answer, Upgraded, Upstream, UpstreamError};

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
}

impl Client {
    pub fn new(ip: IpAddr, tls: bool) -> Client {
        let ip = ip.to_canonical();
        Client {
            ip,
            forwarded_for: HeaderValue::from_str(&ip.to_string())
                .expect("an IP is a valid header value"),
            proto: HeaderValue::from_static(if tls { "https" } else { "http" }),
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
    /// `start` is when the request head arrived.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        client: &Client,
        start: Instant,
    ) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        let mut ctx = Context::new(
            forwarded::client_ip(client.ip, &parts.headers, &self.trusted_proxies),
            start,
        );

        // Scopes match the normalized path; the Uri clone shares its bytes, so a plain
        // path is borrowed, not copied, while middlewares hold `parts` mutably.
        let uri = parts.uri.clone();
        let path = self.check_head(&parts).and_then(|()| {
            path::normalize(uri.path())
                .map_err(|_| (StatusCode::BAD_REQUEST, "the request path has dot-segments"))
        });
        let answer = match path {
            Ok(path) => self.chain.on_request(&mut parts, &path, &mut ctx).await,
            Err((status, message)) => Some(reply::error(status, message, None)),
        };
        if let Some(answer) = answer {
            body::linger(body);
            return self.respond(answer, &mut ctx);
        }

        let upgrade = parts.version == Version::HTTP_11 && forwarded::is_upgrade(&parts.headers);
        let client_upgrade = if upgrade {
            parts.extensions.remove::<OnUpgrade>()
        } else {
            None
        };
        let host = self.prepare_upstream_request(&mut parts, upgrade);
        let forwarded = Forwarded {
            peer: &client.forwarded_for,
            proto: &client.proto,
            host: host.as_ref(),
        };
        let mut body = RequestBody::new(body, ctx.body_limit.map(|(limit, _)| limit));

        let sent = Instant::now();
        let result = self.upstream.send(&parts, &forwarded, &mut body).await;
        let upstream_time = sent.elapsed();
        ctx.upstream_time = Some(upstream_time);
        metrics::global().upstream_duration.observe(upstream_time);
        // The upstream may have answered without reading all of it (or the limit cut it).
        body::linger(body.into_inner());
        let (mut head, body) = match result {
            // The codec left the upstream's hop-by-hop headers out already.
            Ok(Answer::Response(head, body)) => (head, Body::Upstream(body)),
            Ok(Answer::Upgrade(head, upstream)) => {
                tunnel(client_upgrade, upstream);
                (head, Body::full(Bytes::new()))
            }
            Err(e) => return self.upstream_failed(e, &mut ctx),
        };
        // The client's protocol decides the response's, not the upstream's.
        head.version = Version::default();
        self.chain.on_response(&mut head, &mut ctx);
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
        let host = parts.headers.get(HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
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
