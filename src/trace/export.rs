//! The exporter task: takes recorded requests off the queue, batches their spans, turns
//! them into OTLP protobuf messages and POSTs them to `<endpoint>/v1/traces`.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prometheus_client::metrics::counter::Counter;
use prost::encoding::{encode_varint, encoded_len_varint};
use prost::Message;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use super::otlp;
use super::{Ids, RequestSpans, SpanId};
use crate::config::tracing::TracingConfig;
use crate::metrics::Metrics;
use crate::pool::collector::{Collector, Retries};

/// How often a busy exporter takes what is queued (at most; sooner when the queue fills, or
/// at `flush_interval` if that is shorter). The queue is polled rather than woken per
/// request: a wake costs the worker a syscall and the control thread a wake-up, and every
/// wake-up of an idle CPU costs tens of microseconds on a VM. An idle exporter sleeps until
/// a record arrives.
const TICK: Duration = Duration::from_millis(50);
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
    batch: Batch,
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
            batch: Batch {
                encoder: Encoder::new(otlp::resource(&config.resource), otlp::scope()),
                spans: 0,
                since: None,
            },
            batch_size: config.batch_size as u64,
            flush_interval: config.flush_interval.0,
            exported: metrics.trace_spans("exported"),
            failed: metrics.trace_spans("failed"),
        }
    }

    /// Exports batches of up to `batch_size` spans, each sent at most `flush_interval` after
    /// its first span was queued, until `stop` names a deadline; then exports what is left
    /// until the deadline.
    ///
    /// With nothing queued or batched it waits for the first record (one wake per idle
    /// spell, none while idle); otherwise it takes what is queued every tick, or as soon as
    /// the recorder says the queue is `filling`.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<RequestSpans>,
        mut stop: watch::Receiver<Option<Instant>>,
        filling: Arc<Notify>,
    ) {
        let tick = TICK.min(self.flush_interval);
        while stop.borrow().is_none() {
            if self.batch.spans == 0 {
                tokio::select! {
                    biased;
                    _ = stop.changed() => break,
                    request = rx.recv() => match request {
                        Some(request) => self.batch.push(request),
                        None => break,
                    },
                }
            }
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = filling.notified() => {}
                _ = tokio::time::sleep(tick) => {}
            }
            // Full batches go out back to back while the queue holds more.
            loop {
                self.batch.fill(&mut rx, self.batch_size);
                let due = self
                    .batch
                    .since
                    .is_some_and(|since| since.elapsed() >= self.flush_interval);
                if (self.batch.spans < self.batch_size && !due) || stop.borrow().is_some() {
                    break;
                }
                // Before shutdown there is no deadline: the export always ends.
                let _ = self.export(&mut stop).await;
            }
        }
        loop {
            self.batch.fill(&mut rx, self.batch_size);
            if self.batch.spans == 0 {
                tracing::info!("spans flushed");
                return;
            }
            if let Err(mut lost) = self.export(&mut stop).await {
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

    /// Exports the batch and empties it; `Err` with its spans when shutdown's deadline
    /// passed first.
    async fn export(&mut self, stop: &mut watch::Receiver<Option<Instant>>) -> Result<(), u64> {
        let (body, spans) = self.batch.take();
        let post = self.collector.post(body);
        let Some(result) = until_deadline(stop, post).await else {
            return Err(spans);
        };
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
        Ok(())
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

/// The batch being built. A request taken off the queue is encoded at once, so a batch's
/// encoding is spread over the ticks that filled it (a worker sharing the CPU never waits
/// behind a whole batch's) and its record is freed as soon as it is taken.
struct Batch {
    encoder: Encoder,
    spans: u64,
    /// When the first of them was taken.
    since: Option<Instant>,
}

impl Batch {
    /// Takes queued requests until the batch holds `size` spans or the queue is empty.
    fn fill(&mut self, rx: &mut mpsc::Receiver<RequestSpans>, size: u64) {
        while self.spans < size {
            let Ok(request) = rx.try_recv() else { return };
            self.push(request);
        }
    }

    fn push(&mut self, request: RequestSpans) {
        self.since.get_or_insert_with(Instant::now);
        self.spans += request.count();
        self.encoder.push(&request);
    }

    /// The encoded batch and its spans; the batch is empty after.
    fn take(&mut self) -> (Bytes, u64) {
        self.since = None;
        (self.encoder.finish(), std::mem::take(&mut self.spans))
    }
}

/// Encodes a batch as one protobuf `ExportTraceServiceRequest`, a request at a time.
///
/// prost writes a nested message's length before its fields, so encoding the request as one
/// message walks every span once per enclosing level to size it (six walks for an attribute
/// value). Here each span is filled into a reused `Span` and prost encodes it alone, straight
/// into the body; the three enclosing lengths are then written in front, once the spans'
/// total is known. Every byte is still prost's: the keys and the resource and scope fields
/// come from prost encoding the enclosing messages (`Envelope::new`), and a test checks the
/// result equals prost's encoding of the whole request.
struct Encoder {
    envelope: Envelope,
    /// One message per kind, so a span's attribute keys are usually already in place.
    server: Span,
    client: Span,
    internal: Span,
    /// The body being built: room for the head, then the spans so far.
    body: Vec<u8>,
    /// The previous body's size: the next is likely alike.
    last_len: usize,
}

/// The bytes prost writes around the spans of a request with one resource and one scope.
struct Envelope {
    /// The key of `ExportTraceServiceRequest.resource_spans`.
    resource_spans: Vec<u8>,
    /// `ResourceSpans.resource`, whole.
    resource: Vec<u8>,
    /// The key of `ResourceSpans.scope_spans`.
    scope_spans: Vec<u8>,
    /// `ScopeSpans.scope`, whole.
    scope: Vec<u8>,
    /// The key of `ScopeSpans.spans`.
    spans: Vec<u8>,
    /// Room for the head at the start of a body: its fixed parts and two lengths of at
    /// most 10 bytes.
    room: usize,
    /// Where the head is assembled before it is copied in front of the spans.
    head: Vec<u8>,
}

impl Envelope {
    fn new(resource: Resource, scope: InstrumentationScope) -> Envelope {
        // A message holding only one empty child encodes as the child's key and a 0 length.
        fn key(message: impl Message) -> Vec<u8> {
            let mut bytes = message.encode_to_vec();
            assert_eq!(bytes.pop(), Some(0), "an empty child's length");
            bytes
        }
        let mut envelope = Envelope {
            resource_spans: key(ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans::default()],
            }),
            resource: ResourceSpans {
                resource: Some(resource),
                ..Default::default()
            }
            .encode_to_vec(),
            scope_spans: key(ResourceSpans {
                scope_spans: vec![ScopeSpans::default()],
                ..Default::default()
            }),
            scope: ScopeSpans {
                scope: Some(scope),
                ..Default::default()
            }
            .encode_to_vec(),
            spans: key(ScopeSpans {
                spans: vec![Span::default()],
                ..Default::default()
            }),
            room: 0,
            head: Vec::new(),
        };
        envelope.room = envelope.resource_spans.len()
            + envelope.resource.len()
            + envelope.scope_spans.len()
            + envelope.scope.len()
            + 2 * 10;
        envelope
    }

    /// Writes the head right before `body[room..]`, which holds the encoded spans, and
    /// returns where the request starts.
    fn close(&mut self, body: &mut [u8]) -> usize {
        let room = self.room;
        let scope_spans = (self.scope.len() + body.len() - room) as u64;
        let resource_spans = self.resource.len()
            + self.scope_spans.len()
            + encoded_len_varint(scope_spans)
            + scope_spans as usize;
        let head = &mut self.head;
        head.clear();
        head.extend_from_slice(&self.resource_spans);
        encode_varint(resource_spans as u64, head);
        head.extend_from_slice(&self.resource);
        head.extend_from_slice(&self.scope_spans);
        encode_varint(scope_spans, head);
        head.extend_from_slice(&self.scope);
        let start = room - head.len();
        body[start..room].copy_from_slice(head);
        start
    }
}

impl Encoder {
    fn new(resource: Resource, scope: InstrumentationScope) -> Encoder {
        Encoder {
            envelope: Envelope::new(resource, scope),
            server: Span::default(),
            client: Span::default(),
            internal: Span::default(),
            body: Vec::new(),
            last_len: 0,
        }
    }

    /// Encodes a request's spans into the body.
    fn push(&mut self, r: &RequestSpans) {
        let body = &mut self.body;
        if body.is_empty() {
            body.reserve(self.envelope.room + self.last_len);
            body.resize(self.envelope.room, 0);
        }
        let key = &self.envelope.spans;
        let put = |span: &Span, body: &mut Vec<u8>| {
            body.extend_from_slice(key);
            span.encode_length_delimited(body).expect("a Vec grows");
        };
        server_span(r, &mut self.server);
        put(&self.server, body);
        if let Some(call) = &r.upstream {
            upstream_span(r, call, &mut self.client);
            put(&self.client, body);
        }
        for m in &r.internal {
            internal_span(r, m, &mut self.internal);
            put(&self.internal, body);
        }
    }

    /// The request of the spans pushed since the last call; the next body starts empty.
    fn finish(&mut self) -> Bytes {
        let mut body = std::mem::take(&mut self.body);
        let room = self.envelope.room;
        self.last_len = body.len().saturating_sub(room);
        if body.is_empty() {
            body.resize(room, 0);
        }
        let start = self.envelope.close(&mut body);
        Bytes::from(body).slice(start..)
    }
}

/// Writes a span's attributes into the slots of an earlier one, then drops the slots left.
struct Attributes<'a> {
    slots: &'a mut Vec<KeyValue>,
    used: usize,
}

