//! Connections to the app and to side services (forward_auth's auth service, JWKS fetches,
//! the audit `http` sink), pooled per [`Endpoint`] in shards (one per worker thread, plus
//! one for the control thread), so a worker never contends with another for a connection.
//! The exchanges themselves are the protocol drivers' (`protocol::h1::upstream`, and
//! hyper's HTTP/2 client in `h2.rs`); this module decides which connection carries a
//! request, bounds how many are open, and takes them back. Idle connections are closed
//! once past the idle timeout by each shard's [`Sweeper`], which requests never touch.

pub mod collector;
mod h2;
mod tls;

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST};
use http::{response, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body as HttpBody;
use http_body_util::{BodyExt, Full, Limited};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

pub use h2::{Body as H2Body, BoxError};
pub use tls::{outbound_url, Trust};

/// A connection to the app, as the HTTP/1 driver runs an exchange on it.
type Conn = upstream::Conn<Stream>;
/// The response body of an HTTP/1 exchange; its connection comes back to the pool at its end.
pub type Body = upstream::Body<Stream, Home>;
/// A connection handed over after `101 Switching Protocols`.
pub type Upgraded = upstream::Upgraded<Stream>;

use crate::protocol::h1::upstream::{self, Failure};
use crate::protocol::h1::{self, header_line, Framing};

/// Idle connections kept per shard; more are closed when they come back.
const MAX_IDLE_PER_SHARD: usize = 1024;

/// Where an endpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl Target {
    /// `host:port` (the `Host` of a request that names no other), `localhost` for a socket.
    fn authority(&self) -> HeaderValue {
        let text = match self {
            Target::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            Target::Tcp { host, port } => format!("{host}:{port}"),
            Target::Unix(_) => "localhost".to_owned(),
        };
        HeaderValue::from_str(&text).expect("a validated host is a valid header value")
    }

    /// The target of an `http[s]://host[:port]/...` URL.
    fn from_uri(uri: &http::Uri) -> Option<Target> {
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        Some(Target::Tcp {
            host: uri.host()?.trim_matches(['[', ']']).to_owned(),
            port: uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
        })
    }
}

/// One origin and its pool of idle connections.
pub struct Endpoint {
    target: Target,
    /// `host:port`, the `Host` of requests that name no other.
    authority: HeaderValue,
    connect_timeout: Duration,
    pool: Arc<Pool>,
    /// Present when requests go to the app over HTTP/2.
    h2: Option<Arc<h2::Pool>>,
    limit: Option<Limit>,
    /// Present for an `https://` side service (never the app).
    tls: Option<tls::Tls>,
}

/// A bound on an endpoint's connections, like Envoy's circuit breakers and nginx's
/// `max_conns`: at most `connections` open at once; a request that finds them all busy
/// waits (up to the connect timeout) for one, unless `max_pending` already wait.
pub struct Limit {
    permits: Arc<Semaphore>,
    max_pending: usize,
    pending: Arc<AtomicUsize>,
    /// Open connections and waiting requests, as gauges.
    open: Gauge,
    waiting: Gauge,
}

impl Limit {
    pub fn new(connections: usize, max_pending: usize, open: Gauge, waiting: Gauge) -> Limit {
        Limit {
            permits: Arc::new(Semaphore::new(connections)),
            max_pending,
            pending: Arc::default(),
            open,
            waiting,
        }
    }
}

