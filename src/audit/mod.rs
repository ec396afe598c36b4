//! Audit events: one per request, recorded after the response has been sent (or the
//! client went away), on a bounded in-process queue the request path never waits on.
//!
//! Flow: the proxy's last phase writes an [`Event`] as JSON on the worker, once the
//! response is out, and [`Audit::record`]s the bytes with a `try_send` (a full queue drops
//! and counts them). A dispatcher task only moves bytes, every 10ms while events come (after
//! 100ms without any it sleeps until the next one wakes it): without `spool_dir` it
//! fans each event out to every sink's own bounded buffer, so a slow sink only ever fills
//! its own buffer; with it, it appends the tick's events to every sink's journal
//! ([`spool`]) in one write on the blocking pool, and the sink reads them back from there.
//! Each sink's worker batches (`batch_size`, `flush_interval`) and delivers. The pipeline
//! runs on the runtime it was started on (the server's control thread); blocking writes go
//! to its blocking pool. It is made once per server and survives reloads: `[audit]` is
//! fixed at start.

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
use std::time::{Duration, Instant};

use ::http::{HeaderMap, HeaderName, HeaderValue};
use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use event::{Decision, Event};

use crate::config::audit::{field_name, AuditConfig, Include, SinkKind};
use crate::config::redis::RedisConnection;
use crate::logging::Throttle;
use crate::metrics::Metrics;
use crate::redis_link::Links;
use sink::SinkState;
use spool::Journal;

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
    /// The connection settings of each sink that has them (by sink name), which a reload
    /// replaces: the sink reconnects with them at its next write (a rotated password).
    connections: Vec<(String, Arc<ArcSwap<RedisConnection>>)>,
    closing: Notify,
    /// Set when `spool_dir` is: at shutdown, what cannot be delivered in time is spooled.
    spool_now: Option<CancellationToken>,
    workers: Mutex<JoinSet<()>>,
    full_warning: Throttle,
}

impl Audit {
    /// Starts the dispatcher and one worker per sink on the current tokio runtime, taking
    /// over the journals a previous process left. `shard` is the connection-pool shard of
    /// the thread they run on (sinks that send over HTTP). Fails when a spool directory is
    /// unusable, or, without a spool, when a `file` sink's file cannot be opened for
    /// appending (a missing directory, say): better refused at start than every event lost
    /// after it. With a spool the journal keeps the events until the file can be written.
    pub fn start(
        config: &AuditConfig,
        metrics: &Arc<Metrics>,
        links: &Links,
        shards: usize,
    ) -> Result<Arc<Audit>, String> {
        for sink in config.sinks.iter().filter(|_| config.spool_dir.is_none()) {
            if let SinkKind::File(file) = &sink.kind {
                file::FileWriter::check(&file.path).map_err(|e| {
                    format!(
                        "audit sink {:?}: cannot open {}: {e}",
                        sink.name,
                        file.path.display()
                    )
                })?;
            }
        }
        let mut journals = Vec::with_capacity(config.sinks.len());
        for sink in &config.sinks {
            journals.push(match &config.spool_dir {
                Some(dir) => {
                    let dir = dir.join(&sink.name);
                    let journal = Journal::open(dir.clone(), config.spool_max_bytes.0, &sink.name)
                        .map_err(|e| {
                            format!("cannot open the audit spool {}: {e}", dir.display())
                        })?;
                    if journal.unread() > 0 {
                        tracing::info!(sink = %sink.name, events = journal.unread(), "audit spool from an earlier run: replaying it");
                    }
                    Some(Arc::new(journal))
                }
                None => None,
            });
        }
        if let Some(dir) = &config.spool_dir {
            report_removed_sinks(dir, config);
        }
        let spool_now = CancellationToken::new();
        let (queue, rx) = mpsc::channel(config.queue_capacity);
        let sinks: Vec<Arc<SinkState>> = config
            .sinks
            .iter()
            .map(|s| Arc::new(SinkState::new(&s.name, metrics)))
            .collect();
        let reopen = Arc::new(AtomicU64::new(0));
        let connections: Vec<_> = config
            .sinks
            .iter()
            .filter_map(|sink| match &sink.kind {
                SinkKind::RedisStream(s) => Some((
                    sink.name.clone(),
                    Arc::new(ArcSwap::from_pointee(s.connection())),
                )),
                _ => None,
            })
            .collect();
        let audit = Arc::new(Audit {
            include: config.include,
            headers: config.request_headers.iter().map(|h| h.0.clone()).collect(),
            fields: config.request_headers.iter().map(field_name).collect(),
            queue,
            sinks: sinks.clone(),
            metrics: metrics.clone(),
            queue_dropped: AtomicU64::new(0),
            reopen: reopen.clone(),
            connections,
            closing: Notify::new(),
            spool_now: config.spool_dir.is_some().then(|| spool_now.clone()),
            workers: Mutex::new(JoinSet::new()),
            full_warning: Throttle::default(),
        });
        let mut workers = audit.workers.lock().expect("not poisoned");
        let mut feeds = Vec::with_capacity(sinks.len());
        for ((sink, state), journal) in config.sinks.iter().zip(sinks).zip(&journals) {
            let (tx, rx) = mpsc::channel(config.queue_capacity);
            feeds.push(Feed {
                buffer: tx,
                journal: journal.clone(),
                failed: None,
            });
            let worker = sink::Worker {
                writer: sink::Writer::new(
                    sink,
                    &reopen,
                    audit
                        .connections
                        .iter()
                        .find(|(name, _)| *name == sink.name)
                        .map(|(_, c)| c),
                    shards,
                    metrics,
                    links,
                ),
                rx,
                state,
                batch_size: config.batch_size,
                flush_interval: config.flush_interval.0,
                journal: journal.clone(),
                spool_now: spool_now.clone(),
            };
            workers.spawn(worker.run());
        }
        let journals: Vec<Arc<Journal>> = journals.into_iter().flatten().collect();
        let dispatched = CancellationToken::new();
        if !journals.is_empty() {
            let every = config.fsync_interval.0;
            workers.spawn(sync_journals(journals, every, dispatched.clone()));
        }
        let pace = Pace {
            slowest: SLOW_TICK
                .min(config.flush_interval.0 / 2)
                .max(DISPATCH_TICK),
            many: (config.queue_capacity / 16).max(FEW_EVENTS),
        };
        workers.spawn(dispatch(audit.clone(), rx, feeds, pace, dispatched));
        drop(workers);
        Ok(audit)
    }

