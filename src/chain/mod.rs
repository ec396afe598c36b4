//! The middleware chain: one trait with a request phase, a body phase, a response phase
//! and a response-body phase, the per-request context, the answers gatehouse makes itself,
//! and the ordered chain of one config generation.
//!
//! Order and short-circuit (as documented): request phases run top to bottom; a middleware may
//! answer instead of forwarding, and then only the middlewares before it see the response,
//! bottom to top. Phases are synchronous by default: most middlewares decide from what they
//! already hold, so a request pays no boxed future per hop. A middleware that must wait
//! (an auth service, a password hash, Redis) returns [`Flow::Wait`], and only it pays.

pub mod context;
pub mod path;
pub mod reject;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use http::{request, response, Extensions, HeaderMap, HeaderName, Method, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;

pub use context::{Claims, Context, Policy, SessionDigest};
pub use reject::{Reason, Reject};

use crate::config::value::PathPattern;
use crate::config::MAX_MIDDLEWARES;
use crate::metrics::{ByStatus, Metrics};
use crate::trace::Waited;

/// What a request phase decided.
pub enum Flow<'a> {
    /// Go on down the chain and then to the upstream.
    Continue,
    /// Answer with this response, which is not a refusal (a CORS preflight's `204`): the
    /// upstream and later middlewares never see the request.
    Respond(Response<Bytes>),
    /// Refuse the request: gatehouse answers, and the audit event says `deny`, by this
    /// middleware, for this reason.
    Reject(Reject),
    /// The decision needs to wait (network, a slow hash): the chain awaits this future,
    /// which may still change the request and the context it borrows.
    Wait(Pending<'a>),
}

/// A decision still to be awaited.
type Pending<'a> = Pin<Box<dyn Future<Output = Flow<'static>> + Send + 'a>>;

impl<'a> Flow<'a> {
    /// Wraps an async decision; the future may borrow the request and the context.
    pub fn wait(future: impl Future<Output = Flow<'static>> + Send + 'a) -> Flow<'a> {
        Flow::Wait(Box::pin(future))
    }

    /// The decision, if it is made (`None`: go on), or the future that makes it.
    fn settle(self) -> Result<Option<Answer>, Pending<'a>> {
        match self {
            Flow::Continue => Ok(None),
            Flow::Respond(resp) => Ok(Some(Answer::Respond(resp))),
            Flow::Reject(reject) => Ok(Some(Answer::Reject(reject))),
            Flow::Wait(decision) => Err(decision),
        }
    }
}

/// How the chain's request phases ended, when a middleware answered.
#[derive(Debug)]
pub enum Answer {
    /// A middleware's own response, not a refusal.
    Respond(Response<Bytes>),
    /// A refusal (the middleware is in `Context::denied_by`).
    Reject(Reject),
}

/// Where a response body stands when a [`BodyFilter`] is asked for output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boundary {
    /// More of the body is on its way: the filter may hold output back.
    More,
    /// The app has nothing more for now (its stream paused): everything held back goes
    /// out, so that a stream of events or a long poll stays live.
    Pause,
    /// The body ends here; its trailers, if any, follow unchanged.
    End,
}

/// A transformation of a response body as it streams (compression), asked for by a
/// response-body phase. It never sees the body whole: it is shown each piece as it
/// arrives, and told when the app pauses and when the body ends.
pub trait BodyFilter: Send + 'static {
    /// The output for `data`, the next piece of the body (empty at a pause or the end),
    /// with `at` saying where the body stands after it. Empty output sends nothing.
    fn filter(&mut self, data: Bytes, at: Boundary) -> std::io::Result<Bytes>;

    /// The body's trailers, when it has some, before its end: the filter may change them.
    fn trailers(&mut self, _trailers: &mut HeaderMap) -> std::io::Result<()> {
        Ok(())
    }

    /// What it does, in words for `explain` ("gzip at level default"). Never called
    /// while serving.
    fn describe(&self) -> String;
}

/// What a response-body phase decided for one response.
pub enum BodyPhase {
    /// The body goes through this filter (the phase has made the head match it).
    Filter(Box<dyn BodyFilter>),
    /// The body goes as it is, for this reason (in words, for `explain`).
    Pass(&'static str),
}

/// A piece of a request body, as the body phases are shown it.
pub struct Piece<'a> {
    pub data: &'a Bytes,
    /// Body bytes received so far, this piece included.
    pub received: u64,
    /// The body ends here (its last piece came before; `data` is empty).
    pub end: bool,
}

