//! The one way to Redis for every user in gatehouse (the shared rate limit, the
//! `redis_stream` audit sink): a server, a Sentinel-managed primary or a Cluster, with TLS
//! and an ACL user or not, as [`crate::config::redis`] describes it.
//!
//! Following a failover: a connection that fails (an I/O error, `READONLY` from a demoted
//! primary, `MASTERDOWN`, [`TIMEOUTS_TO_DROP`] timeouts in a row from a silent one) is
//! dropped, and the next request makes a new one, asking the sentinels again where the
//! primary is. A cluster connection follows `MOVED` and `ASK` and refreshes its slot map by
//! itself. Connecting runs as a task of its own, not under a request's short timeout, and a
//! failed attempt waits before the next one (100 ms, doubling up to 500 ms; 2 s doubling up
//! to 8 s after a refused login), so a server that is down or a wrong password costs a request only
//! `on_backend_error`, is never retried in a tight loop, and is counted
//! (`gatehouse_redis_connect_failures_total{client,reason}`) and logged at most every 10 s.
//!
//! One connection per slot (a worker thread, plus the control thread), made on that slot's
//! runtime: a request never crosses threads. The link owns its connections, so they go when
//! the config generation that built it goes; a reload with new credentials makes new ones.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo,
    RedisConnectionInfo, RedisError, RedisFuture, RedisResult, ServerErrorKind, TlsMode, Value,
};
use tokio::sync::Notify;

use crate::config::redis::{RedisConnection, Target, Topology};
use crate::logging::Throttle;
use crate::metrics::Metrics;

/// A silent server (frozen, or cut off by a partition) answers nothing: after this many
/// requests in a row timed out, its connection is dropped and a new one made.
pub const TIMEOUTS_TO_DROP: u32 = 3;

/// Retries of an unreachable server: 100 ms, doubling, at most 500 ms apart, so a
/// promoted replica is found within half a second of Sentinel naming it.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_millis(500);
/// A wrong password stays wrong until someone changes it: 2 s, doubling up to 8 s.
const AUTH_RETRY: Duration = Duration::from_secs(2);

/// `{client="rate_limit:shared",reason="auth"}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    client: Arc<str>,
    reason: &'static str,
}

/// Every link the process has made (while it lives) and whether it has connected once:
/// what `/readyz` waits for with `[admin] ready_requires = ["redis"]`.
#[derive(Clone, Default)]
pub struct Links(Arc<Mutex<Vec<Listed>>>);

/// A link's user and its "connected once" flag, for as long as the link lives.
type Listed = (Arc<str>, Weak<AtomicBool>);

impl Links {
    fn add(&self, client: &Arc<str>, connected: &Arc<AtomicBool>) {
        let mut links = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        links.retain(|(_, link)| link.strong_count() > 0);
        links.push((client.clone(), Arc::downgrade(connected)));
    }

    /// The users of the links that have not connected yet (`rate_limit:NAME`, `audit:SINK`).
    pub fn waiting(&self) -> Vec<Arc<str>> {
        let links = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        links
            .iter()
            .filter(|(_, link)| link.upgrade().is_some_and(|c| !c.load(Relaxed)))
            .map(|(client, _)| client.clone())
            .collect()
    }
}

/// Connections to one Redis target, one per slot, re-made after failures.
pub struct Link {
    shared: Arc<Shared>,
    slots: Box<[Arc<Slot>]>,
}

/// What the link and its connecting tasks share.
struct Shared {
    /// Who uses the link, for logs and metrics: `rate_limit:NAME`, `audit:SINK`.
    client: Arc<str>,
    /// `Err` when the files it names could not be read at build (logged on each attempt).
    target: Result<Target, String>,
    config: AsyncConnectionConfig,
    connect_timeout: Duration,
    response_timeout: Duration,
    failures: Family<FailureLabels, Counter>,
    warnings: Throttle,
    /// Whether any slot has connected once: `[admin] ready_requires = ["redis"]`.
    connected: Arc<AtomicBool>,
}

