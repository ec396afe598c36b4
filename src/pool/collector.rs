//! A collector that batches of telemetry are POSTed to (the audit `http` and `otlp` sinks,
//! the span exporter), over the client's pooled keep-alive connections. 5xx, 429, timeouts
//! and connection errors are retried with exponential backoff and jitter, or after the
//! `Retry-After` seconds the collector asked for; any other answer outside 2xx fails the
//! batch at once (retrying cannot fix it).

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, Uri};

use super::{Endpoint, Target};

/// The most of a collector's answer body that is read.
const MAX_ANSWER: usize = 64 << 10;
/// Idle connections to the collector are kept this long.
const POOL_IDLE: Duration = Duration::from_secs(30);
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How often, and how patiently, a failed POST is tried again.
#[derive(Clone, Copy, Debug)]
pub struct Retries {
    /// Attempts after the first.
    pub retries: u32,
    /// The wait before the first retry; doubled for each next one (with jitter).
    pub backoff: Duration,
}

pub struct Collector {
    endpoint: Endpoint,
    /// The control thread's pool shard, where exports run.
    shard: usize,
    url: Uri,
    /// Sent with every POST, `content-type` first.
    headers: Vec<(HeaderName, HeaderValue)>,
    timeout: Duration,
    retries: Retries,
}

/// How one attempt went.
enum Attempt {
    Delivered(Bytes),
    /// Worth trying again (after the collector's `Retry-After`, if it said one).
    Retry(String, Option<Duration>),
    /// Trying again would get the same answer.
    Fail(String),
}

impl Collector {
    /// A collector at `url` (`http://host[:port]/path`, validated at load), POSTed
    /// `content_type` bodies with `headers`, from the control thread (the last of `shards`).
    pub fn new(
        url: Uri,
        content_type: &'static str,
        headers: &[(HeaderName, HeaderValue)],
        timeout: Duration,
        retries: Retries,
        shards: usize,
    ) -> Collector {
        let target = Target::from_uri(&url).expect("validated: an http URL with a host");
        let mut all = vec![(CONTENT_TYPE, HeaderValue::from_static(content_type))];
        all.extend(headers.iter().cloned());
        Collector {
            endpoint: Endpoint::new(target, timeout, POOL_IDLE, shards),
            shard: shards - 1,
            url,
            headers: all,
            timeout,
            retries,
        }
    }

    pub fn url(&self) -> &Uri {
        &self.url
    }

    /// POSTs `body`, retrying as configured; returns the accepting answer's body, or the
    /// last attempt's error.
    pub async fn post(&self, body: Bytes) -> Result<Bytes, String> {
        let mut wait = self.retries.backoff;
        let mut attempt = 0;
        loop {
            let (error, asked) = match self.attempt(body.clone()).await {
                Attempt::Delivered(answer) => return Ok(answer),
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry(e, asked) => (e, asked),
            };
            if attempt == self.retries.retries {
                return Err(format!("{error} (after {} attempts)", attempt + 1));
            }
            attempt += 1;
            tracing::debug!(url = %self.url, attempt, error, "POST to the collector failed; retrying");
            // Full jitter on the upper half: collectors recovering are not hit in lockstep.
            let jittered = wait / 2 + wait.mul_f64(fastrand::f64() / 2.0);
            tokio::time::sleep(asked.unwrap_or(jittered)).await;
            wait = (wait * 2).min(MAX_BACKOFF);
        }
    }

    async fn attempt(&self, body: Bytes) -> Attempt {
        let mut req = Request::post(self.url.clone())
            .body(body)
            .expect("a valid request");
        let headers = req.headers_mut();
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        match self
            .endpoint
            .fetch(self.shard, req, self.timeout, MAX_ANSWER)
            .await
        {
            Err(e) => Attempt::Retry(e, None),
            Ok(resp) if resp.status().is_success() => Attempt::Delivered(resp.into_body()),
            Ok(resp)
                if resp.status().is_server_error()
                    || resp.status() == StatusCode::TOO_MANY_REQUESTS =>
            {
                let asked = retry_after(&resp);
                Attempt::Retry(format!("collector answered {}", resp.status()), asked)
            }
            Ok(resp) => Attempt::Fail(format!("collector answered {}", resp.status())),
        }
    }
}

/// A `Retry-After` in seconds (the form collectors use), at most [`MAX_BACKOFF`].
fn retry_after(resp: &Response<Bytes>) -> Option<Duration> {
    let secs: u64 = resp
        .headers()
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs).min(MAX_BACKOFF))
}