/// The filters of one response's body, in the order the body goes through them (the
/// app's side first). Empty, and so not allocated, for most responses.
pub type Filters = Vec<Box<dyn BodyFilter>>;

/// One middleware. Implementations are built once per config and shared by all requests.
pub trait Middleware: Send + Sync + 'static {
    /// Request phase: may change the request on its way upstream, or answer it.
    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Context) -> Flow<'a>;

    /// Whether this middleware has a body phase; asked once, when the chain is built, so
    /// a body is only ever shown to middlewares that look at it.
    fn inspects_body(&self) -> bool {
        false
    }

    /// Body phase: called for each piece of the request body as it streams upstream (if
    /// the request phase ran), with the body bytes received so far, this piece included,
    /// and once more, with `end` and no data, when a body that had any ends. `state` is
    /// what request phases left in [`Context::body`] for it: the body streams where the
    /// context is not. An error refuses the request mid-stream: the upstream request is
    /// abandoned and the client gets the answer.
    fn on_request_body(&self, _piece: &Piece<'_>, _state: &mut Extensions) -> Result<(), Reject> {
        Ok(())
    }

    /// Trailers phase: the request body's trailers, if it has any, after its last piece and
    /// before they go upstream (gatehouse's own rules for trailers apply after it). An error
    /// refuses the request as the body phase's does.
    fn on_request_trailers(
        &self,
        _trailers: &mut HeaderMap,
        _state: &mut Extensions,
    ) -> Result<(), Reject> {
        Ok(())
    }

    /// Response phase: runs only if this middleware's request phase ran and let the request
    /// through, for upstream responses and for answers of later middlewares alike.
    fn on_response(&self, _resp: &mut response::Parts, _ctx: &mut Context) {}

    /// Whether this middleware has a response-body phase; asked once, when the chain is
    /// built, so that a chain without one pays nothing for the mechanism.
    fn filters_response_body(&self) -> bool {
        false
    }

    /// Response-body phase: runs right after this middleware's response phase, and may
    /// send the response body through a [`BodyFilter`], making the head match it (a
    /// `content-encoding`, no `content-length`).
    fn on_response_body(&self, _resp: &mut response::Parts, _ctx: &mut Context) -> BodyPhase {
        BodyPhase::Pass("it has no response-body phase")
    }

    /// The request header fields the request phase sets or removes. A request trailer
    /// never carries one of them to the app: it could undo the phase there (a stripped
    /// key put back, a forged subject header).
    fn request_fields(&self) -> Vec<HeaderName> {
        Vec::new()
    }

    /// What the request phase would ask outside gatehouse about this request (Redis, an
    /// auth service, a JWKS URL), in words for an operator; `None` when it decides from
    /// what gatehouse holds. `explain` reports it instead of running the phase, so
    /// explaining a request never touches outside state unless asked to (`--live`).
    /// Never called while serving.
    fn would_ask(&self, _req: &request::Parts, _ctx: &Context) -> Option<String> {
        None
    }
}

