//! A plugin's compiled module and its instances: one per worker, made on the worker's first
//! request, each call into it bounded by fuel (instructions) and its memory by a limiter.
//! An instance that failed (a trap, its fuel or memory spent, a misuse of the ABI) is
//! dropped, never called again: the next request gets a fresh one.
//!
//! The host state of an instance ([`Host`]) holds what the current callback may touch:
//! the request's or response's headers are moved in for the call and moved back after it,
//! so a plugin reads only the request it is called for, and nothing is copied.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;
use wasmi::{
    Config, Engine, ExternType, Linker, Memory, Module, Store, StoreLimits, StoreLimitsBuilder,
    TrapCode, TypedFunc,
};

use crate::config::value::FileContent;
use crate::metrics::Metrics;
use crate::pool::Endpoint;

use super::abi;

/// The root context's id: every instance has one root context, made at its start.
pub(super) const ROOT: u32 = 1;

/// A plugin file, compiled when the config is loaded; clones share the compiled code.
#[derive(Clone)]
pub struct Plugin {
    pub(super) module: Module,
    pub(super) linker: Arc<Linker<Host>>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin").finish_non_exhaustive()
    }
}

/// Exports a proxy-wasm plugin must have; the others are called when present.
const REQUIRED: [&str; 2] = ["memory", "proxy_on_context_create"];

impl FileContent for Plugin {
    fn parse(bytes: Vec<u8>) -> Result<Plugin, String> {
        let mut config = Config::default();
        config.consume_fuel(true);
        let engine = Engine::new(&config);
        let module = Module::new(&engine, &bytes[..])
            .map_err(|e| format!("not a WebAssembly module gatehouse can run: {e}"))?;
        let exports: Vec<&str> = module.exports().map(|e| e.name()).collect();
        for name in REQUIRED {
            if !exports.contains(&name) {
                return Err(format!(
                    "not a proxy-wasm plugin: it exports no `{name}` (build it with a \
                     proxy-wasm SDK)"
                ));
            }
        }
        if !exports.contains(&"proxy_on_memory_allocate") && !exports.contains(&"malloc") {
            return Err(
                "not a proxy-wasm plugin: it exports no `proxy_on_memory_allocate` (nor \
                 `malloc`) through which gatehouse hands it values"
                    .into(),
            );
        }
        if let Some(old) = exports
            .iter()
            .find(|e| e.starts_with("proxy_abi_version_0_1"))
        {
            return Err(format!(
                "built for an older proxy-wasm ABI ({old}); gatehouse runs ABI 0.2.x plugins"
            ));
        }
        let mut linker = Linker::new(&engine);
        abi::define(&mut linker).expect("each host function is defined once");
        for import in module.imports() {
            if let ExternType::Func(ty) = import.ty() {
                abi::stub_wasi(&mut linker, import.module(), import.name(), ty);
            }
        }
        Ok(Plugin {
            module,
            linker: Arc::new(linker),
        })
    }
}

/// What a plugin entry's instances share: its settings as the plugin sees them, the
/// clusters it may call, and its shared data, queues and metrics.
pub(super) struct Shared {
    pub name: Arc<str>,
    pub configuration: String,
    pub vm_configuration: String,
    pub root_id: String,
    pub clusters: Vec<Cluster>,
    pub data: Arc<SharedData>,
    pub queues: Queues,
    pub metrics: PluginMetrics,
}

/// A name the plugin's `dispatch_http_call` may use, and where it leads.
pub(super) struct Cluster {
    pub name: String,
    pub url: Uri,
    pub endpoint: Endpoint,
}

impl Shared {
    /// One line of the plugin's log in gatehouse's, at the level the plugin chose.
    pub fn log(&self, level: u32, message: &str) {
        let plugin = &*self.name;
        match level {
            0 => tracing::trace!(plugin, "{message}"),
            1 => tracing::debug!(plugin, "{message}"),
            2 => tracing::info!(plugin, "{message}"),
            3 => tracing::warn!(plugin, "{message}"),
            _ => tracing::error!(plugin, "{message}"),
        }
    }
}

/// The most verbose level gatehouse's log shows, in the ABI's numbers, so a plugin can
/// skip formatting lines nobody will read.
pub(super) fn log_level() -> u32 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::TRACE => 0,
        LevelFilter::DEBUG => 1,
        LevelFilter::INFO => 2,
        LevelFilter::WARN => 3,
        _ => 4,
    }
}

