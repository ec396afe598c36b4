//! `session_store = "redis"`: the session lives in Redis and the cookie holds only its
//! random id (sealed like a whole session would be). Sign-out deletes the session there, so
//! a copy of the cookie stops working at once, and every replica shares the sessions.
//!
//! The key is a digest of the id (`gatehouse:oidc:<middleware>:<sha256 hex>`), so the
//! keyspace never holds what the cookie holds; the value is the session sealed with the
//! cookie secret, so Redis never holds tokens in the clear either.
//!
//! Connections: [`crate::redis_link`] (a server, Sentinel or Cluster, TLS, reconnection
//! with backoff), one per worker thread, owned by the middleware, so a reload with a new
//! password starts afresh and the old connections go with the old chain.

use std::fmt::Display;
use std::time::Duration;

use redis::AsyncCommands;
use sha2::{Digest, Sha256};

use crate::config::redis::RedisConnection;
use crate::logging::Throttle;
use crate::redis_link::Link;

/// How long one Redis call may take.
const TIMEOUT: Duration = Duration::from_secs(1);

/// The Redis store of one `oidc` middleware.
pub(super) struct Store {
    name: String,
    /// `gatehouse:oidc:<name>:`
    prefix: String,
    link: Link,
    /// `explain --live` reads sessions but writes and deletes none.
    read_only: bool,
    warnings: Throttle,
}

/// Redis failed or did not answer in time (logged).
pub(super) struct Unavailable;

impl Store {
    pub(super) fn new(
        name: &str,
        handles: &crate::middleware::Handles,
        redis: &RedisConnection,
    ) -> Store {
        Store {
            name: name.to_owned(),
            prefix: format!("gatehouse:oidc:{name}:"),
            link: Link::new(
                &format!("oidc:{name}"),
                redis,
                &handles.metrics,
                &handles.redis,
                handles.workers + 1,
                TIMEOUT,
            ),
            read_only: handles.read_only,
            warnings: Throttle::default(),
        }
    }

    /// The server (never the credentials), for `explain`.
    pub(super) fn describe(&self) -> String {
        format!("Redis at {}", self.link.describe())
    }

    fn key(&self, id: &str) -> String {
        let digest = Sha256::digest(id.as_bytes());
        let mut key = self.prefix.clone();
        for b in digest {
            key.push_str(&format!("{b:02x}"));
        }
        key
    }

    /// The sealed session stored under `id`; `None` when there is none (signed out,
    /// expired, or lost with the server's data).
    pub(super) async fn get(&self, worker: usize, id: &str) -> Result<Option<String>, Unavailable> {
        let key = self.key(id);
        self.call(worker, |mut conn| async move {
            conn.get::<_, Option<String>>(key).await
        })
        .await
    }

    /// Stores the sealed session under `id` for `ttl` seconds.
    pub(super) async fn set(
        &self,
        worker: usize,
        id: &str,
        sealed: &str,
        ttl: u64,
    ) -> Result<(), Unavailable> {
        if self.read_only {
            return Ok(());
        }
        let (key, sealed) = (self.key(id), sealed.to_owned());
        self.call(worker, |mut conn| async move {
            conn.set_ex::<_, _, ()>(key, sealed, ttl.max(1)).await
        })
        .await
    }

    /// Deletes the session under `id`.
    pub(super) async fn delete(&self, worker: usize, id: &str) -> Result<(), Unavailable> {
        if self.read_only {
            return Ok(());
        }
        let key = self.key(id);
        self.call(
            worker,
            |mut conn| async move { conn.del::<_, ()>(key).await },
        )
        .await
    }

    /// One command on `worker`'s connection, within [`TIMEOUT`], telling the link how it
    /// went (so it drops a broken connection).
    async fn call<T, F>(
        &self,
        worker: usize,
        command: impl FnOnce(crate::redis_link::Conn) -> F,
    ) -> Result<T, Unavailable>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let exchange = async {
            let conn = self.link.connection(worker).await.map_err(Err)?;
            command(conn).await.map_err(Ok)
        };
        match tokio::time::timeout(TIMEOUT, exchange).await {
            Ok(Ok(value)) => {
                self.link.answered(worker);
                Ok(value)
            }
            Ok(Err(Ok(e))) => {
                self.link.failed(worker, &e);
                Err(self.failed(e))
            }
            // No connection (the link says why, and logs its own attempts).
            Ok(Err(Err(e))) => Err(self.failed(e)),
            Err(_) => {
                self.link.timed_out(worker);
                Err(self.failed(format_args!("no answer within {TIMEOUT:?}")))
            }
        }
    }

    /// Logs a failure unless one was logged recently.
    fn failed(&self, error: impl Display) -> Unavailable {
        if let Some(suppressed) = self.warnings.ready() {
            tracing::warn!(
                middleware = %self.name,
                %error,
                suppressed,
                "oidc session store (Redis) failed; sessions cannot be read or written (logged at most every 10s)"
            );
        }
        Unavailable
    }
}
