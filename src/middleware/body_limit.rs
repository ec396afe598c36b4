//! `body_limit`: refuses request bodies over `max`, up front by Content-Length and while
//! streaming by counting bytes, so a lying or chunked client cannot get more through.

use http::header::CONTENT_LENGTH;
use http::{request, StatusCode};
use serde::Deserialize;

use crate::chain::{Context, Flow, Middleware};
use crate::config::value::ByteSize;
use crate::proxy::h1::parse_length;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default = "default_max")]
    max: ByteSize,
}

fn default_max() -> ByteSize {
    ByteSize(1 << 20)
}

impl super::Settings for Settings {
    fn summary(&self) -> String {
        format!("max={}", self.max)
    }

    fn build(&self, _name: &str) -> Box<dyn Middleware> {
        Box::new(BodyLimit {
            max: self.max.0,
            message: too_large_message(self.max),
        })
    }
}

/// The 413 message, also used when the streamed count goes over.
pub fn too_large_message(max: ByteSize) -> String {
    format!("the request body is larger than {max}")
}

struct BodyLimit {
    max: u64,
    message: String,
}

impl Middleware for BodyLimit {
    fn on_request(&self, req: &mut request::Parts, ctx: &mut Context) -> Flow<'_> {
        let declared = req
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| parse_length(v.as_bytes().trim_ascii()));
        if declared.is_some_and(|len| len > self.max) {
            return Flow::Respond(ctx.reject(StatusCode::PAYLOAD_TOO_LARGE, &self.message));
        }
        // The proxy counts streamed bytes against the tightest limit of the chain.
        if ctx.body_limit.is_none_or(|(limit, _)| self.max < limit) {
            ctx.body_limit = Some((self.max, ctx.current));
        }
        Flow::Continue
    }
}
