//! The `http` sink: each batch POSTed as one JSON array over pooled keep-alive connections
//! (gatehouse's one outbound client). 5xx, 429, timeouts and connection errors are retried
//! with exponential backoff and jitter; any other answer outside 2xx fails the batch at
//! once (retrying cannot fix it).

use std::time::Duration;

use ::http::header::CONTENT_TYPE;
use ::http::{HeaderValue, Request, StatusCode, Uri};
use bytes::Bytes;

use crate::client::{Endpoint, Target};
use crate::config::audit::HttpSettings;

/// The most of a collector's answer body that is read (and discarded).
const MAX_ANSWER: usize = 64 << 10;
/// Idle connections to the collector are kept this long.
const POOL_IDLE: Duration = Duration::from_secs(30);

pub struct HttpWriter {
    collector: Endpoint,
    /// The control thread's pool shard, where sinks run.
    shard: usize,
    url: Uri,
    headers: Vec<(::http::HeaderName, HeaderValue)>,
    timeout: Duration,
    retries: u32,
    backoff: Duration,
}

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How one attempt went.
enum Attempt {
    Delivered,
    /// Worth trying again: the collector may recover.
    Retry(String),
    /// Trying again would get the same answer.
    Fail(String),
}

impl HttpWriter {
    pub fn new(s: &HttpSettings, shards: usize) -> HttpWriter {
        let url: Uri = s.url.parse().expect("validated at load");
        let target = Target::from_uri(&url).expect("validated: an http URL with a host");
        HttpWriter {
            collector: Endpoint::new(target, s.timeout.0, POOL_IDLE, shards),
            shard: shards - 1,
            url,
            headers: s.headers.0.clone(),
            timeout: s.timeout.0,
            retries: s.retries,
            backoff: s.backoff.0,
        }
    }

    /// POSTs the batch, retrying as configured; the error is the last attempt's.
    pub async fn write(&self, batch: &[Bytes]) -> Result<(), String> {
        let body = json_array(batch);
        let mut wait = self.backoff;
        let mut attempt = 0;
        loop {
            let error = match self.attempt(body.clone()).await {
                Attempt::Delivered => return Ok(()),
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry(e) => e,
            };
            if attempt == self.retries {
                return Err(format!("{error} (after {} attempts)", attempt + 1));
            }
            attempt += 1;
            tracing::debug!(url = %self.url, attempt, error, "audit POST failed; retrying");
            // Full jitter on the upper half: collectors recovering are not hit in lockstep.
            let jittered = wait / 2 + wait.mul_f64(fastrand::f64() / 2.0);
            tokio::time::sleep(jittered).await;
            wait = (wait * 2).min(MAX_BACKOFF);
        }
    }

    async fn attempt(&self, body: Bytes) -> Attempt {
        let mut req = Request::post(self.url.clone())
            .body(body)
            .expect("a valid request");
        let headers = req.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        match self
            .collector
            .fetch(self.shard, req, self.timeout, MAX_ANSWER)
            .await
        {
            Err(e) => Attempt::Retry(e),
            Ok(resp) if resp.status().is_success() => Attempt::Delivered,
            Ok(resp)
                if resp.status().is_server_error()
                    || resp.status() == StatusCode::TOO_MANY_REQUESTS =>
            {
                Attempt::Retry(format!("collector answered {}", resp.status()))
            }
            Ok(resp) => Attempt::Fail(format!("collector answered {}", resp.status())),
        }
    }
}

/// The batch as one JSON array.
fn json_array(batch: &[Bytes]) -> Bytes {
    let mut out = Vec::with_capacity(batch.iter().map(|b| b.len() + 1).sum::<usize>() + 2);
    out.push(b'[');
    for (i, event) in batch.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(event);
    }
    out.push(b']');
    out.into()
}