/// Key-value data shared by an entry's instances on every worker, kept across reloads.
#[derive(Default)]
pub struct SharedData(Mutex<HashMap<Vec<u8>, Versioned>>);

/// A shared value and its version.
type Versioned = (Vec<u8>, u32);

impl SharedData {
    /// The value of `key` and its version (the compare-and-swap token).
    pub fn get(&self, key: &[u8]) -> Option<(Vec<u8>, u32)> {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(key).cloned()
    }

    /// Sets `key` unless `cas` is non-zero and not its current version.
    pub fn set(&self, key: Vec<u8>, value: Vec<u8>, cas: u32) -> bool {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let version = map.get(&key).map_or(0, |(_, v)| *v);
        if cas != 0 && cas != version {
            return false;
        }
        map.insert(key, (value, version.wrapping_add(1).max(1)));
        true
    }
}

/// The shared data of every plugin entry, by entry name: a reload keeps it.
#[derive(Default)]
pub struct SharedStores(Mutex<HashMap<String, Arc<SharedData>>>);

impl SharedStores {
    pub fn of(&self, name: &str) -> Arc<SharedData> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry(name.to_owned()).or_default().clone()
    }
}

/// An entry's shared queues: registered by one instance's root context, filled by any.
#[derive(Default)]
pub(super) struct Queues {
    queues: Mutex<Vec<Queue>>,
    /// Wakes the entry's background task to tell the owners that items arrived.
    pub ready: Notify,
}

struct Queue {
    name: Vec<u8>,
    /// The worker whose instance registered it, and the context that did.
    owner: (usize, u32),
    items: std::collections::VecDeque<Vec<u8>>,
    /// Items arrived since the owner was last told.
    unsaid: bool,
}

impl Queues {
    pub fn register(&self, name: Vec<u8>, worker: usize, context: u32) -> u32 {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = queues.iter().position(|q| q.name == name) {
            queues[i].owner = (worker, context);
            return i as u32 + 1;
        }
        queues.push(Queue {
            name,
            owner: (worker, context),
            items: Default::default(),
            unsaid: false,
        });
        queues.len() as u32
    }

    pub fn resolve(&self, name: &[u8]) -> Option<u32> {
        let queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        queues
            .iter()
            .position(|q| q.name == name)
            .map(|i| i as u32 + 1)
    }

    pub fn enqueue(&self, id: u32, value: Vec<u8>) -> bool {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(queue) = queues.get_mut((id as usize).wrapping_sub(1)) else {
            return false;
        };
        queue.items.push_back(value);
        queue.unsaid = true;
        drop(queues);
        self.ready.notify_one();
        true
    }

    /// `None`: no such queue; `Some(None)`: it is empty.
    pub fn dequeue(&self, id: u32) -> Option<Option<Vec<u8>>> {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        let queue = queues.get_mut((id as usize).wrapping_sub(1))?;
        Some(queue.items.pop_front())
    }

