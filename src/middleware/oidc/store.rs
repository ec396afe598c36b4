//! `session_store = "redis"`: the session lives in Redis and the cookie holds only its
//! random id (sealed like a whole session would be). Sign-out deletes the session there, so
//! a copy of the cookie stops working at once, and every replica shares the sessions.
//!
//! The key is a digest of the id (`gatehouse:oidc:<middleware>:<sha256 hex>`), so the
//! keyspace never holds what the cookie holds; the value is the session sealed with the
//! cookie secret, so Redis never holds tokens in the clear either.
//!
//! Connections follow `rate_limit`'s Redis backend: one `ConnectionManager` per worker,
//! made on that worker's first use, owned by the middleware, so a reload (a new
//! `redis_url`, a new password) starts afresh and the old connections go with the old chain.

use std::fmt::Display;
use std::sync::OnceLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;
use sha2::{Digest, Sha256};

use crate::logging::Throttle;

/// How long one Redis call may take.
const TIMEOUT: Duration = Duration::from_secs(1);

/// The Redis store of one `oidc` middleware.
pub(super) struct Store {
    name: String,
    /// `gatehouse:oidc:<name>:`
    prefix: String,
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// One connection per worker (and the control thread), made on its first use.
    connections: Box<[OnceLock<ConnectionManager>]>,
    /// `explain --live` reads sessions but writes and deletes none.
    read_only: bool,
    warnings: Throttle,
}

/// Redis failed or did not answer in time (logged).
pub(super) struct Unavailable;

impl Store {
    pub(super) fn new(name: &str, handles: &crate::middleware::Handles, url: &str) -> Store {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        Store {
            name: name.to_owned(),
            prefix: format!("gatehouse:oidc:{name}:"),
            client: redis::Client::open(url).expect("validated"),
            config,
            connections: (0..=handles.workers).map(|_| OnceLock::new()).collect(),
            read_only: handles.read_only,
            warnings: Throttle::default(),
        }
    }

    /// Whether `url` can be a store's, for the config check.
    pub(super) fn check_url(url: &str) -> Result<(), String> {
        redis::Client::open(url)
            .map(|_| ())
            .map_err(|e| format!("invalid Redis URL: {e}"))
    }

    /// The server (never the URL, which may hold a password), for `explain`.
    pub(super) fn describe(&self) -> String {
        format!("Redis at {}", self.client.get_connection_info().addr())
    }

    fn key(&self, id: &str) -> String {
        let digest = Sha256::digest(id.as_bytes());
        let mut key = self.prefix.clone();
        for b in digest {
            key.push_str(&format!("{b:02x}"));
        }
        key
    }

    fn connection(&self, worker: usize) -> ConnectionManager {
        self.connections[worker % self.connections.len()]
            .get_or_init(|| {
                self.client
                    .get_connection_manager_lazy(self.config.clone())
                    .expect("no push sender is configured")
            })
            .clone()
    }

    /// The sealed session stored under `id`; `None` when there is none (signed out,
    /// expired, or lost with the server's data).
    pub(super) async fn get(&self, worker: usize, id: &str) -> Result<Option<String>, Unavailable> {
        let mut conn = self.connection(worker);
        let key = self.key(id);
        self.within(conn.get::<_, Option<String>>(key)).await
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
        let mut conn = self.connection(worker);
        let key = self.key(id);
        self.within(conn.set_ex::<_, _, ()>(key, sealed, ttl.max(1)))
            .await
    }

    /// Deletes the session under `id`.
    pub(super) async fn delete(&self, worker: usize, id: &str) -> Result<(), Unavailable> {
        if self.read_only {
            return Ok(());
        }
        let mut conn = self.connection(worker);
        let key = self.key(id);
        self.within(conn.del::<_, ()>(key)).await
    }

    async fn within<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        match tokio::time::timeout(TIMEOUT, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.failed(e)),
            Err(_) => Err(self.failed(format_args!("no answer within {TIMEOUT:?}"))),
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
