//! `wasm`: runs a proxy-wasm plugin (ABI 0.2.1, as Envoy, Istio and Kong run them), so a
//! team's own middleware, written in any language with a proxy-wasm SDK, runs in the chain
//! without a fork of gatehouse or a network hop per request.
//!
//! Each worker has its own instance of the plugin, made on its first request; a request's
//! HTTP context lives in the instance of the worker that serves it, from the request phase
//! until the request's context is dropped (then `on_done`, `on_log`, `on_delete`). Every
//! call into a plugin is bounded by fuel and its memory by `max_memory`; a plugin that
//! fails is answered for by `on_error`, and its instance is replaced.
//!
//! Phases: request headers (where the plugin may answer, or pause the request on HTTP
//! calls to the configured `clusters` and decide on their answers), the request body (shown
//! to the plugin as it streams to the app, what it pauses on held for it up to `max_body`;
//! it may refuse the request, not change the body), the request's trailers, response
//! headers, the response body (held while the plugin pauses on it, up to `max_body`, so it
//! can rewrite it whole) and its trailers.

mod abi;
mod vm;

/// The ABI's header-map form, read from what a plugin hands over: public for its fuzz target.
pub use abi::{deserialize_pairs, serialize_pairs};

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration as StdDuration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{request, response, Extensions, HeaderMap, Method, StatusCode, Uri};
use schemars::JsonSchema;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

use crate::chain::{
    BodyFilter, BodyPhase, Boundary, Context, Flow, Middleware, Piece, Reason, Reject,
};
use crate::config::value::{ByteSize, ConfigFile};
use crate::config::{KeyPath, Problem};
use crate::logging::Throttle;
use crate::pool::{outbound_url, Endpoint};

use vm::{
    Bounds, CallAnswer, Cluster, Effects, Failure, LocalReply, MapKind, Plugin, PluginMetrics,
    Props, Shared, SharedStores, Stream, Vm, CONTINUE,
};

/// The most of an HTTP call's answer body handed to the plugin.
const MAX_CALL_BODY: usize = 1 << 20;
/// Idle pooled connections to a cluster are closed after this.
const POOL_IDLE: StdDuration = StdDuration::from_secs(30);
/// The longest a connection to a cluster may take to open.
const CONNECT_TIMEOUT: StdDuration = StdDuration::from_secs(5);

/// `wasm`: a proxy-wasm plugin in the chain.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The plugin: a `.wasm` file built with a proxy-wasm SDK (ABI 0.2.x), read and compiled
    /// when the config is loaded (at start and on SIGHUP).
    module: ConfigFile<Plugin>,
    /// The plugin's configuration, handed to its `on_configure` (often JSON).
    #[serde(default)]
    configuration: String,
    /// The VM's configuration, handed to its `on_vm_start`.
    #[serde(default)]
    vm_configuration: String,
    /// The root id the plugin reads as `plugin_root_id`.
    #[serde(default)]
    root_id: String,
    /// What a request gets when the plugin fails (traps, runs out of fuel or memory,
    /// misuses the ABI): `"deny"`, a `500` (`plugin_failed`), or `"allow"`, through as if
    /// the plugin had let it pass (recorded in `fail_open`).
    #[serde(default)]
    on_error: OnError,
    /// The most memory one instance may have (each worker has one).
    #[serde(default = "default_max_memory")]
    max_memory: ByteSize,
    /// The most WebAssembly instructions one call into the plugin may run: a plugin that
    /// loops forever fails there instead of holding its worker.
    #[serde(default = "default_fuel")]
    fuel_per_call: u64,
    /// The most of a body held while the plugin pauses on it: a request whose body passes
    /// this while held is refused (`413`), a response is cut off.
    #[serde(default = "default_max_body")]
    max_body: ByteSize,
    /// The names the plugin's `dispatch_http_call` may use, each an `http://host[:port]`
    /// or `https://host[:port]` URL (the plugin gives the path).
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, String>")]
    clusters: BTreeMap<String, ClusterUrl>,
}

fn default_max_memory() -> ByteSize {
    ByteSize(64 << 20)
}

fn default_fuel() -> u64 {
    100_000_000
}