    /// The queues with items their owners have not been told of, as (worker, context, id).
    pub fn unsaid(&self) -> Vec<(usize, u32, u32)> {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        queues
            .iter_mut()
            .enumerate()
            .filter_map(|(i, q)| {
                std::mem::take(&mut q.unsaid).then_some((q.owner.0, q.owner.1, i as u32 + 1))
            })
            .collect()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct MetricLabels {
    middleware: Arc<str>,
    name: String,
}

/// A plugin's metrics, exported as `gatehouse_plugin_counter_total` and
/// `gatehouse_plugin_gauge` labelled with the entry and the metric's name.
pub(super) struct PluginMetrics {
    entry: Arc<str>,
    counters: Family<MetricLabels, Counter>,
    gauges: Family<MetricLabels, Gauge>,
    defined: Mutex<Vec<(u32, String, Metric)>>,
}

#[derive(Clone)]
enum Metric {
    Counter(Counter),
    Gauge(Gauge),
}

/// The ABI's metric types.
const COUNTER: u32 = 0;
const GAUGE: u32 = 1;

impl PluginMetrics {
    pub fn new(metrics: &Metrics, entry: Arc<str>) -> PluginMetrics {
        PluginMetrics {
            entry,
            counters: metrics.family(
                "gatehouse_plugin_counter",
                "Counters defined by wasm plugins, by entry and metric name",
            ),
            gauges: metrics.family(
                "gatehouse_plugin_gauge",
                "Gauges defined by wasm plugins, by entry and metric name",
            ),
            defined: Mutex::default(),
        }
    }

    /// The id of metric `name` of type `kind`, defined now if it is new; `None` for a
    /// type gatehouse does not export (histograms).
    pub fn define(&self, kind: u32, name: &str) -> Option<u32> {
        let mut defined = self.defined.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((id, ..)) = defined.iter().find(|(_, n, m)| {
            n == name
                && matches!(
                    (kind, m),
                    (COUNTER, Metric::Counter(_)) | (GAUGE, Metric::Gauge(_))
                )
        }) {
            return Some(*id);
        }
        let labels = MetricLabels {
            middleware: self.entry.clone(),
            name: name.to_owned(),
        };
        let metric = match kind {
            COUNTER => Metric::Counter(self.counters.get_or_create_owned(&labels)),
            GAUGE => Metric::Gauge(self.gauges.get_or_create_owned(&labels)),
            _ => return None,
        };
        let id = defined.len() as u32 + 1;
        defined.push((id, name.to_owned(), metric));
        Some(id)
    }

    fn metric(&self, id: u32) -> Option<Metric> {
        let defined = self.defined.lock().unwrap_or_else(PoisonError::into_inner);
        defined
            .get((id as usize).wrapping_sub(1))
            .map(|(_, _, m)| m.clone())
    }

    pub fn increment(&self, id: u32, offset: i64) -> bool {
        match self.metric(id) {
            Some(Metric::Counter(c)) if offset >= 0 => {
                c.inc_by(offset as u64);
                true
            }
            Some(Metric::Gauge(g)) => {
                g.inc_by(offset);
                true
            }
            _ => false,
        }
    }

    pub fn record(&self, id: u32, value: u64) -> bool {
        match self.metric(id) {
            Some(Metric::Gauge(g)) => {
                g.set(value as i64);
                true
            }
            // A counter only counts up: recording a value into it is a misuse.
            _ => false,
        }
    }

    pub fn get(&self, id: u32) -> Option<u64> {
        match self.metric(id)? {
            Metric::Counter(c) => Some(c.get()),
            Metric::Gauge(g) => Some(g.get() as u64),
        }
    }
}

/// The header maps of the ABI (`MapType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum MapKind {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
    CallHeaders,
    CallTrailers,
}

impl MapKind {
    pub fn from_abi(kind: u32) -> Option<MapKind> {
        Some(match kind {
            0 => MapKind::RequestHeaders,
            1 => MapKind::RequestTrailers,
            2 => MapKind::ResponseHeaders,
            3 => MapKind::ResponseTrailers,
            6 => MapKind::CallHeaders,
            7 => MapKind::CallTrailers,
            _ => return None,
        })
    }
}

/// What a request is, as plugins read it through properties and pseudo-headers.
#[derive(Clone, Debug)]
pub(super) struct Props {
    pub method: Method,
    pub uri: Uri,
    pub authority: Option<HeaderValue>,
    pub client_ip: IpAddr,
    pub tls: bool,
    pub start: Instant,
    pub request_id: Option<HeaderValue>,
    pub subject: Option<Arc<str>>,
    pub status: Option<StatusCode>,
    /// Properties the plugin set on this request, read back by its later callbacks.
    pub set: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Props {
    pub fn authority(&self) -> Option<Vec<u8>> {
        self.authority
            .as_ref()
            .map(|v| v.as_bytes().to_vec())
            .or_else(|| self.uri.authority().map(|a| a.as_str().into()))
    }

    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}

/// A local reply the plugin asked for.
pub(super) struct LocalReply {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

/// An HTTP call's answer as the plugin reads it; no status when the call failed.
pub(super) struct CallAnswer {
    pub status: Option<StatusCode>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An HTTP call the plugin dispatched, still to be made.
pub(super) struct Call {
    pub token: u32,
    pub cluster: usize,
    pub request: Request<Bytes>,
    pub timeout: Duration,
}

/// What the current callback may read and change.
#[derive(Default)]
pub(super) struct Stream {
    pub request: HeaderMap,
    pub request_trailers: HeaderMap,
    pub response: HeaderMap,
    pub response_trailers: HeaderMap,
    pub call_trailers: HeaderMap,
    pub call: Option<CallAnswer>,
    /// The body buffer of a body callback, with its `BufferType`.
    pub body: Option<(u32, Vec<u8>)>,
    pub body_changed: bool,
    pub props: Option<Props>,
    /// The maps this callback may change.
    pub writable: &'static [MapKind],
}

/// What the plugin asked for during a callback.
#[derive(Default)]
pub(super) struct Effects {
    pub reply: Option<LocalReply>,
    pub resumed: bool,
    pub closed: bool,
    pub calls: Vec<Call>,
}

/// An instance's host state.
pub struct Host {
    pub(super) shared: Arc<Shared>,
    limits: StoreLimits,
    pub(super) memory: Option<Memory>,
    pub(super) alloc: Option<TypedFunc<u32, u32>>,
    pub(super) tick: Option<Duration>,
    pub(super) effective: u32,
    pub(super) worker: usize,
    pub(super) started: Instant,
    pub(super) stream: Stream,
    pub(super) effects: Effects,
    /// The request contexts alive in the instance.
    live: Vec<u32>,
    next_token: u32,
}

impl Host {
    pub(super) fn knows(&self, id: u32) -> bool {
        id == ROOT || self.live.contains(&id)
    }