impl<'a> Attributes<'a> {
    fn of(slots: &'a mut Vec<KeyValue>) -> Self {
        Attributes { slots, used: 0 }
    }

    fn slot(&mut self, key: &str) -> &mut Option<any_value::Value> {
        if self.used == self.slots.len() {
            self.slots.push(KeyValue::default());
        }
        let kv = &mut self.slots[self.used];
        self.used += 1;
        if kv.key != key {
            kv.key.clear();
            kv.key.push_str(key);
        }
        &mut kv.value.get_or_insert_with(AnyValue::default).value
    }

    fn text(&mut self, key: &str, value: &str) -> &mut String {
        let slot = self.slot(key);
        if !matches!(slot, Some(any_value::Value::StringValue(_))) {
            *slot = Some(any_value::Value::StringValue(String::new()));
        }
        let Some(any_value::Value::StringValue(s)) = slot else {
            unreachable!("just set")
        };
        s.clear();
        s.push_str(value);
        s
    }

    fn int(&mut self, key: &str, value: i64) {
        *self.slot(key) = Some(any_value::Value::IntValue(value));
    }

    /// `host[:port]` as `server.address` and `server.port`.
    fn server(&mut self, authority: &str) {
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(':') => (host, port.parse::<u16>().ok()),
            _ => (authority, None),
        };
        self.text("server.address", host.trim_matches(['[', ']']));
        if let Some(port) = port {
            self.int("server.port", port.into());
        }
    }
}

