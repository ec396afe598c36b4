//! `timing`: how long gatehouse and the upstream took, on every response, so a client or
//! a browser's devtools can tell a slow app from a slow proxy without reading logs.

use std::io::Write;
use std::time::Duration;

use http::{request, response, HeaderName, HeaderValue};
use serde::Deserialize;

use crate::chain::{Context, Flow, Middleware};
use crate::config::value::HeaderNameValue;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default = "default_header")]
    header: HeaderNameValue,
    #[serde(default = "yes")]
    server_timing: bool,
}

fn default_header() -> HeaderNameValue {
    HeaderNameValue(HeaderName::from_static("x-response-time"))
}

fn yes() -> bool {
    true
}

impl super::Settings for Settings {
    fn summary(&self) -> String {
        format!(
            "header={} server_timing={}",
            self.header.0, self.server_timing
        )
    }

    fn build(&self) -> Box<dyn Middleware> {
        Box::new(Timing {
            header: self.header.0.clone(),
            server_timing: self.server_timing,
        })
    }
}

struct Timing {
    header: HeaderName,
    server_timing: bool,
}

static SERVER_TIMING: HeaderName = http::header::HeaderName::from_static("server-timing");

impl Middleware for Timing {
    fn on_request(&self, _: &mut request::Parts, _: &mut Context) -> Flow<'_> {
        Flow::Continue
    }

    /// Measured from the request head's arrival to now, just before the response head goes out.
    fn on_response(&self, resp: &mut response::Parts, ctx: &mut Context) {
        let total = ctx.start.elapsed();
        let mut buf = [0u8; 96];
        resp.headers.insert(
            self.header.clone(),
            format_value(&mut buf, |w| {
                write_ms(w, total).and_then(|_| w.write_all(b"ms"))
            }),
        );
        if self.server_timing {
            let value = format_value(&mut buf, |w| {
                if let Some(upstream) = ctx.upstream_time {
                    w.write_all(b"upstream;dur=")?;
                    write_ms(w, upstream)?;
                    w.write_all(b", ")?;
                }
                w.write_all(b"proxy;dur=")?;
                write_ms(
                    w,
                    total.saturating_sub(ctx.upstream_time.unwrap_or_default()),
                )
            });
            resp.headers.append(SERVER_TIMING.clone(), value);
        }
    }
}

/// Formats into a stack buffer, so the only allocation is the header value itself.
fn format_value(
    buf: &mut [u8],
    f: impl FnOnce(&mut &mut [u8]) -> std::io::Result<()>,
) -> HeaderValue {
    let len = buf.len();
    let mut w: &mut [u8] = buf;
    f(&mut w).expect("timing values fit the buffer");
    let written = len - w.len();
    HeaderValue::from_bytes(&buf[..written]).expect("digits and ASCII are a valid header value")
}

/// `12.345` (milliseconds with microsecond precision).
fn write_ms(w: &mut &mut [u8], d: Duration) -> std::io::Result<()> {
    let micros = d.as_micros();
    write!(w, "{}.{:03}", micros / 1000, micros % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_milliseconds() {
        let mut buf = [0u8; 96];
        let v = format_value(&mut buf, |w| {
            write_ms(w, Duration::from_micros(12_345)).and_then(|_| w.write_all(b"ms"))
        });
        assert_eq!(v, "12.345ms");
        let v = format_value(&mut buf, |w| write_ms(w, Duration::from_micros(7)));
        assert_eq!(v, "0.007");
    }
}
