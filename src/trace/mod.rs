//! OpenTelemetry tracing (`[tracing]`): W3C Trace Context in and out, one SERVER span per
//! request with a CLIENT child for the upstream call and an INTERNAL child for each
//! middleware that waited, exported in the background as OTLP/HTTP protobuf.
//!
//! What a request pays: without `[tracing]`, nothing (its [`Trace`] stays empty). With it,
//! the request gets ids at its head ([`Tracer::begin`]: the `traceparent` it came with, or
//! a new trace sampled by `sample_ratio`), the upstream request carries them, and its audit
//! event names them. Only a sampled request is recorded: at its end its facts are copied
//! into one [`RequestSpans`] (its strings into one buffer, so the connection's read buffer
//! is not held) and offered to a bounded queue with `try_send`. The exporter task, on the
//! control thread, takes from that queue (every tick while there is work, sleeping while
//! there is none), encodes the protobuf, and POSTs batches with the shared outbound
//! client; a full queue drops spans and counts them.

pub mod context;
mod export;
pub mod otlp;

use std::net::IpAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Method};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

pub use context::{Parent, SpanId, TraceId};

use crate::config::tracing::TracingConfig;
use crate::metrics::Metrics;
use crate::protocol::h1::request::TRACEPARENT;

/// The running tracer: the sampler and the exporter's queue. One per server, fixed at start.
pub struct Tracer {
    /// Traces gatehouse starts are sampled when their id's low 63 bits fall below this
    /// (the OpenTelemetry `TraceIdRatioBased` rule, so any component decides alike).
    threshold: u64,
    queue: mpsc::Sender<RequestSpans>,
    /// Woken when the queue holds `filling_at` requests, so a burst is taken before the
    /// exporter's next tick would find the queue full.
    filling: Arc<Notify>,
    filling_at: usize,
    dropped: Counter,
    warned_full: AtomicBool,
    /// Set to the deadline by [`Tracer::shutdown`]: export what is left by then.
    stop: watch::Sender<Option<tokio::time::Instant>>,
    exporter: Mutex<Option<JoinHandle<()>>>,
}

impl Tracer {
    /// Starts the exporter on the current tokio runtime (the control thread, the last of the
    /// client's `shards`).
    pub fn start(config: &TracingConfig, metrics: &Metrics, shards: usize) -> Arc<Tracer> {
        let (queue, rx) = mpsc::channel(config.queue_capacity);
        let (stop, stopped) = watch::channel(None);
        let filling = Arc::new(Notify::new());
        let exporter = export::Exporter::new(config, metrics, shards);
        let task = tokio::spawn(exporter.run(rx, stopped, Arc::clone(&filling)));
        Arc::new(Tracer {
            threshold: (config.sample_ratio * (1u64 << 63) as f64) as u64,
            queue,
            filling,
            filling_at: (config.queue_capacity / 4).max(1),
            dropped: metrics.trace_spans("dropped"),
            warned_full: AtomicBool::new(false),
            stop,
            exporter: Mutex::new(Some(task)),
        })
    }

    /// The ids of a request with these headers: a single valid `traceparent` is continued
    /// (and its sampling decision followed); otherwise a new trace starts, sampled by
    /// `sample_ratio`. Either way gatehouse's own span gets a new id.
    pub fn begin(&self, headers: &HeaderMap) -> Ids {
        let mut values = headers.get_all(&TRACEPARENT).iter();
        let parent = match (values.next(), values.next()) {
            (Some(value), None) => context::parse_traceparent(value.as_bytes()),
            _ => None,
        };
        let (trace_id, parent, sampled) = match parent {
            Some(p) => (p.trace_id, Some(p.span_id), p.sampled),
            None => {
                let trace_id = TraceId::random();
                (trace_id, None, self.samples(trace_id))
            }
        };
        Ids {
            trace_id,
            span_id: SpanId::random(),
            upstream_span_id: SpanId::random(),
            parent,
            sampled,
        }
    }

    fn samples(&self, trace_id: TraceId) -> bool {
        let low = u64::from_be_bytes(trace_id.0[8..].try_into().expect("8 bytes"));
        low >> 1 < self.threshold
    }