    /// Queues an HTTP call to `cluster` for after the callback; `None` if the cluster is
    /// not configured or the headers lack `:method` or `:path`.
    pub(super) fn dispatch(
        &mut self,
        cluster: &[u8],
        pairs: &[(&[u8], &[u8])],
        body: Bytes,
        timeout: Duration,
    ) -> Option<u32> {
        let index = self
            .shared
            .clusters
            .iter()
            .position(|c| c.name.as_bytes() == cluster)?;
        let find = |name: &[u8]| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        let method = Method::from_bytes(find(b":method")?).ok()?;
        let path = find(b":path")?;
        let target = &self.shared.clusters[index].url;
        let uri = Uri::builder()
            .scheme(target.scheme_str().unwrap_or("http"))
            .authority(target.authority()?.as_str())
            .path_and_query(path)
            .build()
            .ok()?;
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        for (k, v) in pairs {
            if *k == b":authority" {
                if let Ok(v) = HeaderValue::from_bytes(v) {
                    headers.insert(HOST, v);
                }
            } else if !k.starts_with(b":") {
                if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k), HeaderValue::from_bytes(v)) {
                    headers.append(k, v);
                }
            }
        }
        self.next_token = self.next_token.wrapping_add(1).max(1);
        let token = self.next_token;
        self.effects.calls.push(Call {
            token,
            cluster: index,
            request,
            timeout,
        });
        Some(token)
    }

    /// A property, by its path (names separated by NULs), in the encoding Envoy uses:
    /// strings as bytes, numbers as 8-byte little-endian integers.
    pub(super) fn property(&self, path: &[u8]) -> Option<Vec<u8>> {
        let path = path.strip_suffix(b"\0").unwrap_or(path);
        let set = self.stream.props.iter().flat_map(|p| p.set.iter());
        if let Some((_, v)) = set.rev().find(|(k, _)| k == path) {
            return Some(v.clone());
        }
        let shared = &self.shared;
        let text = |s: &str| Some(s.as_bytes().to_vec());
        match path {
            b"plugin_name" => return text(&shared.name),
            b"plugin_root_id" => return text(&shared.root_id),
            b"plugin_vm_id" => return Some(Vec::new()),
            _ => {}
        }
        let props = self.stream.props.as_ref()?;
        let uri_path = props.uri.path_and_query().map_or("/", |p| p.as_str());
        match path {
            b"request\0path" => text(uri_path),
            b"request\0url_path" => text(props.uri.path()),
            b"request\0query" => text(props.uri.query().unwrap_or("")),
            b"request\0method" => text(props.method.as_str()),
            b"request\0host" => props.authority(),
            b"request\0scheme" => text(props.scheme()),
            b"request\0id" => props.request_id.as_ref().map(|v| v.as_bytes().to_vec()),
            b"request\0time" => {
                let at = SystemTime::now() - props.start.elapsed();
                let nanos = at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as i64);
                Some(nanos.to_le_bytes().to_vec())
            }
            b"request\0duration" => Some(
                (props.start.elapsed().as_nanos() as i64)
                    .to_le_bytes()
                    .to_vec(),
            ),
            b"response\0code" => props
                .status
                .map(|s| i64::from(s.as_u16()).to_le_bytes().to_vec()),
            b"source\0address" => text(&props.client_ip.to_string()),
            b"connection\0tls" => Some(vec![u8::from(props.tls)]),
            b"gatehouse\0subject" => props.subject.as_deref().and_then(text),
            _ => None,
        }
    }

