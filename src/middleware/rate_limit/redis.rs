//! The Redis backend: one budget for every replica. Each decision is one `EVALSHA` of a Lua
//! script doing the same GCRA as [`super::Gcra::decide`] atomically on the server, with the
//! server's clock (`TIME`), so replicas' clocks do not matter.
//!
//! Connections: [`crate::redis_link`], one per worker thread (and the control thread),
//! each made on that worker's runtime, so a decision never crosses threads. The script
//! touches one key, so it runs unchanged on a Redis Cluster (on the key's primary).

use std::fmt::Display;
use std::io::Write;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use redis::Script;

use super::{Gcra, KeyRef, Outcome};
use crate::config::redis::RedisConnection;
use crate::logging::Throttle;
use crate::metrics::MiddlewareLabel;
use crate::redis_link::Link;

/// GCRA with server time, in microseconds. KEYS[1] the key; ARGV interval, tolerance, and
/// whether to take from the bucket (`1`) or only look (`0`, for `explain --live`).
/// Returns {allowed, remaining, reset, retry_after}. The key expires when its bucket is full
/// again, which is exactly when forgetting it changes nothing.
static SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
local new_tat = tat + interval
if new_tat - now > tolerance then
  return {0, 0, tat - now, new_tat - tolerance - now}
end
if ARGV[3] == '1' then
  redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
end
return {1, math.floor((tolerance - (new_tat - now)) / interval), new_tat - now, 0}
",
    )
});

pub(super) struct Remote {
    name: Arc<str>,
    /// `gatehouse:rl:<name>:`
    prefix: Vec<u8>,
    /// One connection per worker (and the control thread), made on its first decision.
    link: Link,
    timeout: Duration,
    /// `1` takes from the bucket; `0` only looks (`Handles::read_only`).
    take: u8,
    /// `gatehouse_rate_limit_backend_errors_total{middleware=name}`.
    errors: Counter,
    /// Its failures' log lines.
    warnings: Throttle,
}

impl Remote {
    pub(super) fn new(
        name: &str,
        handles: &crate::middleware::Handles,
        redis: &RedisConnection,
        timeout: Duration,
    ) -> Remote {
        let name: Arc<str> = name.into();
        Remote {
            prefix: format!("gatehouse:rl:{name}:").into_bytes(),
            errors: handles
                .metrics
                .family::<MiddlewareLabel, Counter>(
                    "gatehouse_rate_limit_backend_errors",
                    "Rate limit decisions the backend (Redis) failed or timed out, by middleware name",
                )
                .get_or_create_owned(&MiddlewareLabel {
                    middleware: name.clone(),
                }),
            link: Link::new(
                &format!("rate_limit:{name}"),
                redis,
                &handles.metrics,
                &handles.redis,
                handles.workers + 1,
                timeout,
            ),
            name,
            timeout,
            take: u8::from(!handles.read_only),
            warnings: Throttle::default(),
        }
    }

    /// One round trip, on `worker`'s connection; `None` when Redis failed or did not answer
    /// within the timeout.
    pub(super) async fn decide(
        &self,
        worker: usize,
        key: KeyRef<'_>,
        gcra: &Gcra,
    ) -> Option<Outcome> {
        let mut call = SCRIPT.key(self.key(key));
        call.arg(gcra.interval).arg(gcra.tolerance).arg(self.take);
        let exchange = async {
            let mut conn = self.link.connection(worker).await.map_err(Err)?;
            call.invoke_async::<(u8, u64, u64, u64)>(&mut conn)
                .await
                .map_err(Ok)
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok((allowed, remaining, reset, retry_after))) => {
                self.link.answered(worker);
                Some(Outcome {
                    allowed: allowed == 1,
                    tat: 0,
                    remaining,
                    reset,
                    retry_after,
                })
            }
            // The server answered with an error, or the connection broke.
            Ok(Err(Ok(e))) => {
                self.link.failed(worker, &e);
                self.failed(e)
            }
            // No connection (the link says why, and logs its own attempts).
            Ok(Err(Err(e))) => self.failed(e),
            Err(_) => {
                self.link.timed_out(worker);
                self.failed(format_args!("no answer within {:?}", self.timeout))
            }
        }
    }

    /// The Redis key of a bucket: `gatehouse:rl:<name>:<address>`, `...:=<value>` for a
    /// header value or subject, `...:-` for the shared bucket.
    fn key(&self, key: KeyRef<'_>) -> Vec<u8> {
        let mut redis_key = Vec::with_capacity(self.prefix.len() + 40);
        redis_key.extend_from_slice(&self.prefix);
        match key {
            KeyRef::Ip(ip) => write!(redis_key, "{ip}").expect("writing to a Vec"),
            KeyRef::Text(text) => {
                redis_key.push(b'=');
                redis_key.extend_from_slice(text);
            }
            KeyRef::Shared => redis_key.push(b'-'),
        }
        redis_key
    }

    /// What a decision on `key` asks, for `explain`: the server (never the credentials)
    /// and the bucket's key.
    pub(super) fn describe(&self, key: KeyRef<'_>) -> String {
        format!(
            "would ask Redis at {} about the bucket {}",
            self.link.describe(),
            String::from_utf8_lossy(&self.key(key))
        )
    }

    /// Counts a failure, and logs it unless one was logged recently.
    fn failed(&self, error: impl Display) -> Option<Outcome> {
        self.errors.inc();
        if let Some(suppressed) = self.warnings.ready() {
            tracing::warn!(
                middleware = %self.name,
                %error,
                suppressed,
                "rate limit backend failed; on_backend_error applies (logged at most every 10s; suppressed: how many more since the last line)"
            );
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreachable_server_is_a_failure_counted_per_decision() {
        // Nothing listens on port 1: every decision fails at once.
        let handles = crate::middleware::Handles::offline();
        let remote = Remote::new(
            "rl-unreachable",
            &handles,
            &RedisConnection::from_url("redis://127.0.0.1:1"),
            Duration::from_millis(50),
        );
        let gcra = Gcra {
            interval: 1_000,
            tolerance: 1_000,
        };
        for _ in 0..3 {
            assert_eq!(remote.decide(0, KeyRef::Shared, &gcra).await, None);
        }
        let metrics = handles.metrics.encode();
        assert!(
            metrics.contains(
                "gatehouse_rate_limit_backend_errors_total{middleware=\"rl-unreachable\"} 3"
            ),
            "{metrics}"
        );
    }
}
