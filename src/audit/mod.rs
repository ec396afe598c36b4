//! Audit events: one per response, recorded after the response has been sent (or the
//! client went away), on a bounded in-process queue the request path never waits on.
//!
//! Flow: the proxy captures an [`Event`] only when it will be recorded (`include`), the
//! connection's response body finishes it and [`Audit::record`]s it with a `try_send`
//! (a full queue drops and counts it). A dispatcher task serializes each event once and
//! fans the JSON out to every sink's own bounded buffer, so a slow sink only ever fills
//! its own buffer; each sink's worker batches (`batch_size`, `flush_interval`) and
//! delivers. Everything runs on the control runtime; blocking writes go to its blocking
//! pool. The queue is process-wide: reloads never touch it, and `[audit]` is fixed at start.

pub mod event;
mod file;
mod http;
mod redis_stream;
pub mod settings;
mod sink;
pub mod spool;
mod stdout;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use ::http::{request, HeaderValue, Uri};
use bytes::Bytes;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use event::{Decision, Event, WallClock};
pub use settings::{AuditConfig, Include};

use crate::metrics;
use sink::SinkState;

/// The running audit pipeline. There is at most one per process: see [`start`].
pub struct Audit {
    include: Include,
    /// `request_headers`, read from the request, and the fields they are written as.
    headers: Vec<::http::HeaderName>,
    fields: Vec<String>,
    queue: mpsc::Sender<Box<Event>>,
    sinks: Vec<Arc<SinkState>>,
    /// Bumped by SIGHUP: file sinks reopen their file before their next write.
    reopen: AtomicU64,
    closing: Notify,
    /// Set when `spool_dir` is: at shutdown, what cannot be delivered in time is spooled.
    spool_now: Option<CancellationToken>,
    workers: Mutex<JoinSet<()>>,
    full_warning: Throttle,
}

static AUDIT: OnceLock<Audit> = OnceLock::new();

/// The pipeline, when `[audit]` is configured.
#[inline]
pub fn get() -> Option<&'static Audit> {
    AUDIT.get()
}