    /// Sets a property of the current request; `false` outside one (a root context's
    /// callback has no request).
    pub(super) fn set_property(&mut self, path: Vec<u8>, value: Vec<u8>) -> bool {
        let Some(props) = self.stream.props.as_mut() else {
            return false;
        };
        let path = match path.strip_suffix(b"\0") {
            Some(p) => p.to_vec(),
            None => path,
        };
        props.set.retain(|(k, _)| *k != path);
        props.set.push((path, value));
        true
    }
}

/// Why a plugin failed, in words for the log and `explain`.
#[derive(Debug, Clone)]
pub struct Failure(pub String);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The bounds of every instance of an entry.
#[derive(Clone, Copy, Debug)]
pub(super) struct Bounds {
    pub fuel: u64,
    pub memory: usize,
}

/// `proxy_on_http_call_response(context, token, headers, body size, trailers)`.
type CallResponse = TypedFunc<(u32, u32, u32, u32, u32), ()>;

/// The callbacks of a plugin, those it exports.
struct Exports {
    context_create: TypedFunc<(u32, u32), ()>,
    vm_start: Option<TypedFunc<(u32, u32), u32>>,
    configure: Option<TypedFunc<(u32, u32), u32>>,
    tick: Option<TypedFunc<u32, ()>>,
    queue_ready: Option<TypedFunc<(u32, u32), ()>>,
    request_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    request_body: Option<TypedFunc<(u32, u32, u32), u32>>,
    request_trailers: Option<TypedFunc<(u32, u32), u32>>,
    response_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    response_body: Option<TypedFunc<(u32, u32, u32), u32>>,
    response_trailers: Option<TypedFunc<(u32, u32), u32>>,
    http_call_response: Option<CallResponse>,
    done: Option<TypedFunc<u32, u32>>,
    log: Option<TypedFunc<u32, ()>>,
    delete: Option<TypedFunc<u32, ()>>,
}

/// The ABI's `Action`: go on, or hold the stream.
pub(super) const CONTINUE: u32 = 0;

/// One instance of a plugin, with its root context started and configured.
pub(super) struct Vm {
    store: Store<Host>,
    exports: Exports,
    bounds: Bounds,
    /// Which instance of its slot this is: a request whose context lives in an instance
    /// that failed and was replaced cannot go on in the new one.
    pub generation: u64,
    next_id: u32,
    /// When the root context's next tick is due.
    pub next_tick: Option<Instant>,
}

impl Vm {
    pub fn new(
        plugin: &Plugin,
        shared: Arc<Shared>,
        worker: usize,
        bounds: Bounds,
        generation: u64,
    ) -> Result<Vm, Failure> {
        let fail = |what: &str, e: wasmi::Error| Failure(format!("{what}: {e}"));
        let limits = StoreLimitsBuilder::new()
            .memory_size(bounds.memory)
            .instances(1)
            .trap_on_grow_failure(true)
            .build();
        let engine = plugin.module.engine();
        let mut store = Store::new(
            engine,
            Host {
                shared: shared.clone(),
                limits,
                memory: None,
                alloc: None,
                tick: None,
                effective: ROOT,
                worker,
                started: Instant::now(),
                stream: Stream::default(),
                effects: Effects::default(),
                live: Vec::new(),
                next_token: 0,
            },
        );
        store.limiter(|host| &mut host.limits);
        store.set_fuel(bounds.fuel).map_err(|e| fail("fuel", e))?;
        let instance = plugin
            .linker
            .instantiate_and_start(&mut store, &plugin.module)
            .map_err(|e| fail("cannot start the plugin", e))?;
        let memory = instance
            .get_memory(&store, "memory")
            .ok_or_else(|| Failure("the plugin's `memory` export is not a memory".into()))?;
        let alloc = instance
            .get_typed_func::<u32, u32>(&store, "proxy_on_memory_allocate")
            .or_else(|_| instance.get_typed_func::<u32, u32>(&store, "malloc"))
            .map_err(|e| fail("the plugin's allocator", e))?;
        store.data_mut().memory = Some(memory);
        store.data_mut().alloc = Some(alloc);
        macro_rules! export {
            ($name:literal) => {
                match instance.get_func(&store, $name) {
                    None => None,
                    Some(f) => Some(
                        f.typed(&store)
                            .map_err(|e| fail(concat!("the plugin's `", $name, "`"), e))?,
                    ),
                }
            };
        }
        let exports = Exports {
            context_create: export!("proxy_on_context_create").expect("checked at load"),
            vm_start: export!("proxy_on_vm_start"),
            configure: export!("proxy_on_configure"),
            tick: export!("proxy_on_tick"),
            queue_ready: export!("proxy_on_queue_ready"),
            request_headers: export!("proxy_on_request_headers"),
            request_body: export!("proxy_on_request_body"),
            request_trailers: export!("proxy_on_request_trailers"),
            response_headers: export!("proxy_on_response_headers"),
            response_body: export!("proxy_on_response_body"),
            response_trailers: export!("proxy_on_response_trailers"),
            http_call_response: export!("proxy_on_http_call_response"),
            done: export!("proxy_on_done"),
            log: export!("proxy_on_log"),
            delete: export!("proxy_on_delete"),
        };
        let init: Option<TypedFunc<(), ()>> = export!("_initialize");
        let start: Option<TypedFunc<(), ()>> = export!("_start");
        let mut vm = Vm {
            store,
            exports,
            bounds,
            generation,
            next_id: ROOT,
            next_tick: None,
        };
        match (init, start) {
            (Some(f), _) => vm.call(|s| f.call(s, ()))?,
            // A command module: its `main` returns through `proc_exit(0)`.
            (None, Some(f)) => match vm.call(|s| f.call(s, ())) {
                Err(e) if e.0.contains("exit status 0") => {}
                other => other?,
            },
            (None, None) => {}
        }
        let create = vm.exports.context_create;
        vm.call(|s| create.call(s, (ROOT, 0)))?;
        let vm_config = shared.vm_configuration.len() as u32;
        if let Some(f) = vm.exports.vm_start {
            if vm.call(|s| f.call(s, (ROOT, vm_config)))? == 0 {
                return Err(Failure(
                    "the plugin refused to start (on_vm_start returned false)".into(),
                ));
            }
        }
        let config = shared.configuration.len() as u32;
        if let Some(f) = vm.exports.configure {
            if vm.call(|s| f.call(s, (ROOT, config)))? == 0 {
                return Err(Failure(
                    "the plugin refused its configuration (on_configure returned false)".into(),
                ));
            }
        }
        vm.next_tick = vm.store.data().tick.map(|t| Instant::now() + t);
        Ok(vm)
    }

