//! The per-request context: what middlewares learn about a request and pass on to later
//! middlewares, to the response phase, and to the request's record.

use std::any::Any;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::{Extensions, HeaderValue};

use crate::trace::Trace;

use super::Reason;

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
    /// What an authentication middleware verified about the subject (a JWT's claims), for
    /// the policy middlewares after it; shared by every request with the same credentials.
    pub claims: Option<Arc<Claims>>,
    /// How a policy middleware decided the request, once one has: the audit event's
    /// `policy_rule`, and what `explain` shows of the rules.
    pub policy: Option<Policy>,
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
    /// What request phases leave for their body phase (a plugin's context): the request
    /// body takes it when it starts streaming, since the body phases run where the context
    /// is not. Allocated only when one stores something.
    pub body: Extensions,
    /// Index of the middleware that refused the request.
    pub denied_by: Option<usize>,
    /// Why a response phase replaced the answer with a refusal (see
    /// [`Context::refuse_response`]), for the request's record.
    pub response_refusal: Option<Reason>,
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
            claims: None,
            policy: None,
            upstream_time: None,
            upstream_answered: None,
            upgrade: None,
            state: Extensions::new(),
            body: Extensions::new(),
            denied_by: None,
            response_refusal: None,
            fail_open: 0,
            trace: Trace::default(),
            current: 0,
            ran: 0,
        }
    }

    /// Records that the running middleware's response phase replaced the answer with a
    /// refusal for `reason` (a plugin that failed on the response): the record says `deny`,
    /// by this middleware.
    pub fn refuse_response(&mut self, reason: Reason) {
        self.denied_by = Some(self.current);
        self.response_refusal = Some(reason);
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

/// Claims an authentication middleware verified, as JSON values.
pub struct Claims {
    pub values: serde_json::Map<String, serde_json::Value>,
    /// A form a reader derives from `values` (a policy engine's own values), made once and
    /// kept as long as the claims: requests with the same credentials share it.
    derived: OnceLock<Box<dyn Any + Send + Sync>>,
}

impl Claims {
    pub fn new(values: serde_json::Map<String, serde_json::Value>) -> Claims {
        Claims {
            values,
            derived: OnceLock::new(),
        }
    }

    /// The form of type `T` derived from the values, made by `make` the first time it is
    /// asked for; `None` when a reader of another type derived its form first (one form
    /// is kept: there is one such reader today).
    pub fn derived<T: Any + Send + Sync>(
        &self,
        make: impl FnOnce(&serde_json::Map<String, serde_json::Value>) -> T,
    ) -> Option<&T> {
        self.derived
            .get_or_init(|| Box::new(make(&self.values)))
            .downcast_ref()
    }
}

impl fmt::Debug for Claims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claims")
            .field("values", &self.values)
            .finish_non_exhaustive()
    }
}

/// How a policy middleware decided a request: which of its rules did, and what the rules
/// before it gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The policy's rule names, in order (shared with the middleware).
    pub rules: Arc<[Arc<str>]>,
    /// The rule that decided; `None`: no rule matched and the default decided.
    pub rule: Option<usize>,
    pub allowed: bool,
    /// The rules before the deciding one whose evaluation failed, with the error; every
    /// other rule before it was false. Empty, and so not allocated, unless one failed.
    pub errors: Vec<(usize, String)>,
}

impl Policy {
    /// The deciding rule's name, or `default`.
    pub fn rule_name(&self) -> &str {
        self.rule.map_or("default", |i| &self.rules[i])
    }
}