fn default_max_body() -> ByteSize {
    ByteSize(1 << 20)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum OnError {
    /// Fail closed: `500`, `plugin_failed`.
    #[default]
    Deny,
    /// Fail open: the request passes, recorded in `fail_open`.
    Allow,
}

/// A cluster's URL: scheme and authority, no path.
#[derive(Debug, Clone)]
struct ClusterUrl(Uri);

impl<'de> Deserialize<'de> for ClusterUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match outbound_url(&s) {
            Some(uri) if uri.path_and_query().is_none_or(|p| p.as_str() == "/") => {
                Ok(ClusterUrl(uri))
            }
            _ => Err(de::Error::custom(format!(
                "invalid cluster URL {s:?}: expected http://host[:port] or https://host[:port] \
                 (the plugin gives the path)"
            ))),
        }
    }
}

impl Settings {
    fn bounds(&self) -> Bounds {
        Bounds {
            fuel: self.fuel_per_call,
            memory: usize::try_from(self.max_memory.0).unwrap_or(usize::MAX),
        }
    }

    fn shared(&self, name: &str, handles: &super::Handles) -> Arc<Shared> {
        let name: Arc<str> = name.into();
        Arc::new(Shared {
            configuration: self.configuration.clone(),
            vm_configuration: self.vm_configuration.clone(),
            root_id: self.root_id.clone(),
            clusters: self
                .clusters
                .iter()
                .map(|(cluster, url)| Cluster {
                    name: cluster.clone(),
                    url: url.0.clone(),
                    endpoint: Endpoint::for_url(
                        &url.0,
                        &handles.trust,
                        CONNECT_TIMEOUT,
                        POOL_IDLE,
                        handles.workers + 1,
                    ),
                })
                .collect(),
            data: handles.kept.get::<SharedStores>().of(&name),
            queues: Default::default(),
            metrics: PluginMetrics::new(&handles.metrics, name.clone()),
            name,
        })
    }
}

impl super::Settings for Settings {
    fn validate(&self) -> Result<(), Problem> {
        let at = KeyPath::default();
        if self.fuel_per_call == 0 {
            return Err((at.key("fuel_per_call"), "must be more than 0".into()));
        }
        // The plugin starts once here, so that one that cannot start, or refuses its
        // configuration, is a config error at load rather than a 500 on every request.
        let shared = self.shared("check", &super::Handles::offline());
        Vm::new(&self.module.content, shared, 0, self.bounds(), 0).map_err(|failure| {
            (
                at.key("module"),
                format!("{}: {failure}", self.module.path.display()),
            )
        })?;
        Ok(())
    }

    fn summary(&self) -> String {
        let clusters: Vec<String> = self
            .clusters
            .iter()
            .map(|(name, url)| format!("{name}={}", url.0))
            .collect();
        format!(
            "module={} on_error={} max_memory={} fuel_per_call={} clusters={}",
            self.module.path.display(),
            match self.on_error {
                OnError::Deny => "deny",
                OnError::Allow => "allow",
            },
            self.max_memory,
            self.fuel_per_call,
            super::list(&clusters)
        )
    }

    fn build(&self, build: &super::Build) -> Box<dyn Middleware> {
        let handles = build.handles;
        let slots = Arc::new(Slots {
            plugin: self.module.content.clone(),
            shared: self.shared(build.name, handles),
            bounds: self.bounds(),
            vms: (0..=handles.workers).map(|_| Mutex::new(None)).collect(),
            generations: AtomicU64::new(1),
            failures: Throttle::default(),
        });
        // `check` and an offline `explain` run no timers.
        let task = handles
            .runtime
            .as_ref()
            .map(|rt| rt.spawn(background(Arc::downgrade(&slots))));
        Box::new(Wasm {
            slots,
            on_error: self.on_error,
            max_body: usize::try_from(self.max_body.0).unwrap_or(usize::MAX),
            task,
        })
    }
}

/// The instances of one entry, one slot per worker (and one for the control thread).
struct Slots {
    plugin: Plugin,
    shared: Arc<Shared>,
    bounds: Bounds,
    vms: Box<[Mutex<Option<Vm>>]>,
    generations: AtomicU64,
    failures: Throttle,
}

