//! One client connection: HTTP/1.x served by gatehouse's own driver (`protocol::h1::downstream`), HTTP/2 by
//! hyper (h2c prior knowledge detected from the first bytes; under TLS, ALPN decides: see
//! `tls.rs`); its timeouts, and a graceful close when the server drains.
//!
//! The timeouts are checked lazily: the driver and the requests record where the
//! connection is (waiting, reading a head, busy, waiting for body bytes) in plain atomics,
//! and a watchdog task per connection, whose timer ticks a few times per timeout rather
//! than being re-armed per request, compares them. A request costs no clock read and no
//! timer operation for them.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{
    AtomicU64, AtomicU8, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Shared;
use crate::chain::Reject;
use crate::pool::Upgraded;
use crate::protocol::h1::downstream::{self as h1, Phases, Served};
use crate::protocol::h1::request;
use crate::protocol::h2;
use crate::proxy::{Client, ResponseBody};

/// Per-connection settings, fixed at start-up.
pub struct ConnSettings {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
}

/// Where the connection is, as the watchdog reads it.
const IDLE: u8 = 0;
const HEAD: u8 = 1;
const BUSY: u8 = 2;
const BODY: u8 = 3;

/// What the watchdog watches, recorded by the driver and the requests.
#[derive(Default)]
struct Activity {
    phase: AtomicU8,
    /// Bumped at every phase change and request, so the watchdog sees a change it missed.
    changes: AtomicU64,
    reads: AtomicU64,
    requests: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn enter(&self, phase: u8) {
        if self.phase.swap(phase, Relaxed) != phase {
            self.changes.fetch_add(1, Relaxed);
        }
    }
}

/// Everything a request on this connection needs, behind one `Arc`.
struct Conn {
    shared: Arc<Shared>,
    client: Client,
    activity: Activity,
    /// What the watchdog decided: [`SERVE`], [`DRAIN`] or [`CLOSE`].
    verdict: AtomicU8,
    /// The connection's task, for the watchdog to wake.
    wake: AtomicWaker,
}

impl Conn {
    /// The watchdog's verdict, with the connection's task registered to hear a change.
    fn verdict(&self, cx: &Context<'_>) -> u8 {
        // Register before reading, so a verdict stored after the load wakes us.
        self.wake.register(cx.waker());
        self.verdict.load(Acquire)
    }
}

impl Phases for Conn {
    fn idle(&self) {
        self.activity.enter(IDLE);
    }
    fn head(&self) {
        self.activity.enter(HEAD);
    }
    fn busy(&self, reading_body: bool) {
        self.activity.enter(if reading_body { BODY } else { BUSY });
    }
    fn refusal(&self, invalid: request::Invalid) -> Response<Bytes> {
        Reject::from(invalid).render(None, false)
    }
    fn refused(&self, line: &[u8], invalid: request::Invalid, sent: Option<u64>) {
        let reject = Reject::from(invalid);
        let proxy = self.shared.proxy.load_full();
        proxy.refused(&self.client, line, reject.status, reject.reason, sent);
    }
}

/// Verdicts: keep serving; finish the request in flight and close; close now.
const SERVE: u8 = 0;
const DRAIN: u8 = 1;
const CLOSE: u8 = 2;

/// The protocol a connection starts with.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x; `h2c`: the HTTP/2 preface may open it instead (plaintext only).
    Http1 { h2c: bool },
    /// HTTP/2, as ALPN chose.
    Http2,
}

/// Serves one accepted connection (plain TCP, or TLS after the handshake) until it
/// closes, times out, or the server drains.
pub async fn serve<S>(
    stream: S,
    peer: std::net::SocketAddr,
    tls: bool,
    worker: usize,
    shared: Arc<Shared>,
    h2: Arc<http2::Builder<TokioExecutor>>,
    protocol: Protocol,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _open = shared.open_connection();
    let conn = Arc::new(Conn {
        client: Client::new(peer.ip(), tls, worker),
        activity: Activity::default(),
        verdict: AtomicU8::new(SERVE),
        wake: AtomicWaker::new(),
        shared,
    });
    let mut io = Counted {
        inner: stream,
        conn: conn.clone(),
        replay: Bytes::new(),
    };
    let watchdog = tokio::spawn(watch(conn.clone()));
    let http2 = match protocol {
        Protocol::Http2 => preface(&conn, &mut io).await,
        Protocol::Http1 { h2c } => serve_h1(&conn, &mut io, h2c).await == Some(h1::Outcome::Http2),
    };
    if http2 {
        conn.activity.enter(IDLE);
        serve_h2(&conn, io, &h2).await;
    }
    watchdog.abort();
}

/// The HTTP/1 driver, until it closes the connection or finds the HTTP/2 preface. `None`:
/// the watchdog closed it, or the server drains and no request is in flight.
async fn serve_h1<S>(conn: &Arc<Conn>, io: &mut Counted<S>, h2c: bool) -> Option<h1::Outcome>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::new();
    let settings = h1::Settings {
        max_head: conn.shared.conn_settings.max_header_bytes,
        h2c,
    };
    let outcome = {
        let driver = h1::serve(
            io,
            &mut buf,
            &settings,
            &**conn,
            |req, upgrade| call(conn.clone(), req, upgrade),
            || conn.verdict.load(Acquire) != SERVE,
        );
        let mut driver = std::pin::pin!(driver);
        std::future::poll_fn(|cx| {
            let verdict = conn.verdict(cx);
            if verdict == CLOSE {
                return Poll::Ready(None);
            }
            let poll = driver.as_mut().poll(cx);
            // Draining: an idle connection closes now, a busy one after its response.
            if poll.is_pending() && verdict == DRAIN && conn.activity.in_flight.load(Relaxed) == 0 {
                return Poll::Ready(None);
            }
            poll.map(Some)
        })
        .await
    };
    if outcome == Some(h1::Outcome::Http2) {
        io.replay = buf.freeze();
    }
    outcome
}

