//! What gatehouse knows of gRPC (over HTTP/2, `PROTOCOL-HTTP2.md` of the gRPC project): which
//! requests are gRPC calls, their `grpc-timeout`, the `grpc-status` their answers carry, and
//! how an answer gatehouse makes itself becomes a status a gRPC client reads.

use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The status codes gatehouse answers with (`google.rpc.Code`).
pub const INTERNAL: u16 = 13;
pub const UNKNOWN: u16 = 2;

/// Whether a request with these headers is a gRPC call: `content-type` is
/// `application/grpc`, or `application/grpc+proto` and the like (not gRPC-Web, whose
/// answers are framed differently).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|ct| {
        let ct = ct.as_bytes();
        let prefix = b"application/grpc";
        ct.len() >= prefix.len()
            && ct[..prefix.len()].eq_ignore_ascii_case(prefix)
            && matches!(ct.get(prefix.len()), None | Some(b'+' | b';'))
    })
}

/// The call's `grpc-timeout` (`TimeoutValue TimeoutUnit`: at most 8 digits, then one of
/// `H M S m u n`); `None` when absent or malformed, as gRPC servers treat it.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(&GRPC_TIMEOUT)?.as_bytes();
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The `grpc-status` of a header or trailer section, if it has a valid one.
pub fn status(fields: &HeaderMap) -> Option<u16> {
    let digits = fields.get(&GRPC_STATUS)?.as_bytes();
    if digits.is_empty() || digits.len() > 2 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |n, d| n * 10 + u16::from(d - b'0')))
}

/// The gRPC status of an answer gatehouse makes with HTTP `status` (README's table).
pub fn status_for(status: StatusCode) -> u16 {
    match status.as_u16() {
        400 | 431 => INTERNAL,
        401 => 16,       // UNAUTHENTICATED
        403 => 7,        // PERMISSION_DENIED
        404 => 12,       // UNIMPLEMENTED
        413 | 429 => 8,  // RESOURCE_EXHAUSTED
        502 | 503 => 14, // UNAVAILABLE
        504 => 4,        // DEADLINE_EXCEEDED
        _ => UNKNOWN,
    }
}

/// `message` as a `grpc-message` value: percent-encoded UTF-8, every byte outside
/// printable ASCII and `%` itself written as `%XX`.
pub fn message(message: &str) -> HeaderValue {
    let mut out = Vec::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b);
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
    HeaderValue::from_bytes(&out).expect("printable ASCII is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: &'static str, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn grpc_content_types() {
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC+json",
            "application/grpc;charset=utf-8",
        ] {
            assert!(is_grpc(&headers("content-type", ct)), "{ct}");
        }
        for ct in [
            "application/grpc-web",
            "application/grpcx",
            "application/json",
        ] {
            assert!(!is_grpc(&headers("content-type", ct)), "{ct}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn timeouts() {
        let t = |v| timeout(&headers("grpc-timeout", v));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("2M"), Some(Duration::from_secs(120)));
        assert_eq!(t("3S"), Some(Duration::from_secs(3)));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(t("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "123456789m", "10x", "-1S", "1.5S", " 1S"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(status(&headers("grpc-status", "0")), Some(0));
        assert_eq!(status(&headers("grpc-status", "14")), Some(14));
        assert_eq!(status(&headers("grpc-status", "x")), None);
        assert_eq!(status(&headers("grpc-status", "123")), None);
        let map = |s: u16| status_for(StatusCode::from_u16(s).unwrap());
        let table = [
            (400, 13),
            (401, 16),
            (403, 7),
            (413, 8),
            (429, 8),
            (431, 13),
            (502, 14),
            (503, 14),
            (504, 4),
            (404, 12),
            (405, 2),
        ];
        for (http, grpc) in table {
            assert_eq!(map(http), grpc, "{http}");
        }
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(message("no key"), "no key");
        assert_eq!(message("100% é\n"), "100%25 %C3%A9%0A");
    }
}