    /// One call into the plugin with a fresh fuel budget; its effects are left in the host.
    fn call<R>(
        &mut self,
        f: impl FnOnce(&mut Store<Host>) -> Result<R, wasmi::Error>,
    ) -> Result<R, Failure> {
        self.store
            .set_fuel(self.bounds.fuel)
            .map_err(|e| Failure(e.to_string()))?;
        f(&mut self.store).map_err(|e| {
            Failure(match e.as_trap_code() {
                Some(TrapCode::OutOfFuel) => format!(
                    "it ran out of fuel ({} instructions in one call: `fuel_per_call`)",
                    self.bounds.fuel
                ),
                Some(TrapCode::GrowthOperationLimited) => format!(
                    "it ran out of memory ({} bytes: `max_memory`)",
                    self.bounds.memory
                ),
                _ => format!("it failed: {e}"),
            })
        })
    }

    /// Makes a request context.
    pub fn create_context(&mut self) -> Result<u32, Failure> {
        self.next_id = self.next_id.wrapping_add(1).max(ROOT + 1);
        let id = self.next_id;
        let create = self.exports.context_create;
        self.store.data_mut().live.push(id);
        self.store.data_mut().effective = id;
        self.call(|s| create.call(s, (id, ROOT)))?;
        Ok(id)
    }

    /// Hands `stream` to the plugin for one callback and takes it back, changed, with the
    /// effects. A caller's stream is untouched when the callback never ran.
    pub fn with_stream<R>(
        &mut self,
        id: u32,
        stream: &mut Stream,
        call: impl FnOnce(&mut Vm) -> Result<R, Failure>,
    ) -> Result<(R, Effects), Failure> {
        let host = self.store.data_mut();
        host.stream = std::mem::take(stream);
        host.effects = Effects::default();
        host.effective = id;
        let result = call(self);
        let host = self.store.data_mut();
        *stream = std::mem::take(&mut host.stream);
        let effects = std::mem::take(&mut host.effects);
        result.map(|r| (r, effects))
    }