impl Drop for Attributes<'_> {
    fn drop(&mut self) {
        self.slots.truncate(self.used);
    }
}

/// Sets what every span of the request's trace has; `parent` is the caller's span for the
/// SERVER span (remote), gatehouse's SERVER span for the others.
fn fill(
    span: &mut Span,
    ids: &Ids,
    span_id: SpanId,
    parent: Option<SpanId>,
    kind: SpanKind,
    (start, end): (u64, u64),
    failed: bool,
) {
    set(&mut span.trace_id, &ids.trace_id.0);
    set(&mut span.span_id, &span_id.0);
    set(
        &mut span.parent_span_id,
        parent.as_ref().map_or(&[], |p| &p.0),
    );
    let remote = kind == SpanKind::Server && parent.is_some();
    span.flags = SAMPLED | if remote { PARENT_REMOTE } else { PARENT_LOCAL };
    span.kind = kind as i32;
    span.start_time_unix_nano = start;
    span.end_time_unix_nano = end;
    span.status = failed.then(|| Status {
        code: StatusCode::Error as i32,
        ..Default::default()
    });
}

fn set(bytes: &mut Vec<u8>, value: &[u8]) {
    bytes.clear();
    bytes.extend_from_slice(value);
}

/// The SERVER span, with the stable HTTP semantic-convention attributes and gatehouse's.
fn server_span(r: &RequestSpans, span: &mut Span) {
    let path = r.text.path();
    let failed = r.status >= 500;
    fill(
        span,
        &r.ids,
        r.ids.span_id,
        r.ids.parent,
        SpanKind::Server,
        (r.start, r.end),
        failed,
    );
    span.name.clear();
    span.name.push_str(r.method.as_str());
    span.name.push(' ');
    span.name.push_str(path);
    let mut a = Attributes::of(&mut span.attributes);
    a.text("http.request.method", r.method.as_str());
    a.text("url.path", path);
    a.text("url.scheme", r.scheme);
    a.int("http.response.status_code", r.status.into());
    let address = a.text("client.address", "");
    // Without the formatting machinery for the common IPv4 (json's writer, into the slot).
    let mut bytes = std::mem::take(address).into_bytes();
    crate::json::push_ip(&mut bytes, r.client_address);
    *address = String::from_utf8(bytes).expect("an address is ASCII");
    if let Some(host) = r.text.host() {
        a.server(host);
    }
    if let Some(agent) = r.text.user_agent() {
        a.text("user_agent.original", agent);
    }
    a.text("network.protocol.version", r.protocol);
    a.text("gatehouse.decision", r.decision);
    if let Some(name) = &r.denied_by {
        a.text("gatehouse.denied_by", name);
    }
    if let Some(subject) = &r.subject {
        a.text("enduser.id", subject);
    }
    if failed {
        let error = a.text("error.type", "");
        let _ = write!(error, "{}", r.status);
    }
}

