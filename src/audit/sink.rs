//! A sink's worker: takes events from its own buffer, batches them, delivers, counts.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use super::settings::SinkKind;
use super::{file, http, stdout, Throttle};
use crate::metrics;

/// What the dispatcher, the worker and shutdown share about one sink.
pub struct SinkState {
    pub name: Arc<str>,
    /// Events accepted into the buffer and not yet delivered or counted as failed.
    pub pending: AtomicU64,
    delivered: Counter,
    failed: Counter,
    dropped: Counter,
    pub lost: Counter,
    overflow_warning: Throttle,
}

impl SinkState {
    pub fn new(name: &str) -> SinkState {
        let name: Arc<str> = name.into();
        let m = metrics::global();
        SinkState {
            delivered: m.audit_events(&name, "delivered"),
            failed: m.audit_events(&name, "failed"),
            dropped: m.audit_events(&name, "dropped"),
            lost: m.audit_events(&name, "lost"),
            pending: AtomicU64::new(0),
            overflow_warning: Throttle::default(),
            name,
        }
    }

    /// The sink's buffer was full: this sink misses the event, the others do not.
    pub fn overflow(&self) {
        self.dropped.inc();
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
}

impl Writer {
    pub fn new(kind: &SinkKind) -> Writer {
        match kind {
            SinkKind::Stdout => Writer::Stdout,
            SinkKind::File(s) => Writer::File(file::FileWriter::new(s.path.clone())),
            SinkKind::Http(s) => Writer::Http(Box::new(http::HttpWriter::new(s))),
        }
    }

    async fn deliver(&mut self, batch: &[Bytes]) -> Result<(), String> {
        match self {
            Writer::Stdout => stdout::write(json_lines(batch))
                .await
                .map_err(|e| e.to_string()),
            Writer::File(f) => f.write(json_lines(batch)).await.map_err(|e| e.to_string()),
            Writer::Http(h) => h.write(batch).await,
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

/// Delivers batches of up to `batch_size` events, each sent at most `flush_interval` after
/// its first event arrived, until the buffer closes and is empty.
pub async fn run(
    mut writer: Writer,
    mut rx: mpsc::Receiver<Bytes>,
    state: Arc<SinkState>,
    batch_size: usize,
    flush_interval: Duration,
) {
    let mut batch = Vec::with_capacity(batch_size);
    while rx.recv_many(&mut batch, batch_size).await > 0 {
        let deadline = tokio::time::Instant::now() + flush_interval;
        while batch.len() < batch_size {
            let room = batch_size - batch.len();
            let more = rx.recv_many(&mut batch, room);
            match tokio::time::timeout_at(deadline, more).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        match writer.deliver(&batch).await {
            Ok(()) => state.settle(batch.len(), &state.delivered),
            Err(e) => {
                tracing::warn!(sink = %state.name, events = batch.len(), error = %e, "audit sink failed to deliver a batch");
                state.settle(batch.len(), &state.failed);
            }
        }
        batch.clear();
    }
}
