//! What the authentication middlewares share: the 401 with its challenge, the digest
//! that credentials are compared (and cached) by, and the `left:right` credential files.

use http::header::WWW_AUTHENTICATE;
use http::{HeaderValue, Response, StatusCode};
use sha2::{Digest, Sha256};

use crate::chain::Context;

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

/// SPEC's 401 JSON body with the scheme's `www-authenticate` challenge.
pub(crate) fn unauthorized(
    ctx: &Context,
    challenge: &HeaderValue,
    message: &str,
) -> Response<bytes::Bytes> {
    let mut resp = ctx.reject(StatusCode::UNAUTHORIZED, message);
    resp.headers_mut()
        .insert(WWW_AUTHENTICATE, challenge.clone());
    resp
}

/// Serde default for `strip = true`.
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
