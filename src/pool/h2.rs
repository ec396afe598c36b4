//! HTTP/2 to the app (`upstream.protocol = "h2c"`, prior knowledge), over hyper's HTTP/2
//! client (`protocol::h2::upstream`): connections pooled per worker shard like the HTTP/1 ones, each carrying many
//! requests at once, up to the app's `SETTINGS_MAX_CONCURRENT_STREAMS`; another connection
//! is opened when every one is full (within the endpoint's [`Limit`](super::Limit)).
//!
//! Unlike an HTTP/1 exchange, a connection has a task of its own (hyper's), and it polls
//! the request body: the body is owned and sent as it comes while the response streams
//! back, so both directions are open at once (bidirectional gRPC calls). A connection the
//! pool drops (idle past the idle timeout, by a request or the shard's [`Sweeper`]) ends
//! its task once its streams are done, and gives its place under the limit back.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{response, Request};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;

use super::{lock, Endpoint, Error, Slot, Stream, Sweep, Sweeper};
use crate::protocol::h2::upstream;

/// What a request body's failure is, for hyper.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Request bodies as the connection's task takes them: one type for every caller.
type Outgoing = UnsyncBoxBody<Bytes, BoxError>;

/// An endpoint's HTTP/2 connections, in shards.
pub(super) struct Pool {
    shards: Box<[Shard]>,
    idle_timeout: Duration,
}

struct Shard {
    conns: Mutex<Vec<Conn>>,
    /// One connect at a time per shard: requests that find every connection full while one
    /// is being opened wait for its streams instead of each opening a connection.
    connecting: tokio::sync::Mutex<()>,
    sweeper: Sweeper,
}

/// One connection, as its shard keeps it.
struct Conn {
    send: SendRequest<Outgoing>,
    /// hyper's side of the connection, polled by its task and asked, when a stream is
    /// wanted, for the app's current `SETTINGS_MAX_CONCURRENT_STREAMS` (which hyper learns
    /// in a task of its own: a copy made when this one is polled would be stale). `None`
    /// once the connection has ended.
    driver: Arc<Mutex<Option<Driver>>>,
    /// Streams open on it: responses not yet come, or not yet read to their end.
    open: Arc<AtomicUsize>,
    /// When it last took a stream: with none open, it has been idle since then at most.
    used: Instant,
}

type Driver = Pin<Box<upstream::Driver<Stream, Outgoing>>>;

impl Conn {
    fn is_open(&self) -> bool {
        lock(&self.driver).is_some() && !self.send.is_closed()
    }

    /// How many streams the app takes on it now: 0 before its SETTINGS, and once it ended.
    fn max_streams(&self) -> usize {
        lock(&self.driver)
            .as_ref()
            .map_or(0, |d| d.current_max_send_streams())
    }

    fn has_room(&self) -> bool {
        self.open.load(Relaxed) < self.max_streams()
    }

    /// Whether it is still worth keeping as of `now`: open, and busy or idle for no longer
    /// than `idle_timeout`.
    fn is_kept(&self, now: Instant, idle_timeout: Duration) -> bool {
        self.is_open()
            && (self.open.load(Relaxed) > 0
                || now.saturating_duration_since(self.used) <= idle_timeout)
    }
}

/// A stream's place on its connection, given back when the response is done with.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// A request handed to a connection: the response to come, and the stream's place.
type Sent = (
    Pin<Box<dyn Future<Output = Result<http::Response<Incoming>, TrySend>> + Send>>,
    Open,
);
type TrySend = hyper::client::conn::TrySendError<Request<Outgoing>>;

impl Pool {
    pub(super) fn new(shards: usize, idle_timeout: Duration) -> Pool {
        Pool {
            shards: (0..shards.max(1))
                .map(|_| Shard {
                    conns: Mutex::default(),
                    connecting: tokio::sync::Mutex::const_new(()),
                    sweeper: Sweeper::default(),
                })
                .collect(),
            idle_timeout,
        }
    }

    fn shard(&self, shard: usize) -> &Shard {
        &self.shards[shard % self.shards.len()]
    }
}

impl Sweep for Pool {
    fn expire(&self, shard: usize, now: Instant) -> Option<Instant> {
        let mut conns = lock(&self.shard(shard).conns);
        conns.retain(|c| c.is_kept(now, self.idle_timeout));
        // A busy connection goes idle unannounced: it is looked at again an idle time on.
        conns
            .iter()
            .map(|c| match c.open.load(Relaxed) {
                0 => c.used,
                _ => now,
            })
            .min()
            .map(|since| since + self.idle_timeout)
    }
}

