//! The `otlp` sink: each batch sent as one OTLP/HTTP `ExportLogsServiceRequest` (protobuf)
//! to a collector's logs endpoint, one log record per event, with the retries of the
//! `http` sink (and, like every sink, its batching and spool).
//!
//! A record carries the event's `trace_id` and `span_id` as its own, so a log backend joins
//! it to the request's trace; its time is the event's `ts`, its severity follows the
//! decision (allow INFO, deny WARN, error ERROR), and the event's other fields are its
//! attributes, under the event's names.

use std::time::SystemTime;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, ArrayValue, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use prost::Message;
use serde_json::{Map, Value};

use crate::config::audit::OtlpSettings;
use crate::pool::collector::Collector;
use crate::trace::{otlp, SpanId, TraceId};

/// The records' `event_name`.
const EVENT_NAME: &str = "gatehouse.audit";

pub struct OtlpWriter {
    collector: Collector,
    resource: opentelemetry_proto::tonic::resource::v1::Resource,
}

impl OtlpWriter {
    pub fn new(s: &OtlpSettings, shards: usize) -> OtlpWriter {
        OtlpWriter {
            collector: super::http::collector(&s.http, otlp::PROTOBUF, shards),
            resource: otlp::resource(&s.resource),
        }
    }

    /// Sends the batch, retrying as configured; the error is the last attempt's.
    pub async fn write(&self, batch: &[Bytes]) -> Result<(), String> {
        let observed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let request = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(self.resource.clone()),
                scope_logs: vec![ScopeLogs {
                    scope: Some(otlp::scope()),
                    log_records: batch.iter().map(|e| record(e, observed)).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let answer = self.collector.post(request.encode_to_vec().into()).await?;
        let partial = ExportLogsServiceResponse::decode(answer.as_ref())
            .ok()
            .and_then(|r| r.partial_success)
            .filter(|p| p.rejected_log_records > 0);
        if let Some(p) = partial {
            tracing::warn!(
                rejected = p.rejected_log_records,
                message = p.error_message,
                "the collector rejected some audit log records"
            );
        }
        Ok(())
    }
}

/// The log record of one event (its JSON); an event that is not a JSON object (a spool
/// from elsewhere) becomes a record with that text as its body, rather than be lost.
fn record(event: &[u8], observed: u64) -> LogRecord {
    let mut record = LogRecord {
        observed_time_unix_nano: observed,
        event_name: EVENT_NAME.into(),
        ..Default::default()
    };
    let Ok(fields) = serde_json::from_slice::<Map<String, Value>>(event) else {
        record.body = Some(text(String::from_utf8_lossy(event).into_owned()));
        return record;
    };
    let field = |name: &str| fields.get(name).and_then(Value::as_str).unwrap_or_default();
    record.time_unix_nano = humantime::parse_rfc3339(field("ts"))
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    record.trace_id = TraceId::from_hex(field("trace_id")).map_or_else(Vec::new, |t| t.0.into());
    record.span_id = SpanId::from_hex(field("span_id")).map_or_else(Vec::new, |s| s.0.into());
    let (severity, severity_text) = match field("decision") {
        "deny" => (SeverityNumber::Warn, "WARN"),
        "error" => (SeverityNumber::Error, "ERROR"),
        _ => (SeverityNumber::Info, "INFO"),
    };
    record.severity_number = severity as i32;
    record.severity_text = severity_text.into();
    record.body = Some(text(format!(
        "{} {} {}",
        field("method"),
        field("path"),
        fields.get("status").map_or(Value::Null, Value::clone)
    )));
    record.attributes = fields
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "ts" | "trace_id" | "span_id"))
        .filter_map(|(name, value)| {
            Some(KeyValue {
                key: name.clone(),
                value: Some(any(value)?),
                ..Default::default()
            })
        })
        .collect();
    record
}

fn text(s: String) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(s)),
    }
}

/// A JSON value as an attribute value; `null` is left out (OTLP has no null attribute).
fn any(value: &Value) -> Option<AnyValue> {
    let value = match value {
        Value::Null => return None,
        Value::Bool(b) => any_value::Value::BoolValue(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => any_value::Value::IntValue(i),
            None => any_value::Value::DoubleValue(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => any_value::Value::StringValue(s.clone()),
        Value::Array(items) => any_value::Value::ArrayValue(ArrayValue {
            values: items.iter().filter_map(any).collect(),
        }),
        Value::Object(_) => any_value::Value::StringValue(value.to_string()),
    };
    Some(AnyValue { value: Some(value) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_becomes_a_record() {
        let event = br#"{"ts":"2026-12-01T02:55:00.123Z","request_id":null,"method":"GET","path":"/a","status":403,"duration_ms":1.5,"decision":"deny","completed":true,"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","span_id":"00f067aa0ba902b7","fail_open":["x"]}"#;
        let r = record(event, 7);
        assert_eq!(r.time_unix_nano, 1_796_093_700_123_000_000);
        assert_eq!(r.observed_time_unix_nano, 7);
        assert_eq!(r.trace_id.len(), 16);
        assert_eq!(r.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert_eq!(r.severity_number, SeverityNumber::Warn as i32);
        assert_eq!(r.event_name, "gatehouse.audit");
        let keys: Vec<&str> = r.attributes.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "completed",
                "decision",
                "duration_ms",
                "fail_open",
                "method",
                "path",
                "status"
            ]
        );
        let status = r.attributes.iter().find(|a| a.key == "status").unwrap();
        assert_eq!(
            status.value.as_ref().unwrap().value,
            Some(any_value::Value::IntValue(403))
        );
    }

    #[test]
    fn an_event_without_ids_or_not_json() {
        let r = record(br#"{"ts":"x","trace_id":null,"span_id":null}"#, 0);
        assert!(r.trace_id.is_empty() && r.span_id.is_empty());
        let r = record(b"not json", 0);
        assert_eq!(r.body, Some(text("not json".into())));
    }
}