/// A connection's place under its endpoint's [`Limit`], given back when it closes.
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// Why no response head came back.
#[derive(Debug)]
pub enum Error {
    /// TCP or Unix connect failed (refused, unreachable), or the TLS handshake did.
    Connect(io::Error),
    /// The connect timeout passed while connecting.
    ConnectTimeout,
    /// The deadline passed before the response head.
    Timeout,
    /// The request body's source failed (it knows why).
    Body,
    /// The peer reset or closed the connection before a response head.
    Reset(io::Error),
    /// The peer sent something that is not an HTTP/1.1 response.
    Invalid(&'static str),
    /// Every connection the [`Limit`] allows was busy, and too many requests waited already
    /// or none came free in time.
    Overloaded,
}

impl Error {
    /// Every [`kind`](Self::kind) of failure that is the peer's doing.
    pub const KINDS: [&'static str; 6] = [
        "connect",
        "connect_timeout",
        "timeout",
        "reset",
        "invalid_response",
        "overloaded",
    ];

    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Connect(_) => "connect",
            Error::ConnectTimeout => "connect_timeout",
            Error::Timeout => "timeout",
            Error::Body => "request_body",
            Error::Reset(_) => "reset",
            Error::Invalid(_) => "invalid_response",
            Error::Overloaded => "overloaded",
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Connect(e) => write!(f, "connect: {e}"),
            Error::ConnectTimeout => f.write_str("connect timed out"),
            Error::Timeout => f.write_str("no response in time"),
            Error::Body => f.write_str("the request body failed"),
            Error::Reset(e) => write!(f, "connection closed: {e}"),
            Error::Invalid(why) => write!(f, "invalid response: {why}"),
            Error::Overloaded => f.write_str("every allowed connection is busy"),
        }
    }
}

impl std::error::Error for Error {}

/// The answer: a response whose body is still to be read, or a switch of protocols whose
/// connection now belongs to the caller.
pub enum Answer {
    Response(response::Parts, Body),
    Upgrade(response::Parts, Upgraded),
}

impl Endpoint {
    /// `shards`: one per thread that sends (the workers and the control thread).
    pub fn new(
        target: Target,
        connect_timeout: Duration,
        idle_timeout: Duration,
        shards: usize,
    ) -> Endpoint {
        Endpoint {
            authority: target.authority(),
            target,
            connect_timeout,
            pool: Arc::new(Pool {
                shards: (0..shards.max(1)).map(|_| Shard::default()).collect(),
                idle_timeout,
                waiting: None,
            }),
            h2: None,
            limit: None,
            tls: None,
        }
    }

    /// The endpoint of a side service's URL (one [`outbound_url`] accepts), over TLS for
    /// `https://`, verified against the roots of `trust`.
    pub fn for_url(
        url: &http::Uri,
        trust: &Trust,
        connect_timeout: Duration,
        idle_timeout: Duration,
        shards: usize,
    ) -> Endpoint {
        let target = Target::from_uri(url).expect("validated: an http(s) URL with a host");
        let mut endpoint = Endpoint::new(target, connect_timeout, idle_timeout, shards);
        if url.scheme() == Some(&http::uri::Scheme::HTTPS) {
            let host = url.host().expect("validated: a URL with a host");
            endpoint.tls = Some(tls::Tls::new(host, trust));
            if url.port_u16().is_none_or(|p| p == 443) {
                // The default port goes unsaid, as browsers send it.
                endpoint.authority =
                    HeaderValue::from_str(host).expect("a validated host is a valid header value");
            }
        }
        endpoint
    }

    /// Sends requests over HTTP/2 with prior knowledge (see [`Endpoint::send_h2`]); the
    /// HTTP/1.1 pool stays for upgrades and side channels.
    pub fn with_h2(mut self) -> Endpoint {
        self.h2 = Some(Arc::new(h2::Pool::new(
            self.pool.shards.len(),
            self.pool.idle_timeout,
        )));
        self
    }

    /// Bounds the endpoint's connections.
    pub fn with_limit(mut self, limit: Limit) -> Endpoint {
        Arc::get_mut(&mut self.pool)
            .expect("a new endpoint's pool is its own")
            .waiting = Some(limit.pending.clone());
        self.limit = Some(limit);
        self
    }

    pub fn authority(&self) -> &HeaderValue {
        &self.authority
    }