impl Slots {
    /// Runs `f` on `worker`'s instance (made now if it has none). A failure drops the
    /// instance: whatever it was doing cannot be trusted, and the next call starts afresh.
    fn with_vm<R>(
        &self,
        worker: usize,
        generation: Option<u64>,
        f: impl FnOnce(&mut Vm) -> Result<R, Failure>,
    ) -> Result<R, Failure> {
        let slot = &self.vms[worker.min(self.vms.len() - 1)];
        let mut vm = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if vm.is_none() {
            let generation = self.generations.fetch_add(1, Relaxed);
            let made = Vm::new(
                &self.plugin,
                self.shared.clone(),
                worker,
                self.bounds,
                generation,
            );
            *vm = Some(made.inspect_err(|e| self.failed(e))?);
        }
        let current = vm.as_mut().expect("made above");
        if generation.is_some_and(|g| g != current.generation) {
            return Err(Failure(
                "the instance that held this request failed and was replaced".into(),
            ));
        }
        let result = f(current);
        if let Err(e) = &result {
            *vm = None;
            self.failed(e);
        }
        result
    }

    fn failed(&self, failure: &Failure) {
        if let Some(suppressed) = self.failures.ready() {
            tracing::warn!(plugin = %self.shared.name, %failure, suppressed, "wasm: the plugin failed; its instance is replaced");
        }
    }
}

/// Ticks the instances' timers and tells queues' owners of new items, until the entry's
/// chain is gone.
async fn background(slots: std::sync::Weak<Slots>) {
    loop {
        let next = {
            let Some(slots) = slots.upgrade() else { return };
            let now = Instant::now();
            for (worker, context, queue) in slots.shared.queues.unsaid() {
                let _ = slots.with_vm(worker, None, |vm| vm.queue_ready(context, queue));
            }
            let mut next = now + StdDuration::from_secs(1);
            for slot in slots.vms.iter() {
                let mut vm = slot.lock().unwrap_or_else(PoisonError::into_inner);
                let Some(instance) = vm.as_mut() else {
                    continue;
                };
                match instance.tick(now) {
                    Ok(Some(due)) => next = next.min(due),
                    Ok(None) => {}
                    Err(e) => {
                        *vm = None;
                        slots.failed(&e);
                    }
                }
            }
            (next, slots.shared.clone())
        };
        let (next, shared) = next;
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = shared.queues.ready.notified() => {}
        }
    }
}

