//! The Prometheus metrics served on the admin port's `/metrics`.
//!
//! prometheus-client owns the families and the text format; the request path only ever
//! does atomic increments on handles resolved once (per status code, per middleware), never
//! a label lookup under a lock. Its own histogram takes a mutex per observation, so
//! durations go into [`Histogram`], an array of atomic buckets encoded through the crate.
//! One [`Metrics`] is made per server and handed to what counts; it outlives config
//! reloads, and tests build their own.

use std::any::Any;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// Every metric family gatehouse exports, present (zero-valued) from the first scrape;
/// a middleware type's own families from when its first entry is built ([`Metrics::family`]).
pub struct Metrics {
    registry: Mutex<Registry>,
    /// The families middleware types registered, by name.
    owned: Mutex<Vec<(&'static str, Box<dyn Any + Send + Sync>)>>,
    requests: Family<StatusLabel, Counter>,
    /// `gatehouse_requests_total{status}`, one resolved handle per status code seen.
    requests_by_status: ByStatus,
    /// Request head received to response body finished (or abandoned by the client).
    pub request_duration: Histogram,
    /// Request sent upstream to upstream response head.
    pub upstream_duration: Histogram,
    rejections: Family<RejectionLabels, Counter>,
    upstream_errors: Family<KindLabel, Counter>,
    audit_events: Family<AuditLabels, Counter>,
    /// `gatehouse_audit_dropped_total`: events lost to a full buffer, the shared queue's
    /// or a sink's (per sink, also in `gatehouse_audit_events_total{outcome="dropped"}`).
    pub audit_dropped: Counter,
    /// `gatehouse_audit_queue_depth`: events waiting for the sink workers.
    pub audit_queue_depth: Gauge,
    /// `gatehouse_upstream_connections`: open connections to the app.
    pub upstream_connections: Gauge,
    /// `gatehouse_upstream_pending_requests`: requests waiting for a free connection.
    pub upstream_pending: Gauge,
    config_reloads: Family<ResultLabel, Counter>,
    trace_spans: Family<OutcomeLabel, Counter>,
    fail_open: Family<MiddlewareLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectionLabels {
    middleware: Arc<str>,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuditLabels {
    sink: Arc<str>,
    outcome: &'static str,
}

/// `{middleware="name"}`, for families counted per chain entry.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MiddlewareLabel {
    pub middleware: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Bucket bounds in seconds for both duration histograms: 0.5 ms to 30 s, as a sidecar
/// adds well under a millisecond and an app's slowest answers run to its timeout.
const DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0,
];

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<StatusLabel, Counter>::default();
        let request_duration = Histogram::new(&DURATION_BUCKETS);
        let upstream_duration = Histogram::new(&DURATION_BUCKETS);
        let rejections = Family::<RejectionLabels, Counter>::default();
        let upstream_errors = Family::<KindLabel, Counter>::default();
        let audit_events = Family::<AuditLabels, Counter>::default();
        let audit_dropped = Counter::default();
        let audit_queue_depth = Gauge::default();
        let upstream_connections = Gauge::default();
        let upstream_pending = Gauge::default();
        let config_reloads = Family::<ResultLabel, Counter>::default();
        let trace_spans = Family::<OutcomeLabel, Counter>::default();
        let fail_open = Family::<MiddlewareLabel, Counter>::default();
        // A family with no label set yet still prints its HELP and TYPE lines; the reload
        // outcomes are known up front, so they print as zeros.
        for result in ["success", "failure"] {
            let _ = config_reloads.get_or_create(&ResultLabel { result });
        }

        registry.register(
            "gatehouse_requests",
            "Responses sent to clients, by status code",
            Listed(requests.clone()),
        );
        registry.register(
            "gatehouse_request_duration_seconds",
            "Time from request head received to response body finished",
            request_duration.clone(),
        );
        registry.register(
            "gatehouse_upstream_duration_seconds",
            "Time from request sent upstream to the upstream's response head",
            upstream_duration.clone(),
        );
        registry.register(
            "gatehouse_rejections",
            "Requests a middleware answered itself, by middleware name and status",
            Listed(rejections.clone()),
        );
        registry.register(
            "gatehouse_upstream_errors",
            "Failed upstream requests, by kind",
            Listed(upstream_errors.clone()),
        );
        registry.register(
            "gatehouse_audit_events",
            "Audit events handled by each sink, by outcome",
            Listed(audit_events.clone()),
        );
        registry.register(
            "gatehouse_audit_dropped",
            "Audit events lost to a full buffer: the shared queue's or a sink's",
            audit_dropped.clone(),
        );
        registry.register(
            "gatehouse_audit_queue_depth",
            "Audit events waiting in the queue",
            audit_queue_depth.clone(),
        );
        registry.register(
            "gatehouse_upstream_connections",
            "Open connections to the upstream (at most upstream.max_connections)",
            upstream_connections.clone(),
        );
        registry.register(
            "gatehouse_upstream_pending_requests",
            "Requests waiting for a free upstream connection (at most upstream.max_pending)",
            upstream_pending.clone(),
        );
        registry.register(
            "gatehouse_config_reloads",
            "Config reloads, by result",
            Listed(config_reloads.clone()),
        );
        registry.register(
            "gatehouse_trace_spans",
            "Spans of sampled requests, by outcome: exported, dropped (the export queue was full) or failed (the collector did not take them)",
            Listed(trace_spans.clone()),
        );
        registry.register(
            "gatehouse_fail_open",
            "Requests a middleware let through only because its backend failed (rate_limit with on_backend_error = \"allow\"), by middleware name",
            Listed(fail_open.clone()),
        );

        Metrics {
            registry: Mutex::new(registry),
            owned: Mutex::default(),
            requests_by_status: ByStatus::new(100),
            requests,
            request_duration,
            upstream_duration,
            rejections,
            upstream_errors,
            audit_events,
            audit_dropped,
            audit_queue_depth,
            upstream_connections,
            upstream_pending,
            config_reloads,
            trace_spans,
            fail_open,
        }
    }