    /// Sends a request and waits (until `deadline`) for the response head. `encode` writes
    /// the head for the body's framing (it may be called again if a stale pooled
    /// connection forces a retry). `upgrade`: the request asks to switch protocols, so a
    /// `101` hands the connection over; to any other request a `101` is an invalid answer
    /// (the connection is closed), or the app could open a tunnel past the chain. Returns
    /// the answer and when it came: the caller's clock reads serve the pool and the
    /// timeout too, instead of each reading its own.
    #[allow(clippy::too_many_arguments)]
    pub async fn send<B, F>(
        &self,
        shard: usize,
        method: &Method,
        upgrade: bool,
        encode: F,
        body: &mut B,
        sent: Instant,
        deadline: Instant,
    ) -> (Result<Answer, Error>, Instant)
    where
        B: HttpBody<Data = Bytes> + Unpin,
        F: Fn(Framing, &mut Vec<u8>),
    {
        let result = self
            .exchange(shard, method, upgrade, encode, body, sent, deadline)
            .await;
        let answered = Instant::now();
        let result = result.map(|(head, conn)| {
            if head.parts.status == StatusCode::SWITCHING_PROTOCOLS {
                Answer::Upgrade(head.parts, conn.upgraded())
            } else {
                let home = Home {
                    pool: self.pool.clone(),
                    shard,
                    answered,
                };
                let body = Body::new(conn, &head, home);
                Answer::Response(head.parts, body)
            }
        });
        (result, answered)
    }

    /// Sends the request on a pooled (or new) connection and reads the response head.
    #[allow(clippy::too_many_arguments)]
    async fn exchange<B, F>(
        &self,
        shard: usize,
        method: &Method,
        upgrade: bool,
        encode: F,
        body: &mut B,
        sent: Instant,
        deadline: Instant,
    ) -> Result<(h1::response::Head, Conn), Error>
    where
        B: HttpBody<Data = Bytes> + Unpin,
        F: Fn(Framing, &mut Vec<u8>),
    {
        let deadline = tokio::time::Instant::from_std(deadline);
        let framing = if body.is_end_stream() {
            Framing::Empty
        } else {
            body.size_hint()
                .exact()
                .map_or(Framing::Chunked, Framing::Length)
        };
        loop {
            let (mut conn, reused) = match self.pool.checkout(shard, sent).await {
                Some(conn) => (conn, true),
                // Boxed: connecting is rare, and its future would otherwise be carried
                // (and copied) by every request's future.
                None => {
                    let slot = self.slot().await?;
                    match tokio::time::timeout_at(deadline, Box::pin(self.connect(slot))).await {
                        Ok(conn) => (conn?, false),
                        Err(_) => return Err(Error::Timeout),
                    }
                }
            };
            encode(framing, conn.head());
            let exchange = conn.exchange(method, upgrade, framing, body);
            let head = match tokio::time::timeout_at(deadline, exchange).await {
                Err(_) => return Err(Error::Timeout),
                Ok(Ok(head)) => head,
                // A stale pooled connection that the peer cannot have acted on: try another.
                Ok(Err(Failure::Stale(_))) if reused => continue,
                Ok(Err(Failure::Stale(e) | Failure::Reset(e))) => return Err(Error::Reset(e)),
                Ok(Err(Failure::Body)) => return Err(Error::Body),
                Ok(Err(Failure::Invalid(why))) => return Err(Error::Invalid(why)),
            };
            return Ok((head, conn));
        }
    }

    /// Opens (and drops) one connection: the readiness probe of `[admin] upstream_check`.
    pub async fn probe(&self) -> Result<(), Error> {
        self.connect(None).await.map(drop)
    }

    /// Room for one more connection under the [`Limit`], if there is one: at once, by
    /// closing an idle connection, or after waiting for a busy one to close.
    async fn slot(&self) -> Result<Option<Slot>, Error> {
        let Some(limit) = &self.limit else {
            return Ok(None);
        };
        let slot = |permit| {
            limit.open.inc();
            Some(Slot {
                _permit: permit,
                open: limit.open.clone(),
            })
        };
        let taken = limit.permits.clone().try_acquire_owned().ok().or_else(|| {
            // All taken: an idle connection (of any shard) can give its place.
            self.pool
                .close_one_idle()
                .then(|| limit.permits.clone().try_acquire_owned().ok())
                .flatten()
        });
        if let Some(permit) = taken {
            return Ok(slot(permit));
        }
        if limit.pending.fetch_add(1, Relaxed) >= limit.max_pending {
            limit.pending.fetch_sub(1, Relaxed);
            return Err(Error::Overloaded);
        }
        limit.waiting.inc();
        let waited =
            tokio::time::timeout(self.connect_timeout, limit.permits.clone().acquire_owned()).await;
        limit.waiting.dec();
        limit.pending.fetch_sub(1, Relaxed);
        match waited {
            Ok(Ok(permit)) => Ok(slot(permit)),
            _ => Err(Error::Overloaded),
        }
    }

