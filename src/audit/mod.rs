//! Audit events: one per request, recorded after the response has been sent (or the
//! client went away), on a bounded in-process queue the request path never waits on.
//!
//! Flow: the proxy's last phase writes an [`Event`] as JSON on the worker, once the
//! response is out, and [`Audit::record`]s the bytes with a `try_send` (a full queue drops
//! and counts them). A dispatcher task only moves bytes: it fans each event out to every
//! sink's own bounded buffer, so a slow sink only ever fills its own buffer; each sink's
//! worker batches (`batch_size`, `flush_interval`) and delivers. The pipeline runs on the
//! runtime it was started on (the server's control thread); blocking writes go to its
//! blocking pool. It is made once per server and survives reloads: `[audit]` is fixed at
//! start.

pub mod event;
mod file;
mod http;
mod otlp;
mod redis_stream;
mod sink;
pub mod spool;
mod stdout;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ::http::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use event::{Decision, Event};

use crate::config::audit::{field_name, AuditConfig, Include};
use crate::metrics::Metrics;
use sink::SinkState;

/// The running audit pipeline.
pub struct Audit {
    include: Include,
    /// `request_headers`, read from the request, and the fields they are written as.
    headers: Vec<HeaderName>,
    fields: Vec<String>,
    queue: mpsc::Sender<Bytes>,
    sinks: Vec<Arc<SinkState>>,
    metrics: Arc<Metrics>,
    /// Events the full queue dropped (each also counts in `gatehouse_audit_dropped_total`).
    queue_dropped: AtomicU64,
    /// Bumped by SIGHUP: file sinks reopen their file before their next write.
    reopen: Arc<AtomicU64>,
    closing: Notify,
    /// Set when `spool_dir` is: at shutdown, what cannot be delivered in time is spooled.
    spool_now: Option<CancellationToken>,
    workers: Mutex<JoinSet<()>>,
    full_warning: Throttle,
}

impl Audit {
    /// Starts the dispatcher and one worker per sink on the current tokio runtime, taking
    /// over the spool a previous process left. `shard` is the connection-pool shard of the
    /// thread they run on (sinks that send over HTTP). Fails when a spool directory is
    /// unusable.
    pub fn start(
        config: &AuditConfig,
        metrics: &Arc<Metrics>,
        shards: usize,
    ) -> Result<Arc<Audit>, String> {
        let mut spools = Vec::with_capacity(config.sinks.len());
        for sink in &config.sinks {
            spools.push(match &config.spool_dir {
                Some(dir) => {
                    let dir = dir.join(&sink.name);
                    let spool = spool::Spool::open(dir.clone(), config.spool_max_bytes.0)
                        .map_err(|e| {
                            format!("cannot open the audit spool {}: {e}", dir.display())
                        })?;
                    if !spool.is_empty() {
                        tracing::info!(sink = %sink.name, events = spool.events(), "audit spool from an earlier run: replaying it");
                    }
                    Some(spool)
                }
                None => None,
            });
        }
        let spool_now = CancellationToken::new();
        let (queue, rx) = mpsc::channel(config.queue_capacity);
        let sinks: Vec<Arc<SinkState>> = config
            .sinks
            .iter()
            .map(|s| Arc::new(SinkState::new(&s.name, metrics)))
            .collect();
        let reopen = Arc::new(AtomicU64::new(0));
        let audit = Arc::new(Audit {
            include: config.include,
            headers: config.request_headers.iter().map(|h| h.0.clone()).collect(),
            fields: config.request_headers.iter().map(field_name).collect(),
            queue,
            sinks: sinks.clone(),
            metrics: metrics.clone(),
            queue_dropped: AtomicU64::new(0),
            reopen: reopen.clone(),
            closing: Notify::new(),
            spool_now: config.spool_dir.is_some().then(|| spool_now.clone()),
            workers: Mutex::new(JoinSet::new()),
            full_warning: Throttle::default(),
        });
        let mut workers = audit.workers.lock().expect("not poisoned");
        let mut buffers = Vec::with_capacity(sinks.len());
        for ((sink, state), spool) in config.sinks.iter().zip(sinks).zip(spools) {
            let (tx, rx) = mpsc::channel(config.queue_capacity);
            buffers.push(tx);
            let worker = sink::Worker {
                writer: sink::Writer::new(&sink.kind, &reopen, shards),
                rx,
                state,
                batch_size: config.batch_size,
                flush_interval: config.flush_interval.0,
                spool,
                spool_now: spool_now.clone(),
            };
            workers.spawn(worker.run());
        }
        workers.spawn(dispatch(audit.clone(), rx, buffers));
        drop(workers);
        Ok(audit)
    }

    /// Whether a request so decided produces an event.
    #[inline]
    pub fn wants(&self, decision: Decision) -> bool {
        decision == Decision::Deny || self.include == Include::All
    }