    /// Whether a request so decided produces an event.
    #[inline]
    pub fn wants(&self, decision: Decision) -> bool {
        decision == Decision::Deny || self.include == Include::All
    }

    /// The `request_headers` values of a request, to go in its event, read from its head
    /// as the client sent it; nothing is read (or allocated) when none are configured.
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
            if self.full_warning.ready().is_some() {
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

    /// Hands each sink that connects somewhere the connection settings `new` gives the sink
    /// of its name (a reload); it reconnects with them at its next write, reading the files
    /// they name again (a rotated `password_file`, a renewed certificate) even when the
    /// settings are the same.
    pub fn reconnect(&self, new: &AuditConfig) {
        for (name, current) in &self.connections {
            let found = new.sinks.iter().find(|s| &s.name == name);
            if let Some(SinkKind::RedisStream(settings)) = found.map(|s| &s.kind) {
                current.store(Arc::new(settings.connection()));
            }
        }
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

/// How often the dispatcher empties the queue while events come fast. It polls rather
/// than being woken: a wake per event would cost the request's thread a syscall to unpark
/// the control thread.
const DISPATCH_TICK: Duration = Duration::from_millis(10);

/// The longest tick, when events come slowly: a sidecar at a few hundred requests a second
/// would otherwise wake the control thread a hundred times a second (a context switch on
/// a CPU it shares with the app) to move three events each time. Never past half the
/// `flush_interval`, which bounds how late an event may reach its sink.
const SLOW_TICK: Duration = Duration::from_millis(100);

/// Events moved in one tick below which the next tick is twice as long.
const FEW_EVENTS: usize = 64;

/// Empty ticks in a row after which the dispatcher stops polling and sleeps until the next
/// event wakes it: an idle gatehouse then makes no wake-ups for audit (each costs tens of
/// microseconds of a VM's CPU), while any steady traffic keeps the cheaper polling.
const IDLE_AFTER: u32 = 10;

/// How long a sink whose journal could not be written gets its events in memory before
/// the journal is tried again (and only once its buffer is empty, so order holds).
const JOURNAL_RETRY: Duration = Duration::from_secs(1);

/// How the dispatcher's tick follows the rate of events.
struct Pace {
    /// The longest tick.
    slowest: Duration,
    /// Events waiting at a tick from which the next is the shortest again, far below the
    /// queue's capacity so that a burst is moved before the queue fills.
    many: usize,
}

impl Pace {
    /// The tick after one that found `waiting` events: longer while they are few, the
    /// shortest as soon as they are many.
    fn next(&self, tick: Duration, waiting: usize) -> Duration {
        match waiting {
            n if n >= self.many => DISPATCH_TICK,
            n if n < FEW_EVENTS => (tick * 2).min(self.slowest),
            _ => tick,
        }
    }
}

/// Where the dispatcher hands one sink its events.
struct Feed {
    buffer: mpsc::Sender<Bytes>,
    journal: Option<Arc<Journal>>,
    /// When appending to the journal last failed; events go to the buffer meanwhile.
    failed: Option<Instant>,
}

impl Feed {
    /// Whether this tick's events go to the journal.
    fn journals(&self, sink: &SinkState) -> bool {
        self.journal.is_some()
            && self
                .failed
                .is_none_or(|at| at.elapsed() >= JOURNAL_RETRY && sink.pending.load(Relaxed) == 0)
    }

    /// Hands `json` over in memory, or drops and counts it when the buffer is full.
    fn forward(&self, sink: &SinkState, json: Bytes) {
        match self.buffer.try_send(json) {
            Ok(()) => {
                sink.pending.fetch_add(1, Relaxed);
            }
            Err(_) => sink.overflow(),
        }
    }
}

/// Moves events from the queue to every sink: into its journal, or its buffer. Every 10ms
/// the events of the tick are appended to each journal in one write, on the blocking pool.
async fn dispatch(
    audit: Arc<Audit>,
    mut rx: mpsc::Receiver<Bytes>,
    mut feeds: Vec<Feed>,
    pace: Pace,
    dispatched: CancellationToken,
) {
    let journaled = feeds.iter().any(|f| f.journal.is_some());
    let depth = &audit.metrics.audit_queue_depth;
    let mut tick = DISPATCH_TICK;
    let mut closing = false;
    let mut empty_ticks = 0;
    while !closing {
        // The event that woke an idle dispatcher.
        let mut first = None;
        if empty_ticks < IDLE_AFTER {
            tokio::select! {
                biased;
                _ = audit.closing.notified() => closing = true,
                _ = tokio::time::sleep(tick) => {}
            }
        } else {
            tokio::select! {
                biased;
                _ = audit.closing.notified() => closing = true,
                event = rx.recv() => first = event,
            }
            tick = DISPATCH_TICK;
        }
        let waiting = rx.len();
        depth.set(waiting as i64);
        empty_ticks = if first.is_none() && waiting == 0 {
            empty_ticks + 1
        } else {
            0
        };
        tick = pace.next(tick, waiting);
        if journaled {
            journal_tick(&audit, first, &mut rx, &mut feeds).await;
        } else {
            let events = first
                .into_iter()
                .chain(std::iter::from_fn(|| rx.try_recv().ok()));
            for json in events {
                for (feed, sink) in feeds.iter().zip(&audit.sinks) {
                    feed.forward(sink, json.clone());
                }
            }
        }
    }
    depth.set(0);
    for journal in feeds.iter().filter_map(|f| f.journal.as_ref()) {
        journal.close();
    }
    dispatched.cancel();
    // Dropping the buffers' senders lets every sink deliver what it holds and finish.
}

/// Appends `first` and what is on the queue to the journals in one blocking task, and
/// hands them in memory to the sinks whose journal failed.
async fn journal_tick(
    audit: &Audit,
    first: Option<Bytes>,
    rx: &mut mpsc::Receiver<Bytes>,
    feeds: &mut [Feed],
) {
    let mut events = Vec::with_capacity(rx.len() + 1);
    events.extend(first);
    while let Ok(json) = rx.try_recv() {
        events.push(json);
    }
    if events.is_empty() {
        return;
    }
    let targets: Vec<(usize, Arc<Journal>)> = feeds
        .iter()
        .zip(&audit.sinks)
        .enumerate()
        .filter(|(_, (feed, sink))| feed.journals(sink))
        .filter_map(|(i, (feed, _))| Some((i, feed.journal.clone()?)))
        .collect();
    let (events, results) = if targets.is_empty() {
        (events, Vec::new())
    } else {
        tokio::task::spawn_blocking(move || {
            let records = spool::records(&events);
            let n = events.len() as u64;
            let results: Vec<(usize, std::io::Result<u64>)> = targets
                .into_iter()
                .map(|(i, journal)| (i, journal.append(&records, n)))
                .collect();
            (events, results)
        })
        .await
        .expect("appending to the journal does not panic")
    };
    let n = events.len() as u64;
    let mut in_memory = vec![true; feeds.len()];
    for (i, result) in results {
        let (feed, sink) = (&mut feeds[i], &audit.sinks[i]);
        match result {
            Ok(dropped) => {
                in_memory[i] = false;
                sink.spooled.inc_by(n);
                if feed.failed.take().is_some() {
                    tracing::info!(sink = %sink.name, "audit spool writable again: events are journaled again");
                }
                if dropped > 0 {
                    sink.drop_events(dropped);
                    if sink.spool_warning.ready().is_some() {
                        tracing::warn!(sink = %sink.name, dropped, "audit spool over spool_max_bytes: dropped its oldest events");
                    }
                }
            }
            Err(e) => {
                if feed.failed.replace(Instant::now()).is_none() {
                    tracing::error!(sink = %sink.name, error = %e, "audit spool unwritable: its events are handed over in memory until it can be written again (a crash loses them)");
                }
            }
        }
    }
    for ((feed, sink), _) in feeds
        .iter()
        .zip(&audit.sinks)
        .zip(&in_memory)
        .filter(|(_, memory)| **memory)
    {
        if feed.journal.is_some() {
            sink.unspooled.inc_by(n);
        }
        for json in &events {
            feed.forward(sink, json.clone());
        }
    }
}

/// Syncs the journals every `every`, so a machine crash loses at most that much; ends when
/// the dispatcher does (each worker syncs its journal when it stops).
async fn sync_journals(
    journals: Vec<Arc<Journal>>,
    every: Duration,
    dispatched: CancellationToken,
) {
    let warning = Throttle::default();
    loop {
        tokio::select! {
            () = dispatched.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let journals = journals.clone();
        let synced = sink::blocking(move || journals.iter().try_for_each(|j| j.sync())).await;
        if let Err(e) = synced {
            if warning.ready().is_some() {
                tracing::error!(error = %e, "audit spool fsync failed: a machine crash may lose more than fsync_interval of events");
            }
        }
    }
}

/// Logs the spools of sinks no longer configured: kept as they are, never delivered to
/// another sink.
fn report_removed_sinks(dir: &std::path::Path, config: &AuditConfig) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.file_type().is_ok_and(|t| t.is_dir())
            || config.sinks.iter().any(|s| s.name == name)
        {
            continue;
        }
        match spool::backlog(&entry.path()) {
            Ok(b) if b.events > 0 => {
                tracing::warn!(sink = %name, events = b.events, bytes = b.bytes, path = %entry.path().display(), "audit spool of a sink no longer configured: kept, not delivered (configure the sink again to deliver it, or remove the directory)");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(sink = %name, path = %entry.path().display(), error = %e, "audit spool of a sink no longer configured: unreadable, kept");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::tests::TestConfig;

    /// `[audit]` as written in a config file.
    fn audit_config(audit: &str) -> AuditConfig {
        let src = format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n[audit]\n{audit}"
        );
        TestConfig::parse(Path::new("proxy.toml"), &src, &|_| None)
            .unwrap()
            .audit
            .unwrap()
    }

    fn file_sink(name: &str, path: &Path) -> String {
        format!(
            "[[audit.sinks]]\ntype = \"file\"\nname = \"{name}\"\npath = \"{}\"\n",
            path.display()
        )
    }

    /// Puts the event of a request whose id was `id` on the queue, as [`Audit::record`]
    /// does once it has written the JSON: the pipeline only moves bytes, and building an
    /// [`Event`] here would tie these tests to its fields.
    fn record(audit: &Audit, id: &str) {
        let json = format!("{{\"request_id\":\"{id}\"}}");
        audit
            .queue
            .try_send(Bytes::from(json))
            .expect("room on the queue");
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("r{i:04}")).collect()
    }

    /// The request ids of a file sink's events.
    fn ids_in(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let event: serde_json::Value = serde_json::from_str(l).unwrap();
                event["request_id"].as_str().unwrap().to_owned()
            })
            .collect()
    }

    async fn until(what: &str, done: impl Fn() -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        waited
            .await
            .unwrap_or_else(|_| panic!("{what}: not within 10s"));
    }

    #[tokio::test]
    async fn every_sink_gets_every_event_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
        let config = audit_config(&format!(
            "flush_interval = \"10ms\"\n{}{}",
            file_sink("a", &a),
            file_sink("b", &b)
        ));
        let metrics = Arc::new(Metrics::new());
        let audit = Audit::start(&config, &metrics, &Links::default(), 1).unwrap();
        let sent = ids(500);
        for id in &sent {
            record(&audit, id);
        }
        audit.shutdown(Duration::from_secs(5)).await;
        assert_eq!(ids_in(&a), sent);
        assert_eq!(ids_in(&b), sent);
        assert_eq!(metrics.audit_dropped.get(), 0);
    }

