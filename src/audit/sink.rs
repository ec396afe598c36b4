//! A sink's worker: takes events from its own buffer, batches them, delivers, counts.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::spool::Spool;
use super::{file, http, otlp, redis_stream, stdout, Throttle};
use crate::config::audit::SinkKind;
use crate::metrics::Metrics;

/// What the dispatcher, the worker and shutdown share about one sink.
pub struct SinkState {
    pub name: Arc<str>,
    /// Events accepted into the buffer and not yet delivered or counted as failed.
    pub pending: AtomicU64,
    delivered: Counter,
    failed: Counter,
    spooled: Counter,
    /// Events lost for this sink to a full buffer (also in `gatehouse_audit_dropped_total`).
    pub dropped: Counter,
    pub lost: Counter,
    /// `gatehouse_audit_dropped_total`.
    all_dropped: Counter,
    overflow_warning: Throttle,
}

impl SinkState {
    pub fn new(name: &str, m: &Metrics) -> SinkState {
        let name: Arc<str> = name.into();
        SinkState {
            delivered: m.audit_events(&name, "delivered"),
            failed: m.audit_events(&name, "failed"),
            spooled: m.audit_events(&name, "spooled"),
            dropped: m.audit_events(&name, "dropped"),
            lost: m.audit_events(&name, "lost"),
            all_dropped: m.audit_dropped.clone(),
            pending: AtomicU64::new(0),
            overflow_warning: Throttle::default(),
            name,
        }
    }

    /// Counts `n` events this sink lost to a full buffer (its channel, or its spool's bound).
    fn drop_events(&self, n: u64) {
        self.dropped.inc_by(n);
        self.all_dropped.inc_by(n);
    }

    /// The sink's buffer was full: this sink misses the event, the others do not.
    pub fn overflow(&self) {
        self.drop_events(1);
        if self.overflow_warning.ready() {
            tracing::warn!(sink = %self.name, dropped_total = self.dropped.get(), "audit sink too slow: its buffer is full and events are dropped for it");
        }
    }

    fn settle(&self, n: usize, counter: &Counter) {
        counter.inc_by(n as u64);
        self.pending.fetch_sub(n as u64, Relaxed);
    }
}

/// Where a sink writes.
pub enum Writer {
    Stdout,
    File(file::FileWriter),
    Http(Box<http::HttpWriter>),
    Redis(Box<redis_stream::RedisWriter>),
    Otlp(Box<otlp::OtlpWriter>),
}

impl Writer {
    /// `reopen` is the SIGHUP generation file sinks follow; `shards` the connection-pool
    /// shards (the last one is the control thread's, where sinks run).
    pub fn new(kind: &SinkKind, reopen: &Arc<AtomicU64>, shards: usize) -> Writer {
        match kind {
            SinkKind::Stdout => Writer::Stdout,
            SinkKind::File(s) => Writer::File(file::FileWriter::new(s.path.clone(), reopen)),
            SinkKind::Http(s) => Writer::Http(Box::new(http::HttpWriter::new(s, shards))),
            SinkKind::RedisStream(s) => Writer::Redis(Box::new(redis_stream::RedisWriter::new(s))),
            SinkKind::Otlp(s) => Writer::Otlp(Box::new(otlp::OtlpWriter::new(s, shards))),
        }
    }

    async fn deliver(&mut self, batch: &[Bytes]) -> Result<(), String> {
        match self {
            Writer::Stdout => stdout::write(json_lines(batch))
                .await
                .map_err(|e| e.to_string()),
            Writer::File(f) => f.write(json_lines(batch)).await.map_err(|e| e.to_string()),
            Writer::Http(h) => h.write(batch).await,
            Writer::Redis(r) => r.write(batch).await,
            Writer::Otlp(o) => o.write(batch).await,
        }
    }
}

/// The batch as JSON lines, one event per line, for one write.
fn json_lines(batch: &[Bytes]) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.iter().map(|b| b.len() + 1).sum());
    for event in batch {
        out.extend_from_slice(event);
        out.push(b'\n');
    }
    out
}

/// Runs `blocking` on the blocking pool: file and pipe writes may stall, the runtime must not.
pub(super) async fn blocking<T: Send + 'static>(
    blocking: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(blocking)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// A sink's spool, shared with the blocking pool that does its disk work.
type SharedSpool = Arc<Mutex<Spool>>;

/// Runs `work` on the spool, off the runtime (it writes and fsyncs).
async fn on_spool<R: Send + 'static>(
    spool: &SharedSpool,
    work: impl FnOnce(&mut Spool) -> std::io::Result<R> + Send + 'static,
) -> std::io::Result<R> {
    let spool = spool.clone();
    blocking(move || work(&mut spool.lock().expect("not poisoned"))).await
}

fn backlog(spool: Option<&SharedSpool>) -> bool {
    spool.is_some_and(|s| !s.lock().expect("not poisoned").is_empty())
}

