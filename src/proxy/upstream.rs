//! The upstream client: keep-alive HTTP/1.1 connections to the app over TCP or a Unix
//! socket, pooled per worker thread so a request never contends with another worker.
//!
//! A connection has no task of its own: the request that holds it writes the request and
//! reads the response head, and the response body reads the rest as the client takes it,
//! so the whole exchange runs in the client's task with no channel hop (see `h1.rs`).

use std::cell::Cell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{request, response, HeaderValue, Method, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::body::{BodyError, RequestBody};
use super::h1::{self, Chunked, Decoded, RequestFraming, ResponseFraming};
use crate::config::{UpstreamConfig, UpstreamUrl};

/// Idle connections kept per worker; more are closed when they come back.
const MAX_IDLE_PER_WORKER: usize = 1024;
/// Read-buffer growth step: small heads stay in one allocation, bodies read in big steps.
const READ_CHUNK: usize = 16 << 10;

thread_local! {
    /// Which pool shard this thread uses: its worker index (see `set_worker_index`).
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Pins the calling worker thread to pool shard `index`.
pub fn set_worker_index(index: usize) {
    SHARD.with(|s| s.set(index));
}

/// The upstream of one config generation.
pub struct Upstream {
    target: UpstreamUrl,
    /// `host:port` of the upstream, the `Host` header when `preserve_host = false`.
    authority: HeaderValue,
    connect_timeout: Duration,
    timeout: Duration,
    pool: Arc<Pool>,
}

/// Why the upstream gave no response head.
#[derive(Debug)]
pub enum UpstreamError {
    /// TCP or Unix connect failed (refused, unreachable).
    Connect(io::Error),
    /// `upstream.connect_timeout` passed while connecting.
    ConnectTimeout,
    /// `upstream.timeout` passed before the response head.
    Timeout,
    /// The request body went over a `body_limit` while streaming upstream.
    BodyTooLarge,
    /// The client's request body broke off.
    ClientBody,
    /// The upstream reset or closed the connection before a response head.
    Reset(io::Error),
    /// The upstream sent something that is not an HTTP/1.1 response.
    Invalid(&'static str),
}

impl UpstreamError {
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Connect(_) | UpstreamError::Reset(_) | UpstreamError::Invalid(_) => {
                StatusCode::BAD_GATEWAY
            }
            UpstreamError::ConnectTimeout | UpstreamError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            UpstreamError::ClientBody => StatusCode::BAD_REQUEST,
        }
    }

    /// Every [`kind`](Self::kind) of failure that is the upstream's doing (not the client's).
    pub const KINDS: [&'static str; 5] = [
        "connect",
        "connect_timeout",
        "timeout",
        "reset",
        "invalid_response",
    ];

    /// Whether the upstream failed (rather than the client's body or its limit).
    pub fn is_upstream_fault(&self) -> bool {
        !matches!(
            self,
            UpstreamError::BodyTooLarge | UpstreamError::ClientBody
        )
    }

    /// A short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::ConnectTimeout => "connect_timeout",
            UpstreamError::Timeout => "timeout",
            UpstreamError::BodyTooLarge => "body_too_large",
            UpstreamError::ClientBody => "client_body",
            UpstreamError::Reset(_) => "reset",
            UpstreamError::Invalid(_) => "invalid_response",
        }
    }

    /// What the client is told.
    pub fn message(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "the upstream refused the connection",
            UpstreamError::ConnectTimeout => "the upstream did not accept a connection in time",
            UpstreamError::Timeout => "the upstream did not answer in time",
            UpstreamError::BodyTooLarge => "the request body is too large",
            UpstreamError::ClientBody => "the request body could not be read",
            UpstreamError::Reset(_) => "the upstream closed the connection",
            UpstreamError::Invalid(_) => "the upstream sent an invalid response",
        }
    }
}

