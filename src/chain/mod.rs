//! The middleware chain: one trait with a request phase and a response phase, the
//! per-request context, and the ordered chain built once from the config.
//!
//! Order and short-circuit (SPEC): request phases run top to bottom; a middleware may
//! answer instead of forwarding, and then only the middlewares before it see the response,
//! bottom to top. Phases are synchronous by default: most middlewares decide from what they
//! already hold, so a request pays no boxed future per hop. A middleware that must wait
//! (an auth service, a password hash, Redis) returns [`Flow::Wait`], and only it pays.

pub mod context;
pub mod path;
pub mod reply;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{request, response, Method, Response, StatusCode};

pub use context::Context;

use crate::config::value::PathPattern;
use crate::config::MiddlewareEntry;
use crate::metrics::{self, ByStatus};

/// What a request phase decided.
pub enum Flow<'a> {
    /// Go on down the chain and then to the upstream.
    Continue,
    /// Answer with this response; the upstream and later middlewares never see the request.
    Respond(Response<Bytes>),
    /// The decision needs to wait (network, a slow hash): the chain awaits this future,
    /// which may still change the request and the context it borrows.
    Wait(Pin<Box<dyn Future<Output = Flow<'static>> + Send + 'a>>),
}

impl<'a> Flow<'a> {
    /// Wraps an async decision; the future may borrow the request and the context.
    pub fn wait(future: impl Future<Output = Flow<'static>> + Send + 'a) -> Flow<'a> {
        Flow::Wait(Box::pin(future))
    }
}

/// One middleware. Implementations are built once per config and shared by all requests.
pub trait Middleware: Send + Sync + 'static {
    /// Request phase: may change the request on its way upstream, or answer it.
    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Context) -> Flow<'a>;

    /// Response phase: runs only if this middleware's request phase ran and let the request
    /// through, for upstream responses and for answers of later middlewares alike.
    fn on_response(&self, _resp: &mut response::Parts, _ctx: &mut Context) {}
}

/// Which requests an entry applies to (`paths`, `skip_paths`, `methods`).
#[derive(Debug, Default)]
pub struct Scope {
    pub paths: Vec<PathPattern>,
    pub skip_paths: Vec<PathPattern>,
    pub methods: Vec<Method>,
}

impl Scope {
    fn applies(&self, method: &Method, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(path)))
            && !self.skip_paths.iter().any(|p| p.matches(path))
    }

    fn is_everything(&self) -> bool {
        self.paths.is_empty() && self.skip_paths.is_empty() && self.methods.is_empty()
    }
}

struct Link {
    name: Arc<str>,
    scope: Scope,
    middleware: Box<dyn Middleware>,
    /// `gatehouse_rejections_total{middleware=name, status}` handles.
    rejections: ByStatus,
}

/// The ordered chain of one config generation.
pub struct Chain {
    links: Box<[Link]>,
}

/// The most middlewares one chain may hold: `Context::ran` is a 64-bit set.
pub const MAX_LINKS: usize = 64;

impl Chain {
    /// Builds every middleware of the config, in order.
    pub fn build(entries: &[MiddlewareEntry]) -> Chain {
        debug_assert!(
            entries.len() <= MAX_LINKS,
            "config validation caps the chain"
        );
        let links = entries
            .iter()
            .map(|e| Link {
                name: e.name.as_str().into(),
                rejections: ByStatus::new(400),
                scope: Scope {
                    paths: e.paths.clone(),
                    skip_paths: e.skip_paths.clone(),
                    methods: e.methods.clone(),
                },
                middleware: e.spec.build(&e.name),
            })
            .collect();
        Chain { links }
    }

