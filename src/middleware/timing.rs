//! `timing`: how long gatehouse and the upstream took, on every response, so a client or
//! a browser's devtools can tell a slow app from a slow proxy without reading logs.
//!
//! The header speaks milliseconds (`6.445ms`) or, for apps migrating from FastAPI's
//! tutorial middleware whose clients parse `X-Process-Time`, plain seconds (`0.006445`).
//! `server-timing` is always in milliseconds, as its spec says.

use std::time::{Duration, Instant};

use http::{request, response, HeaderName, HeaderValue};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::chain::{Context, Flow, Middleware};
use crate::config::value::HeaderNameValue;

/// `timing`: how long gatehouse and the upstream took, in a response header.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The header the total time is written to.
    #[serde(default = "default_header")]
    header: HeaderNameValue,
    #[serde(default)]
    format: Format,
    /// Also add `server-timing` with the upstream's and the proxy's shares.
    #[serde(default = "yes")]
    server_timing: bool,
}

fn default_header() -> HeaderNameValue {
    HeaderNameValue(HeaderName::from_static("x-response-time"))
}

fn yes() -> bool {
    true
}

/// How the header writes the duration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum Format {
    /// `6.445ms`
    #[default]
    Ms,
    /// `0.006445`
    Seconds,
}

impl super::Settings for Settings {
    fn summary(&self) -> String {
        let format = match self.format {
            Format::Ms => "ms",
            Format::Seconds => "seconds",
        };
        format!(
            "header={} format={format} server_timing={}",
            self.header.0, self.server_timing
        )
    }

    fn build(&self, _: &super::Build) -> Box<dyn Middleware> {
        Box::new(Timing {
            header: self.header.0.clone(),
            format: self.format,
            server_timing: self.server_timing,
        })
    }
}

struct Timing {
    header: HeaderName,
    format: Format,
    server_timing: bool,
}

static SERVER_TIMING: HeaderName = http::header::HeaderName::from_static("server-timing");

impl Middleware for Timing {
    fn on_request(&self, _: &mut request::Parts, _: &mut Context) -> Flow<'_> {
        Flow::Continue
    }

    /// Measured from the request head's arrival to the response head: the upstream's
    /// arrival, or now for an answer gatehouse made.
    fn on_response(&self, resp: &mut response::Parts, ctx: &mut Context) {
        let total = ctx.upstream_answered.unwrap_or_else(Instant::now) - ctx.start;
        let mut value = Value::default();
        match self.format {
            Format::Ms => value.ms(total).push(b"ms"),
            Format::Seconds => value.seconds(total),
        };
        resp.headers.insert(self.header.clone(), value.header());
        if self.server_timing {
            let mut value = Value::default();
            if let Some(upstream) = ctx.upstream_time {
                value.push(b"upstream;dur=").ms(upstream).push(b", ");
            }
            value
                .push(b"proxy;dur=")
                .ms(total.saturating_sub(ctx.upstream_time.unwrap_or_default()));
            resp.headers.append(SERVER_TIMING.clone(), value.header());
        }
    }
}

/// A header value built on the stack, so the only allocation is the value itself: this
/// runs on every response, where `format!` machinery costs more than the rest of the phase.
struct Value {
    buf: [u8; 96],
    len: usize,
}

impl Default for Value {
    fn default() -> Self {
        Value {
            buf: [0; 96],
            len: 0,
        }
    }
}

impl Value {
    fn push(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
        self
    }

    /// `12.345`: milliseconds with microsecond precision.
    fn ms(&mut self, d: Duration) -> &mut Self {
        self.micros_in(d, 1000)
    }

    /// `0.012345`: seconds with microsecond precision.
    fn seconds(&mut self, d: Duration) -> &mut Self {
        self.micros_in(d, 1_000_000)
    }

    /// `d` in units of `unit` microseconds (a power of ten), as a decimal with every
    /// fractional digit down to the microsecond.
    fn micros_in(&mut self, d: Duration, unit: u64) -> &mut Self {
        let micros = d.as_micros().min(u128::from(u64::MAX)) as u64;
        self.push(itoa::Buffer::new().format(micros / unit).as_bytes())
            .push(b".");
        let mut place = unit / 10;
        while place > 0 {
            self.push(&[b'0' + (micros / place % 10) as u8]);
            place /= 10;
        }
        self
    }

    fn header(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.buf[..self.len])
            .expect("digits and ASCII are a valid header value")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_milliseconds() {
        let mut v = Value::default();
        v.ms(Duration::from_micros(12_345)).push(b"ms");
        assert_eq!(v.header(), "12.345ms");
        let mut v = Value::default();
        v.push(b"upstream;dur=")
            .ms(Duration::from_micros(7))
            .push(b", ");
        v.ms(Duration::from_secs(3600 * 24 * 365));
        assert_eq!(v.header(), "upstream;dur=0.007, 31536000000.000");
    }

    #[test]
    fn formats_seconds() {
        let cases = [
            (Duration::from_micros(6_445), "0.006445"),
            (Duration::from_nanos(999), "0.000000"),
            (Duration::from_micros(1_000_001), "1.000001"),
            (Duration::from_secs(3600 * 24 * 365), "31536000.000000"),
        ];
        for (d, want) in cases {
            let mut v = Value::default();
            v.seconds(d);
            assert_eq!(v.header(), want, "{d:?}");
        }
    }
}