/// The upstream's answer: a response whose body is still to be read, or a switch of
/// protocols whose connection now belongs to the tunnel.
pub enum Answer {
    Response(response::Parts, UpstreamBody),
    Upgrade(response::Parts, Upgraded),
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, workers: usize) -> Upstream {
        let authority = match &config.url {
            UpstreamUrl::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            UpstreamUrl::Tcp { host, port } => format!("{host}:{port}"),
            UpstreamUrl::Unix(_) => "localhost".to_owned(),
        };
        Upstream {
            target: config.url.clone(),
            authority: HeaderValue::from_str(&authority).expect("validated host"),
            connect_timeout: config.connect_timeout.0,
            timeout: config.timeout.0,
            pool: Arc::new(Pool {
                shards: (0..workers.max(1))
                    .map(|_| Mutex::new(VecDeque::new()))
                    .collect(),
                idle_timeout: config.idle_timeout.0,
            }),
        }
    }

    pub fn authority(&self) -> &HeaderValue {
        &self.authority
    }

    /// Sends the request and waits (at most `upstream.timeout` from `sent`) for the
    /// response head. Returns the answer and when it came: the caller's clock reads serve
    /// the pool and the timeout too, instead of each reading its own.
    pub async fn send(
        &self,
        parts: &request::Parts,
        forwarded: &h1::Forwarded<'_>,
        body: &mut RequestBody,
        sent: Instant,
    ) -> (Result<Answer, UpstreamError>, Instant) {
        let result = self.exchange(parts, forwarded, body, sent).await;
        let answered = Instant::now();
        let result = result.map(|(head, conn)| {
            if head.parts.status == StatusCode::SWITCHING_PROTOCOLS {
                Answer::Upgrade(
                    head.parts,
                    Upgraded {
                        io: conn.io,
                        read: conn.read,
                    },
                )
            } else {
                let body = UpstreamBody::new(conn, &head, &self.pool, answered);
                Answer::Response(head.parts, body)
            }
        });
        (result, answered)
    }

    /// Sends the request on a pooled (or new) connection and reads the response head.
    async fn exchange(
        &self,
        parts: &request::Parts,
        forwarded: &h1::Forwarded<'_>,
        body: &mut RequestBody,
        sent: Instant,
    ) -> Result<(h1::Head, Conn), UpstreamError> {
        let deadline = tokio::time::Instant::from_std(sent) + self.timeout;
        let framing = if body.is_end_stream() {
            RequestFraming::None
        } else {
            body.size_hint()
                .exact()
                .map_or(RequestFraming::Chunked, RequestFraming::Length)
        };
        loop {
            let (mut conn, reused) = match self.pool.checkout(sent).await {
                Some(conn) => (conn, true),
                // Boxed: connecting is rare, and its future would otherwise be carried
                // (and copied) by every request's future.
                None => (Box::pin(self.connect()).await?, false),
            };
            conn.out.clear();
            h1::encode_request(parts, framing, forwarded, &mut conn.out);
            let exchange = conn.exchange(&parts.method, framing, body);
            let head = match tokio::time::timeout_at(deadline, exchange).await {
                Err(_) => return Err(UpstreamError::Timeout),
                Ok(Ok(head)) => head,
                // A stale pooled connection that the app cannot have acted on: try another.
                Ok(Err(Failure::Stale(_))) if reused => continue,
                Ok(Err(Failure::Stale(e))) => return Err(UpstreamError::Reset(e)),
                Ok(Err(Failure::Fatal(e))) => return Err(e),
            };
            return Ok((head, conn));
        }
    }

    /// Opens (and drops) one connection: the readiness probe of `[admin] upstream_check`.
    pub async fn probe(&self) -> Result<(), UpstreamError> {
        self.connect().await.map(drop)
    }

    async fn connect(&self) -> Result<Conn, UpstreamError> {
        let connect = async {
            Ok::<_, io::Error>(match &self.target {
                UpstreamUrl::Tcp { host, port } => {
                    let stream = TcpStream::connect((host.as_str(), *port)).await?;
                    stream.set_nodelay(true)?;
                    Stream::Tcp(stream)
                }
                UpstreamUrl::Unix(path) => Stream::Unix(UnixStream::connect(path).await?),
            })
        };
        let io = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout)?
            .map_err(UpstreamError::Connect)?;
        Ok(Conn {
            io,
            read: BytesMut::with_capacity(READ_CHUNK),
            out: Vec::with_capacity(1024),
        })
    }
}

/// Why an exchange failed.
enum Failure {
    /// Nothing the app could have acted on: the request may go on another connection.
    Stale(io::Error),
    Fatal(UpstreamError),
}