    /// Offers a sampled request's spans to the exporter; never waits: when the queue is
    /// full they are dropped and counted.
    pub fn record(&self, spans: RequestSpans) {
        let spans = match self.queue.try_send(spans) {
            Ok(()) => {
                if self.queue.max_capacity() - self.queue.capacity() >= self.filling_at {
                    self.filling.notify_one();
                }
                return;
            }
            Err(mpsc::error::TrySendError::Full(s) | mpsc::error::TrySendError::Closed(s)) => s,
        };
        self.dropped.inc_by(spans.count());
        if !self.warned_full.swap(true, Relaxed) {
            tracing::warn!("trace export queue full: spans are being dropped (see gatehouse_trace_spans_total{{outcome=\"dropped\"}}; raise tracing.queue_capacity or check the collector)");
        }
    }

    /// Exports what is queued within `within`; what is still unexported then is counted as
    /// failed and logged. Called once, at shutdown, after the requests have ended.
    pub async fn shutdown(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        self.stop.send_replace(Some(deadline));
        let task = self.exporter.lock().expect("not poisoned").take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let dropped = self.dropped.get();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "spans dropped during this run because the export queue was full"
            );
        }
    }
}

/// A request's ids in its trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ids {
    pub trace_id: TraceId,
    /// gatehouse's SERVER span: the request's.
    pub span_id: SpanId,
    /// The CLIENT span of the upstream call: the parent the app is told of.
    pub upstream_span_id: SpanId,
    /// The caller's span, when the request continues a trace.
    pub parent: Option<SpanId>,
    pub sampled: bool,
}

impl Ids {
    /// The `traceparent` for the request to the app.
    pub fn traceparent(&self) -> [u8; context::TRACEPARENT_LEN] {
        context::traceparent(self.trace_id, self.upstream_span_id, self.sampled)
    }
}

/// A request's place in its trace, carried in the chain's context from head to record.
/// Empty (no allocation) without `[tracing]`.
#[derive(Debug, Default)]
pub struct Trace {
    pub ids: Option<Ids>,
    /// The middlewares that waited, in order; only recorded for a sampled request.
    pub waits: Vec<Waited>,
}

impl Trace {
    pub fn sampled(&self) -> bool {
        self.ids.is_some_and(|ids| ids.sampled)
    }
}

/// A middleware's wait (an INTERNAL span): middleware `link` from `start` to `end`.
#[derive(Debug)]
pub struct Waited {
    pub link: usize,
    pub start: Instant,
    pub end: Instant,
    /// It refused the request.
    pub refused: bool,
}

/// Everything the exporter needs of one sampled request: its SERVER span and children.
/// Times are Unix nanoseconds.
#[derive(Debug)]
pub struct RequestSpans {
    pub ids: Ids,
    pub start: u64,
    pub end: u64,
    pub method: Method,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// `network.protocol.version`: `1.0`, `1.1` or `2`.
    pub protocol: &'static str,
    pub status: u16,
    pub client_address: IpAddr,
    pub decision: &'static str,
    pub denied_by: Option<Arc<str>>,
    pub subject: Option<Arc<str>>,
    pub text: Text,
    pub upstream: Option<UpstreamCall>,
    pub internal: Vec<Internal>,
}

impl RequestSpans {
    /// How many spans this is.
    pub fn count(&self) -> u64 {
        1 + u64::from(self.upstream.is_some()) + self.internal.len() as u64
    }
}

/// The CLIENT span: the upstream exchange up to the response head.
#[derive(Debug)]
pub struct UpstreamCall {
    pub start: u64,
    pub end: u64,
    /// The upstream's `host:port`.
    pub authority: HeaderValue,
    /// `network.protocol.version`: `1.1`, or `2` to an h2c app.
    pub protocol: &'static str,
    pub status: Option<u16>,
    /// The kind of failure (`pool::Error::kind`), when there was no response.
    pub error: Option<&'static str>,
}

/// An INTERNAL span: a middleware that waited.
#[derive(Debug)]
pub struct Internal {
    pub span_id: SpanId,
    pub name: Arc<str>,
    /// The middleware's TOML `type`.
    pub kind: &'static str,
    pub start: u64,
    pub end: u64,
    pub refused: bool,
}

/// The request's strings (path, `Host`, `User-Agent`) copied into one buffer.
#[derive(Debug)]
pub struct Text {
    buf: String,
    path: Range<usize>,
    host: Option<Range<usize>>,
    user_agent: Option<Range<usize>>,
}

