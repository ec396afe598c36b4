//! The server: listener, worker threads, signals, reload and graceful drain.
//!
//! Workers are thread-per-core: each runs a single-threaded tokio runtime that accepts
//! from the shared listening socket and serves its connections start to finish, with its
//! own shard of every connection pool, so no request crosses a thread. The main thread
//! runs a small control runtime for signals, reloads, the admin listener, the audit
//! pipeline and the chain's background tasks.

mod conn;
mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{watch, Notify};

use crate::admin::{self, Health};
use crate::audit::Audit;
use crate::config::{ReadyRequirement, Scheduling};
use crate::middleware::{Handles, Kept};
use crate::proxy::Proxy;
use crate::trace::Tracer;
use crate::Config;
use conn::{ConnSettings, Protocol};

/// State every worker and the control thread share.
pub struct Shared {
    /// The current config generation; swapped whole on reload.
    pub proxy: ArcSwap<Proxy>,
    /// What every generation is built with: metrics, state kept across reloads.
    handles: Arc<Handles>,
    /// The audit pipeline, fixed at start.
    audit: Option<Arc<Audit>>,
    /// The span exporter, fixed at start.
    tracer: Option<Arc<Tracer>>,
    /// Set after `shutdown_delay`: new requests get 503, nothing new reaches the upstream.
    refusing: AtomicBool,
    /// `true` tells workers to stop accepting and connections to close gracefully.
    stop: watch::Sender<bool>,
    connections: AtomicUsize,
    all_closed: Notify,
    conn_settings: ConnSettings,
    /// What `/readyz` reports.
    health: Arc<Health>,
}

impl Shared {
    fn is_refusing(&self) -> bool {
        self.refusing.load(Ordering::Relaxed)
    }

    /// Counts a connection as open until the guard drops.
    fn open_connection(self: &Arc<Self>) -> OpenConnection {
        self.connections.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self.clone())
    }
}

struct OpenConnection(Arc<Shared>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if self.0.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.all_closed.notify_waiters();
        }
    }
}

/// Why `run` could not start.
#[derive(Debug)]
pub struct StartError(pub String);

/// Binds, serves until SIGTERM/SIGINT, drains, and returns. Errors are start-up failures.
pub fn run(config: Config) -> Result<(), StartError> {
    // First, so that every thread made after it (runtimes, workers) inherits the policy.
    schedule(config.server.scheduling);
    // The control runtime exists before the chain is built: middlewares spawn their
    // background work on it (key refreshes, file reloads), at start and on every reload.
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StartError(format!("cannot start the control runtime: {e}")))?;
    let _control = control.enter();
    // Before anything can be seen from outside (a bound port, a replayed spool): a SIGTERM
    // that comes while gatehouse starts is a drain, not the default death.
    let signals = Signals::install()
        .map_err(|e| StartError(format!("cannot install the signal handlers: {e}")))?;
    let workers = config.workers();
    let handles = Arc::new(Handles {
        metrics: Arc::default(),
        kept: Kept::default(),
        runtime: Some(control.handle().clone()),
        workers,
        read_only: false,
        redis: crate::redis_link::Links::default(),
        trust: crate::pool::Trust::default(),
    });
    // Pool shards: one per worker, then the control thread's.
    let audit = match &config.audit {
        Some(audit) => Some(
            Audit::start(audit, &handles.metrics, &handles.redis, workers + 1)
                .map_err(StartError)?,
        ),
        None => None,
    };
    let tracer = config
        .tracing
        .as_ref()
        .map(|t| Tracer::start(t, &handles.metrics, workers + 1));
    let listener = bind(config.server.listen.0)
        .map_err(|e| StartError(format!("cannot listen on {}: {e}", config.server.listen.0)))?;
    let tls = match &config.server.tls {
        Some(tls) => Some(
            tls::setup(tls)
                .map_err(|e| StartError(format!("cannot load the TLS certificate: {e}")))?,
        ),
        None => None,
    };
    let (tls, rotation) = tls.unzip();
    let admin_listener = match &config.admin {
        Some(admin) => Some(
            bind(admin.listen.0)
                .and_then(tokio::net::TcpListener::from_std)
                .map_err(|e| {
                    StartError(format!("cannot listen on {} (admin): {e}", admin.listen.0))
                })?,
        ),
        None => None,
    };
    let health = Arc::new(Health::new(
        config
            .admin
            .as_ref()
            .is_some_and(|a| a.ready_requires.contains(&ReadyRequirement::Redis))
            .then(|| handles.redis.clone()),
    ));
    let shared = Arc::new(Shared {
        proxy: ArcSwap::from_pointee(Proxy::new(&config, &handles, audit.clone(), tracer.clone())),
        handles,
        audit,
        tracer,
        refusing: AtomicBool::new(false),
        stop: watch::channel(false).0,
        connections: AtomicUsize::new(0),
        all_closed: Notify::new(),
        conn_settings: ConnSettings {
            header_read_timeout: config.server.header_read_timeout.0,
            body_read_timeout: config.server.body_read_timeout.0,
            idle_timeout: config.server.idle_timeout.0,
            max_header_bytes: config.server.max_header_bytes.0 as usize,
        },
        health,
    });
    if let Some(listener) = admin_listener {
        tokio::spawn(admin::serve(
            listener,
            shared.health.clone(),
            shared.handles.metrics.clone(),
        ));
    }
    if let Some(every) = config.admin.as_ref().and_then(|a| a.upstream_check) {
        let probed = shared.clone();
        tokio::spawn(admin::check_upstream(
            shared.health.clone(),
            every.0,
            move || {
                // The current generation's upstream, so a reloaded url is probed.
                let proxy = probed.proxy.load_full();
                async move {
                    let probe = proxy.upstream().probe().await;
                    probe.map_err(|e| e.to_string())
                }
            },
        ));
    }

    for index in 0..workers {
        let listener = listener
            .try_clone()
            .map_err(|e| StartError(format!("cannot share the listener: {e}")))?;
        let shared = shared.clone();
        let tls = tls.clone();
        std::thread::Builder::new()
            .name(format!("gatehouse-w{index}"))
            .spawn(move || worker(index, listener, shared, tls))
            .map_err(|e| StartError(format!("cannot start worker thread: {e}")))?;
    }
    // Only the workers hold the socket now: when they stop accepting, it closes.
    drop(listener);

    let chain: Vec<String> = shared
        .proxy
        .load()
        .chain()
        .links()
        .iter()
        .map(|l| l.name.to_string())
        .collect();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        listen = %config.server.listen.0,
        tls = tls.is_some(),
        admin = %config.admin.as_ref().map_or("off".to_owned(), |a| a.listen.0.to_string()),
        upstream = %config.upstream.url,
        workers,
        ?chain,
        "gatehouse started"
    );

    control.block_on(control_loop(config, shared, signals, rotation));
    // An audit sink stuck in a blocking write (a full pipe) must not hold up the exit.
    drop(_control);
    control.shutdown_background();
    Ok(())
}