/// The CLIENT span of the upstream call (the app's spans are its children).
fn upstream_span(r: &RequestSpans, call: &super::UpstreamCall, span: &mut Span) {
    let authority = call.authority.to_str().unwrap_or_default();
    let failed = call.error.is_some() || call.status.is_some_and(|s| s >= 400);
    fill(
        span,
        &r.ids,
        r.ids.upstream_span_id,
        Some(r.ids.span_id),
        SpanKind::Client,
        (call.start, call.end),
        failed,
    );
    span.name.clear();
    span.name.push_str(r.method.as_str());
    let mut a = Attributes::of(&mut span.attributes);
    a.text("http.request.method", r.method.as_str());
    a.server(authority);
    let url = a.text("url.full", "http://");
    url.push_str(authority);
    url.push_str(r.text.path());
    a.text("network.protocol.version", call.protocol);
    if let Some(status) = call.status {
        a.int("http.response.status_code", status.into());
    }
    match (call.error, call.status) {
        (Some(kind), _) => {
            a.text("error.type", kind);
        }
        (None, Some(status)) if status >= 400 => {
            let error = a.text("error.type", "");
            let _ = write!(error, "{status}");
        }
        _ => {}
    }
}

/// The INTERNAL span of a middleware that waited.
fn internal_span(r: &RequestSpans, m: &super::Internal, span: &mut Span) {
    fill(
        span,
        &r.ids,
        m.span_id,
        Some(r.ids.span_id),
        SpanKind::Internal,
        (m.start, m.end),
        false,
    );
    span.name.clear();
    span.name.push_str(&m.name);
    let mut a = Attributes::of(&mut span.attributes);
    a.text("gatehouse.middleware", &m.name);
    a.text("gatehouse.middleware.type", m.kind);
    a.text(
        "gatehouse.decision",
        if m.refused { "deny" } else { "allow" },
    );
}

#[cfg(test)]
pub(super) mod tests {
    use http::{HeaderValue, Method};

    use super::*;
    use crate::trace::{Internal, Text, TraceId, UpstreamCall};

    /// A recorded request: a plain one, or (`full`) one with every optional part.
    pub(in crate::trace) fn request(path: &str, full: bool) -> RequestSpans {
        let host = HeaderValue::from_static("api.example:8443");
        let agent = HeaderValue::from_static("probe/1");
        RequestSpans {
            ids: Ids {
                trace_id: TraceId::random(),
                span_id: SpanId::random(),
                upstream_span_id: SpanId::random(),
                parent: full.then(SpanId::random),
                sampled: true,
            },
            start: 1,
            end: 9,
            method: Method::GET,
            scheme: "http",
            protocol: "1.1",
            status: if full { 503 } else { 200 },
            client_address: [10, 0, 0, 1].into(),
            decision: "allow",
            denied_by: full.then(|| Arc::from("auth")),
            subject: full.then(|| Arc::from("alice")),
            text: Text::new(path, full.then_some(&host), full.then_some(&agent)),
            upstream: full.then(|| UpstreamCall {
                start: 2,
                end: 8,
                authority: HeaderValue::from_static("127.0.0.1:8000"),
                protocol: "2",
                status: None,
                error: Some("connect"),
            }),
            internal: if full {
                vec![Internal {
                    span_id: SpanId::random(),
                    name: Arc::from("sso"),
                    kind: "forward_auth",
                    start: 3,
                    end: 4,
                    refused: false,
                }]
            } else {
                vec![]
            },
        }
    }