    pub fn request_headers(&mut self, id: u32, count: u32, end: bool) -> Result<u32, Failure> {
        let Some(f) = self.exports.request_headers else {
            return Ok(CONTINUE);
        };
        self.call(|s| f.call(s, (id, count, u32::from(end))))
    }

    pub fn request_body(&mut self, id: u32, size: u32, end: bool) -> Result<u32, Failure> {
        let Some(f) = self.exports.request_body else {
            return Ok(CONTINUE);
        };
        self.call(|s| f.call(s, (id, size, u32::from(end))))
    }

    /// The request's trailers (in the stream handed over), `count` of them.
    pub fn request_trailers(&mut self, id: u32, count: u32) -> Result<u32, Failure> {
        let Some(f) = self.exports.request_trailers else {
            return Ok(CONTINUE);
        };
        self.call(|s| f.call(s, (id, count)))
    }

    /// The response's trailers (in the stream handed over), `count` of them.
    pub fn response_trailers(&mut self, id: u32, count: u32) -> Result<u32, Failure> {
        let Some(f) = self.exports.response_trailers else {
            return Ok(CONTINUE);
        };
        self.call(|s| f.call(s, (id, count)))
    }

    pub fn response_headers(&mut self, id: u32, count: u32, end: bool) -> Result<u32, Failure> {
        let Some(f) = self.exports.response_headers else {
            return Ok(CONTINUE);
        };
        self.call(|s| f.call(s, (id, count, u32::from(end))))
    }

    /// Hands an HTTP call's answer to the next callback.
    pub fn set_call(&mut self, answer: Option<CallAnswer>) {
        self.store.data_mut().stream.call = answer;
    }

    pub fn has_response_body(&self) -> bool {
        self.exports.response_body.is_some()
    }

    pub fn response_body(&mut self, id: u32, size: u32, end: bool) -> Result<u32, Failure> {
        let Some(f) = self.exports.response_body else {
            return Ok(CONTINUE);
        };
        self.call(|s| f.call(s, (id, size, u32::from(end))))
    }

    pub fn http_call_response(
        &mut self,
        token: u32,
        headers: u32,
        body: u32,
    ) -> Result<(), Failure> {
        let Some(f) = self.exports.http_call_response else {
            return Ok(());
        };
        self.call(|s| f.call(s, (ROOT, token, headers, body, 0)))
    }

    /// Ends a request context: done, log, delete, in the ABI's order, with what is known of
    /// the request for `on_log` to read.
    pub fn finish(&mut self, id: u32, props: Option<Props>) -> Result<(), Failure> {
        let host = self.store.data_mut();
        host.effective = id;
        host.stream = Stream {
            props,
            ..Stream::default()
        };
        if let Some(f) = self.exports.done {
            self.call(|s| f.call(s, id))?;
        }
        if let Some(f) = self.exports.log {
            self.call(|s| f.call(s, id))?;
        }
        if let Some(f) = self.exports.delete {
            self.call(|s| f.call(s, id))?;
        }
        let host = self.store.data_mut();
        host.live.retain(|&l| l != id);
        host.stream = Stream::default();
        Ok(())
    }

    /// Ticks the root context if its tick is due; the next due time.
    pub fn tick(&mut self, now: Instant) -> Result<Option<Instant>, Failure> {
        let (Some(due), Some(f)) = (self.next_tick, self.exports.tick) else {
            return Ok(None);
        };
        if due <= now {
            self.store.data_mut().effective = ROOT;
            self.store.data_mut().stream = Stream::default();
            self.call(|s| f.call(s, ROOT))?;
            self.next_tick = self.store.data().tick.map(|t| now + t);
        }
        Ok(self.next_tick)
    }

    pub fn queue_ready(&mut self, context: u32, queue: u32) -> Result<(), Failure> {
        let Some(f) = self.exports.queue_ready else {
            return Ok(());
        };
        self.store.data_mut().effective = context;
        self.store.data_mut().stream = Stream::default();
        self.call(|s| f.call(s, (context, queue)))
    }
}