    /// After ten empty ticks the dispatcher stops polling; the next event wakes it and is
    /// delivered, journaled or not.
    #[tokio::test]
    async fn an_idle_dispatcher_is_woken_by_the_next_event() {
        for spooled in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let events = dir.path().join("events.jsonl");
            let spool = if spooled {
                format!("spool_dir = \"{}\"\n", dir.path().join("spool").display())
            } else {
                String::new()
            };
            let config = audit_config(&format!(
                "{spool}flush_interval = \"10ms\"\n{}",
                file_sink("audit", &events)
            ));
            let audit =
                Audit::start(&config, &Arc::new(Metrics::new()), &Links::default(), 1).unwrap();
            record(&audit, "r0");
            until("the first event", || ids_in(&events).len() == 1).await;
            // Long enough for the dispatcher to go idle.
            tokio::time::sleep(DISPATCH_TICK * IDLE_AFTER * 3).await;
            record(&audit, "r1");
            until("the event after the idle spell", || {
                ids_in(&events).len() == 2
            })
            .await;
            audit.shutdown(Duration::from_secs(5)).await;
            assert_eq!(ids_in(&events), ["r0", "r1"], "spooled: {spooled}");
        }
    }

    #[tokio::test]
    async fn a_stuck_sink_fills_only_its_own_buffer() {
        // A collector that takes connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/ingest", listener.local_addr().unwrap());
        let collector = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok.jsonl");
        let config = audit_config(&format!(
            "queue_capacity = 10\nbatch_size = 5\nflush_interval = \"10ms\"\n\
             [[audit.sinks]]\ntype = \"http\"\nname = \"stuck\"\nurl = \"{url}\"\ntimeout = \"1h\"\n{}",
            file_sink("ok", &ok)
        ));
        let metrics = Arc::new(Metrics::new());
        let audit = Audit::start(&config, &metrics, &Links::default(), 1).unwrap();
        let sent = ids(200);
        // A queue's worth at a time, each handed on before the next: only the stuck sink's
        // own buffer can overflow.
        for chunk in sent.chunks(10) {
            for id in chunk {
                record(&audit, id);
            }
            until("the chunk handed to the sinks", || {
                audit.queued() == 0 && audit.sinks[1].pending.load(Relaxed) == 0
            })
            .await;
        }
        audit.shutdown(Duration::from_millis(300)).await;
        assert_eq!(ids_in(&ok), sent);
        let stuck = &audit.sinks[0];
        let dropped = stuck.dropped.get();
        assert_eq!(
            metrics.audit_dropped.get(),
            dropped,
            "the other sink dropped nothing"
        );
        // It took a batch (up to 5) and filled its buffer (10); the rest was dropped for it,
        // and what it held is lost at shutdown.
        assert!((185..200).contains(&dropped), "{dropped}");
        assert_eq!(dropped + stuck.lost.get(), 200);
        let text = metrics.encode();
        let line =
            format!("gatehouse_audit_events_total{{sink=\"stuck\",outcome=\"dropped\"}} {dropped}");
        assert!(text.contains(&line), "{text}");
        collector.abort();
    }

    /// A pipeline whose runtime is dropped without a shutdown, as by SIGKILL, and the next
    /// one on the same spool.
    #[test]
    fn the_journal_outlives_a_pipeline_that_was_not_shut_down() {
        let dir = tempfile::tempdir().unwrap();
        // The sink cannot write at first: its file's directory does not exist yet.
        let events = dir.path().join("later").join("events.jsonl");
        let config = audit_config(&format!(
            "spool_dir = \"{}\"\nbatch_size = 5\nflush_interval = \"10ms\"\n{}",
            dir.path().join("spool").display(),
            file_sink("audit", &events)
        ));
        let sent = ids(50);
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        runtime().block_on(async {
            let audit =
                Audit::start(&config, &Arc::new(Metrics::new()), &Links::default(), 1).unwrap();
            for id in &sent {
                record(&audit, id);
            }
            until("every event journaled", || {
                audit.sinks[0].spooled.get() == 50
            })
            .await;
        });
        std::fs::create_dir(events.parent().unwrap()).unwrap();
        runtime().block_on(async {
            let audit =
                Audit::start(&config, &Arc::new(Metrics::new()), &Links::default(), 1).unwrap();
            until("the journal delivered", || ids_in(&events).len() >= 50).await;
            audit.shutdown(Duration::from_secs(5)).await;
        });
        assert_eq!(ids_in(&events), sent);
        let left = std::fs::read_dir(dir.path().join("spool/audit"))
            .unwrap()
            .count();
        assert_eq!(left, 0, "delivered, the journal is emptied");
    }
}