struct Wasm {
    slots: Arc<Slots>,
    on_error: OnError,
    max_body: usize,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Wasm {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A request's HTTP context in a plugin instance, kept in the request's context for the
/// response phases; the last clone to go ends the context in the plugin.
#[derive(Clone)]
struct Exchange {
    link: usize,
    id: u32,
    generation: u64,
    props: Props,
    /// The request headers as they went upstream, which a response callback may read.
    request: HeaderMap,
    /// A body that replaces the app's (a local reply or a failure in the response phase).
    replace: Option<Bytes>,
    /// Ends the context in the plugin when the last clone goes.
    end: Arc<End>,
}

impl Exchange {
    /// The context as a body phase reaches it, holding nothing yet.
    fn held(&self, slots: &Arc<Slots>, worker: usize) -> Held {
        Held {
            slots: slots.clone(),
            worker,
            id: self.id,
            generation: self.generation,
            props: self.props.clone(),
            held: Vec::new(),
            failed: false,
            _end: self.end.clone(),
        }
    }
}

/// Ends a request's context in its instance when the request is done with.
struct End {
    slots: Arc<Slots>,
    worker: usize,
    id: u32,
    generation: u64,
    /// The request as the last callback left it, for `on_log`.
    props: Mutex<Option<Props>>,
}

impl Drop for End {
    fn drop(&mut self) {
        let props = self
            .props
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let _ = self
            .slots
            .with_vm(self.worker, Some(self.generation), |vm| {
                vm.finish(self.id, props)
            });
    }
}

/// The exchanges of a request, one per `wasm` entry it went through.
#[derive(Clone, Default)]
struct Exchanges(Vec<Exchange>);

/// A request's context as the body phases reach it (a request body's phase from
/// [`Context::body`], a response body's filter): the bodies stream where the request's
/// context is not. It holds a copy of what the plugin paused on.
#[derive(Clone)]
struct Held {
    /// Whose context this is: each entry has its own slots.
    slots: Arc<Slots>,
    worker: usize,
    id: u32,
    generation: u64,
    props: Props,
    /// What the plugin paused on, to be shown again with what comes next.
    held: Vec<u8>,
    /// The plugin failed and `on_error = "allow"`: the rest is not shown to it.
    failed: bool,
    _end: Arc<End>,
}

impl Held {
    /// Hands the plugin `trailers` (the request's or the response's, as `kind` says) for
    /// one callback, and takes them back, changed.
    fn trailers(
        &mut self,
        kind: MapKind,
        trailers: &mut HeaderMap,
        callback: fn(&mut Vm, u32, u32) -> Result<u32, Failure>,
    ) -> Result<Effects, Failure> {
        let request = kind == MapKind::RequestTrailers;
        let taken = std::mem::take(trailers);
        let count = taken.len() as u32;
        let mut stream = Stream {
            props: Some(self.props.clone()),
            writable: if request {
                &[MapKind::RequestTrailers]
            } else {
                &[MapKind::ResponseTrailers]
            },
            ..Stream::default()
        };
        if request {
            stream.request_trailers = taken;
        } else {
            stream.response_trailers = taken;
        }
        let id = self.id;
        let result = self
            .slots
            .with_vm(self.worker, Some(self.generation), |vm| {
                vm.with_stream(id, &mut stream, |vm| callback(vm, id, count))
            });
        *trailers = if request {
            stream.request_trailers
        } else {
            stream.response_trailers
        };
        result.map(|(_, effects)| effects)
    }

    /// Shows the plugin what it holds and `data` as the body buffer `kind`, `end` saying
    /// whether the body ends there; the plugin's action and effects.
    fn call(
        &mut self,
        kind: u32,
        data: &[u8],
        end: bool,
        callback: fn(&mut Vm, u32, u32, bool) -> Result<u32, Failure>,
    ) -> Result<(u32, Effects), Failure> {
        self.held.extend_from_slice(data);
        let mut stream = Stream {
            body: Some((kind, std::mem::take(&mut self.held))),
            props: Some(self.props.clone()),
            ..Stream::default()
        };
        let (id, size) = (
            self.id,
            stream.body.as_ref().map_or(0, |(_, b)| b.len() as u32),
        );
        let result = self
            .slots
            .with_vm(self.worker, Some(self.generation), |vm| {
                vm.with_stream(id, &mut stream, |vm| callback(vm, id, size, end))
            });
        if let Some((_, held)) = stream.body {
            self.held = held;
        }
        if let Some(props) = stream.props {
            self.props = props;
        }
        result
    }
}

/// The request-body states of a request, one per `wasm` entry it went through.
#[derive(Clone, Default)]
struct BodyStates(Vec<Held>);

fn props(req: &request::Parts, ctx: &Context) -> Props {
    Props {
        method: req.method.clone(),
        uri: req.uri.clone(),
        authority: req.headers.get(http::header::HOST).cloned(),
        client_ip: ctx.client_ip,
        tls: ctx.tls,
        start: ctx.start,
        request_id: ctx.request_id.clone(),
        subject: ctx.subject.clone(),
        status: None,
        set: Vec::new(),
    }
}

/// Whether a request has no body to come, as far as its head tells: an HTTP/1 head says
/// (a length, or chunked); an HTTP/2 stream may carry a body without a `content-length`,
/// so there only a zero length, or a method that has no body, says so.
fn bodiless(req: &request::Parts) -> bool {
    let length = req.headers.get(CONTENT_LENGTH).map(|v| v.as_bytes());
    if length.is_some_and(|l| l != b"0") || req.headers.contains_key(TRANSFER_ENCODING) {
        return false;
    }
    length.is_some()
        || req.version < http::Version::HTTP_2
        || matches!(req.method, Method::GET | Method::HEAD)
}

impl Wasm {
    /// The answer for a request when the plugin failed.
    fn failed(&self, ctx: &mut Context, failure: &Failure) -> Flow<'static> {
        match self.on_error {
            OnError::Allow => {
                ctx.failed_open();
                Flow::Continue
            }
            OnError::Deny => Flow::Reject(plugin_failed(&self.slots.shared.name, failure)),
        }
    }

    /// Runs one request callback with the request's headers handed to the plugin.
    fn on_request_call(
        &self,
        req: &mut request::Parts,
        ctx: &Context,
        props: &mut Props,
        generation: Option<u64>,
        call: impl FnOnce(&mut Vm, u32) -> Result<u32, Failure>,
        id: Option<u32>,
    ) -> Result<(u32, u64, u32, Effects), Failure> {
        let mut stream = Stream {
            request: std::mem::take(&mut req.headers),
            props: Some(props.clone()),
            writable: &[MapKind::RequestHeaders],
            ..Stream::default()
        };
        let result = self.slots.with_vm(ctx.worker, generation, |vm| {
            let id = match id {
                Some(id) => id,
                None => vm.create_context()?,
            };
            let generation = vm.generation;
            let (action, effects) = vm.with_stream(id, &mut stream, |vm| call(vm, id))?;
            Ok((id, generation, action, effects))
        });
        // The plugin's changes go upstream; after a failure, the request as it came.
        req.headers = stream.request;
        if let Some(changed) = stream.props {
            *props = changed;
        }
        result
    }

    /// What the plugin's effects mean for the request.
    fn decide<'a>(
        &'a self,
        req: &'a mut request::Parts,
        ctx: &'a mut Context,
        action: u32,
        effects: Effects,
        id: u32,
        generation: u64,
    ) -> Flow<'a> {
        if let Some(reply) = effects.reply {
            return Flow::Reject(local_reply(reply));
        }
        if effects.closed {
            return Flow::Reject(Reject::new(
                StatusCode::FORBIDDEN,
                Reason::PluginDenied,
                "the plugin closed the request",
            ));
        }
        // A pause with nothing to wait for (a plugin that would see the body before
        // deciding, which it cannot here) lets the request go on.
        if effects.calls.is_empty() {
            if action != CONTINUE {
                tracing::debug!(plugin = %self.slots.shared.name, "wasm: a pause on request headers with no call out goes on");
            }
            remember_request(ctx, &req.headers);
            return Flow::Continue;
        }
        let calls = effects.calls;
        let link = ctx.current;
        Flow::wait(async move {
            let mut pending = calls;
            while !pending.is_empty() {
                let call = pending.remove(0);
                let cluster = &self.slots.shared.clusters[call.cluster];
                let answer = cluster
                    .endpoint
                    .fetch(ctx.worker, call.request, call.timeout, MAX_CALL_BODY)
                    .await;
                let answer = match answer {
                    Ok(resp) => {
                        let (parts, body) = resp.into_parts();
                        CallAnswer {
                            status: Some(parts.status),
                            headers: parts.headers,
                            body,
                        }
                    }
                    Err(e) => {
                        tracing::debug!(plugin = %self.slots.shared.name, cluster = %cluster.name, error = %e, "wasm: an HTTP call failed");
                        CallAnswer {
                            status: None,
                            headers: HeaderMap::new(),
                            body: Bytes::new(),
                        }
                    }
                };
                let (count, size) = (
                    answer.headers.len() as u32 + u32::from(answer.status.is_some()),
                    answer.body.len() as u32,
                );
                let Some(mut props) = exchange_of(ctx, link).map(|e| e.props.clone()) else {
                    return Flow::Continue;
                };
                let mut answer = Some(answer);
                let result = self.on_request_call(
                    req,
                    ctx,
                    &mut props,
                    Some(generation),
                    |vm, _| {
                        vm.set_call(answer.take());
                        vm.http_call_response(call.token, count, size)?;
                        Ok(CONTINUE)
                    },
                    Some(id),
                );
                if let Some(exchange) = exchange_of(ctx, link) {
                    exchange.props = props;
                }
                match result {
                    Err(failure) => return self.failed(ctx, &failure),
                    Ok((.., effects)) => {
                        if let Some(reply) = effects.reply {
                            return Flow::Reject(local_reply(reply));
                        }
                        if effects.resumed {
                            remember_request(ctx, &req.headers);
                            return Flow::Continue;
                        }
                        pending.extend(effects.calls);
                    }
                }
            }
            self.failed(
                ctx,
                &Failure("it left the request paused with nothing to wait for".into()),
            )
        })
    }
}