impl Text {
    /// Copies the strings; header values that are not text are left out.
    pub fn new(path: &str, host: Option<&HeaderValue>, user_agent: Option<&HeaderValue>) -> Text {
        fn text(v: Option<&HeaderValue>) -> Option<&str> {
            v.and_then(|v| v.to_str().ok())
        }
        let (host, user_agent) = (text(host), text(user_agent));
        let len = path.len() + host.map_or(0, str::len) + user_agent.map_or(0, str::len);
        let mut buf = String::with_capacity(len);
        let mut push = |s: &str| {
            let start = buf.len();
            buf.push_str(s);
            start..buf.len()
        };
        let path = push(path);
        let host = host.map(&mut push);
        let user_agent = user_agent.map(&mut push);
        Text {
            buf,
            path,
            host,
            user_agent,
        }
    }

    pub fn path(&self) -> &str {
        &self.buf[self.path.clone()]
    }

    pub fn host(&self) -> Option<&str> {
        self.host.clone().map(|r| &self.buf[r])
    }

    pub fn user_agent(&self) -> Option<&str> {
        self.user_agent.clone().map(|r| &self.buf[r])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracer(ratio: f64) -> Tracer {
        tracer_with(ratio, mpsc::channel(1).0, 1)
    }

    fn tracer_with(ratio: f64, queue: mpsc::Sender<RequestSpans>, filling_at: usize) -> Tracer {
        Tracer {
            threshold: (ratio * (1u64 << 63) as f64) as u64,
            queue,
            filling: Arc::new(Notify::new()),
            filling_at,
            dropped: Counter::default(),
            warned_full: AtomicBool::new(false),
            stop: watch::channel(None).0,
            exporter: Mutex::new(None),
        }
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(&TRACEPARENT, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_parent_is_continued_and_its_decision_followed() {
        for ratio in [0.0, 1.0] {
            let ids = tracer(ratio).begin(&headers(&[PARENT]));
            assert_eq!(ids.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(ids.parent.unwrap().to_string(), "00f067aa0ba902b7");
            assert!(ids.sampled);
            assert_ne!(ids.span_id, ids.upstream_span_id);
            let unsampled = tracer(ratio).begin(&headers(&[&PARENT.replace("-01", "-00")]));
            assert!(!unsampled.sampled);
        }
    }

    #[test]
    fn otherwise_a_new_trace_is_sampled_by_ratio() {
        for bad in [&[][..], &["00-zz"], &[PARENT, PARENT]] {
            let ids = tracer(1.0).begin(&headers(bad));
            assert!(ids.sampled && ids.parent.is_none());
            assert_ne!(ids.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert!(!tracer(0.0).begin(&headers(bad)).sampled);
        }
        let half = tracer(0.5);
        let sampled = (0..10_000)
            .filter(|_| half.begin(&HeaderMap::new()).sampled)
            .count();
        assert!((4_000..6_000).contains(&sampled), "{sampled}");
        // The decision is the trace id's, so every component with the same ratio agrees.
        let id = TraceId([0xff; 16]);
        assert!(!half.samples(id) && tracer(1.0).samples(id));
    }

    /// The exporter sleeps between ticks: a queue filling up wakes it before it overflows,
    /// and a full one drops and counts.
    #[tokio::test]
    async fn a_filling_queue_wakes_the_exporter_and_a_full_one_drops() {
        let (queue, _rx) = mpsc::channel(3);
        let tracer = tracer_with(1.0, queue, 2);
        let woken = || {
            let filling = Arc::clone(&tracer.filling);
            async move {
                tokio::time::timeout(Duration::ZERO, filling.notified())
                    .await
                    .is_ok()
            }
        };
        let request = || export::tests::request("/a", true);
        tracer.record(request());
        assert!(!woken().await, "one queued request is no reason to wake");
        tracer.record(request());
        assert!(woken().await);
        tracer.record(request());
        tracer.record(request());
        assert_eq!(tracer.dropped.get(), 3, "the fourth request's three spans");
    }

    #[test]
    fn text_keeps_each_string() {
        let host = HeaderValue::from_static("api.example:8443");
        let t = Text::new("/a/b", Some(&host), None);
        assert_eq!(
            (t.path(), t.host(), t.user_agent()),
            ("/a/b", Some("api.example:8443"), None)
        );
    }
}