/// An observer of one request's way through the chain, told each step as it happens:
/// `explain` builds its report from it. Serving passes `()`, whose methods are empty and
/// compile away, so the request path pays nothing for the hook.
pub trait Trail {
    /// Entry `i` does not apply to the request; `rule` is the scope key that excluded it.
    fn skipped(&mut self, _i: usize, _rule: Exclusion<'_>) {}
    /// Entry `i`'s request phase is next. `false` holds it back: the entry lets the request
    /// through without running (how `explain` keeps middlewares from their outside state).
    fn before(&mut self, _i: usize, _req: &request::Parts, _ctx: &Context) -> bool {
        true
    }
    /// Entry `i`'s request phase decided (`None`: the request goes on).
    fn after(
        &mut self,
        _i: usize,
        _req: &request::Parts,
        _ctx: &Context,
        _answer: Option<&Answer>,
    ) {
    }
    /// gatehouse itself refused the request before the chain (a malformed path, CONNECT).
    fn refused(&mut self, _reject: &Reject) {}
    /// The request body went through the body phases in `phases` (a mask of entries),
    /// `received` bytes of it; `refused` names the phase that refused it, if one did.
    fn body(&mut self, _phases: u64, _received: u64, _refused: Option<(usize, &Reject)>) {}
    /// Entry `i`'s response phase is next.
    fn before_response(&mut self, _i: usize, _resp: &response::Parts) {}
    /// Entry `i`'s response-body phase decided (before [`Trail::after_response`]).
    fn response_body(&mut self, _i: usize, _phase: &BodyPhase) {}
    /// Entry `i`'s response phase (and response-body phase) has run.
    fn after_response(&mut self, _i: usize, _resp: &response::Parts, _ctx: &Context) {}
}

impl Trail for () {}

impl<T: Trail + ?Sized> Trail for &mut T {
    fn skipped(&mut self, i: usize, rule: Exclusion<'_>) {
        (**self).skipped(i, rule)
    }
    fn before(&mut self, i: usize, req: &request::Parts, ctx: &Context) -> bool {
        (**self).before(i, req, ctx)
    }
    fn after(&mut self, i: usize, req: &request::Parts, ctx: &Context, answer: Option<&Answer>) {
        (**self).after(i, req, ctx, answer)
    }
    fn refused(&mut self, reject: &Reject) {
        (**self).refused(reject)
    }
    fn body(&mut self, phases: u64, received: u64, refused: Option<(usize, &Reject)>) {
        (**self).body(phases, received, refused)
    }
    fn before_response(&mut self, i: usize, resp: &response::Parts) {
        (**self).before_response(i, resp)
    }
    fn response_body(&mut self, i: usize, phase: &BodyPhase) {
        (**self).response_body(i, phase)
    }
    fn after_response(&mut self, i: usize, resp: &response::Parts, ctx: &Context) {
        (**self).after_response(i, resp, ctx)
    }
}

/// Which requests an entry applies to (`paths`, `skip_paths`, `methods`).
#[derive(Debug, Default)]
pub struct Scope {
    pub paths: Vec<PathPattern>,
    pub skip_paths: Vec<PathPattern>,
    pub methods: Vec<Method>,
}

/// Which scope key kept an entry from a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exclusion<'a> {
    /// The method is not one of `methods`.
    Methods,
    /// The path matches none of `paths`.
    Paths,
    /// The path matches this `skip_paths` pattern.
    SkipPaths(&'a PathPattern),
}

impl Scope {
    /// Why a request with `method` and (normalized) `path` is out of scope; `None`: it is
    /// in scope.
    pub fn exclusion(&self, method: &Method, path: &str) -> Option<Exclusion<'_>> {
        if !self.methods.is_empty() && !self.methods.contains(method) {
            return Some(Exclusion::Methods);
        }
        if !self.paths.is_empty() && !self.paths.iter().any(|p| p.matches(path)) {
            return Some(Exclusion::Paths);
        }
        self.skip_paths
            .iter()
            .find(|p| p.matches(path))
            .map(Exclusion::SkipPaths)
    }

    fn is_everything(&self) -> bool {
        self.paths.is_empty() && self.skip_paths.is_empty() && self.methods.is_empty()
    }
}

/// One entry of the chain.
pub struct Link {
    pub name: Arc<str>,
    /// The TOML `type`.
    pub kind: &'static str,
    pub scope: Scope,
    pub middleware: Box<dyn Middleware>,
}

/// The ordered chain of one config generation.
pub struct Chain {
    links: Box<[Link]>,
    /// Bit `i` is set when middleware `i` has a body phase.
    body_phases: u64,
    /// Bit `i` is set when middleware `i` has a response-body phase.
    response_body_phases: u64,
    /// `gatehouse_rejections_total{middleware, status}` handles, per link.
    rejections: Box<[ByStatus]>,
    /// `gatehouse_fail_open_total{middleware}` handles, per link, resolved on first use.
    fail_opens: Box<[OnceLock<Counter>]>,
    /// Every [`Middleware::request_fields`] of the chain.
    request_fields: Box<[HeaderName]>,
}

