//! The per-request context: what middlewares learn about a request and pass on to later
//! middlewares, to the response phase, and to the request's record.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Extensions, HeaderValue};

use crate::trace::Trace;

/// State of one request as it travels down the chain and back up.
///
/// Plain owned fields and one type map for the middlewares' own state: it lives in the
/// request's own state and costs nothing to create.
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
    /// The worker thread serving the request (the control thread's number is the worker
    /// count): per-worker state, such as connection pools, is indexed by it.
    pub worker: usize,
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
    /// The protocol an HTTP/1.1 `Upgrade` asks to switch to (`websocket`): the parser takes
    /// the header out of the request, so the proxy tells the chain here. (HTTP/2's extended
    /// CONNECT keeps its `:protocol` in the request, as `hyper::ext::Protocol`.)
    pub upgrade: Option<HeaderValue>,
    /// What middlewares keep for their own response phase, each under a type private to
    /// its file (a `cors` verdict, a `rate_limit` quota), so the context names none of
    /// them. Allocated only when one stores something.
    pub state: Extensions,
    /// Index of the middleware that refused the request.
    pub denied_by: Option<usize>,
    /// Bit `i` is set when middleware `i` let the request through only because its
    /// backend failed (`on_backend_error = "allow"`).
    pub fail_open: u64,
    /// The request's trace ids, and the middlewares that waited (`[tracing]`).
    pub trace: Trace,
    /// Index of the middleware whose phase is running, so it can name itself in the context.
    pub current: usize,
    /// Bit `i` is set when middleware `i`'s request phase ran: only those see the response.
    pub(crate) ran: u64,
}

impl Context {
    /// The context of a request from `client_ip`, on a connection from `peer` (TLS or
    /// not), served by `worker`.
    pub fn new(client_ip: IpAddr, peer: IpAddr, tls: bool, start: Instant, worker: usize) -> Self {
        Context {
            client_ip,
            peer,
            tls,
            start,
            worker,
            request_id: None,
            subject: None,
            upstream_time: None,
            upstream_answered: None,
            upgrade: None,
            state: Extensions::new(),
            denied_by: None,
            fail_open: 0,
            trace: Trace::default(),
            current: 0,
            ran: 0,
        }
    }

    /// Records that the running middleware let the request through only because its
    /// backend failed.
    pub fn failed_open(&mut self) {
        self.fail_open |= 1 << self.current;
    }
}

/// Names the client's session for the request's record (the audit event's `session`): a
/// middleware that keeps sessions puts one into [`Context::state`]. A digest, never what the
/// client holds, so the record can tie requests of one session together without being able
/// to replay it.
#[derive(Clone, Debug)]
pub struct SessionDigest(pub Arc<str>);