/// A connection ALPN made HTTP/2 must open with the preface (within
/// `header_read_timeout`), which is kept for hyper.
async fn preface<S>(conn: &Conn, io: &mut Counted<S>) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let timeout = conn.shared.conn_settings.header_read_timeout;
    match h2::downstream::preface(io, timeout).await {
        Some(preface) => {
            io.replay = preface;
            true
        }
        None => false,
    }
}

/// hyper serves the connection as HTTP/2 to its end.
async fn serve_h2<S>(conn: &Arc<Conn>, io: Counted<S>, builder: &http2::Builder<TokioExecutor>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let conn = conn.clone();
        service_fn(move |req: Request<Incoming>| {
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(call(conn, req, None).await) }
        })
    };
    let http = builder.serve_connection(TokioIo::new(io), service);
    let mut http = std::pin::pin!(http);
    let mut draining = false;
    let result = std::future::poll_fn(|cx| {
        match conn.verdict(cx) {
            CLOSE => return Poll::Ready(Ok(())),
            DRAIN if !draining => {
                draining = true;
                http.as_mut().graceful_shutdown();
            }
            _ => {}
        }
        http.as_mut().poll(cx)
    })
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, client = %conn.client.ip, "connection ended with an error");
    }
}

/// Answers one request, whichever protocol read it.
async fn call<B>(
    conn: Arc<Conn>,
    req: Request<B>,
    upgrade: Option<HeaderValue>,
) -> Response<InFlight>
where
    B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
{
    let start = Instant::now();
    conn.activity.requests.fetch_add(1, Relaxed);
    conn.activity.changes.fetch_add(1, Relaxed);
    conn.activity.in_flight.fetch_add(1, Relaxed);
    let proxy = conn.shared.proxy.load_full();
    let resp = if conn.shared.is_refusing() {
        proxy.refuse_draining(req, &conn.client, start)
    } else {
        proxy.handle(req, &conn.client, start, upgrade).await
    };
    resp.map(|body| InFlight { body, conn })
}

/// The response body, holding the connection "busy" until it has been sent or dropped,
/// so a long stream is never taken for an idle connection.
struct InFlight {
    body: ResponseBody,
    conn: Arc<Conn>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conn.activity.in_flight.fetch_sub(1, Relaxed);
        self.conn.activity.changes.fetch_add(1, Relaxed);
    }
}

impl HttpBody for InFlight {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Served for InFlight {
    type Upgraded = Upgraded;

    fn take_upgrade(&mut self) -> Option<Upgraded> {
        self.body.take_upgrade()
    }

    fn tunnel_closed(&mut self, from_client: u64, to_client: u64) {
        self.body.tunnel_closed(from_client, to_client);
    }
}

/// The connection's timeouts and drain, in a task of their own: the connection's own
/// work costs atomic stores instead of timer operations. Stores a verdict and wakes the
/// connection when it must act.
///
/// A connection waiting for its next request is closed after `idle_timeout` (before its
/// first one, after `header_read_timeout`: a client that connects and sends nothing is a
/// slowloris); a request head must be complete within `header_read_timeout` of its first
/// byte; a request body that is being read may go `body_read_timeout` without a byte
/// arriving; a request being served has no other limit here (`upstream.timeout` bounds
/// the wait for the app). The timer ticks every quarter of the shortest timeout, so each
/// closes within a quarter of its length after it passed.
async fn watch(conn: Arc<Conn>) {
    let settings = &conn.shared.conn_settings;
    let shortest = settings
        .header_read_timeout
        .min(settings.idle_timeout)
        .min(settings.body_read_timeout);
    let tick = (shortest / 4).max(Duration::from_millis(10));
    let mut stop = conn.shared.stop.subscribe();
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let a = &conn.activity;
    let mut seen = a.changes.load(Relaxed);
    let mut since = Instant::now();
    let verdict = loop {
        if *stop.borrow_and_update() {
            break DRAIN;
        }
        tokio::select! {
            // A closed channel means the process is exiting: drain as well.
            _ = stop.changed() => break DRAIN,
            _ = ticks.tick() => {
                let now = Instant::now();
                let changes = a.changes.load(Relaxed);
                if changes != seen {
                    seen = changes;
                    since = now;
                    continue;
                }
                let limit = match a.phase.load(Relaxed) {
                    BODY => settings.body_read_timeout,
                    _ if a.in_flight.load(Relaxed) > 0 => continue,
                    IDLE if a.requests.load(Relaxed) > 0 => settings.idle_timeout,
                    IDLE | HEAD => settings.header_read_timeout,
                    _ => continue,
                };
                if now.duration_since(since) >= limit {
                    tracing::debug!(client = %conn.client.ip, phase = a.phase.load(Relaxed), "closing a connection past its timeout");
                    break CLOSE;
                }
            }
        }
    };
    conn.verdict.store(verdict, Release);
    conn.wake.wake();
}

/// The client socket, counting reads for the timeouts.
struct Counted<S> {
    inner: S,
    conn: Arc<Conn>,
    /// Bytes the HTTP/1 driver read but left to the HTTP/2 server, read again first.
    replay: Bytes,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.replay.is_empty() {
            let n = self.replay.len().min(buf.remaining());
            buf.put_slice(&self.replay.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.conn.activity.reads.fetch_add(1, Relaxed);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
