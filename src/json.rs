//! The little JSON gatehouse writes by hand (error bodies, audit events): keys are
//! constants, so only values need escaping, and nothing goes through a value tree.

use std::net::IpAddr;
use std::time::Duration;

use http::HeaderValue;

/// Appends `s` as a JSON string (RFC 8259 §7): quotes, backslashes and control
/// characters escaped, everything else copied in runs.
pub fn push_str(out: &mut Vec<u8>, s: &str) {
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
pub fn push_int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends a JSON string, or `null`.
pub fn push_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => push_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// Appends a header value as a JSON string (bytes that are not UTF-8 are replaced), or `null`.
pub fn push_header(out: &mut Vec<u8>, value: Option<&HeaderValue>) {
    match value.map(HeaderValue::as_bytes) {
        // Valid UTF-8, the common case, is checked word by word; replacing walks each byte.
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => push_str(out, text),
            Err(_) => push_str(out, &String::from_utf8_lossy(bytes)),
        },
        None => out.extend_from_slice(b"null"),
    }
}

/// Appends an address's text, which never needs escaping, without quotes.
pub fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
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
            use std::io::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

/// Appends milliseconds with microsecond precision (`12.31`, `0.005`, `3.0`), or `null`.
pub fn push_millis(out: &mut Vec<u8>, d: Option<Duration>) {
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
    fn strings_are_escaped_and_bytes_that_are_not_utf8_replaced() {
        let mut nasty: String = (0u8..0x20).map(char::from).collect();
        nasty.push_str("\"\\/\u{7f} é 😀 </script>");
        let mut out = Vec::new();
        push_str(&mut out, &nasty);
        let back: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, nasty);
        let mut out = Vec::new();
        push_header(
            &mut out,
            Some(&HeaderValue::from_bytes(b"ok \xff\tend\"").unwrap()),
        );
        let back: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, "ok \u{fffd}\tend\"");
        assert!(!out.contains(&b'\n'));
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
    fn addresses() {
        for ip in ["10.0.255.7", "2001:db8::1", "::ffff:1.2.3.4"] {
            let mut out = Vec::new();
            push_ip(&mut out, ip.parse().unwrap());
            assert_eq!(std::str::from_utf8(&out).unwrap(), ip);
        }
    }
}