#[derive(Default)]
struct Slot {
    conn: ArcSwapOption<Conn>,
    state: Mutex<SlotState>,
    /// Wakes the requests waiting for a connecting task.
    settled: Notify,
    /// Requests in a row that timed out on the current connection.
    timeouts: AtomicU32,
}

#[derive(Default)]
struct SlotState {
    connecting: bool,
    /// No new attempt before this (after a failed one).
    retry_at: Option<Instant>,
    /// Failed attempts in a row, for the backoff.
    failures: u32,
    last_error: Option<Arc<str>>,
}

/// A connection to a server (plain or a Sentinel's primary) or to a cluster.
#[derive(Clone)]
pub enum Conn {
    Node(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Link {
    /// A link to `settings` (checked at load) for `client`, with `slots` connections, each
    /// answering within `response_timeout`, listed in `links`. Inside a tokio runtime, the
    /// last slot connects at once, trying until it has (so readiness needs no traffic);
    /// the others connect at their first request.
    pub fn new(
        client: &str,
        settings: &RedisConnection,
        metrics: &Metrics,
        links: &Links,
        slots: usize,
        response_timeout: Duration,
    ) -> Link {
        let target = settings.resolve().map_err(|problems| {
            let found: Vec<String> = problems
                .into_iter()
                .map(|(k, m)| format!("{k}: {m}"))
                .collect();
            found.join("; ")
        });
        // Connecting may take a sentinel lookup and a TLS handshake: never less than 1 s.
        let connect_timeout = response_timeout.max(Duration::from_secs(1));
        let link = Link {
            shared: Arc::new(Shared {
                client: client.into(),
                target,
                config: AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(Some(response_timeout)),
                connect_timeout,
                response_timeout,
                failures: metrics.family(
                    "gatehouse_redis_connect_failures",
                    "Failed attempts to connect to Redis, by user (rate_limit:NAME, audit:SINK) and reason (auth, unreachable, other)",
                ),
                warnings: Throttle::default(),
                connected: Arc::default(),
            }),
            slots: (0..slots.max(1)).map(|_| Arc::default()).collect(),
        };
        links.add(&link.shared.client, &link.shared.connected);
        if tokio::runtime::Handle::try_current().is_ok() {
            let last = &link.slots[link.slots.len() - 1];
            tokio::spawn(first_connection(
                Arc::downgrade(&link.shared),
                Arc::downgrade(last),
            ));
        }
        link
    }

    /// Where the link goes, for logs and `explain` (never the credentials).
    pub fn describe(&self) -> String {
        match &self.shared.target {
            Ok(target) => target.describe(),
            Err(e) => format!("nowhere ({e})"),
        }
    }

    /// `slot`'s connection: the current one, or the one a connecting task makes. `Err` at
    /// once while a failed attempt's backoff runs. Callers bound the wait with their
    /// timeout; the connecting goes on without them.
    pub async fn connection(&self, slot: usize) -> Result<Conn, Arc<str>> {
        let slot = &self.slots[slot % self.slots.len()];
        if let Some(conn) = &*slot.conn.load() {
            return Ok(Conn::clone(conn));
        }
        let settled = slot.settled.notified();
        tokio::pin!(settled);
        settled.as_mut().enable();
        {
            let mut state = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(conn) = &*slot.conn.load() {
                return Ok(Conn::clone(conn));
            }
            if !state.connecting {
                if state.retry_at.is_some_and(|at| Instant::now() < at) {
                    return Err(state
                        .last_error
                        .clone()
                        .unwrap_or_else(|| "not connected".into()));
                }
                state.connecting = true;
                tokio::spawn(attempt(self.shared.clone(), slot.clone()));
            }
        }
        settled.await;
        match &*slot.conn.load() {
            Some(conn) => Ok(Conn::clone(conn)),
            None => Err(slot
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .last_error
                .clone()
                .unwrap_or_else(|| "not connected".into())),
        }
    }

    /// A request on `slot` was answered: the connection works.
    pub fn answered(&self, slot: usize) {
        let slot = &self.slots[slot % self.slots.len()];
        if slot.timeouts.load(Relaxed) != 0 {
            slot.timeouts.store(0, Relaxed);
        }
    }

    /// A request on `slot` failed with `error`: the connection is dropped when the error
    /// says the server is gone or no longer the primary.
    pub fn failed(&self, slot: usize, error: &RedisError) {
        let gone = error.is_io_error()
            || error.is_connection_dropped()
            || error.is_unrecoverable_error()
            || matches!(
                error.kind(),
                ErrorKind::Server(
                    ServerErrorKind::ReadOnly
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::BusyLoading
                )
            );
        if gone {
            self.slots[slot % self.slots.len()].conn.store(None);
        }
    }

    /// A request on `slot` got no answer in time; [`TIMEOUTS_TO_DROP`] in a row drop the
    /// connection.
    pub fn timed_out(&self, slot: usize) {
        let slot = &self.slots[slot % self.slots.len()];
        if slot.timeouts.fetch_add(1, Relaxed) + 1 >= TIMEOUTS_TO_DROP {
            slot.timeouts.store(0, Relaxed);
            slot.conn.store(None);
        }
    }
}

/// Connects `slot` and keeps trying, each time its backoff allows, until any slot of the
/// link has connected once or the link is gone.
async fn first_connection(shared: Weak<Shared>, slot: Weak<Slot>) {
    loop {
        let (Some(shared), Some(slot)) = (shared.upgrade(), slot.upgrade()) else {
            return;
        };
        if shared.connected.load(Relaxed) {
            return;
        }
        let retry_at = {
            let mut state = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
            match state.retry_at {
                _ if state.connecting => Some(Instant::now() + FIRST_RETRY),
                Some(at) if Instant::now() < at => Some(at),
                _ => {
                    state.connecting = true;
                    None
                }
            }
        };
        match retry_at {
            Some(at) => {
                drop((shared, slot));
                tokio::time::sleep_until(at.into()).await;
            }
            None => attempt(shared, slot).await,
        }
    }
}

/// One connecting attempt for `slot`; settles it either way and wakes its waiters.
async fn attempt(shared: Arc<Shared>, slot: Arc<Slot>) {
    let result = match &shared.target {
        Ok(target) => tokio::time::timeout(shared.connect_timeout * 3, connect(target, &shared))
            .await
            .unwrap_or_else(|_| {
                Err(RedisError::from((
                    ErrorKind::Io,
                    "no connection",
                    format!("within {:?}", shared.connect_timeout * 3),
                )))
            })
            .map_err(|e| (reason(&e), e.to_string())),
        Err(e) => Err(("other", e.clone())),
    };
    let mut state = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
    state.connecting = false;
    match result {
        Ok(conn) => {
            slot.timeouts.store(0, Relaxed);
            slot.conn.store(Some(Arc::new(conn)));
            state.failures = 0;
            state.retry_at = None;
            if !shared.connected.swap(true, Relaxed) || state.last_error.take().is_some() {
                tracing::info!(client = %shared.client, "connected to Redis");
            }
            state.last_error = None;
        }
        Err((reason, error)) => {
            let wait = if reason == "auth" {
                AUTH_RETRY.saturating_mul(1 << state.failures.min(2))
            } else {
                FIRST_RETRY
                    .saturating_mul(1 << state.failures.min(3))
                    .min(LAST_RETRY)
            };
            state.failures += 1;
            state.retry_at = Some(Instant::now() + wait);
            shared
                .failures
                .get_or_create(&FailureLabels {
                    client: shared.client.clone(),
                    reason,
                })
                .inc();
            if let Some(suppressed) = shared.warnings.ready() {
                let what = if reason == "auth" {
                    "Redis refused the login: check `username` and `password` (a new one is read on SIGHUP)"
                } else {
                    "cannot connect to Redis"
                };
                tracing::warn!(client = %shared.client, %error, retry_in = ?wait, suppressed, "{what} (logged at most every 10s; suppressed: how many more since the last line)");
            }
            state.last_error = Some(format!("redis: {error}").into());
        }
    }
    drop(state);
    slot.settled.notify_waiters();
}

/// What kind of failure `e` is, for the metric.
fn reason(e: &RedisError) -> &'static str {
    let auth_code = matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"));
    if e.kind() == ErrorKind::AuthenticationFailed || auth_code {
        "auth"
    } else if e.is_io_error() || e.is_connection_refusal() || e.is_timeout() {
        "unreachable"
    } else {
        "other"
    }
}

/// `addr` with the target's credentials, database and TLS.
fn info(addr: &ConnectionAddr, target: &Target) -> RedisResult<ConnectionInfo> {
    let addr = match (addr, target.tls.is_some()) {
        (ConnectionAddr::Tcp(host, port), true) => ConnectionAddr::TcpTls {
            host: host.clone(),
            port: *port,
            insecure: false,
            tls_params: None,
        },
        (addr, _) => addr.clone(),
    };
    let mut redis = RedisConnectionInfo::default().set_db(target.db);
    if let Some(username) = &target.username {
        redis = redis.set_username(username);
    }
    if let Some(password) = &target.password {
        redis = redis.set_password(password);
    }
    Ok(addr.into_connection_info()?.set_redis_settings(redis))
}

/// A client for one server of `target`.
fn client(addr: &ConnectionAddr, target: &Target) -> RedisResult<Client> {
    let info = info(addr, target)?;
    match &target.tls {
        Some(certs) => Client::build_with_tls(info, certs.clone()),
        None => Client::open(info),
    }
}

async fn connect(target: &Target, shared: &Shared) -> RedisResult<Conn> {
    let config = &shared.config;
    match &target.kind {
        Topology::Single(addr) => Ok(Conn::Node(
            client(addr, target)?
                .get_multiplexed_async_connection_with_config(config)
                .await?,
        )),
        Topology::Sentinel { master, sentinels } => {
            let mut builder =
                SentinelClientBuilder::new(sentinels.clone(), master, SentinelServerType::Master)?
                    .set_client_to_redis_db(target.db);
            if let Some(username) = &target.username {
                builder = builder.set_client_to_redis_username(username);
            }
            if let Some(password) = &target.password {
                builder = builder.set_client_to_redis_password(password);
            }
            if let Some(certs) = &target.tls {
                builder = builder
                    .set_client_to_redis_tls_mode(TlsMode::Secure)
                    .set_client_to_redis_certificates(certs.clone())
                    .set_client_to_sentinel_tls_mode(TlsMode::Secure)
                    .set_client_to_sentinel_certificates(certs.clone());
            }
            // Asks the sentinels, then checks that the server named is a primary (`ROLE`).
            let primary = builder.build()?.async_get_client().await?;
            Ok(Conn::Node(
                primary
                    .get_multiplexed_async_connection_with_config(config)
                    .await?,
            ))
        }
        Topology::Cluster(nodes) => {
            let seeds = nodes
                .iter()
                .map(|addr| info(addr, target))
                .collect::<RedisResult<Vec<_>>>()?;
            let mut builder = redis::cluster::ClusterClientBuilder::new(seeds)
                .connection_timeout(shared.connect_timeout)
                .response_timeout(shared.response_timeout);
            if let Some(certs) = &target.tls {
                builder = builder.tls(TlsMode::Secure).certs(certs.clone());
            }
            Ok(Conn::Cluster(
                builder.build()?.get_async_connection().await?,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_attempt_is_not_repeated_before_its_backoff() {
        // Nothing listens on port 1: connecting fails at once.
        let metrics = Metrics::new();
        let links = Links::default();
        let link = Link::new(
            "test:unreachable",
            &RedisConnection::from_url("redis://127.0.0.1:1"),
            &metrics,
            &links,
            1,
            Duration::from_millis(50),
        );
        // The start-up attempt (this is a runtime), then requests within its backoff.
        for _ in 0..20 {
            assert!(link.connection(0).await.is_err());
        }
        let text = metrics.encode();
        assert!(
            text.contains("gatehouse_redis_connect_failures_total{client=\"test:unreachable\",reason=\"unreachable\"} 1"),
            "one attempt, not one per request: {text}"
        );
        assert_eq!(links.waiting().len(), 1, "never connected");
        drop(link);
        assert!(
            links.waiting().is_empty(),
            "a link that is gone is not waited for"
        );
    }
}