    /// Counts one response to a client and its duration.
    pub fn record_request(&self, status: u16, duration: Duration) {
        self.requests_by_status.inc(status, || {
            self.requests.get_or_create_owned(&StatusLabel { status })
        });
        self.request_duration.observe(duration);
    }

    /// One `gatehouse_requests_total` count, for tests.
    pub fn requests(&self, status: u16) -> u64 {
        self.requests.get_or_create(&StatusLabel { status }).get()
    }

    /// A handle for `gatehouse_rejections_total{middleware, status}`. Callers resolve it
    /// once (per middleware and status) and keep it, so counting is one atomic add.
    pub fn rejection(&self, middleware: &Arc<str>, status: u16) -> Counter {
        self.rejections.get_or_create_owned(&RejectionLabels {
            middleware: middleware.clone(),
            status,
        })
    }

    /// A handle for `gatehouse_upstream_errors_total{kind}`; the proxy resolves one per
    /// kind of failure when it is built.
    pub fn upstream_errors(&self, kind: &'static str) -> Counter {
        self.upstream_errors
            .get_or_create_owned(&KindLabel { kind })
    }

    /// A handle for `gatehouse_audit_events_total{sink, outcome}` (e.g. `delivered`,
    /// `failed`, `spooled`); sink workers resolve theirs at start.
    pub fn audit_events(&self, sink: &Arc<str>, outcome: &'static str) -> Counter {
        self.audit_events.get_or_create_owned(&AuditLabels {
            sink: sink.clone(),
            outcome,
        })
    }