impl Chain {
    /// The chain of `links`, in request order (at most [`MAX_MIDDLEWARES`]).
    pub fn new(links: Vec<Link>) -> Chain {
        assert!(
            links.len() <= MAX_MIDDLEWARES,
            "config validation caps the chain"
        );
        let mask = |has: fn(&dyn Middleware) -> bool| {
            links
                .iter()
                .enumerate()
                .filter(|(_, l)| has(&*l.middleware))
                .fold(0, |mask, (i, _)| mask | 1 << i)
        };
        let body_phases = mask(|m| m.inspects_body());
        let response_body_phases = mask(|m| m.filters_response_body());
        let mut request_fields: Vec<HeaderName> = links
            .iter()
            .flat_map(|l| l.middleware.request_fields())
            .collect();
        request_fields.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        request_fields.dedup();
        Chain {
            request_fields: request_fields.into(),
            rejections: links.iter().map(|_| ByStatus::new(400)).collect(),
            fail_opens: links.iter().map(|_| OnceLock::new()).collect(),
            links: links.into(),
            body_phases,
            response_body_phases,
        }
    }

    /// Runs the request phases in order, telling `trail` every step (serving passes
    /// `()`); returns the answer of the middleware that answered. `path` is the request
    /// path as scopes match it (see [`path::normalize`]).
    pub async fn on_request_with<T: Trail>(
        &self,
        req: &mut request::Parts,
        path: &str,
        ctx: &mut Context,
        mut trail: T,
    ) -> Option<Answer> {
        for (i, link) in self.links.iter().enumerate() {
            if !link.scope.is_everything() {
                if let Some(rule) = link.scope.exclusion(&req.method, path) {
                    trail.skipped(i, rule);
                    continue;
                }
            }
            ctx.current = i;
            // A sampled request records each wait as a span; the others only pay this test.
            let traced = ctx.trace.sampled();
            let mut waited = None;
            let answer = if trail.before(i, req, ctx) {
                let mut flow = link.middleware.on_request(req, ctx);
                loop {
                    match flow.settle() {
                        Ok(answer) => break answer,
                        Err(decision) => {
                            if traced {
                                waited.get_or_insert_with(Instant::now);
                            }
                            flow = decision.await;
                        }
                    }
                }
            } else {
                None
            };
            if let Some(start) = waited {
                ctx.trace.waits.push(Waited {
                    link: i,
                    start,
                    end: Instant::now(),
                    refused: matches!(answer, Some(Answer::Reject(_))),
                });
            }
            trail.after(i, req, ctx, answer.as_ref());
            match answer {
                None => ctx.ran |= 1 << i,
                Some(answer) => {
                    if let Answer::Reject(_) = answer {
                        ctx.denied_by = Some(i);
                    }
                    return Some(answer);
                }
            }
        }
        None
    }

    /// Whether a middleware of the chain sets or removes the request header `name`.
    pub fn sets_request_field(&self, name: &HeaderName) -> bool {
        self.request_fields.contains(name)
    }

    /// The middlewares whose body phase a request's body goes through: those with one
    /// whose request phase ran.
    pub fn body_phases(&self, ctx: &Context) -> u64 {
        self.body_phases & ctx.ran
    }

    /// Runs the body phases in `mask` (from [`Chain::body_phases`]) on a piece of the body;
    /// a refusal names the middleware that refused.
    pub fn on_request_body(
        &self,
        mask: u64,
        piece: &Piece<'_>,
        state: &mut Extensions,
    ) -> Result<(), (usize, Reject)> {
        self.each_body_phase(mask, |m| m.on_request_body(piece, state))
    }

    /// Runs the trailers phases in `mask` (the body phases' mask) on the request's trailers.
    pub fn on_request_trailers(
        &self,
        mask: u64,
        trailers: &mut HeaderMap,
        state: &mut Extensions,
    ) -> Result<(), (usize, Reject)> {
        self.each_body_phase(mask, |m| m.on_request_trailers(trailers, state))
    }

    /// Runs `phase` on each middleware of `mask`, in order, until one refuses.
    fn each_body_phase(
        &self,
        mask: u64,
        mut phase: impl FnMut(&dyn Middleware) -> Result<(), Reject>,
    ) -> Result<(), (usize, Reject)> {
        bits(mask).try_for_each(|i| phase(&*self.links[i].middleware).map_err(|r| (i, r)))
    }

