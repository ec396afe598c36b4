//! One audit event: captured on the request path only when it will be recorded, finished
//! when the response body ends, and serialized once, off the request path, by the queue's
//! dispatcher.

use std::io::Write;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Method, Uri};

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
    ///
    /// Written by hand: the schema is fixed, so keys are constants and only values are
    /// escaped. Through serde_json, re-escaping every key and formatting the timestamp
    /// per event was most of the dispatcher's time.
    pub fn to_json(&self, fields: &[String], clock: &mut WallClock) -> Vec<u8> {
        let mut out = Vec::with_capacity(384);
        out.extend_from_slice(b"{\"ts\":\"");
        clock.write_rfc3339(self.start, &mut out);
        out.extend_from_slice(b"\",\"request_id\":");
        push_header(&mut out, self.request_id.as_ref());
        out.extend_from_slice(b",\"method\":");
        push_str(&mut out, self.method.as_str());
        out.extend_from_slice(b",\"host\":");
        push_header(&mut out, self.host.as_ref());
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
        push_opt(&mut out, self.subject.as_deref());
        out.extend_from_slice(b",\"decision\":\"");
        out.extend_from_slice(self.decision.as_str().as_bytes());
        out.extend_from_slice(b"\",\"denied_by\":");
        push_opt(&mut out, self.denied_by.as_deref());
        out.extend_from_slice(b",\"bytes_in\":");
        push_int(&mut out, self.bytes_in);
        out.extend_from_slice(b",\"bytes_out\":");
        push_int(&mut out, self.bytes_out);
        out.extend_from_slice(if self.completed {
            b",\"completed\":true"
        } else {
            b",\"completed\":false"
        });
        for (name, value) in fields.iter().zip(&self.headers) {
            out.push(b',');
            push_str(&mut out, name);
            out.push(b':');
            push_header(&mut out, value.as_ref());
        }
        out.push(b'}');
        out
    }
}

/// Maps monotonic instants onto the wall clock. The dispatcher reads both clocks once per
/// tick, so no request's thread reads the wall clock for its event.
#[derive(Clone, Debug)]
pub struct WallClock {
    instant: Instant,
    wall: SystemTime,
    /// The last second written, as `YYYY-MM-DDTHH:MM:SS`: a tick's events mostly share it.
    second: Option<(u64, [u8; 19])>,
}

impl WallClock {
    pub fn now() -> WallClock {
        WallClock {
            instant: Instant::now(),
            wall: SystemTime::now(),
            second: None,
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

    /// Writes `t` in RFC 3339 UTC with milliseconds: `2026-12-01T02:55:00.123Z`.
    fn write_rfc3339(&mut self, t: Instant, out: &mut Vec<u8>) {
        let since_epoch = self
            .at(t)
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = since_epoch.as_secs();
        let second = match self.second {
            Some((at, text)) if at == secs => text,
            _ => {
                let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
                let formatted = humantime::format_rfc3339_seconds(whole).to_string();
                let mut text = [0; 19];
                text.copy_from_slice(&formatted.as_bytes()[..19]);
                self.second = Some((secs, text));
                text
            }
        };
        out.extend_from_slice(&second);
        let ms = since_epoch.subsec_millis();
        out.extend_from_slice(&[
            b'.',
            b'0' + (ms / 100) as u8,
            b'0' + (ms / 10 % 10) as u8,
            b'0' + (ms % 10) as u8,
            b'Z',
        ]);
    }
}

/// Appends `s` as a JSON string (RFC 8259 §7): quotes, backslashes and control
/// characters escaped, everything else copied in runs.
fn push_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let escaped = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
    let bytes = s.as_bytes();
    out.push(b'"');
    // Most values need no escape: a branch-free check, which vectorizes, settles that.
    if !bytes.iter().fold(false, |any, &b| any | escaped(b)) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !escaped(b) {
            continue;
        }
        out.extend_from_slice(&bytes[run..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 15)],
            ]),
        }
        run = i + 1;
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
}

/// Appends an integer.
fn push_int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends a JSON string, or `null`.
fn push_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => push_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// Appends a header value as a JSON string (bytes that are not UTF-8 are replaced), or `null`.
fn push_header(out: &mut Vec<u8>, value: Option<&HeaderValue>) {
    match value.map(HeaderValue::as_bytes) {
        // Valid UTF-8, the common case, is checked word by word; replacing walks each byte.
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => push_str(out, text),
            Err(_) => push_str(out, &String::from_utf8_lossy(bytes)),
        },
        None => out.extend_from_slice(b"null"),
    }
}