    /// The spans of a batch of `requests`, after checking the body is exactly prost's
    /// encoding of the request it decodes to (so the envelope written around the spans is
    /// prost's too).
    fn encode(encoder: &mut Encoder, requests: &[RequestSpans]) -> Vec<Span> {
        for r in requests {
            encoder.push(r);
        }
        let body = encoder.finish();
        let mut request = ExportTraceServiceRequest::decode(&body[..]).unwrap();
        assert_eq!(request.encode_to_vec(), body);
        let mut scopes = request.resource_spans.remove(0).scope_spans;
        assert_eq!(scopes[0].scope.as_ref().unwrap().name, "gatehouse");
        scopes.remove(0).spans
    }

    fn keys(span: &Span) -> Vec<&str> {
        span.attributes.iter().map(|a| a.key.as_str()).collect()
    }

    #[test]
    fn reused_messages_carry_nothing_over_from_the_batch_before() {
        let resource = otlp::resource(&crate::config::tracing::Resource {
            service_name: "s".into(),
            attributes: vec![],
        });
        let mut encoder = Encoder::new(resource, otlp::scope());
        let spans = encode(&mut encoder, &[request("/a", true), request("/b", true)]);
        assert_eq!(spans.len(), 6);
        assert_eq!(spans[0].name, "GET /a");
        assert_eq!(
            keys(&spans[0]),
            [
                "http.request.method",
                "url.path",
                "url.scheme",
                "http.response.status_code",
                "client.address",
                "server.address",
                "server.port",
                "user_agent.original",
                "network.protocol.version",
                "gatehouse.decision",
                "gatehouse.denied_by",
                "enduser.id",
                "error.type"
            ]
        );
        assert_eq!(
            spans[0].status.as_ref().unwrap().code,
            StatusCode::Error as i32
        );
        assert_eq!(spans[0].flags, SAMPLED | PARENT_REMOTE);
        assert_eq!(spans[1].name, "GET");
        assert!(keys(&spans[1]).contains(&"error.type"));
        assert_eq!(spans[2].name, "sso");

        // A smaller, plainer batch into the same messages: no stale attribute, status, parent
        // or span survives.
        let plain = request("/c", false);
        let spans = encode(&mut encoder, std::slice::from_ref(&plain));
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        assert_eq!(s.name, "GET /c");
        assert_eq!(
            keys(s),
            [
                "http.request.method",
                "url.path",
                "url.scheme",
                "http.response.status_code",
                "client.address",
                "network.protocol.version",
                "gatehouse.decision"
            ]
        );
        assert_eq!(s.status, None);
        assert!(s.parent_span_id.is_empty());
        assert_eq!(s.flags, SAMPLED | PARENT_LOCAL);
        assert_eq!(s.trace_id, plain.ids.trace_id.0);
        let address = &s.attributes[4].value.as_ref().unwrap().value;
        assert_eq!(
            address,
            &Some(any_value::Value::StringValue("10.0.0.1".into()))
        );
        // And bigger again.
        let spans = encode(&mut encoder, &[request("/d", true), request("/e", false)]);
        assert_eq!(spans.len(), 4);
        assert_eq!(spans[3].name, "GET /e");
        // A batch past 16 KiB: the enclosing lengths take three bytes each.
        let many: Vec<_> = (0..100).map(|i| request(&format!("/{i}"), true)).collect();
        let spans = encode(&mut encoder, &many);
        assert_eq!(spans.len(), 300);
        assert_eq!(spans[297].name, "GET /99");
        // And none: still a well-formed request.
        assert!(encode(&mut encoder, &[]).is_empty());
    }
}
