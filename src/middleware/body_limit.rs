//! `body_limit`: refuses request bodies over `max`, up front by Content-Length and while
//! streaming by counting bytes (its body phase), so a lying or chunked client cannot get
//! more through. Nothing is buffered: a body over the limit is cut off mid-stream.

use http::header::CONTENT_LENGTH;
use http::{request, Extensions, StatusCode};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::chain::{Context, Flow, Middleware, Piece, Reason, Reject};
use crate::config::value::ByteSize;
use crate::protocol::h1::parse_length;

/// `body_limit`: refuses request bodies over `max` with `413`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The largest request body, counted as it streams.
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

    fn role(&self) -> super::Role {
        super::Role {
            refuses: Some(http::Method::POST),
            ..super::Role::default()
        }
    }

    fn build(&self, _: &super::Build) -> Box<dyn Middleware> {
        Box::new(BodyLimit {
            max: self.max.0,
            message: format!("the request body is larger than {}", self.max).into(),
        })
    }
}

struct BodyLimit {
    max: u64,
    message: std::sync::Arc<str>,
}

impl BodyLimit {
    fn too_large(&self) -> Reject {
        Reject::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Reason::BodyTooLarge,
            self.message.to_string(),
        )
    }
}

impl Middleware for BodyLimit {
    fn on_request(&self, req: &mut request::Parts, _: &mut Context) -> Flow<'_> {
        let declared = req
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| parse_length(v.as_bytes().trim_ascii()));
        if declared.is_some_and(|len| len > self.max) {
            return Flow::Reject(self.too_large());
        }
        Flow::Continue
    }

    fn inspects_body(&self) -> bool {
        true
    }

    fn on_request_body(&self, piece: &Piece<'_>, _: &mut Extensions) -> Result<(), Reject> {
        if piece.received > self.max {
            return Err(self.too_large());
        }
        Ok(())
    }
}
