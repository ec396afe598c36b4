//! One request from its head to its end, and the last phase that records it.
//!
//! A [`Session`] is made when a request's head arrives. It travels with the request down
//! the chain and to the upstream, then inside the response body as it streams (or through
//! an upgraded connection's tunnel). Dropping it is the request's end, whatever the end
//! was (answered, proxied, failed, abandoned by the client), and runs [`Proxy::log`]: the
//! one place metrics, and the audit event, are recorded.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, Uri, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::body::{Body, Progress};
use super::Proxy;
use crate::audit::{Decision, Event};
use crate::chain::{Context, Reason, SessionDigest};
use crate::grpc;
use crate::pool::{self, Upgraded};
use crate::trace::{Ids, Internal, RequestSpans, SpanId, Text, UpstreamCall};

/// nginx's status for a request whose client went away before the answer.
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// What is known about one request, for its record.
pub struct Session {
    proxy: Arc<Proxy>,
    pub ctx: Context,
    /// The request line and host as the client sent them (middlewares may change the
    /// request; the record keeps what came in).
    pub method: Method,
    pub uri: Uri,
    pub host: Option<HeaderValue>,
    /// The client's protocol version (a span's `network.protocol.version`).
    pub version: Version,
    /// The client's `User-Agent`, kept for a sampled request's span.
    pub user_agent: Option<HeaderValue>,
    /// The `request_headers` the audit wants, as the client sent them.
    pub headers: Vec<Option<HeaderValue>>,
    /// The answer's status; `None` while there is none (a client leaving then abandons
    /// the request: 499).
    pub status: Option<StatusCode>,
    pub decision: Decision,
    /// Why gatehouse answered, when it did.
    pub reason: Option<Reason>,
    /// The kind of upstream failure, for `gatehouse_upstream_errors_total`.
    pub upstream_error: Option<usize>,
    /// The upstream's answer, when it gave one.
    pub upstream_status: Option<StatusCode>,
    /// The protocol the request went to the app in (a CLIENT span's
    /// `network.protocol.version`).
    pub upstream_version: Version,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The whole response body reached the client connection.
    pub completed: bool,
    /// A request body still streaming to the app over HTTP/2 counts its bytes here.
    pub upload: Option<Arc<Progress>>,
    /// The request is a gRPC call; the status its client saw, once known.
    pub grpc: bool,
    pub grpc_status: Option<u16>,
}

impl Session {
    /// Made in its box: it is moved into the response body later, so only the box moves.
    pub(super) fn new(
        proxy: Arc<Proxy>,
        ctx: Context,
        method: Method,
        uri: Uri,
        host: Option<HeaderValue>,
    ) -> Box<Session> {
        Box::new(Session {
            proxy,
            ctx,
            method,
            uri,
            host,
            version: Version::HTTP_11,
            user_agent: None,
            headers: Vec::new(),
            status: None,
            decision: Decision::Allow,
            reason: None,
            upstream_error: None,
            upstream_status: None,
            upstream_version: Version::HTTP_11,
            bytes_in: 0,
            bytes_out: 0,
            completed: false,
            upload: None,
            grpc: false,
            grpc_status: None,
        })
    }

    /// The status the record shows.
    fn logged_status(&self) -> u16 {
        self.status.map_or(CLIENT_CLOSED_REQUEST, |s| s.as_u16())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let proxy = Arc::clone(&self.proxy);
        proxy.log(self);
    }
}

impl Proxy {
    /// The last phase of every request: metrics, and the audit event when the audit wants
    /// it, written here, on the request's thread, once the response is out.
    fn log(&self, s: &Session) {
        let duration = s.ctx.start.elapsed();
        let status = s.logged_status();
        let m = &self.handles.metrics;
        m.record_request(status, duration);
        if let Some(upstream) = s.ctx.upstream_time {
            m.upstream_duration.observe(upstream);
        }
        if let Some(kind) = s.upstream_error {
            self.upstream_errors[kind].inc();
        }
        if let (Some(i), Some(answered)) = (s.ctx.denied_by, s.status) {
            self.chain.count_rejection(i, answered, m);
        }
        if s.ctx.fail_open != 0 {
            self.chain.count_fail_open(s.ctx.fail_open, m);
        }
        if let (Some(tracer), Some(ids)) = (&self.tracer, s.ctx.trace.ids) {
            if ids.sampled {
                tracer.record(self.spans(s, ids, duration, status));
            }
        }
        let Some(audit) = self.audit.as_ref().filter(|a| a.wants(s.decision)) else {
            return;
        };
        // Empty, and so not allocated, unless a middleware failed open.
        let fail_open: Vec<&str> = self.chain.names(s.ctx.fail_open).collect();
        audit.record(&Event {
            ts: SystemTime::now() - duration,
            request_id: s.ctx.request_id.as_ref(),
            method: &s.method,
            host: s.host.as_ref(),
            uri: &s.uri,
            status,
            duration,
            upstream: s.ctx.upstream_time,
            client_ip: s.ctx.client_ip,
            subject: s.ctx.subject.as_deref(),
            session: s.ctx.state.get::<SessionDigest>().map(|d| &*d.0),
            decision: s.decision,
            denied_by: s.ctx.denied_by.map(|i| &**self.chain.name(i)),
            deny_reason: s
                .reason
                .filter(|_| s.decision == Decision::Deny)
                .map(Reason::code),
            policy_rule: s.ctx.policy.as_ref().map(|p| p.rule_name()),
            fail_open: &fail_open,
            bytes_in: s.bytes_in + s.upload.as_ref().map_or(0, |u| u.received()),
            bytes_out: s.bytes_out,
            completed: s.completed,
            trace: s.ctx.trace.ids.map(|ids| (ids.trace_id, ids.span_id)),
            grpc_status: s.grpc_status,
            headers: &s.headers,
        });
    }