fn local_reply(reply: LocalReply) -> Reject {
    let mut reject = Reject::new(
        reply.status,
        Reason::PluginDenied,
        "the plugin answered the request",
    );
    reject.headers = reply.headers;
    reject.body = Some(reply.body);
    reject
}

fn plugin_failed(name: &str, failure: &Failure) -> Reject {
    tracing::debug!(plugin = name, %failure, "wasm: request answered with 500");
    Reject::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        Reason::PluginFailed,
        "a plugin failed",
    )
}

impl Middleware for Wasm {
    fn on_request<'a>(&'a self, req: &'a mut request::Parts, ctx: &'a mut Context) -> Flow<'a> {
        let mut props = props(req, ctx);
        let count = req.headers.len() as u32 + 4;
        let end = bodiless(req);
        let result = self.on_request_call(
            req,
            ctx,
            &mut props,
            None,
            |vm, id| vm.request_headers(id, count, end),
            None,
        );
        let (id, generation, action, effects) = match result {
            Ok(done) => done,
            Err(failure) => return self.failed(ctx, &failure),
        };
        let end_of = Arc::new(End {
            slots: self.slots.clone(),
            worker: ctx.worker,
            id,
            generation,
            props: Mutex::new(Some(props.clone())),
        });
        let exchange = Exchange {
            link: ctx.current,
            id,
            generation,
            props,
            request: HeaderMap::new(),
            replace: None,
            end: end_of,
        };
        if !end {
            let body = exchange.held(&self.slots, ctx.worker);
            match ctx.body.get_mut::<BodyStates>() {
                Some(all) => all.0.push(body),
                None => {
                    ctx.body.insert(BodyStates(vec![body]));
                }
            }
        }
        match ctx.state.get_mut::<Exchanges>() {
            Some(all) => all.0.push(exchange),
            None => {
                ctx.state.insert(Exchanges(vec![exchange]));
            }
        }
        self.decide(req, ctx, action, effects, id, generation)
    }

    fn inspects_body(&self) -> bool {
        true
    }

    fn on_request_body(&self, piece: &Piece<'_>, state: &mut Extensions) -> Result<(), Reject> {
        let Some(body) = state.get_mut::<BodyStates>().and_then(|all| {
            all.0
                .iter_mut()
                .find(|b| Arc::ptr_eq(&b.slots, &self.slots))
        }) else {
            return Ok(()); // a request without a body, or one the plugin did not see
        };
        if body.failed {
            return Ok(());
        }
        let kind = abi::buffer::REQUEST_BODY;
        let result = body.call(kind, piece.data, piece.end, Vm::request_body);
        match result {
            Err(failure) => match self.on_error {
                OnError::Allow => {
                    body.failed = true;
                    body.held = Vec::new();
                    Ok(())
                }
                OnError::Deny => Err(plugin_failed(&self.slots.shared.name, &failure)),
            },
            Ok((
                _,
                Effects {
                    reply: Some(reply), ..
                },
            )) => Err(local_reply(reply)),
            Ok((CONTINUE, _)) => {
                body.held.clear();
                Ok(())
            }
            // Held while the plugin pauses, within the bound.
            Ok(_) if body.held.len() > self.max_body => Err(Reject::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Reason::BodyTooLarge,
                "the plugin held more of the request body than max_body",
            )),
            Ok(_) => Ok(()),
        }
    }

    fn on_request_trailers(
        &self,
        trailers: &mut HeaderMap,
        state: &mut Extensions,
    ) -> Result<(), Reject> {
        let Some(body) = state
            .get_mut::<BodyStates>()
            .and_then(|all| {
                all.0
                    .iter_mut()
                    .find(|b| Arc::ptr_eq(&b.slots, &self.slots))
            })
            .filter(|b| !b.failed)
        else {
            return Ok(());
        };
        let result = body.trailers(MapKind::RequestTrailers, trailers, Vm::request_trailers);
        match result {
            Ok(Effects {
                reply: Some(reply), ..
            }) => Err(local_reply(reply)),
            Ok(_) => Ok(()),
            Err(_) if self.on_error == OnError::Allow => {
                body.failed = true;
                Ok(())
            }
            Err(failure) => Err(plugin_failed(&self.slots.shared.name, &failure)),
        }
    }

    fn on_response(&self, resp: &mut response::Parts, ctx: &mut Context) {
        let link = ctx.current;
        let worker = ctx.worker;
        let Some(exchange) = ctx
            .state
            .get_mut::<Exchanges>()
            .and_then(|all| all.0.iter_mut().find(|e| e.link == link))
        else {
            return;
        };
        let mut props = exchange.props.clone();
        props.status = Some(resp.status);
        let mut stream = Stream {
            request: std::mem::take(&mut exchange.request),
            response: std::mem::take(&mut resp.headers),
            props: Some(props),
            writable: &[MapKind::ResponseHeaders],
            ..Stream::default()
        };
        let (id, generation) = (exchange.id, exchange.generation);
        let count = stream.response.len() as u32 + 1;
        let end = resp.status == StatusCode::NO_CONTENT
            || resp.status == StatusCode::NOT_MODIFIED
            || stream
                .response
                .get(CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() == b"0");
        let result = self.slots.with_vm(worker, Some(generation), |vm| {
            vm.with_stream(id, &mut stream, |vm| vm.response_headers(id, count, end))
        });
        resp.headers = stream.response;
        exchange.request = stream.request;
        if let Some(props) = stream.props {
            *exchange
                .end
                .props
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(props.clone());
            exchange.props = props;
        }
        let answer = match result {
            Ok((_, effects)) => effects.reply.map(|reply| {
                ctx.refuse_response(Reason::PluginDenied);
                local_reply(reply).render(ctx.request_id.as_ref(), false)
            }),
            Err(failure) => match self.on_error {
                OnError::Allow => {
                    ctx.failed_open();
                    return;
                }
                OnError::Deny => {
                    ctx.refuse_response(Reason::PluginFailed);
                    Some(
                        plugin_failed(&self.slots.shared.name, &failure)
                            .render(ctx.request_id.as_ref(), false),
                    )
                }
            },
        };
        if let Some(answer) = answer {
            let (parts, body) = answer.into_parts();
            resp.status = parts.status;
            resp.headers = parts.headers;
            resp.headers.remove(CONTENT_LENGTH);
            if let Some(exchange) = exchange_of(ctx, link) {
                exchange.replace = Some(body);
            }
        }
    }

    fn filters_response_body(&self) -> bool {
        true
    }

    fn on_response_body(&self, resp: &mut response::Parts, ctx: &mut Context) -> BodyPhase {
        let link = ctx.current;
        let worker = ctx.worker;
        let Some(exchange) = exchange_of(ctx, link) else {
            return BodyPhase::Pass("the plugin did not see the request");
        };
        if let Some(body) = exchange.replace.take() {
            return BodyPhase::Filter(Box::new(Replace(Some(body))));
        }
        let has_body = self
            .slots
            .with_vm(worker, Some(exchange.generation), |vm| {
                Ok(vm.has_response_body())
            })
            .unwrap_or(false);
        if !has_body {
            return BodyPhase::Pass("the plugin has no response body callback");
        }
        BodyPhase::Filter(Box::new(PluginBody {
            held: exchange.held(&self.slots, worker),
            max_body: self.max_body,
            length: resp.headers.contains_key(CONTENT_LENGTH),
            allow: self.on_error == OnError::Allow,
        }))
    }

    fn would_ask(&self, req: &request::Parts, ctx: &Context) -> Option<String> {
        if self.slots.shared.clusters.is_empty() {
            return None;
        }
        // The plugin runs once on a copy of the request to see whether it would call out.
        let mut copy = http::Request::new(());
        *copy.method_mut() = req.method.clone();
        *copy.uri_mut() = req.uri.clone();
        *copy.headers_mut() = req.headers.clone();
        let (mut parts, ()) = copy.into_parts();
        let count = parts.headers.len() as u32 + 4;
        let result = self.on_request_call(
            &mut parts,
            ctx,
            &mut props(req, ctx),
            None,
            |vm, id| {
                let action = vm.request_headers(id, count, true);
                vm.finish(id, None)?;
                action
            },
            None,
        );
        let (.., effects) = result.ok()?;
        let calls: Vec<String> = effects
            .calls
            .iter()
            .map(|call| {
                let cluster = &self.slots.shared.clusters[call.cluster];
                format!(
                    "{} {} on cluster {} ({})",
                    call.request.method(),
                    call.request.uri().path(),
                    cluster.name,
                    cluster.url
                )
            })
            .collect();
        (!calls.is_empty()).then(|| {
            format!(
                "would ask {} (the plugin decides on the answer)",
                calls.join(", ")
            )
        })
    }
}