    /// Counts a config reload attempt.
    pub fn config_reload(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.config_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// The family `name` of a middleware type: registered the first time a chain with
    /// the type is built, the same one after, so a reloaded chain counts on. Asked only
    /// while a chain is built; the request path holds resolved handles.
    pub fn family<L, M>(&self, name: &'static str, help: &'static str) -> Family<L, M>
    where
        L: EncodeLabelSet + Clone + Hash + Eq + fmt::Debug + Send + Sync + 'static,
        M: EncodeMetric + TypedMetric + Default + fmt::Debug + Send + Sync + 'static,
    {
        let mut owned = self.owned.lock().unwrap_or_else(PoisonError::into_inner);
        let found = owned.iter().find(|(n, _)| *n == name).map(|(_, family)| {
            family
                .downcast_ref::<Family<L, M>>()
                .expect("one family type per name")
                .clone()
        });
        found.unwrap_or_else(|| {
            let family = Family::<L, M>::default();
            self.registry
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .register(name, help, Listed(family.clone()));
            owned.push((name, Box::new(family.clone())));
            family
        })
    }

    /// A handle for `gatehouse_trace_spans_total{outcome}` (`exported`, `dropped`,
    /// `failed`), resolved when the tracer starts.
    pub fn trace_spans(&self, outcome: &'static str) -> Counter {
        self.trace_spans
            .get_or_create_owned(&OutcomeLabel { outcome })
    }

    /// A handle for `gatehouse_fail_open_total{middleware}`, resolved once per chain entry.
    pub fn fail_open(&self, middleware: &Arc<str>) -> Counter {
        self.fail_open.get_or_create_owned(&MiddlewareLabel {
            middleware: middleware.clone(),
        })
    }

    /// The Prometheus text exposition of every family.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Counter handles by HTTP status code in `first..600`, resolved on first use and then
/// read lock-free; a status outside the range (rare by construction) is looked up each time.
pub struct ByStatus {
    first: u16,
    slots: Box<[OnceLock<Counter>]>,
}

impl ByStatus {
    /// Slots for statuses `first..600`: `100` for every response, `400` for rejections.
    pub fn new(first: u16) -> Self {
        ByStatus {
            first,
            slots: (first..600).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Adds one to `status`'s counter; `resolve` finds it in its family the first time.
    pub fn inc(&self, status: u16, resolve: impl FnOnce() -> Counter) {
        match status
            .checked_sub(self.first)
            .and_then(|i| self.slots.get(usize::from(i)))
        {
            Some(slot) => slot.get_or_init(resolve).inc(),
            None => resolve().inc(),
        };
    }
}

/// A family that prints its HELP and TYPE lines even before it has a label set:
/// prometheus-client leaves empty families out, and a dashboard wants every family from the start.
#[derive(Debug)]
struct Listed<M>(M);

impl<M: EncodeMetric> EncodeMetric for Listed<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }
}

/// A fixed-bucket histogram of durations updated with relaxed atomics: an observation is
/// two or three atomic adds, and a scrape reads a consistent-enough snapshot.
#[derive(Clone)]
pub struct Histogram(Arc<HistogramInner>);

struct HistogramInner {
    bounds: &'static [f64],
    /// Counts per bucket (not cumulative), plus the +Inf bucket at the end.
    counts: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram(Arc::new(HistogramInner {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }))
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.0.bounds.partition_point(|&b| b < secs);
        self.0.counts[i].fetch_add(1, Relaxed);
        self.0
            .sum_micros
            .fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0.counts.iter().map(|c| c.load(Relaxed)).sum()
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count())
            .finish()
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        // The encoder takes per-bucket counts and makes them cumulative itself.
        let buckets: Vec<(f64, u64)> = self
            .0
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.0.counts.iter().map(|c| c.load(Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.0.sum_micros.load(Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_listed_before_any_traffic() {
        let text = Metrics::new().encode();
        for family in [
            "gatehouse_requests_total",
            "gatehouse_request_duration_seconds",
            "gatehouse_upstream_duration_seconds",
            "gatehouse_rejections_total",
            "gatehouse_upstream_errors_total",
            "gatehouse_audit_events_total",
            "gatehouse_audit_dropped_total",
            "gatehouse_audit_queue_depth",
            "gatehouse_config_reloads_total",
            "gatehouse_trace_spans_total",
            "gatehouse_fail_open_total",
        ] {
            assert!(
                text.contains(&format!("# TYPE {} ", family.trim_end_matches("_total"))),
                "{family} missing in:\n{text}"
            );
        }
        assert!(text.contains("gatehouse_config_reloads_total{result=\"failure\"} 0"));
    }

    #[test]
    fn a_types_family_is_registered_once_and_counts_on_across_builds() {
        let m = Metrics::new();
        let family = || m.family::<MiddlewareLabel, Counter>("gatehouse_things", "Things");
        assert!(!m.encode().contains("gatehouse_things"));
        let label = MiddlewareLabel {
            middleware: "a".into(),
        };
        // A chain built, then its reload: the same family.
        family().get_or_create(&label).inc();
        family().get_or_create(&label).inc();
        let text = m.encode();
        assert_eq!(text.matches("# TYPE gatehouse_things counter").count(), 1);
        assert!(
            text.contains("gatehouse_things_total{middleware=\"a\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn counts_and_buckets() {
        let m = Metrics::new();
        m.record_request(200, Duration::from_micros(300));
        m.record_request(200, Duration::from_millis(7));
        m.record_request(404, Duration::from_secs(60));
        assert_eq!(m.requests(200), 2);
        assert_eq!(m.requests(404), 1);
        m.rejection(&Arc::from("auth"), 401).inc();
        let text = m.encode();
        assert!(
            text.contains("gatehouse_requests_total{status=\"200\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("gatehouse_request_duration_seconds_bucket{le=\"0.0005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("gatehouse_request_duration_seconds_bucket{le=\"0.01\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("gatehouse_request_duration_seconds_bucket{le=\"+Inf\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("gatehouse_request_duration_seconds_count 3"),
            "{text}"
        );
        assert!(
            text.contains("gatehouse_rejections_total{middleware=\"auth\",status=\"401\"} 1"),
            "{text}"
        );
    }
}