/// A worker thread: accepts and serves until told to stop, then lets its connections finish.
fn worker(
    index: usize,
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    tls: Option<tls::Tls>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a worker runtime starts");
    runtime.block_on(async move {
        let listener =
            tokio::net::TcpListener::from_std(listener).expect("the listener is non-blocking");
        let h2 = Arc::new(crate::protocol::h2::downstream::builder(shared.conn_settings.max_header_bytes));
        let mut stop = shared.stop.subscribe();
        loop {
            tokio::select! {
                biased;
                _ = stop.wait_for(|stop| *stop) => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let (shared, h2) = (shared.clone(), h2.clone());
                        match &tls {
                            None => tokio::spawn(conn::serve(stream, peer, false, index, shared, h2, Protocol::Http1 { h2c: true })),
                            Some(tls) => tokio::spawn(tls::serve(tls.clone(), stream, peer, index, shared, h2)),
                        };
                    }
                    Err(e) => {
                        // Out of file descriptors, usually: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        // Connections finish on this runtime; the control thread ends the process.
        std::future::pending::<()>().await
    })
}

/// How often the TLS certificate files are compared with the served certificate.
const CERT_POLL: Duration = Duration::from_secs(2);

/// The signals the control loop acts on.
struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

/// Waits for signals: SIGHUP reloads, SIGTERM/SIGINT drain; follows the certificate files.
/// Returns when drained.
async fn control_loop(
    mut config: Config,
    shared: Arc<Shared>,
    signals: Signals,
    mut rotation: Option<tls::Rotation>,
) {
    let Signals {
        mut hup,
        mut term,
        mut int,
    } = signals;
    let mut cert_poll = tokio::time::interval(CERT_POLL);
    cert_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = hup.recv() => {
                if let Some(new) = reload(&config, &shared) {
                    config = new;
                }
                if let (Some(rotation), Some(tls)) = (&mut rotation, &config.server.tls) {
                    rotation.refresh(tls, true);
                }
            }
            _ = cert_poll.tick(), if rotation.is_some() => {
                if let (Some(rotation), Some(tls)) = (&mut rotation, &config.server.tls) {
                    rotation.refresh(tls, false);
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // Readiness goes first, so endpoints are updated during shutdown_delay.
    shared.health.set_draining();
    let (delay, grace) = (
        config.server.shutdown_delay.0,
        config.server.shutdown_grace.0,
    );
    tracing::info!(shutdown_delay = ?delay, shutdown_grace = ?grace, "draining: still serving for shutdown_delay");
    let second_signal = async {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    };
    tokio::pin!(second_signal);
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = &mut second_signal => exit_now(),
    }

    shared.refusing.store(true, Ordering::Relaxed);
    shared.stop.send_replace(true);
    let open = shared.connections.load(Ordering::Acquire);
    tracing::info!(
        open_connections = open,
        "stopped accepting; waiting for in-flight requests"
    );
    let drained = async {
        loop {
            let notified = shared.all_closed.notified();
            if shared.connections.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    };
    // One shutdown_grace for both the requests in flight and the audit queue.
    let deadline = tokio::time::Instant::now() + grace;
    tokio::select! {
        _ = drained => tracing::info!("drained; flushing the audit queue and exiting"),
        _ = tokio::time::sleep_until(deadline) => {
            tracing::warn!(open_connections = shared.connections.load(Ordering::Acquire), "shutdown_grace passed; closing the remaining connections");
        }
        _ = &mut second_signal => exit_now(),
    }
    // What is left of the grace, but never so little that a ready batch can't be written.
    let left = deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .max(AUDIT_FLUSH_FLOOR);
    let flush = async {
        let audit = async {
            if let Some(audit) = &shared.audit {
                audit.shutdown(left).await;
            }
        };
        let spans = async {
            if let Some(tracer) = &shared.tracer {
                tracer.shutdown(left).await;
            }
        };
        tokio::join!(audit, spans);
    };
    tokio::select! {
        _ = flush => {}
        _ = &mut second_signal => exit_now(),
    }
}

/// The least time the audit queue and the span exporter get at shutdown, even when
/// draining used all the grace.
const AUDIT_FLUSH_FLOOR: Duration = Duration::from_millis(250);

fn exit_now() -> ! {
    tracing::warn!("second signal: exiting without waiting");
    std::process::exit(1)
}

/// Re-reads the config; a valid one serves new requests, an invalid one is logged.
fn reload(config: &Config, shared: &Shared) -> Option<Config> {
    // logrotate sends SIGHUP after moving the audit files away, whatever the config says.
    if let Some(audit) = &shared.audit {
        audit.reopen();
    }
    let loaded = Config::load(&config.file);
    shared.handles.metrics.config_reload(loaded.is_ok());
    match loaded {
        Ok(new) => {
            for (key, changed) in [
                ("server.listen", new.server.listen != config.server.listen),
                (
                    "server.workers",
                    new.server.workers != config.server.workers,
                ),
                (
                    "server.scheduling",
                    new.server.scheduling != config.server.scheduling,
                ),
                ("admin", new.admin != config.admin),
                (
                    "server.tls",
                    new.server.tls.is_some() != config.server.tls.is_some(),
                ),
                (
                    "audit",
                    match (&config.audit, &new.audit) {
                        (Some(old), Some(new)) => old.needs_restart_for(new),
                        (old, new) => old.is_some() != new.is_some(),
                    },
                ),
                ("tracing", new.tracing != config.tracing),
            ] {
                if changed {
                    tracing::warn!(key, "changed in the file, but only takes effect on restart");
                }
            }
            if let (Some(audit), Some(settings)) = (&shared.audit, &new.audit) {
                audit.reconnect(settings);
            }
            let proxy = Proxy::new(
                &new,
                &shared.handles,
                shared.audit.clone(),
                shared.tracer.clone(),
            );
            shared.proxy.store(Arc::new(proxy));
            tracing::info!(file = %config.file.display(), "config reloaded: {}", new.middleware.iter().map(|m| m.name.as_str()).chain(["proxy"]).collect::<Vec<_>>().join(" → "));
            Some(new)
        }
        Err(e) => {
            tracing::error!(error = %e, "config reload failed; the running config stays");
            None
        }
    }
}

/// Applies `server.scheduling` to the calling thread, which threads it makes later inherit.
fn schedule(policy: Scheduling) {
    #[cfg(target_os = "linux")]
    if policy == Scheduling::Batch {
        // The system call, not libc's wrapper: musl's (the static build's) refuses with
        // ENOSYS, as POSIX means it for a whole process and Linux does it per thread.
        // SAFETY: `sched_param` is plain integers (musl adds some beside the priority), for
        // which all zeros is valid; the kernel reads it only during the call; pid 0 is this
        // thread.
        let set = unsafe {
            let param: libc::sched_param = std::mem::zeroed();
            libc::syscall(libc::SYS_sched_setscheduler, 0, libc::SCHED_BATCH, &param)
        };
        if set != 0 {
            let error = std::io::Error::last_os_error();
            tracing::warn!(%error, "server.scheduling = \"batch\" could not be applied; the default policy stays");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = policy;
}

/// The listening socket, shared by all workers: whichever worker is free accepts next.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}
