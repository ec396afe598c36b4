//! A sink's worker: takes events from its own buffer, batches them, delivers, counts.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::spool::Journal;
use super::{file, http, otlp, redis_stream, stdout};
use crate::config::audit::{SinkConfig, SinkKind};
use crate::config::redis::RedisConnection;
use crate::logging::Throttle;
use crate::metrics::Metrics;
use crate::redis_link::Links;

/// What the dispatcher, the worker and shutdown share about one sink.
pub struct SinkState {
    pub name: Arc<str>,
    /// Events accepted into the buffer and not yet delivered or counted as failed.
    pub pending: AtomicU64,
    delivered: Counter,
    failed: Counter,
    /// Events appended to the sink's journal.
    pub spooled: Counter,
    /// Events handed over in memory because the journal could not be written.
    pub unspooled: Counter,
    /// Events lost for this sink to a full buffer (also in `gatehouse_audit_dropped_total`).
    pub dropped: Counter,
    pub lost: Counter,
    /// `gatehouse_audit_dropped_total`.
    all_dropped: Counter,
    overflow_warning: Throttle,
    /// For the journal's trouble: dropped events, a failing cursor.
    pub spool_warning: Throttle,
}

impl SinkState {
    pub fn new(name: &str, m: &Metrics) -> SinkState {
        let name: Arc<str> = name.into();
        SinkState {
            delivered: m.audit_events(&name, "delivered"),
            failed: m.audit_events(&name, "failed"),
            spooled: m.audit_events(&name, "spooled"),
            unspooled: m.audit_events(&name, "unspooled"),
            dropped: m.audit_events(&name, "dropped"),
            lost: m.audit_events(&name, "lost"),
            all_dropped: m.audit_dropped.clone(),
            pending: AtomicU64::new(0),
            overflow_warning: Throttle::default(),
            spool_warning: Throttle::default(),
            name,
        }
    }

    /// Counts `n` events this sink lost to a full buffer (its channel, or its spool's bound).
    pub fn drop_events(&self, n: u64) {
        self.dropped.inc_by(n);
        self.all_dropped.inc_by(n);
    }