/// Starts the dispatcher and one worker per sink on the current tokio runtime, taking over
/// the spool a previous process left. Called once, at start-up; a second call is ignored
/// (the config is fixed at start). Fails when a spool directory is unusable.
pub fn start(config: &AuditConfig) -> Result<(), String> {
    let mut spools = Vec::with_capacity(config.sinks.len());
    for sink in &config.sinks {
        spools.push(match &config.spool_dir {
            Some(dir) => {
                let dir = dir.join(&sink.name);
                let spool = spool::Spool::open(dir.clone(), config.spool_max_bytes.0)
                    .map_err(|e| format!("cannot open the audit spool {}: {e}", dir.display()))?;
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
        .map(|s| Arc::new(SinkState::new(&s.name)))
        .collect();
    let audit = Audit {
        include: config.include,
        headers: config.request_headers.iter().map(|h| h.0.clone()).collect(),
        fields: config
            .request_headers
            .iter()
            .map(settings::field_name)
            .collect(),
        queue,
        sinks: sinks.clone(),
        reopen: AtomicU64::new(0),
        closing: Notify::new(),
        spool_now: config.spool_dir.is_some().then(|| spool_now.clone()),
        workers: Mutex::new(JoinSet::new()),
        full_warning: Throttle::default(),
    };
    if AUDIT.set(audit).is_err() {
        return Ok(());
    }
    let audit = get().expect("just set");
    let mut workers = audit.workers.lock().expect("not poisoned");
    let mut buffers = Vec::with_capacity(sinks.len());
    for ((sink, state), spool) in config.sinks.iter().zip(sinks).zip(spools) {
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        buffers.push(tx);
        let worker = sink::Worker {
            writer: sink::Writer::new(&sink.kind),
            rx,
            state,
            batch_size: config.batch_size,
            flush_interval: config.flush_interval.0,
            spool,
            spool_now: spool_now.clone(),
        };
        workers.spawn(worker.run());
    }
    workers.spawn(dispatch(audit, rx, buffers));
    Ok(())
}

impl Audit {
    /// Whether a request so decided produces an event.
    #[inline]
    pub fn wants(&self, denied: bool) -> bool {
        denied || self.include == Include::All
    }

    /// Captures what the request says about itself, once its decision is known.
    /// `uri` is the target as the client sent it, `host` its Host.
    pub fn capture(
        &self,
        parts: &request::Parts,
        uri: &Uri,
        host: Option<HeaderValue>,
        client_ip: IpAddr,
        start: Instant,
    ) -> Box<Event> {
        Box::new(Event {
            start,
            request_id: None,
            method: parts.method.clone(),
            host,
            uri: uri.clone(),
            status: 0,
            duration: Duration::ZERO,
            upstream: None,
            client_ip,
            subject: None,
            decision: Decision::Allow,
            denied_by: None,
            bytes_in: 0,
            bytes_out: 0,
            completed: false,
            headers: self
                .headers
                .iter()
                .map(|h| parts.headers.get(h).cloned())
                .collect(),
        })
    }

    /// Events on the queue, not yet handed to the sinks.
    pub fn queued(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    /// Puts a finished event on the queue, or drops and counts it when the queue is full.
    /// Never waits, and wakes nobody: the dispatcher polls.
    pub fn record(&self, event: Box<Event>) {
        if self.queue.try_send(event).is_err() {
            let m = metrics::global();
            m.audit_dropped.inc();
            if self.full_warning.ready() {
                tracing::warn!(
                    dropped_total = m.audit_dropped.get(),
                    "audit queue full: events are being dropped (raise audit.queue_capacity or check the sinks)"
                );
            }
        }
    }
}

/// Makes file sinks reopen their files (after logrotate moved them), at their next write.
pub fn reopen() {
    if let Some(audit) = get() {
        audit.reopen.fetch_add(1, Relaxed);
    }
}

/// Flushes the queue to every sink within `within`. With a spool, the last part of that
/// time goes to spooling what could not be delivered; whatever is still undelivered then
/// is counted (`outcome="lost"`) and logged with its number. Called once, at shutdown.
pub async fn shutdown(within: Duration) {
    let Some(audit) = get() else { return };
    let dropped = metrics::global().audit_dropped.get();
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "audit events dropped during this run because the queue was full"
        );
    }
    for sink in &audit.sinks {
        let dropped = sink.dropped.get();
        if dropped > 0 {
            tracing::warn!(sink = %sink.name, dropped, "audit events dropped during this run because the sink's buffer was full");
        }
    }
    audit.closing.notify_one();
    let mut workers = std::mem::take(&mut *audit.workers.lock().expect("not poisoned"));
    let reserve = match audit.spool_now {
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
    if let Some(spool_now) = &audit.spool_now {
        spool_now.cancel();
        if tokio::time::timeout(reserve, all_done).await.is_ok() {
            tracing::info!("audit queue flushed; what the sinks did not take in time is spooled");
            return;
        }
    }
    let queued = audit.queued();
    for sink in &audit.sinks {
        let lost = sink.pending.load(Relaxed) + queued as u64;
        if lost > 0 {
            sink.lost.inc_by(lost);
            tracing::error!(sink = %sink.name, lost, "audit events lost: the sink did not take them within shutdown_grace");
        }
    }
}

/// The most of the shutdown time kept for spooling what the sinks did not take.
const SPOOL_RESERVE: Duration = Duration::from_secs(1);

/// How often the dispatcher empties the queue. It polls rather than being woken: a wake
/// per event would cost the request's thread a syscall to unpark the control thread.
const DISPATCH_TICK: Duration = Duration::from_millis(10);

/// Moves events from the queue to every sink's buffer, serializing each once.
async fn dispatch(
    audit: &'static Audit,
    mut rx: mpsc::Receiver<Box<Event>>,
    buffers: Vec<mpsc::Sender<Bytes>>,
) {
    let forward = |event: Box<Event>, clock: &mut WallClock| {
        let json = Bytes::from(event.to_json(&audit.fields, clock));
        for (tx, sink) in buffers.iter().zip(&audit.sinks) {
            match tx.try_send(json.clone()) {
                Ok(()) => {
                    sink.pending.fetch_add(1, Relaxed);
                }
                Err(_) => sink.overflow(),
            }
        }
    };
    let depth = &metrics::global().audit_queue_depth;
    let mut tick = tokio::time::interval(DISPATCH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = audit.closing.notified() => break,
            _ = tick.tick() => {
                depth.set(rx.len() as i64);
                let mut clock = WallClock::now();
                let mut n = 0u32;
                while let Ok(event) = rx.try_recv() {
                    forward(event, &mut clock);
                    n += 1;
                    if n.is_multiple_of(256) {
                        // Let the sinks and the signal handlers in during a burst.
                        tokio::task::yield_now().await;
                    }
                }
            }
        }
    }
    let mut clock = WallClock::now();
    while let Ok(event) = rx.try_recv() {
        forward(event, &mut clock);
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
