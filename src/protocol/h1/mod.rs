//! HTTP/1.1 (RFC 9112): the codec, and both drivers over it. The codec is pure functions and
//! state machines over buffers, with no IO: request heads the server parses and the
//! upstream driver writes, response heads the upstream driver parses and the server writes,
//! body framing, the chunked coding, connection tokens and hop-by-hop headers, and the head
//! size limit. Every rule of the protocol that decides where a message ends, or which
//! headers belong to a hop, is written once, here, where it is reviewed, property-tested
//! and fuzzed (`tests/fuzz`). [`downstream`] serves the client's connection with it,
//! [`upstream`] runs one exchange on the app's.

pub mod chunked;
#[cfg(test)]
mod differential;
pub mod downstream;
pub mod hop;
pub mod request;
pub mod response;
pub mod upstream;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};

/// The most header lines a head may have, either way (as hyper and nginx allow about).
pub const MAX_HEADERS: usize = 100;

/// Room for the headers middlewares add to a parsed message (a request id, rate-limit
/// headers, a timing header...): a full map would be regrown on the first insert, even
/// one that replaces.
pub const CHAIN_HEADERS: usize = 6;

/// How a message's body is delimited on the wire (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    /// Exactly this many bytes (`Content-Length`).
    Length(u64),
    /// The chunked transfer coding.
    Chunked,
    /// Until the connection closes: only a response can be framed so.
    UntilClose,
}

/// One `name: value` line of a head, in either direction.
pub fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The items of a comma-separated list value (RFC 9110 §5.6.1), without the spaces
/// around them. Bytes, not `str`: these are checked on every message.
pub fn list_items(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
}

/// Whether a list value (`Connection`, say) holds `token`, in any case.
pub fn has_token(value: &HeaderValue, token: &str) -> bool {
    list_items(value).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// A `Content-Length` value: digits only (RFC 9110 §8.6), so no sign or space slips by.
pub fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))?
    })
}

/// A parsed header line as `http` types. The value is not copied: `share` gives the bytes
/// of the head that back it (an empty value needs none). `Err` names the part not valid.
fn shared_header(
    name: &[u8],
    value: &[u8],
    share: impl FnOnce(&[u8]) -> Bytes,
) -> Result<(HeaderName, HeaderValue), &'static str> {
    let name = HeaderName::from_bytes(name).map_err(|_| "invalid header name")?;
    let value = if value.is_empty() {
        HeaderValue::from_static("")
    } else {
        HeaderValue::from_maybe_shared(share(value)).map_err(|_| "invalid header value")?
    };
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_digits_only() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"+5",
            b"-1",
            b"5 ",
            b"0x10",
            b"18446744073709551616",
        ] {
            assert_eq!(
                parse_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn list_items_are_trimmed_and_tokens_found_in_any_case() {
        let value = HeaderValue::from_static(" keep-alive ,, Upgrade,x");
        let items: Vec<&[u8]> = list_items(&value).collect();
        assert_eq!(items, [&b"keep-alive"[..], b"", b"Upgrade", b"x"]);
        assert!(has_token(&value, "upgrade"));
        assert!(!has_token(&value, "close"));
    }
}
