//! W3C Trace Context: trace and span ids, and the `traceparent` header both ways.

use std::fmt;

/// A trace's id: 16 bytes, never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// A span's id: 8 bytes, never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    pub fn random() -> TraceId {
        // An all-zero id is invalid: draw again (one chance in 2^128).
        loop {
            let n = fastrand::u128(..);
            if n != 0 {
                return TraceId(n.to_be_bytes());
            }
        }
    }
}

impl TraceId {
    /// The id written as 32 lower-case hex digits.
    pub fn from_hex(hex: &str) -> Option<TraceId> {
        unhex(hex.as_bytes()).map(TraceId)
    }
}

impl SpanId {
    /// The id written as 16 lower-case hex digits.
    pub fn from_hex(hex: &str) -> Option<SpanId> {
        unhex(hex.as_bytes()).map(SpanId)
    }

    pub fn random() -> SpanId {
        loop {
            let n = fastrand::u64(..);
            if n != 0 {
                return SpanId(n.to_be_bytes());
            }
        }
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(&hex::<32>(&self.0)).expect("hex is ASCII"))
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(&hex::<16>(&self.0)).expect("hex is ASCII"))
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `bytes` as `N` lower-case hex digits (`N` is twice the length).
pub fn hex<const N: usize>(bytes: &[u8]) -> [u8; N] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; N];
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
    out
}

/// Lower-case hex (upper case is invalid in `traceparent`) into bytes.
fn unhex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (b, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *b = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// What a valid `traceparent` says: the caller's trace, its span, and its sampling decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

/// The length of a version-00 `traceparent`: `00-<32 hex>-<16 hex>-<2 hex>`.
pub const TRACEPARENT_LEN: usize = 55;

/// Parses a `traceparent` value by the W3C rules: version `ff` and all-zero ids are invalid;
/// a later version may append fields after a `-` (they are ignored), version 00 may not.
pub fn parse_traceparent(value: &[u8]) -> Option<Parent> {
    if value.len() < TRACEPARENT_LEN {
        return None;
    }
    let version = unhex::<1>(&value[..2])?[0];
    let exact = value.len() == TRACEPARENT_LEN;
    if version == 0xff || (version == 0 && !exact) || (!exact && value[TRACEPARENT_LEN] != b'-') {
        return None;
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let trace_id = unhex::<16>(&value[3..35])?;
    let span_id = unhex::<8>(&value[36..52])?;
    let flags = unhex::<1>(&value[53..55])?[0];
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id: TraceId(trace_id),
        span_id: SpanId(span_id),
        sampled: flags & 1 == 1,
    })
}

/// The version-00 `traceparent` value naming `span_id` of `trace_id` as the parent.
pub fn traceparent(trace_id: TraceId, span_id: SpanId, sampled: bool) -> [u8; TRACEPARENT_LEN] {
    let mut out = [0u8; TRACEPARENT_LEN];
    out[..3].copy_from_slice(b"00-");
    out[3..35].copy_from_slice(&hex::<32>(&trace_id.0));
    out[35] = b'-';
    out[36..52].copy_from_slice(&hex::<16>(&span_id.0));
    out[52..].copy_from_slice(if sampled { b"-01" } else { b"-00" });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_writes_the_spec_example() {
        let p = parse_traceparent(VALID.as_bytes()).unwrap();
        assert_eq!(p.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.span_id.to_string(), "00f067aa0ba902b7");
        assert!(p.sampled);
        assert_eq!(
            &traceparent(p.trace_id, p.span_id, true)[..],
            VALID.as_bytes()
        );
        let unsampled = VALID.replace("-01", "-00");
        assert!(!parse_traceparent(unsampled.as_bytes()).unwrap().sampled);
        // Other flag bits are not "sampled".
        let other = VALID.replace("-01", "-02");
        assert!(!parse_traceparent(other.as_bytes()).unwrap().sampled);
        // A later version may carry more fields.
        let future = VALID.replace("00-", "cc-") + "-what-ever";
        assert!(parse_traceparent(future.as_bytes()).is_some());
    }

    #[test]
    fn refuses_invalid_values() {
        for bad in [
            "",
            &VALID[..54],
            &(VALID.to_owned() + "-x"),
            &VALID.replace("00-4b", "ff-4b"),
            &VALID.replace("4bf92f3577b34da6a3ce929d0e0e4736", &"0".repeat(32)),
            &VALID.replace("00f067aa0ba902b7", &"0".repeat(16)),
            &VALID.to_uppercase(),
            &VALID.replace('-', "_"),
            &VALID.replace("-01", "-0g"),
            &(VALID.replace("00-", "cc-") + "x"),
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn random_ids_are_not_zero() {
        for _ in 0..1000 {
            assert_ne!(TraceId::random().0, [0; 16]);
            assert_ne!(SpanId::random().0, [0; 8]);
        }
    }
}