fn exchange_of(ctx: &mut Context, link: usize) -> Option<&mut Exchange> {
    ctx.state
        .get_mut::<Exchanges>()
        .and_then(|all| all.0.iter_mut().find(|e| e.link == link))
}

/// Keeps the request headers as they go upstream, for the response callbacks to read.
fn remember_request(ctx: &mut Context, headers: &HeaderMap) {
    let link = ctx.current;
    if let Some(exchange) = exchange_of(ctx, link) {
        exchange.request = headers.clone();
    }
}

/// A body that replaces the app's: the app's pieces are dropped, this goes out at the end.
struct Replace(Option<Bytes>);

impl BodyFilter for Replace {
    fn filter(&mut self, _: Bytes, at: Boundary) -> io::Result<Bytes> {
        Ok(match at {
            Boundary::End => self.0.take().unwrap_or_default(),
            _ => Bytes::new(),
        })
    }

    fn describe(&self) -> String {
        "replaced by the plugin's answer".into()
    }
}

/// The response body through the plugin's `on_http_response_body`: each piece is shown to
/// it; while it pauses, pieces are held (up to `max_body`) so it sees them together.
struct PluginBody {
    held: Held,
    max_body: usize,
    /// The head announced a `content-length`: the plugin may not change the body's length.
    length: bool,
    allow: bool,
}

