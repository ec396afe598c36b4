//! `request_id`: gives every request an id, sent upstream and back, so one request can be
//! followed through the app's logs, gatehouse's responses and the audit event.

use http::{request, response, HeaderName, HeaderValue};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::chain::{Context, Flow, Middleware};
use crate::config::value::HeaderNameValue;

/// `request_id`: gives every request an id, sent upstream and back.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The header carrying the id, to the app and back to the client.
    #[serde(default = "default_header")]
    header: HeaderNameValue,
    /// Keep an id the client (or an edge proxy) already set, when it is well-formed.
    #[serde(default = "yes")]
    trust_incoming: bool,
}

fn default_header() -> HeaderNameValue {
    HeaderNameValue(HeaderName::from_static("x-request-id"))
}

fn yes() -> bool {
    true
}

impl super::Settings for Settings {
    fn summary(&self) -> String {
        format!(
            "header={} trust_incoming={}",
            self.header.0, self.trust_incoming
        )
    }

    fn role(&self) -> super::Role {
        super::Role {
            response_headers: vec![self.header.0.clone()],
            ..super::Role::default()
        }
    }

    fn build(&self, _: &super::Build) -> Box<dyn Middleware> {
        Box::new(RequestId {
            header: self.header.0.clone(),
            trust_incoming: self.trust_incoming,
        })
    }
}

struct RequestId {
    header: HeaderName,
    trust_incoming: bool,
}

impl Middleware for RequestId {
    fn request_fields(&self) -> Vec<HeaderName> {
        vec![self.header.clone()]
    }

    fn on_request(&self, req: &mut request::Parts, ctx: &mut Context) -> Flow<'_> {
        let id = match req.headers.get(&self.header) {
            Some(v) if self.trust_incoming && is_safe_id(v.as_bytes()) => v.clone(),
            _ => generate(),
        };
        // `insert` also drops any further values, so upstream sees exactly one id.
        req.headers.insert(self.header.clone(), id.clone());
        ctx.request_id = Some(id);
        Flow::Continue
    }

    fn on_response(&self, resp: &mut response::Parts, ctx: &mut Context) {
        if let Some(id) = &ctx.request_id {
            resp.headers.insert(self.header.clone(), id.clone());
        }
    }
}

/// An incoming id is kept only if it cannot break a log line, a JSON body or a header:
/// at most 128 bytes of letters, digits and `-_.:/+=@`.
fn is_safe_id(id: &[u8]) -> bool {
    (1..=128).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(b))
}

fn generate() -> HeaderValue {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(id).expect("a UUID is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_ids() {
        assert!(is_safe_id(b"2b6f0cc9-4b1a-4d3c-9a55-1f0a6c1d9e77"));
        assert!(is_safe_id(b"edge:abc/123"));
        assert!(!is_safe_id(b""));
        assert!(!is_safe_id(b"has space"));
        assert!(!is_safe_id(b"quote\""));
        assert!(!is_safe_id(&[b'a'; 129]));
        assert_eq!(generate().len(), 36);
    }
}