    async fn connect(&self, slot: Option<Slot>) -> Result<Conn, Error> {
        Ok(Conn::new(self.connect_stream(slot).await?))
    }

    /// A TCP (no delay) or Unix socket to the endpoint, within the connect timeout.
    async fn connect_stream(&self, slot: Option<Slot>) -> Result<Stream, Error> {
        let connect = async {
            Ok::<_, io::Error>(match &self.target {
                Target::Tcp { host, port } => {
                    let stream = TcpStream::connect((host.as_str(), *port)).await?;
                    stream.set_nodelay(true)?;
                    Socket::Tcp(stream)
                }
                Target::Unix(path) => Socket::Unix(UnixStream::connect(path).await?),
            })
        };
        let handshake = async {
            let socket = connect.await.map_err(Error::Connect)?;
            match (&self.tls, socket) {
                (Some(tls), Socket::Tcp(tcp)) => tls
                    .connector()
                    .connect(tls.name().clone(), tcp)
                    .await
                    .map(|s| Socket::Tls(Box::new(s)))
                    // A failed handshake is a failed connect, in words saying why.
                    .map_err(|e| Error::Connect(io::Error::other(tls::describe(&e, tls.name())))),
                (_, socket) => Ok(socket),
            }
        };
        let socket = tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| Error::ConnectTimeout)??;
        Ok(Stream {
            socket,
            _slot: slot,
        })
    }

    /// A whole small exchange for a side channel: `req` (its URI's path and query, its
    /// headers, and `Host` if it has none) within `timeout`, the answer's body collected
    /// up to `max_body` bytes. The error says what failed, for a log line.
    pub async fn fetch(
        &self,
        shard: usize,
        req: Request<Bytes>,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Response<Bytes>, String> {
        let (parts, bytes) = req.into_parts();
        let encode = |framing: Framing, out: &mut Vec<u8>| {
            out.extend_from_slice(parts.method.as_str().as_bytes());
            out.push(b' ');
            let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            out.extend_from_slice(target.as_bytes());
            out.extend_from_slice(b" HTTP/1.1\r\n");
            if !parts.headers.contains_key(HOST) {
                header_line(out, b"host", self.authority.as_bytes());
            }
            for (name, value) in &parts.headers {
                if name != CONTENT_LENGTH {
                    header_line(out, name.as_str().as_bytes(), value.as_bytes());
                }
            }
            match framing {
                Framing::Length(n) => header_line(
                    out,
                    b"content-length",
                    itoa::Buffer::new().format(n).as_bytes(),
                ),
                _ if parts.method == Method::POST || parts.method == Method::PUT => {
                    out.extend_from_slice(b"content-length: 0\r\n")
                }
                _ => {}
            }
            out.extend_from_slice(b"\r\n");
        };
        let mut body = Full::new(bytes);
        let now = Instant::now();
        let exchange = async {
            let (answer, _) = self
                .send(
                    shard,
                    &parts.method,
                    false,
                    encode,
                    &mut body,
                    now,
                    now + timeout,
                )
                .await;
            let answer = answer.map_err(|e| match e {
                Error::Timeout => format!("no answer within {timeout:?}"),
                e => e.to_string(),
            });
            let Answer::Response(head, body) = answer? else {
                unreachable!("a request that asks for no upgrade is never answered with one")
            };
            let bytes = Limited::new(body, max_body)
                .collect()
                .await
                .map_err(|e| format!("response body: {e}"))?
                .to_bytes();
            Ok(Response::from_parts(head, bytes))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
    }
}

/// A connection's socket, holding its place under the endpoint's [`Limit`] until it closes.
pub struct Stream {
    socket: Socket,
    _slot: Option<Slot>,
}

enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// Boxed: the TLS state is large, and only side services have it.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// Readable while idle means the peer closed it (or sent garbage): either way,
    /// unusable. Tokio's cached readiness answers without a system call.
    fn poll_idle_alive(&self, cx: &mut Context<'_>) -> bool {
        let readable = match &self.socket {
            Socket::Tcp(s) => s.poll_read_ready(cx),
            Socket::Unix(s) => s.poll_read_ready(cx),
            Socket::Tls(s) => s.get_ref().0.poll_read_ready(cx),
        };
        readable.is_pending()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().socket {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().socket {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().socket {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
            Socket::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().socket {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Where a response body takes its connection back: its endpoint's pool, in the shard it
/// came from, idle since its response head arrived.
pub struct Home {
    pool: Arc<Pool>,
    shard: usize,
    answered: Instant,
}

impl upstream::Recycle<Stream> for Home {
    fn recycle(self, conn: Conn) {
        self.pool.checkin(self.shard, conn, self.answered);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A shard's idle connections, in the order they came back, each with the time it went
/// idle, and the sweeper that closes them once they pass it.
#[derive(Default)]
struct Shard {
    idle: Mutex<VecDeque<(Conn, Instant)>>,
    sweeper: Sweeper,
}

/// Idle connections of one endpoint.
struct Pool {
    shards: Box<[Shard]>,
    idle_timeout: Duration,
    /// Requests waiting for a connection under the limit: while any wait, a connection
    /// coming back is closed rather than kept idle, so its place goes to them.
    waiting: Option<Arc<AtomicUsize>>,
}

impl Pool {
    fn shard(&self, shard: usize) -> &Shard {
        &self.shards[shard % self.shards.len()]
    }

    /// The most recently used live connection, as of `now`.
    async fn checkout(&self, shard: usize, now: Instant) -> Option<Conn> {
        loop {
            // The lock is released before any await.
            let (conn, since) = lock(&self.shard(shard).idle).pop_back()?;
            if now.saturating_duration_since(since) <= self.idle_timeout
                && poll_fn(|cx| Poll::Ready(conn.io().poll_idle_alive(cx))).await
            {
                return Some(conn);
            }
        }
    }

    /// Pools `conn`, idle since `since`: the time its last response head arrived, which
    /// is never later than when the peer started its keep-alive timer, so a connection is
    /// retired early rather than late (a long stream makes its connection retire at once).
    fn checkin(self: &Arc<Self>, shard: usize, conn: Conn, since: Instant) {
        if self.waiting.as_ref().is_some_and(|w| w.load(Relaxed) > 0) {
            return;
        }
        let shard = shard % self.shards.len();
        let mut idle = lock(&self.shards[shard].idle);
        // The oldest connections sit at the front: drop those past their idle time.
        while idle
            .front()
            .is_some_and(|(_, oldest)| since.saturating_duration_since(*oldest) > self.idle_timeout)
        {
            idle.pop_front();
        }
        if idle.len() >= MAX_IDLE_PER_SHARD {
            return;
        }
        idle.push_back((conn, since));
        let first = idle.len() == 1;
        drop(idle);
        // Only a sweeper that found the shard empty waits to hear of a connection.
        if first {
            self.shards[shard].sweeper.wake(self, shard);
        }
    }

    /// Closes the oldest idle connection of any shard; false when none is idle.
    fn close_one_idle(&self) -> bool {
        self.shards.iter().any(|shard| {
            let closed = lock(&shard.idle).pop_front();
            closed.is_some()
        })
    }

    /// Idle connections in `shard`, for tests.
    #[cfg(test)]
    fn idle(&self, shard: usize) -> usize {
        self.shard(shard).idle.lock().unwrap().len()
    }
}

impl Sweep for Pool {
    fn expire(&self, shard: usize, now: Instant) -> Option<Instant> {
        let mut idle = lock(&self.shard(shard).idle);
        // Not only the front: a connection that streamed long comes back already old.
        idle.retain(|(_, since)| now.saturating_duration_since(*since) <= self.idle_timeout);
        idle.iter()
            .map(|(_, since)| *since + self.idle_timeout)
            .min()
    }
}

/// A pool, as its sweepers see it.
trait Sweep: Send + Sync + 'static {
    /// Closes the connections of `shard` past their idle time as of `now`; returns when to
    /// look again, `None` when the shard holds no connection.
    fn expire(&self, shard: usize, now: Instant) -> Option<Instant>;
}

/// The task that closes a shard's connections once idle past the idle timeout, so a shard
/// no request comes to does not keep them open (and counted) forever. The first connection
/// the shard pools starts it on that thread, the shard's own: it closes connections where
/// they were made, sharing nothing with other workers. It sleeps until the next one
/// expires; with none left it waits, with no timer, until a request pools one in the empty
/// shard and wakes it (requests never arm its timer). It holds its pool only while it
/// sweeps, so a pool that a reload replaced is freed when its last request ends.
#[derive(Default)]
struct Sweeper(OnceLock<Arc<Notify>>);

impl Sweeper {
    /// Tells the sweeper of `pool`'s `shard` that the shard holds a connection again,
    /// starting it the first time.
    fn wake<P: Sweep>(&self, pool: &Arc<P>, shard: usize) {
        self.0
            .get_or_init(|| {
                let wake = Arc::new(Notify::new());
                tokio::spawn(sweep(Arc::downgrade(pool), shard, wake.clone()));
                wake
            })
            .notify_one();
    }
}

impl Drop for Sweeper {
    /// The pool is gone: a sweeper waiting for a connection ends.
    fn drop(&mut self) {
        if let Some(wake) = self.0.get() {
            wake.notify_one();
        }
    }
}

async fn sweep<P: Sweep>(pool: Weak<P>, shard: usize, wake: Arc<Notify>) {
    loop {
        // The pool is held only for this statement, never across the wait.
        let next = match pool.upgrade() {
            Some(pool) => pool.expire(shard, Instant::now()),
            None => return,
        };
        match next {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => wake.notified().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    /// What the test app does with the `n`th request (counted from 0 across connections).
    #[derive(Clone, Copy)]
    enum Script {
        /// Answer every request, keeping connections alive.
        Answer,
        /// Answer the first request of each connection, then close the connection on the
        /// next one without a word: a keep-alive race the client must survive.
        CloseSecond,
    }

    /// A small HTTP/1.1 app on loopback; returns its endpoint and the connection count.
    async fn app(script: Script) -> (Endpoint, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Relaxed);
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    for served in 0.. {
                        // Read a head (these requests have no body).
                        let mut line = String::new();
                        loop {
                            line.clear();
                            if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        if matches!(script, Script::CloseSecond) && served == 1 {
                            return;
                        }
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.get_mut().write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let target = Target::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let endpoint = Endpoint::new(target, Duration::from_secs(5), Duration::from_secs(60), 2);
        (endpoint, connections)
    }

    async fn get(endpoint: &Endpoint, method: Method) -> Result<Response<Bytes>, String> {
        let req = Request::builder()
            .method(method)
            .uri("/x")
            .body(Bytes::new())
            .unwrap();
        endpoint.fetch(0, req, Duration::from_secs(10), 1024).await
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_is_read() {
        let (endpoint, connections) = app(Script::Answer).await;
        for _ in 0..3 {
            let resp = get(&endpoint, Method::GET).await.unwrap();
            assert_eq!(resp.body(), "ok");
        }
        assert_eq!(connections.load(Relaxed), 1);
        assert_eq!(endpoint.pool.idle(0), 1);
        assert_eq!(
            endpoint.pool.idle(1),
            0,
            "shards keep their own connections"
        );
    }

    #[tokio::test]
    async fn a_stale_connection_is_retried_only_for_a_replayable_request() {
        let (endpoint, connections) = app(Script::CloseSecond).await;
        get(&endpoint, Method::GET).await.unwrap();
        // The pooled connection is closed by the app when the next request arrives: a GET
        // goes again on a fresh connection.
        let resp = get(&endpoint, Method::GET).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(connections.load(Relaxed), 2);
        // A POST cannot be sent twice: the same race is an error.
        let error = get(&endpoint, Method::POST).await.unwrap_err();
        assert!(error.contains("connection closed"), "{error}");
        assert_eq!(connections.load(Relaxed), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_past_its_time_is_not_used() {
        let (endpoint, connections) = app(Script::Answer).await;
        get(&endpoint, Method::GET).await.unwrap();
        assert_eq!(endpoint.pool.idle(0), 1);
        // As of a minute from now, the pooled connection is past the idle timeout.
        let later = Instant::now() + Duration::from_secs(61);
        assert!(endpoint.pool.checkout(0, later).await.is_none());
        assert_eq!(endpoint.pool.idle(0), 0, "an expired connection is dropped");
        get(&endpoint, Method::GET).await.unwrap();
        assert_eq!(connections.load(Relaxed), 2);
    }

    /// Polls `done` every 10 ms for up to 10 s.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        waited
            .await
            .unwrap_or_else(|_| panic!("{what}: not within 10s"));
    }

    /// An endpoint for the app of `endpoint` keeping idle connections for `idle`, its open
    /// connections counted in the returned gauge.
    fn with_idle_timeout(endpoint: &Endpoint, idle: Duration) -> (Endpoint, Gauge) {
        let open = Gauge::default();
        let endpoint = Endpoint::new(endpoint.target.clone(), Duration::from_secs(5), idle, 2)
            .with_limit(Limit::new(8, 8, open.clone(), Gauge::default()));
        (endpoint, open)
    }

    #[tokio::test]
    async fn idle_connections_are_closed_past_the_idle_timeout_with_no_request_to_notice() {
        let (app, connections) = app(Script::Answer).await;
        let (endpoint, open) = with_idle_timeout(&app, Duration::from_millis(300));
        // Two connections at once, both pooled in shard 0.
        let (a, b) = tokio::join!(get(&endpoint, Method::GET), get(&endpoint, Method::GET));
        a.unwrap();
        b.unwrap();
        assert_eq!(connections.load(Relaxed), 2);
        until("the idle connections closed", || {
            endpoint.pool.idle(0) == 0 && open.get() == 0
        })
        .await;
        // The pool works on: the next request opens a new connection, closed in turn.
        get(&endpoint, Method::GET).await.unwrap();
        assert_eq!(connections.load(Relaxed), 3);
        until("the new one closed too", || open.get() == 0).await;
    }

    #[tokio::test]
    async fn a_sweeper_does_not_keep_its_pool_alive() {
        let (app, _) = app(Script::Answer).await;
        let (endpoint, open) = with_idle_timeout(&app, Duration::from_secs(60));
        get(&endpoint, Method::GET).await.unwrap();
        assert_eq!(endpoint.pool.idle(0), 1);
        // Let the sweeper start and go to sleep until the connection expires.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let pool = Arc::downgrade(&endpoint.pool);
        drop(endpoint);
        assert!(pool.upgrade().is_none(), "the sweeper holds its pool");
        assert_eq!(open.get(), 0, "the dropped pool's connection is closed");
    }

    #[tokio::test]
    async fn a_response_body_cut_short_is_an_error_and_its_connection_is_not_pooled() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort")
                .await;
        });
        let target = Target::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let endpoint = Endpoint::new(target, Duration::from_secs(5), Duration::from_secs(60), 1);
        let error = get(&endpoint, Method::GET).await.unwrap_err();
        assert!(error.contains("response body"), "{error}");
        assert_eq!(endpoint.pool.idle(0), 0);
    }
}
