//! The audit event: what one request was and how it ended, written as the documented JSON object
//! by the request's last phase, on the worker, once the response is out.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Uri};

use crate::json::{push_header, push_int, push_ip, push_millis, push_opt, push_str};
use crate::trace::{context::hex, SpanId, TraceId};

/// How the request was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Forwarded to the upstream, which answered, or answered by a middleware without a
    /// refusal (a CORS preflight).
    Allow,
    /// Refused by gatehouse or a middleware.
    Deny,
    /// The upstream failed (502) or timed out (504).
    Error,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Error => "error",
        }
    }
}

/// One request's record, borrowed from the request's state for as long as it takes to
/// write it.
#[derive(Debug)]
pub struct Event<'a> {
    /// When the request head arrived.
    pub ts: SystemTime,
    pub request_id: Option<&'a HeaderValue>,
    pub method: &'a Method,
    pub host: Option<&'a HeaderValue>,
    /// The request target as the client sent it (path and raw query).
    pub uri: &'a Uri,
    pub status: u16,
    pub duration: Duration,
    pub upstream: Option<Duration>,
    pub client_ip: IpAddr,
    pub subject: Option<&'a str>,
    /// The client's session, as a middleware that keeps sessions names it (a digest).
    pub session: Option<&'a str>,
    pub decision: Decision,
    pub denied_by: Option<&'a str>,
    /// The refusal's [`Reason`](crate::chain::Reason) code, when `decision` is `deny`.
    pub deny_reason: Option<&'a str>,
    /// The policy rule that decided the request (or `default`), when a policy middleware
    /// ran.
    pub policy_rule: Option<&'a str>,
    /// The middlewares that let the request through only because their backend failed.
    pub fail_open: &'a [&'a str],
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub completed: bool,
    /// The request's trace and its span (`[tracing]`).
    pub trace: Option<(TraceId, SpanId)>,
    /// The gRPC status the client saw, for a gRPC call.
    pub grpc_status: Option<u16>,
    /// The values of the `request_headers` entries, in order; empty when none were read
    /// (a head the HTTP/1 parser refused).
    pub headers: &'a [Option<HeaderValue>],
}

impl Event<'_> {
    /// The event as its documented JSON object; `fields` names the `request_headers` fields.
    ///
    /// Written by hand: the schema is fixed, so keys are constants and only values are
    /// escaped; through serde_json, re-escaping every key was most of the cost.
    pub fn to_json(&self, fields: &[String]) -> Vec<u8> {
        // A typical event with a request id, no trace and a user agent is ~430 bytes: one
        // allocation, no regrowth.
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(b"{\"ts\":\"");
        write_rfc3339(self.ts, &mut out);
        out.extend_from_slice(b"\",\"request_id\":");
        push_header(&mut out, self.request_id);
        out.extend_from_slice(b",\"method\":");
        push_str(&mut out, self.method.as_str());
        out.extend_from_slice(b",\"host\":");
        push_header(&mut out, self.host);
        out.extend_from_slice(b",\"path\":");
        push_str(&mut out, self.uri.path());
        out.extend_from_slice(b",\"query\":");
        push_opt(&mut out, self.uri.query());
        out.extend_from_slice(b",\"status\":");
        push_int(&mut out, self.status);
        out.extend_from_slice(b",\"duration_ms\":");
        push_millis(&mut out, Some(self.duration));
        out.extend_from_slice(b",\"upstream_ms\":");
        push_millis(&mut out, self.upstream);
        out.extend_from_slice(b",\"client_ip\":\"");
        push_ip(&mut out, self.client_ip);
        out.extend_from_slice(b"\",\"subject\":");
        push_opt(&mut out, self.subject);
        out.extend_from_slice(b",\"session\":");
        push_opt(&mut out, self.session);
        out.extend_from_slice(b",\"decision\":\"");
        out.extend_from_slice(self.decision.as_str().as_bytes());
        out.extend_from_slice(b"\",\"denied_by\":");
        push_opt(&mut out, self.denied_by);
        out.extend_from_slice(b",\"deny_reason\":");
        push_opt(&mut out, self.deny_reason);
        out.extend_from_slice(b",\"policy_rule\":");
        push_opt(&mut out, self.policy_rule);
        out.extend_from_slice(b",\"fail_open\":[");
        for (i, name) in self.fail_open.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_str(&mut out, name);
        }
        out.push(b']');
        out.extend_from_slice(b",\"bytes_in\":");
        push_int(&mut out, self.bytes_in);
        out.extend_from_slice(b",\"bytes_out\":");
        push_int(&mut out, self.bytes_out);
        out.extend_from_slice(if self.completed {
            b",\"completed\":true"
        } else {
            b",\"completed\":false"
        });
        match self.trace {
            Some((trace_id, span_id)) => {
                out.extend_from_slice(b",\"trace_id\":\"");
                out.extend_from_slice(&hex::<32>(&trace_id.0));
                out.extend_from_slice(b"\",\"span_id\":\"");
                out.extend_from_slice(&hex::<16>(&span_id.0));
                out.push(b'"');
            }
            None => out.extend_from_slice(b",\"trace_id\":null,\"span_id\":null"),
        }
        out.extend_from_slice(b",\"grpc_status\":");
        match self.grpc_status {
            Some(code) => push_int(&mut out, code),
            None => out.extend_from_slice(b"null"),
        }
        // Every field, known or not: an event's keys never depend on how the request ended.
        for (i, name) in fields.iter().enumerate() {
            out.push(b',');
            push_str(&mut out, name);
            out.push(b':');
            push_header(&mut out, self.headers.get(i).and_then(Option::as_ref));
        }
        out.push(b'}');
        out
    }
}

