//! One audit event: captured on the request path only when it will be recorded, finished
//! when the response body ends, and serialized once, off the request path, by the queue's
//! dispatcher.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Method, Uri};
use serde::ser::{Serialize, SerializeMap, Serializer};

/// How the request was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Forwarded to the upstream, which answered.
    Allow,
    /// Answered by gatehouse or a middleware instead of the upstream.
    Deny,
    /// The upstream failed (502) or timed out (504).
    Error,
}

impl Decision {
    fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Error => "error",
        }
    }
}

/// What the event records. Every field is a borrow-free clone of what the request already
/// holds (header values and the URI share their bytes), so capturing costs the box the
/// event travels in, plus a small vector when `request_headers` names headers.
#[derive(Debug)]
pub struct Event {
    /// When the request head arrived; `ts` is this instant on the wall clock.
    pub start: Instant,
    pub request_id: Option<HeaderValue>,
    pub method: Method,
    pub host: Option<HeaderValue>,
    /// The request target as the client sent it (path and raw query).
    pub uri: Uri,
    pub status: u16,
    pub duration: Duration,
    pub upstream: Option<Duration>,
    pub client_ip: IpAddr,
    pub subject: Option<Arc<str>>,
    pub decision: Decision,
    pub denied_by: Option<Arc<str>>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub completed: bool,
    /// One value per `request_headers` entry, in order.
    pub headers: Vec<Option<HeaderValue>>,
}

impl Event {
    /// Stamps the end of the request.
    pub fn finish(&mut self, end: Instant) {
        self.duration = end.duration_since(self.start);
    }

    /// The event as SPEC's JSON object; `fields` names the `request_headers` fields.
    pub fn to_json(&self, fields: &[String], clock: &WallClock) -> Vec<u8> {
        let mut out = Vec::with_capacity(384);
        serde_json::to_writer(
            &mut out,
            &Json {
                event: self,
                ts: clock.at(self.start),
                fields,
            },
        )
        .expect("an event always serializes");
        out
    }
}

/// Maps monotonic instants onto the wall clock. The dispatcher reads both clocks once per
/// tick, so no request's thread reads the wall clock for its event.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    instant: Instant,
    wall: SystemTime,
}

impl WallClock {
    pub fn now() -> WallClock {
        WallClock {
            instant: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    /// `t` on the wall clock.
    pub fn at(&self, t: Instant) -> SystemTime {
        let wall = match t.checked_duration_since(self.instant) {
            Some(after) => self.wall.checked_add(after),
            None => self.wall.checked_sub(self.instant - t),
        };
        wall.unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// Milliseconds with microsecond precision.
fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// A header value as text; bytes that are not UTF-8 are replaced.
fn text(value: &HeaderValue) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(value.as_bytes())
}

struct Json<'a> {
    event: &'a Event,
    ts: SystemTime,
    fields: &'a [String],
}

impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.event;
        let mut map = s.serialize_map(Some(16 + self.fields.len()))?;
        // `format_args!` serializes through `Display`, without an intermediate String.
        map.serialize_entry(
            "ts",
            &format_args!("{}", humantime::format_rfc3339_millis(self.ts)),
        )?;
        map.serialize_entry("request_id", &e.request_id.as_ref().map(text))?;
        map.serialize_entry("method", e.method.as_str())?;
        map.serialize_entry("host", &e.host.as_ref().map(text))?;
        map.serialize_entry("path", e.uri.path())?;
        map.serialize_entry("query", &e.uri.query())?;
        map.serialize_entry("status", &e.status)?;
        map.serialize_entry("duration_ms", &millis(e.duration))?;
        map.serialize_entry("upstream_ms", &e.upstream.map(millis))?;
        map.serialize_entry("client_ip", &e.client_ip)?;
        map.serialize_entry("subject", &e.subject.as_deref())?;
        map.serialize_entry("decision", e.decision.as_str())?;
        map.serialize_entry("denied_by", &e.denied_by.as_deref())?;
        map.serialize_entry("bytes_in", &e.bytes_in)?;
        map.serialize_entry("bytes_out", &e.bytes_out)?;
        map.serialize_entry("completed", &e.completed)?;
        for (name, value) in self.fields.iter().zip(&e.headers) {
            map.serialize_entry(name, &value.as_ref().map(text))?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_spec_fields_in_order() {
        let start = Instant::now();
        let mut e = Event {
            start,
            request_id: Some(HeaderValue::from_static("r-1")),
            method: Method::GET,
            host: Some(HeaderValue::from_static("api.example")),
            uri: Uri::from_static("/v1/items?page=2&x"),
            status: 200,
            duration: Duration::ZERO,
            upstream: Some(Duration::from_micros(12_020)),
            client_ip: "10.1.2.3".parse().unwrap(),
            subject: None,
            decision: Decision::Allow,
            denied_by: None,
            bytes_in: 0,
            bytes_out: 734,
            completed: true,
            headers: vec![Some(HeaderValue::from_static("curl/8.5.0")), None],
        };
        e.finish(start + Duration::from_micros(12_310));
        let clock = WallClock::now();
        let json: serde_json::Value =
            serde_json::from_slice(&e.to_json(&["user_agent".into(), "x_tenant".into()], &clock))
                .unwrap();
        let ts = json["ts"].as_str().unwrap();
        assert!(
            ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[19] == b'.',
            "{ts}"
        );
        assert_eq!(json["query"], "page=2&x");
        assert_eq!(json["duration_ms"], 12.31);
        assert_eq!(json["upstream_ms"], 12.02);
        assert_eq!(json["subject"], serde_json::Value::Null);
        assert_eq!(json["user_agent"], "curl/8.5.0");
        assert_eq!(json["x_tenant"], serde_json::Value::Null);
        assert_eq!(json.as_object().unwrap().len(), 18);
        e.uri = Uri::from_static("/");
        let json: serde_json::Value = serde_json::from_slice(&e.to_json(&[], &clock)).unwrap();
        assert_eq!(json["query"], serde_json::Value::Null);
    }
}
