//! The upstream request phase: where a request goes once the chain let it through. The
//! app, over HTTP/1.1 or HTTP/2 ([`App`]); for `explain`, an answer taken as the app's.
//! Either way the request body goes through the chain's body phases as it is read.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{request, response, Extensions, HeaderValue, Request, Uri, Version};
use http_body::Body as HttpBody;

use super::body::{Body, Progress, RequestBody, Shared};
use super::{forwarded, Client, Proxy, Session};
use crate::chain::Reject;
use crate::grpc;
use crate::pool;
use crate::protocol::h1::request::{encode, Forwarded};

/// Where the upstream request phase sends a request.
pub trait Upstream: Sync {
    /// Sends the request, its body through the body phases ([`Proxy::request_body`]), and
    /// waits for the answer's head.
    fn forward<'a, B>(
        &'a self,
        proxy: &'a Proxy,
        out: Outbound<'a, B>,
        s: &'a mut Session,
    ) -> impl Future<Output = Exchange> + Send + 'a
    where
        B: HttpBody<Data = Bytes> + Unpin + Send + 'static;
}

/// A request the chain let through, on its way out.
pub struct Outbound<'a, B> {
    pub parts: &'a mut request::Parts,
    pub body: B,
    pub client: &'a Client,
    /// The protocol an HTTP/1.1 `Upgrade` asked for.
    pub upgrade: Option<HeaderValue>,
    /// When the upstream request phase began.
    pub sent: Instant,
}

/// How the upstream request went.
pub struct Exchange {
    /// The answer's head and its body to stream, or why none came.
    pub result: Result<(response::Parts, Body), pool::Error>,
    pub answered: Instant,
    /// The body phase that refused the body, and why (the result is then
    /// [`pool::Error::Body`]).
    pub refused: Option<(usize, Reject)>,
}

/// The app, as `[upstream]` says where it is and how to speak to it.
pub struct App;

impl Upstream for App {
    async fn forward<B>(&self, proxy: &Proxy, out: Outbound<'_, B>, s: &mut Session) -> Exchange
    where
        B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
    {
        proxy.to_app(out, s).await
    }
}

impl Proxy {
    /// The exchange with the app: HTTP/1.1 (an upgrade too), or HTTP/2 to an h2c app.
    async fn to_app<B>(&self, out: Outbound<'_, B>, s: &mut Session) -> Exchange
    where
        B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
    {
        let Outbound {
            parts,
            body,
            client,
            upgrade,
            sent,
        } = out;
        // An upgrade gatehouse does not tunnel (h2c, say) is no upgrade: the request goes
        // on as a plain one, and the app cannot switch the connection behind the chain.
        let upgrade = upgrade.filter(|u| {
            self.upgrades
                .iter()
                .any(|a| a.as_bytes().eq_ignore_ascii_case(u.as_bytes()))
        });
        // The client's host, as it sent it, is what `x-forwarded-host` says.
        if !self.preserve_host || s.host.is_none() {
            parts
                .headers
                .insert(HOST, self.upstream.authority().clone());
        }
        let traceparent = s.ctx.trace.ids.map(|ids| ids.traceparent());
        let forwarded = Forwarded {
            peer: &client.forwarded_for,
            proto: &client.proto,
            host: s.host.as_ref(),
            traceparent: traceparent.as_ref().map(|t| &t[..]),
        };
        let phases = self.chain.body_phases(&s.ctx);
        // A gRPC call's own deadline bounds the wait too.
        let timeout = match s.grpc.then(|| grpc::timeout(&parts.headers)).flatten() {
            Some(deadline) => deadline.min(self.timeout),
            None => self.timeout,
        };
        let (result, answered, refused) = if upgrade.is_none() && self.upstream.speaks_h2() {
            s.upstream_version = Version::HTTP_2;
            // Boxed: only a request sent over HTTP/2 carries this future.
            let (worker, upload) = (s.ctx.worker, &mut s.upload);
            let state = std::mem::take(&mut s.ctx.body);
            let forward = self.forward_h2(
                parts, body, state, &forwarded, phases, sent, timeout, worker, upload,
            );
            Box::pin(forward).await
        } else {
            let mut body = self.request_body(body, &mut s.ctx);
            let encode = |framing, out: &mut Vec<u8>| {
                encode(parts, framing, &forwarded, upgrade.as_ref(), out);
            };
            let (result, answered) = self
                .upstream
                .send(
                    s.ctx.worker,
                    &parts.method,
                    upgrade.is_some(),
                    encode,
                    &mut body,
                    sent,
                    sent + timeout,
                )
                .await;
            let tally = body.tally();
            s.bytes_in = tally.received;
            let result = result.map(|answer| match answer {
                // The codec left the upstream's hop-by-hop headers out already.
                pool::Answer::Response(head, upstream) => (head, Body::Upstream(upstream)),
                pool::Answer::Upgrade(head, io) => (head, Body::Upgrade(Some(io))),
            });
            (result, answered, tally.refused.take())
        };
        Exchange {
            result,
            answered,
            refused,
        }
    }

    /// The upstream exchange over HTTP/2: the request body goes to the connection's task,
    /// which sends it as it comes, its progress shared with the session (`upload`).
    #[allow(clippy::too_many_arguments)]
    async fn forward_h2<B>(
        &self,
        parts: &mut request::Parts,
        body: B,
        state: Extensions,
        forwarded: &Forwarded<'_>,
        phases: u64,
        sent: Instant,
        timeout: Duration,
        worker: usize,
        upload: &mut Option<Arc<Progress>>,
    ) -> (
        Result<(response::Parts, Body), pool::Error>,
        Instant,
        Option<(usize, Reject)>,
    )
    where
        B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
    {
        let progress = Arc::new(Progress::default());
        *upload = Some(progress.clone());
        let tally = Shared::new(self.chain.clone(), progress.clone());
        let body = RequestBody::new(body, tally, phases, self.underscores, state);
        let req = h2_request(parts, forwarded, self.upstream.authority(), body);
        let (result, answered) = self
            .upstream
            .send_h2(worker, req, sent, sent + timeout)
            .await;
        let result = match result {
            Ok((head, body)) => Ok((head, Body::UpstreamH2(body))),
            // The stream failed because its body stopped short.
            Err(_) if progress.failed() => Err(pool::Error::Body),
            Err(e) => Err(e),
        };
        (result, answered, progress.take_refused())
    }
}

/// The request as HTTP/2 sends it to the app: `:authority` from `Host` (the upstream's
/// when that is no valid authority) and no `Host`, `x-forwarded-*` set, and the length the
/// body has rather than the client's `content-length`.
fn h2_request<B>(
    parts: &mut request::Parts,
    forwarded: &Forwarded,
    upstream: &HeaderValue,
    body: B,
) -> Request<B> {
    let mut headers = std::mem::take(&mut parts.headers);
    let host = headers.remove(HOST);
    headers.remove(CONTENT_LENGTH);
    forwarded::set_headers(&mut headers, forwarded);
    let authority = host
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .unwrap_or_else(|| {
            Authority::try_from(upstream.as_bytes()).expect("the upstream's host is an authority")
        });
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(authority);
    uri.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = Uri::from_parts(uri).expect("scheme, authority and path make a URI");
    *req.version_mut() = Version::HTTP_2;
    *req.headers_mut() = headers;
    req
}
