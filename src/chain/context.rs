//! The per-request context: what middlewares learn about a request and pass on to later
//! middlewares, to the response phase, and to the audit event.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

/// State of one request as it travels down the chain and back up.
///
/// Plain owned fields, no maps: it lives on the request task's stack and costs nothing
/// to create.
#[derive(Debug)]
pub struct Context {
    /// The client's address, after `server.trusted_proxies` have been peeled off.
    pub client_ip: IpAddr,
    /// The connection's peer, trusted proxy or not, and whether it spoke TLS: what the
    /// `x-forwarded-for` entry and `x-forwarded-proto` that gatehouse adds say.
    pub peer: IpAddr,
    pub tls: bool,
    /// When the request head was received; the origin of every timing.
    pub start: Instant,
    /// The id set by a `request_id` middleware, echoed in every response gatehouse makes.
    pub request_id: Option<HeaderValue>,
    /// Who the request is from, once an authentication middleware has said so (api key id,
    /// user name, JWT `sub`): read by `rate_limit` (`key = "subject"`) and the audit event.
    pub subject: Option<Arc<str>>,
    /// How long the upstream took to answer with a response head, once it was asked.
    pub upstream_time: Option<Duration>,
    /// When the upstream's response head arrived: the response phases that need "now"
    /// use it instead of reading the clock again microseconds later.
    pub upstream_answered: Option<Instant>,
    /// Streamed request bytes allowed, and the index of the middleware that set the limit.
    pub body_limit: Option<(u64, usize)>,
    /// What a `cors` middleware decided for a request carrying `Origin`.
    pub cors: Option<crate::middleware::cors::Verdict>,
    /// The tightest `rate_limit` quota the request was counted against, for its
    /// `ratelimit-*` response headers.
    pub rate_limit: Option<crate::middleware::rate_limit::Quota>,
    /// Index of the middleware that rejected the request.
    pub denied_by: Option<usize>,
    /// Index of the middleware whose phase is running, so it can name itself in the context.
    pub current: usize,
    /// Bit `i` is set when middleware `i`'s request phase ran: only those see the response.
    pub(crate) ran: u64,
}

impl Context {
    /// The context of a request from `client_ip` on a plain connection of its own; the
    /// server then sets `peer` and `tls` from the connection it came on.
    pub fn new(client_ip: IpAddr, start: Instant) -> Self {
        Context {
            client_ip,
            peer: client_ip,
            tls: false,
            start,
            request_id: None,
            subject: None,
            upstream_time: None,
            upstream_answered: None,
            body_limit: None,
            cors: None,
            rate_limit: None,
            denied_by: None,
            current: 0,
            ran: 0,
        }
    }

    /// SPEC's JSON error response, carrying this request's id.
    pub fn reject(&self, status: StatusCode, message: &str) -> Response<Bytes> {
        super::reply::error(status, message, self.request_id.as_ref())
    }
}
