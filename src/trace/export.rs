//! The exporter task: takes recorded requests off the queue, batches their spans, turns
//! them into OTLP protobuf messages and POSTs them to `<endpoint>/v1/traces`.

use std::time::Duration;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::otlp::{self, int, string};
use super::{Ids, RequestSpans, SpanId};
use crate::client::collector::{Collector, Retries};
use crate::config::tracing::TracingConfig;
use crate::metrics::Metrics;

/// How often the queue is polled. It is polled rather than woken: a wake per request would
/// cost the worker a syscall to unpark the control thread.
const TICK: Duration = Duration::from_millis(10);
/// Export attempts after the first, and the first wait (doubled each time, with jitter):
/// about 6 s of retrying before a batch is given up, while new spans queue behind it.
const RETRIES: Retries = Retries {
    retries: 5,
    backoff: Duration::from_millis(200),
};

/// `flags` of a span: the W3C flags (sampled), and whether its parent is known to be
/// remote (bit 8 says "known", bit 9 "remote").
const SAMPLED: u32 = 0x01;
const PARENT_LOCAL: u32 = 0x100;
const PARENT_REMOTE: u32 = 0x300;

pub(super) struct Exporter {
    collector: Collector,
    resource: Resource,
    scope: InstrumentationScope,
    batch_size: u64,
    flush_interval: Duration,
    exported: Counter,
    failed: Counter,
}

impl Exporter {
    pub fn new(config: &TracingConfig, metrics: &Metrics, shards: usize) -> Exporter {
        Exporter {
            collector: Collector::new(
                config.url.clone(),
                otlp::PROTOBUF,
                &config.headers.0,
                config.timeout.0,
                RETRIES,
                shards,
            ),
            resource: otlp::resource(&config.resource),
            scope: otlp::scope(),
            batch_size: config.batch_size as u64,
            flush_interval: config.flush_interval.0,
            exported: metrics.trace_spans("exported"),
            failed: metrics.trace_spans("failed"),
        }
    }

    /// Exports batches of up to `batch_size` spans, each sent at most `flush_interval` after
    /// its first span was queued, until `stop` names a deadline; then exports what is left
    /// until the deadline.
    pub async fn run(
        self,
        mut rx: mpsc::Receiver<RequestSpans>,
        mut stop: watch::Receiver<Option<Instant>>,
    ) {
        let mut batch = Batch::default();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while stop.borrow().is_none() {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = tick.tick() => {}
            }
            // Full batches go out back to back while the queue holds more.
            loop {
                batch.fill(&mut rx, self.batch_size);
                let due = batch
                    .since
                    .is_some_and(|since| since.elapsed() >= self.flush_interval);
                if (batch.spans < self.batch_size && !due) || stop.borrow().is_some() {
                    break;
                }
                self.export(&mut batch, &mut stop).await;
            }
        }
        loop {
            batch.fill(&mut rx, self.batch_size);
            if batch.spans == 0 {
                tracing::info!("spans flushed");
                return;
            }
            if !self.export(&mut batch, &mut stop).await {
                let mut lost = batch.spans;
                while let Ok(spans) = rx.try_recv() {
                    lost += spans.count();
                }
                self.failed.inc_by(lost);
                tracing::error!(
                    lost,
                    "spans lost: the collector did not take them within shutdown_grace"
                );
                return;
            }
        }
    }

    /// Exports the batch and empties it; `false` when shutdown's deadline passed first.
    async fn export(&self, batch: &mut Batch, stop: &mut watch::Receiver<Option<Instant>>) -> bool {
        let body = encode(&batch.requests, &self.resource, &self.scope);
        let post = self.collector.post(body.into());
        let Some(result) = until_deadline(stop, post).await else {
            return false;
        };
        let spans = batch.spans;
        batch.clear();
        match result {
            Ok(answer) => {
                let rejected = rejected(&answer).min(spans);
                self.exported.inc_by(spans - rejected);
                if rejected > 0 {
                    self.failed.inc_by(rejected);
                    tracing::warn!(rejected, "the collector rejected some spans");
                }
            }
            Err(error) => {
                self.failed.inc_by(spans);
                tracing::warn!(url = %self.collector.url(), spans, error, "span export failed");
            }
        }
        true
    }
}

/// Runs `work` to its end, or, once `stop` names a deadline, until that deadline (`None`).
async fn until_deadline<T>(
    stop: &mut watch::Receiver<Option<Instant>>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::pin!(work);
    loop {
        let deadline = *stop.borrow_and_update();
        if let Some(deadline) = deadline {
            return tokio::time::timeout_at(deadline, work).await.ok();
        }
        tokio::select! {
            done = &mut work => return Some(done),
            changed = stop.changed() => {
                if changed.is_err() {
                    // The tracer is gone: nobody will set a deadline.
                    return Some(work.await);
                }
            }
        }
    }
}

/// The spans of an export (`rejected_spans` of a partial success) the collector refused.
fn rejected(answer: &Bytes) -> u64 {
    ExportTraceServiceResponse::decode(answer.as_ref())
        .ok()
        .and_then(|r| r.partial_success)
        .map_or(0, |p| p.rejected_spans.max(0) as u64)
}

/// Requests taken off the queue, waiting for their export.
#[derive(Default)]
struct Batch {
    requests: Vec<RequestSpans>,
    spans: u64,
    /// When the first of them was taken.
    since: Option<Instant>,
}