impl Shard {
    /// Sends `req` on a connection with a free stream, or, with `queue`, on the least busy
    /// one (hyper holds the stream back until one of its streams closes). Connections that
    /// are closed, or idle past `idle_timeout` as of `now`, are dropped first. `req` stays
    /// when no connection takes it.
    fn send(
        &self,
        req: &mut Option<Request<Outgoing>>,
        queue: bool,
        now: Instant,
        idle_timeout: Duration,
    ) -> Option<Sent> {
        let mut conns = lock(&self.conns);
        conns.retain(|c| c.is_kept(now, idle_timeout));
        let conn = if queue {
            conns.iter_mut().min_by_key(|c| c.open.load(Relaxed))
        } else {
            conns.iter_mut().find(|c| c.has_room())
        };
        let (conn, req) = (conn?, req.take()?);
        conn.used = now;
        conn.open.fetch_add(1, Relaxed);
        let place = Open(conn.open.clone());
        // The request is handed over now; the future only waits for the answer.
        Some((Box::pin(conn.send.try_send_request(req)), place))
    }
}

/// The response body of an HTTP/2 exchange; its stream's place on the connection is given
/// back when it is dropped (dropping it early cancels the stream).
pub struct Body {
    incoming: Incoming,
    _open: Open,
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Pin::new(&mut self.incoming)
            .poll_frame(cx)
            .map_err(io::Error::other)
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

impl Endpoint {
    /// Whether requests go to the app over HTTP/2 (upgrades still take HTTP/1.1).
    pub fn speaks_h2(&self) -> bool {
        self.h2.is_some()
    }

    /// Sends `req` over HTTP/2 and waits (until `deadline`) for the response head. The
    /// request's URI carries the authority; its body is sent by the connection's task as
    /// it comes. `sent` is the caller's clock read, for the pool.
    pub async fn send_h2<B>(
        &self,
        shard: usize,
        req: Request<B>,
        sent: Instant,
        deadline: Instant,
    ) -> (Result<(response::Parts, Body), Error>, Instant)
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let pool = self
            .h2
            .as_ref()
            .expect("send_h2 is only called on an endpoint that speaks HTTP/2");
        let req = req.map(|body| body.map_err(Into::into).boxed_unsync());
        let exchange = self.exchange_h2(pool, shard, req, sent);
        let result = tokio::time::timeout_at(deadline.into(), exchange)
            .await
            .unwrap_or(Err(Error::Timeout));
        (result, Instant::now())
    }

    async fn exchange_h2(
        &self,
        pool: &Arc<Pool>,
        shard: usize,
        mut req: Request<Outgoing>,
        now: Instant,
    ) -> Result<(response::Parts, Body), Error> {
        loop {
            let (response, open) = self.h2_stream(pool, shard, req, now).await?;
            match response.await {
                Ok(resp) => {
                    let (parts, incoming) = resp.into_parts();
                    return Ok((
                        parts,
                        Body {
                            incoming,
                            _open: open,
                        },
                    ));
                }
                Err(mut e) => match e.take_message() {
                    // The connection closed before the request left: another one takes it.
                    Some(again) => req = again,
                    None => return Err(Error::Reset(io::Error::other(e.into_error()))),
                },
            }
        }
    }

    /// Hands `req` to a connection of the shard: one with a free stream, else a new one
    /// (one connect at a time per shard), else, when the limit allows no new connection,
    /// the least busy one.
    async fn h2_stream(
        &self,
        pool: &Arc<Pool>,
        index: usize,
        req: Request<Outgoing>,
        now: Instant,
    ) -> Result<Sent, Error> {
        let shard = pool.shard(index);
        let mut req = Some(req);
        let send = |req: &mut _, queue| shard.send(req, queue, now, pool.idle_timeout);
        if let Some(sent) = send(&mut req, false) {
            return Ok(sent);
        }
        let _connecting = shard.connecting.lock().await;
        if let Some(sent) = send(&mut req, false) {
            return Ok(sent);
        }
        let full = self
            .limit
            .as_ref()
            .is_some_and(|l| l.permits.available_permits() == 0);
        if full {
            if let Some(sent) = send(&mut req, true) {
                return Ok(sent);
            }
        }
        let slot = self.slot().await?;
        // Boxed: connecting is rare, and its future would otherwise be carried by every
        // request's future.
        let conn = Box::pin(self.connect_h2(slot)).await?;
        lock(&shard.conns).push(conn);
        shard.sweeper.wake(pool, index);
        send(&mut req, true).ok_or_else(|| Error::Reset(io::ErrorKind::ConnectionAborted.into()))
    }