/// A TCP or Unix socket to the upstream.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Readable while idle means the app closed it (or sent garbage): either way, unusable.
    /// Tokio's cached readiness answers without a system call.
    fn poll_idle_alive(&self, cx: &mut Context<'_>) -> bool {
        let readable = match self {
            Stream::Tcp(s) => s.poll_read_ready(cx),
            Stream::Unix(s) => s.poll_read_ready(cx),
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
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// One upstream connection and its buffers, reused request after request.
struct Conn {
    io: Stream,
    /// Bytes read from the upstream and not yet consumed.
    read: BytesMut,
    /// The encoded request head (and chunk framing) on its way out.
    out: Vec<u8>,
}

impl Conn {
    /// Writes the encoded head and the body, then reads the response head.
    async fn exchange(
        &mut self,
        method: &Method,
        framing: RequestFraming,
        body: &mut RequestBody,
    ) -> Result<h1::Head, Failure> {
        if let Err(e) = self.io.write_all(&self.out).await {
            return Err(Failure::Stale(e));
        }
        if framing != RequestFraming::None {
            match self.write_body(framing, body).await {
                Ok(()) => {}
                // The app may have answered early (e.g. 401 to an upload it will not read)
                // and closed: its response, if complete, is still the right answer.
                Err(UpstreamError::Reset(e)) => {
                    return match self.read_head(method).await {
                        Ok(head) => Ok(head),
                        Err(_) => Err(Failure::Fatal(UpstreamError::Reset(e))),
                    };
                }
                Err(e) => return Err(Failure::Fatal(e)),
            }
        }
        let replayable = framing == RequestFraming::None && is_idempotent(method);
        match self.read_head(method).await {
            Err(Failure::Stale(e)) if !replayable => Err(Failure::Fatal(UpstreamError::Reset(e))),
            other => other,
        }
    }

    /// Streams the request body; `Reset` means the upstream stopped taking it.
    async fn write_body(
        &mut self,
        framing: RequestFraming,
        body: &mut RequestBody,
    ) -> Result<(), UpstreamError> {
        while let Some(frame) = poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
            let frame = frame.map_err(|e| match e {
                BodyError::TooLarge => UpstreamError::BodyTooLarge,
                BodyError::Client(_) => UpstreamError::ClientBody,
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if framing == RequestFraming::Chunked {
                self.out.clear();
                h1::encode_chunk(&data, &mut self.out);
                self.io
                    .write_all(&self.out)
                    .await
                    .map_err(UpstreamError::Reset)?;
            } else {
                self.io
                    .write_all(&data)
                    .await
                    .map_err(UpstreamError::Reset)?;
            }
        }
        if framing == RequestFraming::Chunked {
            self.io
                .write_all(h1::LAST_CHUNK)
                .await
                .map_err(UpstreamError::Reset)?;
        }
        Ok(())
    }

    /// Reads until a final response head (1xx other than 101 are skipped).
    async fn read_head(&mut self, method: &Method) -> Result<h1::Head, Failure> {
        let mut received = !self.read.is_empty();
        loop {
            match h1::parse_response(&mut self.read, method) {
                Ok(Some(head))
                    if head.parts.status.is_informational()
                        && head.parts.status != StatusCode::SWITCHING_PROTOCOLS =>
                {
                    continue
                }
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(e) => return Err(Failure::Fatal(UpstreamError::Invalid(e.0))),
            }
            self.read.reserve(READ_CHUNK);
            match poll_fn(|cx| {
                tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
            })
            .await
            {
                Ok(0) if !received => {
                    return Err(Failure::Stale(io::ErrorKind::UnexpectedEof.into()))
                }
                Ok(0) => {
                    return Err(Failure::Fatal(UpstreamError::Invalid(
                        "the response head was cut short",
                    )))
                }
                Ok(_) => received = true,
                Err(e) if !received => return Err(Failure::Stale(e)),
                Err(e) => return Err(Failure::Fatal(UpstreamError::Reset(e))),
            }
        }
    }
}

/// Methods whose request may be sent twice (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A worker's idle connections, oldest first, each with the time it went idle.
type Shard = Mutex<VecDeque<(Conn, Instant)>>;

/// Idle connections, one shard per worker thread.
struct Pool {
    shards: Box<[Shard]>,
    idle_timeout: Duration,
}

impl Pool {
    fn shard(&self) -> &Shard {
        &self.shards[SHARD.with(Cell::get) % self.shards.len()]
    }

    /// The most recently used live connection, as of `now`.
    async fn checkout(&self, now: Instant) -> Option<Conn> {
        loop {
            // The lock is released before any await.
            let (conn, since) = self
                .shard()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_back()?;
            if now.saturating_duration_since(since) <= self.idle_timeout
                && poll_fn(|cx| Poll::Ready(conn.io.poll_idle_alive(cx))).await
            {
                return Some(conn);
            }
        }
    }

    /// Pools `conn`, idle since `since`: the time its last response head arrived, which
    /// is never later than when the app started its keep-alive timer, so a connection is
    /// retired early rather than late (a long stream makes its connection retire at once).
    fn checkin(&self, conn: Conn, since: Instant) {
        let mut idle = self.shard().lock().unwrap_or_else(|e| e.into_inner());
        // The oldest connections sit at the front: drop those past their idle time.
        while idle
            .front()
            .is_some_and(|(_, oldest)| since.saturating_duration_since(*oldest) > self.idle_timeout)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE_PER_WORKER {
            idle.push_back((conn, since));
        }
    }
}

/// The upstream's response body, read from its connection as the client takes it. The
/// connection goes back to the pool once the body has been read to its end; dropping the
/// body earlier closes it.
pub struct UpstreamBody {
    conn: Option<Conn>,
    state: BodyState,
    keep_alive: bool,
    pool: Arc<Pool>,
    /// When the head arrived: the connection's idle time counts from here.
    answered: Instant,
}

enum BodyState {
    Length(u64),
    Chunked(Chunked),
    Close,
    /// The upstream broke off; reported on the next poll, once what came before it has
    /// been flushed (hyper drops unflushed bytes when a body fails).
    Failed(io::ErrorKind),
    Done,
}

impl UpstreamBody {
    fn new(conn: Conn, head: &h1::Head, pool: &Arc<Pool>, answered: Instant) -> Self {
        let state = match head.framing {
            ResponseFraming::Empty | ResponseFraming::Length(0) => BodyState::Done,
            ResponseFraming::Length(n) => BodyState::Length(n),
            ResponseFraming::Chunked => BodyState::Chunked(Chunked::Size),
            ResponseFraming::Close => BodyState::Close,
        };
        let mut body = UpstreamBody {
            conn: Some(conn),
            state,
            keep_alive: head.keep_alive,
            pool: pool.clone(),
            answered,
        };
        if matches!(body.state, BodyState::Done) {
            body.finish();
        }
        body
    }

    /// The body is complete: pool the connection if it can carry another request.
    fn finish(&mut self) {
        self.state = BodyState::Done;
        if let Some(conn) = self.conn.take() {
            // Bytes after the end of the response mean the app and gatehouse disagree
            // about framing: never reuse such a connection.
            if self.keep_alive && conn.read.is_empty() {
                self.pool.checkin(conn, self.answered);
            }
        }
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let data = match &mut this.state {
                BodyState::Done => None,
                BodyState::Failed(kind) => {
                    let kind = *kind;
                    this.conn = None;
                    return Poll::Ready(Some(Err(kind.into())));
                }
                BodyState::Length(left) if !conn.read.is_empty() => {
                    let take = (*left).min(conn.read.len() as u64);
                    *left -= take;
                    Some(conn.read.split_to(take as usize).freeze())
                }
                BodyState::Chunked(decoder) => match decoder.decode(&mut conn.read) {
                    Ok(Decoded::Data(data)) => Some(data),
                    Ok(Decoded::End) => {
                        this.state = BodyState::Done;
                        None
                    }
                    Ok(Decoded::NeedMore) => None,
                    Err(e) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            e.0,
                        ))));
                    }
                },
                BodyState::Close if !conn.read.is_empty() => Some(conn.read.split().freeze()),
                BodyState::Length(_) | BodyState::Close => None,
            };
            if let Some(data) = data {
                if matches!(this.state, BodyState::Length(0)) {
                    this.finish();
                }
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if matches!(this.state, BodyState::Done) {
                this.finish();
                return Poll::Ready(None);
            }
            conn.read.reserve(READ_CHUNK);
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.io),
                cx,
                &mut conn.read
            )) {
                Ok(0) if matches!(this.state, BodyState::Close) => {
                    this.keep_alive = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    // Cut short: the client must see an error, never a truncated success.
                    this.state = BodyState::Failed(io::ErrorKind::UnexpectedEof);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Ok(_) => {}
                Err(e) => {
                    this.state = BodyState::Failed(e.kind());
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Length(n) => SizeHint::with_exact(n),
            BodyState::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// An upstream connection after `101 Switching Protocols`, with any bytes already read.
pub struct Upgraded {
    pub io: Stream,
    pub read: BytesMut,
}