impl Batch {
    /// Takes queued requests until the batch holds `size` spans or the queue is empty.
    fn fill(&mut self, rx: &mut mpsc::Receiver<RequestSpans>, size: u64) {
        while self.spans < size {
            let Ok(request) = rx.try_recv() else { return };
            self.since.get_or_insert_with(Instant::now);
            self.spans += request.count();
            self.requests.push(request);
        }
    }

    fn clear(&mut self) {
        self.requests.clear();
        self.spans = 0;
        self.since = None;
    }
}

/// The protobuf `ExportTraceServiceRequest` of `requests`.
fn encode(requests: &[RequestSpans], resource: &Resource, scope: &InstrumentationScope) -> Vec<u8> {
    let mut spans = Vec::with_capacity(requests.iter().map(|r| r.count() as usize).sum());
    for r in requests {
        spans.push(server_span(r));
        if let Some(call) = &r.upstream {
            spans.push(upstream_span(r, call));
        }
        spans.extend(r.internal.iter().map(|m| internal_span(r, m)));
    }
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope.clone()),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

/// A span of the request's trace; `parent` is gatehouse's SERVER span unless it is that.
fn span(ids: &Ids, span_id: SpanId, parent: Option<SpanId>, remote: bool) -> Span {
    Span {
        trace_id: ids.trace_id.0.to_vec(),
        span_id: span_id.0.to_vec(),
        parent_span_id: parent.map_or_else(Vec::new, |p| p.0.to_vec()),
        flags: SAMPLED | if remote { PARENT_REMOTE } else { PARENT_LOCAL },
        ..Default::default()
    }
}

fn error_status() -> Option<Status> {
    Some(Status {
        code: StatusCode::Error as i32,
        ..Default::default()
    })
}

/// `host[:port]` as `server.address` and `server.port`.
fn server_attributes(authority: &str, attributes: &mut Vec<KeyValue>) {
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') => (host, port.parse::<u16>().ok()),
        _ => (authority, None),
    };
    attributes.push(string("server.address", host.trim_matches(['[', ']'])));
    if let Some(port) = port {
        attributes.push(int("server.port", port.into()));
    }
}

/// The SERVER span, with the stable HTTP semantic-convention attributes and gatehouse's.
fn server_span(r: &RequestSpans) -> Span {
    let path = r.text.path();
    let mut attributes = Vec::with_capacity(16);
    attributes.push(string("http.request.method", r.method.as_str()));
    attributes.push(string("url.path", path));
    attributes.push(string("url.scheme", r.scheme));
    attributes.push(int("http.response.status_code", r.status.into()));
    attributes.push(string("client.address", r.client_address.to_string()));
    if let Some(host) = r.text.host() {
        server_attributes(host, &mut attributes);
    }
    if let Some(agent) = r.text.user_agent() {
        attributes.push(string("user_agent.original", agent));
    }
    attributes.push(string("network.protocol.version", r.protocol));
    attributes.push(string("gatehouse.decision", r.decision));
    if let Some(name) = &r.denied_by {
        attributes.push(string("gatehouse.denied_by", &**name));
    }
    if let Some(subject) = &r.subject {
        attributes.push(string("enduser.id", &**subject));
    }
    let failed = r.status >= 500;
    if failed {
        attributes.push(string("error.type", r.status.to_string()));
    }
    Span {
        name: format!("{} {path}", r.method),
        kind: SpanKind::Server as i32,
        start_time_unix_nano: r.start,
        end_time_unix_nano: r.end,
        attributes,
        status: if failed { error_status() } else { None },
        ..span(&r.ids, r.ids.span_id, r.ids.parent, r.ids.parent.is_some())
    }
}

/// The CLIENT span of the upstream call (the app's spans are its children).
fn upstream_span(r: &RequestSpans, call: &super::UpstreamCall) -> Span {
    let authority = call.authority.to_str().unwrap_or_default();
    let mut attributes = Vec::with_capacity(8);
    attributes.push(string("http.request.method", r.method.as_str()));
    server_attributes(authority, &mut attributes);
    attributes.push(string(
        "url.full",
        format!("http://{authority}{}", r.text.path()),
    ));
    attributes.push(string("network.protocol.version", "1.1"));
    if let Some(status) = call.status {
        attributes.push(int("http.response.status_code", status.into()));
    }
    let error = match (call.error, call.status) {
        (Some(kind), _) => Some(kind.to_owned()),
        (None, Some(status)) if status >= 400 => Some(status.to_string()),
        _ => None,
    };
    let failed = error.is_some();
    if let Some(error) = error {
        attributes.push(string("error.type", error));
    }
    Span {
        name: r.method.to_string(),
        kind: SpanKind::Client as i32,
        start_time_unix_nano: call.start,
        end_time_unix_nano: call.end,
        attributes,
        status: if failed { error_status() } else { None },
        ..span(&r.ids, r.ids.upstream_span_id, Some(r.ids.span_id), false)
    }
}

/// The INTERNAL span of a middleware that waited.
fn internal_span(r: &RequestSpans, m: &super::Internal) -> Span {
    Span {
        name: m.name.to_string(),
        kind: SpanKind::Internal as i32,
        start_time_unix_nano: m.start,
        end_time_unix_nano: m.end,
        attributes: vec![
            string("gatehouse.middleware", &*m.name),
            string("gatehouse.middleware.type", m.kind),
            string(
                "gatehouse.decision",
                if m.refused { "deny" } else { "allow" },
            ),
        ],
        ..span(&r.ids, m.span_id, Some(r.ids.span_id), false)
    }
}