    /// The sink's buffer was full: this sink misses the event, the others do not.
    pub fn overflow(&self) {
        self.drop_events(1);
        if self.overflow_warning.ready().is_some() {
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
    /// `reopen` is the SIGHUP generation file sinks follow; `connection` the settings a
    /// connecting sink follows across reloads; `shards` the connection-pool shards (the
    /// last one is the control thread's, where sinks run).
    pub fn new(
        sink: &SinkConfig,
        reopen: &Arc<AtomicU64>,
        connection: Option<&Arc<ArcSwap<RedisConnection>>>,
        shards: usize,
        metrics: &Arc<Metrics>,
        links: &Links,
    ) -> Writer {
        match &sink.kind {
            SinkKind::Stdout => Writer::Stdout,
            SinkKind::File(s) => Writer::File(file::FileWriter::new(s.path.clone(), reopen)),
            SinkKind::Http(s) => Writer::Http(Box::new(http::HttpWriter::new(s, shards))),
            SinkKind::RedisStream(s) => Writer::Redis(Box::new(redis_stream::RedisWriter::new(
                &sink.name,
                s,
                connection
                    .expect("a redis_stream sink has its connection")
                    .clone(),
                metrics.clone(),
                links,
            ))),
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

/// One sink's worker and what it writes with.
pub struct Worker {
    pub writer: Writer,
    /// Events handed over in memory: all of them without a spool, and with one only while
    /// the journal cannot be written.
    pub rx: mpsc::Receiver<Bytes>,
    pub state: Arc<SinkState>,
    pub batch_size: usize,
    pub flush_interval: Duration,
    /// The sink's journal (with `spool_dir`). Its events are older than any in memory: the
    /// dispatcher goes back to the journal only once memory is empty.
    pub journal: Option<Arc<Journal>>,
    /// Fired at shutdown when time runs out: stop delivering, leave the rest in the journal.
    pub spool_now: CancellationToken,
}

impl Worker {
    /// Delivers batches of up to `batch_size` events, each sent at most `flush_interval`
    /// after its first event arrived, until no more can come. Journaled batches are retried
    /// every `flush_interval` until the sink takes them, then acknowledged.
    pub async fn run(mut self) {
        let mut batch = Vec::with_capacity(self.batch_size);
        loop {
            if let Some(journal) = self.journal.clone().filter(|j| j.unread() > 0) {
                if !self.deliver_from_journal(&journal).await {
                    return self.stop(false).await;
                }
                continue;
            }
            match self.fill_from_memory(&mut batch).await {
                Some(true) => {
                    self.settle(&batch).await;
                    batch.clear();
                }
                Some(false) => {}
                None => return self.stop(true).await,
            }
        }
    }

    /// Fills `batch` from memory; `Some(false)` when the journal grew first, `None` once
    /// the dispatcher is gone and nothing is left.
    async fn fill_from_memory(&mut self, batch: &mut Vec<Bytes>) -> Option<bool> {
        let first = self.rx.recv_many(batch, self.batch_size);
        let got = match &self.journal {
            None => first.await,
            Some(journal) => tokio::select! {
                biased;
                got = first => got,
                () = journal.grew() => return Some(false),
            },
        };
        if got == 0 {
            // The dispatcher closed the journal before dropping the buffer.
            return match &self.journal {
                Some(journal) if journal.unread() > 0 => Some(false),
                _ => None,
            };
        }
        let deadline = tokio::time::Instant::now() + self.flush_interval;
        while batch.len() < self.batch_size {
            let room = self.batch_size - batch.len();
            let more = self.rx.recv_many(batch, room);
            match tokio::time::timeout_at(deadline, more).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        Some(true)
    }

    /// Delivers a batch from memory and counts the outcome: a failed one is lost.
    async fn settle(&mut self, batch: &[Bytes]) {
        let n = batch.len();
        match self.deliver(batch).await {
            Ok(()) => self.state.settle(n, &self.state.delivered),
            Err(error) => {
                if self.spool_now.is_cancelled() {
                    // Shutdown ran out of time: counted as lost when the worker stops.
                    return;
                }
                tracing::warn!(sink = %self.state.name, events = n, error, "audit sink failed to deliver a batch");
                self.state.settle(n, &self.state.failed);
            }
        }
    }

    /// Takes a batch from the journal once it is full or `flush_interval` has passed (at
    /// once when closing), and delivers it. `false` when shutdown abandoned it.
    async fn deliver_from_journal(&mut self, journal: &Arc<Journal>) -> bool {
        let deadline = tokio::time::Instant::now() + self.flush_interval;
        while !journal.is_closed() && journal.unread() < self.batch_size as u64 {
            if tokio::time::timeout_at(deadline, journal.grew())
                .await
                .is_err()
            {
                break;
            }
        }
        let (j, max) = (journal.clone(), self.batch_size);
        let taken = tokio::task::spawn_blocking(move || j.take(max))
            .await
            .expect("reading the journal does not panic");
        if taken.events.is_empty() {
            return true;
        }
        let n = taken.events.len();
        let mut failures = 0u32;
        while let Err(error) = self.deliver(&taken.events).await {
            if self.spool_now.is_cancelled() {
                return false;
            }
            if failures == 0 {
                tracing::warn!(sink = %self.state.name, events = n, error, "audit sink failed to deliver a batch; spooling it: it stays in the journal and is retried every flush_interval");
            } else {
                tracing::debug!(sink = %self.state.name, events = n, error, "audit spool delivery failed again; retrying later");
            }
            failures += 1;
            tokio::select! {
                () = tokio::time::sleep(self.flush_interval) => {}
                () = self.spool_now.cancelled() => return false,
            }
        }
        self.state.delivered.inc_by(n as u64);
        let (j, end) = (journal.clone(), taken.end);
        if let Err(e) = blocking(move || j.ack(end)).await {
            if self.state.spool_warning.ready().is_some() {
                tracing::warn!(sink = %self.state.name, error = %e, "cannot move the audit spool's cursor: after a restart, delivered events may be delivered again");
            }
        }
        true
    }

    /// One delivery; with a journal to fall back on, it gives up when shutdown runs out of time.
    async fn deliver(&mut self, batch: &[Bytes]) -> Result<(), String> {
        let spool_now = self.spool_now.clone();
        tokio::select! {
            biased;
            _ = spool_now.cancelled(), if self.journal.is_some() => Err("shutting down".into()),
            result = self.writer.deliver(batch) => result,
        }
    }

    /// The end of the worker: when everything was delivered its journal is emptied, else
    /// what it holds is synced, and what memory held is counted as lost.
    async fn stop(self, delivered_all: bool) {
        let Some(journal) = self.journal else {
            return;
        };
        let lost = self.state.pending.swap(0, Relaxed);
        if lost > 0 {
            self.state.lost.inc_by(lost);
            tracing::error!(sink = %self.state.name, lost, "audit events lost: the sink did not take them within shutdown_grace and the spool could not be written");
        }
        let result = blocking(move || match delivered_all {
            true => journal.finish(),
            false => journal.sync(),
        })
        .await;
        if let Err(e) = result {
            tracing::error!(sink = %self.state.name, error = %e, "audit spool: cannot finish it at shutdown");
        }
    }
}