    /// The `request_headers` values of a request, to go in its event; nothing is read (or
    /// allocated) when none are configured.
    pub fn capture_headers(&self, headers: &HeaderMap) -> Vec<Option<HeaderValue>> {
        self.headers
            .iter()
            .map(|h| headers.get(h).cloned())
            .collect()
    }

    /// Writes `event` as JSON and puts it on the queue, or drops and counts it when the
    /// queue is full. Never waits, and wakes nobody: the dispatcher polls.
    pub fn record(&self, event: &Event) {
        let json = Bytes::from(event.to_json(&self.fields));
        if self.queue.try_send(json).is_err() {
            self.queue_dropped.fetch_add(1, Relaxed);
            self.metrics.audit_dropped.inc();
            if self.full_warning.ready() {
                tracing::warn!(
                    dropped_total = self.metrics.audit_dropped.get(),
                    "audit queue full: events are being dropped (raise audit.queue_capacity or check the sinks)"
                );
            }
        }
    }

    /// Events on the queue, not yet handed to the sinks.
    pub fn queued(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    /// Makes file sinks reopen their files (after logrotate moved them), at their next write.
    pub fn reopen(&self) {
        self.reopen.fetch_add(1, Relaxed);
    }

    /// Flushes the queue to every sink within `within`. With a spool, the last part of that
    /// time goes to spooling what could not be delivered; whatever is still undelivered
    /// then is counted (`outcome="lost"`) and logged with its number. Called once, at
    /// shutdown.
    pub async fn shutdown(&self, within: Duration) {
        let queue_dropped = self.queue_dropped.load(Relaxed);
        if queue_dropped > 0 {
            tracing::warn!(
                dropped = queue_dropped,
                "audit events dropped during this run because the queue was full"
            );
        }
        for sink in &self.sinks {
            let dropped = sink.dropped.get();
            if dropped > 0 {
                tracing::warn!(sink = %sink.name, dropped, "audit events dropped during this run because the sink's buffer was full");
            }
        }
        self.closing.notify_one();
        let mut workers = std::mem::take(&mut *self.workers.lock().expect("not poisoned"));
        let reserve = match self.spool_now {
            Some(_) => (within / 4).min(SPOOL_RESERVE),
            None => Duration::ZERO,
        };
        let mut all_done = std::pin::pin!(async { while workers.join_next().await.is_some() {} });
        if tokio::time::timeout(within - reserve, all_done.as_mut())
            .await
            .is_ok()
        {
            tracing::info!("audit queue flushed");
            return;
        }
        if let Some(spool_now) = &self.spool_now {
            spool_now.cancel();
            if tokio::time::timeout(reserve, all_done).await.is_ok() {
                tracing::info!(
                    "audit queue flushed; what the sinks did not take in time is spooled"
                );
                return;
            }
        }
        let queued = self.queued();
        for sink in &self.sinks {
            let lost = sink.pending.load(Relaxed) + queued as u64;
            if lost > 0 {
                sink.lost.inc_by(lost);
                tracing::error!(sink = %sink.name, lost, "audit events lost: the sink did not take them within shutdown_grace");
            }
        }
    }
}

/// The most of the shutdown time kept for spooling what the sinks did not take.
const SPOOL_RESERVE: Duration = Duration::from_secs(1);

/// How often the dispatcher empties the queue. It polls rather than being woken: a wake
/// per event would cost the request's thread a syscall to unpark the control thread.
const DISPATCH_TICK: Duration = Duration::from_millis(10);

/// Moves events from the queue to every sink's buffer.
async fn dispatch(
    audit: Arc<Audit>,
    mut rx: mpsc::Receiver<Bytes>,
    buffers: Vec<mpsc::Sender<Bytes>>,
) {
    let forward = |json: Bytes| {
        for (tx, sink) in buffers.iter().zip(&audit.sinks) {
            match tx.try_send(json.clone()) {
                Ok(()) => {
                    sink.pending.fetch_add(1, Relaxed);
                }
                Err(_) => sink.overflow(),
            }
        }
    };
    let depth = &audit.metrics.audit_queue_depth;
    let mut tick = tokio::time::interval(DISPATCH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = audit.closing.notified() => break,
            _ = tick.tick() => {
                depth.set(rx.len() as i64);
                while let Ok(json) = rx.try_recv() {
                    forward(json);
                }
            }
        }
    }
    while let Ok(json) = rx.try_recv() {
        forward(json);
    }
    depth.set(0);
    // Dropping the buffers' senders lets every sink deliver what it holds and finish.
}

/// Lets a warning through at most once per 10 seconds.
#[derive(Default)]
struct Throttle(AtomicU64);

impl Throttle {
    fn ready(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.0.load(Relaxed);
        (last == 0 || now >= last + 10)
            && self.0.compare_exchange(last, now, Relaxed, Relaxed).is_ok()
    }
}