    /// Runs the response phases, bottom to top, of the middlewares whose request phase ran,
    /// each followed by its response-body phase if it has one, telling `trail` every step
    /// (serving passes `()`); returns the filters the body must go through.
    pub fn on_response_with<T: Trail>(
        &self,
        resp: &mut response::Parts,
        ctx: &mut Context,
        mut trail: T,
    ) -> Filters {
        let mut filters = Filters::new();
        let mut ran = ctx.ran;
        while ran != 0 {
            let i = 63 - ran.leading_zeros() as usize;
            ran &= !(1 << i);
            ctx.current = i;
            trail.before_response(i, resp);
            let middleware = &self.links[i].middleware;
            middleware.on_response(resp, ctx);
            if self.response_body_phases & 1 << i != 0 {
                let phase = middleware.on_response_body(resp, ctx);
                trail.response_body(i, &phase);
                if let BodyPhase::Filter(filter) = phase {
                    filters.push(filter);
                }
            }
            trail.after_response(i, resp, ctx);
        }
        filters
    }

    /// The links, in request order.
    pub fn links(&self) -> &[Link] {
        &self.links
    }

    /// The configured name of middleware `i` (for audit events, metrics and logs).
    pub fn name(&self, i: usize) -> &Arc<str> {
        &self.links[i].name
    }

    /// Counts a refusal by middleware `i` in `gatehouse_rejections_total`.
    pub fn count_rejection(&self, i: usize, status: StatusCode, metrics: &Metrics) {
        let name = &self.links[i].name;
        self.rejections[i].inc(status.as_u16(), || metrics.rejection(name, status.as_u16()));
    }

    /// Counts, in `gatehouse_fail_open_total`, each middleware of `fail_open` (a
    /// [`Context::fail_open`] set) that let a request through because its backend failed.
    pub fn count_fail_open(&self, fail_open: u64, metrics: &Metrics) {
        for i in bits(fail_open) {
            self.fail_opens[i]
                .get_or_init(|| metrics.fail_open(&self.links[i].name))
                .inc();
        }
    }

    /// The names of the middlewares in `set` (such as [`Context::fail_open`]), in chain
    /// order.
    pub fn names(&self, set: u64) -> impl Iterator<Item = &str> {
        bits(set).map(|i| &*self.links[i].name)
    }
}