impl BodyFilter for PluginBody {
    fn filter(&mut self, data: Bytes, at: Boundary) -> io::Result<Bytes> {
        let held = &mut self.held;
        if held.failed {
            return Ok(data);
        }
        if at == Boundary::Pause && data.is_empty() {
            return Ok(Bytes::new());
        }
        let end = at == Boundary::End;
        let before = held.held.len() + data.len();
        let result = held.call(abi::buffer::RESPONSE_BODY, &data, end, Vm::response_body);
        match result {
            Err(failure) if self.allow => {
                held.failed = true;
                tracing::debug!(plugin = %held.slots.shared.name, %failure, "wasm: the response body passes as it is");
                Ok(Bytes::from(std::mem::take(&mut held.held)))
            }
            Err(failure) => Err(io::Error::other(format!("the plugin failed: {failure}"))),
            Ok((action, _)) if action == CONTINUE || end => {
                if self.length && held.held.len() != before {
                    return Err(io::Error::other(
                        "the plugin changed the response body's length but left its \
                         content-length (remove it in on_http_response_headers)",
                    ));
                }
                Ok(Bytes::from(std::mem::take(&mut held.held)))
            }
            // Held while the plugin pauses, within the bound.
            Ok(_) if held.held.len() > self.max_body => Err(io::Error::other(format!(
                "the plugin held more than max_body ({} bytes) of the response body",
                self.max_body
            ))),
            Ok(_) => Ok(Bytes::new()),
        }
    }

    fn trailers(&mut self, trailers: &mut HeaderMap) -> io::Result<()> {
        if self.held.failed {
            return Ok(());
        }
        let kind = MapKind::ResponseTrailers;
        match self.held.trailers(kind, trailers, Vm::response_trailers) {
            Ok(_) => Ok(()),
            Err(_) if self.allow => {
                self.held.failed = true;
                Ok(())
            }
            Err(failure) => Err(io::Error::other(format!("the plugin failed: {failure}"))),
        }
    }

    fn describe(&self) -> String {
        format!("through plugin {}", self.held.slots.shared.name)
    }
}
