//! The request path as `paths` patterns see it: percent-decoded, slashes merged, and
//! without dot-segments, so `/public/../admin`, `//admin` and `/%61dmin` cannot slip past a
//! pattern meant for `/admin/**` to an app that would serve them as `/admin`.
//! The path sent upstream is the client's, untouched.

use std::borrow::Cow;

use http::StatusCode;

use super::{Reason, Reject};

/// Why a path cannot be matched safely.
#[derive(Debug, PartialEq, Eq)]
pub struct DotSegments;

impl From<DotSegments> for Reject {
    fn from(_: DotSegments) -> Reject {
        Reject::new(
            StatusCode::BAD_REQUEST,
            Reason::BadRequest,
            "the request path has dot-segments",
        )
    }
}

/// The path to match patterns against; borrowed unless it needs decoding or merging.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, DotSegments> {
    let bytes = path.as_bytes();
    let plain = !bytes.contains(&b'%') && !bytes.windows(2).any(|w| w == b"//" || w == b"/.");
    if plain {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = percent_decode(bytes);
    let mut out = String::with_capacity(decoded.len());
    for segment in decoded.split('/').filter(|s| !s.is_empty()) {
        if segment == "." || segment == ".." {
            return Err(DotSegments);
        }
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() || decoded.ends_with('/') {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// `%XX` escapes decoded; the result as UTF-8, invalid sequences replaced.
pub fn percent_decode(bytes: &[u8]) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push(hi << 4 | lo);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_are_borrowed() {
        assert!(matches!(
            normalize("/api/v1/items"),
            Ok(Cow::Borrowed("/api/v1/items"))
        ));
        assert!(matches!(normalize("/"), Ok(Cow::Borrowed("/"))));
        assert!(matches!(normalize("/file.txt"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn equivalent_spellings_normalize() {
        assert_eq!(normalize("//admin/secret").unwrap(), "/admin/secret");
        assert_eq!(normalize("/%61dmin/secret").unwrap(), "/admin/secret");
        assert_eq!(normalize("/admin%2Fsecret").unwrap(), "/admin/secret");
        assert_eq!(normalize("/a//b/").unwrap(), "/a/b/");
        assert_eq!(normalize("/.well-known/x").unwrap(), "/.well-known/x");
        assert_eq!(normalize("/100%").unwrap(), "/100%");
    }

    #[test]
    fn dot_segments_are_refused_in_any_spelling() {
        for p in [
            "/x/../admin",
            "/./admin",
            "/x/%2e%2e/admin",
            "/x/.%2e/admin",
            "/x/%2E./a",
            "/a/..",
            "/a/%2e",
        ] {
            assert_eq!(normalize(p), Err(DotSegments), "{p}");
        }
    }
}