    /// A sampled request's spans, for the exporter: its own, the upstream call's, and one
    /// for each middleware that waited.
    fn spans(&self, s: &Session, ids: Ids, duration: Duration, status: u16) -> RequestSpans {
        let end = unix_nanos(SystemTime::now());
        let start = end.saturating_sub(duration.as_nanos() as u64);
        let at = |t: Instant| start + t.saturating_duration_since(s.ctx.start).as_nanos() as u64;
        let upstream = s.ctx.upstream_answered.zip(s.ctx.upstream_time);
        let upstream = upstream.map(|(answered, took)| UpstreamCall {
            start: at(answered - took),
            end: at(answered),
            authority: self.upstream.authority().clone(),
            protocol: protocol(s.upstream_version),
            status: s.upstream_status.map(|st| st.as_u16()),
            error: match (s.upstream_status, s.upstream_error) {
                (Some(_), _) => None,
                (None, Some(kind)) => Some(pool::Error::KINDS[kind]),
                (None, None) => Some(pool::Error::Body.kind()),
            },
        });
        let links = self.chain.links();
        RequestSpans {
            ids,
            start,
            end,
            method: s.method.clone(),
            scheme: if s.ctx.tls { "https" } else { "http" },
            protocol: protocol(s.version),
            status,
            client_address: s.ctx.client_ip,
            decision: s.decision.as_str(),
            denied_by: s.ctx.denied_by.map(|i| links[i].name.clone()),
            subject: s.ctx.subject.clone(),
            text: Text::new(s.uri.path(), s.host.as_ref(), s.user_agent.as_ref()),
            upstream,
            internal: s
                .ctx
                .trace
                .waits
                .iter()
                .map(|w| Internal {
                    span_id: SpanId::random(),
                    name: links[w.link].name.clone(),
                    kind: links[w.link].kind,
                    start: at(w.start),
                    end: at(w.end),
                    refused: w.refused,
                })
                .collect(),
        }
    }
}

/// `network.protocol.version`.
fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        _ => "1.1",
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The response body on its way to the client, carrying the request's session: its end
/// (sent whole, or dropped when the client left) is the request's end.
pub struct ResponseBody {
    body: Body,
    session: Box<Session>,
}

impl ResponseBody {
    pub(super) fn new(body: Body, session: Box<Session>) -> Self {
        ResponseBody { body, session }
    }

    /// The upstream connection of a `101 Switching Protocols`, for the server to splice to
    /// the client's; the body holds nothing else.
    pub fn take_upgrade(&mut self) -> Option<Upgraded> {
        match &mut self.body {
            Body::Upgrade(io) => io.take(),
            _ => None,
        }
    }

    /// The request's session, as it stands.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Records a tunnel's traffic when it closes: bytes from the client, bytes to it.
    pub fn tunnel_closed(&mut self, from_client: u64, to_client: u64) {
        self.session.bytes_in += from_client;
        self.session.bytes_out += to_client;
        self.session.completed = true;
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A body that says it has ended may never be polled to its `None`.
        self.session.completed |= self.body.is_end_stream();
    }
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.body).poll_frame(cx);
        match &poll {
            Poll::Ready(Some(Ok(frame))) => match frame.data_ref() {
                Some(data) => this.session.bytes_out += data.len() as u64,
                None if this.session.grpc => {
                    let trailers = frame.trailers_ref();
                    this.session.grpc_status = trailers.and_then(grpc::status);
                }
                None => {}
            },
            Poll::Ready(None) => this.session.completed = true,
            _ => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