    /// Runs the request phases in order; returns the answer of the middleware that answered.
    /// `path` is the request path as scopes match it (see [`path::normalize`]).
    pub async fn on_request(
        &self,
        req: &mut request::Parts,
        path: &str,
        ctx: &mut Context,
    ) -> Option<Response<Bytes>> {
        for (i, link) in self.links.iter().enumerate() {
            if !link.scope.is_everything() && !link.scope.applies(&req.method, path) {
                continue;
            }
            ctx.current = i;
            let answer = match link.middleware.on_request(req, ctx) {
                Flow::Continue => None,
                Flow::Respond(resp) => Some(resp),
                Flow::Wait(mut decision) => loop {
                    match decision.await {
                        Flow::Continue => break None,
                        Flow::Respond(resp) => break Some(resp),
                        Flow::Wait(next) => decision = next,
                    }
                },
            };
            match answer {
                None => ctx.ran |= 1 << i,
                Some(resp) => {
                    if resp.status().is_client_error() || resp.status().is_server_error() {
                        ctx.denied_by = Some(i);
                    }
                    return Some(resp);
                }
            }
        }
        None
    }

    /// Runs the response phases, bottom to top, of the middlewares whose request phase ran.
    pub fn on_response(&self, resp: &mut response::Parts, ctx: &mut Context) {
        let mut ran = ctx.ran;
        while ran != 0 {
            let i = 63 - ran.leading_zeros() as usize;
            ran &= !(1 << i);
            ctx.current = i;
            self.links[i].middleware.on_response(resp, ctx);
        }
    }

    /// The configured name of middleware `i` (for audit events, metrics and logs).
    pub fn name(&self, i: usize) -> &Arc<str> {
        &self.links[i].name
    }

    /// Counts a rejection by middleware `i` in `gatehouse_rejections_total`.
    pub fn count_rejection(&self, i: usize, status: StatusCode) {
        let link = &self.links[i];
        link.rejections.inc(status.as_u16(), || {
            metrics::global().rejection(&link.name, status.as_u16())
        });
    }

    /// The names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.links.iter().map(|l| &*l.name)
    }
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
        fn on_request<'a>(&'a self, _: &'a mut request::Parts, ctx: &'a mut Context) -> Flow<'a> {
            self.log.lock().unwrap().push(format!("req{}", self.id));
            if self.reject {
                return Flow::Respond(ctx.reject(StatusCode::FORBIDDEN, "no"));
            }
            // Odd probes decide asynchronously, so both kinds of phase are exercised.
            if self.id % 2 == 1 {
                return Flow::wait(async { Flow::Continue });
            }
            Flow::Continue
        }
        fn on_response(&self, _: &mut response::Parts, _: &mut Context) {
            self.log.lock().unwrap().push(format!("resp{}", self.id));
        }
    }

    fn chain(log: &Arc<Mutex<Vec<String>>>, reject_at: usize, scoped: Option<usize>) -> Chain {
        let links = (0..4)
            .map(|id| Link {
                name: format!("m{id}").into(),
                rejections: ByStatus::new(400),
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
        Chain { links }
    }

    fn run(chain: &Chain, path: &str) -> Context {
        let (mut parts, ()) = Request::get(path).body(()).unwrap().into_parts();
        let mut ctx = Context::new([127, 0, 0, 1].into(), std::time::Instant::now());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let answer = runtime.block_on(chain.on_request(&mut parts, path, &mut ctx));
        let (mut resp, _) = answer
            .unwrap_or_else(|| Response::new(Bytes::new()))
            .into_parts();
        chain.on_response(&mut resp, &mut ctx);
        ctx
    }

    #[test]
    fn rejection_by_the_third_still_runs_the_first_two_response_phases() {
        let log = Arc::new(Mutex::new(vec![]));
        let ctx = run(&chain(&log, 2, None), "/");
        assert_eq!(
            *log.lock().unwrap(),
            ["req0", "req1", "req2", "resp1", "resp0"]
        );
        assert_eq!(ctx.denied_by, Some(2));
    }

    #[test]
    fn all_phases_in_order_and_scopes_skip() {
        let log = Arc::new(Mutex::new(vec![]));
        let ctx = run(&chain(&log, 99, Some(1)), "/elsewhere");
        assert_eq!(
            *log.lock().unwrap(),
            ["req0", "req2", "req3", "resp3", "resp2", "resp0"]
        );
        assert_eq!(ctx.denied_by, None);
    }
}