/// The indexes of the bits set in `set`, lowest first.
fn bits(set: u64) -> impl Iterator<Item = usize> {
    let mut left = set;
    std::iter::from_fn(move || {
        (left != 0).then(|| {
            let i = left.trailing_zeros() as usize;
            left &= left - 1;
            i
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use std::sync::Mutex;

    /// Records the order of phases, and rejects when told to.
    struct Probe {
        id: usize,
        log: Arc<Mutex<Vec<String>>>,
        reject: bool,
    }

    impl Middleware for Probe {
        fn on_request<'a>(&'a self, _: &'a mut request::Parts, _: &'a mut Context) -> Flow<'a> {
            self.log.lock().unwrap().push(format!("req{}", self.id));
            if self.reject {
                return Flow::Reject(Reject::new(StatusCode::FORBIDDEN, Reason::IpDenied, "no"));
            }
            // Odd probes decide asynchronously, so both kinds of phase are exercised.
            if self.id % 2 == 1 {
                return Flow::wait(async { Flow::Continue });
            }
            Flow::Continue
        }
        fn inspects_body(&self) -> bool {
            self.id >= 2
        }
        fn on_request_body(&self, piece: &Piece<'_>, _: &mut Extensions) -> Result<(), Reject> {
            let received = piece.received;
            self.log
                .lock()
                .unwrap()
                .push(format!("body{}:{received}", self.id));
            if received > 10 {
                return Err(Reject::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    Reason::BodyTooLarge,
                    "big",
                ));
            }
            Ok(())
        }
        fn on_response(&self, _: &mut response::Parts, _: &mut Context) {
            self.log.lock().unwrap().push(format!("resp{}", self.id));
        }
        // Probes 1 and 3 have a response-body phase; only 3 asks for a filter.
        fn filters_response_body(&self) -> bool {
            self.id % 2 == 1
        }
        fn on_response_body(&self, _: &mut response::Parts, _: &mut Context) -> BodyPhase {
            self.log
                .lock()
                .unwrap()
                .push(format!("resp_body{}", self.id));
            match self.id {
                3 => BodyPhase::Filter(Box::new(Tag(self.id))),
                _ => BodyPhase::Pass("not this one"),
            }
        }
    }

    /// A filter that appends its probe's id to each piece.
    struct Tag(usize);

    impl BodyFilter for Tag {
        fn filter(&mut self, data: Bytes, _: Boundary) -> std::io::Result<Bytes> {
            Ok([&data[..], self.0.to_string().as_bytes()].concat().into())
        }
        fn describe(&self) -> String {
            format!("tag {}", self.0)
        }
    }

    fn chain(log: &Arc<Mutex<Vec<String>>>, reject_at: usize, scoped: Option<usize>) -> Chain {
        let links = (0..4)
            .map(|id| Link {
                name: format!("m{id}").into(),
                kind: "probe",
                scope: Scope {
                    paths: if scoped == Some(id) {
                        vec!["/only/**".parse().unwrap()]
                    } else {
                        vec![]
                    },
                    ..Scope::default()
                },
                middleware: Box::new(Probe {
                    id,
                    log: log.clone(),
                    reject: id == reject_at,
                }),
            })
            .collect();
        Chain::new(links)
    }

    fn run(chain: &Chain, path: &str) -> (Context, Option<Answer>) {
        run_traced(chain, path, None)
    }

    fn run_traced(
        chain: &Chain,
        path: &str,
        trace: Option<crate::trace::Ids>,
    ) -> (Context, Option<Answer>) {
        let (mut parts, ()) = Request::get(path).body(()).unwrap().into_parts();
        let mut ctx = Context::new(
            [127, 0, 0, 1].into(),
            [127, 0, 0, 1].into(),
            false,
            std::time::Instant::now(),
            0,
        );
        ctx.trace.ids = trace;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let answer = runtime.block_on(chain.on_request_with(&mut parts, path, &mut ctx, ()));
        let (mut resp, _) = Response::new(()).into_parts();
        let filters = chain.on_response_with(&mut resp, &mut ctx, ());
        let described: Vec<String> = filters.iter().map(|f| f.describe()).collect();
        ctx.state.insert(described);
        (ctx, answer)
    }

    #[test]
    fn rejection_by_the_third_still_runs_the_first_two_response_phases() {
        let log = Arc::new(Mutex::new(vec![]));
        let (ctx, answer) = run(&chain(&log, 2, None), "/");
        assert_eq!(
            *log.lock().unwrap(),
            ["req0", "req1", "req2", "resp1", "resp_body1", "resp0"]
        );
        assert_eq!(ctx.denied_by, Some(2));
        assert!(matches!(answer, Some(Answer::Reject(r)) if r.reason == Reason::IpDenied));
    }

    /// Records what a trail is told, holding back the entries in `hold`.
    #[derive(Default)]
    struct Recording {
        hold: u64,
        seen: Vec<String>,
    }

    impl Trail for Recording {
        fn skipped(&mut self, i: usize, rule: Exclusion<'_>) {
            self.seen.push(format!("skip{i}:{rule:?}"));
        }
        fn before(&mut self, i: usize, _: &request::Parts, _: &Context) -> bool {
            self.seen.push(format!("before{i}"));
            self.hold & 1 << i == 0
        }
        fn after(&mut self, i: usize, _: &request::Parts, _: &Context, answer: Option<&Answer>) {
            self.seen.push(format!("after{i}:{}", answer.is_some()));
        }
        fn before_response(&mut self, i: usize, _: &response::Parts) {
            self.seen.push(format!("before_response{i}"));
        }
        fn response_body(&mut self, i: usize, phase: &BodyPhase) {
            let filters = matches!(phase, BodyPhase::Filter(_));
            self.seen.push(format!("response_body{i}:{filters}"));
        }
        fn after_response(&mut self, i: usize, _: &response::Parts, _: &Context) {
            self.seen.push(format!("after_response{i}"));
        }
    }

    #[test]
    fn a_trail_sees_every_step_and_may_hold_an_entry_back() {
        let log = Arc::new(Mutex::new(vec![]));
        let chain = chain(&log, 3, Some(1));
        let mut trail = Recording {
            hold: 1 << 2,
            ..Recording::default()
        };
        let (mut parts, ()) = Request::get("/elsewhere").body(()).unwrap().into_parts();
        let mut ctx = Context::new(
            [127, 0, 0, 1].into(),
            [127, 0, 0, 1].into(),
            false,
            std::time::Instant::now(),
            0,
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let answer =
            runtime.block_on(chain.on_request_with(&mut parts, "/elsewhere", &mut ctx, &mut trail));
        assert!(matches!(answer, Some(Answer::Reject(_))));
        let (mut resp, _) = Response::new(()).into_parts();
        chain.on_response_with(&mut resp, &mut ctx, &mut trail);
        assert_eq!(
            trail.seen,
            [
                "before0",
                "after0:false",
                "skip1:Paths",
                "before2",
                "after2:false",
                "before3",
                "after3:true",
                "before_response2",
                "after_response2",
                "before_response0",
                "after_response0",
            ]
        );
        // The held-back entry never ran, yet counts as having let the request through.
        assert_eq!(*log.lock().unwrap(), ["req0", "req3", "resp2", "resp0"]);
    }

    #[test]
    fn scope_exclusions_name_the_rule() {
        let scope = Scope {
            paths: vec!["/api/**".parse().unwrap()],
            skip_paths: vec!["/api/health".parse().unwrap()],
            methods: vec![Method::GET],
        };
        assert_eq!(scope.exclusion(&Method::GET, "/api/x"), None);
        assert_eq!(
            scope.exclusion(&Method::POST, "/api/x"),
            Some(Exclusion::Methods)
        );
        assert_eq!(
            scope.exclusion(&Method::GET, "/web"),
            Some(Exclusion::Paths)
        );
        assert_eq!(
            scope.exclusion(&Method::GET, "/api/health"),
            Some(Exclusion::SkipPaths(&scope.skip_paths[0]))
        );
    }

    #[test]
    fn all_phases_in_order_and_scopes_skip() {
        let log = Arc::new(Mutex::new(vec![]));
        let chain = chain(&log, 99, Some(1));
        let (ctx, answer) = run(&chain, "/elsewhere");
        assert!(answer.is_none());
        assert_eq!(
            *log.lock().unwrap(),
            [
                "req0",
                "req2",
                "req3",
                "resp3",
                "resp_body3",
                "resp2",
                "resp0"
            ]
        );
        // Only entries whose request phase ran, with a response-body phase, are asked;
        // the filters they hand back come out in the order the body goes through them.
        assert_eq!(ctx.state.get::<Vec<String>>().unwrap(), &["tag 3"]);
        assert_eq!(ctx.denied_by, None);
        // Only the middlewares with a body phase whose request phase ran see the body.
        log.lock().unwrap().clear();
        let mask = chain.body_phases(&ctx);
        assert_eq!(mask, 0b1100);
        let data = Bytes::from_static(b"0123456");
        let piece = |received| Piece {
            data: &data,
            received,
            end: false,
        };
        let mut state = Extensions::new();
        assert!(chain.on_request_body(mask, &piece(7), &mut state).is_ok());
        let (i, reject) = chain
            .on_request_body(mask, &piece(14), &mut state)
            .unwrap_err();
        assert_eq!((i, reject.status.as_u16()), (2, 413));
        assert_eq!(*log.lock().unwrap(), ["body2:7", "body3:7", "body2:14"]);
    }

    #[test]
    fn a_sampled_request_records_the_middlewares_that_waited() {
        use crate::trace::{Ids, SpanId, TraceId};
        let log = Arc::new(Mutex::new(vec![]));
        let chain = chain(&log, 99, None);
        let ids = |sampled| Ids {
            trace_id: TraceId::random(),
            span_id: SpanId::random(),
            upstream_span_id: SpanId::random(),
            parent: None,
            sampled,
        };
        // Odd probes wait.
        let (ctx, _) = run_traced(&chain, "/", Some(ids(true)));
        let waits: Vec<(usize, bool)> = ctx
            .trace
            .waits
            .iter()
            .map(|w| (w.link, w.refused))
            .collect();
        assert_eq!(waits, [(1, false), (3, false)]);
        assert!(ctx.trace.waits.iter().all(|w| w.end >= w.start));
        for trace in [Some(ids(false)), None] {
            let (ctx, _) = run_traced(&chain, "/", trace);
            assert!(ctx.trace.waits.is_empty());
        }
    }
}
