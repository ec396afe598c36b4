//! What the authentication middlewares share: the 401 with its challenge, the digest
//! that credentials are compared (and cached) by, and the `left:right` credential files.

use std::collections::BTreeMap;

use http::header::{COOKIE, WWW_AUTHENTICATE};
use http::{request, HeaderValue, StatusCode};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::chain::{Reason, Reject};
use crate::config::value::HeaderNameValue;

/// SHA-256 of `parts`, fed one after another (with a separator byte between them, so
/// `("ab", "c")` and `("a", "bc")` differ). Comparing fixed-size digests instead of the
/// secrets themselves makes the comparison constant-time whatever the secrets' lengths.
pub(crate) fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            hasher.update([0u8]);
        }
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// A 401 with the scheme's `www-authenticate` challenge.
pub(crate) fn unauthorized(
    challenge: &HeaderValue,
    reason: Reason,
    message: &'static str,
) -> Reject {
    Reject::new(StatusCode::UNAUTHORIZED, reason, message)
        .with_header(WWW_AUTHENTICATE, challenge.clone())
}

/// The value of the request's (first non-empty) cookie `name`.
pub(crate) fn cookie<'r>(req: &'r request::Parts, name: &str) -> Option<&'r str> {
    req.headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name && !v.is_empty()).then_some(v)
        })
}

/// A claim as a header value: strings as they are, anything else as JSON text.
pub(crate) fn claim_header_value(value: &Value) -> Option<HeaderValue> {
    match value {
        Value::String(s) => HeaderValue::from_str(s).ok(),
        other => HeaderValue::from_str(&other.to_string()).ok(),
    }
}

/// Serde default for `true`.
pub(crate) fn yes() -> bool {
    true
}

/// The `left:right` entries of a credentials file (`id:key`, `user:hash`) with their line
/// numbers; blank lines and `#` comments are skipped, and both sides must be non-empty.
/// `expected` names the format in the error.
pub(crate) fn colon_entries<'a>(
    bytes: &'a [u8],
    expected: &'static str,
) -> Result<impl Iterator<Item = Result<(usize, &'a str, &'a str), String>>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the file is not UTF-8 text".to_owned())?;
    Ok(text.lines().enumerate().filter_map(move |(n, line)| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        Some(
            line.split_once(':')
                .filter(|(left, right)| !left.is_empty() && !right.is_empty())
                .map(|(left, right)| (n + 1, left, right))
                .ok_or_else(|| format!("line {}: expected `{expected}`", n + 1)),
        )
    }))
}

/// A table of claims and header names (`jwt`'s and `oidc`'s `forward_claims`,
/// `forward_auth`'s `claims_from_headers`) as `gatehouse check` shows it: claim → header.
pub(crate) fn forwarded(claims: &BTreeMap<String, HeaderNameValue>) -> Vec<(&str, &str)> {
    claims
        .iter()
        .map(|(c, h)| (c.as_str(), h.0.as_str()))
        .collect()
}
