//! The Redis backend: one budget for every replica. Each decision is one `EVALSHA` of a Lua
//! script doing the same GCRA as [`super::Gcra::decide`] atomically on the server, with the
//! server's clock (`TIME`), so replicas' clocks do not matter.
//!
//! Connection: each worker thread has its own multiplexed connection per limiter, behind a
//! `ConnectionManager` that reconnects by itself, created on that worker's first decision.
//! Its driver task then runs on the worker's own runtime (the `redis` crate spawns it, and
//! any reconnection, on the runtime of the caller), so a decision never crosses threads:
//! the thread-per-core way, at the price of one Redis connection per worker and limiter.
//! The limiter owns its connections (one slot per worker), so they go when it goes.

use std::fmt::Display;
use std::io::Write;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::{Gcra, KeyRef, Outcome};
use crate::logging::Throttle;
use crate::metrics::MiddlewareLabel;

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
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// One connection per worker (and the control thread), made on its first decision.
    connections: Box<[OnceLock<ConnectionManager>]>,
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
        url: &str,
        timeout: Duration,
    ) -> Remote {
        let client = redis::Client::open(url).expect("validated");
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_secs(1))))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
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
            name,
            client,
            config,
            connections: (0..=handles.workers).map(|_| OnceLock::new()).collect(),
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
        let mut conn = self.connection(worker);
        let mut call = SCRIPT.key(self.key(key));
        call.arg(gcra.interval).arg(gcra.tolerance).arg(self.take);
        let answer = tokio::time::timeout(
            self.timeout,
            call.invoke_async::<(u8, u64, u64, u64)>(&mut conn),
        )
        .await;
        match answer {
            Ok(Ok((allowed, remaining, reset, retry_after))) => Some(Outcome {
                allowed: allowed == 1,
                tat: 0,
                remaining,
                reset,
                retry_after,
            }),
            Ok(Err(e)) => self.failed(e),
            Err(_) => self.failed(format_args!("no answer within {:?}", self.timeout)),
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

    /// What a decision on `key` asks, for `explain`: the server (never the URL, which may
    /// hold a password) and the bucket's key.
    pub(super) fn describe(&self, key: KeyRef<'_>) -> String {
        format!(
            "would ask Redis at {} about the bucket {}",
            self.client.get_connection_info().addr(),
            String::from_utf8_lossy(&self.key(key))
        )
    }

    /// `worker`'s connection for this limiter (connecting lazily, on the caller's runtime,
    /// which is that worker's).
    fn connection(&self, worker: usize) -> ConnectionManager {
        self.connections[worker % self.connections.len()]
            .get_or_init(|| {
                self.client
                    .get_connection_manager_lazy(self.config.clone())
                    .expect("no push sender is configured")
            })
            .clone()
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
            "redis://127.0.0.1:1",
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