/// Writes `t` in RFC 3339 UTC with milliseconds: `2026-12-01T02:55:00.123Z`. The date is
/// computed from the day number (Howard Hinnant's `civil_from_days`): a few integer
/// operations, cheaper than a formatter and needing no cache.
fn write_rfc3339(t: SystemTime, out: &mut Vec<u8>) {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, second_of_day) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let two = |n: u64| [b'0' + (n / 10) as u8, b'0' + (n % 10) as u8];
    push_int(out, year);
    out.push(b'-');
    out.extend_from_slice(&two(month as u64));
    out.push(b'-');
    out.extend_from_slice(&two(day as u64));
    out.push(b'T');
    out.extend_from_slice(&two(second_of_day / 3600));
    out.push(b':');
    out.extend_from_slice(&two(second_of_day / 60 % 60));
    out.push(b':');
    out.extend_from_slice(&two(second_of_day % 60));
    let ms = since.subsec_millis();
    out.extend_from_slice(&[
        b'.',
        b'0' + (ms / 100) as u8,
        b'0' + (ms / 10 % 10) as u8,
        b'0' + (ms % 10) as u8,
        b'Z',
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event<'a>(uri: &'a Uri, headers: &'a [Option<HeaderValue>]) -> Event<'a> {
        static METHOD: Method = Method::GET;
        Event {
            ts: SystemTime::now(),
            request_id: None,
            method: &METHOD,
            host: None,
            uri,
            status: 502,
            duration: Duration::ZERO,
            upstream: None,
            client_ip: "2001:db8::1".parse().unwrap(),
            subject: None,
            session: None,
            decision: Decision::Error,
            denied_by: None,
            deny_reason: None,
            policy_rule: None,
            fail_open: &[],
            bytes_in: 5,
            bytes_out: 0,
            completed: false,
            trace: None,
            grpc_status: None,
            headers,
        }
    }

    #[test]
    fn serializes_spec_fields() {
        let id = HeaderValue::from_static("r-1");
        let host = HeaderValue::from_static("api.example");
        let uri = Uri::from_static("/v1/items?page=2&x");
        let headers = [Some(HeaderValue::from_static("curl/8.5.0")), None];
        let e = Event {
            request_id: Some(&id),
            host: Some(&host),
            status: 200,
            duration: Duration::from_micros(12_310),
            upstream: Some(Duration::from_micros(12_020)),
            client_ip: "10.1.2.3".parse().unwrap(),
            session: Some("3f2a"),
            decision: Decision::Allow,
            bytes_out: 734,
            completed: true,
            ..event(&uri, &headers)
        };
        let json: serde_json::Value =
            serde_json::from_slice(&e.to_json(&["user_agent".into(), "x_tenant".into()])).unwrap();
        let ts = json["ts"].as_str().unwrap();
        assert!(
            ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[19] == b'.',
            "{ts}"
        );
        assert_eq!(json["query"], "page=2&x");
        assert_eq!(json["duration_ms"], 12.31);
        assert_eq!(json["upstream_ms"], 12.02);
        assert_eq!(json["subject"], serde_json::Value::Null);
        assert_eq!(json["session"], "3f2a");
        assert_eq!(json["user_agent"], "curl/8.5.0");
        assert_eq!(json["x_tenant"], serde_json::Value::Null);
        assert_eq!(json["deny_reason"], serde_json::Value::Null);
        assert_eq!(json["policy_rule"], serde_json::Value::Null);
        assert_eq!(json["fail_open"], serde_json::json!([]));
        assert_eq!(json["trace_id"], serde_json::Value::Null);
        assert_eq!(json.as_object().unwrap().len(), 25);
        let traced = Event {
            trace: Some((TraceId([0xab; 16]), SpanId([1, 2, 3, 4, 5, 6, 7, 8]))),
            ..event(&uri, &headers)
        };
        let json: serde_json::Value =
            serde_json::from_slice(&traced.to_json(&["a".into(), "b".into()])).unwrap();
        assert_eq!(json["trace_id"], "ab".repeat(16));
        assert_eq!(json["span_id"], "0102030405060708");
        assert_eq!(json["grpc_status"], serde_json::Value::Null);
        let grpc = Event {
            grpc_status: Some(14),
            ..event(&uri, &headers)
        };
        let json: serde_json::Value = serde_json::from_slice(&grpc.to_json(&[])).unwrap();
        assert_eq!(json["grpc_status"], 14);
        let root = Uri::from_static("/");
        let json: serde_json::Value =
            serde_json::from_slice(&event(&root, &[]).to_json(&[])).unwrap();
        assert_eq!(json["query"], serde_json::Value::Null);
    }

    #[test]
    fn fields_come_in_spec_order() {
        let uri = Uri::from_static("/");
        let e = event(&uri, &[None]);
        let raw = String::from_utf8(e.to_json(&["x_tenant".into()])).unwrap();
        let mut at = 0;
        let names = crate::config::audit::EVENT_FIELDS
            .iter()
            .chain(&["x_tenant"]);
        for name in names {
            let found = raw[at..].find(&format!("\"{name}\":")).expect(name);
            at += found + name.len();
        }
        let json: serde_json::Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(json["client_ip"], "2001:db8::1");
        assert_eq!(json["completed"], false);
        assert_eq!(json["duration_ms"], 0.0);
        assert_eq!(json["upstream_ms"], serde_json::Value::Null);
    }

    #[test]
    fn request_header_fields_are_written_even_when_none_were_read() {
        let uri = Uri::from_static("/");
        let fields = ["user_agent".to_owned(), "x_tenant".to_owned()];
        let read = [Some(HeaderValue::from_static("t/1")), None];
        let keys = |headers| {
            let json: serde_json::Value =
                serde_json::from_slice(&event(&uri, headers).to_json(&fields)).unwrap();
            let mut keys: Vec<String> = json.as_object().unwrap().keys().cloned().collect();
            keys.sort_unstable();
            (keys, json)
        };
        let (with_values, json) = keys(&read);
        assert_eq!(json["user_agent"], "t/1");
        let (without, json) = keys(&[]);
        assert_eq!(with_values, without);
        assert_eq!(json["user_agent"], serde_json::Value::Null);
        assert_eq!(json["x_tenant"], serde_json::Value::Null);
    }

    #[test]
    fn the_decision_trail() {
        let uri = Uri::from_static("/");
        let e = Event {
            decision: Decision::Deny,
            denied_by: Some("limit"),
            deny_reason: Some("rate_limited"),
            policy_rule: Some("admins"),
            fail_open: &["shared-limit", "other\"one"],
            ..event(&uri, &[])
        };
        let json: serde_json::Value = serde_json::from_slice(&e.to_json(&[])).unwrap();
        assert_eq!(json["deny_reason"], "rate_limited");
        assert_eq!(json["policy_rule"], "admins");
        assert_eq!(
            json["fail_open"],
            serde_json::json!(["shared-limit", "other\"one"])
        );
    }

    #[test]
    fn timestamps_match_rfc3339_with_millis() {
        let now = SystemTime::now();
        for offset_ms in [0, 1, 999, 1_000, 61_500, 86_400_000, 400 * 86_400_000] {
            let t = now + Duration::from_millis(offset_ms);
            let mut out = Vec::new();
            write_rfc3339(t, &mut out);
            let expected = humantime::format_rfc3339_millis(t).to_string();
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
        for (secs, text) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400, "2000-02-29T00:00:00.000Z"),
            (4_107_542_399, "2100-02-28T23:59:59.000Z"),
        ] {
            let mut out = Vec::new();
            write_rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(secs), &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), text);
        }
    }
}