/// Appends an address's text, which never needs escaping.
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        // The common case, without the formatting machinery.
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_int(out, octet);
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// Appends milliseconds with microsecond precision (`12.31`, `0.005`, `3.0`), or `null`.
fn push_millis(out: &mut Vec<u8>, d: Option<Duration>) {
    let Some(d) = d else {
        return out.extend_from_slice(b"null");
    };
    let micros = d.as_micros();
    push_int(out, micros / 1000);
    let frac = (micros % 1000) as u16;
    let digits = [
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ];
    let keep = match frac {
        0 => 1,
        _ if frac.is_multiple_of(100) => 1,
        _ if frac.is_multiple_of(10) => 2,
        _ => 3,
    };
    out.push(b'.');
    out.extend_from_slice(&digits[..keep]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_spec_fields() {
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
        let mut clock = WallClock::now();
        let json: serde_json::Value = serde_json::from_slice(
            &e.to_json(&["user_agent".into(), "x_tenant".into()], &mut clock),
        )
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
        let json: serde_json::Value = serde_json::from_slice(&e.to_json(&[], &mut clock)).unwrap();
        assert_eq!(json["query"], serde_json::Value::Null);
    }

    fn event() -> Event {
        Event {
            start: Instant::now(),
            request_id: None,
            method: Method::POST,
            host: None,
            uri: Uri::from_static("/"),
            status: 502,
            duration: Duration::ZERO,
            upstream: None,
            client_ip: "2001:db8::1".parse().unwrap(),
            subject: None,
            decision: Decision::Error,
            denied_by: None,
            bytes_in: 5,
            bytes_out: 0,
            completed: false,
            headers: vec![],
        }
    }

    #[test]
    fn fields_come_in_spec_order() {
        let mut e = event();
        e.headers = vec![None];
        let raw =
            String::from_utf8(e.to_json(&["x_tenant".into()], &mut WallClock::now())).unwrap();
        let mut at = 0;
        let names = crate::audit::settings::EVENT_FIELDS
            .iter()
            .chain(&["x_tenant"]);
        for name in names {
            let found = raw[at..].find(&format!("\"{name}\":")).expect(name);
            at += found + name.len();
        }
        let json: serde_json::Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(json["client_ip"], "2001:db8::1");
        e.client_ip = "10.0.255.7".parse().unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&e.to_json(&[], &mut WallClock::now())).unwrap();
        assert_eq!(json["client_ip"], "10.0.255.7");
        assert_eq!(json["completed"], false);
        assert_eq!(json["duration_ms"], 0.0);
        assert_eq!(json["upstream_ms"], serde_json::Value::Null);
    }

    #[test]
    fn strings_are_escaped_and_bytes_that_are_not_utf8_replaced() {
        let mut nasty: String = (0u8..0x20).map(char::from).collect();
        nasty.push_str("\"\\/\u{7f} é 😀 </script>");
        let mut e = event();
        e.subject = Some(nasty.as_str().into());
        e.denied_by = Some("a\"b".into());
        e.headers = vec![Some(HeaderValue::from_bytes(b"ok \xff\tend\"").unwrap())];
        let raw = e.to_json(&["user_agent".into()], &mut WallClock::now());
        let json: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(json["subject"], nasty.as_str());
        assert_eq!(json["denied_by"], "a\"b");
        assert_eq!(json["user_agent"], "ok \u{fffd}\tend\"");
        // One event, one line, whatever it holds.
        assert!(!raw.contains(&b'\n'));
    }

    #[test]
    fn durations_keep_microseconds() {
        for (micros, text) in [
            (0, "0.0"),
            (5, "0.005"),
            (40, "0.04"),
            (3_000, "3.0"),
            (12_310, "12.31"),
            (1_234_567, "1234.567"),
        ] {
            let mut out = Vec::new();
            push_millis(&mut out, Some(Duration::from_micros(micros)));
            assert_eq!(std::str::from_utf8(&out).unwrap(), text);
        }
    }

    #[test]
    fn timestamps_match_rfc3339_with_millis() {
        let mut clock = WallClock::now();
        let base = clock.instant;
        for offset_ms in [0, 1, 999, 1_000, 1_001, 61_500, 0] {
            let t = base + Duration::from_millis(offset_ms);
            let mut out = Vec::new();
            clock.write_rfc3339(t, &mut out);
            let expected = humantime::format_rfc3339_millis(clock.at(t)).to_string();
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }
}
