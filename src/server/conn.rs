//! One client connection: HTTP/1.1 served by gatehouse's own fast path (`h1.rs`) until a
//! request needs hyper, which then serves the rest, HTTP/1.1 or HTTP/2 (h2c prior knowledge
//! detected from the first bytes; under TLS, ALPN decides: see `tls.rs`); the slow-header
//! and idle timeouts, and a graceful close when the server drains.
//!
//! The timeouts are checked lazily: the connection's IO and requests bump plain counters,
//! and a watchdog task per connection, whose timer is re-armed once per period rather
//! than per request, compares them. A request costs no clock read and no timer operation.

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
use http::{Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{h1, Shared};
use crate::proxy::{Body, Client, ClientBody};
use crate::{audit, metrics};

/// Per-connection settings, fixed at start-up.
pub struct ConnSettings {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Builds the hyper connection builder every connection of a worker uses.
pub fn builder(max_header_bytes: usize) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // Heads up to max_header_bytes are parsed and then refused with SPEC's JSON 431 by
    // the proxy; hyper's own (bodiless) 431 only meets heads far past the limit.
    b.http1()
        .max_buf_size((max_header_bytes * 2).max(64 << 10))
        .header_read_timeout(None)
        // Most API responses are small: one contiguous write of head and body measured
        // cheaper than a two-part vectored write.
        .writev(false)
        .keep_alive(true);
    b.http2().max_header_list_size(max_header_bytes as u32);
    b
}

/// What the driver watches, bumped by the IO and the service.
#[derive(Default)]
struct Activity {
    reads: AtomicU64,
    requests: AtomicU64,
    in_flight: AtomicUsize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Snapshot {
    reads: u64,
    requests: u64,
    in_flight: usize,
}

impl Activity {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            reads: self.reads.load(Relaxed),
            requests: self.requests.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
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

/// Verdicts: keep serving; finish the request in flight and close; close now.
const SERVE: u8 = 0;
const DRAIN: u8 = 1;
const CLOSE: u8 = 2;

/// Serves one accepted connection (plain TCP, or TLS after the handshake) until it
/// closes, times out, or the server drains. `fast_h1`: start on the HTTP/1.1 fast path
/// (not for a connection ALPN made HTTP/2).
pub async fn serve<S>(
    stream: S,
    peer: std::net::SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    fast_h1: bool,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _open = shared.open_connection();
    let conn = Arc::new(Conn {
        client: Client::new(peer.ip(), tls),
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
    if !fast_h1 || serve_fast(&conn, &mut io).await == Some(h1::Outcome::HandOver) {
        serve_hyper(&conn, io, &builder).await;
    }
    watchdog.abort();
}

/// The fast path, until it closes the connection or hands it over. `None`: the
/// watchdog closed it, or the server drains and no request is in flight.
async fn serve_fast<S>(conn: &Arc<Conn>, io: &mut Counted<S>) -> Option<h1::Outcome>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::new();
    let outcome = {
        let fast = h1::serve(
            io,
            &mut buf,
            |req| call(conn.clone(), req),
            || conn.verdict.load(Acquire) != SERVE,
        );
        let mut fast = std::pin::pin!(fast);
        std::future::poll_fn(|cx| {
            let verdict = conn.verdict(cx);
            if verdict == CLOSE {
                return Poll::Ready(None);
            }
            let poll = fast.as_mut().poll(cx);
            // Draining: an idle connection closes now, a busy one after its response.
            if poll.is_pending() && verdict == DRAIN && conn.activity.in_flight.load(Relaxed) == 0 {
                return Poll::Ready(None);
            }
            poll.map(Some)
        })
        .await
    };
    if outcome == Some(h1::Outcome::HandOver) {
        io.replay = buf.freeze();
    }
    outcome
}

/// hyper serves the connection to its end.
async fn serve_hyper<S>(conn: &Arc<Conn>, io: Counted<S>, builder: &auto::Builder<TokioExecutor>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let conn = conn.clone();
        service_fn(move |req: Request<Incoming>| {
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(call(conn, req.map(Some)).await) }
        })
    };
    let http = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
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

/// Answers one request, whichever path read it.
async fn call(conn: Arc<Conn>, req: Request<ClientBody>) -> Response<InFlight> {
    let start = Instant::now();
    conn.activity.requests.fetch_add(1, Relaxed);
    conn.activity.in_flight.fetch_add(1, Relaxed);
    let proxy = conn.shared.proxy.load_full();
    let (resp, audit) = if conn.shared.is_refusing() {
        proxy.refuse_draining(req, &conn.client, start)
    } else {
        proxy.handle(req, &conn.client, start).await
    };
    let status = resp.status();
    resp.map(|body| InFlight {
        body,
        conn,
        status,
        start,
        audit,
    })
}

/// The connection's timeouts and drain, in a task of their own: the connection's own
/// poll (once per read, write and request) then costs one atomic load instead of a
/// timer and a channel poll. Stores a verdict and wakes the connection when it must act.
async fn watch(conn: Arc<Conn>) {
    let settings = &conn.shared.conn_settings;
    let mut stop = conn.shared.stop.subscribe();
    let timer = tokio::time::sleep(settings.header_read_timeout);
    let mut timer = std::pin::pin!(timer);
    let mut seen = conn.activity.snapshot();
    let mut head_pending = false;
    let verdict = loop {
        if *stop.borrow_and_update() {
            break DRAIN;
        }
        tokio::select! {
            // A closed channel means the process is exiting: drain as well.
            _ = stop.changed() => break DRAIN,
            _ = timer.as_mut() => {
                let now = conn.activity.snapshot();
                let next = if now.in_flight > 0 || now.requests != seen.requests {
                    head_pending = false;
                    settings.idle_timeout
                } else if now.reads != seen.reads && !head_pending {
                    // Bytes came but no complete head: one more header_read_timeout at most.
                    head_pending = true;
                    settings.header_read_timeout
                } else {
                    tracing::debug!(client = %conn.client.ip, slow_header = head_pending, "closing an idle connection");
                    break CLOSE;
                };
                seen = now;
                timer.as_mut().reset(tokio::time::Instant::now() + next);
            }
        }
    };
    conn.verdict.store(verdict, Release);
    conn.wake.wake();
}

/// The response body, holding the connection "busy" until it has been sent or dropped,
/// so a long stream is never taken for an idle connection. Its end is the request's end
/// for metrics and for the audit event, which counts the body bytes sent on the way.
struct InFlight {
    body: Body,
    conn: Arc<Conn>,
    status: StatusCode,
    start: Instant,
    audit: Option<Box<audit::Event>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conn.activity.in_flight.fetch_sub(1, Relaxed);
        let end = Instant::now();
        metrics::global().record_request(self.status.as_u16(), end - self.start);
        if let Some(mut event) = self.audit.take() {
            // hyper stops polling a body that says it ended, so its last frame may be
            // the end without a `None` ever being seen.
            event.completed |= self.body.is_end_stream();
            event.finish(end);
            if let Some(audit) = audit::get() {
                audit.record(event);
            }
        }
    }
}

impl HttpBody for InFlight {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, std::io::Error>>> {
        let poll = Pin::new(&mut self.body).poll_frame(cx);
        if let Some(event) = self.audit.as_deref_mut() {
            match &poll {
                Poll::Ready(Some(Ok(frame))) => {
                    event.bytes_out += frame.data_ref().map_or(0, |d| d.len() as u64);
                }
                Poll::Ready(None) => event.completed = true,
                _ => {}
            }
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client socket, counting reads for the timeouts.
struct Counted<S> {
    inner: S,
    conn: Arc<Conn>,
    /// Bytes the fast path read but left to hyper, read again first.
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