    /// Opens a connection and starts its task; the socket, which hyper holds until the
    /// task ends, keeps the connection's place under the limit.
    async fn connect_h2(&self, slot: Option<Slot>) -> Result<Conn, Error> {
        let io = self.connect_stream(slot).await?;
        let handshake = upstream::handshake(io);
        let (send, conn) = tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| Error::ConnectTimeout)?
            .map_err(|e| Error::Reset(io::Error::other(e)))?;
        let driver = Arc::new(Mutex::new(Some(Box::pin(conn))));
        let polled = driver.clone();
        tokio::spawn(async move {
            let ended = poll_fn(|cx| {
                let mut driver = lock(&polled);
                let Some(conn) = driver.as_mut() else {
                    return Poll::Ready(Ok(()));
                };
                let poll = conn.as_mut().poll(cx);
                if poll.is_ready() {
                    *driver = None;
                }
                poll
            })
            .await;
            if let Err(e) = ended {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        // Waiting for the SETTINGS here, while requests that want a stream wait for this
        // connect, means they know how many this connection takes. hyper learns them in a
        // task of its own, unannounced: ask every millisecond.
        let conn = Conn {
            send,
            driver,
            open: Arc::default(),
            used: Instant::now(),
        };
        let settled = async {
            while conn.max_streams() == 0 {
                if !conn.is_open() {
                    return Err(Error::Invalid("the app does not speak HTTP/2 (h2c)"));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(())
        };
        tokio::time::timeout(self.connect_timeout, settled)
            .await
            .map_err(|_| Error::ConnectTimeout)??;
        Ok(conn)
    }
}

#[cfg(test)]
impl Pool {
    /// Open connections in `shard`, for tests.
    pub(super) fn connections(&self, shard: usize) -> usize {
        self.shard(shard).conns.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::convert::Infallible;
    use tokio::net::TcpListener;
    use tokio::sync::watch;

    /// An h2c app with this stream limit. It answers `/held` only once `held` such requests
    /// are in, so they are all open at once; anything else at once.
    async fn app(max_streams: u32, held: usize) -> (Arc<Endpoint>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let arrived = Arc::new(watch::channel(0usize).0);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Relaxed);
                let arrived = arrived.clone();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let arrived = arrived.clone();
                    async move {
                        if req.uri().path() == "/held" {
                            arrived.send_modify(|n| *n += 1);
                            let _ = arrived.subscribe().wait_for(|n| *n >= held).await;
                        }
                        let ok = http_body_util::Full::new(Bytes::from_static(b"ok"));
                        Ok::<_, Infallible>(http::Response::new(ok))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(max_streams)
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        let target = super::super::Target::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let endpoint = Endpoint::new(target, Duration::from_secs(5), Duration::from_secs(60), 1);
        (Arc::new(endpoint.with_h2()), connections)
    }

    async fn call(endpoint: &Endpoint, path: &str) -> String {
        let req = Request::post(format!("http://app{path}"))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let now = Instant::now();
        let (answer, _) = endpoint
            .send_h2(0, req, now, now + Duration::from_secs(20))
            .await;
        let (_, body) = answer.expect("an answer");
        let bytes = body.collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// `n` held requests at once, after one that lets the app's SETTINGS arrive.
    async fn at_once(endpoint: &Arc<Endpoint>, n: usize) {
        assert_eq!(call(endpoint, "/").await, "ok");
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..n {
            let endpoint = endpoint.clone();
            calls.spawn(async move { call(&endpoint, "/held").await });
        }
        while let Some(answer) = calls.join_next().await {
            assert_eq!(answer.unwrap(), "ok");
        }
    }

    #[tokio::test]
    async fn requests_share_a_connection_up_to_the_apps_stream_limit() {
        let (endpoint, connections) = app(100, 6).await;
        at_once(&endpoint, 6).await;
        assert_eq!(
            connections.load(Relaxed),
            1,
            "six streams fit one connection"
        );
        assert_eq!(endpoint.h2.as_ref().unwrap().connections(0), 1);

        // Two streams per connection: the six held requests can only all be open at once
        // on three connections.
        let (endpoint, connections) = app(2, 6).await;
        at_once(&endpoint, 6).await;
        assert_eq!(connections.load(Relaxed), 3);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_past_the_idle_timeout_with_no_request_to_notice() {
        let (app, connections) = app(100, 0).await;
        let open = prometheus_client::metrics::gauge::Gauge::default();
        let limit = super::super::Limit::new(8, 8, open.clone(), Default::default());
        let endpoint = Endpoint::new(
            app.target.clone(),
            Duration::from_secs(5),
            Duration::from_millis(300),
            1,
        )
        .with_limit(limit)
        .with_h2();
        assert_eq!(call(&endpoint, "/").await, "ok");
        assert_eq!(connections.load(Relaxed), 1);
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while endpoint.h2.as_ref().unwrap().connections(0) > 0 || open.get() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        waited.await.expect("the idle connection closed within 10s");
        let pool = Arc::downgrade(endpoint.h2.as_ref().unwrap());
        drop(endpoint);
        assert!(pool.upgrade().is_none(), "the sweeper holds its pool");
    }

    #[tokio::test]
    async fn an_app_that_does_not_speak_h2_fails_the_request_at_once() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let target = super::super::Target::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let endpoint =
            Endpoint::new(target, Duration::from_secs(30), Duration::from_secs(60), 1).with_h2();
        let req = Request::post("http://app/")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let now = Instant::now();
        let (answer, _) = endpoint
            .send_h2(0, req, now, now + Duration::from_secs(60))
            .await;
        let error = answer.err().expect("no answer from an HTTP/1 app");
        assert!(matches!(error, Error::Invalid(_)), "{error}");
    }
}