/// One sink's worker and what it writes with.
pub struct Worker {
    pub writer: Writer,
    pub rx: mpsc::Receiver<Bytes>,
    pub state: Arc<SinkState>,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub spool: Option<Spool>,
    /// Fired at shutdown when time runs out: stop delivering, spool what is left.
    pub spool_now: CancellationToken,
}

impl Worker {
    /// Delivers batches of up to `batch_size` events, each sent at most `flush_interval`
    /// after its first event arrived, until the buffer closes and is empty. With a spool,
    /// a batch that fails goes to disk, and while the spool holds anything new batches
    /// queue behind it, so events arrive in order; it is retried every `flush_interval`.
    pub async fn run(mut self) {
        let spool = self.spool.take().map(|s| Arc::new(Mutex::new(s)));
        let spool = spool.as_ref();
        self.replay(spool).await;
        let mut batch = Vec::with_capacity(self.batch_size);
        loop {
            let first = self.rx.recv_many(&mut batch, self.batch_size);
            let got = if backlog(spool) {
                tokio::time::timeout(self.flush_interval, first).await.ok()
            } else {
                Some(first.await)
            };
            let closed = got == Some(0);
            if !closed && got.is_some() {
                let deadline = tokio::time::Instant::now() + self.flush_interval;
                while batch.len() < self.batch_size {
                    let room = self.batch_size - batch.len();
                    let more = self.rx.recv_many(&mut batch, room);
                    match tokio::time::timeout_at(deadline, more).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            }
            if !batch.is_empty() {
                self.settle(&batch, spool).await;
                batch.clear();
            }
            self.replay(spool).await;
            if closed {
                return;
            }
        }
    }

    /// Delivers a batch, or spools it; counts the outcome.
    async fn settle(&mut self, batch: &[Bytes], spool: Option<&SharedSpool>) {
        let n = batch.len();
        let error = match spool {
            Some(spool) if backlog(Some(spool)) => String::new(),
            _ => match self.deliver(batch, spool.is_some()).await {
                Ok(()) => return self.state.settle(n, &self.state.delivered),
                Err(e) => e,
            },
        };
        let Some(spool) = spool else {
            tracing::warn!(sink = %self.state.name, events = n, error, "audit sink failed to deliver a batch");
            return self.state.settle(n, &self.state.failed);
        };
        if !error.is_empty() {
            tracing::warn!(sink = %self.state.name, events = n, error, "audit sink failed to deliver a batch; spooling it");
        }
        let owned = batch.to_vec();
        match on_spool(spool, move |s| s.append(&owned)).await {
            Ok(dropped) => {
                self.state.settle(n, &self.state.spooled);
                if dropped > 0 {
                    self.state.drop_events(dropped);
                    tracing::warn!(sink = %self.state.name, dropped, "audit spool over spool_max_bytes: dropped its oldest events");
                }
            }
            Err(e) => {
                tracing::error!(sink = %self.state.name, events = n, error = %e, "audit spool write failed: events lost");
                self.state.settle(n, &self.state.failed);
            }
        }
    }

    /// Delivers spooled batches, oldest first, until the spool is empty or one fails.
    async fn replay(&mut self, spool: Option<&SharedSpool>) {
        let Some(spool) = spool else { return };
        while backlog(Some(spool)) && !self.spool_now.is_cancelled() {
            let decoded = match on_spool(spool, |s| s.oldest().expect("not empty")).await {
                Ok(decoded) => decoded,
                Err(e) => {
                    tracing::error!(sink = %self.state.name, error = %e, "unreadable audit spool file: skipped");
                    let _ = on_spool(spool, Spool::remove_oldest).await;
                    continue;
                }
            };
            if decoded.torn {
                tracing::warn!(sink = %self.state.name, intact = decoded.events.len(), "audit spool file ends in a torn record (a crash while writing): replaying its intact records, skipping the rest");
            }
            if !decoded.events.is_empty() {
                if let Err(error) = self.deliver(&decoded.events, true).await {
                    tracing::debug!(sink = %self.state.name, error, "audit spool replay failed; retrying later");
                    return;
                }
                self.state.delivered.inc_by(decoded.events.len() as u64);
            }
            if let Err(e) = on_spool(spool, Spool::remove_oldest).await {
                tracing::error!(sink = %self.state.name, error = %e, "cannot remove a replayed audit spool file");
                return;
            }
        }
    }

    /// One delivery; with a spool to fall back on, it gives up when shutdown runs out of time.
    async fn deliver(&mut self, batch: &[Bytes], abortable: bool) -> Result<(), String> {
        let spool_now = self.spool_now.clone();
        tokio::select! {
            biased;
            _ = spool_now.cancelled(), if abortable => Err("shutting down".into()),
            result = self.writer.deliver(batch) => result,
        }
    }
}
